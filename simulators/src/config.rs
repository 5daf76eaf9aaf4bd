//! The simulator's YAML configuration: a serde mirror of the file and its validation.
//!
//! Owns field names, defaults (each a named function) and `problems()`, which reports every invalid
//! field at once. It does not read files or resolve secrets: the caller loads the YAML (with
//! `serde_path_to_error` for key paths) and `run` resolves the MQTT password.

use crate::anomaly::AnomalyKind;
pub use crate::anomaly_config::AnomalyConfig;
use crate::load::LoadConfig;
use crate::topic::TopicTemplate;
use edgewatch_link::MqttLink;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::PathBuf;

/// Everything that defines a simulated fleet and how it is published.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatorConfig {
    /// Broker to publish to.
    #[serde(default = "default_mqtt")]
    pub mqtt: MqttLink,
    /// Topic template; `{device}` and `{metric}` are replaced per reading.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// MQTT QoS of the publishes: 0 or 1.
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// QoS 1 publishes awaiting a PubAck at once (rumqttc's inflight window).
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    /// Number of simulated devices.
    #[serde(default = "default_devices")]
    pub devices: usize,
    /// Device ids are this prefix plus a zero-padded index (`dev-0000`, `dev-0001`, ...).
    #[serde(default = "default_device_prefix")]
    pub device_prefix: String,
    /// Metrics every device reports; one series per (device, metric).
    #[serde(default = "default_metrics")]
    pub metrics: Vec<MetricSpec>,
    /// The hidden load per device that drives its metrics (see [`MetricSpec::load_gain`]).
    #[serde(default)]
    pub load: LoadConfig,
    /// Simulated time between two readings of one series.
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// Simulated time of the first reading (Unix ms); `None` = wall clock at start, rounded to the second.
    #[serde(default)]
    pub start_ms: Option<i64>,
    /// Simulated time to run; `None` = until shutdown.
    #[serde(default)]
    pub duration_ms: Option<u64>,
    /// Simulated ms per wall ms (1.0 = real time).
    #[serde(default = "default_speedup")]
    pub speedup: f64,
    /// Hard cap on publishes per wall-clock second, whatever the speedup.
    #[serde(default = "default_max_rate_per_sec")]
    pub max_rate_per_sec: u64,
    /// Seed of every random choice: same seed, same readings and labels.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Where to write the ground truth as JSON lines; `None` = not written.
    #[serde(default)]
    pub ground_truth_path: Option<PathBuf>,
    /// Where to write every reading handed to the MQTT client, one CSV line
    /// `device,metric,ts_ms,value` each (for `edgewatch verify`); `None` = not written.
    #[serde(default)]
    pub readings_log_path: Option<PathBuf>,
    /// Injected anomalies.
    #[serde(default = "default_anomalies")]
    pub anomalies: AnomalyConfig,
}

/// One metric of every device: `base + daily sine + drift + load_gain · lag(load)^load_power +
/// Gaussian noise`, where `load` is the device's hidden load (when `load.enabled`) and `lag` a
/// first-order lag with time constant `load_lag_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricSpec {
    /// Metric name, used in topics.
    pub name: String,
    /// Mean level, in the metric's unit.
    pub base: f64,
    /// Amplitude of the daily sine (period 24 h of simulated time, peak mid-afternoon UTC).
    #[serde(default)]
    pub daily_amplitude: f64,
    /// Standard deviation of the Gaussian noise; anomaly sizes are multiples of it.
    #[serde(default = "default_noise_std")]
    pub noise_std: f64,
    /// Largest slow drift per simulated hour; each series draws its own rate in ±[0.5, 1.5] × this.
    #[serde(default)]
    pub drift_per_hour: f64,
    /// How much the device's load moves this metric, in the metric's unit per unit of load
    /// (0 = not driven by the load; ignored when `load.enabled` is false).
    #[serde(default)]
    pub load_gain: f64,
    /// Time constant of the first-order lag (an exponential moving average) between the load and
    /// this metric; 0 = follows the load at once (temperature lags current, say).
    #[serde(default)]
    pub load_lag_ms: u64,
    /// Exponent applied to the (lagged) load before the gain; 1 = linear.
    #[serde(default = "default_load_power")]
    pub load_power: f64,
}

