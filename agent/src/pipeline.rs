//! The agent's per-reading core, without I/O: decode → detect → window → outputs.
//!
//! One [`Pipeline`] owns every (device, metric) series of the agent: its detector state, its open and
//! retained windows and its alarm state. The async shell feeds it raw MQTT messages and ships what it
//! outputs. A window is sent when the watermark passes its end and, if readings arrive for it within
//! the allowed lateness, sent once more with revision 1 (see `models/src/window/tumbling.rs`).
//!
//! **Event time survives bad clocks.** Every series has its own watermark, moved only by its own
//! readings: one device's clock cannot make another device's readings late. A reading stamped more
//! than `window.max_future_ms` ahead of the agent's clock is rejected (`timestamp_in_future`), so a
//! wild timestamp cannot freeze even its own series. A series that has received nothing for
//! `window.idle_timeout_ms` on the agent's clock is closed as if its own clock had kept running:
//! its watermark becomes its newest event time plus the quiet time minus the idle timeout
//! ([`Pipeline::tick`], given the time). Readings older than their window's end + allowed lateness
//! are counted as late ([`Pipeline::take_late_note`] gives the shell one to log).
//!
//! [`Pipeline::snapshot`] and [`Pipeline::restore`] carry the whole state across a restart in one
//! blob; [`Pipeline::take_changed`] and [`Pipeline::restore_rows`] do it one row per series, so a
//! checkpoint writes only the series that changed since the last one (an idle agent writes nothing).
//! What and where to store is the caller's business.
//!
//! Snapshot format: a version byte ([`SNAPSHOT_VERSION`]), a little-endian u64 fingerprint of the
//! configuration the state depends on (window size and lateness, detector, partitions — plus the
//! binary layout of a fresh detector and window set, so a changed struct is refused rather than
//! misread), the postcard-encoded body (every series in creation order: device, metric, partition,
//! detector state, held windows with revisions and watermark, event gate, newest event time and
//! last arrival), and a little-endian XXH3-64 checksum of everything before it. A row is one series,
//! postcard-encoded, followed by its XXH3-64 checksum; the fingerprint then travels in the caller's
//! header. Series are kept in creation order, so `tick` and `flush` emit in the same order before
//! and after a restore.

use crate::config::AgentConfig;
use crate::error::{AgentError, IngestError, SnapshotError};
use crate::ingest::{Mapping, RawReading};
use crate::multivariate::{DeviceLink, DeviceModels, ModelOffer, ModelRefused, Observed, PCA};
use crate::telemetry::AgentMetrics;
use edgewatch_models::detect::{
    AnyDetector, Detector, EventGate, Silence, SilenceChange, SilenceConfig,
};
use edgewatch_models::partition::partition_of;
use edgewatch_models::window::{Admit, TumblingWindows, WindowAggregate};
use edgewatch_models::wire::{
    event_id, phase_event_id, AnomalyEvent, EventPhase, TrainingSample, WindowSummary,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use xxhash_rust::xxh3::{xxh3_64, Xxh3, Xxh3DefaultBuilder};

/// Version of the snapshot layout. Bump it when the header or the body's shape changes; the
/// fingerprint also catches most changes to detector and window fields, but not all (a reorder of
/// two fields of one type).
/// 5: the compact ensemble (parameters shared per configuration, `f32` MAD window and seasonal
/// profile); snapshots and checkpoint rows of version 4 are refused with a message naming both
/// versions (rows: their fingerprint, which covers the version), and the agent starts empty.
pub const SNAPSHOT_VERSION: u8 = 5;
/// Version byte + fingerprint before the body, checksum after it.
const SNAPSHOT_OVERHEAD: usize = 1 + 8 + 8;

/// Something the pipeline wants sent upstream.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// A closed window.
    Summary {
        /// Lane (partition of the device).
        partition: u32,
        /// The summary.
        summary: WindowSummary,
    },
    /// An anomaly event, to be published at once.
    Anomaly {
        /// Lane (partition of the device).
        partition: u32,
        /// The event.
        event: AnomalyEvent,
    },
    /// A training sample of one device, for the partition's training lane.
    Training {
        /// Partition of the device.
        partition: u32,
        /// The sample.
        sample: TrainingSample,
    },
}

#[derive(Serialize, Deserialize)]
struct Series {
    device: Box<str>,
    metric: Box<str>,
    partition: u32,
    detector: AnyDetector,
    windows: TumblingWindows,
    /// One event per episode (the score itself is a state).
    gate: EventGate,
    /// Arrival-time state: a series whose readings stop raises a `silence` event.
    silence: Silence,
    /// Newest event time of the series' own readings (`i64::MIN` before the first).
    max_ts_ms: i64,
    /// The agent's clock when the latest reading arrived: how long the series has been quiet.
    last_arrival_ms: i64,
    /// Changed since the last [`Pipeline::take_changed`].
    #[serde(skip)]
    dirty: bool,
    /// Its device's place in the device table of models and sampling (resolved on first use).
    #[serde(skip)]
    link: DeviceLink,
}

/// A reading dropped as late, for the shell to log (at a bounded rate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LateNote {
    /// Device id.
    pub device: String,
    /// Metric name.
    pub metric: String,
    /// The reading's timestamp, ms.
    pub ts_ms: i64,
    /// The series' watermark when it arrived, ms.
    pub watermark_ms: i64,
    /// Late readings of any series since the previous note was taken.
    pub count: u64,
}

/// Settings copied out of the configuration for the hot path.
struct Params {
    agent: Arc<str>,
    prototype: AnyDetector,
    detector_name: &'static str,
    /// A fresh event gate (threshold and re-arm rules; cloned per series).
    gate: EventGate,
    /// When a quiet series counts as silent.
    silence: SilenceConfig,
    /// A fresh window set for a new series (validated once, cloned per series).
    windows: TumblingWindows,
    idle_timeout_ms: i64,
    max_future_ms: i64,
    partitions: u32,
    max_payload_bytes: usize,
    max_series: usize,
    /// What a snapshot must have been taken under to be restored here.
    fingerprint: u64,
}

/// The series table and the state that goes with it.
struct Table {
    /// `device \0 metric` → position in `series`.
    index: HashMap<SeriesKey, usize, Xxh3DefaultBuilder>,
    /// Every series in creation order (never removed), so iteration order survives a restore.
    series: Vec<Series>,
    key: String,
    /// The latest late reading not yet taken by the shell, and how many came since.
    late: Option<LateNote>,
}

/// A snapshot's body as written (borrowing the table).
#[derive(Serialize)]
struct SnapshotRef<'a> {
    series: &'a [Series],
}

/// A snapshot's body as read.
#[derive(Deserialize)]
struct SnapshotBody {
    series: Vec<Series>,
}

/// The series that changed since the previous [`Pipeline::take_changed`], one encoded row each.
#[derive(Debug, Default)]
pub struct ChangedSeries {
    /// What the state was taken under (store it beside the rows; [`Pipeline::restore_rows`] checks it).
    pub fingerprint: u64,
    /// Number of series in all (rows `0..series` make up the state).
    pub series: u32,
    /// (series index, encoded row) of every changed series.
    pub rows: Vec<(u32, Vec<u8>)>,
}

/// The agent's processing core.
pub struct Pipeline {
    params: Params,
    mappings: Vec<Mapping>,
    /// Mappings a live reload removed, still used for messages that were in flight when it came
    /// (tried after `mappings`; at most [`MAX_RETIRED_MAPPINGS`], for [`RETIRED_MAPPINGS_MS`]).
    retired: Vec<Mapping>,
    /// Arrival time after which `retired` is dropped.
    retired_until_ms: i64,
    table: Table,
    /// Multivariate models per device (not checkpointed: reloaded from `state.dir/models`, their
    /// aligners and gates start empty and refill within one reading interval).
    multi: DeviceModels,
    scratch: Vec<(String, f64)>,
    outputs: Vec<Output>,
    metrics: Arc<AgentMetrics>,
}

impl Pipeline {
    /// Builds the pipeline; fails with every configuration problem found.
    pub fn new(cfg: &AgentConfig, metrics: Arc<AgentMetrics>) -> Result<Self, AgentError> {
        let problems = cfg.problems();
        if !problems.is_empty() {
            return Err(AgentError::Config(problems));
        }
        let prototype = cfg
            .detector
            .build()
            .map_err(|e| AgentError::Config(vec![format!("detector.{e}")]))?;
        let mappings = mappings(cfg)?;
        let gate = EventGate::new(cfg.threshold(), &cfg.anomaly.gate())
            .map_err(|e| AgentError::Config(vec![format!("anomaly.{e}")]))?;
        let windows = TumblingWindows::new(cfg.window.size_ms, cfg.window.allowed_lateness_ms)
            .map_err(|e| AgentError::Config(vec![format!("window.{e}")]))?;
        let fingerprint = fingerprint(cfg, &prototype, &windows)
            .map_err(|e| AgentError::Config(vec![format!("detector: {e}")]))?;
        let multi = DeviceModels::new(&cfg.models, &cfg.anomaly.gate())
            .map_err(|e| AgentError::Config(vec![format!("models.{e}")]))?;
        Ok(Self {
            params: Params {
                agent: cfg.id.as_str().into(),
                detector_name: prototype.name(),
                prototype,
                gate,
                silence: cfg.anomaly.silence,
                windows,
                idle_timeout_ms: cfg.window.idle_timeout_ms,
                max_future_ms: cfg.window.max_future_ms,
                partitions: cfg.uplink.partitions,
                max_payload_bytes: cfg.pipeline.max_payload_bytes,
                max_series: cfg.pipeline.max_series,
                fingerprint,
            },
            mappings,
            retired: Vec::new(),
            retired_until_ms: i64::MIN,
            table: Table {
                index: HashMap::with_hasher(Xxh3DefaultBuilder::new()),
                series: Vec::new(),
                key: String::new(),
                late: None,
            },
            multi,
            scratch: Vec::new(),
            outputs: Vec::new(),
            metrics,
        })
    }

