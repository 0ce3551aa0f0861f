//! A streaming, mergeable histogram of a tensor's values with a fixed number of bins.
//!
//! The bins cover `[-limit, limit]`, with `limit` a power of two. When a value beyond `limit` arrives,
//! the limit doubles (as often as needed) and pairs of bins merge exactly, so memory never grows and two
//! histograms of disjoint data merge, in any order, into the histogram of their union. The limit stays
//! below twice the largest magnitude seen, so at least a quarter of the bins cover the observed range.

use serde::Serialize;

/// Bins per histogram (even; ONNX Runtime's default for percentile and our default for entropy).
pub const BINS: usize = 2048;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Histogram {
    /// Bins cover `[-limit, limit]` (0 until a non-zero value is seen: every count is then in the
    /// bin holding zero).
    pub limit: f32,
    #[serde(skip)]
    pub counts: Vec<u64>,
    /// Smallest and largest finite values seen.
    pub min: f32,
    pub max: f32,
    pub total: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            limit: 0.0,
            counts: vec![0; BINS],
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            total: 0,
        }
    }
}

impl Histogram {
    /// The histogram of `data` alone.
    pub fn of(data: &[f32]) -> Histogram {
        let mut h = Histogram::default();
        h.observe(data);
        h
    }

    /// Adds the finite values of `data`.
    pub fn observe(&mut self, data: &[f32]) {
        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
        for &x in data.iter().filter(|x| x.is_finite()) {
            lo = lo.min(x);
            hi = hi.max(x);
        }
        if lo > hi {
            return;
        }
        self.min = self.min.min(lo);
        self.max = self.max.max(hi);
        self.grow_to(lo.abs().max(hi.abs()));
        let scale = BINS as f64 / (2.0 * self.limit as f64);
        for &x in data.iter().filter(|x| x.is_finite()) {
            let bin = if self.limit > 0.0 {
                (((x as f64 + self.limit as f64) * scale) as usize).min(BINS - 1)
            } else {
                BINS / 2
            };
            self.counts[bin] += 1;
            self.total += 1;
        }
    }

    /// Adds the counts of a histogram of other data.
    pub fn merge(&mut self, other: &Histogram) {
        if other.total == 0 {
            return;
        }
        let mut other = other.clone();
        self.grow_to(other.limit);
        other.grow_to(self.limit);
        self.counts
            .iter_mut()
            .zip(&other.counts)
            .for_each(|(a, b)| *a += b);
        self.total += other.total;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Doubles the limit until it covers `amax`, merging bin pairs (bin `i` moves to `BINS/4 + i/2`).
    fn grow_to(&mut self, amax: f32) {
        if amax <= self.limit {
            return;
        }
        if self.limit == 0.0 {
            // Everything seen so far is zero and already sits in bin BINS/2, which holds zero at any limit.
            self.limit = 2f64.powi((amax as f64).log2().ceil() as i32) as f32;
            return;
        }
        while self.limit < amax {
            let mut grown = vec![0u64; BINS];
            for (i, &c) in self.counts.iter().enumerate() {
                grown[BINS / 4 + i / 2] += c;
            }
            self.counts = grown;
            self.limit *= 2.0;
        }
    }

    /// Width of one bin.
    pub fn width(&self) -> f64 {
        2.0 * self.limit as f64 / BINS as f64
    }

    /// Lower edge of bin `i`.
    pub fn edge(&self, i: usize) -> f64 {
        -(self.limit as f64) + i as f64 * self.width()
    }

    /// Counts of |x|: bin `k` covers `[k w, (k + 1) w)` for `k < BINS/2`.
    pub fn folded(&self) -> Vec<u64> {
        let half = BINS / 2;
        (0..half)
            .map(|k| self.counts[half + k] + self.counts[half - 1 - k])
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_equals_observing_the_union() {
        let a: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin() * 0.5).collect();
        let b: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.11).cos() * 7.0).collect();
        let mut whole = Histogram::of(&a);
        whole.observe(&b);
        let mut merged = Histogram::of(&b);
        merged.merge(&Histogram::of(&a));
        assert_eq!(whole.limit, merged.limit);
        assert_eq!(whole.total, 2000);
        assert_eq!(whole.counts.iter().sum::<u64>(), 2000);
        // Growth is exact: the same limit gives the same bins, whatever the order.
        assert_eq!(whole.counts, merged.counts);
    }

    #[test]
    fn every_value_lands_in_the_bin_covering_it() {
        let mut h = Histogram::of(&[0.0, 0.0]);
        h.observe(&[1.0, -0.25, 3.0]);
        assert!(h.limit >= 3.0 && h.limit < 6.0 + 1e-6);
        for x in [0.0f64, 1.0, -0.25, 3.0] {
            let i = ((x + h.limit as f64) / h.width()) as usize;
            assert!(h.counts[i.min(BINS - 1)] > 0, "no count for {x}");
            let i = i.min(BINS - 1);
            assert!(h.edge(i) <= x && x <= h.edge(i + 1));
        }
        assert_eq!(h.counts[BINS / 2], 2);
        assert_eq!(h.folded().iter().sum::<u64>(), 5);
    }
}
