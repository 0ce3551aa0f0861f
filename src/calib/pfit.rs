//! LAPQ's choice of the norm p: the loss measured after layer-wise Lp initialisation at several p, a
//! least-squares parabola through those points, and p* at its vertex, with a guard.

use serde::Serialize;

/// The p grid LAPQ measures: `n` values evenly spaced in `[lo, hi]`.
pub fn p_grid(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    match n {
        0 => vec![],
        1 => vec![lo],
        _ => (0..n)
            .map(|k| lo + (hi - lo) * k as f64 / (n - 1) as f64)
            .collect(),
    }
}

/// The fit over p and the p it selects.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PFit {
    /// `a p^2 + b p + c`, least squares through the measured points (`None` with fewer than 3).
    pub parabola: Option<[f64; 3]>,
    /// The selected p.
    pub p_star: f64,
    /// Whether the guard replaced the vertex by the best measured p (parabola opening downward, or
    /// vertex outside the measured range).
    pub guarded: bool,
}

/// Least-squares parabola through `(ps, losses)`, p* at its vertex; when the parabola opens downward
/// or its vertex lies outside `[min p, max p]`, the measured p with the lowest loss.
pub fn fit_p(ps: &[f64], losses: &[f64]) -> PFit {
    let best = ps
        .iter()
        .zip(losses)
        .filter(|(_, l)| l.is_finite())
        .min_by(|a, b| a.1.total_cmp(b.1))
        .map(|(&p, _)| p)
        .unwrap_or(2.0);
    let parabola = least_squares_parabola(ps, losses);
    let (lo, hi) = ps
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &p| {
            (a.min(p), b.max(p))
        });
    match parabola {
        Some([a, b, _]) if a > 0.0 && (lo..=hi).contains(&(-b / (2.0 * a))) => PFit {
            parabola,
            p_star: -b / (2.0 * a),
            guarded: false,
        },
        _ => PFit {
            parabola,
            p_star: best,
            guarded: true,
        },
    }
}

/// Solves the 3x3 normal equations of `l = a p^2 + b p + c` (Cramer's rule on centred p).
fn least_squares_parabola(ps: &[f64], losses: &[f64]) -> Option<[f64; 3]> {
    let points: Vec<(f64, f64)> = ps
        .iter()
        .zip(losses)
        .filter(|(_, l)| l.is_finite())
        .map(|(&p, &l)| (p, l))
        .collect();
    if points.len() < 3 {
        return None;
    }
    let m = points.iter().map(|p| p.0).sum::<f64>() / points.len() as f64;
    let mut s = [0f64; 5];
    let mut t = [0f64; 3];
    for &(p, l) in &points {
        let u = p - m;
        let mut pow = 1.0;
        for k in 0..5 {
            s[k] += pow;
            if k < 3 {
                t[k] += l * pow;
            }
            pow *= u;
        }
    }
    // Normal equations in u: [s4 s3 s2; s3 s2 s1; s2 s1 s0] [a b c]' = [t2 t1 t0]'.
    let mat = [[s[4], s[3], s[2]], [s[3], s[2], s[1]], [s[2], s[1], s[0]]];
    let rhs = [t[2], t[1], t[0]];
    let det = det3(&mat);
    if det.abs() < 1e-300 {
        return None;
    }
    let solve = |col: usize| {
        let mut m2 = mat;
        for r in 0..3 {
            m2[r][col] = rhs[r];
        }
        det3(&m2) / det
    };
    let (a, b, c) = (solve(0), solve(1), solve(2));
    // Back from u = p - m to p.
    Some([a, b - 2.0 * a * m, a * m * m - b * m + c])
}

fn det3(m: &[[f64; 3]; 3]) -> f64 {
    m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_a_known_vertex() {
        let ps = p_grid(2.0, 4.0, 10);
        assert_eq!(ps.len(), 10);
        assert_eq!((ps[0], ps[9]), (2.0, 4.0));
        let losses: Vec<f64> = ps
            .iter()
            .enumerate()
            .map(|(k, p)| 0.3 * (p - 2.83).powi(2) + 1.5 + if k % 2 == 0 { 1e-4 } else { -1e-4 })
            .collect();
        let fit = fit_p(&ps, &losses);
        assert!(!fit.guarded);
        assert!((fit.p_star - 2.83).abs() < 0.01, "{}", fit.p_star);
        let [a, _, _] = fit.parabola.unwrap();
        assert!((a - 0.3).abs() < 0.01);
    }

    #[test]
    fn guard_takes_the_best_point_for_a_downward_parabola() {
        let ps = p_grid(2.0, 4.0, 10);
        let losses: Vec<f64> = ps.iter().map(|p| -(p - 3.0).powi(2) + 0.01 * p).collect();
        let fit = fit_p(&ps, &losses);
        assert!(fit.guarded);
        assert_eq!(fit.p_star, 2.0);
    }

    #[test]
    fn guard_takes_the_best_point_when_the_vertex_is_outside() {
        let ps = p_grid(2.0, 4.0, 10);
        let losses: Vec<f64> = ps.iter().map(|p| (p - 5.0).powi(2)).collect();
        let fit = fit_p(&ps, &losses);
        assert!(fit.guarded);
        assert_eq!(fit.p_star, 4.0);
    }
}
