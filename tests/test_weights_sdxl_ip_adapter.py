"""The published SDXL IP-Adapter files: ip-adapter_sdxl_vit-h (linear, ViT-H), ip-adapter-plus_sdxl_vit-h
(Resampler, ViT-H) and ip-adapter_sdxl (linear, ViT-bigG) — told apart by their shapes, loaded against SDXL's 70
layers, the CLIP vision each needs, and the one-line errors for the wrong backbone or the wrong CLIP vision.

Files have the releases' full shapes but take no disk: zeros in a sparse file (``write_release_sample``), with
a few tensors written for real where a test checks where the loader puts them."""
from types import SimpleNamespace

import pytest
import torch

from productbg import backbones
from productbg.weights.errors import FormatMismatchError
from productbg.weights.ip_adapters import (VIT_BIGG, VIT_H, check_clip_vision, clip_vision_problem,
                                           clip_vision_widths, release_of)
from weight_samples import RELEASES, example_style_encoder, release_shapes, write_release_sample
from productbg.weights.style_encoder import (Resampler, StyleEncoderConfig, check_target, load_style_encoder,
                                             read_style_encoder_info, reference_tokens)
from productbg.backbones.targets import SD15, SDXL, SDXL_LAYERS

SDXL_RELEASES = ("ip-adapter_sdxl_vit-h", "ip-adapter-plus_sdxl_vit-h", "ip-adapter_sdxl")
SDXL_USE = ("use an SDXL IP-Adapter (ip-adapter_sdxl_vit-h.safetensors, ip-adapter-plus_sdxl_vit-h.safetensors "
            "or ip-adapter_sdxl.safetensors)")
SD15_USE = "use an SD1.5 IP-Adapter (ip-adapter_sd15.safetensors, ip-adapter-plus_sd15.safetensors"
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=2048,
    block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    use_linear_projection=True,
)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """The three SDXL releases (and the SD1.5 ones) as zero-filled sparse files of their full shapes."""
    root = tmp_path_factory.mktemp("sdxl_ip")
    return {r: write_release_sample(root / f"{r}.safetensors", r) for r in RELEASES}


