//! What SIGHUP changes in a running aggregator, as a pure function of the configuration in force
//! and the new one ([`diff`], [`merge_live`]); [`Reloader`] applies the live part.
//!
//! Applied live: `log.level` (through the hook the binary gives), `fleet.gate.*` and
//! `fleet.peers.*` (every device's gate is retuned with its episode state kept; the next refit
//! uses the new options), `fleet.min_devices`, `fleet.min_windows`, and the trainer's bounds and
//! pace (`training.max_rows`, `min_rows`, `min_samples`, `refit_interval_ms`,
//! `class_min_devices`, `max_devices`, `max_values`). Every other key (links, partitions, HTTP,
//! feed, state, cluster, intervals of the background loops, ...) needs a restart and is named.

use crate::config::AggregatorConfig;
use crate::Shared;
pub use edgewatch_models::reload::Plan;
use std::sync::{Arc, Mutex};

/// Keys (or key prefixes, ending in `.`) applied without a restart.
pub const LIVE_KEYS: &[&str] = &[
    "log.level",
    "fleet.gate.",
    "fleet.peers.",
    "fleet.min_devices",
    "fleet.min_windows",
    "training.max_rows",
    "training.min_rows",
    "training.min_samples",
    "training.refit_interval_ms",
    "training.class_min_devices",
    "training.max_devices",
    "training.max_values",
];

/// The plan from `old` to `new`.
pub fn diff(old: &AggregatorConfig, new: &AggregatorConfig) -> Plan {
    Plan::of(old, new, LIVE_KEYS)
}

/// `running` with the live keys of `new`: what the aggregator runs after applying `new`.
pub fn merge_live(running: &AggregatorConfig, new: &AggregatorConfig) -> AggregatorConfig {
    let mut out = running.clone();
    out.log.level = new.log.level.clone();
    out.fleet.gate = new.fleet.gate;
    out.fleet.peers = new.fleet.peers.clone();
    out.fleet.min_devices = new.fleet.min_devices;
    out.fleet.min_windows = new.fleet.min_windows;
    let (t, n) = (&mut out.training, &new.training);
    t.max_rows = n.max_rows;
    t.min_rows = n.min_rows;
    t.min_samples = n.min_samples;
    t.refit_interval_ms = n.refit_interval_ms;
    t.class_min_devices = n.class_min_devices;
    t.max_devices = n.max_devices;
    t.max_values = n.max_values;
    out
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Keys applied now.
    pub live: Vec<String>,
    /// Keys that differ from the configuration the aggregator started with and wait for a restart.
    pub restart: Vec<String>,
}

/// Applies reloads to a running aggregator (cheap to clone; see [`crate::Aggregator::reloader`]).
#[derive(Clone)]
pub struct Reloader {
    shared: Arc<Shared>,
    /// The configuration in force: the start's, with every live change applied since.
    running: Arc<Mutex<AggregatorConfig>>,
}

impl Reloader {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        let running = Arc::new(Mutex::new(shared.cfg.clone()));
        Self { shared, running }
    }

    /// Applies the live part of `new` (already parsed; checked here like at start). An invalid
    /// configuration changes nothing and is returned as every problem found.
    pub fn apply(&self, new: &AggregatorConfig) -> Result<Applied, Vec<String>> {
        let problems = new.problems();
        if !problems.is_empty() {
            return Err(problems);
        }
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let plan = diff(&running, new);
        let merged = merge_live(&running, new);
        if plan.touches("fleet.") {
            if let Some(fleet) = &self.shared.fleet {
                fleet
                    .retune(&merged.fleet)
                    .map_err(|e| vec![format!("fleet.{e}")])?;
            }
        }
        if plan.touches("training.") {
            if let Some(training) = &self.shared.training {
                training.retune(&merged.training);
            }
        }
        *running = merged;
        Ok(Applied {
            live: plan.live,
            restart: diff(&self.shared.cfg, new).restart,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(yaml: &str) -> AggregatorConfig {
        serde_norway::from_str(yaml).unwrap()
    }

    #[test]
    fn gates_peer_options_trainer_bounds_and_log_level_are_live() {
        let a = cfg("id: a\n");
        let b = cfg("id: a\nlog: { level: debug }\nfleet: { min_devices: 7, gate: { rearm_ratio: 0.5 }, peers: { limit: 9.0 } }\ntraining: { max_rows: 500, min_rows: 20 }\n");
        let plan = diff(&a, &b);
        assert!(plan.restart.is_empty(), "{plan:?}");
        for key in [
            "log.level",
            "fleet.min_devices",
            "fleet.gate.rearm_ratio",
            "fleet.peers.limit",
            "training.max_rows",
            "training.min_rows",
        ] {
            assert!(plan.live.iter().any(|k| k == key), "{key} in {plan:?}");
        }
        let m = merge_live(&a, &b);
        assert!(diff(&m, &b).is_empty(), "{:?}", diff(&m, &b));
    }

    #[test]
    fn links_partitions_http_feed_and_intervals_need_a_restart() {
        let a = cfg("id: a\n");
        let b = cfg("id: b\nowned: ['0-31']\nhttp: { listen: '127.0.0.1:1' }\nfeed: { history: 10 }\nfleet: { enabled: true, refit_interval_ms: 1000 }\ntraining: { enabled: true, check_interval_ms: 5 }\nlog: { level: warn }\n");
        let plan = diff(&a, &b);
        assert_eq!(
            plan.restart,
            vec![
                "feed.history",
                "fleet.enabled",
                "fleet.refit_interval_ms",
                "http.listen",
                "id",
                "owned",
                "training.check_interval_ms",
                "training.enabled",
            ]
        );
        assert_eq!(plan.live, vec!["log.level"]);
        // What still differs after merging is exactly what needs the restart.
        assert_eq!(diff(&merge_live(&a, &b), &b).restart, plan.restart);
    }
}
