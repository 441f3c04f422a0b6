"""What every real-ComfyUI test helper shares: where things are, the child-process environment, pytest's order,
and ComfyUI's error reports as readable text. Standard library only.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
COMFYUI_VERSION = "0.3.75"  # what scripts/setup_env.sh installs and CI runs
#: ComfyUI releases the real-ComfyUI tests accept as COMFYUI_DIR. 0.3.64 (the oldest release the pack supports,
#: where the V3 schema first holds everything the nodes use) is not on PyPI, so only a developer who has its
#: source tree can point COMFYUI_DIR at it (see docs/architecture.md, "ComfyUI versions").
COMFYUI_VERSIONS = ("0.3.64", COMFYUI_VERSION)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def comfyui_dir_problem(path: str | None) -> str | None:
    """Why ``path`` is not a usable ComfyUI tree, or None when it is."""
    if not path:
        return "COMFYUI_DIR is not set (bash scripts/test.sh sets it)"
    version_file = Path(path, "comfyui_version.py")
    if not Path(path, "main.py").is_file() or not version_file.is_file():
        return f"COMFYUI_DIR={path} is not a ComfyUI tree"
    text = version_file.read_text()
    if not any(f'__version__ = "{v}"' in text for v in COMFYUI_VERSIONS):
        return f"COMFYUI_DIR={path} is not ComfyUI {' or '.join(COMFYUI_VERSIONS)}"
    return None


def child_env() -> dict[str, str]:
    """Environment for ComfyUI child processes: offline, and nothing of ours on sys.path."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONPATH", None)
    return env


MEMORY_HUNGRY_FIRST = "test_comfy_trained_files"
#: Modules on full-size SDXL run after every SD1.5 ComfyUI module (never an SD1.5 and an SDXL model at once).
SDXL_LAST = ("test_comfy_sdxl", "test_comfy_flux")  # the big-model modules (test.sh runs each alone)


def move_comfyui_tests_last(items: list, marker: str = "comfyui", fixtures: tuple[str, ...] = ()) -> None:
    """Stable-reorder pytest items so those marked ``marker`` (or using one of ``fixtures``) run last.

    Items that use one of ``fixtures`` but lack the marker get it added, so ``-m "not comfyui"`` skips them.
    """
    import pytest

    late = []
    for item in items:
        uses = set(getattr(item, "fixturenames", ())) & set(fixtures)
        if uses and item.get_closest_marker(marker) is None:
            item.add_marker(getattr(pytest.mark, marker))
        if item.get_closest_marker(marker) is not None:
            late.append(item)
    if late:
        late_ids = {id(i) for i in late}
        # The most memory-hungry ComfyUI module (train-cg / train-pg on full-size SD1.5 shapes, in process) runs
        # first among them, before models loaded by the others fill the process.
        def rank(item) -> int:
            name = getattr(getattr(item, "module", None), "__name__", "").rsplit(".", 1)[-1]
            return 0 if name.endswith(MEMORY_HUNGRY_FIRST) else 2 if name.startswith(SDXL_LAST) else 1

        late.sort(key=rank)
        items[:] = [i for i in items if id(i) not in late_ids] + late


# ------------------------------------------------------------------------------------------------ ComfyUI's reports
def format_validation_error(err: Any, node_errors: Any) -> str:
    lines = []
    if isinstance(err, dict):
        lines.append(f"{err.get('message', '')} {err.get('details', '')}".strip())
    for node_id, info in (node_errors or {}).items():
        for e in info.get("errors", []):
            lines.append(f"node {node_id} ({info.get('class_type')}): {e.get('message')}: {e.get('details')}")
    return "\n".join(lines) or repr((err, node_errors))


def format_status_messages(messages: list) -> str:
    for event, data in messages:
        if event == "execution_error":
            tb = "".join(data.get("traceback") or [])[-4000:]
            return (f"node {data.get('node_id')} ({data.get('node_type')}): {data.get('exception_type')}: "
                    f"{data.get('exception_message')}\n{tb}")
    return repr(messages)[-4000:]
