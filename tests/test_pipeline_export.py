"""The pipeline delivers export-size images: native product pixels, faithful colours, upscaler, batch resume."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from icc_profiles import P3, encode_in
from productbg import imaging
from productbg.imaging.layout import render_layout
from productbg.pipeline.batch import run_batch
from productbg.pipeline.errors import PipelineError
from productbg.pipeline.manifest import Shard, read_manifest
from productbg.pipeline.outputs import read_result, write_item
from productbg.pipeline.pipeline import GenerateSettings, ProductBGPipeline

SMALL = GenerateSettings(size=64, steps=2)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe():
    return ProductBGPipeline.tiny(style=False, settings=SMALL, device="cpu")


def product_rgba(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A textured, saturated uint8 product (inside sRGB) with a hard alpha box and a soft 1-px rim."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(20, 236, (h, w, 3)).astype(np.uint8)
    alpha = np.zeros((h, w), np.uint8)
    alpha[h // 8:h - h // 8, w // 6:w - w // 6] = 255
    alpha[h // 8 - 1, w // 6:w - w // 6] = 128
    return np.dstack([rgb, alpha])


def native_mask(rgba: np.ndarray) -> np.ndarray:
    """The pipeline's own product mask of an RGBA product (its alpha, refined by Segment Product)."""
    return np.asarray(imaging.segment_product(rgba.astype(np.float32) / 255, "auto").mask, np.float32)


def test_export_core_is_the_native_product_bit_for_bit(pipe, tmp_path):
    """An odd-sized product → a 1080×1350 export generated on a 64-px-long canvas: inside the core the written
    file equals the source product rendered once at the export size (from the one layout)."""
    rgba = product_rgba(241, 163)
    Image.fromarray(rgba).save(tmp_path / "p.png")
    r = pipe.generate(str(tmp_path / "p.png"), category="shoes", export=(1080, 1350))[0]
    assert r.image.shape[:2] == (64, 48)                                     # the small 4:5-ish canvas
    e = r.export
    assert e.image.shape == (1350, 1080, 3) and e.layout.frame == (1080, 1350)
    src = rgba[..., :3].astype(np.float32) / 255
    colour, alpha = render_layout(src, native_mask(rgba), e.layout)
    core = alpha >= imaging.CORE_THRESHOLD
    delivered = np.asarray(Image.open(io.BytesIO(e.data)).convert("RGB"))
    assert core.sum() > 0.3 * 1080 * 1350 * 0.74 ** 2
    placed = alpha[..., None] * colour + (1 - alpha[..., None]) * 1.0        # over the white fill
    assert np.array_equal(delivered[core], imaging.export.to_uint8(placed[core]))
    assert r.report["metrics"]["size"] == [1080, 1350] and r.canvas_report is not None
    assert r.report["metrics"]["delta_e2000"]["p95"] == 0.0


def test_display_p3_product_keeps_its_colours(pipe, tmp_path):
    """A product photographed in Display P3 comes back in sRGB with ΔE2000 mean < 1 inside the product against
    its true colours; read without its profile, the same file is far off (the measurement moves)."""
    rgba = product_rgba(120, 100, seed=4)
    encoded, icc = encode_in(np.ascontiguousarray(rgba[..., :3]), P3)
    p3 = np.dstack([np.asarray(encoded), rgba[..., 3]])
    Image.fromarray(p3).save(tmp_path / "p3.png", icc_profile=icc)
    Image.fromarray(p3).save(tmp_path / "p3_untagged.png")
    truth = rgba[..., :3].astype(np.float32) / 255
    drift = {}
    for name in ("p3", "p3_untagged"):
        r = pipe.generate(str(tmp_path / f"{name}.png"), export=(256, 256), export_format="png")[0]
        colour, alpha = render_layout(truth, native_mask(rgba), r.export.layout)
        delivered = imaging.decode_image(r.export.data)
        drift[name] = imaging.color_drift(colour, delivered, (alpha >= imaging.CORE_THRESHOLD).astype(np.float32))
        if name == "p3":
            assert r.input["icc"]["profile"] == P3 and r.input["icc"]["converted"]
    assert drift["p3"]["mean"] < 1.0 < 2.0 < drift["p3_untagged"]["mean"], drift


