"""Overhead of productbg's attention on a full-size SD1.5 or SDXL UNet (random weights, diffusers, CPU or GPU).

SD1.5: latent 64×64 (512 px); SDXL (``--model sdxl``): latent 128×128 (1024 px), its 70 cross-attention
layers, 2048-wide context with pooled text embeds and added time ids. Batch 2 (CFG: uncond + cond), one UNet
forward per measurement. Variants, interleaved
so drift hits all of them alike: unpatched (diffusers' AttnProcessor2_0), identifier (mask-guided attention
of a 2-token identifier, strength 1, ``context`` confinement: a second, identifier-free context attended by
product cells), identifier_columns (the column-only ablation), identifier + style (plus 16 reference-style
tokens in every cross-attention layer).
Prints a table, then as its LAST line one JSON object of median time ratios and peak-memory ratios (on CPU the
live-tensor peak of the forward, without the weights, and beside it the same with the weights counted, as
CUDA's allocator peak counts them).

Usage: python bench/attention_overhead.py [--model sd15|sdxl] [--repeats 5] [--device cpu]
``--model flux``: Flux.1's joint attention instead (full-width double + single blocks, the identifier-free text
stream and its confinement vs unpatched, and "+ Redux": 729 Redux tokens appended to the text, identifier and
Redux confined vs the unpatched blocks on the same Redux-extended text; its own options: ``bench/flux_overhead.py``).
(``--model sdxl`` on a CPU: about 10 GiB of fp32 weights and minutes per forward; the column ablation is
skipped there unless ``--columns``, and time and peak memory come from the same forward — the live-tensor
tracker's per-op cost is far below 0.1 % of a multi-minute forward and hits every variant alike.)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from productbg import backbones
from productbg.attention import Guidance, IdentifierGuidance, IdentifierSpec, ProductMask, StyleGuidance
from productbg.attention.diffusers_processor import DiffusersCall, install_processors

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CONFIGS = {"sd15": ASSETS / "sd15" / "unet_config.json", "sdxl": ASSETS / "sdxl" / "unet_config.json"}


def build_unet(model: str, device: str):
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(json.loads(CONFIGS[model].read_text())).to(device).eval()
    default = {name: AttnProcessor2_0() for name in unet.attn_processors}
    install_processors(unet)
    ours = dict(unet.attn_processors)
    return unet, default, ours


def build_calls(b: backbones.Backbone, device: str):
    side = b.default_size
    latent = (side // 8, side // 8)
    width = b.context_dim
    mask = torch.zeros(1, side, side)
    mask[:, side // 4: side * 25 // 32, side * 5 // 16: side * 11 // 16] = 1
    product = ProductMask(mask)
    spec = IdentifierSpec((6, 7), plain_context=torch.randn(1, 77, width, device=device))
    identifier = IdentifierGuidance(spec, product, 1.0)
    columns = IdentifierGuidance(spec, product, 1.0, confinement="columns")
    kv = [(torch.nn.Linear(width, c, bias=False).to(device), torch.nn.Linear(width, c, bias=False).to(device))
          for c in b.hidden_sizes]
    tokens = torch.randn(1, 16, width, device=device)
    style = StyleGuidance(tokens, torch.zeros_like(tokens), lambda i, t: (kv[i][0](t), kv[i][1](t)), 1.0,
                          b.layer_weights("all"), product=product)
    g_id = Guidance().with_identifier(identifier)
    return {
        "identifier": DiffusersCall(g_id, latent_hw=latent),
        "identifier_columns": DiffusersCall(Guidance().with_identifier(columns), latent_hw=latent),
        "identifier_style": DiffusersCall(g_id.with_style(style), latent_hw=latent),
    }


def added_inputs(b: backbones.Backbone, device: str) -> dict | None:
    """SDXL's pooled text embeds and time ids (original size, crop top-left, target size) for batch 2."""
    if b.family != "sdxl":
        return None
    side = float(b.default_size)
    time_ids = torch.tensor([[side, side, 0.0, 0.0, side, side]] * 2, device=device)
    return {"text_embeds": torch.randn(2, 1280, device=device), "time_ids": time_ids}


