#!/usr/bin/env bash
# bench/gpu_check.sh — issue 12's GPU check: the shipped API workflows in real ComfyUI 0.3.75 (in-process, fp16
# UNet), the diffusers pipeline (fp16 SD1.5; bf16 Flux.1 Fill + Redux) and train-cg steps (bf16, gradient
# checkpointing; SD1.5 and Flux.1), each patched vs unpatched, s/step and peak GPU memory, as ONE JSON line (the
# last line of stdout). Details: bench/gpu_check.py.
#
# Usage (from the repo root):
#   bash bench/gpu_check.sh --prepare   # on the dev machine: gather bench/.gpu_carry/ (downloads allowed here)
#   bash bench/gpu_check.sh [ARGS]      # on the lent GPU machine, with bench/.gpu_carry/ carried: < 10 minutes
#   bash bench/gpu_check.sh --cpu       # anywhere: same code path at tiny sizes (CI); uses $PRODUCTBG_PY (or
#                                       # python3) with diffusers installed and the ComfyUI tree at $COMFYUI_DIR
#   bash bench/gpu_check.sh --help      # every option of bench/gpu_check.py (sizes, steps, phases, --json-out)
# Exit status: 0 when every phase ran, 1 when one failed (its error is in the JSON's "errors"), 2 on bad usage.
#
# Assumptions about the GPU machine (device tool's KINDS.md, nvidia-h200, read 2026-11): x86-64, Python 3.12
# (`python3`, override with $PYTHON) with torch 2.11 + CUDA, torchvision, torchaudio, transformers 5.x,
# huggingface_hub >= 1.32, accelerate, peft, safetensors >= 0.8, numpy, pillow, scipy, einops, opencv, aiohttp,
# yarl, pyyaml, psutil, tqdm, tokenizers, sentencepiece; NO diffusers, NO ComfyUI, no network. So the carry
# folder holds (all pure Python, checked by --prepare):
#   wheels/   diffusers 0.42.1, torchsde 0.2.6 + trampoline 0.1.2 (ComfyUI's k-diffusion samplers import them)
#   stubs/av  a stub of PyAV (compiled, ~40 MB: too big to carry): ComfyUI's comfy_api imports `av` at load
#             time; only video/audio nodes use it, and those are not run here
#   ComfyUI/  ComfyUI 0.3.75 without models/, .git, tests, web/docs/examples, __pycache__ and the tokenizer
#             files of other model families (comfy/text_encoders/*/); SD1.5's comfy/sd1_tokenizer stays
# Not carried, because in-process loading does not need them (measured: ComfyInProcess.load with them blocked):
# kornia (only nodes_canny / nodes_morphology fail to load), spandrel (nodes_upscale_model), pydantic(-settings)
# (a pyproject.toml warning), alembic/SQLAlchemy, comfyui-frontend-package / workflow-templates / embedded-docs
# (the web server's, not started). Wheels are installed with `pip install --no-index --no-deps --target` into a
# temp folder on PYTHONPATH, with a `productbg` link to this checkout (the GPU machine has no editable install).
# The random full-size SD1.5 checkpoints (2 x 2 GB, ~30 s) are built into the carried tree's models/ like the
# tests build them, and the random bank / style encoder / CLIP vision files into a temp folder: no downloads.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
CARRY="$REPO/bench/.gpu_carry"
DIFFUSERS=diffusers==0.42.1
CARRY_WHEELS=("$DIFFUSERS" torchsde==0.2.6 trampoline==0.1.2)
LIMIT_MIB=64
cd "$REPO"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

say() { echo "[gpu_check] $*" >&2; }

mode=gpu
args=()
for a in "$@"; do
    case "$a" in
        --prepare) mode=prepare ;;
        --cpu) mode=cpu; args+=("$a") ;;
        *) args+=("$a") ;;
    esac
done

tracked_bytes() { git -C "$REPO" ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1; }