    /// Applies the live part of a new configuration (see `reload.rs`): threshold and re-arm rules
    /// to every series (their episode state carries over, as after a restore), silence rules, and
    /// the detector of the series created from now on (existing series keep their detector and its
    /// state), and the topic mappings of `source.subscriptions` (the removed ones are kept for
    /// messages already in flight; the caller then changes the subscriptions). Windows and
    /// partitions are left as they are. Fails, changing nothing, when `cfg` is invalid. `now_ms`:
    /// the wall clock, from which the removed mappings serve [`RETIRED_MAPPINGS_MS`] more.
    pub fn reconfigure(&mut self, cfg: &AgentConfig, now_ms: i64) -> Result<(), AgentError> {
        let new_mappings = mappings(cfg)?;
        let prototype = cfg
            .detector
            .build()
            .map_err(|e| AgentError::Config(vec![format!("detector.{e}")]))?;
        let gate = EventGate::new(cfg.threshold(), &cfg.anomaly.gate())
            .map_err(|e| AgentError::Config(vec![format!("anomaly.{e}")]))?;
        cfg.anomaly
            .silence
            .validate()
            .map_err(|e| AgentError::Config(vec![format!("anomaly.silence.{e}")]))?;
        // Checkpoints taken from now on are the new configuration's: a restart with it restores them.
        let fingerprint = fingerprint(cfg, &prototype, &self.params.windows)
            .map_err(|e| AgentError::Config(vec![format!("detector: {e}")]))?;
        let p = &mut self.params;
        p.detector_name = prototype.name();
        p.prototype = prototype;
        p.gate = gate;
        p.silence = cfg.anomaly.silence;
        p.fingerprint = fingerprint;
        let filters: Vec<String> = new_mappings.iter().map(Mapping::filter).collect();
        let old = std::mem::replace(&mut self.mappings, new_mappings);
        let mut retired: Vec<Mapping> = old
            .into_iter()
            .chain(std::mem::take(&mut self.retired))
            .filter(|m| !filters.contains(&m.filter()))
            .collect();
        retired.truncate(MAX_RETIRED_MAPPINGS);
        self.retired = retired;
        self.retired_until_ms = now_ms.saturating_add(RETIRED_MAPPINGS_MS);
        for s in &mut self.table.series {
            s.gate = s.gate.retuned(&p.gate);
            s.dirty = true;
        }
        Ok(())
    }

    /// Score threshold of the event gate new and existing series use.
    pub fn threshold(&self) -> f64 {
        self.params.gate.threshold()
    }

    /// MQTT filters to subscribe to, one per mapping.
    pub fn filters(&self) -> Vec<String> {
        self.mappings.iter().map(Mapping::filter).collect()
    }

    /// Processes one MQTT message; returns the number of readings it carried.
    /// Errors are already counted in the metrics; the caller only logs them.
    pub fn handle(
        &mut self,
        topic: &[u8],
        payload: &[u8],
        arrival_ms: i64,
    ) -> Result<usize, IngestError> {
        self.metrics.messages_total.fetch_add(1, Relaxed);
        let result = std::str::from_utf8(topic)
            .map_err(|_| IngestError::NonUtf8Topic)
            .and_then(|topic| self.handle_inner(topic, payload, arrival_ms));
        self.count(&result);
        result
    }

    /// [`Pipeline::handle`] for a topic already known to be UTF-8 (MQTT clients decode topics).
    pub fn handle_topic(
        &mut self,
        topic: &str,
        payload: &[u8],
        arrival_ms: i64,
    ) -> Result<usize, IngestError> {
        self.metrics.messages_total.fetch_add(1, Relaxed);
        let result = self.handle_inner(topic, payload, arrival_ms);
        self.count(&result);
        result
    }

    fn count(&self, result: &Result<usize, IngestError>) {
        match result {
            Ok(n) => {
                self.metrics.readings_total.fetch_add(*n as u64, Relaxed);
            }
            Err(e) => self.metrics.reject(e),
        }
    }

    fn handle_inner(
        &mut self,
        topic: &str,
        payload: &[u8],
        arrival_ms: i64,
    ) -> Result<usize, IngestError> {
        if payload.len() > self.params.max_payload_bytes {
            return Err(IngestError::PayloadTooLarge {
                size: payload.len(),
                max: self.params.max_payload_bytes,
            });
        }
        if !self.retired.is_empty() && arrival_ms > self.retired_until_ms {
            self.retired.clear();
        }
        let (mapping, device, metric) = self
            .mappings
            .iter()
            .chain(&self.retired)
            .find_map(|m| m.claims(topic).map(|(d, mt)| (m, d, mt)))
            .ok_or(IngestError::TopicMismatch)?;
        let mut count = 0usize;
        let mut failure = None;
        let (params, table, multi, outputs, metrics) = (
            &self.params,
            &mut self.table,
            &mut self.multi,
            &mut self.outputs,
            &*self.metrics,
        );
        mapping.decode(
            device,
            metric,
            payload,
            arrival_ms,
            &mut self.scratch,
            &mut |r| match table.apply(params, r, arrival_ms, multi, outputs, metrics) {
                Ok(()) => count += 1,
                Err(e) => failure = Some(e),
            },
        )?;
        match failure {
            Some(e) if count == 0 => Err(e),
            _ => Ok(count),
        }
    }

    /// Closes windows of series that have been quiet for `window.idle_timeout_ms` on the agent's
    /// clock (`now_ms`), as if the series' own clock had kept running: its watermark becomes its
    /// newest event time + quiet time − idle timeout. Series with nothing due are not touched (an
    /// idle agent's state does not change, so its checkpoints write nothing).
    pub fn tick(&mut self, now_ms: i64) {
        let idle_timeout = self.params.idle_timeout_ms;
        let (outputs, metrics) = (&mut self.outputs, &*self.metrics);
        let p = &self.params;
        let multi = &mut self.multi;
        for s in &mut self.table.series {
            if let Some(change) = s.silence.check(s.last_arrival_ms, now_ms, &p.silence) {
                multi.note_anomaly(&s.link, &s.device, s.max_ts_ms);
                s.dirty = true;
                metrics.anomalies_total.fetch_add(1, Relaxed);
                metrics.silences_total.fetch_add(1, Relaxed);
                // The series' event time, moved on by the silence.
                let ts_ms = s.max_ts_ms.saturating_add(change.silent_ms());
                outputs.push(Output::Anomaly {
                    partition: s.partition,
                    event: silence_event(p, s, change, ts_ms, EventPhase::Onset),
                });
            }
            let Some(deadline) = s.windows.next_deadline_ms() else {
                continue;
            };
            let quiet = now_ms.saturating_sub(s.last_arrival_ms);
            if quiet < idle_timeout {
                continue;
            }
            let watermark = s.max_ts_ms.saturating_add(quiet - idle_timeout);
            if watermark < deadline {
                continue;
            }
            s.dirty = true;
            let (device, metric, partition) = (&s.device, &s.metric, s.partition);
            s.windows.advance(watermark, &mut |w| {
                emit_window(outputs, metrics, device, metric, partition, &w)
            });
        }
        let mut samples = Vec::new();
        multi.expire_samples(now_ms, &mut samples);
        for (partition, sample) in samples {
            metrics.training_samples_total.fetch_add(1, Relaxed);
            outputs.push(Output::Training { partition, sample });
        }
    }

    /// Restarts every series' quiet time at `now_ms` (after a restore: the time the agent was down
    /// is not the series' silence, and readings the broker kept for it are about to arrive).
    pub fn touch_all(&mut self, now_ms: i64) {
        for s in &mut self.table.series {
            if s.last_arrival_ms != now_ms || s.silence.is_silent() {
                s.last_arrival_ms = now_ms;
                s.silence.reset_silence();
                s.dirty = true;
            }
        }
    }

    /// The latest reading dropped as late since the previous call, with the number dropped.
    pub fn take_late_note(&mut self) -> Option<LateNote> {
        self.table.late.take()
    }

    /// Closes every held window now (shutdown or drain): open ones are sent, retained ones only if
    /// they hold corrections.
    pub fn flush(&mut self) {
        let (outputs, metrics) = (&mut self.outputs, &*self.metrics);
        for s in &mut self.table.series {
            let (device, metric, partition) = (&s.device, &s.metric, s.partition);
            s.windows
                .flush(&mut |w| emit_window(outputs, metrics, device, metric, partition, &w));
        }
    }

