//! What ONNX Runtime's CPU execution provider does with each node of a QDQ model (`lapq inspect
//! --fusion`): fused into an integer kernel, run on integers with its Q/DQ pair dropped, or left in
//! float, and why. The rules are those of ONNX Runtime 1.31's QDQ selectors at graph optimization
//! level 2 and above on x86-64, as `scripts/ort_fusion.py` observes them in its optimized graph: int8
//! activations are converted to uint8 where a Q/DQ pair serves one node, and stay float elsewhere.
//! Nodes ONNX Runtime removes outright (constant folding, merged Transposes) get a verdict as if kept.

use anyhow::Result;
use serde::Serialize;

use crate::ir::GraphIndex;
use crate::onnx::{self, DataType, ModelProto, NodeProto};

/// One node's fate.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Verdict {
    pub node: String,
    pub op_type: String,
    /// Whether it runs on integers.
    pub integer: bool,
    /// The integer kernel it becomes, or the op itself moving integers (`None` when float).
    pub kernel: Option<String>,
    /// Why it stays float (`None` when integer).
    pub reason: Option<String>,
    /// Why the integer kernel can depart from the Q/DQ semantics on some CPUs (`None` when it
    /// cannot).
    pub warning: Option<String>,
}

/// Compute ops with an integer kernel for a DQ -> op -> Q group, and the kernel.
const FUSED: &[(&str, &str)] = &[
    ("Conv", "QLinearConv"),
    ("MatMul", "QLinearMatMul"),
    ("Gemm", "QGemm"),
    ("Add", "QLinearAdd"),
    ("Mul", "QLinearMul"),
    ("Concat", "QLinearConcat"),
    ("AveragePool", "QLinearAveragePool"),
    ("GlobalAveragePool", "QLinearGlobalAveragePool"),
    ("LeakyRelu", "QLinearLeakyRelu"),
    ("Sigmoid", "QLinearSigmoid"),
    ("Softmax", "QLinearSoftmax"),
];

/// Ops that move values without arithmetic: their Q/DQ pair is dropped when both sides match.
const DATA_MOVEMENT: &[&str] = &[
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
    "MaxPool",
    "Resize",
    "Slice",
    "Split",
    "Gather",
    "GatherElements",
    "DepthToSpace",
    "SpaceToDepth",
    "Tile",
    "Expand",
];

/// Data-movement ops a QuantizeLinear after them is moved above (ONNX Runtime's QDQ propagation), so
/// that they run on integers even when their input is float.
const Q_PROPAGATES: &[&str] = &["MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze"];

/// The verdict on every node of `model` but its QuantizeLinear/DequantizeLinear nodes, in graph order.
pub fn fusion(model: &ModelProto) -> Result<Vec<Verdict>> {
    let index = GraphIndex::new(model)?;
    check_qdq_arity(index.graph)?;
    Ok(index
        .graph
        .node
        .iter()
        .filter(|n| !matches!(n.op_type(), "QuantizeLinear" | "DequantizeLinear"))
        .map(|n| verdict(&index, n))
        .collect())
}

fn verdict(index: &GraphIndex, node: &NodeProto) -> Verdict {
    let op = node.op_type();
    let (integer, kernel, reason) = match judge(index, node) {
        Ok(kernel) => (true, Some(kernel), None),
        Err(why) => (false, None, Some(why)),
    };
    let warning = integer.then(|| saturation(index, node)).flatten();
    Verdict {
        node: onnx::node_label(node),
        op_type: op.to_string(),
        integer,
        kernel,
        reason,
        warning,
    }
}

/// The nodes ONNX Runtime runs in a uint8 x int8 kernel whose 16-bit pair sums their weights can
/// saturate on x86 without VNNI (those `inspect --fusion` warns about), in graph order.
pub(crate) fn saturating_nodes<'m>(index: &GraphIndex<'m>) -> Vec<&'m NodeProto> {
    index
        .graph
        .node
        .iter()
        .filter(|n| judge(index, n).is_ok() && saturation(index, n).is_some())
        .collect()
}

