//! The fleet-wide device API, answered by any instance: `GET /api/devices` (paged, filtered,
//! merged from every owner in the owners directory) and `GET /api/devices/{id}` (fetched from the
//! device's owner when this instance does not own it), plus the `fleet` part of `/api/status`.
//!
//! Query parsing and merging are pure functions tested directly; the handlers only snapshot the
//! state and the directory, ask the other owners ([`super::peer`]) and assemble the answer. A
//! request with `scope=local` never leaves this instance: that is what instances ask each other,
//! so two instances that each think the other owns a partition cannot bounce a request forever.

use super::{json_response, peer, Server};
use crate::state::DeviceState;
use crate::Shared;
use bytes::Bytes;
use edgewatch_models::partition::partition_of;
use http_body_util::Full;
use hyper::header::CONTENT_TYPE;
use hyper::{Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

/// `limit` when none is given.
pub(crate) const DEFAULT_LIMIT: usize = 100;
/// Largest `limit` of a fleet-wide page.
pub(crate) const MAX_LIMIT: usize = 1000;
/// Largest `limit` with `scope=local` (what an instance asks the others for: `offset + limit`).
pub(crate) const MAX_LOCAL_LIMIT: usize = 1_000_000;
/// Largest `offset`.
pub(crate) const MAX_OFFSET: usize = 1_000_000;
/// Events of a device returned by `/api/devices/{id}`.
pub(crate) const DEVICE_EVENTS: usize = 100;

/// Whose devices an answer covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// Every owner's, merged (the default).
    Fleet,
    /// This instance's only.
    Local,
}

impl Scope {
    fn name(self) -> &'static str {
        match self {
            Scope::Fleet => "fleet",
            Scope::Local => "local",
        }
    }

    fn parse(v: &str) -> Result<Self, String> {
        match v {
            "fleet" => Ok(Scope::Fleet),
            "local" => Ok(Scope::Local),
            other => Err(format!(
                "scope: expected fleet or local, got {:?}",
                other.chars().take(40).collect::<String>()
            )),
        }
    }
}

/// The query of `GET /api/devices`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DevicesQuery {
    pub offset: usize,
    pub limit: usize,
    /// Substring of the device id (ASCII case-insensitive).
    pub q: Option<String>,
    /// Exactly this agent.
    pub agent: Option<String>,
    /// Last reading at most this long before now.
    pub seen_within_ms: Option<u64>,
    /// At least this many anomaly events.
    pub min_anomalies: Option<u64>,
    pub scope: Scope,
}

