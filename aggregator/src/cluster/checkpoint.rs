//! Checkpoints of partition state in the `checkpoints` KV bucket, fenced by the lease epoch.
//!
//! One key per partition, `p{partition}`, written only by compare-and-set on the revision of this
//! owner's previous write. The value carries the epoch (the lease revision) it was written under.
//! An owner that wins a lease first [`KvCheckpoints::take_over`]: it reads the last checkpoint and
//! writes it straight back under its own epoch. From then on, any write of a previous owner, which
//! still expects the revision it last wrote, fails with [`CheckpointError::Fenced`], however late
//! it arrives and whatever that owner believes about its lease.
//!
//! Except that nats-server checks a write's expected revision before proposing it, not when
//! applying it (2.9, nats-server issue 4320; later versions lose the in-flight state across a
//! leader change): two writes expecting the same revision that arrive together can both land.
//! [`KvCheckpoints::take_over_chain`] therefore looks for a record that landed between the revision
//! it read and its own, and takes over again from what precedes its own record if one did (the
//! previous owner had that write acknowledged); [`KvCheckpoints::take_over`], on a bucket keeping
//! one value per key, cannot see it.
//!
//! Value layout: version byte `1`, the epoch as u64 little-endian, then the state bytes as given:
//! a *base*, the whole state. Incremental checkpoints ([`KvCheckpoints::write_delta`]) append
//! *delta* records (version byte `2`, the epoch, then the delta bytes) to the same key by the same
//! compare-and-set, in a bucket that keeps [`CHAIN_HISTORY`] values per key; a partition's
//! checkpoint is then its last base and the deltas after it ([`KvCheckpoints::take_over_chain`]
//! reads them in order). A base write purges the records before it. A value is one NATS message,
//! so its size is bounded by the servers' `max_payload` (1 MiB by default). Not owned here: how
//! state and deltas are serialised, when to write a base, the lease.

use super::kv::KvError;
use super::lease::key;
use async_nats::jetstream::kv;
use bytes::{BufMut, Bytes, BytesMut};

/// The production bucket of partition checkpoints.
pub const CHECKPOINTS_BUCKET: &str = "checkpoints";

const VERSION: u8 = 1;
/// A delta record: applies on top of the base and deltas before it.
const VERSION_DELTA: u8 = 2;
const HEADER: usize = 1 + 8;

/// Values kept per key in the checkpoints bucket in incremental mode: a base and the deltas after
/// it. [`MAX_DELTAS`] keeps a base well inside it, and a base write purges what precedes it.
pub const CHAIN_HISTORY: i64 = 64;

/// At most this many deltas follow a base: the writer compacts at this count, and a take-over that
/// finds this many writes a base instead of a marker. Below [`CHAIN_HISTORY`] with room for
/// deltas written by an owner that was fenced a moment later (each appends at most one).
pub const MAX_DELTAS: usize = 48;

/// How many times [`KvCheckpoints::take_over`] re-reads when a write of the previous owner lands
/// between its read and its write.
const TAKE_OVER_ATTEMPTS: usize = 5;

/// Errors of checkpoint operations.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The partition moved on: a newer owner took it over (or this owner's epoch is older than
    /// the stored one). Drop the partition and stop acknowledging; never retried.
    #[error("checkpoint p{partition}: fenced: epoch {epoch} is stale ({reason})")]
    Fenced {
        /// The partition.
        partition: u32,
        /// The epoch (lease revision) this owner wrote under.
        epoch: u64,
        /// What showed it.
        reason: String,
    },
    /// A stored value is not a checkpoint of this format; never retried (the key needs repair).
    #[error("checkpoint p{partition}: corrupt value at revision {revision}: {reason}")]
    Corrupt {
        /// The partition.
        partition: u32,
        /// The value's revision.
        revision: u64,
        /// Why it cannot be decoded.
        reason: String,
    },
    /// The write was not answered in time; it may or may not have landed. Retry with the next
    /// checkpoint ([`KvCheckpoints::write`] resynchronises its fence on the conflict).
    #[error(
        "checkpoint p{partition}: no answer within {after:?} (retried with the next checkpoint)"
    )]
    Timeout {
        /// The partition.
        partition: u32,
        /// How long it waited.
        after: std::time::Duration,
    },
    /// The KV could not be reached or answered otherwise (see [`KvError`] for retrying).
    #[error(transparent)]
    Kv(#[from] KvError),
}

