"""Identifier confinement on joint attention (MM-DiT: Flux.1's double- and single-stream blocks), exact.

On a UNet the identifier reaches the image only through cross-attention, so product cells are confined by letting
them attend to the prompt encoded without the identifier (``identifier.context_attention``). In an MM-DiT every
image token attends jointly to ``[text ; image]``, the text tokens are updated by every block too, and T5 is
bidirectional, so *every* text token carries the identifier from the first block on. Hiding columns cannot work,
and neither can swapping the context of one layer: the text stream itself must exist in an identifier-free form.

So the model carries a second text stream, the **free** stream: the prompt encoded without the identifier, run
through the same block weights beside the **full** stream. The joint sequence of every block is

    [ full text (L) ; free text (L) ; image (N) ]

and attention is confined per query:

* full-text queries attend to ``[full text ; image]`` (the full stream evolves exactly as in the unpatched model);
* free-text queries attend to ``[free text ; image]`` — so the free stream never reads the full one;
* an image query with blend weight ``a = strength · (1 − m)`` (m its background weight, ``masks``) gets
  ``lerp(attn(q, [full ; image]), attn(q, [free ; image]), a)``: at a = 1 (product cells at strength 1) only the
  free view, computed from keys that never include the full stream; at a = 0 (background) only the full view;
  edge cells blend.

Everything else in a block is per token (AdaLN modulation, MLPs, QK norms, output projections), so with a
block's inputs held fixed, the product cells' output and the free stream's output do not depend on the full
stream at all — bit for bit, and their gradient with respect to it is exactly 0. Image keys and values come
from image tokens, whose inputs are fixed within the block: image-to-image attention still mixes product and
background *across* blocks, as self-attention does on UNets; the guarantee is per block. The pooled CLIP vector
modulates every token (AdaLN), so the caller must pool the identifier-free prompt (as on SDXL).

How it is computed (``method="partition"``, the default): image queries are split, once per run, into the cells
that need the full view (``a < 1``) and those that need the free view (``a > 0``); each group is gathered and
attends, together with its own text stream's queries, to its own key set in one unmasked attention call, so the
host's fastest kernel (flash) runs, nothing is masked and no query is computed twice except edge cells. Rows
without the identifier (a CFG negative) carry their own prompt as their free stream, so both views are the same
attention there, and their cells fill whichever group has room. ``method="mask"`` is the one-pass reading: all
queries against ``[full ; free ; image]`` keys with a boolean mask, plus a second pass for edge cells; it exists
to measure the choice (``bench/attention_overhead.py --model flux``) and as an independent cross-check.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .guided import IdentifierGuidance
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
        text_len: L, tokens of each text stream.
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
        free_cells: [rows, N] bool, ``a > 0`` (the image queries that read the free stream in ``method="mask"``).
    """

    text_len: int
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
    def full_count(self) -> int:
        return self.full_index.shape[1]

    @property
    def free_count(self) -> int:
        return self.free_index.shape[1]