def forward(unet, latents, context, call, added=None):
    kwargs = {"productbg": call} if call is not None else None
    with torch.no_grad():
        unet(latents, 500, context, cross_attention_kwargs=kwargs, added_cond_kwargs=added)
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
    argv = sys.argv[1:]
    if "--model=flux" in argv or any(a == "--model" and b == "flux" for a, b in zip(argv, argv[1:])):
        from flux_overhead import main as flux_main  # beside this script (on sys.path when run as one)
        return flux_main(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", choices=sorted(CONFIGS), default="sd15")
    ap.add_argument("--columns", action="store_true", help="also time the column ablation (default: sd15 only "
                    "on CPU, every model on CUDA)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 1; 0 for sdxl on CPU)")
    args = ap.parse_args()
    b = backbones.backbone(args.model)
    slow = args.model == "sdxl" and not args.device.startswith("cuda")
    unet, default, ours = build_unet(args.model, args.device)
    calls = build_calls(b, args.device)
    side = b.default_size // 8
    latents = torch.randn(2, 4, side, side, device=args.device)
    context = torch.randn(2, 77, b.context_dim, device=args.device)
    added = added_inputs(b, args.device)
    variants = {"unpatched": (default, None), "identifier": (ours, calls["identifier"]),
                "identifier_columns": (ours, calls["identifier_columns"]),
                "identifier_style": (ours, calls["identifier_style"])}
    if slow and not args.columns:
        del variants["identifier_columns"]

    memory: dict[str, int] = {}

    def run(name):
        processors, call = variants[name]
        unet.set_attn_processor(dict(processors))
        t0 = time.perf_counter()
        if slow:
            memory[name] = max(memory.get(name, 0),
                               peak_memory(lambda: forward(unet, latents, context, call, added), args.device))
        else:
            forward(unet, latents, context, call, added)
        seconds = time.perf_counter() - t0
        if slow:
            print(f"  {name}: {seconds:.1f} s, peak {memory[name] / 2 ** 30:.3f} GiB", flush=True)
        return seconds

    for _ in range(args.warmup if args.warmup is not None else (0 if slow else 1)):
        for name in variants:  # warm-up (allocations, caches of mask grids and style K/V)
            run(name)
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name in variants:
            times[name].append(run(name))
    for name, (processors, call) in variants.items():
        if slow:
            break
        unet.set_attn_processor(dict(processors))
        memory[name] = peak_memory(lambda: forward(unet, latents, context, call, added), args.device)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"{b.label} UNet ({b.num_layers} cross-attention layers), latent 2x4x{side}x{side}, {args.device}, "
          f"{args.repeats} interleaved repeats")
    print(f"{'variant':<18}{'median s':>10}{'ratio':>8}{'peak mem ratio':>16}")
    for name in variants:
        print(f"{name:<18}{med[name]:>10.3f}{med[name] / med['unpatched']:>8.3f}"
              f"{memory[name] / memory['unpatched']:>16.3f}")
    measured = [name for name in variants if name != "unpatched"]
    result = {name: round(med[name] / med["unpatched"], 4) for name in measured}
    result.update({f"{name}_peak_memory": round(memory[name] / memory["unpatched"], 4) for name in measured})
    if not args.device.startswith("cuda"):  # CUDA's allocator peak includes the weights; the CPU tracker does not
        weights = sum(p.numel() * p.element_size() for p in unet.parameters())
        result.update({f"{name}_peak_memory_with_weights": round((memory[name] + weights) /
                                                                 (memory["unpatched"] + weights), 4)
                       for name in measured})
    result["model"], result["device"] = args.model, args.device
    print(json.dumps(result))


if __name__ == "__main__":
    main()
