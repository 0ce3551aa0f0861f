//! LAPQ, loss-aware post-training quantization: layer-wise Lp initialisation, the quadratic fit over
//! p, and Powell's joint search over clipping values, with the oracle as the loss. The maths lives in
//! `calib`; this module maps between its vectors and the plan's sites.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use indicatif::ProgressBar;
use serde::Serialize;

use crate::calib::{
    self, Clipping, Histogram, Objective, PFit, Params, PowellConfig, PowellResult, QParams,
};
use crate::config::QuantConfig;
use crate::ir::{GraphIndex, QuantPlan, RangeSource};
use crate::onnx;
use crate::oracle::{Oracle, Tail};
use crate::quantize::Calibrated;
use crate::quantize::biases::Biases;

/// Values of p measured for the quadratic fit (evenly spaced in [2, 4], as the authors do).
const P_POINTS: usize = 10;
const P_RANGE: (f64, f64) = (2.0, 4.0);

/// What a LAPQ run did, stage by stage.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LapqReport {
    /// Calibration samples in the loss.
    pub samples: usize,
    /// The loss: divergence from the float model, or cross-entropy against labels.
    pub loss: calib::LossKind,
    /// Loss with MinMax parameters (the baseline).
    pub minmax_loss: f64,
    /// The p grid and the loss after layer-wise Lp initialisation at each p.
    pub p_grid: Vec<f64>,
    pub p_losses: Vec<f64>,
    pub fit: PFit,
    /// Loss after Lp initialisation at p* (or at the best grid p, whichever was lower).
    pub init_loss: f64,
    /// The p the joint search started from.
    pub p_used: f64,
    /// Tensors whose clipping value Powell's search optimised.
    pub optimised: Vec<String>,
    /// Powell's search: early sweeps on part of the samples, the last on all of them.
    pub powell: Vec<PowellPhase>,
    pub final_loss: f64,
    /// Loss evaluations in all.
    pub evaluations: usize,
    /// Seconds per stage.
    pub seconds: BTreeMap<String, f64>,
}

/// One run of Powell's search and the samples its loss used.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PowellPhase {
    pub samples: usize,
    pub seconds: f64,
    /// The best loss after each evaluation.
    pub trace: Vec<f64>,
    #[serde(flatten)]
    pub result: PowellResult,
}

/// Powell's sweeps as (sweeps, samples) phases: every sweep but the last on half the `n` samples
/// (each costs half as much, and only moves the start of the last), the last on all of them.
fn schedule(max_iters: usize, n: usize) -> Vec<(usize, usize)> {
    match max_iters {
        0 => vec![],
        1 => vec![(1, n)],
        _ if n < 2 => vec![(max_iters, n)],
        _ => vec![(max_iters - 1, n / 2), (1, n)],
    }
}

