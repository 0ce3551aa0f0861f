//! Asymmetric reconstruction: a layer's weights rounded for the input it gets in the quantized
//! network (`x~`, everything upstream already quantized) against the float layer's output on the
//! float input (`x`). The output error of rounded rows `w~` is
//! `E|w~ x~ - w x|^2 = w~ H~ w~ - 2 w~ M w + w H w` with `H~ = E[x~ x~^T]`, `M = E[x~ x^T]` and
//! `H = E[x x^T]`. Up to a constant it is `(w~ - w*) H~ (w~ - w*)` for the target
//! `w* = H~^-1 M w`, so GPTQ and AdaRound, which round towards a target on a Gram matrix, minimise
//! it when given `w*` and `H~`.

use anyhow::{Result, anyhow, ensure};
use faer::linalg::solvers::Solve;
use faer::{Mat, Side};

use super::bias::{Window, WindowMeans, WindowStat};
use super::gptq::{WindowGram, patches};

/// The ridge that pulls the target towards the float weights, relative to the mean diagonal of
/// `H~`: `w* = (H~ + l I)^-1 (M + l I) w`. The calibration set is small and `w*` fits it; measured
/// on EfficientNet-Lite0 at W4A8 and W4A4 (held-out KL), 1 beats 0.01, 0.1 and 10.
pub const RIDGE: f64 = 1.0;

/// Windows per weight column below which the target is the float weights: a regression on fewer
/// windows than that fits the calibration set, not the layer.
pub const MIN_WINDOWS_PER_COLUMN: u64 = 16;

/// Fixed blocks of samples the sums are gathered in (on all cores), merged in order: the result does
/// not depend on the number of cores.
const BLOCKS: usize = 16;

/// Blocks in flight at once (each holds three Gram matrices).
const IN_FLIGHT: usize = 4;

/// The second moments of a layer's input windows on the quantized and float sides (all with the
/// group layout of [`WindowGram`]), and the windows' means on each side.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PairedGram {
    /// Sums of `x~ x~^T`.
    pub quantized: WindowGram,
    /// Sums of `x~ x^T` (row: quantized side, column: float side).
    pub cross: WindowGram,
    /// Sums of `x x^T`.
    pub float: WindowGram,
    pub quantized_means: WindowMeans,
    pub float_means: WindowMeans,
}

impl PairedGram {
    /// The sums over `quantized` and `float`, one layer input of shape `dims` on each side.
    pub fn of(
        window: &Window,
        kernel: &[usize],
        dims: &[usize],
        quantized: &[f32],
        float: &[f32],
    ) -> Result<PairedGram> {
        ensure!(
            quantized.len() == float.len() && dims.iter().product::<usize>() == float.len(),
            "paired inputs of {} and {} values for shape {dims:?}",
            quantized.len(),
            float.len()
        );
        let n = match window {
            Window::Dense { trans_a: true, .. } => 1,
            _ => dims.first().copied().unwrap_or(1).max(1),
        };
        let per = float.len() / n;
        let blocks: Vec<std::ops::Range<usize>> = (0..BLOCKS.min(n))
            .map(|b| b * n / BLOCKS.min(n)..(b + 1) * n / BLOCKS.min(n))
            .filter(|r| !r.is_empty())
            .collect();
        let block = |r: &std::ops::Range<usize>| -> Result<PairedGram> {
            let mut d = dims.to_vec();
            if n > 1 {
                d[0] = r.len();
            }
            let (q, f) = (
                &quantized[r.start * per..r.end * per],
                &float[r.start * per..r.end * per],
            );
            let mut g = PairedGram::default();
            let windows = patches(window, kernel, &d, &[q, f], |group, groups, p, k| {
                g.quantized.add(group, groups, &p[0], &p[0], k)?;
                g.cross.add(group, groups, &p[0], &p[1], k)?;
                g.float.add(group, groups, &p[1], &p[1], k)
            })?;
            (g.quantized.count, g.cross.count, g.float.count) = (windows, windows, windows);
            g.quantized_means.observe(window, kernel, &d, q)?;
            g.float_means.observe(window, kernel, &d, f)?;
            Ok(g)
        };
        let mut total = PairedGram::default();
        for chunk in blocks.chunks(IN_FLIGHT) {
            for g in super::par_map(chunk, block) {
                let g = g?;
                total.quantized.merge(&g.quantized)?;
                total.cross.merge(&g.cross)?;
                total.float.merge(&g.float)?;
                total.quantized_means.merge(&g.quantized_means);
                total.float_means.merge(&g.float_means);
            }
        }
        Ok(total)
    }

