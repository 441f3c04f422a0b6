"""Overhead of productbg's patches inside a real ComfyUI (0.3.75) on a random full-size SD1.5 or SDXL checkpoint.

KSampler time per step (CFG, batch 1; 512² on SD1.5; on SDXL the UNet in bf16, at a size the CPU allows), variants
interleaved: unpatched; Mask-Guided Attention;
Mask-Guided Attention + Reference Style (4 style tokens, ip-adapter_sd15 shapes); and, for scale, an
IPAdapter-style extra attention of the same token count added through a foreign ``.add`` object. Also the cost of
switching category: Category Prompt with another bank category vs Category LoRA with another LoRA file (SD1.5).
Prints a table, then as its LAST line one JSON object.

Usage: bash scripts/test.sh --version >/dev/null; $PRODUCTBG_VENV/bin/python bench/comfy_overhead.py
       (needs COMFYUI_DIR; `eval "$(bash scripts/setup_env.sh)"` sets it) [--size 512] [--steps 3] [--repeats 3]
       --model sdxl --size 256 --steps 2: the SDXL row (random SDXL checkpoint, ip-adapter_sdxl_vit-h shapes)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO / "tests"))
import comfy_harness  # noqa: E402
from foreign_attn2 import ForeignAttn2  # noqa: E402
import weight_samples  # noqa: E402  (test-only sample files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("sd15", "sdxl"), default="sd15")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    comfyui_dir = os.environ.get("COMFYUI_DIR")
    if comfy_harness.comfyui_dir_problem(comfyui_dir):
        sys.exit("set COMFYUI_DIR (eval \"$(bash scripts/setup_env.sh)\")")
    xl = args.model == "sdxl"
    work = Path(tempfile.mkdtemp(prefix="pbg_bench_"))
    comfy = comfy_harness.ComfyInProcess.load(comfyui_dir, REPO, work, comfy_harness.ensure_checkpoints(comfyui_dir),
                                              comfy_args={"bf16_unet": True} if xl else None)
    nodes, pack = comfy.nodes, comfy.node_class_mappings

    backbone = comfy.pack_module("backbones").BACKBONES[args.model]
    ckpt = comfy_harness.ensure_sdxl_checkpoints(comfyui_dir)["sdxl"] if xl else comfy.ckpt_sd15
    model, clip, _ = nodes.CheckpointLoaderSimple().load_checkpoint(ckpt)[:3]

    bank_dir, lora_dir = work / "banks", work / "loras"
    bank_dir.mkdir(), lora_dir.mkdir()
    comfy.folder_paths.add_model_folder_path("productbg_banks", str(bank_dir))
    comfy.folder_paths.add_model_folder_path("loras", str(lora_dir))
    weight_samples.example_bank(("bottle", "mug", "shoe"), family=args.model).save(bank_dir / "bench.safetensors")
    from safetensors.torch import save_file
    lora_mod = comfy.pack_module("weights.lora")
    for i in range(2):
        tensors, meta = lora_mod.to_kohya(weight_samples.sd15_lora_modules(rank=8, seed=i, text_encoder=False, conv=False))
        save_file(tensors, str(lora_dir / f"bench{i}.safetensors"), metadata=meta)
    (bank,) = pack["ProductBGLoadCategoryBank"].execute("bench.safetensors")
    positive, identifier = pack["ProductBGCategoryPrompt"].execute(clip, bank, "bottle", "", "")
    negative = nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    mask = torch.zeros(1, args.size, args.size)
    lo, hi = args.size // 4, 3 * args.size // 4
    mask[:, lo:hi, lo:hi] = 1

    identifier_model = pack["ProductBGMaskGuidedAttention"].execute(model, identifier, mask, 1.0, 0.0, 1.0)[0]
    columns_model = pack["ProductBGMaskGuidedAttention"].execute(model, identifier, mask, 1.0, 0.0, 1.0, "columns")[0]
    targets = comfy.pack_module("backbones.targets")
    encoder = weight_samples.example_style_encoder("ip-adapter_sdxl_vit-h" if xl else "ip-adapter_sd15",
                                            targets.TARGETS[args.model])
    tokens = encoder(torch.randn(1, 1024)).detach()
    guided = comfy.pack_module("attention.guided")
    patch = comfy.pack_module("attention.comfy_patch")
    style = guided.StyleGuidance(tokens, torch.zeros_like(tokens), encoder.layer_kv, 0.8,
                                 backbone.layer_weights("all"), product=guided.ProductMask(mask))
    style_model = identifier_model.clone()
    patch.install(style_model.model_options, patch.current_guidance(style_model.model_options).with_style(style),
                  backbone.layer_keys)
    foreign_model = _foreign_extra_attention(model, encoder, tokens, backbone.layer_keys)

    latent = nodes.EmptyLatentImage().generate(args.size, args.size, 1)[0]
    variants = {"unpatched": model, "identifier": identifier_model, "identifier_columns": columns_model,
                "identifier_style": style_model,
                "ipadapter_style_extra": foreign_model}

    def step_time(m) -> float:
        t0 = time.perf_counter()
        nodes.common_ksampler(m, 1, args.steps, backbone.sampler.cfg, "euler", "normal", positive, negative, latent)
        return (time.perf_counter() - t0) / args.steps

    for m in variants.values():  # warm-up: model load, caches
        step_time(m)
    times = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, m in variants.items():
            times[name].append(step_time(m))
    med = {k: statistics.median(v) for k, v in times.items()}

    prompt_node, lora_node = pack["ProductBGCategoryPrompt"], pack["ProductBGCategoryLora"]
    switch_prompt = _median_ms(lambda i: prompt_node.execute(clip, bank, ("mug", "shoe")[i % 2], "", ""))
    switch_lora = math.nan if xl else _median_ms(
        lambda i: lora_node.execute(model, clip, bank, "mug", f"bench{i % 2}.safetensors", 1.0, 1.0))

    print(f"ComfyUI 0.3.75, random {backbone.label}{' (bf16 UNet)' if xl else ''}, {args.size}², {args.steps} steps "
          f"x {args.repeats} interleaved repeats, {'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"{'variant':<24}{'s/step':>10}{'ratio':>8}")
    for name in variants:
        print(f"{name:<24}{med[name]:>10.3f}{med[name] / med['unpatched']:>8.3f}")
    print(f"category switch: Category Prompt {switch_prompt:.1f} ms, Category LoRA {switch_lora:.1f} ms")
    result = {k: round(med[k] / med["unpatched"], 4) for k in ("identifier", "identifier_columns", "identifier_style",
                                                              "ipadapter_style_extra")}
    result.update(model=args.model, size=args.size, unpatched_s_per_step=round(med["unpatched"], 3),
                  switch_category_prompt_ms=round(switch_prompt, 1))
    if not xl:
        result.update(switch_category_lora_ms=round(switch_lora, 1))
    print(json.dumps(result))


def _median_ms(fn, n: int = 6) -> float:
    fn(1)  # warm the LoRA file cache
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - t0) * 1000)
    return statistics.median(out)


def _extra_attention(out, q, k, v, extra_options, encoder=None, tokens=None, layer=0, **_):
    from comfy.ldm.modules.attention import optimized_attention

    ks, vs = encoder.layer_kv(layer, tokens.to(q))
    rows = q.shape[0]
    return optimized_attention(q, ks.expand(rows, -1, -1), vs.expand(rows, -1, -1), extra_options["n_heads"]) * 0.8


def _foreign_extra_attention(model, encoder, tokens, keys):
    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    attn2 = to.setdefault("patches_replace", {}).setdefault("attn2", {})
    for i, key in enumerate(keys):
        attn2[key] = ForeignAttn2(_extra_attention, encoder=encoder, tokens=tokens, layer=i,
                                     sigma_start=math.inf, sigma_end=0.0)
    return m


if __name__ == "__main__":
    main()
