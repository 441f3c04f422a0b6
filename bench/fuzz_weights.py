"""Long fuzz run of every weight-file loader (banks, style encoders, LoRAs).

Mutates valid files (truncation, bit flips, header length and JSON rewrites, NaN/inf in data, duplicate keys,
metadata edits) and feeds each to its loader, using the result fully. Every case must either load into a
working object or raise ``WeightsError``. The last line printed is one JSON object.

Usage: ``python bench/fuzz_weights.py [--cases 10000] [--seed 0]``; exit status 1 if any case failed.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent / "tests"))  # the fuzzer is test-only code
from weight_fuzz import run_fuzz  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    def progress(case: int) -> None:
        if (case + 1) % 1000 == 0:
            print(f"  {case + 1} cases...", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        result = run_fuzz(args.cases, Path(tmp), seed=args.seed, on_case=progress)
    for case, kind, mutation, tb in result.failures[:5]:
        print(f"FAILURE case {case} ({kind}, {mutation}):\n{tb}")
    print(f"{result.cases} cases in {result.seconds:.1f} s: {result.loaded} loaded, {result.rejected} rejected "
          f"with WeightsError, {len(result.failures)} failures; slowest case {result.slowest_s * 1000:.0f} ms")
    print(json.dumps({"cases": result.cases, "loaded": result.loaded, "rejected": result.rejected,
                      "failures": len(result.failures), "seconds": round(result.seconds, 2),
                      "slowest_ms": round(result.slowest_s * 1000, 1), "seed": args.seed,
                      "by_mutation": result.by_mutation}))
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main())
