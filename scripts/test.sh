#!/usr/bin/env bash
# The project's test command:  bash scripts/test.sh [pytest args]
# Builds or reuses the environment (scripts/setup_env.sh), then runs pytest from the repo root, offline, with
# COMFYUI_DIR pointing at the ComfyUI 0.3.75 tree used by the `comfyui`-marked integration tests.
# It runs the venv's `pytest` executable, not `python -m pytest`: `-m` would put the repo root on sys.path,
# where this repo's `nodes/` folder would shadow ComfyUI's `nodes.py`.
# --confcutdir=tests keeps pytest from collecting the repo root as a Package: the root has an __init__.py, and
# pytest would import it as a test package, which fails when the checkout folder's name is not an identifier
# (CI clones anywhere) and otherwise loads a second copy of productbg under the folder's name.
# With no arguments (the whole suite, what CI runs) pytest runs everything but the real-ComfyUI SDXL and Flux modules,
# then each of those (tests/test_comfy_sdxl*.py, tests/test_comfy_flux*.py) in a fresh process of its own, so that
# SD1.5, SDXL and Flux models never share one process's memory (an SDXL ComfyUI model peaks at ~16 GiB RSS on the
# CPU; the Flux files hold a full-size fp8 T5-XXL). Every closing summary line shows.
# Exits with pytest's status (the first failing run's). Environment: see scripts/setup_env.sh (PRODUCTBG_ENV_DIR, PRODUCTBG_VENV,
# COMFYUI_DIR, PYTHON).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
exports=$(bash "$REPO/scripts/setup_env.sh")
eval "$exports"
# The real-browser test's Debian chromium + npm playwright-core (cached; only checked once installed).
browser_exports=$(bash "$REPO/scripts/setup_browser.sh") || browser_exports=""
eval "$browser_exports"
cd "$REPO"
unset PYTHONPATH
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 COMFYUI_DIR PRODUCTBG_VENV PRODUCTBG_PY PRODUCTBG_CHROMIUM PRODUCTBG_NODE_PATH
PYTEST=("$PRODUCTBG_VENV/bin/pytest" --confcutdir="$REPO/tests")
if [ "$#" -gt 0 ]; then
  exec "${PYTEST[@]}" "$@"
fi
sdxl=(tests/test_comfy_sdxl*.py)
shopt -s nullglob
flux=(tests/test_comfy_flux*.py)
shopt -u nullglob
status=0
"${PYTEST[@]}" $(printf -- '--ignore=%s ' "${sdxl[@]}" "${flux[@]}") || status=$?
# Each SDXL module in a process of its own: an SDXL ComfyUI model peaks at ~15 GiB, and the training module's
# full-size SDXL train-cg child needs ~15 GiB more, which must not meet a parent still holding the first.
for module in "${sdxl[@]}" "${flux[@]}"; do
  echo "[test.sh] a real-ComfyUI SDXL/Flux module, in its own process: $module"
  "${PYTEST[@]}" "$module" || { s=$?; [ "$status" -ne 0 ] || status=$s; }
done
exit "$status"
