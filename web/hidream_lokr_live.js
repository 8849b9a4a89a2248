// Live training view on the "Train HiDream LoKr" node: status, loss chart, telemetry, the newest preview and the
// run controls; plus the node's size rules and the loading of workflows saved with the node's first layout.
//
// Data: the websocket event `hidream_lokr.progress` (one per training step, plus phase / preview / message /
// resumed / returned / finished messages; nodes/run_registry.py) and the pack's HTTP routes (nodes/routes.py) for
// a run's whole history (a reloaded page, or a resumed run, draws its chart from it), its preview images and the
// Sample / Save / Stop commands. Written against the frontend's documented extension API only
// (app.registerExtension, app.graph / app.rootGraph and LiteGraph's graph methods, api.addEventListener,
// api.fetchApi, node.addDOMWidget, app.extensionManager.toast), each feature-detected: what a frontend lacks is
// named in one console warning (`needs`), never silently skipped. Talks to nobody but the ComfyUI server. Works
// with the classic canvas and with Vue nodes ("Nodes 2.0"), and for a Train node inside a subgraph: the server
// names such a node by its execution id, the path of subgraph node ids from the root graph ("12:3").

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { LossChart } from "./lib/loss_chart.js";
import { telemetryFields } from "./lib/format.js";

const NODE_TYPE = "HiDreamLoKrTrain";
const EVENT = "hidream_lokr.progress";
const ROUTES = "/hidream_lokr/runs";
const MIN_WIDTH = 480; // chart and preview side by side stay readable
const HEIGHT = { compact: 76, full: 318 }; // the view before any run / once it shows one
const POLL_AFTER_SILENCE_MS = 3000; // a running run with no events for this long: ask the server (other tab, lost ws)
const LAYOUT = 2; // properties.hidream_lokr_layout: essentials on the node, the rest on settings nodes
// The Train node's widgets in its first layout (every setting on the node); "control_after_generate" is the seed's
// companion value. Same list as nodes/train_settings.py LEGACY_TRAIN_WIDGETS.
const LEGACY_WIDGETS = [
  "max_train_steps", "learning_rate", "optimizer", "lr_scheduler", "lr_warmup_steps", "train_batch_size",
  "gradient_accumulation_steps", "gradient_checkpointing", "mixed_precision", "flow_schedule_shift",
  "flow_schedule_auto_shift", "hidream_use_load_balancing_loss", "hidream_load_balancing_loss_weight",
  "caption_dropout_probability", "seed", "control_after_generate", "output_name", "validation_prompt",
  "validation_negative_prompt", "validation_step_interval", "validation_resolution",
  "validation_num_inference_steps", "validation_guidance", "use_ema", "ema_decay", "checkpoint_step_interval",
  "checkpoints_total_limit", "resume_from_checkpoint", "offload_blocks",
];
const STATUS_LABEL = { idle: "idle", running: "running", finished: "finished", stopped: "stopped early",
                       interrupted: "cancelled", failed: "failed" };
const TOAST = { finished: ["success", "Training finished"], stopped: ["info", "Training stopped early"],
                interrupted: ["warning", "Training cancelled"], failed: ["error", "Training failed"] };

