"""SDXL in the ComfyUI adapter and the node helpers, without ComfyUI: the 70 attn2 objects at 3-part keys, stacking
with foreign objects at 3- and 2-part keys, the grid at SDXL canvases, both token lists, and the bad-input messages."""
import copy
import math
from types import SimpleNamespace

import pytest
import torch

from productbg.attention import SD15, SDXL, Guidance
from productbg.attention import comfy_patch
from productbg.nodes.category_nodes import _slot_positions, _splice
from productbg.nodes.common import (NodeInputError, backbone_of, backbone_of_clip, check_identifier_fits,
                                    without_positions, word_positions)

START, END = 49406, 49407


class Foreign:
    """An IPAdapter_plus-style object (``.add`` with kwargs)."""

    def __init__(self):
        self.callback, self.kwargs = [], []

    def add(self, callback, **kwargs):
        self.callback.append(callback)
        self.kwargs.append(kwargs)


def test_install_puts_one_object_at_each_of_the_70_three_part_keys_and_leaves_the_input_alone():
    options = {"transformer_options": {"patches_replace": {"attn2": {}}}}
    before = copy.deepcopy(options)
    out = comfy_patch.install(copy.copy(options), Guidance(), SDXL.layer_keys)
    attn2 = out["transformer_options"]["patches_replace"]["attn2"]
    assert len(attn2) == 70 and all(len(k) == 3 for k in attn2)
    assert [attn2[k].layer_index for k in SDXL.layer_keys] == list(range(70))
    (patch,) = out["transformer_options"]["patches"]["attn2_patch"]
    assert patch._blocks == {tuple(k[:2]) for k in SDXL.layer_keys} and len(patch._blocks) == 11
    assert options == before


def test_foreign_objects_at_three_and_two_part_sdxl_keys_are_stacked_onto_not_shadowed():
    three, two = Foreign(), Foreign()
    options = {"transformer_options": {"patches_replace": {"attn2": {("output", 0, 3): three, ("input", 4): two}}}}
    attn2 = comfy_patch.install(options, Guidance(), SDXL.layer_keys)["transformer_options"]["patches_replace"]["attn2"]
    index = {k: layer.index for k, layer in zip(SDXL.layer_keys, SDXL.layers)}
    # Stacked onto copies (copy-on-write: the input's objects stay untouched), of the foreign objects' type.
    assert three.kwargs == [] and two.kwargs == []
    three_now, two_now = attn2[("output", 0, 3)], attn2[("input", 4)]
    assert type(three_now) is Foreign and three_now.kwargs[0]["layer_index"] == index[("output", 0, 3)]
    # Our 3-part objects would hide the 2-part one (ComfyUI looks 3-part keys up first): none at input 4.
    assert ("input", 4, 0) not in attn2 and ("input", 4, 1) not in attn2 and type(two_now) is Foreign
    (kw,) = two_now.kwargs
    assert kw["by_block_index"] == {0: index[("input", 4, 0)], 1: index[("input", 4, 1)]}
    assert isinstance(attn2[("input", 5, 1)], comfy_patch.ProductBGAttn2)
    comfy_patch.install(options, Guidance(), SDXL.layer_keys)  # a second install adds nothing twice
    assert len(two_now.kwargs) == 1 and len(three_now.kwargs) == 1
    assert attn2[("input", 4)] is two_now and attn2[("output", 0, 3)] is three_now


def test_the_delta_on_a_two_part_object_reads_the_layer_from_block_index(monkeypatch):
    seen = []
    monkeypatch.setattr(comfy_patch, "_layer_context", lambda q, eo, layer_index: seen.append(layer_index))
    out = torch.zeros(1, 4, 8)
    for block_index in (0, 1):
        comfy_patch.productbg_delta(out, out, out, out, {"block_index": block_index}, layer_index=5,
                                    by_block_index={0: 5, 1: 6})
    assert seen == [5, 6]


@pytest.mark.parametrize("width,height", [(1024, 1024), (832, 1216), (1216, 832)])
def test_the_adapter_grid_at_sdxl_canvases(width, height):
    """The adapter takes ComfyUI's activations_shape when given and falls back to the latent rule, at both SDXL
    attention levels (latent/2 with 640-wide layers, latent/4 with 1280-wide ones)."""
    lh, lw = height // 8, width // 8
    for level in (1, 2):
        h, w = math.ceil(lh / 2 ** level), math.ceil(lw / 2 ** level)
        q = torch.zeros(2, h * w, 640 * level)
        assert comfy_patch._grid(q, {"activations_shape": [2, 640 * level, h, w]}) == (h, w)
        assert comfy_patch._grid(q, {"original_shape": [2, 4, lh, lw]}) == (h, w)
    if width != height:  # the exact grid wins over a transposed guess
        assert comfy_patch._grid(torch.zeros(1, 4 * 6, 8), {"activations_shape": [1, 8, 4, 6]}) == (4, 6)


