"""The random full-size Flux.1 files (tests/flux_checkpoint.py) in a real ComfyUI 0.3.75: what ComfyUI's loaders
detect and how each part runs, on this CPU.

- UNETLoader: dev -> ``Flux``, fill -> ``FluxInpaint``, schnell -> ``FluxSchnell``, each with 1 double + 1 single
  block and hidden width 3072;
- DualCLIPLoader (type flux): a CLIP whose tokenizer gives ``l`` and ``t5xxl``, whose T5-XXL stays fp8 e4m3fn in
  memory, and which encodes a prompt to [1, 256, 4096] (T5 pads to 256 tokens) + pooled [1, 768];
- VAELoader: 16 latent channels, 8× down, encode and decode;
- StyleModelLoader + CLIPVisionLoader + CLIPVisionEncode + StyleModelApply: the 729 Redux tokens appended, and
  productbg's own reader of the two files (``pipeline.flux_redux``) gives the same tokens;
- the dev txt2img graph (loaders, CLIPTextEncode, FluxGuidance, KSampler euler 2 steps at 256², VAEDecode) passes
  ComfyUI's prompt validation, and its nodes give a finite latent and image.

Runs in a pytest process of its own (scripts/test.sh), never beside the SDXL modules. Build times, sizes, load and
encode times and the peak RSS are printed to the terminal at the end of the module. The module encodes one prompt
with T5-XXL: ≈80 s on a 2-core CPU at ComfyUI's 256 T5 tokens (≈40 s at 14 tokens: ComfyUI casts every fp8
weight to fp32 on each call, ≈25 s of it), so tests should encode each prompt once (module fixtures).
"""
import time

import pytest
import torch

from flux_checkpoint import FILES, REDUX_TOKENS, loader_nodes, read_header
from proc_memory import AnonPeak, reset_peak_rss, status_kib

from productbg.pipeline.flux_redux import load_redux

pytestmark = pytest.mark.comfyui

PROMPT = "a leather bag on a marble table, soft window light"
FIGURES: dict[str, str] = {}


def _say(request, line: str) -> None:
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)
    else:
        print(line)


@pytest.fixture(scope="module", autouse=True)
def flux_part(request, comfy, comfy_flux_files):
    """The module's peak RSS, wall time and the figures the tests record, printed at its end."""
    reset_peak_rss()
    t0, anon = time.time(), AnonPeak()
    yield
    FIGURES["module"] = (f"peak RSS {status_kib('VmHWM') / 2 ** 20:.1f} GiB (VmHWM, with mmap'd file pages), peak "
                         f"anonymous RSS {anon.stop() / 2 ** 20:.1f} GiB, {time.time() - t0:.0f} s")
    _say(request, "Flux ComfyUI files: " + "; ".join(f"{k}: {v}" for k, v in FIGURES.items()))


@pytest.fixture(autouse=True)
def _unload_after_each_test(comfy):
    """ComfyUI's model management keeps every model it ran; drop them so that each test's models go with it."""
    yield
    import gc

    from comfy.model_management import unload_all_models

    unload_all_models()
    gc.collect()


def _timed(name: str, fn, *args):
    t0 = time.time()
    out = fn(*args)
    FIGURES[name] = f"{time.time() - t0:.1f} s"
    return out


