//! Wire types shared by agent and aggregator, defined once: uplink topics and their JSON payloads.
//!
//! Device ids never appear in topic names (they may hold any UTF-8), only agent ids and partition
//! numbers do. Every payload is JSON so any MQTT tool can read it.

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

/// Default uplink topic prefix.
pub const DEFAULT_PREFIX: &str = "edgewatch/v1";
/// The agent segment of model topics meant for every gateway (`{prefix}/models/all/{key}`); no
/// agent may be called `all`.
pub const ALL_AGENTS: &str = "all";

/// The lane epoch of senders and stores from before epochs existed (and of an agent whose durable
/// outbox predates them: it keeps epoch 0 so an upgrade does not reset its lanes). Every newer lane
/// has a random non-zero epoch.
pub const LEGACY_EPOCH: u64 = 0;

/// Readings per millisecond of window length above which a summary's `count` is implausible (a
/// million readings per second of one series): refused by owners as forged or corrupt.
pub const MAX_READINGS_PER_MS: u64 = 1_000;

/// Summary of one (device, metric) event-time window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowSummary {
    /// Device id (any UTF-8).
    pub device: String,
    /// Metric name.
    pub metric: String,
    /// Window start, inclusive, ms since the Unix epoch.
    pub start_ms: i64,
    /// Window end, exclusive, ms since the Unix epoch.
    pub end_ms: i64,
    /// Number of readings in the window.
    pub count: u64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Mean value.
    pub mean: f64,
    /// Population standard deviation.
    pub std: f64,
    /// Timestamp of the earliest reading, ms.
    pub first_ts_ms: i64,
    /// Timestamp of the latest reading, ms.
    pub last_ts_ms: i64,
    /// Highest anomaly score of any reading in the window, in [0, 1].
    pub max_score: f64,
    /// 0 for the first emission; a late correction of the same window carries a higher revision.
    #[serde(default)]
    pub revision: u32,
}

/// An anomaly detected on one reading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnomalyEvent {
    /// Deterministic id: see [`event_id`]. A replayed event has the same id.
    pub id: String,
    /// Device id.
    pub device: String,
    /// Metric name.
    pub metric: String,
    /// Reading timestamp, ms since the Unix epoch.
    pub ts_ms: i64,
    /// The reading's value.
    pub value: f64,
    /// Anomaly score in [0, 1].
    pub score: f64,
    /// Name of the detector that raised it.
    pub detector: String,
    /// Start of the window the reading belongs to, ms.
    pub window_start_ms: i64,
    /// Id of the agent that detected it.
    pub agent: String,
    /// Onset (the default, not written) or recovery: detectors that track a state, such as
    /// `silence`, report both ends of an episode.
    #[serde(default, skip_serializing_if = "EventPhase::is_onset")]
    pub phase: EventPhase,
    /// Version of the trained model that scored it (multivariate detectors); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<u64>,
}

/// What an [`AnomalyEvent`] marks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventPhase {
    /// An anomaly starts (one event per episode).
    #[default]
    Onset,
    /// The anomaly has ended (for example a silent series reporting again).
    Recovery,
}

impl EventPhase {
    /// Whether this is the default kind (which is not written on the wire).
    pub fn is_onset(&self) -> bool {
        *self == EventPhase::Onset
    }
}

/// A record in a lane (agent, partition): a payload with its lane sequence number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sequenced<T> {
    /// Monotonically increasing per lane, starting at 1.
    pub seq: u64,
    /// The seq of the record before this one that the sender still holds (or its lane's acked seq):
    /// seqs between `prev` and `seq` were merged into other records or evicted and will never come.
    /// Absent means `seq - 1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev: Option<u64>,
    /// The payload.
    #[serde(flatten)]
    pub item: T,
}

