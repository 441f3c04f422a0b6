"""The style encoder loader: published IP-Adapter SD1.5 layouts (linear and plus), our trained files, and
clear errors for files made for other models. Test files use the real key names and shapes, random values."""
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from productbg.weights.errors import FormatMismatchError, MalformedFileError, WeightsError
from productbg.weights.safefile import atomic_save
from weight_samples import (example_style_encoder, ip_adapter_file_dict, sdxl_ip_adapter_shapes,
                                       tiny_style_encoder, write_header_only)
from productbg.weights.style_encoder import (StyleEncoder, load_style_encoder, read_style_encoder_info,
                                             save_style_encoder)
from productbg.backbones.targets import SD15, SD15_LAYERS, SD2

SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
    attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)


@pytest.fixture(scope="session")
def published(tmp_path_factory):
    """ip-adapter_sd15 and ip-adapter-plus_sd15 look-alikes (fp16, no productbg metadata)."""
    root = tmp_path_factory.mktemp("ipadapter")
    out = {}
    for release in ("ip-adapter_sd15", "ip-adapter-plus_sd15"):
        encoder = example_style_encoder(release, dtype=torch.float16, seed=1)
        tensors = ip_adapter_file_dict(encoder)
        out[release] = (atomic_save(tensors, root / f"{release}.safetensors"), tensors)
    return out


def file_shapes(path):
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def split_groups(tensors):
    """The two groups published .bin files hold: image_proj and ip_adapter (prefix removed)."""
    groups = {"image_proj": {}, "ip_adapter": {}}
    for k, v in tensors.items():
        group, _, rest = k.partition(".")
        groups[group][rest] = v.float()
    return groups


# ---------------------------------------------------------------------- published layouts
def test_published_linear_layout(published):
    """ip-adapter_sd15: 4 tokens from 1024-wide image embeds; K/V for layers 1, 3, ..., 31."""
    shapes = file_shapes(published["ip-adapter_sd15"][0])
    assert shapes["image_proj.proj.weight"] == (4 * 768, 1024)
    assert shapes["image_proj.proj.bias"] == (4 * 768,)
    assert shapes["image_proj.norm.weight"] == shapes["image_proj.norm.bias"] == (768,)
    numbers = sorted({int(k.split(".")[1]) for k in shapes if k.startswith("ip_adapter.")})
    assert numbers == list(range(1, 32, 2))
    assert shapes["ip_adapter.1.to_k_ip.weight"] == (320, 768)
    assert shapes["ip_adapter.9.to_v_ip.weight"] == (1280, 768)
    assert shapes["ip_adapter.19.to_k_ip.weight"] == (640, 768)
    assert shapes["ip_adapter.31.to_k_ip.weight"] == (1280, 768)  # mid block comes last
    assert len(shapes) == 4 + 32


def test_published_plus_layout(published):
    """ip-adapter-plus_sd15: Resampler with 16 latents, 4 blocks of PerceiverAttention + FeedForward."""
    shapes = file_shapes(published["ip-adapter-plus_sd15"][0])
    assert shapes["image_proj.latents"] == (1, 16, 768)
    assert shapes["image_proj.proj_in.weight"] == (768, 1280)
    assert shapes["image_proj.proj_out.weight"] == (768, 768)
    assert shapes["image_proj.norm_out.weight"] == (768,)
    assert shapes["image_proj.layers.3.0.norm1.weight"] == shapes["image_proj.layers.3.0.norm2.bias"] == (768,)
    assert shapes["image_proj.layers.0.0.to_q.weight"] == (768, 768)
    assert shapes["image_proj.layers.0.0.to_kv.weight"] == (1536, 768)
    assert shapes["image_proj.layers.0.0.to_out.weight"] == (768, 768)
    assert shapes["image_proj.layers.2.1.0.weight"] == (768,)
    assert shapes["image_proj.layers.2.1.1.weight"] == (3072, 768)
    assert shapes["image_proj.layers.2.1.3.weight"] == (768, 3072)
    no_bias = re.compile(r"layers\.\d\.(0\.(to_q|to_kv|to_out)|1\.[13])\.bias$")
    assert not any(no_bias.search(k) for k in shapes)
    assert "image_proj.layers.1.1.0.bias" in shapes and "image_proj.proj_in.bias" in shapes
    assert len([k for k in shapes if k.startswith("ip_adapter.")]) == 32


