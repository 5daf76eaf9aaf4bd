//! The fleet's agents as their retained status messages describe them (`{prefix}/status/+`, every
//! aggregator subscribes, so any instance answers `GET /api/agents`). [`Directory`] is the bounded
//! table, a state machine given the time; [`Agents`] wraps it for the poll loop (which records a
//! message without waiting) and the HTTP server, and counts refused messages by reason.
//!
//! Refused: a topic id that is not an agent id, a body that is not a status or names another agent
//! (what a forger without the ACLs of `configs/security/` could send), more than
//! `MAX_STATUS_BYTES`. At most [`MAX_AGENTS`] agents are kept; a new one past that replaces the
//! longest-offline agent, or is refused when none is offline.

use edgewatch_models::agent_status::{AgentStatus, StatusRefusal};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most agents one aggregator keeps.
pub const MAX_AGENTS: usize = 10_000;
/// Default and largest page of `GET /api/agents`.
pub const DEFAULT_LIMIT: usize = 100;
/// Largest `limit` accepted.
pub const MAX_LIMIT: usize = 1_000;
/// A status older than this many of its intervals is shown as stale.
const STALE_INTERVALS: u64 = 3;

/// Why a status was not kept (the labels of `edgewatch_aggregator_agent_status_refused_total`).
const REASONS: [&str; 5] = ["too_large", "malformed", "bad_id", "id_mismatch", "full"];

#[derive(Debug, Clone)]
struct Entry {
    status: AgentStatus,
    /// When this aggregator received the latest message, ms since the epoch.
    received_ms: i64,
    /// When the agent was first seen offline in a row of offline records.
    offline_since_ms: Option<i64>,
}

/// What recording a message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recorded {
    /// A status kept (new or updated agent).
    Kept,
    /// The retained status was cleared (empty message): the agent is forgotten.
    Removed,
}

/// Why a message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// See [`StatusRefusal`].
    Status(StatusRefusal),
    /// [`MAX_AGENTS`] are known and none is offline.
    Full,
}

impl Refused {
    fn index(self) -> usize {
        match self {
            Self::Status(StatusRefusal::TooLarge) => 0,
            Self::Status(StatusRefusal::Malformed) => 1,
            Self::Status(StatusRefusal::BadId) => 2,
            Self::Status(StatusRefusal::IdMismatch) => 3,
            Self::Full => 4,
        }
    }
}

/// The agents known, by id.
#[derive(Debug)]
pub(crate) struct Directory {
    max: usize,
    agents: BTreeMap<String, Entry>,
}

impl Directory {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            agents: BTreeMap::new(),
        }
    }

    /// Records a message received on the status topic of `topic_agent` at `now_ms`.
    pub(crate) fn record(
        &mut self,
        topic_agent: &str,
        payload: &[u8],
        now_ms: i64,
    ) -> Result<Recorded, Refused> {
        if payload.is_empty() {
            if !edgewatch_models::wire::is_valid_node_id(topic_agent) {
                return Err(Refused::Status(StatusRefusal::BadId));
            }
            self.agents.remove(topic_agent);
            return Ok(Recorded::Removed);
        }
        let status = AgentStatus::parse(topic_agent, payload).map_err(Refused::Status)?;
        if let Some(e) = self.agents.get_mut(topic_agent) {
            if status.online {
                *e = Entry {
                    status,
                    received_ms: now_ms,
                    offline_since_ms: None,
                };
            } else {
                // The last will says only "offline": keep what was known, mark it.
                e.status.online = false;
                e.offline_since_ms.get_or_insert(now_ms);
                e.received_ms = now_ms;
            }
            return Ok(Recorded::Kept);
        }
        if self.agents.len() >= self.max {
            let oldest_offline = self
                .agents
                .iter()
                .filter(|(_, e)| !e.status.online)
                .min_by_key(|(_, e)| e.offline_since_ms.unwrap_or(e.received_ms))
                .map(|(id, _)| id.clone());
            match oldest_offline {
                Some(id) => {
                    self.agents.remove(&id);
                }
                None => return Err(Refused::Full),
            }
        }
        let offline_since_ms = (!status.online).then_some(now_ms);
        self.agents.insert(
            topic_agent.to_string(),
            Entry {
                status,
                received_ms: now_ms,
                offline_since_ms,
            },
        );
        Ok(Recorded::Kept)
    }

    /// Agents known.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.agents.len()
    }

    /// One agent as `/api/agents` shows it.
    fn view(e: &Entry, now_ms: i64) -> Value {
        let s = &e.status;
        let age_ms = now_ms
            .saturating_sub(s.updated_ms.unwrap_or(e.received_ms).min(now_ms))
            .max(0) as u64;
        let stale = s.online
            && s.interval_ms
                .is_some_and(|i| age_ms > i.saturating_mul(STALE_INTERVALS));
        let mut v = serde_json::to_value(s).unwrap_or_else(|_| json!({}));
        if let Value::Object(m) = &mut v {
            m.insert("age_ms".into(), json!(age_ms));
            m.insert("stale".into(), json!(stale));
            m.insert("received_ms".into(), json!(e.received_ms));
            if let Some(since) = e.offline_since_ms {
                m.insert("offline_since_ms".into(), json!(since));
            }
        }
        v
    }

    /// The page `offset..offset + limit` of the agents in id order, with the total.
    pub(crate) fn page(&self, offset: usize, limit: usize, now_ms: i64) -> Value {
        let agents: Vec<Value> = self
            .agents
            .values()
            .skip(offset)
            .take(limit)
            .map(|e| Self::view(e, now_ms))
            .collect();
        json!({
            "total": self.agents.len(),
            "offset": offset,
            "limit": limit,
            "agents": agents,
        })
    }

    /// (online, offline, stale) counts.
    fn counts(&self, now_ms: i64) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for e in self.agents.values() {
            if !e.status.online {
                c.1 += 1;
            } else if Self::view(e, now_ms)["stale"] == json!(true) {
                c.2 += 1;
            } else {
                c.0 += 1;
            }
        }
        c
    }
}

