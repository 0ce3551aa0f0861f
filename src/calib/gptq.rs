//! Rounding with error feedback (GPTQ, Frantar et al., 2022). A layer's output error for weight
//! error `D` is `E[|D x|^2] = tr(D H D^T)` with `H = E[x x^T]` the Gram matrix of its input windows.
//! Rounding each weight to its nearest code ignores how the inputs correlate; GPTQ rounds one input
//! column at a time and moves each rounding error onto the columns not yet rounded, along the rows of
//! the upper Cholesky factor of `H^-1`, which minimises that error column by column. Each output row
//! keeps its scale and zero point: only the choice of codes changes.

use anyhow::{Result, anyhow, ensure};
use faer::linalg::solvers::DenseSolveCore;
use faer::{Mat, Side};

use super::bias::{Im2col, Window, WindowStat};
use super::grid::Grid;

/// Relative damping added to the Gram matrix's diagonal (the GPTQ authors' 1 % of its mean), which
/// keeps the inverse well conditioned where inputs are nearly collinear.
const DAMPING: f64 = 0.01;

/// Sum of `x x^T` over every window of a layer's input (the columns of its weight rows, in the
/// weight's own layout: input channel, then kernel positions), and how many windows were summed.
/// A grouped Conv has one sum per group: group `g`'s output rows read only its input channels.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WindowGram {
    /// Columns of a weight row: `K` for Gemm, `C / group x k...` for Conv.
    pub k: usize,
    /// Groups of output rows with their own input windows (1 but for a grouped Conv).
    pub groups: usize,
    /// `groups x k x k`, row-major.
    pub sums: Vec<f64>,
    /// Windows summed, per group.
    pub count: u64,
}

impl WindowStat for WindowGram {
    /// Handles Gemm, MatMul (`Window::Dense`) and 1-D and 2-D Conv, grouped or not.
    fn observe(
        &mut self,
        window: &Window,
        kernel: &[usize],
        dims: &[usize],
        x: &[f32],
    ) -> Result<()> {
        let windows = patches(window, kernel, dims, &[x], |g, groups, p, k| {
            self.add(g, groups, &p[0], &p[0], k)
        })?;
        self.count += windows;
        Ok(())
    }
}

/// Extracts the input windows of a layer (the columns of its weight rows, in the weight's own
/// layout) from each of `xs`, tensors of one shape `dims`, and hands them to `f` block by block:
/// `f(group, groups, patches, k)` with one `rows x k` row-major matrix per tensor of `xs`, the rows
/// of the same windows in every matrix. Returns the number of windows per group.
pub(super) fn patches(
    window: &Window,
    kernel: &[usize],
    dims: &[usize],
    xs: &[&[f32]],
    mut f: impl FnMut(usize, usize, &[Vec<f32>], usize) -> Result<()>,
) -> Result<u64> {
    for x in xs {
        ensure!(
            dims.iter().product::<usize>() == x.len(),
            "input shape {dims:?} does not match its data"
        );
    }
    match window {
        Window::Dense { trans_a, .. } => {
            // MatMul's input `[..., K]` is `[rows, K]` with its leading axes flattened.
            ensure!(
                dims.len() >= 2 && (!*trans_a || dims.len() == 2),
                "Gemm or MatMul input of shape {dims:?}"
            );
            let (rows, k) = if *trans_a {
                (dims[1], dims[0])
            } else {
                let k = dims[dims.len() - 1];
                (dims.iter().product::<usize>() / k.max(1), k)
            };
            let blocks: Vec<Vec<f32>> = xs
                .iter()
                .map(|x| {
                    if *trans_a {
                        (0..rows * k).map(|i| x[(i % k) * rows + i / k]).collect()
                    } else {
                        x.to_vec()
                    }
                })
                .collect();
            f(0, 1, &blocks, k)?;
            Ok(rows as u64)
        }
        Window::Conv {
            group,
            strides,
            dilations,
            pads,
        } => {
            let (n, geo) = Im2col::of(strides, dilations, pads, kernel, dims, *group)?;
            let (groups, c, [h, w], [kh, kw], [oh, ow]) =
                (*group, geo.c, geo.size, geo.kernel, geo.out);
            let positions = oh * ow;
            let k = c * kh * kw;
            let mut blocks = vec![vec![0f32; positions * k]; xs.len()];
            for img in 0..n {
                for g in 0..groups {
                    for (x, patches) in xs.iter().zip(blocks.iter_mut()) {
                        geo.fill(patches, &x[(img * groups + g) * c * h * w..][..c * h * w]);
                    }
                    f(g, groups, &blocks, k)?;
                }
            }
            Ok((n * positions) as u64)
        }
    }
}

