// The dashboard's charts, drawn as SVG by hand (no library): a time series of windows (mean line
// inside its min–max band, with anomaly markers), score bars per window, event-rate bars, and
// a strip of partitions coloured by owner. Each chart is a fresh <svg> the caller puts in place.

import { fmtTime, scoreColour } from './common.js';

const NS = 'http://www.w3.org/2000/svg';
const W = 800;
const PAD = { l: 52, r: 12, t: 10, b: 22 };

/** An SVG element with attributes. */
export function s(tag, attrs = {}, text) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== undefined && v !== null) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

/** About `n` round tick values covering [lo, hi] (never more than 3n, whatever the numbers). */
export function niceTicks(lo, hi, n = 4) {
  if (!isFinite(lo) || !isFinite(hi)) return [];
  if (hi === lo) { hi = lo + 1; lo = lo - 1; }
  const raw = (hi / 2 - lo / 2) * 2 / n;
  if (!isFinite(raw) || raw <= 0) return [lo, hi];
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((st) => st >= raw) || 10 * mag;
  const first = Math.ceil(lo / step) * step;
  const out = [];
  // By index, not by adding: at 1e17 adding a small step changes nothing.
  for (let i = 0; i <= 3 * n; i++) {
    const v = first + i * step;
    if (!isFinite(v) || v > hi + step * 1e-9) break;
    out.push(+v.toPrecision(12));
  }
  return out;
}

const TIME_STEPS = [1e3, 5e3, 15e3, 30e3, 60e3, 300e3, 900e3, 1800e3, 3600e3, 3 * 3600e3,
  6 * 3600e3, 12 * 3600e3, 86400e3, 7 * 86400e3];
/** Round time ticks (ms) in local time for [lo, hi]: about `n`, never more than 2n. */
export function timeTicks(lo, hi, n = 6) {
  const last = TIME_STEPS[TIME_STEPS.length - 1];
  const step = TIME_STEPS.find((st) => (hi - lo) / st <= n) || last * Math.ceil((hi - lo) / n / last);
  if (!isFinite(step) || step <= 0 || !isFinite(lo)) return { ticks: [], step: last };
  const off = new Date(lo).getTimezoneOffset() * 60e3 || 0;
  const first = Math.ceil((lo - off) / step) * step + off;
  const out = [];
  for (let i = 0; i <= 2 * n; i++) {
    const v = first + i * step;
    if (v > hi) break;
    out.push(v);
  }
  return { ticks: out, step };
}
function timeLabel(ms, step) {
  const d = new Date(ms);
  const p = (x) => String(x).padStart(2, '0');
  const hm = `${p(d.getHours())}:${p(d.getMinutes())}`;
  if (step < 60e3) return `${hm}:${p(d.getSeconds())}`;
  if (step >= 86400e3) return `${d.getMonth() + 1}/${d.getDate()}`;
  return hm;
}

function frame(height, x0, x1, y0, y1, { yFmt = (v) => String(v), yTicks } = {}) {
  const svg = s('svg', { viewBox: `0 0 ${W} ${height}`, class: 'chart', role: 'img' });
  // Halves before subtracting: values near ±1.8e308 must not overflow to Infinity.
  const X = (v) => PAD.l + ((v / 2 - x0 / 2) / (x1 / 2 - x0 / 2 || 1)) * (W - PAD.l - PAD.r);
  const Y = (v) => height - PAD.b - ((v / 2 - y0 / 2) / (y1 / 2 - y0 / 2 || 1)) * (height - PAD.t - PAD.b);
  const grid = s('g', { class: 'grid' });
  for (const v of yTicks || niceTicks(y0, y1)) {
    if (v < y0 || v > y1) continue;
    grid.append(s('line', { x1: PAD.l, x2: W - PAD.r, y1: Y(v), y2: Y(v) }));
    grid.append(s('text', { x: PAD.l - 6, y: Y(v) + 4, 'text-anchor': 'end' }, yFmt(v)));
  }
  const { ticks, step } = timeTicks(x0, x1, 7);
  for (const t of ticks) {
    grid.append(s('line', { x1: X(t), x2: X(t), y1: PAD.t, y2: height - PAD.b, class: 'v' }));
    grid.append(s('text', { x: X(t), y: height - 6, 'text-anchor': 'middle' }, timeLabel(t, step)));
  }
  svg.append(grid);
  return { svg, X, Y };
}

