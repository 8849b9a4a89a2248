// Live training view on the "Train HiDream LoKr" node: loss chart, telemetry, previews and run controls.
//
// Data: the websocket event `hidream_lokr.progress` (one per training step, plus phase / preview / finished
// messages; nodes/run_registry.py) and the pack's HTTP routes (nodes/routes.py) for a run's whole history (a
// reloaded page restores the chart from it), its preview images and the Sample / Save / Stop commands.
// Written against the frontend's public extension API only (app.registerExtension, api.addEventListener,
// api.fetchApi, node.addDOMWidget); talks to nobody but the ComfyUI server.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { LossChart } from "./lib/loss_chart.js";
import { telemetryFields } from "./lib/format.js";

const NODE_TYPE = "HiDreamLoKrTrain";
const EVENT = "hidream_lokr.progress";
const ROUTES = "/hidream_lokr/runs";
const WIDGET_HEIGHT = 420;
const POLL_AFTER_SILENCE_MS = 3000; // a running run with no events for this long: ask the server (other tab, lost ws)

const STYLE = `
.hidream-lokr-live { display:flex; flex-direction:column; gap:4px; font:11px sans-serif; color:#d8d8de;
  background:#222226; border-radius:6px; padding:6px; box-sizing:border-box; width:100%; height:100%; overflow:hidden; }
.hidream-lokr-live .hl-row { display:flex; flex-wrap:wrap; gap:4px 10px; align-items:center; }
.hidream-lokr-live .hl-phase { padding:1px 6px; border-radius:8px; background:#3a3a44; font-weight:bold; }
.hidream-lokr-live .hl-phase[data-phase="training"] { background:#2d5a34; }
.hidream-lokr-live .hl-phase[data-phase="finished"] { background:#2b4870; }
.hidream-lokr-live .hl-phase[data-phase="interrupted"], .hidream-lokr-live .hl-phase[data-phase="failed"] { background:#6a2a2a; }
.hidream-lokr-live canvas { width:100%; flex:1 1 150px; min-height:110px; border-radius:4px; display:block; }
.hidream-lokr-live .hl-previews { display:flex; gap:6px; align-items:flex-start; min-height:0; }
.hidream-lokr-live .hl-preview { width:96px; height:96px; object-fit:contain; background:#111; border-radius:4px; }
.hidream-lokr-live .hl-thumbs { display:flex; flex-wrap:wrap; gap:3px; align-content:flex-start; max-height:96px; overflow:auto; }
.hidream-lokr-live .hl-thumbs button { font-size:10px; padding:1px 4px; background:#333; color:#ccc; border:1px solid #555; border-radius:3px; cursor:pointer; }
.hidream-lokr-live .hl-thumbs button[aria-pressed="true"] { border-color:#ffb347; color:#fff; }
.hidream-lokr-live .hl-buttons button { font-size:11px; padding:2px 8px; border-radius:4px; border:1px solid #666; background:#34343c; color:#eee; cursor:pointer; }
.hidream-lokr-live .hl-buttons button:disabled { opacity:0.4; cursor:default; }
.hidream-lokr-live .hl-message { color:#aaa; min-height:13px; }
`;

