"""``--lora`` on Flux.1 (``pipeline.flux_lora``): a transformer LoRA in ``train-cg``'s diffusers layout and the same
LoRA in kohya's layout on BFL names (fused ``qkv`` / ``linear1``) merge to the same weights, W + strength·B@A; text-
encoder parts reach CLIP-L and the fp8 T5 (dequantized); files for other models are refused in one line with the
models left as they were.

Tiny files: a Flux Fill single file in ComfyUI's layout (T5 stored fp8 as published) and its configs.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flux_tiny_files import write_bundled, write_comfy_tree, write_configs
from productbg.cli import main
from productbg.fileio.png import save_png
from productbg.imaging import load_image
from productbg.imaging.synthetic import packshot
from productbg.pipeline import ProductBGPipeline
from productbg.pipeline.components import tiny_components
from productbg.pipeline.errors import PipelineError
from productbg.pipeline.flux_files import CastLinear
from productbg.pipeline.flux_lora import add_to_linear, merge_flux_lora
from productbg.pipeline.flux_models import tiny_flux_parts
from productbg.training import bgsynth
from productbg.training.flux_cg import lora_targets
from productbg.weights.safefile import atomic_save

SMALL = ["--size", "64", "--steps", "2"]
RANK = 2
#: Beyond train-cg's targets: the MLP input of a single block (the rest of the fused linear1) and the final
#: modulation (whose halves BFL and diffusers order differently).
EXTRA = ("single_transformer_blocks.0.proj_mlp", "norm_out.linear")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """A tiny Flux Fill bundled file, its configs, a product, and a random LoRA ``{module: (A, B)}`` on train-cg's
    targets + :data:`EXTRA` of its transformer."""
    root = tmp_path_factory.mktemp("hC-flux-lora")
    parts = tiny_flux_parts("fill")
    g = torch.Generator().manual_seed(3)
    lora = {}
    for name in [*lora_targets(parts.transformer), *EXTRA]:
        layer = parts.transformer.get_submodule(name)
        lora[name] = (torch.randn(RANK, layer.in_features, generator=g) * 0.3,
                      torch.randn(layer.out_features, RANK, generator=g) * 0.3)
    return {"root": root, "configs": write_configs(parts, root / "configs"),
            "bundled": write_bundled(parts, root / "tiny_flux.safetensors", fp8_t5=True),
            "product": save_png(packshot(48).image, root / "product.png"), "lora": lora}


def _load(flux, loras=()):
    return ProductBGPipeline.from_single_file(flux["bundled"], config_dir=flux["configs"], loras=list(loras),
                                              device="cpu").components


def _diffusers_file(flux, path):
    """The LoRA as train-cg writes it: ``transformer.<module>.lora_A.weight`` / ``lora_B.weight``, no alphas."""
    tensors = {}
    for name, (a, b) in flux["lora"].items():
        tensors[f"transformer.{name}.lora_A.weight"] = a
        tensors[f"transformer.{name}.lora_B.weight"] = b
    return atomic_save(tensors, path)


def _fused(parts):
    """One LoRA of the fused module from per-part LoRAs: down rows stacked, up block-diagonal (rank × parts)."""
    down = torch.cat([a for a, _ in parts])
    up = torch.block_diag(*[b for _, b in parts])
    return down, up


def _kohya_file(flux, path, dotted=False):
    """The same LoRA in kohya's layout on BFL names (this table is written out here, independently of flux_keys):
    fused qkv and linear1, the final modulation's halves swapped; alphas that give scale 1 on fused modules and
    0.5 (with lora_up doubled) on the others."""
    lora = flux["lora"]
    d, s = "transformer_blocks.0.", "single_transformer_blocks.0."
    fused = {"double_blocks.0.img_attn.qkv": [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"],
             "double_blocks.0.txt_attn.qkv": [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"],
             "single_blocks.0.linear1": [s + "attn.to_q", s + "attn.to_k", s + "attn.to_v", s + "proj_mlp"]}
    plain = {"double_blocks.0.img_attn.proj": d + "attn.to_out.0",
             "double_blocks.0.txt_attn.proj": d + "attn.to_add_out",
             "single_blocks.0.linear2": s + "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear"}
    modules = {}
    for bfl, names in fused.items():
        down, up = _fused([lora[n] for n in names])
        modules[bfl] = (down, up, float(down.shape[0]))
    for bfl, name in plain.items():
        a, b = lora[name]
        if bfl.startswith("final_layer."):
            half = b.shape[0] // 2
            b = torch.cat([b[half:], b[:half]])  # BFL: (shift, scale); diffusers: (scale, shift)
        modules[bfl] = (a, b * 2, RANK / 2)
    assert sum(len(v) for v in fused.values()) + len(plain) == len(lora)  # every module of the LoRA is written
    tensors = {}
    for bfl, (down, up, alpha) in modules.items():
        name = "diffusion_model." + bfl if dotted else "lora_unet_" + bfl.replace(".", "_")
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    return atomic_save(tensors, path)


def _spy(monkeypatch):
    seen = []
    init = ProductBGPipeline.__init__

    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        seen.append(self)

    monkeypatch.setattr(ProductBGPipeline, "__init__", record)
    return seen


def test_a_train_cg_layout_lora_merges_exactly_from_the_cli(flux, tmp_path, monkeypatch, capsys):
    """generate --lora transformer_lora.safetensors:0.7 on the Flux file: every LoRA module's weight is exactly
    W + 0.7·B@A, every other tensor as loaded; the pictures change, the product's pixels do not."""
    path = _diffusers_file(flux, tmp_path / "transformer_lora.safetensors")
    base = {k: v.clone() for k, v in _load(flux).transformer.state_dict().items()}
    seen = _spy(monkeypatch)
    common = ["generate", "--product", str(flux["product"]), "--checkpoint", str(flux["bundled"]), "--configs",
              str(flux["configs"]), *SMALL]
    assert main([*common, "--out", str(tmp_path / "lora"), "--lora", f"{path}:0.7"]) == 0
    merged = seen[-1].components.transformer.state_dict()
    assert set(merged) == set(base)
    for name, (a, b) in flux["lora"].items():
        expected = base[name + ".weight"] + (b.float() @ a.float()) * 0.7
        assert torch.equal(merged[name + ".weight"], expected), name
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    assert changed == {n + ".weight" for n in flux["lora"]}
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    with_lora = json.loads((tmp_path / "lora" / "result.json").read_text())
    images = [load_image(tmp_path / d / json.loads((tmp_path / d / "result.json").read_text())["images"][0])[0]
              for d in ("lora", "plain")]
    assert not np.array_equal(images[0], images[1])
    placed, mask = load_image(tmp_path / "lora" / "placed.png")[0], load_image(tmp_path / "lora" / "mask.png")[0]
    core = (mask[..., 0] if mask.ndim == 3 else mask) >= 1.0
    assert core.sum() > 100 and np.array_equal(images[0][core], placed[core])
    assert str(path) in json.dumps(with_lora)  # the run records its LoRA


