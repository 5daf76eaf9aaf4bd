//! The state of the cluster as its KV tells it, for `edgewatch cluster status` and
//! `GET /api/cluster`: the live members, and for every partition its lease holder, lease age,
//! checkpoint lag and throughput.
//!
//! Leases are read from the stream leader (authoritative); lag and throughput come from the
//! owners' last heartbeats, so they are up to one heartbeat old. Not owned here: deciding anything
//! (status is never used for ownership).

use super::lease::{now_ms, LeaseError};
use super::node::Buckets;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The whole cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// When this was collected (Unix ms).
    pub at_ms: i64,
    /// Partitions of the deployment.
    pub partitions: u32,
    /// Live members, by id.
    pub members: Vec<MemberStatus>,
    /// Every partition, ascending.
    pub leases: Vec<PartitionStatus>,
    /// Partitions nobody holds a lease on (moving, or no member alive).
    pub unowned: Vec<u32>,
    /// The member holding the `trainer` lease (device model training), if any.
    #[serde(default)]
    pub trainer: Option<TrainerStatus>,
}

/// The fleet trainer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerStatus {
    /// The member holding the lease.
    pub owner: String,
    /// The lease revision (the epoch its training writes carry).
    pub epoch: u64,
    /// Ms since the lease was last renewed (server clock).
    pub renewed_ms_ago: i64,
}

/// One live member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Aggregator id.
    pub id: String,
    /// Its HTTP API address (empty when its heartbeat did not decode).
    pub http: String,
    /// Ms since its last heartbeat (server clock).
    pub heartbeat_age_ms: i64,
    /// Ms since it started (its clock).
    pub up_ms: i64,
    /// Partitions it reported owning.
    pub owned: usize,
    /// Records per second applied over all its partitions.
    pub records_per_sec: f64,
}

/// One partition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartitionStatus {
    /// The partition.
    pub partition: u32,
    /// The lease holder.
    pub owner: Option<String>,
    /// The lease revision (the epoch its state is written under).
    pub epoch: Option<u64>,
    /// Ms since the holder won the lease.
    pub lease_age_ms: Option<i64>,
    /// Ms since the lease was last renewed (server clock).
    pub renewed_ms_ago: Option<i64>,
    /// How long the partition's oldest change not yet checkpointed has waited, per its owner's
    /// last heartbeat.
    pub checkpoint_lag_ms: Option<u64>,
    /// Records per second applied, per its owner's last heartbeat.
    pub records_per_sec: Option<f64>,
}

impl PartitionStatus {
    /// A partition nobody holds a lease on.
    pub fn unowned(partition: u32) -> Self {
        Self {
            partition,
            owner: None,
            epoch: None,
            lease_age_ms: None,
            renewed_ms_ago: None,
            checkpoint_lag_ms: None,
            records_per_sec: None,
        }
    }
}

/// Reads members and leases of `buckets` (a deployment of `partitions` partitions).
pub async fn collect(buckets: &Buckets, partitions: u32) -> Result<ClusterStatus, LeaseError> {
    let at_ms = now_ms();
    let mut members = Vec::new();
    let mut reported = BTreeMap::new();
    for (id, info, age) in buckets.members.all().await? {
        let (http, up_ms, owned, rate) = match &info {
            Some(i) => (
                i.http.clone(),
                at_ms - i.started_ms,
                i.owned.len(),
                i.owned.iter().map(|o| o.records_per_sec).sum(),
            ),
            None => (String::new(), 0, 0, 0.0),
        };
        for o in info.iter().flat_map(|i| &i.owned) {
            reported.insert((id.clone(), o.partition), o.clone());
        }
        members.push(MemberStatus {
            id,
            http,
            heartbeat_age_ms: age,
            up_ms,
            owned,
            records_per_sec: rate,
        });
    }
    let mut leases = Vec::with_capacity(partitions as usize);
    let mut unowned = Vec::new();
    for p in 0..partitions {
        match buckets.leases.holder(p).await? {
            Some((value, revision, renewed)) => {
                let seen = reported.get(&(value.owner.clone(), p));
                leases.push(PartitionStatus {
                    partition: p,
                    lease_age_ms: (value.since_ms > 0).then(|| at_ms - value.since_ms),
                    owner: Some(value.owner),
                    epoch: Some(revision),
                    renewed_ms_ago: Some(renewed),
                    checkpoint_lag_ms: seen.map(|o| o.checkpoint_lag_ms),
                    records_per_sec: seen.map(|o| o.records_per_sec),
                });
            }
            None => {
                unowned.push(p);
                leases.push(PartitionStatus::unowned(p));
            }
        }
    }
    let trainer = buckets.leases.holder(super::lease::TRAINER).await?.map(
        |(value, epoch, renewed_ms_ago)| TrainerStatus {
            owner: value.owner,
            epoch,
            renewed_ms_ago,
        },
    );
    Ok(ClusterStatus {
        at_ms,
        partitions,
        members,
        leases,
        unowned,
        trainer,
    })
}

