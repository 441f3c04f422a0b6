"""Overhead of productbg's attention on a full-size SD1.5 UNet (random weights, diffusers, CPU or GPU).

Latent 64×64 (512 px), batch 2 (CFG: uncond + cond), one UNet forward per measurement. Variants, interleaved
so drift hits all of them alike: unpatched (diffusers' AttnProcessor2_0), identifier (mask-guided attention
of a 2-token identifier, strength 1, ``context`` confinement: a second, identifier-free context attended by
product cells), identifier_columns (the column-only ablation), identifier + style (plus 16 reference-style
tokens in all 16 layers).
Prints a table, then as its LAST line one JSON object of median time ratios and peak-memory ratios.

Usage: python bench/attention_overhead.py [--repeats 5] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from productbg.attention import Guidance, IdentifierGuidance, IdentifierSpec, ProductMask, StyleGuidance
from productbg.attention.diffusers_processor import DiffusersCall, install_processors

CONFIG = Path(__file__).resolve().parent.parent / "assets" / "sd15" / "unet_config.json"
SD15_HIDDEN = (320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280)


def build_unet(device: str):
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(json.loads(CONFIG.read_text())).to(device).eval()
    default = {name: AttnProcessor2_0() for name in unet.attn_processors}
    install_processors(unet)
    ours = dict(unet.attn_processors)
    return unet, default, ours


def build_calls(device: str):
    mask = torch.zeros(1, 512, 512)
    mask[:, 128:400, 160:352] = 1
    product = ProductMask(mask)
    spec = IdentifierSpec((6, 7), plain_context=torch.randn(1, 77, 768, device=device))
    identifier = IdentifierGuidance(spec, product, 1.0)
    columns = IdentifierGuidance(spec, product, 1.0, confinement="columns")
    kv = [(torch.nn.Linear(768, c, bias=False).to(device), torch.nn.Linear(768, c, bias=False).to(device))
          for c in SD15_HIDDEN]
    tokens = torch.randn(1, 16, 768, device=device)
    style = StyleGuidance(tokens, torch.zeros_like(tokens), lambda i, t: (kv[i][0](t), kv[i][1](t)), 1.0,
                          product=product)
    g_id = Guidance().with_identifier(identifier)
    return {
        "identifier": DiffusersCall(g_id, latent_hw=(64, 64)),
        "identifier_columns": DiffusersCall(Guidance().with_identifier(columns), latent_hw=(64, 64)),
        "identifier_style": DiffusersCall(g_id.with_style(style), latent_hw=(64, 64)),
    }


def forward(unet, latents, context, call):
    kwargs = {"productbg": call} if call is not None else None
    with torch.no_grad():
        unet(latents, 500, context, cross_attention_kwargs=kwargs)
    if latents.is_cuda:
        torch.cuda.synchronize()


class _LiveTensorPeak(TorchDispatchMode):
    """Approximate peak of live tensor bytes on CPU (where torch has no allocator statistics)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _release(self, ptr: int, nbytes: int) -> None:
        self.seen.discard(ptr)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                ptr, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
                if nbytes and ptr not in self.seen:
                    self.seen.add(ptr)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._release, ptr, nbytes)
        return out


def peak_memory(fn, device: str) -> int:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        fn()
        return torch.cuda.max_memory_allocated()
    with _LiveTensorPeak() as tracker:
        fn()
    return max(tracker.peak, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    unet, default, ours = build_unet(args.device)
    calls = build_calls(args.device)
    latents = torch.randn(2, 4, 64, 64, device=args.device)
    context = torch.randn(2, 77, 768, device=args.device)
    variants = {"unpatched": (default, None), "identifier": (ours, calls["identifier"]),
                "identifier_columns": (ours, calls["identifier_columns"]),
                "identifier_style": (ours, calls["identifier_style"])}

    def run(name):
        processors, call = variants[name]
        unet.set_attn_processor(dict(processors))
        t0 = time.perf_counter()
        forward(unet, latents, context, call)
        return time.perf_counter() - t0

    for name in variants:  # warm-up (allocations, caches of mask grids and style K/V)
        run(name)
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name in variants:
            times[name].append(run(name))
    memory = {}
    for name, (processors, call) in variants.items():
        unet.set_attn_processor(dict(processors))
        memory[name] = peak_memory(lambda: forward(unet, latents, context, call), args.device)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"SD1.5 UNet, latent 2x4x64x64, {args.device}, {args.repeats} interleaved repeats")
    print(f"{'variant':<18}{'median s':>10}{'ratio':>8}{'peak mem ratio':>16}")
    for name in variants:
        print(f"{name:<18}{med[name]:>10.3f}{med[name] / med['unpatched']:>8.3f}"
              f"{memory[name] / memory['unpatched']:>16.3f}")
    measured = ("identifier", "identifier_columns", "identifier_style")
    result = {name: round(med[name] / med["unpatched"], 4) for name in measured}
    result.update({f"{name}_peak_memory": round(memory[name] / memory["unpatched"], 4) for name in measured})
    result["device"] = args.device
    print(json.dumps(result))


if __name__ == "__main__":
    main()
