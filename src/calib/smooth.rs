//! SmoothQuant's migration (Xiao et al., 2023): a trained transformer's normalisation outputs carry
//! a few outlier channels, which a per-tensor activation scale spends most of its codes on. Dividing
//! channel `j` of the activation by `s_j` and multiplying row `j` of the next MatMul's weight by it
//! computes the same product, with `s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)` balancing the two
//! ranges (per-channel weight scales absorb the larger rows).

/// The migration strength SmoothQuant uses for BERT-size encoders.
pub const ALPHA: f32 = 0.5;

/// A normalisation output is smoothed only when its largest channel range is at least this many
/// times its median one: trained transformers have such outlier channels (all-MiniLM-L6-v2: 3.7 to
/// 18 on every LayerNorm output), random-weight encoders do not (1.5 to 1.8), and there smoothing
/// cost 2.3 points of top-1 agreement.
pub const OUTLIER_RATIO: f32 = 3.0;

/// Whether channel ranges `act_absmax` have an outlier channel (`OUTLIER_RATIO`).
pub fn has_outliers(act_absmax: &[f32]) -> bool {
    let mut sorted: Vec<f32> = act_absmax.to_vec();
    sorted.sort_by(f32::total_cmp);
    let (Some(&max), Some(&median)) = (sorted.last(), sorted.get(sorted.len() / 2)) else {
        return false;
    };
    median > 0.0 && max >= OUTLIER_RATIO * median
}

/// Factors beyond this (or below its inverse) are clamped: a channel that is nearly dead on the
/// calibration data must not blow up its weight row.
const LIMIT: f32 = 100.0;

/// `max|x|` per channel of the last axis, folded into `acc` (resized to the channel count).
pub fn observe_channel_absmax(acc: &mut Vec<f32>, values: &[f32], channels: usize) {
    if channels == 0 {
        return;
    }
    acc.resize(channels, 0.0);
    for row in values.chunks_exact(channels) {
        for (a, &v) in acc.iter_mut().zip(row) {
            if v.is_finite() {
                *a = a.max(v.abs());
            }
        }
    }
}

/// The factor `s_j` of every channel from the activation's and the weight rows' largest magnitudes;
/// 1 where either is zero (nothing to balance).
pub fn migration_scales(act_absmax: &[f32], weight_absmax: &[f32], alpha: f32) -> Vec<f32> {
    act_absmax
        .iter()
        .zip(weight_absmax)
        .map(|(&a, &w)| {
            if a > 0.0 && w > 0.0 {
                (a.powf(alpha) / w.powf(1.0 - alpha)).clamp(1.0 / LIMIT, LIMIT)
            } else {
                1.0
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_balance_the_two_ranges() {
        let s = migration_scales(&[16.0, 1.0, 0.0, 1e9], &[1.0, 4.0, 2.0, 1e-9], 0.5);
        // After migration both ranges are sqrt(a * w): 4 and 2.
        assert_eq!(s[0], 4.0);
        assert_eq!(s[1], 0.5);
        assert_eq!(s[2], 1.0, "a dead channel is left alone");
        assert_eq!(s[3], LIMIT, "extreme ratios are clamped");
        let mut acc = vec![];
        observe_channel_absmax(&mut acc, &[1.0, -3.0, f32::NAN, 2.0, -5.0, 0.5], 3);
        assert_eq!(acc, vec![2.0, 5.0, 0.5]);
        assert!(has_outliers(&[1.0, 1.2, 0.9, 3.7]));
        assert!(!has_outliers(&[1.0, 1.2, 0.9, 2.5]));
        assert!(
            !has_outliers(&[0.0, 0.0, 0.0, 2.5]),
            "no median range to compare with"
        );
        assert!(!has_outliers(&[]));
    }
}
