"""The category bank: file format, lazy loading, lookup, editing, merging and atomic saving."""
import json
import os
import unicodedata

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from productbg.weights.bank import (DEFAULT_TEMPLATE, CategoryBank, CategoryLora, load_bank)
from productbg.weights.errors import FormatMismatchError, MalformedFileError, NameLookupError, WeightsError
from productbg.weights.safefile import SafeReader
from weight_samples import EXAMPLE_NAMES, example_bank


@pytest.fixture
def bank_path(tmp_path):
    path = tmp_path / "bank.safetensors"
    example_bank().save(path)
    return path


def bank_meta(names, vpi=2, **extra) -> dict:
    meta = {"productbg.kind": "category_bank", "productbg.schema": "1", "productbg.family": "sd15",
            "productbg.categories": json.dumps(names, ensure_ascii=False), "productbg.vectors_per_id": str(vpi),
            "productbg.template": DEFAULT_TEMPLATE}
    meta.update(extra)
    return {k: v for k, v in meta.items() if v is not None}


def write_bank(path, names, tensors=None, **meta):
    tensors = tensors if tensors is not None else {"clip_l": torch.zeros(len(names), 2, 768)}
    save_file(tensors, str(path), bank_meta(names, **meta))
    return path


# ---------------------------------------------------------------------- format
def test_file_layout(bank_path):
    """One clip_l tensor [categories, vectors, 768]; names, template, family, LoRAs, training in metadata."""
    with safe_open(str(bank_path), "pt") as f:
        assert list(f.keys()) == ["clip_l"]
        assert list(f.get_slice("clip_l").get_shape()) == [len(EXAMPLE_NAMES), 2, 768]
        meta = f.metadata()
    assert meta["productbg.kind"] == "category_bank" and meta["productbg.schema"] == "1"
    assert meta["productbg.family"] == "sd15" and meta["productbg.vectors_per_id"] == "2"
    assert json.loads(meta["productbg.categories"]) == list(EXAMPLE_NAMES)
    assert "运动鞋" in meta["productbg.categories"]  # stored as UTF-8, not \\u escapes
    assert meta["productbg.template"] == "a product photo on a {id} background"
    assert json.loads(meta["productbg.loras"]) == {"运动鞋": {"file": "cat0.safetensors", "strength": 0.8}}
    assert json.loads(meta["productbg.training"])["dataset"] == "example"


def test_roundtrip_values(tmp_path):
    """Vectors, LoRA entries, template and training come back exactly."""
    bank = example_bank(seed=3)
    bank.template = "studio shot, {id} backdrop"
    expected = {n: bank.get(n).vectors["clip_l"].clone() for n in bank.names}
    bank.save(tmp_path / "b.safetensors")
    with load_bank(tmp_path / "b.safetensors") as loaded:
        assert loaded.names == list(EXAMPLE_NAMES)
        for name, vec in expected.items():
            assert torch.equal(loaded.get(name).vectors["clip_l"], vec)
        assert loaded.get("运动鞋").lora == CategoryLora("cat0.safetensors", 0.8)
        assert loaded.get("手提包").lora is None
        assert loaded.template == "studio shot, {id} backdrop" and loaded.training["steps"] == 0


def test_fp16_bank_keeps_dtype(tmp_path):
    bank = example_bank(dtype=torch.float16)
    bank.save(tmp_path / "b.safetensors")
    with load_bank(tmp_path / "b.safetensors") as loaded:
        assert loaded.dtype == torch.float16
        assert loaded.vectors("运动鞋").dtype == torch.float16


def test_sdxl_bank_has_room_for_clip_g(tmp_path):
    """An sdxl bank stores clip_l [.., 768] and clip_g [.., 1280] in the same file type."""
    bank = CategoryBank(family="sdxl", vectors_per_id=1)
    bank.add("mug", {"clip_l": torch.ones(1, 768), "clip_g": torch.full((1, 1280), 2.0)})
    bank.save(tmp_path / "xl.safetensors")
    with load_bank(tmp_path / "xl.safetensors") as loaded:
        assert loaded.encoders == ("clip_l", "clip_g")
        cat = loaded.get("mug")
        assert cat.vectors["clip_g"].shape == (1, 1280) and float(cat.vectors["clip_g"][0, 0]) == 2.0
    with pytest.raises(WeightsError, match="pass a dict"):
        bank.add("cup", torch.ones(1, 768))


