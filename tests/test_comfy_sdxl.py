"""SDXL in a real ComfyUI 0.3.75: random full-size SDXL and SDXL-inpainting checkpoints (ComfyUI detects SDXL), the
shipped SDXL API workflows end to end, exact confinement at SDXL's 70 layers (alone, with Reference Style, and
stacked with IPAdapter-style objects at 3- and 2-part keys), the input MODEL untouched, and the bad-input messages.

Memory: this module runs after every SD1.5 ComfyUI module (tests/comfy_env.py orders it last; conftest unloads
models after each module) and loads one SDXL model, with the UNet in bf16 (≈5 GB instead of ≈10 GB in fp32); it
prints the peak RSS of its part (VmHWM, reset at its start) to the terminal.
"""
import json
import math
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch

from comfy_graphs import sized_workflow
from comfy_model_files import (BANK_FILE, SDXL_BANK, SDXL_CATEGORIES as CATEGORIES, SDXL_STYLE, SDXL_STYLE_VIT_H,
                               STYLE_FILE, VISION_FILE, write_sdxl_model_files)
from foreign_attn2 import ForeignAttn2
from proc_memory import AnonPeak, reset_peak_rss, status_kib

pytestmark = pytest.mark.comfyui

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
SDXL_NAMES = ("category_background_sdxl", "reference_style_sdxl", "zero_shot_confinement_sdxl")


@pytest.fixture(scope="module", autouse=True)
def sdxl_part(request, comfy):
    """bf16 UNet while this module runs; the peak RSS and wall time of the SDXL part, printed to the terminal."""
    reset_peak_rss()   # the VmHWM peak below is this module's own
    from comfy.cli_args import args

    before, args.bf16_unet = args.bf16_unet, True
    t0, anon = time.time(), AnonPeak()
    yield
    args.bf16_unet = before
    line = (f"SDXL ComfyUI tests: peak RSS {status_kib('VmHWM') / 2 ** 20:.1f} GiB (VmHWM since the module started, with "
            f"the mmap'd checkpoint pages), peak anonymous RSS {anon.stop() / 2 ** 20:.1f} GiB, "
            f"{time.time() - t0:.0f} s")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)
    else:
        print(line)


@pytest.fixture(scope="module")
def sdxl_files(comfy, comfy_model_files, tmp_path_factory):
    """An SDXL bank (clip_l + clip_g vectors), SDXL-shaped linear IP-Adapters (ViT-L- and ViT-H-wide embeds)."""
    return write_sdxl_model_files(comfy, tmp_path_factory.mktemp("sdxl_models"))


def _meta_state_dict(path: Path) -> dict:
    """The checkpoint's tensors as meta tensors of the right shapes (from the header: nothing loaded)."""
    dtypes = {"F16": torch.float16, "F32": torch.float32, "I64": torch.int64, "BF16": torch.bfloat16}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: torch.empty(v["shape"], dtype=dtypes[v["dtype"]], device="meta")
            for k, v in header.items() if k != "__metadata__"}


def test_comfyui_detects_both_random_checkpoints_as_sdxl(comfy, comfy_sdxl_checkpoints):
    import comfy.model_detection as detection

    backbones = comfy.pack_module("backbones")
    for kind, inpaint in (("sdxl", False), ("inpaint", True)):
        path = Path(comfy.folder_paths.get_full_path("checkpoints", comfy_sdxl_checkpoints[kind]))
        config = detection.model_config_from_unet(_meta_state_dict(path), "model.diffusion_model.")
        assert type(config).__name__ == "SDXL" and config.inpaint_model() == inpaint
        assert backbones.from_comfy_config("SDXL", config.unet_config) is backbones.SDXL


# ------------------------------------------------------------------ the shipped SDXL workflows
@pytest.fixture(scope="module")
def inputs(comfy, tmp_path_factory):
    for png in (WORKFLOWS / "inputs").glob("*.png"):
        shutil.copy(png, Path(comfy.input_dir) / png.name)
    return tmp_path_factory.mktemp("sdxl_products")


