#!/usr/bin/env bash
# Create .venv (once) and install what the project needs. Safe to re-run: pip skips what is already there.
# torch is installed first and on its own: requirements.txt never pins it (inside ComfyUI, ComfyUI owns torch).
# TORCH_SPEC overrides the torch requirement (default: torch==2.13.0, the CPU build this machine kind serves).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/python -m pip install --quiet -r requirements.txt -r requirements-dev.txt -c constraints.txt
