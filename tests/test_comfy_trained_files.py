"""Files written by `productbg train-cg` / `train-pg` on the full-size SD1.5-inpainting shapes load in a real
ComfyUI and act.

Two CG training steps on a tiny BG-synth set against the random full-size checkpoint the harness built: the bank
must load with Load Category Bank, the kohya LoRA with Category LoRA (every key patched), and both must change
the sampled image. One PG step (64 px) from the test style encoder, with the random ViT-L CLIP vision model the
other ComfyUI tests use (as a transformers folder: its ComfyUI config + the same weights): the written
style_encoder.safetensors must load with Load Style Encoder, and through Reference Style give an image that
differs from the untrained encoder's and from no style, while the pasted-back product stays as it was.
"""
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_graphs import inpaint_and_save, product_box_mask
from comfy_model_files import STYLE_FILE, VISION_FILE

pytestmark = pytest.mark.comfyui

SIZE = 96
ENV = dict(os.environ, HF_HUB_OFFLINE="1")
CLI = [sys.executable, "-c", "import sys; from productbg.cli import main; sys.exit(main(sys.argv[1:]))"]
TRAINED_STYLE = "trained_style.safetensors"
PG_SIZE, PG_BOX = 64, (16, 48)          # the style graphs: 64 px (8x8 latents) keeps three renders quick


def _synth(dest: Path) -> Path:
    subprocess.run(CLI + ["dataset", "synth", str(dest), "--categories", "2", "--per-category", "2",
                          "--held-out", "1", "--size", "64"], check=True, env=ENV, capture_output=True)
    return dest


@pytest.fixture(scope="module")
def trained(comfy, comfy_model_files, tmp_path_factory):
    """Runs the real CLI in a subprocess; copies its bank and LoRA into the registered model folders."""
    work = tmp_path_factory.mktemp("train_cg")
    ckpt = comfy.folder_paths.get_full_path("checkpoints", comfy.ckpt_inpaint)
    _synth(work / "data")
    run = subprocess.run(CLI + ["train-cg", "--data", str(work / "data"), "--model", ckpt, "--output",
                                str(work / "run"), "--resolution", "64", "--max-steps", "2", "--batch-size", "1",
                                "--lr", "1e-2", "--no-progress", "--checkpoint-every", "0", "--cpu"],
                         env=ENV, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    shutil.copy(work / "run" / "category_bank.safetensors", comfy_model_files / "productbg_banks" / "trained_bank.safetensors")
    shutil.copy(work / "run" / "unet_lora.safetensors", comfy_model_files / "loras" / "trained_lora.safetensors")
    return work


def _graph(comfy, category: str, lora_strength: float, prefix: str) -> dict:
    lo, hi = 16, 80
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": comfy.ckpt_inpaint}},
        "bank": {"class_type": "ProductBGLoadCategoryBank", "inputs": {"bank_name": "trained_bank.safetensors"}},
        "lora": {"class_type": "ProductBGCategoryLora", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "bank": ["bank", 0], "category": category,
            "lora_name": "trained_lora.safetensors", "strength_model": lora_strength, "strength_clip": 0.0}},
        **product_box_mask(SIZE, lo, hi),
        "pos": {"class_type": "ProductBGCategoryPrompt", "inputs": {
            "clip": ["lora", 1], "bank": ["bank", 0], "category": category, "template": "", "extra_text": ""}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
        "attn": {"class_type": "ProductBGMaskGuidedAttention", "inputs": {
            "model": ["lora", 0], "identifier": ["pos", 1], "product_mask": ["mask", 0], "strength": 1.0,
            "start_percent": 0.0, "end_percent": 1.0}},
        **inpaint_and_save(SIZE, ["attn", 0], seed=5, prefix=prefix),
    }


def _render(comfy, *args) -> np.ndarray:
    (path,) = comfy.saved_images(comfy.run(_graph(comfy, *args)))
    return np.asarray(Image.open(path), dtype=np.int16)


def test_trained_bank_and_lora_load_and_change_the_output(comfy, trained, caplog):
    (bank,) = comfy.node_class_mappings["ProductBGLoadCategoryBank"].execute("trained_bank.safetensors")
    assert bank.family == "sd15" and len(bank) == 2
    first, second = bank.names
    with caplog.at_level(logging.WARNING):
        with_lora = _render(comfy, first, 1.0, "trained_a")
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    without_lora = _render(comfy, first, 0.0, "trained_b")
    other_category = _render(comfy, second, 1.0, "trained_c")
    assert np.abs(with_lora - without_lora).max() > 1      # the trained LoRA acts
    assert np.abs(with_lora - other_category).max() > 1    # the trained identifiers differ per category


