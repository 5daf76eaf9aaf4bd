//! The durable state of a partition owner, behind the small [`StateStore`] trait: the kept windows
//! of every (device, metric) series, keyed by window start, and the last applied seq of every lane
//! (agent, partition, epoch). [`SledStore`] keeps them in sled next to the instance; [`MemoryStore`] is
//! the reference model (and a "no persistence" mode); the NATS cluster mode adds a KV implementation.
//! Lanes evicted from the state ([`FleetState::take_evicted`]) are dropped from the store too, so
//! made-up epochs cannot grow it.
//!
//! Applying is idempotent with the same semantics as [`FleetState::apply_summary`]: a replay of a
//! window is a duplicate, a higher revision replaces it, at most `windows_per_series` newest windows
//! are kept, and a window older than all kept ones of a full series is expired and not stored.
//!
//! Durability: sled writes are **not** durable until flushed. Call [`StateStore::flush`] after
//! storing a batch and send acks only after it returned `Ok`. Within a batch, store the windows
//! before the lane seq that covers them: this assumes sled recovers unflushed writes in order
//! after a crash (its log is replayed in order), so a recovered lane seq never covers a lost window.
//!
//! Not owned here: the async consumer, sending acks, anomaly events and the cumulative counters
//! of [`FleetState`] (`windows_applied`, `readings`, `anomalies`), which are not persisted; see
//! [`rebuild`].

use crate::state::{Applied, FleetState, LaneId};
use edgewatch_models::wire::WindowSummary;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What a partition owner persists. Implementations: [`SledStore`] and [`MemoryStore`].
pub trait StateStore: Send {
    /// Stores a window keyed by (device, metric, start_ms); keeps the higher revision; returns
    /// what happened.
    fn put_window(
        &mut self,
        partition: u32,
        summary: &WindowSummary,
    ) -> Result<Applied, StoreError>;
    /// Records that `lane` is applied up to `seq` (never moves backwards).
    fn put_lane_seq(&mut self, lane: LaneId<'_>, seq: u64) -> Result<(), StoreError>;
    /// Forgets `lane` (evicted from the state by newer epochs of its agent and partition).
    fn drop_lane(&mut self, lane: LaneId<'_>) -> Result<(), StoreError>;
    /// Makes everything put so far durable. Acks may be sent only after this returns Ok.
    fn flush(&mut self) -> Result<(), StoreError>;
    /// Everything stored, to rebuild the in-memory state after a restart.
    fn load(&self) -> Result<Snapshot, StoreError>;
    /// Lane seqs only (for acks), as in [`Snapshot::lanes`].
    fn lane_seqs(&self) -> Result<Vec<StoredLane>, StoreError>;
    /// Stores a device's training set (`changed`: the `from_ms` of the sample just added or
    /// replaced). Stores without durable state keep nothing.
    fn put_training(
        &mut self,
        _set: &edgewatch_models::multi::DeviceSet,
        _changed: Option<i64>,
    ) -> Result<(), StoreError> {
        Ok(())
    }
    /// Stores a fitted device model.
    fn put_model(&mut self, _model: &crate::training::StoredModel) -> Result<(), StoreError> {
        Ok(())
    }
    /// Every stored training set and device model.
    fn load_training(&self) -> Result<TrainingSnapshot, StoreError> {
        Ok(Default::default())
    }
}

/// Training sets and fitted device models, as stored.
pub type TrainingSnapshot = (
    Vec<edgewatch_models::multi::DeviceSet>,
    Vec<crate::training::StoredModel>,
);

/// A stored lane: (agent, partition, epoch, last applied seq).
pub type StoredLane = (String, u32, u64, u64);

/// Everything a store holds, in a canonical order: windows sorted by (device, metric, start_ms),
/// lanes by (agent, partition, epoch).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Kept windows with their partition.
    pub windows: Vec<(u32, WindowSummary)>,
    /// (agent, partition, epoch, last applied seq).
    pub lanes: Vec<StoredLane>,
}

/// Errors of a state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be opened (held by another process, no permission, disk failure).
    #[error(
        "state store {path}: cannot open: {source} (retrying helps only once the cause is fixed)"
    )]
    Open {
        /// The store's directory.
        path: PathBuf,
        /// The sled error.
        source: sled::Error,
    },
    /// A read, write or flush failed in sled; I/O errors may be transient, others are not.
    #[error(
        "state store {path}: {op} {key} failed: {source} ({})",
        retry_hint(source)
    )]
    Sled {
        /// The store's directory.
        path: PathBuf,
        /// What was being done (`read`, `write`, `flush`, `scan`).
        op: &'static str,
        /// The key or tree concerned, printable.
        key: String,
        /// The sled error.
        source: sled::Error,
    },
    /// A stored key or value cannot be decoded: the data on disk is damaged. Retrying never helps.
    #[error("state store {path}: corrupt entry {key}: {reason} (retrying will not help)")]
    Corrupt {
        /// The store's directory (or `memory`).
        path: PathBuf,
        /// The key concerned, printable.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The summary cannot be stored as given (over-long id, non-finite number). Retrying never helps.
    #[error("window {key}: cannot store: {reason} (retrying will not help)")]
    Invalid {
        /// The window concerned, printable.
        key: String,
        /// Why it was refused.
        reason: String,
    },
    /// The partition is not owned by this instance (cluster mode): nothing is stored for it.
    #[error("partition {partition}: not owned here (it moved to another aggregator); not stored")]
    NotOwned {
        /// The partition.
        partition: u32,
    },
    /// Writing a partition checkpoint to the cluster's KV failed (cluster mode). Retryable unless
    /// the partition was fenced (taken over), which drops it.
    #[error("partition {partition}: checkpoint failed: {reason}")]
    Checkpoint {
        /// The partition.
        partition: u32,
        /// What failed.
        reason: String,
        /// Whether a later write may succeed (false when another owner took the partition).
        retryable: bool,
    },
    /// Writing to the cluster's training bucket failed (the fleet trainer, cluster mode).
    /// Retryable unless a newer trainer took training over.
    #[error("training bucket: {reason}")]
    Training {
        /// What failed, with the key.
        reason: String,
        /// Whether a later write may succeed.
        retryable: bool,
    },
}

