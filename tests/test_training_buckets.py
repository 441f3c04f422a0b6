"""Aspect-ratio buckets: the bucket list, per-item size / crop / SDXL time ids, single-bucket resumable batches."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from productbg.training import bgsynth, layout
from productbg.training.datasets import (BG60kIndex, ImageMaskDataset, bucket_sizes, crop_geometry,
                                         nearest_bucket, open_bg60k)
from productbg.training.engine import BucketBatchSampler, StepSampler, _item_seed, dataset_buckets

#: SDXL's published bucket list at 1024² (height, width; the wide half and the square)
SDXL_WIDE = [(512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
             (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
             (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024)]


def _write(root, name, image: np.ndarray, mask: np.ndarray) -> None:
    """Replace one entry's image (uint8 [H, W, 3]) and mask (bool [H, W]) in a BG60k-layout folder."""
    Image.fromarray(image).save(layout.image_path(root, "bg60k", name))
    Image.fromarray(mask.astype(np.uint8) * 255).save(layout.mask_path(root, "bg60k", name))


def _reshape(root, name, width, height) -> None:
    """Stretch an entry to width x height (its mask with it)."""
    img = Image.open(layout.image_path(root, "bg60k", name)).convert("RGB").resize((width, height), Image.BICUBIC)
    mask = Image.open(layout.mask_path(root, "bg60k", name)).convert("L").resize((width, height), Image.NEAREST)
    _write(root, name, np.asarray(img), np.asarray(mask) > 127)


def _marked(height, width, box):
    """An image red inside ``box`` = (top, bottom, left, right) and blue elsewhere, and that box as its mask."""
    mask = np.zeros((height, width), bool)
    t, b, l, r = box
    mask[t:b, l:r] = True
    img = np.where(mask[..., None], np.array([230, 20, 20], np.uint8), np.array([20, 20, 230], np.uint8))
    return img.astype(np.uint8), mask


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """2 categories x 4 images at 64² (even entries "mug", odd "shoe"): 1.png and 2.png stretched 3:1 wide
    (192x64), and 0.png replaced by a 330x100 image with a known red product box at rows 20..60, columns 40..120;
    the other five stay square."""
    root = tmp_path_factory.mktemp("buckets")
    bgsynth.generate(root, bgsynth.SynthSpec(categories=2, per_category=4, held_out=1, size=64, seed=5,
                                             names=("mug", "shoe")))
    _write(root, "0.png", *_marked(100, 330, (20, 60, 40, 120)))
    for name in ("1.png", "2.png"):
        _reshape(root, name, 192, 64)
    return root


def _flip_seeds():
    flips = [s for s in range(50) if np.random.default_rng(s).random() < 0.5]
    keeps = [s for s in range(50) if np.random.default_rng(s).random() >= 0.5]
    return flips[0], keeps[0]


# ---------------------------------------------------------------------------------------------- bucket list
@pytest.mark.parametrize("resolution", [128, 512, 768, 1024])
def test_bucket_list_properties(resolution):
    """Sides are multiples of 64, area never above resolution² and close to it, the square is there, aspects run
    from exactly 1:4 to 4:1, every bucket has its transpose, and aspects are distinct and sorted wide to tall."""
    buckets = bucket_sizes(resolution)
    area = resolution ** 2
    assert all(h % 64 == 0 and w % 64 == 0 and h >= 64 and w >= 64 for h, w in buckets)
    assert all(h * w <= area for h, w in buckets)
    assert min(h * w for h, w in buckets) >= (0.75 if resolution < 512 else 0.8) * area
    assert (resolution, resolution) in buckets
    aspects = [h / w for h, w in buckets]
    assert aspects == sorted(aspects) and len(set(aspects)) == len(aspects)
    assert aspects[0] == 0.25 and aspects[-1] == 4.0
    assert {(w, h) for h, w in buckets} == set(buckets)


