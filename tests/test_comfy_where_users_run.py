"""Paths every GPU user takes and plain CPU graphs do not, in a real ComfyUI 0.3.75 (issue 21): cond and uncond
sampled in separate calls (long identifier prompts, a ControlNet on the positive only), an fp8-stored UNet, area
crops, rebuilt conditioning, newer ComfyUI's clone semantics, style encoders reloaded, ComfyUI's attention backend.
"""
import gc
import logging
import math
import weakref

import pytest
import torch

from comfy_harness import _random_init
from comfy_model_files import BANK_FILE, STYLE_FILE, VISION_FILE
from foreign_attn2 import ForeignAttn2

pytestmark = pytest.mark.comfyui

SIZE = 64
LONG_EXTRA = ", ".join(["soft studio light, clean shadow"] * 12)  # a second 77-token chunk in the positive


@pytest.fixture(autouse=True)
def _as_comfyui_executes():
    """ComfyUI's executor runs every node under ``torch.inference_mode()``; so do these direct node calls (in
    grad mode each CLIP vision call keeps ~2 GB of autograd state here)."""
    with torch.inference_mode():
        yield


@pytest.fixture(scope="module")
def loaded(comfy, comfy_model_files):
    """Checkpoint, bank and CLIP vision loaded once (a CLIP vision per test would pile up gigabytes)."""
    model, clip, vae = comfy.nodes.CheckpointLoaderSimple().load_checkpoint(comfy.ckpt_sd15)[:3]
    (bank,) = comfy.node_class_mappings["ProductBGLoadCategoryBank"].execute(BANK_FILE)
    (vision,) = comfy.nodes.CLIPVisionLoader().load_clip(VISION_FILE)
    return model, clip, bank, vision


def _mask() -> torch.Tensor:
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, :48, :48] = 1  # product cells on every grid down to the 1x1 middle block, background on the others
    return mask


def _category(comfy, loaded, category, extra=""):
    model, clip, bank, _ = loaded
    return comfy.node_class_mappings["ProductBGCategoryPrompt"].execute(clip, bank, category, "", extra)


def _confined(comfy, model, identifier, confinement="context"):
    node = comfy.node_class_mappings["ProductBGMaskGuidedAttention"]
    return node.execute(model, identifier, _mask(), 1.0, 0.0, 1.0, confinement)[0]


def _styled(comfy, loaded, model, encoder=None):
    mappings = comfy.node_class_mappings
    encoder = encoder or mappings["ProductBGLoadStyleEncoder"].execute(STYLE_FILE)[0]
    vision = loaded[3]
    reference = torch.full((1, 64, 64, 3), 0.4)
    return mappings["ProductBGReferenceStyle"].execute(model, encoder, vision, reference, 0.8, "all", 0.0, 1.0,
                                                         product_mask=_mask())[0]


def _negative(comfy, loaded, text="blurry"):
    return comfy.nodes.CLIPTextEncode().encode(loaded[1], text)[0]


def _sample(comfy, model, positive, negative, steps=1):
    latent = comfy.nodes.EmptyLatentImage().generate(SIZE, SIZE, 1)[0]
    return comfy.nodes.common_ksampler(model, 1, steps, 5.0, "euler", "normal", positive, negative, latent)[0]


def _calls(model):
    """A clone of ``model`` recording each model call's ``cond_or_uncond`` into the returned list."""
    seen = []
    m = model.clone()

    def wrapper(apply_model, args):
        seen.append(tuple(args["cond_or_uncond"]))
        return apply_model(args["input"], args["timestep"], **args["c"])
    m.set_model_unet_function_wrapper(wrapper)
    return m, seen