/// This owner's position in one partition's checkpoint history: the epoch it writes under and
/// the revision of its last write. Only [`KvCheckpoints::take_over`] makes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointFence {
    /// The partition.
    pub partition: u32,
    /// The epoch (lease revision) written into every checkpoint.
    pub epoch: u64,
    /// The KV revision of this owner's last write; the next write expects it.
    pub revision: u64,
}

/// A checkpoint as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The epoch it was written under.
    pub epoch: u64,
    /// Its KV revision.
    pub revision: u64,
    /// The partition state, as the writer serialised it.
    pub state: Bytes,
}

/// Checkpoints in one KV bucket.
#[derive(Debug, Clone)]
pub struct KvCheckpoints {
    store: kv::Store,
    /// Whether the bucket keeps more than one value per key (chains of records); a base write
    /// then purges the records before it.
    chained: bool,
}

/// How long reading a partition's chain of records may take.
const CHAIN_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn encode(epoch: u64, state: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(HEADER + state.len());
    b.put_u8(VERSION);
    b.put_u64_le(epoch);
    b.put_slice(state);
    b.freeze()
}

fn encode_delta(epoch: u64, delta: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(HEADER + delta.len());
    b.put_u8(VERSION_DELTA);
    b.put_u64_le(epoch);
    b.put_slice(delta);
    b.freeze()
}

/// The epoch and state of a stored base value.
fn decode(value: &Bytes) -> Result<(u64, Bytes), String> {
    match decode_record(value)? {
        (epoch, Kind::Base, state) => Ok((epoch, state)),
        (_, Kind::Delta, _) => Err(format!(
            "unknown format version {VERSION_DELTA} (a delta record of an incremental \
             checkpoint: read it with take_over_chain)"
        )),
    }
}

/// What a stored record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The whole state.
    Base,
    /// Changes on top of the records before it.
    Delta,
}

/// Whether a raw stream message of a key is a delete or purge marker, not a record.
fn is_marker(msg: &async_nats::jetstream::message::StreamMessage) -> bool {
    msg.headers
        .get("KV-Operation")
        .is_some_and(|op| op.as_str() == "DEL" || op.as_str() == "PURGE")
}

/// The epoch, kind and payload of a stored record.
fn decode_record(value: &Bytes) -> Result<(u64, Kind, Bytes), String> {
    let kind = match value.first() {
        None => return Err("empty value".into()),
        Some(&VERSION) => Kind::Base,
        Some(&VERSION_DELTA) => Kind::Delta,
        Some(v) => return Err(format!("unknown format version {v}")),
    };
    if value.len() < HEADER {
        return Err(format!("{} bytes, shorter than the header", value.len()));
    }
    let mut epoch = [0u8; 8];
    epoch.copy_from_slice(&value[1..HEADER]);
    Ok((u64::from_le_bytes(epoch), kind, value.slice(HEADER..)))
}

/// A partition's checkpoint as a chain: its last base and the deltas after it, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    /// The base's payload (empty for a partition never checkpointed).
    pub base: Bytes,
    /// The deltas' payloads after the base, in write order.
    pub deltas: Vec<Bytes>,
    /// Bytes stored: the base's and the deltas' values.
    pub bytes: usize,
}

/// How a take-over marks its epoch in the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakeOverWrite {
    /// An empty delta when fewer than [`MAX_DELTAS`] deltas follow the base, else a base.
    Marker,
    /// Always the whole state as a base (full mode: what older members read).
    Base,
}

