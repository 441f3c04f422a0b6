"""Real-ComfyUI test harness: random full-size SD1.5 checkpoints, ComfyUI in-process, ComfyUI as an HTTP server.

Used through the fixtures of ``tests/conftest.py`` (``comfyui_dir``, ``comfy_checkpoints``, ``comfy``,
``comfy_server``). Module level imports only the standard library: this file also runs as a script in a child
process to build the checkpoints (``python -P comfy_harness.py build-checkpoints COMFYUI_DIR OUT_DIR``).

Traps this module handles, so tests do not have to:
- ComfyUI is a flat tree of top-level modules (``nodes``, ``utils``, ``server``, ``execution``, ...) and
  ``nodes.py`` puts ``<ComfyUI>/comfy`` at ``sys.path[0]``. ComfyUI is only ever imported by the ``comfy``
  fixture, and ``comfyui``-marked tests run last. The repo root is never put on ``sys.path`` (its ``nodes/``
  would shadow ComfyUI's ``nodes.py``).
- ``comfy.cli_args.args.cpu`` is set before ``comfy.model_management`` is imported; ``utils.install_util``
  is imported before ``nodes``.
- ComfyUI's layers skip weight init (``torch.empty``), so the checkpoint builder initialises every layer.
- ``nodes.load_custom_node`` registers a pack folder under ``sys.modules[<absolute path, "." -> "_x_">]``, so the
  pack loads from a folder of any name (CI clones anywhere) and never collides with the installed
  ``productbg``: the pack's submodules are their own copies (``ComfyInProcess.pack_module``).
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
COMFYUI_VERSION = "0.3.75"

CKPT_SUBDIR = "productbg_test"               # inside <ComfyUI>/models/checkpoints
CKPT_SD15 = f"{CKPT_SUBDIR}/random_sd15.safetensors"
CKPT_INPAINT = f"{CKPT_SUBDIR}/random_sd15_inpaint.safetensors"
CKPT_MARKER_KEY = "productbg_test_checkpoint"
CKPT_VERSION = "1"                           # bump to rebuild cached checkpoints everywhere
CKPT_SEED = 0

COMFY_SERVER_ARGS = ["--cpu", "--database-url", "sqlite:///:memory:", "--disable-auto-launch"]


# ------------------------------------------------------------------------------------------------ environment
def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def comfyui_dir_problem(path: str | None) -> str | None:
    """Why ``path`` is not a usable ComfyUI tree, or None when it is."""
    if not path:
        return "COMFYUI_DIR is not set (bash scripts/test.sh sets it)"
    version_file = Path(path, "comfyui_version.py")
    if not Path(path, "main.py").is_file() or not version_file.is_file():
        return f"COMFYUI_DIR={path} is not a ComfyUI tree"
    if f'__version__ = "{COMFYUI_VERSION}"' not in version_file.read_text():
        return f"COMFYUI_DIR={path} is not ComfyUI {COMFYUI_VERSION}"
    return None


def child_env() -> dict[str, str]:
    """Environment for ComfyUI child processes: offline, and nothing of ours on sys.path."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONPATH", None)
    return env


def move_comfyui_tests_last(items: list, marker: str = "comfyui", fixtures: tuple[str, ...] = ()) -> None:
    """Stable-reorder pytest items so those marked ``marker`` (or using one of ``fixtures``) run last.

    Items that use one of ``fixtures`` but lack the marker get it added, so ``-m "not comfyui"`` skips them.
    """
    import pytest

    late = []
    for item in items:
        uses = set(getattr(item, "fixturenames", ())) & set(fixtures)
        if uses and item.get_closest_marker(marker) is None:
            item.add_marker(getattr(pytest.mark, marker))
        if item.get_closest_marker(marker) is not None:
            late.append(item)
    if late:
        late_ids = {id(i) for i in late}
        items[:] = [i for i in items if id(i) not in late_ids] + late


# ------------------------------------------------------------------------------------------------ checkpoints
def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a .safetensors file, reading only its header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)).get("__metadata__") or {}


def _checkpoint_ok(path: Path, kind: str) -> bool:
    try:
        return read_safetensors_metadata(path).get(CKPT_MARKER_KEY) == f"{CKPT_VERSION}:{kind}"
    except (OSError, ValueError, struct.error):
        return False


