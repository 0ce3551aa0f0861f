//! Raising the default-domain opset when Q/DQ features need it (per-channel `axis` needs 13, INT4 and
//! 16-bit activations 21), rewriting the nodes whose signature changed on the way.

use std::collections::HashMap;

use anyhow::{Result, bail, ensure};

use crate::onnx::{
    self, ModelProto, NodeProto, OperatorSetIdProto, TensorData, ValueInfoProto, type_proto,
};

/// Operators whose signature or semantics changed at the given opset in a way no local rewrite
/// reproduces: a model using them below that opset cannot be raised past it.
const BREAKING: &[(&str, i64)] = &[
    ("Upsample", 10),
    ("Resize", 11),
    ("Scatter", 11),
    ("GroupNormalization", 21),
];

/// How an attribute that became an input is stored.
#[derive(Clone, Copy)]
enum Kind {
    /// A 1-D int64 tensor of the attribute's ints.
    Ints,
    /// A 1-D int64 tensor holding the attribute's one int (TopK's `k`).
    IntAsList,
    /// A float scalar.
    Float,
}

/// An attribute that became an input: (attribute, input position, storage).
type Move = (&'static str, usize, Kind);

/// Attributes that became inputs at an opset: (operator, opset, moves). An absent attribute leaves
/// its input empty (the operator's default).
const ATTRS_TO_INPUTS: &[(&str, i64, &[Move])] = &[
    (
        "Slice",
        10,
        &[
            ("starts", 1, Kind::Ints),
            ("ends", 2, Kind::Ints),
            ("axes", 3, Kind::Ints),
        ],
    ),
    ("TopK", 10, &[("k", 1, Kind::IntAsList)]),
    (
        "Clip",
        11,
        &[("min", 1, Kind::Float), ("max", 2, Kind::Float)],
    ),
    (
        "Pad",
        11,
        &[("pads", 1, Kind::Ints), ("value", 2, Kind::Float)],
    ),
    ("Dropout", 12, &[("ratio", 1, Kind::Float)]),
    ("Split", 13, &[("split", 1, Kind::Ints)]),
    ("Squeeze", 13, &[("axes", 1, Kind::Ints)]),
    ("Unsqueeze", 13, &[("axes", 1, Kind::Ints)]),
    ("ReduceSum", 13, &[("axes", 1, Kind::Ints)]),
    ("ReduceMean", 18, &[("axes", 1, Kind::Ints)]),
    ("ReduceMax", 18, &[("axes", 1, Kind::Ints)]),
    ("ReduceMin", 18, &[("axes", 1, Kind::Ints)]),
    ("ReduceProd", 18, &[("axes", 1, Kind::Ints)]),
    ("ReduceL1", 18, &[("axes", 1, Kind::Ints)]),
    ("ReduceL2", 18, &[("axes", 1, Kind::Ints)]),
    ("ReduceLogSum", 18, &[("axes", 1, Kind::Ints)]),
    ("ReduceLogSumExp", 18, &[("axes", 1, Kind::Ints)]),
    ("ReduceSumSquare", 18, &[("axes", 1, Kind::Ints)]),
];

/// Before opset 13 these flatten their input to 2-D at `axis` (default 1) and normalise over the
/// second dimension; from 13 on they normalise over `axis` (default -1) alone.
const NORMALISE_FLATTENED: &[&str] = &["Softmax", "LogSoftmax", "Hardmax"];

/// Raises the default-domain opset to at least `needed` (for `why`), rewriting nodes whose attributes
/// became inputs and Softmax-like nodes, and refusing (with the node's name) when an operator changed
/// in a way no rewrite reproduces. The IR version is raised to what the opset needs (7 for 13, 10 for 21).
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
    rewrite_changed_nodes(model, current, needed)?;
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

/// Rewrites the nodes whose signature changed between `current` (exclusive) and `needed`
/// (inclusive): attributes that became inputs move into initializers, and a Softmax-like node whose
/// axis is not known to be the last becomes Flatten -> op(axis 1) -> Reshape to the input's shape,
/// which computes the old semantics exactly.
fn rewrite_changed_nodes(model: &mut ModelProto, current: i64, needed: i64) -> Result<()> {
    let crosses = |since: i64| since > current && since <= needed;
    let Some(graph) = model.graph.as_mut() else {
        return Ok(());
    };
    let ranks: HashMap<String, usize> = graph
        .input
        .iter()
        .chain(&graph.output)
        .chain(&graph.value_info)
        .filter_map(|vi| Some((vi.name().to_string(), value_info_rank(vi)?)))
        .collect();
    let mut names = onnx::Names::of(graph);
    let mut inits = vec![];
    let mut nodes = Vec::with_capacity(graph.node.len());
    for mut node in std::mem::take(&mut graph.node) {
        if !matches!(node.domain(), "" | "ai.onnx") {
            nodes.push(node);
            continue;
        }
        if let Some((_, _, moves)) = ATTRS_TO_INPUTS
            .iter()
            .find(|(op, since, _)| *op == node.op_type() && crosses(*since))
        {
            for &(attr, position, kind) in moves.iter() {
                let Some(k) = node.attribute.iter().position(|a| a.name() == attr) else {
                    continue;
                };
                let a = node.attribute.remove(k);
                let name = names.fresh(&format!("{}_{attr}", onnx::node_label(&node)));
                inits.push(match kind {
                    Kind::Ints => {
                        onnx::make_tensor(&name, &[a.ints.len()], TensorData::I64(a.ints))
                    }
                    Kind::IntAsList => onnx::make_tensor(&name, &[1], TensorData::I64(vec![a.i()])),
                    Kind::Float => onnx::make_tensor(&name, &[], TensorData::F32(vec![a.f()])),
                });
                ensure!(
                    node.input.len() <= position || node.input[position].is_empty(),
                    "node '{}' has both an attribute '{attr}' and input {position}",
                    onnx::node_label(&node)
                );
                if node.input.len() <= position {
                    node.input.resize(position + 1, String::new());
                }
                node.input[position] = name;
            }
        }
        if NORMALISE_FLATTENED.contains(&node.op_type()) && crosses(13) {
            let axis = onnx::attr_i(&node, "axis", 1);
            let x = node.input.first().cloned().unwrap_or_default();
            let rank = ranks
                .get(&x)
                .or_else(|| node.output.first().and_then(|y| ranks.get(y)));
            let last = rank.is_some_and(|&r| axis == -1 || axis == r as i64 - 1);
            if !last {
                nodes.extend(flattened(node, axis, &mut names));
                continue;
            }
        }
        nodes.push(node);
    }
    graph.node = nodes;
    graph.initializer.extend(inits);
    Ok(())
}

/// `op(x, axis)` at opset < 13 as Shape(x), Flatten(x, axis), op(axis = 1), Reshape to the shape.
fn flattened(mut node: NodeProto, axis: i64, names: &mut onnx::Names) -> Vec<NodeProto> {
    let label = onnx::node_label(&node);
    let x = node.input.first().cloned().unwrap_or_default();
    let y = node.output.first().cloned().unwrap_or_default();
    let (shape, flat, normalised) = (
        names.fresh(&format!("{label}_shape")),
        names.fresh(&format!("{label}_flat")),
        names.fresh(&format!("{label}_2d")),
    );
    let make = |op: &str, name: String, inputs: Vec<String>, output: String| NodeProto {
        op_type: Some(op.into()),
        name: Some(name),
        input: inputs,
        output: vec![output],
        ..Default::default()
    };
    let mut flatten = make(
        "Flatten",
        names.fresh(&format!("{label}_flatten")),
        vec![x.clone()],
        flat.clone(),
    );
    flatten.attribute.push(onnx::make_attr_i("axis", axis));
    node.input = vec![flat];
    node.output = vec![normalised.clone()];
    node.attribute.retain(|a| a.name() != "axis");
    node.attribute.push(onnx::make_attr_i("axis", 1));
    vec![
        make(
            "Shape",
            names.fresh(&format!("{label}_shape_of")),
            vec![x],
            shape.clone(),
        ),
        flatten,
        node,
        make(
            "Reshape",
            names.fresh(&format!("{label}_reshape")),
            vec![normalised, shape],
            y,
        ),
    ]
}

fn value_info_rank(vi: &ValueInfoProto) -> Option<usize> {
    match vi.r#type.as_ref()?.value.as_ref()? {
        type_proto::Value::TensorType(t) => Some(t.shape.as_ref()?.dim.len()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::proto::{TensorShapeProto, TypeProto, tensor_shape_proto};
    use crate::onnx::{AttributeProto, GraphProto};

    fn node(op: &str, name: &str, input: &str, output: &str) -> NodeProto {
        NodeProto {
            op_type: Some(op.into()),
            name: Some(name.into()),
            input: vec![input.into()],
            output: vec![output.into()],
            ..Default::default()
        }
    }

    fn rank_info(name: &str, rank: usize) -> ValueInfoProto {
        let dim = tensor_shape_proto::Dimension::default();
        ValueInfoProto {
            name: Some(name.into()),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: Some(1),
                    shape: Some(TensorShapeProto {
                        dim: vec![dim; rank],
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn model(opset: i64, nodes: Vec<NodeProto>, outputs: Vec<ValueInfoProto>) -> ModelProto {
        ModelProto {
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(opset),
            }],
            graph: Some(GraphProto {
                node: nodes,
                output: outputs,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn attributes_become_inputs_and_softmax_keeps_its_old_meaning() {
        let mut squeeze = node("Squeeze", "sq", "x", "y");
        squeeze.attribute.push(AttributeProto {
            name: Some("axes".into()),
            ints: vec![0],
            ..Default::default()
        });
        let mut last = node("Softmax", "last", "y", "p");
        last.attribute.push(onnx::make_attr_i("axis", 2));
        let mut inner = node("Softmax", "inner", "y", "q");
        inner.attribute.push(onnx::make_attr_i("axis", 1));
        let mut m = model(
            11,
            vec![squeeze, last, inner],
            vec![rank_info("p", 3), rank_info("q", 3)],
        );
        raise_default_opset(&mut m, 13, "per-channel quantization").unwrap();
        let g = m.graph.as_ref().unwrap();
        assert_eq!(onnx::default_opset(&m), Some(13));
        assert!(g.node[0].attribute.is_empty());
        assert_eq!(g.node[0].input, ["x", "sq_axes"]);
        let axes = g
            .initializer
            .iter()
            .find(|t| t.name() == "sq_axes")
            .unwrap();
        assert_eq!(onnx::tensor_i64(axes).unwrap(), [0]);
        // axis 2 of a rank-3 tensor is the last: the same computation at opset 13
        assert_eq!(g.node[1].op_type(), "Softmax");
        assert_eq!(onnx::attr_i(&g.node[1], "axis", 0), 2);
        // axis 1 of rank 3 normalised the flattened trailing dimensions: Flatten, axis 1, Reshape back
        let ops: Vec<&str> = g.node[2..].iter().map(|n| n.op_type()).collect();
        assert_eq!(ops, ["Shape", "Flatten", "Softmax", "Reshape"]);
        assert_eq!(onnx::attr_i(&g.node[3], "axis", 0), 1);
        assert_eq!(onnx::attr_i(&g.node[4], "axis", 0), 1);
        assert_eq!(g.node[5].output, ["q"]);
    }

    #[test]
    fn an_operator_no_rewrite_reproduces_is_named() {
        let mut m = model(9, vec![node("Upsample", "up", "x", "y")], vec![]);
        let e = raise_default_opset(&mut m, 13, "per-channel quantization").unwrap_err();
        assert_eq!(
            e.to_string(),
            "the model's opset 9 must be raised to 13 for per-channel quantization, but node 'up' \
             (Upsample) changed at opset 10; convert the model to opset 13 first"
        );
    }
}
