"""The embedded demo model: a small inpainting model trained end to end by the project's own trainers.

No Stable Diffusion weights can ship with the project, so ``productbg demo`` runs on a model that our trainers
build from nothing on BG-synth (64×64 images, 16 categories), in four stages on the same engine (checkpoints,
exact resume, accelerate) as real training:

1. ``synth``  — BG-synth, 16 categories × 96 training images + 8 held-out images each (:mod:`.bgsynth`);
2. ``vae``    — a 4-pixels-per-latent autoencoder from scratch (:mod:`.vae`);
3. ``cg``     — the Category-Wise Generator: a 9-channel UNet trained from scratch (``unet="full"``) together
   with every category's identifier vectors, mask-guided attention active, 10 % empty prompts for
   classifier-free guidance; the text encoder is a small frozen random CLIP text model with the real vocabulary;
4. ``pg``     — the Personality-Wise style encoder on the trained UNet, with a small frozen random CLIP vision
   model.

:func:`pack` then writes the shipped folder (``assets/demo_model``): a diffusers-layout ``unet/ vae/
text_encoder/ scheduler/``, ``image_encoder/``, ``category_bank.safetensors``, ``style_encoder.safetensors``
(weights in float16) and ``recipe.json`` (every setting, stage timings, sizes). ``scripts/train_demo_model.py``
runs it all.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..fileio import write_text_atomically
from .bgsynth import SynthSpec, generate
from .cg import BANK_FILE, UNET_DIR, CGConfig, CGTask
from .engine import EngineConfig, fit
from .model_folder import staged_dir
from .models import ASSETS
from .pg import load_vision, STYLE_FILE, PGConfig, PGTask
from .vae import VAE_DIR, VAEConfig, VAETask

RESOLUTION = 64
CATEGORIES = 16
TEXT_WIDTH = 64
UNET_CONFIG: dict[str, Any] = dict(
    sample_size=RESOLUTION // 4, in_channels=9, out_channels=4, layers_per_block=1,
    block_out_channels=(64, 128, 128), down_block_types=("CrossAttnDownBlock2D",) * 3,
    up_block_types=("CrossAttnUpBlock2D",) * 3, cross_attention_dim=TEXT_WIDTH, attention_head_dim=8,
    norm_num_groups=16,
)
TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)
PACKED_PARTS = ("unet", "vae", "text_encoder", "image_encoder")


@dataclass
class Recipe:
    """Every setting of the four stages (the defaults are the shipped model's recipe).

    ``scale`` multiplies every stage's step count (tests run the recipe at a tiny scale).
    """

    seed: int = 0
    per_category: int = 96
    held_out: int = 8
    vae_steps: int = 1500
    vae_lr: float = 2e-3
    cg_steps: int = 3600
    cg_lr: float = 6e-4
    identifier_lr: float = 5e-3
    vectors_per_id: int = 4
    caption_dropout: float = 0.1
    pg_steps: int = 600
    pg_lr: float = 1e-3
    pg_variant: str = "plus"
    pg_tokens: int = 4
    pg_resampler: tuple[int, int, int, int] = (64, 2, 4, 16)
    batch_size: int = 16
    scale: float = 1.0

    def steps(self, n: int) -> int:
        return max(1, round(n * self.scale))


def text_encoder(seed: int = 0):
    """The demo's frozen text encoder: CLIP text, real vocabulary, width 64, random weights from ``seed``."""
    # optional dependency: transformers
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)).eval()


def init_base(vae_dir: Path, dest: Path, seed: int = 0) -> Path:
    """The starting diffusers folder of the ``cg`` stage: a random UNet and text encoder, the trained VAE."""
    # optional dependency: diffusers
    from diffusers import UNet2DConditionModel


    torch.manual_seed(seed)
    with staged_dir(dest) as tmp:
        UNet2DConditionModel(**UNET_CONFIG).save_pretrained(tmp / "unet", safe_serialization=True)
        text_encoder(seed).save_pretrained(tmp / "text_encoder", safe_serialization=True)
        shutil.copytree(vae_dir, tmp / "vae")
        (tmp / "scheduler").mkdir()
        shutil.copy(ASSETS / "scheduler_config.json", tmp / "scheduler" / "scheduler_config.json")
    return dest


def assemble(base: Path, unet_dir: Path, dest: Path) -> Path:
    """``base`` with its ``unet/`` replaced by a trained one (what the ``pg`` stage and :func:`pack` read)."""
    with staged_dir(dest) as tmp:
        for part in ("vae", "text_encoder", "scheduler"):
            shutil.copytree(base / part, tmp / part)
        shutil.copytree(unet_dir, tmp / "unet")
    return dest


