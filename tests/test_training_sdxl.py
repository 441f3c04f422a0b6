"""train-cg and train-pg on SDXL-shaped models (two text encoders of different widths, the pooled embedding and the
added time ids, inpainting): identifier vectors for both encoders, the pooled embedding from the identifier-free
prompt, time ids from each sample's size and crop, exact zero identifier gradient from product cells in every one
of SDXL's 70 cross-attention layers, the loss going down on a fixed batch, and what the runs write."""
import pytest
import torch

from productbg.attention import probe
from productbg.cli import main
from productbg.pipeline.components import tiny_components
from productbg.pipeline.tiny import TINY_XL_TIME_DIM, TINY_XL_WIDTHS
from productbg.training import bgsynth
from productbg.training.cg import CGConfig, CGTask
from productbg.training.models import from_pipeline
from productbg.training.state import step_generator
from productbg.weights.bank import load_bank

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_data")
    bgsynth.generate(root, bgsynth.SynthSpec(categories=3, per_category=2, held_out=0, size=32, seed=3,
                                             names=("运动鞋", "lamp", "mug")))
    return root


def _batch(task, n=2):
    return torch.utils.data.default_collate([task.dataset()[(i, i)] for i in range(n)])


def sdxl_topology_components():
    """SDXL's UNet topology in miniature: the same blocks and transformer depths (1/2/10 → 70 cross-attention
    layers: 4 + 20 down, 10 mid, 30 + 6 up), narrow channels, inpainting input, the tiny SDXL text encoders."""
    from diffusers import UNet2DConditionModel

    comps = tiny_components(inpaint=True, style=False, family="sdxl")
    torch.manual_seed(0)
    comps.unet = UNet2DConditionModel(
        sample_size=8, in_channels=9, out_channels=4, layers_per_block=2, block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(2, 4, 4), norm_num_groups=8,
        cross_attention_dim=sum(TINY_XL_WIDTHS), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=TINY_XL_TIME_DIM,
        projection_class_embeddings_input_dim=TINY_XL_WIDTHS[1] + 6 * TINY_XL_TIME_DIM).eval()
    return from_pipeline(comps, "sdxl-topology")


def test_both_encoders_get_trainable_identifiers_and_gradients(data):
    task = CGTask(CGConfig(data=data, model="tiny-sdxl-inpaint", resolution=32, vectors_per_id=2, lora_rank=2))
    module = task.build(torch.device("cpu"))
    out = module(_batch(task), step_generator(0, 0, 0, 0))
    out["loss"].backward()
    widths = [e.vectors.shape[-1] for e in module.text.embeddings]
    assert widths == list(TINY_XL_WIDTHS)
    for e in module.text.embeddings:  # the categories in the batch get a gradient in both encoders
        assert e.vectors.grad is not None and e.vectors.grad.abs().sum() > 0
    state = task.trainable_state(module)
    assert {"identifiers", "identifiers.clip_g"} <= set(state)
    groups = task.param_groups(module, 1e-4)
    assert {id(p) for p in groups[1]["params"]} == {id(e.vectors) for e in module.text.embeddings}


def test_pooled_embedding_is_the_identifier_free_prompts_and_time_ids_follow_the_sample(data):
    task = CGTask(CGConfig(data=data, model="tiny-sdxl-inpaint", resolution=32, vectors_per_id=2, lora_rank=2))
    module = task.build(torch.device("cpu"))
    batch = _batch(task)
    batch["original_size"] = torch.tensor([[300, 200], [48, 64]])
    batch["crop_top_left"] = torch.tensor([[10, 0], [0, 8]])
    seen = []
    module.unet.register_forward_pre_hook(lambda m, a, k: seen.append(k["added_cond_kwargs"]), with_kwargs=True)

    module(batch, step_generator(0, 0, 0, 0))
    with torch.no_grad():
        for e in module.text.embeddings:
            e.vectors.add_(torch.randn_like(e.vectors))  # other identifiers: the pooled input must not move
    module(batch, step_generator(0, 0, 0, 0))
    first, second = seen
    _, plain_pooled = module.plain_prompt()
    assert torch.equal(first["text_embeds"], plain_pooled.expand(2, -1))
    assert torch.equal(first["text_embeds"], second["text_embeds"])
    with torch.no_grad():  # encoded afresh with the moved identifiers (not the step's cached encoding): the same
        fresh = module.text.encode(list(module.plain_ids))[1]
    assert torch.equal(fresh, plain_pooled)
    assert first["time_ids"].tolist() == [[300, 200, 10, 0, 32, 32], [48, 64, 0, 8, 32, 32]]
    context_a, _ = module.encode_rows(torch.tensor([0]))
    assert not torch.equal(context_a, module.plain_prompt()[0])  # while the context does carry the identifier


