"""Reference Style's weights are managed by a real ComfyUI 0.3.75: loaded with the UNet, on its device."""
import pytest
import torch

from comfy_model_files import STYLE_FILE, VISION_FILE

pytestmark = pytest.mark.comfyui


def _styled(comfy):
    nodes, mappings = comfy.nodes, comfy.node_class_mappings
    model = nodes.CheckpointLoaderSimple().load_checkpoint(comfy.ckpt_sd15)[0]
    encoder = mappings["ProductBGLoadStyleEncoder"].execute(STYLE_FILE)[0]
    vision = nodes.CLIPVisionLoader().load_clip(VISION_FILE)[0]
    reference = torch.full((1, 64, 64, 3), 0.4)
    node = mappings["ProductBGReferenceStyle"]
    return model, encoder, node.execute(model, encoder, vision, reference, 0.8, "all", 0.0, 1.0)[0]


def test_sampling_loads_the_style_encoder_with_the_unet(comfy, comfy_model_files):
    """prepare_sampling (what KSampler runs) loads the encoder's ModelPatcher on ComfyUI's torch device, in the
    UNet's dtype, and the style K/V are that module's."""
    from comfy import model_management as mm, sampler_helpers

    model, encoder, styled = _styled(comfy)
    (patcher,) = styled.get_nested_additional_models()
    assert patcher.model.layer_kv.__self__ is patcher.model
    assert not model.get_nested_additional_models()                          # the input model is untouched
    guidance = styled.model_options["transformer_options"]["productbg"]
    assert guidance.styles[0].layer_kv.__self__ is patcher.model
    assert next(patcher.model.parameters()).dtype == styled.model_dtype()
    _, _, loaded = sampler_helpers.prepare_sampling(styled, (1, 4, 8, 8), {"positive": [], "negative": []},
                                                    model_options=styled.model_options)
    assert patcher.model is loaded[0].model
    assert any(m.model is patcher.model for m in mm.loaded_models())
    assert next(patcher.model.parameters()).device == mm.get_torch_device() == patcher.load_device


def test_model_patches_to_reaches_our_attn2_objects(comfy, comfy_model_files):
    """ComfyUI's model_patches_to calls .to on our attn2 objects (device, then dtype) and keeps what it returns."""
    styled = _styled(comfy)[2]
    attn2 = styled.model_options["transformer_options"]["patches_replace"]["attn2"]
    before = dict(attn2)
    cls = type(next(iter(attn2.values())))
    seen = []
    original = cls.to
    cls.to = lambda self, x: seen.append(x) or original(self, x)
    try:
        styled.model_patches_to(torch.device("cpu"))
        styled.model_patches_to(torch.float16)
    finally:
        cls.to = original
    assert len(seen) == 2 * len(attn2) and attn2 == before


def test_a_float16_unet_gets_a_float16_copy_and_the_loaded_encoder_is_untouched(comfy, comfy_model_files):
    style_nodes = comfy.pack_module("nodes.style_nodes")
    encoder = comfy.node_class_mappings["ProductBGLoadStyleEncoder"].execute(STYLE_FILE)[0]
    dtype = next(encoder.parameters()).dtype
    other = torch.float16 if dtype != torch.float16 else torch.bfloat16
    half = style_nodes.managed_encoder(encoder, other)
    assert next(half.model.parameters()).dtype == other and next(encoder.parameters()).dtype == dtype
    assert style_nodes.managed_encoder(encoder, other) is half