/// Runs LAPQ from a calibrated run (its MinMax parameters and statistics) and returns the parameters
/// it found with what it did.
pub fn lapq(c: &Calibrated, config: &QuantConfig, progress: bool) -> Result<(Params, LapqReport)> {
    let mut seconds = BTreeMap::new();
    let mut t = Instant::now();
    let mut lap = |name: &str, seconds: &mut BTreeMap<String, f64>| {
        seconds.insert(name.to_string(), t.elapsed().as_secs_f64());
        t = Instant::now();
    };
    let n = config.lapq_samples.clamp(1, c.samples.len().max(1));
    let oracle = crate::quantize::sites::oracle(c, n, 1)?;
    let weights = WeightValues::read(&GraphIndex::new(&c.model)?, &c.plan)?;
    lap("oracle", &mut seconds);

    let coords = coordinates(&c.plan, config);
    let bar = crate::progress::bar(
        (P_POINTS + 2 + coords.len() * 12 * config.max_iters) as u64,
        "lapq",
        "evaluations",
        progress,
    );
    let mut evals = 0;
    let mut eval = |oracle: &Oracle, p: &Params| -> Result<f64> {
        evals += 1;
        bar.inc(1);
        oracle.loss(p)
    };
    let minmax_loss = eval(&oracle, &c.params)?;
    bar.set_message(format!("loss {minmax_loss:.4} (minmax)"));

    let (p_grid, p_losses, fit, p_used, init_loss, init) = lp_stage(
        &oracle,
        c,
        &weights,
        &mut eval,
        |m| bar.set_message(m),
        minmax_loss,
    )?;
    lap("lp init and p fit", &mut seconds);

    let optimised: Vec<String> = coords.iter().map(|k| k.name(&c.plan)).collect();
    let mut powell = vec![];
    let (mut params, mut final_loss) = (init.clone(), init_loss);
    if !coords.is_empty() && config.max_iters > 0 {
        let map = Mapping {
            plan: &c.plan,
            biases: &c.biases,
            base: init,
            ceiling: &c.params,
            coords: coords.clone(),
        };
        let mut x = vec![1.0; coords.len()];
        let mut budget = config.max_evals;
        for (sweeps, samples) in schedule(config.max_iters, n) {
            oracle.use_samples(samples);
            let mut objective = LossFn {
                oracle: &oracle,
                map: &map,
                tail: None,
                bar: &bar,
                start: init_loss,
            };
            let settings = phase_settings(config, sweeps, samples < n, budget);
            let started = Instant::now();
            let mut trace = vec![];
            let result = calib::powell(&mut objective, &x, &settings, |_, best| trace.push(best))?;
            budget = budget.saturating_sub(result.evals);
            evals += result.evals;
            x.clone_from(&result.x);
            if samples == n && result.loss < final_loss {
                (params, final_loss) = (map.params(&result.x)?, result.loss);
            }
            powell.push(PowellPhase {
                samples,
                seconds: started.elapsed().as_secs_f64(),
                trace,
                result,
            });
        }
    }
    lap("powell", &mut seconds);
    bar.finish_and_clear();
    Ok((
        params,
        LapqReport {
            samples: n,
            loss: oracle.kind(),
            minmax_loss,
            p_grid,
            p_losses,
            fit,
            init_loss,
            p_used,
            optimised,
            powell,
            final_loss,
            evaluations: evals,
            seconds,
        },
    ))
}

/// Powell's settings for a phase of `sweeps` sweeps with `budget` evaluations left: a phase on part
/// of the samples gets its share of the sweeps' budget, the full-sample phase all that is left.
fn phase_settings(
    config: &QuantConfig,
    sweeps: usize,
    partial: bool,
    budget: usize,
) -> PowellConfig {
    PowellConfig {
        max_iters: sweeps,
        max_evals: if partial {
            budget * sweeps / config.max_iters
        } else {
            budget
        },
        ..PowellConfig::default()
    }
}

/// LAPQ's initialisation: the layer-wise Lp parameters at every p of the grid and their losses, the
/// parabola fit over p, and the best of the grid and p* (when the fit is not guarded):
/// `(grid, losses, fit, p used, its loss, its parameters)`.
#[allow(clippy::type_complexity)]
fn lp_stage(
    oracle: &Oracle,
    c: &Calibrated,
    weights: &WeightValues,
    eval: &mut impl FnMut(&Oracle, &Params) -> Result<f64>,
    message: impl Fn(String),
    minmax_loss: f64,
) -> Result<(Vec<f64>, Vec<f64>, calib::PFit, f64, f64, Params)> {
    let p_grid = calib::p_grid(P_RANGE.0, P_RANGE.1, P_POINTS);
    let mut inits = vec![];
    let mut p_losses = vec![];
    for &p in &p_grid {
        let params = lp_init(oracle, &c.plan, weights, &c.biases, p, &c.params)?;
        let loss = eval(oracle, &params)?;
        message(format!(
            "p {p:.2}: loss {loss:.4} (minmax {minmax_loss:.4})"
        ));
        p_losses.push(loss);
        inits.push(params);
    }
    let fit = calib::fit_p(&p_grid, &p_losses);
    let (mut p_used, mut init_loss, mut init) = p_grid
        .iter()
        .zip(&p_losses)
        .zip(&inits)
        .min_by(|a, b| a.0.1.total_cmp(b.0.1))
        .map(|((&p, &l), params)| (p, l, params.clone()))
        .context("empty p grid")?;
    if !fit.guarded {
        let params = lp_init(oracle, &c.plan, weights, &c.biases, fit.p_star, &c.params)?;
        let loss = eval(oracle, &params)?;
        if loss < init_loss {
            (p_used, init_loss, init) = (fit.p_star, loss, params);
        }
    }
    Ok((p_grid, p_losses, fit, p_used, init_loss, init))
}

