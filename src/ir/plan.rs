//! The quantization plan: which tensors get quantized with which grid, and why every other node stays
//! float. Decided from the graph and the config alone; no numbers are computed here.

use std::collections::{HashMap, HashSet};
use std::fmt;

use anyhow::{Result, bail, ensure};
use serde::Serialize;

use super::index::GraphIndex;
use super::policy::{self, OpClass};
use crate::calib::Grid;
use crate::calib::bias::{Pads, Window};
use crate::config::QuantConfig;
use crate::onnx::{self, tensor_dims, tensor_f32};

/// Where an activation site's range comes from.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum RangeSource {
    /// Observed on this float-model tensor during calibration.
    Observed(String),
    /// Fixed by the operator's semantics (e.g. Softmax output in [0, 1]).
    Fixed(f32, f32),
    /// The same parameters as another activation site (data movement keeps scales equal).
    SameAs(usize),
}

/// A float tensor computed at run time that gets a QuantizeLinear -> DequantizeLinear pair.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ActivationSite {
    /// The tensor's name in the exported graph (after folding activations into producers).
    pub tensor: String,
    pub range: RangeSource,
    pub grid: Grid,
}

/// A constant stored quantized behind a lone DequantizeLinear.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WeightSite {
    /// Initializer or `Constant` output name.
    pub tensor: String,
    /// Per-channel axis, `None` for one scale per tensor.
    pub axis: Option<usize>,
    pub grid: Grid,
    /// Whether x86 kernels without VNNI add this weight's products in saturating 16-bit pairs
    /// (every Conv but depthwise, Gemm, MatMul): `Deploy` then keeps it on 7 bits.
    pub paired: bool,
}

/// An int32 bias of a Conv/Gemm: scale = input scale x weight scale, zero point 0.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BiasSite {
    /// The float bias constant.
    pub tensor: String,
    /// Name the node reads the dequantized bias under (differs from `tensor` for a shared bias).
    pub name: String,
    /// Consuming node (index into the graph's nodes).
    pub node: usize,
    /// Activation site of the node's input.
    pub input: usize,
    /// Weight site of the node's weight.
    pub weight: usize,
    /// Gemm's `beta`, folded into the quantized bias (1 for Conv).
    pub beta: f32,
    /// How the layer's weights meet its input, for bias correction (`None`: not corrected, e.g.
    /// ConvTranspose or 3-D convolutions).
    pub window: Option<Window>,
}

/// A Relu/Clip removed from the graph: its producer writes `output` directly, whose range saturates
/// exactly as the activation did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Folded {
    pub node: usize,
    pub upstream: String,
    pub output: String,
}

/// Why a node stays in float.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum SkipReason {
    ExcludedByName,
    ExcludedByOpType,
    FirstLayerKeptFloat,
    LastLayerKeptFloat,
    NoIntegerKernel,
    InputNotQuantized(String),
    NotFloat,
    ConstantActivation(String),
    NonConstantWeight(String),
    UnsupportedBias(String, &'static str),
    GemmAlphaNotOne(f32),
    WeightConflict(String),
    PadValueNotZero,
    FloatConstant,
    /// Computes a tensor that must keep full precision (see [`Fragile`]).
    Fragile(Fragile),
    /// A Concat writing a graph output: its inputs keep their own scales, which one output scale
    /// would flatten (box coordinates in pixels beside class scores in [0, 1]).
    ConcatIntoOutput,
    /// Kept float by the accuracy fallback: quantizing it cost the most of the target.
    KeptForAccuracy,
    /// An element-wise op whose integer kernel would save no conversions: in float, with its
    /// neighbours' decisions, it needs `float` standalone QuantizeLinear/DequantizeLinear kernels, on
    /// integers `integer` of them.
    FasterInFloat {
        float: usize,
        integer: usize,
    },
}

/// A tensor kept float by default because 8 bits over its range lose what its consumer needs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum Fragile {
    /// Feeds a Softmax: attention scores carry an additive mask (about -10000) that would stretch
    /// the grid until the scores round away.
    SoftmaxInput,
    /// Feeds a square root or a divisor (normalisation statistics): a value near zero would round to
    /// zero or jump a whole step.
    RootOrDivisor,
    /// Feeds a layer normalisation: in trained transformers the residual stream, and the branch
    /// outputs added into it, carry a few outlier channels hundreds of times larger than the rest,
    /// so that one scale per tensor rounds every other channel to a handful of codes.
    NormalisationInput,
}

impl fmt::Display for Fragile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fragile::SoftmaxInput => "a softmax input",
            Fragile::RootOrDivisor => "a square root's input or a divisor",
            Fragile::NormalisationInput => "a layer normalisation's input (the residual stream)",
        })
    }
}

