"""``productbg generate``: backgrounds for one product photo.

Segments the product, places it on a 512² canvas (fill 0.74; 1024² with an SDXL checkpoint, or --canvas), writes
the category's identifier into the prompt with mask-guided attention keeping it on the background, optionally
takes the style of a reference image, inpaints (DDIM 40 steps, CFG 7.5; SDXL: DPM++ 2M Karras 30 steps, CFG 6),
pastes the original product back and reports how well it was preserved.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..fileio.jsonfile import write_json, dumps
from ..imaging.export import EXPORT_PRESETS
from ..pipeline.outputs import export_meta, save_result_image, write_item
from . import checks
from .errors import CliError
from .options import (add_model_options, add_settings_options, check_generation, check_model_args, build_pipeline,
                      describe_run)

EPILOG = f"""examples:
  productbg generate --product bottle.png --category cosmetics --out out/bottle.png
  productbg generate --product mug.png --category lamps --checkpoint demo --n 4 --out out/mug.png   (embedded toy model)
  productbg generate --product shoe.jpg --category sneakers --n 4 --seed 7 --out out/shoe/ \\
      --checkpoint models/checkpoints/sd-v1-5-inpainting.safetensors --bank models/productbg/banks/bg60k.safetensors
  productbg generate --product mug.png --reference brand_look.jpg --out out/mug.png --checkpoint sd15-inpaint.safetensors \\
      --style-encoder ip-adapter_sd15.safetensors --clip-vision CLIP-ViT-H-14.safetensors
  productbg generate --product shoe.jpg --category sneakers --canvas 4:5 --out out/shoe.png \\
      --checkpoint models/checkpoints/sd_xl_base_1.0.safetensors --bank bank_sdxl.safetensors
      (SDXL: detected from the file; 928x1152, DPM++ 2M Karras 30 steps, CFG 6 unless given)
  productbg generate --product shoe.jpg --category sneakers --out out/shoe.png --bank bank_flux.safetensors \\
      --checkpoint ComfyUI/models/diffusion_models/flux1-fill-dev.safetensors
      (Flux.1 Fill: T5-XXL, CLIP-L and ae.safetensors found in ComfyUI/models, or --t5 / --clip-l / --vae;
      1024², Euler 20 steps, distilled guidance 30, CFG 1)

  productbg generate --product shoe.jpg --category sneakers --export amazon-zoom --out out/shoe.jpg --quality 92
      (2000x2000 JPEG, the shoe at its own resolution; --export {'|'.join(EXPORT_PRESETS)}|WxH)

--out ending in .png/.jpg/.webp writes that image (name_1.png ... for --n > 1) and name.json beside it; any other
--out is a folder with image_<k>.png (.jpg/.webp with --export --format), raw_<k>.png (before paste-back),
placed.png, mask.png and result.json (which records the export and any colour-profile conversion of the input).
exit status: 0 written, 1 written but the preservation check failed (--strict), 2 usage or input error."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``generate``."""
    p = sub.add_parser("generate", help="generate backgrounds for one product", description=__doc__,
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--product", required=True, metavar="IMAGE", help="product photo (PNG with alpha, or a packshot "
                   "on a plain background)")
    p.add_argument("--category", help="category name (in the bank, or plain words without --bank)")
    p.add_argument("--reference", metavar="IMAGE", help="image whose background style to take (needs "
                   "--style-encoder and --clip-vision; on Flux.1 --style-model and --clip-vision)")
    p.add_argument("--seed", type=checks.seed, default=0, help="seed of the first image (default 0)")
    p.add_argument("--n", type=checks.integer(1, 64), default=1,
                   help="number of images, seeds seed..seed+n-1 (default 1; at most 64 at 512², fewer above)")
    p.add_argument("--out", default="out/generate", help="output .png or folder (default out/generate)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a preservation check fails")
    add_model_options(p)
    add_settings_options(p)
    p.set_defaults(func=run)


FILE_SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def _png_paths(out: Path, n: int) -> list[Path]:
    return [out if n == 1 else out.with_name(f"{out.stem}_{k}{out.suffix}") for k in range(n)]


def _format_from_out(args: argparse.Namespace, out: Path) -> None:
    """A file --out names the format (``shoe.jpg`` → jpeg); it must agree with --format, and without --export
    only PNG is written."""
    wanted = FILE_SUFFIXES[out.suffix.lower()]
    if args.export is None:
        if wanted != "png":
            raise CliError(f"--out {out}: without --export the canvas is written as PNG; add --export "
                           "(e.g. --export amazon-zoom) for JPEG / WebP")
        return
    given = {"jpg": "jpeg"}.get(args.format, args.format)
    if given is not None and given != wanted:
        raise CliError(f"--out {out} is a {wanted.upper()} name but --format is {given}; make them agree")
    args.format = wanted


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before a model loads: options, input images, output locations."""
    check_model_args(args)
    check_generation(args, args.n)
    if args.seed + args.n - 1 > checks.MAX_SEED:
        raise CliError(f"--seed {args.seed}: with --n {args.n} the last seed passes {checks.MAX_SEED}")
    checks.input_image(args.product, "--product")
    if args.reference:
        checks.input_image(args.reference, "--reference")
    out = Path(args.out)
    if out.suffix.lower() in FILE_SUFFIXES:
        _format_from_out(args, out)
        for path in [*_png_paths(out, args.n), out.with_suffix(".json")]:
            checks.output_file(path, "--out")
    else:
        checks.output_dir(out, "--out")


def _write(results: list, out: Path, meta: dict) -> list[Path]:
    if out.suffix.lower() not in FILE_SUFFIXES:
        data = write_item(out, results, meta)
        return [out / name for name in data["images"]]
    paths = [save_result_image(r, path) for path, r in zip(_png_paths(out, len(results)), results)]
    extra = export_meta(results[0])
    if results[0].export is not None:
        extra["canvas_reports"] = [r.canvas_report for r in results]
    write_json(dict(meta, images=[p.name for p in paths], seeds=[r.seed for r in results],
                    prompt=results[0].prompt, reports=[r.report for r in results], **extra),
               out.with_suffix(".json"))
    return paths


def run(args: argparse.Namespace) -> int:
    """Generate, write, print one JSON line per image (path, seed, preservation pass)."""
    check_args(args)
    pipe = build_pipeline(args)
    results = pipe.generate(args.product, category=args.category, reference=args.reference, seed=args.seed,
                            n=args.n)
    meta = dict(describe_run(args), product=args.product, category=args.category, reference=args.reference,
                seed=args.seed, n=args.n)
    paths = _write(results, Path(args.out), meta)
    for path, r in zip(paths, results):
        print(dumps({"image": str(path), "seed": r.seed, "preservation_pass": r.report["pass"],
                     "delta_e2000_mean": r.report["metrics"]["delta_e2000"]["mean"]}))
    return 1 if args.strict and not all(r.report["pass"] for r in results) else 0
