"""Shared bits of the node classes: custom type names, errors, token helpers. No ComfyUI import (the V3 types
built from these names are in ``schema.py``)."""
from __future__ import annotations

import math
import uuid
from typing import Optional

import torch
import torch.nn.functional as F

from ..attention import IdentifierSpec, ProductMask
from ..attention.comfy_patch import PROMPT_TAG_KEY
from ..backbones import BACKBONES, BackboneError, from_comfy_config, from_token_keys
from ..weights.bank_fit import bank_fit_problem

IDENTIFIER = "PRODUCTBG_IDENTIFIER"
BANK = "PRODUCTBG_BANK"
STYLE = "PRODUCTBG_STYLE"
PLACEMENT = "PRODUCTBG_PLACEMENT"
CLIP_END_TOKEN = 49407
CLIP_START_TOKEN = 49406
#: End-of-text token per token list, where it is not CLIP's; T5 has no start token and pads with 0.
END_TOKENS = {"t5xxl": 1}
#: The entry that fills a chunk's end when tokens are removed, where it is not the chunk's own last entry.
PAD_ENTRIES = {"t5xxl": (0, 1.0)}


class NodeInputError(ValueError):
    """Bad node input; ComfyUI shows the message on the node and keeps running."""


def sigma_range(model, start_percent: float, end_percent: float) -> tuple[float, float]:
    """(sigma_start, sigma_end) of a sampling window given in progress fractions; the full range stays (inf, 0), so
    the attention runs no per-step sigma test. NodeInputError when the window is reversed."""
    if start_percent > end_percent:
        raise NodeInputError(f"start_percent {start_percent} is after end_percent {end_percent}")
    sampling = model.get_model_object("model_sampling")
    return (math.inf if start_percent <= 0 else float(sampling.percent_to_sigma(start_percent)),
            0.0 if end_percent >= 1 else float(sampling.percent_to_sigma(end_percent)))


def product_mask_of(mask) -> ProductMask:
    """The product MASK as a :class:`ProductMask`; NodeInputError when it is empty."""
    product = ProductMask(mask)
    if not product.mask.any():
        raise NodeInputError("the product mask is empty (all 0): connect the product's mask (1 = product)")
    return product


def backbone_of_clip(tokens: dict):
    """The backbone of a ComfyUI CLIP from its ``clip.tokenize`` output (``l``: SD1.5; ``g`` + ``l``: SDXL;
    ``l`` + ``t5xxl``: Flux.1)."""
    try:
        return from_token_keys(tokens.keys())
    except BackboneError as e:
        raise NodeInputError(f"CLIP: {e}") from None


def backbone_of(model):
    """The backbone of a ComfyUI MODEL (from its ``model_config`` class and ``unet_config``); NodeInputError
    naming the family for anything else (SD2, SD3, Flux.1 Kontext, FLUX.2, an SDXL refiner...)."""
    config = model.model.model_config
    try:
        return from_comfy_config(type(config).__name__, config.unet_config)
    except BackboneError as e:
        raise NodeInputError(f"MODEL: {e}") from None


def token_ids(tokens: dict, key: str = "l", strip_special: bool = False) -> list[list[int]]:
    """Integer token ids per chunk of one list (``l``, ``g``, ``t5xxl``) of ComfyUI's ``clip.tokenize`` output.

    Spliced embedding vectors (tensors) become -1 so they never match a word. ``strip_special`` keeps only
    the words: what lies before the first end token, after CLIP's start token (SDXL's ``g`` and T5 pad with 0,
    which is also a CLIP word's id, so padding is cut by position, not by value).
    """
    end = END_TOKENS.get(key, CLIP_END_TOKEN)
    chunks = []
    for chunk in tokens[key]:
        ids = [t[0] if isinstance(t[0], int) else -1 for t in chunk]
        if strip_special:
            ids = ids[:ids.index(end)] if end in ids else ids
            if key != "t5xxl":
                ids = [i for i in ids if i != CLIP_START_TOKEN]
        chunks.append(ids)
    return chunks