impl SkipReason {
    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            SkipReason::ExcludedByName => "excluded_by_name",
            SkipReason::ExcludedByOpType => "excluded_by_op_type",
            SkipReason::FirstLayerKeptFloat => "first_layer_kept_float",
            SkipReason::LastLayerKeptFloat => "last_layer_kept_float",
            SkipReason::NoIntegerKernel => "no_integer_kernel",
            SkipReason::InputNotQuantized(_) => "input_not_quantized",
            SkipReason::NotFloat => "not_float",
            SkipReason::ConstantActivation(_) => "constant_activation",
            SkipReason::NonConstantWeight(_) => "non_constant_weight",
            SkipReason::UnsupportedBias(..) => "unsupported_bias",
            SkipReason::GemmAlphaNotOne(_) => "gemm_alpha_not_one",
            SkipReason::WeightConflict(_) => "weight_conflict",
            SkipReason::PadValueNotZero => "pad_value_not_zero",
            SkipReason::FloatConstant => "float_constant",
            SkipReason::Fragile(_) => "fragile",
            SkipReason::ConcatIntoOutput => "concat_into_output",
            SkipReason::KeptForAccuracy => "kept_for_accuracy",
            SkipReason::FasterInFloat { .. } => "faster_in_float",
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::ExcludedByName => write!(f, "excluded by name (--exclude-nodes)"),
            SkipReason::ExcludedByOpType => write!(f, "excluded by op type (--exclude-op-types)"),
            SkipReason::FirstLayerKeptFloat => {
                write!(f, "first layer kept float (--float-first-layer)")
            }
            SkipReason::LastLayerKeptFloat => {
                write!(f, "last layer kept float (--float-last-layer)")
            }
            SkipReason::NoIntegerKernel => {
                write!(f, "op type has no integer kernel in ONNX Runtime")
            }
            SkipReason::InputNotQuantized(t) => {
                write!(
                    f,
                    "input '{t}' is not quantized, and this op only follows its input's quantization"
                )
            }
            SkipReason::NotFloat => write!(f, "no float32 tensors to quantize"),
            SkipReason::ConstantActivation(t) => write!(f, "activation input '{t}' is a constant"),
            SkipReason::NonConstantWeight(t) => write!(f, "weight '{t}' is not a constant"),
            SkipReason::UnsupportedBias(t, why) => write!(f, "bias '{t}' {why}"),
            SkipReason::GemmAlphaNotOne(a) => {
                write!(f, "Gemm alpha is {a}, integer kernels need 1")
            }
            SkipReason::WeightConflict(t) => {
                write!(
                    f,
                    "weight '{t}' is shared with a node that quantizes it differently"
                )
            }
            SkipReason::PadValueNotZero => write!(f, "constant pad value is not zero"),
            SkipReason::FloatConstant => write!(f, "constant read by no quantized input"),
            SkipReason::Fragile(what) => write!(
                f,
                "computes {what}, kept float for precision (--quantize-fragile quantizes it)"
            ),
            SkipReason::ConcatIntoOutput => write!(
                f,
                "joins tensors into a graph output: each input keeps its own scale"
            ),
            SkipReason::KeptForAccuracy => write!(
                f,
                "kept float by the accuracy target (--max-loss / --min-agreement): among the costliest to quantize"
            ),
            SkipReason::FasterInFloat { float, integer } => write!(
                f,
                "faster in float: standalone Q/DQ conversions in float {float}, on integers {integer}; \
                 ONNX Runtime's integer element-wise kernels are no faster than its float ones"
            ),
        }
    }
}

/// What the plan does with a node.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Decision {
    /// Runs on quantized inputs and outputs (ONNX Runtime can fuse it into an integer kernel).
    Quantized,
    /// A Relu/Clip removed: the producer's quantization range saturates the same way.
    Folded,
    /// A `Constant` whose value is stored quantized as a weight.
    ConstantWeight,
    /// Removed before planning: its computation was folded into this node's float weights (a
    /// BatchNormalization into the Conv before it).
    MergedInto(String),
    /// Left in float, with the reason.
    Float(SkipReason),
}

/// One node of the graph and the plan's decision, in graph order.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeEntry {
    pub name: String,
    pub op_type: String,
    pub decision: Decision,
}

/// Everything the plan decided.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct QuantPlan {
    pub activations: Vec<ActivationSite>,
    pub weights: Vec<WeightSite>,
    pub biases: Vec<BiasSite>,
    pub folded: Vec<Folded>,
    pub nodes: Vec<NodeEntry>,
    /// Labels of the MatMul and Gemm nodes that run on integers and write their output in float
    /// because no integer kernel reads it (MatMulIntegerToFloat, QGemm without an output scale).
    pub float_outputs: Vec<String>,
}

impl QuantPlan {
    /// Whether any weight is quantized per channel (requires opset 13).
    pub fn has_per_channel(&self) -> bool {
        self.weights.iter().any(|w| w.axis.is_some())
    }
}

