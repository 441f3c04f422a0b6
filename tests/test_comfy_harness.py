"""The real-ComfyUI harness itself: checkpoints, in-process execution, main.py import check, HTTP server."""
import subprocess
import sys

import pytest
from PIL import Image

import comfy_harness

comfyui = pytest.mark.comfyui


def test_import_productbg_does_not_import_comfyui():
    """`import productbg` works without ComfyUI and pulls in none of its flat modules."""
    code = ("import sys, productbg\n"
            "bad = sorted(m for m in ('comfy', 'nodes', 'folder_paths', 'execution', 'server') if m in sys.modules)\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-P", "-c", code], check=True, env=comfy_harness.child_env())


@comfyui
def test_random_checkpoints_detected_by_comfyui_loader(comfy):
    """ComfyUI's own checkpoint loader sees SD1.5, and SD1.5-inpainting (9 input channels) for the second file."""
    # `import comfy.sd` here would rebind the name `comfy` (the fixture) to ComfyUI's package: use from-imports.
    import torch
    from comfy.sd import load_checkpoint_guess_config
    from comfy.supported_models import SD15

    for name, inpaint in ((comfy.ckpt_sd15, False), (comfy.ckpt_inpaint, True)):
        path = comfy.folder_paths.get_full_path_or_raise("checkpoints", name)
        model, *_ = load_checkpoint_guess_config(path, output_vae=False, output_clip=False,
                                                 model_options={"dtype": torch.float16})  # fp16: no 3 GB cast
        config = model.model.model_config
        assert type(config) is SD15, (name, type(config))
        assert config.unet_config["in_channels"] == (9 if inpaint else 4)
        assert config.inpaint_model() is inpaint
        del model


@comfyui
def test_pack_loaded_in_process_as_its_own_copy(comfy):
    """The pack loads from its folder (any name) under a path-derived module name, separate from `productbg`."""
    import productbg.nodes

    assert comfy.pack.__file__.endswith("__init__.py")
    assert comfy.pack_module("nodes") is not productbg.nodes
    assert comfy.pack_module("nodes").__file__ == productbg.nodes.__file__
    for node in comfy.pack_module("nodes.extension").NODES:   # registered through comfy_entrypoint (V3)
        assert comfy.node_class_mappings[node.GET_SCHEMA().node_id] is node


@comfyui
def test_txt2img_graph_runs_in_process(comfy):
    """A core-only SD1.5 graph at 64 px, 2 steps, runs and saves a 64×64 PNG."""
    outputs = comfy.run(comfy_harness.txt2img_prompt(comfy.ckpt_sd15))
    (png,) = comfy.saved_images(outputs)
    with Image.open(png) as im:
        assert (im.format, im.size) == ("PNG", (64, 64))


@comfyui
def test_run_reports_node_errors(comfy):
    """A prompt ComfyUI rejects raises AssertionError naming the node and ComfyUI's message."""
    prompt = comfy_harness.txt2img_prompt("no_such_checkpoint.safetensors")
    with pytest.raises(AssertionError, match=r"node 1 \(CheckpointLoaderSimple\).*not in list"):
        comfy.run(prompt)


@comfyui
def test_pack_imports_in_comfyui_main(comfyui_dir, tmp_path):
    """`main.py --quick-test-for-ci` imports the pack from a folder whose name is no Python identifier."""
    rc, log, pack_path = comfy_harness.quick_test_for_ci(comfyui_dir, comfy_harness.REPO_ROOT, tmp_path)
    assert rc == 0, log[-4000:]
    lines = [line for line in log.splitlines() if line.rstrip().endswith(pack_path)]
    assert lines, f"{pack_path} not in ComfyUI's custom node import list:\n{log[-4000:]}"
    assert not any("IMPORT FAILED" in line for line in lines), log[-8000:]


@comfyui
def test_http_server_object_info(comfy_server, comfy_checkpoints):
    """The server answers /object_info with the core nodes, our checkpoints, and the pack's nodes (if any)."""
    info = comfy_server.object_info()
    ckpts = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert {comfy_checkpoints["sd15"], comfy_checkpoints["inpaint"]} <= set(ckpts)
    mine = {k for k, v in info.items() if v.get("python_module") == comfy_server.python_module}
    assert "IMPORT FAILED" not in "\n".join(l for l in comfy_server.log_tail(400).splitlines() if "productbg" in l)
    from productbg.nodes import NODE_IDS

    assert mine == set(NODE_IDS)


def test_comfyui_tests_are_moved_last_and_marked():
    """Marked items, and items using a ComfyUI fixture, go to the end in their order; the latter get the mark."""

    class Item:
        def __init__(self, name, marked=False, fixtures=()):
            self.name, self.fixturenames, self.marks = name, list(fixtures), ["comfyui"] if marked else []

        def get_closest_marker(self, name):
            return name if name in self.marks else None

        def add_marker(self, mark):
            self.marks.append(mark.name)

    items = [Item("a", marked=True), Item("b"), Item("c", fixtures=["tmp_path", "comfy"]), Item("d")]
    comfy_harness.move_comfyui_tests_last(items, "comfyui", ("comfy",))
    assert [i.name for i in items] == ["b", "d", "a", "c"]
    assert items[-1].marks == ["comfyui"]


@pytest.mark.parametrize("version, ok", [("0.3.64", True), ("0.3.75", True), ("0.3.52", False), ("0.3.7", False)])
def test_comfyui_dir_accepts_the_supported_releases(tmp_path, version, ok):
    """COMFYUI_DIR may be a 0.3.75 tree (what CI installs) or a 0.3.64 one (the oldest supported); nothing else."""
    (tmp_path / "main.py").write_text("")
    (tmp_path / "comfyui_version.py").write_text(f'__version__ = "{version}"\n')
    problem = comfy_harness.comfyui_dir_problem(str(tmp_path))
    assert (problem is None) is ok, problem
