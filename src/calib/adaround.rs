//! Adaptive rounding (AdaRound, Nagel et al., 2020), without autodiff. Each weight `w` on scale `s`
//! rounds down or up: `w~ = s (floor(w / s) + h)`, with `h` relaxed to the rectified sigmoid
//! `h(v) = clip(sigmoid(v) (ZETA - GAMMA) + GAMMA, 0, 1)`. A layer's output error for weight error
//! `D` is `E[|D x|^2] = tr(D H D^T)` with `H = E[x x^T]` the mean Gram matrix of its input windows,
//! so the objective `sum_r d_r H d_r^T + reg sum (1 - |2 h - 1|^beta)` and its gradient
//! `2 s (D H) h'(v)` need `H` only: a step costs `rows x k^2` whatever the number of samples. Adam
//! descends on `v`, `beta` anneals from `BETA.0` to `BETA.1` after a warm start without the
//! regulariser, and `h >= 1/2` decides each code. A row whose result reconstructs worse than its
//! fallback (nearest or GPTQ's rounding) keeps the fallback.
//!
//! Rounding up or down from the weights themselves cannot reach codes two steps away, which strongly
//! correlated inputs call for (a stem Conv's neighbouring pixels): there GPTQ's error feedback
//! reconstructs 8x better. So the pipeline starts AdaRound from GPTQ's compensated values instead.

use anyhow::{Result, ensure};

use super::gptq::{WindowGram, row_errors, times_gram};
use super::grid::Grid;

/// The rectified sigmoid's stretch (the paper's zeta and gamma).
const ZETA: f32 = 1.1;
const GAMMA: f32 = -0.1;
/// Adam steps per layer.
pub const ITERATIONS: usize = 1000;
/// Adam's step size on `v`.
const LEARNING_RATE: f32 = 0.01;
/// Weight of the rounding regulariser against the output error summed over rows (AIMET's 0.01).
const REGULARISER: f32 = 0.01;
/// The regulariser's exponent, annealed from the first to the second value (AIMET's (20, 2)).
const BETA: (f32, f32) = (20.0, 2.0);
/// Share of the steps that run before the regulariser starts (AIMET's 0.2).
const WARM_START: f32 = 0.2;
/// Rows optimised together in one matrix product: fixed, so that results do not depend on the
/// number of cores.
const CHUNK: usize = 16;

/// A layer's rounded weights and their output error `sum_r d_r H d_r^T`.
#[derive(Clone, Debug, PartialEq)]
pub struct Rounded {
    /// `rows x k`, row-major, each on its row's grid.
    pub values: Vec<f32>,
    pub error: f64,
}

/// Adaptive rounding of weight rows `w` (`rows x k`, row-major) whose columns see inputs of Gram
/// matrix `gram` (rows split evenly among its groups, in order), `iterations` Adam steps. Each value
/// rounds down or up from `start` (the same layout: `w` itself, or GPTQ's compensated values,
/// [`super::gptq::feedback_rounding`]); rows that AdaRound does not improve keep `fallback`. Errors
/// are always measured against `w`. Row `r` quantizes with `scales[r]` and `zero_points[r]`; values
/// that clipping fixes stay fixed.
#[allow(clippy::too_many_arguments)]
pub fn round_rows(
    w: &[f32],
    start: &[f32],
    fallback: &[f32],
    gram: &WindowGram,
    grid: Grid,
    scales: &[f32],
    zero_points: &[i64],
    iterations: usize,
) -> Result<Rounded> {
    let (k, per_group) = gram.layout(w.len(), scales, zero_points)?;
    ensure!(
        start.len() == w.len() && fallback.len() == w.len(),
        "{} start and {} fallback values for {} weights",
        start.len(),
        fallback.len(),
        w.len()
    );
    let grams: Vec<Vec<f32>> = (0..gram.groups)
        .map(|g| Ok(gram.normalised(g, 0.0)?.iter().map(|&v| v as f32).collect()))
        .collect::<Result<_>>()?;
    let rows = w.len() / k;
    // Chunks never straddle groups: each multiplies by one Gram matrix.
    let chunks: Vec<(usize, usize)> = (0..gram.groups)
        .flat_map(|g| {
            (g * per_group..(g + 1) * per_group)
                .step_by(CHUNK)
                .map(move |r| (r, CHUNK.min((g + 1) * per_group - r)))
        })
        .collect();
    let results = super::par_map(&chunks, |&(first, n)| {
        let span = first * k..(first + n) * k;
        let problem = Problem::new(
            &w[span.clone()],
            &start[span.clone()],
            &grams[first / per_group],
            k,
            grid,
            &scales[first..first + n],
            &zero_points[first..first + n],
        );
        let hard = problem.hard(&problem.descend(iterations));
        let fallback = &fallback[span];
        let (e_fallback, e_ada) = (
            row_errors(problem.w, fallback, problem.h, k),
            row_errors(problem.w, &hard, problem.h, k),
        );
        let mut out = Rounded {
            values: Vec::with_capacity(n * k),
            error: 0.0,
        };
        for r in 0..n {
            let (values, e) = if e_ada[r] < e_fallback[r] {
                (&hard[..], e_ada[r])
            } else {
                (fallback, e_fallback[r])
            };
            out.values.extend_from_slice(&values[r * k..(r + 1) * k]);
            out.error += e;
        }
        out
    });
    let mut out = Rounded {
        values: Vec::with_capacity(rows * k),
        error: 0.0,
    };
    for r in results {
        out.values.extend_from_slice(&r.values);
        out.error += r.error;
    }
    Ok(out)
}

