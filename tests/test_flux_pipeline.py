"""Flux.1 in the diffusers pipeline, on tiny random models: loading Flux files in ComfyUI's layouts offline, the
category prompt on T5, and exact confinement in every block through ``ProductBGPipeline.generate``."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from flux_tiny_files import write_bundled, write_comfy_tree, write_configs
from productbg.attention import ProductMask
from productbg.attention.joint import flux_token_grid
from productbg.pipeline import PipelineError, ProductBGPipeline
from productbg.pipeline.components import SeededIdentifiers
from productbg.pipeline.flux_files import custom_t5_layout, find_companion, load_flux
from productbg.pipeline.flux_keys import bfl_to_diffusers, block_counts, diffusers_to_bfl
from productbg.pipeline.flux_models import tiny_flux_parts, tiny_flux_transformer
from productbg.pipeline.t5_file import t5_input_embeddings
from productbg.weights.safefile import atomic_save, read_header

SIZE = 64


def product_image(size: int = SIZE) -> np.ndarray:
    """An RGBA product (alpha = product) in the middle of the canvas."""
    img = np.zeros((size, size, 4), np.float32)
    img[size // 4:3 * size // 4, 3 * size // 8:5 * size // 8] = (0.8, 0.3, 0.2, 1.0)
    return img


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny Fill parts, their configs, one bundled file and a ComfyUI tree (transformer alone + fp8 T5)."""
    root = tmp_path_factory.mktemp("hA-flux")
    parts = tiny_flux_parts("fill")
    return {"parts": parts, "configs": write_configs(parts, root / "configs"),
            "bundled": write_bundled(parts, root / "flux1-fill-bundled.safetensors"),
            "tree": write_comfy_tree(parts, root / "ComfyUI")}


