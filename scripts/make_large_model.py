#!/usr/bin/env python3
"""Builds a float ONNX MLP whose weights exceed a given size, stored as external data.

usage: make_large_model.py OUT.onnx [--gigabytes 2.2] [--width-factor 64] [--seed 0]

Graph: input "input" [N, 1024] -> blocks of MatMul [1024, 1024k] + Add + Relu, MatMul [1024k, 1024]
+ Add + Relu (as many blocks as needed for the weights to exceed --gigabytes x 1e9 bytes) -> MatMul
[1024, 10] -> output "output" [N, 10]. Weights are float32, normal x sqrt(2 / fan_in) (activations
keep their scale through the ReLUs), biases normal x 0.01, from a seeded numpy generator.

Tensors are written one at a time to OUT.onnx.data (64-byte aligned offsets) and referenced through
external_data fields, so memory holds one weight tensor plus the model skeleton. Also writes
OUT.npz (8 samples, array "input" [8, 1024] float32) and runs onnx.checker (full_check) on the path.
"""
import argparse
import os

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx.external_data_helper import set_external_data

HIDDEN = 1024
CLASSES = 10
ALIGN = 64


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="OUT.onnx (its data goes to OUT.onnx.data, calibration to OUT.npz)")
    parser.add_argument("--gigabytes", type=float, default=2.2, help="weights exceed this many 1e9 bytes")
    parser.add_argument("--width-factor", type=int, default=64, help="k: hidden blocks are 1024 x 1024k")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    out = os.path.abspath(args.out)
    location = os.path.basename(out) + ".data"
    data_path = os.path.join(os.path.dirname(out), location)
    rng = np.random.default_rng(args.seed)
    wide = HIDDEN * args.width_factor
    block_bytes = 4 * (2 * HIDDEN * wide + wide + HIDDEN)
    target = int(args.gigabytes * 1e9)
    blocks = max(1, -(-(target - 4 * HIDDEN * CLASSES) // block_bytes))

    initializers, nodes = [], []
    offset = 0
    with open(data_path + ".partial", "wb") as data:

        def add_tensor(name, shape, std):
            nonlocal offset
            pad = (-offset) % ALIGN
            data.write(b"\0" * pad)
            offset += pad
            values = rng.standard_normal(shape, dtype=np.float32)
            values *= np.float32(std)
            raw = values.tobytes()
            del values
            data.write(raw)
            # set_external_data wants a raw_data field: an empty one, cleared right after.
            tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape), raw_data=b"")
            set_external_data(tensor, location=location, offset=offset, length=len(raw))
            tensor.ClearField("raw_data")
            tensor.data_location = TensorProto.EXTERNAL
            offset += len(raw)
            initializers.append(tensor)
            return name

        x = "input"
        layer = 0

        def dense(x, fan_in, fan_out, relu=True):
            nonlocal layer
            w = add_tensor(f"w{layer}", [fan_in, fan_out], np.sqrt(2.0 / fan_in))
            y = f"mm{layer}"
            nodes.append(helper.make_node("MatMul", [x, w], [y], name=f"MatMul_{layer}"))
            if relu:
                b = add_tensor(f"b{layer}", [fan_out], 0.01)
                nodes.append(helper.make_node("Add", [y, b], [f"add{layer}"], name=f"Add_{layer}"))
                y = f"relu{layer}"
                nodes.append(helper.make_node("Relu", [f"add{layer}"], [y], name=f"Relu_{layer}"))
            layer += 1
            return y

        for _ in range(blocks):
            x = dense(x, HIDDEN, wide)
            x = dense(x, wide, HIDDEN)
        w = add_tensor("w_out", [HIDDEN, CLASSES], np.sqrt(1.0 / HIDDEN))
        nodes.append(helper.make_node("MatMul", [x, w], ["output"], name="MatMul_out"))

    graph = helper.make_graph(
        nodes, "large_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", HIDDEN])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", CLASSES])],
        initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="make_large_model.py")
    model.ir_version = 8
    os.replace(data_path + ".partial", data_path)
    onnx.save_model(model, out)

    calib = os.path.splitext(out)[0] + ".npz"
    np.savez(calib, input=np.random.default_rng(args.seed + 1).standard_normal((8, HIDDEN), dtype=np.float32))
    onnx.checker.check_model(out, full_check=True)
    print(f"make_large_model: {out}: {blocks} blocks, {len(nodes)} nodes, "
          f"{offset} bytes of weights ({offset / 1e9:.3f} GB) in {data_path}; calibration {calib}")


if __name__ == "__main__":
    main()
