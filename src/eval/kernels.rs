//! The arithmetic of ONNX Runtime's fused uint8 x int8 kernels on x86-64 without VNNI (AVX2, AVX-512
//! without VNNI), written as float operators, for `lapq eval --arithmetic x86-avx2`.
//!
//! There MLAS multiplies activation codes (uint8, with their zero point) by weight codes (int8) with
//! `vpmaddubsw`, which adds the products of K indices 2j and 2j+1 into a 16-bit sum that saturates
//! at [-32768, 32767], and only then sums the pairs in 32 bits. K runs along a Gemm's or MatMul's
//! inner dimension, and along a Conv's im2col rows: kernel taps in row-major order, each with its
//! group's input channels fastest, padding read as the activation's zero point. (Observed bit for bit
//! on ONNX Runtime 1.31 under qemu's Haswell: odd channel counts, strides, padding, groups.)
//! Depthwise convolutions have a kernel that multiplies to 32 bits and are exact.
//!
//! Every node `fusion` sends to such a kernel with weights that can saturate gets its float output
//! corrected by what the saturation loses: `y += alpha s_x s_w[n] sum_j (clip(p_j) - p_j)`, with
//! `p_j` the pair sums of raw codes. The rest of the model keeps its Q/DQ semantics, which the other
//! fused kernels follow up to the rounding of the last code.

use anyhow::{Context, Result, bail, ensure};

use super::dequant::{params, quantized_type};
use crate::ir::GraphIndex;
use crate::onnx::{self, DataType, ModelProto, NodeProto, TensorData, TensorProto};

/// Rewrites `deq`, the float model `dequantized` made of `quant`, so that every node ONNX Runtime
/// runs in a saturating pair kernel computes what that kernel computes. Returns those nodes' labels.
pub fn saturate_pairs(quant: &ModelProto, deq: &mut ModelProto) -> Result<Vec<String>> {
    let index = GraphIndex::new(quant)?;
    let nodes = crate::fusion::saturating_nodes(&index);
    let graph = deq.graph.as_mut().context("the model has no graph")?;
    let mut emit = Emit {
        names: onnx::Names::of(graph),
        nodes: vec![],
        inits: vec![],
    };
    let mut labels = vec![];
    for node in nodes {
        let label = onnx::node_label(node);
        let layer = Layer::of(&index, node).with_context(|| format!("node {label}"))?;
        let widest = layer.widest();
        if widest == 0 {
            continue;
        }
        let y = node.output[0].clone();
        let at = graph
            .node
            .iter()
            .position(|n| n.output.first() == Some(&y))
            .with_context(|| format!("internal: node {label} is not in the dequantized model"))?;
        let exact = emit.names.fresh(&format!("{y}_unsaturated"));
        graph.node[at].output[0] = exact.clone();
        emit.nodes.clear();
        layer
            .emit(&mut emit, &node.input[0], &exact, &y, widest)
            .with_context(|| format!("node {label}"))?;
        let added = std::mem::take(&mut emit.nodes);
        graph.node.splice(at + 1..at + 1, added);
        labels.push(label);
    }
    graph.initializer.append(&mut emit.inits);
    Ok(labels)
}

/// What a saturating node computes, in the terms the emulation needs.
struct Layer {
    /// Added to `x / scale` to give the kernel's uint8 code (the zero point, plus 128 for int8
    /// activations, which ONNX Runtime shifts to uint8).
    offset: f32,
    x_scale: f32,
    shape: Shape,
    /// Per group, the weight codes as a K x N matrix, row-major (K in the kernel's order).
    weights: Vec<Vec<f32>>,
    k: usize,
    n: usize,
    /// Per output column (all groups), `alpha s_x s_w`.
    out_scale: Vec<f32>,
}

enum Shape {
    /// A Gemm or MatMul: K is the activation's last axis.
    Dense,
    /// A Conv over `kernel.len()` spatial axes, `channels` input channels per group.
    Conv {
        kernel: Vec<usize>,
        strides: Vec<i64>,
        dilations: Vec<i64>,
        pads: Vec<i64>,
        channels: usize,
    },
}

