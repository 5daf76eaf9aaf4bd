//! Silent series: readings that stop arriving, seen from the receiver's clock.
//!
//! No reading arrives to be scored when a sensor dies, so this is not a [`Detector`](super::Detector)
//! over values but a per-series state machine over *arrival times*: it learns the series' usual
//! interval (an EWMA of the gaps between arrivals, not fed by silences), reports a silence once the
//! receiver's clock has gone `factor` usual intervals (and at least `min_silence_ms`) past the last
//! arrival, and a recovery when the next reading comes. The caller checks it on its own tick.

use crate::ModelError;
use serde::{Deserialize, Serialize};

/// When a quiet series counts as silent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SilenceConfig {
    /// Whether silences are reported at all.
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// Silent after this many usual intervals without a reading (> 1).
    #[serde(default = "default_factor")]
    pub factor: f64,
    /// ... and at least this long, ms (a floor for fast series whose arrivals jitter).
    #[serde(default = "default_min_silence_ms")]
    pub min_silence_ms: i64,
    /// Readings a series needs before its usual interval is trusted (≥ 2).
    #[serde(default = "default_warmup_readings")]
    pub warmup_readings: u32,
}

fn default_enabled() -> bool {
    true
}
fn default_factor() -> f64 {
    4.0
}
fn default_min_silence_ms() -> i64 {
    2_000
}
fn default_warmup_readings() -> u32 {
    10
}

impl Default for SilenceConfig {
    fn default() -> Self {
        Self {
            enabled: default_enabled(),
            factor: default_factor(),
            min_silence_ms: default_min_silence_ms(),
            warmup_readings: default_warmup_readings(),
        }
    }
}

impl SilenceConfig {
    /// Checks the parameters; errors name the bad one.
    pub fn validate(&self) -> Result<(), ModelError> {
        if !(self.factor.is_finite() && self.factor > 1.0) {
            return Err(ModelError::invalid(
                "factor",
                format!("must be a finite number > 1, got {}", self.factor),
            ));
        }
        if self.min_silence_ms < 0 {
            return Err(ModelError::invalid(
                "min_silence_ms",
                format!("must be >= 0, got {}", self.min_silence_ms),
            ));
        }
        if self.warmup_readings < 2 {
            return Err(ModelError::invalid(
                "warmup_readings",
                format!("must be >= 2, got {}", self.warmup_readings),
            ));
        }
        Ok(())
    }
}

/// Weight of the newest gap in the usual interval.
const ALPHA: f64 = 0.1;

/// What a check or an arrival found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SilenceChange {
    /// The series has just become silent: no reading for `silent_ms`, against a usual interval of
    /// `interval_ms`.
    Silent {
        /// Time since the last arrival, ms.
        silent_ms: i64,
        /// The series' usual interval, ms.
        interval_ms: f64,
    },
    /// A reading arrived after a reported silence of `silent_ms`.
    Recovered {
        /// Time between the last arrival before the silence and this one, ms.
        silent_ms: i64,
        /// The series' usual interval, ms.
        interval_ms: f64,
    },
}

impl SilenceChange {
    /// Time since the last arrival (a silence so far) or between the two arrivals around it (a
    /// recovery), ms.
    pub fn silent_ms(&self) -> i64 {
        match *self {
            SilenceChange::Silent { silent_ms, .. }
            | SilenceChange::Recovered { silent_ms, .. } => silent_ms,
        }
    }

    /// Score on the detectors' scale: 0.5 when the silence is exactly `factor` usual intervals long,
    /// rising towards 1 with its length.
    pub fn score(&self, factor: f64) -> f64 {
        let (SilenceChange::Silent {
            silent_ms,
            interval_ms,
        }
        | SilenceChange::Recovered {
            silent_ms,
            interval_ms,
        }) = *self;
        let ratio = silent_ms as f64 / interval_ms.max(1.0);
        if ratio.is_finite() && ratio > 0.0 {
            ratio / (ratio + factor)
        } else {
            0.0
        }
    }
}