const STYLE = `
.hidream-lokr-live { display:flex; flex-direction:column; gap:4px; font:11px sans-serif; color:#d8d8de;
  background:#222226; border-radius:6px; padding:6px; box-sizing:border-box; width:100%; overflow:hidden; }
.hidream-lokr-live .hl-row { display:flex; flex-wrap:wrap; gap:2px 10px; align-items:center; min-height:16px; }
.hidream-lokr-live .hl-phase { padding:1px 7px; border-radius:8px; background:#3a3a44; font-weight:bold; }
.hidream-lokr-live .hl-phase[data-status="running"] { background:#2d5a34; }
.hidream-lokr-live .hl-phase[data-status="finished"] { background:#2b4870; }
.hidream-lokr-live .hl-phase[data-status="stopped"] { background:#6a5a24; }
.hidream-lokr-live .hl-phase[data-status="interrupted"], .hidream-lokr-live .hl-phase[data-status="failed"] { background:#6a2a2a; }
.hidream-lokr-live .hl-resumed { color:#ffb347; }
.hidream-lokr-live .hl-main { display:flex; gap:6px; height:172px; min-height:0; }
.hidream-lokr-live canvas { flex:1 1 auto; min-width:0; height:100%; border-radius:4px; display:block; }
.hidream-lokr-live .hl-preview-box { flex:0 0 172px; height:172px; display:flex; align-items:center; justify-content:center;
  background:#111; border-radius:4px; color:#777; text-align:center; font-size:10px; }
.hidream-lokr-live .hl-preview { width:100%; height:100%; object-fit:contain; cursor:zoom-in; }
.hidream-lokr-live .hl-preview[data-small="1"] { image-rendering:pixelated; }
.hidream-lokr-live .hl-thumbs { display:flex; gap:3px; overflow-x:auto; overflow-y:hidden; white-space:nowrap; min-height:18px; }
.hidream-lokr-live .hl-thumbs button { flex:0 0 auto; font-size:10px; padding:1px 4px; background:#333; color:#ccc; border:1px solid #555; border-radius:3px; cursor:pointer; }
.hidream-lokr-live .hl-thumbs button[aria-pressed="true"] { border-color:#ffb347; color:#fff; }
.hidream-lokr-live .hl-buttons button { font-size:11px; padding:2px 8px; border-radius:4px; border:1px solid #666; background:#34343c; color:#eee; cursor:pointer; }
.hidream-lokr-live .hl-buttons button:disabled { opacity:0.4; cursor:default; }
.hidream-lokr-live .hl-message { color:#b8b8c0; line-height:13px; max-height:40px; overflow:hidden; }
.hidream-lokr-live[data-size="compact"] .hl-full { display:none; }
.hidream-lokr-lightbox { position:fixed; inset:0; z-index:10000; background:rgba(0,0,0,0.82); display:flex; flex-direction:column;
  align-items:center; justify-content:center; gap:8px; cursor:zoom-out; color:#ddd; font:13px sans-serif; }
.hidream-lokr-lightbox img { max-width:92vw; max-height:86vh; min-width:min(512px, 92vw); object-fit:contain; image-rendering:pixelated; background:#111; }
`;

// ------------------------------------------------------------------------------------------------ frontend API

const warned = new Set();

/** `value` when this frontend has it; otherwise one console warning naming what is missing and what the view
 *  cannot do without it, and undefined. */
function needs(what, value, consequence) {
  if (value !== undefined && value !== null) return value;
  if (!warned.has(what)) {
    warned.add(what);
    console.warn(`hidream_lokr: this ComfyUI frontend has no ${what}; ${consequence}`);
  }
  return undefined;
}

function rootGraph() {
  return needs("app.rootGraph or app.graph", app.rootGraph ?? app.graph, "the live view cannot find its nodes");
}

function graphNodes(graph) {
  return needs("LGraph.nodes", graph?.nodes, "the live view cannot look for Train nodes in subgraphs") || [];
}

function nodeById(graph, id) {
  const get = needs("LGraph.getNodeById", graph?.getNodeById, "the live view cannot find a node by its id");
  if (!get) return null;
  return get.call(graph, id) ?? (/^-?\d+$/.test(String(id)) ? get.call(graph, Number(id)) : null) ?? null;
}

/** The node the server means by an execution id: "7" in the root graph, "12:3" node 3 inside the subgraph of the
 *  root graph's node 12 (and so on, one id per level). */
function nodeByExecutionId(executionId) {
  if (executionId === undefined || executionId === null) return null;
  const parts = String(executionId).split(":");
  let graph = rootGraph();
  for (const part of parts.slice(0, -1)) {
    const host = nodeById(graph, part);
    if (!host?.isSubgraphNode?.() || !host.subgraph) return null;
    graph = host.subgraph;
  }
  return nodeById(graph, parts[parts.length - 1]);
}

