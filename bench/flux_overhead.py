"""Overhead of identifier confinement on Flux.1's joint attention (``bench/attention_overhead.py --model flux``).

Full-width Flux blocks (hidden 3072, 24 heads of 128, T5 width 4096, 512 text tokens) at reduced depth — 1 double
+ 1 single block by default: the ratio is per block, and a full model repeats these two shapes (19 + 38) — with
random weights, on diffusers' ``FluxTransformer2DModel``. Variants, interleaved so that drift hits all alike:

* ``unpatched``      diffusers' ``FluxAttnProcessor``, 512 text tokens;
* ``stream_only``    the same processor with the identifier-free stream appended (1024 text tokens, nothing
                     confined): what carrying the second stream alone costs;
* ``identifier``     productbg's processor, ``method="partition"`` (the default): the stream plus the confinement;
* ``identifier_mask`` the one-pass dense-mask formulation (``method="mask"``), for comparison.

Batch 1 (Flux dev / schnell sample one row per step; ``--batch 2`` runs CFG rows, negative first). The product
(an ellipse) covers about 20 % of the image, as in the UNet bench, with edge cells. Prints a table, then as its
LAST line one JSON object of median time ratios against ``unpatched`` (and CUDA peak-memory ratios on a GPU).

Usage: python bench/attention_overhead.py --model flux [--size 1024] [--repeats 3] [--device cpu] [--dtype fp32]
(On a CPU, 1024² is 4096 image tokens: each forward of the reduced model is tens of seconds.)
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from productbg.attention import IdentifierGuidance, IdentifierSpec, ProductMask
from productbg.attention.flux_processor import CALL_KEY, install_flux_processors
from productbg.attention.joint import JointCall, flux_token_grid

TEXT_LEN, T5_WIDTH, POOLED = 512, 4096, 768


def build_model(double: int, single: int, device: str, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=double, num_single_layers=single,
                                   attention_head_dim=128, num_attention_heads=24, joint_attention_dim=T5_WIDTH,
                                   pooled_projection_dim=POOLED, guidance_embeds=True,
                                   axes_dims_rope=(16, 56, 56)).to(device).eval()
    return model if dtype == torch.float32 else model.to(dtype)  # diffusers warns on any .to(dtype)


def product_mask(size: int) -> torch.Tensor:
    """An upright ellipse over ~20 % of the image (the UNet bench's box, rounded: a real product's outline cuts
    token cells, so there are edge cells that blend both views)."""
    y, x = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    inside = ((y - size * 0.52) / (size * 0.27)) ** 2 + ((x - size * 0.5) / (size * 0.235)) ** 2 <= 1
    return inside.float()[None]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["flux"], default="flux")
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels (tokens: (size/16)^2)")
    ap.add_argument("--batch", type=int, choices=[1, 2], default=1, help="2: CFG rows (negative, positive)")
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--no-mask", action="store_true", help="skip the dense-mask variant")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if cuda else "fp32")]
    model = build_model(args.double, args.single, args.device, dtype)
    default = dict(model.attn_processors)
    install_flux_processors(model)
    ours = dict(model.attn_processors)

    grid = flux_token_grid(args.size, args.size)
    n, b = grid[0] * grid[1], args.batch
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(b, n, 64, generator=g).to(args.device, dtype)
    context = torch.randn(b, TEXT_LEN, T5_WIDTH, generator=g).to(args.device, dtype)
    free = torch.randn(1, TEXT_LEN, T5_WIDTH, generator=g).to(args.device, dtype)
    pooled = torch.randn(b, POOLED, generator=g).to(args.device, dtype)
    txt_ids = torch.zeros(TEXT_LEN, 3, device=args.device)
    img_ids = torch.zeros(n, 3, device=args.device)
    img_ids[:, 1] = torch.arange(n, device=args.device) // grid[1]
    img_ids[:, 2] = torch.arange(n, device=args.device) % grid[1]
    spec = IdentifierSpec(tuple(range(5, 9)), context_length=TEXT_LEN, plain_context=free)
    identifier = IdentifierGuidance(spec, ProductMask(product_mask(args.size)), 1.0)
    chunks = (1, 0) if b == 2 else (0,)
    calls = {m: JointCall(identifier, grid, chunks, method=m) for m in ("partition", "mask")}
    extended = calls["partition"].extend_text(context)
    ids2 = JointCall.extend_ids(txt_ids)
    common = dict(hidden_states=latents, pooled_projections=pooled, img_ids=img_ids,
                  timestep=torch.full((b,), 0.5, device=args.device, dtype=dtype),
                  guidance=torch.full((b,), 3.5, device=args.device, dtype=dtype))
    variants = {
        "unpatched": (default, dict(encoder_hidden_states=context, txt_ids=txt_ids)),
        "stream_only": (default, dict(encoder_hidden_states=extended, txt_ids=ids2)),
        "identifier": (ours, dict(encoder_hidden_states=extended, txt_ids=ids2,
                                  joint_attention_kwargs={CALL_KEY: calls["partition"]})),
        "identifier_mask": (ours, dict(encoder_hidden_states=extended, txt_ids=ids2,
                                       joint_attention_kwargs={CALL_KEY: calls["mask"]})),
    }
    if args.no_mask:
        del variants["identifier_mask"]
    memory: dict[str, int] = {}

    def run(name: str) -> float:
        processors, kw = variants[name]
        model.set_attn_processor(dict(processors))
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.no_grad():
            model(**common, **kw)
        if cuda:
            torch.cuda.synchronize()
            memory[name] = torch.cuda.max_memory_allocated()
        seconds = time.perf_counter() - t0
        if not cuda:
            print(f"  {name}: {seconds:.2f} s", flush=True)
        return seconds

    for _ in range(args.warmup):
        for name in variants:
            run(name)
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name in variants:
            times[name].append(run(name))
    med = {name: statistics.median(t) for name, t in times.items()}
    plan = calls["partition"].plan(b, torch.device(args.device), dtype)
    print(f"Flux blocks, hidden 3072 / 24 heads: {args.double} double + {args.single} single, {args.size}² "
          f"({n} image + {TEXT_LEN} text tokens, +{TEXT_LEN} identifier-free), batch {b}, {args.device} "
          f"{str(dtype).removeprefix('torch.')}, {args.repeats} interleaved repeats")
    print(f"partition: {plan.full_count} image queries through the full stream, {plan.free_count} through the "
          f"identifier-free one ({int(plan.edge.sum())} edge cells in both) per row")
    print(f"{'variant':<18}{'median s':>10}{'ratio':>8}" + (f"{'peak mem ratio':>16}" if cuda else ""))
    for name in variants:
        line = f"{name:<18}{med[name]:>10.3f}{med[name] / med['unpatched']:>8.3f}"
        if cuda:
            line += f"{memory[name] / memory['unpatched']:>16.3f}"
        print(line)
    result = {name: round(med[name] / med["unpatched"], 4) for name in variants if name != "unpatched"}
    if cuda:
        result.update({f"{name}_peak_memory": round(memory[name] / memory["unpatched"], 4)
                       for name in variants if name != "unpatched"})
    result.update(model="flux", device=args.device, dtype=str(dtype).removeprefix("torch."), size=args.size,
                  batch=b, blocks=[args.double, args.single])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
