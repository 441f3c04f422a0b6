"""Category-Wise Generator on Flux.1 (dev, schnell, Fill): ``train-cg`` with a Flux model.

What trains: every category's identifier vectors in **T5-XXL's input-embedding space** (4096 wide), at the slot
ComfyUI's Category Prompt splices them into (the T5 sentinel ``<extra_id_0>``, one token per vector), read through
the frozen T5; and **one LoRA on the transformer**. The text every block attends to is T5's last hidden state of
the category's prompt (padded to at least :data:`~productbg.pipeline.flux_models.T5_MIN_LENGTH` tokens, ComfyUI's
``min_length``, with T5's pad); the pooled CLIP-L vector is the identifier-free prompt's (CLIP-L only pools on Flux,
and the pooled vector modulates every token: it must not carry the identifier), a constant.

Confinement: :func:`~productbg.attention.flux_processor.install_flux_processors` in every double and single block,
a :class:`~productbg.attention.joint.JointCall` per batch (``context`` confinement — T5 is bidirectional, so every
text token carries the identifier and column masks cannot confine it): product image queries attend to
``[identifier-free text ; image]``, background queries to ``[full text ; image]``, edge cells blend. With a block's
inputs held fixed its product cells do not depend on the identifier, so product pixels give the identifier vectors
exactly zero gradient through that block's attention. Image-to-image attention still mixes product and background
from one block to the next (as self-attention does on UNets), so the whole model's product output depends on the
identifier once there is more than one block; with one block it does not (tests/test_training_flux.py).

The objective is rectified flow, as Flux was trained: ``x_t = (1 − t)·x0 + t·noise``, the transformer predicts the
velocity ``noise − x0`` from the packed 2×2 latents (normalised by 0.3611 / 0.1159), ``img_ids`` / ``txt_ids``
(zeros), the timestep ``t`` and, on dev and Fill, the distilled guidance (the backbone's published value: 3.5 for
dev, 30 for Fill; schnell has no guidance input). **Timesteps** (our choice; Flux's training sampler is not
published): ``t = sigmoid(n)``, ``n ~ N(0, 1)`` (the logit-normal of SD3, which Flux follows), then on dev and
Fill Flux's resolution-dependent time shift ``e^mu / (e^mu + 1/t − 1)`` with the ``mu`` their sampler uses at the
training resolution (:func:`~productbg.pipeline.flux_latents.time_shift_mu`), so training weighs the noise levels
inference visits; schnell's sampler is not shifted, nor are its training times. The loss is the latent-cell MSE,
background cells weighed by ``background_loss_weight``, as on UNets.

Flux Fill reads ``[noisy ; masked image ; folded repaint mask]`` per token; the kept region is the product mask
grown or shrunk by a random radius (``mask_jitter``), the repaint region the rest, as for SD inpainting UNets.

Every random draw takes the step's generator in the order VAE sample, noise, timesteps, mask jitter, so a step is a
pure function of the weights, the batch and the generator: :mod:`.engine` resumes bit-exactly after a SIGKILL.

Outputs: ``category_bank.safetensors`` (family ``flux``, ``t5xxl`` vectors) and ``transformer_lora.safetensors`` in
the diffusers layout ``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` — the names ComfyUI's
``comfy.lora.model_lora_keys_unet`` maps for Flux (``to_q`` / ``to_k`` / ``to_v`` onto slices of the fused ``qkv`` /
``linear1``) and diffusers' ``FluxPipeline.load_lora_weights`` reads; ``alpha / rank`` is folded into ``lora_B``
(no ``.alpha`` keys), so every loader applies the same scale.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..attention import IdentifierGuidance, IdentifierSpec, ProductMask
from ..attention.flux_processor import confined_inputs, install_flux_processors
from ..attention.joint import JointCall, flux_token_grid
from ..backbones import FLUX
from ..pipeline.flux_latents import (fill_conditioning, image_seq_len, latent_image_ids, normalize_latents,
                                     pack_latents, time_shift, time_shift_mu, unpack_latents)
from ..pipeline.flux_files import load_flux
from ..pipeline.flux_models import T5_MIN_LENGTH, FluxParts, tiny_flux_parts
from ..pipeline.text import T5_SLOT
from ..weights.bank import CategoryBank
from ..weights.safefile import atomic_save
from .cg import _restrict, _start_bank
from .datasets import ImageMaskDataset, open_bg60k
from .diffusion import jitter_masks, loss_weights
from .outputs import peft_lora_modules
from .state import load_trainables

BANK_FILE = "category_bank.safetensors"
LORA_FILE = "transformer_lora.safetensors"
#: T5-XXL's width: a ``flux`` bank's vectors.
T5_WIDTH = 4096
#: LoRA targets: every attention projection of the double blocks — the image stream's q/k/v/out and the text
#: stream's (``add_*_proj``, ``to_add_out``: the identifier lives in the text stream) — and of the single blocks,
#: whose q/k/v are slices of ComfyUI's fused ``linear1`` and whose attention output projection is ``proj_out``
#: (ComfyUI's ``linear2``, shared with the MLP output: Flux fuses them). The MLPs and modulations stay frozen.
DOUBLE_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                  "attn.add_v_proj", "attn.to_add_out")
SINGLE_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_out")
#: ``--model`` names of the tiny random Flux sets (CPU tests): name -> variant.
TINY_FLUX = {"tiny-flux": "dev", "tiny-flux-fill": "fill", "tiny-flux-schnell": "schnell"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def lora_targets(transformer: nn.Module) -> list[str]:
    """Full module names of the LoRA targets (:data:`DOUBLE_TARGETS`, :data:`SINGLE_TARGETS`) of every block."""
    names = [f"transformer_blocks.{i}.{t}" for i in range(len(transformer.transformer_blocks)) for t in DOUBLE_TARGETS]
    names += [f"single_transformer_blocks.{i}.{t}" for i in range(len(transformer.single_transformer_blocks))
              for t in SINGLE_TARGETS]
    return names


def load_flux_parts(model: str, dtype: torch.dtype, companions: dict[str, str] | None = None,
                    config_dir: str | Path | None = None) -> FluxParts:
    """The Flux set ``train-cg --model`` names, its weights in ``dtype``: a tiny random one (:data:`TINY_FLUX`), or a
    Flux file (:func:`~productbg.pipeline.flux_files.load_flux`: a bundled single file, or a transformer whose T5-XXL,
    CLIP-L and VAE are ``companions`` — ``{"t5": path, "clip_l": path, "vae": path}`` — or found beside it; an fp8
    file's linear weights stay fp8, cast per layer; ``config_dir``: configs for a custom-size model)."""
    if model in TINY_FLUX:
        parts = tiny_flux_parts(TINY_FLUX[model], t5_width=T5_WIDTH)  # T5-XXL's width: real flux banks
        for m in parts.models:
            m.to(dtype)
        return parts
    return load_flux(model, dtype=dtype, config_dir=config_dir, **(companions or {}))


# ---------------------------------------------------------------------------------------------- prompts
@dataclass
class FluxPrompts:
    """Every category's T5 prompt, where its identifier vectors go, and the identifier-free prompts.

    Attributes:
        ids: ``[categories + 1, L]`` T5 token ids, each category's prompt with one ``<extra_id_0>`` per vector,
            then the empty prompt; T5's end token, then its pad (0) up to L tokens (ComfyUI's T5 tokenization).
        slots: ``[categories + 1, L]`` the flat index (``category · vectors + j``) of the identifier vector at each
            slot, −1 elsewhere.
        plain_ids: ``[1, L]`` the template without the identifier (the slots removed, pad at the end: what
            Category Prompt makes of the prompt for the free stream).
        clip_plain, clip_empty: ``[1, 77]`` CLIP-L ids of the identifier-free prompt (the template with ``{id}``
            removed, as Category Prompt pools it) and of the empty prompt.
        positions: the first category's slot positions (every category's when all have the same count).
    """

    ids: torch.Tensor
    slots: torch.Tensor
    plain_ids: torch.Tensor
    clip_plain: torch.Tensor
    clip_empty: torch.Tensor
    positions: tuple[int, ...]

    @property
    def length(self) -> int:
        """L, the T5 tokens of every prompt."""
        return int(self.ids.shape[1])


def t5_ids(tokenizer, text: str) -> list[int]:
    """T5 token ids of ``text`` as ComfyUI's Flux tokenizer makes them before padding: the pieces, then ``</s>``."""
    return list(tokenizer(text).input_ids)


def flux_prompts(t5_tokenizer, clip_tokenizer, template: str, counts: Sequence[int],
                 min_length: int = T5_MIN_LENGTH) -> FluxPrompts:
    """The :class:`FluxPrompts` of categories with ``counts[c]`` vectors each (``vectors`` = ``max(counts)``).

    Raises:
        ValueError: a template without ``{id}`` (or with it twice), or one that holds ``<extra_id_0>`` itself.
    """
    if template.count("{id}") != 1:
        raise ValueError(f"the template must contain {{id}} exactly once: {template!r}")
    if T5_SLOT in template:
        raise ValueError(f"do not use {T5_SLOT!r} in the template: it is the identifier's slot")
    slot_id = t5_tokenizer.convert_tokens_to_ids(T5_SLOT)
    per = max(counts)
    rows, slots, positions = [], [], []
    for c, n in enumerate(counts):
        ids = t5_ids(t5_tokenizer, template.replace("{id}", " ".join([T5_SLOT] * n)))
        where = [i for i, t in enumerate(ids) if t == slot_id]
        if len(where) != n:
            raise ValueError(f"the template's T5 tokens hold {len(where)} identifier slots, expected {n}")
        rows.append(ids)
        slots.append({p: c * per + j for j, p in enumerate(where)})
        positions.append(tuple(where))
    rows.append(t5_ids(t5_tokenizer, ""))
    slots.append({})
    length = max(min_length, max(len(r) for r in rows))
    pad = t5_tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows], dtype=torch.long)
    slot_index = torch.full(ids.shape, -1, dtype=torch.long)
    for r, s in enumerate(slots):
        for p, j in s.items():
            slot_index[r, p] = j
    first = ids[0].tolist()
    kept = [t for i, t in enumerate(first) if i not in set(positions[0])]
    plain = torch.tensor([kept + [pad] * (length - len(kept))], dtype=torch.long)

    def clip_ids(text: str) -> torch.Tensor:
        return clip_tokenizer(text, padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids

    return FluxPrompts(ids, slot_index, plain, clip_ids(template.replace("{id}", "").strip()), clip_ids(""),
                       positions[0])


class T5Identifiers(nn.Module):
    """Trainable identifier vectors spliced into a frozen T5's input embeddings at the prompts' slots.

    Args:
        t5: transformers ``T5EncoderModel`` (frozen).
        prompts: the prompts (:class:`FluxPrompts`).
        init: ``[categories, vectors, width]`` starting vectors.
    """

    def __init__(self, t5: nn.Module, prompts: FluxPrompts, init: torch.Tensor) -> None:
        super().__init__()
        width = int(t5.get_input_embeddings().weight.shape[1])
        if init.shape[-1] != width:
            raise ValueError(f"identifier vectors are {init.shape[-1]} wide, this T5 takes {width}")
        self.t5 = t5
        self.shape = tuple(init.shape)
        self.vectors = nn.Parameter(init.detach().reshape(-1, width).float().clone())
        self.register_buffer("ids", prompts.ids, persistent=False)
        self.register_buffer("slots", prompts.slots, persistent=False)

    def identifier_vectors(self) -> torch.Tensor:
        """``[categories, vectors, width]`` current vectors."""
        return self.vectors.view(*self.shape)

    def embed(self, ids: torch.Tensor, slots: torch.Tensor | None = None) -> torch.Tensor:
        """T5 input embeddings of ``ids`` [B, L] (float32 values of the model's table), the identifier vectors at
        ``slots`` (>= 0)."""
        table = self.t5.get_input_embeddings()
        x = table(ids.to(table.weight.device)).float()
        x = torch.nan_to_num(x)  # ComfyUI's T5.forward does the same to an fp8 table's lookup
        if slots is None:
            return x
        sel = (slots >= 0).to(x.device)[..., None]
        rows = self.vectors[slots.clamp(min=0).to(self.vectors.device)].to(x.device)
        return torch.where(sel, rows, x)

    def encode_embeds(self, x: torch.Tensor) -> torch.Tensor:
        """T5's last hidden state of input embeddings ``x`` [B, L, width] (no attention mask: ComfyUI's Flux T5
        attends to its padding too)."""
        dtype = next(p.dtype for p in self.t5.parameters() if p.is_floating_point() and p.dtype.itemsize > 1)
        return self.t5(inputs_embeds=x.to(dtype)).last_hidden_state

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        """``[B, L, width]`` T5 context of prompt rows (category indices; the last row is the empty prompt)."""
        rows = rows.to(self.ids.device)
        return self.encode_embeds(self.embed(self.ids[rows], self.slots[rows]))


class _CheckpointedT5Block(nn.Module):
    """A T5 block recomputed in the backward pass: the identifier's gradient runs back through all 24 T5-XXL
    blocks, and without recomputation each block's per-layer weight casts (fp8 → compute dtype) and activations
    would stay alive until then (≈ 9 GB in bf16)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.block(*args, **kwargs)
        return checkpoint(self.block, *args, use_reentrant=False, **kwargs)


def casts_weights(model: nn.Module) -> bool:
    """Whether some weight of ``model`` is stored narrower than 16 bits (fp8, cast to the compute dtype per call)."""
    return any(p.dtype.itemsize == 1 and p.is_floating_point() for p in model.parameters())


def checkpoint_t5(t5: nn.Module) -> int:
    """Recompute every block of a transformers T5 encoder in the backward pass; returns the blocks wrapped."""
    blocks = t5.encoder.block
    for i, b in enumerate(blocks):
        if not isinstance(b, _CheckpointedT5Block):
            blocks[i] = _CheckpointedT5Block(b)
    return len(blocks)


# ---------------------------------------------------------------------------------------------- module
class FluxCGModule(nn.Module):
    """Flux transformer (+LoRA, joint-confinement processors), frozen VAE, T5 with trainable identifiers and the
    constant pooled CLIP-L vectors; ``forward(batch, generator)`` is the loss (see the module docstring).

    Args:
        parts: the Flux set (frozen; the LoRA already added).
        cfg: the training settings (:class:`~.cg.CGConfig`).
        prompts: the prompts (:class:`FluxPrompts`).
        text: the T5 with the trainable vectors.
    """

    def __init__(self, parts: FluxParts, cfg: Any, prompts: FluxPrompts, text: T5Identifiers) -> None:
        super().__init__()
        self.transformer, self.vae, self.clip_l = parts.transformer, parts.vae, parts.clip_l
        self.text, self.cfg, self.prompts = text, cfg, prompts
        self.variant, self.family = parts.variant, "flux"
        self.guidance = (FLUX.sampler.inpaint_guidance if parts.fill else FLUX.sampler.guidance) \
            if parts.guidance_embeds else None
        self.register_buffer("plain_ids", prompts.plain_ids, persistent=False)
        self._fixed: dict[tuple, torch.Tensor] = {}

    @property
    def embedding(self) -> T5Identifiers:
        """The trainable identifier vectors (``embedding.vectors``)."""
        return self.text

    def train(self, mode: bool = True) -> "FluxCGModule":
        """Train mode for the trainable parts; the frozen T5, CLIP-L and VAE stay in eval mode (T5's dropout)."""
        super().train(mode)
        for m in (self.text.t5, self.clip_l, self.vae):
            m.eval()
        return self

    @torch.no_grad()
    def _fixed_encoding(self, name: str) -> torch.Tensor:
        """Encodings without an identifier do not change while training (frozen encoders): computed once per
        device / precision."""
        dev = self.plain_ids.device
        key = (name, str(dev), torch.is_autocast_enabled())
        if key not in self._fixed:
            if name == "plain":
                self._fixed[key] = self.text.encode_embeds(self.text.embed(self.plain_ids))
            else:
                ids = self.prompts.clip_plain if name == "pooled_plain" else self.prompts.clip_empty
                self._fixed[key] = self.clip_l(ids.to(self.clip_l.device)).pooler_output
        return self._fixed[key]

    def plain_context(self) -> torch.Tensor:
        """``[1, L, width]`` T5 context of the identifier-free prompt (what product cells attend to)."""
        return self._fixed_encoding("plain")

    def pooled(self, dropped: torch.Tensor) -> torch.Tensor:
        """``[B, 768]`` pooled CLIP-L vectors: the identifier-free prompt's, the empty prompt's where captions
        dropped."""
        plain = self._fixed_encoding("pooled_plain").expand(dropped.shape[0], -1)
        if not self.cfg.caption_dropout:
            return plain
        return torch.where(dropped[:, None].to(plain.device), self._fixed_encoding("pooled_empty").expand_as(plain),
                           plain)

    def encode_latents(self, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Normalised VAE latents ``[B, 16, h, w]`` (sampled when a generator is given, else the mode)."""
        with torch.no_grad():
            dist = self.vae.encode(image.to(self.vae.dtype)).latent_dist
            z = dist.sample(generator) if generator is not None else dist.mode()
        return normalize_latents(z.float())

    def sample_times(self, n: int, generator: torch.Generator, seq_len: int) -> torch.Tensor:
        """``[n]`` float32 flow times in (0, 1): logit-normal, time-shifted on dev and Fill (module docstring)."""
        t = torch.sigmoid(torch.randn(n, generator=generator, dtype=torch.float64))
        if self.variant != "schnell":
            t = time_shift(time_shift_mu(seq_len), t)
        return t.float()

    def confinement(self, mask: torch.Tensor, image_hw: tuple[int, int], plain: torch.Tensor) -> JointCall:
        """The batch's :class:`JointCall` (product masks [B, 1, H, W]; rows without an identifier have 0 masks)."""
        spec = IdentifierSpec(self.prompts.positions, self.prompts.length, plain_context=plain)
        guidance = IdentifierGuidance(spec, ProductMask(mask[:, 0]), self.cfg.strength)
        return JointCall(guidance, flux_token_grid(*image_hw), (0,))

    def forward(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        image, mask, rows = batch["image"], batch["mask"].float(), batch["category"]
        dev = image.device
        guided, dropped = mask, torch.zeros_like(rows, dtype=torch.bool)
        if self.cfg.caption_dropout > 0:  # the empty prompt (the last row); no identifier to confine
            dropped = (torch.rand(rows.shape[0], generator=generator) < self.cfg.caption_dropout).to(rows.device)
            rows = torch.where(dropped, self.prompts.ids.shape[0] - 1, rows)
            guided = mask * (~dropped).view(-1, 1, 1, 1)
        dtype = self.transformer.dtype
        context = self.text.encode(rows).to(dev, dtype)
        call = self.confinement(guided, tuple(image.shape[-2:]), self.plain_context())

        x0 = self.encode_latents(image, generator)
        hw = tuple(x0.shape[-2:])
        noise = torch.randn(x0.shape, generator=generator).to(dev)
        t = self.sample_times(x0.shape[0], generator, image_seq_len(hw)).to(dev)
        keep = jitter_masks(mask.to(dev), generator, self.cfg.mask_jitter)
        noisy = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        hidden = pack_latents(noisy)
        if self.variant == "fill":
            masked = self.encode_latents(image * keep, None)  # the canvas with its repaint region grey
            hidden = torch.cat([hidden, fill_conditioning(masked, 1 - keep)], dim=-1)
        txt_ids = torch.zeros(self.prompts.length, 3, device=dev, dtype=dtype)
        extra = {"guidance": torch.full((x0.shape[0],), float(self.guidance), device=dev, dtype=dtype)} \
            if self.guidance is not None else {}
        out = self.transformer(hidden_states=hidden.to(dtype), **confined_inputs(call, context, txt_ids),
                               pooled_projections=self.pooled(dropped).to(dev, dtype), timestep=t.to(dtype),
                               img_ids=latent_image_ids(hw, dev, dtype), **extra).sample
        pred = unpack_latents(out.float(), hw)
        w = loss_weights(mask, hw, self.cfg.background_loss_weight).to(dev)
        mse = (((pred - (noise - x0)) ** 2) * w).mean() / w.mean()
        return {"loss": mse, "mse": mse.detach(), "mass": mse.new_zeros(())}


# ---------------------------------------------------------------------------------------------- task
#: train-cg options that have no meaning on Flux, and why (one line each).
REFUSED = {
    "confinement": "--confinement columns cannot confine on Flux: T5 is bidirectional, so every text token carries "
                   "the identifier (use --confinement context, the default)",
    "mask_mode": "--mask-mode {value} is not available on Flux: joint attention confines by context only, which has "
                 "no attention-mass loss (use --mask-mode hard, the default)",
    "unet": "--unet full is not available on Flux: train-cg trains one LoRA on the transformer (--unet lora)",
    "buckets": "--buckets on is not available on Flux yet: train at one square --resolution (--buckets off)",
}


def check_flux_config(cfg: Any) -> None:
    """Refuse, in one line, the ``train-cg`` settings Flux cannot train with (:data:`REFUSED`)."""
    bad = {"confinement": cfg.confinement != "context", "mask_mode": cfg.mask_mode != "hard",
           "unet": cfg.unet != "lora", "buckets": bool(cfg.buckets)}
    for key, wrong in bad.items():
        if wrong:
            raise ValueError(REFUSED[key].format(value=getattr(cfg, key)))
    if cfg.resolution % 16:
        raise ValueError(f"--resolution {cfg.resolution}: Flux trains at multiples of 16 (8× VAE, then 2×2 patches)")


class FluxCGTask:
    """The :class:`~.engine.TrainTask` of the Category-Wise Generator on Flux.1.

    Args:
        cfg: the settings (:class:`~.cg.CGConfig`; Flux takes ``confinement="context"``, ``mask_mode="hard"``,
            ``unet="lora"``).
        parts: builds the Flux set (default: :func:`load_flux_parts` of ``cfg.model``).
        t5_min_length: T5 tokens per prompt at least (ComfyUI's ``min_length``; the prompt's own length if longer).
        companions: a transformer file's T5-XXL, CLIP-L and VAE files (``t5``, ``clip_l``, ``vae``; default: the
            bundled ones, else found beside it).
    """

    def __init__(self, cfg: Any, parts: Callable[[], FluxParts] | None = None, t5_min_length: int = T5_MIN_LENGTH,
                 companions: dict[str, str] | None = None) -> None:
        check_flux_config(cfg)
        self.cfg, self.t5_min_length = cfg, int(t5_min_length)
        self.companions = {k: str(v) for k, v in (companions or {}).items() if v is not None}
        self._parts = parts or (lambda: load_flux_parts(cfg.model, _DTYPES[cfg.weights_dtype], self.companions,
                                                        cfg.model_configs))
        self.index = _restrict(open_bg60k(cfg.data, skip_bad=cfg.skip_bad), cfg.categories)
        self.categories = list(self.index.categories)
        self._dataset = ImageMaskDataset(self.index, cfg.resolution, flip=cfg.flip)
        self.lora_alpha = float(cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank)
        self.start = _start_bank(cfg, self.categories) if cfg.init_bank is not None else None
        if self.start is not None and set(self.start.vectors) != {"t5xxl"}:
            raise ValueError(f"--init-bank: a {self.start.family} bank (vectors for {', '.join(self.start.vectors)}) "
                             "cannot start training on a Flux model (identifiers in T5-XXL's space: a flux bank)")
        self.counts = self.start.counts if self.start is not None and len(set(self.start.counts)) > 1 else None
        self.vectors_per_id = max(self.start.counts) if self.start is not None else cfg.vectors_per_id

    def dataset(self) -> ImageMaskDataset:
        return self._dataset

    def fingerprint(self) -> dict[str, Any]:
        d = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.cfg).items() if k != "data"}
        d["mask_jitter"] = list(self.cfg.mask_jitter)
        d.update(categories=self.categories, dataset_size=len(self._dataset), backbone="flux",
                 t5_min_length=self.t5_min_length, timesteps="logit-normal(0,1), Flux time shift (dev, fill)",
                 companions=self.companions,
                 vector_counts=self.start.counts if self.start is not None else None)
        return d

    def build(self, device: torch.device) -> FluxCGModule:
        parts = self._parts()  # in the weights' dtype (fp8 linears of a file stay fp8)
        for m in parts.models:
            m.requires_grad_(False)
            m.eval()
        counts = self.counts or [self.vectors_per_id] * len(self.categories)
        prompts = flux_prompts(parts.t5_tokenizer, parts.clip_tokenizer, self.cfg.template, counts, self.t5_min_length)
        if self.start is not None:
            init = self.start.vectors["t5xxl"]
            width = int(parts.t5.get_input_embeddings().weight.shape[1])
            if init.shape[-1] != width:
                raise ValueError(f"--init-bank: the bank's t5xxl vectors are {init.shape[-1]} wide, this model's T5 "
                                 f"{width} (a bank for another model)")
        else:
            init = initial_t5_vectors(parts, self.categories, self.vectors_per_id, self.cfg.init)
        text = T5Identifiers(parts.t5, prompts, init)
        install_flux_processors(parts.transformer)
        add_flux_lora(parts.transformer, self.cfg.lora_rank, self.lora_alpha)
        if self.cfg.gradient_checkpointing:
            parts.transformer.enable_gradient_checkpointing()
        if self.cfg.gradient_checkpointing or casts_weights(parts.t5):
            checkpoint_t5(parts.t5)
        return FluxCGModule(parts, self.cfg, prompts, text)

    def param_groups(self, module: FluxCGModule, lr: float) -> list[dict[str, Any]]:
        lora = [p for p in module.transformer.parameters() if p.requires_grad]
        return [{"params": lora, "lr": lr},
                {"params": [module.text.vectors], "lr": self.cfg.identifier_lr, "weight_decay": 0.0}]

    def trainable_state(self, module: FluxCGModule) -> dict[str, torch.Tensor]:
        state = {"identifiers": module.text.vectors}
        state.update({f"lora.{n}": p for n, p in module.transformer.named_parameters() if p.requires_grad})
        return state

    def load_trainable_state(self, module: FluxCGModule, tensors: dict[str, torch.Tensor]) -> None:
        load_trainables(self.trainable_state(module), tensors, "a different LoRA rank, categories or base model?")

    def save_outputs(self, module: FluxCGModule, out_dir: Path, step: int) -> list[Path]:
        training = {"trainer": "train-cg", "steps": step, "dataset": str(self.cfg.data), "model": self.cfg.model,
                    "family": "flux", "variant": module.variant, "mask_mode": self.cfg.mask_mode,
                    "confinement": self.cfg.confinement, "categories": len(self.categories), "unet": "lora"}
        if self.start is not None:
            training["init_bank"] = self.cfg.init_bank.name
        bank = save_flux_bank(out_dir / BANK_FILE, self.categories, module.text.identifier_vectors(),
                              self.cfg.template, training, self.counts)
        lora = save_flux_lora(out_dir / LORA_FILE, module.transformer, self.lora_alpha, training)
        return [bank, lora]

    def preview(self, module: FluxCGModule, out_dir: Path, step: int) -> Path | None:
        return None  # previews need the Flux sampler (pipeline); --sample-every is refused on Flux by the CLI


def initial_t5_vectors(parts: FluxParts, names: Sequence[str], vectors_per_id: int, init: str) -> torch.Tensor:
    """``[categories, vectors, width]`` starting vectors in T5's input space: the mean embedding (as the model's
    table holds it: fp8-rounded for an fp8 T5) of the category name's tokens (``init="name"``; "background" for a
    name without tokens) or of "background"."""
    table = parts.t5.get_input_embeddings()
    tok = parts.t5_tokenizer

    def mean_of(text: str) -> torch.Tensor:
        ids = [i for i in tok(text, add_special_tokens=False).input_ids if i != tok.unk_token_id]
        if not ids:
            return mean_of("background")
        return torch.nan_to_num(table(torch.tensor(ids, device=table.weight.device)).float()).mean(0).cpu()

    rows = [mean_of(name if init == "name" else "background") for name in names]
    return torch.stack(rows)[:, None].repeat(1, vectors_per_id, 1)


def add_flux_lora(transformer: nn.Module, rank: int, alpha: float) -> None:
    """One LoRA (peft) on :func:`lora_targets`; its weights in float32 whatever the base dtype."""
    # optional dependency: peft
    from peft import LoraConfig

    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                       target_modules=lora_targets(transformer)))
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def lora_tensors(transformer: nn.Module, alpha: float) -> dict[str, torch.Tensor]:
    """The transformer's LoRA in diffusers' Flux layout (``transformer.<module>.lora_A.weight`` / ``lora_B``),
    ``alpha / rank`` folded into ``lora_B``."""
    # optional dependency: peft
    from peft.utils import get_peft_model_state_dict

    out = {}
    for m in peft_lora_modules(get_peft_model_state_dict(transformer), alpha, "transformer"):
        scale = float(m.alpha) / m.down.shape[0]
        out[f"transformer.{m.path}.lora_A.weight"] = m.down.contiguous()
        out[f"transformer.{m.path}.lora_B.weight"] = (m.up * scale).contiguous()
    return out


