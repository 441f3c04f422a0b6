"""``productbg bank from-text`` on Flux.1 (issue 23 part 3): a ``flux`` bank from a T5-XXL text-encoder file.

The T5 files here hold what detection and the embedding path read: ``shared.weight`` at full size [32128, 4096]
(random, with a few values beyond fp8's range), ``encoder.final_layer_norm.weight`` in the dtype ComfyUI builds the
T5 in, and one-row stand-ins for the blocks whose names and widths detection checks. The real-ComfyUI counterpart
(tests/test_comfy_flux_from_text.py) compares with ComfyUI's own model and encodes.
"""
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from productbg.cli import main
from productbg.pipeline.errors import PipelineError
from productbg.pipeline.single_file import token_embeddings
from productbg.pipeline.t5_file import comfy_t5_dtype, t5_input_embeddings, t5_layout
from productbg.pipeline.text import T5_ASSETS, T5_SLOT, t5_tokenizer
from productbg.pipeline.text_bank import bank_from_text, t5_description_tokens
from productbg.weights.bank import load_bank
from productbg.weights.safefile import read_header

ROWS = [("Marble", "marble table"), ("floor", "a sunlit wooden floor with soft shadows"), ("运动鞋", "green grass")]
TEMPLATE = "a product photo on a {id} background"
FP8 = torch.float8_e4m3fn
MARBLE = 14260  # "▁marble"


def _blocks(prefix: str = "", dtype=FP8, width: int = 4096, gated: bool = True) -> dict[str, torch.Tensor]:
    ffn = "wi_1" if gated else "wi"
    return {f"{prefix}encoder.block.0.layer.0.SelfAttention.k.weight": torch.zeros(1, width).to(dtype),
            f"{prefix}encoder.block.23.layer.1.DenseReluDense.{ffn}.weight": torch.zeros(1, width).to(dtype),
            f"{prefix}encoder.final_layer_norm.weight": torch.ones(width).to(dtype)}


@pytest.fixture(scope="module")
def table() -> torch.Tensor:
    t = (torch.randn(32128, 4096, generator=torch.Generator().manual_seed(5)) * 20).half()
    t[MARBLE, :4] = torch.tensor([500.0, -1000.0, 448.0, 0.3])  # beyond fp8 e4m3fn's ±448: saturates on the cast
    return t


@pytest.fixture(scope="module")
def t5_file(tmp_path_factory, table) -> Path:
    """As the published t5xxl_fp8_e4m3fn.safetensors: encoder tensors fp8, shared.weight fp16."""
    path = tmp_path_factory.mktemp("t5") / "t5xxl_fp8_e4m3fn.safetensors"
    save_file({"shared.weight": table, **_blocks()}, str(path))
    return path


def _csv(path: Path, rows) -> Path:
    path.write_text("category,description\n" + "".join(f'{n},"{d}"\n' for n, d in rows), encoding="utf-8")
    return path


def _tokens(text: str) -> list[int]:
    return t5_tokenizer()(text, add_special_tokens=False).input_ids


