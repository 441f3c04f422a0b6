#!/usr/bin/env bash
# The real-browser test's tools: Debian's chromium (apt) and npm's playwright-core (in a cached folder), nothing
# downloaded from anywhere else (playwright's own browser download is never used: tests launch /usr/bin/chromium
# through executablePath). Idempotent and cached: a second run only checks.
#
# Usage:  eval "$(bash scripts/setup_browser.sh)"   # prints `export PRODUCTBG_CHROMIUM=... PRODUCTBG_NODE_PATH=...`
# Environment: PRODUCTBG_ENV_DIR (default ~/.cache/productbg): playwright-core goes to <env dir>/node-<version>.
# Without root (or apt-get, or npm) it says what is missing on stderr and exits 0 with whatever it has: the
# browser test then skips outside CI and fails under CI=true, naming what is missing.
set -euo pipefail
PLAYWRIGHT_CORE=1.65.2
ENV_DIR=$(realpath -m "${PRODUCTBG_ENV_DIR:-${HOME:-/tmp}/.cache/productbg}")
NODE_DIR="$ENV_DIR/node-playwright-core-$PLAYWRIGHT_CORE"
CHROMIUM=${PRODUCTBG_CHROMIUM:-/usr/bin/chromium}
say() { echo "[setup_browser] $*" >&2; }
mkdir -p "$ENV_DIR/logs"
LOG="$ENV_DIR/logs/setup-browser.log"

if [ ! -x "$CHROMIUM" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing Debian's chromium (log: $LOG)"
        exec 8>"$ENV_DIR/.apt-lock"; flock 8   # one apt run of ours at a time
        if ! { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >>"$LOG" 2>&1 \
               || { apt-get update -q >>"$LOG" 2>&1 \
                    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >>"$LOG" 2>&1; }; }; then
            tail -n 20 "$LOG" >&2
            say "could not install chromium"
        fi
    else
        say "no $CHROMIUM and no root apt-get to install it: apt-get install chromium"
    fi
fi

if [ ! -f "$NODE_DIR/node_modules/playwright-core/package.json" ]; then
    if command -v npm >/dev/null; then
        say "installing playwright-core@$PLAYWRIGHT_CORE into $NODE_DIR"
        mkdir -p "$NODE_DIR.tmp"
        if npm install --prefix "$NODE_DIR.tmp" --no-audit --no-fund --ignore-scripts "playwright-core@$PLAYWRIGHT_CORE" \
               >>"$LOG" 2>&1; then
            rm -rf "$NODE_DIR" && mv "$NODE_DIR.tmp" "$NODE_DIR"
        else
            tail -n 20 "$LOG" >&2
            rm -rf "$NODE_DIR.tmp"
            say "could not install playwright-core"
        fi
    else
        say "no npm: install Node.js and npm (Debian: apt-get install nodejs npm)"
    fi
fi

[ -x "$CHROMIUM" ] && say "chromium: $("$CHROMIUM" --version 2>/dev/null | head -1)"
printf 'export PRODUCTBG_CHROMIUM=%q\nexport PRODUCTBG_NODE_PATH=%q\n' "$CHROMIUM" "$NODE_DIR/node_modules"
