"""productbg eval on hand-made fixtures whose metric values are known."""
import json
import math
import sys
import types

import numpy as np
import pytest
import torch

from productbg.pipeline.errors import PipelineError
from productbg.pipeline.evaluate import ColourHistogram, category_consistency, collect_items, evaluate
from productbg.pipeline.fid import compute_fid
from productbg.pipeline.image_files import load_rgb
from productbg.fileio.png import save_png

S = 128
LO, HI = 32, 96


def _square(background, product=(0.9, 0.1, 0.1), box=(LO, HI, LO, HI)):
    img = np.empty((S, S, 3), np.float32)
    img[:] = background
    y0, y1, x0, x1 = box
    img[y0:y1, x0:x1] = product
    return img


@pytest.fixture
def fixture_set(tmp_path):
    """placed = red square on white; images with new backgrounds, one grown to the right by 3 px (inside GrabCut's
    decision band of 3 % of the canvas)."""
    mask = np.zeros((S, S), np.float32)
    mask[LO:HI, LO:HI] = 1
    placed = _square((1, 1, 1))
    raw = placed.copy()
    raw[LO:HI, LO:HI, 1] += 0.1                              # green +0.1 inside the product: MSE 0.01/3
    grown = _square((0.1, 0.6, 0.2), box=(LO, HI, LO, HI + 3))  # the product "expanded" by 3 columns
    files = {"mask.png": mask, "placed.png": placed, "raw.png": raw, "clean.png": _square((0.1, 0.6, 0.2)),
             "grown.png": grown, "ref_green.png": _square((0.1, 0.6, 0.2), product=(0.2, 0.2, 0.8)),
             "ref_blue.png": _square((0.1, 0.2, 0.9), product=(0.9, 0.9, 0.1))}
    for name, arr in files.items():
        save_png(arr, tmp_path / name)
    rows = [{"image": "clean.png", "mask": "mask.png", "placed": "placed.png", "raw": "raw.png",
             "category": "a", "reference": "ref_green.png"},
            {"image": "grown.png", "mask": "mask.png", "placed": "placed.png", "category": "a",
             "reference": "ref_blue.png"}]
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return tmp_path


def test_preservation_metrics_known_values(fixture_set):
    """PSNR before paste-back is 10·log10(3/0.01); after, identical product → inf and ΔE 0; expansion 3/64."""
    report = evaluate(collect_items(fixture_set / "results.jsonl"))
    clean, grown = report["items"]
    quantised = (round(0.1 * 255 + 0.5) - 0.5) / 255         # 8-bit PNG of 0.1 (0.1·255 = 25.5 rounds up)
    assert clean["psnr_before_db"] == pytest.approx(10 * math.log10(3 / quantised ** 2), abs=0.3)
    assert clean["psnr_after_db"] == math.inf and clean["delta_e_after"] == 0.0
    assert clean["delta_e_before"] > 1.0
    assert clean["expansion"] == pytest.approx(0.0, abs=0.01)
    assert grown["expansion"] == pytest.approx(3 / 64, abs=0.005)
    assert grown["psnr_before_db"] is None                   # no raw image given for it
    assert report["summary"]["psnr_after_db"]["mean"] == math.inf


def test_style_similarity_ranks_matching_reference_higher(fixture_set):
    """The image whose background matches its reference scores ~1; a mismatched reference scores lower."""
    report = evaluate(collect_items(fixture_set / "results.jsonl"), ColourHistogram())
    clean, grown = report["items"]
    assert clean["style_similarity"] == pytest.approx(1.0, abs=0.01)
    assert grown["style_similarity"] < 0.1


