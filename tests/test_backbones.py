"""The backbone table (backbones/): layer structure, ComfyUI keys, presets, detection, canvases."""
import dataclasses
import math
from collections import Counter

import pytest

from productbg import backbones as bb
from productbg.attention.masks import infer_grid
from productbg.backbones import targets


def test_sd15_layers_are_the_ones_the_pack_always_patched():
    """SD1.5 keeps its 16 two-part keys in IP-Adapter order (down, up, mid) and its widths."""
    assert bb.SD15.layer_keys == (
        ("input", 1), ("input", 2), ("input", 4), ("input", 5), ("input", 7), ("input", 8),
        ("output", 3), ("output", 4), ("output", 5), ("output", 6), ("output", 7), ("output", 8),
        ("output", 9), ("output", 10), ("output", 11), ("middle", 0))
    assert bb.SD15.hidden_sizes == (320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640,
                                    320, 320, 320, 1280)
    assert bb.SD15.context_dim == 768 and targets.SD15.hidden_sizes == bb.SD15.hidden_sizes


def test_sdxl_has_70_layers_under_three_part_keys():
    """input 4,5 ×2; input 7,8 ×10; middle ×10; output 0–2 ×10; output 3–5 ×2, keyed (block, number, index)."""
    layers = bb.SDXL.layers
    assert len(layers) == 70 and bb.SDXL.context_dim == 2048
    per_block = Counter(layer.comfy_key[:2] for layer in layers)
    assert per_block == {("input", 4): 2, ("input", 5): 2, ("input", 7): 10, ("input", 8): 10, ("middle", 0): 10,
                         ("output", 0): 10, ("output", 1): 10, ("output", 2): 10,
                         ("output", 3): 2, ("output", 4): 2, ("output", 5): 2}
    for block, n in per_block.items():
        assert sorted(k[2] for k in bb.SDXL.layer_keys if k[:2] == block) == list(range(n))
    assert [layer.file_index for layer in layers] == list(range(1, 141, 2))
    assert len({layer.diffusers_name for layer in layers}) == 70
    # the widths the published SDXL IP-Adapter files have, in file order
    assert targets.SDXL.hidden_sizes == (640,) * 4 + (1280,) * 20 + (1280,) * 30 + (640,) * 6 + (1280,) * 10
    assert layers[4].diffusers_name == "down_blocks.2.attentions.0.transformer_blocks.0.attn2"
    assert layers[-1].diffusers_name == "mid_block.attentions.0.transformer_blocks.9.attn2"


def test_style_presets_follow_instantstyle_on_sdxl_and_the_block_split_on_sd15():
    style = [bb.SDXL.layers[i] for i, w in enumerate(bb.SDXL.layer_weights("style")) if w]
    layout = [bb.SDXL.layers[i] for i, w in enumerate(bb.SDXL.layer_weights("composition")) if w]
    assert len(style) == 10 and {layer.attention for layer in style} == {"up_blocks.0.attentions.1"}
    assert len(layout) == 10 and {layer.attention for layer in layout} == {"down_blocks.2.attentions.1"}
    assert all(layer.comfy_key[:2] == ("output", 1) for layer in style)
    assert all(layer.comfy_key[:2] == ("input", 8) for layer in layout)
    assert sum(bb.SDXL.layer_weights("all")) == 70
    sd15_style = bb.SD15.layer_weights("style")
    assert [k for k, w in zip(bb.SD15.layer_keys, sd15_style) if w] == [("output", i) for i in range(3, 12)]
    with pytest.raises(KeyError, match="one of all, style, composition"):
        bb.SDXL.layer_weights("texture")


SDXL_UNET = {"model_channels": 320, "context_dim": 2048, "adm_in_channels": 2816,
             "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
             "transformer_depth_middle": 10}
