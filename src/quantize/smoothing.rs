//! Smoothing (SmoothQuant's migration): the per-channel ranges of the smoothable normalisation
//! outputs from one float pass, the factors (`calib::smooth`), and the rewrite (`prepare::smooth`),
//! before the model is planned.

use anyhow::Result;

use crate::{calib, data, onnx, oracle, prepare};

/// SmoothQuant's migration on every smoothable normalisation output (`prepare::smoothable`) with
/// outlier channels (`calib::smooth::has_outliers`), from the per-channel ranges one float pass over
/// `samples` gives; returns the tensors smoothed.
pub(crate) fn smooth(
    model: &mut onnx::ModelProto,
    samples: &[data::Sample],
    progress: bool,
) -> Result<Vec<String>> {
    let targets = prepare::smoothable(model)?;
    if targets.is_empty() {
        return Ok(vec![]);
    }
    let staged = onnx::StagedModel::new(model)?;
    let taps: Vec<String> = targets.iter().map(|t| t.tensor.clone()).collect();
    let float = oracle::FloatModel::load(staged.path(), &taps)?;
    let bar = crate::progress::bar(samples.len() as u64, "smoothing", "samples", progress);
    let per_worker = float.observe(
        samples,
        || vec![vec![]; targets.len()],
        |acc: &mut Vec<Vec<f32>>, k, _, values| {
            calib::smooth::observe_channel_absmax(&mut acc[k], values, targets[k].channels);
        },
        &|| bar.inc(1),
    )?;
    bar.finish_and_clear();
    drop(float);
    let mut smoothed = vec![];
    for (k, t) in targets.iter().enumerate() {
        let mut absmax = vec![0f32; t.channels];
        for acc in &per_worker {
            for (m, &v) in absmax.iter_mut().zip(&acc[k]) {
                *m = m.max(v);
            }
        }
        if !calib::smooth::has_outliers(&absmax) {
            continue;
        }
        let factors =
            calib::smooth::migration_scales(&absmax, &t.weight_absmax, calib::smooth::ALPHA);
        prepare::smooth(model, &t.tensor, &factors)?;
        smoothed.push(t.tensor.clone());
    }
    Ok(smoothed)
}
