"""Regenerate every picture of the pack's ComfyUI side from a real ComfyUI in headless Chromium: the template
thumbnails (workflows/<title>.jpg, what Browse Templates shows on each card) and the screenshots under
docs/screenshots/.

    .cache/comfyui/venv/bin/python scripts/capture_screenshots.py [--frontend 1.58.1] [--modes classic,vue]

For each mode (classic canvas, Vue nodes) it starts a fresh ComfyUI 0.3.75 with this pack (the test harness's
server, tests/comfyui/comfy_server.py; COMFYUI_DIR as for the tests), opens every template as a person does and
photographs the whole graph: the tiny demo is queued and photographed mid-run (live view, chart, preview, running
telemetry); the HiDream-I1 graphs cannot run without their 40 GB of weights, so they are photographed as they
open (the frontend's missing-model notice closed). Also docs/screenshots/train_group_mid_run_<mode>.png: the demo's
Train group mid-run at 100 %. Everything it writes is listed at the end with its size in pixels.

The thumbnails come from the classic pass and show what each template gives, not its graph (a card shows a
thumbnail at 256 px at most, where a graph is unreadable): the demo's before and after (the word drawn exactly, the
base model's preview at step 0, the LoKr's at the end, the LoKr's sample in a place no training picture showed);
for the HiDream-I1 templates, which cannot run here, the Train node's live view and a LoKr's sample, both pictured
on the CPU demo and said so on the picture, with what the template needs.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "comfyui"), str(REPO / "tests" / "browser"), str(REPO)]

from browser_page import VIEW, ComfyPage, launch_chromium  # noqa: E402
from comfy_server import ComfyServer, comfyui_dir  # noqa: E402
from frontends import LATEST, frontend_root  # noqa: E402
from ui_workflow import TEMPLATES, template_path  # noqa: E402

DEMO = "hidream_lokr_tiny_demo"  # API twin names; the templates' titles are TEMPLATES[twin]
SAMPLER_PREVIEW = "9"  # the demo's PreviewImage of the LoKr sampler (tests/comfyui/workflows/<DEMO>_api.json)
SHOTS = REPO / "docs" / "screenshots"
VIEWPORT = (2600, 1400)  # large enough that the whole graph fits at a zoom where classic mode still draws text
README_WIDTH = 1600
THUMBNAIL = 512  # square: both frontends show a pack's thumbnail in a square card, 256 CSS px at most
CANVAS_COLOUR = (32, 33, 38)

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
  return scale;
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


def _whole_graph(page: ComfyPage, path: Path) -> tuple[float, tuple[int, int]]:
    """The whole graph fitted into the window, photographed with ComfyUI around it."""
    _dismiss_toasts(page)
    scale = page.page.evaluate(FIT_JS, [80, 110, 30, 30])
    page.page.wait_for_timeout(1200)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.page.screenshot(path=str(path))
    return scale, _downscale(path, README_WIDTH)


def _downscale(path: Path, width: int) -> tuple[int, int]:
    from PIL import Image

    image = Image.open(path)
    if image.width > width:
        image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
        image.save(path, optimize=True)
    return image.size


# ------------------------------------------------------------------------------------------------ thumbnails

def _image(server, route: str):
    import requests
    from PIL import Image

    response = requests.get(f"{server.url}{route}", timeout=60)
    response.raise_for_status()
    return Image.open(io.BytesIO(response.content)).convert("RGB")


def demo_results(server, run_id: str) -> dict:
    """The finished demo run's pictures: the base model's preview (step 0), the LoKr's last one, and the LoKr
    sampler's picture in a place no training picture showed (the graph's PreviewImage)."""
    history = server.get(f"/hidream_lokr/runs/{run_id}")
    previews = history["previews"]
    first, last = min(previews, key=lambda p: p["step"]), max(previews, key=lambda p: p["step"])
    outputs = server.get(f"/history/{history['prompt_id']}")[history["prompt_id"]]["outputs"]
    (sample,) = outputs[SAMPLER_PREVIEW]["images"]
    query = urlencode({k: sample[k] for k in ("filename", "subfolder", "type")})
    return {"before": _image(server, f"/hidream_lokr/runs/{run_id}/previews/{first['index']}"),
            "after": _image(server, f"/hidream_lokr/runs/{run_id}/previews/{last['index']}"),
            "after_step": last["step"], "unseen": _image(server, f"/view?{query}")}


def _canvas():
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (THUMBNAIL, THUMBNAIL), CANVAS_COLOUR)
    return image, ImageDraw.Draw(image)


def _text(draw, xy, text: str, size: int, colour=(225, 225, 232), anchor: str = "ma") -> None:
    from PIL import ImageFont

    draw.text(xy, text, font=ImageFont.load_default(size=size), fill=colour, anchor=anchor)


def _paste(canvas, picture, box: tuple[int, int, int, int]) -> None:
    """`picture` fitted into box (x, y, width, height), centred; small pictures enlarged without blurring."""
    from PIL import Image

    x, y, w, h = box
    scale = min(w / picture.width, h / picture.height)
    size = (round(picture.width * scale), round(picture.height * scale))
    resample = Image.NEAREST if scale >= 2 else Image.LANCZOS
    canvas.paste(picture.resize(size, resample), (x + (w - size[0]) // 2, y + (h - size[1]) // 2))


def demo_thumbnail(results: dict) -> "Image.Image":
    """Four pictures, two by two, each named: the word drawn exactly, step 0, the LoKr, a new place."""
    from trainer_core.demo import draw_concept

    canvas, draw = _canvas()
    cells = [(draw_concept("blue"), "a zorb, drawn"), (results["before"], "step 0, no LoKr"),
             (results["after"], f"step {results['after_step']}, LoKr"), (results["unseen"], "LoKr, new place")]
    side, gap = 212, (THUMBNAIL - 2 * 212) // 3
    for i, (picture, label) in enumerate(cells):
        x, y = gap + (i % 2) * (side + gap), 6 + (i // 2) * 256
        _paste(canvas, picture, (x, y, side, side))
        _text(draw, (x + side // 2, y + side + 5), label, 21)
    return canvas


def live_view_thumbnail(view) -> "Image.Image":
    """The Train node's live view mid-run, with what the HiDream-I1 template needs."""
    canvas, draw = _canvas()
    _text(draw, (THUMBNAIL // 2, 18), "Train HiDream LoKr: its live view", 22)
    _paste(canvas, view, (8, 60, THUMBNAIL - 16, 360))
    _text(draw, (THUMBNAIL // 2, 436), "needs HiDream-I1 Full: ~40 GB of files", 20)
    _text(draw, (THUMBNAIL // 2, 470), "pictured on the CPU demo", 16, colour=(150, 150, 160))
    return canvas


def sample_thumbnail(results: dict) -> "Image.Image":
    """A LoKr's sample, with what the native HiDream-I1 graph needs."""
    canvas, draw = _canvas()
    _paste(canvas, results["unseen"], (96, 16, 320, 320))
    _text(draw, (THUMBNAIL // 2, 352), "your LoKr in ComfyUI's own", 21)
    _text(draw, (THUMBNAIL // 2, 380), "HiDream-I1 graph (LoraLoaderModelOnly)", 21)
    _text(draw, (THUMBNAIL // 2, 424), "needs HiDream-I1 Full and a saved LoKr", 19)
    _text(draw, (THUMBNAIL // 2, 470), "pictured: the CPU demo's LoKr", 16, colour=(150, 150, 160))
    return canvas


def write_thumbnails(server, run_id: str, live_view_png: Path, written: list) -> None:
    from PIL import Image

    results = demo_results(server, run_id)
    pictures = {DEMO: (demo_thumbnail(results), "the demo's before and after"),
                "hidream_lokr_train": (live_view_thumbnail(Image.open(live_view_png).convert("RGB")),
                                       "the Train node's live view, on the CPU demo"),
                "hidream_lokr_sample_native": (sample_thumbnail(results), "the demo LoKr's sample")}
    for twin, (picture, what) in pictures.items():
        path = template_path(twin, ".jpg")
        picture.save(path, quality=90, optimize=True)
        written.append((path, picture.size, f"template thumbnail: {what}"))


# ------------------------------------------------------------------------------------------------ capture

def capture_demo(page: ComfyPage, data: dict, mode: str, base: Path, written: list) -> tuple[str, Path]:
    """Queue the demo and photograph it mid-run (the whole graph, the Train group, the live view alone) and let
    it finish; returns the run's id and the live view's picture."""
    page.queue()
    page.wait_view(lambda s: s["status"] == "running" and int(s["step"]) >= 20 and int(s["previews"]) >= 2
                   and s["previewShown"], 600, "the demo mid-run with two previews")
    shot = SHOTS / f"{DEMO}_{mode}.png"
    scale, size = _whole_graph(page, shot)
    written.append((shot, size, f"the whole demo graph mid-run, zoom {scale:.2f}"))
    train_node = next(n for n in data["nodes"] if n["type"] == "HiDreamLoKrTrain")
    group = next(g["bounding"] for g in data["groups"]
                 if g["bounding"][0] <= train_node["pos"][0] <= g["bounding"][0] + g["bounding"][2]
                 and g["bounding"][1] <= train_node["pos"][1] <= g["bounding"][1] + g["bounding"][3])
    page.pan_to(group[0] - 10, group[1] - 10, screen=(70, 100))
    close_up = SHOTS / f"train_group_mid_run_{mode}.png"
    page.page.screenshot(path=str(close_up), clip={"x": 0, "y": 0, "width": min(VIEWPORT[0], 1180), "height": 1040})
    live_view = base / "live_view.png"
    page.page.locator(VIEW).screenshot(path=str(live_view))
    if page.view_state()["status"] != "running":
        raise RuntimeError("the demo run ended before the close-up: rerun on a less busy machine")
    written.append((close_up, _downscale(close_up, README_WIDTH),
                    "the Train group mid-run at 100 % (node, settings, live view)"))
    state = page.wait_view(lambda s: s["status"] != "running", 600, "the end of the demo run")
    if state["status"] != "finished":
        raise RuntimeError(f"the demo run ended {state['status']}: {state['message']}")
    return state["runId"], live_view


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
            demo_run = None
            for number, twin in enumerate(TEMPLATES):
                if number:  # a fresh page: no node outputs of the previous graph shown on this one's nodes
                    page.reload()
                data = page.load_template(TEMPLATES[twin])
                page.dismiss_notices()
                if any(n["properties"].get("models") for n in data["nodes"]):
                    page.missing_models_text()  # reads and closes the frontend's missing-model notice
                    page.close_dialogs()
                    page.page.mouse.move(VIEWPORT[0] / 2, VIEWPORT[1] - 40)  # no tooltip left over
                if twin == DEMO:
                    demo_run = capture_demo(page, data, mode, Path(base), written)
                else:
                    shot = SHOTS / f"{twin}_{mode}.png"
                    scale, size = _whole_graph(page, shot)
                    written.append((shot, size, f"the whole graph as it opens, zoom {scale:.2f}"))
            if not vue and demo_run is not None:
                write_thumbnails(server, *demo_run, written)
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