/// Operator types that mark a model as already quantized.
const QUANTIZED_OPS: &[&str] = &[
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
];

impl QuantPlan {
    /// Records a node that a rewrite removed before planning, after the node it went into.
    pub fn note_merged(&mut self, node: &str, op_type: &str, into: &str) {
        let at = self
            .nodes
            .iter()
            .position(|n| n.name == into)
            .map_or(self.nodes.len(), |k| k + 1);
        self.nodes.insert(
            at,
            NodeEntry {
                name: node.into(),
                op_type: op_type.into(),
                decision: Decision::MergedInto(into.into()),
            },
        );
    }
}

/// Plans the quantization of the indexed graph. Refuses models that are already quantized.
///
/// Placement follows ONNX Runtime's CPU provider (unless `quantize_fragile`): an element-wise op is
/// quantized only where that saves standalone conversions, and a MatMul or Gemm output that only
/// float nodes read is written in float (see [`Placement`]).
pub fn plan(index: &GraphIndex, config: &QuantConfig) -> Result<QuantPlan> {
    let graph = index.graph;
    ensure!(
        (2..=8).contains(&config.weight_bits),
        "--wbits {}: supported widths are 2 to 8 bits",
        config.weight_bits
    );
    ensure!(
        (2..=8).contains(&config.act_bits) || config.act_bits == 16,
        "--abits {}: supported widths are 2 to 8 bits, and 16",
        config.act_bits
    );
    if let Some(node) = graph
        .node
        .iter()
        .find(|n| QUANTIZED_OPS.contains(&n.op_type()))
    {
        bail!(
            "node '{}' is a {}: the model is already quantized; lapq quantizes float models",
            onnx::node_label(node),
            node.op_type()
        );
    }
    let names: HashSet<&str> = graph.node.iter().map(|n| n.name()).collect();
    for name in &config.exclude_nodes {
        if !names.contains(name.as_str()) {
            bail!("--exclude-nodes: the model has no node named '{name}'");
        }
    }
    let fragile = if config.quantize_fragile {
        HashMap::new()
    } else {
        fragile_tensors(index)
    };
    let mut placement = Placement::default();
    loop {
        let plan = plan_once(index, config, &fragile, &placement)?;
        if config.quantize_fragile || !placement.improve(index, &plan) {
            return Ok(plan);
        }
    }
}

/// What the planner's latency rule has settled so far. Both sets only grow, so the rule ends.
#[derive(Default)]
struct Placement {
    /// Quantized element-wise nodes that are faster in float, with the reason's conversion counts.
    float: HashMap<usize, SkipReason>,
    /// MatMul and Gemm outputs that no integer kernel reads: the node still runs on integers and
    /// writes them in float (ONNX Runtime's MatMulIntegerToFloat, QGemm without an output scale),
    /// without a Q/DQ pair.
    unread: HashSet<String>,
}

impl Placement {
    /// Adds to the sets what `plan` shows: each quantized element-wise node that needs no more
    /// standalone conversions in float than on integers (ONNX Runtime's integer element-wise
    /// kernels are no faster than its float ones, and float is exact), and each quantized MatMul or
    /// Gemm output that only float nodes read. Returns whether anything was added.
    ///
    /// A conversion is a QuantizeLinear or DequantizeLinear that fuses into no integer kernel: a
    /// float-produced tensor read on integers, or an integer-produced one read in float. Counts are
    /// marginal (a conversion that another reader needs anyway is free). Demoting a node never makes
    /// a neighbour's integer form cheaper, so the nodes of one round are demoted together.
    fn improve(&mut self, index: &GraphIndex, plan: &QuantPlan) -> bool {
        let quantized: HashSet<&str> = plan.activations.iter().map(|a| a.tensor.as_str()).collect();
        let runs_on_integers = |i: usize| {
            matches!(
                plan.nodes[i].decision,
                Decision::Quantized | Decision::Folded
            )
        };
        let readers = |t: &str| {
            let mut nodes = index.consumers(t).to_vec();
            nodes.sort_unstable();
            nodes.dedup();
            let (on_integers, in_float): (Vec<usize>, Vec<usize>) = nodes
                .into_iter()
                .partition(|&c| runs_on_integers(c) && reads_quantized(index.node(c), t));
            (
                on_integers.len(),
                in_float.len() + usize::from(index.is_graph_output(t)),
            )
        };
        let produced_on_integers =
            |t: &str| quantized.contains(t) && index.producer(t).is_some_and(runs_on_integers);
        let mut changed = false;
        for &i in &index.order {
            let node = index.node(i);
            if !runs_on_integers(i) {
                continue;
            }
            let class = policy::op_class(node);
            if class == Some(OpClass::MatMul) || node.op_type() == "Gemm" {
                for out in node
                    .output
                    .iter()
                    .filter(|o| quantized.contains(o.as_str()))
                {
                    if readers(out).0 == 0 && self.unread.insert(out.clone()) {
                        changed = true;
                    }
                }
                continue;
            }
            if !matches!(class, Some(OpClass::Independent(_))) {
                continue;
            }
            let mut inputs: Vec<&str> = node
                .input
                .iter()
                .map(String::as_str)
                .filter(|t| quantized.contains(t) && index.constant(t).is_none())
                .collect();
            inputs.sort_unstable();
            inputs.dedup();
            let (mut float, mut integer) = (0, 0);
            for t in inputs {
                let (on_integers, in_float) = readers(t);
                if produced_on_integers(t) {
                    float += usize::from(in_float == 0);
                } else {
                    integer += usize::from(on_integers == 1);
                }
            }
            for out in node
                .output
                .iter()
                .filter(|o| quantized.contains(o.as_str()))
            {
                let (on_integers, in_float) = readers(out);
                float += usize::from(on_integers > 0);
                integer += usize::from(in_float > 0);
            }
            if float <= integer {
                self.float
                    .insert(i, SkipReason::FasterInFloat { float, integer });
                changed = true;
            }
        }
        changed
    }
}

