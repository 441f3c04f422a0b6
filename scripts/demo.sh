#!/usr/bin/env bash
# The project's demo command:  bash scripts/demo.sh [productbg demo args]
# Builds or reuses the environment (scripts/setup_env.sh), then renders the demo contact sheet (default
# out/demo.png) offline.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
eval "$(bash "$REPO/scripts/setup_env.sh")"
cd "$REPO"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$PRODUCTBG_VENV/bin/productbg" demo "$@"
