"""The pack inside a real ComfyUI 0.3.75: it imports, registers every node with tooltips and descriptions."""
from __future__ import annotations

import json
from urllib.parse import quote

NODES = {
    "HiDreamLoKrLoadDiffusers", "HiDreamLoKrLoadTransformerFile", "HiDreamLoKrImageDataset", "HiDreamLoKrCombineDatasets",
    "HiDreamLoKrDatasetFromImages", "HiDreamLoKrCacheTextEmbeddings", "HiDreamLoKrCacheLatents", "HiDreamLoKrConfig",
    "HiDreamLoKrTrain", "HiDreamLoKrSampler", "HiDreamLoKrApplyToModel", "HiDreamLoKrSave", "HiDreamLoKrLoad",
    "HiDreamLoKrOptimizerSettings", "HiDreamLoKrPreviewSettings", "HiDreamLoKrCheckpointSettings",
    "HiDreamLoKrAdvancedSettings", "HiDreamLoKrMissingModelFiles",
}
# The Train node before the settings nodes had 28 widgets; every one is still a setting, on the node or on one of
# the settings nodes, with TrainConfig's default (SimpleTuner's where it has one: since then lr_warmup_steps 0, not
# 100; gradient_checkpointing off, a step that runs out of memory being retried with it on).
FIRST_LAYOUT_DEFAULTS = {
    "max_train_steps": 1000, "learning_rate": 1e-4, "optimizer": "adamw", "lr_scheduler": "constant_with_warmup",
    "lr_warmup_steps": 0, "train_batch_size": 1, "gradient_accumulation_steps": 1, "gradient_checkpointing": False,
    "mixed_precision": "bf16", "flow_schedule_shift": 3.0, "flow_schedule_auto_shift": False,
    "hidream_use_load_balancing_loss": False, "hidream_load_balancing_loss_weight": 0.01,
    "caption_dropout_probability": 0.0, "seed": 42, "output_name": "hidream_lokr", "validation_prompt": "",
    "validation_negative_prompt": "", "validation_step_interval": 100, "validation_resolution": 1024,
    "validation_num_inference_steps": 20, "validation_guidance": 3.0, "use_ema": False, "ema_decay": 0.995,
    "checkpoint_step_interval": 500, "checkpoints_total_limit": 5, "offload_blocks": False,
}


def test_pack_imports_without_errors(comfy):
    log = comfy.log()
    assert "ComfyUI-HiDream-LoKr" in log
    pack_lines = [line for line in log.splitlines() if "ComfyUI-HiDream-LoKr" in line]
    assert not any("IMPORT FAILED" in line for line in pack_lines), "\n".join(pack_lines)
    assert "Cannot import" not in "\n".join(pack_lines)