fn default_mqtt() -> MqttLink {
    MqttLink::default()
}
fn default_anomalies() -> AnomalyConfig {
    AnomalyConfig::default()
}
fn default_topic() -> String {
    "sensors/{device}/{metric}".to_string()
}
fn default_qos() -> u8 {
    0
}
fn default_max_inflight() -> u16 {
    1000
}
fn default_devices() -> usize {
    20
}
fn default_device_prefix() -> String {
    "dev-".to_string()
}
/// A pump: one hidden load drives temperature (lagging by 10 min), flow, motor current and
/// discharge pressure. The daily cycle comes from the load, so the metrics' own sines are off.
/// Every gain is 50 noise std-devs per unit of load: the default walk (std 0.02) moves each metric
/// by about 1 sigma, the daily cycle (±0.25) by ±12.5.
fn default_metrics() -> Vec<MetricSpec> {
    let m = |name: &str, base, noise_std, drift_per_hour, load_gain, load_lag_ms| MetricSpec {
        name: name.to_string(),
        base,
        daily_amplitude: 0.0,
        noise_std,
        drift_per_hour,
        load_gain,
        load_lag_ms,
        load_power: default_load_power(),
    };
    vec![
        // °C: 24 °C at the mean load
        m("temperature", 18.0, 0.2, 0.002, 10.0, 600_000),
        // m³/h
        m("flow", 2.0, 0.5, 0.0, 25.0, 0),
        // A
        m("current", 4.0, 0.3, 0.002, 15.0, 0),
        // kPa
        m("pressure", 100.0, 0.05, 0.0005, 2.5, 0),
    ]
}
fn default_load_power() -> f64 {
    1.0
}
fn default_noise_std() -> f64 {
    1.0
}
fn default_interval_ms() -> u64 {
    1000
}
fn default_speedup() -> f64 {
    1.0
}
fn default_max_rate_per_sec() -> u64 {
    50_000
}
fn default_seed() -> u64 {
    42
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        Self {
            mqtt: default_mqtt(),
            topic: default_topic(),
            qos: default_qos(),
            max_inflight: default_max_inflight(),
            devices: default_devices(),
            device_prefix: default_device_prefix(),
            metrics: default_metrics(),
            load: LoadConfig::default(),
            interval_ms: default_interval_ms(),
            start_ms: None,
            duration_ms: None,
            speedup: default_speedup(),
            max_rate_per_sec: default_max_rate_per_sec(),
            seed: default_seed(),
            ground_truth_path: None,
            readings_log_path: None,
            anomalies: default_anomalies(),
        }
    }
}

/// Characters a device prefix or metric name may not contain: they would break the topic level
/// (`/`), make it a wildcard (`+`, `#`) or be rejected by NATS's MQTT listener (`.`, whitespace).
fn bad_level_char(c: char) -> bool {
    matches!(c, '/' | '+' | '#' | '.') || c.is_whitespace() || c.is_control()
}