/// What an agent publishes on a summaries or anomalies topic: records of one lane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch<T> {
    /// Sending agent.
    pub agent: String,
    /// Partition of every record's device.
    pub partition: u32,
    /// Records in seq order.
    pub records: Vec<Sequenced<T>>,
    /// The lane's acknowledged seq when sent: an owner seeing the lane for the first time (a new or
    /// wiped store) need not wait for anything at or below it — those records are gone from the sender.
    #[serde(default)]
    pub acked: u64,
    /// The lane's epoch: a lane is (agent, partition, epoch), and its seqs count from 1 within its
    /// epoch. An agent keeps its epoch as long as its outbox lives (forever with `state.dir`, one run
    /// without), so an outbox that restarts from seq 1 is a new lane, never a replay of the old one.
    /// Absent (and not written) for [`LEGACY_EPOCH`].
    #[serde(default, skip_serializing_if = "is_legacy_epoch")]
    pub epoch: u64,
}

fn is_legacy_epoch(epoch: &u64) -> bool {
    *epoch == LEGACY_EPOCH
}

impl<T> Sequenced<T> {
    /// The seq an owner must have applied before this record makes the lane contiguous.
    pub fn prev_seq(&self) -> u64 {
        self.prev.unwrap_or(self.seq.saturating_sub(1))
    }
}

impl WindowSummary {
    /// Whether this summary can describe a real window; `Err` names the first field that cannot
    /// (and its value). Owners refuse such records: no agent makes them, so they are corrupt or
    /// forged. The rules: `end_ms > start_ms`; `0 < count <= (end_ms - start_ms) *`
    /// [`MAX_READINGS_PER_MS`]; every number finite; `min <= max`; `mean` within `[min, max]` (up to
    /// rounding); `std >= 0`; `max_score` in `[0, 1]`; `start_ms <= first_ts_ms <= last_ts_ms < end_ms`.
    pub fn check(&self) -> Result<(), String> {
        if self.end_ms <= self.start_ms {
            return Err(format!(
                "end_ms must be > start_ms ({}), got {}",
                self.start_ms, self.end_ms
            ));
        }
        if self.count == 0 {
            return Err("count must be > 0, got 0".into());
        }
        let span = (i128::from(self.end_ms) - i128::from(self.start_ms)) as u128;
        let most = span.saturating_mul(u128::from(MAX_READINGS_PER_MS));
        if u128::from(self.count) > most {
            return Err(format!(
                "count {} is implausible for a {span} ms window (at most {most})",
                self.count
            ));
        }
        for (field, v) in [
            ("min", self.min),
            ("max", self.max),
            ("mean", self.mean),
            ("std", self.std),
            ("max_score", self.max_score),
        ] {
            if !v.is_finite() {
                return Err(format!("{field} must be finite, got {v}"));
            }
        }
        if self.min > self.max {
            return Err(format!("min ({}) must be <= max ({})", self.min, self.max));
        }
        // Welford's mean may stray from [min, max] by rounding, never by more than this.
        let slack = self.min.abs().max(self.max.abs()) * 1e-9;
        if self.mean < self.min - slack || self.mean > self.max + slack {
            return Err(format!(
                "mean ({}) must be within [min, max] = [{}, {}]",
                self.mean, self.min, self.max
            ));
        }
        if self.std < 0.0 {
            return Err(format!("std must be >= 0, got {}", self.std));
        }
        if !(0.0..=1.0).contains(&self.max_score) {
            return Err(format!(
                "max_score must be in [0, 1], got {}",
                self.max_score
            ));
        }
        if self.first_ts_ms < self.start_ms
            || self.last_ts_ms >= self.end_ms
            || self.first_ts_ms > self.last_ts_ms
        {
            return Err(format!(
                "first_ts_ms ({}) and last_ts_ms ({}) must be ordered within the window [{}, {})",
                self.first_ts_ms, self.last_ts_ms, self.start_ms, self.end_ms
            ));
        }
        Ok(())
    }
}

