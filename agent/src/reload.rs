//! What a new configuration changes in a running agent, as a pure function of the old and the new
//! one: [`diff`] lists the changed keys and sorts them into those applied live and those that need
//! a restart. It decides nothing about validity (the new configuration is already valid) and does
//! no I/O; `control.rs` applies the plan (SIGHUP and remote configuration take the same path).
//!
//! Applied live: `anomaly.*` (threshold, re-arm rules, silence: every series, episode state kept),
//! `detector` (series created from then on; existing ones keep their detector state),
//! `source.subscriptions` (the worker swaps the topic mappings, then subscribes to the new filters
//! and unsubscribes from the removed ones), `uplink.batch_max_records`, `uplink.batch_max_delay_ms`,
//! `log.status_interval_ms`, `log.level` (through the hook the binary gives), `status.interval_ms`.
//! Every other key (links, QoS, windows, partitions, state, ...) is named as needing a restart; its
//! new value is not used until then.

use crate::config::AgentConfig;
pub use edgewatch_models::reload::{changed_keys, Plan};

/// Keys (or key prefixes, ending in `.`) applied without a restart.
pub const LIVE_KEYS: &[&str] = &[
    "anomaly.",
    "detector.",
    "detector",
    "source.subscriptions",
    "uplink.batch_max_records",
    "uplink.batch_max_delay_ms",
    "log.status_interval_ms",
    "log.level",
    "status.interval_ms",
];

/// The plan from `old` to `new`: every changed leaf key (a list counts as one value), sorted.
pub fn diff(old: &AgentConfig, new: &AgentConfig) -> Plan {
    Plan::of(old, new, LIVE_KEYS)
}

/// A configuration where the keys that need a restart keep `running`'s values and the live ones
/// take `new`'s: what the agent actually runs after applying `new` live.
pub fn merge_live(running: &AgentConfig, new: &AgentConfig) -> AgentConfig {
    let mut out = running.clone();
    out.anomaly = new.anomaly.clone();
    out.detector = new.detector.clone();
    out.source.subscriptions = new.source.subscriptions.clone();
    out.uplink.batch_max_records = new.uplink.batch_max_records;
    out.uplink.batch_max_delay_ms = new.uplink.batch_max_delay_ms;
    out.log.status_interval_ms = new.log.status_interval_ms;
    out.log.level = new.log.level.clone();
    out.status.interval_ms = new.status.interval_ms;
    out
}

/// Digest of a configuration: 16 hex digits of XXH3-64 of its JSON (fields in declaration order,
/// so the same configuration always gives the same digest, whatever the file's layout).
pub fn digest(cfg: &AgentConfig) -> String {
    let json = serde_json::to_vec(cfg).unwrap_or_default();
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&json))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(yaml: &str) -> AgentConfig {
        serde_norway::from_str(yaml).expect("parses")
    }

    #[test]
    fn the_same_configuration_changes_nothing() {
        let a = cfg("id: gw\nanomaly: { threshold: 0.7 }\n");
        assert!(diff(&a, &a.clone()).is_empty());
        assert_eq!(digest(&a), digest(&a.clone()));
    }

    #[test]
    fn thresholds_detector_batches_and_intervals_are_live() {
        let a = cfg("id: gw\n");
        let b = cfg("id: gw\nanomaly: { threshold: 0.9, silence: { min_silence_ms: 5000 } }\ndetector: { type: ewma, alpha: 0.2 }\nuplink: { batch_max_records: 10, batch_max_delay_ms: 50 }\nlog: { status_interval_ms: 1000, level: debug }\nstatus: { interval_ms: 1000 }\n");
        let plan = diff(&a, &b);
        assert!(plan.restart.is_empty(), "{plan:?}");
        for key in [
            "anomaly.threshold",
            "uplink.batch_max_records",
            "uplink.batch_max_delay_ms",
            "log.status_interval_ms",
            "log.level",
            "status.interval_ms",
        ] {
            assert!(plan.live.iter().any(|k| k == key), "{key} in {plan:?}");
        }
        assert!(plan.touches("anomaly.silence"), "{plan:?}");
        assert!(plan.touches("detector"), "{plan:?}");
        assert_ne!(digest(&a), digest(&b));
    }

    #[test]
    fn links_qos_windows_and_state_need_a_restart_and_are_named() {
        let a = cfg("id: gw\n");
        let b = cfg("id: gw2\nsource: { mqtt: { port: 1884 }, qos: 0, subscriptions: [ { topic: 'x/{device}/{metric}' } ] }\nwindow: { size_ms: 1000 }\nstate: { dir: /tmp/x }\nuplink: { partitions: 8, prefix: p }\nanomaly: { threshold: 0.8 }\n");
        let plan = diff(&a, &b);
        assert_eq!(
            plan.restart,
            vec![
                "id",
                "source.mqtt.port",
                "source.qos",
                "state.dir",
                "uplink.partitions",
                "uplink.prefix",
                "window.size_ms",
            ]
        );
        assert_eq!(plan.live, vec!["anomaly.threshold", "source.subscriptions"]);
        let merged = merge_live(&a, &b);
        assert_eq!(merged.source.subscriptions[0].topic, "x/{device}/{metric}");
        assert_eq!(merged.source.mqtt.port, a.source.mqtt.port);
    }

    #[test]
    fn a_key_that_only_shares_a_prefix_with_a_live_key_is_not_live() {
        let is_live = |k: &str| edgewatch_models::reload::is_live(k, LIVE_KEYS);
        assert!(is_live("anomaly.threshold"));
        assert!(is_live("detector"));
        assert!(is_live("detector.alpha"));
        assert!(!is_live("anomalyx.threshold"));
        assert!(!is_live("uplink.batch_max_records_x"));
        assert!(!is_live("status.remote_config"));
    }

    #[test]
    fn merging_keeps_restart_keys_and_takes_live_ones() {
        let a = cfg("id: gw\nwindow: { size_ms: 1000 }\n");
        let b = cfg("id: gw\nwindow: { size_ms: 2000 }\nanomaly: { threshold: 0.9 }\n");
        let m = merge_live(&a, &b);
        assert_eq!(m.window.size_ms, 1000);
        assert_eq!(m.anomaly.threshold, Some(0.9));
        // What still differs from the file is exactly what needs the restart.
        assert_eq!(diff(&m, &b).restart, vec!["window.size_ms"]);
        assert!(diff(&m, &b).live.is_empty());
    }
}
