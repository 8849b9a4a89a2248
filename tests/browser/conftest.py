"""Browser tests: a real ComfyUI 0.3.75 server per frontend version, headless Chromium.

They run in ComfyUI's own environment like tests/comfyui/ (scripts/test.sh sets COMFYUI_DIR). One server per
frontend (session-scoped, parametrized: pytest runs every browser test for one frontend, stops that server, then
starts the next).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "comfyui"))

from comfy_server import ComfyServer, comfyui_dir  # noqa: E402

from browser_page import launch_chromium  # noqa: E402
from frontends import LATEST, frontend_root, pinned_version  # noqa: E402

ARTIFACTS = Path(__file__).parent / "artifacts"


def _frontend_versions() -> list[str]:
    return [pinned_version(comfyui_dir()), LATEST]


@pytest.fixture(scope="session", params=_frontend_versions())
def comfy_ui(request, tmp_path_factory):
    """(server, frontend version): ComfyUI serving the given frontend, first-run dialogs switched off."""
    version = request.param
    root = frontend_root(version, comfyui_dir())
    extra = ("--front-end-root", str(root)) if root else ()
    server = ComfyServer(tmp_path_factory.mktemp(f"comfyui-fe-{version}"), comfyui_dir(), extra_args=extra).start()
    # A fresh user gets the templates browser on first load; it would cover the canvas.
    requests.post(f"{server.url}/api/settings", json={"Comfy.TutorialCompleted": True}, timeout=30).raise_for_status()
    yield server, version
    server.stop()
    if os.environ.get("HIDREAM_LOKR_KEEP_COMFY_LOG"):
        print(server.log())


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
