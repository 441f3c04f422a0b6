"""``productbg demo``: a contact sheet of products × categories, plus a reference-style row, on one model.

By default it runs the embedded demo model (``assets/demo_model``), which our own trainers built from nothing
on the procedural BG-synth dataset (64×64, 16 background families) — see ``scripts/train_demo_model.py``.
Every cell goes through the real pipeline: segment → place → identifier prompt with mask-guided attention
(or reference style tokens) → inpaint → product pasted back. With ``--checkpoint`` (an SD1.5-inpainting
``.safetensors`` or diffusers folder) plus ``--bank``, ``--style-encoder`` and ``--clip-vision`` the same sheet
is rendered with real weights at 512².
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..fileio.png import save_png
from ..pipeline import GenerateSettings
from ..pipeline.embedded import DEMO_MODEL, STYLE_ONLY_TEMPLATE, load_demo_pipeline
from ..pipeline.pipeline import defaults_for, read_image
from ..training import bgsynth
from . import checks
from .errors import CliError
from .options import build_pipeline, extra_model_files, model_backbone, uses_demo, check_model_args, add_model_options

CELL = 128
LABEL_H = 22
INSET = 44
#: Visibly different BG-synth families for the category columns, and other ones for the reference row.
DEMO_CATEGORIES = ("mugs", "lamps", "headphones", "toys", "speakers", "kettles")
DEMO_REFERENCES = ("handbags", "watches", "plants", "bottles", "backpacks", "perfume")
PRODUCT_SEEDS = (3, 11, 5, 8)


@dataclass
class DemoInputs:
    """What goes on the sheet: products (rows), categories (columns), references (the style row)."""

    products: list[tuple[str, np.ndarray]]
    categories: list[str]
    references: list[tuple[str, np.ndarray]] = field(default_factory=list)


def synthetic_product(seed: int, size: int = 256) -> np.ndarray:
    """A BG-synth product as ``[size, size, 4]`` RGBA in 0..1 (alpha = product), on a light grey canvas."""
    colour, mask = bgsynth.product(np.random.default_rng([seed, 0xDE30]), size)
    rgb = np.where(mask[..., None], colour, np.float32(0.92))
    return np.concatenate([rgb, mask[..., None].astype(np.float32)], -1).astype(np.float32)


def synthetic_reference(category: str, number: int = 0, size: int = 64) -> np.ndarray:
    """A held-out-style BG-synth image of ``category`` as RGBA (alpha = its product, which the pipeline removes)."""
    spec = bgsynth.SynthSpec(size=size, seed=1)  # seed 1: never an image the demo model was trained on (seed 0)
    image, mask = bgsynth.render(spec, "bg1k", number, bgsynth.DEFAULT_NAMES.index(category))
    return np.concatenate([image / 255.0, mask[..., None] / 255.0], -1).astype(np.float32)


def default_inputs(categories: Sequence[str] | None = None, references: Sequence[str] | None = None) -> DemoInputs:
    """Four synthetic products, the demo categories and six BG-synth references of other categories."""
    return DemoInputs([(f"product {i + 1}", synthetic_product(s)) for i, s in enumerate(PRODUCT_SEEDS)],
                      list(categories or DEMO_CATEGORIES),
                      [(name, synthetic_reference(name)) for name in (references or DEMO_REFERENCES)])


# ---------------------------------------------------------------------------------------------- rendering
@dataclass
class Sheet:
    """The rendered sheet and what happened."""

    image: Image.Image
    cells: int
    seconds: float
    product_preserved: bool


def render(pipe, inputs: DemoInputs, seed: int = 0, style_template: str | None = None) -> Sheet:
    """Generate every cell with ``pipe`` and lay them out (rows: products, then the reference-style row)."""
    start = time.perf_counter()
    rows: list[tuple[Image.Image, list[Image.Image]]] = []
    preserved = True
    for name, product in inputs.products:
        cells = []
        for c in inputs.categories:
            result = pipe.generate(product, category=c, seed=seed)[0]
            preserved &= bool(np.array_equal(result.image[result.mask >= 1], result.placed[result.mask >= 1]))
            cells.append(_cell(result.image))
        rows.append((_cell(_on_checker(product)), cells))
    if inputs.references:
        product = inputs.products[0][1]
        extra = {"template": style_template} if style_template else {}
        cells = [_with_inset(_cell(pipe.generate(product, reference=ref, seed=seed, **extra)[0].image), ref)
                 for _, ref in inputs.references]
        rows.append((_label_cell("reference\nstyle"), cells))
    ref_header = [f"ref: {n}" for n, _ in inputs.references]
    sheet = _layout(rows, list(inputs.categories), ref_header)
    return Sheet(sheet, sum(len(c) for _, c in rows), time.perf_counter() - start, preserved)


def _to_image(arr: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(arr[..., :3], 0, 1) * 255 + 0.5).astype(np.uint8))


def _cell(arr: np.ndarray) -> Image.Image:
    return _to_image(arr).resize((CELL, CELL), Image.BICUBIC)


def _on_checker(rgba: np.ndarray) -> np.ndarray:
    if rgba.shape[-1] == 3:
        return rgba
    h, w = rgba.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    checker = np.where(((yy // max(h // 8, 1)) + (xx // max(w // 8, 1))) % 2 == 0, 0.85, 0.7)[..., None]
    a = rgba[..., 3:]
    return rgba[..., :3] * a + checker * (1 - a)


def _with_inset(cell: Image.Image, reference: np.ndarray) -> Image.Image:
    inset = _to_image(reference).resize((INSET, INSET), Image.BICUBIC)
    out = cell.copy()
    ImageDraw.Draw(out).rectangle([0, 0, INSET + 1, INSET + 1], fill="white")
    out.paste(inset, (1, 1))
    return out


def _label_cell(text: str) -> Image.Image:
    img = Image.new("RGB", (CELL, CELL), "white")
    ImageDraw.Draw(img).multiline_text((8, CELL // 2 - 18), text, fill="black", font=_font(15))
    return img


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _layout(rows: list[tuple[Image.Image, list[Image.Image]]], header: list[str], ref_header: list[str]) -> Image.Image:
    cols = max(len(cells) for _, cells in rows) + 1
    n_ref = 1 if ref_header else 0
    height = LABEL_H + len(rows) * CELL + n_ref * LABEL_H
    sheet = Image.new("RGB", (cols * CELL, height), "white")
    draw = ImageDraw.Draw(sheet)
    font = _font(13)
    draw.text((6, 4), "product", fill="black", font=font)
    for j, name in enumerate(header):
        draw.text(((j + 1) * CELL + 6, 4), name, fill="black", font=font)
    y = LABEL_H
    for i, (label, cells) in enumerate(rows):
        if n_ref and i == len(rows) - 1:
            for j, name in enumerate(ref_header):
                draw.text(((j + 1) * CELL + 6, y + 4), name, fill="black", font=font)
            y += LABEL_H
        sheet.paste(label, (0, y))
        for j, cell in enumerate(cells):
            sheet.paste(cell, ((j + 1) * CELL, y))
        y += CELL
    return sheet


# ---------------------------------------------------------------------------------------------- command
def _pipeline(args: argparse.Namespace):
    """(pipeline, template of the reference-style row): the embedded demo model, or --checkpoint's weights."""
    if args.checkpoint and not uses_demo(args):
        if not args.bank:
            raise CliError("--checkpoint needs --bank (the categories' identifiers); add --style-encoder and "
                           "--clip-vision for the reference-style row")
        backbone = model_backbone(args)
        return build_pipeline(args, settings=defaults_for(backbone) if backbone else GenerateSettings()), None
    extras = extra_model_files(args)
    if extras:
        raise CliError(f"{extras[0]}: model files go with --checkpoint PATH (the embedded demo model brings its own)")
    folder = Path(args.model) if args.model else DEMO_MODEL
    return load_demo_pipeline(folder, device=args.device or "cpu"), STYLE_ONLY_TEMPLATE