fn retry_hint(e: &sled::Error) -> &'static str {
    match e {
        sled::Error::Io(_) => "retry with backoff",
        _ => "retrying will not help",
    }
}

impl StoreError {
    /// Whether retrying the same call later may succeed (transient I/O only).
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Open { source, .. } | StoreError::Sled { source, .. } => {
                matches!(source, sled::Error::Io(_))
            }
            StoreError::Corrupt { .. }
            | StoreError::Invalid { .. }
            | StoreError::NotOwned { .. } => false,
            StoreError::Checkpoint { retryable, .. } | StoreError::Training { retryable, .. } => {
                *retryable
            }
        }
    }
}

/// The printable name of a window key.
fn window_name(device: &str, metric: &str, start_ms: i64) -> String {
    format!("windows/{device:?}/{metric:?}/{start_ms}")
}

/// The printable name of a lane key.
fn lane_name(agent: &str, partition: u32, epoch: u64) -> String {
    format!("lanes/{agent:?}/{partition}/{epoch}")
}

/// Refuses what could not be stored or loaded back: ids too long for the u16 length prefix, and
/// non-finite numbers (JSON writes them as `null`, which would not load).
fn validate(s: &WindowSummary) -> Result<(), StoreError> {
    let invalid = |reason: String| StoreError::Invalid {
        key: window_name(&s.device, &s.metric, s.start_ms),
        reason,
    };
    for (what, v) in [("device id", &s.device), ("metric", &s.metric)] {
        if v.len() > usize::from(u16::MAX) {
            return Err(invalid(format!(
                "{what} is {} bytes, at most {} allowed",
                v.len(),
                u16::MAX
            )));
        }
    }
    for (what, v) in [
        ("min", s.min),
        ("max", s.max),
        ("mean", s.mean),
        ("std", s.std),
        ("max_score", s.max_score),
    ] {
        if !v.is_finite() {
            return Err(invalid(format!("{what} must be finite, got {v}")));
        }
    }
    Ok(())
}

/// `len(u16 BE) ++ device ++ len(u16 BE) ++ metric`: the key prefix of one series. The caller has
/// validated the lengths.
fn series_prefix(device: &str, metric: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + device.len() + metric.len() + 8);
    for part in [device, metric] {
        // Cannot truncate: `validate` refused parts longer than u16::MAX.
        k.extend_from_slice(&(part.len() as u16).to_be_bytes());
        k.extend_from_slice(part.as_bytes());
    }
    k
}

/// The series prefix followed by `start_ms` as big-endian with the sign bit flipped, so byte
/// order is numeric order.
fn window_key(device: &str, metric: &str, start_ms: i64) -> Vec<u8> {
    let mut k = series_prefix(device, metric);
    k.extend_from_slice(&((start_ms as u64) ^ (1 << 63)).to_be_bytes());
    k
}

/// Decodes a window key into (device, metric, start_ms).
fn decode_window_key(k: &[u8]) -> Option<(String, String, i64)> {
    fn part(k: &[u8]) -> Option<(String, &[u8])> {
        let len = usize::from(u16::from_be_bytes(k.get(..2)?.try_into().ok()?));
        let bytes = k.get(2..2 + len)?;
        Some((String::from_utf8(bytes.to_vec()).ok()?, &k[2 + len..]))
    }
    let (device, rest) = part(k)?;
    let (metric, rest) = part(rest)?;
    let start: [u8; 8] = rest.try_into().ok()?;
    Some((
        device,
        metric,
        (u64::from_be_bytes(start) ^ (1 << 63)) as i64,
    ))
}

/// `agent ++ 0x00 ++ partition (u32 BE) ++ epoch (u64 BE)`, the key of the `lane_epochs` tree.
/// Decoded from the end, so an agent id may hold 0x00.
fn lane_key(agent: &str, partition: u32, epoch: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(agent.len() + 13);
    k.extend_from_slice(agent.as_bytes());
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k.extend_from_slice(&epoch.to_be_bytes());
    k
}

fn decode_lane_key(k: &[u8]) -> Option<(String, u32, u64)> {
    let split = k.len().checked_sub(13)?;
    let (agent, rest) = k.split_at(split);
    let (&sep, rest) = rest.split_first()?;
    let (partition, epoch) = rest.split_first_chunk::<4>()?;
    if sep != 0 {
        return None;
    }
    Some((
        String::from_utf8(agent.to_vec()).ok()?,
        u32::from_be_bytes(*partition),
        u64::from_be_bytes(epoch.try_into().ok()?),
    ))
}

/// `agent ++ 0x00 ++ partition (u32 BE)`: a key of the `lanes` tree of stores from before epochs
/// (read as epoch 0, never written).
fn legacy_lane_key(agent: &str, partition: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(agent.len() + 5);
    k.extend_from_slice(agent.as_bytes());
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

fn decode_legacy_lane_key(k: &[u8]) -> Option<(String, u32)> {
    let split = k.len().checked_sub(5)?;
    let (agent, rest) = k.split_at(split);
    if rest[0] != 0 {
        return None;
    }
    let partition = u32::from_be_bytes(rest[1..].try_into().ok()?);
    Some((String::from_utf8(agent.to_vec()).ok()?, partition))
}

/// A printable name of a raw key that did not decode.
fn hex(k: &[u8]) -> String {
    k.iter().map(|b| format!("{b:02x}")).collect()
}

/// `partition (u32 BE) ++ serde_json(summary)`.
fn encode_window_value(partition: u32, s: &WindowSummary) -> Result<Vec<u8>, StoreError> {
    let mut v = partition.to_be_bytes().to_vec();
    serde_json::to_writer(&mut v, s).map_err(|e| StoreError::Invalid {
        key: window_name(&s.device, &s.metric, s.start_ms),
        reason: format!("cannot encode: {e}"),
    })?;
    Ok(v)
}

/// The canonical order of windows: by (device, metric, start). Rebuilding state in this order
/// makes every kept window new and none evict another.
pub(crate) fn window_order(a: &WindowSummary, b: &WindowSummary) -> std::cmp::Ordering {
    (&a.device, &a.metric, a.start_ms).cmp(&(&b.device, &b.metric, b.start_ms))
}

/// Ordering of the canonical snapshot.
pub(crate) fn sort_snapshot(s: &mut Snapshot) {
    s.windows.sort_by(|(_, a), (_, b)| window_order(a, b));
    s.lanes.sort();
}

/// The reference model: everything in memory, lost on drop. `flush` does nothing. Cluster mode
/// keeps one per owned partition as the state its checkpoints serialise.
#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    series: BTreeMap<(String, String), BTreeMap<i64, (u32, WindowSummary)>>,
    lanes: BTreeMap<(String, u32, u64), u64>,
    windows_per_series: usize,
}

