"""Command-line options shared by ``productbg generate`` and ``productbg batch``: models and settings."""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from .. import backbones
from ..imaging.export import parse_export_size, EXPORT_PRESETS
from ..imaging.folder import MAX_MEGAPIXELS_ENV
from ..pipeline.embedded import DEMO_MODEL, DEMO_SETTINGS, load_demo_pipeline
from ..pipeline.errors import PipelineError
from ..pipeline.pipeline import GenerateSettings, defaults_for, ProductBGPipeline
from ..pipeline.single_file import checkpoint_backbone
from ..pipeline.upscale import load_upscaler
from ..weights.errors import WeightsError
from ..weights.safefile import read_header
from . import checks
from .errors import CliError

#: Upper bounds that keep a run inside memory: the canvas side, images per call, and their product (images are
#: sampled as one batch: 64 images at 512² ≈ 4 at 2048²), plus LoRA strength and input megapixels.
MAX_SIZE = 2048
MAX_N = 64
MAX_BATCH_PIXELS = 64 * 512 * 512
MAX_LORA_STRENGTH = 10.0
MAX_MEGAPIXELS = 1000.0
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULTS = GenerateSettings()
#: A Flux.1 transformer's companion files (``--t5``, ``--clip-l``, ``--vae``).
FLUX_FILES = ("t5", "clip_l", "vae")
#: ``--checkpoint demo``: the embedded demo model (64², BG-synth's 16 categories), with its own settings.
DEMO_CHECKPOINT = "demo"
TINY_NOTE = ("no --checkpoint: using the tiny random built-in models (backgrounds are noise; for trying the "
             "commands and for tests). Pass --checkpoint for real results, or --checkpoint demo for the embedded "
             "toy model trained on BG-synth.")


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Model files: base checkpoint, bank, style encoder, CLIP vision, LoRAs, device."""
    g = p.add_argument_group("models (nothing is ever downloaded)")
    g.add_argument("--checkpoint", metavar="PATH",
                   help="SD1.5, SDXL or their inpainting .safetensors (ComfyUI's models/checkpoints files; the "
                        "backbone is detected from the file and sets the default canvas and sampler), a Flux.1 "
                        "single file or transformer (dev, schnell, Fill: models/diffusion_models), a diffusers "
                        "folder, or 'demo' for the embedded toy model (BG-synth categories, 64², its own bank and "
                        "style encoder; write ./demo for a folder of that name); without it the tiny random models "
                        "are used")
    g.add_argument("--configs", metavar="DIR",
                   help="component configs for --checkpoint (default: the set shipped in assets/sd15, assets/sdxl "
                        "or assets/flux, by the detected backbone)")
    g.add_argument("--t5", metavar="PATH", help="Flux.1's T5-XXL text encoder (models/text_encoders/"
                   "t5xxl_fp8_e4m3fn.safetensors or t5xxl_fp16.safetensors) for a Flux transformer --checkpoint; "
                   "default: found beside it in ComfyUI's models folder")
    g.add_argument("--clip-l", metavar="PATH", help="Flux.1's CLIP-L text encoder (models/text_encoders/"
                   "clip_l.safetensors); default: found beside the Flux transformer")
    g.add_argument("--vae", metavar="PATH", help="Flux.1's VAE (models/vae/ae.safetensors); default: found beside "
                   "the Flux transformer")
    g.add_argument("--bank", metavar="PATH", help="category bank .safetensors (identifier per category); without "
                   "it the category name is used as plain words, confined to the background")
    g.add_argument("--style-encoder", metavar="PATH", help="style encoder / IP-Adapter .safetensors made for the "
                   "checkpoint's backbone (SD1.5 or SDXL; needs --clip-vision)")
    g.add_argument("--clip-vision", metavar="PATH", help="CLIP vision model: folder (config.json + model.safetensors) "
                   "or a ViT-H/14 .safetensors file; on Flux.1, Redux's SigLIP (models/clip_vision/"
                   "sigclip_vision_patch14_384.safetensors)")
    g.add_argument("--style-model", metavar="PATH", help="Flux Redux (models/style_models/flux1-redux-dev."
                   "safetensors) for --reference on a Flux.1 --checkpoint; needs --clip-vision (its SigLIP)")
    g.add_argument("--lora", metavar="PATH[:STRENGTH]", action="append", default=[], type=lora_type,
                   help="LoRA .safetensors merged into the model (kohya or peft layout); repeatable")
    g.add_argument("--tiny", action="store_true", help="use the tiny random models even if files are given")
    g.add_argument("--device", type=checks.device, help="cpu, cuda, cuda:1 ... (default: CUDA when available; under accelerate "
                   "launch, cuda:LOCAL_RANK)")
    g.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="weights dtype (auto: fp16 on CUDA, bf16 for Flux.1; fp32 on a CPU; an fp8 Flux file's "
                        "linear layers stay fp8 and compute in this dtype)")
    add_pixel_limit_option(g)


def add_pixel_limit_option(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--max-megapixels``: the input image size limit (default 50 MP, or PRODUCTBG_MAX_MEGAPIXELS)."""
    p.add_argument("--max-megapixels", type=checks.number(0, MAX_MEGAPIXELS, low_open=True), metavar="MP",
                   help="refuse input images above this many megapixels (default 50, or the "
                        "PRODUCTBG_MAX_MEGAPIXELS environment variable; a 4000×3000 photo is 12 MP)")


