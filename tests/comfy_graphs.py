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
