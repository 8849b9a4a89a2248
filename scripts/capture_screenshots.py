"""Regenerate every picture of the pack's ComfyUI side from a real ComfyUI in headless Chromium: the template
thumbnails (workflows/<name>.jpg, what Browse Templates shows) and the screenshots under docs/screenshots/.

    .cache/comfyui/venv/bin/python scripts/capture_screenshots.py [--frontend 1.58.1] [--modes classic,vue]

For each mode (classic canvas, Vue nodes) it starts a fresh ComfyUI 0.3.75 with this pack (the test harness's
server, tests/comfyui/comfy_server.py; COMFYUI_DIR as for the tests), opens every template as a person does and
photographs the whole graph: the tiny demo is queued and photographed mid-run (live view, chart, preview, running
telemetry); the HiDream-I1 graphs cannot run without their 40 GB of weights, so they are photographed as they
open (the frontend's missing-model notice closed). Also docs/screenshots/train_group_mid_run_<mode>.png: the demo's
Train group mid-run at 100 %. Thumbnails come from the classic mode. Everything it writes is listed at the end with
its size in pixels.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "comfyui"), str(REPO / "tests" / "browser")]

from browser_page import ComfyPage, launch_chromium  # noqa: E402
from comfy_server import ComfyServer, comfyui_dir  # noqa: E402
from frontends import LATEST, frontend_root  # noqa: E402

TEMPLATES = ["hidream_lokr_tiny_demo", "hidream_lokr_train", "hidream_lokr_sample_native"]
DEMO = "hidream_lokr_tiny_demo"
SHOTS = REPO / "docs" / "screenshots"
VIEWPORT = (2600, 1400)  # large enough that the whole graph fits at a zoom where classic mode still draws text
README_WIDTH = 1600
THUMBNAIL_SIZE = (800, 450)

FIT_JS = """
(margin) => {
  const app = window.comfyAPI.app.app;
  const groups = app.graph._groups || app.graph.groups || [];
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const g of groups) {
    const [x, y, w, h] = g._bounding || g.bounding;
    x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h);
  }
  const r = app.canvas.canvas.getBoundingClientRect();
  const [left, top, right, bottom] = margin;  // CSS pixels kept free for the menus
  const scale = Math.min((r.width - left - right) / (x1 - x0), (r.height - top - bottom) / (y1 - y0), 1);
  const ds = app.canvas.ds;
  ds.scale = scale;
  ds.offset[0] = (left + (r.width - left - right - (x1 - x0) * scale) / 2) / scale - x0;
  ds.offset[1] = top / scale - y0;
  app.canvas.setDirty(true, true);
  const box = [r.left + (x0 + ds.offset[0]) * scale, r.top + (y0 + ds.offset[1]) * scale,
               (x1 - x0) * scale, (y1 - y0) * scale];
  return {scale, box};
}
"""


def _settings(page: ComfyPage, vue: bool) -> None:
    page.page.evaluate(
        """async (vue) => { const s = window.comfyAPI.app.app.extensionManager.setting;
             await s.set('Comfy.VueNodes.Enabled', vue); await s.set('Comfy.Minimap.Visible', false);
             await s.set('Comfy.Graph.CanvasInfo', false); }""", vue)
    page.page.wait_for_timeout(500)


def _dismiss_toasts(page: ComfyPage) -> None:
    page.page.evaluate("""() => { const t = window.comfyAPI.app.app.extensionManager.toast;
                                  (t.dismissAll || t.removeAll)?.call(t); }""")


def _whole_graph(page: ComfyPage, path: Path, graph_only: Path = None) -> tuple[float, tuple[int, int]]:
    """The whole graph fitted into the window, photographed with ComfyUI around it (`path`) and, for a
    thumbnail, the graph alone (`graph_only`)."""
    _dismiss_toasts(page)
    fit = page.page.evaluate(FIT_JS, [80, 110, 30, 30])
    page.page.wait_for_timeout(1200)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.page.screenshot(path=str(path))
    if graph_only is not None:
        x, y, w, h = fit["box"]
        page.page.screenshot(path=str(graph_only), clip={"x": x - 6, "y": y - 6, "width": w + 12, "height": h + 12})
    return fit["scale"], _downscale(path, README_WIDTH)


def _downscale(path: Path, width: int) -> tuple[int, int]:
    from PIL import Image

    image = Image.open(path)
    if image.width > width:
        image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
        image.save(path, optimize=True)
    return image.size


def _thumbnail(source: Path, target: Path) -> tuple[int, int]:
    """The graph alone, fitted into THUMBNAIL_SIZE on ComfyUI's canvas colour."""
    from PIL import Image

    image = Image.open(source).convert("RGB")
    image.thumbnail(THUMBNAIL_SIZE, Image.LANCZOS)
    canvas = Image.new("RGB", THUMBNAIL_SIZE, (32, 33, 38))
    canvas.paste(image, ((THUMBNAIL_SIZE[0] - image.width) // 2, (THUMBNAIL_SIZE[1] - image.height) // 2))
    canvas.save(target, quality=90, optimize=True)
    return canvas.size


def capture_mode(browser, version: str, vue: bool, written: list) -> None:
    mode = "vue" if vue else "classic"
    root = frontend_root(version, comfyui_dir())
    with tempfile.TemporaryDirectory(prefix=f"capture-{mode}-") as base:
        server = ComfyServer(Path(base), comfyui_dir(),
                             extra_args=("--front-end-root", str(root)) if root else ()).start()
        try:
            import requests

            requests.post(f"{server.url}/api/settings", json={"Comfy.TutorialCompleted": True}, timeout=30)
            page = ComfyPage(browser, server.url, viewport=VIEWPORT)
            page.open()
            _settings(page, vue)
            for number, name in enumerate(TEMPLATES):
                if number:  # a fresh page: no node outputs of the previous graph shown on this one's nodes
                    page.reload()
                data = page.load_template(name)
                if any(n["properties"].get("models") for n in data["nodes"]):
                    page.missing_models_text()  # reads and closes the frontend's missing-model notice
                    page.close_dialogs()
                    page.page.mouse.move(VIEWPORT[0] / 2, VIEWPORT[1] - 40)  # no tooltip left over
                shot = SHOTS / f"{name}_{mode}.png"
                graph_only = Path(base) / f"{name}_graph.png" if not vue else None
                if name == DEMO:
                    page.queue()
                    page.wait_view(lambda s: s["status"] == "running" and int(s["step"]) >= 20
                                   and int(s["previews"]) >= 2 and s["previewShown"], 600,
                                   "the demo mid-run with two previews")
                    scale, size = _whole_graph(page, shot, graph_only)
                    written.append((shot, size, f"the whole demo graph mid-run, zoom {scale:.2f}"))
                    group = [g for g in data["groups"] if g["title"].startswith("4 ")][0]["bounding"]
                    page.pan_to(group[0] - 10, group[1] - 10, screen=(70, 100))
                    close_up = SHOTS / f"train_group_mid_run_{mode}.png"
                    page.page.screenshot(path=str(close_up),
                                         clip={"x": 0, "y": 0, "width": min(VIEWPORT[0], 1180), "height": 1040})
                    if page.view_state()["status"] != "running":
                        raise RuntimeError("the demo run ended before the close-up: rerun on a less busy machine")
                    written.append((close_up, _downscale(close_up, README_WIDTH),
                                    "the Train group mid-run at 100 % (node, settings, live view)"))
                    state = page.wait_view(lambda s: s["status"] != "running", 600, "the end of the demo run")
                    if state["status"] != "finished":
                        raise RuntimeError(f"the demo run ended {state['status']}: {state['message']}")
                else:
                    scale, size = _whole_graph(page, shot, graph_only)
                    written.append((shot, size, f"the whole graph as it opens, zoom {scale:.2f}"))
                if graph_only is not None:
                    thumb = REPO / "workflows" / f"{name}.jpg"
                    written.append((thumb, _thumbnail(graph_only, thumb), "template thumbnail (the graph alone)"))
            errors = page.extension_errors()
            if errors:
                raise RuntimeError("the pack's code reported errors in the page:\n" + "\n".join(errors))
            page.close()
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frontend", default=LATEST, help=f"comfyui-frontend-package version (default {LATEST})")
    parser.add_argument("--modes", default="classic,vue", help="classic, vue or both (default)")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    written: list = []
    started = time.time()
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            for mode in args.modes.split(","):
                capture_mode(browser, args.frontend, mode.strip() == "vue", written)
        finally:
            browser.close()
    print(f"captured with ComfyUI frontend {args.frontend} in {time.time() - started:.0f} s:")
    for path, size, what in written:
        print(f"  {path.relative_to(REPO)}  {size[0]} x {size[1]} px  ({what})")
    (SHOTS / "index.json").write_text(json.dumps(
        [{"file": str(p.relative_to(REPO)), "size": list(s), "what": w, "frontend": args.frontend}
         for p, s, w in written], indent=1) + "\n")


if __name__ == "__main__":
    main()
