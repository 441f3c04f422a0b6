"""Segmentation without weights: shadows stay background, alpha wins, GrabCut fallback, refinement, halos."""
import numpy as np
import pytest
import torch

from productbg.imaging import segment as seg
from productbg.imaging.synthetic import box_coverage, packshot


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) >= 0.5, np.asarray(b) >= 0.5
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("product, backdrop", [
    ((0.9, 0.15, 0.1), (1.0, 1.0, 1.0)),      # red on white
    ((0.05, 0.05, 0.05), (1.0, 1.0, 1.0)),    # black on white: darker than any shadow
    ((0.45, 0.45, 0.45), (1.0, 1.0, 1.0)),    # grey on white: shadow-coloured, but has edges
    ((0.9, 0.2, 0.1), (0.75, 0.85, 1.0)),     # on a light blue backdrop with a blue shadow
])
def test_white_packshot_soft_shadow_is_background(product, backdrop):
    """The soft shadow under the product is not product; the product is found to within its corners."""
    shot = packshot(128, product, backdrop, shadow_depth=0.45)
    result = seg.segment_product(shot.image, feather=0)
    assert result.method == "background"
    mask = result.mask >= 0.5
    assert mask[shot.shadow > 0.1].mean() == 0.0
    assert iou(result.mask, shot.alpha) > 0.99


def test_shadow_strength_zero_counts_the_shadow_as_product():
    """With shadow removal off, the dark part of the shadow becomes product (the control for the test above)."""
    shot = packshot(128, shadow_depth=0.6)
    mask = seg.segment_product(shot.image, "background", shadow_strength=0.0, feather=0).mask >= 0.5
    assert mask[shot.shadow > 0.8].mean() > 0.9


def test_noisy_packshot_still_segments():
    """Sensor-like noise (σ = 0.02) leaves no specks in the backdrop or the shadow."""
    shot = packshot(128, noise=0.02, seed=3)
    result = seg.segment_product(shot.image)
    assert iou(result.mask, shot.alpha) > 0.98
    assert (result.mask[shot.alpha == 0] >= 0.5).mean() < 0.005


def test_torch_in_torch_out_and_numpy_in_numpy_out():
    """The same function serves tensors and arrays, returning the kind it was given."""
    shot = packshot(64)
    out_t = seg.segment_product(torch.from_numpy(shot.image))
    out_n = seg.segment_product(shot.image)
    assert isinstance(out_t.mask, torch.Tensor) and out_t.mask.shape == (64, 64)
    assert isinstance(out_n.mask, np.ndarray) and out_n.image.shape == (64, 64, 3)
    np.testing.assert_allclose(out_t.mask.numpy(), out_n.mask)


def test_estimate_background_colour_and_uniformity():
    """The border median is the backdrop colour; a textured border is not uniform."""
    est = seg.estimate_background(packshot(64, background_rgb=(0.8, 0.9, 1.0)).image)
    np.testing.assert_allclose(est.rgb, (0.8, 0.9, 1.0), atol=2e-3)
    assert est.is_uniform
    rng = np.random.default_rng(0)
    assert not seg.estimate_background(rng.random((64, 64, 3)).astype(np.float32)).is_uniform


def test_shadow_distance_is_zero_along_the_shadow_ray():
    """Darker copies of the background colour (linear light × k) are at distance ≈ 0; other hues are not."""
    from productbg.imaging.color import srgb_to_lab

    bg = np.array([0.75, 0.85, 1.0])
    bg_lab = srgb_to_lab(bg)
    shadows = srgb_to_lab((bg ** 2.2 * np.array([[0.9], [0.6], [0.3]])) ** (1 / 2.2))
    assert seg.shadow_distance(shadows, bg_lab, 0.75).max() < 1.0
    assert seg.shadow_distance(srgb_to_lab(np.array([0.9, 0.2, 0.1])), bg_lab, 0.75) > 30
    # shadow_strength 0: the plain ΔE76 distance to the background
    assert seg.shadow_distance(shadows[1:2], bg_lab, 0.0)[0] == pytest.approx(np.linalg.norm(shadows[1] - bg_lab), rel=1e-4)


def test_rgba_product_uses_its_alpha():
    """An RGBA cut-out is segmented by its alpha, colours untouched (no edge clean-up on cut-outs)."""
    alpha = box_coverage(64, 64, (10.5, 50.2, 12.3, 40.7))
    rgba = np.concatenate([np.full((64, 64, 3), 0.3, np.float32), alpha[..., None]], -1)
    result = seg.segment_product(rgba, feather=0)
    assert result.method == "alpha"
    assert iou(result.mask, alpha) == 1.0
    assert np.array_equal(result.image, rgba[..., :3])


def test_loadimage_transparency_mask_is_inverted_alpha():
    """ComfyUI LoadImage's MASK (1 = transparent) gives the alpha; an all-zero one (no alpha) is ignored."""
    shot = packshot(64)
    transparency = 1.0 - shot.alpha
    assert seg.segment_product(shot.image, transparency=transparency).method == "alpha"
    assert seg.segment_product(shot.image, transparency=np.zeros((64, 64), np.float32)).method == "background"
    with pytest.raises(ValueError, match="no usable transparency"):
        seg.segment_product(shot.image, "alpha")