/// Whether a write whose compare-and-set on `fence.revision` conflicted may be retried on top of
/// the key's last record (`head_epoch`, `head_revision`): only when that record carries this
/// owner's own epoch (a write of its own that timed out but landed; no other owner writes under
/// it). The fence then adopts its revision.
pub(crate) fn resync(fence: &mut CheckpointFence, head_epoch: u64, head_revision: u64) -> bool {
    if head_epoch == fence.epoch && head_revision != fence.revision {
        fence.revision = head_revision;
        return true;
    }
    false
}

/// Whether a take-over that found `deltas` deltas after the base writes a new base folded from
/// the chain (rather than the base again, or a marker).
pub(crate) fn take_over_compacts(deltas: usize, write: TakeOverWrite) -> bool {
    deltas >= MAX_DELTAS || (write == TakeOverWrite::Base && deltas > 0)
}

/// The last record of a chain as read: the epoch and revision a take-over checks and expects.
struct Head {
    epoch: u64,
    revision: u64,
}

impl KvCheckpoints {
    /// Checkpoints in `store` (a bucket without TTL).
    pub fn new(store: kv::Store) -> Self {
        let chained = store.stream.cached_info().config.max_messages_per_subject > 1;
        Self { store, chained }
    }

    /// Opens (creating if needed) bucket `bucket`, without TTL, with `replicas` replicas.
    pub async fn open(
        js: &async_nats::jetstream::Context,
        bucket: &str,
        replicas: usize,
    ) -> Result<Self, CheckpointError> {
        Ok(Self::new(
            super::kv::ensure_bucket(js, bucket, None, replicas).await?,
        ))
    }

    /// Opens (creating if needed) bucket `bucket` for chains of records (incremental
    /// checkpoints): keeping [`CHAIN_HISTORY`] values per key, raising an existing bucket's
    /// history to it.
    pub async fn open_chained(
        js: &async_nats::jetstream::Context,
        bucket: &str,
        replicas: usize,
    ) -> Result<Self, CheckpointError> {
        Ok(Self::new(
            super::kv::ensure_bucket_history(
                js,
                bucket,
                None,
                replicas,
                super::kv::History::AtLeast(CHAIN_HISTORY),
            )
            .await?,
        ))
    }

    /// The last base of `partition` and the deltas after it, with the epoch and revision of the
    /// last record; `None` for a partition never checkpointed (or deleted). A base read last is
    /// one read; otherwise the key's records are read one by one, oldest first (a base write
    /// purges those before it), keeping only what follows the latest base.
    ///
    /// With `before`, only the records before revision `before` are read (what preceded a record
    /// this owner wrote).
    async fn read_chain(
        &self,
        partition: u32,
        before: Option<u64>,
    ) -> Result<Option<(Chain, Head)>, CheckpointError> {
        let k = key(partition);
        let Some(last) = super::kv::live_entry(&self.store, &k).await? else {
            return Ok(None);
        };
        let corrupt = |revision: u64| {
            move |reason: String| CheckpointError::Corrupt {
                partition,
                revision,
                reason,
            }
        };
        let (epoch, kind, payload) = decode_record(&last.value).map_err(corrupt(last.revision))?;
        let upto = before.map_or(last.revision, |b| last.revision.min(b.saturating_sub(1)));
        if kind == Kind::Base && upto == last.revision {
            let chain = Chain {
                base: payload,
                deltas: Vec::new(),
                bytes: last.value.len(),
            };
            let head = Head {
                epoch,
                revision: last.revision,
            };
            return Ok(Some((chain, head)));
        }
        // Record by record through STREAM.MSG.GET (the permission every read already needs; no
        // consumer): the first record of the subject from `seq` on, up to the last one read above.
        let read = async {
            let mut chain: Option<Chain> = None;
            let mut head = None;
            let mut seq = 1;
            while let Some(msg) = self.next_record(&k, seq, upto.saturating_add(1)).await? {
                seq = msg.sequence + 1;
                if is_marker(&msg) {
                    chain = None;
                    head = None;
                    continue;
                }
                let (epoch, kind, payload) =
                    decode_record(&msg.payload).map_err(corrupt(msg.sequence))?;
                match (kind, &mut chain) {
                    (Kind::Base, _) => {
                        chain = Some(Chain {
                            base: payload,
                            deltas: Vec::new(),
                            bytes: msg.payload.len(),
                        })
                    }
                    (Kind::Delta, Some(c)) => {
                        c.deltas.push(payload);
                        c.bytes += msg.payload.len();
                    }
                    (Kind::Delta, None) => {
                        return Err(corrupt(msg.sequence)(
                            "a delta record without a base before it (the base fell out of \
                             the bucket's history)"
                                .into(),
                        ))
                    }
                }
                head = Some(Head {
                    epoch,
                    revision: msg.sequence,
                });
            }
            Ok(chain.zip(head))
        };
        match tokio::time::timeout(CHAIN_READ_TIMEOUT, read).await {
            Ok(r) => r,
            Err(_) => Err(CheckpointError::Timeout {
                partition,
                after: CHAIN_READ_TIMEOUT,
            }),
        }
    }

