"""The nodes on ComfyUI's V3 schema in a real ComfyUI (issue 24 part 1): registered through ``comfy_entrypoint``,
listed by /object_info as before, and workflows saved by the pre-V3 (V1) nodes load and run unchanged.

The pre-V3 workflows are ``tests/fixtures/pre_v3_workflows`` (copies taken before the move; together they hold all
14 node types). Here they run through the API in-process; tests/test_comfy_workflows.py checks their UI files
against /object_info and tests/test_comfy_browser.py loads and queues them in the real frontend.
"""
import asyncio
import json
import shutil
from pathlib import Path

import pytest

from comfy_graphs import sized_workflow

pytestmark = pytest.mark.comfyui

REPO = Path(__file__).resolve().parent.parent
PRE_V3 = Path(__file__).resolve().parent / "fixtures" / "pre_v3_workflows"
NAMES = ("category_style_lora", "zero_shot_confinement", "batch_folder")
SIZE, STEPS, EXPORT = 96, 2, 128


def test_every_node_is_registered_through_comfy_entrypoint_as_v3(comfy):
    """The pack has no NODE_CLASS_MAPPINGS (ComfyUI would take its V1 path); ComfyUI registered every node id of
    productbg.nodes.NODE_IDS from the extension comfy_entrypoint returns, each an io.ComfyNode with its display
    name, a productbg category, a description and a tooltip on every input and output."""
    from comfy_api.latest import ComfyExtension, io

    from productbg.nodes import NODE_IDS

    assert not hasattr(comfy.pack, "NODE_CLASS_MAPPINGS") and callable(comfy.pack.comfy_entrypoint)
    extension = comfy.pack.comfy_entrypoint()
    assert isinstance(extension, ComfyExtension)
    listed = asyncio.run(extension.get_node_list())
    assert [node.GET_SCHEMA().node_id for node in listed] == list(NODE_IDS)
    for node_id, display_name in NODE_IDS.items():
        cls = comfy.node_class_mappings[node_id]
        assert cls in listed and issubclass(cls, io.ComfyNode), node_id
        assert comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id] == display_name
        schema = cls.GET_SCHEMA()
        assert schema.category.startswith("productbg/") and schema.description, node_id
        missing = [i.id for i in schema.inputs if not i.tooltip] + [o.display_name for o in schema.outputs
                                                                     if not o.tooltip]
        assert not missing, f"{node_id}: no tooltip on {missing}"


def test_object_info_lists_the_v3_nodes_with_the_v1_types_and_names(comfy_server):
    """/object_info of a real server: our nodes come from the pack, our custom types keep their V1 names (saved
    links stay valid), output names are the V1 ones, and combos carry their options."""
    from productbg.nodes import NODE_IDS

    info = comfy_server.object_info()
    mine = {k: v for k, v in info.items() if v.get("python_module") == comfy_server.python_module}
    assert set(mine) == set(NODE_IDS)
    assert mine["ProductBGLoadCategoryBank"]["output"] == ["PRODUCTBG_BANK"]
    assert mine["ProductBGPlaceProduct"]["output"] == ["IMAGE", "MASK", "MASK", "PRODUCTBG_PLACEMENT"]
    assert mine["ProductBGPlaceProduct"]["output_name"] == ["image", "product_mask", "inpaint_mask", "placement"]
    assert mine["ProductBGCategoryPrompt"]["output"] == ["CONDITIONING", "PRODUCTBG_IDENTIFIER"]
    assert mine["ProductBGMaskGuidedAttention"]["input"]["required"]["identifier"][0] == "PRODUCTBG_IDENTIFIER"
    assert mine["ProductBGReferenceStyle"]["input"]["required"]["style_encoder"][0] == "PRODUCTBG_STYLE"
    assert mine["ProductBGExportProduct"]["input"]["required"]["placement"][0] == "PRODUCTBG_PLACEMENT"
    canvas = mine["ProductBGPlaceProduct"]["input"]["required"]["canvas"]
    assert canvas[0] == "COMBO" and "4:5" in canvas[1]["options"] and canvas[1]["default"] == "1:1"
    assert mine["ProductBGLoadProductsFromFolder"]["input"]["required"]["index"][1]["control_after_generate"]
    assert mine["ProductBGExportProduct"]["output_node"] and mine["ProductBGPreservationReport"]["output_node"]


