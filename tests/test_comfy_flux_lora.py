"""The same Flux LoRA file gives the same transformer weights in a real ComfyUI 0.3.75 (core LoraLoaderModelOnly,
``comfy.lora.calculate_weight``) and in the CLI's merge (``pipeline.flux_lora``), on the full-width random Flux Fill
of tests/flux_checkpoint.py (1 double + 1 single block): kohya on BFL names (fused ``qkv`` / ``linear1``, the final
modulation) and diffusers' ``transformer.…`` names (q / k / v and ``proj_mlp`` on slices of the fused weights,
``norm_out`` with its halves swapped) patch the same BFL tensors by the same amounts.

Runs in a pytest process of its own (scripts/test.sh), never beside the SDXL models; it holds ComfyUI's transformer
and ours (545M parameters each, float32 here: ≈2.2 GB), no text encoders. 30 s on this CPU.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.comfyui

HIDDEN, MLP, RANK = 3072, 12288, 2
STRENGTH = 0.75


def _lora_files(folder: Path) -> dict[str, set[str]]:
    """A kohya file on BFL names and a diffusers file; name -> the BFL weights each changes."""
    g = torch.Generator().manual_seed(7)

    def pair(n_in, n_out):
        return torch.randn(RANK, n_in, generator=g) * 0.02, torch.randn(n_out, RANK, generator=g) * 0.02

    kohya = {}
    for name, (n_in, n_out) in {"double_blocks_0_img_attn_qkv": (HIDDEN, 3 * HIDDEN),
                                "single_blocks_0_linear1": (HIDDEN, 3 * HIDDEN + MLP),
                                "final_layer_adaLN_modulation_1": (HIDDEN, 2 * HIDDEN)}.items():
        down, up = pair(n_in, n_out)
        kohya |= {f"lora_unet_{name}.lora_down.weight": down, f"lora_unet_{name}.lora_up.weight": up,
                  f"lora_unet_{name}.alpha": torch.tensor(1.0)}
    diffusers = {}
    for name, (n_in, n_out) in {"transformer_blocks.0.attn.to_k": (HIDDEN, HIDDEN),
                                "transformer_blocks.0.attn.add_v_proj": (HIDDEN, HIDDEN),
                                "single_transformer_blocks.0.attn.to_q": (HIDDEN, HIDDEN),
                                "single_transformer_blocks.0.proj_mlp": (HIDDEN, MLP),
                                "norm_out.linear": (HIDDEN, 2 * HIDDEN)}.items():
        a, b = pair(n_in, n_out)
        diffusers |= {f"transformer.{name}.lora_A.weight": a, f"transformer.{name}.lora_B.weight": b}
    save_file(kohya, str(folder / "hC_flux_kohya.safetensors"))
    save_file(diffusers, str(folder / "hC_flux_diffusers.safetensors"))
    return {"hC_flux_kohya.safetensors": {"double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight",
                                          "final_layer.adaLN_modulation.1.weight"},
            "hC_flux_diffusers.safetensors": {"double_blocks.0.img_attn.qkv.weight",
                                              "double_blocks.0.txt_attn.qkv.weight", "single_blocks.0.linear1.weight",
                                              "final_layer.adaLN_modulation.1.weight"}}


def test_comfyui_and_the_cli_merge_a_flux_lora_to_the_same_weights(comfy, comfy_flux_files, tmp_path):
    # ComfyUI's modules import only once the harness has put its tree on sys.path
    from comfy.lora import calculate_weight

    files = comfy_flux_files
    flux_files, flux_keys = comfy.pack_module("pipeline.flux_files"), comfy.pack_module("pipeline.flux_keys")
    flux_lora, flux_models = comfy.pack_module("pipeline.flux_lora"), comfy.pack_module("pipeline.flux_models")
    safefile = comfy.pack_module("weights.safefile")
    comfy.folder_paths.add_model_folder_path("loras", str(tmp_path))
    loras = _lora_files(tmp_path)
    (model,) = comfy.nodes.UNETLoader().load_unet(files["fill"], "default")
    path = Path(files.paths["fill"])
    ours, variant = flux_files.load_transformer(path, safefile.read_header(path), torch.float32)
    base = {k: v.clone() for k, v in ours.state_dict().items()}
    for name, changed in loras.items():
        ours.load_state_dict(base)
        parts = flux_models.FluxParts(ours, None, None, None, None, None, variant)
        flux_lora.merge_flux_lora(parts, tmp_path / name, STRENGTH)
        mine = flux_keys.diffusers_to_bfl(ours.state_dict())
        (patched,) = comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, STRENGTH)
        keys = {k.removeprefix("diffusion_model.") for k in patched.patches}
        assert keys == changed, (name, sorted(keys))
        stored = model.model.diffusion_model.state_dict()
        for key in sorted(keys):
            # a copy: calculate_weight adds in place, and the loaded weights may already be float32
            theirs = calculate_weight(patched.patches["diffusion_model." + key],
                                      stored[key].to(torch.float32, copy=True), key)
            torch.testing.assert_close(mine[key], theirs, msg=f"{name}: {key}")
            assert not torch.equal(mine[key], stored[key].float()), key  # the LoRA did change it
        untouched = [k for k in mine if k not in keys and k.endswith(".weight")]
        assert all(torch.equal(mine[k], stored[k].float()) for k in untouched)