def test_empty_bank_roundtrip(tmp_path):
    CategoryBank().save(tmp_path / "e.safetensors")
    with load_bank(tmp_path / "e.safetensors") as loaded:
        assert len(loaded) == 0 and loaded.tensors()["clip_l"].shape == (0, 1, 768)


# ---------------------------------------------------------------------- tiny family (any width)
@pytest.mark.parametrize("width", [32, 64])
def test_tiny_bank_roundtrip(tmp_path, width):
    """A "tiny" bank records its width in the metadata; vectors, LoRA, template, lookup all come back."""
    bank = example_bank(["运动鞋", "Coffee Mug"], vectors_per_id=2, seed=4, width=width)
    assert bank.family == "tiny" and bank.width == width
    expected = bank.tensors()["clip_l"].clone()
    bank.save(tmp_path / "t.safetensors")
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        meta = f.metadata()
        assert list(f.get_slice("clip_l").get_shape()) == [2, 2, width]
    assert meta["productbg.family"] == "tiny" and meta["productbg.width"] == str(width)
    with load_bank(tmp_path / "t.safetensors") as loaded:
        assert loaded.family == "tiny" and loaded.width == width and loaded.names == ["运动鞋", "Coffee Mug"]
        assert torch.equal(loaded.vectors("coffee mug"), expected[1])
        assert loaded.get("运动鞋").lora == CategoryLora("cat0.safetensors", 0.8)
        assert f"tiny width {width}" in repr(loaded)
        with pytest.raises(NameLookupError, match="did you mean 'Coffee Mug'"):
            loaded.get("cofee mug")
        loaded.add("新品", torch.ones(2, width))
        loaded.save(tmp_path / "t.safetensors")                      # over its own file
    with load_bank(tmp_path / "t.safetensors") as again:
        assert again.width == width and again.names[-1] == "新品"


def test_tiny_bank_width_is_fixed_by_constructor_or_first_add(tmp_path):
    bank = CategoryBank("tiny", vectors_per_id=2)
    assert bank.width is None
    with pytest.raises(WeightsError, match="no width yet"):
        bank.save(tmp_path / "empty.safetensors")
    assert not (tmp_path / "empty.safetensors").exists()
    with pytest.raises(WeightsError, match=r"shape \[2, width\]"):
        bank.add("a", torch.zeros(3, 32))
    assert bank.width is None                                         # a refused add fixes nothing
    bank.add("a", torch.zeros(2, 32))
    assert bank.width == 32
    with pytest.raises(WeightsError, match=r"shape \[2, 32\] \(this tiny bank's width is 32\)"):
        bank.add("b", torch.zeros(2, 64))
    with pytest.raises(WeightsError, match=r"\[2, 32\]"):
        bank.add("a", torch.zeros(2, 64), replace=True)
    assert len(bank) == 1
    given = CategoryBank("tiny", vectors_per_id=1, width=64)
    with pytest.raises(WeightsError, match="width is 64"):
        given.add("a", torch.zeros(1, 32))
    given.save(tmp_path / "e.safetensors")                            # empty, but its width is known
    with load_bank(tmp_path / "e.safetensors") as loaded:
        assert len(loaded) == 0 and loaded.width == 64 and loaded.tensors()["clip_l"].shape == (0, 1, 64)


@pytest.mark.parametrize("kwargs, match", [
    ({"family": "sd15", "width": 32}, "sd15 banks have width 768, not 32.*'tiny'"),
    ({"family": "sdxl", "width": 1280}, "sdxl banks have width 768"),
    ({"family": "tiny", "width": 0}, "1..16384"),
    ({"family": "tiny", "width": 32.0}, "integer"),
    ({"family": "tiny", "width": True}, "integer"),
])
def test_bad_widths(kwargs, match):
    with pytest.raises(WeightsError, match=match):
        CategoryBank(**kwargs)


