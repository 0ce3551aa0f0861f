//! What a run did: per-site parameters, nodes left in float and why, timings. Decides nothing.

use serde::Serialize;

use crate::calib::{Params, RangeStats};
use crate::config::{Job, QuantConfig};
use crate::ir::{Decision, QuantPlan, RangeSource};
use crate::progress::Timings;

/// One activation site's parameters and the range they came from.
#[derive(Clone, Debug, Serialize)]
pub struct ActivationEntry {
    pub tensor: String,
    pub range_source: String,
    pub observed_min: Option<f32>,
    pub observed_max: Option<f32>,
    pub scale: f32,
    pub zero_point: i64,
    pub bits: u8,
    pub signed: bool,
}

/// One quantized constant's parameters.
#[derive(Clone, Debug, Serialize)]
pub struct ConstantEntry {
    pub tensor: String,
    pub axis: Option<usize>,
    pub scale: Vec<f32>,
    pub zero_point: Vec<i64>,
    pub bits: u8,
    pub signed: bool,
}

/// A node left in float.
#[derive(Clone, Debug, Serialize)]
pub struct SkippedNode {
    pub node: String,
    pub op_type: String,
    pub code: &'static str,
    pub reason: String,
}

/// Everything `--report` writes.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub model: String,
    pub output: String,
    pub method: String,
    pub config: QuantConfig,
    pub calibration_samples: usize,
    pub nodes_quantized: usize,
    pub nodes_folded: usize,
    /// Nodes folded into the float weights of another before planning (BatchNormalization).
    pub nodes_merged: usize,
    pub nodes_float: usize,
    pub activations: Vec<ActivationEntry>,
    pub weights: Vec<ConstantEntry>,
    pub biases: Vec<ConstantEntry>,
    pub skipped: Vec<SkippedNode>,
    /// Conv/Gemm layers whose bias absorbed the mean shift of their quantized weights.
    pub biases_corrected: usize,
    /// Weights whose codes an optimised rounding chose (`--rounding gptq` or `adaround`).
    pub weights_rounded: usize,
    /// Forms that will not fuse into integer kernels in ONNX Runtime.
    pub warnings: Vec<String>,
    /// What LAPQ did (the p grid and its losses, p*, Powell's sweeps, evaluations, time per stage).
    pub lapq: Option<crate::quantize::lapq::LapqReport>,
    /// What the auto method chose, when it ran.
    pub auto: Option<crate::quantize::auto::AutoReport>,
    /// Which activation clipping `--method best` chose, and each candidate's loss.
    pub best: Option<crate::quantize::auto::BestReport>,
    /// What the optimised rounding did, when it ran.
    pub rounding: Option<crate::quantize::rounding::RoundingReport>,
    /// Normalisation outputs whose outlier channels moved into the MatMuls reading them (SmoothQuant).
    pub smoothed: Vec<String>,
    /// Each site's cost alone, costliest first (with --sensitivity or a target).
    pub sensitivity: Option<Vec<crate::quantize::protect::SiteSensitivity>>,
    /// What the accuracy fallback kept float (with --max-loss or --min-agreement).
    pub fallback: Option<crate::quantize::protect::FallbackReport>,
    /// What ONNX Runtime's CPU provider does with each node of the exported model.
    pub fusion: Vec<crate::fusion::Verdict>,
    pub timings: Timings,
}

