//! Rewrites of the float model that keep what it computes (up to float rounding) and let more of it be
//! quantized, applied to the model read from disk before it is indexed. The input file is never
//! touched; every later stage (plan, oracle, export) sees the rewritten model.
//!
//! - A BatchNormalization in inference mode right after a Conv is folded into the Conv's weight and
//!   bias, as exporters with BatchNorm folding and ONNX Runtime's `quant_pre_process` do: ONNX Runtime
//!   has no integer BatchNormalization, and a Conv followed by a float BatchNormalization cannot fuse.
//! - With calibration ranges (`smooth`): a normalisation output's outlier channels move into the
//!   MatMul weights that read it (SmoothQuant).
//! - A node whose name is already taken (by an initializer, a graph input or an earlier node) gets
//!   the first free name `{name}_{n}`: tract names its nodes and constants alike and refuses
//!   duplicates, and every later stage finds nodes by name.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{Context, Result};

use crate::config::QuantConfig;
use crate::ir::{GraphIndex, QuantPlan};
use crate::onnx::{self, DataType, ModelProto, NodeProto, TensorData, TensorProto};

/// A node the rewrites removed, and into which node it went.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Merged {
    pub node: String,
    pub op_type: String,
    pub into: String,
}

/// Applies every rewrite to `model` and returns what was merged away, in graph order.
pub fn prepare(model: &mut ModelProto) -> Result<Vec<Merged>> {
    let Some(graph) = model.graph.as_mut() else {
        return Ok(vec![]);
    };
    unique_node_names(graph);
    let mut merged = vec![];
    let mut i = 0;
    while i < graph.node.len() {
        match fold_batch_norm(graph, i)? {
            Some(m) => merged.push(m),
            None => i += 1,
        }
    }
    Ok(merged)
}

/// Renames every node whose name an initializer, a graph input or an earlier node already has.
fn unique_node_names(graph: &mut onnx::GraphProto) {
    let mut taken: HashSet<String> = graph
        .initializer
        .iter()
        .map(|t| t.name().to_string())
        .chain(graph.input.iter().map(|i| i.name().to_string()))
        .collect();
    let all: HashSet<String> = graph.node.iter().map(|n| n.name().to_string()).collect();
    for node in &mut graph.node {
        let name = node.name().to_string();
        if name.is_empty() {
            continue;
        }
        if taken.contains(&name) {
            let free = (1..)
                .map(|n| format!("{name}_{n}"))
                .find(|c| !taken.contains(c) && !all.contains(c))
                .unwrap_or_default();
            node.name = Some(free.clone());
            taken.insert(free);
        } else {
            taken.insert(name);
        }
    }
}