def build_plan(share: torch.Tensor, confined: list[bool] | tuple[bool, ...], text_len: int,
               device: torch.device | str, dtype: torch.dtype) -> JointPlan:
    """Partition every row's image cells between the two views (host work, once per run).

    Args:
        share: [rows, N] blend weight ``a`` in [0, 1] towards the free view, on the host.
        confined: per row, whether its free stream is the identifier-free prompt (True: its cells go where ``a``
            says) or the row's own prompt (False: a row without the identifier, e.g. a CFG negative, whose two
            streams are the same, so its cells may attend through either and fill the groups' spare room).
        text_len: L, tokens per text stream.
        device, dtype: where the per-step tensors live and the dtype of the blend weights.
    """
    share = share.detach().to("cpu", torch.float32)
    rows, n = share.shape
    if len(confined) != rows:
        raise ValueError(f"{len(confined)} row flags for {rows} rows")
    full_sets: list[torch.Tensor | None] = [None] * rows
    free_sets: list[torch.Tensor | None] = [None] * rows
    for r in range(rows):
        if confined[r]:
            full_sets[r] = (share[r] < 1).nonzero().flatten()
            free_sets[r] = (share[r] > 0).nonzero().flatten()
    sized = [r for r in range(rows) if confined[r]]
    n_full = max((full_sets[r].numel() for r in sized), default=n)
    n_free = max((free_sets[r].numel() for r in sized), default=0)
    cells = torch.arange(n)
    for r in range(rows):
        if not confined[r]:  # n_full + n_free >= N whenever a confined row exists (its groups cover every cell)
            full_sets[r], free_sets[r] = cells[:n_full], cells[n_full:]
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

    return JointPlan(text_len=text_len, image_len=n, share=share, full_index=full_index.to(device),
                     free_index=free_index.to(device), full_slot=full_slot.to(device), free_slot=free_slot.to(device),
                     take_free=cells_shape(in_free & ~in_full), edge=cells_shape(edge),
                     weight=cells_shape(weight).to(dtype), full_identity=full_identity, has_edges=bool(edge.any()),
                     free_cells=(share > 0).to(device))


