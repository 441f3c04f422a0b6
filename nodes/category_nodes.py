"""Category bank nodes: load a bank, build a category prompt with the identifier spliced in."""
from __future__ import annotations

from ..attention import IdentifierSpec
from ..weights.bank import CategoryBank, load_bank
from ..weights.errors import WeightsError
from .common import BANK, IDENTIFIER, NodeInputError, clip_token_ids, plain_context
from .folders import full_path, list_files

CATEGORY = "productbg/category"
# A word that CLIP tokenizes as one token; each identifier vector takes the place of one copy of it.
SLOT_WORD = "sks"


class LoadCategoryBank:
    """Load a category bank (.safetensors) from models/productbg/banks."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (BANK,)
    RETURN_NAMES = ("bank",)
    FUNCTION = "load"
    DESCRIPTION = "Loads a category bank: learned identifier vectors for many product categories."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"bank_name": (list_files("productbg_banks"), {
            "tooltip": "Files in ComfyUI/models/productbg/banks (.safetensors)."})}}

    def load(self, bank_name: str):
        try:
            return (load_bank(full_path("productbg_banks", bank_name)),)
        except WeightsError as e:
            raise NodeInputError(f"{bank_name}: {e}") from None


def _slot_positions(chunks: list[list[int]], slot_id: int) -> list[tuple[int, int]]:
    return [(c, i) for c, ids in enumerate(chunks) for i, t in enumerate(ids) if t == slot_id]


def _splice(tokens: dict, slots: list[tuple[int, int]], vectors) -> list[int]:
    """Put the identifier vectors in place of the slot tokens of ComfyUI's token lists; flat positions."""
    chunk_len = len(tokens["l"][0])
    for (c, i), vector in zip(slots, vectors):
        tokens["l"][c][i] = (vector,) + tuple(tokens["l"][c][i][1:])
    return [c * chunk_len + i for c, i in slots]


class CategoryPrompt:
    """Encode the category's prompt: template with the identifier vectors in place of {id}, plus free words."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING", IDENTIFIER)
    RETURN_NAMES = ("conditioning", "identifier")
    FUNCTION = "encode"
    DESCRIPTION = "One model for every category: the bank's identifier for this category replaces {id}."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "clip": ("CLIP", {"tooltip": "CLIP of an SD1.5 checkpoint."}),
            "bank": (BANK, {"tooltip": "From Load Category Bank."}),
            "category": ("STRING", {"default": "", "tooltip": "Category name as stored in the bank "
                                    "(case-insensitive for Latin scripts)."}),
            "template": ("STRING", {"default": "", "tooltip": "Prompt with {id}; empty = the bank's template. "
                                    "Weighting like ({id}:1.2) works."}),
            "extra_text": ("STRING", {"default": "", "multiline": True,
                                      "tooltip": "Free words appended to the prompt (lighting, mood...)."}),
        }}

    def encode(self, clip, bank: CategoryBank, category: str, template: str, extra_text: str):
        if bank.family != "sd15":
            raise NodeInputError(f"this bank is for {bank.family}; Category Prompt supports SD1.5 banks")
        try:
            vectors = bank.vectors(category)
        except WeightsError as e:
            raise NodeInputError(str(e)) from None
        template = template.strip() or bank.template
        if template.count("{id}") != 1:
            raise NodeInputError(f"the template must contain {{id}} exactly once: {template!r}")
        slot_words = " ".join([SLOT_WORD] * vectors.shape[0])
        text = template.replace("{id}", slot_words) + (f", {extra_text.strip()}" if extra_text.strip() else "")
        tokens = clip.tokenize(text)
        (slot_id,) = clip_token_ids(clip.tokenize(SLOT_WORD), strip_special=True)[0]
        slots = _slot_positions(clip_token_ids(tokens), slot_id)
        if len(slots) != vectors.shape[0]:
            raise NodeInputError(f"do not use the word {SLOT_WORD!r} in the template or extra text")
        plain = plain_context(clip, tokens, [c * len(tokens["l"][0]) + i for c, i in slots])
        positions = _splice(tokens, slots, vectors)
        conditioning = clip.encode_from_tokens_scheduled(tokens)
        spec = IdentifierSpec(tuple(positions), context_length=77 * len(tokens["l"]), plain_context=plain,
                              prompt_context=conditioning[0][0].detach())
        return (conditioning, spec)
