//! Streaming anomaly detectors over one series: feed `(timestamp, value)`, get a score in [0, 1].
//!
//! Every detector is a plain state machine — O(1) or O(log w) per reading, bounded memory, `Clone` and
//! serde so its state can be checkpointed. [`DetectorConfig`] is the YAML face (`type:` tag);
//! [`AnyDetector`] is the built, validated detector the agent runs per series.

mod zscore;

pub use zscore::{ZScore, ZScoreConfig};

use crate::ModelError;
use serde::{Deserialize, Serialize};

/// A streaming detector over one series.
pub trait Detector {
    /// Feeds one reading and returns its anomaly score in [0, 1] (finite, whatever the input).
    fn update(&mut self, ts_ms: i64, value: f64) -> f64;

    /// Short name used in anomaly events (`zscore`, `ensemble`, ...).
    fn name(&self) -> &'static str;
}

/// Detector parameters as written in configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum DetectorConfig {
    /// Rolling mean/variance z-score.
    Zscore(ZScoreConfig),
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self::Zscore(ZScoreConfig::default())
    }
}

impl DetectorConfig {
    /// Names accepted by [`DetectorConfig::preset`].
    pub const PRESETS: &'static [&'static str] = &["zscore"];

    /// The default parameters of the detector called `name` (one of [`DetectorConfig::PRESETS`]).
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "zscore" => Some(Self::Zscore(ZScoreConfig::default())),
            _ => None,
        }
    }

    /// The score threshold at which this detector's output should be treated as an anomaly.
    pub fn recommended_threshold(&self) -> f64 {
        match self {
            Self::Zscore(c) => (5.0 / c.z_max).min(1.0),
        }
    }

    /// Validates the parameters and builds a fresh detector.
    pub fn build(&self) -> Result<AnyDetector, ModelError> {
        Ok(match self {
            Self::Zscore(c) => AnyDetector::Zscore(ZScore::new(c.clone())?),
        })
    }
}

/// A built detector of any kind; cheap to clone, serde for checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AnyDetector {
    /// See [`ZScore`].
    Zscore(ZScore),
}

impl Detector for AnyDetector {
    #[inline]
    fn update(&mut self, ts_ms: i64, value: f64) -> f64 {
        match self {
            Self::Zscore(d) => d.update(ts_ms, value),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Zscore(d) => d.name(),
        }
    }
}