def test_sd15_bank_takes_width_768_and_writes_no_width_key(tmp_path):
    """sd15 files stay as they were: no productbg.width."""
    bank = CategoryBank("sd15", width=768)
    bank.add("a", torch.zeros(1, 768))
    assert bank.width == 768
    bank.save(tmp_path / "s.safetensors")
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        assert "productbg.width" not in f.metadata()


def test_merge_refuses_other_widths_and_families():
    a = example_bank(["a"], width=32)
    with pytest.raises(WeightsError, match="cannot merge a tiny bank of width 64 into a tiny bank of width 32"):
        a.merge(example_bank(["b"], width=64))
    with pytest.raises(WeightsError, match="cannot merge a sd15 bank"):
        a.merge(example_bank(["c"]))
    assert a.names == ["a"]
    merged = a.merge(example_bank(["b"], width=32, seed=1))
    assert merged.names == ["a", "b"] and merged.width == 32
    adopted = CategoryBank("tiny", vectors_per_id=2).merge(example_bank(["x"], width=64))  # no width yet: adopts
    assert adopted.width == 64 and adopted.vectors("x").shape == (2, 64)


def test_tiny_file_without_width_key_loads(tmp_path):
    """Banks written before the bank recorded widths (family "tiny", no productbg.width) take it from the tensor."""
    data = torch.randn(2, 3, 32)
    meta = bank_meta(["a", "b"], vpi=3, **{"productbg.family": "tiny",
                                           "productbg.training": json.dumps({"trainer": "train-cg", "steps": 2})})
    save_file({"clip_l": data}, str(tmp_path / "old.safetensors"), meta)
    with load_bank(tmp_path / "old.safetensors") as bank:
        assert bank.family == "tiny" and bank.width == 32 and bank.names == ["a", "b"]
        assert torch.equal(bank.vectors("b"), data[1]) and bank.training["steps"] == 2
        bank.save(tmp_path / "new.safetensors")                       # re-saving records the width
    with safe_open(str(tmp_path / "new.safetensors"), "pt") as f:
        assert f.metadata()["productbg.width"] == "32"


@pytest.mark.parametrize("meta, tensors, match", [
    ({"productbg.width": "64"}, {"clip_l": torch.zeros(2, 2, 32)}, r"x 64 \(metadata 'productbg.width'\)"),
    ({"productbg.width": "0"}, None, "1..16384"),
    ({"productbg.width": "wide"}, None, "small integer"),
    ({}, {"clip_l": torch.zeros(2, 2)}, r"\[categories, vectors, width\]"),
    ({}, {"clip_l": torch.zeros(3, 2, 32)}, "2 categories"),
    ({}, {"clip_l": torch.zeros(2, 2, 0)}, "width 1..16384"),
])
def test_malformed_tiny_banks(tmp_path, meta, tensors, match):
    tensors = tensors if tensors is not None else {"clip_l": torch.zeros(2, 2, 32)}
    path = write_bank(tmp_path / "b.safetensors", ["a", "b"], tensors, **{"productbg.family": "tiny", **meta})
    with pytest.raises(MalformedFileError, match=match):
        load_bank(path)


def test_sd15_file_with_other_width_key_is_malformed(tmp_path):
    path = write_bank(tmp_path / "b.safetensors", ["a", "b"], **{"productbg.width": "32"})
    with pytest.raises(MalformedFileError, match="sd15 banks have width 768"):
        load_bank(path)


# ---------------------------------------------------------------------- lazy loading
def test_load_reads_no_tensor_data(bank_path, monkeypatch):
    """Loading reads the header only; a lookup reads exactly one row."""
    calls = []
    monkeypatch.setattr(SafeReader, "tensor", lambda self, name: calls.append(("tensor", name)))
    orig_rows = SafeReader.rows
    monkeypatch.setattr(SafeReader, "rows", lambda self, n, a, b: calls.append(("rows", a, b)) or orig_rows(self, n, a, b))
    with load_bank(bank_path) as bank:
        assert calls == [] and len(bank) == len(EXAMPLE_NAMES)
        bank.get("咖啡杯")
    assert calls == [("rows", 2, 3)]


