//! Hopping (sliding) event-time windows for one series: windows of `size_ms` starting every `hop_ms`,
//! aligned to the Unix epoch, so each reading belongs to about `size_ms / hop_ms` overlapping windows.
//!
//! A reading is merged into all of its windows or into none: if the earliest of them has already
//! closed, the whole reading is reported [`Admit::Late`] and merged nowhere, so a count of late
//! readings says exactly what the summaries miss. (Adding it to the still-open later windows would
//! make those more complete, but then "late" would no longer mean "not counted".)
//!
//! Each window is emitted once, at revision 0, when the watermark passes its end plus the allowed
//! lateness: unlike [`TumblingWindows`](super::TumblingWindows), no early firing and no late
//! corrections ([`Admit::Corrected`] is never returned).

use super::{Admit, WindowAggregate};
use crate::ModelError;
use serde::{Deserialize, Serialize};

/// The most windows one reading may join; `size_ms / hop_ms` beyond it is almost surely a unit mistake.
pub const MAX_WINDOWS_PER_READING: i64 = 1024;

/// Hopping windows `[k·hop, k·hop + size)`, closing `allowed_lateness_ms` after their end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HoppingWindows {
    size_ms: i64,
    hop_ms: i64,
    allowed_lateness_ms: i64,
    /// Open windows, sorted by start.
    open: Vec<WindowAggregate>,
    /// Highest watermark seen.
    watermark_ms: i64,
    /// Every window ending at or before this has been closed (emitted, or never opened).
    closed_until_ms: i64,
}

impl HoppingWindows {
    /// Windows of `size_ms` (> 0) every `hop_ms` (in (0, size_ms], and ≥ size_ms / 1024) accepting
    /// readings up to `allowed_lateness_ms` (≥ 0) after a window's end.
    pub fn new(size_ms: i64, hop_ms: i64, allowed_lateness_ms: i64) -> Result<Self, ModelError> {
        if size_ms <= 0 {
            return Err(ModelError::invalid(
                "size_ms",
                format!("window size must be > 0, got {size_ms}"),
            ));
        }
        if hop_ms <= 0 || hop_ms > size_ms {
            return Err(ModelError::invalid(
                "hop_ms",
                format!("must be in (0, size_ms={size_ms}], got {hop_ms}"),
            ));
        }
        if size_ms / hop_ms + i64::from(size_ms % hop_ms != 0) > MAX_WINDOWS_PER_READING {
            return Err(ModelError::invalid(
                "hop_ms",
                format!(
                    "size_ms / hop_ms must be <= {MAX_WINDOWS_PER_READING} (windows per reading), \
                     got {size_ms} / {hop_ms}"
                ),
            ));
        }
        super::check_lateness(allowed_lateness_ms)?;
        Ok(Self {
            size_ms,
            hop_ms,
            allowed_lateness_ms,
            open: Vec::new(),
            watermark_ms: i64::MIN,
            closed_until_ms: i64::MIN,
        })
    }

    /// Starts of the windows holding `ts_ms`, earliest first.
    pub fn window_starts(&self, ts_ms: i64) -> impl Iterator<Item = i64> {
        let hop = self.hop_ms;
        let last = ts_ms.saturating_sub(ts_ms.rem_euclid(hop));
        // The earliest window still holding ts_ms starts after ts_ms - size_ms. Saturating so that
        // timestamps near the ends of i64 cannot overflow.
        let low = ts_ms.saturating_sub(self.size_ms);
        let first = low.saturating_sub(low.rem_euclid(hop)).saturating_add(hop);
        std::iter::successors(Some(first), move |&s| s.checked_add(hop))
            .take_while(move |&s| s <= last)
    }

    /// The current watermark (latest event time seen or pushed).
    pub fn watermark_ms(&self) -> i64 {
        self.watermark_ms
    }

    /// Number of windows currently open.
    pub fn open_windows(&self) -> usize {
        self.open.len()
    }

