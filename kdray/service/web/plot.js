// The service page's plot of one per-step number of a job (index.html's #loss canvas): a line
// over the steps, gridlines at round values, the x-axis out to the job's last step when that is
// known, and the value under the pointer (or the keyboard's ← → Home End) in #readout.
"use strict";

const PLOT = { left: 52, right: 20, top: 36 };  // the plot's margins in the canvas, in pixels

// At most 7 characters, which the left margin holds: 3.807, 0.1235, 1.50e-6 (a learning rate), 3.50e+4 (tokens/s).
function label(v) { return v === 0 ? "0" : Math.abs(v) >= 1e4 || Math.abs(v) < 1e-3 ? v.toExponential(2) : String(+v.toPrecision(4)); }

// Round values in [lo, hi], about ``n`` of them (1, 2 or 5 times a power of ten apart).
function ticks(lo, hi, n) {
  const raw = (hi - lo) / n, unit = 10 ** Math.floor(Math.log10(raw));
  const stride = [1, 2, 5, 10].map((m) => m * unit).find((s) => s >= raw) || 10 * unit;
  const out = [];
  for (let v = Math.ceil(lo / stride) * stride; v <= hi + stride * 1e-9; v += stride) out.push(+v.toPrecision(12));
  return out;
}

class Curve {
  constructor(canvas, readout) {
    this.canvas = canvas; this.readout = readout;
    this.view = null;   // what the last draw laid out: scales and the steps of each pixel column
    this.column = null; // the column the readout shows, or null
    canvas.tabIndex = 0;
    canvas.addEventListener("mousemove", (e) => {
      const r = canvas.getBoundingClientRect();
      this.point(((e.clientX - r.left) * canvas.width) / r.width - PLOT.left, false);
    });
    canvas.addEventListener("mouseleave", () => this.point(null, false));
    canvas.addEventListener("blur", () => this.point(null, false));
    canvas.addEventListener("keydown", (e) => {
      const v = this.view;
      if (!v || !["ArrowLeft", "ArrowRight", "Home", "End"].includes(e.key)) return;
      e.preventDefault();
      const filled = v.filled, at = this.column === null ? -1 : filled.indexOf(this.column);
      const next = e.key === "Home" ? 0 : e.key === "End" ? filled.length - 1
        : e.key === "ArrowLeft" ? Math.max(0, at < 0 ? filled.length - 1 : at - 1) : Math.min(filled.length - 1, at + 1);
      this.point(filled[next], true);
    });
  }

  // Draw ``points`` ([step, value], in step order) of ``field``, the x-axis out to step ``end``
  // when it is past the last point. Each pixel column draws the lowest and the highest value
  // among its steps, so a draw is one pass over the points and at most two segments a column
  // however long the job. Returns the points to keep: ``points`` itself, or, past 8 points a
  // column (a page left open on a long job), each column's lowest, highest, first and last.
  draw(points, field, end) {
    const canvas = this.canvas;
    Object.assign(canvas.dataset, { points: String(points.length), field, drawn: "0", xEnd: "",
                                    lastStep: points.length ? String(points[points.length - 1][0]) : "" });
    this.view = null;
    if (!points.length) {
      this.render();
      return points;
    }
    const w = canvas.width - PLOT.left - PLOT.right, h = canvas.height - 2 * PLOT.top;
    let x0 = Infinity, last = -Infinity, y0 = Infinity, y1 = -Infinity;
    for (const [s, v] of points) { x0 = Math.min(x0, s); last = Math.max(last, s); y0 = Math.min(y0, v); y1 = Math.max(y1, v); }
    const x1 = Math.max(last, x0 + 1, end || 0);
    if (y1 - y0 < 1e-9) { const d = Math.max(Math.abs(y0) * 0.05, 1e-6); y0 -= d; y1 += d; }  // a flat curve: mid-plot
    const col = { low: new Float64Array(w + 1).fill(Infinity), high: new Float64Array(w + 1).fill(-Infinity),
                  lowStep: new Float64Array(w + 1), highStep: new Float64Array(w + 1),
                  first: new Float64Array(w + 1), lastStep: new Float64Array(w + 1), firstValue: new Float64Array(w + 1),
                  lastValue: new Float64Array(w + 1) };
    for (const [s, v] of points) {
      const c = Math.round((w * (s - x0)) / (x1 - x0));
      if (col.low[c] === Infinity) { col.first[c] = s; col.firstValue[c] = v; }
      col.lastStep[c] = s; col.lastValue[c] = v;
      if (v < col.low[c]) { col.low[c] = v; col.lowStep[c] = s; }
      if (v > col.high[c]) { col.high[c] = v; col.highStep[c] = s; }
    }
    if (points.length > 8 * (w + 1)) {  // keep what the plot draws and the readout shows (as GET /curve does)
      const kept = new Map();
      for (let c = 0; c <= w; c++) {
        if (col.low[c] === Infinity) continue;
        for (const [s, v] of [[col.first[c], col.firstValue[c]], [col.lowStep[c], col.low[c]], [col.highStep[c], col.high[c]],
                              [col.lastStep[c], col.lastValue[c]]]) kept.set(s, v);
      }
      points = [...kept].sort((a, b) => a[0] - b[0]);
      canvas.dataset.points = String(points.length);
    }
    const filled = [];
    for (let c = 0; c <= w; c++) if (col.low[c] !== Infinity) filled.push(c);
    this.view = { field, w, h, x0, x1, last, y0, y1, col, filled, first: points[0][1], final: points[points.length - 1][1] };
    canvas.dataset.xEnd = String(x1);
    if (this.column !== null && col.low[this.column] === Infinity) this.column = null;
    this.render();
    canvas.dataset.drawn = String(points.length);
    return points;
  }

