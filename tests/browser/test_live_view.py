"""The live training view in a real browser, on the frontend ComfyUI 0.3.75 pins and on the newest one.

Every test talks to a real ComfyUI server running the real node pack (conftest.comfy_ui) through headless Chromium.
Figures (draw time, event rates) are printed, never asserted.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import requests

from browser_page import REPO, ComfyPage

STEPS = 40  # a few dozen 128 px steps of the tiny model: long enough to reload the page in the middle
PREVIEW_EVERY = 10
COMMAND_RUN_STEPS = 2000  # the button test ends its run with Stop & save long before this


def _runs(server, **query) -> list[dict]:
    return requests.get(f"{server.url}/hidream_lokr/runs", params=query, timeout=30).json()["runs"]


def _history(server, run_id: str) -> dict:
    response = requests.get(f"{server.url}/api/hidream_lokr/runs/{run_id}", timeout=30)
    response.raise_for_status()
    return response.json()


def _open(browser, server, version) -> ComfyPage:
    page = ComfyPage(browser, server.url)
    page.open()
    assert page.frontend_version() == version, "the server is not serving the frontend this test is for"
    page.set_vue_nodes(False)  # the classic canvas (test_workflow_layout.py covers Vue nodes)
    return page


def _queue_demo(page: ComfyPage, **widgets) -> str:
    source = page.load_demo_workflow()
    page.set_train_widgets(widgets)
    page.queue()
    return source


def _assert_clean(page: ComfyPage) -> None:
    assert not page.extension_errors(), "\n".join(page.extension_errors())
    # Whatever the page asked of this pack went to the ComfyUI server. (The frontend itself may try its own
    # registry or model hosts; ComfyUI's content security policy blocks those, and they are not this pack's.)
    ours = [u for u in page.external_requests if any(k in u.lower() for k in ("hidream_lokr", "hidream-lokr"))]
    assert not ours, ours


def test_web_code_talks_only_to_the_comfyui_server():
    """The extension builds every URL from the frontend's api object (same origin): no absolute URL, no host."""
    for path in sorted((REPO / "web").rglob("*.js")):
        code = path.read_text()
        for forbidden in ("://", "fetch(", "XMLHttpRequest", "WebSocket(", "EventSource(", "sendBeacon("):
            assert forbidden not in code, f"{path} contains {forbidden!r} (use api.fetchApi / api.apiURL)"
    assert "api.fetchApi(" in (REPO / "web" / "hidream_lokr_live.js").read_text()