def _read(paths: Sequence[str] | None) -> list[tuple[str, np.ndarray]] | None:
    """Named RGBA arrays of image files, read as the pipeline reads them (PipelineError when unreadable)."""
    return [(Path(p).stem, read_image(p)[0]) for p in paths] if paths else None


def _inputs(args: argparse.Namespace, pipe) -> DemoInputs:
    products = _read(args.products)
    categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    if categories is None and args.checkpoint and not uses_demo(args):
        categories = list(pipe.components.identifiers.names)[:6]
    references = _read(args.references)
    inputs = default_inputs(categories)
    if products:
        inputs.products = products
    if references is not None:
        inputs.references = references
    if not pipe.components.takes_reference:
        inputs.references = []
    return inputs


def _check_args(args: argparse.Namespace) -> None:
    """Options, input images and --out, before any model loads."""
    if args.checkpoint and not uses_demo(args) and not args.bank:
        raise CliError("--checkpoint needs --bank (the categories' identifiers); add --style-encoder and "
                       "--clip-vision for the reference-style row (on Flux.1: --style-model and --clip-vision)")
    if not (args.checkpoint and not uses_demo(args)) and extra_model_files(args):
        raise CliError(f"{extra_model_files(args)[0]}: model files go with --checkpoint PATH (the embedded demo "
                       "model brings its own)")
    check_model_args(args)
    if args.device:
        checks.check_device(args.device)
    if args.model:
        checks.input_dir(args.model, "--model")
    for path in args.products or []:
        checks.input_image(path, "--products")
    for path in args.references or []:
        checks.input_image(path, "--references")
    if args.categories is not None and not [c for c in args.categories.split(",") if c.strip()]:
        raise CliError("--categories: give at least one category name (comma-separated)")
    if Path(args.out).suffix.lower() != ".png":
        raise CliError(f"--out {args.out}: the sheet is a PNG; give a file name ending in .png")
    checks.output_file(args.out, "--out")


