"""``productbg batch``: generate for every row of a CSV / JSONL manifest — resumable, atomic, sharded.

Manifest columns: product (required), category, reference, seed, n, name (output folder inside --out).
Relative image paths are relative to the manifest. Each item is written to OUT/<name>/ (images first,
result.json last), so a rerun skips finished items and redoes only unfinished ones. A bad row (missing image,
unknown category, unsafe name, ...) is reported in the summary and skipped. Under `accelerate launch` (or
torchrun) every process takes the rows i with i mod WORLD_SIZE == RANK.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..fileio.jsonfile import dumps
from ..pipeline.batch import merge_summaries, run_batch
from ..pipeline.errors import PipelineError
from ..pipeline.manifest import Shard, shard_from_env, read_manifest
from . import checks
from .errors import CliError
from .options import (add_model_options, add_settings_options, build_pipeline, check_generation, check_model_args,
                      describe_run, max_exports, max_images, settings_from_args)

EPILOG = """examples:
  productbg batch products.csv --out out/batch
  productbg batch products.csv --out out/batch --checkpoint demo   (the embedded toy model; BG-synth categories)
  productbg batch products.jsonl --out out/batch --checkpoint sd-v1-5-inpainting.safetensors --bank bank.safetensors
  accelerate launch --num_processes 4 -m productbg batch products.csv --out out/batch --checkpoint sd15-inpaint.safetensors

products.csv:
  product,category,reference,seed
  shoes/red.png,sneakers,,1
  mugs/white.png,kitchen,looks/brand.jpg,2

The last line printed is the summary JSON (also written to OUT/summary.json, or OUT/summary.rank<r>-of-<w>.json
per process; the last process to finish merges them into OUT/summary.json).
exit status: 0 every row done or skipped, 1 some rows failed (see "failed"), 2 usage or manifest error."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``batch``."""
    p = sub.add_parser("batch", help="generate for every row of a manifest (resumable, sharded)",
                       description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", help="CSV (.csv/.tsv, header row) or JSONL (.jsonl) manifest")
    p.add_argument("--out", required=True, help="output folder; nothing is written outside it")
    p.add_argument("--seed", type=checks.seed, default=0, help="seed for rows without one (default 0)")
    p.add_argument("--n", type=checks.integer(1, 64), default=1,
                   help="images per row without an 'n' column (default 1; at most 64 at 512², fewer above)")
    p.add_argument("--shard", metavar="I/N", help="run only part I of N (0-based; default: RANK/WORLD_SIZE from "
                   "the environment, else 0/1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_options(p)
    add_settings_options(p)
    p.set_defaults(func=run)


def _shard(text: str | None):
    if text is None:
        return shard_from_env()
    index, _, count = text.partition("/")
    try:
        return Shard(int(index), int(count))
    except (ValueError, PipelineError):
        raise CliError(f"--shard {text!r}: write I/N with 0 <= I < N, e.g. 0/2") from None


def run(args: argparse.Namespace) -> int:
    """Run the batch; print the summary JSON as the last line."""
    shard = _shard(args.shard)
    check_model_args(args)
    check_generation(args, args.n)
    checks.input_file(args.manifest, "manifest")
    checks.output_dir(args.out, "--out")
    settings = settings_from_args(args)
    w, h = settings.canvas()
    max_n = max(1, max_images(settings.size) if w == h else max_images(int((w * h) ** 0.5)))
    if settings.export is not None:
        max_n = min(max_n, max_exports(settings.export))
    rows = read_manifest(args.manifest, args.out, args.seed, args.n, max_n=max_n)
    if not args.tiny and not args.checkpoint:
        print("note: no --checkpoint: tiny random models (noise backgrounds)", file=sys.stderr)
    summary = run_batch(rows, Path(args.out), lambda: build_pipeline(args, quiet=True), shard,
                        progress=not args.no_progress, settings_json=describe_run(args))
    data = summary.to_json()
    if shard.count > 1:
        merge_summaries(args.out, shard.count)
    print(dumps(data))
    return 1 if data["failed"] else 0
