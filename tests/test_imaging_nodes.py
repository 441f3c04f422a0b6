"""The image nodes' V3 ``execute`` called directly (ComfyUI's comfy_api importable, no ComfyUI running): batched
shapes, resized masks, clear errors, UI text."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_api.latest import io
from productbg.imaging.synthetic import packshot
from productbg.nodes.common import NodeInputError
from productbg.nodes.extension import NODES
from productbg.nodes.imaging_nodes import (CompositeProduct, LoadProductsFromFolder, PlaceProduct,
                                           PreservationReport, SegmentProduct)

SEGMENT_DEFAULTS = dict(method="auto", tolerance=10.0, shadow_strength=0.75, threshold=0.5, grow=0,
                        fill_holes=True, keep_largest=False, feather=1.0, clean_edges=True)
PLACE_DEFAULTS = dict(canvas="1:1", width=128, height=128, fill_ratio=0.74, anchor="center", margin=0.05,
                      fill_color="#FFFFFF", inpaint_grow=20)


def shot_batch(n: int = 1, size: int = 64) -> torch.Tensor:
    return torch.stack([torch.from_numpy(packshot(size, seed=i).image) for i in range(n)])


def test_registered_with_tooltips_descriptions_and_category():
    """Every image node is a V3 node of the extension under a ProductBG id, in productbg/image; every input has a
    tooltip."""
    ids = {"ProductBGSegmentProduct", "ProductBGPlaceProduct", "ProductBGCompositeProduct",
           "ProductBGPreservationReport", "ProductBGLoadProductsFromFolder"}
    by_id = {node.define_schema().node_id: node for node in NODES}
    assert ids <= set(by_id)
    for node_id in ids:
        cls = by_id[node_id]
        schema = cls.define_schema()
        assert issubclass(cls, io.ComfyNode) and cls.CATEGORY == schema.category == "productbg/image"
        assert cls.DESCRIPTION
        for i in schema.inputs:
            assert i.tooltip, f"{node_id}.{i.id} has no tooltip"


def test_segment_place_composite_report_chain():
    """Shapes through the chain; the composite's core is the placed image; the report shows JSON."""
    images = shot_batch(2)
    seg_images, masks = SegmentProduct.execute(images, **SEGMENT_DEFAULTS)
    assert seg_images.shape == (2, 64, 64, 3) and masks.shape == (2, 64, 64)
    placed, product_mask, inpaint, _ = PlaceProduct.execute(seg_images, masks, **{**PLACE_DEFAULTS, "canvas": "4:5"})
    assert placed.shape == (2, 144, 112, 3) and product_mask.shape == inpaint.shape == (2, 144, 112)  # 4:5 at 128²
    generated = torch.rand(2, 144, 112, 3)
    (out,) = CompositeProduct.execute(generated, placed, product_mask, 2.0)
    core = product_mask >= 0.999
    assert torch.equal(out[core], placed[core])
    result = PreservationReport.execute(placed, product_mask, out, 2.0, 20.0, 0.05, generated_image=generated)
    text, passed = result.result
    assert result.ui["text"] == [text]
    summary = json.loads(text)
    assert len(summary["images"]) == 2 and summary["pass"] is passed is False    # random "generation": PSNR low


def test_one_placed_product_many_generations():
    """A batch of generated images shares one placed image and mask (batch 1 broadcasts)."""
    placed, product_mask, _, _ = PlaceProduct.execute(shot_batch(1), SegmentProduct.execute(
        shot_batch(1), **SEGMENT_DEFAULTS)[1], **PLACE_DEFAULTS)
    (out,) = CompositeProduct.execute(torch.rand(3, 128, 128, 3), placed, product_mask, 0.0)
    assert out.shape == (3, 128, 128, 3)
    assert all(torch.equal(o[product_mask[0] >= 0.999], placed[0][product_mask[0] >= 0.999]) for o in out)


def test_mask_of_another_size_is_resized():
    """A 32×32 mask on a 64×64 image is resized, not rejected."""
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:24, 10:22] = 1
    placed, product_mask, _, _ = PlaceProduct.execute(shot_batch(1), mask, **PLACE_DEFAULTS)
    assert product_mask.shape == (1, 128, 128) and (product_mask >= 0.5).any()


@pytest.mark.parametrize("mask, message", [
    (torch.zeros(1, 64, 64), "empty"),
    (torch.ones(1, 64, 64), "whole image"),
    (torch.ones(3, 64, 64), "3 masks but there are 2 images"),
])
def test_bad_masks_are_clear_errors(mask, message):
    with pytest.raises(NodeInputError, match=message):
        PlaceProduct.execute(shot_batch(2), mask, **PLACE_DEFAULTS)


def test_composite_batch_mismatch_and_bad_colour():
    placed = torch.rand(2, 32, 32, 3)
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:20, 8:20] = 1
    with pytest.raises(NodeInputError, match="batch sizes do not match"):
        CompositeProduct.execute(torch.rand(3, 32, 32, 3), placed, mask, 2.0)
    with pytest.raises(NodeInputError, match="#RRGGBB"):
        PlaceProduct.execute(placed, mask, **{**PLACE_DEFAULTS, "fill_color": "white"})


def test_segment_reports_when_nothing_is_found():
    """A blank image has no product: the error suggests what to try."""
    with pytest.raises(NodeInputError, match="empty.*grabcut"):
        SegmentProduct.execute(torch.ones(1, 32, 32, 3), **SEGMENT_DEFAULTS)


def test_segment_uses_loadimage_transparency():
    """LoadImage's MASK (1 = transparent) is the alpha; an all-zero 64×64 one (photo) falls back to keying."""
    images = shot_batch(1)
    transparency = torch.ones(1, 64, 64)
    transparency[:, 20:40, 20:40] = 0
    _, mask = SegmentProduct.execute(images, **{**SEGMENT_DEFAULTS, "feather": 0.0}, transparency=transparency)
    assert torch.equal(mask, 1 - transparency)
    _, keyed = SegmentProduct.execute(images, **SEGMENT_DEFAULTS, transparency=torch.zeros(1, 64, 64))
    assert (keyed >= 0.5).sum() > 500


def test_load_products_from_folder_index_and_past_the_end(tmp_path):
    """One product per index with its category and file name; past the end is an error naming the count."""
    shoes = tmp_path / "shoes"
    shoes.mkdir()
    Image.fromarray((packshot(48).image * 255).astype(np.uint8)).save(shoes / "a.png")
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[10:30, 10:30] = 255
    Image.fromarray(rgba, "RGBA").save(shoes / "b.png")
    node = LoadProductsFromFolder
    image, mask, category, name, count = node.execute(str(tmp_path), 0, "")
    assert image.shape == (1, 48, 48, 3) and mask.shape == (1, 48, 48) and (mask >= 0.5).sum() > 300
    assert (category, name, count) == ("shoes", "a.png", 2)
    _, mask_b, _, name_b, _ = node.execute(str(tmp_path), 1, "")
    assert name_b == "b.png" and mask_b.sum() == 400
    with pytest.raises(NodeInputError, match=r"index 2 is past the last product.*2 products"):
        node.execute(str(tmp_path), 2, "")
    assert isinstance(LoadProductsFromFolder.fingerprint_inputs(str(tmp_path), 0, ""), str)
    assert LoadProductsFromFolder.fingerprint_inputs(str(tmp_path / "missing"), 0, "") != \
        LoadProductsFromFolder.fingerprint_inputs(str(tmp_path / "missing"), 0, "")      # NaN: always re-run
    with pytest.raises(NodeInputError, match="not found"):
        node.execute(str(tmp_path / "missing"), 0, "")
