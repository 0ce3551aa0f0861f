#!/usr/bin/env python3
"""4-bit weights on EfficientNet-Lite0: each rounding (nearest, GPTQ, AdaRound) with each range method,
against ONNX Runtime's best 4-bit export, in one run on the same data.

Configurations: W4A8 per-channel, W4A4 per-channel, W4A8 per-tensor with the first and last layers
float (the AdaRound paper's setting). For each: lapq with --method mse (and --method lapq with
--with-lapq: 15+ minutes per row) and --rounding nearest|gptq|adaround; ONNX Runtime's quantize_static
with int4 weights (MinMax, Entropy, Percentile; the best kept; A8 only, as its CPU provider has no 4-bit
activations). Every export passes onnx.checker's full check. Printed per row: top-1 agreement with the
float model on the evaluation crops (disjoint scenes) with Q/DQ as written (ORT_DISABLE_ALL) and fused
on this CPU (ORT_ENABLE_ALL, CPU flags printed), over all crops and over the confident crops (float
top-1 probability > 0.3; the others have near-tied top classes that any perturbation flips); the mean
KL(float || quantized) over all crops with Q/DQ as written (steadier than agreement at 256 crops); the
network loss lapq scored on its calibration samples (in-sample); and seconds as a ratio of the first
lapq row of the same configuration (mse + nearest unless --methods/--roundings leave it out).

usage: bench_4bit.py --lapq target/release/lapq --model M.onnx --calib calib.npz --eval eval.npz
                     [--configs w4a8-pc,w4a4-pc,w4a8-pt] [--with-lapq] [--methods mse,lapq]
                     [--roundings nearest,gptq,adaround] [--out-dir work/bench-4bit]
"""
import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ortcheck  # noqa: E402
from real_models import cpu_info  # noqa: E402

CONFIGS = {
    "w4a8-pc": ["--wbits", "4"],
    "w4a4-pc": ["--wbits", "4", "--abits", "4"],
    "w4a8-pt": ["--wbits", "4", "--per-tensor", "--float-first-layer", "--float-last-layer"],
}
ROUNDINGS = ("nearest", "gptq", "adaround")
CONFIDENT = 0.3


def probabilities(path, data, level):
    sess = ortcheck.session(path, level, threads=1)
    name = sess.get_inputs()[0].name
    logits = np.concatenate([sess.run(None, {name: data[name][i:i + 1]})[0]
                             for i in range(len(data[name]))]).astype(np.float64)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lapq", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--with-lapq", action="store_true", help="same as --methods mse,lapq")
    parser.add_argument("--methods", default=None, help="lapq range methods, default mse")
    parser.add_argument("--roundings", default=",".join(ROUNDINGS))
    parser.add_argument("--out-dir", default="work/bench-4bit")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    data = dict(np.load(args.eval))
    reference = probabilities(args.model, data, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    top, confident = reference.argmax(axis=1), reference.max(axis=1) > CONFIDENT
    cpu, flags = cpu_info()
    print(f"CPU: {cpu}; " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags.items()))
    print(f"{len(top)} evaluation crops, {int(confident.sum())} confident (float top-1 probability > "
          f"{CONFIDENT}); top-1 agreement with the float model, all crops and confident crops; "
          f"KL(float || quantized) over all crops, Q/DQ as written\n")

    def score(path):
        """(unfused all, fused all, unfused confident, fused confident, unfused KL)."""
        ok, error = ortcheck.check_model(path)
        if not ok:
            raise RuntimeError(f"checker FAILED: {error.splitlines()[0]}")
        unfused, fused = (probabilities(path, data, level) for level in
                          (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL))
        agree = [p.argmax(axis=1) == top for p in (unfused, fused)]
        kl = np.sum(reference * (np.log(reference + 1e-12) - np.log(unfused + 1e-12)), axis=1).mean()
        return [float(a.mean()) for a in agree] + [float(a[confident].mean()) for a in agree] + [float(kl)]

    def row(config, quantizer, scores, loss, seconds, base):
        ratio = f"{seconds / base:5.2f}x" if base else f"{'-':>6}"
        print(f"{config:<9} {quantizer:<38} " + " ".join(f"{v:8.4f}" for v in scores[:4])
              + f" {scores[4]:7.4f} {loss} {seconds:8.1f} {ratio}", flush=True)

    print(f"{'config':<9} {'quantizer':<38} {'unfused':>8} {'fused':>8} {'conf unf':>8} {'conf fus':>8} "
          f"{'KL':>7} {'loss':>9} {'seconds':>8} {'ratio':>6}")
    methods = (args.methods or ("mse,lapq" if args.with_lapq else "mse")).split(",")
    for config in args.configs.split(","):
        base_seconds = None
        for method in methods:
            for rounding in args.roundings.split(","):
                tag = f"{config}_{method}_{rounding}"
                out = os.path.join(args.out_dir, tag + ".onnx")
                report = os.path.join(args.out_dir, tag + ".json")
                cmd = [args.lapq, "quantize", args.model, "-o", out, "--calib", args.calib, "-q",
                       "--method", method, "--rounding", rounding, "--report", report] + CONFIGS[config]
                t = time.perf_counter()
                subprocess.run(cmd, check=True)
                seconds = time.perf_counter() - t
                base_seconds = base_seconds or seconds
                r = json.load(open(report)).get("rounding") or {}
                loss = r.get("rounded_loss" if r.get("kept") else "nearest_loss")
                loss = f"{loss:9.4f}" if loss is not None else f"{'-':>9}"
                row(config, f"lapq --method {method} --rounding {rounding}", score(out), loss, seconds,
                    base_seconds)
        if "a4" in config:
            print(f"{config:<9} {'ORT: no 4-bit activations on CPU':<36}")
            continue
        best = None
        for method in ("minmax", "entropy", "percentile"):
            out = os.path.join(args.out_dir, f"{config}_ort_{method}.onnx")
            t = time.perf_counter()
            try:
                with contextlib.redirect_stdout(sys.stderr):
                    ortcheck.ort_quantize(args.model, args.calib, out, per_channel=config.endswith("pc"),
                                          method=method, weight_type="int4")
                scores = score(out)
            except Exception as e:  # noqa: BLE001 - report what ONNX Runtime cannot do, keep going
                print(f"{config:<9} ORT {method}: cannot ({type(e).__name__}: {str(e).splitlines()[0][:60]})")
                continue
            seconds = time.perf_counter() - t
            if best is None or scores[0] > best[1][0]:
                best = (method, scores, seconds)
        if best:
            method, scores, seconds = best
            row(config, f"ORT best ({method}, int4 weights)", scores, f"{'':>9}", seconds, base_seconds)


if __name__ == "__main__":
    main()
