"""The diffusers pipeline on SDXL-shaped models: two text encoders of different widths, transformer depth 2,
pooled text embeds and added time ids (tiny, CPU-fast); plus one full-size SDXL single-file load offline."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

from proc_memory import AnonPeak, reset_peak_rss, status_kib
from productbg.attention import (SDXL, Guidance, IdentifierGuidance, ProductMask, probe, style_attention)
from productbg.attention.diffusers_processor import DiffusersCall, install_processors
from productbg.pipeline import GenerateSettings, ProductBGPipeline
from productbg.pipeline.components import SeededIdentifiers, tiny_components
from productbg.pipeline.errors import PipelineError
from productbg.pipeline.pipeline import defaults_for
from productbg.pipeline.prompts import PromptEncoder
from productbg.pipeline.single_file import (SDXL_CONFIGS, config_files, detect_backbone, load_single_file,
                                            save_single_file, write_config_dir)
from productbg.pipeline.text import CLIP_VOCAB_SIZE, clip_tokenizer, open_clip_tokenizer
from productbg.pipeline.tiny import TINY_XL_WIDTHS, tiny_sdxl_unet, tiny_text_encoder, tiny_text_encoder_2, tiny_vae

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CONTEXT = sum(TINY_XL_WIDTHS)


def _product(side: int = 64, w: int | None = None) -> np.ndarray:
    w = w or side
    img = np.full((side, w, 4), 0.9, np.float32)
    img[..., 3] = 0
    img[side // 4: 3 * side // 4, w // 3: 2 * w // 3] = (0.8, 0.2, 0.1, 1.0)
    return img


def _added(batch: int, hw=(64, 64)) -> dict:
    h, w = hw
    return {"text_embeds": torch.randn(batch, TINY_XL_WIDTHS[1], generator=torch.Generator().manual_seed(3)),
            "time_ids": torch.tensor([[h, w, 0, 0, h, w]] * batch, dtype=torch.float32)}


# ---------------------------------------------------------------------------------------------- files
def test_tokenizers_from_shipped_vocabulary():
    """Both SDXL tokenizers have the full 49,408-token vocabulary; CLIP-G pads with "!" (id 0), CLIP-L with EOS."""
    l, g = clip_tokenizer(), open_clip_tokenizer()
    assert len(l) == len(g) == CLIP_VOCAB_SIZE
    assert (l.pad_token_id, g.pad_token_id) == (49407, 0)
    a, b = l("a red mug", padding="max_length", max_length=77).input_ids, g("a red mug", padding="max_length", max_length=77).input_ids
    assert a[:5] == b[:5] and a[-1] == 49407 and b[-1] == 0


def test_shipped_sdxl_configs_are_the_architecture():
    """assets/sdxl: the UNet's 70 cross-attention layers are the backbone table's, in attn_processors order."""
    from diffusers import UNet2DConditionModel

    files = config_files(family="sdxl")
    assert set(files) >= {"unet", "unet_inpaint", "vae", "text_encoder", "text_encoder_2", "scheduler"}
    cfg = json.loads(files["unet"].read_text())
    assert (cfg["addition_embed_type"], cfg["projection_class_embeddings_input_dim"]) == ("text_time", 2816)
    assert cfg["transformer_layers_per_block"] == [1, 2, 10] and cfg["cross_attention_dim"] == 2048
    assert json.loads(files["unet_inpaint"].read_text())["in_channels"] == 9
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
    names = install_processors(unet)
    assert [n.removesuffix(".processor") for n in names] == [layer.diffusers_name for layer in SDXL.layers]
    te2 = json.loads(files["text_encoder_2"].read_text())
    assert (te2["hidden_size"], te2["projection_dim"], te2["num_hidden_layers"]) == (1280, 1280, 32)
    assert (SDXL_CONFIGS / "NOTICE.md").is_file()


@pytest.mark.parametrize("channels", [4, 9])
def test_tiny_sdxl_checkpoint_round_trip_offline(tmp_path, no_network, channels):
    """A tiny SDXL-shaped model written in SDXL's LDM layout is detected as SDXL and loads back bit-identical."""
    unet, vae = tiny_sdxl_unet(channels, seed=1), tiny_vae(seed=1)
    te, te2 = tiny_text_encoder(1, TINY_XL_WIDTHS[0]), tiny_text_encoder_2(seed=1)
    configs = write_config_dir(tmp_path / "configs", unet, vae, te, text_encoder_2=te2)
    ckpt = save_single_file(tmp_path / "xl.safetensors", unet, vae, te, text_encoder_2=te2)
    from safetensors import safe_open

    with safe_open(ckpt, "pt") as f:
        keys = set(f.keys())
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert any(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in keys)
    parts = load_single_file(ckpt, configs)
    assert parts.family == "sdxl" and parts.unet.config.in_channels == channels
    for original, loaded in ((unet, parts.unet), (vae, parts.vae), (te, parts.text_encoder), (te2, parts.text_encoder_2)):
        a, b = original.state_dict(), loaded.state_dict()
        assert set(a) <= set(b), type(original).__name__
        assert all(torch.equal(a[k], b[k]) for k in a), type(original).__name__


