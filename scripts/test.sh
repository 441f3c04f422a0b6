#!/usr/bin/env bash
# The project's test command:  bash scripts/test.sh [pytest args]
# Builds or reuses the environment (scripts/setup_env.sh), then runs pytest from the repo root, offline, with
# COMFYUI_DIR pointing at the ComfyUI 0.3.75 tree used by the `comfyui`-marked integration tests.
# It runs the venv's `pytest` executable, not `python -m pytest`: `-m` would put the repo root on sys.path,
# where this repo's `nodes/` folder would shadow ComfyUI's `nodes.py`.
# --confcutdir=tests keeps pytest from collecting the repo root as a Package: the root has an __init__.py, and
# pytest would import it as a test package, which fails when the checkout folder's name is not an identifier
# (CI clones anywhere) and otherwise loads a second copy of productbg under the folder's name.
# Exits with pytest's status. Environment: see scripts/setup_env.sh (PRODUCTBG_ENV_DIR, PRODUCTBG_VENV,
# COMFYUI_DIR, PYTHON).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
exports=$(bash "$REPO/scripts/setup_env.sh")
eval "$exports"
cd "$REPO"
unset PYTHONPATH
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 COMFYUI_DIR PRODUCTBG_VENV PRODUCTBG_PY
exec "$PRODUCTBG_VENV/bin/pytest" --confcutdir="$REPO/tests" "$@"
