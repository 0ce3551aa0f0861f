//! The only module that uses tract. `FloatModel` runs the float network and shows the caller the
//! tensors it asks for, by their ONNX names (statistics). `Oracle` runs the quantized network, built
//! once with parameters read at run time, and compares it with the float network (the loss LAPQ
//! minimises); `Oracle::focus` re-runs only what lies downstream of one site.

mod quant;

pub use quant::{
    BiasSite, Observer, PairedObserver, QuantModel, SampleOutputs, Sites, Tail, Update,
};

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::{Context, Result, anyhow};
use tract_onnx::prelude::*;

use crate::data::{Sample, Values};

type Plan = Arc<TypedRunnableModel>;

/// The float model loaded once, with chosen tensors ("taps") exposed as outputs.
pub struct FloatModel {
    plans: Plans,
    /// Per tap: `Ok(output index)` in the runnable model, or `Err(input index)` for a model input.
    taps: Vec<std::result::Result<usize, usize>>,
}

impl FloatModel {
    /// Loads the ONNX model at `path` (external data beside it) and exposes `taps` (ONNX tensor names)
    /// before tract optimizes any wire away. Stale or symbolic `value_info` and output shapes are ignored.
    ///
    /// The model is loaded again from `path` for each new input shape, so that tract holds one copy of
    /// the weights (its optimized plan's), not a second one in a template.
    pub fn load(path: &std::path::Path, taps: &[String]) -> Result<FloatModel> {
        let (model, tap_ix) = tapped(path, taps)?;
        let (path, taps) = (path.to_path_buf(), taps.to_vec());
        let reload = move || tapped(&path, &taps).map(|(m, _)| m);
        Ok(FloatModel {
            plans: Plans::reloading(model, Box::new(reload)),
            taps: tap_ix,
        })
    }

    /// Runs every sample, on all cores, and calls `visit(acc, tap, dims, values)` for every float tap.
    ///
    /// Each worker folds into its own accumulator from `init`; the accumulators are returned for the
    /// caller to merge. `tick` is called once per finished sample.
    pub fn observe<A, I, V>(
        &self,
        samples: &[Sample],
        init: I,
        visit: V,
        tick: &(dyn Fn() + Sync),
    ) -> Result<Vec<A>>
    where
        A: Send,
        I: Fn() -> A + Sync,
        V: Fn(&mut A, usize, &[usize], &[f32]) + Sync,
    {
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(samples.len())
            .max(1);
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|w| {
                    let (init, visit) = (&init, &visit);
                    scope.spawn(move || -> Result<A> {
                        let mut acc = init();
                        for sample in samples.iter().skip(w).step_by(workers) {
                            self.run_one(sample, &mut acc, visit).with_context(|| {
                                format!("running the float model on {}", sample.origin)
                            })?;
                            tick();
                        }
                        Ok(acc)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| anyhow!("a calibration worker panicked"))?
                })
                .collect()
        })
    }

    fn run_one<A>(
        &self,
        sample: &Sample,
        acc: &mut A,
        visit: &(impl Fn(&mut A, usize, &[usize], &[f32]) + Sync),
    ) -> Result<()> {
        let plan = self.plans.get(&input_facts(sample))?;
        let inputs: TVec<TValue> = sample
            .inputs
            .iter()
            .map(|t| {
                Ok(match &t.values {
                    Values::F32(v) => Tensor::from_shape(&t.dims, v)?,
                    Values::I64(v) => Tensor::from_shape(&t.dims, v)?,
                }
                .into())
            })
            .collect::<Result<_>>()?;
        let outputs = plan.run(inputs.clone()).map_err(|e| anyhow!("{e:#}"))?;
        for (k, tap) in self.taps.iter().enumerate() {
            let value = match tap {
                Ok(o) => &outputs[*o],
                Err(i) => &inputs[*i],
            };
            if value.datum_type() == f32::datum_type() {
                let view = value.try_as_plain_ram()?;
                visit(acc, k, value.shape(), view.as_slice::<f32>()?);
            }
        }
        Ok(())
    }
}

/// The outputs of the ONNX model at `path` for every sample, in order (one sample per run, on all
/// cores).
pub fn outputs(path: &std::path::Path, samples: &[Sample]) -> Result<Vec<SampleOutputs>> {
    let sites = Sites::default();
    let model = QuantModel::load(path, &sites)?;
    model.set_quantized(false);
    model.set_params(&empty_params(&sites))?;
    model.run(samples, 1)
}

