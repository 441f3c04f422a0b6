"""ProductBGPipeline on the tiny random models: data flow, identifier confinement, paste-back, loading paths."""
import numpy as np
import pytest
import torch

from productbg.attention import probe
from productbg.imaging.synthetic import packshot
from productbg.pipeline.components import merge_lora, tiny_components
from productbg.pipeline.errors import PipelineError
from productbg.pipeline.pipeline import GenerateSettings, Prepared, ProductBGPipeline

SMALL = GenerateSettings(size=64, steps=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe():
    return ProductBGPipeline.tiny(settings=SMALL, device="cpu")


@pytest.fixture(scope="module")
def product():
    return packshot(64).image


@pytest.fixture(scope="module")
def reference():
    return packshot(64, product_rgb=(0.1, 0.3, 0.9), background_rgb=(0.9, 0.8, 0.3)).image


def test_identifier_confined_and_product_bit_identical(pipe, product):
    """Every cross-attention layer confines the identifier (zero mass on product cells) and the product's core
    pixels come back bit-identical after paste-back, for each of the n images."""
    with probe.record() as rec:
        results = pipe.generate(product, category="shoes", seed=5, n=2)
    assert len(results) == 2 and [r.seed for r in results] == [5, 6]
    assert rec.layers() == set(range(len(pipe.cross_attention_layers)))
    assert sum(r.product_cells for r in rec.identifier) > 0
    assert max(r.max_mass_on_product for r in rec.identifier) == 0.0
    assert min(r.mean_mass_on_background for r in rec.identifier) > 0.0
    for r in results:
        core = r.mask >= 0.999
        assert core.sum() > 100
        assert np.array_equal(r.image[core], r.placed[core])
        assert not np.array_equal(r.raw[core], r.placed[core])          # the generator did change them
        assert r.report["metrics"]["delta_e2000"]["max"] < 100
        assert "psnr_before_paste_back_db" in r.report["metrics"]
    assert not np.array_equal(results[0].image, results[1].image)


def test_same_seed_same_image_and_prompt(pipe, product):
    """A seed reproduces its image; the identifier's placeholder tokens are in the prompt."""
    a = pipe.generate(product, category="shoes", seed=3)[0]
    b = pipe.generate(product, category="shoes", seed=3)[0]
    assert np.array_equal(a.image, b.image)
    assert "<pbg_0_0> <pbg_0_1>" in a.prompt
    c = pipe.generate(product, category="furniture", seed=3)[0]
    assert not np.array_equal(a.raw, c.raw)                               # another category, another background


def test_placement_defaults(pipe, product):
    """The product is centred at fill 0.74 and the repaint mask covers the background plus a grown band."""
    prep = pipe.prepare(product, GenerateSettings(size=128))
    ys, xs = np.nonzero(prep.mask >= 0.5)
    assert abs(max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 - 0.74 * 128) <= 2
    background = prep.mask < 0.5
    assert prep.repaint[background].min() == 1.0                         # all background is repainted
    product_px = prep.mask >= 0.5
    assert 0 < prep.repaint[product_px].mean() < 1                       # the grown band eats into the product
    assert pipe.prepare(prep) is prep


def test_reference_style_changes_background_only_where_allowed(pipe, product, reference):
    """A reference image changes the result; its style guidance carries the product mask (background only)."""
    plain = pipe.generate(product, category="shoes", seed=1)[0]
    styled = pipe.generate(product, category="shoes", reference=reference, seed=1, style_weight=2.0)[0]
    assert not np.allclose(plain.raw, styled.raw)
    prep = pipe.prepare(product)
    style = pipe.style_guidance(reference, prep.mask, SMALL)
    assert torch.equal(style.product.mask[0], torch.as_tensor(prep.mask))
    assert style.cond_tokens.shape == (1, 4, 32) and not torch.equal(style.cond_tokens, style.uncond_tokens)


def test_zero_shot_words_without_bank(product):
    """Without identifiers, the category's own words are the confined tokens."""
    c = tiny_components(style=False)
    c.identifiers = None
    pipe = ProductBGPipeline(c, settings=SMALL, device="cpu")
    encoded = pipe.prompts.encode("marble table")
    assert encoded.text == "a product photo on a marble table background"
    ids = pipe.components.tokenizer(encoded.text).input_ids
    words = pipe.components.tokenizer.convert_ids_to_tokens([ids[i] for i in encoded.spec.token_indices])
    assert words == ["marble</w>", "table</w>"]
    with probe.record() as rec:
        pipe.generate(product, category="marble table")
    assert rec.identifier and max(r.max_mass_on_product for r in rec.identifier) == 0.0


def test_four_channel_model_runs_with_noise_mask(product):
    """The plain (4-channel) UNet inpaints with a latent noise mask and keeps the product's core."""
    pipe = ProductBGPipeline.tiny(inpaint=False, style=False, settings=SMALL, device="cpu")
    r = pipe.generate(product, category="toys", seed=0)[0]
    core = r.mask >= 0.999
    assert np.array_equal(r.image[core], r.placed[core])
    assert r.image.shape == (64, 64, 3) and np.isfinite(r.image).all()


def test_clear_errors(pipe, product, tmp_path):
    """Wrong inputs raise PipelineError with a message that says what is wrong."""
    from productbg.weights.bank import CategoryBank

    with pytest.raises(PipelineError, match="multiple of 8"):
        GenerateSettings(size=60)
    with pytest.raises(PipelineError, match="no such file|cannot read"):
        pipe.generate(tmp_path / "missing.png", category="x")
    with pytest.raises(PipelineError, match="empty"):
        pipe.generate(np.ones((32, 32, 3), np.float32), category="x")
    bank = CategoryBank(vectors_per_id=1)
    bank.add("shoes", torch.zeros(1, 768))
    bank.save(tmp_path / "bank.safetensors")
    c = tiny_components(style=False)
    wrong = ProductBGPipeline.from_components(c, bank=tmp_path / "bank.safetensors", settings=SMALL, device="cpu")
    with pytest.raises(PipelineError, match="another base model"):
        wrong.generate(product, category="shoes")
    with pytest.raises(PipelineError, match="did you mean|not found|no category"):
        wrong.generate(product, category="shoe")
    no_style = ProductBGPipeline.tiny(style=False, settings=SMALL, device="cpu")
    with pytest.raises(PipelineError, match="style encoder"):
        no_style.generate(product, category="x", reference=product)


def test_lora_merge_adds_low_rank_update(tmp_path):
    """A peft-layout LoRA file changes exactly its modules by strength · up @ down · alpha / r."""
    from productbg.weights.safefile import atomic_save

    c = tiny_components(style=False)
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    layer = c.unet.get_submodule(path)
    down, up = torch.randn(2, layer.in_features), torch.randn(layer.out_features, 2)
    atomic_save({f"unet.{path}.lora_A.weight": down, f"unet.{path}.lora_B.weight": up},
                tmp_path / "lora.safetensors")
    before = layer.weight.detach().clone()
    other = c.unet.get_submodule(path.replace("to_k", "to_v")).weight.detach().clone()
    assert merge_lora(c, tmp_path / "lora.safetensors", strength=0.5) == 1
    torch.testing.assert_close(layer.weight.detach(), before + 0.5 * up @ down)
    assert torch.equal(c.unet.get_submodule(path.replace("to_k", "to_v")).weight, other)
    atomic_save({"unet.nope.lora_A.weight": down, "unet.nope.lora_B.weight": up}, tmp_path / "bad.safetensors")
    with pytest.raises(PipelineError, match="does not have"):
        merge_lora(c, tmp_path / "bad.safetensors")


def test_from_single_file_and_folder(tmp_path, product, monkeypatch):
    """The same tiny model loads from a single-file checkpoint (offline, explicit configs) and from a diffusers
    folder, and both generate the same image as the in-memory model."""
    from productbg.pipeline.single_file import save_single_file, write_config_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    c = tiny_components(style=False)
    configs = write_config_dir(tmp_path / "configs", c.unet, c.vae, c.text_encoder)
    ckpt = save_single_file(tmp_path / "tiny.safetensors", c.unet, c.vae, c.text_encoder)
    for sub in ("unet", "vae", "text_encoder"):
        getattr(c, sub).save_pretrained(tmp_path / "folder" / sub)
    reference = ProductBGPipeline(c, settings=SMALL, device="cpu")
    prepared = reference.prepare(product)
    expected = reference.generate(prepared, seed=2)[0].raw
    for loaded in (ProductBGPipeline.from_single_file(ckpt, config_dir=configs, settings=SMALL, device="cpu"),
                   ProductBGPipeline.from_pretrained(tmp_path / "folder", settings=SMALL, device="cpu")):
        np.testing.assert_allclose(loaded.generate(prepared, seed=2)[0].raw, expected, atol=1e-5)
    assert isinstance(prepared, Prepared)
