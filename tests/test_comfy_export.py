"""Export for Marketplace inside a real ComfyUI 0.3.75: Place (export canvas) → Export, with an upscale model."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from productbg import imaging

pytestmark = pytest.mark.comfyui


def test_export_node_delivers_the_native_product_at_export_size(comfy, tmp_path, monkeypatch):
    """LoadImage → Segment → Place (canvas amazon-zoom, a 64² generation canvas) → "generated" (a blur) →
    Export (PNG; and JPEG through Load Upscale Model): 2000² files with the sRGB profile, the product's core
    equal to the 301×211 source rendered once at 2000², the report measured at export size."""
    from spandrel.architectures.Compact import Compact
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)
    rgba = np.zeros((211, 301, 4), np.uint8)
    rgba[..., :3] = rng.integers(30, 220, (211, 301, 3))
    rgba[30:180, 60:240, 3] = 255
    name = comfy.put_input_image(Image.fromarray(rgba, "RGBA"), "pbg_export_product.png")
    folder = os.path.join(comfy.comfyui_dir, "models", "upscale_models")
    os.makedirs(folder, exist_ok=True)
    save_file(Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2).state_dict(),
              os.path.join(folder, "pbg_tiny_2x.safetensors"))
    export_inputs = dict(generated=["blur", 0], placement=["place", 3], size="placement", width=2000, height=2000,
                         quality=95, feather=2.0, save=True)
    graph = {
        "load": {"class_type": "LoadImage", "inputs": {"image": name}},
        "segment": {"class_type": "ProductBGSegmentProduct", "inputs": {
            "image": ["load", 0], "transparency": ["load", 1], "method": "auto", "tolerance": 10.0,
            "shadow_strength": 0.75, "threshold": 0.5, "grow": 0, "fill_holes": True, "keep_largest": False,
            "feather": 1.0, "clean_edges": True}},
        "place": {"class_type": "ProductBGPlaceProduct", "inputs": {
            "image": ["segment", 0], "mask": ["segment", 1], "canvas": "amazon-zoom", "width": 64, "height": 64,
            "fill_ratio": 0.74, "anchor": "center", "margin": 0.05, "fill_color": "#FFFFFF", "inpaint_grow": 20}},
        "blur": {"class_type": "ImageBlur", "inputs": {"image": ["place", 0], "blur_radius": 4, "sigma": 3.0}},
        "export": {"class_type": "ProductBGExportProduct", "inputs": dict(
            export_inputs, format="png", filename_prefix="pbg_export")},
        "upscaler": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "pbg_tiny_2x.safetensors"}},
        "export_up": {"class_type": "ProductBGExportProduct", "inputs": dict(
            export_inputs, format="jpeg", filename_prefix="pbg_export_up", upscale_model=["upscaler", 0])},
    }
    import comfy.model_management as mm

    freed = []
    original_free = mm.free_memory
    monkeypatch.setattr(mm, "free_memory", lambda need, device, *a, **kw: freed.append(need)
                        or original_free(need, device, *a, **kw))
    outputs = comfy.run(graph)
    monkeypatch.undo()
    assert freed, "the upscale model was moved to the device without asking model management for memory"
    saved = {p.name.split("_000")[0]: p for p in comfy.saved_images(outputs)}
    assert set(saved) == {"pbg_export", "pbg_export_up"}
    with Image.open(saved["pbg_export_up"]) as im:
        assert im.format == "JPEG" and im.size == (2000, 2000)
        assert im.info["icc_profile"] == imaging.srgb_icc_bytes()
    with Image.open(saved["pbg_export"]) as im:
        assert im.size == (2000, 2000) and im.info["icc_profile"] == imaging.srgb_icc_bytes()
        delivered = np.asarray(im.convert("RGB"))
    seg = imaging.segment_product(rgba.astype(np.float32) / 255, "auto")
    layout = imaging.plan_layout(seg.mask, (2000, 2000))
    placed = imaging.place_at(seg.image, seg.mask, layout)
    core = np.asarray(placed.mask) >= imaging.CORE_THRESHOLD
    assert core.sum() > 500_000
    assert np.array_equal(delivered[core], imaging.export.to_uint8(np.asarray(placed.image)[core]))
    report = json.loads(outputs["export"]["text"][0])
    assert report["pass"] and report["images"][0]["metrics"]["size"] == [2000, 2000]
    assert report["images"][0]["metrics"]["delta_e2000"]["p95"] == 0.0


def test_a_non_rgb_upscale_model_is_refused_in_one_line(comfy):
    from spandrel.architectures.Compact import Compact

    from spandrel import ModelLoader

    model = ModelLoader().load_from_state_dict(Compact(num_in_ch=1, num_out_ch=1, num_feat=8, num_conv=2,
                                                       upscale=2).state_dict())
    upscaler = comfy.pack_module("nodes.export_nodes")._upscaler
    with pytest.raises(ValueError, match="1-channel to 1-channel model; the background is RGB"):
        upscaler(model)

