//! The quantized network as tract runs it: the float model with a fake-quantization op after every
//! quantized tensor, reading its parameters from a table shared with the caller. Changing parameters
//! writes the table; it never rebuilds or re-optimizes the model.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{Context, Result, anyhow, bail, ensure};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::{
    AxesMapping, AxisChangeConsequence, AxisOp, EvalContext, Expansion, InOut, InferenceResult, Op,
    Solver, StaticName, TensorProxy, TypedFact, TypedNode, TypedOp, check_input_arity,
    check_output_arity, expand,
};
use tract_onnx::tract_hir::tract_core::ops::EvalOp;
use tract_onnx::tract_hir::tract_core::{as_op, not_out_of_plan, op_as_typed_op};

use super::{Plans, find_outlet, load_onnx};
use crate::calib::{self, Params, QParams};
use crate::data::{Sample, Values};

/// A bias fake-quantized as ONNX Runtime dequantizes it: int32, scale = input scale x weight scale.
#[derive(Clone, Debug, PartialEq)]
pub struct BiasSite {
    /// The node (tract names nodes by their ONNX name, or their first output when unnamed).
    pub node: String,
    /// The bias's input slot on that node.
    pub slot: usize,
    /// Index of the node's input among the activation sites.
    pub input: usize,
    /// Index of the node's weight among the weight sites.
    pub weight: usize,
    /// Gemm's beta (the exported bias holds beta x bias).
    pub beta: f32,
}

/// Where the oracle fake-quantizes, by ONNX names: aligned with `Params`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sites {
    /// Tensors computed at run time (their consumers read the fake-quantized value).
    pub activations: Vec<String>,
    /// Constants (initializers or `Constant` outputs).
    pub weights: Vec<String>,
    /// Per weight, the nodes that read it and where: (node name in tract, index among the node's
    /// non-empty inputs). tract merges constants of equal value into one node, so only these inputs
    /// may see the weight's fake quantization; the other readers of the merged constant keep it float.
    pub weight_readers: Vec<Vec<(String, usize)>>,
    pub biases: Vec<BiasSite>,
}

/// The parameter table read by every fake-quantization op.
struct Table {
    enabled: AtomicBool,
    /// While fake quantization is off, activation sites still show their input to the observer
    /// (the float side of a paired pass).
    observe_disabled: AtomicBool,
    /// Slots that pass their input through (all quantize when empty).
    float: RwLock<Vec<bool>>,
    activations: usize,
    weights: usize,
    /// Gemm's beta per bias site.
    betas: Vec<f32>,
    params: RwLock<Option<Params>>,
    /// While set, each activation site first shows its input to the observer, which may replace the
    /// site's parameters before they are applied (sequential calibration).
    observer: RwLock<Option<Arc<Observer>>>,
}

impl Table {
    fn read(&self) -> Result<std::sync::RwLockReadGuard<'_, Option<Params>>> {
        self.params
            .read()
            .map_err(|_| anyhow!("parameter table poisoned"))
    }

    fn write(&self) -> Result<std::sync::RwLockWriteGuard<'_, Option<Params>>> {
        self.params
            .write()
            .map_err(|_| anyhow!("parameter table poisoned"))
    }

    fn is_float(&self, slot: usize) -> Result<bool> {
        let float = self
            .float
            .read()
            .map_err(|_| anyhow!("float mask poisoned"))?;
        Ok(float.get(slot).copied().unwrap_or(false))
    }

    fn set_observer(&self, observer: Option<Arc<Observer>>) -> Result<()> {
        *self
            .observer
            .write()
            .map_err(|_| anyhow!("observer poisoned"))? = observer;
        Ok(())
    }
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("activations", &self.activations)
            .field("weights", &self.weights)
            .field("betas", &self.betas)
            .finish_non_exhaustive()
    }
}

/// Sees an activation site's input (slot, values, shape) and may change parameters from there on.
pub type Observer = dyn Fn(usize, &[f32], &[usize]) -> Option<Update> + Send + Sync;

/// Sees an activation site's input from the quantized network and the float network's value of the
/// same tensor (slot, quantized side, float side, shape), both before the site's own quantization.
pub type PairedObserver = dyn Fn(usize, &[f32], &[f32], &[usize]) -> Option<Update> + Send + Sync;

/// What an observer changes when it has seen a site: the site's own parameters, and the values of
/// weights and biases (by site index) that the network reads downstream of it.
#[derive(Clone, Debug, Default)]
pub struct Update {
    pub activation: Option<QParams>,
    /// Weight values as `Params::weight_values` holds them.
    pub weights: Vec<(usize, Arc<[f32]>)>,
    /// Bias values as `Params::bias_values` holds them.
    pub biases: Vec<(usize, Vec<f32>)>,
}

impl Update {
    /// New parameters for the site alone.
    pub fn params(p: QParams) -> Update {
        Update {
            activation: Some(p),
            ..Update::default()
        }
    }
}

