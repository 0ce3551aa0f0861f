//! A read-only index over an ONNX graph: producers, consumers, constants, element types, topological order.

use std::collections::{HashMap, HashSet};

use anyhow::{Result, bail};

use crate::onnx::{self, DataType, GraphProto, ModelProto, NodeProto, TensorProto};

/// Where a constant tensor comes from.
#[derive(Clone, Copy, Debug)]
pub enum ConstSource<'m> {
    Initializer(&'m TensorProto),
    /// The `value` of a `Constant` node (index into the graph's nodes).
    ConstantNode(usize, &'m TensorProto),
}

impl<'m> ConstSource<'m> {
    /// The constant's tensor.
    pub fn tensor(&self) -> &'m TensorProto {
        match self {
            ConstSource::Initializer(t) | ConstSource::ConstantNode(_, t) => t,
        }
    }
}

/// A model input that calibration data must feed.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInput {
    pub name: String,
    /// ONNX element type (`DataType` as i32).
    pub elem_type: i32,
    /// Dimensions; `None` for symbolic or unknown ones.
    pub dims: Vec<Option<usize>>,
}

/// Index of one graph. Borrowing the model guarantees it is never modified while indexed.
pub struct GraphIndex<'m> {
    pub model: &'m ModelProto,
    pub graph: &'m GraphProto,
    /// Node indices in a topological order (the graph's own order when it is already sorted).
    pub order: Vec<usize>,
    producer: HashMap<&'m str, usize>,
    consumers: HashMap<&'m str, Vec<usize>>,
    constants: HashMap<&'m str, ConstSource<'m>>,
    elem_types: HashMap<&'m str, i32>,
    graph_outputs: HashSet<&'m str>,
    inputs: Vec<ModelInput>,
}

impl<'m> GraphIndex<'m> {
    /// Indexes the model's main graph; errors name the offending node or tensor.
    pub fn new(model: &'m ModelProto) -> Result<GraphIndex<'m>> {
        let Some(graph) = model.graph.as_ref() else {
            bail!("model has no graph")
        };
        let mut producer = HashMap::new();
        let mut constants = HashMap::new();
        let mut elem_types: HashMap<&str, i32> = HashMap::new();
        let initializer_names: HashSet<&str> = graph.initializer.iter().map(|t| t.name()).collect();
        for t in &graph.initializer {
            if constants
                .insert(t.name(), ConstSource::Initializer(t))
                .is_some()
            {
                bail!("initializer '{}' is defined twice", t.name());
            }
            elem_types.insert(t.name(), t.data_type());
        }
        for vi in graph
            .input
            .iter()
            .chain(&graph.output)
            .chain(&graph.value_info)
        {
            if let Some(et) = declared_elem_type(vi) {
                elem_types.entry(vi.name()).or_insert(et);
            }
        }
        let inputs: Vec<ModelInput> = graph
            .input
            .iter()
            .filter(|vi| !initializer_names.contains(vi.name()))
            .map(|vi| ModelInput {
                name: vi.name().to_string(),
                elem_type: declared_elem_type(vi).unwrap_or(DataType::Float as i32),
                dims: declared_dims(vi),
            })
            .collect();
        let mut available: HashSet<&str> = initializer_names.clone();
        available.extend(graph.input.iter().map(|i| i.name()));
        for (i, node) in graph.node.iter().enumerate() {
            for out in node.output.iter().filter(|o| !o.is_empty()) {
                if producer.insert(out.as_str(), i).is_some()
                    || initializer_names.contains(out.as_str())
                {
                    bail!(
                        "tensor '{out}' has two producers (second: node '{}')",
                        onnx::node_label(node)
                    );
                }
            }
            if node.op_type() == "Constant"
                && node.domain().is_empty()
                && let (Some(t), Some(out)) = (
                    onnx::attr(node, "value").and_then(|a| a.t.as_ref()),
                    node.output.first(),
                )
            {
                constants.insert(out.as_str(), ConstSource::ConstantNode(i, t));
                elem_types.insert(out.as_str(), t.data_type());
            }
        }
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, node) in graph.node.iter().enumerate() {
            for inp in node.input.iter().filter(|s| !s.is_empty()) {
                if !producer.contains_key(inp.as_str()) && !available.contains(inp.as_str()) {
                    bail!(
                        "node '{}' reads tensor '{inp}', which no node, input or initializer provides",
                        onnx::node_label(node)
                    );
                }
                let list = consumers.entry(inp.as_str()).or_default();
                if list.last() != Some(&i) {
                    list.push(i);
                }
            }
        }
        for out in &graph.output {
            if !producer.contains_key(out.name()) && !available.contains(out.name()) {
                bail!("graph output '{}' is not produced by any node", out.name());
            }
        }
        let order = topological_order(graph, &producer)?;
        infer_elem_types(graph, &order, &mut elem_types);
        Ok(GraphIndex {
            model,
            graph,
            order,
            producer,
            consumers,
            constants,
            elem_types,
            graph_outputs: graph.output.iter().map(|o| o.name()).collect(),
            inputs,
        })
    }

