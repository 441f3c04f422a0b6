"""Category banks from text, no training: a category's identifier is its description's own token embeddings.

``productbg bank from-text categories.csv --checkpoint FILE --out bank.safetensors`` reads rows
``category,background description``; each category's identifier vectors become the checkpoint's token input
embeddings (``text_encoder.get_input_embeddings().weight``) of its description's tokens, one vector per token,
per text encoder (CLIP-L on SD1.5; CLIP-L and OpenCLIP-G on SDXL, whose tokenizers give the same BPE tokens
for plain text: checked, and refused otherwise). Spliced into the Category Prompt in place of ``{id}``, the
vectors make the prompt encode exactly as the description written as plain words would, and Mask-Guided
Attention confines them to the background like a trained identifier.

Flux.1 (``--checkpoint`` a T5-XXL text-encoder file, ``t5xxl_fp16`` / ``t5xxl_fp8_e4m3fn``, or a Flux single file
that bundles one): a ``flux`` bank of T5-XXL vectors alone (Flux's CLIP-L only pools, from the identifier-free
prompt), T5's input embeddings of the description's tokens without T5's end token, as ComfyUI's model holds them
(fp8-rounded for an fp8 file: :mod:`.t5_file`). The tokens come from the T5 tokenizer ComfyUI uses (shipped in
``assets/t5_tokenizer``), and must be the description's tokens inside the bank's template too: Category Prompt
splices the vectors in place of T5 sentinel slots, so a description that T5 splits differently in the template is
refused, as one the two SDXL tokenizers split differently is.

Categories' descriptions have different token counts, so the bank records each category's own count
(:mod:`productbg.weights.bank_format`, schema 2); a description may have at most 75 tokens (one CLIP chunk; the
bank format's limit on T5 too, which has no chunks).
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Sequence

import torch

from ..weights.bank import CategoryBank
from ..weights.bank_format import MAX_VECTORS, DEFAULT_TEMPLATE, ENCODER_WIDTHS, TINY_FAMILY
from ..weights.bank_names import check_name
from ..weights.errors import WeightsError
from .errors import PipelineError
from ..weights.safefile import read_header
from .single_file import safetensors_checkpoint, token_embeddings
from .t5_file import rounding_note, t5_layout
from .text import T5_SLOT, clip_tokenizer, open_clip_tokenizer, t5_tokenizer

#: A header row that is skipped (case-insensitive).
HEADER = ("category", "description")


def read_categories_csv(path: str | os.PathLike, where: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """``(category, description)`` rows of a UTF-8 CSV (BOM tolerated; an optional ``category,description``
    header row). A row that is not two non-empty fields, or a category named twice, is one line naming the line.
    ``where``, when given, receives category -> ``"FILE line N"`` (for later messages about a row)."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PipelineError(f"{p.name}: not UTF-8 text (byte {e.start}); save the CSV as UTF-8") from None
    rows: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        for fields in reader:
            line = reader.line_num
            if not fields or all(not f.strip() for f in fields):
                continue
            if not rows and not seen and tuple(f.strip().casefold() for f in fields) == HEADER:
                continue
            if len(fields) != 2:
                raise PipelineError(f"{p.name} line {line}: expected 2 fields 'category,background description', "
                                    f"got {len(fields)} (quote a description that contains commas)")
            name, description = fields[0].strip(), " ".join(fields[1].split())
            if not description:
                raise PipelineError(f"{p.name} line {line}: category '{name}' has an empty description")
            try:
                name = check_name(name)
            except WeightsError as e:
                raise PipelineError(f"{p.name} line {line}: {e}") from None
            if name.casefold() in seen:
                raise PipelineError(f"{p.name} line {line}: category '{name}' is already on line "
                                    f"{seen[name.casefold()]} (names must differ beyond letter case)")
            seen[name.casefold()] = line
            if where is not None:
                where[name] = f"{p.name} line {line}"
            rows.append((name, description))
    except csv.Error as e:
        raise PipelineError(f"{p.name} line {reader.line_num}: {e}") from None
    if not rows:
        raise PipelineError(f"{p.name}: no categories (rows 'category,background description')")
    return rows


def description_tokens(tokenizers: Sequence, description: str, name: str = "") -> list[int]:
    """The description's token ids (no start/end tokens), the same in every tokenizer, at most 75."""
    ids = [list(tok(description, add_special_tokens=False).input_ids) for tok in tokenizers]
    what = f"category '{name}'" if name else repr(description)
    if any(i != ids[0] for i in ids[1:]):
        raise PipelineError(f"{what}: the CLIP-L and OpenCLIP-G tokenizers split the description differently; "
                            "reword it")
    if not ids[0]:
        raise PipelineError(f"{what}: the description has no tokens")
    if len(ids[0]) > MAX_VECTORS:
        raise PipelineError(f"{what}: the description is {len(ids[0])} tokens; the limit is {MAX_VECTORS} "
                            "(one CLIP prompt chunk): shorten it")
    return ids[0]


def description_vectors(tokenizers: Sequence, embeddings: dict[str, torch.Tensor], description: str,
                        name: str = "") -> dict[str, torch.Tensor]:
    """Encoder -> ``[tokens, width]``: the rows of each token input-embedding matrix for the description."""
    ids = torch.tensor(description_tokens(tokenizers, description, name))
    return {enc: emb[ids].clone() for enc, emb in embeddings.items()}