/** The execution id of `node` (see nodeByExecutionId): its id, after the ids of the subgraph nodes that lead to
 *  its graph from the root graph (the first such path when a subgraph is used more than once); null if not found. */
function executionIdOf(node) {
  const root = rootGraph();
  if (!node || node.id === undefined || node.id === null || node.id < 0) return null;
  if (!node.graph || node.graph === root || node.graph.isRootGraph) return String(node.id);
  const search = (graph, path, depth) => {
    for (const host of graphNodes(graph)) {
      if (!host.isSubgraphNode?.() || !host.subgraph) continue;
      const here = [...path, host.id];
      if (host.subgraph === node.graph) return here;
      const deeper = depth < 16 ? search(host.subgraph, here, depth + 1) : null;
      if (deeper) return deeper;
    }
    return null;
  };
  const path = search(root, [], 0);
  return path ? [...path, node.id].join(":") : null;
}

/** A new node of `type` (LiteGraph.createNode, the documented way to make one). */
function createNode(type) {
  const liteGraph = needs("LiteGraph.createNode", globalThis.LiteGraph?.createNode ? globalThis.LiteGraph : null,
    "settings nodes for a workflow of the Train node's first layout cannot be added (its values stay on the node)");
  return liteGraph ? liteGraph.createNode(type) : null;
}

// ------------------------------------------------------------------------------------------------ the view

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

/** A frontend toast, on whichever toast API this frontend has (1.5x: toast.success(title, {description});
 *  1.3x: PrimeVue's toast.add({severity, summary, detail})). */
function showToast(kind, title, description) {
  const toast = app.extensionManager?.toast;
  if (!toast) return false;
  const life = kind === "error" ? 15000 : 8000;
  try {
    if (typeof toast.success === "function" && typeof toast[kind] === "function") {
      toast[kind](title, { description, duration: life });
    } else if (typeof toast.add === "function") {
      toast.add({ severity: kind === "warning" ? "warn" : kind, summary: title, detail: description, life });
    } else {
      return false;
    }
  } catch (error) {
    console.warn("hidream_lokr: toast failed", error);
    return false;
  }
  return true;
}

function openLightbox(src, caption) {
  const box = el("div", "hidream-lokr-lightbox");
  box.dataset.hidreamLokrLightbox = "1";
  const img = el("img");
  img.src = src;
  img.alt = caption;
  box.append(img, el("div", null, `${caption} (click or Esc to close)`));
  const close = () => {
    box.remove();
    document.removeEventListener("keydown", onKey, true);
  };
  const onKey = (e) => {
    if (e.key === "Escape") close();
  };
  box.addEventListener("click", close);
  document.addEventListener("keydown", onKey, true);
  document.body.appendChild(box);
}

/** The view of one Train node: owns its DOM, chart and the run it shows. */
class LiveView {
  constructor(node) {
    this.node = node;
    this.runId = null;
    this.status = "idle";
    this.phase = "idle";
    this.acceptsCommands = false;
    this.lastEvent = null;
    this.previews = []; // {index, step}
    this.selectedPreview = null;
    this.lastMessageAt = 0;
    this.messageText = "";
    this.commandNote = null; // {command, text, step}: what a button said, shown until its command is done
    this.size = "compact";
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
    this.message("No run yet: queue the graph to train. The loss chart, the newest preview and Stop & save appear here.");
    this._renderNow();
    this._poller = setInterval(() => this._pollIfSilent(), 1000);
  }