function fmtValue(v) {
  const a = Math.abs(v);
  return a !== 0 && (a >= 1e5 || a < 1e-2) ? v.toExponential(1) : String(+v.toPrecision(4));
}

/**
 * Windows of one metric: `windows` [{start_ms, end_ms, mean, min, max, count}] drawn as a mean
 * line (one point per window, at its middle) in its min–max band; `markers` [{ts_ms, value,
 * score, title}] as circles. Returns the <svg>, its `data-points` the number of windows drawn.
 */
export function windowChart(windows, markers = [], height = 190) {
  const ws = windows.filter((w) => [w.start_ms, w.end_ms, w.mean, w.min, w.max].every(Number.isFinite))
    .sort((a, b) => a.start_ms - b.start_ms);
  const ms = markers.filter((m) => Number.isFinite(m.ts_ms) && Number.isFinite(m.value));
  if (!ws.length) return s('svg', { viewBox: `0 0 ${W} 40`, class: 'chart empty', 'data-points': 0 });
  let x0 = ws[0].start_ms, x1 = ws[ws.length - 1].end_ms;
  let y0 = Math.min(...ws.map((w) => w.min)), y1 = Math.max(...ws.map((w) => w.max));
  // Markers inside the time span widen the value axis so none is drawn off the chart.
  const inside = ms.filter((m) => m.ts_ms >= x0 && m.ts_ms <= x1);
  for (const m of inside) { y0 = Math.min(y0, m.value); y1 = Math.max(y1, m.value); }
  const padY = (y1 / 2 - y0 / 2) * 0.16 || Math.abs(y0) * 0.1 || 1;
  y0 = Math.max(-Number.MAX_VALUE, y0 - padY); y1 = Math.min(Number.MAX_VALUE, y1 + padY);
  const { svg, X, Y } = frame(height, x0, x1, y0, y1, { yFmt: fmtValue });
  svg.setAttribute('data-points', ws.length);
  const mid = (w) => (w.start_ms + w.end_ms) / 2;
  const band = ws.map((w) => `${X(mid(w)).toFixed(1)},${Y(w.max).toFixed(1)}`)
    .concat(ws.slice().reverse().map((w) => `${X(mid(w)).toFixed(1)},${Y(w.min).toFixed(1)}`));
  svg.append(s('polygon', { class: 'band', points: band.join(' ') }));
  svg.append(s('polyline', { class: 'mean', points: ws.map((w) => `${X(mid(w)).toFixed(1)},${Y(w.mean).toFixed(1)}`).join(' ') }));
  // A hover target per window with its numbers.
  const hits = s('g', { class: 'hits' });
  const colW = Math.max(2, (W - PAD.l - PAD.r) / ws.length);
  for (const w of ws) {
    const r = s('rect', { x: X(mid(w)) - colW / 2, y: PAD.t, width: colW, height: height - PAD.t - PAD.b });
    r.append(s('title', {}, `${fmtTime(w.start_ms)} – ${fmtTime(w.end_ms)}\nmean ${fmtValue(w.mean)}  min ${fmtValue(w.min)}  max ${fmtValue(w.max)}\n${w.count ?? '?'} readings`));
    hits.append(r);
  }
  svg.append(hits);
  const mk = s('g', { class: 'markers' });
  for (const m of inside) {
    const c = s('circle', { cx: X(m.ts_ms), cy: Y(m.value), r: 5, class: 'marker' });
    c.style.fill = scoreColour(m.score);
    c.append(s('title', {}, m.title || `${fmtTime(m.ts_ms)}: ${fmtValue(m.value)} (score ${m.score})`));
    mk.append(c);
  }
  svg.append(mk);
  svg.setAttribute('data-markers', inside.length);
  return svg;
}

