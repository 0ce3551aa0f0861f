//! `lapq eval`: how far a quantized model's outputs lie from its float original's on data.
//!
//! Both models run through tract (the oracle module); the quantized one as the float arithmetic its
//! Q/DQ nodes describe (`dequantized`), so that models tract cannot load as they are (INT4 weights,
//! 16-bit activations) are evaluated too. The numbers are those of the QDQ semantics, as ONNX Runtime
//! computes them without fusing; fused integer kernels round differently in the last code, except
//! on x86 without VNNI, whose uint8 x int8 kernels saturate 16-bit pair sums: `Arithmetic::X86Avx2`
//! computes that too (`kernels`).

mod dequant;
mod kernels;

pub use dequant::dequantized;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use serde::Serialize;

use crate::calib::{argmax, top1_agreement};
use crate::config::DataConfig;
use crate::ir::GraphIndex;
use crate::onnx;
use crate::oracle::{self, SampleOutputs};

/// What `lapq eval` compares.
#[derive(Clone, Debug)]
pub struct EvalJob {
    pub float: PathBuf,
    pub quant: PathBuf,
    pub data: DataConfig,
    pub arithmetic: Arithmetic,
}

/// Whose arithmetic the quantized model runs with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Arithmetic {
    /// The Q/DQ nodes as written: ONNX Runtime without graph optimizations, the same on every CPU.
    #[default]
    Qdq,
    /// ONNX Runtime's fused kernels on x86-64 with AVX2 and no VNNI: uint8 x int8 products added in
    /// 16-bit pairs that saturate.
    X86Avx2,
    /// Fused kernels on x86-64 with VNNI: 32-bit sums, the Q/DQ semantics.
    X86Vnni,
    /// Fused kernels on 64-bit Arm: 32-bit sums, the Q/DQ semantics.
    Arm64,
}

impl Arithmetic {
    /// The name `--arithmetic` takes.
    pub fn name(self) -> &'static str {
        match self {
            Arithmetic::Qdq => "qdq",
            Arithmetic::X86Avx2 => "x86-avx2",
            Arithmetic::X86Vnni => "x86-vnni",
            Arithmetic::Arm64 => "arm64",
        }
    }
}

/// The comparison of a quantized model with its float original.
#[derive(Clone, Debug, Serialize)]
pub struct Evaluation {
    pub float_model: String,
    pub quant_model: String,
    pub samples: usize,
    pub arithmetic: Arithmetic,
    /// The nodes whose fused kernel departs from the Q/DQ semantics under `arithmetic` (their 16-bit
    /// pair sums can saturate), computed as that kernel does.
    pub saturating_nodes: Vec<String>,
    /// One entry per graph output, in the models' order.
    pub outputs: Vec<OutputMetrics>,
    /// Top-1 accuracy against the labels (given labels and a single classifier output).
    pub accuracy: Option<Accuracy>,
}