impl DevicesQuery {
    /// Parses the query string; an error names the parameter and the bad value.
    pub(crate) fn parse(query: Option<&str>) -> Result<Self, String> {
        let mut out = Self {
            offset: 0,
            limit: DEFAULT_LIMIT,
            q: None,
            agent: None,
            seen_within_ms: None,
            min_anomalies: None,
            scope: Scope::Fleet,
        };
        let mut limit = None;
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, raw) = pair.split_once('=').unwrap_or((pair, ""));
            let v = crate::feed::percent_decode(raw)
                .ok_or_else(|| format!("{k}: bad percent-encoding, got {raw:?}"))?;
            let number = |max: u64| -> Result<u64, String> {
                v.parse::<u64>()
                    .ok()
                    .filter(|n| *n <= max)
                    .ok_or_else(|| format!("{k}: expected a whole number in 0..={max}, got {v:?}"))
            };
            match k {
                "offset" => out.offset = number(MAX_OFFSET as u64)? as usize,
                "limit" => limit = Some(number(MAX_LOCAL_LIMIT as u64)? as usize),
                "q" => out.q = Some(v).filter(|s| !s.is_empty()),
                "agent" => out.agent = Some(v).filter(|s| !s.is_empty()),
                "seen_within_ms" => out.seen_within_ms = Some(number(i64::MAX as u64)?),
                "min_anomalies" => out.min_anomalies = Some(number(u64::MAX)?),
                "scope" => out.scope = Scope::parse(&v)?,
                // Credentials, checked before routing.
                "ticket" | "token" => {}
                other => {
                    return Err(format!(
                        "unknown query parameter {:?} (offset, limit, q, agent, seen_within_ms, min_anomalies, scope)",
                        other.chars().take(40).collect::<String>()
                    ))
                }
            }
        }
        if let Some(l) = limit {
            let max = match out.scope {
                Scope::Fleet => MAX_LIMIT,
                Scope::Local => MAX_LOCAL_LIMIT,
            };
            if l == 0 || l > max {
                return Err(format!("limit: expected 1..={max}, got {l}"));
            }
            out.limit = l;
        }
        Ok(out)
    }

    /// The `scope=local` request asking another owner for everything this page may need: its
    /// first `offset + limit` matches.
    pub(crate) fn remote_target(&self) -> String {
        let mut t = format!(
            "/api/devices?scope=local&offset=0&limit={}",
            (self.offset + self.limit).clamp(1, MAX_LOCAL_LIMIT)
        );
        if let Some(q) = &self.q {
            t.push_str(&format!("&q={}", peer::encode(q)));
        }
        if let Some(a) = &self.agent {
            t.push_str(&format!("&agent={}", peer::encode(a)));
        }
        if let Some(s) = self.seen_within_ms {
            t.push_str(&format!("&seen_within_ms={s}"));
        }
        if let Some(n) = self.min_anomalies {
            t.push_str(&format!("&min_anomalies={n}"));
        }
        t
    }

    /// Whether `d` passes the filters at `now_ms`.
    pub(crate) fn matches(&self, d: &DeviceSummary, now_ms: i64) -> bool {
        self.q.as_deref().is_none_or(|q| {
            d.device
                .to_ascii_lowercase()
                .contains(&q.to_ascii_lowercase())
        }) && self
            .agent
            .as_deref()
            .is_none_or(|a| d.agent.as_deref() == Some(a))
            && self.seen_within_ms.is_none_or(|w| {
                d.last_seen_ms
                    .is_some_and(|t| t >= now_ms.saturating_sub(w as i64))
            })
            && self.min_anomalies.is_none_or(|n| d.anomalies >= n)
    }
}

/// One device in a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct DeviceSummary {
    pub device: String,
    pub partition: u32,
    /// The aggregator holding its state.
    pub owner: String,
    pub agent: Option<String>,
    pub last_seen_ms: Option<i64>,
    pub readings: u64,
    pub anomalies: u64,
    /// Its metric names, sorted.
    pub metrics: Vec<String>,
    pub last_anomaly_ms: Option<i64>,
}

impl DeviceSummary {
    fn of(id: &str, d: &DeviceState, owner: &str) -> Self {
        Self {
            device: id.to_string(),
            partition: d.partition,
            owner: owner.to_string(),
            agent: d.agent.clone(),
            last_seen_ms: d.last_seen_ms,
            readings: d.readings(),
            anomalies: d.anomalies(),
            metrics: d.metrics.keys().cloned().collect(),
            last_anomaly_ms: d.last_anomaly_ms(),
        }
    }
}

/// One owner's answer (or this instance's own part) of a fleet-wide list.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub(crate) struct Part {
    /// Its matching devices in all.
    pub total: usize,
    /// Its first matches, sorted by id.
    pub devices: Vec<DeviceSummary>,
}

/// Merges the parts of `owners` (which answer for `answers_for[partition]`) into one sorted page:
/// a device counts only from the owner answering for its partition (so one claimed twice appears
/// once); `total` adds up the parts' totals.
pub(crate) fn merge(
    parts: Vec<(String, Part)>,
    answers_for: &[Option<String>],
    offset: usize,
    limit: usize,
) -> (usize, Vec<DeviceSummary>) {
    let mut total = 0usize;
    let mut all: BTreeMap<String, DeviceSummary> = BTreeMap::new();
    for (owner, part) in parts {
        total = total.saturating_add(part.total);
        for d in part.devices {
            let answers = answers_for
                .get(d.partition as usize)
                .and_then(|o| o.as_deref())
                == Some(owner.as_str());
            if answers {
                all.entry(d.device.clone()).or_insert(d);
            } else {
                total = total.saturating_sub(1);
            }
        }
    }
    let page = all.into_values().skip(offset).take(limit).collect();
    (total, page)
}