/// Folds the BatchNormalization at `bn` into the Conv that produces its input, when that is exact:
/// inference mode, constant float parameters, a Conv with constant float weights (and bias) whose
/// output nothing else reads. The Conv takes the BatchNormalization's output name; weights shared with
/// other nodes are copied rather than changed.
fn fold_batch_norm(graph: &mut onnx::GraphProto, bn: usize) -> Result<Option<Merged>> {
    let node = &graph.node[bn];
    if node.op_type() != "BatchNormalization"
        || !matches!(node.domain(), "" | "ai.onnx")
        || node.output.iter().filter(|o| !o.is_empty()).count() != 1
        || onnx::attr_i(node, "training_mode", 0) != 0
        || node.input.len() != 5
    {
        return Ok(None);
    }
    let x = node.input[0].clone();
    let Some(conv) = graph.node.iter().position(|n| n.output.first() == Some(&x)) else {
        return Ok(None);
    };
    let c = &graph.node[conv];
    let readers = graph.node.iter().filter(|n| n.input.contains(&x)).count()
        + graph.output.iter().filter(|o| o.name() == x).count();
    if c.op_type() != "Conv" || !matches!(c.domain(), "" | "ai.onnx") || readers != 1 {
        return Ok(None);
    }
    let constants = Constants::of(graph);
    let float = |name: &str| -> Result<Option<(Vec<f32>, Vec<usize>)>> {
        match constants.get(name) {
            Some(t) if t.data_type() == DataType::Float as i32 => {
                Ok(Some((onnx::tensor_f32(t)?, onnx::tensor_dims(t)?)))
            }
            _ => Ok(None),
        }
    };
    let label = onnx::node_label(node);
    let params: Option<Vec<Vec<f32>>> = node.input[1..5]
        .iter()
        .map(|n| float(n).map(|t| t.map(|(v, _)| v)))
        .collect::<Result<_>>()
        .with_context(|| format!("BatchNormalization '{label}'"))?;
    let Some(params) = params else {
        return Ok(None);
    };
    let (scale, beta, mean, var) = (&params[0], &params[1], &params[2], &params[3]);
    let Some((weight, wdims)) = float(&c.input[1])? else {
        return Ok(None);
    };
    let channels = wdims.first().copied().unwrap_or(0);
    let bias_name = c.input.get(2).filter(|b| !b.is_empty()).cloned();
    let bias = match &bias_name {
        Some(b) => match float(b)? {
            Some((v, _)) => v,
            None => return Ok(None),
        },
        None => vec![0.0; channels],
    };
    if channels == 0
        || [scale, beta, mean, var, &bias]
            .iter()
            .any(|v| v.len() != channels)
    {
        return Ok(None);
    }
    let epsilon = onnx::attr_f(node, "epsilon", 1e-5) as f64;
    let (new_weight, new_bias) = folded(&weight, &bias, &params, epsilon);

    let conv_label = onnx::node_label(&graph.node[conv]);
    let out = node.output[0].clone();
    let bn_inputs = node.input[1..5].to_vec();
    let weight_name = graph.node[conv].input[1].clone();
    let mut names = onnx::Names::of(graph);
    let weight_name = store(
        graph,
        &weight_name,
        make(&weight_name, &wdims, new_weight),
        &mut names,
    );
    let bias_base = bias_name.unwrap_or_else(|| format!("{weight_name}_bias"));
    let bias_name = store(
        graph,
        &bias_base,
        make(&bias_base, &[channels], new_bias),
        &mut names,
    );
    let c = &mut graph.node[conv];
    c.input.truncate(1);
    c.input.push(weight_name);
    c.input.push(bias_name);
    c.output[0] = out;
    let removed = graph.node.remove(bn);
    graph.value_info.retain(|v| v.name() != x);
    for name in bn_inputs {
        remove_if_unused(graph, &name);
    }
    Ok(Some(Merged {
        node: label,
        op_type: removed.op_type().to_string(),
        into: conv_label,
    }))
}

/// A Conv's weight and bias (one value per output channel) with a BatchNormalization of parameters
/// `bn` (scale, beta, mean, variance per channel) and `epsilon` folded in.
fn folded(weight: &[f32], bias: &[f32], bn: &[Vec<f32>], epsilon: f64) -> (Vec<f32>, Vec<f32>) {
    let (scale, beta, mean, var) = (&bn[0], &bn[1], &bn[2], &bn[3]);
    let channels = bias.len();
    let factor: Vec<f64> = (0..channels)
        .map(|k| scale[k] as f64 / (var[k] as f64 + epsilon).sqrt())
        .collect();
    let per_channel = weight.len() / channels;
    let new_weight = weight
        .iter()
        .enumerate()
        .map(|(i, &w)| (w as f64 * factor[i / per_channel]) as f32)
        .collect();
    let new_bias = (0..channels)
        .map(|k| ((bias[k] as f64 - mean[k] as f64) * factor[k] + beta[k] as f64) as f32)
        .collect();
    (new_weight, new_bias)
}

/// A per-channel affine output that MatMuls read, whose channels can move into their weights
/// (SmoothQuant, `calib::smooth`): a `LayerNormalization` over the last axis, `Add(Mul(x, g), b)`
/// with constant vectors `g` and `b` (a decomposed one), or `Mul(x, g)` alone (RMSNorm's end).
#[derive(Clone, Debug, PartialEq)]
pub struct Smoothable {
    /// The affine output.
    pub tensor: String,
    pub channels: usize,
    /// Per channel, the largest |weight| of its row over the MatMuls whose weight absorbs the factor.
    pub weight_absmax: Vec<f32>,
}

