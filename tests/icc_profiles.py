"""Matrix/TRC ICC v2 profiles for tests (Display P3, Adobe RGB), built from their primaries.

Pillow's ImageCms can create only sRGB/LAB/XYZ profiles, so the wide-gamut ones are written here byte by byte
(header, tag table, desc/wtpt/cprt/rXYZ/gXYZ/bXYZ/rTRC/gTRC/bTRC) and loaded back with ImageCms.
"""
from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image, ImageCms

D65 = (0.3127, 0.3290)
D50_XYZ = np.array([0.9642, 1.0, 0.8249])
BRADFORD = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])
PRIMARIES = {
    "Display P3": ((0.680, 0.320), (0.265, 0.690), (0.150, 0.060)),
    "Adobe RGB (1998)": ((0.640, 0.330), (0.210, 0.710), (0.150, 0.060)),
}
SRGB_CURVE = (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)      # parametric curve type 3


def _xyz(xy: tuple[float, float]) -> np.ndarray:
    x, y = xy
    return np.array([x / y, 1.0, (1 - x - y) / y])


def _rgb_to_xyz_d50(primaries) -> np.ndarray:
    cols = np.stack([_xyz(p) for p in primaries], axis=1)
    white = _xyz(D65)
    m = cols * np.linalg.solve(cols, white)
    adapt = np.linalg.inv(BRADFORD) @ np.diag((BRADFORD @ D50_XYZ) / (BRADFORD @ white)) @ BRADFORD
    return adapt @ m


def _s15(v: float) -> bytes:
    return struct.pack(">i", int(round(v * 65536)))


def _xyz_tag(v) -> bytes:
    return b"XYZ \0\0\0\0" + b"".join(_s15(c) for c in v)


def _desc(text: str) -> bytes:
    a = text.encode("ascii") + b"\0"
    return b"desc\0\0\0\0" + struct.pack(">I", len(a)) + a + b"\0" * 12 + b"\0" * 67


def _curve(gamma: float | None) -> bytes:
    if gamma is None:                                             # the sRGB curve
        return b"para\0\0\0\0" + struct.pack(">HH", 3, 0) + b"".join(_s15(v) for v in SRGB_CURVE)
    return b"curv\0\0\0\0" + struct.pack(">IH", 1, int(round(gamma * 256))) + b"\0\0"


def matrix_profile(name: str, gamma: float | None = None) -> bytes:
    """ICC bytes of an RGB matrix profile with ``name``'s primaries (D65 white), sRGB curve or a gamma."""
    m = _rgb_to_xyz_d50(PRIMARIES[name])
    tags = [(b"desc", _desc(name)), (b"wtpt", _xyz_tag(D50_XYZ)), (b"cprt", b"text\0\0\0\0test\0"),
            (b"rXYZ", _xyz_tag(m[:, 0])), (b"gXYZ", _xyz_tag(m[:, 1])), (b"bXYZ", _xyz_tag(m[:, 2]))]
    curve = _curve(gamma)
    tags += [(b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for sig, body in tags:
        while (offset + len(data)) % 4:
            data += b"\0"
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    body = struct.pack(">I", len(tags)) + table + data
    size = 128 + len(body)
    header = (struct.pack(">I", size) + b"lcms" + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ "
              + b"\0" * 12 + b"acsp" + b"APPL" + b"\0" * 4 + b"\0" * 4 + b"\0" * 4 + b"\0" * 8 + b"\0" * 4
              + b"".join(_s15(c) for c in D50_XYZ) + b"lcms" + b"\0" * 44)
    assert len(header) == 128, len(header)
    return header + body


P3 = "Display P3"
ADOBE = "Adobe RGB (1998)"
GAMMAS = {P3: None, ADOBE: 563 / 256}


def encode_in(rgb_u8: np.ndarray, name: str) -> tuple[Image.Image, bytes]:
    """An sRGB uint8 image converted into ``name``'s space (an RGB Pillow image) and that profile's bytes."""
    icc = matrix_profile(name, GAMMAS[name])
    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    out = ImageCms.profileToProfile(Image.fromarray(rgb_u8), srgb, profile,
                                    renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC, outputMode="RGB")
    return out, icc
