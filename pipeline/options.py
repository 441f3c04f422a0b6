"""Command-line options shared by ``productbg generate`` and ``productbg batch``: models and settings."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .errors import PipelineError
from .pipeline import GenerateSettings

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULTS = GenerateSettings()
TINY_NOTE = ("no --checkpoint: using the tiny random built-in models (backgrounds are noise; for trying the "
             "commands and for tests). Pass --checkpoint for real results; `productbg demo` shows the embedded "
             "trained toy model.")


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Model files: base checkpoint, bank, style encoder, CLIP vision, LoRAs, device."""
    g = p.add_argument_group("models (nothing is ever downloaded)")
    g.add_argument("--checkpoint", metavar="PATH",
                   help="SD1.5 or SD1.5-inpainting .safetensors (ComfyUI's models/checkpoints files) or a diffusers "
                        "folder; without it the tiny random models are used")
    g.add_argument("--configs", metavar="DIR",
                   help="component configs for --checkpoint (default: the SD1.5 set shipped in assets/sd15)")
    g.add_argument("--bank", metavar="PATH", help="category bank .safetensors (identifier per category); without "
                   "it the category name is used as plain words, confined to the background")
    g.add_argument("--style-encoder", metavar="PATH", help="style encoder / IP-Adapter SD1.5 .safetensors (needs --clip-vision)")
    g.add_argument("--clip-vision", metavar="PATH", help="CLIP vision model: folder (config.json + model.safetensors) "
                   "or a ViT-H/14 .safetensors file")
    g.add_argument("--lora", metavar="PATH[:STRENGTH]", action="append", default=[],
                   help="LoRA .safetensors merged into the model (kohya or peft layout); repeatable")
    g.add_argument("--tiny", action="store_true", help="use the tiny random models even if files are given")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA when available; under accelerate "
                   "launch, cuda:LOCAL_RANK)")
    g.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="weights dtype (auto: fp16 on CUDA)")


def add_settings_options(p: argparse.ArgumentParser) -> None:
    """Generation settings (defaults: the paper's recipe / the shipped workflow)."""
    g = p.add_argument_group("generation settings")
    g.add_argument("--size", type=int, default=512, help="square canvas side, multiple of 8 (default 512)")
    g.add_argument("--steps", type=int, default=40, help="DDIM steps (default 40)")
    g.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    g.add_argument("--fill", type=float, default=0.74, help="product bounding box / canvas (default 0.74)")
    g.add_argument("--grow", type=float, default=20.0, help="repaint-mask growth in px at 512, scaled with "
                   "--size (default 20)")
    g.add_argument("--strength", type=float, default=1.0, help="mask-guided attention strength 0..1 (default 1)")
    g.add_argument("--style-weight", type=float, default=0.8, help="reference style weight (default 0.8)")
    g.add_argument("--style-layers", choices=["all", "style", "composition"], default="all")
    g.add_argument("--template", help="prompt template with {id} (default: the bank's)")
    g.add_argument("--extra", default=DEFAULTS.extra_text, help=f"free words appended to the prompt "
                   f"(default {DEFAULTS.extra_text!r})")
    g.add_argument("--negative", default=DEFAULTS.negative_prompt, help=f"negative prompt (default "
                   f"{DEFAULTS.negative_prompt!r})")
    g.add_argument("--feather", type=float, default=2.0, help="outward feather of the paste-back in px (default 2)")
    g.add_argument("--segmentation", default="auto",
                   choices=["auto", "alpha", "background", "background+grabcut", "grabcut"],
                   help="how the product is cut out (auto: alpha, else uniform-background key, else GrabCut)")
    g.add_argument("--report-expansion", action="store_true", help="also measure object expansion in each "
                   "preservation report, as the ComfyUI workflows do (a GrabCut per image)")


def settings_from_args(args: argparse.Namespace):
    """:class:`GenerateSettings` from parsed options."""
    return GenerateSettings(size=args.size, steps=args.steps, guidance_scale=args.cfg, fill_ratio=args.fill,
                            inpaint_grow=args.grow, identifier_strength=args.strength, style_weight=args.style_weight,
                            style_layers=args.style_layers, template=args.template, extra_text=args.extra,
                            negative_prompt=args.negative, feather=args.feather, segmentation=args.segmentation,
                            report_expansion=args.report_expansion)


def parse_lora(text: str) -> tuple[Path, float]:
    """``file.safetensors[:strength]`` → (path, strength)."""
    path, _, strength = text.rpartition(":") if ":" in text and not Path(text).exists() else (text, "", "")
    try:
        return Path(path), float(strength) if strength else 1.0
    except ValueError:
        raise PipelineError(f"--lora {text!r}: write PATH or PATH:STRENGTH (e.g. style.safetensors:0.8)") from None


def device_from_args(args: argparse.Namespace) -> str:
    """The device: --device, else cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if args.device:
        return args.device
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def uses_tiny(args: argparse.Namespace) -> bool:
    """Whether the tiny built-in models are used."""
    return bool(args.tiny or not args.checkpoint)


def build_pipeline(args: argparse.Namespace, quiet: bool = False, settings=None):
    """The pipeline the options describe (tiny models without --checkpoint); ``settings`` overrides the
    settings options (commands without them)."""
    from .pipeline import ProductBGPipeline

    settings, device = settings or settings_from_args(args), device_from_args(args)
    if uses_tiny(args):
        extras = [o for o in ("bank", "style_encoder", "clip_vision") if getattr(args, o)] + (["lora"] if args.lora else [])
        if extras:
            raise PipelineError(f"--{extras[0].replace('_', '-')} needs --checkpoint (the tiny random models fit "
                                "no real weight files)")
        if not quiet:
            print(f"note: {TINY_NOTE}", file=sys.stderr)
        return ProductBGPipeline.tiny(settings=settings, device=device)
    dtype = DTYPES.get(args.dtype) or (torch.float16 if device.startswith("cuda") else torch.float32)
    source = Path(args.checkpoint)
    kwargs: dict[str, Any] = dict(bank=args.bank, style_encoder=args.style_encoder, clip_vision=args.clip_vision,
                                  loras=[parse_lora(t) for t in args.lora], dtype=dtype, settings=settings,
                                  device=device)
    if source.is_dir():
        return ProductBGPipeline.from_pretrained(source, **kwargs)
    return ProductBGPipeline.from_single_file(source, config_dir=args.configs, **kwargs)


def describe_run(args: argparse.Namespace) -> dict[str, Any]:
    """Model files and settings, recorded in every ``result.json``."""
    settings = asdict(settings_from_args(args))
    return {"model": "tiny" if uses_tiny(args) else str(args.checkpoint), "bank": args.bank,
            "style_encoder": args.style_encoder, "clip_vision": args.clip_vision, "loras": list(args.lora),
            "settings": settings}
