//! `lapq`: post-training quantization of float ONNX models into QDQ ONNX models.
//!
//! The pipeline, one call per stage (see the README's table):
//! read -> prepare -> index -> plan -> data -> statistics (oracle) -> calibrate -> rounding (oracle)
//! -> export -> report.

mod biases;
pub mod calib;
pub mod config;
pub mod data;
pub mod eval;
pub mod export;
pub mod fusion;
pub mod html;
pub mod ir;
pub mod joint;
pub mod onnx;
pub mod oracle;
pub mod prepare;
pub mod protect;
pub mod quantize;
pub mod report;

use std::path::Path;

use anyhow::{Context, Result, ensure};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use biases::Biases;
use calib::bias::WindowMeans;
use calib::{Params, QParams, RangeStats};
use config::{Job, QuantConfig};
use ir::{GraphIndex, QuantPlan, RangeSource};
use report::{Report, Timings};

/// Quantizes `job.model` with calibration data `job.data` and writes the QDQ model to `job.output`.
pub fn quantize(job: &Job) -> Result<Report> {
    let (mut c, sensitivity, fallback) = calibrate_protected(job)?;
    let index = GraphIndex::new(&c.model)?;
    let qdq = export::qdq_model(&index, &c.plan, &c.params, job.quant.container)?;
    onnx::write_model(&qdq.model, &job.output, c.external_data)?;
    c.timings.lap("export");
    let mut report = Report::new(
        job,
        &c.plan,
        &c.params,
        &c.stats,
        c.samples.len(),
        c.timings,
    );
    report.lapq = c.lapq;
    report.auto = c.auto;
    report.best = c.best;
    report.sensitivity = sensitivity;
    report.fallback = fallback;
    report.warnings = qdq.warnings;
    report.fusion = fusion::fusion(&qdq.model)?;
    report.biases_corrected = c.biases.corrected();
    report.weights_rounded = c.params.weight_values.iter().flatten().count();
    report.rounding = c.rounding.clone();
    report.smoothed = c.smoothed.clone();
    Ok(report)
}

/// A calibrated run, before export: everything the later stages (export, oracle, report) need.
pub struct Calibrated {
    pub model: onnx::ModelProto,
    /// `model` as a file with external data, which the oracle loads.
    pub staged: onnx::StagedModel,
    /// Whether the input model stored tensors externally (the output does too).
    pub external_data: bool,
    pub plan: QuantPlan,
    pub params: Params,
    /// Range statistics per activation site (`None` where fixed or shared).
    pub stats: Vec<Option<RangeStats>>,
    /// Float biases and their corrections, decoded once for export and LAPQ.
    pub(crate) biases: Biases,
    /// Gram matrices of the input windows of the weights that round with error feedback (indexed
    /// like `plan.weights`).
    pub grams: Vec<Option<calib::gptq::WindowGram>>,
    pub samples: Vec<data::Sample>,
    /// Class labels of the samples, when given.
    pub labels: Option<Vec<usize>>,
    pub timings: Timings,
    /// What LAPQ did, when it ran.
    pub lapq: Option<joint::LapqReport>,
    /// What the auto method chose, when it ran.
    pub auto: Option<quantize::auto::AutoReport>,
    /// What `Method::Best`'s activation choice scored.
    pub best: Option<quantize::auto::BestReport>,
    /// What rounding with error feedback did, when it ran.
    pub rounding: Option<quantize::rounding::RoundingReport>,
    /// Normalisation outputs whose outlier channels moved into the MatMuls that read them.
    pub smoothed: Vec<String>,
}