def test_bucket_list_at_1024_is_sdxls():
    """At 1024² every bucket is one of SDXL's published buckets, and the extreme and common ones are there."""
    buckets = bucket_sizes(1024)
    published = set(SDXL_WIDE) | {(w, h) for h, w in SDXL_WIDE}
    assert set(buckets) <= published
    assert {(512, 2048), (768, 1344), (832, 1216), (1024, 1024), (1344, 768), (2048, 512)} <= set(buckets)
    assert len(buckets) >= 30


@pytest.mark.parametrize("resolution", [32, 96, 0])
def test_buckets_need_a_multiple_of_64(resolution):
    with pytest.raises(ValueError, match="multiple of 64"):
        bucket_sizes(resolution)


def test_nearest_bucket():
    """Closest aspect in log space: 16:9 → 768x1344, square → square, beyond 1:4 → the 1:4 bucket, and a tall
    image gets the transpose of its wide twin's bucket."""
    buckets = bucket_sizes(1024)
    assert buckets[nearest_bucket(1080, 1920, buckets)] == (768, 1344)
    assert buckets[nearest_bucket(1000, 1000, buckets)] == (1024, 1024)
    assert buckets[nearest_bucket(100, 1000, buckets)] == (512, 2048)
    assert buckets[nearest_bucket(1000, 100, buckets)] == (2048, 512)
    rng = np.random.default_rng(0)
    for h, w in rng.integers(50, 5000, size=(200, 2)):
        h, w = int(h), int(w)
        k = nearest_bucket(h, w, buckets)
        dist = [abs(math.log(bh / bw) - math.log(h / w)) for bh, bw in buckets]
        assert dist[k] == min(dist)
        bh, bw = buckets[k]
        assert buckets[nearest_bucket(w, h, buckets)] == (bw, bh)


# ---------------------------------------------------------------------------------------------- geometry
def test_crop_geometry_known_values():
    """A 100x330 (HxW) image into 64x192: the 300-wide centre (left 15) is kept; resized to cover, the image is
    64x211 and the crop starts at column 10; mirrored it starts at 211 - 10 - 192 = 9. Tall images cut rows."""
    c = crop_geometry(100, 330, (64, 192))
    assert c.original == (100, 330) and c.box == (15, 0, 315, 100)
    assert c.resized == (64, 211) and c.top_left == (0, 10) and c.flipped_top_left() == (0, 9)
    t = crop_geometry(300, 100, (64, 192))   # a tall image into a wide bucket: rows 133..166 of 300
    assert t.box == (0, 133, 100, 166) and t.resized == (576, 192) and t.top_left == (255, 0)
    s = crop_geometry(64, 64, (128, 128))    # same aspect: nothing cut
    assert s.box == (0, 0, 64, 64) and s.resized == (128, 128) and s.top_left == (0, 0)


def _old_square(im, size, resample):
    """The square centre crop training used before buckets (kept here to prove bit-identity)."""
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return im.crop((left, top, left + side, top + side)).resize((size, size), resample)


def test_without_buckets_items_are_todays_square_crops(data):
    """No buckets: image and mask are bit-identical to the old square centre crop (flipped or not), on square and
    non-square sources; original_size / crop_top_left are filled in (100x330 at 32²: the square is columns
    115..215, the image resized to cover 32² is 32x106, the crop starts at column 37; mirrored 106 - 37 - 32 = 37)."""
    index = open_bg60k(data)
    ds = ImageMaskDataset(index, 32, flip=True)
    assert ds.buckets is None and ds.bucket_ids is None and dataset_buckets(ds) == (None, None)
    flip, keep = _flip_seeds()
    for i in range(len(ds)):
        rec = index.records[i]
        img = np.asarray(_old_square(Image.open(rec.image).convert("RGB"), 32, Image.BICUBIC))
        mask = (np.asarray(_old_square(Image.open(rec.mask).convert("L"), 32, Image.BILINEAR), dtype=np.float32)
                >= 127.5).astype(np.float32)
        for seed, flipped in ((keep, False), (flip, True)):
            item = ds[(i, seed)]
            want_img, want_mask = (img[:, ::-1], mask[:, ::-1]) if flipped else (img, mask)
            assert torch.equal(item["image"], torch.from_numpy(want_img.copy()).permute(2, 0, 1).float() / 127.5 - 1)
            assert torch.equal(item["mask"][0], torch.from_numpy(want_mask.copy()))
    first = [i for i, r in enumerate(index.records) if r.file == "0.png"][0]
    item, mirrored = ds[(first, keep)], ds[(first, flip)]
    assert item["original_size"].dtype == torch.int64 and item["original_size"].tolist() == [100, 330]
    assert item["crop_top_left"].tolist() == [0, 37] and mirrored["crop_top_left"].tolist() == [0, 37]


