"""Category prompts on diffusers: the identifier's vectors in the text encoder, and where its tokens sit.

A bank may hold thousands of categories; rather than adding a token per category to the vocabulary, the
encoder reserves ``vectors_per_id`` placeholder tokens once and writes the current category's vectors into
their embedding rows before encoding (what ComfyUI's Category Prompt does by splicing tensors into the token
list). Without identifiers the category's name is used as plain words and those words are confined instead
(the zero-shot "Background Words" behaviour).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace

import torch


from ..attention import IdentifierSpec
from .errors import PipelineError
from .text import (DEFAULT_TEMPLATE, identifier_prompt, install_identifiers, tokenize_with_identifier,
                   without_positions, word_positions)

CACHE_SIZE = 64


@dataclass(frozen=True)
class EncodedPrompt:
    """Text conditioning of one category.

    Attributes:
        text: the prompt as written (placeholders shown as ``<pbg_0_i>``).
        cond: ``[1, 77, width]`` positive context.
        spec: where the identifier (or the category words) sits, with the identifier-free context
            (``plain_context``); None when nothing is confined.
    """

    text: str
    cond: torch.Tensor
    spec: IdentifierSpec | None


class PromptEncoder:
    """Encode category prompts with a text encoder, caching the last few.

    Args:
        tokenizer: the CLIP tokenizer (:func:`~productbg.pipeline.text.clip_tokenizer`); placeholder tokens
            are added to it.
        text_encoder: ``CLIPTextModel``; its input embeddings grow by ``vectors_per_id`` rows.
        identifiers: a category bank (or ``SeededIdentifiers``); None = zero-shot category words.
    """

    def __init__(self, tokenizer, text_encoder, identifiers=None) -> None:
        self.tokenizer, self.text_encoder, self.identifiers = tokenizer, text_encoder, identifiers
        self._slots: torch.Tensor | None = None
        self._cache: OrderedDict[tuple, EncodedPrompt] = OrderedDict()
        self._negative: dict[str, torch.Tensor] = {}

    @property
    def width(self) -> int:
        """Width of the text encoder's embeddings."""
        return int(self.text_encoder.get_input_embeddings().weight.shape[1])

    def template(self, template: str | None) -> str:
        """The template to use: the given one, else the bank's, else the default."""
        chosen = template or getattr(self.identifiers, "template", None) or DEFAULT_TEMPLATE
        if chosen.count("{id}") != 1:
            raise PipelineError(f"the prompt template must contain {{id}} exactly once: {chosen!r}")
        return chosen

    def encode(self, category: str | None, template: str | None = None, extra: str = "") -> EncodedPrompt:
        """The positive conditioning of ``category`` (None: the template without identifier, nothing confined)."""
        key = (category, template, extra)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if not category:
            result = self._plain(self.template(template).replace("{id}", "").replace("  ", " "), extra)
        elif self.identifiers is None:
            result = self._words(category, self.template(template), extra)
        else:
            result = self._identifier(category, self.template(template), extra)
        self._cache[key] = result
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return result

    def negative(self, text: str = "") -> torch.Tensor:
        """``[1, 77, width]`` negative context of ``text``."""
        if text not in self._negative:
            self._negative[text] = self._run(self._ids(text))
        return self._negative[text]

    # ------------------------------------------------------------------ the three kinds of prompt
    def _identifier(self, category: str, template: str, extra: str) -> EncodedPrompt:
        from ..weights.errors import WeightsError

        try:
            vectors = self.identifiers.vectors(category)
        except WeightsError as e:
            raise PipelineError(str(e)) from None
        if vectors.ndim != 2 or vectors.shape[1] != self.width:
            raise PipelineError(f"category '{category}': identifier vectors are {list(vectors.shape)}, the text "
                                f"encoder is {self.width} wide (a bank for another base model?)")
        slots = self._install(vectors)
        words = " ".join(self.tokenizer.convert_ids_to_tokens(slots.tolist()))
        text = identifier_prompt(template, words, extra)
        ids, spec = tokenize_with_identifier(self.tokenizer, text, slots)
        return EncodedPrompt(text, self._run(ids), self._with_plain(spec, ids))

    def _words(self, category: str, template: str, extra: str) -> EncodedPrompt:
        text = identifier_prompt(template, category.strip(), extra)
        try:
            spec = word_positions(self.tokenizer, text, category.strip())
        except ValueError as e:
            raise PipelineError(f"category '{category}': {e}") from None
        ids = self._ids(text)
        return EncodedPrompt(text, self._run(ids), self._with_plain(spec, ids))

    def _with_plain(self, spec: IdentifierSpec, ids: torch.Tensor) -> IdentifierSpec:
        return replace(spec, plain_context=self._run(without_positions(ids, spec.token_indices)))

    def _plain(self, text: str, extra: str) -> EncodedPrompt:
        text = f"{text}, {extra}" if extra.strip() else text
        return EncodedPrompt(text, self._run(self._ids(text)), None)

    # ------------------------------------------------------------------ helpers
    def _install(self, vectors: torch.Tensor) -> torch.Tensor:
        """Write ``vectors`` into the placeholder rows (reserving them on first use); their token ids."""
        if self._slots is None or self._slots.numel() != vectors.shape[0]:
            if self._slots is not None:
                raise PipelineError("identifiers with different vector counts in one run")
            self._slots = install_identifiers(self.tokenizer, self.text_encoder, vectors[None].float()).token_ids[0]
        emb = self.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            emb[self._slots.to(emb.device)] = vectors.to(emb)
        return self._slots

    def _ids(self, text: str) -> torch.Tensor:
        return self.tokenizer(text, padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids

    @torch.no_grad()
    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        device = self.text_encoder.get_input_embeddings().weight.device
        return self.text_encoder(ids.to(device)).last_hidden_state.float()
