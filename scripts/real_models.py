#!/usr/bin/env python3
"""lapq (W8A8 MinMax, per-channel) next to ONNX Runtime's quantize_static on real models, scored against
the float model on held-out data, with ONNX Runtime running all three.

Models (scripts/fetch-models, scripts/fetch-effnet, scripts/make_encoder.py) and data:
  effnet, effnet_bn   EfficientNet-Lite0 folded / with 49 BatchNormalizations; photo crops (make_crops);
                      metric: top-1 agreement
  ppocr_det           PP-OCRv4 detector; 320x320 photo crops and rendered text pages; metric: IoU of the
                      text masks (probability > 0.3) with the float model's
  ppocr_rec           PP-OCRv4 recognizer; 48x320 lines of rendered text; metric: per-step argmax
                      agreement, and whole lines whose CTC decoding equals the float model's
  silero_vad          silero VAD (sequence export, LSTM); whole speech clips (16 kHz, 576-sample frames),
                      calibrated as one sample per clip of varying length; metric: frames whose
                      speech decision (p > 0.5) agrees, and the largest probability difference; also
                      lapq with the STFT Conv (--float-first-layer) and the Conv reading the magnitude
                      spectrum in float: a linear 8-bit grid over either loses quiet speech
  yolov8n             YOLOv8n 320 (nudenet); 320x320 photo crops; metric: class agreement on anchors the
                      float model scores > 0.25, and mean box-coordinate error there in pixels
  encoder, encoder_ln BERT-style encoder, decomposed LayerNorm (opset 13) / LayerNormalization (opset 17);
                      int64 token ids and masks from license texts; metric: top-1 agreement; also lapq
                      with --quantize-fragile (softmax inputs and variances quantized, as ONNX Runtime does)

Every output model passes onnx.checker's full check before it is scored; SQNR (dB) is over the first
output; "float ops" counts float Conv/MatMul/Gemm/Add/Mul/Concat left in ONNX Runtime's optimized graph.
Calibration and evaluation data are disjoint (different photos, texts, clips).

usage: real_models.py --lapq target/release/lapq [--only a,b] [--out-dir work/real]
"""
import argparse
import os
import subprocess
import sys
import time
import wave
import zlib

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_crops  # noqa: E402
import ortcheck  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "work")
LICENSES = "/usr/share/common-licenses"
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


# ---------- data ----------

def photo_crops(paths, count, size, rng):
    images = [Image.open(p).convert("RGB") for p in paths]
    out = np.empty((count, size, size, 3), dtype=np.float32)
    for i in range(count):
        img = images[i % len(images)]
        short = int(rng.integers(size, int(size * 1.5) + 1))
        scale = short / min(img.size)
        w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
        img = img.resize((w, h), Image.BILINEAR)
        x, y = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
        out[i] = np.asarray(img.crop((x, y, x + size, y + size)), dtype=np.float32)
    return out  # NHWC, 0..255


def words(license_name):
    with open(os.path.join(LICENSES, license_name), encoding="utf-8", errors="replace") as f:
        return [w for w in f.read().split() if w.isprintable()]


def font(size):
    try:
        return ImageFont.truetype(FONT, size)
    except OSError:
        return ImageFont.load_default(size)


def text_lines(text, count, rng, height=48, width=320):
    """Lines of real text rendered dark on light, varied size, offset and shade; NCHW, (x/255-0.5)/0.5."""
    out = np.empty((count, 3, height, width), dtype=np.float32)
    for i in range(count):
        start = int(rng.integers(0, max(1, len(text) - 8)))
        line = " ".join(text[start:start + int(rng.integers(2, 6))])
        bg = tuple(int(v) for v in rng.integers(170, 256, 3))
        fg = tuple(int(v) for v in rng.integers(0, 80, 3))
        img = Image.new("RGB", (width, height), bg)
        ImageDraw.Draw(img).text((int(rng.integers(2, 20)), int(rng.integers(4, 12))), line, fill=fg,
                                 font=font(int(rng.integers(22, 32))))
        out[i] = (np.asarray(img, dtype=np.float32) / 255.0 - 0.5).transpose(2, 0, 1) / 0.5
    return out


