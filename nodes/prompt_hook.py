"""What this pack checks when a prompt that uses its nodes is queued, before ComfyUI validates or runs anything.

1. Every model file the prompt names is there. ComfyUI 0.3.75 checks the file lists of V1 loaders (UNETLoader,
   VAELoader) when a prompt is queued, but not of V3 ones (QuadrupleCLIPLoader, this pack's transformer loader):
   those fail only when they execute, after the other loaders have spent minutes loading, one missing file at a
   time. Here every loader of the prompt is checked at once; when files are missing the prompt is refused with one
   error that lists each file, the folder it belongs in and, when the workflow declares it (`properties.models`,
   as ComfyUI's own templates do), where to download it. Each loader with a missing file is marked in the graph.
2. API prompts written for the Train node's first layout (every setting on the node) keep their values: the
   settings that moved to the settings nodes are handed to settings nodes added to the prompt.

Prompts without this pack's nodes are left exactly as they are.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from .compat import io
from .train_settings import GROUPS, group_of
from .types import CATEGORY

logger = logging.getLogger(__name__)

PACK_PREFIX = "HiDreamLoKr"
MISSING_NODE = "HiDreamLoKrMissingModelFiles"
TRAIN_NODE = "HiDreamLoKrTrain"

# Which inputs of which loaders name a model file, and the models folder each belongs in.
MODEL_INPUTS: dict[str, dict[str, str]] = {
    "UNETLoader": {"unet_name": "diffusion_models"},
    "HiDreamLoKrLoadTransformerFile": {"unet_name": "diffusion_models"},
    "CheckpointLoaderSimple": {"ckpt_name": "checkpoints"},
    "VAELoader": {"vae_name": "vae"},
    "CLIPLoader": {"clip_name": "text_encoders"},
    "DualCLIPLoader": {f"clip_name{i}": "text_encoders" for i in (1, 2)},
    "TripleCLIPLoader": {f"clip_name{i}": "text_encoders" for i in (1, 2, 3)},
    "QuadrupleCLIPLoader": {f"clip_name{i}": "text_encoders" for i in (1, 2, 3, 4)},
    "LoraLoaderModelOnly": {"lora_name": "loras"},
    "LoraLoader": {"lora_name": "loras"},
    "HiDreamLoKrLoad": {"lora_name": "loras"},
}
DIFFUSERS_LOADER = "HiDreamLoKrLoadDiffusers"


def _declared_models(body: dict) -> dict[str, dict]:
    """file name -> {url, directory} from the workflow's `properties.models` (the UI sends the workflow along)."""
    workflow = ((body.get("extra_data") or {}).get("extra_pnginfo") or {}).get("workflow") or {}
    declared = {}
    for node in workflow.get("nodes", []) if isinstance(workflow, dict) else []:
        for model in ((node or {}).get("properties") or {}).get("models") or []:
            if isinstance(model, dict) and model.get("name"):
                declared[model["name"]] = model
    return declared


def _folder_for_people(folder_name: str) -> str:
    import folder_paths

    paths = folder_paths.get_folder_paths(folder_name)
    exact = [p for p in paths if Path(p).name == folder_name]  # diffusion_models lists models/unet first
    shown = (exact or paths or [None])[0]
    return f"models/{folder_name}" + (f" ({shown})" if shown else "")


def _available(folder_name: str, name: str, class_type: str, input_name: str) -> bool:
    """In the models folder, or one of the loader's own choices that are no file (VAELoader's taesd, ...)."""
    import folder_paths
    import nodes

    if folder_paths.get_full_path(folder_name, name) is not None:
        return True
    node_class = nodes.NODE_CLASS_MAPPINGS.get(class_type)
    try:
        spec = node_class.INPUT_TYPES().get("required", {}).get(input_name) if node_class else None
    except Exception:  # noqa: BLE001 - a broken third-party node must not break this check
        return False
    if not spec:
        return False
    options = spec[0] if isinstance(spec[0], list) else (spec[1] if len(spec) > 1 else {}).get("options") or []
    return name in options


def missing_model_files(prompt: dict, declared: Optional[dict] = None) -> dict[str, list[dict]]:
    """node id -> [{input, name, folder, url}] for every model file the prompt names that is not installed."""
    from .paths import TINY_MODEL_NAME, diffusers_folder
    from ..trainer_core.config import ConfigError

    declared = declared or {}
    missing: dict[str, list[dict]] = {}
    for node_id, node in prompt.items():
        class_type = (node or {}).get("class_type")
        inputs = (node or {}).get("inputs") or {}
        for input_name, folder_name in MODEL_INPUTS.get(class_type, {}).items():
            name = inputs.get(input_name)
            if not isinstance(name, str) or not name or _available(folder_name, name, class_type, input_name):
                continue
            meta = declared.get(name) or {}
            missing.setdefault(node_id, []).append(
                {"input": input_name, "name": name, "folder": meta.get("directory") or folder_name,
                 "url": meta.get("url", "")})
        if class_type == DIFFUSERS_LOADER:
            for input_name in ("model_folder", "llama_folder"):
                name = inputs.get(input_name)
                if not isinstance(name, str) or not name.strip() or name.strip() == TINY_MODEL_NAME:
                    continue
                try:
                    found = diffusers_folder(name).is_dir()
                except ConfigError:
                    found = False
                if not found:  # or refused: a path outside ComfyUI's models folders is never looked at
                    missing.setdefault(node_id, []).append(
                        {"input": input_name, "name": name if len(name) <= 80 else name[:80] + "...",
                         "folder": "diffusers", "url": ""})
    return missing


