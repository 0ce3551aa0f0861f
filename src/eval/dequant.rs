//! The float model a QDQ model computes, for `lapq eval`: tract cannot load every QDQ model (INT4
//! weights, 16-bit activations), but it runs the same arithmetic written with float operators.
//!
//! Every DequantizeLinear of a constant becomes the float constant it yields (per tensor or per axis),
//! and every QuantizeLinear -> DequantizeLinear pair becomes
//! `(min(max(round(x / s) + z, qmin), qmax) - z') * s'` in float, with ONNX's round half to even,
//! the saturation bounds of the QuantizeLinear's element type, and the DequantizeLinear's own `s'`,
//! `z'`. Everything else is kept as it is.

use std::collections::HashSet;

use anyhow::{Context, Result, bail, ensure};

use crate::ir::GraphIndex;
use crate::onnx::{self, DataType, ModelProto, NodeProto, TensorData, TensorProto};

/// Operators that compute on integers themselves: a model holding them is not a QDQ model.
const INTEGER_OPS: &[&str] = &[
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
    "QLinearAdd",
    "QLinearMul",
    "QLinearConcat",
    "QLinearSigmoid",
    "QLinearLeakyRelu",
    "QLinearGlobalAveragePool",
    "QLinearAveragePool",
    "QLinearSoftmax",
    "QGemm",
    "QAttention",
    "DynamicQuantizeLinear",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "MatMulNBits",
];

/// The float model `model` (a QDQ model) computes. Errors name the node that prevents it.
pub fn dequantized(model: &ModelProto) -> Result<ModelProto> {
    let index = GraphIndex::new(model)?;
    let graph = model.graph.as_ref().context("the model has no graph")?;
    crate::fusion::check_qdq_arity(graph)?;
    let mut names = onnx::Names::of(graph);
    let mut nodes: Vec<NodeProto> = vec![];
    let mut inits: Vec<TensorProto> = vec![];
    for node in &graph.node {
        let label = onnx::node_label(node);
        let op = node.op_type();
        let default_domain = matches!(node.domain(), "" | "ai.onnx");
        if INTEGER_OPS.contains(&op) {
            bail!(
                "node {label} ({op}) computes on integers: lapq eval reads QDQ models \
                 (QuantizeLinear/DequantizeLinear around float operators)"
            );
        }
        match op {
            "QuantizeLinear" if default_domain => {
                // Dropped: each DequantizeLinear reading it repeats its arithmetic.
                let out = &node.output[0];
                ensure!(
                    !index.is_graph_output(out)
                        && index
                            .consumers(out)
                            .iter()
                            .all(|&c| index.node(c).op_type() == "DequantizeLinear"),
                    "node {label}: the quantized tensor '{out}' is read by something other than \
                     DequantizeLinear"
                );
            }
            "DequantizeLinear" if default_domain => {
                ensure!(
                    onnx::attr_i(node, "block_size", 0) == 0,
                    "node {label}: blocked quantization (block_size) is not supported"
                );
                let x = input(node, 0).with_context(|| format!("node {label} has no input"))?;
                let y = &node.output[0];
                let (scale, zero) = params(&index, node)?;
                if let Some(c) = index.constant(x) {
                    inits.push(
                        dequantize_constant(c.tensor(), node, y, &scale, &zero)
                            .with_context(|| format!("node {label}"))?,
                    );
                } else if let Some(q) = index
                    .producer(x)
                    .map(|p| index.node(p))
                    .filter(|q| q.op_type() == "QuantizeLinear")
                {
                    fake_quant(
                        &index,
                        q,
                        (&scale, &zero),
                        y,
                        &mut names,
                        &mut nodes,
                        &mut inits,
                    )?;
                } else {
                    bail!(
                        "node {label}: DequantizeLinear of '{x}', which neither a constant nor a \
                         QuantizeLinear produces"
                    );
                }
            }
            _ => nodes.push(node.clone()),
        }
    }
    let mut out = model.clone();
    let g = out.graph.as_mut().context("the model has no graph")?;
    g.node = nodes;
    g.initializer.extend(inits);
    let read: HashSet<String> = g
        .node
        .iter()
        .flat_map(|n| n.input.iter().chain(&n.output))
        .chain(g.output.iter().filter_map(|o| o.name.as_ref()))
        .cloned()
        .collect();
    // Integer constants only the removed nodes read (tract cannot load 4-bit ones).
    g.initializer.retain(|t| read.contains(t.name()));
    g.input
        .retain(|i| read.contains(i.name()) || index.constant(i.name()).is_none());
    g.value_info.retain(|v| read.contains(v.name()));
    if onnx::default_opset(&out).unwrap_or(0) < 11 {
        crate::export::opset::raise_default_opset(&mut out, 11, "Round")?;
    }
    Ok(out)
}