def test_the_pre_v3_fixtures_hold_every_node_type():
    types = {n["class_type"] for name in NAMES
             for n in json.loads((PRE_V3 / "api" / f"{name}.json").read_text(encoding="utf-8")).values()}
    from productbg.nodes import NODE_IDS

    after_v3 = {"ProductBGReferenceStyleRedux"}  # born on V3 (Flux): no V1-saved file can hold it
    assert set(NODE_IDS) - after_v3 <= types and not after_v3 & types


@pytest.fixture(scope="module")
def inputs(comfy, comfy_model_files, tmp_path_factory):
    """The workflows' input images in ComfyUI's input folder; a products folder for the batch workflow."""
    for png in (REPO / "workflows" / "inputs").glob("*.png"):
        shutil.copy(png, Path(comfy.input_dir) / png.name)
    products = tmp_path_factory.mktemp("pre_v3_products")
    (products / "shoes").mkdir()
    shutil.copy(REPO / "workflows" / "inputs" / "productbg_example_product.png", products / "shoes" / "a.png")
    return products


@pytest.mark.parametrize("name", NAMES)
def test_a_workflow_saved_by_the_v1_nodes_runs_unchanged(comfy, inputs, name):
    """The API copy saved before the move runs on the V3 nodes: only the model files, canvas, steps and export
    size are the test's (as for the shipped workflows); every other input is as the V1 nodes saved it."""
    prompt = json.loads((PRE_V3 / "api" / f"{name}.json").read_text(encoding="utf-8"))
    outputs = comfy.run(sized_workflow(comfy, prompt, inputs, SIZE, STEPS, export_size=EXPORT))
    by_class = {node["class_type"]: outputs.get(key, {}) for key, node in prompt.items()}
    saved = comfy.saved_images(outputs)                       # Save Image's canvas and the export
    assert len(saved) == 2 and all(p.stat().st_size > 0 for p in saved)
    report = json.loads(by_class["ProductBGPreservationReport"]["text"][0])
    assert report["images"] and report["images"][0]["checks"]["delta_e2000_mean"]["pass"]
    export = json.loads(by_class["ProductBGExportProduct"]["text"][0])["images"][0]
    assert export["metrics"]["size"] == [EXPORT, EXPORT]


def _place_graph(prefix: str = "pbg_v3", **place_inputs) -> dict:
    from comfy_graphs import product_box_mask

    g = product_box_mask(64, 16, 48)
    g["image"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}}
    g["place"] = {"class_type": "ProductBGPlaceProduct", "inputs": {
        "image": ["image", 0], "mask": ["mask", 0], "canvas": "1:1", "width": 64, "height": 64, "fill_ratio": 0.74,
        "anchor": "center", "margin": 0.05, "fill_color": "#FFFFFF", "inpaint_grow": 20, **place_inputs}}
    g["save"] = {"class_type": "SaveImage", "inputs": {"images": ["place", 0], "filename_prefix": prefix}}
    return g


@pytest.mark.parametrize("inputs, message", [
    ({"canvas": "5:7"}, "canvas '5:7' is not one of: custom, 1:1"),
    ({"anchor": "middle"}, "anchor 'middle' is not one of: center"),
])
def test_a_combo_value_outside_its_options_is_refused_before_running(comfy, inputs, message):
    """ComfyUI 0.3.6x-0.3.7x do not check a V3 combo's value against its options; validate_inputs does, so a
    misspelt value stops the prompt at validation with one line naming the choices (as V1's list types did)."""
    with pytest.raises(AssertionError, match=message):
        comfy.run(_place_graph(**inputs))
    (png,) = comfy.saved_images(comfy.run(_place_graph(prefix=f"pbg_v3_{len(message)}")))   # the valid one runs
    assert png.stat().st_size > 0


def test_min_and_max_are_still_checked_by_comfyui(comfy):
    """Inputs a node's validate_inputs does not take keep ComfyUI's own min / max checks."""
    with pytest.raises(AssertionError, match="fill_ratio.*|smaller than min"):
        comfy.run(_place_graph(fill_ratio=0.01))