def test_live_view_follows_a_run_and_survives_a_reload(comfy_ui, browser, artifacts):
    server, version = comfy_ui
    page = _open(browser, server, version)
    try:
        source = page.load_demo_workflow()
        idle = page.view_state()
        assert idle is not None, "the Train node has no live view"
        assert idle["status"] == "idle" and idle["message"].startswith("No run yet: queue the graph")
        assert idle["size"] == "compact" and not idle["stopEnabled"]
        page.set_train_widgets(dict(max_train_steps=STEPS, validation_step_interval=PREVIEW_EVERY,
                                    validation_num_inference_steps=4, seed=1234, output_name=f"browser_{version}"))
        page.queue()

        early = page.wait_view(lambda s: int(s["step"]) >= 3, 240, "the first training steps on the chart")
        assert early["runId"] and early["status"] == "running"
        # The memory plan's verdict, made before training (a CPU run: against the host's memory), on the node.
        assert re.search(r"plan: fits in [0-9.]+ GiB: needs [0-9.]+ GiB \([a-z -]+ peaks at [0-9.]+ GiB",
                         early["message"]), early["message"]
        assert " / %d" % STEPS in early["telemetry"] and "it/s" in early["telemetry"] and "ETA" in early["telemetry"]
        assert int(early["pointsDrawn"]) >= int(early["step"]) - 1  # the draw of the newest point may be pending
        mid = page.wait_view(lambda s: int(s["step"]) >= 12 and int(s["previews"]) >= 1 and s["previewShown"],
                             120, "a preview on the node")
        assert mid["telemetry"] != early["telemetry"], "the telemetry text did not change between steps"
        shot = artifacts / f"live_view_{version}_mid_run.png"
        page.screenshot_view(shot)
        assert shot.stat().st_size > 10_000
        # The preview is validation_prompt's image itself (128 px here), not the labelled grid; it enlarges on a
        # click. Nothing of ComfyUI's own (image preview, progress text) is drawn under the view.
        assert mid["previewSize"] == [128, 128], mid["previewSize"]
        page.center_on_train_node()
        page.page.wait_for_timeout(300)
        page.page.locator("[data-hidream-lokr-live] img.hl-preview").click()
        page.page.wait_for_selector("[data-hidream-lokr-lightbox] img", timeout=5000)
        page.page.keyboard.press("Escape")
        page.page.wait_for_selector("[data-hidream-lokr-lightbox]", state="detached", timeout=5000)
        size_mid_run = page.train_node_box()

        # Reload mid-run: the chart comes back from the server's history and keeps following the run.
        before = page.view_state()
        page.reload()
        restored = page.wait_view(lambda s: s["runId"] == before["runId"] and int(s["points"]) >= int(before["points"]),
                                  60, "the chart restored after the reload")
        assert int(restored["pointsDrawn"]) >= int(before["points"]) or restored["status"] == "running"

        done = page.wait_view(lambda s: s["status"] != "running", 300, "the end of the run")
        assert done["status"] == "finished", done
        assert "Queueing this graph again returns it without training" in done["message"]
        assert done.get("lastToast") == "finished"  # a frontend toast said so (toast API of this frontend)
        size_after = page.train_node_box()
        assert abs(size_after["height"] - size_mid_run["height"]) < 1 and size_after["width"] == size_mid_run["width"]
        assert not page.page.evaluate(
            """() => { const n = window.comfyAPI.app.app.graph._nodes.find(n => n.type === 'HiDreamLoKrTrain');
                       return (n.imgs || []).length; }""")
        done = page.wait_view(lambda s: int(s["pointsDrawn"]) >= int(s["points"]), 10, "the last draw")
        history = _history(server, done["runId"])
        steps_run = len(history["events"])
        assert steps_run == STEPS and history["status"] == "finished"
        assert int(done["points"]) == steps_run and int(done["pointsDrawn"]) >= steps_run
        assert f"{STEPS} / {STEPS}" in done["telemetry"]
        # previews: step 0 (the base model), every PREVIEW_EVERY steps and the final one
        assert int(done["previews"]) == len(history["previews"]) >= STEPS // PREVIEW_EVERY
        assert done["thumbs"] == int(done["previews"]) and done["previewShown"]
        assert done["previewSrc"].endswith(f"/previews/{len(history['previews']) - 1}")

        # An earlier preview on click.
        page.center_on_train_node()
        page.page.wait_for_timeout(300)
        page.page.locator("[data-hidream-lokr-live] .hl-thumbs button").first.click()
        page.page.wait_for_function(
            """() => { const i = document.querySelector('[data-hidream-lokr-live] img.hl-preview');
                       return i.getAttribute('src').endsWith('/previews/0') && i.complete && i.naturalWidth > 0; }""",
            timeout=10000)

        # Log scale redraws the same points.
        draws = int(page.view_state()["draws"])
        page.page.locator("[data-hidream-lokr-live] .hl-log input").check()
        page.wait_view(lambda s: int(s["draws"]) > draws and int(s["pointsDrawn"]) >= steps_run, 10,
                       "a log-scale redraw")

        # Lost websocket messages (ComfyUI 0.3.75 can drop a reloaded page's new socket for a while): a step
        # message after a gap in the chart, or the end message past its last step, completes it from the history;
        # also when the end comes while a history taken before the lost steps is loading (a reloaded page joining a
        # fast run), and when a restore is asked for during another. And a reloaded page whose first message of the
        # run is a preview (it has no step) joins the run from its history, not as a new run from that point on:
        # the case CI caught (a chart of steps 21-40 of 40).
        for lost in ("step", "finished", "finished during a stale restore", "restore during a stale restore",
                     "a preview first"):
            page.page.evaluate(
                """([lost, runId, last]) => {
                     const node = window.comfyAPI.app.app.graph._nodes.find(n => n.type === 'HiDreamLoKrTrain');
                     const view = node.hidreamLokrView;
                     view._gapRestores = 0;  // each case may reload the history again
                     view.chart.series.length = 10;  // as if the messages of steps 11.. never came
                     view._renderNow();  // the view's state says so before the case begins
                     const end = { run_id: runId, kind: 'finished', status: 'finished', step: last };
                     if (lost === 'step') view.handleMessage({ run_id: runId, step: last, loss: 0.5 });
                     else if (lost === 'a preview first') {
                       view.runId = null;  // the run this page has not heard of yet
                       view.handleMessage({ run_id: runId, kind: 'preview', preview: { index: 1, step: 10 } });
                     }
                     else if (lost === 'finished') view.handleMessage(end);
                     else {
                       // The next history the view loads is the one it would have got at step 10, still running.
                       const getJson = view._getJson;
                       view._getJson = async function (route) {
                         view._getJson = getJson;
                         const history = await getJson.call(view, route);
                         return { ...history, status: 'running', events: history.events.slice(0, 10),
                                  previews: history.previews.slice(0, 1) };
                       };
                       view.restore(runId);
                       if (lost.startsWith('finished')) view.handleMessage(end);
                       else view.restore(runId);
                     }
                     view.lastMessageAt = Infinity;  // no poll of a silent run: each case mends the chart itself
                   }""", [lost, done["runId"], steps_run])
            completed = page.wait_view(lambda s: int(s["points"]) == steps_run and s["status"] == "finished", 30,
                                       f"the chart completed after a lost {lost} message")
            assert int(completed["previews"]) == len(history["previews"])

        # The chart stays on the node after the run, also for a page opened later.
        page.reload()
        again = page.wait_view(lambda s: s["status"] == "finished" and int(s["pointsDrawn"]) >= steps_run, 60,
                               "the finished run's chart after another reload")
        assert again["runId"] == done["runId"]
        assert abs(page.train_node_box()["height"] - size_mid_run["height"]) < 1  # the same size after reloads
        _assert_clean(page)
        print(f"\n[{version}] workflow {source}; {steps_run} steps; view draw {done['drawMs']} ms; "
              f"screenshot {shot.relative_to(REPO)}")
    finally:
        page.close(artifacts / f"end_live_view_{version}.png")