/// One coordinate of the joint search: a multiplier on one site's clipping range.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Coord {
    Activation(usize),
    Weight(usize),
}

impl Coord {
    fn name(&self, plan: &QuantPlan) -> String {
        match *self {
            Coord::Activation(i) => plan.activations[i].tensor.clone(),
            Coord::Weight(w) => plan.weights[w].tensor.clone(),
        }
    }

    /// The oracle's slot: activation sites first, then weights.
    fn slot(&self, plan: &QuantPlan) -> usize {
        match *self {
            Coord::Activation(i) => i,
            Coord::Weight(w) => plan.activations.len() + w,
        }
    }
}

/// The sites Powell's search moves: observed activations and weights below 8 bits (all of them with
/// `lapq_8bit`).
fn coordinates(plan: &QuantPlan, config: &QuantConfig) -> Vec<Coord> {
    let low = |bits: u8| bits < 8 || config.lapq_8bit;
    let acts = plan
        .activations
        .iter()
        .enumerate()
        .filter(|(_, s)| matches!(s.range, RangeSource::Observed(_)) && low(s.grid.bits))
        .map(|(i, _)| Coord::Activation(i));
    let weights = plan
        .weights
        .iter()
        .enumerate()
        .filter(|(_, s)| low(s.grid.bits))
        .map(|(w, _)| Coord::Weight(w));
    acts.chain(weights).collect()
}

/// The float values of every weight site, decoded once.
struct WeightValues(Vec<(Vec<f32>, Vec<usize>)>);

impl WeightValues {
    fn read(index: &GraphIndex, plan: &QuantPlan) -> Result<WeightValues> {
        plan.weights
            .iter()
            .map(|w| {
                let t = index
                    .constant(&w.tensor)
                    .with_context(|| format!("weight '{}' is not a constant", w.tensor))?
                    .tensor();
                Ok((onnx::tensor_f32(t)?, onnx::tensor_dims(t)?))
            })
            .collect::<Result<_>>()
            .map(WeightValues)
    }
}

/// Layer-wise Lp initialisation: weights from their exact values; activations in one pass over the
/// first calibration samples, each chosen from its input with everything upstream already quantized.
fn lp_init(
    oracle: &Oracle,
    plan: &QuantPlan,
    weights: &WeightValues,
    biases: &Biases,
    p: f64,
    start: &Params,
) -> Result<Params> {
    let weight_params = plan
        .weights
        .iter()
        .zip(&weights.0)
        .map(|(site, (values, dims))| {
            calib::weight_params(site.grid, values, dims, site.axis, Clipping::Lp(p))
                .with_context(|| format!("weight '{}'", site.tensor))
        })
        .collect::<Result<Vec<_>>>()?;
    let with_weights = biases.params(plan, start.activations.clone(), weight_params)?;
    let sites: Vec<(RangeSource, calib::Grid)> = plan
        .activations
        .iter()
        .map(|s| (s.range.clone(), s.grid))
        .collect();
    let decided: Arc<Mutex<HashMap<usize, QParams>>> = Arc::default();
    let failed: Arc<Mutex<Option<String>>> = Arc::default();
    let (d, f) = (decided.clone(), failed.clone());
    let observer = Arc::new(move |slot: usize, data: &[f32], _dims: &[usize]| {
        let (range, grid) = sites.get(slot)?;
        let mut decided = d.lock().ok()?;
        let p = match range {
            RangeSource::Observed(_) => {
                let h = Histogram::of(data);
                let alpha = calib::alpha_from_histogram(&h, *grid, Clipping::Lp(p));
                let (lo, hi) = calib::clipped_range(h.min.min(0.0), h.max.max(0.0), alpha);
                match QParams::per_tensor(*grid, lo, hi) {
                    Ok(q) => q,
                    Err(e) => {
                        if let Ok(mut f) = f.lock() {
                            f.get_or_insert(format!("activation site {slot}: {e:#}"));
                        }
                        return None;
                    }
                }
            }
            RangeSource::SameAs(j) => decided.get(j)?.clone(),
            RangeSource::Fixed(..) => return None,
        };
        decided.insert(slot, p.clone());
        Some(crate::oracle::Update::params(p))
    });
    let after = oracle.calibrate_sequentially(&with_weights, 64, observer)?;
    if let Some(e) = failed.lock().map_err(|_| anyhow!("poisoned"))?.take() {
        anyhow::bail!(e);
    }
    biases.params(plan, after.activations, with_weights.weights)
}

