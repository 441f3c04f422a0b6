"""productbg.weights: the file formats designers share — safetensors only, validated before use.

* category bank (:class:`CategoryBank`): every category's identifier vectors in one file (SD1.5 or SDXL);
* embedding (:func:`export_embedding`): one category as a standard textual-inversion file for ``embedding:NAME``;
* style encoder (:class:`StyleEncoder`): the IP-Adapter layout (linear and plus, SD1.5 and SDXL), ours or
  published; :mod:`.ip_adapters` names the releases and checks the CLIP vision (:func:`check_clip_vision`);
* LoRA key conversion between peft/diffusers and kohya (ComfyUI) layouts.

Every problem with a file raises :class:`WeightsError` (a ``ValueError``). Never imports ComfyUI.
"""
from .bank import (DEFAULT_TEMPLATE, Category, CategoryBank, CategoryLora, load_bank)
from .describe import FileReport, describe_file
from .embedding import EmbeddingExport, export_embedding, read_embedding
from .errors import (FormatMismatchError, MalformedFileError, NameLookupError, WeightsError)
from .ip_adapters import (CLIP_VISIONS, RELEASES, VIT_BIGG, VIT_H, ClipVision, Release, check_clip_vision,
                          clip_vision_problem, clip_vision_widths, release_of, required_clip_vision)
from .lora import (LoraFile, LoraModule, convert_lora_file, diffusers_path, kohya_name, parse_lora, read_lora,
                   to_kohya, to_peft)
from .safefile import atomic_save, read_header
from .style_encoder import (StyleEncoder, StyleEncoderConfig, StyleEncoderInfo, check_target, load_style_encoder,
                            read_style_encoder_info, save_style_encoder)
from ..backbones.targets import SD15, SD15_LAYERS, SDXL, CrossAttnLayer, TargetModel

__all__ = [
    "DEFAULT_TEMPLATE", "Category", "CategoryBank", "CategoryLora", "load_bank",
    "FileReport", "describe_file",
    "EmbeddingExport", "export_embedding", "read_embedding",
    "CLIP_VISIONS", "RELEASES", "VIT_BIGG", "VIT_H", "ClipVision", "Release", "check_clip_vision",
    "clip_vision_problem", "clip_vision_widths", "release_of", "required_clip_vision",
    "FormatMismatchError", "MalformedFileError", "NameLookupError", "WeightsError",
    "LoraFile", "LoraModule", "convert_lora_file", "diffusers_path", "kohya_name", "parse_lora", "read_lora",
    "to_kohya", "to_peft",
    "atomic_save", "read_header",
    "StyleEncoder", "StyleEncoderConfig", "StyleEncoderInfo", "check_target", "load_style_encoder",
    "read_style_encoder_info", "save_style_encoder",
    "SD15", "SD15_LAYERS", "SDXL", "CrossAttnLayer", "TargetModel",
]
