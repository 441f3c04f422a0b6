"""Banks from text, no training (issue 22 part 1): ``productbg bank from-text``, and per-category vector counts.

A category's identifier vectors are the checkpoint's token input embeddings of its description, so the
Category Prompt with those vectors spliced in encodes exactly as the description written as plain words.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from productbg.cli import main
from productbg.pipeline.errors import PipelineError
from productbg.pipeline.prompts import PromptEncoder
from productbg.pipeline.single_file import save_single_file, token_embeddings
from productbg.pipeline.text import clip_tokenizer, open_clip_tokenizer
from productbg.pipeline.text_bank import bank_from_text, description_vectors, read_categories_csv
from productbg.pipeline.tiny import (TINY_XL_WIDTHS, tiny_sdxl_unet, tiny_text_encoder, tiny_text_encoder_2,
                                     tiny_unet, tiny_vae)
from productbg.weights.bank import CategoryBank, load_bank
from productbg.weights.errors import FormatMismatchError, MalformedFileError, WeightsError
from weight_samples import example_bank

FIXTURES = Path(__file__).parent / "fixtures"
TEMPLATE = "a product photo on a {id} background"
ROWS = [("运动鞋", "a sunlit wooden floor with soft shadows"), ("Coffee Mug", "a cozy kitchen counter"),
        ("lamp", "marble")]


@pytest.fixture(scope="module")
def sd15_ckpt(tmp_path_factory):
    te = tiny_text_encoder(seed=3)
    path = save_single_file(tmp_path_factory.mktemp("sd15") / "model.safetensors", tiny_unet(seed=3),
                            tiny_vae(seed=3), te)
    return path, te


@pytest.fixture(scope="module")
def sdxl_ckpt(tmp_path_factory):
    te, te2 = tiny_text_encoder(4, TINY_XL_WIDTHS[0]), tiny_text_encoder_2(seed=4)
    path = save_single_file(tmp_path_factory.mktemp("sdxl") / "xl.safetensors", tiny_sdxl_unet(seed=4),
                            tiny_vae(seed=4), te, text_encoder_2=te2)
    return path, te, te2


def _csv(path: Path, text: str, bom: bool = False) -> Path:
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def _tokens(text: str) -> list[int]:
    return clip_tokenizer()(text, add_special_tokens=False).input_ids


# ---------------------------------------------------------------------- the bank format
@pytest.mark.parametrize("family, vpi, seed", [("sd15", 3, 7), ("sdxl", 2, 8)])
def test_bank_files_written_before_per_category_counts_still_load(family, vpi, seed, tmp_path):
    """tests/fixtures/bank_*_schema1.safetensors were written by productbg before this change (schema 1)."""
    path = FIXTURES / f"bank_{family}_schema1.safetensors"
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["productbg.schema"] == "1" and "productbg.vector_counts" not in f.metadata()
    expected = example_bank(["运动鞋", "Coffee Mug"], vectors_per_id=vpi, seed=seed, dtype=torch.float16,
                            family=family)
    with load_bank(path) as bank:
        assert bank.names == ["运动鞋", "Coffee Mug"] and bank.vectors_per_id == vpi
        assert bank.vector_counts() == [vpi, vpi] and bank.vector_count("coffee mug") == vpi
        for name in bank.names:
            for enc in bank.encoders:
                assert torch.equal(bank.vectors(name, enc), expected.vectors(name, enc))
        resaved = bank.save(tmp_path / "again.safetensors")
    with safe_open(str(resaved), "pt") as f:                       # a uniform bank is still written as schema 1
        assert f.metadata()["productbg.schema"] == "1" and "productbg.vector_counts" not in f.metadata()


def test_per_category_vector_counts_round_trip(tmp_path):
    bank = CategoryBank("sdxl", vectors_per_id=4, varied_counts=True)
    bank.add("a", {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)})
    bank.add("b", {"clip_l": torch.randn(4, 768), "clip_g": torch.randn(4, 1280)})
    with pytest.raises(WeightsError, match="same number of vectors"):
        bank.add("c", {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(3, 1280)})
    with pytest.raises(WeightsError, match=r"n 1\.\.4"):
        bank.add("c", {"clip_l": torch.randn(5, 768), "clip_g": torch.randn(5, 1280)})
    path = bank.save(tmp_path / "v.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert f.get_tensor("clip_l").shape == (2, 4, 768)
    assert meta["productbg.schema"] == "2" and json.loads(meta["productbg.vector_counts"]) == [2, 4]
    with load_bank(path) as loaded:
        assert loaded.vector_counts() == [2, 4] and loaded.vector_count("A") == 2
        assert torch.equal(loaded.vectors("a", "clip_g"), bank.vectors("a", "clip_g"))
        assert loaded.get("a").vectors["clip_l"].shape == (2, 768)
        merged = CategoryBank("sdxl", vectors_per_id=4, varied_counts=True).merge(loaded)
        assert merged.vector_counts() == [2, 4]


@pytest.mark.parametrize("counts, match", [
    (None, "lacks 'productbg.vector_counts'"), ("[2]", "list of 2 integers 1..4"), ("[0, 4]", "1..4"),
    ("[2, 5]", "1..4"), ('["2", 4]', "integers"),
])
def test_malformed_vector_counts_refused(tmp_path, counts, match):
    from safetensors.torch import save_file

    src = CategoryBank(vectors_per_id=4, varied_counts=True)
    src.add("a", torch.zeros(2, 768))
    src.add("b", torch.zeros(4, 768))
    meta = src.metadata()
    if counts is None:
        del meta["productbg.vector_counts"]
    else:
        meta["productbg.vector_counts"] = counts
    path = tmp_path / "bad.safetensors"
    save_file(src.tensors(), str(path), meta)
    with pytest.raises(MalformedFileError, match=match):
        load_bank(path)
    meta["productbg.schema"] = "3"
    save_file(src.tensors(), str(path), meta)
    with pytest.raises(FormatMismatchError, match="newer productbg"):
        load_bank(path)


# ---------------------------------------------------------------------- from text: SD1.5
def test_from_text_cli_sd15(sd15_ckpt, tmp_path, capsys):
    ckpt, te = sd15_ckpt
    csv = _csv(tmp_path / "cats.csv", "category,description\n" + "".join(f'{n},"{d}"\n' for n, d in ROWS),
               bom=True)
    out = tmp_path / "bank.safetensors"
    assert main(["bank", "from-text", str(csv), "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    assert "3 categories" in capsys.readouterr().out
    emb = te.get_input_embeddings().weight.detach()
    with load_bank(out) as bank:
        assert bank.family == "tiny" and bank.width == 32 and bank.names == [n for n, _ in ROWS]
        assert bank.vector_counts() == [len(_tokens(d)) for _, d in ROWS]
        for name, description in ROWS:
            assert torch.equal(bank.vectors(name), emb[_tokens(description)])
    assert main(["weights", "inspect", str(out)]) == 0
    counts = sorted(len(_tokens(d)) for _, d in ROWS)
    assert f"{counts[0]}..{counts[-1]} (each category its own" in capsys.readouterr().out


def test_category_prompt_equals_the_description_as_words_sd15(sd15_ckpt):
    ckpt, te = sd15_ckpt
    bank = bank_from_text(ROWS, ckpt)
    words = PromptEncoder(clip_tokenizer(), te)
    coded = PromptEncoder(clip_tokenizer(), te, bank)
    for name, description in ROWS + ROWS[:1]:                       # categories of different counts, in turn
        got = coded.encode(name, TEMPLATE, extra="studio light")
        want = words.negative(TEMPLATE.replace("{id}", description) + ", studio light")
        assert len(got.spec.token_indices) == len(_tokens(description))
        torch.testing.assert_close(got.cond, want, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------- from text: SDXL
class _Identifiers:
    """Duck-typed bank of the tiny SDXL model (its text widths are not an ``sdxl`` bank's 768 + 1280)."""

    def __init__(self, vectors):
        self._vectors, self.template = vectors, TEMPLATE
        self.vectors_per_id = max(next(iter(v.values())).shape[0] for v in vectors.values())

    def resolve(self, name):
        return name

    def vectors(self, name, encoder="clip_l"):
        return self._vectors[name][encoder]


def test_sdxl_vectors_and_prompt_equal_the_description_as_words(sdxl_ckpt):
    ckpt, te, te2 = sdxl_ckpt
    family, embeddings = token_embeddings(ckpt)
    assert family == "sdxl"
    assert torch.equal(embeddings["clip_l"], te.get_input_embeddings().weight.detach())
    assert torch.equal(embeddings["clip_g"], te2.get_input_embeddings().weight.detach())
    toks = [clip_tokenizer(), open_clip_tokenizer()]
    vectors = {name: description_vectors(toks, embeddings, d, name) for name, d in ROWS}
    for name, description in ROWS:
        ids = _tokens(description)
        assert torch.equal(vectors[name]["clip_l"], embeddings["clip_l"][ids])
        assert torch.equal(vectors[name]["clip_g"], embeddings["clip_g"][ids])
    words = PromptEncoder(clip_tokenizer(), te, None, open_clip_tokenizer(), te2)
    coded = PromptEncoder(clip_tokenizer(), te, _Identifiers(vectors), open_clip_tokenizer(), te2)
    for name, description in ROWS + ROWS[:1]:
        got = coded.encode(name, TEMPLATE)
        want = words.negative(TEMPLATE.replace("{id}", description))
        assert got.cond.shape[-1] == sum(TINY_XL_WIDTHS)
        torch.testing.assert_close(got.cond, want, rtol=0, atol=1e-6)
    with pytest.raises(PipelineError, match="not the full-size"):      # an sdxl bank needs 768 + 1280
        bank_from_text(ROWS, ckpt)


def test_tokenizers_that_disagree_are_refused():
    class Other:
        def __call__(self, text, add_special_tokens=False):
            return type("T", (), {"input_ids": [1, 2]})()

    with pytest.raises(PipelineError, match="tokenizers split the description differently"):
        description_vectors([clip_tokenizer(), Other()], {}, "a wooden floor", "x")


# ---------------------------------------------------------------------- bad input: one line, nothing written
@pytest.mark.parametrize("text, match", [
    ("a,b,c\n", "line 1: expected 2 fields"),
    ("ok,a floor\nlonely\n", "line 2: expected 2 fields"),
    ("ok,a floor\nempty,  \n", "line 2: category 'empty' has an empty description"),
    ("Mug,a table\nshoe,grass\nmug,a shelf\n", "line 3: category 'mug' is already on line 1"),
    ("long," + " ".join(["wood"] * 76) + "\n", "c.csv line 1: category 'long': the description is 76 tokens; the limit is 75"),
    ("category,description\n", "no categories"),
    (' padded,a floor\n', None),                                      # names are stripped: fine
])
def test_bad_csv_rows_are_one_line_and_write_nothing(sd15_ckpt, tmp_path, capsys, text, match):
    ckpt, _ = sd15_ckpt
    csv, out = _csv(tmp_path / "c.csv", text), tmp_path / "bank.safetensors"
    code = main(["bank", "from-text", str(csv), "--checkpoint", str(ckpt), "--out", str(out)])
    err = capsys.readouterr().err
    if match is None:
        assert code == 0 and load_bank(out).names == ["padded"]
        return
    assert code == 2 and match in err and err.count("\n") == 1 and "c.csv" in err
    assert not out.exists() and list(tmp_path.iterdir()) == [csv]


def test_not_utf8_and_wrong_checkpoint_refused(sd15_ckpt, tmp_path, capsys):
    ckpt, _ = sd15_ckpt
    out = tmp_path / "bank.safetensors"
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("café,a floor\n".encode("latin-1"))
    assert main(["bank", "from-text", str(bad), "--checkpoint", str(ckpt), "--out", str(out)]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    lora = tmp_path / "x.safetensors"
    example_bank().save(lora)
    good = _csv(tmp_path / "ok.csv", "a,b\n")
    assert main(["bank", "from-text", str(good), "--checkpoint", str(lora), "--out", str(out)]) == 2
    assert "no text-encoder token embeddings" in capsys.readouterr().err
    assert not out.exists()


def test_shipped_csv_reads():
    rows = read_categories_csv(Path(__file__).resolve().parent.parent / "assets/categories/ecommerce_30.csv")
    assert 25 <= len(rows) <= 35
    tok = clip_tokenizer()
    assert all(len(tok(d, add_special_tokens=False).input_ids) <= 75 for _, d in rows)


# ---------------------------------------------------------------------- ComfyUI's Category Prompt (unit)
class _Clip:
    """``tokenize`` like ComfyUI's SDXL CLIP (one id per word; ``sks`` is id 5)."""

    def tokenize(self, text):
        ids = [49406, *[5 if w == "sks" else 1000 + len(w) for w in text.replace(",", " ,").split()], 49407]
        return {k: [[(t, 1.0) for t in ids + [0 if k == "g" else 49407] * (77 - len(ids))]] for k in ("g", "l")}


def test_category_prompt_node_uses_each_categorys_own_vector_count(monkeypatch):
    from productbg.nodes import category_nodes

    bank = CategoryBank("sdxl", vectors_per_id=5, varied_counts=True)
    for name, n in (("two", 2), ("five", 5)):
        bank.add(name, {"clip_l": torch.randn(n, 768), "clip_g": torch.randn(n, 1280)})
    seen = {}
    monkeypatch.setattr(category_nodes, "confined_prompt",
                        lambda clip, tokens, positions, backbone, plain: seen.update(tokens=tokens, positions=positions)
                        or ("conditioning", "identifier"))
    for name, n in (("two", 2), ("five", 5)):
        category_nodes.CategoryPrompt.execute(_Clip(), bank, name, "", "")
        assert seen["positions"] == {k: list(range(6, 6 + n)) for k in ("l", "g")}  # "a product photo on a" + n
        for key, enc in (("l", "clip_l"), ("g", "clip_g")):
            spliced = torch.stack([seen["tokens"][key][0][p][0] for p in seen["positions"][key]])
            assert torch.equal(spliced, bank.vectors(name, enc))
