//! Accuracy protection: what each quantization site costs the network (sensitivity), and the fallback
//! that protects the costliest until a target holds on the calibration data: in a run below 8 bits it
//! raises sites to 8 bits (the model stays integer), in an 8-bit run it keeps nodes float.
//!
//! A site is measured with the sites that share its parameters (data movement after an activation)
//! or depend on it (a weight's int32 bias). A node's sites are those its exclusion removes from the
//! plan, so that what is measured is what the export does when the node is kept float. Everything
//! runs on the loss oracle with a mask of float slots or changed parameters; nothing is rebuilt.

use std::collections::HashSet;

use anyhow::{Context, Result, ensure};
use serde::Serialize;

use crate::calib::{self, Grid, Histogram, Params, QParams, RangeStats};
use crate::config::{Job, QuantConfig, Target};
use crate::ir::{self, Decision, GraphIndex, QuantPlan, RangeSource};
use crate::onnx;
use crate::oracle::{Oracle, Score};
use crate::quantize::Calibrated;

/// What quantizing one site alone costs, and how well its values fit its grid.
#[derive(Clone, Debug, Serialize)]
pub struct SiteSensitivity {
    pub tensor: String,
    /// "activation" or "weight".
    pub kind: &'static str,
    pub bits: u8,
    /// The loss with only this site (and those sharing or depending on it) quantized, less the float
    /// network's loss.
    pub loss_delta: f64,
    /// Top-1 agreement with the float network with only this site quantized (classifiers).
    pub agreement: Option<f64>,
    /// Signal to quantization noise of the values, in dB: exact for weights, from the calibration
    /// histogram for activations; `None` where unknown (fixed or shared ranges).
    pub sqnr_db: Option<f64>,
    /// Fraction of the grid the observed values span (weights: the mean over channels).
    pub range_use: Option<f64>,
}