thread_local! {
    /// Which part of a parallel sequential calibration this thread runs.
    static PARTY: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Joins what each part of a parallel sequential calibration shows at an activation site: the
/// observer runs once per site, on the parts' values concatenated in part order, and every part
/// waits for its answer. A part that ends (or fails) leaves, so the others never wait for it.
struct Rendezvous {
    inner: Arc<Observer>,
    single: bool,
    state: Mutex<Meetings>,
    arrived: std::sync::Condvar,
}

struct Meetings {
    parties: usize,
    open: HashMap<usize, Meeting>,
}

#[derive(Default)]
struct Meeting {
    parts: std::collections::BTreeMap<usize, (Vec<f32>, Vec<usize>)>,
    answer: Option<Option<Update>>,
    taken: usize,
}

impl Rendezvous {
    fn new(parties: usize, inner: Arc<Observer>) -> Rendezvous {
        Rendezvous {
            inner,
            single: parties <= 1,
            state: Mutex::new(Meetings {
                parties,
                open: HashMap::new(),
            }),
            arrived: std::sync::Condvar::new(),
        }
    }

    fn meet(&self, slot: usize, data: &[f32], dims: &[usize]) -> Option<Update> {
        if self.single {
            return (self.inner)(slot, data, dims);
        }
        let mut state = self.state.lock().ok()?;
        let meeting = state.open.entry(slot).or_default();
        meeting
            .parts
            .insert(PARTY.get(), (data.to_vec(), dims.to_vec()));
        loop {
            let parties = state.parties;
            let meeting = state.open.get_mut(&slot)?;
            if meeting.answer.is_none() && meeting.parts.len() >= parties {
                let all: Vec<f32> = meeting
                    .parts
                    .values()
                    .flat_map(|(d, _)| d)
                    .copied()
                    .collect();
                let mut dims = meeting.parts.values().next()?.1.clone();
                if let Some(d0) = dims.first_mut() {
                    *d0 = meeting
                        .parts
                        .values()
                        .map(|(_, d)| d.first().copied().unwrap_or(1))
                        .sum();
                }
                meeting.answer = Some((self.inner)(slot, &all, &dims));
                self.arrived.notify_all();
            }
            if let Some(answer) = meeting.answer.clone() {
                meeting.taken += 1;
                if meeting.taken == meeting.parts.len() {
                    state.open.remove(&slot);
                }
                return answer;
            }
            state = self.arrived.wait(state).ok()?;
        }
    }

    fn leave(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.parties = state.parties.saturating_sub(1);
            self.arrived.notify_all();
        }
    }
}

#[derive(Clone, Debug)]
struct FakeQuant {
    slot: usize,
    table: Arc<Table>,
    /// Per-tensor sites work in any layout, so tract may move axes through them and keep its
    /// layout optimisations; per-channel sites pin the layout their parameters' axis refers to.
    layout_free: bool,
    /// Weight and bias sites: the last result and the parameters it was computed with. Their input
    /// is always the same constant, so equal parameters give an equal result.
    cache: Option<Arc<WeightCache>>,
}

impl PartialEq for FakeQuant {
    fn eq(&self, other: &Self) -> bool {
        self.slot == other.slot && Arc::ptr_eq(&self.table, &other.table)
    }
}

impl Eq for FakeQuant {}

impl FakeQuant {
    /// The fake-quantized `input`, from the cache when this site's parameters did not change.
    fn run(&self, input: TValue) -> Result<TValue> {
        if self.layout_free {
            self.observe(&input)?;
        }
        let guard = self.table.read()?;
        let params = guard
            .as_ref()
            .context("quantization parameters were never set")?;
        let (key, values) = (self.slot_params(params), self.slot_values(params));
        let rounded = self.slot_rounded(params);
        if let Some(cache) = &self.cache {
            let cached = cache.lock().map_err(|_| anyhow!("weight cache poisoned"))?;
            if let Some((p, v, r, value)) = cached.as_ref()
                && p == key
                && v == values
                && match (r, rounded) {
                    (None, None) => true,
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    _ => false,
                }
            {
                return Ok(value.clone());
            }
        }
        let mut t = input.into_tensor();
        let dims = t.shape().to_vec();
        let mut view = t.try_as_plain_ram_mut()?;
        self.apply(params, view.as_slice_mut::<f32>()?, &dims)?;
        let value = t.into_tvalue();
        if let Some(cache) = &self.cache {
            *cache.lock().map_err(|_| anyhow!("weight cache poisoned"))? = Some((
                key.clone(),
                values.to_vec(),
                rounded.cloned(),
                value.clone(),
            ));
        }
        Ok(value)
    }

    /// Lets the observer, if any, replace this activation site's parameters after seeing `input`.
    fn observe(&self, input: &TValue) -> Result<()> {
        let observer = self
            .table
            .observer
            .read()
            .map_err(|_| anyhow!("observer poisoned"))?
            .clone();
        let Some(observer) = observer else {
            return Ok(());
        };
        let view = input.try_as_plain_ram()?;
        let Some(update) = observer(self.slot, view.as_slice::<f32>()?, input.shape()) else {
            return Ok(());
        };
        let mut params = self.table.write()?;
        let params = params
            .as_mut()
            .context("quantization parameters were never set")?;
        if let Some(p) = update.activation {
            params.activations[self.slot] = p;
        }
        for (k, values) in update.weights {
            ensure!(k < params.weights.len(), "update of weight site {k}");
            params.weight_values.resize(params.weights.len(), None);
            params.weight_values[k] = Some(values);
        }
        for (b, values) in update.biases {
            let slot = params
                .bias_values
                .get_mut(b)
                .with_context(|| format!("update of bias site {b}"))?;
            *slot = values;
        }
        Ok(())
    }

