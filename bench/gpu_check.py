"""The GPU check of issue 12: shipped workflows in real ComfyUI, the diffusers pipeline, train-cg steps (SD1.5 and
Flux.1); patched vs unpatched s/step and peak GPU memory, printed as ONE JSON line (the last line of stdout).

Run it through ``bash bench/gpu_check.sh`` (which prepares the environment; see its header). Phases:

1. ComfyUI 0.3.75 in this process (``tests/comfy_harness.ComfyInProcess``), random full-size SD1.5(-inpainting)
   checkpoints (``tests/comfy_checkpoints``), random bank / style encoder / CLIP ViT-L vision files
   (``tests/comfy_model_files``); every ``workflows/api/*.json`` graph runs with its checkpoint and model files
   swapped for those, ``--size`` canvas and ``--steps`` steps: **patched** as shipped, **unpatched** with the
   productbg attention patch nodes bypassed (the sampler's MODEL wired to the patch chain's input), and, in a graph
   with both Mask-Guided Attention and Reference Style, **identifier** with Reference Style alone bypassed — so
   ``patch_ratio`` (identifier / unpatched) is the patch's own overhead and ``style_ratio`` (patched /
   identifier) the style feature's cost. The ``*_sdxl`` graphs run on random full-size SDXL-inpainting
   checkpoints (``tests/comfy_checkpoints``) with an SDXL bank and style encoder, so the 70-layer path runs too;
   the ``*_flux`` graphs on the random full-size Flux.1 files (``tests/flux_checkpoint``: Fill with 1 double + 1
   single block at full width, fp8 T5-XXL, CLIP-L, VAE, Redux, SigLIP) with a flux bank, at ``--sdxl-size``, so
   the joint-attention path runs (Reference Style Redux is its style node). On CUDA the UNet runs in fp16 (``--fp16-unet``). Time and memory are those of ``comfy.sample.sample`` (the
   sampler alone: not CLIP, VAE or the nodes around it); ``increment_mib`` is its peak minus what was allocated
   when it started (the resident models), and ``patch_increment_mib`` / ``style_increment_mib`` the differences
   between variants: the patch's own memory, not the models'.
2. The diffusers pipeline (``ProductBGPipeline.from_single_file``, fp16 on CUDA) on the same inpainting
   checkpoint with the bank, the style encoder and a random CLIP vision model: **patched** = category +
   reference style; **unpatched** = diffusers' ``AttnProcessor2_0`` in every layer, same prompt, no reference.
   Time and peak memory are those of ``sample_inpaint`` (the denoising loop plus one VAE encode/decode).
3. train-cg steps (``bench/train_step.py``'s ``build``: CGTask on the full-size SD1.5-inpainting UNet, or the
   tiny model with ``--cpu``), bf16 autocast over bf16 frozen weights, gradient checkpointing: **patched** = our
   CG step (identifiers + mask-guided attention), **unpatched** = the plain diffusers + peft LoRA step, interleaved.

Phases 2 and 3 on Flux.1 run as phases of their own (``diffusers_flux``, ``train_flux``: the JSON's
``phases.diffusers_flux`` / ``phases.train_flux``, same ``measured`` schema as the SD entries, which are unchanged):

2f. ``diffusers_flux``: ``ProductBGPipeline.from_single_file`` on the random full-size Flux Fill files of phase 1
   (``tests/flux_checkpoint``: 1 double + 1 single block at full width, fp8 T5-XXL kept fp8, CLIP-L, VAE) with a
   flux bank and Redux (``style_model`` + SigLIP ``clip_vision``), bf16 compute on CUDA, at ``--sdxl-size``:
   **patched** = bank category + Redux reference (joint confinement); **unpatched** = diffusers'
   ``FluxAttnProcessor`` in every block, the same prompt, identifier strength 0 (no confinement), no reference.
   Time and memory are those of ``flux_run.sample_flux`` (the denoising loop plus one VAE encode/decode).
   ``info.checks`` records per variant that every output is finite and the product core (mask = 1) comes back
   bit for bit. ``--cpu``: tiny Fill files in the same layouts (``tests/flux_tiny_files``, fp8 T5 4096 wide, a
   tiny SigLIP + Redux projector), float32 compute, loaded the same way.
3f. ``train_flux``: ``--flux-train-steps`` train-cg steps of ``training.flux_cg`` (T5-space identifiers + one
   transformer LoRA) on the same Fill files (``tiny-flux-fill`` with ``--cpu``), bf16 weights (fp8 T5 stays fp8),
   bf16 autocast, gradient checkpointing: **patched** = our step (joint confinement in every block);
   **unpatched** = the same module, trainables, batch and optimizer with the text passed as it is (no free
   stream, no confinement call) and diffusers' ``FluxAttnProcessor``, interleaved. ``info.checks``: every loss
   finite; ``info.loss`` the mean loss per variant.

A failed check (``false`` in a phase's ``info.checks``) is an error of that phase: the run exits 1.

Peak memory is ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` around each measured call;
on CPU it is null (the JSON says so) and ``cpu_max_rss_mib`` gives the process's peak RSS instead.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "workflows"
STYLE_NODES = ("ProductBGReferenceStyle", "ProductBGReferenceStyleRedux")     # bypassed for "identifier"
PATCH_NODES = ("ProductBGMaskGuidedAttention",) + STYLE_NODES                 # bypassed for "unpatched"
SCHEMA = "productbg.gpu_check/1"
CPU_WORKFLOWS = ("reference_style", "reference_style_sdxl", "reference_style_flux")  # both patches, every backbone
FAMILY_ORDER = ("", "_sdxl", "_flux")  # workflow-name suffix per backbone: SD1.5, SDXL, Flux (one in memory at a time)

# (GPU, --cpu) defaults: full size on the GPU, tiny on the CPU.
DEFAULTS = {"size": (512, 64), "sdxl_size": (1024, 64), "steps": (20, 1), "repeats": (3, 1), "train_model": ("sd15", "tiny"),
            "train_resolution": (512, 64), "train_batch": (4, 2), "train_steps": (20, 2), "train_warmup": (2, 1),
            "flux_train_steps": (6, 1)}
PHASES = ("comfyui", "diffusers", "diffusers_flux", "train", "train_flux")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run on the CPU at tiny sizes (what CI checks)")
    ap.add_argument("--only", default=",".join(PHASES), help="comma-separated phases to run")
    ap.add_argument("--workflows", default="", help="comma-separated workflow names or 'all' (default: all on the "
                    f"GPU; {','.join(CPU_WORKFLOWS)} with --cpu, where one full-size UNet call takes seconds)")
    ap.add_argument("--json-out", default="", help="also write the JSON line to this file")
    for name, (gpu, cpu) in DEFAULTS.items():
        ap.add_argument("--" + name.replace("_", "-"), type=type(gpu), default=None,
                        help=f"default {gpu} (GPU) / {cpu} (--cpu)")
    args = ap.parse_args(argv)
    for name, (gpu, cpu) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, cpu if args.cpu else gpu)
    args.only = [p for p in args.only.split(",") if p]
    names = sorted(p.stem for p in (WORKFLOWS / "api").glob("*.json"))
    chosen = [n for n in args.workflows.split(",") if n]
    if chosen == ["all"] or (not chosen and not args.cpu):
        args.workflows = names
    else:
        args.workflows = chosen or list(CPU_WORKFLOWS)
    if set(args.workflows) - set(names):
        ap.error(f"unknown workflows {sorted(set(args.workflows) - set(names))} (have {', '.join(names)})")
    args.warmup = not args.cpu  # on the GPU one unmeasured run first (model transfer, kernels); on CPU no need
    unknown = set(args.only) - set(PHASES)
    if unknown:
        ap.error(f"unknown phases {sorted(unknown)}")
    return args


# ------------------------------------------------------------------------------------------------ measuring
class Meter:
    """Wall time and peak CUDA memory of calls, per variant."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.samples: dict[str, list[tuple[float, int, float | None]]] = {}

    @contextlib.contextmanager
    def measure(self, variant: str, steps: int):
        import torch

        start = 0.0
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated() / 2**20
        t0 = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None
        self.samples.setdefault(variant, []).append((dt, steps, peak, None if peak is None else peak - start))

    def summary(self) -> dict:
        out = {}
        for variant, rows in self.samples.items():
            peaks = [p for _, _, p, _ in rows if p is not None]
            increments = [i for _, _, _, i in rows if i is not None]
            out[variant] = {"s_per_step": round(statistics.median(dt / n for dt, n, _, _ in rows), 5),
                            "peak_mib": round(max(peaks), 1) if peaks else None,
                            "increment_mib": round(max(increments), 1) if increments else None, "runs": len(rows)}
        for name, (over, base) in {"ratio": ("patched", "unpatched"), "patch_ratio": ("identifier", "unpatched"),
                                   "style_ratio": ("patched", "identifier")}.items():
            if {over, base} <= out.keys():
                out[name] = round(out[over]["s_per_step"] / out[base]["s_per_step"], 4)
                if out[over]["increment_mib"] is not None:
                    key = {"ratio": "increment_mib", "patch_ratio": "patch_increment_mib",
                           "style_ratio": "style_increment_mib"}[name]
                    out[key if name != "ratio" else "patched_minus_unpatched_increment_mib"] = round(
                        out[over]["increment_mib"] - out[base]["increment_mib"], 1)
        return out


