//! Integer grids, quantization parameters and the quantizer itself (ONNX `QuantizeLinear` semantics).

use anyhow::{Result, ensure};
use serde::Serialize;

/// An integer grid: its bit width and signedness, and whether zero sits at its centre.
///
/// Symmetric signed grids have zero point 0 and scale `max|x| / (2^(b-1) - 1)`. Narrow ones (weights)
/// stop at code `-(2^(b-1) - 1)`; the others (activations) reach `-2^(b-1)`, where QuantizeLinear
/// saturates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Grid {
    pub bits: u8,
    pub signed: bool,
    pub symmetric: bool,
    pub narrow: bool,
}

impl Grid {
    /// uint8 asymmetric: the default for activations.
    pub const U8_ASYM: Grid = Grid {
        bits: 8,
        signed: false,
        symmetric: false,
        narrow: false,
    };
    /// int8 symmetric narrow range: the default for weights.
    pub const I8_SYM: Grid = Grid {
        bits: 8,
        signed: true,
        symmetric: true,
        narrow: true,
    };
    /// int32, zero point 0: biases of Conv and Gemm.
    pub const I32_BIAS: Grid = Grid {
        bits: 32,
        signed: true,
        symmetric: true,
        narrow: true,
    };

    /// Smallest code.
    pub fn qmin(&self) -> i64 {
        match (self.signed, self.symmetric && self.narrow) {
            (false, _) => 0,
            (true, true) => -((1i64 << (self.bits - 1)) - 1),
            (true, false) => -(1i64 << (self.bits - 1)),
        }
    }

    /// Largest code.
    pub fn qmax(&self) -> i64 {
        if self.signed {
            (1i64 << (self.bits - 1)) - 1
        } else {
            (1i64 << self.bits) - 1
        }
    }

    /// Scale and zero point covering `[min, max]` (widened to include 0), as ONNX Runtime computes them.
    ///
    /// A degenerate range gives scale 1 and the grid's zero. Errors on non-finite bounds.
    pub fn params_for_range(&self, min: f32, max: f32) -> Result<(f32, i64)> {
        ensure!(
            min.is_finite() && max.is_finite(),
            "range [{min}, {max}] is not finite"
        );
        let (mut lo, mut hi) = (min.min(0.0), max.max(0.0));
        if self.symmetric {
            let m = lo.abs().max(hi.abs());
            (lo, hi) = (-m, m);
        }
        let (qmin, qmax) = (self.qmin(), self.qmax());
        let scale = if self.symmetric && self.signed {
            hi / qmax as f32
        } else {
            (hi - lo) / (qmax - qmin) as f32
        };
        if scale < f32::MIN_POSITIVE {
            let zero = if self.symmetric && self.signed {
                0
            } else {
                qmin.max(0)
            };
            return Ok((1.0, zero));
        }
        let zp = if self.symmetric && self.signed {
            0
        } else {
            ((qmin as f32 - lo / scale).round_ties_even() as i64).clamp(qmin, qmax)
        };
        Ok((scale, zp))
    }

    /// The code of `x`: `saturate(round_half_even(x / scale) + zero_point)`, exactly as ONNX specifies.
    pub fn quantize(&self, x: f32, scale: f32, zero_point: i64) -> i64 {
        let q = (x / scale).round_ties_even() as i64 + zero_point;
        q.clamp(self.qmin(), self.qmax())
    }

    /// Quantize then dequantize: the value the quantized network sees for `x`.
    pub fn fake_quant(&self, x: f32, scale: f32, zero_point: i64) -> f32 {
        (self.quantize(x, scale, zero_point) - zero_point) as f32 * scale
    }

    /// `fake_quant` of every value in place, in a form the compiler vectorizes: identical results for
    /// finite inputs and normal scales (NaN becomes the grid's lowest value).
    pub fn fake_quant_slice(&self, data: &mut [f32], scale: f32, zero_point: i64) {
        let lo = (self.qmin() - zero_point) as f32;
        let hi = (self.qmax() - zero_point) as f32;
        fake_quant_kernel(data, scale, lo, hi);
    }
}

