"""Command line of the training package.

    productbg dataset synth OUT [--categories 16 --per-category 64 --held-out 4 --size 128 --seed 0]
    productbg dataset build SRC OUT [--held-out 0.05 --max-side 1024 --alpha-only]
    productbg dataset check ROOT [--split bg60k --decode]
    productbg train-cg --data DIR --model MODEL --output OUT [options]
    productbg train-cg --category NAME --images DIR --model MODEL --output OUT     (one designer LoRA, named
                                                                                     in the bank as NAME's)
    productbg train-pg --data DIR --model MODEL --output OUT [options]
"""
from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

from ..pipeline.errors import PipelineError
from ..pipeline.flux_models import T5_MIN_LENGTH
from ..pipeline.single_file import checkpoint_backbone
from ..training.bgsynth import SynthSpec, generate
from ..training.cg import CGConfig, CGTask, BANK_FILE, LORA_FILE
from ..training.datasets import DatasetError, open_bg60k
from ..training.engine import EngineConfig, fit
from ..training.flux_cg import LORA_FILE as FLUX_LORA_FILE, TINY_FLUX, FluxCGTask
from ..training.folder import build_from_folder
from ..training.models import TINY_SOURCES
from ..training.outputs import set_category_lora
from ..training.pg import PGConfig, PGTask
from . import checks
from .errors import CliError