def ensure_checkpoints(comfyui_dir: str | os.PathLike, python: str = sys.executable) -> dict[str, str]:
    """Build the random SD1.5 checkpoints into ``<ComfyUI>/models/checkpoints/productbg_test/`` unless present.

    Returns ``{"sd15": <ckpt_name>, "inpaint": <ckpt_name>, "dir": <folder>}``; ckpt names are what
    ``CheckpointLoaderSimple`` takes. A build takes ≈20-30 s and ≈10 GB RAM in a child process; the files
    (2 GB each, fp16) are reused by later sessions while their version marker matches.
    """
    out_dir = Path(comfyui_dir, "models", "checkpoints", CKPT_SUBDIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = {"sd15": Path(comfyui_dir, "models", "checkpoints", CKPT_SD15),
               "inpaint": Path(comfyui_dir, "models", "checkpoints", CKPT_INPAINT)}
    import fcntl

    with open(out_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)        # another session may be building the same files
        if not all(_checkpoint_ok(p, k) for k, p in targets.items()):
            proc = subprocess.run([python, "-P", __file__, "build-checkpoints", str(comfyui_dir), str(out_dir)],
                                  env=child_env(), capture_output=True, text=True)
            if proc.returncode != 0 or not all(_checkpoint_ok(p, k) for k, p in targets.items()):
                raise RuntimeError(f"checkpoint build failed (rc {proc.returncode}):\n"
                                   f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
            print(proc.stdout.strip(), file=sys.stderr)
    return {"sd15": CKPT_SD15, "inpaint": CKPT_INPAINT, "dir": str(out_dir)}


def _build_checkpoints(comfyui_dir: str, out_dir: str) -> None:
    """Child-process entry: random weights, SD1.5 shapes, original LDM key layout, fp16, verified by detection."""
    t0 = time.time()
    sys.path.insert(0, comfyui_dir)
    from comfy.cli_args import args

    args.cpu = True
    import torch
    from safetensors.torch import save_file

    import comfy.model_detection
    import comfy.sd1_clip
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(CKPT_SEED)
    unet = UNetModel(
        image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
        channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
        transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
        context_dim=768, num_heads=8, num_head_channels=-1, use_spatial_transformer=True,
        use_linear_in_transformer=False, legacy=False, adm_in_channels=None, use_checkpoint=False,
        use_temporal_attention=False, use_temporal_resblock=False, dtype=torch.float32)
    vae = AutoencoderKL(embed_dim=4, ddconfig=dict(
        double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
        num_res_blocks=2, attn_resolutions=[], dropout=0.0))
    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    shared: dict[str, Any] = {}
    for prefix, module in (("first_stage_model.", vae), ("cond_stage_model.", clip)):
        _random_init(module)
        for k, v in module.state_dict().items():
            if prefix == "cond_stage_model." and k in ("logit_scale", "transformer.text_projection.weight"):
                continue                          # not in SD1.5 checkpoints
            shared[prefix + k] = _to_fp16(v)
    _random_init(unet)
    unet_sd = {"model.diffusion_model." + k: _to_fp16(v) for k, v in unet.state_dict().items()}
    del unet, vae, clip

    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    w4 = unet_sd[conv_in]                         # [320, 4, 3, 3]
    # SD1.5-inpainting = the same UNet with 9 input channels: latent 4 + mask 1 + masked-image latent 4.
    extra = torch.empty(w4.shape[0], 5, *w4.shape[2:]).uniform_(-1, 1) * (1.0 / (9 * 9) ** 0.5)
    w9 = torch.cat([w4.float() * (4 / 9) ** 0.5, extra], dim=1).half().contiguous()

    for kind, name, conv in (("sd15", CKPT_SD15, w4), ("inpaint", CKPT_INPAINT, w9)):
        sd = {**unet_sd, conv_in: conv, **shared}
        config = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
        got = type(config).__name__ if config is not None else None
        assert got == "SD15", f"{name}: ComfyUI detects {got}, not SD15"
        assert config.inpaint_model() == (kind == "inpaint"), f"{name}: inpaint detection wrong"
        out = os.path.join(out_dir, os.path.basename(name))
        partial = f"{out}.partial-{os.getpid()}"
        save_file(sd, partial, metadata={CKPT_MARKER_KEY: f"{CKPT_VERSION}:{kind}",
                                         "note": "random weights with SD1.5 shapes, for tests; outputs are noise"})
        os.replace(partial, out)
        n = sum(v.numel() for v in sd.values())
        print(f"built {out}: {len(sd)} tensors, {n / 1e6:.0f}M params, detected {got}"
              f"{' inpaint' if kind == 'inpaint' else ''}, {time.time() - t0:.1f}s")


def _to_fp16(v):
    return (v.half() if v.is_floating_point() else v).contiguous()


def _random_init(module) -> None:
    """torch's default init for Linear/Conv, unit norms, N(0, 0.02) embeddings (ComfyUI's ops skip init)."""
    import math

    import torch

    with torch.no_grad():
        for m in module.modules():
            w = getattr(m, "weight", None)
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
                torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5))
                if m.bias is not None:
                    bound = 1 / math.sqrt(w[0].numel())
                    torch.nn.init.uniform_(m.bias, -bound, bound)
            elif isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                if w is not None:
                    torch.nn.init.ones_(w)
                if getattr(m, "bias", None) is not None:
                    torch.nn.init.zeros_(m.bias)
            elif isinstance(m, torch.nn.Embedding):
                torch.nn.init.normal_(w, std=0.02)


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
    def load(cls, comfyui_dir, pack_dir, workdir, checkpoints) -> "ComfyInProcess":
        if cls._loaded is not None:               # ComfyUI's globals exist once per process
            return cls._loaded
        self = cls(comfyui_dir, pack_dir, workdir, checkpoints)
        self._import_comfyui()
        self._load_pack()
        cls._loaded = self
        return self

    def _import_comfyui(self) -> None:
        clash = sys.modules.get("nodes")
        if clash is not None and not str(getattr(clash, "__file__", "")).startswith(self.comfyui_dir):
            raise RuntimeError(f"a module named 'nodes' is already imported from {clash.__file__}; "
                               "run pytest as `bash scripts/test.sh` (never `python -m pytest`)")
        if self.comfyui_dir not in sys.path:
            sys.path.insert(0, self.comfyui_dir)
        from comfy.cli_args import args           # parses [] (ComfyUI parses argv only when run as main.py)

        if "comfy.model_management" in sys.modules and not args.cpu:
            raise RuntimeError("comfy.model_management was imported before args.cpu could be set")
        args.cpu = True
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
        self.executor = execution.PromptExecutor(_NullServer(), cache_type=execution.CacheType.CLASSIC,
                                                 cache_args={"lru": 0, "ram": 0})

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


