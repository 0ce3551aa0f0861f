#!/usr/bin/env python3
"""Every lapq calibration method against ONNX Runtime's MinMax, Entropy and Percentile, side by side.

One float classifier, one calibration npz, one disjoint evaluation npz. For each configuration
(W8A8 and W4A8, per-channel and per-tensor weights) it quantizes with lapq's minmax, percentile,
entropy and mse methods and with ONNX Runtime's quantize_static (MinMax; Entropy, whose 128 bins
quantize_static does not let one change; Percentile at the same percentile as lapq; W4A8 with ONNX
Runtime's native int4 weights), checks every model with onnx.checker (full check), and prints top-1 agreement with the float
model on the evaluation crops (all, and confident ones), from ONNX Runtime's outputs.

usage: compare_methods.py --lapq target/release/lapq --model M.onnx --calib calib.npz --eval eval.npz
                          [--percentile 99.99] [--out-dir work/methods] [--configs w8a8,w4a8]
"""
import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ortcheck  # noqa: E402

LAPQ_METHODS = ("minmax", "percentile", "entropy", "mse")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lapq", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--percentile", type=float, default=99.99)
    parser.add_argument("--configs", default="w8a8,w4a8")
    parser.add_argument("--out-dir", default="work/methods")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)

    agreement = ortcheck.Agreement(args.model, args.eval)

    def score(path):
        try:
            return agreement.describe(path)
        except RuntimeError as e:
            return str(e)

    rows = []
    for config in args.configs.split(","):
        wbits = 4 if config.startswith("w4") else 8
        for granularity in ("per-channel", "per-tensor"):
            tag = f"{config} {granularity}"
            for method in LAPQ_METHODS:
                out = os.path.join(args.out_dir, f"lapq_{config}_{granularity}_{method}.onnx")
                cmd = [args.lapq, "quantize", args.model, "-o", out, "--calib", args.calib,
                       "--method", method, "--wbits", str(wbits), "--percentile", str(args.percentile),
                       "--quiet"]
                if granularity == "per-tensor":
                    cmd.append("--per-tensor")
                t = time.perf_counter()
                try:
                    subprocess.run(cmd, check=True)
                    result = score(out)
                except (OSError, subprocess.CalledProcessError) as e:
                    result = f"lapq failed: {e}"
                rows.append((tag, f"lapq {method}", result, time.perf_counter() - t))
            ort_runs = [("minmax", {}), ("entropy", {}),
                        ("percentile", {"CalibPercentile": args.percentile})]
            for method, extra in ort_runs:
                label = f"ORT {method}" + "".join(f" {k}={v}" for k, v in extra.items())
                out = os.path.join(args.out_dir, f"ort_{config}_{granularity}_{method}.onnx")
                t = time.perf_counter()
                try:
                    ortcheck.ort_quantize(args.model, args.calib, out,
                                          per_channel=granularity == "per-channel", method=method,
                                          weight_type="int4" if wbits == 4 else "int8",
                                          extra_options=extra)
                    result = score(out)
                except Exception as e:  # noqa: BLE001 - report what ORT cannot do, keep going
                    result = f"ORT cannot: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
                rows.append((tag, label, result, time.perf_counter() - t))
            ortcheck.print_rows(rows[-(len(LAPQ_METHODS) + len(ort_runs)):])
    print("\nAll configurations (top-1 agreement with the float model: all crops, confident crops):")
    ortcheck.print_rows(rows)


if __name__ == "__main__":
    main()
