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
    /// Partitions whose lease holder is suspect (see [`MemberStatus::suspect`]) or whose lease
    /// has not been renewed for [`SUSPECT_AFTER_HEARTBEATS`] heartbeats: owned on paper, but
    /// probably by a member that is dead or cut off, until the lease expires.
    #[serde(default)]
    pub at_risk: Vec<u32>,
    /// A member is suspect once its heartbeat is this old (ms).
    #[serde(default)]
    pub suspect_after_ms: i64,
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
    /// Its heartbeat is late by [`SUSPECT_AFTER_HEARTBEATS`] periods: probably dead or cut off
    /// (killed members stay listed until their heartbeat key expires, one lease TTL).
    #[serde(default)]
    pub suspect: bool,
}

/// Heartbeat periods without a heartbeat (or a lease renewal) after which a member (or a lease)
/// is reported suspect (at risk).
pub const SUSPECT_AFTER_HEARTBEATS: i64 = 2;

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
    let heartbeat_ms = buckets.leases.timing().margin().as_millis() as i64;
    let suspect_after_ms = SUSPECT_AFTER_HEARTBEATS * heartbeat_ms.max(1) + 500;
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
            suspect: age > suspect_after_ms,
        });
    }
    let suspects: std::collections::BTreeSet<&str> = members
        .iter()
        .filter(|m| m.suspect)
        .map(|m| m.id.as_str())
        .collect();
    let mut at_risk = Vec::new();
    let mut leases = Vec::with_capacity(partitions as usize);
    let mut unowned = Vec::new();
    for p in 0..partitions {
        match buckets.leases.holder(p).await? {
            Some((value, revision, renewed)) => {
                let seen = reported.get(&(value.owner.clone(), p));
                if renewed > suspect_after_ms || suspects.contains(value.owner.as_str()) {
                    at_risk.push(p);
                }
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
        at_risk,
        suspect_after_ms,
        trainer,
    })
}

/// Why the cluster could not be read, and whether waiting may help.
#[derive(Debug)]
pub struct Unreadable {
    /// The last error.
    pub error: String,
    /// How long the reader tried.
    pub tried: std::time::Duration,
}

/// Reads the status of the deployment with uplink prefix `prefix` without creating anything, each
/// attempt bounded by `attempt`, retrying while `wait` lasts: during a JetStream leader election
/// (a node restarting) the streams answer nothing for a few seconds, which is no reason for a
/// status command to fail. `on_retry` hears each failed attempt (the CLI prints it).
pub async fn read(
    cfg: &super::ClusterConfig,
    prefix: &str,
    partitions: u32,
    wait: std::time::Duration,
    attempt: std::time::Duration,
    mut on_retry: impl FnMut(&str),
) -> Result<ClusterStatus, Unreadable> {
    let start = std::time::Instant::now();
    let reader = format!("edgewatch-status-{}", std::process::id());
    loop {
        let once = async {
            let buckets = Buckets::read_only(cfg, prefix, &reader)
                .await
                .map_err(|e| e.to_string())?;
            collect(&buckets, partitions)
                .await
                .map_err(|e| e.to_string())
        };
        let error = match tokio::time::timeout(attempt, once).await {
            Ok(Ok(status)) => return Ok(status),
            Ok(Err(e)) => e,
            Err(_) => format!("no answer within {attempt:?}"),
        };
        if start.elapsed() + attempt > wait {
            return Err(Unreadable {
                error,
                tried: start.elapsed(),
            });
        }
        on_retry(&error);
        tokio::time::sleep(std::time::Duration::from_millis(1_000)).await;
    }
}

impl ClusterStatus {
    /// A plain-text report: members, then one line per partition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let suspects: Vec<&str> = self
            .members
            .iter()
            .filter(|m| m.suspect)
            .map(|m| m.id.as_str())
            .collect();
        let _ = writeln!(
            out,
            "{} member(s), {} partition(s), {} unowned, {} at risk",
            self.members.len(),
            self.partitions,
            self.unowned.len(),
            self.at_risk.len()
        );
        if !suspects.is_empty() {
            let _ = writeln!(
                out,
                "SUSPECT: {} (no heartbeat for over {:.1}s: dead or cut off?); partitions at risk until their leases expire: {}",
                suspects.join(", "),
                self.suspect_after_ms as f64 / 1000.0,
                crate::ownership::ranges(&self.at_risk)
            );
        } else if !self.at_risk.is_empty() {
            let _ = writeln!(
                out,
                "partitions at risk (lease not renewed for over {:.1}s): {}",
                self.suspect_after_ms as f64 / 1000.0,
                crate::ownership::ranges(&self.at_risk)
            );
        }
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
                "{:<24} {:<22} {:>7} {:>9.0} {:>9}ms {:>9}s{}",
                m.id,
                m.http,
                m.owned,
                m.records_per_sec,
                m.heartbeat_age_ms,
                m.up_ms / 1000,
                if m.suspect { "  SUSPECT" } else { "" }
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
                suspect: false,
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
            at_risk: vec![],
            suspect_after_ms: 8_500,
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
            r.starts_with("1 member(s), 2 partition(s), 1 unowned, 0 at risk"),
            "{r}"
        );
        assert!(
            r.contains("agg-1") && r.contains("61.5s") && r.contains("(none)"),
            "{r}"
        );
        assert!(!r.contains("SUSPECT"), "{r}");
        let back: ClusterStatus =
            serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);

        let mut late = s.clone();
        late.members[0].suspect = true;
        late.members[0].heartbeat_age_ms = 12_000;
        late.at_risk = vec![0];
        let r = late.render();
        assert!(
            r.starts_with("1 member(s), 2 partition(s), 1 unowned, 1 at risk\nSUSPECT: agg-1 (no heartbeat for over 8.5s"),
            "{r}"
        );
        assert!(r.contains("at risk until their leases expire: 0"), "{r}");
        assert!(r.contains("12000ms        65s  SUSPECT"), "{r}");
    }
}