def cpu_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# ------------------------------------------------------------------------------------------------ ComfyUI
def bypass_patches(prompt: dict, bypassed: tuple[str, ...] = PATCH_NODES) -> dict:
    """The same graph with the ``bypassed`` patch nodes bypassed: each node takes the MODEL that entered them. The
    bypassed nodes no longer lead to an output, so ComfyUI does not run them."""
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        link = node["inputs"].get("model")
        while isinstance(link, list) and out[link[0]]["class_type"] in bypassed:
            link = out[link[0]]["inputs"]["model"]
        if "model" in node["inputs"] and node["class_type"] not in bypassed:
            node["inputs"]["model"] = link
    return out


def variants(patched: dict) -> dict[str, dict]:
    """patched, unpatched and — with both patch nodes in the graph — identifier (Reference Style bypassed)."""
    graphs = {"patched": patched, "unpatched": bypass_patches(patched)}
    classes = {node["class_type"] for node in patched.values()}
    if "ProductBGMaskGuidedAttention" in classes and classes & set(STYLE_NODES):
        graphs["identifier"] = bypass_patches(patched, STYLE_NODES)
    return graphs


def sized_workflow(comfy, prompt: dict, products: Path, size: int, steps: int, swap: dict | None = None) -> dict:
    """A shipped API graph with the random model files (``swap``: input name -> file, the SDXL or Flux files), a
    ``size`` canvas and ``steps`` steps (the tests' helper; the export, CPU-side and untimed, at the canvas size)."""
    from comfy_graphs import sized_workflow as shrink

    graph = shrink(comfy, prompt, products, size, steps)
    for node in graph.values() if swap else ():
        for key in swap.keys() & node["inputs"].keys():
            node["inputs"][key] = swap[key]
    return graph


