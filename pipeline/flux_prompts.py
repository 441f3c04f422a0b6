"""Category prompts on Flux.1: T5-XXL's text with the identifier spliced in, its identifier-free twin, and the
pooled CLIP-L vector of the prompt without the identifier.

As ComfyUI's Category Prompt does on a ``flux`` bank: the template's ``{id}`` becomes as many T5 sentinel tokens
(``<extra_id_0>``, one id, never a word) as the category has vectors, the prompt is tokenized by T5 (end token
``</s>``, padded with ``<pad>`` to at least 256 tokens: ComfyUI's Flux T5 tokenizer's ``min_length``; at most 512,
diffusers' limit), and the k-th sentinel's input embedding is replaced by the k-th vector. The identifier-free
prompt is the same token list without the sentinels (later tokens move up, padding fills the end), encoded by the
same T5 — the free stream of joint confinement (``attention/joint``). CLIP-L only pools: its input is the template
without ``{id}`` (plus the extra words) in every case, so the identifier never reaches the modulation.

Without a bank the category's name is written as words and those words are confined (the zero-shot reading);
without a category nothing is confined.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import IdentifierSpec
from ..weights.errors import WeightsError
from .errors import PipelineError
from .flux_models import T5_MIN_LENGTH
from .prompts import PromptCache, choose_template
from .text import CLIP_CONTEXT, T5_SLOT, identifier_prompt

#: diffusers' FluxPipeline ``max_sequence_length`` limit.
T5_MAX_TOKENS = 512
CACHE_SIZE = 16


@dataclass(frozen=True)
class FluxPrompt:
    """Text conditioning of one Flux prompt.

    Attributes:
        text: the prompt as written (the identifier shown as its sentinel slots).
        context: ``[1, L, 4096]`` T5's last hidden state of the prompt (identifier spliced in), float32.
        pooled: ``[1, 768]`` CLIP-L's pooled output of the prompt without the identifier, float32.
        spec: where the identifier (or the category words) sits in T5's tokens, with the identifier-free T5
            context as ``plain_context``; None when nothing is confined.
    """

    text: str
    context: torch.Tensor
    pooled: torch.Tensor
    spec: IdentifierSpec | None


class FluxPromptEncoder:
    """Encode Flux prompts (T5-XXL + CLIP-L), caching the last few.

    Args:
        t5: ``T5EncoderModel``. t5_tokenizer: the shipped T5 tokenizer.
        clip_l: ``CLIPTextModel``. clip_tokenizer: the shipped CLIP tokenizer.
        identifiers: a ``flux`` category bank (``t5xxl`` vectors), or None (category words, zero-shot).
    """

    def __init__(self, t5, t5_tokenizer, clip_l, clip_tokenizer, identifiers=None) -> None:
        self.t5, self.t5_tokenizer, self.clip_l, self.clip_tokenizer = t5, t5_tokenizer, clip_l, clip_tokenizer
        self.identifiers = identifiers
        self.slot_id = int(t5_tokenizer.convert_tokens_to_ids(T5_SLOT))
        self._cache = PromptCache(CACHE_SIZE)
        self._negative: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def template(self, template: str | None) -> str:
        """The template to use: the given one, else the bank's, else the default."""
        chosen = choose_template(template, self.identifiers)
        if T5_SLOT in chosen:
            raise PipelineError(f"do not use {T5_SLOT!r} in the template: it is the identifier's slot")
        return chosen

    def encode(self, category: str | None, template: str | None = None, extra: str = "") -> FluxPrompt:
        """The positive conditioning of ``category`` (None: the template without identifier, nothing confined)."""
        return self._cache.get((category, template, extra), lambda: self._encode_new(category, template, extra))

    def _encode_new(self, category: str | None, template: str | None, extra: str) -> FluxPrompt:
        chosen = self.template(template)
        if T5_SLOT in extra:
            raise PipelineError(f"do not use {T5_SLOT!r} in the extra words: it is the identifier's slot")
        pooled = self.pooled(identifier_prompt(chosen, "", extra).replace("  ", " ").strip())
        if not category:
            text = identifier_prompt(chosen, "", extra).replace("  ", " ").strip()
            return FluxPrompt(text, self.t5_context(self.t5_ids(text)), pooled, None)
        if self.identifiers is None:
            return self._words(category.strip(), chosen, extra, pooled)
        return self._identifier(category, chosen, extra, pooled)

    def negative(self, text: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """``([1, L, 4096], [1, 768])``: T5 context and pooled CLIP-L of a negative prompt (used when CFG ≠ 1)."""
        if text not in self._negative:
            self._negative[text] = (self.t5_context(self.t5_ids(text)), self.pooled(text))
        return self._negative[text]

    # ------------------------------------------------------------------ the kinds of prompt
    def _identifier(self, category: str, template: str, extra: str, pooled: torch.Tensor) -> FluxPrompt:
        try:
            vectors = self.identifiers.vectors(category, "t5xxl")
        except WeightsError as e:
            raise PipelineError(str(e)) from None
        width = int(self.t5.get_input_embeddings().weight.shape[1])
        if vectors.ndim != 2 or vectors.shape[1] != width:
            raise PipelineError(f"category '{category}': identifier vectors are {list(vectors.shape)}, T5 is {width} "
                                "wide (a bank for another base model?)")
        text = identifier_prompt(template, " ".join([T5_SLOT] * vectors.shape[0]), extra)
        ids = self.t5_ids(text)
        positions = tuple((ids[0] == self.slot_id).nonzero().flatten().tolist())
        if len(positions) != vectors.shape[0]:
            raise PipelineError(f"category '{category}': T5 did not keep the identifier's {vectors.shape[0]} slots "
                                "in the prompt; simplify the template or the extra words")
        return self._confined(text, ids, positions, pooled, vectors)

    def _words(self, words: str, template: str, extra: str, pooled: torch.Tensor) -> FluxPrompt:
        text = identifier_prompt(template, words, extra)
        ids = self.t5_ids(text)
        target = self.t5_tokenizer(words, add_special_tokens=False).input_ids
        row = ids[0].tolist()
        start = next((s for s in range(len(row) - len(target) + 1) if row[s:s + len(target)] == target), None)
        if not target or start is None:
            raise PipelineError(f"category '{words}': T5 splits these words differently inside the prompt {text!r}; "
                                "reword the category or the template")
        return self._confined(text, ids, tuple(range(start, start + len(target))), pooled)

    def _confined(self, text: str, ids: torch.Tensor, positions: tuple[int, ...], pooled: torch.Tensor,
                  vectors: torch.Tensor | None = None) -> FluxPrompt:
        context = self.t5_context(ids, positions if vectors is not None else (), vectors)
        plain = self.t5_context(self.without(ids, positions))
        spec = IdentifierSpec(positions, int(ids.shape[1]), plain_context=plain)
        return FluxPrompt(text, context, pooled, spec)

    # ------------------------------------------------------------------ tokens and encoders
    def t5_ids(self, text: str) -> torch.Tensor:
        """``[1, L]`` T5 token ids of ``text`` (end token, padded to at least 256); PipelineError past 512."""
        ids = self.t5_tokenizer(text).input_ids
        if len(ids) > T5_MAX_TOKENS:
            raise PipelineError(f"the prompt is {len(ids)} T5 tokens; the limit is {T5_MAX_TOKENS}: shorten the "
                                "template or the extra words")
        pad = int(self.t5_tokenizer.pad_token_id)
        return torch.tensor([ids + [pad] * max(0, T5_MIN_LENGTH - len(ids))], dtype=torch.long)

    def without(self, ids: torch.Tensor, positions: tuple[int, ...]) -> torch.Tensor:
        """``ids`` without the tokens at ``positions``; later tokens move up and padding fills the end."""
        drop = set(positions)
        kept = [t for i, t in enumerate(ids[0].tolist()) if i not in drop]
        return torch.tensor([kept + [int(self.t5_tokenizer.pad_token_id)] * (ids.shape[1] - len(kept))])

    @torch.no_grad()
    def t5_context(self, ids: torch.Tensor, positions: tuple[int, ...] = (),
                   vectors: torch.Tensor | None = None) -> torch.Tensor:
        """``[1, L, width]`` float32: T5's last hidden state of ``ids``, the input embeddings at ``positions``
        replaced by ``vectors`` (the splice of Category Prompt)."""
        table = self.t5.get_input_embeddings()
        embeds = table(ids.to(table.weight.device))
        if vectors is not None:
            embeds[0, list(positions)] = vectors.to(embeds)
        return self.t5(inputs_embeds=embeds).last_hidden_state.float()

    @torch.no_grad()
    def pooled(self, text: str) -> torch.Tensor:
        """``[1, width]`` float32: CLIP-L's pooled output of ``text``."""
        ids = self.clip_tokenizer(text, padding="max_length", max_length=CLIP_CONTEXT, truncation=True,
                                  return_tensors="pt").input_ids
        device = self.clip_l.get_input_embeddings().weight.device
        return self.clip_l(ids.to(device)).pooler_output.float()
