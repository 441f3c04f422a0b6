"""Identifier confinement on Flux's joint attention (attention/joint.py, attention/flux_processor.py), on a tiny
diffusers FluxTransformer2DModel (2 double + 2 single blocks, random weights, no download).

The property, per block and bit for bit: with the block's inputs held fixed (captured by hooks in a real forward
and the block re-run alone), the product cells' output and the identifier-free text stream's output do not change
when the full text stream changes — at the identifier's positions or as a whole — and their gradient with
respect to it is exactly 0; background cells do change.
"""
import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from productbg.attention import IdentifierGuidance, IdentifierSpec, ProductMask
from productbg.attention.flux_processor import CALL_KEY, FluxJointProcessor, apply_rope, install_flux_processors
from productbg.attention.joint import JointCall, build_plan, confined_joint_attention, flux_token_grid

GRID = (6, 8)            # image tokens: a 96x128 image (latent 12x16, packed 2x2)
L = 10                   # text tokens per stream
WIDTH = 24               # "T5" width
IDENT = (3, 4)           # identifier token positions
BLOCKS = [("transformer_blocks", 0), ("transformer_blocks", 1), ("single_transformer_blocks", 0),
          ("single_transformer_blocks", 1)]


def tiny_flux(seed=0):
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=WIDTH,
                                   pooled_projection_dim=12, axes_dims_rope=(4, 6, 6)).eval()
    with torch.no_grad():  # diffusers zero-initialises nothing here, but make the AdaLN gates clearly non-zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def masks(kind="box"):
    """Pixel masks of the 96x128 image: product cells (>= 50 % cover), edge cells and background in each."""
    m = torch.zeros(2, 96, 128)
    m[0, 20:70, 30:90] = 1          # product in the middle, ragged edges
    m[1, 40:96, 0:50] = 1           # another product, bottom left
    return m[:1] if kind == "box" else m


