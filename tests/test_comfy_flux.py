"""Flux.1 in a real ComfyUI 0.3.75 with full-size random files (tests/flux_checkpoint.py): a Flux transformer of
the full hidden width with 1 double + 1 single block (dev and Fill), the full-size T5-XXL in fp8 with CLIP-L
(DualCLIPLoader, type flux — ComfyUI's own tokenizers and embedding path), the Flux VAE.

* every productbg node that takes a MODEL or CLIP detects Flux;
* Category Prompt splices a ``flux`` bank's T5 vectors: a bank holding T5's own input embeddings of "marble
  table" encodes exactly like those words; the pooled CLIP-L vector is the identifier-free prompt's;
* through the real sampler (Flux Fill, InpaintModelConditioning, CFG rows batched), every block's product cells
  and identifier-free stream are bit-identical for two categories, with the block's inputs held fixed, and
  background cells differ; without Mask-Guided Attention the product cells differ;
* what cannot be confined is refused in one line (column confinement, Kontext reference latents).

Runs in a pytest process of its own (scripts/test.sh), never beside the SDXL models.
"""
from __future__ import annotations

import pytest
import torch

from dit_replay import BlockReplay, dit_keys

pytestmark = pytest.mark.comfyui

SIZE = 256  # pixels: a 32×32 latent, 16×16 image tokens


@pytest.fixture(scope="module")
def loaded(comfy, comfy_flux_files):
    nodes = comfy.nodes
    files = comfy_flux_files
    (fill,) = nodes.UNETLoader().load_unet(files["fill"], "default")
    (clip,) = nodes.DualCLIPLoader().load_clip(files["clip_l"], files["t5xxl"], "flux")
    # ComfyUI's own T5 option node, min_length 0: the prompt's tokens without 256-token padding (the CPU encodes
    # a full-size T5-XXL in seconds instead of minutes; the tokenizer and embedding path are unchanged)
    (clip,) = comfy.node_class_mappings["T5TokenizerOptions"].execute(clip, 0, 0)
    (vae,) = nodes.VAELoader().load_vae(files["vae"])
    (redux,) = nodes.StyleModelLoader().load_style_model(files["redux"])
    (siglip,) = nodes.CLIPVisionLoader().load_clip(files["siglip"])
    return {"fill": fill, "clip": clip, "vae": vae, "redux": redux, "siglip": siglip, "files": files}


@pytest.fixture(scope="module")
def bank(comfy, loaded):
    """A flux bank: 'marble' holds T5's own input embeddings of "marble table" (as the loaded model holds them:
    ComfyUI keeps an fp8 T5's embedding table in fp8), 'velvet' random vectors of the same size."""
    t5 = loaded["clip"].cond_stage_model.t5xxl.transformer
    ids = [t[0] for t in loaded["clip"].tokenize("marble table")["t5xxl"][0][:-1]]  # without T5's end token
    words = t5.get_input_embeddings()(torch.tensor([ids]), out_dtype=torch.float32)[0]
    bank = comfy.pack_module("weights.bank").CategoryBank("flux", vectors_per_id=len(ids))
    bank.add("marble", {"t5xxl": words.clone()})
    bank.add("velvet", {"t5xxl": torch.randn(len(ids), 4096, generator=torch.Generator().manual_seed(0)) * words.std()})
    return bank


def test_every_node_detects_flux_from_the_model_and_the_clip(comfy, loaded):
    common = comfy.pack_module("nodes.common")
    assert common.backbone_of(loaded["fill"]).family == "flux"
    assert common.backbone_of_clip(loaded["clip"].tokenize("a")).family == "flux"
    config = loaded["fill"].model.model_config
    assert type(config).__name__ == "FluxInpaint" and config.unet_config["hidden_size"] == 3072


def test_category_prompt_splices_t5_vectors_and_pools_the_identifier_free_prompt(comfy, loaded, prompts):
    nodes, classes = comfy.nodes, comfy.node_class_mappings
    clip = loaded["clip"]
    conditioning, identifier = prompts["marble"]
    words = nodes.CLIPTextEncode().encode(clip, "a product photo on a marble table background, studio light")[0]
    context = conditioning[0][0]
    assert context.shape == words[0][0].shape and context.shape[-1] == 4096
    assert torch.equal(context, words[0][0])  # the vectors encode exactly as the words they are the embeddings of
    assert not torch.equal(prompts["velvet"][0][0][0], context)
    # the identifier-free prompt: the words removed, T5's pad at the end (the same length), CLIP-L without them
    padded = classes["T5TokenizerOptions"].execute(clip, 0, context.shape[1])[0]
    free = nodes.CLIPTextEncode().encode(padded, "a product photo on a  background, studio light")[0]
    assert torch.equal(identifier.plain_context, free[0][0])
    assert torch.equal(conditioning[0][1]["pooled_output"], free[0][1]["pooled_output"])
    assert not torch.equal(conditioning[0][1]["pooled_output"], words[0][1]["pooled_output"])
    assert identifier.context_length == context.shape[1] and len(identifier.token_indices) == 2