def test_nan_row_fails_only_its_lookup(tmp_path):
    """A NaN in one category's vectors raises a WeightsError at that lookup; other categories still work."""
    data = torch.zeros(3, 2, 768)
    data[1, 0, 5] = float("nan")
    path = write_bank(tmp_path / "b.safetensors", ["a", "b", "c"], {"clip_l": data})
    with load_bank(path) as bank:
        assert bank.get("a").vectors["clip_l"].shape == (2, 768)
        with pytest.raises(MalformedFileError, match="NaN"):
            bank.get("b")
        with pytest.raises(MalformedFileError, match="NaN"):
            bank.tensors()


# ---------------------------------------------------------------------- lookup
def test_exact_then_case_insensitive_lookup(bank_path):
    with load_bank(bank_path) as bank:
        assert bank.get("Running Shoes").name == "Running Shoes"
        assert bank.get("running shoes").name == "Running Shoes"
        assert bank.get("  COFFEE MUG ").name == "Coffee Mug"
        assert bank.get("运动鞋").index == 0
        assert "wool SCARF" in bank and "nothing" not in bank


def test_lookup_is_unicode_normalised(tmp_path):
    """A name typed in decomposed form (NFD) finds the stored composed (NFC) name."""
    bank = CategoryBank()
    bank.add("Café", torch.zeros(1, 768))
    assert bank.get(unicodedata.normalize("NFD", "café")).name == "Café"


def test_miss_suggests_close_names(bank_path):
    """Unknown names list close matches: typos in Latin names, partial Chinese names."""
    with load_bank(bank_path) as bank:
        with pytest.raises(NameLookupError, match=r"did you mean 'Running Shoes'") as err:
            bank.get("runing shoe")
        assert isinstance(err.value, KeyError) and isinstance(err.value, WeightsError)
        assert "bank.safetensors" in str(err.value) and "8 categories" in str(err.value)
        with pytest.raises(NameLookupError, match="did you mean '运动鞋'"):
            bank.get("运动")
        with pytest.raises(NameLookupError) as err:
            bank.get("zzzzzz")
        assert "did you mean" not in str(err.value)
        assert bank.suggest("coffee") == ["Coffee Mug"]
        with pytest.raises(NameLookupError, match="strings"):
            bank.get(3)
        assert 3 not in bank


def test_names_differing_only_in_case(tmp_path):
    """Exact match wins; an ambiguous case-insensitive query is an error naming both."""
    bank = CategoryBank()
    bank.add("Shoes", torch.zeros(1, 768))
    bank.add("shoes", torch.ones(1, 768))
    assert bank.get("Shoes").index == 0 and bank.get("shoes").index == 1
    with pytest.raises(NameLookupError, match="differ only in case.*'Shoes', 'shoes'"):
        bank.get("SHOES")


# ---------------------------------------------------------------------- editing
def test_add_validates(tmp_path):
    bank = CategoryBank(vectors_per_id=2)
    with pytest.raises(WeightsError, match=r"shape \[2, 768\]"):
        bank.add("a", torch.zeros(1, 768))
    with pytest.raises(WeightsError, match="float tensor"):
        bank.add("a", torch.zeros(2, 768, dtype=torch.int64))
    with pytest.raises(WeightsError, match="NaN"):
        bank.add("a", torch.full((2, 768), float("inf")))
    for bad in ("", "   ", " padded", "tab\tname", "x" * 300, 5):
        with pytest.raises(WeightsError):
            bank.add(bad, torch.zeros(2, 768))
    with pytest.raises(WeightsError, match="bare .safetensors"):
        bank.add("a", torch.zeros(2, 768), lora=CategoryLora("../evil.safetensors"))
    with pytest.raises(WeightsError, match="bare .safetensors"):
        bank.add("a", torch.zeros(2, 768), lora=CategoryLora("x.ckpt"))
    with pytest.raises(WeightsError, match="finite"):
        bank.add("a", torch.zeros(2, 768), lora=CategoryLora("x.safetensors", float("nan")))
    assert len(bank) == 0  # nothing half-added


def test_add_duplicate_needs_replace():
    bank = CategoryBank()
    bank.add("a", torch.zeros(1, 768))
    with pytest.raises(WeightsError, match="already exists"):
        bank.add("a", torch.ones(1, 768))
    bank.add("a", torch.ones(1, 768), replace=True)
    assert float(bank.vectors("a")[0, 0]) == 1.0 and len(bank) == 1


