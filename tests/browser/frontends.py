"""The two ComfyUI frontends the live view is tested on.

- the one ComfyUI 0.3.75 pins (its requirements.txt: comfyui-frontend-package==1.32.9), installed in ComfyUI's
  environment and served by default;
- the newest comfyui-frontend-package on the package index when this was written (LATEST; bump it when a newer one
  ships), downloaded once with pip (`pip download --no-deps`, no browser or build involved), unpacked under
  .cache/comfyui/frontends/<version>/ and served with ComfyUI's `--front-end-root <its static folder>`.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]
LATEST = "1.58.1"
CACHE = REPO / ".cache" / "comfyui" / "frontends"


def pinned_version(comfy_dir: Path) -> str:
    text = (comfy_dir / "requirements.txt").read_text()
    match = re.search(r"^comfyui-frontend-package==(\S+)", text, re.MULTILINE)
    if not match:
        raise RuntimeError(f"{comfy_dir / 'requirements.txt'} pins no comfyui-frontend-package")
    return match.group(1)


def frontend_root(version: str, comfy_dir: Path) -> Optional[Path]:
    """None for the version ComfyUI pins (served by default), else the static folder of that version."""
    if version == pinned_version(comfy_dir):
        return None
    static = CACHE / version / "comfyui_frontend_package" / "static"
    if (static / "index.html").is_file():
        return static
    # Test workers may get here at the same time: each unpacks into a folder of its own and renames it into place;
    # a worker that finds the version already there keeps what the other one put.
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="frontend-") as tmp, \
            tempfile.TemporaryDirectory(prefix=f".{version}-", dir=CACHE, ignore_cleanup_errors=True) as unpack:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        f"comfyui-frontend-package=={version}", "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("comfyui_frontend_package-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extractall(unpack, [n for n in z.namelist() if n.startswith("comfyui_frontend_package/")])
        if not (static / "index.html").is_file():
            shutil.rmtree(CACHE / version, ignore_errors=True)  # a half-unpacked copy of an older layout
            try:
                Path(unpack).rename(CACHE / version)
            except OSError:  # another worker renamed its copy in first
                if not (static / "index.html").is_file():
                    raise
    return static
