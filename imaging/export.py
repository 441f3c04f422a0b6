"""Marketplace export: generate small, deliver big.

The background is generated at the backbone's size on a canvas of the export's aspect
(:func:`generation_size`); :func:`assemble_export` then builds the delivered image at the export size:

1. the generated background is resized up to the export size (Lanczos, or an upscale model's output brought
   to the exact size);
2. the **source** product (the native photo, not its small canvas copy) is rendered at the export size from
   the one :class:`~productbg.imaging.layout.Layout` the generation canvas was made from, and pasted with
   :func:`~productbg.imaging.composite.composite_product`: inside the product core the export equals that
   rendering bit for bit (and equals the source pixels when the export scale is 1);
3. the image is encoded (PNG / JPEG / WebP, sRGB profile embedded) and the preservation report is measured on
   the **decoded file**, i.e. on what the marketplace receives (JPEG loss included).
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import cv2
import numpy as np
from PIL import Image

from .composite import composite_product
from .layout import Layout, render_layout
from .metrics import Thresholds, masked_psnr, preservation_report
from .reading import srgb_icc_bytes

EXPORT_PRESETS: dict[str, tuple[int, int]] = {
    "amazon-zoom": (2000, 2000),         # ≥ 1000 px long side enables zoom; 1600–2000 recommended
    "shopify": (2048, 2048),             # Shopify's square maximum
    "taobao": (800, 800),                # Taobao / JD main image
    "instagram-portrait": (1080, 1350),  # 4:5 feed
    "story": (1080, 1920),               # 9:16 stories / reels
}
"""Named export sizes, ``(width, height)`` in pixels."""
FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
DEFAULT_QUALITY = 95
MAX_EXPORT_SIDE = 8192
RESAMPLERS = ("lanczos", "bicubic", "bilinear")
PNG_LEVEL = 3
#: ΔE2000 of an export is measured on an even sample of at most this many product pixels (PSNR on all).
REPORT_MAX_PIXELS = 1 << 18

#: An upscale model as a function: ``[H, W, 3]`` float32 → ``[sH, sW, 3]`` float32 (see pipeline.upscale).
Upscaler = Callable[[np.ndarray], np.ndarray]


def parse_export_size(text: str) -> tuple[int, int]:
    """A preset name (a key of :data:`EXPORT_PRESETS`, e.g. ``amazon-zoom``) or ``WxH``.

    Raises:
        ValueError: neither, or a side outside 64..8192.
    """
    key = text.strip().lower()
    if key in EXPORT_PRESETS:
        return EXPORT_PRESETS[key]
    match = re.fullmatch(r"(\d+)\s*[x×*]\s*(\d+)", key)
    if not match:
        raise ValueError(f"export size {text!r}: give a preset ({', '.join(EXPORT_PRESETS)}) or WIDTHxHEIGHT, "
                         "e.g. 1600x1600")
    w, h = int(match.group(1)), int(match.group(2))
    if not (64 <= w <= MAX_EXPORT_SIDE and 64 <= h <= MAX_EXPORT_SIDE):
        raise ValueError(f"export size {w}x{h}: each side must be 64..{MAX_EXPORT_SIDE} px")
    return w, h


def check_format(fmt: str, quality: int) -> str:
    """The normalised format name (``jpg`` → ``jpeg``); ValueError for an unknown format or a quality outside 1..100."""
    name = fmt.strip().lower().replace("jpg", "jpeg")
    if name not in FORMATS:
        raise ValueError(f"format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"quality {quality}: give 1..100 (JPEG/WebP; 100 = lossless WebP)")
    return name


def generation_size(export: tuple[int, int], long_side: int = 512, multiple: int = 8) -> tuple[int, int]:
    """The generation canvas for an export: the export's aspect with the longer side ``long_side`` (the
    backbone's resolution), both sides rounded to ``multiple`` (the VAE's factor), at least one multiple."""
    w, h = export
    k = long_side / max(w, h)
    return (max(multiple, round(w * k / multiple) * multiple), max(multiple, round(h * k / multiple) * multiple))


def resize_background(image: np.ndarray, size: tuple[int, int], method: str = "lanczos",
                      upscaler: Optional[Upscaler] = None) -> np.ndarray:
    """The generated background at ``size`` (w, h): the upscale model first (when given), then a resample to
    the exact size (area when shrinking, ``method`` when enlarging), clipped to 0..1 (Lanczos rings)."""
    if method not in RESAMPLERS:
        raise ValueError(f"resampler {method!r}: choose one of {', '.join(RESAMPLERS)}")
    x = np.ascontiguousarray(image[..., :3], np.float32)
    if upscaler is not None and (x.shape[1] < size[0] or x.shape[0] < size[1]):
        x = _checked_upscale(upscaler(x))
    if (x.shape[1], x.shape[0]) == tuple(size):
        return np.clip(x, 0.0, 1.0)
    shrinking = size[0] < x.shape[1] and size[1] < x.shape[0]
    flag = cv2.INTER_AREA if shrinking else {"lanczos": cv2.INTER_LANCZOS4, "bicubic": cv2.INTER_CUBIC,
                                             "bilinear": cv2.INTER_LINEAR}[method]
    out = cv2.resize(x, tuple(size), interpolation=flag).reshape(size[1], size[0], 3)
    return np.clip(out, 0.0, 1.0)


def _checked_upscale(out: np.ndarray) -> np.ndarray:
    """An upscaler's output when it is a finite RGB image (NaN would be written as black pixels)."""
    x = np.ascontiguousarray(out, np.float32)
    if x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(f"the upscale model returned an image of shape {tuple(x.shape)}, not RGB; use an RGB "
                         "(3-channel) upscale model")
    if not np.isfinite(x).all():
        raise ValueError("the upscale model returned NaN or infinite values (a broken model, or one that "
                         "overflows); use another upscale model, or none")
    return x