/// The stages up to calibration: read, data, smoothing, index, plan, statistics, calibrate.
pub fn calibrate(job: &Job) -> Result<Calibrated> {
    let mut timings = Timings::start();
    check_output_path(&job.model, &job.output)?;
    let (mut model, external_data) = onnx::read_model(&job.model)?;
    timings.lap("read");
    let raw = GraphIndex::new(&model).with_context(|| format!("model {}", job.model.display()))?;
    let data::Dataset { samples, labels } = data::load(&job.data, raw.inputs())?;
    drop(raw);
    timings.lap("data");
    let smoothed = if job.quant.smoothing {
        quantize::smoothing::smooth(&mut model, &samples, job.progress)?
    } else {
        vec![]
    };
    timings.lap("smoothing");
    let plan = plan_model(&mut model, &job.model, &job.quant)?;
    let index = GraphIndex::new(&model)?;
    let staged = onnx::StagedModel::new(&model)?;
    timings.lap("plan");
    let Observations {
        stats,
        bias_means,
        grams,
    } = observe(&staged, &index, &plan, &samples, &job.quant, job.progress)?;
    timings.lap("statistics");
    let biases = Biases::new(&index, &plan, &bias_means)?;
    let params = calibrate_params(&index, &plan, &stats, &biases, &job.quant)?;
    timings.lap("calibrate");
    drop(index);
    let mut c = Calibrated {
        model,
        staged,
        external_data,
        plan,
        params,
        stats,
        biases,
        grams,
        samples,
        labels,
        timings,
        lapq: None,
        auto: None,
        best: None,
        rounding: None,
        smoothed,
    };
    match job.quant.act_method {
        config::Method::Lapq => {
            let (params, report) = joint::lapq(&c, &job.quant, job.progress)?;
            c.params = params;
            c.lapq = Some(report);
            c.timings.lap("lapq");
        }
        config::Method::Auto => {
            let (params, report) = quantize::auto::auto(&c, &job.quant, job.progress)?;
            c.params = params;
            c.auto = Some(report);
            c.timings.lap("auto");
        }
        _ => {}
    }
    let mut loss = None;
    quantize::rounding::round(&mut c, &job.quant, &mut loss, job.progress)?;
    if job.quant.act_method == config::Method::Best {
        quantize::auto::best(&mut c, &job.quant, &mut loss)?;
    }
    Ok(c)
}

/// `calibrate`, then, when the job asks, each site's sensitivity and the accuracy fallback: sites it
/// raises to 8 bits keep the parameters it chose; nodes it keeps float are excluded and the run is
/// calibrated again (LAPQ included). The result is scored by a fresh oracle.
fn calibrate_protected(
    job: &Job,
) -> Result<(
    Calibrated,
    Option<Vec<protect::SiteSensitivity>>,
    Option<protect::FallbackReport>,
)> {
    let c = calibrate(job)?;
    let q = &job.quant;
    if !q.sensitivity && q.target.is_none() {
        return Ok((c, None, None));
    }
    let n = q.lapq_samples.clamp(1, c.samples.len().max(1));
    let first = oracle(&c, n, 1)?;
    let sensitivity = protect::sensitivity(&c, &first, job.progress)?;
    let Some(target) = q.target else {
        return Ok((c, Some(sensitivity), None));
    };
    let (chosen, mut report) =
        protect::fallback(&c, &first, q, &sensitivity, target, job.progress)?;
    drop(first);
    let mut c = c;
    if !chosen.keep_float.is_empty() {
        // Float nodes change the plan: calibrate again without them.
        let mut again = job.clone();
        again.quant.keep_float.extend(chosen.keep_float);
        let timings = c.timings;
        c = calibrate(&again)?;
        c.timings = timings;
    } else if !chosen.eight_bit.is_empty() {
        // Raised grids leave the plan's sites as they are: keep the parameters the fallback scored.
        let mut raised = q.clone();
        raised.eight_bit.extend(chosen.eight_bit);
        ir::raise_to_eight_bits(&mut c.plan, &raised);
        c.params = chosen
            .params
            .context("internal: the fallback kept no parameters")?;
        quantize::rounding::round(&mut c, q, &mut None, job.progress)?;
    }
    report.exported = Some(oracle(&c, n, 1)?.score(&c.params)?);
    c.timings
        .lap("protect (sensitivity, fallback, calibration again)");
    Ok((c, Some(sensitivity), Some(report)))
}

/// Builds the loss oracle of a calibrated run over its first `n` samples (batches of `batch`
/// samples); its loss is cross-entropy when the run has labels.
pub fn oracle(c: &Calibrated, n: usize, batch: usize) -> Result<oracle::Oracle> {
    let n = n.min(c.samples.len());
    oracle::Oracle::new(
        c.staged.path(),
        &oracle_sites(c)?,
        c.samples[..n].to_vec(),
        c.labels.as_ref().map(|l| l[..n].to_vec()),
        batch,
    )
}

/// The oracle over a run's first `config.lapq_samples` samples that the stages after calibration
/// share (rounding's guard, `Method::Best`'s choice), built in `slot` on first use so that its float
/// reference pass runs once.
pub(crate) fn loss_oracle<'a>(
    c: &Calibrated,
    config: &QuantConfig,
    slot: &'a mut Option<oracle::Oracle>,
) -> Result<&'a oracle::Oracle> {
    Ok(match slot {
        Some(o) => o,
        None => {
            let n = config.lapq_samples.clamp(1, c.samples.len().max(1));
            slot.insert(oracle(c, n, 1)?)
        }
    })
}

