"""Shared bits of the node classes: custom type names, errors, token helpers. No ComfyUI import."""
from __future__ import annotations

IDENTIFIER = "PRODUCTBG_IDENTIFIER"
BANK = "PRODUCTBG_BANK"
STYLE = "PRODUCTBG_STYLE"
CLIP_END_TOKEN = 49407
CLIP_START_TOKEN = 49406


class NodeInputError(ValueError):
    """Bad node input; ComfyUI shows the message on the node and keeps running."""


def clip_token_ids(tokens: dict, strip_special: bool = False) -> list[list[int]]:
    """Integer token ids per 77-token chunk of ComfyUI's ``clip.tokenize`` output (SD1.5 key ``l``).

    Spliced embedding vectors (tensors) become -1 so they never match a word.
    """
    if "l" not in tokens:
        raise NodeInputError(f"this CLIP has no CLIP-L tokens (keys {sorted(tokens)}); productbg supports SD1.5")
    chunks = []
    for chunk in tokens["l"]:
        ids = [t[0] if isinstance(t[0], int) else -1 for t in chunk]
        if strip_special:
            ids = [i for i in ids if i not in (CLIP_START_TOKEN, CLIP_END_TOKEN)]
        chunks.append(ids)
    return chunks


def find_subsequence(chunks: list[list[int]], target: list[int]) -> list[int]:
    """Flat positions (chunk·77 + index) of the first occurrence of ``target`` in any chunk, else []."""
    for c, ids in enumerate(chunks):
        for start in range(len(ids) - len(target) + 1):
            if ids[start:start + len(target)] == target:
                return [c * len(ids) + start + i for i in range(len(target))]
    return []


def without_positions(tokens: dict, positions: list[int]) -> dict:
    """ComfyUI token lists with the tokens at flat ``positions`` removed from the SD1.5 chunks (``l``).

    Each chunk keeps its length: later tokens move up and the chunk's last entry (padding, or EOS in a full
    chunk) fills the end. Tokens are per-word in CLIP's BPE, so this is the prompt without those words.
    """
    out = {key: [list(chunk) for chunk in chunks] for key, chunks in tokens.items()}
    chunk_len = len(out["l"][0])
    by_chunk: dict[int, set[int]] = {}
    for p in positions:
        by_chunk.setdefault(p // chunk_len, set()).add(p % chunk_len)
    for c, drop in by_chunk.items():
        chunk = out["l"][c]
        kept = [t for i, t in enumerate(chunk) if i not in drop]
        out["l"][c] = kept + [chunk[-1]] * (chunk_len - len(kept))
    return out


def plain_context(clip, tokens: dict, positions: list[int]):
    """[1, L, 768] context of the prompt without the tokens at ``positions`` (what product cells attend to)."""
    return clip.encode_from_tokens(without_positions(tokens, positions)).detach()


def check_mask_batch(mask, image, name: str = "mask"):
    """A MASK [B,H,W] resized to an IMAGE [B,H,W,C] (bilinear), with batch 1 broadcast; clear errors."""
    import torch.nn.functional as F

    if mask.ndim == 2:
        mask = mask[None]
    if mask.shape[0] not in (1, image.shape[0]):
        raise NodeInputError(f"{name} has {mask.shape[0]} masks for {image.shape[0]} images: give one mask, "
                             "or one per image")
    if tuple(mask.shape[1:]) != tuple(image.shape[1:3]):
        mask = F.interpolate(mask[:, None].float(), size=tuple(image.shape[1:3]), mode="bilinear")[:, 0]
    return mask.expand(image.shape[0], -1, -1)


def check_sd15(model) -> None:
    """Refuse models productbg's patches do not fit (SDXL, SD2, Flux...) with a message naming what it is."""
    config = model.model.model_config
    context = config.unet_config.get("context_dim")
    if context != 768 or config.unet_config.get("model_channels") != 320:
        raise NodeInputError(f"this is a {type(config).__name__} model (text context {context}); productbg's "
                             "attention patches are for SD1.5 / SD1.5-inpainting checkpoints")