/// Why a fused Conv (but depthwise), MatMul or Gemm can saturate on x86 without VNNI: there the
/// uint8 x int8 kernels add products in 16-bit pairs, and int8 weights beyond [-64, 64] can overflow
/// them (ONNX Runtime's own S8-to-U8 conversion uses the same bound).
fn saturation(index: &GraphIndex, node: &NodeProto) -> Option<String> {
    let op = node.op_type();
    if !matches!(op, "Conv" | "MatMul" | "Gemm") {
        return None;
    }
    let weight = node.input.get(1)?;
    let dq = index
        .producer(weight)
        .map(|p| index.node(p))
        .filter(|p| p.op_type() == "DequantizeLinear")?;
    let w = index.constant(dq.input.first()?)?.tensor();
    if w.data_type() != DataType::Int8 as i32 {
        return None;
    }
    let depthwise = crate::ir::depthwise_conv(node, &onnx::tensor_dims(w).ok()?);
    let largest = onnx::tensor_ints(w).ok()?.iter().map(|c| c.abs()).max()?;
    (!depthwise && largest > 64).then(|| {
        format!(
            "int8 weight '{}' reaches {largest}: on x86 without VNNI its 16-bit pair sums can \
             saturate and the fused result departs from the Q/DQ semantics (--target portable keeps \
             such weights within 63)",
            dq.input[0]
        )
    })
}

/// A DequantizeLinear feeding `node`: its element type and whether it dequantizes a constant.
struct Source<'m> {
    dq: &'m NodeProto,
    elem: i32,
    constant: bool,
}

fn judge(index: &GraphIndex, node: &NodeProto) -> std::result::Result<String, String> {
    let op = node.op_type();
    if node.input.first().is_none_or(|i| i.is_empty()) || node.output.is_empty() {
        return Err(format!("{op} without a first input or an output"));
    }
    let fused = FUSED.iter().find(|(o, _)| *o == op).map(|(_, k)| *k);
    let moves = DATA_MOVEMENT.contains(&op);
    if !matches!(node.domain(), "" | "ai.onnx") || (fused.is_none() && !moves) {
        return Err(format!(
            "{op} has no integer kernel in ONNX Runtime's CPU execution provider"
        ));
    }
    if moves
        && Q_PROPAGATES.contains(&op)
        && index
            .producer(&node.input[0])
            .is_none_or(|p| index.node(p).op_type() != "DequantizeLinear")
    {
        let out = &node.output[0];
        let consumers = index.consumers(out);
        return if !index.is_graph_output(out)
            && consumers.len() == 1
            && index.node(consumers[0]).op_type() == "QuantizeLinear"
        {
            Ok(op.to_string())
        } else {
            Err(format!(
                "input '{}' does not come from a DequantizeLinear",
                node.input[0]
            ))
        };
    }
    let sources = sources(index, node, moves)?;
    // MaxPool has an 8-bit kernel; the other data-movement ops move any integer type.
    for s in sources.iter().filter(|_| !moves || op == "MaxPool") {
        if !is_eight_bit(s.elem) {
            let what = if s.constant { "weight" } else { "activation" };
            return Err(format!(
                "{} {what} '{}': ONNX Runtime's CPU kernels fuse 8-bit only",
                onnx::elem_type_name(s.elem).to_lowercase(),
                s.dq.input[0]
            ));
        }
    }
    let activation = sources
        .iter()
        .find(|s| !s.constant)
        .map(|s| s.elem)
        .or(sources.first().map(|s| s.elem))
        .unwrap_or(DataType::Uint8 as i32);
    if !moves && activation == DataType::Int8 as i32 {
        return Err("int8 activation shared by several nodes: on x86 ONNX Runtime converts only \
             unshared int8 Q/DQ pairs to uint8 and fuses no int8 activations (use uint8 activations)"
            .into());
    }
    // Element-wise and pooling kernels take every input in the activations' type (MatMul, Conv and
    // Gemm take int8 weights beside uint8 activations).
    if !moves
        && !matches!(op, "Conv" | "MatMul" | "Gemm")
        && let Some(s) = sources.iter().find(|s| s.elem != activation)
    {
        return Err(format!(
            "input '{}' is {}, the activations {}",
            s.dq.input[0],
            onnx::elem_type_name(s.elem).to_lowercase(),
            onnx::elem_type_name(activation).to_lowercase()
        ));
    }
    let outputs_q = match quantized_outputs(index, node)? {
        Outputs::Quantized(q) => q,
        Outputs::Kernel(k) => return Ok(k),
    };
    for q in &outputs_q {
        let t = output_type(index, q);
        if t != activation {
            return Err(format!(
                "input and output types differ ({} in, {} out)",
                onnx::elem_type_name(activation).to_lowercase(),
                onnx::elem_type_name(t).to_lowercase()
            ));
        }
    }
    if moves {
        let dq = sources[0].dq;
        if let Some(q) = outputs_q.iter().find(|q| !same_parameters(index, dq, q)) {
            return Err(format!(
                "scale or zero point of '{}' differs from its input's: the Q/DQ pair cannot be dropped",
                q.input[0]
            ));
        }
        return Ok(op.to_string());
    }
    if op == "Gemm" && onnx::attr_f(node, "beta", 1.0) != 1.0 {
        return Err("Gemm beta is not 1".into());
    }
    Ok(fused.unwrap_or(op).to_string())
}

