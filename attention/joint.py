"""Identifier and Redux-style confinement on joint attention (MM-DiT: Flux.1's double- and single-stream blocks),
exact.

On a UNet the identifier reaches the image only through cross-attention, so product cells are confined by letting
them attend to the prompt encoded without the identifier (``identifier.context_attention``). In an MM-DiT every
image token attends jointly to ``[text ; image]``, the text tokens are updated by every block too, and T5 is
bidirectional, so *every* text token carries the identifier from the first block on. Hiding columns cannot work,
and neither can swapping the context of one layer: the text stream itself must exist in an identifier-free form.
The same holds for Flux Redux's reference-style tokens (SigLIP image features projected to T5's width, 729 per
image, appended after the T5 prompt by ComfyUI's StyleModelApply and diffusers' FluxPriorReduxPipeline): from the
first block on, every prompt token of the stream has attended to them.

So the model carries a second text stream, the **free** stream, run through the same block weights beside the
**full** one (the text the host calls the model with, ``[prompt (L) ; Redux tokens (R)]``, Lf = L + R tokens, R = 0
without a Redux). The free stream holds nothing that is confined: the identifier-free prompt in place of the
prompt when an identifier is confined, the Redux tokens left out when a Redux style is confined — Lg tokens: L when
the Redux tokens are confined, Lf otherwise. The joint sequence of every block is

    [ full text (Lf) ; free text (Lg) ; image (N) ]

and attention is confined per query:

* full-text queries attend to ``[full text ; image]`` (the full stream evolves exactly as in the unpatched model);
* free-text queries attend to ``[free text ; image]`` — so the free stream never reads the full one;
* an image query with blend weight ``a = strength · (1 − m)`` (m its background weight, ``masks``) gets
  ``lerp(attn(q, [full ; image]), attn(q, [free ; image]), a)``: at a = 1 (product cells at strength 1) only the
  free view, computed from keys that never include the full stream; at a = 0 (background) only the full view;
  edge cells blend.

Everything else in a block is per token (AdaLN modulation, MLPs, QK norms, output projections), so with a
block's inputs held fixed, the product cells' output and the free stream's output do not depend on the full
stream at all — neither on the identifier nor on the Redux tokens — bit for bit, and their gradient with respect
to it is exactly 0. Image keys and values come from image tokens, whose inputs are fixed within the block:
image-to-image attention still mixes product and background *across* blocks, as self-attention does on UNets; the
guarantee is per block. The pooled CLIP vector modulates every token (AdaLN), so the caller must pool the
identifier-free prompt (as on SDXL); Redux does not touch the pooled vector.

**Strengths: one product mask, one strength.** An identifier and a Redux style confined together share one mask
and one share ``a = strength · (1 − m)``; given different non-zero strengths, or different masks, :class:`JointCall`
refuses them. Why not a strength each: a cell confined from the Redux at one strength and from the identifier at
another needs a view *with* the identifier and *without* the Redux, and no column subset of the full stream is
one — its prompt tokens have read the Redux tokens since the first block, for the same reason the identifier
cannot be masked out by columns. That view is a third text stream (L more tokens through every per-token layer,
a third attention group) plus a blend of three views per cell whose order is a choice, not a reading of the
strengths; one strength needs neither. (``ReduxStyle.strength`` is how far the style is kept off the product, not
the Redux's own weight, which the host applies to the tokens themselves, e.g. StyleModelApply's strength.) Either
may be 0 (then it is off), and sigma ranges may differ: at each call the free stream drops exactly what is active
(the prompt part is the identifier-free prompt while the identifier is active, the row's own prompt otherwise; the
Redux tokens are left out while the style is active, kept otherwise), so Lg is L or Lf from one step to another
and a plan is cached per state.

How it is computed (``method="partition"``, the default): image queries are split, once per run, into the cells
that need the full view (``a < 1``) and those that need the free view (``a > 0``); each group is gathered and
attends, together with its own text stream's queries, to its own key set in one unmasked attention call, so the
host's fastest kernel (flash) runs, nothing is masked and no query is computed twice except edge cells. Rows
without confinement (a CFG negative: ``cond_or_uncond`` 1) carry their own text as their free stream, cut to its
first Lg tokens; when Lg = Lf the two streams of such a row are the same attention, and its cells fill whichever
group has room; when Lg < Lf every one of its cells attends through the full view (it computes what the unpatched
model computes either way). ``method="mask"`` is the one-pass reading: all queries against ``[full ; free ; image]``
keys with a boolean mask, plus a second pass for edge cells; it exists to measure the choice
(``bench/attention_overhead.py --model flux``) and as an independent cross-check.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .guided import IdentifierGuidance, ProductMask
from .masks import rows_for_batch

#: ``(q, k, v) -> out`` on [B, heads, S, d] tensors without a mask: PyTorch SDPA by default, or the host's kernel
#: (ComfyUI's ``optimized_attention(..., skip_reshape=True)``, diffusers' dispatcher).
JointKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
METHODS = ("partition", "mask")


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch's scaled dot-product attention on [B, heads, S, d] (the default kernel)."""
    return F.scaled_dot_product_attention(q, k, v)