/// This instance's devices matching `q` at `now_ms`, of partitions `keep` allows, sorted by id.
fn local_matches(
    shared: &Shared,
    q: &DevicesQuery,
    now_ms: i64,
    keep: impl Fn(u32) -> bool,
) -> Vec<DeviceSummary> {
    let state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    state
        .devices()
        .iter()
        .filter(|(_, d)| keep(d.partition))
        .map(|(id, d)| DeviceSummary::of(id, d, &shared.cfg.id))
        .filter(|d| q.matches(d, now_ms))
        .collect()
}

/// Who answers for each partition: the directory's live owner, or this instance for a partition
/// it owns that the directory does not know yet.
fn answers_for(shared: &Shared, now_ms: i64) -> Vec<Option<String>> {
    let dir = shared.directory.lock().unwrap_or_else(|e| e.into_inner());
    (0..shared.cfg.partitions)
        .map(|p| {
            let owner = dir.owner_of(p, now_ms).map(|e| e.record.aggregator.clone());
            // This instance knows its own ownership better than its last record.
            match owner {
                Some(o) if o == shared.cfg.id && !shared.owned.contains(p) => None,
                None if shared.owned.contains(p) => Some(shared.cfg.id.clone()),
                o => o,
            }
        })
        .collect()
}

/// The advertised URL of live aggregator `id`.
fn url_of(shared: &Shared, id: &str, now_ms: i64) -> Option<String> {
    let dir = shared.directory.lock().unwrap_or_else(|e| e.into_inner());
    let url = dir
        .live(now_ms)
        .find(|e| e.record.aggregator == id)
        .and_then(|e| e.record.http.clone());
    url
}

/// The token to send to other instances: ours when configured, else the caller's, if any.
fn bearer(shared: &Shared, caller: Option<&str>) -> Option<String> {
    shared.token.clone().or_else(|| caller.map(str::to_string))
}

/// `GET /api/devices`.
pub(super) async fn list(
    server: &Arc<Server>,
    query: Option<&str>,
    caller_token: Option<&str>,
) -> Response<Full<Bytes>> {
    let shared = &server.shared;
    let q = match DevicesQuery::parse(query) {
        Ok(q) => q,
        Err(e) => return json_response(StatusCode::BAD_REQUEST, &json!({ "error": e })),
    };
    let now = crate::fleet::run::now_ms();
    if q.scope == Scope::Local {
        let all = local_matches(shared, &q, now, |p| shared.owned.contains(p));
        let total = all.len();
        let page: Vec<_> = all.into_iter().skip(q.offset).take(q.limit).collect();
        return json_response(
            StatusCode::OK,
            &json!({"aggregator": shared.cfg.id, "scope": q.scope.name(), "total": total, "offset": q.offset,
                "limit": q.limit, "devices": page, "missing_partitions": []}),
        );
    }
    let answers = answers_for(shared, now);
    let me = shared.cfg.id.as_str();
    let local: Vec<DeviceSummary> = local_matches(shared, &q, now, |p| {
        answers.get(p as usize).and_then(|o| o.as_deref()) == Some(me)
    });
    let mut parts = vec![(
        me.to_string(),
        Part {
            total: local.len(),
            devices: local
                .into_iter()
                .take(q.offset.saturating_add(q.limit))
                .collect(),
        },
    )];
    // The other owners, with the partitions each answers for.
    let mut remote: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    let mut missing: BTreeSet<u32> = BTreeSet::new();
    for (p, o) in answers.iter().enumerate() {
        match o {
            None => {
                missing.insert(p as u32);
            }
            Some(o) if o != me => remote.entry(o.clone()).or_default().push(p as u32),
            Some(_) => {}
        }
    }
    let token = bearer(shared, caller_token);
    let timeout = Duration::from_millis(shared.cfg.http.fleet_timeout_ms);
    let permits = Arc::new(tokio::sync::Semaphore::new(
        shared.cfg.http.fleet_concurrency,
    ));
    let target = q.remote_target();
    let mut asks = tokio::task::JoinSet::new();
    for (owner, partitions) in remote {
        let url = url_of(shared, &owner, now);
        let (permits, token, target) = (permits.clone(), token.clone(), target.clone());
        asks.spawn(async move {
            let result = match &url {
                None => Err("no URL in its owners record".to_string()),
                Some(url) => {
                    let _permit = permits.acquire_owned().await;
                    ask(url, &target, token.as_deref(), timeout).await
                }
            };
            (owner, url, partitions, result)
        });
    }
    let mut errors = Vec::new();
    while let Some(done) = asks.join_next().await {
        let Ok((owner, url, partitions, result)) = done else {
            continue;
        };
        match result {
            Ok(part) => parts.push((owner, part)),
            Err(e) => {
                shared
                    .metrics
                    .fleet_requests_failed_total
                    .fetch_add(1, Relaxed);
                missing.extend(partitions);
                errors.push(json!({"owner": owner, "url": url, "error": e}));
            }
        }
    }
    let (total, page) = merge(parts, &answers, q.offset, q.limit);
    json_response(
        StatusCode::OK,
        &json!({"aggregator": shared.cfg.id, "scope": q.scope.name(), "total": total, "offset": q.offset,
            "limit": q.limit, "devices": page, "missing_partitions": missing, "errors": errors}),
    )
}

