"""Text side on diffusers/transformers: the CLIP and T5 tokenizers from shipped files and identifier prompts.

The CLIP tokenizer is built from the BPE vocabulary in ``assets/clip_tokenizer`` (OpenAI CLIP, MIT), never from
a hub name: offline, ``from_pretrained("openai/clip-vit-large-patch14")`` would fail or, worse, silently give a
useless tokenizer. Flux.1's T5-XXL tokenizer is read from ``assets/t5_tokenizer`` (Google's T5 v1.1 vocabulary,
Apache-2.0: the very files ComfyUI tokenizes T5 prompts with), a local folder, never a hub name. Identifier
vectors enter the text encoder as placeholder tokens whose input-embedding rows hold the category's learned
vectors (textual-inversion style).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ..attention.identifier import CLIP_CONTEXT, IdentifierSpec

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "clip_tokenizer"
CLIP_VOCAB_SIZE = 49408
T5_ASSETS = ASSETS.parent / "t5_tokenizer"
#: Tokens of T5's tokenizer: 32,000 SentencePiece pieces and 100 sentinels (T5-XXL's embedding table has 32,128 rows).
T5_VOCAB_SIZE = 32100
#: Category Prompt's identifier slot on T5 (``nodes/category_nodes.SLOT_WORDS``): a sentinel, one id, never a word.
T5_SLOT = "<extra_id_0>"
DEFAULT_TEMPLATE = "a product photo on a {id} background"


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    vocab = json.loads((ASSETS / "vocab.json").read_text(encoding="utf-8"))
    lines = (ASSETS / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = tuple(tuple(line.split()) for line in lines if line and not line.startswith("#version"))
    return vocab, merges


#: OpenCLIP ViT-bigG/14 (SDXL's second text encoder) pads with "!" (id 0) instead of the end-of-text token.
OPEN_CLIP_PAD = "!"


def clip_tokenizer(pad_token: str | None = None):
    """A fresh CLIP tokenizer built from the shipped vocabulary; 49,408 tokens.

    Args:
        pad_token: None for CLIP ViT-L/14's (SD1.5, SDXL's first encoder: pads with end-of-text);
            :data:`OPEN_CLIP_PAD` for SDXL's second encoder (same vocabulary, pads with ``!``).
    """
    # optional dependency: transformers
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    extra = {} if pad_token is None else {"pad_token": pad_token}
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=CLIP_CONTEXT, **extra)
    if len(tok) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"shipped CLIP vocabulary gave {len(tok)} tokens, expected {CLIP_VOCAB_SIZE}")
    return tok


def open_clip_tokenizer():
    """SDXL's second tokenizer (OpenCLIP ViT-bigG/14): the shipped CLIP vocabulary, padding with ``!``."""
    tok = clip_tokenizer(OPEN_CLIP_PAD)
    if tok.pad_token_id != 0:
        raise RuntimeError(f"OpenCLIP tokenizer pads with id {tok.pad_token_id}, expected 0")
    return tok


def t5_tokenizer():
    """A fresh T5-XXL tokenizer (``T5TokenizerFast``, as ComfyUI builds it) from the shipped ``assets/t5_tokenizer``
    folder, offline; 32,100 tokens, end token ``</s>`` (1), pad ``<pad>`` (0), unknown ``<unk>`` (2)."""
    # optional dependency: transformers
    from transformers import T5TokenizerFast

    tok = T5TokenizerFast.from_pretrained(str(T5_ASSETS), local_files_only=True)
    if len(tok) != T5_VOCAB_SIZE:
        raise RuntimeError(f"shipped T5 tokenizer gave {len(tok)} tokens, expected {T5_VOCAB_SIZE}")
    return tok


def placeholder(category: int, vector: int) -> str:
    return f"<pbg_{category}_{vector}>"


@dataclass
class IdentifierVocab:
    """Placeholder tokens installed in a tokenizer + text encoder for a bank's categories."""

    token_ids: torch.Tensor  # [categories, vectors]

    def words(self, category: int) -> str:
        return " ".join(placeholder(category, v) for v in range(self.token_ids.shape[1]))


def install_identifiers(tokenizer, text_encoder, vectors: torch.Tensor) -> IdentifierVocab:
    """Add one placeholder token per identifier vector and write the vectors into the input embeddings.

    Args:
        tokenizer: a CLIP tokenizer (``clip_tokenizer()``).
        text_encoder: a transformers ``CLIPTextModel``.
        vectors: [categories, vectors_per_identifier, width] (a bank's ``clip_l``).
    """
    cats, per, width = vectors.shape
    emb = text_encoder.get_input_embeddings()
    if emb.weight.shape[1] != width:
        raise ValueError(f"identifier vectors are {width} wide, the text encoder expects {emb.weight.shape[1]}")
    names = [placeholder(c, v) for c in range(cats) for v in range(per)]
    tokenizer.add_tokens(names)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    ids = torch.tensor(tokenizer.convert_tokens_to_ids(names)).view(cats, per)
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight[ids.flatten()] = vectors.reshape(-1, width).to(emb.weight)
    return IdentifierVocab(ids)


def identifier_prompt(template: str, identifier_words: str, extra: str = "") -> str:
    """Fill ``{id}`` of a template with the identifier's placeholder words, plus optional free words."""
    if "{id}" not in template:
        raise ValueError(f"prompt template {template!r} has no {{id}} placeholder")
    text = template.replace("{id}", identifier_words)
    return f"{text}, {extra}" if extra.strip() else text


def tokenize_with_identifier(tokenizer, prompt: str, identifier_ids: torch.Tensor) -> tuple[torch.Tensor, IdentifierSpec]:
    """Token ids [1, 77] of ``prompt`` and where the identifier's tokens sit in them."""
    ids = tokenizer(prompt, padding="max_length", max_length=CLIP_CONTEXT, truncation=True,
                    return_tensors="pt").input_ids
    positions = torch.isin(ids[0], identifier_ids.flatten()).nonzero().flatten().tolist()
    if len(positions) != identifier_ids.numel():
        raise ValueError(f"the identifier did not fit in the prompt's {CLIP_CONTEXT} tokens: shorten the prompt")
    return ids, IdentifierSpec(tuple(positions), CLIP_CONTEXT)


def word_positions(tokenizer, prompt: str, words: str) -> IdentifierSpec:
    """Positions of ``words``' tokens inside ``prompt`` (zero-shot confinement of ordinary prompt words)."""
    ids = tokenizer(prompt, padding="max_length", max_length=CLIP_CONTEXT, truncation=True).input_ids
    target = tokenizer(words, add_special_tokens=False).input_ids
    if not target:
        raise ValueError("no words to confine")
    for start in range(len(ids) - len(target) + 1):
        if ids[start:start + len(target)] == target:
            return IdentifierSpec(tuple(range(start, start + len(target))), CLIP_CONTEXT)
    raise ValueError(f"{words!r} does not occur in the prompt {prompt!r}")


def without_positions(ids: torch.Tensor, positions: tuple[int, ...]) -> torch.Tensor:
    """Token ids [B, T] with the tokens at ``positions`` removed; later tokens move up and the last id
    (padding, or EOS in a full prompt) fills the end: the prompt without those words, for the identifier-free
    context of ``context`` confinement."""
    drop = set(positions)
    keep = torch.tensor([i for i in range(ids.shape[1]) if i not in drop], dtype=torch.long)
    kept = ids[:, keep]
    return torch.cat([kept, ids[:, -1:].expand(-1, ids.shape[1] - kept.shape[1])], dim=1)