def family_of(name: str) -> str:
    """A workflow's backbone suffix (``FAMILY_ORDER``)."""
    return next((f for f in FAMILY_ORDER[1:] if name.endswith(f)), "")


def flux_files(comfyui_dir: str, app, work: Path) -> dict:
    """Build (or reuse) the random full-size Flux files (tests/flux_checkpoint.py) and write a flux bank; the inputs
    to swap into the ``*_flux`` graphs."""
    import flux_checkpoint
    import torch

    from productbg.weights.bank import CategoryBank

    files = flux_checkpoint.flux_files(comfyui_dir)
    folder = work / "flux_banks"
    folder.mkdir(parents=True, exist_ok=True)
    app.folder_paths.add_model_folder_path("productbg_banks", str(folder))
    bank = CategoryBank("flux", vectors_per_id=2)
    bank.add("shoes", {"t5xxl": torch.randn(2, 4096, generator=torch.Generator().manual_seed(0)) * 0.05})
    bank.save(folder / "gpu_check_bank_flux.safetensors")
    return {"unet_name": files["fill"], "clip_name1": files["clip_l"], "clip_name2": files["t5xxl"],
            "vae_name": files["vae"], "style_model_name": files["redux"], "clip_name": files["siglip"],
            "bank_name": "gpu_check_bank_flux.safetensors"}


def sdxl_files(comfyui_dir: str, app, work: Path) -> dict:
    """Build (or reuse) the random full-size SDXL checkpoints and write the SDXL bank / style encoder; the inputs
    to swap into the ``*_sdxl`` graphs."""
    import comfy_harness
    import comfy_model_files

    checkpoints = comfy_harness.ensure_sdxl_checkpoints(comfyui_dir)
    comfy_model_files.write_sdxl_model_files(app, work / "sdxl_models")
    return {"ckpt_name": checkpoints["inpaint"], "bank_name": comfy_model_files.SDXL_BANK,
            "encoder_name": comfy_model_files.SDXL_STYLE}


