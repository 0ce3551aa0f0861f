//! Raising the default-domain opset when Q/DQ features need it (per-channel `axis` needs 13).

use anyhow::{Result, bail};

use crate::onnx::{self, ModelProto, OperatorSetIdProto};

/// Operators whose signature or semantics changed at the given opset: a model using them below that
/// opset cannot simply be relabelled.
const BREAKING: &[(&str, i64)] = &[
    ("Upsample", 10),
    ("Slice", 10),
    ("TopK", 10),
    ("Clip", 11),
    ("Pad", 11),
    ("Resize", 11),
    ("Scatter", 11),
    ("Dropout", 12),
    ("Split", 13),
    ("Squeeze", 13),
    ("Unsqueeze", 13),
    ("ReduceSum", 13),
    ("Softmax", 13),
    ("LogSoftmax", 13),
    ("Hardmax", 13),
];

/// Raises the default-domain opset to at least `needed`, refusing (with the node's name) when a node's
/// operator changed in between. IR version is raised to 7 if older (opset 13 needs it).
pub fn raise_default_opset(model: &mut ModelProto, needed: i64) -> Result<()> {
    let current = onnx::default_opset(model);
    let Some(current) = current else {
        model.opset_import.push(OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(needed),
        });
        return Ok(());
    };
    if current >= needed {
        return Ok(());
    }
    let graph = model
        .graph
        .as_ref()
        .map(|g| g.node.as_slice())
        .unwrap_or(&[]);
    for node in graph
        .iter()
        .filter(|n| matches!(n.domain(), "" | "ai.onnx"))
    {
        if let Some((op, since)) = BREAKING
            .iter()
            .find(|(op, since)| *op == node.op_type() && *since > current && *since <= needed)
        {
            bail!(
                "the model's opset {current} must be raised to {needed} for per-channel quantization, but node \
                 '{}' ({op}) changed at opset {since}; use --per-tensor, or convert the model to opset {needed} first",
                onnx::node_label(node)
            );
        }
    }
    for o in model
        .opset_import
        .iter_mut()
        .filter(|o| matches!(o.domain(), "" | "ai.onnx"))
    {
        o.version = Some(needed);
    }
    if model.ir_version() < 7 {
        model.ir_version = Some(7);
    }
    Ok(())
}