@pytest.mark.parametrize("release", ["ip-adapter_sd15", "ip-adapter-plus_sd15"])
def test_published_file_loads_and_describes(published, release):
    path, tensors = published[release]
    info = read_style_encoder_info(path)
    assert info.source == "ip-adapter" and info.detected.startswith("SD1.5")
    assert info.config.tokens == (4 if release == "ip-adapter_sd15" else 16)
    encoder = load_style_encoder(path)
    assert encoder.config.clip_width == (1024 if release == "ip-adapter_sd15" else 1280)
    assert next(encoder.parameters()).dtype == torch.float16
    for k, v in encoder.file_state_dict().items():
        assert torch.equal(v, tensors[k]), k


def test_linear_projection_matches_diffusers(published):
    """Same tokens as diffusers' ImageProjection built by its own IP-Adapter converter."""
    from diffusers.loaders.unet import UNet2DConditionLoadersMixin

    path, tensors = published["ip-adapter_sd15"]
    ref = UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers(
        None, split_groups(tensors)["image_proj"], low_cpu_mem_usage=False)
    ours = load_style_encoder(path, dtype=torch.float32)
    x = torch.randn(2, 1024)
    with torch.no_grad():
        tokens = ours(x)
        assert tokens.shape == (2, 4, 768)
        torch.testing.assert_close(tokens, ref(x), rtol=1e-5, atol=1e-5)


def test_resampler_matches_diffusers(published):
    """Same tokens as diffusers' IPAdapterPlusImageProjection built by its own converter."""
    from diffusers.loaders.unet import UNet2DConditionLoadersMixin

    path, tensors = published["ip-adapter-plus_sd15"]
    ref = UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers(
        None, split_groups(tensors)["image_proj"], low_cpu_mem_usage=False)
    ours = load_style_encoder(path, dtype=torch.float32)
    x = torch.randn(2, 257, 1280)
    with torch.no_grad():
        tokens = ours(x)
        assert tokens.shape == (2, 16, 768)
        torch.testing.assert_close(tokens, ref(x), rtol=1e-4, atol=1e-4)