@pytest.mark.parametrize("dotted", [False, True], ids=["lora_unet_", "diffusion_model."])
def test_the_kohya_layout_on_bfl_names_merges_to_the_same_weights(flux, tmp_path, dotted):
    """The same LoRA on BFL names — qkv and linear1 fused, the final modulation in BFL's order, alphas — merges to
    the diffusers layout's weights (the up rows split as the weights do)."""
    peft = _diffusers_file(flux, tmp_path / "peft.safetensors")
    kohya = _kohya_file(flux, tmp_path / "kohya.safetensors", dotted)
    a = _load(flux, [(peft, 0.8)]).transformer.state_dict()
    b = _load(flux, [(kohya, 0.8)]).transformer.state_dict()
    base = _load(flux).transformer.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    assert all(not torch.equal(a[n + ".weight"], base[n + ".weight"]) for n in flux["lora"])


def test_diffusers_alpha_metadata_scales_the_update(flux, tmp_path):
    """A diffusers file whose ``lora_adapter_metadata`` says ``transformer.lora_alpha`` 1 at rank 2 merges at half
    the update of the same file without it (alpha / rank), and an ``alpha_pattern`` entry wins for its module."""
    a, b = flux["lora"]["transformer_blocks.0.attn.to_q"]
    c, d = flux["lora"]["transformer_blocks.0.attn.to_k"]
    tensors = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": a,
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": b,
               "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": c,
               "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": d}
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": RANK, "transformer.lora_alpha": 1,
                                                 "transformer.alpha_pattern": {"transformer_blocks.0.attn.to_k": 4}})}
    path = atomic_save(tensors, tmp_path / "alpha.safetensors", meta)
    base = _load(flux).transformer.state_dict()
    merged = _load(flux, [(path, 1.0)]).transformer.state_dict()
    q, k = "transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.attn.to_k.weight"
    assert torch.equal(merged[q], base[q] + (b @ a) * 0.5)
    assert torch.equal(merged[k], base[k] + (d @ c) * 2.0)


