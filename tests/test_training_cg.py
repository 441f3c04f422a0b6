"""Category-Wise trainer on tiny models: what trains, the mask modes, the loss options, outputs, checkpoints."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from productbg.cli import main
from productbg.training import bgsynth, checkpoint as ckpt
from productbg.training.cg import CGConfig, CGTask, jitter_masks, loss_weights
from productbg.training.outputs import read_bank_vectors
from productbg.training.state import step_generator
from productbg.weights.bank import CategoryLora, load_bank
from productbg.weights.lora import read_lora

NAMES = ("运动鞋", "手提包", "咖啡杯")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cgdata")
    bgsynth.generate(root, bgsynth.SynthSpec(categories=3, per_category=2, held_out=1, size=32, seed=2, names=NAMES))
    return root


def _module(data, **kw):
    cfg = CGConfig(data=data, resolution=32, vectors_per_id=2, lora_rank=4, **kw)
    task = CGTask(cfg)
    module = task.build(torch.device("cpu"))
    batch = torch.utils.data.default_collate([task.dataset()[(i, i)] for i in range(3)])
    return task, module, batch


def test_only_identifiers_and_lora_train(data):
    """Gradients reach the identifier vectors and the LoRA; after a step no other embedding row or base weight moved."""
    task, module, batch = _module(data, mask_mode="hard")
    emb = module.embedding.base.weight.clone()
    base = {n: p.clone() for n, p in module.unet.named_parameters() if not p.requires_grad}
    groups = task.param_groups(module, 1e-2)
    assert sum(p.numel() for g in groups for p in g["params"]) == len(task.trainable_state(module)["identifiers"].flatten()) + \
        sum(p.numel() for n, p in module.unet.named_parameters() if "lora" in n)
    opt = torch.optim.AdamW(groups)
    before = module.embedding.vectors.clone()
    out = module(batch, step_generator(0, 0, 0, 0))
    out["loss"].backward()
    grad = module.embedding.vectors.grad.view(3, 2, -1)
    assert torch.isfinite(out["loss"]) and (grad.abs().sum(-1) > 0).all()
    opt.step()
    assert not torch.equal(module.embedding.vectors, before)
    assert torch.equal(module.embedding.base.weight, emb)
    assert all(torch.equal(p, base[n]) for n, p in module.unet.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("mode, has_mass", [("hard", False), ("loss", True), ("both", True)])
def test_mask_modes(data, mode, has_mass):
    """hard: no mass term; loss/both: the identifier's attention mass inside the product enters the loss."""
    _, module, batch = _module(data, mask_mode=mode, mass_loss_weight=0.5)
    out = module(batch, step_generator(0, 0, 0, 0))
    assert (out["mass"] > 0).item() is has_mass
    assert out["loss"].item() == pytest.approx(out["mse"].item() + 0.5 * out["mass"].item(), rel=1e-5)
    if mode == "both":  # the bias already removes almost all mass from product cells
        loss_only = _module(data, mask_mode="loss", mass_loss_weight=0.5)[1](batch, step_generator(0, 0, 0, 0))
        assert out["mass"] < loss_only["mass"]


def test_background_weighted_loss_and_mask_jitter():
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:24, 8:24] = 1
    w = loss_weights(mask, (4, 4), 3.0)
    assert w[0, 0, 0, 0] == 3.0 and w[0, 0, 1, 1] == 1.0 and w.shape == (2, 1, 4, 4)
    gen = torch.Generator().manual_seed(0)
    grown, shrunk = jitter_masks(mask, gen, (0.1, 0.1)), jitter_masks(mask, gen, (-0.1, -0.1))
    assert grown.sum() > mask.sum() > shrunk.sum() > 0
    assert ((grown >= mask) & (shrunk <= mask)).all()


