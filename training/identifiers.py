"""Trainable identifier vectors inside a frozen CLIP text encoder (textual-inversion style).

:func:`productbg.pipeline.text.install_identifiers` adds one placeholder token per vector and writes the initial
vectors into the text encoder's input-embedding rows. For training, :class:`IdentifierEmbedding` then stands in
for the input embedding: every other row stays the frozen original, the placeholder rows are read from one small
``nn.Parameter`` — so the optimizer (and its state) only ever sees the identifier vectors, and no other row can
move. :func:`write_back` puts the trained vectors into the embedding rows again.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..pipeline.text import IdentifierVocab, install_identifiers


class IdentifierEmbedding(nn.Module):
    """Frozen token embedding + trainable placeholder rows.

    Args:
        base: the text encoder's ``nn.Embedding`` (placeholder tokens already installed).
        token_ids: ``[categories, vectors]`` placeholder ids (contiguous, as ``install_identifiers`` adds them).
    """

    def __init__(self, base: nn.Embedding, token_ids: torch.Tensor) -> None:
        super().__init__()
        flat = token_ids.flatten()
        first = int(flat[0])
        if not torch.equal(flat, torch.arange(first, first + flat.numel())):
            raise ValueError("placeholder token ids must be consecutive")
        self.base, self.first, self.count = base, first, flat.numel()
        self.shape = tuple(token_ids.shape)
        self.vectors = nn.Parameter(base.weight[first:first + self.count].detach().clone().float())
        base.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:
        """The base embedding matrix (what ``get_input_embeddings().weight`` callers expect)."""
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        local = ids - self.first
        sel = (local >= 0) & (local < self.count)
        rows = self.vectors[local.clamp(0, self.count - 1)].to(out.dtype)
        return torch.where(sel[..., None], rows, out)

    def identifier_vectors(self) -> torch.Tensor:
        """``[categories, vectors, width]`` current vectors."""
        return self.vectors.view(*self.shape, -1)


def initial_vectors(tokenizer, text_encoder, names: Sequence[str], vectors_per_id: int, init: str) -> torch.Tensor:
    """``[categories, vectors, width]`` starting vectors.

    ``init="name"``: every vector = the mean embedding of the category name's tokens (falls back to
    "background" for a name with no tokens); ``init="background"``: the embedding of "background".
    """
    emb = text_encoder.get_input_embeddings().weight.detach().float()

    def mean_of(text: str) -> torch.Tensor:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        return emb[ids].mean(0) if ids else mean_of("background")

    rows = [mean_of(name if init == "name" else "background") for name in names]
    return torch.stack(rows)[:, None].repeat(1, vectors_per_id, 1)


def attach(tokenizer, text_encoder, init_vectors: torch.Tensor) -> tuple[IdentifierVocab, IdentifierEmbedding]:
    """Install placeholders for ``init_vectors`` and swap in an :class:`IdentifierEmbedding`."""
    vocab = install_identifiers(tokenizer, text_encoder, init_vectors)
    wrapper = IdentifierEmbedding(text_encoder.get_input_embeddings(), vocab.token_ids)
    text_encoder.set_input_embeddings(wrapper)
    return vocab, wrapper


def write_back(text_encoder, wrapper: IdentifierEmbedding) -> None:
    """Copy trained vectors into the embedding rows and restore the plain ``nn.Embedding``."""
    with torch.no_grad():
        wrapper.base.weight[wrapper.first:wrapper.first + wrapper.count] = wrapper.vectors.to(wrapper.base.weight)
    text_encoder.set_input_embeddings(wrapper.base)
