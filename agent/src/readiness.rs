//! When the agent is ready (`/readyz`): the source broker and the uplink are connected, acks are
//! flowing (no summaries lane holds a record older than `uplink.ack_warn_ms`; training lanes are
//! best effort and do not count) and the outbox is below its budget. A pure function of the agent's figures, so every condition is tested without a broker.

use crate::uplink::watch::LaneReport;
use std::time::Duration;

/// The outbox counts as full from this share of `max_outbox_bytes`: the budget coarsens summaries
/// down to 90 % once it is reached, so a backlog this big is losing resolution or about to.
pub const OUTBOX_FULL_PERCENT: u64 = 85;

/// What readiness is decided on.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    /// The source link is connected.
    pub source_connected: bool,
    /// The uplink is connected.
    pub uplink_connected: bool,
    /// Per-lane figures (see [`LaneReport`]).
    pub lanes: &'a [LaneReport],
    /// `uplink.ack_warn_ms`.
    pub ack_warn: Duration,
    /// Outbox records plus the checkpoint, bytes.
    pub outbox_bytes: u64,
    /// `uplink.max_outbox_bytes`.
    pub max_outbox_bytes: u64,
}

/// Every condition that fails, one sentence each; empty when ready.
pub fn failing(i: &Inputs<'_>) -> Vec<String> {
    let mut out = Vec::new();
    if !i.source_connected {
        out.push("source: not connected to the source broker".to_string());
    }
    if !i.uplink_connected {
        out.push("uplink: not connected to the uplink broker".to_string());
    }
    let mut stale: Vec<&LaneReport> = i
        .lanes
        .iter()
        // Training samples are best effort (evicted first, held within a tenth of the outbox) and
        // are never acknowledged where no aggregator trains: they do not make the agent unready.
        .filter(|l| l.kind == "main" && l.unacked > 0 && l.oldest_unacked > i.ack_warn)
        .collect();
    stale.sort_by_key(|l| (l.partition, l.kind));
    if !stale.is_empty() {
        let lanes: Vec<String> = stale
            .iter()
            .map(|l| {
                let kind = if l.kind == "main" {
                    String::new()
                } else {
                    format!(" ({})", l.kind)
                };
                format!(
                    "partition {}{kind}: {} records, oldest {} s",
                    l.partition,
                    l.unacked,
                    l.oldest_unacked.as_secs()
                )
            })
            .collect();
        out.push(format!(
            "acks: unacknowledged records older than uplink.ack_warn_ms ({} ms) on {}",
            i.ack_warn.as_millis(),
            lanes.join("; ")
        ));
    }
    let limit = i.max_outbox_bytes / 100 * OUTBOX_FULL_PERCENT
        + i.max_outbox_bytes % 100 * OUTBOX_FULL_PERCENT / 100;
    if i.outbox_bytes >= limit {
        out.push(format!(
            "outbox: {} bytes, at or above {OUTBOX_FULL_PERCENT} % of uplink.max_outbox_bytes ({}): summaries are being or about to be coarsened",
            i.outbox_bytes, i.max_outbox_bytes
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn lane(partition: u32, unacked: u64, oldest: Duration) -> LaneReport {
        LaneReport {
            partition,
            kind: "main",
            unacked,
            oldest_unacked: oldest,
            no_ack_for: oldest,
        }
    }

    fn ready() -> Inputs<'static> {
        Inputs {
            source_connected: true,
            uplink_connected: true,
            lanes: &[],
            ack_warn: 30 * S,
            outbox_bytes: 0,
            max_outbox_bytes: 1_000,
        }
    }

    #[test]
    fn ready_when_everything_holds() {
        let lanes = [lane(1, 5, 30 * S), lane(2, 0, Duration::ZERO)];
        let i = Inputs {
            lanes: &lanes,
            outbox_bytes: 849,
            ..ready()
        };
        assert_eq!(failing(&i), Vec::<String>::new());
    }

    #[test]
    fn each_failing_condition_is_named() {
        let lanes = [
            lane(9, 3, 31 * S),
            lane(2, 1, 3600 * S),
            LaneReport {
                kind: "training",
                ..lane(2, 4, 40 * S)
            },
            // Old figures of a lane holding nothing do not count.
            lane(4, 0, 999 * S),
        ];
        let i = Inputs {
            source_connected: false,
            uplink_connected: false,
            lanes: &lanes,
            outbox_bytes: 850,
            ..ready()
        };
        let f = failing(&i);
        assert_eq!(f.len(), 4, "{f:?}");
        assert!(f[0].starts_with("source:"), "{f:?}");
        assert!(f[1].starts_with("uplink:"), "{f:?}");
        assert_eq!(
            f[2],
            "acks: unacknowledged records older than uplink.ack_warn_ms (30000 ms) on partition 2: 1 records, oldest 3600 s; partition 9: 3 records, oldest 31 s"
        );
        assert!(f[3].starts_with("outbox: 850 bytes"), "{f:?}");
    }

    /// Training samples nobody acknowledges (no aggregator trains) leave the agent ready.
    #[test]
    fn unacknowledged_training_samples_do_not_make_the_agent_unready() {
        let lanes = [LaneReport {
            kind: "training",
            ..lane(3, 12, 7200 * S)
        }];
        let i = Inputs {
            lanes: &lanes,
            ..ready()
        };
        assert_eq!(failing(&i), Vec::<String>::new());
    }

    #[test]
    fn a_huge_budget_does_not_overflow() {
        let i = Inputs {
            max_outbox_bytes: u64::MAX,
            outbox_bytes: u64::MAX - 1,
            ..ready()
        };
        assert_eq!(failing(&i).len(), 1);
        let i = Inputs {
            max_outbox_bytes: u64::MAX,
            outbox_bytes: u64::MAX / 2,
            ..ready()
        };
        assert!(failing(&i).is_empty());
    }
}