# ---------------------------------------------------------------------------------------------- bucketed items
def test_bucketed_items_take_their_buckets_size(data):
    """Every item is [3, H, W] / [1, H, W] at its bucket; square sources are the square bucket and equal the
    no-bucket item at the same resolution; the 3:1 ones are 64x192; original_size is the source's (h, w)."""
    index = open_bg60k(data)
    ds, plain = ImageMaskDataset(index, 128, flip=True, buckets=True), ImageMaskDataset(index, 128, flip=True)
    assert ds.buckets == bucket_sizes(128) and len(ds.bucket_ids) == len(ds)
    sizes = {}
    for i, rec in enumerate(index.records):
        item = ds[(i, 3)]
        h, w = ds.buckets[ds.bucket_ids[i]]
        assert ds.item_size(i) == (h, w)
        assert item["image"].shape == (3, h, w) and item["mask"].shape == (1, h, w)
        src = Image.open(rec.image)
        assert item["original_size"].tolist() == [src.height, src.width]
        sizes[rec.file] = (h, w)
        if src.width == src.height:
            other = plain[(i, 3)]
            assert all(torch.equal(item[k], other[k]) for k in ("image", "mask", "original_size", "crop_top_left"))
    assert sizes["1.png"] == sizes["2.png"] == sizes["0.png"] == (64, 192)
    assert sizes["3.png"] == (128, 128)
    assert ds.buckets.count((64, 192)) == 1 and len(set(ds.bucket_ids)) == 2


def test_masks_follow_images_through_resize_crop_and_flip(data):
    """The red product box of entry 0 (rows 20..60, columns 40..120 of 100x330) lands where the crop geometry
    says (rows 12.8..38.4, columns 16..67.2 of 64x192), the image is red exactly on the mask but for the
    resampled edge, and the flipped item is the mirror of the unflipped one with crop_top_left (0, 9)."""
    index = open_bg60k(data)
    ds = ImageMaskDataset(index, 128, flip=True, buckets=True)
    i = [k for k, r in enumerate(index.records) if r.file == "0.png"][0]
    flip, keep = _flip_seeds()
    item, mirrored = ds[(i, keep)], ds[(i, flip)]
    mask, red = item["mask"][0], item["image"][0] > item["image"][2]
    assert item["crop_top_left"].tolist() == [0, 10] and mirrored["crop_top_left"].tolist() == [0, 9]
    rows, cols = torch.nonzero(mask, as_tuple=True)
    assert abs(rows.float().mean().item() - (12.8 + 38.4) / 2 + 0.5) < 1.0
    assert abs(cols.float().mean().item() - (16 + 67.2) / 2 + 0.5) < 1.0
    assert abs(mask.sum().item() - 25.6 * 51.2) < 0.05 * 25.6 * 51.2
    assert (red == (mask > 0)).float().mean() > 0.98
    assert torch.equal(mirrored["mask"], item["mask"].flip(-1))
    assert torch.equal(mirrored["image"], item["image"].flip(-1))


def test_bucket_assignment_reads_headers_only(data, monkeypatch):
    """Records whose size the index does not know are assigned from a header read: no image is decoded."""
    from PIL import ImageFile

    index = open_bg60k(data)
    with_sizes = ImageMaskDataset(index, 128, buckets=True).bucket_ids
    bare = BG60kIndex(index.root, index.split, [type(r)(r.file, r.category, r.image, r.mask) for r in index.records],
                      index.categories)
    assert all(r.size is None for r in bare.records)

    def no_decode(self):
        raise AssertionError("an image was decoded to assign buckets")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    assert ImageMaskDataset(bare, 128, buckets=True).bucket_ids == with_sizes


