//! Stuck-sensor detector: a run of identical readings that is improbable for this series.
//!
//! The series' own rate of "same as the previous reading" is learnt with a slow EWMA (floored at
//! `min_repeat_rate`, so a continuous-valued sensor that never repeats is not infinitely surprised);
//! a run of `r` repeats then has surprise `L = r · −log10(rate)`, scored as `L / (L + 5)` like the
//! likelihood stage (0.5 ⇔ p = 1e-5). Quantised series that repeat often need proportionally longer
//! runs. A run at the lowest or highest value the series has ever had is not counted: resting at a
//! floor or ceiling (zero traffic, 100 % load, a saturated sensor) is normal, a freeze mid-range is
//! not. A run is reported until its surprise first reaches [`REPORTED_L`], then scores 0 until it
//! ends: one stuck period raises one alarm, not one per reading. It knows nothing about the values themselves: a sensor stuck at a plausible value is exactly
//! what the value-based detectors miss.

use super::likelihood::surprise_score;
use super::Detector;
use crate::ModelError;
use serde::{Deserialize, Serialize};

/// Surprise (−log10 p = 10) at which a run counts as reported.
pub const REPORTED_L: f64 = 10.0;

/// Parameters of [`Stuck`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StuckConfig {
    /// Weight of the newest reading in the learnt repeat rate, in (0, 1].
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Floor on the repeat rate, in (0, 1).
    #[serde(default = "default_min_repeat_rate")]
    pub min_repeat_rate: f64,
    /// Readings before any score above 0 (≥ 1).
    #[serde(default = "default_warmup")]
    pub warmup: usize,
}

fn default_alpha() -> f64 {
    0.0005
}
fn default_min_repeat_rate() -> f64 {
    0.05
}
fn default_warmup() -> usize {
    100
}

impl Default for StuckConfig {
    fn default() -> Self {
        Self {
            alpha: default_alpha(),
            min_repeat_rate: default_min_repeat_rate(),
            warmup: default_warmup(),
        }
    }
}

/// Run-of-repeats detector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stuck {
    cfg: StuckConfig,
    s: StuckState,
}

/// What a run-of-repeats detector learns (its parameters live apart).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct StuckState {
    /// Finite readings seen.
    n: u64,
    /// Previous finite reading (meaningful once `n > 0`). State holds no NaN or infinity, so it
    /// survives JSON.
    last: f64,
    min: f64,
    max: f64,
    rate: f64,
    run: u32,
    reported: bool,
}

impl Default for StuckState {
    fn default() -> Self {
        Self {
            n: 0,
            last: 0.0,
            min: f64::MAX,
            max: f64::MIN,
            rate: 0.0,
            run: 0,
            reported: false,
        }
    }
}

impl StuckConfig {
    /// Rejects alpha outside (0, 1], a floor outside (0, 1) and a zero warmup.
    pub(crate) fn check(&self) -> Result<(), ModelError> {
        if !(self.alpha > 0.0 && self.alpha <= 1.0) {
            return Err(ModelError::invalid(
                "alpha",
                format!("must be in (0, 1], got {}", self.alpha),
            ));
        }
        if !(self.min_repeat_rate > 0.0 && self.min_repeat_rate < 1.0) {
            return Err(ModelError::invalid(
                "min_repeat_rate",
                format!("must be in (0, 1), got {}", self.min_repeat_rate),
            ));
        }
        if self.warmup == 0 {
            return Err(ModelError::invalid("warmup", "must be >= 1, got 0"));
        }
        Ok(())
    }
}

impl StuckState {
    /// Surprise `−log10 p` of the current run of repeats, then learns from the reading; 0 for a
    /// non-finite value (which is ignored) and during warm-up.
    #[inline]
    pub(crate) fn surprise(&mut self, cfg: &StuckConfig, value: f64) -> f64 {
        if !value.is_finite() {
            return 0.0;
        }
        let repeat = self.n > 0 && self.last == value;
        self.run = if repeat {
            self.run.saturating_add(1)
        } else {
            0
        };
        self.reported &= repeat;
        self.last = value;
        self.n += 1;
        let at_bound = value <= self.min || value >= self.max;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        let l = if self.n > cfg.warmup as u64 && !self.reported && !at_bound {
            f64::from(self.run) * -self.rate.max(cfg.min_repeat_rate).log10()
        } else {
            0.0
        };
        self.reported |= l >= REPORTED_L;
        let alpha = cfg.alpha.max(1.0 / self.n as f64);
        self.rate += alpha * (f64::from(u8::from(repeat)) - self.rate);
        l
    }
}

impl Stuck {
    /// Builds a detector, rejecting alpha outside (0, 1], a floor outside (0, 1) and a zero warmup.
    pub fn new(cfg: StuckConfig) -> Result<Self, ModelError> {
        cfg.check()?;
        Ok(Self {
            cfg,
            s: StuckState::default(),
        })
    }

    /// Surprise `−log10 p` of the current run of repeats (see [`StuckState::surprise`]).
    #[inline]
    pub(crate) fn surprise(&mut self, value: f64) -> f64 {
        self.s.surprise(&self.cfg, value)
    }

    /// Heap bytes owned (none).
    pub(crate) fn heap_bytes(&self) -> usize {
        0
    }
}

impl Detector for Stuck {
    #[inline]
    fn update(&mut self, _ts_ms: i64, value: f64) -> f64 {
        surprise_score(self.surprise(value))
    }

    fn name(&self) -> &'static str {
        "stuck"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_continuous_sensor_stuck_for_a_few_readings_scores_high() {
        let mut d = Stuck::new(StuckConfig::default()).unwrap();
        for i in 0..1000 {
            assert_eq!(d.update(i, (i as f64 * 0.37).sin()), 0.0);
        }
        let scores: Vec<f64> = (1000..1010).map(|i| d.update(i, 0.5)).collect();
        // 1 repeat: L = 1.3; 4 repeats: L = 5.2 ≥ 5.
        assert!(scores[2] < 0.5 && scores[4] >= 0.5, "{scores:?}");
        // Reported once L reached 10 (8 repeats): the rest of the run is quiet until it ends.
        assert_eq!(scores[9], 0.0, "{scores:?}");
        d.update(1010, 0.7);
        assert!(d.update(1011, 0.7) > 0.0);
    }

    #[test]
    fn a_quantised_series_needs_a_proportionally_longer_run() {
        let mut d = Stuck::new(StuckConfig::default()).unwrap();
        // Repeats every other reading: rate ≈ 0.5, so 17 repeats are needed for L ≥ 5.
        for i in 0..20_000 {
            d.update(i, (i / 2) as f64 % 10.0);
        }
        let scores: Vec<f64> = (0..20).map(|i| d.update(20_000 + i, 3.0)).collect();
        assert!(scores[10] < 0.5 && scores[19] >= 0.5, "{scores:?}");
    }

    #[test]
    fn resting_at_the_floor_is_not_a_stuck_sensor() {
        let mut d = Stuck::new(StuckConfig::default()).unwrap();
        for i in 0..1000 {
            d.update(i, 1.0 + (i as f64 * 0.37).sin());
        }
        // Idle at zero, below anything seen so far, then at the new floor again later.
        assert!((1000..1100).all(|i| d.update(i, 0.0) == 0.0));
        d.update(1100, 1.5);
        assert!((1101..1200).all(|i| d.update(i, 0.0) == 0.0));
    }

    #[test]
    fn bad_parameters_name_the_value() {
        let e = Stuck::new(StuckConfig {
            min_repeat_rate: 1.0,
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "min_repeat_rate: must be in (0, 1), got 1");
    }
}
