"""Identifier confinement on Flux through ComfyUI's own Flux model code (``comfy.ldm.flux``, ComfyUI 0.3.75).

A small-width ``comfy.ldm.flux.model.Flux`` (ComfyUI's class: its blocks, RoPE, ``optimized_attention`` and the
``optimized_attention_override`` / diffusion-model-wrapper hooks are the real ones; only the width is small, so
the block-by-block replays stay cheap) runs with productbg's wrapper installed as Mask-Guided Attention installs
it. The property, per block and bit for bit: with the block's inputs held fixed (image tokens and the free text
stream from one run, the full text stream from a run with another identifier), the product cells' output and the
free stream's output do not change; background cells do. The full-size model through the real sampler is in
``test_comfy_flux.py`` (its own process).
"""
from __future__ import annotations

import pytest
import torch

from dit_replay import BlockReplay, dit_keys

from productbg.attention import IdentifierGuidance, IdentifierSpec, ProductMask
from productbg.attention.comfy_joint import OVERRIDE_KEY, install_joint, token_grid
from productbg.attention.comfy_patch import OPTIONS_KEY
from productbg.attention.guided import Guidance
from productbg.attention.joint import ReduxStyle

pytestmark = pytest.mark.comfyui

WIDTH, TEXT, L, LATENT = 64, 48, 12, (8, 12)  # hidden width, T5 width, text tokens, latent h × w (grid 4 × 6)
IDENTIFIER = (3, 4)  # the identifier's token positions in the prompt


@pytest.fixture(scope="module")
def flux(comfy):
    from comfy.ldm.flux.model import Flux
    import comfy.ops

    model = Flux(operations=comfy.ops.disable_weight_init, in_channels=16, out_channels=16, vec_in_dim=32,
                 context_in_dim=TEXT, hidden_size=WIDTH, mlp_ratio=2.0, num_heads=2, depth=2, depth_single_blocks=2,
                 axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _texts(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt A, prompt B, the identifier-free prompt) [1, L, TEXT]: A and B differ in every token (T5 is
    bidirectional: the identifier reaches them all)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, L, TEXT, generator=g) for _ in range(3))


def _mask() -> torch.Tensor:
    mask = torch.zeros(1, 64, 96)
    mask[:, 16:48, 24:72] = 1.0  # a product in the middle; edge cells blend
    return mask


def _guidance(prompt: torch.Tensor, plain: torch.Tensor, strength: float = 1.0) -> Guidance:
    spec = IdentifierSpec(IDENTIFIER, context_length=L, plain_context=plain, prompt_context=prompt)
    return Guidance().with_identifier(IdentifierGuidance(spec, ProductMask(_mask()), strength))


def _options(guidance: Guidance | None, cond_or_uncond=(0, 1), redux: ReduxStyle | None = None, **extra) -> dict:
    options: dict = install_joint({}, guidance, redux)["transformer_options"] if guidance is not None else {}
    return {**options, "cond_or_uncond": list(cond_or_uncond), **extra}


def _inputs(batch: int = 2):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(batch, 16, *LATENT, generator=g)
    t = torch.full((batch,), 0.6)
    y = torch.randn(batch, 32, generator=g)
    return x, t, y, torch.full((batch,), 3.5)


def _forward(flux, context, options, recorder=None):
    x, t, y, guidance = _inputs(context.shape[0])
    if recorder is not None:
        keys = dit_keys(len(flux.double_blocks), len(flux.single_blocks))
        options = {**options, "patches_replace": {"dit": recorder.hooks(keys)}}
    with torch.no_grad():
        return flux(x, t, context, y=y, guidance=guidance, transformer_options=options)