/// The DequantizeLinear nodes feeding `node`'s float inputs: input 0 of a data-movement op, every
/// non-empty input of a compute op except a Conv's or Gemm's bias, which must be int32. Fails naming
/// the first input that no DequantizeLinear produces.
fn sources<'m>(
    index: &'m GraphIndex,
    node: &NodeProto,
    moves: bool,
) -> std::result::Result<Vec<Source<'m>>, String> {
    let op = node.op_type();
    // Float inputs: those a data-movement op moves (input 0), or every non-empty input of a compute op.
    let data_inputs: Vec<&str> = if moves {
        node.input.iter().take(1).map(String::as_str).collect()
    } else {
        node.input
            .iter()
            .map(String::as_str)
            .filter(|i| !i.is_empty())
            .collect()
    };
    let mut sources = vec![];
    for (k, input) in data_inputs.iter().enumerate() {
        let dq = index
            .producer(input)
            .map(|p| index.node(p))
            .filter(|p| p.op_type() == "DequantizeLinear");
        let Some(dq) = dq else {
            return Err(format!(
                "input '{input}' does not come from a DequantizeLinear"
            ));
        };
        let constant = index.constant(&dq.input[0]).is_some();
        let elem = if constant {
            quantized_type(index, dq)
        } else {
            effective_type(index, dq)
        };
        let bias = matches!(op, "Conv" | "Gemm") && k == 2;
        if bias {
            if elem != DataType::Int32 as i32 {
                return Err(format!("bias '{input}' is not dequantized from int32"));
            }
            continue;
        }
        sources.push(Source { dq, elem, constant });
    }
    Ok(sources)
}

/// Where `node`'s outputs go: the QuantizeLinear nodes reading them all, or the kernel ONNX Runtime
/// picks when one is read in float (MatMulIntegerToFloat, QGemm with float output).
enum Outputs<'m> {
    Quantized(Vec<&'m NodeProto>),
    Kernel(String),
}

/// [`Outputs`] of `node`, or why it does not fuse (an output read in float by a node that no kernel
/// covers, or a graph output).
fn quantized_outputs<'m>(
    index: &'m GraphIndex,
    node: &NodeProto,
) -> std::result::Result<Outputs<'m>, String> {
    let op = node.op_type();
    // Every output must go to QuantizeLinear nodes only (a MatMul without one becomes
    // MatMulIntegerToFloat).
    let mut outputs_q = vec![];
    for out in node.output.iter().filter(|o| !o.is_empty()) {
        let consumers = index.consumers(out);
        let all_q = !consumers.is_empty()
            && consumers
                .iter()
                .all(|&c| index.node(c).op_type() == "QuantizeLinear");
        if index.is_graph_output(out) || !all_q {
            // Without a QuantizeLinear after it a MatMul becomes MatMulIntegerToFloat, except before a
            // Clip (the clamp of a narrow-grid activation), as observed with ONNX Runtime 1.31.
            let clipped = consumers.iter().any(|&c| index.node(c).op_type() == "Clip");
            if op == "MatMul" && !clipped {
                return Ok(Outputs::Kernel("MatMulIntegerToFloat".into()));
            }
            // A Gemm whose output no QuantizeLinear reads becomes a QGemm with float output (not
            // before a Clip either).
            let float_only = consumers
                .iter()
                .all(|&c| index.node(c).op_type() != "QuantizeLinear");
            if op == "Gemm" && float_only && !clipped && onnx::attr_f(node, "beta", 1.0) == 1.0 {
                return Ok(Outputs::Kernel("QGemm".into()));
            }
            let reader = consumers
                .iter()
                .map(|&c| index.node(c))
                .find(|c| c.op_type() != "QuantizeLinear")
                .map(|c| format!("read by {} ({})", onnx::node_label(c), c.op_type()));
            return Err(format!(
                "output '{out}' is {}",
                reader.unwrap_or_else(|| "a graph output".into())
            ));
        }
        outputs_q.extend(consumers.iter().map(|&c| index.node(c)));
    }
    Ok(Outputs::Quantized(outputs_q))
}