@dataclass(eq=False)
class JointPlan:
    """Which image cells of which row attend through which text stream: built once per run on the host (from the
    product mask, the rows and the strength), used by every block of every step without a host sync.

    Attributes:
        text_len: Lf, tokens of the full text stream (also ``full_len``).
        free_len: Lg, tokens of the free text stream (Lg = Lf: the identifier alone; Lg < Lf: Redux tokens left
            out).
        image_len: N, image tokens.
        share: [rows, N] blend weight ``a`` towards the free view (float32, host), kept for tests and probes.
        full_index: [rows, nF] image cells that attend through the full stream (padded with 0: padding slots are
            computed and never read).
        free_index: [rows, nG] the same for the free stream.
        full_slot, free_slot: [rows, N] each cell's slot in those lists (0 where it has none: never read).
        take_free: [rows, 1, N, 1] bool, cells whose output is the free view alone.
        edge: [rows, 1, N, 1] bool, cells that blend both views; weight: [rows, 1, N, 1] their blend weight.
        full_identity: every row's full group is every cell in order (no gather needed).
        has_edges: some cell blends both views.
        free_cells: [rows, N] bool, ``a > 0`` on confined rows (the image queries that read the free stream in
            ``method="mask"``).
    """

    text_len: int
    free_len: int
    image_len: int
    share: torch.Tensor
    full_index: torch.Tensor
    free_index: torch.Tensor
    full_slot: torch.Tensor
    free_slot: torch.Tensor
    take_free: torch.Tensor
    edge: torch.Tensor
    weight: torch.Tensor
    full_identity: bool
    has_edges: bool
    free_cells: torch.Tensor
    _masks: dict = field(default_factory=dict, repr=False)

    @property
    def full_len(self) -> int:
        return self.text_len

    @property
    def sequence_len(self) -> int:
        """Lf + Lg + N, the joint sequence the plan is for."""
        return self.text_len + self.free_len + self.image_len

    @property
    def full_count(self) -> int:
        return self.full_index.shape[1]

    @property
    def free_count(self) -> int:
        return self.free_index.shape[1]


