"""Mask jitter of the trainers: batched on the mask's device, same values as one max-pool per sample."""
import torch
import torch.nn.functional as F

from productbg.training.diffusion import jitter_masks, max_filter


def reference_jitter(mask: torch.Tensor, generator: torch.Generator, jitter: tuple[float, float]) -> torch.Tensor:
    """The former implementation: one square max-pool per sample on the CPU."""
    def morph(m, radius):
        if radius == 0:
            return m
        k = 2 * abs(radius) + 1
        if radius > 0:
            return F.max_pool2d(m, k, stride=1, padding=abs(radius))
        return 1 - F.max_pool2d(1 - m, k, stride=1, padding=abs(radius))

    radii = torch.empty(mask.shape[0]).uniform_(jitter[0], jitter[1], generator=generator)
    return torch.cat([morph(m[None], r) for m, r in zip(mask, (radii * mask.shape[-1]).round().long().tolist())])


def _masks(n: int, side: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = (torch.rand(n, 1, side // 8, side // 8, generator=g) > 0.6).float()
    m = F.interpolate(m, size=(side, side), mode="nearest")
    m[0] = 0
    m[1, :, : side // 3, -side // 4:] = 1          # touches the border: padding must not count as product
    return m


def test_jitter_equals_the_per_sample_max_pool_for_fixed_seeds():
    """Exactly the old values (and the same generator state afterwards) for growth, shrinkage and mixed signs."""
    masks = _masks(8, 96)
    for jitter in [(-0.2, 0.15), (0.05, 0.3), (-0.3, -0.01), (0.0, 0.0)]:
        for seed in range(3):
            g_old, g_new = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            assert torch.equal(jitter_masks(masks, g_new, jitter), reference_jitter(masks, g_old, jitter))
            assert torch.equal(g_old.get_state(), g_new.get_state())


def test_soft_masks_and_non_square_images_match_too():
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(4, 1, 40, 64, generator=g)
    assert torch.equal(jitter_masks(masks, torch.Generator().manual_seed(5), (-0.2, 0.2)),
                       reference_jitter(masks, torch.Generator().manual_seed(5), (-0.2, 0.2)))


def test_max_filter_is_a_square_max_pool():
    x = torch.rand(2, 1, 33, 47)
    for r in (1, 4, 16, 30):
        assert torch.equal(max_filter(x, r), F.max_pool2d(x, 2 * r + 1, stride=1, padding=r))


def test_jitter_stays_on_the_masks_device():
    """Masks on another device than the generator (meta here): the result is computed there, not on the CPU."""
    out = jitter_masks(torch.zeros(3, 1, 64, 64, device="meta"), torch.Generator().manual_seed(0), (-0.1, 0.1))
    assert out.device.type == "meta" and out.shape == (3, 1, 64, 64)
