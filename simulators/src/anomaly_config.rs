//! The `anomalies:` block of the simulator's configuration: which kinds are injected, how often,
//! how large and for how long, with the defaults (named functions) and validation.
//!
//! Part of [`crate::config`]; the cross-checks that need the rest of the config (the load kinds
//! need `load.enabled`) live there.

use crate::anomaly::AnomalyKind;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};

/// Which anomalies are injected, how often and how large.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnomalyConfig {
    /// Mean anomalies per series per simulated hour (Poisson arrivals); 0 disables injection.
    #[serde(default = "default_rate_per_series_hour")]
    pub rate_per_series_hour: f64,
    /// Kinds to draw from, in proportion to their weight in `kind_weights`.
    #[serde(default = "default_kinds")]
    pub kinds: Vec<AnomalyKind>,
    /// Relative weight of a kind when one is drawn; a kind of `kinds` missing here weighs 1, a kind
    /// here but not in `kinds` is never drawn. The defaults make the long load kinds rarer.
    #[serde(default = "default_kind_weights")]
    pub kind_weights: BTreeMap<AnomalyKind, f64>,
    /// No anomaly starts before `start + warmup_ms` (detectors need history).
    #[serde(default = "default_warmup_ms")]
    pub warmup_ms: u64,
    /// Least simulated time between the end of one anomaly and the start of the next in one series.
    #[serde(default = "default_min_gap_ms")]
    pub min_gap_ms: u64,
    /// Spike/dip offset, `[min, max]` noise standard deviations.
    #[serde(default = "default_spike_sigma")]
    pub spike_sigma: [f64; 2],
    /// Level-shift offset, `[min, max]` noise standard deviations (sign drawn at random).
    #[serde(default = "default_level_shift_sigma")]
    pub level_shift_sigma: [f64; 2],
    /// Level-shift length.
    #[serde(default = "default_level_shift_duration_ms")]
    pub level_shift_duration_ms: u64,
    /// Noise multiplier during a variance burst.
    #[serde(default = "default_burst_factor")]
    pub burst_factor: f64,
    /// Variance-burst length.
    #[serde(default = "default_burst_duration_ms")]
    pub burst_duration_ms: u64,
    /// Stuck-sensor length (the last value repeated exactly).
    #[serde(default = "default_stuck_duration_ms")]
    pub stuck_duration_ms: u64,
    /// Dropout length (no readings at all).
    #[serde(default = "default_dropout_duration_ms")]
    pub dropout_duration_ms: u64,
    /// Correlation break: how far the metric's frozen load input moves away from the load, as
    /// `[min, max]` noise std-devs of the metric (converted through its gain; kept inside the load's
    /// usual range, so the metric stays inside its own).
    #[serde(default = "default_correlation_break_sigma")]
    pub correlation_break_sigma: [f64; 2],
    /// Correlation-break length.
    #[serde(default = "default_correlation_break_duration_ms")]
    pub correlation_break_duration_ms: u64,
    /// Correlation break: the moves to the frozen target and back to the load are linear ramps this
    /// long (0 = steps), so the break is not a level shift to a univariate detector.
    #[serde(default = "default_correlation_break_ramp_ms")]
    pub correlation_break_ramp_ms: u64,
    /// Peer drift: size of the offset at the end of the drift, noise std-devs (sign drawn at random).
    #[serde(default = "default_peer_drift_sigma")]
    pub peer_drift_sigma: f64,
    /// Peer-drift length (all of it labelled): the offset grows linearly from 0 to its full size
    /// over `peer_drift_duration_ms - peer_drift_return_ms`, then returns linearly to 0.
    #[serde(default = "default_peer_drift_duration_ms")]
    pub peer_drift_duration_ms: u64,
    /// Peer drift: the return to normal at its end (0 = a step back after the last labelled reading).
    #[serde(default = "default_peer_drift_return_ms")]
    pub peer_drift_return_ms: u64,
}

