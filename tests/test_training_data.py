"""BG-synth, the BG60k reader's validation, the torch Dataset and the folder builder."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from productbg.training import bgsynth, layout
from productbg.training.datasets import (DatasetError, ImageMaskDataset, build_from_folder, open_bg60k)

CHINESE = ("运动鞋", "手提包", "咖啡杯", "台灯")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("bgsynth")
    spec = bgsynth.SynthSpec(categories=4, per_category=3, held_out=1, size=32, seed=3, names=CHINESE)
    return root, spec, bgsynth.generate(root, spec)


def test_synth_writes_the_bg60k_layout(synth):
    """Info files list every file; images live in <split>_imgs_{N mod 10}; masks are exact and non-trivial."""
    root, spec, counts = synth
    assert counts == {"written": 16, "bg60k": 12, "bg1k": 4, "pairs": 4}
    lines = (root / "bg60k_info.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "0.png\t运动鞋" and len(lines) == 12
    assert (root / "bg60k_imgs_1" / "11.png").is_file() and (root / "bg60k_masks_1" / "11.png").is_file()
    pairs = [l.split("\t") for l in (root / "bgpair_info.txt").read_text(encoding="utf-8").splitlines()]
    bg60k = dict(l.split("\t") for l in lines)
    assert all(bg60k[ref] == cat for _, ref, cat in pairs)
    mask = np.asarray(Image.open(layout.mask_path(root, "bg60k", "5.png")))
    assert set(np.unique(mask)) == {0, 255}
    assert not list(root.rglob("*.tmp"))


def test_synth_is_deterministic_and_categories_differ(synth, tmp_path):
    """Same seed → identical bytes; different categories → different background statistics."""
    root, spec, _ = synth
    img, mask = bgsynth.render(spec, "bg60k", 7, 3)
    assert np.array_equal(np.asarray(Image.open(layout.image_path(root, "bg60k", "7.png"))), img)
    means = [bgsynth.render(spec, "bg60k", n, n % 4)[0].reshape(-1, 3).mean(0) for n in range(4)]
    assert min(np.abs(a - b).sum() for i, a in enumerate(means) for b in means[i + 1:]) > 5
    product = mask > 0
    assert 0.05 < product.mean() < 0.8


def test_every_family_renders_distinct_backgrounds():
    """All 16 style families produce finite images in range, and no two are the same."""
    rng = lambda: np.random.default_rng(0)  # noqa: E731
    pal = bgsynth.category_palette(0, 0)
    imgs = [bgsynth.background(f, pal, rng(), 24) for f in bgsynth.FAMILY_NAMES]
    assert len(imgs) == 16
    assert all(i.shape == (24, 24, 3) and 0 <= i.min() and i.max() <= 1 for i in imgs)
    assert min(np.abs(a - b).mean() for k, a in enumerate(imgs) for b in imgs[k + 1:]) > 1e-3


def test_reader_opens_chinese_categories(synth):
    root, _, _ = synth
    index = open_bg60k(root)
    assert index.categories == sorted(CHINESE) and len(index.records) == 12
    assert index.counts() == {c: 3 for c in CHINESE}
    ds = ImageMaskDataset(index, 16, flip=True)
    item = ds[(2, 5)]
    assert item["image"].shape == (3, 16, 16) and item["mask"].shape == (1, 16, 16)
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert index.categories[item["category"]] == index.records[2].category
    assert open_bg60k(root, "bg1k").counts() == {c: 1 for c in CHINESE}


def _broken_copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    layout.image_path(dst, "bg60k", "3.png").unlink()                              # missing image
    layout.mask_path(dst, "bg60k", "4.png").write_bytes(b"not a png")              # unreadable mask
    Image.new("L", (8, 8)).save(layout.mask_path(dst, "bg60k", "5.png"))           # size mismatch
    with (dst / "bg60k_info.txt").open("a", encoding="utf-8") as f:
        f.write("6.png\t运动鞋\n" "x.jpg\t台灯\n" "only-one-field\n")                # duplicate, bad name, malformed
    return dst


def test_reader_reports_every_problem_in_one_error(synth, tmp_path):
    root, _, _ = synth
    bad = _broken_copy(root, tmp_path / "bad")
    with pytest.raises(DatasetError) as e:
        open_bg60k(bad)
    msg = str(e.value)
    for kind in ("missing image", "unreadable mask", "size mismatch", "duplicate entry", "bad file name",
                 "malformed line", "--skip-bad"):
        assert kind in msg, kind
    assert len(e.value.problems) == 6 and "3.png" in msg and "image 32x32, mask 8x8" in msg


def test_reader_skip_bad_warns_and_keeps_the_rest(synth, tmp_path):
    root, _, _ = synth
    bad = _broken_copy(root, tmp_path / "bad")
    with pytest.warns(UserWarning, match="6 problem"):
        index = open_bg60k(bad, skip_bad=True)
    assert len(index.records) == 9 and {"3.png", "4.png", "5.png"}.isdisjoint(r.file for r in index.records)


def test_reader_checks_counts_categories_and_missing_info(synth, tmp_path):
    root, _, _ = synth
    with pytest.raises(DatasetError, match="count mismatch.*expected 13"):
        open_bg60k(root, expect_count=13)
    with pytest.raises(DatasetError, match="unknown category"):
        open_bg60k(root, categories=CHINESE[:3])
    with pytest.raises(DatasetError, match="no bg60k_info.txt"):
        open_bg60k(tmp_path)


# ---------------------------------------------------------------------------------------------- folder builder
def _rgba_product(path, size=24, opaque=False):
    arr = np.zeros((size, size, 4), np.uint8)
    arr[..., :3] = 200
    arr[..., 3] = 255 if opaque else 0
    arr[6:18, 8:16] = (10, 120, 30, 255)
    Image.fromarray(arr, "RGBA").save(path)


def _user_folder(root):
    for cat in ("鞋子", "杯子"):
        (root / cat).mkdir(parents=True)
        for i in range(3):
            _rgba_product(root / cat / f"p{i}.png")
    _rgba_product(root / "鞋子" / "opaque.png", opaque=True)   # no alpha information
    (root / "杯子" / "broken.png").write_bytes(b"\x89PNG broken")
    _rgba_product(root / "loose.png")                          # not in a category folder
    return root


def test_build_from_folder_alpha_masks_report_and_resume(tmp_path):
    src, out = _user_folder(tmp_path / "src"), tmp_path / "out"
    report = build_from_folder(src, out, segmenter=None)
    assert report.written == 6 and report.categories == {"鞋子": 3, "杯子": 3} and report.mask_sources == {"alpha": 6}
    reasons = {p.split("/")[-1]: why for p, why in report.skipped}
    assert set(reasons) == {"opaque.png", "broken.png", "loose.png"}
    assert "no alpha" in reasons["opaque.png"] and "unreadable" in reasons["broken.png"]
    index = open_bg60k(out)
    assert index.categories == sorted(["鞋子", "杯子"])
    mask = np.asarray(Image.open(index.records[0].mask))
    assert mask[10, 10] == 255 and mask[0, 0] == 0
    assert json.loads((out / "build_report.json").read_text(encoding="utf-8"))["written"] == 6

    _rgba_product(src / "杯子" / "new.png")                       # resume: only the new file is built
    again = build_from_folder(src, out, segmenter=None)
    assert (again.written, again.reused) == (1, 6) and len(open_bg60k(out).records) == 7


def test_build_from_csv_with_segmenter_and_held_out(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(6):
        _rgba_product(imgs / f"{i}.png", opaque=True)
    with (tmp_path / "list.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "category"])
        w.writerows([[f"imgs/{i}.png", "台灯"] for i in range(6)] + [["imgs/gone.png", "台灯"]])

    def segment(im):
        return (np.asarray(im)[..., 0] < 100).astype(np.float32)   # the dark-red-channel product

    report = build_from_folder(tmp_path / "list.csv", tmp_path / "out", segmenter=segment, held_out=0.5)
    assert report.mask_sources == {"segmentation": 6}
    assert report.skipped == [(str(tmp_path / "imgs" / "gone.png"), "file not found")]
    n60k = len((tmp_path / "out" / "bg60k_info.txt").read_text(encoding="utf-8").splitlines())
    n1k = len((tmp_path / "out" / "bg1k_info.txt").read_text(encoding="utf-8").splitlines())
    assert n60k + n1k == 6 and n1k > 0 and n60k > 0


def test_dataset_cli_synth_check_build(tmp_path, capsys):
    from productbg.cli import main

    assert main(["dataset", "synth", str(tmp_path / "s"), "--categories", "3", "--per-category", "2",
                 "--held-out", "1", "--size", "16", "--names", "鞋,包,杯"]) == 0
    assert main(["dataset", "check", str(tmp_path / "s")]) == 0
    assert "6 entries, 3 categories" in capsys.readouterr().out
    layout.mask_path(tmp_path / "s", "bg60k", "1.png").unlink()
    assert main(["dataset", "check", str(tmp_path / "s")]) == 2
    assert "1 missing mask (e.g. 1.png)" in capsys.readouterr().err
    src = _user_folder(tmp_path / "src")
    assert main(["dataset", "build", str(src), str(tmp_path / "b"), "--alpha-only"]) == 0
    assert "6 written" in capsys.readouterr().out


def test_build_uses_the_pack_segmentation_for_opaque_photos(tmp_path):
    """Without alpha, the default ('auto') build segments a product on a plain backdrop instead of skipping it."""
    pytest.importorskip("productbg.imaging.segment")
    src = _user_folder(tmp_path / "src")
    report = build_from_folder(src, tmp_path / "out")
    assert report.mask_sources == {"alpha": 6, "segmentation": 1}
    index = open_bg60k(tmp_path / "out")
    masks = [np.asarray(Image.open(r.mask)) for r in index.records]
    assert len(masks) == 7 and all(m[10, 10] == 255 and m[0, 0] == 0 for m in masks)


def test_build_skips_a_source_too_small_to_segment(tmp_path, capsys):
    """A 1×1 photo among good ones is skipped with its reason; the build goes on and exits 0 (it used to abort
    after writing some images)."""
    from productbg.cli import main

    pytest.importorskip("productbg.imaging.segment")
    src = _user_folder(tmp_path / "src")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(src / "鞋子" / "z_dot.png")   # after some are written
    assert main(["dataset", "build", str(src), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "7 written" in printed and "cannot segment it: image is too small (1x1 px)" in printed
    report = json.loads((tmp_path / "out" / "build_report.json").read_text(encoding="utf-8"))
    assert [why for path, why in report["skipped"] if path.endswith("z_dot.png")] == [
        "cannot segment it: image is too small (1x1 px)"]