/// The concrete shape and element type of each input of a sample.
fn input_facts(sample: &Sample) -> Vec<(Vec<usize>, DatumType)> {
    sample
        .inputs
        .iter()
        .map(|t| {
            let dt = match t.values {
                Values::F32(_) => f32::datum_type(),
                Values::I64(_) => i64::datum_type(),
            };
            (t.dims.clone(), dt)
        })
        .collect()
}

/// The model at `path` with `taps` as its outputs, and where each tap is: `Ok(output index)`, or
/// `Err(input index)` for a model input.
fn tapped(
    path: &std::path::Path,
    taps: &[String],
) -> Result<(InferenceModel, Vec<std::result::Result<usize, usize>>)> {
    let mut model = load_onnx(path)?;
    let inputs = model.input_outlets()?.to_vec();
    let mut outlets = vec![];
    let mut tap_ix = vec![];
    for name in taps {
        let outlet = find_outlet(&model, name)?;
        match inputs.iter().position(|&i| i == outlet) {
            Some(k) => tap_ix.push(Err(k)),
            None => {
                tap_ix.push(Ok(outlets.len()));
                outlets.push(outlet);
            }
        }
    }
    model.select_output_outlets(&outlets)?;
    for k in 0..outlets.len() {
        model.set_output_fact(k, InferenceFact::default())?;
    }
    Ok((model, tap_ix))
}

/// Parses the ONNX file at `path` with tract, ignoring stale or symbolic `value_info` and output shapes.
fn load_onnx(path: &std::path::Path) -> Result<InferenceModel> {
    tract_onnx::onnx()
        .with_ignore_output_shapes(true)
        .with_ignore_value_info(true)
        .model_for_path(path)
        .map_err(|e| anyhow!("tract cannot load the model: {e:#}"))
}

/// The outlet of an ONNX tensor: a node output's label, or a source or constant's node name.
fn find_outlet(model: &InferenceModel, name: &str) -> Result<OutletId> {
    model
        .find_outlet_label(name)
        .or_else(|| {
            model
                .node_by_name(name)
                .ok()
                .map(|n| OutletId::new(n.id, 0))
        })
        .with_context(|| format!("tensor '{name}' cannot be found in tract's graph"))
}

/// A model prepared once, and its optimized plans by concrete input shapes (a symbolic batch or size
/// gets one plan per shape seen).
struct Plans {
    template: Template,
    builds: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    cache: Mutex<HashMap<Vec<Vec<usize>>, Plan>>,
}

/// Where each new plan starts from.
enum Template {
    /// A model kept in memory (derived models, heads and tails, are cut from it).
    Kept(InferenceModel),
    /// A model loaded again for each new plan (the first from `spare`): tract then holds the weights
    /// once per plan instead of once more in a template.
    Reloaded {
        spare: Mutex<Option<InferenceModel>>,
        load: Box<dyn Fn() -> Result<InferenceModel> + Send + Sync>,
    },
}

