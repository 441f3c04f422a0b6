"""A simple judge of BG-synth background style: hand-made image features + multinomial logistic regression.

Used by the toy-scale evaluation (``bench/toy_paper_table.py``) to ask "which category's background is this?"
of generated images. Deliberately simple and independent of the generator: it sees

* colour — a joint 4×4×4 RGB histogram of the image;
* layout — the image averaged down to 8×8 RGB;
* texture — the energy of the grey image's spectrum in 4 radial × 6 orientation bands, and the histogram of
  gradient orientations weighted by magnitude (8 bins).

Features are standardised with the training set's mean and deviation; the classifier is a linear softmax
trained with L-BFGS. Pure torch / numpy, deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

COLOUR_BINS = 4
LAYOUT_SIDE = 8
RADIAL_BANDS = 4
ANGLE_BANDS = 6
GRADIENT_BINS = 8


def features(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` images in 0..1 → ``[B, F]`` feature vectors (see the module docstring)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    x = images.float().clamp(0, 1)
    b, _, h, w = x.shape
    q = (x * COLOUR_BINS).long().clamp(max=COLOUR_BINS - 1)
    index = (q[:, 0] * COLOUR_BINS + q[:, 1]) * COLOUR_BINS + q[:, 2]
    colour = F.one_hot(index.flatten(1), COLOUR_BINS ** 3).float().mean(1)
    layout = F.adaptive_avg_pool2d(x, LAYOUT_SIDE).flatten(1)
    grey = x.mean(1)
    return torch.cat([colour, layout, _spectrum(grey), _gradients(grey)], 1)


def _spectrum(grey: torch.Tensor) -> torch.Tensor:
    """Log energy in radial × orientation bands of the (mean-removed) 2-D spectrum, normalised per image."""
    _, h, w = grey.shape
    power = torch.fft.fft2(grey - grey.mean((1, 2), keepdim=True)).abs() ** 2
    fy = torch.fft.fftfreq(h)[:, None].expand(h, w)
    fx = torch.fft.fftfreq(w)[None, :].expand(h, w)
    radius = (fy ** 2 + fx ** 2).sqrt() / 0.5
    angle = torch.atan2(fy, fx) % torch.pi
    r_bin = (radius * RADIAL_BANDS).long().clamp(max=RADIAL_BANDS - 1)
    a_bin = (angle / torch.pi * ANGLE_BANDS).long().clamp(max=ANGLE_BANDS - 1)
    band = (r_bin * ANGLE_BANDS + a_bin).flatten()
    valid = (radius.flatten() > 0).float()
    energy = torch.zeros(grey.shape[0], RADIAL_BANDS * ANGLE_BANDS).index_add_(1, band, power.flatten(1) * valid)
    return torch.log1p(energy / energy.sum(1, keepdim=True).clamp_min(1e-8) * 100)


def _gradients(grey: torch.Tensor) -> torch.Tensor:
    gy = grey[:, 1:, :-1] - grey[:, :-1, :-1]
    gx = grey[:, :-1, 1:] - grey[:, :-1, :-1]
    magnitude = (gx ** 2 + gy ** 2).sqrt().flatten(1)
    bins = ((torch.atan2(gy, gx) % torch.pi) / torch.pi * GRADIENT_BINS).long().clamp(max=GRADIENT_BINS - 1)
    hist = torch.zeros(grey.shape[0], GRADIENT_BINS).scatter_add_(1, bins.flatten(1), magnitude)
    return torch.cat([hist / magnitude.sum(1, keepdim=True).clamp_min(1e-8), magnitude.mean(1, keepdim=True) * 10], 1)


@dataclass
class StyleClassifier:
    """Trained classifier: feature standardisation + linear softmax over ``classes``."""

    classes: list[str]
    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Standardised features (also a style descriptor for similarity)."""
        return (features(images) - self.mean) / self.std

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(images) @ self.weight.T + self.bias

    def predict(self, images: torch.Tensor) -> list[str]:
        """The most likely class of each image."""
        return [self.classes[i] for i in self.logits(images).argmax(1).tolist()]

    def accuracy(self, images: torch.Tensor, labels: Sequence[str]) -> float:
        """Fraction of ``images`` predicted as their ``labels``."""
        return float(np.mean([p == t for p, t in zip(self.predict(images), labels)]))


def train_classifier(images: torch.Tensor, labels: Sequence[str], l2: float = 1e-3,
                     iterations: int = 200) -> StyleClassifier:
    """Fit the classifier on ``[N, 3, H, W]`` images (0..1) with their category labels."""
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise ValueError("need images of at least two categories")
    target = torch.tensor([classes.index(t) for t in labels])
    raw = features(images)
    mean, std = raw.mean(0), raw.std(0).clamp_min(1e-4)
    x = (raw - mean) / std
    weight = torch.zeros(len(classes), x.shape[1], requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, target) + l2 * (weight ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return StyleClassifier(classes, mean, std, weight.detach(), bias.detach())