# ------------------------------------------------------------------------------------------------ the files
def test_files_have_the_published_layout_and_are_listed_by_comfyui(comfy, comfy_flux_files):
    files = comfy_flux_files
    heads = {k: read_header(p) for k, p in files.paths.items()}
    t5 = heads["t5xxl"]
    assert len(t5) == 219 and t5["shared.weight"]["dtype"] == "F16" and t5["shared.weight"]["shape"] == [32128, 4096]
    assert {v["dtype"] for k, v in t5.items() if k != "shared.weight"} == {"F8_E4M3"}
    assert t5["encoder.block.23.layer.1.DenseReluDense.wi_1.weight"]["shape"] == [10240, 4096]
    assert t5["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]["shape"] == [32, 64]
    assert not any("relative_attention_bias" in k for k in t5 if not k.startswith("encoder.block.0."))
    assert heads["dev"]["img_in.weight"]["shape"] == [3072, 64] and heads["fill"]["img_in.weight"]["shape"] == [3072, 384]
    assert "guidance_in.in_layer.weight" in heads["dev"] and "guidance_in.in_layer.weight" not in heads["schnell"]
    assert {v["dtype"] for v in heads["dev"].values()} == {"BF16"}
    assert heads["vae"]["decoder.conv_in.weight"]["shape"] == [512, 16, 3, 3]
    assert heads["redux"]["redux_down.weight"]["shape"] == [4096, 12288]
    assert heads["siglip"]["vision_model.embeddings.position_embedding.weight"]["shape"] == [REDUX_TOKENS, 1152]
    assert len(heads["clip_l"]) == 196 and all(k.startswith("text_model.") for k in heads["clip_l"])
    for key, (folder, _) in FILES.items():   # the symlinks are what ComfyUI's loaders list
        assert files[key] in comfy.folder_paths.get_filename_list(folder), (key, folder)
    built = files.build_seconds()
    FIGURES["files"] = ", ".join(f"{k} {files.paths[k].stat().st_size / 1e9:.2f} GB built in {built[k]:.0f} s"
                                 for k in FILES)


# ---------------------------------------------------------------------------------------------- the models
@pytest.mark.parametrize("kind, config, in_features", [("dev", "Flux", 64), ("fill", "FluxInpaint", 384),
                                                       ("schnell", "FluxSchnell", 64)])
def test_unet_loader_detects_flux_with_one_double_and_one_single_block(comfy, comfy_flux_files, kind, config,
                                                                        in_features):
    (model,) = _timed(f"UNETLoader {kind}", comfy.nodes.UNETLoader().load_unet, comfy_flux_files[kind], "default")
    base = model.model
    assert type(base.model_config).__name__ == config
    dit = base.diffusion_model
    assert len(dit.double_blocks) == 1 and len(dit.single_blocks) == 1
    assert dit.hidden_size == 3072 and dit.num_heads == 24 and dit.params.context_in_dim == 4096
    assert dit.img_in.in_features == in_features and dit.params.vec_in_dim == 768
    assert isinstance(dit.guidance_in, torch.nn.Identity) == (kind == "schnell")


@pytest.fixture(scope="module")
def flux_clip(comfy, comfy_flux_files):
    (clip,) = _timed("DualCLIPLoader flux", comfy.nodes.DualCLIPLoader().load_clip, comfy_flux_files["clip_l"],
                     comfy_flux_files["t5xxl"], "flux")
    return clip


@pytest.fixture(scope="module")
def flux_cond(comfy, flux_clip):
    """CLIPTextEncode of PROMPT (one T5-XXL encode on this CPU: timed)."""
    (cond,) = _timed("T5-XXL + CLIP-L encode (256 T5 tokens)", comfy.nodes.CLIPTextEncode().encode, flux_clip, PROMPT)
    return cond


def test_dual_clip_loader_gives_flux_clip_with_fp8_t5_and_real_tokenizers(flux_clip, flux_cond):
    tokens = flux_clip.tokenize(PROMPT)
    assert set(tokens) == {"l", "t5xxl"}
    t5_ids = [t for t, _ in tokens["t5xxl"][0]]
    assert len(t5_ids) == 256 and t5_ids.count(1) == 1     # one </s>, then padding to ComfyUI's 256-token minimum
    assert len(tokens["l"][0]) == 77
    te = flux_clip.cond_stage_model
    assert type(te).__name__ == "FluxClipModel_"
    t5 = te.t5xxl.transformer
    linears = [m for m in t5.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 24 * 7 and {m.weight.dtype for m in linears} == {torch.float8_e4m3fn}
    assert sum(p.numel() for p in t5.parameters()) > 4.7e9                        # full size
    assert te.clip_l.transformer.text_model.encoder.layers[0].mlp.fc1.weight.dtype == torch.float16
    cond, extra = flux_cond[0]
    pooled = extra["pooled_output"]
    assert cond.shape == (1, 256, 4096) and pooled.shape == (1, 768)
    assert torch.isfinite(cond).all() and torch.isfinite(pooled).all() and cond.std() > 0 and pooled.std() > 0


def test_vae_loader_gives_the_16_channel_flux_vae(comfy, comfy_flux_files):
    (vae,) = _timed("VAELoader", comfy.nodes.VAELoader().load_vae, comfy_flux_files["vae"])
    assert vae.latent_channels == 16 and vae.downscale_ratio == 8
    image = torch.rand(1, 256, 256, 3, generator=torch.Generator().manual_seed(0))
    latent = _timed("VAE encode 256²", vae.encode, image)
    assert latent.shape == (1, 16, 32, 32) and torch.isfinite(latent).all()
    decoded = _timed("VAE decode 256²", vae.decode, latent)
    assert decoded.shape == (1, 256, 256, 3) and torch.isfinite(decoded).all()


def test_redux_appends_729_siglip_tokens_to_the_conditioning(comfy, comfy_flux_files, flux_cond):
    nodes = comfy.nodes
    (style,) = _timed("StyleModelLoader", nodes.StyleModelLoader().load_style_model, comfy_flux_files["redux"])
    (vision,) = _timed("CLIPVisionLoader", nodes.CLIPVisionLoader().load_clip, comfy_flux_files["siglip"])
    assert type(style.model).__name__ == "ReduxImageEncoder"
    assert vision.image_size == 384 and len(vision.model.vision_model.encoder.layers) == 27
    image = torch.rand(1, 300, 400, 3, generator=torch.Generator().manual_seed(1))
    (out,) = _timed("CLIPVisionEncode SigLIP", nodes.CLIPVisionEncode().encode, vision, image, "center")
    assert out["last_hidden_state"].shape == (1, REDUX_TOKENS, 1152)
    (styled,) = nodes.StyleModelApply().apply_stylemodel(flux_cond, style, out, 1.0, "multiply")
    base, tokens = flux_cond[0][0], styled[0][0]
    assert tokens.shape == (1, base.shape[1] + REDUX_TOKENS, 4096)
    assert torch.equal(tokens[:, :base.shape[1]], base) and torch.isfinite(tokens).all()
    assert styled[0][1]["pooled_output"] is flux_cond[0][1]["pooled_output"]
    # productbg's own reading of the same two files (the CLI's --style-model / --clip-vision) gives these tokens
    encoder = _timed("productbg load_redux", load_redux, comfy_flux_files.paths["redux"],
                     comfy_flux_files.paths["siglip"])
    ours = _timed("productbg Redux tokens", encoder.tokens, image)
    theirs = tokens[:, base.shape[1]:].detach().float()
    assert encoder.size == vision.image_size == 384 and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def _txt2img_graph(files) -> dict:
    graph = {k: v for k, v in loader_nodes(files, "dev").items() if k in ("unet", "clip", "vae")}
    graph.update({
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": PROMPT}},
        "guided": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["pos", 0], "guidance": 3.5}},
        "neg": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["pos", 0]}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["unet", 0], "positive": ["guided", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": 3, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["vae", 0]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "flux_files_test"}},
    })
    return graph


