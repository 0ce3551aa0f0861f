//! Bias correction: quantizing a layer's weights shifts the mean of each output channel by
//! `E[(W_hat - W) x]`. That expectation is linear in the weights, so it needs only the mean of the
//! input under each weight element of an output channel's slice (its "window means"), gathered once
//! from the float model; the shift is then removed through the layer's float bias, before the bias is
//! quantized to int32, which keeps the model deployable.

use anyhow::{Result, ensure};
use serde::Serialize;

/// How an output channel's weight slice meets the layer's input.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Window {
    /// Conv over an `[N, C, L]` or `[N, C, H, W]` input with weight `[M, C / group, k...]`.
    Conv {
        group: usize,
        strides: Vec<usize>,
        dilations: Vec<usize>,
        pads: Pads,
    },
    /// Gemm: input `[rows, K]` (`[K, rows]` with `trans_a`), weight `[K, M]` (`[M, K]` with `trans_b`).
    Dense { trans_a: bool, trans_b: bool },
}

/// Conv padding, as ONNX states it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Pads {
    /// Begins of every spatial axis, then ends.
    Explicit(Vec<usize>),
    SameUpper,
    SameLower,
    Valid,
}

/// Sums of the input under each weight element of an output channel's slice, over every output
/// position of every sample seen: `[C, k...]` for Conv (all input channels), `[K]` for Gemm.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WindowMeans {
    pub sums: Vec<f64>,
    /// Output positions summed over.
    pub count: u64,
}

/// A statistic of a layer's input windows, fed one input tensor at a time.
pub trait WindowStat {
    /// Adds one input tensor of the layer. `kernel` is the weight's spatial shape (empty for Gemm).
    fn observe(
        &mut self,
        window: &Window,
        kernel: &[usize],
        dims: &[usize],
        x: &[f32],
    ) -> Result<()>;
}

impl WindowStat for WindowMeans {
    fn observe(
        &mut self,
        window: &Window,
        kernel: &[usize],
        dims: &[usize],
        x: &[f32],
    ) -> Result<()> {
        ensure!(
            dims.iter().product::<usize>() == x.len(),
            "input shape {dims:?} does not match its data"
        );
        match window {
            Window::Dense { trans_a, .. } => {
                ensure!(dims.len() == 2, "Gemm input of shape {dims:?}");
                let (rows, k) = if *trans_a {
                    (dims[1], dims[0])
                } else {
                    (dims[0], dims[1])
                };
                self.sums.resize(k, 0.0);
                for r in 0..rows {
                    for (j, s) in self.sums.iter_mut().enumerate() {
                        let v = if *trans_a {
                            x[j * rows + r]
                        } else {
                            x[r * k + j]
                        };
                        *s += v as f64;
                    }
                }
                self.count += rows as u64;
            }
            Window::Conv {
                strides,
                dilations,
                pads,
                ..
            } => {
                let (n, geo) = Im2col::of(strides, dilations, pads, kernel, dims, 1)?;
                let ([h, w], [kh, kw], [oh, ow]) = (geo.size, geo.kernel, geo.out);
                let c = geo.c;
                self.sums.resize(c * kh * kw, 0.0);
                for img in 0..n {
                    geo.tap_sums(&mut self.sums, &x[img * c * h * w..][..c * h * w]);
                }
                self.count += (n * oh * ow) as u64;
            }
        }
        Ok(())
    }
}

impl WindowMeans {
    /// Adds the sums of another part of the calibration set.
    pub fn merge(&mut self, other: &WindowMeans) {
        if self.sums.len() < other.sums.len() {
            self.sums.resize(other.sums.len(), 0.0);
        }
        for (a, b) in self.sums.iter_mut().zip(&other.sums) {
            *a += b;
        }
        self.count += other.count;
    }
}

/// The geometry of one group's 2-D windows (1-D lifted to a height of 1): `c` channels of `size`,
/// `kernel` taps with `strides` and `dilations`, the padding before the first row and column
/// (`begin`), and `out` positions.
pub(super) struct Im2col {
    pub(super) c: usize,
    pub(super) size: [usize; 2],
    pub(super) kernel: [usize; 2],
    strides: [usize; 2],
    dilations: [usize; 2],
    begin: [usize; 2],
    pub(super) out: [usize; 2],
}

