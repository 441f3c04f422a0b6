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
        options = {**options, "patches_replace": {"dit": recorder.hooks(flux)}}
    with torch.no_grad():
        return flux(x, t, context, y=y, guidance=guidance, transformer_options=options)


class Recorder:
    """``patches_replace["dit"]`` hooks on every block: record each block's inputs and outputs, or replay a
    recorded run's image tokens (and, with two text streams, its free stream) into the block; the full text
    stream stays this run's own."""

    def __init__(self, replay: "Recorder | None" = None, streams: int = 2, lf: int = L, lg: int | None = None) -> None:
        self.replay, self.lf = replay, lf
        self.lg = (lf if streams == 2 else 0) if lg is None else lg
        self.text = self.lf + self.lg
        self.inputs: dict = {}
        self.outputs: dict = {}

    def hooks(self, flux) -> dict:
        keys = [("double_block", i) for i in range(len(flux.double_blocks))]
        keys += [("single_block", i) for i in range(len(flux.single_blocks))]
        return {key: (lambda args, extra, key=key: self._block(key, args, extra)) for key in keys}

    def _block(self, key, args, extra):
        args = dict(args)
        if self.replay is not None:
            before = self.replay.inputs[key]
            lf = self.lf
            if key[0] == "double_block":
                args["img"] = before["img"]
                args["txt"] = torch.cat([args["txt"][:, :lf], before["txt"][:, lf:]], 1)
            else:
                args["img"] = torch.cat([args["img"][:, :lf], before["img"][:, lf:]], 1)
        args = {k: (v.clone() if k in ("img", "txt") else v) for k, v in args.items()}  # blocks add in place
        self.inputs[key] = {k: v.clone() for k, v in args.items() if k in ("img", "txt")}
        out = extra["original_block"](args)
        self.outputs[key] = {k: v.clone() for k, v in out.items()}
        return out

    def image(self, key) -> torch.Tensor:
        """A block's output image tokens [B, N, W]."""
        out = self.outputs[key]["img"]
        return out if key[0] == "double_block" else out[:, self.text:]


def _free(key, out, lf: int = L, lg: int = L) -> torch.Tensor:
    """The free text stream [B, lg, W] of a block's output (the full stream has lf tokens)."""
    return out["txt"][:, lf:] if key[0] == "double_block" else out["img"][:, lf:lf + lg]


def test_product_cells_and_the_free_stream_are_bit_identical_in_every_block_when_the_identifier_changes(flux):
    prompt_a, prompt_b, plain = _texts()
    negative = torch.randn(1, L, TEXT, generator=torch.Generator().manual_seed(3))
    first = Recorder()
    _forward(flux, torch.cat([prompt_a, negative]), _options(_guidance(prompt_a, plain)), first)
    second = Recorder(replay=first)
    _forward(flux, torch.cat([prompt_b, negative]), _options(_guidance(prompt_b, plain)), second)

    grid = token_grid(LATENT)
    product = (ProductMask(_mask()).background(grid, torch.device("cpu")) == 0).flatten()  # pure product cells
    background = (ProductMask(_mask()).background(grid, torch.device("cpu")) == 1).flatten()
    assert product.any() and background.any()
    assert len(first.outputs) == 4
    for key in first.outputs:
        img_a, free_a = first.image(key), _free(key, first.outputs[key])
        img_b, free_b = second.image(key), _free(key, second.outputs[key])
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
        rec = Recorder(replay=runs[0] if runs else None, lf=L + R, lg=L)
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
        free_a, free_b = _free(key, first.outputs[key], L + R, L), _free(key, second.outputs[key], L + R, L)
        assert torch.equal(free_a, free_b), key
        assert not torch.allclose(a[0, background], b[0, background]), key
    if with_identifier:  # the free stream is the identifier-free prompt's evolution, not the prompt's
        assert not torch.equal(first.inputs["double_block", 0]["txt"][0, L + R:], first.inputs["double_block", 0]["txt"][0, :L])


def test_without_productbg_the_product_cells_do_change(flux):
    """The measure moves: the same replay on the unpatched model lets the identifier onto the product."""
    prompt_a, prompt_b, _ = _texts()
    first = Recorder(streams=1)
    _forward(flux, prompt_a, _options(None, (0,)), first)
    second = Recorder(replay=first, streams=1)
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
