#!/usr/bin/env bash
# Build (or reuse) the productbg development / CI environment: a Python 3.11 venv with torch, ComfyUI 0.3.75's
# requirements, productbg installed editable with its [test,train] extras, and a ComfyUI 0.3.75 source tree.
#
# Usage:
#   bash scripts/setup_env.sh               # build or reuse; prints `export ...` lines on stdout
#   eval "$(bash scripts/setup_env.sh)"     # ... and take them into this shell
#   source scripts/setup_env.sh             # same as the eval line (bash only)
# Exports: PRODUCTBG_VENV, PRODUCTBG_PY (the venv's python), COMFYUI_DIR (the ComfyUI tree).
#
# Environment (all optional):
#   PRODUCTBG_ENV_DIR  cache folder (default ~/.cache/productbg): venvs, ComfyUI tree (with the test
#                      checkpoints that tests build into it), logs
#   PRODUCTBG_VENV     use this venv instead of <env dir>/venv-<hash>; the hash covers pyproject.toml's
#                      dependencies, scripts and package list, requirements.txt and this script, so editing
#                      any of them builds a fresh venv
#   COMFYUI_DIR        use this ComfyUI 0.3.75 tree (fetched there when absent) instead of
#                      <env dir>/comfyui-0.3.75
#   PYTHON             interpreter for new venvs (default python3.11: the local torch wheels are cp311)
#
# Idempotent: a venv gets its stamp file only after every step succeeded, so an interrupted build is redone.
# A venv that has its stamp is only refreshed with `pip install --no-deps -e <this checkout>` (CI clones the
# repo into a new folder each time and the editable install must point at the checkout under test).
# All progress goes to stderr; pip's output goes to a log whose tail is shown on failure.

if [ "${BASH_SOURCE[0]}" != "$0" ]; then   # sourced: run in a child bash (set -e must not hit this shell)
    _pbg_exports=$(bash "${BASH_SOURCE[0]}") || { echo "setup_env.sh failed" >&2; unset _pbg_exports; return 1; }
    eval "$_pbg_exports"
    unset _pbg_exports
    return 0
fi

set -euo pipefail

TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
COMFYUI_VERSION=0.3.75
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
ENV_DIR=$(realpath -m "${PRODUCTBG_ENV_DIR:-${HOME:-/tmp}/.cache/productbg}")
# What the venv is built from: pyproject's dependencies, scripts and package list (not its version or the
# registry metadata, so a release or a [tool.comfy] edit reuses the venv), requirements.txt and this script.
KEY=$( { "${PYTHON:-python3.11}" -c 'import json, sys, tomllib
d = tomllib.load(open(sys.argv[1], "rb"))
p = d["project"]
print(json.dumps([p.get(k) for k in ("requires-python", "dependencies", "optional-dependencies", "scripts")]
                 + [d.get("tool", {}).get("setuptools")], sort_keys=True))' "$REPO/pyproject.toml"
         cat "$REPO/requirements.txt" "$REPO/scripts/setup_env.sh"; } | sha256sum | cut -c1-12)
VENV=$(realpath -m "${PRODUCTBG_VENV:-$ENV_DIR/venv-$KEY}")
COMFYUI_DIR=$(realpath -m "${COMFYUI_DIR:-$ENV_DIR/comfyui-$COMFYUI_VERSION}")
PYTHON=${PYTHON:-python3.11}
STAMP="$VENV/.productbg-env-stamp"
LOG="$ENV_DIR/logs/setup-$KEY.log"
T0=$SECONDS

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_PROGRESS_BAR=off

say() { echo "[setup_env] $(( SECONDS - T0 ))s: $*" >&2; }
die() { echo "[setup_env] FAIL: $*" >&2; exit 1; }
logged() {  # logged WHAT cmd...: append the command's output to $LOG; on failure show the log's tail
    echo "=== $(date -u +%FT%TZ) $1: ${*:2}" >>"$LOG"
    if ! "${@:2}" >>"$LOG" 2>&1; then
        echo "----- last lines of $LOG -----" >&2
        tail -n 40 "$LOG" >&2
        die "$1"
    fi
}

mkdir -p "$ENV_DIR/logs"
# One setup at a time per cache folder (parallel CI jobs or developers share the venvs and the ComfyUI tree).
exec 9>"$ENV_DIR/.lock"
if ! flock -n 9; then
    say "waiting for another setup_env.sh holding $ENV_DIR/.lock"
    flock 9
