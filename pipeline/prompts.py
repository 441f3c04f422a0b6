"""Category prompts on diffusers: the identifier's vectors in the text encoder, and where its tokens sit.

A bank may hold thousands of categories; rather than adding a token per category to the vocabulary, the
encoder reserves ``vectors_per_id`` placeholder tokens once and writes the current category's vectors into
the first of their embedding rows (as many as the category's own vector count) before encoding (what ComfyUI's Category Prompt does by splicing tensors into the token
list). Without identifiers the category's name is used as plain words and those words are confined instead
(the zero-shot "Background Words" behaviour).

SDXL (a second tokenizer and ``CLIPTextModelWithProjection``): the context is both encoders' penultimate hidden
states concatenated (768 + 1280), the pooled text embedding is the second encoder's projected output; an
``sdxl`` bank's ``clip_l`` vectors go into the first encoder, its ``clip_g`` vectors into the second, and the
identifier (or category words) must sit at the same positions in both tokenizations. When something is
confined, the positive *pooled* embedding is the identifier-free prompt's: it conditions every cell through
the time embedding, so taking it from the full prompt would be an unconfined path for the identifier.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from ..attention import IdentifierSpec
from ..weights.errors import WeightsError
from .errors import PipelineError
from .text import (DEFAULT_TEMPLATE, identifier_prompt, install_identifiers, tokenize_with_identifier,
                   without_positions, word_positions)

CACHE_SIZE = 64


def choose_template(template: str | None, identifiers: Any = None) -> str:
    """The prompt template: ``template``, else the bank's, else the default; it must hold ``{id}`` once.

    Raises:
        PipelineError: a template without ``{id}`` or with it twice.
    """
    chosen = template or getattr(identifiers, "template", None) or DEFAULT_TEMPLATE
    if chosen.count("{id}") != 1:
        raise PipelineError(f"the prompt template must contain {{id}} exactly once: {chosen!r}")
    return chosen


class PromptCache:
    """The last ``size`` encoded prompts, least recently used evicted first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[tuple, Any] = OrderedDict()

    def get(self, key: tuple, make: Callable[[], Any]) -> Any:
        """The cached value of ``key``, else ``make()`` (stored)."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = self._items[key] = make()
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value


@dataclass(frozen=True)
class EncodedPrompt:
    """Text conditioning of one category.

    Attributes:
        text: the prompt as written (placeholders shown as ``<pbg_0_i>``).
        cond: ``[1, 77, width]`` positive context.
        spec: where the identifier (or the category words) sits, with the identifier-free context
            (``plain_context``); None when nothing is confined.
        pooled: ``[1, width_2]`` pooled text embedding (SDXL; the identifier-free prompt's when confined),
            else None.
    """

    text: str
    cond: torch.Tensor
    spec: IdentifierSpec | None
    pooled: torch.Tensor | None = None


class PromptEncoder:
    """Encode category prompts with a text encoder, caching the last few.

    Args:
        tokenizer: the CLIP tokenizer (:func:`~productbg.pipeline.text.clip_tokenizer`); placeholder tokens
            are added to it.
        text_encoder: ``CLIPTextModel``; its input embeddings grow by ``vectors_per_id`` rows.
        identifiers: a category bank (or ``SeededIdentifiers``); None = zero-shot category words.
        tokenizer_2, text_encoder_2: SDXL's second tokenizer and ``CLIPTextModelWithProjection`` (both or
            neither).
        layers: hidden layer each encoder's context is read from (None: SD1.5's ``last_hidden_state``;
            SDXL: ``(-2, -2)``, the penultimate layers).
    """

    def __init__(self, tokenizer, text_encoder, identifiers=None, tokenizer_2=None, text_encoder_2=None,
                 layers: tuple[int, ...] | None = None) -> None:
        self.tokenizer, self.text_encoder, self.identifiers = tokenizer, text_encoder, identifiers
        if (tokenizer_2 is None) != (text_encoder_2 is None):
            raise PipelineError("a second text encoder needs its tokenizer (and the reverse)")
        self.tokenizers = (tokenizer,) if tokenizer_2 is None else (tokenizer, tokenizer_2)
        self.encoders = (text_encoder,) if text_encoder_2 is None else (text_encoder, text_encoder_2)
        self.encoder_names = ("clip_l",) if text_encoder_2 is None else ("clip_l", "clip_g")
        self.layers = layers if layers is not None else ((None,) if text_encoder_2 is None else (-2, -2))
        self._slots: list[torch.Tensor] | None = None
        self._cache: PromptCache = PromptCache(CACHE_SIZE)
        self._negative: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @property
    def dual(self) -> bool:
        """Whether this is SDXL's two-encoder set."""
        return len(self.encoders) == 2

    @property
    def width(self) -> int:
        """Width of the text encoder's embeddings."""
        return int(self.text_encoder.get_input_embeddings().weight.shape[1])

    def template(self, template: str | None) -> str:
        """The template to use: the given one, else the bank's, else the default."""
        return choose_template(template, self.identifiers)

    def encode(self, category: str | None, template: str | None = None, extra: str = "") -> EncodedPrompt:
        """The positive conditioning of ``category`` (None: the template without identifier, nothing confined)."""
        return self._cache.get((category, template, extra), lambda: self._encode_new(category, template, extra))

    def _encode_new(self, category: str | None, template: str | None, extra: str) -> EncodedPrompt:
        if not category:
            return self._plain(self.template(template).replace("{id}", "").replace("  ", " "), extra)
        if self.identifiers is None:
            return self._words(category, self.template(template), extra)
        return self._identifier(category, self.template(template), extra)

    def negative(self, text: str = "") -> torch.Tensor:
        """``[1, 77, width]`` negative context of ``text``."""
        return self._negative_pair(text)[0]

    def negative_pooled(self, text: str = "") -> torch.Tensor | None:
        """``[1, width_2]`` pooled embedding of the negative prompt (SDXL), else None."""
        return self._negative_pair(text)[1]

    def _negative_pair(self, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if text not in self._negative:
            if self.dual and not text.strip():  # SDXL's force_zeros_for_empty_prompt, as diffusers does
                ctx, pooled = self._encode(self._ids(""))
                self._negative[text] = (torch.zeros_like(ctx), torch.zeros_like(pooled))
            else:
                self._negative[text] = self._encode(self._ids(text))
        return self._negative[text]

    # ------------------------------------------------------------------ the three kinds of prompt
    def _identifier(self, category: str, template: str, extra: str) -> EncodedPrompt:
        vectors = []
        for name, encoder in zip(self.encoder_names, self.encoders):
            try:
                v = self.identifiers.vectors(category, name) if self.dual else self.identifiers.vectors(category)
            except WeightsError as e:
                raise PipelineError(str(e)) from None
            width = int(encoder.get_input_embeddings().weight.shape[1])
            if v.ndim != 2 or v.shape[1] != width:
                raise PipelineError(f"category '{category}': identifier vectors are {list(v.shape)}, the text "
                                    f"encoder is {width} wide (a bank for another base model?)")
            vectors.append(v)
        slots = self._install(vectors)
        words = " ".join(self.tokenizer.convert_ids_to_tokens(slots[0].tolist()))
        text = identifier_prompt(template, words, extra)
        tokenized = [tokenize_with_identifier(tok, text, s) for tok, s in zip(self.tokenizers, slots)]
        ids = tuple(t[0] for t in tokenized)
        spec = self._same_positions([t[1] for t in tokenized], text)
        return self._confined(text, ids, spec)

    def _words(self, category: str, template: str, extra: str) -> EncodedPrompt:
        text = identifier_prompt(template, category.strip(), extra)
        try:
            specs = [word_positions(tok, text, category.strip()) for tok in self.tokenizers]
        except ValueError as e:
            raise PipelineError(f"category '{category}': {e}") from None
        return self._confined(text, self._ids(text), self._same_positions(specs, text))

    def _same_positions(self, specs: list[IdentifierSpec], text: str) -> IdentifierSpec:
        if any(s.token_indices != specs[0].token_indices for s in specs[1:]):
            raise PipelineError(f"the confined words sit at different token positions in the two tokenizations "
                                f"of {text!r}; reword the prompt")
        return specs[0]

    def _confined(self, text: str, ids: tuple[torch.Tensor, ...], spec: IdentifierSpec) -> EncodedPrompt:
        cond, _ = self._encode(ids)
        plain, plain_pooled = self._encode(tuple(without_positions(i, spec.token_indices) for i in ids))
        return EncodedPrompt(text, cond, replace(spec, plain_context=plain), plain_pooled)

    def _plain(self, text: str, extra: str) -> EncodedPrompt:
        text = f"{text}, {extra}" if extra.strip() else text
        cond, pooled = self._encode(self._ids(text))
        return EncodedPrompt(text, cond, None, pooled)

    # ------------------------------------------------------------------ helpers
    def _install(self, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Write each encoder's ``vectors`` into its first placeholder rows; their ids.

        The placeholders are reserved on first use, as many as the bank's ``vectors_per_id`` (the most any of
        its categories has): a category with fewer vectors (each has its own count) uses the first of them."""
        count = int(vectors[0].shape[0])
        if self._slots is None:
            most = max(count, int(getattr(self.identifiers, "vectors_per_id", count)))
            self._slots = []
            for tok, enc, v in zip(self.tokenizers, self.encoders, vectors):
                reserve = torch.zeros(1, most, v.shape[1])
                self._slots.append(install_identifiers(tok, enc, reserve).token_ids[0])
            if any(not torch.equal(s, self._slots[0]) for s in self._slots[1:]):
                raise PipelineError("the two tokenizers gave the identifier different token ids")
        if count > self._slots[0].numel():
            raise PipelineError(f"an identifier of {count} vectors, but {self._slots[0].numel()} placeholders were "
                                "reserved (the bank's vectors_per_id)")
        used = [s[:count] for s in self._slots]
        for enc, slots, v in zip(self.encoders, used, vectors):
            emb = enc.get_input_embeddings().weight
            with torch.no_grad():
                emb[slots.to(emb.device)] = v.to(emb)
        return used

    def _ids(self, text: str) -> tuple[torch.Tensor, ...]:
        return tuple(tok(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
                     for tok in self.tokenizers)

    def _run(self, ids: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self._encode(ids if isinstance(ids, tuple) else (ids,))[0]

    @torch.no_grad()
    def _encode(self, ids: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Context ``[1, 77, width]`` (encoders concatenated) and the pooled embedding (SDXL) of token ids."""
        hidden, pooled = [], None
        for enc, layer, x in zip(self.encoders, self.layers, ids):
            device = enc.get_input_embeddings().weight.device
            out = enc(x.to(device), output_hidden_states=layer is not None)
            hidden.append(out.last_hidden_state if layer is None else out.hidden_states[layer])
            if getattr(out, "text_embeds", None) is not None:
                pooled = out.text_embeds.float()
        return torch.cat([h.float() for h in hidden], dim=-1), pooled