# ---------------------------------------------------------------------- the layouts
def test_release_shapes_are_the_published_ones():
    """Spelled out from the published files: 4 × 2048 tokens from 1024 (ViT-H) or 1280 (ViT-bigG) embeds; the
    plus Resampler 1280 wide, 20 heads × 64, 16 queries, depth 4, output 2048; K/V for 70 layers."""
    vit_h, plus, bigg = (release_shapes(r) for r in SDXL_RELEASES)
    assert vit_h["image_proj.proj.weight"] == (8192, 1024) and bigg["image_proj.proj.weight"] == (8192, 1280)
    assert vit_h["image_proj.proj.bias"] == (8192,) and bigg["image_proj.norm.weight"] == (2048,)
    assert plus["image_proj.latents"] == (1, 16, 1280)
    assert plus["image_proj.proj_in.weight"] == (1280, 1280) and plus["image_proj.proj_out.weight"] == (2048, 1280)
    assert plus["image_proj.norm_out.weight"] == (2048,)
    assert plus["image_proj.layers.3.0.to_q.weight"] == (1280, 1280)          # 20 heads × 64
    assert plus["image_proj.layers.3.0.to_kv.weight"] == (2560, 1280)
    assert plus["image_proj.layers.0.0.to_out.weight"] == (1280, 1280)
    assert plus["image_proj.layers.2.1.1.weight"] == (5120, 1280) and plus["image_proj.layers.2.1.3.weight"] == (1280, 5120)
    assert "image_proj.layers.4.0.to_q.weight" not in plus
    for shapes in (vit_h, bigg, plus):
        kv = {k: v for k, v in shapes.items() if k.startswith("ip_adapter.")}
        assert len(kv) == 140 and sorted({int(k.split(".")[1]) for k in kv}) == list(range(1, 140, 2))
        # down_blocks.1 (640), down_blocks.2 (1280), up_blocks.0 (1280), up_blocks.1 (640), mid (1280)
        assert kv["ip_adapter.1.to_k_ip.weight"] == (640, 2048) and kv["ip_adapter.9.to_v_ip.weight"] == (1280, 2048)
        assert kv["ip_adapter.107.to_k_ip.weight"] == (1280, 2048) and kv["ip_adapter.109.to_k_ip.weight"] == (640, 2048)
        assert kv["ip_adapter.139.to_k_ip.weight"] == (1280, 2048)
        assert [kv[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"][0] for i in range(70)] == list(SDXL.hidden_sizes)


@pytest.mark.parametrize("release, variant, clip, width, tokens", [
    ("ip-adapter_sdxl_vit-h", "linear", VIT_H, 1024, 4),
    ("ip-adapter-plus_sdxl_vit-h", "plus", VIT_H, 1280, 16),
    ("ip-adapter_sdxl", "linear", VIT_BIGG, 1280, 4),
])
def test_releases_told_apart_by_shapes(samples, release, variant, clip, width, tokens):
    """From the header alone: the release, the CLIP vision it needs, SDXL, and it fits SDXL (not SD1.5)."""
    info = read_style_encoder_info(samples[release])
    c = info.config
    assert (c.variant, c.clip_width, c.tokens, c.context_dim, c.num_layers) == (variant, width, tokens, 2048, 70)
    assert c.family == "sdxl" and info.source == "ip-adapter"
    assert info.release is not None and info.release.name == release and release_of(c).name == release
    assert info.release_name.startswith(f"{release} layout")
    assert info.clip_vision is clip
    assert info.detected == "SDXL (context width 2048, 70 cross-attention layers)"
    if variant == "plus":
        assert (c.resampler_dim, c.heads, c.dim_head, c.depth, c.ff_mult) == (1280, 20, 64, 4, 4)
    check_target(info, SDXL)                        # fits
    check_target(info, backbones.SDXL)              # a Backbone works as a target too
    with pytest.raises(FormatMismatchError):
        check_target(info, SD15)


@pytest.mark.parametrize("release", ["ip-adapter_sd15", "ip-adapter-plus_sd15", "ip-adapter_sd15_vit-G"])
def test_sd15_releases_named_too(samples, release):
    info = read_style_encoder_info(samples[release])
    assert info.release.name == release and info.config.family == "sd15"
    assert info.clip_vision is (VIT_BIGG if release.endswith("vit-G") else VIT_H)


# ---------------------------------------------------------------------- loading
@pytest.mark.parametrize("release", SDXL_RELEASES)
def test_full_sdxl_file_loads_against_sdxl(tmp_path, release):
    """The whole file is read (≈0.7 GB of fp16 zeros, no disk): each tensor lands where diffusers' converter puts
    it — the first and last layers' K/V and the projection's output norm are written for real and checked."""
    shapes = release_shapes(release)
    gen = torch.Generator().manual_seed(1)
    norm = "image_proj.norm.weight" if "image_proj.norm.weight" in shapes else "image_proj.norm_out.weight"
    picks = [norm, "ip_adapter.1.to_k_ip.weight", "ip_adapter.3.to_v_ip.weight", "ip_adapter.139.to_v_ip.weight"]
    values = {k: torch.randn(shapes[k], generator=gen).half() for k in picks}
    path = write_release_sample(tmp_path / f"{release}.safetensors", release, values)
    for target in (SDXL, None):                     # None: the loader finds SDXL from the shapes
        encoder = load_style_encoder(path, target)
        assert encoder.config.family == "sdxl" and encoder.num_layers == 70
        assert [m.weight.shape[0] for m in encoder.to_k_ip] == list(SDXL.hidden_sizes)
        assert torch.equal(encoder.to_k_ip[0].weight, values["ip_adapter.1.to_k_ip.weight"])
        assert torch.equal(encoder.to_v_ip[1].weight, values["ip_adapter.3.to_v_ip.weight"])
        assert torch.equal(encoder.to_v_ip[69].weight, values["ip_adapter.139.to_v_ip.weight"])
        assert not encoder.to_k_ip[69].weight.any()  # the zeros stayed where they were
        got_norm = encoder.image_proj.norm.weight if norm.endswith(".norm.weight") else encoder.image_proj.norm_out.weight
        assert torch.equal(got_norm, values[norm])
        del encoder


def test_sd15_ip_adapter_on_sdxl_says_what_to_use(samples):
    with pytest.raises(FormatMismatchError) as err:
        load_style_encoder(samples["ip-adapter_sd15"], SDXL)
    msg = str(err.value)
    assert "\n" not in msg
    assert "made for SD1.5 (context width 768, 16 cross-attention layers)" in msg
    assert "the target model is SDXL (context width 2048, 70 cross-attention layers)" in msg
    assert msg.endswith(SDXL_USE)


@pytest.mark.parametrize("release", SDXL_RELEASES)
def test_sdxl_ip_adapter_on_sd15_says_what_to_use(samples, release):
    with pytest.raises(FormatMismatchError) as err:
        load_style_encoder(samples[release])        # default target: SD1.5
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{release}.safetensors: ")
    assert "made for SDXL" in msg and "target model is SD1.5" in msg and SD15_USE in msg


def test_loaded_encoder_checked_against_the_model_it_patches():
    """A node that loaded with target=None checks the encoder against the MODEL's backbone later."""
    encoder = example_style_encoder("ip-adapter_sd15")
    check_target(encoder, backbones.SD15)
    with pytest.raises(FormatMismatchError, match=r"^style encoder: this style encoder / IP-Adapter is made for "
                                                  r"SD1\.5 .*target model is SDXL .*ip-adapter_sdxl\.safetensors\)$"):
        check_target(encoder, backbones.SDXL)
    with pytest.raises(FormatMismatchError, match="target model is SD1.5"):
        check_target(StyleEncoderConfig.for_target(SDXL), SD15)


def test_auto_target_refuses_unsupported_families(tmp_path):
    from weight_samples import write_header_only
    from productbg.backbones.targets import SD2

    shapes = {"image_proj.proj.weight": (4096, 1024), "image_proj.proj.bias": (4096,),
              "image_proj.norm.weight": (1024,), "image_proj.norm.bias": (1024,)}
    for i, h in enumerate(SD2.hidden_sizes):
        shapes[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = shapes[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = (h, 1024)
    path = write_header_only(tmp_path / "sd21.safetensors", shapes)
    with pytest.raises(FormatMismatchError, match=r"made for SD2\.x .*reads SD1\.5 and SDXL IP-Adapters"):
        load_style_encoder(path, None)


def test_wrong_hidden_size_names_the_sdxl_layer(tmp_path):
    shapes = release_shapes("ip-adapter_sdxl_vit-h")
    shapes["ip_adapter.11.to_k_ip.weight"] = shapes["ip_adapter.11.to_v_ip.weight"] = (640, 2048)
    from weight_samples import write_header_only

    path = write_header_only(tmp_path / "bad.safetensors", shapes)
    with pytest.raises(FormatMismatchError, match=r"ip_adapter\.11\.to_k_ip\.weight is \[640, 2048\] but SDXL layer 5 "
                                                  r"\(down_blocks\.2\.attentions\.0\.transformer_blocks\.1\.attn2\) "
                                                  r"expects \[1280, 2048\]"):
        load_style_encoder(path, SDXL)


def test_layer_order_and_widths_match_a_diffusers_sdxl_unet():
    """File layer i (ip_adapter.<2i+1>) is the i-th attn2 of a diffusers SDXL UNet, and its K/V width is that
    layer's width (built on the meta device: no memory)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    modules = dict(unet.named_modules())
    cross = [name[:-len(".processor")] for name in unet.attn_processors if name.endswith("attn2.processor")]
    assert cross == [layer.diffusers_name for layer in SDXL_LAYERS] and len(cross) == 70
    shapes = release_shapes("ip-adapter_sdxl")
    for i, name in enumerate(cross):
        attn = modules[name]
        assert attn.to_k.in_features == 2048
        assert shapes[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] == (attn.to_out[0].out_features, 2048)


# ---------------------------------------------------------------------- numbers
def _randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Default init plus random LayerNorm affine parameters (so the norms are not identities)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    return module.eval()


def _reference_resampler(sd: dict, x: torch.Tensor, heads: int, depth: int) -> torch.Tensor:
    """IP-Adapter's Resampler written out from the paper's description, on the file's tensors."""
    def ln(t, p):
        return torch.nn.functional.layer_norm(t, t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps=1e-5)

    def split(t):
        b, n, c = t.shape
        return t.reshape(b, n, heads, c // heads).permute(0, 2, 1, 3)

    x = x @ sd["proj_in.weight"].T + sd["proj_in.bias"]
    lat = sd["latents"].expand(x.shape[0], -1, -1)
    for d in range(depth):
        p = f"layers.{d}.0"
        xs, ls = ln(x, p + ".norm1"), ln(lat, p + ".norm2")
        q = split(ls @ sd[p + ".to_q.weight"].T)
        k, v = (split(t) for t in (torch.cat([xs, ls], 1) @ sd[p + ".to_kv.weight"].T).chunk(2, -1))
        w = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
        lat = (w @ v).permute(0, 2, 1, 3).flatten(2) @ sd[p + ".to_out.weight"].T + lat
        f = f"layers.{d}.1"
        h = torch.nn.functional.gelu(ln(lat, f + ".0") @ sd[f + ".1.weight"].T)
        lat = h @ sd[f + ".3.weight"].T + lat
    return ln(lat @ sd["proj_out.weight"].T + sd["proj_out.bias"], "norm_out")


def test_sdxl_plus_resampler_matches_reference_and_diffusers():
    """ip-adapter-plus_sdxl_vit-h's Resampler (1280 wide, 20 heads, 16 queries, depth 4 → 2048) gives the same
    tokens as a straightforward implementation and as diffusers' IPAdapterPlusImageProjection built by its own
    IP-Adapter converter from our tensors."""
    from diffusers.loaders.unet import UNet2DConditionLoadersMixin

    torch.manual_seed(0)
    cfg = StyleEncoderConfig.for_target(SDXL, **RELEASES["ip-adapter-plus_sdxl_vit-h"])
    ours = _randomised(Resampler(cfg), 1)
    sd = {k: v.detach() for k, v in ours.state_dict().items()}
    x = torch.randn(2, 257, 1280)                   # ViT-H/14 at 224²: 256 patches + class token
    with torch.no_grad():
        tokens = ours(x)
        assert tokens.shape == (2, 16, 2048)
        torch.testing.assert_close(tokens, _reference_resampler(sd, x, heads=20, depth=4), rtol=1e-4, atol=1e-4)
        ref = UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers(None, sd, low_cpu_mem_usage=False)
        assert type(ref).__name__ == "IPAdapterPlusImageProjection"
        torch.testing.assert_close(tokens, ref(x), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(tokens[0], tokens[1])


@pytest.mark.parametrize("release, width", [("ip-adapter_sdxl_vit-h", 1024), ("ip-adapter_sdxl", 1280)])
def test_sdxl_linear_projection_matches_diffusers(release, width):
    from diffusers.loaders.unet import UNet2DConditionLoadersMixin

    from productbg.weights.style_encoder import LinearProjection

    torch.manual_seed(0)
    ours = _randomised(LinearProjection(StyleEncoderConfig.for_target(SDXL, **RELEASES[release])), 2)
    sd = {k: v.detach() for k, v in ours.state_dict().items()}
    ref = UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers(None, sd, low_cpu_mem_usage=False)
    x = torch.randn(3, width)
    with torch.no_grad():
        assert ours(x).shape == (3, 4, 2048)
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- CLIP vision
def test_clip_vision_messages_name_what_to_load():
    bigg = read_config("ip-adapter_sdxl")
    vit_h = read_config("ip-adapter_sdxl_vit-h")
    plus = read_config("ip-adapter-plus_sdxl_vit-h")
    assert clip_vision_problem(bigg, 1024, 1280) == (
        "this IP-Adapter reads CLIP ViT-bigG image embeds (1280); the connected CLIP vision is ViT-H (1024): "
        "load clip_vision_g.safetensors (CLIP-ViT-bigG-14-laion2B-39B-b160k)")
    assert clip_vision_problem(vit_h, 1280, 1664) == (
        "this IP-Adapter reads CLIP ViT-H image embeds (1024); the connected CLIP vision is ViT-bigG (1280): "
        "load clip_vision_h.safetensors (CLIP-ViT-H-14-laion2B-s32B-b79K)")
    assert clip_vision_problem(plus, 1280, 1664) == (
        "this IP-Adapter reads CLIP ViT-H penultimate hidden states (1280); the connected CLIP vision is ViT-bigG "
        "(1664): load clip_vision_h.safetensors (CLIP-ViT-H-14-laion2B-s32B-b79K)")
    for config, good in ((bigg, VIT_BIGG), (vit_h, VIT_H), (plus, VIT_H)):
        check_clip_vision(config, good.embed_width, good.hidden_width)          # fits: no error
        bad = VIT_H if good is VIT_BIGG else VIT_BIGG
        with pytest.raises(FormatMismatchError, match=f"load {good.comfy_file}"):
            check_clip_vision(config, bad.embed_width, bad.hidden_width)
    # only the width the projection reads matters; an unknown model is described by its width
    check_clip_vision(vit_h, 1024, None)
    assert clip_vision_problem(vit_h, 512, 768) == (
        "this IP-Adapter reads CLIP ViT-H image embeds (1024); the connected CLIP vision gives 512-wide image "
        "embeds: load clip_vision_h.safetensors (CLIP-ViT-H-14-laion2B-s32B-b79K)")


def read_config(release):
    return StyleEncoderConfig.for_target(SDXL, **RELEASES[release])


def test_clip_vision_widths_from_transformers_and_comfy_shapes():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=1664, projection_dim=1280, num_hidden_layers=1, num_attention_heads=16,
                           intermediate_size=32, image_size=28, patch_size=14)
    with torch.device("meta"):
        hf = CLIPVisionModelWithProjection(cfg)
    assert clip_vision_widths(hf) == (1280, 1664)
    assert clip_vision_widths(SimpleNamespace(model=hf)) == (1280, 1664)  # the pipeline's wrapper
    comfy_like = SimpleNamespace(model=SimpleNamespace(visual_projection=torch.nn.Linear(1280, 1024, bias=False)))
    assert clip_vision_widths(comfy_like) == (1024, 1280)
    assert clip_vision_widths(object()) == (None, None)
    with pytest.raises(FormatMismatchError, match="is ViT-bigG .*load clip_vision_h"):
        check_clip_vision(read_config("ip-adapter_sdxl_vit-h"), *clip_vision_widths(hf))


class _FakeClipVision:
    """ComfyUI's encode_image interface, with features of a given width (and optionally ComfyUI's shapes)."""

    def __init__(self, embed: int, hidden: int, with_shapes: bool):
        self.embed, self.hidden, self.calls = embed, hidden, 0
        if with_shapes:
            self.model = SimpleNamespace(visual_projection=SimpleNamespace(weight=torch.empty(embed, hidden)))

    def encode_image(self, images):
        self.calls += 1
        b = images.shape[0]
        return {"image_embeds": torch.randn(b, self.embed), "penultimate_hidden_states": torch.randn(b, 5, self.hidden)}


@pytest.mark.parametrize("with_shapes", [True, False])
def test_reference_tokens_names_the_clip_vision_to_load(with_shapes):
    """Reference Style's path: a bigG CLIP vision on a ViT-H IP-Adapter fails with the message (before encoding
    when the CLIP vision's weights say its widths, after when only the features do)."""
    encoder = example_style_encoder("ip-adapter_sd15")              # reads ViT-H image embeds (1024)
    fake = _FakeClipVision(VIT_BIGG.embed_width, VIT_BIGG.hidden_width, with_shapes)
    with pytest.raises(FormatMismatchError, match=r"^this IP-Adapter reads CLIP ViT-H image embeds \(1024\); the "
                                                  r"connected CLIP vision is ViT-bigG \(1280\): load clip_vision_h"):
        reference_tokens(encoder, fake, torch.rand(1, 32, 32, 3))
    assert fake.calls == (0 if with_shapes else 1)
    good = _FakeClipVision(VIT_H.embed_width, VIT_H.hidden_width, with_shapes)
    cond, uncond = reference_tokens(encoder, good, torch.rand(2, 32, 32, 3))
    assert cond.shape == uncond.shape == (2, 4, 768)