@pytest.mark.parametrize("keys, named", [
    (["conditioner.embedders.0.model.positional_embedding"], "SDXL refiner .*no CLIP-L.*SDXL base or SDXL-inpainting"),
    (["cond_stage_model.model.positional_embedding"], "SD2"),
    (["text_encoders.clip_g.transformer.x", "model.diffusion_model.joint_blocks.0.x"], "SD3"),
    (["model.diffusion_model.double_blocks.0.img_attn.qkv.weight", "distilled_guidance_layer.in_proj.weight"],
     "Chroma"),
])
def test_other_families_refused_by_name(keys, named):
    with pytest.raises(PipelineError, match=named):
        detect_backbone(keys + ["model.diffusion_model.input_blocks.0.0.weight"], "x.safetensors")
    assert detect_backbone(["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"]).family == "flux"
    assert detect_backbone(["cond_stage_model.transformer.text_model.x"]).family == "sd15"
    assert detect_backbone(["conditioner.embedders.0.transformer.text_model.x",
                            "conditioner.embedders.1.model.positional_embedding"]).family == "sdxl"


# ---------------------------------------------------------------------------------------------- prompts
def _encoder(identifiers=None):
    c = tiny_components(style=False, family="sdxl")
    return PromptEncoder(c.tokenizer, c.text_encoder, identifiers or c.identifiers, c.tokenizer_2, c.text_encoder_2)


