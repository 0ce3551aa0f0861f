//! All quantization maths: grids and parameters, the one quantizer definition, statistics, and the
//! calibration methods. It sees numbers only (no files, no protobuf, no inference engine), so everything
//! here is unit-tested without a model.

mod grid;
mod loss;
mod stats;

pub use grid::{Grid, QParams, bias_params, guard_bias_overflow, quantize_bias};
pub use loss::{LossKind, cross_entropy, kl_softmax, mse};
pub use stats::{RangeStats, channel_min_max};

use serde::Serialize;

/// Quantization parameters for every site of a plan, aligned with its activation, weight and bias lists.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Params {
    pub activations: Vec<QParams>,
    pub weights: Vec<QParams>,
    pub biases: Vec<QParams>,
}

/// MinMax parameters of a weight: its exact range, per slice along `axis` or over the whole tensor.
pub fn weight_minmax(
    grid: Grid,
    values: &[f32],
    dims: &[usize],
    axis: Option<usize>,
) -> anyhow::Result<QParams> {
    let (mut min, mut max, non_finite) = channel_min_max(values, dims, axis.unwrap_or(0));
    anyhow::ensure!(non_finite == 0, "{non_finite} values are NaN or infinite");
    for (lo, hi) in min
        .iter_mut()
        .zip(max.iter_mut())
        .filter(|(lo, hi)| lo > hi)
    {
        (*lo, *hi) = (0.0, 0.0);
    }
    match axis {
        Some(a) => QParams::per_channel(grid, a, &min, &max),
        None => {
            let lo = min.iter().copied().fold(0f32, f32::min);
            let hi = max.iter().copied().fold(0f32, f32::max);
            QParams::per_tensor(grid, lo, hi)
        }
    }
}
