//! Powell's derivative-free joint minimisation over positive variables (LAPQ's joint search).
//!
//! The search runs on `y = ln(x)`: every variable stays positive and every step is relative to the
//! variable's size. Directions start as the coordinate axes (a coordinate line search changes one
//! quantization site, which the objective can evaluate cheaply; it is told through `focus`); after
//! each sweep the sweep's overall displacement becomes a new direction (Powell's conjugate update),
//! replacing the direction that gained most. Each line search is Brent's method over a factor of at
//! most `reach` either way, starting from the current point, whose loss is known.

use anyhow::Result;
use serde::Serialize;

use super::search::brent_from;

/// What Powell's method asks of the loss.
pub trait Objective {
    /// The loss at `x` (every entry positive).
    fn loss(&mut self, x: &[f64]) -> Result<f64>;
    /// The evaluations that follow change coordinate `i` only, starting from `x` (a hint: the
    /// objective may prepare a cheaper evaluation). Not called for other directions.
    fn focus(&mut self, _i: usize, _x: &[f64]) -> Result<()> {
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PowellConfig {
    /// Sweeps over all directions at most.
    pub max_iters: usize,
    /// Loss evaluations at most (the best point so far is returned when reached).
    pub max_evals: usize,
    /// Line-search tolerance, relative to the variables (0.01: 1 %).
    pub rel_tol: f64,
    /// A line search looks within a factor `reach` of the current value either way.
    pub reach: f64,
    /// Stop when a sweep lowers the loss by less than this fraction of it.
    pub min_gain: f64,
}

impl Default for PowellConfig {
    fn default() -> Self {
        PowellConfig {
            max_iters: 2,
            max_evals: 2000,
            rel_tol: 0.01,
            reach: 2.0,
            min_gain: 1e-3,
        }
    }
}

/// The outcome of a search.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PowellResult {
    pub x: Vec<f64>,
    pub loss: f64,
    /// The loss at the start and after each sweep.
    pub sweeps: Vec<f64>,
    /// Loss evaluations used.
    pub evals: usize,
}

/// Minimises `objective` from `x0` (all entries positive). `progress` sees the evaluations used and
/// the best loss after each evaluation.
pub fn powell(
    objective: &mut impl Objective,
    x0: &[f64],
    config: &PowellConfig,
    mut progress: impl FnMut(usize, f64),
) -> Result<PowellResult> {
    anyhow::ensure!(
        x0.iter().all(|&v| v > 0.0 && v.is_finite()),
        "Powell's method needs positive finite starting values"
    );
    let n = x0.len();
    let mut y: Vec<f64> = x0.iter().map(|v| v.ln()).collect();
    let mut evals = 0;
    let mut f = objective.loss(x0)?;
    evals += 1;
    progress(evals, f);
    let mut sweeps = vec![f];
    let mut directions: Vec<Vec<f64>> = (0..n)
        .map(|i| (0..n).map(|j| if i == j { 1.0 } else { 0.0 }).collect())
        .collect();
    let step = config.reach.max(1.0 + 1e-6).ln();
    let tol = (1.0 + config.rel_tol).ln();
    'sweeps: for _ in 0..config.max_iters {
        let (start_y, start_f) = (y.clone(), f);
        let (mut best_gain, mut best_dir) = (0.0, 0);
        for (k, d) in directions.iter().enumerate() {
            if evals >= config.max_evals {
                break 'sweeps;
            }
            let axis = d.iter().filter(|v| **v != 0.0).count() == 1;
            if axis && let Some(i) = d.iter().position(|v| *v != 0.0) {
                objective.focus(i, &exp(&y))?;
            }
            let before = f;
            let budget = config.max_evals - evals;
            line_search(
                objective,
                (&mut y, &mut f),
                d,
                (step, tol, budget),
                &mut evals,
                &mut progress,
            )?;
            if before - f > best_gain {
                (best_gain, best_dir) = (before - f, k);
            }
        }
        // Powell's update: the sweep's displacement as a new direction.
        let delta: Vec<f64> = y.iter().zip(&start_y).map(|(a, b)| a - b).collect();
        let norm = delta.iter().map(|v| v.abs()).fold(0.0, f64::max);
        if n > 1 && norm > tol && evals < config.max_evals {
            let d: Vec<f64> = delta.iter().map(|v| v / norm).collect();
            let budget = config.max_evals - evals;
            line_search(
                objective,
                (&mut y, &mut f),
                &d,
                (step, tol, budget),
                &mut evals,
                &mut progress,
            )?;
            directions.remove(best_dir);
            directions.push(d);
        }
        sweeps.push(f);
        if start_f - f <= config.min_gain * start_f.abs() {
            break;
        }
    }
    Ok(PowellResult {
        x: exp(&y),
        loss: f,
        sweeps,
        evals,
    })
}