prepare() {
    local py=${PRODUCTBG_PY:-${PYTHON:-python3}} src=${COMFYUI_DIR:-}
    [ -n "$src" ] && [ -f "$src/comfyui_version.py" ] || { say "set COMFYUI_DIR to the ComfyUI 0.3.75 tree"; exit 2; }
    grep -q '__version__ = "0.3.75"' "$src/comfyui_version.py" || { say "$src is not ComfyUI 0.3.75"; exit 2; }
    rm -rf "$CARRY"
    mkdir -p "$CARRY/wheels" "$CARRY/stubs/av/subtitles"
    say "downloading ${CARRY_WHEELS[*]} (--no-deps) with $py"
    "$py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$CARRY/wheels" \
        "${CARRY_WHEELS[@]}"
    "$py" - "$CARRY/wheels" <<'EOF'
import sys, zipfile
from pathlib import Path
from packaging.specifiers import SpecifierSet
for whl in sorted(Path(sys.argv[1]).glob("*.whl")):
    assert whl.stem.endswith("-py3-none-any"), f"{whl.name}: not a pure-Python wheel"
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    spec = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("Requires-Python:")), "")
    assert SpecifierSet(spec).contains("3.12.3"), f"{whl.name}: Requires-Python {spec} excludes Python 3.12"
    print(f"[gpu_check]   {whl.name}: pure Python, Requires-Python {spec or 'any'} (3.12 ok)", file=sys.stderr)
EOF
    say "copying a trimmed ComfyUI tree from $src"
    mkdir -p "$CARRY/ComfyUI"
    (cd "$src" && tar -c --exclude=./models --exclude=./.git --exclude=./tests --exclude=./tests-unit \
        --exclude=./input --exclude=./output --exclude=./temp --exclude=./user --exclude=./custom_nodes/* \
        --exclude=./script_examples --exclude=./.github --exclude=__pycache__ --exclude='*.pyc' \
        --exclude='./comfy/text_encoders/*/*' . ) | tar -x -C "$CARRY/ComfyUI"
    mkdir -p "$CARRY/ComfyUI/custom_nodes"
    cat >"$CARRY/stubs/av/__init__.py" <<'EOF'
"""Stub of PyAV for bench/gpu_check.sh (the GPU machine has no av): ComfyUI imports it; image nodes never use it."""


def __getattr__(name):
    raise AttributeError(f"av.{name}: PyAV is a stub here (bench/gpu_check.sh); video/audio nodes do not work")
EOF
    echo 'class InputContainer: pass' >"$CARRY/stubs/av/container.py"
    : >"$CARRY/stubs/av/subtitles/__init__.py"
    echo 'class SubtitleStream: pass' >"$CARRY/stubs/av/subtitles/stream.py"
    local carry_b tracked_b
    carry_b=$(du -sb "$CARRY" | cut -f1)
    tracked_b=$(tracked_bytes)
    say "carry $(( carry_b / 1024 ))K + tracked files $(( tracked_b / 1024 ))K = $(( (carry_b + tracked_b) / 1048576 )) MiB" \
        "(the device tool's limit: $LIMIT_MIB MiB with every untracked, not-ignored file)"
    [ $(( carry_b + tracked_b )) -lt $(( LIMIT_MIB * 1048576 )) ] || { say "over $LIMIT_MIB MiB"; exit 1; }
}

case "$mode" in
prepare)
    prepare
    ;;
cpu)
    py=${PRODUCTBG_PY:-${PYTHON:-python3}}
    [ -n "${COMFYUI_DIR:-}" ] || { say "--cpu needs COMFYUI_DIR (eval \"\$(bash scripts/setup_env.sh)\")"; exit 2; }
    unset PYTHONPATH
    exec "$py" "$REPO/bench/gpu_check.py" "${args[@]}"
    ;;
gpu)
    for a in "${args[@]}"; do   # --help needs no GPU and no carry folder
        case "$a" in -h|--help) exec "${PYTHON:-python3}" "$REPO/bench/gpu_check.py" --help ;; esac
    done
    py=${PYTHON:-python3}
    nvidia-smi || say "nvidia-smi failed"
    "$py" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
"available", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
    [ -d "$CARRY/ComfyUI" ] && compgen -G "$CARRY/wheels/*.whl" >/dev/null \
        || { say "no carry folder $CARRY: run 'bash bench/gpu_check.sh --prepare' on the dev machine first"; exit 2; }
    site=$(mktemp -d /tmp/pbg_gpu_site.XXXXXX)
    trap 'rm -rf "$site"' EXIT
    "$py" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --target "$site" \
        "$CARRY"/wheels/*.whl
    "$py" -c 'import av' 2>/dev/null || cp -r "$CARRY/stubs/av" "$site/"
    "$py" -c 'import productbg' 2>/dev/null || ln -s "$REPO" "$site/productbg"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    export COMFYUI_DIR="${COMFYUI_DIR:-$CARRY/ComfyUI}"
    "$py" "$REPO/bench/gpu_check.py" "${args[@]}"
    ;;
esac