/// The name tract gives an ONNX node: its own, or else its first output's.
fn tract_name(node: &onnx::NodeProto) -> String {
    if node.name().is_empty() {
        node.output.first().cloned().unwrap_or_default()
    } else {
        node.name().to_string()
    }
}

/// The oracle's sites for a calibrated run's plan, aligned with its `Params`.
pub fn oracle_sites(c: &Calibrated) -> Result<oracle::Sites> {
    let index = GraphIndex::new(&c.model)?;
    Ok(oracle::Sites {
        activations: c
            .plan
            .activations
            .iter()
            .map(|a| a.tensor.clone())
            .collect(),
        weights: c.plan.weights.iter().map(|w| w.tensor.clone()).collect(),
        weight_readers: c
            .plan
            .weights
            .iter()
            .map(|w| {
                index
                    .consumers(&w.tensor)
                    .iter()
                    .flat_map(|&n| {
                        let node = index.node(n);
                        node.input
                            .iter()
                            .filter(|t| !t.is_empty())
                            .enumerate()
                            .filter(|(_, t)| **t == w.tensor)
                            .map(|(k, _)| (tract_name(node), k))
                            .collect::<Vec<_>>()
                    })
                    .collect()
            })
            .collect(),
        biases: c
            .plan
            .biases
            .iter()
            .map(|b| {
                let node = index.node(b.node);
                oracle::BiasSite {
                    node: tract_name(node),
                    // Conv, ConvTranspose and Gemm read their bias as input 2 (the policy's Linear class).
                    slot: 2,
                    input: b.input,
                    weight: b.weight,
                    beta: b.beta,
                }
            })
            .collect(),
    })
}

/// Reads a model and plans its quantization without touching data: what `lapq inspect` shows.
pub fn inspect(model_path: &Path, config: &QuantConfig) -> Result<QuantPlan> {
    let (mut model, _) = onnx::read_model(model_path)?;
    plan_model(&mut model, model_path, config)
}

/// Rewrites `model` (see `prepare`), indexes it and plans its quantization; the plan lists the nodes
/// the rewrites removed.
fn plan_model(
    model: &mut onnx::ModelProto,
    path: &Path,
    config: &QuantConfig,
) -> Result<QuantPlan> {
    let context = || format!("model {}", path.display());
    let merged = prepare::prepare(model).with_context(context)?;
    let index = GraphIndex::new(model).with_context(context)?;
    let mut plan = ir::plan(&index, config)?;
    for m in &merged {
        plan.note_merged(&m.node, &m.op_type, &m.into);
    }
    Ok(plan)
}

/// Fails early, before any long work, when the output cannot be written or would overwrite the input.
pub fn check_output_path(model: &Path, output: &Path) -> Result<()> {
    let dir = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    ensure!(
        dir.is_dir(),
        "output folder {} does not exist",
        dir.display()
    );
    if let (Ok(a), Ok(b)) = (model.canonicalize(), output.canonicalize()) {
        ensure!(
            a != b,
            "output {} is the input model: lapq never modifies its input",
            output.display()
        );
    }
    Ok(())
}

