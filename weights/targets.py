"""The cross-attention layers of the base models our weight files plug into.

IP-Adapter files number their per-layer K/V ``ip_adapter.<n>`` with odd ``n`` because the original code
enumerated *all* attention processors of a diffusers UNet (self-attention ``attn1`` at even positions,
cross-attention ``attn2`` at odd ones) in ``unet.attn_processors`` order: down blocks, up blocks, mid block.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CrossAttnLayer:
    """One cross-attention layer of a UNet.

    Attributes:
        index: position among the cross-attention layers (0-based, IP-Adapter order).
        file_index: ``n`` in IP-Adapter keys ``ip_adapter.<n>.to_k_ip.weight`` (= 2·index + 1).
        diffusers_name: module path of the attention, e.g. ``down_blocks.0.attentions.0.transformer_blocks.0.attn2``.
        comfy_key: ComfyUI block key for ``set_model_attn2_replace``, e.g. ``("input", 1)``.
        hidden_size: the layer's query width (output width of its K/V projections).
    """

    index: int
    file_index: int
    diffusers_name: str
    comfy_key: tuple[str, int]
    hidden_size: int


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


def _sd15_layers() -> tuple[CrossAttnLayer, ...]:
    specs: list[tuple[str, tuple[str, int], int]] = []
    down = [(0, 320), (1, 640), (2, 1280)]
    for block, width in down:
        for a in range(2):
            specs.append((f"down_blocks.{block}.attentions.{a}", ("input", 1 + 3 * block + a), width))
    for block, width in [(1, 1280), (2, 640), (3, 320)]:
        for a in range(3):
            specs.append((f"up_blocks.{block}.attentions.{a}", ("output", 3 * block + a), width))
    specs.append(("mid_block.attentions.0", ("middle", 0), 1280))
    return tuple(
        CrossAttnLayer(i, 2 * i + 1, f"{path}.transformer_blocks.0.attn2", key, width)
        for i, (path, key, width) in enumerate(specs)
    )


#: SD1.5's 16 cross-attention layers in IP-Adapter / diffusers ``attn_processors`` order.
SD15_LAYERS: tuple[CrossAttnLayer, ...] = _sd15_layers()

SD15 = TargetModel("sd15", "SD1.5", 768, tuple(layer.hidden_size for layer in SD15_LAYERS))

#: SDXL base: 70 cross-attention layers (2+2 transformer depth 2 and 10 in the 640/1280 blocks).
SDXL = TargetModel("sdxl", "SDXL", 2048, (640,) * 4 + (1280,) * 20 + (1280,) * 30 + (640,) * 6 + (1280,) * 10)

SD2 = TargetModel("sd2", "SD2.x", 1024, SD15.hidden_sizes)

TARGETS: dict[str, TargetModel] = {t.family: t for t in (SD15, SD2, SDXL)}


def guess_target(context_dim: int, num_layers: int) -> TargetModel | None:
    """The known model family with this context width and layer count, if any."""
    for target in TARGETS.values():
        if (target.context_dim, target.num_layers) == (context_dim, num_layers):
            return target
    return None
