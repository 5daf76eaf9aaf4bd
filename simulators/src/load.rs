//! The hidden load of a correlated device: one slow process per device (a daily cycle shared by the
//! fleet plus a seeded Ornstein–Uhlenbeck walk of its own) that drives every metric with a
//! `load_gain`, so flow, pressure, current and temperature move together.
//!
//! Owns the `load:` block of the config (fields, defaults, validation) and the process itself. It
//! does not know about metrics or anomalies: the fleet turns a load into readings.

use rand::rngs::SmallRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::f64::consts::TAU;

const DAY_MS: i64 = 86_400_000;
/// The load's daily cycle peaks at 15:00 UTC for every device, so identical peers stay identical.
pub(crate) const LOAD_PEAK_MS: i64 = 15 * 3_600_000;

/// The `load:` block: one hidden load per device, `mean + daily_amplitude·cos(day) + walk`, where the
/// walk is an Ornstein–Uhlenbeck process with stationary standard deviation `walk_std` that reverts to
/// 0 with time constant `mean_reversion_ms`. The load is clamped at 0 (never negative).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadConfig {
    /// Drive metrics from a hidden load per device; `false` keeps every series independent.
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// Mean load (dimensionless, 1.0 = full load).
    #[serde(default = "default_mean")]
    pub mean: f64,
    /// Amplitude of the daily cycle (peak 15:00 UTC, the same for every device); must stay below `mean`.
    #[serde(default = "default_daily_amplitude")]
    pub daily_amplitude: f64,
    /// Stationary standard deviation of each device's own random walk (the only load difference between peers).
    #[serde(default = "default_walk_std")]
    pub walk_std: f64,
    /// Time constant of the walk's reversion to the mean.
    #[serde(default = "default_mean_reversion_ms")]
    pub mean_reversion_ms: u64,
    /// With the load on, each series' base is offset by at most ± this many noise std-devs (instead of
    /// ±2) and its daily amplitude and phase are not varied, so peers are identical apart from noise,
    /// the walk and the drift.
    #[serde(default = "default_peer_offset_sigma")]
    pub peer_offset_sigma: f64,
}

fn default_enabled() -> bool {
    true
}
fn default_mean() -> f64 {
    0.6
}
fn default_daily_amplitude() -> f64 {
    0.25
}
fn default_walk_std() -> f64 {
    0.02
}
fn default_mean_reversion_ms() -> u64 {
    3_600_000
}
fn default_peer_offset_sigma() -> f64 {
    0.5
}

impl Default for LoadConfig {
    fn default() -> Self {
        Self {
            enabled: default_enabled(),
            mean: default_mean(),
            daily_amplitude: default_daily_amplitude(),
            walk_std: default_walk_std(),
            mean_reversion_ms: default_mean_reversion_ms(),
            peer_offset_sigma: default_peer_offset_sigma(),
        }
    }
}

impl LoadConfig {
    pub(crate) fn problems_into(&self, at: &str, out: &mut Vec<String>) {
        if !(self.mean.is_finite() && self.mean > 0.0 && self.mean <= 100.0) {
            out.push(format!("{at}.mean: must be in (0, 100], got {}", self.mean));
        }
        let a = self.daily_amplitude;
        if !(a.is_finite() && a >= 0.0) {
            out.push(format!(
                "{at}.daily_amplitude: must be finite and >= 0, got {a}"
            ));
        } else if self.mean.is_finite() && a >= self.mean {
            out.push(format!(
                "{at}.daily_amplitude: must be < mean ({}) so the load stays positive, got {a}",
                self.mean
            ));
        }
        if !(self.walk_std.is_finite() && self.walk_std >= 0.0) {
            out.push(format!(
                "{at}.walk_std: must be finite and >= 0, got {}",
                self.walk_std
            ));
        }
        if self.mean_reversion_ms == 0 {
            out.push(format!("{at}.mean_reversion_ms: must be > 0, got 0"));
        }
        let p = self.peer_offset_sigma;
        if !(p.is_finite() && p >= 0.0) {
            out.push(format!(
                "{at}.peer_offset_sigma: must be finite and >= 0, got {p}"
            ));
        }
    }

    /// The load's usual range `[lo, hi]`: mean ± the daily amplitude (± walk_std without a daily
    /// cycle). A correlation break keeps the metric's load inside it.
    pub(crate) fn usual_range(&self) -> (f64, f64) {
        let half = if self.daily_amplitude > 0.0 {
            self.daily_amplitude
        } else {
            self.walk_std
        };
        ((self.mean - half).max(0.0), self.mean + half)
    }
}