@pytest.mark.parametrize("name", SDXL_NAMES)
def test_sdxl_api_workflow_runs_end_to_end(comfy, comfy_sdxl_checkpoints, sdxl_files, inputs, name):
    prompt = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text(encoding="utf-8"))
    sampler = next(n["inputs"] for n in prompt.values() if n["class_type"] == "KSampler")
    backbones = comfy.pack_module("backbones")
    d = backbones.SDXL.sampler
    assert (sampler["steps"], sampler["cfg"], sampler["sampler_name"], sampler["scheduler"]) == \
        (d.steps, d.cfg, d.sampler_name, d.scheduler) and d.guidance is None
    place = next(n["inputs"] for n in prompt.values() if n["class_type"] == "ProductBGPlaceProduct")
    assert (place["width"], place["height"]) == (1024, 1024)
    small = sized_workflow(comfy, prompt, inputs, 64, 1, export_size=256)
    for node in small.values():
        swap = {"ckpt_name": comfy_sdxl_checkpoints["inpaint"], "bank_name": SDXL_BANK, "encoder_name": SDXL_STYLE}
        for key in swap.keys() & node["inputs"].keys():
            node["inputs"][key] = swap[key]
    outputs = comfy.run(small)
    by_class = {node["class_type"]: outputs.get(key, {}) for key, node in small.items()}
    (image,) = comfy.saved_images({"save": by_class["SaveImage"]})
    assert image.stat().st_size > 0
    report = json.loads(by_class["ProductBGPreservationReport"]["text"][0])
    assert report["images"][0]["checks"]["delta_e2000_mean"]["pass"]  # the product is pasted back untouched


def test_a_refused_graph_leaves_comfyui_running(comfy, comfy_sdxl_checkpoints, sdxl_files):
    """An SD1.5 bank in an SDXL graph fails on its node with the message; the next graph runs."""
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": comfy_sdxl_checkpoints["inpaint"]}},
        "2": {"class_type": "ProductBGLoadCategoryBank", "inputs": {"bank_name": BANK_FILE}},
        "3": {"class_type": "ProductBGCategoryPrompt", "inputs": {"clip": ["1", 1], "bank": ["2", 0],
                                                                   "category": "shoes", "template": "", "extra_text": ""}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}},
    }
    with pytest.raises(AssertionError, match="SD1.5 bank but the CLIP is SDXL"):
        comfy.run(graph)
    graph["2"]["inputs"]["bank_name"] = SDXL_BANK
    comfy.run(graph)


@pytest.fixture(scope="module")
def loaded(comfy, comfy_sdxl_checkpoints, sdxl_files):
    """The SDXL-inpainting checkpoint and the SDXL bank, loaded once (tests clone the model, mutate nothing).
    The executor's cached copy from the graphs above is dropped first: one SDXL model in memory at a time."""
    import gc

    import comfy.model_management as mm

    comfy.executor.reset()
    mm.unload_all_models()
    gc.collect()
    model, clip, vae = comfy.nodes.CheckpointLoaderSimple().load_checkpoint(comfy_sdxl_checkpoints["inpaint"])[:3]
    (bank,) = comfy.node_class_mappings["ProductBGLoadCategoryBank"].execute(SDXL_BANK)
    return model, clip, vae, bank


def test_the_loaded_model_and_clip_are_sdxl(comfy, loaded):
    model, clip, _, _ = loaded
    common = comfy.pack_module("nodes.common")
    assert common.backbone_of(model).family == "sdxl" and model.model.model_config.unet_config["in_channels"] == 9
    assert common.backbone_of_clip(clip.tokenize("x")).family == "sdxl"


def _zero(out, q, k, v, extra_options, **kwargs):
    return torch.zeros_like(out)


FOREIGN_KEYS = (("input", 4, 0), ("middle", 0, 9), ("output", 5, 1), ("output", 1))  # 3-part keys and a 2-part one


def _foreign(model):
    m = model.clone()
    attn2 = m.model_options.setdefault("transformer_options", {}).setdefault("patches_replace", {}).setdefault("attn2", {})
    for key in FOREIGN_KEYS:
        attn2[key] = ForeignAttn2(_zero, sigma_start=math.inf, sigma_end=0.0)
    return m


