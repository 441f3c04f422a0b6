"""``train-cg`` on Flux.1 (training/flux_cg.py) with the tiny random Flux sets (T5 at T5-XXL's width 4096, so the
run writes a real ``flux`` bank): a few steps through the CLI, the identifier's gradient under joint confinement
(exactly 0 from product cells per block, and over a one-block model; not 0 without confinement), the outputs, the
refused options."""
import copy
import functools
import json

import pytest
import torch
from diffusers.loaders import FluxLoraLoaderMixin
from safetensors.torch import load_file, save_file

from productbg.attention.flux_processor import CALL_KEY
from flux_tiny_files import write_comfy_tree, write_configs
from productbg.cli import main
from productbg.training import bgsynth
from productbg.training.cg import CGConfig
from productbg.training.flux_cg import (LORA_FILE, FluxCGTask, add_flux_lora, flux_prompts, initial_t5_vectors,
                                        lora_targets, lora_tensors, T5_WIDTH)
from productbg.pipeline.flux_models import tiny_flux_parts
from productbg.weights.bank import load_bank

NAMES = ("运动鞋", "手提包", "咖啡杯")
SIZE = 64          # pixels: an 8×8 latent, 4×4 image tokens of 16×16 pixels
T5_TOKENS = 16     # T5 tokens per prompt (the template needs 12)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fluxdata")
    bgsynth.generate(root, bgsynth.SynthSpec(categories=3, per_category=2, held_out=1, size=32, seed=2, names=NAMES))
    return root


@functools.lru_cache(maxsize=None)
def _parts(variant):
    return tiny_flux_parts(variant, t5_width=T5_WIDTH)


def _module(data, variant="fill", **kw):
    cfg = CGConfig(data=data, model=f"tiny-flux-{variant}" if variant != "dev" else "tiny-flux", resolution=SIZE,
                   vectors_per_id=2, lora_rank=4, **kw)
    task = FluxCGTask(cfg, parts=lambda: copy.deepcopy(_parts(variant)), t5_min_length=T5_TOKENS)
    return task, task.build(torch.device("cpu"))


def _batch(product_tokens=((0, 0), (0, 1), (1, 0), (1, 1))):
    """Two samples (categories 0 and 2) whose product mask covers whole image tokens (16×16-pixel cells), so every
    latent is product or background and every token a product cell (a = 1) or a background cell (a = 0)."""
    g = torch.Generator().manual_seed(3)
    mask = torch.zeros(2, 1, SIZE, SIZE)
    for r, c in product_tokens:
        mask[:, :, 16 * r:16 * r + 16, 16 * c:16 * c + 16] = 1
    return {"image": torch.rand(2, 3, SIZE, SIZE, generator=g) * 2 - 1, "mask": mask,
            "category": torch.tensor([0, 2])}


def _grad(module, loss):
    (g,) = torch.autograd.grad(loss, module.text.vectors, allow_unused=True)
    return torch.zeros_like(module.text.vectors) if g is None else g


# ------------------------------------------------------------------------------------------ prompts
def test_prompts_put_the_identifier_at_t5_sentinels_as_category_prompt_does(data):
    parts = _parts("dev")
    p = flux_prompts(parts.t5_tokenizer, parts.clip_tokenizer, "a product photo on a {id} background", [2, 2, 3],
                     min_length=T5_TOKENS)
    slot = parts.t5_tokenizer.convert_tokens_to_ids("<extra_id_0>")
    assert p.ids.shape == (4, T5_TOKENS) and p.length == T5_TOKENS
    for c, n in enumerate((2, 2, 3)):
        where = (p.ids[c] == slot).nonzero().flatten().tolist()
        assert len(where) == n and p.slots[c, where].tolist() == [c * 3 + j for j in range(n)]
        assert (p.slots[c][p.ids[c] != slot] == -1).all()
    assert p.ids[-1].tolist()[:2] == [1, 0] and (p.slots[-1] == -1).all()  # the empty prompt: </s>, then pad
    text = parts.t5_tokenizer("a product photo on a background").input_ids
    assert p.plain_ids[0].tolist() == text + [0] * (T5_TOKENS - len(text))  # the slots removed, pad at the end
    assert (p.ids[:, -1] == 0).all()  # padded to the length with T5's pad


