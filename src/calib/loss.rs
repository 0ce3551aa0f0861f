//! Loss functions comparing the quantized network's outputs with the float network's.

use serde::Serialize;

/// Which loss the oracle uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum LossKind {
    /// KL divergence of the quantized softmax from the float softmax (classifiers, no labels).
    KlSoftmax,
    /// Squared error per output channel, over all elements plus over the channel's salient elements
    /// (weighted by the float value's magnitude), in units of the channel's float variance
    /// (embeddings, detection maps, anything not one `[N, classes]` output): see `DenseReference`.
    Dense,
    /// Cross-entropy of the quantized softmax against integer labels.
    CrossEntropy,
}

/// The index of the first largest value (0 for an empty row; NaN is never the largest).
pub fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv { (i, x) } else { (bi, bv) }
        })
        .0
}

/// One sample's output: its dims and values.
pub type Output<'a> = (&'a [usize], &'a [f32]);

/// The share of samples whose quantized top class is the float one, for outputs that are class rows
/// (`(dims, values)` per sample, float then quantized, of more than one value with the last axis
/// holding them all); `None` for any other output, or no sample.
pub fn top1_agreement(pairs: &[(Output, Output)]) -> Option<f64> {
    let rows = pairs.iter().all(|((fd, fv), (qd, qv))| {
        fd == qd && fv.len() == qv.len() && fv.len() > 1 && fd.last() == Some(&fv.len())
    });
    (rows && !pairs.is_empty()).then(|| {
        let agree = pairs
            .iter()
            .filter(|((_, fv), (_, qv))| argmax(fv) == argmax(qv))
            .count();
        agree as f64 / pairs.len() as f64
    })
}

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    let log_sum = sum.ln() + max;
    logits.iter().map(|&x| x as f64 - log_sum).collect()
}

/// `KL(softmax(reference) || softmax(quantized))` of one row of logits.
pub fn kl_softmax(reference: &[f32], quantized: &[f32]) -> f64 {
    let (lp, lq) = (log_softmax(reference), log_softmax(quantized));
    lp.iter().zip(&lq).map(|(&a, &b)| a.exp() * (a - b)).sum()
}

/// Cross-entropy of one row of logits against `label`.
pub fn cross_entropy(logits: &[f32], label: usize) -> f64 {
    -log_softmax(logits)
        .get(label)
        .copied()
        .unwrap_or(f64::NEG_INFINITY)
}

/// The float network's dense outputs summarised per channel (axis 1 of each output; the whole
/// output where its rank is below 2), for `LossKind::Dense`.
///
/// A channel's loss is `(mean e^2 + sum w e^2 / sum w) / var`, with `e` the quantized minus the
/// float value, `w = |float| / max |float|` over the channel and `var` the channel's float variance.
/// The first term sees every element; the second the elements a thresholded or argmax'd output
/// turns on (text pixels of a probability map, a detector's confident class scores), which a plain
/// mean lets the background outvote. The variance makes channels of different units (box pixels
/// beside class probabilities) count alike. The loss is the mean over the channels of all outputs.
pub struct DenseReference {
    /// Per output, per channel: (float variance, largest |float|).
    outputs: Vec<Vec<(f64, f64)>>,
}

/// (channels, elements per channel and row) of an output of shape `dims` with `len` values.
fn channel_layout(dims: &[usize], len: usize) -> (usize, usize) {
    match dims {
        [_, c, rest @ ..] if *c > 0 => (*c, rest.iter().product::<usize>().max(1)),
        _ => (1, len.max(1)),
    }
}

/// `v[c]`, the vector grown with zeros to hold it.
fn slot(v: &mut Vec<[f64; 4]>, c: usize) -> &mut [f64; 4] {
    if v.len() <= c {
        v.resize(c + 1, [0.0; 4]);
    }
    &mut v[c]
}

impl DenseReference {
    /// Summarises `reference`: per sample, each output's shape and values (each sample's own shape
    /// gives its channels, so samples may differ in length).
    pub fn new(reference: &[Vec<(Vec<usize>, Vec<f32>)>]) -> DenseReference {
        let count = reference.first().map_or(0, |s| s.len());
        let outputs = (0..count)
            .map(|o| {
                // Per channel: sum, sum of squares, count, largest |value|.
                let mut acc: Vec<[f64; 4]> = vec![];
                for (dims, values) in reference.iter().filter_map(|s| s.get(o)) {
                    let (k, inner) = channel_layout(dims, values.len());
                    for (i, run) in values.chunks(inner).enumerate() {
                        let a = slot(&mut acc, i % k);
                        for &v in run {
                            let v = v as f64;
                            a[0] += v;
                            a[1] += v * v;
                            a[2] += 1.0;
                            a[3] = a[3].max(v.abs());
                        }
                    }
                }
                let var: Vec<f64> = acc
                    .iter()
                    .map(|a| {
                        let m = a[0] / a[2].max(1.0);
                        (a[1] / a[2].max(1.0) - m * m).max(0.0)
                    })
                    .collect();
                // Invariant: no channel's variance is zero, and a near-constant channel cannot
                // outweigh the others by more than 1e6.
                let floor = (var.iter().sum::<f64>() / var.len().max(1) as f64 * 1e-6)
                    .max(f64::MIN_POSITIVE);
                var.iter()
                    .zip(&acc)
                    .map(|(v, a)| (v.max(floor), a[3]))
                    .collect()
            })
            .collect();
        DenseReference { outputs }
    }

