"""The example workflows as a person opens them, and the Train node's size: real ComfyUI, headless Chromium, both
frontends, classic canvas and Vue nodes.

- Every template opens at 100 % on its first group, every node of that group readable (its title not under a menu,
  a panel or another node); every other group, brought into view, fits the screen the same way; no two nodes
  overlap; every node sits in a titled group with a Markdown note; every loader declares its model files.
- The Train node: under 700 px tall before a run and under 1000 px with the live view, at least its minimum width
  even when a workflow saved it narrower and stretched (except on 1.32.9's early Vue nodes, which keep a saved
  size as it is: there the node is measured as the pack's template saves it).
- A workflow saved with the Train node's first layout (every setting on the node) loads with its values.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from browser_page import REPO, ComfyPage

TEMPLATES = ["hidream_lokr_tiny_demo", "hidream_lokr_train", "hidream_lokr_sample_native"]
SCREEN = (1920, 1080)
MIN_WIDTH = 480
LOADERS = {"HiDreamLoKrLoadTransformerFile", "QuadrupleCLIPLoader", "VAELoader", "UNETLoader"}
FIRST_LAYOUT = Path(__file__).parent / "fixtures" / "tiny_demo_first_layout.json"


def _open(browser, server, version, vue: bool) -> ComfyPage:
    page = ComfyPage(browser, server.url, viewport=SCREEN)
    page.open()
    assert page.frontend_version() == version
    page.set_vue_nodes(vue)
    return page


def _overlaps(a, b, slack=1.0) -> bool:
    return (a[0] + slack < b[0] + b[2] and b[0] + slack < a[0] + a[2] and
            a[1] + slack < b[1] + b[3] and b[1] + slack < a[1] + a[3])


def _inside(box, outer, slack=2.0) -> bool:
    return (box[0] >= outer[0] - slack and box[1] >= outer[1] - slack and
            box[0] + box[2] <= outer[0] + outer[2] + slack and box[1] + box[3] <= outer[1] + outer[3] + slack)


def _group_of(node, groups):
    return next((g for g in groups if _inside(node["box"], g["box"])), None)


@pytest.mark.parametrize("vue", [False, True], ids=["classic", "vue"])
def test_templates_open_readable_at_100_percent(comfy_ui, browser, artifacts, vue):
    server, version = comfy_ui
    mode = "vue" if vue else "classic"
    page = _open(browser, server, version, vue)
    try:
        for name in TEMPLATES:
            data = page.load_template(name)
            assert {g["title"][:1] for g in data["groups"]} >= {"1", "2", "3"}, name
            for node in data["nodes"]:
                if node["type"] in LOADERS:
                    models = node["properties"].get("models") or []
                    assert models and all(m["url"].startswith("https://huggingface.co/Comfy-Org/") and m["directory"]
                                          for m in models), (name, node["type"])
            declared = sorted({m["name"] for n in data["nodes"] for m in n["properties"].get("models", [])})
            if declared:  # every file named, with its folder and a download, by the frontend itself
                listed = page.missing_models_text()
                print(f"\n[{version} {mode}] {name}: the frontend lists {sum(f in listed for f in declared)} of "
                      f"{len(declared)} missing model files")
                assert all(f in listed for f in declared) and "Download" in listed, (name, listed[:800])
                assert "Unknown" not in listed
                page.close_dialogs()
            shown = page.layout()
            assert shown["scale"] == 1, (name, shown["scale"])
            nodes, groups = shown["nodes"], shown["groups"]
            problems = []
            for i, a in enumerate(nodes):
                for b in nodes[i + 1:]:
                    if _overlaps(a["box"], b["box"]):
                        problems.append(f"{a['title']} overlaps {b['title']}")
                if _group_of(a, groups) is None:
                    problems.append(f"{a['title']} is in no group (box {a['box']})")
            for group in groups:
                inside = [n for n in nodes if _inside(n["box"], group["box"])]
                assert any(n["type"] == "MarkdownNote" for n in inside), (name, group["title"], "has no note")
            first = groups[0]
            unreadable = [n["title"] for n in nodes if _group_of(n, groups) is first and not n["readable"]]
            if unreadable:
                problems.append(f"at the saved view, titles of the first group not readable: {unreadable}")
            page.page.screenshot(path=str(artifacts / f"layout_{name}_{version}_{mode}.png"))
            for group in groups[1:]:
                page.pan_to(group["bounding"][0], group["bounding"][1])
                again = page.layout()
                members = [n for n in again["nodes"] if _group_of(n, again["groups"]) and
                           _group_of(n, again["groups"])["title"] == group["title"]]
                unreadable = [n["title"] for n in members if not n["readable"]]
                if unreadable:
                    problems.append(f"group {group['title']!r} brought into view: titles not readable: {unreadable}")
            print(f"\n[{version} {mode}] {name}: {len(nodes)} nodes in {len(groups)} groups, "
                  f"first group {first['title']!r}")
            assert not problems, f"{name} [{version} {mode}]:\n" + "\n".join(problems)
        assert not page.extension_errors(), page.extension_errors()
    finally:
        page.close()


@pytest.mark.parametrize("vue", [False, True], ids=["classic", "vue"])
def test_train_node_fits_a_screen_and_keeps_its_minimum_width(comfy_ui, browser, vue):
    server, version = comfy_ui
    mode = "vue" if vue else "classic"
    page = _open(browser, server, version, vue)
    try:
        demo = json.loads((REPO / "workflows" / "hidream_lokr_tiny_demo.json").read_text())
        stretched = not (vue and version == "1.32.9")  # that frontend's Vue nodes keep a saved size as it is
        for node in demo["nodes"]:
            if node["type"] == "HiDreamLoKrTrain":
                node["id"] = 606  # a node id the server has no run of: the view starts idle
                if stretched:
                    node["size"] = [340, 1300]  # narrow and stretched, as workflows of the first layout saved it
        demo["links"] = [[l[0], 606 if l[1] == 6 else l[1], l[2], 606 if l[3] == 6 else l[3], l[4], l[5]]
                         for l in demo["links"]]
        page.load_workflow(demo)
        before = page.train_node_box()
        # One synthetic progress event for the node (a run id no server run has): the view shows a run.
        page.page.evaluate(
            """() => { const app = window.comfyAPI.app.app;
                 const node = app.graph._nodes.find(n => n.type === 'HiDreamLoKrTrain');
                 window.comfyAPI.api.api.dispatchEvent(new CustomEvent('hidream_lokr.progress', {detail: {
                   run_id: '9-sizecheck', node: String(node.id), step: 1, total: 10, loss: 1.0, lr: 1e-4,
                   it_per_s: 1, eta_s: 9, peak_memory_bytes: 1, phase: 'training'}})); }""")
        page.wait_view(lambda s: s["runId"] == "9-sizecheck", 10, "the synthetic run on the view")
        page.page.wait_for_timeout(800)
        with_view = page.train_node_box()
        print(f"\n[{version} {mode}] Train node: {before['width']:.0f} x {before['height']:.0f} px before a run, "
              f"{with_view['width']:.0f} x {with_view['height']:.0f} px with the live view "
              f"(live view {before['view']:.0f} -> {with_view['view']:.0f} px)")
        assert before["size"][0] >= MIN_WIDTH and with_view["size"][0] >= MIN_WIDTH
        assert before["height"] < 700, before
        assert with_view["height"] < 1000, with_view
        assert with_view["view"] > before["view"] + 150  # the full view (chart, preview, buttons) after the idle line
        assert not page.extension_errors(), page.extension_errors()
    finally:
        page.close()


def test_workflow_of_the_first_train_layout_loads_with_its_values(comfy_ui, browser):
    """The tiny demo as the pack shipped it before the settings nodes (23 positional values on the Train node):
    the essentials come back on the node, the moved settings on settings nodes wired into it, and the prompt the
    frontend builds from it trains exactly what the old one did."""
    server, version = comfy_ui
    page = _open(browser, server, version, False)
    try:
        old = json.loads(FIRST_LAYOUT.read_text())
        page.load_workflow(old)
        result = page.page.evaluate(
            """async () => { const app = window.comfyAPI.app.app;
                 const node = app.graph._nodes.find(n => n.type === 'HiDreamLoKrTrain');
                 const { output } = await app.graphToPrompt();
                 return {added: node.hidreamLokrUpgraded, prompt: output}; }""")
        assert result["added"] == 3  # optimizer & schedule, previews, advanced (checkpoints were at their defaults)
        prompt = result["prompt"]
        (train_id,) = [k for k, v in prompt.items() if v["class_type"] == "HiDreamLoKrTrain"]
        train = prompt[train_id]["inputs"]
        merged = {k: v for k, v in train.items() if not isinstance(v, list)}
        for key in ("optimizer_settings", "preview_settings", "advanced_settings"):
            merged.update({k: v for k, v in prompt[train[key][0]]["inputs"].items()})
        expected = dict(max_train_steps=40, learning_rate=0.01, optimizer="adamw", lr_scheduler="constant",
                        lr_warmup_steps=0, train_batch_size=2, gradient_accumulation_steps=1,
                        gradient_checkpointing=False, mixed_precision="no", flow_schedule_shift=1.0, seed=42,
                        output_name="tiny_demo", validation_prompt="a red circle on a blue background",
                        validation_step_interval=20, validation_resolution=64, validation_num_inference_steps=8,
                        validation_guidance=3.0, resume_from_checkpoint="auto")
        assert {k: merged.get(k) for k in expected} == expected
        assert "checkpoint_settings" not in train
        assert not page.extension_errors(), page.extension_errors()
    finally:
        page.close()
