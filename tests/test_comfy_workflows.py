"""The shipped workflows in a real ComfyUI: API copies execute end to end; UI files match /object_info."""
import json
import shutil
from pathlib import Path

import pytest

from comfy_graphs import sized_workflow

pytestmark = pytest.mark.comfyui

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
#: UI files saved by the V1 nodes before the move to V3 (never regenerated): they must keep matching the schema.
PRE_V3 = Path(__file__).resolve().parent / "fixtures" / "pre_v3_workflows"
NAMES = ("category_background", "reference_style", "category_style_lora", "zero_shot_confinement", "batch_folder")
# The SDXL twins run end to end on SDXL in test_comfy_sdxl.py; here their files and UI format are checked.
SDXL_NAMES = ("category_background_sdxl", "reference_style_sdxl", "zero_shot_confinement_sdxl")
#: run end to end by test_comfy_flux_workflows.py (own process); checked here against the real object_info
FLUX_NAMES = ("category_background_flux", "reference_style_flux")
SIZE, STEPS, EXPORT = 96, 2, 320
FILE_INPUTS = {"ckpt_name", "bank_name", "encoder_name", "clip_name", "image", "lora_name", "unet_name",
               "clip_name1", "clip_name2", "vae_name", "style_model_name"}


def _small(comfy, prompt: dict, products: Path) -> dict:
    """The shipped graph with the test's model files, a small canvas and few steps (nothing else changed)."""
    return sized_workflow(comfy, prompt, products, SIZE, STEPS, export_size=EXPORT)


@pytest.fixture(scope="module")
def inputs(comfy, comfy_model_files, tmp_path_factory):
    for png in (WORKFLOWS / "inputs").glob("*.png"):
        shutil.copy(png, Path(comfy.input_dir) / png.name)
    products = tmp_path_factory.mktemp("products")
    (products / "shoes").mkdir()
    shutil.copy(WORKFLOWS / "inputs" / "productbg_example_product.png", products / "shoes" / "a.png")
    return products


@pytest.fixture(scope="module")
def white_inputs(comfy, inputs, tmp_path_factory):
    """A plain white-background packshot (RGB, no alpha, soft shadow) in place of the example product."""
    from PIL import Image

    from productbg.imaging.synthetic import packshot

    shot = (packshot(160, product_rgb=(0.15, 0.35, 0.8), shadow_depth=0.3).image * 255).round().astype("uint8")
    Image.fromarray(shot[..., :3]).save(Path(comfy.input_dir) / "productbg_white_packshot.png")
    products = tmp_path_factory.mktemp("white_products")
    (products / "shoes").mkdir()
    Image.fromarray(shot[..., :3]).save(products / "shoes" / "white.png")
    return products


def _white(prompt: dict) -> dict:
    for node in prompt.values():
        if node["class_type"] == "LoadImage" and node["inputs"]["image"] == "productbg_example_product.png":
            node["inputs"]["image"] = "productbg_white_packshot.png"
    return prompt


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_runs_on_a_white_packshot(comfy, white_inputs, name):
    """A plain white-background packshot (no alpha) runs through every shipped workflow and is saved; the report
    measures or says why it could not — it never stops the graph."""
    prompt = _white(json.loads((WORKFLOWS / "api" / f"{name}.json").read_text(encoding="utf-8")))
    outputs = comfy.run(_small(comfy, prompt, white_inputs))
    by_class = {node["class_type"]: outputs.get(key, {}) for key, node in prompt.items()}
    saved = comfy.saved_images(outputs)                     # Save Image's canvas and the marketplace export
    assert len(saved) == 2 and all(p.stat().st_size > 0 for p in saved)
    report = json.loads(by_class["ProductBGPreservationReport"]["text"][0])
    assert report["images"] and json.loads(by_class["ProductBGExportProduct"]["text"][0])["images"]


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_runs_end_to_end(comfy, inputs, name):
    prompt = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text(encoding="utf-8"))
    outputs = comfy.run(_small(comfy, prompt, inputs))
    by_class = {node["class_type"]: outputs.get(key, {}) for key, node in prompt.items()}
    (image,) = comfy.saved_images({"save": by_class["SaveImage"]})
    assert image.stat().st_size > 0
    (export,) = comfy.saved_images({"export": by_class["ProductBGExportProduct"]})
    from PIL import Image

    with Image.open(export) as im:                          # the deliverable: export size, JPEG, sRGB profile
        assert im.size == (EXPORT, EXPORT) and im.format == "JPEG" and "icc_profile" in im.info
    export_report = json.loads(by_class["ProductBGExportProduct"]["text"][0])["images"][0]
    assert export_report["metrics"]["size"] == [EXPORT, EXPORT] and export_report["checks"]["delta_e2000_mean"]["pass"]
    reports = [json.loads(by_class["ProductBGPreservationReport"]["text"][0])]
    (report,) = reports[0]["images"]
    metrics, checks = report["metrics"], report["checks"]
    assert checks["delta_e2000_mean"]["pass"], metrics  # the product is pasted back untouched
    assert {"psnr_before_paste_back_db", "expansion"} <= metrics.keys()


