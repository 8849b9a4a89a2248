"""The example workflows in workflows/ (UI format, what users open) and their API twins (what the tests submit)
describe the same graph, use only nodes this ComfyUI has, and come with thumbnails."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from comfy_server import REPO
from ui_workflow import LAYOUTS, TEMPLATES, template_path, ui_to_api

WORKFLOWS = sorted(p for p in (REPO / "workflows").glob("*.json"))
TWINS = {title: twin for twin, title in TEMPLATES.items()}  # workflows/<title>.json -> its API twin's name
API_DIR = Path(__file__).parent / "workflows"


def test_every_example_workflow_has_an_api_twin_and_a_thumbnail():
    assert {p.stem for p in WORKFLOWS} == set(TWINS)
    for path in WORKFLOWS:
        assert (API_DIR / f"{TWINS[path.stem]}_api.json").is_file(), path.name
        assert Image.open(path.with_suffix(".jpg")).format == "JPEG"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_ui_workflow_equals_its_api_twin(comfy, path):
    info = comfy.get("/object_info")
    ui = json.loads(path.read_text())
    assert ui["version"] == 0.4
    api = json.loads((API_DIR / f"{TWINS[path.stem]}_api.json").read_text())
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
    assert 0.8 <= ui["extra"]["ds"]["scale"] <= 1  # the first groups, readable (tests/browser checks them shown)
    assert any(g.first_view for g in LAYOUTS[TWINS[path.stem]])
    declared = {m["name"]: m for n in ui["nodes"] for m in n["properties"].get("models", [])}
    named = {v for n in ui["nodes"] for v in n["widgets_values"] if isinstance(v, str) and v in TEMPLATE_MODELS}
    assert set(declared) == named  # every model file a loader names is declared, with its folder and URL
    for name, model in declared.items():
        assert model["directory"] == TEMPLATE_MODELS[name]
        assert model["url"].startswith("https://huggingface.co/Comfy-Org/HiDream-I1_ComfyUI/resolve/main/")
        assert name in model["url"]


@pytest.mark.parametrize("name,loaders", [("hidream_lokr_train", {"1": 1, "2": 4, "3": 1}),
                                          ("hidream_lokr_sample_native", {"1": 1, "2": 4, "3": 1, "4": 1})])
def test_queueing_without_the_model_files_lists_every_missing_file_up_front(comfy, name, loaders):
    """ComfyUI 0.3.75 checks only V1 loaders when a prompt is queued; this pack's prompt hook checks every loader
    of a prompt of its nodes before anything runs: one refusal that names each missing file and its folder."""
    ui = json.loads(template_path(name).read_text())
    response = comfy.queue(json.loads((API_DIR / f"{name}_api.json").read_text()), workflow=ui)
    if name == "hidream_lokr_sample_native":  # no node of this pack in it: ComfyUI's own checks, untouched
        assert response.status_code == 400
        assert "HiDreamLoKrMissingModelFiles" not in response.text
        return
    assert response.status_code == 400, response.text[:500]
    body = response.json()
    assert set(body["node_errors"]) == set(loaders)
    details = body["error"]["details"]
    for model, folder in TEMPLATE_MODELS.items():
        assert details.count(f"{model} -> put it in models/{folder}") == 1, (model, details)
    assert "download: https://huggingface.co/Comfy-Org/HiDream-I1_ComfyUI" in details
    for node_id, count in loaders.items():
        (error,) = body["node_errors"][node_id]["errors"]
        assert f"needs {count} model file" in error["details"]
    print("\nthe refusal ComfyUI shows:\n" + details)
    # Nothing ran: no run folder, no training.
    assert not list((comfy.output_dir() / "hidream_lokr").glob("my_lokr_*"))


def test_an_api_prompt_of_the_first_train_layout_trains_with_its_values(comfy):
    """Scripts written for the Train node with every setting on it keep working: the prompt hook hands the
    settings that moved to settings nodes it adds to the prompt (left-out optional ones keep their defaults)."""
    from safetensors import safe_open

    old = json.loads((Path(__file__).parent / "fixtures" / "tiny_demo_first_layout_api.json").read_text())
    old.pop("8"), old.pop("9")
    old["6"]["inputs"].update(max_train_steps=2, validation_prompt="", output_name="first_layout")
    entry = comfy.wait(comfy.submit(old))
    assert entry["status"]["status_str"] == "success", entry["status"]
    (name,) = entry["outputs"]["7"]["text"]
    with safe_open(str(comfy.output_dir() / "loras" / name), "pt") as f:
        config = json.loads(f.metadata()["training_config"])
    expected = dict(lr_scheduler="constant", lr_warmup_steps=0, train_batch_size=2, gradient_checkpointing=False,
                    mixed_precision="no", flow_schedule_shift=1.0, seed=42, validation_num_inference_steps=8,
                    learning_rate=0.01, checkpoint_step_interval=500, use_ema=False)
    assert {k: config[k] for k in expected} == expected
    assert "uses the Train node's first layout" in comfy.log()
