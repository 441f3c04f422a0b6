"""Device bugs made visible on a CPU machine: weights on one device, per-run data on another (``meta``).

A ``meta`` tensor has a device but no data: a host read (``.cpu()``, ``.item()``) raises. Some meta kernels
accept CPU operands silently, so :class:`SameDevice` checks every ATen op: its tensor operands must share one
device (cross-device copies excepted) — the check CUDA makes, here on a CPU machine.
"""
import tempfile
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from productbg.attention import (Guidance, IdentifierGuidance, IdentifierSpec, ProductMask, StyleGuidance,
                                 extend_context, plan_call)
from productbg.attention.guided import LayerContext, guided_cross_attention
from productbg.training import bgsynth
from productbg.training.cg import CGConfig, CGTask
from productbg.training.pg import PGConfig, PGTask
from productbg.training.state import step_generator
from productbg.weights.style_encoder import StyleEncoder, StyleEncoderConfig

META = torch.device("meta")
_COPIES = {torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default, torch.ops.aten.lift_fresh.default}


class SameDevice(TorchDispatchMode):
    """Raise on any op whose (non-scalar) tensor operands sit on different devices."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        devices = {t.device for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor) and t.ndim}
        if len(devices) > 1 and func not in _COPIES:
            raise RuntimeError(f"{func}: operands on {sorted(map(str, devices))}")
        return func(*args, **(kwargs or {}))


def test_same_device_catches_a_mismatch():
    with pytest.raises(RuntimeError, match="operands on"), SameDevice():
        torch.nn.functional.linear(torch.empty(2, 3, device=META), torch.ones(4, 3))


def _encoder() -> StyleEncoder:
    torch.manual_seed(0)
    return StyleEncoder(StyleEncoderConfig(tokens=2, clip_width=12, context_dim=8, hidden_sizes=(16, 16))).eval()


def test_style_kv_run_on_the_query_device_and_dtype_while_the_encoder_is_elsewhere():
    """Reference Style's K/V: encoder (and tokens) on the CPU, sampling on another device → K/V there."""
    enc = _encoder()
    tokens = enc(torch.randn(1, 12))
    style = StyleGuidance(tokens, torch.zeros_like(tokens), enc.layer_kv, layer_weights=(1.0, 1.0))
    with SameDevice():
        k, v = style.kv(1, torch.tensor([True, False], device=META), 2, torch.float16, META)
    assert (k.device, v.device, k.dtype, k.shape) == (META, META, torch.float16, (2, 2, 16))


def test_guided_attention_with_style_on_another_device_than_the_encoder():
    enc = _encoder()
    tokens = enc(torch.randn(2, 12))
    style = StyleGuidance(tokens, torch.zeros_like(tokens), enc.layer_kv, layer_weights=(1.0, 1.0))
    q = torch.empty(4, 16, 16, device=META, dtype=torch.float16)
    context = torch.empty(4, 77, 12, device=META, dtype=torch.float16)
    mask = torch.ones(1, 32, 32)  # per-run data made on the CPU, like a node's input
    spec = IdentifierSpec((3,), plain_context=torch.randn(1, 77, 12))
    guidance = Guidance().with_identifier(IdentifierGuidance(spec, ProductMask(mask))).with_style(style)
    with SameDevice():
        plan = plan_call(guidance, context, (0, 1))
        extended = extend_context(plan, context)
        ctx = LayerContext(layer_index=0, grid=(4, 4), plan=plan)
        kv = extended @ torch.empty(12, 16, device=META, dtype=torch.float16)  # the layer's own K/V weights
        out = guided_cross_attention(q, kv, kv, 2, ctx)
    assert out.device == META and out.shape == q.shape


def test_cpu_result_matches_with_the_encoder_kept_on_the_cpu():
    """Computing on the weights' device returns the same K/V as computing in place (the fallback is exact)."""
    enc = _encoder()
    tokens = torch.randn(1, 2, 8)
    k, v = enc.layer_kv(0, tokens)
    assert torch.equal(k, enc.to_k_ip[0](tokens)) and torch.equal(v, enc.to_v_ip[0](tokens))


@pytest.fixture(scope="module")
def data():
    with tempfile.TemporaryDirectory() as root:
        bgsynth.generate(Path(root), bgsynth.SynthSpec(categories=2, per_category=2, held_out=0, size=32, seed=1,
                                                       names=("香水", "耳机")))
        yield Path(root)


def _forward_on_meta(task):
    module = task.build(torch.device("cpu")).to(META)
    batch = torch.utils.data.default_collate([task.dataset()[(i, i)] for i in range(2)])
    batch = {k: v.to(META) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with SameDevice():
        return module(batch, step_generator(0, 0, 0, 0))


def test_pg_training_forward_stays_on_the_model_device(data):
    """Model and batch on one device, the step's generator on the CPU: no CPU round trip (mask jitter ran on a
    CPU copy of the masks) and no host read in the forward."""
    out = _forward_on_meta(PGTask(PGConfig(data=data, resolution=32, drop_reference=0.5)))
    assert out["loss"].device == META


def test_cg_training_forward_stays_on_the_model_device(data):
    out = _forward_on_meta(CGTask(CGConfig(data=data, resolution=32, vectors_per_id=2, lora_rank=4)))
    assert out["loss"].device == META
