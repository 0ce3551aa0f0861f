//! ONNX protobuf I/O: the prost types generated from the vendored `proto/onnx.proto`, reading and writing
//! models (with external data), tensor <-> buffer conversions and typed attribute getters.
//!
//! Nothing here decides anything about quantization.

mod io;
mod tensor;

pub use io::{
    StagedModel, check_output_path, decode_model, encode_model, read_model, write_file, write_model,
};
pub use tensor::{
    TensorData, elem_type_name, make_tensor, tensor_dims, tensor_f32, tensor_i64, tensor_ints,
    tensor_num_elements,
};

#[allow(clippy::all, missing_docs)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

pub use proto::tensor_proto::DataType;
pub use proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    ValueInfoProto, type_proto,
};

/// The default ("ai.onnx") domain's opset version imported by `model`, if any.
pub fn default_opset(model: &ModelProto) -> Option<i64> {
    model
        .opset_import
        .iter()
        .find(|o| matches!(o.domain(), "" | "ai.onnx"))
        .map(|o| o.version())
}

/// The attribute `name` of `node`, if present.
pub fn attr<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name() == name)
}

/// Integer attribute `name`, or `default` when absent.
pub fn attr_i(node: &NodeProto, name: &str, default: i64) -> i64 {
    attr(node, name).and_then(|a| a.i).unwrap_or(default)
}

/// Float attribute `name`, or `default` when absent.
pub fn attr_f(node: &NodeProto, name: &str, default: f32) -> f32 {
    attr(node, name).and_then(|a| a.f).unwrap_or(default)
}

/// Integer-list attribute `name`, if present.
pub fn attr_ints<'a>(node: &'a NodeProto, name: &str) -> Option<&'a [i64]> {
    attr(node, name).map(|a| a.ints.as_slice())
}

/// String attribute `name`, if present.
pub fn attr_s<'a>(node: &'a NodeProto, name: &str) -> Option<&'a [u8]> {
    attr(node, name).and_then(|a| a.s.as_deref())
}

/// Every name a graph uses (tensors, nodes, initializers, inputs), for making fresh ones.
pub struct Names(std::collections::HashSet<String>);

impl Names {
    pub fn of(graph: &GraphProto) -> Names {
        Names(
            graph
                .node
                .iter()
                .flat_map(|n| n.input.iter().chain(&n.output).chain(n.name.as_ref()))
                .chain(graph.initializer.iter().filter_map(|t| t.name.as_ref()))
                .chain(graph.input.iter().filter_map(|t| t.name.as_ref()))
                .cloned()
                .collect(),
        )
    }

    /// Whether the graph uses `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.0.contains(name)
    }

    /// Marks `name` as used.
    pub fn insert(&mut self, name: &str) {
        self.0.insert(name.to_string());
    }

    /// `base` if unused, else the first unused `base_1`, `base_2`, ...; taken from now on.
    pub fn fresh(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut k = 1;
        while self.0.contains(&name) {
            name = format!("{base}_{k}");
            k += 1;
        }
        self.0.insert(name.clone());
        name
    }
}

/// An integer attribute.
pub fn make_attr_i(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        i: Some(value),
        r#type: Some(proto::attribute_proto::AttributeType::Int as i32),
        ..Default::default()
    }
}

/// A short human label for a node: its name, or its op type and first output when unnamed.
pub fn node_label(node: &NodeProto) -> String {
    if node.name().is_empty() {
        format!(
            "{} -> {}",
            node.op_type(),
            node.output.first().map(String::as_str).unwrap_or("?")
        )
    } else {
        node.name().to_string()
    }
}
