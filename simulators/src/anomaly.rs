//! Anomaly kinds, ground-truth labels, and the per-series anomaly in progress.
//!
//! Owns what an anomaly does to one reading (`Active::apply`) and the label it produces. It does
//! not decide when anomalies happen: the fleet schedules them from its seeded generator.

use serde::{Deserialize, Serialize};

/// What was injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyKind {
    /// One reading far above the normal signal.
    Spike,
    /// One reading far below the normal signal.
    Dip,
    /// A constant offset for a while.
    LevelShift,
    /// Noise multiplied by a factor for a while.
    VarianceBurst,
    /// The last value repeated exactly for a while.
    Stuck,
    /// No readings at all for a while.
    Dropout,
    /// One metric of a correlated device stops following the device's load (its load input freezes
    /// and moves towards the middle of the load's usual range) while staying inside its normal range.
    CorrelationBreak,
    /// One metric of a correlated device drifts away from its identical peers: an offset growing
    /// linearly to a number of noise std-devs, gone when the drift ends.
    PeerDrift,
}

impl AnomalyKind {
    /// Every kind, in declaration order.
    pub const ALL: [AnomalyKind; 8] = [
        AnomalyKind::Spike,
        AnomalyKind::Dip,
        AnomalyKind::LevelShift,
        AnomalyKind::VarianceBurst,
        AnomalyKind::Stuck,
        AnomalyKind::Dropout,
        AnomalyKind::CorrelationBreak,
        AnomalyKind::PeerDrift,
    ];

    /// The snake_case name used in config and ground truth.
    pub fn as_str(self) -> &'static str {
        match self {
            AnomalyKind::Spike => "spike",
            AnomalyKind::Dip => "dip",
            AnomalyKind::LevelShift => "level_shift",
            AnomalyKind::VarianceBurst => "variance_burst",
            AnomalyKind::Stuck => "stuck",
            AnomalyKind::Dropout => "dropout",
            AnomalyKind::CorrelationBreak => "correlation_break",
            AnomalyKind::PeerDrift => "peer_drift",
        }
    }

    /// Whether this kind is defined against the device's hidden load (needs `load.enabled`).
    pub fn needs_load(self) -> bool {
        matches!(self, AnomalyKind::CorrelationBreak | AnomalyKind::PeerDrift)
    }
}

/// One injected anomaly: which series, what, and the inclusive range of reading timestamps it
/// affected (for a dropout, the timestamps whose readings are missing).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct GroundTruth {
    /// Device id.
    pub device: String,
    /// Metric name.
    pub metric: String,
    /// What was injected.
    pub kind: AnomalyKind,
    /// Timestamp of the first affected reading (Unix ms).
    pub start_ms: i64,
    /// Timestamp of the last affected reading (Unix ms), inclusive; equals `start_ms` for spikes and dips.
    pub end_ms: i64,
}

/// An anomaly in progress on one series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Active {
    pub(crate) kind: AnomalyKind,
    pub(crate) start_ms: i64,
    /// Inclusive; the last step this anomaly affects.
    pub(crate) end_ms: i64,
    /// Offset in the metric's unit (spike, dip, level shift, the final offset of a peer drift),
    /// noise factor (burst), the frozen value (stuck), or the load the metric ends up following
    /// (correlation break); unused for dropouts.
    pub(crate) param: f64,
    /// Correlation break: length of the ramps into and out of the break; peer drift: length of the
    /// return to normal at its end; unused otherwise.
    pub(crate) ramp_ms: i64,
}

impl Active {
    /// The reading to emit instead of the normal one, given the clean signal and this step's noise
    /// (one standard normal draw times the metric's noise std); `None` means no reading.
    ///
    /// Spikes, dips and level shifts replace the noise by their offset for spikes and dips, so the
    /// deviation from the clean signal is exactly the drawn number of sigmas, never eaten by noise.
    ///
    /// For a correlation break `clean` is already the broken signal (the fleet computes it from the
    /// load, see [`Active::break_load`]); a peer drift adds its offset at `ts_ms`.
    pub(crate) fn apply(&self, clean: f64, noise: f64, ts_ms: i64) -> Option<f64> {
        match self.kind {
            AnomalyKind::CorrelationBreak => Some(clean + noise),
            AnomalyKind::PeerDrift => Some(clean + noise + self.param * self.drift_weight(ts_ms)),
            AnomalyKind::Spike | AnomalyKind::Dip => Some(clean + self.param),
            AnomalyKind::LevelShift => Some(clean + noise + self.param),
            AnomalyKind::VarianceBurst => Some(clean + noise * self.param),
            AnomalyKind::Stuck => Some(self.param),
            AnomalyKind::Dropout => None,
        }
    }
}

