//! The agent's durable outbox: every window summary and anomaly event is stored here, in one lane per
//! partition with a monotonically increasing seq, until the lane's owner acknowledges it.
//!
//! **Owns:** the sled database in one directory (a `records` tree keyed `partition (u32 BE) ++ seq
//! (u64 BE)`, so a lane is one ordered key range, a `meta` tree holding each lane's acked seq and
//! next seq, and an `epoch` tree holding the outbox's lane epoch), the byte accounting, and the disk
//! budget (coarsening, eviction). **Does not own:**
//! the network, retries, timers or async: it is a synchronous state machine that the uplink task drives
//! (from `spawn_blocking` or a dedicated thread, since sled calls block).
//!
//! # Flush policy
//! [`Outbox::append`] writes to sled but never flushes, so the record is **not durable yet**.
//! [`Outbox::flush`] makes everything appended so far durable (one sled flush, i.e. one fsync batch).
//! The agent appends a whole pipeline batch (everything `take_outputs` returned), calls `flush` once,
//! and only then publishes; it publishes what [`Outbox::pending`] returns (the budget may have merged
//! or evicted summaries since they were appended). With a 1 s pipeline tick plus the 512-message
//! batches this means at most a few flushes per second. `benches/outbox.rs` (release build, 2 shared
//! cores, local disk) measured about 6 k records/s with a flush after every record, 87 k/s with one per
//! 100 and 134 k/s with one per 1000: flushing per batch, never per record. Background flushing by sled is switched off so that this policy
//! is the only one. [`Outbox::ack`] does not flush: an ack lost in a crash only makes the agent resend
//! records that the owner then drops as replays (it keeps the last applied seq per lane).
//!
//! # Seqs, epochs and acks
//! Seqs start at 1 per lane and are never reused, also across reopen: the next seq is restored as the
//! largest of the stored next seq, the highest stored record seq + 1 and the acked seq + 1.
//!
//! Seqs count within the outbox's **epoch** ([`Outbox::epoch`]): a random non-zero u64 drawn when the
//! database is created and stored in it, so it lasts as long as the seqs it qualifies. An outbox
//! that starts over (a temporary one on every start, a wiped directory) has a new epoch, so owners
//! see new lanes instead of replays of seqs they already applied. A database from before epochs
//! (lanes or records but no stored epoch) keeps [`LEGACY_EPOCH`], so an upgrade does not reset it.
//!
//! Acks are cumulative; a stale ack (≤ the acked seq) is ignored. An ack above the highest seq ever
//! handed to the network ([`Outbox::exposed_seq`]) acknowledges records nobody can have received:
//! it is refused ([`OutboxError::AckAhead`]) and deletes nothing. (The epoch is checked by the
//! uplink, which compares each ack's epoch with [`Outbox::epoch`].)
//!
//! # Disk budget
//! [`Outbox::bytes`] counts key + value bytes of the stored records. When an append takes it above
//! `max_outbox_bytes`, the outbox reclaims space down to [`RECLAIM_TARGET_PERCENT`] of the budget (the
//! headroom keeps reclaiming rare instead of once per append):
//! 1. **Coarsen.** Within a lane, the *normal* summaries (`max_score < normal_score_below`, revision 0)
//!    never handed to the network (see below)
//!    of one series (device + metric), taken in seq order, form runs where each window's `end_ms` equals
//!    the next one's `start_ms`. Runs are merged oldest first (by first seq, then partition) until the
//!    target is met; a run becomes one summary with the start of the first window, the end of the last,
//!    count, min, max, mean and std combined exactly ([`RunningStats::merge`]), the earliest first and
//!    latest last reading timestamps and the highest score. The merged record keeps the **lowest** seq
//!    of the run; the others are deleted (counted in [`OutboxStats::coarsened`]). Anomaly events of the
//!    series between two windows do not break a run; any other summary of the series does.
//! 2. **Evict.** If that is not enough, summaries are deleted lowest seq first (across lanes, ties by
//!    partition) until the target is met (counted in [`OutboxStats::evicted`] and
//!    [`OutboxStats::evicted_readings`]).
//!
//! Anomaly events are never coarsened or evicted. If they alone exceed the budget they are all kept and
//! the append is counted in [`OutboxStats::over_budget`]. A summary appended in that state is evicted
//! at once (it is the only thing that can go).
//!
//! # Exposure and skipped seqs
//! A record handed to the network may have reached its owner even if it was never acked; merging it
//! into a coarser window would make the owner count its readings twice. So the uplink marks what it
//! is about to publish with [`Outbox::expose`] (persisted with the flush that precedes the publish),
//! and only never-exposed records are coarsened. Exposed records are bounded by the uplink's unacked
//! window, so under a long outage nearly the whole backlog stays coarsenable. Merging and eviction
//! leave holes in a lane's seqs; [`Outbox::prev_of`] gives, for each record sent, the seq before it
//! that the lane still holds, which the owner uses to know no record is missing in between.

use edgewatch_models::stats::RunningStats;
use edgewatch_models::wire::{AnomalyEvent, WindowSummary, LEGACY_EPOCH};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::Xxh3;

/// After a reclaim, [`Outbox::bytes`] is at most this percentage of `max_outbox_bytes` (unless anomaly
/// events alone take more).
pub const RECLAIM_TARGET_PERCENT: u64 = 90;

const RECORDS_TREE: &str = "records";
const META_TREE: &str = "meta";
const CHECKPOINT_TREE: &str = "checkpoint";
/// The checkpoint's header (fingerprint, series count, clock; `agent::checkpoint`).
const CHECKPOINT_KEY: &[u8] = b"pipeline";
/// Prefix of the checkpoint's per-series rows: `r` + series index (u32, big-endian).
const CHECKPOINT_ROW: u8 = b'r';
/// A tree of its own (not `meta`, whose keys are partitions): older versions still open the database.
const EPOCH_TREE: &str = "epoch";
const EPOCH_KEY: &[u8] = b"lane_epoch";

/// A stored checkpoint as read back: its header and every row with its index, in index order.
pub type StoredCheckpoint = (Vec<u8>, Vec<(u32, Vec<u8>)>);

/// Settings of an [`Outbox`].
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxConfig {
    /// Disk budget: key + value bytes of all stored records and of the pipeline checkpoint (which
    /// is never reduced: records are coarsened and evicted to make room). Must be > 0.
    pub max_outbox_bytes: u64,
    /// A summary whose `max_score` is below this is "normal" and may be coarsened. Must not be NaN.
    pub normal_score_below: f64,
}

/// One outbox record: what the agent publishes upstream.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// A closed window of one (device, metric).
    Summary(WindowSummary),
    /// An anomaly detected on one reading.
    Anomaly(AnomalyEvent),
}

/// Counters since [`Outbox::open`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Records appended.
    pub appended: u64,
    /// Records removed by acks.
    pub acked: u64,
    /// Summaries merged away by coarsening (a run of n becomes 1: n - 1 counted).
    pub coarsened: u64,
    /// Summaries evicted for the budget.
    pub evicted: u64,
    /// Readings (sum of `count`) in the evicted summaries.
    pub evicted_readings: u64,
    /// Anomaly events stored now.
    pub anomalies_kept: u64,
    /// Appends after which anomaly events alone kept the outbox above its budget.
    pub over_budget: u64,
    /// Appends whose record was stored but whose coarsening or eviction failed (logged).
    pub reclaim_errors: u64,
}

