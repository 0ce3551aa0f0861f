#!/usr/bin/env python3
"""LAPQ's ablation on a float classifier, stage by stage, against ONNX Runtime's best quantize_static.

For each configuration (W4A8 and W4A4; per-tensor and per-channel weights) it builds, from the same
calibration npz, and scores on a disjoint evaluation npz (top-1 agreement with the float model, from
ONNX Runtime's outputs, after onnx.checker's full check):
  1. layer-wise p=2 (MSE)          lapq --method mse --lp 2 --no-bias-correction
  2. layer-wise p*                 lapq --method lapq --max-iters 0 --no-bias-correction
  3. p* + Powell                   lapq --method lapq --no-bias-correction
  4. + bias correction             lapq --method lapq            (full LAPQ)
  5. ONNX Runtime's best of MinMax, Entropy and Percentile (int4 weights, uint8 or uint4 activations)
Each lapq run writes its JSON report (losses per stage, evaluations, seconds) beside its model.

usage: ablation.py --lapq target/release/lapq --model M.onnx --calib calib.npz --eval eval.npz
                   [--configs w4a8,w4a4] [--granularities per-tensor,per-channel] [--out-dir work/ablation]
                   [lapq options passed to every lapq run after --, e.g. -- --lapq-samples 32]
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ortcheck  # noqa: E402

STAGES = [
    ("layer-wise p=2 (MSE)", ["--method", "mse", "--lp", "2", "--no-bias-correction"]),
    ("layer-wise p*", ["--method", "lapq", "--max-iters", "0", "--no-bias-correction"]),
    ("p* + Powell", ["--method", "lapq", "--no-bias-correction"]),
    ("+ bias correction (LAPQ)", ["--method", "lapq"]),
]
ORT_METHODS = [("minmax", {}), ("entropy", {}), ("percentile", {"CalibPercentile": 99.99})]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lapq", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--configs", default="w4a8,w4a4")
    parser.add_argument("--granularities", default="per-tensor,per-channel")
    parser.add_argument("--out-dir", default="work/ablation")
    parser.add_argument("extra", nargs="*", help="options for every lapq run (after --)")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    agreement = ortcheck.Agreement(args.model, args.eval)
    rows = []
    for config in args.configs.split(","):
        abits = config.split("a")[1]
        for granularity in args.granularities.split(","):
            tag = f"{config} {granularity}"
            first = len(rows)
            for label, options in STAGES:
                name = f"{config}_{granularity}_{label.split(' (')[0]}".replace(" ", "_")
                out = os.path.join(args.out_dir, f"lapq_{name}.onnx".replace("*", "star"))
                report = out[:-len(".onnx")] + ".json"
                cmd = [args.lapq, "quantize", args.model, "-o", out, "--calib", args.calib,
                       "--wbits", "4", "--abits", abits, "--report", report, "--quiet",
                       *options, *args.extra]
                if granularity == "per-tensor":
                    cmd.append("--per-tensor")
                t = time.perf_counter()
                try:
                    subprocess.run(cmd, check=True)
                    result = agreement.describe(out) + lapq_summary(report)
                except (OSError, subprocess.CalledProcessError, RuntimeError) as e:
                    result = f"failed: {e}"
                rows.append((tag, label, result, time.perf_counter() - t))
                ortcheck.print_rows(rows[-1:], header=len(rows) == first + 1)
            best = None
            for method, extra in ORT_METHODS:
                out = os.path.join(args.out_dir, f"ort_{config}_{granularity}_{method}.onnx")
                t = time.perf_counter()
                try:
                    ortcheck.ort_quantize(args.model, args.calib, out,
                                          per_channel=granularity == "per-channel", method=method,
                                          weight_type="int4",
                                          activation_type="uint4" if abits == "4" else "uint8",
                                          extra_options=extra)
                    score = agreement.score(out)
                    if best is None or score[0] > best[1][0]:
                        best = (method, score, out)
                except Exception as e:  # noqa: BLE001 - report what ORT cannot do, keep going
                    print(f"  ORT {method} cannot: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
                    sys.stdout.flush()
            if best is None:
                rows.append((tag, "ONNX Runtime best", "ONNX Runtime cannot", 0.0))
            else:
                rows.append((tag, f"ONNX Runtime best ({best[0]})", agreement.describe(best[2]),
                             time.perf_counter() - t))
            ortcheck.print_rows(rows[-1:], header=False)
    print("\nLAPQ ablation (top-1 agreement with the float model: all crops, confident crops;"
          " LAPQ rows: loss after each stage):")
    ortcheck.print_rows(rows)


def lapq_summary(report_path):
    """The losses a lapq run reports, when it ran LAPQ."""
    with open(report_path) as f:
        lapq = json.load(f).get("lapq")
    if not lapq:
        return ""
    sweeps = sum(max(len(phase["sweeps"]) - 1, 0) for phase in lapq.get("powell", []))
    return (f"  loss minmax {lapq['minmax_loss']:.3f} init {lapq['init_loss']:.3f}"
            f" (p {lapq['p_used']:.2f}) final {lapq['final_loss']:.3f},"
            f" {lapq['evaluations']} evals, {sweeps} sweeps, {sum(lapq['seconds'].values()):.0f} s")


if __name__ == "__main__":
    main()
