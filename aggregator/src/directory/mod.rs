//! The owners directory: which aggregator owns which partitions, and at what URL, learned from the
//! retained records every aggregator publishes on `{prefix}/owners/{aggregator}` ([`publish`]).
//!
//! A pure state machine: records go in with the time they arrived, questions are asked at a time
//! passed in. From it come the owner of a partition (for the fleet-wide API), the partitions nobody
//! owns or two claim (`/readyz`, `/api/status`, metrics) and the fleet's summed counters. It does not
//! decide ownership: static ranges and cluster leases do; this only reports what owners say.
//!
//! Freshness is judged by the arrival time on this instance's clock, never by the sender's
//! `updated_ms`, so clock skew between hosts cannot make a live owner look stale or a dead one live.

pub(crate) mod publish;

use edgewatch_models::wire::is_valid_node_id;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Largest owners record accepted, bytes (4,096 partitions listed take about 20 KB).
pub(crate) const MAX_RECORD_BYTES: usize = 64 * 1024;

/// Most aggregators the directory holds; records of further ids are refused, so forged ids
/// cannot grow it without bound.
pub(crate) const MAX_ENTRIES: usize = 1024;

/// One aggregator's owners record, as published (retained) on `{prefix}/owners/{aggregator}`.
/// An offline record (last will, clean stop) carries only `aggregator` and `online: false`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OwnerRecord {
    /// The publishing aggregator's id (must match the topic's last level).
    pub aggregator: String,
    /// Base URL other instances use to reach its HTTP API (`http.advertise`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    /// Partitions it owns, ascending.
    #[serde(default)]
    pub partitions: Vec<u32>,
    /// `static` or `cluster`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Devices it holds state of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<u64>,
    /// Readings covered by the windows it applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readings: Option<u64>,
    /// Anomaly events recorded on its devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anomalies: Option<u64>,
    /// When it was published, on the publisher's clock (informative only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_ms: Option<i64>,
    /// False in the last will and the clean-stop record.
    pub online: bool,
}

impl OwnerRecord {
    /// The record published by an aggregator that stops or vanished (its last will).
    pub fn offline(aggregator: &str) -> Self {
        Self {
            aggregator: aggregator.to_string(),
            http: None,
            partitions: Vec::new(),
            mode: None,
            devices: None,
            readings: None,
            anomalies: None,
            updated_ms: None,
            online: false,
        }
    }

    /// The payload of [`OwnerRecord::offline`]: `{"aggregator":"<id>","online":false}`.
    pub fn offline_payload(aggregator: &str) -> Vec<u8> {
        serde_json::json!({"aggregator": aggregator, "online": false})
            .to_string()
            .into_bytes()
    }
}

/// Why an owners record was refused. The record is ignored; the directory keeps what it had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Not JSON of the record's shape.
    #[error("owners record of {topic:?}: not a valid record: {error}")]
    Malformed {
        /// The id in the topic.
        topic: String,
        /// The decoder's message.
        error: String,
    },
    /// Larger than [`MAX_RECORD_BYTES`].
    #[error("owners record of {topic:?}: {bytes} bytes, more than {MAX_RECORD_BYTES}")]
    TooLarge {
        /// The id in the topic.
        topic: String,
        /// Its size.
        bytes: usize,
    },
    /// The topic's id is not a valid aggregator id.
    #[error("owners topic id {0:?} is not a valid aggregator id ([A-Za-z0-9_-]{{1,64}})")]
    BadId(String),
    /// The body names another aggregator than the topic (a forgery or a misconfigured publisher).
    #[error("owners record on the topic of {topic:?} says it is from {body:?}: refused")]
    IdMismatch {
        /// The id in the topic.
        topic: String,
        /// The id in the body.
        body: String,
    },
    /// An online record with a field out of range.
    #[error("owners record of {topic:?}: {problem}")]
    Invalid {
        /// The id in the topic.
        topic: String,
        /// What is wrong.
        problem: String,
    },
    /// [`MAX_ENTRIES`] aggregators are known already.
    #[error(
        "owners record of {0:?} refused: the directory holds {MAX_ENTRIES} aggregators already"
    )]
    Full(String),
}

/// What accepting a record did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Stored (new or replacing the previous record of that aggregator).
    Stored,
    /// An empty retained payload cleared the aggregator's record: forgotten.
    Removed,
    /// This instance's own record coming back from the broker: ignored (it is set locally).
    Own,
}

/// One aggregator as the directory knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Its latest record.
    pub record: OwnerRecord,
    /// When that record arrived, ms on this instance's clock.
    pub received_ms: i64,
}

