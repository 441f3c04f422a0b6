"""The ComfyUI adapter inside a real ComfyUI 0.3.75: real checkpoints, real sampler, real patcher."""
import copy
import math

import pytest
import torch

from comfy_graphs import product_box_mask
from foreign_attn2 import ForeignAttn2

pytestmark = pytest.mark.comfyui

SIZE = 128
PRODUCT = (16, 112)  # a 96×96 product: ≥50% of every cell even on the 2×2 middle-block grid at 128 px


def _graph(ckpt: str, strength: float = 1.0, prefix: str = "pbg_attn", inpaint: bool = False) -> dict:
    """Checkpoint → Background Words → Mask-Guided Attention → KSampler (2 steps) → VAE decode → save."""
    lo, hi = PRODUCT
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        **product_box_mask(SIZE, lo, hi),
        "pos": {"class_type": "ProductBGBackgroundWords", "inputs": {
            "clip": ["ckpt", 1], "text": "a product photo on a marble table, soft light",
            "background_words": "marble table"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
        "attn": {"class_type": "ProductBGMaskGuidedAttention", "inputs": {
            "model": ["ckpt", 0], "identifier": ["pos", 1], "product_mask": ["mask", 0], "strength": strength,
            "start_percent": 0.0, "end_percent": 1.0}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["attn", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": 1, "steps": 2, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}},
    }
    if inpaint:
        g["pixels"] = {"class_type": "EmptyImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1,
                                                              "color": 8421504}}
        g["invert"] = {"class_type": "InvertMask", "inputs": {"mask": ["mask", 0]}}
        g["inpaint"] = {"class_type": "InpaintModelConditioning", "inputs": {
            "positive": ["pos", 0], "negative": ["neg", 0], "vae": ["ckpt", 2], "pixels": ["pixels", 0],
            "mask": ["invert", 0], "noise_mask": True}}
        g["sample"]["inputs"].update(positive=["inpaint", 0], negative=["inpaint", 1], latent_image=["inpaint", 2])
    return g


@pytest.mark.parametrize("inpaint", [False, True], ids=["sd15", "sd15_inpaint"])
def test_real_sampling_keeps_identifier_off_the_product_in_all_16_layers(comfy, inpaint):
    """A real graph runs; during sampling every cross-attention layer gives the identifier 0 mass on product."""
    ckpt = comfy.ckpt_inpaint if inpaint else comfy.ckpt_sd15
    probe = comfy.pack_module("attention.probe")
    with probe.record() as rec:
        outputs = comfy.run(_graph(ckpt, inpaint=inpaint, prefix=f"pbg_attn_{int(inpaint)}"))
    assert len(comfy.saved_images(outputs)) == 1
    assert rec.layers() == set(range(16))
    for r in rec.identifier:
        assert r.product_cells > 0, f"layer {r.layer_index} ({r.grid_tokens} tokens) has no product cell"
        assert r.max_mass_on_product == 0.0
        if r.product_cells < r.grid_tokens:  # the 2×2 middle block is all product here
            assert r.mean_mass_on_background > 0.0


def test_strength_zero_matches_unpatched_sampling(comfy):
    """Strength 0 changes nothing; strength 1 changes the image (the patch really acts on the sampler)."""
    import numpy as np
    from PIL import Image

    def render(strength, prefix, patched=True):
        g = _graph(comfy.ckpt_sd15, strength=strength, prefix=prefix)
        if not patched:
            g["sample"]["inputs"]["model"] = ["ckpt", 0]
        (path,) = comfy.saved_images(comfy.run(g))
        return np.asarray(Image.open(path), dtype=np.int16)

    plain = render(1.0, "pbg_plain", patched=False)
    zero = render(0.0, "pbg_zero")
    full = render(1.0, "pbg_full")
    assert np.abs(zero - plain).max() <= 1
    assert np.abs(full - plain).max() > 1


def _model_and_identifier(comfy):
    nodes = comfy.nodes
    model, clip, _ = nodes.CheckpointLoaderSimple().load_checkpoint(comfy.ckpt_sd15)[:3]
    words = comfy.node_class_mappings["ProductBGBackgroundWords"]
    _, identifier = words.execute(clip, "a bottle on a marble table", "marble table")
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1
    return model, identifier, mask


def _apply(comfy, model, identifier, mask, strength=1.0):
    node = comfy.node_class_mappings["ProductBGMaskGuidedAttention"]
    return node.execute(model, identifier, mask, strength, 0.0, 1.0)[0]


def test_input_model_untouched_and_clone_shares_tensors(comfy, clone_semantics):
    model, identifier, mask = _model_and_identifier(comfy)
    before = copy.deepcopy(model.model_options)
    patched = _apply(comfy, model, identifier, mask)
    assert model.model_options == before
    attn2 = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert set(attn2) == set(comfy.pack_module("attention.guided").SD15_LAYER_KEYS)
    assert ("middle", 0) in attn2
    clone = patched.clone()
    g1 = patched.model_options["transformer_options"]["productbg"]
    g2 = clone.model_options["transformer_options"]["productbg"]
    assert g1 is g2 and g1.identifiers[0].product.mask is g2.identifiers[0].product.mask
    assert clone.model_options["transformer_options"]["patches_replace"]["attn2"][("middle", 0)] is not attn2[("middle", 0)]


def test_identifier_tokens_found_across_chunks(comfy):
    """Background words in the second 77-token chunk of a long prompt get positions ≥ 77 and period 154."""
    model, clip, _ = comfy.nodes.CheckpointLoaderSimple().load_checkpoint(comfy.ckpt_sd15)[:3]
    words = comfy.node_class_mappings["ProductBGBackgroundWords"]
    long_text = " ".join(["studio"] * 80) + ", marble table"
    cond, spec = words.execute(clip, long_text, "marble table")
    assert spec.context_length == 154 and min(spec.token_indices) >= 77
    assert cond[0][0].shape[1] == 154
    with pytest.raises(ValueError, match="does not occur"):
        words.execute(clip, "a bottle", "marble table")


FOREIGN_CALLS: dict[str, list] = {"a": [], "b": []}  # module-level: ModelPatcher.clone() deep-copies kwargs


def _shift(out, q, k, v, extra_options, **kwargs):
    FOREIGN_CALLS[kwargs["calls"]].append(extra_options["block"])
    return torch.zeros_like(out)


def _install_foreign(model, calls):
    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    attn2 = to.setdefault("patches_replace", {}).setdefault("attn2", {})
    for key in (("input", 1), ("middle", 0)):
        attn2[key] = ForeignAttn2(_shift, calls=calls, sigma_start=math.inf, sigma_end=0.0)
    return m


def test_stacks_with_ipadapter_style_objects_both_ways(comfy, clone_semantics):
    """Ours adds itself to (a copy of) a foreign object; a foreign `.add` onto ours keeps both contributions and
    leaves the upstream model alone; both run — under both clone semantics."""
    model, identifier, mask = _model_and_identifier(comfy)
    calls_a, calls_b = "a", "b"
    for calls in FOREIGN_CALLS.values():
        calls.clear()
    foreign_first = _install_foreign(model, calls_a)
    ours_on_top = _apply(comfy, foreign_first, identifier, mask)
    attn2 = ours_on_top.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert isinstance(attn2[("input", 1)], ForeignAttn2)
    assert [kw.get("productbg") for kw in attn2[("input", 1)].kwargs] == [None, True]
    assert len(foreign_first.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1)].kwargs) == 1

    ours_first = _apply(comfy, model, identifier, mask)
    m = ours_first.clone()
    obj = m.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 2)]
    obj.add(_shift, calls=calls_b, sigma_start=math.inf, sigma_end=0.0)
    assert ours_first.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 2)].callback == []

    probe = comfy.pack_module("attention.probe")
    for patched, calls in ((ours_on_top, calls_a), (m, calls_b)):
        with probe.record() as rec:
            _sample(comfy, patched, identifier)
        assert FOREIGN_CALLS[calls], "the foreign contribution never ran"
        assert rec.layers() == set(range(16)) and all(r.max_mass_on_product == 0 for r in rec.identifier)


def _sample(comfy, model, identifier):
    nodes = comfy.nodes
    _, clip, _ = nodes.CheckpointLoaderSimple().load_checkpoint(comfy.ckpt_sd15)[:3]
    words = comfy.node_class_mappings["ProductBGBackgroundWords"]
    positive, _ = words.execute(clip, "a bottle on a marble table", "marble table")
    negative = nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
    return nodes.common_ksampler(model, 1, 1, 5.0, "euler", "normal", positive, negative, latent)


def test_bad_inputs_give_clear_errors(comfy):
    model, identifier, mask = _model_and_identifier(comfy)
    node = comfy.node_class_mappings["ProductBGMaskGuidedAttention"]
    with pytest.raises(ValueError, match="empty"):
        node.execute(model, identifier, torch.zeros(1, 64, 64), 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="start_percent"):
        node.execute(model, identifier, mask, 1.0, 0.8, 0.2)
