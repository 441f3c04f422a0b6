"""Product masks → per-layer token grids (pure torch)."""
import pytest
import torch

from productbg.attention import background_weights, infer_grid, product_coverage, rows_for_batch


@pytest.mark.parametrize("image_hw, grids", [
    ((512, 512), [(64, 64), (32, 32), (16, 16), (8, 8)]),
    ((512, 768), [(64, 96), (32, 48), (16, 24), (8, 12)]),
    ((832, 1216), [(104, 152), (52, 76), (26, 38), (13, 19)]),
    ((1000, 1000), [(125, 125), (63, 63), (32, 32), (16, 16)]),
])
def test_infer_grid_follows_unet_downsampling(image_hw, grids):
    """Every UNet level's grid is found from the latent shape and the sequence length, odd sizes included."""
    latent = (image_hw[0] // 8, image_hw[1] // 8)
    for h, w in grids:
        assert infer_grid(h * w, latent_hw=latent) == (h, w)


def test_infer_grid_prefers_exact_shape_and_explains_failure():
    """The exact grid wins when it matches; an impossible length raises a message naming the latent."""
    assert infer_grid(12, latent_hw=(64, 64), exact_hw=(3, 4)) == (3, 4)
    assert infer_grid(16, exact_hw=(3, 4)) == (4, 4)  # mismatching exact shape falls back to square
    with pytest.raises(ValueError, match="64x64"):
        infer_grid(1000, latent_hw=(64, 64))


def test_coverage_is_area_average_for_batches_of_different_masks():
    """Each cell gets the product fraction of its area; each product keeps its own mask."""
    masks = torch.zeros(2, 8, 8)
    masks[0, :4, :4] = 1            # top-left quadrant
    masks[1, 4:, 4:] = 1            # bottom-right quadrant
    cov = product_coverage(masks, (2, 2))
    assert torch.equal(cov, torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0]]))
    cov4 = product_coverage(masks[:1], (4, 4)).view(4, 4)
    assert cov4[:2, :2].eq(1).all() and cov4[2:].eq(0).all()


def test_low_resolution_threshold_rule():
    """At 2×2, a cell ≥50% product is excluded (weight 0); a 25% cell keeps weight 0.75 (soft) or 1 (hard)."""
    mask = torch.zeros(1, 128, 128)
    mask[:, :40, :64] = 1      # top-left cell: 40/64 = 62.5% product
    mask[:, :16, 64:] = 1      # top-right cell: 25% product
    cov = product_coverage(mask, (2, 2))
    soft = background_weights(cov)
    hard = background_weights(cov, soft=False)
    assert soft[0, 0] == 0 and hard[0, 0] == 0
    assert soft[0, 1] == pytest.approx(0.75) and hard[0, 1] == 1
    assert soft[0, 2:].eq(1).all()


def test_threshold_is_validated():
    with pytest.raises(ValueError, match="threshold"):
        background_weights(torch.zeros(1, 4), threshold=0.0)


def test_rows_for_batch_layout():
    """Rows are chunk-major; item b of every chunk uses product b % Bm; a single mask serves all rows."""
    per_item = torch.tensor([[10.0], [20.0]])
    assert rows_for_batch(per_item, 4, chunks=2).flatten().tolist() == [10, 20, 10, 20]
    assert rows_for_batch(per_item[:1], 6, chunks=2).flatten().tolist() == [10] * 6
    with pytest.raises(ValueError, match="chunks"):
        rows_for_batch(per_item, 5, chunks=2)


def test_mask_shapes_are_validated():
    with pytest.raises(ValueError, match="one channel"):
        product_coverage(torch.zeros(1, 3, 8, 8), (2, 2))
    assert product_coverage(torch.ones(8, 8), (2, 2)).shape == (1, 4)
