"""Headless Chromium (Debian's package, never a downloaded browser) on a ComfyUI page, driven by Playwright.

`ComfyPage` wraps one page: it records console messages and page errors, loads the tiny demo workflow through the
frontend's own API, sets widgets on the Train node, queues the graph like the Queue button does, and reads the live
view's read-only debug hook (the `data-*` attributes of its root element, see web/hidream_lokr_live.js).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Optional

from ui_workflow import template_path  # tests/comfyui (the browser tests' conftest puts it on the path)

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("HIDREAM_LOKR_CHROMIUM", "/usr/bin/chromium")
# Headless, no GPU, and nothing that would reach the network on its own (the page may only talk to ComfyUI).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TRAIN_NODE = "HiDreamLoKrTrain"
VIEW = "[data-hidream-lokr-live]"

# The demo workflow in the frontend's own format when the node pack ships it, else an API-format twin (the
# frontend's loadApiJson turns it into a graph, as when a user drops an API json on the canvas).
UI_WORKFLOW = template_path("hidream_lokr_tiny_demo")
API_WORKFLOW = REPO / "tests" / "comfyui" / "workflows" / "hidream_lokr_tiny_demo_api.json"


def launch_chromium(playwright):
    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"no Chromium at {CHROMIUM}: install Debian's package (apt-get install -y chromium) or "
                           "set HIDREAM_LOKR_CHROMIUM; these tests never download a browser")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


class ComfyPage:
    def __init__(self, browser, url: str, viewport=(1500, 1500)) -> None:
        self.url = url
        self.context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
        self.page = self.context.new_page()
        self.console: list[dict] = []
        self.page_errors: list[str] = []
        self.external_requests: list[str] = []
        self.page.on("console", lambda m: self.console.append(
            {"type": m.type, "text": m.text, "url": (m.location or {}).get("url", "")}))
        self.page.on("pageerror", lambda e: self.page_errors.append(f"{e}\n{getattr(e, 'stack', '')}"))
        self.page.on("request", self._note_request)

    def _note_request(self, request) -> None:
        if not request.url.startswith(self.url) and not request.url.startswith(("data:", "blob:")):
            self.external_requests.append(request.url)

    def close(self, last_screenshot: Optional[Path] = None) -> None:
        """Close the page; with a path, first keep a full screenshot of how it ended (what a failure looked like)."""
        if last_screenshot is not None:
            try:
                last_screenshot.parent.mkdir(parents=True, exist_ok=True)
                self.page.screenshot(path=str(last_screenshot))
            except Exception as error:  # noqa: BLE001 - a screenshot must not hide the test's own result
                print(f"no final screenshot: {error}")
        self.context.close()

    # ------------------------------------------------------------------------------------------ page life

    def open(self, timeout: float = 90.0) -> None:
        self.page.goto(self.url, wait_until="domcontentloaded", timeout=timeout * 1000)
        self.wait_ready(timeout)

    def reload(self, timeout: float = 90.0) -> None:
        self.page.reload(wait_until="domcontentloaded", timeout=timeout * 1000)
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        """The app is up, our extension registered and the Train node type known to the graph."""
        self.page.wait_for_function(
            """() => window.comfyAPI && window.comfyAPI.app && window.comfyAPI.app.app
                  && window.comfyAPI.app.app.graph
                  && (window.comfyAPI.app.app.extensions || []).some(e => e.name === 'hidream_lokr.live_training_view')
                  && window.LiteGraph && window.LiteGraph.registered_node_types['HiDreamLoKrTrain']""",
            timeout=timeout * 1000)

    def frontend_version(self) -> str:
        return self.page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || ''")

    def set_vue_nodes(self, enabled: bool) -> None:
        """Switch between the classic canvas and Vue nodes ("Nodes 2.0"), as the settings dialog does."""
        self.page.evaluate("async (on) => { await window.comfyAPI.app.app.extensionManager.setting.set("
                           "'Comfy.VueNodes.Enabled', on); }", enabled)
        self.page.wait_for_timeout(300)

    def load_workflow(self, data: dict, settle_ms: int = 1500) -> None:
        """Open a UI-format workflow as the Browse Templates dialog or a dropped file does (its saved view too)."""
        self.page.evaluate("async (wf) => { await window.comfyAPI.app.app.loadGraphData(wf); }", data)
        self.page.wait_for_timeout(settle_ms)

    def load_template(self, name: str) -> dict:
        """The pack's template as the server lists it (/api/workflow_templates/<pack>/<name>.json), opened."""
        data = self.page.evaluate(
            "async (n) => (await window.comfyAPI.api.api.fetchApi(`/workflow_templates/ComfyUI-HiDream-LoKr/${n}.json`)).json()",
            name)
        self.load_workflow(data)
        return data

    def template_cards(self, category: str) -> list[dict]:
        """Browse Templates (the frontend's own command), its `category` picked in the side list: each card's title,
        the width the title needs and has, its description (1.3x; none on 1.5x cards) and the thumbnail's size."""
        self.page.evaluate("() => window.comfyAPI.app.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
        entry = self.page.get_by_text(category, exact=True).first
        entry.wait_for(timeout=30000)
        entry.scroll_into_view_if_needed()
        entry.click()
        self.page.wait_for_function(
            """() => { const cards = [...document.querySelectorAll('[data-testid^="template-workflow-"]')];
                       return cards.length && cards.every((c) => { const i = c.querySelector('img');
                         return i && i.complete && i.naturalWidth > 0; }); }""", timeout=30000)
        return self.page.evaluate(
            """() => [...document.querySelectorAll('[data-testid^="template-workflow-"]')].map((card) => {
                 const title = card.querySelector('h3'), text = card.querySelector('p');
                 const img = card.querySelector('img');
                 const ruler = document.createElement('canvas').getContext('2d');
                 ruler.font = getComputedStyle(title).font;  // the width the title needs on one line
                 return {title: title.textContent.trim(), titleRoom: title.clientWidth,
                         titleWidth: Math.ceil(ruler.measureText(title.textContent.trim()).width),
                         titleClamped: title.scrollHeight > title.clientHeight + 1,
                         description: text ? text.textContent.split(/\\s+/).join(' ').trim() : '',
                         thumbnail: [img.naturalWidth, img.naturalHeight]}; })""")

    def dialog_texts(self) -> list[str]:
        """The text of every open dialog (PrimeVue's and the newer frontend's)."""
        return self.page.evaluate(
            """() => [...document.querySelectorAll('.p-dialog, [role="dialog"]')]
                       .filter(d => d.getBoundingClientRect().height > 0).map(d => d.innerText)""")

    def missing_models_text(self) -> str:
        """What the frontend tells about missing model files when a workflow opens: 1.32.9's Missing Models
        dialog, or the Missing Models list of 1.5x's workflow overview ("View details" of its issues notice),
        which is closed again afterwards."""
        dialogs = [d for d in self.dialog_texts() if "Missing Models" in d]
        if dialogs:
            return "\n".join(dialogs)
        details = self.page.get_by_role("button", name="View details")
        if not details.count():
            return ""
        details.first.click()
        self.page.wait_for_timeout(800)
        text = self.page.evaluate(
            """() => { const found = [...document.querySelectorAll('body *')].filter(e =>
                         e.textContent.includes('Missing Models') && e.textContent.includes('Download'));
                       found.sort((a, b) => a.textContent.length - b.textContent.length);
                       return found.length ? found[0].innerText : ''; }""")
        panel = self.page.get_by_role("button", name="Toggle properties panel")
        if panel.count():
            panel.first.click()
            self.page.wait_for_timeout(500)
        return text

    def dismiss_notices(self) -> None:
        """Close the one-time notices frontend 1.32.9 lays over the canvas, as a person does once: the "Introducing
        Nodes 2.0" banner above the classic canvas and the "Prefer the legacy design?" toast of Vue nodes."""
        closed = self.page.evaluate(
            """() => { let closed = 0;
                 const cross = 'button [class*="lucide--x"], button .pi-times';
                 for (const text of ['Introducing Nodes 2.0', 'Prefer the legacy design?']) {
                   const boxes = [...document.querySelectorAll('body *')].filter((e) => e.textContent.includes(text)
                     && e.querySelector(cross));
                   boxes.sort((a, b) => a.textContent.length - b.textContent.length);
                   const button = boxes.length && boxes[0].querySelector(cross);
                   if (button) { button.closest('button').click(); closed++; }
                 }
                 return closed; }""")
        if closed:
            self.page.wait_for_timeout(400)

    def close_dialogs(self) -> None:
        for _ in range(3):
            if not self.dialog_texts():
                return
            self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(400)

    def layout(self) -> dict:
        """Every node's box on screen (title bar included; Vue nodes: their element), the groups' boxes, the saved
        view, and for each node whether its title is readable: at three points of its title bar the topmost
        element is the canvas (classic) or the node itself (Vue), not a menu, a panel or another node; whether it
        is wholly visible: the same at nine points over the whole node (a DOM widget of the classic canvas
        counts as the node's); and, with Vue nodes, the labels the node shows (title, sockets, widget labels:
        text, width it needs, width it has; values in widgets are not labels)."""
        return self.page.evaluate(LAYOUT_JS)

    def pan_to(self, x: float, y: float, screen=(90, 150), scale: float = 1.0) -> None:
        """Put canvas point (x, y) at `screen` (CSS pixels), at zoom `scale`."""
        self.page.evaluate(
            """([x, y, sx, sy, scale]) => { const app = window.comfyAPI.app.app; const ds = app.canvas.ds;
                 const r = app.canvas.canvas.getBoundingClientRect(); ds.scale = scale;
                 ds.offset[0] = (sx - r.left) / scale - x; ds.offset[1] = (sy - r.top) / scale - y;
                 app.canvas.setDirty(true, true); }""",
            [x, y, *screen, scale])
        self.page.wait_for_timeout(400)

    # ------------------------------------------------------------------------------------------ the graph

    def load_demo_workflow(self) -> str:
        """Load the tiny demo workflow through the frontend; returns which file was loaded."""
        if UI_WORKFLOW.is_file():
            data = json.loads(UI_WORKFLOW.read_text())
            self.page.evaluate("(wf) => window.comfyAPI.app.app.loadGraphData(wf)", data)
            source = UI_WORKFLOW
        else:
            source = API_WORKFLOW
            data = json.loads(source.read_text())
            self.page.evaluate("(api) => window.comfyAPI.app.app.loadApiJson(api, 'tiny_demo_api.json')", data)
        has_train = "() => window.comfyAPI.app.app.graph._nodes.some(n => n.type === 'HiDreamLoKrTrain')"
        self.page.wait_for_function(has_train, timeout=30000)
        # A frontend may still be opening its default workflow in the background; it must not replace ours.
        self.page.wait_for_timeout(1000)
        assert self.page.evaluate(has_train), "the demo workflow was replaced after loading"
        return str(source.relative_to(REPO))

    def set_train_widgets(self, values: dict) -> None:
        """Set training settings by widget name: on the Train node, or on the settings node that holds them."""
        missing = self.page.evaluate(
            """(values) => {
                 const nodes = window.comfyAPI.app.app.graph._nodes;
                 const train = nodes.find(n => n.type === 'HiDreamLoKrTrain');
                 const candidates = [train, ...nodes.filter(n => n.type.startsWith('HiDreamLoKr') && n.type.endsWith('Settings'))];
                 const missing = [];
                 for (const [name, value] of Object.entries(values)) {
                   const w = candidates.flatMap(n => n.widgets || []).find(w => w.name === name);
                   if (!w) { missing.push(name); continue; }
                   w.value = value;
                 }
                 return missing;
               }""", values)
        assert not missing, f"no Train or settings node widgets {missing}"

    def center_on_train_node(self) -> None:
        """Scroll the canvas so the Train node (and its live view) is on screen, at zoom 1."""
        self.page.evaluate(
            """() => {
                 const app = window.comfyAPI.app.app;
                 const node = app.graph._nodes.find(n => n.type === 'HiDreamLoKrTrain');
                 const ds = app.canvas.ds;
                 ds.scale = 1;
                 ds.offset[0] = -node.pos[0] + 120;  // clear of the sidebar
                 ds.offset[1] = -node.pos[1] + 110;  // below the tab bar / breadcrumb overlays
                 app.canvas.setDirty(true, true);
               }""")

    def train_node_box(self) -> dict:
        """The Train node's drawn size in CSS pixels at zoom 1, title included: node.size (classic) or its element
        (Vue), and its live view's height."""
        return self.page.evaluate(
            """() => { const app = window.comfyAPI.app.app;
                 const node = app.graph._nodes.find(n => n.type === 'HiDreamLoKrTrain');
                 const el = document.querySelector(`[data-node-id="${node.id}"]`);
                 const s = app.canvas.ds.scale;
                 const view = document.querySelector('[data-hidream-lokr-live]');
                 if (el && el.getBoundingClientRect().height > 0) {
                   const r = el.getBoundingClientRect();
                   return {width: r.width / s, height: r.height / s, vue: true, size: [...node.size],
                           view: view ? view.getBoundingClientRect().height / s : 0};
                 }
                 const title = window.LiteGraph.NODE_TITLE_HEIGHT || 30;
                 return {width: node.size[0], height: node.size[1] + title, vue: false, size: [...node.size],
                         view: view ? view.getBoundingClientRect().height / s : 0};
               }""")

    def queue(self) -> None:
        """What the Queue/Run button does."""
        self.page.evaluate("() => window.comfyAPI.app.app.queuePrompt(0, 1)")

    # ------------------------------------------------------------------------------------------ the live view

    def view_state(self) -> dict:
        """The live view's debug hook: its root element's data-* attributes and its visible texts."""
        return self.page.evaluate(
            """(sel) => {
                 const root = document.querySelector(sel);
                 if (!root) return null;
                 const text = (c) => (root.querySelector(c) || {}).textContent || '';
                 const img = root.querySelector('img.hl-preview');
                 const stop = root.querySelector('button.hl-stop');
                 return {...root.dataset,
                         telemetry: ['.hl-phase', '.hl-step', '.hl-speed', '.hl-eta', '.hl-loss', '.hl-lr',
                                     '.hl-lb', '.hl-mem'].map(text).join(' | '),
                         label: text('.hl-phase'), resumedText: text('.hl-resumed'),
                         message: text('.hl-message'),
                         previewShown: !!(img && !img.hidden && img.complete && img.naturalWidth > 0),
                         previewSize: img ? [img.naturalWidth, img.naturalHeight] : null,
                         previewSrc: img ? img.getAttribute('src') : null,
                         stopEnabled: !!(stop && !stop.disabled),
                         thumbs: root.querySelectorAll('.hl-thumbs button').length};
               }""", VIEW)

    def wait_view(self, predicate: Callable[[dict], bool], timeout: float, what: str) -> dict:
        deadline = time.time() + timeout
        state = None
        while time.time() < deadline:
            state = self.view_state()
            if state and predicate(state):
                return state
            self.page.wait_for_timeout(200)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; view state: {state}")

    def click_button(self, label: str) -> None:
        """Click one of the view's buttons like a user: with the node on screen, nothing covering it."""
        self.center_on_train_node()
        self.page.wait_for_timeout(300)
        self.page.locator(VIEW).get_by_role("button", name=label).click()

    def screenshot_view(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.center_on_train_node()
        self.page.wait_for_timeout(300)
        box = self.page.evaluate(
            """() => {
                 const app = window.comfyAPI.app.app;
                 const node = app.graph._nodes.find(n => n.type === 'HiDreamLoKrTrain');
                 const [x, y] = app.canvas.ds.convertOffsetToCanvas([node.pos[0], node.pos[1]]);
                 const r = app.canvas.canvas.getBoundingClientRect();
                 const s = app.canvas.ds.scale;
                 return {x: r.left + x - 10, y: r.top + y - 40, w: node.size[0] * s + 20, h: node.size[1] * s + 60};
               }""")
        clip = {"x": max(box["x"], 0), "y": max(box["y"], 0), "width": box["w"], "height": box["h"]}
        self.page.screenshot(path=str(path), clip=clip)

    # ------------------------------------------------------------------------------------------ console

    def extension_errors(self) -> list[str]:
        """Console errors and uncaught page errors that come from this pack's code (or name it)."""
        ours = ("hidream_lokr", "HiDream-LoKr", "hidream-lokr", "/extensions/ComfyUI-HiDream-LoKr")
        found = [f"console {m['type']}: {m['text']} ({m['url']})" for m in self.console
                 if m["type"] == "error" and any(k in m["text"] + m["url"] for k in ours)]
        found += [e for e in self.page_errors if any(k in e for k in ours)]
        return found


LAYOUT_JS = r"""
() => {
  const app = window.comfyAPI.app.app;
  const ds = app.canvas.ds;
  const canvasEl = app.canvas.canvas;
  const c = canvasEl.getBoundingClientRect();
  const titleH = window.LiteGraph.NODE_TITLE_HEIGHT || 30;
  const toScreen = (x, y) => [c.left + (x + ds.offset[0]) * ds.scale, c.top + (y + ds.offset[1]) * ds.scale];
  const nodes = [];
  for (const n of app.graph._nodes) {
    const el = document.querySelector(`[data-node-id="${n.id}"]`);
    let box;
    const vue = !!(el && el.getBoundingClientRect().height > 0);
    if (vue) {
      const r = el.getBoundingClientRect();
      box = [r.left, r.top, r.width, r.height];
    } else {
      const [x, y] = toScreen(n.pos[0], n.pos[1] - titleH);
      box = [x, y, n.size[0] * ds.scale, (n.size[1] + titleH) * ds.scale];
    }
    const ty = box[1] + Math.min(12, box[3] / 2) ;
    const points = [box[0] + 14, box[0] + box[2] / 2, box[0] + box[2] - 14].map((x) => [x, ty]);
    const clear = ([x, y], domWidgets) => {
      if (x < 0 || y < 0 || x >= window.innerWidth || y >= window.innerHeight) return false;
      const hit = document.elementFromPoint(x, y);
      if (vue) return !!(hit && el.contains(hit));
      return hit === canvasEl || (domWidgets && !!(hit && hit.closest('.dom-widget')));
    };
    const readable = points.every((p) => clear(p, false));
    const inset = 4;
    const grid = [];
    for (const fx of [0, 0.5, 1]) for (const fy of [0, 0.5, 1]) {
      grid.push([box[0] + inset + fx * (box[2] - 2 * inset), box[1] + inset + fy * (box[3] - 2 * inset)]);
    }
    const visible = grid.every((p) => clear(p, true));
    const labels = vue ? [...el.querySelectorAll('.truncate')]
      .filter((t) => t.textContent.trim() && !t.closest('button, input, textarea, select, [role="combobox"]'))
      .map((t) => [t.textContent.trim(), t.scrollWidth, t.clientWidth]) : [];
    nodes.push({id: n.id, type: n.type, title: n.title, box, vue, readable, visible, labels});
  }
  const groups = (app.graph._groups || app.graph.groups || []).map((g) => {
    const b = g._bounding || g.bounding;
    const [x, y] = toScreen(b[0], b[1]);
    return {title: g.title, bounding: [...b], box: [x, y, b[2] * ds.scale, b[3] * ds.scale]};
  });
  return {scale: ds.scale, offset: [...ds.offset], nodes, groups, viewport: [window.innerWidth, window.innerHeight]};
}
"""
