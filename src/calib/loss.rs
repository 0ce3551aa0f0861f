//! Loss functions comparing the quantized network's outputs with the float network's.

use serde::Serialize;

/// Which loss the oracle uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum LossKind {
    /// KL divergence of the quantized softmax from the float softmax (classifiers, no labels).
    KlSoftmax,
    /// Mean squared error of all outputs (embeddings, detection maps).
    Mse,
    /// Cross-entropy of the quantized softmax against integer labels.
    CrossEntropy,
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

/// Mean squared difference.
pub fn mse(reference: &[f32], quantized: &[f32]) -> f64 {
    let n = reference.len().max(1) as f64;
    reference
        .iter()
        .zip(quantized)
        .map(|(&a, &b)| ((a - b) as f64).powi(2))
        .sum::<f64>()
        / n
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn mse_of_known_vectors() {
        assert_eq!(mse(&[0.0, 2.0], &[1.0, 0.0]), 2.5);
    }
}