/// Where a smoothable output comes from and who reads it.
struct Affine {
    /// Node of the per-channel scale (LayerNormalization or the Mul) and that input's index.
    scale: (usize, usize),
    /// Node of the per-channel shift and that input's index, when there is one.
    shift: Option<(usize, usize)>,
    /// The node writing the output (LayerNormalization or the Add).
    producer: usize,
    /// MatMuls whose constant 2-D weight (read by nothing else) absorbs the factors.
    matmuls: Vec<usize>,
    /// Every other reader: it gets the output back through a float Mul by the factors.
    others: Vec<usize>,
}

/// The constant float vector `name`, if it is one.
fn vector(index: &GraphIndex, name: &str) -> Result<Option<Vec<f32>>> {
    match index.constant(name).map(|c| c.tensor()) {
        Some(t) if t.data_type() == DataType::Float as i32 && onnx::tensor_dims(t)?.len() == 1 => {
            Ok(Some(onnx::tensor_f32(t)?))
        }
        _ => Ok(None),
    }
}

/// The input of `node` (0 or 1) that is a constant, if one is.
fn constant_input(index: &GraphIndex, node: &NodeProto) -> Option<usize> {
    (0..2).find(|&k| {
        node.input
            .get(k)
            .is_some_and(|c| index.constant(c).is_some())
    })
}

/// The affine structure behind `tensor`, when it can be smoothed, and its channel count.
fn affine(index: &GraphIndex, tensor: &str) -> Result<Option<(Affine, usize)>> {
    let Some(producer) = index.producer(tensor) else {
        return Ok(None);
    };
    let p = index.node(producer);
    if index.is_graph_output(tensor)
        || !matches!(p.domain(), "" | "ai.onnx")
        || p.output.first().map(String::as_str) != Some(tensor)
    {
        return Ok(None);
    }
    let (scale, shift, channels) = match p.op_type() {
        "LayerNormalization" => {
            let extra_outputs = p.output.iter().skip(1).any(|o| !o.is_empty());
            let Some(g) = p
                .input
                .get(1)
                .map(|g| vector(index, g))
                .transpose()?
                .flatten()
            else {
                return Ok(None);
            };
            let shift = match p.input.get(2).filter(|b| !b.is_empty()) {
                Some(b) => match vector(index, b)? {
                    Some(v) if v.len() == g.len() => Some((producer, 2)),
                    _ => return Ok(None),
                },
                None => None,
            };
            if extra_outputs || onnx::attr_i(p, "axis", -1) != -1 {
                return Ok(None);
            }
            ((producer, 1), shift, g.len())
        }
        "Add" => {
            let Some(k) = constant_input(index, p) else {
                return Ok(None);
            };
            let Some(b) = vector(index, &p.input[k])? else {
                return Ok(None);
            };
            let m = &p.input[1 - k];
            let Some(mul) = index.producer(m) else {
                return Ok(None);
            };
            let mn = index.node(mul);
            if mn.op_type() != "Mul" || index.consumers(m).len() != 1 || index.is_graph_output(m) {
                return Ok(None);
            }
            let Some(j) = constant_input(index, mn) else {
                return Ok(None);
            };
            match vector(index, &mn.input[j])? {
                Some(g) if g.len() == b.len() => ((mul, j), Some((producer, k)), g.len()),
                _ => return Ok(None),
            }
        }
        "Mul" => {
            let Some(j) = constant_input(index, p) else {
                return Ok(None);
            };
            match vector(index, &p.input[j])? {
                Some(g) => ((producer, j), None, g.len()),
                None => return Ok(None),
            }
        }
        _ => return Ok(None),
    };
    let mut matmuls = vec![];
    let mut others = vec![];
    for &r in index.consumers(tensor) {
        if absorbs(index, index.node(r), tensor, channels) {
            matmuls.push(r);
        } else {
            others.push(r);
        }
    }
    if matmuls.is_empty() || channels == 0 {
        return Ok(None);
    }
    Ok(Some((
        Affine {
            scale,
            shift,
            producer,
            matmuls,
            others,
        },
        channels,
    )))
}

/// Whether `n` can absorb `tensor`'s channel scales: a MatMul reading it first, with a float
/// constant `channels x N` weight that nothing else reads.
fn absorbs(index: &GraphIndex, n: &NodeProto, tensor: &str, channels: usize) -> bool {
    n.op_type() == "MatMul"
        && matches!(n.domain(), "" | "ai.onnx")
        && n.input.first().map(String::as_str) == Some(tensor)
        && n.input.get(1).is_some_and(|w| {
            w != tensor
                && index.consumers(w).len() == 1
                && index.constant(w).is_some_and(|c| {
                    let t = c.tensor();
                    t.data_type() == DataType::Float as i32
                        && onnx::tensor_dims(t).is_ok_and(|d| d.len() == 2 && d[0] == channels)
                })
        })
}