# ------------------------------------------------------------------ token lists (a fake SDXL CLIP)
class FakeClip:
    """``tokenize`` like ComfyUI's SDXL CLIP: ``l`` pads with EOS, ``g`` with 0; one id per word."""

    def __init__(self, keys=("g", "l"), vocab=None):
        self.keys, self.vocab = keys, vocab or {}

    def _ids(self, text, key):
        return [self.vocab.get((key, w), self.vocab.get(w, 1000 + sum(map(ord, w)))) for w in text.replace(",", " ,").split()]

    def tokenize(self, text):
        out = {}
        for key in self.keys:
            ids = [START, *self._ids(text, key), END]
            pad = 0 if key == "g" else END
            out[key] = [[(t, 1.0) for t in ids + [pad] * (77 - len(ids))]]
        return out


def test_without_positions_removes_the_words_in_both_lists_and_keeps_each_lists_padding():
    clip = FakeClip()
    tokens = clip.tokenize("a photo on marble table")
    positions = word_positions(clip, tokens, "marble table")
    assert positions == {"g": [4, 5], "l": [4, 5]}
    plain = without_positions(tokens, positions)
    assert plain == {k: clip.tokenize("a photo on")[k] for k in ("g", "l")}
    assert plain["g"][0][-1] == (0, 1.0) and plain["l"][0][-1] == (END, 1.0)


def test_words_at_different_positions_in_the_two_tokenizations_are_refused():
    clip = FakeClip(vocab={("g", "marble"): 7})
    tokens = clip.tokenize("marble table on marble table")
    tokens["g"][0][1] = (99, 1.0)   # g's first "marble" differs: the first match moves
    with pytest.raises(NodeInputError, match="different token positions"):
        word_positions(clip, tokens, "marble table")


def test_the_identifier_is_spliced_into_both_lists_at_the_same_slots():
    clip = FakeClip(vocab={"sks": 5})
    tokens = clip.tokenize("a photo of sks sks, soft light")
    positions = _slot_positions(tokens, {"l": 5, "g": 5})
    assert positions == {"l": [4, 5], "g": [4, 5]}
    vectors = {"l": torch.ones(2, 768), "g": torch.full((2, 1280), 2.0)}
    _splice(tokens, positions, vectors)
    for key, width in (("l", 768), ("g", 1280)):
        assert [tuple(tokens[key][0][p][0].shape) for p in positions[key]] == [(width,)] * 2
    tokens["g"][0][6] = (5, 1.0)
    with pytest.raises(NodeInputError, match="different positions"):
        _slot_positions(tokens, {"l": 5, "g": 5})


@pytest.mark.parametrize("keys,family", [(("l",), "sd15"), (("g", "l"), "sdxl"), (("t5xxl", "l"), "flux")])
def test_the_clip_backbone_comes_from_the_token_keys(keys, family):
    assert backbone_of_clip(FakeClip(keys).tokenize("x")).family == family


@pytest.mark.parametrize("keys,named", [(("g",), "refiner"), (("h",), "SD2"), (("t5xxl", "l", "g"), "SD3")])
def test_other_clips_are_refused_by_name(keys, named):
    with pytest.raises(NodeInputError, match=named):
        backbone_of_clip(FakeClip(keys).tokenize("x"))


def _model(config_name, **unet):
    config = type(config_name, (), {})()
    config.unet_config = unet
    return SimpleNamespace(model=SimpleNamespace(model_config=config))


SDXL_UNET = dict(context_dim=2048, model_channels=320, transformer_depth=[0, 0, 2, 2, 10, 10],
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10)


def test_models_are_told_apart_and_others_refused_by_name():
    assert backbone_of(_model("SDXL", **SDXL_UNET)) is SDXL
    assert backbone_of(_model("SD15", context_dim=768, model_channels=320)) is SD15
    for name, named in (("SDXLRefiner", "refiner"), ("SD3", "SD3"), ("Flux", "Flux"), ("SD20", "SD2")):
        with pytest.raises(NodeInputError, match=named):
            backbone_of(_model(name, context_dim=1280, model_channels=384))


def test_an_identifier_of_the_other_backbones_clip_is_refused():
    from productbg.attention import IdentifierSpec

    spec = IdentifierSpec((1,), context_length=77, plain_context=torch.zeros(1, 77, 768))
    check_identifier_fits(spec, SD15)
    with pytest.raises(NodeInputError, match="SD1.5 CLIP but the MODEL is SDXL"):
        check_identifier_fits(spec, SDXL)
    spec = IdentifierSpec((1,), context_length=77, plain_context=torch.zeros(1, 77, 2048))
    with pytest.raises(NodeInputError, match="SDXL CLIP but the MODEL is SD1.5"):
        check_identifier_fits(spec, SD15)


def _bank(family):
    from productbg.weights.bank import CategoryBank

    bank = CategoryBank(family, vectors_per_id=1)
    vectors = {"clip_l": torch.zeros(1, 768)} | ({"clip_g": torch.zeros(1, 1280)} if family == "sdxl" else {})
    bank.add("shoes", vectors)
    return bank


@pytest.mark.parametrize("bank_family,clip_keys,expected", [
    ("sdxl", ("l",), "this is an SDXL bank but the CLIP is SD1.5: use an SD1.5 bank (clip_l vectors), or the CLIP of an SDXL checkpoint"),
    ("sd15", ("g", "l"), "this is an SD1.5 bank but the CLIP is SDXL: use an SDXL bank (clip_l + clip_g vectors), or the CLIP "
                         "of an SD1.5 checkpoint")])