def pack(model: Path, bank: Path, style: Path, dest: Path, recipe: dict[str, Any]) -> Path:
    """Write the shipped folder: float16 weights, the bank, the style encoder, the CLIP vision model, recipe."""
    # optional dependency: diffusers, transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel


    kw = dict(local_files_only=True)
    with staged_dir(dest) as tmp:
        UNet2DConditionModel.from_pretrained(model / "unet", **kw).half().save_pretrained(tmp / "unet")
        AutoencoderKL.from_pretrained(model / "vae", **kw).half().save_pretrained(tmp / "vae")
        CLIPTextModel.from_pretrained(model / "text_encoder", **kw).half().save_pretrained(tmp / "text_encoder")
        load_vision("tiny").half().save_pretrained(tmp / "image_encoder")
        for part in PACKED_PARTS:
            _drop_local_path(tmp / part / "config.json")
        shutil.copytree(model / "scheduler", tmp / "scheduler")
        shutil.copy(bank, tmp / bank.name)
        shutil.copy(style, tmp / style.name)
        sizes = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        recipe = dict(recipe, files=sizes, total_bytes=sum(sizes.values()))
        (tmp / "recipe.json").write_text(json.dumps(recipe, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return dest


def _drop_local_path(config: Path) -> None:
    """Remove ``_name_or_path`` (where the weights were loaded from on the training machine) from a config."""
    data = json.loads(config.read_text(encoding="utf-8"))
    if data.pop("_name_or_path", None) is not None:
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------- stages
def _engine(output: Path, steps: int, lr: float, r: Recipe, progress: bool):
    return EngineConfig(output_dir=output, max_steps=steps, batch_size=r.batch_size, lr=lr, lr_schedule="cosine",
                        warmup_steps=min(100, steps // 10), seed=r.seed, checkpoint_every=max(50, steps // 4),
                        keep_checkpoints=1, resume="latest", progress=progress, cpu=True)


def train(work: Path, dest: Path, recipe: Recipe = Recipe(), progress: bool = True,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the four stages in ``work`` (each resumes if interrupted) and :func:`pack` into ``dest``.

    Returns:
        The recipe record written to ``dest/recipe.json``.
    """
    work.mkdir(parents=True, exist_ok=True)
    r = recipe
    data = work / "bgsynth"

    timings_file = work / "stage_seconds.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        """Run a stage; its seconds add up over interrupted and resumed invocations."""
        start = time.perf_counter()
        log(f"[demo-model] stage {name} ...")
        out = fn()
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - start, 1)
        write_text_atomically(timings_file, json.dumps(timings))
        log(f"[demo-model] stage {name} done ({timings[name]:.0f} s in all)")
        return out

    spec = SynthSpec(categories=CATEGORIES, per_category=r.per_category, held_out=r.held_out, pairs=1,
                     size=RESOLUTION, seed=r.seed)
    stage("synth", lambda: generate(data, spec, overwrite=False))
    vae_cfg = VAEConfig(data=data, resolution=RESOLUTION)
    stage("vae", lambda: fit(VAETask(vae_cfg), _engine(work / "vae", r.steps(r.vae_steps), r.vae_lr, r, progress)))
    base = init_base(work / "vae" / VAE_DIR, work / "base", r.seed)
    cg_cfg = CGConfig(data=data, model=str(base), resolution=RESOLUTION, vectors_per_id=r.vectors_per_id,
                      unet="full", identifier_lr=r.identifier_lr, caption_dropout=r.caption_dropout)
    stage("cg", lambda: fit(CGTask(cg_cfg), _engine(work / "cg", r.steps(r.cg_steps), r.cg_lr, r, progress)))
    model = assemble(base, work / "cg" / UNET_DIR, work / "model")
    pg_cfg = PGConfig(data=data, model=str(model), vision_model="tiny", resolution=RESOLUTION, variant=r.pg_variant,
                      tokens=r.pg_tokens, resampler=r.pg_resampler)
    stage("pg", lambda: fit(PGTask(pg_cfg), _engine(work / "pg", r.steps(r.pg_steps), r.pg_lr, r, progress)))
    record = {"recipe": asdict(r), "synth": asdict(spec), "vae": _plain(asdict(vae_cfg)), "cg": _plain(asdict(cg_cfg)),
              "pg": _plain(asdict(pg_cfg)), "seconds": timings, "threads": torch.get_num_threads(),
              "torch": torch.__version__}
    pack(model, work / "cg" / BANK_FILE, work / "pg" / STYLE_FILE, dest, record)
    return json.loads((dest / "recipe.json").read_text(encoding="utf-8"))


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    """Paths become names relative to the work folder (the record must not carry this machine's paths)."""
    return {k: (Path(v).name if isinstance(v, Path) or (isinstance(v, str) and "/" in v) else v) for k, v in d.items()}
