//! A NAB-compatible scorer (Numenta Anomaly Benchmark v1.1), following
//! `shared/datasets/nab/SCORING.md` rule for rule.
//!
//! - [`parse`]: NAB text — timestamps, data CSVs, `combined_windows.json`.
//! - [`score`]: the per-row rules ([`FileSweep`]) and the corpus threshold sweep ([`NabCorpus`]).
//! - here: the three application profiles, replaying a series through a detector, and the oracle.
//!
//! Typical use: for every data file, `parse_csv` → [`replay`] → [`FileSweep::new`] → [`NabCorpus::add`];
//! then [`NabCorpus::score`]. Files can be replayed on several threads and added in any fixed order.

mod parse;
mod score;

pub use parse::{
    format_timestamp, parse_csv, parse_labels, parse_timestamp, Labels, Series, Window,
};
pub use score::{
    probation_rows, scaled_sigmoid, window_rows, Counts, FileSweep, GroupScore, NabCorpus,
    NabReport, ProfileScore, NEVER_FIRE_THRESHOLD,
};

use super::EvalError;
use crate::detect::{Detector, DetectorConfig, EventGate, GateConfig};
use serde::Serialize;

/// An application profile: the weights of a true positive, a false positive and a false negative.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Profile {
    /// Name as in NAB's `config/profiles.json` (`standard`, `reward_low_FP_rate`, `reward_low_FN_rate`).
    pub name: &'static str,
    /// `A_TP`.
    pub a_tp: f64,
    /// `A_FP`.
    pub a_fp: f64,
    /// `A_FN`.
    pub a_fn: f64,
}

/// NAB's three profiles, in the order NAB reports them.
pub const PROFILES: [Profile; 3] = [
    Profile {
        name: "standard",
        a_tp: 1.0,
        a_fp: 0.11,
        a_fn: 1.0,
    },
    Profile {
        name: "reward_low_FP_rate",
        a_tp: 1.0,
        a_fp: 0.22,
        a_fn: 1.0,
    },
    Profile {
        name: "reward_low_FN_rate",
        a_tp: 1.0,
        a_fp: 0.11,
        a_fn: 2.0,
    },
];

/// Streams a series through a fresh detector built from `config`, one reading at a time in file
/// order (no look-ahead), and returns the *alarm view* of every row's score: the score through an
/// [`EventGate`] at the detector's recommended threshold with the agent's default re-arm rules, so
/// that, as in the agent, an episode counts as one detection and not as one per abnormal row.
pub fn replay(config: &DetectorConfig, series: &Series) -> Result<Vec<f64>, EvalError> {
    let mut detector = config.build()?;
    let mut gate = EventGate::new(config.recommended_threshold(), &GateConfig::default())?;
    Ok(series
        .timestamps_ms
        .iter()
        .zip(&series.values)
        .map(|(&ts, &v)| gate.alarm_score(detector.update(ts, v)))
        .collect())
}

/// The scores of a perfect detector: 1 at each window's first scorable row, 0 elsewhere.
/// Scored on its own labels it reaches 100 under every profile (when no window starts in probation).
pub fn oracle_scores(
    file: &str,
    timestamps_ms: &[i64],
    windows: &[Window],
) -> Result<Vec<f64>, EvalError> {
    let probation = probation_rows(timestamps_ms.len());
    let mut scores = vec![0.0; timestamps_ms.len()];
    for (first, last) in window_rows(file, timestamps_ms, windows)? {
        if last >= probation {
            scores[first.max(probation)] = 1.0;
        }
    }
    Ok(scores)
}

/// Parses one data file's text, replays it through `config` and applies the per-row rules: the whole
/// per-file pipeline, for callers that only need the sweep. Returns the series and scores too.
pub fn score_text(
    name: &str,
    csv: &str,
    windows: &[Window],
    config: &DetectorConfig,
) -> Result<(Series, Vec<f64>, FileSweep), EvalError> {
    let series = parse_csv(csv)?;
    let scores = replay(config, &series)?;
    let sweep = FileSweep::new(name, &series.timestamps_ms, &scores, windows)?;
    Ok((series, scores, sweep))
}