    /// The loss of `quantized` against `reference` (the samples `new` saw, or their first ones).
    pub fn loss(
        &self,
        reference: &[Vec<(Vec<usize>, Vec<f32>)>],
        quantized: &[Vec<(Vec<usize>, Vec<f32>)>],
    ) -> f64 {
        let (mut total, mut channels) = (0.0, 0usize);
        for (o, stats) in self.outputs.iter().enumerate() {
            // Per channel: sum of e^2, count, sum of w e^2, sum of w.
            let mut acc = vec![[0.0f64; 4]; stats.len()];
            for (f, q) in reference.iter().zip(quantized) {
                let (Some((dims, fv)), Some((_, qv))) = (f.get(o), q.get(o)) else {
                    continue;
                };
                let (k, inner) = channel_layout(dims, fv.len());
                for (i, (fr, qr)) in fv.chunks(inner).zip(qv.chunks(inner)).enumerate() {
                    let (Some(a), Some(&(_, peak))) = (acc.get_mut(i % k), stats.get(i % k)) else {
                        continue;
                    };
                    for (&x, &y) in fr.iter().zip(qr) {
                        let e2 = ((y - x) as f64).powi(2);
                        let w = if peak > 0.0 {
                            (x as f64).abs() / peak
                        } else {
                            0.0
                        };
                        a[0] += e2;
                        a[1] += 1.0;
                        a[2] += w * e2;
                        a[3] += w;
                    }
                }
            }
            for (a, &(var, _)) in acc.iter().zip(stats) {
                if a[1] == 0.0 {
                    continue;
                }
                let mean = a[0] / a[1];
                let salient = if a[3] > 0.0 { a[2] / a[3] } else { mean };
                total += (mean + salient) / var;
                channels += 1;
            }
        }
        total / channels.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(dims: &[usize], values: &[f32]) -> Vec<(Vec<usize>, Vec<f32>)> {
        vec![(dims.to_vec(), values.to_vec())]
    }

    #[test]
    fn top1_agreement_counts_rows_whose_top_class_matches_and_ignores_other_outputs() {
        let (d, f1, q1, f2, q2) = (
            [1, 3],
            [0.1, 0.7, 0.2],
            [0.2, 0.5, 0.3],
            [0.9, 0.0, 0.1],
            [0.4, 0.5, 0.1],
        );
        let pairs = [
            ((&d[..], &f1[..]), (&d[..], &q1[..])),
            ((&d[..], &f2[..]), (&d[..], &q2[..])),
        ];
        assert_eq!(top1_agreement(&pairs), Some(0.5));
        assert_eq!(top1_agreement(&pairs[..1]), Some(1.0));
        // A map (the last axis does not hold the values), one value, or no sample: not a classifier.
        let map = [1, 3, 1];
        assert_eq!(
            top1_agreement(&[((&map[..], &f1[..]), (&map[..], &q1[..]))]),
            None
        );
        let one = [1, 1];
        assert_eq!(
            top1_agreement(&[((&one[..], &f1[..1]), (&one[..], &q1[..1]))]),
            None
        );
        assert_eq!(top1_agreement(&[]), None);
        assert_eq!(argmax(&[1.0, 3.0, 3.0, f32::NAN]), 1);
    }

    #[test]
    fn dense_loss_is_zero_when_equal_and_weighs_salient_elements_more() {
        // One [1, 1, 4] probability map: one "text" pixel among background.
        let f = vec![output(&[1, 1, 4], &[0.9, 0.0, 0.0, 0.0])];
        let d = DenseReference::new(&f);
        assert_eq!(d.loss(&f, &f), 0.0);
        let on_text = d.loss(&f, &[output(&[1, 1, 4], &[0.8, 0.0, 0.0, 0.0])]);
        let on_background = d.loss(&f, &[output(&[1, 1, 4], &[0.9, 0.1, 0.0, 0.0])]);
        assert!(
            on_text > 2.0 * on_background,
            "{on_text} vs {on_background}"
        );
    }

    #[test]
    fn dense_loss_counts_channels_alike_whatever_their_units() {
        // Channel 0 in pixels, channel 1 in probabilities: the same relative error costs the same.
        let f = vec![
            output(&[1, 2, 2], &[100.0, 300.0, 0.1, 0.3]),
            output(&[1, 2, 2], &[200.0, 400.0, 0.2, 0.4]),
        ];
        let d = DenseReference::new(&f);
        let pixels = d.loss(
            &f,
            &[output(&[1, 2, 2], &[110.0, 300.0, 0.1, 0.3]), f[1].clone()],
        );
        let probabilities = d.loss(
            &f,
            &[output(&[1, 2, 2], &[100.0, 300.0, 0.11, 0.3]), f[1].clone()],
        );
        assert!(
            (pixels / probabilities - 1.0).abs() < 1e-6,
            "{pixels} vs {probabilities}"
        );
    }

    #[test]
    fn kl_is_zero_for_equal_logits_and_positive_otherwise() {
        let a = [1.0, 2.0, 3.0];
        assert!(kl_softmax(&a, &a).abs() < 1e-12);
        assert!(kl_softmax(&a, &[1.0, 2.5, 2.0]) > 0.0);
        // Softmax is shift-invariant, so is the divergence.
        assert!(kl_softmax(&a, &[11.0, 12.0, 13.0]).abs() < 1e-9);
    }

    #[test]
    fn cross_entropy_of_uniform_logits_is_log_k() {
        assert!((cross_entropy(&[0.0; 4], 2) - 4f64.ln()).abs() < 1e-12);
    }
}
