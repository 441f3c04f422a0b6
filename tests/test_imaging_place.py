"""Placement on a canvas: presets, fill ratio, anchors and margins, inpaint mask, clean premultiplied resize."""
import numpy as np
import pytest
import torch

from productbg.imaging import place as pl
from productbg.imaging.synthetic import box_coverage


def product(h: int = 60, w: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """A red box (straight colours) on black: any black in the placed edge would be background bleeding in."""
    alpha = box_coverage(100, 100, (20.25, 20.25 + h, 30.75, 30.75 + w))
    image = np.where(alpha[..., None] > 0, np.float32([1.0, 0.0, 0.0]), np.float32([0.0, 0.0, 0.0]))
    return image.astype(np.float32), alpha


def test_unknown_colour_errors():
    assert pl.parse_hex_color("#fff") == (1.0, 1.0, 1.0)
    assert pl.parse_hex_color("102030") == pytest.approx((16 / 255, 32 / 255, 48 / 255))
    with pytest.raises(ValueError, match="#RRGGBB"):
        pl.parse_hex_color("white")


def test_default_fill_ratio_centres_the_box_at_074():
    """At the defaults the bounding box's longer side spans 0.74 of a square canvas, centred."""
    image, alpha = product(60, 40)
    p = pl.place_product(image, alpha, (512, 512))
    x, y, w, h = p.box
    assert abs(h - 0.74 * 512) <= 1.5 and abs(w - 0.74 * 512 * 40 / 60) <= 1.5     # resampled soft edge
    assert abs((x + w / 2) - 256) <= 1 and abs((y + h / 2) - 256) <= 1


def test_fit_inside_on_a_wide_canvas_and_bottom_anchor_margin():
    """On 16:9 a tall product is limited by the height; anchored at the bottom it keeps the margin."""
    image, alpha = product(60, 40)
    p = pl.place_product(image, alpha, (768, 432), fill_ratio=0.74, anchor="bottom", margin=0.05)
    x, y, w, h = p.box
    assert abs(h - 0.74 * 432) <= 1.5
    assert abs(432 - (y + h) - 0.05 * 432) <= 2
    assert abs((x + w / 2) - 384) <= 1


def test_margin_limits_the_scale():
    """fill_ratio 1 with a margin still leaves the margin free."""
    image, alpha = product(60, 60)
    p = pl.place_product(image, alpha, (200, 200), fill_ratio=1.0, margin=0.1)
    x, y, w, h = p.box
    assert abs(w - 160) <= 1 and abs(x - 20) <= 1


def test_premultiplied_resize_has_no_background_bleed():
    """Resized edges keep the product's colour (red), never the black that surrounded it."""
    image, alpha = product(60, 40)
    for size in ((64, 64), (512, 512)):         # shrinking and enlarging
        p = pl.place_product(image, alpha, size, fill_color=(0.0, 1.0, 0.0))
        a = p.mask[..., None]
        colour = (p.image - (1 - a) * np.float32([0, 1, 0])) / np.maximum(a, 1e-6)
        edge = (p.mask > 0.05) & (p.mask < 1)
        assert edge.any()
        np.testing.assert_allclose(colour[edge], np.broadcast_to([1.0, 0, 0], colour[edge].shape), atol=2e-3)
        assert np.array_equal(p.image[p.mask == 0], np.broadcast_to([0, 1, 0], p.image[p.mask == 0].shape))


def test_inpaint_mask_is_the_inverted_mask_grown_20px_at_512():
    """The repaint region covers the background and reaches 20 px into the product (scaled with size)."""
    image, alpha = product(60, 60)
    p = pl.place_product(image, alpha, (512, 512))
    x, y, w, h = p.box
    product_cols = np.nonzero(p.mask[y + h // 2] >= 0.5)[0]
    kept_cols = np.nonzero(p.inpaint_mask[y + h // 2] < 0.5)[0]
    assert kept_cols.min() == product_cols.min() + 20 and kept_cols.max() == product_cols.max() - 20
    assert p.inpaint_mask[0, 0] == 1
    assert pl.inpaint_grow_pixels(512, 512) == 20 and pl.inpaint_grow_pixels(1024, 768) == 40
    assert pl.inpaint_grow_pixels(256, 256) == 10


def test_torch_inputs_and_empty_mask():
    """Tensors in, tensors out; an empty mask is a clear error."""
    image, alpha = product()
    p = pl.place_product(torch.from_numpy(image), torch.from_numpy(alpha), (128, 96))
    assert isinstance(p.image, torch.Tensor) and p.image.shape == (96, 128, 3) and p.mask.shape == (96, 128)
    with pytest.raises(ValueError, match="empty"):
        pl.place_product(image, np.zeros_like(alpha))
    with pytest.raises(ValueError, match="anchor"):
        pl.place_product(image, alpha, anchor="middle")
