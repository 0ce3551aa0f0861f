//! Rounding optimisation (`Rounding::Gptq`, `Rounding::Adaround`): once every scale is fixed, the
//! codes of each eligible weight are chosen by `calib::gptq` or `calib::adaround` from the Gram
//! matrix of its layer's input windows, gathered in the statistics pass; biases are then corrected
//! for the chosen codes.

use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use serde::Serialize;

use std::sync::Mutex;

use crate::calib::bias::{Window, WindowMeans, reconstruction_shift};
use crate::calib::gptq::WindowGram;
use crate::calib::reconstruct::{PairedGram, RIDGE};
use crate::calib::{Params, QParams};
use crate::config::{QuantConfig, Rounding};
use crate::ir::{GraphIndex, QuantPlan};
use crate::onnx;
use crate::oracle::Update;
use crate::quantize::Calibrated;

/// What rounding optimisation did: the network's loss on the loss samples with nearest and with
/// optimised codes, which the export kept (the lower), and each layer's own output error.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RoundingReport {
    pub method: Rounding,
    /// Weights whose codes were optimised.
    pub weights: usize,
    pub nearest_loss: f64,
    pub rounded_loss: f64,
    /// Whether the export has the optimised codes.
    pub kept: bool,
    /// Whether the reconstructed layers' biases keep the float output's means (else they cancel
    /// their own weights' mean shift on their quantized input), whichever gave the lower loss.
    pub output_means_kept: bool,
    /// Samples in the loss.
    pub samples: usize,
    pub layers: Vec<LayerRounding>,
}

/// One weight's rounding: its layer's output error summed over output channels, on the calibration
/// inputs, with nearest and with optimised codes: `E|W~ x~ - W x|^2` for a reconstructed layer
/// (`x~` its input in the quantized network), `E|(W~ - W) x|^2` otherwise.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerRounding {
    pub weight: String,
    pub nearest_error: f64,
    pub error: f64,
    /// Adam steps (AdaRound; 0 for GPTQ).
    pub iterations: usize,
    pub seconds: f64,
    /// Whether the layer rounded for its input in the quantized network (errors against the float
    /// layer's output on the float input) rather than for the float input.
    pub reconstructed: bool,
}

/// The layer whose input decides weight site `k`'s codes, and how the weight meets that input, when
/// they are optimised: a rounding other than nearest configured, the weight below 8 bits and read
/// by one node only, as the weight of a Gemm, a Conv (grouped or not) or a MatMul (2-D, input B).
pub fn eligible(
    index: &GraphIndex,
    plan: &QuantPlan,
    k: usize,
    config: &QuantConfig,
) -> Result<Option<(usize, Window)>> {
    let site = &plan.weights[k];
    let &[node] = index.consumers(&site.tensor) else {
        return Ok(None);
    };
    if config.rounding == Rounding::Nearest || site.grid.bits >= 8 {
        return Ok(None);
    }
    let n = index.node(node);
    if n.input.get(1) != Some(&site.tensor) || n.input.first() == Some(&site.tensor) {
        return Ok(None);
    }
    let Some(c) = index.constant(&site.tensor) else {
        return Ok(None);
    };
    let rank = onnx::tensor_dims(c.tensor())?.len();
    let window = match n.op_type() {
        "MatMul" if rank == 2 => Some(Window::Dense {
            trans_a: false,
            trans_b: false,
        }),
        "Conv" | "Gemm" => crate::ir::layer_window(n, rank),
        _ => None,
    };
    Ok(window.map(|w| (node, w)))
}

