#!/usr/bin/env python3
"""lapq's default run against ONNX Runtime's quantize_static Entropy on one image classifier, in one run.

Both quantize from the same calibration npz; the table gives each one's wall time and its ratio to
ONNX Runtime's Entropy per-tensor time measured in the same run (this machine is shared: quote ratios),
and top-1 agreement with the float model on the evaluation npz, with the Q/DQ nodes as written
(ORT_DISABLE_ALL), fused on this CPU (ORT_ENABLE_ALL, CPU flags printed above the table) and fused on
x86 without VNNI (the `lapq emulate --arithmetic x86-avx2` model). lapq's previous default
(--method mse) is a row of the same run.

usage: bench_default.py --lapq target/release/lapq --model M.onnx --calib calib.npz --eval eval.npz
                        [--out-dir work/bench-default] [--lapq-flags "--method auto"]
"""
import argparse
import os
import shlex
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import real_models as rm  # noqa: E402

ORT_CONFIGS = ["entropy-pt", "entropy-pc"]


def rows(npz):
    with np.load(npz) as f:
        data = {k: f[k] for k in f.keys()}  # each f[k] reads the whole array again
    n = len(next(iter(data.values())))
    return [{k: v[i:i + 1] for k, v in data.items()} for i in range(n)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lapq", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--out-dir", default=os.path.join(rm.WORK, "bench-default"))
    parser.add_argument("--lapq-flags", action="append", default=[],
                        help="an extra lapq row with these options (repeatable)")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    calib, evaluation = rows(args.calib), rows(args.eval)
    float_outs = rm.run(rm.ortcheck.session(args.model, rm.UNFUSED), evaluation, None)

    results = []
    for config in ORT_CONFIGS:
        out = os.path.join(args.out_dir, f"ort.{config}.onnx")
        start = time.time()
        # the calibrator folds what it collected into its statistics every 16 samples: holding all 256
        # samples' tensors at once needs more than this machine's 24 GB
        rm.ort_quantize(args.model, out, calib, config, {"CalibMaxIntermediateOutputs": 16})
        results.append((f"ORT {config}", time.time() - start, out))
    # the previous default (before --method best): our own previous method, an anchor in the same run
    for i, flags in enumerate(["", "--method mse"] + args.lapq_flags):
        out = os.path.join(args.out_dir, f"lapq{i}.onnx")
        cmd = [args.lapq, "quantize", args.model, "-o", out, "--calib", args.calib, "-q"] + shlex.split(flags)
        start = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"bench_default: {' '.join(cmd)} failed: {proc.stderr.strip()}")
        results.append((f"lapq {flags}".strip() if flags else "lapq (default)", time.time() - start, out))

    base = results[0][1]
    model, flags = rm.cpu_info()
    print(f"CPU: {model}; " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags.items())
          + f"; {os.cpu_count()} cores")
    print(f"{os.path.basename(args.model)}: {len(calib)} calibration samples, {len(evaluation)} evaluation samples")
    print(f"{'quantizer':34} {'seconds':>8} {'/ ORT entropy-pt':>17} {'top-1 unfused':>14} {'top-1 fused':>12}"
          f" {'fused, x86 without VNNI':>24}")
    for label, seconds, out in results:
        r = rm.evaluate(out, evaluation, float_outs, rm.top1, None, args.lapq)
        print(f"{label:34} {seconds:8.1f} {seconds / base:16.2f}x {r['unfused']:14.4f} {r['fused']:12.4f}"
              f" {r['avx2']:24.4f}")


if __name__ == "__main__":
    main()