def test_every_node_is_registered_with_description_and_tooltips(comfy):
    info = comfy.get("/object_info")
    ours = {name for name in info if name.startswith("HiDreamLoKr")}
    assert ours == NODES
    for name in NODES:
        node = info[name]
        assert node["category"].startswith("HiDream LoKr"), name
        assert len(node["description"]) > 40, name
        for section in ("required", "optional"):
            for input_name, spec in node["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 else {}
                assert options.get("tooltip"), f"{name}.{input_name} has no tooltip"
    train = info["HiDreamLoKrTrain"]["input"]["required"]
    assert train["hidream_model"][0] == "HIDREAM_MODEL" and train["lokr_config"][0] == "HIDREAM_LOKR_CONFIG"
    widgets = [n for n, spec in train.items() if not spec[0].startswith("HIDREAM")]
    assert len(widgets) <= 8, widgets  # the essentials; the rest is on the settings nodes
    # appended outputs only (saved links keep their slots); the last two are ComfyUI's own training types
    assert info["HiDreamLoKrTrain"]["output"] == ["HIDREAM_LOKR", "IMAGE", "IMAGE", "LORA_MODEL", "LOSS_MAP"]
    assert info["HiDreamLoKrLoad"]["output"] == ["HIDREAM_LOKR", "LORA_MODEL"]
    assert info["HiDreamLoKrSampler"]["output"] == ["LATENT", "IMAGE"]
    assert info["HiDreamLoKrApplyToModel"]["output"] == ["MODEL"]


def test_example_workflows_are_listed_as_templates(comfy):
    from ui_workflow import TEMPLATES

    templates = comfy.get("/api/workflow_templates")
    assert set(templates["ComfyUI-HiDream-LoKr"]) == set(TEMPLATES.values())
    for title in TEMPLATES.values():  # a title as a file name: served under it, spaces and all
        assert comfy.get(f"/api/workflow_templates/ComfyUI-HiDream-LoKr/{quote(title)}.json")["nodes"]


def test_the_frontend_labels_are_the_node_definitions_display_names(comfy):
    """locales/en/main.json (what frontend 1.32.9 labels widgets with) says what the nodes' display_name says."""
    from ui_workflow import LOCALE, input_labels

    info = comfy.get("/object_info")
    assert json.loads(LOCALE.read_text()) == input_labels(info), "regenerate with tests/comfyui/ui_workflow.py"
    train = input_labels(info)["nodeDefs"]["HiDreamLoKrTrain"]["inputs"]
    assert train["max_train_steps"] == {"name": "train steps"}
    served = comfy.get("/i18n")["en"]["nodeDefs"]["HiDreamLoKrTrain"]["inputs"]  # ComfyUI serves it to the page
    assert served == train


def test_every_setting_of_the_first_train_layout_keeps_its_default(comfy):
    """Essentials on the Train node, the rest on the four settings nodes wired into its optional sockets."""
    info = comfy.get("/object_info")
    found = {}
    train = info["HiDreamLoKrTrain"]["input"]
    for name, spec in {**train["required"], **train.get("optional", {})}.items():
        if len(spec) > 1 and "default" in spec[1]:
            found[name] = spec[1]["default"]
    sockets = {spec[0]: name for name, spec in train.get("optional", {}).items() if spec[0].endswith("_SETTINGS")}
    assert set(sockets.values()) == {"optimizer_settings", "preview_settings", "checkpoint_settings",
                                     "advanced_settings"}
    for node in ("HiDreamLoKrOptimizerSettings", "HiDreamLoKrPreviewSettings", "HiDreamLoKrCheckpointSettings",
                 "HiDreamLoKrAdvancedSettings"):
        assert info[node]["output"][0] in sockets  # each plugs into its own socket
        for name, spec in info[node]["input"]["required"].items():
            assert name not in found, f"{name} is on two nodes"
            found[name] = spec[1]["default"]
    assert {k: found.get(k) for k in FIRST_LAYOUT_DEFAULTS} == FIRST_LAYOUT_DEFAULTS
    assert found["resume_from_checkpoint"] == "auto"
    assert train["required"]["resume_from_checkpoint"][1]["options"][:3] == ["auto", "start over", "latest"]


def test_pack_start_up_is_light(comfy):
    """ComfyUI times every pack's import; this one imports no diffusers, transformers or LyCORIS until a node runs."""
    import re

    (line,) = [l for l in comfy.log().splitlines() if re.search(r"seconds.*ComfyUI-HiDream-LoKr", l)]
    seconds = float(line.split("seconds")[0].split()[-1])
    print(f"\npack import time as ComfyUI reports it: {seconds:.1f} s")
    assert seconds < 0.5, line


def test_every_node_has_a_help_page_the_frontend_can_fetch(comfy):
    """web/docs/<node id>.md for every node, its generated inputs/outputs part as the running node defines them,
    served where the frontend's node documentation panel asks for a custom node's help."""
    import requests

    from comfy_server import PACK_LINK_NAME
    from node_docs import DOCS, MARKER, generated_part

    info = comfy.get("/object_info")
    for name in NODES:
        page = (DOCS / f"{name}.md").read_text(encoding="utf-8")
        written, generated = page.split(MARKER)
        assert written.startswith(f"# {info[name]['display_name']}\n") and len(written) > 200, name
        assert MARKER + generated == generated_part(info[name]), \
            f"{name}'s help page is stale: run tests/comfyui/node_docs.py"
        served = requests.get(f"{comfy.url}/extensions/{PACK_LINK_NAME}/docs/{name}.md", timeout=30)
        assert served.ok and served.text == page, name


def test_comfyuis_own_reader_of_pyproject_sees_the_pack(comfy_modules):
    """ComfyUI reads a pack's pyproject.toml when it loads it (for [tool.comfy] web): the file parses, names the
    pack and registers no second web folder."""
    from comfy_config import config_parser

    from comfy_server import REPO

    config = config_parser.extract_node_configuration(str(REPO))
    assert config.project.name == "hidream-lokr" and not config.tool_comfy.web
