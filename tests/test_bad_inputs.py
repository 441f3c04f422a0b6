"""Bad input, table-driven, over every command and the ComfyUI nodes (issue 13).

Written from the classes of bad input, not from single examples: non-finite numbers, numbers out of range or
above what memory allows, unreadable / truncated / oversized / bomb images, paths that are folders, files,
missing, unwritable or too long, model files that are empty or not safetensors, option combinations that do
not go together. Every case asserts: exit status 2, exactly one line on stderr (``note:`` lines aside) naming
the problem, no traceback, and the folder the command would write to unchanged. Cases run in-process through
``productbg.cli.main``; a few run the real entry point in a subprocess.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from productbg.cli import main

UNWRITABLE = "/proc/productbg-test"  # not creatable even by root
LONG = "x" * 300


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Input files of every kind, shared by the cases (which must leave the folder unchanged)."""
    w = tmp_path_factory.mktemp("bad")
    img = np.full((64, 64, 3), 255, np.uint8)
    img[16:48, 20:44] = (200, 40, 40)
    Image.fromarray(img).save(w / "good.png")                              # a white-background packshot
    data = (w / "good.png").read_bytes()
    (w / "trunc.png").write_bytes(data[: len(data) // 2])                  # header fine, pixels cut off
    (w / "text.png").write_text("not an image\n")
    (w / "empty.png").write_bytes(b"")
    (w / "folder.png").mkdir()
    (w / "emptydir").mkdir()
    Image.new("1", (9000, 9000)).save(w / "big.png")                      # 81 MP: above the 50 MP limit
    Image.new("1", (15000, 15000)).save(w / "bomb.png")                   # 225 MP in a tiny file
    (w / "file.txt").write_text("a regular file\n")
    (w / "garbage.safetensors").write_bytes(b"\x00" * 64)
    from safetensors.torch import save_file
    save_file({}, str(w / "empty.safetensors"))
    save_file({"x": torch.zeros(2)}, str(w / "lora.safetensors"))
    (w / "m.csv").write_text("product,category\ngood.png,shoes\n")
    (w / "nocol.csv").write_text("image\ngood.png\n")
    (w / "m.txt").write_text("product\ngood.png\n")
    (w / "res.csv").write_text("foo\n1\n")
    return w


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _fill(args: list[str], w: Path) -> list[str]:
    return [a.format(w=w, ro=UNWRITABLE, long=LONG) for a in args]


GEN = ["generate", "--product", "{w}/good.png"]
FLOATS = ["--cfg", "--fill", "--grow", "--strength", "--style-weight", "--feather"]
NONFINITE = ["nan", "inf", "-inf", "NaN", "1e999"]
IMAGES = [("{w}/missing.png", "no such file"), ("{w}/folder.png", "is a folder"), ("{w}/text.png", "not an image"),
          ("{w}/empty.png", "cannot read image"), ("{w}/trunc.png", "cannot read image"),
          ("{w}/big.png", "--max-megapixels"), ("{w}/bomb.png", "(225.0 MP), above the 50 MP input limit")]

CASES: dict[str, list[tuple[list[str], str]]] = {"generate": [], "batch": [], "eval": [], "demo": [],
                                                   "weights": [], "dataset": [], "train-cg": [], "train-pg": []}
# ------------------------------------------------------------------------------------------- generate
CASES["generate"] += [(GEN + [flag, v], f"argument {flag}") for flag in FLOATS for v in NONFINITE]
CASES["generate"] += [(GEN + ["--lora", f"{{w}}/lora.safetensors:{v}"], "--lora") for v in ("nan", "inf", "x", "99")]
CASES["generate"] += [(GEN + list(a), m) for a, m in [
    (("--size", "100000"), "argument --size"), (("--size", "0"), "argument --size"),
    (("--size", "100"), "multiple of 8"), (("--size", "-8"), "argument --size"), (("--size", "abc"), "--size"),
    (("--size", "2048", "--n", "8"), "at most 4 images"), (("--n", "1000000000"), "argument --n"),
    (("--n", "0"), "argument --n"), (("--n", "-1"), "argument --n"), (("--n", "65"), "argument --n"),
    (("--n", "1.5"), "argument --n"), (("--steps", "0"), "argument --steps"), (("--steps", "100000"), "--steps"),
    (("--cfg", "-1"), "argument --cfg"), (("--cfg", "1000"), "argument --cfg"), (("--fill", "0"), "argument --fill"),
    (("--fill", "1.5"), "argument --fill"), (("--strength", "2"), "argument --strength"),
    (("--strength", "-0.1"), "argument --strength"), (("--style-weight", "-1"), "argument --style-weight"),
    (("--grow", "-1"), "argument --grow"), (("--feather", "1000"), "argument --feather"),
    (("--max-megapixels", "0"), "--max-megapixels"), (("--max-megapixels", "nan"), "--max-megapixels"),
    (("--seed", "-1"), "argument --seed"), (("--seed", "abc"), "argument --seed"),
    (("--seed", str(2 ** 63)), "argument --seed"), (("--seed", str(2 ** 63 - 1), "--n", "2"), "last seed"),
    (("--device", "tpu"), "unknown device"), (("--device", ""), "unknown device"),
    (("--device", "cuda:x"), "unknown device"), (("--device", "cuda:99"), "--device cuda:99"),
    (("--device", "meta"), "--device meta"),
    (("--segmentation", "magic"), "--segmentation"), (("--style-layers", "x"), "--style-layers"),
    (("--dtype", "fp8"), "--dtype"), (("--bogus",), "unrecognized arguments"),
    (("--max-megapixels", "10", "--reference", "{w}/big.png"), "--max-megapixels 82"),
]]
if not torch.cuda.is_available():
    CASES["generate"].append((GEN + ["--device", "cuda"], "no CUDA GPU"))
CASES["generate"].append((["generate", "--category", "x"], "--product"))
CASES["generate"] += [(["generate", "--product", p], m) for p, m in IMAGES]
CASES["generate"] += [(GEN + ["--reference", p], m) for p, m in IMAGES]
CASES["generate"] += [(GEN + ["--out", o], m) for o, m in [
    ("{w}/folder.png", "is an existing folder"), ("{w}/file.txt/out.png", "is a file, not a folder"),
    ("{w}/file.txt/sub/dir", "is a file, not a folder"), ("{w}/file.txt", "is a file, not a folder"),
    ("{ro}/out.png", "cannot write"), ("{ro}/dir", "cannot write"), ("{w}/{long}.png", "longer than 255"),
    ("{w}/{long}/x.png", "longer than 255"), ("{w}/{long}", "longer than 255")]]
CASES["generate"] += [(GEN + list(a), m) for a, m in [
    (("--checkpoint", "{w}/missing.safetensors"), "--checkpoint"), (("--checkpoint", "{w}/empty.safetensors"), "no tensors"),
    (("--checkpoint", "{w}/garbage.safetensors"), "--checkpoint"), (("--checkpoint", "{w}/file.txt"), "--checkpoint"),
    (("--bank", "{w}/lora.safetensors"), "--bank needs --checkpoint"),
    (("--checkpoint", "demo", "--bank", "{w}/lora.safetensors"), "does not go with --checkpoint demo"),
    (("--checkpoint", "{w}/lora.safetensors", "--bank", "{w}/missing.safetensors"), "--bank"),
    (("--checkpoint", "{w}/lora.safetensors", "--lora", "{w}/missing.safetensors"), "--lora"),
    (("--checkpoint", "{w}/lora.safetensors", "--style-encoder", "{w}/empty.safetensors"), "no tensors"),
    (("--checkpoint", "{w}/lora.safetensors", "--clip-vision", "{w}/missing.safetensors"), "--clip-vision"),
    (("--checkpoint", "{w}/lora.safetensors", "--configs", "{w}/file.txt"), "--configs"),
]]
# ------------------------------------------------------------------------------------------- batch
BATCH = ["batch", "{w}/m.csv", "--out", "{w}/bout"]
CASES["batch"] += [(BATCH + [flag, "nan"], f"argument {flag}") for flag in FLOATS]
CASES["batch"] += [(BATCH + list(a), m) for a, m in [
    (("--n", "0"), "argument --n"), (("--n", "1000000000"), "argument --n"), (("--seed", "-1"), "argument --seed"),
    (("--size", "100000"), "argument --size"), (("--size", "2048", "--n", "5"), "at most 4"),
    (("--device", "tpu"), "unknown device"), (("--shard", "2/2"), "--shard"), (("--shard", "x"), "--shard"),
    (("--shard", "-1/2"), "--shard"), (("--lora", "{w}/lora.safetensors:nan"), "--lora"),
    (("--checkpoint", "{w}/missing.safetensors"), "--checkpoint"), (("--max-megapixels", "-1"), "--max-megapixels"),
    (("--steps", "0"), "argument --steps")]]
CASES["batch"] += [(["batch", m, "--out", "{w}/bout"], msg) for m, msg in [
    ("{w}/missing.csv", "no such file"), ("{w}/emptydir", "is a folder"), ("{w}/m.txt", "must be .csv"),
    ("{w}/nocol.csv", "'product'")]]
CASES["batch"] += [(["batch", "{w}/m.csv", "--out", o], m) for o, m in [
    ("{w}/file.txt", "is a file"), ("{w}/file.txt/sub", "is a file"), ("{ro}/b", "cannot write"),
    ("{w}/{long}", "longer than 255")]]
CASES["batch"].append((["batch", "{w}/m.csv"], "--out"))
# ------------------------------------------------------------------------------------------- eval
CASES["eval"] += [(["eval"] + list(a), m) for a, m in [
    (("{w}/missing",), "no such results"), (("{w}/file.txt",), "results folder or a .csv"),
    (("{w}/emptydir",), "no finished results"), (("{w}/res.csv",), "no 'image'"),
    (("{w}/emptydir", "--json", "{w}/folder.png"), "is an existing folder"),
    (("{w}/emptydir", "--json", "{w}/file.txt/r.json"), "is a file"),
    (("{w}/emptydir", "--json", "{ro}/r.json"), "cannot write"),
    (("{w}/emptydir", "--json", "{w}/{long}.json"), "longer than 255"),
    (("{w}/emptydir", "--fid-real", "{w}/missing"), "--fid-real"),
    (("{w}/emptydir", "--fid-real", "{w}/file.txt"), "is a file"),
    (("{w}/emptydir", "--clip-vision", "{w}/missing.safetensors"), "--clip-vision"),
    (("{w}/emptydir", "--max-megapixels", "nan"), "--max-megapixels"), (("{w}/emptydir", "--bogus"), "unrecognized"),
    ((), "results")]]
# ------------------------------------------------------------------------------------------- demo
DEMO = ["demo", "--out", "{w}/demo.png"]
CASES["demo"] += [(DEMO + list(a), m) for a, m in [
    (("--threads", "-1"), "argument --threads"), (("--threads", "0"), "argument --threads"),
    (("--threads", "x"), "argument --threads"), (("--seed", "-1"), "argument --seed"),
    (("--products", "{w}/missing.png"), "no such file"), (("--products", "{w}/trunc.png"), "cannot read image"),
    (("--products", "{w}/text.png"), "not an image"), (("--products", "{w}/bomb.png"), "decompression bomb"),
    (("--references", "{w}/big.png"), "--max-megapixels"), (("--model", "{w}/missing"), "--model"),
    (("--model", "{w}/file.txt"), "is a file"), (("--device", "tpu"), "unknown device"),
    (("--device", "cuda:99"), "cuda:99"), (("--categories", ","), "--categories"),
    (("--checkpoint", "{w}/lora.safetensors"), "--checkpoint needs --bank"),
    (("--bank", "{w}/lora.safetensors"), "--bank"), (("--lora", "{w}/lora.safetensors:inf"), "--lora")]]
CASES["demo"] += [(["demo", "--out", o], m) for o, m in [
    ("{w}/folder.png", "is an existing folder"), ("{w}/file.txt/d.png", "is a file"), ("{w}/demo.jpg", ".png"),
    ("{ro}/d.png", "cannot write"), ("{w}/{long}.png", "longer than 255")]]
# ------------------------------------------------------------------------------------------- weights
CASES["weights"] += [(["weights"] + list(a), m) for a, m in [
    (("inspect", "{w}/missing.safetensors"), "no such file"), (("inspect", "{w}/emptydir"), "is a folder"),
    (("inspect", "{w}/garbage.safetensors"), "garbage.safetensors"), (("inspect", "{w}/file.txt"), "file.txt"),
    (("convert-lora", "{w}/missing.safetensors", "{w}/o.safetensors", "--to", "kohya"), "no such file"),
    (("convert-lora", "{w}/emptydir", "{w}/o.safetensors", "--to", "kohya"), "is a folder"),
    (("convert-lora", "{w}/lora.safetensors", "{w}/file.txt", "--to", "kohya"), "--force"),
    (("convert-lora", "{w}/lora.safetensors", "{w}/emptydir", "--to", "kohya"), "is an existing folder"),
    (("convert-lora", "{w}/lora.safetensors", "{w}/file.txt/o.safetensors", "--to", "kohya"), "is a file"),
    (("convert-lora", "{w}/lora.safetensors", "{ro}/o.safetensors", "--to", "kohya"), "cannot write"),
    (("convert-lora", "{w}/lora.safetensors", "{w}/lora.safetensors", "--to", "kohya", "--force"), "INPUT"),
    (("convert-lora", "{w}/lora.safetensors", "{w}/o.safetensors", "--to", "comfy"), "--to"),
    (("convert-lora", "{w}/garbage.safetensors", "{w}/o.safetensors", "--to", "kohya"), "garbage"),
    (("convert-lora", "{w}/empty.safetensors", "{w}/o.safetensors", "--to", "peft"), "empty.safetensors")]]
# ------------------------------------------------------------------------------------------- dataset
SYN = ["dataset", "synth", "{w}/syn"]
CASES["dataset"] += [(SYN + list(a), m) for a, m in [
    (("--categories", "0"), "--categories"), (("--categories", "-1"), "--categories"), (("--categories", "x"), "--categories"),
    (("--per-category", "-1"), "--per-category"), (("--per-category", "0"), "--per-category"),
    (("--held-out", "-1"), "--held-out"), (("--pairs", "-1"), "--pairs"), (("--size", "0"), "--size"),
    (("--size", "100"), "multiple of 8"), (("--size", "100000"), "--size"), (("--seed", "-1"), "--seed"),
    (("--categories", "3", "--names", "a,b"), "distinct category names"),
    (("--categories", "10000", "--per-category", "100000"), "10 million")]]
CASES["dataset"] += [(["dataset", "synth", o], m) for o, m in [
    ("{w}/file.txt", "is a file"), ("{w}/file.txt/sub", "is a file"), ("{ro}/syn", "cannot write")]]
CASES["dataset"] += [(["dataset", "build"] + list(a), m) for a, m in [
    (("{w}/emptydir", "{w}/ds", "--held-out", "2"), "--held-out"), (("{w}/emptydir", "{w}/ds", "--held-out", "1"), "everything"),
    (("{w}/emptydir", "{w}/ds", "--held-out", "-0.5"), "--held-out"), (("{w}/emptydir", "{w}/ds", "--held-out", "nan"), "--held-out"),
    (("{w}/missing", "{w}/ds"), "no such folder"), (("{w}/file.txt", "{w}/ds"), ".csv"),
    (("{w}/emptydir", "{w}/file.txt"), "is a file"), (("{w}/emptydir", "{ro}/ds"), "cannot write"),
    (("{w}/emptydir", "{w}/ds", "--max-side", "0"), "--max-side"), (("{w}/emptydir", "{w}/emptydir"), "source folder")]]
CASES["dataset"] += [(["dataset", "check"] + list(a), m) for a, m in [
    (("{w}/missing",), "no such folder"), (("{w}/file.txt",), "is a file"), (("{w}/emptydir",), "bg60k_info"),
    (("{w}/emptydir", "--split", "x"), "--split")]]
# ------------------------------------------------------------------------------------------- training
CG = ["train-cg", "--data", "{w}/emptydir", "--output", "{w}/run"]
CASES["train-cg"] += [(CG + list(a), m) for a, m in [
    (("--max-steps", "-1"), "--max-steps"), (("--max-steps", "0"), "--max-steps"), (("--batch-size", "0"), "--batch-size"),
    (("--lr", "0"), "--lr"), (("--lr", "nan"), "--lr"), (("--lr", "-1"), "--lr"), (("--resolution", "100"), "multiple of 8"),
    (("--resolution", "0"), "--resolution"), (("--strength", "2"), "--strength"),
    (("--caption-dropout", "1.5"), "--caption-dropout"), (("--mask-jitter", "0.1", "-0.1"), "MIN"),
    (("--mask-jitter", "nan", "0"), "--mask-jitter"), (("--max-steps", "10", "--warmup-steps", "50"), "--warmup-steps"),
    (("--keep-checkpoints", "0"), "--keep-checkpoints"), (("--seed", "-1"), "--seed"), (("--lora-rank", "0"), "--lora-rank"),
    (("--vectors-per-id", "0"), "--vectors-per-id"), (("--grad-accum", "0"), "--grad-accum"),
    (("--num-workers", "-1"), "--num-workers"), (("--identifier-lr", "inf"), "--identifier-lr"),
    (("--mass-loss-weight", "-1"), "--mass-loss-weight"), (("--model", "{w}/missing.safetensors"), "--model"),
    (("--resume", "{w}/missing"), "--resume"), (("--mixed-precision", "fp8"), "--mixed-precision"),
    (("--images", "{w}/emptydir"), "--images needs --category")]]
CASES["train-cg"] += [(["train-cg"] + list(a), m) for a, m in [
    (("--output", "{w}/run"), "--data"), (("--data", "{w}/missing", "--output", "{w}/run"), "--data"),
    (("--data", "{w}/file.txt", "--output", "{w}/run"), "is a file"), (("--data", "{w}/emptydir"), "--output"),
    (("--data", "{w}/emptydir", "--output", "{w}/file.txt"), "is a file"),
    (("--data", "{w}/emptydir", "--output", "{w}/file.txt/run"), "is a file"),
    (("--data", "{w}/emptydir", "--output", "{ro}/run"), "cannot write"),
    (("--category", "x", "--images", "{w}/missing", "--output", "{w}/run"), "--images")]]
PG = ["train-pg", "--data", "{w}/emptydir", "--output", "{w}/run"]
CASES["train-pg"] += [(PG + list(a), m) for a, m in [
    (("--tokens", "0"), "--tokens"), (("--crop-scale", "0", "1"), "--crop-scale"), (("--crop-scale", "0.9", "0.5"), "MIN"),
    (("--drop-reference", "2"), "--drop-reference"), (("--init-from", "{w}/missing.safetensors"), "--init-from"),
    (("--max-steps", "-1"), "--max-steps"), (("--variant", "huge"), "--variant"), (("--resampler", "0", "1", "1", "1"), "--resampler")]]
CASES["train-pg"] += [(["train-pg"] + list(a), m) for a, m in [
    (("--output", "{w}/run"), "--data"), (("--data", "{w}/missing", "--output", "{w}/run"), "--data"),
    (("--data", "{w}/emptydir", "--output", "{w}/file.txt"), "is a file")]]

ALL = [(cmd, args, msg) for cmd, cases in CASES.items() for args, msg in cases]


def test_the_suite_covers_every_command_with_150_cases():
    """At least 150 cases in all, and every command has some."""
    assert len(ALL) >= 150 and all(CASES.values()), {c: len(v) for c, v in CASES.items()}


@pytest.mark.parametrize("command, argv, message", ALL, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(ALL)])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(command, argv, message, world, capsys, monkeypatch):
    monkeypatch.chdir(world)
    monkeypatch.delenv("PRODUCTBG_MAX_MEGAPIXELS", raising=False)
    before = _tree(world)
    code = main(_fill(argv, world))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("productbg") and message in lines[0], lines
    assert _tree(world) == before


# ------------------------------------------------------------------------------------------- real entry point
@pytest.mark.parametrize("argv, message", [
    (GEN + ["--cfg", "nan"], "argument --cfg"),
    (["generate", "--product", "{w}/trunc.png"], "cannot read image"),
    (["batch", "{w}/m.csv", "--out", "{w}/file.txt"], "is a file"),
])
def test_the_real_entry_point_exits_2_with_one_line(argv, message, world):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "productbg", *_fill(argv, world)], capture_output=True, text=True,
                         cwd=world, env=env, timeout=600)
    lines = [line for line in run.stderr.splitlines() if not line.startswith("note:")]
    assert run.returncode == 2 and len(lines) == 1 and message in lines[0], run.stderr


