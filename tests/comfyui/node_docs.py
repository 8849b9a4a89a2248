"""The nodes' help pages (web/docs/<node id>.md), shown by the frontend's node documentation panel.

ComfyUI's frontend (1.32.9 and 1.58.1 alike) fetches `/extensions/<pack folder>/docs/<node id>/<locale>.md`, then
`.../docs/<node id>.md`, for a custom node's help; WEB_DIRECTORY (web/) serves both. Each page is a hand-written
part (what the node is for, where it goes in a graph, what to watch for) above a generated part: the inputs and
outputs with their types, defaults and tooltips, taken from the node's definition as a live server reports it
(`/object_info`), so the page never disagrees with the node. tests/comfyui/test_comfyui_pack.py checks that every
node has a page and that its generated part is current.

    .cache/comfyui/venv/bin/python tests/comfyui/node_docs.py     # regenerate the generated parts
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "web" / "docs"
MARKER = ("<!-- Below: generated from the node's definition by tests/comfyui/node_docs.py (edit the node, then run "
          "it). -->")
FILE_LISTS = {"unet_name", "lora_name", "resume_from_checkpoint"}  # options differ per machine: not listed


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def generated_part(info: dict) -> str:
    """The inputs and outputs of one node definition (an /object_info entry) as Markdown tables."""
    rows = []
    for section in ("required", "optional"):
        for name in info.get("input_order", {}).get(section, []):
            kind, options = (info["input"][section][name] + [{}])[:2]
            kind = "COMBO" if isinstance(kind, list) else kind
            default = options.get("default", "")
            default = "" if name in FILE_LISTS and kind == "COMBO" else default
            if kind == "COMBO" and name not in FILE_LISTS and options.get("options"):
                kind = "one of " + ", ".join(f"`{o}`" for o in options["options"])
            shown = f"`{default}`" if default not in ("", None) else ""
            optional = " (optional)" if section == "optional" else ""
            rows.append(f"| `{name}`{optional} | {_cell(kind)} | {_cell(shown)} | {_cell(options.get('tooltip', ''))} |")
    lines = [MARKER, "", "## Inputs", ""]
    lines += ["| input | type | default | what it is |", "|---|---|---|---|", *rows] if rows else ["None."]
    outputs = list(zip(info.get("output_name", []), info.get("output", []), info.get("output_tooltips", [])))
    lines += ["", "## Outputs", ""]
    if outputs:
        lines += ["| output | type | what it is |", "|---|---|---|"]
        lines += [f"| `{name}` | {_cell(kind)} | {_cell(tip or '')} |" for name, kind, tip in outputs]
    else:
        lines.append("None: an output node.")
    return "\n".join(lines) + "\n"


def hand_written(node_id: str) -> str:
    """The page's hand-written part (everything above the marker)."""
    path = DOCS / f"{node_id}.md"
    text = path.read_text(encoding="utf-8") if path.is_file() else f"# {node_id}\n\n"
    return text.split(MARKER)[0].rstrip() + "\n\n"


def write_pages(object_info: dict) -> list[Path]:
    DOCS.mkdir(parents=True, exist_ok=True)
    written = []
    for node_id, info in sorted(object_info.items()):
        if not node_id.startswith("HiDreamLoKr"):
            continue
        path = DOCS / f"{node_id}.md"
        path.write_text(hand_written(node_id) + generated_part(info), encoding="utf-8")
        written.append(path)
    return written


def main() -> None:
    import tempfile

    from comfy_server import ComfyServer, comfyui_dir

    server = ComfyServer(Path(tempfile.mkdtemp(prefix="node-docs-")), comfyui_dir()).start()
    try:
        for path in write_pages(server.get("/object_info")):
            print(path.relative_to(REPO))
    finally:
        server.stop()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