/// One owner's `scope=local` part.
async fn ask(
    url: &str,
    target: &str,
    token: Option<&str>,
    timeout: Duration,
) -> Result<Part, String> {
    let (status, body) = peer::get(url, target, token, timeout)
        .await
        .map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!(
            "answered {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)]).trim()
        ));
    }
    serde_json::from_slice(&body).map_err(|e| format!("answer not understood: {e}"))
}

/// `GET /api/devices/{id}`.
pub(super) async fn one(
    server: &Arc<Server>,
    id: &str,
    query: Option<&str>,
    caller_token: Option<&str>,
) -> Response<Full<Bytes>> {
    let shared = &server.shared;
    let mut scope = Scope::Fleet;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "scope" => match Scope::parse(v) {
                Ok(s) => scope = s,
                Err(e) => return json_response(StatusCode::BAD_REQUEST, &json!({ "error": e })),
            },
            "ticket" | "token" => {}
            other => {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    &json!({"error": format!("unknown query parameter {:?} (scope)", other.chars().take(40).collect::<String>())}),
                )
            }
        }
    }
    let partition = partition_of(id, shared.cfg.partitions);
    let me = shared.cfg.id.as_str();
    if shared.owned.contains(partition) || scope == Scope::Local {
        return local_device(shared, id, partition);
    }
    let now = crate::fleet::run::now_ms();
    let owner = answers_for(shared, now)
        .get(partition as usize)
        .cloned()
        .flatten()
        .filter(|o| o != me);
    let Some(owner) = owner else {
        return json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": format!("nobody owns partition {partition} of device {id:?}: no live aggregator claims it in the owners directory (see /api/status fleet.uncovered)"),
                "device": id, "partition": partition, "owner": null}),
        );
    };
    let Some(url) = url_of(shared, &owner, now) else {
        return json_response(
            StatusCode::BAD_GATEWAY,
            &json!({"error": format!("owner {owner} of partition {partition} has no URL in its owners record"),
                "device": id, "partition": partition, "owner": owner, "url": null}),
        );
    };
    let target = format!("/api/devices/{}?scope=local", peer::encode(id));
    let token = bearer(shared, caller_token);
    let timeout = Duration::from_millis(shared.cfg.http.fleet_timeout_ms);
    let failed = |why: String| {
        shared
            .metrics
            .fleet_requests_failed_total
            .fetch_add(1, Relaxed);
        json_response(
            StatusCode::BAD_GATEWAY,
            &json!({"error": format!("owner {owner} of partition {partition} at {url}: {why}"),
                "device": id, "partition": partition, "owner": owner, "url": url}),
        )
    };
    match peer::get(&url, &target, token.as_deref(), timeout).await {
        // The owner's body, unchanged.
        Ok((status @ (200 | 404), body)) => Response::builder()
            .status(status)
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .unwrap_or_default(),
        Ok((status, body)) => failed(format!(
            "answered {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)]).trim()
        )),
        Err(e) => failed(format!("did not answer: {e}")),
    }
}