  _buildDom() {
    const root = el("div", "hidream-lokr-live");
    root.dataset.hidreamLokrLive = "1";
    root.dataset.size = this.size;
    const top = el("div", "hl-row");
    this.phaseEl = el("span", "hl-phase", "idle");
    this.stepEl = el("span", "hl-step");
    this.speedEl = el("span", "hl-speed");
    this.etaEl = el("span", "hl-eta");
    this.resumedEl = el("span", "hl-resumed");
    top.append(this.phaseEl, this.stepEl, this.speedEl, this.etaEl, this.resumedEl);
    const second = el("div", "hl-row hl-full");
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
    const main = el("div", "hl-main hl-full");
    this.canvas = el("canvas");
    const previewBox = el("div", "hl-preview-box");
    this.previewImg = el("img", "hl-preview");
    this.previewImg.alt = "newest preview";
    this.previewImg.hidden = true;
    this.previewImg.title = "click to enlarge";
    this.previewImg.addEventListener("load", () => {
      // small previews (the tiny model's 64 px) are enlarged without blurring
      this.previewImg.dataset.small = this.previewImg.naturalWidth < 160 ? "1" : "0";
    });
    this.previewImg.addEventListener("click", () => {
      if (!this.previewImg.hidden) openLightbox(this.previewImg.src, this.previewImg.dataset.caption || "preview");
    });
    this.previewHint = el("span", "hl-preview-hint", "previews appear here (validation_prompt)");
    previewBox.append(this.previewImg, this.previewHint);
    main.append(this.canvas, previewBox);
    this.thumbs = el("div", "hl-thumbs hl-full");
    const buttons = el("div", "hl-row hl-buttons hl-full");
    this.buttons = {
      sample: el("button", "hl-sample", "Sample now"),
      save: el("button", "hl-save", "Save now"),
      stop: el("button", "hl-stop", "Stop & save"),
    };
    this.buttonTitles = {
      sample: "Render the validation previews at the next step boundary",
      save: "Write a checkpoint and the LoKr file at the next step boundary; training goes on",
      stop: "End the run at the next step boundary with a checkpoint and the LoKr as outputs; queueing again continues it (Cancel interrupts instead)",
    };
    for (const [command, button] of Object.entries(this.buttons)) {
      button.type = "button";
      button.addEventListener("click", () => this.sendCommand(command));
      buttons.append(button);
    }
    this.messageEl = el("div", "hl-message");
    root.append(top, second, main, this.thumbs, buttons, this.messageEl);
    // Clicks inside the view must not start a node drag / canvas pan.
    root.addEventListener("pointerdown", (e) => e.stopPropagation());
    this.root = root;
    this._applySize();
    if (typeof ResizeObserver !== "undefined") {
      this._resize = new ResizeObserver(() => this.chart && this.chart.requestDraw());
      this._resize.observe(this.canvas);
    }
  }

  get height() {
    return HEIGHT[this.size];
  }

  _applySize() {
    this.root.dataset.size = this.size;
    // All three: Vue nodes lay DOM widgets out in a flex column that would otherwise shrink or stretch the view.
    for (const key of ["height", "minHeight", "maxHeight"]) this.root.style[key] = `${this.height}px`;
    this.root.style.flex = "0 0 auto";
  }

  /** From the one-line idle view to the full view (once a run is shown; it stays full afterwards). */
  _expand() {
    if (this.size === "full") return;
    this.size = "full";
    this._applySize();
    fitNodeHeight(this.node);
    this.chart.requestDraw();
  }

  dispose() {
    clearInterval(this._poller);
    if (this._resize) this._resize.disconnect();
  }

  /** A new run (or the first one this page sees) replaces the shown one. */
  _startRun(runId, total) {
    this.runId = runId;
    this.status = "running";
    this.phase = "starting";
    this.acceptsCommands = false;
    this.lastEvent = null;
    this.previews = [];
    this.selectedPreview = null;
    this.chart.reset(total || 0);
    this.resumedEl.textContent = "";
    this.message("");
    this.commandNote = null;
    this._expand();
  }

