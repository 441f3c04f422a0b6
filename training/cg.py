"""Category-Wise Generator trainer (``productbg train-cg``): identifier vectors per category + one UNet LoRA.

Every training image of category c is captioned with the template (default ``"a product photo on a {id}
background"``) whose ``{id}`` is c's placeholder tokens. The mask-guided attention of
:mod:`productbg.attention` is active in every cross-attention layer, exactly as at inference:

* ``mask_mode="hard"``: confinement at product positions — by default (``confinement="context"``) product
  positions attend to the prompt encoded without the identifier, so product pixels give the identifier vectors
  exactly zero gradient through cross-attention; ``"columns"`` biases only the identifier's key columns (the
  first reading, which leaks through CLIP's causal encoder; kept for the ablation);
* ``"loss"``: no bias; the identifier's attention mass inside the product is penalised instead
  (``mass_loss_weight``);
* ``"both"``: bias and loss.

The denoising loss can weight background latents more (``background_loss_weight``). With a 9-channel
inpainting UNet the input is noisy latent + repaint mask + masked-image latent, where the kept region is the
product mask grown or shrunk by a random radius (``mask_jitter``, fractions of the image side; negative
erodes, as the inference recipe's dilated repaint mask does).

Outputs: ``category_bank.safetensors`` (every category's vectors) and ``unet_lora.safetensors`` (kohya layout).
With ``unet="full"`` every UNet weight trains instead of a LoRA (full fine-tuning on large GPUs, or training a
small model from scratch as the demo model does) and the UNet is written as a diffusers ``unet/`` folder.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from ..attention import CONFINEMENTS, Guidance, IdentifierGuidance, IdentifierSpec, ProductMask
from ..attention.diffusers_processor import DiffusersCall, install_processors
from ..pipeline.sampling import upcast_vae
from ..pipeline.text import DEFAULT_TEMPLATE, identifier_prompt, tokenize_with_identifier, without_positions
from ..weights.bank import CategoryBank
from ..weights.errors import WeightsError
from . import identifiers, outputs
from .datasets import BG60kIndex, ImageMaskDataset, open_bg60k
from .diffusion import DiffusionModule, jitter_masks, loss_weights, morph  # noqa: F401  (re-exported)
from .state import load_trainables
from .model_folder import save_pretrained_atomic
from .models import SDComponents, load_components
from .preview import cg_preview

MASK_MODES = ("hard", "loss", "both")
UNET_MODES = ("lora", "full")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
BANK_FILE = "category_bank.safetensors"
LORA_FILE = "unet_lora.safetensors"
UNET_DIR = "unet"


@dataclass
class CGConfig:
    """Category-Wise training settings (the loop's settings are in :class:`~.engine.EngineConfig`).

    Attributes:
        data: BG60k-layout folder.
        model: ``"tiny"``, ``"tiny-inpaint"``, a diffusers folder or a single-file ``.safetensors``.
        resolution: training image side (multiple of 8).
        vectors_per_id: identifier vectors per category.
        template: prompt template with ``{id}``.
        init: ``"name"`` (category-name embedding) or ``"background"``.
        unet: ``"lora"`` (one shared LoRA, the paper's setting) or ``"full"`` (every UNet weight).
        lora_rank, lora_alpha: the shared UNet LoRA (alpha defaults to the rank).
        identifier_lr: learning rate of the identifier vectors (the LoRA uses the engine's ``lr``).
        mask_mode: ``hard`` | ``loss`` | ``both``.
        confinement: ``context`` | ``columns`` (how ``hard`` / ``both`` confine; see the module docstring).
        strength: confinement strength for ``hard`` / ``both``.
        mass_loss_weight: weight of the attention-mass loss for ``loss`` / ``both``.
        background_loss_weight: denoising-loss weight of background latents (product latents weigh 1).
        caption_dropout: probability of training a sample with the empty prompt (what classifier-free guidance
            contrasts with; needed when the UNet trains from scratch, optional for a LoRA).
        mask_jitter: (min, max) radius of the random product-mask dilation, as fractions of the image side.
        flip: random horizontal flips.
        skip_bad: train on the good entries of a dataset with problems.
        gradient_checkpointing: trade compute for memory in the UNet.
        weights_dtype: dtype of the frozen base weights (``float32``, ``float16``, ``bfloat16``).
        categories: restrict training to these categories (``None`` = all).
        model_configs: component configs for a single-file ``model`` (default: the shipped SD1.5 set).
    """

    data: Path
    model: str = "tiny-inpaint"
    resolution: int = 512
    vectors_per_id: int = 4
    template: str = DEFAULT_TEMPLATE
    init: str = "name"
    unet: str = "lora"
    lora_rank: int = 8
    lora_alpha: float | None = None
    identifier_lr: float = 5e-3
    mask_mode: str = "hard"
    confinement: str = "context"
    strength: float = 1.0
    mass_loss_weight: float = 0.1
    background_loss_weight: float = 1.0
    caption_dropout: float = 0.0
    mask_jitter: tuple[float, float] = (-0.04, 0.02)
    flip: bool = True
    skip_bad: bool = False
    gradient_checkpointing: bool = False
    weights_dtype: str = "float32"
    categories: tuple[str, ...] | None = None
    model_configs: Path | None = None
    init_bank: Path | None = None  # start from this bank's vectors (its per-category counts decide the vectors)
    buckets: bool = False  # aspect-ratio buckets (multiple-of-64 sides, one bucket per batch): see docs/training.md

    def __post_init__(self) -> None:
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {self.mask_mode!r}")
        if self.confinement not in CONFINEMENTS:
            raise ValueError(f"confinement must be one of {CONFINEMENTS}, got {self.confinement!r}")
        if self.unet not in UNET_MODES:
            raise ValueError(f"unet must be one of {UNET_MODES}, got {self.unet!r}")
        if self.init not in ("name", "background"):
            raise ValueError(f"init must be 'name' or 'background', got {self.init!r}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.mask_jitter[0] > self.mask_jitter[1]:
            raise ValueError(f"mask_jitter min {self.mask_jitter[0]} exceeds max {self.mask_jitter[1]}")
        if self.init_bank is not None:
            self.init_bank = Path(self.init_bank)


class CGModule(DiffusionModule):
    """UNet (+LoRA, guided processors), frozen VAE, text encoder(s) with trainable identifiers; forward = loss.

    SDXL: the pooled text embedding comes from the identifier-free prompt (as inference takes it: it reaches
    every cell through the time embedding), the empty prompt's for caption-dropped rows; the added time ids
    from each sample's real size and crop.
    """

    def __init__(self, comps: SDComponents, cfg: CGConfig, prompt_ids: torch.Tensor, spec: IdentifierSpec,
                 text: identifiers.IdentifierText) -> None:
        super().__init__(comps)
        self.text, self.cfg, self.spec = text, cfg, spec
        self.register_buffer("prompt_ids", prompt_ids, persistent=False)  # [encoders, categories + 1, 77]
        # The template without the identifier (the same for every category): what product cells attend to.
        plain = torch.stack([without_positions(p[:1], spec.token_indices) for p in prompt_ids])
        self.register_buffer("plain_ids", plain, persistent=False)  # [encoders, 1, 77]
        # Encodings with no identifier in them (the identifier-free and the empty prompt) do not change while
        # training (frozen encoders, no placeholder token): encoded once per device / precision, not every step.
        self._fixed: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @property
    def embedding(self) -> identifiers.IdentifierEmbedding:
        """The first (CLIP-L) encoder's trainable identifier rows."""
        return self.text.embeddings[0]

    @property
    def text_encoder(self) -> torch.nn.Module:
        """The first (CLIP-L) text encoder."""
        return self.text.encoders[0]

    def encode_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Context (and pooled embedding) of prompt rows (category indices; the last row is the empty prompt)."""
        return self.text.encode([p[rows] for p in self.prompt_ids])

    def plain_prompt(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Context ``[1, 77, W]`` and pooled embedding of the identifier-free prompt."""
        return self._fixed_encoding("plain", list(self.plain_ids))

    def empty_prompt(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Context and pooled embedding of the empty prompt (the last row of ``prompt_ids``)."""
        return self._fixed_encoding("empty", [p[-1:] for p in self.prompt_ids])

    @torch.no_grad()
    def _fixed_encoding(self, name: str, ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = (name, self.plain_ids.device, self.text_encoder.dtype, torch.is_autocast_enabled())
        if key not in self._fixed:
            self._fixed[key] = self.text.encode(ids)
        return self._fixed[key]

    def identifier_guidance(self, mask: torch.Tensor, strength: float,
                            plain_context: torch.Tensor | None = None) -> IdentifierGuidance:
        """The identifier's guidance for a batch of product masks [B, 1, H, W]."""
        spec = self.spec
        if self.cfg.confinement == "context":
            spec = replace(spec, plain_context=plain_context if plain_context is not None else self.plain_prompt()[0])
        return IdentifierGuidance(spec, ProductMask(mask[:, 0]), strength, confinement=self.cfg.confinement)

    def guidance_call(self, mask: torch.Tensor, latent_hw: tuple[int, int], collect: bool,
                      plain_context: torch.Tensor | None = None) -> DiffusersCall:
        strength = self.cfg.strength if self.cfg.mask_mode in ("hard", "both") else 0.0
        g = Guidance().with_identifier(self.identifier_guidance(mask, strength, plain_context))
        return DiffusersCall(g, latent_hw=latent_hw, cond_or_uncond=(0,), mass_losses=[] if collect else None)

    def pooled_for(self, dropped: torch.Tensor, plain_pooled: torch.Tensor) -> torch.Tensor:
        """[B, W] pooled embeddings: the identifier-free prompt's, the empty prompt's where captions dropped."""
        pooled = plain_pooled.expand(dropped.shape[0], -1)
        if not self.cfg.caption_dropout:
            return pooled
        return torch.where(dropped[:, None], self.empty_prompt()[1].expand_as(pooled), pooled)

    def forward(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        mask, rows = batch["mask"].float(), batch["category"]
        guided, dropped = mask, torch.zeros_like(rows, dtype=torch.bool)
        if self.cfg.caption_dropout > 0:  # the empty prompt (last row of prompt_ids); no identifier to confine
            dropped = (torch.rand(rows.shape[0], generator=generator) < self.cfg.caption_dropout).to(rows.device)
            rows = torch.where(dropped, self.prompt_ids.shape[1] - 1, rows)
            guided = mask * (~dropped).view(-1, 1, 1, 1)
        # One prompt per row (a row's category is only known on the device: no host read to deduplicate).
        context, _ = self.encode_rows(rows)
        plain_context, plain_pooled = self.plain_prompt()
        added = self.added_conditions(batch, self.pooled_for(dropped, plain_pooled) if plain_pooled is not None
                                      else None)
        collect = self.cfg.mask_mode in ("loss", "both") and self.cfg.mass_loss_weight > 0
        call = self.guidance_call(guided, self.latent_hw(mask), collect, plain_context)
        mse = self.denoising_loss(batch["image"], mask, generator, context, call, self.cfg.mask_jitter,
                                  self.cfg.background_loss_weight, added)
        mass = torch.stack(call.mass_losses).float().mean() if collect else mse.new_zeros(())
        return {"loss": mse + self.cfg.mass_loss_weight * mass, "mse": mse.detach(), "mass": mass.detach()}


# ---------------------------------------------------------------------------------------------- task
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CGTask:
    """The :class:`~.engine.TrainTask` of the Category-Wise Generator.

    Args:
        cfg: the settings.
        components: builds the base model (default: :func:`~.models.load_components` of ``cfg.model``).
    """

    def __init__(self, cfg: CGConfig, components: Callable[[], SDComponents] | None = None) -> None:
        self.cfg = cfg
        # loaded in the frozen weights' dtype: a float32 copy of SDXL first would double the peak memory
        self._components = components or (lambda: load_components(cfg.model, _DTYPES[cfg.weights_dtype],
                                                                  config_dir=cfg.model_configs))
        index = open_bg60k(cfg.data, skip_bad=cfg.skip_bad)
        self.index = _restrict(index, cfg.categories)
        self.categories = list(self.index.categories)
        self._dataset = ImageMaskDataset(self.index, cfg.resolution, flip=cfg.flip, buckets=cfg.buckets)
        self.lora_alpha = float(cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank)
        self.start = _start_bank(cfg, self.categories) if cfg.init_bank is not None else None
        #: each category's own vector count (a from-text bank's descriptions differ in length); None = all alike
        self.counts = self.start.counts if self.start is not None and len(set(self.start.counts)) > 1 else None
        self.vectors_per_id = max(self.start.counts) if self.start is not None else cfg.vectors_per_id

    def dataset(self) -> ImageMaskDataset:
        return self._dataset

    def fingerprint(self) -> dict[str, Any]:
        d = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.cfg).items() if k != "data"}
        d["mask_jitter"] = list(self.cfg.mask_jitter)
        d["categories"] = self.categories
        d["dataset_size"] = len(self._dataset)
        d["vector_counts"] = self.start.counts if self.start is not None else None
        return d

    def build(self, device: torch.device) -> CGModule:
        comps = self._components()
        comps.freeze()
        dtype = _DTYPES[self.cfg.weights_dtype]
        for m in (comps.unet, comps.vae, *comps.text_encoders):
            if m.dtype != dtype:
                m.to(dtype)
        if comps.vae.dtype == torch.float16:
            upcast_vae(comps.vae)  # SDXL's VAE overflows in float16 (as at inference)
        if self.start is not None:
            init = self.start.for_encoders(comps)
        else:
            init = [identifiers.initial_vectors(tok, enc, self.categories, self.cfg.vectors_per_id, self.cfg.init)
                    for tok, enc in zip(comps.tokenizers, comps.text_encoders)]
        text = identifiers.IdentifierText(comps.tokenizers, comps.text_encoders, init)
        prompt_ids, spec = _prompts(comps.tokenizers, text.vocab, self.cfg.template, len(self.categories), self.counts)
        install_processors(comps.unet)
        if self.cfg.unet == "full":
            comps.unet.float().requires_grad_(True)
        else:
            _add_lora(comps.unet, self.cfg.lora_rank, self.lora_alpha)
        if self.cfg.gradient_checkpointing:
            comps.unet.enable_gradient_checkpointing()
        return CGModule(comps, self.cfg, prompt_ids, spec, text)

    def param_groups(self, module: CGModule, lr: float) -> list[dict[str, Any]]:
        lora = [p for n, p in module.unet.named_parameters() if p.requires_grad]
        vectors = [e.vectors for e in module.text.embeddings]
        return [{"params": lora, "lr": lr},
                {"params": vectors, "lr": self.cfg.identifier_lr, "weight_decay": 0.0}]

    def trainable_state(self, module: CGModule) -> dict[str, torch.Tensor]:
        state = {"identifiers": module.embedding.vectors}  # clip_l (the only encoder on SD1.5)
        state.update({f"identifiers.{name}": e.vectors
                      for name, e in zip(module.text.names[1:], module.text.embeddings[1:])})
        prefix = "unet" if self.cfg.unet == "full" else "lora"
        state.update({f"{prefix}.{n}": p for n, p in module.unet.named_parameters() if p.requires_grad})
        return state

    def load_trainable_state(self, module: CGModule, tensors: dict[str, torch.Tensor]) -> None:
        load_trainables(self.trainable_state(module), tensors, "different --unet mode, LoRA rank or categories?")

    def save_outputs(self, module: CGModule, out_dir: Path, step: int) -> list[Path]:
        # optional dependency: peft
        from peft.utils import get_peft_model_state_dict

        training = {"trainer": "train-cg", "steps": step, "dataset": str(self.cfg.data), "model": self.cfg.model,
                    "mask_mode": self.cfg.mask_mode, "confinement": self.cfg.confinement, "categories": len(self.categories), "unet": self.cfg.unet}
        training["family"] = module.family
        if self.start is not None:
            training["init_bank"] = self.cfg.init_bank.name
        bank = outputs.save_bank(out_dir / BANK_FILE, self.categories, module.text.identifier_vectors(),
                                 self.cfg.template, training, counts=self.counts)
        if self.cfg.unet == "full":
            return [bank, _save_unet(module.unet, out_dir / UNET_DIR)]
        modules = outputs.peft_lora_modules(get_peft_model_state_dict(module.unet), self.lora_alpha)
        lora = outputs.save_kohya_lora(out_dir / LORA_FILE, modules, training)
        return [bank, lora]

    def preview(self, module: CGModule, out_dir: Path, step: int) -> Path | None:
        return cg_preview(module, self._dataset, out_dir, step)


def _restrict(index: BG60kIndex, categories: tuple[str, ...] | None) -> BG60kIndex:
    if not categories:
        return index
    unknown = sorted(set(categories) - set(index.categories))
    if unknown:
        raise ValueError(f"categories {unknown} are not in the dataset (it has {index.categories[:8]}...)")
    records = [r for r in index.records if r.category in categories]
    return BG60kIndex(index.root, index.split, records, sorted(set(categories)), index.problems, index.unlisted)


def _prompts(tokenizers, vocab, template: str, count: int,
             counts: list[int] | None = None) -> tuple[torch.Tensor, IdentifierSpec]:
    """Token ids [encoders, categories + 1, 77]: every category's prompt, then the empty prompt, per tokenizer;
    the identifier positions (shared by every category and both of SDXL's tokenizations).

    With per-category ``counts`` category c's prompt holds its first ``counts[c]`` placeholders, so positions
    after the identifier differ between categories; the returned spec is the first category's. That is exact for
    ``context`` confinement — every prompt without its identifier is the same identifier-free prompt, and
    product cells attend to that — which is why varied counts are refused with the column-based modes."""
    per_tokenizer, specs = [], []
    for tokenizer in tokenizers:
        ids = []
        for c in range(count):
            n = vocab.token_ids.shape[1] if counts is None else counts[c]
            words = " ".join(tokenizer.convert_ids_to_tokens(vocab.token_ids[c, :n].tolist()))
            tokens, spec = tokenize_with_identifier(tokenizer, identifier_prompt(template, words),
                                                    vocab.token_ids[c, :n])
            ids.append(tokens[0])
            specs.append(spec)
        empty = tokenizer("", padding="max_length", max_length=ids[0].shape[-1], return_tensors="pt").input_ids[0]
        per_tokenizer.append(torch.stack(ids + [empty]))
    if counts is None and len(set(specs)) != 1:
        raise ValueError("identifier positions differ between categories or tokenizers; use one template for all")
    if any(s != specs[i % count] for i, s in enumerate(specs)):
        raise ValueError("the identifier sits at different positions in the two tokenizations of the template")
    return torch.stack(per_tokenizer), specs[0]


@dataclass
class StartBank:
    """``--init-bank``: every trained category's vectors in a bank, padded to the most any of them has."""

    family: str
    counts: list[int]
    vectors: dict[str, torch.Tensor]  # encoder -> [categories, most, width]

    def for_encoders(self, comps: SDComponents) -> list[torch.Tensor]:
        """The start vectors in the model's encoder order; refuses a bank for another backbone."""
        names = ("clip_l", "clip_g")[:len(comps.text_encoders)]
        if set(names) != set(self.vectors):
            raise ValueError(f"--init-bank: a {self.family} bank (vectors for {', '.join(self.vectors)}) cannot "
                             f"start training on a {comps.family} model (text encoders {', '.join(names)})")
        out = []
        for name, enc in zip(names, comps.text_encoders):
            width = int(enc.get_input_embeddings().weight.shape[1])
            if self.vectors[name].shape[-1] != width:
                raise ValueError(f"--init-bank: the bank's {name} vectors are {self.vectors[name].shape[-1]} wide, "
                                 f"this model's text encoder {width} (a bank for another model)")
            out.append(self.vectors[name])
        return out


def _start_bank(cfg: CGConfig, categories: list[str]) -> StartBank:
    """Read ``cfg.init_bank`` for ``categories`` (names resolved as Category Prompt resolves them)."""
    try:
        with CategoryBank.load(cfg.init_bank) as bank:
            missing = []
            rows: dict[str, dict[str, torch.Tensor]] = {}
            for name in categories:
                try:
                    stored = bank.resolve(name)
                except WeightsError:
                    missing.append(name)
                    continue
                rows[name] = {enc: bank.vectors(stored, enc).float().clone() for enc in bank.encoders}
            family, encoders = bank.family, bank.encoders
    except WeightsError as e:
        raise ValueError(f"--init-bank: {e}") from None
    if missing:
        raise ValueError(f"--init-bank {cfg.init_bank.name} lacks {len(missing)} of the dataset's categories (e.g. "
                         f"{', '.join(repr(m) for m in missing[:3])}); add them (`productbg bank from-text`) or train "
                         "without --init-bank")
    counts = [int(rows[n][encoders[0]].shape[0]) for n in categories]
    if len(set(counts)) > 1 and (cfg.confinement != "context" or cfg.mask_mode != "hard"):
        raise ValueError(f"--init-bank: its categories have different vector counts ({min(counts)}–{max(counts)}), "
                         "which trains with --confinement context and --mask-mode hard only (the column-based modes "
                         "need one identifier position for every category)")
    most = max(counts)
    vectors = {enc: torch.stack([torch.cat([rows[n][enc], rows[n][enc].new_zeros(most - c, rows[n][enc].shape[1])])
                                 for n, c in zip(categories, counts)]) for enc in encoders}
    return StartBank(family, counts, vectors)


def _save_unet(unet, dest: Path) -> Path:
    """The trained UNet as a diffusers folder, without the guided processors (plain ``AttnProcessor2_0``)."""
    # optional dependency: diffusers
    from diffusers.models.attention_processor import AttnProcessor2_0


    guided = unet.attn_processors
    unet.set_attn_processor(AttnProcessor2_0())
    try:
        return save_pretrained_atomic(unet, dest)
    finally:
        unet.set_attn_processor(guided)


def _add_lora(unet, rank: int, alpha: float) -> None:
    # optional dependency: peft
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=list(LORA_TARGETS)))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