impl Report {
    /// Collects the report of a finished run.
    pub fn new(
        job: &Job,
        plan: &QuantPlan,
        params: &Params,
        stats: &[Option<RangeStats>],
        samples: usize,
        timings: Timings,
    ) -> Report {
        let activations = plan
            .activations
            .iter()
            .zip(&params.activations)
            .zip(stats)
            .map(|((site, p), s)| ActivationEntry {
                tensor: site.tensor.clone(),
                range_source: match &site.range {
                    RangeSource::Observed(t) => format!("observed on '{t}'"),
                    RangeSource::Fixed(lo, hi) => format!("fixed [{lo}, {hi}]"),
                    RangeSource::SameAs(j) => format!("same as '{}'", plan.activations[*j].tensor),
                },
                observed_min: s.as_ref().map(|s| s.min),
                observed_max: s.as_ref().map(|s| s.max),
                scale: p.scale[0],
                zero_point: p.zero_point[0],
                bits: p.grid.bits,
                signed: p.grid.signed,
            })
            .collect();
        let constant = |tensor: &str, p: &crate::calib::QParams| ConstantEntry {
            tensor: tensor.to_string(),
            axis: p.axis,
            scale: p.scale.clone(),
            zero_point: p.zero_point.clone(),
            bits: p.grid.bits,
            signed: p.grid.signed,
        };
        let count = |f: fn(&Decision) -> bool| plan.nodes.iter().filter(|n| f(&n.decision)).count();
        Report {
            model: job.model.display().to_string(),
            output: job.output.display().to_string(),
            method: match (job.quant.weight_method, job.quant.act_method) {
                (w, a) if w == a => format!("{w:?}").to_lowercase(),
                (w, a) => format!("weights {w:?}, activations {a:?}").to_lowercase(),
            },
            config: job.quant.clone(),
            calibration_samples: samples,
            nodes_quantized: count(|d| matches!(d, Decision::Quantized)),
            nodes_folded: count(|d| matches!(d, Decision::Folded)),
            nodes_merged: count(|d| matches!(d, Decision::MergedInto(_))),
            nodes_float: count(|d| matches!(d, Decision::Float(_))),
            activations,
            weights: plan
                .weights
                .iter()
                .zip(&params.weights)
                .map(|(s, p)| constant(&s.tensor, p))
                .collect(),
            biases: plan
                .biases
                .iter()
                .zip(&params.biases)
                .map(|(s, p)| constant(&s.name, p))
                .collect(),
            skipped: skipped_nodes(plan),
            biases_corrected: 0,
            weights_rounded: 0,
            warnings: vec![],
            lapq: None,
            auto: None,
            best: None,
            rounding: None,
            smoothed: vec![],
            sensitivity: None,
            fallback: None,
            fusion: vec![],
            timings,
        }
    }