/// What the fallback did.
#[derive(Clone, Debug, Serialize)]
pub struct FallbackReport {
    pub target: Target,
    /// "eight_bits" (sites raised to 8 bits) or "float" (nodes kept float).
    pub mode: &'static str,
    /// On the oracle's samples, before the fallback.
    pub before: Score,
    /// The sites raised or nodes kept float, costliest first, with the score once each was taken
    /// (those taken up to it, before the pruning pass).
    pub kept: Vec<Kept>,
    /// Choices taken, then dropped because the target held without them.
    pub dropped: Vec<String>,
    /// The score with the final choices, on the oracle's samples.
    pub after: Score,
    /// Whether the target held on the oracle's samples at the end.
    pub reached: bool,
    /// The score of the model as exported (calibrated again with the fallback's choices).
    pub exported: Option<Score>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Kept {
    /// The tensor raised to 8 bits, or the node kept float.
    pub name: String,
    /// "activation" / "weight", or the node's operator type.
    pub kind: String,
    pub score: Score,
}

/// What the fallback chose, for the configuration of the run calibrated again.
#[derive(Clone, Debug, Default)]
pub struct Protection {
    pub keep_float: Vec<String>,
    pub eight_bit: Vec<String>,
    /// The parameters scored last (valid for the plan with `eight_bit` raised; `keep_float` changes
    /// the plan itself, which then needs calibrating again).
    pub params: Option<Params>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Site {
    Activation(usize),
    Weight(usize),
}

/// A site and the oracle slots measured with it (activation sites first, then weights, then biases).
struct SiteUnit {
    site: Site,
    slots: Vec<usize>,
}

/// Every site that owns its parameters, with the slots sharing them (activations) or depending on it
/// (a weight's biases).
fn site_units(plan: &QuantPlan) -> Vec<SiteUnit> {
    let (a, w) = (plan.activations.len(), plan.weights.len());
    let mut units = vec![];
    for (i, site) in plan.activations.iter().enumerate() {
        if matches!(site.range, RangeSource::SameAs(_)) {
            continue;
        }
        let mut slots = vec![i];
        for (j, other) in plan.activations.iter().enumerate().skip(i + 1) {
            if let RangeSource::SameAs(k) = other.range
                && slots.contains(&k)
            {
                slots.push(j);
            }
        }
        units.push(SiteUnit {
            site: Site::Activation(i),
            slots,
        });
    }
    for k in 0..w {
        let mut slots = vec![a + k];
        slots.extend(
            plan.biases
                .iter()
                .enumerate()
                .filter(|(_, b)| b.weight == k)
                .map(|(b, _)| a + w + b),
        );
        units.push(SiteUnit {
            site: Site::Weight(k),
            slots,
        });
    }
    units
}

/// A quantized node and the oracle slots its exclusion removes from the plan.
struct NodeUnit {
    node: String,
    op_type: String,
    slots: Vec<usize>,
}

/// Every quantized node whose exclusion removes sites, with them.
fn node_units(c: &Calibrated, config: &QuantConfig) -> Result<Vec<NodeUnit>> {
    let index = GraphIndex::new(&c.model)?;
    let keys = slot_keys(&c.plan);
    let mut units = vec![];
    for entry in c
        .plan
        .nodes
        .iter()
        .filter(|n| n.decision == Decision::Quantized)
    {
        let mut without = config.clone();
        without.keep_float.push(entry.name.clone());
        let rest: HashSet<(char, String)> = slot_keys(&ir::plan(&index, &without)?)
            .into_iter()
            .collect();
        let slots: Vec<usize> = (0..keys.len())
            .filter(|&k| !rest.contains(&keys[k]))
            .collect();
        if !slots.is_empty() {
            units.push(NodeUnit {
                node: entry.name.clone(),
                op_type: entry.op_type.clone(),
                slots,
            });
        }
    }
    Ok(units)
}

/// The oracle's slots of a plan, by kind and tensor.
fn slot_keys(plan: &QuantPlan) -> Vec<(char, String)> {
    let a = plan.activations.iter().map(|s| ('a', s.tensor.clone()));
    let w = plan.weights.iter().map(|s| ('w', s.tensor.clone()));
    let b = plan.biases.iter().map(|s| ('b', s.name.clone()));
    a.chain(w).chain(b).collect()
}

fn slot_count(plan: &QuantPlan) -> usize {
    plan.activations.len() + plan.weights.len() + plan.biases.len()
}

/// Each site's cost with only it quantized, costliest first.
pub fn sensitivity(
    c: &Calibrated,
    oracle: &Oracle,
    progress: bool,
) -> Result<Vec<SiteSensitivity>> {
    let slots = slot_count(&c.plan);
    let units = site_units(&c.plan);
    let bar = crate::progress::bar(units.len() as u64 + 1, "sensitivity", "sites", progress);
    let model = oracle.model();
    model.set_float_slots(vec![true; slots])?;
    let float = oracle.score(&c.params)?;
    bar.inc(1);
    let mut out = vec![];
    for u in &units {
        let mut mask = vec![true; slots];
        for &s in &u.slots {
            mask[s] = false;
        }
        model.set_float_slots(mask)?;
        let score = oracle.score(&c.params)?;
        out.push(site_quality(
            c,
            u.site,
            score.loss - float.loss,
            score.agreement,
        )?);
        bar.inc(1);
    }
    model.set_float_slots(vec![])?;
    bar.finish_and_clear();
    out.sort_by(|a, b| b.loss_delta.total_cmp(&a.loss_delta));
    Ok(out)
}

/// `calibrate`, then, when the job asks, each site's sensitivity and the accuracy fallback: sites it
/// raises to 8 bits keep the parameters it chose; nodes it keeps float are excluded and the run is
/// calibrated again (LAPQ included). The result is scored by a fresh oracle.
pub(crate) fn calibrate_protected(
    job: &Job,
) -> Result<(
    Calibrated,
    Option<Vec<SiteSensitivity>>,
    Option<FallbackReport>,
)> {
    let c = super::calibrate(job)?;
    let q = &job.quant;
    if !q.sensitivity && q.target.is_none() {
        return Ok((c, None, None));
    }
    let n = q.lapq_samples.clamp(1, c.samples.len().max(1));
    let first = super::sites::oracle(&c, n, 1)?;
    let sensitivity = sensitivity(&c, &first, job.progress)?;
    let Some(target) = q.target else {
        return Ok((c, Some(sensitivity), None));
    };
    let (chosen, mut report) = fallback(&c, &first, q, &sensitivity, target, job.progress)?;
    drop(first);
    let mut c = c;
    if !chosen.keep_float.is_empty() {
        // Float nodes change the plan: calibrate again without them.
        let mut again = job.clone();
        again.quant.keep_float.extend(chosen.keep_float);
        let timings = c.timings;
        c = super::calibrate(&again)?;
        c.timings = timings;
    } else if !chosen.eight_bit.is_empty() {
        // Raised grids leave the plan's sites as they are: keep the parameters the fallback scored.
        let mut raised = q.clone();
        raised.eight_bit.extend(chosen.eight_bit);
        ir::raise_to_eight_bits(&mut c.plan, &raised);
        c.params = chosen
            .params
            .context("internal: the fallback kept no parameters")?;
        super::rounding::round(&mut c, q, &mut None, job.progress)?;
    }
    report.exported = Some(super::sites::oracle(&c, n, 1)?.score(&c.params)?);
    c.timings
        .lap("protect (sensitivity, fallback, calibration again)");
    Ok((c, Some(sensitivity), Some(report)))
}

/// Protects sites until `target` holds: raised to 8 bits when the run has sites below 8 bits, else
/// their nodes kept float. Candidates are taken costliest first by `sensitivity` (a node costs what
/// the sites it owns cost), each kept whether or not the loss moves at once: in a badly broken network
/// no single repair shows until several are made. Once the target holds, the choices are revisited
/// cheapest first and dropped where the target still holds without them.
pub fn fallback(
    c: &Calibrated,
    oracle: &Oracle,
    config: &QuantConfig,
    sensitivity: &[SiteSensitivity],
    target: Target,
    progress: bool,
) -> Result<(Protection, FallbackReport)> {
    let model = oracle.model();
    model.set_float_slots(vec![])?;
    let before = oracle.score(&c.params)?;
    ensure!(
        !matches!(target, Target::MinAgreement(_)) || before.agreement.is_some(),
        "--min-agreement needs a classifier (one row of class scores per sample); use --max-loss"
    );
    let holds = |s: &Score| target.holds(s.loss, s.agreement);
    let below_eight = (0..c.plan.activations.len())
        .any(|i| below_eight_bits(c, config, Site::Activation(i)))
        || (0..c.plan.weights.len()).any(|k| below_eight_bits(c, config, Site::Weight(k)));
    let candidates = candidates(c, config, sensitivity, below_eight)?;
    let bar = crate::progress::bar(
        2 * candidates.len() as u64,
        "fallback",
        "evaluations",
        progress,
    );
    let score = |p: &Params, m: &[bool]| -> Result<Score> {
        model.set_float_slots(m.to_vec())?;
        oracle.score(p)
    };
    let none = vec![false; slot_count(&c.plan)];
    // The state after taking `chosen` (candidate indices), in order.
    let state = |chosen: &[usize]| -> Result<(Params, Vec<bool>)> {
        let (mut p, mut m) = (c.params.clone(), none.clone());
        for &k in chosen {
            (p, m) = (candidates[k].apply)(&p, &m)?;
        }
        Ok((p, m))
    };
    let mut chosen: Vec<usize> = vec![];
    let mut kept = vec![];
    let mut current = before;
    // Forward, each choice applies on top of the last state; only pruning replays from scratch.
    let (mut p, mut m) = (c.params.clone(), none.clone());
    for (k, candidate) in candidates.iter().enumerate() {
        if holds(&current) {
            break;
        }
        bar.inc(1);
        chosen.push(k);
        (p, m) = (candidate.apply)(&p, &m)?;
        current = score(&p, &m)?;
        kept.push(Kept {
            name: candidate.name.clone(),
            kind: candidate.kind.clone(),
            score: current,
        });
    }
    let mut dropped = vec![];
    if holds(&current) {
        for k in chosen.clone().into_iter().rev() {
            bar.inc(1);
            let trial: Vec<usize> = chosen.iter().copied().filter(|&j| j != k).collect();
            let (p, m) = state(&trial)?;
            let s = score(&p, &m)?;
            if holds(&s) {
                chosen = trial;
                current = s;
                dropped.push(candidates[k].name.clone());
            }
        }
    }
    kept.retain(|k| !dropped.contains(&k.name));
    let (params, _) = state(&chosen)?;
    model.set_float_slots(vec![])?;
    bar.finish_and_clear();
    let names = chosen.iter().map(|&k| candidates[k].name.clone()).collect();
    let protection = Protection::of(below_eight, names, params);
    Ok((
        protection,
        FallbackReport {
            target,
            mode: if below_eight { "eight_bits" } else { "float" },
            before,
            reached: holds(&current),
            kept,
            dropped,
            after: current,
            exported: None,
        },
    ))
}

impl Protection {
    /// The fallback's choices `names`: sites raised to 8 bits with `params` in a run below 8 bits,
    /// else nodes kept float.
    fn of(below_eight: bool, names: Vec<String>, params: Params) -> Protection {
        if below_eight {
            Protection {
                eight_bit: names,
                params: Some(params),
                ..Protection::default()
            }
        } else {
            Protection {
                keep_float: names,
                ..Protection::default()
            }
        }
    }
}

/// What taking a fallback candidate does to (parameters, float mask).
type Apply<'a> = Box<dyn Fn(&Params, &[bool]) -> Result<(Params, Vec<bool>)> + 'a>;

/// One choice the fallback can take: a site raised to 8 bits or a node kept float.
struct Candidate<'a> {
    name: String,
    kind: String,
    /// Its sensitivity: the loss increase of its sites alone.
    cost: f64,
    apply: Apply<'a>,
}

/// Whether `site` is below 8 bits: an activation below 8, a weight below the widest grid its target
/// allows (7 bits where the target's kernels saturate 8-bit pairs).
fn below_eight_bits(c: &Calibrated, config: &QuantConfig, site: Site) -> bool {
    match site {
        Site::Activation(i) => c.plan.activations[i].grid.bits < 8,
        Site::Weight(k) => {
            let w = &c.plan.weights[k];
            w.grid.bits < config.weight_bits_cap(w.paired)
        }
    }
}

/// The fallback's candidates, costliest first: in a run below 8 bits each site below 8 bits (raised
/// to 8), else each node (kept float), costed by the sensitivity of the sites it holds.
fn candidates<'a>(
    c: &'a Calibrated,
    config: &'a QuantConfig,
    sensitivity: &[SiteSensitivity],
    below_eight: bool,
) -> Result<Vec<Candidate<'a>>> {
    let units = site_units(&c.plan);
    let site_name = |site: Site| match site {
        Site::Activation(i) => &c.plan.activations[i].tensor,
        Site::Weight(k) => &c.plan.weights[k].tensor,
    };
    let cost_of = |u: &SiteUnit| {
        sensitivity
            .iter()
            .find(|s| *site_name(u.site) == s.tensor && kind(u.site) == s.kind)
            .map_or(0.0, |s| s.loss_delta)
    };
    let mut candidates: Vec<Candidate> = vec![];
    if below_eight {
        for u in units {
            if below_eight_bits(c, config, u.site) {
                let (name, cost) = (site_name(u.site).clone(), cost_of(&u));
                candidates.push(Candidate {
                    name,
                    kind: kind(u.site).to_string(),
                    cost,
                    apply: Box::new(move |p: &Params, m: &[bool]| {
                        Ok((raised(c, p, &u, config)?, m.to_vec()))
                    }),
                });
            }
        }
    } else {
        let mut slot_cost = vec![0.0; slot_count(&c.plan)];
        for u in &units {
            for &k in &u.slots {
                slot_cost[k] = cost_of(u);
            }
        }
        for n in node_units(c, config)? {
            let cost = n.slots.iter().map(|&k| slot_cost[k]).sum();
            candidates.push(Candidate {
                name: n.node.clone(),
                kind: n.op_type.clone(),
                cost,
                apply: Box::new(move |p: &Params, m: &[bool]| {
                    let mut m = m.to_vec();
                    for &k in &n.slots {
                        m[k] = true;
                    }
                    Ok((p.clone(), m))
                }),
            });
        }
    }
    candidates.sort_by(|a, b| b.cost.total_cmp(&a.cost));
    Ok(candidates)
}