def _sample(comfy, loaded, positive, identifier, mask, replay, confine=True, reference=None):
    nodes, classes = comfy.nodes, comfy.node_class_mappings
    clip, vae = loaded["clip"], loaded["vae"]
    model = loaded["fill"]
    if confine:
        model = classes["ProductBGMaskGuidedAttention"].execute(model, identifier, mask, 1.0, 0.0, 1.0,
                                                                "context")[0]
    if reference is not None:
        model, positive = classes["ProductBGReferenceStyleRedux"].execute(
            model, positive, loaded["redux"], loaded["siglip"], reference, mask, 1.0, 0.0, 1.0)
    # the negative has the prompt's length, so ComfyUI batches it with the positive (CFG rows in one call) when
    # the positive carries no Redux tokens
    negative = nodes.ConditioningZeroOut().zero_out(positive)[0]
    pixels = torch.full((1, SIZE, SIZE, 3), 0.5)
    positive, negative, latent = nodes.InpaintModelConditioning().encode(positive, negative, pixels, vae,
                                                                         1.0 - mask, True)
    model = replay.install(model, dit_keys(1, 1))
    nodes.KSampler().sample(model, 7, 1, 2.0, "euler", "simple", positive, negative, latent, 1.0)


def _background(comfy, mask) -> torch.Tensor:
    """[N] each image token's background weight (0 = product cell) on the 16×16 token grid, as the plan reads it."""
    guided = comfy.pack_module("attention.guided")
    return guided.ProductMask(mask).background((SIZE // 16, SIZE // 16), torch.device("cpu"))[0]


def _mask():
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, 64:192, 80:176] = 1.0
    return mask


@pytest.fixture(scope="module")
def prompts(comfy, loaded, bank):
    cat = comfy.node_class_mappings["ProductBGCategoryPrompt"]
    return {name: cat.execute(loaded["clip"], bank, name, "", "studio light") for name in ("marble", "velvet")}


def test_product_cells_are_bit_identical_in_every_block_through_the_real_sampler(comfy, loaded, prompts):
    mask = _mask()
    L = prompts["marble"][1].context_length
    first = BlockReplay(L, L)
    _sample(comfy, loaded, *prompts["marble"], mask, first)
    second = BlockReplay(L, L, replay=first)
    _sample(comfy, loaded, *prompts["velvet"], mask, second)
    weights = _background(comfy, mask)
    product, background = weights == 0, weights == 1
    assert product.any() and background.any()
    assert first.layout == second.layout and len(first.layout) == 2  # CFG rows batched in one call
    p = first.positive
    for key in first.outputs:
        a, b = first.image(key), second.image(key)
        assert torch.equal(a[p, product], b[p, product]), key
        assert torch.equal(first.free(key)[p], second.free(key)[p]), key
        assert not torch.equal(a[p, background], b[p, background]), key
        for n in first.negatives:
            assert torch.equal(a[n], b[n]), key  # the negative row


def test_without_mask_guided_attention_the_category_reaches_the_product(comfy, loaded, prompts):
    """The measure moves: the same replay unconfined."""
    mask = _mask()
    L = prompts["marble"][1].context_length
    first = BlockReplay(L, 0)
    _sample(comfy, loaded, *prompts["marble"], mask, first, confine=False)
    second = BlockReplay(L, 0, replay=first)
    _sample(comfy, loaded, *prompts["velvet"], mask, second, confine=False)
    product = _background(comfy, mask) == 0
    p = first.positive
    for key in first.outputs:
        assert not torch.equal(first.image(key)[p, product], second.image(key)[p, product]), key


def _reference(seed: int) -> torch.Tensor:
    return torch.rand(1, 96, 96, 3, generator=torch.Generator().manual_seed(seed))


def test_redux_tokens_and_the_category_are_kept_off_the_product_in_every_block(comfy, loaded, prompts):
    """Category Prompt + Mask-Guided Attention + Reference Style Redux: two references, bit-identical product cells
    and free stream; the free stream is the identifier-free prompt alone (no Redux tokens)."""
    mask = _mask()
    L = prompts["marble"][1].context_length
    R = 729  # SigLIP-384: 27×27 patches, one Redux token each
    first = BlockReplay(L + R, L)
    _sample(comfy, loaded, *prompts["marble"], mask, first, reference=_reference(1))
    second = BlockReplay(L + R, L, replay=first)
    _sample(comfy, loaded, *prompts["marble"], mask, second, reference=_reference(2))
    assert first.inputs["double_block", 0]["txt"].shape[1] == 2 * L + R
    weights = _background(comfy, mask)
    product, background = weights == 0, weights == 1
    p = first.positive
    for key in first.outputs:
        a, b = first.image(key), second.image(key)
        assert torch.equal(a[p, product], b[p, product]), key
        assert torch.equal(first.free(key)[p], second.free(key)[p]), key
        assert not torch.equal(a[p, background], b[p, background]), key


def test_what_flux_cannot_confine_is_refused_by_name(comfy, loaded, prompts):
    classes = comfy.node_class_mappings
    common = comfy.pack_module("nodes.common")
    _, identifier = prompts["marble"]
    with pytest.raises(common.NodeInputError, match="confinement must be 'context'.*bidirectional"):
        classes["ProductBGMaskGuidedAttention"].execute(loaded["fill"], identifier, _mask(), 1.0, 0.0, 1.0,
                                                        "columns")
    redux = classes["ProductBGReferenceStyleRedux"]
    model, positive = redux.execute(loaded["fill"], prompts["marble"][0], loaded["redux"], loaded["siglip"],
                                    _reference(1), _mask(), 1.0, 0.0, 1.0)
    with pytest.raises(common.NodeInputError, match="already has a Reference Style Redux"):
        redux.execute(model, positive, loaded["redux"], loaded["siglip"], _reference(1), _mask(), 1.0, 0.0, 1.0)
    with pytest.raises(common.NodeInputError, match="the product mask is empty"):
        redux.execute(loaded["fill"], positive, loaded["redux"], loaded["siglip"], _reference(1),
                      torch.zeros(1, 64, 64), 1.0, 0.0, 1.0)



def _flux_loras(folder) -> dict[str, int]:
    """Two small random Flux LoRAs in models/loras: kohya layout and diffusers (peft) layout; name -> modules."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)

    def pair(down_shape, up_shape):
        return torch.randn(down_shape, generator=g) * 0.01, torch.randn(up_shape, generator=g) * 0.01

    kohya = {}
    for name, (n_in, n_out) in {"double_blocks_0_img_attn_proj": (3072, 3072),
                                "single_blocks_0_linear2": (15360, 3072)}.items():
        down, up = pair((4, n_in), (n_out, 4))
        kohya.update({f"lora_unet_{name}.lora_down.weight": down, f"lora_unet_{name}.lora_up.weight": up,
                      f"lora_unet_{name}.alpha": torch.tensor(4.0)})
    diffusers = {}
    for name, (n_in, n_out) in {"transformer_blocks.0.attn.to_out.0": (3072, 3072),
                                "single_transformer_blocks.0.proj_out": (15360, 3072)}.items():
        a, b = pair((4, n_in), (n_out, 4))
        diffusers.update({f"transformer.{name}.lora_A.weight": a, f"transformer.{name}.lora_B.weight": b})
    save_file(kohya, str(folder / "flux_kohya.safetensors"))
    save_file(diffusers, str(folder / "flux_diffusers.safetensors"))
    return {"flux_kohya.safetensors": 2, "flux_diffusers.safetensors": 2}


def test_category_lora_applies_flux_loras_in_kohya_and_diffusers_layouts(comfy, loaded, bank, tmp_path):
    classes = comfy.node_class_mappings
    comfy.folder_paths.add_model_folder_path("loras", str(tmp_path))
    loras = _flux_loras(tmp_path)
    lora_mod = comfy.pack_module("weights.bank")
    bank.set_lora("marble", lora_mod.CategoryLora("flux_kohya.safetensors", 0.5))
    node = classes["ProductBGCategoryLora"]
    for name, modules in loras.items():
        model, _ = node.execute(loaded["fill"], loaded["clip"], bank, "velvet", name, 1.0, 1.0)
        patched = {k for k in model.patches if k.startswith("diffusion_model.")}
        assert len(patched) == modules, (name, sorted(patched))
        assert patched & {"diffusion_model.double_blocks.0.img_attn.proj.weight",
                          "diffusion_model.single_blocks.0.linear2.weight"}
    model, _ = node.execute(loaded["fill"], loaded["clip"], bank, "marble", "(from bank)", 1.0, 1.0)
    (key,) = [k for k in model.patches if k.endswith("double_blocks.0.img_attn.proj.weight")]
    assert model.patches[key][0][0] == 0.5  # the bank's strength for this category
    unchanged, _ = node.execute(loaded["fill"], loaded["clip"], bank, "velvet", "(from bank)", 1.0, 1.0)
    assert unchanged is loaded["fill"]  # no LoRA of its own: the shared model
    bank.set_lora("marble", None)