/// What can go wrong in the outbox. Each message says whether retrying makes sense.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The configuration is unusable.
    #[error("outbox config: {0} (not retryable: fix the configuration)")]
    InvalidConfig(String),
    /// sled could not open the database directory (locked by another process, permissions, I/O).
    #[error("outbox {}: cannot open: {source} ({})", path.display(), retry_hint(source))]
    Open {
        /// Database directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: sled::Error,
    },
    /// A read, write, delete or flush failed in sled.
    #[error("outbox {}: {op} failed: {source} ({})", path.display(), retry_hint(source))]
    Storage {
        /// Database directory.
        path: PathBuf,
        /// The operation, e.g. `append partition 3` or `flush`.
        op: String,
        /// Cause.
        #[source]
        source: sled::Error,
    },
    /// A stored record does not decode.
    #[error("outbox {}: record at key {key} (partition {partition}, seq {seq}) is corrupt: {source} (not retryable: the stored value is damaged)", path.display())]
    Corrupt {
        /// Database directory.
        path: PathBuf,
        /// The key, hex.
        key: String,
        /// Lane of the record.
        partition: u32,
        /// Seq of the record.
        seq: u64,
        /// Decoding error.
        #[source]
        source: serde_json::Error,
    },
    /// A key or meta value has the wrong shape (not written by this module).
    #[error("outbox {}: tree {tree} key {key}: {problem} (not retryable: the stored data is damaged)", path.display())]
    Malformed {
        /// Database directory.
        path: PathBuf,
        /// `records` or `meta`.
        tree: &'static str,
        /// The key, hex.
        key: String,
        /// What is wrong.
        problem: String,
    },
    /// A record holds a NaN or infinite number, which JSON cannot carry.
    #[error("outbox: record for partition {partition} not stored: field {field} is {value} (not retryable: JSON cannot carry non-finite numbers)")]
    NotFinite {
        /// Lane the record was for.
        partition: u32,
        /// The offending field.
        field: &'static str,
        /// Its value.
        value: f64,
    },
    /// A record could not be serialised.
    #[error("outbox: record for partition {partition} not stored: cannot encode: {source} (not retryable)")]
    Encode {
        /// Lane the record was for.
        partition: u32,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// An ack above the highest seq of the lane ever handed to the network: nobody can have received
    /// those records, so the ack is forged or confused. Refused; nothing was deleted.
    #[error("outbox: ack of partition {partition} up to seq {upto_seq} refused: only seqs up to {exposed} were ever sent (not retryable: nothing was deleted)")]
    AckAhead {
        /// Lane of the ack.
        partition: u32,
        /// Seq the ack claimed.
        upto_seq: u64,
        /// Highest seq of the lane handed to the network.
        exposed: u64,
    },
}

impl OutboxError {
    /// Whether trying the same operation again (with backoff) can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            OutboxError::Open { source, .. } | OutboxError::Storage { source, .. } => {
                matches!(source, sled::Error::Io(_))
            }
            _ => false,
        }
    }
}

fn retry_hint(e: &sled::Error) -> &'static str {
    if matches!(e, sled::Error::Io(_)) {
        "retry with backoff: an I/O error may be transient"
    } else {
        "not retryable: the database is damaged or unsupported"
    }
}

/// The durable outbox. See the module documentation for the flush and budget policies.
pub struct Outbox {
    path: PathBuf,
    /// Whether the database is deleted on drop (an agent without `state.dir`).
    temporary: bool,
    /// Epoch of every lane of this database (see the module doc).
    epoch: u64,
    cfg: OutboxConfig,
    db: sled::Db,
    records: sled::Tree,
    meta: sled::Tree,
    checkpoints: sled::Tree,
    /// Key + value bytes of the stored checkpoint: its header and every row, by index.
    checkpoint_bytes: u64,
    checkpoint_rows: Vec<u64>,
    lanes: BTreeMap<u32, Lane>,
    bytes: u64,
    summaries: u64,
    stats: OutboxStats,
    /// Whether the last append left anomaly events alone above the budget (logged on the transition).
    over_budget_now: bool,
    /// When eviction was last logged (rate limit).
    last_evict_log: Option<std::time::Instant>,
}

/// In-memory index of one lane.
#[derive(Debug, Clone)]
struct Lane {
    acked: u64,
    next: u64,
    /// Highest seq ever handed to the network (persisted): records up to it may have reached an
    /// owner, so they are never merged into coarser summaries (an owner would count them twice).
    exposed: u64,
    slots: BTreeMap<u64, Slot>,
}

impl Default for Lane {
    fn default() -> Self {
        Self {
            acked: 0,
            next: 1,
            exposed: 0,
            slots: BTreeMap::new(),
        }
    }
}

/// What the budget needs to know about a stored record without reading it.
#[derive(Debug, Clone, Copy)]
struct Slot {
    bytes: u64,
    kind: SlotKind,
}

#[derive(Debug, Clone, Copy)]
enum SlotKind {
    Anomaly,
    Summary {
        series: u64,
        start_ms: i64,
        end_ms: i64,
        count: u64,
        mergeable: bool,
    },
}

fn row_key(index: u32) -> [u8; 5] {
    let mut k = [CHECKPOINT_ROW; 5];
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

fn key(partition: u32, seq: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&partition.to_be_bytes());
    k[4..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn split_key(k: &[u8]) -> Option<(u32, u64)> {
    let p = u32::from_be_bytes(k.get(..4)?.try_into().ok()?);
    let s = u64::from_be_bytes(k.get(4..)?.try_into().ok()?);
    Some((p, s))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn series_hash(device: &str, metric: &str) -> u64 {
    let mut h = Xxh3::new();
    h.update(&(device.len() as u64).to_le_bytes());
    h.update(device.as_bytes());
    h.update(metric.as_bytes());
    h.digest()
}

fn check_finite(partition: u32, record: &Record) -> Result<(), OutboxError> {
    let fields: &[(&'static str, f64)] = match record {
        Record::Summary(s) => &[
            ("min", s.min),
            ("max", s.max),
            ("mean", s.mean),
            ("std", s.std),
            ("max_score", s.max_score),
        ],
        Record::Anomaly(a) => &[("value", a.value), ("score", a.score)],
    };
    match fields.iter().find(|(_, v)| !v.is_finite()) {
        Some(&(field, value)) => Err(OutboxError::NotFinite {
            partition,
            field,
            value,
        }),
        None => Ok(()),
    }
}

/// sled's page cache bound. sled's default (1 GiB) would let a gateway agent's memory grow with
/// what it once wrote; records are read back only for resends, so a small cache costs little.
pub const SLED_CACHE_BYTES: u64 = 16 << 20;

fn sled_config() -> sled::Config {
    sled::Config::new()
        .flush_every_ms(None)
        .cache_capacity(SLED_CACHE_BYTES)
}

/// How long [`Outbox::open`] waits for a previous handle on the same directory to let go of it.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens sled with background flushing off. sled releases its directory lock from background threads
/// some milliseconds after the last handle is dropped, so a reopen in the same process retries a lock
/// conflict for up to [`LOCK_WAIT`].
fn open_db(path: &Path) -> sled::Result<sled::Db> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match sled_config().path(path).open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            other => return other,
        }
    }
}

/// The epoch stored in `db`; if there is none, [`LEGACY_EPOCH`] for a database from before epochs
/// (it holds lanes or records) and a new random one otherwise. Either is stored and flushed at once.
fn stored_epoch(
    db: &sled::Db,
    records: &sled::Tree,
    meta: &sled::Tree,
    path: &Path,
) -> Result<u64, OutboxError> {
    let storage = |op: &str| {
        let op = op.to_string();
        move |source| OutboxError::Storage {
            path: path.to_path_buf(),
            op,
            source,
        }
    };
    let tree = db
        .open_tree(EPOCH_TREE)
        .map_err(storage("open epoch tree"))?;
    if let Some(v) = tree.get(EPOCH_KEY).map_err(storage("read epoch"))? {
        return <[u8; 8]>::try_from(v.as_ref())
            .map(u64::from_be_bytes)
            .map_err(|_| OutboxError::Malformed {
                path: path.to_path_buf(),
                tree: EPOCH_TREE,
                key: hex(EPOCH_KEY),
                problem: format!("value must be 8 bytes, got {}", v.len()),
            });
    }
    let existing = !records.is_empty() || !meta.is_empty();
    let epoch = if existing { LEGACY_EPOCH } else { new_epoch() };
    tree.insert(EPOCH_KEY, &epoch.to_be_bytes())
        .map_err(storage("write epoch"))?;
    db.flush().map_err(storage("flush epoch"))?;
    Ok(epoch)
}

/// A random non-zero epoch. Not from the configured seed (the style's rule for randomness) on
/// purpose: two starts must never share an epoch. `RandomState` keys come from the OS once per
/// process; the clock and the pid separate starts even if they did not.
fn new_epoch() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(nanos);
    h.write_u32(std::process::id());
    h.finish().max(1)
}