    /// Takes `partition` over under `epoch` like [`KvCheckpoints::take_over`], reading its chain
    /// (last base and the deltas after it) and appending a record under `epoch` that fences every
    /// previous owner: an empty delta, or with [`TakeOverWrite::Base`] or [`MAX_DELTAS`] deltas
    /// after the base, a base made by `compact` from the chain (the state it folds to). Returns
    /// the chain to resume from (the appended record included) and the fence.
    pub async fn take_over_chain(
        &self,
        partition: u32,
        epoch: u64,
        write: TakeOverWrite,
        compact: impl Fn(&Chain) -> Result<Vec<u8>, String>,
    ) -> Result<(Chain, CheckpointFence), CheckpointError> {
        let k = key(partition);
        let mut last_conflict = String::new();
        // The revision of a record this take-over wrote over records it had not read (see below).
        let mut own: Option<u64> = None;
        for _ in 0..TAKE_OVER_ATTEMPTS {
            let current = self.read_chain(partition, own).await?;
            if let Some((_, head)) = &current {
                if head.epoch > epoch {
                    return Err(CheckpointError::Fenced {
                        partition,
                        epoch,
                        reason: format!("the stored checkpoint has epoch {}", head.epoch),
                    });
                }
            }
            let expected = own.unwrap_or(current.as_ref().map_or(0, |(_, h)| h.revision));
            let (value, chain, base) = match current {
                None => (encode(epoch, b""), Chain::default(), true),
                Some((chain, head)) => {
                    if own.is_some() || take_over_compacts(chain.deltas.len(), write) {
                        let state = compact(&chain).map_err(|reason| CheckpointError::Corrupt {
                            partition,
                            revision: head.revision,
                            reason,
                        })?;
                        let value = encode(epoch, &state);
                        let chain = Chain {
                            base: Bytes::from(state),
                            deltas: Vec::new(),
                            bytes: value.len(),
                        };
                        (value, chain, true)
                    } else if write == TakeOverWrite::Base {
                        (encode(epoch, &chain.base), chain, true)
                    } else {
                        let mut chain = chain;
                        let marker = encode_delta(epoch, b"");
                        chain.deltas.push(Bytes::new());
                        chain.bytes += marker.len();
                        (marker, chain, false)
                    }
                }
            };
            let written = self.put_expecting(&k, value, expected).await;
            match written {
                Ok(revision) => {
                    // nats-server checks the expected revision before proposing a write, not when
                    // applying it (2.9; leader-local in later versions): a write of the previous
                    // owner that expected the same revision can land just before this one, and
                    // that owner has it acknowledged. Then this record misses it: read what
                    // preceded this record and write it as a base on top (a compare-and-set on
                    // this record, which no one else expects).
                    if let Some(seq) = self.landed_between(partition, expected, revision).await? {
                        tracing::warn!(
                            partition,
                            epoch,
                            revision,
                            other = seq,
                            "a write expecting the same checkpoint revision landed beside the \
                             take-over's; taking over again from what precedes it"
                        );
                        last_conflict = format!(
                            "revision {seq} landed beside this take-over's revision {revision}"
                        );
                        own = Some(revision);
                        continue;
                    }
                    if base {
                        self.purge_before(partition, revision).await;
                    }
                    return Ok((
                        chain,
                        CheckpointFence {
                            partition,
                            epoch,
                            revision,
                        },
                    ));
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    last_conflict = format!("revision {expected} was overwritten");
                    own = None;
                }
                Err(e) => return Err(KvError::op(&self.store, "update", &k, e).into()),
            }
        }
        Err(CheckpointError::Fenced {
            partition,
            epoch,
            reason: format!(
                "{TAKE_OVER_ATTEMPTS} take-over attempts conflicted, last: {last_conflict}"
            ),
        })
    }