def _gather_cells(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[B, H, N, d] → [B, H, n, d]: the cells ``index`` [B, n] of every row (differentiable; repeats allowed)."""
    b, h, _, d = x.shape
    return x.gather(2, index[:, None, :, None].expand(b, h, index.shape[1], d))


def confined_joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: JointPlan,
                             kernel: JointKernel = sdpa) -> torch.Tensor:
    """Joint attention with the identifier confined to the background (``method="partition"``).

    Args:
        q, k, v: [B, heads, 2L + N, d], the sequence ``[full text ; free text ; image]`` after the QK norms and
            RoPE (the free stream at the text's own positions).
        plan: the run's :class:`JointPlan` (rows = B).
        kernel: unmasked attention on [B, heads, S, d].

    Returns:
        [B, heads, 2L + N, d]: full-text rows from ``[full ; image]``, free-text rows from ``[free ; image]``,
        image rows per the plan (see the module docstring).
    """
    L, n = plan.text_len, plan.image_len
    if q.shape[2] != 2 * L + n:
        raise ValueError(f"joint sequence of {q.shape[2]} tokens; the plan expects 2x{L} text + {n} image tokens")
    # [free ; image] is a view; [full ; image] one copy of K and V.
    k_full, v_full = torch.cat([k[:, :, :L], k[:, :, 2 * L:]], 2), torch.cat([v[:, :, :L], v[:, :, 2 * L:]], 2)
    k_free, v_free = k[:, :, L:], v[:, :, L:]
    q_img = q[:, :, 2 * L:]
    q_full = q_img if plan.full_identity else _gather_cells(q_img, plan.full_index)
    out_full = kernel(torch.cat([q[:, :, :L], q_full], 2), k_full, v_full)
    out_free = kernel(torch.cat([q[:, :, L:2 * L], _gather_cells(q_img, plan.free_index)], 2), k_free, v_free)
    img_full, img_free = out_full[:, :, L:], out_free[:, :, L:]
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
    return torch.cat([out_full[:, :, :L], out_free[:, :, :L], img], 2)


def masked_joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: JointPlan,
                           kernel: JointKernel = sdpa) -> torch.Tensor:
    """The same attention in one masked pass over ``[full ; free ; image]`` keys (``method="mask"``).

    Full-text queries mask the free keys, free-text queries and image queries with ``a > 0`` mask the full keys,
    the other image queries mask the free keys; edge cells (0 < a < 1) then get a second, unmasked pass over
    ``[full ; image]`` and blend. Masked keys weigh exactly 0 (``exp(-inf)``), so it is exact too; the dense
    [B, 1, S, S] mask keeps flash kernels out, which is why it is not the default. ``kernel`` serves the edge
    pass only (the masked pass is PyTorch SDPA).
    """
    L, n = plan.text_len, plan.image_len
    s = 2 * L + n
    if q.shape[2] != s:
        raise ValueError(f"joint sequence of {q.shape[2]} tokens; the plan expects 2x{L} text + {n} image tokens")
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=_joint_mask(plan, q.device))
    if not plan.has_edges:
        return out
    k_full, v_full = torch.cat([k[:, :, :L], k[:, :, 2 * L:]], 2), torch.cat([v[:, :, :L], v[:, :, 2 * L:]], 2)
    img_full = kernel(q[:, :, 2 * L:], k_full, v_full)
    img = out[:, :, 2 * L:]
    img = torch.where(plan.edge, torch.lerp(img_full, img, plan.weight.to(q.dtype)), img)
    return torch.cat([out[:, :, :2 * L], img], 2)


def _joint_mask(plan: JointPlan, device: torch.device) -> torch.Tensor:
    """[B, 1, S, S] bool, True where query i of row b may read key j (built once per plan and device)."""
    key = str(device)
    if key not in plan._masks:
        L, s = plan.text_len, 2 * plan.text_len + plan.image_len
        rows = plan.free_cells.shape[0]
        sees_full = torch.ones(rows, s, dtype=torch.bool, device=device)
        sees_full[:, L:2 * L] = False
        sees_full[:, 2 * L:] = ~plan.free_cells.to(device)
        key_is_full = torch.zeros(s, dtype=torch.bool, device=device)
        key_is_full[:L] = True
        key_is_free = torch.zeros(s, dtype=torch.bool, device=device)
        key_is_free[L:2 * L] = True
        allowed = torch.where(sees_full[:, :, None], ~key_is_free[None, None, :], ~key_is_full[None, None, :])
        plan._masks[key] = allowed[:, None]
    return plan._masks[key]


@dataclass(eq=False)
class JointCall:
    """Per-run data of identifier confinement on joint attention, handed to every block's attention.

    Attributes:
        identifier: the identifier (``confinement="context"``); ``spec.plain_context`` is the prompt encoded
            without the identifier ([Bp, L, width], L = ``spec.context_length``, the T5 length), and
            ``product`` the product masks ([Bm, H, W], any resolution; item b of every chunk uses mask b % Bm).
        grid: (h, w) of the model's image tokens (Flux: the latent's size / 2, latents packed in 2×2 patches,
            row-major — :func:`flux_token_grid`).
        cond_or_uncond: chunk layout of the batch, 0 = a positive chunk (its rows carry the identifier).
            diffusers' Flux pipelines run the positive alone: ``(0,)``; ComfyUI batches chunks.
        sigma: the current sigma as a host number, for a guidance with a sigma range (``sigma_start`` /
            ``sigma_end``); outside the range the identifier rows attend like the unpatched model.
        method: ``"partition"`` (default) or ``"mask"`` (see the module docstring).
        kernel: unmasked attention kernel on [B, heads, S, d].
    """

    identifier: IdentifierGuidance
    grid: tuple[int, int]
    cond_or_uncond: tuple[int, ...] = (0,)
    sigma: float | None = None
    method: str = "partition"
    kernel: JointKernel = sdpa
    _plans: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        g = self.identifier
        if g.confinement != "context":
            raise ValueError("joint attention confines by context only: T5 is bidirectional, so every text token "
                             "carries the identifier and a column mask would confine nothing")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if g.gated and self.sigma is None:
            raise ValueError("this identifier acts in a sigma range: pass the current sigma (JointCall.sigma)")
        self.grid = (int(self.grid[0]), int(self.grid[1]))

    @property
    def text_len(self) -> int:
        return self.identifier.spec.context_length

    @property
    def image_len(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def active(self) -> bool:
        """Whether the identifier is confined at this call (strength > 0, sigma inside its range)."""
        g = self.identifier
        if g.strength == 0:
            return False
        return not g.gated or g.sigma_end <= self.sigma <= g.sigma_start

    def for_call(self, cond_or_uncond: tuple[int, ...] | None = None, sigma: float | None = None) -> "JointCall":
        """This run's data for one model call with another chunk layout and/or sigma (a host that batches
        cond / uncond differently from call to call, a sampler step), sharing the plans built so far."""
        return JointCall(self.identifier, self.grid,
                         tuple(cond_or_uncond) if cond_or_uncond is not None else self.cond_or_uncond,
                         float(sigma) if sigma is not None else self.sigma, self.method, self.kernel, self._plans)

    def confined_rows(self, rows: int) -> list[bool]:
        """Per attention row, whether it carries the identifier (rows of positive chunks)."""
        chunks = len(self.cond_or_uncond)
        if chunks == 0 or rows % chunks:
            raise ValueError(f"{rows} rows cannot be split into chunks {list(self.cond_or_uncond)}")
        return [self.cond_or_uncond[r // (rows // chunks)] == 0 for r in range(rows)]

    def share(self, rows: int) -> torch.Tensor:
        """[rows, N] float32 on the host: ``a = strength · (1 − m)`` on identifier rows, 0 elsewhere."""
        g = self.identifier
        background = rows_for_batch(g.product.background(self.grid, torch.device("cpu")), rows,
                                    len(self.cond_or_uncond))
        on = torch.tensor(self.confined_rows(rows), dtype=torch.float32)[:, None]
        return (1.0 - background) * on * (g.strength if self.active else 0.0)

    def plan(self, rows: int, device: torch.device, dtype: torch.dtype) -> JointPlan:
        """The plan for ``rows`` rows on ``device`` (built on first use, then cached for the run)."""
        key = (rows, self.cond_or_uncond, str(device), dtype, self.active)
        plan = self._plans.get(key)
        if plan is None:
            plan = build_plan(self.share(rows), self.confined_rows(rows), self.text_len, device, dtype)
            self._plans[key] = plan
        return plan

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Confined joint attention on [B, heads, 2L + N, d] (see :func:`confined_joint_attention`)."""
        plan = self.plan(q.shape[0], q.device, q.dtype)
        run = confined_joint_attention if self.method == "partition" else masked_joint_attention
        return run(q, k, v, plan, self.kernel)

    def check_sequence(self, text_tokens: int, image_tokens: int) -> None:
        """Refuse a block input that was not extended with the free stream, or whose image is another size."""
        if text_tokens != 2 * self.text_len or image_tokens != self.image_len:
            raise ValueError(
                f"joint confinement expects {2 * self.text_len} text tokens (the prompt's {self.text_len} followed by "
                f"the identifier-free prompt's: JointCall.extend_text) and {self.image_len} image tokens "
                f"(grid {self.grid[0]}x{self.grid[1]}), got {text_tokens} and {image_tokens}")

    def extend_text(self, context: torch.Tensor) -> torch.Tensor:
        """[rows, 2L, width]: each row's text followed by its free stream — the identifier-free prompt on rows that
        carry the identifier, the row's own prompt elsewhere (so both streams of such a row are the same)."""
        rows, length = context.shape[:2]
        if length != self.text_len:
            raise ValueError(f"text of {length} tokens; the identifier's prompt has {self.text_len}")
        free = rows_for_batch(self.identifier.plain(context.device, context.dtype), rows, len(self.cond_or_uncond))
        key = ("rows", rows, self.cond_or_uncond, str(context.device))
        if key not in self._plans:  # a host-to-device copy once per run, not per call
            self._plans[key] = torch.tensor(self.confined_rows(rows), device=context.device)[:, None, None]
        return torch.cat([context, torch.where(self._plans[key], free, context)], 1)

    @staticmethod
    def extend_ids(txt_ids: torch.Tensor) -> torch.Tensor:
        """Text position ids for ``[full ; free]``: the free stream at the text's own RoPE positions."""
        return torch.cat([txt_ids, txt_ids], -2)


def flux_token_grid(height: int, width: int) -> tuple[int, int]:
    """Flux's image-token grid for an image of ``height`` × ``width`` pixels (VAE /8, then 2×2 patches), as
    diffusers' Flux pipelines size it (ComfyUI pads odd latents up to a multiple of 2 instead)."""
    return height // 16, width // 16

