#!/usr/bin/env python3
"""What ONNX Runtime's CPU execution provider does with each node of a QDQ model: the optimized graph
(ORT_ENABLE_EXTENDED, where the QDQ fusions run) is written with `optimized_model_filepath` and every
named node of the input (QuantizeLinear/DequantizeLinear aside) is looked up in it by name.

usage: ort_fusion.py MODEL.onnx [MODEL.onnx ...]

Prints JSON {model path: {node name: {"op_type": original, "kernel": op type in the optimized graph or null when the
node is gone, "removed": whether it is gone, "integer": whether it runs on integers (a fused QLinear*/QGemm/MatMulIntegerToFloat
kernel, or a data-movement op moving an integer tensor, its Q/DQ pair dropped)}}. Float fusions
(FusedConv, FusedGemm) are not integer.}
"""
import json
import sys
import tempfile

import onnx
import onnxruntime as ort

QDQ = {"QuantizeLinear", "DequantizeLinear"}
# Integer kernels the CPU execution provider fuses QDQ node groups into.
INTEGER_KERNELS = {"QGemm", "MatMulIntegerToFloat", "MatMulInteger", "ConvInteger", "MatMulNBits",
                   "DynamicQuantizeMatMul", "QAttention"}
# Ops that move values without arithmetic: they run on an integer tensor when its Q/DQ pair is dropped.
DATA_MOVEMENT = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "MaxPool", "Resize", "Slice",
                 "Split", "Gather", "GatherElements", "Pad", "Identity", "DepthToSpace", "SpaceToDepth",
                 "Tile", "Expand", "Concat"}


def integer_kernel(op):
    return op.startswith("QLinear") or op in INTEGER_KERNELS


def verdicts(path):
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = f"{tmp}/opt.onnx"
        ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        opt = onnx.load(f"{tmp}/opt.onnx", load_external_data=False)
    model = onnx.load(path, load_external_data=False)
    # Integer tensors: written by a QuantizeLinear or a fused kernel, or moved by a data-movement op.
    integer_tensors = set()
    for o in opt.graph.node:
        fused = o.op_type == "QuantizeLinear" or (integer_kernel(o.op_type) and o.op_type != "MatMulIntegerToFloat")
        moved = o.op_type in DATA_MOVEMENT and o.input and o.input[0] in integer_tensors
        if fused or moved:
            integer_tensors.update(o.output)
    by_name = {n.name: n for n in opt.graph.node if n.name}
    out = {}
    for n in model.graph.node:
        if n.op_type in QDQ or not n.name:
            continue
        o = by_name.get(n.name)
        if o is None:
            # Removed: constant-folded, merged (consecutive Transposes) or fused into a float kernel.
            out[n.name] = {"op_type": n.op_type, "kernel": None, "integer": False, "removed": True}
            continue
        if o.op_type != n.op_type:
            integer = integer_kernel(o.op_type)
        else:
            # Still the same op: on integers when it moves an integer tensor (its Q/DQ pair dropped).
            integer = bool(o.input) and o.input[0] in integer_tensors
        out[n.name] = {"op_type": n.op_type, "kernel": o.op_type, "integer": integer, "removed": False}
    return out


def main():
    print(json.dumps({p: verdicts(p) for p in sys.argv[1:]}, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
