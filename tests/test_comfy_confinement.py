"""Confinement end to end in a real ComfyUI 0.3.75: a real sampler over a full-size SD1.5 UNet, two categories of
one bank. At strength 1 every layer's product-cell cross-attention output is bit-identical for both categories
(queries held fixed, so only the key/value path — what confinement controls — is compared) with ``context``
confinement, alone, with Reference Style, with an IPAdapter_plus-style object stacked underneath, and with a
negative prompt longer than the positive; the column-only bias lets the category through."""
import math

import pytest
import torch

from comfy_model_files import BANK_FILE, STYLE_FILE, VISION_FILE
from foreign_attn2 import ForeignAttn2

pytestmark = pytest.mark.comfyui

LONG_NEGATIVE = ", ".join(["blurry, low quality, watermark"] * 14)  # > 77 tokens: two chunks


@pytest.fixture(scope="module")
def files(comfy_model_files):
    return comfy_model_files


@pytest.fixture(scope="module")
def loaded(comfy, files):
    """Checkpoint and bank loaded once (every test clones the model; nothing mutates these)."""
    model, clip, _ = comfy.nodes.CheckpointLoaderSimple().load_checkpoint(comfy.ckpt_sd15)[:3]
    (bank,) = comfy.node_class_mappings["ProductBGLoadCategoryBank"].execute(BANK_FILE)
    return model, clip, bank


def _zero(out, q, k, v, extra_options, **kwargs):
    return torch.zeros_like(out)


def _foreign(model):
    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    attn2 = to.setdefault("patches_replace", {}).setdefault("attn2", {})
    for key in (("input", 1), ("middle", 0), ("output", 11)):
        attn2[key] = ForeignAttn2(_zero, sigma_start=math.inf, sigma_end=0.0)
    return m


def _sample(comfy, loaded, category, confinement, variant, replay=None):
    nodes, classes = comfy.nodes, comfy.node_class_mappings
    probe = comfy.pack_module("attention.probe")
    model, clip, bank = loaded
    positive, identifier = classes["ProductBGCategoryPrompt"].execute(clip, bank, category, "", "soft light")
    negative = nodes.CLIPTextEncode().encode(clip, LONG_NEGATIVE if variant == "long_negative" else "blurry")[0]
    mask = torch.zeros(1, 64, 64)
    mask[:, :48, :48] = 1  # product cells on every grid down to the 1×1 middle block, background on all others
    if variant == "foreign":
        model = _foreign(model)
    model = classes["ProductBGMaskGuidedAttention"].execute(model, identifier, mask, 1.0, 0.0, 1.0, confinement)[0]
    if variant == "style":
        (encoder,) = classes["ProductBGLoadStyleEncoder"].execute(STYLE_FILE)
        (vision,) = nodes.CLIPVisionLoader().load_clip(VISION_FILE)
        reference = torch.rand(1, 96, 96, 3, generator=torch.Generator().manual_seed(0))
        model = classes["ProductBGReferenceStyle"].execute(model, encoder, vision, reference, 0.8, "all", 0.0, 1.0,
                                                             product_mask=mask)[0]
    latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
    with torch.no_grad(), probe.record(keep_outputs=True, replay=replay) as rec:
        nodes.common_ksampler(model, 1, 2, 5.0, "euler", "normal", positive, negative, latent)
    return rec


@pytest.mark.parametrize("variant", ["plain", "style", "foreign", "long_negative"])
def test_product_cells_do_not_depend_on_the_category(comfy, loaded, variant):
    first = _sample(comfy, loaded, "Coffee Mug", "context", variant)
    second = _sample(comfy, loaded, "Leather Bag", "context", variant, replay=[o.query for o in first.outputs])
    assert len(first.outputs) == len(second.outputs) == 2 * 16  # 2 steps × 16 layers (batched cond + uncond)
    assert {o.layer_index for o in first.outputs} == set(range(16))
    background_changed = 0
    for a, b in zip(first.outputs, second.outputs):
        assert a.product is not None and a.product.any()
        diff = (a.output - b.output).abs().amax(-1)
        assert torch.equal(a.output[a.product], b.output[b.product]), f"layer {a.layer_index} leaks"
        positive_rows = a.product.any(1)
        background = ~a.product & positive_rows[:, None]
        if background.any():
            background_changed += int(diff[background].max() > 0)
    assert background_changed == 2 * 15  # every layer but the 1×1 middle block (all product) has background


def test_column_bias_alone_leaks_through_the_causal_encoder(comfy, loaded):
    first = _sample(comfy, loaded, "Coffee Mug", "columns", "plain")
    second = _sample(comfy, loaded, "Leather Bag", "columns", "plain", replay=[o.query for o in first.outputs])
    leaks = [(a.output - b.output)[a.product].abs().max().item() for a, b in zip(first.outputs, second.outputs)]
    assert max(leaks) > 1e-3