@dataclass
class Export:
    """One delivered image.

    Attributes:
        image: ``[H, W, 3]`` float32 composite at the export size (before encoding).
        placed: ``[H, W, 3]`` the source product rendered at the export size over the fill colour.
        mask: ``[H, W]`` the product mask at the export size (1 = product).
        layout: the export :class:`Layout`. data: the encoded file. format, quality: how it was encoded.
        report: the preservation report measured on the decoded file.
    """

    image: np.ndarray
    placed: np.ndarray
    mask: np.ndarray
    layout: Layout
    data: bytes = b""
    format: str = "png"
    quality: int = DEFAULT_QUALITY
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]

    def describe(self) -> dict[str, Any]:
        """JSON-ready: size, format, quality, colour profile, layout."""
        return {"size": list(self.layout.frame), "format": self.format,
                "quality": None if self.format == "png" else self.quality, "icc": "sRGB (embedded)",
                "layout": self.layout.to_json(), "bytes": len(self.data)}


def assemble_export(background: np.ndarray, product: np.ndarray, product_mask: np.ndarray, layout: Layout,
                    size: Optional[tuple[int, int]] = None, fmt: str = "png", quality: int = DEFAULT_QUALITY,
                    feather: float = 2.0, fill_color: tuple[float, float, float] = (1.0, 1.0, 1.0),
                    method: str = "lanczos", upscaler: Optional[Upscaler] = None,
                    thresholds: Thresholds = Thresholds(), encode: bool = True,
                    output_mask: Optional[np.ndarray] = None) -> Export:
    """Build, encode and measure the delivered image.

    Args:
        background: ``[h, w, 3]`` the generator's image (before paste-back), any size of the same picture.
        product: ``[H0, W0, 3]`` the **source** product image (native resolution, sRGB).
        product_mask: ``[H0, W0]`` its mask (1 = product).
        layout: where the product sits (any frame of the picture; re-expressed at ``size``).
        size: ``(width, height)`` of the export (default: ``layout.frame``).
        fmt, quality: encoding (``png`` | ``jpeg`` | ``webp``; quality 1..100 for the lossy ones).
        feather: outward seam softening in pixels *of the export*.
        fill_color: the canvas colour the product's edge was keyed from (Place Product's fill).
        method, upscaler: how the background is brought to the export size.
        thresholds: pass/fail limits of the report.
        encode: encode and measure the decoded file (False: measure the float image, leave ``data`` empty).
        output_mask: optional product mask segmented from the output (any size; resized) for object expansion.

    Returns:
        The :class:`Export`.
    """
    fmt = check_format(fmt, quality)
    size = tuple(layout.frame) if size is None else (int(size[0]), int(size[1]))
    target = layout if size == tuple(layout.frame) else layout.at(size, keep_aspect=True)
    colour, alpha = render_layout(np.asarray(product, np.float32)[..., :3], np.asarray(product_mask, np.float32),
                                  target)
    if not (alpha >= 0.5).any():
        raise ValueError("the product is outside the export canvas (nothing to paste)")
    placed = (alpha[..., None] * colour + (1.0 - alpha[..., None]) * np.float32(fill_color)).astype(np.float32)
    back = resize_background(background, size, method, upscaler)
    final = np.asarray(composite_product(back, placed, alpha, feather, foreground=colour), np.float32)
    result = Export(final, placed, alpha, target, format=fmt, quality=int(quality))
    delivered = final
    if encode:
        result.data = encode_image(final, fmt, quality)
        delivered = decode_image(result.data)
    result.report = export_report(placed, alpha, delivered, output_mask, thresholds)
    return result


