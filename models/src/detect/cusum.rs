//! Two-sided CUSUM change detector for level shifts.
//!
//! Readings are standardised against a slow EWMA baseline (`ewma.rs`); the upper and lower cumulative
//! sums of `z − k` grow while the level sits above (below) the baseline and the score is `s / (s + h)`
//! for the larger sum `s`, so 0.5 is an alarm and a larger overshoot scores higher. Each reading's contribution is clipped at `clip_z`, so one spike alone cannot reach
//! `h`: this detector answers "has the level moved?", not "is this reading odd?". On reaching `h` the
//! sums restart and the baseline jumps to the new level, so one shift raises one alarm.

use super::ewma::EwmaState;
use super::{unit, Detector, EwmaConfig};
use crate::ModelError;
use serde::{Deserialize, Serialize};

/// Parameters of [`Cusum`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CusumConfig {
    /// Weight of the newest reading in the baseline mean and variance, in (0, 1].
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Readings needed before the sums start (≥ 2).
    #[serde(default = "default_warmup")]
    pub warmup: usize,
    /// Slack per reading in standard deviations (≥ 0): about half the smallest shift worth detecting.
    #[serde(default = "default_k")]
    pub k: f64,
    /// Decision interval in standard deviations (> 0): a sum of `h` scores 0.5 and raises an alarm.
    #[serde(default = "default_h")]
    pub h: f64,
    /// Largest |z| one reading may add to a sum (> 0).
    #[serde(default = "default_clip_z")]
    pub clip_z: f64,
}

fn default_alpha() -> f64 {
    0.01
}
fn default_warmup() -> usize {
    30
}
fn default_k() -> f64 {
    0.5
}
fn default_h() -> f64 {
    10.0
}
fn default_clip_z() -> f64 {
    6.0
}

impl Default for CusumConfig {
    fn default() -> Self {
        Self {
            alpha: default_alpha(),
            warmup: default_warmup(),
            k: default_k(),
            h: default_h(),
            clip_z: default_clip_z(),
        }
    }
}

/// Two-sided CUSUM over an EWMA baseline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cusum {
    p: CusumParams,
    s: CusumState,
}

/// Validated parameters of a CUSUM, kept apart from its state (the ensemble keeps them once).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct CusumParams {
    k: f64,
    h: f64,
    clip_z: f64,
    baseline: EwmaConfig,
}

/// What a CUSUM learns: its baseline and the two sums.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct CusumState {
    baseline: EwmaState,
    hi: f64,
    lo: f64,
}

impl CusumParams {
    /// Rejects alpha outside (0, 1], a warmup < 2, a negative `k` and a non-positive `h` or `clip_z`.
    pub(crate) fn new(cfg: CusumConfig) -> Result<Self, ModelError> {
        if !(cfg.k.is_finite() && cfg.k >= 0.0) {
            return Err(ModelError::invalid(
                "k",
                format!("must be a finite number >= 0, got {}", cfg.k),
            ));
        }
        for (name, v) in [("h", cfg.h), ("clip_z", cfg.clip_z)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(ModelError::invalid(
                    name,
                    format!("must be a finite number > 0, got {v}"),
                ));
            }
        }
        let baseline = EwmaConfig {
            alpha: cfg.alpha,
            alpha_var: None,
            warmup: cfg.warmup,
            clip_z: 4.0,
        };
        baseline.check()?;
        Ok(Self {
            k: cfg.k,
            h: cfg.h,
            clip_z: cfg.clip_z,
            baseline,
        })
    }
}

impl CusumState {
    /// Feeds one reading and returns the larger sum over `h` (≥ 0; ≥ 1 is an alarm, after which the
    /// sums restart). `None` during warm-up or for a non-finite value (which is ignored).
    #[inline]
    pub(crate) fn ratio_update(&mut self, p: &CusumParams, value: f64) -> Option<f64> {
        let z = self.baseline.z_update(&p.baseline, value)?;
        let z = z.clamp(-p.clip_z, p.clip_z);
        self.hi = (self.hi + z - p.k).max(0.0);
        self.lo = (self.lo - z - p.k).max(0.0);
        let s = self.hi.max(self.lo);
        if s >= p.h {
            self.hi = 0.0;
            self.lo = 0.0;
            self.baseline.rebase(&p.baseline, value);
        }
        Some(s / p.h)
    }
}

impl Cusum {
    /// Builds a detector, rejecting alpha outside (0, 1], a warmup < 2, a negative `k` and a
    /// non-positive `h` or `clip_z`.
    pub fn new(cfg: CusumConfig) -> Result<Self, ModelError> {
        Ok(Self {
            p: CusumParams::new(cfg)?,
            s: CusumState::default(),
        })
    }

    /// Feeds one reading and returns the larger sum over `h` (see [`CusumState::ratio_update`]).
    #[inline]
    pub(crate) fn ratio_update(&mut self, value: f64) -> Option<f64> {
        self.s.ratio_update(&self.p, value)
    }

    /// Heap bytes owned (none).
    pub(crate) fn heap_bytes(&self) -> usize {
        0
    }
}

impl Detector for Cusum {
    #[inline]
    fn update(&mut self, _ts_ms: i64, value: f64) -> f64 {
        match self.ratio_update(value) {
            Some(r) => unit(r / (r + 1.0)),
            None => 0.0,
        }
    }

    fn name(&self) -> &'static str {
        "cusum"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic noise in [-1, 1] with σ ≈ 0.58.
    fn noise(i: i64) -> f64 {
        ((i.wrapping_mul(2_654_435_761) % 1000) as f64 / 500.0) - 1.0
    }

    #[test]
    fn level_shift_of_two_sigma_is_detected_within_a_dozen_readings_and_once() {
        let mut d = Cusum::new(CusumConfig::default()).unwrap();
        let mut max_before: f64 = 0.0;
        for i in 0..2000 {
            let s = d.update(i, 10.0 + noise(i));
            if i > 100 {
                max_before = max_before.max(s);
            }
        }
        assert!(
            max_before < 0.5,
            "false alarm before the shift: {max_before}"
        );
        let alarms: Vec<i64> = (2000..3000)
            .filter(|&i| d.update(i, 11.2 + noise(i)) >= 0.5)
            .collect();
        assert!(!alarms.is_empty(), "shift missed");
        assert!(alarms[0] < 2012, "late: {alarms:?}");
        assert_eq!(alarms.len(), 1, "{alarms:?}");
    }

    #[test]
    fn a_single_spike_does_not_reach_the_decision_interval() {
        let mut d = Cusum::new(CusumConfig::default()).unwrap();
        for i in 0..500 {
            d.update(i, 10.0 + noise(i));
        }
        assert!(d.update(500, 1e6) < 0.5);
    }

    #[test]
    fn bad_parameters_name_the_value() {
        let e = Cusum::new(CusumConfig {
            h: -1.0,
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "h: must be a finite number > 0, got -1");
    }
}
