"""Overhead of identifier and Redux confinement on Flux.1's joint attention (``bench/attention_overhead.py --model
flux``).

Full-width Flux blocks (hidden 3072, 24 heads of 128, T5 width 4096, 512 text tokens) at reduced depth — 1 double
+ 1 single block by default: the ratio is per block, and a full model repeats these two shapes (19 + 38) — with
random weights, on diffusers' ``FluxTransformer2DModel``. Variants, interleaved so that drift hits all alike:

* ``unpatched``      diffusers' ``FluxAttnProcessor``, 512 text tokens;
* ``stream_only``    the same processor with the identifier-free stream appended (1024 text tokens, nothing
                     confined): what carrying the second stream alone costs;
* ``identifier``     productbg's processor, ``method="partition"`` (the default): the stream plus the confinement;
* ``identifier_mask`` the one-pass dense-mask formulation (``method="mask"``), for comparison;
* ``unpatched_redux``  diffusers' processor on a Redux-extended text: 512 T5 + 729 Redux tokens (SigLIP-384 after
                     the Redux projection), what a Redux reference costs without productbg — the baseline of:
* ``stream_only_redux`` the same processor with the free stream appended (512 tokens: the identifier-free prompt
                     without the Redux tokens; 1241 + 512 text tokens, nothing confined);
* ``redux``          productbg's processor confining the identifier and the Redux tokens (``JointCall(identifier,
                     grid, style=ReduxStyle(729))``, partition): Reference Style + Category Prompt on Flux.

Batch 1 (Flux dev / schnell sample one row per step; ``--batch 2`` runs CFG rows, negative first). The product
(an ellipse) covers about 20 % of the image, as in the UNet bench, with edge cells. Prints a table, then as its
LAST line one JSON object of median time ratios against ``unpatched`` — the Redux variants against
``unpatched_redux`` — (and CUDA peak-memory ratios on a GPU; on a CPU also ratios of median process CPU time,
``*_cpu``, which other processes on a shared machine disturb less than wall time).

Usage: python bench/attention_overhead.py --model flux [--size 1024] [--repeats 3] [--device cpu] [--dtype fp32]
       [--no-mask] [--no-redux] [--redux-tokens 729] [--threads N]
(On a CPU, 1024² is 4096 image tokens: each forward of the reduced model is tens of seconds.)
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from productbg.attention import IdentifierGuidance, IdentifierSpec, ProductMask
from productbg.attention.flux_processor import CALL_KEY, confined_inputs, install_flux_processors
from productbg.attention.joint import JointCall, ReduxStyle, flux_token_grid

TEXT_LEN, T5_WIDTH, POOLED, REDUX_TOKENS = 512, 4096, 768, 729


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
    ap.add_argument("--no-redux", action="store_true", help="skip the Redux variants")
    ap.add_argument("--redux-tokens", type=int, default=REDUX_TOKENS, help="Redux tokens appended to the text")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads); 1 makes the "
                    "process CPU time a count of work on a shared machine (no threads spinning at barriers)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
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
    r = args.redux_tokens
    redux_context = torch.cat([context, torch.randn(b, r, T5_WIDTH, generator=g).to(args.device, dtype)], 1)
    redux_ids = torch.zeros(TEXT_LEN + r, 3, device=args.device)
    redux_call = JointCall(identifier, grid, chunks, style=ReduxStyle(r))
    redux_inputs = confined_inputs(redux_call, redux_context, redux_ids)
    if not args.no_redux:
        variants.update({
            "unpatched_redux": (default, dict(encoder_hidden_states=redux_context, txt_ids=redux_ids)),
            "stream_only_redux": (default, dict(encoder_hidden_states=redux_inputs["encoder_hidden_states"],
                                                txt_ids=redux_inputs["txt_ids"])),
            "redux": (ours, redux_inputs),
        })
    baseline = {name: "unpatched_redux" if name.endswith("redux") else "unpatched" for name in variants}
    memory: dict[str, int] = {}
    cpu_times: dict[str, list[float]] = {}

    def run(name: str) -> float:
        processors, kw = variants[name]
        model.set_attn_processor(dict(processors))
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            model(**common, **kw)
        if cuda:
            torch.cuda.synchronize()
            memory[name] = torch.cuda.max_memory_allocated()
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        if not cuda:
            cpu_times.setdefault(name, []).append(cpu_seconds)
            print(f"  {name}: {seconds:.2f} s ({cpu_seconds:.2f} s of process CPU time)", flush=True)
        return seconds

    for _ in range(args.warmup):
        for name in variants:
            run(name)
    times = {name: [] for name in variants}
    cpu_times.clear()  # the warm-up's left out
    for _ in range(args.repeats):
        for name in variants:
            times[name].append(run(name))
    med = {name: statistics.median(t) for name, t in times.items()}
    cpu_med = {name: statistics.median(t) for name, t in cpu_times.items() if t}
    plan = calls["partition"].plan(b, torch.device(args.device), dtype)
    print(f"Flux blocks, hidden 3072 / 24 heads: {args.double} double + {args.single} single, {args.size}² "
          f"({n} image + {TEXT_LEN} text tokens, +{TEXT_LEN} identifier-free), batch {b}, {args.device} "
          f"{str(dtype).removeprefix('torch.')}, {args.repeats} interleaved repeats"
          + ("" if cuda else f", {torch.get_num_threads()} threads"))
    print(f"partition: {plan.full_count} image queries through the full stream, {plan.free_count} through the "
          f"identifier-free one ({int(plan.edge.sum())} edge cells in both) per row")
    if not args.no_redux:
        rplan = redux_call.plan(b, torch.device(args.device), dtype)
        print(f"redux: text {TEXT_LEN} + {r} Redux tokens, free stream {rplan.free_len}; {rplan.full_count} image "
              f"queries through the full stream, {rplan.free_count} through the free one per row")
    print(f"{'variant':<20}{'median s':>10}{'ratio':>8}{'  against':<18}"
          + (f"{'peak mem ratio':>16}" if cuda else f"{'CPU s':>9}{'CPU ratio':>11}"))
    for name in variants:
        base = baseline[name]
        line = f"{name:<20}{med[name]:>10.3f}{med[name] / med[base]:>8.3f}  {base:<16}"
        if cuda:
            line += f"{memory[name] / memory[base]:>16.3f}"
        else:
            line += f"{cpu_med[name]:>9.2f}{cpu_med[name] / cpu_med[base]:>11.3f}"
        print(line)
    measured = [name for name in variants if name not in ("unpatched", "unpatched_redux")]
    result = {name: round(med[name] / med[baseline[name]], 4) for name in measured}
    if "unpatched_redux" in variants:
        result["unpatched_redux_vs_unpatched"] = round(med["unpatched_redux"] / med["unpatched"], 4)
    if cuda:
        result.update({f"{name}_peak_memory": round(memory[name] / memory[baseline[name]], 4) for name in measured})
    else:  # process CPU time: less sensitive than wall time to other processes on a shared machine
        result.update({f"{name}_cpu": round(cpu_med[name] / cpu_med[baseline[name]], 4) for name in measured})
    result.update(model="flux", device=args.device, dtype=str(dtype).removeprefix("torch."), size=args.size,
                  batch=b, blocks=[args.double, args.single], redux_tokens=0 if args.no_redux else r,
                  threads=None if cuda else torch.get_num_threads())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
