//! Parameters of every site from the statistics by the configured clipping methods, the start that
//! the search stages (best, auto, LAPQ, rounding) refine.

use anyhow::{Context, Result, ensure};

use crate::calib::{self, Params, QParams, RangeStats};
use crate::config::{self, QuantConfig};
use crate::ir::{GraphIndex, QuantPlan, RangeSource};
use crate::onnx;
use crate::quantize::biases::Biases;

/// The clipping method a configured method stands for.
fn clipping(method: config::Method, config: &QuantConfig) -> calib::Clipping {
    match method {
        config::Method::MinMax => calib::Clipping::MinMax,
        config::Method::Percentile => calib::Clipping::Percentile(config.percentile),
        config::Method::Entropy => calib::Clipping::Entropy,
        config::Method::Mse => calib::Clipping::Lp(config.lp),
        // LAPQ and auto start from MinMax parameters (the oracle's reference) and replace them; best
        // starts from MSE, one of its candidates.
        config::Method::Lapq | config::Method::Auto => calib::Clipping::MinMax,
        config::Method::Best => calib::Clipping::Lp(config.lp),
    }
}

/// Parameters for every site by the configured methods; biases get int32 parameters after the overflow
/// guard has enlarged any weight scale that needs it.
pub(crate) fn calibrate_params(
    index: &GraphIndex,
    plan: &QuantPlan,
    stats: &[Option<RangeStats>],
    biases: &Biases,
    config: &QuantConfig,
) -> Result<Params> {
    ensure!(
        config.weight_method != config::Method::Entropy,
        "entropy is an activation method; weights use minmax, percentile or mse"
    );
    let activations = activation_params(index, plan, stats, clipping(config.act_method, config))?;
    let weights = weight_params(index, plan, clipping(config.weight_method, config))?;
    biases.params(plan, activations, weights)
}

/// Every activation site's parameters with clipping `clip` (graph outputs keep their observed
/// range), aligned with `plan.activations`.
pub(crate) fn activation_params(
    index: &GraphIndex,
    plan: &QuantPlan,
    stats: &[Option<RangeStats>],
    clip: calib::Clipping,
) -> Result<Vec<QParams>> {
    let mut activations: Vec<QParams> = Vec::with_capacity(plan.activations.len());
    for (i, site) in plan.activations.iter().enumerate() {
        let p = match (&site.range, &stats[i]) {
            (RangeSource::Observed(t), Some(s)) if s.count > 0 => {
                // Clipping a graph output cuts exactly its extreme values: a classifier's top logits.
                let clip = if index.is_graph_output(t) {
                    calib::Clipping::MinMax
                } else {
                    clip
                };
                let (lo, hi) = match clip {
                    calib::Clipping::MinMax => (s.min, s.max),
                    how => calib::clipped_range(
                        s.min,
                        s.max,
                        calib::alpha_from_histogram(&s.hist, site.grid, how),
                    ),
                };
                QParams::per_tensor(site.grid, lo, hi)
            }
            (RangeSource::Observed(t), _) => {
                Err(anyhow::anyhow!("tensor '{t}' was not observed as float32"))
            }
            (RangeSource::Fixed(lo, hi), _) => QParams::per_tensor(site.grid, *lo, *hi),
            (RangeSource::SameAs(j), _) => Ok(activations[*j].clone()),
        };
        activations.push(p.with_context(|| format!("activation '{}'", site.tensor))?);
    }
    Ok(activations)
}

/// Every weight site's parameters with clipping `clip`, aligned with `plan.weights`.
pub(crate) fn weight_params(
    index: &GraphIndex,
    plan: &QuantPlan,
    clip: calib::Clipping,
) -> Result<Vec<QParams>> {
    plan.weights
        .iter()
        .map(|site| {
            let t = index
                .constant(&site.tensor)
                .context("weight is a constant")?
                .tensor();
            calib::weight_params(
                site.grid,
                &onnx::tensor_f32(t)?,
                &onnx::tensor_dims(t)?,
                site.axis,
                clip,
            )
            .with_context(|| format!("weight '{}'", site.tensor))
        })
        .collect()
}
