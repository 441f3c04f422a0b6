"""The README's before/after: a 400×400 crop of the product at 100 %, 512² canvas (enlarged) vs 2000² export.

    python scripts/make_export_crop.py [--out docs/images/export_crop.png]

A 3000×2400 product with fine print (a label, thin stripes) goes through the tiny pipeline twice: the 512²
canvas delivery (what the seller got before: to show it at 2000², its pixels are enlarged ×3.9) and
``export=amazon-zoom`` (the product composited at its own resolution). Both crops cover the same part of the
label. The background is the tiny model's noise; only the product matters here.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
CROP = 400


def label_product(width: int = 3000, height: int = 2400) -> np.ndarray:
    """An RGBA bottle-like product with a printed label: small text and hairline stripes."""
    rgba = np.zeros((height, width, 4), np.uint8)
    cv2.ellipse(rgba, (width // 2, height // 2), (int(width * 0.3), int(height * 0.44)), 0, 0, 360,
                (30, 90, 170, 255), -1)
    x0, x1, y0, y1 = int(width * 0.3), int(width * 0.7), int(height * 0.35), int(height * 0.65)
    rgba[y0:y1, x0:x1, :3] = (245, 240, 225)
    for y in range(y0 + 20, y1 - 20, 9):
        rgba[y:y + 2, x0 + 30:x0 + 260, :3] = (180, 30, 40)
    for i, line in enumerate(["ORGANIC OLIVE OIL", "cold pressed  500 ml", "best before 2027-06",
                              "ingredients: 100% extra virgin olive oil from Crete"]):
        cv2.putText(rgba, line, (x0 + 300, y0 + 90 + 110 * i), cv2.FONT_HERSHEY_SIMPLEX, 1.6 if i == 0 else 1.0,
                    (20, 20, 20, 255), 3 if i == 0 else 2, cv2.LINE_AA)
    return rgba


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "docs" / "images" / "export_crop.png"))
    args = ap.parse_args()
    import torch

    from productbg.pipeline.pipeline import GenerateSettings, ProductBGPipeline

    torch.set_num_threads(2)
    rgba = label_product()
    pipe = ProductBGPipeline.tiny(style=False, settings=GenerateSettings(size=512, steps=2), device="cpu")
    image = rgba.astype(np.float32) / 255.0
    small = pipe.generate(image)[0]
    big = pipe.generate(image, export=(2000, 2000))[0].export
    (ox, oy), (sx, sy) = big.layout.offset, big.layout.scale
    cx, cy = int(ox + sx * 1170), int(oy + sy * 880)                  # the label's text, in export pixels
    after = np.asarray(Image.open(__import__("io").BytesIO(big.data)).convert("RGB"))[cy:cy + CROP, cx:cx + CROP]
    k = 512 / 2000
    region = small.image[int(cy * k):int((cy + CROP) * k), int(cx * k):int((cx + CROP) * k)]
    before = cv2.resize(region, (CROP, CROP), interpolation=cv2.INTER_LANCZOS4).clip(0, 1)
    before = (before * 255 + 0.5).astype(np.uint8)
    gap = np.full((CROP, 12, 3), 255, np.uint8)
    Image.fromarray(np.concatenate([before, gap, after], axis=1)).save(args.out, optimize=True)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
