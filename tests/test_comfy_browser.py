"""The category list in a real browser (issue 25): headless Debian chromium + npm's playwright-core (installed by
scripts/setup_browser.sh, nothing downloaded from elsewhere) on the real ComfyUI 0.3.75 frontend and server.

The shipped ``category_style_lora`` workflow is loaded, the Category node's list is opened by clicking its widget
on the canvas, filtered by a Chinese and a Latin substring, a category picked, and the workflow queued as the Run
button does; the executed prompt must carry that category to every node that needs it (Category LoRA and Category
Prompt both take the Category node's output), and the run must succeed. A 5,000-category bank opens with only the
visible rows in the page.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import comfy_harness

pytestmark = pytest.mark.comfyui

REPO = comfy_harness.REPO_ROOT
WORKFLOW = REPO / "workflows" / "category_style_lora.json"
SMALL = "browser_bank.safetensors"
BIG = "browser_bank_5000.safetensors"
NAMES = ["运动鞋", "女士凉鞋", "Coffee Mug", "Leather Bag", "shoes"]
CATEGORY_NODES = ("ProductBGCategory", "ProductBGCategoryPrompt", "ProductBGCategoryLora")


def _tools() -> tuple[str, str]:
    """(chromium, NODE_PATH with playwright-core), or skip (fail under CI) naming what is missing."""
    chromium = os.environ.get("PRODUCTBG_CHROMIUM", "/usr/bin/chromium")
    node_path = os.environ.get("PRODUCTBG_NODE_PATH", "")
    missing = [what for what, ok in (
        (f"chromium ({chromium}; apt-get install chromium)", os.access(chromium, os.X_OK)),
        ("node (Node.js)", shutil.which("node") is not None),
        (f"playwright-core in NODE_PATH={node_path!r} (bash scripts/setup_browser.sh)",
         bool(node_path) and (Path(node_path) / "playwright-core" / "package.json").is_file()),
    ) if not ok]
    if missing:
        message = "the browser test needs " + "; ".join(missing)
        if comfy_harness.in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return chromium, node_path


@pytest.fixture(scope="module")
def browser_server(comfyui_dir, comfy_checkpoints, comfy_model_files, tmp_path_factory):
    """A ComfyUI server with the test model files, a small bank (Chinese and Latin names, a preview, a LoRA) and
    a 5,000-category bank."""
    sys.path.insert(0, str(REPO / "bench"))
    from bank_scale import build
    import torch

    from comfy_model_files import LORA_FILE
    from productbg.weights.bank import CategoryLora
    from productbg.weights.bank_previews import write_preview
    from weight_samples import example_bank

    root = tmp_path_factory.mktemp("browser")
    banks = root / "banks"
    banks.mkdir()
    bank = example_bank(NAMES, vectors_per_id=2, seed=5)
    bank.set_lora(NAMES[0], None)
    bank.set_lora("Coffee Mug", CategoryLora(LORA_FILE, 1.0))
    bank.save(banks / SMALL)
    write_preview(banks / SMALL, "运动鞋", torch.linspace(0, 1, 48 * 48 * 3).reshape(48, 48, 3))
    big_names = build(banks / BIG, 5000, 1, torch.float16)
    models = Path(comfy_model_files)
    server = comfy_harness.ComfyServer(comfyui_dir, REPO, root / "server", model_paths={
        "productbg_banks": str(banks), "productbg_style_encoders": str(models / "productbg_style_encoders"),
        "clip_vision": str(models / "clip_vision"), "loras": str(models / "loras")})
    for png in (REPO / "workflows" / "inputs").glob("*.png"):
        (root / "server" / "input").mkdir(parents=True, exist_ok=True)
        shutil.copy(png, root / "server" / "input" / png.name)
    server.start()
    yield server, big_names, comfy_checkpoints, root
    server.stop()


def _widgets(checkpoints: dict) -> list:
    """The shipped workflow's widgets set to the test's files and a small, quick run (as comfy_graphs.sized_workflow
    does for API graphs); everything else as shipped."""
    from comfy_model_files import STYLE_FILE, VISION_FILE

    return [["CheckpointLoaderSimple", "ckpt_name", checkpoints["inpaint"]],
            ["ProductBGLoadCategoryBank", "bank_name", SMALL],
            ["ProductBGLoadStyleEncoder", "encoder_name", STYLE_FILE],
            ["CLIPVisionLoader", "clip_name", VISION_FILE],
            ["ProductBGPlaceProduct", "width", 96], ["ProductBGPlaceProduct", "height", 96],
            ["KSampler", "steps", 2],
            ["ProductBGExportProduct", "size", "custom"], ["ProductBGExportProduct", "width", 128],
            ["ProductBGExportProduct", "height", 128]]


def _category_of(prompt: dict, node_id: str) -> str:
    """The category a node of the executed prompt used: its own value, or the Category node's it is linked to."""
    value = prompt[node_id]["inputs"]["category"]
    if isinstance(value, list):
        source = prompt[value[0]]
        assert source["class_type"] == "ProductBGCategory", source
        return source["inputs"]["category"]
    return value


