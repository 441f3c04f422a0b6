"""``productbg train-cg`` on the full-size random Flux.1 Fill (tests/flux_checkpoint.py: the transformer at the full
width 3072 with 1 double + 1 single block, the full-size T5-XXL in fp8, CLIP-L, the Flux VAE), then its outputs in a
real ComfyUI 0.3.75.

Training runs the real CLI in a child process (bf16, 64 px, 2 steps, the T5 prompt at its own length) before this
module loads a Flux model itself; its wall time and peak RSS are printed. Checked in ComfyUI: the transformer LoRA
(diffusers layout) maps with 0 unmatched keys in ComfyUI's own key map (``comfy.lora.model_lora_keys_unet``), patches
the fused weights it names with exactly ``lora_B @ lora_A`` (alpha folded in) through ``load_lora_for_models`` and
Category LoRA alike; the bank is a ``flux`` bank of the trained vectors, Category Prompt tokenizes the template as
training did (the identifier at the same T5 positions, the same length, the same token ids) and pools the
identifier-free prompt, and the T5 text training attends to (the trained vectors spliced in, computed in a child
process through productbg's loader and the trainer's own T5 path) is ComfyUI's conditioning, and its identifier-free
stream ComfyUI's, to fp16-vs-fp32 rounding; a step of Flux Fill samples with the trained LoRA, bank and Mask-Guided
Attention.

Runs in a pytest process of its own (scripts/test.sh), never beside the SDXL models.
"""
from __future__ import annotations

import logging
import os
import resource
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.comfyui

