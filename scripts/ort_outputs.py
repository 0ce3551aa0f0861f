#!/usr/bin/env python3
"""Check a model with onnx.checker (full check), run it in ONNX Runtime (CPU, one sample at a time) on
every sample of a .npz and save its outputs.

usage: ort_outputs.py --model M.onnx --data D.npz --out O.npz [--level disabled|all]

--level disabled evaluates Q/DQ as written (float fake quantization, the ONNX spec); --level all lets the
runtime fuse them into integer kernels. Either way the model must also load with the runtime's default
optimizations (ORT_ENABLE_ALL), as it deploys. Outputs are saved as o0, o1, ... in the model's output order,
samples concatenated along axis 0.
"""
import argparse

import numpy as np
import onnx
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--level", choices=["disabled", "all"], default="disabled")
    a = ap.parse_args()
    onnx.checker.check_model(a.model, full_check=True)
    deployed = ort.SessionOptions()
    deployed.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    ort.InferenceSession(a.model, deployed, providers=["CPUExecutionProvider"])
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if a.level == "disabled"
                                   else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(a.model, so, providers=["CPUExecutionProvider"])
    data = np.load(a.data)
    names = [i.name for i in sess.get_inputs()]
    n = data[names[0]].shape[0]
    outs = [[] for _ in sess.get_outputs()]
    for i in range(n):
        res = sess.run(None, {k: data[k][i:i + 1] for k in names})
        for o, r in zip(outs, res):
            o.append(r)
    np.savez(a.out, **{f"o{k}": np.concatenate(o) for k, o in enumerate(outs)})


if __name__ == "__main__":
    main()