/// One float pass over the calibration set: range statistics of every observed activation site,
/// indexed like `plan.activations` (`None` where the range is fixed or shared), and, with bias
/// correction, the window means of every correctable layer's input, indexed like `plan.biases`.
fn observe(
    model: &onnx::StagedModel,
    index: &GraphIndex,
    plan: &QuantPlan,
    samples: &[data::Sample],
    config: &QuantConfig,
    progress: bool,
) -> Result<Observations> {
    let mut taps: Vec<String> = vec![];
    let mut tap = |t: &str| match taps.iter().position(|x| x == t) {
        Some(k) => k,
        None => {
            taps.push(t.to_string());
            taps.len() - 1
        }
    };
    let ranges: Vec<(usize, usize)> = plan
        .activations
        .iter()
        .enumerate()
        .filter_map(|(i, s)| match &s.range {
            RangeSource::Observed(t) => Some((i, tap(t))),
            _ => None,
        })
        .collect();
    // (bias site, tap, window, kernel) of every corrected layer.
    let mut windows = vec![];
    if config.bias_correction {
        for (b, site) in plan.biases.iter().enumerate() {
            let Some(window) = &site.window else { continue };
            let w = &plan.weights[site.weight].tensor;
            let wt = index.constant(w).context("weight is a constant")?.tensor();
            let kernel = onnx::tensor_dims(wt)?.get(2..).unwrap_or(&[]).to_vec();
            windows.push((
                b,
                tap(&index.node(site.node).input[0]),
                window.clone(),
                kernel,
            ));
        }
    }
    // (weight site, tap, window, kernel) of every weight that rounds with error feedback, in plan
    // order while their Gram matrices fit the budget (the rest round to nearest).
    let mut gram_layers = vec![];
    let mut gram_bytes = 0usize;
    for (k, site) in plan.weights.iter().enumerate() {
        let Some((node, window)) = quantize::rounding::eligible(index, plan, k, config)? else {
            continue;
        };
        let wt = index
            .constant(&site.tensor)
            .context("weight is a constant")?
            .tensor();
        let dims = onnx::tensor_dims(wt)?;
        let (_, columns) = quantize::rounding::row_shape(&dims, &window);
        let groups = match &window {
            calib::bias::Window::Conv { group, .. } => *group,
            _ => 1,
        };
        let bytes = groups * columns * columns * std::mem::size_of::<f64>();
        if gram_bytes + bytes > GRAM_BUDGET {
            continue;
        }
        gram_bytes += bytes;
        let kernel = dims.get(2..).unwrap_or(&[]).to_vec();
        gram_layers.push((k, tap(&index.node(node).input[0]), window, kernel));
    }
    let float = oracle::FloatModel::load(model.path(), &taps)?;
    let bar = progress_bar(samples.len() as u64, "statistics", "samples", progress);
    // Per worker: range statistics per range tap, window means per corrected layer and Gram
    // matrices per rounded layer (`None` once a tensor did not fit its layer's geometry).
    let per_worker = float.observe(
        samples,
        || {
            (
                vec![RangeStats::default(); ranges.len()],
                vec![Some(WindowMeans::default()); windows.len()],
                vec![Some(calib::gptq::WindowGram::default()); gram_layers.len()],
            )
        },
        |(stats, means, grams), k, dims, values| {
            for (r, _) in ranges.iter().enumerate().filter(|(_, (_, t))| *t == k) {
                stats[r].observe(dims, values);
            }
            feed_windows(&windows, means, k, dims, values);
            feed_windows(&gram_layers, grams, k, dims, values);
        },
        &|| bar.inc(1),
    )?;
    bar.finish_and_clear();
    let mut merged = vec![RangeStats::default(); ranges.len()];
    let mut merged_means = vec![Some(WindowMeans::default()); windows.len()];
    let mut merged_grams = vec![Some(calib::gptq::WindowGram::default()); gram_layers.len()];
    for (stats, means, grams) in &per_worker {
        for (m, a) in merged_grams.iter_mut().zip(grams) {
            if let (Some(m), Some(a)) = (m.as_mut(), a)
                && m.merge(a).is_ok()
            {
                continue;
            }
            *m = None;
        }
        for (m, a) in merged.iter_mut().zip(stats) {
            m.merge(a);
        }
        for (m, a) in merged_means.iter_mut().zip(means) {
            match (m.as_mut(), a) {
                (Some(m), Some(a)) => m.merge(a),
                _ => *m = None,
            }
        }
    }
    let mut stats = vec![None; plan.activations.len()];
    for ((site, _), s) in ranges.into_iter().zip(merged) {
        stats[site] = Some(s);
    }
    let mut bias_means = vec![None; plan.biases.len()];
    for ((b, ..), m) in windows.into_iter().zip(merged_means) {
        bias_means[b] = m;
    }
    let mut grams = vec![None; plan.weights.len()];
    for ((k, ..), g) in gram_layers.into_iter().zip(merged_grams) {
        grams[k] = g;
    }
    Ok(Observations {
        stats,
        bias_means,
        grams,
    })
}

/// Bytes of Gram matrices the statistics pass holds per worker for rounding with error feedback
/// (each `K x K` f64 for weight rows of `K` values): all-MiniLM-L6-v2 needs 149 MB, EfficientNet-
/// Lite0 76 MB; a decoder with 4096-wide layers would need 134 MB per layer.
const GRAM_BUDGET: usize = 1 << 30;

/// Feeds tap `k`'s tensor to the window statistic of every layer (`(site, tap, window, kernel)`)
/// reading it; a statistic becomes `None` once a tensor does not fit its layer's geometry.
fn feed_windows<A: calib::bias::WindowStat>(
    layers: &[(usize, usize, calib::bias::Window, Vec<usize>)],
    stats: &mut [Option<A>],
    k: usize,
    dims: &[usize],
    values: &[f32],
) {
    for ((_, _, window, kernel), acc) in layers
        .iter()
        .zip(stats.iter_mut())
        .filter(|((_, tap, _, _), _)| *tap == k)
    {
        if let Some(a) = acc.as_mut()
            && a.observe(window, kernel, dims, values).is_err()
        {
            *acc = None;
        }
    }
}

