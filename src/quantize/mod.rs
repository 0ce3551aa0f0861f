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

use crate::calib::{self, Params, RangeStats};
use crate::ir::QuantPlan;
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
