"""The diffusers pipeline against the shipped ComfyUI workflows: same defaults, same pre- and post-processing.

Sampling itself is not compared number for number (ComfyUI's ``ddim`` sampler runs on k-diffusion sigmas, the
pipeline on diffusers' DDIM); everything around it runs the same library calls and is compared exactly.
"""
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from productbg.imaging import load_image
from productbg.nodes.imaging_nodes import CompositeProduct, PlaceProduct, PreservationReport, SegmentProduct
from productbg.backbones import FLUX, SD15, SDXL
from productbg.pipeline.pipeline import (REFERENCE_GROW, REPORT_THRESHOLDS, GenerateSettings, ProductBGPipeline,
                                         defaults_for)

ROOT = Path(__file__).resolve().parent.parent
#: The workflows whose settings the diffusers pipeline reproduces: every shipped one (the Flux ones too, since the
#: pipeline runs Flux.1; tests/test_comfy_flux_workflows.py also runs them in ComfyUI).
GRAPHS = sorted((ROOT / "workflows" / "api").glob("*.json"))
FLUX_GRAPHS = sorted((ROOT / "workflows" / "api").glob("*_flux.json"))
EXAMPLE = ROOT / "workflows" / "inputs" / "productbg_example_product.png"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _nodes(graph: dict, class_type: str) -> list[dict]:
    return [n["inputs"] for n in graph.values() if n["class_type"] == class_type]


def _values(inputs: dict) -> dict:
    """Widget values only (links are [node, slot] lists)."""
    return {k: v for k, v in inputs.items() if not isinstance(v, list)}


def test_the_flux_workflows_are_compared_with_the_pipeline():
    """The pipeline runs Flux.1, so its two workflows are among the graphs whose defaults it must equal."""
    assert len(FLUX_GRAPHS) == 2 and FLUX.runs_on("diffusers") and set(FLUX_GRAPHS) <= set(GRAPHS)


@pytest.mark.parametrize("path", GRAPHS, ids=lambda p: p.stem)
def test_defaults_match_shipped_workflow(path):
    """Sampler, placement, prompts, style, paste-back and report settings equal the workflow's (the backbone's
    defaults for the ``*_sdxl`` and ``*_flux`` twins; the Flux ones load Flux Fill, whose distilled guidance is the
    table's inpaint guidance)."""
    backbone = SDXL if path.stem.endswith("_sdxl") else FLUX if path.stem.endswith("_flux") else SD15
    graph, d = json.loads(path.read_text()), defaults_for(backbone)
    for k in _nodes(graph, "KSampler"):
        assert (k["steps"], k["cfg"], k["sampler_name"], k["scheduler"], k["denoise"]) == (
            d.steps, d.guidance_scale, backbone.sampler.sampler_name, backbone.sampler.scheduler, 1.0)
    for p in _nodes(graph, "ProductBGPlaceProduct"):
        assert (p["width"], p["height"], p["fill_ratio"], p["inpaint_grow"]) == (d.size, d.size, d.fill_ratio,
                                                                                 d.inpaint_grow)
        assert (p["anchor"], p["fill_color"]) == ("center", "#FFFFFF")
    for c in _nodes(graph, "ProductBGCompositeProduct"):
        assert c["feather"] == d.feather
    for c in _nodes(graph, "InpaintModelConditioning"):
        assert c["noise_mask"] is d.noise_mask
    for c in _nodes(graph, "ProductBGCategoryPrompt"):
        assert c["extra_text"] == d.extra_text and c["template"] == ""
    assert [t["text"] for t in _nodes(graph, "CLIPTextEncode")] == [d.negative_prompt]
    for m in _nodes(graph, "ProductBGMaskGuidedAttention"):
        assert m["strength"] == d.identifier_strength
    for s in _nodes(graph, "ProductBGReferenceStyle"):
        assert (s["weight"], s["layer_preset"]) == (d.style_weight, d.style_layers)
    for s in _nodes(graph, "ProductBGReferenceStyleRedux"):  # the Redux tokens' scale
        assert s["strength"] == d.style_weight
    for u in _nodes(graph, "UNETLoader"):
        assert u["unet_name"] == "flux1-fill-dev.safetensors"
    for g in _nodes(graph, "FluxGuidance"):
        assert d.distilled_guidance is None and g["guidance"] == backbone.sampler.inpaint_guidance
    for r in _nodes(graph, "ProductBGPreservationReport"):
        assert (r["max_delta_e_mean"], r["min_psnr_db"], r["max_expansion_ratio"]) == (
            REPORT_THRESHOLDS.max_delta_e_mean, REPORT_THRESHOLDS.min_psnr_db, REPORT_THRESHOLDS.max_expansion_ratio)
    reference_segments = [s for s in _nodes(graph, "ProductBGSegmentProduct") if s["grow"]]
    assert all(s["grow"] == REFERENCE_GROW and s["clean_edges"] is False for s in reference_segments)


