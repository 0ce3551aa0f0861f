//! Clipping-range methods: from a tensor's statistics (a histogram for activations) or its exact values
//! (weights) to the range `[lo, hi]` its quantization parameters cover.
//!
//! Every method clips a range `[min, max]` by one number, the clipping value `alpha` in
//! `(0, max(|min|, |max|)]`: the clipped range is `[min, max]` intersected with `[-alpha, alpha]`.
//! On a symmetric grid that is `[-alpha, alpha]`, after ReLU `[0, alpha]`; an asymmetric range loses
//! only what lies beyond `alpha` on either side. Scaling both ends in proportion instead would cut
//! the short side of a skewed range by as much as the long one (a BatchNormalization input in
//! `[-100, 20]` clipped at 50 would keep only `[-50, 10]`). LAPQ optimises the same number.

use serde::Serialize;

use super::grid::Grid;
use super::hist::{BINS, Histogram};
use super::search::scan_then_brent;

/// How a clipping value is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum Clipping {
    /// The observed range.
    MinMax,
    /// The given percentile (e.g. 99.99) of |x|, as ONNX Runtime's symmetric percentile calibrator.
    Percentile(f64),
    /// Minimal KL divergence between the histogram and its quantized version (TensorRT's method,
    /// as ONNX Runtime implements it, with `2^(bits-1)` quantized bins).
    Entropy,
    /// Minimal mean `|Q(x) - x|^p` (p = 2: MMSE).
    Lp(f64),
}

/// The range `[min, max]` intersected with `[-alpha, alpha]` (a point of that interval when they are
/// disjoint).
pub fn clipped_range(min: f32, max: f32, alpha: f64) -> (f32, f32) {
    let a = alpha.max(0.0) as f32;
    (min.max(-a).min(a), max.min(a).max(-a))
}

/// The clipping value of an activation from its histogram.
pub fn alpha_from_histogram(h: &Histogram, grid: Grid, how: Clipping) -> f64 {
    let amax = h.min.abs().max(h.max.abs()) as f64;
    if h.total == 0 || amax == 0.0 {
        return 0.0;
    }
    let alpha = match how {
        Clipping::MinMax => amax,
        Clipping::Percentile(q) => percentile(h, q),
        Clipping::Entropy => entropy_threshold(h, grid),
        Clipping::Lp(p) => {
            let bins = histogram_points(h);
            scan_then_brent(
                |a| lp_error(&bins, h.min, h.max, a, grid, p),
                amax,
                24,
                1e-3,
            )
            .0
        }
    };
    alpha.clamp(f64::MIN_POSITIVE, amax)
}

