"""Category bank nodes: load a bank, pick a category, build a category prompt with the identifier spliced in."""
from __future__ import annotations

from comfy_api.latest import io

from ..weights.bank import CategoryBank, load_bank
from ..weights.errors import WeightsError
from .common import (NodeInputError, backbone_of_clip, check_bank_fits, confined_prompt, context_key, token_ids,
                     without_positions)
from .folders import full_path, list_files
from .schema import Bank, Identifier

CATEGORY = "productbg/category"
# A word that CLIP tokenizes as one token; each identifier vector takes the place of one copy of it.
SLOT_WORD = "sks"
#: The slot on T5 (Flux), whose sentencepiece splits "sks" into letters: a sentinel token, one id, never a word.
SLOT_WORDS = {"t5xxl": "<extra_id_0>"}


class LoadCategoryBank(io.ComfyNode):
    """Load a category bank (.safetensors) from models/productbg/banks."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProductBGLoadCategoryBank", display_name="Load Category Bank (productbg)", category=CATEGORY,
            description="Loads a category bank: learned identifier vectors for many product categories.",
            inputs=[io.Combo.Input("bank_name", options=list_files("productbg_banks"),
                                   tooltip="Files in ComfyUI/models/productbg/banks (.safetensors).")],
            outputs=[Bank.Output(display_name="bank", tooltip="The bank, for Category, Category Prompt and "
                                 "Category LoRA (names from the header; vectors read on lookup).")])

    @classmethod
    def execute(cls, bank_name: str) -> io.NodeOutput:
        try:
            return io.NodeOutput(load_bank(full_path("productbg_banks", bank_name)))
        except WeightsError as e:
            raise NodeInputError(f"{bank_name}: {e}") from None


class CategoryName(io.ComfyNode):
    """One place to switch: a category of the bank, fed to every node that needs it (Category Prompt, Category LoRA)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProductBGCategory", display_name="Category (productbg)", category=CATEGORY,
            description=("One category for the whole workflow: connect its output to the category input of Category "
                         "Prompt and Category LoRA, and switch every node here. Click the category to pick from the "
                         "bank's list."),
            inputs=[
                Bank.Input("bank", tooltip="From Load Category Bank: the names to pick from, and the check."),
                io.String.Input("category", default="", tooltip="Category name as stored in the bank (click to pick "
                                "from the bank's list; type to filter). Latin names are case-insensitive."),
            ],
            outputs=[io.String.Output(display_name="category", tooltip="The category's name as stored in the bank.")])

    @classmethod
    def execute(cls, bank: CategoryBank, category: str) -> io.NodeOutput:
        try:
            return io.NodeOutput(bank.resolve(category))
        except WeightsError as e:
            raise NodeInputError(str(e)) from None


def _slot_positions(tokens: dict, slot_ids: dict[str, int]) -> dict[str, list[int]]:
    """Flat positions (chunk·length + index) of the slot in each token list that takes identifier vectors; the
    same in every such list (``l``; SDXL's ``g``)."""
    found = {key: [c * len(ids) + i for c, ids in enumerate(token_ids(tokens, key)) for i, t in enumerate(ids)
                   if t == slot_id] for key, slot_id in slot_ids.items()}
    if len({tuple(p) for p in found.values()}) > 1:
        raise NodeInputError(f"the identifier slots sit at different positions in the CLIP-L and CLIP-G "
                             f"tokenizations ({found}); simplify the template or extra text")
    return found


def _splice(tokens: dict, positions: dict[str, list[int]], vectors: dict) -> None:
    """Put each encoder's identifier vectors (``{"l": [n, 768], "g": [n, 1280]}``) in place of the slot tokens."""
    for key, vecs in vectors.items():
        chunk_len = len(tokens[key][0])
        for p, vector in zip(positions[key], vecs):
            c, i = divmod(p, chunk_len)
            tokens[key][c][i] = (vector,) + tuple(tokens[key][c][i][1:])


class CategoryPrompt(io.ComfyNode):
    """Encode the category's prompt: template with the identifier vectors in place of {id}, plus free words."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProductBGCategoryPrompt", display_name="Category Prompt (productbg)", category=CATEGORY,
            description="One model for every category: the bank's identifier for this category replaces {id}.",
            inputs=[
                io.Clip.Input("clip", tooltip="CLIP of an SD1.5 or SDXL checkpoint, or Flux.1's DualCLIPLoader "
                              "(T5-XXL + CLIP-L, type flux): the bank's family."),
                Bank.Input("bank", tooltip="From Load Category Bank."),
                io.String.Input("category", default="", tooltip="Category name as stored in the bank "
                                "(case-insensitive for Latin scripts)."),
                io.String.Input("template", default="", tooltip="Prompt with {id}; empty = the bank's template. "
                                "Weighting like ({id}:1.2) works."),
                io.String.Input("extra_text", default="", multiline=True,
                                tooltip="Free words appended to the prompt (lighting, mood...)."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="conditioning", tooltip="The prompt with the category's "
                                       "identifier vectors spliced in: the sampler's positive."),
                Identifier.Output(display_name="identifier", tooltip="Where the identifier's tokens sit: for "
                                  "Mask-Guided Attention, which keeps them off the product."),
            ])

    @classmethod
    def execute(cls, clip, bank: CategoryBank, category: str, template: str, extra_text: str) -> io.NodeOutput:
        template = template.strip() or bank.template
        if template.count("{id}") != 1:
            raise NodeInputError(f"the template must contain {{id}} exactly once: {template!r}")
        backbone = backbone_of_clip(clip.tokenize(SLOT_WORD))
        vectors = _bank_vectors(bank, category, backbone)
        count = next(iter(vectors.values())).shape[0]
        slot = SLOT_WORDS.get(context_key(backbone), SLOT_WORD)
        extra = f", {extra_text.strip()}" if extra_text.strip() else ""
        tokens = clip.tokenize(template.replace("{id}", " ".join([slot] * count)) + extra)
        slot_tokens = clip.tokenize(slot)
        positions = _slot_positions(tokens, {key: token_ids(slot_tokens, key, strip_special=True)[0][0]
                                             for key in vectors})
        if any(len(p) != count for p in positions.values()):
            raise NodeInputError(f"do not use {slot!r} in the template or extra text")
        _splice(tokens, positions, vectors)
        plain = without_positions(tokens, positions)
        # An encoder that only pools (Flux's CLIP-L) gets the prompt without the identifier in both encodings.
        pooled_only = [t.comfy_key for t in backbone.text_encoders if not t.in_context]
        if pooled_only:
            free = clip.tokenize(template.replace("{id}", "").strip() + extra)
            for key in pooled_only:
                tokens[key] = plain[key] = free[key]
        return io.NodeOutput(*confined_prompt(clip, tokens, positions, backbone, plain))


def _bank_vectors(bank: CategoryBank, category: str, backbone) -> dict:
    """ComfyUI token-list key -> the category's ``[n, width]`` vectors for that text encoder."""
    check_bank_fits(bank, backbone, "CLIP")
    try:
        return {t.comfy_key: bank.vectors(category, t.name) for t in backbone.bank_encoders}
    except WeightsError as e:
        raise NodeInputError(str(e)) from None
