"""``productbg weights export-embedding BANK CATEGORY OUT``: one category as a standard embedding file (SD1.5
``emb_params``; SDXL ``clip_l`` + ``clip_g``), written atomically, with the CLI's one-line errors and exit
statuses. ComfyUI reading the files back: tests/test_weights_embedding_comfyui.py."""
import os

import pytest
import torch
from safetensors import safe_open

from productbg.cli import main
from productbg.weights.embedding import (check_prompt_name, export_embedding, is_embedding, read_embedding)
from productbg.weights.errors import FormatMismatchError, NameLookupError, WeightsError
from productbg.weights.safefile import atomic_save, read_header
from weight_samples import example_bank, example_style_encoder, ip_adapter_file_dict


@pytest.fixture(scope="module")
def banks(tmp_path_factory):
    root = tmp_path_factory.mktemp("banks")
    return {"sd15": example_bank(seed=1).save(root / "sd15_bank.safetensors"),
            "sdxl": example_bank(seed=2, family="sdxl", vectors_per_id=3).save(root / "sdxl_bank.safetensors"),
            "sd15_f16": example_bank(seed=3, dtype=torch.float16).save(root / "f16.safetensors"),
            "tiny": example_bank(width=32).save(root / "tiny.safetensors"),
            "root": root}