    fn slot_params<'p>(&self, params: &'p Params) -> &'p QParams {
        let (a, w) = (self.table.activations, self.table.weights);
        match self.slot {
            s if s < a => &params.activations[s],
            s if s < a + w => &params.weights[s - a],
            s => &params.biases[s - a - w],
        }
    }

    /// A bias site's float value as it is quantized (empty for other sites).
    fn slot_values<'p>(&self, params: &'p Params) -> &'p [f32] {
        let first_bias = self.table.activations + self.table.weights;
        match self.slot.checked_sub(first_bias) {
            Some(b) => params.bias_values.get(b).map_or(&[], Vec::as_slice),
            None => &[],
        }
    }

    /// A weight site's values chosen by rounding with error feedback (`None` for other sites and
    /// for weights that round to nearest).
    fn slot_rounded<'p>(&self, params: &'p Params) -> Option<&'p Arc<[f32]>> {
        let k = self.slot.checked_sub(self.table.activations)?;
        params.weight_values.get(k)?.as_ref()
    }

    fn apply(&self, params: &Params, data: &mut [f32], dims: &[usize]) -> Result<()> {
        let (a, w) = (self.table.activations, self.table.weights);
        if self.slot < a + w {
            let p = if self.slot < a {
                &params.activations[self.slot]
            } else {
                let k = self.slot - a;
                if let Some(values) = params.rounded(k) {
                    ensure!(
                        values.len() == data.len(),
                        "weight site {k}: {} rounded values for a weight of {}",
                        values.len(),
                        data.len()
                    );
                    data.copy_from_slice(values);
                }
                &params.weights[k]
            };
            ensure!(
                !self.layout_free || p.axis.is_none(),
                "per-channel parameters at an activation site"
            );
            p.fake_quant_in_place(data, dims);
            return Ok(());
        }
        let b = self.slot - a - w;
        let p = &params.biases[b];
        let beta = self.table.betas[b];
        let values = self.slot_values(params);
        ensure!(
            values.len() == data.len(),
            "bias site {b}: {} values for a bias of {}",
            values.len(),
            data.len()
        );
        data.copy_from_slice(values);
        let q = calib::quantize_bias(data, p);
        for (c, (x, q)) in data.iter_mut().zip(q).enumerate() {
            let s = p.scale[if p.scale.len() == 1 { 0 } else { c }];
            *x = q as f32 * s / beta;
        }
        Ok(())
    }
}

impl Op for FakeQuant {
    fn name(&self) -> StaticName {
        "LapqFakeQuant".into()
    }
    op_as_typed_op!();
}

impl EvalOp for FakeQuant {
    not_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        if !self.table.enabled.load(Ordering::Relaxed) {
            if self.layout_free
                && self.table.observe_disabled.load(Ordering::Relaxed)
                && let Some(input) = inputs.first()
            {
                self.observe(input)?;
            }
            return Ok(inputs);
        }
        if self.table.is_float(self.slot)? {
            return Ok(inputs);
        }
        let Some(input) = inputs.into_iter().next() else {
            bail!("fake quantization without input")
        };
        Ok(tvec!(self.run(input)?))
    }
}

impl TypedOp for FakeQuant {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(inputs[0].without_value()))
    }

    fn axes_mapping(
        &self,
        inputs: &[&TypedFact],
        outputs: &[&TypedFact],
    ) -> TractResult<AxesMapping> {
        if self.layout_free {
            AxesMapping::natural(inputs, outputs)
        } else {
            AxesMapping::disconnected(inputs, outputs)
        }
    }

    fn change_axes(
        &self,
        model: &TypedModel,
        node: &TypedNode,
        _io: InOut,
        change: &AxisOp,
    ) -> TractResult<Option<AxisChangeConsequence>> {
        Ok(self
            .layout_free
            .then(|| AxisChangeConsequence::new(model, node, None, change)))
    }
    as_op!();
}

/// The last result of a weight or bias site and what it was computed from: the parameters, the bias
/// values, and a weight's rounded values (compared by allocation: `Params` shares them, so the
/// oracle's hot path never compares a whole weight).
type WeightCache = Mutex<Option<(QParams, Vec<f32>, Option<Arc<[f32]>>, TValue)>>;

/// The last inputs of a memoized node and its outputs for them.
type MemoCache = Mutex<Option<(TVec<TValue>, TVec<TValue>)>>;

/// Wraps an optimized node whose inputs are all constants or derived from weight and bias sites
/// (tract's kernel reshapes and packing): evaluates it again only when one of those inputs changed.
/// Inputs are compared by identity: the weight sites hand out the same `Arc` while their parameters
/// stay, and the cache holds its inputs so that an identical pointer means identical contents.
#[derive(Clone, Debug)]
struct Memo {
    inner: Box<dyn TypedOp>,
    cache: Arc<MemoCache>,
}

impl PartialEq for Memo {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.cache, &other.cache)
    }
}

impl Eq for Memo {}

impl Op for Memo {
    fn name(&self) -> StaticName {
        format!("LapqMemo({})", self.inner.name()).into()
    }
    op_as_typed_op!();
}