fn exp(y: &[f64]) -> Vec<f64> {
    y.iter().map(|v| v.exp()).collect()
}

/// Brent's method along `d` from `y` (loss `f` known) over `t` in `[-step, step]`, to `tol`, with at
/// most `budget` evaluations; moves `(y, f)` to the best point found.
fn line_search(
    objective: &mut impl Objective,
    (y, f): (&mut Vec<f64>, &mut f64),
    d: &[f64],
    (step, tol, budget): (f64, f64, usize),
    evals: &mut usize,
    progress: &mut impl FnMut(usize, f64),
) -> Result<()> {
    let start = *f;
    let mut error = None;
    let mut best = start;
    let (t, ft) = brent_from(
        |t| {
            if error.is_some() {
                return f64::INFINITY;
            }
            let x: Vec<f64> = y.iter().zip(d).map(|(v, dv)| (v + t * dv).exp()).collect();
            match objective.loss(&x) {
                Ok(v) => {
                    *evals += 1;
                    best = best.min(v);
                    progress(*evals, best);
                    v
                }
                Err(e) => {
                    error = Some(e);
                    f64::INFINITY
                }
            }
        },
        -step,
        step,
        0.0,
        start,
        tol,
        budget,
    );
    if let Some(e) = error {
        return Err(e);
    }
    if ft < start {
        y.iter_mut().zip(d).for_each(|(v, dv)| *v += t * dv);
        *f = ft;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Quadratic<F: Fn(&[f64]) -> f64> {
        f: F,
        focused: Vec<usize>,
    }

    impl<F: Fn(&[f64]) -> f64> Objective for Quadratic<F> {
        fn loss(&mut self, x: &[f64]) -> Result<f64> {
            Ok((self.f)(x))
        }
        fn focus(&mut self, i: usize, _x: &[f64]) -> Result<()> {
            self.focused.push(i);
            Ok(())
        }
    }

    fn config(iters: usize) -> PowellConfig {
        PowellConfig {
            max_iters: iters,
            max_evals: 5000,
            rel_tol: 1e-4,
            reach: 2.0,
            min_gain: 0.0,
        }
    }

    #[test]
    fn finds_the_minimum_of_a_separable_quadratic() {
        let target = [1.5, 0.7, 3.0];
        let mut q = Quadratic {
            f: |x: &[f64]| {
                x.iter()
                    .zip(&target)
                    .map(|(a, b)| (a - b).powi(2))
                    .sum::<f64>()
                    + 1.0
            },
            focused: vec![],
        };
        let r = powell(&mut q, &[1.0, 1.0, 1.0], &config(4), |_, _| ()).unwrap();
        for (a, b) in r.x.iter().zip(&target) {
            assert!((a - b).abs() < 1e-3, "{:?}", r.x);
        }
        assert!((r.loss - 1.0).abs() < 1e-6);
        // Coordinate line searches come first, each announced.
        assert_eq!(&q.focused[..3], &[0, 1, 2]);
        assert!(r.sweeps.windows(2).all(|w| w[1] <= w[0]), "{:?}", r.sweeps);
    }

    #[test]
    fn finds_the_minimum_of_a_rotated_ellipse() {
        // Non-separable: long axis along (1, 1), condition number 100.
        let f = |x: &[f64]| {
            let (u, v) = (x[0] - 2.0, x[1] - 1.0);
            let (a, b) = ((u + v) / 2f64.sqrt(), (u - v) / 2f64.sqrt());
            a * a + 100.0 * b * b
        };
        let mut q = Quadratic { f, focused: vec![] };
        let r = powell(&mut q, &[1.0, 1.8], &config(30), |_, _| ()).unwrap();
        assert!(
            (r.x[0] - 2.0).abs() < 1e-2 && (r.x[1] - 1.0).abs() < 1e-2,
            "{:?} after {} evaluations",
            r.x,
            r.evals
        );
    }

    #[test]
    fn keeps_variables_positive_and_respects_the_budget() {
        let mut q = Quadratic {
            f: |x: &[f64]| x.iter().map(|v| (v + 1.0).powi(2)).sum(),
            focused: vec![],
        };
        let mut cfg = config(50);
        cfg.max_evals = 60;
        let mut seen = 0;
        let r = powell(&mut q, &[1.0, 2.0], &cfg, |n, _| seen = n).unwrap();
        assert!(r.x.iter().all(|&v| v > 0.0));
        assert!(r.evals <= 60 && seen == r.evals, "{} evaluations", r.evals);
        // From 13 towards the infimum 2 (at 0, out of reach), a factor of at most 2 per line search.
        assert!(r.loss < 4.0, "{}", r.loss);
    }
}
