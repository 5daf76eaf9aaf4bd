//! Partition leases in the `leases` KV bucket, and which partitions an aggregator should want.
//!
//! A lease is key `p{partition}` holding its owner's id. It is taken by compare-and-set `create`
//! (fails while the key exists), kept by `update` with the revision of the last write, and given
//! back by a delete that expects that revision. The bucket's TTL (`max_age`) drops a lease that is
//! not renewed; on nats-server 2.9 that expiry sends no watch event, so contenders retry
//! [`Leases::try_acquire`] on a timer. The revision of the last successful write is the lease's
//! fencing token (its *epoch*): it only grows, and every write of partition state carries it.
//!
//! Expiry runs on the servers' wall clocks, so an owner must not trust the lease until the server
//! says otherwise: it fences itself on its own monotonic clock ([`Leases::is_valid_locally`]).
//!
//! [`wanted`] is plain rendezvous hashing, with no I/O. Not owned here: membership heartbeats, the
//! timers that renew and retry, and what happens to a partition's state ([`super::checkpoint`]).

use super::kv::KvError;
use async_nats::jetstream::kv;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// The production bucket of partition leases.
pub const LEASES_BUCKET: &str = "leases";

/// A lease held by this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The partition.
    pub partition: u32,
    /// The KV revision of the last successful acquire or renew: the fencing token (epoch).
    pub revision: u64,
    /// When the write that gave `revision` was *sent* (before the server stamped it, so a local
    /// deadline counted from here never outlives the server's expiry).
    pub acquired_at: Instant,
    /// Wall-clock time (Unix ms) the lease was first won, kept across renewals (for status).
    pub since_ms: i64,
}

/// Errors of lease operations.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The lease's revision is no longer the latest: it expired, or another owner took the
    /// partition. Drop the partition and stop acknowledging its data; never retried.
    #[error("lease p{partition}: lost (revision {revision} is no longer current: expired or taken over)")]
    Lost {
        /// The partition.
        partition: u32,
        /// The revision this process held.
        revision: u64,
    },
    /// The TTL and margin do not leave a usable local validity window; never retried.
    #[error("leases: margin {margin:?} must be shorter than the lease TTL {ttl:?}")]
    Timing {
        /// The lease TTL.
        ttl: Duration,
        /// The self-fencing margin.
        margin: Duration,
    },
    /// The KV could not be reached or answered otherwise (see [`KvError`] for retrying).
    #[error(transparent)]
    Kv(#[from] KvError),
}

/// What a lease key holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseValue {
    /// The owner's aggregator id.
    pub owner: String,
    /// When the owner won the lease (Unix ms, its own clock); kept across renewals.
    #[serde(default)]
    pub since_ms: i64,
}

/// How long a lease lives on the servers (`ttl`, the bucket's `max_age`) and how long before
/// that its owner stops trusting it (`margin`). Pure arithmetic on the monotonic clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTiming {
    ttl: Duration,
    margin: Duration,
}

impl LeaseTiming {
    /// A lease is trusted locally until `ttl - margin` after its last write was sent; the margin
    /// covers clock-rate differences between this host and the servers and a renewal's latency.
    pub fn new(ttl: Duration, margin: Duration) -> Result<Self, LeaseError> {
        if margin >= ttl {
            return Err(LeaseError::Timing { ttl, margin });
        }
        Ok(Self { ttl, margin })
    }

    /// The lease TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The self-fencing margin: one heartbeat period (at most half the TTL).
    pub fn margin(&self) -> Duration {
        self.margin
    }

    /// The end of `lease`'s local validity.
    pub fn valid_until(&self, lease: &Lease) -> Instant {
        lease.acquired_at + (self.ttl - self.margin)
    }

    /// Whether the owner of `lease` may still act as owner at `now`: before [`Self::valid_until`].
    pub fn is_valid_locally(&self, lease: &Lease, now: Instant) -> bool {
        now < self.valid_until(lease)
    }
}

/// The leases of one bucket, taken and kept for one owner (this aggregator).
#[derive(Debug, Clone)]
pub struct Leases {
    store: kv::Store,
    timing: LeaseTiming,
    owner: String,
}

/// The pseudo-partition of the fleet trainer's lease (key `trainer`): the one member that applies
/// the agents' training lanes and fits device models (see [`super::trainer`]). Partition counts
/// are far below it, so it names no real partition.
pub const TRAINER: u32 = u32::MAX;

/// The key of a partition's lease (`p{partition}`), or `trainer` for [`TRAINER`]. The trainer's
/// lanes checkpoint has the same key in the training bucket.
pub(crate) fn key(partition: u32) -> String {
    if partition == TRAINER {
        return "trainer".to_string();
    }
    format!("p{partition}")
}