impl Im2col {
    /// The windows of a Conv input of shape `dims` (`[n, channels, ...]`, 1-D or 2-D) for `kernel`
    /// taps with the geometry of `window`, in `groups` groups: the batch size and the geometry of
    /// one group.
    pub(super) fn of(
        strides: &[usize],
        dilations: &[usize],
        pads: &Pads,
        kernel: &[usize],
        dims: &[usize],
        groups: usize,
    ) -> Result<(usize, Im2col)> {
        let spatial = dims.len().saturating_sub(2);
        ensure!(
            (1..=2).contains(&spatial) && kernel.len() == spatial,
            "Conv input of shape {dims:?} with kernel {kernel:?}: 1-D and 2-D convolutions only"
        );
        // 1-D convolutions are 2-D ones of height 1.
        let lift = |v: &[usize]| -> [usize; 2] {
            if spatial == 1 {
                [1, v[0]]
            } else {
                [v[0], v[1]]
            }
        };
        let (n, c) = (dims[0], dims[1]);
        ensure!(
            groups > 0 && c.is_multiple_of(groups),
            "Conv input of {c} channels in {groups} groups"
        );
        let (size, kernel) = (lift(&dims[2..]), lift(kernel));
        let (strides, dilations) = (lift(strides), lift(dilations));
        let (begin, out) = geometry(pads, size, kernel, strides, dilations, spatial);
        Ok((
            n,
            Im2col {
                c: c / groups,
                size,
                kernel,
                strides,
                dilations,
                begin,
                out,
            },
        ))
    }

    /// Adds to `sums` (`c x taps`, channel-major) each tap's values of `planes` (`c` planes of
    /// `size`) summed over the output positions; padding adds nothing.
    pub(super) fn tap_sums(&self, sums: &mut [f64], planes: &[f32]) {
        let ([h, w], [kh, kw], [oh, ow]) = (self.size, self.kernel, self.out);
        let (s, d, begin) = (self.strides, self.dilations, self.begin);
        let taps = kh * kw;
        for ch in 0..self.c {
            let plane = &planes[ch * h * w..][..h * w];
            for i in 0..kh {
                for j in 0..kw {
                    let mut sum = 0f64;
                    for o in 0..oh {
                        let Some(y) = (o * s[0] + i * d[0]).checked_sub(begin[0]) else {
                            continue;
                        };
                        if y >= h {
                            continue;
                        }
                        let row = &plane[y * w..][..w];
                        for p in 0..ow {
                            if let Some(col) = (p * s[1] + j * d[1]).checked_sub(begin[1])
                                && col < w
                            {
                                sum += row[col] as f64;
                            }
                        }
                    }
                    sums[ch * taps + i * kw + j] += sum;
                }
            }
        }
    }

