#!/usr/bin/env python3
"""Random EfficientNet-Lite0 input crops from a folder of photos, for calibration and evaluation.

Preprocessing per crop: RGB; resize the short side to a random size in [224, 320] (bilinear); random
224x224 crop; random horizontal flip; (x - 127) / 128; NCHW float32. The photos are split into two
disjoint sets (sorted scene names, alternating; a stereo pair such as motorcycle_left/right is one scene):
calibration crops come from the first, evaluation crops from the second. Each npz holds one array
"input" shaped [n, 3, 224, 224]; crops cycle through the photos of their set.

usage: make_crops.py --photos DIR --calib-out calib.npz --eval-out eval.npz
                     [--n-calib 256] [--n-eval 256] [--seed 0]
"""
import argparse
import os
import re

import numpy as np
from PIL import Image

SIZE = 224
MAX_SHORT_SIDE = 320
EXTENSIONS = (".png", ".jpg", ".jpeg")


def split_photos(folder):
    """Deterministic disjoint (calibration, evaluation) lists of photo paths."""
    scenes = {}
    for name in sorted(os.listdir(folder)):
        if name.lower().endswith(EXTENSIONS):
            scene = re.sub(r"_(left|right)$", "", os.path.splitext(name)[0])
            scenes.setdefault(scene, []).append(os.path.join(folder, name))
    ordered = [scenes[s] for s in sorted(scenes)]
    calib = [p for group in ordered[0::2] for p in group]
    evaluation = [p for group in ordered[1::2] for p in group]
    if not calib or not evaluation:
        raise SystemExit(f"make_crops: need at least two photos (scenes) in {folder}")
    return calib, evaluation


def random_crop(img, rng):
    short = int(rng.integers(SIZE, MAX_SHORT_SIDE + 1))
    scale = short / min(img.size)
    w, h = max(SIZE, round(img.width * scale)), max(SIZE, round(img.height * scale))
    resized = img.resize((w, h), Image.BILINEAR)
    x = int(rng.integers(0, w - SIZE + 1))
    y = int(rng.integers(0, h - SIZE + 1))
    crop = np.asarray(resized.crop((x, y, x + SIZE, y + SIZE)), dtype=np.float32)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return ((crop - 127.0) / 128.0).transpose(2, 0, 1)


def make_crops(paths, count, rng):
    images = [Image.open(p).convert("RGB") for p in paths]
    out = np.empty((count, 3, SIZE, SIZE), dtype=np.float32)
    for i in range(count):
        out[i] = random_crop(images[i % len(images)], rng)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", required=True)
    parser.add_argument("--calib-out", required=True)
    parser.add_argument("--eval-out", required=True)
    parser.add_argument("--n-calib", type=int, default=256)
    parser.add_argument("--n-eval", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    calib_paths, eval_paths = split_photos(args.photos)
    rng = np.random.default_rng(args.seed)
    for paths, count, out in ((calib_paths, args.n_calib, args.calib_out),
                              (eval_paths, args.n_eval, args.eval_out)):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        tmp = out + ".partial.npz"  # renamed when complete, so an interrupted run leaves no valid-looking file
        np.savez(tmp, input=make_crops(paths, count, rng))
        os.replace(tmp, out)
        print(f"make_crops: {out}: {count} crops from {', '.join(os.path.basename(p) for p in paths)}")


if __name__ == "__main__":
    main()