def _held(table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What ComfyUI's T5 built in ``dtype`` holds: the table copied into a parameter of that dtype."""
    param = torch.empty(table.shape, dtype=dtype)
    param.copy_(table)
    return param.to(torch.float32)


# ---------------------------------------------------------------------- the tokenizer
def test_the_shipped_t5_tokenizer_is_comfyuis_and_loads_offline(no_network):
    comfy = Path(os.environ.get("COMFYUI_DIR", "/nonexistent"), "comfy/text_encoders/t5_tokenizer")
    if comfy.is_dir():
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            assert (T5_ASSETS / name).read_bytes() == (comfy / name).read_bytes(), name
    assert "Apache License" in (T5_ASSETS / "LICENSE").read_text(encoding="utf-8")
    tok = t5_tokenizer()
    assert (tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 0, 2)
    assert tok("marble table").input_ids == [MARBLE, 953, 1]
    assert tok(T5_SLOT, add_special_tokens=False).input_ids == [32099]


def test_description_tokens_are_its_tokens_inside_the_template():
    tok = t5_tokenizer()
    for _, description in ROWS:
        ids = t5_description_tokens(tok, description, TEMPLATE)
        assert ids == _tokens(description)
        words = _tokens(TEMPLATE.replace("{id}", description))
        assert words[7:7 + len(ids)] == ids  # "a product photo on a" is 7 tokens: each "a" is "▁", "a"
    with pytest.raises(PipelineError, match="category 'x': T5 splits the description differently inside the "
                                            "template 'a {id}s background'"):
        t5_description_tokens(tok, "marble table", "a {id}s background", "x")   # "tables" is not "table" + "s"


@pytest.mark.parametrize("description, match", [
    ("运动鞋 on a floor", "no token for '运动鞋'"),
    ("a {curly} floor", "no token for '{ }'"),
    ("a floor </s> with shadows", "special token '</s>'"),
    (f"a {T5_SLOT} floor", "special token '<extra_id_0>'"),
    (" ".join(["wood"] * 76), "the description is 76 T5 tokens; the limit is 75"),
])
def test_descriptions_t5_cannot_read_as_words_are_refused(description, match):
    with pytest.raises(PipelineError, match=match):
        t5_description_tokens(t5_tokenizer(), description, TEMPLATE, "c")


# ---------------------------------------------------------------------- the embeddings ComfyUI's model holds
def test_comfyuis_t5_dtype_rule():
    assert comfy_t5_dtype(FP8) is FP8 and comfy_t5_dtype(torch.float8_e5m2) is torch.float8_e5m2
    assert comfy_t5_dtype(torch.bfloat16) is torch.bfloat16 and comfy_t5_dtype(torch.float16) is torch.float16
    assert comfy_t5_dtype(torch.float32) is torch.float16 and comfy_t5_dtype(None) is torch.float16
    assert comfy_t5_dtype(torch.float32, torch.float32) is torch.float32  # ComfyUI started with --fp32-text-enc


def test_vectors_are_the_fp8_rounded_rows(t5_file, table):
    header = read_header(t5_file)
    layout = t5_layout(header)
    assert (layout.prefix, layout.file_dtype, layout.model_dtype, layout.scaled_fp8) == \
        ("", torch.float16, FP8, False)
    family, emb = token_embeddings(t5_file)
    held = _held(table, FP8)
    assert family == "flux" and emb["t5xxl"].dtype == torch.float16  # fp16 holds every fp8 value exactly
    assert torch.equal(emb["t5xxl"].float(), held)
    assert held[MARBLE, :4].tolist() == [448.0, -448.0, 448.0, 0.3125]
    assert not torch.equal(emb["t5xxl"], table)
    # an fp16 T5 (t5xxl_fp16.safetensors) keeps the file's rows; bf16 rounds through bf16
    assert torch.equal(t5_input_embeddings(t5_file, header, replace(layout, model_dtype=torch.float16)), table)
    bf16 = t5_input_embeddings(t5_file, header, replace(layout, model_dtype=torch.bfloat16))
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16.float(), _held(table, torch.bfloat16))