def run_comfyui(args, work: Path, cuda: bool) -> tuple[dict, dict]:
    import comfy_harness
    import comfy_model_files

    comfyui_dir = os.environ["COMFYUI_DIR"]
    checkpoints = comfy_harness.ensure_checkpoints(comfyui_dir)
    app = comfy_harness.ComfyInProcess.load(comfyui_dir, REPO, work / "comfy", checkpoints, cpu=not cuda,
                                              comfy_args={"fp16_unet": True} if cuda else {})
    comfy_model_files.write_model_files(app, work / "models")
    for png in (WORKFLOWS / "inputs").glob("*.png"):
        shutil.copy(png, Path(app.input_dir) / png.name)
    products = work / "products" / "shoes"
    products.mkdir(parents=True)
    shutil.copy(WORKFLOWS / "inputs" / "productbg_example_product.png", products / "a.png")

    import comfy.model_management as mm
    import comfy.sample as comfy_sample

    meter_box: dict = {}
    info: dict = {}
    original = comfy_sample.sample

    def timed_sample(model, noise, steps, *a, **kw):      # nodes.common_ksampler calls comfy.sample.sample
        info.setdefault("unet_dtype", str(model.model.get_dtype()).removeprefix("torch."))
        meter = meter_box.get("meter")
        if meter is None:
            return original(model, noise, steps, *a, **kw)
        with meter.measure(meter_box["variant"], steps):
            return original(model, noise, steps, *a, **kw)

    comfy_sample.sample = timed_sample
    names = sorted(args.workflows, key=lambda n: FAMILY_ORDER.index(family_of(n)))  # SD1.5, SDXL, then Flux
    results, seed, swaps = {}, 1000, {"": None}
    try:
        for i, name in enumerate(names):
            family = family_of(name)
            if family not in swaps:                     # one backbone in memory at a time
                app.executor.reset()
                mm.unload_all_models()
                gc.collect()
                if family == "_sdxl":
                    swaps[family] = sdxl_files(comfyui_dir, app, work)
                    info["sdxl_checkpoint"] = swaps[family]["ckpt_name"]
                else:
                    swaps[family] = flux_files(comfyui_dir, app, work)
                    info["flux_model"] = swaps[family]["unet_name"]
            shipped = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text(encoding="utf-8"))
            graphs = variants(sized_workflow(app, shipped, products.parent, args.sdxl_size if family else args.size,
                                             args.steps, swaps[family]))
            meter_box.clear()
            if args.warmup and (i == 0 or family != family_of(names[i - 1])):
                app.run(_reseed(graphs["patched"], seed))  # warm-up: checkpoint load, first device transfer
            meter = Meter(cuda)
            order = list(graphs)
            for r in range(args.repeats):
                for variant in (order if r % 2 == 0 else order[::-1]):
                    seed += 1
                    meter_box.update(meter=meter, variant=variant)
                    app.run(_reseed(graphs[variant], seed))
            results[name] = meter.summary()
    finally:
        comfy_sample.sample = original
    info.update(device=str(mm.get_torch_device()), vae_dtype=str(mm.vae_dtype()).removeprefix("torch."),
                model_files={"checkpoint": app.ckpt_inpaint, "clip_vision": comfy_model_files.VISION_FILE})
    app.executor.reset()                               # drop cached node outputs (the loaded models)
    mm.unload_all_models()
    mm.soft_empty_cache()
    gc.collect()
    return results, {"comfyui_info": info, "model_root": str(work / "models")}


def _reseed(prompt: dict, seed: int) -> dict:
    """A new seed per run: ComfyUI's cache would otherwise skip the sampler."""
    for node in prompt.values():
        if node["class_type"] == "KSampler":
            node["inputs"]["seed"] = seed
    return prompt


