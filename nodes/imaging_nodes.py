"""Image nodes: segment a product, place it on a canvas, paste it back, report preservation, load folders.

Thin wrappers around :mod:`productbg.imaging`: validate ComfyUI's batched tensors (IMAGE ``[B, H, W, C]``,
MASK ``[B, H, W]``), call the library per image, stack the results. V3 nodes (``comfy_api``): imported only
inside ComfyUI.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import folder_paths
import numpy as np
import torch
import torch.nn.functional as F
from comfy.utils import ProgressBar
from comfy_api.latest import io

from .. import imaging
from ..backbones import RATIOS, canvas_multiple_for, canvas as canvas_size
from ..fileio.jsonfile import json_safe
from .common import NodeInputError, as_mask_batch, as_masks
from .export_nodes import PlacementBatch
from .schema import Placement, check_choices

CATEGORY = "productbg/image"
CANVAS_CHOICES = ["custom", *RATIOS, *imaging.EXPORT_PRESETS]


# ------------------------------------------------------------------------------------------------ helpers
def pick(batch: Optional[torch.Tensor], i: int) -> Optional[torch.Tensor]:
    """Item ``i`` of a batch that holds 1 or more items (a batch of 1 serves every index)."""
    return None if batch is None else batch[i if batch.shape[0] > 1 else 0]


def check_images(images: torch.Tensor, name: str) -> torch.Tensor:
    """Validate an IMAGE ``[B, H, W, 3|4]``."""
    if images.ndim != 4 or images.shape[-1] not in (3, 4):
        raise NodeInputError(f"{name} must be an IMAGE [B, H, W, 3], got shape {tuple(images.shape)}")
    return images.float()


def require_product(mask: torch.Tensor, name: str, hint: str) -> None:
    """NodeInputError when any mask of the batch is empty (no pixel ≥ 0.5) or full (every pixel ≥ 0.5)."""
    for i, m in enumerate(mask):
        which = f"{name}[{i}]" if mask.shape[0] > 1 else name
        product = m >= 0.5
        if not product.any():
            raise NodeInputError(f"{which} is empty (no product pixels; 1 = product). {hint}")
        if product.all():
            raise NodeInputError(f"{which} covers the whole image, so there is no background. {hint}")


def broadcast_batch(named: dict[str, torch.Tensor]) -> int:
    """The common batch size of tensors whose batch is 1 or that size; NodeInputError otherwise."""
    sizes = {name: t.shape[0] for name, t in named.items()}
    batch = max(sizes.values())
    wrong = {name: n for name, n in sizes.items() if n not in (1, batch)}
    if wrong:
        raise NodeInputError(f"batch sizes do not match: {sizes}; give 1 or {batch} of each")
    return batch


def progress(total: int) -> Callable[[], None]:
    """A step function that advances ComfyUI's progress bar."""
    bar = ProgressBar(total)
    return lambda: bar.update(1)


def map_batch(function: Callable[[int], Any], batch: int) -> list[Any]:
    """``function(i)`` for each batch index, with progress."""
    step, results = progress(batch), []
    for i in range(batch):
        results.append(function(i))
        step()
    return results


def library_call(function: Callable, *args, **kwargs) -> Any:
    """Call an imaging function, turning its ValueErrors into NodeInputErrors (shown on the node)."""
    try:
        return function(*args, **kwargs)
    except NodeInputError:
        raise
    except ValueError as e:
        raise NodeInputError(str(e)) from e