/// The float arithmetic of the pair `q` -> DequantizeLinear (scale and zero point `dq`) writing `y`:
/// Div, Round, Add, Max, Min, Sub, Mul, with their scalar constants.
fn fake_quant(
    index: &GraphIndex,
    q: &NodeProto,
    dq: (&[f32], &[i64]),
    y: &str,
    names: &mut onnx::Names,
    nodes: &mut Vec<NodeProto>,
    inits: &mut Vec<TensorProto>,
) -> Result<()> {
    let (scale, zero) = dq;
    let qlabel = onnx::node_label(q);
    let (qscale, qzero) = params(index, q)?;
    ensure!(
        qscale.len() == 1 && scale.len() == 1,
        "node {qlabel}: per-axis quantization of the activation '{}' is not supported",
        q.input[0]
    );
    let (lo, hi) =
        type_range(quantized_type(index, q)?).with_context(|| format!("node {qlabel}"))?;
    let mut scalar = |base: &str, v: f32| {
        let name = names.fresh(&format!("{y}_{base}"));
        inits.push(onnx::make_tensor(&name, &[], TensorData::F32(vec![v])));
        name
    };
    let consts = [
        scalar("qscale", qscale[0]),
        scalar("qzero", qzero[0] as f32),
        scalar("qmin", lo as f32),
        scalar("qmax", hi as f32),
        scalar("zero", zero[0] as f32),
        scalar("scale", scale[0]),
    ];
    let steps = [
        ("Div", 0),
        ("Round", usize::MAX),
        ("Add", 1),
        ("Max", 2),
        ("Min", 3),
        ("Sub", 4),
        ("Mul", 5),
    ];
    let mut value = q.input[0].clone();
    for (k, (step, c)) in steps.iter().enumerate() {
        let out = if k + 1 == steps.len() {
            y.to_string()
        } else {
            names.fresh(&format!("{y}_{step}"))
        };
        let mut inputs = vec![value];
        if let Some(c) = consts.get(*c) {
            inputs.push(c.clone());
        }
        nodes.push(NodeProto {
            name: Some(names.fresh(&format!("{y}_{step}"))),
            op_type: Some(step.to_string()),
            input: inputs,
            output: vec![out.clone()],
            ..Default::default()
        });
        value = out;
    }
    Ok(())
}

fn input(node: &NodeProto, k: usize) -> Option<&str> {
    node.input
        .get(k)
        .map(String::as_str)
        .filter(|s| !s.is_empty())
}

/// The scale and zero point (0 when absent) of a QuantizeLinear or DequantizeLinear; both constants.
pub(super) fn params(index: &GraphIndex, node: &NodeProto) -> Result<(Vec<f32>, Vec<i64>)> {
    let label = onnx::node_label(node);
    let constant = |k: usize| -> Result<Option<&TensorProto>> {
        match input(node, k) {
            None => Ok(None),
            Some(name) => index
                .constant(name)
                .map(|c| Some(c.tensor()))
                .with_context(|| format!("node {label}: '{name}' is not a constant")),
        }
    };
    let scale = constant(1)?.with_context(|| format!("node {label} has no scale"))?;
    let scale = onnx::tensor_f32(scale).with_context(|| format!("node {label}"))?;
    let zero = match constant(2)? {
        Some(z) => onnx::tensor_ints(z).with_context(|| format!("node {label}"))?,
        None => vec![0; scale.len()],
    };
    ensure!(
        zero.len() == scale.len() && !scale.is_empty(),
        "node {label}: {} scales but {} zero points",
        scale.len(),
        zero.len()
    );
    Ok((scale, zero))
}

/// The element type a QuantizeLinear writes: its zero point's, else `output_dtype`, else uint8.
pub(super) fn quantized_type(index: &GraphIndex, q: &NodeProto) -> Result<DataType> {
    let code = match input(q, 2).and_then(|z| index.constant(z)) {
        Some(z) => z.tensor().data_type(),
        None => match onnx::attr_i(q, "output_dtype", 0) {
            0 => DataType::Uint8 as i32,
            t => t as i32,
        },
    };
    DataType::try_from(code).with_context(|| format!("unknown element type {code}"))
}

/// The saturation bounds of an integer element type.
fn type_range(t: DataType) -> Result<(i64, i64)> {
    Ok(match t {
        DataType::Int8 => (-128, 127),
        DataType::Uint8 => (0, 255),
        DataType::Int16 => (-32768, 32767),
        DataType::Uint16 => (0, 65535),
        DataType::Int4 => (-8, 7),
        DataType::Uint4 => (0, 15),
        t => bail!("quantization to {} is not supported", t.as_str_name()),
    })
}

/// The float tensor `y` a DequantizeLinear of the integer constant `t` yields.
fn dequantize_constant(
    t: &TensorProto,
    node: &NodeProto,
    y: &str,
    scale: &[f32],
    zero: &[i64],
) -> Result<TensorProto> {
    let q = onnx::tensor_ints(t)?;
    let dims = onnx::tensor_dims(t)?;
    let values: Vec<f32> = if scale.len() == 1 {
        q.iter().map(|&v| (v - zero[0]) as f32 * scale[0]).collect()
    } else {
        let rank = dims.len() as i64;
        let axis = onnx::attr_i(node, "axis", 1);
        let axis = if axis < 0 { axis + rank } else { axis };
        ensure!(
            (0..rank).contains(&axis) && dims[axis as usize] == scale.len(),
            "{} scales do not match axis {axis} of '{}' {:?}",
            scale.len(),
            t.name(),
            dims
        );
        let inner: usize = dims[axis as usize + 1..].iter().product();
        q.iter()
            .enumerate()
            .map(|(k, &v)| {
                let c = (k / inner) % scale.len();
                (v - zero[c]) as f32 * scale[c]
            })
            .collect()
    };
    Ok(onnx::make_tensor(y, &dims, TensorData::F32(values)))
}