/// Chooses the codes of the weights whose rounding is optimised, for the run's final scales, and
/// keeps them where the network's loss on the loss samples (the first `lapq_samples`) is not above
/// the loss with nearest rounding: the optimisation lowers each layer's own error, not always the
/// network's. Each layer whose input is an activation site rounds for the input the quantized
/// network gives it (everything upstream already rounded) against the float layer's output, in one
/// paired pass over the calibration samples (`calib::reconstruct`); the others, and every layer
/// when the samples differ in shape, round on their float input's Gram matrix. The oracle comes
/// from `loss` (built there if absent: `crate::quantize::sites::loss_oracle`).
pub(crate) fn round(
    c: &mut Calibrated,
    config: &QuantConfig,
    loss: &mut Option<crate::oracle::Oracle>,
    progress: bool,
) -> Result<()> {
    if c.grams.iter().all(Option::is_none) {
        return Ok(());
    }
    let index = GraphIndex::new(&c.model)?;
    let jobs = jobs(&index, c, config)?;
    drop(index);
    if jobs.is_empty() {
        return Ok(());
    }
    let (values, layers, means) = round_weights(c, jobs, config.rounding, progress)?;
    // Reconstructed layers' biases either keep the float output's means, `b + W E[x] - W~ E[x~]`
    // (the upstream shift included), or cancel their own weights' shift on their input,
    // `b + (W - W~) E[x~]`; which is better depends on the model (measured both ways), so the
    // network's loss decides.
    let mut candidates = vec![];
    for keep_means in [true, false] {
        for (b, quantized, float) in &means {
            let float = if keep_means { float } else { quantized };
            c.biases
                .set_reconstructed(*b, quantized.clone(), float.clone());
        }
        let params = c.biases.params_rounded(
            &c.plan,
            c.params.activations.clone(),
            c.params.weights.clone(),
            values.clone(),
        )?;
        candidates.push((keep_means, params));
        if means.is_empty() {
            break;
        }
    }
    let weights = values.iter().flatten().count();
    let oracle = crate::quantize::sites::loss_oracle(c, config, loss)?;
    let n = oracle.active_samples().len();
    let nearest_loss = oracle.score(&c.params)?.loss;
    let mut best: Option<(f64, bool, Params)> = None;
    for (keep_means, params) in candidates {
        let l = oracle.score(&params)?.loss;
        if best.as_ref().is_none_or(|(b, ..)| l < *b) {
            best = Some((l, keep_means, params));
        }
    }
    let (rounded_loss, keep_means, rounded) = best.context("no rounding candidate")?;
    let kept = rounded_loss <= nearest_loss;
    if kept {
        c.params = rounded;
        // Later corrections (the accuracy fallback's) use the chosen form.
        for (b, quantized, float) in means {
            let float = if keep_means { float } else { quantized.clone() };
            c.biases.set_reconstructed(b, quantized, float);
        }
    } else {
        c.biases.clear_reconstructed();
    }
    c.rounding = Some(RoundingReport {
        method: config.rounding,
        weights,
        nearest_loss,
        rounded_loss,
        kept,
        output_means_kept: kept && keep_means && layers.iter().any(|l| l.reconstructed),
        samples: n,
        layers,
    });
    c.timings.lap("rounding");
    Ok(())
}

/// One weight to round, with everything its rounding needs (owned: the paired pass's observer
/// outlives no borrow).
struct Job {
    /// Weight site.
    k: usize,
    name: String,
    window: Window,
    /// The weight's spatial shape (empty for Gemm and MatMul).
    kernel: Vec<usize>,
    /// Values and shape in the weight's own layout.
    w: Vec<f32>,
    dims: Vec<usize>,
    p: QParams,
    /// The float input's Gram matrix, from the statistics pass.
    gram: WindowGram,
    /// The activation site of the layer's input, and its parameters.
    input: Option<(usize, QParams)>,
    /// The layer's corrected bias site and its float value (times Gemm's beta).
    bias: Option<(usize, Vec<f32>)>,
}

/// The weights to round: every eligible weight with a Gram matrix. `eligible` is `None` for a weight
/// raised to 8 bits after the statistics pass (the accuracy fallback).
fn jobs(index: &GraphIndex, c: &Calibrated, config: &QuantConfig) -> Result<Vec<Job>> {
    let mut jobs = vec![];
    for (k, gram) in c.grams.iter().enumerate() {
        let Some(gram) = gram.as_ref().filter(|g| g.count > 0) else {
            continue;
        };
        let Some((node, window)) = eligible(index, &c.plan, k, config)? else {
            continue;
        };
        let name = &c.plan.weights[k].tensor;
        let t = index
            .constant(name)
            .with_context(|| format!("weight '{name}' is not a constant"))?
            .tensor();
        let dims = onnx::tensor_dims(t)?;
        let layer_input = index.node(node).input.first();
        let input = c
            .plan
            .activations
            .iter()
            .position(|a| Some(&a.tensor) == layer_input)
            .map(|i| (i, c.params.activations[i].clone()));
        let bias = c
            .plan
            .biases
            .iter()
            .position(|b| b.weight == k && b.node == node)
            .and_then(|b| Some((b, c.biases.corrected_value(b)?.to_vec())));
        jobs.push(Job {
            k,
            name: name.clone(),
            window,
            kernel: dims.get(2..).unwrap_or(&[]).to_vec(),
            w: onnx::tensor_f32(t)?,
            dims,
            p: c.params.weights[k].clone(),
            gram: gram.clone(),
            input,
            bias,
        });
    }
    Ok(jobs)
}

