"""Redux reference-style confinement on Flux's joint attention (attention/joint.py, attention/flux_processor.py):
text streams of unequal length, on a tiny diffusers FluxTransformer2DModel (2 double + 2 single blocks, random
weights, no download).

The text the model is called with is ``[prompt (L) ; Redux tokens (R)]`` (Lf = L + R); the free stream has neither
the identifier nor the Redux tokens (Lg = L). The property, per block and bit for bit: with the block's inputs held
fixed (captured by hooks in a real forward and the block re-run alone), the product cells' output and the free
stream's output do not change when the Redux tokens (or the identifier, or the whole full stream) change, and their
gradient with respect to the Redux tokens is exactly 0; background cells do change. Three modes: identifier +
Redux ("both"), Redux alone ("style"), and the identifier confined with a Redux left unconfined ("identifier":
the free stream is then [identifier-free prompt ; Redux tokens], Lg = Lf).
"""
import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from productbg.attention import IdentifierGuidance, IdentifierSpec, ProductMask
from productbg.attention.flux_processor import CALL_KEY, FluxJointProcessor, confined_inputs, install_flux_processors
from productbg.attention.joint import (JointCall, ReduxStyle, build_plan, confined_joint_attention,
                                       masked_joint_attention)

GRID = (6, 8)            # image tokens: a 96x128 image (latent 12x16, packed 2x2)
N = GRID[0] * GRID[1]
L = 10                   # prompt tokens
R = 7                    # Redux tokens appended to the prompt
LF = L + R               # the full text
WIDTH = 24               # "T5" width
IDENT = (3, 4)           # identifier token positions
REDUX = tuple(range(L, LF))
BLOCKS = [("transformer_blocks", 0), ("transformer_blocks", 1), ("single_transformer_blocks", 0),
          ("single_transformer_blocks", 1)]
MODES = ["both", "style"]


def tiny_flux(seed=0):
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=WIDTH,
                                   pooled_projection_dim=12, axes_dims_rope=(4, 6, 6)).eval()
    with torch.no_grad():  # make the AdaLN gates clearly non-zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def masks(kind="box"):
    """Pixel masks of the 96x128 image: product cells (>= 50 % cover), edge cells and background in each."""
    m = torch.zeros(2, 96, 128)
    m[0, 20:70, 30:90] = 1
    m[1, 40:96, 0:50] = 1
    return m[:1] if kind == "box" else m