/// `clamp(round_half_even(x / scale), lo, hi) * scale` for every `x`, written so that it vectorizes,
/// with 8 lanes where the CPU has AVX (same results: every step is IEEE-exact per lane).
fn fake_quant_kernel(data: &mut [f32], scale: f32, lo: f32, hi: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports the features the function is compiled for.
        unsafe { fake_quant_kernel_avx2(data, scale, lo, hi) };
        return;
    }
    fake_quant_kernel_portable(data, scale, lo, hi);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn fake_quant_kernel_avx2(data: &mut [f32], scale: f32, lo: f32, hi: f32) {
    fake_quant_kernel_portable(data, scale, lo, hi);
}

#[inline(always)]
fn fake_quant_kernel_portable(data: &mut [f32], scale: f32, lo: f32, hi: f32) {
    // Adding and subtracting 1.5 * 2^23 rounds half to even for |v| < 2^22; the codes lie far inside.
    const MAGIC: f32 = 12_582_912.0;
    for x in data.iter_mut() {
        // Subnormal inputs divide very slowly on x86 and round to code 0 for any normal scale.
        let x0 = if x.abs() >= f32::MIN_POSITIVE {
            *x
        } else {
            0.0
        };
        let v = (x0 / scale).max(lo - 1.0).min(hi + 1.0);
        *x = ((v + MAGIC) - MAGIC).max(lo).min(hi) * scale;
    }
}

/// Parameters of one quantized tensor: a scale and zero point per tensor, or per slice along `axis`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QParams {
    pub grid: Grid,
    pub scale: Vec<f32>,
    pub zero_point: Vec<i64>,
    /// `Some(axis)` for per-channel parameters (one entry per index along `axis`).
    pub axis: Option<usize>,
}

impl QParams {
    /// Per-tensor parameters covering `[min, max]`.
    pub fn per_tensor(grid: Grid, min: f32, max: f32) -> Result<QParams> {
        let (s, z) = grid.params_for_range(min, max)?;
        Ok(QParams {
            grid,
            scale: vec![s],
            zero_point: vec![z],
            axis: None,
        })
    }

    /// Per-channel parameters along `axis`, one range per channel.
    pub fn per_channel(grid: Grid, axis: usize, mins: &[f32], maxs: &[f32]) -> Result<QParams> {
        let (scale, zero_point) = mins
            .iter()
            .zip(maxs)
            .map(|(&lo, &hi)| grid.params_for_range(lo, hi))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .unzip();
        Ok(QParams {
            grid,
            scale,
            zero_point,
            axis: Some(axis),
        })
    }

    /// Quantizes a tensor of shape `dims` to codes.
    ///
    /// Panics if per-channel parameters do not match `dims[axis]`: plans guarantee it.
    pub fn quantize_tensor(&self, data: &[f32], dims: &[usize]) -> Vec<i64> {
        let (channels, inner) = self.layout(dims);
        data.iter()
            .enumerate()
            .map(|(i, &x)| {
                let c = if channels == 1 {
                    0
                } else {
                    (i / inner) % channels
                };
                self.grid.quantize(x, self.scale[c], self.zero_point[c])
            })
            .collect()
    }

    /// Quantize-dequantize of a tensor of shape `dims`.
    pub fn fake_quant_tensor(&self, data: &[f32], dims: &[usize]) -> Vec<f32> {
        let mut out = data.to_vec();
        self.fake_quant_in_place(&mut out, dims);
        out
    }

    /// Quantize-dequantize in place, without allocating (the oracle's hot path).
    pub fn fake_quant_in_place(&self, data: &mut [f32], dims: &[usize]) {
        let (channels, inner) = self.layout(dims);
        if channels == 1 {
            self.grid
                .fake_quant_slice(data, self.scale[0], self.zero_point[0]);
            return;
        }
        for (block, chunk) in data.chunks_mut(inner.max(1)).enumerate() {
            let c = block % channels;
            self.grid
                .fake_quant_slice(chunk, self.scale[c], self.zero_point[c]);
        }
    }

    fn layout(&self, dims: &[usize]) -> (usize, usize) {
        match self.axis {
            Some(axis) => {
                assert_eq!(
                    dims[axis],
                    self.scale.len(),
                    "per-channel parameters do not match the tensor"
                );
                (dims[axis], dims[axis + 1..].iter().product())
            }
            None => (1, 1),
        }
    }
}

