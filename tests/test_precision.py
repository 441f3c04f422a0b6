"""Float16 range and host syncs on the diffusers path: the VAE kept in float32 when its config says
``force_upcast``, the mass-loss logits in float32, and no host read of a tensor inside the sampler loop."""
from __future__ import annotations

import copy
import traceback

import pytest
import torch

from productbg.attention.identifier import identifier_mass_map, split_heads
from productbg.imaging.synthetic import packshot
from productbg.pipeline import sampling
from productbg.pipeline.components import tiny_components
from productbg.pipeline.pipeline import GenerateSettings, ProductBGPipeline
from productbg.pipeline.tiny import tiny_vae

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------- VAE upcast
@pytest.mark.parametrize("dtype, force_upcast, kept", [
    (torch.float16, False, torch.float16),     # an fp16-fixed VAE says so and stays
    (torch.bfloat16, True, torch.bfloat16),    # bf16 has float32's range
    (torch.float16, True, torch.float32),
])
def test_vae_upcast_only_for_float16_with_force_upcast(dtype, force_upcast, kept):
    """The pipeline upcasts a float16 VAE whose config says ``force_upcast``, nothing else; the UNet keeps its dtype."""
    c = tiny_components(family="sdxl", style=False)
    for m in (c.unet, c.vae, *c.text_encoders):
        m.to(dtype)
    c.vae.register_to_config(force_upcast=force_upcast)
    ProductBGPipeline(c, device="cpu")
    assert c.vae.dtype == kept and c.unet.dtype == dtype


def test_float16_vae_overflows_where_the_upcast_one_does_not():
    """A decoder activation beyond float16's range (65504): the float16 VAE decodes NaN, the upcast one the float32
    result (up to float16's weight rounding) — encode and decode take and give float32 either way."""
    vae = tiny_vae(0).eval()
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)
        vae.decoder.conv_in.bias.mul_(1e5)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        activation = vae.decoder.conv_in(vae.post_quant_conv(latent / vae.config.scaling_factor))
    assert activation.abs().max() > 2 * torch.finfo(torch.float16).max
    reference = sampling.decode_latent(vae, latent)
    half = copy.deepcopy(vae).half()
    assert not torch.isfinite(sampling.decode_latent(half, latent)).all()
    upcast = sampling.upcast_vae(half)
    assert upcast is half and half.dtype == torch.float32
    decoded = sampling.decode_latent(half, latent)
    assert torch.isfinite(decoded).all() and (decoded - reference).abs().max() < 1e-2
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert sampling.encode_latent(half, image).dtype == torch.float32


