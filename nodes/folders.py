"""Model folders of the pack, registered with ComfyUI's ``folder_paths`` (imported lazily).

``models/productbg/banks``          category banks (.safetensors)
``models/productbg/style_encoders`` style encoders; IP-Adapter files in ``models/ipadapter`` are listed too
Entries that ``extra_model_paths.yaml`` already added are kept; ours are appended once.
"""
from __future__ import annotations

import os

from .common import NodeInputError

SAFETENSORS = {".safetensors"}
FOLDERS = {
    "productbg_banks": os.path.join("productbg", "banks"),
    "productbg_style_encoders": os.path.join("productbg", "style_encoders"),
    "ipadapter": "ipadapter",
}


def register_model_folders() -> None:
    # ComfyUI's own module: there only inside ComfyUI, and this module must import without it
    import folder_paths

    for name, sub in FOLDERS.items():
        default = os.path.join(folder_paths.models_dir, sub)
        paths, exts = folder_paths.folder_names_and_paths.get(name, ([], set()))
        if default not in paths:
            paths = list(paths) + [default]
        folder_paths.folder_names_and_paths[name] = (paths, set(exts) | SAFETENSORS)


def list_files(*names: str) -> list[str]:
    """File names of the given folders (registering them first), for a node's combo input."""
    # ComfyUI's own module: there only inside ComfyUI, and this module must import without it
    import folder_paths

    register_model_folders()
    files: list[str] = []
    for name in names:
        files += [f for f in folder_paths.get_filename_list(name) if f not in files]
    return files


def full_path(name: str, filename: str, *more: str) -> str:
    """Absolute path of ``filename`` in one of the folders, or a clear error saying where to put it."""
    # ComfyUI's own module: there only inside ComfyUI, and this module must import without it
    import folder_paths

    register_model_folders()
    for folder in (name, *more):
        path = folder_paths.get_full_path(folder, filename)
        if path:
            return path
    where = " or ".join(os.path.join("ComfyUI", "models", FOLDERS[f]) for f in (name, *more))
    raise NodeInputError(f"{filename!r} not found: put the file in {where} and refresh the page")