def inputs(batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = GRID[0] * GRID[1]
    latents = torch.randn(batch, n, 8, generator=g)
    context = torch.randn(batch, L, WIDTH, generator=g)
    free = torch.randn(1, L, WIDTH, generator=g)
    pooled = torch.randn(batch, 12, generator=g)
    txt_ids = torch.zeros(L, 3)
    txt_ids[:, 0] = torch.arange(L) % 3  # non-zero text positions, so a wrong RoPE for the free stream shows
    img_ids = torch.zeros(n, 3)
    img_ids[:, 1] = torch.arange(n) // GRID[1]
    img_ids[:, 2] = torch.arange(n) % GRID[1]
    return latents, context, free, pooled, txt_ids, img_ids


def make_call(free, mask, strength=1.0, cond_or_uncond=(0,), method="partition"):
    spec = IdentifierSpec(IDENT, context_length=L, plain_context=free)
    return JointCall(IdentifierGuidance(spec, ProductMask(mask), strength), GRID, cond_or_uncond, method=method)


def capture_blocks(model, call, latents, context, pooled, txt_ids, img_ids):
    """Run the model once with the call; return each block's inputs (detached) keyed like BLOCKS."""
    captured, handles = {}, []
    for name, i in BLOCKS:
        def hook(module, args, kwargs, key=(name, i)):
            captured[key] = {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()}
        handles.append(getattr(model, name)[i].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(hidden_states=latents, encoder_hidden_states=call.extend_text(context),
                        pooled_projections=pooled, timestep=torch.full((latents.shape[0],), 0.7),
                        img_ids=img_ids, txt_ids=JointCall.extend_ids(txt_ids),
                        joint_attention_kwargs={CALL_KEY: call}).sample
    finally:
        for h in handles:
            h.remove()
    assert torch.isfinite(out).all()
    return captured


def run_block(model, key, kw, encoder):
    block = getattr(model, key[0])[key[1]]
    args = dict(kw, encoder_hidden_states=encoder)
    return block(**args)  # (encoder_hidden_states, hidden_states)


def cells(call, rows):
    """[rows, N] bool product cells (coverage >= threshold) and background cells (no coverage) per row."""
    g = call.identifier
    cov = g.product.coverage(call.grid, torch.device("cpu"))
    cov = cov[torch.arange(rows) % (rows // len(call.cond_or_uncond)) % cov.shape[0]]
    return cov >= g.product.threshold, cov == 0


def perturb(encoder, rows, where="identifier", seed=5):
    g = torch.Generator().manual_seed(seed)
    out = encoder.clone()
    noise = torch.randn(out[:, :L].shape, generator=g) * 3
    pos = list(IDENT) if where == "identifier" else list(range(L))
    for r in rows:
        out[r, pos] += noise[r, pos]
    return out


@pytest.fixture(scope="module")
def model():
    m = tiny_flux()
    install_flux_processors(m)
    return m


# ------------------------------------------------------------------------------------------ processor equality
def test_processor_without_call_is_diffusers_flux_processor():
    """Installed but not asked for, the processor is diffusers' FluxAttnProcessor (so it can stay installed)."""
    m = tiny_flux()
    latents, context, free, pooled, txt_ids, img_ids = inputs(2)
    kw = dict(hidden_states=latents, encoder_hidden_states=context, pooled_projections=pooled,
              timestep=torch.full((2,), 0.3), img_ids=img_ids, txt_ids=txt_ids)
    with torch.no_grad():
        ref = m(**kw).sample
        assert install_flux_processors(m) == {"double": 2, "single": 2}
        out = m(**kw).sample
    assert torch.equal(out, ref)


def test_rope_equals_diffusers():
    from diffusers.models.embeddings import apply_rotary_emb
    x = torch.randn(2, 7, 3, 16, dtype=torch.bfloat16)
    cos, sin = torch.randn(7, 16), torch.randn(7, 16)
    assert torch.equal(apply_rope(x, cos, sin), apply_rotary_emb(x, (cos, sin), sequence_dim=1))


@pytest.mark.parametrize("method", ["partition", "mask"])
@pytest.mark.parametrize("key", BLOCKS)
def test_attention_is_the_blend_of_two_unpatched_attentions(model, key, method):
    """Each attention call equals diffusers' own processor run twice — over [full text ; image] and over
    [free text ; image], each at the text's RoPE positions — with image cells blended by a (edges included)."""
    latents, context, free, pooled, txt_ids, img_ids = inputs(2)
    call = make_call(free, masks("two"), strength=0.8, method=method)  # 0.8: product cells blend too
    seen = {}
    attn = getattr(model, key[0])[key[1]].attn
    h = attn.register_forward_pre_hook(lambda mod, a, kw: seen.update(kw), with_kwargs=True)
    try:
        capture_blocks(model, call, latents, context, pooled, txt_ids, img_ids)
    finally:
        h.remove()
    cos, sin = seen["image_rotary_emb"]
    assert torch.equal(cos[L:2 * L], cos[:L]) and torch.equal(sin[L:2 * L], sin[:L])  # free stream's positions
    rope = (torch.cat([cos[:L], cos[2 * L:]]), torch.cat([sin[:L], sin[2 * L:]]))
    ref = FluxAttnProcessor()
    a = call.share(2)[:, :, None]
    with torch.no_grad():
        if "encoder_hidden_states" in seen:  # double block
            img, enc = seen["hidden_states"], seen["encoder_hidden_states"]
            out_img, out_txt = FluxJointProcessor()(attn, img, enc, image_rotary_emb=(cos, sin), productbg=call)
            full_img, full_txt = ref(attn, img, enc[:, :L], image_rotary_emb=rope)
            free_img, free_txt = ref(attn, img, enc[:, L:], image_rotary_emb=rope)
        else:
            x = seen["hidden_states"]
            out = FluxJointProcessor()(attn, x, image_rotary_emb=(cos, sin), productbg=call)
            full = ref(attn, torch.cat([x[:, :L], x[:, 2 * L:]], 1), image_rotary_emb=rope)
            free_ = ref(attn, x[:, L:], image_rotary_emb=rope)
            out_txt, out_img = out[:, :2 * L], out[:, 2 * L:]
            full_txt, full_img, free_txt, free_img = full[:, :L], full[:, L:], free_[:, :L], free_[:, L:]
    assert (a > 0).any() and (a == 0).any() and ((a > 0) & (a < 0.8)).any()  # background, product, edge cells
    torch.testing.assert_close(out_txt[:, :L], full_txt, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_txt[:, L:], free_txt, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_img, torch.lerp(full_img, free_img, a), atol=1e-5, rtol=1e-5)
    assert (full_img - free_img).abs().max() > 1e-3  # the two views differ: the comparison means something


def test_model_equals_unpatched_when_nothing_is_confined(model):
    """Strength 0, or a CFG negative alone: the image output is the unpatched model's (the free stream is carried
    but read by no image cell), to float tolerance."""
    latents, context, free, pooled, txt_ids, img_ids = inputs(2)
    kw = dict(hidden_states=latents, pooled_projections=pooled, timestep=torch.full((2,), 0.5), img_ids=img_ids)
    with torch.no_grad():
        ref = model(encoder_hidden_states=context, txt_ids=txt_ids, **kw).sample
        for call in (make_call(free, masks("two"), strength=0.0), make_call(free, masks("two"), cond_or_uncond=(1,))):
            out = model(encoder_hidden_states=call.extend_text(context), txt_ids=JointCall.extend_ids(txt_ids),
                        joint_attention_kwargs={CALL_KEY: call}, **kw).sample
            torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ exactness per block
def assert_block_exact(model, call, rows_with_identifier, where, kw, key, strength=1.0):
    enc = kw["encoder_hidden_states"]
    rows = enc.shape[0]
    product, background = cells(call, rows)
    with torch.no_grad():
        txt0, img0 = run_block(model, key, kw, enc)
        txt1, img1 = run_block(model, key, kw, perturb(enc, rows_with_identifier, where))
    for r in rows_with_identifier:
        assert product[r].any() and background[r].any()
        if strength == 1.0:
            assert torch.equal(img1[r][product[r]], img0[r][product[r]]), f"{key} row {r}: product cells moved"
        else:
            assert (img1[r][product[r]] - img0[r][product[r]]).abs().max() > 1e-4, f"{key}: strength {strength}"
        assert torch.equal(txt1[r, L:], txt0[r, L:]), f"{key} row {r}: the free stream moved"
        assert (img1[r][background[r]] - img0[r][background[r]]).abs().max() > 1e-4, f"{key}: background inert"
        assert (txt1[r, :L] - txt0[r, :L]).abs().max() > 1e-4
    return img0, img1


@pytest.mark.parametrize("method", ["partition", "mask"])
@pytest.mark.parametrize("where", ["identifier", "whole_stream"])
def test_product_cells_and_free_stream_exact_in_every_block(model, where, method):
    latents, context, free, pooled, txt_ids, img_ids = inputs(1)
    call = make_call(free, masks("box"), method=method)
    captured = capture_blocks(model, call, latents, context, pooled, txt_ids, img_ids)
    assert set(captured) == set(BLOCKS)
    for key in BLOCKS:
        assert_block_exact(model, call, [0], where, captured[key], key)


def test_batch_of_two_products_with_different_masks(model):
    latents, context, free, pooled, txt_ids, img_ids = inputs(2)
    call = make_call(free, masks("two"))
    plan = call.plan(2, torch.device("cpu"), torch.float32)
    product, _ = cells(call, 2)
    assert product.sum(1).tolist()[0] != product.sum(1).tolist()[1]  # different product sizes: padded groups
    assert plan.free_count == int((call.share(2) > 0).sum(1).max())
    captured = capture_blocks(model, call, latents, context, pooled, txt_ids, img_ids)
    for key in BLOCKS:
        assert_block_exact(model, call, [0, 1], "identifier", captured[key], key)
        assert_block_exact(model, call, [1], "whole_stream", captured[key], key)  # row 0 untouched: its cells too
        with torch.no_grad():
            enc = captured[key]["encoder_hidden_states"]
            _, img0 = run_block(model, key, captured[key], enc)
            _, img1 = run_block(model, key, captured[key], perturb(enc, [1], "whole_stream"))
        assert torch.equal(img0[0], img1[0])  # rows do not mix


def test_cfg_rows_negative_without_identifier(model):
    """Batch [negative ; positive] (ComfyUI's chunk order is free: here uncond first). The negative row carries
    its own prompt as its free stream and attends like the unpatched model; the positive row is confined."""
    latents, context, free, pooled, txt_ids, img_ids = inputs(2)
    call = make_call(free, masks("box"), cond_or_uncond=(1, 0))
    extended = call.extend_text(context)
    assert torch.equal(extended[0, L:], context[0]) and torch.equal(extended[1, L:], free[0])
    plan = call.plan(2, torch.device("cpu"), torch.float32)
    assert plan.full_count + plan.free_count < 2 * plan.image_len  # the negative's cells fill spare room
    captured = capture_blocks(model, call, latents, context, pooled, txt_ids, img_ids)
    for key in BLOCKS:
        kw = captured[key]
        assert_block_exact(model, call, [1], "identifier", kw, key)
        # the negative row: every cell reads its prompt (here both halves of its text move together)
        enc = kw["encoder_hidden_states"]
        moved = enc.clone()
        moved[0] += torch.randn_like(moved[0][:L]).repeat(2, 1)
        with torch.no_grad():
            _, img0 = run_block(model, key, kw, enc)
            _, img1 = run_block(model, key, kw, moved)
        assert (img1[0] - img0[0]).abs().amax(-1).min() > 0, f"{key}: a negative-row cell ignores its prompt"
        assert torch.equal(img1[1], img0[1])
    # and the negative row's model output is the unpatched model's on its prompt
    with torch.no_grad():
        ref = model(hidden_states=latents[:1], encoder_hidden_states=context[:1], pooled_projections=pooled[:1],
                    timestep=torch.full((1,), 0.7), img_ids=img_ids, txt_ids=txt_ids).sample
        out = model(hidden_states=latents, encoder_hidden_states=extended, pooled_projections=pooled,
                    timestep=torch.full((2,), 0.7), img_ids=img_ids, txt_ids=JointCall.extend_ids(txt_ids),
                    joint_attention_kwargs={CALL_KEY: call}).sample
    torch.testing.assert_close(out[:1], ref, atol=2e-5, rtol=1e-5)


def test_strength_half_lets_the_identifier_in(model):
    latents, context, free, pooled, txt_ids, img_ids = inputs(1)
    call = make_call(free, masks("box"), strength=0.5)
    captured = capture_blocks(model, call, latents, context, pooled, txt_ids, img_ids)
    for key in BLOCKS:
        assert_block_exact(model, call, [0], "identifier", captured[key], key, strength=0.5)


@pytest.mark.parametrize("method", ["partition", "mask"])
def test_gradient_to_the_identifier_is_exactly_zero_on_product_cells(model, method):
    """d(product cells' and free stream's block output)/d(identifier vectors), other inputs detached: exactly 0 in
    every block; the background's gradient is not."""
    latents, context, free, pooled, txt_ids, img_ids = inputs(2)
    call = make_call(free, masks("two"), cond_or_uncond=(0,), method=method)
    captured = capture_blocks(model, call, latents, context, pooled, txt_ids, img_ids)
    product, background = cells(call, 2)
    g = torch.Generator().manual_seed(9)
    for key in BLOCKS:
        kw = captured[key]
        enc = kw["encoder_hidden_states"]
        ident = enc[:, list(IDENT)].clone().requires_grad_(True)
        rest = enc.clone()
        built = torch.cat([rest[:, :IDENT[0]], ident, rest[:, IDENT[-1] + 1:]], 1)
        txt, img = run_block(model, key, kw, built)
        w_img, w_txt = torch.randn(img.shape, generator=g), torch.randn(txt[:, L:].shape, generator=g)
        confined = (img * w_img * product[:, :, None]).sum() + (txt[:, L:] * w_txt).sum()
        (grad,) = torch.autograd.grad(confined, ident, retain_graph=True)
        assert torch.equal(grad, torch.zeros_like(grad)), f"{key}: {grad.abs().max()}"
        (grad_bg,) = torch.autograd.grad((img * w_img * background[:, :, None]).sum(), ident)
        assert (grad_bg[0].abs().max() > 0) and (grad_bg[1].abs().max() > 0), key


# ---------------------------------------------------------------------------------------------- plans and API
def test_plan_partitions_cells_once_per_run():
    free = torch.randn(1, L, WIDTH)
    call = make_call(free, masks("box"))
    share = call.share(1)
    plan = call.plan(1, torch.device("cpu"), torch.bfloat16)
    assert call.plan(1, torch.device("cpu"), torch.bfloat16) is plan  # cached: no per-step host work
    n = GRID[0] * GRID[1]
    assert plan.full_count == int((share < 1).sum()) and plan.free_count == int((share > 0).sum())
    assert plan.full_count + plan.free_count == n + int(((share > 0) & (share < 1)).sum())
    assert plan.weight.dtype == torch.bfloat16 and not plan.full_identity and plan.has_edges
    # no identifier rows: every cell through the full stream, in order (no gathers)
    neg = build_plan(torch.zeros(2, n), [False, False], L, "cpu", torch.float32)
    assert neg.full_identity and neg.free_count == 0


def test_partition_matches_mask_and_handles_all_product_rows():
    """Rows that are all product (nothing through the full view) and mixed batches: both methods agree."""
    torch.manual_seed(0)
    n, heads, d = 12, 2, 8
    share = torch.tensor([[1.0] * n, [0.0] * 4 + [0.3] * 4 + [1.0] * 4])
    for confined in ([True, True], [True, False]):
        plan = build_plan(share, confined, 5, "cpu", torch.float32)
        q, k, v = (torch.randn(2, heads, 10 + n, d) for _ in range(3))
        if not confined[1]:  # a row without the identifier: both its streams are the same
            for t in (q, k, v):
                t[1, :, 5:10] = t[1, :, :5]
        a = confined_joint_attention(q, k, v, plan)
        from productbg.attention.joint import masked_joint_attention
        torch.testing.assert_close(a, masked_joint_attention(q, k, v, plan), atol=1e-6, rtol=1e-5)


def test_refusals():
    free = torch.randn(1, L, WIDTH)
    spec = IdentifierSpec(IDENT, context_length=L, plain_context=free)
    with pytest.raises(ValueError, match="context only"):
        JointCall(IdentifierGuidance(spec, ProductMask(masks()), 1.0, confinement="columns"), GRID)
    with pytest.raises(ValueError, match="sigma"):
        JointCall(IdentifierGuidance(spec, ProductMask(masks()), 1.0, sigma_start=0.8), GRID)
    call = make_call(free, masks())
    with pytest.raises(ValueError, match="extend_text"):
        call.check_sequence(L, GRID[0] * GRID[1])
    m = tiny_flux()
    install_flux_processors(m)
    latents, context, _, pooled, txt_ids, img_ids = inputs(1)
    with pytest.raises(ValueError, match="extend_text"), torch.no_grad():  # the stream was not extended
        m(hidden_states=latents, encoder_hidden_states=context, pooled_projections=pooled,
          timestep=torch.full((1,), 0.5), img_ids=img_ids, txt_ids=txt_ids, joint_attention_kwargs={CALL_KEY: call})


def test_sigma_gate_switches_plans():
    free = torch.randn(1, L, WIDTH)
    spec = IdentifierSpec(IDENT, context_length=L, plain_context=free)
    call = JointCall(IdentifierGuidance(spec, ProductMask(masks()), 1.0, sigma_start=0.8), GRID, sigma=0.9)
    assert not call.active and call.share(1).eq(0).all()
    inside = call.for_call(sigma=0.5)
    assert inside.active and inside.share(1).eq(1).any()
    assert inside.plan(1, torch.device("cpu"), torch.float32) is not call.plan(1, torch.device("cpu"), torch.float32)
    assert inside._plans is call._plans  # built once per gate state for the run
    assert inside.for_call(cond_or_uncond=(1, 0)).confined_rows(2) == [False, True]


def test_flux_token_grid():
    assert flux_token_grid(1024, 1024) == (64, 64)
    assert flux_token_grid(96, 128) == GRID