def test_text_encoder_parts_reach_clip_l_and_the_fp8_t5(flux, tmp_path):
    """kohya's lora_te1_ (CLIP-L) and lora_te3_ (T5) parts are applied: the fp8 T5 layer is dequantized, added to and
    kept in the compute dtype; CLIP-L's weight gets W + B@A."""
    base = _load(flux)
    clip_name = next(n for n, m in base.clip_l.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    t5_layer = base.t5.get_submodule("encoder.block.0.layer.0.SelfAttention.q")
    assert t5_layer.weight.dtype == torch.float8_e4m3fn  # the file's fp8 T5 as loaded
    clip_layer = base.clip_l.get_submodule(clip_name)
    g = torch.Generator().manual_seed(5)
    pairs = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": clip_layer,
             "lora_te3_encoder_block_0_layer_0_SelfAttention_q": t5_layer}
    tensors, expected = {}, {}
    for name, layer in pairs.items():
        down = torch.randn(RANK, layer.in_features, generator=g)
        up = torch.randn(layer.out_features, RANK, generator=g)
        tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
        expected[name] = layer.weight.to(torch.float32) + (up @ down) * 1.5
    path = atomic_save(tensors, tmp_path / "te.safetensors")
    parts = _load(flux, [(path, 1.5)])
    t5 = parts.t5.get_submodule("encoder.block.0.layer.0.SelfAttention.q")
    assert t5.weight.dtype == torch.float32 and torch.equal(t5.weight, expected["lora_te3_encoder_block_0_layer_0_"
                                                                                 "SelfAttention_q"])
    assert torch.equal(parts.clip_l.get_submodule(clip_name).weight,
                       expected["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"])


def test_an_fp8_layer_with_a_scale_is_dequantized_before_adding():
    """CastLinear with an fp8 weight and scale_weight: W·scale + delta, stored in the compute dtype, scale dropped;
    the layer computes with the sum. A bf16 weight stays bf16, the sum rounded once."""
    layer = CastLinear(4, 3, bias=False)
    layer.weight = torch.nn.Parameter(torch.randn(3, 4).to(torch.float8_e4m3fn), requires_grad=False)
    layer.scale_weight, layer.compute_dtype = torch.tensor(0.5), torch.float32
    delta = torch.randn(3, 4)
    want = layer.weight.float() * 0.5 + delta
    add_to_linear(layer, delta)
    assert layer.weight.dtype == torch.float32 and torch.equal(layer.weight, want) and layer.scale_weight is None
    x = torch.randn(2, 4)
    assert torch.equal(layer(x), x @ want.T)
    half = torch.nn.Linear(4, 3, bias=False).to(torch.bfloat16)  # a bf16 weight: summed in float32, rounded once
    want = (half.weight.float() + delta).to(torch.bfloat16)
    add_to_linear(half, delta)
    assert half.weight.dtype == torch.bfloat16 and torch.equal(half.weight, want)


def _refused(parts, path):
    before = {k: v.clone() for k, v in parts.transformer.state_dict().items()}
    with pytest.raises(PipelineError) as e:
        merge_flux_lora(parts, path)
    assert all(torch.equal(v, before[k]) for k, v in parts.transformer.state_dict().items())  # untouched
    return str(e.value)