def test_pair_dataset_exposes_its_base_buckets(data):
    """PG's pair dataset wraps an ImageMaskDataset: the engine finds the buckets through ``base``."""
    from productbg.training.pg import PairDataset

    base = ImageMaskDataset(open_bg60k(data), 128, flip=True, buckets=True)
    ids, sizes = dataset_buckets(PairDataset(base, (0.5, 1.0)))
    assert ids == base.bucket_ids and sizes == base.buckets


# ---------------------------------------------------------------------------------------------- sampler
def _ids():
    """37 items in 5 buckets of 13, 11, 8, 4 and 1 images (bucket ids need not be contiguous)."""
    ids = [0] * 13 + [3] * 11 + [7] * 8 + [9] * 4 + [12]
    return list(np.random.default_rng(1).permutation(ids))


def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_batches_never_mix_buckets_and_every_image_comes_once_per_epoch():
    """Over 12 epochs: one bucket per batch, at most batch_size items, each epoch holds every index exactly once
    (the 1-image bucket included: nothing is dropped), short batches only as the buckets' remainders."""
    ids, bs = _ids(), 4
    s = BucketBatchSampler(ids, bs, seed=11)
    assert s.per_epoch == 4 + 3 + 2 + 1 + 1 and s.short_per_epoch == 3  # 13 -> 4,4,4,1; 11 -> 4,4,3; 1 -> 1
    summary = s.summary()
    assert summary["images"] == {"0": 13, "3": 11, "7": 8, "9": 4, "12": 1} and summary["dropped"] == 0
    batches = _take(s, 12 * s.per_epoch)
    for e in range(12):
        epoch = batches[e * s.per_epoch:(e + 1) * s.per_epoch]
        assert sorted(i for b in epoch for i, _ in b) == list(range(len(ids)))
        assert sum(len(b) < bs for b in epoch) == 3
        for b in epoch:
            assert 1 <= len(b) <= bs and len({ids[i] for i, _ in b}) == 1
    orders = {tuple(i for b in batches[e * s.per_epoch:(e + 1) * s.per_epoch] for i, _ in b) for e in range(12)}
    assert len(orders) == 12   # reshuffled every epoch


def test_item_seeds_are_those_of_the_stream_position():
    """Flattened, the batches' item seeds are _item_seed(seed, p) for p = 0, 1, 2, ... (as StepSampler's)."""
    s = BucketBatchSampler(_ids(), 4, seed=5)
    flat = [seed for b in _take(s, 3 * s.per_epoch + 2) for _, seed in b]
    assert flat == [_item_seed(5, p) for p in range(len(flat))]


