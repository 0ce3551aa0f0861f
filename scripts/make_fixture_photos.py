#!/usr/bin/env python3
"""Copy a few CC0 / public-domain photos from work/photos/ (see scripts/fetch-photos) into
fixtures/photos/, downscaled to a 320 px short side, with fixtures/photos/LICENSES.md.

usage: make_fixture_photos.py [--photos work/photos] [--out fixtures/photos]
"""
import argparse
import os

from PIL import Image

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SHORT_SIDE = 320

# file in work/photos -> (source, license); licenses as stated in scikit-image 0.26.0's
# skimage/data/_fetchers.py docstrings.
PHOTOS = {
    "astronaut.png": ("scikit-image 0.26.0 skimage/data: astronaut Eileen Collins, NASA Great Images database",
                      "public domain (no known copyright restrictions)"),
    "chelsea.png": ("scikit-image 0.26.0 skimage/data: Chelsea the cat, photographer Stefan van der Walt",
                    "CC0"),
    "coffee.png": ("scikit-image 0.26.0 skimage/data: coffee cup, photographer Rachel Michetti",
                   "CC0"),
    "rocket.jpg": ("scikit-image 0.26.0 skimage/data: DSCOVR launch on Falcon 9, SpaceX",
                   "public domain (released by SpaceX)"),
    "retina.jpg": ("scikit-image 0.26.0 skimage/data: fundus photograph of a normal left eye, Wikimedia Commons",
                   "CC0 1.0 Universal Public Domain Dedication"),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", default=os.path.join(ROOT, "work", "photos"))
    parser.add_argument("--out", default=os.path.join(ROOT, "fixtures", "photos"))
    args = parser.parse_args()

    os.makedirs(args.out, exist_ok=True)
    lines = ["# Photos", "",
             f"Downscaled to a {SHORT_SIDE} px short side and saved as JPEG (quality 90) by "
             "scripts/make_fixture_photos.py from the files scripts/fetch-photos unpacks.", "",
             "| file | source | license |", "|---|---|---|"]
    for name, (source, license_text) in PHOTOS.items():
        img = Image.open(os.path.join(args.photos, name)).convert("RGB")
        scale = SHORT_SIDE / min(img.size)
        if scale < 1:
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
        out_name = os.path.splitext(name)[0] + ".jpg"
        img.save(os.path.join(args.out, out_name), quality=90)
        lines.append(f"| {out_name} | {source} | {license_text} |")
    with open(os.path.join(args.out, "LICENSES.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
