"""The ComfyUI people run now, in a real browser (frontends 1.32.9 and 1.58.1; both have subgraphs and the node
documentation panel):

- the demo's Train node put in a subgraph with the frontend's own "Convert Selection to Subgraph" command trains
  with its live view: the server names the node by its execution id ("<subgraph node>:<node>"), the view inside
  the subgraph follows the run, in the classic canvas and after switching to Vue nodes mid-run;
- a node's help page (web/docs/<node id>.md) opens in the frontend's node documentation panel from the selection
  toolbox's info button.
"""
from __future__ import annotations

import requests

from browser_page import REPO, TRAIN_NODE, ComfyPage

STEPS = 20  # at 64 px: the mechanics of following a run, not the demo's pictures


def _open(browser, server, version, vue: bool = False) -> ComfyPage:
    page = ComfyPage(browser, server.url)
    page.open()
    assert page.frontend_version() == version, "the server is not serving the frontend this test is for"
    page.set_vue_nodes(vue)
    return page


def _train_node_into_a_subgraph(page: ComfyPage) -> dict:
    """Select the Train node and run the frontend's Convert Selection to Subgraph command, as a person does from
    the context menu; returns the ids: {host: the subgraph node in the root graph, inner: the Train node in it}."""
    return page.page.evaluate(
        """async (type) => {
             const app = window.comfyAPI.app.app;
             const train = app.graph.nodes.find(n => n.type === type);
             app.canvas.deselectAll?.();
             app.canvas.select(train);
             await app.extensionManager.command.execute('Comfy.Graph.ConvertToSubgraph');
             const host = app.graph.nodes.find(n => n.isSubgraphNode?.() && n.subgraph.nodes.some(m => m.type === type));
             const inner = host.subgraph.nodes.find(m => m.type === type);
             return {host: host.id, inner: inner.id, rootHasTrain: app.graph.nodes.some(n => n.type === type),
                     innerHasView: !!inner.hidreamLokrView};
           }""", TRAIN_NODE)


def _open_subgraph(page: ComfyPage, host: int) -> None:
    """Enter the subgraph, as a double click on its node does, and bring the Train node on screen."""
    page.page.evaluate(
        """(host) => { const app = window.comfyAPI.app.app;
             const node = app.graph.getNodeById(host);
             app.canvas.openSubgraph(node.subgraph);
             const train = node.subgraph.nodes.find(n => n.type === 'HiDreamLoKrTrain');
             const ds = app.canvas.ds; ds.scale = 1;
             ds.offset[0] = -train.pos[0] + 120; ds.offset[1] = -train.pos[1] + 110;
             app.canvas.setDirty(true, true); }""", host)
    page.page.wait_for_timeout(500)


def test_a_train_node_in_a_subgraph_shows_its_run_classic_then_vue(comfy_ui, browser, artifacts):
    server, version = comfy_ui
    page = _open(browser, server, version, vue=False)
    try:
        page.load_demo_workflow()
        page.set_train_widgets(dict(max_train_steps=STEPS, validation_prompt="", seed=77,
                                    output_name=f"subgraph_{version}"))
        page.page.evaluate("""() => { const node = window.comfyAPI.app.app.graph.nodes.find(
                                   n => n.type === 'HiDreamLoKrImageDataset');
                                   node.widgets.find(w => w.name === 'resolution').value = 64; }""")
        ids = _train_node_into_a_subgraph(page)
        assert not ids["rootHasTrain"] and ids["innerHasView"], ids
        prompt = page.page.evaluate("async () => (await window.comfyAPI.app.app.graphToPrompt()).output")
        execution_id = f"{ids['host']}:{ids['inner']}"
        assert prompt[execution_id]["class_type"] == TRAIN_NODE, sorted(prompt)

        page.queue()
        _open_subgraph(page, ids["host"])
        early = page.wait_view(lambda s: s["status"] == "running" and int(s["step"]) >= 3, 240,
                               "the first steps in the subgraph's Train node (classic)")
        runs = requests.get(f"{server.url}/hidream_lokr/runs", params={"node": execution_id}, timeout=30).json()
        assert [r["run_id"] for r in runs["runs"]][-1] == early["runId"]  # the server's id for the inner node
        assert page.page.locator("[data-hidream-lokr-live]").first.is_visible()

        page.set_vue_nodes(True)
        _open_subgraph(page, ids["host"])
        later = page.wait_view(lambda s: s["runId"] == early["runId"] and int(s["step"]) > int(early["step"]), 120,
                               "more steps after switching to Vue nodes")
        done = page.wait_view(lambda s: s["status"] == "finished", 240, "the end of the run")
        assert int(done["points"]) == STEPS and done["runId"] == later["runId"]
        assert page.page.locator("[data-hidream-lokr-live]").first.is_visible()
        warnings = [m["text"] for m in page.console if m["type"] == "warning" and "hidream_lokr" in m["text"]]
        assert not warnings, warnings  # both frontends have every API the view uses
        assert not page.extension_errors(), page.extension_errors()
        print(f"\n[{version}] subgraph Train node {execution_id}: {done['points']} steps followed, classic then Vue")
    finally:
        page.close(artifacts / f"end_subgraph_{version}.png")


def test_a_nodes_help_page_opens_in_the_documentation_panel(comfy_ui, browser, artifacts):
    server, version = comfy_ui
    page = _open(browser, server, version, vue=False)
    try:
        page.load_demo_workflow()
        pos = page.page.evaluate(f"() => window.comfyAPI.app.app.graph.nodes.find(n => n.type === '{TRAIN_NODE}').pos")
        page.pan_to(pos[0], pos[1], screen=(400, 400))  # clear of the menus and the breadcrumb
        title = page.page.evaluate(  # a point on the Train node's title bar, on screen
            """(type) => { const app = window.comfyAPI.app.app;
                 const node = app.graph.nodes.find(n => n.type === type);
                 const [x, y] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + 60, node.pos[1] - 15]);
                 const r = app.canvas.canvas.getBoundingClientRect(); return [r.left + x, r.top + y]; }""",
            TRAIN_NODE)
        page.page.mouse.click(*title)  # selected as a person selects it: the selection toolbox appears
        page.page.locator('[data-testid="info-button"]').first.click(timeout=15000)
        written = (REPO / "web" / "docs" / f"{TRAIN_NODE}.md").read_text(encoding="utf-8")
        assert "Continue where it stopped." in written
        page.page.get_by_text("Continue where it stopped.").first.wait_for(state="visible", timeout=15000)
        assert page.page.locator("table", has_text="resume_from_checkpoint").count()  # the generated inputs table
        page.page.screenshot(path=str(artifacts / f"help_page_{version}.png"))
    finally:
        page.close()


def test_the_live_view_uses_only_the_frontends_documented_api():
    """No LiteGraph internals (`_nodes`, `_nodes_by_id`, private members of the graph); the global LiteGraph only
    through `needs`, which names what a frontend lacks in a console warning."""
    import re

    code = (REPO / "web" / "hidream_lokr_live.js").read_text(encoding="utf-8")
    assert not re.search(r"\._nodes\b|_nodes_by_id|graph\._", code)
    globals_used = [line for line in code.splitlines() if "globalThis.LiteGraph" in line or "window.LiteGraph" in line]
    assert globals_used and all("needs(" in line for line in globals_used), globals_used