def test_product_cells_and_the_free_stream_are_bit_identical_in_every_block_when_the_identifier_changes(flux):
    prompt_a, prompt_b, plain = _texts()
    negative = torch.randn(1, L, TEXT, generator=torch.Generator().manual_seed(3))
    first = BlockReplay(L, L)
    _forward(flux, torch.cat([prompt_a, negative]), _options(_guidance(prompt_a, plain)), first)
    second = BlockReplay(L, L, replay=first)
    _forward(flux, torch.cat([prompt_b, negative]), _options(_guidance(prompt_b, plain)), second)

    grid = token_grid(LATENT)
    product = (ProductMask(_mask()).background(grid, torch.device("cpu")) == 0).flatten()  # pure product cells
    background = (ProductMask(_mask()).background(grid, torch.device("cpu")) == 1).flatten()
    assert product.any() and background.any()
    assert len(first.outputs) == 4
    for key in first.outputs:
        img_a, free_a = first.image(key), first.free(key)
        img_b, free_b = second.image(key), second.free(key)
        assert torch.equal(img_a[0, product], img_b[0, product]), key
        assert torch.equal(free_a, free_b), key
        assert not torch.allclose(img_a[0, background], img_b[0, background]), key  # the identifier acts there
        assert torch.equal(img_a[1], img_b[1]), key  # the negative row never sees either prompt


@pytest.mark.parametrize("with_identifier", [True, False], ids=["identifier+redux", "redux"])
def test_redux_tokens_are_kept_off_the_product_in_every_block(flux, with_identifier):
    """Redux tokens appended to the text: the free stream is the prompt part alone (the identifier-free prompt when
    an identifier is confined too); product cells and the free stream do not change with the Redux tokens."""
    prompt, _, plain = _texts()
    R = 5
    g = torch.Generator().manual_seed(11)
    tokens = [torch.randn(1, R, TEXT, generator=g) for _ in range(2)]
    guidance = _guidance(prompt, plain) if with_identifier else Guidance()
    negative = torch.zeros(1, L + R, TEXT)
    runs = []
    for i, redux in enumerate(tokens):
        rec = BlockReplay(L + R, L, replay=runs[0] if runs else None)
        style = ReduxStyle(R, 1.0, ProductMask(_mask()))
        _forward(flux, torch.cat([torch.cat([prompt, redux], 1), negative]), _options(guidance, redux=style), rec)
        runs.append(rec)
    first, second = runs
    grid = token_grid(LATENT)
    weights = ProductMask(_mask()).background(grid, torch.device("cpu")).flatten()
    product, background = weights == 0, weights == 1
    for key in first.outputs:
        assert first.inputs[key]["img" if key[0] == "single_block" else "txt"].shape[1] >= 2 * L + R
        a, b = first.image(key), second.image(key)
        assert torch.equal(a[0, product], b[0, product]), key
        free_a, free_b = first.free(key), second.free(key)
        assert torch.equal(free_a, free_b), key
        assert not torch.allclose(a[0, background], b[0, background]), key
    if with_identifier:  # the free stream is the identifier-free prompt's evolution, not the prompt's
        assert not torch.equal(first.inputs["double_block", 0]["txt"][0, L + R:], first.inputs["double_block", 0]["txt"][0, :L])


def test_without_productbg_the_product_cells_do_change(flux):
    """The measure moves: the same replay on the unpatched model lets the identifier onto the product."""
    prompt_a, prompt_b, _ = _texts()
    first = BlockReplay(L, 0)
    _forward(flux, prompt_a, _options(None, (0,)), first)
    second = BlockReplay(L, 0, replay=first)
    _forward(flux, prompt_b, _options(None, (0,)), second)
    grid = token_grid(LATENT)
    product = (ProductMask(_mask()).background(grid, torch.device("cpu")) == 0).flatten()
    for key in first.outputs:
        assert not torch.allclose(first.image(key)[0, product], second.image(key)[0, product]), key


