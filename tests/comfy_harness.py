"""Real-ComfyUI test harness: ComfyUI in-process (:class:`ComfyInProcess`), and the face of its helper modules.

Used through the fixtures of ``tests/conftest.py`` (``comfyui_dir``, ``comfy_checkpoints``, ``comfy``,
``comfy_server``). Its parts, each re-exported here as ``comfy_harness.X``:

- ``comfy_env.py``: repo root, ComfyUI version check, child-process environment, pytest ordering, error text;
- ``comfy_checkpoints.py``: the random full-size SD1.5 checkpoints (built in a child process);
- ``comfy_server.py``: ``main.py`` in a child process — ``--quick-test-for-ci`` and :class:`ComfyServer`.

Module level imports only the standard library and those helpers.

Traps this module handles, so tests do not have to:
- ComfyUI is a flat tree of top-level modules (``nodes``, ``utils``, ``server``, ``execution``, ...) and
  ``nodes.py`` puts ``<ComfyUI>/comfy`` at ``sys.path[0]``. ComfyUI is only ever imported by the ``comfy``
  fixture, and ``comfyui``-marked tests run last. The repo root is never put on ``sys.path`` (its ``nodes/``
  would shadow ComfyUI's ``nodes.py``).
- ``comfy.cli_args.args.cpu`` is set before ``comfy.model_management`` is imported; ``utils.install_util``
  is imported before ``nodes``.
- ``nodes.load_custom_node`` registers a pack folder under ``sys.modules[<absolute path, "." -> "_x_">]``, so the
  pack loads from a folder of any name (CI clones anywhere) and never collides with the installed
  ``productbg``: the pack's submodules are their own copies (``ComfyInProcess.pack_module``).
"""
from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import sys
from pathlib import Path

from comfy_checkpoints import (CKPT_INPAINT, CKPT_MARKER_KEY, CKPT_SD15, CKPT_SEED, CKPT_SUBDIR, CKPT_VERSION,  # noqa: F401
                               _random_init, ensure_checkpoints, ensure_sdxl_checkpoints, read_safetensors_metadata)
from comfy_env import (COMFYUI_VERSION, REPO_ROOT, child_env, comfyui_dir_problem, format_status_messages,  # noqa: F401
                       format_validation_error, in_ci, move_comfyui_tests_last)
from comfy_server import COMFY_SERVER_ARGS, ComfyServer, free_port, prepare_instance_dir, quick_test_for_ci  # noqa: F401


# ------------------------------------------------------------------------------------------------ in-process
class _NullServer:
    """The part of ``server.PromptServer`` that ``execution.PromptExecutor`` and a few nodes use."""

    client_id = None
    last_node_id = None
    last_prompt_id = None

    def send_sync(self, event, data, sid=None):
        pass

    def send_progress_text(self, text, node_id, sid=None):
        pass

    def queue_updated(self):
        pass