/// Every output of the graph that `smooth` can rescale, in graph order.
pub fn smoothable(model: &ModelProto) -> Result<Vec<Smoothable>> {
    let index = GraphIndex::new(model)?;
    let mut out = vec![];
    for n in &index.graph.node {
        let Some(tensor) = n
            .output
            .first()
            .filter(|_| matches!(n.op_type(), "LayerNormalization" | "Add" | "Mul"))
        else {
            continue;
        };
        let Some((a, channels)) = affine(&index, tensor)? else {
            continue;
        };
        let mut weight_absmax = vec![0f32; channels];
        for &m in &a.matmuls {
            let w = index
                .constant(&index.node(m).input[1])
                .context("MatMul weight is a constant")?;
            let values = onnx::tensor_f32(w.tensor())?;
            for (j, row) in values.chunks((values.len() / channels).max(1)).enumerate() {
                let m = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                weight_absmax[j] = weight_absmax[j].max(m);
            }
        }
        out.push(Smoothable {
            tensor: tensor.clone(),
            channels,
            weight_absmax,
        });
    }
    Ok(out)
}

/// Divides channel `j` of `tensor` (a `Smoothable`) by `factors[j]`: its affine scale and shift
/// are divided, the rows of the MatMul weights that read it multiplied, and every other reader
/// reads it back through a float `Mul` by the factors, inserted after its producer. The model
/// computes what it did, up to float rounding.
pub fn smooth(model: &mut ModelProto, tensor: &str, factors: &[f32]) -> Result<()> {
    let (a, channels) = affine(&GraphIndex::new(model)?, tensor)?
        .with_context(|| format!("tensor '{tensor}' cannot be smoothed"))?;
    let graph = model.graph.as_mut().context("model has no graph")?;
    anyhow::ensure!(
        factors.len() == channels,
        "{} factors for {channels} channels",
        factors.len()
    );
    let mut names = onnx::Names::of(graph);
    let rescale = |graph: &mut onnx::GraphProto,
                   names: &mut onnx::Names,
                   (node, k): (usize, usize),
                   op: &dyn Fn(f32, f32) -> f32|
     -> Result<()> {
        let name = graph.node[node].input[k].clone();
        let t = Constants::of(graph).get(&name).context("constant")?.clone();
        let (dims, values) = (onnx::tensor_dims(&t)?, onnx::tensor_f32(&t)?);
        let per_row = values.len() / channels;
        let scaled = values
            .iter()
            .enumerate()
            .map(|(i, &v)| op(v, factors[i / per_row.max(1)]))
            .collect();
        let stored = store(graph, &name, make(&name, &dims, scaled), names);
        graph.node[node].input[k] = stored;
        Ok(())
    };
    rescale(graph, &mut names, a.scale, &|v, s| v / s)?;
    if let Some(shift) = a.shift {
        rescale(graph, &mut names, shift, &|v, s| v / s)?;
    }
    for &m in &a.matmuls {
        rescale(graph, &mut names, (m, 1), &|v, s| v * s)?;
    }
    if !a.others.is_empty() {
        let factor_name = names.fresh(&format!("{tensor}_smoothing"));
        graph
            .initializer
            .push(make(&factor_name, &[channels], factors.to_vec()));
        let restored = names.fresh(&format!("{tensor}_unsmoothed"));
        for &r in &a.others {
            for i in graph.node[r].input.iter_mut().filter(|i| *i == tensor) {
                *i = restored.clone();
            }
        }
        let label = onnx::node_label(&graph.node[a.producer]);
        let mul = NodeProto {
            op_type: Some("Mul".into()),
            name: Some(names.fresh(&format!("{label}/unsmooth"))),
            input: vec![tensor.to_string(), factor_name],
            output: vec![restored],
            ..Default::default()
        };
        graph.node.insert(a.producer + 1, mul);
    }
    Ok(())
}

fn make(name: &str, dims: &[usize], values: Vec<f32>) -> TensorProto {
    onnx::make_tensor(name, dims, TensorData::F32(values))
}

