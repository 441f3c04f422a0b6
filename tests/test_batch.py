"""productbg batch: resume after SIGKILL, sharding, path traversal, bad rows, manifests."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from productbg.imaging.synthetic import packshot
from productbg.pipeline.batch import run_batch
from productbg.pipeline.errors import PipelineError
from productbg.pipeline.manifest import Shard, read_manifest, shard_from_env
from productbg.fileio.png import save_png
from productbg.pipeline.outputs import read_result
from productbg.pipeline.pipeline import GenerateSettings, ProductBGPipeline

TINY_ARGS = ["--size", "32", "--steps", "2", "--no-progress"]
COLOURS = [(0.9, 0.1, 0.1), (0.1, 0.7, 0.2), (0.2, 0.2, 0.9), (0.8, 0.7, 0.1), (0.6, 0.1, 0.7), (0.1, 0.6, 0.7)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe():
    return ProductBGPipeline.tiny(style=False, settings=GenerateSettings(size=32, steps=2), device="cpu")


def _products(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        save_png(packshot(48, product_rgb=COLOURS[i % len(COLOURS)]).image, folder / f"p{i}.png")
        names.append(f"p{i}.png")
    return names


def _manifest(folder: Path, rows: list[str], header: str = "product,category,seed") -> Path:
    path = folder / "manifest.csv"
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def _cli(args: list[str], cwd: Path, env: dict | None = None, **kwargs) -> subprocess.Popen:
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "productbg", *args], cwd=cwd, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _complete_files(out: Path) -> None:
    """Every visible file is whole: PNGs decode, JSON parses."""
    for p in out.rglob("*"):
        if p.name.startswith(".") or not p.is_file():
            continue
        if p.suffix == ".png":
            with Image.open(p) as im:
                im.load()
        elif p.suffix == ".json":
            json.loads(p.read_text())


def test_resume_after_sigkill(tmp_path, pipe):
    """Kill a running batch with SIGKILL, rerun: finished items are not redone, nothing is lost, no partial or
    temp files remain."""
    names = _products(tmp_path, 12)                      # enough work left after the first item to kill mid-run
    manifest = _manifest(tmp_path, [f"{n},shoes,{i}" for i, n in enumerate(names)])
    out = tmp_path / "out"
    proc = _cli(["batch", str(manifest), "--out", str(out), "--n", "2", *TINY_ARGS, "--steps", "4"], tmp_path)
    deadline = time.time() + 120
    while time.time() < deadline and not any(out.glob("*/result.json")):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/result.json")}
    assert 1 <= len(finished) < 12
    _complete_files(out)
    rows = read_manifest(manifest, out)
    summary = run_batch(rows, out, lambda: pipe, progress=False)
    assert summary.skipped == len(finished) and summary.done == 12 - len(finished) and not summary.failed
    assert {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/result.json") if p.parent.name in finished} == finished
    assert all(read_result(out / r.name) is not None for r in rows)
    assert not [p for p in out.rglob(".*") if p.is_file()]
    _complete_files(out)


def test_stale_temp_files_are_removed_and_item_redone(tmp_path, pipe):
    """An unfinished item (images but no result.json, plus a temp file) is redone and its temp file removed."""
    names = _products(tmp_path, 1)
    manifest = _manifest(tmp_path, [f"{names[0]},shoes,1"])
    out = tmp_path / "out"
    item = out / read_manifest(manifest, out)[0].name
    item.mkdir(parents=True)
    (item / ".image_0.png.abc.tmp").write_bytes(b"\x89PNG partial")
    (item / "image_0.png").write_bytes(b"not finished")
    summary = run_batch(read_manifest(manifest, out), out, lambda: pipe, progress=False)
    assert summary.done == 1 and not (item / ".image_0.png.abc.tmp").exists()
    _complete_files(out)


def test_two_shards_cover_every_row_once(tmp_path):
    """Two processes with RANK 0/1 and WORLD_SIZE 2 split the manifest without overlap or gap."""
    names = _products(tmp_path, 5)
    manifest = _manifest(tmp_path, [f"{n},toys,{i}" for i, n in enumerate(names)])
    out = tmp_path / "out"
    procs = [_cli(["batch", str(manifest), "--out", str(out), *TINY_ARGS], tmp_path,
                  env={"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)}) for r in (0, 1)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    rows = read_manifest(manifest, out)
    shards = {r.name: json.loads((out / r.name / "result.json").read_text())["shard"] for r in rows}
    assert shards == {r.name: f"{i % 2}/2" for i, r in enumerate(rows)}
    per_shard = [json.loads((out / f"summary.rank{r}-of-2.json").read_text()) for r in (0, 1)]
    assert [s["done"] for s in per_shard] == [3, 2]
    merged = json.loads((out / "summary.json").read_text())
    assert merged["done"] == 5 and merged["world_size"] == 2 and merged["failed"] == []


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
def test_shard_partition(count):
    """Shards are disjoint and together hold every row, for any process count."""
    rows = list(range(23))
    parts = [Shard(i, count).take(rows) for i in range(count)]
    assert sorted(x for part in parts for x in part) == rows
    assert sum(len(p) for p in parts) == len(rows)


def test_shard_from_env():
    """RANK / WORLD_SIZE pick the shard; bad values are a clear error."""
    assert shard_from_env({"RANK": "1", "WORLD_SIZE": "3"}) == Shard(1, 3)
    assert shard_from_env({}) == Shard(0, 1)
    with pytest.raises(PipelineError):
        shard_from_env({"RANK": "3", "WORLD_SIZE": "2"})


@pytest.mark.parametrize("env, message", [
    ({"RANK": "5", "WORLD_SIZE": "2"}, "RANK=5 with WORLD_SIZE=2: the rank must be from 0 to 1"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0: the number of processes must be at least 1"),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, "the rank must be from 0 to 1"),
    ({"RANK": "one"}, "RANK='one' is not an integer"),
])
def test_shard_from_env_says_what_is_wrong(env, message):
    """Integers that do not make a shard are not called "not integers": the message names the broken rule."""
    with pytest.raises(PipelineError) as e:
        shard_from_env(env)
    assert message in str(e.value) and ("not an integer" in str(e.value)) == ("one" in env.values())


def test_product_that_is_a_folder_or_fifo_says_what_it_is(tmp_path):
    """A row whose product is a folder or a FIFO fails with what the path is, not "not found"."""
    (tmp_path / "shoes.png").mkdir()
    os.mkfifo(tmp_path / "pipe.png")
    rows = read_manifest(_manifest(tmp_path, ["shoes.png,a,1", "pipe.png,a,2", "gone.png,a,3"]), tmp_path / "o")
    errors = [r.error for r in rows]
    assert "is a folder, not a file" in errors[0] and "is a FIFO (named pipe), not a regular file" in errors[1]
    assert "no such file" in errors[2] and not any("not found" in e for e in errors)


def test_manifest_path_traversal_rejected(tmp_path):
    """Output names that would write outside --out are refused per row; nothing is written outside."""
    names = _products(tmp_path / "in", 1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "link").symlink_to(tmp_path, target_is_directory=True)
    bad = ["../evil", "/tmp/evil", "a/../../evil", "..\\evil", "C:evil", "link/evil", ".hidden", "nul\x00x"]
    rows = [json.dumps({"product": f"in/{names[0]}", "name": n}) for n in bad]
    (tmp_path / "m.jsonl").write_text("\n".join(rows + [json.dumps({"product": f"in/{names[0]}", "name": "ok/x"})]))
    parsed = read_manifest(tmp_path / "m.jsonl", out)
    assert [r.error is not None for r in parsed] == [True] * len(bad) + [False]
    assert all("--out" in r.error or "plain relative" in r.error for r in parsed[:-1])

    class Refuse:
        def generate(self, *a, **k):
            raise AssertionError("must not be called for rejected rows")

    summary = run_batch(parsed[:-1], out, lambda: Refuse(), progress=False)
    assert len(summary.failed) == len(bad) and summary.done == 0
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()


def test_bad_rows_reported_not_fatal(tmp_path, pipe):
    """Missing image, unreadable image, bad seed, duplicate name, unknown column values: reported, others done."""
    names = _products(tmp_path, 2)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    manifest = _manifest(tmp_path, [f"{names[0]},shoes,1", "missing.png,shoes,2", "broken.png,shoes,3",
                                    f"{names[1]},shoes,x", f"{names[1]},toys,4", f"{names[1]},toys,4"])
    out = tmp_path / "out"
    summary = run_batch(read_manifest(manifest, out), out, lambda: pipe, progress=False)
    reasons = {f["line"]: f["reason"] for f in summary.failed}
    assert summary.done == 2 and set(reasons) == {3, 4, 5, 7}
    assert "no such file" in reasons[3] and "cannot read" in reasons[4]
    assert "integer" in reasons[5] and "already used by line 6" in reasons[7]
    saved = json.loads((out / "summary.json").read_text())
    assert saved["done"] == 2 and len(saved["failed"]) == 4 and saved["images_per_minute"] > 0


def test_manifest_formats_and_fatal_errors(tmp_path):
    """CSV and JSONL give the same rows; a manifest without a product column is a fatal, clear error."""
    names = _products(tmp_path, 1)
    csv_path = _manifest(tmp_path, [f"{names[0]},shoes,,7,2"], header="product,category,reference,seed,n")
    (tmp_path / "m.jsonl").write_text(json.dumps({"product": names[0], "category": "shoes", "seed": 7, "n": 2}) + "\n")
    a, b = read_manifest(csv_path, tmp_path / "o"), read_manifest(tmp_path / "m.jsonl", tmp_path / "o")
    assert a == [a[0]] and (a[0].seed, a[0].n, a[0].name, a[0].category) == (7, 2, "p0-shoes-s7", "shoes")
    assert (b[0].seed, b[0].n, b[0].name) == (a[0].seed, a[0].n, a[0].name)
    (tmp_path / "bad.csv").write_text("image,category\nx.png,a\n")
    with pytest.raises(PipelineError, match="product"):
        read_manifest(tmp_path / "bad.csv", tmp_path / "o")
    (tmp_path / "bad.jsonl").write_text("{not json\n[1]\n")
    assert [r.error.split(" ")[0] for r in read_manifest(tmp_path / "bad.jsonl", tmp_path / "o")] == ["not", "each"]


def test_item_files_and_bit_identical_core(tmp_path, pipe):
    """An item holds final + raw images, placed canvas, mask and result.json; the PNG core equals the placed one."""
    names = _products(tmp_path, 1)
    out = tmp_path / "out"
    run_batch(read_manifest(_manifest(tmp_path, [f"{names[0]},shoes,3"]), out, default_n=2), out, lambda: pipe,
              progress=False)
    data = read_result(out / "p0-shoes-s3")
    assert data["images"] == ["image_0.png", "image_1.png"] and data["seeds"] == [3, 4]
    placed = np.asarray(Image.open(out / "p0-shoes-s3" / "placed.png"))
    mask = np.asarray(Image.open(out / "p0-shoes-s3" / "mask.png"))
    image = np.asarray(Image.open(out / "p0-shoes-s3" / "image_1.png"))
    assert (mask == 255).sum() > 50 and np.array_equal(image[mask == 255], placed[mask == 255])
