"""Personality-Wise trainer on tiny models: self-supervised pairs, what trains, the style-encoder output."""
import numpy as np
import pytest
import torch

from productbg.cli import main
from productbg.pipeline.tiny import tiny_unet
from productbg.training import bgsynth
from productbg.training.datasets import ImageMaskDataset, open_bg60k
from productbg.training.pg import (PairDataset, PGConfig, PGTask, random_resized_crop, remove_product,
                                   target_for)
from productbg.training.state import step_generator
from productbg.weights.style_encoder import load_style_encoder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pgdata")
    bgsynth.generate(root, bgsynth.SynthSpec(categories=2, per_category=2, held_out=1, size=32, seed=4,
                                             names=("香水", "耳机")))
    return root


def test_remove_product_fills_from_background_only():
    """Background pixels are untouched; product pixels take background colours, never the product's."""
    image = torch.full((3, 32, 32), -0.5)
    image[0, :, 16:] = 0.5                                   # two-tone background
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:24, 10:22] = 1
    image[:, mask[0] > 0] = 1.0                             # white product
    filled = remove_product(image, mask)
    assert torch.equal(filled[:, mask[0] == 0], image[:, mask[0] == 0])
    inside = filled[:, mask[0] > 0]
    assert inside.max() <= 0.5 + 1e-5 and inside.min() >= -0.5 - 1e-5
    assert filled[0, 16, 10] < filled[0, 16, 21]             # continues the left/right tones


def test_pairs_are_deterministic_cropped_and_colour_preserving(data):
    ds = PairDataset(ImageMaskDataset(open_bg60k(data), 32), (0.5, 1.0))
    a, b, c = ds[(0, 11)], ds[(0, 11)], ds[(0, 12)]
    assert torch.equal(a["reference"], b["reference"]) and not torch.equal(a["reference"], c["reference"])
    assert a["reference"].shape == a["image"].shape and not torch.equal(a["reference"], a["image"])
    background = a["image"][:, a["mask"][0] == 0].mean(1)
    assert (a["reference"].mean((1, 2)) - background).abs().max() < 0.2      # no colour jitter
    crop = random_resized_crop(torch.arange(64.0).view(1, 8, 8), np.random.default_rng(0), (0.5, 0.5))
    assert crop.shape == (1, 8, 8) and not torch.equal(crop, torch.arange(64.0).view(1, 8, 8))


def test_only_the_style_encoder_trains(data):
    task = PGTask(PGConfig(data=data, resolution=32, drop_reference=0.0))
    module = task.build(torch.device("cpu"))
    batch = torch.utils.data.default_collate([task.dataset()[(i, i)] for i in range(2)])
    out = module(batch, step_generator(0, 0, 0, 0))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    trained = {n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all(n.startswith("encoder.") for n in trained)
    assert any(".to_k_ip." in n for n in trained) and any("image_proj" in n for n in trained)
    assert not any(p.requires_grad for n, p in module.named_parameters() if not n.startswith("encoder."))


def test_cli_writes_a_loadable_style_encoder_and_can_start_from_one(data, tmp_path):
    first = tmp_path / "first"
    common = ["--data", str(data), "--model", "tiny-inpaint", "--resolution", "32", "--max-steps", "2",
              "--batch-size", "2", "--lr", "1e-2", "--no-progress"]
    assert main(["train-pg", "--output", str(first), "--sample-every", "2", *common]) == 0
    from PIL import Image
    assert Image.open(first / "samples" / "step-000002.png").size == (2 * 32, 3 * 32)  # ref / target / generated
    target = target_for(tiny_unet())
    enc = load_style_encoder(first / "style_encoder.safetensors", target)
    assert enc.config.variant == "linear" and enc.config.tokens == 4 and enc.training_info["steps"] == 2

    task = PGTask(PGConfig(data=data, resolution=32, init_from=first / "style_encoder.safetensors"))
    start = task.build(torch.device("cpu")).encoder
    assert all(torch.equal(a, b) for a, b in zip(start.state_dict().values(), enc.state_dict().values()))

    second = tmp_path / "second"
    assert main(["train-pg", "--output", str(second), "--init-from", str(first / "style_encoder.safetensors"),
                 *common]) == 0
    moved = load_style_encoder(second / "style_encoder.safetensors", target)
    assert not torch.equal(moved.to_k_ip[0].weight, enc.to_k_ip[0].weight)