def test_buttons_sample_save_and_stop_then_queue_again_resumes(comfy_ui, browser, artifacts):
    """The buttons act only between training steps (not during the step-0 previews); Sample now, Save now and
    Stop & save reach the running training at its next step boundary, and a button's note ("runs at the next step
    boundary") goes once its command is done; Stop & save ends with a preview of the LoKr it stops with; after it
    the view says so and how to continue, and queueing again continues the run from its checkpoint with the whole
    loss history drawn."""
    server, version = comfy_ui
    page = _open(browser, server, version)
    try:
        # 60 sampling steps make the step-0 previews last long enough to look at the buttons meanwhile.
        _queue_demo(page, max_train_steps=COMMAND_RUN_STEPS, validation_step_interval=0,
                    validation_num_inference_steps=60, seed=4321, output_name=f"buttons_{version}")
        validating = page.wait_view(lambda s: s["phase"] == "validating", 240, "the step-0 previews")
        assert not validating["stopEnabled"] and validating["acceptsCommands"] == "false"
        state = page.wait_view(lambda s: s["status"] == "running" and int(s["step"]) >= 2, 240,
                               "a running training")
        assert page.wait_view(lambda s: s["stopEnabled"], 10, "the buttons enabled while training")
        run = _history(server, state["runId"])
        output_dir = Path(run["output_dir"])

        # Sample now: a preview at a step that is no preview interval.
        previews = int(state["previews"])
        page.click_button("Sample now")
        page.wait_view(lambda s: s["message"] == "Sample now: runs at the next step boundary", 10,
                       "Sample now's note on the view")
        sampled = page.wait_view(lambda s: int(s["previews"]) > previews, 120, "the preview Sample now asked for")
        assert _history(server, state["runId"])["previews"][-1]["step"] > 0
        assert "next step boundary" not in sampled["message"], sampled["message"]  # gone as the preview landed

        # Save now: a checkpoint and the LoKr file on disk while training goes on.
        page.click_button("Save now")
        lokr = output_dir / "pytorch_lora_weights.safetensors"
        deadline = time.time() + 120
        while time.time() < deadline and not (list(output_dir.glob("checkpoint-*")) and lokr.is_file()):
            time.sleep(0.3)  # the checkpoint folder comes first, the LoKr file right after it
        checkpoints = sorted(output_dir.glob("checkpoint-*"))
        assert checkpoints, f"Save now wrote no checkpoint under {output_dir}"
        assert lokr.is_file(), f"Save now wrote no LoKr file into {output_dir}"
        saved_at = int(checkpoints[-1].name.split("-")[1])
        going_on = page.wait_view(lambda s: int(s["step"]) >= saved_at + 3 and s["status"] == "running", 120,
                                  "training going on after Save now")
        assert "Save now" not in going_on["message"], going_on["message"]  # the note went once it was done

        # Stop & save: the run ends cleanly, with outputs, long before its planned steps; the view says it
        # stopped early and what continues it.
        page.click_button("Stop & save")
        done = page.wait_view(lambda s: s["status"] != "running", 180, "the run to end after Stop & save")
        assert done["status"] == "stopped" and done["label"] == "stopped early", done
        history = _history(server, state["runId"])
        assert len(history["events"]) < COMMAND_RUN_STEPS
        last_step = history["events"][-1]["step"]
        assert f"Stopped early at step {last_step} of {COMMAND_RUN_STEPS}" in done["message"]
        assert f"Queue again to continue from step {last_step}" in done["message"]
        assert done.get("lastToast") == "stopped" and not done["stopEnabled"]
        assert (output_dir / f"checkpoint-{last_step}").is_dir()
        assert (output_dir / "pytorch_lora_weights.safetensors").is_file()
        # A preview of the LoKr it stopped with is the newest, on the view too.
        assert history["previews"][-1]["step"] == last_step, history["previews"]
        newest = f"/previews/{len(history['previews']) - 1}"
        page.wait_view(lambda s: int(s["previews"]) == len(history["previews"]) and s["previewShown"]
                       and s["previewSrc"].endswith(newest), 10, "the stop preview on the view")
        prompt_id = history["prompt_id"]
        if prompt_id:
            entry = server.wait(prompt_id, timeout=300)
            assert entry["status"]["status_str"] == "success"
        assert sampled["previewShown"] or int(sampled["previews"]) > 0

        # Queue again, unchanged: the run continues from its checkpoint, its chart whole from step 1.
        page.queue()
        resumed = page.wait_view(lambda s: s["runId"] != state["runId"] and s["resumedFrom"] == str(last_step)
                                 and int(s["step"]) > last_step, 240, "the resumed run")
        assert resumed["resumedText"] == f"resumed from step {last_step}"
        assert int(resumed["points"]) >= last_step + 1
        resumed_history = _history(server, resumed["runId"])
        assert resumed_history["output_dir"] == str(output_dir)
        assert [e["step"] for e in resumed_history["events"][:last_step]] == list(range(1, last_step + 1))
        server.interrupt()  # Cancel: ComfyUI's interrupt
        cancelled = page.wait_view(lambda s: s["status"] != "running", 180, "the end after Cancel")
        assert cancelled["status"] == "interrupted" and cancelled["label"] == "cancelled"
        assert "Queue again to continue from step" in cancelled["message"]
        assert cancelled.get("lastToast") == "interrupted"
        _assert_clean(page)
    finally:
        page.close(artifacts / f"end_buttons_{version}.png")