/// Removes the initializer or `Constant` node `name` when nothing reads it any more.
fn remove_if_unused(graph: &mut onnx::GraphProto, name: &str) {
    let read = graph.node.iter().any(|n| n.input.iter().any(|i| i == name))
        || graph.output.iter().any(|o| o.name() == name);
    if read {
        return;
    }
    graph.initializer.retain(|t| t.name() != name);
    graph.node.retain(|n| !is_constant_node(n, name));
}

fn is_constant_node(n: &NodeProto, output: &str) -> bool {
    n.op_type() == "Constant" && n.output.first().map(String::as_str) == Some(output)
}

/// Every name the graph uses, to pick fresh ones.
/// The names of the graph's constant tensors: initializers and `Constant` nodes with a `value`.
/// Tensors are looked up (and cloned) one at a time, when a fold needs them.
struct Constants<'g> {
    graph: &'g onnx::GraphProto,
    names: HashSet<String>,
}

impl<'g> Constants<'g> {
    fn of(graph: &'g onnx::GraphProto) -> Constants<'g> {
        let mut names: HashSet<String> = graph
            .initializer
            .iter()
            .map(|t| t.name().to_string())
            .collect();
        names.extend(
            graph
                .node
                .iter()
                .filter(|n| n.op_type() == "Constant" && onnx::attr(n, "value").is_some())
                .filter_map(|n| n.output.first().cloned()),
        );
        Constants { graph, names }
    }

    fn get(&self, name: &str) -> Option<&'g TensorProto> {
        if !self.names.contains(name) {
            return None;
        }
        self.graph
            .initializer
            .iter()
            .find(|t| t.name() == name)
            .or_else(|| {
                self.graph
                    .node
                    .iter()
                    .find(|n| is_constant_node(n, name))
                    .and_then(|n| onnx::attr(n, "value").and_then(|a| a.t.as_ref()))
            })
    }
}

/// Stores `tensor` under `name` when `name` is a constant that only the folded Conv reads (or
/// does not exist yet); otherwise under a fresh name. Returns the name used.
fn store(
    graph: &mut onnx::GraphProto,
    name: &str,
    mut tensor: TensorProto,
    names: &mut onnx::Names,
) -> String {
    let readers = graph
        .node
        .iter()
        .map(|n| n.input.iter().filter(|i| *i == name).count())
        .sum::<usize>()
        + graph.output.iter().filter(|o| o.name() == name).count();
    let exists = names.contains(name);
    let in_place = readers <= 1 && !graph.input.iter().any(|i| i.name() == name);
    let target = if exists && !in_place {
        names.fresh(&format!("{name}_folded"))
    } else {
        name.to_string()
    };
    tensor.name = Some(target.clone());
    if target == name
        && let Some(n) = graph.node.iter_mut().find(|n| is_constant_node(n, name))
    {
        let is_value = |a: &&mut onnx::AttributeProto| a.name() == "value";
        if let Some(a) = n.attribute.iter_mut().find(is_value) {
            a.t = Some(tensor);
        }
        return target;
    }
    match graph.initializer.iter_mut().find(|t| t.name() == target) {
        Some(t) => *t = tensor,
        None => graph.initializer.push(tensor),
    }
    names.insert(&target);
    target
}