impl WindowGram {
    /// Adds `A^T B` to group `g`'s sum, for `patches` `A` and `B` (`rows x k`, row-major, the same
    /// windows); the caller counts the windows.
    pub(super) fn add(
        &mut self,
        g: usize,
        groups: usize,
        a: &[f32],
        b: &[f32],
        k: usize,
    ) -> Result<()> {
        if self.k == 0 {
            (self.k, self.groups, self.sums) = (k, groups, vec![0.0; groups * k * k]);
        }
        ensure!(
            self.k == k && self.groups == groups && a.len() == b.len(),
            "input windows of {k} values in {groups} groups after windows of {} in {}",
            self.k,
            self.groups
        );
        let gram = transposed_product(a, b, k);
        for (s, v) in self.sums[g * k * k..][..k * k].iter_mut().zip(&gram) {
            *s += *v as f64;
        }
        Ok(())
    }

    /// Adds the sums of another part of the calibration set.
    pub fn merge(&mut self, other: &WindowGram) -> Result<()> {
        if other.k == 0 {
            return Ok(());
        }
        if self.k == 0 {
            *self = other.clone();
            return Ok(());
        }
        ensure!(
            self.k == other.k && self.groups == other.groups,
            "Gram matrices of {} and {} columns",
            self.k,
            other.k
        );
        for (a, b) in self.sums.iter_mut().zip(&other.sums) {
            *a += b;
        }
        self.count += other.count;
        Ok(())
    }
}

/// The rounded values (`rows x k`, row-major, each on its row's grid) of weight rows `w` whose
/// columns see inputs of Gram matrix `gram` (rows split evenly among its groups, in order). Row `r`
/// quantizes with `scales[r]` and `zero_points[r]`. Columns whose input was always zero round to
/// nearest and pass no error on.
pub fn round_rows(
    w: &[f32],
    gram: &WindowGram,
    grid: Grid,
    scales: &[f32],
    zero_points: &[i64],
) -> Result<Vec<f32>> {
    Ok(feedback_rounding(w, gram, grid, scales, zero_points)?.0)
}

/// [`round_rows`]'s values, and the compensated values they are the nearest rounding of: each
/// weight plus the errors fed back to it from the columns rounded before it.
pub fn feedback_rounding(
    w: &[f32],
    gram: &WindowGram,
    grid: Grid,
    scales: &[f32],
    zero_points: &[i64],
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (k, per_group) = gram.layout(w.len(), scales, zero_points)?;
    let factors: Vec<Vec<f64>> = (0..gram.groups)
        .map(|g| feedback_factor(&gram.normalised(g, DAMPING)?, k))
        .collect::<Result<_>>()?;
    let rows: Vec<(usize, &[f32])> = w.chunks(k).enumerate().collect();
    let rounded = super::par_map(&rows, |(r, row)| {
        let (s, z) = (scales[*r], zero_points[*r]);
        let u = &factors[*r / per_group];
        let mut x: Vec<f64> = row.iter().map(|&v| v as f64).collect();
        let mut q = vec![0f32; k];
        for j in 0..k {
            q[j] = grid.fake_quant(x[j] as f32, s, z);
            let e = (x[j] - q[j] as f64) / u[j * k + j];
            if e != 0.0 {
                for (xt, ut) in x[j + 1..].iter_mut().zip(&u[j * k + j + 1..(j + 1) * k]) {
                    *xt -= e * ut;
                }
            }
        }
        (q, x.iter().map(|&v| v as f32).collect::<Vec<f32>>())
    });
    let (mut values, mut targets) = (Vec::with_capacity(w.len()), Vec::with_capacity(w.len()));
    for (q, x) in rounded {
        values.extend(q);
        targets.extend(x);
    }
    Ok((values, targets))
}

impl WindowGram {
    /// Checks that `values` weights with `scales` and `zero_points` (one per row) fit this Gram's
    /// layout; returns the columns per row and the rows per group.
    pub fn layout(
        &self,
        values: usize,
        scales: &[f32],
        zero_points: &[i64],
    ) -> Result<(usize, usize)> {
        let (k, per_group) = self.rows_per_group(values)?;
        ensure!(
            values / k == scales.len() && scales.len() == zero_points.len(),
            "{values} weights, {} scales for rows of {k} columns",
            scales.len()
        );
        Ok((k, per_group))
    }

