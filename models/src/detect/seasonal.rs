//! Seasonal baseline: additive level + per-time-of-day profile (Holt-Winters without trend), scoring
//! the residual in units of its exponentially weighted standard deviation by its two-sided Gaussian
//! tail, like `ewma.rs` (0.5 ⇔ |z| ≈ 4.42).
//!
//! The profile bucket comes from the reading's timestamp (`ts mod period_ms`), never from a reading
//! index, so irregular, missing or out-of-order readings land in the right slot. State is one float
//! and one counter per bucket. Residuals are winsorised at `clip_z` before they update the level,
//! the profile and the spread, so an anomaly is not learnt as "normal for 3 pm". A weekly profile is
//! `period_ms: 604800000` with e.g. 168 buckets; one profile per detector — stack two for both cycles.

use super::likelihood::two_sided_score;
use super::Detector;
use crate::ModelError;
use serde::{Deserialize, Serialize};

/// Longest accepted cycle (about 31 years), so bucket arithmetic stays in 64 bits.
const MAX_PERIOD_MS: i64 = 1_000_000_000_000;

/// Parameters of [`Seasonal`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeasonalConfig {
    /// Length of one cycle in milliseconds, in [1, 1e12] (a day by default).
    #[serde(default = "default_period_ms")]
    pub period_ms: i64,
    /// Profile buckets per cycle, in [1, 2016].
    #[serde(default = "default_buckets")]
    pub buckets: usize,
    /// Weight of the newest reading in the level, in (0, 1].
    #[serde(default = "default_alpha_level")]
    pub alpha_level: f64,
    /// Weight of the newest reading in its profile bucket, in (0, 1].
    #[serde(default = "default_alpha_season")]
    pub alpha_season: f64,
    /// Weight of the newest residual in the residual variance, in (0, 1].
    #[serde(default = "default_alpha_var")]
    pub alpha_var: f64,
    /// Readings needed before any score above 0 (≥ 2).
    #[serde(default = "default_warmup")]
    pub warmup: usize,
    /// Readings a bucket needs before readings in it are scored, in [1, 255].
    #[serde(default = "default_min_bucket_count")]
    pub min_bucket_count: u16,
    /// Residuals are clipped to ±`clip_z` standard deviations before they are learnt (> 0).
    #[serde(default = "default_clip_z")]
    pub clip_z: f64,
}

fn default_period_ms() -> i64 {
    86_400_000
}
fn default_buckets() -> usize {
    48
}
fn default_alpha_level() -> f64 {
    0.05
}
fn default_alpha_season() -> f64 {
    0.1
}
fn default_alpha_var() -> f64 {
    0.01
}
fn default_warmup() -> usize {
    30
}
fn default_min_bucket_count() -> u16 {
    2
}
fn default_clip_z() -> f64 {
    4.0
}

impl Default for SeasonalConfig {
    fn default() -> Self {
        Self {
            period_ms: default_period_ms(),
            buckets: default_buckets(),
            alpha_level: default_alpha_level(),
            alpha_season: default_alpha_season(),
            alpha_var: default_alpha_var(),
            warmup: default_warmup(),
            min_bucket_count: default_min_bucket_count(),
            clip_z: default_clip_z(),
        }
    }
}

/// Level + time-of-day profile detector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Seasonal {
    cfg: SeasonalConfig,
    s: SeasonalState,
}

/// What a seasonal baseline learns (its parameters live apart). The profile is kept in `f32`: it
/// holds offsets from the level (about the size of the cycle, not of the readings), where 24 bits
/// of mantissa are far below the residual spread that scores are made of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct SeasonalState {
    n: u64,
    level: f64,
    var: f64,
    profile: Box<[f32]>,
    /// Readings seen per bucket, saturating at 255 (`min_bucket_count` is at most 255).
    counts: Box<[u8]>,
}

