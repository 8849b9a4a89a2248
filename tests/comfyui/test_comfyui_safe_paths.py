"""Shared workflows cannot make the pack read or write outside ComfyUI's folders.

Hostile API prompts go to the real server: absolute paths, '..', symbolic links leading out of the input folder,
NUL characters and very long names, in every node input that names a path (the dataset folder, the HiDream
folders, the resume checkpoint, the run name and the LoKr file name). Each is refused with a message that names
the folder to use. "Nothing read or written outside" is proven on a canary folder next to the server's base folder
(holding images, captions and a checkpoint a hostile prompt would want): the server's own audit hook
(audit_pack/, Python's `sys.addaudithook`) records no file opened, listed, created or removed there, and the
canary's files are unchanged afterwards.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_server import load_graph

TRAIN, DATASET = "6", "2"
DATASET_DEFAULTS = {"caption_strategy": "textfile", "instance_prompt": "", "caption_fallback_to_filename": False,
                    "repeats": 0, "resolution": 64, "crop": False, "crop_style": "center", "crop_aspect": "square",
                    "is_regularisation_data": False}
LOADER_DEFAULTS = {"llama_folder": "", "transformer_precision": "fp32", "text_encoder_precision": "fp32",
                   "t5_quantization": "none", "llama_quantization": "none"}


def _picture(folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(folder / f"{name}.png")
    (folder / f"{name}.txt").write_text("a secret picture", encoding="utf-8")


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def canary(comfy):
    """The canary's bait, links to it from the input folder, and the audit hook checked to record a read."""
    bait = comfy.canary
    _picture(bait / "images", "a")
    (bait / "hidream_lokr" / "stolen_00001" / "checkpoint-4").mkdir(parents=True, exist_ok=True)
    (bait / "selftest.txt").write_text("seen", encoding="utf-8")
    inputs = comfy.base_dir / "input"
    inputs.mkdir(parents=True, exist_ok=True)
    (inputs / "linked_out").symlink_to(bait / "images", target_is_directory=True)
    _picture(inputs / "mixed", "good")
    (inputs / "mixed" / "evil.png").symlink_to(bait / "images" / "a.png")
    (inputs / "mixed" / "evil.txt").symlink_to(bait / "images" / "a.txt")
    import requests

    requests.post(f"{comfy.url}/hidream_lokr_test/audit/selftest", timeout=30).raise_for_status()
    before = comfy.audited()
    assert ["open", str(bait / "selftest.txt")] in before, before  # the hook sees what the server opens there
    return bait, len(before), _snapshot(bait)


def _dataset_prompt(folder: str) -> dict:
    return {"1": {"class_type": "HiDreamLoKrImageDataset", "inputs": {"folder": folder, **DATASET_DEFAULTS}},
            "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}


def _loader_prompt(**inputs) -> dict:
    return {"1": {"class_type": "HiDreamLoKrLoadDiffusers", "inputs": {**LOADER_DEFAULTS, **inputs}},
            "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}


def _refusal(comfy, graph: dict) -> str:
    """The text a person reads when ComfyUI refuses the prompt (queue-time) or the node fails (run-time)."""
    response = comfy.queue(graph)
    if response.status_code == 400:
        return response.text
    assert response.ok, response.text
    entry = comfy.wait(response.json()["prompt_id"])
    assert entry["status"]["status_str"] == "error", entry["status"]
    errors = [data for name, data in entry["status"]["messages"] if name == "execution_error"]
    return errors[0]["exception_message"]


def test_hostile_prompts_are_refused_and_nothing_outside_is_read_or_written(comfy, canary):
    bait, audited_before, files_before = canary
    inputs = comfy.base_dir / "input"
    relative_out = os.path.relpath(bait / "images", inputs)  # ../../<canary>/images
    refusals = {}
    for name, folder in {"absolute": str(bait / "images"), "dot-dot": relative_out, "home": "~",
                         "linked folder": "linked_out", "linked files": "mixed", "NUL": "mixed\0/../../x",
                         "long": "x" * 5000}.items():
        refusals[f"dataset {name}"] = _refusal(comfy, _dataset_prompt(folder))
    for name, inputs_ in {"absolute": {"model_folder": str(bait)}, "dot-dot": {"model_folder": "../../.."},
                          "llama": {"model_folder": "tiny-hidream", "llama_folder": str(bait)},
                          "NUL": {"model_folder": "a\0b"}, "long": {"model_folder": "m" * 5000}}.items():
        refusals[f"loader {name}"] = _refusal(comfy, _loader_prompt(**inputs_))
    for name, value in {"absolute": str(bait / "hidream_lokr" / "stolen_00001" / "checkpoint-4"),
                        "dot-dot": "../../../" + bait.name + "/hidream_lokr/stolen_00001/checkpoint-4"}.items():
        graph = load_graph("hidream_lokr_tiny_demo_api.json")
        graph[TRAIN]["inputs"]["resume_from_checkpoint"] = value
        refusals[f"resume {name}"] = _refusal(comfy, graph)
    for name, value in {"dot-dot": f"../../{bait.name}/run", "absolute": str(bait / "run"), "NUL": "a\0b",
                        "long": "r" * 5000}.items():
        graph = load_graph("hidream_lokr_tiny_demo_api.json")
        graph[TRAIN]["inputs"]["output_name"] = value
        graph["7"]["inputs"]["filename_prefix"] = value
        refusals[f"output {name}"] = _refusal(comfy, graph)

    for case, text in refusals.items():
        assert len(text) < 8000, (case, len(text))  # a 5000-character name is quoted shortened
        if case.startswith("dataset"):  # names the folder to use
            assert str(inputs) in text or "contains a NUL" in text or "characters long" in text, (case, text)
        elif case.startswith("loader"):
            assert "models/diffusers" in text, (case, text)
        elif case.startswith("resume"):
            assert "outside ComfyUI's output/hidream_lokr folder" in text, (case, text)
        else:
            assert "inside ComfyUI's output folder" in text, (case, text)
    assert "symbolic links that lead out (evil.png, evil.txt)" in refusals["dataset linked files"]

    new_events = comfy.audited()[audited_before:]
    assert new_events == [], f"the server touched the canary: {new_events[:10]}"
    assert _snapshot(bait) == files_before


def test_the_servers_owner_can_allow_any_path(pack, tmp_path, monkeypatch):
    """HIDREAM_LOKR_ALLOW_ANY_PATH=1 in ComfyUI's environment lifts the fence; nothing else does."""
    paths = importlib.import_module("hidream_lokr_pack.nodes.paths")
    config_error = importlib.import_module("hidream_lokr_pack.trainer_core.config").ConfigError
    _picture(tmp_path / "elsewhere", "a")
    monkeypatch.delenv(paths.ALLOW_ANY_PATH_ENV, raising=False)
    with pytest.raises(config_error, match="outside ComfyUI's input and datasets folders"):
        paths.image_folder(str(tmp_path / "elsewhere"))
    monkeypatch.setenv(paths.ALLOW_ANY_PATH_ENV, "1")
    assert paths.image_folder(str(tmp_path / "elsewhere")) == tmp_path / "elsewhere"