/// From a vector of multipliers (one per coordinate) to parameters: each coordinate's clipping range
/// scaled from its initial value, never beyond the observed range (`ceiling`, the MinMax parameters).
/// Beyond it a range only loses resolution, and for a folded Relu or Clip it would no longer do the
/// clipping the removed node did.
struct Mapping<'a> {
    plan: &'a QuantPlan,
    biases: &'a Biases,
    base: Params,
    ceiling: &'a Params,
    coords: Vec<Coord>,
}

impl Mapping<'_> {
    fn params(&self, x: &[f64]) -> Result<Params> {
        let mut acts = self.base.activations.clone();
        let mut weights = self.base.weights.clone();
        for (coord, &m) in self.coords.iter().zip(x) {
            match *coord {
                Coord::Activation(i) => {
                    acts[i] = scaled(&acts[i], m, &self.ceiling.activations[i])?
                }
                Coord::Weight(w) => weights[w] = scaled(&weights[w], m, &self.ceiling.weights[w])?,
            }
        }
        for (i, site) in self.plan.activations.iter().enumerate() {
            if let RangeSource::SameAs(j) = site.range {
                acts[i] = acts[j].clone();
            }
        }
        self.biases.params(self.plan, acts, weights)
    }
}

/// The range `[lo, hi]` channel `c` of `p` covers.
fn covered(p: &QParams, c: usize) -> (f64, f64) {
    let c = c.min(p.scale.len() - 1);
    let (s, z) = (p.scale[c] as f64, p.zero_point[c]);
    (
        (p.grid.qmin() - z) as f64 * s,
        (p.grid.qmax() - z) as f64 * s,
    )
}

/// `p` with every channel's range multiplied by `m`, within the range `ceiling` covers.
fn scaled(p: &QParams, m: f64, ceiling: &QParams) -> Result<QParams> {
    let range = |c: usize| {
        let (lo, hi) = covered(p, c);
        let (top_lo, top_hi) = covered(ceiling, c);
        ((lo * m).max(top_lo) as f32, (hi * m).min(top_hi) as f32)
    };
    match p.axis {
        None => {
            let (lo, hi) = range(0);
            QParams::per_tensor(p.grid, lo, hi)
        }
        Some(axis) => {
            let (lo, hi): (Vec<f32>, Vec<f32>) = (0..p.scale.len()).map(range).unzip();
            QParams::per_channel(p.grid, axis, &lo, &hi)
        }
    }
}

/// The oracle as Powell's objective, using the single-site tail while one coordinate moves.
struct LossFn<'a> {
    oracle: &'a Oracle,
    map: &'a Mapping<'a>,
    tail: Option<(usize, Vec<f64>, Tail)>,
    bar: &'a ProgressBar,
    start: f64,
}

impl Objective for LossFn<'_> {
    fn loss(&mut self, x: &[f64]) -> Result<f64> {
        let params = self.map.params(x)?;
        let loss = match &self.tail {
            Some((i, at, tail))
                if x.iter()
                    .zip(at)
                    .enumerate()
                    .all(|(k, (a, b))| k == *i || a == b) =>
            {
                self.oracle.loss_in(tail, &params)?
            }
            _ => self.oracle.loss(&params)?,
        };
        self.bar.inc(1);
        self.bar
            .set_message(format!("loss {loss:.4} (start {:.4})", self.start));
        Ok(loss)
    }

    fn focus(&mut self, i: usize, x: &[f64]) -> Result<()> {
        let params = self.map.params(x)?;
        let slot = self.map.coords[i].slot(self.map.plan);
        // The previous tail and its cached activations go before the next is built.
        self.tail = None;
        self.tail = Some((i, x.to_vec(), self.oracle.focus(slot, &params)?));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_sweeps_use_half_the_samples_and_the_last_all() {
        assert_eq!(schedule(0, 64), vec![]);
        assert_eq!(schedule(1, 64), vec![(1, 64)]);
        assert_eq!(schedule(2, 64), vec![(1, 32), (1, 64)]);
        assert_eq!(schedule(3, 9), vec![(2, 4), (1, 9)]);
        assert_eq!(schedule(2, 1), vec![(2, 1)]);
    }
}
