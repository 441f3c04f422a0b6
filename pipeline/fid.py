"""FID through a maintained library, only when it and its Inception weights are already on this machine.

Backends, in order: ``torchmetrics`` (with ``torch-fidelity``'s Inception) and ``pytorch-fid``. Each keeps its
weights in torch hub's ``checkpoints`` folder; when the file is not there FID is skipped with a message that
says where it would have to be — nothing is downloaded.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .image_files import load_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MIN_IMAGES = 2
Features = Callable[[torch.Tensor], np.ndarray]  # float [B, 3, H, W] 0..1 -> [B, D]


def _hub_file(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _pytorch_fid() -> tuple[Features, Callable, str] | str:
    try:
        # optional dependency: pytorch_fid
        from pytorch_fid.fid_score import calculate_frechet_distance
        from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3
    except ImportError:
        return "pytorch-fid is not installed"
    weights = _hub_file(FID_WEIGHTS_URL)
    if not weights.is_file():
        return f"pytorch-fid's Inception weights are not at {weights}"
    model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()

    @torch.no_grad()
    def features(x: torch.Tensor) -> np.ndarray:
        return model(x)[0].flatten(1).double().numpy()

    return features, calculate_frechet_distance, "pytorch-fid"


def _torchmetrics() -> tuple[Features, Callable, str] | str:
    try:
        # optional dependency: torch_fidelity
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
    except ImportError:
        return "torchmetrics/torch-fidelity is not installed"
    weights = _hub_file(URL_INCEPTION_V3)
    if not weights.is_file():
        return f"torch-fidelity's Inception weights are not at {weights}"
    model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))

    @torch.no_grad()
    def features(x: torch.Tensor) -> np.ndarray:
        return model((x * 255).round().to(torch.uint8))[0].double().numpy()

    return features, frechet_distance, "torch-fidelity"


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between two Gaussians (used with torch-fidelity's features)."""
    # optional dependency: scipy
    from scipy import linalg

    covmean = np.real(linalg.sqrtm(sigma1 @ sigma2))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def backend() -> tuple[Features, Callable, str] | str:
    """The first available backend, or why none is."""
    reasons = []
    for make in (_torchmetrics, _pytorch_fid):
        found = make()
        if not isinstance(found, str):
            return found
        reasons.append(found)
    return "; ".join(reasons) + " (FID weights are never downloaded; install a library and place its weights there)"


def _images(paths: Sequence[Path], batch: int = 16) -> Any:
    for i in range(0, len(paths), batch):
        yield torch.stack([torch.as_tensor(load_rgb(p)).permute(2, 0, 1) for p in paths[i:i + batch]])


def _stats(features: Features, paths: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    f = np.concatenate([features(x) for x in _images(paths)])
    return f.mean(0), np.cov(f, rowvar=False)


def compute_fid(generated: Sequence[Path], real_dir: str | os.PathLike | None) -> dict[str, Any]:
    """FID of the generated images against a folder of real images, or ``{"status": "skipped", "reason"}``."""
    if real_dir is None:
        return {"status": "skipped", "reason": "no folder of real images given (--fid-real DIR)"}
    real = sorted(p for p in Path(real_dir).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(real) < MIN_IMAGES or len(generated) < MIN_IMAGES:
        return {"status": "skipped", "reason": f"FID needs at least {MIN_IMAGES} images on each side "
                f"({len(generated)} generated, {len(real)} real in {real_dir})"}
    found = backend()
    if isinstance(found, str):
        return {"status": "skipped", "reason": found}
    features, distance, library = found
    value = distance(*_stats(features, list(generated)), *_stats(features, real))
    return {"status": "ok", "value": float(value), "library": library, "images": len(generated),
            "real_images": len(real)}