impl Active {
    /// Peer drift: the share of its full offset at `ts_ms`: rising linearly from 0 at `start_ms` to 1
    /// at `end_ms - ramp_ms`, then back to 0 at `end_ms` (a smooth return inside the label).
    fn drift_weight(&self, ts_ms: i64) -> f64 {
        let top = self.end_ms - self.ramp_ms;
        let w = if ts_ms <= top {
            if top <= self.start_ms {
                1.0
            } else {
                (ts_ms - self.start_ms) as f64 / (top - self.start_ms) as f64
            }
        } else {
            (self.end_ms - ts_ms) as f64 / self.ramp_ms as f64
        };
        w.clamp(0.0, 1.0)
    }

    /// Correlation break: the load the broken metric follows at `ts_ms`, given the load it would
    /// follow (`current`): `param` (the frozen target), reached and left through linear ramps of
    /// `ramp_ms` at both ends, so the metric is continuous where the break starts and ends.
    pub(crate) fn break_load(&self, ts_ms: i64, current: f64) -> f64 {
        let w = if self.ramp_ms <= 0 {
            1.0
        } else {
            let r = self.ramp_ms as f64;
            ((ts_ms - self.start_ms) as f64 / r)
                .min((self.end_ms - ts_ms) as f64 / r)
                .clamp(0.0, 1.0)
        };
        current + (self.param - current) * w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_serialise_as_snake_case_names() {
        for k in AnomalyKind::ALL {
            assert_eq!(
                serde_json::to_string(&k).unwrap(),
                format!("\"{}\"", k.as_str())
            );
        }
        let g = GroundTruth {
            device: "dev-0001".into(),
            metric: "temperature".into(),
            kind: AnomalyKind::LevelShift,
            start_ms: 1,
            end_ms: 2,
        };
        let line = serde_json::to_string(&g).unwrap();
        assert!(line.contains("\"kind\":\"level_shift\""), "{line}");
        assert_eq!(serde_json::from_str::<GroundTruth>(&line).unwrap(), g);
        for (k, name) in [
            (AnomalyKind::CorrelationBreak, "\"correlation_break\""),
            (AnomalyKind::PeerDrift, "\"peer_drift\""),
        ] {
            assert_eq!(serde_json::to_string(&k).unwrap(), name);
            assert_eq!(serde_json::from_str::<AnomalyKind>(name).unwrap(), k);
        }
    }

    fn active(kind: AnomalyKind, param: f64, ramp_ms: i64) -> Active {
        Active {
            kind,
            start_ms: 10_000,
            end_ms: 20_000,
            param,
            ramp_ms,
        }
    }

    #[test]
    fn a_peer_drift_grows_linearly_to_its_size_and_returns_smoothly() {
        let a = active(AnomalyKind::PeerDrift, 6.0, 2_000);
        assert_eq!(a.apply(1.0, 0.5, 10_000), Some(1.5));
        assert_eq!(a.apply(1.0, 0.5, 14_000), Some(4.5));
        assert_eq!(a.apply(1.0, 0.5, 18_000), Some(7.5));
        assert_eq!(a.apply(1.0, 0.5, 19_000), Some(4.5));
        assert_eq!(a.apply(1.0, 0.5, 20_000), Some(1.5));
        let no_return = Active { ramp_ms: 0, ..a };
        assert_eq!(no_return.apply(1.0, 0.0, 20_000), Some(7.0));
        let one_step = Active {
            end_ms: 10_000,
            ramp_ms: 0,
            ..a
        };
        assert_eq!(one_step.apply(1.0, 0.0, 10_000), Some(7.0));
    }

    #[test]
    fn a_correlation_break_ramps_to_its_target_and_back_to_the_load() {
        let a = active(AnomalyKind::CorrelationBreak, 0.4, 4_000);
        assert_eq!(a.break_load(10_000, 0.8), 0.8);
        assert!((a.break_load(12_000, 0.8) - 0.6).abs() < 1e-12);
        assert_eq!(a.break_load(14_000, 0.8), 0.4);
        assert_eq!(a.break_load(15_000, 0.9), 0.4);
        assert!((a.break_load(18_000, 0.6) - 0.5).abs() < 1e-12);
        assert_eq!(a.break_load(20_000, 0.7), 0.7);
        let step = Active { ramp_ms: 0, ..a };
        assert_eq!(step.break_load(10_000, 0.8), 0.4);
        assert_eq!(a.apply(3.0, 0.25, 12_000), Some(3.25));
    }
}