/// Enlarges weight scales where `input_scale * weight_scale` would push the int32 bias out of range
/// (ONNX Runtime's rule: the bias scale must be at least `1.0001 * 2 |b| / (2^32 - 2)`).
///
/// `weight_scales` has one entry (per-tensor) or one per output channel. Returns whether any changed.
pub fn guard_bias_overflow(input_scale: f32, weight_scales: &mut [f32], bias: &[f32]) -> bool {
    let qrange = i32::MAX as f64 - (i32::MIN as f64 + 1.0);
    let per_tensor = weight_scales.len() == 1;
    let mut changed = false;
    for (c, ws) in weight_scales.iter_mut().enumerate() {
        let absmax = if per_tensor {
            bias.iter().fold(0f64, |m, &b| m.max((b as f64).abs()))
        } else {
            (bias[c] as f64).abs()
        };
        let smallest = 1.0001 * 2.0 * absmax / qrange;
        let candidate = input_scale as f64 * *ws as f64;
        if candidate > 0.0 && candidate < smallest {
            *ws = (*ws as f64 * smallest / candidate) as f32;
            changed = true;
        }
    }
    changed
}

/// Bias parameters: int32, zero point 0, scale `input_scale * weight_scale` (per channel if the weight is).
pub fn bias_params(input_scale: f32, weight: &QParams) -> QParams {
    let scale: Vec<f32> = weight.scale.iter().map(|&s| input_scale * s).collect();
    QParams {
        grid: Grid::I32_BIAS,
        zero_point: vec![0; scale.len()],
        axis: weight.axis.map(|_| 0),
        scale,
    }
}

