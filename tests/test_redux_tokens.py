"""Flux Redux tokens outside ComfyUI (``pipeline.flux_redux``) against ComfyUI 0.3.75's own Redux path.

ComfyUI's classes (``comfy.clip_model.CLIPVisionModelProjection`` with a SigLIP config, ``clip_preprocess``,
``comfy.ldm.flux.redux.ReduxImageEncoder``) are built at a small width with seeded weights, saved in the layouts of
``sigclip_vision_patch14_384.safetensors`` and ``flux1-redux-dev.safetensors``, and read back by productbg's
loader: the tokens agree. The full-size files go through the same loader in ``test_comfy_flux_cli.py``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from productbg.pipeline.errors import PipelineError
from productbg.pipeline.flux_redux import clip_preprocess, load_redux

pytestmark = pytest.mark.comfyui

SIGLIP = {"num_channels": 3, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 144, "image_size": 56,
          "intermediate_size": 96, "model_type": "siglip_vision_model", "num_attention_heads": 2,
          "num_hidden_layers": 2, "patch_size": 14, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
TEXT = 32


def _seeded(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if name.endswith("norm1.weight")
                                                                 or name.endswith("norm2.weight") else 0.0))
    return module.eval()


@pytest.fixture(scope="module")
def comfy_redux(comfy, tmp_path_factory):
    """ComfyUI's SigLIP and Redux at a small width, and the two files they were saved to."""
    import comfy.clip_model
    import comfy.ops
    from comfy.ldm.flux.redux import ReduxImageEncoder

    vision = _seeded(comfy.clip_model.CLIPVisionModelProjection(SIGLIP, torch.float32, "cpu",
                                                                comfy.ops.manual_cast), 1)
    redux = _seeded(ReduxImageEncoder(redux_dim=SIGLIP["hidden_size"], txt_in_features=TEXT), 2)
    folder = tmp_path_factory.mktemp("redux")
    save_file({k: v.contiguous() for k, v in vision.state_dict().items()}, folder / "sigclip.safetensors")
    save_file({k: v.contiguous() for k, v in redux.state_dict().items()}, folder / "redux.safetensors")
    return vision, redux, folder


def _reference(h: int = 70, w: int = 90) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.rand(2, h, w, 3, generator=g)


def test_preprocess_is_comfyuis(comfy):
    """Resize of the shorter side, centre crop, 8-bit rounding and normalisation equal ``clip_preprocess``."""
    from comfy.clip_vision import clip_preprocess as comfy_preprocess

    image = _reference()
    ours = clip_preprocess(image, 56)
    theirs = comfy_preprocess(image, size=56, mean=[0.5] * 3, std=[0.5] * 3, crop=True).float()
    assert ours.shape == (2, 3, 56, 56)
    assert torch.equal(ours, theirs)


def test_tokens_match_comfyui(comfy, comfy_redux):
    """The style tokens of two references, flattened into one row and scaled, equal what StyleModelApply appends
    (the same models run by ComfyUI), and a different reference gives different tokens."""
    from comfy.clip_vision import clip_preprocess as comfy_preprocess

    vision, redux, folder = comfy_redux
    encoder = load_redux(folder / "redux.safetensors", folder / "sigclip.safetensors")
    image = _reference()
    with torch.no_grad():
        pixels = comfy_preprocess(image, size=56, mean=[0.5] * 3, std=[0.5] * 3, crop=True).float()
        hidden = vision(pixel_values=pixels, intermediate_output="all")[0]
        expected = redux(hidden).flatten(0, 1)[None] * 0.7
    ours = encoder.tokens(image, strength=0.7)
    assert ours.shape == (1, 2 * 16, TEXT)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    other = encoder.tokens(image.flip(1), strength=0.7)
    assert (other - expected).abs().max() > 1e-2


def test_wrong_files_are_refused(comfy_redux, tmp_path):
    """The two files swapped, or a CLIP vision model of IP-Adapter's, are refused with what to pass."""
    _, _, folder = comfy_redux
    with pytest.raises(PipelineError, match="not a Flux Redux style model"):
        load_redux(folder / "sigclip.safetensors", folder / "sigclip.safetensors")
    with pytest.raises(PipelineError, match="--clip-vision"):
        load_redux(folder / "redux.safetensors", folder / "redux.safetensors")
    clip = tmp_path / "clip_vision_h.safetensors"
    save_file({"vision_model.embeddings.class_embedding": torch.zeros(8),
               "vision_model.embeddings.patch_embedding.weight": torch.zeros(8, 3, 14, 14)}, clip)
    with pytest.raises(PipelineError, match="IP-Adapter"):
        load_redux(folder / "redux.safetensors", clip)
    with pytest.raises(PipelineError, match="no such file"):
        load_redux(folder / "missing.safetensors", folder / "sigclip.safetensors")
    assert np.isfinite(load_redux(folder / "redux.safetensors", folder / "sigclip.safetensors")
                       .tokens(_reference(14, 14)).numpy()).all()
