"""Reading an input photo the way a viewer shows it: orientation applied, colours in sRGB, full bit depth.

Every input path (CLI, batch, dataset build, the folder node) reads through :func:`read_image_file`, in this
order, before anything else looks at the pixels:

1. the pixel limit is checked on the header (nothing huge is decoded);
2. **EXIF orientation** (all 8 values) is applied, so a phone photo stands upright;
3. an **embedded ICC profile** that is not sRGB (Display P3, Adobe RGB, a CMYK press profile …) is converted
   to sRGB with Pillow's ImageCms (LittleCMS), relative colorimetric with black-point compensation: colours
   inside sRGB keep their appearance, the rest are clipped to its gamut. What was done is returned as
   ``info`` (``result.json`` records it);
4. **16-bit** PNG / TIFF are read at 16 bits (OpenCV; Pillow would keep only the high byte of RGB ones);
   **CMYK** JPEGs are converted through their profile, or with the plain formula (and a warning) without one.

Modes that have no sensible sRGB reading (LAB, HSV, 32-bit float) are refused with a message saying so.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Union

import cv2
import numpy as np
from PIL import Image, ImageCms

#: Input images above this many megapixels are refused before decoding (a 6000×6000 photo is 36 MP; a
#: decompression bomb declares far more). Raise it with PRODUCTBG_MAX_MEGAPIXELS or the CLI's --max-megapixels.
DEFAULT_MAX_MEGAPIXELS = 50.0
MAX_MEGAPIXELS_ENV = "PRODUCTBG_MAX_MEGAPIXELS"
ORIENTATION_TAG = 0x0112
INTENT = "relative colorimetric + black-point compensation"
_PLAIN_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "La", "YCbCr", "CMYK", "I;16", "I;16B",
                "I;16L", "I"}


class ProductFolderError(ValueError):
    """A product folder, its CSV or one of its images cannot be read; the message says what to fix. Its own class
    because batches and evaluation catch it to fail one row and go on, and the CLI's checks name the option."""


def max_megapixels() -> float:
    """The input pixel limit in megapixels: ``PRODUCTBG_MAX_MEGAPIXELS`` when set (and valid), else the default."""
    try:
        value = float(os.environ.get(MAX_MEGAPIXELS_ENV, DEFAULT_MAX_MEGAPIXELS))
    except ValueError:
        return DEFAULT_MAX_MEGAPIXELS
    return value if value > 0 and value == value and value != float("inf") else DEFAULT_MAX_MEGAPIXELS


def _check_pixels(path: Union[str, Path], size: tuple[int, int]) -> None:
    limit = max_megapixels()
    mp = size[0] * size[1] / 1e6
    if mp > limit:
        need = int(mp) + 1
        raise ProductFolderError(f"{path} is {size[0]}×{size[1]} ({mp:.1f} MP), above the {limit:g} MP input "
                                 f"limit (a very large photo, or a decompression bomb); not decoding it: downscale "
                                 f"it, or raise the limit (--max-megapixels {need} or {MAX_MEGAPIXELS_ENV}={need})")


def _open(path: Union[str, Path]) -> Image.Image:
    """``Image.open`` (which reads only the header) with the pixel limit checked before anything is decoded;
    PIL's own bomb check is replaced by this limit, so a bomb and an oversized photo get the same message."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        im = Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    try:
        _check_pixels(path, im.size)
    except ProductFolderError:
        im.close()
        raise
    return im


def _why(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text.replace("cannot identify image file", "not an image file")


@dataclass
class LoadedImage:
    """An input image in sRGB.

    Attributes:
        rgb: ``[H, W, 3]`` float32 sRGB 0..1 (upright). alpha: ``[H, W]`` float32 or None.
        info: what reading did: ``size`` (as stored), ``mode``, ``bits``, ``orientation`` (EXIF value, 1 =
            none), ``icc`` (``{"profile", "converted", "to", "intent"}``; None without a profile) and
            ``warnings``.
    """

    rgb: np.ndarray
    alpha: Optional[np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)


@lru_cache(maxsize=1)
def srgb_profile() -> ImageCms.ImageCmsProfile:
    """LittleCMS's built-in sRGB profile (what inputs are converted to and outputs embed)."""
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


