"""Export for Marketplace: the delivered image at its export size, with the product at native resolution.

Why a saving node rather than options on Composite Product plus ComfyUI's own savers: ComfyUI's Save Image
writes PNG only and embeds no colour profile, and an IMAGE carries no placement, so nothing downstream of a
512² composite could get the product's own pixels back. This node takes Place Product's ``placement`` (the
layout and the native product), builds the export, encodes PNG / JPEG / WebP with the sRGB profile, measures
the preservation report on the encoded file, and saves it; it also returns the export as an IMAGE (and its
mask) so core nodes can preview or process it further.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import folder_paths
import numpy as np
import torch
from comfy_api.latest import io

from .. import imaging
from ..fileio import write_bytes_atomically
from ..fileio.jsonfile import json_safe
from .common import NodeInputError
from .schema import Placement, check_choices

CATEGORY = "productbg/image"
SIZE_CHOICES = ["placement", *imaging.EXPORT_PRESETS, "custom"]


@dataclass
class PlacementBatch:
    """Place Product's ``placement`` output: per image its layout, plus the native product and mask.

    Attributes:
        layouts: one :class:`~productbg.imaging.layout.Layout` per image (in its frame).
        products: ``[B, H, W, C]`` the product images as given to Place Product (native resolution).
        masks: ``[B, H, W]`` their masks. fill_color: the canvas colour (sRGB 0..1).
    """

    layouts: list
    products: torch.Tensor
    masks: torch.Tensor
    fill_color: tuple[float, float, float]

    def item(self, i: int) -> tuple[Any, np.ndarray, np.ndarray]:
        """Layout, product ``[H, W, 3]`` and mask ``[H, W]`` (numpy) of image ``i`` (a batch of 1 serves all)."""
        j = i if len(self.layouts) > 1 else 0
        return (self.layouts[j], self.products[j, ..., :3].float().cpu().numpy(),
                self.masks[j].float().cpu().numpy())


class ExportProduct(io.ComfyNode):
    """Resize the generated background to the export size, composite the native product, encode and save."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProductBGExportProduct", display_name="Export for Marketplace (productbg)", category=CATEGORY,
            description=("Delivers a marketplace-ready image: the generated background resized up to the export size "
                         "(Lanczos, or a connected upscale model first) and the ORIGINAL product pixels composited "
                         "at their own resolution, from Place Product's placement — inside the product's core the "
                         "export equals the input bit for bit. Saves PNG/JPEG/WebP with an embedded sRGB profile "
                         "and reports preservation (ΔE2000, PSNR) measured on the saved file."),
            is_output_node=True,
            inputs=[
                io.Image.Input("generated", tooltip="The generated image (VAE Decode), at the canvas size."),
                Placement.Input("placement", tooltip="Place Product's placement output (layout + native product)."),
                io.Combo.Input("size", options=SIZE_CHOICES, default="placement", tooltip="Export size: "
                               "'placement' = the frame Place Product placed in (an export preset there), a preset, "
                               "or custom (width × height). Must have the canvas's aspect (±2 %)."),
                io.Int.Input("width", default=2000, min=64, max=imaging.export.MAX_EXPORT_SIDE,
                             tooltip="Export width for custom."),
                io.Int.Input("height", default=2000, min=64, max=imaging.export.MAX_EXPORT_SIDE,
                             tooltip="Export height for custom."),
                io.Combo.Input("format", options=list(imaging.FORMATS), default="png",
                               tooltip="File format (sRGB profile embedded)."),
                io.Int.Input("quality", default=imaging.export.DEFAULT_QUALITY, min=1, max=100, tooltip="JPEG / "
                             "WebP quality (WebP 100 = lossless; JPEG ≥ 90 keeps full colour resolution)."),
                io.Float.Input("feather", default=2.0, min=0.0, max=64.0, step=0.5,
                               tooltip="Outward seam softening, in canvas pixels (scaled to the export)."),
                io.String.Input("filename_prefix", default="productbg/export",
                                tooltip="Saved in ComfyUI's output folder under this prefix."),
                io.Boolean.Input("save", default=True, tooltip="Write the file (off: only return the image)."),
                io.UpscaleModel.Input("upscale_model", optional=True, tooltip="Optional ESRGAN-class model (Load "
                                      "Upscale Model) run on the background before the exact resize."),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The export at its export size."),
                io.Mask.Output(display_name="product_mask", tooltip="The product mask at the export size."),
                io.String.Output(display_name="report", tooltip="Preservation report (JSON) measured on the "
                                 "encoded file; also shown on the node."),
            ])

    @classmethod
    def validate_inputs(cls, size: str | None = None, format: str | None = None) -> bool | str:
        return check_choices(size=(size, SIZE_CHOICES), format=(format, imaging.FORMATS))

    @classmethod
    def execute(cls, generated, placement, size, width, height, format, quality, feather, filename_prefix, save,
                upscale_model=None) -> io.NodeOutput:
        if not isinstance(placement, PlacementBatch):
            raise NodeInputError("placement must come from Place Product's placement output")
        if generated.ndim != 4:
            raise NodeInputError(f"generated must be an IMAGE [B, H, W, 3], got shape {tuple(generated.shape)}")
        upscaler = _upscaler(upscale_model)
        results = []
        for i in range(generated.shape[0]):
            layout, product, mask = placement.item(i)
            target = export_size(size, width, height, layout)
            k = max(target) / max(generated.shape[1:3])
            try:
                results.append(imaging.assemble_export(
                    generated[i].float().cpu().numpy(), product, mask, layout, target, format, quality,
                    feather * k, placement.fill_color, upscaler=upscaler))
            except ValueError as e:
                raise NodeInputError(str(e)) from e
        files = [save_file(r, filename_prefix) for r in results] if save else []
        text = json.dumps(json_safe({"pass": all(r.report["pass"] for r in results),
                                     "images": [dict(r.report, export=r.describe()) for r in results]}), indent=2)
        return io.NodeOutput(stack([r.image for r in results]), stack([r.mask for r in results]), text,
                             ui={"images": files, "text": [text]})