function addStyleOnce() {
  if (document.getElementById("hidream-lokr-live-style")) return;
  const style = document.createElement("style");
  style.id = "hidream-lokr-live-style";
  style.textContent = STYLE;
  document.head.appendChild(style);
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** The view of one Train node: owns its DOM, chart and the run it shows. */
class LiveView {
  constructor(node) {
    this.node = node;
    this.runId = null;
    this.status = "idle";
    this.phase = "idle";
    this.lastEvent = null;
    this.previews = []; // {index, step}
    this.selectedPreview = null;
    this.lastMessageAt = 0;
    this._restoring = null;
    this._pending = []; // live messages that arrived while the history was loading, replayed after it
    this._noHistory = new Set(); // runs the server could not give a history for: follow them live only
    this._buildDom();
    this.chart = new LossChart(this.canvas);
    this.chart.onDrawn = (stats) => {
      const d = this.root.dataset;
      d.pointsDrawn = String(stats.pointsDrawn);
      d.columns = String(stats.columns);
      d.draws = String(stats.draws);
      d.drawMs = stats.lastDrawMs.toFixed(3);
    };
    this._renderNow();
    this._poller = setInterval(() => this._pollIfSilent(), 1000);
  }

  _buildDom() {
    const root = el("div", "hidream-lokr-live");
    root.dataset.hidreamLokrLive = "1";
    const top = el("div", "hl-row");
    this.phaseEl = el("span", "hl-phase", "idle");
    this.stepEl = el("span", "hl-step");
    this.speedEl = el("span", "hl-speed");
    this.etaEl = el("span", "hl-eta");
    top.append(this.phaseEl, this.stepEl, this.speedEl, this.etaEl);
    const second = el("div", "hl-row");
    this.lossEl = el("span", "hl-loss");
    this.lrEl = el("span", "hl-lr");
    this.lbEl = el("span", "hl-lb");
    this.memEl = el("span", "hl-mem");
    const logLabel = el("label", "hl-log");
    this.logToggle = el("input");
    this.logToggle.type = "checkbox";
    this.logToggle.addEventListener("change", () => this.chart.setLogScale(this.logToggle.checked));
    logLabel.append(this.logToggle, document.createTextNode(" log"));
    second.append(this.lossEl, this.lrEl, this.lbEl, this.memEl, logLabel);
    this.canvas = el("canvas");
    const previews = el("div", "hl-previews");
    this.previewImg = el("img", "hl-preview");
    this.previewImg.alt = "newest preview";
    this.previewImg.hidden = true;
    this.thumbs = el("div", "hl-thumbs");
    previews.append(this.previewImg, this.thumbs);
    const buttons = el("div", "hl-row hl-buttons");
    this.buttons = {
      sample: el("button", "hl-sample", "Sample now"),
      save: el("button", "hl-save", "Save now"),
      stop: el("button", "hl-stop", "Stop & save"),
    };
    this.buttons.sample.title = "Render the validation previews at the next step boundary";
    this.buttons.save.title = "Write a checkpoint and the LoKr file at the next step boundary; training goes on";
    this.buttons.stop.title = "End the run cleanly at the next step boundary: checkpoint + LoKr become the outputs (Cancel interrupts instead)";
    for (const [command, button] of Object.entries(this.buttons)) {
      button.type = "button";
      button.addEventListener("click", () => this.sendCommand(command));
      buttons.append(button);
    }
    this.messageEl = el("div", "hl-message");
    root.append(top, second, this.canvas, previews, buttons, this.messageEl);
    // The canvas must not start a node drag / canvas pan when clicked.
    root.addEventListener("pointerdown", (e) => e.stopPropagation());
    this.root = root;
    if (typeof ResizeObserver !== "undefined") {
      this._resize = new ResizeObserver(() => this.chart && this.chart.requestDraw());
      this._resize.observe(this.canvas);
    }
  }

  dispose() {
    clearInterval(this._poller);
    if (this._resize) this._resize.disconnect();
  }

  /** A new run (or the first one this page sees) replaces the shown one. */
  _startRun(runId, total) {
    this.runId = runId;
    this.status = "running";
    this.lastEvent = null;
    this.previews = [];
    this.selectedPreview = null;
    this.chart.reset(total || 0);
    this.message("");
  }

  handleMessage(m) {
    if (!m || typeof m.run_id !== "string") return;
    this.lastMessageAt = performance.now();
    if (this._restoring) {
      this._pending.push(m); // applied on top of the history once it is in
      return;
    }
    if (m.run_id !== this.runId) {
      if (m.step > 1 && !this._noHistory.has(m.run_id)) {
        // We joined a run late (page reloaded, second tab): rebuild from the server's history, then this.
        this.restore(m.run_id);
        this._pending.push(m);
        return;
      }
      this._startRun(m.run_id, m.total);
    }
    if (m.total) this.chart.totalSteps = m.total;
    if (m.kind === "preview") {
      this._addPreview(m.preview);
    } else if (m.kind === "finished") {
      this.status = m.status || "finished";
      this.phase = this.status;
      this.message(`run ${this.status} at step ${m.step}`);
    } else {
      if (m.phase) this.phase = m.phase;
      if (m.kind !== "phase" && Number.isFinite(m.loss)) {
        this.chart.push(m.step, m.loss);
        this.lastEvent = m;
      }
    }
    this._render();
  }

  _addPreview(p) {
    if (!p || !Number.isInteger(p.index) || this.previews.some((q) => q.index === p.index)) return;
    this.previews.push({ index: p.index, step: p.step });
    this.previews.sort((a, b) => a.index - b.index);
    this.selectedPreview = null; // follow the newest
  }

  /** Rebuild the view from the server's history of `runId` (default: the newest run of this node). Live messages
   *  arriving meanwhile are held back and replayed on top, so no step is lost or drawn out of order. */
  async restore(runId = null) {
    if (this._restoring) return this._restoring;
    this._pending = [];
    this._restoring = (async () => {
      try {
        if (!runId) {
          if (this.node.id === undefined || this.node.id === null || this.node.id < 0) return;
          const list = await this._getJson(`${ROUTES}?node=${encodeURIComponent(String(this.node.id))}`);
          if (!list || !list.runs || !list.runs.length) return;
          runId = list.runs[list.runs.length - 1].run_id;
        }
        const history = await this._getJson(`${ROUTES}/${encodeURIComponent(runId)}`);
        if (!history) return;
        this._startRun(history.run_id, history.total);
        this._applyHistory(history);
      } catch (error) {
        if (runId) this._noHistory.add(runId); // don't ask again for every message of this run
        this.message(`could not load the run's history: ${error.message || error}`);
      }
    })();
    try {
      await this._restoring;
    } finally {
      this._restoring = null;
      const pending = this._pending;
      this._pending = [];
      for (const m of pending) this.handleMessage(m);
    }
  }

  _applyHistory(history) {
    this.chart.totalSteps = history.total || this.chart.totalSteps;
    for (const e of history.events || []) {
      if (Number.isFinite(e.loss) && this.chart.series.push(e.step, e.loss)) this.lastEvent = { ...e, run_id: history.run_id };
    }
    for (const p of history.previews || []) this._addPreview(p);
    this.status = history.status;
    this.phase = history.status === "running" ? history.phase : history.status;
    this.chart.requestDraw();
    this._render();
  }

  async _pollIfSilent() {
    if (!this.runId || this.status !== "running" || this._restoring) return;
    if (performance.now() - this.lastMessageAt < POLL_AFTER_SILENCE_MS) return;
    if (!this.root.isConnected) return;
    this.lastMessageAt = performance.now();
    try {
      const history = await this._getJson(
        `${ROUTES}/${encodeURIComponent(this.runId)}?since=${this.chart.series.length}`);
      if (history && history.run_id === this.runId) this._applyHistory(history);
    } catch (error) {
      /* the server may be restarting; the next poll tries again */
    }
  }

  async _getJson(route) {
    const response = await api.fetchApi(route, { cache: "no-store" });
    if (!response.ok) throw new Error(`${route}: HTTP ${response.status}`);
    return response.json();
  }

  async sendCommand(command) {
    if (!this.runId || this.status !== "running") return;
    const button = this.buttons[command];
    button.disabled = true;
    try {
      const response = await api.fetchApi(`${ROUTES}/${encodeURIComponent(this.runId)}/command`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ command }),
      });
      const body = await response.json().catch(() => ({}));
      if (response.ok) this.message(`${button.textContent}: ${body.note || "queued"}`);
      else this.message(`${button.textContent} refused: ${body.error || `HTTP ${response.status}`}`);
      this.root.dataset.lastCommand = `${command}:${response.status}`;
    } catch (error) {
      this.message(`${button.textContent} failed: ${error.message || error}`);
    } finally {
      button.disabled = this.status !== "running";
    }
  }

  /** ComfyUI reports the node failed or was cancelled: the run will send nothing more. */
  executionEnded(status, text) {
    if (this.status !== "running") return;
    this.status = status;
    this.phase = status;
    this.message(text);
    this._render();
  }

  message(text) {
    this.messageEl.textContent = text;
  }

  /** Telemetry and buttons are refreshed at most once per animation frame, however fast events come. */
  _render() {
    if (this._renderFrame) return;
    const raf = window.requestAnimationFrame || ((f) => setTimeout(f, 16));
    this._renderFrame = raf(() => {
      this._renderFrame = null;
      this._renderNow();
    });
  }

  _renderNow() {
    const t = telemetryFields(this.lastEvent);
    const running = this.status === "running";
    this.phaseEl.textContent = this.phase;
    this.phaseEl.dataset.phase = this.phase;
    this.stepEl.textContent = this.lastEvent ? `step ${t.step}` : (this.runId ? "step 0" : "no run yet");
    this.speedEl.textContent = running ? t.speed : "";
    this.etaEl.textContent = running ? t.eta : "";
    this.lossEl.textContent = t.loss;
    this.lrEl.textContent = t.lr;
    this.lbEl.textContent = t.lb;
    this.memEl.textContent = t.memory;
    for (const button of Object.values(this.buttons)) {
      button.disabled = !running;
    }
    this._renderPreviews();
    const d = this.root.dataset;
    d.runId = this.runId || "";
    d.status = this.status;
    d.phase = this.phase;
    d.step = String(this.lastEvent ? this.lastEvent.step : 0);
    d.total = String(this.chart.totalSteps || 0);
    d.points = String(this.chart.series.length);
    d.previews = String(this.previews.length);
  }

  _renderPreviews() {
    const count = this.previews.length;
    if (this.thumbs.childElementCount !== count) {
      this.thumbs.replaceChildren(...this.previews.map((p) => {
        const b = el("button", null, `step ${p.step}`);
        b.type = "button";
        b.dataset.index = String(p.index);
        b.addEventListener("click", () => {
          this.selectedPreview = p.index;
          this._renderPreviews();
        });
        return b;
      }));
    }
    if (!count) {
      this.previewImg.hidden = true;
      return;
    }
    const shown = this.selectedPreview ?? this.previews[count - 1].index;
    for (const b of this.thumbs.children) b.setAttribute("aria-pressed", String(Number(b.dataset.index) === shown));
    const src = api.apiURL(`${ROUTES}/${encodeURIComponent(this.runId)}/previews/${shown}`);
    if (this.previewImg.dataset.src !== src) {
      this.previewImg.dataset.src = src;
      this.previewImg.dataset.index = String(shown);
      this.previewImg.src = src;
      const p = this.previews.find((q) => q.index === shown);
      this.previewImg.title = p ? `preview at step ${p.step}` : "";
    }
    this.previewImg.hidden = false;
  }
}