    /// The node at `i`.
    pub fn node(&self, i: usize) -> &'m NodeProto {
        &self.graph.node[i]
    }

    /// The node producing `tensor`, if any.
    pub fn producer(&self, tensor: &str) -> Option<usize> {
        self.producer.get(tensor).copied()
    }

    /// Nodes reading `tensor` (each once, in graph order).
    pub fn consumers(&self, tensor: &str) -> &[usize] {
        self.consumers.get(tensor).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The constant behind `tensor`, if it is an initializer or a `Constant` node's output.
    pub fn constant(&self, tensor: &str) -> Option<ConstSource<'m>> {
        self.constants.get(tensor).copied()
    }

    /// Element type of `tensor` when known or inferable.
    pub fn elem_type(&self, tensor: &str) -> Option<i32> {
        self.elem_types.get(tensor).copied()
    }

    /// Whether `tensor` is a float32 tensor.
    pub fn is_float(&self, tensor: &str) -> bool {
        self.elem_type(tensor) == Some(DataType::Float as i32)
    }

    /// Whether `tensor` is one of the graph's outputs.
    pub fn is_graph_output(&self, tensor: &str) -> bool {
        self.graph_outputs.contains(tensor)
    }

    /// Whether `tensor` is a graph input fed by the caller (not an initializer).
    pub fn is_graph_input(&self, tensor: &str) -> bool {
        self.inputs.iter().any(|i| i.name == tensor)
    }

    /// The inputs calibration data must feed, in graph order.
    pub fn inputs(&self) -> &[ModelInput] {
        &self.inputs
    }

    /// Whether `name` is already used by any tensor or node of the graph.
    pub fn name_taken(&self, name: &str) -> bool {
        self.elem_types.contains_key(name)
            || self.producer.contains_key(name)
            || self.constants.contains_key(name)
            || self.consumers.contains_key(name)
            || self.graph.node.iter().any(|n| n.name() == name)
    }
}

fn declared_elem_type(vi: &onnx::ValueInfoProto) -> Option<i32> {
    use onnx::proto::type_proto::Value;
    match vi.r#type.as_ref()?.value.as_ref()? {
        Value::TensorType(t) => t.elem_type,
        _ => None,
    }
}

fn declared_dims(vi: &onnx::ValueInfoProto) -> Vec<Option<usize>> {
    use onnx::proto::tensor_shape_proto::dimension::Value as Dim;
    use onnx::proto::type_proto::Value;
    let Some(Value::TensorType(t)) = vi.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        return vec![];
    };
    t.shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match d.value {
                    Some(Dim::DimValue(v)) if v >= 0 => Some(v as usize),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Kahn's algorithm, stable: keeps the graph's order where it is valid. Errors on a cycle.
fn topological_order(graph: &GraphProto, producer: &HashMap<&str, usize>) -> Result<Vec<usize>> {
    let n = graph.node.len();
    let mut pending = vec![0usize; n];
    let mut dependents: Vec<Vec<usize>> = vec![vec![]; n];
    for (i, node) in graph.node.iter().enumerate() {
        let deps: HashSet<usize> = node_inputs_with_subgraphs(node)
            .iter()
            .filter_map(|t| producer.get(t.as_str()).copied())
            .filter(|&p| p != i)
            .collect();
        pending[i] = deps.len();
        for d in deps {
            dependents[d].push(i);
        }
    }
    let mut ready: std::collections::BTreeSet<usize> =
        (0..n).filter(|&i| pending[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &d in &dependents[i] {
            pending[d] -= 1;
            if pending[d] == 0 {
                ready.insert(d);
            }
        }
    }
    if order.len() < n {
        let stuck = (0..n)
            .find(|&i| pending[i] > 0)
            .map(|i| onnx::node_label(&graph.node[i]));
        bail!(
            "the graph has a cycle through node '{}'",
            stuck.unwrap_or_default()
        );
    }
    Ok(order)
}

/// A node's inputs plus the outer-scope tensors its subgraphs read.
fn node_inputs_with_subgraphs(node: &NodeProto) -> Vec<String> {
    let mut names: Vec<String> = node
        .input
        .iter()
        .filter(|s| !s.is_empty())
        .cloned()
        .collect();
    for a in &node.attribute {
        for g in a.g.iter().chain(&a.graphs) {
            for n in &g.node {
                names.extend(node_inputs_with_subgraphs(n));
            }
        }
    }
    names
}

/// Fills in element types of intermediate tensors that `value_info` does not declare.
fn infer_elem_types<'m>(graph: &'m GraphProto, order: &[usize], types: &mut HashMap<&'m str, i32>) {
    let int64 = DataType::Int64 as i32;
    let bool_ = DataType::Bool as i32;
    for &i in order {
        let node = &graph.node[i];
        let first_input = node
            .input
            .first()
            .and_then(|t| types.get(t.as_str()).copied());
        let out_type = match node.op_type() {
            "Shape" | "Size" | "NonZero" | "ArgMax" | "ArgMin" => Some(int64),
            "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "Not" | "And"
            | "Or" | "Xor" | "IsNaN" | "IsInf" => Some(bool_),
            "Cast" => onnx::attr(node, "to").and_then(|a| a.i).map(|t| t as i32),
            "Where" => node
                .input
                .get(1)
                .and_then(|t| types.get(t.as_str()).copied()),
            "ConstantOfShape" => Some(
                onnx::attr(node, "value")
                    .and_then(|a| a.t.as_ref())
                    .map(|t| t.data_type())
                    .unwrap_or(DataType::Float as i32),
            ),
            "Constant" => None,
            _ => first_input,
        };
        for (k, out) in node
            .output
            .iter()
            .enumerate()
            .filter(|(_, o)| !o.is_empty())
        {
            // Second outputs of TopK / MaxPool are indices.
            let t = if k > 0 && matches!(node.op_type(), "TopK" | "MaxPool") {
                Some(int64)
            } else {
                out_type
            };
            if let Some(t) = t {
                types.entry(out.as_str()).or_insert(t);
            }
        }
    }
}