@pytest.fixture(scope="module")
def pipe():
    return ProductBGPipeline.tiny(style=False, device="cpu")


@pytest.fixture(scope="module")
def comfy_placement():
    """Segment Product + Place Product nodes with the category workflow's widget values, on its example input."""
    graph = json.loads((ROOT / "workflows" / "api" / "category_background.json").read_text())
    rgb, alpha = load_image(EXAMPLE)
    image = torch.as_tensor(rgb)[None]
    transparency = torch.zeros(1, *rgb.shape[:2]) if alpha is None else torch.as_tensor(1 - alpha)[None]
    segment = next(n for n in graph.values() if n["class_type"] == "ProductBGSegmentProduct")
    seg_image, seg_mask = SegmentProduct.execute(image, transparency=transparency, **_values(segment["inputs"]))
    place = next(n for n in graph.values() if n["class_type"] == "ProductBGPlaceProduct")
    return PlaceProduct.execute(seg_image, seg_mask, **_values(place["inputs"]))


def test_prepare_equals_comfy_nodes(pipe, comfy_placement):
    """The pipeline's segment + place give the nodes' canvas, product mask and inpaint mask exactly."""
    placed, mask, repaint = (t[0].numpy() for t in comfy_placement[:3])
    prep = pipe.prepare(EXAMPLE)
    assert prep.placed.shape == (512, 512, 3)
    np.testing.assert_array_equal(prep.placed, placed)
    np.testing.assert_array_equal(prep.mask, mask)
    np.testing.assert_array_equal(prep.repaint, repaint)


def test_paste_back_and_report_equal_comfy_nodes(pipe, comfy_placement):
    """Composite Product and Preservation Report nodes give the pipeline's final image and report."""
    prep = pipe.prepare(EXAMPLE)
    raw = torch.rand(3, 512, 512, generator=torch.Generator().manual_seed(0))
    settings = replace(pipe.settings, report_expansion=True)  # the node measures expansion itself
    result = pipe._finish(raw, prep, seed=0, category="shoes", prompt="", s=settings)
    placed, mask, _, _ = comfy_placement
    generated = raw.permute(1, 2, 0)[None]
    (final,) = CompositeProduct.execute(generated, placed, mask, pipe.settings.feather)
    np.testing.assert_array_equal(result.image, final[0].numpy())
    t = REPORT_THRESHOLDS
    node = PreservationReport.execute(placed, mask, final, t.max_delta_e_mean, t.min_psnr_db,
                                       t.max_expansion_ratio, generated_image=generated).result
    report = json.loads(node[0])["images"][0]
    ours, theirs = dict(result.report["metrics"]), dict(report["metrics"])
    # expansion: both find the output's product by GrabCut seeded with the product mask; GrabCut's k-means start
    # draws from OpenCV's global RNG, so the two runs agree closely, not bit for bit
    assert abs(ours.pop("expansion")["ratio"] - theirs.pop("expansion")["ratio"]) < 0.005
    assert theirs == ours and node[1] == result.report["pass"]
