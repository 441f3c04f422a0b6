"""Category bank, Category Prompt, Reference Style and Category LoRA nodes in a real ComfyUI.

Tiny bank / style-encoder / LoRA files are written in fixtures (real key names and shapes, random values),
plus a random full-size CLIP ViT-L vision checkpoint that ComfyUI's own CLIPVisionLoader recognises.
"""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_graphs import inpaint_and_save, product_box_mask
from comfy_model_files import BANK_FILE, STYLE_FILE, VISION_FILE

pytestmark = pytest.mark.comfyui

SIZE = 128


@pytest.fixture(scope="module")
def files(comfy_model_files):
    return comfy_model_files


def _graph(comfy, category="Coffee Mug", style_weight=0.8, lora=True, prefix="pbg_cat"):
    lo, hi = 16, 112
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": comfy.ckpt_inpaint}},
        **product_box_mask(SIZE, lo, hi),
        "bank": {"class_type": "ProductBGLoadCategoryBank", "inputs": {"bank_name": BANK_FILE}},
        "lora": {"class_type": "ProductBGCategoryLora", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "bank": ["bank", 0], "category": category,
            "lora_name": "(from bank)", "strength_model": 1.0, "strength_clip": 1.0}},
        "pos": {"class_type": "ProductBGCategoryPrompt", "inputs": {
            "clip": ["lora", 1] if lora else ["ckpt", 1], "bank": ["bank", 0], "category": category,
            "template": "", "extra_text": "soft light"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
        "attn": {"class_type": "ProductBGMaskGuidedAttention", "inputs": {
            "model": ["lora", 0] if lora else ["ckpt", 0], "identifier": ["pos", 1], "product_mask": ["mask", 0],
            "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}},
        "vision": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": VISION_FILE}},
        "style_enc": {"class_type": "ProductBGLoadStyleEncoder", "inputs": {"encoder_name": STYLE_FILE}},
        "reference": {"class_type": "EmptyImage", "inputs": {"width": 96, "height": 96, "batch_size": 1,
                                                             "color": 0x3366AA}},
        "style": {"class_type": "ProductBGReferenceStyle", "inputs": {
            "model": ["attn", 0], "style_encoder": ["style_enc", 0], "clip_vision": ["vision", 0],
            "reference": ["reference", 0], "weight": style_weight, "layer_preset": "all",
            "start_percent": 0.0, "end_percent": 1.0, "product_mask": ["mask", 0]}},
        **inpaint_and_save(SIZE, ["style", 0], seed=3, prefix=prefix),
    }
    return g


def _image(comfy, outputs):
    (path,) = comfy.saved_images(outputs)
    return np.asarray(Image.open(path), dtype=np.int16)


def test_category_style_lora_graph_runs_with_identifier_confined(comfy, files, caplog):
    """Bank → Category Prompt → Mask-Guided Attention → Reference Style → Category LoRA → inpaint sampling."""
    probe = comfy.pack_module("attention.probe")
    with probe.record() as rec, caplog.at_level(logging.WARNING):
        outputs = comfy.run(_graph(comfy))
    assert len(comfy.saved_images(outputs)) == 1
    bad = [(r.layer_index, r.grid_tokens, r.product_cells, r.max_mass_on_product) for r in rec.identifier
           if r.max_mass_on_product != 0]
    assert rec.layers() == set(range(16)) and not bad
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]


def test_categories_and_style_weight_change_the_image(comfy, files):
    """Two categories differ; style weight 0 vs 0.8 differ: each input really reaches the sampler."""
    base = _image(comfy, comfy.run(_graph(comfy, "Coffee Mug", lora=False, prefix="pbg_a")))
    other = _image(comfy, comfy.run(_graph(comfy, "运动鞋", lora=False, prefix="pbg_b")))
    no_style = _image(comfy, comfy.run(_graph(comfy, "Coffee Mug", style_weight=0.0, lora=False, prefix="pbg_c")))
    assert np.abs(base - other).max() > 1
    assert np.abs(base - no_style).max() > 1


def test_category_prompt_splices_vectors(comfy, files):
    """The identifier positions hold the bank's vectors: the conditioning changes when the vectors change."""
    nodes = comfy.node_class_mappings
    _, clip, _ = comfy.nodes.CheckpointLoaderSimple().load_checkpoint(comfy.ckpt_sd15)[:3]
    (bank,) = nodes["ProductBGLoadCategoryBank"].execute(BANK_FILE)
    prompt = nodes["ProductBGCategoryPrompt"]
    cond_a, spec = prompt.execute(clip, bank, "coffee mug", "", "")
    cond_b, spec_b = prompt.execute(clip, bank, "Leather Bag", "", "")
    assert spec.token_indices == spec_b.token_indices and len(spec.token_indices) == 2
    assert spec.token_indices[0] == 6  # <start> a product photo on a {id}...
    assert not torch.allclose(cond_a[0][0], cond_b[0][0])
    weighted, _ = prompt.execute(clip, bank, "Coffee Mug", "a product photo on a ({id}:1.3) background", "")
    assert not torch.allclose(weighted[0][0], cond_a[0][0])


@pytest.mark.parametrize("inputs, message", [
    ({"category": "Cofee Mug"}, "did you mean 'Coffee Mug'"),
    ({"template": "no slot here"}, "{id}"),
    ({"extra_text": "sks"}, "sks"),
])
def test_category_prompt_errors(comfy, files, inputs, message):
    nodes = comfy.node_class_mappings
    _, clip, _ = comfy.nodes.CheckpointLoaderSimple().load_checkpoint(comfy.ckpt_sd15)[:3]
    (bank,) = nodes["ProductBGLoadCategoryBank"].execute(BANK_FILE)
    args = {"category": "Coffee Mug", "template": "", "extra_text": "", **inputs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        nodes["ProductBGCategoryPrompt"].execute(clip, bank, **args)


def test_bad_graph_reports_node_error_and_comfy_keeps_working(comfy, files):
    with pytest.raises(AssertionError, match="did you mean"):
        comfy.run(_graph(comfy, category="Cofee Mug", prefix="pbg_bad"))
    assert comfy.saved_images(comfy.run(_graph(comfy, lora=False, prefix="pbg_after")))


def test_missing_file_says_where_to_put_it(comfy, files):
    with pytest.raises(ValueError, match="models/productbg/banks"):
        comfy.node_class_mappings["ProductBGLoadCategoryBank"].execute("nope.safetensors")


def test_from_text_bank_runs_the_category_path_confined(comfy, files, tmp_path):
    """``productbg bank from-text`` on the full-size random SD1.5-inpainting checkpoint: Category Prompt's
    conditioning equals the description written as plain words, and the category graph runs confined."""
    from productbg.cli import main

    ckpt = comfy.folder_paths.get_full_path("checkpoints", comfy.ckpt_inpaint)
    rows = {"Coffee Mug": "a cozy wooden kitchen counter", "运动鞋": "a clean concrete urban sidewalk at dawn"}
    csv = tmp_path / "cats.csv"
    csv.write_text("category,description\n" + "".join(f"{k},{v}\n" for k, v in rows.items()), encoding="utf-8-sig")
    assert main(["bank", "from-text", str(csv), "--checkpoint", ckpt,
                 "--out", str(files / "productbg_banks" / "from_text.safetensors")]) == 0
    nodes = comfy.node_class_mappings
    _, clip, _ = comfy.nodes.CheckpointLoaderSimple().load_checkpoint(comfy.ckpt_inpaint)[:3]
    (bank,) = nodes["ProductBGLoadCategoryBank"].execute("from_text.safetensors")
    assert bank.family == "sd15" and bank.vector_counts() != [bank.vectors_per_id] * 2
    for name, description in rows.items():
        cond, spec = nodes["ProductBGCategoryPrompt"].execute(clip, bank, name, "", "")
        assert len(spec.token_indices) == bank.vector_count(name) and spec.token_indices[0] == 6
        plain = clip.encode_from_tokens(clip.tokenize(f"a product photo on a {description} background"))
        torch.testing.assert_close(cond[0][0].float(), plain.float(), rtol=1e-3, atol=1e-3)
    probe = comfy.pack_module("attention.probe")
    graph = _graph(comfy, category="运动鞋", lora=False, prefix="pbg_from_text")
    graph["bank"]["inputs"]["bank_name"] = "from_text.safetensors"
    with probe.record() as rec:
        outputs = comfy.run(graph)
    assert len(comfy.saved_images(outputs)) == 1
    assert rec.layers() == set(range(16))
    assert all(r.max_mass_on_product == 0 for r in rec.identifier)
