//! Streaming statistics of tensors: memory bounded by the tensor's channel count, never by the number of
//! samples observed; mergeable, so that workers can observe disjoint samples.

use serde::Serialize;

use super::hist::Histogram;

/// Running min/max of a tensor, overall and per channel (axis 1, the ONNX channel axis, for rank >= 2).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RangeStats {
    pub min: f32,
    pub max: f32,
    pub channel_min: Vec<f32>,
    pub channel_max: Vec<f32>,
    /// Number of tensors observed.
    pub count: u64,
    /// Number of non-finite values seen (ignored by min/max).
    pub non_finite: u64,
    /// All finite values, for the histogram methods.
    #[serde(skip)]
    pub hist: Histogram,
}

impl RangeStats {
    /// Adds one observation of shape `dims`.
    pub fn observe(&mut self, dims: &[usize], data: &[f32]) {
        let (cmin, cmax, non_finite) =
            channel_min_max(data, dims, 1.min(dims.len().saturating_sub(1)));
        let (lo, hi) = fold_range(&cmin, &cmax);
        if self.count == 0 {
            (self.min, self.max) = (lo, hi);
            (self.channel_min, self.channel_max) = (cmin, cmax);
        } else {
            (self.min, self.max) = (self.min.min(lo), self.max.max(hi));
            merge_channels(&mut self.channel_min, &mut self.channel_max, &cmin, &cmax);
        }
        self.count += 1;
        self.non_finite += non_finite;
        self.hist.observe(data);
    }

    /// Combines statistics observed on disjoint data.
    pub fn merge(&mut self, other: &RangeStats) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = other.clone();
            return;
        }
        (self.min, self.max) = (self.min.min(other.min), self.max.max(other.max));
        merge_channels(
            &mut self.channel_min,
            &mut self.channel_max,
            &other.channel_min,
            &other.channel_max,
        );
        self.count += other.count;
        self.non_finite += other.non_finite;
        self.hist.merge(&other.hist);
    }
}

fn merge_channels(min: &mut Vec<f32>, max: &mut Vec<f32>, omin: &[f32], omax: &[f32]) {
    if min.len() != omin.len() {
        // Channel counts differ between observations (dynamic shapes): keep only the overall range.
        min.clear();
        max.clear();
        return;
    }
    min.iter_mut().zip(omin).for_each(|(a, &b)| *a = a.min(b));
    max.iter_mut().zip(omax).for_each(|(a, &b)| *a = a.max(b));
}

fn fold_range(mins: &[f32], maxs: &[f32]) -> (f32, f32) {
    let lo = mins.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = maxs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if lo > hi { (0.0, 0.0) } else { (lo, hi) }
}

/// Per-channel min and max of a tensor of shape `dims` along `axis`, and its count of non-finite values.
///
/// A scalar counts as one channel; a channel without finite values has range `[+inf, -inf]`.
pub fn channel_min_max(data: &[f32], dims: &[usize], axis: usize) -> (Vec<f32>, Vec<f32>, u64) {
    let channels = dims.get(axis).copied().unwrap_or(1).max(1);
    let inner: usize = dims.iter().skip(axis + 1).product::<usize>().max(1);
    let mut min = vec![f32::INFINITY; channels];
    let mut max = vec![f32::NEG_INFINITY; channels];
    let mut non_finite = 0;
    for (block, chunk) in data.chunks(inner).enumerate() {
        let c = block % channels;
        for &x in chunk {
            if x.is_finite() {
                min[c] = min[c].min(x);
                max[c] = max[c].max(x);
            } else {
                non_finite += 1;
            }
        }
    }
    (min, max, non_finite)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_ranges_of_nchw() {
        // N=2, C=2, 2 values each: channel 0 holds 1,2 and 5,6; channel 1 holds -3,4 and 7,-8.
        let data = [1.0, 2.0, -3.0, 4.0, 5.0, 6.0, 7.0, -8.0];
        let (min, max, nf) = channel_min_max(&data, &[2, 2, 2], 1);
        assert_eq!((min, max, nf), (vec![1.0, -8.0], vec![6.0, 7.0], 0));
    }

    #[test]
    fn merge_equals_observing_everything() {
        let a = [1.0, -2.0, 3.0, 0.5];
        let b = [-7.0, 2.0, 0.0, 9.0];
        let mut all = RangeStats::default();
        all.observe(&[1, 2, 2], &a);
        all.observe(&[1, 2, 2], &b);
        let (mut x, mut y) = (RangeStats::default(), RangeStats::default());
        x.observe(&[1, 2, 2], &a);
        y.observe(&[1, 2, 2], &b);
        x.merge(&y);
        assert_eq!(x, all);
        assert_eq!((all.min, all.max), (-7.0, 9.0));
        assert_eq!(all.channel_min, vec![-7.0, 0.0]);
    }

    #[test]
    fn non_finite_values_are_counted_not_used() {
        let mut s = RangeStats::default();
        s.observe(&[1, 3], &[f32::NAN, 2.0, f32::INFINITY]);
        assert_eq!((s.min, s.max, s.non_finite), (2.0, 2.0, 2));
    }

    #[test]
    fn memory_does_not_grow_with_samples() {
        let mut s = RangeStats::default();
        for i in 0..1000 {
            s.observe(&[1, 4, 8], &[i as f32; 32]);
        }
        assert_eq!(s.channel_min.len(), 4);
        assert_eq!((s.min, s.max, s.count), (0.0, 999.0, 1000));
        // The histogram's range grew 1000-fold; its size did not.
        assert_eq!(s.hist.counts.len(), crate::calib::BINS);
        assert_eq!(s.hist.total, 32_000);
    }
}