fn kind(site: Site) -> &'static str {
    match site {
        Site::Activation(_) => "activation",
        Site::Weight(_) => "weight",
    }
}

/// `params` with the unit's sites on 8-bit grids (MinMax over what calibration observed), biases
/// requantized (and corrected) for the new weight scales.
fn raised(
    c: &Calibrated,
    params: &Params,
    unit: &SiteUnit,
    config: &QuantConfig,
) -> Result<Params> {
    let a = c.plan.activations.len();
    let mut activations = params.activations.clone();
    let mut weights = params.weights.clone();
    match unit.site {
        Site::Activation(i) => {
            let site = &c.plan.activations[i];
            let grid = Grid {
                bits: 8,
                ..site.grid
            };
            let p = match (&site.range, &c.stats[i]) {
                (RangeSource::Fixed(lo, hi), _) => QParams::per_tensor(grid, *lo, *hi)?,
                (_, Some(s)) if s.count > 0 => QParams::per_tensor(grid, s.min, s.max)?,
                _ => return Ok(params.clone()),
            };
            for &k in unit.slots.iter().filter(|&&k| k < a) {
                activations[k] = p.clone();
            }
        }
        Site::Weight(k) => {
            let site = &c.plan.weights[k];
            let grid = Grid {
                bits: site.grid.bits.max(config.weight_bits_cap(site.paired)),
                ..site.grid
            };
            let index = GraphIndex::new(&c.model)?;
            let t = index
                .constant(&site.tensor)
                .ok_or_else(|| anyhow::anyhow!("weight '{}' is not a constant", site.tensor))?
                .tensor();
            weights[k] = calib::weight_params(
                grid,
                &onnx::tensor_f32(t)?,
                &onnx::tensor_dims(t)?,
                site.axis,
                calib::Clipping::MinMax,
            )?;
        }
    }
    c.biases.params(&c.plan, activations, weights)
}

