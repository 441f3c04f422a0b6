"""LoRA key conversion between peft/diffusers and kohya (ComfyUI) layouts: names, alphas, exact round trips."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from productbg.weights.errors import FormatMismatchError, MalformedFileError, WeightsError
from productbg.weights.lora import (LoraModule, convert_lora_file, detect_layout, diffusers_path, kohya_name,
                                    parse_lora, read_lora, to_kohya, to_peft)
from productbg.weights.safefile import atomic_save
from weight_samples import sd15_lora_modules

TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, cross_attention_dim=32,
                 attention_head_dim=8, block_out_channels=(32, 64), norm_num_groups=8,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def read_all(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------- names
@pytest.mark.parametrize("component, path, name", [
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"),
    ("unet", "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_out.0",
     "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_out_0"),
    ("unet", "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
     "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj"),
    ("unet", "down_blocks.1.attentions.1.proj_in", "lora_unet_down_blocks_1_attentions_1_proj_in"),
    ("unet", "up_blocks.1.resnets.0.conv_shortcut", "lora_unet_up_blocks_1_resnets_0_conv_shortcut"),
    ("unet", "down_blocks.2.resnets.1.time_emb_proj", "lora_unet_down_blocks_2_resnets_1_time_emb_proj"),
    ("unet", "time_embedding.linear_1", "lora_unet_time_embedding_linear_1"),
    ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj",
     "lora_te_text_model_encoder_layers_0_self_attn_q_proj"),
    ("text_encoder", "text_model.encoder.layers.11.mlp.fc2", "lora_te_text_model_encoder_layers_11_mlp_fc2"),
])
def test_kohya_names_both_ways(component, path, name):
    """diffusers module paths map to the kohya names ComfyUI's model_lora_keys_* produce, and back."""
    assert kohya_name(component, path) == name
    assert diffusers_path(name) == (component, path)


def test_sdxl_text_encoder_prefixes():
    assert kohya_name("text_encoder", "text_model.final_layer_norm", sdxl=True) == "lora_te1_text_model_final_layer_norm"
    assert kohya_name("text_encoder_2", "text_model.encoder.layers.3.mlp.fc1") == \
        "lora_te2_text_model_encoder_layers_3_mlp_fc1"
    assert diffusers_path("lora_te2_text_model_encoder_layers_3_mlp_fc1") == \
        ("text_encoder_2", "text_model.encoder.layers.3.mlp.fc1")


@pytest.mark.parametrize("name", ["lora_unet_input_blocks_1_1_proj_in", "lora_te_encoder_layers_0_q_proj",
                                  "unet_down_blocks_0", "lora_unet_"])
def test_unmappable_kohya_names(name):
    """LDM-style or unprefixed names are refused rather than guessed."""
    with pytest.raises(WeightsError):
        diffusers_path(name)


# ---------------------------------------------------------------------- round trips
def test_kohya_peft_kohya_is_exact(tmp_path):
    """kohya -> peft -> kohya reproduces every tensor (values, dtypes, alphas) and the metadata."""
    tensors, meta = to_kohya(sd15_lora_modules(rank=4, alpha=2.0))
    meta = {"ss_network_dim": "4", "ss_training_comment": "训练"}
    src = atomic_save(tensors, tmp_path / "k.safetensors", meta)
    convert_lora_file(src, tmp_path / "p.safetensors", "peft")
    convert_lora_file(tmp_path / "p.safetensors", tmp_path / "k2.safetensors", "kohya")
    a, meta_a = read_all(src)
    b, meta_b = read_all(tmp_path / "k2.safetensors")
    assert_same_tensors(a, b)
    assert {k: v for k, v in meta_b.items() if k != "format"} == meta


def test_peft_kohya_peft_is_exact(tmp_path):
    """peft (diffusers keys, no alpha) -> kohya -> peft reproduces every tensor; no alpha is invented."""
    tensors, meta = to_peft(sd15_lora_modules(rank=2, alpha=None))
    src = atomic_save(tensors, tmp_path / "p.safetensors", meta)
    convert_lora_file(src, tmp_path / "k.safetensors", "kohya")
    kohya, _ = read_all(tmp_path / "k.safetensors")
    assert not any(k.endswith(".alpha") for k in kohya)
    convert_lora_file(tmp_path / "k.safetensors", tmp_path / "p2.safetensors", "peft")
    assert_same_tensors(read_all(src)[0], read_all(tmp_path / "p2.safetensors")[0])


