"""API-format prompt <-> UI-format workflow (version 0.4) for this pack's example workflows.

The examples are written once as API prompts (tests/comfyui/workflows/*_api.json, what the tests submit); the UI
files in workflows/ are generated from them with the node definitions of a live server (`/object_info` gives the
widget order), so the two can never drift apart: test_comfyui_workflows.py checks that they describe the same graph.

    .cache/comfyui/venv/bin/python tests/comfyui/ui_workflow.py     # regenerate workflows/*.json and thumbnails
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
COLUMN_WIDTH, ROW_HEIGHT = 380, 420


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


def _columns(api: dict) -> dict[str, int]:
    """Column of each node = length of its longest chain of inputs (a left-to-right layout)."""
    depth: dict[str, int] = {}

    def visit(node_id: str) -> int:
        if node_id not in depth:
            sources = [v[0] for v in api[node_id]["inputs"].values() if isinstance(v, list)]
            depth[node_id] = 1 + max((visit(s) for s in sources), default=-1)
        return depth[node_id]

    for node_id in api:
        visit(node_id)
    return depth


def api_to_ui(api: dict, object_info: dict) -> dict:
    columns = _columns(api)
    rows: dict[int, int] = {}
    nodes, links = [], []
    socket_inputs: dict[str, list[str]] = {}
    for node_id, node in api.items():
        info = object_info[node["class_type"]]
        socket_inputs[node_id] = [name for name, spec in _inputs_in_order(info)
                                  if not _is_widget(spec) and name in node["inputs"]]
    for order, (node_id, node) in enumerate(sorted(api.items(), key=lambda kv: (columns[kv[0]], int(kv[0])))):
        info = object_info[node["class_type"]]
        widgets = []
        for name, spec in _inputs_in_order(info):
            if _is_widget(spec) and name in node["inputs"] and not isinstance(node["inputs"][name], list):
                widgets.append(node["inputs"][name])
                if len(spec) > 1 and spec[1].get("control_after_generate"):
                    widgets.append("fixed")
        inputs = []
        for slot, name in enumerate(socket_inputs[node_id]):
            source, source_slot = node["inputs"][name]
            link_id = len(links) + 1
            links.append([link_id, int(source), source_slot, int(node_id), slot,
                          object_info[api[source]["class_type"]]["output"][source_slot]])
            spec = dict(_inputs_in_order(info))[name]
            inputs.append({"name": name, "type": spec[0], "link": link_id})
        column = columns[node_id]
        row = rows.get(column, 0)
        rows[column] = row + 1
        nodes.append({
            "id": int(node_id), "type": node["class_type"], "pos": [40 + column * COLUMN_WIDTH, 40 + row * ROW_HEIGHT],
            "size": [340, 120 + 26 * len(widgets)], "flags": {}, "order": order, "mode": 0, "inputs": inputs,
            "outputs": [{"name": name, "type": kind, "links": [], "slot_index": i}
                        for i, (name, kind) in enumerate(zip(info["output_name"], info["output"]))],
            "title": node.get("_meta", {}).get("title", info["display_name"]),
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets})
    by_id = {n["id"]: n for n in nodes}
    for link_id, source, slot, _, _, _ in links:
        by_id[source]["outputs"][slot]["links"].append(link_id)
    for node in nodes:
        for output in node["outputs"]:
            output["links"] = output["links"] or None
    return {"id": "00000000-0000-4000-8000-000000000000", "revision": 0,
            "last_node_id": max(by_id), "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """The inverse, for the consistency test: UI workflow -> {id: {class_type, inputs}}."""
    links = {l[0]: l for l in ui["links"]}
    api = {}
    for node in ui["nodes"]:
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


def graph_thumbnail(ui: dict, size=(640, 400)):
    """A schematic picture of the workflow (boxes and wires), for workflows whose outputs need real weights."""
    from PIL import Image, ImageDraw

    xs = [n["pos"][0] for n in ui["nodes"]]
    ys = [n["pos"][1] for n in ui["nodes"]]
    span_x, span_y = max(xs) - min(xs) + 360, max(ys) - min(ys) + 200
    scale = min((size[0] - 20) / span_x, (size[1] - 20) / span_y)
    image = Image.new("RGB", size, (32, 34, 40))
    draw = ImageDraw.Draw(image)
    box = {}
    for n in ui["nodes"]:
        x0 = 10 + (n["pos"][0] - min(xs)) * scale
        y0 = 10 + (n["pos"][1] - min(ys)) * scale
        box[n["id"]] = (x0, y0, x0 + 320 * scale, y0 + 150 * scale)
    for _, source, _, target, _, _ in ui["links"]:
        a, b = box[source], box[target]
        draw.line([(a[2], (a[1] + a[3]) / 2), (b[0], (b[1] + b[3]) / 2)], fill=(140, 170, 220), width=2)
    for n in ui["nodes"]:
        ours = n["type"].startswith("HiDreamLoKr")
        draw.rectangle(box[n["id"]], fill=(70, 60, 110) if ours else (60, 64, 72), outline=(200, 200, 210))
        draw.text((box[n["id"]][0] + 4, box[n["id"]][1] + 4), n["title"][:26], fill=(235, 235, 240))
    return image


def demo_thumbnail(run_dir: Path, size=(640, 400)):
    """The tiny demo's real outputs: its previews (step 0, middle, end) above its loss curve."""
    from PIL import Image

    image = Image.new("RGB", size, (32, 34, 40))
    previews = sorted((run_dir / "validation").glob("step_*/grid.png"))
    side = min(150, (size[0] - 20) // max(1, len(previews)) - 10)
    for i, path in enumerate(previews):
        image.paste(Image.open(path).convert("RGB").resize((side, side), Image.NEAREST), (10 + i * (side + 10), 10))
    curve = Image.open(run_dir / "loss_curve.png").convert("RGB")
    curve.thumbnail((size[0] - 20, size[1] - side - 30))
    image.paste(curve, (10, side + 20))
    return image


def main() -> None:
    from comfy_server import REPO, ComfyServer, comfyui_dir
    import tempfile

    with tempfile.TemporaryDirectory() as base:
        server = ComfyServer(Path(base), comfyui_dir()).start()
        try:
            info = server.get("/object_info")
            for api_file in sorted((Path(__file__).parent / "workflows").glob("*_api.json")):
                name = api_file.name.removesuffix("_api.json")
                ui = api_to_ui(json.loads(api_file.read_text()), info)
                (REPO / "workflows" / f"{name}.json").write_text(json.dumps(ui, indent=1) + "\n")
                thumbnail = REPO / "workflows" / f"{name}.jpg"
                if name == "hidream_lokr_tiny_demo":
                    server.wait(server.submit(json.loads(api_file.read_text())))
                    (run_dir,) = (server.output_dir() / "hidream_lokr").glob("tiny_demo_*")
                    demo_thumbnail(run_dir).save(thumbnail, quality=88)
                else:
                    graph_thumbnail(ui).save(thumbnail, quality=88)
                print("wrote", name)
        finally:
            server.stop()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
