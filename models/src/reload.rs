//! What a reload changes, for any component: the key paths that differ between two
//! configurations (as JSON), sorted into those a component applies live and those that need a
//! restart. Pure; each component names its live keys (`agent/src/reload.rs`,
//! `aggregator/src/reload.rs`).

use serde::Serialize;
use serde_json::Value;

/// The changes from one configuration to the next.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Changed keys applied live, as key paths (`anomaly.threshold`).
    pub live: Vec<String>,
    /// Changed keys that take effect only after a restart.
    pub restart: Vec<String>,
}

impl Plan {
    /// The plan from `old` to `new` where `live_keys` are applied live: exact key paths, or
    /// prefixes ending in `.` (`anomaly.` covers `anomaly.threshold`, not `anomalyx`).
    pub fn of<T: Serialize>(old: &T, new: &T, live_keys: &[&str]) -> Plan {
        let mut plan = Plan::default();
        for key in changed_keys(&to_value(old), &to_value(new)) {
            if is_live(&key, live_keys) {
                plan.live.push(key);
            } else {
                plan.restart.push(key);
            }
        }
        plan
    }

    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty() && self.restart.is_empty()
    }

    /// Whether a live key under `prefix` changed.
    pub fn touches(&self, prefix: &str) -> bool {
        self.live.iter().any(|k| k.starts_with(prefix))
    }
}

/// Whether `key` is one of `live_keys` (exact, or under a prefix ending in `.`).
pub fn is_live(key: &str, live_keys: &[&str]) -> bool {
    live_keys.iter().any(|live| {
        if let Some(prefix) = live.strip_suffix('.') {
            key.strip_prefix(prefix).is_some_and(|r| r.starts_with('.'))
        } else {
            key == *live
        }
    })
}

fn to_value<T: Serialize>(cfg: &T) -> Value {
    // Serialising plain config structs cannot fail (no maps with non-string keys).
    serde_json::to_value(cfg).unwrap_or(Value::Null)
}

/// Every leaf key path whose value differs between two JSON documents (a list counts as one
/// value), sorted.
pub fn changed_keys(a: &Value, b: &Value) -> Vec<String> {
    let mut changed = Vec::new();
    walk(a, b, String::new(), &mut changed);
    changed.sort();
    changed
}

fn walk(a: &Value, b: &Value, path: String, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                walk(
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                    p,
                    out,
                );
            }
        }
        _ if a != b => out.push(if path.is_empty() { ".".into() } else { path }),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn leaves_are_named_by_path_and_lists_count_as_one_value() {
        let a = json!({"a": {"b": 1, "c": [1, 2]}, "d": "x"});
        let b = json!({"a": {"b": 2, "c": [1, 3], "e": true}, "d": "x"});
        assert_eq!(changed_keys(&a, &b), vec!["a.b", "a.c", "a.e"]);
        assert!(changed_keys(&a, &a).is_empty());
        assert_eq!(changed_keys(&json!(1), &json!(2)), vec!["."]);
    }

    #[test]
    fn live_prefixes_cover_their_subkeys_only() {
        let live = ["anomaly.", "detector", "log.level"];
        assert!(is_live("anomaly.threshold", &live));
        assert!(is_live("detector", &live));
        assert!(!is_live("detector.alpha", &live));
        assert!(!is_live("anomalyx.threshold", &live));
        assert!(!is_live("anomaly", &live));
        assert!(is_live("log.level", &live));
        assert!(!is_live("log.level_x", &live));
        let plan = Plan::of(
            &json!({"anomaly": {"threshold": 0.5}, "window": 1}),
            &json!({"anomaly": {"threshold": 0.6}, "window": 2}),
            &live,
        );
        assert_eq!(plan.live, vec!["anomaly.threshold"]);
        assert_eq!(plan.restart, vec!["window"]);
        assert!(plan.touches("anomaly"));
        assert!(!plan.is_empty());
    }
}