def export_report(placed: np.ndarray, mask: np.ndarray, delivered: np.ndarray, output_mask: Optional[np.ndarray],
                  thresholds: Thresholds) -> dict[str, Any]:
    """The preservation report of a delivered image at the export size.

    The reference is the placed product at the file's 8 bits (the best any 8-bit file can hold), so a PNG
    export's core measures exactly 0 and what remains is the seam and any lossy encoding. ``psnr_db`` is the
    masked PSNR of the delivered image itself (every product pixel); ΔE2000 uses an even sample of at most
    :data:`REPORT_MAX_PIXELS` product pixels.
    """
    reference = to_uint8(placed).astype(np.float32) / 255.0
    if output_mask is not None and output_mask.shape != mask.shape:
        output_mask = cv2.resize(np.asarray(output_mask, np.float32), (mask.shape[1], mask.shape[0]),
                                 interpolation=cv2.INTER_LINEAR)
    report = preservation_report(reference, mask, delivered, output_mask=output_mask, thresholds=thresholds,
                                 max_pixels=REPORT_MAX_PIXELS)
    psnr = masked_psnr(reference, delivered, mask)
    report["metrics"]["psnr_db"] = "inf" if psnr == float("inf") else round(psnr, 4)
    report["metrics"]["size"] = [int(mask.shape[1]), int(mask.shape[0])]
    return report


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float 0..1 → uint8 (rounded; the same rounding as every other writer)."""
    return (np.clip(np.asarray(image, np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def encode_image(image: np.ndarray, fmt: str = "png", quality: int = DEFAULT_QUALITY) -> bytes:
    """An ``[H, W, 3]`` image (float 0..1 or uint8) as PNG / JPEG / WebP bytes with the sRGB profile embedded.

    JPEG at quality ≥ 90 keeps full-resolution chroma (4:4:4: product colours stay sharp); WebP at 100 is
    lossless. PNG ignores ``quality``.
    """
    fmt = check_format(fmt, quality)
    data = image if np.asarray(image).dtype == np.uint8 else to_uint8(image)
    im = Image.fromarray(np.ascontiguousarray(data[..., :3]))
    options: dict[str, Any] = {"icc_profile": srgb_icc_bytes()}
    if fmt == "png":
        options["compress_level"] = PNG_LEVEL
    elif fmt == "jpeg":
        options.update(quality=int(quality), subsampling=0 if quality >= 90 else 2, optimize=False)
    elif int(quality) >= 100:
        options.update(lossless=True, quality=100, method=4)
    else:
        options.update(quality=int(quality), method=4)
    buf = io.BytesIO()
    im.save(buf, format=FORMATS[fmt], **options)
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """Encoded bytes (as :func:`encode_image` writes) → ``[H, W, 3]`` float32 0..1."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), np.float32) / 255.0
