"""productbg: e-commerce product backgrounds (ComfyUI node pack and Python package).

Importing this package never imports ComfyUI: node classes import ComfyUI lazily, inside their methods,
so ``import productbg`` works in plain Python and the same folder loads as a ComfyUI custom node pack.
"""
__version__ = "0.1.0"

import sys as _sys

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

if "folder_paths" in _sys.modules:  # loaded by ComfyUI: make models/productbg/... known right away
    from .nodes.bank_routes import register_routes
    from .nodes.folders import register_model_folders

    register_model_folders()
    register_routes()  # the category list's routes, when a PromptServer is running (not in plain Python)

#: The frontend extension (web/productbg.js): the category widgets become a searchable list of the bank's names.
WEB_DIRECTORY = "./web"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY", "__version__"]
