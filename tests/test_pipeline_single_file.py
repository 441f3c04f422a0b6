"""Single-file (LDM layout) checkpoints: offline loading with shipped configs, and writing the layout."""
import json

import pytest
import torch

from productbg.pipeline.errors import PipelineError
from productbg.pipeline.single_file import (SD15_CONFIGS, config_files, ldm_state_dict, load_single_file,
                                            save_single_file, write_config_dir)
from productbg.pipeline.tiny import tiny_text_encoder, tiny_unet, tiny_vae


@pytest.mark.parametrize("channels", [4, 9])
def test_tiny_checkpoint_round_trip_offline(tmp_path, no_network, channels):
    """A tiny model written in the LDM layout loads back bit-identical, offline, with the inpaint config for 9 ch."""
    unet, vae, te = tiny_unet(channels, seed=1), tiny_vae(seed=1), tiny_text_encoder(seed=1)
    configs = write_config_dir(tmp_path / "configs", unet, vae, te)
    ckpt = save_single_file(tmp_path / "model.safetensors", unet, vae, te)
    parts = load_single_file(ckpt, configs)
    assert parts.unet.config.in_channels == channels
    for original, loaded in ((unet, parts.unet), (vae, parts.vae), (te, parts.text_encoder)):
        a, b = original.state_dict(), loaded.state_dict()
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a), type(original).__name__
    assert parts.scheduler_config["num_train_timesteps"] == 1000


def test_ldm_layout_matches_sd15_key_names():
    """The shipped full-size configs give the SD1.5 LDM key names and shapes (checked on the meta device)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    files = config_files()
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads(files["unet_inpaint"].read_text()))
        vae = AutoencoderKL.from_config(json.loads(files["vae"].read_text()))
        te = CLIPTextModel(CLIPTextConfig.from_json_file(str(files["text_encoder"])))
    sd = ldm_state_dict(unet, vae, te)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["model.diffusion_model.input_blocks.0.0.weight"] == (320, 9, 3, 3)
    assert shapes["model.diffusion_model.input_blocks.3.0.op.weight"] == (320, 320, 3, 3)
    assert shapes["model.diffusion_model.output_blocks.2.1.conv.weight"] == (1280, 1280, 3, 3)
    assert shapes["model.diffusion_model.output_blocks.5.2.conv.weight"] == (1280, 1280, 3, 3)
    assert shapes["model.diffusion_model.middle_block.1.proj_in.weight"] == (1280, 1280, 1, 1)
    assert shapes["model.diffusion_model.output_blocks.11.0.skip_connection.weight"] == (320, 640, 1, 1)
    assert shapes["first_stage_model.encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes["first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert shapes["cond_stage_model.transformer.text_model.final_layer_norm.weight"] == (768,)
    assert sum(k.startswith("model.diffusion_model.") for k in sd) == 686


def test_shipped_configs_are_sd15():
    """The inpaint UNet config differs from the plain one only in its 9 input channels; CLIP is ViT-L/14."""
    files = config_files()
    plain, inpaint = (json.loads(files[k].read_text()) for k in ("unet", "unet_inpaint"))
    assert inpaint.pop("in_channels") == 9 and plain.pop("in_channels") == 4
    assert plain == inpaint
    text = json.loads(files["text_encoder"].read_text())
    assert (text["hidden_size"], text["vocab_size"], text["num_hidden_layers"]) == (768, 49408, 12)
    assert (SD15_CONFIGS / "clip_vision_vit_h14_config.json").is_file()


def test_refuses_pickles_and_non_models(tmp_path):
    """Pickle checkpoints are refused by name; a safetensors file without a UNet says what it looks like."""
    from productbg.weights.safefile import atomic_save

    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04")
    with pytest.raises(PipelineError, match="pickles"):
        load_single_file(pickle)
    lora = atomic_save({"lora_unet_x.lora_down.weight": torch.zeros(2, 4)}, tmp_path / "lora.safetensors")
    with pytest.raises(PipelineError, match="LoRA or embedding"):
        load_single_file(lora)
    odd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 5, 3, 3)}
    with pytest.raises(PipelineError, match="5 input channels"):
        load_single_file(odd)


def test_missing_config_is_named(tmp_path):
    """A config folder lacking a file names the missing file."""
    (tmp_path / "unet_config.json").write_text("{}")
    with pytest.raises(PipelineError, match="vae_config.json"):
        config_files(tmp_path)


@pytest.mark.slow
def test_full_size_random_sd15_inpaint_loads_offline(comfyui_dir, comfy_checkpoints, no_network):
    """A full-size SD1.5-inpainting checkpoint (the ComfyUI harness's random one) loads with the shipped configs,
    and writing it back gives exactly its key names."""
    from pathlib import Path

    from safetensors import safe_open

    path = Path(comfyui_dir, "models", "checkpoints", comfy_checkpoints["inpaint"])
    parts = load_single_file(path, dtype=torch.float16)
    assert parts.unet.config.in_channels == 9
    written = ldm_state_dict(parts.unet, parts.vae, parts.text_encoder)
    with safe_open(path, "pt") as f:
        assert set(f.keys()) == set(written)
        key = "model.diffusion_model.output_blocks.5.2.conv.weight"
        assert torch.equal(f.get_tensor(key), written[key])