def test_product_cells_give_the_identifiers_exactly_zero_gradient_in_all_70_layers(data):
    """Per layer, as the SD1.5 test does: the gradient of one layer's product-cell output with respect to both
    encoders' identifier vectors is exactly 0; its background cells' is not. Partial confinement moves it."""

    def grads(strength):
        # 128 px: 16×16 latents, 8×8 and 4×4 grids in the attention levels (product and background cells in each)
        task = CGTask(CGConfig(data=data, model="sdxl-topology", resolution=128, vectors_per_id=2, lora_rank=2,
                               strength=strength), components=sdxl_topology_components)
        module = task.build(torch.device("cpu"))
        with probe.record(keep_outputs=True) as rec:
            module(_batch(task), step_generator(0, 0, 0, 0))
        vectors = [e.vectors for e in module.text.embeddings]
        per_layer = []
        for o in rec.outputs:
            g_product = torch.autograd.grad(o.output[o.product].abs().sum(), vectors, retain_graph=True)
            g_background = torch.autograd.grad(o.output[~o.product].abs().sum(), vectors, retain_graph=True)
            per_layer.append((o.layer_index, g_product, g_background, int(o.product.sum())))
        return per_layer

    layers = grads(1.0)
    assert sorted(layer for layer, *_ in layers) == list(range(70))
    for layer, g_product, g_background, _ in layers:
        assert all(torch.count_nonzero(g) == 0 for g in g_product), layer
        assert sum(g.norm() for g in g_background) > 0, layer
    with_product = [layer for layer, *_, cells in layers if cells]
    assert len(with_product) == 70  # not vacuous: every layer has product cells
    half = grads(0.5)
    assert all(sum(g.norm() for g in g_product) > 0 for layer, g_product, _, cells in half if cells)


def test_loss_goes_down_on_a_fixed_batch(data):
    task = CGTask(CGConfig(data=data, model="tiny-sdxl-inpaint", resolution=32, vectors_per_id=2, lora_rank=4,
                           mask_jitter=(0.0, 0.0)))
    module = task.build(torch.device("cpu"))
    opt = torch.optim.AdamW(task.param_groups(module, 1e-2), lr=1e-2)
    batch = _batch(task, 3)
    losses = []
    for _ in range(8):
        loss = module(batch, step_generator(0, 0, 0, 0))["loss"]  # same noise and timesteps every step
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.9 * losses[0], losses


def test_train_cg_cli_writes_a_two_encoder_bank_and_a_kohya_lora(data, tmp_path):
    out = tmp_path / "run"
    assert main(["train-cg", "--data", str(data), "--model", "tiny-sdxl-inpaint", "--output", str(out),
                 "--resolution", "32", "--max-steps", "2", "--vectors-per-id", "2", "--lora-rank", "2",
                 "--checkpoint-every", "0", "--sample-every", "2", "--no-progress"]) == 0
    assert (out / "samples" / "step-000002.png").is_file()  # the preview samples the SDXL-shaped model too
    with load_bank(out / "category_bank.safetensors") as bank:
        assert bank.family == "tiny-sdxl" and bank.encoders == ("clip_l", "clip_g")
        assert bank.vectors("lamp", "clip_g").shape == (2, TINY_XL_WIDTHS[1])
        assert bank.training["family"] == "sdxl"
    from safetensors.torch import load_file

    lora = load_file(str(out / "unet_lora.safetensors"))
    assert lora and all(k.startswith("lora_unet_") for k in lora)


def test_train_pg_on_the_sdxl_shaped_model(data, tmp_path):
    from PIL import Image

    from productbg.pipeline.tiny import tiny_sdxl_unet
    from productbg.training.pg import target_for
    from productbg.weights.style_encoder import load_style_encoder

    out = tmp_path / "pg"
    common = ["--data", str(data), "--model", "tiny-sdxl-inpaint", "--resolution", "32", "--checkpoint-every", "0",
              "--lr", "1e-2", "--no-progress"]
    assert main(["train-pg", *common, "--output", str(out), "--max-steps", "2", "--sample-every", "2"]) == 0
    assert Image.open(out / "samples" / "step-000002.png").size == (3 * 32, 3 * 32)  # 3 categories; ref / target / generated
    target = target_for(tiny_sdxl_unet(9))
    encoder = load_style_encoder(out / "style_encoder.safetensors", target)
    assert encoder.config.context_dim == sum(TINY_XL_WIDTHS) and encoder.training_info["steps"] == 2
    again = tmp_path / "again"  # --init-from the written file continues from it
    assert main(["train-pg", *common, "--output", str(again), "--max-steps", "1",
                 "--init-from", str(out / "style_encoder.safetensors")]) == 0
    moved = load_style_encoder(again / "style_encoder.safetensors", target)
    assert moved.state_dict().keys() == encoder.state_dict().keys()