impl AnomalyEvent {
    /// Whether this event can be real; `Err` names the field that cannot: `value` must be finite and
    /// `score` in `[0, 1]`.
    pub fn check(&self) -> Result<(), String> {
        if !self.value.is_finite() {
            return Err(format!("value must be finite, got {}", self.value));
        }
        if !(0.0..=1.0).contains(&self.score) {
            return Err(format!("score must be in [0, 1], got {}", self.score));
        }
        Ok(())
    }
}

/// Cumulative acknowledgement of one lane: everything up to and including `upto_seq` is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Partition (lane) being acknowledged.
    pub partition: u32,
    /// Highest seq applied and durable.
    pub upto_seq: u64,
    /// Epoch of the lane acknowledged (see [`Batch::epoch`]): an agent ignores acks for any epoch
    /// but its own. Absent (and not written) for [`LEGACY_EPOCH`].
    #[serde(default, skip_serializing_if = "is_legacy_epoch")]
    pub epoch: u64,
    /// Which of the partition's lanes: absent for the main one (summaries and events),
    /// `"training"` for training samples.
    #[serde(default, skip_serializing_if = "LaneKind::is_main")]
    pub lane: LaneKind,
}

/// An agent has two lanes per partition: the main one (window summaries and anomaly events, which
/// share one seq chain) and the training one (sampled vectors for the aggregator's device models),
/// so a backlog of samples never delays a summary and losing samples never leaves a hole in it.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum LaneKind {
    /// Summaries and anomaly events.
    #[default]
    Main,
    /// Training samples ([`TrainingSample`]).
    Training,
}

impl LaneKind {
    /// Whether this is the main lane (the default, not written in acks).
    pub fn is_main(&self) -> bool {
        *self == LaneKind::Main
    }

    /// The bit a training lane sets in an agent's local lane id ([`lane_id`]); partitions stay below it.
    pub const TRAINING_BIT: u32 = 1 << 31;
}

/// An agent's local id of a lane, as its outbox keys it: the partition, with
/// [`LaneKind::TRAINING_BIT`] set for the training lane. `None` for a partition at or above the bit
/// (no configuration allows that many).
pub fn lane_id(partition: u32, kind: LaneKind) -> Option<u32> {
    if partition >= LaneKind::TRAINING_BIT {
        return None;
    }
    Some(match kind {
        LaneKind::Main => partition,
        LaneKind::Training => partition | LaneKind::TRAINING_BIT,
    })
}

/// The partition and kind of a local lane id (see [`lane_id`]).
pub fn split_lane(id: u32) -> (u32, LaneKind) {
    if id & LaneKind::TRAINING_BIT != 0 {
        (id & !LaneKind::TRAINING_BIT, LaneKind::Training)
    } else {
        (id, LaneKind::Main)
    }
}

/// Most features a training sample (and so a trained device model) may have.
pub const MAX_TRAINING_FEATURES: usize = 64;

/// Most rows in one training sample.
pub const MAX_TRAINING_ROWS: usize = 4096;

/// A bounded random sample (reservoir) of one device's aligned vectors over one training period,
/// sent by the agent in its training lane for the aggregator to fit the device's model on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingSample {
    /// The device.
    pub device: String,
    /// Metric names, in the order of every row's values (sorted).
    pub features: Vec<String>,
    /// Event time of the period: `[from_ms, to_ms)`.
    pub from_ms: i64,
    /// End of the period (exclusive).
    pub to_ms: i64,
    /// Vectors aligned in the period (the rows are a uniform sample of them).
    pub seen: u64,
    /// Anomaly events raised on the device in the period (any detector): the aggregator leaves a
    /// sample with events out of training.
    #[serde(default)]
    pub anomalies: u32,
    /// The sampled vectors.
    pub rows: Vec<Vec<f64>>,
}