/** The detector's highest score per window, 0–1, as bars coloured by severity. */
export function scoreChart(windows, height = 90) {
  const ws = windows.filter((w) => Number.isFinite(w.start_ms) && Number.isFinite(w.end_ms))
    .sort((a, b) => a.start_ms - b.start_ms);
  if (!ws.length) return s('svg', { viewBox: `0 0 ${W} 40`, class: 'chart empty' });
  const x0 = ws[0].start_ms, x1 = ws[ws.length - 1].end_ms;
  const { svg, X, Y } = frame(height, x0, x1, 0, 1, { yTicks: [0, 0.5, 1], yFmt: (v) => v.toFixed(1) });
  svg.classList.add('scores');
  const g = s('g', { class: 'bars' });
  for (const w of ws) {
    const v = Math.max(0, Math.min(1, Number(w.max_score) || 0));
    const x = X(w.start_ms), wd = Math.max(1, X(w.end_ms) - x - 1);
    const r = s('rect', { x, y: Y(v), width: wd, height: Math.max(0.5, Y(0) - Y(v)) });
    r.style.fill = scoreColour(v);
    r.append(s('title', {}, `${fmtTime(w.start_ms)}: max score ${v.toFixed(3)}`));
    g.append(r);
  }
  svg.append(g);
  svg.setAttribute('data-points', ws.length);
  return svg;
}

/**
 * Events per bucket: `rate` as /api/anomalies/rate answers ({start_ms, bucket_ms, counts,
 * max_score, oldest_held_ms}). Buckets before the oldest held event are hatched: unknown, not zero.
 */
export function rateChart(rate, height = 160) {
  const n = rate.counts.length;
  const x0 = rate.start_ms, x1 = rate.start_ms + n * rate.bucket_ms;
  const top = Math.max(1, ...rate.counts);
  const yTicks = niceTicks(0, top, 3);
  const y1 = Math.max(top, yTicks[yTicks.length - 1] || 1);
  const { svg, X, Y } = frame(height, x0, x1, 0, y1, { yTicks, yFmt: (v) => String(v) });
  if (rate.oldest_held_ms == null || rate.oldest_held_ms > x0) {
    const until = rate.oldest_held_ms == null ? x1 : Math.min(x1, rate.oldest_held_ms);
    const r = s('rect', { x: X(x0), y: PAD.t, width: X(until) - X(x0), height: height - PAD.t - PAD.b, class: 'unknown' });
    r.append(s('title', {}, 'before the oldest event this aggregator still holds (feed.history): not known'));
    svg.append(r);
  }
  const g = s('g', { class: 'bars' });
  rate.counts.forEach((c, i) => {
    const t = x0 + i * rate.bucket_ms;
    const x = X(t), wd = Math.max(1, X(t + rate.bucket_ms) - x - 1);
    const r = s('rect', { x, y: Y(c), width: wd, height: Math.max(0, Y(0) - Y(c)) });
    r.style.fill = c ? scoreColour(rate.max_score ? rate.max_score[i] : 1) : 'transparent';
    r.append(s('title', {}, `${fmtTime(t)}: ${c} event${c === 1 ? '' : 's'}`));
    g.append(r);
  });
  svg.append(g);
  svg.setAttribute('data-points', n);
  return svg;
}

/** `partitions` cells, each coloured by its owner's colour (`owners[p]`). */
export function partitionStrip(partitions, owners, colours) {
  const cols = Math.min(64, partitions), rows = Math.ceil(partitions / cols);
  const cw = (W - 2) / cols, ch = 18;
  const svg = s('svg', { viewBox: `0 0 ${W} ${rows * ch + 2}`, class: 'strip' });
  for (let p = 0; p < partitions; p++) {
    const o = owners[p];
    const r = s('rect', { x: 1 + (p % cols) * cw, y: 1 + Math.floor(p / cols) * ch, width: cw - 1, height: ch - 2 });
    // undefined: owned elsewhere, not known here; null: nobody owns it; an array: several do.
    r.style.fill = o === undefined ? '#2a333d' : o === null ? '#8a1f2a' : Array.isArray(o) ? '#ff4d4d' : colours(o);
    const who = o === undefined ? 'another aggregator' : o === null ? 'NO OWNER'
      : Array.isArray(o) ? 'OVERLAP: ' + o.join(' and ') : o;
    r.append(s('title', {}, `partition ${p}: ${who}`));
    svg.append(r);
  }
  return svg;
}

/** A stable colour per name. */
export function colourOf(name) {
  let h = 0;
  for (const ch of String(name)) h = (h * 31 + ch.codePointAt(0)) >>> 0;
  return `hsl(${(h * 137) % 360}, 45%, 45%)`;
}
