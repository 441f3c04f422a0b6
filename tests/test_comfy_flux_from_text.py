"""``productbg bank from-text`` on Flux.1, checked against a real ComfyUI 0.3.75 (issue 23 part 3).

The CLI reads the random full-size ``t5xxl_fp8_e4m3fn.safetensors`` of tests/flux_checkpoint.py (every encoder
tensor fp8, ``shared.weight`` fp16, as published) and writes a ``flux`` bank; ComfyUI's DualCLIPLoader (type flux)
loads the same file. The bank's vectors are the rows ComfyUI's T5 embedding lookup returns (its table is fp8:
ComfyUI builds the T5 in the encoder's dtype and casts ``shared.weight`` on load), not the file's fp16 rows, and
Category Prompt with the bank (through Load Category Bank) encodes exactly like CLIPTextEncode of the
description written as words. ComfyUI's own T5TokenizerOptions (min_length 0) keeps the T5 encodes unpadded:
three encodes of a full-size fp8 T5-XXL in all (Category Prompt's two, the words' one), ~15 s each on a CPU.

Runs in a pytest process of its own (scripts/test.sh runs every tests/test_comfy_flux*.py module alone).
"""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from productbg.cli import main

pytestmark = pytest.mark.comfyui

ROWS = {"marble": "marble table", "linen": "a linen cloth, softly folded"}


@pytest.fixture(scope="module")
def clip(comfy, comfy_flux_files):
    (clip,) = comfy.nodes.DualCLIPLoader().load_clip(comfy_flux_files["clip_l"], comfy_flux_files["t5xxl"], "flux")
    # ComfyUI's own T5 option node, min_length 0: no 256-token padding (the tokenizer and embedding path unchanged)
    (clip,) = comfy.node_class_mappings["T5TokenizerOptions"].execute(clip, 0, 0)
    return clip


@pytest.fixture(scope="module")
def bank_name(comfy, comfy_flux_files, tmp_path_factory):
    """The CLI's bank, written into a productbg_banks folder of the in-process ComfyUI."""
    root = tmp_path_factory.mktemp("flux_banks")
    comfy.pack_module("nodes.folders").register_model_folders()
    comfy.folder_paths.add_model_folder_path("productbg_banks", str(root))
    csv = root / "categories.csv"
    csv.write_text("category,description\n" + "".join(f'{n},"{d}"\n' for n, d in ROWS.items()), encoding="utf-8")
    out = root / "flux_from_text.safetensors"
    assert main(["bank", "from-text", str(csv), "--checkpoint", str(comfy_flux_files.paths["t5xxl"]),
                 "--out", str(out)]) == 0
    return out.name


def _ids(clip, text: str) -> list[int]:
    return [t[0] for t in clip.tokenize(text)["t5xxl"][0][:-1]]  # without T5's end token


def test_the_banks_vectors_are_the_rows_comfyuis_t5_looks_up(comfy, clip, bank_name, comfy_flux_files):
    bank = comfy.node_class_mappings["ProductBGLoadCategoryBank"].execute(bank_name)[0]
    t5 = clip.cond_stage_model.t5xxl.transformer
    assert t5.shared.weight.dtype == torch.float8_e4m3fn  # the fp16 table of the file, cast on load
    assert bank.family == "flux" and bank.training["t5xxl"]["model_dtype"] == "F8_E4M3"
    with safe_open(str(comfy_flux_files.paths["t5xxl"]), "pt") as f:
        assert f.get_slice("shared.weight").get_dtype() == "F16"
        raw = f.get_tensor("shared.weight")
    for name, description in ROWS.items():
        ids = _ids(clip, description)
        looked_up = t5.get_input_embeddings()(torch.tensor([ids]), out_dtype=torch.float32)[0]
        vectors = bank.vectors(name, "t5xxl")
        assert vectors.shape == (len(ids), 4096) and bank.vector_count(name) == len(ids)
        assert torch.equal(vectors.float(), looked_up), name
        assert not torch.equal(vectors.float(), raw[ids].float())  # the file's own fp16 rows are not what is used


def test_category_prompt_encodes_like_the_description_as_words(comfy, clip, bank_name):
    nodes, classes = comfy.nodes, comfy.node_class_mappings
    bank = classes["ProductBGLoadCategoryBank"].execute(bank_name)[0]
    conditioning, identifier = classes["ProductBGCategoryPrompt"].execute(clip, bank, "Linen", "", "")
    words = nodes.CLIPTextEncode().encode(clip, f"a product photo on a {ROWS['linen']} background")[0]
    assert len(identifier.token_indices) == len(_ids(clip, ROWS["linen"]))
    assert conditioning[0][0].shape == words[0][0].shape
    assert torch.equal(conditioning[0][0], words[0][0])
