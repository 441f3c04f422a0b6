"""Exported embeddings read by the real ComfyUI (0.3.75, in process): ``comfy.sd1_clip.load_embed`` and the
tokenizers that resolve ``embedding:NAME`` get exactly the bank's vectors — SD1.5's one tensor, SDXL's
``clip_l`` (768) and ``clip_g`` (1280) — and on the random full-size SD1.5 checkpoint ``CLIPTextEncode`` with
``embedding:NAME`` gives the same conditioning as the vectors spliced into the token list by hand.

(SDXL's text encoders are not run here: CLIP-G alone is ≈2.8 GB in fp32; its tokenizer path is checked.)"""
import pytest
import torch

pytestmark = pytest.mark.comfyui

PROMPT = "a photo of embedding:{name} on a wooden table"


@pytest.fixture(scope="module")
def exported(comfy, tmp_path_factory):
    """An embeddings folder with one SD1.5 and one SDXL export, and the banks' vectors."""
    from productbg.weights.embedding import export_embedding
    from weight_samples import example_bank

    folder = tmp_path_factory.mktemp("embeddings")
    sd15 = example_bank(seed=4, vectors_per_id=3)
    sdxl = example_bank(seed=5, vectors_per_id=2, family="sdxl")
    export_embedding(sd15, "Running Shoes", folder / "pbg_shoes.safetensors")
    (folder / "brand").mkdir()
    export_embedding(sdxl, "咖啡杯", folder / "brand" / "pbg_mug.safetensors")
    return {"dir": str(folder),
            "sd15": {"clip_l": sd15.vectors("Running Shoes", "clip_l")},
            "sdxl": {e: sdxl.vectors("咖啡杯", e) for e in ("clip_l", "clip_g")}}


def test_load_embed_reads_the_bank_vectors(exported):
    from comfy.sd1_clip import load_embed

    got = load_embed("pbg_shoes", exported["dir"], 768, "clip_l")            # what SD1.5's tokenizer asks for
    assert got.shape == (3, 768) and torch.equal(got, exported["sd15"]["clip_l"])
    for key, width in (("clip_l", 768), ("clip_g", 1280)):                   # SDXL's two tokenizers
        got = load_embed("brand/pbg_mug", exported["dir"], width, key)
        assert got.shape == (2, width) and torch.equal(got, exported["sdxl"][key]), key
    assert load_embed("pbg_nothing", exported["dir"], 768, "clip_l") is None


def _embedded(tokens):
    """(position, tensor) of the embedding entries of one ComfyUI token list."""
    return [(i, t) for i, (t, _w) in enumerate(tokens) if torch.is_tensor(t)]


def test_sd15_tokenizer_resolves_embedding_name(exported):
    from comfy.sd1_clip import SD1Tokenizer

    tok = SD1Tokenizer(embedding_directory=exported["dir"])
    out = tok.tokenize_with_weights(PROMPT.format(name="pbg_shoes"))
    assert list(out) == ["l"] and len(out["l"]) == 1 and len(out["l"][0]) == 77
    found = _embedded(out["l"][0])
    head = tok.tokenize_with_weights("a photo of")["l"][0]
    prefix = next(i for i, (t, _) in enumerate(head) if i and t == head[-1][0])  # the end token: after "a photo of"
    assert prefix == 4
    assert [i for i, _ in found] == [prefix, prefix + 1, prefix + 2]
    assert torch.equal(torch.stack([t for _, t in found]), exported["sd15"]["clip_l"])


def test_sdxl_tokenizer_puts_each_width_in_its_list(exported):
    from comfy.sdxl_clip import SDXLTokenizer

    out = SDXLTokenizer(embedding_directory=exported["dir"]).tokenize_with_weights(PROMPT.format(name="brand/pbg_mug"))
    assert sorted(out) == ["g", "l"]
    positions = {}
    for key, enc, width in (("l", "clip_l", 768), ("g", "clip_g", 1280)):
        found = _embedded(out[key][0])
        assert [t.shape for _, t in found] == [(width,)] * 2, key
        assert torch.equal(torch.stack([t for _, t in found]), exported["sdxl"][enc]), key
        positions[key] = [i for i, _ in found]
    assert positions["l"] == positions["g"] == [4, 5]     # the same places in both token lists


def test_clip_text_encode_equals_spliced_vectors(comfy, exported):
    """CLIPTextEncode("… embedding:pbg_shoes …") = the text encoder run on the token list with the bank's vectors
    put in by hand where the name was (and differs from the prompt without them)."""
    from comfy.sd import load_checkpoint_guess_config

    path = comfy.folder_paths.get_full_path_or_raise("checkpoints", comfy.ckpt_sd15)
    _, clip, _, _ = load_checkpoint_guess_config(path, output_vae=False, output_clip=True, output_model=False,
                                                 embedding_directory=exported["dir"])
    try:
        (cond,) = comfy.nodes.CLIPTextEncode().encode(clip, PROMPT.format(name="pbg_shoes"))
        got = cond[0][0]
        plain = clip.tokenize("a photo of on a wooden table")
        vectors = exported["sd15"]["clip_l"]
        row = plain["l"][0]
        k = 4                                                   # start + "a", "photo", "of"
        spliced = row[:k] + [(v, 1.0) for v in vectors] + row[k:len(row) - len(vectors)]
        assert len(spliced) == 77 and row[-len(vectors):] == [row[-1]] * len(vectors)   # only padding dropped
        want = clip.encode_from_tokens({"l": [spliced]})
        assert got.shape == want.shape == (1, 77, 768)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        without = clip.encode_from_tokens(plain)
        assert (got - without).abs().max() > 1e-2
    finally:
        del clip


def test_comfy_clip_vision_widths_feed_the_check(comfy, tmp_path):
    """ComfyUI's own CLIP_VISION object (a small ViT-bigG-shaped config: hidden 1664, projection 1280, no weights
    loaded) gives its widths to the check, which names the CLIP vision to load."""
    import json

    from comfy.clip_vision import ClipVisionModel

    from productbg.weights.errors import FormatMismatchError
    from productbg.weights.ip_adapters import check_clip_vision, clip_vision_widths
    from weight_samples import RELEASES
    from productbg.weights.style_encoder import StyleEncoderConfig
    from productbg.backbones.targets import SDXL

    config = {"hidden_act": "gelu", "hidden_size": 1664, "image_size": 28, "intermediate_size": 64,
              "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": 16,
              "num_channels": 3, "num_hidden_layers": 1, "patch_size": 14, "projection_dim": 1280}
    (tmp_path / "g.json").write_text(json.dumps(config))
    clip_vision = ClipVisionModel(str(tmp_path / "g.json"))
    assert clip_vision_widths(clip_vision) == (1280, 1664)
    check_clip_vision(StyleEncoderConfig.for_target(SDXL, **RELEASES["ip-adapter_sdxl"]), *clip_vision_widths(clip_vision))
    with pytest.raises(FormatMismatchError, match=r"reads CLIP ViT-H image embeds \(1024\); the connected CLIP vision "
                                                  r"is ViT-bigG \(1280\): load clip_vision_h\.safetensors"):
        check_clip_vision(StyleEncoderConfig.for_target(SDXL, **RELEASES["ip-adapter_sdxl_vit-h"]),
                          *clip_vision_widths(clip_vision))