# ------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("variant", ["fill", "dev", "schnell"])
def test_a_step_is_finite_and_reaches_the_vectors_and_the_lora(data, variant):
    task, module = _module(data, variant)
    assert (module.guidance is None) == (variant == "schnell")
    assert module.guidance == {"fill": 30.0, "dev": 3.5, "schnell": None}[variant]
    out = module(_batch(), torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert module.text.vectors.grad.abs().sum() > 0
    lora = [p for p in module.transformer.parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    frozen = [p for m in (module.text.t5, module.clip_l, module.vae) for p in m.parameters()]
    assert not any(p.requires_grad for p in frozen)


def test_cli_trains_a_flux_bank_and_a_transformer_lora(data, tmp_path):
    out = tmp_path / "run"
    assert main(["train-cg", "--data", str(data), "--model", "tiny-flux-fill", "--output", str(out), "--resolution",
                 "32", "--max-steps", "3", "--batch-size", "2", "--vectors-per-id", "2", "--lora-rank", "4",
                 "--identifier-lr", "0.1", "--t5-min-length", str(T5_TOKENS), "--checkpoint-every", "3",
                 "--no-progress", "--seed", "1"]) == 0
    log = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    bank = load_bank(out / "category_bank.safetensors")
    assert bank.family == "flux" and bank.encoders == ("t5xxl",) and bank.width == 4096
    assert sorted(bank.names) == sorted(NAMES) and bank.vectors_per_id == 2
    state = load_file(str(out / "checkpoints" / "step-000003" / "trainable.safetensors"))
    trained = state["identifiers"].view(3, 2, 4096)
    start = initial_t5_vectors(_parts("fill"), bank.names, 2, "name")
    for row, name in enumerate(bank.names):
        assert torch.equal(bank.vectors(name, "t5xxl").float(), trained[row])  # the bank holds the trained vectors
        assert not torch.equal(trained[row], start[row])  # which moved from the category name's embedding
    lora = load_file(str(out / LORA_FILE))
    transformer = _parts("fill").transformer
    expected = {f"transformer.{name}.lora_{ab}.weight" for name in lora_targets(transformer) for ab in "AB"}
    assert set(lora) == expected
    assert all(lora[f"transformer.{n}.lora_A.weight"].shape[0] == 4 for n in lora_targets(transformer))


# ------------------------------------------------------------------------------------------ confinement
def _product_tokens(batch):
    """[B, N] bool: image tokens inside the product (the masks cover whole tokens)."""
    return torch.nn.functional.avg_pool2d(batch["mask"], 16).flatten(1) > 0.5  # row-major, as Flux packs them


def _block_outputs(module, batch, key, detach_others=True):
    """Run the training forward once; return block ``key``'s image output. With ``detach_others`` the block's
    image input and free text stream are detached, so the identifier reaches it only through the full text
    stream (its other inputs held fixed, as in the per-block property)."""
    kind, i = key
    block = getattr(module.transformer, kind)[i]
    seen = {}

    def pre(mod, args, kwargs):
        kw = dict(kwargs)
        call = kw["joint_attention_kwargs"][CALL_KEY]
        lf = call.text_len
        ehs = kw["encoder_hidden_states"]
        kw["hidden_states"] = kw["hidden_states"].detach()
        kw["encoder_hidden_states"] = torch.cat([ehs[:, :lf], ehs[:, lf:].detach()], 1)
        return args, kw

    def post(mod, args, kwargs, output):
        seen["image"] = output[1]

    handles = [block.register_forward_hook(post, with_kwargs=True)]
    if detach_others:
        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        module(batch, torch.Generator().manual_seed(0))
    finally:
        for h in handles:
            h.remove()
    return seen["image"]


@pytest.mark.parametrize("key", [("transformer_blocks", 0), ("single_transformer_blocks", 0)])
def test_product_cells_give_the_identifier_exactly_zero_gradient_in_every_block(data, key):
    """Per block, through the real training forward (T5 with the identifier vectors, the context embedder, the
    earlier blocks): with the block's image input and free stream held fixed, its product cells' output has an
    exactly-0 gradient w.r.t. the identifier vectors; its background cells' output does not."""
    task, module = _module(data, "fill")
    batch = _batch()
    product = _product_tokens(batch)
    assert product.any() and (~product).any()
    image = _block_outputs(module, batch, key)
    weights = torch.randn(image.shape, generator=torch.Generator().manual_seed(1))
    on_product = _grad(module, (image * weights)[product].sum())
    assert torch.equal(on_product, torch.zeros_like(on_product)), f"{key}: product cells reached the identifier"
    image = _block_outputs(module, batch, key)
    on_background = _grad(module, (image * weights)[~product].sum())
    assert on_background.abs().sum() > 0


def _one_block(module):
    """The model cut to its double block: the per-block guarantee is then the whole model's."""
    module.transformer.single_transformer_blocks = torch.nn.ModuleList()
    return module


def test_the_product_loss_gives_the_identifier_exactly_zero_gradient_through_a_one_block_model(data):
    """With background loss weight 0 the loss is the product latents' alone: over a one-block model its gradient
    w.r.t. the identifier vectors is exactly 0 under confinement, and not 0 without it (strength 0: product cells
    attend to the full text) nor with the background weighed in."""
    batch = _batch()
    _, confined = _module(data, "fill", background_loss_weight=0.0)
    g = _grad(confined, _one_block(confined)(batch, torch.Generator().manual_seed(0))["loss"])
    assert torch.equal(g, torch.zeros_like(g))
    _, unconfined = _module(data, "fill", background_loss_weight=0.0, strength=0.0)
    assert _grad(unconfined, _one_block(unconfined)(batch, torch.Generator().manual_seed(0))["loss"]).abs().sum() > 0
    _, both = _module(data, "fill", background_loss_weight=1.0)
    assert _grad(both, _one_block(both)(batch, torch.Generator().manual_seed(0))["loss"]).abs().sum() > 0


def test_across_blocks_image_attention_carries_the_identifier_to_product_cells(data):
    """What the guarantee is not: with two blocks the background cells' output of the first (which read the
    identifier) are keys of the second, so the whole model's product loss does depend on the identifier — as
    self-attention mixes product and background on UNets."""
    _, module = _module(data, "fill", background_loss_weight=0.0)
    assert _grad(module, module(_batch(), torch.Generator().manual_seed(0))["loss"]).abs().sum() > 0


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("extra, message", [
    (["--confinement", "columns"], "T5 is bidirectional"),
    (["--mask-mode", "both"], "--mask-mode both is not available on Flux"),
    (["--unet", "full"], "--unet full is not available on Flux"),
    (["--sample-every", "5"], "--sample-every is not available on Flux"),
    (["--resolution", "40"], "multiples of 16"),
])
def test_cli_refuses_what_flux_cannot_train_in_one_line(data, tmp_path, capsys, extra, message):
    code = main(["train-cg", "--data", str(data), "--model", "tiny-flux-fill", "--output", str(tmp_path / "o"),
                 "--max-steps", "1", "--no-progress", "--resolution", "32", *extra])
    err = capsys.readouterr().err.strip()
    assert code != 0 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_cli_refuses_the_t5_length_on_an_sd_model(data, tmp_path, capsys):
    code = main(["train-cg", "--data", str(data), "--model", "tiny", "--output", str(tmp_path / "o"),
                 "--max-steps", "1", "--no-progress", "--resolution", "32", "--t5-min-length", "16"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "--t5-min-length is for Flux models" in err and len(err.splitlines()) == 1


def test_diffusers_flux_lora_loader_reads_the_lora_as_trained(tmp_path):
    """The written file (alpha / rank folded into lora_B) loaded by diffusers' Flux LoRA loader into a fresh
    transformer gives exactly the trained (peft) transformer's output, which the LoRA changes."""
    trained, fresh = copy.deepcopy(_parts("dev").transformer), copy.deepcopy(_parts("dev").transformer)
    add_flux_lora(trained, 4, 8.0)  # alpha 2 × rank: the scale must travel in the file
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    save_file(lora_tensors(trained, 8.0), str(tmp_path / "lora.safetensors"))
    state = FluxLoraLoaderMixin.lora_state_dict(str(tmp_path / "lora.safetensors"))
    state, alphas = (state[0], state[1]) if isinstance(state, tuple) else (state, None)
    FluxLoraLoaderMixin.load_lora_into_transformer(state, network_alphas=alphas, transformer=fresh)
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 4, 64, generator=g), encoder_hidden_states=torch.randn(1, 5, 4096, generator=g),
              pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
              img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(5, 3), guidance=torch.tensor([3.5]))
    with torch.no_grad():
        out, loaded = trained(**kw).sample, fresh(**kw).sample
        trained.disable_adapters()
        base = trained(**kw).sample
    assert torch.equal(out, loaded) and (out - base).abs().max() > 1e-3


def test_gradient_checkpointing_changes_nothing_but_memory(data):
    """--gradient-checkpointing (the transformer's blocks and T5's recomputed in the backward pass) gives the same
    loss and the same gradients."""
    grads = []
    _parts("fill")  # built (and its seeds drawn) before the LoRAs' starts are seeded alike
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the LoRA's random start (the engine seeds before building)
        _, module = _module(data, "fill", gradient_checkpointing=checkpointing)
        module.train()
        loss = module(_batch(), torch.Generator().manual_seed(0))["loss"]
        loss.backward()
        lora = [p.grad for p in module.transformer.parameters() if p.requires_grad]
        grads.append((loss.detach(), module.text.vectors.grad, lora))
    (l0, v0, g0), (l1, v1, g1) = grads
    assert torch.equal(l0, l1) and v0.abs().sum() > 0
    torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-7)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_init_bank_starts_from_a_flux_banks_vectors_and_refuses_an_sd_bank(data, tmp_path, capsys):
    first = tmp_path / "first"
    common = ["train-cg", "--data", str(data), "--model", "tiny-flux", "--resolution", "32", "--max-steps", "1",
              "--vectors-per-id", "2", "--lora-rank", "2", "--t5-min-length", str(T5_TOKENS), "--no-progress"]
    assert main([*common, "--output", str(first)]) == 0
    bank = load_bank(first / "category_bank.safetensors")
    task = FluxCGTask(CGConfig(data=data, model="tiny-flux", resolution=32, init_bank=first / "category_bank.safetensors"),
                      parts=lambda: copy.deepcopy(_parts("dev")), t5_min_length=T5_TOKENS)
    module = task.build(torch.device("cpu"))
    for row, name in enumerate(task.categories):
        assert torch.equal(module.text.identifier_vectors()[row], bank.vectors(name, "t5xxl").float())
    sd = tmp_path / "sd"
    assert main(["train-cg", "--data", str(data), "--model", "tiny", "--resolution", "32", "--max-steps", "1",
                 "--vectors-per-id", "2", "--lora-rank", "2", "--no-progress", "--output", str(sd)]) == 0
    capsys.readouterr()
    code = main([*common, "--output", str(tmp_path / "bad"), "--init-bank", str(sd / "category_bank.safetensors")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "cannot start training on a Flux model" in err and len(err.splitlines()) == 1, err


def test_cli_trains_on_flux_files_as_comfyui_users_have_them(data, tmp_path):
    """A transformer file alone in a ComfyUI models tree, its T5 (fp8, as published), CLIP-L and VAE found in the
    tree: the loader's path (fp8 T5 linears cast per layer, its blocks recomputed for the identifier's gradient)."""
    parts = _parts("fill")
    transformer = write_comfy_tree(parts, tmp_path / "comfy", fp8_t5=True)
    configs = write_configs(parts, tmp_path / "configs")
    out = tmp_path / "run"
    assert main(["train-cg", "--data", str(data), "--model", str(transformer), "--model-configs", str(configs),
                 "--output", str(out), "--resolution", "32", "--max-steps", "2", "--vectors-per-id", "2",
                 "--lora-rank", "2", "--t5-min-length", str(T5_TOKENS), "--no-progress"]) == 0
    config = json.loads((out / "train_config.json").read_text())
    assert config["task"]["backbone"] == "flux" and config["task"]["model"] == str(transformer)
    assert load_bank(out / "category_bank.safetensors").family == "flux"
    assert set(load_file(str(out / LORA_FILE))) == {f"transformer.{n}.lora_{ab}.weight"
                                                     for n in lora_targets(parts.transformer) for ab in "AB"}


def test_cli_names_the_missing_companion_in_one_line(data, tmp_path, capsys):
    parts = _parts("dev")
    transformer = write_comfy_tree(parts, tmp_path / "comfy", fp8_t5=False)
    (tmp_path / "comfy" / "models" / "vae" / "ae.safetensors").unlink()
    code = main(["train-cg", "--data", str(data), "--model", str(transformer), "--model-configs",
                 str(write_configs(parts, tmp_path / "configs")), "--output", str(tmp_path / "o"), "--resolution", "32",
                 "--max-steps", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "--vae PATH" in err and len(err.splitlines()) == 1, err
    code = main(["train-cg", "--data", str(data), "--model", str(transformer), "--output", str(tmp_path / "o"),
                 "--vae", str(tmp_path / "nothing.safetensors"), "--max-steps", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "--vae" in err and len(err.splitlines()) == 1, err


def test_caption_dropped_rows_carry_no_identifier(data):
    """--caption-dropout: a dropped row is the empty prompt (and the empty prompt's pooled vector), so with every row
    dropped the identifier vectors get no gradient at all, and the loss is still finite."""
    _, module = _module(data, "fill", caption_dropout=0.999)
    out = module(_batch(), torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"])
    g = _grad(module, out["loss"])
    assert torch.equal(g, torch.zeros_like(g))
    assert not torch.equal(module.pooled(torch.tensor([True])), module.pooled(torch.tensor([False])))
