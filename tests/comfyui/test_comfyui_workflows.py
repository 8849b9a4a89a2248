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


TEMPLATE_MODELS = {  # as ComfyUI's own HiDream-I1 template (comfyui-workflow-templates, hidream_i1_full.json)
    "hidream_i1_full_fp8.safetensors": "diffusion_models", "clip_l_hidream.safetensors": "text_encoders",
    "clip_g_hidream.safetensors": "text_encoders", "t5xxl_fp8_e4m3fn_scaled.safetensors": "text_encoders",
    "llama_3.1_8b_instruct_fp8_scaled.safetensors": "text_encoders", "ae.safetensors": "vae"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflows_are_arranged_in_titled_groups_with_notes_and_declare_their_models(path):
    ui = json.loads(path.read_text())
    titles = [g["title"] for g in ui["groups"]]
    assert titles[0].startswith("1 ") and len(titles) >= 4, titles
    notes = [n for n in ui["nodes"] if n["type"] == "MarkdownNote"]
    assert len(notes) == len(titles) and all(len(n["widgets_values"][0]) > 40 for n in notes)
    assert ui["extra"]["ds"]["scale"] == 1
    declared = {m["name"]: m for n in ui["nodes"] for m in n["properties"].get("models", [])}
    named = {v for n in ui["nodes"] for v in n["widgets_values"] if isinstance(v, str) and v in TEMPLATE_MODELS}
    assert set(declared) == named  # every model file a loader names is declared, with its folder and URL
    for name, model in declared.items():
        assert model["directory"] == TEMPLATE_MODELS[name]
        assert model["url"].startswith("https://huggingface.co/Comfy-Org/HiDream-I1_ComfyUI/resolve/main/")
        assert name in model["url"]
