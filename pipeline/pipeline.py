"""``ProductBGPipeline``: the ComfyUI workflow's data flow on diffusers, with the same defaults.

    product photo ─► segment ─► place (fill 0.74, 512², repaint mask = background dilated ≈20 px)
    category ─► identifier prompt ─► positive context + identifier token positions
    reference ─► product removed ─► CLIP vision ─► style tokens
    UNet with mask-guided attention (identifier + style on the background only)
        ─► DDIM 40 steps, CFG 7.5, inpainting ─► VAE decode ─► paste product back ─► preservation report

On SDXL (detected from the checkpoint) the same flow runs at 1024² with both text encoders, SDXL's pooled
text embedding and added time ids, DPM++ 2M Karras 30 steps and CFG 6 (``defaults_for``); ``canvas_size``
gives non-square canvases (``attention.SDXL.canvases["4:5"]`` = 928×1152). On Flux.1 (dev, schnell, Fill; a
:class:`~.flux_models.FluxParts` instead of ``Components``) the middle runs in :class:`~.flux_run.FluxRunner`:
T5-XXL with the identifier spliced in, joint confinement in every block, flow-matching Euler 20 steps with
distilled guidance (Fill 30, dev 3.5), CFG 1.

Example::

    pipe = ProductBGPipeline.from_single_file("sd-v1-5-inpainting.safetensors", bank="bank.safetensors")
    for result in pipe.generate("bottle.png", category="cosmetics", seed=1, n=2):
        save_png(result.image, f"out_{result.seed}.png")
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .. import imaging
from ..attention import CONFINEMENTS, Guidance, IdentifierGuidance, ProductMask, StyleGuidance
from ..attention.diffusers_processor import install_processors
from ..backbones.targets import TARGETS, TargetModel
from ..imaging.fill import fill_product_hwc
from ..weights.bank import load_bank
from ..weights.bank_fit import bank_fit_problem
from ..weights.errors import WeightsError
from ..weights.style_encoder import load_style_encoder, reference_tokens
from .components import (ClipVision, Components, SeededIdentifiers, check_style_fit, load_base, load_clip_vision,
                         merge_lora, tiny_components, cross_attention_widths)
from .errors import PipelineError
from .flux_redux import load_redux
from .flux_files import load_flux, is_flux_file
from .flux_lora import merge_flux_lora
from .flux_models import FluxParts, tiny_flux_parts
from .flux_run import FluxRunner
from .prompts import PromptEncoder
from .sampling import SAMPLERS, SD_SAMPLERS, SampleInputs, make_scheduler, sample_inpaint, upcast_vae, sampler_for
from .upscale import load_upscaler

ImageInput = Any  # a path, an [H, W, 3|4] array / tensor in 0..1, or a Prepared canvas
REFERENCE_GROW = 4
MIN_CANVAS_SIDE = 16
REPORT_THRESHOLDS = imaging.Thresholds(min_psnr_db=20.0, max_delta_e_mean=2.0, max_expansion_ratio=0.05)


@dataclass(frozen=True)
class GenerateSettings:
    """Generation defaults (the paper's inference recipe and the shipped ComfyUI workflow).

    Attributes:
        size: canvas side in pixels (square canvas); :func:`defaults_for` gives the backbone's (512 SD1.5,
            1024 SDXL).
        fill_ratio: the product's bounding box spans this fraction of the canvas.
        inpaint_grow: repaint-mask dilation in pixels at 512 (scaled with the canvas, as Place Product does).
        segmentation: ``imaging.segment_product`` method (``auto``: alpha, else uniform-background key, else GrabCut).
        steps: sampling steps. guidance_scale: classifier-free guidance scale.
        sampler: ``ddim`` (SD1.5's recipe), ``dpmpp_2m_karras`` (SDXL's default) or ``euler`` (Flux.1's, its
            only one).
        distilled_guidance: Flux.1 dev / Fill's distilled guidance (None: the backbone table's, Fill 30, dev 3.5;
            schnell has none).
        canvas_multiple: an export's generation canvas rounds its sides to this (8, the VAE's cell; Flux.1: 16,
            its 2x2 patches of latents).
        canvas_size: ``(width, height)`` of a non-square canvas (each a multiple of 8), e.g. a backbone's
            ``canvases["4:5"]``; None = ``size``² (or the export's aspect).
        identifier_strength: mask-guided attention strength (1 = the identifier never attends on the product).
        confinement: ``context`` (product cells attend to the prompt without the identifier: exactly
            independent of it) or ``columns`` (only the identifier's tokens are masked; an ablation).
        style_weight: reference-style weight. style_layers: ``all`` | ``style`` | ``composition``.
        template: prompt template with ``{id}`` (None = the bank's). extra_text: free words appended.
        negative_prompt: negative prompt.
        feather: outward feather of the paste-back, pixels.
        noise_mask: keep the unmasked latent (ComfyUI's noise mask) after every step.
        report_expansion: also segment each output to measure object expansion, as the shipped workflows do
            (costs a GrabCut per image; ``productbg eval`` measures it afterwards anyway).
        export: ``(width, height)`` of the delivered image, or None (deliver the ``size``² canvas as before).
            With it the canvas has the export's aspect and ``size`` as its longer side; the background is
            generated there, resized up, and the *source* product is composited at the export size.
        export_format: ``png`` | ``jpeg`` | ``webp``. quality: 1..100 for JPEG / WebP (100 = lossless WebP).
        resampler: how the background is enlarged (``lanczos``, ``bicubic``, ``bilinear``).
        upscaler: an upscale-model ``.safetensors`` (ESRGAN-class, via spandrel) run before the resize.

    The defaults are the values of the shipped ComfyUI workflows (``workflows/api``); a test keeps them equal.
    """

    size: int = 512
    fill_ratio: float = imaging.DEFAULT_FILL_RATIO
    inpaint_grow: float = 20.0
    segmentation: str = "auto"
    steps: int = 40
    guidance_scale: float = 7.5
    identifier_strength: float = 1.0
    confinement: str = "context"
    style_weight: float = 0.8
    style_layers: str = "all"
    template: str | None = None
    extra_text: str = "soft studio light, high quality"
    negative_prompt: str = "product, object, text, watermark, blurry, low quality"
    feather: float = 2.0
    noise_mask: bool = True
    report_expansion: bool = False
    export: tuple[int, int] | None = None
    export_format: str = "png"
    quality: int = imaging.export.DEFAULT_QUALITY
    resampler: str = "lanczos"
    upscaler: str | None = None
    sampler: str = "ddim"
    canvas_size: tuple[int, int] | None = None
    distilled_guidance: float | None = None
    canvas_multiple: int = 8

    def __post_init__(self) -> None:
        if self.size < 16 or self.size % 8:
            raise PipelineError(f"size must be a multiple of 8 and at least 16, got {self.size}")
        if self.canvas_size is not None:
            check_canvas(self.canvas_size)
            if self.export is not None:
                raise PipelineError("give a canvas size or an export size, not both (the export's aspect sets the "
                                    "canvas)")
        if self.sampler not in SAMPLERS:
            raise PipelineError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.steps < 1:
            raise PipelineError(f"steps must be at least 1, got {self.steps}")
        if self.canvas_multiple < 8 or self.canvas_multiple % 8:
            raise PipelineError(f"canvas multiple must be a multiple of 8, got {self.canvas_multiple}")
        if self.distilled_guidance is not None and not 0 <= self.distilled_guidance <= 100:
            raise PipelineError(f"distilled guidance must be in [0, 100], got {self.distilled_guidance}")
        if not 0.0 <= self.identifier_strength <= 1.0:
            raise PipelineError(f"identifier strength must be in [0, 1], got {self.identifier_strength}")
        if self.confinement not in CONFINEMENTS:
            raise PipelineError(f"confinement must be one of {', '.join(CONFINEMENTS)}, got {self.confinement!r}")
        try:
            imaging.export.check_format(self.export_format, self.quality)
            if self.export is not None:
                imaging.parse_export_size(f"{self.export[0]}x{self.export[1]}")
        except ValueError as e:
            raise PipelineError(str(e)) from None
        if self.export is not None:
            check_export_canvas(self.export, self.size)
        if self.resampler not in imaging.export.RESAMPLERS:
            raise PipelineError(f"resampler must be one of {', '.join(imaging.export.RESAMPLERS)}")

    def canvas(self) -> tuple[int, int]:
        """The generation canvas (w, h): ``size``², or the export's aspect with ``size`` as its longer side."""
        if self.canvas_size is not None:
            return tuple(self.canvas_size)
        if self.export is None:
            return self.size, self.size
        return imaging.generation_size(self.export, self.size, self.canvas_multiple)


def check_canvas(canvas: tuple[int, int]) -> tuple[int, int]:
    """PipelineError unless both sides of a ``(width, height)`` canvas are multiples of 8 and at least 16."""
    w, h = (int(v) for v in canvas)
    if min(w, h) < MIN_CANVAS_SIDE or w % 8 or h % 8:
        near = "x".join(str(max(16, round(v / 8) * 8)) for v in (w, h))
        raise PipelineError(f"canvas {w}x{h}: width and height must be multiples of 8 and at least 16 (the VAE "
                            f"works on 8-pixel cells); use e.g. {near}")
    return w, h


def check_export_canvas(export: tuple[int, int], size: int) -> tuple[int, int]:
    """The generation canvas of an export (its aspect, ``size`` on the longer side); PipelineError naming the
    ``--size`` that fits when the export is so elongated that a side would fall under 16 px."""
    w, h = imaging.generation_size(export, size)
    if min(w, h) >= MIN_CANVAS_SIDE:
        return w, h
    fits = next((k for k in range(size, 64 * max(export), 8)
                 if min(imaging.generation_size(export, k)) >= MIN_CANVAS_SIDE), None)
    hint = f"use --size {fits} or more, or" if fits else "use"
    raise PipelineError(f"--export {export[0]}x{export[1]} at --size {size} gives a {w}x{h} generation canvas (the "
                        f"export's aspect with --size as its longer side), and both sides must be at least "
                        f"{MIN_CANVAS_SIDE} px: {hint} a less elongated --export")


def defaults_for(backbone: Any, base: "GenerateSettings | None" = None) -> "GenerateSettings":
    """The generation defaults of a backbone: its canvas side and sampler (SD1.5: unchanged, 512², DDIM 40,
    CFG 7.5; SDXL: 1024², DPM++ 2M Karras 30 steps, CFG 6; Flux.1: 1024², Euler 20 steps, CFG 1, no negative
    prompt, Redux weight 1)."""
    b = backbone
    s = replace(base or GenerateSettings(), size=b.default_size, steps=b.sampler.steps,
                guidance_scale=b.sampler.cfg, sampler=sampler_for(b.sampler.sampler_name, b.sampler.scheduler))
    if b.style == "redux":  # Redux's weight scales its tokens: StyleModelApply's (and Reference Style Redux's) 1
        s = replace(s, style_weight=1.0)
    if b.sampler.cfg == 1.0:  # no negative row at CFG 1: the workflows leave the negative prompt empty
        s = replace(s, negative_prompt="")
    if b.kind == "dit":  # latents packed in 2x2 patches: export canvases on the table's multiple
        s = replace(s, canvas_multiple=b.canvas_multiple)
    return s


@dataclass
class Prepared:
    """A product placed on its canvas (what sampling and paste-back work on).

    Attributes:
        placed: ``[H, W, 3]`` float32 canvas with the product. mask: ``[H, W]`` product mask (1 = product).
        repaint: ``[H, W]`` binary inpaint mask (1 = regenerate). source: where it came from.
        product, product_mask: the segmented product at its native resolution (what the export composites).
        layout: the :class:`~productbg.imaging.layout.Layout` in the export frame (or the canvas without one).
        input: what reading the photo did (orientation, ICC conversion …; ``imaging.read_image_file``).
    """

    placed: np.ndarray
    mask: np.ndarray
    repaint: np.ndarray
    source: str = ""
    product: np.ndarray | None = None
    product_mask: np.ndarray | None = None
    layout: imaging.Layout | None = None
    input: dict = field(default_factory=dict)


@dataclass
class Result:
    """One generated image.

    Attributes:
        image: ``[S, S, 3]`` float32 final image (product pasted back; its core equals ``placed`` bit for bit).
        raw: the generator's image before paste-back. placed, mask, repaint: from :class:`Prepared`.
        seed: this image's seed. category: the category used (None = none). prompt: the positive prompt.
        report: ``imaging.preservation_report`` of the image (the export's, measured on the delivered file,
            when there is an export; the generation canvas's is then ``canvas_report``).
        export: the delivered :class:`~productbg.imaging.export.Export` (None without ``settings.export``).
        input: what reading the product photo did.
    """

    image: np.ndarray
    raw: np.ndarray
    placed: np.ndarray
    mask: np.ndarray
    repaint: np.ndarray
    seed: int
    category: str | None
    prompt: str
    report: dict = field(default_factory=dict)
    export: imaging.Export | None = None
    canvas_report: dict | None = None
    input: dict = field(default_factory=dict)


class ProductBGPipeline:
    """Product backgrounds from category identifiers and reference style on a Stable Diffusion backbone.

    Args:
        components: the models (:class:`~productbg.pipeline.components.Components`).
        settings: generation defaults (overridable per call); None = the backbone's (:func:`defaults_for`).
        device: where to run (default: CUDA when available, else CPU).
    """

    def __init__(self, components: Components | FluxParts, settings: GenerateSettings | None = None,
                 device: str | torch.device | None = None) -> None:
        self.components = components
        self.backbone = components.backbone
        self.settings = settings if settings is not None else defaults_for(self.backbone)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        check_bank_fit(components.identifiers, self.backbone)
        self.flux: FluxRunner | None = None
        if isinstance(components, FluxParts):
            self.flux = FluxRunner(components, self.device)
            self.prompts = self.flux.prompts
            return
        for m in (components.unet, components.vae, *components.text_encoders):
            m.to(self.device).eval().requires_grad_(False)
        upcast_vae(components.vae)  # SDXL's VAE overflows in float16: float32 when its config says force_upcast
        if components.image_encoder is not None:
            components.image_encoder.model.to(self.device)
        if components.style_encoder is not None:
            check_style_fit(components.style_encoder, components.unet, components.image_encoder)
            components.style_encoder.to(self.device, components.unet.dtype)  # K/V in the UNet's dtype
        self.cross_attention_layers = install_processors(components.unet)
        layers = None if components.text_encoder_2 is None else tuple(t.layer for t in self.backbone.text_encoders)
        self.prompts = PromptEncoder(components.tokenizer, components.text_encoder, components.identifiers,
                                     components.tokenizer_2, components.text_encoder_2, layers)

    # ------------------------------------------------------------------ construction
    @classmethod
    def tiny(cls, inpaint: bool = True, style: bool = True, seed: int = 0, family: str = "sd15",
             **kwargs: Any) -> "ProductBGPipeline":
        """The tiny random models (CPU tests, plumbing checks); see :func:`components.tiny_components`
        (``family="sdxl"``: the SDXL-shaped set; ``family="flux"``: :func:`~.flux_models.tiny_flux_parts`, Fill
        when ``inpaint`` else dev, with seeded ``t5xxl`` identifiers). Settings default to SD1.5's (a 512²
        canvas) for SD1.5 and SDXL, to Flux's sampler at 512² for Flux."""
        if family == "flux":
            parts = tiny_flux_parts("fill" if inpaint else "dev", seed)
            width = int(parts.t5.get_input_embeddings().weight.shape[1])
            parts.identifiers = SeededIdentifiers(width, widths={"t5xxl": width})
            kwargs.setdefault("settings", replace(defaults_for(parts.backbone), size=GenerateSettings.size))
            return cls(parts, **kwargs)
        kwargs.setdefault("settings", GenerateSettings())
        return cls(tiny_components(inpaint, style, seed, family), **kwargs)

    @classmethod
    def from_single_file(cls, checkpoint: str | os.PathLike, *, config_dir: str | os.PathLike | None = None,
                         **kwargs: Any) -> "ProductBGPipeline":
        """Load an SD1.5 / SDXL (or inpainting) or Flux.1 ``.safetensors`` checkpoint offline, plus optional extras.

        Args:
            checkpoint: the single-file checkpoint (ComfyUI's ``models/checkpoints`` files), or a Flux.1
                transformer (``models/diffusion_models``); the backbone is detected from its keys.
            config_dir: component configs (default: the set shipped in ``assets/sd15``, ``assets/sdxl`` or
                ``assets/flux``).
            **kwargs: ``bank``, ``style_encoder``, ``clip_vision``, ``loras``, ``dtype``, ``settings``, ``device``
                (see :meth:`from_components`); Flux.1 also takes ``t5``, ``clip_l``, ``vae`` (its companion files,
                default: found beside the transformer in ComfyUI's models tree; :func:`~.flux_files.load_flux`).
        """
        dtype = kwargs.pop("dtype", None)
        companions = {k: kwargs.pop(k, None) for k in ("t5", "clip_l", "vae")}
        if is_flux_file(checkpoint):
            return cls.from_components(load_flux(checkpoint, dtype=dtype, device=kwargs.get("device"),
                                                 config_dir=config_dir, **companions), **kwargs)
        given = [f"--{k.replace('_', '-')}" for k, v in companions.items() if v is not None]
        if given:
            raise PipelineError(f"{given[0]} is a Flux.1 companion file; {Path(checkpoint).name} is no Flux.1 model")
        return cls.from_components(load_base(checkpoint, config_dir, dtype or torch.float32), **kwargs)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **kwargs: Any) -> "ProductBGPipeline":
        """Load a diffusers Stable Diffusion folder (offline) plus optional extras; see :meth:`from_single_file`."""
        dtype = kwargs.pop("dtype", torch.float32)
        if not Path(folder).is_dir():
            raise PipelineError(f"{folder}: not a folder (for a single .safetensors file use from_single_file)")
        return cls.from_components(load_base(folder, None, dtype), **kwargs)

    @classmethod
    def from_components(cls, components: Components | FluxParts, *, bank: str | os.PathLike | None = None,
                        style_encoder: str | os.PathLike | None = None,
                        clip_vision: str | os.PathLike | ClipVision | None = None,
                        loras: Sequence[tuple[str | os.PathLike, float]] = (), redux: Any = None,
                        style_model: str | os.PathLike | None = None, **kwargs: Any) -> "ProductBGPipeline":
        """Add bank / style encoder / CLIP vision / LoRA files to loaded components and build the pipeline
        (Flux.1: ``redux``, a :class:`~.flux_redux.ReduxEncoder` for reference images, or ``style_model`` +
        ``clip_vision``, the Redux and SigLIP files it is read from; ``loras`` merge through
        :func:`~.flux_lora.merge_flux_lora`)."""
        if isinstance(components, FluxParts):
            if style_encoder is not None:
                raise PipelineError("--style-encoder does not go with a Flux.1 model (IP-Adapter style encoders are "
                                    "SD1.5 / SDXL files; Flux's reference style is Redux: --style-model and "
                                    "--clip-vision)")
            if (style_model is None) != (clip_vision is None):
                raise PipelineError("Flux Redux needs both files: --style-model flux1-redux-dev.safetensors and "
                                    "--clip-vision sigclip_vision_patch14_384.safetensors")
            if style_model is not None:
                redux = load_redux(style_model, clip_vision)
            components.redux = redux if redux is not None else components.redux
            clip_vision = None
        elif redux is not None or style_model is not None:
            raise PipelineError(f"Flux Redux (--style-model) goes with a Flux.1 model; this is "
                                f"{components.backbone.label}: use --style-encoder (an IP-Adapter) there")
        try:
            if bank is not None:
                components.identifiers = load_bank(bank)
                check_bank_fit(components.identifiers, components.backbone)
            if clip_vision is not None:
                components.image_encoder = (clip_vision if isinstance(clip_vision, ClipVision)
                                            else load_clip_vision(clip_vision))
            if style_encoder is not None:
                components.style_encoder = load_style_encoder(style_encoder, style_target(components))
        except WeightsError as e:
            raise PipelineError(str(e)) from None
        merge = merge_flux_lora if isinstance(components, FluxParts) else merge_lora
        for path, strength in loras:
            merge(components, path, strength)
        return cls(components, **kwargs)

    # ------------------------------------------------------------------ preparing inputs
    def prepare(self, product: ImageInput, settings: GenerateSettings | None = None) -> Prepared:
        """Segment a product photo and place it on the canvas (no-op for a :class:`Prepared`)."""
        if isinstance(product, Prepared):
            return product
        s = settings or self.settings
        rgba, source, info = read_image(product, with_info=True)
        canvas = s.canvas()
        try:
            seg = imaging.segment_product(rgba, s.segmentation)
            layout = imaging.plan_layout(seg.mask, s.export or canvas, s.fill_ratio)
            placement = imaging.place_at(seg.image, seg.mask, layout if s.export is None else layout.at(canvas),
                                         inpaint_grow=imaging.inpaint_grow_pixels(*canvas, s.inpaint_grow))
        except ValueError as e:
            raise PipelineError(f"{source or 'product'}: {e}") from None
        check_placement(placement.mask, layout, s, source)
        keep = s.export is not None
        return Prepared(np.asarray(placement.image, np.float32), np.asarray(placement.mask, np.float32),
                        np.asarray(placement.inpaint_mask, np.float32), source,
                        np.asarray(seg.image, np.float32) if keep else None,
                        np.asarray(seg.mask, np.float32) if keep else None, layout, info)

    def style_guidance(self, reference: ImageInput, mask: np.ndarray, settings: GenerateSettings) -> StyleGuidance:
        """Style tokens of a reference image (its own product removed), confined to the product's background."""
        c = self.components
        if c.style_encoder is None or c.image_encoder is None:
            raise PipelineError("a reference image needs a style encoder and its CLIP vision model "
                                "(--style-encoder and --clip-vision)")
        image, source = self.reference_image(reference, settings)
        if settings.style_layers not in self.backbone.presets:
            raise PipelineError(f"style layers must be one of {', '.join(self.backbone.presets)}")
        try:
            cond, uncond = reference_tokens(c.style_encoder, c.image_encoder, image)
        except ValueError as e:
            raise PipelineError(f"reference {source}: {e}") from None
        return StyleGuidance(cond, uncond, c.style_encoder.layer_kv, settings.style_weight,
                             self._layer_weights(settings.style_layers), product=ProductMask(torch.as_tensor(mask)))

    def reference_image(self, reference: ImageInput, settings: GenerateSettings) -> tuple[torch.Tensor, str]:
        """A reference as ``[1, H, W, 3]`` on the device with its own product filled in (as the shipped workflows
        do: its product mask grown by 4 px, edges left as they are), and its name for messages."""
        rgba, source = read_image(reference)
        try:
            seg = imaging.segment_product(rgba, settings.segmentation, grow=REFERENCE_GROW, clean_edges=False)
        except ValueError as e:
            raise PipelineError(f"reference {source}: {e}") from None
        image = torch.as_tensor(np.asarray(seg.image, np.float32))[None].to(self.device)
        ref_mask = torch.as_tensor(np.asarray(seg.mask, np.float32))[None].to(self.device)
        return fill_product_hwc(image, ref_mask), source

    def _layer_weights(self, preset: str) -> tuple[float, ...]:
        """A style preset's per-layer weights for this UNet (the backbone's table; every layer for ``all``, so
        the SDXL-shaped tiny model, with fewer layers, works too)."""
        n = len(self.cross_attention_layers)
        if preset == "all" or n != self.backbone.num_layers:
            return (1.0,) * n
        return self.backbone.layer_weights(preset)

    # ------------------------------------------------------------------ generation
    def generate(self, product: ImageInput, category: str | None = None, reference: ImageInput | None = None,
                 seed: int = 0, n: int = 1, **overrides: Any) -> list[Result]:
        """Generate ``n`` backgrounds for one product (seeds ``seed`` … ``seed + n − 1``).

        Args:
            product: a path, an ``[H, W, 3|4]`` image in 0..1 (alpha = product), or a :class:`Prepared`.
            category: category name (bank lookup, or zero-shot words without a bank); None = none.
            reference: optional image whose background style to take.
            seed: seed of the first image.
            n: number of images.
            **overrides: fields of :class:`GenerateSettings` for this call.

        Returns:
            ``n`` :class:`Result` objects.
        """
        s = replace(self.settings, **overrides) if overrides else self.settings
        if n < 1:
            raise PipelineError(f"n must be at least 1, got {n}")
        prep = self.prepare(product, s)
        if s.export is not None:
            self.upscaler(s.upscaler)  # loaded (and checked) before anything is sampled
        if self.flux is not None:
            image = None if reference is None else self.reference_image(reference, s)[0]
            raw, text = self.flux.sample(prep, category, image, seed, n, s)
            return [self._finish(raw[k], prep, seed + k, category, text, s) for k in range(n)]
        if s.sampler not in SD_SAMPLERS:
            raise PipelineError(f"sampler {s.sampler!r} is Flux.1's; on {self.backbone.label} use "
                                f"{' or '.join(SD_SAMPLERS)}")
        prompt = self.prompts.encode(category, s.template, s.extra_text)
        guidance = self._guidance(prompt.spec, prep, reference, s)
        inputs = SampleInputs(
            image=torch.as_tensor(prep.placed).permute(2, 0, 1)[None] * 2 - 1,
            repaint=torch.as_tensor(prep.repaint)[None, None], cond=prompt.cond,
            uncond=self.prompts.negative(s.negative_prompt), guidance=guidance,
            generators=[torch.Generator().manual_seed(seed + k) for k in range(n)],
            pooled=prompt.pooled, uncond_pooled=self.prompts.negative_pooled(s.negative_prompt))
        c = self.components
        raw = sample_inpaint(c.unet, c.vae, make_scheduler(c.scheduler_config, s.steps, s.sampler), inputs,
                             s.guidance_scale, s.noise_mask)
        return [self._finish(raw[k], prep, seed + k, category, prompt.text, s) for k in range(n)]

    __call__ = generate

    def _guidance(self, spec, prep: Prepared, reference: ImageInput | None, s: GenerateSettings) -> Guidance:
        guidance = Guidance()
        mask = torch.as_tensor(prep.mask)
        if spec is not None and s.identifier_strength > 0:
            guidance = guidance.with_identifier(IdentifierGuidance(spec, ProductMask(mask), s.identifier_strength,
                                                                   confinement=s.confinement))
        if reference is not None:
            guidance = guidance.with_style(self.style_guidance(reference, prep.mask, s))
        return guidance

    def _finish(self, raw: torch.Tensor, prep: Prepared, seed: int, category: str | None, prompt: str,
                s: GenerateSettings) -> Result:
        generated = raw.permute(1, 2, 0).cpu().numpy().astype(np.float32)
        if not np.isfinite(generated).all():  # written as-is, NaN would be black pixels
            raise PipelineError("the model produced NaN or infinite pixels (a numeric overflow, e.g. in float16): "
                                "rerun with --dtype fp32")
        final = np.asarray(imaging.composite_product(generated, prep.placed, prep.mask, s.feather), np.float32)
        output_mask = None
        if s.report_expansion:  # the output's product found by GrabCut seeded with the input's, as the node does
            output_mask = np.asarray(imaging.grabcut(final, prep.mask), np.float32)
        report = imaging.preservation_report(prep.placed, prep.mask, final, generated_image=generated,
                                             output_mask=output_mask, thresholds=REPORT_THRESHOLDS)
        result = Result(final, generated, prep.placed, prep.mask, prep.repaint, seed, category, prompt, report,
                        input=prep.input)
        if s.export is not None:
            result.export = self._export(generated, prep, s, output_mask)
            result.canvas_report, result.report = report, result.export.report
        return result

    def _export(self, generated: np.ndarray, prep: Prepared, s: GenerateSettings,
                output_mask: np.ndarray | None) -> imaging.Export:
        """The delivered image: background up to the export size, the native product composited on it."""
        if prep.product is None or prep.layout is None:
            raise PipelineError("this Prepared has no native product: prepare it with the export settings")
        k = max(s.export) / max(s.canvas())
        try:
            return imaging.assemble_export(generated, prep.product, prep.product_mask, prep.layout, s.export,
                                           s.export_format, s.quality, feather=s.feather * k,
                                           method=s.resampler, upscaler=self.upscaler(s.upscaler),
                                           thresholds=REPORT_THRESHOLDS, output_mask=output_mask)
        except ValueError as e:
            raise PipelineError(f"{prep.source or 'product'}: export: {e}") from None

    def upscaler(self, path: str | None):
        """The upscale model of ``path`` (loaded once and kept), or None."""
        if path is None:
            return None
        cache = self.__dict__.setdefault("_upscalers", {})
        if path not in cache:
            cache[path] = load_upscaler(path, self.device)
        return cache[path]


def check_placement(mask: np.ndarray, layout: imaging.Layout, s: GenerateSettings, source: str) -> None:
    """PipelineError, before anything is sampled, when the placed product covers no pixel of the generation
    canvas (or, with an export, is smaller than a pixel of it), naming the settings to raise."""
    where = f"{source or 'product'}: at --fill {s.fill_ratio:g} the product"
    if not (np.asarray(mask) >= 0.5).any():
        w, h = s.canvas()
        raise PipelineError(f"{where} covers no whole pixel of the {w}x{h} generation canvas: raise --fill or "
                            "--size")
    if s.export is not None and min(layout.box()[2:]) < 1:
        raise PipelineError(f"{where} is smaller than a pixel of the {s.export[0]}x{s.export[1]} export: raise "
                            "--fill, or export larger")


def style_target(components: Components):
    """What a style encoder must fit: the backbone's table when the UNet has its shapes (messages then name
    SD1.5 / SDXL), else this UNet's own layers (tiny and custom models)."""
    unet = components.unet
    widths, context = cross_attention_widths(unet), int(unet.config.cross_attention_dim)
    target = TARGETS[components.family]
    if (target.context_dim, target.hidden_sizes) == (context, widths):
        return target
    return TargetModel(components.family, "this UNet", context, widths)


def check_bank_fit(identifiers: Any, backbone: Any) -> None:
    """PipelineError when a category bank was made for another backbone than the model's
    (:func:`productbg.weights.bank_fit.bank_fit_problem`, the check every host shares)."""
    problem = bank_fit_problem(getattr(identifiers, "family", None), backbone, "checkpoint")
    if problem is not None:
        raise PipelineError(problem)


def read_image(image: ImageInput, with_info: bool = False):
    """An ``[H, W, 3|4]`` float32 array (alpha appended when the file has one) and a name for messages (and,
    with ``with_info``, what reading did: orientation, ICC conversion …; ``{}`` for arrays)."""
    if isinstance(image, (str, os.PathLike)):
        try:
            loaded = imaging.read_image_file(image)
        except (imaging.ProductFolderError, OSError) as e:
            raise PipelineError(str(e)) from None
        rgb, alpha = loaded.rgb, loaded.alpha
        arr = np.concatenate([rgb, alpha[..., None]], -1) if alpha is not None else rgb
        return (arr, str(image), loaded.info) if with_info else (arr, str(image))
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise PipelineError(f"an image must be [H, W, 3|4], got shape {tuple(arr.shape)}")
    return (arr.astype(np.float32), "", {}) if with_info else (arr.astype(np.float32), "")