  handleMessage(m) {
    if (!m || typeof m.run_id !== "string") return;
    this.lastMessageAt = performance.now();
    if (this._restoring) {
      this._pending.push(m); // applied on top of the history once it is in
      return;
    }
    if (m.run_id !== this.runId) {
      // A run is followed live from its first message (its start phase, step 0) or first step; any other first
      // message (a preview has no step) means we joined it late: page reloaded, second tab, a resumed or
      // returned run.
      const fromTheStart = Number.isFinite(m.step) && m.step <= 1 && (!m.kind || m.kind === "phase");
      if (!fromTheStart && !this._noHistory.has(m.run_id)) {
        // Rebuild from the server's history, then this message.
        this.restore(m.run_id);
        this._pending.push(m); // replayed, like every held-back message, once the history is in
        return;
      }
      this._startRun(m.run_id, m.total);
    }
    if (this._pastAGap(m)) {
      // Steps are missing before this message (websocket messages lost, e.g. while the page reloaded: ComfyUI
      // 0.3.75 can drop a reconnected client's new socket when the old one's close is handled after it; or a
      // history taken before they were sent): the history fills the chart, then this message follows.
      this.restore(m.run_id);
      this._pending.push(m);
      return;
    }
    if (m.total) this.chart.totalSteps = m.total;
    if (m.message) this.message(m.message);
    if (m.kind === "preview") {
      this._addPreview(m.preview);
    } else if (m.kind === "resumed" || m.kind === "returned") {
      if (m.kind === "resumed") this._markResumed(m.step);
      if (!m._replayed && !this._restoring) this.restore(m.run_id); // the history up to the checkpoint
    } else if (m.kind === "finished") {
      this.status = m.status || "finished";
      this.phase = this.status;
      this.acceptsCommands = false;
      this._toastEnd(m);
    } else {
      if (m.phase) this.phase = m.phase;
      if (m.kind === "phase") this.acceptsCommands = !!m.accepts_commands;
      else if (Number.isFinite(m.loss)) {
        this.chart.push(m.step, m.loss);
        this.lastEvent = m;
        this.acceptsCommands = this.phase === "training";
      }
    }
    this._clearDoneCommandNote(m);
    this._render();
  }

  /** A button's note ("Sample now: runs at the next step boundary") goes once its command is done: the preview it
   *  asked for came (sample), training went past the step boundary that ran it (save, or a sample without a
   *  preview prompt), or the run ended. A message that replaced the note meanwhile stays. */
  _clearDoneCommandNote(m) {
    const note = this.commandNote;
    if (!note) return;
    const done = (m.kind === "preview" && note.command === "sample") || m.kind === "finished" ||
      (Number.isFinite(m.loss) && m.step >= note.step + 2); // the command acts after step note.step + 1 at the latest
    if (!done) return;
    if (this.messageText === note.text) this.message("");
    this.commandNote = null;
  }

  /** Whether a step message, or the end, of the shown run comes after a gap in the chart: a step past the next
   *  one, or an end past the last step drawn. Replayed messages count too (the history they were held back for
   *  may predate the lost ones). At most a few history reloads per run, in case the server's own record has a
   *  gap. */
  _pastAGap(m) {
    const series = this.chart.series;
    if (m.run_id !== this.runId || !Number.isFinite(m.step)) return false;
    const gap = m.kind === "finished" ? m.step > Math.max(series.lastStep, 0)
      : !m.kind && Number.isFinite(m.loss) && m.step > Math.max(series.lastStep, 0) + 1;
    if (!gap) return false;
    this._gapRestores = this._gapRunId === m.run_id ? this._gapRestores + 1 : 1;
    this._gapRunId = m.run_id;
    return this._gapRestores <= 3;
  }

  _markResumed(step) {
    if (!Number.isFinite(step)) return;
    this.chart.resumedAt = step;
    this.resumedEl.textContent = `resumed from step ${step}`;
    this.chart.requestDraw();
  }