impl ClusterStatus {
    /// A plain-text report: members, then one line per partition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} member(s), {} partition(s), {} unowned",
            self.members.len(),
            self.partitions,
            self.unowned.len()
        );
        if let Some(t) = &self.trainer {
            let _ = writeln!(
                out,
                "trainer: {} (epoch {}, renewed {:.1}s ago)",
                t.owner,
                t.epoch,
                t.renewed_ms_ago as f64 / 1000.0
            );
        }
        let _ = writeln!(
            out,
            "{:<24} {:<22} {:>7} {:>9} {:>11} {:>10}",
            "MEMBER", "HTTP", "OWNED", "REC/S", "HEARTBEAT", "UP"
        );
        for m in &self.members {
            let _ = writeln!(
                out,
                "{:<24} {:<22} {:>7} {:>9.0} {:>9}ms {:>9}s",
                m.id,
                m.http,
                m.owned,
                m.records_per_sec,
                m.heartbeat_age_ms,
                m.up_ms / 1000
            );
        }
        let _ = writeln!(
            out,
            "\n{:>9} {:<24} {:>8} {:>10} {:>10} {:>10} {:>9}",
            "PARTITION", "OWNER", "EPOCH", "LEASE AGE", "RENEWED", "CKPT LAG", "REC/S"
        );
        let dash = || "-".to_string();
        for l in &self.leases {
            let _ = writeln!(
                out,
                "{:>9} {:<24} {:>8} {:>10} {:>10} {:>10} {:>9}",
                l.partition,
                l.owner.clone().unwrap_or_else(|| "(none)".into()),
                l.epoch.map_or_else(dash, |e| e.to_string()),
                l.lease_age_ms
                    .map_or_else(dash, |a| format!("{:.1}s", a as f64 / 1000.0)),
                l.renewed_ms_ago
                    .map_or_else(dash, |a| format!("{:.1}s", a as f64 / 1000.0)),
                l.checkpoint_lag_ms.map_or_else(dash, |a| format!("{a}ms")),
                l.records_per_sec.map_or_else(dash, |r| format!("{r:.0}")),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_names_members_owners_and_unowned_partitions() {
        let s = ClusterStatus {
            at_ms: 0,
            partitions: 2,
            members: vec![MemberStatus {
                id: "agg-1".into(),
                http: "127.0.0.1:8080".into(),
                heartbeat_age_ms: 120,
                up_ms: 65_000,
                owned: 1,
                records_per_sec: 412.0,
            }],
            leases: vec![
                PartitionStatus {
                    partition: 0,
                    owner: Some("agg-1".into()),
                    epoch: Some(17),
                    lease_age_ms: Some(61_500),
                    renewed_ms_ago: Some(900),
                    checkpoint_lag_ms: Some(0),
                    records_per_sec: Some(412.0),
                },
                PartitionStatus::unowned(1),
            ],
            unowned: vec![1],
            trainer: Some(TrainerStatus {
                owner: "agg-1".into(),
                epoch: 88,
                renewed_ms_ago: 1_200,
            }),
        };
        let r = s.render();
        assert!(
            r.contains("trainer: agg-1 (epoch 88, renewed 1.2s ago)"),
            "{r}"
        );
        assert!(
            r.starts_with("1 member(s), 2 partition(s), 1 unowned"),
            "{r}"
        );
        assert!(
            r.contains("agg-1") && r.contains("61.5s") && r.contains("(none)"),
            "{r}"
        );
        let back: ClusterStatus =
            serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