    /// Whether the windows are enough for a target other than the float weights.
    pub fn fits_a_target(&self) -> bool {
        self.quantized.count >= MIN_WINDOWS_PER_COLUMN * self.quantized.k as u64
    }

    /// The target rows `(H~ + l I)^-1 (M + l I) w_r` of weight rows `w` (rows split evenly among the
    /// groups, in order), with `l` = `ridge` times the mean diagonal of each group's `H~`.
    pub fn target(&self, w: &[f32], ridge: f64) -> Result<Vec<f32>> {
        let (k, per_group) = self.quantized.rows_per_group(w.len())?;
        let count = self.cross.count.max(1) as f64;
        let mut out = Vec::with_capacity(w.len());
        for g in 0..self.quantized.groups {
            let h = self.quantized.normalised(g, 0.0)?;
            let m = &self.cross.sums[g * k * k..][..k * k];
            let rows = &w[g * per_group * k..][..per_group * k];
            let diagonal = (0..k).map(|i| h[i * k + i]).sum::<f64>() / k as f64;
            let l = ridge * diagonal;
            if diagonal <= 0.0 {
                out.extend_from_slice(rows);
                continue;
            }
            let a = Mat::from_fn(k, k, |i, j| h[i * k + j] + if i == j { l } else { 0.0 });
            let b = Mat::from_fn(k, per_group, |i, r| {
                let row = &rows[r * k..][..k];
                let mw: f64 = (0..k).map(|j| m[i * k + j] / count * row[j] as f64).sum();
                mw + l * row[i] as f64
            });
            let llt = a.llt(Side::Lower).map_err(|_| {
                anyhow!("the quantized input's Gram matrix is not positive definite")
            })?;
            let x = llt.solve(&b);
            for r in 0..per_group {
                out.extend((0..k).map(|i| x[(i, r)] as f32));
            }
        }
        Ok(out)
    }

    /// The real output error `sum_r E|w~_r x~ - w_r x|^2` of rounded rows `values` against the float
    /// rows `w` (rows split evenly among the groups, in order).
    pub fn output_error(&self, w: &[f32], values: &[f32]) -> Result<f64> {
        ensure!(
            w.len() == values.len(),
            "{} values for {} weights",
            values.len(),
            w.len()
        );
        let (k, per_group) = self.quantized.rows_per_group(w.len())?;
        let count = self.quantized.count.max(1) as f64;
        let mut total = 0.0;
        for g in 0..self.quantized.groups {
            let span = g * k * k..(g + 1) * k * k;
            let rows = g * per_group * k..(g + 1) * per_group * k;
            let a: Vec<f64> = values[rows.clone()].iter().map(|&v| v as f64).collect();
            let b: Vec<f64> = w[rows].iter().map(|&v| v as f64).collect();
            // sum_r a_r S c_r for rows `a`, `c` and `k x k` sums `S`.
            let form = |x: &[f64], sums: &[f64], y: &[f64]| -> f64 {
                let xs = times(x, sums, per_group, k);
                xs.iter().zip(y).map(|(p, q)| p * q).sum::<f64>()
            };
            total += form(&a, &self.quantized.sums[span.clone()], &a)
                - 2.0 * form(&a, &self.cross.sums[span.clone()], &b)
                + form(&b, &self.float.sums[span], &b);
        }
        total /= count;
        Ok(total.max(0.0))
    }
}