  _toastEnd(m) {
    const [kind, title] = TOAST[m.status] || ["info", "Training ended"];
    if (showToast(kind, `${title}: ${m.run_folder || ""}`.replace(/: $/, ""), m.message || "")) {
      this.root.dataset.lastToast = m.status;
    }
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
    if (this._restoring) {
      // Asked again meanwhile (the socket reconnected, say): the history in flight may predate what was missed,
      // so one more restore follows this one.
      this._restoreAgain = { runId: runId ?? this._restoreAgain?.runId ?? null };
      return this._restoring;
    }
    this._pending = [];
    this._restoring = (async () => {
      try {
        if (!runId) {
          const executionId = executionIdOf(this.node);
          if (executionId === null) return;
          const list = await this._getJson(`${ROUTES}?node=${encodeURIComponent(executionId)}`);
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
      const again = this._restoreAgain;
      this._restoreAgain = null;
      if (again) this.restore(again.runId ?? this.runId); // the held-back messages then wait for this one
      for (const m of pending) this.handleMessage({ ...m, _replayed: true });
    }
  }

  _applyHistory(history) {
    this.chart.totalSteps = history.total || this.chart.totalSteps;
    for (const e of history.events || []) {
      if (Number.isFinite(e.loss) && this.chart.series.push(e.step, e.loss) && !e.history) {
        this.lastEvent = { ...e, run_id: history.run_id };
      }
    }
    if (!this.lastEvent && history.events && history.events.length) {
      const e = history.events[history.events.length - 1];
      this.lastEvent = { step: e.step, total: history.total, loss: e.loss };
    }
    if (Number.isFinite(history.resumed_from_step)) this._markResumed(history.resumed_from_step);
    for (const p of history.previews || []) this._addPreview(p);
    this.status = history.status;
    this.phase = history.status === "running" ? history.phase : history.status;
    this.acceptsCommands = !!history.accepts_commands;
    if (history.message) this.message(history.message);
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
      if (history && history.run_id === this.runId) {
        this._applyHistory(history);
        // The end learned from the server, not from its message (lost): say so as the message would have.
        if (this.status !== "running") this._toastEnd(history);
      }
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
    if (!this.runId || this.status !== "running" || !this.acceptsCommands) return;
    const button = this.buttons[command];
    button.disabled = true;
    try {
      const response = await api.fetchApi(`${ROUTES}/${encodeURIComponent(this.runId)}/command`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ command }),
      });
      const body = await response.json().catch(() => ({}));
      if (response.ok) {
        const text = `${button.textContent}: ${body.note || "queued"}`;
        this.message(text);
        this.commandNote = { command, text, step: this.lastEvent ? this.lastEvent.step : 0 };
      } else {
        this.message(`${button.textContent} refused: ${body.error || `HTTP ${response.status}`}`);
      }
      this.root.dataset.lastCommand = `${command}:${response.status}`;
    } catch (error) {
      this.message(`${button.textContent} failed: ${error.message || error}`);
    } finally {
      this._renderNow();
    }
  }

  /** ComfyUI reports the node failed or was cancelled without the run saying so (e.g. before training began). */
  executionEnded(status, text) {
    if (this.status !== "running") return;
    this.status = status;
    this.phase = status;
    this.acceptsCommands = false;
    this.message(text);
    this._render();
  }

  message(text) {
    this.messageText = text || "";
    this.messageEl.textContent = this.messageText;
    this.messageEl.title = this.messageText;
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
    this.phaseEl.textContent = running ? this.phase : STATUS_LABEL[this.status] || this.status;
    this.phaseEl.dataset.status = this.status;
    this.stepEl.textContent = this.lastEvent ? `step ${t.step}` : (this.runId ? "step 0" : "");
    this.speedEl.textContent = running && this.lastEvent ? t.speed : "";
    this.etaEl.textContent = running && this.lastEvent ? t.eta : "";
    this.lossEl.textContent = t.loss;
    this.lrEl.textContent = t.lr;
    this.lbEl.textContent = t.lb;
    this.memEl.textContent = t.memory;
    const canAct = running && this.acceptsCommands;
    for (const [command, button] of Object.entries(this.buttons)) {
      button.disabled = !canAct;
      button.title = canAct ? this.buttonTitles[command]
        : running ? `${this.buttonTitles[command]} (available between training steps; now: ${this.phase})`
          : "available while a run is training";
    }
    this._renderPreviews();
    const d = this.root.dataset;
    d.runId = this.runId || "";
    d.status = this.status;
    d.phase = this.phase;
    d.acceptsCommands = String(canAct);
    d.step = String(this.lastEvent ? this.lastEvent.step : 0);
    d.total = String(this.chart.totalSteps || 0);
    d.points = String(this.chart.series.length);
    d.previews = String(this.previews.length);
    d.resumedFrom = Number.isFinite(this.chart.resumedAt) ? String(this.chart.resumedAt) : "";
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
    this.previewHint.hidden = count > 0;
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
      this.previewImg.dataset.caption = p ? `preview at step ${p.step}` : "preview";
    }
    this.previewImg.hidden = false;
  }
}

