// The device page (device?id=…): each metric's recent windows as a chart (mean in its min–max
// band, anomaly markers) above the detector's score per window, and the device's events, from
// the API (`events` when the server lists them) and the feed (`feed?device=…&last=100`, live).

import { $, el, api, header, every, openFeed, showFeedState, fmtTime, zone, ago, num, orDash,
         scoreBadge, short } from './common.js';
import { windowChart, scoreChart } from './chart.js';

const id = new URLSearchParams(location.search).get('id');
const events = new Map();
let device = null, renderQueued = false;

function fact(label, value, sub) {
  return el('div', { class: 'tile' }, el('div', { class: 'label', text: label }),
    el('div', { class: 'value', text: value }), sub ? el('div', { class: 'sub', text: sub }) : null);
}

/** The device answer in either shape (fleet: partition at the top, events; one instance: in state). */
function normalise(d) {
  const state = d.state || {};
  return {
    device: d.device, partition: d.partition ?? state.partition, owner: d.owner, agent: d.agent,
    last_seen_ms: d.last_seen_ms, metrics: state.metrics || {}, events: Array.isArray(d.events) ? d.events : null,
  };
}

const MAX_EVENTS = 500;
function addEvent(e) {
  if (!e || !e.id || String(e.device) !== id) return;
  events.set(e.id, e);
  if (events.size > MAX_EVENTS) {
    // Forget the oldest by event time.
    const oldest = [...events.values()].sort((a, b) => a.ts_ms - b.ts_ms).slice(0, events.size - MAX_EVENTS);
    for (const o of oldest) events.delete(o.id);
  }
}

function render() {
  renderQueued = false;
  if (!device) return;
  const ms = Object.entries(device.metrics).sort(([a], [b]) => a.localeCompare(b));
  const sum = (k) => ms.reduce((a, [, m]) => a + (Number(m[k]) || 0), 0);
  // Without the fleet API's last_seen_ms: the newest reading of any window held, on its own clock.
  const newest = Math.max(...ms.map(([, m]) => Math.max(...(m.windows || []).map((w) => w.last_ts_ms ?? -Infinity))));
  const seen = typeof device.last_seen_ms === 'number' ? device.last_seen_ms : isFinite(newest) ? newest : undefined;
  $('#title').textContent = `Device ${device.device}`;
  $('#facts').replaceChildren(
    fact('partition', orDash(device.partition)),
    fact('owner', orDash(device.owner)),
    fact('agent', orDash(device.agent)),
    fact(typeof device.last_seen_ms === 'number' ? 'last seen' : 'newest reading',
         seen === undefined ? '—' : ago(seen), seen === undefined ? undefined : fmtTime(seen, true)),
    fact('readings', num(sum('readings')), `${num(sum('windows_applied'))} windows applied`),
    fact('anomalies', num(sum('anomalies')), `${ms.length} metric${ms.length === 1 ? '' : 's'}`));
  for (const [, m] of ms) if (m.last_anomaly) addEvent(m.last_anomaly);
  const all = [...events.values()].sort((a, b) => b.ts_ms - a.ts_ms);
  $('#legend').hidden = !ms.length;
  $('#metrics').replaceChildren(...ms.map(([name, m]) => {
    const windows = Array.isArray(m.windows) ? m.windows : [];
    const markers = all.filter((e) => e.metric === name).map((e) => ({
      ts_ms: e.ts_ms, value: e.value, score: e.score,
      title: `${fmtTime(e.ts_ms, true)}\n${e.detector}: value ${e.value}, score ${Number(e.score).toFixed(3)}`,
    }));
    return el('div', { class: 'metric panel', 'data-metric': name },
      el('h3', { text: name }, el('span', { text: `${windows.length} recent windows · ${num(m.readings)} readings · ${num(m.anomalies)} anomalies`
        + (m.last_anomaly ? ` · last ${fmtTime(m.last_anomaly.ts_ms, true)}` : '') })),
      windowChart(windows, markers), scoreChart(windows));
  }));
  if (!ms.length) $('#message').textContent = 'This device has no windows yet.';
  const rows = all.slice(0, 200).map((e) => el('tr', { class: 'event', 'data-id': e.id },
    el('td', { text: fmtTime(e.ts_ms), title: fmtTime(e.ts_ms, true) }),
    el('td', { text: e.metric }),
    el('td', { class: 'num', text: num(e.value, 4) }),
    el('td', {}, scoreBadge(e.score)),
    el('td', { text: e.detector }),
    el('td', { class: 'muted', text: e.phase || 'onset' }),
    el('td', { class: 'muted', text: e.agent }),
    el('td', { class: 'muted', text: short(e.id), title: e.id })));
  if (!rows.length) rows.push(el('tr', { class: 'hint' }, el('td', { colspan: 8, text: 'No anomaly of this device in the feed\'s recent history.' })));
  $('#events').replaceChildren(...rows);
  $('#events-note').textContent = `${all.length} recent, newest first`;
}

function queueRender() {
  if (renderQueued) return;
  renderQueued = true;
  setTimeout(render, 250);
}

async function load() {
  try {
    const d = normalise(await api('api/devices/' + encodeURIComponent(id)));
    device = d;
    if (d.events) d.events.forEach(addEvent);
    $('#message').textContent = '';
    $('#message').className = 'muted';
    render();
  } catch (e) {
    $('#title').textContent = `Device ${id}`;
    $('#message').textContent = e.status === 404 ? `Not found: ${e.message}` : `The API failed: ${e.message}`;
    $('#message').className = 'error';
    if (e.status !== 404) throw e;
  }
}

$('#time-head').textContent = `time (${zone()})`;
$('#lg-mean').style.background = 'var(--accent)';
$('#lg-band').style.background = 'rgba(108, 196, 255, .35)';
$('#lg-marker').style.background = 'hsl(0, 90%, 50%)';
$('#pick').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const v = $('#device-id').value.trim();
  if (v) location.search = '?id=' + encodeURIComponent(v);
});
header().catch(() => {});
if (!id) {
  $('#message').textContent = 'Type a device id above, or click a device on the fleet or live page.';
  showFeedState('no device chosen', '');
} else {
  $('#device-id').value = id;
  document.title = `edgewatch — ${id}`;
  // The server takes `last` from the whole history before filtering by device: ask for all it
  // holds (feed.history) to get this device's recent events; only those are sent.
  openFeed({ device: id, last: 100000 }, {
    onEvent: (e) => { addEvent(e); queueRender(); },
    onControl: () => {},
    onState: showFeedState,
  });
  every(5000, load, (e) => { $('#message').textContent = `The API failed: ${e.message}`; });
}