# ------------------------------------------------------------------------------------------------ diffusers
def run_diffusers(args, model_root: Path, cuda: bool) -> tuple[dict, dict]:
    import logging

    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    import comfy_checkpoints
    import comfy_model_files
    import productbg.pipeline.pipeline as pipeline_module
    from productbg.pipeline import GenerateSettings, ProductBGPipeline
    from productbg.pipeline.components import ClipVision

    logging.getLogger("diffusers").setLevel(logging.ERROR)  # AttnProcessor2_0 warns about our call kwargs
    dtype = torch.float16 if cuda else torch.float32
    vision = (dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24)
              if not args.cpu else dict(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                        num_hidden_layers=2))  # CLIP ViT-L/14 shapes (tiny on --cpu)
    torch.manual_seed(0)
    clip_vision = ClipVision(CLIPVisionModelWithProjection(CLIPVisionConfig(
        **vision, patch_size=14, image_size=224, projection_dim=768)).to(dtype))
    ckpt = Path(os.environ["COMFYUI_DIR"], "models", "checkpoints", comfy_checkpoints.CKPT_INPAINT)
    pipe = ProductBGPipeline.from_single_file(
        ckpt, bank=model_root / "productbg_banks" / comfy_model_files.BANK_FILE,
        style_encoder=model_root / "productbg_style_encoders" / comfy_model_files.STYLE_FILE,
        clip_vision=clip_vision, dtype=dtype, device="cuda" if cuda else "cpu",
        settings=GenerateSettings(size=args.size, steps=args.steps))
    product = WORKFLOWS / "inputs" / "productbg_example_product.png"
    reference = WORKFLOWS / "inputs" / "productbg_example_reference.png"
    ours = dict(pipe.components.unet.attn_processors)
    plain = {name: AttnProcessor2_0() for name in ours}
    meter, box = Meter(cuda), {}
    original = pipeline_module.sample_inpaint

    def timed(*a, **kw):
        with meter.measure(box["variant"], args.steps):
            return original(*a, **kw)

    pipeline_module.sample_inpaint = timed
    try:
        if args.warmup:
            box["variant"] = "warmup"
            pipe.generate(product, "shoes", reference, seed=0)
            meter.samples.clear()
        for r in range(args.repeats):
            for variant in (("patched", "unpatched") if r % 2 == 0 else ("unpatched", "patched")):
                box["variant"] = variant
                pipe.components.unet.set_attn_processor(dict(ours if variant == "patched" else plain))
                pipe.generate(product, "shoes", reference if variant == "patched" else None, seed=r + 1)
    finally:
        pipeline_module.sample_inpaint = original
        pipe.components.unet.set_attn_processor(dict(ours))
    info = {"dtype": str(pipe.components.unet.dtype).removeprefix("torch."), "checkpoint": ckpt.name,
            "clip_vision": "random ViT-L/14 shapes" if not args.cpu else "random tiny CLIP vision"}
    del pipe
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return meter.summary(), info


# ------------------------------------------------------------------------------------------------ diffusers, Flux
def flux_bank(folder: Path) -> Path:
    """A flux bank (``t5xxl`` vectors, 4096 wide) with the category ``shoes``, as phase 1's."""
    import torch

    from productbg.weights.bank import CategoryBank

    folder.mkdir(parents=True, exist_ok=True)
    bank = CategoryBank("flux", vectors_per_id=2)
    bank.add("shoes", {"t5xxl": torch.randn(2, 4096, generator=torch.Generator().manual_seed(0)) * 0.05})
    path = folder / "gpu_check_bank_flux.safetensors"
    bank.save(path)
    return path


def flux_full_files() -> dict[str, Path]:
    """The random full-size Flux files of phase 1 (``tests/flux_checkpoint``; built once and cached, reused)."""
    import flux_checkpoint

    return flux_checkpoint.ensure_flux_files(os.environ["COMFYUI_DIR"],
                                             ["fill", "t5xxl", "clip_l", "vae", "redux", "siglip"])


def flux_tiny_files(folder: Path) -> dict[str, Path]:
    """Tiny Flux Fill files in the same layouts (``tests/flux_tiny_files``: one bundled file with an fp8 T5 4096
    wide, so a flux bank and Redux's tokens fit; its configs; a small SigLIP and a Redux projector onto 4096), so
    ``--cpu`` loads through ``from_single_file`` / ``load_redux`` as the GPU run does."""
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from flux_tiny_files import write_bundled, write_configs
    from productbg.pipeline.flux_models import tiny_flux_parts
    from productbg.pipeline.flux_redux import ReduxProjector
    from productbg.weights.safefile import atomic_save

    parts = tiny_flux_parts("fill", t5_width=4096)
    torch.manual_seed(1)
    siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=144, intermediate_size=96, num_hidden_layers=1,
                                                  num_attention_heads=2, image_size=56, patch_size=14,
                                                  vision_use_head=False))
    siglip_state = {(k if k.startswith("vision_model.") else "vision_model." + k): v.to(torch.float16).contiguous()
                    for k, v in siglip.state_dict().items() if not k.endswith("position_ids")}
    projector = ReduxProjector(144, 4096)
    folder.mkdir(parents=True, exist_ok=True)
    return {"configs": write_configs(parts, folder / "configs"),
            "fill": write_bundled(parts, folder / "tiny_flux_fill.safetensors", fp8_t5=True),
            "siglip": atomic_save(siglip_state, folder / "sigclip_vision_patch14_384.safetensors"),
            "redux": atomic_save({k: v.to(torch.bfloat16) for k, v in projector.state_dict().items()},
                                 folder / "flux1-redux-dev.safetensors")}