/// Whether a node that runs on integers reads `tensor` quantized (its data input, or any input of
/// a MatMul or an op with independent parameters).
fn reads_quantized(node: &onnx::NodeProto, tensor: &str) -> bool {
    match policy::op_class(node) {
        Some(OpClass::MatMul | OpClass::Independent(_)) => node.input.iter().any(|t| t == tensor),
        Some(_) => node.input.first().is_some_and(|t| t == tensor),
        None => false,
    }
}

/// One planning pass with the latency rule's decisions so far.
fn plan_once(
    index: &GraphIndex,
    config: &QuantConfig,
    fragile: &HashMap<String, Fragile>,
    placement: &Placement,
) -> Result<QuantPlan> {
    let graph = index.graph;
    let layers: Vec<usize> = index
        .order
        .iter()
        .copied()
        .filter(|&i| policy::is_layer(index.node(i)))
        .collect();
    let mut planner = Planner {
        index,
        config,
        plan: QuantPlan::default(),
        act: HashMap::new(),
        wt: HashMap::new(),
        fragile,
        unread: &placement.unread,
    };
    let mut decisions: Vec<Option<Decision>> = vec![None; graph.node.len()];
    for &i in &index.order {
        let node = index.node(i);
        let excluded = if config.exclude_nodes.iter().any(|n| n == node.name()) {
            Some(SkipReason::ExcludedByName)
        } else if config.keep_float.contains(&onnx::node_label(node)) {
            Some(SkipReason::KeptForAccuracy)
        } else if config.exclude_op_types.iter().any(|t| t == node.op_type()) {
            Some(SkipReason::ExcludedByOpType)
        } else if config.float_first_layer && layers.first() == Some(&i) {
            Some(SkipReason::FirstLayerKeptFloat)
        } else if config.float_last_layer && layers.last() == Some(&i) {
            Some(SkipReason::LastLayerKeptFloat)
        } else {
            placement.float.get(&i).cloned()
        };
        decisions[i] = Some(match excluded {
            Some(reason) => Decision::Float(reason),
            None => planner.node(i)?,
        });
    }
    let mut plan = planner.plan;
    raise_to_eight_bits(&mut plan, config);
    plan.float_outputs = index
        .order
        .iter()
        .map(|&i| index.node(i))
        .filter(|n| n.output.iter().any(|o| placement.unread.contains(o)))
        .map(onnx::node_label)
        .collect();
    for (i, node) in graph.node.iter().enumerate() {
        let mut decision = decisions[i]
            .take()
            .unwrap_or(Decision::Float(SkipReason::NoIntegerKernel));
        if node.op_type() == "Constant" {
            let out = node.output.first();
            let quantized = plan.weights.iter().any(|w| out == Some(&w.tensor))
                || plan.biases.iter().any(|b| out == Some(&b.tensor));
            decision = if quantized {
                Decision::ConstantWeight
            } else {
                Decision::Float(SkipReason::FloatConstant)
            };
        }
        plan.nodes.push(NodeEntry {
            name: onnx::node_label(node),
            op_type: node.op_type().to_string(),
            decision,
        });
    }
    Ok(plan)
}