/// A layer input's window means on the quantized and on the float side.
type Means = (WindowMeans, WindowMeans);

/// A rounded weight: its values in its own layout, what its rounding did, and, when it rounded for
/// the quantized network's input, its bias site with that input's window means on each side.
type Outcome = (
    Arc<[f32]>,
    LayerRounding,
    Option<(usize, WindowMeans, WindowMeans)>,
);

/// The chosen values of every job's weight (indexed like `plan.weights`), what each rounding did,
/// and the window means each reconstructed layer's bias correction uses.
#[allow(clippy::type_complexity)]
fn round_weights(
    c: &Calibrated,
    jobs: Vec<Job>,
    method: Rounding,
    progress: bool,
) -> Result<(
    Vec<Option<Arc<[f32]>>>,
    Vec<LayerRounding>,
    Vec<(usize, WindowMeans, WindowMeans)>,
)> {
    let one_shape = same_shapes(&c.samples);
    // Progress in multiply-adds of one step: values times columns.
    let total = jobs.iter().map(|j| (j.w.len() * j.gram.k) as u64).sum();
    let bar = crate::progress::bar(total, "rounding", "units", progress);
    let (paired, alone): (Vec<Job>, Vec<Job>) = jobs
        .into_iter()
        .partition(|j| one_shape && j.input.is_some());
    let mut outcomes: Vec<(usize, Outcome)> = vec![];
    for job in &alone {
        let (values, layer) = round_job(job, None, method)?;
        outcomes.push((job.k, (values, layer, None)));
        bar.inc((job.w.len() * job.gram.k) as u64);
    }
    if !paired.is_empty() {
        let (start, wanted) = paired_start(c, &outcomes, &paired);
        let done: Arc<Mutex<Vec<(usize, Outcome)>>> = Arc::default();
        let failed: Arc<Mutex<Option<anyhow::Error>>> = Arc::default();
        let (log, fail, bar) = (done.clone(), failed.clone(), bar.clone());
        let observer = Arc::new(
            move |slot: usize, quantized: &[f32], float: &[f32], dims: &[usize]| {
                let mut update = Update::default();
                for job in paired
                    .iter()
                    .filter(|j| matches!(j.input, Some((s, _)) if s == slot))
                {
                    match reconstruct(job, quantized, float, dims, method) {
                        Ok((values, layer, means)) => {
                            update.weights.push((job.k, values.clone()));
                            let means = match (&job.bias, means) {
                                (Some((b, base)), Some((q, f))) => {
                                    let bias = reconstructed_bias(job, base, &values, &q, &f);
                                    update.biases.push((*b, bias));
                                    Some((*b, q, f))
                                }
                                _ => None,
                            };
                            bar.inc((job.w.len() * job.gram.k) as u64);
                            if let Ok(mut log) = log.lock() {
                                log.push((job.k, (values, layer, means)));
                            }
                        }
                        Err(e) => {
                            if let Ok(mut fail) = fail.lock() {
                                fail.get_or_insert(e.context(format!("weight '{}'", job.name)));
                            }
                        }
                    }
                }
                Some(update)
            },
        );
        let sites = crate::quantize::sites::oracle_sites(c)?;
        crate::oracle::calibrate_paired(
            c.staged.path(),
            &sites,
            &start,
            &c.samples,
            &wanted,
            observer,
        )?;
        if let Some(e) = failed
            .lock()
            .map_err(|_| anyhow::anyhow!("rounding poisoned"))?
            .take()
        {
            return Err(e);
        }
        outcomes.extend(std::mem::take(
            &mut *done
                .lock()
                .map_err(|_| anyhow::anyhow!("rounding poisoned"))?,
        ));
    }
    bar.finish_and_clear();
    outcomes.sort_by_key(|(k, _)| *k);
    let mut values = vec![None; c.plan.weights.len()];
    let (mut layers, mut means) = (vec![], vec![]);
    for (k, (v, layer, m)) in outcomes {
        values[k] = Some(v);
        layers.push(layer);
        means.extend(m);
    }
    Ok((values, layers, means))
}