impl EvalOp for Memo {
    not_out_of_plan!();

    fn eval(&self, ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| anyhow!("memo cache poisoned"))?;
        if let Some((seen, outputs)) = cache.as_ref()
            && seen.len() == inputs.len()
            && seen.iter().zip(&inputs).all(|(a, b)| {
                matches!((a.as_arc_tensor(), b.as_arc_tensor()), (Some(a), Some(b)) if Arc::ptr_eq(a, b))
            })
        {
            return Ok(outputs.clone());
        }
        let outputs = self.inner.eval(ctx, inputs.clone())?;
        *cache = Some((inputs, outputs.clone()));
        Ok(outputs)
    }
}

impl TypedOp for Memo {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        self.inner.output_facts(inputs)
    }
    as_op!();
}

/// Memoizes, in an optimized model, every node computed from weight and bias sites (and constants)
/// alone, so that a run after a change to activation parameters does no weight work.
pub(super) fn memoize_parameter_paths(model: &mut TypedModel) -> Result<()> {
    let order = model.eval_order()?;
    let mut derived = vec![false; model.nodes().len()];
    for n in order {
        let node = model.node(n);
        if let Some(fq) = node.op_as::<FakeQuant>() {
            derived[n] = fq.cache.is_some();
            continue;
        }
        let inputs_fixed = node.inputs.iter().all(|i| {
            derived[i.node]
                || model
                    .node(i.node)
                    .op_is::<tract_onnx::tract_hir::tract_core::ops::konst::Const>()
        });
        if node.inputs.is_empty() || !inputs_fixed || !node.inputs.iter().any(|i| derived[i.node]) {
            continue;
        }
        derived[n] = true;
        let inner = node.op.clone();
        model.node_mut(n).op = Box::new(Memo {
            inner,
            cache: Arc::default(),
        });
    }
    Ok(())
}

#[derive(Clone, Debug)]
struct FakeQuantExpansion(FakeQuant);

impl Expansion for FakeQuantExpansion {
    fn name(&self) -> StaticName {
        "LapqFakeQuant".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        s.equals(&outputs[0].shape, &inputs[0].shape)?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, self.0.clone(), inputs)
    }

    /// Never evaluated while tract analyses or folds the graph: its value depends on the table.
    fn runs_out_of_plan(&self) -> bool {
        false
    }
}

/// Outputs of one sample: per model output, its shape and values.
pub type SampleOutputs = Vec<(Vec<usize>, Vec<f32>)>;

/// The quantized network, built once.
pub struct QuantModel {
    plans: Plans,
    /// Plans optimized for this model, its heads and tails.
    builds: Arc<AtomicUsize>,
    table: Arc<Table>,
    /// The fake-quantization node of each slot in the prepared model.
    fq_nodes: Vec<usize>,
    /// The head and tail models of every slot focused on so far on samples of one shape (their plans
    /// are built once). With several shapes nothing is kept: measured on a sentence encoder with
    /// eight sequence lengths, keeping them grew memory without bound (24 GB within 90 s), while
    /// splitting again on each focus stays at the model's own size.
    tails: Mutex<HashMap<usize, Arc<TailModels>>>,
    /// Slots whose tail tract cannot build alone (see [`Tail`]): refocusing on them runs nothing.
    whole: Mutex<HashSet<usize>>,
}

/// A slot's split of the network: the head computes the values entering the part downstream of the
/// slot (only what lies upstream runs), the tail computes the outputs from those values.
struct TailModels {
    head: Plans,
    tail: Plans,
}

/// Where weight site `w` (named `name`) enters tract's graph: the outlet its readers read, and
/// their inlets.
fn weight_inlets(
    model: &InferenceModel,
    sites: &Sites,
    w: usize,
    name: &str,
) -> Result<(OutletId, Vec<InletId>)> {
    let inlets = sites
        .weight_readers
        .get(w)
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .map(|(node, k)| {
            let id = model
                .node_id_by_name(node)
                .with_context(|| format!("node '{node}' not in tract's graph"))?;
            Ok(InletId::new(id, *k))
        })
        .collect::<Result<Vec<_>>>()?;
    let first = inlets
        .first()
        .with_context(|| format!("weight '{name}' has no reader"))?;
    let outlet = *model
        .node(first.node)
        .inputs
        .get(first.slot)
        .with_context(|| format!("weight '{name}' is not an input of its reader"))?;
    Ok((outlet, inlets))
}