def test_from_text_cli_flux_and_bank_list(t5_file, table, tmp_path, capsys):
    csv, out = _csv(tmp_path / "cats.csv", ROWS), tmp_path / "flux.safetensors"
    assert main(["bank", "from-text", str(csv), "--checkpoint", str(t5_file), "--out", str(out)]) == 0
    counts = [len(_tokens(d)) for _, d in ROWS]
    assert f"flux bank, 3 categories, {min(counts)}..{max(counts)} vectors each" in capsys.readouterr().out
    held = _held(table, FP8)
    with load_bank(out) as bank:
        assert bank.family == "flux" and bank.encoders == ("t5xxl",) and bank.names == [n for n, _ in ROWS]
        assert bank.vector_counts() == counts and bank.template == TEMPLATE
        for name, description in ROWS:
            assert torch.equal(bank.vectors(name, "t5xxl").float(), held[_tokens(description)]), name
        note = bank.training["t5xxl"]
        assert (note["file_dtype"], note["model_dtype"]) == ("F16", "F8_E4M3") and "rounded through" in note["rounding"]
    assert main(["bank", "list", str(out)]) == 0
    listed = capsys.readouterr().out
    assert "flux bank, 3 categories" in listed and "Marble\t2 vectors" in listed
    assert main(["bank", "list", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["family"], info["width"]) == ("flux", 4096)


def test_a_flux_single_file_bundling_t5_is_read(tmp_path, table):
    """A Flux.1 checkpoint with text_encoders.t5xxl.transformer.* (here its T5 all bf16, the embedding fp8)."""
    pre = "text_encoders.t5xxl.transformer."
    path = tmp_path / "flux1-dev-fp8.safetensors"
    fp8 = table.to(FP8)
    save_file({pre + "shared.weight": fp8, **_blocks(pre, torch.bfloat16),
               "model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.zeros(1, 1)}, str(path))
    layout = t5_layout(read_header(path))
    assert (layout.prefix, layout.file_dtype, layout.model_dtype) == (pre, FP8, torch.bfloat16)
    bank = bank_from_text(ROWS[:1], path)
    assert bank.family == "flux" and torch.equal(bank.vectors("Marble", "t5xxl").float(), fp8[[MARBLE, 953]].float())


# ---------------------------------------------------------------------- refusals: one line, nothing written
def _file(path: Path, tensors: dict) -> Path:
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("kind, match", [
    ("t5_xl", "T5 of width 2048"),
    ("t5_v1_0", "T5 v1.0 XXL"),
    ("t5_base", "smaller T5"),
    ("umt5", "embedding is [256384, 1], not T5-XXL v1.1's [32128, 4096] (UMT5-XXL"),
    ("no_embedding", "without its token embeddings ('shared.weight')"),
    ("flux_transformer", "this is a Flux.1 transformer (models/diffusion_models) without text encoders"),
    ("clip_l", "this is a CLIP text encoder alone"),
    ("sd3", "SD3"),
])
def test_wrong_files_are_refused_saying_what_to_pass(tmp_path, capsys, kind, match):
    tiny = torch.zeros(2, 2, dtype=torch.float16)
    tensors = {
        "t5_xl": {"shared.weight": tiny, **_blocks(width=2048)},
        "t5_v1_0": {"shared.weight": tiny, **_blocks(gated=False)},
        "t5_base": {"shared.weight": tiny, "encoder.block.0.layer.0.SelfAttention.k.weight": torch.zeros(768, 1)},
        "umt5": {"shared.weight": torch.zeros(256384, 1, dtype=torch.float16), **_blocks()},
        "no_embedding": _blocks(),
        "flux_transformer": {"double_blocks.0.img_attn.qkv.weight": tiny},
        "clip_l": {"text_model.encoder.layers.0.mlp.fc1.weight": tiny},
        "sd3": {"text_encoders.t5xxl.transformer.shared.weight": tiny,
                "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": tiny.clone()},
    }[kind]
    ckpt = _file(tmp_path / f"{kind}.safetensors", tensors)
    csv, out = _csv(tmp_path / "c.csv", ROWS[:1]), tmp_path / "bank.safetensors"
    assert main(["bank", "from-text", str(csv), "--checkpoint", str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1 and f"{kind}.safetensors" in err
    assert "t5xxl_fp16.safetensors" in err  # what to pass
    assert not out.exists()


def test_a_bad_description_writes_nothing(t5_file, tmp_path, capsys):
    csv = _csv(tmp_path / "c.csv", [("ok", "a wooden floor"), ("bad", "运动鞋")])
    out = tmp_path / "bank.safetensors"
    assert main(["bank", "from-text", str(csv), "--checkpoint", str(t5_file), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "c.csv line 3: category 'bad': T5's vocabulary has no token for '运动鞋'" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.csv"]
    long = _csv(tmp_path / "c.csv", [("long", " ".join(["wood"] * 76))])
    assert main(["bank", "from-text", str(long), "--checkpoint", str(t5_file), "--out", str(out)]) == 2
    assert "the description is 76 T5 tokens; the limit is 75" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.csv"]
