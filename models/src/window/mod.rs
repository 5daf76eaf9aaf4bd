//! Event-time windows over one series, with a watermark and allowed lateness.
//!
//! The watermark is the latest event time seen, or a watermark pushed in from outside for idle series.
//! Readings older than the closed horizon (watermark minus allowed lateness) are *late*: they are
//! reported to the caller to count ([`Admit::Late`]), never silently merged.
//!
//! The two families treat the time between a window's end and its end plus the allowed lateness
//! differently:
//! - [`TumblingWindows`] (what the agent runs) fire early and correct: a window is emitted at
//!   revision 0 as soon as the watermark passes its end, kept until the watermark passes end +
//!   lateness, and re-emitted once at revision 1 if readings arrived for it meanwhile
//!   ([`Admit::Corrected`]). `tumbling.rs` states the policy.
//! - [`HoppingWindows`] and [`SessionWindows`] emit each window once, at revision 0, when the watermark
//!   passes its end + lateness; they never report `Corrected`.

mod hopping;
mod session;
mod tumbling;

pub use hopping::{HoppingWindows, MAX_WINDOWS_PER_READING};
pub use session::SessionWindows;
pub use tumbling::TumblingWindows;

use crate::stats::RunningStats;
use crate::wire::WindowSummary;
use serde::{Deserialize, Serialize};

/// Rejects a negative allowed lateness, naming the value.
pub(crate) fn check_lateness(allowed_lateness_ms: i64) -> Result<(), crate::ModelError> {
    if allowed_lateness_ms < 0 {
        return Err(crate::ModelError::invalid(
            "allowed_lateness_ms",
            format!("must be >= 0, got {allowed_lateness_ms}"),
        ));
    }
    Ok(())
}

/// Moves a watermark forward (never back) and returns the new closing horizon — the watermark minus
/// the allowed lateness — or `None` when the watermark did not move.
pub(crate) fn raise_watermark(current: &mut i64, to: i64, allowed_lateness_ms: i64) -> Option<i64> {
    if to <= *current {
        return None;
    }
    *current = to;
    Some(to.saturating_sub(allowed_lateness_ms))
}

/// Hands every window of `open` (sorted by end) that ends at or before `horizon` to `emit`
/// (hopping windows; tumbling windows fire and retain instead).
pub(crate) fn emit_closed(
    open: &mut Vec<WindowAggregate>,
    horizon: i64,
    emit: &mut impl FnMut(WindowAggregate),
) {
    let n = open.iter().take_while(|w| w.end_ms <= horizon).count();
    for w in open.drain(..n) {
        emit(w);
    }
}

/// Whether a reading was taken into a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// The reading was added to the window starting at `window_start_ms`.
    Accepted {
        /// Start of the window it joined.
        window_start_ms: i64,
    },
    /// The reading joined the window starting at `window_start_ms`, which had already been emitted
    /// and is still retained for corrections: it will be emitted again with a higher revision.
    /// Only [`TumblingWindows`] report this.
    Corrected {
        /// Start of the (already emitted) window it joined.
        window_start_ms: i64,
    },
    /// The reading's window was already closed; the reading was not merged.
    Late,
}

/// The aggregate of one window while it is open, and once it has closed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowAggregate {
    /// Start, inclusive, ms.
    pub start_ms: i64,
    /// End, exclusive, ms.
    pub end_ms: i64,
    /// Value statistics.
    pub stats: RunningStats,
    /// Earliest reading timestamp.
    pub first_ts_ms: i64,
    /// Latest reading timestamp.
    pub last_ts_ms: i64,
    /// Highest anomaly score seen.
    pub max_score: f64,
    /// Revision the window carries when emitted: 0 the first time, higher for a late correction.
    /// While a tumbling window is retained after firing, this is the revision of its *next*
    /// emission, so a value above 0 there means it holds corrections not yet sent.
    pub revision: u32,
    /// Fired, then corrected: to be emitted again (at `revision`) when dropped or flushed.
    #[serde(default)]
    pub dirty: bool,
}

impl WindowAggregate {
    pub(crate) fn new(start_ms: i64, end_ms: i64) -> Self {
        Self {
            start_ms,
            end_ms,
            stats: RunningStats::default(),
            first_ts_ms: i64::MAX,
            last_ts_ms: i64::MIN,
            max_score: 0.0,
            revision: 0,
            dirty: false,
        }
    }

    #[inline]
    pub(crate) fn add(&mut self, ts_ms: i64, value: f64, score: f64) {
        self.stats.push(value);
        self.first_ts_ms = self.first_ts_ms.min(ts_ms);
        self.last_ts_ms = self.last_ts_ms.max(ts_ms);
        self.max_score = self.max_score.max(score);
    }

    /// The wire summary of this window for `device` / `metric`.
    pub fn to_summary(&self, device: &str, metric: &str) -> WindowSummary {
        WindowSummary {
            device: device.to_string(),
            metric: metric.to_string(),
            start_ms: self.start_ms,
            end_ms: self.end_ms,
            count: self.stats.count,
            min: self.stats.min,
            max: self.stats.max,
            mean: self.stats.mean,
            std: self.stats.std(),
            first_ts_ms: self.first_ts_ms,
            last_ts_ms: self.last_ts_ms,
            max_score: self.max_score,
            revision: self.revision,
        }
    }
}