impl QuantModel {
    /// Loads the float ONNX model at `path` and inserts fake quantization at every site.
    pub fn load(path: &std::path::Path, sites: &Sites) -> Result<QuantModel> {
        let mut model = load_onnx(path)?;
        let table = Arc::new(Table {
            enabled: AtomicBool::new(true),
            observe_disabled: AtomicBool::new(false),
            float: RwLock::new(vec![]),
            activations: sites.activations.len(),
            weights: sites.weights.len(),
            betas: sites.biases.iter().map(|b| b.beta).collect(),
            params: RwLock::new(None),
            observer: RwLock::new(None),
        });
        let activations = sites.activations.len();
        let op = |slot: usize| {
            expand(FakeQuantExpansion(FakeQuant {
                slot,
                table: table.clone(),
                layout_free: slot < activations,
                cache: (slot >= activations).then(Arc::default),
            }))
        };
        let mut fq_nodes = vec![];
        for (slot, name) in sites.activations.iter().chain(&sites.weights).enumerate() {
            let (outlet, successors) = match slot.checked_sub(activations) {
                None => {
                    let outlet = find_outlet(&model, name)?;
                    (outlet, model.outlet_successors(outlet).to_vec())
                }
                Some(w) => weight_inlets(&model, sites, w, name)?,
            };
            let fq = model.add_node(
                format!("lapq.fq.{slot}.{name}"),
                op(slot),
                tvec!(InferenceFact::default()),
            )?;
            fq_nodes.push(fq);
            model.add_edge(outlet, InletId::new(fq, 0))?;
            for inlet in successors {
                model.add_edge(OutletId::new(fq, 0), inlet)?;
            }
            let outputs: Vec<OutletId> = model
                .output_outlets()?
                .iter()
                .map(|&o| if o == outlet { OutletId::new(fq, 0) } else { o })
                .collect();
            model.select_output_outlets(&outputs)?;
        }
        let first_bias = sites.activations.len() + sites.weights.len();
        for (k, b) in sites.biases.iter().enumerate() {
            let node = model
                .node_id_by_name(&b.node)
                .with_context(|| format!("node '{}' not in tract's graph", b.node))?;
            let source = *model
                .node(node)
                .inputs
                .get(b.slot)
                .with_context(|| format!("node '{}' has no input {}", b.node, b.slot))?;
            let fq = model.add_node(
                format!("lapq.fq.bias.{k}.{}", b.node),
                op(first_bias + k),
                tvec!(InferenceFact::default()),
            )?;
            fq_nodes.push(fq);
            model.add_edge(source, InletId::new(fq, 0))?;
            model.add_edge(OutletId::new(fq, 0), InletId::new(node, b.slot))?;
        }
        for k in 0..model.output_outlets()?.len() {
            model.set_output_fact(k, InferenceFact::default())?;
        }
        let builds = Arc::new(AtomicUsize::new(0));
        Ok(QuantModel {
            plans: Plans::new(model, builds.clone()),
            builds,
            table,
            fq_nodes,
            tails: Mutex::new(HashMap::new()),
            whole: Mutex::new(HashSet::new()),
        })
    }

    /// Number of tract plans optimized for this model so far (each costs a full optimization; parameter
    /// changes must never add one).
    pub fn plans_built(&self) -> usize {
        self.builds.load(Ordering::SeqCst)
    }

    /// Sets the parameters every later run uses. Never rebuilds anything.
    pub fn set_params(&self, params: &Params) -> Result<()> {
        ensure!(
            params.activations.len() == self.table.activations
                && params.weights.len() == self.table.weights
                && params.biases.len() == self.table.betas.len()
                && params.bias_values.len() == self.table.betas.len(),
            "parameters do not match the oracle's sites"
        );
        *self.table.write()? = Some(params.clone());
        Ok(())
    }