/// Puts the sites of `config.eight_bit`, and the sites sharing their parameters, on 8-bit grids.
pub fn raise_to_eight_bits(plan: &mut QuantPlan, config: &QuantConfig) {
    let raised = |t: &str| config.eight_bit.iter().any(|e| e == t);
    for i in 0..plan.activations.len() {
        let shares = match plan.activations[i].range {
            RangeSource::SameAs(j) => plan.activations[j].grid.bits >= 8 && j < i,
            _ => false,
        };
        let site = &mut plan.activations[i];
        if (raised(&site.tensor) || shares) && site.grid.bits < 8 {
            site.grid.bits = 8;
        }
    }
    for site in plan.weights.iter_mut().filter(|s| raised(&s.tensor)) {
        site.grid.bits = site.grid.bits.max(config.weight_bits_cap(site.paired));
    }
}

struct Planner<'a, 'm> {
    index: &'a GraphIndex<'m>,
    config: &'a QuantConfig,
    plan: QuantPlan,
    /// Activation site of each quantized tensor (by its current name).
    act: HashMap<String, usize>,
    /// Weight site of each quantized constant.
    wt: HashMap<String, usize>,
    /// Tensors that stay float whatever their producer's class (empty with `quantize_fragile`).
    fragile: &'a HashMap<String, Fragile>,
    /// MatMul and Gemm outputs written in float (see [`Placement::unread`]).
    unread: &'a HashSet<String>,
}

/// How a constant input of a node is to be quantized.
struct WeightUse {
    tensor: String,
    axis: Option<usize>,
    grid: Grid,
    paired: bool,
}

impl Planner<'_, '_> {
    fn node(&mut self, i: usize) -> Result<Decision> {
        let node = self.index.node(i);
        let Some(class) = policy::op_class(node) else {
            return Ok(Decision::Float(SkipReason::NoIntegerKernel));
        };
        let float_outputs: Vec<&String> = node
            .output
            .iter()
            .filter(|o| !o.is_empty() && self.index.is_float(o))
            .collect();
        if float_outputs.is_empty() {
            return Ok(Decision::Float(SkipReason::NotFloat));
        }
        // A MatMul with a fragile output still runs on integer inputs (ONNX Runtime's
        // MatMulIntegerToFloat); any other producer of one stays float.
        if class != OpClass::MatMul
            && let Some(&why) = float_outputs
                .iter()
                .find_map(|o| self.fragile.get(o.as_str()))
        {
            return Ok(Decision::Float(SkipReason::Fragile(why)));
        }
        if node.op_type() == "Concat" && float_outputs.iter().any(|o| self.index.is_graph_output(o))
        {
            return Ok(Decision::Float(SkipReason::ConcatIntoOutput));
        }
        match class {
            OpClass::Linear => self.linear(i),
            OpClass::MatMul => self.all_inputs(i, None),
            OpClass::Independent(fixed) => self.all_inputs(i, fixed),
            OpClass::RemovableActivation => Ok(self.activation(i)),
            OpClass::SameAsInput => Ok(self.same_as_input(i)),
        }
    }

    fn linear(&mut self, i: usize) -> Result<Decision> {
        let node = self.index.node(i);
        let x = node.input.first().map(String::as_str).unwrap_or("");
        let w = node.input.get(1).map(String::as_str).unwrap_or("");
        let b = node
            .input
            .get(2)
            .map(String::as_str)
            .filter(|b| !b.is_empty());
        if self.index.constant(x).is_some() {
            return Ok(Decision::Float(SkipReason::ConstantActivation(x.into())));
        }
        if !self.index.is_float(x) {
            return Ok(Decision::Float(SkipReason::NotFloat));
        }
        let Some(wc) = self
            .index
            .constant(w)
            .filter(|c| c.tensor().data_type() == onnx::DataType::Float as i32)
        else {
            return Ok(Decision::Float(SkipReason::NonConstantWeight(w.into())));
        };
        if node.op_type() == "Gemm" {
            let alpha = onnx::attr_f(node, "alpha", 1.0);
            if alpha != 1.0 {
                return Ok(Decision::Float(SkipReason::GemmAlphaNotOne(alpha)));
            }
        }
        let wdims = tensor_dims(wc.tensor())?;
        ensure!(
            wdims.iter().product::<usize>() > 0,
            "node '{}': weight '{w}' has no values (shape {wdims:?})",
            onnx::node_label(node)
        );
        let axis = policy::weight_axis(node, wdims.len());
        let Some(&channels) = wdims.get(axis) else {
            bail!(
                "node '{}': weight '{w}' has shape {wdims:?}",
                onnx::node_label(node)
            );
        };
        if let Some(b) = b
            && let Some(reason) = self.bias_problem(node, b, channels, axis)?
        {
            return Ok(Decision::Float(reason));
        }
        let per_channel = self.config.per_channel && group_factor(node, axis) == 1;
        let depthwise = super::depthwise_conv(node, &wdims);
        let weight = WeightUse {
            tensor: w.into(),
            axis: per_channel.then_some(axis),
            grid: self.config.weight_grid(!depthwise),
            paired: !depthwise,
        };
        if let Some(reason) = self.weight_conflict(&weight) {
            return Ok(Decision::Float(reason));
        }
        let input = self.activation_site(x);
        let weight = self.weight_site(weight);
        if let Some(b) = b {
            let name = self.bias_name(b);
            let beta = if node.op_type() == "Gemm" {
                onnx::attr_f(node, "beta", 1.0)
            } else {
                1.0
            };
            self.plan.biases.push(BiasSite {
                tensor: b.into(),
                name,
                node: i,
                input,
                weight,
                beta,
                window: layer_window(node, wdims.len()),
            });
        }
        self.outputs(i, None);
        Ok(Decision::Quantized)
    }