  // The readout at pixel column ``x`` of the plot (the nearest one with steps), or none (null).
  point(x, keyboard) {
    const v = this.view;
    let column = null;
    if (v && x !== null && x >= -PLOT.left / 2 && x <= v.w + PLOT.right / 2) {
      let best = Infinity;
      for (const c of v.filled) if (Math.abs(c - x) < best) { best = Math.abs(c - x); column = c; }
      if (!keyboard && best > 12) column = null;  // the pointer is past the curve's end
    }
    if (column === this.column) return;
    this.column = column;
    this.render();
  }

  render() {
    const canvas = this.canvas, ctx = canvas.getContext("2d"), v = this.view;
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.fillStyle = "#596273"; ctx.font = "11px system-ui";
    if (!v) {
      ctx.fillText("no training step yet", 12, 20);
      canvas.setAttribute("aria-label", "no training step yet");
      this.readout.textContent = "";
      return;
    }
    const { w, h, x0, x1, y0, y1, col } = v, left = PLOT.left, top = PLOT.top;
    const X = (s) => left + (w * (s - x0)) / (x1 - x0), Y = (value) => top + h - (h * (value - y0)) / (y1 - y0);
    ctx.strokeStyle = "#eceff3"; ctx.lineWidth = 1; ctx.beginPath();
    ctx.textAlign = "right";
    for (const t of ticks(y0, y1, 4)) { ctx.moveTo(left, Math.round(Y(t)) + 0.5); ctx.lineTo(left + w, Math.round(Y(t)) + 0.5); ctx.fillText(label(t), left - 4, Y(t) + 4); }
    ctx.textAlign = "center";
    const steps = ticks(x0, x1, 6).filter((t) => Number.isInteger(t));
    for (const t of steps) { ctx.moveTo(Math.round(X(t)) + 0.5, top); ctx.lineTo(Math.round(X(t)) + 0.5, top + h); ctx.fillText(String(t), X(t), top + h + 14); }
    ctx.stroke();
    ctx.strokeStyle = "#c4cad3"; ctx.strokeRect(left, top, w, h);
    ctx.textAlign = "right"; ctx.fillText(v.last < x1 ? `step ${v.last} of ${x1}` : "step", left + w, top + h + 28);
    ctx.textAlign = "left";
    canvas.setAttribute("aria-label", `${v.field} over steps ${x0} to ${v.last}${v.last < x1 ? ` of ${x1}` : ""}: `
                                      + `${label(v.first)} at the first, ${label(v.final)} at the last, `
                                      + `between ${label(y0)} and ${label(y1)}; ← → read the values`);
    ctx.strokeStyle = "#3b7ddd"; ctx.lineWidth = 2; ctx.beginPath();
    v.filled.forEach((c, k) => {
      if (k) ctx.lineTo(left + c, Y(col.low[c])); else ctx.moveTo(left + c, Y(col.low[c]));
      if (col.high[c] > col.low[c]) ctx.lineTo(left + c, Y(col.high[c]));
    });
    ctx.stroke();
    if (v.filled.length === 1) { ctx.fillStyle = "#3b7ddd"; ctx.fillRect(left + v.filled[0] - 3, Y(col.low[v.filled[0]]) - 3, 6, 6); }  // one step: a dot
    const c = this.column;
    if (c === null) { this.readout.textContent = ""; delete canvas.dataset.readout; return; }
    const one = col.first[c] === col.lastStep[c];
    const text = one ? `step ${col.first[c]}: ${v.field} ${label(col.low[c])}`
      : `steps ${col.first[c]}–${col.lastStep[c]}: ${v.field} ${label(col.low[c])} to ${label(col.high[c])}`;
    ctx.strokeStyle = "#596273"; ctx.lineWidth = 1; ctx.setLineDash([3, 3]); ctx.beginPath();
    ctx.moveTo(left + c + 0.5, top); ctx.lineTo(left + c + 0.5, top + h); ctx.stroke(); ctx.setLineDash([]);
    ctx.fillStyle = "#1d2330"; ctx.fillRect(left + c - 3, Y(col.low[c]) - 3, 6, 6);
    if (!one) ctx.fillRect(left + c - 3, Y(col.high[c]) - 3, 6, 6);
    ctx.font = "12px system-ui"; ctx.textAlign = c > w / 2 ? "right" : "left";
    ctx.fillText(text, left + c + (c > w / 2 ? -6 : 6), top - 8);
    ctx.textAlign = "left";
    this.readout.textContent = text;
    canvas.dataset.readout = text;
  }
}
