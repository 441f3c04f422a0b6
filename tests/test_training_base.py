"""Training a model from nothing: the autoencoder task, full-UNet Category-Wise training, caption dropout."""
import json
import os

import pytest
import torch

from productbg.training import bgsynth
from productbg.training.cg import CGConfig, CGTask
from productbg.training.engine import EngineConfig, fit
from productbg.training.model_folder import replace_dir, save_pretrained_atomic
from productbg.training.state import step_generator
from productbg.training.vae import VAEConfig, VAETask


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("basedata")
    bgsynth.generate(root, bgsynth.SynthSpec(categories=3, per_category=3, held_out=1, size=32, seed=4))
    return root


def _engine(out, steps=2, **kw):
    return EngineConfig(output_dir=out, max_steps=steps, batch_size=2, lr=1e-3, progress=False, cpu=True, **kw)


def test_vae_task_trains_and_writes_a_diffusers_folder_with_unit_latents(data, tmp_path):
    from diffusers import AutoencoderKL

    cfg = VAEConfig(data=data, resolution=32, block_out_channels=(16, 16, 16), scale_samples=8)
    result = fit(VAETask(cfg), _engine(tmp_path / "run", steps=3))
    assert result.losses and all(torch.isfinite(torch.tensor(result.losses)))
    vae = AutoencoderKL.from_pretrained(tmp_path / "run" / "vae", local_files_only=True)
    task = VAETask(cfg)
    images = torch.stack([task.dataset()[(i, 0)]["image"] for i in range(8)])
    with torch.no_grad():
        z = vae.encode(images).latent_dist.mode() * vae.config.scaling_factor
    assert z.shape[-1] == 32 // 4
    assert abs(float(z.std()) - 1.0) < 0.05  # scaling_factor measured on these same images
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no temp folder left


def test_vae_resolution_must_fit_the_latent_cell(data):
    with pytest.raises(ValueError, match="multiple of the 4-pixel"):
        VAEConfig(data=data, resolution=30, block_out_channels=(8, 8, 8))


def test_full_unet_mode_trains_every_unet_weight_and_writes_a_unet_folder(data, tmp_path):
    from diffusers import UNet2DConditionModel

    cfg = CGConfig(data=data, resolution=32, vectors_per_id=2, unet="full", caption_dropout=0.5)
    task = CGTask(cfg)
    module = task.build(torch.device("cpu"))
    unet_params = list(module.unet.parameters())
    assert all(p.requires_grad for p in unet_params)
    assert all(k.startswith(("unet.", "identifiers")) for k in task.trainable_state(module))
    assert not any("lora" in n for n, _ in module.unet.named_parameters())
    before = {n: p.detach().clone() for n, p in module.unet.named_parameters()}
    fit(task, _engine(tmp_path / "run"))
    saved = UNet2DConditionModel.from_pretrained(tmp_path / "run" / "unet", local_files_only=True)
    changed = [n for n, p in saved.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) > len(before) // 2  # most weights moved (some receive no gradient in 2 steps)
    assert (tmp_path / "run" / "category_bank.safetensors").is_file()
    assert not (tmp_path / "run" / "unet_lora.safetensors").exists()


def test_caption_dropout_uses_the_empty_prompt_and_confines_nothing_for_those_rows(data):
    task = CGTask(CGConfig(data=data, resolution=32, vectors_per_id=2, lora_rank=2, caption_dropout=0.999))
    module = task.build(torch.device("cpu"))
    empty = task.dataset()
    batch = torch.utils.data.default_collate([empty[(i, i)] for i in range(2)])
    seen = {}
    original = module.guidance_call

    def spy(mask, latent_hw, collect, plain_context=None):
        seen["mask"] = mask
        return original(mask, latent_hw, collect, plain_context)

    module.guidance_call = spy
    original_encoder = module.text_encoder.forward

    def encoder_spy(ids, *a, **k):
        seen.setdefault("ids", ids)  # the first call encodes the rows' prompts (then the identifier-free one)
        return original_encoder(ids, *a, **k)

    module.text_encoder.forward = encoder_spy
    module(batch, step_generator(0, 0, 0, 0))
    assert (seen["ids"] == module.prompt_ids[0, -1]).all()  # every row dropped: only the empty prompt encoded
    assert float(seen["mask"].sum()) == 0.0  # no identifier in those rows, nothing to confine
    with pytest.raises(ValueError, match="caption_dropout"):
        CGConfig(data=data, caption_dropout=1.0)
    with pytest.raises(ValueError, match="unet must be one of"):
        CGConfig(data=data, unet="half")


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def test_save_pretrained_atomic_replaces_a_folder_whole(tmp_path):
    class Model:
        def __init__(self, text):
            self.text = text

        def save_pretrained(self, path, **kwargs):
            (path / "config.json").write_text(json.dumps({"v": self.text}))
            if self.text == "broken":
                raise RuntimeError("disk full")

    dest = tmp_path / "unet"
    save_pretrained_atomic(Model("one"), dest)
    with pytest.raises(RuntimeError):
        save_pretrained_atomic(Model("broken"), dest)
    assert json.loads((dest / "config.json").read_text()) == {"v": "one"}  # the old folder survived whole
    save_pretrained_atomic(Model("two"), dest)
    assert json.loads((dest / "config.json").read_text()) == {"v": "two"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet"]
    assert dest.stat().st_mode & 0o777 == 0o777 & ~_umask()  # not mkdtemp's 0700
    other = tmp_path / "other"
    other.mkdir()
    assert replace_dir(other, tmp_path / "fresh") == tmp_path / "fresh"