    /// Why bias `b` of `node` (weight output channels `channels` along `axis`) keeps the node float:
    /// not a float constant, not one-dimensional, or not one value per output channel.
    fn bias_problem(
        &self,
        node: &onnx::NodeProto,
        b: &str,
        channels: usize,
        axis: usize,
    ) -> Result<Option<SkipReason>> {
        let Some(bc) = self
            .index
            .constant(b)
            .filter(|c| c.tensor().data_type() == onnx::DataType::Float as i32)
        else {
            return Ok(Some(SkipReason::UnsupportedBias(
                b.into(),
                "is not a float constant",
            )));
        };
        let bdims = tensor_dims(bc.tensor())?;
        if bdims.len() != 1 {
            return Ok(Some(SkipReason::UnsupportedBias(
                b.into(),
                "is not one-dimensional",
            )));
        }
        if node.op_type() == "Gemm" && bdims[0] != channels {
            return Ok(Some(SkipReason::UnsupportedBias(
                b.into(),
                "does not have one value per output",
            )));
        }
        if node.op_type() != "Gemm" && bdims[0] != channels * group_factor(node, axis) {
            return Ok(Some(SkipReason::UnsupportedBias(
                b.into(),
                "does not match the output channels",
            )));
        }
        Ok(None)
    }

    /// MatMul and the ops with independent parameters: every float input and every float output.
    fn all_inputs(&mut self, i: usize, fixed: Option<(f32, f32)>) -> Result<Decision> {
        let node = self.index.node(i);
        let is_matmul = node.op_type() == "MatMul";
        let mut weights = vec![];
        let mut acts = vec![];
        for (k, t) in node.input.iter().enumerate().filter(|(_, t)| !t.is_empty()) {
            if !self.index.is_float(t) {
                return Ok(Decision::Float(SkipReason::NotFloat));
            }
            match self.index.constant(t) {
                Some(c) if is_matmul => {
                    let rank = tensor_dims(c.tensor())?.len();
                    let axis = (k == 1 && self.config.per_channel && rank >= 2).then(|| rank - 1);
                    weights.push(WeightUse {
                        tensor: t.clone(),
                        axis,
                        grid: self.config.weight_grid(true),
                        paired: true,
                    });
                }
                Some(_) => weights.push(WeightUse {
                    tensor: t.clone(),
                    axis: None,
                    grid: self.config.act_grid(),
                    paired: false,
                }),
                None if self.fragile.contains_key(t.as_str()) => {}
                None => acts.push(t.as_str()),
            }
        }
        if let Some(reason) = weights.iter().find_map(|w| self.weight_conflict(w)) {
            return Ok(Decision::Float(reason));
        }
        for w in weights {
            self.weight_site(w);
        }
        for t in acts {
            self.activation_site(t);
        }
        self.outputs(i, fixed);
        Ok(Decision::Quantized)
    }

    fn activation(&mut self, i: usize) -> Decision {
        let node = self.index.node(i);
        let (x, y) = (node.input[0].as_str(), node.output[0].as_str());
        let Some(&site) = self.act.get(x) else {
            return Decision::Float(SkipReason::InputNotQuantized(x.into()));
        };
        let sole_input = self.plan.activations[site].range == RangeSource::Observed(x.into())
            && self.index.consumers(x).len() == 1
            && self.index.producer(x).is_some()
            && !self.index.is_graph_output(x)
            && node
                .input
                .iter()
                .skip(1)
                .all(|t| t.is_empty() || self.index.constant(t).is_some());
        if !sole_input {
            self.outputs(i, None);
            return Decision::Quantized;
        }
        // The input's QuantizeLinear takes the activation's output range, so that it saturates where
        // the activation clips. On an asymmetric grid the saturation does the activation's work and
        // the node goes; on a symmetric one the node stays and its output reuses the parameters.
        self.plan.activations[site].range = RangeSource::Observed(y.into());
        if self.plan.activations[site].grid.symmetric {
            let grid = self.plan.activations[site].grid;
            self.push_activation(y, RangeSource::SameAs(site), grid);
            return Decision::Quantized;
        }
        self.act.remove(x);
        self.act.insert(y.into(), site);
        self.plan.activations[site].tensor = y.into();
        self.plan.folded.push(Folded {
            node: i,
            upstream: x.into(),
            output: y.into(),
        });
        Decision::Folded
    }

