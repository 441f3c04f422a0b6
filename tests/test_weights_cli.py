"""``productbg weights inspect`` and ``productbg weights convert-lora``."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from productbg.cli import main
from productbg.weights.lora import read_lora, to_kohya, to_peft
from productbg.weights.safefile import atomic_save
from weight_samples import (example_bank, example_style_encoder, ip_adapter_file_dict,
                                       sd15_lora_modules, sdxl_ip_adapter_shapes, write_header_only)


def run(capsys, *argv):
    code = main(["weights", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    bank = example_bank().save(root / "bank.safetensors")
    style = atomic_save(ip_adapter_file_dict(example_style_encoder(dtype=torch.float16)), root / "ip.safetensors")
    tensors, meta = to_kohya(sd15_lora_modules(rank=4))
    kohya = atomic_save(tensors, root / "kohya.safetensors", meta)
    tensors, meta = to_peft(sd15_lora_modules(rank=2, text_encoder=False))
    peft = atomic_save(tensors, root / "peft.safetensors", meta)
    other = root / "other.safetensors"
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 4)}, str(other), {"note": "hi"})
    sdxl = write_header_only(root / "sdxl_ip.safetensors", sdxl_ip_adapter_shapes())
    return dict(bank=bank, style=style, kohya=kohya, peft=peft, other=other, sdxl=sdxl, root=root)


def test_inspect_bank(capsys, files):
    code, out, _ = run(capsys, "inspect", files["bank"])
    assert code == 0
    assert out.splitlines()[0] == "bank.safetensors: category bank (sd15)"
    assert "categories          8" in out and "运动鞋, 手提包, 咖啡杯" in out and "... (+3)" in out
    assert "clip_l [8, 2, 768] F32" in out and "a product photo on a {id} background" in out
    assert "productbg.schema = 1" in out and "category LoRAs      1" in out


def test_inspect_style_encoder(capsys, files):
    code, out, _ = run(capsys, "inspect", files["style"])
    assert code == 0 and "style encoder (sd15)" in out
    assert "published IP-Adapter" in out and "style tokens       4" in out and "width 1024" in out
    assert "fits SD1.5         yes" in out and "fits SDXL          no" in out
    assert "CLIP vision        ViT-H: clip_vision_h.safetensors" in out and "ip-adapter_sd15 layout" in out


def test_inspect_sdxl_style_encoder_says_it_does_not_fit(capsys, files):
    code, out, _ = run(capsys, "inspect", files["sdxl"])
    assert code == 0 and "style encoder (sdxl)" in out
    assert "fits SD1.5         no" in out and "SDXL (context width 2048, 70 cross-attention layers)" in out
    assert "fits SDXL          yes" in out


@pytest.mark.parametrize("release, clip", [
    ("ip-adapter_sdxl_vit-h", "ViT-H: clip_vision_h.safetensors (CLIP-ViT-H-14-laion2B-s32B-b79K)"),
    ("ip-adapter-plus_sdxl_vit-h", "ViT-H: clip_vision_h.safetensors (CLIP-ViT-H-14-laion2B-s32B-b79K)"),
    ("ip-adapter_sdxl", "ViT-bigG: clip_vision_g.safetensors (CLIP-ViT-bigG-14-laion2B-39B-b160k)"),
])
def test_inspect_names_the_sdxl_release_and_its_clip_vision(capsys, tmp_path, release, clip):
    from weight_samples import write_release_sample

    path = write_release_sample(tmp_path / "renamed.safetensors", release)   # told apart by shapes, not name
    code, out, _ = run(capsys, "inspect", path)
    assert code == 0 and out.splitlines()[0] == "renamed.safetensors: style encoder (sdxl)"
    assert f"layout             {release} layout" in out and f"CLIP vision        {clip}" in out
    assert "fits SDXL          yes" in out and "fits SD1.5         no" in out
    code, out, _ = run(capsys, "inspect", "--json", path)
    facts = json.loads(out)["facts"]
    assert facts["fits SDXL"] == "yes" and facts["layout"].startswith(release)


def test_inspect_sdxl_bank(capsys, tmp_path):
    path = example_bank(family="sdxl").save(tmp_path / "xl.safetensors")
    code, out, _ = run(capsys, "inspect", path)
    assert code == 0 and out.splitlines()[0] == "xl.safetensors: category bank (sdxl)"
    assert "clip_l [8, 2, 768] F32, clip_g [8, 2, 1280] F32" in out
    assert "SDXL checkpoints" in out and "export-embedding" in out


@pytest.mark.parametrize("key, layout", [("kohya", "kohya (ComfyUI LoraLoader)"), ("peft", "peft (diffusers/peft)")])
def test_inspect_lora(capsys, files, key, layout):
    code, out, _ = run(capsys, "inspect", files[key])
    assert code == 0 and "LoRA (sd15)" in out and layout in out


def test_inspect_unknown_and_json(capsys, files):
    code, out, _ = run(capsys, "inspect", files["other"])
    assert code == 0 and "other.safetensors: unknown" in out and "[4, 4] F32" in out
    code, out, _ = run(capsys, "inspect", "--json", files["bank"])
    report = json.loads(out)
    assert report["kind"] == "category bank" and report["facts"]["categories"] == "8"


@pytest.mark.parametrize("name, content, match", [
    ("model.ckpt", b"\x80\x04junk", "arbitrary code"),
    ("broken.safetensors", b"\xff" * 64, "header claims"),
    ("missing.safetensors", None, "no such file"),
])
def test_errors_are_one_line_exit_2(capsys, tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    code, out, err = run(capsys, "inspect", path)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("productbg weights: error:") and match in err


def test_convert_lora_both_ways(capsys, files, tmp_path):
    code, out, _ = run(capsys, "convert-lora", files["peft"], tmp_path / "k.safetensors", "--to", "kohya")
    assert code == 0 and "kohya" in out and f"{16 * 10 + 3} modules" in out
    assert read_lora(tmp_path / "k.safetensors").layout == "kohya"
    code, _, _ = run(capsys, "convert-lora", tmp_path / "k.safetensors", tmp_path / "p.safetensors", "--to", "peft")
    assert code == 0 and read_lora(tmp_path / "p.safetensors").layout == "peft"


def test_convert_lora_refuses_overwrite_and_bad_input(capsys, files, tmp_path):
    out_path = tmp_path / "exists.safetensors"
    out_path.write_bytes(b"keep")
    code, _, err = run(capsys, "convert-lora", files["kohya"], out_path, "--to", "peft")
    assert code == 2 and "--force" in err and out_path.read_bytes() == b"keep"
    code, _, _ = run(capsys, "convert-lora", files["kohya"], out_path, "--to", "peft", "--force")
    assert code == 0
    code, _, err = run(capsys, "convert-lora", files["bank"], tmp_path / "x.safetensors", "--to", "kohya")
    assert code == 2 and "not a LoRA" in err


def test_entry_point_in_subprocess(files):
    """The installed command works end to end (argparse wiring, exit status)."""
    proc = subprocess.run([sys.executable, "-P", "-m", "productbg", "weights", "inspect", str(files["bank"])],
                          capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "category bank" in proc.stdout