    /// Takes everything produced so far.
    pub fn take_outputs(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.outputs)
    }

    /// Moves everything produced so far into `into` (keeps both allocations).
    pub fn drain_outputs_into(&mut self, into: &mut Vec<Output>) {
        into.append(&mut self.outputs);
    }

    /// Raises the revision of every held window (see [`TumblingWindows::supersede`]): after a
    /// restore, what the windows emit replaces what they may have emitted after the checkpoint.
    pub fn supersede_after_restore(&mut self) {
        for s in &mut self.table.series {
            if s.windows.open_windows() > 0 {
                s.windows.supersede();
                s.dirty = true;
            }
        }
    }

    /// Number of series tracked.
    pub fn series(&self) -> usize {
        self.table.series.len()
    }

    /// Offers a multivariate model received under `key` (a models topic's last level, or a file
    /// name at start) and swaps it in if it passes the checks of [`DeviceModels::offer`]; the
    /// device's metrics seen so far must include its features. Counted in the metrics (loaded,
    /// refused by reason, running); the caller logs and persists. Series state is untouched.
    pub fn offer_model(&mut self, key: &str, payload: &[u8]) -> Result<ModelOffer, ModelRefused> {
        let series = &self.table.series;
        let result = self.multi.offer(key, payload, |device| {
            series
                .iter()
                .filter(|s| &*s.device == device)
                .map(|s| &*s.metric)
                .collect()
        });
        match &result {
            Ok(ModelOffer::Loaded { .. }) => {
                self.metrics.models_loaded_total.fetch_add(1, Relaxed);
                self.metrics.models.store(self.multi.len() as u64, Relaxed);
            }
            Ok(ModelOffer::Unchanged { .. }) => {}
            Err(e) => self.metrics.refuse_model(e.reason),
        }
        result
    }

    /// Version of the multivariate model running for `device`, if any.
    pub fn model_version(&self, device: &str) -> Option<u64> {
        self.multi.version(device)
    }

    /// The whole processing state, encoded (format in the module docs). Outputs not yet taken are
    /// not part of it: take them first, they belong to the outbox.
    pub fn snapshot(&self) -> Result<Vec<u8>, SnapshotError> {
        // About 2 KB per series with the default detector (benches/snapshot.rs): one allocation
        // for typical tables.
        let mut out = Vec::with_capacity(SNAPSHOT_OVERHEAD + 64 + self.table.series.len() * 2560);
        out.push(SNAPSHOT_VERSION);
        out.extend_from_slice(&self.params.fingerprint.to_le_bytes());
        let body = SnapshotRef {
            series: &self.table.series,
        };
        let mut out = postcard::to_extend(&body, out).map_err(|e| SnapshotError::Encode {
            detail: e.to_string(),
        })?;
        let checksum = xxh3_64(&out);
        out.extend_from_slice(&checksum.to_le_bytes());
        Ok(out)
    }

    /// A pipeline for `cfg` holding the state of `bytes`, a [`Pipeline::snapshot`]. It then behaves
    /// exactly as the snapshotted one would have. Fails, without panicking, on an invalid
    /// configuration or a snapshot that is corrupt, of another format version, or taken under a
    /// configuration with other windows, detector or partitions ([`SnapshotError`]); the caller then
    /// starts from [`Pipeline::new`]. `pipeline.max_series` applies to new series only: a snapshot
    /// holding more is restored whole.
    pub fn restore(
        cfg: &AgentConfig,
        metrics: Arc<AgentMetrics>,
        bytes: &[u8],
    ) -> Result<Self, AgentError> {
        let mut p = Self::new(cfg, metrics)?;
        let body = decode_snapshot(p.params.fingerprint, bytes)?;
        p.install(body.series)?;
        Ok(p)
    }

    /// Encodes every series changed since the previous call (every series, the first time after
    /// [`Pipeline::new`]), one row each, and marks them clean. Store the rows by index, replacing
    /// older ones; rows `0..series` then hold the whole state ([`Pipeline::restore_rows`]).
    pub fn take_changed(&mut self) -> Result<ChangedSeries, SnapshotError> {
        self.take_changed_upto(usize::MAX)
    }

    /// [`Pipeline::take_changed`] for at most `max_rows` series (the lowest indexes): called until
    /// it returns fewer, it hands a checkpoint over in bounded chunks.
    pub fn take_changed_upto(&mut self, max_rows: usize) -> Result<ChangedSeries, SnapshotError> {
        let mut rows = Vec::new();
        for (i, s) in self.table.series.iter_mut().enumerate() {
            if !s.dirty {
                continue;
            }
            if rows.len() >= max_rows {
                break;
            }
            let row = postcard::to_stdvec(&*s).map_err(|e| SnapshotError::Encode {
                detail: e.to_string(),
            })?;
            rows.push((i as u32, crate::checkpoint::seal_row(row)));
            s.dirty = false;
        }
        Ok(ChangedSeries {
            fingerprint: self.params.fingerprint,
            series: self.table.series.len() as u32,
            rows,
        })
    }

    /// A pipeline for `cfg` holding the state of `rows` (every row `0..n` of
    /// [`Pipeline::take_changed`], in index order), taken under `fingerprint`. Fails like
    /// [`Pipeline::restore`]: a damaged row, a missing one, or another configuration.
    pub fn restore_rows<'a>(
        cfg: &AgentConfig,
        metrics: Arc<AgentMetrics>,
        fingerprint: u64,
        rows: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Self, AgentError> {
        let mut p = Self::new(cfg, metrics)?;
        if fingerprint != p.params.fingerprint {
            return Err(SnapshotError::Incompatible {
                found: fingerprint,
                expected: p.params.fingerprint,
            }
            .into());
        }
        let mut series = Vec::new();
        for (i, row) in rows.into_iter().enumerate() {
            let body = crate::checkpoint::open_row(row)?;
            let s: Series = postcard::from_bytes(body).map_err(|e| SnapshotError::Invalid {
                detail: format!("series row {i}: {e}"),
            })?;
            series.push(s);
        }
        p.install(series)?;
        Ok(p)
    }

    /// Takes restored series in, checking what the fingerprint cannot vouch for.
    fn install(&mut self, mut series: Vec<Series>) -> Result<(), AgentError> {
        let table = &mut self.table;
        table.index.reserve(series.len());
        for (i, s) in series.iter_mut().enumerate() {
            check_restored(&self.params, s)?;
            // Episode state carries over; threshold and re-arm rules are this configuration's.
            s.gate = s.gate.retuned(&self.params.gate);
            // A restored detector read its own copy of the parameters: keep one for all series.
            s.detector.share_params(&self.params.prototype);
            let mut key = String::with_capacity(s.device.len() + 1 + s.metric.len());
            key.push_str(&s.device);
            key.push('\u{0}');
            key.push_str(&s.metric);
            if table
                .index
                .insert(SeriesKey::new(key.as_bytes()), i)
                .is_some()
            {
                return Err(SnapshotError::Invalid {
                    detail: format!("series {:?}/{:?} appears twice", s.device, s.metric),
                }
                .into());
            }
        }
        table.series = series;
        self.metrics
            .series
            .store(table.series.len() as u64, Relaxed);
        Ok(())
    }
}

/// Hash of what a snapshot's state depends on: window size and lateness, partitions, the detector
/// configuration, and the binary encoding of a fresh detector and window set (so that a field added
/// to a detector or window type makes old snapshots incompatible instead of misread).
/// Mappings a live reload removed that are still tried for in-flight messages.
const MAX_RETIRED_MAPPINGS: usize = 64;

/// How long (ms of arrival time) removed mappings still decode what was in flight: the queue and
/// the broker's messages sent before it processed the unsubscribe. After that, a message on a
/// removed topic is a `topic_mismatch` like any other.
pub const RETIRED_MAPPINGS_MS: i64 = 30_000;

/// The topic mappings of `source.subscriptions`, in their order.
fn mappings(cfg: &AgentConfig) -> Result<Vec<Mapping>, AgentError> {
    cfg.source
        .subscriptions
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Mapping::new(s).map_err(|e| {
                AgentError::Config(vec![format!("source.subscriptions[{i}].topic: {e}")])
            })
        })
        .collect()
}

fn fingerprint(
    cfg: &AgentConfig,
    prototype: &AnyDetector,
    windows: &TumblingWindows,
) -> Result<u64, String> {
    let mut h = Xxh3::new();
    h.update(&cfg.window.size_ms.to_le_bytes());
    h.update(&cfg.window.allowed_lateness_ms.to_le_bytes());
    // The layout of a series row (its per-series event-time fields) is part of the state's shape.
    h.update(&[SNAPSHOT_VERSION]);
    h.update(&cfg.uplink.partitions.to_le_bytes());
    let parts = [
        serde_json::to_vec(&cfg.detector).map_err(|e| e.to_string())?,
        postcard::to_stdvec(prototype).map_err(|e| e.to_string())?,
        postcard::to_stdvec(windows).map_err(|e| e.to_string())?,
    ];
    for part in parts {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(&part);
    }
    Ok(h.digest())
}

