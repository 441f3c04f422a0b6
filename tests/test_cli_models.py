"""The real-model options end to end on small files: --checkpoint/--configs, --style-encoder, --clip-vision,
--lora, written the way real ones are (single-file LDM checkpoint, IP-Adapter layout, transformers folder)."""
import json

import pytest
import torch

from productbg.cli import main
from productbg.imaging.synthetic import packshot
from productbg.pipeline.components import ClipVision, load_clip_vision, tiny_style_encoder
from productbg.pipeline.errors import PipelineError
from productbg.fileio.png import save_png
from productbg.pipeline.single_file import save_single_file, write_config_dir
from productbg.pipeline.tiny import tiny_text_encoder, tiny_unet, tiny_vae, tiny_vision_encoder

TINY = ["--size", "32", "--steps", "2"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """A tiny inpainting checkpoint + configs, a matching style encoder file and a CLIP vision folder."""
    root = tmp_path_factory.mktemp("models")
    unet, vae, te = tiny_unet(9), tiny_vae(), tiny_text_encoder()
    vision = tiny_vision_encoder()
    vision.save_pretrained(root / "clip_vision", safe_serialization=True)
    tiny_style_encoder(unet, ClipVision(vision)).save(root / "style.safetensors")
    save_single_file(root / "model.safetensors", unet, vae, te)
    write_config_dir(root / "configs", unet, vae, te)
    save_png(packshot(48).image, root / "product.png")
    save_png(packshot(48, product_rgb=(0.1, 0.2, 0.9), background_rgb=(0.9, 0.8, 0.2)).image, root / "ref.png")
    return root


def test_generate_with_checkpoint_style_encoder_and_clip_vision(model_files, tmp_path, capsys, monkeypatch):
    """--checkpoint + --configs + --style-encoder + --clip-vision + --reference run offline; the reference changes
    the image and result.json records the files."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = model_files
    base = ["generate", "--product", str(m / "product.png"), "--category", "marble table", "--seed", "1",
            "--checkpoint", str(m / "model.safetensors"), "--configs", str(m / "configs"), *TINY]
    assert main(base + ["--out", str(tmp_path / "plain")]) == 0
    styled = base + ["--reference", str(m / "ref.png"), "--style-encoder", str(m / "style.safetensors"),
                     "--clip-vision", str(m / "clip_vision"), "--style-weight", "2", "--out", str(tmp_path / "styled")]
    assert main(styled) == 0
    capsys.readouterr()
    a, b = ((tmp_path / d / "raw_0.png").read_bytes() for d in ("plain", "styled"))
    assert a != b
    meta = json.loads((tmp_path / "styled" / "result.json").read_text())
    assert meta["model"].endswith("model.safetensors") and meta["style_encoder"].endswith("style.safetensors")
    assert "marble table" in meta["prompt"]


def test_style_encoder_for_another_model_is_a_clear_error(model_files, tmp_path, capsys):
    """A style encoder whose layers do not fit the UNet is refused in one line, exit 2."""
    other = tiny_style_encoder(tiny_unet(9), ClipVision(tiny_vision_encoder()))
    other.to_k_ip = other.to_k_ip[:3]
    other.to_v_ip = other.to_v_ip[:3]
    other.config = type(other.config)(**{**other.config.__dict__, "hidden_sizes": other.config.hidden_sizes[:3]})
    other.save(tmp_path / "other.safetensors")
    m = model_files
    code = main(["generate", "--product", str(m / "product.png"), "--checkpoint", str(m / "model.safetensors"),
                 "--configs", str(m / "configs"), "--style-encoder", str(tmp_path / "other.safetensors"),
                 "--clip-vision", str(m / "clip_vision"), "--out", str(tmp_path / "x"), *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "made for" in err[0]


def test_clip_vision_single_file_needs_vit_h(model_files, tmp_path):
    """A single CLIP vision file is read with the shipped ViT-H/14 config; another shape says to pass a folder."""
    from safetensors.torch import save_file

    save_file(tiny_vision_encoder().state_dict(), str(tmp_path / "clip.safetensors"))
    with pytest.raises(PipelineError, match="ViT-H/14.*folder"):
        load_clip_vision(tmp_path / "clip.safetensors")
    assert load_clip_vision(model_files / "clip_vision").size == 32


def test_clip_vision_single_file_width_picks_vit_bigg(tmp_path):
    """A 1664-wide patch embedding is read with the shipped ViT-bigG/14 config (ip-adapter_sdxl's CLIP vision): the
    error for an incomplete file names ViT-bigG, not ViT-H."""
    import torch
    from safetensors.torch import save_file

    save_file({"vision_model.embeddings.patch_embedding.weight": torch.zeros(1664, 3, 14, 14)},
              str(tmp_path / "clip_g.safetensors"))
    with pytest.raises(PipelineError, match="ViT-bigG/14.*folder"):
        load_clip_vision(tmp_path / "clip_g.safetensors")


def test_lora_option_changes_the_output(model_files, tmp_path, capsys):
    """--lora PATH:STRENGTH merges a LoRA: the generated image differs, and strength 0 changes nothing."""
    from productbg.weights.safefile import atomic_save

    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
    g = torch.Generator().manual_seed(0)
    atomic_save({f"unet.{path}.lora_A.weight": torch.randn(4, 32, generator=g),
                 f"unet.{path}.lora_B.weight": torch.randn(32, 4, generator=g)}, tmp_path / "lora.safetensors")
    m = model_files
    base = ["generate", "--product", str(m / "product.png"), "--category", "shoes", "--checkpoint",
            str(m / "model.safetensors"), "--configs", str(m / "configs"), *TINY]
    outs = {}
    for name, extra in (("none", []), ("zero", ["--lora", f"{tmp_path / 'lora.safetensors'}:0"]),
                        ("full", ["--lora", f"{tmp_path / 'lora.safetensors'}:1.5"])):
        assert main(base + extra + ["--out", str(tmp_path / name)]) == 0
        outs[name] = (tmp_path / name / "raw_0.png").read_bytes()
    capsys.readouterr()
    assert outs["none"] == outs["zero"] and outs["none"] != outs["full"]


def test_generate_with_a_bank_made_from_text(model_files, tmp_path, capsys, monkeypatch):
    """From a CSV to an image: ``bank from-text`` on the checkpoint, then ``generate --bank --category``; the
    prompt carries the category's own number of identifier vectors (its description's tokens)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = model_files
    csv = tmp_path / "cats.csv"
    csv.write_text("lamp,a cozy living room corner in the evening\nmug,marble\n", encoding="utf-8")
    bank = tmp_path / "bank.safetensors"
    assert main(["bank", "from-text", str(csv), "--checkpoint", str(m / "model.safetensors"), "--out", str(bank)]) == 0
    for category, count in (("lamp", 8), ("mug", 1)):
        out = tmp_path / category
        assert main(["generate", "--product", str(m / "product.png"), "--category", category, "--bank", str(bank),
                     "--checkpoint", str(m / "model.safetensors"), "--configs", str(m / "configs"), *TINY,
                     "--out", str(out)]) == 0, capsys.readouterr().err
        meta = json.loads((out / "result.json").read_text())
        assert meta["prompt"].count("<pbg_0_") == count and (out / "raw_0.png").is_file()