def test_routes_reject_malformed_and_foreign_requests(comfy_ui):
    server, _ = comfy_ui
    runs = _runs(server)
    assert runs, "the live-view test should have left a run behind"
    finished = next(r for r in runs if r["status"] != "running")["run_id"]
    base = f"{server.url}/hidream_lokr/runs"

    def get(path, **params):
        return requests.get(base + path, params=params, timeout=30)

    def post(path, **kwargs):
        return requests.post(base + path, timeout=30, **kwargs)

    assert get("").status_code == 200 and get("/latest").json()["run_id"] == runs[-1]["run_id"]
    assert get("", node="x" * 500).status_code == 400
    assert get("/latest", node="no-such-node").status_code == 404
    assert get("/not-a-run").status_code == 400
    assert get("/999999-deadbeef").status_code == 404
    assert get(f"/{finished}", since="-1").status_code == 400
    assert get(f"/{finished}", since="abc").status_code == 400
    assert get(f"/{finished}", since="5").json()["since"] == 5
    assert get(f"/{finished}/previews/99999").status_code == 404
    assert get(f"/{finished}/previews/-1").status_code == 400
    for hostile in ("..%2F..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd"):
        response = requests.get(f"{base}/{finished}/previews/{hostile}", timeout=30)
        assert response.status_code in (400, 404) and "root:" not in response.text

    bad_bodies = [
        {"data": b"not json"},
        {"data": b"\xff\xfe"},
        {"json": ["stop"]},
        {"json": {"command": 1}},
        {"json": {"command": "rm -rf /"}},
        {"json": {"command": "stop", "run_id": "another"}},
        {"json": {}},
        {"data": json.dumps({"command": "stop", "pad": "x" * 10_000}).encode()},
    ]
    for body in bad_bodies:
        response = post(f"/{finished}/command", **body)
        assert response.status_code == 400, (body, response.status_code, response.text)
        assert response.json()["error"]
    assert post("/999999-deadbeef/command", json={"command": "stop"}).status_code == 404
    assert post("/..%2F..%2Fprompt/command", json={"command": "stop"}).status_code in (400, 404)
    refused = post(f"/{finished}/command", json={"command": "stop"})
    assert refused.status_code == 409 and "finished" in refused.json()["error"]
    # Nothing reached any run's queue.
    assert all(not r["pending_commands"] for r in _runs(server))


