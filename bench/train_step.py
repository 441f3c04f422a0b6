"""Cost of one Category-Wise training step versus a plain diffusers + peft LoRA step.

Both steps run on the same UNet weights, batch and random draws (VAE encode, noise, timesteps, inpainting
input, MSE, backward, AdamW): the plain step uses diffusers' ``AttnProcessor2_0``, a frozen text encoder
(no grad) and the UNet LoRA only; ours adds the identifier vectors (gradient through the text encoder), the
mask-guided attention bias in every cross-attention layer and, with ``--mask-mode both|loss``, the attention-mass
loss (default ``hard``, the trainer's default).
Steps alternate so machine drift hits both alike. Prints a table, then as its LAST line one JSON object with the
median step times and their ratio (target ≤ 1.05).

Models: ``tiny`` (the test UNet), ``small`` (3 levels, width 64-256), ``sd15`` (full-size SD1.5-inpainting UNet and
CLIP ViT-L, random weights; ~4 GB in fp32), ``sdxl`` (SDXL-inpainting's topology — 70 cross-attention layers, two
text encoders, pooled embedding and time ids — at reduced width, CPU-sized), ``sdxl-full`` (full-size SDXL-inpainting
UNet, CLIP-L and OpenCLIP-G; a GPU). One base model is shared by both steps (the UNet's attention
processors are swapped per step), so memory is that of one model.

Usage: python bench/train_step.py [--model tiny|small|sd15|sdxl|sdxl-full] [--resolution 64] [--batch 4] [--steps 20]
                                  [--mask-mode hard|loss|both] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from productbg.training import bgsynth
from productbg.training.cg import CGConfig, CGTask
from productbg.training.diffusion import DiffusionModule
from productbg.training.identifiers import encode_prompt
from productbg.training.models import SDComponents, default_scheduler, load_components
from productbg.training.state import step_generator

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "sd15"
SDXL_ASSETS = ASSETS.parent / "sdxl"


def _sd_components(unet, text_config: dict, name: str) -> SDComponents:
    from transformers import CLIPTextConfig, CLIPTextModel

    from productbg.pipeline.text import clip_tokenizer
    from productbg.pipeline.tiny import tiny_vae

    text = CLIPTextModel(CLIPTextConfig(**text_config)).eval()
    return SDComponents(unet.eval(), tiny_vae(), text, clip_tokenizer(), default_scheduler(), name)


def small_components() -> SDComponents:
    """A 3-level SD-shaped inpainting UNet (width 64–256, 10 cross-attention layers) with a width-128 CLIP."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=9, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 256),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=128,
        attention_head_dim=8, norm_num_groups=16)
    return _sd_components(unet, dict(vocab_size=49408, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                     num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
                                     eos_token_id=49407, pad_token_id=49407), "small")


def sd15_components() -> SDComponents:
    """Full-size SD1.5-inpainting UNet and CLIP ViT-L text encoder (random weights; tiny VAE: a shared cost)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    config = json.loads((ASSETS / "unet_config.json").read_text())
    unet = UNet2DConditionModel.from_config({**config, "in_channels": 9})
    return _sd_components(unet, json.loads((ASSETS / "text_encoder_config.json").read_text()), "sd15")


def _sdxl_parts(unet, widths: tuple[int, int], layers: tuple[int, int], name: str) -> SDComponents:
    """An SDXL-shaped component set: ``unet`` with CLIP-L- and OpenCLIP-G-shaped text encoders of ``widths``."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from productbg.pipeline.text import clip_tokenizer, open_clip_tokenizer
    from productbg.pipeline.tiny import tiny_vae

    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=widths[0], intermediate_size=4 * widths[0],
                                       num_hidden_layers=layers[0], num_attention_heads=max(1, widths[0] // 64),
                                       pad_token_id=49407, hidden_act="quick_gelu", **common)).eval()
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=widths[1], intermediate_size=4 * widths[1],
                                                     num_hidden_layers=layers[1], projection_dim=widths[1],
                                                     num_attention_heads=max(1, widths[1] // 64), pad_token_id=0,
                                                     hidden_act="gelu", **common)).eval()
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(json.loads((SDXL_ASSETS / "scheduler_config.json").read_text()))
    return SDComponents(unet.eval(), tiny_vae(), te1, clip_tokenizer(), sched, name, te2, open_clip_tokenizer(),
                        "sdxl")


def sdxl_components() -> SDComponents:
    """SDXL's inpainting UNet topology (depths 1/2/10: 70 cross-attention layers, added time ids) at reduced width
    (64–256 channels), with 128- and 192-wide 4-layer text encoders: what a CPU can step."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    widths = (128, 192)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=9, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 256),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(2, 4, 8), norm_num_groups=16,
        cross_attention_dim=sum(widths), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=32, projection_class_embeddings_input_dim=widths[1] + 6 * 32)
    return _sdxl_parts(unet, widths, (4, 4), "sdxl")


def sdxl_full_components() -> SDComponents:
    """Full-size SDXL-inpainting UNet, CLIP-L and OpenCLIP-G (random weights; ~14 GB in fp32: a GPU)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    config = json.loads((SDXL_ASSETS / "unet_config.json").read_text())
    unet = UNet2DConditionModel.from_config({**config, "in_channels": 9})
    return _sdxl_parts(unet, (768, 1280), (12, 32), "sdxl-full")