def _sample(comfy, loaded, category, variant, replay=None):
    nodes, classes = comfy.nodes, comfy.node_class_mappings
    probe = comfy.pack_module("attention.probe")
    model, clip, _, bank = loaded
    positive, identifier = classes["ProductBGCategoryPrompt"].execute(clip, bank, category, "", "soft light")
    negative = nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    mask = torch.zeros(1, 64, 64)
    mask[:, :32, :32] = 1  # a product cell and background cells on every SDXL grid (4×4 and 2×2 at 64 px)
    if variant == "foreign":
        model = _foreign(model)
    patched = classes["ProductBGMaskGuidedAttention"].execute(model, identifier, mask, 1.0, 0.0, 1.0, "context")[0]
    if variant == "style":
        (encoder,) = classes["ProductBGLoadStyleEncoder"].execute(SDXL_STYLE)
        (vision,) = nodes.CLIPVisionLoader().load_clip(VISION_FILE)
        reference = torch.rand(1, 96, 96, 3, generator=torch.Generator().manual_seed(0))
        patched = classes["ProductBGReferenceStyle"].execute(patched, encoder, vision, reference, 0.8, "style", 0.0,
                                                             1.0, product_mask=mask)[0]
    latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
    with torch.no_grad(), probe.record(keep_outputs=True, replay=replay) as rec:
        nodes.common_ksampler(patched, 1, 2, 5.0, "euler", "normal", positive, negative, latent)
    return rec, model


def test_a_from_text_bank_of_the_full_size_sdxl_checkpoint_runs_confined(comfy, comfy_sdxl_checkpoints, loaded,
                                                                            sdxl_files, tmp_path):
    """``productbg bank from-text`` on the full-size random SDXL-inpainting checkpoint (CLIP-L + OpenCLIP-G token
    embeddings): Category Prompt's conditioning equals the description written as plain words in both encoders,
    and sampling keeps the category's vectors off the product in all 70 layers."""
    from productbg.cli import main

    model, clip, _, _ = loaded
    classes = comfy.node_class_mappings
    ckpt = comfy.folder_paths.get_full_path("checkpoints", comfy_sdxl_checkpoints["inpaint"])
    rows = {"Coffee Mug": "a cozy wooden kitchen counter", "运动鞋": "a clean concrete urban sidewalk at dawn"}
    csv = tmp_path / "cats.csv"
    csv.write_text("".join(f"{k},{v}\n" for k, v in rows.items()), encoding="utf-8")
    assert main(["bank", "from-text", str(csv), "--checkpoint", ckpt,
                 "--out", str(sdxl_files / "productbg_banks" / "from_text_sdxl.safetensors")]) == 0
    (bank,) = classes["ProductBGLoadCategoryBank"].execute("from_text_sdxl.safetensors")
    assert bank.family == "sdxl" and set(bank.encoders) == {"clip_l", "clip_g"}
    for name, description in rows.items():
        cond, spec = classes["ProductBGCategoryPrompt"].execute(clip, bank, name, "", "")
        assert len(spec.token_indices) == bank.vector_count(name)
        plain = clip.encode_from_tokens(clip.tokenize(f"a product photo on a {description} background"))
        assert cond[0][0].shape == plain.shape and plain.shape[-1] == 2048
        torch.testing.assert_close(cond[0][0].float(), plain.float(), rtol=1e-3, atol=1e-3)
    positive, identifier = classes["ProductBGCategoryPrompt"].execute(clip, bank, "运动鞋", "", "")
    negative = comfy.nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    mask = torch.zeros(1, 64, 64)
    mask[:, :32, :32] = 1
    patched = classes["ProductBGMaskGuidedAttention"].execute(model, identifier, mask, 1.0, 0.0, 1.0, "context")[0]
    latent = comfy.nodes.EmptyLatentImage().generate(64, 64, 1)[0]
    probe = comfy.pack_module("attention.probe")
    with torch.no_grad(), probe.record() as rec:
        comfy.nodes.common_ksampler(patched, 1, 1, 5.0, "euler", "normal", positive, negative, latent)
    assert rec.layers() == set(range(70)) and all(r.max_mass_on_product == 0 for r in rec.identifier)


@pytest.mark.parametrize("variant", ["plain", "style", "foreign"])
def test_product_cells_do_not_depend_on_the_category_on_sdxl(comfy, loaded, variant):
    first, model = _sample(comfy, loaded, "Coffee Mug", variant)
    second, _ = _sample(comfy, loaded, "Leather Bag", variant, replay=[o.query for o in first.outputs])
    assert len(first.outputs) == len(second.outputs) == 2 * 70  # 2 steps × 70 layers (batched cond + uncond)
    assert {o.layer_index for o in first.outputs} == set(range(70))
    background_changed = 0
    for a, b in zip(first.outputs, second.outputs):
        assert a.product is not None and a.product.any()
        assert torch.equal(a.output[a.product], b.output[b.product]), f"layer {a.layer_index} leaks"
        background = ~a.product & a.product.any(1)[:, None]
        background_changed += int((a.output - b.output).abs().amax(-1)[background].max() > 0)
    assert background_changed == 2 * 70  # every SDXL grid at 64 px has background cells
    if variant == "foreign":  # the input MODEL's objects were not touched (the patched clone got its own copies)
        attn2 = model.model_options["transformer_options"]["patches_replace"]["attn2"]
        assert set(attn2) == set(FOREIGN_KEYS) and all(len(attn2[k].callback) == 1 for k in FOREIGN_KEYS)
        assert "productbg" not in model.model_options["transformer_options"]


