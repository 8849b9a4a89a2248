// Loss chart on a <canvas>: raw loss + trailing moving average over the whole run, linear or log y axis.
//
// Storage keeps every point (typed arrays that double when full); drawing reduces them to at most one min/max pair
// per pixel column, so a draw costs O(points) arithmetic plus O(canvas width) path segments however long the run
// is. Draws are coalesced to one per animation frame (`requestDraw`), which is what keeps a fast event stream from
// lagging the page. No ComfyUI imports: tests and benchmarks use this module on its own.

const COLORS = {
  background: "#1b1b1f",
  grid: "rgba(255,255,255,0.08)",
  axis: "#9a9aa2",
  raw: "rgba(120,170,255,0.55)",
  average: "#ffb347",
  text: "#d8d8de",
};

export class LossSeries {
  /** Every (step, loss) point of a run, plus a trailing moving average of `window` points. */
  constructor(window = 25, capacity = 1024) {
    this.window = window;
    this.steps = new Float64Array(capacity);
    this.losses = new Float64Array(capacity);
    this.averages = new Float64Array(capacity);
    this.length = 0;
    this._runningSum = 0;
  }

  get lastStep() {
    return this.length ? this.steps[this.length - 1] : -Infinity;
  }

  /** Append one point; a step at or before the last one is a duplicate (history + live events overlap): false. */
  push(step, loss) {
    if (!Number.isFinite(step) || !Number.isFinite(loss) || step <= this.lastStep) return false;
    if (this.length === this.steps.length) this._grow();
    const i = this.length;
    this.steps[i] = step;
    this.losses[i] = loss;
    this._runningSum += loss;
    if (i >= this.window) this._runningSum -= this.losses[i - this.window];
    this.averages[i] = this._runningSum / Math.min(i + 1, this.window);
    this.length = i + 1;
    return true;
  }

  clear() {
    this.length = 0;
    this._runningSum = 0;
  }

  _grow() {
    for (const name of ["steps", "losses", "averages"]) {
      const bigger = new Float64Array(this[name].length * 2);
      bigger.set(this[name]);
      this[name] = bigger;
    }
  }
}

/** Min/max of `values` per pixel column: the drawn shape of a dense series is exactly its envelope.
 *  Returns {columns, lo, hi, count}: lo/hi are NaN for empty columns; count = points that fell in the x range. */
export function columnEnvelope(steps, values, length, x0, x1, columns) {
  const lo = new Float64Array(columns).fill(NaN);
  const hi = new Float64Array(columns).fill(NaN);
  const span = x1 - x0 || 1;
  const scale = (columns - 1) / span;
  let count = 0;
  for (let i = 0; i < length; i++) {
    const v = values[i];
    if (!Number.isFinite(v)) continue;
    const c = Math.round((steps[i] - x0) * scale);
    if (c < 0 || c >= columns) continue;
    count++;
    if (!(lo[c] <= v)) lo[c] = v; // NaN-aware: first value in a column sets both
    if (!(hi[c] >= v)) hi[c] = v;
  }
  return { columns, lo, hi, count };
}

export class LossChart {
  constructor(canvas, { window = 25, logScale = false } = {}) {
    this.canvas = canvas;
    this.series = new LossSeries(window);
    this.logScale = logScale;
    this.totalSteps = 0; // x axis runs to the planned total when known
    this.resumedAt = null; // a resumed run: the checkpoint step, drawn as a dashed line ("resumed")
    this.stats = { draws: 0, lastDrawMs: 0, pointsDrawn: 0, columns: 0 };
    this._frame = null;
  }

  push(step, loss) {
    const added = this.series.push(step, loss);
    if (added) this.requestDraw();
    return added;
  }

  reset(totalSteps = 0) {
    this.series.clear();
    this.totalSteps = totalSteps;
    this.resumedAt = null;
    this.requestDraw();
  }

  setLogScale(on) {
    this.logScale = !!on;
    this.requestDraw();
  }

  /** Draw at the next animation frame; any number of calls before it make one draw. */
  requestDraw() {
    if (this._frame !== null) return;
    const raf = globalThis.requestAnimationFrame || ((f) => setTimeout(f, 16));
    this._frame = raf(() => {
      this._frame = null;
      this.draw();
    });
  }