def clip_token_ids(tokens: dict, strip_special: bool = False) -> list[list[int]]:
    """:func:`token_ids` of the CLIP-L list ``l`` (SD1.5 and SDXL both have it)."""
    if "l" not in tokens:
        backbone_of_clip(tokens)  # names the family (SDXL refiner, SD2, SD3...)
        raise NodeInputError(f"this CLIP has no CLIP-L tokens (keys {sorted(tokens)})")
    return token_ids(tokens, "l", strip_special)


def find_subsequence(chunks: list[list[int]], target: list[int]) -> list[int]:
    """Flat positions (chunk·77 + index) of the first occurrence of ``target`` in any chunk, else []."""
    for c, ids in enumerate(chunks):
        for start in range(len(ids) - len(target) + 1):
            if ids[start:start + len(target)] == target:
                return [c * len(ids) + start + i for i in range(len(target))]
    return []


def word_positions(clip, tokens: dict, words: str, name: str = "background_words") -> dict[str, list[int]]:
    """Flat positions of ``words`` in each token list of the prompt ``tokens`` ({} when absent from a list).

    On UNets the lists must agree (CLIP-L and SDXL's CLIP-G attend at the same positions): NodeInputError when
    they do not. Flux's T5 and CLIP-L tokenize differently, and only T5's positions are attended to; CLIP-L's
    are where the words are removed for the identifier-free pooled vector.
    """
    target = clip.tokenize(words)
    found = {}
    for key in tokens:
        ids = token_ids(target, key, strip_special=True)[0]
        if not ids:
            raise NodeInputError(f"{name} is empty: name the prompt words that describe the background")
        found[key] = find_subsequence(token_ids(tokens, key), ids)
    if "t5xxl" not in tokens and len({tuple(p) for p in found.values()}) > 1:
        raise NodeInputError(f"{words!r} sits at different token positions in the CLIP-L and CLIP-G "
                             f"tokenizations ({found}); rephrase the prompt (avoid custom embeddings there)")
    return found if all(found.values()) else {}


