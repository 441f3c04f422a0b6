"""A small autoencoder (diffusers ``AutoencoderKL``) trained from scratch — the latent space of the demo model.

No Stable Diffusion weights can ship with the project, so the embedded demo model (:mod:`.demo_model`) is built
entirely by our own trainers; this task is its first stage. It trains on the same BG60k-layout data through the
same engine (checkpoints, exact resume, accelerate), with an L1 + L2 reconstruction loss and a small KL term,
and writes a diffusers ``vae/`` folder whose ``scaling_factor`` makes the training latents unit-variance.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .datasets import ImageMaskDataset, open_bg60k
from .model_folder import save_pretrained_atomic
from .preview import save_rows

VAE_DIR = "vae"


@dataclass
class VAEConfig:
    """Autoencoder settings.

    Attributes:
        data: BG60k-layout folder.
        resolution: training image side.
        block_out_channels: channels per resolution level; ``len - 1`` halvings (3 levels = 4 pixels per latent).
        latent_channels: 4, as every SD1.5 component expects.
        kl_weight: weight of the KL term (small: the decoder should see nearly deterministic latents).
        scale_samples: images used to measure the latent standard deviation for ``scaling_factor``.
    """

    data: Path
    resolution: int = 64
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    latent_channels: int = 4
    kl_weight: float = 1e-6
    scale_samples: int = 256

    def __post_init__(self) -> None:
        factor = 2 ** (len(self.block_out_channels) - 1)
        if self.resolution % factor:
            raise ValueError(f"resolution {self.resolution} is not a multiple of the {factor}-pixel latent cell")


def new_autoencoder(cfg: VAEConfig) -> nn.Module:
    """A freshly initialised ``AutoencoderKL`` of the configured shape."""
    # optional dependency: diffusers
    from diffusers import AutoencoderKL

    levels = len(cfg.block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=cfg.block_out_channels,
                         layers_per_block=1, latent_channels=cfg.latent_channels,
                         norm_num_groups=min(16, min(cfg.block_out_channels)), sample_size=cfg.resolution)


class VAEModule(nn.Module):
    """forward = reconstruction loss of one batch (latents sampled with the step's generator)."""

    def __init__(self, vae: nn.Module, kl_weight: float) -> None:
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        image = batch["image"].float()
        dist = self.vae.encode(image).latent_dist
        noise = torch.randn(dist.mean.shape, generator=generator).to(image.device)
        recon = self.vae.decode(dist.mean + dist.std * noise).sample
        l1, l2 = (recon - image).abs().mean(), ((recon - image) ** 2).mean()
        kl = dist.kl().mean() / dist.mean[0].numel()
        return {"loss": l1 + l2 + self.kl_weight * kl, "l1": l1.detach(), "kl": kl.detach()}


class VAETask:
    """The :class:`~.engine.TrainTask` of the autoencoder."""

    def __init__(self, cfg: VAEConfig) -> None:
        self.cfg = cfg
        self._dataset = ImageMaskDataset(open_bg60k(cfg.data), cfg.resolution, flip=True)

    def dataset(self) -> ImageMaskDataset:
        return self._dataset

    def fingerprint(self) -> dict[str, Any]:
        d = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.cfg).items() if k != "data"}
        d["block_out_channels"] = list(self.cfg.block_out_channels)
        d["dataset_size"] = len(self._dataset)
        return d

    def build(self, device: torch.device) -> VAEModule:
        return VAEModule(new_autoencoder(self.cfg), self.cfg.kl_weight)

    def param_groups(self, module: VAEModule, lr: float) -> list[dict[str, Any]]:
        return [{"params": list(module.vae.parameters()), "lr": lr}]

    def trainable_state(self, module: VAEModule) -> dict[str, torch.Tensor]:
        return {f"vae.{n}": p for n, p in module.vae.named_parameters()}

    def load_trainable_state(self, module: VAEModule, tensors: dict[str, torch.Tensor]) -> None:
        own = self.trainable_state(module)
        if set(own) != set(tensors):
            raise ValueError("checkpoint tensors do not match this autoencoder (different block_out_channels?)")
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(tensors[k])

    @torch.no_grad()
    def latent_std(self, module: VAEModule) -> float:
        """Standard deviation of the (mode) latents of up to ``scale_samples`` training images."""
        n = min(self.cfg.scale_samples, len(self._dataset))
        step = max(1, len(self._dataset) // n)
        device = next(module.vae.parameters()).device
        images = torch.stack([self._dataset[(i, 0)]["image"] for i in range(0, step * n, step)]).to(device)
        z = torch.cat([module.vae.encode(chunk).latent_dist.mode() for chunk in images.split(32)])
        return float(z.float().std())

    def save_outputs(self, module: VAEModule, out_dir: Path, step: int) -> list[Path]:
        was_training = module.training
        module.eval()
        module.vae.register_to_config(scaling_factor=round(1.0 / max(self.latent_std(module), 1e-6), 5))
        module.train(was_training)
        return [save_pretrained_atomic(module.vae, out_dir / VAE_DIR)]

    def preview(self, module: VAEModule, out_dir: Path, step: int) -> Path | None:
        with torch.no_grad():
            images = torch.stack([self._dataset[(i, 0)]["image"] for i in range(min(8, len(self._dataset)))])
            images = images.to(next(module.vae.parameters()).device)
            recon = module.vae.decode(module.vae.encode(images).latent_dist.mode()).sample
        return save_rows(out_dir, step, [images, recon])