def build_plan(share: torch.Tensor, confined: list[bool] | tuple[bool, ...], text_len: int,
               device: torch.device | str, dtype: torch.dtype, free_len: int | None = None) -> JointPlan:
    """Partition every row's image cells between the two views (host work, once per run).

    Args:
        share: [rows, N] blend weight ``a`` in [0, 1] towards the free view, on the host.
        confined: per row, whether its free stream is another text than its own (True: the identifier-free prompt
            and / or its text without the Redux tokens; its cells go where ``a`` says) or the row's own text cut to
            ``free_len`` tokens (False: a row without confinement, e.g. a CFG negative; its ``share`` is ignored).
            When ``free_len == text_len`` the two streams of such a row are the same, so its cells may attend
            through either and fill the groups' spare room; otherwise all of them attend through the full view.
        text_len: Lf, tokens of the full text stream.
        device, dtype: where the per-step tensors live and the dtype of the blend weights.
        free_len: Lg, tokens of the free text stream (default: ``text_len``).
    """
    free_len = text_len if free_len is None else int(free_len)
    share = share.detach().to("cpu", torch.float32)
    rows, n = share.shape
    if len(confined) != rows:
        raise ValueError(f"{len(confined)} row flags for {rows} rows")
    same_streams = free_len == text_len  # an unconfined row's free stream is then its own text
    full_sets: list[torch.Tensor | None] = [None] * rows
    free_sets: list[torch.Tensor | None] = [None] * rows
    for r in range(rows):
        if confined[r]:
            full_sets[r] = (share[r] < 1).nonzero().flatten()
            free_sets[r] = (share[r] > 0).nonzero().flatten()
    sized = [r for r in range(rows) if confined[r]]
    n_full = max((full_sets[r].numel() for r in sized), default=n)
    n_free = max((free_sets[r].numel() for r in sized), default=0)
    if not same_streams and len(sized) < rows:
        n_full = n  # an unconfined row reads the full view only
    cells = torch.arange(n)
    for r in range(rows):
        if not confined[r]:  # n_full + n_free >= N whenever a confined row exists (its groups cover every cell)
            full_sets[r], free_sets[r] = (cells[:n_full], cells[n_full:]) if same_streams else (cells, cells[:0])
    full_index = torch.zeros(rows, n_full, dtype=torch.long)
    free_index = torch.zeros(rows, n_free, dtype=torch.long)
    full_slot = torch.zeros(rows, n, dtype=torch.long)
    free_slot = torch.zeros(rows, n, dtype=torch.long)
    in_full = torch.zeros(rows, n, dtype=torch.bool)
    in_free = torch.zeros(rows, n, dtype=torch.bool)
    for r in range(rows):
        f, g = full_sets[r], free_sets[r]
        full_index[r, :f.numel()] = f
        free_index[r, :g.numel()] = g
        full_slot[r, f] = torch.arange(f.numel())
        free_slot[r, g] = torch.arange(g.numel())
        in_full[r, f] = True
        in_free[r, g] = True
    edge = in_full & in_free
    weight = torch.where(edge, share, torch.zeros(()))
    full_identity = n_full == n and bool((full_index == cells).all())

    def cells_shape(t: torch.Tensor) -> torch.Tensor:
        return t[:, None, :, None].to(device)

    return JointPlan(text_len=text_len, free_len=free_len, image_len=n, share=share,
                     full_index=full_index.to(device), free_index=free_index.to(device),
                     full_slot=full_slot.to(device), free_slot=free_slot.to(device),
                     take_free=cells_shape(in_free & ~in_full), edge=cells_shape(edge),
                     weight=cells_shape(weight).to(dtype), full_identity=full_identity, has_edges=bool(edge.any()),
                     free_cells=((share > 0) & torch.tensor(list(confined), dtype=torch.bool)[:, None]).to(device))


