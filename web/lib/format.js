// Text for the telemetry line of the live training view. Pure functions of one progress event.

export function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const r = s % 60;
  if (h) return `${h}h ${String(m).padStart(2, "0")}m`;
  if (m) return `${m}m ${String(r).padStart(2, "0")}s`;
  return `${r}s`;
}

export function formatBytes(bytes) {
  if (!Number.isFinite(bytes) || bytes <= 0) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = bytes;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${v.toFixed(v >= 100 ? 0 : 1)} ${units[u]}`;
}

export function formatNumber(v, digits = 4) {
  if (v === null || v === undefined || !Number.isFinite(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
  return v.toPrecision(digits);
}

/** {label: text} for each telemetry field of the newest event (missing fields read "–"). */
export function telemetryFields(event, device) {
  const e = event || {};
  return {
    step: e.total ? `${e.step ?? 0} / ${e.total}` : `${e.step ?? 0}`,
    speed: Number.isFinite(e.it_per_s) ? `${e.it_per_s.toFixed(e.it_per_s >= 10 ? 1 : 2)} it/s` : "– it/s",
    eta: `ETA ${formatDuration(e.eta_s)}`,
    lr: `lr ${formatNumber(e.lr, 3)}`,
    loss: `loss ${formatNumber(e.loss)}`,
    lb: `lb loss ${e.load_balancing_loss === null || e.load_balancing_loss === undefined ? "off" : formatNumber(e.load_balancing_loss)}`,
    memory: `peak ${device === "cpu" ? "RAM" : "mem"} ${formatBytes(e.peak_memory_bytes)}`,
  };
}
