#!/usr/bin/env python3
"""The metrics of `lapq eval`, computed independently with ONNX Runtime: both models run on every sample
of a .npz (one at a time, CPU), the quantized one after onnx.checker's full check.

usage: eval_ort.py --float F.onnx --quant Q.onnx --data D.npz [--level disabled|all]

--level disabled evaluates Q/DQ as written (float fake quantization, as lapq eval does); --level all lets
ONNX Runtime fuse them into integer kernels, as it deploys. Prints JSON shaped like `lapq eval --json`:
per output cosine (mean over samples), sqnr_db, max_abs_error and, for one row of K > 1 scores per
sample, top-1 agreement and the mean KL divergence of the class distributions.
"""
import argparse
import json

import numpy as np
import onnx
import onnxruntime as ort


def session(path, level):
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if level == "disabled"
                                   else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    so.intra_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def distribution(v):
    v = v.astype(np.float64)
    if (v >= 0).all() and abs(v.sum() - 1) < 1e-3:
        return v / v.sum()
    e = np.exp(v - v.max())
    return e / e.sum()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--float", required=True)
    ap.add_argument("--quant", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--level", choices=["disabled", "all"], default="disabled")
    a = ap.parse_args()
    onnx.checker.check_model(a.quant, full_check=True)
    fs, qs = session(a.float, "disabled"), session(a.quant, a.level)
    data = np.load(a.data)
    names = [i.name for i in fs.get_inputs()]
    n = data[names[0]].shape[0]
    outs = []
    for i in range(n):
        feed = {k: data[k][i:i + 1] for k in names}
        outs.append((fs.run(None, feed), qs.run(None, feed)))
    metrics = []
    for k, o in enumerate(fs.get_outputs()):
        signal = noise = max_abs = cosines = kl = 0.0
        agree, rows = 0, True
        for f, q in outs:
            f, q = f[k].astype(np.float64).ravel(), q[k].astype(np.float64).ravel()
            signal += (f * f).sum()
            noise += ((f - q) ** 2).sum()
            max_abs = max(max_abs, float(np.abs(f - q).max(initial=0)))
            nf, nq = np.linalg.norm(f), np.linalg.norm(q)
            cosines += 1.0 if nf == 0 and nq == 0 else (0.0 if nf == 0 or nq == 0 else f @ q / (nf * nq))
            rows &= f.size > 1 and outs[0][0][k].shape[-1] == f.size
            if rows:
                agree += int(np.argmax(f) == np.argmax(q))
                p, r = distribution(f), distribution(q)
                kl += float((p[p > 0] * np.log(p[p > 0] / np.maximum(r[p > 0], 1e-12))).sum())
        metrics.append({
            "name": o.name,
            "cosine": cosines / n,
            "sqnr_db": 10 * np.log10(signal / noise) if noise > 0 else None,
            "max_abs_error": max_abs,
            "classifier": {"top1_agreement": agree / n, "kl_divergence": kl / n} if rows else None,
        })
    print(json.dumps({"samples": n, "outputs": metrics}))


if __name__ == "__main__":
    main()
