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

from comfy_graphs import inpaint_and_save, product_box_mask

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
