//! The one op-type policy table: how each operator takes part in quantization (ONNX Runtime's QDQ
//! placement, `onnxruntime/quantization/registry.py`).

use crate::onnx::{self, NodeProto};

/// How an operator is quantized.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OpClass {
    /// Conv, ConvTranspose, Gemm: activation input 0, constant weight input 1, optional int32 bias input 2.
    Linear,
    /// MatMul: every float input (constant ones as weights), and the output.
    MatMul,
    /// Relu, Clip: folded into the producer's range when it is quantized and has no other consumer.
    RemovableActivation,
    /// Data movement: the outputs reuse input 0's parameters; quantized only if input 0 is.
    SameAsInput,
    /// Every float input and the output get parameters of their own; `Some` fixes the output range.
    Independent(Option<(f32, f32)>),
}

const POLICY: &[(&str, OpClass)] = &[
    ("Conv", OpClass::Linear),
    ("ConvTranspose", OpClass::Linear),
    ("Gemm", OpClass::Linear),
    ("MatMul", OpClass::MatMul),
    ("Relu", OpClass::RemovableActivation),
    ("Clip", OpClass::RemovableActivation),
    ("Reshape", OpClass::SameAsInput),
    ("Transpose", OpClass::SameAsInput),
    ("Squeeze", OpClass::SameAsInput),
    ("Unsqueeze", OpClass::SameAsInput),
    ("Flatten", OpClass::SameAsInput),
    ("Resize", OpClass::SameAsInput),
    ("MaxPool", OpClass::SameAsInput),
    ("AveragePool", OpClass::SameAsInput),
    ("Slice", OpClass::SameAsInput),
    ("Split", OpClass::SameAsInput),
    ("Gather", OpClass::SameAsInput),
    ("GatherElements", OpClass::SameAsInput),
    ("TopK", OpClass::SameAsInput),
    ("Pad", OpClass::SameAsInput),
    ("Add", OpClass::Independent(None)),
    ("Mul", OpClass::Independent(None)),
    ("Concat", OpClass::Independent(None)),
    ("GlobalAveragePool", OpClass::Independent(None)),
    ("Sigmoid", OpClass::Independent(None)),
    ("LeakyRelu", OpClass::Independent(None)),
    ("Softmax", OpClass::Independent(Some((0.0, 1.0)))),
];

/// The policy of `node`, or `None` for operators without an integer kernel (they stay float).
pub fn op_class(node: &NodeProto) -> Option<OpClass> {
    if !matches!(node.domain(), "" | "ai.onnx") {
        return None;
    }
    POLICY
        .iter()
        .find(|(op, _)| *op == node.op_type())
        .map(|(_, c)| *c)
}

/// Per-channel axis of a `Linear` node's weight (the output-channel axis).
pub fn weight_axis(node: &NodeProto, weight_rank: usize) -> usize {
    match node.op_type() {
        "ConvTranspose" => 1,
        "Gemm" => {
            if onnx::attr_i(node, "transB", 0) != 0 {
                0
            } else {
                1
            }
        }
        "MatMul" => weight_rank.saturating_sub(1),
        _ => 0,
    }
}

/// Whether `node` is a layer in the sense of "first/last layer": a Conv, ConvTranspose, Gemm or MatMul.
pub fn is_layer(node: &NodeProto) -> bool {
    matches!(op_class(node), Some(OpClass::Linear | OpClass::MatMul))
}

/// Whether `node` is a depthwise Conv (one input channel per group, `weight_dims[1] == 1`): x86
/// runs it in a kernel of its own that multiplies to 32 bits, where other Convs, Gemm and MatMul add
/// uint8 x int8 products in saturating 16-bit pairs without VNNI.
pub fn depthwise_conv(node: &NodeProto, weight_dims: &[usize]) -> bool {
    node.op_type() == "Conv" && onnx::attr_i(node, "group", 1) > 1 && weight_dims.get(1) == Some(&1)
}
