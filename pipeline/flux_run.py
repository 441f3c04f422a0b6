"""One Flux.1 generation behind :class:`~productbg.pipeline.ProductBGPipeline`: the models on their device with the
joint-confinement processor in every block, the category prompt, the optional Redux reference, the sampler.

The pipeline prepares the product (segment, place, repaint mask) and finishes the images (paste-back, report,
export) as on SD1.5 / SDXL; :meth:`FluxRunner.sample` is what lies between. A category's identifier (or its words,
zero-shot) is confined with ``context`` confinement in every double- and single-stream block; a Redux reference's
tokens (when the parts carry a Redux encoder, :mod:`.flux_redux`) are appended after the T5 prompt and confined to
the background with the same product mask and strength (:class:`~productbg.attention.joint.ReduxStyle`).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..attention import IdentifierGuidance, ProductMask
from ..attention.flux_processor import install_flux_processors
from ..attention.joint import JointCall, ReduxStyle, flux_token_grid
from .errors import PipelineError
from .flux_models import FluxParts
from .flux_prompts import FluxPromptEncoder
from .flux_sampling import FluxSampleInputs, sample_flux

#: The pipeline's one Flux sampler (Euler on the flow-matching ODE, ComfyUI's ``euler`` + ``simple``).
FLUX_SAMPLER = "euler"


class FluxRunner:
    """Flux.1 models ready to sample on ``device``.

    Args:
        parts: the models (:class:`~.flux_models.FluxParts`).
        device: where to run.
    """

    def __init__(self, parts: FluxParts, device: torch.device) -> None:
        self.parts, self.device = parts, device
        for m in parts.models:
            m.to(device).eval().requires_grad_(False)  # .to(device) only: fp8-stored weights stay fp8
        if parts.redux is not None:
            parts.redux.to(device)
        self.blocks = install_flux_processors(parts.transformer)
        self.prompts = FluxPromptEncoder(parts.t5, parts.t5_tokenizer, parts.clip_l, parts.clip_tokenizer,
                                         parts.identifiers)

    def guidance(self, settings: Any) -> float | None:
        """The distilled guidance of a run: the setting, else the table's (Fill 30, dev 3.5); None on schnell."""
        if not self.parts.guidance_embeds:
            return None
        if settings.distilled_guidance is not None:
            return settings.distilled_guidance
        defaults = self.parts.backbone.sampler
        return defaults.inpaint_guidance if self.parts.fill else defaults.guidance

    def check(self, settings: Any) -> None:
        """PipelineError for settings that have no meaning on Flux."""
        w, h = settings.canvas()
        multiple = self.parts.backbone.canvas_multiple
        if w % multiple or h % multiple:
            near = "x".join(str(max(multiple, round(v / multiple) * multiple)) for v in (w, h))
            raise PipelineError(f"canvas {w}x{h}: on Flux.1 both sides must be multiples of {multiple} (8x VAE, then "
                                f"2x2 patches); use e.g. {near}")
        if settings.sampler != FLUX_SAMPLER:
            raise PipelineError(f"--sampler {settings.sampler}: Flux.1 samples with {FLUX_SAMPLER} (flow matching); "
                                f"leave --sampler out")
        if settings.confinement != "context":
            raise PipelineError("--confinement columns does not exist on Flux.1: T5 is bidirectional, so every "
                                "text token carries the identifier; use context")

    def sample(self, prep: Any, category: str | None, reference: Any, seed: int, n: int,
               settings: Any) -> tuple[torch.Tensor, str]:
        """``n`` images ``[n, 3, H, W]`` in 0..1 for a prepared product, and the prompt as written."""
        self.check(settings)
        prompt = self.prompts.encode(category, settings.template, settings.extra_text)
        mask = torch.as_tensor(prep.mask)
        product = ProductMask(mask)
        identifier = None
        if prompt.spec is not None and settings.identifier_strength > 0:
            identifier = IdentifierGuidance(prompt.spec, product, settings.identifier_strength)
        context, style = prompt.context, None
        if reference is not None:
            tokens = self.reference_tokens(reference, settings)
            context = torch.cat([context, tokens.to(context)], dim=1)
            # confined at the identifier's strength (JointCall confines both with one share), fully without one, as
            # Reference Style Redux confines them; --style-weight scales the tokens themselves
            style = ReduxStyle(int(tokens.shape[1]), identifier.strength if identifier else 1.0,
                               product=None if identifier else product)
        h, w = prep.placed.shape[:2]
        call = None
        if identifier is not None or style is not None:
            call = JointCall(identifier, flux_token_grid(h, w), style=style, text_tokens=int(context.shape[1]))
        negative = self.prompts.negative(settings.negative_prompt) if settings.guidance_scale != 1.0 else (None, None)
        inputs = FluxSampleInputs(
            image=torch.as_tensor(np.asarray(prep.placed)).permute(2, 0, 1)[None] * 2 - 1,
            repaint=torch.as_tensor(np.asarray(prep.repaint))[None, None], context=context, pooled=prompt.pooled,
            generators=[torch.Generator().manual_seed(seed + k) for k in range(n)], call=call,
            uncond_context=negative[0], uncond_pooled=negative[1])
        raw = sample_flux(self.parts.transformer, self.parts.vae, inputs, settings.steps, self.guidance(settings),
                          settings.guidance_scale, shift=self.parts.variant != "schnell",
                          noise_mask=settings.noise_mask)
        return raw, prompt.text

    def reference_tokens(self, reference: torch.Tensor, settings: Any) -> torch.Tensor:
        """Redux style tokens ``[1, R, 4096]`` of a reference (``[1, H, W, 3]``, its product already removed)."""
        if self.parts.redux is None:
            raise PipelineError("a reference image on Flux.1 needs Flux Redux: --style-model "
                                "flux1-redux-dev.safetensors --clip-vision sigclip_vision_patch14_384.safetensors "
                                "(or leave --reference out)")
        return self.parts.redux.tokens(reference, settings.style_weight)