def without_positions(tokens: dict, positions: dict[str, list[int]]) -> dict:
    """ComfyUI token lists with the tokens at flat ``positions[key]`` removed from each list.

    Each chunk keeps its length: later tokens move up and the end fills with padding — the chunk's last entry
    (EOS for CLIP-L, 0 for SDXL's CLIP-G, EOS in a full chunk), T5's pad token. Tokens are per-word in CLIP's BPE
    and T5's sentencepiece, so this is the prompt without those words.
    """
    out = {key: [list(chunk) for chunk in chunks] for key, chunks in tokens.items()}
    for key, chunks in out.items():
        chunk_len = len(chunks[0])
        by_chunk: dict[int, set[int]] = {}
        for p in positions.get(key, ()):
            by_chunk.setdefault(p // chunk_len, set()).add(p % chunk_len)
        for c, drop in by_chunk.items():
            chunk = chunks[c]
            kept = [t for i, t in enumerate(chunk) if i not in drop]
            chunks[c] = kept + [PAD_ENTRIES.get(key, chunk[-1])] * (chunk_len - len(kept))
    return out


def context_key(backbone) -> str:
    """The token list whose positions the model attends at (``l`` on UNets, ``t5xxl`` on Flux)."""
    return backbone.bank_encoders[0].comfy_key


def encode_confined(clip, tokens: dict, plain_tokens: dict, backbone) -> tuple[list, "object"]:
    """The prompt's CONDITIONING and its identifier-free context (``plain_tokens``: the prompt without the
    identifier).

    On a backbone with a pooled text embedding (SDXL's CLIP-G, Flux's CLIP-L) the CONDITIONING's
    ``pooled_output`` is the identifier-free prompt's: it reaches every cell, product included, through the time
    embedding or the modulation, so the full prompt's would carry the identifier onto the product. The diffusers
    pipeline does the same.
    """
    conditioning = clip.encode_from_tokens_scheduled(tokens)
    if not any(t.pooled for t in backbone.text_encoders):
        return conditioning, clip.encode_from_tokens(plain_tokens).detach()
    plain, pooled = clip.encode_from_tokens(plain_tokens, return_pooled=True)
    conditioning = [[c, {**extra, "pooled_output": pooled}] if "pooled_output" in extra else [c, extra]
                    for c, extra in conditioning]
    return conditioning, plain.detach()


def confined_prompt(clip, tokens: dict, positions: dict[str, list[int]], backbone,
                    plain_tokens: dict | None = None) -> tuple[list, "object"]:
    """The prompt's CONDITIONING and its :class:`IdentifierSpec` (identifier at flat ``positions`` per token
    list; the prompt without it is ``plain_tokens``, by default ``tokens`` without those positions).

    The CONDITIONING carries the spec's tag (``comfy_patch.PROMPT_TAG_KEY``) so that sampling can tell when a node
    rebuilt its tensor — confinement would then be lost — and refuse instead of sampling unconfined.
    """
    if plain_tokens is None:
        plain_tokens = without_positions(tokens, positions)
    conditioning, plain = encode_confined(clip, tokens, plain_tokens, backbone)
    tag = uuid.uuid4().hex
    conditioning = [[c, {**extra, PROMPT_TAG_KEY: tag}] for c, extra in conditioning]
    key = context_key(backbone)
    spec = IdentifierSpec(tuple(positions[key]), context_length=sum(len(chunk) for chunk in tokens[key]),
                          plain_context=plain, prompt_context=conditioning[0][0].detach(), tag=tag)
    return conditioning, spec


def check_bank_fits(bank, backbone, model: str = "MODEL") -> None:
    """Refuse a bank (its identifiers and LoRAs) made for another backbone (the one check every host shares)."""
    problem = bank_fit_problem(bank.family, backbone, model)
    if problem is not None:
        raise NodeInputError(problem)


def check_identifier_fits(identifier, backbone) -> None:
    """Refuse an identifier encoded by another backbone's CLIP (its context width differs)."""
    ctx = identifier.plain_context if identifier.plain_context is not None else identifier.prompt_context
    if ctx is not None and ctx.shape[-1] != backbone.context_dim:
        other = next((b.label for b in BACKBONES.values() if b.context_dim == ctx.shape[-1]), f"{ctx.shape[-1]}-wide")
        raise NodeInputError(f"the identifier comes from an {other} CLIP but the MODEL is {backbone.label}: encode "
                             f"it with the CLIP of the same {backbone.label} checkpoint")


def as_masks(mask: torch.Tensor, hw: tuple[int, int], name: str) -> torch.Tensor:
    """A MASK (``[B, H, W]`` or one ``[H, W]``) as ``[B, H, W]`` float of size ``hw`` (resized bilinearly when its
    size differs), clamped to 0..1; NodeInputError for any other shape."""
    mask = mask.float()
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise NodeInputError(f"{name} must be a MASK [B, H, W], got shape {tuple(mask.shape)}")
    if tuple(mask.shape[1:]) != tuple(hw):
        mask = F.interpolate(mask[:, None], size=tuple(hw), mode="bilinear", align_corners=False)[:, 0]
    return mask.clamp(0.0, 1.0)


def as_mask_batch(mask: Optional[torch.Tensor], images: torch.Tensor, name: str) -> Optional[torch.Tensor]:
    """``mask`` as ``[B, H, W]`` matching ``images`` ``[B, H, W, C]`` (see :func:`as_masks`), a batch of 1
    repeated; any other batch size is a NodeInputError naming both counts. None stays None."""
    if mask is None:
        return None
    mask = as_masks(mask, tuple(images.shape[1:3]), name)
    batch = images.shape[0]
    if mask.shape[0] not in (1, batch):
        raise NodeInputError(f"{name} has {mask.shape[0]} masks but there are {batch} images; give one mask, "
                             f"or one per image")
    return mask.expand(batch, *mask.shape[1:])
