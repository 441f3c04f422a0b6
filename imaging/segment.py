"""Product segmentation that needs no model weights: alpha channel, uniform-background keying, OpenCV GrabCut.

E-commerce packshots are mostly shot on a uniform (white or light) backdrop, often with a soft shadow under the
product. The default therefore keys the background colour estimated from the image border, measuring distances
in CIELAB, and treats *shadows* — darker, low-chroma versions of the background colour that fade smoothly into
it — as background too. Images with transparency use their alpha; anything else falls back to GrabCut.

The shadow model: a shadow multiplies the background's linear light by k < 1. In Lab, scaling XYZ by k scales
``(L + 16, a, b)`` by ``k^(1/3)``, so the shadows of a background colour lie on the segment from
``s_min · v_bg`` to ``v_bg`` in that space (``v = (L + 16, a, b)``, ``s_min = (1 - shadow_strength)^(1/3)``).
A pixel close to that segment is *shadow-like*. Because a grey or black product is also shadow-like, a
shadow-like pixel only counts as background when it is reachable from the image border through smooth
(low-gradient) shadow-like or background pixels: shadows fade softly, products have edges.

Masks are float ``[H, W]`` arrays, 1 = product. Images are ``[H, W, 3|4]`` float 0..1. Every function takes torch
tensors or numpy arrays and returns the kind it was given.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np

from ._arrays import Array, check_image, check_mask, like, to_numpy
from .color import srgb_to_lab

METHODS = ("auto", "alpha", "mask", "background", "background+grabcut", "grabcut")
"""Segmentation methods understood by :func:`segment_product`."""

UNIFORM_BORDER_FRACTION = 0.7
"""A background counts as uniform when at least this fraction of the border looks like it (or its shadow)."""

DEFAULT_TOLERANCE = 10.0
DEFAULT_SHADOW_STRENGTH = 0.75
DEFAULT_SHADOW_MAX_GRADIENT = 6.0


# ------------------------------------------------------------------------------------------------- background
@dataclass(frozen=True)
class BackgroundEstimate:
    """The backdrop colour of a packshot, estimated from the image border.

    Attributes:
        rgb: The background colour, sRGB 0..1.
        lab: The same colour in CIELAB.
        uniformity: Fraction of border pixels that match the background or its shadow (0..1).
    """

    rgb: tuple[float, float, float]
    lab: tuple[float, float, float]
    uniformity: float

    @property
    def is_uniform(self) -> bool:
        """Whether the border is uniform enough for colour keying (see ``UNIFORM_BORDER_FRACTION``)."""
        return self.uniformity >= UNIFORM_BORDER_FRACTION


def border_width(height: int, width: int) -> int:
    """Width in pixels of the border strip used to estimate the background: 2% of the shorter side, ≥ 1."""
    return max(1, round(0.02 * min(height, width)))


def border_pixels(image: np.ndarray, width: int) -> np.ndarray:
    """The pixels of the ``width``-pixel frame around ``image`` as an ``[N, C]`` array."""
    h, w = image.shape[:2]
    frame = np.zeros((h, w), dtype=bool)
    frame[:width], frame[-width:], frame[:, :width], frame[:, -width:] = True, True, True, True
    return image[frame]


def shadow_distance(lab: np.ndarray, background_lab: tuple[float, float, float] | np.ndarray,
                    shadow_strength: float) -> np.ndarray:
    """Distance in Lab units from each colour to the background colour *or any of its shadows*.

    Args:
        lab: ``[..., 3]`` CIELAB colours.
        background_lab: The background colour in CIELAB.
        shadow_strength: How much linear light the darkest shadow removes (0 = no shadows: the plain ΔE76
            distance to the background colour; 0.75 = shadows may keep as little as 25% of the light).

    Returns:
        ``[...]`` distances (ΔE76 scale) to the segment of shadow colours.
    """
    if not 0.0 <= shadow_strength < 1.0:
        raise ValueError(f"shadow_strength must be in [0, 1), got {shadow_strength}")
    v = np.asarray(lab, dtype=np.float32) + np.float32([16.0, 0.0, 0.0])
    v_bg = np.asarray(background_lab, dtype=np.float32) + np.float32([16.0, 0.0, 0.0])
    s_min = (1.0 - shadow_strength) ** (1.0 / 3.0)
    s = np.clip((v @ v_bg) / max(float(v_bg @ v_bg), 1e-6), s_min, 1.0)
    return np.linalg.norm(v - s[..., None] * v_bg, axis=-1)


def estimate_background(image: Array, tolerance: float = DEFAULT_TOLERANCE,
                        shadow_strength: float = DEFAULT_SHADOW_STRENGTH) -> BackgroundEstimate:
    """Estimate a packshot's backdrop colour as the median Lab colour of the image border.

    Args:
        image: ``[H, W, 3|4]`` sRGB image, 0..1 (alpha is ignored).
        tolerance: Lab distance under which a border pixel counts as background (for ``uniformity``).
        shadow_strength: See :func:`shadow_distance`; border pixels in shadow still count as background.

    Returns:
        The estimate, with the fraction of border pixels that match it.
    """
    rgb = check_image(to_numpy(image))[..., :3]
    ring = border_pixels(rgb, border_width(*rgb.shape[:2]))
    ring_lab = srgb_to_lab(ring)
    lab = np.median(ring_lab, axis=0)
    uniformity = float((shadow_distance(ring_lab, lab, shadow_strength) < tolerance).mean())
    rgb_bg = np.median(ring, axis=0)
    return BackgroundEstimate(tuple(float(c) for c in rgb_bg), tuple(float(c) for c in lab), uniformity)


def lightness_gradient(lab: np.ndarray) -> np.ndarray:
    """Magnitude of the L* gradient in L units per pixel (3×3 Sobel)."""
    lightness = np.ascontiguousarray(lab[..., 0], dtype=np.float32)
    gx = cv2.Sobel(lightness, cv2.CV_32F, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE) / 8.0
    gy = cv2.Sobel(lightness, cv2.CV_32F, 0, 1, ksize=3, borderType=cv2.BORDER_REPLICATE) / 8.0
    return np.sqrt(gx * gx + gy * gy)


def _touching_border(region: np.ndarray) -> np.ndarray:
    """The 8-connected parts of the boolean ``region`` that touch the image border."""
    n, labels = cv2.connectedComponents(region.astype(np.uint8), connectivity=8)
    edge_labels = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    edge_labels = edge_labels[edge_labels > 0]
    return np.isin(labels, edge_labels)


def key_background(image: Array, background: Optional[BackgroundEstimate] = None,
                   tolerance: float = DEFAULT_TOLERANCE, shadow_strength: float = DEFAULT_SHADOW_STRENGTH,
                   shadow_max_gradient: float = DEFAULT_SHADOW_MAX_GRADIENT) -> Array:
    """Soft product mask of a uniform-background packshot; the background's shadows count as background.

    A pixel is background when its Lab distance to the background colour is under ``tolerance``. It is
    shadow when its distance to the background's shadow segment (:func:`shadow_distance`) is under
    ``tolerance`` *and* it connects to the image border through smooth pixels (L* gradient at most
    ``shadow_max_gradient`` per pixel), plus one pixel of rim along strong edges. Everything else is product.

    Args:
        image: ``[H, W, 3|4]`` sRGB image, 0..1.
        background: The backdrop; estimated from the border when None.
        tolerance: Lab (ΔE76) distance separating background from product; the soft edge spans
            0.5·tolerance..1.5·tolerance, so thresholding the result at 0.5 cuts at ``tolerance``.
        shadow_strength: See :func:`shadow_distance`; 0 counts shadows as product.
        shadow_max_gradient: Steepest L* change per pixel a shadow may have.

    Returns:
        ``[H, W]`` float mask in 0..1, 1 = product.
    """
    rgb = check_image(to_numpy(image))[..., :3]
    background = background or estimate_background(rgb, tolerance, shadow_strength)
    lab = srgb_to_lab(rgb)
    distance_to_background = np.linalg.norm(lab - np.float32(background.lab), axis=-1)
    distance_to_shadows = shadow_distance(lab, background.lab, shadow_strength)
    plain_background = distance_to_background < tolerance
    shadow_like = distance_to_shadows < tolerance
    smooth = lightness_gradient(lab) <= shadow_max_gradient
    backdrop = _touching_border(plain_background | (shadow_like & smooth)) | plain_background
    backdrop |= _shadow_rim(lab[..., 0], backdrop, shadow_like, 2.0 * shadow_max_gradient)
    distance = np.where(backdrop, distance_to_shadows, distance_to_background)
    distance = cv2.medianBlur(np.ascontiguousarray(distance, np.float32), 3)   # isolated noisy pixels
    return like(np.clip((distance - 0.5 * tolerance) / tolerance, 0.0, 1.0).astype(np.float32), image)


def _shadow_rim(lightness: np.ndarray, backdrop: np.ndarray, shadow_like: np.ndarray,
                max_step: float) -> np.ndarray:
    """Shadow-like pixels next to the backdrop whose lightness continues it (within ``max_step``).

    The Sobel gradient of a product's edge also marks the shadow pixel beside it as not smooth; this gives that
    pixel back to the shadow, while the edge pixels of a grey product (a real step in lightness) stay product.
    """
    kernel = np.ones((3, 3), np.float32)
    weight = cv2.filter2D(backdrop.astype(np.float32), -1, kernel, borderType=cv2.BORDER_CONSTANT)
    total = cv2.filter2D(np.where(backdrop, lightness, 0).astype(np.float32), -1, kernel,
                         borderType=cv2.BORDER_CONSTANT)
    neighbour_lightness = total / np.maximum(weight, 1e-6)
    return shadow_like & ~backdrop & (weight > 0) & (np.abs(lightness - neighbour_lightness) <= max_step)


# ------------------------------------------------------------------------------------------------- alpha
def alpha_of(image: Array, transparency: Optional[Array] = None) -> Optional[Array]:
    """The product alpha of an image with transparency, or None when it has none worth using.

    Args:
        image: ``[H, W, 3|4]``; a fourth channel is alpha.
        transparency: Optional ``[H, W]`` mask where 1 = transparent (ComfyUI LoadImage's MASK output); used
            when the image itself has no alpha channel.

    Returns:
        ``[H, W]`` alpha (1 = opaque product) when it has both transparent (< 0.5) and opaque (> 0.5) pixels,
        else None.
    """
    img = check_image(to_numpy(image))
    if img.shape[2] == 4:
        alpha = img[..., 3]
    elif transparency is not None:
        alpha = 1.0 - check_mask(to_numpy(transparency), img.shape[:2], "transparency")
    else:
        return None
    if not (alpha.min() < 0.5 < alpha.max()):
        return None
    return like(np.clip(alpha, 0.0, 1.0).astype(np.float32), image)


# ------------------------------------------------------------------------------------------------- grabcut
def grabcut(image: Array, init_mask: Optional[Array] = None, iterations: int = 5,
            max_side: int = 512) -> Array:
    """OpenCV GrabCut, initialised from a mask (trimap around its edge) or from a centred rectangle.

    With ``init_mask``, pixels deep inside it are sure product, pixels far outside sure background, and a band of
    3% of the shorter side around its edge is left for GrabCut to decide. Without it, everything outside a
    rectangle inset by 4% is sure background. Large images are processed at ``max_side`` pixels and the result
    is scaled back (soft at the edge).

    Args:
        image: ``[H, W, 3|4]`` sRGB image, 0..1.
        init_mask: Optional ``[H, W]`` initial mask, 1 = product.
        iterations: GrabCut iterations.
        max_side: Longest side GrabCut runs at.

    Returns:
        ``[H, W]`` float mask in 0..1. When GrabCut cannot run (no background or no product seed), the
        thresholded ``init_mask`` (or the rectangle) is returned unchanged.
    """
    rgb = check_image(to_numpy(image))[..., :3]
    h, w = rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    size = (max(2, round(w * scale)), max(2, round(h * scale)))
    small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA) if scale < 1 else rgb
    bgr = np.ascontiguousarray((np.clip(small[..., ::-1], 0, 1) * 255 + 0.5).astype(np.uint8))
    seed = None
    if init_mask is not None:
        seed = check_mask(to_numpy(init_mask), (h, w), "init_mask")
        seed = cv2.resize(seed, size, interpolation=cv2.INTER_AREA) if scale < 1 else seed
    labels = _grabcut_seed(small.shape[:2], seed)
    seeded_product = np.isin(labels, (cv2.GC_FGD, cv2.GC_PR_FGD))
    if seeded_product.any() and not seeded_product.all():
        try:
            cv2.grabCut(bgr, labels, None, np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64),
                        int(iterations), cv2.GC_INIT_WITH_MASK)
        except cv2.error:
            pass                                   # degenerate colour models: keep the seed
    result = np.isin(labels, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.float32)
    if scale < 1:
        result = np.clip(cv2.resize(result, (w, h), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
    return like(result, image)


def _grabcut_seed(hw: tuple[int, int], init_mask: Optional[np.ndarray]) -> np.ndarray:
    """GrabCut's label image: from a trimap around ``init_mask``'s edge, or a rectangle inset by 4%."""
    h, w = hw
    labels = np.full((h, w), cv2.GC_BGD, np.uint8)
    if init_mask is None:
        inset_y, inset_x = max(1, round(0.04 * h)), max(1, round(0.04 * w))
        labels[inset_y:h - inset_y, inset_x:w - inset_x] = cv2.GC_PR_FGD
        return labels
    product = init_mask >= 0.5
    band = max(2, round(0.03 * min(h, w)))
    labels[grow_mask(product, band) >= 0.5] = cv2.GC_PR_BGD
    labels[product] = cv2.GC_PR_FGD
    labels[grow_mask(product, -band) >= 0.5] = cv2.GC_FGD
    return labels


# ------------------------------------------------------------------------------------------------- refinement
def threshold_mask(mask: Array, threshold: float = 0.5) -> Array:
    """Binary float mask: 1 where ``mask >= threshold``."""
    m = to_numpy(mask)
    return like((m >= threshold).astype(np.float32), mask)


def grow_mask(mask: Array, pixels: float) -> Array:
    """Grow (``pixels`` > 0) or shrink (< 0) the binary mask ``mask >= 0.5`` by a Euclidean distance.

    Args:
        mask: ``[H, W]`` mask (bool or float; 1 = product).
        pixels: Distance in pixels; circular structuring element, 0 only binarises.

    Returns:
        ``[H, W]`` binary float mask.
    """
    binary = to_numpy(mask) >= 0.5
    if pixels and binary.any() and not binary.all():
        if pixels > 0:
            distance_to_product = cv2.distanceTransform((~binary).astype(np.uint8), cv2.DIST_L2,
                                                        cv2.DIST_MASK_PRECISE)
            binary = distance_to_product <= pixels
        else:
            distance_to_background = cv2.distanceTransform(binary.astype(np.uint8), cv2.DIST_L2,
                                                           cv2.DIST_MASK_PRECISE)
            binary = distance_to_background > -pixels
    return like(binary.astype(np.float32), mask)


def fill_holes(mask: Array) -> Array:
    """Fill the holes of the binary mask ``mask >= 0.5``: background regions that do not reach the border."""
    binary = to_numpy(mask) >= 0.5
    outside = np.pad(~binary, 1, constant_values=True).astype(np.uint8)
    flood = np.zeros((outside.shape[0] + 2, outside.shape[1] + 2), np.uint8)
    cv2.floodFill(outside, flood, (0, 0), 2, flags=4)
    reachable = outside[1:-1, 1:-1] == 2
    return like((~reachable).astype(np.float32), mask)


def keep_largest_component(mask: Array) -> Array:
    """Keep only the largest 8-connected part of the binary mask ``mask >= 0.5``."""
    binary = (to_numpy(mask) >= 0.5).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if n <= 2:
        return like(binary.astype(np.float32), mask)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return like((labels == largest).astype(np.float32), mask)


def feather_mask(mask: Array, pixels: float) -> Array:
    """Soften a mask's edge with a Gaussian blur of sigma ``pixels / 2`` (0 leaves it unchanged)."""
    m = to_numpy(mask)
    if pixels <= 0:
        return like(m.astype(np.float32), mask)
    blurred = cv2.GaussianBlur(np.ascontiguousarray(m, np.float32), (0, 0), sigmaX=pixels / 2.0,
                               borderType=cv2.BORDER_REPLICATE)
    return like(np.clip(blurred, 0.0, 1.0), mask)


def refine_mask(mask: Array, threshold: float = 0.5, grow: float = 0.0, fill: bool = True,
                keep_largest: bool = False, feather: float = 1.0) -> Array:
    """Threshold → grow/shrink → fill holes → keep the largest part → feather, in that order.

    Args:
        mask: ``[H, W]`` soft mask, 1 = product.
        threshold: Binarisation threshold.
        grow: Pixels to grow (> 0) or shrink (< 0) the product.
        fill: Fill holes inside the product (turn off for see-through parts such as a mug's handle).
        keep_largest: Keep only the largest connected part (removes specks; drops the second shoe of a pair).
        feather: Width of the soft edge in pixels (Gaussian sigma = feather / 2).

    Returns:
        ``[H, W]`` float mask in 0..1.
    """
    m = threshold_mask(to_numpy(mask), threshold)
    if grow:
        m = grow_mask(m, grow)
    if fill:
        m = fill_holes(m)
    if keep_largest:
        m = keep_largest_component(m)
    return like(feather_mask(m, feather), mask)


# ------------------------------------------------------------------------------------------------- edge colours
def estimate_local_color(image: Array, weights: Array, sigma: float) -> Array:
    """Gaussian-weighted average colour of the pixels with weight > 0 around each pixel (normalised convolution).

    Where no weighted pixel is near, the global weighted mean is used (the image itself if all weights are 0).
    """
    img = to_numpy(image)
    w = np.ascontiguousarray(to_numpy(weights), np.float32)
    if not (w > 0).any():
        return like(img.copy(), image)
    numerator = cv2.GaussianBlur(np.ascontiguousarray(img * w[..., None]), (0, 0), sigma,
                                 borderType=cv2.BORDER_REFLECT)
    denominator = cv2.GaussianBlur(w, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)[..., None]
    global_mean = (img * w[..., None]).sum(axis=(0, 1)) / w.sum()
    local = np.where(denominator > 1e-4, numerator / np.maximum(denominator, 1e-12), global_mean)
    return like(local.astype(np.float32), image)


def decontaminate_foreground(image: Array, alpha: Array, background: Array, min_alpha: float = 0.1,
                             fallback: Optional[Array] = None) -> Array:
    """Solve the compositing equation ``I = αF + (1 - α)B`` for the foreground colour F.

    Args:
        image: ``[H, W, 3]`` observed colours I.
        alpha: ``[H, W]`` alpha α.
        background: Background colour B: ``[3]`` or ``[H, W, 3]``.
        min_alpha: Below this alpha F is ill-conditioned and ``fallback`` is used instead.
        fallback: ``[H, W, 3]`` colours for α < ``min_alpha`` (default: the observed colours).

    Returns:
        ``[H, W, 3]`` foreground colours, clipped to 0..1.
    """
    i, a, b = to_numpy(image), to_numpy(alpha)[..., None], to_numpy(background)
    f = (i - (1.0 - a) * b) / np.maximum(a, min_alpha)
    f = np.where(a >= min_alpha, f, i if fallback is None else to_numpy(fallback))
    return like(np.clip(f, 0.0, 1.0).astype(np.float32), image)


def clean_edge_colors(image: Array, mask: Array, background_rgb: Optional[tuple[float, float, float]] = None,
                      sigma: float = 2.0, min_alpha: float = 0.1) -> Array:
    """Remove background colour bleeding (halos) from the soft edge of a mask.

    For each edge pixel (0 < mask < 1) the local product colour F₀ (from nearby pixels with mask ≈ 1) and the
    background colour B (``background_rgb``, or the local colour of pixels with mask ≈ 0) give a colour-based
    alpha: the projection of I − B on F₀ − B. The compositing equation then yields the pixel's pure foreground
    colour (:func:`decontaminate_foreground`). Pixels with mask 0 or 1 are returned unchanged.

    Args:
        image: ``[H, W, 3|4]`` image, 0..1 (alpha is dropped).
        mask: ``[H, W]`` soft product mask.
        background_rgb: The uniform backdrop colour when known.
        sigma: Radius (Gaussian sigma, pixels) of the local colour estimates.
        min_alpha: Pixels with less colour alpha take the local product colour F₀.

    Returns:
        ``[H, W, 3]`` image whose edge colours are pure product colours.
    """
    rgb = check_image(to_numpy(image))[..., :3]
    m = check_mask(to_numpy(mask), rgb.shape[:2])
    edge = (m > 0.0) & (m < 1.0)
    if not edge.any():
        return like(rgb.copy(), image)
    inside = grow_mask(m >= 0.999, -1.5)           # skip the outermost opaque pixels: often mixed colours
    if not inside.any():
        inside = (m >= 0.999).astype(np.float32)
    product_color = estimate_local_color(rgb, inside, sigma)
    if background_rgb is None:
        outside = grow_mask(m > 0.001, 1.5) < 0.5
        background = estimate_local_color(rgb, outside.astype(np.float32), sigma)
    else:
        background = np.broadcast_to(np.float32(background_rgb), rgb.shape)
    direction = product_color - background
    length2 = (direction * direction).sum(-1)
    color_alpha = np.where(length2 > 1e-4, ((rgb - background) * direction).sum(-1) / np.maximum(length2, 1e-4), m)
    foreground = decontaminate_foreground(rgb, np.clip(color_alpha, 0.0, 1.0), background, min_alpha,
                                          fallback=product_color)
    return like(np.where(edge[..., None], foreground, rgb).astype(np.float32), image)


# ------------------------------------------------------------------------------------------------- all together
@dataclass
class Segmentation:
    """Result of :func:`segment_product`.

    Attributes:
        image: ``[H, W, 3]`` image with cleaned edge colours (same kind as the input).
        mask: ``[H, W]`` product mask, 1 = product.
        method: The method actually used (``auto`` resolved).
        background: The backdrop estimate when one was made.
    """

    image: Array
    mask: Array
    method: str
    background: Optional[BackgroundEstimate] = None


def choose_method(image: Array, transparency: Optional[Array] = None, mask: Optional[Array] = None,
                  tolerance: float = DEFAULT_TOLERANCE,
                  shadow_strength: float = DEFAULT_SHADOW_STRENGTH) -> tuple[str, Optional[BackgroundEstimate]]:
    """Resolve ``auto``: an external mask, else alpha, else background keying when the border is uniform,
    else GrabCut. Returns the method and the background estimate (when one was made)."""
    if mask is not None:
        return "mask", None
    if alpha_of(image, transparency) is not None:
        return "alpha", None
    background = estimate_background(image, tolerance, shadow_strength)
    return ("background" if background.is_uniform else "grabcut"), background


def segment_product(image: Array, method: str = "auto", *, transparency: Optional[Array] = None,
                    mask: Optional[Array] = None, tolerance: float = DEFAULT_TOLERANCE,
                    shadow_strength: float = DEFAULT_SHADOW_STRENGTH, threshold: float = 0.5, grow: float = 0.0,
                    fill: bool = True, keep_largest: bool = False, feather: float = 1.0,
                    clean_edges: bool = True, grabcut_iterations: int = 5) -> Segmentation:
    """Segment the product of one image without model weights.

    Args:
        image: ``[H, W, 3|4]`` sRGB image, 0..1.
        method: One of ``METHODS``: ``auto`` (external mask, else alpha, else ``background`` when the border is
            uniform, else ``grabcut``), ``alpha``, ``mask`` (refine ``mask``), ``background`` (colour key with
            shadow removal), ``background+grabcut`` (key, then GrabCut around its edge), ``grabcut``.
        transparency: Optional ``[H, W]`` mask, 1 = transparent (LoadImage's MASK), for images without alpha.
        mask: Optional external ``[H, W]`` product mask (1 = product), for ``mask``/``auto``.
        tolerance: Lab distance separating background from product (keying).
        shadow_strength: How much light a shadow may remove and still count as background (0..1).
        threshold, grow, fill, keep_largest, feather: See :func:`refine_mask`.
        clean_edges: Decontaminate edge colours (not done for ``alpha``: cut-outs carry their own colours).
        grabcut_iterations: GrabCut iterations.

    Returns:
        The :class:`Segmentation`.

    Raises:
        ValueError: Unknown method, ``alpha`` without transparency, ``mask`` without a mask.
    """
    if method not in METHODS:
        raise ValueError(f"unknown segmentation method {method!r}; choose one of {', '.join(METHODS)}")
    img = check_image(to_numpy(image))
    background = None
    if method == "auto":
        method, background = choose_method(img, transparency, mask, tolerance, shadow_strength)
    if method == "alpha":
        raw = alpha_of(img, transparency)
        if raw is None:
            raise ValueError("the image has no usable transparency (no alpha channel, or it is all opaque)")
    elif method == "mask":
        if mask is None:
            raise ValueError("method 'mask' needs an external product mask (1 = product)")
        raw = check_mask(to_numpy(mask), img.shape[:2])
    elif method == "grabcut":
        raw = grabcut(img, None, grabcut_iterations)
    else:
        background = background or estimate_background(img, tolerance, shadow_strength)
        raw = key_background(img, background, tolerance, shadow_strength)
        if method == "background+grabcut":
            raw = grabcut(img, raw, grabcut_iterations)
    refined = refine_mask(raw, threshold, grow, fill, keep_largest, feather)
    rgb = img[..., :3]
    if clean_edges and method != "alpha":
        uniform = background.rgb if background is not None and method.startswith("background") else None
        rgb = clean_edge_colors(rgb, refined, uniform, sigma=max(1.5, feather))
    return Segmentation(like(np.ascontiguousarray(rgb), image), like(refined, image), method, background)
