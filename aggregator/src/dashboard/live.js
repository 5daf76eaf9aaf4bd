// The live page: the anomaly feed as it arrives, newest first, coloured by score, with filters
// kept in the URL (device, metric, min score go to the server; detector is matched here), pause
// and resume, a hint until the first event, gap and close notices from the server.

import { $, el, header, openFeed, showFeedState, fmtTime, zone, num, scoreBadge, scoreColour,
         deviceLink } from './common.js';

const MAX_ROWS = 500;
const MAX_QUEUED = 5000;
let feed = null, shown = 0, paused = false, queued = [], dropped = 0, state = 'connecting';
const detectors = new Set();

const FIELDS = { device: '#f-device', metric: '#f-metric', detector: '#f-detector', min_score: '#f-min-score' };

function fromUrl() {
  const q = new URLSearchParams(location.search);
  for (const [k, sel] of Object.entries(FIELDS)) $(sel).value = q.get(k) || '';
}
function current() {
  const f = {};
  for (const [k, sel] of Object.entries(FIELDS)) f[k] = $(sel).value.trim();
  return f;
}

function hint() {
  const h = $('#hint');
  if (!h) return;
  const f = current();
  const filtered = Object.values(f).some((v) => v);
  let msg;
  if (state === 'live' || state === 'resumed') {
    msg = `The feed is live and no anomaly ${filtered ? 'matching these filters ' : ''}has arrived yet. `
      + 'Events show here within a second of an agent reporting one. After a start, detectors warm up '
      + 'on their first windows before they score, so a fresh fleet stays quiet for a while.';
  } else if (state === 'retrying' || state === 'token') msg = 'Not connected: see the state at the top.';
  else msg = 'Connecting to the feed…';
  h.firstChild.textContent = msg;
}

function eventRow(e) {
  // A missing phase is an onset (the wire leaves the default out).
  const phase = e.phase || 'onset';
  const tr = el('tr', { class: 'event ' + phase, 'data-id': e.id },
    el('td', { text: fmtTime(e.ts_ms), title: fmtTime(e.ts_ms, true) + ' — event ' + e.id }),
    el('td', {}, deviceLink(String(e.device))),
    el('td', { text: e.metric }),
    el('td', { class: 'num', text: num(e.value, 4) }),
    el('td', {}, scoreBadge(e.score)),
    el('td', { text: e.detector }),
    el('td', { class: 'muted', text: phase }),
    el('td', { class: 'muted', text: e.agent }));
  if (phase !== 'recovery') tr.firstChild.style.borderLeftColor = scoreColour(e.score);
  return tr;
}

function controlRow(m) {
  const { type, ...rest } = m;
  const parts = Object.entries(rest).map(([k, v]) => `${k}: ${typeof v === 'object' ? JSON.stringify(v) : v}`);
  const what = type === 'gap' ? 'gap — events may be missing here' : type === 'closed' ? 'the server closed the feed' : type;
  return el('tr', { class: 'control', 'data-type': type },
    el('td', { text: fmtTime(Date.now()), title: 'when this notice arrived' }),
    el('td', { colspan: 7, text: `${what}${parts.length ? ' (' + parts.join(', ') + ')' : ''}` }));
}

function put(tr) {
  const rows = $('#rows');
  const h = $('#hint');
  if (h) h.remove();
  rows.insertBefore(tr, rows.firstChild);
  while (rows.children.length > MAX_ROWS) rows.removeChild(rows.lastChild);
}

function onEvent(e) {
  if (e.detector && !detectors.has(e.detector)) {
    detectors.add(e.detector);
    $('#detectors').append(el('option', { value: e.detector }));
  }
  const want = current().detector;
  if (want && e.detector !== want) return;
  if (paused) {
    if (queued.length >= MAX_QUEUED) { queued.shift(); dropped++; }
    queued.push(e);
    $('#paused').textContent = `paused: ${queued.length} new${dropped ? `, ${dropped} older ones not kept` : ''}`;
    return;
  }
  put(eventRow(e));
  $('#count').textContent = String(++shown);
}

function start() {
  if (feed) feed.close();
  const f = current();
  // `last` counts the history before the server's filters: a filtered view looks further back.
  const filtered = f.device || f.metric || f.min_score;
  const params = { device: f.device, metric: f.metric, min_score: f.min_score, last: filtered ? 2000 : 200 };
  feed = openFeed(params, {
    onEvent,
    onControl: (m) => put(controlRow(m)),
    onState: (s, d) => { state = s; showFeedState(s, d); hint(); },
  });
  const note = [];
  if (f.device || f.metric || f.min_score) note.push('filtered by the server');
  if (f.detector) note.push(`detector ${f.detector} matched here`);
  $('#filter-note').textContent = note.join('; ');
}

$('#filters').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const f = current();
  if (f.min_score && !(Number(f.min_score) >= 0 && Number(f.min_score) <= 1)) {
    $('#filter-note').textContent = `min score must be in [0, 1], got ${f.min_score}`;
    $('#filter-note').className = 'error';
    return;
  }
  $('#filter-note').className = '';
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(f)) if (v) q.set(k, v);
  history.replaceState(null, '', location.pathname + (q.toString() ? '?' + q : ''));
  shown = 0; queued = []; dropped = 0;
  $('#count').textContent = '0';
  $('#rows').replaceChildren(el('tr', { class: 'hint', id: 'hint' }, el('td', { colspan: 8, text: '' })));
  hint();
  start();
});
$('#clear').addEventListener('click', () => {
  for (const sel of Object.values(FIELDS)) $(sel).value = '';
  $('#filters').requestSubmit();
});
$('#pause').addEventListener('click', () => {
  paused = !paused;
  const b = $('#pause');
  b.textContent = paused ? 'resume' : 'pause';
  b.classList.toggle('on', paused);
  b.setAttribute('aria-pressed', String(paused));
  if (!paused) {
    for (const e of queued) { put(eventRow(e)); shown++; }
    $('#count').textContent = String(shown);
    queued = []; dropped = 0;
    $('#paused').textContent = '';
  } else $('#paused').textContent = 'paused: new events are kept until you resume';
});

$('#sev-lo').style.background = scoreColour(0.5);
$('#sev-mid').style.background = scoreColour(0.75);
$('#sev-hi').style.background = scoreColour(1);
$('#time-head').textContent = `time (${zone()})`;
fromUrl();
start();
header().catch(() => { /* the feed's own state says what is wrong */ });