impl Leases {
    /// Leases in `store`, a bucket whose TTL is `timing.ttl()`, held by `owner`.
    pub fn new(store: kv::Store, timing: LeaseTiming, owner: &str) -> Self {
        Self {
            store,
            timing,
            owner: owner.to_string(),
        }
    }

    /// Opens (creating if needed) bucket `bucket` with TTL `timing.ttl()` and `replicas` replicas.
    pub async fn open(
        js: &async_nats::jetstream::Context,
        bucket: &str,
        timing: LeaseTiming,
        replicas: usize,
        owner: &str,
    ) -> Result<Self, LeaseError> {
        let store = super::kv::ensure_bucket(js, bucket, Some(timing.ttl), replicas).await?;
        Ok(Self::new(store, timing, owner))
    }

    fn value(&self, since_ms: i64) -> Bytes {
        let v = LeaseValue {
            owner: self.owner.clone(),
            since_ms,
        };
        // Serialising a string and a number cannot fail.
        Bytes::from(serde_json::to_vec(&v).unwrap_or_default())
    }

    /// Takes the lease of `partition` if nobody holds it (never held, released, or expired).
    /// `None` when another owner holds it; so does this owner if it already holds it under a
    /// revision it has lost track of.
    pub async fn try_acquire(&self, partition: u32) -> Result<Option<Lease>, LeaseError> {
        let k = key(partition);
        let sent = Instant::now();
        let since_ms = now_ms();
        match self.store.create(&k, self.value(since_ms)).await {
            Ok(revision) => Ok(Some(Lease {
                partition,
                revision,
                acquired_at: sent,
                since_ms,
            })),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(KvError::op(&self.store, "create", &k, e).into()),
        }
    }