/// One aggregator as `/api/status` lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AggregatorView {
    /// Its id.
    pub id: String,
    /// Its advertised URL.
    pub http: Option<String>,
    /// Partitions it claims.
    pub partitions: Vec<u32>,
    /// Online and heard from within the staleness limit.
    pub online: bool,
    /// Since its record arrived, ms.
    pub age_ms: u64,
}

/// Partitions nobody owns and partitions two or more claim, once the start-up grace has passed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Coverage {
    /// Whether the start-up grace period is over (before it, both lists are empty).
    pub settled: bool,
    /// Partitions no live aggregator claims.
    pub uncovered: Vec<u32>,
    /// Partitions two or more live aggregators claim.
    pub overlapping: Vec<u32>,
}

/// The fleet's counters, summed over the live aggregators' records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Devices.
    pub devices: u64,
    /// Readings.
    pub readings: u64,
    /// Anomaly events.
    pub anomalies: u64,
}

/// Timing of the directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// A record older than this is stale: its aggregator counts as gone.
    pub stale_after_ms: u64,
    /// No coverage is reported before this long after start (records are still arriving).
    pub startup_grace_ms: u64,
}

/// The owners directory of one aggregator.
#[derive(Debug)]
pub struct Directory {
    me: String,
    partitions: u32,
    timing: Timing,
    started_ms: i64,
    entries: BTreeMap<String, Entry>,
}

impl Directory {
    /// An empty directory of aggregator `me`, out of `partitions`, started at `now_ms`.
    pub fn new(me: &str, partitions: u32, timing: Timing, now_ms: i64) -> Self {
        Self {
            me: me.to_string(),
            partitions,
            timing,
            started_ms: now_ms,
            entries: BTreeMap::new(),
        }
    }

    /// Takes in the payload published on the owners topic of `topic_id` at `now_ms`.
    pub fn accept(
        &mut self,
        topic_id: &str,
        payload: &[u8],
        now_ms: i64,
    ) -> Result<Accepted, RecordError> {
        if !is_valid_node_id(topic_id) {
            return Err(RecordError::BadId(topic_id.chars().take(80).collect()));
        }
        if payload.is_empty() {
            if topic_id == self.me {
                return Ok(Accepted::Own);
            }
            self.entries.remove(topic_id);
            return Ok(Accepted::Removed);
        }
        if payload.len() > MAX_RECORD_BYTES {
            return Err(RecordError::TooLarge {
                topic: topic_id.to_string(),
                bytes: payload.len(),
            });
        }
        let mut record: OwnerRecord =
            serde_json::from_slice(payload).map_err(|e| RecordError::Malformed {
                topic: topic_id.to_string(),
                error: e.to_string(),
            })?;
        if record.aggregator != topic_id {
            return Err(RecordError::IdMismatch {
                topic: topic_id.to_string(),
                body: record.aggregator.chars().take(80).collect(),
            });
        }
        if topic_id == self.me {
            return Ok(Accepted::Own);
        }
        if record.online {
            self.check(&mut record)
                .map_err(|problem| RecordError::Invalid {
                    topic: topic_id.to_string(),
                    problem,
                })?;
        }
        if !self.entries.contains_key(topic_id) && self.entries.len() >= MAX_ENTRIES {
            return Err(RecordError::Full(topic_id.to_string()));
        }
        self.entries.insert(
            topic_id.to_string(),
            Entry {
                record,
                received_ms: now_ms,
            },
        );
        Ok(Accepted::Stored)
    }

    /// Checks an online record: a valid URL, partitions in range (sorted and deduplicated here),
    /// a known mode.
    fn check(&self, r: &mut OwnerRecord) -> Result<(), String> {
        match r.http.as_deref() {
            None => return Err("online but no http URL".into()),
            Some(url) => {
                crate::config::http_authority(url).map_err(|e| format!("http: {e}"))?;
            }
        }
        if let Some(&p) = r.partitions.iter().find(|&&p| p >= self.partitions) {
            return Err(format!(
                "partitions: {p} is out of range (this deployment has {} partitions)",
                self.partitions
            ));
        }
        r.partitions.sort_unstable();
        r.partitions.dedup();
        match r.mode.as_deref() {
            Some("static" | "cluster") | None => Ok(()),
            Some(other) => Err(format!(
                "mode: expected \"static\" or \"cluster\", got {:?}",
                other.chars().take(40).collect::<String>()
            )),
        }
    }

    /// Sets this instance's own record (never taken from the broker: nobody can forge it here).
    pub fn set_own(&mut self, record: OwnerRecord, now_ms: i64) {
        self.entries.insert(
            self.me.clone(),
            Entry {
                record,
                received_ms: now_ms,
            },
        );
    }

