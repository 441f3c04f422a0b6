"""Files written by `productbg train-cg` / `train-pg` on the full-size random SDXL-inpainting checkpoint load in a
real ComfyUI 0.3.75 and act.

Training runs the real CLI in a child process (bf16 weights, 64 px, ≈15 GB peak) before this module loads an SDXL
model itself, so the two never share the machine's memory. Checked: the kohya LoRA patches the SDXL UNet with every
key matched (ComfyUI reports none as not loaded and patches one weight per LoRA module); the bank is an ``sdxl``
bank whose vectors are exactly the trained ones (the run's last checkpoint) and Category Prompt puts them in both
encoders; the style encoder trained from an SDXL IP-Adapter-layout file loads with Load Style Encoder, differs from
its start, and Reference Style samples with it.
"""
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comfy_model_files import SDXL_STYLE, VISION_FILE, write_sdxl_model_files

pytestmark = pytest.mark.comfyui

ENV = dict(os.environ, HF_HUB_OFFLINE="1")
CLI = [sys.executable, "-c", "import sys; from productbg.cli import main; sys.exit(main(sys.argv[1:]))"]
TRAINED_BANK, TRAINED_LORA, TRAINED_STYLE = "sdxl_trained_bank.safetensors", "sdxl_trained_lora.safetensors", \
    "sdxl_trained_style.safetensors"