    /// A few lines for the terminal: what was written, what calibration chose, how ONNX Runtime runs
    /// it, and what protection measured and kept.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "wrote {} ({} quantized nodes, {} activations folded,{} {} nodes float; {} activation and {} \
             weight sites; {} biases corrected; {} weights with optimised rounding; {} calibration \
             samples; {:.1} s)",
            self.output,
            self.nodes_quantized,
            self.nodes_folded,
            match self.nodes_merged {
                0 => String::new(),
                n => format!(" {n} nodes folded into float weights,"),
            },
            self.nodes_float,
            self.activations.len(),
            self.weights.len(),
            self.biases_corrected,
            self.weights_rounded,
            self.calibration_samples,
            self.timings.total_ms as f64 / 1000.0
        );
        self.calibration_lines(&mut s);
        self.deployment_lines(&mut s);
        self.sensitivity_lines(&mut s);
        self.fallback_lines(&mut s);
        s
    }

    /// Smoothing, rounding, the activation choice of `best` and `auto`, and 7-bit weights.
    fn calibration_lines(&self, s: &mut String) {
        if !self.smoothed.is_empty() {
            s.push_str(&format!(
                "\n  smoothing: {} normalisation outputs moved their outlier channels into the MatMuls \
                 reading them (SmoothQuant, alpha {})",
                self.smoothed.len(),
                crate::calib::smooth::ALPHA
            ));
        }
        if let Some(r) = &self.rounding {
            let reconstructed = r.layers.iter().filter(|l| l.reconstructed).count();
            s.push_str(&format!(
                "\n  rounding: {} on {} weights ({reconstructed} for their input in the quantized \
                 network): loss {:.3e} against {:.3e} with nearest rounding on {} samples; {}",
                match r.method {
                    crate::config::Rounding::Adaround => "AdaRound",
                    _ => "error feedback (GPTQ)",
                },
                r.weights,
                r.rounded_loss,
                r.nearest_loss,
                r.samples,
                if r.output_means_kept {
                    "kept, biases keeping the float output means"
                } else if r.kept {
                    "kept"
                } else {
                    "nearest kept (the optimised codes raised the loss)"
                }
            ));
        }
        if let Some(b) = &self.best {
            s.push_str(&format!(
                "\n  activation ranges: {} (network loss on {} samples: {})",
                b.chosen,
                b.samples,
                losses_text(&b.methods)
            ));
        }
        if let Some(a) = &self.auto {
            s.push_str(&format!(
                "\n  auto: started from {} (loss {:.3e}; {}), changed {} of {} sites: loss {:.3e} on {} samples",
                a.start,
                a.start_loss,
                losses_text(&a.methods),
                a.changed.len(),
                a.sites,
                a.final_loss,
                a.samples
            ));
        }
        let seven = self.weights.iter().filter(|w| w.bits == 7).count();
        if seven > 0 && self.config.weight_bits == 8 && !self.config.reduce_range {
            s.push_str(&format!(
                "\n  {seven} of {} weights on 7 bits for --target {}: x86 without VNNI adds their \
                 products in saturating 16-bit pairs (--target x86-vnni or arm64 keeps 8 bits)",
                self.weights.len(),
                self.config.deploy.name()
            ));
        }
    }

    /// What ONNX Runtime's CPU provider fuses, and the nodes left float with their reasons.
    fn deployment_lines(&self, s: &mut String) {
        if !self.fusion.is_empty() {
            let integer = self.fusion.iter().filter(|v| v.integer).count();
            s.push_str(&format!(
                "\n  ONNX Runtime's CPU provider runs {integer} of {} nodes on integers (lapq inspect --fusion says why not)",
                self.fusion.len()
            ));
            let saturating = self.fusion.iter().filter(|v| v.warning.is_some()).count();
            if saturating > 0 {
                s.push_str(&format!(
                    "\n  warning: {saturating} fused kernels can saturate on x86 without VNNI (lapq inspect --fusion names them; lapq eval --arithmetic x86-avx2 measures what they compute)"
                ));
            }
        }
        for n in self.skipped.iter().filter(|n| n.op_type != "Constant") {
            s.push_str(&format!(
                "\n  float: {} ({}): {}",
                n.node, n.op_type, n.reason
            ));
        }
    }

    /// The costliest sites, when sensitivity ran.
    fn sensitivity_lines(&self, s: &mut String) {
        if let Some(sens) = &self.sensitivity {
            s.push_str(
                "\n  costliest sites (loss with only that site quantized; SQNR; range used):",
            );
            for n in sens.iter().take(10) {
                let agreement = n.agreement.map_or(String::new(), |a| {
                    format!(", top-1 agreement {:.1}%", 100.0 * a)
                });
                let sqnr = n.sqnr_db.map_or("-".into(), |d| format!("{d:.1} dB"));
                let used = n
                    .range_use
                    .map_or("-".into(), |u| format!("{:.0}%", 100.0 * u));
                s.push_str(&format!(
                    "\n    {:+.5} {} {} ({} bits){agreement}; {sqnr}; {used}",
                    n.loss_delta, n.kind, n.tensor, n.bits
                ));
            }
        }
    }

    /// The accuracy fallback's target, what it kept, and the scores before and after.
    fn fallback_lines(&self, s: &mut String) {
        if let Some(f) = &self.fallback {
            let score = |sc: &crate::oracle::Score| {
                sc.agreement.map_or(format!("loss {:.5}", sc.loss), |a| {
                    format!("loss {:.5}, top-1 agreement {:.1}%", sc.loss, 100.0 * a)
                })
            };
            s.push_str(&format!(
                "\n  accuracy target {}: {} on the calibration samples before; {} {}{}",
                match f.target {
                    crate::config::Target::MaxLoss(x) => format!("loss <= {x}"),
                    crate::config::Target::MinAgreement(y) =>
                        format!("agreement >= {:.1}%", 100.0 * y),
                },
                score(&f.before),
                f.kept.len(),
                if f.mode == "float" {
                    "nodes kept float"
                } else {
                    "sites raised to 8 bits"
                },
                if f.reached {
                    ""
                } else {
                    " and did NOT reach it"
                }
            ));
            for k in &f.kept {
                s.push_str(&format!(
                    "\n    {} ({}): {}",
                    k.name,
                    k.kind,
                    score(&k.score)
                ));
            }
            if !f.dropped.is_empty() {
                s.push_str(&format!(
                    "\n    then dropped, the target holding without them: {}",
                    f.dropped.join(", ")
                ));
            }
            s.push_str(&format!("\n  with the final choices: {}", score(&f.after)));
            if let Some(e) = &f.exported {
                s.push_str(&format!("\n  exported model: {}", score(e)));
            }
        }
    }
}