def apply_pixel_limit(args: argparse.Namespace) -> None:
    """Make ``--max-megapixels`` the limit of every image read in this process."""
    if getattr(args, "max_megapixels", None) is not None:
        os.environ[MAX_MEGAPIXELS_ENV] = repr(float(args.max_megapixels))


#: Settings options → :class:`GenerateSettings` fields. Every option defaults to ``None`` = "the model's default":
#: the paper's recipe (:data:`DEFAULTS`), or the demo model's own (:data:`DEMO_SETTINGS`) with ``--checkpoint demo``.
SETTING_OPTIONS = {"size": "size", "steps": "steps", "cfg": "guidance_scale", "fill": "fill_ratio",
                   "grow": "inpaint_grow", "strength": "identifier_strength", "confinement": "confinement",
                   "style_weight": "style_weight",
                   "style_layers": "style_layers", "template": "template", "extra": "extra_text",
                   "negative": "negative_prompt", "feather": "feather", "segmentation": "segmentation",
                   "report_expansion": "report_expansion", "export": "export", "format": "export_format",
                   "quality": "quality", "resampler": "resampler", "upscaler": "upscaler", "sampler": "sampler",
                   "canvas": "canvas_size", "guidance": "distilled_guidance"}
#: Options that only mean something with --export.
EXPORT_ONLY = ("format", "quality", "resampler", "upscaler")


def _default(option: str) -> str:
    """``default X`` (and the demo model's value where it differs) for an option's help."""
    field = SETTING_OPTIONS[option]
    base, demo = getattr(DEFAULTS, field), getattr(DEMO_SETTINGS, field)
    return f"default {base!r}" + (f"; {demo!r} with --checkpoint demo" if demo != base else "")