/// Rewrites `model` (see `prepare`), indexes it and plans its quantization; the plan lists the nodes
/// the rewrites removed.
pub fn plan_model(
    model: &mut onnx::ModelProto,
    path: &Path,
    config: &QuantConfig,
) -> Result<QuantPlan> {
    let context = || format!("model {}", path.display());
    let merged = prepare(model).with_context(context)?;
    let index = GraphIndex::new(model).with_context(context)?;
    let mut plan = crate::ir::plan(&index, config)?;
    for m in &merged {
        plan.note_merged(&m.node, &m.op_type, &m.into);
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::{AttributeProto, GraphProto, ValueInfoProto};

    fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
        NodeProto {
            op_type: Some(op.into()),
            name: Some(name.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn value(name: &str) -> ValueInfoProto {
        ValueInfoProto {
            name: Some(name.into()),
            ..Default::default()
        }
    }

    /// x -> Conv(w, b) -> BN -> y, 2 output channels of 1x1 kernels over 1 input channel, plus
    /// `extra` nodes.
    fn model(conv_bias: bool, extra: Vec<NodeProto>) -> ModelProto {
        let t = |n: &str, d: &[usize], v: Vec<f32>| make(n, d, v);
        let mut conv_inputs = vec!["x", "w"];
        if conv_bias {
            conv_inputs.push("b");
        }
        let mut nodes = vec![
            node("Conv", "conv", &conv_inputs, &["c"]),
            node(
                "BatchNormalization",
                "bn",
                &["c", "s", "beta", "m", "v"],
                &["y"],
            ),
        ];
        nodes[1].attribute.push(AttributeProto {
            name: Some("epsilon".into()),
            f: Some(0.0),
            r#type: Some(onnx::proto::attribute_proto::AttributeType::Float as i32),
            ..Default::default()
        });
        nodes.extend(extra);
        ModelProto {
            graph: Some(GraphProto {
                node: nodes,
                initializer: vec![
                    t("w", &[2, 1, 1, 1], vec![1.0, -2.0]),
                    t("b", &[2], vec![0.5, 1.0]),
                    t("s", &[2], vec![2.0, 3.0]),
                    t("beta", &[2], vec![0.25, -1.0]),
                    t("m", &[2], vec![1.0, 2.0]),
                    t("v", &[2], vec![4.0, 9.0]),
                ],
                input: vec![value("x")],
                output: vec![value("y")],
                value_info: vec![value("c")],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn init(m: &ModelProto, name: &str) -> Vec<f32> {
        let g = m.graph.as_ref().unwrap();
        let t = g.initializer.iter().find(|t| t.name() == name).unwrap();
        onnx::tensor_f32(t).unwrap()
    }

    #[test]
    fn folds_scale_shift_and_mean_into_weight_and_bias() {
        let mut m = model(true, vec![]);
        let merged = prepare(&mut m).unwrap();
        assert_eq!(
            merged,
            vec![Merged {
                node: "bn".into(),
                op_type: "BatchNormalization".into(),
                into: "conv".into()
            }]
        );
        let g = m.graph.as_ref().unwrap();
        assert_eq!(g.node.len(), 1);
        assert_eq!(g.node[0].input, ["x", "w", "b"]);
        assert_eq!(g.node[0].output, ["y"]);
        assert!(g.value_info.is_empty(), "the Conv's old output is gone");
        // factor = s / sqrt(v) = [1, 1]; w' = w; b' = (b - m) * factor + beta.
        assert_eq!(init(&m, "w"), [1.0, -2.0]);
        assert_eq!(init(&m, "b"), [-0.25, -2.0]);
        let names: Vec<&str> = g.initializer.iter().map(|t| t.name()).collect();
        assert_eq!(
            names,
            ["w", "b"],
            "the BatchNormalization's parameters are dropped"
        );
    }

    #[test]
    fn adds_a_bias_and_copies_shared_weights() {
        let other = node("Conv", "other", &["x", "w"], &["z"]);
        let mut m = model(false, vec![other]);
        m.graph.as_mut().unwrap().output.push(value("z"));
        // Scale 2 / sqrt(4) = 1 and 3 / sqrt(9) = 1: change s to make the weight move.
        let g = m.graph.as_mut().unwrap();
        g.initializer[2] = make("s", &[2], vec![4.0, 6.0]);
        prepare(&mut m).unwrap();
        let g = m.graph.as_ref().unwrap();
        assert_eq!(g.node[0].input, ["x", "w_folded", "w_folded_bias"]);
        assert_eq!(
            g.node[1].input,
            ["x", "w"],
            "the other Conv keeps the original weight"
        );
        assert_eq!(init(&m, "w"), [1.0, -2.0]);
        assert_eq!(init(&m, "w_folded"), [2.0, -4.0]);
        // b' = (0 - m) * factor + beta = [-2 + 0.25, -4 - 1].
        assert_eq!(init(&m, "w_folded_bias"), [-1.75, -5.0]);
    }

    #[test]
    fn leaves_a_conv_whose_output_is_read_elsewhere() {
        let tap = node("Relu", "tap", &["c"], &["r"]);
        let mut m = model(true, vec![tap]);
        let before = m.clone();
        assert!(prepare(&mut m).unwrap().is_empty());
        assert_eq!(m, before);
    }
}