# ------------------------------------------------------------------------------------------------ 7. segment
class SegmentProduct(io.ComfyNode):
    """Product mask without model weights: alpha, uniform-background keying (shadows excluded), GrabCut."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProductBGSegmentProduct", display_name="Segment Product (productbg)", category=CATEGORY,
            description=("Cuts the product out of a packshot without any model: uses transparency when present, "
                         "keys a uniform (white) background while leaving its soft shadows out, or falls back to "
                         "GrabCut. Refines the mask and cleans background colour off the product's edge (no halos)."),
            inputs=[
                io.Image.Input("image", tooltip="The product photo(s)."),
                io.Combo.Input("method", options=list(imaging.METHODS), default="auto", tooltip="auto: external "
                               "mask, else transparency, else background keying when the border is uniform, else "
                               "GrabCut. background+grabcut refines the key with GrabCut."),
                io.Float.Input("tolerance", default=10.0, min=1.0, max=60.0, step=0.5, tooltip="Colour distance "
                               "(Lab ΔE) that separates background from product. Raise it for noisy or unevenly lit "
                               "backdrops, lower it for pale products."),
                io.Float.Input("shadow_strength", default=0.75, min=0.0, max=0.95, step=0.05, tooltip="How dark a "
                               "backdrop shadow may be and still count as background (fraction of light removed). "
                               "0 keeps shadows as product."),
                io.Float.Input("threshold", default=0.5, min=0.01, max=0.99, step=0.01, tooltip="Mask values at or "
                               "above this are product (before grow, fill and feather)."),
                io.Int.Input("grow", default=0, min=-64, max=64,
                             tooltip="Grow (+) or shrink (−) the mask by this many pixels."),
                io.Boolean.Input("fill_holes", default=True, tooltip="Fill enclosed holes. Turn off for see-through "
                                 "parts such as a mug handle."),
                io.Boolean.Input("keep_largest", default=False, tooltip="Keep only the largest part (drops specks, "
                                 "but also the second shoe of a pair)."),
                io.Float.Input("feather", default=1.0, min=0.0, max=32.0, step=0.5,
                               tooltip="Width of the soft mask edge in pixels."),
                io.Boolean.Input("clean_edges", default=True, tooltip="Remove background colour from the edge pixels "
                                 "(against halos). Not applied to transparency: cut-outs keep their own colours."),
                io.Mask.Input("transparency", optional=True, tooltip="LoadImage's MASK output (1 = transparent), so "
                              "a PNG's alpha is used. Leave empty for photos."),
                io.Mask.Input("external_mask", optional=True, tooltip="A mask from another tool (RMBG, SAM…; 1 = "
                              "product): with method auto or mask it is only refined and edge-cleaned."),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The product with background colour removed from its "
                                "soft edge (no halo on a new background)."),
                io.Mask.Output(display_name="mask", tooltip="The product mask, 1 = product."),
            ])

    @classmethod
    def validate_inputs(cls, method: str | None = None) -> bool | str:
        return check_choices(method=(method, imaging.METHODS))

    @classmethod
    def execute(cls, image, method, tolerance, shadow_strength, threshold, grow, fill_holes, keep_largest,
                feather, clean_edges, transparency=None, external_mask=None) -> io.NodeOutput:
        images = check_images(image, "image")
        transparency = as_mask_batch(transparency, images, "transparency")
        external_mask = as_mask_batch(external_mask, images, "external_mask")

        def one(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            result = library_call(
                imaging.segment_product, images[i], method,
                transparency=None if transparency is None else transparency[i],
                mask=None if external_mask is None else external_mask[i], tolerance=tolerance,
                shadow_strength=shadow_strength, threshold=threshold, grow=grow, fill=fill_holes,
                keep_largest=keep_largest, feather=feather, clean_edges=clean_edges)
            return result.image, result.mask

        results = map_batch(one, images.shape[0])
        masks = torch.stack([m for _, m in results])
        require_product(masks, "the segmented mask", "Try another method (grabcut), a lower tolerance, or "
                                                     "connect a mask from another tool as external_mask.")
        return io.NodeOutput(torch.stack([im for im, _ in results]), masks)


# ------------------------------------------------------------------------------------------------ 8. place
class PlaceProduct(io.ComfyNode):
    """Scale and position the product on a canvas; also returns the inpaint mask for the generator."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProductBGPlaceProduct", display_name="Place Product (productbg)", category=CATEGORY,
            description=("Puts the product on a canvas of a marketplace format, its bounding box spanning fill_ratio "
                         "of the canvas. inpaint_mask (1 = repaint) is the background grown over the product's edge, "
                         "for InpaintModelConditioning; Composite Product pastes the original back afterwards. "
                         "placement (the product's scale and offset, plus the original product) goes to Export for "
                         "Marketplace, which delivers the image at export size with the product at its own "
                         f"resolution. An export canvas ({', '.join(imaging.EXPORT_PRESETS)}) "
                         "places the product in the export's frame and makes a canvas of its aspect whose longer side "
                         "is the larger of width and height: set it to the backbone's size, 512 for SD1.5 and 1024 "
                         "for SDXL (the widgets default to 512 so saved workflows keep their values)."),
            inputs=[
                io.Image.Input("image", tooltip="The product image (e.g. Segment Product's image)."),
                io.Mask.Input("mask", tooltip="The product mask, 1 = product (resized when its size differs)."),
                io.Combo.Input("canvas", options=CANVAS_CHOICES, default="1:1", tooltip="Aspect ratio "
                               "(width:height) at the pixel count width × height — the same table as the CLI's "
                               "--canvas, so 4:5 at 512 × 512 is 464×576 and at 1024 × 1024 928×1152 —, an export "
                               "preset (placed in the export's frame, canvas of its aspect), or custom to use width × "
                               "height as given."),
                io.Int.Input("width", default=512, min=64, max=8192, step=8, tooltip="Canvas width for custom; for "
                             "aspect ratios width × height is the pixel count. 512 for SD1.5, 1024 for SDXL (their "
                             "trained size)."),
                io.Int.Input("height", default=512, min=64, max=8192, step=8, tooltip="Canvas height for custom; for "
                             "aspect ratios width × height is the pixel count. 512 for SD1.5, 1024 for SDXL."),
                io.Float.Input("fill_ratio", default=imaging.DEFAULT_FILL_RATIO, min=0.05, max=1.0, step=0.01,
                               tooltip="Share of the canvas the product's bounding box spans (the paper's recipe: "
                               "0.70–0.78)."),
                io.Combo.Input("anchor", options=list(imaging.ANCHORS), default="center", tooltip="Where the product "
                               "sits; bottom suits products standing on a surface."),
                io.Float.Input("margin", default=0.05, min=0.0, max=0.45, step=0.01, tooltip="Least gap to the canvas "
                               "edge, as a fraction of the shorter canvas side."),
                io.String.Input("fill_color", default="#FFFFFF", tooltip="Canvas colour behind the product, #RRGGBB "
                                "(the generator repaints it)."),
                io.Int.Input("inpaint_grow", default=20, min=0, max=128, tooltip="How far the inpaint mask reaches "
                             "over the product's edge, in pixels at 512 px (scaled with the canvas)."),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The canvas with the product placed on it."),
                io.Mask.Output(display_name="product_mask", tooltip="The placed product's mask (1 = product): for "
                               "Mask-Guided Attention, Reference Style and Composite Product."),
                io.Mask.Output(display_name="inpaint_mask", tooltip="1 = repaint: the background grown over the "
                               "product's edge, for InpaintModelConditioning."),
                Placement.Output(display_name="placement", tooltip="The product's scale and offset plus the original "
                                 "product, for Export for Marketplace."),
            ])

    @classmethod
    def validate_inputs(cls, canvas: str | None = None, anchor: str | None = None) -> bool | str:
        return check_choices(canvas=(canvas, CANVAS_CHOICES), anchor=(anchor, imaging.ANCHORS))

    @classmethod
    def execute(cls, image, mask, canvas, width, height, fill_ratio, anchor, margin, fill_color,
                inpaint_grow) -> io.NodeOutput:
        images = check_images(image, "image")
        masks = as_mask_batch(mask, images, "mask")
        require_product(masks, "mask", "Connect the product mask (1 = product), e.g. from Segment Product; "
                                       "LoadImage's MASK is 1 = transparent and empty for photos.")
        if canvas == "custom" and (width % 8 or height % 8):
            raise NodeInputError(f"a custom canvas must be a multiple of 8 on each side (the VAE's factor), got "
                                 f"{width}x{height}: use {round(width / 8) * 8}x{round(height / 8) * 8}")
        frame, size = canvas_frame(canvas, width, height)
        color = library_call(imaging.parse_hex_color, fill_color)
        grow = imaging.inpaint_grow_pixels(*size, inpaint_grow)

        def one(i: int) -> tuple[Any, ...]:
            layout = library_call(imaging.plan_layout, masks[i], frame, fill_ratio, anchor, margin)
            p = library_call(imaging.place_at, images[i], masks[i], layout.at(size) if frame != size else layout,
                             color, grow)
            return p.image, p.mask, p.inpaint_mask, layout

        results = map_batch(one, images.shape[0])
        placement = PlacementBatch([r[3] for r in results], images, masks, color)
        return io.NodeOutput(*(torch.stack([r[k] for r in results]) for k in range(3)), placement)