def test_category_consistency():
    """Distinct backgrounds per category → accuracy 1; swapped labels → 0; too few categories → skipped."""
    a1, a2, b1, b2 = (np.array(v, float) / np.linalg.norm(v) for v in ([1, 0.1], [1, 0.2], [0.1, 1], [0.2, 1]))
    ok = category_consistency([a1, a2, b1, b2], ["a", "a", "b", "b"])
    assert ok["accuracy"] == 1.0 and ok["mean_cosine_within"] > ok["mean_cosine_between"]
    assert category_consistency([a1, b1, a2, b2], ["a", "a", "b", "b"])["accuracy"] == 0.0
    assert category_consistency([a1, a2, b1], ["a", "a", "b"])["status"] == "skipped"


def test_results_folder_items(tmp_path):
    """A folder of batch items yields one eval item per image; an unfinished item is an item that failed."""
    from productbg.fileio.jsonfile import write_json

    item = tmp_path / "x"
    for name in ("image_0.png", "image_1.png", "raw_0.png", "raw_1.png", "placed.png", "mask.png"):
        save_png(np.zeros((8, 8, 3), np.float32), item / name)
    write_json({"images": ["image_0.png", "image_1.png"], "raw": ["raw_0.png", "raw_1.png"], "placed": "placed.png",
                "mask": "mask.png", "category": "shoes", "reference": None}, item / "result.json")
    save_png(np.zeros((8, 8, 3), np.float32), tmp_path / "unfinished" / "image_0.png")
    items = collect_items(tmp_path)
    assert [i.name for i in items] == ["x/image_0.png", "x/image_1.png", "unfinished"]
    assert items[1].raw.name == "raw_1.png" and items[0].category == "shoes"
    assert items[0].error is None and "no result.json" in items[2].error
    with pytest.raises(PipelineError, match="no finished results"):
        collect_items(tmp_path / "unfinished")


def test_fid_skipped_without_library_or_weights(tmp_path, monkeypatch):
    """FID needs real images, a library and its weights on disk; each missing piece is named."""
    images = [tmp_path / f"{i}.png" for i in range(3)]
    for p in images:
        save_png(np.random.rand(16, 16, 3).astype(np.float32), p)
    assert "--fid-real" in compute_fid(images, None)["reason"]
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)
    result = compute_fid(images, tmp_path)
    assert result["status"] == "skipped" and "never downloaded" in result["reason"]


def test_fid_with_a_local_backend(tmp_path, monkeypatch):
    """With a (stand-in) pytorch-fid whose weights file is in torch hub's folder, FID is computed; without the
    file it is skipped and the path is named."""
    from productbg.pipeline.fid import frechet_distance

    inception = types.ModuleType("pytorch_fid.inception")
    inception.FID_WEIGHTS_URL = "https://example.invalid/pt_inception-test.pth"

    class InceptionV3(torch.nn.Module):
        BLOCK_INDEX_BY_DIM = {2048: 3}

        def __init__(self, blocks):
            super().__init__()

        def forward(self, x):
            return [x.mean(dim=(2, 3))[:, :, None, None]]

    inception.InceptionV3 = InceptionV3
    score = types.ModuleType("pytorch_fid.fid_score")
    score.calculate_frechet_distance = frechet_distance
    monkeypatch.setitem(sys.modules, "pytorch_fid", types.ModuleType("pytorch_fid"))
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", inception)
    monkeypatch.setitem(sys.modules, "pytorch_fid.fid_score", score)
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    real, fake = tmp_path / "real", tmp_path / "fake"
    rng = np.random.default_rng(0)
    for i in range(4):
        save_png(rng.random((16, 16, 3)).astype(np.float32) * 0.5, real / f"{i}.png")
        save_png(rng.random((16, 16, 3)).astype(np.float32) * 0.5 + 0.5, fake / f"{i}.png")
    fakes = sorted(fake.glob("*.png"))
    missing = compute_fid(fakes, real)
    assert missing["status"] == "skipped" and "pt_inception-test.pth" in missing["reason"]
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / "pt_inception-test.pth").write_bytes(b"")
    result = compute_fid(fakes, real)
    assert result["status"] == "ok" and result["library"] == "pytorch-fid" and result["value"] > 0.1
    assert compute_fid(sorted(real.glob("*.png")), real)["value"] == pytest.approx(0.0, abs=1e-6)