SD15_UNET = {"model_channels": 320, "context_dim": 768, "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
             "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1], "transformer_depth_middle": 1}


def test_comfy_models_are_recognised_and_others_refused_by_name():
    assert bb.from_comfy_config("SDXL", SDXL_UNET) is bb.SDXL
    assert bb.from_comfy_config("SD15", SD15_UNET) is bb.SD15
    with pytest.raises(bb.BackboneError, match="SDXL refiner.*no CLIP-L"):
        bb.from_comfy_config("SDXLRefiner", {"context_dim": 1280, "model_channels": 384})
    for name, word in [("SD3", "SD3"), ("SD20", "SD2"), ("SSD1B", "SSD-1B")]:
        with pytest.raises(bb.BackboneError, match=word) as e:
            bb.from_comfy_config(name, {"context_dim": 4096})
        assert "supports SD1.5, SDXL, Flux.1" in str(e.value)
    distilled = dict(SDXL_UNET, transformer_depth=[0, 0, 2, 2, 4, 4])
    with pytest.raises(bb.BackboneError, match="distilled SDXL"):
        bb.from_comfy_config("SDXL", distilled)
    with pytest.raises(bb.BackboneError, match="Mystery"):
        bb.from_comfy_config("Mystery", {"context_dim": 99})


def test_clip_token_keys_tell_the_text_encoders_apart():
    assert bb.from_token_keys({"l"}) is bb.SD15
    assert bb.from_token_keys({"l", "g"}) is bb.SDXL
    with pytest.raises(bb.BackboneError, match="refiner"):
        bb.from_token_keys({"g"})
    with pytest.raises(bb.BackboneError, match="SD3"):
        bb.from_token_keys({"l", "g", "t5xxl"})
    assert bb.from_token_keys({"l", "t5xxl"}) is bb.FLUX
    assert bb.from_token_keys({"l", "t5xxl"}, host="diffusers") is bb.FLUX
    assert bb.from_token_keys({"l", "t5xxl"}, host="training") is bb.FLUX  # train-cg trains Flux.1 (issue 23)
    untrained = dataclasses.replace(bb.FLUX, adapters=frozenset({"comfyui"}))
    with pytest.raises(bb.BackboneError, match="Flux.1 is in productbg's backbone table but its training adapter"):
        bb.require(untrained, "training")  # known, refused where its adapter is not built


@pytest.mark.parametrize("b", [bb.SD15, bb.SDXL], ids=lambda b: b.family)
def test_named_canvases_keep_their_ratio_at_the_trained_pixel_count(b):
    sizes = b.canvases
    assert sizes["1:1"] == (b.default_size, b.default_size)
    assert len(set(sizes.values())) == len(sizes)             # 4:5 and 3:4 stay apart
    for name, (w, h) in sizes.items():
        rw, rh = map(int, name.split(":"))
        assert w % 8 == 0 and h % 8 == 0
        assert abs(w / h - rw / rh) / (rw / rh) < 0.03, name
        assert abs(w * h / b.default_size ** 2 - 1) < 0.05, name


@pytest.mark.parametrize("width,height", [(1024, 1024), (832, 1216), (1216, 832), (928, 1152)])
def test_the_grid_rule_finds_every_sdxl_attention_level(width, height):
    """SDXL attends at latent/2 and latent/4 (none at full latent size); the grid rule finds both from the latent
    shape alone, for square and portrait / landscape canvases (odd sides round up, as the stride-2 convs do)."""
    lh, lw = height // 8, width // 8
    for level in (1, 2):
        h, w = lh, lw
        for _ in range(level):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        assert infer_grid(h * w, latent_hw=(lh, lw)) == (h, w)


def test_flux_is_an_entry_of_the_table_with_joint_attention_blocks():
    """A DiT is data too: 19 double- then 38 single-stream blocks at ComfyUI's dit keys, T5 feeding the text,
    CLIP-L only pooled, a 16-channel latent, Redux for style; detected by name everywhere, run on ComfyUI,
    refused by name on the hosts whose adapter is not built yet."""
    flux = bb.FLUX
    assert flux.kind == "dit" and flux.layers == () and len(flux.blocks) == 57
    assert [b.comfy_key for b in flux.blocks[:2]] == [("double_block", 0), ("double_block", 1)]
    assert flux.blocks[19].comfy_key == ("single_block", 0) and flux.blocks[19].diffusers_name == \
        "single_transformer_blocks.0"
    assert flux.context_dim == 4096 and [t.name for t in flux.text_encoders if t.pooled] == ["clip_l"]
    assert flux.latent.channels == 16 and flux.style == "redux" and flux.canvases["1:1"] == (1024, 1024)
    assert "19 double-stream and 38 single-stream blocks" in flux.describe()
    assert [t.name for t in flux.bank_encoders] == ["t5xxl"]  # a Flux bank holds T5 vectors only
    flux_unet = {"context_in_dim": 4096, "hidden_size": 3072, "depth": 1, "depth_single_blocks": 1}
    for name in ("Flux", "FluxInpaint", "FluxSchnell"):
        assert bb.from_comfy_config(name, flux_unet) is flux
    with pytest.raises(bb.BackboneError, match="reads text 2048 wide"):
        bb.from_comfy_config("Flux", dict(flux_unet, context_in_dim=2048))
    flux_keys = ["model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
                 "model.diffusion_model.single_blocks.0.linear1.weight"]
    assert bb.from_checkpoint_keys(flux_keys) is flux  # the diffusers pipeline runs Flux.1
    assert bb.from_checkpoint_keys(flux_keys, host="training") is flux  # and train-cg trains it
    with pytest.raises(bb.BackboneError, match="Kontext.*Flux.1 Fill"):
        bb.from_comfy_config("FluxKontext", {})
    for relative, name in (("distilled_guidance_layer.in_proj.weight", "Chroma"),
                           ("double_stream_modulation_img.lin.weight", "FLUX.2")):
        with pytest.raises(bb.BackboneError, match=name):
            bb.from_checkpoint_keys(["double_blocks.0.img_attn.qkv.weight", relative])
    assert bb.from_checkpoint_keys(["cond_stage_model.transformer.text_model.x"]) is bb.SD15
    assert bb.from_checkpoint_keys(["lora_unet_x.lora_down.weight"]) is None


def test_one_canvas_table_for_the_cli_and_place_product():
    """Place Product and the CLI resolve an aspect ratio by the same function: 4:5 at SD1.5's 512² is 464×576
    in both (Place Product used to say 408×512), at SDXL's 1024² 928×1152."""
    from productbg.nodes.imaging_nodes import canvas_frame

    for b in (bb.SD15, bb.SDXL):
        for ratio in bb.RATIOS:
            side = b.default_size
            assert canvas_frame(ratio, side, side) == (b.canvases[ratio], b.canvases[ratio]), (b.family, ratio)
    assert bb.SD15.canvases["4:5"] == (464, 576) and bb.SDXL.canvases["4:5"] == (928, 1152)
    with pytest.raises(ValueError, match="1:1"):
        bb.canvas("2:1", 512 * 512)
