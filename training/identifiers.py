"""Trainable identifier vectors inside the frozen CLIP text encoder(s) (textual-inversion style).

:func:`productbg.pipeline.text.install_identifiers` adds one placeholder token per vector and writes the initial
vectors into the text encoder's input-embedding rows. For training, :class:`IdentifierEmbedding` then stands in
for the input embedding: every other row stays the frozen original, the placeholder rows are read from one small
``nn.Parameter`` — so the optimizer (and its state) only ever sees the identifier vectors, and no other row can
move. :func:`write_back` puts the trained vectors into the embedding rows again.
"""
from __future__ import annotations

from typing import Any, Sequence

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


class IdentifierText(nn.Module):
    """A base model's frozen text encoder(s), each with trainable identifier vectors, encoding as inference does.

    SD1.5: the context is CLIP-L's last hidden state. SDXL: both encoders' penultimate hidden states concatenated
    (768 + 1280) and the pooled embedding is OpenCLIP-G's projected output, as
    :class:`productbg.pipeline.prompts.PromptEncoder` encodes them. Every encoder gets the same placeholder
    token ids, so one set of token ids per encoder addresses one category's identifier in all of them.

    Args:
        tokenizers, encoders: one per text encoder, in context order.
        init_vectors: one ``[categories, vectors, width]`` per encoder.
    """

    def __init__(self, tokenizers: Sequence[Any], encoders: Sequence[nn.Module],
                 init_vectors: Sequence[torch.Tensor]) -> None:
        super().__init__()
        vocabs, embeddings = zip(*(attach(t, e, v) for t, e, v in zip(tokenizers, encoders, init_vectors)))
        if any(not torch.equal(v.token_ids, vocabs[0].token_ids) for v in vocabs[1:]):
            raise ValueError("the tokenizers gave the identifier placeholders different token ids")
        self.encoders = nn.ModuleList(encoders)
        self.embeddings = nn.ModuleList(embeddings)
        self.tokenizers = tuple(tokenizers)
        self.vocab: IdentifierVocab = vocabs[0]

    @property
    def names(self) -> tuple[str, ...]:
        """The bank's names of the encoders' vectors (``clip_l``, ``clip_g``)."""
        return ("clip_l", "clip_g")[:len(self.encoders)]

    def encode(self, ids: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Context and pooled embedding of one ``[B, 77]`` token-id tensor per encoder (:func:`encode_prompt`)."""
        return encode_prompt(self.encoders, ids)

    def identifier_vectors(self) -> dict[str, torch.Tensor]:
        """Encoder name -> ``[categories, vectors, width]`` current vectors."""
        return {name: e.identifier_vectors() for name, e in zip(self.names, self.embeddings)}


def encode_prompt(encoders: Sequence[nn.Module], ids: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Context ``[B, 77, sum of widths]`` and pooled embedding (SDXL, else None) of one ``[B, 77]`` token-id tensor
    per encoder: one encoder (SD1.5) gives its last hidden state; two (SDXL) give their penultimate hidden states
    concatenated and the second one's projected output as the pooled embedding."""
    dual = len(encoders) > 1
    hidden, pooled = [], None
    for enc, x in zip(encoders, ids):
        out = enc(x.to(enc.device), output_hidden_states=dual)
        hidden.append(out.hidden_states[-2] if dual else out.last_hidden_state)
        if getattr(out, "text_embeds", None) is not None:
            pooled = out.text_embeds
    return (torch.cat(hidden, dim=-1) if dual else hidden[0]), pooled
