"""Quiet model loading: no weight-loading progress bars or dtype notices from transformers / diffusers.

A leaf module (it imports nothing of the package), so every loader — :mod:`.components` and
:mod:`.single_file` alike — can use it without importing the other.
"""
from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No weight-loading progress bars or dtype notices from transformers / diffusers (one-line CLI output)."""
    # optional dependency: diffusers, transformers
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])