/// Per-series silence state (16 bytes); the last arrival time is the caller's (it has it anyway).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Silence {
    /// EWMA of the gaps between arrivals, ms (0 before the second reading).
    interval_ms: f64,
    /// Readings seen, saturating.
    readings: u32,
    /// A silence was reported and no reading has come since.
    silent: bool,
}

impl Silence {
    /// Whether a silence is in progress (reported, not yet recovered).
    pub fn is_silent(&self) -> bool {
        self.silent
    }

    /// The usual interval learned so far, ms (`None` during warm-up).
    pub fn interval_ms(&self, cfg: &SilenceConfig) -> Option<f64> {
        (self.readings >= cfg.warmup_readings).then_some(self.interval_ms)
    }

    /// A reading arrived at `now_ms`; `last_arrival_ms` is the previous arrival (`None` for the
    /// first). Returns the recovery when a silence was in progress.
    pub fn arrive(
        &mut self,
        last_arrival_ms: Option<i64>,
        now_ms: i64,
        cfg: &SilenceConfig,
    ) -> Option<SilenceChange> {
        self.readings = self.readings.saturating_add(1);
        let last = last_arrival_ms?;
        let gap = now_ms.saturating_sub(last).max(0) as f64;
        if std::mem::take(&mut self.silent) {
            // A silence is not an interval: the estimate stays what it was.
            return Some(SilenceChange::Recovered {
                silent_ms: now_ms.saturating_sub(last),
                interval_ms: self.interval_ms,
            });
        }
        if self.readings <= 2 {
            self.interval_ms = gap;
        } else if gap <= self.interval_ms * cfg.factor || self.readings < cfg.warmup_readings {
            self.interval_ms += ALPHA * (gap - self.interval_ms);
        }
        None
    }

    /// The receiver's clock says `now_ms`; the series' last reading arrived at `last_arrival_ms`.
    /// Returns the silence once, when it starts.
    pub fn check(
        &mut self,
        last_arrival_ms: i64,
        now_ms: i64,
        cfg: &SilenceConfig,
    ) -> Option<SilenceChange> {
        if !cfg.enabled || self.silent || self.readings < cfg.warmup_readings {
            return None;
        }
        let silent_ms = now_ms.saturating_sub(last_arrival_ms);
        let due = (self.interval_ms * cfg.factor).max(cfg.min_silence_ms as f64);
        if (silent_ms as f64) < due {
            return None;
        }
        self.silent = true;
        Some(SilenceChange::Silent {
            silent_ms,
            interval_ms: self.interval_ms,
        })
    }