/// A device this instance holds (or `404` saying it has sent nothing to this owner yet).
fn local_device(shared: &Shared, id: &str, partition: u32) -> Response<Full<Bytes>> {
    let me = shared.cfg.id.as_str();
    let body = {
        let state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        state.device(id).map(|d| {
            json!({"device": id, "partition": d.partition, "owner": me, "agent": d.agent,
                "last_seen_ms": d.last_seen_ms, "state": d})
        })
    };
    match body {
        Some(mut body) => {
            body["events"] = json!(shared.feed.recent_of(id, DEVICE_EVENTS));
            json_response(StatusCode::OK, &body)
        }
        None if shared.owned.contains(partition) => json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": format!("device {id:?} (partition {partition}) has sent nothing to its owner {me} yet"),
                "device": id, "partition": partition, "owner": me}),
        ),
        None => json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": format!("device {id:?} (partition {partition}) is not owned by aggregator {me}"),
                "device": id, "partition": partition, "owner": null}),
        ),
    }
}

/// The `fleet` object of `/api/status`: counters summed over the live owners, every known
/// aggregator, and the partitions uncovered or claimed twice.
pub(super) fn fleet_status(shared: &Shared) -> serde_json::Value {
    let now = crate::fleet::run::now_ms();
    let dir = shared.directory.lock().unwrap_or_else(|e| e.into_inner());
    let totals = dir.totals(now);
    let coverage = dir.coverage(now);
    json!({
        "devices": totals.devices,
        "readings": totals.readings,
        "anomalies": totals.anomalies,
        "aggregators": dir.aggregators(now),
        "settled": coverage.settled,
        "uncovered": coverage.uncovered,
        "overlapping": coverage.overlapping,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(id: &str, partition: u32, owner: &str, anomalies: u64) -> DeviceSummary {
        DeviceSummary {
            device: id.into(),
            partition,
            owner: owner.into(),
            agent: Some("gw-1".into()),
            last_seen_ms: Some(1_000),
            readings: 10,
            anomalies,
            metrics: vec!["flow".into()],
            last_anomaly_ms: None,
        }
    }

    #[test]
    fn queries_parse_with_defaults_and_name_bad_parameters() {
        let q = DevicesQuery::parse(None).unwrap();
        assert_eq!(
            (q.offset, q.limit, q.scope),
            (0, DEFAULT_LIMIT, Scope::Fleet)
        );
        let q = DevicesQuery::parse(Some(
            "offset=5&limit=7&q=PUMP&agent=gw%2D1&seen_within_ms=60000&min_anomalies=2&scope=local",
        ))
        .unwrap();
        assert_eq!(q.offset, 5);
        assert_eq!(q.limit, 7);
        assert_eq!(q.agent.as_deref(), Some("gw-1"));
        assert_eq!(q.scope, Scope::Local);
        for (bad, named) in [
            ("limit=0", "limit"),
            ("limit=1001", "limit"),
            ("limit=-1", "limit"),
            ("offset=x", "offset"),
            ("offset=99999999999999999999999", "offset"),
            ("seen_within_ms=1.5", "seen_within_ms"),
            ("min_anomalies=", "min_anomalies"),
            ("scope=world", "scope"),
            ("colour=red", "colour"),
            ("q=%zz", "q"),
        ] {
            let e = DevicesQuery::parse(Some(bad)).unwrap_err();
            assert!(e.contains(named), "{bad}: {e}");
        }
        assert_eq!(
            DevicesQuery::parse(Some("scope=local&limit=5000"))
                .unwrap()
                .limit,
            5000,
            "instances ask each other for offset + limit"
        );
    }

    #[test]
    fn filters_match_name_agent_recency_and_anomalies() {
        let q = DevicesQuery::parse(Some("q=ump&agent=gw-1&seen_within_ms=500&min_anomalies=1"))
            .unwrap();
        assert!(q.matches(&dev("Pump-1", 0, "a", 1), 1_400));
        assert!(!q.matches(&dev("valve", 0, "a", 1), 1_400));
        assert!(!q.matches(&dev("pump", 0, "a", 0), 1_400));
        assert!(!q.matches(&dev("pump", 0, "a", 1), 1_600), "too long ago");
        let mut other = dev("pump", 0, "a", 1);
        other.agent = Some("gw-2".into());
        assert!(!q.matches(&other, 1_400));
        other.agent = None;
        assert!(!q.matches(&other, 1_400));
        // Huge numbers do not overflow.
        let q = DevicesQuery::parse(Some(&format!("seen_within_ms={}", i64::MAX))).unwrap();
        assert!(q.matches(&dev("d", 0, "a", 0), i64::MIN + 5));
    }

    #[test]
    fn the_remote_target_asks_for_everything_the_page_needs() {
        let q = DevicesQuery::parse(Some("offset=200&limit=100&q=a b&min_anomalies=3")).unwrap();
        assert_eq!(
            q.remote_target(),
            "/api/devices?scope=local&offset=0&limit=300&q=a%20b&min_anomalies=3"
        );
        let back = DevicesQuery::parse(q.remote_target().split_once('?').map(|x| x.1)).unwrap();
        assert_eq!(back.q.as_deref(), Some("a b"));
        assert_eq!(back.scope, Scope::Local);
    }

    #[test]
    fn paging_the_merge_walks_every_device_exactly_once() {
        let answers: Vec<Option<String>> = (0..4)
            .map(|p| Some(if p < 2 { "a" } else { "b" }.to_string()))
            .collect();
        let all_a: Vec<_> = (0..25)
            .map(|i| dev(&format!("d{i:02}"), i % 2, "a", 0))
            .collect();
        let all_b: Vec<_> = (25..40)
            .map(|i| dev(&format!("d{i:02}"), 2 + i % 2, "b", 0))
            .collect();
        let mut seen = Vec::new();
        let limit = 7;
        let mut offset = 0;
        loop {
            // Each owner sends its first offset + limit, as remote_target asks.
            let part = |v: &Vec<DeviceSummary>| Part {
                total: v.len(),
                devices: v.iter().take(offset + limit).cloned().collect(),
            };
            let (total, page) = merge(
                vec![("a".into(), part(&all_a)), ("b".into(), part(&all_b))],
                &answers,
                offset,
                limit,
            );
            assert_eq!(total, 40);
            if page.is_empty() {
                break;
            }
            seen.extend(page.into_iter().map(|d| d.device));
            offset += limit;
        }
        let want: Vec<String> = (0..40).map(|i| format!("d{i:02}")).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn a_device_claimed_twice_is_listed_once_from_the_owner_that_answers() {
        let answers = vec![Some("a".to_string()), None];
        let (total, page) = merge(
            vec![
                (
                    "a".into(),
                    Part {
                        total: 1,
                        devices: vec![dev("x", 0, "a", 0)],
                    },
                ),
                (
                    "b".into(),
                    Part {
                        total: 2,
                        devices: vec![dev("x", 0, "b", 0), dev("y", 1, "b", 0)],
                    },
                ),
            ],
            &answers,
            0,
            10,
        );
        assert_eq!(total, 1);
        assert_eq!(page.len(), 1);
        assert_eq!(page[0].owner, "a");
    }
}