// ------------------------------------------------------------------------------------------------ node size

/** The node's height fitted to its content (no stretched prompt box), and at least MIN_WIDTH wide. */
function fitNodeHeight(node) {
  if (!node.computeSize || !node.setSize) return;
  const size = node.computeSize();
  node.setSize([Math.max(node.size?.[0] || 0, MIN_WIDTH), size[1]]);
  node.setDirtyCanvas?.(true, true);
}

// ------------------------------------------------------------------------------------------------ first layout

const settingsDefs = {}; // settings node type -> {socket type, defaults {widget: value}}
let trainInputs = {}; // the Train node's optional inputs: name -> spec
let trainDefaults = {}; // the Train node's widgets: name -> default

function rememberSettingsDef(nodeData) {
  if (!nodeData?.category?.startsWith("HiDream LoKr/training settings")) return;
  const defaults = {};
  for (const section of ["required", "optional"]) {
    for (const [name, spec] of Object.entries(nodeData.input?.[section] || {})) {
      defaults[name] = Array.isArray(spec) ? spec[1]?.default : undefined;
    }
  }
  settingsDefs[nodeData.name] = { type: nodeData.output?.[0], defaults };
}

/** widgets_values of the first layout: all 29 values (as the frontend saved them), or the first 23 (the pack's
 *  own templates left out the optional widgets); values[2] and [3] are the optimizer and lr_scheduler names. */
function isFirstLayout(values) {
  return Array.isArray(values) && (values.length === LEGACY_WIDGETS.length || values.length === 23) &&
    typeof values[2] === "string" && typeof values[3] === "string" && typeof values[0] === "number";
}

/** A Train node loaded from a workflow saved with its first layout (every setting on the node): put the values of
 *  the essentials back on the node, and give each group of moved settings that differs from its defaults a
 *  settings node below the Train node, wired in. Returns how many settings nodes were added. */
function upgradeFirstLayout(node, values) {
  const byName = {};
  LEGACY_WIDGETS.forEach((name, i) => {
    if (i < values.length) byName[name] = values[i]; // the pack's own templates saved only the first 23
  });
  for (const widget of node.widgets || []) {
    // The frontend filled the widgets by position from the old list: put every one right, by name (a value the
    // old workflow did not save gets the widget's default).
    let value = widget.name in byName ? byName[widget.name] : trainDefaults[widget.name];
    if (widget.name === "resume_from_checkpoint" && (value === "" || value === null)) value = "auto";
    if (value !== undefined) widget.value = value;
  }
  let added = 0;
  let y = node.pos[1] + node.size[1] + 40;
  for (const [type, def] of Object.entries(settingsDefs)) {
    const changed = Object.keys(def.defaults).filter((name) => name in byName && byName[name] !== def.defaults[name]);
    if (!changed.length) continue;
    let slot = (node.inputs || []).findIndex((input) => input.type === def.type);
    const socket = Object.keys(trainInputs).find((name) => trainInputs[name]?.[0] === def.type);
    if (slot < 0 && socket && node.addInput) {
      node.addInput(socket, def.type); // a workflow of the first layout saved the node without this socket
      slot = node.inputs.length - 1;
    }
    const settingsNode = slot < 0 ? null : createNode(type);
    if (!settingsNode) continue;
    (node.graph ?? rootGraph()).add(settingsNode);
    settingsNode.pos = [node.pos[0], y];
    for (const widget of settingsNode.widgets || []) {
      if (widget.name in byName) widget.value = byName[widget.name];
      if (widget.name === "control_after_generate" && byName.control_after_generate) widget.value = byName.control_after_generate;
    }
    settingsNode.connect(0, node, slot);
    y += (settingsNode.size?.[1] || 150) + 50;
    added++;
  }
  node.properties = { ...(node.properties || {}), hidream_lokr_layout: LAYOUT };
  return added;
}

