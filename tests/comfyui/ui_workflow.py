"""API-format prompt <-> UI-format workflow (version 0.4) for this pack's example workflows.

The examples are written once as API prompts (tests/comfyui/workflows/*_api.json, what the tests submit); the UI
files in workflows/ are generated from them with the node definitions of a live server (`/object_info` gives the
widget order), so the two can never drift apart: test_comfyui_workflows.py checks that they describe the same graph.

The UI files are arranged for people (LAYOUTS): titled groups in the order of the work, a Markdown note per group
saying what to do, nodes sized to their content, `properties.models` (name, url, folder; taken from ComfyUI's own
HiDream-I1 template) on every loader, and a saved view at 100% that opens on the first group. Node heights for the
placement are the largest each node type has in the frontends this pack is tested on (1.32.9 and 1.58.1, classic
and Vue nodes; NODE_HEIGHTS); tests/browser/test_workflow_layout.py checks in a real browser that no two nodes
overlap and every title is readable.

    .cache/comfyui/venv/bin/python tests/comfyui/ui_workflow.py     # regenerate workflows/*.json, locales/en
    .cache/comfyui/venv/bin/python scripts/capture_screenshots.py   # then their thumbnails and the screenshots
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
PACK_PREFIX = "HiDreamLoKr"  # every node id of this pack starts with it
LOCALE = Path(__file__).resolve().parents[2] / "locales" / "en" / "main.json"  # the frontend's labels (input_labels)
WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"  # what Browse Templates lists
NOTE_TYPE = "MarkdownNote"  # the frontend's own note node (not a server node; ComfyUI's templates use it)
TRAIN_LAYOUT = 2  # nodes/train_settings.py TRAIN_LAYOUT
TITLE_HEIGHT = 30  # a node's title bar sits above its pos
GROUP_TITLE = 50  # room for a group's title above its first node title
GAP = 36  # between two nodes of a column, title bar included
COLUMN_GAP = 60
GROUP_GAP = 50
PAD = 20
# The first view: a workflow opens with its first groups (Group.first_view) fitted, at 100 % or less, into this box
# of a 1600 x 1000 window (CSS pixels: left, top, right, bottom), clear of the frontends' menus, the floating Run
# bar and the minimap in the bottom-right corner (1.32.9 and 1.58.1 draw it there by default).
SCREEN = (1600, 1000)
VIEW_BOX = (70, 100, 1330, 990)

# Content height (below the title) per node type: the largest of classic and Vue nodes on both frontends, with
# room for what a node shows after a run (the Train node's full live view, an image preview).
NODE_HEIGHTS = {
    "HiDreamLoKrLoadTransformerFile": 116, "QuadrupleCLIPLoader": 184, "VAELoader": 82,
    "HiDreamLoKrLoadDiffusers": 252, "HiDreamLoKrImageDataset": 388, "HiDreamLoKrCacheTextEmbeddings": 98,
    "HiDreamLoKrCacheLatents": 130, "HiDreamLoKrConfig": 342, "HiDreamLoKrTrain": 832,
    "HiDreamLoKrOptimizerSettings": 252, "HiDreamLoKrPreviewSettings": 150, "HiDreamLoKrCheckpointSettings": 116,
    "HiDreamLoKrAdvancedSettings": 354, "HiDreamLoKrSave": 94, "HiDreamLoKrSampler": 528, "PreviewImage": 300,
    "SaveImage": 300, "CLIPTextEncode": 120, "UNETLoader": 116, "LoraLoaderModelOnly": 116, "ModelSamplingSD3": 82,
    "EmptySD3LatentImage": 150, "KSampler": 324, "VAEDecode": 72,
}
# The size saved in the workflow (classic mode draws it; Vue nodes grow to their content).
# Vue nodes on 1.32.9 keep the saved width and put the pack's badge beside the title: the settings nodes' titles
# need 340 px; QuadrupleCLIPLoader shows its longest file name (Llama's) whole at 380.
NODE_WIDTHS = {"HiDreamLoKrTrain": 480, "HiDreamLoKrSampler": 340, "HiDreamLoKrImageDataset": 340,
               "HiDreamLoKrOptimizerSettings": 340, "HiDreamLoKrPreviewSettings": 340,
               "HiDreamLoKrCheckpointSettings": 340, "HiDreamLoKrAdvancedSettings": 340, "PreviewImage": 300,
               "SaveImage": 300, "KSampler": 320, "QuadrupleCLIPLoader": 380}
DEFAULT_WIDTH = 320

HF = "https://huggingface.co/Comfy-Org/HiDream-I1_ComfyUI/resolve/main/split_files"
# properties.models of each loader, as ComfyUI's template hidream_i1_full.json declares them.
MODELS = {
    "hidream_i1_full_fp8.safetensors": (f"{HF}/diffusion_models/hidream_i1_full_fp8.safetensors?download=true",
                                        "diffusion_models"),
    "clip_l_hidream.safetensors": (f"{HF}/text_encoders/clip_l_hidream.safetensors", "text_encoders"),
    "clip_g_hidream.safetensors": (f"{HF}/text_encoders/clip_g_hidream.safetensors", "text_encoders"),
    "t5xxl_fp8_e4m3fn_scaled.safetensors": (f"{HF}/text_encoders/t5xxl_fp8_e4m3fn_scaled.safetensors",
                                            "text_encoders"),
    "llama_3.1_8b_instruct_fp8_scaled.safetensors": (
        f"{HF}/text_encoders/llama_3.1_8b_instruct_fp8_scaled.safetensors", "text_encoders"),
    "ae.safetensors": (f"{HF}/vae/ae.safetensors?download=true", "vae"),
}
MODEL_INPUTS = {"unet_name", "clip_name1", "clip_name2", "clip_name3", "clip_name4", "vae_name"}


@dataclass
class Group:
    title: str
    note: str
    columns: list[list[str]]  # node ids, top to bottom, one list per column
    note_height: int = 0  # 0: estimated from the text
    note_title: str = "What to do"
    color: str = "#3f789e"
    below_previous: bool = False  # stack under the group before it instead of starting a new column of groups
    first_view: bool = False  # the saved view shows this group whole (VIEW_BOX)


MODEL_LINKS = ("[HiDream-I1 for ComfyUI on Hugging Face](https://huggingface.co/Comfy-Org/HiDream-I1_ComfyUI) "
               "(or [ModelScope](https://modelscope.cn/models/Comfy-Org/HiDream-I1_ComfyUI))")

TRAIN_NOTE = ("Press **Queue**. The Train node shows the loss, the newest preview (click it to enlarge) and "
              "**Sample now · Save now · Stop & save**.\n\nStopped, cancelled, failed or ComfyUI closed? **Queue "
              "again**: it continues from the last checkpoint. Set **resume from** to `start over` for a new run.")
SETTINGS_NOTE = ("Optional. Each settings node holds a part of the training's settings; left out, its defaults "
                 "apply (the values shown on a new node). Wire one into the matching socket of the Train node.")

# Browse Templates titles a pack's template with its file name and shows no other text of it (frontends 1.32.9 and
# 1.58.1; 1.32.9 repeats the name, "-" and "_" as spaces, as the description): the file name is the title.
# API twin (tests/comfyui/workflows/<twin>_api.json) -> workflows/<title>.json and its thumbnail <title>.jpg.
TEMPLATES = {
    "hidream_lokr_tiny_demo": "CPU demo - teach a new word",
    "hidream_lokr_train": "Train a HiDream-I1 LoKr",
    "hidream_lokr_sample_native": "Sample HiDream-I1 with a LoKr",
}

LAYOUTS: dict[str, list[Group]] = {
    "hidream_lokr_tiny_demo": [
        Group("1 · Load the model",
              "**A tiny HiDream that draws, for a first run.** `tiny-hidream` (pretrained on flat shapes in eight "
              "colours) is built into `models/diffusers/` the first time this runs (no download). The config "
              "below says which layers get a LoKr and its size.\n\n"
              f"For HiDream-I1 itself open the **{TEMPLATES['hidream_lokr_train']}** template.", [["1", "5"]],
              first_view=True),
        Group("2 · Your images",
              "`hidream_lokr_demo_zorb`: 8 captioned pictures of a *zorb*, a word the model has never seen (a "
              "pink ring), written into `input/` on first use and encoded **once** into "
              "`output/hidream_lokr/cache/`.\n\nYours: a folder under `input/` with a same-name `.txt` caption "
              "per image.", [["2", "3", "4"]], first_view=True),
        Group("3 · Train", "Press **Queue**: 400 steps, about 2 minutes on a CPU. The previews of *a zorb on a "
              "blue background* at steps 0 (the model does not know the word), 200 and 400 show the ring turn "
              "pink. Stopped, cancelled or closed? **Queue again**: it continues from the last checkpoint.",
              [["6"]], first_view=True),
        Group("3b · Training settings (optional)", SETTINGS_NOTE, [["10"], ["11", "12"], ["13"]],
              below_previous=True, color="#4a5f70"),
        Group("4 · Save and try the LoKr",
              "The LoKr goes to `output/loras/hidream_lokr/` (ComfyUI's LoRA loaders list it) and is sampled "
              "here in a place no training picture showed a zorb: yellow, at the bottom.", [["7", "8"], ["9"]]),
    ],
    "hidream_lokr_train": [
        Group("1 · Load the models",
              "**Put these files in ComfyUI's model folders** (the frontend lists the missing ones with a "
              "download link; queueing names every one):\n\n"
              "- `diffusion_models/` hidream_i1_full_fp8.safetensors (15.9 GB)\n"
              "- `text_encoders/` clip_l_hidream, clip_g_hidream, t5xxl_fp8_e4m3fn_scaled, "
              "llama_3.1_8b_instruct_fp8_scaled\n"
              "- `vae/` ae.safetensors\n\n" + MODEL_LINKS, [["note", "1", "2", "3"]], first_view=True),
        Group("2 · Your images",
              "Put your images in `input/my_lokr_dataset/`, each with a same-name `.txt` caption (or change "
              "**captions**). 1024 px is HiDream's resolution. ComfyUI's CLIP and VAE encode every caption and "
              "image **once** into `output/hidream_lokr/cache/`; the encoders can then be unloaded for training.",
              [["4", "5", "6"]], first_view=True),
        Group("3 · Train", TRAIN_NOTE, [["7"], ["8"]]),
        Group("3b · Training settings (optional)", SETTINGS_NOTE, [["14"], ["15", "16"], ["17"]],
              below_previous=True, color="#4a5f70"),
        Group("4 · Save and try the LoKr",
              "The LoKr goes to `output/loras/hidream_lokr/`; here it samples HiDream-I1 Full's way (shift 3.0, "
              "50 steps, CFG 5).", [["10", "11"], ["12"], ["9", "13"]]),
    ],
    "hidream_lokr_sample_native": [
        Group("1 · Load the models",
              "HiDream-I1 Full in ComfyUI's own loaders, as in ComfyUI's HiDream template:\n\n"
              "- `diffusion_models/` hidream_i1_full_fp8.safetensors\n"
              "- `text_encoders/` clip_l_hidream, clip_g_hidream, t5xxl_fp8_e4m3fn_scaled, "
              "llama_3.1_8b_instruct_fp8_scaled\n"
              "- `vae/` ae.safetensors\n\n" + MODEL_LINKS, [["note", "1", "2", "3"]], first_view=True),
        Group("2 · Your LoKr",
              "Pick a LoKr the Train node saved (`output/loras/hidream_lokr/...`); strength 1 is as trained.",
              [["4", "5"]], first_view=True),
        Group("3 · Prompt and image size", "The same text goes to all four text encoders.", [["6", "7", "8"]],
              first_view=True),
        Group("4 · Sample", "HiDream-I1 Full: uni_pc, simple, 50 steps, CFG 5.", [["9"], ["10", "11"]]),
    ],
}


def _is_widget(spec: list) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _inputs_in_order(info: dict) -> list[tuple[str, list]]:
    order = info.get("input_order", {})
    out = []
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        names = order.get(section, list(specs))
        out += [(name, specs[name]) for name in names]
    return out


def _classic_height(info: dict) -> int:
    """What LiteGraph's computeSize gives for a node of this definition (classic mode draws exactly this when the
    saved size is smaller): its socket rows, then its widgets."""
    specs = _inputs_in_order(info)
    sockets = sum(1 for _, spec in specs if not _is_widget(spec))
    rows = max(sockets, len(info["output"]), 1)
    multiline = widgets = 0
    for _, spec in specs:
        if _is_widget(spec):
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            multiline += bool(options.get("multiline"))
            widgets += 1 + bool(options.get("control_after_generate"))
    return 14 + 20 * rows + 24 * (widgets - multiline) + 54 * multiline


def _note_height(text: str, width: int) -> int:
    """Room for a note's text: rendered Markdown (larger in Vue nodes) at about 7 px a character."""
    chars_per_line = max(20, int((width - 30) / 6.4))
    lines = sum(max(1, -(-len(line) // chars_per_line)) for line in text.split("\n"))
    return max(100, 36 + 18 * lines)


def api_to_ui(api: dict, object_info: dict, name: str = "") -> dict:
    nodes, links = [], []
    socket_inputs: dict[str, list[str]] = {}
    for node_id, node in api.items():
        info = object_info[node["class_type"]]
        socket_inputs[node_id] = [n for n, spec in _inputs_in_order(info)
                                  if not _is_widget(spec) and n in node["inputs"]]
    for order, (node_id, node) in enumerate(api.items()):
        info = object_info[node["class_type"]]
        widgets = []
        for input_name, spec in _inputs_in_order(info):
            if _is_widget(spec) and input_name in node["inputs"] and not isinstance(node["inputs"][input_name], list):
                widgets.append(node["inputs"][input_name])
                if len(spec) > 1 and spec[1].get("control_after_generate"):
                    widgets.append("fixed")
        inputs = []
        for slot, input_name in enumerate(socket_inputs[node_id]):
            source, source_slot = node["inputs"][input_name]
            link_id = len(links) + 1
            links.append([link_id, int(source), source_slot, int(node_id), slot,
                          object_info[api[source]["class_type"]]["output"][source_slot]])
            spec = dict(_inputs_in_order(info))[input_name]
            inputs.append({"name": input_name, "type": spec[0], "link": link_id})
        properties = {"Node name for S&R": node["class_type"]}
        models = [{"name": v, "url": MODELS[v][0], "directory": MODELS[v][1]}
                  for k, v in node["inputs"].items() if k in MODEL_INPUTS and v in MODELS]
        if models:
            properties["models"] = models
        if node["class_type"] == "HiDreamLoKrTrain":
            properties["hidream_lokr_layout"] = TRAIN_LAYOUT
        width = NODE_WIDTHS.get(node["class_type"], DEFAULT_WIDTH)
        nodes.append({
            "id": int(node_id), "type": node["class_type"], "pos": [0, 0],
            "size": [width, _classic_height(info) + (76 if node["class_type"] == "HiDreamLoKrTrain" else 0)],
            "flags": {}, "order": order, "mode": 0, "inputs": inputs,
            "outputs": [{"name": n, "type": kind, "links": [], "slot_index": i}
                        for i, (n, kind) in enumerate(zip(info["output_name"], info["output"]))],
            "title": node.get("_meta", {}).get("title", info["display_name"]),
            "properties": properties, "widgets_values": widgets})
    by_id = {n["id"]: n for n in nodes}
    for link_id, source, slot, _, _, _ in links:
        by_id[source]["outputs"][slot]["links"].append(link_id)
    for node in nodes:
        for output in node["outputs"]:
            output["links"] = output["links"] or None
    layout = LAYOUTS.get(name, [])
    groups = arrange(nodes, layout)
    view = first_view([g for g, spec in zip(groups, layout) if spec.first_view] or groups[:1])
    return {"id": "00000000-0000-4000-8000-000000000000", "revision": 0,
            "last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links), "nodes": nodes,
            "links": links, "groups": groups, "config": {}, "extra": {"ds": view}, "version": 0.4}


def first_view(groups: list[dict]) -> dict:
    """The saved view (extra.ds): these groups at the top left of VIEW_BOX, as large as fits, at most 100 %."""
    if not groups:
        return {"scale": 1, "offset": [VIEW_BOX[0], VIEW_BOX[1]]}
    x0 = min(g["bounding"][0] for g in groups)
    y0 = min(g["bounding"][1] for g in groups)
    x1 = max(g["bounding"][0] + g["bounding"][2] for g in groups)
    y1 = max(g["bounding"][1] + g["bounding"][3] for g in groups)
    scale = min(1.0, (VIEW_BOX[2] - VIEW_BOX[0]) / (x1 - x0), (VIEW_BOX[3] - VIEW_BOX[1]) / (y1 - y0))
    scale = int(scale * 100) / 100  # a round zoom, rounded down so the groups still fit
    # The canvas is drawn at (x + offset) * scale: the groups' corner lands on VIEW_BOX's.
    return {"scale": scale, "offset": [VIEW_BOX[0] / scale - x0, VIEW_BOX[1] / scale - y0]}


def arrange(nodes: list[dict], layout: list[Group]) -> list[dict]:
    """Place the nodes group by group (left to right; a group `below_previous` under the one before it) and the
    group's Markdown note where its columns say "note" (default: on top of the first column); returns the groups.
    Nodes a layout does not name stay put."""
    by_id = {str(n["id"]): n for n in nodes}
    next_id = max(n["id"] for n in nodes) + 1
    groups = []
    column_right = 0
    for index, group in enumerate(layout):
        if group.below_previous and groups:
            previous = groups[-1]["bounding"]
            gx, gy = previous[0], previous[1] + previous[3] + GROUP_GAP
        else:
            gx, gy = (column_right + GROUP_GAP if groups else 0), 0
        columns = [list(c) for c in group.columns]
        if not any("note" in c for c in columns):
            columns[0].insert(0, "note")
        widths = [max([NODE_WIDTHS.get(by_id[i]["type"], DEFAULT_WIDTH) for i in column if i != "note"] or
                      [DEFAULT_WIDTH]) for column in columns]
        top = gy + GROUP_TITLE + TITLE_HEIGHT
        bottom, cx = top, gx + PAD
        for column, width in zip(columns, widths):
            cy = top
            for item in column:
                if item == "note":
                    height = group.note_height or _note_height(group.note, width)
                    nodes.append({"id": next_id, "type": NOTE_TYPE, "pos": [cx, cy], "size": [width, height],
                                  "flags": {}, "order": len(nodes), "mode": 0, "inputs": [], "outputs": [],
                                  "title": group.note_title, "properties": {}, "widgets_values": [group.note],
                                  "color": "#222", "bgcolor": "#000"})
                    next_id += 1
                else:
                    node = by_id[item]
                    node["pos"] = [cx, cy]
                    height = NODE_HEIGHTS.get(node["type"], node["size"][1] + 80)
                cy += height + GAP + TITLE_HEIGHT
                bottom = max(bottom, cy - GAP - TITLE_HEIGHT)
            cx += width + COLUMN_GAP
        inner_width = sum(widths) + COLUMN_GAP * (len(widths) - 1)
        bounding = [gx, gy, inner_width + 2 * PAD, bottom - gy + PAD]
        groups.append({"id": index + 1, "title": group.title, "bounding": bounding, "color": group.color,
                       "font_size": 24, "flags": {}})
        right = bounding[0] + bounding[2]
        column_right = max(column_right, right) if group.below_previous else right
    return groups


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """The inverse, for the consistency test: UI workflow -> {id: {class_type, inputs}} (notes are not nodes of
    the server: they are left out, as the frontend leaves them out of the prompt)."""
    links = {l[0]: l for l in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node["type"] == NOTE_TYPE:
            continue
        info = object_info[node["type"]]
        values = list(node["widgets_values"])
        inputs = {}
        for name, spec in _inputs_in_order(info):
            linked = [i for i in node["inputs"] if i["name"] == name and i.get("link") is not None]
            if linked:
                link = links[linked[0]["link"]]
                inputs[name] = [str(link[1]), link[2]]
            elif _is_widget(spec) and values:
                inputs[name] = values.pop(0)
                if len(spec) > 1 and spec[1].get("control_after_generate"):
                    values.pop(0)
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def template_path(twin: str, suffix: str = ".json") -> Path:
    """workflows/<title>.json (or its thumbnail, suffix ".jpg") of an API twin's name."""
    return WORKFLOWS / f"{TEMPLATES[twin]}{suffix}"


def input_labels(object_info: dict) -> dict:
    """locales/en/main.json: the short label (`display_name`) of every input of this pack's nodes that has one.

    Frontend 1.32.9 labels a widget from the frontend's translations only (nodeDefs.<node>.inputs.<input>.name;
    it ignores an input's display_name) and 1.5x lets a pack's translations win over it, so the labels reach both
    frontends, in classic and Vue nodes, through this file; the node definitions stay the one place they are
    written (test_comfyui_pack.py keeps the two in step)."""
    defs = {}
    for node, info in sorted(object_info.items()):
        if not node.startswith(PACK_PREFIX):
            continue
        labels = {name: {"name": spec[1]["display_name"]} for name, spec in _inputs_in_order(info)
                  if len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("display_name")
                  and spec[1]["display_name"] != name}
        if labels:
            defs[node] = {"inputs": labels}
    return {"nodeDefs": defs}


def main() -> None:
    from comfy_server import REPO, ComfyServer, comfyui_dir
    import tempfile

    with tempfile.TemporaryDirectory() as base:
        server = ComfyServer(Path(base), comfyui_dir()).start()
        try:
            info = server.get("/object_info")
            for api_file in sorted((Path(__file__).parent / "workflows").glob("*_api.json")):
                name = api_file.name.removesuffix("_api.json")
                ui = api_to_ui(json.loads(api_file.read_text()), info, name)
                template_path(name).write_text(json.dumps(ui, indent=1) + "\n")
                print("wrote", template_path(name).relative_to(REPO))
            LOCALE.parent.mkdir(parents=True, exist_ok=True)
            LOCALE.write_text(json.dumps(input_labels(info), indent=1) + "\n")
            print("wrote", LOCALE.relative_to(REPO))
        finally:
            server.stop()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
