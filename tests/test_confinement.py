"""Confinement that holds end to end: at strength 1 the cross-attention output at product cells does not depend
on the identifier at all — through the identifier's own key columns *or* the later tokens of the causal CLIP
encoder — in the diffusers adapter and in a train-cg step; background cells still depend on it."""
import pytest
import torch

from productbg.attention import (Guidance, IdentifierGuidance, IdentifierSpec, ProductMask, context_blend,
                                 extend_context, pad_to_length, plan_call, probe)
from productbg.attention.diffusers_processor import DiffusersCall, install_processors
from productbg.pipeline.text import (clip_tokenizer, identifier_prompt, install_identifiers,
                                     tokenize_with_identifier, without_positions)
from productbg.pipeline.tiny import CROSS_DIM, tiny_text_encoder, tiny_unet
from productbg.training import bgsynth
from productbg.training.cg import CGConfig, CGTask
from productbg.training.state import step_generator

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TEMPLATE = "a product photo on a {id} background"


def _masks(batch: int, side: int = 64) -> torch.Tensor:
    """Different products per batch item (left box, right box)."""
    m = torch.zeros(batch, side, side)
    for b in range(batch):
        lo = (b % 2) * side // 4
        m[b, side // 4: 3 * side // 4, lo: lo + side // 2] = 1
    return m


class _Prompts:
    """The tiny CLIP text encoder with a 2-vector identifier: contexts for two identifier vector sets."""

    def __init__(self) -> None:
        self.tok, self.te = clip_tokenizer(), tiny_text_encoder()
        self.vocab = install_identifiers(self.tok, self.te, torch.randn(1, 2, CROSS_DIM))
        text = identifier_prompt(TEMPLATE, self.vocab.words(0), "soft light")
        self.ids, spec = tokenize_with_identifier(self.tok, text, self.vocab.token_ids[0])
        with torch.no_grad():
            plain = self.te(without_positions(self.ids, spec.token_indices)).last_hidden_state
        self.spec = IdentifierSpec(spec.token_indices, spec.context_length, plain_context=plain)

    @torch.no_grad()
    def context(self, vectors: torch.Tensor) -> torch.Tensor:
        self.te.get_input_embeddings().weight[self.vocab.token_ids[0]] = vectors
        return self.te(self.ids).last_hidden_state


def _run(unet, prompts, vectors, masks, cond_or_uncond, confinement, replay=None, strength=1.0):
    """One UNet forward on [negative | positive] rows; the recorder with every layer's text attention output."""
    batch = masks.shape[0]
    cond = prompts.context(vectors).expand(batch, -1, -1)
    uncond = torch.zeros_like(cond)
    context = torch.cat([cond if c == 0 else uncond for c in cond_or_uncond])
    g = IdentifierGuidance(prompts.spec, ProductMask(masks), strength, confinement=confinement)
    call = DiffusersCall(Guidance().with_identifier(g), latent_hw=(8, 8), cond_or_uncond=cond_or_uncond)
    latents = torch.randn(len(cond_or_uncond) * batch, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), probe.record(keep_outputs=True, replay=replay) as rec:
        unet(latents, 10, context, cross_attention_kwargs={"productbg": call})
    return rec


def _changes(rec_a, rec_b):
    """Per layer (max change at product cells, max change at background cells of positive rows)."""
    out = []
    for a, b in zip(rec_a.outputs, rec_b.outputs):
        diff = (a.output - b.output).abs().amax(-1)
        product = a.product
        positive = product.any(1, keepdim=True).expand_as(product)  # rows that carry the identifier
        out.append((diff[product].max().item(), diff[positive & ~product].max().item()))
    return out


@pytest.mark.parametrize("cond_or_uncond", [(1, 0), (0, 1)])
def test_product_cells_exactly_independent_of_identifier_in_every_layer(cond_or_uncond):
    """Perturbing the identifier vectors leaves every layer's product-cell output bit-identical (context);
    the column-only bias lets it through (columns); background cells change in both."""
    torch.manual_seed(0)
    unet, prompts = tiny_unet(), _Prompts()
    install_processors(unet)
    masks = _masks(2)
    v1, v2 = torch.randn(2, CROSS_DIM), torch.randn(2, CROSS_DIM)
    for mode in ("context", "columns"):
        first = _run(unet, prompts, v1, masks, cond_or_uncond, mode)
        second = _run(unet, prompts, v2, masks, cond_or_uncond, mode, replay=[o.query for o in first.outputs])
        changes = _changes(first, second)
        assert len(changes) == 7
        if mode == "context":
            assert all(p == 0.0 for p, _ in changes), changes
        else:
            assert max(p for p, _ in changes) > 1e-4, changes
        assert min(bg for _, bg in changes) > 1e-4, changes


def test_strength_interpolates_and_zero_is_plain_attention():
    """Strength 0 = no confinement; strength 0.5 lies strictly between it and strength 1 at product cells."""
    torch.manual_seed(0)
    unet, prompts = tiny_unet(), _Prompts()
    install_processors(unet)
    masks, v = _masks(1), torch.randn(2, CROSS_DIM)
    recs = {s: _run(unet, prompts, v, masks, (1, 0), "context", strength=s) for s in (0.0, 0.5, 1.0)}
    replay = [o.query for o in recs[0.0].outputs]
    recs = {s: _run(unet, prompts, v, masks, (1, 0), "context", replay=replay, strength=s) for s in recs}
    for o0, oh, o1 in zip(recs[0.0].outputs, recs[0.5].outputs, recs[1.0].outputs):
        p = o0.product
        d_half, d_full = (oh.output - o0.output)[p].norm(), (o1.output - o0.output)[p].norm()
        assert 0 < d_half < d_full


def test_blend_endpoints_are_exact_and_block_the_gradient():
    full = torch.randn(2, 5, 8, requires_grad=True)
    plain = torch.randn(2, 5, 8)
    w = torch.tensor([0.0, 0.3, 1.0, 1.0, 0.0]).view(1, 5, 1).expand(2, 5, 1)
    out = context_blend(full, plain, w)
    assert torch.equal(out[:, 0], full[:, 0]) and torch.equal(out[:, 2], plain[:, 2])
    out[:, 2:4].sum().backward()
    assert torch.count_nonzero(full.grad) == 0


def test_pad_to_length_repeats_chunks():
    ctx = torch.arange(2 * 77, dtype=torch.float32).view(1, 154, 1)
    assert torch.equal(pad_to_length(ctx, 308), ctx.repeat(1, 2, 1))
    assert torch.equal(pad_to_length(ctx, 231)[:, 154:], ctx[:, :77])
    with pytest.raises(ValueError, match="cannot pad"):
        pad_to_length(ctx, 100)


# ---------------------------------------------------------------------------------------- which rows are whose
def _spec(length=77, width=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randn(1, length, width, generator=g)
    plain = torch.randn(1, length, width, generator=g)
    return IdentifierSpec((5, 6), length, plain_context=plain, prompt_context=prompt), prompt, plain


def _plan(spec, context, cond_or_uncond):
    g = IdentifierGuidance(spec, ProductMask(torch.ones(1, 8, 8)), 1.0)
    return plan_call(Guidance().with_identifier(g), context, cond_or_uncond, recognise_prompts=True)


def test_rows_recognised_by_prompt_not_by_chunk_type():
    """Only rows holding the identifier's prompt are confined: not another positive prompt (regional /
    ConditioningCombine), not the negative; a repeated prompt counts in every period, a concatenated one
    (ConditioningConcat) only in its own."""
    spec, prompt, plain = _spec()
    other = torch.randn(1, 77, 4)
    neg = torch.randn(1, 77, 4)
    context = torch.cat([neg, prompt, other])           # chunks: uncond, our positive, another positive
    plan = _plan(spec, context, (1, 0, 0))
    assert plan.owners[0].rows.tolist() == [0.0, 1.0, 0.0]
    ext = extend_context(plan, context)
    assert torch.equal(ext[1, 77:], plain[0]) and torch.equal(ext[0, 77:], neg[0]) and torch.equal(ext[2, 77:], other[0])

    repeated = torch.cat([prompt, prompt], dim=1)        # positive repeated to a 154-token negative
    concat = torch.cat([prompt, other], dim=1)
    long_neg = torch.randn(1, 154, 4)
    context = torch.cat([repeated, concat, long_neg])
    plan = _plan(spec, context, (0, 0, 1))
    tokens = plan.owners[0].tokens
    assert tokens[0].all() and tokens[1, :77].all() and not tokens[1, 77:].any() and not tokens[2].any()
    ext = extend_context(plan, context)
    assert torch.equal(ext[1, 154:231], plain[0]) and torch.equal(ext[1, 231:], other[0])


def test_long_prompts_of_154_tokens_and_shorter_negatives():
    """A 154-token identifier prompt against a 77-token negative repeated to 154 (and to 308 for 3 chunks)."""
    spec, prompt, plain = _spec(length=154)
    neg = torch.randn(1, 77, 4)
    context = torch.cat([prompt, neg.repeat(1, 2, 1)])
    plan = _plan(spec, context, (0, 1))
    assert plan.owners[0].rows.tolist() == [1.0, 0.0]
    assert torch.equal(extend_context(plan, context)[0, 154:], plain[0])
    context = torch.cat([prompt.repeat(1, 3, 1), torch.randn(1, 231, 4).repeat(1, 2, 1)])  # LCM 462
    plan = _plan(spec, context, (0, 1))
    assert plan.owners[0].tokens[0].all() and not plan.owners[0].tokens[1].any()


def test_sigma_gates_are_tensors_per_row():
    spec, prompt, _ = _spec()
    g = IdentifierGuidance(spec, ProductMask(torch.ones(1, 8, 8)), 1.0, sigma_start=5.0, sigma_end=1.0)
    plan = plan_call(Guidance().with_identifier(g), prompt.expand(2, -1, -1), (0, 1),
                     sigmas=torch.tensor([6.0, 3.0]))
    assert plan.gate(g).tolist() == [0.0, 1.0]
    ungated = IdentifierGuidance(spec, ProductMask(torch.ones(1, 8, 8)), 1.0)
    assert not ungated.gated and plan_call(Guidance().with_identifier(ungated), prompt, (0,),
                                           sigmas=torch.tensor([6.0])).gate(ungated) is None


def test_context_confinement_needs_the_plain_prompt():
    with pytest.raises(ValueError, match="identifier-free prompt"):
        IdentifierGuidance(IdentifierSpec((5,)), ProductMask(torch.ones(1, 8, 8)))
    with pytest.raises(ValueError, match="plain_context"):
        IdentifierSpec((5,), plain_context=torch.zeros(1, 76, 4))


# ---------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("confine")
    bgsynth.generate(root, bgsynth.SynthSpec(categories=2, per_category=2, held_out=1, size=32, seed=3,
                                             names=("sneakers", "lamp")))
    return root


def _train_grads(data, confinement, strength=1.0):
    """Gradients of one train-cg forward's product-cell and background-cell cross-attention outputs (every
    layer, queries held fixed) with respect to the identifier vectors."""
    task = CGTask(CGConfig(data=data, resolution=32, vectors_per_id=2, lora_rank=4, confinement=confinement,
                                strength=strength))
    module = task.build(torch.device("cpu"))
    batch = torch.utils.data.default_collate([task.dataset()[(i, i)] for i in range(2)])
    with probe.record(keep_outputs=True) as rec:
        out = module(batch, step_generator(0, 0, 0, 0))
    assert torch.isfinite(out["loss"])
    product = sum(o.output[o.product].abs().sum() for o in rec.outputs)
    background = sum(o.output[~o.product].abs().sum() for o in rec.outputs)
    vectors = module.embedding.vectors
    (g_product,) = torch.autograd.grad(product, vectors, retain_graph=True)
    (g_background,) = torch.autograd.grad(background, vectors)
    return g_product, g_background


def test_train_cg_product_cells_give_the_identifier_exactly_zero_gradient(data):
    g_product, g_background = _train_grads(data, "context")
    assert torch.count_nonzero(g_product) == 0
    assert g_background.norm() > 0
    leaky, _ = _train_grads(data, "columns")
    assert leaky.norm() > 0
    half, _ = _train_grads(data, "context", strength=0.5)  # the measure moves: partial confinement lets some in
    assert half.norm() > 0


def test_train_cg_records_the_confinement_in_its_bank(data, tmp_path):
    from productbg.cli import main
    from productbg.weights.bank import load_bank

    out = tmp_path / "run"
    assert main(["train-cg", "--data", str(data), "--model", "tiny-inpaint", "--output", str(out), "--resolution",
                 "32", "--max-steps", "1", "--batch-size", "1", "--vectors-per-id", "1", "--lora-rank", "2",
                 "--confinement", "columns", "--no-progress"]) == 0
    with load_bank(out / "category_bank.safetensors") as bank:
        assert bank.training.get("confinement") == "columns"



def test_generate_records_the_confinement_in_its_result(tmp_path):
    """``--confinement`` reaches the pipeline and result.json says which mode made the image."""
    import json

    import numpy as np
    from PIL import Image

    from productbg.cli import main

    product = tmp_path / "p.png"
    rgba = np.zeros((48, 48, 4), np.uint8)
    rgba[12:36, 16:32] = (200, 40, 40, 255)
    Image.fromarray(rgba).save(product)
    for mode in ("context", "columns"):
        out = tmp_path / f"{mode}.png"
        assert main(["generate", "--product", str(product), "--category", "mugs", "--checkpoint", "demo",
                     "--steps", "2", "--confinement", mode, "--out", str(out)]) == 0
        assert json.loads(out.with_suffix(".json").read_text())["settings"]["confinement"] == mode
