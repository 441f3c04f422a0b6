"""``productbg generate / batch --checkpoint`` on Flux.1 files (tiny random models with T5-XXL's width, so a real
``flux`` bank file fits): the bank's vectors encode as its words, the product comes back untouched, the companion
flags, refusals in one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flux_tiny_files import write_bundled, write_comfy_tree, write_configs
from productbg.cli import main
from productbg.fileio.png import save_png
from productbg.imaging import load_image
from productbg.imaging.synthetic import packshot
from productbg.pipeline import ProductBGPipeline
from productbg.pipeline.flux_models import tiny_flux_parts
from productbg.pipeline.flux_files import custom_t5_layout
from productbg.pipeline.t5_file import t5_input_embeddings
from productbg.pipeline.text import t5_tokenizer
from productbg.weights.bank import CategoryBank
from productbg.weights.safefile import read_header

WORDS = "white marble"
SMALL = ["--size", "64", "--steps", "2"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """A tiny Flux Fill bundled file (T5 4096 wide, fp8 as published), its configs, a ComfyUI tree of the same
    model and a flux bank: 'marble' holds T5's input embeddings of WORDS as the file's T5 holds them (fp8-rounded),
    'velvet' random vectors."""
    root = tmp_path_factory.mktemp("hA-cli-flux")
    parts = tiny_flux_parts("fill", t5_width=4096)
    configs = write_configs(parts, root / "configs")
    bundled = write_bundled(parts, root / "tiny_flux.safetensors", fp8_t5=True)
    tree = write_comfy_tree(parts, root / "ComfyUI")
    ids = t5_tokenizer()(WORDS, add_special_tokens=False).input_ids
    header = read_header(bundled)  # the table as ComfyUI's model of the file holds it (what from-text reads)
    table = t5_input_embeddings(bundled, header, custom_t5_layout(header, bundled.name))
    bank = CategoryBank("flux", vectors_per_id=len(ids), template="a product photo on a {id} background")
    bank.add("marble", {"t5xxl": table[torch.tensor(ids)].clone()})
    bank.add("velvet", {"t5xxl": (torch.randn(len(ids), 4096, generator=torch.Generator().manual_seed(0)) * 0.5)
                        .to(torch.float16)})
    bank.save(root / "bank_flux.safetensors")
    product = save_png(packshot(48).image, root / "product.png")
    return {"root": root, "configs": configs, "bundled": bundled, "tree": tree, "bank": root / "bank_flux.safetensors",
            "product": product, "ids": ids}


def test_generate_with_a_flux_bank_end_to_end(flux, tmp_path, capsys):
    """generate --checkpoint <bundled Flux Fill> --bank <flux bank>: written, the product's pixels untouched, the
    run recorded; the prompt shows the identifier's sentinel slots."""
    out = tmp_path / "item"
    argv = ["generate", "--product", str(flux["product"]), "--category", "marble", "--checkpoint",
            str(flux["bundled"]), "--configs", str(flux["configs"]), "--bank", str(flux["bank"]), "--out", str(out),
            "--n", "2", *SMALL]
    assert main(argv) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [x["seed"] for x in lines] == [0, 1]
    meta = json.loads((out / "result.json").read_text())
    assert meta["settings"]["sampler"] == "euler" and meta["settings"]["guidance_scale"] == 1.0
    assert meta["prompt"].count("<extra_id_0>") == len(flux["ids"])
    images = [load_image(out / name)[0] for name in meta["images"]]
    placed, mask = load_image(out / "placed.png")[0], load_image(out / "mask.png")[0]
    core = (mask[..., 0] if mask.ndim == 3 else mask) >= 1.0
    assert core.sum() > 100 and np.array_equal(images[0][core], placed[core])  # the product pasted back untouched
    assert images[0].shape == (64, 64, 3) and not np.array_equal(images[0], images[1])


