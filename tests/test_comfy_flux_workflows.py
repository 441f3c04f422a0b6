"""The shipped Flux.1 workflows (workflows/api/*_flux.json) end to end in a real ComfyUI 0.3.75, on the random
full-size Flux files (tests/flux_checkpoint.py): their sampler settings are the backbone table's, and at a small
canvas with one step they run from the product photo to the saved image, the export and the preservation report.
A pytest process of its own (scripts/test.sh): the graphs load their own T5-XXL."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from comfy_graphs import sized_workflow

pytestmark = pytest.mark.comfyui

SIZE = 256
WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
FLUX_BANK = "test_category_bank_flux.safetensors"


@pytest.fixture(scope="module")
def bank_file(comfy, tmp_path_factory):
    """A flux bank file in models/productbg/banks with the workflows' category, and the example inputs."""
    folder = tmp_path_factory.mktemp("flux_banks")
    comfy.folder_paths.add_model_folder_path("productbg_banks", str(folder))
    bank = comfy.pack_module("weights.bank").CategoryBank("flux", vectors_per_id=2)
    bank.add("shoes", {"t5xxl": torch.randn(2, 4096, generator=torch.Generator().manual_seed(0)) * 0.05})
    bank.save(folder / FLUX_BANK)
    for png in (WORKFLOWS / "inputs").glob("*.png"):
        shutil.copy(png, Path(comfy.input_dir) / png.name)
    return FLUX_BANK


@pytest.mark.parametrize("name", ["category_background_flux", "reference_style_flux"])
def test_flux_api_workflow_runs_end_to_end(comfy, comfy_flux_files, bank_file, tmp_path, name):
    prompt = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text(encoding="utf-8"))
    flux = comfy.pack_module("backbones").FLUX
    by_class = {n["class_type"]: n["inputs"] for n in prompt.values()}
    d = flux.sampler
    sampler = by_class["KSampler"]
    assert (sampler["steps"], sampler["cfg"], sampler["sampler_name"], sampler["scheduler"]) == \
        (d.steps, d.cfg, d.sampler_name, d.scheduler)
    assert by_class["FluxGuidance"]["guidance"] == d.inpaint_guidance
    assert (by_class["ProductBGPlaceProduct"]["width"], by_class["ProductBGPlaceProduct"]["height"]) == (1024, 1024)
    small = sized_workflow(comfy, prompt, tmp_path, SIZE, 1, export_size=SIZE)
    files = comfy_flux_files
    swap = {"unet_name": files["fill"], "clip_name1": files["clip_l"], "clip_name2": files["t5xxl"],
            "vae_name": files["vae"], "style_model_name": files["redux"], "bank_name": bank_file}
    for node in small.values():
        for key in swap.keys() & node["inputs"].keys():
            node["inputs"][key] = swap[key]
        if node["class_type"] == "CLIPVisionLoader":
            node["inputs"]["clip_name"] = files["siglip"]
    # ComfyUI's own T5 option node between the loader and its users: unpadded T5 prompts (CPU time)
    clip_id = next(k for k, n in small.items() if n["class_type"] == "DualCLIPLoader")
    for node in small.values():
        for key, value in node["inputs"].items():
            if value == [clip_id, 0]:
                node["inputs"][key] = ["t5opts", 0]
    small["t5opts"] = {"class_type": "T5TokenizerOptions", "inputs": {"clip": [clip_id, 0], "min_padding": 0,
                                                                     "min_length": 0}}
    outputs = comfy.run(small)
    results = {node["class_type"]: outputs.get(key, {}) for key, node in small.items()}
    (image,) = comfy.saved_images({"save": results["SaveImage"]})
    assert image.stat().st_size > 0
    report = json.loads(results["ProductBGPreservationReport"]["text"][0])
    assert report["images"][0]["checks"]["delta_e2000_mean"]["pass"]  # the product is pasted back untouched
