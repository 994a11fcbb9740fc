#!/usr/bin/env bash
# One-command setup: a virtual environment in .venv with torch and mimo (editable) plus test tools.
#   bash scripts/setup.sh                 # CPU: torch 2.13.0 (the CPU wheel)
#   MIMO_TORCH="torch --index-url https://download.pytorch.org/whl/cu128" bash scripts/setup.sh   # CUDA
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v 'is ignored' || true
# torch first, so that nothing later pulls a different (multi-GB) build
read -r -a torch_spec <<< "${MIMO_TORCH:-torch==2.13.0}"
.venv/bin/python -m pip install -q "${torch_spec[@]}" 2>&1 | grep -v 'is ignored' || true
.venv/bin/python -m pip install -q -e ".[dev]" 2>&1 | grep -v 'is ignored' || true
# Chromium for the web-chat test (Debian's package; Playwright's own browser download needs the internet)
if [ -z "${MIMO_NO_BROWSER:-}" ] && ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; } \
    || echo "setup: could not install chromium; the web-chat test will be skipped" >&2
fi
.venv/bin/python -c "import torch, mimo; print(f'mimo {mimo.__version__} ready: torch {torch.__version__}, cuda={torch.cuda.is_available()}')"