/// The paired pass's start: nearest codes for the paired layers (each is replaced at its input
/// site, before the network reads it) and the chosen codes of the others; and the activation sites
/// the paired layers read.
fn paired_start(c: &Calibrated, done: &[(usize, Outcome)], paired: &[Job]) -> (Params, Vec<bool>) {
    let mut start = c.params.clone();
    start.weight_values = vec![None; start.weights.len()];
    for (k, (values, ..)) in done {
        start.weight_values[*k] = Some(values.clone());
    }
    let mut wanted = vec![false; start.activations.len()];
    for job in paired {
        if let Some((slot, _)) = job.input {
            wanted[slot] = true;
        }
    }
    (start, wanted)
}

/// Whether every sample's inputs have the first sample's shapes (the paired pass needs it).
fn same_shapes(samples: &[crate::data::Sample]) -> bool {
    samples.iter().all(|s| {
        s.inputs.len() == samples[0].inputs.len()
            && s.inputs
                .iter()
                .zip(&samples[0].inputs)
                .all(|(a, b)| a.dims == b.dims)
    })
}

/// The bias of a reconstructed layer with rounded values `values`: its float bias `base` plus the
/// output shift `W E[x] - W~ E[x~]` over the window means `quantized` and `float`.
fn reconstructed_bias(
    job: &Job,
    base: &[f32],
    values: &[f32],
    quantized: &WindowMeans,
    float: &WindowMeans,
) -> Vec<f32> {
    let mut w_hat = values.to_vec();
    job.p.fake_quant_in_place(&mut w_hat, &job.dims);
    let shift = reconstruction_shift(&job.window, &job.dims, &job.w, &w_hat, quantized, float);
    base.iter().zip(&shift).map(|(v, s)| v + s).collect()
}

/// Rounds `job`'s weight alone, on its float input's Gram matrix.
fn round_job(
    job: &Job,
    paired: Option<&PairedGram>,
    method: Rounding,
) -> Result<(Arc<[f32]>, LayerRounding)> {
    let start = std::time::Instant::now();
    let (values, mut layer) = round_weight(
        &job.w,
        &job.dims,
        &job.window,
        &job.p,
        &job.gram,
        paired,
        method,
    )
    .with_context(|| format!("weight '{}'", job.name))?;
    layer.weight = job.name.clone();
    layer.seconds = start.elapsed().as_secs_f64();
    Ok((values.into(), layer))
}

/// Rounds `job`'s weight for its input in the quantized network (`quantized`, before its site's
/// quantization) against the float layer on the float input (`float`), both of tract's shape
/// `dims`; with the window means its bias correction needs: the float side's where the target is
/// used, else the quantized side's on both (the correction `(W - W~) E[x~]`). Falls back to the
/// float Gram where tract's layout is not the layer's.
fn reconstruct(
    job: &Job,
    quantized: &[f32],
    float: &[f32],
    dims: &[usize],
    method: Rounding,
) -> Result<(Arc<[f32]>, LayerRounding, Option<Means>)> {
    let start = std::time::Instant::now();
    let alone = || round_job(job, None, method).map(|(v, l)| (v, l, None));
    let Some((_, site)) = &job.input else {
        return alone();
    };
    let Some(dims) = layer_input_shape(job, dims) else {
        return alone();
    };
    let mut x = quantized.to_vec();
    site.fake_quant_in_place(&mut x, &dims);
    let paired = PairedGram::of(&job.window, &job.kernel, &dims, &x, float)
        .with_context(|| format!("weight '{}'", job.name))?;
    let (values, mut layer) = round_job(job, Some(&paired), method)?;
    layer.seconds = start.elapsed().as_secs_f64();
    let means = if paired.fits_a_target() {
        (paired.quantized_means, paired.float_means)
    } else {
        (paired.quantized_means.clone(), paired.quantized_means)
    };
    Ok((values, layer, Some(means)))
}

/// The layer's input shape for tract's shape `dims` of its input site, where they hold the same
/// values in the same order: tract may move unit axes through a site (a Flatten before a Gemm).
fn layer_input_shape(job: &Job, dims: &[usize]) -> Option<Vec<usize>> {
    let (_, k) = row_shape(&job.dims, &job.window);
    match &job.window {
        Window::Dense { trans_a: true, .. } => {
            (dims.len() == 2 && dims[0] == k).then(|| dims.to_vec())
        }
        Window::Dense { .. } if dims.last() == Some(&k) => {
            Some(vec![dims.iter().product::<usize>() / k.max(1), k])
        }
        Window::Dense { .. } => {
            (dims.len() >= 2 && dims[1..].iter().product::<usize>() == k).then(|| vec![dims[0], k])
        }
        Window::Conv { group, .. } => {
            let taps: usize = job.kernel.iter().product();
            (dims.len() == job.kernel.len() + 2 && dims[1] * taps == k * group)
                .then(|| dims.to_vec())
        }
    }
}