  draw() {
    const started = performance.now();
    const canvas = this.canvas;
    const ratio = globalThis.devicePixelRatio || 1;
    const cssWidth = Math.max(canvas.clientWidth || canvas.width / ratio, 50);
    const cssHeight = Math.max(canvas.clientHeight || canvas.height / ratio, 50);
    const width = Math.round(cssWidth * ratio);
    const height = Math.round(cssHeight * ratio);
    if (canvas.width !== width || canvas.height !== height) {
      canvas.width = width;
      canvas.height = height;
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.fillStyle = COLORS.background;
    ctx.fillRect(0, 0, cssWidth, cssHeight);

    const pad = { left: 46, right: 8, top: 8, bottom: 18 };
    const plotW = Math.max(cssWidth - pad.left - pad.right, 10);
    const plotH = Math.max(cssHeight - pad.top - pad.bottom, 10);
    const s = this.series;
    ctx.font = "10px sans-serif";
    if (s.length === 0) {
      ctx.fillStyle = COLORS.axis;
      ctx.fillText("loss chart: waiting for the first training step", pad.left, pad.top + plotH / 2);
      this._finish(started, 0, 0);
      return;
    }

    const x0 = Math.min(s.steps[0], 1);
    const x1 = Math.max(s.lastStep, this.totalSteps || 0, x0 + 1);
    const columns = Math.max(Math.floor(plotW * ratio), 2); // one envelope column per device pixel
    const raw = columnEnvelope(s.steps, s.losses, s.length, x0, x1, columns);
    const avg = columnEnvelope(s.steps, s.averages, s.length, x0, x1, columns);

    // y range over the raw envelope (log: positive values only)
    let yMin = Infinity;
    let yMax = -Infinity;
    for (let c = 0; c < columns; c++) {
      const lo = raw.lo[c];
      const hi = raw.hi[c];
      if (Number.isNaN(lo)) continue;
      const low = this.logScale ? (lo > 0 ? lo : hi > 0 ? hi : NaN) : lo;
      if (low < yMin) yMin = low;
      if (hi > yMax) yMax = hi;
    }
    const log = this.logScale && yMin > 0;
    const f = log ? Math.log10 : (v) => v;
    let lo = f(yMin);
    let hi = f(yMax);
    if (!(hi > lo)) {
      const pad1 = Math.abs(lo) * 0.05 || 0.5;
      lo -= pad1;
      hi += pad1;
    }
    const margin = (hi - lo) * 0.05;
    lo -= margin;
    hi += margin;
    const yOf = (v) => pad.top + plotH - ((f(v) - lo) / (hi - lo)) * plotH;
    const xOfColumn = (c) => pad.left + (c / (columns - 1)) * plotW;

    // grid + y labels
    ctx.strokeStyle = COLORS.grid;
    ctx.fillStyle = COLORS.axis;
    ctx.lineWidth = 1;
    for (let k = 0; k <= 4; k++) {
      const t = lo + ((hi - lo) * k) / 4;
      const y = pad.top + plotH - (k / 4) * plotH;
      ctx.beginPath();
      ctx.moveTo(pad.left, y);
      ctx.lineTo(pad.left + plotW, y);
      ctx.stroke();
      ctx.fillText(formatTick(log ? 10 ** t : t), 2, y + 3);
    }
    ctx.fillText(String(Math.round(x0)), pad.left, cssHeight - 4);
    const right = String(Math.round(x1));
    ctx.fillText(right, pad.left + plotW - ctx.measureText(right).width, cssHeight - 4);
    ctx.fillText(log ? "step (log loss)" : "step", pad.left + plotW / 2 - 12, cssHeight - 4);

    // raw loss: a vertical min-max bar per column, joined -> the series' exact envelope
    ctx.strokeStyle = COLORS.raw;
    ctx.beginPath();
    let started1 = false;
    for (let c = 0; c < columns; c++) {
      const a = raw.lo[c];
      if (Number.isNaN(a)) continue;
      const b = raw.hi[c];
      if (log && !(b > 0)) continue;
      const x = xOfColumn(c);
      const ya = yOf(log && !(a > 0) ? b : a);
      const yb = yOf(b);
      if (!started1) {
        ctx.moveTo(x, ya);
        started1 = true;
      } else ctx.lineTo(x, ya);
      if (yb !== ya) ctx.lineTo(x, yb);
    }
    ctx.stroke();

    // moving average: the middle of its (narrow) envelope per column
    ctx.strokeStyle = COLORS.average;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    let started2 = false;
    for (let c = 0; c < columns; c++) {
      const a = avg.lo[c];
      if (Number.isNaN(a) || (log && !(a > 0))) continue;
      const y = yOf((a + avg.hi[c]) / 2);
      const x = xOfColumn(c);
      if (!started2) {
        ctx.moveTo(x, y);
        started2 = true;
      } else ctx.lineTo(x, y);
    }
    ctx.stroke();

    // where a resumed run picked up: steps left of it come from the checkpoint's history
    if (Number.isFinite(this.resumedAt) && this.resumedAt > x0 && this.resumedAt < x1) {
      const x = pad.left + ((this.resumedAt - x0) / (x1 - x0)) * plotW;
      ctx.save();
      ctx.strokeStyle = COLORS.axis;
      ctx.setLineDash([3, 3]);
      ctx.beginPath();
      ctx.moveTo(x, pad.top);
      ctx.lineTo(x, pad.top + plotH);
      ctx.stroke();
      ctx.restore();
      ctx.fillStyle = COLORS.axis;
      ctx.fillText(`resumed ${this.resumedAt}`, Math.min(x + 3, pad.left + plotW - 70), pad.top + plotH - 4);
    }

    // legend
    ctx.fillStyle = COLORS.raw;
    ctx.fillRect(pad.left + 6, pad.top + 4, 10, 3);
    ctx.fillStyle = COLORS.text;
    ctx.fillText("loss", pad.left + 20, pad.top + 9);
    ctx.fillStyle = COLORS.average;
    ctx.fillRect(pad.left + 50, pad.top + 4, 10, 3);
    ctx.fillStyle = COLORS.text;
    ctx.fillText(`average (${s.window})`, pad.left + 64, pad.top + 9);
    this._finish(started, raw.count, columns);
  }

  _finish(started, pointsDrawn, columns) {
    this.stats.draws += 1;
    this.stats.lastDrawMs = performance.now() - started;
    this.stats.pointsDrawn = pointsDrawn;
    this.stats.columns = columns;
    if (this.onDrawn) this.onDrawn(this.stats);
  }
}

export function formatTick(v) {
  const a = Math.abs(v);
  if (a === 0) return "0";
  if (a >= 1000 || a < 0.01) return v.toExponential(1);
  return v.toPrecision(3);
}