/// Checks the frame (length, version, checksum, fingerprint) and decodes the body.
fn decode_snapshot(fingerprint: u64, bytes: &[u8]) -> Result<SnapshotBody, SnapshotError> {
    let truncated = || SnapshotError::Truncated { len: bytes.len() };
    let (framed, checksum) = bytes.split_last_chunk::<8>().ok_or_else(truncated)?;
    let (&[version], rest) = framed.split_first_chunk::<1>().ok_or_else(truncated)?;
    let (found_fingerprint, body) = rest.split_first_chunk::<8>().ok_or_else(truncated)?;
    if version != SNAPSHOT_VERSION {
        return Err(SnapshotError::Version {
            found: version,
            expected: SNAPSHOT_VERSION,
        });
    }
    let (found, expected) = (u64::from_le_bytes(*checksum), xxh3_64(framed));
    if found != expected {
        return Err(SnapshotError::Checksum { found, expected });
    }
    let found = u64::from_le_bytes(*found_fingerprint);
    if found != fingerprint {
        return Err(SnapshotError::Incompatible {
            found,
            expected: fingerprint,
        });
    }
    let corrupt = |e: postcard::Error| SnapshotError::Invalid {
        detail: e.to_string(),
    };
    let (decoded, trailing) = postcard::take_from_bytes::<SnapshotBody>(body).map_err(corrupt)?;
    if !trailing.is_empty() {
        return Err(SnapshotError::Invalid {
            detail: format!("{} bytes after the body", trailing.len()),
        });
    }
    Ok(decoded)
}

/// What the fingerprint cannot vouch for in a decoded series (the checksum makes these unlikely; a
/// zero window size would panic later).
fn check_restored(p: &Params, s: &Series) -> Result<(), SnapshotError> {
    let w = &s.windows;
    if (w.size_ms(), w.allowed_lateness_ms())
        != (p.windows.size_ms(), p.windows.allowed_lateness_ms())
    {
        return Err(SnapshotError::Invalid {
            detail: format!(
                "series {:?}/{:?} has windows of {} ms with {} ms lateness, expected {} / {}",
                s.device,
                s.metric,
                w.size_ms(),
                w.allowed_lateness_ms(),
                p.windows.size_ms(),
                p.windows.allowed_lateness_ms()
            ),
        });
    }
    let partition = partition_of(&s.device, p.partitions);
    if s.partition != partition {
        return Err(SnapshotError::Invalid {
            detail: format!(
                "device {:?} is in partition {}, expected {partition}",
                s.device, s.partition
            ),
        });
    }
    Ok(())
}

/// Bytes of a series key kept in the index's own memory: `device \0 metric` of up to this length
/// (most) is compared without following a pointer to a separate allocation.
const INLINE_KEY: usize = 46;

/// A series key (`device \0 metric`) of the index: inline when short, else on the heap. It hashes
/// and compares as its bytes, so the index is looked up with a `&[u8]`.
#[derive(Debug, Clone)]
enum SeriesKey {
    Inline { len: u8, bytes: [u8; INLINE_KEY] },
    Heap(Box<[u8]>),
}

impl SeriesKey {
    fn new(key: &[u8]) -> Self {
        if key.len() <= INLINE_KEY {
            let mut bytes = [0; INLINE_KEY];
            bytes[..key.len()].copy_from_slice(key);
            // INLINE_KEY < 256.
            Self::Inline {
                len: key.len() as u8,
                bytes,
            }
        } else {
            Self::Heap(key.into())
        }
    }

    #[inline]
    fn as_bytes(&self) -> &[u8] {
        match self {
            Self::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Self::Heap(b) => b,
        }
    }
}

impl std::borrow::Borrow<[u8]> for SeriesKey {
    #[inline]
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl std::hash::Hash for SeriesKey {
    #[inline]
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As `[u8]` hashes, which `Borrow` requires.
        self.as_bytes().hash(state)
    }
}

