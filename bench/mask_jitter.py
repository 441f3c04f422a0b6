"""Cost of the trainers' mask jitter: batched on-device max filters versus the former per-sample max-pool.

The former ``jitter_masks`` ran one square ``max_pool2d`` per sample (kernels up to 2·r+1 = 41 at 512² with the
default jitter) on the CPU; the current one max-filters the whole batch once per bit of the radii, with
separable 1-D pools, on the mask's device. Both get the same masks and seeds; results are checked equal.
Runs alternate so machine drift hits both alike. Prints one JSON line: median seconds per batch and the ratio.

Usage: python bench/mask_jitter.py [--size 512] [--batch 8] [--repeats 5] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from productbg.training.diffusion import jitter_masks

JITTER = (-0.04, 0.02)  # the trainers' default


def former_jitter(mask: torch.Tensor, generator: torch.Generator, jitter: tuple[float, float]) -> torch.Tensor:
    """The former implementation (as the trainer called it: on a CPU copy of the masks)."""
    radii = torch.empty(mask.shape[0]).uniform_(jitter[0], jitter[1], generator=generator)
    out = []
    for m, r in zip(mask.cpu(), (radii * mask.shape[-1]).round().long().tolist()):
        k, p = 2 * abs(r) + 1, abs(r)
        m = m[None]
        out.append(m if r == 0 else F.max_pool2d(m, k, 1, p) if r > 0 else 1 - F.max_pool2d(1 - m, k, 1, p))
    return torch.cat(out).to(mask.device)


def _timed(fn, masks: torch.Tensor, seed: int) -> tuple[float, torch.Tensor]:
    if masks.is_cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn(masks, torch.Generator().manual_seed(seed), JITTER)
    if masks.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def measure(size: int = 512, batch: int = 8, repeats: int = 5, device: str = "cpu") -> dict:
    """Median seconds per batch of the former and current jitter, and former / current."""
    g = torch.Generator().manual_seed(0)
    masks = F.interpolate((torch.rand(batch, 1, 16, 16, generator=g) > 0.5).float(), size=(size, size)).to(device)
    old, new = [], []
    for seed in range(repeats):
        t_old, a = _timed(former_jitter, masks, seed)
        t_new, b = _timed(jitter_masks, masks, seed)
        if not torch.equal(a, b):
            raise AssertionError(f"seed {seed}: batched jitter differs from the per-sample max-pool")
        old.append(t_old)
        new.append(t_new)
    o, n = statistics.median(old), statistics.median(new)
    return {"bench": "mask_jitter", "size": size, "batch": batch, "device": device, "former_s": round(o, 4),
            "batched_s": round(n, 4), "speedup": round(o / n, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    print(json.dumps(measure(a.size, a.batch, a.repeats, a.device)))


if __name__ == "__main__":
    main()
