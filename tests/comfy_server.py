"""ComfyUI's own ``main.py`` in a child process, with the pack linked into a private instance's ``custom_nodes``:
the ``--quick-test-for-ci`` import check and :class:`ComfyServer`, the HTTP server. Standard library only.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from comfy_env import child_env, format_status_messages

COMFY_SERVER_ARGS = ["--cpu", "--database-url", "sqlite:///:memory:", "--disable-auto-launch"]


def prepare_instance_dir(workdir: str | os.PathLike, pack_dir: str | os.PathLike, link_name: str,
                         model_paths: dict[str, str] | None = None) -> list[str]:
    """Lay out a private instance (custom_nodes/<link_name> -> pack, output, input, temp, user) under
    ``workdir`` and return main.py's arguments for it. The ComfyUI tree's own folders stay untouched except
    models/ (read); the tree's own custom_nodes/ is still scanned too (it ships only examples).
    ``model_paths`` (folder name -> path, e.g. ``{"productbg_banks": ...}``) go into extra_model_paths.yaml."""
    work = Path(workdir).resolve()
    for d in ("custom_nodes", "output", "input", "temp", "user"):
        (work / d).mkdir(parents=True, exist_ok=True)
    link = work / "custom_nodes" / link_name
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path(pack_dir).resolve(), target_is_directory=True)
    yaml_path = work / "extra_model_paths.yaml"
    extra = "".join(f"    {k}: {json.dumps(str(v))}\n" for k, v in (model_paths or {}).items())
    yaml_path.write_text(f"productbg_test:\n    custom_nodes: {json.dumps(str(work / 'custom_nodes'))}\n{extra}")
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

    def __init__(self, comfyui_dir, pack_dir, workdir, link_name: str = "productbg", python: str = sys.executable,
                 model_paths: dict[str, str] | None = None):
        self.comfyui_dir, self.pack_dir, self.python = str(comfyui_dir), str(pack_dir), python
        self.model_paths = dict(model_paths or {})
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
        args = prepare_instance_dir(self.workdir, self.pack_dir, self.link_name, self.model_paths)
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