/// The clipping value of a weight (or one channel of it) from its exact values.
pub fn alpha_from_values(values: &[f32], grid: Grid, how: Clipping) -> f64 {
    let (min, max) = values
        .iter()
        .fold((0f32, 0f32), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    let amax = min.abs().max(max.abs()) as f64;
    if amax == 0.0 {
        return 0.0;
    }
    match how {
        Clipping::MinMax => amax,
        Clipping::Percentile(_) | Clipping::Entropy => {
            alpha_from_histogram(&Histogram::of(values), grid, how)
        }
        Clipping::Lp(p) => {
            let err = |a| lp_error_exact(values, min, max, a, grid, p);
            scan_then_brent(err, amax, 24, 1e-3).0
        }
    }
}

/// The scale and the code bounds relative to the zero point (`x / scale` is clamped to them) of
/// parameters covering `[min, max]` clipped at `alpha`; `None` for a non-finite range.
fn clipped_grid(min: f32, max: f32, alpha: f64, grid: Grid) -> Option<(f32, f32, f32)> {
    let (lo, hi) = clipped_range(min, max, alpha);
    let (scale, zp) = grid.params_for_range(lo, hi).ok()?;
    Some((scale, (grid.qmin() - zp) as f32, (grid.qmax() - zp) as f32))
}

/// Mean `|Q(x) - x|^p` over weighted points, with parameters covering the range clipped at `alpha`.
pub fn lp_error(points: &[(f64, f64)], min: f32, max: f32, alpha: f64, grid: Grid, p: f64) -> f64 {
    let Some((scale, qmin, qmax)) = clipped_grid(min, max, alpha, grid) else {
        return f64::INFINITY;
    };
    let (s, qmin, qmax) = (scale as f64, qmin as f64, qmax as f64);
    let (mut sum, mut weight) = (0.0, 0.0);
    for &(x, n) in points {
        let q = (x / s).round_ties_even().clamp(qmin, qmax) * s;
        let e = (q - x).abs();
        sum += n * if p == 2.0 { e * e } else { e.powf(p) };
        weight += n;
    }
    if weight > 0.0 { sum / weight } else { 0.0 }
}

/// Mean `|Q(x) - x|^p` over exact values (f32 arithmetic, both cores for large tensors), with
/// parameters covering the range clipped at `alpha`.
pub fn lp_error_exact(values: &[f32], min: f32, max: f32, alpha: f64, grid: Grid, p: f64) -> f64 {
    let Some((scale, qmin, qmax)) = clipped_grid(min, max, alpha, grid) else {
        return f64::INFINITY;
    };
    let pf = p as f32;
    let sum = |chunk: &[f32]| -> f64 {
        let mut acc = 0f64;
        for block in chunk.chunks(1024) {
            let mut part = 0f32;
            for &x in block {
                let e = ((x / scale).round_ties_even().clamp(qmin, qmax) * scale - x).abs();
                part += if pf == 2.0 { e * e } else { e.powf(pf) };
            }
            acc += part as f64;
        }
        acc
    };
    let total = if values.len() >= 1 << 16 {
        let (a, b) = values.split_at(values.len() / 2);
        std::thread::scope(|s| {
            let h = s.spawn(|| sum(b));
            sum(a) + h.join().unwrap_or(f64::NAN)
        })
    } else {
        sum(values)
    };
    total / values.len().max(1) as f64
}

/// Weighted points standing for a histogram: 4 evenly spaced points per non-empty bin (the values are
/// taken as uniform within a bin), limited to the observed range.
fn histogram_points(h: &Histogram) -> Vec<(f64, f64)> {
    const PER_BIN: usize = 4;
    let w = h.width();
    let mut points = vec![];
    for (i, &c) in h.counts.iter().enumerate().filter(|(_, c)| **c > 0) {
        let lo = h.edge(i).max(h.min as f64);
        let hi = (h.edge(i) + w).min(h.max as f64).max(lo);
        for k in 0..PER_BIN {
            let x = lo + (k as f64 + 0.5) / PER_BIN as f64 * (hi - lo);
            points.push((x, c as f64 / PER_BIN as f64));
        }
    }
    points
}

/// The `q`-th percentile of |x|: the upper edge of the bin holding the value of rank
/// `ceil(q / 100 * n)` in ascending order.
fn percentile(h: &Histogram, q: f64) -> f64 {
    let folded = h.folded();
    let rank = percentile_rank(q, h.total);
    let mut cum = 0u64;
    for (k, &c) in folded.iter().enumerate() {
        cum += c;
        if cum >= rank {
            return (k + 1) as f64 * h.width();
        }
    }
    h.limit as f64
}

/// The rank (1-based) of the `q`-th percentile of `n` values.
fn percentile_rank(q: f64, n: u64) -> u64 {
    ((q / 100.0).clamp(0.0, 1.0) * n as f64 - 1e-9)
        .ceil()
        .max(1.0) as u64
}

/// The entropy method's clipping value on a grid: `kl_threshold` with as many quantized bins as the
/// grid places levels in the window.
///
/// Unlike ONNX Runtime, which always merges the window into 128 bins (64 per side, a quarter of
/// uint8's levels after ReLU), the count is `2^bits` for signed data and twice that for non-negative
/// data (all levels on one side), at most half the histogram's bins.
fn entropy_threshold(h: &Histogram, grid: Grid) -> f64 {
    let levels = 1usize << grid.bits.clamp(2, 8);
    let window_levels = if h.min >= 0.0 { 2 * levels } else { levels };
    kl_threshold(h, window_levels.min(BINS / 2))
}

/// The KL search of TensorRT's calibrator (as MXNet and ONNX Runtime port it) on our histogram: for
/// every symmetric window of at least `quantized` bins around zero, the KL divergence between the
/// window (outliers added to its edge bins) and its merge into `quantized` bins; the half-width of the
/// best window (the first on ties). `quantized` must be even and at most `BINS`.
///
/// As in MXNet, the last merged bin takes the window's remainder bins and the expanded distribution
/// is real-valued. ONNX Runtime 1.31's `get_entropy_threshold` leaves the remainder bins at zero and
/// truncates the expansion to integers, so its choice differs on the same histogram.
fn kl_threshold(h: &Histogram, quantized: usize) -> f64 {
    let zero = BINS / 2;
    let half_q = quantized / 2;
    let (mut best, mut best_kl) = (h.limit as f64, f64::INFINITY);
    for i in half_q..=zero {
        let start = zero - i;
        let end = (zero + i + 1).min(BINS);
        let slice = &h.counts[start..end];
        let mut p: Vec<f64> = slice.iter().map(|&c| c as f64).collect();
        let last = p.len() - 1;
        p[0] += h.counts[..start].iter().sum::<u64>() as f64;
        p[last] += h.counts[end..].iter().sum::<u64>() as f64;
        let merged = slice.len() / quantized;
        let mut q = vec![0f64; p.len()];
        for j in 0..quantized {
            let (a, b) = (
                j * merged,
                if j + 1 == quantized {
                    slice.len()
                } else {
                    (j + 1) * merged
                },
            );
            let total: u64 = slice[a..b].iter().sum();
            let nonzero = p[a..b].iter().filter(|&&x| x != 0.0).count();
            if nonzero > 0 {
                for k in a..b {
                    if p[k] != 0.0 {
                        q[k] = total as f64 / nonzero as f64;
                    }
                }
            }
        }
        let kl = match (smooth(&p), smooth(&q)) {
            (Some(p), Some(q)) => kl_divergence(&p, &q),
            _ => f64::INFINITY,
        };
        if kl < best_kl {
            best_kl = kl;
            best = h.edge(end).max(-h.edge(start));
        }
    }
    best
}

/// ONNX Runtime's `smooth_distribution`: zeros become `eps`, taken off the non-zero entries.
fn smooth(p: &[f64]) -> Option<Vec<f64>> {
    const EPS: f64 = 1e-4;
    let zeros = p.iter().filter(|&&x| x == 0.0).count();
    let nonzeros = p.len() - zeros;
    if nonzeros == 0 {
        return None;
    }
    let eps1 = EPS * zeros as f64 / nonzeros as f64;
    Some(
        p.iter()
            .map(|&x| if x == 0.0 { EPS } else { x - eps1 })
            .collect(),
    )
}

fn kl_divergence(p: &[f64], q: &[f64]) -> f64 {
    let (sp, sq) = (p.iter().sum::<f64>(), q.iter().sum::<f64>());
    p.iter()
        .zip(q)
        .filter(|(a, _)| **a > 0.0)
        .map(|(a, b)| {
            let (a, b) = (a / sp, b / sq);
            a * (a / b).ln()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn laplace(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let u: f64 = rng.random_range(-0.5..0.5);
                (-u.signum() * (1.0 - 2.0 * u.abs()).ln()) as f32
            })
            .collect()
    }

    fn brute_force(f: impl Fn(f64) -> f64, hi: f64) -> (f64, f64) {
        (1..=4000)
            .map(|k| k as f64 * hi / 4000.0)
            .map(|a| (a, f(a)))
            .fold((0.0, f64::INFINITY), |b, c| if c.1 < b.1 { c } else { b })
    }

    #[test]
    fn lp_clipping_on_exact_values_matches_brute_force() {
        for (seed, bits, p) in [(1, 4, 2.0), (2, 3, 2.5), (3, 8, 2.0), (4, 2, 3.0)] {
            let x = laplace(4000, seed);
            let grid = Grid {
                bits,
                signed: true,
                symmetric: true,
                narrow: true,
            };
            let (min, max) = x
                .iter()
                .fold((0f32, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
            let points: Vec<(f64, f64)> = x.iter().map(|&v| (v as f64, 1.0)).collect();
            let err = |a: f64| lp_error(&points, min, max, a, grid, p);
            let amax = min.abs().max(max.abs()) as f64;
            let ours = alpha_from_values(&x, grid, Clipping::Lp(p));
            let (_, best) = brute_force(err, amax);
            // The error at our clipping value is as low as the best of 4000 candidates, to 0.5 %.
            assert!(
                err(ours) <= best * 1.005,
                "bits {bits} p {p}: {} vs {best}",
                err(ours)
            );
        }
    }

    #[test]
    fn lp_clipping_on_histograms_matches_brute_force_on_the_data() {
        let x: Vec<f32> = laplace(20000, 7).iter().map(|v| v.abs()).collect();
        let grid = Grid {
            bits: 4,
            signed: false,
            symmetric: false,
            narrow: false,
        };
        let h = Histogram::of(&x);
        let ours = alpha_from_histogram(&h, grid, Clipping::Lp(2.0));
        let max = x.iter().copied().fold(0f32, f32::max);
        let points: Vec<(f64, f64)> = x.iter().map(|&v| (v as f64, 1.0)).collect();
        let err = |a: f64| lp_error(&points, 0.0, max, a, grid, 2.0);
        let (_, best) = brute_force(err, max as f64);
        assert!(err(ours) <= best * 1.01, "{} vs {best}", err(ours));
    }

    #[test]
    fn percentile_matches_sorting() {
        let x = laplace(100_000, 3);
        let h = Histogram::of(&x);
        let mut abs: Vec<f32> = x.iter().map(|v| v.abs()).collect();
        abs.sort_by(f32::total_cmp);
        for q in [90.0, 99.0, 99.9, 99.99] {
            let exact = abs[percentile_rank(q, abs.len() as u64) as usize - 1] as f64;
            let ours = alpha_from_histogram(&h, Grid::U8_ASYM, Clipping::Percentile(q));
            assert!(
                (ours - exact).abs() <= h.width() + 1e-9,
                "q {q}: {ours} vs {exact}"
            );
        }
        let all = alpha_from_histogram(&h, Grid::U8_ASYM, Clipping::Percentile(100.0));
        assert_eq!(all, *abs.last().unwrap() as f64);
    }

    #[test]
    fn entropy_clips_long_tails_and_keeps_compact_ranges() {
        // A Laplace distribution has outliers far beyond its bulk: entropy clips them.
        let x = laplace(200_000, 5);
        let h = Histogram::of(&x);
        let amax = h.min.abs().max(h.max.abs()) as f64;
        let t = alpha_from_histogram(&h, Grid::I8_SYM, Clipping::Entropy);
        assert!(t < 0.9 * amax && t > 2.0, "threshold {t} of {amax}");
        // A uniform distribution has nothing to clip.
        let u: Vec<f32> = (0..100_000).map(|i| (i as f32 / 50_000.0) - 1.0).collect();
        let t = alpha_from_histogram(&Histogram::of(&u), Grid::I8_SYM, Clipping::Entropy);
        assert!(t > 0.95, "threshold {t}");
    }

    #[test]
    fn histogram_methods_keep_the_short_side_of_a_skewed_range() {
        // A pre-BatchNormalization activation: the bulk in [0, 20], a sparse negative tail to -100
        // (ppocr_det's entropy run kept a fifth of the positive side: IoU 0.000 -> 0.925 fixed).
        let mut x: Vec<f32> = (0..100_000).map(|i| (i % 2000) as f32 / 100.0).collect();
        x.extend((0..200).map(|i| -100.0 * (i as f32 + 1.0) / 200.0));
        let h = Histogram::of(&x);
        for how in [
            Clipping::Entropy,
            Clipping::Percentile(99.9),
            Clipping::Lp(2.0),
        ] {
            let alpha = alpha_from_histogram(&h, Grid::U8_ASYM, how);
            let (lo, hi) = clipped_range(h.min, h.max, alpha);
            assert!(hi >= 19.0, "{how:?}: [{lo}, {hi}] cuts the bulk");
        }
    }

    #[test]
    fn clipped_range_cuts_each_side_at_alpha_and_never_widens() {
        // The short side of a skewed range keeps all of itself (regression: ppocr_det's entropy run
        // scaled both sides and cut its positive activations to a fifth).
        assert_eq!(clipped_range(-100.0, 20.0, 50.0), (-50.0, 20.0));
        assert_eq!(clipped_range(-1.0, 4.0, 2.0), (-1.0, 2.0));
        assert_eq!(clipped_range(-1.0, 4.0, 0.5), (-0.5, 0.5));
        assert_eq!(clipped_range(0.0, 4.0, 8.0), (0.0, 4.0));
        assert_eq!(clipped_range(2.0, 10.0, 1.0), (1.0, 1.0));
        assert_eq!(clipped_range(0.0, 0.0, 1.0), (0.0, 0.0));
    }
}
