"""``productbg demo``: the identifier patch on the tiny built-in pipeline, saved with its attention maps.

The tiny pipeline has random weights (no Stable Diffusion weights can be bundled), so the generated background
is noise; what the demo shows is the mechanism: a category identifier in the prompt, the mask-guided attention
keeping it off the product in every cross-attention layer, and the product pasted back unchanged.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CELL = 128


def _product(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A bottle-like product (image [3,H,W] in 0..1, mask [H,W]) centred on a grey canvas."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    body = ((xx / 0.32) ** 2 + ((yy - 0.2) / 0.55) ** 2) <= 1
    neck = (xx.abs() <= 0.1) & (yy >= -0.75) & (yy <= -0.2)
    mask = (body | neck).float()
    image = torch.full((3, size, size), 0.5)
    colour = torch.tensor([0.85, 0.25, 0.2])[:, None, None]
    return image * (1 - mask) + colour * (0.6 + 0.4 * (1 - yy.abs())) * mask, mask


def run_demo(steps: int = 8, size: int = 64, seed: int = 0) -> dict:
    """Sample on the tiny pipeline with a 2-vector identifier confined to the background.

    Returns:
        dict with ``product``, ``mask``, ``generated`` (before paste-back), ``composite`` and ``maps``
        (layer index → [h, w] identifier attention mass at the last step).
    """
    from diffusers import DDIMScheduler

    from .attention import Guidance, IdentifierGuidance, ProductMask, probe
    from .attention.diffusers_processor import DiffusersCall, install_processors
    from .pipeline.text import (DEFAULT_TEMPLATE, clip_tokenizer, identifier_prompt, install_identifiers,
                                tokenize_with_identifier)
    from .pipeline.tiny import tiny_text_encoder, tiny_unet, tiny_vae

    torch.manual_seed(seed)
    tok, text_encoder, unet, vae = clip_tokenizer(), tiny_text_encoder(), tiny_unet(), tiny_vae()
    vocab = install_identifiers(tok, text_encoder, torch.randn(1, 2, text_encoder.config.hidden_size))
    prompt = identifier_prompt(DEFAULT_TEMPLATE, vocab.words(0))
    ids, spec = tokenize_with_identifier(tok, prompt, vocab.token_ids[0])
    empty = tok("", padding="max_length", max_length=77, return_tensors="pt").input_ids
    product, mask = _product(size)
    latent_hw = (size // 8, size // 8)
    guidance = Guidance().with_identifier(IdentifierGuidance(spec, ProductMask(mask), strength=1.0))
    call = DiffusersCall(guidance, latent_hw=latent_hw, cond_or_uncond=(1, 0))
    install_processors(unet)
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        context = torch.cat([text_encoder(empty).last_hidden_state, text_encoder(ids).last_hidden_state])
        latents = torch.randn(1, 4, *latent_hw)
        for i, t in enumerate(scheduler.timesteps):
            last = i == len(scheduler.timesteps) - 1
            with probe.record(keep_maps=last) as rec:
                noise = unet(torch.cat([latents] * 2), t, context, cross_attention_kwargs={"productbg": call}).sample
            uncond, cond = noise.chunk(2)
            latents = scheduler.step(uncond + 7.5 * (cond - uncond), t, latents).prev_sample
        generated = (vae.decode(latents).sample[0].clamp(-1, 1) + 1) / 2
    composite = generated * (1 - mask) + product * mask
    maps = {}
    for r in rec.identifier:
        h = w = int(r.grid_tokens ** 0.5)
        maps.setdefault(r.layer_index, r.mass_map[0].view(h, w))
    return {"product": product, "mask": mask, "generated": generated, "composite": composite, "maps": maps}


def _tile(t: torch.Tensor) -> Image.Image:
    if t.ndim == 2:
        t = t / t.max().clamp_min(1e-8)
        t = torch.stack([t, t * 0.6, 1 - t])  # mass → warm, none → blue
    arr = (t.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    return Image.fromarray(arr).resize((CELL, CELL), Image.NEAREST)


def contact_sheet(result: dict) -> Image.Image:
    tiles = [_tile(result["product"]), _tile(result["mask"].expand(3, -1, -1)), _tile(result["generated"]),
             _tile(result["composite"])] + [_tile(m) for _, m in sorted(result["maps"].items())]
    sheet = Image.new("RGB", (CELL * len(tiles), CELL), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, (i * CELL, 0))
    return sheet


def save_atomic(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _cmd(args: argparse.Namespace) -> int:
    result = run_demo(steps=args.steps, seed=args.seed)
    out = Path(args.out)
    save_atomic(contact_sheet(result), out)
    product_mass = max(float(m[result_mask(result, m.shape)].max()) if result_mask(result, m.shape).any() else 0.0
                       for m in result["maps"].values())
    print(f"wrote {out}: product | mask | generated | pasted back | identifier attention in "
          f"{len(result['maps'])} layers (max identifier mass on product cells: {product_mass:.1e})")
    return 0


def result_mask(result: dict, shape: torch.Size) -> torch.Tensor:
    """The product cells of a layer grid (coverage ≥ 0.5), for reporting."""
    from .attention import product_coverage

    return (product_coverage(result["mask"], tuple(shape)) >= 0.5).view(shape)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="render the identifier patch on the tiny built-in pipeline",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example: productbg demo --out out/demo.png")
    p.add_argument("--out", default="out/demo.png", help="PNG to write (default: out/demo.png)")
    p.add_argument("--steps", type=int, default=8, help="DDIM steps (default: 8)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd)