/// Combines a run of adjacent summaries of one series into one (see the module doc).
fn merge_summaries(acc: &mut WindowSummary, next: &WindowSummary) {
    let stats = |s: &WindowSummary| RunningStats {
        count: s.count,
        min: s.min,
        max: s.max,
        mean: s.mean,
        m2: s.std * s.std * s.count as f64,
    };
    let mut merged = stats(acc);
    merged.merge(&stats(next));
    acc.end_ms = next.end_ms;
    acc.count = merged.count;
    acc.min = merged.min;
    acc.max = merged.max;
    acc.mean = merged.mean;
    acc.std = merged.std();
    acc.first_ts_ms = acc.first_ts_ms.min(next.first_ts_ms);
    acc.last_ts_ms = acc.last_ts_ms.max(next.last_ts_ms);
    acc.max_score = acc.max_score.max(next.max_score);
}

impl Outbox {
    /// Opens (or creates) the outbox in directory `path`, restoring every lane's next seq, acked seq and
    /// pending records. Reads every stored record once to rebuild the index; a damaged one fails the
    /// open with an error naming its key. If the directory is locked (another handle, possibly one just
    /// dropped in this process), waits up to 2 s before failing with a retryable error. Blocking.
    pub fn open(path: &Path, cfg: OutboxConfig) -> Result<Outbox, OutboxError> {
        if cfg.max_outbox_bytes == 0 {
            return Err(OutboxError::InvalidConfig(
                "max_outbox_bytes must be > 0, got 0".into(),
            ));
        }
        if cfg.normal_score_below.is_nan() {
            return Err(OutboxError::InvalidConfig(
                "normal_score_below must be a number, got NaN".into(),
            ));
        }
        let open_err = |source| OutboxError::Open {
            path: path.to_path_buf(),
            source,
        };
        let db = open_db(path).map_err(open_err)?;
        Self::with_db(db, path, cfg, false)
    }

    /// An outbox in a temporary sled database, deleted when dropped: the same behaviour without
    /// durability (an agent without `state.dir`).
    pub fn open_temporary(cfg: OutboxConfig) -> Result<Outbox, OutboxError> {
        let path = Path::new("(temporary outbox)");
        let db = sled_config()
            .temporary(true)
            .open()
            .map_err(|source| OutboxError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        Self::with_db(db, path, cfg, true)
    }

    fn with_db(
        db: sled::Db,
        path: &Path,
        cfg: OutboxConfig,
        temporary: bool,
    ) -> Result<Outbox, OutboxError> {
        let open_err = |source| OutboxError::Open {
            path: path.to_path_buf(),
            source,
        };
        let records = db.open_tree(RECORDS_TREE).map_err(open_err)?;
        let meta = db.open_tree(META_TREE).map_err(open_err)?;
        let checkpoints = db.open_tree(CHECKPOINT_TREE).map_err(open_err)?;
        let epoch = stored_epoch(&db, &records, &meta, path)?;
        let mut outbox = Outbox {
            path: path.to_path_buf(),
            temporary,
            epoch,
            cfg,
            db,
            records,
            meta,
            checkpoints,
            checkpoint_bytes: 0,
            checkpoint_rows: Vec::new(),
            lanes: BTreeMap::new(),
            bytes: 0,
            summaries: 0,
            stats: OutboxStats::default(),
            over_budget_now: false,
            last_evict_log: None,
        };
        outbox.load()?;
        outbox.load_checkpoint_sizes()?;
        Ok(outbox)
    }

    fn storage(&self, op: impl Into<String>) -> impl FnOnce(sled::Error) -> OutboxError + '_ {
        let op = op.into();
        move |source| OutboxError::Storage {
            path: self.path.clone(),
            op,
            source,
        }
    }

    fn load(&mut self) -> Result<(), OutboxError> {
        for item in self.meta.iter() {
            let (k, v) = item.map_err(self.storage("read lane meta"))?;
            let malformed = |problem: String| OutboxError::Malformed {
                path: self.path.clone(),
                tree: META_TREE,
                key: hex(&k),
                problem,
            };
            let partition = <[u8; 4]>::try_from(k.as_ref())
                .map(u32::from_be_bytes)
                .map_err(|_| malformed(format!("key must be 4 bytes, got {}", k.len())))?;
            // acked, next and (since exposure tracking) exposed, 8 bytes each, big endian.
            if v.len() != 16 && v.len() != 24 {
                return Err(malformed(format!(
                    "value must be 16 or 24 bytes, got {}",
                    v.len()
                )));
            }
            let word = |i: usize| {
                v.get(i * 8..i * 8 + 8)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map_or(0, u64::from_be_bytes)
            };
            let (acked, next) = (word(0), word(1));
            // A 16-byte value predates exposure tracking: everything stored may have been sent
            // (bounded below by the next seq, once the records are read).
            let exposed = if v.len() == 24 { word(2) } else { u64::MAX };
            let lane = self.lanes.entry(partition).or_default();
            lane.acked = acked;
            lane.next = next.max(acked.saturating_add(1)).max(1);
            lane.exposed = exposed;
        }
        let mut leftovers = Vec::new();
        for item in self.records.iter() {
            let (k, v) = item.map_err(self.storage("read records"))?;
            let (partition, seq) =
                split_key(&k)
                    .filter(|_| k.len() == 12)
                    .ok_or_else(|| OutboxError::Malformed {
                        path: self.path.clone(),
                        tree: RECORDS_TREE,
                        key: hex(&k),
                        problem: format!("key must be 12 bytes, got {}", k.len()),
                    })?;
            let record = self.decode(&k, partition, seq, &v)?;
            let lane = self.lanes.entry(partition).or_default();
            lane.next = lane.next.max(seq.saturating_add(1));
            if seq <= lane.acked {
                // An ack whose deletes did not reach the disk: finish it.
                leftovers.push(k);
                continue;
            }
            self.index(partition, seq, &record, (k.len() + v.len()) as u64);
        }
        for k in leftovers {
            self.records
                .remove(k)
                .map_err(self.storage("remove acked leftover"))?;
        }
        // Only appended seqs can have been sent, whatever an older version stored (it kept u64::MAX
        // for lanes from before exposure tracking): so no ack can pass the next seq.
        for lane in self.lanes.values_mut() {
            lane.exposed = lane.exposed.min(lane.next - 1);
        }
        Ok(())
    }

    fn decode(&self, k: &[u8], partition: u32, seq: u64, v: &[u8]) -> Result<Record, OutboxError> {
        serde_json::from_slice(v).map_err(|source| OutboxError::Corrupt {
            path: self.path.clone(),
            key: hex(k),
            partition,
            seq,
            source,
        })
    }

    fn index(&mut self, partition: u32, seq: u64, record: &Record, bytes: u64) {
        let kind = match record {
            Record::Anomaly(_) => {
                self.stats.anomalies_kept += 1;
                SlotKind::Anomaly
            }
            Record::Summary(s) => {
                self.summaries += 1;
                SlotKind::Summary {
                    series: series_hash(&s.device, &s.metric),
                    start_ms: s.start_ms,
                    end_ms: s.end_ms,
                    count: s.count,
                    mergeable: s.max_score < self.cfg.normal_score_below && s.revision == 0,
                }
            }
        };
        self.bytes += bytes;
        let lane = self.lanes.entry(partition).or_default();
        lane.slots.insert(seq, Slot { bytes, kind });
    }

    /// Removes `seq` from the index (the caller deletes it from sled) and returns its slot.
    fn unindex(&mut self, partition: u32, seq: u64) -> Option<Slot> {
        let slot = self.lanes.get_mut(&partition)?.slots.remove(&seq)?;
        self.bytes = self.bytes.saturating_sub(slot.bytes);
        match slot.kind {
            SlotKind::Anomaly => self.stats.anomalies_kept -= 1,
            SlotKind::Summary { .. } => self.summaries -= 1,
        }
        Some(slot)
    }

    fn put_meta(&self, partition: u32) -> Result<(), OutboxError> {
        match self.lanes.get(&partition) {
            Some(lane) => self.put_meta_values(partition, lane.acked, lane.next),
            None => Ok(()),
        }
    }