#: ICC header bytes 24..35 hold the creation date; fixed, so every process embeds the same bytes (the same
#: input gives byte-identical files). LittleCMS leaves the profile ID (bytes 84..99) zero, so nothing to update.
_FIXED_DATE = bytes.fromhex("07e800010001000000000000")


@lru_cache(maxsize=1)
def srgb_icc_bytes() -> bytes:
    """The sRGB ICC profile as bytes (LittleCMS's built-in sRGB, creation date fixed), embedded in every
    exported image."""
    data = bytearray(srgb_profile().tobytes())
    data[24:36] = _FIXED_DATE
    return bytes(data)


def is_srgb(description: str) -> bool:
    """Whether a profile's description names sRGB (those are read as they are: no conversion, no rounding)."""
    return "srgb" in description.lower().replace(" ", "")


def read_image_file(path: Union[str, Path]) -> LoadedImage:
    """Read an image file as upright sRGB floats; see the module docstring for what is applied.

    Raises:
        ProductFolderError: unreadable, truncated, not an image, above the pixel limit, or a mode with no
            sRGB reading.
    """
    if Path(path).is_dir():
        raise ProductFolderError(f"cannot read image {path}: it is a folder")
    try:
        with _open(path) as im:
            return _read(path, im)
    except ProductFolderError:
        raise
    except MemoryError:
        raise ProductFolderError(f"cannot read image {path}: out of memory decoding it") from None
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, struct.error ... for broken files
        raise ProductFolderError(f"cannot read image {path}: {_why(e)}") from None


def _read(path: Union[str, Path], im: Image.Image) -> LoadedImage:
    if im.mode not in _PLAIN_MODES:
        raise ProductFolderError(f"cannot read image {path}: its colour mode {im.mode} has no sRGB reading here; "
                                 "save it as 8- or 16-bit RGB (or CMYK with its profile)")
    bits = _bits(im)                                              # before getexif(), which may decode
    orientation = _orientation(im)
    icc = im.info.get("icc_profile") or None
    info: dict[str, Any] = {"size": list(im.size), "mode": im.mode, "bits": bits, "orientation": orientation,
                            "icc": None, "warnings": []}
    profile = _profile(icc, info) if icc else None
    if info["bits"] == 16 and profile is None:
        wide = _read_16bit(path)
        if wide is not None:
            rgb, alpha = wide
            return LoadedImage(*_orient_arrays(rgb, alpha, orientation), info)
        info["warnings"].append("16-bit image read at 8 bits (OpenCV could not decode it)")
    elif info["bits"] == 16:
        info["warnings"].append("16-bit image read at 8 bits for its colour-profile conversion")
    im.load()
    if orientation != 1:
        im = _transpose(im, orientation)
    rgba = _to_srgb(im, profile, info)
    if rgba.shape[-1] == 4:
        return LoadedImage(rgba[..., :3].copy(), rgba[..., 3].copy(), info)
    return LoadedImage(rgba, None, info)


def _orientation(im: Image.Image) -> int:
    try:
        value = int(im.getexif().get(ORIENTATION_TAG, 1))
    except Exception:  # a broken EXIF block must not make the photo unreadable
        return 1
    return value if 1 <= value <= 8 else 1


def _bits(im: Image.Image) -> int:
    if im.mode.startswith("I;16") or im.mode == "I":
        return 16
    try:
        args = im.tile[0].args if hasattr(im.tile[0], "args") else im.tile[0][3]
        rawmode = args if isinstance(args, str) else args[0]
    except Exception:
        return 8
    return 16 if isinstance(rawmode, str) and ";16" in rawmode else 8