def describe_missing(files: list[dict]) -> str:
    parts = []
    for f in files:
        where = _folder_for_people(f["folder"])
        line = f"{f['name']} -> put it in {where}"
        if f["folder"] == "diffusers":
            line = f"{f['name']} -> a HiDream-I1 diffusers folder under {where} (its folder name)"
        if f.get("url"):
            line += f"; download: {f['url']}"
        parts.append(line)
    return "; ".join(parts)


def check_models(body: dict) -> dict:
    """The prompt hook: refuse a prompt of this pack whose model files are missing, with every file in one list."""
    prompt = body.get("prompt")
    if not isinstance(prompt, dict) or not any(str((n or {}).get("class_type", "")).startswith(PACK_PREFIX)
                                               for n in prompt.values()):
        return body
    missing = missing_model_files(prompt, _declared_models(body))
    if not missing:
        return body
    total = sum(len(v) for v in missing.values())
    logger.error("HiDream LoKr: this workflow needs %d model file(s) that are not installed: %s", total,
                 "; ".join(describe_missing(files) for files in missing.values()))
    # Only the check nodes remain, each under the id of a loader that lacks files: ComfyUI's validation then
    # fails on all of them together, before anything runs, and the frontend marks those loaders.
    body = dict(body)
    body["prompt"] = {node_id: {"class_type": MISSING_NODE,
                                "inputs": {"model_files": json.dumps({"class_type": prompt[node_id]["class_type"],
                                                                      "files": files})},
                                "_meta": prompt[node_id].get("_meta", {})}
                      for node_id, files in missing.items()}
    return body


def upgrade_legacy_train_inputs(body: dict) -> dict:
    """API prompts for the first Train node layout: settings that moved to settings nodes become those nodes (the
    settings the old prompt left out keep their defaults, as they did then)."""
    from .train_settings import ALL_SETTINGS, DEFAULTS, RESUME_AUTO, RESUME_FIELD

    prompt = body.get("prompt")
    if not isinstance(prompt, dict):
        return body
    for node_id, node in list(prompt.items()):
        if (node or {}).get("class_type") != TRAIN_NODE:
            continue
        inputs = node.get("inputs") or {}
        moved_ids = {s.id for g in GROUPS for s in g.settings}
        if not moved_ids & set(inputs):
            continue  # today's layout
        for group in GROUPS:
            moved = {s.id: inputs.pop(s.id, DEFAULTS[s.id]) for s in group.settings}
            if group.socket not in inputs:
                settings_id = f"{node_id}:{group.socket}"
                prompt[settings_id] = {"class_type": group.node_id, "inputs": moved,
                                       "_meta": {"title": f"{group.display_name} (from the Train node's inputs)"}}
                inputs[group.socket] = [settings_id, 0]
        for setting_id in ALL_SETTINGS:
            if group_of(setting_id) is None and setting_id not in inputs:
                inputs[setting_id] = DEFAULTS[setting_id]
        if inputs.get(RESUME_FIELD) in ("", None):
            inputs[RESUME_FIELD] = RESUME_AUTO  # the old text box's "" (no explicit checkpoint)
        logger.info("HiDream LoKr: node %s uses the Train node's first layout; its settings went to settings "
                    "nodes for this prompt", node_id)
    return body


def on_prompt(body: dict) -> dict:
    if not isinstance(body, dict):
        return body
    return check_models(upgrade_legacy_train_inputs(body))


class MissingModelFiles(io.ComfyNode):
    """Stands in, in a refused prompt, for a loader whose model files are missing (see check_models)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=MISSING_NODE, display_name="HiDream LoKr: missing model files", category=f"{CATEGORY}/internal",
            description="Used by the pack's check of queued prompts: reports a loader's missing model files. Not "
                        "meant to be added to a graph.",
            inputs=[io.String.Input("model_files", tooltip="The missing files (JSON)")],
            outputs=[], is_output_node=True, is_deprecated=True)

    @classmethod
    def validate_inputs(cls, model_files: str) -> bool | str:
        try:
            report = json.loads(model_files)
            files, class_type = report["files"], report["class_type"]
        except (ValueError, KeyError, TypeError):
            return "not a model file report"
        return (f"{class_type} needs {len(files)} model file{'s' if len(files) != 1 else ''} that "
                f"{'are' if len(files) != 1 else 'is'} not installed: {describe_missing(files)}")

    @classmethod
    def execute(cls, model_files: str) -> io.NodeOutput:
        raise RuntimeError(cls.validate_inputs(model_files))


def install() -> bool:
    from .compat import add_prompt_handler

    return add_prompt_handler(on_prompt)
