//! Rolling z-score: how many standard deviations a reading lies from the mean of the last `window` readings.
//!
//! The window's sum and sum of squared deviations are kept with Welford's sliding update (add the new
//! value, remove the oldest), so each reading costs O(1) and the variance stays numerically stable.

use super::Detector;
use crate::ModelError;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Parameters of [`ZScore`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZScoreConfig {
    /// Readings in the rolling window (≥ 2).
    #[serde(default = "default_window")]
    pub window: usize,
    /// Readings needed before any score above 0 (≥ 2, ≤ window).
    #[serde(default = "default_warmup")]
    pub warmup: usize,
    /// |z| that maps to a score of 1; the score grows linearly from 0 at |z| = 0.
    #[serde(default = "default_z_max")]
    pub z_max: f64,
}

fn default_window() -> usize {
    300
}
fn default_warmup() -> usize {
    30
}
fn default_z_max() -> f64 {
    8.0
}

impl Default for ZScoreConfig {
    fn default() -> Self {
        Self {
            window: default_window(),
            warmup: default_warmup(),
            z_max: default_z_max(),
        }
    }
}

/// Rolling mean/variance z-score detector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZScore {
    cfg: ZScoreConfig,
    values: VecDeque<f64>,
    mean: f64,
    m2: f64,
}

impl ZScore {
    /// Builds a detector, rejecting a window < 2, a warmup outside [2, window] or a non-positive `z_max`.
    pub fn new(cfg: ZScoreConfig) -> Result<Self, ModelError> {
        if cfg.window < 2 {
            return Err(ModelError::invalid(
                "window",
                format!("must be >= 2, got {}", cfg.window),
            ));
        }
        if cfg.warmup < 2 || cfg.warmup > cfg.window {
            return Err(ModelError::invalid(
                "warmup",
                format!("must be in [2, window={}], got {}", cfg.window, cfg.warmup),
            ));
        }
        if !(cfg.z_max.is_finite() && cfg.z_max > 0.0) {
            return Err(ModelError::invalid(
                "z_max",
                format!("must be a finite number > 0, got {}", cfg.z_max),
            ));
        }
        Ok(Self {
            values: VecDeque::with_capacity(cfg.window),
            cfg,
            mean: 0.0,
            m2: 0.0,
        })
    }

    /// Heap bytes owned (the window).
    pub(crate) fn heap_bytes(&self) -> usize {
        self.values.capacity() * std::mem::size_of::<f64>()
    }
}

impl Detector for ZScore {
    #[inline]
    fn update(&mut self, _ts_ms: i64, value: f64) -> f64 {
        if !value.is_finite() {
            return 0.0;
        }
        let n = self.values.len();
        let score = if n >= self.cfg.warmup {
            let var = self.m2 / n as f64;
            // A perfectly flat history has no spread: scale by a tiny floor relative to the level.
            let sd = var.sqrt().max(1e-9 * (1.0 + self.mean.abs()));
            let z = (value - self.mean).abs() / sd;
            (z / self.cfg.z_max).min(1.0)
        } else {
            0.0
        };
        if n == self.cfg.window {
            if let Some(old) = self.values.pop_front() {
                let n1 = (n - 1) as f64;
                let old_mean = self.mean;
                self.mean -= (old - self.mean) / n1;
                self.m2 -= (old - old_mean) * (old - self.mean);
            }
        }
        let n_now = self.values.len() as f64 + 1.0;
        let delta = value - self.mean;
        self.mean += delta / n_now;
        self.m2 = (self.m2 + delta * (value - self.mean)).max(0.0);
        self.values.push_back(value);
        if !(self.mean.is_finite() && self.m2.is_finite()) {
            // Only reachable with values near f64::MAX: start afresh rather than carry NaN forever
            // (which would also make the checkpoint unreadable, as JSON has no NaN).
            self.values.clear();
            self.mean = 0.0;
            self.m2 = 0.0;
        }
        score
    }

    fn name(&self) -> &'static str {
        "zscore"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spike_after_noise_scores_high_and_normal_values_low() {
        let mut d = ZScore::new(ZScoreConfig::default()).unwrap();
        let mut max_normal: f64 = 0.0;
        for i in 0..500 {
            let v = 10.0 + if i % 2 == 0 { 1.0 } else { -1.0 };
            max_normal = max_normal.max(d.update(i, v));
        }
        assert!(max_normal < 0.2, "normal readings scored {max_normal}");
        assert_eq!(d.update(500, 30.0), 1.0);
    }

    #[test]
    fn sliding_variance_matches_recomputation() {
        let mut d = ZScore::new(ZScoreConfig {
            window: 10,
            warmup: 2,
            z_max: 8.0,
        })
        .unwrap();
        for i in 0..1000 {
            d.update(i, ((i * 7919) % 101) as f64 + 1e6);
        }
        let n = d.values.len() as f64;
        let mean = d.values.iter().sum::<f64>() / n;
        let m2: f64 = d.values.iter().map(|v| (v - mean).powi(2)).sum();
        assert!((d.mean - mean).abs() < 1e-6);
        assert!((d.m2 - m2).abs() < 1e-3 * m2.max(1.0), "{} vs {m2}", d.m2);
    }

    #[test]
    fn non_finite_values_score_zero_and_leave_state_alone() {
        let mut d = ZScore::new(ZScoreConfig::default()).unwrap();
        for i in 0..100 {
            d.update(i, 1.0 + (i % 3) as f64);
        }
        let before = d.clone();
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_eq!(d.update(0, v), 0.0);
        }
        assert_eq!(d, before);
    }

    #[test]
    fn bad_parameters_name_the_value() {
        let e = ZScore::new(ZScoreConfig {
            window: 1,
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "window: must be >= 2, got 1");
        assert!(ZScore::new(ZScoreConfig {
            z_max: f64::NAN,
            ..Default::default()
        })
        .is_err());
    }
}