def test_rename_remove_set_lora(bank_path, tmp_path):
    with load_bank(bank_path) as bank:
        before = bank.vectors("运动鞋").clone()
        bank.rename("运动鞋", "跑鞋")
        assert "运动鞋" not in bank and torch.equal(bank.vectors("跑鞋"), before)
        assert bank.get("跑鞋").lora.file == "cat0.safetensors"  # the LoRA follows the rename
        with pytest.raises(WeightsError, match="already exists"):
            bank.rename("跑鞋", "Coffee Mug")
        bank.remove("coffee mug")
        assert "Coffee Mug" not in bank and len(bank) == len(EXAMPLE_NAMES) - 1
        bank.set_lora("wool scarf", CategoryLora("scarf.safetensors", 0.5))
        bank.set_lora("跑鞋", None)
        bank.save(tmp_path / "edited.safetensors")
    with load_bank(tmp_path / "edited.safetensors") as again:
        assert again.names[0] == "跑鞋" and "Coffee Mug" not in again
        assert again.loras == {"wool scarf": CategoryLora("scarf.safetensors", 0.5)}
        assert torch.equal(again.vectors("跑鞋"), before)


def test_merge(tmp_path):
    a = example_bank(["a", "b"], seed=1)
    b = example_bank(["b", "c"], seed=2)
    b.training["dataset"] = "other"
    with pytest.raises(WeightsError, match="same name"):
        a.merge(b)
    keep = example_bank(["a", "b"], seed=1).merge(b, on_conflict="keep")
    assert keep.names == ["a", "b", "c"] and torch.equal(keep.vectors("b"), a.vectors("b"))
    replace = example_bank(["a", "b"], seed=1).merge(b, on_conflict="replace")
    assert torch.equal(replace.vectors("b"), b.vectors("b")) and torch.equal(replace.vectors("c"), b.vectors("c"))
    assert replace.training["merged_from"][0]["dataset"] == "other"
    with pytest.raises(WeightsError, match="cannot merge"):
        a.merge(CategoryBank(vectors_per_id=3))


def test_merge_from_closed_file_bank(tmp_path):
    """Merged rows are read at merge time, so closing the source afterwards is fine."""
    example_bank(["x", "y"]).save(tmp_path / "src.safetensors")
    src = load_bank(tmp_path / "src.safetensors")
    dst = CategoryBank(vectors_per_id=2).merge(src)
    src.close()
    assert dst.vectors("y").shape == (2, 768)


# ---------------------------------------------------------------------- saving
def test_save_over_own_file_is_atomic(bank_path):
    """Saving a lazily loaded bank over its own file works; nothing but the bank is left in the folder."""
    with load_bank(bank_path) as bank:
        keep = bank.vectors("Leather Bag").clone()
        bank.add("新品", torch.ones(2, 768))
        bank.save(bank_path)
        assert torch.equal(bank.vectors("Leather Bag"), keep)  # still readable, now from the new file
    assert os.listdir(bank_path.parent) == ["bank.safetensors"]
    with load_bank(bank_path) as again:
        assert again.names[-1] == "新品" and torch.equal(again.vectors("Leather Bag"), keep)