def canvas_frame(canvas: str, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(frame the product is placed in, generation canvas): the same for aspect ratios and custom; for an
    export preset the export's size and a canvas of its aspect with the longer side ``max(width, height)``.

    An aspect ratio is resolved by the backbone table (:func:`productbg.backbones.canvas`) at the pixel count
    ``width × height``, rounded as the backbone trained at that size rounds: one answer with the CLI."""
    if canvas == "custom":
        return (width, height), (width, height)
    if canvas in imaging.EXPORT_PRESETS:
        frame = imaging.EXPORT_PRESETS[canvas]
        return frame, imaging.generation_size(frame, max(width, height))
    pixels = width * height
    size = library_call(canvas_size, canvas, pixels, canvas_multiple_for(pixels))
    return size, size


# ------------------------------------------------------------------------------------------------ 9. composite
class CompositeProduct(io.ComfyNode):
    """Paste the original product over the generated image; its core pixels stay bit-identical."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProductBGCompositeProduct", display_name="Composite Product (productbg)", category=CATEGORY,
            description=("Pastes the placed product back over the generated image. Inside the product mask's core "
                         "the pixels are exactly the input product; the soft edge is blended with the canvas colour "
                         "removed, and feather softens the seam outwards only."),
            inputs=[
                io.Image.Input("generated", tooltip="The generated image (VAE Decode). Resized to the placed image's "
                               "size when it differs."),
                io.Image.Input("placed", tooltip="Place Product's image: the original product on the canvas."),
                io.Mask.Input("product_mask", tooltip="Place Product's product_mask (1 = product)."),
                io.Float.Input("feather", default=2.0, min=0.0, max=64.0, step=0.5, tooltip="Outward softening of "
                               "the seam in pixels; never eats into the product."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The generated background with the product "
                                     "pasted back (its core bit for bit).")])

    @classmethod
    def execute(cls, generated, placed, product_mask, feather) -> io.NodeOutput:
        generated, placed = check_images(generated, "generated"), check_images(placed, "placed")
        masks = as_masks(product_mask, tuple(placed.shape[1:3]), "product_mask")
        batch = broadcast_batch({"generated": generated, "placed": placed, "product_mask": masks})
        require_product(masks, "product_mask", "Connect Place Product's product_mask (1 = product).")

        def one(i: int) -> torch.Tensor:
            return library_call(imaging.composite_product, pick(generated, i), pick(placed, i), pick(masks, i),
                                feather)

        return io.NodeOutput(torch.stack(map_batch(one, batch)))


