"""Train the embedded demo model from nothing and pack it into assets/demo_model (see training/demo_model.py).

    python scripts/train_demo_model.py                       # the shipped recipe (≈40 min on 2 CPU cores)
    python scripts/train_demo_model.py --work /tmp/demo-work --scale 0.01 --out /tmp/demo-model   # smoke run
    python scripts/train_demo_model.py --cg-steps 4200 --work /tmp/w4200 --out /tmp/demo-4200   # a variant
    python bench/toy_paper_table.py --model /tmp/demo-4200                                     # ... measured

Every stage resumes from its last checkpoint when the command is run again with the same --work folder.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "out" / "demo-model-work", help="stage outputs (resumable)")
    p.add_argument("--out", type=Path, default=ROOT / "assets" / "demo_model", help="the packed model folder")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every stage's step count (smoke runs)")
    p.add_argument("--cg-steps", type=int, help="CG stage steps (default: the shipped recipe's); give a variant its "
                   "own --work folder")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    import torch

    from productbg.training.demo_model import Recipe, train

    torch.set_num_threads(args.threads)
    recipe = Recipe(scale=args.scale)
    if args.cg_steps:
        recipe = replace(recipe, cg_steps=args.cg_steps)
    record = train(args.work, args.out, recipe, progress=not args.no_progress)
    print(json.dumps({"out": str(args.out), "seconds": record["seconds"], "total_bytes": record["total_bytes"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
