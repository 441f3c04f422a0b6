"""LoRA conversion checked in a real ComfyUI: a peft/diffusers LoRA converted to kohya loads with ComfyUI's own
loader on the random full-size SD1.5 checkpoint, every key is patched, and the patched weights are right."""
import logging

import pytest
import torch

pytestmark = pytest.mark.comfyui


def _modules():
    """UNet attention/ff/conv (3×3, 1×1 proj_in, conv_shortcut) and text-encoder modules, mixed alphas."""
    from weight_samples import sd15_lora_modules

    mods = sd15_lora_modules(rank=4, alpha=2.0, text_encoder=True, conv=True, seed=3)
    for i, m in enumerate(mods):
        if i % 5 == 1:
            m.alpha = None  # scale 1
        elif i % 5 == 2:
            m.alpha = torch.tensor(8.0)  # scale 2
    return mods


@pytest.fixture(scope="module")
def kohya_file(tmp_path_factory):
    from productbg.weights.lora import convert_lora_file, to_peft
    from productbg.weights.safefile import atomic_save

    root = tmp_path_factory.mktemp("lora")
    tensors, meta = to_peft(_modules())
    peft = atomic_save(tensors, root / "trained_peft.safetensors", meta)
    return convert_lora_file(peft, root / "for_comfyui.safetensors", "kohya")


def test_converted_lora_patches_every_key(comfy, kohya_file, caplog):
    """ComfyUI maps every converted key (no 'lora key not loaded') and patches W + up·down·alpha/rank."""
    from comfy.lora import model_lora_keys_clip, model_lora_keys_unet
    from comfy.sd import load_checkpoint_guess_config, load_lora_for_models
    from comfy.utils import load_torch_file

    from productbg.weights.lora import kohya_name

    mods = _modules()
    path = comfy.folder_paths.get_full_path_or_raise("checkpoints", comfy.ckpt_sd15)
    model, clip, _, _ = load_checkpoint_guess_config(path, output_vae=False, output_clip=True)
    lora = load_torch_file(str(kohya_file), safe_load=True)
    caplog.set_level(logging.WARNING)
    new_model, new_clip = load_lora_for_models(model, clip, lora, 1.0, 1.0)
    assert not [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]

    unet_keys = model_lora_keys_unet(model.model, {})
    clip_keys = model_lora_keys_clip(clip.cond_stage_model, {})
    unet_mods = [m for m in mods if m.component == "unet"]
    te_mods = [m for m in mods if m.component == "text_encoder"]
    assert {unet_keys[kohya_name("unet", m.path)] for m in unet_mods} == set(new_model.patches)
    assert {clip_keys[kohya_name("text_encoder", m.path)] for m in te_mods} == set(new_clip.patcher.patches)
    assert len(new_model.patches) == len(unet_mods) == 163 and len(new_clip.patcher.patches) == len(te_mods) == 72

    picks = [m for m in unet_mods if m.path.endswith(("attn2.to_k", "conv1", "conv_shortcut", "proj_in"))][:4]
    picks += [unet_mods[1], unet_mods[2]]  # alpha None and alpha 8
    _check_patched(new_model, [(unet_keys[kohya_name("unet", m.path)], m) for m in picks])
    _check_clip_patches(new_clip, [(clip_keys[kohya_name("text_encoder", m.path)], m) for m in te_mods[:3]])
    tokens = clip.tokenize("a product photo on a wooden table")
    assert not torch.equal(clip.encode_from_tokens(tokens), new_clip.encode_from_tokens(tokens))


def _delta(m, shape):
    return (m.up.float().flatten(1) @ m.down.float().flatten(1)).reshape(shape) * m.scale


def _check_clip_patches(new_clip, keyed_modules):
    """ComfyUI's own weight calculation for the text encoder's patches gives W + up·down·scale."""
    from comfy.lora import calculate_weight

    state = new_clip.patcher.model.state_dict()
    for key, m in keyed_modules:
        w0 = state[key].detach().float().clone()
        got = calculate_weight(new_clip.patcher.patches[key], w0.clone(), key)
        torch.testing.assert_close(got - w0, _delta(m, w0.shape), rtol=1e-3, atol=1e-6)


def _check_patched(patcher, keyed_modules):
    """Patch the weights in place, compare with W + up·down·scale, and restore them."""
    state = patcher.model.state_dict()
    before = {key: state[key].detach().float().clone() for key, _ in keyed_modules}
    patcher.patch_model()
    try:
        after = patcher.model.state_dict()
        for key, m in keyed_modules:
            w0 = before[key]
            delta = _delta(m, w0.shape)
            got = after[key].detach().float()
            assert not torch.equal(got, w0), key
            torch.testing.assert_close(got - w0, delta, rtol=2e-2, atol=2e-3 * float(delta.abs().max()) + 1e-6)
    finally:
        patcher.unpatch_model()