def test_pick_a_category_in_the_browser_and_run(browser_server, tmp_path):
    chromium, node_path = _tools()
    server, big_names, checkpoints, root = browser_server
    plan = {"url": server.url, "chromium": chromium, "workflow": str(WORKFLOW), "widgets": _widgets(checkpoints),
            "big_bank": BIG, "small_bank": SMALL, "big_query": "鞋", "chinese_query": "鞋", "chinese_pick": "女士凉鞋",
            "latin_query": "MUG", "latin_pick": "Coffee Mug", "screenshot": str(tmp_path / "list.png")}
    (tmp_path / "plan.json").write_text(json.dumps(plan, ensure_ascii=False), encoding="utf-8")
    proc = subprocess.run(["node", str(REPO / "tests" / "browser_category_list.js"), str(tmp_path / "plan.json")],
                          env=dict(os.environ, NODE_PATH=node_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stderr[-4000:]}\n{server.log_tail()}"
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    print("browser:", json.dumps({k: v for k, v in seen.items() if k != "loaded"}, ensure_ascii=False))
    assert not seen["errors"], seen["errors"]

    # The 5,000-category bank: all listed, filtered as typed, only the rows in view in the page.
    big = seen["big"]
    with_query = sum("鞋" in n for n in big_names)
    assert big["title"] == BIG and big["count"] == "5000 categories" and big["closed"]
    assert big["filtered"] == f"{with_query} of 5000 categories" and with_query > 100
    assert 0 < big["rows_in_page"] <= 30 and 0 < big["filtered_rows_in_page"] <= 30

    # The workflow's bank: Chinese and Latin filters, a preview thumbnail, the picks.
    assert seen["small_count"] == "5 categories" and seen["chinese_rows"] == ["运动鞋", "女士凉鞋"]
    assert seen["preview_loaded"] and seen["after_chinese"] == "女士凉鞋"
    assert seen["latin_rows"] == ["Coffee Mug"] and seen["saved"] == "Coffee Mug"   # the plain name is saved

    # The executed prompt used the picked category in every node that needs one, and ran.
    assert seen["queue_status"] == 200
    entry = server.wait(seen["prompt_id"], timeout=900)
    assert entry["status"]["status_str"] == "success", comfy_harness.format_status_messages(entry["status"]["messages"])
    prompt = entry["prompt"][2]
    users = [k for k, n in prompt.items() if n["class_type"] in CATEGORY_NODES]
    assert sorted(prompt[k]["class_type"] for k in users) == sorted(CATEGORY_NODES)
    assert {_category_of(prompt, k) for k in users} == {"Coffee Mug"}
    assert any(o.get("images") for o in entry["outputs"].values())


def test_a_name_the_bank_lacks_says_did_you_mean(browser_server):
    """The same workflow through the API with a misspelt category stops at the Category node with "did you mean"."""
    from comfy_graphs import sized_workflow

    server, _, checkpoints, root = browser_server

    class Files:  # what sized_workflow reads from the in-process harness
        ckpt_inpaint = checkpoints["inpaint"]

    prompt = sized_workflow(Files, json.loads((REPO / "workflows" / "api" / "category_style_lora.json").read_text()),
                            root, 96, 2, export_size=128)
    for node in prompt.values():
        if node["class_type"] == "ProductBGLoadCategoryBank":
            node["inputs"]["bank_name"] = SMALL
        if node["class_type"] == "ProductBGCategory":
            node["inputs"]["category"] = "cofee mug"
    entry = server.wait(server.queue(prompt), timeout=600)
    assert entry["status"]["status_str"] == "error"
    message = comfy_harness.format_status_messages(entry["status"]["messages"])
    assert "ProductBGCategory" in message and "did you mean 'Coffee Mug'" in message


PRE_V3 = REPO / "tests" / "fixtures" / "pre_v3_workflows"


def test_workflows_saved_by_the_v1_nodes_load_and_run_in_the_frontend(browser_server, tmp_path):
    """The UI files saved before the move to V3 (all 14 node types), dropped on the real frontend: every node type
    is known, no widget value changes on load, and each queues as the Run button does and runs to its images."""
    chromium, node_path = _tools()
    server, _, checkpoints, root = browser_server
    products = root / "pre_v3_products" / "shoes"
    products.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "workflows" / "inputs" / "productbg_example_product.png", products / "a.png")
    workflows = sorted(PRE_V3.glob("*.json"))
    plan = {"url": server.url, "chromium": chromium, "workflows": [str(p) for p in workflows],
            "widgets": _widgets(checkpoints) + [["ProductBGLoadProductsFromFolder", "folder", str(products.parent)]]}
    (tmp_path / "plan.json").write_text(json.dumps(plan, ensure_ascii=False), encoding="utf-8")
    proc = subprocess.run(["node", str(REPO / "tests" / "browser_load_workflows.js"), str(tmp_path / "plan.json")],
                          env=dict(os.environ, NODE_PATH=node_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stderr[-4000:]}\n{server.log_tail()}"
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    print("browser:", json.dumps([{k: w[k] for k in ("unknown", "changed", "queue_status")} | {
        "file": Path(w["path"]).name, "nodes": len(w["types"])} for w in seen["workflows"]]))
    assert not seen["errors"], seen["errors"]
    assert [w["path"] for w in seen["workflows"]] == [str(p) for p in workflows]
    types = set()
    for w in seen["workflows"]:
        name = Path(w["path"]).name
        assert not w["unknown"], (name, w["unknown"])
        assert not w["changed"], (name, w["changed"])              # the frontend migrated nothing
        assert w["queue_status"] == 200, (name, w["queue_error"])
        entry = server.wait(w["prompt_id"], timeout=900)
        assert entry["status"]["status_str"] == "success", \
            (name, comfy_harness.format_status_messages(entry["status"]["messages"]))
        assert any(o.get("images") for o in entry["outputs"].values()), name
        types |= {n["class_type"] for n in entry["prompt"][2].values()}
    from productbg.nodes import NODE_IDS

    after_v3 = {"ProductBGReferenceStyleRedux"}  # nodes born on V3 (Flux): no V1-saved file can hold them
    assert set(NODE_IDS) - after_v3 <= types                        # every older node ran from a V1-saved file