fn default_rate_per_series_hour() -> f64 {
    0.5
}
fn default_kinds() -> Vec<AnomalyKind> {
    AnomalyKind::ALL.to_vec()
}
fn default_kind_weights() -> BTreeMap<AnomalyKind, f64> {
    BTreeMap::from([
        (AnomalyKind::CorrelationBreak, 0.5),
        (AnomalyKind::PeerDrift, 0.25),
    ])
}
fn default_warmup_ms() -> u64 {
    30 * 60_000
}
fn default_min_gap_ms() -> u64 {
    10 * 60_000
}
fn default_spike_sigma() -> [f64; 2] {
    [6.0, 12.0]
}
fn default_level_shift_sigma() -> [f64; 2] {
    [3.0, 6.0]
}
fn default_level_shift_duration_ms() -> u64 {
    15 * 60_000
}
fn default_burst_factor() -> f64 {
    5.0
}
fn default_burst_duration_ms() -> u64 {
    5 * 60_000
}
fn default_stuck_duration_ms() -> u64 {
    10 * 60_000
}
fn default_dropout_duration_ms() -> u64 {
    2 * 60_000
}
fn default_correlation_break_sigma() -> [f64; 2] {
    [5.0, 8.0]
}
fn default_correlation_break_duration_ms() -> u64 {
    20 * 60_000
}
fn default_correlation_break_ramp_ms() -> u64 {
    2 * 60_000
}
fn default_peer_drift_sigma() -> f64 {
    6.0
}
fn default_peer_drift_duration_ms() -> u64 {
    2 * 3_600_000
}
fn default_peer_drift_return_ms() -> u64 {
    10 * 60_000
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        Self {
            rate_per_series_hour: default_rate_per_series_hour(),
            kinds: default_kinds(),
            kind_weights: default_kind_weights(),
            warmup_ms: default_warmup_ms(),
            min_gap_ms: default_min_gap_ms(),
            spike_sigma: default_spike_sigma(),
            level_shift_sigma: default_level_shift_sigma(),
            level_shift_duration_ms: default_level_shift_duration_ms(),
            burst_factor: default_burst_factor(),
            burst_duration_ms: default_burst_duration_ms(),
            stuck_duration_ms: default_stuck_duration_ms(),
            dropout_duration_ms: default_dropout_duration_ms(),
            correlation_break_sigma: default_correlation_break_sigma(),
            correlation_break_duration_ms: default_correlation_break_duration_ms(),
            correlation_break_ramp_ms: default_correlation_break_ramp_ms(),
            peer_drift_sigma: default_peer_drift_sigma(),
            peer_drift_duration_ms: default_peer_drift_duration_ms(),
            peer_drift_return_ms: default_peer_drift_return_ms(),
        }
    }
}

impl AnomalyConfig {
    /// The weight of `kind` when drawing (1 unless `kind_weights` says otherwise).
    pub(crate) fn weight(&self, kind: AnomalyKind) -> f64 {
        self.kind_weights.get(&kind).copied().unwrap_or(1.0)
    }

    pub(crate) fn problems_into(&self, at: &str, out: &mut Vec<String>) {
        let r = self.rate_per_series_hour;
        if !(r.is_finite() && r >= 0.0) {
            out.push(format!(
                "{at}.rate_per_series_hour: must be finite and >= 0, got {r}"
            ));
        }
        if self.kinds.is_empty() && r > 0.0 {
            out.push(format!(
                "{at}.kinds: must list at least one kind when rate_per_series_hour > 0, got none"
            ));
        }
        for (k, w) in &self.kind_weights {
            if !(w.is_finite() && *w > 0.0 && *w <= 1e6) {
                out.push(format!(
                    "{at}.kind_weights.{}: must be in (0, 1000000] (remove the kind from kinds to \
                     turn it off), got {w}",
                    k.as_str()
                ));
            }
        }
        let mut seen = HashSet::new();
        for (i, k) in self.kinds.iter().enumerate() {
            if !seen.insert(*k) {
                out.push(format!("{at}.kinds[{i}]: duplicate kind {}", k.as_str()));
            }
        }
        for (field, [lo, hi]) in [
            ("spike_sigma", self.spike_sigma),
            ("level_shift_sigma", self.level_shift_sigma),
            ("correlation_break_sigma", self.correlation_break_sigma),
        ] {
            if !(lo.is_finite() && hi.is_finite() && lo > 0.0 && lo <= hi) {
                out.push(format!(
                    "{at}.{field}: must be [min, max] with 0 < min <= max, got [{lo}, {hi}]"
                ));
            }
        }
        if !(self.burst_factor.is_finite() && self.burst_factor > 1.0) {
            out.push(format!(
                "{at}.burst_factor: must be finite and > 1, got {}",
                self.burst_factor
            ));
        }
        for (field, v) in [
            ("level_shift_duration_ms", self.level_shift_duration_ms),
            ("burst_duration_ms", self.burst_duration_ms),
            ("stuck_duration_ms", self.stuck_duration_ms),
            ("dropout_duration_ms", self.dropout_duration_ms),
            (
                "correlation_break_duration_ms",
                self.correlation_break_duration_ms,
            ),
            ("peer_drift_duration_ms", self.peer_drift_duration_ms),
        ] {
            if v == 0 {
                out.push(format!("{at}.{field}: must be > 0, got 0"));
            }
        }
        for (field, v, duration_field, d) in [
            (
                "correlation_break_ramp_ms",
                self.correlation_break_ramp_ms,
                "correlation_break_duration_ms",
                self.correlation_break_duration_ms,
            ),
            (
                "peer_drift_return_ms",
                self.peer_drift_return_ms,
                "peer_drift_duration_ms",
                self.peer_drift_duration_ms,
            ),
        ] {
            if v > d / 2 {
                out.push(format!(
                    "{at}.{field}: must be <= half of {duration_field} ({d}), got {v}"
                ));
            }
        }
        let p = self.peer_drift_sigma;
        if !(p.is_finite() && p > 0.0) {
            out.push(format!(
                "{at}.peer_drift_sigma: must be finite and > 0, got {p}"
            ));
        }
    }
}
