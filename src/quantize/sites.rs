//! The loss oracle of a calibrated run: the plan's sites in tract's names, and the oracle built on
//! them.

use anyhow::Result;

use crate::config::QuantConfig;
use crate::ir::GraphIndex;
use crate::onnx;
use crate::oracle::{BiasSite, Oracle, Sites};
use crate::quantize::Calibrated;

/// Builds the loss oracle of a calibrated run over its first `n` samples (batches of `batch`
/// samples); its loss is cross-entropy when the run has labels.
pub fn oracle(c: &Calibrated, n: usize, batch: usize) -> Result<Oracle> {
    let n = n.min(c.samples.len());
    Oracle::new(
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
    slot: &'a mut Option<Oracle>,
) -> Result<&'a Oracle> {
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
pub fn oracle_sites(c: &Calibrated) -> Result<Sites> {
    let index = GraphIndex::new(&c.model)?;
    Ok(Sites {
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
                BiasSite {
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