def test_the_pipeline_context_of_the_bank_equals_its_words(flux):
    """The Flux file and the flux bank loaded as the CLI loads them: the category's T5 context is bit for bit the
    encoding of its words (the fp8-rounded table); another category's differs."""
    pipe = ProductBGPipeline.from_single_file(flux["bundled"], config_dir=flux["configs"], bank=flux["bank"],
                                              device="cpu")
    enc = pipe.prompts
    prompt = enc.encode("marble", extra="soft light")
    ids = enc.t5_ids(f"a product photo on a {WORDS} background, soft light")
    with torch.no_grad():
        assert torch.equal(prompt.context, pipe.components.t5(input_ids=ids).last_hidden_state)
    assert not torch.equal(enc.encode("velvet", extra="soft light").context, prompt.context)
    row = ids[0].tolist()
    start = next(i for i in range(len(row)) if row[i:i + len(flux["ids"])] == flux["ids"])
    assert prompt.spec.token_indices == tuple(range(start, start + len(flux["ids"])))


def test_companions_found_beside_the_transformer_and_flags(flux, tmp_path, capsys):
    """A transformer alone in models/diffusion_models finds its T5, CLIP-L and VAE in the ComfyUI tree; --t5 /
    --clip-l / --vae name them explicitly; a transformer without them says which flag to pass, in one line."""
    common = ["--product", str(flux["product"]), "--category", "marble", "--configs", str(flux["configs"]),
              "--bank", str(flux["bank"]), *SMALL]
    assert main(["generate", "--checkpoint", str(flux["tree"]), "--out", str(tmp_path / "a.png"), *common]) == 0
    models = flux["tree"].parents[1]
    lonely = tmp_path / "alone" / flux["tree"].name
    lonely.parent.mkdir()
    lonely.write_bytes(flux["tree"].read_bytes())
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(lonely), "--out", str(tmp_path / "b.png"), *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--t5" in err[0], err
    assert main(["generate", "--checkpoint", str(lonely), "--out", str(tmp_path / "c.png"), *common,
                 "--t5", str(models / "text_encoders" / "t5xxl_fp8_e4m3fn.safetensors"),
                 "--clip-l", str(models / "text_encoders" / "clip_l.safetensors"),
                 "--vae", str(models / "vae" / "ae.safetensors")]) == 0
    assert json.loads((tmp_path / "c.json").read_text())["t5"].endswith("t5xxl_fp8_e4m3fn.safetensors")


def test_flux_refusals_one_line(flux, tmp_path, capsys):
    """--confinement columns, an SD sampler, a companion flag on an SD model, an IP-Adapter on Flux: exit 2 with one
    line each."""
    base = ["generate", "--product", str(flux["product"]), "--checkpoint", str(flux["bundled"]), "--configs",
            str(flux["configs"]), "--out", str(tmp_path / "x.png"), *SMALL]
    for extra, words in ((["--confinement", "columns"], "T5 is bidirectional"),
                         (["--sampler", "ddim"], "euler"),
                         (["--style-encoder", str(flux["bank"]), "--clip-vision", str(flux["bank"])],
                          "does not go with a Flux.1 model")):
        capsys.readouterr()
        assert main([*base, "--category", "marble", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (extra, err)


def test_batch_on_flux(flux, tmp_path, capsys):
    """batch --checkpoint <Flux>: every row written."""
    rows = tmp_path / "rows.csv"
    rows.write_text(f"product,category\n{flux['product']},marble\n{flux['product']},velvet\n")
    out = tmp_path / "batch"
    assert main(["batch", str(rows), "--out", str(out), "--no-progress", "--checkpoint", str(flux["bundled"]),
                 "--configs", str(flux["configs"]), "--bank", str(flux["bank"]), *SMALL]) == 0
    assert len(list(out.rglob("image_*.png"))) == 2


def test_demo_on_flux(flux, tmp_path, capsys):
    """demo --checkpoint <Flux> --bank: a sheet of one product × the bank's categories, products pasted back."""
    out = tmp_path / "sheet.png"
    assert main(["demo", "--checkpoint", str(flux["bundled"]), "--configs", str(flux["configs"]), "--bank",
                 str(flux["bank"]), "--products", str(flux["product"]), "--out", str(out), "--threads", "1"]) == 0
    assert "products pasted back unchanged: yes" in capsys.readouterr().out
    assert load_image(out)[0].shape[0] > 0
