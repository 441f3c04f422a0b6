"""productbg.weights: the file formats designers share — safetensors only, validated before use.

* category bank (:class:`CategoryBank`): every category's identifier vectors in one file;
* style encoder (:class:`StyleEncoder`): the IP-Adapter SD1.5 layout (linear and plus), ours or published;
* LoRA key conversion between peft/diffusers and kohya (ComfyUI) layouts.

Every problem with a file raises :class:`WeightsError` (a ``ValueError``). Never imports ComfyUI.
"""
from .bank import (DEFAULT_TEMPLATE, Category, CategoryBank, CategoryLora, load_bank)
from .describe import FileReport, describe_file
from .errors import (FormatMismatchError, MalformedFileError, NameLookupError, UnsafeFormatError, WeightsError)
from .lora import (LoraFile, LoraModule, convert_lora_file, diffusers_path, kohya_name, parse_lora, read_lora,
                   to_kohya, to_peft)
from .safefile import atomic_save, read_header
from .style_encoder import (StyleEncoder, StyleEncoderConfig, StyleEncoderInfo, check_target, load_style_encoder,
                            read_style_encoder_info, save_style_encoder)
from .targets import SD15, SD15_LAYERS, SDXL, CrossAttnLayer, TargetModel

__all__ = [
    "DEFAULT_TEMPLATE", "Category", "CategoryBank", "CategoryLora", "load_bank",
    "FileReport", "describe_file",
    "FormatMismatchError", "MalformedFileError", "NameLookupError", "UnsafeFormatError", "WeightsError",
    "LoraFile", "LoraModule", "convert_lora_file", "diffusers_path", "kohya_name", "parse_lora", "read_lora",
    "to_kohya", "to_peft",
    "atomic_save", "read_header",
    "StyleEncoder", "StyleEncoderConfig", "StyleEncoderInfo", "check_target", "load_style_encoder",
    "read_style_encoder_info", "save_style_encoder",
    "SD15", "SD15_LAYERS", "SDXL", "CrossAttnLayer", "TargetModel",
]