def test_four_channel_model_and_gradient_checkpointing(data):
    """Plain SD-style UNet trains too; gradient checkpointing gives the same gradients."""
    grads = []
    for gc in (False, True):
        _, module, batch = _module(data, model="tiny", mask_mode="both", gradient_checkpointing=gc)
        module.train()
        module(batch, step_generator(0, 0, 0, 0))["loss"].backward()
        grads.append(module.embedding.vectors.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().sum() > 0


def test_cli_trains_and_writes_bank_lora_log_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    assert main(["train-cg", "--data", str(data), "--model", "tiny-inpaint", "--output", str(out),
                 "--resolution", "32", "--max-steps", "3", "--batch-size", "2", "--vectors-per-id", "2",
                 "--lora-rank", "4", "--lr", "1e-3", "--checkpoint-every", "2", "--sample-every", "3",
                 "--grad-accum", "2", "--no-progress"]) == 0
    names, vectors = read_bank_vectors(out / "category_bank.safetensors")
    assert names == sorted(NAMES) and vectors.shape == (3, 2, 32)
    with load_bank(out / "category_bank.safetensors") as bank:   # the tiny model's width, recorded in the file
        assert bank.family == "tiny" and bank.width == 32
        assert bank.loras == {}                                    # a shared LoRA is nobody's own
    lora = read_lora(out / "unet_lora.safetensors")
    assert lora.layout == "kohya" and len(lora.modules) == 56 and lora.ranks() == [4]
    assert any(m.up.abs().sum() > 0 for m in lora.modules)            # B starts at zero: it trained
    assert all(k.startswith("lora_unet_") for k in lora.header.tensors)
    log = [json.loads(l) for l in (out / "loss_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log)
    assert ckpt.find_latest(out / "checkpoints").step == 3
    assert Image.open(out / "samples" / "step-000003.png").size == (3 * 32, 2 * 32)


def test_resume_refuses_changed_settings_and_fresh_runs_refuse_old_checkpoints(data, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["train-cg", "--data", str(data), "--output", str(out), "--resolution", "32", "--max-steps", "1",
              "--vectors-per-id", "2", "--lora-rank", "4", "--no-progress"]
    assert main(common) == 0
    assert main(common[:-1] + ["--max-steps", "2", "--lora-rank", "8", "--resume", "latest", "--no-progress"]) == 2
    assert "settings changed (lora_rank: 4 -> 8)" in capsys.readouterr().err
    assert main(common) == 2
    assert "already holds checkpoints: pass --resume latest" in capsys.readouterr().err


def test_half_written_checkpoints_are_skipped(tmp_path):
    """A .tmp folder, a missing manifest and a truncated file are each skipped; the newest good one is used."""
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        tmp = ckpt.begin(root, step)
        (tmp / "trainable.safetensors").write_bytes(b"x" * 100)
        ckpt.commit(tmp, {"step": step})
    (root / "step-000008" / "trainable.safetensors").write_bytes(b"x" * 50)     # cut short
    (root / "step-000006" / "manifest.json").unlink()                          # never finished
    ckpt.begin(root, 10)                                                       # killed while writing
    with pytest.warns(UserWarning) as record:
        found = ckpt.resolve(root, "latest")
    assert found.step == 4
    text = " ".join(str(w.message) for w in record)
    assert "step-000010.tmp" in text and "step-000008" in text and "step-000006" in text


def test_designer_single_category_lora(tmp_path, capsys):
    """--category NAME --images DIR builds a one-category dataset from alpha masks and trains on it; the bank
    names the written LoRA as NAME's own, for the Category LoRA node's "(from bank)"."""
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(2):
        arr = np.zeros((32, 32, 4), np.uint8)
        arr[..., :3], arr[8:24, 10:22] = 90 + 40 * i, (200, 30, 30, 255)
        Image.fromarray(arr, "RGBA").save(images / f"{i}.png")
    out = tmp_path / "designer"
    assert main(["train-cg", "--category", "台灯", "--images", str(images), "--output", str(out), "--model", "tiny",
                 "--resolution", "32", "--max-steps", "1", "--vectors-per-id", "1", "--lora-rank", "2",
                 "--no-progress"]) == 0
    names, vectors = read_bank_vectors(out / "category_bank.safetensors")
    assert names == ["台灯"] and vectors.shape == (1, 1, 32)
    assert read_lora(out / "unet_lora.safetensors").layout == "kohya"
    with load_bank(out / "category_bank.safetensors") as bank:
        assert bank.get("台灯").lora == CategoryLora("unet_lora.safetensors", 1.0)
        assert bank.training["trainer"] == "train-cg" and bank.width == 32
    assert "names unet_lora.safetensors as the LoRA of '台灯'" in capsys.readouterr().out


def test_single_file_checkpoint_trains(data, tmp_path):
    """An LDM-layout single-file checkpoint (what ComfyUI users have) loads offline and trains."""
    sf = pytest.importorskip("productbg.pipeline.single_file")
    from productbg.pipeline.tiny import tiny_text_encoder, tiny_unet, tiny_vae

    unet, vae, te = tiny_unet(9), tiny_vae(), tiny_text_encoder()
    path = sf.save_single_file(tmp_path / "tiny-inpaint.safetensors", unet, vae, te)
    configs = sf.write_config_dir(tmp_path / "configs", unet, vae, te)
    out = tmp_path / "run"
    assert main(["train-cg", "--data", str(data), "--model", str(path), "--model-configs", str(configs),
                 "--output", str(out), "--resolution", "32", "--max-steps", "1", "--vectors-per-id", "1",
                 "--lora-rank", "2", "--no-progress"]) == 0
    assert read_lora(out / "unet_lora.safetensors").layout == "kohya"


def test_kohya_lora_and_bank_reproduce_the_trained_model(data, tmp_path):
    """Merging the written kohya LoRA into a fresh base UNet gives the trained UNet's output; the bank holds the
    trained vectors."""
    from safetensors.torch import load_file

    from productbg.pipeline.tiny import tiny_unet

    out = tmp_path / "run"
    assert main(["train-cg", "--data", str(data), "--model", "tiny", "--output", str(out), "--resolution", "32",
                 "--max-steps", "2", "--vectors-per-id", "2", "--lora-rank", "4", "--lora-alpha", "2",
                 "--lr", "1e-2", "--no-progress"]) == 0
    task = CGTask(CGConfig(data=data, model="tiny", resolution=32, vectors_per_id=2, lora_rank=4, lora_alpha=2))
    trained = task.build(torch.device("cpu"))
    state = load_file(str(out / "checkpoints" / "step-000002" / "trainable.safetensors"))
    task.load_trainable_state(trained, state)
    assert torch.equal(read_bank_vectors(out / "category_bank.safetensors")[1], state["identifiers"].view(3, 2, 32))

    fresh = tiny_unet(4)
    with torch.no_grad():
        for m in read_lora(out / "unet_lora.safetensors").modules:
            fresh.get_submodule(m.path).weight += (m.up.float() @ m.down.float()) * m.scale
    x, ctx = torch.randn(1, 4, 4, 4), torch.randn(1, 77, 32)
    with torch.no_grad():
        ref = trained.unet(x, 10, ctx).sample        # guided processors without a call = plain attention
        merged = fresh(x, 10, ctx).sample
        base = tiny_unet(4)(x, 10, ctx).sample
    assert (merged - ref).abs().max() < 1e-4 < (base - ref).abs().max()