def test_measure_chart_and_event_rates(comfy_ui, browser, artifacts):
    """Prints the draw time of 10,000 and 100,000 points and how many progress events per second the page takes
    while staying smooth; asserts only that every point arrived."""
    server, version = comfy_ui
    page = _open(browser, server, version)
    try:
        page.load_demo_workflow()  # a settled graph: its Train node's view receives the synthetic events
        figures = page.page.evaluate(BENCHMARK_JS)
        for rate in figures["rates"]:
            assert rate["points"] == rate["sent"], rate
        assert figures["draw"]["10000"]["pointsDrawn"] == 10000
        (artifacts / f"benchmark_{version}.json").write_text(json.dumps(figures, indent=1))
        lines = [f"[{version}] chart redraw: " + ", ".join(
            f"{n} points {v['median_ms']:.2f} ms (max {v['max_ms']:.2f})" for n, v in figures["draw"].items())]
        for r in figures["rates"]:
            lines.append(f"[{version}] {r['target_per_s']:>6} events/s offered -> {r['handled_per_s']:.0f}/s handled, "
                         f"{r['handler_us']:.1f} us per event, frame interval p95 {r['frame_p95_ms']:.1f} ms, "
                         f"max {r['frame_max_ms']:.1f} ms, {r['draws']} draws")
        print("\n" + "\n".join(lines))
        _assert_clean(page)
    finally:
        page.close()


