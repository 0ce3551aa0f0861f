//! The statistics pass: one float run over the calibration set that gathers what every later stage
//! needs from the float network (activation ranges, bias correction's window means, the Gram matrices
//! rounding with error feedback starts from).

use anyhow::{Context, Result};

use crate::calib::bias::WindowMeans;
use crate::calib::{self, RangeStats};
use crate::config::QuantConfig;
use crate::ir::{GraphIndex, QuantPlan, RangeSource};
use crate::{data, onnx, oracle, quantize};

/// One float pass over the calibration set: range statistics of every observed activation site,
/// indexed like `plan.activations` (`None` where the range is fixed or shared), and, with bias
/// correction, the window means of every correctable layer's input, indexed like `plan.biases`.
pub fn observe(
    model: &onnx::StagedModel,
    index: &GraphIndex,
    plan: &QuantPlan,
    samples: &[data::Sample],
    config: &QuantConfig,
    progress: bool,
) -> Result<Observations> {
    let mut taps: Vec<String> = vec![];
    let mut tap = |t: &str| match taps.iter().position(|x| x == t) {
        Some(k) => k,
        None => {
            taps.push(t.to_string());
            taps.len() - 1
        }
    };
    let ranges: Vec<(usize, usize)> = plan
        .activations
        .iter()
        .enumerate()
        .filter_map(|(i, s)| match &s.range {
            RangeSource::Observed(t) => Some((i, tap(t))),
            _ => None,
        })
        .collect();
    // (bias site, tap, window, kernel) of every corrected layer.
    let mut windows = vec![];
    if config.bias_correction {
        for (b, site) in plan.biases.iter().enumerate() {
            let Some(window) = &site.window else { continue };
            let w = &plan.weights[site.weight].tensor;
            let wt = index.constant(w).context("weight is a constant")?.tensor();
            let kernel = onnx::tensor_dims(wt)?.get(2..).unwrap_or(&[]).to_vec();
            windows.push((
                b,
                tap(&index.node(site.node).input[0]),
                window.clone(),
                kernel,
            ));
        }
    }
    let gram_layers = gram_layers(index, plan, config, &mut tap)?;
    let float = oracle::FloatModel::load(model.path(), &taps)?;
    let bar = crate::progress::bar(samples.len() as u64, "statistics", "samples", progress);
    // Per worker: range statistics per range tap, window means per corrected layer and Gram
    // matrices per rounded layer (`None` once a tensor did not fit its layer's geometry).
    let per_worker = float.observe(
        samples,
        || {
            (
                vec![RangeStats::default(); ranges.len()],
                vec![Some(WindowMeans::default()); windows.len()],
                vec![Some(calib::gptq::WindowGram::default()); gram_layers.len()],
            )
        },
        |(stats, means, grams), k, dims, values| {
            for (r, _) in ranges.iter().enumerate().filter(|(_, (_, t))| *t == k) {
                stats[r].observe(dims, values);
            }
            feed_windows(&windows, means, k, dims, values);
            feed_windows(&gram_layers, grams, k, dims, values);
        },
        &|| bar.inc(1),
    )?;
    bar.finish_and_clear();
    let (merged, merged_means, merged_grams) =
        merge_workers(&per_worker, ranges.len(), windows.len(), gram_layers.len());
    let mut stats = vec![None; plan.activations.len()];
    for ((site, _), s) in ranges.into_iter().zip(merged) {
        stats[site] = Some(s);
    }
    let mut bias_means = vec![None; plan.biases.len()];
    for ((b, ..), m) in windows.into_iter().zip(merged_means) {
        bias_means[b] = m;
    }
    let mut grams = vec![None; plan.weights.len()];
    for ((k, ..), g) in gram_layers.into_iter().zip(merged_grams) {
        grams[k] = g;
    }
    Ok(Observations {
        stats,
        bias_means,
        grams,
    })
}

/// One worker's statistics: range statistics per range tap, window means per corrected layer, Gram
/// matrices per rounded layer (`None` once a tensor did not fit its layer's geometry).
type Accumulators = (
    Vec<RangeStats>,
    Vec<Option<WindowMeans>>,
    Vec<Option<calib::gptq::WindowGram>>,
);