# ------------------------------------------------------------------------------------------------ 10. report
class PreservationReport(io.ComfyNode):
    """Measure how well the product survived generation: PSNR, ΔE2000 drift, object expansion, pass/fail."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProductBGPreservationReport", display_name="Preservation Report (productbg)",
            category=CATEGORY, is_output_node=True,
            description=("JSON report of product preservation, shown on the node: colour drift (ΔE2000 mean/max) "
                         "inside the product, masked PSNR before paste-back, object expansion, and pass/fail."),
            inputs=[
                io.Image.Input("product_image", tooltip="The reference: Place Product's image."),
                io.Mask.Input("product_mask", tooltip="Place Product's product_mask (1 = product)."),
                io.Image.Input("output_image", tooltip="The final image (Composite Product) whose product is checked."),
                io.Float.Input("max_delta_e_mean", default=2.0, min=0.0, max=100.0, step=0.1, tooltip="Largest mean "
                               "ΔE2000 inside the product that passes (≈1–2 is barely visible)."),
                io.Float.Input("min_psnr_db", default=20.0, min=0.0, max=100.0, step=0.5, tooltip="Least PSNR inside "
                               "the product before paste-back that passes (needs generated_image)."),
                io.Float.Input("max_expansion_ratio", default=0.05, min=0.0, max=10.0, step=0.01, tooltip="Largest "
                               "object expansion (new product-like area / product area) that passes (needs "
                               "output_mask)."),
                io.Image.Input("generated_image", optional=True,
                               tooltip="The generated image before paste-back (VAE Decode)."),
                io.Mask.Input("output_mask", optional=True,
                              tooltip="Segment Product's mask of the output, for object expansion."),
            ],
            outputs=[
                io.String.Output(display_name="report", tooltip="The report as JSON (also shown on the node)."),
                io.Boolean.Output(display_name="passed", tooltip="True when every measured check passes."),
            ])

    @classmethod
    def execute(cls, product_image, product_mask, output_image, max_delta_e_mean, min_psnr_db,
                max_expansion_ratio, generated_image=None, output_mask=None) -> io.NodeOutput:
        thresholds = imaging.Thresholds(min_psnr_db, max_delta_e_mean, max_expansion_ratio)
        try:
            reports = measure_batch(product_image, product_mask, output_image, generated_image, output_mask,
                                    thresholds)
        except NodeInputError as e:  # never lose the user's image over a measurement: say why, pass it on
            reports = [not_measured(str(e))]
        summary = {"pass": all(r["pass"] for r in reports), "images": reports}
        text = json.dumps(json_safe(summary), indent=2, allow_nan=False)
        return io.NodeOutput(text, summary["pass"], ui={"text": [text]})


def measure_batch(product_image, product_mask, output_image, generated_image, output_mask,
                  thresholds: imaging.Thresholds) -> list[dict]:
    """Per-image reports of a batch (a batch of 1 serves every index); NodeInputError on bad input."""
    product, output = check_images(product_image, "product_image"), check_images(output_image, "output_image")
    generated = None if generated_image is None else check_images(generated_image, "generated_image")
    hw = tuple(product.shape[1:3])
    masks = as_masks(product_mask, hw, "product_mask")
    out_masks = None if output_mask is None else as_masks(output_mask, hw, "output_mask")
    present = {"product_image": product, "product_mask": masks, "output_image": output,
               "generated_image": generated, "output_mask": out_masks}
    batch = broadcast_batch({k: v for k, v in present.items() if v is not None})
    require_product(masks, "product_mask", "Connect Place Product's product_mask (1 = product).")
    return [measure_one(pick(product, i), pick(masks, i), sized_like(pick(output, i), hw),
                        sized_like(pick(generated, i), hw), pick(out_masks, i), thresholds)
            for i in range(batch)]


def not_measured(reason: str) -> dict:
    """A report entry for an image that could not be measured (it fails, and says why)."""
    return {"pass": False, "measured": False, "reason": reason, "metrics": {}, "checks": {}}


def measure_one(product, mask, output, generated, output_mask, thresholds: imaging.Thresholds) -> dict:
    """One image's report. Without ``output_mask`` the output's product is found by GrabCut seeded with the
    product mask (the generated scene is never segmented from scratch); what cannot be measured is named."""
    notes = []
    if output_mask is None:
        try:
            output_mask = torch.as_tensor(np.asarray(imaging.grabcut(output, mask), np.float32))
        except Exception as e:  # ValueError, or OpenCV's cv2.error on a degenerate image: a note, not a failure
            notes.append(f"expansion not measured: {' '.join(str(e).split())[:200] or type(e).__name__}")
    try:
        report = imaging.preservation_report(product, mask, output, generated, output_mask, thresholds)
    except ValueError as e:
        return not_measured(str(e))
    if notes:
        report["notes"] = notes
    return report


def sized_like(image: Optional[torch.Tensor], hw: tuple[int, int]) -> Optional[torch.Tensor]:
    """An ``[H', W', C]`` image resized (bilinear) to ``hw`` when its size differs."""
    if image is None or tuple(image.shape[:2]) == tuple(hw):
        return image
    resized = F.interpolate(image.permute(2, 0, 1)[None], size=tuple(hw), mode="bilinear", align_corners=False)
    return resized[0].permute(1, 2, 0).clamp(0.0, 1.0)


# ------------------------------------------------------------------------------------------------ 11. folder
class LoadProductsFromFolder(io.ComfyNode):
    """One product per queued run from a folder, with its category from a sub-folder or a CSV."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProductBGLoadProductsFromFolder", display_name="Load Products From Folder (productbg)",
            category=CATEGORY,
            description=("Loads product number `index` of a folder (stable order), its mask (alpha, or Segment "
                         "Product's automatic method) and its category. Set index to increment after each run and "
                         "queue as many runs as there are products; an index past the last product is an error."),
            inputs=[
                io.String.Input("folder", default="", tooltip="Folder of product images; sub-folder names are "
                                "categories (folder/shoes/a.png → shoes). A relative folder is inside ComfyUI's input "
                                "directory."),
                io.Int.Input("index", default=0, min=0, max=1_000_000, control_after_generate=True, tooltip="Which "
                             "product (0 = first). Set to increment to walk the folder one run at a time."),
                io.String.Input("csv_file", default="", tooltip="Optional CSV (relative to the folder) with path and "
                                "category columns; empty = use sub-folders."),
                io.String.Input("path_column", default="path", optional=True,
                                tooltip="CSV column with image paths."),
                io.String.Input("category_column", default="category", optional=True,
                                tooltip="CSV column with category names."),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The product image (upright, sRGB)."),
                io.Mask.Output(display_name="mask", tooltip="Its alpha, or Segment Product's automatic mask for "
                               "photos (1 = product)."),
                io.String.Output(display_name="category", tooltip="The first sub-folder below folder, or the CSV's "
                                 "category column."),
                io.String.Output(display_name="file_name", tooltip="The image's file name."),
                io.Int.Output(display_name="count", tooltip="How many products the folder holds."),
            ])

    @classmethod
    def fingerprint_inputs(cls, folder, index, csv_file, path_column="path", category_column="category"):
        try:  # cheap: the listing comes from the cache (a few stats), then one stat of the picked file
            entry = pick_product(folder, index, csv_file, path_column, category_column)[0]
            return f"{entry.path}|{os.path.getmtime(entry.path)}|{entry.category}"
        except (NodeInputError, OSError):
            return float("nan")                                # re-run, so the error is shown

    @classmethod
    def execute(cls, folder, index, csv_file, path_column="path", category_column="category") -> io.NodeOutput:
        entry, count = pick_product(folder, index, csv_file, path_column, category_column)
        rgb, alpha = library_call(imaging.load_image, entry.path)
        if alpha is None or imaging.alpha_of(np.dstack([rgb, alpha])) is None:
            alpha = library_call(imaging.segment_product, rgb).mask
        return io.NodeOutput(torch.from_numpy(rgb)[None], torch.from_numpy(np.asarray(alpha, np.float32))[None],
                             entry.category, entry.name, count)