    /// Runs `samples` through the network once, starting from `params`: every activation site shows
    /// its input over all samples (computed with every upstream site already quantized with the
    /// parameters the observer chose) to `observer`, which may choose new parameters for it. Returns
    /// the parameters after the pass. The samples run in `parts` equal parts, one thread each (one
    /// part when they do not divide evenly); the observer still sees each site once, its values in
    /// sample order, so the result does not depend on `parts`.
    pub fn calibrate_sequentially(
        &self,
        params: &Params,
        samples: &[Sample],
        observer: Arc<Observer>,
        parts: usize,
    ) -> Result<Params> {
        if let Some(odd) = samples
            .iter()
            .find(|s| shape_key(s) != shape_key(&samples[0]))
        {
            bail!(
                "the layer-wise calibration runs its samples as one batch, but sample '{}' differs in \
                 shape from sample '{}' (pad the calibration samples to one length, or use --method mse)",
                odd.origin,
                samples[0].origin
            );
        }
        // Equal parts run the same plan, so every part meets the sites in the same order.
        let parts = match parts.min(samples.len()) {
            k if k > 1 && samples.len().is_multiple_of(k) => k,
            _ => 1,
        };
        let rendezvous = Arc::new(Rendezvous::new(parts, observer));
        let groups: Vec<(usize, std::ops::Range<usize>)> = (0..parts)
            .map(|k| {
                (
                    k,
                    k * samples.len() / parts..(k + 1) * samples.len() / parts,
                )
            })
            .collect();
        self.set_params(params)?;
        let meet = rendezvous.clone();
        self.table.set_observer(Some(Arc::new(
            move |slot: usize, data: &[f32], dims: &[usize]| meet.meet(slot, data, dims),
        )))?;
        // One thread per part: parts wait for each other at every site.
        let result: Result<()> = std::thread::scope(|scope| {
            let handles: Vec<_> = groups
                .iter()
                .map(|(party, range)| {
                    let rendezvous = &rendezvous;
                    scope.spawn(move || -> Result<()> {
                        PARTY.set(*party);
                        let run = (|| {
                            let (facts, inputs, _) = batch_inputs(&samples[range.clone()])?;
                            self.plans
                                .get(&facts)?
                                .run(inputs)
                                .map_err(|e| anyhow!("running the quantized model: {e:#}"))
                        })();
                        rendezvous.leave();
                        run.map(drop)
                    })
                })
                .collect();
            handles.into_iter().try_for_each(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("an oracle worker panicked")))
            })
        });
        self.table.set_observer(None)?;
        result?;
        self.table
            .read()?
            .clone()
            .context("quantization parameters were never set")
    }

    /// Runs `samples` through this network and through `float` (a second load of the same model and
    /// sites, which runs in float) side by side, starting from `params` as
    /// [`QuantModel::calibrate_sequentially`] does. At every activation site in `paired`, `observer`
    /// sees the site's input on both sides over all samples, with every upstream change already
    /// applied on the quantized side, and its update applies from there on. Returns the parameters
    /// after the pass. The float side hands over one site's tensor at a time; sites it reaches in
    /// another order are held until the quantized side asks for them.
    pub fn calibrate_paired(
        &self,
        float: &QuantModel,
        params: &Params,
        samples: &[Sample],
        paired: &[bool],
        observer: Arc<PairedObserver>,
        parts: usize,
    ) -> Result<Params> {
        type Site = (usize, Vec<f32>, Vec<usize>);
        let (send, receive) = std::sync::mpsc::sync_channel::<Site>(1);
        let wanted: Arc<[bool]> = paired.into();
        let failure: Arc<Mutex<Option<String>>> = Arc::default();
        let float_side: Arc<Observer> = {
            let wanted = wanted.clone();
            let send = Mutex::new(send);
            Arc::new(move |slot: usize, data: &[f32], dims: &[usize]| {
                if wanted.get(slot).copied().unwrap_or(false)
                    && let Ok(send) = send.lock()
                {
                    // A closed channel means the quantized side has failed; it reports why.
                    let _ = send.send((slot, data.to_vec(), dims.to_vec()));
                }
                None
            })
        };
        let quantized_side: Arc<Observer> = {
            let failure = failure.clone();
            let receive = Mutex::new((receive, HashMap::<usize, Site>::new()));
            Arc::new(move |slot: usize, data: &[f32], dims: &[usize]| {
                if !wanted.get(slot).copied().unwrap_or(false) {
                    return None;
                }
                let found = (|| -> Result<Site> {
                    let mut guard = receive
                        .lock()
                        .map_err(|_| anyhow!("paired pass poisoned"))?;
                    let (receive, held) = &mut *guard;
                    loop {
                        if let Some(site) = held.remove(&slot) {
                            return Ok(site);
                        }
                        let site = receive
                            .recv()
                            .map_err(|_| anyhow!("the float network never reached site {slot}"))?;
                        held.insert(site.0, site);
                    }
                })();
                match found {
                    Ok((_, f, fdims)) if fdims == dims => observer(slot, data, &f, dims),
                    Ok((_, _, fdims)) => {
                        *failure.lock().ok()? = Some(format!(
                            "site {slot} is {dims:?} in the quantized network and {fdims:?} in float"
                        ));
                        None
                    }
                    Err(e) => {
                        *failure.lock().ok()? = Some(format!("{e:#}"));
                        None
                    }
                }
            })
        };
        float.set_quantized(false);
        float.table.observe_disabled.store(true, Ordering::SeqCst);
        let (quantized, float_result) = std::thread::scope(|scope| {
            let float_run = scope
                .spawn(move || float.calibrate_sequentially(params, samples, float_side, parts));
            let quantized = self.calibrate_sequentially(params, samples, quantized_side, parts);
            let float_result = float_run
                .join()
                .unwrap_or_else(|_| Err(anyhow!("the float side panicked")));
            (quantized, float_result)
        });
        float.table.observe_disabled.store(false, Ordering::SeqCst);
        float.set_quantized(true);
        float_result.context("the float side of the paired pass")?;
        if let Some(e) = failure
            .lock()
            .map_err(|_| anyhow!("paired pass poisoned"))?
            .take()
        {
            bail!("paired pass: {e}");
        }
        quantized
    }

    /// Slots (activation sites first, then weights, then biases) whose fake quantization passes its
    /// input through while every other slot quantizes; an empty mask quantizes every slot.
    pub fn set_float_slots(&self, float: Vec<bool>) -> Result<()> {
        ensure!(
            float.is_empty()
                || float.len()
                    == self.table.activations + self.table.weights + self.table.betas.len(),
            "the float mask does not match the oracle's sites"
        );
        *self
            .table
            .float
            .write()
            .map_err(|_| anyhow!("float mask poisoned"))? = float;
        Ok(())
    }

    /// With `false`, every fake quantization passes its input through: the float network.
    pub fn set_quantized(&self, on: bool) {
        self.table.enabled.store(on, Ordering::SeqCst);
    }

    /// Runs every sample (grouped in batches of up to `batch` along axis 0, on all cores) and returns
    /// each sample's outputs in order.
    pub fn run(&self, samples: &[Sample], batch: usize) -> Result<Vec<SampleOutputs>> {
        let groups = batches(samples, batch.max(1));
        let per_group = par_map(&groups, |range| {
            let (facts, inputs, rows) = batch_inputs(&samples[range.clone()])?;
            let plan = self.plans.get(&facts)?;
            let outputs = plan
                .run(inputs)
                .map_err(|e| anyhow!("running the quantized model: {e:#}"))?;
            split_rows(outputs, &rows)
        })?;
        Ok(per_group.into_iter().flatten().collect())
    }

    /// Prepares fast re-evaluation after changes to the parameters of `slot` alone (activation sites
    /// first, then weights, then biases): runs the network once with the current parameters, keeps the
    /// values entering the part downstream of the site, and builds that part alone.
    pub fn tail(&self, slot: usize, samples: &[Sample], batch: usize) -> Result<Tail> {
        let whole = || {
            self.whole
                .lock()
                .map_err(|_| anyhow!("tail cache poisoned"))
        };
        if whole()?.contains(&slot) {
            return Ok(Tail { part: None });
        }
        let models = self.tail_models(slot)?;
        let groups = batches(samples, batch.max(1));
        let cache = par_map(&groups, |range| {
            let (facts, inputs, rows) = batch_inputs(&samples[range.clone()])?;
            let values = models
                .head
                .get(&facts)?
                .run(inputs)
                .map_err(|e| anyhow!("running the quantized model: {e:#}"))?;
            Ok((values, rows))
        })?;
        for (values, _) in &cache {
            if models.tail.get(&value_facts(values)).is_err() {
                whole()?.insert(slot);
                return Ok(Tail { part: None });
            }
        }
        if models.head.len() == 1 {
            self.tails
                .lock()
                .map_err(|_| anyhow!("tail cache poisoned"))?
                .insert(slot, models.clone());
        }
        Ok(Tail {
            part: Some((models, cache)),
        })
    }

    /// The head and tail models of `slot`: the cached ones, or split anew (`tail` caches them).
    fn tail_models(&self, slot: usize) -> Result<Arc<TailModels>> {
        let tails = self
            .tails
            .lock()
            .map_err(|_| anyhow!("tail cache poisoned"))?;
        if let Some(t) = tails.get(&slot) {
            return Ok(t.clone());
        }
        drop(tails);
        let template = self.plans.kept()?;
        let focus = *self.fq_nodes.get(slot).context("no such site")?;
        let order = template.eval_order()?;
        let sources: Vec<usize> = template.input_outlets()?.iter().map(|o| o.node).collect();
        let mut dynamic = vec![false; template.nodes().len()];
        for &n in &order {
            dynamic[n] =
                sources.contains(&n) || template.node(n).inputs.iter().any(|i| dynamic[i.node]);
        }
        let mut downstream = vec![false; template.nodes().len()];
        downstream[focus] = true;
        for &n in &order {
            if template.node(n).inputs.iter().any(|i| downstream[i.node]) {
                downstream[n] = true;
            }
        }
        // The tail: everything downstream, plus the constant subgraphs (weights) feeding it.
        let mut keep = downstream.clone();
        for &n in order.iter().rev() {
            if keep[n] {
                for i in &template.node(n).inputs {
                    if !dynamic[i.node] {
                        keep[i.node] = true;
                    }
                }
            }
        }
        let outputs = template.output_outlets()?.to_vec();
        let mut boundary: Vec<OutletId> = vec![];
        for &n in &order {
            if keep[n] {
                for &i in &template.node(n).inputs {
                    if !keep[i.node] && !boundary.contains(&i) {
                        boundary.push(i);
                    }
                }
            }
        }
        for &o in &outputs {
            if !keep[o.node] && !boundary.contains(&o) {
                boundary.push(o);
            }
        }
        let mut tail = InferenceModel::default();
        let mut map: HashMap<OutletId, OutletId> = HashMap::new();
        for (k, &o) in boundary.iter().enumerate() {
            map.insert(
                o,
                tail.add_source(format!("lapq.boundary.{k}"), InferenceFact::default())?,
            );
        }
        for &n in order.iter().filter(|&&n| keep[n]) {
            let node = template.node(n);
            let facts = node.outputs.iter().map(|o| o.fact.clone()).collect();
            let id = tail.add_node(node.name.clone(), node.op.clone(), facts)?;
            for (slot, i) in node.inputs.iter().enumerate() {
                tail.add_edge(map[i], InletId::new(id, slot))?;
            }
            for k in 0..node.outputs.len() {
                map.insert(OutletId::new(n, k), OutletId::new(id, k));
            }
        }
        tail.select_output_outlets(&outputs.iter().map(|o| map[o]).collect::<Vec<_>>())?;
        let mut head = template.clone();
        head.select_output_outlets(&boundary)?;
        for k in 0..boundary.len() {
            head.set_output_fact(k, InferenceFact::default())?;
        }
        let models = Arc::new(TailModels {
            head: Plans::new(head, self.builds.clone()),
            tail: Plans::new(tail, self.builds.clone()),
        });
        Ok(models)
    }

    /// Re-evaluates after a change to the tail's site only: runs the cached boundary through the tail.
    ///
    /// The result equals `run` as long as no other site's parameters changed since `tail` was built.
    pub fn run_tail(&self, tail: &Tail) -> Result<Vec<SampleOutputs>> {
        let (models, cache) = tail
            .part
            .as_ref()
            .context("the site's tail cannot run alone: run the whole network")?;
        let per_group = par_map(cache, |(values, rows)| {
            let plan = models.tail.get(&value_facts(values))?;
            let outputs = plan
                .run(values.clone())
                .map_err(|e| anyhow!("running the quantized tail: {e:#}"))?;
            split_rows(outputs, rows)
        })?;
        Ok(per_group.into_iter().flatten().collect())
    }
}

