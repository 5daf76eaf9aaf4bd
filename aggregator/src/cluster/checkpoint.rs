//! Checkpoints of partition state in the `checkpoints` KV bucket, fenced by the lease epoch.
//!
//! One key per partition, `p{partition}`, written only by compare-and-set on the revision of this
//! owner's previous write. The value carries the epoch (the lease revision) it was written under.
//! An owner that wins a lease first [`KvCheckpoints::take_over`]: it reads the last checkpoint and
//! writes it straight back under its own epoch. From then on, any write of a previous owner, which
//! still expects the revision it last wrote, fails with [`CheckpointError::Fenced`], however late
//! it arrives and whatever that owner believes about its lease.
//!
//! Value layout: version byte `1`, the epoch as u64 little-endian, then the state bytes as given.
//! A value is one NATS message, so its size is bounded by the servers' `max_payload` (1 MiB by
//! default). Not owned here: how state is serialised, when checkpoints are taken, the lease.

use super::kv::KvError;
use super::lease::key;
use async_nats::jetstream::kv;
use bytes::{BufMut, Bytes, BytesMut};

/// The production bucket of partition checkpoints.
pub const CHECKPOINTS_BUCKET: &str = "checkpoints";

const VERSION: u8 = 1;
const HEADER: usize = 1 + 8;

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
}

fn encode(epoch: u64, state: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(HEADER + state.len());
    b.put_u8(VERSION);
    b.put_u64_le(epoch);
    b.put_slice(state);
    b.freeze()
}

/// The epoch and state of a stored value.
fn decode(value: &Bytes) -> Result<(u64, Bytes), String> {
    match value.first() {
        None => Err("empty value".into()),
        Some(&VERSION) if value.len() >= HEADER => {
            let mut epoch = [0u8; 8];
            epoch.copy_from_slice(&value[1..HEADER]);
            Ok((u64::from_le_bytes(epoch), value.slice(HEADER..)))
        }
        Some(&VERSION) => Err(format!("{} bytes, shorter than the header", value.len())),
        Some(v) => Err(format!("unknown format version {v}")),
    }
}

impl KvCheckpoints {
    /// Checkpoints in `store` (a bucket without TTL).
    pub fn new(store: kv::Store) -> Self {
        Self { store }
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
            let written = match current {
                Some(_) => self.store.update(&k, value, expected).await,
                None => self
                    .store
                    .create(&k, value)
                    .await
                    .map_err(|e| match e.kind() {
                        kv::CreateErrorKind::AlreadyExists => {
                            kv::UpdateError::new(kv::UpdateErrorKind::WrongLastRevision)
                        }
                        _ => kv::UpdateError::with_source(kv::UpdateErrorKind::Other, e),
                    }),
            };
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
        match self.write_once(fence, state).await {
            Err(fenced @ CheckpointError::Fenced { .. }) => {
                match self.read(fence.partition).await? {
                    Some(current)
                        if current.epoch == fence.epoch && current.revision != fence.revision =>
                    {
                        fence.revision = current.revision;
                        self.write_once(fence, state).await
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
        state: &[u8],
    ) -> Result<u64, CheckpointError> {
        let k = key(fence.partition);
        match self
            .store
            .update(&k, encode(fence.epoch, state), fence.revision)
            .await
        {
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