    fn put_meta_values(&self, partition: u32, acked: u64, next: u64) -> Result<(), OutboxError> {
        let exposed = self.lanes.get(&partition).map_or(0, |l| l.exposed);
        let mut v = [0u8; 24];
        v[..8].copy_from_slice(&acked.to_be_bytes());
        v[8..16].copy_from_slice(&next.to_be_bytes());
        v[16..].copy_from_slice(&exposed.to_be_bytes());
        self.meta
            .insert(partition.to_be_bytes(), &v)
            .map_err(self.storage(format!("write meta of partition {partition}")))?;
        Ok(())
    }

    /// Appends `record` to lane `partition` and returns its seq (the lane's next, starting at 1).
    /// Written to sled but **not durable** until [`Outbox::flush`]. May coarsen or evict summaries
    /// (including this one) to respect the budget; publish what [`Outbox::pending`] returns.
    pub fn append(&mut self, partition: u32, record: Record) -> Result<u64, OutboxError> {
        check_finite(partition, &record)?;
        let value = serde_json::to_vec(&record)
            .map_err(|source| OutboxError::Encode { partition, source })?;
        let seq = self.lanes.get(&partition).map_or(1, |l| l.next);
        let k = key(partition, seq);
        self.records
            .insert(k, value.as_slice())
            .map_err(self.storage(format!("append to partition {partition}")))?;
        self.lanes.entry(partition).or_default().next = seq + 1;
        self.index(partition, seq, &record, (k.len() + value.len()) as u64);
        self.stats.appended += 1;
        if self.bytes > self.records_budget() {
            // The record is stored: failing the append now would make the caller store it twice.
            // The budget is retried on the next append.
            if let Err(e) = self.reclaim() {
                self.stats.reclaim_errors += 1;
                tracing::error!(error = %e, "outbox could not reclaim space; the budget is exceeded until a later append succeeds");
            }
        }
        Ok(seq)
    }

    /// Makes everything appended so far durable (one sled flush). Publish only after this returned.
    pub fn flush(&mut self) -> Result<(), OutboxError> {
        self.db.flush().map_err(self.storage("flush"))?;
        Ok(())
    }

    /// Cumulative ack of lane `partition` up to and including `upto_seq`: removes those records and
    /// returns how many. A stale ack (≤ the acked seq) is ignored and returns 0. An ack above
    /// [`Outbox::exposed_seq`] is refused with [`OutboxError::AckAhead`] and deletes nothing. Does not
    /// flush.
    pub fn ack(&mut self, partition: u32, upto_seq: u64) -> Result<usize, OutboxError> {
        if upto_seq <= self.acked_seq(partition) {
            return Ok(0);
        }
        let exposed = self.exposed_seq(partition);
        if upto_seq > exposed {
            return Err(OutboxError::AckAhead {
                partition,
                upto_seq,
                exposed,
            });
        }
        // exposed < next, so the next seq stays above the acked one.
        let next = self.next_seq(partition);
        let seqs: Vec<u64> = self.lanes.get(&partition).map_or_else(Vec::new, |l| {
            l.slots.range(..=upto_seq).map(|(&s, _)| s).collect()
        });
        // Meta first: if the deletes are lost in a crash, `open` finishes them. Memory changes only
        // once both writes succeeded, so a failed ack can simply be retried.
        self.put_meta_values(partition, upto_seq, next)?;
        let mut batch = sled::Batch::default();
        for &s in &seqs {
            batch.remove(&key(partition, s));
        }
        self.records
            .apply_batch(batch)
            .map_err(self.storage(format!("ack partition {partition} up to {upto_seq}")))?;
        let lane = self.lanes.entry(partition).or_default();
        lane.acked = upto_seq;
        lane.next = next;
        for &s in &seqs {
            self.unindex(partition, s);
        }
        self.stats.acked += seqs.len() as u64;
        Ok(seqs.len())
    }

    /// Up to `max` unacked records of lane `partition` with seq > `after_seq`, in seq order.
    pub fn pending(
        &self,
        partition: u32,
        after_seq: u64,
        max: usize,
    ) -> Result<Vec<(u64, Record)>, OutboxError> {
        let Some(from) = after_seq.checked_add(1) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for item in self
            .records
            .range(key(partition, from)..=key(partition, u64::MAX))
            .take(max)
        {
            let (k, v) = item.map_err(self.storage(format!("read partition {partition}")))?;
            let seq = split_key(&k).map_or(0, |(_, s)| s);
            out.push((seq, self.decode(&k, partition, seq, &v)?));
        }
        Ok(out)
    }

    /// Every lane the outbox knows (with records, or with an acked or next seq), ascending.
    pub fn lanes(&self) -> Vec<u32> {
        self.lanes.keys().copied().collect()
    }

    /// Highest acked seq of lane `partition`; 0 when nothing was acked.
    pub fn acked_seq(&self, partition: u32) -> u64 {
        self.lanes.get(&partition).map_or(0, |l| l.acked)
    }

    /// The seq the next append to lane `partition` gets.
    pub fn next_seq(&self, partition: u32) -> u64 {
        self.lanes.get(&partition).map_or(1, |l| l.next)
    }

    /// The seq before `seq` that lane `partition` still holds, or its acked seq when there is none:
    /// what a receiver must have before `seq` makes the lane contiguous (the wire's `prev`).
    pub fn prev_of(&self, partition: u32, seq: u64) -> u64 {
        let Some(lane) = self.lanes.get(&partition) else {
            return 0;
        };
        lane.slots
            .range(..seq)
            .next_back()
            .map_or(lane.acked, |(&s, _)| s.max(lane.acked))
    }

    /// Marks every record of lane `partition` up to `upto_seq` as handed to the network: from now on
    /// they are never coarsened. Written to sled, durable with the next [`Outbox::flush`] — which
    /// must come before the publish.
    pub fn expose(&mut self, partition: u32, upto_seq: u64) -> Result<(), OutboxError> {
        let lane = self.lanes.entry(partition).or_default();
        // Only appended seqs can be sent: an ack can then never pass the next seq.
        let upto_seq = upto_seq.min(lane.next - 1);
        if upto_seq <= lane.exposed {
            return Ok(());
        }
        lane.exposed = upto_seq;
        self.put_meta(partition)
    }

    /// Highest seq of lane `partition` handed to the network so far (see [`Outbox::expose`]): no
    /// ack may go beyond it.
    pub fn exposed_seq(&self, partition: u32) -> u64 {
        self.lanes.get(&partition).map_or(0, |l| l.exposed)
    }

    /// The epoch of every lane of this outbox (see the module doc), carried by every batch sent;
    /// acks for another epoch are not for this outbox.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether the database is temporary (deleted on drop): what it holds does not survive the run.
    pub fn is_temporary(&self) -> bool {
        self.temporary
    }

    /// Number of records stored (not yet acknowledged) in lane `partition`.
    pub fn len(&self, partition: u32) -> usize {
        self.lanes.get(&partition).map_or(0, |l| l.slots.len())
    }

    /// Number of records stored (not yet acknowledged) in every lane.
    pub fn records(&self) -> usize {
        self.lanes.values().map(|l| l.slots.len()).sum()
    }

    /// Whether no lane holds a record.
    pub fn is_empty(&self) -> bool {
        self.lanes.values().all(|l| l.slots.is_empty())
    }

    /// Stores the agent's pipeline checkpoint in the same database, so that one [`Outbox::flush`]
    /// makes a checkpoint and every record appended before it durable together (sled recovers a
    /// prefix of its writes): a recovered checkpoint never covers a window whose summary was lost.
    /// `header` replaces the stored one and each `(index, row)` replaces that row, in one atomic
    /// batch; rows not given stay as they are (a checkpoint writes only the series that changed).
    pub fn put_checkpoint(
        &mut self,
        header: &[u8],
        rows: &[(u32, Vec<u8>)],
    ) -> Result<(), OutboxError> {
        let mut batch = sled::Batch::default();
        batch.insert(CHECKPOINT_KEY, header);
        for (i, row) in rows {
            batch.insert(&row_key(*i)[..], row.as_slice());
        }
        self.checkpoints
            .apply_batch(batch)
            .map_err(self.storage("write checkpoint"))?;
        for (i, row) in rows {
            let i = *i as usize;
            if self.checkpoint_rows.len() <= i {
                self.checkpoint_rows.resize(i + 1, 0);
            }
            self.checkpoint_rows[i] = (5 + row.len()) as u64;
        }
        self.checkpoint_bytes =
            (CHECKPOINT_KEY.len() + header.len()) as u64 + self.checkpoint_rows.iter().sum::<u64>();
        Ok(())
    }