    /// The revision of a record of `partition` after `after` and before `before`, if any: one
    /// that landed although `before` was written expecting `after` (delete markers, which a
    /// `create` expecting 0 writes over, are not records).
    async fn landed_between(
        &self,
        partition: u32,
        after: u64,
        before: u64,
    ) -> Result<Option<u64>, CheckpointError> {
        let k = key(partition);
        let mut seq = after + 1;
        while let Some(msg) = self.next_record(&k, seq, before).await? {
            if !is_marker(&msg) {
                return Ok(Some(msg.sequence));
            }
            seq = msg.sequence + 1;
        }
        Ok(None)
    }

    /// The first record of key `k` at stream sequence `seq` or later and below `below` (delete
    /// markers included), read through STREAM.MSG.GET: the permission every read already needs,
    /// and no consumer.
    async fn next_record(
        &self,
        k: &str,
        seq: u64,
        below: u64,
    ) -> Result<Option<async_nats::jetstream::message::StreamMessage>, CheckpointError> {
        if seq >= below {
            return Ok(None);
        }
        let subject = format!("{}{}", self.store.prefix, k);
        match self
            .store
            .stream
            .get_first_raw_message_by_subject(&subject, seq)
            .await
        {
            Ok(m) if m.sequence < below => Ok(Some(m)),
            Ok(_) => Ok(None),
            Err(e)
                if e.kind()
                    == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
            {
                Ok(None)
            }
            Err(e) => Err(KvError::op(&self.store, "read", k, e).into()),
        }
    }

    /// Writes `value` at `k` by compare-and-set on revision `expected`; `expected` 0 means no
    /// checkpoint yet: `create` (which also succeeds over a delete marker), so that a concurrent
    /// first writer makes this one conflict instead of being overwritten. A conflict is
    /// `WrongLastRevision` either way.
    async fn put_expecting(
        &self,
        k: &str,
        value: Bytes,
        expected: u64,
    ) -> Result<u64, kv::UpdateError> {
        if expected != 0 {
            return self.store.update(k, value, expected).await;
        }
        self.store
            .create(k, value)
            .await
            .map_err(|e| match e.kind() {
                kv::CreateErrorKind::AlreadyExists => {
                    kv::UpdateError::new(kv::UpdateErrorKind::WrongLastRevision)
                }
                _ => kv::UpdateError::with_source(kv::UpdateErrorKind::Other, e),
            })
    }

