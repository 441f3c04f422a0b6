"""The pack as a V3 ``ComfyExtension``: every node, registered through ``productbg.comfy_entrypoint``."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .attention_nodes import BackgroundWords, MaskGuidedAttention
from .bank_routes import register_routes
from .category_nodes import CategoryName, CategoryPrompt, LoadCategoryBank
from .export_nodes import ExportProduct
from .folders import register_model_folders
from .imaging_nodes import (CompositeProduct, LoadProductsFromFolder, PlaceProduct, PreservationReport,
                            SegmentProduct)
from .lora_nodes import CategoryLoraNode
from .redux_nodes import ReferenceStyleRedux
from .style_nodes import LoadStyleEncoder, ReferenceStyle

#: Every node of the pack, in the order of :data:`productbg.nodes.NODE_IDS`.
NODES: list[type[io.ComfyNode]] = [
    BackgroundWords, MaskGuidedAttention, LoadCategoryBank, CategoryPrompt, CategoryLoraNode, CategoryName,
    LoadStyleEncoder, ReferenceStyle, ReferenceStyleRedux, SegmentProduct, PlaceProduct, CompositeProduct, PreservationReport,
    ExportProduct, LoadProductsFromFolder,
]


def set_up() -> None:
    """What the pack needs from a running ComfyUI before its nodes are listed: the models/productbg/... folders
    in ``folder_paths``, and the category list's routes on the server (when a PromptServer is running)."""
    register_model_folders()
    register_routes()


class ProductBGExtension(ComfyExtension):
    """productbg's nodes. ComfyUI 0.3.64 / 0.3.75 call only ``get_node_list``; newer ones call ``on_load`` first."""

    async def on_load(self) -> None:
        set_up()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        set_up()  # idempotent: also here for the ComfyUI releases that never call on_load
        return list(NODES)

