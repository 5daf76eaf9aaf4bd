// The fleet page: devices and agents, ingest and lag, the anomaly rate, who owns which partition,
// and the device list (paged, filtered). Reads the fleet-wide fields of the API where this
// aggregator has them and says "this instance" where it only knows its own share.

import { $, el, api, header, every, setConn, num, ago, ranges, deviceLink, orDash, fmtTime } from './common.js';
import { rateChart, partitionStrip, colourOf } from './chart.js';

const PAGE = 25;
const ONLINE_MS = 120000;
let offset = 0, total = 0;
let last = null;           // previous status poll: {t, readings, summaries}
const lanesSeen = new Map(); // agent/partition -> {agent, seq, changedAt}
let clusterMode;              // unknown until /api/cluster answered once

function filters() {
  return {
    q: $('#q').value.trim(), agent: $('#agent').value.trim(), seen: $('#seen').value,
    minAnomalies: $('#min-anomalies').value,
  };
}

/** The device list in either shape: the fleet's page object, or a single instance's plain array. */
function normalise(body, f) {
  if (!Array.isArray(body)) {
    return { fleet: body.scope === 'fleet', total: body.total ?? (body.devices || []).length,
             devices: body.devices || [], missing: body.missing_partitions || [] };
  }
  let rows = body.map((d) => {
    const ms = Object.entries(d.metrics || {});
    const sum = (k) => ms.reduce((a, [, m]) => a + (Number(m[k]) || 0), 0);
    const lastTs = Math.max(...ms.map(([, m]) => (m.last_window && m.last_window.last_ts_ms) || -Infinity));
    return { device: d.device, partition: d.partition, readings: sum('readings'), anomalies: sum('anomalies'),
             metrics: ms.map(([k]) => k), last_reading_ms: isFinite(lastTs) ? lastTs : undefined };
  });
  // This shape has no paging nor filters: both happen here.
  if (f.q) rows = rows.filter((d) => d.device.toLowerCase().includes(f.q.toLowerCase()));
  if (f.minAnomalies) rows = rows.filter((d) => d.anomalies >= Number(f.minAnomalies));
  return { fleet: false, total: rows.length, devices: rows.slice(offset, offset + PAGE), all: body.length, missing: [] };
}

async function devices() {
  const f = filters();
  const qs = new URLSearchParams({ offset, limit: PAGE });
  if (f.q) qs.set('q', f.q);
  if (f.agent) qs.set('agent', f.agent);
  if (f.seen) qs.set('seen_within_ms', f.seen);
  if (f.minAnomalies) qs.set('min_anomalies', f.minAnomalies);
  const list = normalise(await api('api/devices?' + qs), f);
  total = list.total;
  const now = Date.now();
  const rows = list.devices.map((d) => {
    const seen = d.last_seen_ms ?? d.last_reading_ms;
    const silent = typeof d.last_seen_ms === 'number' && now - d.last_seen_ms > ONLINE_MS;
    return el('tr', { class: silent ? 'silent' : '', 'data-device': d.device },
      el('td', {}, deviceLink(d.device)),
      el('td', { class: 'num', text: orDash(d.partition) }),
      el('td', { text: orDash(d.agent) }),
      el('td', { text: orDash(d.owner) }),
      el('td', { text: typeof seen === 'number' ? ago(seen, now) : '—',
                 title: typeof seen === 'number' ? fmtTime(seen, true) + (d.last_seen_ms === undefined ? ' (newest reading, its own clock)' : '') : undefined }),
      el('td', { class: 'num', text: num(d.readings) }),
      el('td', { class: 'num', text: num(d.anomalies) }),
      el('td', { class: 'muted', text: Array.isArray(d.metrics) ? d.metrics.join(', ') : '—' }));
  });
  if (!rows.length) rows.push(el('tr', { class: 'hint' }, el('td', { colspan: 8, text: total || offset
    ? 'No device matches these filters.'
    : 'No device has reported yet: devices appear once an agent forwards their first window.' })));
  $('#devices').replaceChildren(...rows);
  const noFilter = !f.q && !f.agent && !f.seen && !f.minAnomalies;
  $('#page').textContent = total ? `${offset + 1}–${Math.min(offset + PAGE, total)} of ${total}` : '0 of 0';
  $('#prev').disabled = offset === 0;
  $('#next').disabled = offset + PAGE >= total;
  $('#list-note').textContent = list.fleet ? 'whole fleet' : 'held by this instance (its partitions)';
  if (!list.fleet && (f.agent || f.seen)) $('#list-note').textContent += ' — agent and last-seen filters need the fleet API';
  if (list.missing.length) $('#list-note').textContent += ` — partitions not answering: ${ranges(list.missing)}`;
  return { list, noFilter };
}

