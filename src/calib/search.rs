//! One-dimensional derivative-free minimisation (Brent's method), shared by the Lp-norm clipping
//! search and LAPQ's line searches.

/// The minimum of `f` on `[a, b]` found by Brent's method (golden section with parabolic steps), to
/// an absolute tolerance `tol` on x, after at most `max_evals` evaluations: `(x, f(x))`.
///
/// Finds the global minimum when `f` is unimodal on the interval, a local one otherwise.
pub fn brent(
    mut f: impl FnMut(f64) -> f64,
    a: f64,
    b: f64,
    tol: f64,
    max_evals: usize,
) -> (f64, f64) {
    let (a, b) = if a <= b { (a, b) } else { (b, a) };
    let x = a + GOLD * (b - a);
    let fx = f(x);
    brent_from(f, a, b, x, fx, tol, max_evals.saturating_sub(1))
}

const GOLD: f64 = 0.381_966_011_250_105_1;

/// Brent's method on `[a, b]` starting from an interior point `x` whose value `fx` is known (it is not
/// evaluated again): at most `max_evals` new evaluations; the best `(x, f(x))` seen, `(x, fx)` if none
/// is better.
pub fn brent_from(
    mut f: impl FnMut(f64) -> f64,
    a: f64,
    b: f64,
    x: f64,
    fx: f64,
    tol: f64,
    max_evals: usize,
) -> (f64, f64) {
    let (mut a, mut b) = if a <= b { (a, b) } else { (b, a) };
    let (mut x, mut fx) = (x.clamp(a, b), fx);
    let (mut w, mut v) = (x, x);
    let (mut fw, mut fv) = (fx, fx);
    let (mut d, mut e) = (0.0f64, 0.0f64);
    let mut evals = 0;
    while evals < max_evals {
        let m = 0.5 * (a + b);
        let tol1 = tol.max(1e-12) * 0.5 + f64::EPSILON.sqrt() * x.abs() * 1e-3;
        let tol2 = 2.0 * tol1;
        if (x - m).abs() <= tol2 - 0.5 * (b - a) {
            break;
        }
        let mut golden = true;
        if e.abs() > tol1 {
            // Parabola through (v, fv), (w, fw), (x, fx).
            let r = (x - w) * (fx - fv);
            let mut q = (x - v) * (fx - fw);
            let mut p = (x - v) * q - (x - w) * r;
            q = 2.0 * (q - r);
            if q > 0.0 {
                p = -p;
            }
            q = q.abs();
            let e_prev = e;
            e = d;
            if p.abs() < (0.5 * q * e_prev).abs() && p > q * (a - x) && p < q * (b - x) {
                d = p / q;
                let u = x + d;
                if u - a < tol2 || b - u < tol2 {
                    d = if x < m { tol1 } else { -tol1 };
                }
                golden = false;
            }
        }
        if golden {
            e = if x < m { b - x } else { a - x };
            d = GOLD * e;
        }
        let u = if d.abs() >= tol1 {
            x + d
        } else if d > 0.0 {
            x + tol1
        } else {
            x - tol1
        };
        let fu = f(u);
        evals += 1;
        if fu <= fx {
            if u < x {
                b = x;
            } else {
                a = x;
            }
            (v, fv, w, fw, x, fx) = (w, fw, x, fx, u, fu);
        } else {
            if u < x {
                a = u;
            } else {
                b = u;
            }
            if fu <= fw || w == x {
                (v, fv, w, fw) = (w, fw, u, fu);
            } else if fu <= fv || v == x || v == w {
                (v, fv) = (u, fu);
            }
        }
    }
    (x, fx)
}

/// The minimum of `f` over `(0, hi]`: a scan of `points` evenly spaced values, then Brent's method in
/// the interval around the best one, to a tolerance of `rel_tol * hi`. Robust to the many shallow local
/// minima a quantization error has as a function of the clipping value.
pub fn scan_then_brent(
    mut f: impl FnMut(f64) -> f64,
    hi: f64,
    points: usize,
    rel_tol: f64,
) -> (f64, f64) {
    let step = hi / points as f64;
    let (mut best_k, mut best) = (points, f64::INFINITY);
    for k in 1..=points {
        let v = f(k as f64 * step);
        if v < best {
            (best_k, best) = (k, v);
        }
    }
    let lo = (best_k as f64 - 1.0).max(0.01) * step;
    let up = ((best_k + 1) as f64 * step).min(hi);
    let (x, fx) = brent(&mut f, lo, up, rel_tol * hi, 40);
    if fx < best {
        (x, fx)
    } else {
        (best_k as f64 * step, best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brent_finds_the_minimum_of_smooth_functions() {
        let (x, fx) = brent(|x| (x - 1.234).powi(2) + 3.0, -5.0, 10.0, 1e-8, 100);
        assert!((x - 1.234).abs() < 1e-6, "{x}");
        assert!((fx - 3.0).abs() < 1e-10);
        let (x, _) = brent(|x| x.cosh() - 0.5 * x, -3.0, 3.0, 1e-8, 100);
        // d/dx: sinh(x) = 0.5
        assert!((x - 0.5f64.asinh()).abs() < 1e-6, "{x}");
    }

    #[test]
    fn brent_respects_its_budget_and_interval() {
        let mut n = 0;
        let (x, _) = brent(
            |x| {
                n += 1;
                -x
            },
            0.0,
            2.0,
            1e-9,
            12,
        );
        assert!(n <= 12);
        assert!((0.0..=2.0).contains(&x) && x > 1.9, "{x}");
    }

    #[test]
    fn scan_escapes_a_local_minimum_brent_alone_would_take() {
        // Two wells: a shallow one near 0.3, the deep one near 0.8.
        let f = |x: f64| {
            -(-((x - 0.3) / 0.05).powi(2)).exp() - 2.0 * (-((x - 0.8) / 0.05).powi(2)).exp()
        };
        let (x, _) = scan_then_brent(f, 1.0, 50, 1e-6);
        assert!((x - 0.8).abs() < 1e-3, "{x}");
    }
}
