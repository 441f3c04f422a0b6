"""ComfyUI nodes. Node modules import ComfyUI only inside methods, so this package imports without it."""
from .attention_nodes import BackgroundWords, MaskGuidedAttention

_NODES = {
    "ProductBGBackgroundWords": (BackgroundWords, "Background Words (productbg)"),
    "ProductBGMaskGuidedAttention": (MaskGuidedAttention, "Mask-Guided Attention (productbg)"),
}

NODE_CLASS_MAPPINGS = {key: cls for key, (cls, _) in _NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {key: name for key, (_, name) in _NODES.items()}
