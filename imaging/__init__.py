"""productbg.imaging: segmentation, placement, compositing and preservation metrics (no ComfyUI, no weights).

Functions take ``[H, W, C]`` float 0..1 images and ``[H, W]`` masks (1 = product) as torch tensors or numpy
arrays and return the kind they were given. See each module for the details:

- :mod:`.segment`   — alpha / uniform-background keying with shadow removal / GrabCut, mask refinement,
  edge colour decontamination;
- :mod:`.place`     — product on a canvas (presets, fill ratio, anchor, margin) with its inpaint mask;
- :mod:`.composite` — paste-back that keeps the product's core bit-identical;
- :mod:`.metrics`   — masked PSNR, CIEDE2000 drift, object expansion, pass/fail report;
- :mod:`.folder`    — product folders with categories (sub-folders or CSV);
- :mod:`.reading`   — input photos as upright sRGB (EXIF orientation, ICC → sRGB, 16-bit, CMYK);
- :mod:`.layout`    — the product's placement (scale, offset), shared by the generation and export canvases;
- :mod:`.export`    — marketplace export: presets, background resize, native-resolution composite, encoding.
"""
from .color import srgb_to_lab
from .composite import CORE_THRESHOLD, composite_product, outward_feather, product_core
from .export import (EXPORT_PRESETS, FORMATS, Export, assemble_export, decode_image, encode_image,
                     generation_size, parse_export_size, resize_background)
from .folder import (IMAGE_EXTENSIONS, ProductEntry, ProductFolderError, check_image_file, list_products, load_image,
                     resolve_folder)
from .layout import Layout, render_layout
from .reading import LoadedImage, read_image_file, srgb_icc_bytes
from .metrics import Thresholds, ciede2000, color_drift, masked_psnr, object_expansion, preservation_report
from .place import (ANCHORS, DEFAULT_FILL_RATIO, Placement, inpaint_grow_pixels, place_at, plan_layout,
                    inpaint_mask, parse_hex_color, place_product)
from .segment import (METHODS, BackgroundEstimate, Segmentation, alpha_of, clean_edge_colors,
                      decontaminate_foreground, estimate_background, feather_mask, fill_holes, grabcut,
                      grow_mask, keep_largest_component, key_background, refine_mask, segment_product,
                      shadow_distance, threshold_mask)

__all__ = [
    "EXPORT_PRESETS", "FORMATS", "Export", "assemble_export", "decode_image", "encode_image", "generation_size",
    "parse_export_size", "resize_background", "Layout", "render_layout", "LoadedImage", "read_image_file",
    "srgb_icc_bytes",
    "srgb_to_lab", "CORE_THRESHOLD", "composite_product", "outward_feather", "product_core",
    "IMAGE_EXTENSIONS", "ProductEntry", "ProductFolderError", "check_image_file", "list_products", "load_image",
    "resolve_folder",
    "Thresholds", "ciede2000", "color_drift", "masked_psnr", "object_expansion", "preservation_report",
    "ANCHORS", "DEFAULT_FILL_RATIO", "PRESETS", "Placement", "canvas_size", "inpaint_grow_pixels", "inpaint_mask",
    "parse_hex_color", "place_product", "place_at", "plan_layout",
    "METHODS", "BackgroundEstimate", "Segmentation", "alpha_of", "clean_edge_colors", "decontaminate_foreground",
    "estimate_background", "feather_mask", "fill_holes", "grabcut", "grow_mask", "keep_largest_component",
    "key_background", "refine_mask", "segment_product", "shadow_distance", "threshold_mask",
]