impl PartialEq for SeriesKey {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for SeriesKey {}

impl Table {
    #[inline]
    fn apply(
        &mut self,
        p: &Params,
        r: RawReading<'_>,
        arrival_ms: i64,
        multi: &mut DeviceModels,
        outputs: &mut Vec<Output>,
        metrics: &AgentMetrics,
    ) -> Result<(), IngestError> {
        let ahead_ms = r.ts_ms.saturating_sub(arrival_ms);
        if ahead_ms > p.max_future_ms {
            return Err(IngestError::TimestampInFuture {
                ts_ms: r.ts_ms,
                ahead_ms,
                max_ms: p.max_future_ms,
            });
        }
        self.key.clear();
        self.key.push_str(r.device);
        self.key.push('\u{0}');
        self.key.push_str(r.metric);
        let series = match self.index.get(self.key.as_bytes()) {
            Some(&i) => &mut self.series[i],
            None => {
                if self.series.len() >= p.max_series {
                    return Err(IngestError::TooManySeries { max: p.max_series });
                }
                let windows = p.windows.clone(); // validated in Pipeline::new
                let s = Series {
                    device: r.device.into(),
                    metric: r.metric.into(),
                    partition: partition_of(r.device, p.partitions),
                    detector: p.prototype.clone(),
                    windows,
                    gate: p.gate.clone(),
                    silence: Silence::default(),
                    max_ts_ms: i64::MIN,
                    last_arrival_ms: arrival_ms,
                    dirty: true,
                    link: DeviceLink::default(),
                };
                metrics.series.fetch_add(1, Relaxed);
                self.index
                    .insert(SeriesKey::new(self.key.as_bytes()), self.series.len());
                self.series.push(s);
                let last = self.series.len() - 1;
                &mut self.series[last]
            }
        };
        let previous_arrival = (series.max_ts_ms != i64::MIN).then_some(series.last_arrival_ms);
        let recovered = series
            .silence
            .arrive(previous_arrival, arrival_ms, &p.silence);
        series.max_ts_ms = series.max_ts_ms.max(r.ts_ms);
        series.last_arrival_ms = arrival_ms;
        series.dirty = true;
        metrics
            .event_lag_ms
            .store(arrival_ms.saturating_sub(r.ts_ms), Relaxed);
        let score = series.detector.update(r.ts_ms, r.value);
        let score = if score.is_finite() {
            score.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let (device, metric, partition) = (&series.device, &series.metric, series.partition);
        let admit = series.windows.push(r.ts_ms, r.value, score, &mut |w| {
            emit_window(outputs, metrics, device, metric, partition, &w)
        });
        let window_start_ms = match admit {
            Admit::Accepted { window_start_ms } => window_start_ms,
            Admit::Corrected { window_start_ms } => {
                metrics.corrections_total.fetch_add(1, Relaxed);
                window_start_ms
            }
            Admit::Late => {
                metrics.late_readings_total.fetch_add(1, Relaxed);
                let count = self.late.as_ref().map_or(0, |n| n.count) + 1;
                self.late = Some(LateNote {
                    device: device.to_string(),
                    metric: metric.to_string(),
                    ts_ms: r.ts_ms,
                    watermark_ms: series.windows.watermark_ms(),
                    count,
                });
                series.windows.window_start(r.ts_ms)
            }
        };
        if let Some(change) = recovered {
            outputs.push(Output::Anomaly {
                partition,
                event: silence_event(p, series, change, r.ts_ms, EventPhase::Recovery),
            });
        }
        let onset = series.gate.update(score);
        if !series.gate.armed() {
            // An episode in progress (not only its onset): the training period is left out.
            multi.note_anomaly(&series.link, device, r.ts_ms);
        }
        if onset {
            metrics.anomalies_total.fetch_add(1, Relaxed);
            outputs.push(Output::Anomaly {
                partition,
                event: AnomalyEvent {
                    phase: EventPhase::Onset,
                    model_version: None,
                    // The series' own detector: after a live change of `detector`, series created
                    // before it keep theirs.
                    id: event_id(device, metric, r.ts_ms, series.detector.name()),
                    device: device.to_string(),
                    metric: metric.to_string(),
                    ts_ms: r.ts_ms,
                    value: r.value,
                    score,
                    detector: series.detector.name().to_string(),
                    window_start_ms,
                    agent: p.agent.to_string(),
                },
            });
        }
        let seen = multi.observe(
            &mut series.link,
            device,
            metric,
            partition,
            r.ts_ms,
            r.value,
        );
        if seen.hit.is_some() || seen.sample.is_some() {
            emit_observed(
                seen,
                p,
                device,
                partition,
                r.ts_ms,
                window_start_ms,
                outputs,
                metrics,
            );
        }
        Ok(())
    }
}

/// The outputs of a device model's reading: a `pca` event at an episode's onset, and a training
/// sample whose period the reading closed. Rare, so out of the code every reading runs.
#[cold]
#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn emit_observed(
    seen: Observed<'_>,
    p: &Params,
    device: &str,
    partition: u32,
    ts_ms: i64,
    window_start_ms: i64,
    outputs: &mut Vec<Output>,
    metrics: &AgentMetrics,
) {
    if let Some(hit) = seen.hit {
        metrics.anomalies_total.fetch_add(1, Relaxed);
        let event = AnomalyEvent {
            phase: EventPhase::Onset,
            model_version: Some(hit.version),
            id: event_id(device, hit.metric, ts_ms, PCA),
            device: device.to_string(),
            metric: hit.metric.to_string(),
            ts_ms,
            value: hit.value,
            score: hit.score,
            detector: PCA.to_string(),
            window_start_ms,
            agent: p.agent.to_string(),
        };
        outputs.push(Output::Anomaly { partition, event });
    }
    if let Some((partition, sample)) = seen.sample.map(|b| *b) {
        metrics.training_samples_total.fetch_add(1, Relaxed);
        outputs.push(Output::Training { partition, sample });
    }
}

/// A `silence` event of series `s`: its onset (from the agent's clock, `ts_ms` estimated in the
/// series' event time) or its recovery (at the reading that ended it). `value` is the silence so
/// far in seconds.
fn silence_event(
    p: &Params,
    s: &Series,
    change: SilenceChange,
    ts_ms: i64,
    phase: EventPhase,
) -> AnomalyEvent {
    let silent_ms = change.silent_ms();
    AnomalyEvent {
        id: phase_event_id(&s.device, &s.metric, ts_ms, SILENCE, phase),
        device: s.device.to_string(),
        metric: s.metric.to_string(),
        ts_ms,
        value: silent_ms as f64 / 1000.0,
        score: change.score(p.silence.factor),
        detector: SILENCE.to_string(),
        window_start_ms: s.windows.window_start(ts_ms),
        agent: p.agent.to_string(),
        phase,
        model_version: None,
    }
}

/// Detector name of silence events.
const SILENCE: &str = "silence";

fn emit_window(
    outputs: &mut Vec<Output>,
    metrics: &AgentMetrics,
    device: &str,
    metric: &str,
    partition: u32,
    w: &WindowAggregate,
) {
    metrics.windows_total.fetch_add(1, Relaxed);
    outputs.push(Output::Summary {
        partition,
        summary: w.to_summary(device, metric),
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgewatch_models::detect::{DetectorConfig, ZScoreConfig};

    fn p_config() -> AgentConfig {
        let mut cfg = AgentConfig::with_id("gw-test");
        cfg.window.size_ms = 10_000;
        cfg.window.allowed_lateness_ms = 0;
        cfg.detector = DetectorConfig::Zscore(ZScoreConfig {
            window: 100,
            warmup: 20,
            z_max: 8.0,
        });
        cfg.anomaly.threshold = Some(0.75);
        cfg
    }

    fn pipeline() -> (Pipeline, Arc<AgentMetrics>) {
        let metrics = Arc::new(AgentMetrics::default());
        (
            Pipeline::new(&p_config(), metrics.clone()).unwrap(),
            metrics,
        )
    }

    fn feed(p: &mut Pipeline, device: &str, ts: i64, value: f64) {
        let payload = format!(r#"{{"ts":{ts},"value":{value}}}"#);
        p.handle(
            format!("sensors/{device}/temp").as_bytes(),
            payload.as_bytes(),
            ts,
        )
        .unwrap();
    }

    /// Steps `from..to` of the three correlated metrics of `device` (see
    /// `multivariate::tests::reading`), one reading per metric and second.
    fn feed_multi(
        p: &mut Pipeline,
        device: &str,
        from: i64,
        to: i64,
        broken: impl Fn(i64) -> bool,
    ) {
        use crate::multivariate::tests::{reading, FEATURES};
        for i in from..to {
            for (j, metric) in FEATURES.iter().enumerate() {
                let ts = i * 1000 + j as i64;
                let payload = format!(r#"{{"ts":{ts},"value":{}}}"#, reading(i, j, broken(i)));
                p.handle(
                    format!("sensors/{device}/{metric}").as_bytes(),
                    payload.as_bytes(),
                    ts,
                )
                .unwrap();
            }
        }
    }

    fn offer(p: &mut Pipeline, device: &str, version: u64) -> Result<ModelOffer, ModelRefused> {
        use crate::multivariate::tests::{fitted, payload};
        let key = edgewatch_models::wire::model_key(device);
        p.offer_model(&key, &payload(&fitted(device, version)))
    }

    #[test]
    fn a_live_subscription_change_swaps_mappings_and_keeps_the_removed_ones_for_in_flight_messages()
    {
        let (mut p, m) = pipeline();
        feed(&mut p, "d1", 1_000, 1.0);
        let mut cfg = p_config();
        cfg.source.subscriptions = vec![crate::config::Subscription {
            topic: "plant/{device}/{metric}".into(),
            filter: None,
            metric: None,
            payload: Default::default(),
        }];
        p.reconfigure(&cfg, 10_000).unwrap();
        assert_eq!(p.filters(), vec!["plant/+/+".to_string()]);
        let reading = |ts: i64| format!(r#"{{"ts":{ts},"value":1.0}}"#);
        // The new topic is decoded at once.
        assert_eq!(
            p.handle(b"plant/d2/temp", reading(2_000).as_bytes(), 10_001),
            Ok(1)
        );
        // A message of the removed subscription still in flight is decoded with its old mapping...
        assert_eq!(
            p.handle(b"sensors/d1/temp", reading(3_000).as_bytes(), 10_002),
            Ok(1)
        );
        // ...for RETIRED_MAPPINGS_MS; then it is a topic mismatch like any other.
        assert_eq!(
            p.handle(
                b"sensors/d1/temp",
                reading(4_000).as_bytes(),
                10_000 + RETIRED_MAPPINGS_MS + 1
            ),
            Err(IngestError::TopicMismatch)
        );
        assert_eq!(m.readings_total.load(Relaxed), 3);
        // An invalid subscription changes nothing.
        cfg.source.subscriptions[0].topic = "plant/{metric}".into();
        assert!(p.reconfigure(&cfg, 20_000).is_err());
        assert_eq!(p.filters(), vec!["plant/+/+".to_string()]);
    }

    #[test]
    fn a_device_model_raises_pca_events_naming_metric_and_version() {
        let (mut p, m) = pipeline();
        feed_multi(&mut p, "pump", 0, 100, |_| false);
        assert!(offer(&mut p, "pump", 1).is_ok());
        assert_eq!(m.models_loaded_total.load(Relaxed), 1);
        assert_eq!(m.models.load(Relaxed), 1);
        feed_multi(&mut p, "pump", 100, 300, |i| (200..260).contains(&i));
        let out = p.take_outputs();
        let pca: Vec<&AnomalyEvent> = events(&out)
            .into_iter()
            .filter(|e| e.detector == "pca")
            .collect();
        assert_eq!(pca.len(), 1, "{pca:?}");
        let e = pca[0];
        assert_eq!(
            (e.device.as_str(), e.metric.as_str(), e.model_version),
            ("pump", "current", Some(1))
        );
        assert!((200_000..210_000).contains(&e.ts_ms), "{e:?}");
        assert!(e.score >= 0.5, "{e:?}");
        assert_eq!(e.window_start_ms, e.ts_ms - e.ts_ms % 10_000);
        assert!(e.check().is_ok(), "{:?}", e.check());
        assert_eq!(
            e.id,
            event_id("pump", "current", e.ts_ms, "pca"),
            "ids are deterministic"
        );
        // A feature the device does not have (it has been seen with flow, pressure, current).
        let mut other = crate::multivariate::tests::fitted("pump", 2);
        other.features[0] = "temp".into();
        let key = edgewatch_models::wire::model_key("pump");
        let r = p
            .offer_model(&key, &crate::multivariate::tests::payload(&other))
            .unwrap_err();
        assert_eq!(r.reason, crate::telemetry::ModelRefusal::Features);
        assert_eq!(crate::telemetry::ModelRefusal::Features.count(&m), 1);
        assert_eq!(p.model_version("pump"), Some(1));
    }

    /// Swapping models mid-stream changes no series' state: the univariate outputs of a pipeline
    /// that swaps v1 → v2 equal those of one that never had a model.
    #[test]
    fn a_model_swap_keeps_every_series_state() {
        let (mut plain, _) = pipeline();
        let (mut swapped, _) = pipeline();
        let broken = |i: i64| (300..340).contains(&i) || (600..640).contains(&i);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for (from, to) in [(0, 250), (250, 500), (500, 800)] {
            feed_multi(&mut plain, "pump", from, to, broken);
            feed_multi(&mut plain, "fan", from, to, |_| false);
            a.extend(plain.take_outputs());
            if from == 0 {
                offer(&mut swapped, "pump", 1).unwrap();
            } else if from == 500 {
                offer(&mut swapped, "pump", 2).unwrap();
            }
            feed_multi(&mut swapped, "pump", from, to, broken);
            feed_multi(&mut swapped, "fan", from, to, |_| false);
            b.extend(swapped.take_outputs());
        }
        plain.flush();
        swapped.flush();
        a.extend(plain.take_outputs());
        b.extend(swapped.take_outputs());
        let univariate = |o: &Output| match o {
            Output::Anomaly { event, .. } => event.detector != "pca",
            Output::Summary { .. } => true,
            Output::Training { .. } => false,
        };
        let pca: Vec<Option<u64>> = b
            .iter()
            .filter_map(|o| match o {
                Output::Anomaly { event, .. } if event.detector == "pca" => {
                    Some(event.model_version)
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            pca,
            vec![Some(1), Some(2)],
            "one event per break, each naming its model"
        );
        let ua: Vec<&Output> = a.iter().filter(|o| univariate(o)).collect();
        let ub: Vec<&Output> = b.iter().filter(|o| univariate(o)).collect();
        assert!(ua.len() > 100, "{}", ua.len());
        assert_eq!(ua, ub);
        assert_eq!(plain.snapshot().unwrap(), swapped.snapshot().unwrap());
    }

    #[test]
    fn readings_become_windows_and_a_spike_becomes_one_event() {
        let (mut p, m) = pipeline();
        for i in 0..200 {
            feed(&mut p, "d1", i * 1000, 20.0 + (i % 5) as f64 * 0.1);
        }
        feed(&mut p, "d1", 200_000, 90.0);
        feed(&mut p, "d1", 201_000, 20.1);
        let out = p.take_outputs();
        let summaries: Vec<_> = out
            .iter()
            .filter_map(|o| match o {
                Output::Summary { summary, .. } => Some(summary),
                _ => None,
            })
            .collect();
        assert_eq!(summaries.len(), 20, "windows [0,10s) .. [190s,200s) closed");
        assert!(summaries.iter().all(|s| s.count == 10));
        let events: Vec<_> = out
            .iter()
            .filter_map(|o| match o {
                Output::Anomaly { event, .. } => Some(event),
                _ => None,
            })
            .collect();
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!((events[0].ts_ms, events[0].value), (200_000, 90.0));
        assert_eq!(events[0].window_start_ms, 200_000);
        assert_eq!(m.anomalies_total.load(Relaxed), 1);
        assert_eq!(m.readings_total.load(Relaxed), 202);
    }

    #[test]
    fn a_sustained_excursion_raises_one_event_until_rearmed() {
        let (mut p, _) = pipeline();
        for i in 0..100 {
            feed(&mut p, "d", i * 1000, if i % 2 == 0 { 1.0 } else { 2.0 });
        }
        for i in 100..103 {
            feed(&mut p, "d", i * 1000, 50.0);
        }
        let events = p
            .take_outputs()
            .into_iter()
            .filter(|o| matches!(o, Output::Anomaly { .. }))
            .count();
        assert_eq!(events, 1);
    }

    #[test]
    fn bad_messages_are_counted_and_good_ones_still_flow() {
        let (mut p, m) = pipeline();
        feed(&mut p, "d", 1000, 1.0);
        assert_eq!(
            p.handle(b"sensors/d/temp", b"{bad", 0)
                .unwrap_err()
                .reason(),
            "bad_json"
        );
        assert_eq!(
            p.handle(b"other/topic", b"1", 0).unwrap_err().reason(),
            "topic_mismatch"
        );
        assert_eq!(
            p.handle(b"sensors/\xff/temp", b"{}", 0)
                .unwrap_err()
                .reason(),
            "non_utf8_topic"
        );
        assert_eq!(
            p.handle(b"sensors/d/temp", b"", 0).unwrap_err().reason(),
            "empty_payload"
        );
        let big = vec![b' '; 1 << 20];
        assert_eq!(
            p.handle(b"sensors/d/temp", &big, 0).unwrap_err().reason(),
            "payload_too_large"
        );
        feed(&mut p, "d", 2000, 1.0);
        assert_eq!(m.rejected_total(), 5);
        assert_eq!(m.readings_total.load(Relaxed), 2);
        assert_eq!(m.messages_total.load(Relaxed), 7);
    }

    #[test]
    fn late_readings_are_counted_not_merged() {
        let (mut p, m) = pipeline();
        feed(&mut p, "d", 1000, 1.0);
        feed(&mut p, "d", 25_000, 1.0);
        feed(&mut p, "d", 2000, 1.0);
        assert_eq!(m.late_readings_total.load(Relaxed), 1);
        let out = p.take_outputs();
        assert!(matches!(&out[0], Output::Summary { summary, .. } if summary.count == 1));
    }

    fn summaries(out: &[Output]) -> Vec<&WindowSummary> {
        out.iter()
            .filter_map(|o| match o {
                Output::Summary { summary, .. } => Some(summary),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_late_reading_within_lateness_after_its_window_was_sent_yields_revision_1_counting_it() {
        let mut cfg = AgentConfig::with_id("gw-test");
        cfg.window.size_ms = 10_000;
        cfg.window.allowed_lateness_ms = 5_000;
        let m = Arc::new(AgentMetrics::default());
        let mut p = Pipeline::new(&cfg, m.clone()).unwrap();
        feed(&mut p, "d", 1_000, 1.0);
        feed(&mut p, "d", 2_000, 2.0);
        feed(&mut p, "d", 12_000, 3.0);
        let sent = p.take_outputs();
        let sent = summaries(&sent);
        assert_eq!(
            sent.len(),
            1,
            "[0, 10 s) sent once the watermark reached its end"
        );
        assert_eq!(
            (sent[0].start_ms, sent[0].count, sent[0].revision),
            (0, 2, 0)
        );
        feed(&mut p, "d", 9_000, 9.0);
        assert_eq!(m.corrections_total.load(Relaxed), 1);
        assert_eq!(m.late_readings_total.load(Relaxed), 0);
        assert!(
            p.take_outputs().is_empty(),
            "the correction waits for the window to close"
        );
        feed(&mut p, "d", 15_000, 4.0);
        let out = p.take_outputs();
        let revised = summaries(&out);
        assert_eq!(revised.len(), 1);
        let r = revised[0];
        assert_eq!(
            (r.device.as_str(), r.metric.as_str(), r.start_ms),
            (
                sent[0].device.as_str(),
                sent[0].metric.as_str(),
                sent[0].start_ms
            ),
            "same key"
        );
        assert_eq!(
            (r.revision, r.count, r.max, r.last_ts_ms),
            (1, 3, 9.0, 9_000)
        );
        assert_eq!(m.windows_total.load(Relaxed), 2);
        feed(&mut p, "d", 3_000, 1.0);
        assert_eq!(
            m.late_readings_total.load(Relaxed),
            1,
            "past end + lateness"
        );
    }

    fn feed_at(
        p: &mut Pipeline,
        device: &str,
        ts: i64,
        value: f64,
        arrival: i64,
    ) -> Result<usize, IngestError> {
        let payload = format!(r#"{{"ts":{ts},"value":{value}}}"#);
        p.handle(
            format!("sensors/{device}/temp").as_bytes(),
            payload.as_bytes(),
            arrival,
        )
    }

    fn events(out: &[Output]) -> Vec<&AnomalyEvent> {
        out.iter()
            .filter_map(|o| match o {
                Output::Anomaly { event, .. } => Some(event),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_series_that_stops_raises_one_silence_event_and_one_recovery() {
        let (mut p, m) = pipeline();
        let t0 = 1_767_225_600_000;
        for i in 0..30 {
            feed_at(&mut p, "quiet", t0 + i * 1000, 1.0, t0 + i * 1000).unwrap();
            feed_at(&mut p, "busy", t0 + i * 1000, 1.0, t0 + i * 1000).unwrap();
        }
        p.take_outputs();
        let last = t0 + 29_000;
        // "busy" keeps reporting; "quiet" stops. Ticks every 500 ms on the agent's clock.
        let mut silences = Vec::new();
        for k in 1..=40 {
            let now = last + k * 500;
            if k % 2 == 0 {
                feed_at(&mut p, "busy", now, 1.0, now).unwrap();
            }
            p.tick(now);
            for e in events(&p.take_outputs()) {
                silences.push((now, e.clone()));
            }
        }
        assert_eq!(silences.len(), 1, "{silences:?}");
        let (at, e) = &silences[0];
        assert_eq!(*at, last + 4000, "silent after 4 usual intervals");
        assert_eq!(
            (e.device.as_str(), e.detector.as_str()),
            ("quiet", "silence")
        );
        assert_eq!(e.phase, EventPhase::Onset);
        assert_eq!(
            e.ts_ms,
            last + 4000,
            "the series' event time, moved on by the silence"
        );
        assert_eq!(e.value, 4.0);
        assert!((e.score - 0.5).abs() < 1e-9);
        assert_eq!(m.silences_total.load(Relaxed), 1);
        // It comes back: one recovery, at the reading that ended the silence.
        feed_at(&mut p, "quiet", last + 60_000, 1.0, last + 60_000).unwrap();
        let out = p.take_outputs();
        let back = events(&out);
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].phase, EventPhase::Recovery);
        assert_eq!(back[0].ts_ms, last + 60_000);
        assert_eq!(back[0].value, 60.0);
        assert_ne!(back[0].id, e.id);
        let json = serde_json::to_value(back[0]).unwrap();
        assert_eq!(json["phase"], "recovery");
        assert!(serde_json::to_value(e).unwrap().get("phase").is_none());
        // It survives the outbox's record encoding (whose tag is `kind`).
        let record = crate::outbox::Record::Anomaly(back[0].clone());
        let bytes = serde_json::to_vec(&record).unwrap();
        assert_eq!(
            serde_json::from_slice::<crate::outbox::Record>(&bytes).unwrap(),
            record
        );
    }

    #[test]
    fn the_agents_own_downtime_is_not_a_silence() {
        let (mut p, _) = pipeline();
        let t0 = 1_767_225_600_000;
        for i in 0..30 {
            feed_at(&mut p, "d", t0 + i * 1000, 1.0, t0 + i * 1000).unwrap();
        }
        let snapshot = p.snapshot().unwrap();
        let (_, m) = pipeline();
        let mut q = Pipeline::restore(&p_config(), m, &snapshot).unwrap();
        // Back an hour later: quiet time restarts at the restore.
        let now = t0 + 3_600_000;
        q.touch_all(now);
        q.tick(now + 3_000);
        assert!(events(&q.take_outputs()).is_empty());
        q.tick(now + 4_000);
        assert_eq!(
            events(&q.take_outputs()).len(),
            1,
            "silent 4 s after the restart"
        );
    }

    #[test]
    fn an_idle_series_closes_on_the_agents_clock_not_on_other_series() {
        let (mut p, _) = pipeline(); // 10 s windows, idle timeout 120 s
        let t0 = 1_767_225_600_000;
        feed_at(&mut p, "quiet", t0 + 1000, 1.0, t0 + 1000).unwrap();
        // Another series far ahead (within max_future_ms of the agent's clock) moves nothing else.
        feed_at(&mut p, "busy", t0 + 500_000, 1.0, t0 + 1000).unwrap();
        p.tick(t0 + 1000);
        assert!(p.take_outputs().is_empty());
        p.tick(t0 + 1000 + 120_000 + 8_999);
        assert!(
            p.take_outputs().is_empty(),
            "the window ends 9 s after the last reading"
        );
        p.tick(t0 + 1000 + 120_000 + 9_000);
        let out = p.take_outputs();
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(matches!(&out[0], Output::Summary { summary, .. } if summary.device == "quiet"));
        // The busy series' window is closed by its own quiet time too, and only then.
        p.tick(t0 + 1000 + 120_000 + 10_000);
        let out = p.take_outputs();
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(matches!(&out[0], Output::Summary { summary, .. } if summary.device == "busy"));
    }

    #[test]
    fn a_far_future_reading_is_rejected_and_no_other_series_loses_a_reading() {
        let (mut p, m) = pipeline();
        let t0 = 1_767_225_600_000;
        let year_2199 = 7_226_578_800_000;
        let e = feed_at(&mut p, "broken-clock", year_2199, 1.0, t0).unwrap_err();
        assert_eq!(e.reason(), "timestamp_in_future");
        assert!(e.to_string().contains("ahead of the agent's clock"), "{e}");
        assert_eq!(m.rejected("timestamp_in_future"), 1);
        assert_eq!(p.series(), 0, "a rejected reading creates no series");
        // A sensor 3 minutes ahead is within the bound: accepted, and the others keep flowing.
        for i in 0..600 {
            let now = t0 + i * 1000;
            feed_at(&mut p, "ahead", now + 180_000, 1.0, now).unwrap();
            feed_at(&mut p, "ok", now, 1.0, now).unwrap();
            p.tick(now);
        }
        p.flush();
        let counted: u64 = summaries(&p.take_outputs()).iter().map(|s| s.count).sum();
        assert_eq!(counted, 1200, "every reading of both series is in a window");
        assert_eq!(m.late_readings_total.load(Relaxed), 0);
        assert!(p.take_late_note().is_none());
    }

    #[test]
    fn late_readings_are_counted_and_noted_for_the_log() {
        let (mut p, m) = pipeline();
        feed_at(&mut p, "d", 100_000, 1.0, 100_000).unwrap();
        feed_at(&mut p, "d", 5_000, 1.0, 100_001).unwrap();
        feed_at(&mut p, "d", 6_000, 1.0, 100_002).unwrap();
        assert_eq!(m.late_readings_total.load(Relaxed), 2);
        let note = p.take_late_note().unwrap();
        assert_eq!(
            (
                note.device.as_str(),
                note.ts_ms,
                note.watermark_ms,
                note.count
            ),
            ("d", 6_000, 100_000, 2)
        );
        assert!(p.take_late_note().is_none());
    }

    #[test]
    fn values_too_large_to_summarise_are_rejected_alone() {
        let (mut p, m) = pipeline();
        for i in 0..100 {
            let v = if i == 50 { 1.3e154 } else { 1.0 };
            let r = feed_at(&mut p, "d", i * 10, v, i * 10);
            assert_eq!(r.is_err(), i == 50);
        }
        p.flush();
        let out = p.take_outputs();
        let s = summaries(&out);
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].count, s[0].max, s[0].std), (99, 1.0, 0.0));
        assert_eq!(m.rejected("value_out_of_range"), 1);
    }

    #[test]
    fn an_idle_agent_changes_nothing_a_checkpoint_would_write() {
        let (mut p, _) = pipeline();
        let t0 = 1_767_225_600_000;
        for d in 0..50 {
            feed_at(&mut p, &format!("d{d}"), t0, 1.0, t0).unwrap();
        }
        let first = p.take_changed().unwrap();
        assert_eq!((first.series, first.rows.len()), (50, 50));
        feed_at(&mut p, "d7", t0 + 1, 1.0, t0 + 1).unwrap();
        let rows = p.take_changed().unwrap().rows;
        assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), vec![7]);
        // Quiet: ticks before the idle timeout change nothing; the one that closes windows changes
        // each series once; after that, nothing again.
        for now in (t0..t0 + 100_000).step_by(1000) {
            p.tick(now);
        }
        assert!(p.take_changed().unwrap().rows.is_empty());
        p.tick(t0 + 200_000);
        assert_eq!(p.take_changed().unwrap().rows.len(), 50);
        for now in (t0 + 200_000..t0 + 2_000_000).step_by(1000) {
            p.tick(now);
        }
        assert!(
            p.take_changed().unwrap().rows.is_empty(),
            "idle: nothing to write"
        );
    }

    #[test]
    fn rows_restore_the_same_state_as_the_blob() {
        let (cfg, bytes) = sample_snapshot();
        let mut p = Pipeline::restore(&cfg, Arc::new(AgentMetrics::default()), &bytes).unwrap();
        p.table.series.iter_mut().for_each(|s| s.dirty = true);
        let changed = p.take_changed().unwrap();
        let rows: Vec<&[u8]> = changed.rows.iter().map(|(_, r)| r.as_slice()).collect();
        let q = Pipeline::restore_rows(
            &cfg,
            Arc::new(AgentMetrics::default()),
            changed.fingerprint,
            rows.clone(),
        )
        .unwrap();
        assert_eq!(q.snapshot().unwrap(), bytes);
        assert!(Pipeline::restore_rows(
            &cfg,
            Arc::new(AgentMetrics::default()),
            changed.fingerprint ^ 1,
            rows.clone()
        )
        .is_err());
        let mut bad = changed.rows[1].1.clone();
        bad[3] ^= 1;
        let damaged = vec![rows[0], bad.as_slice(), rows[2]];
        assert!(Pipeline::restore_rows(
            &cfg,
            Arc::new(AgentMetrics::default()),
            changed.fingerprint,
            damaged
        )
        .is_err());
    }

    #[test]
    fn series_limit_rejects_new_series_only() {
        let mut cfg = AgentConfig::with_id("gw");
        cfg.pipeline.max_series = 1;
        let m = Arc::new(AgentMetrics::default());
        let mut p = Pipeline::new(&cfg, m.clone()).unwrap();
        p.handle(b"sensors/a/t", br#"{"value":1,"ts":1000}"#, 0)
            .unwrap();
        assert_eq!(
            p.handle(b"sensors/b/t", br#"{"value":1,"ts":1000}"#, 0)
                .unwrap_err()
                .reason(),
            "too_many_series"
        );
        p.handle(b"sensors/a/t", br#"{"value":1,"ts":2000}"#, 0)
            .unwrap();
        assert_eq!(p.series(), 1);
    }

    #[test]
    fn short_and_long_series_keys_are_found_and_kept_apart() {
        let (mut p, m) = pipeline();
        let long = "d".repeat(200);
        for device in ["a", "ab", long.as_str(), &long[..199]] {
            for ts in [1_000, 2_000] {
                feed(&mut p, device, ts, 1.0);
            }
        }
        assert_eq!(p.series(), 4);
        assert_eq!(m.series.load(Relaxed), 4);
        let key = |k: &[u8]| SeriesKey::new(k);
        assert_eq!(key(b"a\0t"), key(b"a\0t"));
        assert_ne!(key(b"a\0t"), key(b"a\0u"));
        assert_eq!(key(long.as_bytes()).as_bytes(), long.as_bytes());
        assert!(matches!(key(long.as_bytes()), SeriesKey::Heap(_)));
    }

    #[test]
    fn partition_comes_from_the_device_id() {
        let (mut p, _) = pipeline();
        feed(&mut p, "pump-7", 1000, 1.0);
        p.flush();
        match &p.take_outputs()[0] {
            Output::Summary { partition, .. } => assert_eq!(*partition, partition_of("pump-7", 64)),
            o => panic!("{o:?}"),
        }
    }

    /// Readings and ticks over a few devices, some out of order (within and beyond the lateness).
    #[derive(Debug, Clone)]
    enum Step {
        Reading {
            device: u8,
            advance_ms: i64,
            lag_ms: i64,
            value: f64,
        },
        Tick,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            12 => (0u8..4, 0i64..3_000, prop_oneof![4 => Just(0i64), 1 => 0i64..20_000], -50.0f64..50.0)
                .prop_map(|(device, advance_ms, lag_ms, value)| Step::Reading { device, advance_ms, lag_ms, value }),
            1 => Just(Step::Tick),
        ]
    }

    fn snapshot_config() -> AgentConfig {
        let mut cfg = AgentConfig::with_id("gw-snap");
        cfg.window.size_ms = 10_000;
        cfg.window.allowed_lateness_ms = 5_000;
        cfg.window.idle_timeout_ms = 30_000;
        cfg
    }

    fn run(p: &mut Pipeline, clock: &mut i64, s: &Step) -> Vec<Output> {
        match *s {
            Step::Reading {
                device,
                advance_ms,
                lag_ms,
                value,
            } => {
                *clock += advance_ms;
                feed(p, &format!("dev-{device}"), *clock - lag_ms, value);
            }
            Step::Tick => p.tick(*clock),
        }
        p.take_outputs()
    }

    fn counters(m: &AgentMetrics) -> [u64; 5] {
        [
            m.readings_total.load(Relaxed),
            m.late_readings_total.load(Relaxed),
            m.corrections_total.load(Relaxed),
            m.windows_total.load(Relaxed),
            m.anomalies_total.load(Relaxed),
        ]
    }

    /// Feeds `steps` to one pipeline, snapshots it after `at` of them, restores a second one, and
    /// requires both to produce exactly the same outputs for the rest (and the same final state).
    fn check_restore_is_exact(cfg: &AgentConfig, steps: &[Step], at: usize) {
        let m = Arc::new(AgentMetrics::default());
        let mut a = Pipeline::new(cfg, m.clone()).unwrap();
        let mut clock = 1_700_000_000_000;
        for s in &steps[..at] {
            run(&mut a, &mut clock, s);
        }
        let bytes = a.snapshot().unwrap();
        let at_snapshot = counters(&m);
        let mb = Arc::new(AgentMetrics::default());
        let mut b = Pipeline::restore(cfg, mb.clone(), &bytes).unwrap();
        assert_eq!(b.series(), a.series());
        assert_eq!(mb.series.load(Relaxed), a.series() as u64);
        assert_eq!(
            b.snapshot().unwrap(),
            bytes,
            "restored state re-encodes identically"
        );
        let mut clock_b = clock;
        for (i, s) in steps[at..].iter().enumerate() {
            let (oa, ob) = (run(&mut a, &mut clock, s), run(&mut b, &mut clock_b, s));
            assert_eq!(oa, ob, "step {} ({s:?})", at + i);
        }
        a.flush();
        b.flush();
        assert_eq!(a.take_outputs(), b.take_outputs(), "flush");
        assert_eq!(a.snapshot().unwrap(), b.snapshot().unwrap());
        let (ca, cb) = (counters(&m), counters(&mb));
        for k in 0..ca.len() {
            assert_eq!(ca[k] - at_snapshot[k], cb[k], "counter {k}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        #[test]
        fn a_restored_pipeline_produces_exactly_the_outputs_of_the_original(
            steps in proptest::collection::vec(step(), 1..300),
            at in 0.0f64..1.0,
        ) {
            let at = ((steps.len() as f64) * at) as usize;
            check_restore_is_exact(&snapshot_config(), &steps, at);
        }
    }

    #[test]
    fn every_detector_preset_survives_a_snapshot_mid_stream() {
        let steps: Vec<Step> = (0..600)
            .map(|i| match i % 50 {
                49 => Step::Tick,
                _ => Step::Reading {
                    device: (i % 3) as u8,
                    advance_ms: 700,
                    lag_ms: if i % 17 == 0 { 12_000 } else { 0 },
                    value: ((i * 7919) % 101) as f64 + if i % 97 == 0 { 400.0 } else { 0.0 },
                },
            })
            .collect();
        for name in DetectorConfig::PRESETS {
            let mut cfg = snapshot_config();
            cfg.detector = DetectorConfig::preset(name).unwrap();
            check_restore_is_exact(&cfg, &steps, 400);
        }
    }

    fn sample_snapshot() -> (AgentConfig, Vec<u8>) {
        let cfg = snapshot_config();
        let mut p = Pipeline::new(&cfg, Arc::new(AgentMetrics::default())).unwrap();
        let mut clock = 1_700_000_000_000;
        for i in 0..40 {
            let s = Step::Reading {
                device: i % 3,
                advance_ms: 900,
                lag_ms: if i % 7 == 0 { 11_000 } else { 0 },
                value: f64::from(i),
            };
            run(&mut p, &mut clock, &s);
        }
        (cfg, p.snapshot().unwrap())
    }

    fn restore_err(cfg: &AgentConfig, bytes: &[u8]) -> SnapshotError {
        match Pipeline::restore(cfg, Arc::new(AgentMetrics::default()), bytes) {
            Err(AgentError::Snapshot(e)) => e,
            Err(e) => panic!("not a snapshot error: {e}"),
            Ok(_) => panic!("restored from {} bad bytes", bytes.len()),
        }
    }

    /// `body` framed with a valid version, fingerprint and checksum.
    fn frame(fingerprint: u64, body: &[u8]) -> Vec<u8> {
        let mut out = vec![SNAPSHOT_VERSION];
        out.extend_from_slice(&fingerprint.to_le_bytes());
        out.extend_from_slice(body);
        let sum = xxh3_64(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    #[test]
    fn truncated_or_damaged_snapshots_are_errors_not_panics() {
        let (cfg, bytes) = sample_snapshot();
        for len in 0..bytes.len() {
            let e = restore_err(&cfg, &bytes[..len]);
            assert!(
                matches!(
                    e,
                    SnapshotError::Truncated { .. }
                        | SnapshotError::Checksum { .. }
                        | SnapshotError::Version { .. }
                ),
                "{len}: {e}"
            );
        }
        for i in (0..bytes.len()).step_by(7) {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            restore_err(&cfg, &bad);
        }
        let mut bad = bytes.clone();
        bad[0] = SNAPSHOT_VERSION + 1;
        assert!(restore_err(&cfg, &bad)
            .to_string()
            .contains(&format!("version {}", SNAPSHOT_VERSION + 1)));
        let mut longer = bytes.clone();
        longer.push(0);
        restore_err(&cfg, &longer);
    }

    #[test]
    fn a_body_that_passes_the_checksum_but_does_not_decode_is_an_error() {
        let (cfg, bytes) = sample_snapshot();
        let fp = u64::from_le_bytes(bytes[1..9].try_into().unwrap());
        let body = &bytes[9..bytes.len() - 8];
        // Cut short, extended, and damaged bodies with a recomputed checksum.
        for cut in [0, 1, body.len() / 2, body.len() - 1] {
            let e = restore_err(&cfg, &frame(fp, &body[..cut]));
            assert!(matches!(e, SnapshotError::Invalid { .. }), "{e}");
        }
        let mut longer = body.to_vec();
        longer.push(7);
        assert!(restore_err(&cfg, &frame(fp, &longer))
            .to_string()
            .contains("1 bytes after the body"));
        for i in 0..body.len() {
            let mut bad = body.to_vec();
            bad[i] = bad[i].wrapping_add(0x81);
            // May decode into other (valid) state; must never panic.
            let _ = Pipeline::restore(&cfg, Arc::new(AgentMetrics::default()), &frame(fp, &bad));
        }
    }

    #[test]
    fn a_version_4_snapshot_from_before_the_compact_ensemble_is_refused_naming_both_versions() {
        let (cfg, bytes) = sample_snapshot();
        let mut old = bytes.clone();
        old[0] = 4;
        let sum = xxh3_64(&old[..old.len() - 8]);
        let n = old.len();
        old[n - 8..].copy_from_slice(&sum.to_le_bytes());
        let e = restore_err(&cfg, &old);
        assert_eq!(
            e.to_string(),
            "snapshot format version 4 is not the supported version 5"
        );
        // Rows carry no version byte: their fingerprint (which covers the version) refuses them.
        let mut p = Pipeline::new(&cfg, Arc::new(AgentMetrics::default())).unwrap();
        let rows = p.take_changed().unwrap();
        let e = Pipeline::restore_rows(
            &cfg,
            Arc::new(AgentMetrics::default()),
            rows.fingerprint ^ 1,
            Vec::<&[u8]>::new(),
        )
        .err()
        .expect("another fingerprint is refused");
        assert!(e.to_string().contains("another state layout"), "{e}");
    }

    #[test]
    fn a_snapshot_under_another_window_detector_or_partition_config_is_incompatible() {
        let (cfg, bytes) = sample_snapshot();
        let mut changes: Vec<AgentConfig> = Vec::new();
        let mut c = cfg.clone();
        c.window.size_ms = 20_000;
        changes.push(c);
        let mut c = cfg.clone();
        c.window.allowed_lateness_ms = 0;
        changes.push(c);
        let mut c = cfg.clone();
        c.uplink.partitions = 8;
        changes.push(c);
        let mut c = cfg.clone();
        c.detector = DetectorConfig::preset("zscore").unwrap();
        changes.push(c);
        for c in &changes {
            let e = restore_err(c, &bytes);
            assert!(matches!(e, SnapshotError::Incompatible { .. }), "{e}");
            assert!(
                e.to_string()
                    .contains("another window, detector or partitions"),
                "{e}"
            );
        }
        // Settings the state does not depend on may change.
        let mut c = cfg.clone();
        c.window.idle_timeout_ms = 1_000;
        c.anomaly.threshold = Some(0.9);
        c.pipeline.max_series = 1;
        let p = Pipeline::restore(&c, Arc::new(AgentMetrics::default()), &bytes).unwrap();
        assert_eq!(p.series(), 3, "max_series limits new series only");
    }
}
