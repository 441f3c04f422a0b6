"""Cost of delivering big: assembling a 2000² export against one UNet step, and memory over a long batch.

1. **Assembly / UNet step.** One SD1.5 UNet step at its size (latent 64², batch 2 for classifier-free guidance,
   random weights from the shipped SD1.5 config, fp16 on CUDA / fp32 on CPU) is timed on this machine, and so is
   the assembly of a 2000² export from a 512² generated background and a 3000-px product photo: background
   resize (Lanczos), native-resolution composite, encoding (JPEG q95 and PNG) and the preservation report on
   the decoded file. Both are the fastest of ``--reps`` runs, measured side by side in this process.
   Target: assembly ≤ 1 UNet step.
2. **Memory over a batch.** ``productbg batch``'s loop (:func:`run_batch`, background writes, atomic files) runs
   ``--items`` rows of 3000-px inputs (one 3000×2400 RGBA photo, listed once per row) with the tiny model and
   ``--export amazon-zoom``; the process's resident set size is read at item 10 and at the last item.
   Target: growth ≤ 5 %.

    python bench/export_overhead.py [--items 1000] [--reps 3] [--skip-unet] [--skip-batch]

The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ASSEMBLY_LIMIT = 1.0
RSS_LIMIT = 0.05


def rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def product_photo(width: int = 3000, height: int = 2400, seed: int = 0):
    """A 3000-px textured product photo with a soft-edged alpha (what a seller's packshot cut-out looks like)."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    small = rng.random((height // 40, width // 40, 3)).astype(np.float32)
    rgb = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    alpha = np.zeros((height, width), np.float32)
    cv2.ellipse(alpha, (width // 2, height // 2), (int(width * 0.38), int(height * 0.42)), 0, 0, 360, 1.0, -1)
    alpha = cv2.GaussianBlur(alpha, (0, 0), 1.5)
    return rgb, alpha


def time_unet_step(reps: int) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    repo = Path(__file__).resolve().parent.parent
    config = json.loads((repo / "assets" / "sd15" / "unet_config.json").read_text())
    cuda = torch.cuda.is_available()
    dtype = torch.float16 if cuda else torch.float32
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config).to(device, dtype).eval()
    x = torch.randn(2, unet.config.in_channels, 64, 64, device=device, dtype=dtype)
    context = torch.randn(2, 77, 768, device=device, dtype=dtype)
    t = torch.tensor([500, 500], device=device)
    best = float("inf")
    with torch.no_grad():
        for _ in range(reps + 1):                                   # the first call warms up
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            unet(x, t, encoder_hidden_states=context)
            if cuda:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start) if _ else best
    return {"device": device, "dtype": str(dtype).replace("torch.", ""), "in_channels": unet.config.in_channels,
            "seconds": round(best, 4)}


def time_assembly(reps: int) -> dict:
    import numpy as np

    from productbg import imaging

    rgb, alpha = product_photo()
    layout = imaging.plan_layout(alpha, (2000, 2000))
    background = np.random.default_rng(1).random((512, 512, 3)).astype(np.float32)
    out = {}
    for fmt in ("jpeg", "png"):
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            result = imaging.assemble_export(background, rgb, alpha, layout, (2000, 2000), fmt, 95, feather=7.8)
            best = min(best, time.perf_counter() - start)
        out[fmt] = {"seconds": round(best, 4), "bytes": len(result.data),
                    "delta_e2000_mean": result.report["metrics"]["delta_e2000"]["mean"]}
    return out


def batch_rss(items: int) -> dict:
    import numpy as np
    from PIL import Image

    from productbg.pipeline.batch import run_batch
    from productbg.pipeline.manifest import read_manifest
    from productbg.pipeline.pipeline import GenerateSettings, ProductBGPipeline

    rgb, alpha = product_photo()
    samples: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        Image.fromarray((np.dstack([rgb, alpha]) * 255 + 0.5).astype(np.uint8)).save(tmp / "p.png",
                                                                                      compress_level=1)
        (tmp / "m.csv").write_text("product,category,seed\n" + "".join(f"p.png,shoes,{i}\n" for i in range(items)))
        settings = GenerateSettings(size=64, steps=2, export=(2000, 2000), export_format="jpeg", segmentation="alpha")
        pipe = ProductBGPipeline.tiny(style=False, settings=settings, device="cpu")
        original = pipe.generate
        count = [0]

        def generate(*args, **kwargs):
            result = original(*args, **kwargs)
            count[0] += 1
            if count[0] in (10, items):
                samples[count[0]] = rss_mb()
            return result

        pipe.generate = generate
        start = time.perf_counter()
        summary = run_batch(read_manifest(tmp / "m.csv", tmp / "out", 0, 1), tmp / "out", lambda: pipe,
                            progress=False)
        seconds = time.perf_counter() - start
    first, last = samples.get(10, float("nan")), samples.get(items, float("nan"))
    return {"items": items, "done": summary.done, "failed": len(summary.failed), "seconds": round(seconds, 1),
            "rss_mb_item_10": round(first, 1), f"rss_mb_item_{items}": round(last, 1),
            "rss_growth": round(last / first - 1.0, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1000, help="batch rows for the memory measurement (≥ 10)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-unet", action="store_true", help="no UNet step (then no ratio)")
    ap.add_argument("--skip-batch", action="store_true", help="no batch memory measurement")
    args = ap.parse_args()
    result: dict = {}
    result["assembly_2000"] = time_assembly(args.reps)
    print("assembly:", result["assembly_2000"], file=sys.stderr, flush=True)
    if not args.skip_unet:
        result["unet_step"] = time_unet_step(args.reps)
        print("unet step:", result["unet_step"], file=sys.stderr, flush=True)
        ratio = result["assembly_2000"]["jpeg"]["seconds"] / result["unet_step"]["seconds"]
        result["assembly_over_unet_step"] = round(ratio, 3)
        result["assembly_pass"] = ratio <= ASSEMBLY_LIMIT
    if not args.skip_batch:
        result["batch"] = batch_rss(max(10, args.items))
        result["rss_pass"] = result["batch"]["rss_growth"] <= RSS_LIMIT
    print(json.dumps(result))


if __name__ == "__main__":
    main()
