"""Paste-back: the product's core is bit-identical, feathering only goes outwards, no fill-colour halo."""
import numpy as np
import pytest
import torch

from productbg.imaging import composite as cp
from productbg.imaging import place as pl
from productbg.imaging.segment import feather_mask


def scene(seed: int = 0, size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random product pixels, a feathered box mask, a random generated image."""
    rng = np.random.default_rng(seed)
    product = rng.random((size, size, 3)).astype(np.float32)
    mask = np.zeros((size, size), np.float32)
    mask[16:48, 20:44] = 1
    return product, feather_mask(mask, 3.0), rng.random((size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("feather", [0.0, 2.0, 8.0])
def test_core_pixels_are_bit_identical(feather):
    """Every pixel with mask ≥ CORE_THRESHOLD equals the placed image exactly, for any feather."""
    product, mask, generated = scene()
    out = cp.composite_product(generated, product, mask, feather)
    core = mask >= cp.CORE_THRESHOLD
    assert core.sum() > 300
    assert np.array_equal(out[core].view(np.uint32), product[core].view(np.uint32))


def test_bit_identical_with_torch_and_float_noise_in_generated():
    """Tensors in, tensors out, core bits unchanged (torch.equal, not allclose)."""
    product, mask, generated = scene(1)
    out = cp.composite_product(torch.from_numpy(generated), torch.from_numpy(product), torch.from_numpy(mask))
    core = torch.from_numpy(mask >= cp.CORE_THRESHOLD)
    assert isinstance(out, torch.Tensor)
    assert torch.equal(out[core], torch.from_numpy(product)[core])


def test_outside_the_feather_reach_is_the_generated_image():
    """Far from the product (mask 0, beyond feather + 1 px) the output is the generated image."""
    product, mask, generated = scene(2)
    out = cp.composite_product(generated, product, mask, feather=2.0)
    reach = cp.outward_feather(mask >= cp.CORE_THRESHOLD, 2.0) > 0
    far = (mask == 0) & ~reach
    assert np.array_equal(out[far], generated[far])


def test_outward_feather_ramp():
    """1 on the core, 1 − d/(feather + 1) outside, never below 1 inside."""
    core = np.zeros((11, 11), bool)
    core[5, 5] = True
    ramp = cp.outward_feather(core, 3.0)
    assert ramp[5, 5] == 1 and ramp[5, 6] == pytest.approx(0.75) and ramp[5, 9] == 0
    assert np.array_equal(cp.outward_feather(core, 0), core.astype(np.float32))


def test_no_fill_colour_halo_from_the_canvas():
    """A blue product placed on a white canvas and pasted on black: the edge band holds no white."""
    alpha = np.zeros((80, 80), np.float32)
    alpha[20:60, 25:55] = 1
    alpha = feather_mask(alpha, 2.0)
    blue = np.broadcast_to(np.float32([0.1, 0.2, 0.9]), (80, 80, 3)).copy()
    p = pl.place_product(blue, alpha, (160, 160), fill_color=(1.0, 1.0, 1.0))
    black = np.zeros((160, 160, 3), np.float32)
    out = cp.composite_product(black, p.image, p.mask, feather=0)
    band = (p.mask > 0.01) & (p.mask < cp.CORE_THRESHOLD)
    expected = p.mask[band][:, None] * np.float32([0.1, 0.2, 0.9])      # α·F + (1 − α)·black
    np.testing.assert_allclose(out[band], expected, atol=2e-3)
    naive = p.image[band] * p.mask[band][:, None]                       # what a plain alpha blend gives
    assert np.abs(naive - expected).max() > 0.1


def test_generated_of_another_size_is_resized():
    """A VAE-cropped generated image (multiple of 8) is resized to the canvas; the core is still exact."""
    product, mask, _ = scene(3, size=70)
    generated = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)
    out = cp.composite_product(generated, product, mask)
    core = mask >= cp.CORE_THRESHOLD
    assert out.shape == (70, 70, 3) and np.array_equal(out[core], product[core])


def test_fill_product_continues_the_background_and_keeps_it():
    """Product removal (PG references, inference alike): background pixels kept, the hole takes their colours."""
    import torch

    from productbg.imaging.fill import fill_product, fill_product_hwc

    image = torch.zeros(3, 16, 16)
    image[0, :, :8] = 1.0          # left half red, right half black
    image[1, 4:12, 4:12] = 1.0     # a green product in the middle
    mask = torch.zeros(1, 16, 16)
    mask[:, 4:12, 4:12] = 1
    out = fill_product(image, mask)
    assert torch.equal(out[:, mask[0] == 0], image[:, mask[0] == 0])
    assert out[1, 4:12, 4:12].abs().max() < 1e-6             # no green left
    assert out[0, 8, 4] > out[0, 8, 11]                      # left of the hole redder than its right
    hwc = fill_product_hwc(image.permute(1, 2, 0)[None], mask)
    assert torch.allclose(hwc[0].permute(2, 0, 1), out)