    /// The stored checkpoint, if any: its header and every row with its index, in index order.
    pub fn checkpoint(&self) -> Result<Option<StoredCheckpoint>, OutboxError> {
        let Some(header) = self
            .checkpoints
            .get(CHECKPOINT_KEY)
            .map_err(self.storage("read checkpoint"))?
        else {
            return Ok(None);
        };
        let mut rows = Vec::new();
        for item in self.checkpoints.scan_prefix([CHECKPOINT_ROW]) {
            let (k, v) = item.map_err(self.storage("read checkpoint"))?;
            let index = <[u8; 4]>::try_from(&k[1..]).map_err(|_| OutboxError::Malformed {
                path: self.path.clone(),
                tree: CHECKPOINT_TREE,
                key: hex(&k),
                problem: "checkpoint row key is not 5 bytes".into(),
            })?;
            rows.push((u32::from_be_bytes(index), v.to_vec()));
        }
        Ok(Some((header.to_vec(), rows)))
    }

    /// Deletes the stored checkpoint (the agent starts from empty state and will not use it).
    pub fn clear_checkpoint(&mut self) -> Result<(), OutboxError> {
        self.checkpoints
            .clear()
            .map_err(self.storage("clear checkpoint"))?;
        self.checkpoint_rows.clear();
        self.checkpoint_bytes = 0;
        Ok(())
    }

    /// Key + value bytes of the stored checkpoint (counted in the disk budget).
    pub fn checkpoint_bytes(&self) -> u64 {
        self.checkpoint_bytes
    }

    fn load_checkpoint_sizes(&mut self) -> Result<(), OutboxError> {
        let mut total = 0;
        for item in self.checkpoints.iter() {
            let (k, v) = item.map_err(self.storage("read checkpoint"))?;
            let size = (k.len() + v.len()) as u64;
            total += size;
            if k.len() == 5 && k[0] == CHECKPOINT_ROW {
                let i = u32::from_be_bytes([k[1], k[2], k[3], k[4]]) as usize;
                if self.checkpoint_rows.len() <= i {
                    self.checkpoint_rows.resize(i + 1, 0);
                }
                self.checkpoint_rows[i] = size;
            }
        }
        self.checkpoint_bytes = total;
        Ok(())
    }

    /// Key + value bytes of the stored records.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Counters since open.
    pub fn stats(&self) -> OutboxStats {
        self.stats
    }

    /// What the records may take: the budget less the checkpoint.
    fn records_budget(&self) -> u64 {
        self.cfg
            .max_outbox_bytes
            .saturating_sub(self.checkpoint_bytes)
    }

    fn target(&self) -> u64 {
        let budget = self.records_budget();
        budget / 100 * RECLAIM_TARGET_PERCENT + budget % 100 * RECLAIM_TARGET_PERCENT / 100
    }

    fn reclaim(&mut self) -> Result<(), OutboxError> {
        let target = self.target();
        if self.summaries > 0 {
            self.coarsen(target)?;
        }
        if self.bytes > target && self.summaries > 0 {
            self.evict(target)?;
        }
        let over = self.bytes > self.records_budget();
        if over {
            self.stats.over_budget += 1;
            if !self.over_budget_now {
                tracing::warn!(path = %self.path.display(), bytes = self.bytes, max_outbox_bytes = self.cfg.max_outbox_bytes,
                    "outbox over budget with anomaly events alone; keeping them all");
            }
        }
        self.over_budget_now = over;
        Ok(())
    }

    /// Runs of mergeable summaries (see the module doc), oldest first: (first seq, partition, seqs).
    fn runs(&self) -> Vec<(u64, u32, Vec<u64>)> {
        let mut runs = Vec::new();
        for (&partition, lane) in &self.lanes {
            let mut open: HashMap<u64, (i64, Vec<u64>)> = HashMap::new();
            let never_sent = lane.exposed.saturating_add(1);
            for (&seq, slot) in lane.slots.range(never_sent..) {
                let SlotKind::Summary {
                    series,
                    start_ms,
                    end_ms,
                    mergeable,
                    ..
                } = slot.kind
                else {
                    continue;
                };
                let extends = mergeable
                    && open
                        .get(&series)
                        .is_some_and(|(open_end, _)| *open_end == start_ms);
                if extends {
                    if let Some(run) = open.get_mut(&series) {
                        run.0 = end_ms;
                        run.1.push(seq);
                    }
                    continue;
                }
                let done = if mergeable {
                    open.insert(series, (end_ms, vec![seq]))
                } else {
                    open.remove(&series)
                };
                if let Some((_, seqs)) = done.filter(|(_, s)| s.len() > 1) {
                    runs.push((seqs[0], partition, seqs));
                }
            }
            runs.extend(
                open.into_values()
                    .filter(|(_, s)| s.len() > 1)
                    .map(|(_, s)| (s[0], partition, s)),
            );
        }
        runs.sort_unstable_by_key(|(first, partition, _)| (*first, *partition));
        runs
    }

    fn coarsen(&mut self, target: u64) -> Result<(), OutboxError> {
        for (_, partition, seqs) in self.runs() {
            if self.bytes <= target {
                break;
            }
            self.merge_run(partition, &seqs)?;
        }
        Ok(())
    }

    /// Reads the run back and merges each stretch that really is adjacent (the index matched series by
    /// hash; a collision just splits the run).
    fn merge_run(&mut self, partition: u32, seqs: &[u64]) -> Result<(), OutboxError> {
        let mut groups: Vec<(u64, WindowSummary, Vec<u64>)> = Vec::new();
        for &seq in seqs {
            let k = key(partition, seq);
            let v = self
                .records
                .get(k)
                .map_err(self.storage(format!("read partition {partition} for coarsening")))?;
            let Some(v) = v else { continue };
            let Record::Summary(s) = self.decode(&k, partition, seq, &v)? else {
                continue;
            };
            match groups.last_mut() {
                Some((_, acc, merged))
                    if acc.device == s.device
                        && acc.metric == s.metric
                        && acc.end_ms == s.start_ms =>
                {
                    merge_summaries(acc, &s);
                    merged.push(seq);
                }
                _ => groups.push((seq, s, Vec::new())),
            }
        }
        groups.retain(|(_, _, merged)| !merged.is_empty());
        if groups.is_empty() {
            return Ok(());
        }
        // The deleted seqs may include the lane's highest: persist next seq so it is never reused.
        self.put_meta(partition)?;
        let mut batch = sled::Batch::default();
        let mut values = Vec::with_capacity(groups.len());
        for (first, summary, merged) in &groups {
            let record = Record::Summary(summary.clone());
            let value = serde_json::to_vec(&record)
                .map_err(|source| OutboxError::Encode { partition, source })?;
            batch.insert(&key(partition, *first), value.as_slice());
            for &s in merged {
                batch.remove(&key(partition, s));
            }
            values.push((record, value.len()));
        }
        self.records
            .apply_batch(batch)
            .map_err(self.storage(format!("coarsen partition {partition}")))?;
        for ((first, _, merged), (record, len)) in groups.iter().zip(values) {
            self.unindex(partition, *first);
            for &s in merged {
                self.unindex(partition, s);
            }
            self.index(partition, *first, &record, (12 + len) as u64);
            self.stats.coarsened += merged.len() as u64;
        }
        Ok(())
    }