impl TrainingSample {
    /// Whether this sample can be real; `Err` names the first field that cannot: 1 to
    /// [`MAX_TRAINING_FEATURES`] distinct non-empty features, `from_ms < to_ms`, 1 to
    /// [`MAX_TRAINING_ROWS`] rows, no more than `seen`, each as long as `features`, all finite and
    /// within [`crate::stats::MAX_ABS_VALUE`] (what the agent admits as a reading).
    pub fn check(&self) -> Result<(), String> {
        if self.device.is_empty() {
            return Err("device must not be empty".into());
        }
        let n = self.features.len();
        if n == 0 || n > MAX_TRAINING_FEATURES {
            return Err(format!(
                "features must hold 1 to {MAX_TRAINING_FEATURES} names, got {n}"
            ));
        }
        for (i, f) in self.features.iter().enumerate() {
            if f.is_empty() {
                return Err(format!("features[{i}] must not be empty"));
            }
            if self.features[..i].contains(f) {
                return Err(format!("features[{i}] ({f:?}) appears twice"));
            }
        }
        if self.from_ms >= self.to_ms {
            return Err(format!(
                "to_ms must be > from_ms ({}), got {}",
                self.from_ms, self.to_ms
            ));
        }
        let rows = self.rows.len();
        if rows == 0 || rows > MAX_TRAINING_ROWS {
            return Err(format!(
                "rows must hold 1 to {MAX_TRAINING_ROWS} vectors, got {rows}"
            ));
        }
        if rows as u64 > self.seen {
            return Err(format!(
                "seen ({}) must be >= the number of rows ({rows})",
                self.seen
            ));
        }
        for (i, row) in self.rows.iter().enumerate() {
            if row.len() != n {
                return Err(format!(
                    "rows[{i}] has {} values, features has {n}",
                    row.len()
                ));
            }
            if let Some(j) = row.iter().position(|v| !crate::stats::in_range(*v)) {
                return Err(format!(
                    "rows[{i}][{j}] must be finite and at most {:e} in magnitude (as readings are), got {}",
                    crate::stats::MAX_ABS_VALUE,
                    row[j]
                ));
            }
        }
        Ok(())
    }
}

/// Acks published by a partition owner to `{prefix}/acks/{agent}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AckBatch {
    /// Id of the acknowledging aggregator.
    pub owner: String,
    /// One entry per acknowledged lane.
    pub acks: Vec<Ack>,
}

/// The id of an event of `phase`: [`event_id`] for an onset; for a recovery, the same hash over
/// `detector` followed by `/recovery`, so an episode's two ends never share an id.
pub fn phase_event_id(
    device: &str,
    metric: &str,
    ts_ms: i64,
    detector: &str,
    phase: EventPhase,
) -> String {
    match phase {
        EventPhase::Onset => event_id(device, metric, ts_ms, detector),
        EventPhase::Recovery => event_id(device, metric, ts_ms, &format!("{detector}/recovery")),
    }
}

/// The deterministic anomaly event id: XXH3-64 of (device, metric, reading timestamp, detector), hex.
pub fn event_id(device: &str, metric: &str, ts_ms: i64, detector: &str) -> String {
    let mut h = Xxh3::new();
    // Length prefixes keep ("ab","c") and ("a","bc") apart.
    for part in [device.as_bytes(), metric.as_bytes(), detector.as_bytes()] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.update(&ts_ms.to_le_bytes());
    format!("{:016x}", h.digest())
}

/// Which uplink topic a message arrived on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UplinkTopic<'a> {
    /// `{prefix}/summaries/{partition}/{agent}`
    Summaries {
        /// Partition number.
        partition: u32,
        /// Agent id.
        agent: &'a str,
    },
    /// `{prefix}/anomalies/{partition}/{agent}`
    Anomalies {
        /// Partition number.
        partition: u32,
        /// Agent id.
        agent: &'a str,
    },
    /// `{prefix}/samples/{partition}/{agent}`: a training lane.
    Samples {
        /// Partition number.
        partition: u32,
        /// Agent id.
        agent: &'a str,
    },
    /// `{prefix}/acks/{agent}`
    Acks {
        /// Agent id.
        agent: &'a str,
    },
}