/// `x S` for `x` (`n x k`) and `S` (`k x k`), row-major.
fn times(x: &[f64], sums: &[f64], n: usize, k: usize) -> Vec<f64> {
    let mut out = vec![0f64; n * k];
    // SAFETY: `x` holds `n x k` values, `sums` `k x k` and `out` `n x k`, with the strides given.
    unsafe {
        matrixmultiply::dgemm(
            n,
            k,
            k,
            1.0,
            x.as_ptr(),
            k as isize,
            1,
            sums.as_ptr(),
            k as isize,
            1,
            0.0,
            out.as_mut_ptr(),
            k as isize,
            1,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn dense() -> Window {
        Window::Dense {
            trans_a: false,
            trans_b: true,
        }
    }

    /// `E|w~ x~ - w x|^2` summed over rows, computed sample by sample.
    fn direct(w: &[f32], values: &[f32], xq: &[f32], xf: &[f32], k: usize) -> f64 {
        let n = xf.len() / k;
        let mut total = 0.0;
        for (row, vrow) in w.chunks(k).zip(values.chunks(k)) {
            for s in 0..n {
                let (q, f) = (&xq[s * k..][..k], &xf[s * k..][..k]);
                let y: f64 = vrow
                    .iter()
                    .zip(q)
                    .map(|(a, b)| (*a * *b) as f64)
                    .sum::<f64>()
                    - row
                        .iter()
                        .zip(f)
                        .map(|(a, b)| (*a * *b) as f64)
                        .sum::<f64>();
                total += y * y;
            }
        }
        total / n as f64
    }

    /// A float input with correlated columns and its quantized version with a column-dependent error.
    fn inputs(rng: &mut ChaCha8Rng, n: usize, k: usize) -> (Vec<f32>, Vec<f32>) {
        let mut xf = vec![0f32; n * k];
        let mut xq = vec![0f32; n * k];
        for s in 0..n {
            let common: f32 = rng.random_range(-1.0..1.0);
            for j in 0..k {
                let v = common + rng.random_range(-0.5..0.5f32);
                xf[s * k + j] = v;
                xq[s * k + j] = v * (1.0 + 0.1 * j as f32) + rng.random_range(-0.05..0.05f32);
            }
        }
        (xq, xf)
    }

    #[test]
    fn the_target_turns_the_real_error_into_a_gram_form() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (n, k, rows) = (400, 6, 3);
        let (xq, xf) = inputs(&mut rng, n, k);
        let w: Vec<f32> = (0..rows * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let g = PairedGram::of(&dense(), &[], &[n, k], &xq, &xf).unwrap();
        assert_eq!(g.quantized.count, n as u64);
        // The real error, as the sums give it, for the float weights and for another candidate.
        let other: Vec<f32> = w.iter().map(|v| v * 0.8 + 0.01).collect();
        for candidate in [&w, &other] {
            let e = g.output_error(&w, candidate).unwrap();
            let d = direct(&w, candidate, &xq, &xf, k);
            assert!((e - d).abs() <= 1e-4 * d.max(1e-6), "{e} against {d}");
        }
        // The exact least-squares target beats the float weights on the quantized input, and the
        // ridge moves it towards them.
        let exact = g.target(&w, 0.0).unwrap();
        let (at_target, at_float) = (
            g.output_error(&w, &exact).unwrap(),
            g.output_error(&w, &w).unwrap(),
        );
        assert!(
            at_target * 2.0 < at_float,
            "target {at_target}, float weights {at_float}"
        );
        let ridged = g.target(&w, 10.0).unwrap();
        let distance = |a: &[f32]| -> f32 { a.iter().zip(&w).map(|(x, y)| (x - y).powi(2)).sum() };
        assert!(distance(&ridged) < distance(&exact));
        // Around the target the error is a Gram form in H~: the real error of two candidates differs
        // by their difference in (v - w*) H~ (v - w*).
        let form = |v: &[f32]| {
            let d: Vec<f32> = v.iter().zip(&exact).map(|(a, b)| a - b).collect();
            g.quantized.output_error(&vec![0.0; d.len()], &d).unwrap()
        };
        let (e1, e2) = (
            g.output_error(&w, &w).unwrap(),
            g.output_error(&w, &other).unwrap(),
        );
        let (f1, f2) = (form(&w), form(&other));
        assert!(
            ((e1 - e2) - (f1 - f2)).abs() <= 1e-3 * e1.max(e2),
            "{} against {}",
            e1 - e2,
            f1 - f2
        );
    }

    #[test]
    fn identical_inputs_give_the_float_weights() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (n, k) = (200, 5);
        let (_, xf) = inputs(&mut rng, n, k);
        let w: Vec<f32> = (0..2 * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let g = PairedGram::of(&dense(), &[], &[n, k], &xf, &xf).unwrap();
        for ridge in [0.0, RIDGE] {
            let t = g.target(&w, ridge).unwrap();
            for (a, b) in t.iter().zip(&w) {
                assert!((a - b).abs() < 1e-3, "{a} against {b}");
            }
        }
        assert!(g.output_error(&w, &w).unwrap() < 1e-9);
    }
}