def test_a_bug_still_shows_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    """An unexpected exception is not hidden: traceback, a line saying it is a bug, exit status 3."""
    from productbg.cli import generate as cli_generate

    def boom(args):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(cli_generate, "run", boom)
    code = main(["generate", "--product", "x.png"])
    err = capsys.readouterr().err
    assert code == 3 and "Traceback" in err and "ZeroDivisionError" in err and "this is a bug" in err


# ------------------------------------------------------------------------------------------- ComfyUI nodes
NODE_CASES = [
    ("folder", "{w}/missing", 0, "product folder not found"), ("folder", "{w}/file.txt", 0, "is a file"),
    ("folder", "{w}/emptydir", 0, "no product images"), ("folder", "", 0, "no product folder"),
    ("index", "{w}/nodeprod", 5, "past the last product"), ("load", "{w}/nodetrunc", 0, "cannot read image"),
    ("load", "{w}/nodebomb", 0, "decompression bomb"), ("csv", "{w}/nodeprod", 0, "category CSV not found"),
]


@pytest.mark.parametrize("kind, folder, index, message", NODE_CASES)
def test_load_products_from_folder_bad_input_is_a_node_error(kind, folder, index, message, world):
    from productbg.nodes.common import NodeInputError
    from productbg.nodes.imaging_nodes import LoadProductsFromFolder

    for name, src in (("nodeprod", "good.png"), ("nodetrunc", "trunc.png"), ("nodebomb", "bomb.png")):
        (world / name).mkdir(exist_ok=True)
        if not (world / name / src).exists():
            (world / name / src).write_bytes((world / src).read_bytes())
    folder = folder.format(w=world)
    with pytest.raises(NodeInputError) as e:
        LoadProductsFromFolder.execute(folder, index, "missing.csv" if kind == "csv" else "")
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("case", ["empty mask", "full mask", "wrong shape", "batch mismatch", "flat output"])
def test_preservation_report_never_raises_and_says_why(case):
    """A measurement that cannot be made is reported (pass false, the reason), never an error."""
    import json

    from productbg.nodes.imaging_nodes import PreservationReport

    image, mask = torch.rand(1, 32, 32, 3), torch.zeros(1, 32, 32)
    mask[:, 8:24, 8:24] = 1
    output = image
    if case == "empty mask":
        mask = torch.zeros(1, 32, 32)
    elif case == "full mask":
        mask = torch.ones(1, 32, 32)
    elif case == "wrong shape":
        output = torch.rand(1, 3, 3)
    elif case == "batch mismatch":
        output = torch.rand(3, 32, 32, 3)
        image = torch.rand(2, 32, 32, 3)
    else:
        output = torch.ones(1, 32, 32, 3)
    text, passed = PreservationReport.execute(image, mask, output, 2.0, 20.0, 0.05).result
    report = json.loads(text)
    if case == "flat output":
        assert "delta_e2000" in report["images"][0]["metrics"]
    else:
        assert passed is False and report["images"][0]["measured"] is False and report["images"][0]["reason"]