/// An activation DequantizeLinear's element type as the x86 CPU provider sees it: int8 Q/DQ pairs
/// that one node alone reads (after ONNX Runtime gives each consumer its own DequantizeLinear) are
/// converted to uint8; shared ones stay int8.
fn effective_type(index: &GraphIndex, dq: &NodeProto) -> i32 {
    let t = quantized_type(index, dq);
    if t != DataType::Int8 as i32 {
        return t;
    }
    let unshared = index.consumers(&dq.output[0]).len() == 1
        && index
            .producer(&dq.input[0])
            .map(|q| index.node(q))
            .is_some_and(|q| {
                q.op_type() == "QuantizeLinear" && index.consumers(&q.output[0]).len() == 1
            });
    if unshared { DataType::Uint8 as i32 } else { t }
}

/// A QuantizeLinear's element type as the x86 CPU provider sees it (see `effective_type`).
fn output_type(index: &GraphIndex, q: &NodeProto) -> i32 {
    let t = quantized_type(index, q);
    let readers = index.consumers(&q.output[0]);
    match readers {
        [dq] if t == DataType::Int8 as i32
            && index.node(*dq).op_type() == "DequantizeLinear"
            && index.consumers(&index.node(*dq).output[0]).len() <= 1 =>
        {
            DataType::Uint8 as i32
        }
        _ => t,
    }
}

/// Every QuantizeLinear/DequantizeLinear has its input and output (the code below reads them).
pub(crate) fn check_qdq_arity(graph: &onnx::GraphProto) -> Result<()> {
    for n in &graph.node {
        if matches!(n.op_type(), "QuantizeLinear" | "DequantizeLinear") {
            anyhow::ensure!(
                n.input.first().is_some_and(|i| !i.is_empty()) && !n.output.is_empty(),
                "node {} ({}) has no input or no output",
                onnx::node_label(n),
                n.op_type()
            );
        }
    }
    Ok(())
}

fn is_eight_bit(elem: i32) -> bool {
    elem == DataType::Uint8 as i32 || elem == DataType::Int8 as i32
}

/// The integer element type of a QuantizeLinear's output or a DequantizeLinear's input: its zero
/// point's type, else (DequantizeLinear) its constant input's, else `output_dtype`, else uint8.
fn quantized_type(index: &GraphIndex, node: &NodeProto) -> i32 {
    let of = |t: &str| index.constant(t).map(|c| c.tensor().data_type());
    node.input
        .get(2)
        .filter(|z| !z.is_empty())
        .and_then(|z| of(z))
        .or_else(|| {
            (node.op_type() == "DequantizeLinear")
                .then(|| of(&node.input[0]))
                .flatten()
        })
        .or_else(|| match onnx::attr_i(node, "output_dtype", 0) {
            0 => None,
            t => Some(t as i32),
        })
        .unwrap_or(DataType::Uint8 as i32)
}

/// Whether a DequantizeLinear and a QuantizeLinear use equal constant scales and zero points.
fn same_parameters(index: &GraphIndex, dq: &NodeProto, q: &NodeProto) -> bool {
    let value = |n: &NodeProto, k: usize| -> Option<(i32, Vec<u8>)> {
        match n.input.get(k).filter(|t| !t.is_empty()) {
            None => Some((0, vec![])),
            Some(t) => {
                let c = index.constant(t)?.tensor();
                let bytes = match (onnx::tensor_f32(c), onnx::tensor_ints(c)) {
                    (Ok(f), _) => f.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    (_, Ok(i)) => i.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    _ => return None,
                };
                Some((c.data_type(), bytes))
            }
        }
    };
    let (s1, s2) = (value(dq, 1), value(q, 1));
    let (z1, z2) = (value(dq, 2), value(q, 2));
    s1.is_some() && s1 == s2 && z1 == z2
}