# ---------------------------------------------------------------------- malformed files
@pytest.mark.parametrize("names, meta, tensors, match", [
    (["a", "a"], {}, None, "'a' appears twice"),
    (["a", ""], {}, None, "must not be empty"),
    (["a", " b"], {}, None, "leading or trailing"),
    (["a", 3], {}, None, "must be strings"),
    (["a", "b", "c"], {}, {"clip_l": torch.zeros(2, 2, 768)}, r"shape \[2, 2, 768\] but the metadata says 3 categories"),
    (["a", "b"], {"vpi": 3}, None, "3 vectors"),
    (["a", "b"], {}, {"clip_l": torch.zeros(2, 2, 1024)}, "768"),
    (["a", "b"], {}, {"clip_l": torch.zeros(2, 2, 768, dtype=torch.int32)}, "dtype I32"),
    (["a", "b"], {}, {"clip_l": torch.zeros(2, 2, 768), "extra": torch.zeros(1)}, "holds tensors"),
    (["a", "b"], {}, {"clip_g": torch.zeros(2, 2, 1280)}, "holds tensors"),
    (["a", "b"], {"productbg.template": "no placeholder"}, None, r"\{id\}"),
    (["a", "b"], {"productbg.family": "sd3"}, None, "unknown base family"),
    (["a", "b"], {"productbg.vectors_per_id": "two"}, None, "small integer"),
    (["a", "b"], {"productbg.vectors_per_id": "0"}, None, "1..75"),
    (["a", "b"], {"productbg.schema": None}, None, "schema version missing"),
    (["a", "b"], {"productbg.categories": "[\"a\", "}, None, "not valid JSON"),
    (["a", "b"], {"productbg.categories": "{\"a\": 1}"}, None, "JSON list"),
    (["a", "b"], {"productbg.loras": '{"zzz": {"file": "z.safetensors"}}'}, None, "unknown category"),
    (["a", "b"], {"productbg.loras": '{"a": {"file": "/etc/x.safetensors"}}'}, None, "bare"),
    (["a", "b"], {"productbg.loras": '{"a": {"file": "x.safetensors", "strength": "high"}}'}, None, "finite"),
    (["a", "b"], {"productbg.training": "[1]"}, None, "JSON object"),
])
def test_malformed_banks(tmp_path, names, meta, tensors, match):
    """Duplicate/empty names, shape vs metadata mismatches, wrong dtypes and bad metadata all raise."""
    vpi = meta.pop("vpi", 2)
    path = write_bank(tmp_path / "b.safetensors", names, tensors, vpi=vpi, **meta)
    with pytest.raises(MalformedFileError, match=match):
        load_bank(path)


def test_newer_schema_and_other_files_are_mismatches(tmp_path):
    path = write_bank(tmp_path / "b.safetensors", ["a", "b"], **{"productbg.schema": "3"})
    with pytest.raises(FormatMismatchError, match="newer productbg"):
        load_bank(path)
    other = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 2)}, str(other))
    with pytest.raises(FormatMismatchError, match="not a category bank.*inspect"):
        load_bank(other)


def test_a_tiny_sdxl_bank_records_both_widths_and_reads_back(tmp_path):
    """Small self-trained SDXL-shaped models: two encoders of free widths, each recorded and checked."""
    bank = CategoryBank("tiny-sdxl", vectors_per_id=2)
    vectors = {"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 48)}
    bank.add("lamp", vectors)
    path = bank.save(tmp_path / "xl.safetensors")
    with CategoryBank.load(path) as back:
        assert back.family == "tiny-sdxl" and back.encoders == ("clip_l", "clip_g")
        assert all(torch.equal(back.vectors("lamp", enc), vectors[enc]) for enc in vectors)
        with pytest.raises(WeightsError, match=r"clip_g vectors must be a float tensor of shape \[2, 48\]"):
            back.add("mug", {"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 40)})
    other = CategoryBank("tiny-sdxl", vectors_per_id=2)
    other.add("mug", {"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 64)})
    with CategoryBank.load(path) as back, pytest.raises(WeightsError, match="clip_g width 64 into .* clip_g width 48"):
        back.merge(other)
    with pytest.raises(WeightsError, match="sdxl banks have clip_g width 1280, not 48.*'tiny-sdxl' bank"):
        CategoryBank("sdxl", vectors_per_id=2, width_g=48)


def test_one_bank_fit_rule_for_every_host():
    """weights.bank_fit: the same family fits, the small self-trained families fit the backbone with their text
    encoders, another family is one line naming what to use."""
    from productbg.backbones import SD15, SDXL
    from productbg.weights.bank_fit import bank_fit_problem

    assert bank_fit_problem("sd15", SD15) is None and bank_fit_problem("sdxl", SDXL) is None
    assert bank_fit_problem(None, SDXL) is None
    assert bank_fit_problem("tiny", SD15) is None and bank_fit_problem("tiny-sdxl", SDXL) is None
    assert "whose text encoders are clip_l, clip_g" in bank_fit_problem("tiny", SDXL)
    assert bank_fit_problem("sd15", SDXL, "CLIP") == ("this is an SD1.5 bank but the CLIP is SDXL: use an SDXL bank "
                                                      "(clip_l + clip_g vectors), or the CLIP of an SD1.5 checkpoint")
