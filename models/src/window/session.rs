//! Session windows for one series: readings less than `gap_ms` apart share a session, which spans
//! `[first reading, last reading + gap_ms)` and closes once the watermark passes that end plus the
//! allowed lateness.
//!
//! Out-of-order readings within the lateness may extend a session or bridge two open ones, which are then
//! merged exactly ([`RunningStats::merge`](crate::stats::RunningStats::merge)). A reading is
//! [`Admit::Late`] — counted by the caller, merged nowhere — when it would extend a session already
//! closed, or when its own session would already be past the horizon. Readings exactly `gap_ms` apart
//! start separate sessions.
//!
//! Each session is emitted once, at revision 0, when it closes: unlike
//! [`TumblingWindows`](super::TumblingWindows), no early firing and no late corrections
//! ([`Admit::Corrected`] is never returned).

use super::{Admit, WindowAggregate};
use crate::ModelError;
use serde::{Deserialize, Serialize};

/// Session windows split by `gap_ms` of silence, closing `allowed_lateness_ms` after their end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionWindows {
    gap_ms: i64,
    allowed_lateness_ms: i64,
    /// Open sessions: disjoint, sorted by start (hence by end).
    open: Vec<WindowAggregate>,
    /// Highest watermark seen.
    watermark_ms: i64,
    /// Highest horizon (watermark − lateness) reached, or end of a flushed session.
    closed_until_ms: i64,
    /// End of the latest closed session: a reading before it could only belong to a closed session.
    last_closed_end_ms: i64,
}

fn merge(into: &mut WindowAggregate, other: &WindowAggregate) {
    into.start_ms = into.start_ms.min(other.start_ms);
    into.end_ms = into.end_ms.max(other.end_ms);
    into.stats.merge(&other.stats);
    into.first_ts_ms = into.first_ts_ms.min(other.first_ts_ms);
    into.last_ts_ms = into.last_ts_ms.max(other.last_ts_ms);
    into.max_score = into.max_score.max(other.max_score);
}

impl SessionWindows {
    /// Sessions split by `gap_ms` (> 0) of silence, accepting readings up to `allowed_lateness_ms` (≥ 0)
    /// after a session's end.
    pub fn new(gap_ms: i64, allowed_lateness_ms: i64) -> Result<Self, ModelError> {
        if gap_ms <= 0 {
            return Err(ModelError::invalid(
                "gap_ms",
                format!("session gap must be > 0, got {gap_ms}"),
            ));
        }
        super::check_lateness(allowed_lateness_ms)?;
        Ok(Self {
            gap_ms,
            allowed_lateness_ms,
            open: Vec::new(),
            watermark_ms: i64::MIN,
            closed_until_ms: i64::MIN,
            last_closed_end_ms: i64::MIN,
        })
    }

    /// The current watermark (latest event time seen or pushed).
    pub fn watermark_ms(&self) -> i64 {
        self.watermark_ms
    }

    /// Number of sessions currently open.
    pub fn open_windows(&self) -> usize {
        self.open.len()
    }

    /// Adds a reading to its session (starting, extending or merging sessions), then closes every session
    /// the advanced watermark has passed, handing each to `emit`. `Accepted` carries the session's start.
    pub fn push(
        &mut self,
        ts_ms: i64,
        value: f64,
        score: f64,
        emit: &mut impl FnMut(WindowAggregate),
    ) -> Admit {
        let reach = ts_ms.saturating_add(self.gap_ms);
        let admit = if reach <= self.closed_until_ms || ts_ms < self.last_closed_end_ms {
            Admit::Late
        } else {
            // Sessions whose span [start, end) meets [ts, ts + gap): a contiguous run, since open
            // sessions are disjoint and sorted.
            let lo = self.open.partition_point(|w| w.end_ms <= ts_ms);
            let hi = self.open.partition_point(|w| w.start_ms < reach);
            let mut session = WindowAggregate::new(ts_ms, reach);
            session.add(ts_ms, value, score);
            for w in self.open.drain(lo..hi.max(lo)) {
                merge(&mut session, &w);
            }
            let start = session.start_ms;
            self.open.insert(lo, session);
            Admit::Accepted {
                window_start_ms: start,
            }
        };
        self.advance(ts_ms, emit);
        admit
    }

    /// Moves the watermark to `watermark_ms` (never backwards) and closes the sessions it passes.
    pub fn advance(&mut self, watermark_ms: i64, emit: &mut impl FnMut(WindowAggregate)) {
        let Some(horizon) = super::raise_watermark(
            &mut self.watermark_ms,
            watermark_ms,
            self.allowed_lateness_ms,
        ) else {
            return;
        };
        let n = self.open.iter().take_while(|w| w.end_ms <= horizon).count();
        for w in self.open.drain(..n) {
            self.last_closed_end_ms = self.last_closed_end_ms.max(w.end_ms);
            emit(w);
        }
        self.closed_until_ms = self.closed_until_ms.max(horizon);
    }

