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


MODEL_FILE_INPUTS = {"unet_name", "clip_name1", "clip_name2", "clip_name3", "clip_name4", "vae_name", "lora_name"}


@pytest.mark.parametrize("name", ["hidream_lokr_train", "hidream_lokr_sample_native"])
def test_real_weight_workflows_are_valid_except_for_the_model_files_this_machine_lacks(comfy, name):
    """Without HiDream's weights these graphs cannot run here; ComfyUI's validation must find nothing wrong with
    them except the missing model files (types, links and every other widget value are accepted)."""
    response = comfy.queue(json.loads((API_DIR / f"{name}_api.json").read_text()))
    assert response.status_code == 400
    node_errors = response.json()["node_errors"]
    assert node_errors
    for node_id, node in node_errors.items():
        for error in node["errors"]:
            assert error["type"] == "value_not_in_list", (node_id, error)
            assert error["extra_info"]["input_name"] in MODEL_FILE_INPUTS, (node_id, error)