def test_refusals_name_the_problem_and_change_nothing(flux, tmp_path, capsys):
    """An SD1.5 LoRA (count + example), a dev LoRA's img_in on Fill (shapes), a LoHa: one line, the models as they
    were; from the CLI exit 2 with that one line."""
    parts = _load(flux)
    a, b = flux["lora"]["transformer_blocks.0.attn.to_out.0"]
    sd = {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": a,  # one Flux module among SD1.5 ones
          "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": b}
    sd |= {f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_{p}.{s}": torch.ones(2, 2)
           for p in ("to_k", "to_v") for s in ("lora_down.weight", "lora_up.weight")}
    sd_path = atomic_save(sd, tmp_path / "sd15_lora.safetensors")
    msg = _refused(parts, sd_path)
    assert "2 of 3 LoRA modules match no Flux.1 module" in msg and "lora_unet_down_blocks_0" in msg, msg

    dev = atomic_save({"transformer.x_embedder.lora_A.weight": torch.ones(RANK, 64),
                       "transformer.x_embedder.lora_B.weight": torch.ones(32, RANK)}, tmp_path / "dev.safetensors")
    msg = _refused(parts, dev)
    assert "32×64 update" in msg and "x_embedder" in msg and "32×384" in msg, msg

    qkv = atomic_save({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.ones(RANK, 32),
                       "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.ones(3 * 64, RANK)},
                      tmp_path / "wide.safetensors")
    assert "64×32 update" in _refused(parts, qkv)  # a LoRA for a wider Flux: each third too tall

    loha = atomic_save({"lora_unet_double_blocks_0_img_attn_qkv.hada_w1_a": torch.ones(2, 2),
                        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.ones(2, 2)},
                       tmp_path / "loha.safetensors")
    assert "LoHa" in _refused(parts, loha)

    for path, words in ((sd_path, "match no Flux.1 module"), (dev, "x_embedder")):
        capsys.readouterr()
        assert main(["generate", "--product", str(flux["product"]), "--checkpoint", str(flux["bundled"]),
                     "--configs", str(flux["configs"]), "--out", str(tmp_path / "x.png"), "--lora", str(path),
                     *SMALL]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err


def test_train_cg_writes_a_lora_the_cli_merges(tmp_path, monkeypatch, capsys):
    """train-cg on a tiny Flux Fill tree (T5 4096 wide, as train-cg needs), then generate --lora with the
    transformer_lora.safetensors it wrote: each trained module's weight is exactly W + B@A, nothing else moves."""
    parts = tiny_flux_parts("fill", t5_width=4096)
    transformer = write_comfy_tree(parts, tmp_path / "ComfyUI", fp8_t5=True)
    configs = write_configs(parts, tmp_path / "configs")
    data = tmp_path / "data"
    bgsynth.generate(data, bgsynth.SynthSpec(categories=2, per_category=2, held_out=1, size=32, seed=2))
    out = tmp_path / "run"
    assert main(["train-cg", "--data", str(data), "--model", str(transformer), "--model-configs", str(configs),
                 "--output", str(out), "--resolution", "32", "--max-steps", "2", "--vectors-per-id", "2",
                 "--lora-rank", "2", "--t5-min-length", "16", "--no-progress"]) == 0
    lora = load_file(str(out / "transformer_lora.safetensors"))
    product = save_png(packshot(48).image, tmp_path / "product.png")
    seen = _spy(monkeypatch)
    common = ["generate", "--product", str(product), "--checkpoint", str(transformer), "--configs", str(configs),
              *SMALL]
    assert main([*common, "--out", str(tmp_path / "plain.png")]) == 0
    assert main([*common, "--out", str(tmp_path / "lora.png"), "--lora",
                 str(out / "transformer_lora.safetensors")]) == 0
    capsys.readouterr()
    base, merged = (p.components.transformer.state_dict() for p in seen[-2:])
    names = {k.removeprefix("transformer.").rsplit(".", 2)[0] for k in lora}
    assert names == set(lora_targets(parts.transformer))
    for name in names:
        a, b = lora[f"transformer.{name}.lora_A.weight"], lora[f"transformer.{name}.lora_B.weight"]
        assert b.abs().max() > 0, name  # trained (peft starts lora_B at zero)
        assert torch.equal(merged[name + ".weight"], base[name + ".weight"] + (b.float() @ a.float()) * 1.0), name
    assert {k for k in base if not torch.equal(base[k], merged[k])} == {n + ".weight" for n in names}


def test_a_flux_lora_on_an_sd_model_is_named(flux, tmp_path):
    """Either Flux layout given to an SD1.5 model: one line saying it is a Flux.1 LoRA."""
    peft = _diffusers_file(flux, tmp_path / "peft.safetensors")
    kohya = _kohya_file(flux, tmp_path / "kohya.safetensors")
    for path in (peft, kohya):
        with pytest.raises(PipelineError, match="is a Flux.1 LoRA; this model is SD1.5"):
            ProductBGPipeline.from_components(tiny_components(), loras=[(path, 1.0)])
