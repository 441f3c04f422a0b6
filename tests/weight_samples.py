"""Small, valid example weight files with the real key names and shapes, built from random numbers.

Used by the tests, the fuzz harness and the benchmarks (nothing is ever downloaded). Values are random and
small; the *layout* (names, shapes, metadata) is what matters.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Iterable, Mapping

import torch

from productbg.weights.bank import CategoryBank, CategoryLora
from productbg.weights.lora import LoraModule
from productbg.weights.style_encoder import StyleEncoder, StyleEncoderConfig
from productbg.weights.safefile import DTYPE_SIZES
from productbg.backbones.targets import SD15, SD15_LAYERS, SDXL, TargetModel

#: A mix of BG60k-like Chinese and Latin category names.
EXAMPLE_NAMES = ("运动鞋", "手提包", "咖啡杯", "Running Shoes", "Leather Bag", "Coffee Mug", "wool scarf", "台灯")

#: The published releases' projection shapes (their backbone: :data:`RELEASE_TARGETS`).
RELEASES = {
    "ip-adapter_sd15": dict(variant="linear", tokens=4, clip_width=1024),
    "ip-adapter-plus_sd15": dict(variant="plus", tokens=16, clip_width=1280, resampler_dim=768, depth=4,
                                 heads=12, dim_head=64, ff_mult=4),
    "ip-adapter_sd15_vit-G": dict(variant="linear", tokens=4, clip_width=1280),
    "ip-adapter_sdxl_vit-h": dict(variant="linear", tokens=4, clip_width=1024),
    "ip-adapter_sdxl": dict(variant="linear", tokens=4, clip_width=1280),
    "ip-adapter-plus_sdxl_vit-h": dict(variant="plus", tokens=16, clip_width=1280, resampler_dim=1280, depth=4,
                                       heads=20, dim_head=64, ff_mult=4),
}
RELEASE_TARGETS: dict[str, TargetModel] = {name: SDXL if "sdxl" in name else SD15 for name in RELEASES}


def example_bank(names: Iterable[str] = EXAMPLE_NAMES, vectors_per_id: int = 2, seed: int = 0,
                 dtype: torch.dtype = torch.float32, width: int = 768, family: str | None = None) -> CategoryBank:
    """An in-memory bank with random vectors; the first category has a LoRA.

    Width 768 gives an SD1.5 bank (family "sd15"); any other width a "tiny" bank of that width.
    ``family="sdxl"`` gives an SDXL bank (``clip_l`` 768 and ``clip_g`` 1280 vectors per category).
    """
    gen = torch.Generator().manual_seed(seed)
    family = family or ("sd15" if width == 768 else "tiny")
    bank = CategoryBank(family, vectors_per_id=vectors_per_id, dtype=dtype, width=width,
                        training={"dataset": "example", "steps": 0, "date": "2025-01-01"})
    widths = {"clip_l": width, **({"clip_g": 1280} if family == "sdxl" else {})}
    for i, name in enumerate(names):
        lora = CategoryLora(f"cat{i}.safetensors", 0.8) if i == 0 else None
        vectors = {enc: torch.randn(vectors_per_id, w, generator=gen) * 0.02 for enc, w in widths.items()}
        bank.add(name, vectors if family == "sdxl" else vectors["clip_l"], lora=lora)
    return bank


def tiny_target(context_dim: int = 8, num_layers: int = 16) -> TargetModel:
    """A made-up small target with SD1.5's layer pattern, for fast tests of the real key names."""
    widths = [4 if h == 320 else 8 if h == 640 else 16 for h in SD15.hidden_sizes]
    widths = (widths * (num_layers // 16 + 1))[:num_layers]
    return TargetModel("tiny", "tiny test model", context_dim, tuple(widths))


def example_style_encoder(release: str = "ip-adapter_sd15", target: TargetModel = SD15, seed: int = 0,
                          dtype: torch.dtype = torch.float32, **overrides: object) -> StyleEncoder:
    """A random style encoder shaped like a published release (or overridden, e.g. for tiny targets)."""
    torch.manual_seed(seed)
    kwargs = {**RELEASES[release], **overrides}
    encoder = StyleEncoder(StyleEncoderConfig.for_target(target, **kwargs))
    with torch.no_grad():
        for p in encoder.parameters():
            p.mul_(0.5)
    return encoder.to(dtype)


def tiny_style_encoder(variant: str = "linear", context_dim: int = 8, seed: int = 0) -> tuple[StyleEncoder, TargetModel]:
    """A style encoder with real key names and tiny shapes, and the tiny target it fits."""
    target = tiny_target(context_dim)
    extra = dict(tokens=2, clip_width=6) if variant == "linear" else dict(
        tokens=3, clip_width=6, resampler_dim=8, depth=2, heads=2, dim_head=4, ff_mult=2)
    release = "ip-adapter_sd15" if variant == "linear" else "ip-adapter-plus_sd15"
    return example_style_encoder(release, target, seed, **extra), target


def ip_adapter_file_dict(encoder: StyleEncoder) -> dict[str, torch.Tensor]:
    """The tensors of a published IP-Adapter ``.safetensors`` (no productbg metadata)."""
    return {k: v.detach().clone() for k, v in encoder.file_state_dict().items()}


def sd15_lora_modules(rank: int = 4, seed: int = 0, alpha: float | None = 2.0, text_encoder: bool = True,
                      conv: bool = True) -> list[LoraModule]:
    """A LoRA over SD1.5's attention (and optionally some conv and text-encoder) modules, full-size shapes."""
    gen = torch.Generator().manual_seed(seed)
    specs: list[tuple[str, str, int, int, int]] = []  # component, path, in, out, kernel
    for layer in SD15_LAYERS:
        block = layer.diffusers_name.rsplit(".", 1)[0]
        h = layer.hidden_size
        for attn, ctx in (("attn1", h), ("attn2", 768)):
            specs += [("unet", f"{block}.{attn}.to_q", h, h, 0), ("unet", f"{block}.{attn}.to_k", ctx, h, 0),
                      ("unet", f"{block}.{attn}.to_v", ctx, h, 0), ("unet", f"{block}.{attn}.to_out.0", h, h, 0)]
        specs += [("unet", f"{block}.ff.net.0.proj", h, 8 * h, 0), ("unet", f"{block}.ff.net.2", 4 * h, h, 0)]
    if conv:
        specs += [("unet", "down_blocks.0.resnets.0.conv1", 320, 320, 3),
                  ("unet", "down_blocks.0.attentions.0.proj_in", 320, 320, 1),
                  ("unet", "up_blocks.1.resnets.0.conv_shortcut", 2560, 1280, 1)]
    if text_encoder:
        for i in range(12):
            base = f"text_model.encoder.layers.{i}"
            specs += [("text_encoder", f"{base}.self_attn.{p}", 768, 768, 0)
                      for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
            specs += [("text_encoder", f"{base}.mlp.fc1", 768, 3072, 0),
                      ("text_encoder", f"{base}.mlp.fc2", 3072, 768, 0)]
    return [_random_module(c, p, i, o, k, rank, alpha, gen) for c, p, i, o, k in specs]


def _random_module(component: str, path: str, n_in: int, n_out: int, kernel: int, rank: int,
                   alpha: float | None, gen: torch.Generator) -> LoraModule:
    if kernel:
        down = torch.randn(rank, n_in, kernel, kernel, generator=gen)
        up = torch.randn(n_out, rank, 1, 1, generator=gen)
    else:
        down, up = torch.randn(rank, n_in, generator=gen), torch.randn(n_out, rank, generator=gen)
    a = None if alpha is None else torch.tensor(float(alpha))
    return LoraModule(component, path, (down * 0.01).half(), (up * 0.01).half(), a)


def write_header_only(path: str | os.PathLike, shapes: Mapping[str, tuple[int, ...]], dtype: str = "F16",
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write a valid safetensors file of zeros whose data is a sparse hole (no disk used).

    Lets tests build files with the real shapes of big models (e.g. an SDXL IP-Adapter) cheaply: the header
    is real, the tensor bytes read as zeros.
    """
    size = DTYPE_SIZES[dtype]
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, shape in shapes.items():
        end = offset + math.prod(shape) * size
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    p = Path(path)
    with open(p, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)
    return p


def sdxl_ip_adapter_shapes(release: str = "ip-adapter_sdxl") -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a published SDXL IP-Adapter (default ip-adapter_sdxl: linear, 4 tokens, 70 layers)."""
    if RELEASE_TARGETS.get(release) is not SDXL:
        raise KeyError(f"not an SDXL release: {release!r}")
    return release_shapes(release)


def release_shapes(release: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a published IP-Adapter release, in file order (built on the meta device: no memory)."""
    with torch.device("meta"):
        encoder = StyleEncoder(StyleEncoderConfig.for_target(RELEASE_TARGETS[release], **RELEASES[release]))
    return {k: tuple(v.shape) for k, v in encoder.file_state_dict().items()}


def write_release_sample(path: str | os.PathLike, release: str, values: Mapping[str, torch.Tensor] | None = None,
                         metadata: Mapping[str, str] | None = None) -> Path:
    """A published release's layout as an F16 file of zeros that takes no disk (see :func:`write_header_only`),
    with ``values`` (name -> tensor of that tensor's shape) written for real — so a test can check where the
    loader puts them without a file of the release's full size (≈0.7 GB for the SDXL ones)."""
    shapes = release_shapes(release)
    p = write_header_only(path, shapes, "F16", metadata)
    if values:
        with open(p, "rb") as fh:
            header_len = struct.unpack("<Q", fh.read(8))[0]
        offsets, offset = {}, 0
        for name, shape in shapes.items():
            offsets[name] = offset
            offset += math.prod(shape) * 2
        with open(p, "r+b") as fh:
            for name, t in values.items():
                if tuple(t.shape) != shapes[name]:
                    raise ValueError(f"{name}: shape {tuple(t.shape)}, the release has {shapes[name]}")
                fh.seek(8 + header_len + offsets[name])
                fh.write(t.detach().to(torch.float16).contiguous().numpy().tobytes())
    return p