def export_size(size: str, width: int, height: int, layout) -> tuple[int, int]:
    """The export's ``(width, height)`` for the node's size choice."""
    if size == "placement":
        return tuple(layout.frame)
    if size == "custom":
        return int(width), int(height)
    if size not in imaging.EXPORT_PRESETS:
        raise NodeInputError(f"unknown export size {size!r}; choose one of {', '.join(SIZE_CHOICES)}")
    return imaging.EXPORT_PRESETS[size]


def stack(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays).astype(np.float32))


def _upscaler(model: Optional[Any]) -> Optional["ComfyUpscaler"]:
    """ComfyUI's UPSCALE_MODEL as the export's upscaler (None: Lanczos)."""
    if model is None:
        return None
    channels = (getattr(model, "input_channels", 3), getattr(model, "output_channels", 3))
    if channels != (3, 3):
        raise NodeInputError(f"upscale_model is a {channels[0]}-channel to {channels[1]}-channel model; the "
                             "background is RGB: connect an RGB (3-channel) upscale model, or none for Lanczos")
    return ComfyUpscaler(model)


class ComfyUpscaler:
    """``[H, W, 3]`` float32 → ``[sH, sW, 3]`` through ComfyUI's own *Upscale Image (using Model)*: memory freed
    through model management before the model moves to the GPU, tiles halved on out-of-memory, progress shown,
    the model offloaded after."""

    def __init__(self, model: Any) -> None:
        self.model, self.scale = model, int(model.scale)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        # lazy: it imports comfy.model_management (device picked at first import) and the spandrel loader
        from comfy_extras.nodes_upscale_model import ImageUpscaleWithModel

        pixels = torch.from_numpy(np.ascontiguousarray(image[..., :3], np.float32))[None]
        if hasattr(ImageUpscaleWithModel, "execute"):  # a V3 node in ComfyUI 0.3.75; V1 in 0.3.64
            (out,) = ImageUpscaleWithModel.execute(self.model, pixels).result
        else:
            (out,) = ImageUpscaleWithModel().upscale(self.model, pixels)
        return out[0].float().cpu().numpy()


def save_file(export: imaging.Export, prefix: str) -> dict[str, str]:
    """Write the encoded export into ComfyUI's output folder (atomically); its UI entry."""
    w, h = export.layout.frame
    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, folder_paths.get_output_directory(),
                                                                           w, h)
    path = Path(folder) / f"{name}_{counter:05}_{export.extension}"
    write_bytes_atomically(path, export.data)
    return {"filename": path.name, "subfolder": subfolder, "type": "output"}