def test_mixed_alphas_ranks_and_alpha_dtype_survive(tmp_path):
    mods = sd15_lora_modules(rank=2, alpha=4.0, text_encoder=False)[:6]
    mods[1].alpha = None
    mods[2].alpha = torch.tensor(1.0)
    mods[3].down, mods[3].up = torch.randn(8, mods[3].down.shape[1]).half(), torch.randn(mods[3].up.shape[0], 8).half()
    for m in mods:
        if m.alpha is not None:
            m.alpha = m.alpha.half()
    tensors, _ = to_kohya(mods)
    src = atomic_save(tensors, tmp_path / "k.safetensors")
    convert_lora_file(src, tmp_path / "p.safetensors", "peft")
    back = {m.path: m for m in read_lora(tmp_path / "p.safetensors").modules}
    assert {m.path: m.scale for m in mods} == {p: m.scale for p, m in back.items()}
    assert back[mods[1].path].alpha is None and back[mods[0].path].alpha.dtype == torch.float16
    convert_lora_file(tmp_path / "p.safetensors", tmp_path / "k2.safetensors", "kohya")
    assert_same_tensors(read_all(src)[0], read_all(tmp_path / "k2.safetensors")[0])


# ---------------------------------------------------------------------- peft inputs
def _peft_pair(prefix, path, suffix=""):
    return {f"{prefix}{path}.lora_A{suffix}.weight": torch.ones(2, 4), f"{prefix}{path}.lora_B{suffix}.weight": torch.ones(3, 2)}


@pytest.mark.parametrize("prefix, suffix, component", [
    ("unet.", "", "unet"),
    ("base_model.model.", "", "unet"),
    ("unet.base_model.model.", "", "unet"),
    ("", "", "unet"),
    ("", ".default", "unet"),
])
def test_peft_prefixes_for_unet(prefix, suffix, component):
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    (m,), layout = parse_lora(_peft_pair(prefix, path, suffix))
    assert layout == "peft" and (m.component, m.path) == (component, path)
    tensors, _ = to_kohya([m])
    assert set(tensors) == {f"lora_unet_{path.replace('.', '_')}.lora_down.weight",
                            f"lora_unet_{path.replace('.', '_')}.lora_up.weight"}


@pytest.mark.parametrize("prefix", ["text_encoder.", "base_model.model.", "text_encoder.base_model.model.", ""])
def test_peft_prefixes_for_text_encoder(prefix):
    path = "text_model.encoder.layers.4.self_attn.v_proj"
    (m,), _ = parse_lora(_peft_pair(prefix, path))
    assert (m.component, m.path) == ("text_encoder", path)
    assert "lora_te_text_model_encoder_layers_4_self_attn_v_proj.lora_up.weight" in to_kohya([m])[0]


def test_old_diffusers_processor_keys():
    """diffusers' pre-peft attention-processor LoRA names are read too (to_out_lora -> to_out.0)."""
    base = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor"
    sd = {f"{base}.to_out_lora.down.weight": torch.ones(2, 4), f"{base}.to_out_lora.up.weight": torch.ones(4, 2)}
    (m,), _ = parse_lora(sd)
    assert m.path == "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"