def text_pages(text, count, rng, size=320):
    """Photos' backgrounds are text-free: pages of real text give the detector something to find."""
    out = np.empty((count, size, size, 3), dtype=np.float32)
    for i in range(count):
        img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(180, 256, 3)))
        draw = ImageDraw.Draw(img)
        y, start = int(rng.integers(0, 20)), int(rng.integers(0, max(1, len(text) - 200)))
        f = font(int(rng.integers(12, 24)))
        while y < size - 10:
            n = int(rng.integers(3, 7))
            draw.text((int(rng.integers(0, 40)), y), " ".join(text[start:start + n]), fill=(20, 20, 20), font=f)
            start, y = start + n, y + int(f.size * 1.6)
        out[i] = np.asarray(img, dtype=np.float32)
    return out


def tokens(text, count, rng, seq=32, vocab=1000):
    """Token ids hashed from consecutive words of a text (id 1 = [CLS]), padded with 0, and masks."""
    ids = np.zeros((count, seq), dtype=np.int64)
    mask = np.zeros((count, seq), dtype=np.int64)
    for i in range(count):
        n = int(rng.integers(8, seq + 1))
        start = int(rng.integers(0, len(text) - n))
        ids[i, 0] = 1
        ids[i, 1:n] = [2 + zlib.crc32(w.lower().encode()) % (vocab - 2) for w in text[start:start + n - 1]]
        mask[i, :n] = 1
    return ids, mask


def speech_frames(path):
    """A 48 kHz clip as 16 kHz [frames, 576] (512 new samples + 64 of context), silero's input."""
    with wave.open(path) as w:
        raw = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768.0
        rate = w.getframerate()
    step = rate // 16000
    audio = np.convolve(raw, np.ones(step) / step, mode="same")[::step]
    audio = np.concatenate([np.zeros(64, np.float32), audio])
    frames = (len(audio) - 64) // 512
    return np.stack([audio[k * 512:k * 512 + 576] for k in range(frames)]).astype(np.float32)


def imagenet_nchw(nhwc, bgr=False):
    x = nhwc[..., ::-1] if bgr else nhwc
    mean = np.array([0.485, 0.456, 0.406], np.float32) * 255
    std = np.array([0.229, 0.224, 0.225], np.float32) * 255
    return ((x - mean) / std).transpose(0, 3, 1, 2).copy()


# ---------- metrics (float output f, quantized output q, both from ONNX Runtime) ----------

def sqnr(f, q):
    f, q = f.astype(np.float64), q.astype(np.float64)
    noise = np.sum((f - q) ** 2)
    return float("inf") if noise == 0 else 10 * np.log10(np.sum(f * f) / noise)


def top1(f, q):
    return f"top-1 {np.mean(f.argmax(-1) == q.argmax(-1)):.1%}"


def mask_iou(f, q):
    a, b = f > 0.3, q > 0.3
    union = np.logical_or(a, b).sum()
    return f"mask IoU {np.logical_and(a, b).sum() / union:.3f}" if union else "mask IoU - (empty)"


def ctc(seq):
    out, prev = [], 0
    for c in seq:
        if c != prev and c != 0:
            out.append(int(c))
        prev = c
    return out


def rec_agreement(f, q):
    fa, qa = f.argmax(-1), q.argmax(-1)
    lines = np.mean([ctc(a) == ctc(b) for a, b in zip(fa, qa)])
    return f"steps {np.mean(fa == qa):.1%}, lines {lines:.1%}"


def vad_agreement(f, q):
    return f"decisions {np.mean((f > 0.5) == (q > 0.5)):.1%}, max |dp| {np.max(np.abs(f - q)):.3f}"


