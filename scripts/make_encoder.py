#!/usr/bin/env python3
"""A small BERT-style transformer encoder as PyTorch's ONNX exporter writes one, built with the onnx
helper (numpy + onnx, no torch), with seeded random weights.

Graph forms it exercises: int64 `input_ids` and `attention_mask` [batch, seq] (both symbolic), Gather on
word and position embeddings, the additive attention mask ((1 - mask) x -10000, Cast from int64), Q/K/V
MatMul + Add with constant weights, Reshape/Transpose into heads, MatMul of two activations (QK^T and
attention x V), Div by sqrt(d), Softmax, Erf GELU, residual Adds, LayerNorm either decomposed into
ReduceMean/Sub/Pow/Sqrt/Div (opset 13, as torch exports below opset 17) or as LayerNormalization
(opset 17), and a classifier Gemm on the first token.

Weights: Xavier-scaled normal, so that attention is peaked rather than uniform; the classifier reads
token 0 (logits [batch, classes]).

usage: make_encoder.py OUT.onnx [--layernorm decomposed|fused] [--seed 0]
"""
import argparse
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MAX_POS = 128


class Builder:
    def __init__(self, rng, d):
        self.rng = rng
        self.d = d
        self.nodes = []
        self.inits = []
        self.count = 0

    def const(self, name, array):
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, name, shape, std=None):
        std = std if std is not None else (2.0 / sum(shape)) ** 0.5
        return self.const(name, (self.rng.standard_normal(shape) * std).astype(np.float32))

    def op(self, op_type, inputs, name, **attrs):
        self.count += 1
        out = f"{name}_out"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out

    def layernorm(self, x, prefix, fused):
        d = self.d
        gamma = self.const(f"{prefix}.weight", (1.0 + 0.1 * self.rng.standard_normal(d)).astype(np.float32))
        beta = self.const(f"{prefix}.bias", (0.1 * self.rng.standard_normal(d)).astype(np.float32))
        if fused:
            return self.op("LayerNormalization", [x, gamma, beta], f"{prefix}/LayerNormalization",
                           axis=-1, epsilon=1e-12)
        mean = self.op("ReduceMean", [x], f"{prefix}/ReduceMean", axes=[-1])
        centred = self.op("Sub", [x, mean], f"{prefix}/Sub")
        two = self.const(f"{prefix}/Constant_2", np.array(2.0, np.float32))
        sq = self.op("Pow", [centred, two], f"{prefix}/Pow")
        var = self.op("ReduceMean", [sq], f"{prefix}/ReduceMean_1", axes=[-1])
        eps = self.const(f"{prefix}/Constant_eps", np.array(1e-12, np.float32))
        var_eps = self.op("Add", [var, eps], f"{prefix}/Add")
        std = self.op("Sqrt", [var_eps], f"{prefix}/Sqrt")
        normed = self.op("Div", [centred, std], f"{prefix}/Div")
        scaled = self.op("Mul", [normed, gamma], f"{prefix}/Mul")
        return self.op("Add", [scaled, beta], f"{prefix}/Add_1")

    def linear(self, x, prefix, d_in, d_out):
        w = self.weight(f"{prefix}.weight", (d_in, d_out))
        b = self.const(f"{prefix}.bias", (0.02 * self.rng.standard_normal(d_out)).astype(np.float32))
        y = self.op("MatMul", [x, w], f"{prefix}/MatMul")
        return self.op("Add", [b, y], f"{prefix}/Add")

    def heads(self, x, prefix, shape_const):
        r = self.op("Reshape", [x, shape_const], f"{prefix}/Reshape")
        return self.op("Transpose", [r], f"{prefix}/Transpose", perm=[0, 2, 1, 3])