def _profile(icc: bytes, info: dict[str, Any]) -> Optional[ImageCms.ImageCmsProfile]:
    """The embedded profile when it needs a conversion (None for sRGB); unreadable ones are noted and ignored."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        name = (ImageCms.getProfileDescription(profile) or "").strip() or "unnamed profile"
    except Exception:
        info["warnings"].append("unreadable ICC profile ignored; colours read as sRGB")
        return None
    converted = not is_srgb(name)
    info["icc"] = {"profile": name, "converted": converted, "to": "sRGB" if converted else None,
                   "intent": INTENT if converted else None}
    return profile if converted else None


_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def _transpose(im: Image.Image, orientation: int) -> Image.Image:
    out = im.transpose(_TRANSPOSE[orientation])
    out.info = dict(im.info)
    return out


def _orient_arrays(rgb: np.ndarray, alpha: Optional[np.ndarray],
                   orientation: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """EXIF orientation on ``[H, W, ...]`` arrays (the same 8 cases as Pillow's ``exif_transpose``)."""
    def turn(a: np.ndarray) -> np.ndarray:
        ops = {1: lambda x: x, 2: lambda x: x[:, ::-1], 3: lambda x: x[::-1, ::-1], 4: lambda x: x[::-1],
               5: lambda x: x.swapaxes(0, 1), 6: lambda x: np.rot90(x, -1), 7: lambda x: x.swapaxes(0, 1)[::-1, ::-1],
               8: lambda x: np.rot90(x, 1)}
        return np.ascontiguousarray(ops[orientation](a))

    return turn(rgb), None if alpha is None else turn(alpha)


def _read_16bit(path: Union[str, Path]) -> Optional[tuple[np.ndarray, Optional[np.ndarray]]]:
    """A 16-bit PNG / TIFF at full depth as float32 (rgb, alpha), not yet oriented; None if OpenCV cannot."""
    data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if data is None or data.dtype != np.uint16:
        return None
    x = data.astype(np.float32) / 65535.0
    if x.ndim == 2:
        return np.repeat(x[..., None], 3, axis=-1), None
    if x.shape[-1] == 2:                                          # grey + alpha
        return np.repeat(x[..., :1], 3, axis=-1), x[..., 1].copy()
    rgb = np.ascontiguousarray(x[..., 2::-1])                     # BGR(A) → RGB
    return rgb, (x[..., 3].copy() if x.shape[-1] == 4 else None)


def _to_srgb(im: Image.Image, profile: Optional[ImageCms.ImageCmsProfile], info: dict[str, Any]) -> np.ndarray:
    """``[H, W, 3|4]`` float32 sRGB (alpha appended when the image has one) from a loaded, upright image."""
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info)
    if im.mode.startswith("I"):
        grey = (np.asarray(im, np.float32) / 65535.0 if im.mode != "I" or np.asarray(im).max() > 255
                else np.asarray(im, np.float32) / 255.0).clip(0.0, 1.0)
        return np.repeat(grey[..., None], 3, axis=-1).astype(np.float32)
    alpha = np.asarray(im.convert("RGBA"), np.float32)[..., 3] / 255.0 if has_alpha else None
    if profile is not None:
        rgb = _convert_profile(im, profile, info)
    else:
        if im.mode == "CMYK":
            info["warnings"].append("CMYK image without a colour profile: converted with the plain formula, "
                                    "colours are approximate (embed the press profile for exact colours)")
        rgb = im.convert("RGB")
    out = np.asarray(rgb, np.float32) / 255.0
    return np.concatenate([out, alpha[..., None]], -1) if alpha is not None else out


def _convert_profile(im: Image.Image, profile: ImageCms.ImageCmsProfile, info: dict[str, Any]) -> Image.Image:
    """Pixels from the embedded profile to sRGB (alpha left out: it has no colour)."""
    space = profile.profile.xcolor_space.strip()
    source_mode = {"RGB": "RGB", "CMYK": "CMYK", "GRAY": "L"}.get(space)
    base = im if im.mode in ("RGB", "CMYK", "L") else im.convert("L" if im.mode in ("LA", "La") else "RGB")
    if source_mode != base.mode:
        info["icc"]["converted"], info["icc"]["to"], info["icc"]["intent"] = False, None, None
        info["warnings"].append(f"ICC profile for {space or 'an unknown space'} does not fit this {im.mode} image; "
                                "ignored, colours read as sRGB")
        return base.convert("RGB")
    transform = ImageCms.buildTransform(profile, srgb_profile(), source_mode, "RGB",
                                        renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
                                        flags=ImageCms.Flags.BLACKPOINTCOMPENSATION)
    return ImageCms.applyTransform(base, transform)