BUILDERS = {"tiny": lambda: load_components("tiny-inpaint"), "small": small_components, "sd15": sd15_components,
            "sdxl": sdxl_components, "sdxl-full": sdxl_full_components}


class PlainLoraStep(DiffusionModule):
    """The reference: diffusers' default attention, frozen text encoder(s), UNet LoRA only (SDXL: the prompt's
    own pooled embedding and the same time ids)."""

    def __init__(self, comps: SDComponents, prompt_ids: torch.Tensor, jitter: tuple[float, float]) -> None:
        super().__init__(comps)
        self.text_encoders, self.jitter = torch.nn.ModuleList(comps.text_encoders), jitter
        self.register_buffer("prompt_ids", prompt_ids, persistent=False)  # [encoders, prompts, 77]

    def forward(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            context, pooled = encode_prompt(self.text_encoders, [p[batch["category"]] for p in self.prompt_ids])
        mse = self.denoising_loss(batch["image"], batch["mask"].float(), generator, context, None, self.jitter, 1.0,
                                  self.added_conditions(batch, pooled))
        return {"loss": mse}


def build(kind: str, data: Path, resolution: int, device: str, mask_mode: str = "hard", **config):
    """Our CG module and the plain LoRA module, sharing one base model (UNet + LoRA, VAE, text encoder).

    ``config``: more :class:`CGConfig` fields (e.g. ``gradient_checkpointing``, ``weights_dtype``).

    Returns:
        (task, ours, plain, processors): ``processors[name]`` is the attention-processor set of each step.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    comps = BUILDERS[kind]()
    cfg = CGConfig(data=data, model=kind, resolution=resolution, vectors_per_id=4, lora_rank=8,
                   mask_mode=mask_mode, mass_loss_weight=0.1, **config)
    task = CGTask(cfg, lambda: comps)
    ours = task.build(torch.device(device)).to(device)
    processors = {"ours": dict(comps.unet.attn_processors),
                  "plain": {name: AttnProcessor2_0() for name in comps.unet.attn_processors}}
    word = comps.tokenizer("background", add_special_tokens=False).input_ids[0]
    ids = ours.prompt_ids.clone()
    ids[ids >= ours.embedding.first] = word  # same prompt length, ordinary words
    plain = PlainLoraStep(comps, ids, cfg.mask_jitter).to(device)
    return task, ours, plain, processors


def optimizer(module: torch.nn.Module, identifiers: bool) -> torch.optim.Optimizer:
    params = [p for n, p in module.named_parameters() if p.requires_grad and (identifiers or "embedding" not in n)]
    return torch.optim.AdamW(params, lr=1e-4)


def timed_step(module, opt, batch, gen, autocast: torch.dtype | None = None) -> float:
    """One optimizer step's wall time; ``autocast`` runs the forward as accelerate's mixed precision does."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    device = next(module.parameters()).device.type
    with torch.autocast(device, dtype=autocast, enabled=autocast is not None):
        loss = module(batch, gen)["loss"]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", choices=sorted(BUILDERS))
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--mask-mode", default="hard", choices=["hard", "loss", "both"],
                    help="train-cg's --mask-mode (default hard, the trainer's default; both adds the mass loss)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        bgsynth.generate(data, bgsynth.SynthSpec(categories=8, per_category=2, held_out=0, size=args.resolution))
        task, ours, plain, processors = build(args.model, data, args.resolution, args.device, args.mask_mode)
        items = [task.dataset()[(i, i)] for i in range(args.batch)]
        batch = {k: v.to(args.device) if torch.is_tensor(v) else v
                 for k, v in torch.utils.data.default_collate(items).items()}
        runs = {"ours": (ours, optimizer(ours, True), []), "plain": (plain, optimizer(plain, False), [])}
        for i in range(args.warmup + args.steps):
            for name in (("ours", "plain") if i % 2 else ("plain", "ours")):
                module, opt, times = runs[name]
                module.unet.set_attn_processor(dict(processors[name]))
                dt = timed_step(module, opt, batch, step_generator(0, i, 0, 0))
                if i >= args.warmup:
                    times.append(dt)
    med = {name: statistics.median(r[2]) for name, r in runs.items()}
    print(f"{'step':8s} {'median ms':>10s} {'min ms':>8s}")
    for name, r in runs.items():
        print(f"{name:8s} {med[name] * 1e3:10.2f} {min(r[2]) * 1e3:8.2f}")
    print(json.dumps({"bench": "train_step", "model": args.model, "device": args.device, "mask_mode": args.mask_mode,
                      "resolution": args.resolution, "batch": args.batch, "steps": args.steps,
                      "ours_ms": round(med["ours"] * 1e3, 3), "plain_ms": round(med["plain"] * 1e3, 3),
                      "ratio": round(med["ours"] / med["plain"], 4),
                      "ratio_of_min": round(min(runs["ours"][2]) / min(runs["plain"][2]), 4)}))


if __name__ == "__main__":
    main()
