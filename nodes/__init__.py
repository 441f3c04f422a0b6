"""ComfyUI nodes. Node modules import ComfyUI only inside methods, so this package imports without it."""
from .attention_nodes import BackgroundWords, MaskGuidedAttention
from .category_nodes import CategoryName, CategoryPrompt, LoadCategoryBank
from .export_nodes import ExportProduct
from .imaging_nodes import (CompositeProduct, LoadProductsFromFolder, PlaceProduct, PreservationReport,
                            SegmentProduct)
from .lora_nodes import CategoryLoraNode
from .style_nodes import LoadStyleEncoder, ReferenceStyle

_NODES = {
    "ProductBGBackgroundWords": (BackgroundWords, "Background Words (productbg)"),
    "ProductBGMaskGuidedAttention": (MaskGuidedAttention, "Mask-Guided Attention (productbg)"),
    "ProductBGLoadCategoryBank": (LoadCategoryBank, "Load Category Bank (productbg)"),
    "ProductBGCategoryPrompt": (CategoryPrompt, "Category Prompt (productbg)"),
    "ProductBGCategoryLora": (CategoryLoraNode, "Category LoRA (productbg)"),
    "ProductBGCategory": (CategoryName, "Category (productbg)"),
    "ProductBGLoadStyleEncoder": (LoadStyleEncoder, "Load Style Encoder (productbg)"),
    "ProductBGReferenceStyle": (ReferenceStyle, "Reference Style (productbg)"),
    "ProductBGSegmentProduct": (SegmentProduct, "Segment Product (productbg)"),
    "ProductBGPlaceProduct": (PlaceProduct, "Place Product (productbg)"),
    "ProductBGCompositeProduct": (CompositeProduct, "Composite Product (productbg)"),
    "ProductBGPreservationReport": (PreservationReport, "Preservation Report (productbg)"),
    "ProductBGExportProduct": (ExportProduct, "Export for Marketplace (productbg)"),
    "ProductBGLoadProductsFromFolder": (LoadProductsFromFolder, "Load Products From Folder (productbg)"),
}

NODE_CLASS_MAPPINGS = {key: cls for key, (cls, _) in _NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {key: name for key, (_, name) in _NODES.items()}