/// The input codes `group` (`[n, c, spatial...]`) seen by kernel tap `t` at every output position,
/// channels last: one column block of the im2col matrix.
fn tap_column(
    e: &mut Emit,
    group: &str,
    t: usize,
    kernel: &[usize],
    dilations: &[i64],
    strides: &[i64],
    to_last: &[i64],
) -> String {
    let rank = kernel.len();
    // Tap t's position along each spatial axis, the last axis fastest.
    let mut rest = t;
    let mut at = vec![0usize; rank];
    for d in (0..rank).rev() {
        at[d] = rest % kernel[d];
        rest /= kernel[d];
    }
    let starts: Vec<i64> = (0..rank).map(|d| at[d] as i64 * dilations[d]).collect();
    let ends: Vec<i64> = (0..rank)
        .map(|d| match dilations[d] * (kernel[d] - 1 - at[d]) as i64 {
            0 => i64::MAX,
            room => -room,
        })
        .collect();
    let axes: Vec<i64> = (2..2 + rank as i64).collect();
    let inputs = [
        e.i64s("starts", &[rank], starts),
        e.i64s("ends", &[rank], ends),
        e.i64s("axes", &[rank], axes),
        e.i64s("steps", &[rank], strides.to_vec()),
    ];
    let sliced = e.op(
        "Slice",
        &[group, &inputs[0], &inputs[1], &inputs[2], &inputs[3]],
        vec![],
    );
    e.op("Transpose", &[&sliced], vec![ints("perm", to_last)])
}

/// A layer's weight codes (shape `dims`) and the scales that turn its integer sums into output.
struct Codes<'a> {
    dims: &'a [usize],
    codes: &'a [i64],
    /// The activation's zero point (plus 128 for int8 activations, as x86 kernels shift them).
    offset: f32,
    x_scale: f32,
    out_scale: Vec<f32>,
}

impl Codes<'_> {
    /// The layer of these codes' scales, with its weight matrices (`k x n` each).
    fn layer(self, shape: Shape, weights: Vec<Vec<f32>>, k: usize, n: usize) -> Layer {
        Layer {
            offset: self.offset,
            x_scale: self.x_scale,
            shape,
            weights,
            k,
            n,
            out_scale: self.out_scale,
        }
    }
}

impl Layer {
    fn of(index: &GraphIndex, node: &NodeProto) -> Result<Layer> {
        let op = node.op_type();
        let dq_of = |k: usize| -> Result<&NodeProto> {
            let name = node.input.get(k).context("missing input")?;
            index
                .producer(name)
                .map(|p| index.node(p))
                .filter(|p| p.op_type() == "DequantizeLinear")
                .with_context(|| format!("input '{name}' does not come from a DequantizeLinear"))
        };
        let (x_dq, w_dq) = (dq_of(0)?, dq_of(1)?);
        let (x_scale, x_zero) = params(index, x_dq)?;
        let shift = if quantized_type(index, x_dq)? == DataType::Int8 {
            128
        } else {
            0
        };
        let w = index
            .constant(&w_dq.input[0])
            .context("the weight is not a constant")?
            .tensor();
        let dims = onnx::tensor_dims(w)?;
        let codes = onnx::tensor_ints(w)?;
        let (w_scale, _) = params(index, w_dq)?;
        let axis = onnx::attr_i(w_dq, "axis", 1);
        let trans_b = op == "Gemm" && onnx::attr_i(node, "transB", 0) != 0;
        ensure!(
            op != "Gemm" || onnx::attr_i(node, "transA", 0) == 0,
            "Gemm with transA is not emulated"
        );
        let alpha = if op == "Gemm" {
            onnx::attr_f(node, "alpha", 1.0)
        } else {
            1.0
        };
        // The axis of `dims` that runs over output columns.
        let out_axis = match op {
            "Conv" => 0,
            _ if trans_b => 0,
            _ => 1,
        };
        ensure!(
            op == "Conv" || dims.len() == 2,
            "weight of shape {dims:?}: only 2-D weights are emulated"
        );
        let columns = dims[out_axis];
        let scale_of = |c: usize| -> f32 {
            let rank = dims.len() as i64;
            let a = if axis < 0 { axis + rank } else { axis };
            let s = if w_scale.len() == 1 || a as usize != out_axis {
                w_scale[0]
            } else {
                w_scale[c]
            };
            alpha * x_scale[0] * s
        };
        ensure!(
            w_scale.len() == 1 || w_scale.len() == columns,
            "{} weight scales for {columns} output columns",
            w_scale.len()
        );
        let out_scale: Vec<f32> = (0..columns).map(scale_of).collect();
        let offset = (x_zero[0] + shift) as f32;
        let codes = Codes {
            dims: &dims,
            codes: &codes,
            offset,
            x_scale: x_scale[0],
            out_scale,
        };
        if op == "Conv" {
            Layer::conv(node, codes)
        } else {
            Ok(Layer::dense(codes, trans_b))
        }
    }