# ---------------------------------------------------------------------------------------------- train-pg
@pytest.fixture(scope="module")
def trained_style(comfy, comfy_model_files, tmp_path_factory):
    """One `train-pg` step (64 px, CPU) starting from the test style encoder; the result goes to the style folder."""
    work = tmp_path_factory.mktemp("train_pg")
    ckpt = comfy.folder_paths.get_full_path("checkpoints", comfy.ckpt_inpaint)
    vision = work / "vision"            # transformers layout: ComfyUI's ViT-L config + the test's random weights
    vision.mkdir()
    shutil.copy(Path(comfy.comfyui_dir, "comfy", "clip_vision_config_vitl.json"), vision / "config.json")
    (vision / "model.safetensors").symlink_to(comfy_model_files / "clip_vision" / VISION_FILE)
    start = comfy_model_files / "productbg_style_encoders" / STYLE_FILE
    run = subprocess.run(CLI + ["train-pg", "--data", str(_synth(work / "data")), "--model", ckpt,
                                "--vision-model", str(vision), "--init-from", str(start), "--output", str(work / "run"),
                                "--resolution", "64", "--max-steps", "1", "--batch-size", "1", "--lr", "1e-2",
                                "--drop-reference", "0", "--no-progress", "--checkpoint-every", "0", "--cpu"],
                         env=ENV, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    written = work / "run" / "style_encoder.safetensors"
    shutil.copy(written, comfy_model_files / "productbg_style_encoders" / TRAINED_STYLE)
    return written, start


def _style_graph(comfy, encoder: str | None, prefix: str) -> dict:
    """Reference Style with ``encoder`` (None: no style) → inpaint → Composite Product (paste-back) → save."""
    model = ["ckpt", 0]
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": comfy.ckpt_inpaint}},
        **product_box_mask(PG_SIZE, *PG_BOX),
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a product photo"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
    }
    if encoder is not None:
        g.update({
            "vision": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": VISION_FILE}},
            "style_enc": {"class_type": "ProductBGLoadStyleEncoder", "inputs": {"encoder_name": encoder}},
            "reference": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                                 "color": 0xAA5533}},
            "style": {"class_type": "ProductBGReferenceStyle", "inputs": {
                "model": ["ckpt", 0], "style_encoder": ["style_enc", 0], "clip_vision": ["vision", 0],
                "reference": ["reference", 0], "weight": 1.0, "layer_preset": "all", "start_percent": 0.0,
                "end_percent": 1.0, "product_mask": ["mask", 0]}},
        })
        model = ["style", 0]
    g.update(inpaint_and_save(PG_SIZE, model, seed=11, prefix=prefix))
    g["sample"]["inputs"]["steps"] = 1
    g["paste"] = {"class_type": "ProductBGCompositeProduct", "inputs": {
        "generated": ["decode", 0], "placed": ["pixels", 0], "product_mask": ["mask", 0], "feather": 0.0}}
    g["save"]["inputs"]["images"] = ["paste", 0]
    return g


def _render_style(comfy, encoder: str | None, prefix: str) -> np.ndarray:
    (path,) = comfy.saved_images(comfy.run(_style_graph(comfy, encoder, prefix)))
    return np.asarray(Image.open(path), dtype=np.int16)


def test_trained_style_encoder_loads_and_changes_the_background_only(comfy, trained_style):
    from safetensors.torch import load_file

    written, start = trained_style
    (encoder,) = comfy.node_class_mappings["ProductBGLoadStyleEncoder"].execute(TRAINED_STYLE)
    assert encoder.config.variant == "linear" and encoder.config.clip_width == 768 and encoder.num_layers == 16
    new, old = load_file(str(written)), load_file(str(start))
    assert new.keys() == old.keys() and any(not (new[k].float() == old[k].float()).all() for k in new)  # it trained

    trained_img = _render_style(comfy, TRAINED_STYLE, "pg_trained")
    untrained_img = _render_style(comfy, STYLE_FILE, "pg_untrained")
    no_style = _render_style(comfy, None, "pg_none")
    assert np.abs(trained_img - untrained_img).max() > 1     # the trained weights reach the sampler
    assert np.abs(trained_img - no_style).max() > 1          # and the style acts
    lo, hi = PG_BOX
    core = (slice(lo + 2, hi - 2), slice(lo + 2, hi - 2), slice(None))   # the product box without its edge
    for img in (untrained_img, no_style):
        assert np.array_equal(trained_img[core], img[core])  # pasted back: the product is untouched
    assert len(np.unique(trained_img[core].reshape(-1, 3), axis=0)) == 1    # ...and is the flat grey canvas
