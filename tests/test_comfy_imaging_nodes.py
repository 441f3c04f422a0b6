"""The image nodes inside a real ComfyUI 0.3.75: LoadImage → Segment → Place → (generate) → Composite → Report."""
import json

import numpy as np
import pytest
from PIL import Image

from productbg.imaging.synthetic import packshot

pytestmark = pytest.mark.comfyui

SIZE = 64


def product_graph(image_name: str, prefix: str, generated: list | None = None) -> dict:
    """LoadImage → Segment → Place; Composite over ``generated`` (default: a blurred canvas) → Report → save."""
    g = {
        "load": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "segment": {"class_type": "ProductBGSegmentProduct", "inputs": {
            "image": ["load", 0], "transparency": ["load", 1], "method": "auto", "tolerance": 10.0,
            "shadow_strength": 0.75, "threshold": 0.5, "grow": 0, "fill_holes": True, "keep_largest": False,
            "feather": 1.0, "clean_edges": True}},
        "place": {"class_type": "ProductBGPlaceProduct", "inputs": {
            "image": ["segment", 0], "mask": ["segment", 1], "canvas": "1:1", "width": SIZE, "height": SIZE,
            "fill_ratio": 0.74, "anchor": "center", "margin": 0.05, "fill_color": "#FFFFFF", "inpaint_grow": 20}},
        "blur": {"class_type": "ImageBlur", "inputs": {"image": ["place", 0], "blur_radius": 4, "sigma": 3.0}},
        "composite": {"class_type": "ProductBGCompositeProduct", "inputs": {
            "generated": generated or ["blur", 0], "placed": ["place", 0], "product_mask": ["place", 1],
            "feather": 2.0}},
        "report": {"class_type": "ProductBGPreservationReport", "inputs": {
            "product_image": ["place", 0], "product_mask": ["place", 1], "output_image": ["composite", 0],
            "generated_image": generated or ["blur", 0], "max_delta_e_mean": 2.0, "min_psnr_db": 0.0,
            "max_expansion_ratio": 0.05}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["composite", 0], "filename_prefix": prefix}},
        "save_placed": {"class_type": "SaveImage", "inputs": {"images": ["place", 0],
                                                              "filename_prefix": prefix + "_placed"}},
        "save_mask": {"class_type": "SaveImage", "inputs": {"images": ["mask_image", 0],
                                                            "filename_prefix": prefix + "_mask"}},
        "mask_image": {"class_type": "MaskToImage", "inputs": {"mask": ["place", 1]}},
    }
    return g


@pytest.fixture(scope="module")
def packshot_name(comfy):
    """A 96 px white packshot with a soft shadow, saved into ComfyUI's input folder."""
    return comfy.put_input_image(packshot(96).image, "pbg_packshot.png")