    /// A Gemm's or MatMul's layer: the weight codes as one `k x n` matrix.
    fn dense(c: Codes, trans_b: bool) -> Layer {
        let (dims, codes) = (c.dims, c.codes);
        let (k, n) = if trans_b {
            (dims[1], dims[0])
        } else {
            (dims[0], dims[1])
        };
        let matrix = (0..k * n)
            .map(|i| {
                let (r, c) = (i / n, i % n);
                codes[if trans_b { c * k + r } else { i }] as f32
            })
            .collect();
        c.layer(Shape::Dense, vec![matrix], k, n)
    }

    /// A Conv's layer: one `k x n` matrix per group, rows in (tap, input channel) order.
    fn conv(node: &NodeProto, c: Codes) -> Result<Layer> {
        let (dims, codes) = (c.dims, c.codes);
        ensure!(dims.len() >= 3, "Conv weight of shape {dims:?}");
        if let Some(pad) = onnx::attr_s(node, "auto_pad")
            && !matches!(pad, b"NOTSET" | b"VALID" | b"")
        {
            bail!(
                "auto_pad {} is not emulated (write explicit pads)",
                String::from_utf8_lossy(pad)
            );
        }
        let (oc, cg, kernel) = (dims[0], dims[1], dims[2..].to_vec());
        let rank = kernel.len();
        let groups = onnx::attr_i(node, "group", 1).max(1) as usize;
        ensure!(oc % groups == 0, "{oc} output channels in {groups} groups");
        let per = |name: &str, default: i64, len: usize| -> Result<Vec<i64>> {
            let v = onnx::attr_ints(node, name).map_or(vec![default; len], <[i64]>::to_vec);
            ensure!(v.len() == len, "{name} {v:?} for a {rank}-D kernel");
            Ok(v)
        };
        let taps: usize = kernel.iter().product();
        let (k, n) = (taps * cg, oc / groups);
        let weights = (0..groups)
            .map(|g| {
                let mut m = vec![0f32; k * n];
                for o in 0..n {
                    for c in 0..cg {
                        for t in 0..taps {
                            let code = codes[((g * n + o) * cg + c) * taps + t];
                            m[(t * cg + c) * n + o] = code as f32;
                        }
                    }
                }
                m
            })
            .collect();
        let shape = Shape::Conv {
            strides: per("strides", 1, rank)?,
            dilations: per("dilations", 1, rank)?,
            pads: per("pads", 0, 2 * rank)?,
            kernel,
            channels: cg,
        };
        Ok(c.layer(shape, weights, k, n))
    }

