//! Anomaly kinds, ground-truth labels, and the per-series anomaly in progress.
//!
//! Owns what an anomaly does to one reading (`Active::apply`) and the label it produces. It does
//! not decide when anomalies happen: the fleet schedules them from its seeded generator.

use serde::{Deserialize, Serialize};

/// What was injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
}

impl AnomalyKind {
    /// Every kind, in declaration order.
    pub const ALL: [AnomalyKind; 6] = [
        AnomalyKind::Spike,
        AnomalyKind::Dip,
        AnomalyKind::LevelShift,
        AnomalyKind::VarianceBurst,
        AnomalyKind::Stuck,
        AnomalyKind::Dropout,
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
        }
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
    /// Offset in the metric's unit (spike, dip, level shift), noise factor (burst), or the frozen
    /// value (stuck); unused for dropouts.
    pub(crate) param: f64,
}

impl Active {
    /// The reading to emit instead of the normal one, given the clean signal and this step's noise
    /// (one standard normal draw times the metric's noise std); `None` means no reading.
    ///
    /// Spikes, dips and level shifts replace the noise by their offset for spikes and dips, so the
    /// deviation from the clean signal is exactly the drawn number of sigmas, never eaten by noise.
    pub(crate) fn apply(&self, clean: f64, noise: f64) -> Option<f64> {
        match self.kind {
            AnomalyKind::Spike | AnomalyKind::Dip => Some(clean + self.param),
            AnomalyKind::LevelShift => Some(clean + noise + self.param),
            AnomalyKind::VarianceBurst => Some(clean + noise * self.param),
            AnomalyKind::Stuck => Some(self.param),
            AnomalyKind::Dropout => None,
        }
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
    }
}