def test_layer_order_and_sizes_match_diffusers(published):
    """Layer i is the i-th attn2 processor of a diffusers SD1.5 UNet and gets ip_adapter.<2i+1>'s weights."""
    from diffusers import UNet2DConditionModel

    path, tensors = published["ip-adapter_sd15"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    procs = unet._convert_ip_adapter_attn_to_diffusers([split_groups(tensors)], low_cpu_mem_usage=False)
    cross = [(name, p) for name, p in procs.items() if name.endswith("attn2.processor")]
    assert [name for name, _ in cross] == [f"{layer.diffusers_name}.processor" for layer in SD15_LAYERS]
    ours = load_style_encoder(path, dtype=torch.float32)
    for i, (_, proc) in enumerate(cross):
        assert proc.hidden_size == SD15_LAYERS[i].hidden_size == SD15.hidden_sizes[i]
        assert torch.equal(proc.to_k_ip[0].weight, ours.to_k_ip[i].weight)
        assert torch.equal(proc.to_v_ip[0].weight, ours.to_v_ip[i].weight)


def test_layer_table_agrees_with_attention_package():
    """The ComfyUI block keys of our layer table are the ones the attention patch registers."""
    from productbg.attention.guided import SD15_LAYER_KEYS

    assert tuple(layer.comfy_key for layer in SD15_LAYERS) == SD15_LAYER_KEYS
    assert [layer.file_index for layer in SD15_LAYERS] == list(range(1, 32, 2))


# ---------------------------------------------------------------------- the module
def test_layer_kv_shapes_and_argument_order():
    encoder, target = tiny_style_encoder("linear")
    tokens = encoder(torch.randn(3, 6))
    assert tokens.shape == (3, 2, 8)
    for i, h in enumerate(target.hidden_sizes):
        k, v = encoder.layer_kv(i, tokens)
        assert k.shape == v.shape == (3, 2, h)
        k2, v2 = encoder.layer_kv(tokens, i)  # (tokens, index) is accepted too
        assert torch.equal(k, k2) and torch.equal(v, v2)
        assert torch.equal(k, tokens @ encoder.to_k_ip[i].weight.T)
    with pytest.raises(IndexError):
        encoder.layer_kv(16, tokens)


def test_forward_checks_input_shape():
    linear, _ = tiny_style_encoder("linear")
    plus, _ = tiny_style_encoder("plus")
    with pytest.raises(ValueError, match="image embeds"):
        linear(torch.randn(1, 5, 6))
    with pytest.raises(ValueError, match="W=6"):
        plus(torch.randn(1, 5, 7))
    assert plus(torch.randn(2, 5, 6)).shape == (2, 3, 8)


def test_trained_file_roundtrip_with_metadata(tmp_path):
    """Files we train: same layout plus metadata (variant, tokens, CLIP width, family, training)."""
    encoder = example_style_encoder("ip-adapter-plus_sd15", seed=2, dtype=torch.float16)
    path = save_style_encoder(encoder, tmp_path / "style.safetensors",
                              training={"dataset": "bg60k", "steps": 1000, "date": "2025-02-01"})
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["productbg.kind"] == "style_encoder" and meta["productbg.variant"] == "plus"
    assert meta["productbg.tokens"] == "16" and meta["productbg.clip_vision_width"] == "1280"
    assert meta["productbg.family"] == "sd15" and json.loads(meta["productbg.training"])["steps"] == 1000
    info = read_style_encoder_info(path)
    assert info.source == "productbg" and info.training["dataset"] == "bg60k"
    loaded = load_style_encoder(path)
    assert loaded.training_info["date"] == "2025-02-01"
    x = torch.randn(1, 10, 1280, dtype=torch.float16)
    with torch.no_grad():
        assert torch.equal(loaded(x), encoder(x))


def test_tiny_target_and_wrong_target(tmp_path):
    """The loader checks against the target it is given; a tiny file is not SD1.5."""
    encoder, target = tiny_style_encoder("plus")
    path = encoder.save(tmp_path / "tiny.safetensors")
    assert load_style_encoder(path, target).config.heads == 2
    with pytest.raises(FormatMismatchError, match=r"unknown model \(context width 8, 16 layers\).*SD1.5"):
        load_style_encoder(path)


# ---------------------------------------------------------------------- other models and broken files
def test_sdxl_file_is_named_and_refused(tmp_path):
    """A real-shaped SDXL IP-Adapter (context 2048, 70 layers) gets an error naming both models."""
    path = write_header_only(tmp_path / "ip-adapter_sdxl.safetensors", sdxl_ip_adapter_shapes())
    with pytest.raises(FormatMismatchError) as err:
        load_style_encoder(path)
    msg = str(err.value)
    assert "SDXL (context width 2048, 70 cross-attention layers)" in msg
    assert "target model is SD1.5 (context width 768, 16 cross-attention layers)" in msg


def test_sd2_file_is_named(tmp_path):
    shapes = {"image_proj.proj.weight": (4096, 1024), "image_proj.proj.bias": (4096,),
              "image_proj.norm.weight": (1024,), "image_proj.norm.bias": (1024,)}
    for i, h in enumerate(SD2.hidden_sizes):
        shapes[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = shapes[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = (h, 1024)
    path = write_header_only(tmp_path / "sd21.safetensors", shapes)
    with pytest.raises(FormatMismatchError, match=r"made for SD2.x \(context width 1024"):
        load_style_encoder(path)


def test_swapped_layer_sizes_name_the_layer(tmp_path, published):
    _, tensors = published["ip-adapter_sd15"]
    bad = dict(tensors)
    bad["ip_adapter.3.to_k_ip.weight"] = bad["ip_adapter.3.to_v_ip.weight"] = torch.zeros(640, 768, dtype=torch.float16)
    path = atomic_save(bad, tmp_path / "bad.safetensors")
    with pytest.raises(FormatMismatchError, match=r"ip_adapter.3.to_k_ip.weight is \[640, 768\] but SD1.5 layer 1 "
                                                  r"\(down_blocks.0.attentions.1.transformer_blocks.0.attn2\) "
                                                  r"expects \[320, 768\]"):
        load_style_encoder(path)


@pytest.mark.parametrize("edit, error, match", [
    (lambda t: t.pop("ip_adapter.7.to_v_ip.weight"), MalformedFileError, "ip_adapter.7 needs"),
    (lambda t: [t.pop(k) for k in list(t) if k.startswith("ip_adapter.31.")], FormatMismatchError, "15 layers"),
    (lambda t: t.__setitem__("ip_adapter.4.to_k_ip.weight", torch.zeros(2, 768)), MalformedFileError, "numbered"),
    (lambda t: t.pop("image_proj.norm.bias"), MalformedFileError, "missing"),
    (lambda t: t.__setitem__("image_proj.proj.weight", torch.zeros(3000, 1024)), MalformedFileError, "multiple"),
    (lambda t: t.__setitem__("image_proj.norm.weight", torch.zeros(700)), MalformedFileError, "shape"),
    (lambda t: t.__setitem__("extra", torch.zeros(1)), MalformedFileError, "unexpected tensor 'extra'"),
    (lambda t: t["ip_adapter.5.to_k_ip.weight"].__setitem__((0, 0), float("nan")), MalformedFileError, "NaN"),
    (lambda t: t.__setitem__("image_proj.norm.bias", torch.zeros(768, dtype=torch.int16)), MalformedFileError,
     "dtype I16"),
])
def test_broken_files(tmp_path, published, edit, error, match):
    tensors = {k: v.clone() for k, v in published["ip-adapter_sd15"][1].items()}
    edit(tensors)
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(error, match=match):
        load_style_encoder(path)


@pytest.mark.parametrize("keys, match", [
    ({"image_proj.proj.0.weight": (1024, 1024), "image_proj.proj.2.weight": (768, 1024),
      "image_proj.proj.3.weight": (768,)}, "full-face"),
    ({"image_proj.proj.0.weight": (1024, 512), "image_proj.norm.weight": (768,)}, "FaceID"),
])
def test_unsupported_ip_adapter_variants(tmp_path, keys, match):
    shapes = dict(keys)
    for i, h in enumerate(SD15.hidden_sizes):
        shapes[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = shapes[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = (h, 768)
    path = write_header_only(tmp_path / "v.safetensors", shapes)
    with pytest.raises(FormatMismatchError, match=match):
        load_style_encoder(path)


def test_metadata_that_contradicts_tensors(tmp_path):
    encoder, target = tiny_style_encoder("linear")
    meta = {**encoder.metadata(), "productbg.tokens": "8"}
    path = atomic_save(encoder.file_state_dict(), tmp_path / "x.safetensors", meta)
    with pytest.raises(MalformedFileError, match="metadata says tokens = 8 but the tensors give 2"):
        load_style_encoder(path, target)


def test_pickle_ip_adapter_refused(tmp_path):
    path = tmp_path / "ip-adapter_sd15.bin"
    path.write_bytes(b"\x80\x04not really")
    with pytest.raises(WeightsError, match="arbitrary code"):
        load_style_encoder(path)


def test_bank_is_not_a_style_encoder(tmp_path):
    from weight_samples import example_bank

    path = example_bank().save(tmp_path / "bank.safetensors")
    with pytest.raises(FormatMismatchError, match="not a style encoder"):
        load_style_encoder(path)
    assert issubclass(FormatMismatchError, WeightsError)


def test_module_is_a_plain_torch_module():
    encoder, _ = tiny_style_encoder("plus")
    assert isinstance(encoder, StyleEncoder) and isinstance(encoder, torch.nn.Module)
    names = set(dict(encoder.named_parameters()))
    assert "to_k_ip.0.weight" in names and "image_proj.layers.1.0.to_kv.weight" in names