impl MemoryStore {
    /// An empty store keeping `windows_per_series` (at least 1) newest windows per series.
    pub fn new(windows_per_series: usize) -> Self {
        Self {
            windows_per_series: windows_per_series.max(1),
            ..Self::default()
        }
    }
}

impl MemoryStore {
    /// The kept window of (`device`, `metric`) starting at `start_ms`, if any (what an incremental
    /// checkpoint writes for a window that changed).
    pub fn window(&self, device: &str, metric: &str, start_ms: i64) -> Option<&WindowSummary> {
        self.series
            .get(&(device.to_string(), metric.to_string()))
            .and_then(|s| s.get(&start_ms))
            .map(|(_, w)| w)
    }
}

impl StateStore for MemoryStore {
    fn put_window(&mut self, partition: u32, s: &WindowSummary) -> Result<Applied, StoreError> {
        validate(s)?;
        let series = self
            .series
            .entry((s.device.clone(), s.metric.clone()))
            .or_default();
        if let Some((p, existing)) = series.get_mut(&s.start_ms) {
            if s.revision > existing.revision {
                *p = partition;
                *existing = s.clone();
                return Ok(Applied::Revised);
            }
            return Ok(Applied::Duplicate);
        }
        let full = series.len() >= self.windows_per_series;
        if full
            && series
                .keys()
                .next()
                .is_some_and(|&oldest| s.start_ms < oldest)
        {
            return Ok(Applied::Expired);
        }
        series.insert(s.start_ms, (partition, s.clone()));
        while series.len() > self.windows_per_series {
            series.pop_first();
        }
        Ok(Applied::New)
    }

    fn put_lane_seq(&mut self, lane: LaneId<'_>, seq: u64) -> Result<(), StoreError> {
        let e = self
            .lanes
            .entry((lane.agent.to_string(), lane.partition, lane.epoch))
            .or_default();
        *e = (*e).max(seq);
        Ok(())
    }

    fn drop_lane(&mut self, lane: LaneId<'_>) -> Result<(), StoreError> {
        self.lanes
            .remove(&(lane.agent.to_string(), lane.partition, lane.epoch));
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    fn load(&self) -> Result<Snapshot, StoreError> {
        let mut s = Snapshot {
            windows: self
                .series
                .values()
                .flat_map(|w| w.values().cloned())
                .collect(),
            lanes: self.lane_seqs()?,
        };
        sort_snapshot(&mut s);
        Ok(s)
    }

    fn lane_seqs(&self) -> Result<Vec<StoredLane>, StoreError> {
        Ok(self
            .lanes
            .iter()
            .map(|((a, p, e), s)| (a.clone(), *p, *e, *s))
            .collect())
    }
}

/// How long [`SledStore::open`] retries a lock still held by a dropped handle, and
/// [`SledStore::close`] waits for it to go.
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// Whether a sled open error is the directory lock being held.
fn is_lock_error(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

/// Opens sled at `path`. sled releases its directory lock from background threads a moment after
/// the last handle is dropped, so a reopen in the same process right after a drop may find it still
/// held ("could not acquire lock ... WouldBlock"): that error is retried for up to [`LOCK_WAIT`].
/// A store held by a live handle (or another process) still fails, after that wait.
fn open_db(path: &Path) -> sled::Result<sled::Db> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match sled::Config::new().path(path).open() {
            Err(e) if is_lock_error(&e) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            other => return other,
        }
    }
}

