//! The loss-aware default (`--method auto`): every site's clipping chosen among the candidates the
//! statistics give (MinMax, percentiles, entropy, Lp for several p) by the network's own loss.
//!
//! 1. Each single method is scored as a whole (activations and weights as `--method` would set
//!    them); the best is the start, so the result is never worse on the oracle's samples than the
//!    best single method.
//! 2. One pass over the sites, activations in graph order then weights: each candidate of the site is
//!    scored with only that site changed (the oracle's single-site tail), and the lowest loss kept.

use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::calib::{Clipping, Params, QParams};
use crate::config::QuantConfig;
use crate::ir::{GraphIndex, RangeSource};
use crate::quantize::Calibrated;

/// Activation candidates: MinMax first (the reference), then the histogram methods.
const ACTIVATION_CANDIDATES: [(&str, Clipping); 7] = [
    ("minmax", Clipping::MinMax),
    ("percentile 99.99", Clipping::Percentile(99.99)),
    ("percentile 99.9", Clipping::Percentile(99.9)),
    ("entropy", Clipping::Entropy),
    ("mse", Clipping::Lp(2.0)),
    ("lp 3", Clipping::Lp(3.0)),
    ("lp 4", Clipping::Lp(4.0)),
];

/// Weight candidates (exact values, per channel where the plan says so).
const WEIGHT_CANDIDATES: [(&str, Clipping); 3] = [
    ("minmax", Clipping::MinMax),
    ("mse", Clipping::Lp(2.0)),
    ("lp 3", Clipping::Lp(3.0)),
];

/// The single methods scored as a whole: (name, activation candidate, weight candidate), as
/// `--method` sets them (the histogram methods keep the weights' exact range).
const SINGLE_METHODS: [(&str, usize, usize); 4] = [
    ("minmax", 0, 0),
    ("percentile", 1, 0),
    ("entropy", 3, 0),
    ("mse", 4, 1),
];

/// What the auto method chose and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AutoReport {
    /// Calibration samples in the loss.
    pub samples: usize,
    pub loss: crate::calib::LossKind,
    /// Each single method's loss, and the one the search started from.
    pub methods: Vec<(String, f64)>,
    pub start: String,
    pub start_loss: f64,
    /// Sites whose choice differs from the start, with the loss after the change.
    pub changed: Vec<SiteChoice>,
    /// Sites searched, and how many left as the start had them.
    pub sites: usize,
    pub final_loss: f64,
    /// Loss evaluations in all (full passes and single-site tails).
    pub evaluations: usize,
    pub seconds: f64,
}

/// One site whose clipping the search changed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SiteChoice {
    pub tensor: String,
    /// "activation" or "weight".
    pub kind: &'static str,
    pub chosen: String,
    /// The loss before and after the change.
    pub before: f64,
    pub after: f64,
}

/// Chooses every site's parameters by the loss on the first `config.lapq_samples` calibration
/// samples; returns them with what it did.
pub fn auto(c: &Calibrated, config: &QuantConfig, progress: bool) -> Result<(Params, AutoReport)> {
    let started = Instant::now();
    let index = GraphIndex::new(&c.model)?;
    let acts = ACTIVATION_CANDIDATES
        .iter()
        .map(|(_, clip)| {
            crate::quantize::params::activation_params(&index, &c.plan, &c.stats, *clip)
        })
        .collect::<Result<Vec<_>>>()?;
    let weights = WEIGHT_CANDIDATES
        .iter()
        .map(|(_, clip)| crate::quantize::params::weight_params(&index, &c.plan, *clip))
        .collect::<Result<Vec<_>>>()?;
    drop(index);
    let n = config.lapq_samples.clamp(1, c.samples.len().max(1));
    let oracle = crate::quantize::sites::oracle(c, n, 1)?;
    let searched = searched_sites(c, &acts, &weights);
    let bar = crate::progress::bar(
        (SINGLE_METHODS.len() + searched.len() * 4) as u64,
        "auto",
        "evaluations",
        progress,
    );
    let mut evaluations = 0;

    let mut methods = vec![];
    let mut best: Option<(usize, f64, Params)> = None;
    for (k, (name, a, w)) in SINGLE_METHODS.iter().enumerate() {
        let params = c
            .biases
            .params(&c.plan, acts[*a].clone(), weights[*w].clone())?;
        let loss = oracle.loss(&params)?;
        evaluations += 1;
        bar.inc(1);
        methods.push((name.to_string(), loss));
        if best.as_ref().is_none_or(|(_, l, _)| loss < *l) {
            best = Some((k, loss, params));
        }
    }
    let (start, start_loss, mut params) = best.context("no single method scored")?;
    bar.set_message(format!(
        "loss {start_loss:.4} ({})",
        SINGLE_METHODS[start].0
    ));

    let (mut loss, mut changed) = (start_loss, vec![]);
    for site in &searched {
        let tail = oracle.focus(site.slot(c), &params)?;
        let mut best_here: Option<(usize, f64, Params)> = None;
        for k in 0..site.candidates(&acts, &weights).len() {
            let Some(candidate) = site.with(c, &params, &acts, &weights, k)? else {
                continue;
            };
            let l = oracle.loss_in(&tail, &candidate)?;
            evaluations += 1;
            bar.inc(1);
            if l < best_here.as_ref().map_or(loss, |b| b.1) {
                best_here = Some((k, l, candidate));
            }
        }
        if let Some((k, l, candidate)) = best_here {
            changed.push(SiteChoice {
                tensor: site.tensor(c).to_string(),
                kind: site.kind(),
                chosen: site.name(k).to_string(),
                before: loss,
                after: l,
            });
            (loss, params) = (l, candidate);
            bar.set_message(format!("loss {loss:.4} (start {start_loss:.4})"));
        }
    }
    bar.finish_and_clear();
    Ok((
        params,
        AutoReport {
            samples: n,
            loss: oracle.kind(),
            methods,
            start: SINGLE_METHODS[start].0.to_string(),
            start_loss,
            changed,
            sites: searched.len(),
            final_loss: loss,
            evaluations,
            seconds: started.elapsed().as_secs_f64(),
        },
    ))
}