/// What the float pass over the calibration set gathered.
struct Observations {
    stats: Vec<Option<RangeStats>>,
    bias_means: Vec<Option<WindowMeans>>,
    /// Gram matrices of the input windows of every weight that rounds with error feedback, indexed
    /// like `plan.weights`.
    grams: Vec<Option<calib::gptq::WindowGram>>,
}

/// The clipping method a configured method stands for.
fn clipping(method: config::Method, config: &QuantConfig) -> calib::Clipping {
    match method {
        config::Method::MinMax => calib::Clipping::MinMax,
        config::Method::Percentile => calib::Clipping::Percentile(config.percentile),
        config::Method::Entropy => calib::Clipping::Entropy,
        config::Method::Mse => calib::Clipping::Lp(config.lp),
        // LAPQ and auto start from MinMax parameters (the oracle's reference) and replace them; best
        // starts from MSE, one of its candidates.
        config::Method::Lapq | config::Method::Auto => calib::Clipping::MinMax,
        config::Method::Best => calib::Clipping::Lp(config.lp),
    }
}

/// Parameters for every site by the configured methods; biases get int32 parameters after the overflow
/// guard has enlarged any weight scale that needs it.
fn calibrate_params(
    index: &GraphIndex,
    plan: &QuantPlan,
    stats: &[Option<RangeStats>],
    biases: &Biases,
    config: &QuantConfig,
) -> Result<Params> {
    ensure!(
        config.weight_method != config::Method::Entropy,
        "entropy is an activation method; weights use minmax, percentile or mse"
    );
    let activations = activation_params(index, plan, stats, clipping(config.act_method, config))?;
    let weights = weight_params(index, plan, clipping(config.weight_method, config))?;
    biases.params(plan, activations, weights)
}

/// Every activation site's parameters with clipping `clip` (graph outputs keep their observed
/// range), aligned with `plan.activations`.
pub(crate) fn activation_params(
    index: &GraphIndex,
    plan: &QuantPlan,
    stats: &[Option<RangeStats>],
    clip: calib::Clipping,
) -> Result<Vec<QParams>> {
    let mut activations: Vec<QParams> = Vec::with_capacity(plan.activations.len());
    for (i, site) in plan.activations.iter().enumerate() {
        let p = match (&site.range, &stats[i]) {
            (RangeSource::Observed(t), Some(s)) if s.count > 0 => {
                // Clipping a graph output cuts exactly its extreme values: a classifier's top logits.
                let clip = if index.is_graph_output(t) {
                    calib::Clipping::MinMax
                } else {
                    clip
                };
                let (lo, hi) = match clip {
                    calib::Clipping::MinMax => (s.min, s.max),
                    how => calib::clipped_range(
                        s.min,
                        s.max,
                        calib::alpha_from_histogram(&s.hist, site.grid, how),
                    ),
                };
                QParams::per_tensor(site.grid, lo, hi)
            }
            (RangeSource::Observed(t), _) => {
                Err(anyhow::anyhow!("tensor '{t}' was not observed as float32"))
            }
            (RangeSource::Fixed(lo, hi), _) => QParams::per_tensor(site.grid, *lo, *hi),
            (RangeSource::SameAs(j), _) => Ok(activations[*j].clone()),
        };
        activations.push(p.with_context(|| format!("activation '{}'", site.tensor))?);
    }
    Ok(activations)
}

/// Every weight site's parameters with clipping `clip`, aligned with `plan.weights`.
pub(crate) fn weight_params(
    index: &GraphIndex,
    plan: &QuantPlan,
    clip: calib::Clipping,
) -> Result<Vec<QParams>> {
    plan.weights
        .iter()
        .map(|site| {
            let t = index
                .constant(&site.tensor)
                .context("weight is a constant")?
                .tensor();
            calib::weight_params(
                site.grid,
                &onnx::tensor_f32(t)?,
                &onnx::tensor_dims(t)?,
                site.axis,
                clip,
            )
            .with_context(|| format!("weight '{}'", site.tensor))
        })
        .collect()
}

/// A progress bar with ETA on stderr, counting `unit`s of `what`; drawn only on a terminal and when
/// `enabled`. Its message (set by the caller) follows the ETA.
pub(crate) fn progress_bar(len: u64, what: &str, unit: &str, enabled: bool) -> ProgressBar {
    let target = if enabled {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(len), target);
    let template =
        format!("{{prefix:>12}} [{{bar:30}}] {{pos}}/{{len}} {unit}, ETA {{eta}}  {{msg}}");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(what.to_string());
    bar
}
