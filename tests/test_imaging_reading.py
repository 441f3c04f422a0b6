"""Input photos as a viewer shows them: EXIF orientation, ICC profiles to sRGB, 16-bit PNGs, CMYK JPEGs."""
import io

import cv2
import numpy as np
import pytest
from PIL import Image

from icc_profiles import ADOBE, P3, encode_in
from productbg import imaging
from productbg.imaging.reading import read_image_file

#: Pillow's transpose that *undoes* each EXIF orientation; the stored image is the upright one transposed back.
INVERSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_270}


def upright() -> np.ndarray:
    """An asymmetric 8-bit image (every pixel distinct), 12 × 20."""
    y, x = np.mgrid[0:12, 0:20]
    return np.stack([x * 12, y * 20, (x * 7 + y * 3) % 256], -1).astype(np.uint8)


def colours() -> np.ndarray:
    """Saturated and neutral sRGB colours a product might have (all inside sRGB), 32 × 32."""
    rng = np.random.default_rng(3)
    return rng.integers(10, 246, (32, 32, 3)).astype(np.uint8)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_applied(tmp_path, orientation):
    """All 8 EXIF orientations come back upright, bit for bit (PNG eXIf chunk), and are recorded."""
    image = Image.fromarray(upright())
    stored = image if orientation == 1 else image.transpose(INVERSE[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.png"
    stored.save(path, exif=exif)
    loaded = read_image_file(path)
    assert np.array_equal(np.round(loaded.rgb * 255).astype(np.uint8), upright())
    assert loaded.info["orientation"] == orientation


def test_orientation_of_a_phone_jpeg_and_a_16_bit_png(tmp_path):
    """Orientation 6 (phone held upright) on a JPEG, and on a 16-bit PNG read by the full-depth path."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(upright()).transpose(INVERSE[6]).save(tmp_path / "p.jpg", quality=100, exif=exif)
    rgb = read_image_file(tmp_path / "p.jpg").rgb
    assert rgb.shape == (12, 20, 3) and np.abs(rgb * 255 - upright()).mean() < 3
    stored = np.asarray(Image.fromarray(upright()).transpose(INVERSE[6])).astype(np.uint16) * 257 + 3
    cv2.imwrite(str(tmp_path / "w.png"), np.ascontiguousarray(stored[..., ::-1]))
    with_exif(tmp_path / "w.png", 6)
    loaded = read_image_file(tmp_path / "w.png")
    assert loaded.info["bits"] == 16 and loaded.info["orientation"] == 6
    assert np.abs(loaded.rgb * 65535 - (upright().astype(np.float64) * 257 + 3)).max() < 0.05


def with_exif(path, orientation: int) -> None:
    """Insert an eXIf chunk (EXIF orientation) after a PNG's IHDR (OpenCV writes 16-bit PNGs without one)."""
    import struct
    import zlib

    exif = Image.Exif()
    exif[0x0112] = orientation
    body = exif.tobytes()
    data = path.read_bytes()
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))
    path.write_bytes(data[:33] + chunk + data[33:])                  # 8 signature + 25 IHDR


def test_16_bit_png_is_read_at_full_depth(tmp_path):
    """A 16-bit RGB PNG keeps its low byte (Pillow alone would keep only the high one); grey + alpha too."""
    rng = np.random.default_rng(0)
    rgb16 = rng.integers(0, 65536, (9, 7, 3)).astype(np.uint16)
    alpha16 = rng.integers(0, 65536, (9, 7)).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "c.png"), np.dstack([rgb16[..., ::-1], alpha16]))
    loaded = read_image_file(tmp_path / "c.png")
    assert loaded.info["bits"] == 16 and loaded.alpha is not None
    assert np.abs(loaded.rgb - rgb16 / 65535.0).max() < 1e-6
    assert np.abs(loaded.alpha - alpha16 / 65535.0).max() < 1e-6
    grey16 = rng.integers(0, 65536, (5, 6)).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "g.png"), grey16)
    grey = imaging.load_image(tmp_path / "g.png")[0]
    assert np.abs(grey[..., 1] - grey16 / 65535.0).max() < 1e-6


