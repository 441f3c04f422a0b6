"""Files written by `productbg train-cg` on the full-size SD1.5-inpainting shapes load in a real ComfyUI and act.

Two training steps on a tiny BG-synth set against the random full-size checkpoint the harness built: the bank
must load with Load Category Bank, the kohya LoRA with Category LoRA (every key patched), and both must change
the sampled image.
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

pytestmark = pytest.mark.comfyui

SIZE = 96


@pytest.fixture(scope="module")
def trained(comfy, comfy_model_files, tmp_path_factory):
    """Runs the real CLI in a subprocess; copies its bank and LoRA into the registered model folders."""
    work = tmp_path_factory.mktemp("train_cg")
    ckpt = comfy.folder_paths.get_full_path("checkpoints", comfy.ckpt_inpaint)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cli = [sys.executable, "-c", "import sys; from productbg.cli import main; sys.exit(main(sys.argv[1:]))"]
    subprocess.run(cli + ["dataset", "synth", str(work / "data"), "--categories", "2", "--per-category", "2",
                          "--held-out", "1", "--size", "64"], check=True, env=env, capture_output=True)
    run = subprocess.run(cli + ["train-cg", "--data", str(work / "data"), "--model", ckpt, "--output",
                                str(work / "run"), "--resolution", "64", "--max-steps", "2", "--batch-size", "1",
                                "--lr", "1e-2", "--no-progress", "--checkpoint-every", "0", "--cpu"],
                         env=env, capture_output=True, text=True)
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
        "canvas": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": SIZE, "height": SIZE}},
        "box": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": hi - lo, "height": hi - lo}},
        "mask": {"class_type": "MaskComposite", "inputs": {"destination": ["canvas", 0], "source": ["box", 0],
                                                            "x": lo, "y": lo, "operation": "add"}},
        "pos": {"class_type": "ProductBGCategoryPrompt", "inputs": {
            "clip": ["lora", 1], "bank": ["bank", 0], "category": category, "template": "", "extra_text": ""}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
        "attn": {"class_type": "ProductBGMaskGuidedAttention", "inputs": {
            "model": ["lora", 0], "identifier": ["pos", 1], "product_mask": ["mask", 0], "strength": 1.0,
            "start_percent": 0.0, "end_percent": 1.0}},
        "pixels": {"class_type": "EmptyImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1,
                                                          "color": 0x808080}},
        "invert": {"class_type": "InvertMask", "inputs": {"mask": ["mask", 0]}},
        "inpaint": {"class_type": "InpaintModelConditioning", "inputs": {
            "positive": ["pos", 0], "negative": ["neg", 0], "vae": ["ckpt", 2], "pixels": ["pixels", 0],
            "mask": ["invert", 0], "noise_mask": True}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["attn", 0], "positive": ["inpaint", 0], "negative": ["inpaint", 1],
            "latent_image": ["inpaint", 2], "seed": 5, "steps": 2, "cfg": 7.5, "sampler_name": "euler",
            "scheduler": "normal", "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}},
    }


def _render(comfy, *args) -> np.ndarray:
    (path,) = comfy.saved_images(comfy.run(_graph(comfy, *args)))
    return np.asarray(Image.open(path), dtype=np.int16)


def test_trained_bank_and_lora_load_and_change_the_output(comfy, trained, caplog):
    (bank,) = comfy.node_class_mappings["ProductBGLoadCategoryBank"]().load("trained_bank.safetensors")
    assert bank.family == "sd15" and len(bank) == 2
    first, second = bank.names
    with caplog.at_level(logging.WARNING):
        with_lora = _render(comfy, first, 1.0, "trained_a")
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    without_lora = _render(comfy, first, 0.0, "trained_b")
    other_category = _render(comfy, second, 1.0, "trained_c")
    assert np.abs(with_lora - without_lora).max() > 1      # the trained LoRA acts
    assert np.abs(with_lora - other_category).max() > 1    # the trained identifiers differ per category
