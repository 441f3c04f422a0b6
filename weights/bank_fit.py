"""The one check that a category bank fits a model, for every host (ComfyUI nodes, the pipeline, the CLI).

A bank's identifier vectors live in the text space of the base model family they were made for: an SD1.5
bank's 768-wide CLIP-L vectors mean nothing to SDXL's two encoders, and the reverse. The small self-trained
families (``tiny``, ``tiny-sdxl``) fit the backbone with the same text encoders; their widths are checked when
the vectors are spliced in.
"""
from __future__ import annotations

from ..backbones import BACKBONES, Backbone
from .bank_format import FAMILY_ENCODERS, FREE_WIDTH_FAMILIES


def _a(label: str) -> str:
    """The article for a model label as read aloud ("an SD1.5", "an SDXL", "a Flux.1")."""
    return f"an {label}" if label[:1] in "AEIOUS" else f"a {label}"


def bank_fit_problem(family: str | None, backbone: Backbone, model: str = "MODEL") -> str | None:
    """Why a bank of ``family`` does not fit ``backbone`` (one line naming what to use), or None when it fits.

    Args:
        family: the bank's family (None: identifiers without one, e.g. seeded test vectors — they fit).
        backbone: the model's backbone.
        model: what the user connected, for the message (``MODEL``, ``CLIP``, ``checkpoint``).
    """
    if family is None or family == backbone.family:
        return None
    if family in FREE_WIDTH_FAMILIES:
        wanted = tuple(t.name for t in backbone.bank_encoders)
        if set(FAMILY_ENCODERS[family]) == set(wanted):
            return None
        return (f"this is a {family} bank (vectors for {', '.join(FAMILY_ENCODERS[family])}) but the {model} is "
                f"{backbone.label}, whose text encoders are {', '.join(backbone.encoder_names)}")
    other = BACKBONES.get(family)
    label = other.label if other is not None else family
    wanted = f"{_a(backbone.label)} bank ({' + '.join(t.name for t in backbone.bank_encoders)} vectors)"
    tail = f", or the {model} of {_a(label)} checkpoint" if other is not None else ""
    return f"this is {_a(label)} bank but the {model} is {backbone.label}: use {wanted}{tail}"
