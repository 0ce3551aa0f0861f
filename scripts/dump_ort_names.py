#!/usr/bin/env python3
"""Dump the node and initializer names of ONNX Runtime's quantize_static output for one fixture, so
lapq's naming can be matched against ORT's (QDQ, MinMax, per-channel, uint8 activations, int8 weights).

usage: dump_ort_names.py FIXTURE_DIR [--per-tensor] > fixtures/ort_reference_names.txt
"""
import argparse
import os
import sys
import tempfile

import onnx
from onnx import helper, numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ortcheck  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fixture", help="folder with model.onnx and calib.npz")
    parser.add_argument("--per-tensor", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "quant.onnx")
        ortcheck.ort_quantize(os.path.join(args.fixture, "model.onnx"), os.path.join(args.fixture, "calib.npz"),
                              out, per_channel=not args.per_tensor)
        model = onnx.load(out)

    mode = "per-tensor" if args.per_tensor else "per-channel"
    print(f"# ONNX Runtime quantize_static output for {os.path.basename(os.path.normpath(args.fixture))}")
    print(f"# QDQ, MinMax, {mode}, activations QUInt8, weights QInt8; made by scripts/dump_ort_names.py")
    print(f"# opset {[(o.domain or 'ai.onnx', o.version) for o in model.opset_import]}, ir_version {model.ir_version}")
    print("\n## graph inputs")
    for v in model.graph.input:
        print(f"  {v.name}")
    print("\n## graph outputs")
    for v in model.graph.output:
        print(f"  {v.name}")
    print("\n## nodes: op_type name (inputs) -> (outputs) attributes")
    for n in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        attr_text = f" {attrs}" if attrs else ""
        print(f"  {n.op_type} {n.name!r} ({', '.join(n.input)}) -> ({', '.join(n.output)}){attr_text}")
    print("\n## initializers: name dtype shape")
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        print(f"  {init.name} {array.dtype} {list(array.shape)}")


if __name__ == "__main__":
    main()