// ------------------------------------------------------------------------------------------------ wiring

const VIEWS = new Set(); // the live view of every Train node that exists, in any graph or subgraph

/** Which views a server message is for: the node its execution id names (in a subgraph too), else the view
 *  already showing that run, else the only Train node there is. */
function viewsForMessage(m) {
  const node = nodeByExecutionId(m.node);
  if (node?.hidreamLokrView) return [node.hidreamLokrView];
  const byRun = [...VIEWS].filter((view) => view.runId === m.run_id);
  if (byRun.length) return byRun;
  return VIEWS.size === 1 ? [...VIEWS] : [];
}

function attachView(node) {
  if (node.hidreamLokrView) return node.hidreamLokrView;
  addStyleOnce();
  const view = new LiveView(node);
  const widget = node.addDOMWidget("hidream_lokr_live", "hidream_lokr_live", view.root, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => view.height,
    getMaxHeight: () => view.height,
    getHeight: () => view.height,
  });
  widget.serialize = false; // nothing of the view goes into the workflow or the prompt
  node.hidreamLokrView = view;
  VIEWS.add(view);
  node.properties = { ...(node.properties || {}), hidream_lokr_layout: LAYOUT };
  const onRemoved = node.onRemoved;
  node.onRemoved = function () {
    VIEWS.delete(view);
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
      const node = nodeByExecutionId(detail?.node_id ?? detail?.node);
      if (node?.hidreamLokrView) {
        node.hidreamLokrView.executionEnded(status, detail.exception_message ? `error: ${detail.exception_message}` : `run ${status}`);
      }
    };
    api.addEventListener("execution_error", endedOn("failed"));
    api.addEventListener("execution_interrupted", endedOn("interrupted"));
    // After a reload the websocket reconnects with the same client id; catch up on anything missed meanwhile.
    api.addEventListener("reconnected", () => {
      for (const view of VIEWS) view.restore(view.runId);
    });
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    rememberSettingsDef(nodeData);
    if (nodeData?.name !== NODE_TYPE) return;
    trainInputs = nodeData.input?.optional || {};
    trainDefaults = Object.fromEntries(Object.entries(nodeData.input?.required || {})
      .map(([name, spec]) => [name, Array.isArray(spec) ? spec[1]?.default : undefined]));
    const computeSize = nodeType.prototype.computeSize;
    nodeType.prototype.computeSize = function () {
      const size = computeSize ? computeSize.apply(this, arguments) : [MIN_WIDTH, 100];
      size[0] = Math.max(size[0], MIN_WIDTH);
      return size;
    };
    const onResize = nodeType.prototype.onResize;
    nodeType.prototype.onResize = function (size) {
      if (size && size[0] < MIN_WIDTH) size[0] = MIN_WIDTH;
      return onResize?.apply(this, arguments);
    };
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      attachView(this);
      fitNodeHeight(this);
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (info) {
      const result = onConfigure?.apply(this, arguments);
      const view = attachView(this);
      const values = info?.widgets_values;
      const firstLayout = !(info?.properties?.hidream_lokr_layout >= LAYOUT) && isFirstLayout(values);
      // After the whole graph is configured: a loaded workflow knows its node ids now (show this node's newest
      // run, if any), and settings nodes can be added for a first-layout node.
      setTimeout(() => {
        if (firstLayout) this.hidreamLokrUpgraded = upgradeFirstLayout(this, values);
        fitNodeHeight(this);
        if (!view.runId) view.restore();
      }, 0);
      return result;
    };
  },
});
