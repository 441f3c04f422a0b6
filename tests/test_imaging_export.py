"""Marketplace export: one placement for both resolutions, native-resolution product core, presets, encoding."""
import io

import numpy as np
import pytest
from PIL import Image

from productbg import imaging
from productbg.imaging import export as ex
from productbg.imaging.layout import Layout, render_layout
from productbg.imaging.synthetic import box_coverage


def photo(w: int, h: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A textured 8-bit product (every pixel different) with a soft-edged ellipse-ish box mask."""
    rng = np.random.default_rng(seed)
    rgb = (rng.integers(0, 256, (h, w, 3)) / 255.0).astype(np.float32)
    mask = box_coverage(h, w, (0.12 * h + 0.3, 0.9 * h - 0.2, 0.2 * w + 0.7, 0.83 * w + 0.4))
    return rgb, mask.astype(np.float32)


def centroid(mask: np.ndarray) -> np.ndarray:
    """The mask's centroid in canvas fractions (pixel centres at (i + 0.5) / N)."""
    ys, xs = np.indices(mask.shape)
    total = mask.sum()
    return np.array([((xs + 0.5) * mask).sum() / total / mask.shape[1],
                     ((ys + 0.5) * mask).sum() / total / mask.shape[0]])


@pytest.mark.parametrize("export", [(2000, 2000), (1080, 1350)])
def test_core_is_bit_exact_at_export_size_for_an_odd_source(export):
    """A 3001×1999 source (here 1201×799: the same odd-size property) → export: inside the core the delivered
    image equals the source rendered once at the export size, whatever the generation size was."""
    rgb, mask = photo(1201, 799)
    placed = imaging.place_product(rgb, mask, export)                     # the CLI: placed in the export frame
    gen = imaging.generation_size(export, 512)
    background = np.random.default_rng(1).random((gen[1], gen[0], 3)).astype(np.float32)
    out = imaging.assemble_export(background, rgb, mask, placed.layout, export)
    core = out.mask >= imaging.CORE_THRESHOLD
    assert out.image.shape == (export[1], export[0], 3) and core.sum() > 10_000
    assert np.array_equal(out.image[core], out.placed[core])
    assert np.array_equal(out.placed, placed.image)                      # same layout, same rendering
    decoded = np.asarray(Image.open(io.BytesIO(out.data)).convert("RGB"))   # the delivered PNG, 8 bits
    assert np.array_equal(decoded[core], ex.to_uint8(out.placed[core]))


def test_scale_one_export_copies_the_source_pixels():
    """When the export scale is 1 the core of the delivered file holds the source photo's own bytes."""
    rgb, mask = photo(301, 221)
    box = max(int((mask >= 0.5).any(axis=0).sum()), int((mask >= 0.5).any(axis=1).sum()))
    size = round(box / 0.74)                                              # the longer side at scale exactly 1
    p = imaging.place_product(rgb, mask, (size, size), fill_ratio=box / size, margin=0.0)
    assert p.layout.scale == (1.0, 1.0) and p.layout.pixel_aligned()
    out = imaging.assemble_export(np.zeros((64, 64, 3), np.float32), rgb, mask, p.layout)
    core = mask >= imaging.CORE_THRESHOLD
    x, y = (round(v) for v in p.layout.offset)
    delivered = np.asarray(Image.open(io.BytesIO(out.data)).convert("RGB"))
    source = (rgb * 255 + 0.5).astype(np.uint8)
    ys, xs = np.nonzero(core)
    assert np.array_equal(delivered[ys + y, xs + x], source[ys, xs])


def test_one_layout_has_no_half_pixel_drift_between_resolutions():
    """The product's centroid sits at the same canvas fraction on the 512² generation canvas and the 2000²
    export (< 0.05 generation px); placing separately at each size (rounding each offset) drifts."""
    rgb, mask = photo(1201, 799)
    export = imaging.place_product(rgb, mask, (2000, 2000))
    _, gen_alpha = render_layout(rgb, mask, export.layout.at((512, 512)))
    drift = np.abs(centroid(gen_alpha) - centroid(export.mask)) * 512
    assert drift.max() < 0.05, drift
    separate = imaging.place_product(rgb, mask, (512, 512)).mask        # its own rounding at 512
    naive = np.abs(centroid(np.asarray(separate)) - centroid(export.mask)) * 512
    assert naive.max() > 0.1 > drift.max(), (naive, drift)             # the metric moves


def test_comfy_flow_placed_small_exported_big():
    """Place Product's small-canvas layout, re-expressed at the export size, lines up with the small canvas."""
    rgb, mask = photo(900, 1300)
    small = imaging.place_product(rgb, mask, (464, 576))                 # the 4:5 canvas at 512²
    big = small.layout.at((1080, 1350), keep_aspect=True)
    sx, sy = big.scale
    assert sx == pytest.approx(sy, rel=1e-9)                            # never stretched at export
    _, alpha = render_layout(rgb, mask, big)
    assert np.abs(centroid(alpha) - centroid(np.asarray(small.mask))).max() * 512 < 0.05
    with pytest.raises(ValueError, match="aspect"):
        small.layout.at((2000, 2000), keep_aspect=True)


def test_background_is_resized_with_lanczos_or_an_upscaler():
    """The background reaches the exact export size; an upscaler runs first, then the exact resize."""
    bg = np.random.default_rng(0).random((64, 48, 3)).astype(np.float32)
    calls = []

    def upscale(x):
        calls.append(x.shape)
        return np.repeat(np.repeat(x, 4, axis=0), 4, axis=1)

    assert ex.resize_background(bg, (300, 400)).shape == (400, 300, 3)
    out = ex.resize_background(bg, (190, 256), upscaler=upscale)
    assert calls == [(64, 48, 3)] and out.shape == (256, 190, 3) and 0 <= out.min() and out.max() <= 1
    with pytest.raises(ValueError, match="lanczos"):
        ex.resize_background(bg, (10, 10), method="magic")


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_every_format_embeds_the_srgb_profile(fmt):
    data = imaging.encode_image(np.full((16, 24, 3), 0.5, np.float32), fmt, 90)
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == ex.FORMATS[fmt] and im.size == (24, 16)
        assert im.info.get("icc_profile") == imaging.srgb_icc_bytes()


def test_report_is_measured_on_the_delivered_file():
    """The report reads the encoded file: a low JPEG quality shows up as colour drift, PNG does not."""
    rgb, mask = photo(240, 200)
    p = imaging.place_product(rgb, mask, (256, 256))
    bg = np.zeros((64, 64, 3), np.float32)
    png = imaging.assemble_export(bg, rgb, mask, p.layout, fmt="png")
    jpeg = imaging.assemble_export(bg, rgb, mask, p.layout, fmt="jpeg", quality=20)
    lossless = imaging.assemble_export(bg, rgb, mask, p.layout, fmt="webp", quality=100)
    png_de, jpeg_de = png.report["metrics"]["delta_e2000"]["mean"], jpeg.report["metrics"]["delta_e2000"]["mean"]
    assert png.report["metrics"]["delta_e2000"]["p95"] == 0.0           # the core is exact; only the seam differs
    assert png_de < 1.0 < 10 < jpeg_de and png.report["pass"] and jpeg.report["pass"] is False
    assert lossless.report["metrics"] == png.report["metrics"]
    assert jpeg.report["metrics"]["psnr_db"] < png.report["metrics"]["psnr_db"]
    assert png.describe()["quality"] is None and jpeg.describe()["quality"] == 20


def test_presets_and_free_sizes():
    assert imaging.parse_export_size("amazon-zoom") == (2000, 2000)
    assert imaging.parse_export_size("Instagram-Portrait") == (1080, 1350)
    assert imaging.parse_export_size("story") == (1080, 1920)
    assert imaging.parse_export_size("1600x1200") == (1600, 1200)
    assert imaging.generation_size((1080, 1920), 512) == (288, 512)
    for bad in ("huge", "10x10", "0x500", "1600"):
        with pytest.raises(ValueError, match="export size"):
            imaging.parse_export_size(bad)
    with pytest.raises(ValueError, match="format"):
        ex.check_format("gif", 90)
    with pytest.raises(ValueError, match="quality"):
        ex.check_format("jpeg", 0)


def test_layout_refuses_a_mismatched_source():
    rgb, mask = photo(100, 80)
    layout = imaging.place_product(rgb, mask, (64, 64)).layout
    with pytest.raises(ValueError, match="placement was made"):
        render_layout(rgb[:50], mask[:50], layout)
    assert isinstance(layout, Layout) and layout.to_json()["frame"] == [64, 64]