I = checks.integer
F = checks.number


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``dataset``, ``train-cg`` and ``train-pg``."""
    _dataset_parser(sub)
    cg = sub.add_parser("train-cg", help="train the Category-Wise Generator (identifiers + one UNet LoRA)",
                        description="Train every category's identifier vectors and one shared UNet LoRA (on Flux.1: "
                                    "T5-XXL identifier vectors and one transformer LoRA) on a BG60k-layout dataset, "
                                    "with mask-guided attention active.")
    _engine_args(cg)
    _cg_args(cg)
    cg.set_defaults(func=cmd_train_cg)
    pg = sub.add_parser("train-pg", help="train the Personality-Wise Generator (reference-style encoder)",
                        description="Train the style projection and per-layer K/V on self-supervised pairs "
                                    "(UNet and CLIP vision frozen).")
    _engine_args(pg)
    _pg_args(pg)
    pg.set_defaults(func=cmd_train_pg)


# ---------------------------------------------------------------------------------------------- dataset
def _dataset_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dataset", help="build, generate and check BG60k-layout datasets")
    dsub = p.add_subparsers(dest="dataset_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: p.print_help() or 2)

    syn = dsub.add_parser("synth", help="generate the procedural BG-synth dataset")
    syn.add_argument("out", type=Path)
    syn.add_argument("--categories", type=I(1, 10_000), default=16)
    syn.add_argument("--per-category", type=I(1, 1_000_000), default=64, help="training images per category")
    syn.add_argument("--held-out", type=I(0, 1_000_000), default=4, help="held-out (bg1k) images per category")
    syn.add_argument("--pairs", type=I(0, 100), default=1, help="reference pairs per held-out image")
    syn.add_argument("--size", type=I(16, 2048, multiple=8), default=128)
    syn.add_argument("--seed", type=checks.seed, default=0)
    syn.add_argument("--names", help="comma-separated category names (default: built-in English names)")
    syn.set_defaults(func=cmd_synth)

    b = dsub.add_parser("build", help="turn a folder (category sub-folders) or CSV (path,category) into the layout")
    b.add_argument("src", type=Path)
    b.add_argument("out", type=Path)
    b.add_argument("--held-out", type=F(0, 1, hint=" (a fraction; 1 would hold out everything)"), default=0.0, help="fraction of images put in the bg1k split")
    b.add_argument("--max-side", type=I(16, 16384), help="downscale images larger than this")
    b.add_argument("--alpha-only", action="store_true", help="masks from alpha only (no segmentation)")
    b.set_defaults(func=cmd_build)

    c = dsub.add_parser("check", help="validate a BG60k-layout folder and print its summary")
    c.add_argument("root", type=Path)
    c.add_argument("--split", default="bg60k", choices=["bg60k", "bg1k"])
    c.add_argument("--decode", action="store_true", help="decode every image (slow, finds truncated files)")
    c.set_defaults(func=cmd_check)


def _error(message: str) -> Exception:
    return CliError(" ".join(str(message).split("\n")))


def cmd_synth(args: argparse.Namespace) -> int:
    names = tuple(n.strip() for n in args.names.split(",")) if args.names else None
    checks.output_dir(args.out, "OUT")
    if args.per_category * args.categories > 10_000_000:
        raise _error(f"--categories {args.categories} × --per-category {args.per_category} is more than 10 million "
                     "images; generate fewer")
    try:
        spec = SynthSpec(args.categories, args.per_category, args.held_out, args.pairs, args.size, args.seed, names)
        counts = generate(args.out, spec)
    except ValueError as e:
        raise _error(str(e)) from None
    print(f"wrote {args.out}: {counts['bg60k']} training, {counts['bg1k']} held-out images, {counts['pairs']} pairs")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    if args.held_out >= 1:
        raise _error(f"argument --held-out: must be below 1 (a fraction of the images; {args.held_out:g} would "
                     "hold out everything and leave nothing to train on)")
    if not args.src.exists():
        raise _error(f"SRC {args.src}: no such folder or CSV file")
    if args.src.is_file() and args.src.suffix.lower() != ".csv":
        raise _error(f"SRC {args.src}: give a folder of category sub-folders or a .csv (path,category)")
    checks.output_dir(args.out, "OUT")
    if args.out.resolve() == (args.src if args.src.is_dir() else args.src.parent).resolve():
        raise _error(f"OUT {args.out} is the source folder; write the dataset to a new folder")
    try:
        report = build_from_folder(args.src, args.out, held_out=args.held_out, max_side=args.max_side,
                                   segmenter=None if args.alpha_only else "auto")
    except FileNotFoundError as e:
        raise _error(str(e)) from None
    print(report.render())
    return 0 if report.written + report.reused else 1


def cmd_check(args: argparse.Namespace) -> int:
    checks.input_dir(args.root, "ROOT")
    try:
        index = open_bg60k(args.root, args.split, decode=args.decode)
    except DatasetError as e:
        raise _error(str(e)) from None
    counts = index.counts()
    print(f"{args.root} ({args.split}): {len(index.records)} entries, {len(counts)} categories, "
          f"{min(counts.values())}-{max(counts.values())} images per category, {index.unlisted} unlisted files")
    return 0


# ---------------------------------------------------------------------------------------------- training
def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--data", type=Path, help="BG60k-layout dataset folder")
    g.add_argument("--model", default="tiny-inpaint",
                   help="base model: an SD1.5 or SDXL .safetensors checkpoint (inpainting or not), a diffusers "
                        "folder, a Flux.1 file (train-cg: dev, schnell or Fill), or tiny / tiny-inpaint / tiny-sdxl "
                        "/ tiny-sdxl-inpaint / tiny-flux / tiny-flux-fill / tiny-flux-schnell (random test models)")
    g.add_argument("--model-configs", type=Path,
                   help="component configs for a single-file --model (default: the shipped set of its backbone)")
    g.add_argument("--output", type=Path, required=True, help="output folder (logs, checkpoints, weights)")
    g.add_argument("--resolution", type=I(16, 2048, multiple=8), default=512,
                   help="training side; with buckets the pixel count each bucket keeps (a multiple of 64)")
    g.add_argument("--buckets", default="auto", choices=["auto", "on", "off"],
                   help="aspect-ratio buckets: images grouped by aspect at the trained pixel count, one bucket per "
                        "batch (auto: on for SDXL when --resolution is a multiple of 64, off for SD1.5)")
    g.add_argument("--max-steps", type=I(1, 100_000_000), default=1000)
    g.add_argument("--batch-size", type=I(1, 1024), default=1, help="per process")
    g.add_argument("--grad-accum", type=I(1, 1024), default=1)
    g.add_argument("--lr", type=F(0, 10, low_open=True), default=1e-4)
    g.add_argument("--lr-schedule", default="constant",
                   choices=["constant", "constant_with_warmup", "cosine", "linear"])
    g.add_argument("--warmup-steps", type=I(0, 100_000_000), default=0)
    g.add_argument("--max-grad-norm", type=F(0, 1e6, low_open=True), default=1.0)
    g.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--seed", type=checks.seed, default=0)
    g.add_argument("--checkpoint-every", type=I(0, 100_000_000), default=500)
    g.add_argument("--keep-checkpoints", type=I(1, 1000), default=3)
    g.add_argument("--resume", help="'latest' or a checkpoint folder")
    g.add_argument("--sample-every", type=I(0, 100_000_000), default=0, help="preview PNG every N steps (0 = none)")
    g.add_argument("--num-workers", type=I(0, 256), default=0)
    g.add_argument("--skip-bad", action="store_true", help="train on the good entries of a dataset with problems")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")


def _cg_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("category-wise")
    g.add_argument("--vectors-per-id", type=I(1, 75), default=4)
    g.add_argument("--template", default="a product photo on a {id} background")
    g.add_argument("--init", default="name", choices=["name", "background"])
    g.add_argument("--init-bank", type=Path, metavar="BANK",
                   help="start each category's identifier from this bank's vectors (e.g. `productbg bank "
                        "from-text`); its categories must cover the dataset's, its family the model's")
    g.add_argument("--unet", default="lora", choices=["lora", "full"],
                   help="lora: one shared UNet LoRA (the paper); full: train every UNet weight (writes unet/)")
    g.add_argument("--lora-rank", type=I(1, 1024), default=8)
    g.add_argument("--lora-alpha", type=F(0, 1e4, low_open=True))
    g.add_argument("--identifier-lr", type=F(0, 10, low_open=True), default=5e-3)
    g.add_argument("--mask-mode", default="hard", choices=["hard", "loss", "both"])
    g.add_argument("--confinement", default="context", choices=["context", "columns"],
                   help="context: product positions attend to the prompt without the identifier (exactly no "
                        "identifier gradient from them); columns: mask only the identifier's tokens (ablation)")
    g.add_argument("--strength", type=F(0, 1), default=1.0, help="identifier confinement strength (hard/both)")
    g.add_argument("--mass-loss-weight", type=F(0, 1e4), default=0.1, help="attention-mass loss weight (loss/both)")
    g.add_argument("--background-loss-weight", type=F(0, 1e4), default=1.0,
                   help="denoising-loss weight of background latents (product latents weigh 1)")
    g.add_argument("--caption-dropout", type=F(0, 1), default=0.0,
                   help="probability of a sample with the empty prompt (for classifier-free guidance when the "
                        "UNet trains from scratch)")
    g.add_argument("--mask-jitter", type=F(-0.5, 0.5), nargs=2, default=(-0.04, 0.02), metavar=("MIN", "MAX"),
                   help="random product-mask dilation radius range, fraction of the side (negative erodes)")
    g.add_argument("--no-flip", action="store_true")
    g.add_argument("--category", help="train one category only (with --images: a designer LoRA); the bank "
                                      "names the run's LoRA as this category's own")
    g.add_argument("--images", type=Path, help="folder of product images (alpha = mask) for --category")
    g.add_argument("--t5", type=Path, metavar="FILE", help="Flux only: the T5-XXL text encoder of a transformer-only "
                   "--model (default: found beside it or in its ComfyUI models folder)")
    g.add_argument("--clip-l", type=Path, metavar="FILE", help="Flux only: the CLIP-L text encoder (as --t5)")
    g.add_argument("--vae", type=Path, metavar="FILE", help="Flux only: the Flux VAE, ae.safetensors (as --t5)")
    g.add_argument("--t5-min-length", type=I(1, 4096), metavar="N",
                   help=f"Flux only: T5 tokens per prompt, at least (default {T5_MIN_LENGTH}, ComfyUI's padding; "
                        "match ComfyUI's T5TokenizerOptions min_length if you change it)")


def _engine_config(args: argparse.Namespace):
    return EngineConfig(output_dir=args.output, max_steps=args.max_steps, batch_size=args.batch_size,
                        grad_accum=args.grad_accum, lr=args.lr, lr_schedule=args.lr_schedule,
                        warmup_steps=args.warmup_steps, max_grad_norm=args.max_grad_norm,
                        mixed_precision=args.mixed_precision, seed=args.seed,
                        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                        resume=args.resume, sample_every=args.sample_every, num_workers=args.num_workers,
                        progress=not args.no_progress, cpu=args.cpu)


def _check_run_args(args: argparse.Namespace) -> None:
    """Paths and option pairs of a training run, before any model loads or the run folder is made."""
    if args.data is not None:
        checks.input_dir(args.data, "--data")
    if getattr(args, "images", None) is not None:
        checks.input_dir(args.images, "--images")

    if args.model not in TINY_SOURCES and args.model not in TINY_FLUX and not Path(args.model).is_dir():
        checks.input_file(args.model, "--model")
    if args.model_configs is not None:
        checks.input_dir(args.model_configs, "--model-configs")
    if getattr(args, "init_from", None) is not None:
        checks.input_file(args.init_from, "--init-from")
    if getattr(args, "init_bank", None) is not None:
        checks.input_file(args.init_bank, "--init-bank")
    for option in ("mask_jitter", "crop_scale"):
        pair = getattr(args, option, None)
        if pair is not None and pair[0] > pair[1]:
            raise _error(f"argument --{option.replace('_', '-')}: MIN {pair[0]:g} is above MAX {pair[1]:g}")
    if args.warmup_steps > args.max_steps:
        raise _error(f"argument --warmup-steps: {args.warmup_steps} is more than --max-steps {args.max_steps}")
    if args.resume not in (None, "latest"):
        checks.input_dir(args.resume, "--resume")
    checks.output_dir(args.output, "--output")


class _RunFolder:
    """Removes the run folder again when a run that created it fails before its first checkpoint."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.created = folder, not folder.exists()

    def __enter__(self) -> "_RunFolder":
        return self

    def __exit__(self, kind, value, tb) -> bool:
        started = (self.folder / "checkpoints").is_dir() and any((self.folder / "checkpoints").iterdir())
        if kind is not None and self.created and self.folder.is_dir() and not started:
            shutil.rmtree(self.folder, ignore_errors=True)
        return False