def test_peft_metadata_alphas_are_read():
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 4, "unet.alpha_pattern": {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v": 1}})}
    sd = {**_peft_pair("unet.", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"),
          **_peft_pair("unet.", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v")}
    mods, _ = parse_lora(sd, meta)
    assert [m.scale for m in mods] == [2.0, 0.5]


# ---------------------------------------------------------------------- diffusers reads our peft output
def test_diffusers_loads_converted_peft_with_our_alphas(tmp_path):
    """A kohya LoRA with mixed ranks/alphas, converted to peft, loads in diffusers as W + up·down·alpha/r."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    base = {k: v.clone() for k, v in unet.state_dict().items()}

    def module(path, rank, alpha):
        w = base[path + ".weight"]
        down = torch.randn(rank, *w.shape[1:]) * 0.1
        up = torch.randn(w.shape[0], rank, *([1] * (w.ndim - 2))) * 0.1
        return LoraModule("unet", path, down, up, None if alpha is None else torch.tensor(float(alpha)))

    mods = [module("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 2, 1.0),
            module("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 4, 8.0),
            module("mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0", 2, None),
            module("up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj", 2, 1.0),
            module("down_blocks.0.resnets.0.conv1", 2, 4.0)]
    src = atomic_save(to_kohya(mods)[0], tmp_path / "k" / "lora.safetensors")
    convert_lora_file(src, tmp_path / "p" / "lora.safetensors", "peft")
    state, alphas, meta = Loader.lora_state_dict(str(tmp_path / "p"), weight_name="lora.safetensors",
                                                 return_lora_metadata=True)
    assert alphas is None and meta["unet.lora_alpha"] in (1.0, 2.0)
    Loader.load_lora_into_unet(state, alphas, unet, adapter_name="converted", metadata=meta)
    unet.fuse_lora()
    fused = unet.state_dict()
    for m in mods:
        w0 = base[m.path + ".weight"]
        expected = w0 + (m.up.flatten(1) @ m.down.flatten(1)).reshape(w0.shape) * m.scale
        got = fused.get(m.path + ".base_layer.weight", fused.get(m.path + ".weight"))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("tensors, error, match", [
    ({"lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": torch.ones(2, 2),
      "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.ones(2, 2)}, FormatMismatchError, "LoHa"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.ones(2, 4)}, MalformedFileError,
     "lacks its lora_down or lora_up"),
    ({"unet.down_blocks.0.resnets.0.conv1.lora_A.weight": torch.ones(2, 4)}, MalformedFileError, "lacks"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.ones(2, 4),
      "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.ones(3, 5)}, MalformedFileError, "rank-r pair"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.ones(2, 4, dtype=torch.int32),
      "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.ones(3, 2)}, MalformedFileError, "float"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.ones(2, 4),
      "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.ones(3, 2),
      "lora_unet_down_blocks_0_resnets_0_conv1.alpha": torch.ones(2)}, MalformedFileError, "alpha"),
    ({"unet.x.lora_A.weight": torch.ones(2, 4), "unet.x.lora_B.weight": torch.ones(3, 2),
      "unet.x.lora_magnitude_vector": torch.ones(3)}, FormatMismatchError, "DoRA"),
    ({"unet.a.lora_A.weight": torch.ones(2, 4), "unet.base_model.model.a.lora_A.weight": torch.ones(2, 4),
      "unet.a.lora_B.weight": torch.ones(3, 2)}, MalformedFileError, "twice"),
    ({"model.diffusion_model.x.weight": torch.ones(2)}, FormatMismatchError, "not a LoRA"),
])
def test_bad_lora_state_dicts(tensors, error, match):
    with pytest.raises(error, match=match):
        parse_lora(tensors)


def test_ldm_named_kohya_cannot_become_peft(tmp_path):
    path = tmp_path / "ldm.safetensors"
    save_file({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.ones(2, 4),
               "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.ones(4, 2)}, str(path))
    with pytest.raises(WeightsError, match="input_blocks are not converted"):
        convert_lora_file(path, tmp_path / "out.safetensors", "peft")


def test_unrepresentable_peft_path_is_refused():
    """A module whose name would not survive the kohya round trip is refused instead of garbled."""
    m = LoraModule("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k_ip", torch.ones(1, 2),
                   torch.ones(2, 1))
    with pytest.raises(WeightsError, match="unambiguously"):
        to_kohya([m])


def test_nan_lora_refused(tmp_path):
    tensors, meta = to_kohya(sd15_lora_modules(text_encoder=False, conv=False)[:2])
    next(v for k, v in tensors.items() if k.endswith("lora_up.weight"))[0, 0] = float("nan")
    path = atomic_save(tensors, tmp_path / "n.safetensors", meta)
    with pytest.raises(MalformedFileError, match="NaN"):
        read_lora(path)


def test_convert_rejects_unknown_layout_and_pickles(tmp_path):
    tensors, _ = to_kohya(sd15_lora_modules(text_encoder=False, conv=False)[:1])
    src = atomic_save(tensors, tmp_path / "k.safetensors")
    with pytest.raises(WeightsError, match="target layout"):
        convert_lora_file(src, tmp_path / "o.safetensors", "lycoris")
    (tmp_path / "x.bin").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="pickle"):
        convert_lora_file(tmp_path / "x.bin", tmp_path / "o.safetensors", "kohya")


def test_detect_layout():
    assert detect_layout(["lora_unet_a.lora_down.weight", "lora_unet_a.alpha"]) == "kohya"
    assert detect_layout(["unet.a.lora_A.weight"]) == "peft"
    assert detect_layout(["clip_l"]) is None and detect_layout([]) is None


def test_read_lora_reports(tmp_path):
    tensors, meta = to_peft(sd15_lora_modules(rank=3))
    path = atomic_save(tensors, tmp_path / "p.safetensors", meta)
    lora = read_lora(path)
    assert lora.layout == "peft" and lora.ranks() == [3]
    assert lora.components() == {"unet": 16 * 10 + 3, "text_encoder": 12 * 6}
    loaded = load_file(str(path))
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight" in loaded
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in loaded