/// One chunk of rows of one group: the relaxed objective over `v`, one value per weight.
struct Problem<'a> {
    /// `n x k` weights and the `k x k` mean Gram of their inputs.
    w: &'a [f32],
    h: &'a [f32],
    k: usize,
    /// Per value: its row's scale, its lower code relative to the zero point, and whether it may
    /// round either way (both neighbours on the grid; else it stays at `base`).
    scale: Vec<f32>,
    base: Vec<f32>,
    free: Vec<bool>,
    /// `v` where `h(v)` is `start`'s fractional part: `start`'s own relaxation.
    v0: Vec<f32>,
}

impl<'a> Problem<'a> {
    /// Rows `w` (`n x k`) rounding from `start`, row `r` on `grid` with `scales[r]` and
    /// `zero_points[r]`, for inputs of mean Gram `h` (`k x k`).
    fn new(
        w: &'a [f32],
        start: &[f32],
        h: &'a [f32],
        k: usize,
        grid: Grid,
        scales: &[f32],
        zero_points: &[i64],
    ) -> Problem<'a> {
        let (qmin, qmax) = (grid.qmin() as f32, grid.qmax() as f32);
        let mut p = Problem {
            w,
            h,
            k,
            scale: vec![0.0; w.len()],
            base: vec![0.0; w.len()],
            free: vec![false; w.len()],
            v0: vec![0.0; w.len()],
        };
        for (i, &x) in start.iter().enumerate() {
            let (s, z) = (scales[i / k], zero_points[i / k] as f32);
            let (lo, hi) = (qmin - z, qmax - z);
            let f = (x / s).floor();
            p.scale[i] = s;
            if f >= lo && f + 1.0 <= hi {
                p.base[i] = f;
                p.free[i] = true;
                let rest = (x / s - f).clamp(0.0, 1.0);
                p.v0[i] = -((ZETA - GAMMA) / (rest - GAMMA) - 1.0).ln();
            } else {
                p.base[i] = f.clamp(lo, hi);
            }
        }
        p
    }

    /// The relaxed objective at `v`, with the regulariser of exponent `beta` when given, and its
    /// gradient (into `grad`).
    fn objective(&self, v: &[f32], beta: Option<f32>, grad: &mut [f32]) -> f64 {
        let k = self.k;
        let delta: Vec<f32> = (0..v.len())
            .map(|i| {
                let h = if self.free[i] { relaxed(v[i]) } else { 0.0 };
                self.scale[i] * (self.base[i] + h) - self.w[i]
            })
            .collect();
        let mut product = vec![0f32; delta.len()];
        times_gram(&delta, self.h, &mut product, delta.len() / k, k);
        let mut total: f64 = delta
            .iter()
            .zip(&product)
            .map(|(d, p)| (d * p) as f64)
            .sum();
        for i in 0..v.len() {
            grad[i] = 0.0;
            if !self.free[i] {
                continue;
            }
            let sig = 1.0 / (1.0 + (-v[i]).exp());
            let stretched = sig * (ZETA - GAMMA) + GAMMA;
            let mut dh = 2.0 * self.scale[i] * product[i];
            if let Some(beta) = beta {
                let c = 2.0 * stretched.clamp(0.0, 1.0) - 1.0;
                total += (REGULARISER * (1.0 - c.abs().powf(beta))) as f64;
                dh -= REGULARISER * 2.0 * beta * c.abs().powf(beta - 1.0) * c.signum();
            }
            if stretched > 0.0 && stretched < 1.0 {
                grad[i] = dh * (ZETA - GAMMA) * sig * (1.0 - sig);
            }
        }
        total
    }

    /// `v` after `iterations` Adam steps from `v0`: a warm start without the regulariser, then its
    /// exponent annealed on a cosine.
    fn descend(&self, iterations: usize) -> Vec<f32> {
        let mut v = self.v0.clone();
        let mut adam = Adam::new(v.len());
        let mut grad = vec![0f32; v.len()];
        let warm = (WARM_START * iterations as f32) as usize;
        for t in 0..iterations {
            let beta = (t >= warm).then(|| {
                let rel = (t - warm) as f32 / (iterations - warm).max(1) as f32;
                BETA.1 + 0.5 * (BETA.0 - BETA.1) * (1.0 + (rel * std::f32::consts::PI).cos())
            });
            self.objective(&v, beta, &mut grad);
            adam.step(&mut v, &grad, t + 1);
        }
        v
    }

    /// The weights rounded by `v`: up where `h(v) >= 1/2`.
    fn hard(&self, v: &[f32]) -> Vec<f32> {
        (0..v.len())
            .map(|i| {
                let up = self.free[i] && v[i] >= 0.0;
                self.scale[i] * (self.base[i] + if up { 1.0 } else { 0.0 })
            })
            .collect()
    }
}