# Runs in the page: a chart of N synthetic points (median of 15 draws), then synthetic hidream_lokr.progress
# events dispatched through the frontend's api object at increasing rates into the demo Train node's view, with
# requestAnimationFrame intervals recorded as the measure of lag. Synthetic run ids never match a server run.
BENCHMARK_JS = r"""
async () => {
  const app = window.comfyAPI.app.app;
  const api = window.comfyAPI.api.api;
  const base = new URL('extensions/ComfyUI-HiDream-LoKr/lib/loss_chart.js', location.href).href;
  const { LossChart } = await import(base);
  const canvas = document.createElement('canvas');
  canvas.style.cssText = 'position:fixed;left:0;top:0;width:440px;height:180px';
  document.body.appendChild(canvas);
  const draw = {};
  for (const n of [10000, 100000]) {
    const chart = new LossChart(canvas);
    for (let i = 1; i <= n; i++) chart.series.push(i, 1 + Math.sin(i / 50) * 0.3 + Math.random() * 0.2);
    const times = [];
    for (let k = 0; k < 15; k++) { const t = performance.now(); chart.draw(); times.push(performance.now() - t); }
    times.sort((a, b) => a - b);
    draw[n] = { median_ms: times[7], max_ms: times[14], pointsDrawn: chart.stats.pointsDrawn };
  }
  canvas.remove();

  const node = app.graph._nodes.find((n) => n.type === 'HiDreamLoKrTrain');
  const view = node.hidreamLokrView;
  const rates = [];
  let runNo = 0;
  for (const target of [100, 1000, 10000]) {
    const runId = `9${runNo++}-benchmark`;
    const seconds = 2;
    const sent = target * seconds;
    const frames = [];
    let rafOn = true;
    const tick = (t) => { frames.push(t); if (rafOn) requestAnimationFrame(tick); };
    requestAnimationFrame(tick);
    const drawsBefore = view.chart.stats.draws;
    let handlerMs = 0;
    const started = performance.now();
    await new Promise((resolve) => {
      let i = 0;
      // Each timer tick sends the events due by now (timers fire every 4-16 ms): the offered rate is exact.
      const timer = setInterval(() => {
        const due = Math.min(sent, Math.floor(((performance.now() - started) / 1000) * target) + 1);
        while (i < due) {
          i++;
          const detail = { run_id: runId, node: String(node.id), step: i, total: sent, loss: 1 / (1 + i / 100) + Math.random() * 0.1,
                           lr: 1e-4, load_balancing_loss: 0.01, it_per_s: target, eta_s: (sent - i) / target,
                           peak_memory_bytes: 2 ** 30, phase: 'training' };
          const t = performance.now();
          api.dispatchEvent(new CustomEvent('hidream_lokr.progress', { detail }));
          handlerMs += performance.now() - t;
        }
        if (i >= sent) { clearInterval(timer); resolve(); }
      }, 4);
    });
    const elapsed = (performance.now() - started) / 1000;
    await new Promise((r) => setTimeout(r, 200));
    rafOn = false;
    const gaps = frames.slice(1).map((t, j) => t - frames[j]).sort((a, b) => a - b);
    rates.push({ target_per_s: target, sent, points: view.chart.series.length, handled_per_s: sent / elapsed,
                 handler_us: (handlerMs / sent) * 1000, frame_p95_ms: gaps[Math.floor(gaps.length * 0.95)] || 0,
                 frame_max_ms: gaps[gaps.length - 1] || 0, draws: view.chart.stats.draws - drawsBefore,
                 last_draw_ms: view.chart.stats.lastDrawMs });
  }
  return { draw, rates };
}
"""
