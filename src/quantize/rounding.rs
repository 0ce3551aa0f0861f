//! Rounding optimisation (`Rounding::Gptq`, `Rounding::Adaround`): once every scale is fixed, the
//! codes of each eligible weight are chosen by `calib::gptq` or `calib::adaround` from the Gram
//! matrix of its layer's input windows, gathered in the statistics pass; biases are then corrected
//! for the chosen codes.

use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use serde::Serialize;

use crate::Calibrated;
use crate::calib::bias::Window;
use crate::calib::gptq::WindowGram;
use crate::calib::{Params, QParams};
use crate::config::{QuantConfig, Rounding};
use crate::ir::{GraphIndex, QuantPlan};
use crate::onnx;

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
    /// Samples in the loss.
    pub samples: usize,
    pub layers: Vec<LayerRounding>,
}

/// One weight's rounding: its layer's output error `E[|(W~ - W) x|^2]` summed over output
/// channels, on the calibration inputs, with nearest and with optimised codes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerRounding {
    pub weight: String,
    pub nearest_error: f64,
    pub error: f64,
    /// Adam steps (AdaRound; 0 for GPTQ).
    pub iterations: usize,
    pub seconds: f64,
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
/// network's. The oracle comes from `loss` (built there if absent: `crate::loss_oracle`).
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
    let (rounded, layers) = round_weights(
        &index, &c.plan, &c.params, &c.grams, &c.biases, config, progress,
    )?;
    drop(index);
    let weights = rounded.weight_values.iter().flatten().count();
    if weights == 0 {
        return Ok(());
    }
    let oracle = crate::loss_oracle(c, config, loss)?;
    let n = oracle.active_samples().len();
    let nearest_loss = oracle.score(&c.params)?.loss;
    let rounded_loss = oracle.score(&rounded)?.loss;
    let kept = rounded_loss <= nearest_loss;
    if kept {
        c.params = rounded;
    }
    c.rounding = Some(RoundingReport {
        method: config.rounding,
        weights,
        nearest_loss,
        rounded_loss,
        kept,
        samples: n,
        layers,
    });
    c.timings.lap("rounding");
    Ok(())
}

/// `params` with the codes of every weight that has a Gram matrix (`grams`, indexed like
/// `plan.weights`) chosen by `config.rounding`, and every bias corrected for them; and what each
/// weight's rounding did.
fn round_weights(
    index: &GraphIndex,
    plan: &QuantPlan,
    params: &Params,
    grams: &[Option<WindowGram>],
    biases: &crate::biases::Biases,
    config: &QuantConfig,
    progress: bool,
) -> Result<(Params, Vec<LayerRounding>)> {
    let mut values: Vec<Option<Arc<[f32]>>> = vec![None; plan.weights.len()];
    let mut layers = vec![];
    // (site, Gram, window, values, shape) of every weight to round. `eligible` is `None` for a
    // weight raised to 8 bits after the statistics pass (the accuracy fallback).
    let mut jobs = vec![];
    for (k, gram) in grams.iter().enumerate() {
        let Some(gram) = gram.as_ref().filter(|g| g.count > 0) else {
            continue;
        };
        let Some((_, window)) = eligible(index, plan, k, config)? else {
            continue;
        };
        let name = &plan.weights[k].tensor;
        let t = index
            .constant(name)
            .with_context(|| format!("weight '{name}' is not a constant"))?
            .tensor();
        jobs.push((k, gram, window, onnx::tensor_f32(t)?, onnx::tensor_dims(t)?));
    }
    // Progress in multiply-adds of one step: values times columns.
    let work = |w: &[f32], g: &WindowGram| (w.len() * g.k) as u64;
    let total = jobs.iter().map(|(_, g, _, w, _)| work(w, g)).sum();
    let bar = crate::progress_bar(total, "rounding", "units", progress);
    for (k, gram, window, w, dims) in jobs {
        let name = &plan.weights[k].tensor;
        let start = std::time::Instant::now();
        let (rounded, mut layer) = round_weight(
            &w,
            &dims,
            &window,
            &params.weights[k],
            gram,
            config.rounding,
        )
        .with_context(|| format!("weight '{name}'"))?;
        layer.weight = name.clone();
        layer.seconds = start.elapsed().as_secs_f64();
        layers.push(layer);
        values[k] = Some(rounded.into());
        bar.inc(work(&w, gram));
    }
    bar.finish_and_clear();
    let params = biases.params_rounded(
        plan,
        params.activations.clone(),
        params.weights.clone(),
        values,
    )?;
    Ok((params, layers))
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
/// of Gemm without and of MatMul.
fn round_weight(
    w: &[f32],
    dims: &[usize],
    window: &Window,
    p: &QParams,
    gram: &WindowGram,
    method: Rounding,
) -> Result<(Vec<f32>, LayerRounding)> {
    let transposed = matches!(window, Window::Dense { trans_b: false, .. });
    ensure!(dims.len() >= 2, "weight of shape {dims:?}");
    let (rows, k) = row_shape(dims, window);
    ensure!(
        k == gram.k,
        "rows of {k} values for input windows of {}",
        gram.k
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
    let nearest: Vec<f32> = as_rows
        .iter()
        .enumerate()
        .map(|(i, &v)| p.grid.fake_quant(v, scales[i / k], zero_points[i / k]))
        .collect();
    let (rounded, error, iterations) = match method {
        Rounding::Adaround => {
            let iterations = crate::calib::adaround::ITERATIONS;
            // Around GPTQ's compensated values, with GPTQ's rounding for the rows it does better.
            let (fallback, start) = crate::calib::gptq::feedback_rounding(
                &as_rows,
                gram,
                p.grid,
                &scales,
                &zero_points,
            )?;
            let r = crate::calib::adaround::round_rows(
                &as_rows,
                &start,
                &fallback,
                gram,
                p.grid,
                &scales,
                &zero_points,
                iterations,
            )?;
            (r.values, r.error, iterations)
        }
        _ => {
            let values =
                crate::calib::gptq::round_rows(&as_rows, gram, p.grid, &scales, &zero_points)?;
            let error = gram.output_error(&as_rows, &values)?;
            (values, error, 0)
        }
    };
    let nearest_error = gram.output_error(&as_rows, &nearest)?;
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
    };
    Ok((values, layer))
}
