"""Batch generation over a manifest: resumable, atomic, sharded, never stopped by one bad row.

* resumable: an item whose ``result.json`` is complete is skipped (nothing redone); a killed run leaves only
  hidden temp files, removed when the item is run again;
* sharded: under ``accelerate launch`` / ``torchrun`` each process takes rows ``i mod WORLD_SIZE == RANK``;
* the models are loaded only when this shard has work left, so a finished batch re-runs in seconds;
* items are written on a background thread (PNG encoding overlaps the next item's sampling); an item counts
  as done when its ``result.json`` is on disk;
* a summary (done, skipped, failed with reasons, images/minute) is written as ``summary.json``
  (``summary.rank<r>-of-<w>.json`` per shard) and returned.
"""
from __future__ import annotations

import json
import sys
import time
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ..fileio import TMP_SUFFIX
from ..fileio.jsonfile import write_json
from .errors import PipelineError
from .manifest import Row, Shard
from .outputs import read_result, remove_stale_temps, write_item

PipelineFactory = Callable[[], Any]


@dataclass
class BatchSummary:
    """What a batch run did (JSON-ready through :meth:`to_json`)."""

    shard: Shard
    done: int = 0
    skipped: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)
    images: int = 0
    loop_seconds: float = 0.0
    load_seconds: float = 0.0
    total_seconds: float = 0.0

    @property
    def images_per_minute(self) -> float:
        """Images written per minute of the processing loop (model loading excluded, writing included)."""
        return 60.0 * self.images / self.loop_seconds if self.loop_seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        """The summary as a dict."""
        return {"done": self.done, "skipped": self.skipped, "failed": self.failed, "images": self.images,
                "images_per_minute": round(self.images_per_minute, 3),
                "seconds": round(self.total_seconds, 3), "load_seconds": round(self.load_seconds, 3),
                "rank": self.shard.index, "world_size": self.shard.count}


def summary_path(out: Path, shard: Shard) -> Path:
    """``summary.json`` for a single process, ``summary.rank<r>-of-<w>.json`` per shard otherwise."""
    return out / ("summary.json" if shard.count == 1 else f"summary.rank{shard.index}-of-{shard.count}.json")


class _Progress:
    """tqdm on stderr when available, else a plain line per item; silent when disabled."""

    def __init__(self, total: int, enabled: bool, label: str) -> None:
        self.bar = None
        self.enabled, self.count, self.total, self.label = enabled, 0, total, label
        if enabled:
            try:
                # optional dependency: tqdm
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=label, unit="item", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def step(self, status: str) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.set_postfix_str(status, refresh=False)
            self.bar.update(1)
        elif self.enabled:
            print(f"{self.label}: {self.count}/{self.total} {status}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Writer:
    """Writes finished items on a background thread, so PNG encoding overlaps the next item's sampling.

    At most ``depth`` items wait in memory; an item counts as done only once its ``result.json`` is written.
    With ``background=False`` items are written in the caller's thread.
    """

    def __init__(self, summary: BatchSummary, background: bool = True, depth: int = 2) -> None:
        self.summary, self.depth = summary, depth
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="productbg-writer") if background else None
        self.pending: deque = deque()

    def submit(self, row: Row, folder: Path, results: list, meta: dict[str, Any]) -> None:
        if self.pool is None:
            self._record(row, results, lambda: write_item(folder, results, meta))
            return
        self.pending.append((row, results, self.pool.submit(write_item, folder, results, meta)))
        while len(self.pending) > self.depth:
            self._collect()

    def _collect(self) -> None:
        row, results, future = self.pending.popleft()
        self._record(row, results, future.result)

    def _record(self, row: Row, results: list, wait: Callable[[], Any]) -> None:
        try:
            wait()
        except Exception as e:  # a full disk or a vanished folder fails this row only
            self.summary.failed.append(dict(row.describe(), reason=_reason(e)))
            return
        self.summary.done += 1
        self.summary.images += len(results)

    def close(self) -> None:
        while self.pending:
            self._collect()
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def run_batch(rows: Iterable[Row], out: str | Path, make_pipeline: PipelineFactory, shard: Shard = Shard(),
              progress: bool = True, settings_json: dict[str, Any] | None = None,
              background_writes: bool = True) -> BatchSummary:
    """Run this shard's rows of a manifest.

    Args:
        rows: every row of the manifest (``read_manifest``); this shard's part is taken here.
        out: output folder.
        make_pipeline: builds the pipeline; called once, only if some row needs generating.
        shard: which part of the manifest to run.
        progress: show a progress bar on stderr.
        settings_json: recorded in each ``result.json`` (model source, settings).
        background_writes: write items on a background thread (overlapping the next item's sampling).

    Returns:
        The :class:`BatchSummary` (also written to :func:`summary_path`).
    """
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_summary(out, shard)
    mine = shard.take(list(rows))
    summary = BatchSummary(shard)
    bar = _Progress(len(mine), progress, "batch" if shard.count == 1 else f"batch {shard.index}/{shard.count}")
    writer = _Writer(summary, background_writes)
    pipe, loop_start = None, None
    try:
        for row in mine:
            if row.error is not None:
                summary.failed.append(dict(row.describe(), reason=row.error))
                bar.step("bad row")
                continue
            if read_result(out / row.name) is not None:
                summary.skipped += 1
                bar.step("skipped")
                continue
            if pipe is None:
                t = time.perf_counter()
                pipe = make_pipeline()
                loop_start = time.perf_counter()
                summary.load_seconds = loop_start - t
            bar.step(_run_row(pipe, row, out, summary, writer, settings_json or {}))
    finally:
        writer.close()
        bar.close()
    end = time.perf_counter()
    summary.total_seconds = end - start
    summary.loop_seconds = end - loop_start if loop_start is not None else 0.0
    write_json(summary.to_json(), summary_path(out, shard))
    return summary