def format_validation_error(err: Any, node_errors: Any) -> str:
    lines = []
    if isinstance(err, dict):
        lines.append(f"{err.get('message', '')} {err.get('details', '')}".strip())
    for node_id, info in (node_errors or {}).items():
        for e in info.get("errors", []):
            lines.append(f"node {node_id} ({info.get('class_type')}): {e.get('message')}: {e.get('details')}")
    return "\n".join(lines) or repr((err, node_errors))


def format_status_messages(messages: list) -> str:
    for event, data in messages:
        if event == "execution_error":
            tb = "".join(data.get("traceback") or [])[-4000:]
            return (f"node {data.get('node_id')} ({data.get('node_type')}): {data.get('exception_type')}: "
                    f"{data.get('exception_message')}\n{tb}")
    return repr(messages)[-4000:]


# ------------------------------------------------------------------------------------------------ subprocesses
def prepare_instance_dir(workdir: str | os.PathLike, pack_dir: str | os.PathLike, link_name: str) -> list[str]:
    """Lay out a private instance (custom_nodes/<link_name> -> pack, output, input, temp, user) under
    ``workdir`` and return main.py's arguments for it. The ComfyUI tree's own folders stay untouched except
    models/ (read); the tree's own custom_nodes/ is still scanned too (it ships only examples)."""
    work = Path(workdir).resolve()
    for d in ("custom_nodes", "output", "input", "temp", "user"):
        (work / d).mkdir(parents=True, exist_ok=True)
    link = work / "custom_nodes" / link_name
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path(pack_dir).resolve(), target_is_directory=True)
    yaml_path = work / "extra_model_paths.yaml"
    yaml_path.write_text(f"productbg_test:\n    custom_nodes: {json.dumps(str(work / 'custom_nodes'))}\n")
    return [*COMFY_SERVER_ARGS, "--extra-model-paths-config", str(yaml_path),
            "--output-directory", str(work / "output"), "--input-directory", str(work / "input"),
            "--temp-directory", str(work / "temp"), "--user-directory", str(work / "user")]


