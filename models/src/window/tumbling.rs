//! Tumbling (fixed, non-overlapping) event-time windows for one series.

use super::{Admit, WindowAggregate};
use crate::ModelError;
use serde::{Deserialize, Serialize};

/// Tumbling windows of `size_ms` aligned to the Unix epoch, closing `allowed_lateness_ms` after their end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TumblingWindows {
    size_ms: i64,
    allowed_lateness_ms: i64,
    /// Open windows, sorted by start; rarely more than two.
    open: Vec<WindowAggregate>,
    /// Highest watermark seen.
    watermark_ms: i64,
    /// Every window ending at or before this has been closed.
    closed_until_ms: i64,
}

impl TumblingWindows {
    /// Windows of `size_ms` (> 0) accepting readings up to `allowed_lateness_ms` (≥ 0) after a window's end.
    pub fn new(size_ms: i64, allowed_lateness_ms: i64) -> Result<Self, ModelError> {
        if size_ms <= 0 {
            return Err(ModelError::invalid(
                "size_ms",
                format!("window size must be > 0, got {size_ms}"),
            ));
        }
        super::check_lateness(allowed_lateness_ms)?;
        Ok(Self {
            size_ms,
            allowed_lateness_ms,
            open: Vec::with_capacity(2),
            watermark_ms: i64::MIN,
            closed_until_ms: i64::MIN,
        })
    }

    /// Start of the window holding `ts_ms`.
    #[inline]
    pub fn window_start(&self, ts_ms: i64) -> i64 {
        ts_ms - ts_ms.rem_euclid(self.size_ms)
    }

    /// The current watermark (latest event time seen or pushed).
    pub fn watermark_ms(&self) -> i64 {
        self.watermark_ms
    }

    /// Number of windows currently open.
    pub fn open_windows(&self) -> usize {
        self.open.len()
    }

    /// Adds a reading, then closes every window the advanced watermark has passed, handing each to `emit`.
    #[inline]
    pub fn push(
        &mut self,
        ts_ms: i64,
        value: f64,
        score: f64,
        emit: &mut impl FnMut(WindowAggregate),
    ) -> Admit {
        let start = self.window_start(ts_ms);
        let admit = if start.saturating_add(self.size_ms) <= self.closed_until_ms {
            Admit::Late
        } else {
            let idx = match self.open.iter().rposition(|w| w.start_ms <= start) {
                Some(i) if self.open[i].start_ms == start => i,
                found => {
                    let at = found.map_or(0, |i| i + 1);
                    self.open.insert(
                        at,
                        WindowAggregate::new(start, start.saturating_add(self.size_ms)),
                    );
                    at
                }
            };
            self.open[idx].add(ts_ms, value, score);
            Admit::Accepted {
                window_start_ms: start,
            }
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
        super::emit_closed(&mut self.open, horizon, emit);
        // Everything ending at or before the horizon is closed, whether or not it had readings.
        let aligned = horizon.saturating_sub(horizon.rem_euclid(self.size_ms));
        self.closed_until_ms = self.closed_until_ms.max(aligned);
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

    fn collect(w: &mut TumblingWindows, readings: &[(i64, f64)]) -> (Vec<WindowAggregate>, usize) {
        let mut out = Vec::new();
        let mut late = 0;
        for &(ts, v) in readings {
            if w.push(ts, v, 0.0, &mut |a| out.push(a)) == Admit::Late {
                late += 1;
            }
        }
        (out, late)
    }

    #[test]
    fn window_closes_once_watermark_passes_end_plus_lateness() {
        let mut w = TumblingWindows::new(1000, 500).unwrap();
        let (out, _) = collect(&mut w, &[(0, 1.0), (999, 3.0), (1400, 5.0)]);
        assert!(out.is_empty(), "still within lateness");
        let (out, _) = collect(&mut w, &[(1500, 7.0)]);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].start_ms, out[0].end_ms), (0, 1000));
        assert_eq!(out[0].stats.count, 2);
        assert_eq!(out[0].stats.mean, 2.0);
        assert_eq!((out[0].first_ts_ms, out[0].last_ts_ms), (0, 999));
    }

    #[test]
    fn out_of_order_reading_within_lateness_is_merged() {
        let mut w = TumblingWindows::new(1000, 500).unwrap();
        let (_, late) = collect(&mut w, &[(100, 1.0), (1200, 2.0), (900, 3.0)]);
        assert_eq!(late, 0);
        let mut out = Vec::new();
        w.flush(&mut |a| out.push(a));
        assert_eq!(out[0].stats.count, 2);
        assert_eq!(out[1].stats.count, 1);
    }

    #[test]
    fn reading_after_its_window_closed_is_late_and_not_merged() {
        let mut w = TumblingWindows::new(1000, 0).unwrap();
        let (out, late) = collect(&mut w, &[(100, 1.0), (2500, 2.0), (500, 9.0), (1500, 9.0)]);
        assert_eq!(
            late, 2,
            "window [0,1000) and the empty [1000,2000) are both closed"
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].stats.max, 1.0);
    }

    #[test]
    fn negative_timestamps_align_to_the_epoch() {
        let w = TumblingWindows::new(1000, 0).unwrap();
        assert_eq!(w.window_start(-1), -1000);
        assert_eq!(w.window_start(-1000), -1000);
        assert_eq!(w.window_start(0), 0);
    }

    #[test]
    fn external_watermark_closes_idle_series() {
        let mut w = TumblingWindows::new(1000, 0).unwrap();
        collect(&mut w, &[(10, 1.0)]);
        let mut out = Vec::new();
        w.advance(5000, &mut |a| out.push(a));
        assert_eq!(out.len(), 1);
        w.advance(4000, &mut |a| out.push(a));
        assert_eq!(w.watermark_ms(), 5000, "watermark never moves back");
    }

    #[test]
    fn invalid_parameters_are_rejected_with_the_value() {
        let e = TumblingWindows::new(0, 0).unwrap_err();
        assert!(e.to_string().contains("got 0"), "{e}");
        assert!(TumblingWindows::new(10, -1).is_err());
    }

    proptest! {
        #[test]
        fn every_reading_is_either_in_exactly_one_window_or_late(
            ts in prop::collection::vec(0i64..100_000, 1..200),
            size in 1i64..5000,
            lateness in 0i64..3000,
        ) {
            let mut w = TumblingWindows::new(size, lateness).unwrap();
            let mut out = Vec::new();
            let mut late = 0u64;
            for &t in &ts {
                if w.push(t, 1.0, 0.0, &mut |a| out.push(a)) == Admit::Late { late += 1; }
            }
            w.flush(&mut |a| out.push(a));
            let counted: u64 = out.iter().map(|a| a.stats.count).sum();
            prop_assert_eq!(counted + late, ts.len() as u64);
            let mut starts: Vec<i64> = out.iter().map(|a| a.start_ms).collect();
            let n = starts.len();
            starts.sort();
            starts.dedup();
            prop_assert_eq!(starts.len(), n, "a window was emitted twice");
            for a in &out {
                prop_assert!(a.first_ts_ms >= a.start_ms && a.last_ts_ms < a.end_ms);
            }
        }
    }
}
