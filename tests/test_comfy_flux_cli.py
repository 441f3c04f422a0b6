"""``productbg generate`` on the full-size random Flux.1 files ComfyUI users have (tests/flux_checkpoint.py: the
Fill transformer at full width with 1 double + 1 single block, the full-size fp8 T5-XXL, CLIP-L, the VAE, Redux and
its SigLIP), from the command line in a child process: the product is pasted back untouched, the outputs are complete, and the run's wall
time and peak RSS are printed (the fp8 T5 stays fp8: an fp32 T5-XXL alone would be 19 GB).

In a pytest process of its own (scripts/test.sh runs every tests/test_comfy_flux*.py alone).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from productbg.fileio.png import save_png
from productbg.imaging import load_image
from productbg.imaging.synthetic import packshot
from productbg.pipeline.flux_keys import bfl_to_diffusers
from productbg.pipeline.single_file import token_embeddings
from productbg.pipeline.text import t5_tokenizer
from productbg.weights.bank import CategoryBank
from productbg.weights.safefile import load_all

#: A guard far below an fp32 T5-XXL (19 GB) and above what the run needs (measured: printed by the test).
MAX_PEAK_GIB = 16


@pytest.fixture(scope="module")
def bank(comfy_flux_files, tmp_path_factory):
    """A flux bank: 'marble' = the fp8 T5's own input embeddings of "marble table", 'velvet' random."""
    _, tables = token_embeddings(comfy_flux_files.paths["t5xxl"])
    ids = t5_tokenizer()("marble table", add_special_tokens=False).input_ids
    words = tables["t5xxl"][torch.tensor(ids)].clone()
    b = CategoryBank("flux", vectors_per_id=len(ids))
    b.add("marble", {"t5xxl": words})
    b.add("velvet", {"t5xxl": (torch.randn(len(ids), 4096, generator=torch.Generator().manual_seed(0))
                               * words.float().std()).to(words.dtype)})
    path = tmp_path_factory.mktemp("hA-flux-bank") / "bank_flux.safetensors"
    b.save(path)
    return path


def test_generate_on_the_full_size_flux_fill_files(comfy_flux_files, bank, tmp_path):
    """generate --checkpoint flux1-fill-dev --t5 --clip-l --vae at 128², 2 steps, a flux bank and a Redux reference
    (--style-model, --clip-vision): exit 0, every output written and readable, the product core equal to the placed
    product, the fp8 T5 kept fp8 (peak RSS)."""
    paths = comfy_flux_files.paths
    product = save_png(packshot(96).image, tmp_path / "product.png")
    reference = save_png(np.random.default_rng(4).random((300, 400, 3), dtype=np.float32), tmp_path / "ref.png")
    out = tmp_path / "item"
    argv = [sys.executable, "-m", "productbg", "generate", "--product", str(product), "--category", "marble",
            "--checkpoint", str(paths["fill"]), "--t5", str(paths["t5xxl"]), "--clip-l", str(paths["clip_l"]),
            "--vae", str(paths["vae"]), "--bank", str(bank), "--reference", str(reference), "--style-model",
            str(paths["redux"]), "--clip-vision", str(paths["siglip"]), "--size", "128", "--steps", "2", "--device", "cpu",
            "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    wall = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20
    print(f"\n[flux cli] generate at 128², 2 steps, full-size fp8 T5-XXL + Redux: {wall:.1f} s wall, peak RSS "
          f"{peak_gib:.2f} GiB")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "result.json").read_text())
    assert result["settings"]["sampler"] == "euler" and result["t5"] == str(paths["t5xxl"])
    assert result["style_model"] == str(paths["redux"]) and result["reference"] == str(reference)
    image, placed = load_image(out / result["images"][0])[0], load_image(out / "placed.png")[0]
    mask = load_image(out / "mask.png")[0]
    mask = mask[..., 0] if mask.ndim == 3 else mask
    assert image.shape == (128, 128, 3) and np.isfinite(image).all()
    core = mask >= 1.0
    assert core.sum() > 500 and np.array_equal(image[core], placed[core])
    assert result["reports"][0]["metrics"]["delta_e2000"]["mean"] < 2.0  # the report's threshold (edges feathered)
    assert peak_gib < MAX_PEAK_GIB


def test_bfl_mapping_equals_diffusers_converter_on_the_full_size_fill_file(comfy_flux_files):
    """On the published layout at full width, productbg's BFL -> diffusers mapping gives diffusers' own converter's
    tensors, value for value."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    state, _ = load_all(comfy_flux_files.paths["fill"])
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(state))
    ours = bfl_to_diffusers(state)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