def test_dev_txt2img_graph_validates_and_two_euler_steps_give_a_finite_latent(comfy, comfy_flux_files, flux_cond):
    """ComfyUI's executor accepts the dev txt2img graph (the names are in the loaders' lists); its nodes then run one
    by one on the module's conditioning (running the graph itself would load and encode with a second T5-XXL: one
    more encode, ≈80 s on this CPU; the shipped Flux workflows run whole in test_comfy_flux*.py)."""
    import asyncio

    from comfy_harness import format_validation_error

    valid, err, _, node_errors = asyncio.run(comfy.execution.validate_prompt("flux-files", _txt2img_graph(
        comfy_flux_files), None))
    assert valid, format_validation_error(err, node_errors)
    nodes, classes = comfy.nodes, comfy.node_class_mappings
    (model,) = nodes.UNETLoader().load_unet(comfy_flux_files["dev"], "default")
    positive = classes["FluxGuidance"].execute(flux_cond, 3.5)[0]
    negative = nodes.ConditioningZeroOut().zero_out(flux_cond)[0]
    latent = classes["EmptySD3LatentImage"].execute(256, 256, 1)[0]
    assert latent["samples"].shape == (1, 16, 32, 32)
    (out,) = _timed("KSampler 256², 2 euler steps (dev)", nodes.KSampler().sample, model, 3, 2, 1.0, "euler",
                    "simple", positive, negative, latent)
    samples = out["samples"]
    assert samples.shape == (1, 16, 32, 32) and torch.isfinite(samples).all() and samples.std() > 0
    (vae,) = nodes.VAELoader().load_vae(comfy_flux_files["vae"])
    (image,) = nodes.VAEDecode().decode(vae, out)
    assert image.shape == (1, 256, 256, 3) and torch.isfinite(image).all()