def test_cmyk_jpeg_is_converted_and_flagged(tmp_path):
    """A CMYK JPEG without a profile reads as the right RGB (plain formula) with a warning in ``info``."""
    rgb = colours()
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "k.jpg", quality=98)
    loaded = read_image_file(tmp_path / "k.jpg")
    assert loaded.info["mode"] == "CMYK" and loaded.rgb.shape == (32, 32, 3)
    assert np.abs(loaded.rgb * 255 - rgb).mean() < 6
    assert any("CMYK" in w for w in loaded.info["warnings"])


@pytest.mark.parametrize("space", [P3, ADOBE])
def test_wide_gamut_profiles_are_converted_to_srgb(tmp_path, space):
    """A Display P3 / Adobe RGB file (made with ImageCms) reads back as its sRGB colours: ΔE2000 mean < 1;
    reading the same numbers as sRGB (ignoring the profile) is far off: the metric moves."""
    srgb = colours()
    encoded, icc = encode_in(srgb, space)
    encoded.save(tmp_path / "w.png", icc_profile=icc)
    loaded = read_image_file(tmp_path / "w.png")
    mask = np.ones(srgb.shape[:2], np.float32)
    good = imaging.color_drift(srgb / 255.0, loaded.rgb, mask)
    ignored = imaging.color_drift(srgb / 255.0, np.asarray(encoded, np.float32) / 255.0, mask)
    assert good["mean"] < 1.0 < 2.0 < ignored["mean"], (good, ignored)
    assert loaded.info["icc"] == {"profile": space, "converted": True, "to": "sRGB",
                                  "intent": "relative colorimetric + black-point compensation"}


def test_srgb_profile_is_not_converted_and_broken_profiles_are_noted(tmp_path):
    """An embedded sRGB profile leaves the pixels exactly as stored; a garbage profile is ignored, noted."""
    rgb = colours()
    Image.fromarray(rgb).save(tmp_path / "s.png", icc_profile=imaging.srgb_icc_bytes())
    loaded = read_image_file(tmp_path / "s.png")
    assert np.array_equal(np.round(loaded.rgb * 255).astype(np.uint8), rgb) and not loaded.info["icc"]["converted"]
    Image.fromarray(rgb).save(tmp_path / "b.png", icc_profile=b"not a profile at all")
    broken = read_image_file(tmp_path / "b.png")
    assert broken.info["icc"] is None and "unreadable ICC" in broken.info["warnings"][0]


def test_modes_without_an_srgb_reading_are_refused(tmp_path):
    Image.new("F", (8, 8), 0.5).save(tmp_path / "f.tif")
    with pytest.raises(imaging.ProductFolderError, match="colour mode F"):
        read_image_file(tmp_path / "f.tif")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    (tmp_path / "t.png").write_bytes(buf.getvalue()[:40])
    with pytest.raises(imaging.ProductFolderError, match="cannot read image"):
        read_image_file(tmp_path / "t.png")


def test_dataset_build_and_folder_node_read_upright_srgb(tmp_path):
    """The dataset build (user folder → BG60k layout) and Load Products From Folder use the same reader: a
    product stored sideways with EXIF orientation 6 and a P3 profile comes out upright in sRGB."""
    from productbg.nodes.imaging_nodes import LoadProductsFromFolder
    from productbg.training.datasets import build_from_folder, open_bg60k

    srgb = np.zeros((30, 50, 4), np.uint8)
    srgb[..., :3] = (200, 40, 30)
    srgb[5:25, 10:40, 3] = 255
    encoded, icc = encode_in(np.ascontiguousarray(srgb[..., :3]), P3)
    stored = Image.fromarray(np.dstack([np.asarray(encoded), srgb[..., 3]])).transpose(INVERSE[6])
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "src" / "cups").mkdir(parents=True)
    stored.save(tmp_path / "src" / "cups" / "p.png", exif=exif, icc_profile=icc)
    report = build_from_folder(tmp_path / "src", tmp_path / "out", segmenter=None)
    assert report.written == 1
    with Image.open(open_bg60k(tmp_path / "out").records[0].image) as im:
        built = np.asarray(im.convert("RGB"))
    assert built.shape == (30, 50, 3) and np.abs(built[15, 25].astype(int) - (200, 40, 30)).max() <= 2
    image, mask, category, _, count = LoadProductsFromFolder.execute(str(tmp_path / "src"), 0, "")
    assert tuple(image.shape) == (1, 30, 50, 3) and category == "cups" and count == 1
    assert np.abs(image[0, 15, 25].numpy() * 255 - (200, 40, 30)).max() <= 2