/// The rectified sigmoid.
fn relaxed(v: f32) -> f32 {
    (1.0 / (1.0 + (-v).exp()) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)
}

/// Adam (Kingma and Ba) with PyTorch's default moments.
struct Adam {
    m: Vec<f32>,
    s: Vec<f32>,
}

impl Adam {
    fn new(n: usize) -> Adam {
        Adam {
            m: vec![0.0; n],
            s: vec![0.0; n],
        }
    }

    fn step(&mut self, x: &mut [f32], grad: &[f32], t: usize) {
        const B1: f32 = 0.9;
        const B2: f32 = 0.999;
        const EPS: f32 = 1e-8;
        let (c1, c2) = (1.0 - B1.powi(t as i32), 1.0 - B2.powi(t as i32));
        for ((x, g), (m, s)) in x
            .iter_mut()
            .zip(grad)
            .zip(self.m.iter_mut().zip(self.s.iter_mut()))
        {
            *m = B1 * *m + (1.0 - B1) * g;
            *s = B2 * *s + (1.0 - B2) * g * g;
            *x -= LEARNING_RATE * (*m / c1) / ((*s / c2).sqrt() + EPS);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calib::bias::{Window, WindowStat};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A Gram of correlated inputs (a shared factor plus noise), `n` windows of `k` values.
    fn gram(rng: &mut ChaCha8Rng, n: usize, k: usize) -> WindowGram {
        let x: Vec<f32> = (0..n)
            .flat_map(|_| {
                let f: f32 = rng.random_range(-1.0..1.0);
                (0..k)
                    .map(|_| f + 0.3 * rng.random_range(-1.0f32..1.0))
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut g = WindowGram::default();
        let window = Window::Dense {
            trans_a: false,
            trans_b: false,
        };
        g.observe(&window, &[], &[n, k], &x).unwrap();
        g
    }

    const GRID4: Grid = Grid {
        bits: 4,
        ..Grid::I8_SYM
    };

    #[test]
    fn the_gradient_matches_finite_differences() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (m, k) = (3, 7);
        let g = gram(&mut rng, 200, k);
        let h: Vec<f32> = g
            .normalised(0, 0.0)
            .unwrap()
            .iter()
            .map(|&v| v as f32)
            .collect();
        let w: Vec<f32> = (0..m * k).map(|_| rng.random_range(-0.8..0.8)).collect();
        let scales = [0.11f32, 0.09, 0.13];
        let zps = [0i64; 3];
        let p = Problem::new(&w, &w, &h, k, GRID4, &scales, &zps);
        // Inside the rectified sigmoid's linear part, where the objective is smooth.
        let v: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.5..1.5)).collect();
        for beta in [None, Some(6.0)] {
            let mut grad = vec![0f32; v.len()];
            p.objective(&v, beta, &mut grad);
            let mut scratch = vec![0f32; v.len()];
            for i in 0..v.len() {
                let eps = 1e-2f32;
                let (mut up, mut down) = (v.clone(), v.clone());
                up[i] += eps;
                down[i] -= eps;
                let numeric = (p.objective(&up, beta, &mut scratch)
                    - p.objective(&down, beta, &mut scratch))
                    / (2.0 * eps as f64);
                let tolerance = 2e-2 * numeric.abs().max(1e-2);
                assert!(
                    (grad[i] as f64 - numeric).abs() <= tolerance,
                    "beta {beta:?}, value {i}: gradient {} against finite differences {numeric}",
                    grad[i]
                );
            }
        }
    }

    #[test]
    fn adaptive_rounding_reconstructs_better_than_nearest_and_stays_on_the_grid() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let (m, k) = (20, 24);
        let g = gram(&mut rng, 400, k);
        let w: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let scales: Vec<f32> = (0..m).map(|r| 0.12 + 0.01 * r as f32).collect();
        let zps = vec![0i64; m];
        let nearest: Vec<f32> = w
            .iter()
            .enumerate()
            .map(|(i, &v)| GRID4.fake_quant(v, scales[i / k], 0))
            .collect();
        let r = round_rows(&w, &w, &nearest, &g, GRID4, &scales, &zps, ITERATIONS).unwrap();
        let nearest_error = g.output_error(&w, &nearest).unwrap();
        assert!(
            r.error < 0.5 * nearest_error,
            "AdaRound {} against nearest {nearest_error}",
            r.error
        );
        let measured = g.output_error(&w, &r.values).unwrap();
        assert!((measured - r.error).abs() <= 1e-4 * measured.max(1e-9));
        for (i, &v) in r.values.iter().enumerate() {
            let s = scales[i / k];
            assert_eq!(GRID4.fake_quant(v, s, 0), v, "weight {i} is off its grid");
            // Inside the grid's range each value rounds down or up, never further.
            if (w[i] / s).abs() < (GRID4.qmax() - 1) as f32 {
                assert!(
                    (v - w[i]).abs() < s * 1.0001,
                    "weight {i}: {v} for {}",
                    w[i]
                );
            }
        }
    }
}
