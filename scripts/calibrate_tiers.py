#!/usr/bin/env python3
"""Measure the errors behind check_qdq.py's "w8a8" tiers.

For every fixture: quantize with ONNX Runtime's own quantize_static (QDQ, MinMax, uint8 activations,
int8 weights, per-channel and per-tensor), then deliberately break the per-channel result (activation
scales x4 or /4, activation zero points forced to 128, weight scales x4 without touching the bias), and
print relative RMS error, max abs error / max|f| and top-1 agreement against the float model on the
fixture's calib.npz. A sound tier passes ORT's rows with margin (the per-tensor row only for per-tensor tiers)
and fails the broken rows.

With --model (e.g. EfficientNet-Lite0 and the crops of scripts/make_crops.py) the same rows are measured
for one real model: quantized from --calib, compared on --data (the first --samples samples).

usage: calibrate_tiers.py [--fixtures DIR]
       calibrate_tiers.py --model M.onnx --calib calib.npz --data eval.npz [--samples N]
"""
import argparse
import os
import sys
import tempfile

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ortcheck  # noqa: E402
from check_qdq import TIERS, tier_failures  # noqa: E402


def activation_params(model):
    """Names of the scale and zero-point initializers used by QuantizeLinear nodes (activations)."""
    scales, zero_points = set(), set()
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            scales.add(node.input[1])
            zero_points.add(node.input[2])
    return scales, zero_points


def weight_scales(model):
    """Scale initializers of DequantizeLinear nodes that read int8 quantized weights."""
    inits = {i.name: i for i in model.graph.initializer}
    return {n.input[1] for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits
            and inits[n.input[0]].data_type == onnx.TensorProto.INT8}


def edit_initializers(model, names, edit):
    for i, init in enumerate(model.graph.initializer):
        if init.name in names:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(edit(numpy_helper.to_array(init)), init.name))


def broken_variants(quant_path, tmp):
    """Write the broken copies of ORT's quantized model; returns {label: path}."""
    def variant(label, select, edit):
        model = onnx.load(quant_path)
        edit_initializers(model, select(model), edit)
        path = os.path.join(tmp, label + ".onnx")
        onnx.save_model(model, path)
        return path

    return {
        "act scale x4": variant("act_scale_x4", lambda m: activation_params(m)[0],
                                lambda a: (a * 4).astype(a.dtype)),
        "act scale /4": variant("act_scale_div4", lambda m: activation_params(m)[0],
                                lambda a: (a / 4).astype(a.dtype)),
        "act zp=128": variant("act_zp_128", lambda m: activation_params(m)[1],
                              lambda a: np.full_like(a, 128)),
        "weight scale x4": variant("weight_scale_x4", weight_scales,
                                   lambda a: (a * 4).astype(a.dtype)),
    }


def worst(metrics):
    """Worst value of each metric over a model's outputs."""
    rel_rms = max(m["rel_rms"] for m in metrics.values())
    max_abs = max(m["max_abs_rel"] for m in metrics.values())
    top1 = [m["top1_agreement"] for m in metrics.values() if m["top1_agreement"] is not None]
    return rel_rms, max_abs, (min(top1) if top1 else None)


TIER_COLUMNS = ("w8a8", "w8a8_per_tensor", "w8a8_deep")


def measure(name, float_path, calib_path, data):
    """Print one row per variant: ORT per-channel, ORT per-tensor, broken per-channel copies."""
    reference = ortcheck.run_per_sample(float_path, data)
    with tempfile.TemporaryDirectory() as tmp:
        rows = {}
        for label, per_channel in (("ort per-channel", True), ("ort per-tensor", False)):
            rows[label] = os.path.join(tmp, label.replace(" ", "_") + ".onnx")
            ortcheck.ort_quantize(float_path, calib_path, rows[label], per_channel=per_channel)
        rows.update(broken_variants(rows["ort per-channel"], tmp))
        for label, path in rows.items():
            quant = ortcheck.run_per_sample(path, data)
            metrics = {k: ortcheck.output_metrics(reference[k], quant[k]) for k in reference}
            rel_rms, max_abs, top1 = worst(metrics)
            verdicts = ["fail" if tier_failures(metrics, TIERS[t]) else "pass" for t in TIER_COLUMNS]
            top1_text = "-" if top1 is None else f"{top1:.2f}"
            print(f"{name:16} {label:16} {rel_rms:9.4f} {max_abs:11.4f} {top1_text:>6}  "
                  + "  ".join(f"{v:{len(t)}}" for v, t in zip(verdicts, TIER_COLUMNS)), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", default=os.path.join(os.path.dirname(__file__), "..", "fixtures"))
    parser.add_argument("--model", help="measure this float model instead of the fixtures (needs --calib, --data)")
    parser.add_argument("--calib", help="calibration npz for --model")
    parser.add_argument("--data", help="evaluation npz for --model")
    parser.add_argument("--samples", type=int, help="use only the first N samples of --data")
    args = parser.parse_args()

    print(f"{'model':16} {'variant':16} {'rel_rms':>9} {'max_abs_rel':>11} {'top1':>6}  " + "  ".join(TIER_COLUMNS))
    if args.model:
        if not (args.calib and args.data):
            parser.error("--model needs --calib and --data")
        data = {k: v[:args.samples] for k, v in np.load(args.data).items()}
        measure(os.path.basename(args.model), args.model, args.calib, data)
        return
    for name in sorted(os.listdir(args.fixtures)):
        folder = os.path.join(args.fixtures, name)
        if os.path.isfile(os.path.join(folder, "model.onnx")):
            calib_path = os.path.join(folder, "calib.npz")
            measure(name, os.path.join(folder, "model.onnx"), calib_path, dict(np.load(calib_path)))


if __name__ == "__main__":
    main()
