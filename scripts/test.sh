#!/usr/bin/env bash
# Fresh machine -> tests: set up .venv and run the suite, then build (once, cached in .cache/comfyui) a headless
# ComfyUI 0.3.75 with its own Python and run tests/comfyui and tests/browser against a real ComfyUI server.
# "No tests collected" counts as a failure. Arguments go to the first pytest run (the core suite).
# SKIP_COMFYUI_TESTS=1 runs only the core suite (the ComfyUI tests then do not run; nothing counts them as passed).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
# The core tests run torch on one thread each, so two pytest workers use both cores of a CI machine.
.venv/bin/python -m pytest -n "${PYTEST_WORKERS:-auto}" "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: failing" >&2
    exit 1
fi
[ "$rc" -ne 0 ] && exit "$rc"
if [ "${SKIP_COMFYUI_TESTS:-0}" = "1" ]; then
    echo "SKIP_COMFYUI_TESTS=1: the ComfyUI tests did not run" >&2
    exit 0
fi

paths="$(bash scripts/comfyui_env.sh)" || exit 1
COMFYUI_DIR="$(echo "$paths" | sed -n 's/^COMFYUI_DIR=//p')"
COMFYUI_PYTHON="$(echo "$paths" | sed -n 's/^COMFYUI_PYTHON=//p')"
export COMFYUI_DIR
# tests/browser: the live training view in headless Chromium (Debian's `chromium`; .ci/run installs it).
"$COMFYUI_PYTHON" -m pytest tests/comfyui tests/browser
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no ComfyUI tests: failing" >&2
    exit 1
fi
exit "$rc"