/// A weight's output channels (rows) and the values of each row, from its shape `dims` (rank 2 or
/// more) and how it meets its input.
pub fn row_shape(dims: &[usize], window: &Window) -> (usize, usize) {
    let at = |i: usize| dims.get(i).copied().unwrap_or(0);
    match window {
        Window::Dense { trans_b: false, .. } => (at(1), at(0)),
        _ => (at(0), dims.iter().skip(1).product()),
    }
}

/// One weight's rounded values in its own layout, and its output errors (`weight` and `seconds`
/// left for the caller). Output channels are rows: axis 0 of Conv and of Gemm with `transB`, axis 1
/// of Gemm without and of MatMul. With `paired`, the codes round towards the reconstruction target
/// on the quantized input's Gram matrix and the errors are against the float layer's output;
/// without, towards the float weights on `gram`. A layer keeps nearest codes where the optimised
/// ones have the larger error.
fn round_weight(
    w: &[f32],
    dims: &[usize],
    window: &Window,
    p: &QParams,
    gram: &WindowGram,
    paired: Option<&PairedGram>,
    method: Rounding,
) -> Result<(Vec<f32>, LayerRounding)> {
    let transposed = matches!(window, Window::Dense { trans_b: false, .. });
    ensure!(dims.len() >= 2, "weight of shape {dims:?}");
    let (rows, k) = row_shape(dims, window);
    let on = paired.map_or(gram, |g| &g.quantized);
    ensure!(
        k == on.k,
        "rows of {k} values for input windows of {}",
        on.k
    );
    let row_axis = if transposed { 1 } else { 0 };
    let per_row = |v: &[f32]| -> Result<Vec<f32>> {
        match p.axis {
            None => Ok(vec![v[0]; rows]),
            Some(a) if a == row_axis && v.len() == rows => Ok(v.to_vec()),
            Some(a) => {
                anyhow::bail!("per-channel parameters along axis {a}, not the output channels")
            }
        }
    };
    let scales = per_row(&p.scale)?;
    let zero_points: Vec<i64> = match p.axis {
        None => vec![p.zero_point[0]; rows],
        Some(_) => p.zero_point.clone(),
    };
    let as_rows: Vec<f32> = if transposed {
        (0..rows * k).map(|i| w[(i % k) * rows + i / k]).collect()
    } else {
        w.to_vec()
    };
    let target = match paired {
        Some(g) if g.fits_a_target() => g.target(&as_rows, RIDGE)?,
        _ => as_rows.clone(),
    };
    let error = |values: &[f32]| match paired {
        Some(g) => g.output_error(&as_rows, values),
        None => gram.output_error(&as_rows, values),
    };
    let nearest: Vec<f32> = as_rows
        .iter()
        .enumerate()
        .map(|(i, &v)| p.grid.fake_quant(v, scales[i / k], zero_points[i / k]))
        .collect();
    let (rounded, iterations) = match method {
        Rounding::Adaround => {
            let iterations = crate::calib::adaround::ITERATIONS;
            // Around GPTQ's compensated values, with GPTQ's rounding for the rows it does better.
            let (fallback, start) =
                crate::calib::gptq::feedback_rounding(&target, on, p.grid, &scales, &zero_points)?;
            let r = crate::calib::adaround::round_rows(
                &target,
                &start,
                &fallback,
                on,
                p.grid,
                &scales,
                &zero_points,
                iterations,
            )?;
            (r.values, iterations)
        }
        _ => (
            crate::calib::gptq::round_rows(&target, on, p.grid, &scales, &zero_points)?,
            0,
        ),
    };
    let nearest_error = error(&nearest)?;
    let (rounded, error) = match error(&rounded)? {
        e if e <= nearest_error => (rounded, e),
        _ => (nearest, nearest_error),
    };
    let values = if transposed {
        (0..rows * k)
            .map(|i| rounded[(i % rows) * k + i / rows])
            .collect()
    } else {
        rounded
    };
    let layer = LayerRounding {
        weight: String::new(),
        nearest_error,
        error,
        iterations,
        seconds: 0.0,
        reconstructed: paired.is_some(),
    };
    Ok((values, layer))
}
