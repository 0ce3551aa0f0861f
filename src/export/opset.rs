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
    ("GroupNormalization", 21),
];

/// Reductions whose `axes` moved from an attribute to an input at opset 18: rewritten, not refused.
const AXES_TO_INPUT: &[&str] = &[
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
];

/// Raises the default-domain opset to at least `needed` (for `why`), rewriting reductions whose `axes`
/// became an input, and refusing (with the node's name) when another node's operator changed in
/// between. The IR version is raised to what the opset needs (7 for 13, 10 for 21).
pub fn raise_default_opset(model: &mut ModelProto, needed: i64, why: &str) -> Result<()> {
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
                "the model's opset {current} must be raised to {needed} for {why}, but node '{}' ({op}) \
                 changed at opset {since}; convert the model to opset {needed} first",
                onnx::node_label(node)
            );
        }
    }
    if current < 18 && needed >= 18 {
        axes_to_inputs(model)?;
    }
    for o in model
        .opset_import
        .iter_mut()
        .filter(|o| matches!(o.domain(), "" | "ai.onnx"))
    {
        o.version = Some(needed);
    }
    let ir = if needed >= 21 { 10 } else { 7 };
    if model.ir_version() < ir {
        model.ir_version = Some(ir);
    }
    Ok(())
}

/// Moves the `axes` attribute of opset-18 reductions into an int64 initializer input.
fn axes_to_inputs(model: &mut ModelProto) -> Result<()> {
    let Some(graph) = model.graph.as_mut() else {
        return Ok(());
    };
    let mut taken: std::collections::HashSet<String> = graph
        .node
        .iter()
        .flat_map(|n| n.input.iter().chain(&n.output))
        .chain(graph.initializer.iter().filter_map(|t| t.name.as_ref()))
        .cloned()
        .collect();
    let mut inits = vec![];
    for node in graph
        .node
        .iter_mut()
        .filter(|n| matches!(n.domain(), "" | "ai.onnx") && AXES_TO_INPUT.contains(&n.op_type()))
    {
        let Some(k) = node.attribute.iter().position(|a| a.name() == "axes") else {
            continue;
        };
        let axes = node.attribute.remove(k).ints;
        let base = format!("{}_axes", onnx::node_label(node));
        let mut name = base.clone();
        let mut n = 1;
        while taken.contains(&name) {
            name = format!("{base}_{n}");
            n += 1;
        }
        taken.insert(name.clone());
        inits.push(onnx::make_tensor(
            &name,
            &[axes.len()],
            onnx::TensorData::I64(axes),
        ));
        if node.input.is_empty() {
            bail!("node '{}' has no data input", onnx::node_label(node));
        }
        node.input.truncate(1);
        node.input.push(name);
    }
    graph.initializer.extend(inits);
    Ok(())
}
