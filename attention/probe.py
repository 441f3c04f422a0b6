"""Measure identifier attention while a real sampler runs (tests, debugging, the demo's attention maps).

Off by default and free when off. ``with record() as rec:`` collects, for every identifier-guided
cross-attention call, the identifier's attention mass at product cells and elsewhere (as the layer weighs it:
under ``context`` confinement the full prompt's share ``1 − a`` scales it). With ``keep_outputs=True`` it also
keeps every guided layer's output (with its autograd graph) and product cells: the *dependence* measures of
``bench/toy_paper_table.py`` perturb or differentiate those, which the column mass cannot see.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .identifier import identifier_mass_map


@dataclass
class IdentifierRecord:
    layer_index: int
    grid_tokens: int
    product_cells: int
    max_mass_on_product: float
    mean_mass_on_product: float
    mean_mass_on_background: float
    mass_map: torch.Tensor  # [positive rows, N], head-averaged


@dataclass
class OutputRecord:
    layer_index: int
    query: torch.Tensor  # [rows, N, C] the (detached) queries the output was computed from
    output: torch.Tensor  # [rows, N, C] text cross-attention output for ``query``, with its graph to the context
    product: torch.Tensor | None  # [rows, N] bool, product cells of the identifier's rows


@dataclass
class Recorder:
    identifier: list[IdentifierRecord] = field(default_factory=list)
    outputs: list[OutputRecord] = field(default_factory=list)
    keep_maps: bool = False
    keep_outputs: bool = False
    #: queries of an earlier recording: the outputs are then computed from those (in call order), so two runs
    #: with different identifiers compare the key/value path alone, at the same queries.
    replay: list[torch.Tensor] | None = None

    def layers(self) -> set[int]:
        return {r.layer_index for r in self.identifier}


_active: list[Recorder] = []


def active() -> bool:
    return bool(_active)


def wants_outputs() -> bool:
    return any(rec.keep_outputs for rec in _active)


@contextlib.contextmanager
def record(keep_maps: bool = False, keep_outputs: bool = False,
           replay: list[torch.Tensor] | None = None) -> Iterator[Recorder]:
    rec = Recorder(keep_maps=keep_maps, keep_outputs=keep_outputs or replay is not None, replay=replay)
    _active.append(rec)
    try:
        yield rec
    finally:
        _active.remove(rec)


@torch.no_grad()
def record_identifier(layer_index: int, q: torch.Tensor, k: torch.Tensor, heads: int, bias: torch.Tensor | None,
                      columns: torch.Tensor, positive_rows: torch.Tensor, coverage: torch.Tensor,
                      threshold: float, scale: torch.Tensor | None = None) -> None:
    pos = positive_rows.to(q.device)
    mass = identifier_mass_map(q[pos], k[pos], heads, columns, None if bias is None else bias[pos])
    if scale is not None:
        mass = mass * scale[pos].float()
    product = coverage[pos] >= threshold
    background = coverage[pos] < threshold
    entry = IdentifierRecord(
        layer_index=layer_index,
        grid_tokens=q.shape[1],
        product_cells=int(product.sum()),
        max_mass_on_product=float(mass[product].max()) if product.any() else 0.0,
        mean_mass_on_product=float(mass[product].mean()) if product.any() else 0.0,
        mean_mass_on_background=float(mass[background].mean()) if background.any() else 0.0,
        mass_map=mass.cpu() if _active[-1].keep_maps else torch.empty(0),
    )
    for rec in _active:
        rec.identifier.append(entry)


def record_output(layer_index: int, attend: Callable[[torch.Tensor], torch.Tensor], query: torch.Tensor,
                  product: torch.Tensor | None) -> None:
    """Keep ``attend(q)`` — the layer's text cross-attention as a function of its queries — for recorders that
    ask for outputs; q is detached (or replayed), so the output depends on the context only through K / V."""
    for rec in _active:
        if not rec.keep_outputs:
            continue
        q = query.detach()
        if rec.replay is not None:
            q = rec.replay[len(rec.outputs)]
        with torch.enable_grad():
            out = attend(q)
        rec.outputs.append(OutputRecord(layer_index, q, out, product))


# ------------------------------------------------------------- what a guided layer hands the probe
# Kept here, out of attention/guided.py's hot path: a layer calls these only while a recording is active.
def product_cells(ctx, q: torch.Tensor) -> torch.Tensor | None:
    """[rows, N] bool: product cells of the first identifier's rows (for the probe)."""
    plan = ctx.plan
    if not plan.owners:
        return None
    o = plan.owners[0]
    cov = plan.coverage(o.guidance, ctx.grid, q.shape[0], q.device)
    return (cov >= o.guidance.product.threshold) & (o.rows.to(q.device)[:, None] > 0)


def record_layer(q, k_text, heads, ctx, blend, bias) -> None:
    """Probe: the identifier's attention mass per position, as the layer really weighs it."""
    plan = ctx.plan
    for o in plan.owners:
        g = o.guidance
        cols = g.columns(plan.text_len, q.device)
        if cols.numel() == 0:
            continue
        coverage = plan.coverage(g, ctx.grid, q.shape[0], q.device)
        scale = None if g.confinement != "context" or blend is None else 1.0 - blend[:, :, 0]
        record_identifier(ctx.layer_index, q, k_text, heads, bias if g.confinement == "columns" else None,
                                cols, o.rows.to(q.device) > 0, coverage, g.product.threshold, scale)