/// One device's load process. Stepped once per fleet step; its own seeded generator.
#[derive(Debug)]
pub(crate) struct Load {
    rng: SmallRng,
    mean: f64,
    amplitude: f64,
    /// Current walk value.
    walk: f64,
    /// Per-step decay of the walk, `exp(-interval / mean_reversion)`.
    decay: f64,
    /// Per-step innovation std, so the walk's stationary std is `walk_std`.
    kick: f64,
}

impl Load {
    /// The walk starts from its stationary distribution, so there is no start-up transient.
    pub(crate) fn new(cfg: &LoadConfig, interval_ms: i64, seed: u64) -> Load {
        let mut rng = SmallRng::seed_from_u64(seed);
        let decay = (-(interval_ms as f64) / cfg.mean_reversion_ms.max(1) as f64).exp();
        let kick = cfg.walk_std * (1.0 - decay * decay).max(0.0).sqrt();
        let walk = cfg.walk_std * crate::fleet::standard_normal(&mut rng);
        Load {
            rng,
            mean: cfg.mean,
            amplitude: cfg.daily_amplitude,
            walk,
            decay,
            kick,
        }
    }

    /// The load at `ts_ms` (the current walk), then advances the walk by one step.
    pub(crate) fn step(&mut self, ts_ms: i64) -> f64 {
        let tod = (ts_ms - LOAD_PEAK_MS).rem_euclid(DAY_MS) as f64;
        let value = self.mean + self.amplitude * (TAU * tod / DAY_MS as f64).cos() + self.walk;
        self.walk =
            self.walk * self.decay + self.kick * crate::fleet::standard_normal(&mut self.rng);
        value.max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(cfg: &LoadConfig) -> Vec<String> {
        let mut out = Vec::new();
        cfg.problems_into("load", &mut out);
        out
    }

    #[test]
    fn default_is_valid_and_bad_values_are_named() {
        assert!(problems(&LoadConfig::default()).is_empty());
        let cfg = LoadConfig {
            enabled: true,
            mean: f64::NAN,
            daily_amplitude: -1.0,
            walk_std: f64::INFINITY,
            mean_reversion_ms: 0,
            peer_offset_sigma: -0.5,
        };
        let p = problems(&cfg);
        for (field, value) in [
            ("load.mean:", "NaN"),
            ("load.daily_amplitude:", "-1"),
            ("load.walk_std:", "inf"),
            ("load.mean_reversion_ms:", "0"),
            ("load.peer_offset_sigma:", "-0.5"),
        ] {
            assert!(
                p.iter().any(|m| m.starts_with(field) && m.contains(value)),
                "{field} {p:#?}"
            );
        }
        assert_eq!(p.len(), 5, "{p:#?}");
        let too_wide = LoadConfig {
            daily_amplitude: 0.6,
            ..Default::default()
        };
        let p = problems(&too_wide);
        assert!(p[0].starts_with("load.daily_amplitude:") && p[0].contains("0.6"));
    }

    #[test]
    fn the_load_follows_the_day_and_its_walk_has_the_configured_spread() {
        let cfg = LoadConfig::default();
        let mut load = Load::new(&cfg, 1000, 9);
        let start = 1_767_225_600_000; // midnight UTC
        let values: Vec<f64> = (0..86_400).map(|i| load.step(start + i * 1000)).collect();
        let at = |h: usize| values[h * 3600];
        assert!(at(15) > at(3) + 0.3, "{} vs {}", at(15), at(3));
        assert!(values.iter().all(|v| (0.2..=1.0).contains(v)));
        // Remove the daily cycle: what is left is the walk.
        let walk: Vec<f64> = values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let tod = (start + i as i64 * 1000 - LOAD_PEAK_MS).rem_euclid(DAY_MS) as f64;
                v - cfg.mean - cfg.daily_amplitude * (TAU * tod / DAY_MS as f64).cos()
            })
            .collect();
        let sd = (walk.iter().map(|w| w * w).sum::<f64>() / walk.len() as f64).sqrt();
        assert!((0.01..0.04).contains(&sd), "walk std {sd}");
        // Slow: one step moves the load far less than its spread.
        let max_step = values
            .windows(2)
            .map(|w| (w[1] - w[0]).abs())
            .fold(0.0, f64::max);
        assert!(max_step < 0.01, "{max_step}");
    }

    #[test]
    fn no_walk_and_no_cycle_is_a_constant_load() {
        let cfg = LoadConfig {
            daily_amplitude: 0.0,
            walk_std: 0.0,
            ..Default::default()
        };
        let mut load = Load::new(&cfg, 1000, 1);
        assert!((0..100).all(|i| load.step(i * 1000) == 0.6));
        assert_eq!(cfg.usual_range(), (0.6, 0.6));
    }
}
