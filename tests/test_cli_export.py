"""--export / --format / --quality / --upscaler on productbg generate and batch."""
import json

import numpy as np
import pytest
from PIL import Image

from productbg import imaging
from productbg.cli import main
from productbg.imaging.synthetic import packshot
from productbg.pipeline.outputs import read_result, save_png

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
