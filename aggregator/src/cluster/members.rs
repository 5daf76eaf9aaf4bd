//! Membership: every aggregator puts a heartbeat under its id in the `members` KV bucket, whose TTL
//! (the lease TTL) removes members that stop. The live members are the keys present; each value
//! says where the member serves HTTP and what it owns, for `edgewatch cluster status`.
//!
//! On nats-server 2.9 an expired key makes no watch event, so members are listed on every tick
//! rather than watched, from the stream's subjects (no consumer; see [`Members::ids`]). Not owned here: what a member does with the list ([`super::node`]).

use super::kv::KvError;
use async_nats::jetstream::kv;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The production bucket of member heartbeats.
pub const MEMBERS_BUCKET: &str = "members";

/// What a member's heartbeat says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// Aggregator id (also the key).
    pub id: String,
    /// Its HTTP API address.
    pub http: String,
    /// When it started (Unix ms, its clock).
    pub started_ms: i64,
    /// When this heartbeat was sent (Unix ms, its clock).
    pub at_ms: i64,
    /// Partitions it owns, with their throughput.
    pub owned: Vec<OwnedPartition>,
}

/// One partition a member owns, as its heartbeat reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OwnedPartition {
    /// The partition.
    pub partition: u32,
    /// The lease revision it is owned under.
    pub epoch: u64,
    /// When it was won (Unix ms, the member's clock).
    pub since_ms: i64,
    /// How long its oldest change not yet checkpointed has waited (0: all checkpointed).
    pub checkpoint_lag_ms: u64,
    /// Records applied per second over the last heartbeat period.
    pub records_per_sec: f64,
}

/// The `members` bucket.
#[derive(Debug, Clone)]
pub struct Members {
    store: kv::Store,
}

impl Members {
    /// Opens (creating if needed) bucket `bucket` whose keys expire `ttl` after their last write.
    pub async fn open(
        js: &async_nats::jetstream::Context,
        bucket: &str,
        ttl: Duration,
        replicas: usize,
    ) -> Result<Self, KvError> {
        Ok(Self {
            store: super::kv::ensure_bucket(js, bucket, Some(ttl), replicas).await?,
        })
    }

    /// The existing bucket `bucket`, never created (see [`super::kv::open_existing`]).
    pub async fn open_existing(
        js: &async_nats::jetstream::Context,
        bucket: &str,
    ) -> Result<Self, KvError> {
        Ok(Self {
            store: super::kv::open_existing(js, bucket).await?,
        })
    }

    /// Puts `info` as the heartbeat of `info.id`.
    pub async fn heartbeat(&self, info: &MemberInfo) -> Result<(), KvError> {
        let value = Bytes::from(serde_json::to_vec(info).unwrap_or_default());
        self.store
            .put(&info.id, value)
            .await
            .map(|_| ())
            .map_err(|e| KvError::op(&self.store, "put", &info.id, e))
    }

    /// Removes `id` (a clean shutdown), so the others rebalance without waiting for the TTL.
    pub async fn leave(&self, id: &str) -> Result<(), KvError> {
        self.store
            .delete(id)
            .await
            .map_err(|e| KvError::op(&self.store, "delete", id, e))
    }

    /// The ids of the live members, sorted.
    pub async fn ids(&self) -> Result<Vec<String>, KvError> {
        Ok(self.live().await?.into_iter().map(|(k, _)| k).collect())
    }

    /// Every live member's heartbeat, sorted by id, with its age in ms by the server's clock; a
    /// value that does not decode is reported with `None`.
    pub async fn all(&self) -> Result<Vec<(String, Option<MemberInfo>, i64)>, KvError> {
        Ok(self
            .live()
            .await?
            .into_iter()
            .map(|(id, e)| {
                let age = super::kv::age_ms(&e);
                (id, serde_json::from_slice(&e.value).ok(), age)
            })
            .collect())
    }

    /// The live members' keys and entries, sorted by key.
    ///
    /// Listed from the stream's subjects ([`kv::list_keys`]: a consumer-based listing stalled
    /// under CPU contention on 2.9), then each key read once to skip members that left (a delete
    /// marker).
    async fn live(&self) -> Result<Vec<(String, kv::Entry)>, KvError> {
        let keys = super::kv::list_keys(&self.store).await?;
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some(e) = super::kv::live_entry(&self.store, &k).await? {
                out.push((k, e));
            }
        }
        Ok(out)
    }
}