/// Builds and parses uplink topic names under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    /// Topics under `prefix` (trailing `/` removed).
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    /// The prefix in use.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Topic for a batch of summaries of one lane.
    pub fn summaries(&self, partition: u32, agent: &str) -> String {
        format!("{}/summaries/{partition}/{agent}", self.prefix)
    }

    /// Topic for anomaly events of one lane.
    pub fn anomalies(&self, partition: u32, agent: &str) -> String {
        format!("{}/anomalies/{partition}/{agent}", self.prefix)
    }

    /// Topic for training samples of one lane (see [`LaneKind::Training`]):
    /// `{prefix}/samples/{partition}/{agent}`.
    pub fn samples(&self, partition: u32, agent: &str) -> String {
        format!("{}/samples/{partition}/{agent}", self.prefix)
    }

    /// Filter for every agent's training samples of one partition.
    pub fn samples_filter(&self, partition: u32) -> String {
        format!("{}/samples/{partition}/+", self.prefix)
    }

    /// Filter for every agent's training samples of every partition.
    pub fn all_samples_filter(&self) -> String {
        format!("{}/samples/+/+", self.prefix)
    }

    /// Topic where owners acknowledge an agent's lanes.
    pub fn acks(&self, agent: &str) -> String {
        format!("{}/acks/{agent}", self.prefix)
    }

    /// Filter for every agent's summaries of one partition.
    pub fn summaries_filter(&self, partition: u32) -> String {
        format!("{}/summaries/{partition}/+", self.prefix)
    }

    /// Filter for every agent's summaries of every partition: what an owner of all partitions
    /// subscribes to (one subscription instead of one per partition).
    pub fn all_summaries_filter(&self) -> String {
        format!("{}/summaries/+/+", self.prefix)
    }

    /// Filter for all anomaly events of the fleet.
    pub fn anomalies_filter(&self) -> String {
        format!("{}/anomalies/+/+", self.prefix)
    }

    /// Topic a multivariate model is published on (retained): `{prefix}/models/{agent}/{key}`, with
    /// `key` from [`model_key`] (never a device id in clear) and `agent` the gateway that runs the
    /// device, or [`ALL_AGENTS`] for every gateway. Broker ACLs let an agent read only
    /// `models/{its id}/#` and `models/all/#` (see `configs/security/`).
    pub fn models(&self, agent: &str, key: &str) -> String {
        format!("{}/models/{agent}/{key}", self.prefix)
    }

    /// The filters an agent subscribes to on its uplink broker: its own models and the fleet's.
    pub fn models_filters(&self, agent: &str) -> [String; 2] {
        [
            format!("{}/models/{agent}/#", self.prefix),
            format!("{}/models/{ALL_AGENTS}/#", self.prefix),
        ]
    }

    /// The key of a models topic (`{prefix}/models/{agent}/{key}`); `None` for any other topic.
    pub fn models_key<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let rest = topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix("/models/")?;
        let (agent, key) = rest.split_once('/')?;
        (!agent.is_empty() && !key.is_empty() && !key.contains('/')).then_some(key)
    }

    /// Topic of an agent's retained status (see [`crate::agent_status`]): `{prefix}/status/{agent}`.
    /// The agent's MQTT last will is an offline status on the same topic.
    pub fn status(&self, agent: &str) -> String {
        format!("{}/status/{agent}", self.prefix)
    }

    /// Filter for every agent's status: what aggregators subscribe to.
    pub fn status_filter(&self) -> String {
        format!("{}/status/+", self.prefix)
    }

    /// The agent id of a status topic (`{prefix}/status/{agent}`); `None` for any other topic. The id
    /// is returned as it appears: callers check it with [`is_valid_node_id`].
    pub fn status_agent<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let agent = topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix("/status/")?;
        (!agent.is_empty() && !agent.contains('/')).then_some(agent)
    }

    /// Topic of the configuration pushed to one agent (retained YAML): `{prefix}/config/{agent}`.
    pub fn config(&self, agent: &str) -> String {
        format!("{}/config/{agent}", self.prefix)
    }

    /// Parses an uplink topic; `None` when it is not one of ours.
    pub fn parse<'t>(&self, topic: &'t str) -> Option<UplinkTopic<'t>> {
        let rest = topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('/')?;
        let mut parts = rest.split('/');
        let kind = parts.next()?;
        let result = match kind {
            "summaries" | "anomalies" | "samples" => {
                let partition = parts.next()?.parse().ok()?;
                let agent = parts.next()?;
                if agent.is_empty() {
                    return None;
                }
                match kind {
                    "summaries" => UplinkTopic::Summaries { partition, agent },
                    "anomalies" => UplinkTopic::Anomalies { partition, agent },
                    _ => UplinkTopic::Samples { partition, agent },
                }
            }
            "acks" => UplinkTopic::Acks {
                agent: parts.next().filter(|a| !a.is_empty())?,
            },
            _ => return None,
        };
        parts.next().is_none().then_some(result)
    }
}

