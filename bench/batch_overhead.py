"""Orchestration overhead of ``productbg batch`` against a bare loop over the same items (tiny model).

Both run in this process on one pipeline built once (the batch command's model factory is pointed at it), so
they differ only in what ``productbg batch`` adds: manifest parsing, resume checks, atomic PNG/JSON writes,
progress bar and summary. Repetitions alternate bare / batch, each going first every other time (fresh output folder each time). Every item is
timed in both: in the bare loop its ``generate`` call, in the batch the time from the end of the previous
item's ``generate`` to the end of its own (so all the batch's bookkeeping is charged to some item; start-up
and summary go to the first and last). On a shared machine single runs are noisy, so each item keeps its
fastest time over the repetitions, and

    overhead = Σ fastest batch item times / Σ fastest bare item times − 1     (images/minute ratio − 1)

``orchestration_share`` is measured inside each batch run alone (median): the part of its time outside
``pipeline.generate`` calls (the batch's own bookkeeping; background PNG writes that overlap a ``generate`` call
are counted in the per-item times above, not here). ``overhead_median_runs`` is the plain ratio of median whole-run rates, for reference.

Clock: by default the process's CPU time (user + system, all threads), so images per CPU-minute — on a machine
shared with other jobs, wall time swings several-fold between runs while CPU time does not, and every cost
``productbg batch`` adds (PNG encoding, JSON, file system calls) is CPU work of this process. Torch runs one
thread under this clock (waiting OpenMP threads spin and would bill CPU time for the machine's load). On a dedicated
machine ``--clock wall`` measures wall-clock images/minute the same way.

    python bench/batch_overhead.py [--items 6] [--size 256] [--steps 20] [--reps 3] [--clock cpu|wall]

The last line printed is one JSON object; ``pass`` is overhead ≤ 3 %.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LIMIT = 0.03
CLOCK = time.process_time  # CPU seconds of this process (all threads); --clock wall for wall-clock seconds
COLOURS = [(0.9, 0.1, 0.1), (0.1, 0.7, 0.2), (0.2, 0.2, 0.9), (0.8, 0.7, 0.1), (0.6, 0.1, 0.7), (0.1, 0.6, 0.7)]


class TimedPipeline:
    """Forwards ``generate`` to a pipeline and records (start, end) of every call."""

    def __init__(self, pipe) -> None:
        self.pipe, self.calls = pipe, []

    def generate(self, *args, **kwargs):
        t = CLOCK()
        try:
            return self.pipe.generate(*args, **kwargs)
        finally:
            self.calls.append((t, CLOCK()))


def make_items(folder: Path, count: int) -> Path:
    """``count`` synthetic packshots and a CSV manifest (categories alternate) in ``folder``."""
    from productbg.imaging.synthetic import packshot
    from productbg.fileio.png import save_png

    lines = ["product,category,seed"]
    for i in range(count):
        save_png(packshot(96, product_rgb=COLOURS[i % len(COLOURS)]).image, folder / f"p{i}.png")
        lines.append(f"p{i}.png,{'shoes' if i % 2 else 'kitchen'},{i}")
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return folder / "manifest.csv"


def bare_loop(pipe, rows) -> list[float]:
    """Seconds of each row's plain ``pipe.generate`` call."""
    times = []
    for row in rows:
        t = CLOCK()
        pipe.generate(row.product, category=row.category, reference=row.reference, seed=row.seed, n=row.n)
        times.append(CLOCK() - t)
    return times


def batch_command(timed: TimedPipeline, manifest: Path, out: Path, size: int, steps: int) -> tuple[list[float], float]:
    """Per-item seconds of ``productbg batch`` on the manifest (see the module docstring), and the share of its
    wall time spent outside ``generate``."""
    from productbg import cli
    from productbg.cli import options

    timed.calls = []
    original = options.build_pipeline
    options.build_pipeline = lambda args, quiet=False: timed
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            start = CLOCK()
            code = cli.main(["batch", str(manifest), "--out", str(out), "--size", str(size), "--steps", str(steps)])
            end = CLOCK()
    finally:
        options.build_pipeline = original
    if code != 0:
        raise SystemExit(f"productbg batch exited {code}")
    ends = [start] + [e for _, e in timed.calls]
    items = [b - a for a, b in zip(ends, ends[1:])]
    items[-1] += end - ends[-1]
    inside = sum(e - s for s, e in timed.calls)
    return items, (end - start - inside) / (end - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=6)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.clock == "cpu":
        import torch

        torch.set_num_threads(1)  # idle OpenMP threads spin and bill CPU time when the machine is busy

    from productbg.pipeline.manifest import read_manifest
    from productbg.pipeline.pipeline import GenerateSettings, ProductBGPipeline

    pipe = ProductBGPipeline.tiny(style=False, settings=GenerateSettings(size=args.size, steps=args.steps))
    timed = TimedPipeline(pipe)
    with tempfile.TemporaryDirectory(prefix="productbg-bench-") as tmp:
        manifest = make_items(Path(tmp), args.items)
        rows = read_manifest(manifest, Path(tmp) / "unused")
        bare_loop(pipe, rows[:1])                                     # warm-up
        bare_runs, batch_runs, shares = [], [], []
        for rep in range(args.reps):
            if rep % 2:                                                # alternate which goes first
                items, share = batch_command(timed, manifest, Path(tmp) / f"out{rep}", args.size, args.steps)
                bare_runs.append(bare_loop(pipe, rows))
            else:
                bare_runs.append(bare_loop(pipe, rows))
                items, share = batch_command(timed, manifest, Path(tmp) / f"out{rep}", args.size, args.steps)
            batch_runs.append(items)
            shares.append(share)
            print(f"rep {rep}: bare {60 * len(rows) / sum(bare_runs[-1]):.1f} img/min, batch "
                  f"{60 * len(rows) / sum(items):.1f} img/min, orchestration share {share:.2%}", file=sys.stderr)
    bare_best = sum(min(run[i] for run in bare_runs) for i in range(len(rows)))
    batch_best = sum(min(run[i] for run in batch_runs) for i in range(len(rows)))
    bare_rate, batch_rate = 60 * len(rows) / bare_best, 60 * len(rows) / batch_best
    median_ratio = statistics.median(sum(b) for b in batch_runs) / statistics.median(sum(b) for b in bare_runs)
    result = {"bench": "batch_overhead", "items": args.items, "size": args.size, "steps": args.steps,
              "reps": args.reps, "clock": args.clock, "device": str(pipe.device),
              "bare_images_per_minute": round(bare_rate, 3), "batch_images_per_minute": round(batch_rate, 3),
              "overhead": round(bare_rate / batch_rate - 1, 4),
              "overhead_median_runs": round(median_ratio - 1, 4),
              "orchestration_share": round(statistics.median(shares), 4), "limit": LIMIT}
    result["pass"] = result["overhead"] <= LIMIT
    print(f"productbg batch vs bare loop: {result['batch_images_per_minute']} vs {result['bare_images_per_minute']} "
          f"images/min, overhead {result['overhead']:+.2%} (orchestration share {result['orchestration_share']:.2%})")
    print(json.dumps(result))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
