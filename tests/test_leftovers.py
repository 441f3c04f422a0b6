"""No leftovers (issue 13, class 8): a rerun cleans what an interrupted or different earlier run left behind, and
every file a run writes gets the usual permissions."""
import json
import os
import stat

import numpy as np
import pytest

from productbg.cli import main
from productbg.fileio import TMP_SUFFIX
from productbg.imaging.synthetic import packshot
from productbg.fileio.png import save_png
from productbg.training import bgsynth

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def batch_in(tmp_path):
    save_png(packshot(48, product_rgb=(0.8, 0.2, 0.1)).image, tmp_path / "p0.png")
    (tmp_path / "m.csv").write_text("product,category,seed,n\np0.png,mugs,1,2\n")
    return tmp_path


def _batch(folder, out, *extra):
    return main(["batch", str(folder / "m.csv"), "--out", str(out), "--checkpoint", "demo", "--steps", "2",
                 "--no-progress", *extra])


def test_batch_rerun_removes_a_killed_runs_summary_temp_file(batch_in):
    out = batch_in / "out"
    out.mkdir()
    stale = out / f".summary.json.1234{TMP_SUFFIX}"
    stale.write_text("{half")
    assert _batch(batch_in, out) == 0
    assert not stale.exists() and json.loads((out / "summary.json").read_text())


def test_unfinished_item_redone_with_fewer_images_keeps_no_extra_images(batch_in):
    out = batch_in / "out"
    item = out / "p0-mugs-s1"
    item.mkdir(parents=True)
    for k in range(4):  # an earlier, larger run killed before its result.json
        save_png(np.zeros((8, 8, 3), np.float32), item / f"image_{k}.png")
        save_png(np.zeros((8, 8, 3), np.float32), item / f"raw_{k}.png")
    assert _batch(batch_in, out) == 0
    result = json.loads((item / "result.json").read_text())
    assert sorted(p.name for p in item.glob("image_*.png")) == result["images"] == ["image_0.png", "image_1.png"]
    assert sorted(p.name for p in item.glob("raw_*.png")) == ["raw_0.png", "raw_1.png"]


def test_dataset_synth_over_an_existing_folder_keeps_no_stale_files(tmp_path):
    out = tmp_path / "synth"
    bgsynth.generate(out, bgsynth.SynthSpec(categories=2, per_category=3, held_out=1, size=32, seed=1))
    before = {p.relative_to(out) for p in out.rglob("*.png")}
    bgsynth.generate(out, bgsynth.SynthSpec(categories=2, per_category=2, held_out=1, size=32, seed=1))
    after = {p.relative_to(out) for p in out.rglob("*.png")}
    assert after < before  # fewer items: the extra files of the larger spec are gone
    info = (out / "bg60k_info.txt").read_text().splitlines()
    listed = {line.split("\t")[0] for line in info if line.strip()}
    images = {p.name for p in out.rglob("bg60k_imgs_*/*.png")}
    assert images == listed


def test_training_files_get_the_usual_permissions(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    bgsynth.generate(data, bgsynth.SynthSpec(categories=2, per_category=2, held_out=1, size=32, seed=1))
    assert main(["train-cg", "--data", str(data), "--model", "tiny", "--output", str(run), "--resolution", "32",
                 "--max-steps", "2", "--batch-size", "1", "--vectors-per-id", "1", "--lora-rank", "2",
                 "--checkpoint-every", "1", "--no-progress"]) == 0
    umask = os.umask(0)
    os.umask(umask)
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" and "checkpoint" in str(p) for p in files)
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p
