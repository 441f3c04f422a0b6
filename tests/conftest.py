"""Shared pytest fixtures. Keep this file short: put logic in helper modules beside it (comfy_harness.py, ...).

Real-ComfyUI fixtures (all session-scoped, built lazily; tests using them are marked ``comfyui`` and run last):
- ``comfyui_dir``       the ComfyUI 0.3.75 tree from $COMFYUI_DIR (fails under CI=true when missing, else skips)
- ``comfy_checkpoints`` {"sd15", "inpaint"}: CheckpointLoaderSimple names of random full-size SD1.5 checkpoints
- ``comfy``             ComfyUI in this process with this pack loaded: ``comfy.run(api_prompt) -> outputs``
- ``comfy_server``      ComfyUI's HTTP server (main.py) with this pack in custom_nodes/productbg
- ``comfy_sdxl_checkpoints`` {"sdxl", "inpaint"}: random full-size SDXL / SDXL-inpainting checkpoints (modules
  named test_comfy_sdxl* use them and run after all other ComfyUI tests)
- ``comfy_flux_files``  random full-size Flux.1 files (dev / fill / schnell transformers with 1 double + 1 single
  block, fp8 T5-XXL, CLIP-L, VAE, Redux, SigLIP) in the ComfyUI models folders: ``files["dev"]`` is a loader name
  (see tests/flux_checkpoint.py); modules named test_comfy_flux* use them, each in a pytest process of its own
- ``clone_semantics``   runs a test under both ``ModelPatcher.clone()`` semantics (see comfy_harness)
"""
import os
import socket
import sys

import pytest

sys.path.append(os.path.dirname(os.path.abspath(__file__)))   # helper modules; appended, so they shadow nothing
import comfy_harness  # noqa: E402

# The node classes subclass ComfyUI's V3 types (comfy_api), so tests that call a node's ``execute`` directly need
# ComfyUI's tree importable. Appended, so its flat modules (nodes, utils, server...) shadow nothing installed;
# importing comfy_api loads no model code (comfy.model_management stays unimported until the `comfy` fixture).
# Without COMFYUI_DIR (the plain pip venv) the node modules do not import (tests/test_dependencies.py).
if not comfy_harness.comfyui_dir_problem(os.environ.get("COMFYUI_DIR")):
    sys.path.append(os.path.realpath(os.environ["COMFYUI_DIR"]))

COMFY_FIXTURES = ("comfyui_dir", "comfy_checkpoints", "comfy", "comfy_server", "comfy_sdxl_checkpoints",
                  "comfy_flux_files")


def pytest_collection_modifyitems(config, items):
    # ComfyUI's flat top-level modules (nodes, utils, server, ...) pollute sys.path: unit tests run first.
    comfy_harness.move_comfyui_tests_last(items, "comfyui", COMFY_FIXTURES)


# ---------------------------------------------------------------------------------------------- real ComfyUI
@pytest.fixture(autouse=True, scope="module")
def _release_comfyui_models():
    """After each test module, let the in-process ComfyUI drop the models it still holds (tests load many full-size
    SD1.5 copies; kept alive together they would exhaust a CI machine's memory)."""
    yield
    if "comfy.model_management" in sys.modules:
        import gc

        in_process = getattr(comfy_harness.ComfyInProcess, "current", None)
        if in_process is not None:
            in_process.executor.reset()  # cached node outputs hold whole checkpoints
        mm = sys.modules["comfy.model_management"]
        mm.unload_all_models()
        gc.collect()
        mm.soft_empty_cache()


@pytest.fixture(scope="session")
def comfyui_dir():
    path = os.environ.get("COMFYUI_DIR")
    problem = comfy_harness.comfyui_dir_problem(path)
    if problem:
        if os.environ.get("PRODUCTBG_SKIP_COMFYUI"):  # .ci/run's plain pip venv: no ComfyUI there on purpose
            pytest.skip(f"{os.environ['PRODUCTBG_SKIP_COMFYUI']}: {problem}")
        if comfy_harness.in_ci():
            pytest.fail(f"{problem}; CI must run the ComfyUI tests (use bash scripts/test.sh)", pytrace=False)
        pytest.skip(problem)
    return os.path.realpath(path)


@pytest.fixture(scope="session")
def comfy_checkpoints(comfyui_dir):
    return comfy_harness.ensure_checkpoints(comfyui_dir)


@pytest.fixture(scope="session")
def comfy_sdxl_checkpoints(comfyui_dir):
    return comfy_harness.ensure_sdxl_checkpoints(comfyui_dir)


@pytest.fixture(scope="session")
def comfy_flux_files(comfyui_dir):
    import flux_checkpoint

    return flux_checkpoint.flux_files(comfyui_dir)


@pytest.fixture(scope="session")
def comfy(comfyui_dir, comfy_checkpoints, tmp_path_factory):
    return comfy_harness.ComfyInProcess.load(comfyui_dir, comfy_harness.REPO_ROOT,
                                             tmp_path_factory.mktemp("comfy_inprocess"), comfy_checkpoints)


@pytest.fixture(scope="session")
def comfy_server(comfyui_dir, comfy_checkpoints, tmp_path_factory):
    server = comfy_harness.ComfyServer(comfyui_dir, comfy_harness.REPO_ROOT, tmp_path_factory.mktemp("comfy_server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def comfy_model_files(comfy, tmp_path_factory):
    """Tiny bank / style encoder / LoRA / CLIP-vision files registered in the in-process ComfyUI."""
    import comfy_model_files

    return comfy_model_files.write_model_files(comfy, tmp_path_factory.mktemp("models"))


@pytest.fixture(params=comfy_harness.CLONE_SEMANTICS)
def clone_semantics(request, comfy, monkeypatch):
    comfy_harness.use_clone_semantics(request.param, monkeypatch)
    return request.param


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread; on a busy machine idle OpenMP threads cost seconds per call.
    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection fails: loading must not need the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