def pick_product(folder: str, index: int, csv_file: str, path_column: str,
                 category_column: str) -> tuple[imaging.ProductEntry, int]:
    """The ``index``-th product of the folder and the number of products; NodeInputError past the end."""
    entries = cached_listing(folder, csv_file, path_column, category_column)
    if not 0 <= index < len(entries):
        raise NodeInputError(f"index {index} is past the last product: {folder} has {len(entries)} products "
                             f"(index 0–{len(entries) - 1}). Set index back to 0 to start over.")
    return entries[index], len(entries)


def input_directory() -> str:
    """ComfyUI's input directory (``--input-directory``)."""
    return folder_paths.get_input_directory()


#: (folder, csv, columns) → (signature, entries). One walk per change of the folder, not two per queued run.
_LISTINGS: dict[tuple, tuple[tuple, list]] = {}


def _signature(root: Path, csv_file: str) -> tuple:
    """mtimes of the folder, its direct sub-folders (the categories) and the CSV: they change when images are
    added, removed or renamed there."""
    def mtime(p: Path) -> int:
        try:
            return p.stat().st_mtime_ns
        except OSError:
            return -1

    subs = tuple(sorted((e.name, e.stat().st_mtime_ns) for e in os.scandir(root)
                        if e.is_dir(follow_symlinks=True))) if root.is_dir() else ()
    table = Path(csv_file).expanduser() if csv_file else None
    if table is not None and not table.is_absolute():
        table = root / table
    return mtime(root), subs, mtime(table) if table is not None else None


def cached_listing(folder: str, csv_file: str, path_column: str, category_column: str) -> list:
    """The folder's product list (relative folders are inside ComfyUI's input directory), cached until the
    folder, a category sub-folder or the CSV changes."""
    root = imaging.resolve_folder(folder, input_directory()) if str(folder).strip() else Path("")
    key = (str(root), csv_file or "", path_column, category_column)
    signature = _signature(root, csv_file) if str(folder).strip() else ()
    hit = _LISTINGS.get(key)
    if hit is not None and hit[0] == signature:
        return hit[1]
    entries = library_call(imaging.list_products, folder, csv_file or None, path_column, category_column,
                           base=input_directory())
    if len(_LISTINGS) > 16:
        _LISTINGS.clear()
    _LISTINGS[key] = (signature, entries)
    return entries