def weight_dtypes(module) -> list[str]:
    """The dtypes a module's linear weights are stored in (``float8_e4m3fn`` for an fp8 T5 kept fp8)."""
    import torch

    return sorted({str(m.weight.dtype).removeprefix("torch.") for m in module.modules()
                   if isinstance(m, torch.nn.Linear)})


def run_diffusers_flux(args, work: Path, cuda: bool) -> tuple[dict, dict]:
    """Phase 2 on Flux.1: ``ProductBGPipeline.from_single_file`` on the Fill files with a flux bank and Redux, timed
    around ``flux_run.sample_flux`` (the denoising loop plus one VAE encode/decode); ``patched`` = category + Redux
    reference (joint confinement), ``unpatched`` = diffusers' ``FluxAttnProcessor`` in every block, the same prompt,
    identifier strength 0 (no confinement), no reference. Checks: every output finite, product core bit for bit."""
    import logging

    import numpy as np
    import torch
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    import productbg.pipeline.flux_run as flux_run
    from productbg.pipeline import ProductBGPipeline

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        paths = flux_full_files()
        load = dict(t5=paths["t5xxl"], clip_l=paths["clip_l"], vae=paths["vae"])
    else:
        paths = flux_tiny_files(work / "flux_tiny")
        load = dict(config_dir=paths["configs"])
    pipe = ProductBGPipeline.from_single_file(paths["fill"], bank=flux_bank(work / "flux_bank"),
                                              style_model=paths["redux"], clip_vision=paths["siglip"], dtype=dtype,
                                              device="cuda" if cuda else "cpu", **load)
    pipe.settings = replace(pipe.settings, size=args.sdxl_size, steps=args.steps)
    parts = pipe.components
    product = WORKFLOWS / "inputs" / "productbg_example_product.png"
    reference = WORKFLOWS / "inputs" / "productbg_example_reference.png"
    blocks = [b.attn for b in (*parts.transformer.transformer_blocks, *parts.transformer.single_transformer_blocks)]
    ours = [a.processor for a in blocks]
    meter, box, finite = Meter(cuda), {}, {}
    original = flux_run.sample_flux

    def timed(*a, **kw):
        with meter.measure(box["variant"], args.steps):
            raw = original(*a, **kw)
        finite.setdefault(box["variant"], []).append(bool(torch.isfinite(raw).all()))  # after the timing
        return raw

    def run(variant: str, seed: int):
        box["variant"] = variant
        for attn, proc in zip(blocks, ours):
            attn.set_processor(proc if variant != "unpatched" else FluxAttnProcessor())
        if variant == "unpatched":
            return pipe.generate(product, "shoes", None, seed=seed, identifier_strength=0.0)[0]
        return pipe.generate(product, "shoes", reference, seed=seed)[0]

    core: dict[str, list[bool]] = {}
    flux_run.sample_flux = timed
    try:
        if args.warmup:
            run("warmup", 0)
            meter.samples.clear()
        for r in range(args.repeats):
            for variant in (("patched", "unpatched") if r % 2 == 0 else ("unpatched", "patched")):
                res = run(variant, r + 1)
                inner = res.mask >= 1.0
                core.setdefault(variant, []).append(bool(inner.any()) and np.array_equal(res.image[inner],
                                                                                        res.placed[inner]))
                finite[variant][-1] &= bool(np.isfinite(res.image).all())
    finally:
        flux_run.sample_flux = original
        for attn, proc in zip(blocks, ours):
            attn.set_processor(proc)
    checks = {v: {"finite": all(finite.get(v, [])), "core_bit_exact": all(core[v])} for v in core}
    info = {"family": "flux", "variant": parts.variant, "size": args.sdxl_size,
            "dtype": str(parts.transformer.dtype).removeprefix("torch."),
            "t5_linear_weights": weight_dtypes(parts.t5), "redux": True,
            "files": "random full-size Fill (1 double + 1 single block), fp8 T5-XXL, CLIP-L, VAE, Redux, SigLIP"
            if cuda else "tiny Fill (fp8 T5 4096 wide), tiny SigLIP + Redux", "checks": checks}
    del pipe, parts, blocks, ours
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return meter.summary(), info


