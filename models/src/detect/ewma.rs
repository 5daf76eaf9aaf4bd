//! EWMA control chart: distance of a reading from an exponentially weighted mean, in units of an
//! exponentially weighted standard deviation, scored by its two-sided Gaussian tail on the shared
//! surprise scale (0.5 ⇔ p = 1e-5 ⇔ |z| ≈ 4.42; never saturating, so the largest stay ordered).
//!
//! O(1) time and a few words of state. The deviation fed back into the variance is winsorised at
//! `clip_z` standard deviations, so a lone spike cannot inflate the spread and mask the next one,
//! while a lasting level shift still widens the band within a few readings and is then followed.
//! It does not model seasonality (see `seasonal.rs`) nor accumulate small shifts (see `cusum.rs`).

use super::likelihood::two_sided_score;
use super::Detector;
use crate::ModelError;
use serde::{Deserialize, Serialize};

/// Parameters of [`Ewma`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EwmaConfig {
    /// Weight of the newest reading in the mean and variance, in (0, 1].
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Weight of the newest reading in the variance, in (0, 1]; `alpha` when absent. A smaller value
    /// than `alpha` remembers the usual spread longer than the usual level.
    #[serde(default)]
    pub alpha_var: Option<f64>,
    /// Readings needed before any score above 0 (≥ 2).
    #[serde(default = "default_warmup")]
    pub warmup: usize,
    /// Deviations are clipped to ±`clip_z` standard deviations before updating mean and variance (> 0).
    #[serde(default = "default_clip_z")]
    pub clip_z: f64,
}

fn default_alpha() -> f64 {
    0.02
}
fn default_warmup() -> usize {
    30
}
fn default_clip_z() -> f64 {
    4.0
}

impl Default for EwmaConfig {
    fn default() -> Self {
        Self {
            alpha: default_alpha(),
            alpha_var: None,
            warmup: default_warmup(),
            clip_z: default_clip_z(),
        }
    }
}

/// Exponentially weighted mean/variance control chart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ewma {
    cfg: EwmaConfig,
    s: EwmaState,
}

/// What an EWMA chart learns (its parameters live apart, so a detector that runs one chart per
/// series, like the ensemble, keeps them once for every series).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct EwmaState {
    n: u64,
    mean: f64,
    var: f64,
}

impl EwmaConfig {
    /// Rejects alphas outside (0, 1], a warmup < 2 and a non-positive `clip_z`.
    pub(crate) fn check(&self) -> Result<(), ModelError> {
        if !(self.alpha > 0.0 && self.alpha <= 1.0) {
            return Err(ModelError::invalid(
                "alpha",
                format!("must be in (0, 1], got {}", self.alpha),
            ));
        }
        if let Some(a) = self.alpha_var {
            if !(a > 0.0 && a <= 1.0) {
                return Err(ModelError::invalid(
                    "alpha_var",
                    format!("must be in (0, 1], got {a}"),
                ));
            }
        }
        if self.warmup < 2 {
            return Err(ModelError::invalid(
                "warmup",
                format!("must be >= 2, got {}", self.warmup),
            ));
        }
        if !(self.clip_z.is_finite() && self.clip_z > 0.0) {
            return Err(ModelError::invalid(
                "clip_z",
                format!("must be a finite number > 0, got {}", self.clip_z),
            ));
        }
        Ok(())
    }
}

impl EwmaState {
    /// Signed z of `value` against the current mean and spread, then learns from it.
    /// Returns `None` during warm-up or for a non-finite value (which is ignored).
    #[inline]
    pub(crate) fn z_update(&mut self, cfg: &EwmaConfig, value: f64) -> Option<f64> {
        if !value.is_finite() {
            return None;
        }
        let sd = self.var.sqrt().max(1e-9 * (1.0 + self.mean.abs()));
        let warm = self.n >= cfg.warmup as u64;
        let z = (value - self.mean) / sd;
        self.n += 1;
        // A cumulative average until 1/n drops below alpha, so early readings are not over-weighted.
        let alpha = cfg.alpha.max(1.0 / self.n as f64);
        let mut diff = value - self.mean;
        if warm {
            let c = cfg.clip_z * sd;
            diff = diff.clamp(-c, c);
        }
        let alpha_var = cfg.alpha_var.map_or(alpha, |a| a.max(1.0 / self.n as f64));
        self.mean += alpha * diff;
        self.var = (1.0 - alpha_var) * (self.var + alpha_var * diff * diff);
        if !(self.mean.is_finite() && self.var.is_finite()) {
            // Only reachable with values near f64::MAX; start afresh rather than score NaN forever.
            *self = Self::default();
            return None;
        }
        warm.then_some(z)
    }

