"""``productbg generate --reference`` on Flux.1: Redux's two files (``--style-model``, ``--clip-vision``) read by
``pipeline.flux_redux``, the reference's tokens kept off the product, and one-line refusals.

Tiny files in ComfyUI's layouts: a Flux Fill single file with T5-XXL's width (so Redux's 4096-wide tokens fit), a
small SigLIP (``vision_model.*``, as ``sigclip_vision_patch14_384.safetensors``) and a Redux projector from it to
4096 (``redux_up`` / ``redux_down``, as ``flux1-redux-dev.safetensors``). The full-size files are compared with
ComfyUI's own tokens in ``test_comfy_flux_files.py``.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from flux_tiny_files import write_bundled, write_configs
from productbg.cli import main
from productbg.fileio.png import save_png
from productbg.imaging import load_image
from productbg.imaging.synthetic import packshot
from productbg.pipeline import ProductBGPipeline
from productbg.pipeline.components import tiny_components
from productbg.pipeline.errors import PipelineError
from productbg.pipeline.flux_models import tiny_flux_parts
from productbg.pipeline.flux_redux import ReduxProjector
from productbg.weights.safefile import atomic_save

SMALL = ["--size", "64", "--steps", "2"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _siglip_state(seed: int = 0) -> dict[str, torch.Tensor]:
    config = SiglipVisionConfig(hidden_size=144, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                                image_size=56, patch_size=14, vision_use_head=False)
    torch.manual_seed(seed)
    model = SiglipVisionModel(config)
    return {(k if k.startswith("vision_model.") else "vision_model." + k): v.to(torch.float16).contiguous()
            for k, v in model.state_dict().items() if not k.endswith("position_ids")}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Flux Fill file (T5 4096 wide) and its configs, Redux + SigLIP files, a product and two references."""
    root = tmp_path_factory.mktemp("lead-flux-redux")
    parts = tiny_flux_parts("fill", t5_width=4096)
    torch.manual_seed(1)
    projector = ReduxProjector(144, 4096)
    out = {"configs": write_configs(parts, root / "configs"),
           "checkpoint": write_bundled(parts, root / "tiny_flux.safetensors", fp8_t5=True),
           "siglip": atomic_save(_siglip_state(), root / "sigclip_vision_patch14_384.safetensors"),
           "redux": atomic_save({k: v.to(torch.bfloat16) for k, v in projector.state_dict().items()},
                                root / "flux1-redux-dev.safetensors"),
           "product": save_png(packshot(48).image, root / "product.png")}
    g = np.random.default_rng(2)
    for name in ("warm", "cool"):
        out[name] = save_png(g.random((40, 56, 3), dtype=np.float32), root / f"{name}.png")
    return {k: str(v) for k, v in out.items()}


def _argv(files, out, *extra):
    return ["generate", "--product", files["product"], "--checkpoint", files["checkpoint"], "--configs",
            files["configs"], "--out", str(out), *SMALL, *extra]


def test_generate_with_a_redux_reference_end_to_end(files, tmp_path):
    """--reference with --style-model and --clip-vision: written, the product core pasted back bit for bit, the run
    records the Redux file; another reference, or none, gives another background."""
    redux = ["--style-model", files["redux"], "--clip-vision", files["siglip"]]
    assert main(_argv(files, tmp_path / "warm", "--reference", files["warm"], *redux)) == 0
    assert main(_argv(files, tmp_path / "cool", "--reference", files["cool"], *redux)) == 0
    assert main(_argv(files, tmp_path / "plain")) == 0
    meta = json.loads((tmp_path / "warm" / "result.json").read_text())
    assert meta["style_model"] == files["redux"] and meta["reference"] == files["warm"]
    warm, cool, plain = (load_image(tmp_path / n / meta["images"][0])[0] for n in ("warm", "cool", "plain"))
    placed, mask = load_image(tmp_path / "warm" / "placed.png")[0], load_image(tmp_path / "warm" / "mask.png")[0]
    core = (mask[..., 0] if mask.ndim == 3 else mask) >= 1.0
    assert core.sum() > 100 and np.array_equal(warm[core], placed[core]) and np.array_equal(cool[core], placed[core])
    assert np.abs(warm - cool).max() > 1e-3 and np.abs(warm - plain).max() > 1e-3


def test_redux_refusals_one_line(files, tmp_path, capsys):
    """A reference without Redux, half of Redux's files, the two files swapped: exit 2 with one line each."""
    for extra, words in ((["--reference", files["warm"]], "--style-model"),
                         (["--reference", files["warm"], "--style-model", files["redux"]], "needs both files"),
                         (["--reference", files["warm"], "--style-model", files["siglip"], "--clip-vision",
                           files["siglip"]], "not a Flux Redux style model")):
        capsys.readouterr()
        assert main(_argv(files, tmp_path / "x", *extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (extra, err)
    assert not (tmp_path / "x" / "result.json").exists()


def test_redux_on_stable_diffusion_is_refused():
    """Redux's files with an SD1.5 model: refused, naming the SD way (an IP-Adapter style encoder)."""
    with pytest.raises(PipelineError, match="--style-encoder"):
        ProductBGPipeline.from_components(tiny_components(), style_model="flux1-redux-dev.safetensors")