def _designer_dataset(args: argparse.Namespace) -> Path:
    """``--category NAME --images DIR``: build OUT/dataset from the images (alpha masks)."""
    out = args.output / "dataset"
    out.mkdir(parents=True, exist_ok=True)
    listing = out / "sources.csv"
    with listing.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "category"])
        w.writerows([str(p.resolve()), args.category] for p in sorted(args.images.iterdir()) if p.is_file())
    report = build_from_folder(listing, out, segmenter="auto")
    print(report.render())
    return out


def cmd_train_cg(args: argparse.Namespace) -> int:
    if args.images is not None and not args.category:
        raise _error("--images needs --category NAME")
    if args.images is None and args.data is None:
        raise _error("pass --data DIR (a BG60k-layout folder) or --category NAME --images DIR")
    _check_run_args(args)
    with _RunFolder(args.output):
        return _train_cg(args)


def _train_cg(args: argparse.Namespace) -> int:
    data = _designer_dataset(args) if args.images is not None else args.data
    try:
        cfg = CGConfig(data=data, model=args.model, resolution=args.resolution, vectors_per_id=args.vectors_per_id,
                       template=args.template, init=args.init, unet=args.unet, lora_rank=args.lora_rank,
                       lora_alpha=args.lora_alpha,
                       identifier_lr=args.identifier_lr, mask_mode=args.mask_mode,
                       confinement=args.confinement, strength=args.strength,
                       mass_loss_weight=args.mass_loss_weight, background_loss_weight=args.background_loss_weight,
                       caption_dropout=args.caption_dropout, mask_jitter=tuple(args.mask_jitter),
                       flip=not args.no_flip, skip_bad=args.skip_bad,
                       gradient_checkpointing=args.gradient_checkpointing,
                       weights_dtype=_weights_dtype(args.mixed_precision),
                       categories=(args.category,) if args.category else None, model_configs=args.model_configs,
                       buckets=_buckets(args), init_bank=args.init_bank)
        result = fit(_cg_task(args, cfg), _engine_config(args))
    except (DatasetError, ValueError, FileNotFoundError) as e:  # ValueError: PipelineError, WeightsError
        raise _error(str(e)) from None
    if args.category and result.main_process:
        _name_category_lora(result.outputs, args.category)
    _print_result(result)
    return 0


