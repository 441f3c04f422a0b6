"""Category-bank scale benchmark: load time and lookup time for a large bank.

Builds a bank of ``--categories`` categories (default 5,000; half Chinese, half Latin names, 4 vectors of
768 floats each), saves it, then measures on this machine:

* ``load_ms``: ``CategoryBank.load`` (header validation + memory map + name index), median of repeats
  (``first_load_ms``: the first load in the process); the file was just written, so it is in the page cache;
* ``lookup_ms``: ``bank.get(name)`` for an exact name, including reading its vectors, median;
* ``lookup_casefold_ms``: the same with the name in different letter case (Latin names);
* ``miss_ms``: an unknown name, including the "did you mean" suggestions.

Targets: load <= 200 ms and lookup <= 1 ms. The last line printed is one JSON object.

Usage: ``python bench/bank_scale.py [--categories 5000] [--vectors 4] [--dtype f32|f16]``
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from productbg.weights.bank import CategoryBank

HANZI = "鞋包帽衣裙裤袜表镜杯壶碗盘灯椅桌床柜箱伞笔本书画瓶罐盒刀勺筷锅茶酒奶糖果花草石木金银玉"
WORDS = ["running", "shoes", "leather", "bag", "coffee", "mug", "desk", "lamp", "wool", "scarf", "steel",
         "watch", "garden", "chair", "ceramic", "vase", "kids", "toy", "phone", "case", "yoga", "mat"]


def category_names(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct names, alternating Chinese and Latin."""
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < n:
        if len(names) % 2:
            names.add("".join(rng.choice(HANZI) for _ in range(rng.randint(2, 5))))
        else:
            names.add(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))).title() + f" {rng.randint(0, 99)}")
    return sorted(names)


def build(path: Path, n: int, vectors: int, dtype: torch.dtype) -> list[str]:
    """Write an ``n``-category bank to ``path``; return its names."""
    names = category_names(n)
    bank = CategoryBank(vectors_per_id=vectors, dtype=dtype, training={"dataset": "bench", "steps": 0})
    data = torch.randn(n, vectors, 768)
    for i, name in enumerate(names):
        bank.add(name, data[i])
    bank.save(path)
    return names


def median_ms(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--categories", type=int, default=5000)
    ap.add_argument("--vectors", type=int, default=4)
    ap.add_argument("--dtype", choices=["f32", "f16"], default="f32")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    dtype = torch.float32 if args.dtype == "f32" else torch.float16
    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bank.safetensors"
        t0 = time.perf_counter()
        names = build(path, args.categories, args.vectors, dtype)
        build_s = time.perf_counter() - t0
        size_mb = path.stat().st_size / 2**20

        def load_close() -> None:
            CategoryBank.load(path).close()

        first_load_ms = median_ms(load_close, 1)  # first open in this process (file in the page cache)
        load_ms = median_ms(load_close, args.repeats)
        with CategoryBank.load(path) as bank:
            exact = [rng.choice(names) for _ in range(1000)]
            latin = [n for n in names if n.isascii()]
            folded = [rng.choice(latin).swapcase() for _ in range(1000)]
            it_exact, it_folded = iter(exact), iter(folded)
            lookup_ms = median_ms(lambda: bank.get(next(it_exact)), len(exact))
            casefold_ms = median_ms(lambda: bank.get(next(it_folded)), len(folded))
            misses = [rng.choice(names)[:-1] + "#" for _ in range(50)]
            it_miss = iter(misses)
            miss_ms = median_ms(lambda: _miss(bank, next(it_miss)), len(misses))
    result = {
        "categories": args.categories, "vectors": args.vectors, "dtype": args.dtype,
        "file_mb": round(size_mb, 1), "build_s": round(build_s, 2),
        "first_load_ms": round(first_load_ms, 2), "load_ms": round(load_ms, 2), "lookup_ms": round(lookup_ms, 4),
        "lookup_casefold_ms": round(casefold_ms, 4), "miss_ms": round(miss_ms, 2),
        "load_target_ms": 200, "lookup_target_ms": 1,
        "load_ok": max(load_ms, first_load_ms) <= 200, "lookup_ok": lookup_ms <= 1 and casefold_ms <= 1,
    }
    print(f"{args.categories} categories x {args.vectors} vectors ({args.dtype}), file {size_mb:.1f} MiB, "
          f"built in {build_s:.2f} s")
    print(f"load   {load_ms:8.2f} ms  (target <= 200 ms, median of {args.repeats}; first load {first_load_ms:.2f} ms)")
    print(f"lookup {lookup_ms:8.4f} ms  exact, {casefold_ms:.4f} ms case-insensitive (target <= 1 ms, median of 1000)")
    print(f"miss   {miss_ms:8.2f} ms  unknown name incl. 'did you mean' suggestions (median of 50)")
    print(json.dumps(result))
    return 0


def _miss(bank: CategoryBank, name: str) -> None:
    try:
        bank.get(name)
    except KeyError:
        pass


if __name__ == "__main__":
    sys.exit(main())
