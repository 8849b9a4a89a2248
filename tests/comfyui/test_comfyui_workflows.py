"""The example workflows in workflows/ (UI format, what users open) and their API twins (what the tests submit)
describe the same graph, use only nodes this ComfyUI has, and come with thumbnails."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from comfy_server import REPO
from ui_workflow import ui_to_api

WORKFLOWS = sorted(p for p in (REPO / "workflows").glob("*.json"))
API_DIR = Path(__file__).parent / "workflows"


def test_every_example_workflow_has_an_api_twin_and_a_thumbnail():
    assert {p.stem for p in WORKFLOWS} >= {"hidream_lokr_tiny_demo"}
    for path in WORKFLOWS:
        assert (API_DIR / f"{path.stem}_api.json").is_file(), path.name
        assert Image.open(path.with_suffix(".jpg")).format == "JPEG"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_ui_workflow_equals_its_api_twin(comfy, path):
    info = comfy.get("/object_info")
    ui = json.loads(path.read_text())
    assert ui["version"] == 0.4
    api = json.loads((API_DIR / f"{path.stem}_api.json").read_text())
    expected = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    assert ui_to_api(ui, info) == expected