def bank_from_text(rows: Sequence[tuple[str, str]], checkpoint: str | os.PathLike,
                   template: str | None = None, where: dict[str, str] | None = None):
    """A :class:`~productbg.weights.bank.CategoryBank` for the checkpoint's family whose category vectors are
    the token embeddings of their descriptions (not saved).

    A single-file SD1.5 checkpoint whose CLIP is not 768 wide (a small self-trained model) gives a ``tiny``
    bank of its width; SDXL needs the full-size encoders (768 + 1280); a T5-XXL file gives a ``flux`` bank.
    """
    family, embeddings = token_embeddings(checkpoint)
    if family == "flux":
        return _flux_bank(rows, checkpoint, embeddings["t5xxl"], template or DEFAULT_TEMPLATE, where)
    tokenizers = [clip_tokenizer()] + ([open_clip_tokenizer()] if family == "sdxl" else [])
    widths = {enc: int(e.shape[1]) for enc, e in embeddings.items()}
    if any(int(e.shape[0]) != len(tokenizers[0]) for e in embeddings.values()):
        raise PipelineError(f"{Path(checkpoint).name}: the text encoders' vocabularies are not CLIP's "
                            f"{len(tokenizers[0])} tokens ({ {k: int(e.shape[0]) for k, e in embeddings.items()} })")
    if any(widths[enc] != ENCODER_WIDTHS[enc] for enc in widths):
        if family != "sd15":
            raise PipelineError(f"{Path(checkpoint).name}: SDXL text encoders {widths} are not the full-size "
                                f"{ENCODER_WIDTHS}; an sdxl bank needs them")
        family = TINY_FAMILY
    dtype = next(iter(embeddings.values())).dtype
    vectors = {}
    for name, text in rows:
        try:
            vectors[name] = description_vectors(tokenizers, embeddings, text, name)
        except PipelineError as e:
            raise PipelineError(f"{where[name]}: {e}" if where and name in where else str(e)) from None
    most = max(next(iter(v.values())).shape[0] for v in vectors.values())
    try:
        bank = CategoryBank(family, vectors_per_id=most, template=template or DEFAULT_TEMPLATE,
                            dtype=dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32,
                            width=widths["clip_l"] if family == TINY_FAMILY else None, varied_counts=True,
                            training={"from_text": Path(checkpoint).name, "steps": 0,
                                      "descriptions": dict(rows)})
        for name, v in vectors.items():
            bank.add(name, v)
    except WeightsError as e:
        raise PipelineError(str(e)) from None
    return bank


# ---------------------------------------------------------------------------------------------- Flux.1 (T5-XXL)
def t5_description_tokens(tokenizer, description: str, template: str = DEFAULT_TEMPLATE, name: str = "") -> list[int]:
    """The description's T5 token ids (no end token), at most 75, which must also be its tokens inside
    ``template``: the template with :data:`~.text.T5_SLOT` slots in place of ``{id}`` (what Category Prompt
    tokenizes), the slots replaced by these ids, must tokenize as the template with the description in words."""
    what = f"category '{name}'" if name else repr(description)
    enc = tokenizer(description, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc.input_ids)
    if not ids:
        raise PipelineError(f"{what}: the description has no tokens")
    unknown = sorted({description[a:b] for t, (a, b) in zip(ids, enc.offset_mapping) if t == tokenizer.unk_token_id})
    if unknown:
        raise PipelineError(f"{what}: T5's vocabulary has no token for {' '.join(unknown)!r} (it would read "
                            "<unk>); reword the description (T5 reads English best)")
    special = [tokenizer.convert_ids_to_tokens(t) for t in ids if t in tokenizer.all_special_ids]
    if special:
        raise PipelineError(f"{what}: the description contains T5's special token {special[0]!r}; remove it")
    if len(ids) > MAX_VECTORS:
        raise PipelineError(f"{what}: the description is {len(ids)} T5 tokens; the limit is {MAX_VECTORS} (the "
                            "bank format's): shorten it")
    slot_id = tokenizer.convert_tokens_to_ids(T5_SLOT)
    slots = tokenizer(template.replace("{id}", " ".join([T5_SLOT] * len(ids))), add_special_tokens=False).input_ids
    vectors = iter(ids)  # Category Prompt puts the k-th vector in place of the k-th slot
    spliced = [next(vectors, None) if t == slot_id else t for t in slots]
    words = tokenizer(template.replace("{id}", description), add_special_tokens=False).input_ids
    if spliced != words:
        raise PipelineError(f"{what}: T5 splits the description differently inside the template {template!r} "
                            "than alone, so its vectors would not encode as its words there; reword it (or the "
                            "template)")
    return ids


def _flux_bank(rows: Sequence[tuple[str, str]], checkpoint: str | os.PathLike, table: torch.Tensor, template: str,
               where: dict[str, str] | None) -> CategoryBank:
    """A ``flux`` bank: each category's vectors are rows of the T5's embedding table (as ComfyUI's model holds it)."""
    p = safetensors_checkpoint(checkpoint)
    layout = t5_layout(read_header(p))
    tok = t5_tokenizer()
    vectors = {}
    for name, text in rows:
        try:
            vectors[name] = {"t5xxl": table[torch.tensor(t5_description_tokens(tok, text, template, name))].clone()}
        except PipelineError as e:
            raise PipelineError(f"{where[name]}: {e}" if where and name in where else str(e)) from None
    most = max(v["t5xxl"].shape[0] for v in vectors.values())
    try:
        bank = CategoryBank("flux", vectors_per_id=most, template=template, dtype=table.dtype, varied_counts=True,
                            training={"from_text": p.name, "steps": 0, "descriptions": dict(rows),
                                      "t5xxl": {"source": layout.what, **rounding_note(layout)}})
        for name, v in vectors.items():
            bank.add(name, v)
    except WeightsError as e:
        raise PipelineError(str(e)) from None
    return bank