    /// Takes back the lease of `partition` when it is held under this owner's id but by no
    /// [`Lease`] of this process (a previous run of the same member, killed before the lease
    /// expired): renews the stored revision, so the result is a fresh epoch. `None` when another
    /// owner holds it (or nobody: then [`Leases::try_acquire`] is the way).
    pub async fn adopt(&self, partition: u32) -> Result<Option<Lease>, LeaseError> {
        let Some((value, revision, _)) = self.holder(partition).await? else {
            return Ok(None);
        };
        if value.owner != self.owner {
            return Ok(None);
        }
        let stale = Lease {
            partition,
            revision,
            acquired_at: Instant::now(),
            since_ms: now_ms(),
        };
        match self.renew(&stale).await {
            Ok(l) => Ok(Some(l)),
            Err(LeaseError::Lost { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Renews `lease` by compare-and-set on its revision; the returned lease has the new revision.
    /// A conflict means the lease expired or was taken: [`LeaseError::Lost`]. After a timeout the
    /// write may still have happened, so the next renew of the old revision reports Lost: the
    /// safe side.
    pub async fn renew(&self, lease: &Lease) -> Result<Lease, LeaseError> {
        let k = key(lease.partition);
        let sent = Instant::now();
        match self
            .store
            .update(&k, self.value(lease.since_ms), lease.revision)
            .await
        {
            Ok(revision) => Ok(Lease {
                partition: lease.partition,
                revision,
                acquired_at: sent,
                since_ms: lease.since_ms,
            }),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Err(LeaseError::Lost {
                partition: lease.partition,
                revision: lease.revision,
            }),
            Err(e) => Err(KvError::op(&self.store, "update", &k, e).into()),
        }
    }

    /// Gives `lease` back (a delete expecting its revision) so another owner can take it at once.
    /// [`LeaseError::Lost`] when it was already lost, which needs no further action.
    pub async fn release(&self, lease: Lease) -> Result<(), LeaseError> {
        let k = key(lease.partition);
        match self
            .store
            .delete_expect_revision(&k, Some(lease.revision))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Err(LeaseError::Lost {
                partition: lease.partition,
                revision: lease.revision,
            }),
            Err(e) => Err(KvError::op(&self.store, "delete", &k, e).into()),
        }
    }

    /// Who holds the lease of `partition`, for status: its value, revision, and the ms since its
    /// last renewal by the server's clock. `None` when nobody holds it.
    pub async fn holder(
        &self,
        partition: u32,
    ) -> Result<Option<(LeaseValue, u64, i64)>, LeaseError> {
        let entry = super::kv::live_entry(&self.store, &key(partition)).await?;
        Ok(entry.map(|e| {
            let value = serde_json::from_slice(&e.value).unwrap_or(LeaseValue {
                owner: String::from_utf8_lossy(&e.value).into_owned(),
                since_ms: 0,
            });
            (value, e.revision, super::kv::age_ms(&e))
        }))
    }

    /// Whether this process may still act as the owner at `now` without hearing from the servers:
    /// before `acquired_at + ttl - margin`. Past it, stop applying and acknowledging the partition
    /// even if no renewal has failed yet (the servers may have expired the lease already).
    pub fn is_valid_locally(&self, lease: &Lease, now: Instant) -> bool {
        self.timing.is_valid_locally(lease, now)
    }

    /// The TTL and margin.
    pub fn timing(&self) -> LeaseTiming {
        self.timing
    }
}

/// Wall-clock now in Unix ms.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The partitions of `0..partition_count` that `me` wins by rendezvous (highest random weight)
/// hashing over `members` (`me` counts as a member whether listed or not; duplicates count once).
/// Every member computing this over the same member set gets disjoint sets covering every
/// partition; when a member joins or leaves, only the partitions it wins or held move.
pub fn wanted<S: AsRef<str>>(partition_count: u32, members: &[S], me: &str) -> Vec<u32> {
    (0..partition_count)
        .filter(|&p| {
            let mine = (weight(me, p), std::cmp::Reverse(me));
            members
                .iter()
                .map(AsRef::as_ref)
                .filter(|m| *m != me)
                // Ties (a 1 in 2^64 event) go to the smaller id, so every member agrees.
                .all(|m| (weight(m, p), std::cmp::Reverse(m)) < mine)
        })
        .collect()
}

/// The weight of `member` for `partition`: XXH3 of the member id seeded with the partition.
fn weight(member: &str, partition: u32) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(member.as_bytes(), u64::from(partition))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owners(n: u32, members: &[&str]) -> Vec<Vec<u32>> {
        members.iter().map(|m| wanted(n, members, m)).collect()
    }

    #[test]
    fn members_split_every_partition_exactly_once() {
        let members = ["agg-1", "agg-2", "agg-3"];
        let mut all: Vec<u32> = owners(64, &members).into_iter().flatten().collect();
        all.sort_unstable();
        assert_eq!(all, (0..64).collect::<Vec<_>>());
    }

    #[test]
    fn three_members_get_a_balanced_share_of_64_partitions() {
        let members = ["agg-1", "agg-2", "agg-3"];
        for (m, got) in members.iter().zip(owners(64, &members)) {
            // 64/3 ≈ 21.3; the binomial standard deviation is ≈ 3.8.
            assert!(
                (15..=28).contains(&got.len()),
                "{m}: {} partitions",
                got.len()
            );
        }
        // And over many member sets, the share is balanced on average.
        let mut worst = 0usize;
        for i in 0..100 {
            let ids = [format!("a{i}"), format!("b{i}"), format!("c{i}")];
            let members: Vec<&str> = ids.iter().map(String::as_str).collect();
            for got in owners(64, &members) {
                worst = worst.max(got.len().abs_diff(21));
            }
        }
        assert!(worst <= 14, "worst deviation {worst}");
    }

    #[test]
    fn a_fourth_member_takes_about_a_quarter_and_nothing_else_moves() {
        let three = ["agg-1", "agg-2", "agg-3"];
        let four = ["agg-1", "agg-2", "agg-3", "agg-4"];
        let mut moved = 0;
        for m in three {
            let before = wanted(64, &three, m);
            let after = wanted(64, &four, m);
            assert!(
                after.iter().all(|p| before.contains(p)),
                "{m} gained a partition"
            );
            moved += before.len() - after.len();
        }
        assert_eq!(moved, wanted(64, &four, "agg-4").len());
        assert!((9..=24).contains(&moved), "{moved} of 64 moved");
    }

    #[test]
    fn me_counts_as_a_member_even_when_not_listed_and_duplicates_count_once() {
        assert_eq!(wanted::<&str>(8, &[], "solo"), (0..8).collect::<Vec<_>>());
        assert_eq!(
            wanted(64, &["x", "y", "y"], "x"),
            wanted(64, &["x", "y"], "x")
        );
        assert_eq!(wanted(64, &["y"], "x"), wanted(64, &["x", "y"], "x"));
    }

    #[test]
    fn local_validity_ends_margin_before_the_ttl() {
        let timing = LeaseTiming::new(Duration::from_secs(20), Duration::from_secs(4)).unwrap();
        let t0 = Instant::now();
        let lease = Lease {
            partition: 3,
            revision: 7,
            acquired_at: t0,
            since_ms: 0,
        };
        assert!(timing.is_valid_locally(&lease, t0 + Duration::from_millis(15_999)));
        assert!(!timing.is_valid_locally(&lease, t0 + Duration::from_secs(16)));
        assert_eq!(timing.valid_until(&lease), t0 + Duration::from_secs(16));
    }

    #[test]
    fn a_margin_as_long_as_the_ttl_is_refused() {
        let e = LeaseTiming::new(Duration::from_secs(2), Duration::from_secs(2)).unwrap_err();
        assert!(e.to_string().contains("margin 2s"), "{e}");
    }
}
