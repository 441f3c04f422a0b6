"""Product preservation metrics: masked PSNR, CIEDE2000 colour drift, object expansion, and a pass/fail report.

All metrics look *inside the product* (product mask ≥ 0.5). Object expansion follows the yahoo CVPR-W 2024
definition: ``E = area(mask_out ∪ mask_in) − area(mask_in)``, where ``mask_out`` is the product segmented from the
generated image: the pixels the generator turned into "more product".
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

from ._arrays import Array, check_image, check_mask, to_numpy
from .color import srgb_to_lab


def ciede2000(lab1: Array, lab2: Array, k_l: float = 1.0, k_c: float = 1.0, k_h: float = 1.0) -> np.ndarray:
    """The CIEDE2000 colour difference ΔE00 (Sharma, Wu & Dalal 2005 formulation).

    Args:
        lab1: ``[..., 3]`` CIELAB colours.
        lab2: ``[..., 3]`` CIELAB colours (broadcast against ``lab1``).
        k_l, k_c, k_h: Parametric weighting factors (1 for the reference conditions).

    Returns:
        ``[...]`` float64 differences.
    """
    l1, a1, b1 = np.moveaxis(to_numpy(lab1, np.float64), -1, 0)
    l2, a2, b2 = np.moveaxis(to_numpy(lab2, np.float64), -1, 0)
    c_bar7 = ((np.hypot(a1, b1) + np.hypot(a2, b2)) / 2.0) ** 7
    g = 0.5 * (1.0 - np.sqrt(c_bar7 / (c_bar7 + 25.0 ** 7)))
    a1p, a2p = (1.0 + g) * a1, (1.0 + g) * a2
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p = np.where((a1p == 0) & (b1 == 0), 0.0, np.degrees(np.arctan2(b1, a1p)) % 360.0)
    h2p = np.where((a2p == 0) & (b2 == 0), 0.0, np.degrees(np.arctan2(b2, a2p)) % 360.0)
    chroma_product = c1p * c2p
    dh = h2p - h1p
    dh = np.where(dh > 180.0, dh - 360.0, np.where(dh < -180.0, dh + 360.0, dh))
    dh = np.where(chroma_product == 0, 0.0, dh)
    d_l, d_c = l2 - l1, c2p - c1p
    d_h = 2.0 * np.sqrt(chroma_product) * np.sin(np.radians(dh) / 2.0)
    l_bar, c_bar = (l1 + l2) / 2.0, (c1p + c2p) / 2.0
    h_sum, h_diff = h1p + h2p, np.abs(h1p - h2p)
    h_bar = np.where(h_diff <= 180.0, h_sum / 2.0,
                     np.where(h_sum < 360.0, (h_sum + 360.0) / 2.0, (h_sum - 360.0) / 2.0))
    h_bar = np.where(chroma_product == 0, h_sum, h_bar)
    t = (1.0 - 0.17 * np.cos(np.radians(h_bar - 30.0)) + 0.24 * np.cos(np.radians(2.0 * h_bar))
         + 0.32 * np.cos(np.radians(3.0 * h_bar + 6.0)) - 0.20 * np.cos(np.radians(4.0 * h_bar - 63.0)))
    d_theta = 30.0 * np.exp(-(((h_bar - 275.0) / 25.0) ** 2))
    r_c = 2.0 * np.sqrt(c_bar ** 7 / (c_bar ** 7 + 25.0 ** 7))
    s_l = 1.0 + 0.015 * (l_bar - 50.0) ** 2 / np.sqrt(20.0 + (l_bar - 50.0) ** 2)
    s_c = 1.0 + 0.045 * c_bar
    s_h = 1.0 + 0.015 * c_bar * t
    r_t = -np.sin(np.radians(2.0 * d_theta)) * r_c
    term_l, term_c, term_h = d_l / (k_l * s_l), d_c / (k_c * s_c), d_h / (k_h * s_h)
    return np.sqrt(term_l ** 2 + term_c ** 2 + term_h ** 2 + r_t * term_c * term_h)


def _region(mask: Array, hw: tuple[int, int], name: str = "product_mask") -> np.ndarray:
    """The binary product region (mask ≥ 0.5); ValueError when empty."""
    region = check_mask(to_numpy(mask), hw, name) >= 0.5
    if not region.any():
        raise ValueError(f"{name} is empty: nothing to measure inside the product")
    return region


def _region_pixels(reference: Array, test: Array, mask: Array) -> tuple[np.ndarray, np.ndarray]:
    """The two images' pixels where ``mask ≥ 0.5`` as ``[N, 3]`` float64 (selected before converting)."""
    a = check_image(to_numpy(reference, None), "reference")[..., :3]
    b = check_image(to_numpy(test, None), "test")[..., :3]
    if a.shape != b.shape:
        raise ValueError(f"images differ in size: {a.shape[1]}x{a.shape[0]} vs {b.shape[1]}x{b.shape[0]}")
    region = _region(mask, a.shape[:2])
    return a[region].astype(np.float64), b[region].astype(np.float64)


def masked_psnr(reference: Array, test: Array, mask: Array, max_value: float = 1.0) -> float:
    """PSNR in dB between two ``[H, W, 3]`` images over the pixels where ``mask ≥ 0.5`` (inf when identical)."""
    ra, rb = _region_pixels(reference, test, mask)
    mse = float(((ra - rb) ** 2).mean())
    return math.inf if mse == 0.0 else 10.0 * math.log10(max_value ** 2 / mse)