# ---------------------------------------------------------------------------------------------- mass-loss logits
def _large_qk(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """q [2, 16, 64] and k [2, 8, 64] of positive values ~80: per-head dot products ≈ 80² · 32 ≈ 2e5 ≫ 65504."""
    g = torch.Generator().manual_seed(0)
    return ((torch.randn(2, 16, 64, generator=g).abs() * 100).to(dtype),
            (torch.randn(2, 8, 64, generator=g).abs() * 100).to(dtype))


def test_mass_map_of_float16_q_k_with_large_values_is_finite():
    """fp16 q/k whose dot products pass 65504: the old order (fp16 logits, then upcast) overflows to NaN; the mass
    map computes the logits in float32 and equals the float32 result."""
    q, k = _large_qk(torch.float16)
    heads, columns = 2, torch.tensor([1, 2])
    qh, kh = split_heads(q, heads), split_heads(k, heads)
    old = ((qh @ kh.transpose(-1, -2)) * (qh.shape[-1] ** -0.5)).float().softmax(-1)
    assert not torch.isfinite(old).all()
    mass = identifier_mass_map(q, k, heads, columns)
    assert mass.dtype == torch.float32 and torch.isfinite(mass).all()
    assert torch.allclose(mass, identifier_mass_map(q.float(), k.float(), heads, columns), atol=1e-6)


def test_mass_map_logits_are_float32_under_autocast():
    """Under autocast (accelerate's mixed precision; bf16 on the CPU) the logits are still float32: the mass equals
    the one computed without autocast, and it has gradients."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 16, 64, generator=g, requires_grad=True)
    k = torch.randn(2, 8, 64, generator=g)
    plain = identifier_mass_map(q, k, 2, torch.tensor([3]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = identifier_mass_map(q, k, 2, torch.tensor([3]))
    assert autocast.dtype == torch.float32 and torch.equal(autocast, plain)
    autocast.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


# ---------------------------------------------------------------------------------------------- host syncs
#: Tensor methods that read a tensor's values on the host (a device sync when the tensor lives on a GPU). Not
#: ``__bool__``: DDIM's step tests ``prev_timestep >= 0`` on the schedule, which stays on the host by design.
HOST_READS = ("item", "tolist", "cpu", "numpy", "nonzero", "__int__", "__float__", "__index__")


def _host_reads_in_loop(pipe: ProductBGPipeline, monkeypatch, **generate) -> list[str]:
    """Every host read of a tensor from the first UNet call to the final VAE decode, with where it happened."""
    calls: list[str] = []
    active = [False]

    def spy(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if active[0]:
                calls.append(f"{name}: " + traceback.format_stack(limit=2)[0].strip().replace("\n", " "))
            return original(self, *args, **kwargs)
        return read

    decode = sampling.decode_latent

    def decode_and_stop(*args):
        active[0] = False
        return decode(*args)

    monkeypatch.setattr(sampling, "decode_latent", decode_and_stop)
    hook = pipe.components.unet.register_forward_pre_hook(lambda *_: active.__setitem__(0, True))
    try:
        with monkeypatch.context() as m:
            for name in HOST_READS:
                m.setattr(torch.Tensor, name, spy(name))
            pipe.generate(packshot(48).image, category="shoes", **generate)
    finally:
        hook.remove()
    return calls


@pytest.mark.parametrize("family, sampler", [("sd15", "ddim"), ("sdxl", "dpmpp_2m_karras"),
                                             ("sd15", "dpmpp_2m_karras")])
def test_no_host_read_inside_the_sampler_loop(family, sampler, monkeypatch):
    """Identifier, reference style, CFG and the noise mask on: no ``.item()`` / ``.tolist()`` / ``.cpu()`` /
    ``nonzero()`` … between the first UNet call and the decode (DPM-Solver++ used to look each timestep up with
    ``nonzero().item()`` in ``add_noise``)."""
    pipe = ProductBGPipeline.tiny(family=family, device="cpu",
                                  settings=GenerateSettings(size=32, steps=3, sampler=sampler))
    reference = packshot(48, product_rgb=(0.1, 0.3, 0.9), background_rgb=(0.9, 0.8, 0.3)).image
    assert _host_reads_in_loop(pipe, monkeypatch, reference=reference) == []


def test_spy_sees_a_host_read_in_the_loop(monkeypatch):
    """The spy catches a read where there is one (an ``.item()`` in a patched scheduler step)."""
    from diffusers import DDIMScheduler

    pipe = ProductBGPipeline.tiny(device="cpu", settings=GenerateSettings(size=32, steps=2))
    step = DDIMScheduler.step

    def step_with_read(self, model_output, timestep, sample, *args, **kwargs):
        model_output.abs().max().item()
        return step(self, model_output, timestep, sample, *args, **kwargs)

    monkeypatch.setattr(DDIMScheduler, "step", step_with_read)
    calls = _host_reads_in_loop(pipe, monkeypatch)
    assert len(calls) == 2 and all(c.startswith("item") for c in calls)


@pytest.mark.parametrize("steps", [3, 46])
def test_noise_levels_are_add_noise_at_the_next_step(steps):
    """The precomputed (signal, noise) pairs are DPM-Solver++'s ``add_noise`` at step i + 1 by index, as diffusers'
    pipelines call it (with a begin index) — also from 45 steps on, where Karras timesteps repeat and a lookup
    by value takes the later one; DDIM's are its ``add_noise`` by timestep."""
    config = tiny_components(style=False).scheduler_config
    for sampler in ("dpmpp_2m_karras", "ddim"):
        scheduler = sampling.make_scheduler(config, steps, sampler)
        levels = sampling.noise_levels(scheduler)
        assert len(levels) == steps - 1
        x, n = torch.ones(1), torch.zeros(1)
        for i, (a, b) in enumerate(levels):
            t = scheduler.timesteps[i + 1:i + 2]
            if sampler == "ddim":
                expect = float(scheduler.add_noise(x, n, t)), float(scheduler.add_noise(n, x, t))
            else:
                alpha, sigma = scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas[i + 1])
                expect = float(alpha), float(sigma)
            assert (a, b) == pytest.approx(expect, rel=1e-6), (sampler, i)
        assert getattr(scheduler, "begin_index", None) is None        # restored


def test_more_steps_than_the_noise_schedule_allows_is_refused_in_one_line():
    """SD1.5's DDIM offsets its timesteps by 1: 1000 steps would index past the 1000-entry schedule (an
    IndexError inside diffusers); the limit is said up front, and the limit itself samples."""
    import json
    from pathlib import Path

    config = json.loads((Path(sampling.__file__).resolve().parent.parent / "assets" / "sd15" /
                         "scheduler_config.json").read_text(encoding="utf-8"))  # the shipped SD1.5 schedule
    with pytest.raises(ValueError, match="allows 1 to 999 with ddim; use --steps 999 or fewer"):
        sampling.make_scheduler(config, 1000, "ddim")
    scheduler = sampling.make_scheduler(config, 999, "ddim")
    assert int(scheduler.timesteps.max()) < config["num_train_timesteps"]