CLI = [sys.executable, "-c", "import sys; from productbg.cli import main; sys.exit(main(sys.argv[1:]))"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
SIZE = 64
WIDTH = 3072
#: the fused ComfyUI weights the LoRA's modules patch (q/k/v land on slices of one qkv / linear1)
PATCHED = {f"diffusion_model.double_blocks.0.{w}.weight" for w in ("img_attn.qkv", "txt_attn.qkv", "img_attn.proj",
                                                                   "txt_attn.proj")} | \
          {f"diffusion_model.single_blocks.0.{w}.weight" for w in ("linear1", "linear2")}
#: diffusers module -> (ComfyUI weight, first output row) of each module's slice
SLICES = {"transformer_blocks.0.attn.to_q": ("double_blocks.0.img_attn.qkv", 0),
          "transformer_blocks.0.attn.to_k": ("double_blocks.0.img_attn.qkv", WIDTH),
          "transformer_blocks.0.attn.to_v": ("double_blocks.0.img_attn.qkv", 2 * WIDTH),
          "transformer_blocks.0.attn.add_k_proj": ("double_blocks.0.txt_attn.qkv", WIDTH),
          "transformer_blocks.0.attn.to_out.0": ("double_blocks.0.img_attn.proj", 0),
          "single_transformer_blocks.0.attn.to_v": ("single_blocks.0.linear1", 2 * WIDTH),
          "single_transformer_blocks.0.proj_out": ("single_blocks.0.linear2", 0)}


#: In a child process (one full-size T5 at a time in memory): the T5 contexts training computes for both categories
#: of the trained bank and of the identifier-free prompt, through productbg's loader and the trainer's T5 path.
ENCODE = r"""
import sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from productbg.pipeline.flux_files import load_t5
from productbg.pipeline.text import clip_tokenizer, t5_tokenizer
from productbg.training.flux_cg import T5Identifiers, flux_prompts
from productbg.weights.bank import load_bank
from productbg.weights.safefile import read_header
t5_path, bank_path, out = sys.argv[1:4]
t5 = load_t5(Path(t5_path), read_header(t5_path), torch.float32)
bank = load_bank(bank_path)
prompts = flux_prompts(t5_tokenizer(), clip_tokenizer(), bank.template, [2, 2], min_length=1)
text = T5Identifiers(t5, prompts, torch.stack([bank.vectors(n, "t5xxl").float() for n in bank.names]))
with torch.no_grad():
    context = text.encode(torch.tensor([0, 1]))
    plain = text.encode_embeds(text.embed(prompts.plain_ids))
save_file({"context": context.contiguous(), "plain": plain.contiguous()}, out)
"""


def _cli(*args: str) -> None:
    run = subprocess.run(CLI + list(args), env=ENV, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]


@pytest.fixture(scope="module")
def trained(comfy_flux_files, tmp_path_factory):
    """train-cg, 2 steps, on the random full-size Flux Fill (companions found beside the transformer)."""
    work = tmp_path_factory.mktemp("train_flux")
    _cli("dataset", "synth", str(work / "data"), "--categories", "2", "--per-category", "1", "--held-out", "0",
         "--size", "64")
    start = time.monotonic()
    _cli("train-cg", "--data", str(work / "data"), "--model", str(comfy_flux_files.paths["fill"]),
         "--output", str(work / "cg"), "--resolution", str(SIZE), "--max-steps", "2", "--batch-size", "1",
         "--lr", "1e-2", "--identifier-lr", "1e-1", "--vectors-per-id", "2", "--lora-rank", "2",
         "--checkpoint-every", "2", "--t5-min-length", "1", "--mixed-precision", "bf16", "--cpu", "--no-progress")
    wall = time.monotonic() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20
    print(f"\n[flux train-cg] 2 steps at {SIZE}²: {wall:.0f} s wall, peak RSS {peak:.1f} GiB", file=sys.stderr)
    assert peak < 14, f"train-cg on full-size Flux peaked at {peak:.1f} GiB"
    run = subprocess.run([sys.executable, "-c", ENCODE, str(comfy_flux_files.paths["t5xxl"]),
                          str(work / "cg" / "category_bank.safetensors"), str(work / "cg" / "contexts.safetensors")],
                         env=ENV, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return work / "cg"


@pytest.fixture(scope="module")
def loaded(comfy, comfy_flux_files, trained):
    """Flux Fill and the DualCLIPLoader's T5-XXL + CLIP-L, loaded after training finished. T5TokenizerOptions
    min_length 0: the prompt at its own length, as trained with --t5-min-length 1."""
    nodes = comfy.nodes
    (fill,) = nodes.UNETLoader().load_unet(comfy_flux_files["fill"], "default")
    (clip,) = nodes.DualCLIPLoader().load_clip(comfy_flux_files["clip_l"], comfy_flux_files["t5xxl"], "flux")
    (clip,) = comfy.node_class_mappings["T5TokenizerOptions"].execute(clip, 0, 0)
    (vae,) = nodes.VAELoader().load_vae(comfy_flux_files["vae"])
    return {"fill": fill, "clip": clip, "vae": vae}


@pytest.fixture(scope="module")
def bank(comfy, trained):
    return comfy.pack_module("weights.bank").load_bank(trained / "category_bank.safetensors")


@pytest.fixture(scope="module")
def prompts(comfy, loaded, bank):
    """Category Prompt of both trained categories (a full-size fp8 T5-XXL encode costs ~20 s on this CPU: once)."""
    node = comfy.node_class_mappings["ProductBGCategoryPrompt"]
    return {name: node.execute(loaded["clip"], bank, name, "", "") for name in bank.names}


def test_the_trained_lora_maps_with_no_unmatched_key_and_patches_exactly(comfy, trained, loaded, bank, caplog,
                                                                          tmp_path):
    from comfy.lora import calculate_weight, model_lora_keys_unet
    from comfy.sd import load_lora_for_models
    from comfy.utils import load_torch_file

    model, clip = loaded["fill"], loaded["clip"]
    lora = load_torch_file(str(trained / "transformer_lora.safetensors"), safe_load=True)
    modules = {k.removesuffix(".lora_A.weight") for k in lora if k.endswith(".lora_A.weight")}
    assert len(modules) == 8 + 4 and set(lora) == {f"{m}.lora_{ab}.weight" for m in modules for ab in "AB"}
    key_map = model_lora_keys_unet(model.model, {})
    assert not modules - set(key_map), sorted(modules - set(key_map))  # 0 unmatched keys
    with caplog.at_level(logging.WARNING):
        patched, _ = load_lora_for_models(model, clip, lora, 1.0, 0.0)
    assert not [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert set(patched.patches) == PATCHED
    weights = model.model.state_dict()
    for module, (target, row) in SLICES.items():
        key = f"diffusion_model.{target}.weight"
        base = weights[key].float()
        new = calculate_weight(patched.patches[key], base.clone(), key)
        delta = lora[f"transformer.{module}.lora_B.weight"].float() @ lora[f"transformer.{module}.lora_A.weight"].float()
        assert delta.abs().max() > 0, module  # the LoRA trained away from its zero start
        rows = slice(row, row + delta.shape[0])
        torch.testing.assert_close(new[rows] - base[rows], delta, rtol=1e-3, atol=1e-6)
    comfy.folder_paths.add_model_folder_path("loras", str(trained))
    with caplog.at_level(logging.WARNING):
        via_node, _ = comfy.node_class_mappings["ProductBGCategoryLora"].execute(
            model, clip, bank, bank.names[0], "transformer_lora.safetensors", 1.0, 1.0)
    assert not [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert set(via_node.patches) == PATCHED


def test_category_prompt_uses_the_trained_flux_bank_as_training_tokenized_it(comfy, trained, loaded, bank, prompts):
    from productbg.pipeline.text import clip_tokenizer, t5_tokenizer
    from productbg.training.flux_cg import flux_prompts

    clip = loaded["clip"]
    assert bank.family == "flux" and bank.encoders == ("t5xxl",) and bank.width == 4096 and len(bank) == 2
    state = load_file(str(max((trained / "checkpoints").iterdir()) / "trainable.safetensors"))
    for row, name in enumerate(bank.names):
        assert torch.equal(bank.vectors(name, "t5xxl").float(), state["identifiers"].view(2, 2, 4096)[row])
    first, second = bank.names
    (cond_a, spec), (cond_b, _) = prompts[first], prompts[second]
    trained_prompts = flux_prompts(t5_tokenizer(), clip_tokenizer(), bank.template, [2, 2], min_length=1)
    assert spec.token_indices == trained_prompts.positions and spec.context_length == trained_prompts.length
    tokens = clip.tokenize(bank.template.replace("{id}", "<extra_id_0> <extra_id_0>"))["t5xxl"][0]
    assert [t[0] for t in tokens] == trained_prompts.ids[0].tolist()  # ComfyUI's T5 tokens are training's
    assert cond_a[0][0].shape == (1, trained_prompts.length, 4096)
    assert not torch.equal(cond_a[0][0], cond_b[0][0])  # each category's own trained vectors
    # the pooled CLIP-L vector is the identifier-free prompt's, the same for both categories (as trained)
    assert torch.equal(cond_a[0][1]["pooled_output"], cond_b[0][1]["pooled_output"])
    # the text training attends to is ComfyUI's (its T5 computes in fp16 on the CPU, training's here in fp32)
    ours = load_file(str(trained / "contexts.safetensors"))

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    off = {n: rel(c[0][0][0], ours["context"][i]) for i, (n, c) in enumerate(((first, cond_a), (second, cond_b)))}
    free = rel(spec.plain_context[0], ours["plain"][0])
    apart = rel(ours["context"][0], ours["context"][1])
    print(f"\n[flux train-cg] T5 context vs ComfyUI's: {off} relative, free stream {free:.2e}; the two categories "
          f"{apart:.2e} apart", file=sys.stderr)
    assert max(off.values()) < 5e-3 and free < 5e-3 and apart > 0.1  # measured: 4e-4, 1.3e-4; 1.35


def test_flux_fill_samples_with_the_trained_lora_bank_and_confinement(comfy, trained, loaded, bank, prompts):
    nodes, classes = comfy.nodes, comfy.node_class_mappings
    comfy.folder_paths.add_model_folder_path("loras", str(trained))
    name = bank.names[0]
    model, _ = classes["ProductBGCategoryLora"].execute(loaded["fill"], loaded["clip"], bank, name,
                                                        "transformer_lora.safetensors", 1.0, 1.0)
    positive, identifier = prompts[name]  # the LoRA has no text-encoder part: the CLIP is unchanged
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, 16:48, 16:48] = 1.0
    model = classes["ProductBGMaskGuidedAttention"].execute(model, identifier, mask, 1.0, 0.0, 1.0, "context")[0]
    negative = nodes.ConditioningZeroOut().zero_out(positive)[0]
    pixels = torch.full((1, SIZE, SIZE, 3), 0.5)
    positive, negative, latent = nodes.InpaintModelConditioning().encode(positive, negative, pixels, loaded["vae"],
                                                                         1.0 - mask, True)
    out = nodes.KSampler().sample(model, 3, 1, 1.0, "euler", "simple", positive, negative, latent, 1.0)[0]
    assert out["samples"].shape[1] == 16 and torch.isfinite(out["samples"]).all()
