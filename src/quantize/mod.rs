//! The calibration stages: the statistics pass, parameters from it, bias correction, and the stages
//! that search with the oracle (best, auto, LAPQ, rounding, sensitivity and the accuracy fallback).

pub mod auto;
pub(crate) mod biases;
pub mod lapq;
pub mod params;
pub mod protect;
pub mod rounding;
pub mod sites;
pub mod smoothing;
pub mod statistics;

use anyhow::{Context, Result};

use crate::calib::{self, Params, RangeStats};
use crate::config::{self, Job};
use crate::ir::{GraphIndex, QuantPlan};
use crate::progress::Timings;
use crate::{data, onnx};
use biases::Biases;

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
    pub lapq: Option<lapq::LapqReport>,
    /// What the auto method chose, when it ran.
    pub auto: Option<auto::AutoReport>,
    /// What `Method::Best`'s activation choice scored.
    pub best: Option<auto::BestReport>,
    /// What rounding with error feedback did, when it ran.
    pub rounding: Option<rounding::RoundingReport>,
    /// Normalisation outputs whose outlier channels moved into the MatMuls that read them.
    pub smoothed: Vec<String>,
}

/// The stages up to calibration: read, data, smoothing, index, plan, statistics, calibrate.
pub fn calibrate(job: &Job) -> Result<Calibrated> {
    let mut timings = Timings::start();
    onnx::check_output_path(&job.model, &job.output)?;
    let (mut model, external_data) = onnx::read_model(&job.model)?;
    timings.lap("read");
    let raw = GraphIndex::new(&model).with_context(|| format!("model {}", job.model.display()))?;
    let data::Dataset { samples, labels } = data::load(&job.data, raw.inputs())?;
    drop(raw);
    timings.lap("data");
    let smoothed = if job.quant.smoothing {
        smoothing::smooth(&mut model, &samples, job.progress)?
    } else {
        vec![]
    };
    timings.lap("smoothing");
    let plan = crate::prepare::plan_model(&mut model, &job.model, &job.quant)?;
    let index = GraphIndex::new(&model)?;
    let staged = onnx::StagedModel::new(&model)?;
    timings.lap("plan");
    let statistics::Observations {
        stats,
        bias_means,
        grams,
    } = statistics::observe(&staged, &index, &plan, &samples, &job.quant, job.progress)?;
    timings.lap("statistics");
    let biases = biases::Biases::new(&index, &plan, &bias_means)?;
    let params = params::calibrate_params(&index, &plan, &stats, &biases, &job.quant)?;
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
            let (params, report) = lapq::lapq(&c, &job.quant, job.progress)?;
            c.params = params;
            c.lapq = Some(report);
            c.timings.lap("lapq");
        }
        config::Method::Auto => {
            let (params, report) = auto::auto(&c, &job.quant, job.progress)?;
            c.params = params;
            c.auto = Some(report);
            c.timings.lap("auto");
        }
        _ => {}
    }
    let mut loss = None;
    rounding::round(&mut c, &job.quant, &mut loss, job.progress)?;
    if job.quant.act_method == config::Method::Best {
        auto::best(&mut c, &job.quant, &mut loss)?;
    }
    Ok(c)
}
