"""The attention hot path on a GPU's terms, checked on the CPU: no host sync and no tensor built from Python
data inside the adapters' per-layer calls; ComfyUI's key rules (3-tuple keys first) and refusals (area crops)."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from productbg.attention import Guidance, IdentifierGuidance, IdentifierSpec, ProductMask, StyleGuidance
from productbg.attention import comfy_patch
from productbg.attention.diffusers_processor import DiffusersCall, install_processors
from productbg.pipeline.tiny import CROSS_DIM, tiny_unet

HEADS, WIDTH = 2, 8
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "item", "equal", "is_nonzero"}
PYTHON_DATA_OPS = {"lift_fresh", "lift_fresh_copy"}


class _Spy(TorchDispatchMode):
    """Records every aten op that makes the host wait for the device or builds a tensor from Python data."""

    def __init__(self) -> None:
        super().__init__()
        self.bad: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS or name in PYTHON_DATA_OPS:
            self.bad.append(name)
        if name in ("index", "index_put", "index_put_") and any(
                isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (args[1] if len(args) > 1 else [])
                if t is not None):
            self.bad.append(f"{name}(bool mask)")
        return func(*args, **(kwargs or {}))


def _guidance(gated: bool, confinement: str = "context", style: bool = True, length: int = 77) -> Guidance:
    g = torch.Generator().manual_seed(0)
    prompt = torch.randn(1, length, WIDTH, generator=g)
    spec = IdentifierSpec((5, 6), length, plain_context=torch.randn(1, length, WIDTH, generator=g),
                          prompt_context=prompt)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1
    kw = dict(sigma_start=10.0, sigma_end=1.0) if gated else {}
    out = Guidance().with_identifier(IdentifierGuidance(spec, ProductMask(mask), 1.0, confinement=confinement, **kw))
    if style:
        proj = torch.nn.Linear(WIDTH, HEADS * 4, bias=False)
        tokens = torch.randn(1, 4, WIDTH, generator=g)
        out = out.with_style(StyleGuidance(tokens, torch.zeros_like(tokens), lambda i, t: (proj(t), proj(t)),
                                           product=ProductMask(mask), **kw))
    return out


def _block_call(patch, replace, context, extra, seed=0):
    """What ComfyUI's transformer block does: attn2 patches on n / context, then the replace on q / k / v."""
    g = torch.Generator().manual_seed(seed)
    n = torch.randn(context.shape[0], 64, HEADS * 4, generator=g)
    n, ctx, value = patch(n, context, context, extra)
    wk = torch.randn(WIDTH, HEADS * 4, generator=g)
    return replace(n, ctx @ wk, value @ wk, extra)


def _extra(block=("input", 1), sigmas=(5.0, 5.0), cond_or_uncond=(1, 0), guidance=None):
    return {"block": block, "block_index": 0, "n_heads": HEADS, "original_shape": [2, 4, 8, 8],
            "activations_shape": [2, 32, 8, 8], "cond_or_uncond": list(cond_or_uncond),
            "sigmas": torch.tensor(sigmas), comfy_patch.OPTIONS_KEY: guidance}


@pytest.mark.parametrize("confinement", ["context", "columns"])
def test_comfy_layer_calls_do_not_sync_or_build_tensors(confinement):
    """From the second layer of a model call on (and for a new call's every layer) nothing syncs the host."""
    guidance = _guidance(gated=True, confinement=confinement)
    patch, replace = comfy_patch.ProductBGContextPatch(((("input", 1)),)), comfy_patch.ProductBGAttn2(0)
    replace.add(lambda out, q, k, v, eo, **kw: torch.zeros_like(out), sigma_start=8.0, sigma_end=2.0)
    prompt = guidance.identifiers[0].spec.prompt_context
    context = torch.cat([torch.randn(1, 77, WIDTH), prompt])
    _block_call(patch, replace, context, _extra(guidance=guidance))  # first call of a run: caches fill
    for fresh in (False, True):
        ctx = context.clone() if fresh else context
        extra = _extra(guidance=guidance)
        with _Spy() as spy:
            out = _block_call(patch, replace, ctx, extra, seed=1)
        assert spy.bad == [], spy.bad
        assert torch.isfinite(out).all()