impl SimulatorConfig {
    /// Every invalid field, as `field.path: message naming the bad value`; empty when valid.
    pub fn problems(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .mqtt
            .problems()
            .into_iter()
            .map(|p| format!("mqtt.{p}"))
            .collect();
        if let Err(e) = TopicTemplate::parse(&self.topic) {
            out.push(format!("topic: {e}"));
        }
        if self.qos > 1 {
            out.push(format!("qos: must be 0 or 1, got {}", self.qos));
        }
        if self.max_inflight == 0 {
            out.push("max_inflight: must be > 0, got 0".to_string());
        }
        if self.devices == 0 {
            out.push("devices: must be > 0, got 0".to_string());
        }
        // Each series holds its generators in memory (~200 bytes): a million devices is plenty.
        if self.devices > 1_000_000 {
            out.push(format!("devices: must be <= 1000000, got {}", self.devices));
        }
        if let Some(c) = self.device_prefix.chars().find(|&c| bad_level_char(c)) {
            out.push(format!(
                "device_prefix: must not contain {c:?}, got {:?}",
                self.device_prefix
            ));
        }
        if self.metrics.is_empty() {
            out.push("metrics: must list at least one metric, got none".to_string());
        }
        let mut seen = HashSet::new();
        for (i, m) in self.metrics.iter().enumerate() {
            let at = format!("metrics[{i}]");
            if m.name.is_empty() {
                out.push(format!("{at}.name: must not be empty"));
            } else if let Some(c) = m.name.chars().find(|&c| bad_level_char(c)) {
                out.push(format!(
                    "{at}.name: must not contain {c:?}, got {:?}",
                    m.name
                ));
            }
            if !seen.insert(m.name.as_str()) {
                out.push(format!("{at}.name: duplicate metric name {:?}", m.name));
            }
            for (field, v) in [
                ("base", m.base),
                ("daily_amplitude", m.daily_amplitude),
                ("drift_per_hour", m.drift_per_hour),
            ] {
                if !v.is_finite() {
                    out.push(format!("{at}.{field}: must be finite, got {v}"));
                }
            }
            if !m.load_gain.is_finite() {
                out.push(format!(
                    "{at}.load_gain: must be finite, got {}",
                    m.load_gain
                ));
            }
            if !(m.load_power.is_finite() && m.load_power > 0.0 && m.load_power <= 10.0) {
                out.push(format!(
                    "{at}.load_power: must be in (0, 10], got {}",
                    m.load_power
                ));
            }
            if m.load_lag_ms > 86_400_000 {
                out.push(format!(
                    "{at}.load_lag_ms: must be <= 86400000 (a day), got {}",
                    m.load_lag_ms
                ));
            }
            if !(m.noise_std.is_finite() && m.noise_std > 0.0) {
                out.push(format!(
                    "{at}.noise_std: must be finite and > 0 (anomaly sizes are multiples of it), got {}",
                    m.noise_std
                ));
            }
        }
        if self.interval_ms == 0 {
            out.push("interval_ms: must be > 0, got 0".to_string());
        }
        if let Some(p) = self
            .readings_log_path
            .as_ref()
            .filter(|p| self.ground_truth_path.as_ref() == Some(*p))
        {
            out.push(format!(
                "readings_log_path: must differ from ground_truth_path, both are {}",
                p.display()
            ));
        }
        if let Some(s) = self.start_ms {
            if s < 0 {
                out.push(format!("start_ms: must be >= 0, got {s}"));
            }
        }
        if self.duration_ms == Some(0) {
            out.push("duration_ms: must be > 0 when set, got 0".to_string());
        }
        if !(self.speedup.is_finite() && self.speedup > 0.0) {
            out.push(format!(
                "speedup: must be finite and > 0, got {}",
                self.speedup
            ));
        }
        if self.max_rate_per_sec == 0 {
            out.push("max_rate_per_sec: must be > 0, got 0".to_string());
        }
        self.load.problems_into("load", &mut out);
        self.anomalies.problems_into("anomalies", &mut out);
        self.load_kind_problems_into(&mut out);
        out
    }

    /// correlation_break and peer_drift are defined against the hidden load.
    fn load_kind_problems_into(&self, out: &mut Vec<String>) {
        for (i, k) in self.anomalies.kinds.iter().enumerate() {
            if !k.needs_load() {
                continue;
            }
            if !self.load.enabled {
                out.push(format!(
                    "anomalies.kinds[{i}]: {} needs load.enabled: true (it is defined against the \
                     device's hidden load); enable the load or remove the kind",
                    k.as_str()
                ));
            } else if *k == AnomalyKind::CorrelationBreak {
                if !self.metrics.iter().any(|m| m.load_gain != 0.0) {
                    out.push(format!(
                        "anomalies.kinds[{i}]: correlation_break needs at least one metric with \
                         load_gain != 0, got none"
                    ));
                }
                if self.load.daily_amplitude <= 0.0 && self.load.walk_std <= 0.0 {
                    out.push(format!(
                        "anomalies.kinds[{i}]: correlation_break needs a moving load \
                         (load.daily_amplitude or load.walk_std > 0), got a constant one"
                    ));
                }
            }
        }
    }

