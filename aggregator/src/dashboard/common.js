// What every dashboard page shares: the bearer token (asked for when the API answers 401, kept
// in this tab's sessionStorage, never put in a URL), API calls, the live feed's connection with
// its states and resume, and formatting of times, numbers and scores.

const KEY = 'edgewatch.token';

// A token given once as a fragment, PAGE#token=<token> (a fragment never reaches the server), is
// moved to the tab's storage and taken out of the address bar.
{
  const fromHash = new URLSearchParams(location.hash.slice(1)).get('token');
  if (fromHash) {
    sessionStorage.setItem(KEY, fromHash);
    history.replaceState(null, '', location.pathname + location.search);
  }
}

export const $ = (sel) => document.querySelector(sel);

/** An element with attributes and children (strings become text nodes, never HTML). */
export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

export function token() { return sessionStorage.getItem(KEY); }
function authHeaders() { const t = token(); return t ? { Authorization: 'Bearer ' + t } : {}; }

let asking = null;
/** Shows the token prompt; resolves once a token was entered. One prompt for all waiting calls. */
export function askToken() {
  if (asking) return asking;
  asking = new Promise((resolve) => {
    const wrong = token() !== null;
    const input = el('input', { id: 'token-input', type: 'password', placeholder: 'bearer token',
                                autocomplete: 'off', 'aria-label': 'bearer token' });
    const form = el('form', { id: 'login', class: 'login' },
      el('p', { text: wrong
        ? 'The token was refused: this aggregator wants another one.'
        : 'This aggregator needs a bearer token (its http.auth_token_env). It is kept for this tab only.' }),
      input, el('button', { type: 'submit', text: 'connect' }));
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      if (!input.value) return;
      sessionStorage.setItem(KEY, input.value);
      form.remove();
      asking = null;
      resolve();
    });
    document.body.prepend(form);
    setConn('token required', 'bad');
    input.focus();
  });
  return asking;
}

/** An API answer other than 2xx, with the server's own message. */
export class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

/** GET a JSON API path (relative, e.g. 'api/status'); asks for a token on 401 and retries. */
export async function api(path) {
  for (;;) {
    const r = await fetch(path, { headers: authHeaders(), cache: 'no-store' });
    if (r.status === 401) { await askToken(); continue; }
    const body = await r.text();
    let json = null;
    try { json = JSON.parse(body); } catch (_) { /* a plain-text answer */ }
    if (!r.ok) throw new ApiError(r.status, (json && json.error) || body.trim() || 'HTTP ' + r.status);
    return json;
  }
}

/** The connection indicator in the header. */
export function setConn(textValue, cls) {
  const c = $('#conn');
  if (!c) return;
  c.textContent = textValue;
  c.className = 'state ' + (cls || '');
}

/**
 * The live feed: a single-use ticket bought with the token (a browser's WebSocket cannot send
 * headers), then `feed?ticket=`. Reconnects with backoff and resumes after the last event seen.
 * `params`: device, metric, min_score, last. Callbacks: onEvent(e), onControl(msg), onState(state, detail)
 * with state one of connecting, live, retrying (detail: seconds), resumed (detail: event id), token.
 */
export function openFeed(params, { onEvent, onControl, onState }) {
  let lastId = null, ws = null, stopped = false, delay = 1, timer = null, opened = false;
  async function ticket() {
    for (;;) {
      const r = await fetch('api/feed/ticket', { method: 'POST', headers: authHeaders(), cache: 'no-store' });
      if (r.status === 401) { onState('token'); await askToken(); continue; }
      if (!r.ok) throw new Error('ticket: HTTP ' + r.status);
      return (await r.json()).ticket;
    }
  }
  function retry() {
    if (stopped) return;
    let left = delay;
    delay = Math.min(delay * 2, 15);
    onState('retrying', left);
    timer = setInterval(() => {
      left -= 1;
      if (left > 0) { onState('retrying', left); return; }
      clearInterval(timer); timer = null;
      connect();
    }, 1000);
  }
  async function connect() {
    if (stopped) return;
    onState('connecting');
    let t;
    try { t = await ticket(); } catch (_) { retry(); return; }
    const url = new URL('feed', location.href);
    url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
    for (const [k, v] of Object.entries(params)) if (v !== '' && v != null) url.searchParams.set(k, v);
    const resuming = lastId;
    if (resuming) { url.searchParams.delete('last'); url.searchParams.set('since', resuming); }
    url.searchParams.set('ticket', t);
    ws = new WebSocket(url);
    ws.onopen = () => {
      delay = 1;
      opened = true;
      if (resuming) onState('resumed', resuming); else onState('live');
    };
    ws.onclose = (ev) => {
      ws = null;
      if (stopped) return;
      if (ev.reason && onControl) onControl({ type: 'closed', code: ev.code, reason: ev.reason });
      retry();
    };
    ws.onmessage = (m) => {
      let msg;
      try { msg = JSON.parse(m.data); } catch (_) { return; }
      if (msg && typeof msg.type === 'string') { if (onControl) onControl(msg); return; }
      if (msg && msg.id) lastId = msg.id;
      onEvent(msg);
    };
  }
  connect();
  return {
    close() { stopped = true; if (timer) clearInterval(timer); if (ws) ws.close(); },
    get opened() { return opened; },
  };
}