impl Plans {
    fn new(
        template: InferenceModel,
        builds: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) -> Plans {
        Plans {
            template: Template::Kept(template),
            builds,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn reloading(
        first: InferenceModel,
        load: Box<dyn Fn() -> Result<InferenceModel> + Send + Sync>,
    ) -> Plans {
        Plans {
            template: Template::Reloaded {
                spare: Mutex::new(Some(first)),
                load,
            },
            builds: Default::default(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Plans built so far (one per input shape).
    fn len(&self) -> usize {
        self.cache.lock().map_or(0, |c| c.len())
    }

    /// The template kept in memory.
    fn kept(&self) -> Result<&InferenceModel> {
        match &self.template {
            Template::Kept(m) => Ok(m),
            Template::Reloaded { .. } => Err(anyhow!("internal: the model is not kept in memory")),
        }
    }

    fn get(&self, inputs: &[(Vec<usize>, DatumType)]) -> Result<Plan> {
        let key: Vec<Vec<usize>> = inputs.iter().map(|(d, _)| d.clone()).collect();
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| anyhow!("a worker panicked"))?;
        if let Some(p) = cache.get(&key) {
            return Ok(p.clone());
        }
        let mut model = match &self.template {
            Template::Kept(m) => m.clone(),
            Template::Reloaded { spare, load } => {
                let first = spare
                    .lock()
                    .map_err(|_| anyhow!("a worker panicked"))?
                    .take();
                match first {
                    Some(m) => m,
                    None => load()?,
                }
            }
        };
        for (k, (dims, dt)) in inputs.iter().enumerate() {
            model.set_input_fact(k, InferenceFact::dt_shape(*dt, dims))?;
        }
        let mut optimized = model.into_optimized().map_err(|e| {
            anyhow!("tract cannot optimize the model for input shapes {key:?}: {e:#}")
        })?;
        quant::memoize_parameter_paths(&mut optimized)?;
        let plan = optimized
            .into_runnable()
            .map_err(|e| anyhow!("tract cannot plan the model for input shapes {key:?}: {e:#}"))?;
        self.builds
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        cache.insert(key, plan.clone());
        Ok(plan)
    }
}

/// How close the quantized network is to the float one on the oracle's samples.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Score {
    pub loss: f64,
    /// Top-1 agreement of the first output (classifiers only).
    pub agreement: Option<f64>,
}

/// The loss oracle: the quantized network over a fixed calibration subset, compared with the float
/// network's outputs (computed once).
pub struct Oracle {
    model: QuantModel,
    samples: Vec<Sample>,
    reference: Vec<SampleOutputs>,
    labels: Option<Vec<usize>>,
    /// The reference summarised per channel, for `LossKind::Dense` (the loss is KL divergence or
    /// cross-entropy without it).
    dense: Option<crate::calib::DenseReference>,
    batch: usize,
    /// Evaluations use the first `active` samples.
    active: std::sync::atomic::AtomicUsize,
}

impl Oracle {
    /// Builds the quantized network once and computes the float reference outputs of `samples`.
    ///
    /// The loss is cross-entropy when `labels` are given (one per sample), KL divergence of the softmax
    /// for a single `[N, K]` output, and `LossKind::Dense` over all outputs otherwise.
    pub fn new(
        path: &std::path::Path,
        sites: &Sites,
        samples: Vec<Sample>,
        labels: Option<Vec<usize>>,
        batch: usize,
    ) -> Result<Oracle> {
        if let Some(l) = &labels {
            anyhow::ensure!(
                l.len() == samples.len(),
                "{} labels for {} samples",
                l.len(),
                samples.len()
            );
        }
        let model = QuantModel::load(path, sites)?;
        model.set_quantized(false);
        model.set_params(&empty_params(sites))?;
        let reference = model.run(&samples, batch)?;
        model.set_quantized(true);
        let classifier = reference
            .first()
            .is_some_and(|o| o.len() == 1 && o[0].0.len() == 2 && o[0].0[1] > 1);
        let dense = match (classifier, &labels) {
            (true, Some(l)) => {
                let classes = reference[0][0].0[1];
                if let Some((i, &c)) = l.iter().enumerate().find(|(_, c)| **c >= classes) {
                    anyhow::bail!(
                        "label {c} of sample {} is not a class of the model's {classes} outputs",
                        samples[i].origin
                    );
                }
                None
            }
            (true, None) => None,
            (false, Some(_)) => anyhow::bail!(
                "labels were given, but the model's output is not one [N, classes] tensor"
            ),
            (false, None) => Some(crate::calib::DenseReference::new(&reference)),
        };
        Ok(Oracle {
            model,
            samples,
            reference,
            labels,
            dense,
            batch,
            active: std::sync::atomic::AtomicUsize::new(usize::MAX),
        })
    }

    /// The quantized network (e.g. to switch fake quantization off for a timing baseline).
    pub fn model(&self) -> &QuantModel {
        &self.model
    }

    /// Which loss this oracle computes.
    pub fn kind(&self) -> crate::calib::LossKind {
        use crate::calib::LossKind;
        match (&self.dense, &self.labels) {
            (Some(_), _) => LossKind::Dense,
            (None, Some(_)) => LossKind::CrossEntropy,
            (None, None) => LossKind::KlSoftmax,
        }
    }

    /// Later losses, outputs and tails use the first `n` samples only (at least one; all of them
    /// until this is called).
    pub fn use_samples(&self, n: usize) {
        self.active
            .store(n.max(1), std::sync::atomic::Ordering::SeqCst);
    }

    /// The samples evaluations use.
    pub fn active_samples(&self) -> &[Sample] {
        let n = self.active.load(std::sync::atomic::Ordering::SeqCst);
        &self.samples[..n.min(self.samples.len())]
    }

    /// The float network's outputs, per sample.
    pub fn reference(&self) -> &[SampleOutputs] {
        &self.reference
    }

    /// The quantized network's outputs with `params`, per sample.
    pub fn outputs(&self, params: &crate::calib::Params) -> Result<Vec<SampleOutputs>> {
        self.model.set_params(params)?;
        self.model.run(self.active_samples(), self.batch)
    }

    /// The loss and, for a classifier, the top-1 agreement with the float network, with `params`.
    pub fn score(&self, params: &crate::calib::Params) -> Result<Score> {
        let outputs = self.outputs(params)?;
        let n = outputs.len();
        let pairs: Option<Vec<_>> = self.reference[..n]
            .iter()
            .zip(&outputs)
            .map(|(f, q)| {
                let (f, q) = (f.first()?, q.first()?);
                Some(((&f.0[..], &f.1[..]), (&q.0[..], &q.1[..])))
            })
            .collect();
        let agreement = pairs.and_then(|p| crate::calib::top1_agreement(&p));
        Ok(Score {
            loss: self.loss_of(&outputs),
            agreement,
        })
    }

    /// The mean loss over the samples with `params`.
    pub fn loss(&self, params: &crate::calib::Params) -> Result<f64> {
        let outputs = self.outputs(params)?;
        Ok(self.loss_of(&outputs))
    }

    /// LAPQ's layer-wise pass over the first `n` samples (on all cores), each activation site's
    /// parameters chosen by `observer` from its input over all of them, with everything upstream
    /// already quantized.
    pub fn calibrate_sequentially(
        &self,
        params: &crate::calib::Params,
        n: usize,
        observer: std::sync::Arc<Observer>,
    ) -> Result<crate::calib::Params> {
        let n = n.clamp(1, self.samples.len().max(1));
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        self.model
            .calibrate_sequentially(params, &self.samples[..n], observer, cores)
    }

    /// Prepares cheap evaluations of parameters that differ from `params` at `slot` only (activation
    /// sites first, then weights, then biases): the network upstream of the site runs once, now.
    pub fn focus(&self, slot: usize, params: &crate::calib::Params) -> Result<quant::Tail> {
        self.model.set_params(params)?;
        self.model.tail(slot, self.active_samples(), self.batch)
    }

    /// The loss with `params`, which must equal the parameters `tail` was prepared with everywhere but
    /// at its site; runs only the network downstream of the site (the whole network where that part
    /// cannot run alone, see [`quant::Tail`]).
    pub fn loss_in(&self, tail: &quant::Tail, params: &crate::calib::Params) -> Result<f64> {
        if tail.whole() {
            return self.loss(params);
        }
        self.model.set_params(params)?;
        let outputs = self.model.run_tail(tail)?;
        Ok(self.loss_of(&outputs))
    }

    fn loss_of(&self, outputs: &[SampleOutputs]) -> f64 {
        use crate::calib::{cross_entropy, kl_softmax};
        if let Some(dense) = &self.dense {
            return dense.loss(&self.reference, outputs);
        }
        let mut total = 0.0;
        let mut rows = 0usize;
        for (s, (q, f)) in outputs.iter().zip(&self.reference).enumerate() {
            for ((qd, qv), (_, fv)) in q.iter().zip(f) {
                for (r, (qrow, frow)) in qv.chunks(qd[1]).zip(fv.chunks(qd[1])).enumerate() {
                    total += match &self.labels {
                        None => kl_softmax(frow, qrow),
                        Some(labels) => {
                            cross_entropy(qrow, labels.get(s + r).copied().unwrap_or(0))
                        }
                    };
                    rows += 1;
                }
            }
        }
        total / rows.max(1) as f64
    }
}

/// The paired pass of [`QuantModel::calibrate_paired`] over `samples` (on all cores), for the
/// model at `path` with `sites`: the quantized network and the float network, each loaded here.
pub fn calibrate_paired(
    path: &std::path::Path,
    sites: &Sites,
    params: &crate::calib::Params,
    samples: &[Sample],
    paired: &[bool],
    observer: std::sync::Arc<PairedObserver>,
) -> Result<crate::calib::Params> {
    let quantized = QuantModel::load(path, sites)?;
    let float = QuantModel::load(path, sites)?;
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    quantized.calibrate_paired(&float, params, samples, paired, observer, cores)
}

/// Parameters that leave every site unchanged (used while the fake quantization is disabled).
fn empty_params(sites: &Sites) -> crate::calib::Params {
    use crate::calib::{Grid, QParams};
    let unit = QParams {
        grid: Grid::U8_ASYM,
        scale: vec![1.0],
        zero_point: vec![0],
        axis: None,
    };
    crate::calib::Params {
        activations: vec![unit.clone(); sites.activations.len()],
        weights: vec![unit.clone(); sites.weights.len()],
        biases: vec![unit; sites.biases.len()],
        bias_values: vec![vec![]; sites.biases.len()],
        weight_values: vec![],
    }
}