def add_settings_options(p: argparse.ArgumentParser) -> None:
    """Generation settings (defaults: the paper's recipe / the shipped workflow; the demo model's own with
    ``--checkpoint demo``)."""
    g = p.add_argument_group("generation settings")
    g.add_argument("--size", type=checks.integer(16, MAX_SIZE, multiple=8), help=f"square canvas side, multiple of 8 ({_default('size')}; "
                   "1024 with an SDXL checkpoint)")
    g.add_argument("--canvas", type=canvas_type, metavar="RATIO|WxH",
                   help="non-square canvas: an aspect ratio at the backbone's trained pixel count (1:1, 4:5, 3:4, "
                        "2:3, 16:9, 9:16, 5:4, 4:3, 3:2; e.g. 4:5 = 928x1152 on SDXL, 464x576 on SD1.5) or WIDTHxHEIGHT "
                        "(multiples of 8); replaces --size")
    g.add_argument("--steps", type=checks.integer(1, 1000), help=f"sampling steps ({_default('steps')}; 30 with an SDXL "
                   "checkpoint)")
    g.add_argument("--cfg", type=checks.number(0, 100), help=f"classifier-free guidance scale ({_default('cfg')}; 6.0 "
                   "with an SDXL checkpoint)")
    g.add_argument("--sampler", choices=["ddim", "dpmpp_2m_karras", "euler"],
                   help=f"sampler ({_default('sampler')}; dpmpp_2m_karras with an SDXL checkpoint; euler, the only "
                        "one, with Flux.1)")
    g.add_argument("--guidance", type=checks.number(0, 100),
                   help="Flux.1's distilled guidance (default: 30 with Flux Fill, 3.5 with dev; schnell has none)")
    g.add_argument("--fill", type=checks.number(0, 1, low_open=True), help=f"product bounding box / canvas ({_default('fill')})")
    g.add_argument("--grow", type=checks.number(0, 512), help=f"repaint-mask growth in px at 512, scaled with --size "
                   f"({_default('grow')})")
    g.add_argument("--strength", type=checks.number(0, 1), help=f"mask-guided attention strength 0..1 ({_default('strength')})")
    g.add_argument("--confinement", choices=["context", "columns"],
                   help="context: product areas attend to the prompt without the identifier (exactly independent "
                        f"of it); columns: only the identifier's tokens are masked, an ablation ({_default('confinement')})")
    g.add_argument("--style-weight", type=checks.number(0, 10), help=f"reference style weight ({_default('style_weight')})")
    g.add_argument("--style-layers", choices=["all", "style", "composition"],
                   help=f"layers that take the reference style ({_default('style_layers')})")
    g.add_argument("--template", help="prompt template with {id} (default: the bank's)")
    g.add_argument("--extra", help=f"free words appended to the prompt ({_default('extra')})")
    g.add_argument("--negative", help=f"negative prompt ({_default('negative')})")
    g.add_argument("--feather", type=checks.number(0, 256), help=f"outward feather of the paste-back in px ({_default('feather')})")
    g.add_argument("--segmentation", choices=["auto", "alpha", "background", "background+grabcut", "grabcut"],
                   help="how the product is cut out (auto: alpha, else uniform-background key, else GrabCut)")
    g.add_argument("--report-expansion", action="store_true", default=None,
                   help="also measure object expansion in each preservation report, as the ComfyUI workflows do "
                        "(a GrabCut per image)")
    add_export_options(p)


def canvas_type(text: str) -> str | tuple[int, int]:
    """argparse ``type`` of ``--canvas``: an aspect ratio name (resolved against the backbone later) or WxH."""
    t = text.strip().lower()
    if re.fullmatch(r"\d+:\d+", t):
        return t
    m = re.fullmatch(r"(\d+)x(\d+)", t)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: write an aspect ratio such as 4:5, or WIDTHxHEIGHT such as 928x1152")
    w, h = int(m[1]), int(m[2])
    if not (16 <= w <= MAX_SIZE and 16 <= h <= MAX_SIZE) or w % 8 or h % 8:
        near = "x".join(str(min(MAX_SIZE, max(16, round(v / 8) * 8))) for v in (w, h))
        raise argparse.ArgumentTypeError(f"{w}x{h}: width and height must be multiples of 8 from 16 to {MAX_SIZE} "
                                         f"(the VAE works on 8-pixel cells); use e.g. {near}")
    return w, h