# ------------------------------------------------------------------------------------------------- split calls
def test_a_five_chunk_identifier_prompt_sampled_apart_from_a_short_negative(comfy, loaded):
    """ComfyUI samples cond and uncond in separate calls when one prompt is over 4x longer: the negative-only
    call (77 tokens) must not crash, and every layer keeps the identifier off the product."""
    positive, identifier = _category(comfy, loaded, "Coffee Mug", ", ".join([LONG_EXTRA] * 5))
    assert identifier.context_length >= 5 * 77
    model, calls = _calls(_confined(comfy, loaded[0], identifier))
    probe = comfy.pack_module("attention.probe")
    with probe.record() as rec:
        out = _sample(comfy, model, positive, _negative(comfy, loaded))
    assert sorted(calls) == [(0,), (1,)]  # apart, one call each
    assert torch.isfinite(out["samples"]).all()
    assert rec.layers() == set(range(16)) and all(r.max_mass_on_product == 0 for r in rec.identifier)


# -------------------------------------------------------------------------------------------------- ControlNet
@pytest.fixture(scope="module")
def controlnet(comfy, loaded):
    """A random full-size SD1.5 ControlNet built with ComfyUI's own classes (no file, nothing downloaded)."""
    import comfy.cldm.cldm as cldm
    import comfy.controlnet as cn
    import comfy.model_management as mm
    from comfy import ops

    config = dict(loaded[0].model.model_config.unet_config)
    config.pop("out_channels")
    config.update(hint_channels=3, operations=ops.disable_weight_init, dtype=torch.float32, device="cpu")
    torch.manual_seed(0)
    control_model = cldm.ControlNet(**config)
    _random_init(control_model)
    return cn.ControlNet(control_model, load_device=mm.get_torch_device(), manual_cast_dtype=None)


def _control_outputs(comfy, loaded, controlnet, category, confinement, monkeypatch):
    """The ControlNet's residuals at the first step of a sampling with the ControlNet on the positive only."""
    import comfy.controlnet as cn

    seen = []
    original = cn.ControlNet.get_control

    def spy(self, x_noisy, t, cond, batched_number, transformer_options):
        out = original(self, x_noisy, t, cond, batched_number, transformer_options)
        seen.append({k: [r.clone() for r in v if r is not None] for k, v in out.items()})
        return out
    monkeypatch.setattr(cn.ControlNet, "get_control", spy)
    positive, identifier = _category(comfy, loaded, category, LONG_EXTRA)
    hint = torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(1))
    negative = _negative(comfy, loaded)
    # ControlNetApplyAdvanced's positive with the plain negative: the ControlNet on the positive only
    controlled = comfy.nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, controlnet, hint, 1.0,
                                                                         0.0, 1.0)[0]
    model, calls = _calls(_confined(comfy, loaded[0], identifier, confinement))
    _sample(comfy, model, controlled, negative)
    monkeypatch.undo()
    assert sorted(calls) == [(0,), (1,)], calls  # the ControlNet on one side: cond and uncond apart
    assert identifier.context_length == 154 and len(seen) == 1
    return seen[0]


def test_a_controlnet_never_sees_the_identifier(comfy, loaded, controlnet, monkeypatch):
    """With ``context`` confinement the control model reads the identifier-free prompt, so its residuals (added
    to every cell, product included) are bit-identical for two categories; with ``columns`` they differ — the
    measure moves when the guarantee is off."""
    def residuals(category, confinement):
        return _control_outputs(comfy, loaded, controlnet, category, confinement, monkeypatch)

    mug, bag = residuals("Coffee Mug", "context"), residuals("Leather Bag", "context")
    assert mug.keys() == bag.keys() and sum(len(v) for v in mug.values()) >= 13
    for key in mug:
        assert all(torch.equal(a, b) for a, b in zip(mug[key], bag[key])), key
    mug, bag = residuals("Coffee Mug", "columns"), residuals("Leather Bag", "columns")
    assert max((a - b).abs().max().item() for key in mug for a, b in zip(mug[key], bag[key])) > 0


