"""The Personality-Wise null reference is the same in training (dropped references) and at inference (uncond)."""
import pytest
import torch

from productbg.pipeline.components import ClipVision
from productbg.training import bgsynth
from productbg.training.pg import PGConfig, PGTask, clip_pixels
from productbg.training.state import step_generator
from productbg.weights.style_encoder import NULL_REFERENCE_RGB, null_reference, reference_tokens


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("nulldata")
    bgsynth.generate(root, bgsynth.SynthSpec(categories=1, per_category=2, held_out=0, size=32, seed=1,
                                             names=("香水",)))
    return root


@pytest.mark.parametrize("variant", ["linear", "plus"])
def test_training_drops_to_the_inference_uncond_tokens(data, variant):
    """A dropped training reference gives exactly the tokens Reference Style / the pipeline use as uncond."""
    task = PGTask(PGConfig(data=data, resolution=32, variant=variant, resampler=(32, 1, 2, 16)))
    module = task.build(torch.device("cpu")).eval()
    batch = torch.utils.data.default_collate([task.dataset()[(i, i)] for i in range(2)])
    with torch.no_grad():
        dropped = module.style_tokens(batch["reference"], step_generator(0, 0, 0, 0), drop=1.0)
        kept = module.style_tokens(batch["reference"], step_generator(0, 0, 0, 0), drop=0.0)
        image = (batch["reference"][:1].permute(0, 2, 3, 1) + 1) / 2                 # IMAGE layout, 0..1
        cond, uncond = reference_tokens(module.encoder, ClipVision(module.vision), image)
    torch.testing.assert_close(uncond[0], dropped[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dropped[0], dropped[1])
    assert not torch.allclose(kept[0], dropped[0], atol=1e-3)                          # dropping changes tokens
    torch.testing.assert_close(cond[0], kept[0], atol=1e-3, rtol=1e-3)                   # same model, same image


def test_plus_null_reference_is_zeroed_normalised_clip_pixels():
    """IP-Adapter Plus's empty image (zero normalised CLIP pixels) within 8-bit rounding, never a black image."""
    pixels = clip_pixels(null_reference(torch.zeros(1, 8, 8, 3)).permute(0, 3, 1, 2) * 2 - 1, 8)
    assert pixels.abs().max() < 0.5 / 255 / 0.26
    assert all(round(c * 255) == c * 255 for c in NULL_REFERENCE_RGB)


@pytest.mark.comfyui
def test_comfyui_preprocessing_of_the_null_reference_matches_the_trainer(comfy):
    """ComfyUI's CLIP preprocessing (resize, 8-bit rounding) gives the trainer's pixels for the null reference."""
    from comfy.clip_vision import clip_preprocess

    image = null_reference(torch.zeros(1, 96, 80, 3))
    ours = clip_pixels(image.permute(0, 3, 1, 2) * 2 - 1, 224)
    torch.testing.assert_close(clip_preprocess(image, 224), ours, atol=1e-6, rtol=0)
