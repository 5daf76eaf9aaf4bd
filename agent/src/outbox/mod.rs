//! The agent's durable outbox: every window summary and anomaly event is stored here, in one lane per
//! partition with a monotonically increasing seq, until the lane's owner acknowledges it.
//!
//! **Owns:** the sled database in one directory (a `records` tree keyed `partition (u32 BE) ++ seq
//! (u64 BE)`, so a lane is one ordered key range, a `meta` tree holding each lane's acked seq and
//! next seq, and an `epoch` tree holding the outbox's lane epoch), the pipeline checkpoint file
//! beside it (`store.rs`; a `checkpoint` tree of older versions is read once and emptied), the byte
//! accounting, and the disk budget (coarsening, eviction). **Does not own:**
//! the network, retries, timers or async: it is a synchronous state machine that the uplink task drives
//! (from `spawn_blocking` or a dedicated thread, since sled calls block).
//!
//! **Files:** `mod.rs` (the [`Outbox`] facade: open, load, flush, counters), `lanes.rs` (lanes, seqs,
//! epochs, acks, exposed seq), `budget.rs` (coarsening, eviction), `store.rs` (checkpoint storage),
//! `error.rs` ([`OutboxError`]).
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
//! Training samples (training lanes) are never coarsened; they are evicted oldest first before
//! anything else, and whenever they take more than [`TRAINING_SHARE_PERCENT`] of the budget.
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
use edgewatch_models::wire::{AnomalyEvent, TrainingSample, WindowSummary, LEGACY_EPOCH};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::Xxh3;

mod budget;
mod error;
mod journal;
mod lanes;
mod store;

use budget::*;
pub use error::OutboxError;
use lanes::*;
pub use store::StoredCheckpoint;
use store::*;

/// After a reclaim, [`Outbox::bytes`] is at most this percentage of `max_outbox_bytes` (unless anomaly
/// events alone take more).
pub const RECLAIM_TARGET_PERCENT: u64 = 90;

/// Training samples may take at most this percentage of the records' budget: beyond it the oldest
/// are deleted (an aggregator that does not train never acknowledges them, and they are only a
/// sample), so they never crowd out summaries.
pub const TRAINING_SHARE_PERCENT: u64 = 10;

const RECORDS_TREE: &str = "records";
const META_TREE: &str = "meta";

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
    /// Sampled vectors of one device for the aggregator's device models; only in training lanes
    /// ([`edgewatch_models::wire::lane_id`]).
    Training(TrainingSample),
}

/// Counters since [`Outbox::open`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Records appended.
    pub appended: u64,
    /// Records removed by acks.
    pub acked: u64,
    /// Training samples deleted unsent: over [`TRAINING_SHARE_PERCENT`] of the budget, or to make
    /// room (they go before any summary).
    pub training_evicted: u64,
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
    /// A temporary outbox's checkpoint (nothing of it survives the process, so no file).
    checkpoint_mem: Option<MemCheckpoint>,
    /// The checkpoint being handed over in chunks.
    staging: Staging,
    /// The checkpoint file and its journal.
    files: CheckpointFiles,
    lanes: BTreeMap<u32, Lane>,
    bytes: u64,
    summaries: u64,
    /// Training samples stored, and their bytes.
    training: u64,
    training_bytes: u64,
    stats: OutboxStats,
    /// Whether the last append left anomaly events alone above the budget (logged on the transition).
    over_budget_now: bool,
    /// When eviction was last logged (rate limit).
    last_evict_log: Option<std::time::Instant>,
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
        Record::Training(t) => {
            return match t.rows.iter().flatten().find(|v| !v.is_finite()) {
                Some(&value) => Err(OutboxError::NotFinite {
                    partition,
                    field: "rows",
                    value,
                }),
                None => Ok(()),
            };
        }
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

/// sled's page cache bound by default (`state.cache_bytes`). sled's own default (1 GiB) would let a
/// gateway agent's memory grow with what it once wrote; records are read back only for resends,
/// so a small cache costs little. sled's memory use exceeds this bound (its page table and log
/// buffers come on top, about 10 MB more at 10 k series).
pub const SLED_CACHE_BYTES: u64 = 4 << 20;

fn sled_config(cache_bytes: u64) -> sled::Config {
    sled::Config::new()
        .flush_every_ms(None)
        .cache_capacity(cache_bytes)
}

/// How long [`Outbox::open`] waits for a previous handle on the same directory to let go of it.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens sled with background flushing off. sled releases its directory lock from background threads
/// some milliseconds after the last handle is dropped, so a reopen in the same process retries a lock
/// conflict for up to [`LOCK_WAIT`].
fn open_db(path: &Path, cache_bytes: u64) -> sled::Result<sled::Db> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match sled_config(cache_bytes).path(path).open() {
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

impl Outbox {
    /// Opens (or creates) the outbox in directory `path`, restoring every lane's next seq, acked seq and
    /// pending records. Reads every stored record once to rebuild the index; a damaged one fails the
    /// open with an error naming its key. If the directory is locked (another handle, possibly one just
    /// dropped in this process), waits up to 2 s before failing with a retryable error. Blocking.
    pub fn open(path: &Path, cfg: OutboxConfig) -> Result<Outbox, OutboxError> {
        Self::open_with_cache(path, cfg, SLED_CACHE_BYTES)
    }

    /// [`Outbox::open`] with sled's page cache bounded to `cache_bytes` (> 0) instead of
    /// [`SLED_CACHE_BYTES`].
    pub fn open_with_cache(
        path: &Path,
        cfg: OutboxConfig,
        cache_bytes: u64,
    ) -> Result<Outbox, OutboxError> {
        if cache_bytes == 0 {
            return Err(OutboxError::InvalidConfig(
                "the outbox cache must be > 0 bytes, got 0".into(),
            ));
        }
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
        let db = open_db(path, cache_bytes).map_err(open_err)?;
        Self::with_db(db, path, cfg, false)
    }

    /// An outbox in a temporary sled database, deleted when dropped: the same behaviour without
    /// durability (an agent without `state.dir`).
    pub fn open_temporary(cfg: OutboxConfig) -> Result<Outbox, OutboxError> {
        let path = Path::new("(temporary outbox)");
        let db = sled_config(SLED_CACHE_BYTES)
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
            checkpoint_mem: None,
            staging: Staging::Idle,
            files: CheckpointFiles::default(),
            lanes: BTreeMap::new(),
            bytes: 0,
            summaries: 0,
            training: 0,
            training_bytes: 0,
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

    /// Makes everything appended so far durable (one sled flush). Publish only after this returned.
    pub fn flush(&mut self) -> Result<(), OutboxError> {
        self.db.flush().map_err(self.storage("flush"))?;
        Ok(())
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

    /// Key + value bytes of the stored records.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Counters since open.
    pub fn stats(&self) -> OutboxStats {
        self.stats
    }

    #[cfg(test)]
    fn records_tree(&self) -> &sled::Tree {
        &self.records
    }
}

#[cfg(test)]
mod tests;