/// The key of a device's multivariate model in topic names and file names: `pca-` and the
/// XXH3-64 (seed 0, as [`crate::partition::partition_of`]) of the device id as 16 lowercase hex
/// digits, so device ids stay out of topic names. The model's own `key` field names the device.
pub fn model_key(device: &str) -> String {
    format!("pca-{:016x}", xxhash_rust::xxh3::xxh3_64(device.as_bytes()))
}

/// Whether `id` is a valid agent or aggregator id: `[A-Za-z0-9_-]{1,64}` (ids appear in topic names).
pub fn is_valid_node_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_config_topics_name_one_agent() {
        let t = Topics::new("edgewatch/v1");
        assert_eq!(t.status("gw-1"), "edgewatch/v1/status/gw-1");
        assert_eq!(t.status_filter(), "edgewatch/v1/status/+");
        assert_eq!(t.config("gw-1"), "edgewatch/v1/config/gw-1");
        assert_eq!(t.status_agent("edgewatch/v1/status/gw-1"), Some("gw-1"));
        assert_eq!(t.status_agent("edgewatch/v1/status/"), None);
        assert_eq!(t.status_agent("edgewatch/v1/status/a/b"), None);
        assert_eq!(t.status_agent("other/v1/status/gw-1"), None);
        assert_eq!(t.status_agent("edgewatch/v1/config/gw-1"), None);
    }

    #[test]
    fn topics_round_trip() {
        let t = Topics::new("edgewatch/v1/");
        let s = t.summaries(7, "gw-1");
        assert_eq!(s, "edgewatch/v1/summaries/7/gw-1");
        assert_eq!(
            t.parse(&s),
            Some(UplinkTopic::Summaries {
                partition: 7,
                agent: "gw-1"
            })
        );
        assert_eq!(
            t.parse(&t.anomalies(3, "a")),
            Some(UplinkTopic::Anomalies {
                partition: 3,
                agent: "a"
            })
        );
        assert_eq!(
            t.parse(&t.acks("a")),
            Some(UplinkTopic::Acks { agent: "a" })
        );
        assert_eq!(t.summaries_filter(7), "edgewatch/v1/summaries/7/+");
        assert_eq!(t.all_summaries_filter(), "edgewatch/v1/summaries/+/+");
    }

    #[test]
    fn model_topics_hide_the_device_and_round_trip_their_key() {
        let t = Topics::new("edgewatch/v1/");
        let key = model_key("pump-7");
        assert_eq!(key.len(), 4 + 16);
        assert!(key.starts_with("pca-") && !key.contains("pump"));
        assert_eq!(key, model_key("pump-7"));
        assert_ne!(key, model_key("pump-8"));
        let topic = t.models("gw-1", &key);
        assert_eq!(topic, format!("edgewatch/v1/models/gw-1/{key}"));
        assert_eq!(t.models_key(&topic), Some(key.as_str()));
        let fleet = t.models(ALL_AGENTS, &key);
        assert_eq!(fleet, format!("edgewatch/v1/models/all/{key}"));
        assert_eq!(t.models_key(&fleet), Some(key.as_str()));
        assert_eq!(
            t.models_filters("gw-1"),
            ["edgewatch/v1/models/gw-1/#", "edgewatch/v1/models/all/#"]
        );
        for other in [
            "edgewatch/v1/models/",
            "edgewatch/v1/models/a",
            "edgewatch/v1/models/a/",
            "edgewatch/v1/models//k",
            "edgewatch/v1/models/a/b/c",
            "edgewatch/v1/acks/a",
            "edgewatch/v2/models/a",
            "edgewatch/v1/modelsx",
        ] {
            assert_eq!(t.models_key(other), None, "{other}");
        }
    }

    #[test]
    fn foreign_topics_do_not_parse() {
        let t = Topics::new("edgewatch/v1");
        for bad in [
            "edgewatch/v1/summaries/x/a",
            "edgewatch/v1/summaries/1/",
            "edgewatch/v1/summaries/1/a/b",
            "edgewatch/v2/summaries/1/a",
            "edgewatch/v1/other/1/a",
            "edgewatch/v1",
        ] {
            assert_eq!(t.parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn event_id_is_deterministic_and_separates_fields() {
        let a = event_id("d", "m", 5, "zscore");
        assert_eq!(a, event_id("d", "m", 5, "zscore"));
        assert_eq!(a.len(), 16);
        assert_ne!(a, event_id("d", "m", 6, "zscore"));
        assert_ne!(event_id("ab", "c", 1, "z"), event_id("a", "bc", 1, "z"));
    }

    #[test]
    fn node_ids_are_checked() {
        assert!(is_valid_node_id("agg-1_A"));
        assert!(!is_valid_node_id(""));
        assert!(!is_valid_node_id("a.b"));
        assert!(!is_valid_node_id("a b"));
        assert!(!is_valid_node_id(&"x".repeat(65)));
    }

    #[test]
    fn batches_serialize_with_flat_records() {
        let b = Batch {
            agent: "a".into(),
            partition: 1,
            records: vec![
                Sequenced {
                    seq: 1,
                    prev: None,
                    item: Ack {
                        partition: 1,
                        upto_seq: 2,
                        epoch: 0,
                        lane: Default::default(),
                    },
                },
                Sequenced {
                    seq: 5,
                    prev: Some(1),
                    item: Ack {
                        partition: 1,
                        upto_seq: 3,
                        epoch: 0,
                        lane: Default::default(),
                    },
                },
            ],
            acked: 0,
            epoch: 0,
        };
        let json = serde_json::to_string(&b).unwrap();
        assert!(
            json.contains(r#""records":[{"seq":1,"partition":1,"upto_seq":2},{"seq":5,"prev":1,"#),
            "{json}"
        );
        let back: Batch<Ack> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, b);
        assert_eq!(back.records[0].prev_seq(), 0);
        assert_eq!(back.records[1].prev_seq(), 1);
        // Senders without the newer fields are still understood.
        let old: Batch<Ack> = serde_json::from_str(
            r#"{"agent":"a","partition":1,"records":[{"seq":3,"partition":1,"upto_seq":2}]}"#,
        )
        .unwrap();
        assert_eq!((old.acked, old.records[0].prev_seq()), (0, 2));
        assert_eq!(old.epoch, LEGACY_EPOCH);
    }

    #[test]
    fn epochs_travel_in_batches_and_acks_and_legacy_ones_are_not_written() {
        let b: Batch<WindowSummary> = Batch {
            agent: "a".into(),
            partition: 3,
            records: Vec::new(),
            acked: 7,
            epoch: 0xfeed,
        };
        let json = serde_json::to_string(&b).unwrap();
        assert!(json.contains(r#""epoch":65261"#), "{json}");
        assert_eq!(
            serde_json::from_str::<Batch<WindowSummary>>(&json).unwrap(),
            b
        );
        let acks = AckBatch {
            owner: "o".into(),
            acks: vec![
                Ack {
                    partition: 3,
                    upto_seq: 9,
                    epoch: 0xfeed,
                    lane: Default::default(),
                },
                Ack {
                    partition: 4,
                    upto_seq: 1,
                    epoch: LEGACY_EPOCH,
                    lane: Default::default(),
                },
            ],
        };
        let json = serde_json::to_string(&acks).unwrap();
        assert_eq!(
            json,
            r#"{"owner":"o","acks":[{"partition":3,"upto_seq":9,"epoch":65261},{"partition":4,"upto_seq":1}]}"#
        );
        assert_eq!(serde_json::from_str::<AckBatch>(&json).unwrap(), acks);
    }

    fn window() -> WindowSummary {
        WindowSummary {
            device: "d".into(),
            metric: "m".into(),
            start_ms: 10_000,
            end_ms: 20_000,
            count: 3,
            min: 1.0,
            max: 4.0,
            mean: 7.0 / 3.0,
            std: 1.25,
            first_ts_ms: 10_000,
            last_ts_ms: 19_999,
            max_score: 0.5,
            revision: 0,
        }
    }

    #[test]
    fn summaries_that_cannot_describe_a_window_are_named() {
        assert_eq!(window().check(), Ok(()));
        type Spoil = fn(&mut WindowSummary);
        let bad: Vec<(Spoil, &str)> = vec![
            (|w| w.count = 0, "count must be > 0"),
            (
                |w| w.count = u64::MAX,
                "count 18446744073709551615 is implausible",
            ),
            (|w| w.end_ms = w.start_ms, "end_ms must be > start_ms"),
            (|w| w.mean = f64::NAN, "mean must be finite"),
            (|w| w.std = f64::INFINITY, "std must be finite"),
            (|w| w.min = 5.0, "min (5) must be <= max (4)"),
            (|w| w.mean = 4.5, "mean (4.5) must be within"),
            (|w| w.std = -0.5, "std must be >= 0"),
            (|w| w.max_score = 1.5, "max_score must be in [0, 1]"),
            (|w| w.first_ts_ms = 9_999, "first_ts_ms (9999)"),
            (
                |w| w.last_ts_ms = 20_000,
                "must be ordered within the window",
            ),
            (
                |w| (w.first_ts_ms, w.last_ts_ms) = (15_000, 14_000),
                "must be ordered",
            ),
        ];
        for (spoil, want) in bad {
            let mut w = window();
            spoil(&mut w);
            let err = w.check().unwrap_err();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
        // Rounding slack, and the largest plausible count of the window.
        let mut w = window();
        w.mean = 4.0 + 1e-12;
        w.count = 10_000 * MAX_READINGS_PER_MS;
        assert_eq!(w.check(), Ok(()));
        // Extreme but real values do not overflow the checks.
        let mut w = window();
        (w.start_ms, w.end_ms, w.first_ts_ms, w.last_ts_ms) = (i64::MIN, i64::MAX, 0, 0);
        w.count = u64::MAX;
        assert_eq!(w.check(), Ok(()));
    }

    #[test]
    fn events_need_a_finite_value_and_a_score_in_the_unit_interval() {
        let mut e = AnomalyEvent {
            phase: EventPhase::Onset,
            model_version: None,
            id: event_id("d", "m", 5, "z"),
            device: "d".into(),
            metric: "m".into(),
            ts_ms: 5,
            value: 1.0,
            score: 0.9,
            detector: "z".into(),
            window_start_ms: 0,
            agent: "a".into(),
        };
        assert_eq!(e.check(), Ok(()));
        e.score = f64::NAN;
        assert!(e.check().unwrap_err().contains("score"));
        e.score = 0.9;
        e.value = f64::NEG_INFINITY;
        assert!(e.check().unwrap_err().contains("value must be finite"));
    }
}
