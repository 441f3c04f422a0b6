"""``productbg bank list | rename | remove | merge`` (issue 25 part 4): every output read back with the exact
vectors; a merge conflict exits non-zero and writes nothing; families are never mixed."""
import json

import pytest
import torch

from productbg.cli import main
from productbg.weights.bank import CategoryBank, CategoryLora, load_bank
from productbg.weights.safefile import SafeReader
from weight_samples import example_bank

NAMES = ("运动鞋", "Coffee Mug", "shoes")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def vectors_of(path) -> dict:
    """Every category's vectors (and LoRA) as the file holds them, read back through a fresh load."""
    with load_bank(path) as bank:
        return {n: ({e: t.clone() for e, t in bank.get(n).vectors.items()}, bank.get(n).lora) for n in bank.names}


def assert_same(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name, (vecs, lora) in want.items():
        assert got[name][1] == lora, name
        for enc, t in vecs.items():
            assert torch.equal(got[name][0][enc].double(), t.double()), (name, enc)


@pytest.fixture
def bank_a(tmp_path):
    path = tmp_path / "a.safetensors"
    example_bank(NAMES, vectors_per_id=2, seed=1).save(path)
    return path


@pytest.fixture
def bank_b(tmp_path):
    """Other categories, 3 vectors each, one of them also in bank A (with other vectors)."""
    path = tmp_path / "b.safetensors"
    bank = example_bank(("lamp", "shoes", "Ножницы"), vectors_per_id=3, seed=2)
    bank.set_lora("lamp", None)
    bank.save(path)
    return path


# ---------------------------------------------------------------------- list
def test_list_json_reads_only_the_header(capsys, bank_a, monkeypatch):
    """The JSON lists every category with its vector count and LoRA; no tensor byte is read."""
    def refuse(*a, **k):
        raise AssertionError("bank list read tensor data")

    monkeypatch.setattr(SafeReader, "rows", refuse)
    monkeypatch.setattr(SafeReader, "tensor", refuse)
    code, out, err = run(capsys, "bank", "list", bank_a, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["family"] == "sd15" and info["width"] == 768 and info["vectors_per_id"] == 2 and info["count"] == 3
    assert info["template"] == "a product photo on a {id} background" and info["dtype"] == "float32"
    assert [c["name"] for c in info["categories"]] == list(NAMES)
    assert info["categories"][0]["lora"] == {"file": "cat0.safetensors", "strength": 0.8}
    assert [c["lora"] for c in info["categories"][1:]] == [None, None]
    assert all(c["vectors"] == 2 and c["preview"] is False for c in info["categories"])


def test_list_text_one_line_per_category(capsys, bank_a):
    code, out, _ = run(capsys, "bank", "list", bank_a)
    lines = out.splitlines()
    assert code == 0 and "sd15 bank, 3 categories" in lines[0]
    assert lines[1:] == ["运动鞋\t2 vectors\tlora cat0.safetensors x0.8", "Coffee Mug\t2 vectors", "shoes\t2 vectors"]


@pytest.mark.parametrize("content, match", [(b"", "too short"), (b"\x10\x00\x00\x00\x00\x00\x00\x00{}", "truncated")])
def test_list_bad_files_are_one_line_errors(capsys, tmp_path, content, match):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    code, out, err = run(capsys, "bank", "list", path)
    assert code == 2 and out == "" and match in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------- rename / remove
def test_rename_in_place_keeps_every_vector_and_the_lora(capsys, bank_a):
    before = vectors_of(bank_a)
    code, out, err = run(capsys, "bank", "rename", bank_a, "运动鞋", "跑鞋")
    assert code == 0, err
    after = vectors_of(bank_a)
    assert list(after) == ["跑鞋", "Coffee Mug", "shoes"]
    assert_same(after, {("跑鞋" if n == "运动鞋" else n): v for n, v in before.items()})


def test_rename_to_out_leaves_the_input_as_it_was(capsys, bank_a, tmp_path):
    data = bank_a.read_bytes()
    code, _, err = run(capsys, "bank", "rename", bank_a, "coffee mug", "Mug", "--out", tmp_path / "r.safetensors")
    assert code == 0, err
    assert bank_a.read_bytes() == data
    assert list(vectors_of(tmp_path / "r.safetensors")) == ["运动鞋", "Mug", "shoes"]


@pytest.mark.parametrize("old, new, match", [("nope", "x", "no category 'nope'"),
                                             ("shoes", "Coffee Mug", "already exists"),
                                             ("shoes", " ", "must not be empty")])
def test_rename_errors_write_nothing(capsys, bank_a, old, new, match):
    data = bank_a.read_bytes()
    code, _, err = run(capsys, "bank", "rename", bank_a, old, new)
    assert code == 2 and match in err and bank_a.read_bytes() == data


def test_remove_several_keeps_the_others_exactly(capsys, bank_a):
    before = vectors_of(bank_a)
    code, out, err = run(capsys, "bank", "remove", bank_a, "SHOES", "运动鞋")
    assert code == 0, err
    assert_same(vectors_of(bank_a), {"Coffee Mug": before["Coffee Mug"]})


def test_remove_an_unknown_name_writes_nothing(capsys, bank_a):
    data = bank_a.read_bytes()
    code, _, err = run(capsys, "bank", "remove", bank_a, "shoes", "shose")
    assert code == 2 and "did you mean 'shoes'" in err and bank_a.read_bytes() == data


def test_remove_from_a_varied_count_bank_keeps_counts(capsys, tmp_path):
    bank = CategoryBank("sd15", vectors_per_id=4, varied_counts=True)
    gen = torch.Generator().manual_seed(0)
    for name, n in (("a", 1), ("b", 4), ("c", 2)):
        bank.add(name, torch.randn(n, 768, generator=gen))
    want = {n: ({"clip_l": bank.vectors(n).clone()}, None) for n in ("a", "c")}
    path = bank.save(tmp_path / "v.safetensors")
    code, _, err = run(capsys, "bank", "remove", path, "b")
    assert code == 0, err
    assert_same(vectors_of(path), want)
    with load_bank(path) as back:
        assert back.vector_counts() == [1, 2]


# ---------------------------------------------------------------------- merge
def test_merge_keeps_every_vector_exactly_across_vector_counts(capsys, bank_a, bank_b, tmp_path):
    """vpi 2 + vpi 3 -> a varied-count bank with vpi 3; identical duplicates merge silently."""
    a, b = vectors_of(bank_a), vectors_of(bank_b)
    out_path = tmp_path / "m.safetensors"
    code, out, err = run(capsys, "bank", "merge", bank_a, bank_b, bank_a, "--out", out_path, "--on-conflict", "keep")
    assert code == 0, err
    assert "kept a.safetensors's" in out and "3 identical duplicates" in out
    merged = vectors_of(out_path)
    assert_same(merged, {**a, "lamp": b["lamp"], "Ножницы": b["Ножницы"]})
    with load_bank(out_path) as m:
        assert m.vectors_per_id == 3 and m.vector_counts() == [2, 2, 2, 3, 3]


def test_merge_replace_takes_the_last_banks_category(capsys, bank_a, bank_b, tmp_path):
    b = vectors_of(bank_b)
    code, out, err = run(capsys, "bank", "merge", bank_a, bank_b, "--out", tmp_path / "m.safetensors",
                         "--on-conflict", "replace")
    assert code == 0, err
    assert_same({"shoes": vectors_of(tmp_path / "m.safetensors")["shoes"]}, {"shoes": b["shoes"]})


def test_merge_conflict_exits_1_and_writes_nothing(capsys, bank_a, bank_b, tmp_path):
    out_path = tmp_path / "m.safetensors"
    code, out, err = run(capsys, "bank", "merge", bank_a, bank_b, "--out", out_path)
    assert code == 1 and not out_path.exists() and out == ""
    assert "conflict: 'shoes' (a.safetensors) and 'shoes' (b.safetensors) have different vectors" in err
    assert "nothing written" in err
    existing = tmp_path / "old.safetensors"
    existing.write_bytes(bank_a.read_bytes())          # an existing --out (with --force) stays as it was
    code, _, _ = run(capsys, "bank", "merge", bank_a, bank_b, "--out", existing, "--force")
    assert code == 1 and existing.read_bytes() == bank_a.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "old.safetensors"]


def test_merge_conflicts_in_letter_case_lora_and_template(capsys, tmp_path):
    a = example_bank(("Shoes", "mug"), seed=3)
    b = example_bank(("shoes",), seed=3)                 # same vectors as a's first row, other case
    c = example_bank(("mug",), seed=4)
    for bank, name in ((a, "a"), (b, "b"), (c, "c")):
        bank.save(tmp_path / f"{name}.safetensors")
    code, _, err = run(capsys, "bank", "merge", tmp_path / "a.safetensors", tmp_path / "b.safetensors",
                       tmp_path / "c.safetensors", "--out", tmp_path / "m.safetensors")
    assert code == 1 and "'Shoes' (a.safetensors) and 'shoes' (b.safetensors) differ only in letter case" in err
    assert "'mug' (a.safetensors) and 'mug' (c.safetensors) have different vectors" in err
    lora = example_bank(("mug",), seed=0)
    lora.set_lora("mug", CategoryLora("other.safetensors", 1.0))
    lora.save(tmp_path / "l.safetensors")
    plain = example_bank(("mug",), seed=0)
    plain.template = "studio, {id}"
    plain.save(tmp_path / "p.safetensors")
    code, _, err = run(capsys, "bank", "merge", tmp_path / "l.safetensors", tmp_path / "p.safetensors",
                       "--out", tmp_path / "m.safetensors")
    assert code == 1 and "templates differ" in err and not (tmp_path / "m.safetensors").exists()
    code, _, err = run(capsys, "bank", "merge", tmp_path / "l.safetensors", tmp_path / "p.safetensors",
                       "--out", tmp_path / "m.safetensors", "--template", "studio, {id}")
    assert code == 1 and "have different LoRA" in err and not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("other, match", [
    (lambda: example_bank(("x",), family="sdxl"), "sdxl bank"),
    (lambda: example_bank(("x",), width=64), "tiny bank"),
])
def test_merge_never_mixes_families(capsys, bank_a, tmp_path, other, match):
    other().save(tmp_path / "o.safetensors")
    code, _, err = run(capsys, "bank", "merge", bank_a, tmp_path / "o.safetensors", "--out", tmp_path / "m.safetensors")
    assert code == 2 and match in err and "never mixed" in err and not (tmp_path / "m.safetensors").exists()


def test_merge_tiny_banks_of_other_widths_is_refused(capsys, tmp_path):
    example_bank(("a",), width=32).save(tmp_path / "a.safetensors")
    example_bank(("b",), width=64).save(tmp_path / "b.safetensors")
    code, _, err = run(capsys, "bank", "merge", tmp_path / "a.safetensors", tmp_path / "b.safetensors",
                       "--out", tmp_path / "m.safetensors")
    assert code == 2 and "width 64" in err and not (tmp_path / "m.safetensors").exists()


def test_merge_sdxl_and_mixed_dtypes_exact(capsys, tmp_path):
    """clip_l and clip_g vectors survive; float16 + bfloat16 merge into float32, which holds both exactly."""
    a = example_bank(("运动鞋", "mug"), family="sdxl", dtype=torch.float16, seed=5)
    b = example_bank(("lamp",), family="sdxl", dtype=torch.bfloat16, seed=6)
    a.save(tmp_path / "a.safetensors")
    b.save(tmp_path / "b.safetensors")
    want = {**vectors_of(tmp_path / "a.safetensors"), **vectors_of(tmp_path / "b.safetensors")}
    code, _, err = run(capsys, "bank", "merge", tmp_path / "a.safetensors", tmp_path / "b.safetensors",
                       "--out", tmp_path / "m.safetensors")
    assert code == 0, err
    assert_same(vectors_of(tmp_path / "m.safetensors"), want)
    with load_bank(tmp_path / "m.safetensors") as m:
        assert m.dtype == torch.float32 and m.encoders == ("clip_l", "clip_g")


def test_merge_needs_two_banks_and_refuses_existing_out(capsys, bank_a, bank_b, tmp_path):
    code, _, err = run(capsys, "bank", "merge", bank_a, "--out", tmp_path / "m.safetensors")
    assert code == 2 and "at least two banks" in err
    code, _, err = run(capsys, "bank", "merge", bank_a, bank_b, "--out", bank_a, "--on-conflict", "keep")
    assert code == 2 and "--force" in err


# ---------------------------------------------------------------------- previews travel with their category
def _png(colour) -> "object":
    from PIL import Image

    return Image.new("RGB", (300, 200), colour)


def test_preview_set_list_rename_remove_merge(capsys, bank_a, bank_b, tmp_path):
    from productbg.weights.bank_previews import preview_names, previews_dir, read_preview

    image = tmp_path / "red.png"
    _png((200, 10, 10)).save(image)
    code, _, err = run(capsys, "bank", "preview", bank_a, "运动鞋", image)
    assert code == 0, err
    red = read_preview(bank_a, "运动鞋")
    from PIL import Image
    import io

    assert Image.open(io.BytesIO(red)).size == (128, 85)           # shrunk to fit 128 px
    code, out, _ = run(capsys, "bank", "list", bank_a, "--json")
    assert [c["preview"] for c in json.loads(out)["categories"]] == [True, False, False]
    assert "运动鞋\t2 vectors\tlora cat0.safetensors x0.8\tpreview" in run(capsys, "bank", "list", bank_a)[1]

    code, _, err = run(capsys, "bank", "rename", bank_a, "运动鞋", "跑鞋")
    assert code == 0, err
    assert read_preview(bank_a, "跑鞋") == red and read_preview(bank_a, "运动鞋") is None

    code, _, err = run(capsys, "bank", "merge", bank_a, bank_b, "--out", tmp_path / "m.safetensors",
                       "--on-conflict", "keep")
    assert code == 0, err
    assert read_preview(tmp_path / "m.safetensors", "跑鞋") == red and len(preview_names(tmp_path / "m.safetensors")) == 1

    code, _, err = run(capsys, "bank", "remove", bank_a, "跑鞋")
    assert code == 0, err
    assert read_preview(bank_a, "跑鞋") is None and not previews_dir(bank_a).exists()


def test_merge_conflict_on_preview_alone(capsys, tmp_path):
    from productbg.weights.bank_previews import write_preview

    for name, colour in (("a", (0, 0, 255)), ("b", (0, 255, 0))):
        example_bank(("mug",), seed=0).save(tmp_path / f"{name}.safetensors")
        write_preview(tmp_path / f"{name}.safetensors", "mug", _png(colour))
    code, _, err = run(capsys, "bank", "merge", tmp_path / "a.safetensors", tmp_path / "b.safetensors",
                       "--out", tmp_path / "m.safetensors")
    assert code == 1 and "have different preview" in err and not (tmp_path / "m.safetensors").exists()
    assert not (tmp_path / "m.previews").exists()


def test_preview_errors(capsys, bank_a, tmp_path):
    code, _, err = run(capsys, "bank", "preview", bank_a, "nope", tmp_path / "x.png")
    assert code == 2 and "no category 'nope'" in err
    (tmp_path / "bad.png").write_bytes(b"not an image")
    code, _, err = run(capsys, "bank", "preview", bank_a, "shoes", tmp_path / "bad.png")
    assert code == 2 and "bad.png" in err
    code, _, err = run(capsys, "bank", "preview", bank_a, "shoes")
    assert code == 2 and "--remove" in err