/// The workers' statistics merged in worker order.
fn merge_workers(
    per_worker: &[Accumulators],
    n_ranges: usize,
    n_windows: usize,
    n_grams: usize,
) -> Accumulators {
    let mut merged = vec![RangeStats::default(); n_ranges];
    let mut merged_means = vec![Some(WindowMeans::default()); n_windows];
    let mut merged_grams = vec![Some(calib::gptq::WindowGram::default()); n_grams];
    for (stats, means, grams) in per_worker {
        for (m, a) in merged_grams.iter_mut().zip(grams) {
            if let (Some(m), Some(a)) = (m.as_mut(), a)
                && m.merge(a).is_ok()
            {
                continue;
            }
            *m = None;
        }
        for (m, a) in merged.iter_mut().zip(stats) {
            m.merge(a);
        }
        for (m, a) in merged_means.iter_mut().zip(means) {
            match (m.as_mut(), a) {
                (Some(m), Some(a)) => m.merge(a),
                _ => *m = None,
            }
        }
    }
    (merged, merged_means, merged_grams)
}

/// (site, tap, window, kernel) of a layer whose input windows the float pass reads.
type WindowedLayer = (usize, usize, calib::bias::Window, Vec<usize>);

/// (weight site, tap, window, kernel) of every weight that rounds with error feedback, in plan
/// order while their Gram matrices fit the budget (the rest round to nearest); `tap` numbers the
/// tensors the float pass reads.
fn gram_layers(
    index: &GraphIndex,
    plan: &QuantPlan,
    config: &QuantConfig,
    tap: &mut impl FnMut(&str) -> usize,
) -> Result<Vec<WindowedLayer>> {
    let mut layers = vec![];
    let mut gram_bytes = 0usize;
    for (k, site) in plan.weights.iter().enumerate() {
        let Some((node, window)) = quantize::rounding::eligible(index, plan, k, config)? else {
            continue;
        };
        let wt = index
            .constant(&site.tensor)
            .context("weight is a constant")?
            .tensor();
        let dims = onnx::tensor_dims(wt)?;
        let (_, columns) = quantize::rounding::row_shape(&dims, &window);
        let groups = match &window {
            calib::bias::Window::Conv { group, .. } => *group,
            _ => 1,
        };
        let bytes = groups * columns * columns * std::mem::size_of::<f64>();
        if gram_bytes + bytes > GRAM_BUDGET {
            continue;
        }
        gram_bytes += bytes;
        let kernel = dims.get(2..).unwrap_or(&[]).to_vec();
        layers.push((k, tap(&index.node(node).input[0]), window, kernel));
    }
    Ok(layers)
}

/// Bytes of Gram matrices the statistics pass holds per worker for rounding with error feedback
/// (each `K x K` f64 for weight rows of `K` values): all-MiniLM-L6-v2 needs 149 MB, EfficientNet-
/// Lite0 76 MB; a decoder with 4096-wide layers would need 134 MB per layer.
const GRAM_BUDGET: usize = 1 << 30;

/// Feeds tap `k`'s tensor to the window statistic of every layer (`(site, tap, window, kernel)`)
/// reading it; a statistic becomes `None` once a tensor does not fit its layer's geometry.
fn feed_windows<A: calib::bias::WindowStat>(
    layers: &[WindowedLayer],
    stats: &mut [Option<A>],
    k: usize,
    dims: &[usize],
    values: &[f32],
) {
    for ((_, _, window, kernel), acc) in layers
        .iter()
        .zip(stats.iter_mut())
        .filter(|((_, tap, _, _), _)| *tap == k)
    {
        if let Some(a) = acc.as_mut()
            && a.observe(window, kernel, dims, values).is_err()
        {
            *acc = None;
        }
    }
}

/// What the float pass over the calibration set gathered.
pub struct Observations {
    pub stats: Vec<Option<RangeStats>>,
    pub bias_means: Vec<Option<WindowMeans>>,
    /// Gram matrices of the input windows of every weight that rounds with error feedback, indexed
    /// like `plan.weights`.
    pub grams: Vec<Option<calib::gptq::WindowGram>>,
}