/// A site's entry: its cost and how well its values fit its parameters.
fn site_quality(
    c: &Calibrated,
    site: Site,
    loss_delta: f64,
    agreement: Option<f64>,
) -> Result<SiteSensitivity> {
    let (tensor, bits, sqnr_db, range_use) = match site {
        Site::Activation(i) => {
            let p = &c.params.activations[i];
            let (sqnr_db, range_use) = match &c.stats[i] {
                Some(s) if s.count > 0 => (histogram_sqnr(&s.hist, p), Some(activation_use(s, p))),
                _ => (None, None),
            };
            (
                &c.plan.activations[i].tensor,
                p.grid.bits,
                sqnr_db,
                range_use,
            )
        }
        Site::Weight(k) => {
            let site = &c.plan.weights[k];
            let p = &c.params.weights[k];
            let index = GraphIndex::new(&c.model)?;
            let t = index
                .constant(&site.tensor)
                .ok_or_else(|| anyhow::anyhow!("weight '{}' is not a constant", site.tensor))?
                .tensor();
            let (values, dims) = (onnx::tensor_f32(t)?, onnx::tensor_dims(t)?);
            let q = c.params.weight_hat(k, &values, &dims);
            let sqnr_db = sqnr(
                values
                    .iter()
                    .zip(&q)
                    .map(|(&x, &y)| (x as f64, y as f64, 1.0)),
            );
            (
                &site.tensor,
                p.grid.bits,
                sqnr_db,
                Some(weight_use(&values, &dims, p)),
            )
        }
    };
    Ok(SiteSensitivity {
        tensor: tensor.clone(),
        kind: kind(site),
        bits,
        loss_delta,
        agreement,
        sqnr_db,
        range_use,
    })
}

