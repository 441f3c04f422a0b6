"""The embedded demo model (``assets/demo_model``) as a :class:`~productbg.pipeline.ProductBGPipeline`.

The model is trained from nothing by our own trainers on BG-synth (see :mod:`productbg.training.demo_model`,
``scripts/train_demo_model.py`` and the ``recipe.json`` next to the weights): 64×64 images, 16 categories, one
UNet for all of them with identifier prompts, and a reference-style encoder. It is a toy — it knows BG-synth's
16 background families and nothing else — but every part of the real data flow runs on it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import PipelineError
from .pipeline import GenerateSettings, ProductBGPipeline

DEMO_MODEL = Path(__file__).resolve().parent.parent / "assets" / "demo_model"
BANK_FILE = "category_bank.safetensors"
STYLE_FILE = "style_encoder.safetensors"
#: How the demo model is sampled: its training resolution and prompts (no free words, empty negative).
DEMO_SETTINGS = GenerateSettings(size=64, steps=20, guidance_scale=5.0, extra_text="", negative_prompt="",
                                 feather=0.5, style_weight=1.0)
#: The prompt template of reference-style-only generation (the Personality-Wise trainer's prompt).
STYLE_ONLY_TEMPLATE = "a product photo {id}"


def demo_recipe(folder: str | os.PathLike = DEMO_MODEL) -> dict[str, Any]:
    """The training record shipped with the model (settings, stage timings, file sizes)."""
    path = Path(folder) / "recipe.json"
    if not path.is_file():
        raise PipelineError(f"{folder}: no demo model here (recipe.json missing); train one with "
                            "python scripts/train_demo_model.py")
    return json.loads(path.read_text(encoding="utf-8"))


def load_demo_pipeline(folder: str | os.PathLike = DEMO_MODEL, settings: GenerateSettings = DEMO_SETTINGS,
                       device: str | None = "cpu") -> ProductBGPipeline:
    """The demo model with its bank, style encoder and CLIP vision model.

    Raises:
        PipelineError: the folder is not a demo model.
    """
    root = Path(folder)
    demo_recipe(root)
    return ProductBGPipeline.from_pretrained(root, bank=root / BANK_FILE, style_encoder=root / STYLE_FILE,
                                             clip_vision=root / "image_encoder", settings=settings, device=device)