/// The network downstream of one site and the values entering it, per batch.
pub struct Tail {
    /// `None` when tract cannot build the downstream part alone from the values entering it (a
    /// Reshape whose shape is computed upstream of the site, from a Shape of an input): then the
    /// whole network runs for each evaluation.
    part: Option<(Arc<TailModels>, Vec<BoundaryBatch>)>,
}

/// The values entering a tail for one batch, and the rows of each sample in it.
type BoundaryBatch = (TVec<TValue>, Vec<usize>);

impl Tail {
    /// Whether evaluations run the whole network (see `part`).
    pub fn whole(&self) -> bool {
        self.part.is_none()
    }
}

/// The concrete shape and element type of an input.
type InputFact = (Vec<usize>, DatumType);

fn value_facts(values: &[TValue]) -> Vec<InputFact> {
    values
        .iter()
        .map(|v| (v.shape().to_vec(), v.datum_type()))
        .collect()
}

/// Maps `f` over `items` on all cores, keeping the order.
fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> Result<R> + Sync) -> Result<Vec<R>> {
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(items.len())
        .max(1);
    let f = &f;
    let results: Vec<Result<Vec<(usize, R)>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                scope.spawn(move || -> Result<Vec<(usize, R)>> {
                    items
                        .iter()
                        .enumerate()
                        .skip(w)
                        .step_by(workers)
                        .map(|(i, item)| Ok((i, f(item)?)))
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("an oracle worker panicked")))
            })
            .collect()
    });
    let mut all: Vec<(usize, R)> = vec![];
    for r in results {
        all.extend(r?);
    }
    all.sort_by_key(|(i, _)| *i);
    Ok(all.into_iter().map(|(_, r)| r).collect())
}