def model_backbone(args: argparse.Namespace):
    """The backbone of the model the options name (SD1.5 for the tiny models; None for the demo model), read
    from the checkpoint's header or the folder's layout without loading weights.

    Raises:
        PipelineError: a checkpoint of a family productbg does not support (named).
    """
    if uses_tiny(args):
        return backbones.SD15
    if uses_demo(args):
        return None
    src = Path(args.checkpoint)
    if src.is_dir():
        return backbones.SDXL if (src / "text_encoder_2" / "config.json").is_file() else backbones.SD15
    return checkpoint_backbone(src)


def export_size(text: str) -> tuple[int, int]:
    """argparse ``type`` of ``--export``: a preset name or WIDTHxHEIGHT."""
    try:
        return parse_export_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_export_options(p: argparse.ArgumentParser) -> None:
    """``--export``, ``--format``, ``--quality``, ``--resampler``, ``--upscaler``: the delivered image."""
    presets = ", ".join(f"{k} {w}x{h}" for k, (w, h) in EXPORT_PRESETS.items())
    g = p.add_argument_group("export (marketplace-ready output: generate small, deliver big)")
    g.add_argument("--export", type=export_size, metavar="PRESET|WxH",
                   help=f"deliver at this size: {presets}, or any WIDTHxHEIGHT (64..8192). The background is "
                        "generated at --size on a canvas of this aspect and resized up; the product is composited "
                        "from the original photo at its own resolution (core pixels unchanged), sRGB profile "
                        "embedded. Without it the --size² canvas is delivered as PNG")
    g.add_argument("--format", choices=["png", "jpeg", "jpg", "webp"],
                   help="file format of the export (default png, or the --out file's suffix)")
    g.add_argument("--quality", type=checks.integer(1, 100),
                   help="JPEG / WebP quality 1..100 (default 95; WebP 100 = lossless; JPEG ≥ 90 keeps full colour "
                        "resolution)")
    g.add_argument("--resampler", choices=["lanczos", "bicubic", "bilinear"],
                   help="how the generated background is enlarged (default lanczos)")
    g.add_argument("--upscaler", metavar="FILE",
                   help="upscale model .safetensors (ESRGAN-class, e.g. from ComfyUI's models/upscale_models) run on "
                        "the background before the resize; needs spandrel (pip install 'productbg[upscale]')")


def check_export_args(args: argparse.Namespace) -> None:
    """Export options: the ones that need --export, and the upscale model (loaded once to check it, before the
    other models load)."""
    if getattr(args, "export", None) is None:
        given = [o for o in EXPORT_ONLY if getattr(args, o, None) is not None]
        if given:
            raise CliError(f"--{given[0]} needs --export (e.g. --export amazon-zoom, or --export 512x512 "
                           "for the canvas size)")
        return
    if getattr(args, "format", None) == "jpg":
        args.format = "jpeg"
    if getattr(args, "upscaler", None):
        _model_file(Path(args.upscaler), "--upscaler", "upscale model")
        load_upscaler(args.upscaler)  # refused here, before sampling: spandrel missing, not RGB, NaN output


def settings_from_args(args: argparse.Namespace) -> GenerateSettings:
    """:class:`GenerateSettings` from parsed options: the given ones over the model's defaults (the demo
    model's, or the backbone's: 512² DDIM 40 on SD1.5, 1024² DPM++ 2M Karras 30 on SDXL)."""
    b = model_backbone(args)
    base = DEMO_SETTINGS if b is None else defaults_for(b)
    given = {field: getattr(args, option) for option, field in SETTING_OPTIONS.items()
             if getattr(args, option, None) is not None}
    canvas = given.get("canvas_size")
    if isinstance(canvas, str):
        canvases = (b.canvases if b is not None else {})
        if canvas not in canvases:
            raise CliError(f"--canvas {canvas}: not an aspect ratio of this model; use one of "
                           f"{', '.join(canvases)} or WIDTHxHEIGHT")
        given["canvas_size"] = canvases[canvas]
    if given.get("canvas_size") is not None and given.get("export") is not None:
        raise CliError("--canvas does not go with --export (the export's aspect sets the canvas)")
    return replace(base, **given)