    /// Removes the records of `partition` before `revision` (a base just written there) from a
    /// chained bucket, so a key holds one base and the deltas after it. Best effort: records left
    /// behind are skipped by readers (they start at the last base) and dropped by the history
    /// limit.
    async fn purge_before(&self, partition: u32, revision: u64) {
        // nats-server reads a purge up to sequence 1 as "no bound" and purges the whole subject,
        // the base included; nothing precedes the stream's first message anyway.
        if !self.chained || revision <= 1 {
            return;
        }
        let subject = format!("{}{}", self.store.prefix, key(partition));
        if let Err(e) = self
            .store
            .stream
            .purge()
            .filter(subject)
            .sequence(revision)
            .await
        {
            tracing::debug!(partition, revision, error = %e, "purging checkpoint records before a base failed; readers skip them");
        }
    }

    /// Appends `delta` to the chain of `fence.partition` under `fence.epoch`, by the same
    /// compare-and-set as [`KvCheckpoints::write`] (and the same resynchronisation after a write
    /// that timed out but landed): [`CheckpointError::Fenced`] when anyone else wrote since.
    pub async fn write_delta(
        &self,
        fence: &mut CheckpointFence,
        delta: &[u8],
    ) -> Result<u64, CheckpointError> {
        self.write_kind(fence, Kind::Delta, delta).await
    }

    /// The last checkpoint of `partition`, if any (read from the stream leader).
    pub async fn read(&self, partition: u32) -> Result<Option<Checkpoint>, CheckpointError> {
        let Some(entry) = super::kv::live_entry(&self.store, &key(partition)).await? else {
            return Ok(None);
        };
        let (epoch, state) = decode(&entry.value).map_err(|reason| CheckpointError::Corrupt {
            partition,
            revision: entry.revision,
            reason,
        })?;
        Ok(Some(Checkpoint {
            epoch,
            revision: entry.revision,
            state,
        }))
    }

    /// The epoch and revision of the last record of `partition` (a base or a delta).
    async fn read_head(&self, partition: u32) -> Result<Option<Head>, CheckpointError> {
        let Some(entry) = super::kv::live_entry(&self.store, &key(partition)).await? else {
            return Ok(None);
        };
        let (epoch, _, _) =
            decode_record(&entry.value).map_err(|reason| CheckpointError::Corrupt {
                partition,
                revision: entry.revision,
                reason,
            })?;
        Ok(Some(Head {
            epoch,
            revision: entry.revision,
        }))
    }