/// Float vs quantized values of one graph output over every sample.
#[derive(Clone, Debug, Serialize)]
pub struct OutputMetrics {
    pub name: String,
    /// Mean over samples of the cosine similarity of the two outputs.
    pub cosine: f64,
    /// Signal to quantization noise, `10 log10(sum f^2 / sum (f - q)^2)` over all samples, in dB;
    /// `None` when the outputs are identical.
    pub sqnr_db: Option<f64>,
    pub max_abs_error: f64,
    /// For an output of one row of K > 1 scores per sample.
    pub classifier: Option<ClassifierMetrics>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ClassifierMetrics {
    /// Fraction of samples whose top class is the same in both models.
    pub top1_agreement: f64,
    /// Mean KL divergence of the quantized model's class distribution from the float model's (the
    /// softmax of each row, unless the rows already are distributions).
    pub kl_divergence: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Accuracy {
    pub output: String,
    pub float: f64,
    pub quantized: f64,
}

/// Runs both models of `job` over its data and compares their outputs.
pub fn evaluate(job: &EvalJob) -> Result<Evaluation> {
    let read = |path: &Path| -> Result<onnx::ModelProto> { Ok(onnx::read_model(path)?.0) };
    let float = read(&job.float)?;
    let quant = read(&job.quant)?;
    let float_index =
        GraphIndex::new(&float).with_context(|| format!("model {}", job.float.display()))?;
    let quant_index =
        GraphIndex::new(&quant).with_context(|| format!("model {}", job.quant.display()))?;
    let names = |index: &GraphIndex| -> (Vec<String>, Vec<String>) {
        let g = index.graph;
        (
            index.inputs().iter().map(|i| i.name.clone()).collect(),
            g.output.iter().map(|o| o.name().to_string()).collect(),
        )
    };
    let (inputs, outputs) = names(&float_index);
    let (q_inputs, q_outputs) = names(&quant_index);
    ensure!(
        inputs == q_inputs && outputs == q_outputs,
        "{} is not a quantization of {}: inputs {q_inputs:?} and outputs {q_outputs:?} differ from \
         {inputs:?} and {outputs:?}",
        job.quant.display(),
        job.float.display()
    );
    let crate::data::Dataset { samples, labels } =
        crate::data::load(&job.data, float_index.inputs())?;
    let (deq, saturating_nodes) = emulated(&quant, job.arithmetic)
        .with_context(|| format!("model {}", job.quant.display()))?;
    drop((float_index, quant_index));
    let run = |model: &onnx::ModelProto, path: &Path| -> Result<Vec<SampleOutputs>> {
        let staged = onnx::StagedModel::new(model)?;
        oracle::outputs(staged.path(), &samples)
            .with_context(|| format!("running {}", path.display()))
    };
    let f = run(&float, &job.float)?;
    let q = run(&deq, &job.quant)?;
    let metrics = compare(&outputs, &f, &q)?;
    let accuracy = match (&labels, metrics.as_slice()) {
        (Some(labels), [m]) if m.classifier.is_some() => Some(Accuracy {
            output: m.name.clone(),
            float: accuracy(&f, labels),
            quantized: accuracy(&q, labels),
        }),
        (Some(_), _) => anyhow::bail!(
            "labels were given, but the model's output is not one row of class scores per sample"
        ),
        (None, _) => None,
    };
    Ok(Evaluation {
        float_model: job.float.display().to_string(),
        quant_model: job.quant.display().to_string(),
        samples: samples.len(),
        arithmetic: job.arithmetic,
        saturating_nodes,
        outputs: metrics,
        accuracy,
    })
}

/// The float model that computes what the QDQ model `quant` computes under `arithmetic` (`lapq
/// emulate`), and the nodes whose fused kernels depart from the Q/DQ semantics there. Errors name
/// the node that prevents it.
pub fn emulated(
    quant: &onnx::ModelProto,
    arithmetic: Arithmetic,
) -> Result<(onnx::ModelProto, Vec<String>)> {
    let mut model = dequantized(quant)?;
    let saturating = match arithmetic {
        Arithmetic::X86Avx2 => kernels::saturate_pairs(quant, &mut model)?,
        Arithmetic::Qdq | Arithmetic::X86Vnni | Arithmetic::Arm64 => vec![],
    };
    Ok((model, saturating))
}

impl Evaluation {
    /// The metrics as lines of text.
    pub fn summary(&self) -> String {
        let arithmetic = match self.arithmetic {
            Arithmetic::Qdq => "Q/DQ as written".to_string(),
            a => format!(
                "{} fused kernels, {} node(s) saturating 16-bit pair sums",
                a.name(),
                self.saturating_nodes.len()
            ),
        };
        let mut s = format!(
            "{} vs {}: {} samples, {arithmetic}\n",
            self.quant_model, self.float_model, self.samples
        );
        for o in &self.outputs {
            let sqnr = o
                .sqnr_db
                .map_or("exact".to_string(), |v| format!("{v:.2} dB"));
            s += &format!(
                "  {}: cosine {:.5}, SQNR {sqnr}, max |error| {:.4}",
                o.name, o.cosine, o.max_abs_error
            );
            if let Some(c) = &o.classifier {
                s += &format!(
                    ", top-1 agreement {:.2}%, KL {:.5}",
                    100.0 * c.top1_agreement,
                    c.kl_divergence
                );
            }
            s += "\n";
        }
        if let Some(a) = &self.accuracy {
            s += &format!(
                "  accuracy ({}): float {:.2}%, quantized {:.2}%\n",
                a.output,
                100.0 * a.float,
                100.0 * a.quantized
            );
        }
        s
    }
}

/// Metrics per output, `float` and `quant` holding each sample's outputs in `names`' order.
pub fn compare(
    names: &[String],
    float: &[SampleOutputs],
    quant: &[SampleOutputs],
) -> Result<Vec<OutputMetrics>> {
    ensure!(float.len() == quant.len(), "internal: sample counts differ");
    let mut metrics = vec![];
    for (k, name) in names.iter().enumerate() {
        let (mut signal, mut noise, mut max_abs, mut cosines) = (0f64, 0f64, 0f64, 0f64);
        let mut pairs = Vec::with_capacity(float.len());
        for (s, (fs, qs)) in float.iter().zip(quant).enumerate() {
            let (Some((fd, fv)), Some((qd, qv))) = (fs.get(k), qs.get(k)) else {
                anyhow::bail!("internal: output {k} of sample {s} is missing");
            };
            ensure!(
                fd == qd,
                "output '{name}' of sample {s} has shape {qd:?} in the quantized model, {fd:?} in the float one"
            );
            let (mut dot, mut ff, mut qq) = (0f64, 0f64, 0f64);
            for (&a, &b) in fv.iter().zip(qv) {
                let (a, b) = (a as f64, b as f64);
                dot += a * b;
                ff += a * a;
                qq += b * b;
                noise += (a - b) * (a - b);
                max_abs = max_abs.max((a - b).abs());
            }
            signal += ff;
            cosines += if ff == 0.0 && qq == 0.0 {
                1.0
            } else if ff == 0.0 || qq == 0.0 {
                0.0
            } else {
                dot / (ff.sqrt() * qq.sqrt())
            };
            pairs.push(((&fd[..], &fv[..]), (&qd[..], &qv[..])));
        }
        let n = float.len().max(1) as f64;
        metrics.push(OutputMetrics {
            name: name.clone(),
            cosine: cosines / n,
            sqnr_db: (noise > 0.0).then(|| 10.0 * (signal / noise).log10()),
            max_abs_error: max_abs,
            classifier: top1_agreement(&pairs).map(|a| ClassifierMetrics {
                top1_agreement: a,
                kl_divergence: pairs
                    .iter()
                    .map(|((_, f), (_, q))| kl_divergence(&distribution(f), &distribution(q)))
                    .sum::<f64>()
                    / n,
            }),
        });
    }
    Ok(metrics)
}

/// Fraction of samples whose first output's top class is their label.
fn accuracy(outputs: &[SampleOutputs], labels: &[usize]) -> f64 {
    let hits = outputs
        .iter()
        .zip(labels)
        .filter(|(o, l)| o.first().is_some_and(|(_, v)| argmax(v) == **l))
        .count();
    hits as f64 / outputs.len().max(1) as f64
}

/// The row as a distribution: itself when it already is one (non-negative, sums to 1), else its softmax.
fn distribution(v: &[f32]) -> Vec<f64> {
    let sum: f64 = v.iter().map(|&x| x as f64).sum();
    if v.iter().all(|&x| x >= 0.0) && (sum - 1.0).abs() < 1e-3 {
        return v.iter().map(|&x| x as f64 / sum).collect();
    }
    let max = v.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let e: Vec<f64> = v.iter().map(|&x| (x as f64 - max).exp()).collect();
    let z: f64 = e.iter().sum();
    e.iter().map(|x| x / z).collect()
}

/// KL(p || q), with q floored at 1e-12 so that a class the quantized model rules out stays finite.
fn kl_divergence(p: &[f64], q: &[f64]) -> f64 {
    p.iter()
        .zip(q)
        .filter(|(p, _)| **p > 0.0)
        .map(|(p, q)| p * (p / q.max(1e-12)).ln())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(v: &[f32]) -> SampleOutputs {
        vec![(vec![1, v.len()], v.to_vec())]
    }

    #[test]
    fn identical_outputs_are_exact_and_agree() {
        let f = vec![sample(&[1.0, 3.0, 2.0]), sample(&[0.5, -1.0, 0.0])];
        let m = compare(&["y".into()], &f, &f).unwrap();
        assert_eq!(m[0].sqnr_db, None);
        assert!((m[0].cosine - 1.0).abs() < 1e-12);
        let c = m[0].classifier.as_ref().unwrap();
        assert_eq!(c.top1_agreement, 1.0);
        assert!(c.kl_divergence.abs() < 1e-12);
    }

    #[test]
    fn metrics_follow_their_definitions() {
        let f = vec![sample(&[1.0, 3.0, 2.0]), sample(&[2.0, 0.0, 0.0])];
        let q = vec![sample(&[1.0, 2.0, 3.0]), sample(&[2.0, 0.0, 0.0])];
        let m = &compare(&["y".into()], &f, &q).unwrap()[0];
        // signal 1+9+4+4 = 18, noise 1+1 = 2
        assert!((m.sqnr_db.unwrap() - 10.0 * 9f64.log10()).abs() < 1e-9);
        assert!((m.cosine - (13.0 / 14.0 + 1.0) / 2.0).abs() < 1e-9);
        assert_eq!(m.max_abs_error, 1.0);
        let c = m.classifier.as_ref().unwrap();
        assert_eq!(c.top1_agreement, 0.5);
        let p = distribution(&[1.0, 3.0, 2.0]);
        let r = distribution(&[1.0, 2.0, 3.0]);
        assert!((c.kl_divergence - kl_divergence(&p, &r) / 2.0).abs() < 1e-12);
        assert!(c.kl_divergence > 0.0);
    }

    #[test]
    fn probabilities_are_not_put_through_softmax_again() {
        assert_eq!(distribution(&[0.25, 0.75]), vec![0.25, 0.75]);
        let d = distribution(&[0.0, 0.0]);
        assert!((d[0] - 0.5).abs() < 1e-12);
    }

    #[test]
    fn feature_maps_are_not_classifiers() {
        let f = vec![vec![(vec![1, 2, 2], vec![1.0, 2.0, 3.0, 4.0])]];
        let m = compare(&["y".into()], &f, &f).unwrap();
        assert!(m[0].classifier.is_none());
    }
}