    /// Forget a silence in progress without reporting a recovery (the receiver itself was away:
    /// after a restart, its downtime is not the series' silence).
    pub fn reset_silence(&mut self) {
        self.silent = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds arrivals every `every` ms from `from` (exclusive of `to`), checking at every `tick` ms.
    fn run(
        s: &mut Silence,
        cfg: &SilenceConfig,
        arrivals: impl IntoIterator<Item = i64>,
    ) -> (Option<i64>, Vec<(i64, SilenceChange)>) {
        let mut last = None;
        let mut changes = Vec::new();
        for t in arrivals {
            if let Some(c) = s.arrive(last, t, cfg) {
                changes.push((t, c));
            }
            last = Some(t);
        }
        (last, changes)
    }

    #[test]
    fn a_series_that_stops_is_silent_after_factor_intervals_once_and_recovers_once() {
        let cfg = SilenceConfig::default();
        let mut s = Silence::default();
        let (last, changes) = run(&mut s, &cfg, (0..50).map(|i| i * 1000));
        assert!(changes.is_empty());
        let last = last.unwrap();
        assert_eq!(s.interval_ms(&cfg), Some(1000.0));
        // Checked every 100 ms: silent exactly at 4 intervals, reported once.
        let mut onsets = Vec::new();
        for now in (last..last + 20_000).step_by(100) {
            if let Some(c) = s.check(last, now, &cfg) {
                onsets.push((now, c));
            }
        }
        assert_eq!(onsets.len(), 1, "{onsets:?}");
        assert_eq!(onsets[0].0, last + 4000);
        assert!((onsets[0].1.score(cfg.factor) - 0.5).abs() < 1e-9);
        let back = s.arrive(Some(last), last + 30_000, &cfg);
        assert_eq!(
            back,
            Some(SilenceChange::Recovered {
                silent_ms: 30_000,
                interval_ms: 1000.0
            })
        );
        assert!(!s.is_silent());
        assert_eq!(
            s.interval_ms(&cfg),
            Some(1000.0),
            "the silence is not an interval"
        );
    }

    #[test]
    fn jitter_within_the_factor_never_reports_and_warm_up_says_nothing() {
        let cfg = SilenceConfig::default();
        let mut s = Silence::default();
        // 9 readings: still warming up, a long gap is not a silence yet.
        let (last, _) = run(&mut s, &cfg, (0..9).map(|i| i * 1000));
        assert_eq!(s.check(last.unwrap(), last.unwrap() + 60_000, &cfg), None);
        // Gaps of 0.5 to 2.5 s around 1.5 s: checked just before each next arrival.
        let mut t = 9_000;
        let mut last = last.unwrap();
        for i in 0..500 {
            let gap = 500 + (i * 7919 % 2001);
            assert_eq!(s.check(last, t + gap - 1, &cfg), None, "at {i}");
            t += gap;
            assert_eq!(s.arrive(Some(last), t, &cfg), None);
            last = t;
        }
    }

    #[test]
    fn the_floor_and_the_switch_are_honoured() {
        let cfg = SilenceConfig {
            min_silence_ms: 10_000,
            ..SilenceConfig::default()
        };
        let mut s = Silence::default();
        let (last, _) = run(&mut s, &cfg, (0..20).map(|i| i * 100));
        let last = last.unwrap();
        assert_eq!(s.check(last, last + 9_999, &cfg), None);
        assert!(s.check(last, last + 10_000, &cfg).is_some());
        let off = SilenceConfig {
            enabled: false,
            ..SilenceConfig::default()
        };
        let mut s = Silence::default();
        let (last, _) = run(&mut s, &off, (0..20).map(|i| i * 100));
        assert_eq!(s.check(last.unwrap(), i64::MAX, &off), None);
    }

    #[test]
    fn a_restart_forgets_a_silence_without_a_recovery() {
        let cfg = SilenceConfig::default();
        let mut s = Silence::default();
        let (last, _) = run(&mut s, &cfg, (0..20).map(|i| i * 1000));
        assert!(s
            .check(last.unwrap(), last.unwrap() + 10_000, &cfg)
            .is_some());
        s.reset_silence();
        assert_eq!(s.arrive(Some(50_000), 50_500, &cfg), None);
    }

    #[test]
    fn bad_parameters_are_refused_and_clocks_going_backwards_do_not_panic() {
        for (cfg, msg) in [
            (
                SilenceConfig {
                    factor: 1.0,
                    ..Default::default()
                },
                "factor: must be a finite number > 1, got 1",
            ),
            (
                SilenceConfig {
                    min_silence_ms: -1,
                    ..Default::default()
                },
                "min_silence_ms: must be >= 0, got -1",
            ),
            (
                SilenceConfig {
                    warmup_readings: 1,
                    ..Default::default()
                },
                "warmup_readings: must be >= 2, got 1",
            ),
        ] {
            assert_eq!(cfg.validate().unwrap_err().to_string(), msg);
        }
        let cfg = SilenceConfig::default();
        let mut s = Silence::default();
        for (last, now) in [
            (0, 0),
            (1000, 0),
            (i64::MAX, i64::MIN),
            (i64::MIN, i64::MAX),
        ] {
            s.arrive(Some(last), now, &cfg);
            s.check(last, now, &cfg);
        }
        assert!(s.interval_ms.is_finite());
    }
}
