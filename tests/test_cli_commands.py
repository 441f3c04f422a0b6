"""productbg generate / batch / eval on the command line: help, outputs, one-line errors, exit codes."""
import json
import os
import subprocess
import sys

import pytest

from productbg.cli import build_parser, main
from productbg.imaging.synthetic import packshot
from productbg.fileio.png import save_png

TINY = ["--size", "32", "--steps", "2"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def product(tmp_path):
    return str(save_png(packshot(48).image, tmp_path / "product.png"))


@pytest.mark.parametrize("command", ["generate", "batch", "eval"])
def test_help_has_examples(command, capsys):
    """Every command's --help shows examples and exit statuses."""
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0 and "examples:" in text and "exit status" in text and f"productbg {command}" in text


def test_python_dash_m_entry_point(tmp_path):
    """``python -m productbg batch --help`` works from any folder."""
    proc = subprocess.run([sys.executable, "-m", "productbg", "batch", "--help"], cwd=tmp_path, text=True,
                          capture_output=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=120)
    assert proc.returncode == 0 and "accelerate launch" in proc.stdout


def test_generate_folder_and_png_outputs(tmp_path, product, capsys):
    """--out DIR writes an item folder; --out x.png writes x_0.png, x_1.png and x.json."""
    assert main(["generate", "--product", product, "--category", "shoes", "--out", str(tmp_path / "item"), *TINY]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["image"].endswith("image_0.png")
    assert {p.name for p in (tmp_path / "item").iterdir()} >= {"image_0.png", "raw_0.png", "mask.png", "result.json"}
    assert main(["generate", "--product", product, "--n", "2", "--seed", "4", "--out", str(tmp_path / "x.png"), *TINY]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["seed"] for line in lines] == [4, 5]
    meta = json.loads((tmp_path / "x.json").read_text())
    assert meta["images"] == ["x_0.png", "x_1.png"] and meta["settings"]["steps"] == 2
    assert (tmp_path / "x_1.png").is_file()


@pytest.mark.parametrize("argv, message", [
    (["generate", "--product", "missing.png"], "--product missing.png: no such file"),
    (["generate", "--product", "{product}", "--n", "0"], "argument --n: must be at least 1"),
    (["generate", "--product", "{product}", "--bank", "b.safetensors"], "--bank needs --checkpoint"),
    (["generate", "--product", "{product}", "--checkpoint", "nope.safetensors"], "--checkpoint nope.safetensors: no such file"),
    (["generate", "--product", "{product}", "--checkpoint", "demo", "--bank", "b.safetensors"],
     "--bank does not go with --checkpoint demo"),
    (["batch", "missing.csv", "--out", "o"], "manifest missing.csv: no such file"),
    (["batch", "{manifest}", "--out", "o", "--shard", "2/2"], "--shard"),
    (["eval", "{tmp}"], "no finished results"),
])
def test_errors_are_one_line_exit_2(argv, message, tmp_path, product, capsys, monkeypatch):
    """Usage and input errors print one line ``productbg <cmd>: error: ...`` and exit 2."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.csv").write_text("product\nproduct.png\n")
    argv = [a.format(product=product, manifest=tmp_path / "m.csv", tmp=tmp_path) for a in argv] + TINY[:0]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("note:")]
    assert len(err) == 1 and err[0].startswith(f"productbg {argv[0]}: error:") and message in err[0]


def test_batch_exit_1_on_failed_rows_and_eval_reads_output(tmp_path, product, capsys):
    """A batch with a bad row exits 1 with the summary as the last line; eval then measures its output and, as
    batch does, exits 1 listing the row that was never generated."""
    (tmp_path / "m.csv").write_text("product,category,seed\nproduct.png,shoes,1\nmissing.png,shoes,2\n")
    out = tmp_path / "out"
    assert main(["batch", str(tmp_path / "m.csv"), "--out", str(out), "--no-progress", *TINY]) == 1
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["done"] == 1 and summary["failed"][0]["line"] == 3
    assert main(["eval", str(out), "--no-progress", "--json", str(tmp_path / "eval.json")]) == 1
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["metric", "n", "mean", "min", "max"]
    assert any(line.startswith("failed") and "manifest line 3: not generated" in line for line in printed)
    last = json.loads(printed[-1])
    assert last["images"] == 1 and last["summary"]["delta_e_after"]["n"] == 1
    assert [f["name"] for f in last["failed"]] == ["manifest line 3"]
    assert len(json.loads((tmp_path / "eval.json").read_text())["items"]) == 1


def test_eval_exits_1_on_a_partial_results_folder(tmp_path, product, capsys):
    """An item folder left unfinished (its result.json gone, as after a kill) is a failed item: exit 1, listed."""
    for name in ("a", "b"):
        assert main(["generate", "--product", product, "--out", str(tmp_path / "out" / name), *TINY]) == 0
    (tmp_path / "out" / "b" / "result.json").unlink()
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "out"), "--no-progress"]) == 1
    last = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert last["images"] == 1 and [f["name"] for f in last["failed"]] == ["b"]
    assert "unfinished: no result.json" in last["failed"][0]["reason"]


def test_warnings_are_one_line_in_the_tools_voice(tmp_path, capsys):
    """A library warning (PIL's, on a palette PNG with byte transparency) is printed as one
    ``productbg <command>: warning: ...`` line, without file, line number or source."""
    import numpy as np
    from PIL import Image

    rgb = (packshot(48).image * 255).astype(np.uint8)
    alpha = np.where(rgb.min(-1) < 250, 255, 0).astype(np.uint8)
    Image.fromarray(np.dstack([rgb, alpha])).convert("P").save(tmp_path / "palette.png")
    assert main(["generate", "--product", str(tmp_path / "palette.png"), "--out", str(tmp_path / "o"), *TINY]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("note:")]
    assert err == ["productbg generate: warning: Palette images with Transparency expressed in bytes should be "
                   "converted to RGBA images"]


def test_generate_and_batch_on_the_embedded_demo_model(tmp_path, product, capsys):
    """``--checkpoint demo`` runs the embedded model with its own settings (64², 20 steps, CFG 5, bare prompt),
    options given on the command line still win, and batch takes the same option."""
    from productbg.pipeline.embedded import DEMO_SETTINGS

    assert main(["generate", "--product", product, "--category", "mugs", "--checkpoint", "demo", "--steps", "3",
                 "--out", str(tmp_path / "mug.png")]) == 0
    meta = json.loads((tmp_path / "mug.json").read_text())
    assert meta["model"] == "demo (embedded)" and meta["settings"]["steps"] == 3
    assert {k: meta["settings"][k] for k in ("size", "guidance_scale", "extra_text", "negative_prompt")} == {
        "size": DEMO_SETTINGS.size, "guidance_scale": DEMO_SETTINGS.guidance_scale, "extra_text": "",
        "negative_prompt": ""}
    assert "a product photo on a" in meta["prompt"] and "soft studio" not in meta["prompt"]
    from PIL import Image
    assert Image.open(tmp_path / "mug.png").size == (DEMO_SETTINGS.size, DEMO_SETTINGS.size)
    (tmp_path / "m.csv").write_text("product,category,seed\nproduct.png,lamps,1\nproduct.png,nope,2\n")
    assert main(["batch", str(tmp_path / "m.csv"), "--out", str(tmp_path / "out"), "--no-progress",
                 "--checkpoint", "demo", "--steps", "2"]) == 1
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["done"] == 1 and "no category 'nope'" in summary["failed"][0]["reason"]
    assert json.loads((tmp_path / "out" / "product-lamps-s1" / "result.json").read_text())["model"] == "demo (embedded)"
