//! All quantization maths: grids and parameters, the one quantizer definition, statistics, and the
//! calibration methods. It sees numbers only (no files, no protobuf, no inference engine), so everything
//! here is unit-tested without a model.

pub mod adaround;
pub mod bias;
mod clip;
pub mod gptq;
mod grid;
mod hist;
mod loss;
mod pfit;
mod powell;
pub mod reconstruct;
pub mod search;
pub mod smooth;
mod stats;

pub use clip::{Clipping, alpha_from_histogram, alpha_from_values, clipped_range, lp_error};
pub use grid::{Grid, QParams, bias_params, guard_bias_overflow, quantize_bias};
pub use hist::{BINS, Histogram};
pub use loss::{DenseReference, LossKind, argmax, cross_entropy, kl_softmax, top1_agreement};
pub use pfit::{PFit, fit_p, p_grid};
pub use powell::{Objective, PowellConfig, PowellResult, powell};
pub use stats::{RangeStats, channel_min_max};

use std::sync::Arc;

use serde::Serialize;

/// Quantization parameters for every site of a plan, aligned with its activation, weight and bias lists.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Params {
    pub activations: Vec<QParams>,
    pub weights: Vec<QParams>,
    pub biases: Vec<QParams>,
    /// The float value of each bias site as it is quantized: the model's bias times Gemm's beta,
    /// plus its correction.
    #[serde(skip)]
    pub bias_values: Vec<Vec<f32>>,
    /// The values of the weight sites whose codes rounding with error feedback chose (`gptq`), on
    /// their grids; indexed like `weights`, where absent or `None` the model's values round to nearest.
    #[serde(skip)]
    pub weight_values: Vec<Option<Arc<[f32]>>>,
}

impl Params {
    /// The chosen values of weight site `k`, when rounding with error feedback chose them.
    pub fn rounded(&self, k: usize) -> Option<&[f32]> {
        self.weight_values.get(k).and_then(|v| v.as_deref())
    }

    /// Weight site `k` as the quantized model computes with it, from the model's `values` of shape
    /// `dims`.
    pub fn weight_hat(&self, k: usize, values: &[f32], dims: &[usize]) -> Vec<f32> {
        let mut w = self.rounded(k).unwrap_or(values).to_vec();
        self.weights[k].fake_quant_in_place(&mut w, dims);
        w
    }

    /// The codes of weight site `k`, from the model's `values` of shape `dims`.
    pub fn weight_codes(&self, k: usize, values: &[f32], dims: &[usize]) -> Vec<i64> {
        self.weights[k].quantize_tensor(self.rounded(k).unwrap_or(values), dims)
    }
}

/// Parameters of a weight from its exact values, per slice along `axis` or over the whole tensor,
/// with each slice's range clipped by `how`.
pub fn weight_params(
    grid: Grid,
    values: &[f32],
    dims: &[usize],
    axis: Option<usize>,
    how: Clipping,
) -> anyhow::Result<QParams> {
    let (mut min, mut max, non_finite) = channel_min_max(values, dims, axis.unwrap_or(0));
    anyhow::ensure!(
        non_finite == 0,
        "{non_finite} of its values are not finite (NaN or infinite)"
    );
    for (lo, hi) in min
        .iter_mut()
        .zip(max.iter_mut())
        .filter(|(lo, hi)| lo > hi)
    {
        (*lo, *hi) = (0.0, 0.0);
    }
    if axis.is_none() {
        let lo = min.iter().copied().fold(0f32, f32::min);
        let hi = max.iter().copied().fold(0f32, f32::max);
        (min, max) = (vec![lo], vec![hi]);
    }
    if how != Clipping::MinMax {
        let slices = channel_slices(values, dims, axis);
        let alphas = par_map(&slices, |s| alpha_from_values(s, grid, how));
        for ((lo, hi), alpha) in min.iter_mut().zip(max.iter_mut()).zip(alphas) {
            (*lo, *hi) = clipped_range(*lo, *hi, alpha);
        }
    }
    match axis {
        Some(a) => QParams::per_channel(grid, a, &min, &max),
        None => QParams::per_tensor(grid, min[0], max[0]),
    }
}

/// The values of each slice along `axis` (one slice holding everything without an axis).
fn channel_slices(values: &[f32], dims: &[usize], axis: Option<usize>) -> Vec<Vec<f32>> {
    let Some(axis) = axis else {
        return vec![values.to_vec()];
    };
    let channels = dims.get(axis).copied().unwrap_or(1).max(1);
    let inner: usize = dims.iter().skip(axis + 1).product::<usize>().max(1);
    let mut slices = vec![Vec::with_capacity(values.len() / channels); channels];
    for (block, chunk) in values.chunks(inner).enumerate() {
        slices[block % channels].extend_from_slice(chunk);
    }
    slices
}

/// `f` over `items` on all cores, in order.
fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = items.len().div_ceil(workers).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|c| scope.spawn(|| c.iter().map(&f).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}