def test_diffusers_forward_does_not_sync_or_build_tensors():
    unet = tiny_unet()
    install_processors(unet)
    spec = IdentifierSpec((4, 5), plain_context=torch.randn(1, 77, CROSS_DIM))
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1
    call = DiffusersCall(Guidance().with_identifier(IdentifierGuidance(spec, ProductMask(mask))), latent_hw=(8, 8))
    latents, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, CROSS_DIM)
    with torch.no_grad():
        unet(latents, 10, context, cross_attention_kwargs={"productbg": call})
        with _Spy() as spy:
            unet(latents, 10, context.clone(), cross_attention_kwargs={"productbg": call})
    attention_ops = [op for op in spy.bad]  # the UNet itself (time embedding) may build tensors; count ours
    assert "_local_scalar_dense" not in attention_ops and "nonzero" not in attention_ops, attention_ops


def test_sigma_gate_switches_confinement_off_outside_its_range():
    """A gated identifier acts only while sigma lies in [end, start] — decided on the device, per row."""
    guidance = _guidance(gated=True, style=False)
    prompt = guidance.identifiers[0].spec.prompt_context
    context = prompt.expand(2, -1, -1).contiguous()
    patch, replace = comfy_patch.ProductBGContextPatch((("input", 1),)), comfy_patch.ProductBGAttn2(0)
    plain = comfy_patch.ProductBGAttn2(0)
    inside = _block_call(patch, replace, context, _extra(guidance=guidance, sigmas=(5.0, 5.0), cond_or_uncond=(0, 0)))
    outside = _block_call(patch, replace, context.clone(), _extra(guidance=guidance, sigmas=(20.0, 20.0),
                                                                    cond_or_uncond=(0, 0)))
    unguided = _block_call(lambda n, c, v, e: (n, c, v), plain, context, _extra(guidance=None, cond_or_uncond=(0, 0)))
    assert (outside - unguided).abs().max() < 1e-6
    assert (inside - unguided).abs().max() > 1e-3


def test_foreign_three_tuple_key_gets_our_callback_or_a_clear_refusal():
    """ComfyUI looks up (block, number, index) before (block, number): an object there would shadow ours."""
    class Stackable:
        def __init__(self):
            self.callback, self.kwargs = [], []

        def add(self, cb, **kw):
            self.callback.append(cb)
            self.kwargs.append(kw)

    foreign = Stackable()
    options = {"transformer_options": {"patches_replace": {"attn2": {("input", 4, 0): foreign}}}}
    comfy_patch.install(options, _guidance(gated=False))
    stacked = options["transformer_options"]["patches_replace"]["attn2"][("input", 4, 0)]
    assert foreign.kwargs == [] and stacked is not foreign  # copy-on-write: the object itself is untouched
    assert [kw.get("productbg") for kw in stacked.kwargs] == [True]
    assert [kw["layer_index"] for kw in stacked.kwargs] == [2]
    comfy_patch.install(options, _guidance(gated=False))  # installing again does not add a second callback
    assert options["transformer_options"]["patches_replace"]["attn2"][("input", 4, 0)] is stacked
    assert len(stacked.kwargs) == 1
    blocked = {"transformer_options": {"patches_replace": {"attn2": {("middle", 0, 0): lambda *a: None}}}}
    with pytest.raises(ValueError, match="cannot be stacked"):
        comfy_patch.install(blocked, _guidance(gated=False))


def test_area_conditioning_crop_is_refused_clearly():
    guidance = _guidance(gated=False, style=False)
    patch = comfy_patch.ProductBGContextPatch((("input", 1),))
    extra = _extra(guidance=guidance)
    extra["original_shape"] = [2, 4, 8, 3]   # a 64x24 crop of a square product mask
    with pytest.raises(comfy_patch.GuidanceError, match="ConditioningSetArea"):
        patch(torch.randn(2, 24, 8), torch.randn(2, 77, WIDTH), torch.randn(2, 77, WIDTH), extra)


def test_install_keeps_the_input_options_untouched_and_adds_one_patch():
    options: dict = {"transformer_options": {"patches": {"attn2_patch": []}}}
    before = options["transformer_options"]["patches"]["attn2_patch"]
    comfy_patch.install(options, _guidance(gated=False))
    comfy_patch.install(options, _guidance(gated=False))
    patches = options["transformer_options"]["patches"]["attn2_patch"]
    assert before == [] and sum(isinstance(p, comfy_patch.ProductBGContextPatch) for p in patches) == 1
    assert math.isinf(options["transformer_options"]["productbg"].identifiers[0].sigma_start)