function viewsForMessage(m) {
  const graph = app.graph;
  if (!graph) return [];
  const trainNodes = (graph._nodes || graph.nodes || []).filter((n) => n.hidreamLokrView);
  const byId = trainNodes.filter((n) => String(n.id) === String(m.node));
  if (byId.length) return byId.map((n) => n.hidreamLokrView);
  const byRun = trainNodes.filter((n) => n.hidreamLokrView.runId === m.run_id);
  if (byRun.length) return byRun.map((n) => n.hidreamLokrView);
  return trainNodes.length === 1 ? [trainNodes[0].hidreamLokrView] : [];
}

function attachView(node) {
  if (node.hidreamLokrView) return node.hidreamLokrView;
  addStyleOnce();
  const view = new LiveView(node);
  const widget = node.addDOMWidget("hidream_lokr_live", "hidream_lokr_live", view.root, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => WIDGET_HEIGHT,
    getHeight: () => WIDGET_HEIGHT,
  });
  widget.serialize = false; // nothing of the view goes into the workflow or the prompt
  node.hidreamLokrView = view;
  if (node.size && node.size[0] < 460) node.size[0] = 460;
  const onRemoved = node.onRemoved;
  node.onRemoved = function () {
    view.dispose();
    return onRemoved?.apply(this, arguments);
  };
  return view;
}

