"""Identifier attention contract (pure torch): the mask-guided cross-attention of the Category-Wise Generator."""
import pytest
import torch

from productbg.attention import (IdentifierSpec, background_weights, identifier_attention, identifier_attention_mass,
                                 identifier_bias, identifier_columns, identifier_mass_map, plain_attention,
                                 positive_rows_from, product_coverage, rows_for_batch)

HEADS, DIM = 4, 8


def _qkv(rows, n, key_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, n, HEADS * DIM, generator=g)
    k = torch.randn(rows, key_len, HEADS * DIM, generator=g)
    v = torch.randn(rows, key_len, HEADS * DIM, generator=g)
    return q, k, v


def _masks():
    """Two products with different masks on an 8×8 grid."""
    m = torch.zeros(2, 64, 64)
    m[0, 8:40, 8:40] = 1
    m[1, 24:64, 30:60] = 1
    return m


def _setup(cond_or_uncond=(1, 0), key_len=77, strength=1.0, masks=None, spec=IdentifierSpec((5, 6))):
    masks = _masks() if masks is None else masks
    rows = len(cond_or_uncond) * masks.shape[0]
    q, k, v = _qkv(rows, 64, key_len)
    cols = identifier_columns(spec, key_len)
    pos = positive_rows_from(list(cond_or_uncond), rows)
    cov = rows_for_batch(product_coverage(masks, (8, 8)), rows, len(cond_or_uncond))
    bg = background_weights(cov)
    return q, k, v, cols, pos, cov, bg


def test_columns_repeat_every_context_length():
    """An identifier at 5,6 of a 77-token prompt also sits at 82,83 when the context was repeated to 154."""
    spec = IdentifierSpec((5, 6))
    assert identifier_columns(spec, 77).tolist() == [5, 6]
    assert identifier_columns(spec, 154).tolist() == [5, 6, 82, 83]
    long_prompt = IdentifierSpec((80,), context_length=154)
    assert identifier_columns(long_prompt, 308).tolist() == [80, 234]
    with pytest.raises(ValueError, match="outside"):
        IdentifierSpec((77,))


def test_strength_zero_equals_plain_attention():
    q, k, v, cols, pos, cov, bg = _setup(strength=0.0)
    out = identifier_attention(q, k, v, HEADS, cols, pos, bg, 0.0)
    assert (out - plain_attention(q, k, v, HEADS)).abs().max() <= 1e-5


@pytest.mark.parametrize("cond_or_uncond", [(1, 0), (0, 1)])
def test_strength_one_removes_identifier_from_product_cells_and_leaves_negatives(cond_or_uncond):
    """Identifier mass at product cells is exactly 0 on positive rows; negative rows equal plain attention."""
    q, k, v, cols, pos, cov, bg = _setup(cond_or_uncond)
    out = identifier_attention(q, k, v, HEADS, cols, pos, bg, 1.0)
    bias = identifier_bias(bg, cols, pos, 77, 1.0)
    mass = identifier_mass_map(q, k, HEADS, cols, bias)
    product = cov >= 0.5
    assert product[pos].any()
    assert mass[pos][product[pos]].max().item() == 0.0
    plain = plain_attention(q, k, v, HEADS)
    assert (out[~pos] - plain[~pos]).abs().max() <= 1e-6
    # ... and the identifier still gets attention on the background of positive rows
    assert mass[pos][~product[pos]].min() > 0
    # the two products of the batch are confined by their own masks
    first, second = pos.nonzero().flatten().tolist()
    assert not torch.equal(product[first], product[second])
    assert mass[second][product[second]].max() == 0 and mass[first][product[second] & ~product[first]].min() > 0


def test_intermediate_strength_scales_identifier_weight():
    """Strength s multiplies the identifier's unnormalised weight at product cells by 1 − s."""
    q, k, v, cols, pos, cov, bg = _setup()
    b = identifier_bias(bg, cols, pos, 77, 0.5)
    product = (cov >= 0.5) & pos[:, None]
    assert torch.allclose(b[:, 0][product][:, cols], torch.log(torch.tensor(0.5)).expand(int(product.sum()), 2))
    assert b[:, 0][~pos].eq(0).all()
    others = torch.ones(77, dtype=torch.bool)
    others[cols] = False
    assert b[..., others].eq(0).all()


@pytest.mark.parametrize("case", ["all_product", "all_background", "identifier_absent", "long_prompt"])
def test_never_nan(case):
    masks = _masks()
    key_len, spec = 77, IdentifierSpec((5, 6))
    if case == "all_product":
        masks = torch.ones(2, 64, 64)
    elif case == "all_background":
        masks = torch.zeros(2, 64, 64)
    elif case == "identifier_absent":
        spec = IdentifierSpec(())
    else:
        key_len, spec = 154, IdentifierSpec((5, 6, 100), context_length=154)
    q, k, v, cols, pos, cov, bg = _setup(key_len=key_len, masks=masks, spec=spec)
    out = identifier_attention(q, k, v, HEADS, cols, pos, bg, 1.0)
    assert torch.isfinite(out).all()
    if case in ("all_background", "identifier_absent"):
        assert (out - plain_attention(q, k, v, HEADS)).abs().max() <= 1e-5


def test_identifier_filling_every_column_is_left_unmasked():
    q, k, v = _qkv(2, 64, 3)
    cols = torch.arange(3)
    out = identifier_attention(q, k, v, HEADS, cols, torch.tensor([True, True]), torch.zeros(2, 64), 1.0)
    assert torch.isfinite(out).all()


def test_strength_out_of_range_is_rejected():
    q, k, v, cols, pos, cov, bg = _setup()
    with pytest.raises(ValueError, match="strength"):
        identifier_attention(q, k, v, HEADS, cols, pos, bg, 1.5)


def test_attention_mass_loss_is_differentiable_and_drops_with_masking():
    q, k, v, cols, pos, cov, bg = _setup()
    q.requires_grad_(True)
    loss = identifier_attention_mass(q, k, HEADS, cols, pos, cov)
    loss.backward()
    assert loss.item() > 0 and q.grad.abs().sum() > 0
    hard = identifier_attention_mass(q, k, HEADS, cols, pos, cov, identifier_bias(bg, cols, pos, 77, 1.0))
    assert hard.item() < loss.item()
    assert identifier_attention_mass(q, k, HEADS, cols[:0], pos, cov).item() == 0.0