/// Quantizes a bias with its (per-tensor or per-channel) scale in double precision, saturating to int32.
pub fn quantize_bias(bias: &[f32], params: &QParams) -> Vec<i32> {
    bias.iter()
        .enumerate()
        .map(|(c, &b)| {
            let s = params.scale[if params.scale.len() == 1 { 0 } else { c }] as f64;
            (b as f64 / s)
                .round_ties_even()
                .clamp(i32::MIN as f64, i32::MAX as f64) as i32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn grids() -> impl Strategy<Value = Grid> {
        (2u8..=8, any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
            |(bits, signed, symmetric, narrow)| Grid {
                bits,
                signed,
                symmetric,
                narrow,
            },
        )
    }

    proptest! {
        #[test]
        fn zero_is_exactly_representable(grid in grids(), lo in -100f32..0.0, hi in 0f32..100.0) {
            let (s, z) = grid.params_for_range(lo, hi).unwrap();
            prop_assert_eq!(grid.fake_quant(0.0, s, z), 0.0);
        }

        #[test]
        fn quantize_is_idempotent(grid in grids(), lo in -50f32..0.0, hi in 0.1f32..50.0, x in -80f32..80.0) {
            let (s, z) = grid.params_for_range(lo, hi).unwrap();
            let once = grid.fake_quant(x, s, z);
            prop_assert_eq!(grid.fake_quant(once, s, z), once);
        }

        #[test]
        fn codes_saturate_to_the_grid(grid in grids(), lo in -10f32..0.0, hi in 0.1f32..10.0, x in -1e6f32..1e6) {
            let (s, z) = grid.params_for_range(lo, hi).unwrap();
            let q = grid.quantize(x, s, z);
            prop_assert!(q >= grid.qmin() && q <= grid.qmax());
        }

        #[test]
        fn error_inside_the_range_is_at_most_half_a_step(lo in -10f32..-0.1, hi in 0.1f32..10.0, t in 0f32..1.0) {
            let grid = Grid::U8_ASYM;
            let (s, z) = grid.params_for_range(lo, hi).unwrap();
            // Stay inside the representable range, which rounding of the zero point can shift by half a step.
            let x = (lo + s) + t * (hi - lo - 2.0 * s);
            prop_assert!((grid.fake_quant(x, s, z) - x).abs() <= s * 0.5001);
        }

        #[test]
        fn vectorized_fake_quant_equals_the_definition(
            grid in grids(), lo in -50f32..0.0, hi in 0.1f32..50.0,
            xs in prop::collection::vec(-200f32..200.0, 1..64),
        ) {
            let (s, z) = grid.params_for_range(lo, hi).unwrap();
            let mut fast = xs.clone();
            grid.fake_quant_slice(&mut fast, s, z);
            let slow: Vec<f32> = xs.iter().map(|&x| grid.fake_quant(x, s, z)).collect();
            prop_assert_eq!(fast, slow);
        }

        #[test]
        fn per_channel_equals_per_tensor_on_equal_channels(values in prop::collection::vec(-5f32..5.0, 12)) {
            let channels = 3;
            let data: Vec<f32> = (0..channels).flat_map(|_| values.iter().copied()).collect();
            let dims = [channels, 12];
            let pc = crate::calib::weight_params(Grid::I8_SYM, &data, &dims, Some(0), crate::calib::Clipping::MinMax).unwrap();
            let pt = crate::calib::weight_params(Grid::I8_SYM, &data, &dims, None, crate::calib::Clipping::MinMax).unwrap();
            prop_assert!(pc.scale.iter().all(|&s| s == pt.scale[0]));
            prop_assert_eq!(pc.fake_quant_tensor(&data, &dims), pt.fake_quant_tensor(&data, &dims));
        }
    }

    #[test]
    fn onnx_runtime_uint8_parameters() {
        // ONNX Runtime: scale = (max - min) / 255, zero point = round(-min / scale).
        let (s, z) = Grid::U8_ASYM.params_for_range(-1.0, 3.0).unwrap();
        assert_eq!((s, z), (4.0 / 255.0, 64));
        let (s, z) = Grid::U8_ASYM.params_for_range(0.5, 2.0).unwrap();
        assert_eq!(
            (s, z),
            (2.0 / 255.0, 0),
            "the range is widened to include zero"
        );
    }

    #[test]
    fn symmetric_int8_is_narrow() {
        assert_eq!((Grid::I8_SYM.qmin(), Grid::I8_SYM.qmax()), (-127, 127));
        let (s, z) = Grid::I8_SYM.params_for_range(-0.5, 1.27).unwrap();
        assert_eq!((s, z), (0.01, 0));
        assert_eq!(
            Grid {
                bits: 4,
                signed: true,
                symmetric: true,
                narrow: true,
            }
            .qmin(),
            -7
        );
        // Symmetric activations: the same scale, and the code QuantizeLinear saturates to.
        let act = Grid {
            narrow: false,
            ..Grid::I8_SYM
        };
        assert_eq!((act.qmin(), act.qmax()), (-128, 127));
        assert_eq!(act.params_for_range(-0.5, 1.27).unwrap(), (0.01, 0));
    }

    #[test]
    fn rounding_is_half_to_even() {
        let g = Grid::U8_ASYM;
        assert_eq!(g.quantize(2.5, 1.0, 0), 2);
        assert_eq!(g.quantize(3.5, 1.0, 0), 4);
        let mut v = [2.5, 3.5, -0.5, 254.5, 300.0, -7.0];
        g.fake_quant_slice(&mut v, 1.0, 0);
        assert_eq!(v, [2.0, 4.0, 0.0, 254.0, 255.0, 0.0]);
    }

    #[test]
    fn degenerate_range_gives_unit_scale() {
        assert_eq!(Grid::U8_ASYM.params_for_range(0.0, 0.0).unwrap(), (1.0, 0));
        assert!(Grid::U8_ASYM.params_for_range(0.0, f32::INFINITY).is_err());
    }

    #[test]
    fn bias_guard_enlarges_tiny_weight_scales() {
        let mut ws = vec![1e-12, 0.1];
        let bias = [1000.0, 1.0];
        assert!(guard_bias_overflow(1e-3, &mut ws, &bias));
        let w = QParams {
            grid: Grid::I8_SYM,
            scale: ws,
            zero_point: vec![0, 0],
            axis: Some(0),
        };
        let p = bias_params(1e-3, &w);
        let q = quantize_bias(&bias, &p);
        assert!(q[0] < i32::MAX && q[0] > i32::MAX / 2, "{q:?}");
        assert_eq!(w.scale[1], 0.1, "channels that fit are untouched");
    }
}
