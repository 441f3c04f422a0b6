"""The cross-attention layers of the base models our weight files plug into.

IP-Adapter files number their per-layer K/V ``ip_adapter.<n>`` with odd ``n`` because the original code
enumerated *all* attention processors of a diffusers UNet (self-attention ``attn1`` at even positions,
cross-attention ``attn2`` at odd ones) in ``unet.attn_processors`` order: down blocks, up blocks, mid block.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import backbones
from ..backbones import CrossAttnLayer


@dataclass(frozen=True)
class TargetModel:
    """What a style encoder must fit: text-context width and per-layer hidden sizes.

    Attributes:
        family: short family name, e.g. ``"sd15"``.
        label: human name used in messages, e.g. ``"SD1.5"``.
        context_dim: width of the cross-attention context (text encoder width).
        hidden_sizes: hidden size of each cross-attention layer, in IP-Adapter order.
    """

    family: str
    label: str
    context_dim: int
    hidden_sizes: tuple[int, ...]

    @property
    def num_layers(self) -> int:
        """Number of cross-attention layers."""
        return len(self.hidden_sizes)

    def describe(self) -> str:
        """E.g. ``"SD1.5 (context width 768, 16 cross-attention layers)"``."""
        return f"{self.label} (context width {self.context_dim}, {self.num_layers} cross-attention layers)"


#: SD1.5's 16 cross-attention layers in IP-Adapter / diffusers ``attn_processors`` order.
SD15_LAYERS: tuple[CrossAttnLayer, ...] = backbones.SD15.layers
#: SDXL base's 70 (transformer depth 2 in the 640-wide blocks, 10 in the 1280-wide ones).
SDXL_LAYERS: tuple[CrossAttnLayer, ...] = backbones.SDXL.layers


def target_of(b: backbones.Backbone) -> "TargetModel":
    """What a style encoder for backbone ``b`` must fit."""
    return TargetModel(b.family, b.label, b.context_dim, b.hidden_sizes)


SD15 = target_of(backbones.SD15)
SDXL = target_of(backbones.SDXL)
SD2 = TargetModel("sd2", "SD2.x", 1024, SD15.hidden_sizes)

TARGETS: dict[str, TargetModel] = {t.family: t for t in (SD15, SD2, SDXL)}


def guess_target(context_dim: int, num_layers: int) -> TargetModel | None:
    """The known model family with this context width and layer count, if any."""
    for target in TARGETS.values():
        if (target.context_dim, target.num_layers) == (context_dim, num_layers):
            return target
    return None
