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


@pytest.fixture(scope="session")
def comfy_modules():
    """ComfyUI's Python modules in this process (for tests that build ComfyUI objects directly)."""
    import sys

    from comfy_server import comfyui_dir

    sys.path.insert(0, str(comfyui_dir()))
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported: CPU-only torch has no CUDA
    import comfy.model_management  # noqa: F401
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models

    return comfy


@pytest.fixture(scope="session")
def pack(comfy_modules):
    """This pack imported as a package, the way ComfyUI imports it (relative imports, no name of its own)."""
    import importlib.util
    import sys

    from comfy_server import REPO

    spec = importlib.util.spec_from_file_location("hidream_lokr_pack", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["hidream_lokr_pack"] = module
    spec.loader.exec_module(module)
    return module