def build(fused, seed, vocab=1000, d=64, heads=4, ffn=256, layers=2, classes=10):
    """The encoder as a checked ModelProto (vocabulary, width, heads, ffn width, layers, classes)."""
    rng = np.random.default_rng(seed)
    b = Builder(rng, d)
    opset = 17 if fused else 13
    ids, mask = "input_ids", "attention_mask"

    word = b.weight("embeddings.word_embeddings.weight", (vocab, d), std=1.0)
    pos = b.weight("embeddings.position_embeddings.weight", (MAX_POS, d), std=0.5)
    x = b.op("Gather", [word, ids], "/embeddings/word_embeddings/Gather")
    shape = b.op("Shape", [ids], "/embeddings/Shape")
    seq = b.op("Gather", [shape, b.const("/embeddings/Constant_1", np.array(1, np.int64))],
               "/embeddings/Gather_1")
    zero = b.const("/embeddings/Constant_0", np.array(0, np.int64))
    one = b.const("/embeddings/Constant_one", np.array(1, np.int64))
    positions = b.op("Range", [zero, seq, one], "/embeddings/Range")
    p = b.op("Gather", [pos, positions], "/embeddings/position_embeddings/Gather")
    x = b.op("Add", [x, p], "/embeddings/Add")
    x = b.layernorm(x, "embeddings.LayerNorm", fused)

    m = b.op("Unsqueeze", [mask, b.const("/mask/axes", np.array([1, 2], np.int64))], "/mask/Unsqueeze")
    m = b.op("Cast", [m], "/mask/Cast", to=TensorProto.FLOAT)
    m = b.op("Sub", [b.const("/mask/one", np.array(1.0, np.float32)), m], "/mask/Sub")
    mask_bias = b.op("Mul", [m, b.const("/mask/min", np.array(-10000.0, np.float32))], "/mask/Mul")

    head_shape = b.const("/heads/shape", np.array([0, -1, heads, d // heads], np.int64))
    merge_shape = b.const("/heads/merge", np.array([0, -1, d], np.int64))
    scale = b.const("/attention/scale", np.array(np.sqrt(d // heads), np.float32))
    for layer in range(layers):
        pre = f"encoder.layer.{layer}"
        q = b.heads(b.linear(x, f"{pre}.attention.query", d, d), f"{pre}/query", head_shape)
        k = b.heads(b.linear(x, f"{pre}.attention.key", d, d), f"{pre}/key", head_shape)
        v = b.heads(b.linear(x, f"{pre}.attention.value", d, d), f"{pre}/value", head_shape)
        kt = b.op("Transpose", [k], f"{pre}/key/Transpose_1", perm=[0, 1, 3, 2])
        scores = b.op("MatMul", [q, kt], f"{pre}/attention/MatMul")
        scores = b.op("Div", [scores, scale], f"{pre}/attention/Div")
        scores = b.op("Add", [scores, mask_bias], f"{pre}/attention/Add")
        probs = b.op("Softmax", [scores], f"{pre}/attention/Softmax", axis=-1)
        ctx = b.op("MatMul", [probs, v], f"{pre}/attention/MatMul_1")
        ctx = b.op("Transpose", [ctx], f"{pre}/attention/Transpose", perm=[0, 2, 1, 3])
        ctx = b.op("Reshape", [ctx, merge_shape], f"{pre}/attention/Reshape")
        out = b.linear(ctx, f"{pre}.attention.output.dense", d, d)
        x = b.layernorm(b.op("Add", [out, x], f"{pre}/attention/output/Add"),
                        f"{pre}.attention.output.LayerNorm", fused)
        h = b.linear(x, f"{pre}.intermediate.dense", d, ffn)
        e = b.op("Div", [h, b.const(f"{pre}/gelu/sqrt2", np.array(np.sqrt(2.0), np.float32))],
                 f"{pre}/gelu/Div")
        e = b.op("Erf", [e], f"{pre}/gelu/Erf")
        e = b.op("Add", [e, b.const(f"{pre}/gelu/one", np.array(1.0, np.float32))], f"{pre}/gelu/Add")
        h = b.op("Mul", [h, e], f"{pre}/gelu/Mul")
        h = b.op("Mul", [h, b.const(f"{pre}/gelu/half", np.array(0.5, np.float32))], f"{pre}/gelu/Mul_1")
        out = b.linear(h, f"{pre}.output.dense", ffn, d)
        x = b.layernorm(b.op("Add", [out, x], f"{pre}/output/Add"), f"{pre}.output.LayerNorm", fused)

    first = b.op("Gather", [x, b.const("/pooler/index", np.array(0, np.int64))], "/pooler/Gather", axis=1)
    w = b.weight("classifier.weight", (classes, d))
    bias = b.const("classifier.bias", np.zeros(classes, np.float32))
    b.nodes.append(helper.make_node("Gemm", [first, w, bias], ["logits"], name="/classifier/Gemm",
                                    transB=1))

    graph = helper.make_graph(
        b.nodes, "encoder",
        [helper.make_tensor_value_info(ids, TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info(mask, TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="lapq make_encoder.py")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--layernorm", choices=["decomposed", "fused"], default="decomposed")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = build(args.layernorm == "fused", args.seed)
    tmp = args.out + ".partial"
    onnx.save(model, tmp)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