/// Waits (up to [`LOCK_WAIT`]) until nobody holds sled's lock on the `db` file under `path`: the
/// same exclusive `flock` sled takes, taken and released at once.
fn wait_unlocked(path: &Path) {
    let Ok(file) = std::fs::File::open(path.join("db")) else {
        return; // nothing was ever created there, so nothing is locked
    };
    let deadline = Instant::now() + LOCK_WAIT;
    while Instant::now() < deadline {
        match file.try_lock() {
            Ok(()) => {
                // Dropping `file` below releases it as well; an unlock error changes nothing.
                let _ = file.unlock();
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// The sled store: a `windows` tree keyed by [`window_key`] and a `lane_epochs` tree keyed by
/// [`lane_key`] holding the seq as u64 BE. A `lanes` tree of a store from before epochs (keyed by
/// [`legacy_lane_key`]) is still read, as epoch 0, and never written again: a lane in both trees
/// has the higher seq. Writes are not durable until [`StateStore::flush`].
pub struct SledStore {
    path: PathBuf,
    db: sled::Db,
    windows: sled::Tree,
    lanes: sled::Tree,
    legacy_lanes: sled::Tree,
    training: crate::training::store::TrainingTrees,
    windows_per_series: usize,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore")
            .field("path", &self.path)
            .field("windows_per_series", &self.windows_per_series)
            .finish_non_exhaustive()
    }
}

impl SledStore {
    /// Opens (or creates) the store in directory `path`, keeping `windows_per_series` (at least 1)
    /// newest windows per series. A series holding more (a smaller setting than before) is trimmed
    /// on its next insert.
    pub fn open(path: &Path, windows_per_series: usize) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let db = open_db(path).map_err(open_err)?;
        let windows = db.open_tree("windows").map_err(open_err)?;
        let lanes = db.open_tree("lane_epochs").map_err(open_err)?;
        let legacy_lanes = db.open_tree("lanes").map_err(open_err)?;
        let training = crate::training::store::TrainingTrees::open(&db).map_err(open_err)?;
        Ok(Self {
            path: path.to_path_buf(),
            db,
            windows,
            lanes,
            legacy_lanes,
            training,
            windows_per_series: windows_per_series.max(1),
        })
    }

    /// Flushes, drops every handle and waits (up to [`LOCK_WAIT`]) until sled's background threads
    /// have let go of the directory lock, so the next [`SledStore::open`] of `path` — in this
    /// process or another — finds it free. Dropping the store without `close` is fine too: `open`
    /// retries the lock for as long.
    pub fn close(self) -> Result<(), StoreError> {
        let Self {
            path,
            db,
            windows,
            lanes,
            legacy_lanes,
            training,
            ..
        } = self;
        let flushed = db.flush().map(|_| ()).map_err(|source| StoreError::Sled {
            path: path.clone(),
            op: "flush",
            key: "all trees".into(),
            source,
        });
        drop((windows, lanes, legacy_lanes, training, db));
        wait_unlocked(&path);
        flushed
    }

    fn sled_err(&self, op: &'static str, key: String) -> impl FnOnce(sled::Error) -> StoreError {
        let path = self.path.clone();
        move |source| StoreError::Sled {
            path,
            op,
            key,
            source,
        }
    }

    fn corrupt(&self, key: String, reason: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            key,
            reason: reason.into(),
        }
    }

    /// Decodes one entry of the `windows` tree and checks that key and value agree.
    fn decode_window(&self, k: &[u8], v: &[u8]) -> Result<(u32, WindowSummary), StoreError> {
        let Some((device, metric, start_ms)) = decode_window_key(k) else {
            return Err(self.corrupt(format!("windows/0x{}", hex(k)), "undecodable key"));
        };
        let name = window_name(&device, &metric, start_ms);
        let Some((p, json)) = v.split_first_chunk::<4>() else {
            return Err(self.corrupt(name, format!("value is {} bytes, too short", v.len())));
        };
        let s: WindowSummary = serde_json::from_slice(json)
            .map_err(|e| self.corrupt(name.clone(), format!("bad summary json: {e}")))?;
        if s.device != device || s.metric != metric || s.start_ms != start_ms {
            return Err(self.corrupt(
                name,
                format!(
                    "value is window {}",
                    window_name(&s.device, &s.metric, s.start_ms)
                ),
            ));
        }
        Ok((u32::from_be_bytes(*p), s))
    }

    fn decode_lane(&self, k: &[u8], v: &[u8]) -> Result<StoredLane, StoreError> {
        let Some((agent, partition, epoch)) = decode_lane_key(k) else {
            return Err(self.corrupt(format!("lanes/0x{}", hex(k)), "undecodable key"));
        };
        let seq = self.decode_seq(&lane_name(&agent, partition, epoch), v)?;
        Ok((agent, partition, epoch, seq))
    }

    fn decode_legacy_lane(&self, k: &[u8], v: &[u8]) -> Result<StoredLane, StoreError> {
        let Some((agent, partition)) = decode_legacy_lane_key(k) else {
            return Err(self.corrupt(format!("lanes/0x{}", hex(k)), "undecodable key"));
        };
        let seq = self.decode_seq(&lane_name(&agent, partition, 0), v)?;
        Ok((agent, partition, 0, seq))
    }

    fn decode_seq(&self, name: &str, v: &[u8]) -> Result<u64, StoreError> {
        let seq: [u8; 8] = v.try_into().map_err(|_| {
            self.corrupt(
                name.to_string(),
                format!("seq is {} bytes, expected 8", v.len()),
            )
        })?;
        Ok(u64::from_be_bytes(seq))
    }
}

impl StateStore for SledStore {
    fn put_training(
        &mut self,
        set: &edgewatch_models::multi::DeviceSet,
        changed: Option<i64>,
    ) -> Result<(), StoreError> {
        self.training.put_set(&self.path, set, changed)
    }

    fn put_model(&mut self, model: &crate::training::StoredModel) -> Result<(), StoreError> {
        self.training.put_model(&self.path, model)
    }

    fn load_training(&self) -> Result<TrainingSnapshot, StoreError> {
        self.training.load(&self.path)
    }

    fn put_window(&mut self, partition: u32, s: &WindowSummary) -> Result<Applied, StoreError> {
        validate(s)?;
        let name = || window_name(&s.device, &s.metric, s.start_ms);
        let key = window_key(&s.device, &s.metric, s.start_ms);
        if let Some(old) = self
            .windows
            .get(&key)
            .map_err(self.sled_err("read", name()))?
        {
            let (_, existing) = self.decode_window(&key, &old)?;
            if s.revision > existing.revision {
                self.windows
                    .insert(key, encode_window_value(partition, s)?)
                    .map_err(self.sled_err("write", name()))?;
                return Ok(Applied::Revised);
            }
            return Ok(Applied::Duplicate);
        }
        let prefix = series_prefix(&s.device, &s.metric);
        let kept = self
            .windows
            .scan_prefix(&prefix)
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.sled_err("scan", name()))?;
        // Keys of one series sort by start, so the excess is at the front. The indexing cannot
        // panic: `windows_per_series >= 1`, so `excess <= kept.len()`.
        let excess = (kept.len() + 1).saturating_sub(self.windows_per_series);
        if excess > 0 && kept[excess - 1].as_ref() > key.as_slice() {
            // Among the oldest of a full series (older than every kept window, unless
            // `windows_per_series` shrank since the series was written).
            return Ok(Applied::Expired);
        }
        // Separate writes, not one `sled::Batch`: measured with `throughput_of_put_and_flush`,
        // `apply_batch` here cut throughput 3-4x. Oldest first, so a crash in between leaves the
        // series one window short, which the agent's resend of the unacknowledged window restores.
        let value = encode_window_value(partition, s)?;
        for k in &kept[..excess] {
            self.windows
                .remove(k)
                .map_err(self.sled_err("write", name()))?;
        }
        self.windows
            .insert(key, value)
            .map_err(self.sled_err("write", name()))?;
        Ok(Applied::New)
    }

    fn put_lane_seq(&mut self, lane: LaneId<'_>, seq: u64) -> Result<(), StoreError> {
        let key = lane_key(lane.agent, lane.partition, lane.epoch);
        let name = || lane_name(lane.agent, lane.partition, lane.epoch);
        if let Some(old) = self
            .lanes
            .get(&key)
            .map_err(self.sled_err("read", name()))?
        {
            if self.decode_seq(&name(), &old)? >= seq {
                return Ok(());
            }
        }
        self.lanes
            .insert(key, &seq.to_be_bytes())
            .map_err(self.sled_err("write", name()))?;
        Ok(())
    }

    fn drop_lane(&mut self, lane: LaneId<'_>) -> Result<(), StoreError> {
        let name = || lane_name(lane.agent, lane.partition, lane.epoch);
        self.lanes
            .remove(lane_key(lane.agent, lane.partition, lane.epoch))
            .map_err(self.sled_err("write", name()))?;
        if lane.epoch == 0 {
            self.legacy_lanes
                .remove(legacy_lane_key(lane.agent, lane.partition))
                .map_err(self.sled_err("write", name()))?;
        }
        Ok(())
    }

    /// `sled::Db::flush`: until it returns, nothing written is guaranteed to survive a crash.
    fn flush(&mut self) -> Result<(), StoreError> {
        self.db
            .flush()
            .map_err(self.sled_err("flush", "all trees".into()))?;
        Ok(())
    }

    fn load(&self) -> Result<Snapshot, StoreError> {
        let mut windows = Vec::new();
        for kv in self.windows.iter() {
            let (k, v) = kv.map_err(self.sled_err("scan", "windows".into()))?;
            windows.push(self.decode_window(&k, &v)?);
        }
        let mut s = Snapshot {
            windows,
            lanes: self.lane_seqs()?,
        };
        sort_snapshot(&mut s);
        Ok(s)
    }

    fn lane_seqs(&self) -> Result<Vec<StoredLane>, StoreError> {
        let mut lanes: BTreeMap<(String, u32, u64), u64> = BTreeMap::new();
        for kv in self.legacy_lanes.iter() {
            let (k, v) = kv.map_err(self.sled_err("scan", "lanes".into()))?;
            let (agent, partition, epoch, seq) = self.decode_legacy_lane(&k, &v)?;
            lanes.insert((agent, partition, epoch), seq);
        }
        for kv in self.lanes.iter() {
            let (k, v) = kv.map_err(self.sled_err("scan", "lane_epochs".into()))?;
            let (agent, partition, epoch, seq) = self.decode_lane(&k, &v)?;
            let e = lanes.entry((agent, partition, epoch)).or_default();
            *e = (*e).max(seq);
        }
        Ok(lanes
            .into_iter()
            .map(|((a, p, e), s)| (a, p, e, s))
            .collect())
    }
}