// Listen as soon as this module loads, not in setup(): the websocket may already be delivering a running
// training's events (after a reload), and the frontend reports message types nobody listens to as errors.
api.addEventListener(EVENT, ({ detail }) => {
  for (const view of viewsForMessage(detail)) view.handleMessage(detail);
});

app.registerExtension({
  name: "hidream_lokr.live_training_view",

  async setup() {
    const endedOn = (status) => ({ detail }) => {
      const node = app.graph?.getNodeById?.(detail?.node_id ?? detail?.node);
      if (node?.hidreamLokrView) {
        node.hidreamLokrView.executionEnded(status, detail.exception_message ? `error: ${detail.exception_message}` : `run ${status}`);
      }
    };
    api.addEventListener("execution_error", endedOn("failed"));
    api.addEventListener("execution_interrupted", endedOn("interrupted"));
    // After a reload the websocket reconnects with the same client id; catch up on anything missed meanwhile.
    api.addEventListener("reconnected", () => {
      for (const n of app.graph?._nodes || []) if (n.hidreamLokrView) n.hidreamLokrView.restore(n.hidreamLokrView.runId);
    });
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_TYPE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      attachView(this);
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      // A loaded workflow (also after a page reload) knows its node id now: show its newest run, if any.
      const view = attachView(this);
      if (!view.runId) setTimeout(() => view.restore(), 0);
      return result;
    };
  },
});