class ComfyInProcess:
    """A real ComfyUI loaded into this process, with the productbg pack loaded as a custom node pack.

    Attributes: ``nodes`` (ComfyUI's ``nodes`` module), ``node_class_mappings`` (``nodes.NODE_CLASS_MAPPINGS``:
    core + comfy_extras + this pack), ``pack`` (the pack's module object as ComfyUI loaded it),
    ``pack_module_name`` (its ``sys.modules`` key), ``comfyui_dir``, ``output_dir``, ``input_dir``, ``temp_dir``,
    ``ckpt_sd15`` / ``ckpt_inpaint`` (names for CheckpointLoaderSimple), ``last_history`` (the executor's
    history entry of the last ``run``), ``folder_paths``, ``execution``, ``executor``.
    Methods: ``run(prompt) -> outputs``, ``saved_images(outputs) -> [Path]``, ``put_input_image(img, name)``,
    ``pack_module("attention.masks")``.
    One instance per process (ComfyUI's globals); the executor's cache keeps node outputs (e.g. a loaded
    checkpoint) between ``run`` calls, as a real server does. Trap: inside a test that takes the ``comfy``
    fixture, ``import comfy.sd`` rebinds the name ``comfy`` to ComfyUI's package; use ``from comfy.sd import ...``.
    """

    _loaded: "ComfyInProcess | None" = None

    def __init__(self, comfyui_dir: str | os.PathLike, pack_dir: str | os.PathLike, workdir: str | os.PathLike,
                 checkpoints: dict[str, str]):
        self.comfyui_dir = str(Path(comfyui_dir).resolve())
        self.pack_dir = str(Path(pack_dir).resolve())
        work = Path(workdir)
        self.output_dir, self.input_dir, self.temp_dir, self.user_dir = (
            work / "output", work / "input", work / "temp", work / "user")
        for d in (self.output_dir, self.input_dir, self.temp_dir, self.user_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.ckpt_sd15, self.ckpt_inpaint = checkpoints["sd15"], checkpoints["inpaint"]
        self.last_history: dict = {}
        self._counter = 0

    @classmethod
    def load(cls, comfyui_dir, pack_dir, workdir, checkpoints, *, cpu: bool = True,
             comfy_args: dict | None = None) -> "ComfyInProcess":
        """``cpu=False`` lets ComfyUI pick its device (bench/gpu_check.py); ``comfy_args`` sets more of
        ``comfy.cli_args.args`` (e.g. ``{"fp16_unet": True}``) before ``comfy.model_management`` is imported."""
        if cls._loaded is not None:               # ComfyUI's globals exist once per process
            return cls._loaded
        self = cls(comfyui_dir, pack_dir, workdir, checkpoints)
        self._import_comfyui(cpu, comfy_args or {})
        self._load_pack()
        cls._loaded = self
        return self

    def _import_comfyui(self, cpu: bool = True, comfy_args: dict | None = None) -> None:
        clash = sys.modules.get("nodes")
        if clash is not None and not str(getattr(clash, "__file__", "")).startswith(self.comfyui_dir):
            raise RuntimeError(f"a module named 'nodes' is already imported from {clash.__file__}; "
                               "run pytest as `bash scripts/test.sh` (never `python -m pytest`)")
        if self.comfyui_dir in sys.path:         # conftest appends it for the V3 node classes: first from here on
            sys.path.remove(self.comfyui_dir)
        sys.path.insert(0, self.comfyui_dir)
        from comfy.cli_args import args           # parses [] (ComfyUI parses argv only when run as main.py)

        if "comfy.model_management" in sys.modules and args.cpu != cpu:
            raise RuntimeError("comfy.model_management was imported before args.cpu could be set")
        args.cpu = cpu
        for name, value in (comfy_args or {}).items():
            setattr(args, name, value)
        import utils.install_util  # noqa: F401  before `nodes`, which puts <ComfyUI>/comfy at sys.path[0]
        import folder_paths

        folder_paths.set_output_directory(str(self.output_dir))
        folder_paths.set_input_directory(str(self.input_dir))
        folder_paths.set_temp_directory(str(self.temp_dir))
        folder_paths.set_user_directory(str(self.user_dir))
        import comfy.model_management  # noqa: F401
        import execution
        import nodes
        import server

        server.PromptServer.instance = _NullServer()
        failed = asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        self.core_import_failures = list(failed or [])   # comfy_extras audio modules: no torchaudio, expected
        self.nodes, self.execution, self.folder_paths = nodes, execution, folder_paths
        caching = ({"cache_args": {"lru": 0, "ram": 0}}            # 0.3.75; 0.3.64 takes cache_size
                   if "cache_args" in inspect.signature(execution.PromptExecutor).parameters else {"cache_size": 0})
        self.executor = execution.PromptExecutor(_NullServer(), cache_type=execution.CacheType.CLASSIC, **caching)
        ComfyInProcess.current = self  # conftest clears the executor's cached outputs between test modules

    def _load_pack(self) -> None:
        import logging

        records: list[logging.LogRecord] = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = records.append             # ComfyUI logs a pack's import traceback, then returns False
        logging.getLogger().addHandler(handler)
        try:
            ok = asyncio.run(self.nodes.load_custom_node(self.pack_dir, module_parent="custom_nodes"))
        finally:
            logging.getLogger().removeHandler(handler)
        self.pack_module_name = self.pack_dir.replace(".", "_x_")   # nodes.load_custom_node's sys.modules key
        self.pack = sys.modules.get(self.pack_module_name)
        if not ok or self.pack is None:
            log = "\n".join(r.getMessage() for r in records)[-6000:]
            raise RuntimeError(f"ComfyUI could not import the pack {self.pack_dir}:\n{log}")
        assert Path(self.pack.__file__).resolve() == Path(self.pack_dir, "__init__.py").resolve()

    @property
    def node_class_mappings(self) -> dict:
        return self.nodes.NODE_CLASS_MAPPINGS

    def pack_module(self, dotted: str):
        """The pack's own copy of a productbg submodule, e.g. ``pack_module("attention.masks")``."""
        return importlib.import_module(f"{self.pack_module_name}.{dotted}")

    def run(self, prompt: dict, *, extra_data: dict | None = None) -> dict:
        """Validate and execute an API-format prompt; return ``{node_id: ui_output}``. AssertionError on failure."""
        if isinstance(prompt.get("prompt"), dict):   # a saved {"prompt": {...}} file
            prompt = prompt["prompt"]
        self._counter += 1
        prompt_id = f"test-{self._counter}"
        valid, err, outputs, node_errors = asyncio.run(self.execution.validate_prompt(prompt_id, prompt, None))
        if not valid:
            raise AssertionError("ComfyUI rejected the prompt: " + format_validation_error(err, node_errors))
        self.executor.execute(prompt, prompt_id, dict(extra_data or {}), outputs)
        self.last_history = dict(self.executor.history_result or {})
        if not self.executor.success:
            raise AssertionError("ComfyUI execution failed: " + format_status_messages(self.executor.status_messages))
        return self.last_history.get("outputs", {})

    def put_input_image(self, image, name: str) -> str:
        """Save a PIL image (or HxWxC uint8 / 0..1 float array) into the input folder; returns LoadImage's name."""
        from PIL import Image

        if not isinstance(image, Image.Image):
            import numpy as np

            arr = np.asarray(image)
            if arr.dtype != np.uint8:
                arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
            image = Image.fromarray(arr)
        image.save(self.input_dir / name)
        return name

    def saved_images(self, outputs: dict) -> list[Path]:
        """Paths of the images that SaveImage / PreviewImage nodes wrote for ``outputs``."""
        roots = {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}
        return [Path(roots[im.get("type", "output")], im.get("subfolder", ""), im["filename"])
                for out in outputs.values() for im in out.get("images", [])]


def txt2img_prompt(ckpt_name: str, size: int = 64, steps: int = 2, seed: int = 1,
                   text: str = "a product photo on a table", prefix: str = "productbg_test") -> dict:
    """A core-only API-format SD1.5 txt2img graph (CheckpointLoaderSimple → KSampler → VAEDecode → SaveImage)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": text}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": seed,
            "steps": steps, "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


# ------------------------------------------------------------------------------------------ clone semantics
#: ``ModelPatcher.clone()`` copies ``model_options`` with ``copy.deepcopy`` in ComfyUI 0.3.6x–0.3.7x; newer
#: releases copy only the dicts and lists (``create_model_options_clone``) and share every other object.
CLONE_SEMANTICS = ("deepcopy", "dicts_and_lists")


def use_clone_semantics(name: str, monkeypatch) -> None:
    """Make the loaded ComfyUI's ``ModelPatcher.clone()`` copy ``model_options`` the ``name`` way (its only
    ``copy.deepcopy`` call is that one)."""
    if name == "deepcopy":
        return
    import copy
    import types

    import comfy.model_patcher as mp

    def dicts_and_lists(x, memo=None):
        return mp.create_model_options_clone(x) if isinstance(x, dict) else copy.deepcopy(x, memo)
    monkeypatch.setattr(mp, "copy", types.SimpleNamespace(deepcopy=dicts_and_lists, copy=copy.copy))