def test_bfl_mapping_round_trip_and_agrees_with_diffusers_at_full_width():
    """BFL <-> diffusers is a bijection on a tiny model (values), and at Flux's full width gives the names and
    shapes of diffusers' own converter (meta tensors: nothing allocated)."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    for variant in ("fill", "schnell"):
        state = tiny_flux_transformer(variant, double=2, single=3).state_dict()
        bfl = diffusers_to_bfl(state, "model.diffusion_model.")
        assert block_counts(bfl) == (2, 3)
        assert any(k.startswith("model.diffusion_model.double_blocks.1.img_attn.qkv") for k in bfl)
        back = bfl_to_diffusers(bfl)
        assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    with torch.device("meta"):
        full = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True).state_dict()
    bfl = diffusers_to_bfl(full)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    ours = bfl_to_diffusers(bfl)
    assert theirs.keys() == ours.keys() and all(theirs[k].shape == ours[k].shape for k in ours)
    with pytest.raises(ValueError, match="does not have"):
        bfl_to_diffusers({**bfl, "double_blocks.0.extra.weight": torch.zeros(1)})


def test_bundled_single_file_loads_the_same_models(files):
    """ComfyUI's checkpoint layout: every model comes back with the weights it was written with; T5's table is the
    one ComfyUI builds from the file (an fp32 file's T5 is held in fp16)."""
    parts, loaded = files["parts"], load_flux(files["bundled"], config_dir=files["configs"])
    assert loaded.variant == "fill" and loaded.source == files["bundled"].name
    for ours, theirs in ((parts.transformer, loaded.transformer), (parts.clip_l, loaded.clip_l),
                         (parts.vae, loaded.vae)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    header = read_header(files["bundled"])
    table = t5_input_embeddings(files["bundled"], header, custom_t5_layout(header, "bundled"))
    assert table.dtype == torch.float16
    assert torch.equal(loaded.t5.get_input_embeddings().weight, table.float())
    ids = torch.tensor([[71, 1712, 19, 1]])
    x = torch.randn(1, 4, int(loaded.transformer.config.in_channels))
    with torch.no_grad():
        same = loaded.t5.encoder.block[0].layer[0].SelfAttention.q(x[..., :32])
        assert torch.equal(same, parts.t5.encoder.block[0].layer[0].SelfAttention.q(x[..., :32]))
        assert torch.isfinite(loaded.t5(ids).last_hidden_state).all()


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_transformer_alone_finds_its_companions_in_the_comfyui_tree(files, tmp_path, prefix):
    """models/diffusion_models/<transformer> (BFL names, with or without ComfyUI's prefix): the T5, CLIP-L and VAE
    are found in models/text_encoders and models/vae; the fp8 T5 keeps its linear weights in fp8 and its table is
    fp8-rounded, and computes in the compute dtype."""
    transformer = write_comfy_tree(tiny_flux_parts("dev"), tmp_path / "ComfyUI", prefix=prefix)
    loaded = load_flux(transformer, config_dir=files["configs"])
    assert loaded.variant == "dev"
    assert loaded.source == ("flux1-dev.safetensors + t5xxl_fp8_e4m3fn.safetensors + clip_l.safetensors + "
                             "ae.safetensors")
    q = loaded.t5.encoder.block[0].layer[0].SelfAttention.q
    assert q.weight.dtype == torch.float8_e4m3fn and loaded.t5.encoder.final_layer_norm.weight.dtype == torch.float32
    t5_file = transformer.parents[1] / "text_encoders" / "t5xxl_fp8_e4m3fn.safetensors"
    header = read_header(t5_file)
    rounded = t5_input_embeddings(t5_file, header, custom_t5_layout(header, "t5"))
    assert torch.equal(loaded.t5.get_input_embeddings().weight, rounded.float())
    expected = (loaded.t5.get_input_embeddings().weight[71] !=
                files["parts"].t5.get_input_embeddings().weight[71])
    assert expected.any()  # the fp8 rounding moved the table
    with torch.no_grad():
        out = loaded.t5(torch.tensor([[71, 1712, 1]])).last_hidden_state
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_variants_and_depth_from_keys(files, tmp_path):
    """schnell: no guidance_in; depth counted from the keys, as ComfyUI counts it."""
    parts = tiny_flux_parts("schnell")
    parts.transformer = tiny_flux_transformer("schnell", double=2, single=3)
    loaded = load_flux(write_comfy_tree(parts, tmp_path / "ComfyUI"), config_dir=files["configs"])
    assert loaded.variant == "schnell" and not loaded.guidance_embeds
    assert (len(loaded.transformer.transformer_blocks), len(loaded.transformer.single_transformer_blocks)) == (2, 3)


def one_line_error(fn, *match: str) -> str:
    with pytest.raises(PipelineError) as e:
        fn()
    text = str(e.value)
    assert "\n" not in text and all(m in text for m in match), text
    return text


def test_refusals_are_one_line(files, tmp_path):
    """A companion found nowhere names its flag; Flux relatives and a wrong img_in are named; pickles refused."""
    lonely = tmp_path / "flux1-dev.safetensors"
    parts = tiny_flux_parts("dev")
    atomic_save({k: v.contiguous() for k, v in diffusers_to_bfl(parts.transformer.state_dict()).items()}, lonely)
    assert find_companion(lonely, "t5") is None
    one_line_error(lambda: load_flux(lonely, config_dir=files["configs"]), "--t5", "no T5-XXL")
    one_line_error(lambda: load_flux(lonely, config_dir=files["configs"], t5=files["bundled"]), "--clip-l")
    chroma = tmp_path / "chroma.safetensors"
    atomic_save({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 1),
                 "distilled_guidance_layer.in_proj.weight": torch.zeros(1, 1)}, chroma)
    one_line_error(lambda: load_flux(chroma), "Chroma")
    odd = dict(diffusers_to_bfl(parts.transformer.state_dict()))
    odd["img_in.weight"] = torch.zeros(32, 96)
    atomic_save({k: v.contiguous() for k, v in odd.items()}, tmp_path / "odd.safetensors")
    one_line_error(lambda: load_flux(tmp_path / "odd.safetensors", config_dir=files["configs"]), "96 features")
    (tmp_path / "flux.ckpt").write_bytes(b"x")
    one_line_error(lambda: load_flux(tmp_path / "flux.ckpt"), "only .safetensors")
    pipe = ProductBGPipeline.tiny(family="flux")
    one_line_error(lambda: pipe.generate(product_image(), "marble", size=SIZE, steps=1, confinement="columns"),
                   "T5 is bidirectional")
    one_line_error(lambda: pipe.generate(product_image(), "marble", size=SIZE, steps=1, sampler="ddim"), "euler")
    one_line_error(lambda: pipe.generate(product_image(), "marble", size=72, steps=1), "multiples of 16")
    one_line_error(lambda: pipe.generate(product_image(), "marble", reference=product_image(), size=SIZE, steps=1),
                   "Flux Redux")
    sd = ProductBGPipeline.tiny()
    one_line_error(lambda: sd.generate(product_image(), "marble", size=SIZE, steps=1, sampler="euler"), "Flux.1's")


class WordsBank:
    """A ``flux`` bank stand-in whose category's vectors are T5's own input embeddings of its words."""

    template = "a product photo on a {id} background"

    def __init__(self, t5, tokenizer, words: dict[str, str]) -> None:
        self.t5, self.tokenizer, self.words = t5, tokenizer, words

    def resolve(self, name: str) -> str:
        return name

    def vectors(self, name: str, encoder: str = "t5xxl") -> torch.Tensor:
        ids = self.tokenizer(self.words[name], add_special_tokens=False).input_ids
        return self.t5.get_input_embeddings().weight[torch.tensor(ids)].detach().clone()


def test_t5_context_of_a_bank_equals_its_words():
    """Spliced at T5's sentinel slots, a bank's vectors encode bit for bit as its words; the identifier-free
    stream is the prompt without them and the pooled CLIP-L vector the prompt without {id}, for every category."""
    parts = tiny_flux_parts("fill")
    parts.identifiers = WordsBank(parts.t5, parts.t5_tokenizer, {"tables": "white marble table top",
                                                                  "garden": "green garden"})
    pipe = ProductBGPipeline(parts, device="cpu")
    enc = pipe.prompts
    for name, words in parts.identifiers.words.items():
        prompt = enc.encode(name, extra="soft light")
        text = f"a product photo on a {words} background, soft light"
        ids = enc.t5_ids(text)
        with torch.no_grad():
            assert torch.equal(prompt.context, parts.t5(input_ids=ids).last_hidden_state)
            free_ids = enc.t5_ids("a product photo on a background, soft light")
            assert torch.equal(prompt.spec.plain_context, parts.t5(input_ids=free_ids).last_hidden_state)
        assert prompt.context.shape == (1, 256, 32) and len(prompt.spec.token_indices) == len(
            parts.t5_tokenizer(words, add_special_tokens=False).input_ids)
        assert torch.equal(prompt.pooled, enc.pooled("a product photo on a background, soft light"))
    assert not torch.equal(enc.encode("tables").context, enc.encode("garden").context)


# ------------------------------------------------------------------------------------------ per-block exactness
class Blocks:
    """Record each block's inputs and outputs in one generation; replay a recorded run's image tokens and free
    stream into another (only the full text stream, the first ``lf`` text tokens, is then the run's own)."""

    def __init__(self, transformer, lf: int, replay: "Blocks | None" = None) -> None:
        self.lf, self.replay = lf, replay
        self.inputs: dict = {}
        self.outputs: dict = {}
        self.keys = [("transformer_blocks", i) for i in range(len(transformer.transformer_blocks))] + \
            [("single_transformer_blocks", i) for i in range(len(transformer.single_transformer_blocks))]
        self.handles = []
        for key in self.keys:
            block = getattr(transformer, key[0])[key[1]]
            self.handles.append(block.register_forward_pre_hook(
                lambda m, a, kw, key=key: self._before(key, kw), with_kwargs=True))
            self.handles.append(block.register_forward_hook(
                lambda m, a, kw, out, key=key: self.outputs.__setitem__(key, tuple(t.clone() for t in out)),
                with_kwargs=True))

    def _before(self, key, kw):
        kw = dict(kw)
        if self.replay is not None:
            before = self.replay.inputs[key]
            kw["hidden_states"] = before["hidden_states"].clone()
            kw["encoder_hidden_states"] = torch.cat([kw["encoder_hidden_states"][:, :self.lf],
                                                     before["encoder_hidden_states"][:, self.lf:]], 1)
        self.inputs[key] = {k: kw[k].clone() for k in ("hidden_states", "encoder_hidden_states")}
        return (), kw

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def run_recorded(pipe, prep, category, lf, replay=None, **settings):
    blocks = Blocks(pipe.components.transformer, lf, replay)
    try:
        pipe.generate(prep, category, seed=3, steps=1, **settings)
    finally:
        blocks.remove()
    return blocks


def test_product_cells_and_free_stream_exact_in_every_block_through_the_pipeline():
    """Two categories, each block's inputs held fixed (the first run's image tokens and free stream replayed into
    the second): the product cells' output and the free stream are bit-identical in every double and single block,
    the background cells and the full stream are not. Unconfined (strength 0), the product cells move."""
    pipe = ProductBGPipeline.tiny(family="flux")
    settings = dict(size=SIZE)
    prep = pipe.prepare(product_image(), replace(pipe.settings, **settings))
    lf = 256
    first = run_recorded(pipe, prep, "marble", lf, **settings)
    second = run_recorded(pipe, prep, "velvet", lf, replay=first, **settings)
    grid = flux_token_grid(SIZE, SIZE)
    cover = ProductMask(torch.as_tensor(prep.mask)).coverage(grid, torch.device("cpu"))[0]
    product, background = cover >= ProductMask(torch.as_tensor(prep.mask)).threshold, cover == 0
    assert product.any() and background.any()
    assert len(first.keys) == 2
    for key in first.keys:
        text0, image0 = first.outputs[key]
        text1, image1 = second.outputs[key]
        assert image0.shape[1] == math.prod(grid) and text0.shape[1] == 2 * lf
        assert torch.equal(image1[0, product], image0[0, product]), f"{key}: product cells moved"
        assert torch.equal(text1[:, lf:], text0[:, lf:]), f"{key}: the free stream moved"
        assert (image1[0, background] - image0[0, background]).abs().max() > 1e-6, f"{key}: background inert"
        assert (text1[:, :lf] - text0[:, :lf]).abs().max() > 1e-6
    loose = run_recorded(pipe, prep, "marble", lf, identifier_strength=0.0, **settings)
    looser = run_recorded(pipe, prep, "velvet", lf, replay=loose, identifier_strength=0.0, **settings)
    moved = [key for key in loose.keys
             if not torch.equal(loose.outputs[key][1][0, product], looser.outputs[key][1][0, product])]
    assert moved == loose.keys  # unconfined, the identifier reaches the product in every block


def test_generate_end_to_end_product_untouched_and_shapes():
    """dev (noise mask) and Fill, CFG 1 and CFG 2 (a negative row beside the positive), two images: the product
    core is the placed product bit for bit, images differ by seed."""
    for inpaint in (True, False):
        pipe = ProductBGPipeline.tiny(family="flux", inpaint=inpaint)
        assert pipe.components.variant == ("fill" if inpaint else "dev")
        for cfg in (1.0, 2.0):
            results = pipe.generate(product_image(), "marble", seed=1, n=2, size=SIZE, steps=2, guidance_scale=cfg)
            assert len(results) == 2 and results[0].image.shape == (SIZE, SIZE, 3)
            core = results[0].mask >= 1.0
            assert core.any() and np.array_equal(results[0].image[core], results[0].placed[core])
            assert not np.array_equal(results[0].raw, results[1].raw)
            assert np.isfinite(results[0].raw).all()


class FakeRedux:
    """A stand-in for :class:`~productbg.pipeline.flux_redux.ReduxEncoder`: 4 random style tokens per call (a new
    draw each time, as if each call saw another reference), scaled by the strength."""

    def __init__(self, width: int) -> None:
        self.width, self.calls = width, 0

    def to(self, device=None, dtype=None) -> "FakeRedux":
        return self

    def tokens(self, images: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        assert images.ndim == 4 and images.shape[-1] == 3
        self.calls += 1
        return torch.randn(1, 4, self.width, generator=torch.Generator().manual_seed(self.calls)) * strength


def test_redux_reference_tokens_are_confined_in_every_block():
    """The seam for Flux Redux: with a Redux encoder in the parts, a reference's tokens follow the T5 prompt and are
    kept off the product with the identifier: two references, block inputs held fixed, the product cells and the
    free stream are bit-identical in every block, the background is not."""
    parts = tiny_flux_parts("fill")
    width = int(parts.t5.get_input_embeddings().weight.shape[1])
    parts.identifiers = SeededIdentifiers(width, widths={"t5xxl": width})
    pipe = ProductBGPipeline.from_components(parts, redux=FakeRedux(width), device="cpu",
                                             settings=replace(ProductBGPipeline.tiny(family="flux").settings,
                                                              size=SIZE))
    prep = pipe.prepare(product_image())
    lf = 256 + 4
    blocks = []
    for replay in (None, "first"):
        b = Blocks(pipe.components.transformer, lf, blocks[0] if replay else None)
        try:
            pipe.generate(prep, "marble", reference=product_image(), seed=3, steps=1)
        finally:
            b.remove()
        blocks.append(b)
    mask = ProductMask(torch.as_tensor(prep.mask))
    cover = mask.coverage(flux_token_grid(SIZE, SIZE), torch.device("cpu"))[0]
    product, background = cover >= mask.threshold, cover == 0
    assert product.any() and background.any()
    for key in blocks[0].keys:
        (t0, i0), (t1, i1) = blocks[0].outputs[key], blocks[1].outputs[key]
        assert t0.shape[1] == lf + 256  # [prompt ; Redux tokens ; free stream without them]
        assert torch.equal(i0[0, product], i1[0, product]) and torch.equal(t0[:, lf:], t1[:, lf:]), key
        assert (i0[0, background] - i1[0, background]).abs().max() > 1e-6, key


def test_native_resolution_export_on_flux():
    """--export on Flux: the generation canvas keeps the export's aspect on 16-pixel sides (2x2 latent patches),
    and the delivered file is the export's size with the product composited at its own resolution."""
    pipe = ProductBGPipeline.tiny(family="flux")
    assert pipe.settings.canvas_multiple == 16
    result = pipe.generate(product_image(96), "marble", size=SIZE, steps=1, export=(150, 200))[0]
    w, h = replace(pipe.settings, size=SIZE, export=(150, 200)).canvas()
    assert (w % 16, h % 16) == (0, 0) and result.raw.shape[:2] == (h, w)
    assert result.export is not None and result.export.image.shape[:2] == (200, 150)


def test_fp8_transformer_stays_fp8_and_computes_as_its_dequantized_weights(files, tmp_path):
    """A transformer file whose linear weights are fp8 (as flux1-dev-fp8): they stay fp8 in memory, and the model
    computes exactly what the same model with those weights cast to float32 computes."""
    parts = tiny_flux_parts("dev")
    state = parts.transformer.state_dict()
    linears = {n + ".weight" for n, m in parts.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    fp8 = {k: (v.to(torch.float8_e4m3fn) if k in linears else v) for k, v in state.items()}
    path = tmp_path / "flux1-dev-fp8.safetensors"
    atomic_save({k: v.contiguous() for k, v in diffusers_to_bfl(fp8).items()}, path)
    loaded = load_flux(path, config_dir=files["configs"], t5=files["bundled"], clip_l=files["bundled"],
                       vae=files["bundled"])
    assert loaded.transformer.x_embedder.weight.dtype == torch.float8_e4m3fn
    reference = tiny_flux_transformer("dev")
    reference.load_state_dict({k: v.float() for k, v in fp8.items()})
    x, text = torch.randn(1, 6, 64), torch.randn(1, 5, 32)
    kw = dict(encoder_hidden_states=text, pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]),
              img_ids=torch.zeros(6, 3), txt_ids=torch.zeros(5, 3), guidance=torch.tensor([3.5]))
    with torch.no_grad():
        assert torch.equal(loaded.transformer(hidden_states=x, **kw).sample, reference(hidden_states=x, **kw).sample)


def test_scaled_fp8_t5_multiplies_each_weight_by_its_scale(files, tmp_path):
    """ComfyUI's "scaled fp8" T5 files (a ``scaled_fp8`` marker, a ``scale_weight`` per linear layer, ``scale_input``
    unused): each fp8 weight times its scale is the layer's weight."""
    parts = tiny_flux_parts("dev")
    state = {k: v for k, v in parts.t5.state_dict().items() if not k.startswith("encoder.embed_tokens")}
    linears = {n for n, m in parts.t5.named_modules() if isinstance(m, torch.nn.Linear)}
    scaled = {}
    for k, v in state.items():
        owner = k.removesuffix(".weight")
        if owner in linears:
            scale = v.abs().max() / 448
            scaled[k] = (v / scale).to(torch.float8_e4m3fn)
            scaled[owner + ".scale_weight"] = scale.reshape(())
            scaled[owner + ".scale_input"] = torch.ones(())
        else:
            scaled[k] = v.to(torch.float16) if k == "shared.weight" else v.to(torch.float8_e4m3fn)
    scaled["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    t5_path = tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"
    atomic_save({k: v.contiguous() for k, v in scaled.items()}, t5_path)
    loaded = load_flux(files["bundled"], t5=t5_path, config_dir=files["configs"]).t5
    q = loaded.encoder.block[0].layer[0].SelfAttention.q
    assert q.weight.dtype == torch.float8_e4m3fn and q.scale_weight is not None
    x = torch.randn(1, 3, 32)
    name = "encoder.block.0.layer.0.SelfAttention.q"
    expected = x @ (scaled[name + ".weight"].float() * scaled[name + ".scale_weight"]).T
    assert torch.equal(q(x), expected)
    with torch.no_grad():
        assert torch.isfinite(loaded(torch.tensor([[71, 1712, 1]])).last_hidden_state).all()