    /// Takes `partition` over under `epoch` (the lease revision just won): reads its last
    /// checkpoint and writes it back under `epoch`, which fences every previous owner. Returns the
    /// state to resume from (`None` for a partition never checkpointed) and the fence for
    /// [`KvCheckpoints::write`]. Fails with [`CheckpointError::Fenced`] when the stored epoch is
    /// newer than `epoch` (this owner's lease is already stale).
    pub async fn take_over(
        &self,
        partition: u32,
        epoch: u64,
    ) -> Result<(Option<Bytes>, CheckpointFence), CheckpointError> {
        let k = key(partition);
        let mut last_conflict = String::new();
        for _ in 0..TAKE_OVER_ATTEMPTS {
            let current = self.read(partition).await?;
            if let Some(c) = &current {
                if c.epoch > epoch {
                    return Err(CheckpointError::Fenced {
                        partition,
                        epoch,
                        reason: format!("the stored checkpoint has epoch {}", c.epoch),
                    });
                }
            }
            let state = current.as_ref().map(|c| c.state.clone());
            // No checkpoint: `create` (which also succeeds over a delete marker) so that a
            // concurrent first writer makes this attempt conflict instead of being overwritten.
            let expected = current.as_ref().map_or(0, |c| c.revision);
            let value = encode(epoch, state.as_deref().unwrap_or_default());
            let written = self.put_expecting(&k, value, expected).await;
            match written {
                Ok(revision) => {
                    return Ok((
                        state,
                        CheckpointFence {
                            partition,
                            epoch,
                            revision,
                        },
                    ))
                }
                // Someone wrote in between: look again (a newer epoch then fences us above).
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    last_conflict = format!("revision {expected} was overwritten");
                }
                Err(e) => return Err(KvError::op(&self.store, "update", &k, e).into()),
            }
        }
        Err(CheckpointError::Fenced {
            partition,
            epoch,
            reason: format!(
                "{TAKE_OVER_ATTEMPTS} take-over attempts conflicted, last: {last_conflict}"
            ),
        })
    }

    /// Writes `state` as the checkpoint of `fence.partition` under `fence.epoch`, by
    /// compare-and-set on the revision of this owner's previous write; advances the fence.
    /// [`CheckpointError::Fenced`] when anyone else wrote since (a newer owner took over).
    ///
    /// A write that timed out may still have landed, leaving the fence one revision behind. So on
    /// a conflict the stored value is read once: if it carries this owner's own epoch (no other
    /// owner ever writes under it), the fence adopts its revision and the write is retried.
    pub async fn write(
        &self,
        fence: &mut CheckpointFence,
        state: &[u8],
    ) -> Result<u64, CheckpointError> {
        let revision = self.write_kind(fence, Kind::Base, state).await?;
        self.purge_before(fence.partition, revision).await;
        Ok(revision)
    }

    async fn write_kind(
        &self,
        fence: &mut CheckpointFence,
        kind: Kind,
        state: &[u8],
    ) -> Result<u64, CheckpointError> {
        match self.write_once(fence, kind, state).await {
            Err(fenced @ CheckpointError::Fenced { .. }) => {
                match self.read_head(fence.partition).await? {
                    Some(current) if resync(fence, current.epoch, current.revision) => {
                        self.write_once(fence, kind, state).await
                    }
                    _ => Err(fenced),
                }
            }
            other => other,
        }
    }

    async fn write_once(
        &self,
        fence: &mut CheckpointFence,
        kind: Kind,
        state: &[u8],
    ) -> Result<u64, CheckpointError> {
        let k = key(fence.partition);
        let value = match kind {
            Kind::Base => encode(fence.epoch, state),
            Kind::Delta => encode_delta(fence.epoch, state),
        };
        match self.store.update(&k, value, fence.revision).await {
            Ok(revision) => {
                fence.revision = revision;
                Ok(revision)
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                Err(CheckpointError::Fenced {
                    partition: fence.partition,
                    epoch: fence.epoch,
                    reason: format!(
                        "revision {} was overwritten: another owner took the partition over",
                        fence.revision
                    ),
                })
            }
            Err(e) => Err(KvError::op(&self.store, "update", &k, e).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_round_trips_with_its_epoch() {
        let v = encode(42, b"state");
        assert_eq!(decode(&v).unwrap(), (42, Bytes::from_static(b"state")));
        assert_eq!(decode(&encode(7, b"")).unwrap(), (7, Bytes::new()));
    }

    #[test]
    fn delta_records_carry_their_epoch_and_are_never_read_as_a_whole_state() {
        let d = encode_delta(9, b"changes");
        assert_eq!(
            decode_record(&d).unwrap(),
            (9, Kind::Delta, Bytes::from_static(b"changes"))
        );
        assert_eq!(
            decode_record(&encode(3, b"all")).unwrap(),
            (3, Kind::Base, Bytes::from_static(b"all"))
        );
        let e = decode(&d).unwrap_err();
        assert!(e.contains("version 2") && e.contains("delta"), "{e}");
        assert!(decode_record(&Bytes::from_static(&[VERSION_DELTA, 1]))
            .unwrap_err()
            .contains("shorter"));
    }

    #[test]
    fn bad_values_are_reported_not_panicked_on() {
        assert!(decode(&Bytes::new()).unwrap_err().contains("empty"));
        assert!(decode(&Bytes::from_static(&[1, 2, 3]))
            .unwrap_err()
            .contains("shorter"));
        assert!(decode(&Bytes::from_static(&[9; 20]))
            .unwrap_err()
            .contains("version 9"));
    }
}