# --------------------------------------------------------------------------------------------- fp8, low VRAM
def test_reference_style_on_an_fp8_stored_unet_runs_in_the_compute_dtype(comfy, loaded):
    """UNETLoader's ``weight_dtype fp8_e4m3fn``: the style encoder runs in the UNet's compute dtype."""
    from comfy.sd import load_diffusion_model_state_dict  # what UNETLoader runs on the file's tensors

    model = loaded[0]
    state = dict(model.model.diffusion_model.state_dict())
    fp8 = load_diffusion_model_state_dict(state, model_options={"dtype": torch.float8_e4m3fn})
    del state
    assert fp8.model_dtype() == torch.float8_e4m3fn and fp8.model.manual_cast_dtype is not None
    positive, identifier = _category(comfy, loaded, "Coffee Mug")
    styled = _styled(comfy, loaded, _confined(comfy, fp8, identifier))
    (patcher,) = styled.get_nested_additional_models()
    assert next(patcher.model.parameters()).dtype == fp8.model.manual_cast_dtype
    out = _sample(comfy, styled, positive, _negative(comfy, loaded))
    assert torch.isfinite(out["samples"]).all()


def test_the_style_projection_is_loaded_whole_by_model_management(comfy, loaded, monkeypatch):
    """The node-time image projection loads the encoder through ComfyUI (fully: a partial low-VRAM load would
    split it across devices) and runs where it was loaded."""
    import comfy.model_management as mm

    loads = []
    original = mm.load_models_gpu
    monkeypatch.setattr(mm, "load_models_gpu", lambda models, *a, **kw: loads.append((models, kw))
                        or original(models, *a, **kw))
    styled = _styled(comfy, loaded, loaded[0])
    (patcher,) = styled.get_nested_additional_models()
    assert any(kw.get("force_full_load") and any(m.model is patcher.model for m in models) for models, kw in loads)


def test_a_reloaded_style_encoder_is_freed(comfy, loaded):
    """Five reloads of a style encoder, each applied and sampled once: none stays alive afterwards, and ComfyUI's
    loaded-model list keeps none of them."""
    import comfy.model_management as mm

    style_nodes = comfy.pack_module("nodes.style_nodes")
    positive, identifier = _category(comfy, loaded, "Coffee Mug")
    alive = []
    for _ in range(5):
        (encoder,) = comfy.node_class_mappings["ProductBGLoadStyleEncoder"].execute(STYLE_FILE)
        styled = _styled(comfy, loaded, loaded[0], encoder)
        _sample(comfy, styled, positive, _negative(comfy, loaded))
        alive.append(weakref.ref(encoder))
        del encoder, styled
    gc.collect()
    mm.cleanup_models()
    assert [r() is None for r in alive] == [True] * 5
    assert not any(isinstance(m.model.model if m.model else None, style_nodes.StyleEncoder)
                   for m in mm.current_loaded_models)


# -------------------------------------------------------------------------------------- conditioning guard
def test_a_square_area_crop_on_a_square_canvas_is_refused(comfy, loaded):
    positive, identifier = _category(comfy, loaded, "Coffee Mug")
    (area,) = comfy.nodes.ConditioningSetArea().append(positive, 32, 32, 0, 0, 1.0)
    with pytest.raises(Exception, match="ConditioningSetArea"):
        _sample(comfy, _confined(comfy, loaded[0], identifier), area, _negative(comfy, loaded))
    full = comfy.nodes.ConditioningSetArea().append(positive, SIZE, SIZE, 0, 0, 1.0)[0]  # the whole latent: fine
    _sample(comfy, _confined(comfy, loaded[0], identifier), full, _negative(comfy, loaded))