    /// Restarts the mean at `level` (after a detected level shift), keeping the spread and learning
    /// the new level quickly, as if only `warmup` readings had been seen.
    pub(crate) fn rebase(&mut self, cfg: &EwmaConfig, level: f64) {
        if level.is_finite() {
            self.mean = level;
            self.n = self.n.min(cfg.warmup as u64);
        }
    }
}

impl Ewma {
    /// Builds a detector, rejecting alphas outside (0, 1], a warmup < 2 and a non-positive `clip_z`.
    pub fn new(cfg: EwmaConfig) -> Result<Self, ModelError> {
        cfg.check()?;
        Ok(Self {
            cfg,
            s: EwmaState::default(),
        })
    }

    /// Signed z of `value` against the current mean and spread, then learns from it.
    /// Returns `None` during warm-up or for a non-finite value (which is ignored).
    #[inline]
    pub(crate) fn z_update(&mut self, value: f64) -> Option<f64> {
        self.s.z_update(&self.cfg, value)
    }

    /// Heap bytes owned (none).
    pub(crate) fn heap_bytes(&self) -> usize {
        0
    }
}

impl Detector for Ewma {
    #[inline]
    fn update(&mut self, _ts_ms: i64, value: f64) -> f64 {
        match self.z_update(value) {
            Some(z) => two_sided_score(z),
            None => 0.0,
        }
    }

    fn name(&self) -> &'static str {
        "ewma"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alternating(i: i64) -> f64 {
        100.0 + if i % 2 == 0 { 2.0 } else { -2.0 }
    }

    #[test]
    fn spike_scores_one_and_steady_noise_scores_low() {
        let mut d = Ewma::new(EwmaConfig::default()).unwrap();
        let mut max_normal: f64 = 0.0;
        for i in 0..1000 {
            let s = d.update(i, alternating(i));
            if i > 100 {
                max_normal = max_normal.max(s);
            }
        }
        assert!(max_normal < 0.2, "normal readings scored {max_normal}");
        // 20 sigmas: far beyond the 0.5 of |z| = 4.42.
        assert!(d.update(1000, 140.0) > 0.9);
    }

    #[test]
    fn a_spike_does_not_mask_the_next_one() {
        let mut d = Ewma::new(EwmaConfig::default()).unwrap();
        for i in 0..500 {
            d.update(i, alternating(i));
        }
        assert!(d.update(500, 1e6) > 0.99);
        assert!(d.update(501, 140.0) > 0.9);
    }

    #[test]
    fn mean_converges_to_the_level_and_follows_a_shift() {
        let mut d = Ewma::new(EwmaConfig::default()).unwrap();
        for i in 0..1000 {
            d.update(i, alternating(i));
        }
        assert!((d.s.mean - 100.0).abs() < 0.2, "mean {}", d.s.mean);
        for i in 1000..3000 {
            d.update(i, alternating(i) + 50.0);
        }
        assert!((d.s.mean - 150.0).abs() < 0.2, "mean {}", d.s.mean);
        assert!(d.update(3000, 150.0) < 0.2);
    }

    #[test]
    fn bad_parameters_name_the_value() {
        let e = Ewma::new(EwmaConfig {
            alpha: 1.5,
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "alpha: must be in (0, 1], got 1.5");
        assert!(Ewma::new(EwmaConfig {
            clip_z: 0.0,
            ..Default::default()
        })
        .is_err());
    }
}