@pytest.mark.parametrize("world", [1, 3])
def test_the_order_is_a_function_of_seed_and_position(world):
    """A sampler started at batch k yields exactly the tail of one started at 0 (within and across epochs, on
    every rank); ranks interleave into the one-process stream; another seed gives another order."""
    ids = _ids()
    for rank in range(world):
        full = _take(BucketBatchSampler(ids, 4, seed=9, rank=rank, world=world), 40)
        for k in (1, 7, 11, 23, 39):
            assert _take(BucketBatchSampler(ids, 4, seed=9, start_batch=k, rank=rank, world=world), 40 - k) == full[k:]
    if world > 1:
        per_rank = [_take(BucketBatchSampler(ids, 4, seed=9, rank=r, world=world), 10) for r in range(world)]
        single = _take(BucketBatchSampler(ids, 4, seed=9), 10 * world)
        assert [per_rank[g % world][g // world] for g in range(10 * world)] == single
    assert _take(BucketBatchSampler(ids, 4, seed=9), 22) != _take(BucketBatchSampler(ids, 4, seed=10), 22)


def test_step_sampler_is_unchanged():
    """The no-bucket order is today's: item p = perm_(p div N)[p mod N] with seed SeedSequence([seed, p])."""
    n, bs = 7, 3
    got = [x for _, x in zip(range(30), StepSampler(n, bs, seed=4))]
    want = []
    for p in range(30):
        perm = np.random.default_rng([4, 0x5EED, p // n]).permutation(n)
        want.append((int(perm[p % n]), int(np.random.SeedSequence([4, p]).generate_state(1)[0])))
    assert got == want


# ---------------------------------------------------------------------------------------------- end to end
def test_cg_fit_with_buckets_on_two_aspect_ratios(data, tmp_path):
    """train-cg's task with buckets on the tiny inpainting model: 2 steps of single-bucket batches from a square
    and a 3:1 bucket, finite losses, the bucket summary recorded, and a preview from one bucket (both buckets hold
    both categories: the first one seen, 64x192, gives the two preview columns)."""
    from productbg.training.cg import CGConfig, CGTask
    from productbg.training.engine import EngineConfig, fit

    task = CGTask(CGConfig(data=data, resolution=128, vectors_per_id=2, lora_rank=4, buckets=True))
    assert task.fingerprint()["buckets"] is True
    out = tmp_path / "run"
    result = fit(task, EngineConfig(output_dir=out, max_steps=2, batch_size=2, lr=1e-3, seed=3, sample_every=2,
                                    progress=False, cpu=True))
    assert result.step == 2 and len(result.losses) == 2 and all(np.isfinite(result.losses))
    summary = json.loads((out / "train_config.json").read_text())["buckets"]
    assert summary["images"] == {"64x192": 3, "128x128": 5} and summary["dropped"] == 0
    assert summary["batches_per_epoch"] == 2 + 3 and summary["short_batches_per_epoch"] == 2
    assert Image.open(out / "samples" / "step-000002.png").size == (2 * 192, 2 * 64)


def test_sdxl_fit_with_buckets_feeds_each_samples_time_ids(data, tmp_path, monkeypatch):
    """train-cg on the tiny SDXL inpainting model with buckets, one epoch (5 batches of 8 images): every time-id
    row the UNet gets is (original h, w, crop top, left, target h, w) of one of the dataset's samples, its target
    is the batch's image size, and the 100x330 image arrives with its real size and crop (0, 10) or mirrored
    (0, 9) in a 64x192 batch."""
    from productbg.training.cg import CGConfig, CGTask
    from productbg.training.diffusion import DiffusionModule
    from productbg.training.engine import EngineConfig, fit

    seen = []
    original = DiffusionModule.added_conditions

    def recording(self, batch, pooled):
        out = original(self, batch, pooled)
        seen.append((tuple(batch["image"].shape[-2:]), out["time_ids"].long().tolist()))
        return out

    monkeypatch.setattr(DiffusionModule, "added_conditions", recording)
    task = CGTask(CGConfig(data=data, model="tiny-sdxl-inpaint", resolution=128, vectors_per_id=2, lora_rank=4,
                           buckets=True))
    ds = task.dataset()
    possible = set()
    for i in range(len(ds)):
        for seed in _flip_seeds():
            item = ds[(i, seed)]
            possible.add((*item["original_size"].tolist(), *item["crop_top_left"].tolist(), *ds.item_size(i)))
    result = fit(task, EngineConfig(output_dir=tmp_path / "run", max_steps=5, batch_size=2, lr=1e-3, seed=3,
                                    progress=False, cpu=True))
    assert all(np.isfinite(result.losses)) and len(result.losses) == 5
    rows = [tuple(r) for _, rs in seen for r in rs]
    assert len(rows) == 8 and set(rows) <= possible
    assert all(tuple(r[4:]) == hw for hw, rs in seen for r in rs)
    assert {(100, 330, 0, 10, 64, 192), (100, 330, 0, 9, 64, 192)} & set(rows)
    assert {hw for hw, _ in seen} == {(64, 192), (128, 128)}