/// Rebuilds the in-memory state after a restart from a store's snapshot: every kept window, and
/// every lane at its stored seq (at most [`crate::state::MAX_EPOCHS`] per agent and partition: the
/// excess, if a drop was lost in a crash, is reported by [`FleetState::take_evicted`]).
///
/// Limit: the cumulative counters (`windows_applied`, `readings`) cover the kept windows only, not
/// windows dropped for `windows_per_series` before the restart; anomaly counters start at zero.
pub fn rebuild(snapshot: Snapshot, windows_per_series: usize) -> FleetState {
    let mut st = FleetState::new(windows_per_series);
    let mut lanes_of: HashMap<u32, Vec<(String, u64, u64)>> = HashMap::new();
    for (agent, partition, epoch, seq) in snapshot.lanes {
        lanes_of
            .entry(partition)
            .or_default()
            .push((agent, epoch, seq));
    }
    let mut windows = snapshot.windows;
    // Oldest first within a series, so every kept window is new and none evicts another.
    windows.sort_by(|(_, a), (_, b)| window_order(a, b));
    for (partition, w) in &windows {
        st.apply_window(*partition, w);
    }
    for (partition, lanes) in &lanes_of {
        for (agent, epoch, seq) in lanes {
            st.restore_lane(LaneId::new(agent, *partition, *epoch), *seq);
        }
    }
    st
}

impl FleetState {
    /// The state rebuilt from a store's snapshot after a restart; see [`rebuild`] for its limits.
    pub fn from_snapshot(snapshot: Snapshot, windows_per_series: usize) -> FleetState {
        rebuild(snapshot, windows_per_series)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn window(device: &str, metric: &str, start: i64, revision: u32) -> WindowSummary {
        // Content derived from (start, revision), so equal keys and revisions mean equal windows.
        let count = (start.rem_euclid(1000) as u64) * 10 + u64::from(revision) + 1;
        WindowSummary {
            device: device.into(),
            metric: metric.into(),
            start_ms: start,
            end_ms: start + 10,
            count,
            min: 0.0,
            max: count as f64,
            mean: count as f64 / 2.0,
            std: 0.25,
            first_ts_ms: start,
            last_ts_ms: start + 9,
            max_score: 0.5,
            revision,
        }
    }

    fn open(dir: &Path, wps: usize) -> SledStore {
        SledStore::open(dir, wps).unwrap()
    }

    #[test]
    fn reopening_right_after_close_or_drop_never_finds_the_lock_held() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..20 {
            let mut st = open(dir.path(), 10);
            st.put_window(1, &window("d", "m", i * 10, 0)).unwrap();
            if i % 2 == 0 {
                st.close().unwrap();
            } else {
                st.flush().unwrap();
                drop(st);
            }
        }
        assert_eq!(open(dir.path(), 10).load().unwrap().windows.len(), 10);
    }