    fn same_as_input(&mut self, i: usize) -> Decision {
        let node = self.index.node(i);
        let x = node.input[0].as_str();
        if self.index.constant(x).is_some() {
            return Decision::Float(SkipReason::ConstantActivation(x.into()));
        }
        let Some(&site) = self.act.get(x) else {
            return Decision::Float(SkipReason::InputNotQuantized(x.into()));
        };
        if node.op_type() == "Pad" && !pad_value_is_zero(self.index, node) {
            return Decision::Float(SkipReason::PadValueNotZero);
        }
        for out in node
            .output
            .iter()
            .filter(|o| !o.is_empty() && self.index.is_float(o))
        {
            let grid = self.plan.activations[site].grid;
            self.push_activation(out, RangeSource::SameAs(site), grid);
        }
        Decision::Quantized
    }

    fn outputs(&mut self, i: usize, fixed: Option<(f32, f32)>) {
        let node = self.index.node(i);
        let outputs: Vec<&String> = node
            .output
            .iter()
            .filter(|o| !o.is_empty() && self.index.is_float(o))
            .filter(|o| !self.fragile.contains_key(o.as_str()) && !self.unread.contains(o.as_str()))
            .collect();
        for out in outputs {
            let range = match fixed {
                Some((lo, hi)) => RangeSource::Fixed(lo, hi),
                None => RangeSource::Observed(out.clone()),
            };
            self.push_activation(out, range, self.config.act_grid());
        }
    }

    fn activation_site(&mut self, tensor: &str) -> usize {
        match self.act.get(tensor) {
            Some(&s) => s,
            None => self.push_activation(
                tensor,
                RangeSource::Observed(tensor.into()),
                self.config.act_grid(),
            ),
        }
    }

    fn push_activation(&mut self, tensor: &str, range: RangeSource, grid: Grid) -> usize {
        if let Some(&s) = self.act.get(tensor) {
            return s;
        }
        self.plan.activations.push(ActivationSite {
            tensor: tensor.into(),
            range,
            grid,
        });
        self.act
            .insert(tensor.into(), self.plan.activations.len() - 1);
        self.plan.activations.len() - 1
    }

    fn weight_conflict(&self, w: &WeightUse) -> Option<SkipReason> {
        let &site = self.wt.get(&w.tensor)?;
        let s = &self.plan.weights[site];
        (s.axis != w.axis || s.grid != w.grid).then(|| SkipReason::WeightConflict(w.tensor.clone()))
    }

    fn weight_site(&mut self, w: WeightUse) -> usize {
        if let Some(&s) = self.wt.get(&w.tensor) {
            return s;
        }
        self.wt.insert(w.tensor.clone(), self.plan.weights.len());
        self.plan.weights.push(WeightSite {
            tensor: w.tensor,
            axis: w.axis,
            grid: w.grid,
            paired: w.paired,
        });
        self.plan.weights.len() - 1
    }

    /// ONNX Runtime's naming of a bias used by several nodes: `<bias>0`, `<bias>1`, ...
    fn bias_name(&self, bias: &str) -> String {
        if !self.plan.biases.iter().any(|b| b.name == bias) {
            return bias.into();
        }
        (0..)
            .map(|k| format!("{bias}{k}"))
            .find(|n| !self.index.name_taken(n) && !self.plan.biases.iter().any(|b| &b.name == n))
            .unwrap_or_default()
    }
}

/// Element-wise operators through which a fragile tensor's precision need reaches back to their
/// inputs.
const ELEMENTWISE: &[&str] = &[
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Neg",
    "Sqrt",
    "Reciprocal",
    "Cast",
    "Where",
];