def parse_lora(text: str) -> tuple[Path, float]:
    """``file.safetensors[:strength]`` → (path, strength)."""
    path, _, strength = text.rpartition(":") if ":" in text and not Path(text).exists() else (text, "", "")
    try:
        value = float(strength) if strength else 1.0
    except ValueError:
        raise PipelineError(f"--lora {text!r}: write PATH or PATH:STRENGTH (e.g. style.safetensors:0.8)") from None
    if not -MAX_LORA_STRENGTH <= value <= MAX_LORA_STRENGTH:  # also false for NaN
        raise PipelineError(f"--lora {text!r}: the strength must be a finite number from -{MAX_LORA_STRENGTH:g} "
                            f"to {MAX_LORA_STRENGTH:g}")
    return Path(path), value


def lora_type(text: str) -> str:
    """argparse ``type`` of ``--lora``: the strength is checked at parse time (the file before loading)."""
    try:
        parse_lora(text)
    except PipelineError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None
    return text


def device_from_args(args: argparse.Namespace) -> str:
    """The device: --device, else cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if args.device:
        return checks.check_device(args.device)
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def uses_tiny(args: argparse.Namespace) -> bool:
    """Whether the tiny built-in models are used."""
    return bool(args.tiny or not args.checkpoint)


def uses_demo(args: argparse.Namespace) -> bool:
    """Whether ``--checkpoint demo`` asks for the embedded demo model."""
    return not uses_tiny(args) and args.checkpoint == DEMO_CHECKPOINT


def extra_model_files(args: argparse.Namespace) -> list[str]:
    """The model-file options given besides --checkpoint, as option names."""
    given = [o for o in ("bank", "style_encoder", "style_model", "clip_vision", "configs", *FLUX_FILES)
             if getattr(args, o, None)]
    return [f"--{o.replace('_', '-')}" for o in given] + (["--lora"] if args.lora else [])


def build_pipeline(args: argparse.Namespace, quiet: bool = False, settings=None):
    """The pipeline the options describe (tiny models without --checkpoint); ``settings`` overrides the
    settings options (commands without them)."""
    settings, device = settings or settings_from_args(args), device_from_args(args)
    if uses_tiny(args):
        extras = [o for o in extra_model_files(args) if o != "--configs"]
        if extras:
            raise PipelineError(f"{extras[0]} needs --checkpoint (the tiny random models fit no real weight files)")
        if not quiet:
            print(f"note: {TINY_NOTE}", file=sys.stderr)
        return ProductBGPipeline.tiny(settings=settings, device=device)
    if uses_demo(args):
        extras = extra_model_files(args)
        if extras:
            raise PipelineError(f"{extras[0]} does not go with --checkpoint demo: the embedded model brings its own "
                                "bank, style encoder and CLIP vision model, and its 64-wide text encoder fits no "
                                "SD1.5 file")
        return load_demo_pipeline(DEMO_MODEL, settings=settings, device=device)
    source = Path(args.checkpoint)
    flux = model_backbone(args) is backbones.FLUX
    auto = (torch.bfloat16 if flux else torch.float16) if device.startswith("cuda") else torch.float32
    dtype = DTYPES.get(args.dtype) or auto
    kwargs: dict[str, Any] = dict(bank=args.bank, style_encoder=args.style_encoder, clip_vision=args.clip_vision,
                                  style_model=args.style_model, loras=[parse_lora(t) for t in args.lora], dtype=dtype, settings=settings,
                                  device=device)
    given = {o: getattr(args, o) for o in FLUX_FILES if getattr(args, o, None)}
    if given and not flux:
        raise PipelineError(f"--{next(iter(given)).replace('_', '-')} goes with a Flux.1 --checkpoint; "
                            f"{source.name} is {model_backbone(args).label}")
    kwargs.update(given)
    if source.is_dir():
        return ProductBGPipeline.from_pretrained(source, **kwargs)
    return ProductBGPipeline.from_single_file(source, config_dir=args.configs, **kwargs)


def max_images(size: int) -> int:
    """Images one call may generate at ``size``² (memory grows with images × pixels)."""
    return max(1, min(MAX_N, MAX_BATCH_PIXELS // (size * size)))


def check_model_args(args: argparse.Namespace) -> None:
    """Check the model options before anything loads: the device, every model file given, the export options.

    Raises:
        CliError: naming the option.
    """
    apply_pixel_limit(args)
    check_export_args(args)
    device_from_args(args)
    if uses_tiny(args) or uses_demo(args):
        return
    src = Path(args.checkpoint)
    if not src.is_dir():
        _model_file(src, "--checkpoint", "Stable Diffusion checkpoint")
    if args.configs:
        checks.input_dir(args.configs, "--configs")
    for option, what in (("bank", "category bank"), ("style_encoder", "style encoder"),
                         ("style_model", "Flux Redux style model"), ("clip_vision", "CLIP vision model"), ("t5", "T5-XXL text encoder"),
                         ("clip_l", "CLIP-L text encoder"), ("vae", "VAE")):
        value = getattr(args, option, None)
        if value and not (option == "clip_vision" and Path(value).is_dir()):
            _model_file(Path(value), f"--{option.replace('_', '-')}", what)
    for text in args.lora:
        _model_file(parse_lora(text)[0], "--lora", "LoRA")
    try:
        model_backbone(args)  # another family (SDXL refiner, SD2, SD3, Flux ...) is refused before loading
    except PipelineError as e:
        raise CliError(f"--checkpoint {e}") from None


def _model_file(path: Path, flag: str, what: str) -> None:
    """An existing weight file whose safetensors header is sound and holds tensors."""
    checks.input_file(path, flag)
    if path.suffix.lower() != ".safetensors":
        raise CliError(f"{flag} {path}: only .safetensors files are loaded (.ckpt/.pt/.bin files are "
                       "pickles that can run code; convert them first)")
    try:
        header = read_header(path)
    except WeightsError as e:
        raise CliError(f"{flag}: {e}") from None
    if not header.tensors:
        raise CliError(f"{flag} {path}: the file holds no tensors at all, so it is no {what}")


def check_generation(args: argparse.Namespace, n: int, what: str = "--n") -> None:
    """The image count ``n`` against the memory the canvas size (and the export size) implies."""
    settings = settings_from_args(args)
    w, h = settings.canvas()
    most = max(1, min(MAX_N, MAX_BATCH_PIXELS // (w * h)))
    if n > most:
        where = f"--size {w}" if w == h else f"a {w}x{h} canvas"
        raise CliError(f"{what} {n}: at most {most} images per product at {where} "
                       f"(memory grows with images × pixels); run fewer at a time")
    if settings.export is not None and n > max_exports(settings.export):
        w, h = settings.export
        raise CliError(f"{what} {n}: at most {max_exports(settings.export)} images per product at "
                       f"--export {w}x{h} (each delivered image is held in memory until written); run "
                       "fewer at a time")


#: Export pixels one product's images may hold at once (16 exports of 2000², about 1.8 GB of float images).
MAX_EXPORT_PIXELS = 16 * 2000 * 2000


def max_exports(export: tuple[int, int]) -> int:
    """Images one call may deliver at the export size."""
    return max(1, MAX_EXPORT_PIXELS // (export[0] * export[1]))


def describe_run(args: argparse.Namespace) -> dict[str, Any]:
    """Model files and settings, recorded in every ``result.json``."""
    settings = asdict(settings_from_args(args))
    model = "tiny" if uses_tiny(args) else "demo (embedded)" if uses_demo(args) else str(args.checkpoint)
    return {"model": model, "bank": args.bank,
            "style_encoder": args.style_encoder, "style_model": args.style_model, "clip_vision": args.clip_vision,
            "loras": list(args.lora),
            **{o: getattr(args, o) for o in FLUX_FILES if getattr(args, o, None)},
            "settings": settings}