def _gather_cells(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[B, H, N, d] → [B, H, n, d]: the cells ``index`` [B, n] of every row (differentiable; repeats allowed)."""
    b, h, _, d = x.shape
    return x.gather(2, index[:, None, :, None].expand(b, h, index.shape[1], d))


def _check_length(q: torch.Tensor, plan: JointPlan) -> None:
    if q.shape[2] != plan.sequence_len:
        raise ValueError(f"joint sequence of {q.shape[2]} tokens; the plan expects {plan.text_len} full text + "
                         f"{plan.free_len} free text + {plan.image_len} image tokens")


def _full_keys(t: torch.Tensor, lf: int, lg: int) -> torch.Tensor:
    """``[full text ; image]`` of a [B, H, Lf + Lg + N, d] tensor (one copy)."""
    return torch.cat([t[:, :, :lf], t[:, :, lf + lg:]], 2)


def confined_joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: JointPlan,
                             kernel: JointKernel = sdpa) -> torch.Tensor:
    """Joint attention with the identifier and / or the Redux tokens confined to the background
    (``method="partition"``).

    Args:
        q, k, v: [B, heads, Lf + Lg + N, d], the sequence ``[full text ; free text ; image]`` after the QK norms
            and RoPE (the free stream at its own text's positions).
        plan: the run's :class:`JointPlan` (rows = B).
        kernel: unmasked attention on [B, heads, S, d].

    Returns:
        [B, heads, Lf + Lg + N, d]: full-text rows from ``[full ; image]``, free-text rows from ``[free ; image]``,
        image rows per the plan (see the module docstring).
    """
    _check_length(q, plan)
    lf, lg = plan.text_len, plan.free_len
    t = lf + lg
    # [free ; image] is a view; [full ; image] one copy of K and V.
    k_full, v_full = _full_keys(k, lf, lg), _full_keys(v, lf, lg)
    k_free, v_free = k[:, :, lf:], v[:, :, lf:]
    q_img = q[:, :, t:]
    q_full = q_img if plan.full_identity else _gather_cells(q_img, plan.full_index)
    out_full = kernel(torch.cat([q[:, :, :lf], q_full], 2), k_full, v_full)
    out_free = kernel(torch.cat([q[:, :, lf:t], _gather_cells(q_img, plan.free_index)], 2), k_free, v_free)
    img_full, img_free = out_full[:, :, lf:], out_free[:, :, lg:]
    if plan.free_count == 0:
        img = img_full if plan.full_identity else _gather_cells(img_full, plan.full_slot)
    else:
        from_free = _gather_cells(img_free, plan.free_slot)
        if plan.full_count == 0:
            img = from_free
        else:
            from_full = img_full if plan.full_identity else _gather_cells(img_full, plan.full_slot)
            # where, not arithmetic: a free-only cell never reads the full view's bits (nor its NaNs), and its
            # gradient towards the full view is an exact 0.
            mixed = torch.where(plan.edge, torch.lerp(from_full, from_free, plan.weight.to(q.dtype)), from_full)
            img = torch.where(plan.take_free, from_free, mixed)
    return torch.cat([out_full[:, :, :lf], out_free[:, :, :lg], img], 2)


def masked_joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: JointPlan,
                           kernel: JointKernel = sdpa) -> torch.Tensor:
    """The same attention in one masked pass over ``[full ; free ; image]`` keys (``method="mask"``).

    Full-text queries mask the free keys, free-text queries and image queries with ``a > 0`` mask the full keys,
    the other image queries mask the free keys; edge cells (0 < a < 1) then get a second, unmasked pass over
    ``[full ; image]`` and blend. Masked keys weigh exactly 0 (``exp(-inf)``), so it is exact too; the dense
    [B, 1, S, S] mask keeps flash kernels out, which is why it is not the default. ``kernel`` serves the edge
    pass only (the masked pass is PyTorch SDPA).
    """
    _check_length(q, plan)
    lf, lg = plan.text_len, plan.free_len
    t = lf + lg
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=_joint_mask(plan, q.device))
    if not plan.has_edges:
        return out
    img_full = kernel(q[:, :, t:], _full_keys(k, lf, lg), _full_keys(v, lf, lg))
    img = out[:, :, t:]
    img = torch.where(plan.edge, torch.lerp(img_full, img, plan.weight.to(q.dtype)), img)
    return torch.cat([out[:, :, :t], img], 2)


def _joint_mask(plan: JointPlan, device: torch.device) -> torch.Tensor:
    """[B, 1, S, S] bool, True where query i of row b may read key j (built once per plan and device)."""
    key = str(device)
    if key not in plan._masks:
        lf, t, s = plan.text_len, plan.text_len + plan.free_len, plan.sequence_len
        rows = plan.free_cells.shape[0]
        sees_full = torch.ones(rows, s, dtype=torch.bool, device=device)
        sees_full[:, lf:t] = False
        sees_full[:, t:] = ~plan.free_cells.to(device)
        key_is_full = torch.zeros(s, dtype=torch.bool, device=device)
        key_is_full[:lf] = True
        key_is_free = torch.zeros(s, dtype=torch.bool, device=device)
        key_is_free[lf:t] = True
        allowed = torch.where(sees_full[:, :, None], ~key_is_free[None, None, :], ~key_is_full[None, None, :])
        plan._masks[key] = allowed[:, None]
    return plan._masks[key]


@dataclass(eq=False)
class ReduxStyle:
    """Flux Redux reference-style tokens appended to the text, confined to the background of the product.

    Attributes:
        tokens: R, how many style tokens end the context the model is called with (Flux Redux: 729 per
            SigLIP-384 image after its projection, T5's width; ComfyUI's StyleModelApply and diffusers'
            FluxPriorReduxPipeline append them after the T5 prompt). Several Redux images appended one after
            another: their total.
        strength: in [0, 1], how far product cells are kept from them — the share ``a = strength · (1 − m)``;
            not the Redux's own weight, which the host applies to the tokens (StyleModelApply's strength).
            With an identifier in the same :class:`JointCall`, equal to its strength (or one of the two 0).
        product: the product masks; None: the identifier's (a style alone needs one).
        sigma_start, sigma_end: the sigma range in which it is confined (default: every step).
    """

    tokens: int
    strength: float = 1.0
    product: ProductMask | None = None
    sigma_start: float = math.inf
    sigma_end: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.tokens, bool) or int(self.tokens) != self.tokens or self.tokens <= 0:
            raise ValueError(f"a Redux style confines a positive number of tokens, got {self.tokens!r}")
        self.tokens = int(self.tokens)
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {self.strength}")

    @property
    def gated(self) -> bool:
        """Whether a sigma range limits it."""
        return self.sigma_start != math.inf or self.sigma_end > 0


def _same_product(a: ProductMask, b: ProductMask) -> bool:
    """Whether two product masks give the same cells (the same object, or equal masks and rule)."""
    if a is b:
        return True
    return (a.threshold == b.threshold and a.soft == b.soft and a.mask.shape == b.mask.shape
            and torch.equal(a.mask, b.mask.to(a.mask.device)))


@dataclass(eq=False)
class JointCall:
    """Per-run data of confinement on joint attention (an identifier, a Redux style, or both), handed to every
    block's attention.

    Attributes:
        identifier: the identifier (``confinement="context"``) or None (a Redux style alone);
            ``spec.plain_context`` is the prompt encoded without the identifier ([Bp, L, width],
            L = ``spec.context_length``, the T5 length), and ``product`` the product masks ([Bm, H, W], any
            resolution; item b of every chunk uses mask b % Bm).
        grid: (h, w) of the model's image tokens (Flux: the latent's size / 2, latents packed in 2×2 patches,
            row-major — :func:`flux_token_grid`).
        cond_or_uncond: chunk layout of the batch, 0 = a positive chunk (its rows are confined: they carry the
            identifier and / or the Redux tokens). diffusers' Flux pipelines run the positive alone: ``(0,)``;
            ComfyUI batches chunks.
        sigma: the current sigma as a host number, for an identifier or style with a sigma range; outside its range
            a component is not confined (the rows attend to it like the unpatched model).
        method: ``"partition"`` (default) or ``"mask"`` (see the module docstring).
        kernel: unmasked attention kernel on [B, heads, S, d].
        style: the Redux tokens to confine (:class:`ReduxStyle`), or None.
        text_tokens: Lf, the length of the text the model is called with (``[prompt ; Redux tokens]``). None:
            the identifier's ``context_length`` + R. A style alone needs it: ``for_call(text_tokens=...)`` once the
            host sees its context (ComfyUI's T5 prompts have no fixed length).
    """

    identifier: IdentifierGuidance | None
    grid: tuple[int, int]
    cond_or_uncond: tuple[int, ...] = (0,)
    sigma: float | None = None
    method: str = "partition"
    kernel: JointKernel = sdpa
    style: ReduxStyle | None = None
    text_tokens: int | None = None
    _plans: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        g, s = self.identifier, self.style
        if g is None and s is None:
            raise ValueError("nothing to confine: pass an identifier, a Redux style (JointCall.style) or both")
        if g is not None:
            if g.confinement != "context":
                raise ValueError("joint attention confines by context only: T5 is bidirectional, so every text "
                                 "token carries the identifier and a column mask would confine nothing")
            if g.gated and self.sigma is None:
                raise ValueError("this identifier acts in a sigma range: pass the current sigma (JointCall.sigma)")
        if s is not None:
            if s.gated and self.sigma is None:
                raise ValueError("this Redux style acts in a sigma range: pass the current sigma (JointCall.sigma)")
            if s.product is None and g is None:
                raise ValueError("a Redux style confined without an identifier needs its product masks "
                                 "(ReduxStyle.product)")
            if g is not None:
                if s.product is not None and not _same_product(s.product, g.product):
                    raise ValueError("the identifier and the Redux style are confined with one product mask: pass "
                                     "the same ProductMask (or ReduxStyle.product=None to use the identifier's)")
                if g.strength > 0 and s.strength > 0 and g.strength != s.strength:
                    raise ValueError(
                        f"the identifier (strength {g.strength}) and the Redux style (strength {s.strength}) are "
                        "confined with one strength: give them the same one (or 0 to leave one unconfined). A "
                        "strength each would need a third text stream (see attention/joint.py)")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        self.grid = (int(self.grid[0]), int(self.grid[1]))
        if self.text_tokens is not None:
            self.text_tokens = int(self.text_tokens)
            if self.text_tokens <= self.style_tokens:
                raise ValueError(f"a text of {self.text_tokens} tokens has no prompt before its "
                                 f"{self.style_tokens} Redux tokens")
            if g is not None and self.text_tokens != g.spec.context_length + self.style_tokens:
                raise ValueError(f"a text of {self.text_tokens} tokens; the identifier's prompt has "
                                 f"{g.spec.context_length} and the Redux style {self.style_tokens}")

    # ------------------------------------------------------------------------------------------- lengths
    @property
    def style_tokens(self) -> int:
        """R, the Redux tokens at the end of the full text (0 without a style)."""
        return self.style.tokens if self.style is not None else 0

    @property
    def text_len(self) -> int:
        """Lf, tokens of the full text stream (the text the model is called with)."""
        if self.text_tokens is not None:
            return self.text_tokens
        if self.identifier is None:
            raise ValueError("a Redux style alone does not know the length of the text: pass it, "
                             "JointCall.for_call(text_tokens=context.shape[1])")
        return self.identifier.spec.context_length + self.style_tokens

    @property
    def prompt_len(self) -> int:
        """L = Lf − R, the prompt's tokens before the Redux tokens."""
        return self.text_len - self.style_tokens

    @property
    def free_len(self) -> int:
        """Lg, tokens of the free stream at this call: L while the style is confined, Lf otherwise."""
        return self.prompt_len + (0 if self.style_active else self.style_tokens)

    @property
    def image_len(self) -> int:
        return self.grid[0] * self.grid[1]

    # ------------------------------------------------------------------------------------------- state
    def _in_range(self, strength: float, gated: bool, start: float, end: float) -> bool:
        if strength == 0:
            return False
        return not gated or end <= self.sigma <= start

    @property
    def identifier_active(self) -> bool:
        """Whether the identifier is confined at this call (present, strength > 0, sigma inside its range)."""
        g = self.identifier
        return g is not None and self._in_range(g.strength, g.gated, g.sigma_start, g.sigma_end)

    @property
    def style_active(self) -> bool:
        """Whether the Redux tokens are confined at this call (present, strength > 0, sigma inside its range)."""
        s = self.style
        return s is not None and self._in_range(s.strength, s.gated, s.sigma_start, s.sigma_end)

    @property
    def active(self) -> bool:
        """Whether anything is confined at this call."""
        return self.identifier_active or self.style_active

    @property
    def strength(self) -> float:
        """The strength of the share at this call (the active components'; 0 when none is)."""
        if self.identifier_active:
            return self.identifier.strength
        return self.style.strength if self.style_active else 0.0

    @property
    def product(self) -> ProductMask:
        """The product masks the share is built from (the identifier's, else the style's)."""
        if self.identifier is not None:
            return self.identifier.product
        return self.style.product

    def for_call(self, cond_or_uncond: tuple[int, ...] | None = None, sigma: float | None = None,
                 text_tokens: int | None = None) -> "JointCall":
        """This run's data for one model call with another chunk layout, sigma and / or text length (a host that
        batches cond / uncond differently from call to call, a sampler step, the context a style alone is called
        with), sharing the plans built so far."""
        return JointCall(self.identifier, self.grid,
                         tuple(cond_or_uncond) if cond_or_uncond is not None else self.cond_or_uncond,
                         float(sigma) if sigma is not None else self.sigma, self.method, self.kernel, self.style,
                         int(text_tokens) if text_tokens is not None else self.text_tokens, self._plans)

    def confined_rows(self, rows: int) -> list[bool]:
        """Per attention row, whether it is confined (rows of positive chunks)."""
        chunks = len(self.cond_or_uncond)
        if chunks == 0 or rows % chunks:
            raise ValueError(f"{rows} rows cannot be split into chunks {list(self.cond_or_uncond)}")
        return [self.cond_or_uncond[r // (rows // chunks)] == 0 for r in range(rows)]

    def share(self, rows: int) -> torch.Tensor:
        """[rows, N] float32 on the host: ``a = strength · (1 − m)`` on confined rows, 0 elsewhere."""
        background = rows_for_batch(self.product.background(self.grid, torch.device("cpu")), rows,
                                    len(self.cond_or_uncond))
        on = torch.tensor(self.confined_rows(rows), dtype=torch.float32)[:, None]
        return (1.0 - background) * on * self.strength

    def plan(self, rows: int, device: torch.device, dtype: torch.dtype) -> JointPlan:
        """The plan for ``rows`` rows on ``device`` (built on first use, then cached for the run)."""
        key = (rows, self.cond_or_uncond, str(device), dtype, self.identifier_active, self.style_active,
               self.text_len, self.free_len)
        plan = self._plans.get(key)
        if plan is None:
            plan = build_plan(self.share(rows), self.confined_rows(rows), self.text_len, device, dtype,
                              self.free_len)
            self._plans[key] = plan
        return plan

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  kernel: JointKernel | None = None) -> torch.Tensor:
        """Confined joint attention on [B, heads, Lf + Lg + N, d] (see :func:`confined_joint_attention`).
        ``kernel``: this call's unmasked kernel (a host that learns it per attention call, e.g. ComfyUI's
        ``optimized_attention_override``); None: ``self.kernel``."""
        plan = self.plan(q.shape[0], q.device, q.dtype)
        run = confined_joint_attention if self.method == "partition" else masked_joint_attention
        return run(q, k, v, plan, kernel if kernel is not None else self.kernel)

    def check_sequence(self, text_tokens: int, image_tokens: int) -> None:
        """Refuse a block input that was not extended with the free stream, or whose image is another size."""
        lf, lg = self.text_len, self.free_len
        if text_tokens != lf + lg or image_tokens != self.image_len:
            raise ValueError(
                f"joint confinement expects {lf + lg} text tokens (the text's {lf} followed by the free stream's "
                f"{lg}: JointCall.extend_text) and {self.image_len} image tokens (grid {self.grid[0]}x"
                f"{self.grid[1]}), got {text_tokens} and {image_tokens}")

    def extend_text(self, context: torch.Tensor) -> torch.Tensor:
        """[rows, Lf + Lg, width]: each row's text followed by its free stream.

        ``context`` is the text the model is called with, [rows, Lf, width] (``[prompt ; Redux tokens]``). On
        confined rows the free stream is the prompt part — the identifier-free prompt while the identifier is
        confined, the row's own prompt otherwise — followed by the Redux tokens unless the style is confined; on
        other rows (CFG negatives) it is the row's own text, its first Lg tokens.
        """
        rows, length = context.shape[:2]
        lf, lp, lg = self.text_len, self.prompt_len, self.free_len
        if length != lf:
            raise ValueError(f"text of {length} tokens; this call expects {lf}" + (
                f" (the identifier's prompt {self.identifier.spec.context_length}"
                f" + {self.style_tokens} Redux tokens)" if self.identifier is not None else ""))
        own = context[:, :lg]
        if not self.identifier_active:  # the prompt part is every row's own: nothing differs between rows
            return torch.cat([context, own], 1)
        free = rows_for_batch(self.identifier.plain(context.device, context.dtype), rows, len(self.cond_or_uncond))
        if lg > lp:  # the Redux tokens, not confined at this call
            free = torch.cat([free, context[:, lp:lg]], 1)
        key = ("rows", rows, self.cond_or_uncond, str(context.device))
        if key not in self._plans:  # a host-to-device copy once per run, not per call
            self._plans[key] = torch.tensor(self.confined_rows(rows), device=context.device)[:, None, None]
        return torch.cat([context, torch.where(self._plans[key], free, own)], 1)

    @staticmethod
    def extend_ids(txt_ids: torch.Tensor, free_len: int | None = None) -> torch.Tensor:
        """Text position ids for ``[full ; free]``: the free stream at its text's own RoPE positions, the first
        ``free_len`` (Lg, ``JointCall.free_len``; default: all) of ``txt_ids`` ([Lf, 3] or [B, Lf, 3]). Flux's
        text ids are all zeros, so these are zeros of length Lf + Lg."""
        free = txt_ids if free_len is None else txt_ids[..., :free_len, :]
        if free.shape[-2] != (txt_ids.shape[-2] if free_len is None else free_len):
            raise ValueError(f"a free stream of {free_len} tokens is longer than the text's {txt_ids.shape[-2]} ids")
        return torch.cat([txt_ids, free], -2)

    def extend_text_ids(self, txt_ids: torch.Tensor) -> torch.Tensor:
        """:meth:`extend_ids` at this call's free-stream length."""
        return self.extend_ids(txt_ids, self.free_len)


def flux_token_grid(height: int, width: int) -> tuple[int, int]:
    """Flux's image-token grid for an image of ``height`` × ``width`` pixels (VAE /8, then 2×2 patches), as
    diffusers' Flux pipelines size it (ComfyUI pads odd latents up to a multiple of 2 instead)."""
    return height // 16, width // 16