def quick_test_for_ci(comfyui_dir, pack_dir, workdir, link_name: str = "comfyui-productbg.git",
                      python: str = sys.executable, timeout: float = 600) -> tuple[int, str, str]:
    """Run ``main.py --quick-test-for-ci`` with the pack linked as ``custom_nodes/<link_name>`` (by default a
    folder name that is not a Python identifier). Returns (returncode, log text, the pack's path in the log).
    main.py exits 0 even when a pack fails to import: look for "IMPORT FAILED" in the log."""
    args = prepare_instance_dir(workdir, pack_dir, link_name)
    proc = subprocess.run([python, "main.py", *args, "--quick-test-for-ci"], cwd=comfyui_dir, env=child_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    pack_path = str(Path(workdir).resolve() / "custom_nodes" / link_name)
    return proc.returncode, proc.stdout + proc.stderr, pack_path


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """ComfyUI's ``main.py`` as an HTTP server on 127.0.0.1 with the pack in ``custom_nodes/<link_name>``.

    ``url``, ``pid``, ``log_path``, ``output_dir``, ``input_dir``; ``get_json``, ``post_json``,
    ``object_info()``, ``queue(prompt) -> prompt_id``, ``wait(prompt_id) -> history entry``,
    ``run(prompt) -> outputs``, ``view(image) -> bytes``, ``upload_image(path)``, ``log_tail()``, ``stop()``.
    """

    def __init__(self, comfyui_dir, pack_dir, workdir, link_name: str = "productbg", python: str = sys.executable):
        self.comfyui_dir, self.pack_dir, self.python = str(comfyui_dir), str(pack_dir), python
        self.workdir = Path(workdir).resolve()
        self.link_name = link_name
        self.output_dir, self.input_dir = self.workdir / "output", self.workdir / "input"
        self.log_path = self.workdir / "server.log"
        self.proc: subprocess.Popen | None = None
        self.url = ""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def python_module(self) -> str:
        """What /object_info reports as ``python_module`` for this pack's nodes."""
        return f"custom_nodes.{self.link_name}"

    def start(self, timeout: float = 300) -> "ComfyServer":
        args = prepare_instance_dir(self.workdir, self.pack_dir, self.link_name)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([self.python, "main.py", *args, "--listen", "127.0.0.1", "--port", str(port)],
                                         cwd=self.comfyui_dir, env=child_env(), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.get_json("/system_stats", timeout=5)
                return self
            except (urllib.error.URLError, OSError):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"ComfyUI server exited with {self.proc.returncode}:\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"ComfyUI server not up after {timeout} s:\n{self.log_tail()}")
                time.sleep(0.25)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self.proc = None

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _request(self, path: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 120):
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read()

    def get_json(self, path: str, timeout: float = 120) -> Any:
        return json.loads(self._request(path, timeout=timeout))

    def post_json(self, path: str, payload: Any, timeout: float = 120) -> Any:
        return json.loads(self._request(path, json.dumps(payload).encode(), {"Content-Type": "application/json"},
                                        timeout=timeout))

    def object_info(self) -> dict:
        return self.get_json("/object_info")

    def queue(self, prompt: dict, client_id: str = "productbg-tests") -> str:
        try:
            return self.post_json("/prompt", {"prompt": prompt, "client_id": client_id})["prompt_id"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"/prompt rejected ({e.code}): {e.read().decode(errors='replace')[:6000]}") from None

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            status = (entry or {}).get("status") or {}
            if status.get("completed") is not None and status.get("status_str") in ("success", "error"):
                return entry
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI server died:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} not done after {timeout} s")
            time.sleep(0.25)

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue, wait, and return the outputs; AssertionError with the node's error on failure."""
        entry = self.wait(self.queue(prompt), timeout)
        if entry["status"]["status_str"] != "success":
            raise AssertionError("ComfyUI execution failed: " + format_status_messages(entry["status"].get("messages", [])))
        return entry.get("outputs", {})

    def view(self, image: dict) -> bytes:
        q = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                    "type": image.get("type", "output")})
        return self._request("/view?" + q)

    def upload_image(self, path: str | os.PathLike, name: str | None = None) -> str:
        """POST /upload/image (multipart); returns the name to give LoadImage."""
        name = name or Path(path).name
        boundary = f"----productbg{time.time_ns()}"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + Path(path).read_bytes() + \
               f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\ntrue\r\n--{boundary}--\r\n".encode()
        out = json.loads(self._request("/upload/image", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}))
        return f"{out['subfolder']}/{out['name']}" if out.get("subfolder") else out["name"]


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


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "build-checkpoints":
        try:
            _build_checkpoints(sys.argv[2], sys.argv[3])
        except BaseException:
            traceback.print_exc()
            sys.exit(1)
    else:
        sys.exit("usage: python -P comfy_harness.py build-checkpoints COMFYUI_DIR OUT_DIR")