    /// Adds a reading to every window holding it (or reports it late), then closes every window the
    /// advanced watermark has passed, handing each to `emit` in order of start.
    /// `Accepted` carries the start of the earliest window the reading joined.
    pub fn push(
        &mut self,
        ts_ms: i64,
        value: f64,
        score: f64,
        emit: &mut impl FnMut(WindowAggregate),
    ) -> Admit {
        let mut starts = self.window_starts(ts_ms).peekable();
        let admit = match starts.peek() {
            Some(&first) if first.saturating_add(self.size_ms) > self.closed_until_ms => {
                for start in starts {
                    let idx = match self.open.binary_search_by_key(&start, |w| w.start_ms) {
                        Ok(i) => i,
                        Err(i) => {
                            let end = start.saturating_add(self.size_ms);
                            self.open.insert(i, WindowAggregate::new(start, end));
                            i
                        }
                    };
                    self.open[idx].add(ts_ms, value, score);
                }
                Admit::Accepted {
                    window_start_ms: first,
                }
            }
            _ => Admit::Late,
        };
        self.advance(ts_ms, emit);
        admit
    }

    /// Moves the watermark to `watermark_ms` (never backwards) and closes the windows it passes.
    pub fn advance(&mut self, watermark_ms: i64, emit: &mut impl FnMut(WindowAggregate)) {
        let Some(horizon) = super::raise_watermark(
            &mut self.watermark_ms,
            watermark_ms,
            self.allowed_lateness_ms,
        ) else {
            return;
        };
        // Same size, so sorted by start is sorted by end: the closable ones are a prefix.
        super::emit_closed(&mut self.open, horizon, emit);
        self.closed_until_ms = self.closed_until_ms.max(horizon);
    }