def _cg_task(args: argparse.Namespace, cfg: CGConfig) -> CGTask | FluxCGTask:
    """The SD1.5 / SDXL task, or the Flux one for a Flux ``--model`` (Flux-only options refused elsewhere)."""
    flux_only = {"--t5": args.t5, "--clip-l": args.clip_l, "--vae": args.vae, "--t5-min-length": args.t5_min_length}
    if _model_family(args.model) != "flux":
        given = [k for k, v in flux_only.items() if v is not None]
        if given:
            raise _error(f"{given[0]} is for Flux models; {args.model} is not one")
        return CGTask(cfg)
    if args.sample_every:
        raise _error("--sample-every is not available on Flux yet (previews need the Flux sampler): pass "
                     "--sample-every 0")
    for flag, path in list(flux_only.items())[:3]:
        if path is not None:
            checks.input_file(path, flag)
    return FluxCGTask(cfg, t5_min_length=args.t5_min_length or T5_MIN_LENGTH,
                      companions={"t5": args.t5, "clip_l": args.clip_l, "vae": args.vae})


def _name_category_lora(written: list[Path], category: str) -> None:
    """A single-category run's LoRA is that category's own: name it in the bank (Category LoRA "(from bank)")."""
    bank = next((p for p in written if p.name == BANK_FILE), None)
    lora = next((p for p in written if p.name in (LORA_FILE, FLUX_LORA_FILE)), None)
    if bank is None or lora is None:  # e.g. a full-UNet run writes no LoRA
        return
    set_category_lora(bank, category, lora)
    print(f"the bank names {lora.name} as the LoRA of '{category}': copy it into ComfyUI/models/loras "
          "under that name")


