"""One cross-attention call with identifier confinement and reference style: what both adapters run.

The adapters (ComfyUI, diffusers) only work out *where* they are — which layer, its token grid, which batch
rows are positive, the current sigma — and hand that to :func:`guided_cross_attention` with a :class:`Guidance`,
the per-run data built once by a node or a pipeline. Per-run tensors (masks, style tokens) are reduced per grid
and device once and cached on the guidance objects, so a sampling step does no repeated mask pooling.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from . import probe
from ..backbones import SD15
from .identifier import AttentionFn, IdentifierSpec, context_attention, identifier_columns, plain_attention
from .masks import DEFAULT_THRESHOLD, background_weights, product_coverage, rows_for_batch
from .style import style_attention

#: SD1.5 cross-attention layers in diffusers ``attn_processors`` / IP-Adapter order, as ComfyUI block keys.
SD15_LAYER_KEYS: tuple[tuple[str, int], ...] = SD15.layer_keys
NUM_SD15_LAYERS = SD15.num_layers
#: SD1.5's reference-style layer presets (every backbone's: ``Backbone.layer_weights``).
STYLE_LAYER_PRESETS: dict[str, tuple[float, ...]] = {name: SD15.layer_weights(name) for name in SD15.presets}


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


CONFINEMENTS = ("context", "columns")


@dataclass(eq=False)
class IdentifierGuidance(_SharedOnCopy):
    """Confine an identifier (or any prompt words) to the background of the product.

    ``confinement="context"`` (default) needs ``spec.plain_context`` (the prompt encoded without the
    identifier); ``"columns"`` biases the identifier's key columns only (the leaky first reading, an ablation).
    """

    spec: IdentifierSpec
    product: ProductMask
    strength: float = 1.0
    sigma_start: float = math.inf
    sigma_end: float = 0.0
    confinement: str = "context"
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {self.strength}")
        if self.confinement not in CONFINEMENTS:
            raise ValueError(f"confinement must be one of {CONFINEMENTS}, got {self.confinement!r}")
        if self.confinement == "context" and self.spec.plain_context is None:
            raise ValueError("context confinement needs the identifier-free prompt (IdentifierSpec.plain_context, "
                             "set by Category Prompt / Background Words); or use confinement='columns'")

    @property
    def gated(self) -> bool:
        """Whether a sigma range limits it (else it acts at every step and no per-step gate is computed)."""
        return self.sigma_start != math.inf or self.sigma_end > 0

    def columns(self, key_len: int, device: torch.device) -> torch.Tensor:
        """The identifier's key columns for a context of ``key_len`` tokens (cached: no per-step allocation)."""
        key = ("columns", key_len, str(device))
        if key not in self._cache:
            self._cache[key] = identifier_columns(self.spec, key_len, device)
        return self._cache[key]

    def column_mask(self, key_len: int, device: torch.device) -> torch.Tensor | None:
        """[key_len] bool, True on the identifier's columns (cached); None when it would mask every or no key."""
        key = ("column_mask", key_len, str(device))
        if key not in self._cache:
            cols = self.columns(key_len, device)
            mask = None
            if 0 < cols.numel() < key_len:
                mask = torch.zeros(key_len, dtype=torch.bool, device=device).index_fill_(0, cols, True)
            self._cache[key] = mask
        return self._cache[key]

    def plain(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``spec.plain_context`` on ``device`` in ``dtype`` (cached)."""
        return self._on(("plain", str(device), dtype), self.spec.plain_context, device, dtype)

    def prompt(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """``spec.prompt_context`` on ``device`` in ``dtype`` (cached), to recognise this prompt's rows."""
        if self.spec.prompt_context is None:
            return None
        return self._on(("prompt", str(device), dtype), self.spec.prompt_context, device, dtype)

    def _on(self, key: tuple, t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if key not in self._cache:
            self._cache[key] = t.detach().to(device=device, dtype=dtype)
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
    layer_weights: tuple[float, ...] | None = None  # per-layer weight (None: 1 in every layer, any backbone)
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

    @property
    def needs_plain_context(self) -> bool:
        """Whether some identifier confines by context (the call's context must then be extended)."""
        return any(g.confinement == "context" and g.strength > 0 for g in self.identifiers)

    def __bool__(self) -> bool:
        return bool(self.identifiers or self.styles)


@dataclass(eq=False)
class Owner:
    """The attention rows of one model call that carry an identifier's prompt.

    Attributes:
        guidance: the identifier.
        rows: [rows] float, 1 on rows that carry its prompt.
        tokens: [rows, L] bool, the context tokens that belong to its prompt (a row may hold it repeated, or
            concatenated with another prompt: only matching 77·k periods count).
    """

    guidance: IdentifierGuidance
    rows: torch.Tensor
    tokens: torch.Tensor


@dataclass(eq=False)
class CallPlan:
    """What one model call needs in every cross-attention layer, computed once per call (not per layer).

    Attributes:
        guidance: the run's guidance.
        chunks: number of cond/uncond chunks in the batch.
        positive_rows: [rows] bool, rows of positive (cond) chunks (style uses the reference there).
        owners: rows carrying each identifier's prompt.
        text_len: L, tokens of the text context; when ``extended``, keys/values hold L more tokens after it:
            the identifier-free context of each row.
        gates: per guidance object (by id), a [rows] float gate from the current sigma, for gated ones only.
    """

    guidance: Guidance
    chunks: int
    positive_rows: torch.Tensor
    owners: tuple[Owner, ...]
    text_len: int
    extended: bool
    gates: dict = field(default_factory=dict)
    _grids: dict = field(default_factory=dict, repr=False)

    def text(self, t: torch.Tensor) -> torch.Tensor:
        """The text-context half of projected keys / values (all of it when not extended)."""
        return t[:, :self.text_len] if self.extended else t

    def plain(self, t: torch.Tensor) -> torch.Tensor:
        """The identifier-free half of projected keys / values."""
        return t[:, self.text_len:]

    def gate(self, g: object) -> torch.Tensor | None:
        return self.gates.get(id(g))

    def weights(self, grid: tuple[int, int], rows: int, device: torch.device,
                dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(blend [rows, N, 1] towards the identifier-free context or None, columns bias [rows, 1, N, L] or None)
        on ``grid``, built once per call and grid."""
        key = (grid, str(device), dtype)
        if key not in self._grids:
            self._grids[key] = self._build(grid, rows, device, dtype)
        return self._grids[key]

    def _build(self, grid, rows, device, dtype):
        blend = bias = None
        for o in self.owners:
            g = o.guidance
            if g.strength == 0:
                continue
            a = self._share(o, grid, rows, device)
            if g.confinement == "context":
                blend = a if blend is None else torch.maximum(blend, a)
                continue
            on_cols = g.column_mask(self.text_len, device)
            if on_cols is None:
                continue
            on_cols = o.tokens.to(device) & on_cols  # [rows, L]
            b = torch.where(on_cols[:, None, :], torch.log1p(-a)[:, :, None], a.new_zeros(()))
            bias = b if bias is None else bias + b
        if blend is not None:
            blend = blend[:, :, None].to(dtype)
        if bias is not None:
            bias = bias[:, None].to(dtype)
        return blend, bias

    def _share(self, o: Owner, grid, rows, device) -> torch.Tensor:
        """[rows, N] float32: ``strength · (1 − m)`` on the identifier's rows (× its sigma gate), else 0."""
        g = o.guidance
        background = rows_for_batch(g.product.background(grid, device), rows, self.chunks)
        row_weight = o.rows.to(device) * g.strength
        gate = self.gate(g)
        if gate is not None:
            row_weight = row_weight * gate.to(device)
        return (1.0 - background) * row_weight[:, None]

    def coverage(self, g: IdentifierGuidance, grid, rows, device) -> torch.Tensor:
        return rows_for_batch(g.product.coverage(grid, device), rows, self.chunks)


def plan_call(guidance: Guidance, context: torch.Tensor, cond_or_uncond: tuple[int, ...],
              sigmas: torch.Tensor | None = None, recognise_prompts: bool = False) -> CallPlan:
    """Work out, once per model call, which rows carry which identifier and the sigma gates.

    Args:
        guidance: the run's guidance.
        context: [rows, L, width] the text context of the call (before any extension).
        cond_or_uncond: chunk layout, 0 = positive.
        sigmas: [rows] (or [1]) current sigma per row; None = every guidance acts.
        recognise_prompts: True (ComfyUI): an identifier's rows are those whose context equals its prompt
            (``spec.prompt_context``) in some 77·k period, so regional / combined / concatenated prompts are
            never confined by mistake. False (diffusers, training): every positive row carries the identifier.
    """
    rows, length = context.shape[0], context.shape[1]
    device = context.device
    positive = positive_rows_from(cond_or_uncond, rows, device)
    owners = []
    for g in guidance.identifiers:
        prompt = g.prompt(device, context.dtype) if recognise_prompts else None
        tokens = prompt_tokens(context, g, prompt, positive)
        owners.append(Owner(g, tokens.any(1).to(torch.float32), tokens))
    gates = {}
    if sigmas is not None:
        sig = sigmas.detach().flatten().to(device)
        sig = sig if sig.numel() == rows else sig[:1].expand(rows)
        for obj in (*guidance.identifiers, *guidance.styles):
            if obj.sigma_start != math.inf or obj.sigma_end > 0:
                gates[id(obj)] = ((sig >= obj.sigma_end) & (sig <= obj.sigma_start)).to(torch.float32)
    extended = guidance.needs_plain_context
    return CallPlan(guidance, len(cond_or_uncond), positive, tuple(owners), length, extended, gates)


def prompt_tokens(context: torch.Tensor, g: IdentifierGuidance, prompt: torch.Tensor | None,
                   positive: torch.Tensor) -> torch.Tensor:
    """[rows, L] bool: tokens of ``context`` that belong to ``g``'s prompt."""
    rows, length = context.shape[:2]
    period = g.spec.context_length
    if length % period:
        return torch.zeros(rows, length, dtype=torch.bool, device=context.device)
    if prompt is None:
        return positive[:, None].expand(rows, length)
    chunks = context.view(rows, length // period, period, -1)
    same = (chunks == prompt[0]).flatten(2).all(-1)  # [rows, periods]
    return same.repeat_interleave(period, dim=1)


def extend_context(plan: CallPlan, context: torch.Tensor) -> torch.Tensor:
    """[rows, 2L, width]: the context followed by each row's identifier-free context (the row's own context
    where no identifier's prompt sits), so one K/V projection serves both halves. Unchanged if not needed."""
    if not plan.extended:
        return context
    rows, length = context.shape[:2]
    plain = context
    for o in plan.owners:
        g = o.guidance
        # A call whose context is not a whole number of the prompt's periods cannot hold the prompt (ComfyUI sent
        # a shorter negative on its own): its rows keep their own context.
        if g.confinement != "context" or length % g.spec.context_length:
            continue
        free = g.plain(context.device, context.dtype)
        free = rows_for_batch(free, rows, plan.chunks).repeat(1, length // g.spec.context_length, 1)
        plain = torch.where(o.tokens[:, :, None], free, plain)
    return torch.cat([context, plain], dim=1)


@dataclass(frozen=True)
class LayerContext:
    """Where a cross-attention call happens, as the adapter sees it: the layer, its grid, the call's plan and the
    host's attention kernel (ComfyUI's optimized attention; PyTorch SDPA by default)."""

    layer_index: int
    grid: tuple[int, int]
    plan: CallPlan
    attention: AttentionFn = plain_attention


def positive_rows_from(cond_or_uncond: list[int] | tuple[int, ...], rows: int,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """[rows] bool from ComfyUI's ``cond_or_uncond`` chunk list (0 = positive), any order (cached per layout and
    device: built from Python data once, not per model call)."""
    chunks = len(cond_or_uncond)
    if chunks == 0 or rows % chunks:
        raise ValueError(f"{rows} attention rows cannot be split into chunks {list(cond_or_uncond)}")
    return _positive_rows(tuple(int(c) for c in cond_or_uncond), rows, str(device))


@functools.lru_cache(maxsize=64)
def _positive_rows(cond_or_uncond: tuple[int, ...], rows: int, device: str) -> torch.Tensor:
    flags = torch.tensor([c == 0 for c in cond_or_uncond], device=device)
    return flags.repeat_interleave(rows // len(cond_or_uncond))


def guided_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, ctx: LayerContext,
                           include_base: bool = True) -> torch.Tensor:
    """Cross-attention output with identifier confinement and style terms.

    Args:
        q: [rows, N, heads·d]; k, v: [rows, key_len, heads·d] (already projected by the layer; with the
            identifier-free context appended when ``ctx.plan.extended``).
        heads: attention heads of the layer.
        ctx: the layer's context.
        include_base: False returns only what guidance *adds* to plain attention over the given ``k`` / ``v``
            (for stacking inside a foreign patch object that already computed that).

    Returns:
        [rows, N, heads·d], before the layer's output projection.
    """
    plan, attention = ctx.plan, ctx.attention
    k_text, v_text = plan.text(k), plan.text(v)
    blend, bias = plan.weights(ctx.grid, q.shape[0], q.device, q.dtype)
    if probe.active():
        probe.record_layer(q, k_text, heads, ctx, blend, bias)

    def text_attention(query: torch.Tensor) -> torch.Tensor:
        if blend is not None:
            return context_attention(query, k_text, v_text, plan.plain(k), plan.plain(v), heads, blend, bias,
                                     attention)
        return attention(query, k_text, v_text, heads, bias)

    if blend is not None or bias is not None or include_base or plan.extended:
        out = text_attention(q)
    else:
        out = torch.zeros_like(q)
    if not include_base and (blend is not None or bias is not None or plan.extended):
        out = out - attention(q, k, v, heads, None)  # what the foreign object computed on the same k / v
    if probe.wants_outputs():
        probe.record_output(ctx.layer_index, text_attention, q, probe.product_cells(ctx, q))
    for s in plan.guidance.styles:
        weight = s.weight * (1.0 if s.layer_weights is None else s.layer_weights[ctx.layer_index])
        if weight == 0:
            continue
        k_style, v_style = s.kv(ctx.layer_index, plan.positive_rows, plan.chunks, q.dtype, q.device)
        background = None
        if s.product is not None:
            background = rows_for_batch(s.product.background(ctx.grid, q.device), q.shape[0], plan.chunks)
        gate = plan.gate(s)
        if gate is not None:
            background = gate.to(q.device)[:, None] if background is None else background * gate.to(q.device)[:, None]
        out = out + style_attention(q, k_style, v_style, heads, weight, background, attention)
    return out