    fn evict(&mut self, target: u64) -> Result<(), OutboxError> {
        let mut candidates: Vec<(u64, u32, u64)> = Vec::new();
        for (&partition, lane) in &self.lanes {
            for (&seq, slot) in &lane.slots {
                if matches!(slot.kind, SlotKind::Summary { .. }) {
                    candidates.push((seq, partition, slot.bytes));
                }
            }
        }
        candidates.sort_unstable();
        let mut freed = 0;
        let mut chosen = Vec::new();
        for (seq, partition, bytes) in candidates {
            if self.bytes.saturating_sub(freed) <= target {
                break;
            }
            freed += bytes;
            chosen.push((partition, seq));
        }
        let mut touched: Vec<u32> = chosen.iter().map(|&(p, _)| p).collect();
        touched.sort_unstable();
        touched.dedup();
        for &p in &touched {
            self.put_meta(p)?;
        }
        let mut batch = sled::Batch::default();
        for &(p, s) in &chosen {
            batch.remove(&key(p, s));
        }
        self.records
            .apply_batch(batch)
            .map_err(self.storage("evict summaries"))?;
        for (p, s) in chosen {
            if let Some(Slot {
                kind: SlotKind::Summary { count, .. },
                ..
            }) = self.unindex(p, s)
            {
                self.stats.evicted += 1;
                self.stats.evicted_readings += count;
            }
        }
        let now = std::time::Instant::now();
        if self
            .last_evict_log
            .is_none_or(|t| now.duration_since(t) >= std::time::Duration::from_secs(10))
        {
            self.last_evict_log = Some(now);
            tracing::warn!(path = %self.path.display(), evicted_total = self.stats.evicted, evicted_readings_total = self.stats.evicted_readings,
                "outbox full: evicting the oldest summaries (logged at most every 10 s)");
        }
        Ok(())
    }

    #[cfg(test)]
    fn records_tree(&self) -> &sled::Tree {
        &self.records
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const UNBOUNDED: OutboxConfig = OutboxConfig {
        max_outbox_bytes: u64::MAX,
        normal_score_below: 0.5,
    };

    fn summary_of(device: &str, start_ms: i64, values: &[f64], score: f64) -> WindowSummary {
        let mut st = RunningStats::default();
        values.iter().for_each(|&x| st.push(x));
        WindowSummary {
            device: device.into(),
            metric: "temp".into(),
            start_ms,
            end_ms: start_ms + 10_000,
            count: st.count,
            min: st.min,
            max: st.max,
            mean: st.mean,
            std: st.std(),
            first_ts_ms: start_ms + 1,
            last_ts_ms: start_ms + 9_999,
            max_score: score,
            revision: 0,
        }
    }

    fn summary(device: &str, start_ms: i64) -> Record {
        Record::Summary(summary_of(device, start_ms, &[1.0, 2.0, 4.0], 0.1))
    }

    fn anomaly(device: &str, ts_ms: i64) -> Record {
        Record::Anomaly(AnomalyEvent {
            id: edgewatch_models::wire::event_id(device, "temp", ts_ms, "zscore"),
            device: device.into(),
            metric: "temp".into(),
            ts_ms,
            value: 99.5,
            score: 0.97,
            detector: "zscore".into(),
            window_start_ms: ts_ms - ts_ms % 10_000,
            agent: "gw-1".into(),
        })
    }

    fn seqs(ob: &Outbox, partition: u32) -> Vec<u64> {
        ob.pending(partition, 0, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect()
    }

    #[test]
    fn outbox_can_move_to_a_blocking_thread() {
        fn assert_send<T: Send + 'static>() {}
        assert_send::<Outbox>();
        assert_send::<OutboxError>();
    }

    #[test]
    fn seqs_start_at_one_and_increase_per_lane() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
        assert_eq!(ob.next_seq(3), 1);
        assert_eq!(ob.append(3, summary("a", 0)).unwrap(), 1);
        assert_eq!(ob.append(3, anomaly("a", 5)).unwrap(), 2);
        assert_eq!(ob.append(7, summary("b", 0)).unwrap(), 1);
        assert_eq!(ob.append(3, summary("a", 10_000)).unwrap(), 3);
        assert_eq!(ob.lanes(), vec![3, 7]);
        assert_eq!(seqs(&ob, 3), vec![1, 2, 3]);
        assert_eq!(ob.next_seq(3), 4);
        assert_eq!(ob.next_seq(7), 2);
        assert_eq!(ob.stats().appended, 4);
        assert_eq!(ob.stats().anomalies_kept, 1);
    }

    #[test]
    fn ack_removes_up_to_seq_and_is_cumulative_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
        for i in 0..5 {
            ob.append(1, summary("a", i * 10_000)).unwrap();
        }
        ob.append(2, summary("b", 0)).unwrap();
        ob.expose(1, 5).unwrap();
        let before = ob.bytes();
        assert_eq!(ob.ack(1, 2).unwrap(), 2);
        assert_eq!(seqs(&ob, 1), vec![3, 4, 5]);
        assert_eq!(ob.ack(1, 2).unwrap(), 0, "repeating an ack removes nothing");
        assert_eq!(ob.ack(1, 4).unwrap(), 2);
        assert_eq!(seqs(&ob, 1), vec![5]);
        assert_eq!(ob.acked_seq(1), 4);
        assert_eq!(seqs(&ob, 2), vec![1], "other lanes untouched");
        assert!(ob.bytes() < before);
        assert_eq!(ob.stats().acked, 4);
        assert_eq!(ob.pending(1, 4, 10).unwrap().len(), 1);
        assert_eq!(ob.pending(1, 5, 10).unwrap().len(), 0);
    }