    /// Writes the windows of `planes` (`c` planes of `size`) into `patches`, one row of
    /// `c x taps` values (channel-major) per output position; padding reads zero.
    pub(super) fn fill(&self, patches: &mut [f32], planes: &[f32]) {
        let ([h, w], [kh, kw], [oh, ow]) = (self.size, self.kernel, self.out);
        let (s, d, begin) = (self.strides, self.dilations, self.begin);
        let taps = kh * kw;
        let k = self.c * taps;
        patches.fill(0.0);
        for ch in 0..self.c {
            let plane = &planes[ch * h * w..][..h * w];
            for i in 0..kh {
                for j in 0..kw {
                    let col = ch * taps + i * kw + j;
                    for o in 0..oh {
                        let Some(y) = (o * s[0] + i * d[0]).checked_sub(begin[0]) else {
                            continue;
                        };
                        if y >= h {
                            continue;
                        }
                        for p in 0..ow {
                            if let Some(xx) = (p * s[1] + j * d[1]).checked_sub(begin[1])
                                && xx < w
                            {
                                patches[(o * ow + p) * k + col] = plane[y * w + xx];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Padding at the start of each spatial axis and the output size, for `[h, w]` lifted to 2-D.
pub(super) fn geometry(
    pads: &Pads,
    size: [usize; 2],
    kernel: [usize; 2],
    strides: [usize; 2],
    dilations: [usize; 2],
    spatial: usize,
) -> ([usize; 2], [usize; 2]) {
    let mut begin = [0; 2];
    let mut out = [0; 2];
    for a in 0..2 {
        let extent = (kernel[a] - 1) * dilations[a] + 1;
        let (b, e) = match pads {
            Pads::Explicit(p) => {
                // Axis 0 of a 1-D conv is the lifted height: no padding.
                let k = a + spatial - 2;
                if a + spatial < 2 {
                    (0, 0)
                } else {
                    (p[k], p[k + spatial])
                }
            }
            Pads::Valid => (0, 0),
            Pads::SameUpper | Pads::SameLower => {
                let want = size[a].div_ceil(strides[a]);
                let total = ((want - 1) * strides[a] + extent).saturating_sub(size[a]);
                if *pads == Pads::SameUpper {
                    (total / 2, total - total / 2)
                } else {
                    (total - total / 2, total / 2)
                }
            }
        };
        begin[a] = b;
        out[a] = (size[a] + b + e).saturating_sub(extent) / strides[a] + 1;
    }
    (begin, out)
}

/// Per output channel, `-E[(W_hat - W) x]`: what to add to the layer's bias so that quantizing its
/// weights leaves each output channel's mean where it was. Zero where nothing was observed.
pub fn mean_shift(
    window: &Window,
    wdims: &[usize],
    w: &[f32],
    w_hat: &[f32],
    means: &WindowMeans,
) -> Vec<f32> {
    let count = means.count.max(1) as f64;
    let delta = |i: usize| (w_hat[i] - w[i]) as f64;
    match window {
        Window::Dense { trans_b, .. } => {
            let (k, m) = if *trans_b {
                (wdims[1], wdims[0])
            } else {
                (wdims[0], wdims[1])
            };
            (0..m)
                .map(|c| {
                    let s: f64 = (0..k)
                        .map(|j| {
                            let i = if *trans_b { c * k + j } else { j * m + c };
                            delta(i) * means.sums.get(j).copied().unwrap_or(0.0)
                        })
                        .sum();
                    (-s / count) as f32
                })
                .collect()
        }
        Window::Conv { group, .. } => {
            let (m, cg) = (wdims[0], wdims[1]);
            let taps: usize = wdims[2..].iter().product();
            let per_group = (m / group.max(&1)).max(1);
            (0..m)
                .map(|c| {
                    let first = (c / per_group) * cg * taps;
                    let s: f64 = (0..cg * taps)
                        .map(|t| {
                            delta(c * cg * taps + t)
                                * means.sums.get(first + t).copied().unwrap_or(0.0)
                        })
                        .sum();
                    (-s / count) as f32
                })
                .collect()
        }
    }
}

/// Per output channel, `W E[x] - W~ E[x~]`: what keeps the float layer's output means when weights
/// `w_hat` read the quantized network's input (window means `quantized`) in place of weights `w`
/// on the float input (`float`).
pub fn reconstruction_shift(
    window: &Window,
    wdims: &[usize],
    w: &[f32],
    w_hat: &[f32],
    quantized: &WindowMeans,
    float: &WindowMeans,
) -> Vec<f32> {
    let zero = vec![0f32; w.len()];
    // `mean_shift(0, v, m)` is `-v E[m]`.
    let wx = mean_shift(window, wdims, &zero, w, float);
    let wx_hat = mean_shift(window, wdims, &zero, w_hat, quantized);
    wx.iter().zip(&wx_hat).map(|(a, b)| b - a).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Direct convolution (NCHW, groups, strides, dilations, explicit begin pads, given output size).
    #[allow(clippy::too_many_arguments)]
    fn conv(
        x: &[f32],
        dims: [usize; 4],
        w: &[f32],
        wdims: [usize; 4],
        group: usize,
        s: usize,
        d: usize,
        begin: [usize; 2],
        out: [usize; 2],
    ) -> Vec<f64> {
        let [n, c, h, wd] = dims;
        let [m, cg, kh, kw] = wdims;
        let mut y = vec![0f64; n * m * out[0] * out[1]];
        for img in 0..n {
            for oc in 0..m {
                let g = oc / (m / group);
                for oy in 0..out[0] {
                    for ox in 0..out[1] {
                        let mut acc = 0f64;
                        for k in 0..cg {
                            for i in 0..kh {
                                for j in 0..kw {
                                    let (yy, xx) = (
                                        (oy * s + i * d) as isize - begin[0] as isize,
                                        (ox * s + j * d) as isize - begin[1] as isize,
                                    );
                                    if yy < 0 || xx < 0 || yy >= h as isize || xx >= wd as isize {
                                        continue;
                                    }
                                    let ch = g * cg + k;
                                    acc += x[((img * c + ch) * h + yy as usize) * wd + xx as usize]
                                        as f64
                                        * w[((oc * cg + k) * kh + i) * kw + j] as f64;
                                }
                            }
                        }
                        y[((img * m + oc) * out[0] + oy) * out[1] + ox] = acc;
                    }
                }
            }
        }
        y
    }

    /// The shift equals minus the mean over positions of the convolution of the input with
    /// `W_hat - W`, for grouped, strided, dilated and padded convolutions alike.
    #[test]
    fn conv_shift_is_the_mean_output_change() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for (group, s, d, pad, pads) in [
            (1, 1, 1, 1, Pads::Explicit(vec![1, 1, 1, 1])),
            (4, 2, 1, 1, Pads::SameUpper),
            (2, 1, 2, 0, Pads::Valid),
            (1, 2, 1, 0, Pads::SameLower),
        ] {
            let (n, c, h, w, m, k) = (2, 4, 7, 6, 8, 3);
            let cg = c / group;
            let x: Vec<f32> = (0..n * c * h * w)
                .map(|_| rng.random_range(-1.0..2.0))
                .collect();
            let wt: Vec<f32> = (0..m * cg * k * k)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let w_hat: Vec<f32> = wt.iter().map(|v| (v * 4.0).round() / 4.0).collect();
            let window = Window::Conv {
                group,
                strides: vec![s, s],
                dilations: vec![d, d],
                pads: pads.clone(),
            };
            let mut means = WindowMeans::default();
            means.observe(&window, &[k, k], &[n, c, h, w], &x).unwrap();
            let (begin, out) = geometry(&pads, [h, w], [k, k], [s, s], [d, d], 2);
            if pads == Pads::Explicit(vec![1, 1, 1, 1]) {
                assert_eq!((begin, out), ([pad, pad], [7, 6]));
            }
            if pads == Pads::SameUpper {
                assert_eq!(out, [4, 3]);
            }
            let delta: Vec<f32> = w_hat.iter().zip(&wt).map(|(a, b)| a - b).collect();
            let y = conv(
                &x,
                [n, c, h, w],
                &delta,
                [m, cg, k, k],
                group,
                s,
                d,
                begin,
                out,
            );
            let shift = mean_shift(&window, &[m, cg, k, k], &wt, &w_hat, &means);
            let plane = out[0] * out[1];
            for oc in 0..m {
                let mean: f64 = (0..n)
                    .map(|img| y[(img * m + oc) * plane..][..plane].iter().sum::<f64>())
                    .sum::<f64>()
                    / (n * plane) as f64;
                assert!(
                    (shift[oc] as f64 + mean).abs() < 1e-5,
                    "group {group} stride {s} dilation {d} {pads:?}: channel {oc}: {} vs {}",
                    shift[oc],
                    -mean
                );
            }
        }
    }

    #[test]
    fn dense_shift_is_the_mean_output_change_in_every_layout() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let (rows, k, m) = (5, 6, 3);
        let x: Vec<f32> = (0..rows * k).map(|_| rng.random_range(-1.0..3.0)).collect();
        let w: Vec<f32> = (0..k * m).map(|_| rng.random_range(-1.0..1.0)).collect();
        let w_hat: Vec<f32> = w.iter().map(|v| (v * 2.0).round() / 2.0).collect();
        for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
            // The same mathematical x [rows, K] and W [K, M], stored as each layout says.
            let xs: Vec<f32> = if trans_a {
                (0..k * rows)
                    .map(|i| x[(i % rows) * k + i / rows])
                    .collect()
            } else {
                x.clone()
            };
            let store = |v: &[f32]| -> Vec<f32> {
                if trans_b {
                    (0..m * k).map(|i| v[(i % k) * m + i / k]).collect()
                } else {
                    v.to_vec()
                }
            };
            let window = Window::Dense { trans_a, trans_b };
            let mut means = WindowMeans::default();
            let xdims = if trans_a { [k, rows] } else { [rows, k] };
            means.observe(&window, &[], &xdims, &xs).unwrap();
            let wdims = if trans_b { [m, k] } else { [k, m] };
            let shift = mean_shift(&window, &wdims, &store(&w), &store(&w_hat), &means);
            for c in 0..m {
                let mean: f64 = (0..rows)
                    .map(|r| {
                        (0..k)
                            .map(|j| x[r * k + j] as f64 * (w_hat[j * m + c] - w[j * m + c]) as f64)
                            .sum::<f64>()
                    })
                    .sum::<f64>()
                    / rows as f64;
                assert!(
                    (shift[c] as f64 + mean).abs() < 1e-5,
                    "{trans_a} {trans_b} {c}"
                );
            }
        }
    }

    #[test]
    fn means_merge_like_one_observation() {
        let window = Window::Dense {
            trans_a: false,
            trans_b: false,
        };
        let x: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let mut all = WindowMeans::default();
        all.observe(&window, &[], &[4, 3], &x).unwrap();
        let (mut a, mut b) = (WindowMeans::default(), WindowMeans::default());
        a.observe(&window, &[], &[2, 3], &x[..6]).unwrap();
        b.observe(&window, &[], &[2, 3], &x[6..]).unwrap();
        b.merge(&a);
        assert_eq!(all, b);
    }
}