def _buckets(args: argparse.Namespace) -> bool:
    """``--buckets``: ``auto`` is on for SDXL (trained on many aspects) at a resolution buckets can keep."""
    if args.buckets == "on":
        if args.resolution % 64:
            raise _error(f"argument --buckets on: --resolution {args.resolution} is not a multiple of 64 (bucket "
                         "sides are multiples of 64); use e.g. 512 or 1024")
        return True
    return args.buckets == "auto" and args.resolution % 64 == 0 and _model_family(args.model) == "sdxl"


def _model_family(model: str) -> str:
    """The backbone family of ``--model`` without loading it (the header of a checkpoint; a folder's parts)."""
    if model in TINY_SOURCES:
        return TINY_SOURCES[model][0]
    if model in TINY_FLUX:
        return "flux"
    path = Path(model)
    if path.is_dir():
        return "sdxl" if (path / "text_encoder_2").is_dir() else "sd15"

    try:
        return checkpoint_backbone(path).family
    except PipelineError as e:
        raise _error(str(e)) from None


def _weights_dtype(mixed_precision: str) -> str:
    return {"fp16": "float16", "bf16": "bfloat16"}.get(mixed_precision, "float32")


def _print_result(result) -> None:
    if not result.main_process:
        return
    start = f" (resumed from step {result.resumed_from})" if result.resumed_from else ""
    last = f", last loss {result.losses[-1]:.4f}" if result.losses else ""
    print(f"trained to step {result.step}{start}{last}")
    for p in result.outputs:
        print(f"wrote {p}")


# ---------------------------------------------------------------------------------------------- PG
def _pg_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("personality-wise")
    g.add_argument("--variant", default="linear", choices=["linear", "plus"])
    g.add_argument("--tokens", type=I(1, 256), default=4, help="style tokens")
    g.add_argument("--resampler", type=I(1, 8192), nargs=4, metavar=("WIDTH", "DEPTH", "HEADS", "HEAD_WIDTH"),
                   help="plus only: the Resampler's shape (default: IP-Adapter Plus's 768 4 12 64)")
    g.add_argument("--init-from", type=Path, help="start from an IP-Adapter / style encoder .safetensors")
    g.add_argument("--vision-model", default="tiny", help="CLIP vision: a transformers folder, or tiny")
    g.add_argument("--prompt", default="a product photo", help="text prompt used for every sample")
    g.add_argument("--crop-scale", type=F(0, 1, low_open=True), nargs=2, default=(0.5, 1.0), metavar=("MIN", "MAX"))
    g.add_argument("--drop-reference", type=F(0, 1), default=0.05,
                   help="probability of an empty reference (keeps unconditional generation working)")


def cmd_train_pg(args: argparse.Namespace) -> int:
    if args.data is None:
        raise _error("pass --data DIR (a BG60k-layout folder)")
    _check_run_args(args)
    with _RunFolder(args.output):
        return _train_pg(args)


def _train_pg(args: argparse.Namespace) -> int:
    try:
        cfg = PGConfig(data=args.data, model=args.model, vision_model=args.vision_model,
                       resolution=args.resolution, variant=args.variant, tokens=args.tokens,
                       resampler=tuple(args.resampler) if args.resampler else None,
                       init_from=args.init_from, prompt=args.prompt, crop_scale=tuple(args.crop_scale),
                       drop_reference=args.drop_reference, skip_bad=args.skip_bad,
                       gradient_checkpointing=args.gradient_checkpointing,
                       weights_dtype=_weights_dtype(args.mixed_precision), buckets=_buckets(args))
        result = fit(PGTask(cfg), _engine_config(args))
    except (DatasetError, ValueError, FileNotFoundError) as e:  # ValueError: PipelineError, WeightsError
        raise _error(str(e)) from None
    _print_result(result)
    return 0