def _cli(*args: str) -> None:
    run = subprocess.run(CLI + list(args), env=ENV, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.fixture(scope="module")
def trained(comfy, comfy_sdxl_checkpoints, comfy_model_files, tmp_path_factory):
    """train-cg (2 steps) and train-pg (1 step, from the SDXL-layout test style encoder) on the full-size random
    SDXL-inpainting checkpoint; outputs copied into the registered model folders."""
    work = tmp_path_factory.mktemp("train_sdxl")
    sdxl_files = write_sdxl_model_files(comfy, work / "models")
    ckpt = comfy.folder_paths.get_full_path("checkpoints", comfy_sdxl_checkpoints["inpaint"])
    _cli("dataset", "synth", str(work / "data"), "--categories", "2", "--per-category", "1", "--held-out", "0",
         "--size", "64")
    common = ["--data", str(work / "data"), "--model", ckpt, "--resolution", "64", "--batch-size", "1",
              "--lr", "1e-2", "--mixed-precision", "bf16", "--no-progress", "--cpu"]
    _cli("train-cg", *common, "--output", str(work / "cg"), "--max-steps", "2", "--checkpoint-every", "2",
         "--vectors-per-id", "2", "--lora-rank", "2", "--identifier-lr", "1e-1")
    vision = work / "vision"            # transformers layout: ComfyUI's ViT-L config + the test's random weights
    vision.mkdir()
    shutil.copy(Path(comfy.comfyui_dir, "comfy", "clip_vision_config_vitl.json"), vision / "config.json")
    (vision / "model.safetensors").symlink_to(comfy_model_files / "clip_vision" / VISION_FILE)
    start = sdxl_files / "productbg_style_encoders" / SDXL_STYLE
    _cli("train-pg", *common, "--output", str(work / "pg"), "--max-steps", "1", "--checkpoint-every", "0",
         "--vision-model", str(vision), "--init-from", str(start), "--drop-reference", "0")
    shutil.copy(work / "cg" / "category_bank.safetensors", sdxl_files / "productbg_banks" / TRAINED_BANK)
    shutil.copy(work / "cg" / "unet_lora.safetensors", comfy_model_files / "loras" / TRAINED_LORA)
    shutil.copy(work / "pg" / "style_encoder.safetensors", sdxl_files / "productbg_style_encoders" / TRAINED_STYLE)
    return work


@pytest.fixture(scope="module")
def loaded(comfy, trained, comfy_sdxl_checkpoints):
    """The SDXL-inpainting checkpoint, loaded after training finished (one SDXL model in memory at a time)."""
    return comfy.nodes.CheckpointLoaderSimple().load_checkpoint(comfy_sdxl_checkpoints["inpaint"])[:2]


def test_the_trained_sdxl_lora_patches_every_key(comfy, trained, loaded, caplog):
    from comfy.sd import load_lora_for_models
    from comfy.utils import load_torch_file

    model, clip = loaded
    lora = load_torch_file(str(trained / "cg" / "unet_lora.safetensors"), safe_load=True)
    modules = {k.removesuffix(".lora_down.weight") for k in lora if k.endswith(".lora_down.weight")}
    assert len(modules) == 70 * 2 * 4  # to_q/k/v/out of attn1 and attn2 in each of SDXL's 70 transformer blocks
    with caplog.at_level(logging.WARNING):
        patched, _ = load_lora_for_models(model, clip, lora, 1.0, 0.0)
    assert not [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(patched.patches) == len(modules)  # one UNet weight per LoRA module
    (bank,) = comfy.node_class_mappings["ProductBGLoadCategoryBank"].execute(TRAINED_BANK)
    with caplog.at_level(logging.WARNING):
        via_node, _ = comfy.node_class_mappings["ProductBGCategoryLora"].execute(model, clip, bank, bank.names[0],
                                                                                 TRAINED_LORA, 1.0, 0.0)
    assert not [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert via_node.patches.keys() == patched.patches.keys()


def test_category_prompt_uses_the_trained_sdxl_vectors(comfy, trained, loaded):
    model, clip = loaded
    classes = comfy.node_class_mappings
    (bank,) = classes["ProductBGLoadCategoryBank"].execute(TRAINED_BANK)
    assert bank.family == "sdxl" and set(bank.encoders) == {"clip_l", "clip_g"} and len(bank) == 2
    ckpt_dir = max((trained / "cg" / "checkpoints").iterdir())
    state = load_file(str(ckpt_dir / "trainable.safetensors"))
    for row, name in enumerate(bank.names):
        torch.testing.assert_close(bank.vectors(name, "clip_l").float(), state["identifiers"].view(2, 2, 768)[row],
                                   rtol=0, atol=0)
        torch.testing.assert_close(bank.vectors(name, "clip_g").float(),
                                   state["identifiers.clip_g"].view(2, 2, 1280)[row], rtol=0, atol=0)
    first, second = bank.names
    cond_a, spec = classes["ProductBGCategoryPrompt"].execute(clip, bank, first, "", "")
    cond_b, _ = classes["ProductBGCategoryPrompt"].execute(clip, bank, second, "", "")
    assert cond_a[0][0].shape[-1] == 2048 and len(spec.token_indices) == 2
    assert not torch.equal(cond_a[0][0], cond_b[0][0])  # each category's own trained vectors
    # the conditioning is a function of exactly the bank's vectors: give the first name the second's vectors
    from productbg.weights.bank import CategoryBank

    swapped = CategoryBank("sdxl", vectors_per_id=2)
    swapped.add(first, {enc: bank.vectors(second, enc) for enc in ("clip_l", "clip_g")})
    cond_swapped, _ = classes["ProductBGCategoryPrompt"].execute(clip, swapped, first, "", "")
    assert torch.equal(cond_swapped[0][0], cond_b[0][0])


def test_the_trained_sdxl_style_encoder_loads_and_samples(comfy, trained, loaded):
    nodes, classes = comfy.nodes, comfy.node_class_mappings
    model, clip = loaded
    (encoder,) = classes["ProductBGLoadStyleEncoder"].execute(TRAINED_STYLE)
    (start,) = classes["ProductBGLoadStyleEncoder"].execute(SDXL_STYLE)
    trained_sd, start_sd = encoder.state_dict(), start.state_dict()
    assert trained_sd.keys() == start_sd.keys()
    assert any(not torch.equal(trained_sd[k].float(), start_sd[k].float()) for k in trained_sd)
    (vision,) = nodes.CLIPVisionLoader().load_clip(VISION_FILE)
    mask = torch.zeros(1, 64, 64)
    mask[:, :32, :32] = 1
    reference = torch.rand(1, 96, 96, 3, generator=torch.Generator().manual_seed(0))
    patched = classes["ProductBGReferenceStyle"].execute(model, encoder, vision, reference, 0.8, "style", 0.0, 1.0,
                                                         product_mask=mask)[0]
    positive = nodes.CLIPTextEncode().encode(clip, "a product photo")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
    with torch.no_grad():
        out = nodes.common_ksampler(patched, 1, 1, 5.0, "euler", "normal", positive, negative, latent)[0]
    assert torch.isfinite(out["samples"]).all()
