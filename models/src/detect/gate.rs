//! From a score that is a *state* ("abnormal now") to anomaly *events* (one per episode).
//!
//! Detectors return their score undamped: it stays high for as long as the series looks abnormal,
//! so a point-wise view of an anomaly interval sees all of it. [`EventGate`] is the one place that
//! turns that state into events: an event at the onset of an episode, none while it lasts, and a
//! re-arm once the score has fallen below `threshold × rearm_ratio` and at least `min_gap_readings`
//! readings have passed. The agent, `eval nab`, `eval sim` and `eval csv` all use it.

use crate::ModelError;
use serde::{Deserialize, Serialize};

/// How scores become events; the `anomaly:` block of the agent's configuration carries the same keys.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateConfig {
    /// After an event, re-arm only once the score falls below `threshold × rearm_ratio`, in (0, 1].
    #[serde(default = "default_rearm_ratio")]
    pub rearm_ratio: f64,
    /// After an event, re-arm no sooner than this many readings later (a flapping score near the
    /// threshold raises one event, not one per crossing).
    #[serde(default = "default_min_gap_readings")]
    pub min_gap_readings: u32,
}

fn default_rearm_ratio() -> f64 {
    0.8
}
fn default_min_gap_readings() -> u32 {
    100
}

impl Default for GateConfig {
    fn default() -> Self {
        Self {
            rearm_ratio: default_rearm_ratio(),
            min_gap_readings: default_min_gap_readings(),
        }
    }
}

/// What [`EventGate::question`] asks of the next score (NaN counting as 0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GateQuestion {
    /// Whether it is at or above the level (armed: an event is due if so).
    Reaches(f64),
    /// Whether it is below the level (in an episode, past the gap: the gate re-arms if so).
    Below(f64),
    /// Nothing: the score changes nothing (in an episode, within the gap).
    None,
}

/// One event per episode; see the module documentation. Small, `Copy`-cheap and serde (it is
/// checkpointed with its series).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventGate {
    threshold: f64,
    rearm_below: f64,
    min_gap: u32,
    /// Readings since the last event (saturating), while disarmed.
    since: u32,
    armed: bool,
}

impl EventGate {
    /// A gate raising an event when a score reaches `threshold` (in (0, 1]).
    pub fn new(threshold: f64, cfg: &GateConfig) -> Result<Self, ModelError> {
        if !(threshold > 0.0 && threshold <= 1.0) {
            return Err(ModelError::invalid(
                "threshold",
                format!("must be in (0, 1], got {threshold}"),
            ));
        }
        if !(cfg.rearm_ratio > 0.0 && cfg.rearm_ratio <= 1.0) {
            return Err(ModelError::invalid(
                "rearm_ratio",
                format!("must be in (0, 1], got {}", cfg.rearm_ratio),
            ));
        }
        Ok(Self {
            threshold,
            rearm_below: threshold * cfg.rearm_ratio,
            min_gap: cfg.min_gap_readings,
            since: 0,
            armed: true,
        })
    }

    /// The threshold events are raised at.
    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    /// The level a score must fall below for the gate to re-arm after an event.
    pub fn rearm_level(&self) -> f64 {
        self.rearm_below
    }

    /// Whether the next score at or above the threshold raises an event.
    pub fn armed(&self) -> bool {
        self.armed
    }

    /// This gate's episode state (armed, readings since the last event) under the parameters of
    /// `params`: for state restored from a checkpoint taken under another configuration.
    pub fn retuned(&self, params: &EventGate) -> EventGate {
        EventGate {
            since: self.since,
            armed: self.armed,
            ..params.clone()
        }
    }

    /// Feeds one score; true when it starts an episode (an event is due). NaN counts as 0.
    #[inline]
    pub fn update(&mut self, score: f64) -> bool {
        let score = if score.is_nan() { 0.0 } else { score };
        let yes = match self.question() {
            GateQuestion::Reaches(level) => score >= level,
            GateQuestion::Below(level) => score < level,
            GateQuestion::None => false,
        };
        self.answer(yes)
    }

    /// The one thing the next [`EventGate::update`] needs to know of its score: for a scorer that
    /// can answer it more cheaply than by working out the score (a PCA model compares its
    /// statistics with cut-offs). Then [`EventGate::answer`] does what `update` would.
    #[inline]
    pub fn question(&self) -> GateQuestion {
        if self.armed {
            GateQuestion::Reaches(self.threshold)
        } else if self.since.saturating_add(1) >= self.min_gap {
            GateQuestion::Below(self.rearm_below)
        } else {
            GateQuestion::None
        }
    }