    /// Closes every open session regardless of the watermark (shutdown, drain).
    pub fn flush(&mut self, emit: &mut impl FnMut(WindowAggregate)) {
        for w in self.open.drain(..) {
            self.last_closed_end_ms = self.last_closed_end_ms.max(w.end_ms);
            self.closed_until_ms = self.closed_until_ms.max(w.end_ms);
            emit(w);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn push_all(w: &mut SessionWindows, ts: &[i64]) -> (Vec<WindowAggregate>, usize) {
        let mut out = Vec::new();
        let late = ts
            .iter()
            .filter(|&&t| w.push(t, t as f64, 0.0, &mut |a| out.push(a)) == Admit::Late)
            .count();
        (out, late)
    }

    /// Sessions of a set of timestamps computed in one batch: (start, end, count).
    fn batch(ts: &[i64], gap: i64) -> Vec<(i64, i64, u64)> {
        let mut ts = ts.to_vec();
        ts.sort_unstable();
        let mut out: Vec<(i64, i64, u64)> = Vec::new();
        for t in ts {
            match out.last_mut() {
                Some(s) if t < s.1 => {
                    s.1 = t + gap;
                    s.2 += 1;
                }
                _ => out.push((t, t + gap, 1)),
            }
        }
        out
    }

    #[test]
    fn readings_closer_than_the_gap_share_a_session() {
        let mut w = SessionWindows::new(100, 0).unwrap();
        let (out, late) = push_all(&mut w, &[0, 50, 149, 249, 400]);
        assert_eq!(late, 0);
        // 249 is exactly 100 after 149: a new session; 400 closes [0, 249).
        let spans: Vec<_> = out
            .iter()
            .map(|a| (a.start_ms, a.end_ms, a.stats.count))
            .collect();
        assert_eq!(spans, vec![(0, 249, 3), (249, 349, 1)]);
        assert_eq!(
            (out[0].first_ts_ms, out[0].last_ts_ms, out[0].stats.max),
            (0, 149, 149.0)
        );
    }

    #[test]
    fn a_late_arrival_within_lateness_bridges_two_sessions() {
        let mut w = SessionWindows::new(100, 1000).unwrap();
        let (_, late) = push_all(&mut w, &[0, 300, 150]);
        assert_eq!(late, 0);
        // 150 is exactly 150 from both neighbours, yet [0, 100) and [150, 250) and [300, 400) do not
        // meet: three sessions. 60 and 240 then bridge them into one.
        assert_eq!(w.open_windows(), 3);
        let (_, late) = push_all(&mut w, &[60, 240]);
        assert_eq!(late, 0);
        assert_eq!(w.open_windows(), 1);
        let mut out = Vec::new();
        w.flush(&mut |a| out.push(a));
        assert_eq!(
            (out[0].start_ms, out[0].end_ms, out[0].stats.count),
            (0, 400, 5)
        );
        assert_eq!(out[0].stats.mean, (300 + 150 + 60 + 240) as f64 / 5.0);
    }

    #[test]
    fn a_reading_for_a_closed_session_is_late_and_not_merged() {
        let mut w = SessionWindows::new(100, 0).unwrap();
        let (out, late) = push_all(&mut w, &[0, 500, 50, 350, 450]);
        assert_eq!(out.len(), 1, "[0, 100) closed when 500 arrived");
        assert_eq!(
            late, 2,
            "50 would extend the closed session; 350 would start one already past the horizon"
        );
        let mut out = Vec::new();
        w.flush(&mut |a| out.push(a));
        // 450 is behind the watermark but extends the open session [500, 600) backwards.
        let spans: Vec<_> = out
            .iter()
            .map(|a| (a.start_ms, a.end_ms, a.stats.count))
            .collect();
        assert_eq!(spans, vec![(450, 600, 2)]);
    }

    #[test]
    fn extreme_timestamps_do_not_overflow() {
        let mut w = SessionWindows::new(1000, 10).unwrap();
        for t in [i64::MAX, i64::MIN, i64::MAX - 1] {
            let _ = w.push(t, 1.0, 0.0, &mut |_| {});
        }
        w.flush(&mut |_| {});
    }

    #[test]
    fn invalid_parameters_are_rejected_with_the_value() {
        assert!(SessionWindows::new(0, 0)
            .unwrap_err()
            .to_string()
            .contains("got 0"));
        assert!(SessionWindows::new(10, -5)
            .unwrap_err()
            .to_string()
            .contains("got -5"));
    }

    proptest! {
        #[test]
        fn sessions_are_those_of_the_accepted_readings_and_the_rest_are_late(
            ts in prop::collection::vec(0i64..20_000, 1..200),
            gap in 1i64..2000,
            lateness in 0i64..3000,
        ) {
            let mut w = SessionWindows::new(gap, lateness).unwrap();
            let mut out = Vec::new();
            let mut accepted = Vec::new();
            for &t in &ts {
                if w.push(t, 1.0, 0.0, &mut |a| out.push(a)) != Admit::Late {
                    accepted.push(t);
                }
            }
            w.flush(&mut |a| out.push(a));
            let got: Vec<_> = out.iter().map(|a| (a.start_ms, a.end_ms, a.stats.count)).collect();
            prop_assert_eq!(got, batch(&accepted, gap));
            for a in &out {
                prop_assert_eq!((a.first_ts_ms, a.last_ts_ms + gap), (a.start_ms, a.end_ms));
            }
        }

        #[test]
        fn nothing_is_late_within_the_allowed_lateness(
            ts in prop::collection::vec(0i64..20_000, 1..200),
            gap in 1i64..2000,
        ) {
            let mut w = SessionWindows::new(gap, 20_000).unwrap();
            let (mut out, late) = push_all(&mut w, &ts);
            w.flush(&mut |a| out.push(a));
            prop_assert_eq!(late, 0);
            let got: Vec<_> = out.iter().map(|a| (a.start_ms, a.end_ms, a.stats.count)).collect();
            prop_assert_eq!(got, batch(&ts, gap));
        }
    }
}