    /// Number of series: devices × metrics.
    pub(crate) fn series(&self) -> usize {
        self.devices.saturating_mul(self.metrics.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn has(p: &[String], prefix: &str, needle: &str) -> bool {
        p.iter()
            .any(|m| m.starts_with(prefix) && m.contains(needle))
    }

    #[test]
    fn default_config_is_valid() {
        assert_eq!(SimulatorConfig::default().problems(), Vec::<String>::new());
    }

    #[test]
    fn problems_report_every_bad_field_with_its_value() {
        let mut cfg = SimulatorConfig {
            devices: 0,
            interval_ms: 0,
            speedup: -2.0,
            qos: 2,
            topic: "sensors/{device}/{sensor}".into(),
            ..Default::default()
        };
        cfg.anomalies.spike_sigma = [8.0, 4.0];
        cfg.anomalies.burst_factor = f64::NAN;
        cfg.mqtt.port = 0;
        let p = cfg.problems();
        assert!(has(&p, "devices:", "got 0"), "{p:#?}");
        assert!(has(&p, "interval_ms:", "got 0"), "{p:#?}");
        assert!(has(&p, "speedup:", "got -2"), "{p:#?}");
        assert!(has(&p, "qos:", "got 2"), "{p:#?}");
        assert!(has(&p, "topic:", "{sensor}"), "{p:#?}");
        assert!(has(&p, "anomalies.spike_sigma:", "[8, 4]"), "{p:#?}");
        assert!(has(&p, "anomalies.burst_factor:", "NaN"), "{p:#?}");
        assert!(has(&p, "mqtt.port:", "got 0"), "{p:#?}");
        assert_eq!(p.len(), 8, "{p:#?}");
    }

    #[test]
    fn zero_speedup_is_rejected() {
        let cfg = SimulatorConfig {
            speedup: 0.0,
            ..Default::default()
        };
        assert!(has(&cfg.problems(), "speedup:", "got 0"));
    }

    #[test]
    fn empty_and_duplicate_metric_lists_are_rejected() {
        let empty = SimulatorConfig {
            metrics: vec![],
            ..Default::default()
        };
        assert!(has(&empty.problems(), "metrics:", "none"));

        let mut dup = SimulatorConfig::default();
        dup.metrics[2].name = "temperature".into();
        dup.metrics[1].noise_std = 0.0;
        let p = dup.problems();
        assert!(has(&p, "metrics[2].name:", "\"temperature\""), "{p:#?}");
        assert!(has(&p, "metrics[1].noise_std:", "got 0"), "{p:#?}");
    }

    #[test]
    fn names_that_break_topic_levels_are_rejected() {
        let mut cfg = SimulatorConfig {
            device_prefix: "site/a-".into(),
            ..Default::default()
        };
        cfg.metrics[0].name = "temp.c".into();
        let p = cfg.problems();
        assert!(has(&p, "device_prefix:", "'/'"), "{p:#?}");
        assert!(has(&p, "metrics[0].name:", "'.'"), "{p:#?}");
    }

    #[test]
    fn the_readings_log_and_the_ground_truth_need_their_own_files() {
        let cfg = SimulatorConfig {
            ground_truth_path: Some("out/x".into()),
            readings_log_path: Some("out/x".into()),
            ..Default::default()
        };
        assert!(has(&cfg.problems(), "readings_log_path:", "out/x"));
    }

    #[test]
    fn bad_load_and_new_kind_values_are_rejected_with_the_field_named() {
        let mut cfg = SimulatorConfig::default();
        cfg.metrics[0].load_gain = f64::NAN;
        cfg.metrics[1].load_power = 0.0;
        cfg.metrics[2].load_lag_ms = 100_000_000;
        cfg.load.walk_std = -0.1;
        let a = &mut cfg.anomalies;
        a.correlation_break_sigma = [0.0, 3.0];
        a.correlation_break_duration_ms = 60_000;
        a.correlation_break_ramp_ms = 120_000;
        a.peer_drift_sigma = f64::INFINITY;
        a.peer_drift_duration_ms = 0;
        a.peer_drift_return_ms = 0;
        let p = cfg.problems();
        assert!(has(&p, "metrics[0].load_gain:", "NaN"), "{p:#?}");
        assert!(has(&p, "metrics[1].load_power:", "got 0"), "{p:#?}");
        assert!(has(&p, "metrics[2].load_lag_ms:", "100000000"), "{p:#?}");
        assert!(has(&p, "load.walk_std:", "-0.1"), "{p:#?}");
        assert!(
            has(&p, "anomalies.correlation_break_sigma:", "[0, 3]"),
            "{p:#?}"
        );
        assert!(
            has(
                &p,
                "anomalies.correlation_break_ramp_ms:",
                "(60000), got 120000"
            ),
            "{p:#?}"
        );
        assert!(has(&p, "anomalies.peer_drift_sigma:", "inf"), "{p:#?}");
        assert!(
            has(&p, "anomalies.peer_drift_duration_ms:", "got 0"),
            "{p:#?}"
        );
        assert_eq!(p.len(), 8, "{p:#?}");
        let mut r = SimulatorConfig::default();
        r.anomalies.peer_drift_return_ms = 3_600_001;
        let p = r.problems();
        assert!(
            has(
                &p,
                "anomalies.peer_drift_return_ms:",
                "(7200000), got 3600001"
            ),
            "{p:#?}"
        );
        assert_eq!(p.len(), 1, "{p:#?}");

        let mut w = SimulatorConfig::default();
        w.anomalies.kind_weights.insert(AnomalyKind::Spike, 0.0);
        w.anomalies.kind_weights.insert(AnomalyKind::Dip, f64::NAN);
        let p = w.problems();
        assert!(has(&p, "anomalies.kind_weights.spike:", "got 0"), "{p:#?}");
        assert!(has(&p, "anomalies.kind_weights.dip:", "NaN"), "{p:#?}");
        assert_eq!(p.len(), 2, "{p:#?}");
    }

    #[test]
    fn load_kinds_need_the_load_and_a_load_driven_metric() {
        let mut off = SimulatorConfig::default();
        off.load.enabled = false;
        let p = off.problems();
        assert!(
            has(
                &p,
                "anomalies.kinds[6]:",
                "correlation_break needs load.enabled"
            ),
            "{p:#?}"
        );
        assert!(
            has(&p, "anomalies.kinds[7]:", "peer_drift needs load.enabled"),
            "{p:#?}"
        );
        assert_eq!(p.len(), 2, "{p:#?}");
        off.anomalies.kinds.retain(|k| !k.needs_load());
        assert_eq!(off.problems(), Vec::<String>::new());

        let mut no_gain = SimulatorConfig::default();
        no_gain.metrics.iter_mut().for_each(|m| m.load_gain = 0.0);
        let p = no_gain.problems();
        assert!(has(&p, "anomalies.kinds[6]:", "load_gain != 0"), "{p:#?}");
        assert_eq!(p.len(), 1, "{p:#?}");

        let mut flat = SimulatorConfig::default();
        flat.load.daily_amplitude = 0.0;
        flat.load.walk_std = 0.0;
        let p = flat.problems();
        assert!(has(&p, "anomalies.kinds[6]:", "constant"), "{p:#?}");
        // A flat load is fine without correlation breaks.
        flat.anomalies.kinds = vec![AnomalyKind::PeerDrift];
        assert_eq!(flat.problems(), Vec::<String>::new());
    }

    #[test]
    fn load_fields_parse_with_defaults() {
        let cfg: SimulatorConfig = serde_json::from_str(
            r#"{"load": {"walk_std": 0.05}, "metrics": [{"name": "rpm", "base": 1.0, "load_gain": 2.0}]}"#,
        )
        .unwrap();
        assert_eq!(cfg.load.walk_std, 0.05);
        assert_eq!(cfg.load.mean, 0.6);
        assert!(cfg.load.enabled);
        assert_eq!(cfg.metrics[0].load_power, 1.0);
        assert_eq!(cfg.metrics[0].load_lag_ms, 0);
        assert_eq!(cfg.anomalies.weight(AnomalyKind::PeerDrift), 0.25);
        assert_eq!(cfg.anomalies.weight(AnomalyKind::Spike), 1.0);
        let w: AnomalyConfig = serde_json::from_str(r#"{"kind_weights": {"stuck": 3.0}}"#).unwrap();
        assert_eq!(w.weight(AnomalyKind::Stuck), 3.0);
        assert_eq!(
            w.weight(AnomalyKind::PeerDrift),
            1.0,
            "the map replaces the defaults"
        );
        assert!(
            serde_json::from_str::<AnomalyConfig>(r#"{"kind_weights": {"stuk": 3.0}}"#).is_err()
        );
        assert_eq!(cfg.problems(), Vec::<String>::new());
        let e = serde_json::from_str::<SimulatorConfig>(r#"{"load": {"walk": 1}}"#).unwrap_err();
        assert!(e.to_string().contains("walk"), "{e}");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let e = serde_json::from_str::<SimulatorConfig>(r#"{"device": 3}"#).unwrap_err();
        assert!(e.to_string().contains("device"), "{e}");
        let e =
            serde_json::from_str::<SimulatorConfig>(r#"{"anomalies": {"rate": 1}}"#).unwrap_err();
        assert!(e.to_string().contains("rate"), "{e}");
    }

    #[test]
    fn the_example_config_file_loads_and_is_valid() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/simulator.yaml");
        let text = std::fs::read_to_string(path).unwrap();
        // The guard every config loader puts in front of the YAML parser (tools/src/config.rs).
        let limits = edgewatch_models::yaml_limits::YamlLimits::default();
        edgewatch_models::yaml_limits::check(text.as_bytes(), limits).unwrap();
        let cfg: SimulatorConfig = serde_norway::from_str(&text).unwrap();
        assert_eq!(cfg.problems(), Vec::<String>::new());
        // Every kind, the two load-based ones included (the file's fleet is correlated).
        assert_eq!(cfg.anomalies.kinds, AnomalyKind::ALL.to_vec());
        assert!(cfg.load.enabled);
        assert!(cfg.metrics.iter().all(|m| m.load_gain > 0.0));
        // The file shows the defaults.
        let d = SimulatorConfig::default();
        assert_eq!(cfg.metrics, d.metrics);
        assert_eq!(cfg.load, d.load);
        assert_eq!(cfg.anomalies, d.anomalies);
    }
}
