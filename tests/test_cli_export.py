"""--export / --format / --quality / --upscaler on productbg generate and batch."""
import json

import numpy as np
import pytest
from PIL import Image

from productbg import imaging
from productbg.cli import main
from productbg.imaging.synthetic import packshot
from productbg.fileio.png import save_png
from productbg.pipeline.outputs import read_result

TINY = ["--size", "32", "--steps", "2"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def product(tmp_path):
    return str(save_png(packshot(160).image, tmp_path / "product.png"))


def test_generate_export_file_takes_its_format_from_the_name(tmp_path, product, capsys):
    """``--export taobao --out x.jpg`` writes an 800² JPEG (sRGB profile) and x.json with the export block."""
    out = tmp_path / "x.jpg"
    assert main(["generate", "--product", product, "--export", "taobao", "--quality", "90", "--out", str(out),
                 *TINY]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert line["image"] == str(out)
    with Image.open(out) as im:
        assert im.format == "JPEG" and im.size == (800, 800) and im.info["icc_profile"] == imaging.srgb_icc_bytes()
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["export"]["size"] == [800, 800] and meta["export"]["quality"] == 90
    assert meta["settings"]["export"] == [800, 800] and meta["reports"][0]["metrics"]["size"] == [800, 800]
    assert meta["canvas_reports"][0]["metrics"]["product_pixels"] < meta["reports"][0]["metrics"]["product_pixels"]


def test_generate_export_folder_in_webp(tmp_path, product, capsys):
    out = tmp_path / "item"
    assert main(["generate", "--product", product, "--export", "300x200", "--format", "webp", "--out", str(out),
                 "--n", "2", *TINY]) == 0
    data = read_result(out)
    assert data["images"] == ["image_0.webp", "image_1.webp"] and data["export"]["format"] == "webp"
    with Image.open(out / "image_1.webp") as im:
        assert im.size == (300, 200)
    with Image.open(out / "raw_0.png") as im:                           # generated small, at the export's aspect
        assert im.size == (32, 24)


@pytest.mark.parametrize("argv, message", [
    (["--format", "jpeg"], "--format needs --export"),
    (["--quality", "80"], "--quality needs --export"),
    (["--export", "giant"], "give a preset"),
    (["--export", "story", "--quality", "0"], "--quality"),
    (["--export", "story", "--out", "OUT/x.webp", "--format", "png"], "make them agree"),
    (["--out", "OUT/x.jpg"], "without --export"),
    (["--export", "story", "--upscaler", "OUT/u.pth"], "only .safetensors"),
    (["--export", "shopify", "--n", "40"], "at most 15 images per product at --export 2048x2048"),
])
def test_export_option_errors_are_one_line_exit_2(argv, message, tmp_path, product, capsys):
    (tmp_path / "u.pth").write_bytes(b"x")
    argv = [a.replace("OUT", str(tmp_path)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "o")]
    assert main(["generate", "--product", product, *argv, *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_batch_export_resumes_and_keeps_the_native_product(tmp_path, capsys):
    """``productbg batch --export`` writes export-size images atomically and a rerun skips them all."""
    products = []
    for i, colour in enumerate([(0.9, 0.1, 0.1), (0.1, 0.6, 0.2)]):
        save_png(packshot(200, product_rgb=colour).image, tmp_path / f"p{i}.png")
        products.append(f"p{i}.png,shoes,{i}")
    (tmp_path / "m.csv").write_text("product,category,seed\n" + "\n".join(products) + "\n")
    out = tmp_path / "out"
    args = ["batch", str(tmp_path / "m.csv"), "--out", str(out), "--export", "instagram-portrait", "--format",
            "jpeg", "--no-progress", *TINY]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["done"] == 2
    items = sorted(p for p in out.iterdir() if p.is_dir())
    for item in items:
        with Image.open(item / "image_0.jpg") as im:
            assert im.size == (1080, 1350)
        assert not list(item.glob(".*.tmp"))
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["skipped"] == 2
    report = read_result(items[0])["reports"][0]
    assert report["metrics"]["size"] == [1080, 1350] and np.isfinite(report["metrics"]["delta_e2000"]["mean"])


def test_eval_measures_generate_and_batch_exports_at_their_generation_size(tmp_path, product, capsys):
    """``eval`` on ``generate --export`` and ``batch --export`` folders evaluates every item (it used to fail each
    with "mask.png is 32x32 but its image is 800x800"): the delivered image is brought to the canvas size."""
    (tmp_path / "m.csv").write_text("product,seed\nproduct.png,1\nproduct.png,2\n")
    assert main(["generate", "--product", product, "--export", "taobao", "--format", "jpeg", "--out",
                 str(tmp_path / "out" / "one"), *TINY]) == 0
    assert main(["batch", str(tmp_path / "m.csv"), "--out", str(tmp_path / "out" / "many"), "--export", "300x200",
                 "--no-progress", *TINY]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "out"), "--no-progress", "--json", str(tmp_path / "eval.json")]) == 0
    last = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert last["images"] == 3 and last["failed"] == [] and last["summary"]["psnr_after_db"]["n"] == 3
    items = {i["name"]: i for i in json.loads((tmp_path / "eval.json").read_text())["items"]}
    assert items["one/image_0.jpg"]["size"] == [32, 32] and items["many/product-s1/image_0.png"]["size"] == [32, 24]
    assert all(i["delta_e_after"] < 5 for i in items.values())


def _no_sampling(monkeypatch):
    from productbg.pipeline import pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("sampled before the settings were checked")

    monkeypatch.setattr(pipeline, "sample_inpaint", refuse)


@pytest.mark.parametrize("argv, message", [
    (["--export", "8192x64"], "--export 8192x64 at --size 512 gives a 512x8 generation canvas (the export's aspect "
     "with --size as its longer side), and both sides must be at least 16 px: use --size 1536 or more"),
    (["--export", "64x8192", "--size", "32"], "gives a 8x32 generation canvas"),
    (["--size", "16", "--fill", "0.01", "--export", "800x800"],
     "product.png: at --fill 0.01 the product covers no whole pixel of the 16x16 generation canvas: raise --fill "
     "or --size"),
])
def test_export_settings_that_cannot_work_are_refused_before_sampling(argv, message, tmp_path, product, capsys,
                                                                      monkeypatch):
    """An export aspect too elongated for --size, or a product too small for the canvas, is one line naming the
    setting to change, before anything is sampled or written."""
    _no_sampling(monkeypatch)
    out = tmp_path / "o"
    assert main(["generate", "--product", product, "--out", str(out), "--steps", "2", *argv]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("note:")]
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def _upscaler(path, channels=(3, 3), nan=False):
    """A 2× Compact upscale model file (random weights) with these (input, output) channels, optionally broken
    with NaN weights."""
    pytest.importorskip("spandrel")
    from safetensors.torch import save_file
    from spandrel.architectures.Compact import Compact

    state = Compact(num_in_ch=channels[0], num_out_ch=channels[1], num_feat=8, num_conv=2, upscale=2).state_dict()
    if nan:
        last = list(state)[-1]
        state[last] = state[last] * float("nan")
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


@pytest.mark.parametrize("kind, message", [
    ("grey", "a 1-channel to 1-channel model; the background is RGB, so use an RGB (3-channel) upscale model"),
    ("rgba", "a 4-channel to 4-channel model"),
    ("nan", "the model turns a grey test image into NaN or infinite values"),
])
def test_an_upscaler_that_cannot_work_is_refused_when_loaded(kind, message, tmp_path, product, capsys, monkeypatch):
    """An upscale model that is not RGB → RGB (it ended in a torch traceback) or that outputs NaN (its background
    came out black, exit 0) is refused in one line when loaded, before sampling; nothing is written."""
    channels = {"grey": (1, 1), "rgba": (4, 4), "nan": (3, 3)}[kind]
    path = _upscaler(tmp_path / f"{kind}.safetensors", channels, nan=kind == "nan")
    _no_sampling(monkeypatch)
    for command in (["generate", "--product", product], ["batch", str(tmp_path / "m.csv")]):
        (tmp_path / "m.csv").write_text("product\nproduct.png\n")
        assert main([*command, "--out", str(tmp_path / "o"), "--export", "200x200", "--upscaler", path, *TINY]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("note:")]
        assert len(err) == 1 and f"--upscaler {path}: {message}" in err[0], err
        assert not (tmp_path / "o").exists()


def test_nan_from_an_upscaler_or_the_model_is_never_written_as_black(tmp_path, product, capsys, monkeypatch):
    """NaN is written as black pixels: an upscaler output or a generated image with NaN is refused in one line
    (an upscaler returning NaN at run time made a 60 %-black export that exited 0)."""
    from productbg import imaging
    from productbg.pipeline import pipeline

    with pytest.raises(ValueError, match="NaN or infinite values"):
        imaging.resize_background(np.zeros((8, 8, 3), np.float32), (32, 32),
                                  upscaler=lambda x: np.full((16, 16, 3), np.nan, np.float32))
    real = pipeline.sample_inpaint
    monkeypatch.setattr(pipeline, "sample_inpaint", lambda *a, **k: real(*a, **k) * float("nan"))
    out = tmp_path / "x.png"
    assert main(["generate", "--product", product, "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == ("productbg generate: error: the model produced NaN or infinite pixels (a numeric overflow, e.g. "
                   "in float16): rerun with --dtype fp32")
    assert not out.exists()