def color_drift(reference: Array, test: Array, mask: Array, max_pixels: Optional[int] = None) -> dict[str, float]:
    """CIEDE2000 between two sRGB images inside the product: ``{"mean", "max", "p95"}``.

    Identical pixels count as 0 without being converted. With ``max_pixels`` a larger product is measured on an
    evenly strided sample of that many of its pixels (large exports: the statistics, not every pixel).
    """
    ra, rb = _region_pixels(reference, test, mask)
    if max_pixels is not None and len(ra) > max_pixels:
        step = math.ceil(len(ra) / max_pixels)
        ra, rb = ra[::step], rb[::step]
    delta = np.zeros(len(ra))
    differ = np.any(ra != rb, axis=-1)
    if differ.any():
        delta[differ] = ciede2000(srgb_to_lab(ra[differ]), srgb_to_lab(rb[differ]))
    return {"mean": float(delta.mean()), "max": float(delta.max()), "p95": float(np.percentile(delta, 95))}


def object_expansion(mask_in: Array, mask_out: Array) -> dict[str, float]:
    """``E = area(mask_out ∪ mask_in) − area(mask_in)`` in pixels, and as a ratio of ``area(mask_in)``.

    Args:
        mask_in: ``[H, W]`` product mask of the input (1 = product).
        mask_out: ``[H, W]`` product mask segmented from the output, same size.

    Returns:
        ``{"pixels": E, "ratio": E / area(mask_in)}``.
    """
    inside = _region(mask_in, to_numpy(mask_in).shape, "mask_in")
    outside = check_mask(to_numpy(mask_out), inside.shape, "mask_out") >= 0.5
    pixels = int((inside | outside).sum() - inside.sum())
    return {"pixels": float(pixels), "ratio": pixels / float(inside.sum())}


@dataclass(frozen=True)
class Thresholds:
    """Pass/fail limits of :func:`preservation_report`.

    Attributes:
        min_psnr_db: Least masked PSNR of the generated image (before paste-back) against the product.
        max_delta_e_mean: Largest mean ΔE00 inside the product of the output image.
        max_expansion_ratio: Largest object expansion E / product area.
    """

    min_psnr_db: float = 20.0
    max_delta_e_mean: float = 2.0
    max_expansion_ratio: float = 0.05


def _rounded(value: float) -> Any:
    """JSON-friendly number: 4 decimals; infinity as the string "inf"."""
    return "inf" if math.isinf(value) else round(float(value), 4)


def _check(value: float, limit: float, at_least: bool) -> dict[str, Any]:
    passed = value >= limit if at_least else value <= limit
    return {"value": _rounded(value), "threshold": limit, "rule": ">=" if at_least else "<=", "pass": bool(passed)}


def preservation_report(product_image: Array, product_mask: Array, output_image: Array,
                        generated_image: Optional[Array] = None, output_mask: Optional[Array] = None,
                        thresholds: Thresholds = Thresholds(), max_pixels: Optional[int] = None) -> dict[str, Any]:
    """How well one output preserved the product.

    Args:
        product_image: ``[H, W, 3]`` the placed product (the reference).
        product_mask: ``[H, W]`` its mask, 1 = product.
        output_image: ``[H, W, 3]`` the final image (after paste-back), or any image to compare.
        generated_image: Optional ``[H, W, 3]`` the generator's image *before* paste-back (PSNR, drift).
        output_mask: Optional ``[H, W]`` product mask segmented from the output (object expansion).
        thresholds: Pass/fail limits.
        max_pixels: Measure ΔE2000 on an evenly strided sample of at most this many product pixels (exports);
            recorded as ``metrics["delta_e2000_sampled_pixels"]``. PSNR always uses every pixel.

    Returns:
        A JSON-ready dict: ``metrics`` (``delta_e2000`` of the output; ``psnr_before_paste_back_db`` and
        ``delta_e2000_before_paste_back`` with a generated image; ``expansion`` with an output mask),
        ``checks`` (each ``{"value", "threshold", "rule", "pass"}``; only what was measured), ``pass``
        (all checks passed) and ``thresholds``.
    """
    metrics: dict[str, Any] = {"product_pixels": int(_region(product_mask, to_numpy(product_mask).shape).sum())}
    checks: dict[str, Any] = {}
    drift = color_drift(product_image, output_image, product_mask, max_pixels)
    metrics["delta_e2000"] = {k: _rounded(v) for k, v in drift.items()}
    if max_pixels is not None and metrics["product_pixels"] > max_pixels:
        metrics["delta_e2000_sampled_pixels"] = len(range(0, metrics["product_pixels"],
                                                          math.ceil(metrics["product_pixels"] / max_pixels)))
    checks["delta_e2000_mean"] = _check(drift["mean"], thresholds.max_delta_e_mean, at_least=False)
    if generated_image is not None:
        psnr = masked_psnr(product_image, generated_image, product_mask)
        metrics["psnr_before_paste_back_db"] = _rounded(psnr)
        metrics["delta_e2000_before_paste_back"] = {
            k: _rounded(v) for k, v in color_drift(product_image, generated_image, product_mask, max_pixels).items()}
        checks["psnr_before_paste_back_db"] = _check(psnr, thresholds.min_psnr_db, at_least=True)
    if output_mask is not None:
        expansion = object_expansion(product_mask, output_mask)
        metrics["expansion"] = {"pixels": int(expansion["pixels"]), "ratio": _rounded(expansion["ratio"])}
        checks["expansion_ratio"] = _check(expansion["ratio"], thresholds.max_expansion_ratio, at_least=False)
    return {"pass": all(c["pass"] for c in checks.values()), "metrics": metrics, "checks": checks,
            "thresholds": asdict(thresholds)}