def save_flux_lora(path: Path, transformer: nn.Module, alpha: float, training: dict[str, Any]) -> Path:
    """Write the transformer's LoRA (:func:`lora_tensors`) atomically, the run's provenance in its metadata."""
    meta = {"productbg.training": json.dumps(training, ensure_ascii=False, default=str), "format": "pt"}
    return atomic_save(lora_tensors(transformer, alpha), path, meta)


def save_flux_bank(path: Path, names: Sequence[str], vectors: torch.Tensor, template: str, training: dict[str, Any],
                   counts: Sequence[int] | None = None) -> Path:
    """Write T5 identifier vectors ``[categories, vectors, 4096]`` as a ``flux`` bank, atomically."""
    v = vectors.detach().float().cpu()
    if v.ndim != 3 or v.shape[0] != len(names) or v.shape[-1] != T5_WIDTH:
        raise ValueError(f"a flux bank holds [{len(names)} categories, vectors, {T5_WIDTH}] T5-XXL vectors, got "
                         f"{list(v.shape)} (a T5 of another width)")
    bank = CategoryBank("flux", vectors_per_id=int(v.shape[1]), template=template, training=training,
                        varied_counts=counts is not None)
    for i, name in enumerate(names):
        n = int(v.shape[1]) if counts is None else int(counts[i])
        bank.add(name, {"t5xxl": v[i, :n]})
    return bank.save(path)
