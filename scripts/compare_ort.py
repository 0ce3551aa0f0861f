#!/usr/bin/env python3
"""Side by side: lapq's MinMax quantization vs ONNX Runtime's quantize_static on one float model.

Both are quantized from the same calibration npz (MinMax, QDQ, uint8 activations, int8 weights,
per-channel unless --per-tensor), then checked with the ONNX checker, counted for fused integer ops
and remaining float Conv/Add/Gemm in ORT's optimized graph, and scored by top-1 agreement with the
float model on the evaluation npz: over all crops, and over the "confident" crops whose float top-1
softmax probability is > 0.3. Without --lapq only ONNX Runtime's row is produced.

usage: compare_ort.py [--lapq PATH_TO_LAPQ] --model M.onnx --calib calib.npz --eval eval.npz
                      [--per-tensor] [--out-dir work/cmp]
"""
import argparse
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ortcheck  # noqa: E402

CONFIDENT_PROB = 0.3
REPORTED_FLOAT_OPS = ("Conv", "Add", "Gemm")


def lapq_quantize(lapq, model, calib, out, per_tensor):
    cmd = [lapq, "quantize", model, "-o", out, "--calib", calib, "--method", "minmax"]
    if per_tensor:
        cmd.append("--per-tensor")
    print("+", " ".join(cmd), file=sys.stderr)
    try:
        subprocess.run(cmd, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"compare_ort: lapq failed: {e}")


def evaluate(label, path, data, float_top1, confident):
    ok, error = ortcheck.check_model(path)
    fusion = ortcheck.fusion_report(path)
    logits = next(iter(ortcheck.run_per_sample(path, data).values()))
    agree = logits.argmax(axis=1) == float_top1
    return {
        "method": label,
        "checker": "ok" if ok else f"FAILED: {error.splitlines()[0]}",
        "all": (int(agree.sum()), len(agree)),
        "confident": (int(agree[confident].sum()), int(confident.sum())),
        "float_left": fusion["float_ops_left"],
        "integer_ops": fusion["integer_ops"],
    }


def print_table(rows):
    header = ["method", "top-1 agreement all (n)", f"confident p>{CONFIDENT_PROB} (n)",
              "float " + "/".join(REPORTED_FLOAT_OPS) + " left", "integer ops", "checker"]
    lines = [header]
    for r in rows:
        all_hit, all_n = r["all"]
        conf_hit, conf_n = r["confident"]
        lines.append([
            r["method"],
            f"{all_hit / all_n:.1%} ({all_hit}/{all_n})",
            f"{conf_hit / conf_n:.1%} ({conf_hit}/{conf_n})" if conf_n else "- (0)",
            "/".join(str(r["float_left"].get(op, 0)) for op in REPORTED_FLOAT_OPS),
            " ".join(f"{op}:{n}" for op, n in r["integer_ops"].items()) or "none",
            r["checker"],
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print(" | ".join(cell.ljust(w) for cell, w in zip(line, widths)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lapq", help="lapq binary; omitted: compare ONNX Runtime's result only")
    parser.add_argument("--model", required=True, help="float ONNX classifier with output [N, K]")
    parser.add_argument("--calib", required=True, help="calibration npz (array named after the input)")
    parser.add_argument("--eval", required=True, help="evaluation npz, disjoint from --calib")
    parser.add_argument("--per-tensor", action="store_true", help="per-tensor weights (default per-channel)")
    parser.add_argument("--out-dir", default="work/cmp")
    args = parser.parse_args()

    os.makedirs(args.out_dir, exist_ok=True)
    suffix = "_per_tensor" if args.per_tensor else ""
    mode = "per-tensor" if args.per_tensor else "per-channel"
    data = dict(np.load(args.eval))
    float_logits = next(iter(ortcheck.run_per_sample(args.model, data).values()))
    float_top1 = float_logits.argmax(axis=1)
    confident = ortcheck.softmax(float_logits.astype(np.float64)).max(axis=1) > CONFIDENT_PROB

    rows = []
    if args.lapq:
        lapq_out = os.path.join(args.out_dir, f"lapq{suffix}.onnx")
        lapq_quantize(args.lapq, args.model, args.calib, lapq_out, args.per_tensor)
        rows.append(evaluate(f"lapq minmax {mode}", lapq_out, data, float_top1, confident))
    ort_out = os.path.join(args.out_dir, f"ort{suffix}.onnx")
    ortcheck.ort_quantize(args.model, args.calib, ort_out, per_channel=not args.per_tensor)
    rows.append(evaluate(f"ORT quantize_static minmax {mode}", ort_out, data, float_top1, confident))
    print_table(rows)


if __name__ == "__main__":
    main()
