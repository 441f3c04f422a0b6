"""Strict JSON files (never a bare NaN or Infinity), written atomically."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from . import write_text_atomically


def write_json(data: Any, path: str | os.PathLike) -> Path:
    """Write JSON (UTF-8, indented) atomically."""
    return write_text_atomically(path, dumps(data, indent=1) + "\n")


def json_safe(value: Any) -> Any:
    """``value`` with what strict JSON cannot hold replaced: NaN → None, ±inf → "inf" / "-inf", numpy scalars
    and arrays → numbers and lists, paths → text."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def dumps(data: Any, **kwargs: Any) -> str:
    """Strict JSON text (never a bare NaN or Infinity): :func:`json_safe` then ``allow_nan=False``."""
    return json.dumps(json_safe(data), ensure_ascii=False, allow_nan=False, default=_jsonable, **kwargs)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
