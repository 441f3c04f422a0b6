"""ComfyUI nodes, on ComfyUI's V3 schema (``comfy_api.latest``).

The node modules (``*_nodes.py``, ``schema.py``, ``extension.py``) subclass ``comfy_api`` types, which exist only
inside ComfyUI, so nothing here imports them: ComfyUI calls ``productbg.comfy_entrypoint``, which imports
``extension.py`` and through it every node. ``common.py``, ``folders.py`` and ``bank_routes.py`` import without
ComfyUI. :data:`NODE_IDS` lists the node ids and display names as plain data.
"""

#: Node id -> display name, in menu order. Ids are what saved workflows refer to: never rename one.
NODE_IDS = {
    "ProductBGBackgroundWords": "Background Words (productbg)",
    "ProductBGMaskGuidedAttention": "Mask-Guided Attention (productbg)",
    "ProductBGLoadCategoryBank": "Load Category Bank (productbg)",
    "ProductBGCategoryPrompt": "Category Prompt (productbg)",
    "ProductBGCategoryLora": "Category LoRA (productbg)",
    "ProductBGCategory": "Category (productbg)",
    "ProductBGLoadStyleEncoder": "Load Style Encoder (productbg)",
    "ProductBGReferenceStyle": "Reference Style (productbg)",
    "ProductBGReferenceStyleRedux": "Reference Style Redux (productbg)",
    "ProductBGSegmentProduct": "Segment Product (productbg)",
    "ProductBGPlaceProduct": "Place Product (productbg)",
    "ProductBGCompositeProduct": "Composite Product (productbg)",
    "ProductBGPreservationReport": "Preservation Report (productbg)",
    "ProductBGExportProduct": "Export for Marketplace (productbg)",
    "ProductBGLoadProductsFromFolder": "Load Products From Folder (productbg)",
}