/** The standard rendering of feed states in the header. */
export function showFeedState(state, detail) {
  switch (state) {
    case 'connecting': return setConn('connecting…', 'wait');
    case 'live': return setConn('live', 'ok');
    case 'retrying': return setConn(`disconnected, retrying in ${detail} s`, 'bad');
    case 'resumed': return setConn(`live — resumed from event ${short(detail)}`, 'ok');
    case 'token': return setConn('token required', 'bad');
    default: return setConn(state, '');
  }
}

export function short(id) { return id && id.length > 12 ? id.slice(0, 12) + '…' : (id || ''); }

const dtf = new Intl.DateTimeFormat(undefined, {
  year: 'numeric', month: '2-digit', day: '2-digit',
  hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false,
});
const zoneFmt = new Intl.DateTimeFormat(undefined, { timeZoneName: 'short' });
/** The browser's time zone: its name and its short form (e.g. "Europe/Paris, CET"). */
export function zone() {
  const name = Intl.DateTimeFormat().resolvedOptions().timeZone || 'local';
  const abbr = (zoneFmt.formatToParts(new Date()).find((p) => p.type === 'timeZoneName') || {}).value;
  return abbr && abbr !== name ? `${name}, ${abbr}` : name;
}
/** A timestamp (ms) in local time, with the zone when `withZone`. */
export function fmtTime(ms, withZone = false) {
  if (typeof ms !== 'number' || !isFinite(ms)) return '—';
  const d = new Date(ms);
  if (isNaN(d)) return '—';
  const s = dtf.format(d);
  if (!withZone) return s;
  const z = (zoneFmt.formatToParts(d).find((p) => p.type === 'timeZoneName') || {}).value;
  return z ? `${s} ${z}` : s;
}
/** "12 s ago", "3 min ago", "in 2 h" from a timestamp. */
export function ago(ms, now = Date.now()) {
  if (typeof ms !== 'number' || !isFinite(ms)) return '—';
  const d = (now - ms) / 1000, a = Math.abs(d);
  const s = a < 90 ? `${Math.round(a)} s` : a < 5400 ? `${Math.round(a / 60)} min`
          : a < 172800 ? `${Math.round(a / 3600)} h` : `${Math.round(a / 86400)} d`;
  return d >= 0 ? `${s} ago` : `in ${s}`;
}
/** A number for people: 1234567 → "1.23 M"; missing → "—". */
export function num(v, digits = 3) {
  if (typeof v !== 'number' || !isFinite(v)) return '—';
  const a = Math.abs(v);
  if (a >= 1e9) return (v / 1e9).toPrecision(digits) + ' G';
  if (a >= 1e6) return (v / 1e6).toPrecision(digits) + ' M';
  if (a >= 1e4) return (v / 1e3).toPrecision(digits) + ' k';
  if (Number.isInteger(v)) return String(v);
  return a >= 100 ? String(Math.round(v)) : String(+v.toPrecision(digits));
}
/** A field that may be missing (an older or single-instance API): "—" then. */
export function orDash(v) { return v === undefined || v === null || v === '' ? '—' : String(v); }

/** Severity colour of a score in [0, 1]: amber at 0.5 and below, through orange, to red at 1. */
export function scoreColour(score) {
  const t = Math.max(0, Math.min(1, ((Number(score) || 0) - 0.5) / 0.5));
  return `hsl(${Math.round(48 - 48 * t)}, 90%, ${Math.round(62 - 12 * t)}%)`;
}
/** A score badge coloured by severity. */
export function scoreBadge(score) {
  const b = el('span', { class: 'score', text: typeof score === 'number' ? score.toFixed(3) : '—' });
  b.style.background = scoreColour(score);
  return b;
}

/** Partition numbers as ranges: [0,1,2,5] → "0-2, 5". */
export function ranges(list) {
  const ps = [...new Set(list)].filter(Number.isInteger).sort((a, b) => a - b);
  const out = [];
  for (let i = 0; i < ps.length; i++) {
    let j = i;
    while (j + 1 < ps.length && ps[j + 1] === ps[j] + 1) j++;
    out.push(i === j ? String(ps[i]) : `${ps[i]}-${ps[j]}`);
    i = j;
  }
  return out.join(', ') || '—';
}

/** A link to a device's page. */
export function deviceLink(id) {
  return el('a', { href: 'device?id=' + encodeURIComponent(id), class: 'device', text: id });
}

/** Fills the header's aggregator name and time zone; returns the status. */
export async function header() {
  const z = $('#tz');
  if (z) z.textContent = 'times in ' + zone();
  const s = await api('api/status');
  const a = $('#agg');
  if (a) a.textContent = s.id;
  return s;
}

/** Runs `fn` now and every `ms`, never overlapping itself; errors go to `onError`. */
export function every(ms, fn, onError) {
  const tick = async () => {
    try { await fn(); } catch (e) { if (onError) onError(e); else console.error(e); }
    setTimeout(tick, ms);
  };
  tick();
}
