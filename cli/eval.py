"""``productbg eval``: measure generated results — product preservation, style, category consistency, FID.

Reads a results folder (what `productbg batch` / `generate --out DIR` write: every folder with a result.json)
or a manifest of results (CSV/JSONL with image, mask, placed, raw, category, reference — e.g. ComfyUI outputs).
Prints a table and, as the last line, the summary JSON; --json writes the full report (with per-image rows).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..fileio.jsonfile import dumps, write_json
from ..pipeline.components import ClipVision, load_clip_vision
from ..pipeline.evaluate import ClipEmbedder, ColourHistogram, collect_items, evaluate, format_table, jsonable
from ..pipeline.tiny import tiny_vision_encoder
from . import checks
from .errors import CliError
from .options import add_pixel_limit_option, apply_pixel_limit

EPILOG = """examples:
  productbg eval out/batch
  productbg eval out/batch --clip-vision models/clip_vision/CLIP-ViT-H-14.safetensors --json out/eval.json
  productbg eval results.csv --fid-real data/bg1k_imgs_0

metrics: psnr_before_db / psnr_after_db (masked PSNR inside the product, before / after paste-back),
delta_e_before / delta_e_after (mean CIEDE2000 inside the product), expansion (object expansion / product area),
style_similarity (cosine of background embeddings, image vs reference), category_consistency (leave-one-out
nearest-centroid accuracy), fid (only with --fid-real and a FID library whose weights are already on disk).
Embeddings: CLIP vision with --clip-vision (or the tiny random one with --tiny), else a colour histogram.
Every image is measured at its generation size (that of mask.png / placed.png / raw_<k>.png): an --export
image, the same picture delivered larger, is area-resized to it (the delivered file's own report is in
result.json). What cannot be evaluated is listed under "failed" and the others are still evaluated: a file that
cannot be read, an image of another aspect than its mask, a bad manifest row, an unfinished item folder (no
complete result.json), a row the batch failed (its summary.json).
exit status: 0 every result evaluated, 1 some failed (see "failed"), 2 usage or input error (nothing to
evaluate)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``eval``."""
    p = sub.add_parser("eval", help="evaluate a folder or manifest of results", description=__doc__,
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="results folder, or a .csv/.jsonl manifest of results")
    p.add_argument("--clip-vision", metavar="PATH", help="CLIP vision model for style / category embeddings")
    p.add_argument("--tiny", action="store_true", help="use the tiny random CLIP vision model (tests)")
    p.add_argument("--fid-real", metavar="DIR", help="folder of real images to compute FID against")
    p.add_argument("--json", metavar="PATH", help="write the full report (with per-image metrics) here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    add_pixel_limit_option(p)
    p.set_defaults(func=run)


def _embedder(args: argparse.Namespace):
    if args.clip_vision:
        return ClipEmbedder(load_clip_vision(args.clip_vision), f"clip-vision:{Path(args.clip_vision).name}")
    if args.tiny:
        return ClipEmbedder(ClipVision(tiny_vision_encoder()), "clip-vision:tiny-random")
    return ColourHistogram()


def run(args: argparse.Namespace) -> int:
    """Evaluate, print the table and the summary JSON line."""
    check_args(args)
    items = collect_items(args.results)
    embedder = _embedder(args)
    report = jsonable(evaluate(items, embedder, args.fid_real, progress=_bar(len(items), not args.no_progress)))
    print(format_table(_restore_inf(report)))
    if args.json:
        write_json(report, args.json)
    summary = {k: v for k, v in report.items() if k != "items"}
    print(dumps(summary))
    return 1 if report["failed"] else 0


def check_args(args: argparse.Namespace) -> None:
    """Inputs and the --json location, before any model loads."""
    apply_pixel_limit(args)
    path = Path(args.results)
    if not path.exists():
        raise CliError(f"{path}: no such results folder or manifest")
    if path.is_file() and path.suffix.lower() not in (".csv", ".tsv", ".jsonl", ".ndjson"):
        raise CliError(f"{path}: give a results folder or a .csv/.jsonl manifest of results")
    if args.fid_real:
        checks.input_dir(args.fid_real, "--fid-real")
    if args.clip_vision and not Path(args.clip_vision).is_dir():
        checks.input_file(args.clip_vision, "--clip-vision")
    if args.json:
        checks.output_file(args.json, "--json")


def _restore_inf(report: dict) -> dict:
    summary = {m: {k: (float(v) if v in ("inf", "-inf") else v) for k, v in s.items()}
               for m, s in report["summary"].items()}
    return dict(report, summary=summary)


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        # optional dependency: tqdm
        from tqdm import tqdm
    except ImportError:
        return None
    bar = tqdm(total=total, desc="eval", unit="image", file=sys.stderr, dynamic_ncols=True)

    def update(done: int) -> None:
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return update