    /// The columns per row and the rows per group of `values` weights.
    pub(super) fn rows_per_group(&self, values: usize) -> Result<(usize, usize)> {
        let k = self.k;
        ensure!(
            k > 0 && values.is_multiple_of(k),
            "{values} weights for rows of {k} columns"
        );
        let rows = values / k;
        ensure!(
            self.groups > 0 && rows.is_multiple_of(self.groups),
            "{rows} output rows in {} groups",
            self.groups
        );
        Ok((k, rows / self.groups))
    }

    /// The output error `sum_r d_r H d_r^T` of rows `values` against rows `w` (rows split evenly
    /// among the groups, in order).
    pub fn output_error(&self, w: &[f32], values: &[f32]) -> Result<f64> {
        ensure!(
            w.len() == values.len(),
            "{} values for {} weights",
            values.len(),
            w.len()
        );
        let (k, per_group) = self.rows_per_group(w.len())?;
        let mut total = 0.0;
        for g in 0..self.groups {
            let h: Vec<f32> = self.normalised(g, 0.0)?.iter().map(|&v| v as f32).collect();
            let span = g * per_group * k..(g + 1) * per_group * k;
            total += row_errors(&w[span.clone()], &values[span], &h, k)
                .iter()
                .sum::<f64>();
        }
        Ok(total)
    }

    /// Group `g`'s mean `E[x x^T]` (`k x k`, row-major), with `damping` times its mean diagonal
    /// added to the diagonal of the columns whose input was ever non-zero.
    pub fn normalised(&self, g: usize, damping: f64) -> Result<Vec<f64>> {
        let k = self.k;
        ensure!(g < self.groups, "group {g} of {}", self.groups);
        let count = self.count.max(1) as f64;
        let mut h: Vec<f64> = self.sums[g * k * k..][..k * k]
            .iter()
            .map(|v| v / count)
            .collect();
        let mean = (0..k).map(|i| h[i * k + i]).sum::<f64>() / k as f64;
        for i in 0..k {
            if h[i * k + i] > 0.0 {
                h[i * k + i] += damping * mean;
            }
        }
        Ok(h)
    }
}

/// `A^T B` (`k x k`, row-major) for `a` and `b` (`rows x k`, row-major).
pub(super) fn transposed_product(a: &[f32], b: &[f32], k: usize) -> Vec<f32> {
    let rows = a.len() / k.max(1);
    let mut out = vec![0f32; k * k];
    // SAFETY: `a` and `b` hold `rows x k` values and `out` `k x k`, with the strides given.
    unsafe {
        matrixmultiply::sgemm(
            k,
            rows,
            k,
            1.0,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
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

/// `out = d h` for `d` (`n x k`) and symmetric `h` (`k x k`), all row-major.
pub(super) fn times_gram(d: &[f32], h: &[f32], out: &mut [f32], n: usize, k: usize) {
    // SAFETY: `d` holds `n x k` values, `h` `k x k` and `out` `n x k`, with the strides given.
    unsafe {
        matrixmultiply::sgemm(
            n,
            k,
            k,
            1.0,
            d.as_ptr(),
            k as isize,
            1,
            h.as_ptr(),
            k as isize,
            1,
            0.0,
            out.as_mut_ptr(),
            k as isize,
            1,
        );
    }
}

/// Per row, the output error `d h d^T` of rows `values` against rows `w` (`d = values - w`, rows of
/// `k` columns) for inputs of mean Gram `h`.
pub(super) fn row_errors(w: &[f32], values: &[f32], h: &[f32], k: usize) -> Vec<f64> {
    let d: Vec<f32> = values.iter().zip(w).map(|(a, b)| a - b).collect();
    let mut product = vec![0f32; d.len()];
    times_gram(&d, h, &mut product, d.len() / k.max(1), k);
    d.chunks(k)
        .zip(product.chunks(k))
        .map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x * y) as f64).sum())
        .collect()
}

