"""Pieces of API-format graphs shared by the real-ComfyUI tests."""
from __future__ import annotations


def product_box_mask(size: int, lo: int, hi: int) -> dict:
    """Nodes ``canvas``/``box``/``mask``: a size×size MASK with a square product (1) from lo to hi."""
    return {
        "canvas": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": size, "height": size}},
        "box": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": hi - lo, "height": hi - lo}},
        "mask": {"class_type": "MaskComposite", "inputs": {"destination": ["canvas", 0], "source": ["box", 0],
                                                            "x": lo, "y": lo, "operation": "add"}},
    }


def inpaint_and_save(size: int, model: list, seed: int, prefix: str) -> dict:
    """Nodes from InpaintModelConditioning to SaveImage, reading ``ckpt``, ``pos``, ``neg`` and ``mask``."""
    return {
        "pixels": {"class_type": "EmptyImage", "inputs": {"width": size, "height": size, "batch_size": 1,
                                                          "color": 0x808080}},
        "invert": {"class_type": "InvertMask", "inputs": {"mask": ["mask", 0]}},
        "inpaint": {"class_type": "InpaintModelConditioning", "inputs": {
            "positive": ["pos", 0], "negative": ["neg", 0], "vae": ["ckpt", 2], "pixels": ["pixels", 0],
            "mask": ["invert", 0], "noise_mask": True}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["inpaint", 0], "negative": ["inpaint", 1],
            "latent_image": ["inpaint", 2], "seed": seed, "steps": 2, "cfg": 7.5, "sampler_name": "euler",
            "scheduler": "normal", "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}},
    }


def sized_workflow(comfy, prompt: dict, products, size: int, steps: int, export_size: int | None = None) -> dict:
    """A copy of a shipped API graph with the test model files, a ``size`` canvas, ``steps`` sampler steps and an
    ``export_size``² export (default ``size``); nothing else changed."""
    import json

    from comfy_model_files import BANK_FILE, STYLE_FILE, VISION_FILE

    swap = {"ckpt_name": comfy.ckpt_inpaint, "bank_name": BANK_FILE, "encoder_name": STYLE_FILE,
            "clip_name": VISION_FILE}
    prompt = json.loads(json.dumps(prompt.get("prompt", prompt)))
    for node in prompt.values():
        inputs = node["inputs"]
        for key in swap.keys() & inputs.keys():
            inputs[key] = swap[key]
        if node["class_type"] == "ProductBGPlaceProduct":
            inputs.update(width=size, height=size)
        if node["class_type"] == "KSampler":
            inputs["steps"] = steps
        if node["class_type"] == "ProductBGLoadProductsFromFolder":
            inputs["folder"] = str(products)
        if node["class_type"] == "ProductBGExportProduct":
            side = export_size or size
            inputs.update(size="custom", width=side, height=side)
    return prompt