# ------------------------------------------------------------------------------------------------ train-cg
def run_train(args, work: Path, cuda: bool) -> tuple[dict, dict]:
    import torch

    import train_step
    from productbg.training.state import step_generator

    device = "cuda" if cuda else "cpu"
    data = synth_data(work, args.train_resolution)
    task, ours, plain, processors = train_step.build(args.train_model, data, args.train_resolution, device,
                                                     gradient_checkpointing=True, weights_dtype="bfloat16")
    items = [task.dataset()[(i, i)] for i in range(args.train_batch)]
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in torch.utils.data.default_collate(items).items()}
    runs = {"patched": (ours, train_step.optimizer(ours, True)), "unpatched": (plain, train_step.optimizer(plain, False))}
    names = {"patched": "ours", "unpatched": "plain"}
    meter = Meter(cuda)
    for i in range(args.train_warmup + args.train_steps):
        for variant in (("patched", "unpatched") if i % 2 else ("unpatched", "patched")):
            module, opt = runs[variant]
            module.unet.set_attn_processor(dict(processors[names[variant]]))
            with meter.measure(variant if i >= args.train_warmup else "warmup", 1):
                train_step.timed_step(module, opt, batch, step_generator(0, i, 0, 0), autocast=torch.bfloat16)
    meter.samples.pop("warmup", None)
    info = {"model": args.train_model, "resolution": args.train_resolution, "batch": args.train_batch,
            "steps": args.train_steps, "weights_dtype": "bfloat16", "autocast": "bfloat16",
            "gradient_checkpointing": bool(ours.unet.is_gradient_checkpointing)}
    return meter.summary(), info


def synth_data(work: Path, resolution: int) -> Path:
    """The bgsynth data set train-cg steps read (made once per run, shared by the SD and Flux phases)."""
    from productbg.training import bgsynth

    data = work / f"bgsynth_{resolution}"
    if not data.exists():
        bgsynth.generate(data, bgsynth.SynthSpec(categories=8, per_category=2, held_out=0, size=resolution))
    return data


def run_train_flux(args, work: Path, cuda: bool) -> tuple[dict, dict]:
    """Phase 3 on Flux.1: train-cg steps of ``training.flux_cg`` (identifiers in T5's input space + one transformer
    LoRA) on the random full-size Fill files (GPU) or ``tiny-flux-fill`` (``--cpu``), bf16 weights (an fp8 T5 stays
    fp8), bf16 autocast, gradient checkpointing. ``patched`` = our step (joint confinement in every block);
    ``unpatched`` = the same module, trainables, batch and optimizer with the text passed plainly (no free stream,
    no confinement call) and diffusers' ``FluxAttnProcessor`` in every block, interleaved. Checks: every loss
    finite."""
    import torch
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    import productbg.training.flux_cg as flux_cg
    from productbg.training.cg import CGConfig
    from productbg.training.state import step_generator

    device = torch.device("cuda" if cuda else "cpu")
    companions = {}
    if cuda:
        paths = flux_full_files()
        model, companions = str(paths["fill"]), {k: str(paths[k]) for k in ("t5xxl", "clip_l", "vae")}
        companions["t5"] = companions.pop("t5xxl")
    else:
        model = "tiny-flux-fill"
    cfg = CGConfig(data=synth_data(work, args.train_resolution), model=model, resolution=args.train_resolution,
                   vectors_per_id=2, lora_rank=8, gradient_checkpointing=True, weights_dtype="bfloat16")
    task = flux_cg.FluxCGTask(cfg, companions=companions)
    module = task.build(device).to(device)
    module.train()
    opt = torch.optim.AdamW(task.param_groups(module, 1e-4), lr=1e-4)
    items = [task.dataset()[(i, i)] for i in range(args.train_batch)]
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in torch.utils.data.default_collate(items).items()}
    blocks = [b.attn for b in (*module.transformer.transformer_blocks, *module.transformer.single_transformer_blocks)]
    ours = [a.processor for a in blocks]
    confined = flux_cg.confined_inputs

    def plain_inputs(call, encoder_hidden_states, txt_ids):          # the unconfined step's text: as it is
        return {"encoder_hidden_states": encoder_hidden_states, "txt_ids": txt_ids}

    meter, losses = Meter(cuda), {}
    try:
        for i in range(args.train_warmup + args.flux_train_steps):
            for variant in (("patched", "unpatched") if i % 2 else ("unpatched", "patched")):
                flux_cg.confined_inputs = confined if variant == "patched" else plain_inputs
                for attn, proc in zip(blocks, ours):
                    attn.set_processor(proc if variant == "patched" else FluxAttnProcessor())
                with meter.measure(variant if i >= args.train_warmup else "warmup", 1):
                    with torch.autocast(device.type, dtype=torch.bfloat16):
                        loss = module(batch, step_generator(0, i, 0, 0))["loss"]
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                losses.setdefault(variant, []).append(loss.detach())
    finally:
        flux_cg.confined_inputs = confined
        for attn, proc in zip(blocks, ours):
            attn.set_processor(proc)
    meter.samples.pop("warmup", None)
    finite = {v: bool(torch.isfinite(torch.stack(ls)).all()) for v, ls in losses.items()}  # one sync, at the end
    info = {"family": "flux", "model": "random full-size Fill (1 double + 1 single block)" if cuda else model,
            "resolution": args.train_resolution, "batch": args.train_batch, "steps": args.flux_train_steps,
            "weights_dtype": "bfloat16", "autocast": "bfloat16", "t5_linear_weights": weight_dtypes(module.text.t5),
            "gradient_checkpointing": bool(module.transformer.is_gradient_checkpointing),
            "loss": {v: round(float(torch.stack(ls).float().mean()), 5) for v, ls in losses.items()},
            "checks": {v: {"loss_finite": ok} for v, ok in finite.items()}}
    del module, opt, task, batch, blocks, ours
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return meter.summary(), info