def inputs(batch, seed=1):
    """latents, context [batch, L + R, WIDTH] ([prompt ; Redux]), identifier-free prompt, pooled, ids."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, N, 8, generator=g)
    context = torch.randn(batch, LF, WIDTH, generator=g)
    plain = torch.randn(1, L, WIDTH, generator=g)
    pooled = torch.randn(batch, 12, generator=g)
    txt_ids = torch.zeros(LF, 3)
    txt_ids[:, 0] = torch.arange(LF) % 5  # non-zero text positions, so a wrong RoPE for the free stream shows
    img_ids = torch.zeros(N, 3)
    img_ids[:, 1] = torch.arange(N) // GRID[1]
    img_ids[:, 2] = torch.arange(N) % GRID[1]
    return latents, context, plain, pooled, txt_ids, img_ids


def make_call(mode, plain, mask, strength=1.0, cond_or_uncond=(0,), method="partition", **style_kw):
    product = ProductMask(mask)
    if mode == "style":
        return JointCall(None, GRID, cond_or_uncond, method=method, text_tokens=LF,
                         style=ReduxStyle(R, strength, product=product, **style_kw))
    spec = IdentifierSpec(IDENT, context_length=L, plain_context=plain)
    style_strength = 0.0 if mode == "identifier" else strength
    return JointCall(IdentifierGuidance(spec, product, strength), GRID, cond_or_uncond, method=method,
                     style=ReduxStyle(R, style_strength, **style_kw))


def forward(model, call, latents, context, pooled, txt_ids, img_ids, t=0.7):
    return model(hidden_states=latents, pooled_projections=pooled, timestep=torch.full((latents.shape[0],), t),
                 img_ids=img_ids, **confined_inputs(call, context, txt_ids)).sample


def capture_blocks(model, call, *args):
    """Run the model once with the call; return each block's inputs (detached) keyed like BLOCKS."""
    captured, handles = {}, []
    for name, i in BLOCKS:
        def hook(module, a, kwargs, key=(name, i)):
            captured[key] = {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()}
        handles.append(getattr(model, name)[i].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            out = forward(model, call, *args)
    finally:
        for h in handles:
            h.remove()
    assert torch.isfinite(out).all()
    return captured


def run_block(model, key, kw, encoder):
    return getattr(model, key[0])[key[1]](**dict(kw, encoder_hidden_states=encoder))  # (text, image)


def cells(call, rows):
    """[rows, N] bool product cells (coverage >= threshold) and background cells (no coverage) per row."""
    cov = call.product.coverage(call.grid, torch.device("cpu"))
    cov = cov[torch.arange(rows) % (rows // len(call.cond_or_uncond)) % cov.shape[0]]
    return cov >= call.product.threshold, cov == 0


POSITIONS = {"redux": list(REDUX), "identifier": list(IDENT), "whole_stream": list(range(LF))}


def perturb(encoder, rows, where="redux", seed=5):
    """Move the full stream (its first LF tokens) of ``rows`` at ``where``."""
    g = torch.Generator().manual_seed(seed)
    out = encoder.clone()
    noise = torch.randn(out[:, :LF].shape, generator=g) * 3
    pos = POSITIONS[where]
    for r in rows:
        out[r, pos] += noise[r, pos]
    return out


def assert_block_exact(model, call, rows, where, kw, key, strength=1.0):
    enc = kw["encoder_hidden_states"]
    product, background = cells(call, enc.shape[0])
    with torch.no_grad():
        txt0, img0 = run_block(model, key, kw, enc)
        txt1, img1 = run_block(model, key, kw, perturb(enc, rows, where))
    for r in rows:
        assert product[r].any() and background[r].any()
        moved = (img1[r][product[r]] - img0[r][product[r]]).abs().max()
        if strength == 1.0:
            assert moved == 0, f"{key} row {r}: product cells moved with the {where}"
        else:
            assert moved > 1e-4, f"{key}: strength {strength}"
        assert torch.equal(txt1[r, LF:], txt0[r, LF:]), f"{key} row {r}: the free stream moved"
        assert (img1[r][background[r]] - img0[r][background[r]]).abs().max() > 1e-4, f"{key}: background inert"
        assert (txt1[r, :LF] - txt0[r, :LF]).abs().max() > 1e-4


@pytest.fixture(scope="module")
def model():
    m = tiny_flux()
    install_flux_processors(m)
    return m


# ------------------------------------------------------------------------------------------ lengths and streams
@pytest.mark.parametrize("mode", ["both", "style", "identifier"])
def test_free_stream_content_and_lengths(mode):
    _, context, plain, *_ = inputs(2)
    call = make_call(mode, plain, masks("box"), cond_or_uncond=(1, 0))
    assert call.text_len == LF and call.prompt_len == L
    assert call.free_len == (LF if mode == "identifier" else L)
    ext = call.extend_text(context)
    assert ext.shape == (2, LF + call.free_len, WIDTH) and torch.equal(ext[:, :LF], context)
    assert torch.equal(ext[0, LF:], context[0, :call.free_len])  # the negative: its own text, first Lg tokens
    expected = {"both": plain[0], "style": context[1, :L], "identifier": torch.cat([plain[0], context[1, L:]])}[mode]
    assert torch.equal(ext[1, LF:], expected)
    ids = torch.arange(LF * 3.0).reshape(LF, 3)
    ext_ids = call.extend_text_ids(ids)
    assert torch.equal(ext_ids, torch.cat([ids, ids[:call.free_len]]))
    batched = ids[None].repeat(2, 1, 1)  # diffusers' older [B, L, 3] ids
    assert torch.equal(JointCall.extend_ids(batched, L), torch.cat([batched, batched[:, :L]], 1))
    assert torch.equal(JointCall.extend_ids(ids), torch.cat([ids, ids]))  # equal lengths, as before
    with pytest.raises(ValueError, match="longer"):
        JointCall.extend_ids(ids, LF + 1)


def test_plan_lengths_and_negative_rows():
    _, context, plain, *_ = inputs(2)
    call = make_call("both", plain, masks("box"), cond_or_uncond=(1, 0))
    plan = call.plan(2, torch.device("cpu"), torch.float32)
    assert (plan.text_len, plan.free_len, plan.image_len, plan.sequence_len) == (LF, L, N, LF + L + N)
    share = call.share(2)
    assert share[0].eq(0).all() and share[1].gt(0).any()
    # Lg < Lf: the negative row's free stream is not its text, so all of its cells attend through the full view
    assert plan.full_count == N and plan.full_index[0].tolist() == list(range(N))
    assert plan.free_count == int((share[1] > 0).sum()) and not plan.free_cells[0].any()
    # equal lengths (the identifier with an unconfined Redux): the negative fills spare room, as without Redux
    same = make_call("identifier", plain, masks("box"), cond_or_uncond=(1, 0)).plan(2, torch.device("cpu"),
                                                                                    torch.float32)
    assert same.free_len == same.text_len == LF and same.full_count + same.free_count < 2 * N


# ------------------------------------------------------------------------------------------ processor equality
@pytest.mark.parametrize("method", ["partition", "mask"])
@pytest.mark.parametrize("mode", ["both", "style", "identifier"])
@pytest.mark.parametrize("key", BLOCKS)
def test_attention_is_the_blend_of_two_unpatched_attentions(model, key, mode, method):
    """Each attention call equals diffusers' own processor run twice — over [full text (Lf) ; image] and over
    [free text (Lg) ; image], each at its text's RoPE positions — with image cells blended by a."""
    latents, context, plain, pooled, txt_ids, img_ids = inputs(2)
    call = make_call(mode, plain, masks("two"), strength=0.8, method=method)  # 0.8: product cells blend too
    lg = call.free_len
    seen = {}
    attn = getattr(model, key[0])[key[1]].attn
    h = attn.register_forward_pre_hook(lambda mod, a, kw: seen.update(kw), with_kwargs=True)
    try:
        capture_blocks(model, call, latents, context, pooled, txt_ids, img_ids)
    finally:
        h.remove()
    cos, sin = seen["image_rotary_emb"]
    assert cos.shape[0] == LF + lg + N
    assert torch.equal(cos[LF:LF + lg], cos[:lg]) and torch.equal(sin[LF:LF + lg], sin[:lg])  # free positions
    rope_full = (torch.cat([cos[:LF], cos[LF + lg:]]), torch.cat([sin[:LF], sin[LF + lg:]]))
    rope_free = (cos[LF:], sin[LF:])
    ref = FluxAttnProcessor()
    a = call.share(2)[:, :, None]
    with torch.no_grad():
        if "encoder_hidden_states" in seen:  # double block
            img, enc = seen["hidden_states"], seen["encoder_hidden_states"]
            out_img, out_txt = FluxJointProcessor()(attn, img, enc, image_rotary_emb=(cos, sin), productbg=call)
            full_img, full_txt = ref(attn, img, enc[:, :LF], image_rotary_emb=rope_full)
            free_img, free_txt = ref(attn, img, enc[:, LF:], image_rotary_emb=rope_free)
        else:
            x = seen["hidden_states"]
            out = FluxJointProcessor()(attn, x, image_rotary_emb=(cos, sin), productbg=call)
            full = ref(attn, torch.cat([x[:, :LF], x[:, LF + lg:]], 1), image_rotary_emb=rope_full)
            free_ = ref(attn, x[:, LF:], image_rotary_emb=rope_free)
            out_txt, out_img = out[:, :LF + lg], out[:, LF + lg:]
            full_txt, full_img, free_txt, free_img = full[:, :LF], full[:, LF:], free_[:, :lg], free_[:, lg:]
    assert (a > 0).any() and (a == 0).any() and ((a > 0) & (a < 0.8)).any()  # background, product, edge cells
    torch.testing.assert_close(out_txt[:, :LF], full_txt, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_txt[:, LF:], free_txt, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_img, torch.lerp(full_img, free_img, a), atol=1e-5, rtol=1e-5)
    assert (full_img - free_img).abs().max() > 1e-3  # the two views differ: the comparison means something


def test_model_equals_unpatched_when_nothing_is_confined(model):
    """Strength 0, or a CFG negative alone (its free stream shorter than its text): the image output is the
    unpatched model's on the Redux-extended text, to float tolerance; and the processor without a call is
    diffusers' on that text."""
    latents, context, plain, pooled, txt_ids, img_ids = inputs(2)
    kw = dict(hidden_states=latents, pooled_projections=pooled, timestep=torch.full((2,), 0.5), img_ids=img_ids)
    fresh = tiny_flux()
    with torch.no_grad():
        ref = fresh(encoder_hidden_states=context, txt_ids=txt_ids, **kw).sample
        assert torch.equal(model(encoder_hidden_states=context, txt_ids=txt_ids, **kw).sample, ref)
        calls = [make_call("both", plain, masks("two"), strength=0.0),
                 make_call("style", plain, masks("two"), strength=0.0),
                 make_call("both", plain, masks("two"), cond_or_uncond=(1,)),
                 make_call("style", plain, masks("two"), cond_or_uncond=(1,))]
        for call in calls:
            assert call.free_len == (LF if not call.active else L)
            out = model(**confined_inputs(call, context, txt_ids), **kw).sample
            torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ exactness per block
@pytest.mark.parametrize("method", ["partition", "mask"])
@pytest.mark.parametrize("mode,where", [("both", "redux"), ("both", "identifier"), ("both", "whole_stream"),
                                        ("style", "redux"), ("style", "whole_stream")])
def test_product_cells_and_free_stream_exact_in_every_block(model, mode, where, method):
    latents, context, plain, pooled, txt_ids, img_ids = inputs(1)
    call = make_call(mode, plain, masks("box"), method=method)
    captured = capture_blocks(model, call, latents, context, pooled, txt_ids, img_ids)
    assert set(captured) == set(BLOCKS)
    for key in BLOCKS:
        assert captured[key]["encoder_hidden_states"].shape[1] == LF + L
        assert_block_exact(model, call, [0], where, captured[key], key)


def test_identifier_confined_with_an_unconfined_redux(model):
    """Redux strength 0 beside an identifier: the free stream keeps the Redux tokens (Lg = Lf), so product cells
    follow them, and stay exact under the identifier."""
    latents, context, plain, pooled, txt_ids, img_ids = inputs(1)
    call = make_call("identifier", plain, masks("box"))
    assert call.identifier_active and not call.style_active and call.free_len == LF
    captured = capture_blocks(model, call, latents, context, pooled, txt_ids, img_ids)
    product, _ = cells(call, 1)
    g = torch.Generator().manual_seed(3)
    for key in BLOCKS:
        kw = captured[key]
        assert_block_exact(model, call, [0], "identifier", kw, key)
        enc = kw["encoder_hidden_states"]
        moved, noise = enc.clone(), torch.randn(enc[:, list(REDUX)].shape, generator=g)
        moved[:, list(REDUX)] += noise
        moved[:, [LF + i for i in REDUX]] += noise  # the Redux tokens of both streams (a constant: LayerNorm eats it)
        with torch.no_grad():
            _, img0 = run_block(model, key, kw, enc)
            _, img1 = run_block(model, key, kw, moved)
        assert (img1[0][product[0]] - img0[0][product[0]]).abs().max() > 1e-4, f"{key}: Redux confined anyway"


def test_batch_of_two_products_with_different_masks(model):
    latents, context, plain, pooled, txt_ids, img_ids = inputs(2)
    for mode in MODES:
        call = make_call(mode, plain, masks("two"))
        plan = call.plan(2, torch.device("cpu"), torch.float32)
        product, _ = cells(call, 2)
        assert product.sum(1).tolist()[0] != product.sum(1).tolist()[1]  # different product sizes: padded groups
        assert plan.free_count == int((call.share(2) > 0).sum(1).max())
        captured = capture_blocks(model, call, latents, context, pooled, txt_ids, img_ids)
        for key in BLOCKS:
            assert_block_exact(model, call, [0, 1], "redux", captured[key], key)
            assert_block_exact(model, call, [1], "whole_stream", captured[key], key)
            with torch.no_grad():
                enc = captured[key]["encoder_hidden_states"]
                _, img0 = run_block(model, key, captured[key], enc)
                _, img1 = run_block(model, key, captured[key], perturb(enc, [1], "whole_stream"))
            assert torch.equal(img0[0], img1[0])  # rows do not mix


@pytest.mark.parametrize("mode", MODES)
def test_cfg_rows_negative_without_confinement(model, mode):
    """Batch [negative ; positive] (uncond first, as ComfyUI may batch it). The negative row carries its own text
    cut to Lg tokens as its free stream, and every one of its cells reads the full view: its output is the
    unpatched model's on its own text; the positive row is confined."""
    latents, context, plain, pooled, txt_ids, img_ids = inputs(2)
    call = make_call(mode, plain, masks("box"), cond_or_uncond=(1, 0))
    captured = capture_blocks(model, call, latents, context, pooled, txt_ids, img_ids)
    for key in BLOCKS:
        kw = captured[key]
        assert_block_exact(model, call, [1], "redux", kw, key)
        enc = kw["encoder_hidden_states"]
        with torch.no_grad():
            _, img0 = run_block(model, key, kw, enc)
            _, img1 = run_block(model, key, kw, perturb(enc, [0], "redux"))
        # the negative row: every cell reads its whole text, its Redux-position tokens included
        assert (img1[0] - img0[0]).abs().amax(-1).min() > 0, f"{key}: a negative-row cell ignores its text"
        assert torch.equal(img1[1], img0[1])
    with torch.no_grad():
        ref = tiny_flux()(hidden_states=latents[:1], encoder_hidden_states=context[:1], pooled_projections=pooled[:1],
                          timestep=torch.full((1,), 0.7), img_ids=img_ids, txt_ids=txt_ids).sample
        out = forward(model, call, latents, context, pooled, txt_ids, img_ids)
    torch.testing.assert_close(out[:1], ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_strength_half_lets_the_redux_in(model, mode):
    latents, context, plain, pooled, txt_ids, img_ids = inputs(1)
    call = make_call(mode, plain, masks("box"), strength=0.5)
    captured = capture_blocks(model, call, latents, context, pooled, txt_ids, img_ids)
    for key in BLOCKS:
        assert_block_exact(model, call, [0], "redux", captured[key], key, strength=0.5)


@pytest.mark.parametrize("method", ["partition", "mask"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_gradient_to_the_redux_tokens(model, mode, method, strength):
    """d(product cells' and free stream's block output)/d(Redux tokens), other inputs detached: exactly 0 in every
    block at strength 1 (and not 0 at strength 0.5: the measure moves); the background's gradient is not 0."""
    latents, context, plain, pooled, txt_ids, img_ids = inputs(2)
    call = make_call(mode, plain, masks("two"), strength=strength, method=method)
    captured = capture_blocks(model, call, latents, context, pooled, txt_ids, img_ids)
    product, background = cells(call, 2)
    g = torch.Generator().manual_seed(9)
    for key in BLOCKS:
        kw = captured[key]
        enc = kw["encoder_hidden_states"]
        redux = enc[:, L:LF].clone().requires_grad_(True)
        built = torch.cat([enc[:, :L], redux, enc[:, LF:]], 1)
        txt, img = run_block(model, key, kw, built)
        w_img, w_txt = torch.randn(img.shape, generator=g), torch.randn(txt[:, LF:].shape, generator=g)
        (grad_free,) = torch.autograd.grad((txt[:, LF:] * w_txt).sum(), redux, retain_graph=True)
        assert torch.equal(grad_free, torch.zeros_like(grad_free)), f"{key}: free stream {grad_free.abs().max()}"
        (grad,) = torch.autograd.grad((img * w_img * product[:, :, None]).sum(), redux, retain_graph=True)
        if strength == 1.0:
            assert torch.equal(grad, torch.zeros_like(grad)), f"{key}: {grad.abs().max()}"
        else:
            assert grad[0].abs().max() > 0 and grad[1].abs().max() > 0, key
        (grad_bg,) = torch.autograd.grad((img * w_img * background[:, :, None]).sum(), redux)
        assert (grad_bg[0].abs().max() > 0) and (grad_bg[1].abs().max() > 0), key


# ---------------------------------------------------------------------------------------------- methods agree
@pytest.mark.parametrize("mode", ["both", "style", "identifier"])
def test_mask_method_agrees_with_partition_on_the_model(model, mode):
    latents, context, plain, pooled, txt_ids, img_ids = inputs(2)
    for coc, strength in (((0,), 0.8), ((1, 0), 1.0)):
        with torch.no_grad():
            outs = [forward(model, make_call(mode, plain, masks("two"), strength, coc, method=m), latents, context,
                            pooled, txt_ids, img_ids) for m in ("partition", "mask")]
        torch.testing.assert_close(outs[0], outs[1], atol=2e-5, rtol=1e-5)


def test_partition_matches_mask_with_unequal_lengths():
    """Rows that are all product, mixed rows, unconfined rows whose free stream is shorter: both methods agree,
    and the partition's free-only cells are bit-identical when the full stream changes."""
    torch.manual_seed(0)
    n, heads, d, lf, lg = 12, 2, 8, 9, 5
    share = torch.tensor([[1.0] * n, [0.0] * 4 + [0.3] * 4 + [1.0] * 4, [0.5] * n])
    for confined in ([True, True, True], [True, False, True], [False, True, False]):
        plan = build_plan(share, confined, lf, "cpu", torch.float32, free_len=lg)
        q, k, v = (torch.randn(3, heads, lf + lg + n, d) for _ in range(3))
        a = confined_joint_attention(q, k, v, plan)
        torch.testing.assert_close(a, masked_joint_attention(q, k, v, plan), atol=1e-6, rtol=1e-5)
        k2, v2 = k.clone(), v.clone()
        k2[:, :, :lf] += 1.0
        v2[:, :, :lf] -= 2.0
        b = confined_joint_attention(q, k2, v2, plan)
        assert torch.equal(a[:, :, lf:lf + lg], b[:, :, lf:lf + lg])  # the free stream
        for r, c in enumerate(confined):
            if c:
                only_free = plan.take_free[r, 0, :, 0]
                assert torch.equal(a[r, :, lf + lg:][:, only_free], b[r, :, lf + lg:][:, only_free])
            else:  # an unconfined row reads its full text in every cell
                assert (a[r, :, lf + lg:] - b[r, :, lf + lg:]).abs().amax((0, 2)).min() > 0
    with pytest.raises(ValueError, match="5 free text"):
        confined_joint_attention(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], plan)


# ---------------------------------------------------------------------------------------------- sigma gates
def test_sigma_gates_choose_what_the_free_stream_drops(model):
    """A style with a sigma range beside an ungated identifier, and the other way round: outside the range the
    component is not confined, so the free stream keeps it; inside, drops it. Plans are cached per state."""
    latents, context, plain, pooled, txt_ids, img_ids = inputs(1)
    product = ProductMask(masks("box"))
    spec = IdentifierSpec(IDENT, context_length=L, plain_context=plain)
    call = JointCall(IdentifierGuidance(spec, product, 1.0), GRID, sigma=0.9,
                     style=ReduxStyle(R, 1.0, sigma_start=0.8))
    assert call.identifier_active and not call.style_active and call.free_len == LF
    inside = call.for_call(sigma=0.5)
    assert inside.style_active and inside.free_len == L and inside._plans is call._plans
    assert inside.plan(1, torch.device("cpu"), torch.float32).free_len == L
    assert call.plan(1, torch.device("cpu"), torch.float32).free_len == LF
    assert torch.equal(call.extend_text(context)[0, LF:], torch.cat([plain[0], context[0, L:]]))
    assert torch.equal(inside.extend_text(context)[0, LF:], plain[0])
    # the identifier gated off, the style on: the free stream is the row's own prompt, identifier included
    gated = JointCall(IdentifierGuidance(spec, product, 1.0, sigma_start=0.8), GRID, sigma=0.9,
                      style=ReduxStyle(R, 1.0))
    assert not gated.identifier_active and gated.style_active and gated.free_len == L
    assert torch.equal(gated.extend_text(context)[0, LF:], context[0, :L])
    captured = capture_blocks(model, gated, latents, context, pooled, txt_ids, img_ids)
    prod, _ = cells(gated, 1)
    g = torch.Generator().manual_seed(3)
    for key in BLOCKS:
        kw = captured[key]
        assert_block_exact(model, gated, [0], "redux", kw, key)
        enc = kw["encoder_hidden_states"]
        moved, noise = enc.clone(), torch.randn(enc[:, list(IDENT)].shape, generator=g)
        moved[:, list(IDENT)] += noise
        moved[:, [LF + i for i in IDENT]] += noise  # the identifier in both streams
        with torch.no_grad():
            _, img0 = run_block(model, key, kw, enc)
            _, img1 = run_block(model, key, kw, moved)
        assert (img1[0][prod[0]] - img0[0][prod[0]]).abs().max() > 1e-4, f"{key}: identifier confined anyway"


# ---------------------------------------------------------------------------------------------- API and refusals
def test_style_alone_takes_its_text_length_per_call():
    mask = ProductMask(masks())
    call = JointCall(None, GRID, style=ReduxStyle(R, product=mask))
    with pytest.raises(ValueError, match="text_tokens"):
        call.text_len
    bound = call.for_call(cond_or_uncond=(1, 0), text_tokens=LF)
    assert (bound.text_len, bound.prompt_len, bound.free_len) == (LF, L, L)
    assert bound.cond_or_uncond == (1, 0) and bound._plans is call._plans
    assert bound.for_call(text_tokens=LF + 5).free_len == L + 5  # another prompt length, the same R


def test_refusals():
    plain = torch.randn(1, L, WIDTH)
    spec = IdentifierSpec(IDENT, context_length=L, plain_context=plain)
    product = ProductMask(masks())
    ident = IdentifierGuidance(spec, product, 1.0)
    with pytest.raises(ValueError, match="nothing to confine"):
        JointCall(None, GRID)
    with pytest.raises(ValueError, match="one strength"):
        JointCall(IdentifierGuidance(spec, product, 0.7), GRID, style=ReduxStyle(R, 1.0))
    JointCall(IdentifierGuidance(spec, product, 0.0), GRID, style=ReduxStyle(R, 1.0))  # one of them off: fine
    with pytest.raises(ValueError, match="one product mask"):
        other = masks()
        other[:, :10] = 1
        JointCall(ident, GRID, style=ReduxStyle(R, product=ProductMask(other)))
    JointCall(ident, GRID, style=ReduxStyle(R, product=ProductMask(masks())))  # an equal mask: fine
    with pytest.raises(ValueError, match="product masks"):
        JointCall(None, GRID, style=ReduxStyle(R), text_tokens=LF)
    with pytest.raises(ValueError, match="sigma"):
        JointCall(ident, GRID, style=ReduxStyle(R, sigma_start=0.5))
    with pytest.raises(ValueError, match="positive number"):
        ReduxStyle(0)
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        ReduxStyle(R, 1.5)
    with pytest.raises(ValueError, match="identifier's prompt has"):
        JointCall(ident, GRID, style=ReduxStyle(R), text_tokens=LF + 1)
    with pytest.raises(ValueError, match="no prompt"):
        JointCall(None, GRID, style=ReduxStyle(R, product=product), text_tokens=R)
    call = JointCall(ident, GRID, style=ReduxStyle(R))
    with pytest.raises(ValueError, match=f"expects {LF}"):
        call.extend_text(torch.randn(1, L, WIDTH))  # the prompt without its Redux tokens
    with pytest.raises(ValueError, match="extend_text"):
        call.check_sequence(LF, N)
    call.check_sequence(LF + L, N)
    m = tiny_flux()
    install_flux_processors(m)
    latents, context, _, pooled, txt_ids, img_ids = inputs(1)
    with pytest.raises(ValueError, match="extend_text"), torch.no_grad():  # the stream was not extended
        m(hidden_states=latents, encoder_hidden_states=context, pooled_projections=pooled,
          timestep=torch.full((1,), 0.5), img_ids=img_ids, txt_ids=txt_ids, joint_attention_kwargs={CALL_KEY: call})


def test_kernel_per_attention_call():
    """A host that learns its kernel per attention call (ComfyUI's override) hands it to attention(); the two
    sub-attentions of the partition run through it, with key sets of their own lengths."""
    _, context, plain, *_ = inputs(1)
    call = make_call("both", plain, masks("box"))
    q, k, v = (torch.randn(1, 2, LF + L + N, 8) for _ in range(3))
    seen = []

    def kernel(q_, k_, v_):
        seen.append(k_.shape[2])
        return torch.nn.functional.scaled_dot_product_attention(q_, k_, v_)

    out = call.attention(q, k, v, kernel=kernel)
    assert sorted(seen) == [L + N, LF + N]
    assert torch.equal(out, call.attention(q, k, v))