    /// Nodes computing `y` from the layer's float input `x` and its exact float output `exact`.
    fn emit(&self, e: &mut Emit, x: &str, exact: &str, y: &str, widest: usize) -> Result<()> {
        let scale = e.f32s("x_scale", &[], vec![self.x_scale]);
        let offset = e.f32s("x_offset", &[], vec![self.offset]);
        let divided = e.op("Div", &[x, &scale], vec![]);
        let rounded = e.op("Round", &[&divided], vec![]);
        let codes = e.op("Add", &[&rounded, &offset], vec![]);
        let Shape::Conv {
            kernel,
            strides,
            dilations,
            pads,
            channels,
        } = &self.shape
        else {
            let lost = self.lost(e, &codes, 0, widest, &self.out_scale);
            let shape = e.op("Shape", &[exact], vec![]);
            let lost = e.op("Reshape", &[&lost, &shape], vec![]);
            e.op_into("Add", &[exact, &lost], y, vec![]);
            return Ok(());
        };
        let rank = kernel.len();
        let padded = if pads.iter().any(|&p| p != 0) {
            let mut all = vec![0i64; 2 * (rank + 2)];
            all[2..2 + rank].copy_from_slice(&pads[..rank]);
            all[rank + 4..].copy_from_slice(&pads[rank..]);
            let pads = e.i64s("pads", &[all.len()], all);
            e.op("Pad", &[&codes, &pads, &offset], vec![])
        } else {
            codes
        };
        let to_last: Vec<i64> = std::iter::once(0)
            .chain(2..2 + rank as i64)
            .chain(std::iter::once(1))
            .collect();
        let to_first: Vec<i64> = std::iter::once(0)
            .chain(std::iter::once(rank as i64 + 1))
            .chain(1..=rank as i64)
            .collect();
        let taps: usize = kernel.iter().product();
        let mut parts = vec![];
        for g in 0..self.weights.len() {
            let group = if self.weights.len() > 1 {
                let (starts, ends, axes) = (
                    e.i64s("starts", &[1], vec![(g * channels) as i64]),
                    e.i64s("ends", &[1], vec![((g + 1) * channels) as i64]),
                    e.i64s("axes", &[1], vec![1]),
                );
                e.op("Slice", &[&padded, &starts, &ends, &axes], vec![])
            } else {
                padded.clone()
            };
            let columns: Vec<String> = (0..taps)
                .map(|t| tap_column(e, &group, t, kernel, dilations, strides, &to_last))
                .collect();
            let refs: Vec<&str> = columns.iter().map(String::as_str).collect();
            let im2col = if refs.len() > 1 {
                e.op("Concat", &refs, vec![onnx::make_attr_i("axis", -1)])
            } else {
                columns[0].clone()
            };
            let scales = &self.out_scale[g * self.n..(g + 1) * self.n];
            parts.push(self.lost(e, &im2col, g, widest, scales));
        }
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        let lost = if refs.len() > 1 {
            e.op("Concat", &refs, vec![onnx::make_attr_i("axis", 1)])
        } else {
            parts[0].clone()
        };
        let last = e.op("Transpose", &[exact], vec![ints("perm", &to_last)]);
        let shape = e.op("Shape", &[&last], vec![]);
        let lost = e.op("Reshape", &[&lost, &shape], vec![]);
        let sum = e.op("Add", &[&last, &lost], vec![]);
        e.op_into("Transpose", &[&sum], y, vec![ints("perm", &to_first)]);
        Ok(())
    }

    /// The pairs of output column `n` of group `g` that can saturate, as (2j, w_2j, w_2j+1): those
    /// whose weights could reach 2^15 with activation codes up to 255. Weights of opposite signs
    /// cannot (the sum stays within 255 x 128).
    fn saturable(&self, g: usize, n: usize) -> Vec<(usize, f32, f32)> {
        let (w, k, columns) = (&self.weights[g], self.k, self.n);
        (0..k)
            .step_by(2)
            .filter_map(|j| {
                let even = w[j * columns + n];
                let odd = if j + 1 < k {
                    w[(j + 1) * columns + n]
                } else {
                    0.0
                };
                let same_sign = even * odd >= 0.0;
                (same_sign && 255.0 * (even.abs() + odd.abs()) > 32767.0).then_some((j, even, odd))
            })
            .collect()
    }

    /// The most saturable pairs of any output column (0: the layer cannot saturate).
    fn widest(&self) -> usize {
        (0..self.weights.len())
            .flat_map(|g| (0..self.n).map(move |n| (g, n)))
            .map(|(g, n)| self.saturable(g, n).len())
            .max()
            .unwrap_or(0)
    }