function agentsFrom(status, now) {
  for (const l of status.lane_progress || []) {
    const prev = lanesSeen.get(l.agent + '/' + l.partition);
    if (!prev || prev.seq !== l.applied_seq) lanesSeen.set(l.agent + '/' + l.partition, { agent: l.agent, seq: l.applied_seq, changedAt: prev ? now : null });
  }
  const agents = new Map();
  for (const v of lanesSeen.values()) {
    const a = agents.get(v.agent) || { sending: false };
    if (v.changedAt !== null && now - v.changedAt < 60000) a.sending = true;
    agents.set(v.agent, a);
  }
  return agents;
}

async function owners(status) {
  const fleet = status.fleet;
  const parts = status.partitions || 0;
  const map = new Array(parts).fill(undefined);
  const rows = [];
  const add = (p, id) => {
    if (p < 0 || p >= parts) return;
    map[p] = map[p] === undefined || map[p] === null ? id : [].concat(map[p], id);
  };
  let note = '', coverage = '';
  if (fleet && Array.isArray(fleet.aggregators)) {
    map.fill(null);
    for (const a of fleet.aggregators) {
      if (a.online !== false) for (const p of a.partitions || []) add(p, a.id);
      rows.push(ownerRow(a.id, a.http, a.partitions, a.online === false ? 'offline' : 'online', a.age_ms));
    }
    note = 'whole fleet';
    const un = fleet.uncovered || [], ov = fleet.overlapping || [];
    coverage = (un.length ? `No owner: ${ranges(un)}. ` : '') + (ov.length ? `Owned twice: ${ranges(ov)}.` : '');
    if (!coverage) coverage = 'Every partition has exactly one owner.';
  } else {
    let cluster = null;
    if (clusterMode !== false) {
      try { cluster = await api('api/cluster'); clusterMode = true; } catch (e) {
        // 404: not in cluster mode, which does not change while the page is open.
        if (e.status === 404) clusterMode = false;
      }
    }
    if (cluster && Array.isArray(cluster.members)) {
      map.fill(null);
      for (const l of cluster.leases || []) if (l.owner) add(l.partition, l.owner);
      for (const m of cluster.members) {
        const mine = (cluster.leases || []).filter((l) => l.owner === m.id).map((l) => l.partition);
        rows.push(ownerRow(m.id, m.http, mine, `member, ${num(m.records_per_sec)} rec/s`, m.heartbeat_age_ms));
      }
      note = 'cluster leases';
      coverage = (cluster.unowned || []).length ? `No owner: ${ranges(cluster.unowned)}.` : 'Every partition has a lease holder.';
    } else {
      for (const p of status.owned || []) add(p, status.id);
      rows.push(ownerRow(status.id, null, status.owned || [], 'this instance', null));
      note = 'this instance only';
      coverage = 'The other partitions belong to other aggregators (the fleet view lists them once this instance knows its peers).';
    }
  }
  $('#strip').replaceChildren(partitionStrip(parts, map, colourOf));
  $('#owners').replaceChildren(...rows);
  $('#owners-note').textContent = `${parts} partitions — ${note}`;
  $('#coverage').textContent = coverage;
  $('#coverage').className = /No owner|twice/.test(coverage) ? 'warn' : 'muted';
  return rows.length;
}

function ownerRow(id, http, partitions, state, ageMs) {
  const chip = el('i');
  chip.style.background = colourOf(id);
  return el('tr', {},
    el('td', {}, chip, http ? el('a', { href: http.replace(/\/+$/, '') + '/', text: id }) : id),
    el('td', { text: ranges(partitions || []) }),
    el('td', { class: /offline/.test(state) ? 'error' : '', text: state }),
    el('td', { class: 'num', text: typeof ageMs === 'number' ? `${(ageMs / 1000).toFixed(1)} s` : '—' }));
}

async function rate() {
  const r = await api('api/anomalies/rate?bucket_ms=60000&buckets=60');
  $('#rate-chart').replaceChildren(rateChart(r));
  const lastFull = r.counts.length > 1 ? r.counts[r.counts.length - 2] : 0;
  $('#rate-note').textContent = `events per minute, up to ${fmtTime(r.end_ms)} (from the ${r.held} events this aggregator holds)`;
  return lastFull;
}