def test_an_export_is_evaluated_at_its_generation_size(fixture_set):
    """An image that is its canvas delivered larger (an --export) is area-resized to mask.png's size and measured
    there; an image of another aspect is a failed item, and the others are still evaluated."""
    clean = load_rgb(fixture_set / "clean.png")
    save_png(clean.repeat(4, 0).repeat(4, 1), fixture_set / "export.png")        # 512² of the 128² canvas
    save_png(clean.repeat(4, 0).repeat(3, 1), fixture_set / "stretched.png")     # another aspect
    rows = [{"image": name, "mask": "mask.png", "placed": "placed.png", "raw": "raw.png"}
            for name in ("export.png", "stretched.png")]
    (fixture_set / "exports.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report = evaluate(collect_items(fixture_set / "exports.jsonl"))
    [item] = report["items"]
    assert item["size"] == [S, S] and item["psnr_after_db"] == math.inf and item["delta_e_after"] == 0.0
    assert report["failed"][0]["name"] == "stretched.png"
    assert "is 384×512 but mask.png is 128×128: not the same picture" in report["failed"][0]["reason"]


def test_bad_manifest_rows_fail_alone(fixture_set):
    """A missing file, a folder, a row without an image and a line that is not a JSON object fail their own row,
    each with its reason; the good row is evaluated."""
    (fixture_set / "folder.png").mkdir()
    rows = [json.dumps({"image": "clean.png", "mask": "mask.png", "placed": "placed.png"}),
            json.dumps({"image": "gone.png"}), json.dumps({"image": "folder.png"}), json.dumps({"image": 5}),
            "[1, 2]", "{not json"]
    (fixture_set / "bad.jsonl").write_text("\n".join(rows) + "\n")
    report = evaluate(collect_items(fixture_set / "bad.jsonl"))
    reasons = [f"{f['name']}: {f['reason']}" for f in report["failed"]]
    assert report["images"] == 1 and len(reasons) == 5
    assert "gone.png: bad.jsonl line 2: image" in reasons[0] and reasons[0].endswith("gone.png: no such file")
    assert reasons[1].endswith("folder.png: is a folder, not a file")
    assert reasons[2] == "bad.jsonl line 4: no 'image' (a path)"
    assert reasons[3] == "bad.jsonl line 5: each line must be a JSON object"
    assert reasons[4].startswith("bad.jsonl line 6: not valid JSON")


def test_results_folder_lists_unfinished_items_and_failed_batch_rows(tmp_path):
    """A results folder's unfinished item (result.json naming a missing file) and the rows its batch summary lists
    as failed are items that failed; the finished item is evaluated."""
    from productbg.fileio.jsonfile import write_json

    for name in ("done", "partial"):
        for f in ("image_0.png", "raw_0.png", "placed.png", "mask.png"):
            save_png(np.zeros((8, 8, 3), np.float32), tmp_path / name / f)
        write_json({"images": ["image_0.png"], "raw": ["raw_0.png"], "placed": "placed.png", "mask": "mask.png"},
                   tmp_path / name / "result.json")
    (tmp_path / "partial" / "raw_0.png").unlink()
    write_json({"done": 1, "failed": [{"line": 3, "name": "gone-s2", "product": "gone.png",
                                       "reason": "product image gone.png: no such file"}]}, tmp_path / "summary.json")
    report = evaluate(collect_items(tmp_path))
    failed = {f["name"]: f["reason"] for f in report["failed"]}
    assert report["images"] == 1 and set(failed) == {"partial", "gone-s2"}
    assert "result.json names missing files (raw_0.png)" in failed["partial"]
    assert failed["gone-s2"] == ("not generated: the batch failed its manifest line 3 (product image gone.png: no "
                                 "such file)")