def stored(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def bank_vectors(path, name):
    from productbg.weights.bank import load_bank

    with load_bank(path) as bank:
        return {enc: bank.vectors(name, enc).clone() for enc in bank.encoders}


def run(capsys, *argv):
    code = main(["weights", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------- the files
def test_sd15_export_is_a_single_emb_params_tensor(banks, tmp_path):
    done = export_embedding(banks["sd15"], "Running Shoes", tmp_path / "shoes.safetensors")
    tensors, meta = stored(done.path)
    assert list(tensors) == ["emb_params"] and tensors["emb_params"].shape == (2, 768)
    assert torch.equal(tensors["emb_params"], bank_vectors(banks["sd15"], "Running Shoes")["clip_l"])
    assert meta["productbg.kind"] == "embedding" and meta["productbg.family"] == "sd15"
    assert meta["productbg.category"] == "Running Shoes" and meta["productbg.bank"] == "sd15_bank.safetensors"
    assert done.family == "sd15" and done.shapes == {"emb_params": (2, 768)}
    assert done.prompt_name == "embedding:shoes"
    assert done.prompt_example == "a product photo on a embedding:shoes background"


def test_sdxl_export_has_clip_l_and_clip_g(banks, tmp_path):
    done = export_embedding(banks["sdxl"], "咖啡杯", tmp_path / "mug.safetensors")
    tensors, meta = stored(done.path)
    want = bank_vectors(banks["sdxl"], "咖啡杯")
    assert sorted(tensors) == ["clip_g", "clip_l"]
    assert tensors["clip_l"].shape == (3, 768) and tensors["clip_g"].shape == (3, 1280)
    assert torch.equal(tensors["clip_l"], want["clip_l"]) and torch.equal(tensors["clip_g"], want["clip_g"])
    assert not torch.equal(tensors["clip_l"], bank_vectors(banks["sdxl"], "台灯")["clip_l"])  # the right row
    assert meta["productbg.family"] == "sdxl" and meta["productbg.category"] == "咖啡杯"
    assert read_embedding(done.path)[0] == "sdxl" and is_embedding(read_header(done.path))


def test_dtype_and_values_are_kept_exactly(banks, tmp_path):
    done = export_embedding(banks["sd15_f16"], "wool scarf", tmp_path / "scarf.safetensors")
    tensors, _ = stored(done.path)
    assert tensors["emb_params"].dtype == torch.float16
    assert torch.equal(tensors["emb_params"], bank_vectors(banks["sd15_f16"], "wool scarf")["clip_l"])


def test_in_memory_bank_and_case_insensitive_name(tmp_path):
    bank = example_bank(family="sdxl")
    done = export_embedding(bank, "LEATHER BAG", tmp_path / "bag.safetensors")
    assert done.category == "Leather Bag"
    assert torch.equal(stored(done.path)[0]["clip_g"], bank.vectors("Leather Bag", "clip_g"))


def test_unknown_category_suggests_close_names(banks, tmp_path):
    with pytest.raises(NameLookupError, match=r"no category 'Runing Shoe' in sd15_bank\.safetensors .*did you mean "
                                              r"'Running Shoes'"):
        export_embedding(banks["sd15"], "Runing Shoe", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_tiny_bank_is_refused(banks, tmp_path):
    with pytest.raises(FormatMismatchError, match="tiny bank's vectors .* fit only the small model"):
        export_embedding(banks["tiny"], "台灯", tmp_path / "x.safetensors")


@pytest.mark.parametrize("name, better", [
    ("Running Shoes.safetensors", "Running_Shoes.safetensors"),
    ("shoes(red).safetensors", "shoes_red.safetensors"),
    ("a:b.safetensors", "a_b.safetensors"),
    ("x,.safetensors", "x.safetensors"),
])
def test_names_a_prompt_cannot_reach_are_refused(name, better):
    with pytest.raises(WeightsError, match=f"name it e.g. {better.replace('.', '[.]')}$"):
        check_prompt_name(name)


def test_pickle_or_other_suffix_refused():
    with pytest.raises(WeightsError, match="written as NAME.safetensors"):
        check_prompt_name("shoes.pt")
    check_prompt_name("运动鞋.safetensors")          # any script is fine: ComfyUI looks the name up as a file


def test_write_is_atomic(banks, tmp_path, monkeypatch):
    """A save that fails half-way leaves the old file as it was and no temporary file beside it."""
    out = tmp_path / "shoes.safetensors"
    out.write_bytes(b"old")
    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError):
        export_embedding(banks["sd15"], "Running Shoes", out)
    assert out.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["shoes.safetensors"]
    monkeypatch.undo()
    export_embedding(banks["sd15"], "Running Shoes", out)
    assert "emb_params" in stored(out)[0] and sorted(os.listdir(tmp_path)) == ["shoes.safetensors"]


# ---------------------------------------------------------------------- the command
def test_cli_writes_and_says_how_to_use_it(capsys, banks, tmp_path):
    out = tmp_path / "mug.safetensors"
    code, stdout, err = run(capsys, "export-embedding", banks["sdxl"], "coffee mug", out)
    assert code == 0 and err == ""
    lines = stdout.splitlines()
    assert lines[0] == f"wrote {out} (sdxl embedding of 'Coffee Mug': clip_l [3, 768], clip_g [3, 1280])"
    assert lines[1] == ('ComfyUI: put it in models/embeddings/ and write embedding:mug in the prompt, e.g. '
                        '"a product photo on a embedding:mug background"')
    assert torch.equal(stored(out)[0]["clip_g"], bank_vectors(banks["sdxl"], "Coffee Mug")["clip_g"])
    code, stdout, _ = run(capsys, "inspect", out)
    assert code == 0 and stdout.startswith("mug.safetensors: embedding (sdxl)")
    assert "Coffee Mug (from sdxl_bank.safetensors)" in stdout and "write embedding:mug in a prompt" in stdout


def test_cli_refuses_overwrite_without_force(capsys, banks, tmp_path):
    out = tmp_path / "shoes.safetensors"
    out.write_bytes(b"keep")
    code, stdout, err = run(capsys, "export-embedding", banks["sd15"], "Running Shoes", out)
    assert code == 2 and stdout == "" and out.read_bytes() == b"keep"
    assert err.strip() == f"productbg weights: error: OUT {out}: exists; pass --force to overwrite it"
    code, _, _ = run(capsys, "export-embedding", banks["sd15"], "Running Shoes", out, "--force")
    assert code == 0 and stored(out)[0]["emb_params"].shape == (2, 768)


@pytest.mark.parametrize("case, match", [
    ("unknown", "no category 'Runing Shoe' in sd15_bank.safetensors (8 categories); did you mean 'Running Shoes'?"),
    ("space", "OUT my shoes.safetensors: ComfyUI could not find it from a prompt"),
    ("suffix", "written as NAME.safetensors"),
    ("missing", "BANK"),
    ("not_a_bank", "not a category bank"),
    ("tiny", "fit only the small model"),
    ("same", "is the BANK file"),
    ("folder", "is an existing folder"),
])
def test_cli_errors_are_one_line_exit_2(capsys, banks, tmp_path, case, match):
    bank, category, out = banks["sd15"], "Running Shoes", tmp_path / "e.safetensors"
    if case == "unknown":
        category = "Runing Shoe"
    elif case == "space":
        out = tmp_path / "my shoes.safetensors"
    elif case == "suffix":
        out = tmp_path / "e.pt"
    elif case == "missing":
        bank = tmp_path / "nope.safetensors"
    elif case == "not_a_bank":
        bank = atomic_save(ip_adapter_file_dict(example_style_encoder()), tmp_path / "ip.safetensors")
    elif case == "tiny":
        bank = banks["tiny"]
    elif case == "same":
        out = bank
    elif case == "folder":
        out = tmp_path / "dir.safetensors"
        out.mkdir()
    before = sorted(os.listdir(tmp_path))
    code, stdout, err = run(capsys, "export-embedding", bank, category, out)
    assert code == 2 and stdout == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("productbg weights: error:") and match in err
    assert sorted(os.listdir(tmp_path)) == before        # nothing written


def test_cli_usage_error_exit_2(capsys, banks):
    code, _, err = run(capsys, "export-embedding", banks["sd15"])
    assert code == 2 and "CATEGORY" in err
