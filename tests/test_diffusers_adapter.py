"""The diffusers adapter on tiny models: processor installation, identifier confinement, style equivalence."""
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, IPAdapterAttnProcessor2_0

from productbg.attention import (Guidance, IdentifierGuidance, IdentifierSpec, ProductMask, StyleGuidance,
                                 style_attention)
from productbg.attention import probe
from productbg.attention.diffusers_processor import DiffusersCall, install_processors
from productbg.pipeline.text import (clip_tokenizer, identifier_prompt, install_identifiers,
                                     tokenize_with_identifier, word_positions)
from productbg.pipeline.tiny import CROSS_DIM, tiny_text_encoder, tiny_unet


def _inputs(batch=2, hw=(8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, *hw, generator=g)
    context = torch.randn(batch, 77, CROSS_DIM, generator=g)
    return latents, context


def _mask(hw=(64, 64)):
    m = torch.zeros(1, *hw)
    m[:, hw[0] // 4: 3 * hw[0] // 4, hw[1] // 4: 3 * hw[1] // 4] = 1
    return m


def test_processor_without_guidance_equals_default():
    unet = tiny_unet()
    latents, context = _inputs()
    with torch.no_grad():
        unet.set_attn_processor(AttnProcessor2_0())
        ref = unet(latents, 10, context).sample
        layers = install_processors(unet)
        out = unet(latents, 10, context).sample
        zero = unet(latents, 10, context, cross_attention_kwargs={"productbg": DiffusersCall(
            Guidance().with_identifier(IdentifierGuidance(IdentifierSpec((3,)), ProductMask(_mask()), 0.0, confinement="columns")),
            latent_hw=(8, 8))}).sample
    assert len(layers) == 7 and layers[0].startswith("down_blocks.0")
    assert (out - ref).abs().max() <= 1e-5
    assert (zero - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("hw", [(8, 8), (13, 13), (8, 12)])
def test_identifier_mass_zero_on_product_in_every_layer(hw):
    """During a real UNet forward, every cross-attention layer gives the identifier 0 mass on product cells."""
    unet = tiny_unet()
    install_processors(unet)
    latents, context = _inputs(hw=hw)
    g = IdentifierGuidance(IdentifierSpec((4, 5)), ProductMask(_mask((hw[0] * 8, hw[1] * 8))), 1.0,
                           confinement="columns")
    call = DiffusersCall(Guidance().with_identifier(g), latent_hw=hw, cond_or_uncond=(1, 0))
    with torch.no_grad(), probe.record() as rec:
        out = unet(latents, 10, context, cross_attention_kwargs={"productbg": call}).sample
    assert torch.isfinite(out).all()
    assert rec.layers() == set(range(7))
    assert all(r.max_mass_on_product == 0.0 for r in rec.identifier)
    assert all(r.mean_mass_on_background > 0 for r in rec.identifier)


def test_mass_losses_collected_with_gradient():
    unet = tiny_unet()
    install_processors(unet)
    latents, context = _inputs(batch=1)
    context.requires_grad_(True)
    g = IdentifierGuidance(IdentifierSpec((4, 5)), ProductMask(_mask()), 0.0, confinement="columns")
    call = DiffusersCall(Guidance().with_identifier(g), latent_hw=(8, 8), cond_or_uncond=(0,), mass_losses=[])
    unet(latents, 10, context, cross_attention_kwargs={"productbg": call})
    assert len(call.mass_losses) == 7
    loss = torch.stack(call.mass_losses).mean()
    loss.backward()
    assert loss.item() > 0 and context.grad[:, 4:6].abs().sum() > 0


def test_style_attention_matches_ip_adapter_processor():
    """Unmasked style attention equals diffusers' IPAdapterAttnProcessor2_0 on the same weights (≤1e-5)."""
    torch.manual_seed(0)
    attn = Attention(query_dim=64, cross_attention_dim=CROSS_DIM, heads=4, dim_head=16)
    ip = IPAdapterAttnProcessor2_0(hidden_size=64, cross_attention_dim=CROSS_DIM, num_tokens=(4,), scale=0.7)
    hidden, text = torch.randn(2, 36, 64), torch.randn(2, 77, CROSS_DIM)
    style_tokens = torch.randn(2, 4, CROSS_DIM)
    with torch.no_grad():
        ref = ip(attn, hidden, encoder_hidden_states=(text, [style_tokens[:, None]]))
        q, k, v = attn.to_q(hidden), attn.to_k(text), attn.to_v(text)
        base = torch.nn.functional.scaled_dot_product_attention(
            *(t.view(2, -1, 4, 16).transpose(1, 2) for t in (q, k, v))).transpose(1, 2).reshape(2, 36, 64)
        delta = style_attention(q, ip.to_k_ip[0](style_tokens), ip.to_v_ip[0](style_tokens), 4, weight=0.7)
        ours = attn.to_out[0](base + delta)
    assert (ours - ref).abs().max() <= 1e-5


def test_style_guidance_confined_to_background_through_processor():
    """With a product mask, the style changes only background cells (checked on a single attention layer)."""
    torch.manual_seed(0)
    unet = tiny_unet()
    install_processors(unet)
    kv = [(torch.nn.Linear(CROSS_DIM, c, bias=False), torch.nn.Linear(CROSS_DIM, c, bias=False))
          for c in (32, 64, 64, 64, 32, 32, 64)]

    def layer_kv(i, tokens):
        return kv[i][0](tokens), kv[i][1](tokens)

    tokens = torch.randn(1, 4, CROSS_DIM)
    mask = torch.zeros(1, 64, 64)
    mask[:, :32] = 1  # top half is product
    style = StyleGuidance(tokens, torch.zeros_like(tokens), layer_kv, weight=1.0, product=ProductMask(mask))
    call = DiffusersCall(Guidance().with_style(style), latent_hw=(8, 8))
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    hidden, context = torch.randn(2, 64, 32), torch.randn(2, 77, CROSS_DIM)
    with torch.no_grad():
        plain = attn(hidden, context)
        styled = attn(hidden, context, productbg=call)
    changed = (styled - plain).abs().amax(-1).view(2, 8, 8)
    assert changed[:, :4].max() < 1e-6 and changed[1, 4:].min() > 1e-4  # row 1 = cond (uncond tokens are 0)


def test_identifier_vectors_enter_through_placeholder_tokens():
    """A bank's vectors become input-embedding rows; the prompt finds their positions; no hub access."""
    tok, te = clip_tokenizer(), tiny_text_encoder()
    vectors = torch.randn(3, 2, CROSS_DIM)
    vocab = install_identifiers(tok, te, vectors)
    assert vocab.token_ids.shape == (3, 2)
    assert torch.allclose(te.get_input_embeddings().weight[vocab.token_ids[1]], vectors[1])
    prompt = identifier_prompt("a product photo on a {id} background", vocab.words(1), "soft light")
    ids, spec = tokenize_with_identifier(tok, prompt, vocab.token_ids[1])
    assert ids.shape == (1, 77)
    assert ids[0, list(spec.token_indices)].tolist() == vocab.token_ids[1].tolist()
    emb = te(ids).last_hidden_state
    vectors2 = vectors.clone()
    vectors2[1] += 1
    te2 = tiny_text_encoder()
    install_identifiers(clip_tokenizer(), te2, vectors2)
    assert not torch.allclose(te2(ids).last_hidden_state, emb)
    with pytest.raises(ValueError, match="placeholder"):
        identifier_prompt("no slot", "x")


def test_word_positions_for_zero_shot_confinement():
    tok = clip_tokenizer()
    spec = word_positions(tok, "a bottle on a marble table", "marble table")
    ids = tok("a bottle on a marble table").input_ids
    assert [ids[i] for i in spec.token_indices] == tok("marble table", add_special_tokens=False).input_ids
    with pytest.raises(ValueError, match="does not occur"):
        word_positions(tok, "a bottle", "marble")