fi

PY="$VENV/bin/python"
CONSTRAINTS="$VENV/productbg-constraints.txt"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ] && [ -x "$PY" ]; then
    say "reusing $VENV"
    [ -f "$COMFYUI_DIR/main.py" ] || logged fetch-comfyui "$PY" "$REPO/scripts/fetch_comfyui.py" "$COMFYUI_DIR"
    logged editable-install "$PY" -m pip install -q --no-deps --no-build-isolation -c "$CONSTRAINTS" -e "$REPO"
else
    if [ -z "${PRODUCTBG_VENV:-}" ] && [ -e "$VENV" ]; then
        say "removing the unfinished venv $VENV"
        rm -rf "$VENV"
    fi
    if [ ! -x "$PY" ]; then
        command -v "$PYTHON" >/dev/null || die "no $PYTHON on PATH (set PYTHON=/path/to/python3.11)"
        say "creating $VENV with $("$PYTHON" --version 2>&1)"
        "$PYTHON" -m venv "$VENV"
    fi
    "$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
        || die "$VENV must run Python 3.11 (the torch wheels are cp311)"
    printf '%s\n' "${TORCH_PINS[@]}" >"$CONSTRAINTS"

    say "installing ${TORCH_PINS[*]} (log: $LOG)"
    logged torch "$PY" -m pip install -q "${TORCH_PINS[@]}"
    logged torch-check "$PY" -c 'import torch, torchvision; print(torch.__version__, torchvision.__version__)'

    say "ComfyUI $COMFYUI_VERSION tree at $COMFYUI_DIR"
    logged fetch-comfyui "$PY" "$REPO/scripts/fetch_comfyui.py" "$COMFYUI_DIR"
    grep -q "__version__ = \"$COMFYUI_VERSION\"" "$COMFYUI_DIR/comfyui_version.py" \
        || die "$COMFYUI_DIR is not ComfyUI $COMFYUI_VERSION"

    say "installing ComfyUI's requirements (minus torch/torchvision/torchaudio) + requests"
    grep -v -E '^\s*(torch|torchvision|torchaudio)\s*([<>=!~;#].*)?$' "$COMFYUI_DIR/requirements.txt" \
        >"$VENV/comfyui-requirements.txt"
    logged comfyui-requirements "$PY" -m pip install -q -c "$CONSTRAINTS" -r "$VENV/comfyui-requirements.txt" requests

    say "installing productbg editable with [test,train]"
    # setuptools>=77 reads the SPDX `license` string; with it in the venv, the editable install needs no
    # build isolation (faster, and the refresh on reuse needs no download).
    logged build-tools "$PY" -m pip install -q -c "$CONSTRAINTS" "setuptools>=77" wheel
    logged editable-install "$PY" -m pip install -q --no-build-isolation -c "$CONSTRAINTS" -e "$REPO[test,train]"
fi

# The venv must import this checkout's productbg and the pinned torch.
logged check "$PY" - "$REPO" "${TORCH_PINS[0]#torch==}" <<'EOF'
import os, sys
import torch, productbg
repo, want = sys.argv[1], sys.argv[2]
assert torch.__version__.split("+")[0] == want, f"torch {torch.__version__} != {want}"
got = os.path.dirname(os.path.realpath(productbg.__file__))
assert got == os.path.realpath(repo), f"productbg imports from {got}, not from {repo}"
print("ok", torch.__version__, got)
EOF
[ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ] || { echo "$KEY" >"$STAMP"; say "stamped $VENV"; }
touch "$STAMP"   # last use; venvs of other hashes unused for 3 days (≈6 GB each) are removed below
for old in "$ENV_DIR"/venv-*; do
    [ -d "$old" ] && [ "$old" != "$VENV" ] || continue
    if [ -n "$(find "$old" -maxdepth 1 -name .productbg-env-stamp -mtime -3)" ] \
       || { [ ! -f "$old/.productbg-env-stamp" ] && [ -n "$(find "$old" -maxdepth 0 -mtime -1)" ]; }; then
        continue
    fi
    say "removing the unused venv $old"
    rm -rf "$old"
done

say "ready: $VENV, ComfyUI at $COMFYUI_DIR"
printf 'export PRODUCTBG_VENV=%q\nexport PRODUCTBG_PY=%q\nexport COMFYUI_DIR=%q\n' "$VENV" "$PY" "$COMFYUI_DIR"
