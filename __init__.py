"""productbg: e-commerce product backgrounds (ComfyUI node pack and Python package).

Inside ComfyUI (0.3.64 and later) the pack registers its nodes on ComfyUI's V3 schema: ComfyUI finds
:func:`comfy_entrypoint` (there is no ``NODE_CLASS_MAPPINGS``, which ComfyUI would prefer) and gets the
``ComfyExtension`` listing every node. The node classes subclass ``comfy_api`` types, so they are imported only
when ComfyUI calls it: ``import productbg`` — the CLI, the diffusers pipeline, training — never imports ComfyUI.
"""
__version__ = "0.1.0"

#: The frontend extension (web/productbg.js): the category widgets become a searchable list of the bank's names.
WEB_DIRECTORY = "./web"


def comfy_entrypoint():
    """ComfyUI's V3 entry point: the pack's ``ComfyExtension`` (every node, the model folders, the category list's
    routes). Called by ComfyUI when it loads the pack."""
    from .nodes.extension import ProductBGExtension  # lazy: comfy_api exists only inside ComfyUI

    return ProductBGExtension()


__all__ = ["WEB_DIRECTORY", "__version__", "comfy_entrypoint"]