def test_external_mask_is_refined():
    """An external mask is used as given (then refined): method 'mask'."""
    shot = packshot(64)
    external = np.zeros((64, 64), np.float32)
    external[10:30, 10:30] = 1
    result = seg.segment_product(shot.image, mask=external, feather=0)
    assert result.method == "mask" and iou(result.mask, external) == 1.0


def test_grabcut_fallback_on_a_textured_background():
    """A non-uniform border selects GrabCut, which still finds a distinct product."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:96, 0:96] / 96.0
    backdrop = np.stack([0.3 + 0.5 * xx, 0.6 - 0.3 * yy, 0.4 + 0.2 * np.sin(xx * 20)], -1)
    backdrop += rng.normal(0, 0.03, backdrop.shape)
    alpha = box_coverage(96, 96, (26, 71, 30, 68))
    image = np.clip(alpha[..., None] * np.float32([0.95, 0.9, 0.1]) + (1 - alpha[..., None]) * backdrop, 0, 1)
    result = seg.segment_product(image.astype(np.float32))
    assert result.method == "grabcut"
    assert iou(result.mask, alpha) > 0.95


def test_background_plus_grabcut_keeps_a_keyed_product():
    """GrabCut refinement of a clean key does not lose the product."""
    shot = packshot(96)
    result = seg.segment_product(shot.image, "background+grabcut", feather=0)
    assert iou(result.mask, shot.alpha) > 0.97


def test_grow_and_shrink_are_euclidean():
    """Growing a single pixel by r gives a disc of area ≈ πr²; shrinking undoes it."""
    m = np.zeros((41, 41), np.float32)
    m[20, 20] = 1
    grown = seg.grow_mask(m, 10)
    assert abs(grown.sum() - np.pi * 100) < 0.05 * np.pi * 100
    square = np.zeros((40, 40), np.float32)
    square[10:30, 10:30] = 1
    assert seg.grow_mask(square, -3).sum() == 14 * 14
    assert seg.grow_mask(square, 0).sum() == 400


def test_fill_holes_and_keep_largest():
    """A ring's hole is filled; the border-touching background is not; small specks are dropped."""
    m = np.zeros((30, 30), np.float32)
    m[5:20, 5:20] = 1
    m[9:15, 9:15] = 0                                   # hole
    m[25:27, 25:27] = 1                                 # speck
    filled = seg.fill_holes(m)
    assert filled[9:15, 9:15].all() and filled[0].sum() == 0
    largest = seg.keep_largest_component(filled)
    assert largest[25:27, 25:27].sum() == 0 and largest[5:20, 5:20].all()


def test_refine_feather_keeps_values_in_range_and_soft_edge():
    """Feathering makes a soft edge, 1 deep inside, 0 far outside."""
    m = np.zeros((40, 40), np.float32)
    m[10:30, 10:30] = 1
    soft = seg.refine_mask(m, feather=4)
    assert soft.min() >= 0 and soft.max() <= 1
    assert soft[20, 20] == pytest.approx(1.0) and soft[0, 0] == pytest.approx(0.0)
    assert 0.3 < soft[20, 10] < 0.7


def test_decontaminate_inverts_the_compositing_equation():
    """I = αF + (1 − α)B is solved exactly for F where α ≥ min_alpha."""
    rng = np.random.default_rng(0)
    fg = rng.random((8, 8, 3)).astype(np.float32)
    bg = np.float32([1.0, 1.0, 1.0])
    alpha = rng.uniform(0.1, 1.0, (8, 8)).astype(np.float32)
    observed = alpha[..., None] * fg + (1 - alpha[..., None]) * bg
    np.testing.assert_allclose(seg.decontaminate_foreground(observed, alpha, bg), fg, atol=1e-5)


def test_clean_edges_removes_the_white_halo():
    """After clean-up, the soft edge of a blue product on white is blue, not a pale blue-white mix."""
    shot = packshot(128, (0.1, 0.3, 0.9), shadow_depth=0.0, box=(30.5, 90.3, 40.4, 88.6))
    result = seg.segment_product(shot.image, feather=2)
    edge = (result.mask > 0) & (result.mask < 1)
    blue = np.float32(shot.product_rgb)
    before = np.abs(shot.image[edge] - blue).max(axis=1).mean()
    after = np.abs(result.image[edge] - blue).max(axis=1).mean()
    assert before > 0.3 and after < 0.01
    core = result.mask >= 1
    assert np.array_equal(result.image[core], shot.image[core])


def test_bad_method_and_shapes_raise():
    """Errors say what is wrong."""
    with pytest.raises(ValueError, match="unknown segmentation method"):
        seg.segment_product(np.zeros((8, 8, 3), np.float32), "magic")
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        seg.segment_product(np.zeros((8, 8), np.float32))