def test_every_workflow_has_a_ui_file_a_thumbnail_and_an_api_copy():
    shipped = {p.stem for p in WORKFLOWS.glob("*.json")}
    assert shipped == set(NAMES + SDXL_NAMES + FLUX_NAMES)  # a new workflow is added to the checks here
    for name in NAMES + SDXL_NAMES + FLUX_NAMES:
        assert (WORKFLOWS / f"{name}.json").is_file() and (WORKFLOWS / f"{name}.jpg").is_file()
        assert (WORKFLOWS / "api" / f"{name}.json").is_file()


def _widget_inputs(info: dict) -> list[tuple[str, object]]:
    """(name, type) of the inputs that are widgets, in the order the frontend stores their values; a combo's type
    is its list of options (V1 nodes give the list as the type, V3 nodes "COMBO" and the list in ``options``)."""
    out = []
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            kind = spec[0]
            if kind == "COMBO" and len(spec) > 1 and "options" in spec[1]:
                kind = spec[1]["options"]
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                out.append((name, kind))
                if name in ("seed", "noise_seed") or (len(spec) > 1 and spec[1].get("control_after_generate")):
                    out.append(("control_after_generate", ["fixed", "increment", "decrement", "randomize"]))
    return out


def _check_value(node_type: str, name: str, kind, value) -> None:
    where = f"{node_type}.{name} = {value!r}"
    if isinstance(kind, list) or kind == "COMBO":
        assert isinstance(value, str), where
        if name not in FILE_INPUTS and isinstance(kind, list):
            assert value in kind, where
    elif kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), where
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), where
    else:
        assert isinstance(value, str), where


@pytest.mark.parametrize("path", [WORKFLOWS / f"{n}.json" for n in NAMES + SDXL_NAMES + FLUX_NAMES] +
                         sorted(PRE_V3.glob("*.json")),
                         ids=lambda p: p.stem if p.parent == WORKFLOWS else f"pre_v3-{p.stem}")
def test_ui_workflow_matches_the_real_object_info(comfy_server, path):
    """Node types exist, widget values match the schema in count and type (a combo's value is one of its options),
    and every link type-checks: for the shipped files and for those the V1 nodes saved."""
    info = comfy_server.object_info()
    workflow = json.loads(path.read_text(encoding="utf-8"))
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for node in nodes.values():
        assert node["type"] in info, f"unknown node type {node['type']}"
        schema = info[node["type"]]
        widgets = _widget_inputs(schema)  # linked widget inputs keep their (unused) value in the file
        values = node.get("widgets_values") or []
        if node["type"] == "LoadImage":  # its upload button stores a pseudo-value "image" last
            assert values[-1] == "image"
            values = values[:-1]
        assert len(values) == len(widgets), (node["type"], values, widgets)
        for (wname, kind), value in zip(widgets, values):
            _check_value(node["type"], wname, kind, value)
    for link_id, src, src_slot, dst, dst_slot, link_type in workflow["links"]:
        out_type = info[nodes[src]["type"]]["output"][src_slot]
        dst_input = nodes[dst]["inputs"][dst_slot]
        schema = info[nodes[dst]["type"]]["input"]
        spec = {**schema.get("required", {}), **schema.get("optional", {})}[dst_input["name"]]
        expected = "COMBO" if isinstance(spec[0], list) else spec[0]
        assert link_type == out_type, (link_id, link_type, out_type)
        assert out_type == expected or (expected == "COMBO" and out_type == "STRING") or expected == "*", \
            (link_id, nodes[src]["type"], out_type, nodes[dst]["type"], dst_input["name"], expected)
