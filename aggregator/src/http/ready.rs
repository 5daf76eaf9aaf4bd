//! When the aggregator is ready (`/readyz`): connected to its MQTT broker, owning at least one
//! partition, its store writing (no store or checkpoint write failed in the last
//! [`STORE_ERROR_WINDOW`]), and every partition of the fleet owned exactly once according to the
//! owners directory (after its start-up grace period). Same shape as the agent's: `200 ready`, or `503 not ready:` with one
//! line per failing condition. Pure functions of the figures and the time, tested directly.

use std::time::{Duration, Instant};

/// A store or checkpoint write failure keeps `/readyz` failing this long. Nothing probes the store
/// by itself: an aggregator that receives nothing to write cannot notice a broken disk.
pub(crate) const STORE_ERROR_WINDOW: Duration = Duration::from_secs(30);

/// Remembers when the store's error counters last moved.
#[derive(Debug, Default)]
pub(crate) struct StoreWatch {
    seen: u64,
    since: Option<(Instant, u64)>,
}

impl StoreWatch {
    /// Feeds the current total of store and checkpoint errors; `Some(errors)` when some failed
    /// within the window before `now` (how many since the first of them).
    pub(crate) fn recent(&mut self, total: u64, now: Instant) -> Option<u64> {
        if total > self.seen {
            let first = match self.since {
                Some((t, base)) if now.saturating_duration_since(t) < STORE_ERROR_WINDOW => base,
                _ => self.seen,
            };
            self.since = Some((now, first));
            self.seen = total;
        }
        match self.since {
            Some((t, base)) if now.saturating_duration_since(t) < STORE_ERROR_WINDOW => {
                Some(total - base)
            }
            _ => None,
        }
    }
}

/// What readiness is decided on.
#[derive(Debug, Clone)]
pub(crate) struct Inputs {
    pub broker_connected: bool,
    pub owned: usize,
    pub partitions: u32,
    pub cluster: bool,
    /// Store or checkpoint write errors in the last [`STORE_ERROR_WINDOW`].
    pub recent_store_errors: Option<u64>,
    /// Partitions no live aggregator owns (owners directory).
    pub uncovered: Vec<u32>,
    /// Partitions two or more live aggregators claim.
    pub overlapping: Vec<u32>,
}

/// Every condition that fails, one sentence each; empty when ready.
pub(crate) fn failing(i: &Inputs) -> Vec<String> {
    let mut out = Vec::new();
    if !i.broker_connected {
        out.push("broker: not connected to the MQTT broker".to_string());
    }
    if i.owned == 0 {
        let why = if i.cluster {
            "no partition lease won (yet)"
        } else {
            "check owned: in the configuration"
        };
        out.push(format!(
            "partitions: owns none of the {} partitions ({why})",
            i.partitions
        ));
    }
    if !i.uncovered.is_empty() {
        out.push(format!(
            "coverage: {} partition(s) owned by no live aggregator: {} (a stopped aggregator or a gap in the owned: ranges; their records wait in the agents' outboxes; see /api/status fleet)",
            i.uncovered.len(),
            crate::directory::ranges(&i.uncovered)
        ));
    }
    if !i.overlapping.is_empty() {
        out.push(format!(
            "coverage: {} partition(s) claimed by two or more aggregators: {} (overlapping owned: ranges; see /api/status fleet.aggregators)",
            i.overlapping.len(),
            crate::directory::ranges(&i.overlapping)
        ));
    }
    if let Some(n) = i.recent_store_errors {
        out.push(format!(
            "store: {n} write error(s) in the last {} s (edgewatch_aggregator_store_errors_total, edgewatch_aggregator_checkpoint_errors_total; see the log)",
            STORE_ERROR_WINDOW.as_secs()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready() -> Inputs {
        Inputs {
            broker_connected: true,
            owned: 4,
            partitions: 8,
            cluster: false,
            recent_store_errors: None,
            uncovered: Vec::new(),
            overlapping: Vec::new(),
        }
    }

    #[test]
    fn ready_when_connected_owning_and_writing() {
        assert!(failing(&ready()).is_empty());
    }

    #[test]
    fn each_failing_condition_is_named() {
        let f = failing(&Inputs {
            broker_connected: false,
            owned: 0,
            cluster: true,
            recent_store_errors: Some(3),
            ..ready()
        });
        assert_eq!(f.len(), 3, "{f:?}");
        assert!(f[0].starts_with("broker:"));
        assert_eq!(
            f[1],
            "partitions: owns none of the 8 partitions (no partition lease won (yet))"
        );
        assert!(
            f[2].starts_with("store: 3 write error(s) in the last 30 s"),
            "{f:?}"
        );
    }

    #[test]
    fn uncovered_and_overlapping_partitions_are_named() {
        let f = failing(&Inputs {
            uncovered: vec![4, 5, 6, 7, 9],
            overlapping: vec![1],
            ..ready()
        });
        assert_eq!(
            f[0],
            "coverage: 5 partition(s) owned by no live aggregator: 4-7, 9 (a stopped aggregator or a gap in the owned: ranges; their records wait in the agents' outboxes; see /api/status fleet)"
        );
        assert!(f[1].starts_with("coverage: 1 partition(s) claimed by two or more aggregators: 1 "));
    }

    #[test]
    fn store_errors_fail_readiness_for_the_window_after_the_last_one() {
        let t0 = Instant::now();
        let mut w = StoreWatch::default();
        assert_eq!(w.recent(0, t0), None);
        assert_eq!(w.recent(2, t0 + Duration::from_secs(1)), Some(2));
        assert_eq!(w.recent(3, t0 + Duration::from_secs(20)), Some(3));
        // 30 s after the last failure: ready again.
        assert_eq!(w.recent(3, t0 + Duration::from_secs(49)), Some(3));
        assert_eq!(w.recent(3, t0 + Duration::from_secs(50)), None);
        // A new failure counts alone.
        assert_eq!(w.recent(4, t0 + Duration::from_secs(60)), Some(1));
        // A clock that goes back is harmless.
        assert_eq!(w.recent(4, t0), Some(1));
    }
}