    /// [`EventGate::update`] given the answer to [`EventGate::question`] (anything for
    /// [`GateQuestion::None`]: it is not read); true when an episode starts.
    #[inline]
    pub fn answer(&mut self, yes: bool) -> bool {
        if self.armed {
            if yes {
                self.armed = false;
                self.since = 0;
                return true;
            }
            return false;
        }
        self.since = self.since.saturating_add(1);
        if self.since >= self.min_gap && yes {
            self.armed = true;
        }
        false
    }

    /// The *alarm view* of a score, for threshold sweeps such as NAB's that count every row above
    /// a threshold as a detection: the score itself while armed (an onset, or a quiet row), 0 while
    /// an episode lasts. Every threshold at or above the gate's then sees one detection per episode.
    #[inline]
    pub fn alarm_score(&mut self, score: f64) -> f64 {
        let was_armed = self.armed;
        self.update(score);
        if was_armed && score.is_finite() {
            score.clamp(0.0, 1.0)
        } else {
            0.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(min_gap: u32) -> EventGate {
        EventGate::new(
            0.5,
            &GateConfig {
                rearm_ratio: 0.8,
                min_gap_readings: min_gap,
            },
        )
        .unwrap()
    }

    #[test]
    fn a_long_episode_raises_one_event_and_the_next_episode_another() {
        let mut g = gate(3);
        let scores = [0.1, 0.6, 0.9, 0.7, 0.45, 0.6, 0.3, 0.3, 0.3, 0.2, 0.55, 0.2];
        let events: Vec<bool> = scores.iter().map(|&s| g.update(s)).collect();
        // 0.45 is above the re-arm level (0.4), so 0.6 right after it is the same episode; the gap
        // of 3 readings then holds until the 0.3s; 0.55 is a new episode.
        assert_eq!(
            events,
            [false, true, false, false, false, false, false, false, false, false, true, false]
        );
    }

    /// The question names the one comparison update makes: the threshold while armed, nothing
    /// within the gap after an event, the re-arm level after it.
    #[test]
    fn the_question_is_the_one_comparison_the_next_score_meets() {
        let mut g = gate(3);
        assert_eq!(g.question(), GateQuestion::Reaches(0.5));
        assert!(!g.answer(false));
        assert!(g.answer(true), "an onset");
        assert_eq!(g.question(), GateQuestion::None);
        assert!(!g.answer(true), "within the gap: not read");
        assert_eq!(g.question(), GateQuestion::None);
        assert!(!g.answer(false));
        assert_eq!(g.question(), GateQuestion::Below(0.4));
        assert!(!g.answer(false), "not below: the episode goes on");
        assert_eq!(g.question(), GateQuestion::Below(0.4));
        assert!(!g.answer(true));
        assert!(g.armed());
        assert_eq!(g.question(), GateQuestion::Reaches(0.5));
    }

    #[test]
    fn the_minimum_gap_holds_even_when_the_score_drops_at_once() {
        let mut g = gate(5);
        assert!(g.update(0.9));
        let later: Vec<bool> = [0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 0.9]
            .iter()
            .map(|&s| g.update(s))
            .collect();
        assert_eq!(later, [false, false, false, false, false, false, true]);
    }

    #[test]
    fn the_alarm_view_keeps_onsets_and_quiet_rows_and_zeroes_episodes() {
        let mut g = gate(2);
        let view: Vec<f64> = [0.2, 0.7, 0.8, 0.1, 0.1, 0.3, f64::NAN, 0.6]
            .iter()
            .map(|&s| g.alarm_score(s))
            .collect();
        assert_eq!(view, [0.2, 0.7, 0.0, 0.0, 0.1, 0.3, 0.0, 0.6]);
    }

    #[test]
    fn a_retuned_gate_keeps_its_episode_and_takes_the_new_parameters() {
        let mut old = gate(100);
        assert!(old.update(0.9));
        let new = EventGate::new(0.7, &GateConfig::default()).unwrap();
        let mut g = old.retuned(&new);
        assert!(!g.armed());
        assert_eq!(g.threshold(), 0.7);
        for _ in 0..99 {
            assert!(!g.update(0.1));
        }
        assert!(
            !g.update(0.1),
            "re-armed on the 100th reading after the event"
        );
        assert!(g.update(0.75));
    }

    #[test]
    fn bad_parameters_are_refused_with_the_value() {
        let e = EventGate::new(1.5, &GateConfig::default()).unwrap_err();
        assert_eq!(e.to_string(), "threshold: must be in (0, 1], got 1.5");
        let e = EventGate::new(
            0.5,
            &GateConfig {
                rearm_ratio: 0.0,
                ..GateConfig::default()
            },
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "rearm_ratio: must be in (0, 1], got 0");
        assert!(EventGate::new(f64::NAN, &GateConfig::default()).is_err());
    }
}
