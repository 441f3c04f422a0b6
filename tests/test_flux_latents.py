"""Flux.1 latents on diffusers (pipeline/flux_latents.py) against diffusers' own Flux pipelines and scheduler, and
the tiny random Flux set (pipeline/flux_models.py)."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from productbg.pipeline.flux_latents import (FILL_FEATURES, PLAIN_FEATURES, denormalize_latents, fill_conditioning,
                                             flux_sigmas, latent_image_ids, normalize_latents, pack_latents,
                                             time_shift_mu, unpack_latents)
from productbg.pipeline.flux_models import FluxParts, tiny_flux_parts


def test_pack_round_trip_and_diffusers_order():
    """Packing is diffusers' _pack_latents (same token order) and unpacking inverts it exactly."""
    from diffusers import FluxPipeline

    z = torch.randn(2, 16, 6, 10)
    packed = pack_latents(z)
    assert torch.equal(packed, FluxPipeline._pack_latents(z, 2, 16, 6, 10))
    assert torch.equal(unpack_latents(packed, (6, 10)), z)
    assert torch.equal(unpack_latents(packed, (6, 10)), FluxPipeline._unpack_latents(packed, 48, 80, 8))
    with pytest.raises(ValueError, match="even sides"):
        pack_latents(torch.randn(1, 16, 5, 4))


def test_image_ids_are_diffusers():
    """img_ids: (0, row, column) of the packed grid, as FluxPipeline._prepare_latent_image_ids."""
    from diffusers import FluxPipeline

    ids = latent_image_ids((6, 10))
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32))
    assert ids[7].tolist() == [0.0, 1.0, 2.0]


def test_normalisation_inverts():
    """(z - 0.1159) * 0.3611 and back."""
    z = torch.randn(1, 16, 4, 4, dtype=torch.float64)
    assert torch.allclose(denormalize_latents(normalize_latents(z)), z)
    assert normalize_latents(torch.full((1,), 0.1159)).abs().max() < 1e-7


@pytest.mark.parametrize("steps,seq", [(20, 4096), (4, 64), (28, 1024), (1, 256)])
def test_time_shift_matches_diffusers_scheduler(steps, seq):
    """dev / Fill: the sigmas of FlowMatchEulerDiscreteScheduler with FluxPipeline's mu; schnell: unshifted."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    assert time_shift_mu(seq) == pytest.approx(calculate_shift(seq))
    s = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                        base_image_seq_len=256, max_image_seq_len=4096)
    s.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(seq))
    ours = flux_sigmas(steps, seq)
    assert ours.shape == (steps + 1,) and ours[-1] == 0
    assert torch.allclose(ours, s.sigmas.float(), atol=1e-6)
    plain = FlowMatchEulerDiscreteScheduler(shift=1.0)
    plain.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))
    assert torch.allclose(flux_sigmas(steps, seq, shift=False), plain.sigmas.float(), atol=1e-6)
    if steps > 1:
        assert not torch.allclose(ours, flux_sigmas(steps, seq, shift=False))  # the shift moves something


def test_fill_conditioning_is_flux_fill_pipelines():
    """The masked-image latents + folded mask equal FluxFillPipeline.prepare_mask_latents on the same inputs."""
    from diffusers import FluxFillPipeline, FluxPipeline

    raw = torch.randn(1, 16, 4, 6)  # VAE latents of the grey-masked canvas
    repaint = (torch.rand(1, 1, 32, 48) > 0.5).float()
    host = types.SimpleNamespace(vae_scale_factor=8, _pack_latents=FluxPipeline._pack_latents,
                                 vae=types.SimpleNamespace(config=types.SimpleNamespace(shift_factor=0.1159,
                                                                                        scaling_factor=0.3611)))
    mask, masked = FluxFillPipeline.prepare_mask_latents(host, repaint, raw, 1, 16, 1, 32, 48, torch.float32, "cpu",
                                                         None)
    ours = fill_conditioning(normalize_latents(raw), repaint)
    assert ours.shape == (1, 6, FILL_FEATURES - PLAIN_FEATURES)
    assert torch.equal(ours, torch.cat([masked, mask], dim=-1))
    # channel 8·dy + dx of a token's first cell is the pixel (dy, dx)
    assert ours[0, 0, 64 + 8 * 3 + 5] == repaint[0, 0, 3, 5]


@pytest.mark.parametrize("variant", ["fill", "dev", "schnell"])
def test_tiny_flux_parts(variant):
    """The tiny set runs one transformer call with the variant's inputs; T5 has the real vocabulary."""
    parts = tiny_flux_parts(variant)
    assert isinstance(parts, FluxParts) and parts.variant == variant
    assert parts.t5.get_input_embeddings().weight.shape[0] == 32128
    assert parts.guidance_embeds == (variant != "schnell")
    assert int(parts.transformer.config.in_channels) == (FILL_FEATURES if variant == "fill" else PLAIN_FEATURES)
    assert parts.vae.config.latent_channels == 16 and parts.vae.config.shift_factor == pytest.approx(0.1159)
    ids = parts.t5_tokenizer("a red <extra_id_0> background", return_tensors="pt").input_ids
    text = parts.t5(ids).last_hidden_state
    x = torch.randn(1, 6, int(parts.transformer.config.in_channels))
    out = parts.transformer(hidden_states=x, encoder_hidden_states=text, pooled_projections=torch.randn(1, 32),
                            timestep=torch.tensor([0.5]), img_ids=latent_image_ids((4, 6)),
                            txt_ids=torch.zeros(text.shape[1], 3),
                            guidance=torch.tensor([3.5]) if parts.guidance_embeds else None).sample
    assert out.shape == (1, 6, PLAIN_FEATURES) and torch.isfinite(out).all()