def test_a_rebuilt_identifier_prompt_is_refused_and_a_missing_one_warned(comfy, loaded, caplog):
    """ConditioningAverage rebuilds the tensor: its rows could not be recognised, so sampling refuses (never
    unconfined silently); sampling without the identifier's prompt at all logs a warning and runs."""
    positive, identifier = _category(comfy, loaded, "Coffee Mug")
    other = _negative(comfy, loaded, "a photo")
    (averaged,) = comfy.nodes.ConditioningAverage().addWeighted(positive, other, 0.9)
    model = _confined(comfy, loaded[0], identifier)
    with pytest.raises(Exception, match="rebuilt"):
        _sample(comfy, model, averaged, _negative(comfy, loaded))
    (combined,) = comfy.nodes.ConditioningCombine().combine(positive, other)  # untouched tensors: fine
    _sample(comfy, model, combined, _negative(comfy, loaded))
    with caplog.at_level(logging.WARNING):
        _sample(comfy, model, other, _negative(comfy, loaded))
    assert any("not among the sampler's positive" in r.getMessage() for r in caplog.records)


# -------------------------------------------------------------------------------------------- attention kernel
def test_patched_layers_use_comfyuis_attention_backend(comfy, loaded, monkeypatch):
    """Text, identifier-free and style terms all go through ComfyUI's optimized attention (a user's sage /
    flash / xformers choice); the test counts cross-attention calls (77-token keys) during one step."""
    import comfy.ldm.modules.attention as attention

    cross = []
    original = attention.optimized_attention

    def spy(q, k, v, heads, *args, **kwargs):
        if k.shape[1] % 77 == 0:
            cross.append(k.shape[1])
        return original(q, k, v, heads, *args, **kwargs)
    monkeypatch.setattr(attention, "optimized_attention", spy)
    positive, identifier = _category(comfy, loaded, "Coffee Mug")
    _sample(comfy, _confined(comfy, loaded[0], identifier), positive, _negative(comfy, loaded))
    assert len(cross) >= 2 * 16  # full and identifier-free prompt, in each of the 16 layers


# ------------------------------------------------------------------------------------ newer clone semantics
def _ipadapter_like_add(model, key, callback, **kwargs):
    """What ComfyUI_IPAdapter_plus' ``set_model_patch_replace`` does: clone, copy the dicts, ``.add`` in place."""
    m = model.clone()
    to = m.model_options["transformer_options"].copy()
    to["patches_replace"] = to["patches_replace"].copy()
    to["patches_replace"]["attn2"] = to["patches_replace"]["attn2"].copy()
    to["patches_replace"]["attn2"][key].add(callback, **kwargs)
    m.model_options["transformer_options"] = to
    return m


def _zero(out, q, k, v, extra_options, **kwargs):
    return torch.zeros_like(out)


def test_no_upstream_model_is_mutated_under_either_clone_semantics(comfy, loaded, clone_semantics):
    """Foreign objects we stack onto, our objects a foreign pack adds to, and re-runs: every upstream model keeps
    its patch objects as they were."""
    positive, identifier = _category(comfy, loaded, "Coffee Mug")
    base = loaded[0].clone()
    attn2 = base.model_options.setdefault("transformer_options", {}).setdefault(
        "patches_replace", {}).setdefault("attn2", {})
    attn2[("input", 1)] = foreign = ForeignAttn2(_zero, sigma_start=math.inf, sigma_end=0.0)
    ours = _styled(comfy, loaded, _confined(comfy, base, identifier))
    assert len(foreign.kwargs) == 1  # we stacked onto a copy
    ours_attn2 = ours.model_options["transformer_options"]["patches_replace"]["attn2"]
    before = {key: len(obj.kwargs) for key, obj in ours_attn2.items()}
    for _ in range(2):  # a re-run of the downstream pack adds to a fresh clone each time
        downstream = _ipadapter_like_add(ours, ("input", 2), _zero, sigma_start=math.inf, sigma_end=0.0)
        assert len(downstream.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 2)]
                   .kwargs) == 1
    assert {key: len(obj.kwargs) for key, obj in ours_attn2.items()} == before
    probe = comfy.pack_module("attention.probe")
    with probe.record() as rec:
        _sample(comfy, downstream, positive, _negative(comfy, loaded))
    assert rec.layers() == set(range(16)) and all(r.max_mass_on_product == 0 for r in rec.identifier)