def test_a_bank_of_the_other_family_is_refused_before_encoding(bank_family, clip_keys, expected):
    from productbg.nodes.category_nodes import CategoryPrompt

    with pytest.raises(NodeInputError) as e:
        CategoryPrompt.execute(FakeClip(clip_keys, {"sks": 5}), _bank(bank_family), "shoes", "", "")
    assert str(e.value) == expected


def test_an_sdxl_bank_gives_both_encoders_their_vectors():
    from productbg.nodes.category_nodes import _bank_vectors

    vectors = _bank_vectors(_bank("sdxl"), "shoes", SDXL)
    assert {k: tuple(v.shape) for k, v in vectors.items()} == {"l": (1, 768), "g": (1, 1280)}


def test_an_ip_adapter_of_the_other_backbone_is_refused_naming_the_right_files():
    from productbg.nodes.style_nodes import check_encoder_fits
    from productbg.backbones import targets
    from productbg.weights.style_encoder import StyleEncoder, StyleEncoderConfig

    with torch.device("meta"):
        sd15 = StyleEncoder(StyleEncoderConfig.for_target(targets.SD15, variant="linear", tokens=4, clip_width=1024))
        sdxl = StyleEncoder(StyleEncoderConfig.for_target(targets.SDXL, variant="linear", tokens=4, clip_width=1024))
    check_encoder_fits(sd15, SD15)
    check_encoder_fits(sdxl, SDXL)
    with pytest.raises(NodeInputError, match="is for SD1.5 but the MODEL is SDXL: use ip-adapter_sdxl_vit-h"):
        check_encoder_fits(sd15, SDXL)
    with pytest.raises(NodeInputError, match="is for SDXL but the MODEL is SD1.5: use ip-adapter_sd15"):
        check_encoder_fits(sdxl, SD15)


@pytest.mark.parametrize("variant,width,named", [("linear", 1024, "ViT-H"), ("plus", 1280, "ViT-H"),
                                                 ("linear", 1280, "ViT-bigG")])
def test_a_clip_vision_of_the_wrong_width_names_the_one_to_load(variant, width, named):
    from productbg.nodes.style_nodes import style_tokens

    encoder = SimpleNamespace(config=SimpleNamespace(variant=variant, clip_width=width))
    vision = SimpleNamespace(encode_image=lambda images: {"image_embeds": torch.zeros(1, 768),
                                                          "penultimate_hidden_states": torch.zeros(1, 257, 1024)})
    with pytest.raises(NodeInputError, match=f"needs CLIP {named}"):
        style_tokens(encoder, vision, torch.zeros(1, 8, 8, 3))


def test_a_custom_canvas_off_the_grid_of_8_is_refused():
    from productbg.nodes.imaging_nodes import PlaceProduct

    mask = torch.zeros(1, 32, 32)
    mask[:, 8:24, 8:24] = 1
    with pytest.raises(NodeInputError, match="multiple of 8.*use 1000x1024"):
        PlaceProduct.execute(torch.rand(1, 32, 32, 3), mask, "custom", 1001, 1020, 0.74, "center", 0.05, "#FFFFFF", 20)
    assert PlaceProduct.INPUT_TYPES()["required"]["width"][1]["default"] == 512  # saved workflows keep theirs


def test_sdxl_comfyui_modules_run_after_every_other_comfyui_module():
    """Never an SD1.5 and an SDXL ComfyUI model in one process at once: the SDXL modules come last."""
    import comfy_env

    class Item:
        def __init__(self, module):
            self.module, self.fixturenames = SimpleNamespace(__name__=module), []

        def get_closest_marker(self, name):
            return name

    names = ["test_comfy_sdxl", "test_comfy_attention", "test_comfy_trained_files", "test_comfy_workflows"]
    items = [Item(n) for n in names]
    comfy_env.move_comfyui_tests_last(items)
    assert [i.module.__name__ for i in items] == ["test_comfy_trained_files", "test_comfy_attention",
                                                 "test_comfy_workflows", "test_comfy_sdxl"]


def test_category_lora_from_the_bank_refuses_a_bank_of_the_other_backbone():
    """A bank's LoRAs are trained for its backbone: on the other one ComfyUI would silently drop their keys."""
    from productbg.nodes.lora_nodes import CategoryLoraNode
    from weight_samples import example_bank

    sdxl_model = _model("SDXL", **SDXL_UNET)
    with pytest.raises(NodeInputError, match="SD1.5 bank but the MODEL is SDXL.*use an SDXL bank"):
        CategoryLoraNode.execute(sdxl_model, None, example_bank(), "bottle", "(from bank)", 1.0, 1.0)
    with pytest.raises(NodeInputError, match="SDXL bank but the MODEL is SD1.5"):
        CategoryLoraNode.execute(_model("SD15", context_dim=768, model_channels=320), None, example_bank(family="sdxl"), "bottle",
                                 "(from bank)", 1.0, 1.0)