def yolo_agreement(f, q):
    # [N, 4 + classes, anchors]: boxes (cx, cy, w, h in pixels), then class scores
    fs, qs = f[:, 4:], q[:, 4:]
    hit = fs.max(axis=1) > 0.25
    if not hit.any():
        return "no anchor scores > 0.25"
    cls = np.mean(fs.argmax(axis=1)[hit] == qs.argmax(axis=1)[hit])
    box = np.mean(np.abs(f[:, :4] - q[:, :4]).transpose(0, 2, 1)[hit])
    score = np.mean(np.abs(fs.max(axis=1) - qs.max(axis=1))[hit])
    return f"classes {cls:.1%} of {int(hit.sum())} anchors, score error {score:.3f}, box error {box:.2f} px"


# ---------- models ----------

def prepare(name, rng):
    """(model path, calibration samples, evaluation samples, metric, extra lapq configurations).
    Samples are lists of {input name: array with the model's batch of 1}."""
    calib_photos, eval_photos = make_crops.split_photos(os.path.join(WORK, "photos"))
    calib_text, eval_text = words("GPL-3") + words("LGPL-3"), words("Apache-2.0") + words("MPL-2.0")

    def rows(arrays):
        return [{k: v[i:i + 1] for k, v in arrays.items()} for i in range(len(next(iter(arrays.values()))))]

    if name in ("effnet", "effnet_bn"):
        path = os.path.join(WORK, "effnet", "efficientnet_lite0.onnx" if name == "effnet"
                            else "efficientnet_lite0_bn.onnx")
        calib = make_crops.make_crops(calib_photos, 64, rng)
        evaluation = make_crops.make_crops(eval_photos, 128, rng)
        return path, rows({"input": calib}), rows({"input": evaluation}), top1, []
    if name == "ppocr_det":
        def det(photos, count):
            x = np.concatenate([photo_crops(photos, count // 2, 320, rng),
                                text_pages(calib_text if photos is calib_photos else eval_text,
                                           count - count // 2, rng)])
            return rows({"x": imagenet_nchw(x, bgr=True)})
        return os.path.join(WORK, "models", "ppocr_det.onnx"), det(calib_photos, 32), det(eval_photos, 32), \
            mask_iou, []
    if name == "ppocr_rec":
        return os.path.join(WORK, "models", "ppocr_rec.onnx"), rows({"x": text_lines(calib_text, 64, rng)}), \
            rows({"x": text_lines(eval_text, 64, rng)}), rec_agreement, []
    if name == "silero_vad":
        clips = sorted(p for p in os.listdir(os.path.join(WORK, "models", "sounds")) if p.endswith(".wav"))
        state = np.zeros((1, 1, 128), np.float32)

        def clip_samples(names):
            return [{"input": speech_frames(os.path.join(WORK, "models", "sounds", c)), "h": state, "c": state}
                    for c in names]
        return os.path.join(WORK, "models", "silero_vad.onnx"), clip_samples(clips[0::2]), \
            clip_samples(clips[1::2]), vad_agreement, \
            [["--float-first-layer"], ["--exclude-nodes", "/stft/Conv,/encoder.0/Conv"]]
    if name == "yolov8n":
        def yolo(photos, count):
            return rows({"images": (photo_crops(photos, count, 320, rng) / 255.0).transpose(0, 3, 1, 2).copy()})
        return os.path.join(WORK, "models", "yolov8n.onnx"), yolo(calib_photos, 32), yolo(eval_photos, 64), \
            yolo_agreement, []
    if name in ("encoder", "encoder_ln"):
        path = os.path.join(WORK, "real", f"{name}.onnx")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        layernorm = "decomposed" if name == "encoder" else "fused"
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_encoder.py"), path,
                        "--layernorm", layernorm], check=True)

        def enc(texts, count):
            ids, mask = tokens(texts, count, rng)
            return rows({"input_ids": ids, "attention_mask": mask})
        return path, enc(calib_text, 128), enc(eval_text, 256), top1, [["--quantize-fragile"]]
    raise SystemExit(f"real_models: unknown model {name}")


MODELS = ["effnet", "effnet_bn", "ppocr_det", "ppocr_rec", "silero_vad", "yolov8n", "encoder", "encoder_ln"]


def write_test_data_sets(samples, folder):
    """ONNX test_data_set_N/input_K.pb folders (samples may differ in shape), input order of the model."""
    import shutil

    from onnx import numpy_helper
    shutil.rmtree(folder, ignore_errors=True)
    for i, sample in enumerate(samples):
        d = os.path.join(folder, f"test_data_set_{i}")
        os.makedirs(d, exist_ok=True)
        for k, (name, value) in enumerate(sample.items()):
            with open(os.path.join(d, f"input_{k}.pb"), "wb") as f:
                f.write(numpy_helper.from_array(value, name).SerializeToString())
    return folder


class ListReader(ortcheck.oq.CalibrationDataReader):
    def __init__(self, samples):
        self.samples = iter(samples)

    def get_next(self):
        return next(self.samples, None)


def run(path, samples):
    sess = ortcheck.session(path)
    out = sess.get_outputs()[0].name
    return [sess.run([out], s)[0] for s in samples]


def score(label, path, samples, float_outs, metric, seconds):
    ok, error = ortcheck.check_model(path)
    if not ok:
        return [label, f"checker FAILED: {error.splitlines()[0][:100]}", "", "", "", f"{seconds:.1f}"]
    outs = run(path, samples)
    f = np.concatenate([o.reshape(-1) for o in float_outs])
    q = np.concatenate([o.reshape(-1) for o in outs])
    task = metric(np.concatenate(float_outs), np.concatenate(outs))  # silero: clips of varying length
    fusion = ortcheck.fusion_report(path)
    integer = sum(fusion["integer_ops"].values())
    floats = sum(fusion["float_ops_left"].values())
    return [label, task, f"{sqnr(f, q):.1f}", str(integer), str(floats), f"{seconds:.1f}"]


def compare(name, lapq, out_dir, rng):
    path, calib, evaluation, metric, extra = prepare(name, rng)
    float_outs = run(path, evaluation)
    rows = []
    data = write_test_data_sets(calib, os.path.join(out_dir, f"{name}_calib"))
    for flags in [[]] + extra:
        out = os.path.join(out_dir, f"{name}.lapq{len(rows)}.onnx")
        start = time.time()
        cmd = [lapq, "quantize", path, "-o", out, "--calib", data, "-q"] + flags
        result = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.time() - start
        label = " ".join(["lapq"] + flags)
        if result.returncode != 0:
            rows.append([label, f"FAILED: {result.stderr.strip().splitlines()[-1][:110]}", "", "", "",
                         f"{seconds:.1f}"])
        else:
            rows.append(score(label, out, evaluation, float_outs, metric, seconds))
    out = os.path.join(out_dir, f"{name}.ort.onnx")
    start = time.time()
    try:
        ortcheck.oq.quantize_static(path, out, ListReader(calib), quant_format=ortcheck.oq.QuantFormat.QDQ,
                                    per_channel=True, activation_type=ortcheck.oq.QuantType.QUInt8,
                                    weight_type=ortcheck.oq.QuantType.QInt8,
                                    calibrate_method=ortcheck.oq.CalibrationMethod.MinMax)
        rows.append(score("ORT quantize_static", out, evaluation, float_outs, metric, time.time() - start))
    except Exception as e:  # ORT's quantizer raises many types
        rows.append(["ORT quantize_static", f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:90]}",
                     "", "", "", f"{time.time() - start:.1f}"])
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lapq", required=True)
    parser.add_argument("--only", help="comma-separated subset of " + ",".join(MODELS))
    parser.add_argument("--out-dir", default=os.path.join(WORK, "real"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    names = args.only.split(",") if args.only else MODELS
    header = ["model", "quantizer", "agreement with float", "SQNR dB", "int ops", "float ops", "seconds"]
    table = [header]
    for name in names:
        for row in compare(name, args.lapq, args.out_dir, np.random.default_rng(args.seed)):
            table.append([name] + row)
            print(" | ".join(table[-1]), file=sys.stderr, flush=True)
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, r in enumerate(table):
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