# ------------------------------------------------------------------------------------------------ main
def failed_checks(info: dict) -> list[str]:
    """``variant.check`` for every false entry of a phase's ``info["checks"]`` (``{variant: {check: bool}}``)."""
    return sorted(f"{v}.{k}" for v, c in info.get("checks", {}).items() for k, ok in c.items() if not ok)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    for sub in ("tests", "bench"):                       # helper modules; appended, so they shadow nothing
        if str(REPO / sub) not in sys.path:
            sys.path.append(str(REPO / sub))
    import torch

    cuda = not args.cpu
    if cuda and not torch.cuda.is_available():
        sys.exit("gpu_check: CUDA is not available (use --cpu for the CPU run)")
    result: dict = {
        "bench": "gpu_check", "schema": SCHEMA, "device": "cuda" if cuda else "cpu",
        "gpu": torch.cuda.get_device_name(0) if cuda else None, "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "peak_memory": ("torch.cuda.max_memory_allocated (MiB) around each measured call" if cuda else
                        "null on CPU (no GPU memory); see cpu_max_rss_mib for the process's peak RSS"),
        "sizes": {k: getattr(args, k) for k in DEFAULTS}, "workflows": args.workflows, "phases": {}, "errors": {}}
    work = Path(tempfile.mkdtemp(prefix="pbg_gpu_check_"))
    model_root = None
    try:
        for phase in PHASES:
            if phase not in args.only:
                continue
            t0 = time.perf_counter()
            print(f"[gpu_check] {phase} ...", file=sys.stderr, flush=True)
            try:
                if phase == "comfyui":
                    measured, extra = run_comfyui(args, work, cuda)
                    model_root = Path(extra.pop("model_root"))
                elif phase == "diffusers":
                    if model_root is None:
                        raise RuntimeError("the diffusers phase uses the model files of the comfyui phase")
                    measured, extra = run_diffusers(args, model_root, cuda)
                elif phase == "diffusers_flux":
                    measured, extra = run_diffusers_flux(args, work, cuda)
                elif phase == "train":
                    measured, extra = run_train(args, work, cuda)
                else:
                    measured, extra = run_train_flux(args, work, cuda)
                result["phases"][phase] = {"measured": measured, "info": extra,
                                           "wall_s": round(time.perf_counter() - t0, 1)}
                failed = failed_checks(extra)
                if failed:                               # measured, but a check failed: the run fails
                    result["errors"][phase] = f"checks failed: {', '.join(failed)}"
            except Exception as e:                       # report and go on: one JSON line, whatever happens
                import traceback

                traceback.print_exc()
                result["errors"][phase] = f"{type(e).__name__}: {e}"[:2000]
            print(f"[gpu_check] {phase} done in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["cpu_max_rss_mib"] = cpu_rss_mib()
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    line = json.dumps(result, ensure_ascii=False)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n", encoding="utf-8")
    print(line, flush=True)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