async function refresh() {
  const status = await header();
  const now = Date.now();
  const fleet = status.fleet || null;
  const scope = fleet ? '(fleet)' : '(this instance)';
  const readings = fleet ? fleet.readings : status.readings;
  const anomalies = fleet ? fleet.anomalies : status.anomalies_received;
  $('#readings').textContent = num(readings);
  $('#readings-scope').textContent = scope;
  $('#anomalies').textContent = num(anomalies);
  $('#anomalies-scope').textContent = fleet ? '(fleet)' : '(received here: the whole fleet\'s)';
  if (last && now > last.t && typeof readings === 'number') {
    const dt = (now - last.t) / 1000;
    $('#ingest').textContent = `${num(Math.max(0, (readings - last.readings) / dt))} readings/s, `
      + `${num(Math.max(0, (status.summaries_applied - last.summaries) / dt))} windows/s`;
  } else $('#ingest').textContent = 'measuring ingest…';
  last = { t: now, readings, summaries: status.summaries_applied };

  const waiting = (status.lane_progress || []).reduce((a, l) => a + (l.waiting || 0), 0);
  $('#lag').textContent = num(waiting);
  $('#lag-sub').textContent = `records waiting for a gap, over ${orDash(status.lanes)} lanes; ${num(status.bad_messages)} bad messages`;

  // The fleet's agents from their status messages (any instance has them all); an aggregator
  // without /api/agents: the agents whose lanes reach this instance.
  let fleetAgents = null;
  try { fleetAgents = await api('api/agents?limit=1'); } catch (_) { fleetAgents = null; }
  if (fleetAgents && typeof fleetAgents.total === 'number') {
    const { total, online = 0, offline = 0, stale = 0 } = fleetAgents;
    $('#agents-count').textContent = String(total);
    $('#agents-sub').textContent = total
      ? `${online} online, ${offline} offline${stale ? `, ${stale} silent` : ''} (fleet, from their status)`
      : 'no agent has published its status yet';
  } else {
    const agents = agentsFrom(status, now);
    const sending = [...agents.values()].filter((a) => a.sending).length;
    $('#agents-count').textContent = agents.size ? String(agents.size) : '—';
    $('#agents-sub').textContent = agents.size
      ? `${sending} sending in the last minute, ${agents.size - sending} quiet (lanes at this instance)`
      : 'none has sent to this instance yet';
  }

  const { list, noFilter } = await devices();
  let count = fleet && typeof fleet.devices === 'number' ? fleet.devices : null;
  if (count === null) count = list.fleet ? (noFilter ? list.total : null) : (list.all ?? list.total);
  if (count === null) count = normalise(await api('api/devices?limit=1'), {}).total;
  $('#devices-count').textContent = String(count);
  $('#devices-scope').textContent = fleet || list.fleet ? '(fleet)' : '(this instance)';
  if (list.fleet) {
    const on = await api(`api/devices?limit=1&seen_within_ms=${ONLINE_MS}`);
    const online = typeof on.total === 'number' ? on.total : null;
    $('#devices-sub').textContent = online === null ? '—' : `${online} online, ${count - online} silent for 2 min or more`;
  } else $('#devices-sub').textContent = 'online / silent: needs the fleet API';

  const n = await owners(status);
  const aggs = fleet && Array.isArray(fleet.aggregators) ? fleet.aggregators : null;
  $('#aggs').textContent = aggs ? `${aggs.filter((a) => a.online !== false).length} / ${aggs.length}` : String(n);
  $('#aggs-sub').textContent = aggs ? 'online / known' : `${ranges(status.owned || [])} owned here; up ${num(status.uptime_secs)} s`;

  const perMin = await rate();
  $('#anomalies-sub').textContent = `${perMin} in the last full minute`;
  setConn('up to date ' + new Date().toLocaleTimeString(), 'ok');
}

$('#device-filter').addEventListener('submit', (ev) => { ev.preventDefault(); offset = 0; devices().catch(shown); });
$('#prev').addEventListener('click', () => { offset = Math.max(0, offset - PAGE); devices().catch(shown); });
$('#next').addEventListener('click', () => { if (offset + PAGE < total) offset += PAGE; devices().catch(shown); });
function shown(e) { setConn('API: ' + e.message, 'bad'); }
every(5000, refresh, shown);
