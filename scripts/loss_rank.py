#!/usr/bin/env python3
"""Which network loss ranks activation methods the way a model's task metric does.

For one real model of scripts/real_models.py, each activation method is exported by lapq
(`--act-method M --weight-method mse`); on the first 64 calibration samples the script prints
candidate losses computed from ONNX Runtime's outputs (plain MSE, MSE per output channel over
its float variance, and the salient-weighted term of lapq's dense loss), beside the task metric on
the held-out samples. A loss is good for `--method best` when it orders the methods as the metric does.

usage: loss_rank.py --lapq target/release/lapq MODEL [METHOD ...]   (default: mse percentile entropy minmax)
"""
import argparse
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ortcheck  # noqa: E402
import real_models as rm  # noqa: E402


def losses(fc, qc):
    F = [a.astype(np.float64) for a in fc]
    Q = [b.astype(np.float64) for b in qc]
    mse = np.mean([np.mean((a - b) ** 2) for a, b in zip(F, Q)])

    def per_channel(xs):  # [channels, elements] over all samples (axis 1 of each output)
        return np.concatenate([x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 0, 2)
                               .reshape(x.shape[1], -1) for x in xs], 1)
    Fa, Qa = per_channel(F), per_channel(Q)
    var = Fa.var(1) + 1e-12
    per_var = np.mean(np.mean((Fa - Qa) ** 2, 1) / var)
    w = np.abs(Fa) / np.maximum(np.abs(Fa).max(1, keepdims=True), 1e-12)
    salient = np.mean(np.sum(w * (Fa - Qa) ** 2, 1) / np.maximum(np.sum(w, 1), 1e-12) / var)
    return {"mse": mse, "mse/var": per_var, "salient/var": salient}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lapq", required=True)
    parser.add_argument("--out-dir", default=os.path.join(rm.WORK, "loss-rank"))
    parser.add_argument("model", choices=rm.MODELS)
    parser.add_argument("methods", nargs="*", default=["mse", "percentile", "entropy", "minmax"])
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    path, calib, evaluation, metric, _, output = rm.prepare(args.model, np.random.default_rng(0), 1.0)
    data = rm.write_test_data_sets(calib, os.path.join(args.out_dir, f"{args.model}_calib"))
    fs = ortcheck.session(path, rm.UNFUSED)
    f = np.concatenate(rm.run(fs, evaluation, output))
    fc = rm.run(fs, calib[:64], output)
    for method in args.methods:
        out = os.path.join(args.out_dir, f"{args.model}.{method}.onnx")
        cmd = [args.lapq, "quantize", path, "-o", out, "--calib", data, "-q",
               "--act-method", method, "--weight-method", "mse"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode:
            print(f"{method:12s} FAILED: {p.stderr.strip().splitlines()[-1]}")
            continue
        qs = ortcheck.session(out, rm.UNFUSED)
        score, detail = metric(f, np.concatenate(rm.run(qs, evaluation, output)))
        ranked = losses(fc, rm.run(qs, calib[:64], output))
        print(f"{method:12s} metric {score:.4f}  " + "  ".join(f"{k} {v:.4g}" for k, v in ranked.items())
              + f"  | {detail}", flush=True)


if __name__ == "__main__":
    main()
