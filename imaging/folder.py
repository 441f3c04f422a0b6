"""Folders of product images for batch runs: listing with categories, and loading with transparency.

Two layouts:

- **sub-folders**: ``<folder>/<category>/<image>`` — the category is the first folder below ``<folder>``
  (deeper folders are ignored for the category); images directly in ``<folder>`` have the category ``""``.
- **CSV**: a table with a header row naming (at least) a path column and a category column; paths are relative
  to ``<folder>`` (or absolute). Rows keep the file's order.

Sub-folder listings are sorted by relative path (case-insensitively, then exactly), so the order — and an
index into it — is the same on every machine. Hidden files and folders (``.name``) are skipped.
"""
from __future__ import annotations

import csv
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .reading import (DEFAULT_MAX_MEGAPIXELS, MAX_MEGAPIXELS_ENV, ProductFolderError, _open, _why,  # noqa: F401
                      max_megapixels, read_image_file)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class ProductEntry:
    """One product image of a folder.

    Attributes:
        path: Absolute path of the image.
        category: Category name (sub-folder or CSV column; may be ``""``).
        name: The image's file name.
    """

    path: Path
    category: str
    name: str


def _sort_key(relative: Path) -> tuple[str, str]:
    text = relative.as_posix()
    return text.casefold(), text


def list_products(folder: Union[str, Path], csv_file: Optional[Union[str, Path]] = None,
                  path_column: str = "path", category_column: str = "category",
                  extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
                  base: Optional[Union[str, Path]] = None) -> list[ProductEntry]:
    """List the product images of a folder with their categories.

    Args:
        folder: The product folder.
        csv_file: Optional CSV table (relative paths are inside ``folder``); without it, categories come from
            sub-folder names.
        path_column: CSV column holding image paths.
        category_column: CSV column holding category names.
        extensions: Image file extensions to list (sub-folder layout), lower case.
        base: Folder that a relative ``folder`` is relative to (default: the working directory; ComfyUI's
            nodes pass its input directory).

    Returns:
        The products in a stable order.

    Raises:
        ProductFolderError: Missing folder, CSV, column or image file, or no images at all.
    """
    if not str(folder).strip():
        raise ProductFolderError("no product folder given: enter the path of a folder of product images")
    root = resolve_folder(folder, base)
    if root.is_file():
        raise ProductFolderError(f"{root} is a file, not a folder: give the folder that holds the product images")
    if not root.is_dir():
        raise ProductFolderError(f"product folder not found: {root} (give an existing folder; relative paths "
                                 f"are relative to {Path(base) if base is not None else Path.cwd()})")
    root = root.resolve()
    if csv_file is not None and str(csv_file).strip():
        entries = _from_csv(root, Path(csv_file).expanduser(), path_column, category_column)
    else:
        entries = _from_subfolders(root, extensions)
    if not entries:
        raise ProductFolderError(f"no product images in {root} (looked for {', '.join(extensions)})")
    return entries


def resolve_folder(folder: Union[str, Path], base: Optional[Union[str, Path]] = None) -> Path:
    """``folder`` with ``~`` expanded; a relative one joined to ``base`` when given."""
    root = Path(str(folder).strip()).expanduser()
    return root if root.is_absolute() or base is None else Path(base) / root


def _from_subfolders(root: Path, extensions: tuple[str, ...]) -> list[ProductEntry]:
    found = []
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        if path.suffix.lower() in extensions:
            found.append(relative)
    found.sort(key=_sort_key)
    return [ProductEntry(root / rel, rel.parts[0] if len(rel.parts) > 1 else "", rel.name) for rel in found]


def _from_csv(root: Path, csv_path: Path, path_column: str, category_column: str) -> list[ProductEntry]:
    table = csv_path if csv_path.is_absolute() else root / csv_path
    if not table.is_file():
        raise ProductFolderError(f"category CSV not found: {table}")
    with open(table, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in (path_column, category_column) if c not in columns]
        if missing:
            raise ProductFolderError(f"{table.name} has no column {', '.join(map(repr, missing))}; its header "
                                     f"has {columns or 'nothing'} (the first row must name the columns)")
        entries = []
        for line, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            if not row.get(path_column):
                continue                                  # blank line
            image = Path(row[path_column]).expanduser()
            image = image if image.is_absolute() else root / image
            if not image.is_file():
                raise ProductFolderError(f"{table.name} line {line}: image not found: {image}")
            entries.append(ProductEntry(image.resolve(), row.get(category_column, ""), image.name))
    return entries


def check_image_file(path: Union[str, Path]) -> tuple[int, int]:
    """Open and fully decode an image file (finds truncated files) within the pixel limit; its (width, height).

    Raises:
        ProductFolderError: unreadable, truncated, not an image, or above the pixel limit.
    """
    try:
        with _open(path) as im:
            im.load()
            return im.size
    except ProductFolderError:
        raise
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, struct.error ... for broken files
        raise ProductFolderError(f"cannot read image {path}: {_why(e)}") from None


def load_image(path: Union[str, Path]) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Read an image as ``[H, W, 3]`` float32 sRGB 0..1 plus its alpha ``[H, W]`` (None when it has none).

    EXIF orientation is applied, an embedded ICC profile converted to sRGB, 16-bit files read at 16 bits,
    CMYK converted (see :func:`productbg.imaging.reading.read_image_file`, which also says what it did).
    Images above the pixel limit (:func:`max_megapixels`) are refused before they are decoded.
    """
    loaded = read_image_file(path)
    return loaded.rgb, loaded.alpha