impl SeasonalConfig {
    /// Rejects every parameter outside its documented range, naming it.
    pub(crate) fn check(&self) -> Result<(), ModelError> {
        if !(1..=MAX_PERIOD_MS).contains(&self.period_ms) {
            return Err(ModelError::invalid(
                "period_ms",
                format!("must be in [1, {MAX_PERIOD_MS}], got {}", self.period_ms),
            ));
        }
        if !(1..=2016).contains(&self.buckets) {
            return Err(ModelError::invalid(
                "buckets",
                format!("must be in [1, 2016], got {}", self.buckets),
            ));
        }
        for (name, v) in [
            ("alpha_level", self.alpha_level),
            ("alpha_season", self.alpha_season),
            ("alpha_var", self.alpha_var),
        ] {
            if !(v > 0.0 && v <= 1.0) {
                return Err(ModelError::invalid(
                    name,
                    format!("must be in (0, 1], got {v}"),
                ));
            }
        }
        if self.warmup < 2 {
            return Err(ModelError::invalid(
                "warmup",
                format!("must be >= 2, got {}", self.warmup),
            ));
        }
        if !(1..=255).contains(&self.min_bucket_count) {
            return Err(ModelError::invalid(
                "min_bucket_count",
                format!("must be in [1, 255], got {}", self.min_bucket_count),
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

    #[inline]
    fn bucket(&self, ts_ms: i64) -> usize {
        let phase = ts_ms.rem_euclid(self.period_ms) as u64;
        let b = phase * self.buckets as u64 / self.period_ms as u64;
        (b as usize).min(self.buckets - 1)
    }
}

impl SeasonalState {
    /// A fresh state for `cfg` (checked).
    pub(crate) fn new(cfg: &SeasonalConfig) -> Self {
        Self {
            n: 0,
            level: 0.0,
            var: 0.0,
            profile: vec![0.0; cfg.buckets].into_boxed_slice(),
            counts: vec![0; cfg.buckets].into_boxed_slice(),
        }
    }

    /// Signed z of the residual of `value` against level + profile, then learns from it. `None`
    /// during warm-up, in a bucket seen fewer than `min_bucket_count` times, or for a non-finite
    /// value (which is ignored).
    #[inline]
    pub(crate) fn z_update(&mut self, cfg: &SeasonalConfig, ts_ms: i64, value: f64) -> Option<f64> {
        if !value.is_finite() {
            return None;
        }
        let b = cfg.bucket(ts_ms);
        if self.n == 0 {
            self.level = value;
        }
        let profile = f64::from(self.profile[b]);
        let resid = value - self.level - profile;
        let sd = self.var.sqrt().max(1e-9 * (1.0 + self.level.abs()));
        let warm = self.n >= cfg.warmup as u64;
        let z = (warm && u16::from(self.counts[b]) >= cfg.min_bucket_count).then_some(resid / sd);
        self.n += 1;
        let r = if warm {
            resid.clamp(-cfg.clip_z * sd, cfg.clip_z * sd)
        } else {
            resid
        };
        let al = cfg.alpha_level.max(1.0 / self.n as f64);
        let av = cfg.alpha_var.max(1.0 / self.n as f64);
        let c = self.counts[b].saturating_add(1);
        self.counts[b] = c;
        // The count saturates at 255: below alpha_season = 1/255 the bucket's weight stops falling there.
        let asn = cfg.alpha_season.max(1.0 / f64::from(c));
        self.level += al * r;
        // Beyond f32's range the offset is clamped (and then finite): only reachable with readings
        // whose cycle alone exceeds 3e38.
        let p = (profile + asn * (1.0 - al) * r).clamp(f64::from(f32::MIN), f64::from(f32::MAX));
        self.profile[b] = p as f32;
        self.var = (1.0 - av) * self.var + av * r * r;
        if !(self.level.is_finite() && self.var.is_finite() && p.is_finite()) {
            // Only reachable with values near f64::MAX; start afresh rather than score NaN forever.
            self.n = 0;
            self.level = 0.0;
            self.var = 0.0;
            self.profile.iter_mut().for_each(|p| *p = 0.0);
            self.counts.iter_mut().for_each(|c| *c = 0);
            return None;
        }
        z
    }

    /// Heap bytes owned (the profile and its counters).
    pub(crate) fn heap_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.profile) + std::mem::size_of_val(&*self.counts)
    }
}

impl Seasonal {
    /// Builds a detector, rejecting parameters outside their ranges.
    pub fn new(cfg: SeasonalConfig) -> Result<Self, ModelError> {
        cfg.check()?;
        Ok(Self {
            s: SeasonalState::new(&cfg),
            cfg,
        })
    }

    #[cfg(test)]
    fn bucket(&self, ts_ms: i64) -> usize {
        self.cfg.bucket(ts_ms)
    }

    /// Signed z of the residual (see [`SeasonalState::z_update`]).
    #[inline]
    pub(crate) fn z_update(&mut self, ts_ms: i64, value: f64) -> Option<f64> {
        self.s.z_update(&self.cfg, ts_ms, value)
    }

    /// Heap bytes owned (the profile and its counters).
    pub(crate) fn heap_bytes(&self) -> usize {
        self.s.heap_bytes()
    }
}

impl Detector for Seasonal {
    #[inline]
    fn update(&mut self, ts_ms: i64, value: f64) -> f64 {
        match self.z_update(ts_ms, value) {
            Some(z) => two_sided_score(z),
            None => 0.0,
        }
    }

    fn name(&self) -> &'static str {
        "seasonal"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;

    /// A square daily cycle: 100 from 08:00 to 20:00, 0 otherwise, plus small deterministic noise.
    fn daily(ts: i64) -> f64 {
        let h = (ts / HOUR) % 24;
        let noise = ((ts / 300_000) % 7) as f64 * 0.3 - 0.9;
        if (8..20).contains(&h) {
            100.0 + noise
        } else {
            noise
        }
    }

    #[test]
    fn learnt_daily_cycle_is_not_anomalous_but_a_night_time_day_value_is() {
        let mut d = Seasonal::new(SeasonalConfig::default()).unwrap();
        let step = 300_000; // 5-minute readings, like most NAB series.
        let mut max_day5: f64 = 0.0;
        for i in 0..(6 * 24 * 12) {
            let ts = i * step;
            let s = d.update(ts, daily(ts));
            if ts >= 5 * 24 * HOUR {
                max_day5 = max_day5.max(s);
            }
        }
        assert!(max_day5 < 0.5, "learnt cycle scored {max_day5}");
        // 02:00 on day 7 with the daytime value.
        assert!(d.update(6 * 24 * HOUR + 2 * HOUR, 100.0) > 0.9);
    }

    #[test]
    fn bucket_comes_from_the_timestamp_even_out_of_order() {
        let d = Seasonal::new(SeasonalConfig::default()).unwrap();
        assert_eq!(d.bucket(0), 0);
        assert_eq!(d.bucket(HOUR / 2), 1);
        assert_eq!(d.bucket(24 * HOUR - 1), 47);
        assert_eq!(d.bucket(-1), 47);
        assert!(d.bucket(i64::MIN) < 48 && d.bucket(i64::MAX) < 48);
    }

    #[test]
    fn bad_parameters_name_the_value() {
        let e = Seasonal::new(SeasonalConfig {
            period_ms: 0,
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "period_ms: must be in [1, 1000000000000], got 0"
        );
        assert!(Seasonal::new(SeasonalConfig {
            alpha_season: 0.0,
            ..Default::default()
        })
        .is_err());
    }
}