def test_strength_zero_and_a_prompt_without_the_identifier_leave_the_model_as_it_was(flux):
    prompt_a, _, plain = _texts()
    other = torch.randn(1, L, TEXT, generator=torch.Generator().manual_seed(5))
    context = torch.cat([prompt_a, other])
    unpatched = _forward(flux, context, _options(None))
    assert torch.equal(_forward(flux, context, _options(_guidance(prompt_a, plain, strength=0.0))), unpatched)
    # positive rows whose text is not the identifier's prompt keep their own text as free stream: same attention
    foreign = _forward(flux, torch.cat([other, other]), _options(_guidance(prompt_a, plain)))
    assert torch.allclose(foreign, _forward(flux, torch.cat([other, other]), _options(None)), atol=1e-5, rtol=1e-5)
    confined = _forward(flux, context, _options(_guidance(prompt_a, plain)))
    assert not torch.allclose(confined, unpatched, atol=1e-3)  # and with the prompt it acts


def test_another_packs_attention_override_still_runs_for_every_sub_attention(flux):
    prompt_a, _, plain = _texts()
    context = torch.cat([prompt_a, prompt_a])
    calls = []

    def counting(func, *args, **kwargs):
        calls.append(args[0].shape[2])
        return func(*args, **kwargs)

    alone = _forward(flux, context, _options(_guidance(prompt_a, plain)))
    stacked = _forward(flux, context, _options(_guidance(prompt_a, plain), **{OVERRIDE_KEY: counting}))
    assert torch.equal(alone, stacked)
    assert len(calls) >= 2 * 4  # each block's full and free sub-attentions went through the other pack's override
    unpatched_calls = len(calls)
    calls.clear()
    _forward(flux, context, _options(None, **{OVERRIDE_KEY: counting}))
    assert len(calls) == 4 and unpatched_calls > len(calls)  # one joint attention per block when unpatched


def test_the_override_is_set_for_the_call_only(flux):
    prompt_a, _, plain = _texts()
    options = _options(_guidance(prompt_a, plain))
    _forward(flux, torch.cat([prompt_a, prompt_a]), options)
    assert OVERRIDE_KEY not in options and isinstance(options[OPTIONS_KEY], Guidance)


def test_a_redux_model_sampled_without_its_conditioning_is_refused():
    """Reference Style Redux's MODEL with a positive that lacks its tokens would cut the prompt's own last tokens
    from the free stream: the sampling guard refuses it at the first step, in one line."""
    from productbg.attention.comfy_patch import REDUX_TAG, GuidanceError, guard_sampling

    options = install_joint({}, Guidance(), ReduxStyle(5, 1.0, ProductMask(_mask())))
    x = torch.zeros(1, 16, *LATENT)
    untagged = [[{"cross_attn": torch.zeros(1, L, TEXT), "uuid": "untagged"}], None]
    with pytest.raises(GuidanceError, match="connect both of its outputs"):
        guard_sampling(lambda *a: "ran", None, untagged, x, None, options)
    tagged = [[{"cross_attn": torch.zeros(1, L + 5, TEXT), "uuid": "tagged", REDUX_TAG: 5}], None]
    assert guard_sampling(lambda *a: "ran", None, tagged, x, None, options) == "ran"


def test_the_installed_options_survive_both_clone_semantics(flux):
    """ComfyUI 0.3.7x deep-copies model_options on clone, newer releases copy only dicts and lists: the wrapper, the
    guidance and a Redux style confine the same either way."""
    import copy

    prompt, _, plain = _texts()
    style = ReduxStyle(3, 1.0, ProductMask(_mask()))
    installed = install_joint({}, _guidance(prompt, plain), style)
    context = torch.cat([torch.cat([prompt, torch.randn(1, 3, TEXT)], 1), torch.zeros(1, L + 3, TEXT)])
    reference = _forward(flux, context, {**installed["transformer_options"], "cond_or_uncond": [0, 1]})
    for clone in (copy.deepcopy(installed), {k: (copy.copy(v) if isinstance(v, (dict, list)) else v)
                                              for k, v in installed.items()}):
        out = _forward(flux, context, {**clone["transformer_options"], "cond_or_uncond": [0, 1]})
        assert torch.equal(out, reference)
    assert not torch.equal(reference, _forward(flux, context, _options(None)))  # and it does confine