/// What `Method::Best`'s activation choice scored and kept.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BestReport {
    /// Calibration samples in the loss.
    pub samples: usize,
    pub loss: crate::calib::LossKind,
    /// Each candidate's network loss (mean over the samples), in the order scored.
    pub methods: Vec<(String, f64)>,
    /// The candidate with the lowest loss if it is `BEST_MARGIN` below MSE's, else MSE.
    pub chosen: String,
    pub seconds: f64,
}

/// The candidates of `Method::Best`; the last, MSE, is the reference the others must beat.
fn best_candidates(config: &QuantConfig) -> [(&'static str, Clipping); 4] {
    [
        ("minmax", Clipping::MinMax),
        ("percentile", Clipping::Percentile(config.percentile)),
        ("entropy", Clipping::Entropy),
        ("mse", Clipping::Lp(config.lp)),
    ]
}

/// How far below MSE's loss another candidate's must be to replace it. Losses closer than that do
/// not rank held-out data (EfficientNet-Lite0, 64 loss samples: MinMax 0.2 % below MSE, 2 of 128
/// held-out crops worse); the gains that do are larger (PP-OCRv4 detector: entropy 13 % below,
/// mask IoU 0.895 -> 0.922; recognizer: percentile 27 % below, steps 0.921 -> 0.936). A paired
/// test over the loss samples cannot tell these apart: the detector's per-crop losses favour
/// entropy on some crops only (t = -0.7 over 32 crops), while its held-out IoU gains 0.03.
const BEST_MARGIN: f64 = 0.05;

/// `Method::Best`: every activation site's clipping by one of MinMax, percentile, entropy and MSE,
/// scored as a whole by the network's loss on the first `config.lapq_samples` calibration samples,
/// with the run's weights (their codes as rounding chose them) and biases corrected for each
/// candidate's scales. The lowest loss wins if it is `BEST_MARGIN` below MSE's; else MSE. The
/// oracle comes from `loss` (built there if absent: `crate::quantize::sites::loss_oracle`).
pub(crate) fn best(
    c: &mut Calibrated,
    config: &QuantConfig,
    loss: &mut Option<crate::oracle::Oracle>,
) -> Result<()> {
    let started = Instant::now();
    let candidates = best_candidates(config);
    let oracle = crate::quantize::sites::loss_oracle(c, config, loss)?;
    let n = oracle.active_samples().len();
    let index = GraphIndex::new(&c.model)?;
    let mut scored = vec![];
    for (_, clip) in &candidates {
        let activations =
            crate::quantize::params::activation_params(&index, &c.plan, &c.stats, *clip)?;
        let params = c.biases.params_rounded(
            &c.plan,
            activations,
            c.params.weights.clone(),
            c.params.weight_values.clone(),
        )?;
        scored.push((oracle.loss(&params)?, params));
    }
    drop(index);
    let losses: Vec<f64> = scored.iter().map(|(l, _)| *l).collect();
    let chosen = choose(&losses).context("no activation clipping scored")?;
    let methods = candidates
        .iter()
        .zip(&scored)
        .map(|((name, _), (loss, _))| (name.to_string(), *loss))
        .collect();
    c.params = scored.swap_remove(chosen).1;
    c.best = Some(BestReport {
        samples: n,
        loss: oracle.kind(),
        methods,
        chosen: candidates[chosen].0.to_string(),
        seconds: started.elapsed().as_secs_f64(),
    });
    c.timings.lap("activation choice");
    Ok(())
}

/// The index of the lowest of `losses` if it lies `BEST_MARGIN` below the last (the reference),
/// else the last's; `None` when empty.
fn choose(losses: &[f64]) -> Option<usize> {
    let reference = losses.len().checked_sub(1)?;
    let lowest = (0..losses.len()).min_by(|&a, &b| losses[a].total_cmp(&losses[b]))?;
    Some(
        if losses[lowest] < (1.0 - BEST_MARGIN) * losses[reference] {
            lowest
        } else {
            reference
        },
    )
}

/// A site the per-site pass searches: one whose candidates do not all agree.
#[derive(Clone, Copy, Debug)]
enum Searched {
    Activation(usize),
    Weight(usize),
}

/// Observed activation sites in graph order, then weights, each with at least two distinct
/// candidates.
fn searched_sites(
    c: &Calibrated,
    acts: &[Vec<QParams>],
    weights: &[Vec<QParams>],
) -> Vec<Searched> {
    let a = (0..c.plan.activations.len())
        .filter(|&i| matches!(c.plan.activations[i].range, RangeSource::Observed(_)))
        .map(Searched::Activation);
    let w = (0..c.plan.weights.len()).map(Searched::Weight);
    a.chain(w)
        .filter(|s| {
            let options = s.candidates(acts, weights);
            options.iter().any(|p| *p != options[0])
        })
        .collect()
}

impl Searched {
    /// The oracle's slot: activation sites first, then weights.
    fn slot(self, c: &Calibrated) -> usize {
        match self {
            Searched::Activation(i) => i,
            Searched::Weight(k) => c.plan.activations.len() + k,
        }
    }

    fn tensor(self, c: &Calibrated) -> &str {
        match self {
            Searched::Activation(i) => &c.plan.activations[i].tensor,
            Searched::Weight(k) => &c.plan.weights[k].tensor,
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Searched::Activation(_) => "activation",
            Searched::Weight(_) => "weight",
        }
    }

    fn name(self, k: usize) -> &'static str {
        match self {
            Searched::Activation(_) => ACTIVATION_CANDIDATES[k].0,
            Searched::Weight(_) => WEIGHT_CANDIDATES[k].0,
        }
    }

    fn candidates<'a>(
        self,
        acts: &'a [Vec<QParams>],
        weights: &'a [Vec<QParams>],
    ) -> Vec<&'a QParams> {
        match self {
            Searched::Activation(i) => acts.iter().map(|v| &v[i]).collect(),
            Searched::Weight(k) => weights.iter().map(|v| &v[k]).collect(),
        }
    }

    /// `params` with this site (and the activation sites sharing its parameters) on candidate `k`;
    /// `None` when that is what `params` already has.
    fn with(
        self,
        c: &Calibrated,
        params: &Params,
        acts: &[Vec<QParams>],
        weights: &[Vec<QParams>],
        k: usize,
    ) -> Result<Option<Params>> {
        let (mut a, mut w) = (params.activations.clone(), params.weights.clone());
        match self {
            Searched::Activation(i) => {
                if a[i] == acts[k][i] {
                    return Ok(None);
                }
                a[i] = acts[k][i].clone();
                for (j, site) in c.plan.activations.iter().enumerate() {
                    if let RangeSource::SameAs(s) = site.range {
                        a[j] = a[s].clone();
                    }
                }
            }
            Searched::Weight(kw) => {
                if w[kw] == weights[k][kw] {
                    return Ok(None);
                }
                w[kw] = weights[k][kw].clone();
            }
        }
        c.biases.params(&c.plan, a, w).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::choose;

    #[test]
    fn best_keeps_the_reference_unless_a_candidate_is_clearly_lower() {
        assert_eq!(choose(&[]), None);
        assert_eq!(choose(&[1.0]), Some(0));
        // Within the margin: the reference (MSE), even below it.
        assert_eq!(choose(&[0.97, 1.2, 1.1, 1.0]), Some(3));
        // The lowest of those clearly below.
        assert_eq!(choose(&[0.9, 0.8, 1.1, 1.0]), Some(1));
        // The reference lowest.
        assert_eq!(choose(&[1.3, 1.2, 1.1, 1.0]), Some(3));
    }
}