    /// Whether `e` counts at `now_ms`: online and not stale.
    fn is_live(&self, e: &Entry, now_ms: i64) -> bool {
        e.record.online && age(e, now_ms) <= self.timing.stale_after_ms
    }

    /// The live aggregators, by id.
    pub fn live(&self, now_ms: i64) -> impl Iterator<Item = &Entry> {
        self.entries
            .values()
            .filter(move |e| self.is_live(e, now_ms))
    }

    /// The live aggregator answering for `partition`: of those claiming it, the smallest id, so
    /// every instance picks the same one while two claim it.
    pub fn owner_of(&self, partition: u32, now_ms: i64) -> Option<&Entry> {
        self.live(now_ms)
            .find(|e| e.record.partitions.binary_search(&partition).is_ok())
    }

    /// Partitions nobody owns and partitions claimed twice, at `now_ms`.
    pub fn coverage(&self, now_ms: i64) -> Coverage {
        let settled = now_ms.saturating_sub(self.started_ms) >= self.timing.startup_grace_ms as i64;
        if !settled {
            return Coverage::default();
        }
        let owned: Vec<(&str, std::collections::BTreeSet<u32>)> = self
            .live(now_ms)
            .map(|e| {
                (
                    e.record.aggregator.as_str(),
                    e.record.partitions.iter().copied().collect(),
                )
            })
            .collect();
        let c =
            crate::ownership::Coverage::of(self.partitions, owned.iter().map(|(id, p)| (*id, p)));
        Coverage {
            settled,
            uncovered: c.uncovered,
            overlapping: c.overlapping.into_iter().map(|(p, _)| p).collect(),
        }
    }

    /// Every known aggregator, live or not, by id.
    pub fn aggregators(&self, now_ms: i64) -> Vec<AggregatorView> {
        self.entries
            .values()
            .map(|e| AggregatorView {
                id: e.record.aggregator.clone(),
                http: e.record.http.clone(),
                partitions: e.record.partitions.clone(),
                online: self.is_live(e, now_ms),
                age_ms: age(e, now_ms),
            })
            .collect()
    }

    /// The live aggregators' counters, summed (saturating).
    pub fn totals(&self, now_ms: i64) -> Totals {
        self.live(now_ms).fold(Totals::default(), |t, e| Totals {
            devices: t.devices.saturating_add(e.record.devices.unwrap_or(0)),
            readings: t.readings.saturating_add(e.record.readings.unwrap_or(0)),
            anomalies: t.anomalies.saturating_add(e.record.anomalies.unwrap_or(0)),
        })
    }
}

/// Since `e` arrived, ms (0 for a clock that went back).
fn age(e: &Entry, now_ms: i64) -> u64 {
    u64::try_from(now_ms.saturating_sub(e.received_ms)).unwrap_or(0)
}

/// Compresses ascending partitions into ranges for messages: `0-3, 7, 9-10`.
pub(crate) use crate::ownership::ranges;

#[cfg(test)]
mod tests {
    use super::*;

    const TIMING: Timing = Timing {
        stale_after_ms: 15_000,
        startup_grace_ms: 10_000,
    };

    fn record(id: &str, parts: std::ops::Range<u32>) -> Vec<u8> {
        serde_json::to_vec(&OwnerRecord {
            aggregator: id.into(),
            http: Some(format!("http://127.0.0.1:80{}", id.len())),
            partitions: parts.collect(),
            mode: Some("static".into()),
            devices: Some(3),
            readings: Some(100),
            anomalies: Some(2),
            updated_ms: Some(0),
            online: true,
        })
        .unwrap()
    }

    fn own(parts: std::ops::Range<u32>) -> OwnerRecord {
        serde_json::from_slice(&record("me", parts)).unwrap()
    }

    #[test]
    fn complementary_ranges_cover_everything_once_settled() {
        let mut d = Directory::new("me", 8, TIMING, 0);
        d.set_own(own(0..4), 0);
        assert_eq!(
            d.accept("other", &record("other", 4..8), 0),
            Ok(Accepted::Stored)
        );
        assert!(!d.coverage(5_000).settled, "in the grace period");
        assert!(d.coverage(5_000).uncovered.is_empty());
        d.set_own(own(0..4), 10_000);
        assert_eq!(
            d.accept("other", &record("other", 4..8), 10_000),
            Ok(Accepted::Stored)
        );
        let c = d.coverage(10_000);
        assert!(c.settled);
        assert!(c.uncovered.is_empty() && c.overlapping.is_empty(), "{c:?}");
        assert_eq!(d.owner_of(5, 10_000).unwrap().record.aggregator, "other");
        assert_eq!(d.owner_of(1, 10_000).unwrap().record.aggregator, "me");
        assert_eq!(
            d.totals(10_000),
            Totals {
                devices: 6,
                readings: 200,
                anomalies: 4
            }
        );
    }