/// `10 log10(sum x^2 / sum (x - q)^2)` over weighted pairs `(x, q, weight)`; `None` without noise.
fn sqnr(pairs: impl Iterator<Item = (f64, f64, f64)>) -> Option<f64> {
    let (mut signal, mut noise) = (0.0, 0.0);
    for (x, q, n) in pairs {
        signal += n * x * x;
        noise += n * (x - q) * (x - q);
    }
    (noise > 0.0).then(|| 10.0 * (signal / noise).log10())
}

/// SQNR of the histogram's values (each bin at its centre) under per-tensor parameters.
fn histogram_sqnr(h: &Histogram, p: &QParams) -> Option<f64> {
    let width = 2.0 * h.limit as f64 / h.counts.len() as f64;
    sqnr(
        h.counts
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, &n)| {
                let x = -(h.limit as f64) + (i as f64 + 0.5) * width;
                let q = p.grid.fake_quant(x as f32, p.scale[0], p.zero_point[0]) as f64;
                (x, q, n as f64)
            }),
    )
}

/// The grid's representable range under parameters of scale `s` and zero point `z`.
fn grid_range(p: &QParams, c: usize) -> (f64, f64) {
    let (s, z) = (p.scale[c] as f64, p.zero_point[c] as f64);
    (
        (p.grid.qmin() as f64 - z) * s,
        (p.grid.qmax() as f64 - z) * s,
    )
}

/// The fraction of the grid's range the observed range covers.
fn activation_use(s: &RangeStats, p: &QParams) -> f64 {
    let (lo, hi) = grid_range(p, 0);
    let covered = (s.max as f64).min(hi) - (s.min as f64).max(lo);
    (covered / (hi - lo).max(f64::MIN_POSITIVE)).clamp(0.0, 1.0)
}

/// The mean over channels of the fraction of the grid's range the channel's values cover.
fn weight_use(values: &[f32], dims: &[usize], p: &QParams) -> f64 {
    let channels = p.scale.len();
    let inner: usize = match p.axis {
        Some(axis) => dims.get(axis + 1..).unwrap_or(&[]).iter().product(),
        None => values.len(),
    };
    let mut lo = vec![f64::INFINITY; channels];
    let mut hi = vec![f64::NEG_INFINITY; channels];
    for (block, chunk) in values.chunks(inner.max(1)).enumerate() {
        let c = block % channels;
        for &v in chunk {
            lo[c] = lo[c].min(v as f64);
            hi[c] = hi[c].max(v as f64);
        }
    }
    let uses: f64 = (0..channels)
        .map(|c| {
            let (glo, ghi) = grid_range(p, c);
            ((hi[c].min(ghi) - lo[c].max(glo)) / (ghi - glo).max(f64::MIN_POSITIVE)).clamp(0.0, 1.0)
        })
        .sum();
    uses / channels.max(1) as f64
}