/// The directory shared by the poll loop and the HTTP server, with its refusal counters.
pub(crate) struct Agents {
    dir: Mutex<Directory>,
    refused: [AtomicU64; REASONS.len()],
    last_log: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl Default for Agents {
    fn default() -> Self {
        Self {
            dir: Mutex::new(Directory::new(MAX_AGENTS)),
            refused: Default::default(),
            last_log: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }
}

impl Agents {
    fn dir(&self) -> std::sync::MutexGuard<'_, Directory> {
        self.dir.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a status message (from the poll loop; never blocks on I/O). A refusal is counted
    /// and logged at most every 10 s.
    pub(crate) fn record(&self, aggregator: &str, topic: &str, agent: &str, payload: &[u8]) {
        let result = self.dir().record(agent, payload, now_ms());
        if let Err(why) = result {
            self.refused[why.index()].fetch_add(1, Relaxed);
            let mut last = self.last_log.lock().unwrap_or_else(|e| e.into_inner());
            let due = last.is_none_or(|t| t.elapsed() >= Duration::from_secs(10));
            if due {
                *last = Some(Instant::now());
                let suppressed = self.suppressed.swap(0, Relaxed);
                tracing::warn!(aggregator, topic = %topic.escape_debug(), reason = REASONS[why.index()], suppressed, "agent status refused (logged at most every 10 s; all counted in edgewatch_aggregator_agent_status_refused_total)");
            } else {
                self.suppressed.fetch_add(1, Relaxed);
            }
        }
    }

    /// `GET /api/agents?offset=&limit=`.
    pub(crate) fn api(&self, query: Option<&str>) -> Result<Value, String> {
        let (offset, limit) = paging(query)?;
        let now = now_ms();
        let dir = self.dir();
        let mut page = dir.page(offset, limit, now);
        // Counts over every agent, not the page: the dashboard's online/offline at a glance.
        let (online, offline, stale) = dir.counts(now);
        if let Some(m) = page.as_object_mut() {
            m.insert("online".into(), json!(online));
            m.insert("offline".into(), json!(offline));
            m.insert("stale".into(), json!(stale));
        }
        Ok(page)
    }

    /// The agents' families of `/metrics`, HELP lines included.
    pub(crate) fn render(&self, aggregator: &str, out: &mut String) {
        let (online, offline, stale) = self.dir().counts(now_ms());
        let _ = writeln!(
            out,
            "# HELP edgewatch_aggregator_agents Agents known from their status messages, by state (stale: online but silent for {STALE_INTERVALS} status intervals).\n# TYPE edgewatch_aggregator_agents gauge"
        );
        for (state, n) in [("online", online), ("offline", offline), ("stale", stale)] {
            let _ = writeln!(
                out,
                "edgewatch_aggregator_agents{{aggregator=\"{aggregator}\",state=\"{state}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP edgewatch_aggregator_agent_status_refused_total Agent status messages refused, by reason (forged, malformed, too large, directory full).\n# TYPE edgewatch_aggregator_agent_status_refused_total counter"
        );
        for (i, reason) in REASONS.iter().enumerate() {
            let _ = writeln!(
                out,
                "edgewatch_aggregator_agent_status_refused_total{{aggregator=\"{aggregator}\",reason=\"{reason}\"}} {}",
                self.refused[i].load(Relaxed)
            );
        }
    }
}

/// `offset` and `limit` of a query string (defaults 0 and [`DEFAULT_LIMIT`]).
fn paging(query: Option<&str>) -> Result<(usize, usize), String> {
    let (mut offset, mut limit) = (0, DEFAULT_LIMIT);
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let n = || {
            v.parse::<usize>()
                .map_err(|_| format!("{k}: expected a non-negative integer, got {v:?}\n"))
        };
        match k {
            "offset" => offset = n()?,
            "limit" => {
                limit = n()?;
                if limit == 0 || limit > MAX_LIMIT {
                    return Err(format!("limit: must be in 1..={MAX_LIMIT}, got {limit}\n"));
                }
            }
            _ => return Err(format!("unknown parameter {k:?} (offset, limit)\n")),
        }
    }
    Ok((offset, limit))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn online(agent: &str, updated_ms: i64) -> Vec<u8> {
        format!(r#"{{"agent":"{agent}","online":true,"version":"0.1.0","series":3,"interval_ms":1000,"updated_ms":{updated_ms}}}"#).into_bytes()
    }

    #[test]
    fn a_last_will_marks_a_known_agent_offline_and_keeps_what_was_known() {
        let mut d = Directory::new(10);
        d.record("gw-1", &online("gw-1", 1_000), 1_000).unwrap();
        d.record("gw-1", br#"{"agent":"gw-1","online":false}"#, 5_000)
            .unwrap();
        let page = d.page(0, 10, 6_000);
        let a = &page["agents"][0];
        assert_eq!(a["online"], json!(false));
        assert_eq!(a["version"], json!("0.1.0"));
        assert_eq!(a["offline_since_ms"], json!(5_000));
        assert_eq!(a["stale"], json!(false));
        // Online again: the offline mark goes.
        d.record("gw-1", &online("gw-1", 7_000), 7_000).unwrap();
        assert!(d.page(0, 10, 7_000)["agents"][0]
            .get("offline_since_ms")
            .is_none());
    }

    #[test]
    fn forged_and_malformed_statuses_are_refused_by_reason() {
        let mut d = Directory::new(10);
        assert_eq!(
            d.record("gw-2", &online("gw-1", 0), 0),
            Err(Refused::Status(StatusRefusal::IdMismatch))
        );
        assert_eq!(
            d.record("gw+1", &online("gw+1", 0), 0),
            Err(Refused::Status(StatusRefusal::BadId))
        );
        assert_eq!(
            d.record("gw-1", b"{", 0),
            Err(Refused::Status(StatusRefusal::Malformed))
        );
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn the_directory_is_bounded_and_makes_room_from_offline_agents_only() {
        let mut d = Directory::new(2);
        d.record("a", &online("a", 0), 0).unwrap();
        d.record("b", &online("b", 0), 0).unwrap();
        assert_eq!(d.record("c", &online("c", 0), 0), Err(Refused::Full));
        d.record("a", br#"{"agent":"a","online":false}"#, 1)
            .unwrap();
        d.record("c", &online("c", 2), 2).unwrap();
        let ids: Vec<Value> = d.page(0, 10, 2)["agents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["agent"].clone())
            .collect();
        assert_eq!(ids, vec![json!("b"), json!("c")]);
    }

    #[test]
    fn pages_are_in_id_order_with_the_total_and_stale_agents_flagged() {
        let mut d = Directory::new(100);
        for i in 0..25 {
            let id = format!("gw-{i:02}");
            d.record(&id, &online(&id, 10_000), 10_000).unwrap();
        }
        let p = d.page(20, 10, 12_000);
        assert_eq!(p["total"], json!(25));
        assert_eq!(p["agents"].as_array().unwrap().len(), 5);
        assert_eq!(p["agents"][0]["agent"], json!("gw-20"));
        assert_eq!(p["agents"][0]["age_ms"], json!(2_000));
        assert_eq!(p["agents"][0]["stale"], json!(false));
        // Three intervals (1 s each) without news: stale.
        assert_eq!(d.page(0, 1, 13_001)["agents"][0]["stale"], json!(true));
        assert_eq!(d.counts(13_001), (0, 0, 25));
        // A clock far ahead on the agent's side gives age 0, not a negative number.
        d.record("gw-00", &online("gw-00", i64::MAX), 14_000)
            .unwrap();
        assert_eq!(d.page(0, 1, 14_000)["agents"][0]["age_ms"], json!(0));
    }

    #[test]
    fn an_empty_retained_message_forgets_the_agent() {
        let mut d = Directory::new(10);
        d.record("gw-1", &online("gw-1", 0), 0).unwrap();
        assert_eq!(d.record("gw-1", b"", 1), Ok(Recorded::Removed));
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn paging_parameters_are_checked() {
        assert_eq!(paging(None), Ok((0, DEFAULT_LIMIT)));
        assert_eq!(paging(Some("offset=5&limit=2")), Ok((5, 2)));
        assert!(paging(Some("limit=0")).is_err());
        assert!(paging(Some("limit=1000000")).is_err());
        assert!(paging(Some("offset=-1")).is_err());
        assert!(paging(Some("page=2")).is_err());
    }
}