    /// `scale[n] sum_j (clip(p_j) - p_j)` over group `g`'s saturable pairs, as an M x N tensor, for
    /// `codes` of shape (..., K) (M rows once flattened). Each column gets `widest` pair slots; the
    /// slots it does not need have zero weights.
    fn lost(&self, e: &mut Emit, codes: &str, g: usize, widest: usize, scale: &[f32]) -> String {
        let (k, n) = (self.k, self.n);
        let slots = n * widest;
        let (mut even, mut odd) = (vec![0i64; slots], vec![0i64; slots]);
        let (mut w_even, mut w_odd) = (vec![0f32; slots], vec![0f32; slots]);
        for c in 0..n {
            for (l, (j, a, b)) in self.saturable(g, c).into_iter().enumerate() {
                let at = c * widest + l;
                even[at] = j as i64;
                // A lone last index pairs with nothing: its partner's weight is 0.
                odd[at] = if j + 1 < k { j as i64 + 1 } else { j as i64 };
                (w_even[at], w_odd[at]) = (a, b);
            }
        }
        // K x M, so that each pair slot gathers a whole row.
        let flat = e.i64s("shape", &[2], vec![-1, k as i64]);
        let rows = e.op("Reshape", &[codes, &flat], vec![]);
        let columns = e.op("Transpose", &[&rows], vec![ints("perm", &[1, 0])]);
        let mut products = vec![];
        for (index, weights) in [(even, w_even), (odd, w_odd)] {
            let index = e.i64s("index", &[slots], index);
            let picked = e.op("Gather", &[&columns, &index], vec![]);
            let weights = e.f32s("pair_weights", &[slots, 1], weights);
            products.push(e.op("Mul", &[&picked, &weights], vec![]));
        }
        let sums = e.op("Add", &[&products[0], &products[1]], vec![]);
        let low = e.f32s("i16_min", &[], vec![-32768.0]);
        let high = e.f32s("i16_max", &[], vec![32767.0]);
        let clipped = e.op("Max", &[&sums, &low], vec![]);
        let clipped = e.op("Min", &[&clipped, &high], vec![]);
        let lost = e.op("Sub", &[&clipped, &sums], vec![]);
        let per_column = e.i64s("shape", &[3], vec![n as i64, widest as i64, -1]);
        let lost = e.op("Reshape", &[&lost, &per_column], vec![]);
        let ones = e.f32s("ones", &[1, widest], vec![1.0; widest]);
        let total = e.op("MatMul", &[&ones, &lost], vec![]);
        let shape = e.i64s("shape", &[2], vec![n as i64, -1]);
        let total = e.op("Reshape", &[&total, &shape], vec![]);
        let total = e.op("Transpose", &[&total], vec![ints("perm", &[1, 0])]);
        let scale = e.f32s("out_scale", &[n], scale.to_vec());
        e.op("Mul", &[&total, &scale], vec![])
    }
}

fn ints(name: &str, values: &[i64]) -> onnx::AttributeProto {
    onnx::AttributeProto {
        name: Some(name.into()),
        ints: values.to_vec(),
        r#type: Some(onnx::proto::attribute_proto::AttributeType::Ints as i32),
        ..Default::default()
    }
}

/// Nodes and constants being added to a graph, with fresh names.
struct Emit {
    names: onnx::Names,
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
}

impl Emit {
    fn f32s(&mut self, base: &str, dims: &[usize], values: Vec<f32>) -> String {
        let name = self.names.fresh(&format!("pairs/{base}"));
        self.inits
            .push(onnx::make_tensor(&name, dims, TensorData::F32(values)));
        name
    }

    fn i64s(&mut self, base: &str, dims: &[usize], values: Vec<i64>) -> String {
        let name = self.names.fresh(&format!("pairs/{base}"));
        self.inits
            .push(onnx::make_tensor(&name, dims, TensorData::I64(values)));
        name
    }

    fn op(&mut self, op: &str, inputs: &[&str], attribute: Vec<onnx::AttributeProto>) -> String {
        let out = self.names.fresh(&format!("pairs/{op}"));
        self.op_into(op, inputs, &out, attribute);
        out
    }

    fn op_into(
        &mut self,
        op: &str,
        inputs: &[&str],
        out: &str,
        attribute: Vec<onnx::AttributeProto>,
    ) {
        let name = self.names.fresh(&format!("{out}/{op}"));
        self.nodes.push(NodeProto {
            name: Some(name),
            op_type: Some(op.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.to_string()],
            attribute,
            ..Default::default()
        });
    }
}