    #[test]
    fn a_store_held_by_a_live_handle_still_fails_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let _held = open(dir.path(), 10);
        let t = Instant::now();
        let err = SledStore::open(dir.path(), 10).unwrap_err();
        assert!(
            matches!(&err, StoreError::Open { source, .. } if is_lock_error(source)),
            "{err}"
        );
        assert!(t.elapsed() >= LOCK_WAIT, "{:?}", t.elapsed());
    }

    fn starts(snap: &Snapshot) -> Vec<i64> {
        snap.windows.iter().map(|(_, w)| w.start_ms).collect()
    }

    #[test]
    fn replay_of_the_same_window_is_a_duplicate_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = open(dir.path(), 10);
        let w = window("d", "m", 0, 0);
        assert_eq!(st.put_window(1, &w).unwrap(), Applied::New);
        st.put_lane_seq(LaneId::new("a", 1, 0), 1).unwrap();
        let before = st.load().unwrap();
        assert_eq!(st.put_window(1, &w).unwrap(), Applied::Duplicate);
        st.put_lane_seq(LaneId::new("a", 1, 0), 1).unwrap();
        assert_eq!(st.load().unwrap(), before);
        assert_eq!(before.windows, vec![(1, w)]);
    }

    #[test]
    fn higher_revision_replaces_and_lower_is_a_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = open(dir.path(), 10);
        st.put_window(1, &window("d", "m", 0, 1)).unwrap();
        assert_eq!(
            st.put_window(1, &window("d", "m", 0, 2)).unwrap(),
            Applied::Revised
        );
        assert_eq!(
            st.put_window(1, &window("d", "m", 0, 0)).unwrap(),
            Applied::Duplicate
        );
        assert_eq!(
            st.load().unwrap().windows,
            vec![(1, window("d", "m", 0, 2))]
        );
    }

    #[test]
    fn lane_seq_never_goes_backwards() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = open(dir.path(), 10);
        st.put_lane_seq(LaneId::new("a", 3, 0), 7).unwrap();
        st.put_lane_seq(LaneId::new("a", 3, 0), 5).unwrap();
        st.put_lane_seq(LaneId::new("b", 3, 0), 1).unwrap();
        assert_eq!(
            st.lane_seqs().unwrap(),
            vec![("a".to_string(), 3, 0, 7), ("b".to_string(), 3, 0, 1)]
        );
        st.put_lane_seq(LaneId::new("a", 3, 0), 9).unwrap();
        assert_eq!(st.lane_seqs().unwrap()[0], ("a".to_string(), 3, 0, 9));
    }

    #[test]
    fn lanes_of_several_epochs_round_trip_and_can_be_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = open(dir.path(), 10);
        let mut mem = MemoryStore::new(10);
        let stores: [&mut dyn StateStore; 2] = [&mut st, &mut mem];
        for store in stores {
            store.put_lane_seq(LaneId::new("a", 3, 0), 7).unwrap();
            store
                .put_lane_seq(LaneId::new("a", 3, u64::MAX), 2)
                .unwrap();
            store.put_lane_seq(LaneId::new("a", 3, 42), 9).unwrap();
            store.put_lane_seq(LaneId::new("a", 3, 42), 8).unwrap();
            store.drop_lane(LaneId::new("a", 3, 0)).unwrap();
            store.drop_lane(LaneId::new("never", 1, 5)).unwrap();
        }
        let want = vec![
            ("a".to_string(), 3, 42, 9),
            ("a".to_string(), 3, u64::MAX, 2),
        ];
        assert_eq!(mem.lane_seqs().unwrap(), want);
        st.flush().unwrap();
        drop(st);
        let st = open(dir.path(), 10);
        assert_eq!(st.lane_seqs().unwrap(), want);
        let rebuilt = rebuild(st.load().unwrap(), 10);
        assert_eq!(rebuilt.lane_seq(LaneId::new("a", 3, 42)), Some(9));
        assert_eq!(rebuilt.lane_seq(LaneId::new("a", 3, 0)), None);
    }

    #[test]
    fn lanes_stored_before_epochs_are_read_as_epoch_zero() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = open(dir.path(), 10);
        // What an older version wrote: `lanes` keyed agent ++ 0 ++ partition.
        st.legacy_lanes
            .insert(legacy_lane_key("gw-1", 5), &40u64.to_be_bytes())
            .unwrap();
        st.legacy_lanes
            .insert(legacy_lane_key("gw-2", 6), &3u64.to_be_bytes())
            .unwrap();
        st.flush().unwrap();
        drop(st);
        let mut st = open(dir.path(), 10);
        assert_eq!(
            st.lane_seqs().unwrap(),
            vec![
                ("gw-1".to_string(), 5, 0, 40),
                ("gw-2".to_string(), 6, 0, 3)
            ]
        );
        // The same lane moves on in the new tree; the higher seq wins; a drop clears both.
        st.put_lane_seq(LaneId::new("gw-1", 5, 0), 41).unwrap();
        st.put_lane_seq(LaneId::new("gw-2", 6, 0), 2).unwrap();
        assert_eq!(
            st.lane_seqs().unwrap(),
            vec![
                ("gw-1".to_string(), 5, 0, 41),
                ("gw-2".to_string(), 6, 0, 3)
            ]
        );
        st.drop_lane(LaneId::new("gw-2", 6, 0)).unwrap();
        assert_eq!(st.lane_seqs().unwrap().len(), 1);
        let rebuilt = rebuild(st.load().unwrap(), 10);
        assert_eq!(rebuilt.lane_seq(LaneId::new("gw-1", 5, 0)), Some(41));
    }

    #[test]
    fn reopen_after_drop_restores_windows_and_lane_seqs_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = open(dir.path(), 10);
        for i in 0..5 {
            st.put_window(i % 2, &window(&format!("d{i}"), "m", i64::from(i) * 10, i))
                .unwrap();
            st.put_lane_seq(LaneId::new("a", i % 2, 0), u64::from(i) + 1)
                .unwrap();
        }
        st.put_window(0, &window("neg", "m", -20, 0)).unwrap();
        st.flush().unwrap();
        let before = st.load().unwrap();
        drop(st);
        let st = open(dir.path(), 10);
        assert_eq!(st.load().unwrap(), before);
        assert_eq!(before.windows.len(), 6);
        assert_eq!(
            before.lanes,
            vec![("a".to_string(), 0, 0, 5), ("a".to_string(), 1, 0, 4)]
        );
    }

    #[test]
    fn only_the_newest_windows_per_series_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = open(dir.path(), 3);
        let mut mem = MemoryStore::new(3);
        // Negative starts check the sign-flipped key order.
        for start in [-30, 10, -10, 20, 0] {
            let w = window("d", "m", start, 0);
            assert_eq!(
                st.put_window(0, &w).unwrap(),
                mem.put_window(0, &w).unwrap()
            );
        }
        st.put_window(0, &window("d", "other", -100, 0)).unwrap();
        let snap = st.load().unwrap();
        assert_eq!(starts(&snap), vec![0, 10, 20, -100]);
        assert_eq!(
            st.put_window(0, &window("d", "m", -10, 0)).unwrap(),
            Applied::Expired
        );
        assert_eq!(st.load().unwrap(), snap);
        assert_eq!(
            st.put_window(0, &window("d", "m", 30, 0)).unwrap(),
            Applied::New
        );
        assert_eq!(starts(&st.load().unwrap()), vec![10, 20, 30, -100]);
        // Reopened with a smaller setting, a series is trimmed on its next insert.
        st.flush().unwrap();
        drop(st);
        let mut st = open(dir.path(), 2);
        assert_eq!(
            st.put_window(0, &window("d", "m", 15, 0)).unwrap(),
            Applied::Expired
        );
        assert_eq!(
            st.put_window(0, &window("d", "m", 25, 0)).unwrap(),
            Applied::New
        );
        assert_eq!(starts(&st.load().unwrap()), vec![25, 30, -100]);
    }

    #[test]
    fn device_ids_with_slashes_spaces_nul_and_non_ascii_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let ids = [
            "plant/3/pump 7",
            "nul\0inside",
            "\0",
            "",
            "ünïcödé-😀-温度",
            &"x".repeat(256),
        ];
        let mut st = open(dir.path(), 4);
        for (i, id) in ids.iter().enumerate() {
            st.put_window(i as u32, &window(id, "m/é\0", 5, 0)).unwrap();
            st.put_lane_seq(LaneId::new(id, i as u32, 0), 1).unwrap();
        }
        st.flush().unwrap();
        drop(st);
        let st = open(dir.path(), 4);
        let snap = st.load().unwrap();
        let mut got: Vec<_> = snap.windows.iter().map(|(_, w)| w.device.clone()).collect();
        let mut want: Vec<_> = ids.iter().map(|s| s.to_string()).collect();
        got.sort();
        want.sort();
        assert_eq!(got, want);
        assert!(snap.windows.iter().all(|(_, w)| w.metric == "m/é\0"));
        assert_eq!(snap.lanes.len(), ids.len());
        for (i, id) in ids.iter().enumerate() {
            assert!(snap.lanes.contains(&(id.to_string(), i as u32, 0, 1)));
        }
    }

    #[test]
    fn a_corrupt_stored_value_yields_an_error_naming_the_key_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = open(dir.path(), 4);
        let key = window_key("pump/7", "temp", 60_000);
        st.windows.insert(key, &b"\0\0\0\x01{not json"[..]).unwrap();
        let err = st.load().unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{msg}");
        assert!(msg.contains(r#"windows/"pump/7"/"temp"/60000"#), "{msg}");
        assert!(msg.contains("will not help"), "{msg}");
        assert!(!err.is_retryable());
        let err = st
            .put_window(1, &window("pump/7", "temp", 60_000, 1))
            .unwrap_err();
        assert!(err.to_string().contains("pump/7"), "{err}");

        st.lanes
            .insert(lane_key("agent-1", 4, 0), &b"short"[..])
            .unwrap();
        let err = st.lane_seqs().unwrap_err().to_string();
        assert!(err.contains(r#"lanes/"agent-1"/4"#), "{err}");
        st.lanes.insert(&b"\xff"[..], &b"12345678"[..]).unwrap();
        st.lanes.remove(lane_key("agent-1", 4, 0)).unwrap();
        let err = st.lane_seqs().unwrap_err().to_string();
        assert!(err.contains("lanes/0xff"), "{err}");
    }

    #[test]
    fn non_finite_numbers_are_refused_not_stored() {
        let mut st = MemoryStore::new(4);
        let mut w = window("d", "m", 0, 0);
        w.mean = f64::NAN;
        let err = st.put_window(0, &w).unwrap_err();
        assert!(err.to_string().contains("mean must be finite"), "{err}");
        assert_eq!(st.load().unwrap(), Snapshot::default());
    }

    #[test]
    fn an_id_too_long_for_the_key_is_refused_not_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = open(dir.path(), 4);
        let long = "d".repeat(usize::from(u16::MAX) + 1);
        let err = st.put_window(0, &window(&long, "m", 0, 0)).unwrap_err();
        assert!(matches!(err, StoreError::Invalid { .. }), "{err}");
        assert!(err.to_string().contains("65536 bytes"), "{err}");
        assert!(!err.is_retryable());
        assert_eq!(st.load().unwrap(), Snapshot::default());
    }

    /// (agent, partition, seq, window) deliveries and the FleetState that applied them.
    fn apply_direct(deliveries: &[(String, u32, u64, WindowSummary)], wps: usize) -> FleetState {
        let mut st = FleetState::new(wps);
        for (a, p, seq, w) in deliveries {
            st.apply_summary(a, *p, *seq, w);
        }
        st
    }

    fn series_windows(st: &FleetState) -> Vec<(String, String, u32, Vec<WindowSummary>)> {
        st.devices()
            .iter()
            .flat_map(|(d, ds)| {
                ds.metrics.iter().map(move |(m, s)| {
                    (
                        d.clone(),
                        m.clone(),
                        ds.partition,
                        s.windows.iter().cloned().collect(),
                    )
                })
            })
            .collect()
    }

    #[test]
    fn rebuild_gives_the_fleet_state_of_applying_the_same_deliveries_directly() {
        let mut deliveries = Vec::new();
        for (d, p) in [("pump/1", 3), ("fan 2", 5)] {
            let mut seq = 0; // one lane per partition
            for m in ["temp", "rpm"] {
                for (start, rev) in [(0, 0), (10, 0), (0, 1), (20, 0), (10, 0)] {
                    seq += 1;
                    deliveries.push(("a".to_string(), p, seq, window(d, m, start, rev)));
                }
            }
        }
        deliveries.push(("b".to_string(), 5, 1, window("fan 2", "temp", 30, 0)));
        let direct = apply_direct(&deliveries, 10);
        let dir = tempfile::tempdir().unwrap();
        let mut st = open(dir.path(), 10);
        for (a, p, seq, w) in &deliveries {
            st.put_window(*p, w).unwrap();
            st.put_lane_seq(LaneId::new(a, *p, 0), *seq).unwrap();
        }
        st.flush().unwrap();
        drop(st);
        let rebuilt = rebuild(open(dir.path(), 10).load().unwrap(), 10);
        assert_eq!(rebuilt.readings(), direct.readings());
        assert_eq!(series_windows(&rebuilt), series_windows(&direct));
        for (a, p) in [("a", 3), ("a", 5), ("b", 5)] {
            let l = LaneId::new(a, p, 0);
            assert_eq!(rebuilt.lane_seq(l), direct.lane_seq(l), "{a}/{p}");
        }
        assert_eq!(rebuilt.lanes(), direct.lanes());
    }

    const DEVICES: [&str; 4] = ["pump/7", "a b", "nul\0x", "ünï😀"];
    const METRICS: [&str; 2] = ["temp", "v/x"];
    const WPS: usize = 3;

    /// Deliveries in send order, with per-lane increasing seqs; a device's partition is its index.
    fn deliveries() -> impl Strategy<Value = Vec<(String, u32, u64, WindowSummary)>> {
        prop::collection::vec((0..2usize, 0..4usize, 0..2usize, -3i64..5, 0u32..3), 1..40).prop_map(
            |raw| {
                let mut next: HashMap<(usize, usize), u64> = HashMap::new();
                raw.into_iter()
                    .map(|(a, d, m, start, rev)| {
                        let seq = next.entry((a, d)).or_default();
                        *seq += 1;
                        (
                            format!("agent-{a}"),
                            d as u32,
                            *seq,
                            window(DEVICES[d], METRICS[m], start * 10, rev),
                        )
                    })
                    .collect()
            },
        )
    }

    /// Deliveries, then the order of the messy run: every index at least once plus duplicates,
    /// shuffled, and the steps after which the store is flushed, dropped, reopened and the last
    /// few deliveries are replayed (go-back-N).
    type Plan = (
        Vec<(String, u32, u64, WindowSummary)>,
        Vec<usize>,
        Vec<usize>,
    );

    fn plan() -> impl Strategy<Value = Plan> {
        deliveries()
            .prop_flat_map(|d| {
                let n = d.len();
                (Just(d), prop::collection::vec(0..n, 0..n))
            })
            .prop_flat_map(|(d, dups)| {
                let order: Vec<usize> = (0..d.len()).chain(dups).collect();
                let steps = order.len();
                (
                    Just(d),
                    Just(order).prop_shuffle(),
                    prop::collection::vec(0..=steps, 0..4),
                )
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn duplicated_reordered_and_replayed_deliveries_change_nothing((d, order, reopens) in plan()) {
            // (a) once, in order, to the reference model.
            let mut reference = MemoryStore::new(WPS);
            for (a, p, seq, w) in &d {
                reference.put_window(*p, w).unwrap();
                reference.put_lane_seq(LaneId::new(a, *p, 0), *seq).unwrap();
            }
            // (b) shuffled, duplicated and replayed to sled, with restarts; a second model gets
            // the same messy sequence and must answer the same `Applied` at every step, and so
            // must a FleetState (same semantics).
            let dir = tempfile::tempdir().unwrap();
            let mut st = open(dir.path(), WPS);
            let mut messy = MemoryStore::new(WPS);
            let mut fleet = FleetState::new(WPS);
            let mut sent: Vec<usize> = Vec::new();
            let mut deliver = |st: &mut SledStore, i: usize| -> Result<(), TestCaseError> {
                let (a, p, seq, w) = &d[i];
                let got = st.put_window(*p, w).unwrap();
                prop_assert_eq!(got, messy.put_window(*p, w).unwrap(), "delivery {}", i);
                prop_assert_eq!(got, fleet.apply_summary(a, *p, *seq, w), "delivery {}", i);
                st.put_lane_seq(LaneId::new(a, *p, 0), *seq).unwrap();
                messy.put_lane_seq(LaneId::new(a, *p, 0), *seq).unwrap();
                Ok(())
            };
            for (step, &i) in order.iter().enumerate() {
                if reopens.contains(&step) {
                    st.close().unwrap();
                    st = open(dir.path(), WPS);
                    for &j in sent.iter().rev().take(3) {
                        deliver(&mut st, j)?;
                    }
                }
                deliver(&mut st, i)?;
                sent.push(i);
            }
            st.close().unwrap();
            let st = open(dir.path(), WPS);
            let snap = st.load().unwrap();
            prop_assert_eq!(&snap, &reference.load().unwrap());
            prop_assert_eq!(snap.lanes.clone(), st.lane_seqs().unwrap());
            // And the rebuilt state keeps the same windows as applying in order directly.
            let direct = apply_direct(&d, WPS);
            prop_assert_eq!(series_windows(&rebuild(snap, WPS)), series_windows(&direct));
        }
    }

    /// Windows put+flush per second, with a flush every 1, 100 and 1000 puts.
    /// `cargo test --release -p edgewatch-aggregator --lib store::tests::throughput -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn throughput_of_put_and_flush() {
        for (every, total) in [(1usize, 2_000usize), (100, 50_000), (1000, 200_000)] {
            let dir = tempfile::tempdir().unwrap();
            let mut st = open(dir.path(), 60);
            let t = Instant::now();
            for i in 0..total {
                let w = window(
                    &format!("dev-{}", i % 500),
                    "temp",
                    (i / 500) as i64 * 10,
                    0,
                );
                st.put_window((i % 64) as u32, &w).unwrap();
                st.put_lane_seq(LaneId::new("agent-1", (i % 64) as u32, 0), i as u64 + 1)
                    .unwrap();
                if (i + 1) % every == 0 {
                    st.flush().unwrap();
                }
            }
            st.flush().unwrap();
            let secs = t.elapsed().as_secs_f64();
            println!(
                "flush every {every:>4} puts: {total} windows in {secs:.2} s = {:.0} windows/s",
                total as f64 / secs
            );
        }
    }
}