def test_the_pooled_embedding_is_the_identifier_free_prompts_on_sdxl(comfy, loaded):
    """SDXL's pooled text embedding reaches every cell (product included) through the time embedding, so Category
    Prompt and Background Words give the identifier-free prompt's: equal for two categories, while the
    cross-attention context differs; and it is the plain prompt's own pooled output."""
    _, clip, _, bank = loaded
    classes = comfy.node_class_mappings
    (mug, _), (bag, _) = (classes["ProductBGCategoryPrompt"].execute(clip, bank, c, "", "soft light")
                          for c in ("Coffee Mug", "Leather Bag"))
    assert not torch.equal(mug[0][0], bag[0][0])
    assert torch.equal(mug[0][1]["pooled_output"], bag[0][1]["pooled_output"])
    words, _ = classes["ProductBGBackgroundWords"].execute(clip, "a mug on a marble table, soft light", "marble table")
    _, plain_pooled = clip.encode_from_tokens(clip.tokenize("a mug on a, soft light"), return_pooled=True)
    _, full_pooled = clip.encode_from_tokens(clip.tokenize("a mug on a marble table, soft light"), return_pooled=True)
    assert torch.allclose(words[0][1]["pooled_output"], plain_pooled, atol=1e-5)
    assert not torch.allclose(words[0][1]["pooled_output"], full_pooled, atol=1e-3)


def test_the_input_model_is_untouched(comfy, loaded):
    model, clip, _, bank = loaded
    before = json.dumps(model.model_options, default=repr, sort_keys=True)
    _, identifier = comfy.node_class_mappings["ProductBGCategoryPrompt"].execute(clip, bank, "shoes", "", "")
    patched = comfy.node_class_mappings["ProductBGMaskGuidedAttention"].execute(
        model, identifier, torch.ones(1, 64, 64), 1.0, 0.0, 1.0)[0]
    attn2 = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert len(attn2) == 70 and all(len(k) == 3 for k in attn2)
    assert json.dumps(model.model_options, default=repr, sort_keys=True) == before


# ------------------------------------------------------------------ bad input (one-line messages)
def _box():
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1
    return mask


def test_bad_inputs_on_sdxl_are_one_line_messages(comfy, loaded, sdxl_files):
    nodes, classes = comfy.nodes, comfy.node_class_mappings
    model, clip, _, bank = loaded
    (sd15_bank,) = classes["ProductBGLoadCategoryBank"].execute(BANK_FILE)
    (sd15_style,) = classes["ProductBGLoadStyleEncoder"].execute(STYLE_FILE)
    (vit_h_style,) = classes["ProductBGLoadStyleEncoder"].execute(SDXL_STYLE_VIT_H)
    (vision,) = nodes.CLIPVisionLoader().load_clip(VISION_FILE)
    reference = torch.rand(1, 64, 64, 3)
    cases = [
        ("SD1.5 bank but the CLIP is SDXL: use an SDXL bank",
         lambda: classes["ProductBGCategoryPrompt"].execute(clip, sd15_bank, "shoes", "", "")),
        ("is for SD1.5 but the MODEL is SDXL: use ip-adapter_sdxl_vit-h",
         lambda: classes["ProductBGReferenceStyle"].execute(model, sd15_style, vision, reference, 0.8, "all", 0.0, 1.0)),
        ("needs CLIP ViT-H",
         lambda: classes["ProductBGReferenceStyle"].execute(model, vit_h_style, vision, reference, 0.8, "all", 0.0, 1.0)),
        ("multiple of 8",
         lambda: classes["ProductBGPlaceProduct"].execute(reference, _box(), "custom", 100, 96, 0.74, "center", 0.05,
                                                          "#FFFFFF", 20)),
    ]
    for expected, call in cases:
        with pytest.raises(ValueError) as e:
            call()
        message = str(e.value)
        assert expected in message and "\n" not in message, message


