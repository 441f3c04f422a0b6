"""Category-list route benchmark: how long the ComfyUI category list waits for a 5,000-category bank.

Builds a bank of ``--categories`` categories (default 5,000; half Chinese, half Latin names, 4 vectors of 768
floats; ``--previews`` of them with a preview PNG beside it), then times ``nodes.bank_routes.bank_listing`` — the
work of ``GET /productbg/banks/categories`` (header read and checked, names, preview folder read) — with its cache
cleared before every call, so each call reads the file's header afresh (the file is in the page cache, as a bank
the server just listed is). It also reports the JSON encoding of the response and, for scale, the size of the file
against the bytes the listing reads (its header).

Bound: listing <= 200 ms. The last line printed is one JSON object; the exit status is 1 when the bound is missed.

Usage: ``python bench/bank_list.py [--categories 5000] [--previews 5000] [--repeats 15]``
"""
from __future__ import annotations

import argparse
import json
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

BOUND_MS = 200.0


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bank_scale import build

    from productbg.nodes import bank_routes
    from productbg.weights.bank_previews import encode_preview, previews_dir, preview_file_name

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--categories", type=int, default=5000)
    ap.add_argument("--previews", type=int, default=5000, help="categories given a preview PNG")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench_bank.safetensors"
        names = build(path, args.categories, 4, torch.float32)
        folder = previews_dir(path)
        folder.mkdir()
        png = encode_preview(torch.zeros(32, 32, 3, dtype=torch.uint8))
        for name in names[:args.previews]:
            (folder / preview_file_name(name)).write_bytes(png)
        times, encode = [], []
        for _ in range(args.repeats):
            bank_routes._CACHE.clear()
            t0 = time.perf_counter()
            listing = bank_routes.bank_listing(path, tmp)
            t1 = time.perf_counter()
            json.dumps(listing, ensure_ascii=False)
            t2 = time.perf_counter()
            times.append((t1 - t0) * 1000)
            encode.append((t2 - t1) * 1000)
        assert listing["categories"] == names and sum(listing["previews"]) == min(args.previews, len(names))
        with open(path, "rb") as fh:
            header_bytes = 8 + struct.unpack("<Q", fh.read(8))[0]
        file_bytes = path.stat().st_size
    listing_ms, json_ms = statistics.median(times), statistics.median(encode)
    print(f"{args.categories} categories ({args.previews} with previews): listing {listing_ms:.1f} ms median "
          f"(first {times[0]:.1f} ms, max {max(times):.1f} ms) against the {BOUND_MS:.0f} ms bound; JSON encoding "
          f"{json_ms:.1f} ms; reads the {header_bytes:,}-byte header of a {file_bytes:,}-byte file")
    ok = max(times) + json_ms <= BOUND_MS
    print(json.dumps({"categories": args.categories, "previews": args.previews, "listing_ms": round(listing_ms, 2),
                      "listing_max_ms": round(max(times), 2), "json_ms": round(json_ms, 2), "bound_ms": BOUND_MS,
                      "header_bytes": header_bytes, "file_bytes": file_bytes, "within_bound": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
