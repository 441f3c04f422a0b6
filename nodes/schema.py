"""What every V3 node of the pack shares: our ComfyUI types as ``io.Custom`` types, and combo checks.

The V3 schema (``comfy_api.latest``) exists only inside ComfyUI (0.3.64 and later), so this module and the node
modules that import it are imported only there: ComfyUI calls ``productbg.comfy_entrypoint``, which imports
``nodes/extension.py``. ``import productbg`` never reaches them.
"""
from __future__ import annotations

from typing import Iterable, Optional

from comfy_api.latest import io

from .common import BANK, IDENTIFIER, PLACEMENT, STYLE

#: Custom types under the names the V1 nodes used, so links in saved workflows stay valid.
Bank = io.Custom(BANK)
Identifier = io.Custom(IDENTIFIER)
Style = io.Custom(STYLE)
Placement = io.Custom(PLACEMENT)


def choice_problem(name: str, value: Optional[str], options: Iterable[str]) -> Optional[str]:
    """None when ``value`` is one of ``options`` (or None: a linked input, unknown until it runs), else a one-line
    message naming the choices."""
    options = list(options)
    if value is None or value in options:
        return None
    return f"{name} {value!r} is not one of: {', '.join(options)}"


def check_choices(**named: tuple[Optional[str], Iterable[str]]) -> bool | str:
    """A node's ``validate_inputs`` answer for its fixed-option combos: True, or the first problem as one line.

    ComfyUI 0.3.6x–0.3.7x check a V3 combo's value against its options only for V1-style list types, so without
    this a misspelt value would reach ``execute``; newer ComfyUI checks too, and skips inputs a node validates.
    """
    for name, (value, options) in named.items():
        problem = choice_problem(name, value, options)
        if problem:
            return problem
    return True
