//! `lapq`: post-training quantization of float ONNX models into QDQ ONNX models.
//!
//! The pipeline, one call per stage (see the README's table):
//! read -> prepare -> index -> plan -> data -> statistics (oracle) -> calibrate -> rounding (oracle)
//! -> export -> report.

pub mod calib;
pub mod config;
pub mod data;
pub mod eval;
pub mod export;
pub mod fusion;
pub mod html;
pub mod ir;
pub mod onnx;
pub mod oracle;
pub mod prepare;
pub mod progress;
pub mod quantize;
pub mod report;

use std::path::Path;

use anyhow::{Context, Result, ensure};

use config::{Job, QuantConfig};
use ir::{GraphIndex, QuantPlan};
use progress::Timings;
use report::Report;

pub use quantize::Calibrated;
pub use quantize::sites::{oracle, oracle_sites};

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
    let quantize::statistics::Observations {
        stats,
        bias_means,
        grams,
    } = quantize::statistics::observe(&staged, &index, &plan, &samples, &job.quant, job.progress)?;
    timings.lap("statistics");
    let biases = quantize::biases::Biases::new(&index, &plan, &bias_means)?;
    let params = quantize::params::calibrate_params(&index, &plan, &stats, &biases, &job.quant)?;
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
            let (params, report) = quantize::lapq::lapq(&c, &job.quant, job.progress)?;
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
    Option<Vec<quantize::protect::SiteSensitivity>>,
    Option<quantize::protect::FallbackReport>,
)> {
    let c = calibrate(job)?;
    let q = &job.quant;
    if !q.sensitivity && q.target.is_none() {
        return Ok((c, None, None));
    }
    let n = q.lapq_samples.clamp(1, c.samples.len().max(1));
    let first = oracle(&c, n, 1)?;
    let sensitivity = quantize::protect::sensitivity(&c, &first, job.progress)?;
    let Some(target) = q.target else {
        return Ok((c, Some(sensitivity), None));
    };
    let (chosen, mut report) =
        quantize::protect::fallback(&c, &first, q, &sensitivity, target, job.progress)?;
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