def tiny_upscaler(path, scale: int = 2):
    """A 2× Real-ESRGAN-Compact-architecture file (random weights, 2.3k parameters) saved as safetensors."""
    spandrel = pytest.importorskip("spandrel")
    from safetensors.torch import save_file
    from spandrel.architectures.Compact import Compact

    model = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=scale)
    save_file({f"module.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(path))
    assert spandrel.ModelLoader is not None
    return path


def test_upscaler_file_runs_before_the_resize(pipe, tmp_path):
    """--upscaler FILE (safetensors, ComfyUI's loader path) changes the background; pickles are refused."""
    path = tiny_upscaler(tmp_path / "2x_compact.safetensors")
    product = tmp_path / "p.png"
    Image.fromarray(product_rgba(80, 60)).save(product)
    plain = pipe.generate(str(product), export=(200, 200))[0].export
    up = pipe.generate(str(product), export=(200, 200), upscaler=str(path))[0].export
    assert not np.array_equal(plain.image, up.image)
    core = up.mask >= imaging.CORE_THRESHOLD
    assert np.array_equal(plain.image[core], up.image[core])                 # the product is never upscaled
    assert pipe.upscaler(str(path)).describe() == {"file": path.name, "architecture": "RealESRGAN Compact",
                                                   "scale": 2}
    (tmp_path / "x.pth").write_bytes(b"pickle")
    with pytest.raises(PipelineError, match="only .safetensors"):
        pipe.generate(str(product), export=(200, 200), upscaler=str(tmp_path / "x.pth"))


def test_missing_spandrel_names_the_extra(monkeypatch, tmp_path):
    import builtins

    from productbg.pipeline import upscale

    real = builtins.__import__

    def no_spandrel(name, *args, **kwargs):
        if name == "spandrel":
            raise ImportError("No module named 'spandrel'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_spandrel)
    (tmp_path / "u.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(PipelineError, match=r"productbg\[upscale\]"):
        upscale.load_upscaler(tmp_path / "u.safetensors")


def test_settings_refuse_bad_export_options():
    for bad in (dict(export=(10, 10)), dict(export_format="gif"), dict(quality=0), dict(resampler="magic")):
        with pytest.raises(PipelineError):
            GenerateSettings(**bad)
    assert GenerateSettings(size=512, export=(1080, 1920)).canvas() == (288, 512)


def test_batch_with_export_writes_jpegs_records_colour_and_resumes(pipe, tmp_path):
    """A batch with an export writes image_0.jpg at the export size with result.json recording the export and
    the input's ICC conversion; a rerun skips every item; shards split the rows."""
    rows = []
    for i in range(3):
        encoded, icc = encode_in(np.ascontiguousarray(product_rgba(90, 70, seed=i)[..., :3]), P3)
        Image.fromarray(np.dstack([np.asarray(encoded), product_rgba(90, 70, seed=i)[..., 3]])).save(
            tmp_path / f"p{i}.png", icc_profile=icc)
        rows.append(f"p{i}.png,shoes,{i}")
    (tmp_path / "m.csv").write_text("product,category,seed\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    exporting = ProductBGPipeline(pipe.components, replace_settings(export=(300, 240), export_format="jpeg",
                                                                    quality=90), device="cpu")
    manifest = read_manifest(tmp_path / "m.csv", out, 0, 1)
    first = run_batch(manifest, out, lambda: exporting, Shard(0, 2), progress=False)
    second = run_batch(manifest, out, lambda: exporting, Shard(1, 2), progress=False)
    assert (first.done, second.done) == (2, 1)
    for item in sorted(p for p in out.iterdir() if p.is_dir()):
        data = read_result(item)
        assert data["images"] == ["image_0.jpg"] and data["export"]["size"] == [300, 240]
        assert data["export"]["format"] == "jpeg" and data["export"]["quality"] == 90
        assert data["input"]["icc"]["profile"] == P3 and data["reports"][0]["metrics"]["size"] == [300, 240]
        with Image.open(item / "image_0.jpg") as im:
            assert im.size == (300, 240) and im.info["icc_profile"] == imaging.srgb_icc_bytes()
    again = run_batch(manifest, out, lambda: exporting, Shard(0, 1), progress=False)
    assert (again.done, again.skipped) == (0, 3)


def replace_settings(**kw) -> GenerateSettings:
    from dataclasses import replace

    return replace(SMALL, **kw)


def test_changing_the_format_replaces_the_old_file(pipe, tmp_path):
    """Rewriting an item as WebP removes its old PNG, so the folder holds one delivered image per seed."""
    Image.fromarray(product_rgba(60, 50)).save(tmp_path / "p.png")
    png = pipe.generate(str(tmp_path / "p.png"), export=(128, 128))
    write_item(tmp_path / "item", png, {})
    webp = pipe.generate(str(tmp_path / "p.png"), export=(128, 128), export_format="webp", quality=100)
    data = write_item(tmp_path / "item", webp, {})
    assert data["images"] == ["image_0.webp"] and not (tmp_path / "item" / "image_0.png").exists()
    assert json.loads((tmp_path / "item" / "result.json").read_text())["export"]["quality"] == 100
