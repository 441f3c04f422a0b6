"""Upscale models for the export background (ESRGAN-class files from ComfyUI's ``models/upscale_models``).

Loaded the way ComfyUI's *Load Upscale Model* node loads them — the state dict (``module.`` prefix removed)
handed to spandrel's ``ModelLoader``, which recognises the architecture — but from ``.safetensors`` only
(``.pth`` files are pickles that can run code). spandrel is an optional dependency: ``pip install
'productbg[upscale]'``; ComfyUI ships it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from .errors import PipelineError

EXTRA = "upscale"
TILE = 512
OVERLAP = 32
PROBE = 16  # side of the grey image an upscaler is tried on when loaded


def _spandrel() -> Any:
    try:
        # optional dependency: spandrel
        import spandrel
    except ImportError:
        raise PipelineError(f"--upscaler needs spandrel, which is not installed; install it with: "
                            f"pip install 'productbg[{EXTRA}]' (or leave --upscaler out to resize with Lanczos)") \
            from None
    return spandrel


def load_upscaler(path: str | os.PathLike, device: str | torch.device = "cpu") -> "ModelUpscaler":
    """An upscale model file as a :class:`ModelUpscaler`.

    Raises:
        PipelineError: not a ``.safetensors`` file, spandrel missing, or not a single-image upscale model.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise PipelineError(f"--upscaler {path}: only .safetensors upscale models are loaded (.pth/.pt files are "
                            "pickles that can run code; convert them first)")
    if not path.is_file():
        raise PipelineError(f"--upscaler {path}: file not found (ComfyUI keeps these in models/upscale_models)")
    spandrel = _spandrel()
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for broken headers
        raise PipelineError(f"--upscaler {path}: not a readable safetensors file ({' '.join(str(e).split())})") \
            from None
    if all(k.startswith("module.") for k in state):              # as comfy.utils.state_dict_prefix_replace
        state = {k[len("module."):]: v for k, v in state.items()}
    try:
        model = spandrel.ModelLoader().load_from_state_dict(state)
    except Exception as e:  # spandrel raises UnsupportedModelError and others
        raise PipelineError(f"--upscaler {path}: not an upscale model spandrel recognises "
                            f"({' '.join(str(e).split())[:200]})") from None
    if not isinstance(model, spandrel.ImageModelDescriptor):
        raise PipelineError(f"--upscaler {path}: a {type(model).__name__}, not a single-image upscale model")
    if (model.input_channels, model.output_channels) != (3, 3):
        raise PipelineError(f"--upscaler {path}: a {model.input_channels}-channel to {model.output_channels}-channel "
                            "model; the background is RGB, so use an RGB (3-channel) upscale model")
    upscaler = ModelUpscaler(model.eval(), device, name=path.name)
    if not np.isfinite(upscaler(np.full((PROBE, PROBE, 3), 0.5, np.float32))).all():
        raise PipelineError(f"--upscaler {path}: the model turns a grey test image into NaN or infinite values (a "
                            "broken file, or weights that overflow); use another upscale model, or leave --upscaler "
                            "out to resize with Lanczos")
    return upscaler


class ModelUpscaler:
    """A spandrel ``ImageModelDescriptor`` (what ComfyUI's ``UPSCALE_MODEL`` is) as
    ``[H, W, 3]`` float32 → ``[sH, sW, 3]`` float32, run in overlapping tiles of 512 px like ComfyUI's
    *Upscale Image (using Model)*.

    Args:
        model: the descriptor. device: where it runs. name: for ``result.json``.
    """

    def __init__(self, model: Any, device: str | torch.device = "cpu", name: str = "") -> None:
        self.model, self.device, self.name = model, torch.device(device), name
        self.scale = int(model.scale)

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> np.ndarray:
        """``[H, W, 3]`` float32 0..1 → ``[sH, sW, 3]`` (NaN stays NaN: the export refuses it)."""
        x = torch.from_numpy(np.ascontiguousarray(image[..., :3], np.float32)).permute(2, 0, 1)[None]
        dtype = next(iter(self.model.model.parameters())).dtype
        self.model.to(self.device)
        try:
            out = self._tiled(x.to(self.device, dtype))
        finally:
            self.model.to("cpu")
        return out[0].permute(1, 2, 0).float().clamp(0.0, 1.0).cpu().numpy()

    def _tiled(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        s = self.scale
        if h <= TILE and w <= TILE:
            return self.model(x)
        out = torch.zeros(1, 3, h * s, w * s, dtype=x.dtype, device=x.device)
        weight = torch.zeros(1, 1, h * s, w * s, dtype=x.dtype, device=x.device)
        step = TILE - OVERLAP
        for y in range(0, max(h - OVERLAP, 1), step):
            for xx in range(0, max(w - OVERLAP, 1), step):
                y0, x0 = min(y, max(h - TILE, 0)), min(xx, max(w - TILE, 0))
                tile = x[:, :, y0:y0 + TILE, x0:x0 + TILE]
                up = self.model(tile)
                out[:, :, y0 * s:y0 * s + up.shape[2], x0 * s:x0 * s + up.shape[3]] += up
                weight[:, :, y0 * s:y0 * s + up.shape[2], x0 * s:x0 * s + up.shape[3]] += 1
        return out / weight.clamp(min=1)

    def describe(self) -> dict[str, Any]:
        """JSON-ready: file, architecture, scale."""
        return {"file": self.name, "architecture": self.model.architecture.name, "scale": self.scale}
