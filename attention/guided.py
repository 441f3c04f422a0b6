"""One cross-attention call with identifier confinement and reference style: what both adapters run.

The adapters (ComfyUI, diffusers) only work out *where* they are — which layer, its token grid, which batch
rows are positive, the current sigma — and hand that to :func:`guided_cross_attention` with a :class:`Guidance`,
the per-run data built once by a node or a pipeline. Per-run tensors (masks, style tokens) are reduced per grid
and device once and cached on the guidance objects, so a sampling step does no repeated mask pooling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from . import probe
from .identifier import IdentifierSpec, identifier_bias, identifier_columns, plain_attention
from .masks import DEFAULT_THRESHOLD, background_weights, product_coverage, rows_for_batch
from .style import style_attention

#: SD1.5 cross-attention layers in diffusers ``attn_processors`` / IP-Adapter order, as ComfyUI block keys.
SD15_LAYER_KEYS: tuple[tuple[str, int], ...] = (
    ("input", 1), ("input", 2), ("input", 4), ("input", 5), ("input", 7), ("input", 8),
    ("output", 3), ("output", 4), ("output", 5), ("output", 6), ("output", 7), ("output", 8),
    ("output", 9), ("output", 10), ("output", 11),
    ("middle", 0),
)
NUM_SD15_LAYERS = len(SD15_LAYER_KEYS)
#: Reference-style layer presets (our reading): input blocks + middle shape the layout, output blocks the
#: texture and colour.
STYLE_LAYER_PRESETS: dict[str, tuple[float, ...]] = {
    "all": (1.0,) * NUM_SD15_LAYERS,
    "style": tuple(1.0 if key[0] == "output" else 0.0 for key in SD15_LAYER_KEYS),
    "composition": tuple(0.0 if key[0] == "output" else 1.0 for key in SD15_LAYER_KEYS),
}
_COMPUTE = object()  # default of guided_cross_attention's ``bias``: build it there


class _SharedOnCopy:
    """Per-run data is immutable once built: deep copies (ComfyUI's ``ModelPatcher.clone``) share it."""

    def __deepcopy__(self, memo: dict) -> "_SharedOnCopy":
        return self

    def __copy__(self) -> "_SharedOnCopy":
        return self


@dataclass(eq=False)
class ProductMask(_SharedOnCopy):
    """A batch of product masks (1 = product) and the rule that turns them into per-layer weights."""

    mask: torch.Tensor
    threshold: float = DEFAULT_THRESHOLD
    soft: bool = True
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.mask.ndim == 2:
            self.mask = self.mask[None]
        if self.mask.ndim != 3:
            raise ValueError(f"product mask must be [B,H,W], got {tuple(self.mask.shape)}")
        self.mask = self.mask.detach().float().clamp(0, 1)

    def coverage(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        """[Bm, h·w] product coverage on ``grid`` (cached)."""
        key = ("coverage", grid, str(device))
        if key not in self._cache:
            self._cache[key] = product_coverage(self.mask, grid).to(device)
        return self._cache[key]

    def background(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        """[Bm, h·w] background weights on ``grid`` (cached)."""
        key = ("background", grid, str(device))
        if key not in self._cache:
            self._cache[key] = background_weights(self.coverage(grid, device), self.threshold, self.soft)
        return self._cache[key]


@dataclass(eq=False)
class IdentifierGuidance(_SharedOnCopy):
    """Confine an identifier (or any prompt words) to the background of the product."""

    spec: IdentifierSpec
    product: ProductMask
    strength: float = 1.0
    sigma_start: float = math.inf
    sigma_end: float = 0.0
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {self.strength}")

    def columns(self, key_len: int, device: torch.device) -> torch.Tensor:
        """The identifier's key columns for a context of ``key_len`` tokens (cached: no per-step allocation)."""
        key = (key_len, str(device))
        if key not in self._cache:
            self._cache[key] = identifier_columns(self.spec, key_len, device)
        return self._cache[key]


#: ``(layer_index, tokens [B, T, ctx]) -> (k, v)`` each [B, T, heads·d], computed on the device of its weights
#: (tokens may be elsewhere); e.g. ``StyleEncoder.layer_kv``.
LayerKV = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(eq=False)
class StyleGuidance(_SharedOnCopy):
    """Reference-image style tokens and the per-layer K/V that project them."""

    cond_tokens: torch.Tensor
    uncond_tokens: torch.Tensor
    layer_kv: LayerKV
    weight: float = 1.0
    layer_weights: tuple[float, ...] = (1.0,) * NUM_SD15_LAYERS
    product: ProductMask | None = None
    sigma_start: float = math.inf
    sigma_end: float = 0.0
    cache_kv: bool = True  # False while training the K/V (recomputed with gradients every call)
    models: tuple = ()  # host-managed models holding layer_kv's weights (ComfyUI ModelPatchers), loaded with the UNet
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.cond_tokens.shape != self.uncond_tokens.shape:
            raise ValueError(f"cond style tokens {tuple(self.cond_tokens.shape)} and uncond "
                             f"{tuple(self.uncond_tokens.shape)} differ in shape")

    def kv(self, layer: int, positive_rows: torch.Tensor, chunks: int, dtype: torch.dtype,
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of the style tokens for every attention row (cond rows: reference, uncond rows: empty image)."""
        key = (layer, str(device), dtype)
        if key in self._cache:
            kc, vc, ku, vu = self._cache[key]
        else:
            with torch.set_grad_enabled(not self.cache_kv and torch.is_grad_enabled()):
                # layer_kv runs where its weights are (ComfyUI loads them with the UNet); the K/V then move here
                k, v = self.layer_kv(layer, torch.cat([self.cond_tokens, self.uncond_tokens]))
            n = self.cond_tokens.shape[0]
            kc, vc, ku, vu = (t.to(device, dtype) for t in (k[:n], v[:n], k[n:], v[n:]))
            if self.cache_kv:
                self._cache[key] = (kc, vc, ku, vu)
        rows = positive_rows.shape[0]
        pos = positive_rows.to(device)[:, None, None]
        k = torch.where(pos, rows_for_batch(kc, rows, chunks), rows_for_batch(ku, rows, chunks))
        v = torch.where(pos, rows_for_batch(vc, rows, chunks), rows_for_batch(vu, rows, chunks))
        return k, v


@dataclass(eq=False)
class Guidance(_SharedOnCopy):
    """Everything productbg adds to cross-attention for one run; immutable, extended with ``with_*``."""

    identifiers: tuple[IdentifierGuidance, ...] = ()
    styles: tuple[StyleGuidance, ...] = ()

    def with_identifier(self, g: IdentifierGuidance) -> "Guidance":
        return replace(self, identifiers=self.identifiers + (g,))

    def with_style(self, g: StyleGuidance) -> "Guidance":
        return replace(self, styles=self.styles + (g,))

    def __bool__(self) -> bool:
        return bool(self.identifiers or self.styles)


@dataclass(frozen=True)
class LayerContext:
    """Where a cross-attention call happens, as the adapter sees it."""

    layer_index: int
    grid: tuple[int, int]
    positive_rows: torch.Tensor
    chunks: int
    sigma: float | None = None

    def active(self, g: IdentifierGuidance | StyleGuidance) -> bool:
        return self.sigma is None or g.sigma_end <= self.sigma <= g.sigma_start


def positive_rows_from(cond_or_uncond: list[int] | tuple[int, ...], rows: int,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """[rows] bool from ComfyUI's ``cond_or_uncond`` chunk list (0 = positive), any order."""
    chunks = len(cond_or_uncond)
    if chunks == 0 or rows % chunks:
        raise ValueError(f"{rows} attention rows cannot be split into chunks {list(cond_or_uncond)}")
    flags = torch.tensor([c == 0 for c in cond_or_uncond], device=device)
    return flags.repeat_interleave(rows // chunks)


def identifier_bias_for(q: torch.Tensor, k: torch.Tensor, heads: int, guidance: Guidance,
                     ctx: LayerContext) -> torch.Tensor | None:
    """Sum of the active identifiers' additive biases [rows, 1, N, key_len], or None when none applies."""
    bias = None
    rows, key_len = q.shape[0], k.shape[1]
    for g in guidance.identifiers:
        if not ctx.active(g) or g.strength == 0:
            continue
        cols = g.columns(key_len, q.device)
        if not 0 < cols.numel() < key_len:
            continue
        background = rows_for_batch(g.product.background(ctx.grid, q.device), rows, ctx.chunks)
        b = identifier_bias(background, cols, ctx.positive_rows.to(q.device), key_len, g.strength, q.dtype)
        bias = b if bias is None else bias + b
        if probe.active():
            coverage = rows_for_batch(g.product.coverage(ctx.grid, q.device), rows, ctx.chunks)
            probe.record_identifier(ctx.layer_index, q, k, heads, b, cols, ctx.positive_rows, coverage,
                                    g.product.threshold)
    return bias


def guided_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, guidance: Guidance,
                           ctx: LayerContext, include_base: bool = True,
                           bias: torch.Tensor | None | object = _COMPUTE) -> torch.Tensor:
    """Cross-attention output with identifier confinement and style terms.

    Args:
        q: [rows, N, heads·d]; k, v: [rows, key_len, heads·d] (already projected by the layer).
        heads: attention heads of the layer.
        guidance: the run's per-run data.
        ctx: the layer's context.
        include_base: False returns only what guidance *adds* to plain attention (for stacking inside a
            foreign patch object that already computed plain attention).
        bias: the identifier bias when the caller already built it (``identifier_bias_for``); by default it
            is computed here.

    Returns:
        [rows, N, heads·d], before the layer's output projection.
    """
    if bias is _COMPUTE:
        bias = identifier_bias_for(q, k, heads, guidance, ctx)
    if bias is not None:
        out = plain_attention(q, k, v, heads, attn_mask=bias)
        if not include_base:
            out = out - plain_attention(q, k, v, heads)
    elif include_base:
        out = plain_attention(q, k, v, heads)
    else:
        out = torch.zeros_like(q)
    for s in guidance.styles:
        weight = s.weight * s.layer_weights[ctx.layer_index]
        if not ctx.active(s) or weight == 0:
            continue
        k_style, v_style = s.kv(ctx.layer_index, ctx.positive_rows, ctx.chunks, q.dtype, q.device)
        background = None
        if s.product is not None:
            background = rows_for_batch(s.product.background(ctx.grid, q.device), q.shape[0], ctx.chunks)
        out = out + style_attention(q, k_style, v_style, heads, weight, background)
    return out