/// The upper Cholesky factor `U` of `H^-1` (`H^-1 = U^T U`), row-major, for one group's damped
/// mean Gram `h` ([`WindowGram::normalised`]); dead columns (zero diagonal) get a unit diagonal and
/// no coupling.
fn feedback_factor(h: &[f64], k: usize) -> Result<Vec<f64>> {
    let live: Vec<bool> = (0..k).map(|i| h[i * k + i] > 0.0).collect();
    let h = Mat::from_fn(k, k, |i, j| {
        if live[i] && live[j] {
            h[i * k + j]
        } else if i == j {
            1.0
        } else {
            0.0
        }
    });
    let not_definite = |_| anyhow!("the input's Gram matrix is not positive definite");
    let inverse = h.llt(Side::Lower).map_err(not_definite)?.inverse();
    let l = inverse.llt(Side::Lower).map_err(not_definite)?;
    let l = l.L();
    Ok((0..k * k)
        .map(|i| {
            let (row, col) = (i / k, i % k);
            if col >= row { l[(col, row)] } else { 0.0 }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calib::bias::Pads;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// `sum over samples |(W_hat - W) x|^2` for rows `w` (`m x k`) and inputs `x` (`n x k`).
    fn output_error(w: &[f32], w_hat: &[f32], x: &[f32], k: usize) -> f64 {
        let mut total = 0.0;
        for xs in x.chunks(k) {
            for (row, row_hat) in w.chunks(k).zip(w_hat.chunks(k)) {
                let e: f64 = row
                    .iter()
                    .zip(row_hat)
                    .zip(xs)
                    .map(|((a, b), v)| ((b - a) * v) as f64)
                    .sum();
                total += e * e;
            }
        }
        total
    }

    /// Correlated inputs (a shared factor plus noise), one always-zero column.
    fn inputs(rng: &mut ChaCha8Rng, n: usize, k: usize, dead: usize) -> Vec<f32> {
        let mut x = vec![0f32; n * k];
        for row in x.chunks_mut(k) {
            let f: f32 = rng.random_range(-1.0..1.0);
            for (j, v) in row.iter_mut().enumerate() {
                *v = if j == dead {
                    0.0
                } else {
                    f + 0.3 * rng.random_range(-1.0..1.0)
                };
            }
        }
        x
    }

    #[test]
    fn feedback_lowers_the_output_error_and_keeps_values_on_the_grid() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (n, k, m, dead) = (400, 24, 6, 5);
        let x = inputs(&mut rng, n, k, dead);
        let w: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut gram = WindowGram::default();
        let window = Window::Dense {
            trans_a: false,
            trans_b: false,
        };
        gram.observe(&window, &[], &[n, k], &x).unwrap();
        let grid = Grid {
            bits: 4,
            ..Grid::I8_SYM
        };
        let scales: Vec<f32> = (0..m).map(|r| 0.12 + 0.01 * r as f32).collect();
        let zps = vec![0; m];
        let gptq = round_rows(&w, &gram, grid, &scales, &zps).unwrap();
        let nearest: Vec<f32> = w
            .iter()
            .enumerate()
            .map(|(i, &v)| grid.fake_quant(v, scales[i / k], 0))
            .collect();
        let (e_gptq, e_near) = (
            output_error(&w, &gptq, &x, k),
            output_error(&w, &nearest, &x, k),
        );
        assert!(
            e_gptq < 0.5 * e_near,
            "GPTQ {e_gptq} against nearest {e_near}"
        );
        for (i, &v) in gptq.iter().enumerate() {
            let s = scales[i / k];
            assert_eq!(grid.fake_quant(v, s, 0), v, "weight {i} is off its grid");
        }
        // The dead column's weights round to nearest: nothing could move their error.
        for r in 0..m {
            assert_eq!(gptq[r * k + dead], nearest[r * k + dead], "row {r}");
        }
    }

    #[test]
    fn conv_windows_give_the_gram_of_their_patches() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (c, h, w, kk) = (2, 5, 4, 3);
        let x: Vec<f32> = (0..c * h * w)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let window = Window::Conv {
            group: 1,
            strides: vec![2, 1],
            dilations: vec![1, 1],
            pads: Pads::Explicit(vec![1, 1, 1, 1]),
        };
        let mut gram = WindowGram::default();
        gram.observe(&window, &[kk, kk], &[1, c, h, w], &x).unwrap();
        // Direct: every output position's window, zero outside the input.
        let (oh, ow) = ((h + 2 - kk) / 2 + 1, w + 2 - kk + 1);
        let k = c * kk * kk;
        let mut expected = vec![0f64; k * k];
        for o in 0..oh {
            for p in 0..ow {
                let mut v = vec![0f64; k];
                for ch in 0..c {
                    for i in 0..kk {
                        for j in 0..kk {
                            let (y, xx) = ((o * 2 + i) as isize - 1, (p + j) as isize - 1);
                            if y >= 0 && xx >= 0 && (y as usize) < h && (xx as usize) < w {
                                v[ch * kk * kk + i * kk + j] =
                                    x[(ch * h + y as usize) * w + xx as usize] as f64;
                            }
                        }
                    }
                }
                for a in 0..k {
                    for b in 0..k {
                        expected[a * k + b] += v[a] * v[b];
                    }
                }
            }
        }
        assert_eq!(gram.count, (oh * ow) as u64);
        for (i, (a, b)) in gram.sums.iter().zip(&expected).enumerate() {
            assert!((a - b).abs() < 1e-4, "entry {i}: {a} vs {b}");
        }
    }

    /// A grouped, strided, padded Conv: the Gram form's output error equals the squared error of
    /// the two convolutions' outputs, averaged over output positions and summed over channels.
    #[test]
    fn the_gram_gives_a_grouped_convolutions_output_error() {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let (groups, cg, h, w, kk, m) = (2, 2, 6, 5, 3, 4);
        let c = groups * cg;
        let x: Vec<f32> = (0..2 * c * h * w)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let window = Window::Conv {
            group: groups,
            strides: vec![2, 1],
            dilations: vec![1, 1],
            pads: Pads::Explicit(vec![1, 0, 1, 2]),
        };
        let mut gram = WindowGram::default();
        gram.observe(&window, &[kk, kk], &[2, c, h, w], &x).unwrap();
        let k = cg * kk * kk;
        assert_eq!((gram.k, gram.groups), (k, groups));
        let weights: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let other: Vec<f32> = weights
            .iter()
            .map(|v| v + rng.random_range(-0.1..0.1))
            .collect();
        // Direct: output (img, row, o, p) of a [m, cg, kk, kk] weight over input channels of the
        // row's group.
        let (oh, ow) = ((h + 1 + 1 - kk) / 2 + 1, w + 2 - kk + 1);
        let conv = |wt: &[f32], img: usize, row: usize, o: usize, p: usize| -> f64 {
            let g = row / (m / groups);
            let mut total = 0.0;
            for ch in 0..cg {
                for i in 0..kk {
                    for j in 0..kk {
                        let (y, xx) = ((o * 2 + i) as isize - 1, (p + j) as isize);
                        if y >= 0 && (y as usize) < h && (xx as usize) < w {
                            let input =
                                x[((img * c + g * cg + ch) * h + y as usize) * w + xx as usize];
                            total += (wt[row * k + ch * kk * kk + i * kk + j] * input) as f64;
                        }
                    }
                }
            }
            total
        };
        let mut expected = 0.0;
        for img in 0..2 {
            for row in 0..m {
                for o in 0..oh {
                    for p in 0..ow {
                        let d = conv(&other, img, row, o, p) - conv(&weights, img, row, o, p);
                        expected += d * d;
                    }
                }
            }
        }
        expected /= (2 * oh * ow) as f64;
        assert_eq!(gram.count, (2 * oh * ow) as u64);
        let got = gram.output_error(&weights, &other).unwrap();
        assert!(
            (got - expected).abs() <= 1e-4 * expected,
            "Gram form {got} against direct {expected}"
        );
    }

    /// Two columns: once column 0 is rounded, column 1's target is the exact minimiser of the
    /// damped quadratic error over the value of column 1.
    #[test]
    fn feedback_moves_the_rounding_error_to_the_exact_minimiser() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let x = inputs(&mut rng, 300, 2, 99);
        let mut gram = WindowGram::default();
        let window = Window::Dense {
            trans_a: false,
            trans_b: false,
        };
        gram.observe(&window, &[], &[300, 2], &x).unwrap();
        let grid = Grid {
            bits: 4,
            ..Grid::I8_SYM
        };
        let w = [0.37f32, -0.21];
        let (values, targets) = feedback_rounding(&w, &gram, grid, &[0.1], &[0]).unwrap();
        let h = gram.normalised(0, DAMPING).unwrap();
        let d0 = (values[0] - w[0]) as f64;
        // d/dd1 of [d0 d1] H [d0 d1]^T = 0.
        let exact = w[1] as f64 - d0 * h[1] / h[3];
        assert_eq!(values[0], grid.fake_quant(w[0], 0.1, 0));
        assert!(
            (targets[1] as f64 - exact).abs() < 1e-5,
            "target {} against the exact minimiser {exact}",
            targets[1]
        );
        assert_eq!(values[1], grid.fake_quant(targets[1], 0.1, 0));
    }
}