    #[test]
    fn stale_ack_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
        for i in 0..3 {
            ob.append(0, summary("a", i * 10_000)).unwrap();
        }
        ob.expose(0, 3).unwrap();
        ob.ack(0, 2).unwrap();
        assert_eq!(ob.ack(0, 1).unwrap(), 0);
        assert_eq!(ob.ack(0, 0).unwrap(), 0);
        assert_eq!(ob.ack(9, 0).unwrap(), 0);
        assert_eq!(ob.lanes(), vec![0], "an empty ack creates no lane");
        assert_eq!(ob.acked_seq(0), 2);
        assert_eq!(seqs(&ob, 0), vec![3]);
    }

    #[test]
    fn ack_above_the_exposed_seq_is_refused_and_deletes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
        for i in 0..5 {
            ob.append(0, summary("a", i * 10_000)).unwrap();
        }
        let refused = |r: Result<usize, OutboxError>| match r {
            Err(e @ OutboxError::AckAhead { .. }) => e.to_string(),
            other => panic!("expected a refusal, got {other:?}"),
        };
        // Nothing sent yet: no ack can be true.
        let msg = refused(ob.ack(0, 1));
        assert!(
            msg.contains("up to seq 1 refused: only seqs up to 0"),
            "{msg}"
        );
        ob.expose(0, 3).unwrap();
        refused(ob.ack(0, 4));
        refused(ob.ack(0, u64::MAX));
        refused(ob.ack(7, 1));
        assert_eq!(seqs(&ob, 0), vec![1, 2, 3, 4, 5], "nothing deleted");
        assert_eq!(
            (ob.acked_seq(0), ob.next_seq(0)),
            (0, 6),
            "the lane did not move"
        );
        assert_eq!(ob.ack(0, 3).unwrap(), 3);
        // Exposure never passes what was appended, so neither can an ack.
        ob.expose(0, 1_000).unwrap();
        assert_eq!(ob.exposed_seq(0), 5);
        refused(ob.ack(0, 6));
        assert_eq!(ob.ack(0, 5).unwrap(), 2);
        assert_eq!(ob.append(0, summary("a", 90_000)).unwrap(), 6);
    }

    #[test]
    fn the_epoch_is_drawn_once_stored_and_kept_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let epoch = {
            let mut ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
            assert!(!ob.is_temporary());
            ob.append(0, summary("a", 0)).unwrap();
            ob.epoch()
        };
        assert_ne!(epoch, LEGACY_EPOCH);
        let ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
        assert_eq!(ob.epoch(), epoch);
        drop(ob);
        // A wiped directory is a new outbox: seqs start again at 1, in a new epoch.
        let other = tempfile::tempdir().unwrap();
        let fresh = Outbox::open(other.path(), UNBOUNDED).unwrap();
        assert_ne!(fresh.epoch(), epoch);
        assert_ne!(fresh.epoch(), LEGACY_EPOCH);
    }

    #[test]
    fn temporary_outboxes_have_a_new_epoch_every_time() {
        let a = Outbox::open_temporary(UNBOUNDED).unwrap();
        let b = Outbox::open_temporary(UNBOUNDED).unwrap();
        assert!(a.is_temporary());
        assert_ne!(a.epoch(), b.epoch());
        assert!(a.epoch() != LEGACY_EPOCH && b.epoch() != LEGACY_EPOCH);
    }

    #[test]
    fn an_outbox_from_before_epochs_keeps_the_legacy_epoch_and_its_lanes() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
            for i in 0..3 {
                ob.append(4, summary("a", i * 10_000)).unwrap();
            }
            // What an older version left: no epoch, and 16-byte lane meta (no exposure).
            ob.db.drop_tree(EPOCH_TREE).unwrap();
            let mut v = [0u8; 16];
            v[..8].copy_from_slice(&1u64.to_be_bytes());
            v[8..].copy_from_slice(&4u64.to_be_bytes());
            ob.meta.insert(4u32.to_be_bytes(), &v).unwrap();
            ob.flush().unwrap();
        }
        let mut ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
        assert_eq!(ob.epoch(), LEGACY_EPOCH);
        assert_eq!((ob.acked_seq(4), ob.next_seq(4)), (1, 4));
        assert_eq!(ob.exposed_seq(4), 3, "everything stored may have been sent");
        assert_eq!(ob.ack(4, 3).unwrap(), 2);
        // An older version rewrote such a lane with exposure u64::MAX: still bounded by the next seq.
        let mut v = [0u8; 24];
        v[..8].copy_from_slice(&3u64.to_be_bytes());
        v[8..16].copy_from_slice(&4u64.to_be_bytes());
        v[16..].copy_from_slice(&u64::MAX.to_be_bytes());
        ob.meta.insert(4u32.to_be_bytes(), &v).unwrap();
        ob.flush().unwrap();
        drop(ob);
        let mut ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
        assert_eq!(ob.epoch(), LEGACY_EPOCH);
        assert_eq!(ob.exposed_seq(4), 3);
        assert!(matches!(
            ob.ack(4, 1_000),
            Err(OutboxError::AckAhead { .. })
        ));
        assert_eq!(ob.append(4, summary("a", 90_000)).unwrap(), 4);
    }

    #[test]
    fn reopen_restores_next_seq_acked_seq_and_pending_records() {
        let dir = tempfile::tempdir().unwrap();
        let (pending, bytes) = {
            let mut ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
            for i in 0..4 {
                ob.append(5, summary("a", i * 10_000)).unwrap();
            }
            ob.append(5, anomaly("a", 7)).unwrap();
            ob.append(9, summary("b", 0)).unwrap();
            ob.expose(9, 1).unwrap();
            ob.expose(5, 2).unwrap();
            ob.ack(9, 1).unwrap();
            ob.ack(5, 2).unwrap();
            ob.flush().unwrap();
            (ob.pending(5, 0, 100).unwrap(), ob.bytes())
        };
        let mut ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
        assert_eq!(ob.lanes(), vec![5, 9]);
        assert_eq!(ob.acked_seq(5), 2);
        assert_eq!(ob.acked_seq(9), 1);
        assert_eq!(ob.next_seq(5), 6);
        assert_eq!(ob.next_seq(9), 2);
        assert_eq!(ob.pending(5, 0, 100).unwrap(), pending);
        assert_eq!(ob.bytes(), bytes);
        assert_eq!(ob.stats().anomalies_kept, 1);
        assert_eq!(ob.append(9, summary("b", 10_000)).unwrap(), 2);
    }

    #[test]
    fn coarsening_merges_exactly_and_keeps_seq_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
        let values: Vec<Vec<f64>> = vec![
            vec![1.5, 2.25, 3.0],
            vec![10.0],
            vec![-4.0, 7.5, 7.5, 0.125],
        ];
        // Lane 0: a0 a1 (anomaly) b0 a2 a-anomalous(gap-free but score high) a4
        ob.append(0, Record::Summary(summary_of("a", 0, &values[0], 0.1)))
            .unwrap();
        ob.append(0, Record::Summary(summary_of("a", 10_000, &values[1], 0.2)))
            .unwrap();
        ob.append(0, anomaly("a", 15_000)).unwrap();
        ob.append(0, summary("b", 0)).unwrap();
        ob.append(0, Record::Summary(summary_of("a", 20_000, &values[2], 0.3)))
            .unwrap();
        ob.append(0, Record::Summary(summary_of("a", 30_000, &[1.0], 0.9)))
            .unwrap();
        ob.append(0, Record::Summary(summary_of("a", 40_000, &[1.0], 0.1)))
            .unwrap();
        let before = ob.bytes();
        ob.cfg.max_outbox_bytes = before - 1;
        ob.reclaim().unwrap();

        assert_eq!(ob.stats().coarsened, 2);
        assert_eq!(ob.stats().evicted, 0);
        assert!(ob.bytes() < before);
        let pending = ob.pending(0, 0, 100).unwrap();
        let got: Vec<u64> = pending.iter().map(|(s, _)| *s).collect();
        assert_eq!(got, vec![1, 3, 4, 6, 7], "the run keeps its lowest seq");
        let Record::Summary(m) = &pending[0].1 else {
            panic!("seq 1 must be a summary")
        };
        let mut want = RunningStats::default();
        values.iter().flatten().for_each(|&x| want.push(x));
        assert_eq!((m.start_ms, m.end_ms), (0, 30_000));
        assert_eq!(m.count, want.count);
        assert_eq!((m.min, m.max), (want.min, want.max));
        assert!(
            (m.mean - want.mean).abs() < 1e-12,
            "{} vs {}",
            m.mean,
            want.mean
        );
        assert!(
            (m.std - want.std()).abs() < 1e-12,
            "{} vs {}",
            m.std,
            want.std()
        );
        assert_eq!((m.first_ts_ms, m.last_ts_ms), (1, 29_999));
        assert_eq!(m.max_score, 0.3);
        // Survives reopen, and the next seq is not reused.
        drop(ob);
        let mut ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
        assert_eq!(ob.pending(0, 0, 100).unwrap(), pending);
        assert_eq!(ob.append(0, summary("a", 50_000)).unwrap(), 8);
    }

    #[test]
    fn eviction_removes_oldest_summaries_and_never_anomalies() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
        // Gaps between windows: nothing can be coarsened.
        for i in 0..6 {
            ob.append(0, summary("a", i * 20_000)).unwrap();
            ob.append(1, anomaly("b", i)).unwrap();
        }
        let one = ob.bytes() / 12;
        ob.cfg.max_outbox_bytes = ob.bytes() - 1;
        ob.reclaim().unwrap();
        assert_eq!(ob.stats().coarsened, 0);
        assert!(ob.stats().evicted >= 1);
        assert_eq!(ob.stats().evicted_readings, 3 * ob.stats().evicted);
        let left = seqs(&ob, 0);
        assert_eq!(
            left.first(),
            Some(&(ob.stats().evicted + 1)),
            "oldest go first"
        );
        assert_eq!(seqs(&ob, 1).len(), 6);
        assert!(ob.bytes() <= ob.target());

        // Anomalies alone over budget: all summaries go, every anomaly stays.
        ob.cfg.max_outbox_bytes = one;
        ob.append(1, anomaly("b", 100)).unwrap();
        assert!(seqs(&ob, 0).is_empty());
        assert_eq!(seqs(&ob, 1), (1..=7).collect::<Vec<_>>());
        assert_eq!(ob.stats().anomalies_kept, 7);
        assert_eq!(ob.stats().over_budget, 1);
        assert_eq!(ob.stats().evicted, 6);
        // Eviction of a lane's newest record does not make its seq reusable.
        drop(ob);
        let mut ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
        assert_eq!(ob.append(0, summary("a", 0)).unwrap(), 7);
    }

    #[test]
    fn corrupt_value_is_reported_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
        ob.append(2, summary("a", 0)).unwrap();
        ob.records_tree()
            .insert(key(2, 1), &b"\x00garbage"[..])
            .unwrap();
        let err = ob.pending(2, 0, 10).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(
            err,
            OutboxError::Corrupt {
                partition: 2,
                seq: 1,
                ..
            }
        ));
        assert!(msg.contains("000000020000000000000001"), "{msg}");
        assert!(msg.contains("not retryable"), "{msg}");
        assert!(!err.is_retryable());
        ob.flush().unwrap();
        drop(ob);
        let err = Outbox::open(dir.path(), UNBOUNDED).err().unwrap();
        assert!(err.to_string().contains("partition 2, seq 1"), "{err}");
    }

    #[test]
    fn non_finite_values_and_bad_config_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let bad = OutboxConfig {
            max_outbox_bytes: 0,
            normal_score_below: 0.5,
        };
        assert!(matches!(
            Outbox::open(dir.path(), bad),
            Err(OutboxError::InvalidConfig(_))
        ));
        let mut ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
        let mut s = summary_of("a", 0, &[1.0], 0.1);
        s.std = f64::NAN;
        let err = ob.append(0, Record::Summary(s)).unwrap_err();
        assert!(err.to_string().contains("field std is NaN"), "{err}");
        assert_eq!(ob.next_seq(0), 1);
    }

    // ---- property tests against an in-memory model ----

    #[derive(Debug, Clone)]
    enum Op {
        Summary {
            lane: u32,
            series: u8,
            gap: bool,
            values: Vec<i16>,
            anomalous: bool,
        },
        Anomaly {
            lane: u32,
        },
        Flush,
        Ack {
            lane: u32,
            back: u64,
        },
        Reopen,
    }

    fn op(acks: bool) -> impl Strategy<Value = Op> {
        let summary = (
            0..4u32,
            0..2u8,
            prop::bool::weighted(0.2),
            prop::collection::vec(any::<i16>(), 1..5),
            prop::bool::weighted(0.2),
        )
            .prop_map(|(lane, series, gap, values, anomalous)| Op::Summary {
                lane,
                series,
                gap,
                values,
                anomalous,
            });
        let ack_weight = if acks { 2 } else { 0 };
        prop_oneof![
            6 => summary,
            2 => (0..4u32).prop_map(|lane| Op::Anomaly { lane }),
            1 => Just(Op::Flush),
            ack_weight => (0..4u32, 0..6u64).prop_map(|(lane, back)| Op::Ack { lane, back }),
            1 => Just(Op::Reopen),
        ]
    }

    /// Turns ops into records with contiguous windows per (lane, series) unless `gap`.
    struct Gen {
        next_start: HashMap<(u32, u8), i64>,
        ts: i64,
    }

    impl Gen {
        fn record(&mut self, op: &Op) -> Option<(u32, Record)> {
            self.ts += 1;
            match op {
                Op::Summary {
                    lane,
                    series,
                    gap,
                    values,
                    anomalous,
                } => {
                    let start = self.next_start.entry((*lane, *series)).or_insert(0);
                    if *gap {
                        *start += 10_000;
                    }
                    let xs: Vec<f64> = values.iter().map(|&v| f64::from(v) / 8.0).collect();
                    let score = if *anomalous { 0.9 } else { 0.1 };
                    let s = summary_of(&format!("dev-{series}"), *start, &xs, score);
                    *start += 10_000;
                    Some((*lane, Record::Summary(s)))
                }
                Op::Anomaly { lane } => Some((*lane, anomaly("dev-0", self.ts))),
                _ => None,
            }
        }
    }

    #[derive(Default)]
    struct Model {
        lanes: BTreeMap<u32, (u64, u64, BTreeMap<u64, Record>)>, // acked, next, records
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn outbox_matches_an_in_memory_model(ops in prop::collection::vec(op(true), 1..40)) {
            let dir = tempfile::tempdir().unwrap();
            let mut ob = Some(Outbox::open(dir.path(), UNBOUNDED).unwrap_or_else(|e| panic!("reopen: {e:?}")));
            let mut model = Model::default();
            let mut gen = Gen { next_start: HashMap::new(), ts: 0 };
            for op in &ops {
                let o = ob.as_mut().unwrap();
                match op {
                    Op::Flush => o.flush().unwrap(),
                    Op::Reopen => {
                        drop(ob.take());
                        ob = Some(Outbox::open(dir.path(), UNBOUNDED).unwrap_or_else(|e| panic!("reopen: {e:?}")));
                    }
                    Op::Ack { lane, back } => {
                        let lm = model.lanes.entry(*lane).or_insert((0, 1, BTreeMap::new()));
                        let upto = lm.1.saturating_sub(*back);
                        // The uplink exposes what it publishes; an owner acks only that.
                        o.expose(*lane, upto).unwrap();
                        if upto >= lm.1 {
                            // Never appended, so never sent: refused, and nothing changes.
                            let refused = matches!(o.ack(*lane, upto), Err(OutboxError::AckAhead { .. }));
                            prop_assert!(refused, "ack of unsent seq {} accepted", upto);
                        } else {
                            let removed_model = if upto > lm.0 {
                                lm.0 = upto;
                                let keep = lm.2.split_off(&(upto + 1));
                                std::mem::replace(&mut lm.2, keep).len()
                            } else {
                                0
                            };
                            prop_assert_eq!(o.ack(*lane, upto).unwrap(), removed_model);
                        }
                    }
                    _ => {
                        let (lane, record) = gen.record(op).unwrap();
                        let lm = model.lanes.entry(lane).or_insert((0, 1, BTreeMap::new()));
                        let seq = o.append(lane, record.clone()).unwrap();
                        prop_assert_eq!(seq, lm.1, "seqs are never reused");
                        lm.1 += 1;
                        lm.2.insert(seq, record);
                    }
                }
                let o = ob.as_ref().unwrap();
                for (lane, (acked, next, records)) in &model.lanes {
                    let want: Vec<(u64, Record)> = records.iter().map(|(s, r)| (*s, r.clone())).collect();
                    prop_assert_eq!(o.pending(*lane, 0, usize::MAX).unwrap(), want);
                    prop_assert_eq!(o.next_seq(*lane), *next);
                    prop_assert_eq!(o.acked_seq(*lane), *acked);
                }
            }
        }

    }

    // sled takes ~20 ms to open in a debug build: fewer, longer cases keep this test near 3 s.
    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn small_budget_keeps_every_anomaly_and_every_reading_not_evicted(
            ops in prop::collection::vec(op(false), 1..50),
            max_outbox_bytes in 1_500u64..6_000,
        ) {
            let cfg = OutboxConfig { max_outbox_bytes, normal_score_below: 0.5 };
            let dir = tempfile::tempdir().unwrap();
            let mut ob = Some(Outbox::open(dir.path(), cfg.clone()).unwrap());
            let mut gen = Gen { next_start: HashMap::new(), ts: 0 };
            let mut anomalies: BTreeMap<u32, Vec<Record>> = BTreeMap::new();
            let (mut readings, mut evicted_before) = (0u64, 0u64);
            for op in &ops {
                let o = ob.as_mut().unwrap();
                match op {
                    Op::Flush => o.flush().unwrap(),
                    Op::Reopen => {
                        let bytes = o.bytes();
                        evicted_before += o.stats().evicted_readings;
                        drop(ob.take());
                        let o = Outbox::open(dir.path(), cfg.clone()).unwrap_or_else(|e| panic!("reopen: {e:?}"));
                        prop_assert_eq!(o.bytes(), bytes);
                        ob = Some(o);
                    }
                    _ => {
                        let (lane, record) = gen.record(op).unwrap();
                        match &record {
                            Record::Summary(s) => readings += s.count,
                            Record::Anomaly(_) => anomalies.entry(lane).or_default().push(record.clone()),
                        }
                        o.append(lane, record).unwrap();
                    }
                }
                let o = ob.as_ref().unwrap();
                let mut stored = 0;
                let mut summaries = 0;
                for lane in o.lanes() {
                    let pending = o.pending(lane, 0, usize::MAX).unwrap();
                    prop_assert!(pending.windows(2).all(|w| w[0].0 < w[1].0));
                    let kept: Vec<Record> = pending.iter().filter(|(_, r)| matches!(r, Record::Anomaly(_))).map(|(_, r)| r.clone()).collect();
                    let want = anomalies.get(&lane).cloned().unwrap_or_default();
                    prop_assert_eq!(kept, want);
                    for (_, r) in &pending {
                        if let Record::Summary(s) = r {
                            stored += s.count;
                            summaries += 1;
                        }
                    }
                }
                prop_assert_eq!(stored, readings - evicted_before - o.stats().evicted_readings);
                prop_assert!(o.bytes() <= max_outbox_bytes || summaries == 0,
                    "{} bytes over {} with {} summaries left", o.bytes(), max_outbox_bytes, summaries);
            }
        }
    }
}