/// Softmax inputs, normalisation statistics (square-root inputs and divisors) and layer
/// normalisation inputs, and what computes them through element-wise arithmetic, back to the first
/// MatMul or other producer. Only tensors an element-wise op or a MatMul writes are returned: a
/// Conv/Gemm/Concat output keeps its quantization so that it fuses.
///
/// A layer normalisation's input is followed back only through tensors read by one node: the branch
/// (bias Add, MatMul) that a residual Add adds in, not the skip input, which the branch's own
/// MatMuls read quantized.
fn fragile_tensors(index: &GraphIndex) -> HashMap<String, Fragile> {
    let graph = index.graph;
    let mut seeds: Vec<(&str, Fragile)> = vec![];
    for node in &graph.node {
        let input = |k: usize| {
            node.input
                .get(k)
                .map(String::as_str)
                .filter(|t| !t.is_empty())
        };
        let seed = match node.op_type() {
            "Softmax" | "LogSoftmax" => input(0).map(|t| (t, Fragile::SoftmaxInput)),
            "Sqrt" | "Reciprocal" => input(0).map(|t| (t, Fragile::RootOrDivisor)),
            "Div" => input(1)
                .filter(|t| index.constant(t).is_none())
                .map(|t| (t, Fragile::RootOrDivisor)),
            "LayerNormalization" | "SimplifiedLayerNormalization" => {
                input(0).map(|t| (t, Fragile::NormalisationInput))
            }
            "ReduceMean" => input(0)
                .filter(|&t| subtracts_own_mean(index, node, t))
                .map(|t| (t, Fragile::NormalisationInput)),
            _ => None,
        };
        seeds.extend(seed);
    }
    let mut fragile = HashMap::new();
    while let Some((tensor, why)) = seeds.pop() {
        if fragile.contains_key(tensor) || !index.is_float(tensor) {
            continue;
        }
        let Some(producer) = index.producer(tensor).map(|p| index.node(p)) else {
            continue;
        };
        if producer.op_type() == "MatMul" {
            fragile.insert(tensor.to_string(), why);
        } else if ELEMENTWISE.contains(&producer.op_type()) {
            fragile.insert(tensor.to_string(), why);
            seeds.extend(
                producer
                    .input
                    .iter()
                    .filter(|t| !t.is_empty() && index.constant(t).is_none())
                    .filter(|t| why != Fragile::NormalisationInput || index.consumers(t).len() == 1)
                    .map(|t| (t.as_str(), why)),
            );
        }
    }
    fragile
}

/// Whether `mean = ReduceMean(x)` is subtracted from `x` itself: a decomposed layer normalisation.
fn subtracts_own_mean(index: &GraphIndex, mean: &onnx::NodeProto, x: &str) -> bool {
    mean.output.first().is_some_and(|m| {
        index.consumers(m).iter().any(|&c| {
            let sub = index.node(c);
            sub.op_type() == "Sub" && sub.input.first().is_some_and(|a| a == x)
        })
    })
}

/// How a Conv's or Gemm's weight meets its input, when bias correction handles the layer: Gemm, and
/// 1-D or 2-D Conv with well-formed attributes.
pub fn layer_window(node: &onnx::NodeProto, weight_rank: usize) -> Option<Window> {
    if node.op_type() == "Gemm" {
        return Some(Window::Dense {
            trans_a: onnx::attr_i(node, "transA", 0) != 0,
            trans_b: onnx::attr_i(node, "transB", 0) != 0,
        });
    }
    if node.op_type() != "Conv" {
        return None;
    }
    let spatial = weight_rank.checked_sub(2).filter(|s| (1..=2).contains(s))?;
    let list = |name: &str, len: usize| -> Option<Vec<usize>> {
        match onnx::attr_ints(node, name) {
            None => Some(vec![if name == "pads" { 0 } else { 1 }; len]),
            Some(v) if v.len() == len => v.iter().map(|&x| usize::try_from(x).ok()).collect(),
            Some(_) => None,
        }
    };
    let strides = list("strides", spatial)?;
    let dilations = list("dilations", spatial)?;
    if strides.contains(&0) || dilations.contains(&0) {
        return None;
    }
    let pads = match onnx::attr_s(node, "auto_pad").unwrap_or(b"NOTSET") {
        b"NOTSET" => Pads::Explicit(list("pads", 2 * spatial)?),
        b"SAME_UPPER" => Pads::SameUpper,
        b"SAME_LOWER" => Pads::SameLower,
        b"VALID" => Pads::Valid,
        _ => return None,
    };
    Some(Window::Conv {
        group: usize::try_from(onnx::attr_i(node, "group", 1))
            .ok()
            .filter(|&g| g > 0)?,
        strides,
        dilations,
        pads,
    })
}

/// Channels of a grouped ConvTranspose weight cover one group only; per-channel needs all of them.
fn group_factor(node: &onnx::NodeProto, axis: usize) -> usize {
    if node.op_type() == "ConvTranspose" && axis == 1 {
        onnx::attr_i(node, "group", 1).max(1) as usize
    } else {
        1
    }
}

fn pad_value_is_zero(index: &GraphIndex, node: &onnx::NodeProto) -> bool {
    let mode = onnx::attr(node, "mode")
        .and_then(|a| a.s.as_deref())
        .unwrap_or(b"constant");
    if mode != b"constant" {
        return true;
    }
    if onnx::attr_f(node, "value", 0.0) != 0.0 {
        return false;
    }
    match node.input.get(2).filter(|t| !t.is_empty()) {
        None => true,
        Some(t) => index
            .constant(t)
            .and_then(|c| tensor_f32(c.tensor()).ok())
            .is_some_and(|v| v.iter().all(|&x| x == 0.0)),
    }
}