def read(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_registered_in_real_comfyui(comfy):
    """ComfyUI lists the five image nodes with their categories."""
    for node_id in ("ProductBGSegmentProduct", "ProductBGPlaceProduct", "ProductBGCompositeProduct",
                    "ProductBGPreservationReport", "ProductBGLoadProductsFromFolder"):
        assert comfy.node_class_mappings[node_id].CATEGORY == "productbg/image"


def test_image_graph_runs_and_keeps_the_product_core(comfy, packshot_name):
    """The whole image chain runs; saved output equals the placed canvas in the product core; report shown."""
    outputs = comfy.run(product_graph(packshot_name, "pbg_img"))
    text = outputs["report"]["text"][0]
    report = json.loads(text)
    assert report["pass"] is True and report["images"][0]["metrics"]["product_pixels"] > 500
    saved = {p.name.split("_000")[0]: p for p in comfy.saved_images(outputs)}
    out, placed, mask = read(saved["pbg_img"]), read(saved["pbg_img_placed"]), read(saved["pbg_img_mask"])[..., 0]
    assert out.shape == (SIZE, SIZE, 3)
    core = mask == 255
    assert core.sum() > 500 and np.array_equal(out[core], placed[core])
    assert not np.array_equal(out[mask == 0], placed[mask == 0])        # the background is the "generated" one


def test_inpainting_graph_with_expansion_report(comfy, packshot_name):
    """Place → InpaintModelConditioning → KSampler (2 steps) → VAEDecode → Composite → Segment again → Report."""
    g = product_graph(packshot_name, "pbg_gen", generated=["decode", 0])
    g.update({
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": comfy.ckpt_inpaint}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a product on marble"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
        "inpaint": {"class_type": "InpaintModelConditioning", "inputs": {
            "positive": ["pos", 0], "negative": ["neg", 0], "vae": ["ckpt", 2], "pixels": ["place", 0],
            "mask": ["place", 2], "noise_mask": True}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "positive": ["inpaint", 0], "negative": ["inpaint", 1],
            "latent_image": ["inpaint", 2], "seed": 1, "steps": 2, "cfg": 7.5, "sampler_name": "euler",
            "scheduler": "normal", "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "segment_out": {"class_type": "ProductBGSegmentProduct", "inputs": {
            **g["segment"]["inputs"], "image": ["composite", 0], "method": "grabcut"}},
    })
    del g["segment_out"]["inputs"]["transparency"]
    g["report"]["inputs"]["output_mask"] = ["segment_out", 1]
    outputs = comfy.run(g)
    report = json.loads(outputs["report"]["text"][0])["images"][0]
    assert {"delta_e2000", "psnr_before_paste_back_db", "expansion"} <= set(report["metrics"])
    assert report["checks"]["delta_e2000_mean"]["pass"]                   # pasted back: product preserved
    saved = {p.name.split("_000")[0]: p for p in comfy.saved_images(outputs)}
    out, placed, mask = read(saved["pbg_gen"]), read(saved["pbg_gen_placed"]), read(saved["pbg_gen_mask"])[..., 0]
    assert np.array_equal(out[mask == 255], placed[mask == 255])


def test_load_products_from_folder_in_comfyui(comfy, tmp_path):
    """The folder node feeds Segment-free placement: its MASK comes from alpha or the automatic segmentation."""
    (tmp_path / "mugs").mkdir()
    Image.fromarray((packshot(48).image * 255).astype(np.uint8)).save(tmp_path / "mugs" / "m1.png")
    g = {
        "folder": {"class_type": "ProductBGLoadProductsFromFolder", "inputs": {
            "folder": str(tmp_path), "index": 0, "csv_file": ""}},
        "place": {"class_type": "ProductBGPlaceProduct", "inputs": {
            "image": ["folder", 0], "mask": ["folder", 1], "canvas": "16:9", "width": 512, "height": 288,
            "fill_ratio": 0.74, "anchor": "bottom", "margin": 0.05, "fill_color": "#F0F0F0", "inpaint_grow": 20}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["place", 0], "filename_prefix": "pbg_folder"}},
    }
    (path,) = comfy.saved_images(comfy.run(g))
    assert Image.open(path).size == (512, 288)  # 16:9 at 512 × 288 px (the one canvas table, as the CLI)
    g["folder"]["inputs"]["index"] = 1
    with pytest.raises(AssertionError, match="index 1 is past the last product"):
        comfy.run(g)


def test_bad_masks_are_node_errors_and_comfyui_keeps_working(comfy, packshot_name):
    """An empty product mask fails the node with a clear message; the next prompt runs normally."""
    g = product_graph(packshot_name, "pbg_bad")
    g["empty"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": SIZE, "height": SIZE}}
    g["place"]["inputs"]["mask"] = ["empty", 0]
    with pytest.raises(AssertionError, match="mask is empty"):
        comfy.run(g)
    g["full"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 32}}
    g["place"]["inputs"]["mask"] = ["full", 0]
    with pytest.raises(AssertionError, match="covers the whole image"):
        comfy.run(g)
    assert "report" in comfy.run(product_graph(packshot_name, "pbg_after"))