def test_sdxl_prompt_encoding_concatenates_penultimate_layers_and_pools_clip_g():
    """Context = [CLIP-L layer -2 | CLIP-G layer -2]; pooled = CLIP-G's projection at the first EOS."""
    enc = _encoder()
    p = enc.encode(None, "a product photo on a {id} background", "")
    assert p.cond.shape == (1, 77, CONTEXT) and p.pooled.shape == (1, TINY_XL_WIDTHS[1]) and p.spec is None
    ids_l = enc.tokenizers[0](p.text, padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids_g = enc.tokenizers[1](p.text, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        h1 = enc.encoders[0](ids_l, output_hidden_states=True).hidden_states[-2]
        out2 = enc.encoders[1](ids_g, output_hidden_states=True)
    assert torch.allclose(p.cond, torch.cat([h1, out2.hidden_states[-2]], -1))
    assert torch.allclose(p.pooled, out2.text_embeds)
    assert torch.count_nonzero(enc.negative("")) == 0 and torch.count_nonzero(enc.negative_pooled("")) == 0
    assert enc.negative("blurry").shape == (1, 77, CONTEXT)


def test_sdxl_identifier_spliced_into_both_encoders():
    """An identifier's clip_l vectors enter CLIP-L, its clip_g vectors CLIP-G, at the same positions; the plain
    context and the pooled embedding are the identifier-free prompt's, so they do not depend on the category."""
    enc = _encoder()
    a, b = enc.encode("mugs"), enc.encode("lamps")
    assert a.spec.token_indices == b.spec.token_indices and len(a.spec.token_indices) == 2
    slots = enc._slots
    assert torch.equal(slots[0], slots[1])
    ids = SeededIdentifiers(TINY_XL_WIDTHS[0], widths=dict(zip(("clip_l", "clip_g"), TINY_XL_WIDTHS)))
    assert torch.equal(enc.encoders[1].get_input_embeddings().weight[slots[1]], ids.vectors("lamps", "clip_g"))
    assert not torch.allclose(a.cond, b.cond)
    assert torch.equal(a.spec.plain_context, b.spec.plain_context) and torch.equal(a.pooled, b.pooled)
    words = enc.encode("marble table", None, "")
    assert words.spec is not None  # no identifiers: the same word positions found in both tokenizations


def test_sdxl_words_found_in_both_tokenizations():
    enc = PromptEncoder(*(lambda c: (c.tokenizer, c.text_encoder, None, c.tokenizer_2, c.text_encoder_2))(
        tiny_components(style=False, family="sdxl")))
    p = enc.encode("marble table")
    ids = enc.tokenizers[1](p.text).input_ids
    target = enc.tokenizers[1]("marble table", add_special_tokens=False).input_ids
    assert [ids[i] for i in p.spec.token_indices] == target
    assert p.spec.plain_context.shape == (1, 77, CONTEXT)


# ---------------------------------------------------------------------------------------------- attention
def test_product_cells_independent_of_identifier_on_sdxl_shapes():
    """Every one of the 8 layers (depth 2): product-cell output bit-identical for two identifiers; background changes."""
    torch.manual_seed(0)
    unet = tiny_sdxl_unet()
    layers = install_processors(unet)
    assert len(layers) == 8 and "transformer_blocks.1.attn2" in layers[1]
    enc = _encoder()
    masks = torch.zeros(1, 64, 64)
    masks[:, 16:48, 16:40] = 1
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    recs = []
    for category in ("mugs", "lamps"):
        p = enc.encode(category)
        g = IdentifierGuidance(p.spec, ProductMask(masks), 1.0)
        call = DiffusersCall(Guidance().with_identifier(g), latent_hw=(8, 8), cond_or_uncond=(1, 0))
        context = torch.cat([torch.zeros_like(p.cond), p.cond])
        replay = [o.query for o in recs[0].outputs] if recs else None
        with torch.no_grad(), probe.record(keep_outputs=True, replay=replay) as rec:
            unet(latents, 10, context, cross_attention_kwargs={"productbg": call}, added_cond_kwargs=_added(2))
        recs.append(rec)
    assert len(recs[0].outputs) == 8
    for a, b in zip(recs[0].outputs, recs[1].outputs):
        diff = (a.output - b.output).abs().amax(-1)
        positive = a.product.any(1, keepdim=True).expand_as(a.product)
        assert diff[a.product].max().item() == 0.0
        assert diff[positive & ~a.product].max().item() > 1e-5


@pytest.mark.parametrize("hidden, heads, tokens", [(640, 10, 4), (1280, 20, 16)])
def test_style_matches_ip_adapter_processor_on_sdxl_shapes(hidden, heads, tokens):
    """Reference style equals IPAdapterAttnProcessor2_0 on SDXL's layer widths and 2048-wide context (≤1e-4)."""
    torch.manual_seed(0)
    attn = Attention(query_dim=hidden, cross_attention_dim=2048, heads=heads, dim_head=64)
    ip = IPAdapterAttnProcessor2_0(hidden_size=hidden, cross_attention_dim=2048, num_tokens=(tokens,), scale=0.6)
    hidden_states, text = torch.randn(2, 48, hidden), torch.randn(2, 77, 2048)
    style_tokens = torch.randn(2, tokens, 2048)
    with torch.no_grad():
        ref = ip(attn, hidden_states, encoder_hidden_states=(text, [style_tokens[:, None]]))
        q, k, v = attn.to_q(hidden_states), attn.to_k(text), attn.to_v(text)
        d = hidden // heads
        base = torch.nn.functional.scaled_dot_product_attention(
            *(t.view(2, -1, heads, d).transpose(1, 2) for t in (q, k, v))).transpose(1, 2).reshape(2, 48, hidden)
        delta = style_attention(q, ip.to_k_ip[0](style_tokens), ip.to_v_ip[0](style_tokens), heads, weight=0.6)
        ours = attn.to_out[0](base + delta)
    assert (ours - ref).abs().max() <= 1e-4


# ---------------------------------------------------------------------------------------------- pipeline
@pytest.mark.parametrize("sampler, canvas", [("ddim", None), ("dpmpp_2m_karras", (64, 80))])
def test_tiny_sdxl_pipeline_generates(sampler, canvas):
    """End to end on the SDXL-shaped tiny model: category identifier, reference style, square and 4:5-like canvas."""
    pipe = ProductBGPipeline.tiny(family="sdxl", device="cpu")
    s = dict(size=64, steps=2, sampler=sampler, canvas_size=canvas)
    shape = (64, 64) if canvas is None else (canvas[1], canvas[0])
    out = pipe.generate(_product(64, 64 if canvas is None else 52), category="mugs", reference=_product(), n=2, **s)
    assert len(out) == 2 and out[0].image.shape == (*shape, 3) and np.isfinite(out[0].image).all()
    assert out[0].report["pass"] in (True, False)
    assert not np.allclose(out[0].raw, out[1].raw)


def test_backbone_defaults():
    """The default canvas and sampler follow the backbone; SD1.5's are unchanged."""
    from productbg.attention import SD15

    assert defaults_for(SD15) == GenerateSettings()
    xl = defaults_for(SDXL)
    assert (xl.size, xl.steps, xl.guidance_scale, xl.sampler) == (1024, 30, 6.0, "dpmpp_2m_karras")
    assert ProductBGPipeline(tiny_components(style=False, family="sdxl"), device="cpu").settings.size == 1024
    assert ProductBGPipeline(tiny_components(style=False), device="cpu").settings.size == 512
    for name in ("1:1", "4:5", "3:4", "16:9", "9:16"):
        w, h = SDXL.canvases[name]
        assert GenerateSettings(canvas_size=(w, h)).canvas() == (w, h) and abs(w * h / 1024 ** 2 - 1) < 0.05


def test_canvas_not_multiple_of_8_is_one_line_error():
    with pytest.raises(PipelineError, match=r"canvas 1000x1003: .*multiples of 8.*1000x1000"):
        GenerateSettings(canvas_size=(1000, 1003))


def test_bank_of_the_other_backbone_refused():
    """An SD1.5 bank on an SDXL model and the reverse: one line naming what to use."""
    from productbg.weights.bank import CategoryBank

    xl = tiny_components(style=False, family="sdxl")
    xl.identifiers = CategoryBank("sd15")
    with pytest.raises(PipelineError, match="an SD1.5 bank but the checkpoint is SDXL: use an SDXL bank"):
        ProductBGPipeline(xl, device="cpu")
    sd = tiny_components(style=False)
    sd.identifiers = CategoryBank("sdxl")
    with pytest.raises(PipelineError, match="an SDXL bank but the checkpoint is SD1.5: use an SD1.5 bank"):
        ProductBGPipeline(sd, device="cpu")


def test_style_encoder_of_the_other_backbone_refused(tmp_path):
    """An SD1.5 IP-Adapter file on SDXL (and the reverse) is refused in one line by the file loader's target check."""
    from productbg.weights.style_encoder import StyleEncoder, StyleEncoderConfig
    from productbg.backbones.targets import SD15, SDXL as XL

    for made, used in ((SD15, "sdxl"), (XL, "sd15")):
        cfg = StyleEncoderConfig(variant="linear", tokens=4, clip_width=1024, context_dim=made.context_dim,
                                 hidden_sizes=made.hidden_sizes, family=made.family)
        with torch.device("meta"):
            enc = StyleEncoder(cfg)
        path = tmp_path / f"ip_{made.family}.safetensors"
        from productbg.weights.safefile import atomic_save

        atomic_save({k: torch.zeros(v.shape, dtype=torch.float16) for k, v in enc.file_state_dict().items()}, path)
        c = tiny_components(style=False, family=used)
        with pytest.raises(PipelineError) as e:
            ProductBGPipeline.from_components(c, style_encoder=path, device="cpu")
        assert "\n" not in str(e.value) and made.label in str(e.value), str(e.value)


# ---------------------------------------------------------------------------------------------- full size
@pytest.mark.slow
def test_full_size_sdxl_single_file_loads_offline(no_network, capsys):
    """A random full-size SDXL checkpoint in the original layout (cached, 6.9 GB fp16) is detected as SDXL and
    loads through the package's loader offline in fp16; shapes are SDXL's, prompts encode to 2048 + pooled
    1280, and one UNet forward on a 16² latent gives finite values. Prints the peak RSS and asserts how far
    the load raised it."""
    import gc

    from sdxl_checkpoint import ensure_sdxl_checkpoint

    from productbg.pipeline.single_file import checkpoint_backbone

    path = ensure_sdxl_checkpoint()
    gc.collect()
    measured = reset_peak_rss()
    before, before_anon, anon = status_kib("VmRSS"), status_kib("RssAnon"), AnonPeak()
    assert checkpoint_backbone(path).family == "sdxl"
    parts = load_single_file(path, dtype=torch.float16)
    try:
        assert parts.family == "sdxl" and parts.unet.dtype == torch.float16
        assert parts.unet.config.in_channels == 4 and parts.unet.config.cross_attention_dim == 2048
        assert len(install_processors(parts.unet)) == 70
        assert parts.text_encoder.config.hidden_size == 768 and parts.text_encoder_2.config.projection_dim == 1280
        assert parts.unet.add_embedding.linear_1.in_features == 2816
        enc = PromptEncoder(clip_tokenizer(), parts.text_encoder, None, open_clip_tokenizer(), parts.text_encoder_2)
        p = enc.encode("marble table")
        assert p.cond.shape == (1, 77, 2048) and p.pooled.shape == (1, 1280) and p.spec is not None
        added = {"text_embeds": p.pooled.half(), "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]]).half()}
        with torch.no_grad():
            out = parts.unet(torch.randn(1, 4, 16, 16).half(), 500, p.cond.half(), added_cond_kwargs=added).sample
        assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()
    finally:
        del parts
        gc.collect()
    anon_grown = (anon.stop() - before_anon) / 2 ** 20
    if measured:
        # Growth, not the process's peak: the pytest process already holds earlier tests' memory (and, on a fresh
        # machine, the heap glibc kept from building the checkpoint just above). VmHWM also counts the mmap'd
        # file's pages; the anonymous growth is what the loaded fp16 weights need (an fp32 load: ≥ 12.9 GiB).
        grown = (status_kib("VmHWM") - before) / 2 ** 20
        with capsys.disabled():
            print(f"\n[full-size SDXL] load + encode + forward: peak RSS {grown:.1f} GiB above the "
                  f"{before / 2 ** 20:.1f} GiB before the load, anonymous {anon_grown:.1f} GiB")
        assert grown < 15.0
    assert anon_grown < 10.0


# ---------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def xl_files(tmp_path_factory):
    """A tiny SDXL-shaped inpainting checkpoint in SDXL's LDM layout, its configs and a product photo."""
    from productbg.imaging.synthetic import packshot
    from productbg.fileio.png import save_png

    root = tmp_path_factory.mktemp("xl")
    unet, vae = tiny_sdxl_unet(9), tiny_vae()
    te, te2 = tiny_text_encoder(0, TINY_XL_WIDTHS[0]), tiny_text_encoder_2()
    save_single_file(root / "xl.safetensors", unet, vae, te, text_encoder_2=te2)
    write_config_dir(root / "configs", unet, vae, te, text_encoder_2=te2)
    save_png(packshot(48).image, root / "product.png")
    return root


def test_cli_generate_with_sdxl_checkpoint(xl_files, tmp_path, capsys, monkeypatch):
    """``generate --checkpoint xl.safetensors``: SDXL detected, its sampler defaults used, a non-square canvas."""
    from productbg.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = xl_files
    code = main(["generate", "--product", str(m / "product.png"), "--category", "marble table", "--checkpoint",
                 str(m / "xl.safetensors"), "--configs", str(m / "configs"), "--canvas", "64x80", "--steps", "2",
                 "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "out" / "result.json").read_text())
    assert meta["settings"]["sampler"] == "dpmpp_2m_karras" and meta["settings"]["guidance_scale"] == 6.0
    assert meta["settings"]["canvas_size"] == [64, 80]
    from PIL import Image

    assert Image.open(tmp_path / "out" / "image_0.png").size == (64, 80)


def test_sdxl_vae_stays_float32_when_loaded_in_float16(xl_files):
    """``--dtype fp16`` (``auto`` on CUDA): the UNet and text encoders are float16, the VAE float32 as its config
    says ``force_upcast`` (the shipped SDXL config does: SDXL's VAE overflows in float16), and a generation
    decodes finite pixels."""
    assert json.loads((SDXL_CONFIGS / "vae_config.json").read_text())["force_upcast"] is True
    pipe = ProductBGPipeline.from_single_file(xl_files / "xl.safetensors", config_dir=xl_files / "configs",
                                              dtype=torch.float16, device="cpu",
                                              settings=GenerateSettings(size=32, steps=2, sampler="dpmpp_2m_karras"))
    c = pipe.components
    assert c.vae.config.force_upcast
    assert (c.unet.dtype, c.text_encoder.dtype, c.text_encoder_2.dtype) == (torch.float16,) * 3
    assert c.vae.dtype == torch.float32
    result = pipe.generate(str(xl_files / "product.png"), category="shoes")[0]
    assert np.isfinite(result.raw).all()


@pytest.mark.parametrize("args, message", [
    (["--canvas", "64x81"], "multiples of 8"),
    (["--canvas", "7:3"], "not an aspect ratio of this model"),
])
def test_cli_bad_canvas_is_one_line(xl_files, tmp_path, capsys, args, message):
    from productbg.cli import main

    m = xl_files
    code = main(["generate", "--product", str(m / "product.png"), "--checkpoint", str(m / "xl.safetensors"),
                 "--configs", str(m / "configs"), *args, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]


def test_cli_refuses_sdxl_refiner(tmp_path, capsys):
    """A refiner checkpoint (OpenCLIP-G only) is refused before loading, in one line naming what to use."""
    from productbg.cli import main
    from productbg.imaging.synthetic import packshot
    from productbg.fileio.png import save_png
    from productbg.weights.safefile import atomic_save

    path = atomic_save({"conditioner.embedders.0.model.positional_embedding": torch.zeros(77, 8),
                        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)},
                       tmp_path / "refiner.safetensors")
    save_png(packshot(48).image, tmp_path / "p.png")
    code = main(["generate", "--product", str(tmp_path / "p.png"), "--checkpoint", str(path), "--out",
                 str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "SDXL refiner" in err[0] and "SDXL base or SDXL-inpainting" in err[0]



def test_sdxl_lora_reaches_both_text_encoders(tmp_path):
    """kohya lora_te1_ / lora_te2_ modules merge into CLIP-L and CLIP-G of an SDXL model."""
    from productbg.pipeline.components import merge_lora
    from productbg.weights.safefile import atomic_save

    c = tiny_components(style=False, family="sdxl")
    te2_q = c.text_encoder_2.text_model.encoder.layers[0].self_attn.q_proj.weight
    before = te2_q.clone()
    w = TINY_XL_WIDTHS[1]
    atomic_save({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(1, w),
                 "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(w, 1),
                 "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(1.0)},
                tmp_path / "xl_lora.safetensors")
    assert merge_lora(c, tmp_path / "xl_lora.safetensors", 0.5) == 1
    assert torch.allclose(te2_q - before, torch.full_like(before, 0.5))