    /// Closes every open window regardless of the watermark (shutdown, drain).
    pub fn flush(&mut self, emit: &mut impl FnMut(WindowAggregate)) {
        for w in self.open.drain(..) {
            self.closed_until_ms = self.closed_until_ms.max(w.end_ms);
            emit(w);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn push_all(w: &mut HoppingWindows, ts: &[i64]) -> (Vec<WindowAggregate>, Vec<Admit>) {
        let mut out = Vec::new();
        let admits = ts
            .iter()
            .map(|&t| w.push(t, t as f64, 0.0, &mut |a| out.push(a)))
            .collect();
        (out, admits)
    }

    #[test]
    fn a_reading_joins_every_window_that_holds_it() {
        let w = HoppingWindows::new(1000, 250, 0).unwrap();
        assert_eq!(
            w.window_starts(1100).collect::<Vec<_>>(),
            vec![250, 500, 750, 1000]
        );
        assert_eq!(
            w.window_starts(1000).collect::<Vec<_>>(),
            vec![250, 500, 750, 1000]
        );
        assert_eq!(
            w.window_starts(-1).collect::<Vec<_>>(),
            vec![-1000, -750, -500, -250]
        );
        let w = HoppingWindows::new(1000, 300, 0).unwrap();
        assert_eq!(
            w.window_starts(1000).collect::<Vec<_>>(),
            vec![300, 600, 900]
        );
    }

    #[test]
    fn windows_close_in_order_once_the_watermark_passes_end_plus_lateness() {
        let mut w = HoppingWindows::new(1000, 500, 200).unwrap();
        let (out, _) = push_all(&mut w, &[100, 600]);
        assert!(out.is_empty(), "horizon 400: [-500, 500) is still open");
        let (out, _) = push_all(&mut w, &[1250]);
        // Horizon 1050: [-500, 500) and [0, 1000) close.
        let spans: Vec<_> = out
            .iter()
            .map(|a| (a.start_ms, a.end_ms, a.stats.count))
            .collect();
        assert_eq!(spans, vec![(-500, 500, 1), (0, 1000, 2)]);
        assert_eq!((out[1].first_ts_ms, out[1].last_ts_ms), (100, 600));
    }

    #[test]
    fn a_reading_whose_earliest_window_closed_is_late_and_merged_nowhere() {
        let mut w = HoppingWindows::new(1000, 500, 0).unwrap();
        let (_, admits) = push_all(&mut w, &[100, 1200, 900]);
        // 1200 moved the horizon past the ends of [-500, 500) and [0, 1000).
        assert_eq!(
            admits[2],
            Admit::Late,
            "900 belongs to the closed [0, 1000)"
        );
        let mut out = Vec::new();
        w.flush(&mut |a| out.push(a));
        let counts: Vec<_> = out.iter().map(|a| (a.start_ms, a.stats.count)).collect();
        assert_eq!(
            counts,
            vec![(500, 1), (1000, 1)],
            "900 is not merged into [500, 1500)"
        );
        assert_eq!(
            admits[1],
            Admit::Accepted {
                window_start_ms: 500
            }
        );
    }

    #[test]
    fn extreme_timestamps_do_not_overflow() {
        let mut w = HoppingWindows::new(1000, 300, 0).unwrap();
        for t in [i64::MIN, i64::MIN + 1, i64::MAX - 1, i64::MAX] {
            let _ = w.push(t, 1.0, 0.0, &mut |_| {});
        }
        w.flush(&mut |_| {});
    }

    #[test]
    fn invalid_parameters_are_rejected_with_the_value() {
        assert!(HoppingWindows::new(0, 1, 0)
            .unwrap_err()
            .to_string()
            .contains("got 0"));
        assert!(HoppingWindows::new(100, 200, 0)
            .unwrap_err()
            .to_string()
            .contains("got 200"));
        assert!(HoppingWindows::new(100, 0, 0).is_err());
        assert!(HoppingWindows::new(100_000, 1, 0).is_err());
        assert!(HoppingWindows::new(100, 10, -1).is_err());
    }

    proptest! {
        #[test]
        fn every_reading_is_in_exactly_its_windows_or_late(
            ts in prop::collection::vec(-5_000i64..100_000, 1..200),
            size in 1i64..5000,
            hop_div in 1i64..8,
            lateness in 0i64..3000,
        ) {
            let hop = (size / hop_div).max(1);
            let mut w = HoppingWindows::new(size, hop, lateness).unwrap();
            let mut out = Vec::new();
            let mut accepted = Vec::new();
            for &t in &ts {
                match w.push(t, 1.0, 0.0, &mut |a| out.push(a)) {
                    Admit::Accepted { window_start_ms } => {
                        prop_assert_eq!(Some(window_start_ms), w.window_starts(t).next());
                        accepted.push(t);
                    }
                    Admit::Late => {}
                    Admit::Corrected { .. } => prop_assert!(false, "hopping windows never correct"),
                }
            }
            w.flush(&mut |a| out.push(a));
            let mut starts: Vec<i64> = out.iter().map(|a| a.start_ms).collect();
            let n = starts.len();
            starts.sort();
            starts.dedup();
            prop_assert_eq!(starts.len(), n, "a window was emitted twice");
            for a in &out {
                prop_assert_eq!(a.start_ms.rem_euclid(hop), 0);
                prop_assert_eq!(a.end_ms - a.start_ms, size);
                let inside = accepted.iter().filter(|&&t| a.start_ms <= t && t < a.end_ms).count();
                prop_assert_eq!(a.stats.count, inside as u64, "window {:?}", (a.start_ms, a.end_ms));
            }
            // Every accepted reading's windows were all emitted.
            for &t in &accepted {
                for s in w.window_starts(t) {
                    prop_assert!(starts.binary_search(&s).is_ok(), "window {} of {} missing", s, t);
                }
            }
            // Late means it belonged to a window emitted before it arrived: never silently dropped.
            let joined: u64 = out.iter().map(|a| a.stats.count).sum();
            let per_reading = accepted.iter().map(|&t| w.window_starts(t).count() as u64).sum::<u64>();
            prop_assert_eq!(joined, per_reading);
        }
    }
}
