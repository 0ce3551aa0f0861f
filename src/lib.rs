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

use anyhow::Result;

use config::{Job, QuantConfig};
use ir::{GraphIndex, QuantPlan};
use report::Report;

pub use onnx::check_output_path;
pub use quantize::sites::{oracle, oracle_sites};
pub use quantize::{Calibrated, calibrate};

/// Quantizes `job.model` with calibration data `job.data` and writes the QDQ model to `job.output`.
pub fn quantize(job: &Job) -> Result<Report> {
    let (mut c, sensitivity, fallback) = quantize::protect::calibrate_protected(job)?;
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

/// Reads a model and plans its quantization without touching data: what `lapq inspect` shows.
pub fn inspect(model_path: &Path, config: &QuantConfig) -> Result<QuantPlan> {
    let (mut model, _) = onnx::read_model(model_path)?;
    prepare::plan_model(&mut model, model_path, config)
}