def _remove_stale_summary(out: Path, shard: Shard) -> None:
    """Delete the summary temp files a killed run of this shard left (other shards' files are theirs)."""
    for p in out.glob(f".{summary_path(out, shard).name}.*{TMP_SUFFIX}"):
        p.unlink(missing_ok=True)


def _run_row(pipe: Any, row: Row, out: Path, summary: BatchSummary, writer: _Writer, extra: dict[str, Any]) -> str:
    """Generate one row and hand it to the writer; a failure is recorded, never raised (except interrupts)."""
    folder = out / row.name
    try:
        remove_stale_temps(folder)
        results = pipe.generate(row.product, category=row.category, reference=row.reference, seed=row.seed, n=row.n)
    except Exception as e:  # one bad row must never stop the batch (OOM, unreadable image, unknown category)
        summary.failed.append(dict(row.describe(), reason=_reason(e)))
        _free_memory()
        return "failed"
    meta = dict(extra, name=row.name, line=row.line, product=str(row.product), category=row.category,
                reference=str(row.reference) if row.reference else None, seed=row.seed, n=row.n,
                shard=f"{summary.shard.index}/{summary.shard.count}")
    writer.submit(row, folder, results, meta)
    return "generated"


def _reason(e: Exception) -> str:
    if isinstance(e, (PipelineError, ValueError, OSError)):
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    where = traceback.extract_tb(e.__traceback__)[-1]
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (at {Path(where.filename).name}:{where.lineno})"


def _free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def merge_summaries(out: str | Path, count: int) -> dict[str, Any] | None:
    """Combine the per-shard summaries of ``count`` processes into ``summary.json`` once all exist.

    Returns the combined summary, or None while some shard has not finished.
    """
    out = Path(out)
    parts = []
    for index in range(count):
        try:
            parts.append(json.loads(summary_path(out, Shard(index, count)).read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return None
    merged = {"done": sum(p["done"] for p in parts), "skipped": sum(p["skipped"] for p in parts),
              "failed": [f for p in parts for f in p["failed"]], "images": sum(p["images"] for p in parts),
              "images_per_minute": round(sum(p["images_per_minute"] for p in parts), 3),  # shards run in parallel
              "seconds": max(p["seconds"] for p in parts), "world_size": count}
    write_json(merged, out / "summary.json")
    return merged