/// Nodes left in float, with their reasons, in graph order.
pub fn skipped_nodes(plan: &QuantPlan) -> Vec<SkippedNode> {
    plan.nodes
        .iter()
        .filter_map(|n| match &n.decision {
            Decision::Float(r) => Some(SkippedNode {
                node: n.name.clone(),
                op_type: n.op_type.clone(),
                code: r.code(),
                reason: r.to_string(),
            }),
            _ => None,
        })
        .collect()
}

/// The plan as text: one line per node with its decision, then the site counts.
pub fn plan_text(plan: &QuantPlan) -> String {
    let width = plan
        .nodes
        .iter()
        .map(|n| n.name.len())
        .max()
        .unwrap_or(0)
        .min(48);
    let mut s = String::new();
    for n in &plan.nodes {
        let what = match &n.decision {
            Decision::Quantized if plan.float_outputs.contains(&n.name) => {
                "quantized, writes its output in float (no integer kernel reads it)".to_string()
            }
            Decision::Quantized => "quantized".to_string(),
            Decision::Folded => "folded into its producer's range".to_string(),
            Decision::ConstantWeight => "constant stored quantized".to_string(),
            Decision::MergedInto(into) => format!("folded into '{into}' (float weights)"),
            Decision::Float(r) => format!("float: {r}"),
        };
        s.push_str(&format!("{:<width$}  {:<18} {what}\n", n.name, n.op_type));
    }
    s.push_str(&format!(
        "{} activation sites, {} weights ({} per-channel), {} int32 biases, {} Relu/Clip folded\n",
        plan.activations.len(),
        plan.weights.len(),
        plan.weights.iter().filter(|w| w.axis.is_some()).count(),
        plan.biases.len(),
        plan.folded.len()
    ));
    s
}

/// The fusion verdicts as text: one line per node, then the counts.
pub fn fusion_text(verdicts: &[crate::fusion::Verdict]) -> String {
    let mut s = String::new();
    for v in verdicts {
        match (&v.kernel, &v.reason) {
            (Some(k), _) if *k == v.op_type => {
                s += &format!(
                    "integer  {} ({}): Q/DQ dropped, moves integers\n",
                    v.node, v.op_type
                )
            }
            (Some(k), _) => s += &format!("integer  {} ({}): fused into {k}\n", v.node, v.op_type),
            (None, r) => {
                s += &format!(
                    "float    {} ({}): {}\n",
                    v.node,
                    v.op_type,
                    r.as_deref().unwrap_or("")
                )
            }
        }
    }
    for v in verdicts {
        if let Some(w) = &v.warning {
            s += &format!("warning  {} ({}): {w}\n", v.node, v.op_type);
        }
    }
    let integer = verdicts.iter().filter(|v| v.integer).count();
    s += &format!(
        "{integer} of {} nodes run on integers in ONNX Runtime's CPU execution provider\n",
        verdicts.len()
    );
    s
}

/// Methods and their losses as `name 1.234e-2, ...`.
fn losses_text(methods: &[(String, f64)]) -> String {
    methods
        .iter()
        .map(|(m, l)| format!("{m} {l:.3e}"))
        .collect::<Vec<_>>()
        .join(", ")
}