    #[test]
    fn an_offline_or_stale_owner_leaves_its_partitions_uncovered() {
        let mut d = Directory::new("me", 8, TIMING, 0);
        d.set_own(own(0..4), 20_000);
        d.accept("other", &record("other", 4..8), 10_000).unwrap();
        assert!(d.coverage(20_000).uncovered.is_empty());
        // Silent for longer than stale_after_ms.
        d.set_own(own(0..4), 25_001);
        assert_eq!(d.coverage(25_001).uncovered, vec![4, 5, 6, 7]);
        assert!(d.owner_of(5, 25_001).is_none());
        // Back, then its last will.
        d.accept("other", &record("other", 4..8), 25_001).unwrap();
        assert!(d.coverage(25_001).uncovered.is_empty());
        let will = OwnerRecord::offline_payload("other");
        assert_eq!(
            String::from_utf8(will.clone()).unwrap(),
            r#"{"aggregator":"other","online":false}"#
        );
        d.accept("other", &will, 25_002).unwrap();
        assert_eq!(d.coverage(25_002).uncovered, vec![4, 5, 6, 7]);
        let views = d.aggregators(25_002);
        assert_eq!(views.len(), 2);
        assert!(!views.iter().find(|v| v.id == "other").unwrap().online);
    }

    #[test]
    fn overlaps_are_reported_and_the_smallest_id_answers() {
        let mut d = Directory::new("me", 4, TIMING, 0);
        d.set_own(own(0..3), 10_000);
        d.accept("b", &record("b", 2..4), 10_000).unwrap();
        d.accept("a", &record("a", 2..3), 10_000).unwrap();
        let c = d.coverage(10_000);
        assert_eq!(c.overlapping, vec![2]);
        assert!(c.uncovered.is_empty());
        assert_eq!(d.owner_of(2, 10_000).unwrap().record.aggregator, "a");
        assert_eq!(d.owner_of(3, 10_000).unwrap().record.aggregator, "b");
    }

    #[test]
    fn forged_and_malformed_records_are_refused_and_change_nothing() {
        let mut d = Directory::new("me", 8, TIMING, 0);
        d.accept("x", &record("x", 0..2), 0).unwrap();
        let before = d.aggregators(0);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("x", b"not json".to_vec()),
            ("x", b"{\"aggregator\":\"x\"}".to_vec()),
            ("x", record("y", 0..2)),
            ("x", record("x", 0..9)),
            ("x", vec![b' '; MAX_RECORD_BYTES + 1]),
            ("bad id!", record("bad id!", 0..1)),
            (
                "x",
                br#"{"aggregator":"x","online":true,"http":"ftp://h:1","partitions":[1]}"#.to_vec(),
            ),
            (
                "x",
                br#"{"aggregator":"x","online":true,"http":"http://h:1","mode":"chaos"}"#.to_vec(),
            ),
            (
                "x",
                br#"{"aggregator":"x","online":true,"partitions":[1]}"#.to_vec(),
            ),
            (
                "x",
                br#"{"aggregator":"x","online":true,"http":"http://h:1","partitions":[18446744073709551615]}"#.to_vec(),
            ),
        ];
        for (topic, payload) in cases {
            let r = d.accept(topic, &payload, 1);
            assert!(
                r.is_err(),
                "{topic} {:?} accepted",
                String::from_utf8_lossy(&payload)
            );
        }
        assert_eq!(d.aggregators(0), before);
        // Someone else speaking for this instance changes nothing either.
        assert_eq!(d.accept("me", &record("me", 0..8), 1), Ok(Accepted::Own));
        assert!(d.aggregators(1).iter().all(|v| v.id != "me"));
    }

    #[test]
    fn the_directory_is_bounded_and_an_empty_payload_forgets() {
        let mut d = Directory::new("me", 2, TIMING, 0);
        for i in 0..MAX_ENTRIES {
            let id = format!("a{i}");
            d.accept(&id, &record(&id, 0..1), 0).unwrap();
        }
        assert!(matches!(
            d.accept("one-more", &record("one-more", 0..1), 0),
            Err(RecordError::Full(_))
        ));
        assert_eq!(d.accept("a0", b"", 0), Ok(Accepted::Removed));
        assert_eq!(
            d.accept("one-more", &record("one-more", 0..1), 0),
            Ok(Accepted::Stored)
        );
    }

    #[test]
    fn ranges_read_well() {
        assert_eq!(ranges(&[0, 1, 2, 3, 7, 9, 10]), "0-3, 7, 9-10");
        assert_eq!(ranges(&[]), "");
    }
}
