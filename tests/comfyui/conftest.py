"""One ComfyUI server per test session (starting one costs ~10 s; the tiny model is built once inside it)."""
from __future__ import annotations

import os

import pytest

from comfy_server import ComfyServer, comfyui_dir


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    server = ComfyServer(tmp_path_factory.mktemp("comfyui-base"), comfyui_dir()).start()
    yield server
    server.stop()
    if os.environ.get("HIDREAM_LOKR_KEEP_COMFY_LOG"):
        print(server.log())


@pytest.fixture(scope="session")
def events(comfy):
    from comfy_server import EventListener

    listener = EventListener(comfy)
    yield listener
    listener.close()