/// The samples of one batch concatenated along axis 0: input facts, tensors, and each sample's rows.
fn batch_inputs(samples: &[Sample]) -> Result<(Vec<InputFact>, TVec<TValue>, Vec<usize>)> {
    let rows: Vec<usize> = samples
        .iter()
        .map(|s| s.inputs[0].dims.first().copied().unwrap_or(1))
        .collect();
    let mut facts = vec![];
    let mut inputs: TVec<TValue> = tvec![];
    for (k, t) in samples[0].inputs.iter().enumerate() {
        let mut dims = t.dims.clone();
        if let Some(d0) = dims.first_mut() {
            *d0 = samples
                .iter()
                .map(|s| s.inputs[k].dims.first().copied().unwrap_or(1))
                .sum();
        }
        let tensor = match &t.values {
            Values::F32(_) => {
                let v: Vec<f32> = samples
                    .iter()
                    .flat_map(|s| s.inputs[k].as_f32().unwrap_or(&[]).iter().copied())
                    .collect();
                Tensor::from_shape(&dims, &v)?
            }
            Values::I64(_) => {
                let v: Vec<i64> = samples
                    .iter()
                    .flat_map(|s| match &s.inputs[k].values {
                        Values::I64(v) => v.clone(),
                        Values::F32(_) => vec![],
                    })
                    .collect();
                Tensor::from_shape(&dims, &v)?
            }
        };
        facts.push((dims, tensor.datum_type()));
        inputs.push(tensor.into());
    }
    Ok((facts, inputs, rows))
}

/// Splits batch outputs back into per-sample outputs (outputs whose axis 0 is not the batch are
/// given whole to every sample).
fn split_rows(outputs: TVec<TValue>, rows: &[usize]) -> Result<Vec<SampleOutputs>> {
    let mut per_sample: Vec<SampleOutputs> = vec![vec![]; rows.len()];
    let total: usize = rows.iter().sum();
    for out in outputs {
        let out = out.cast_to::<f32>()?.into_owned();
        let view = out.try_as_plain_ram()?;
        let values = view.as_slice::<f32>()?;
        let shape = out.shape();
        let per_row = if shape.first() == Some(&total) && total > 0 {
            values.len() / total
        } else {
            0
        };
        let mut at = 0;
        for (s, &r) in rows.iter().enumerate() {
            let (dims, v) = if per_row > 0 {
                let mut d = shape.to_vec();
                d[0] = r;
                (d, values[at..at + r * per_row].to_vec())
            } else {
                (shape.to_vec(), values.to_vec())
            };
            at += r * per_row;
            per_sample[s].push((dims, v));
        }
    }
    Ok(per_sample)
}

/// A sample's input shapes beyond axis 0: samples with equal keys batch together.
fn shape_key(s: &Sample) -> Vec<Vec<usize>> {
    s.inputs
        .iter()
        .map(|t| t.dims.get(1..).unwrap_or(&[]).to_vec())
        .collect()
}

/// Consecutive samples with equal input shapes (beyond axis 0), at most `batch` per group.
fn batches(samples: &[Sample], batch: usize) -> Vec<std::ops::Range<usize>> {
    let mut groups = vec![];
    let mut start = 0;
    for i in 1..=samples.len() {
        if i == samples.len()
            || i - start == batch
            || shape_key(&samples[i]) != shape_key(&samples[start])
        {
            groups.push(start..i);
            start = i;
        }
    }
    groups
}