def _cmd(args: argparse.Namespace) -> int:
    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe, style_template = _pipeline(args)
    sheet = render(pipe, _inputs(args, pipe), seed=args.seed, style_template=style_template)
    out = save_png(np.asarray(sheet.image), args.out)
    print(f"wrote {out}: {sheet.cells} images in {sheet.seconds:.1f} s "
          f"(products pasted back unchanged: {'yes' if sheet.product_preserved else 'NO'})")
    return 0 if sheet.product_preserved else 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="render a contact sheet (products × categories + reference style) on the "
                                    "embedded demo model or real weights",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n"
                              "  productbg demo                                   # embedded model, out/demo.png\n"
                              "  productbg demo --products a.png b.png --categories mugs,lamps\n"
                              "  productbg demo --checkpoint sd-v1-5-inpainting.safetensors --bank bank.safetensors \\\n"
                              "      --style-encoder style.safetensors --clip-vision clip_vision_h.safetensors\n\n"
                              "exit status: 0 written, 1 a product was not pasted back unchanged, 2 bad input")
    p.add_argument("--out", default="out/demo.png", help="PNG to write (default: out/demo.png)")
    p.add_argument("--model", help="a demo-model folder (default: the embedded assets/demo_model)")
    p.add_argument("--products", nargs="+", metavar="IMAGE", help="product photos (default: 4 synthetic products)")
    p.add_argument("--categories", help="comma-separated categories (default: 6 BG-synth categories, or the "
                                        "bank's first 6 with --checkpoint)")
    p.add_argument("--references", nargs="*", metavar="IMAGE",
                   help="reference images for the style row (default: 6 BG-synth references; none: no row)")

    p.add_argument("--seed", type=checks.seed, default=0)
    p.add_argument("--threads", type=checks.integer(1, 1024), help="torch CPU threads")
    add_model_options(p)
    p.set_defaults(func=_cmd)
