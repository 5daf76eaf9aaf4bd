//! Tumbling (fixed, non-overlapping) event-time windows for one series, with Flink-style allowed
//! lateness: fire early, correct once.
//!
//! - **Fire.** A window is emitted at revision 0 as soon as the watermark passes its end (reaches
//!   `end_ms`), so a summary is not held back by the allowed lateness.
//! - **Retain.** It is then kept until the watermark passes `end_ms + allowed_lateness_ms`. A reading
//!   for it meanwhile is merged ([`Admit::Corrected`]) and marks it dirty.
//! - **Correct.** A dirty retained window is emitted again, at revision 1, when it is finally dropped
//!   (watermark past end + lateness, including an idle series' external watermark from
//!   [`TumblingWindows::advance`]) or on [`TumblingWindows::flush`]. A clean one is dropped silently.
//!
//! So a window is emitted at most twice: revision 0 at fire, revision 1 if corrected, and the receiver
//! keeps the higher revision. Corrections are batched into that one re-emission rather than sent per
//! late reading, which bounds the uplink traffic a burst of stragglers can cause. A reading whose window
//! was never opened but whose end the watermark has already passed (within the lateness) opens the
//! window and fires it at once, at revision 0. Readings older than end + lateness are
//! [`Admit::Late`]: counted by the caller, not merged. With `allowed_lateness_ms = 0` firing and
//! dropping coincide: every window is emitted once, at revision 0.
//!
//! Invariant: a held window has fired iff its end is at or before the watermark (the watermark never
//! moves back, and a window opened behind it fires at once). Hence no per-window "fired" flag, and the
//! dirty flag is [`WindowAggregate::dirty`]; a correction raises the revision once per firing.

use super::{Admit, WindowAggregate};
use crate::ModelError;
use serde::{Deserialize, Serialize};

/// Tumbling windows of `size_ms` aligned to the Unix epoch, fired at their end and retained for
/// corrections `allowed_lateness_ms` after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TumblingWindows {
    size_ms: i64,
    allowed_lateness_ms: i64,
    /// Held windows, sorted by start: open ones, and fired ones retained for corrections (those
    /// ending at or before the watermark). Rarely more than two.
    open: Vec<WindowAggregate>,
    /// Highest watermark seen.
    watermark_ms: i64,
    /// Every window ending at or before this has been dropped: readings for it are late.
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

    /// Window length, ms.
    pub fn size_ms(&self) -> i64 {
        self.size_ms
    }

    /// How long after its end a window is retained for corrections, ms.
    pub fn allowed_lateness_ms(&self) -> i64 {
        self.allowed_lateness_ms
    }

    /// Start of the window holding `ts_ms` (saturating at `i64::MIN`).
    #[inline]
    pub fn window_start(&self, ts_ms: i64) -> i64 {
        ts_ms.saturating_sub(ts_ms.rem_euclid(self.size_ms))
    }

    /// The current watermark (latest event time seen or pushed).
    pub fn watermark_ms(&self) -> i64 {
        self.watermark_ms
    }

    /// The lowest watermark at which [`TumblingWindows::advance`] would change anything held: the
    /// end of the first window not yet fired, or the end + lateness of the first retained one.
    /// `None` when nothing is held. Lets a caller skip idle series without touching their state.
    pub fn next_deadline_ms(&self) -> Option<i64> {
        let first = self.open.first()?;
        Some(if first.end_ms <= self.watermark_ms {
            first.end_ms.saturating_add(self.allowed_lateness_ms)
        } else {
            first.end_ms
        })
    }

    /// Number of windows held: open, or fired and retained for corrections.
    pub fn open_windows(&self) -> usize {
        self.open.len()
    }

    /// Adds a reading, then fires and drops the windows the advanced watermark has passed, handing
    /// each emission to `emit`.
    #[inline]
    pub fn push(
        &mut self,
        ts_ms: i64,
        value: f64,
        score: f64,
        emit: &mut impl FnMut(WindowAggregate),
    ) -> Admit {
        let start = self.window_start(ts_ms);
        let end = start.saturating_add(self.size_ms);
        let admit = if end <= self.closed_until_ms {
            Admit::Late
        } else {
            let fired = end <= self.watermark_ms;
            match self.open.iter().rposition(|w| w.start_ms <= start) {
                Some(i) if self.open[i].start_ms == start => {
                    let w = &mut self.open[i];
                    w.add(ts_ms, value, score);
                    if fired {
                        // Emitted at its revision so far; the drop (or flush) sends the next one.
                        if !w.dirty {
                            w.dirty = true;
                            w.revision += 1;
                        }
                        Admit::Corrected {
                            window_start_ms: start,
                        }
                    } else {
                        Admit::Accepted {
                            window_start_ms: start,
                        }
                    }
                }
                found => {
                    let mut w = WindowAggregate::new(start, end);
                    w.add(ts_ms, value, score);
                    if fired {
                        // Opened behind the watermark: fire now, as the watermark would have.
                        emit(w.clone());
                    }
                    self.open.insert(found.map_or(0, |i| i + 1), w);
                    Admit::Accepted {
                        window_start_ms: start,
                    }
                }
            }
        };
        self.advance(ts_ms, emit);
        admit
    }

    /// Moves the watermark to `watermark_ms` (never backwards): fires the windows whose end it passes
    /// and drops those whose end + lateness it passes, re-emitting the dirty ones.
    pub fn advance(&mut self, watermark_ms: i64, emit: &mut impl FnMut(WindowAggregate)) {
        let before = self.watermark_ms;
        let Some(horizon) = super::raise_watermark(
            &mut self.watermark_ms,
            watermark_ms,
            self.allowed_lateness_ms,
        ) else {
            return;
        };
        // Sorted by start with one size, so sorted by end: each step below acts on a prefix.
        if self.open.first().is_some_and(|w| w.end_ms <= watermark_ms) {
            let fired_before = self.open.partition_point(|w| w.end_ms <= before);
            let dropped = self.open.partition_point(|w| w.end_ms <= horizon);
            let fire_to = self.open.partition_point(|w| w.end_ms <= watermark_ms);
            for (i, w) in self.open.drain(..dropped).enumerate() {
                // Fired and dropped at once (revision 0), or retained with corrections (revision 1).
                if i >= fired_before || w.dirty {
                    emit(w);
                }
            }
            let first_new = fired_before.max(dropped) - dropped;
            for w in &self.open[first_new..fire_to - dropped] {
                emit(w.clone());
            }
        }
        // Everything ending at or before the horizon is closed, whether or not it had readings.
        let aligned = horizon.saturating_sub(horizon.rem_euclid(self.size_ms));
        self.closed_until_ms = self.closed_until_ms.max(aligned);
    }

    /// Raises the revision of every held window by one, so that whatever they emit from now on
    /// replaces what they emitted before. Used after restoring a checkpoint: windows may have been
    /// emitted after it was taken (with readings the restore does not have, or a crash replays),
    /// and the receiver keeps the highest revision.
    pub fn supersede(&mut self) {
        for w in &mut self.open {
            w.revision += 1;
        }
    }

    /// Drops every held window regardless of the watermark (shutdown, drain): open windows are
    /// emitted at revision 0, retained ones only if dirty (at revision 1).
    pub fn flush(&mut self, emit: &mut impl FnMut(WindowAggregate)) {
        for w in self.open.drain(..) {
            self.closed_until_ms = self.closed_until_ms.max(w.end_ms);
            if w.end_ms > self.watermark_ms || w.dirty {
                emit(w);
            }
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

    fn spans(out: &[WindowAggregate]) -> Vec<(i64, u32, u64)> {
        out.iter()
            .map(|a| (a.start_ms, a.revision, a.stats.count))
            .collect()
    }

    #[test]
    fn next_deadline_is_the_first_fire_then_the_first_drop() {
        let mut w = TumblingWindows::new(1000, 500).unwrap();
        assert_eq!(w.next_deadline_ms(), None);
        collect(&mut w, &[(100, 1.0)]);
        assert_eq!(w.next_deadline_ms(), Some(1000));
        let mut out = Vec::new();
        w.advance(999, &mut |a| out.push(a));
        assert!(out.is_empty());
        w.advance(1000, &mut |a| out.push(a));
        assert_eq!(out.len(), 1, "fired at the deadline");
        assert_eq!(
            w.next_deadline_ms(),
            Some(1500),
            "retained until end + lateness"
        );
        w.advance(1500, &mut |a| out.push(a));
        assert_eq!(w.next_deadline_ms(), None);
    }

    #[test]
    fn window_fires_once_the_watermark_reaches_its_end() {
        let mut w = TumblingWindows::new(1000, 500).unwrap();
        let (out, _) = collect(&mut w, &[(0, 1.0), (999, 3.0)]);
        assert!(out.is_empty(), "watermark 999 is before the end");
        let (out, _) = collect(&mut w, &[(1000, 5.0)]);
        assert_eq!(out.len(), 1, "fired at its end, not at end + lateness");
        assert_eq!(
            (out[0].start_ms, out[0].end_ms, out[0].revision),
            (0, 1000, 0)
        );
        assert_eq!(out[0].stats.count, 2);
        assert_eq!(out[0].stats.mean, 2.0);
        assert_eq!((out[0].first_ts_ms, out[0].last_ts_ms), (0, 999));
        assert_eq!(w.open_windows(), 2, "[0, 1000) is retained for corrections");
        let (out, _) = collect(&mut w, &[(1500, 7.0)]);
        assert!(
            out.is_empty(),
            "a clean retained window is dropped silently"
        );
        assert_eq!(w.open_windows(), 1);
    }

    #[test]
    fn correction_within_lateness_is_reemitted_at_revision_1_with_the_late_reading() {
        let mut w = TumblingWindows::new(1000, 500).unwrap();
        let (out, _) = collect(&mut w, &[(100, 1.0), (1200, 2.0)]);
        assert_eq!(spans(&out), vec![(0, 0, 1)]);
        let mut out = Vec::new();
        assert_eq!(
            w.push(900, 3.0, 0.7, &mut |a| out.push(a)),
            Admit::Corrected { window_start_ms: 0 }
        );
        assert_eq!(
            w.push(950, 4.0, 0.0, &mut |a| out.push(a)),
            Admit::Corrected { window_start_ms: 0 }
        );
        assert!(out.is_empty(), "corrections wait for the drop");
        let (out, late) = collect(&mut w, &[(1499, 5.0)]);
        assert_eq!((out.len(), late), (0, 0));
        let (out, _) = collect(&mut w, &[(1500, 5.0)]);
        assert_eq!(spans(&out), vec![(0, 1, 3)]);
        assert_eq!((out[0].first_ts_ms, out[0].last_ts_ms), (100, 950));
        assert_eq!((out[0].stats.max, out[0].max_score), (4.0, 0.7));
        assert_eq!(out[0].to_summary("d", "m").revision, 1);
    }

    #[test]
    fn reading_beyond_end_plus_lateness_is_late_and_not_merged() {
        let mut w = TumblingWindows::new(1000, 500).unwrap();
        let (out, late) = collect(&mut w, &[(100, 1.0), (1500, 2.0), (999, 9.0)]);
        assert_eq!(late, 1);
        assert_eq!(spans(&out), vec![(0, 0, 1)]);
        let mut out = Vec::new();
        w.flush(&mut |a| out.push(a));
        assert_eq!(spans(&out), vec![(1000, 0, 1)], "no revision of [0, 1000)");
    }

    #[test]
    fn a_window_opened_behind_the_watermark_fires_at_once() {
        let mut w = TumblingWindows::new(1000, 1500).unwrap();
        let (out, _) = collect(&mut w, &[(2200, 1.0)]);
        assert!(out.is_empty());
        let mut out = Vec::new();
        let admit = w.push(1100, 2.0, 0.0, &mut |a| out.push(a));
        assert_eq!(
            admit,
            Admit::Accepted {
                window_start_ms: 1000
            }
        );
        assert_eq!(spans(&out), vec![(1000, 0, 1)]);
        let (out, _) = collect(&mut w, &[(1200, 3.0), (3500, 4.0)]);
        assert_eq!(spans(&out), vec![(1000, 1, 2), (2000, 0, 1)]);
    }

    #[test]
    fn flush_emits_open_and_dirty_retained_windows_but_not_clean_ones() {
        let mut w = TumblingWindows::new(1000, 5000).unwrap();
        let (out, _) = collect(&mut w, &[(100, 1.0), (1100, 1.0), (2100, 1.0), (500, 1.0)]);
        assert_eq!(spans(&out), vec![(0, 0, 1), (1000, 0, 1)]);
        let mut out = Vec::new();
        w.flush(&mut |a| out.push(a));
        assert_eq!(
            spans(&out),
            vec![(0, 1, 2), (2000, 0, 1)],
            "[1000, 2000) was sent and is unchanged"
        );
        assert_eq!(w.open_windows(), 0);
        let (out, late) = collect(&mut w, &[(2500, 1.0)]);
        assert_eq!((out.len(), late), (0, 1), "flushed windows are closed");
    }

    #[test]
    fn idle_advance_drops_dirty_retained_windows_with_their_correction() {
        let mut w = TumblingWindows::new(1000, 500).unwrap();
        collect(&mut w, &[(100, 1.0), (1100, 1.0), (200, 1.0)]);
        let mut out = Vec::new();
        w.advance(5000, &mut |a| out.push(a));
        assert_eq!(spans(&out), vec![(0, 1, 2), (1000, 0, 1)]);
    }

    #[test]
    fn superseded_windows_emit_above_every_earlier_revision() {
        let mut w = TumblingWindows::new(1000, 500).unwrap();
        let mut out = Vec::new();
        w.push(100, 1.0, 0.0, &mut |a| out.push(a));
        w.push(1100, 1.0, 0.0, &mut |a| out.push(a)); // fires [0, 1000) at revision 0
        assert_eq!(spans(&out), vec![(0, 0, 1)]);
        w.supersede(); // as after a restore: [0, 1000) retained, [1000, 2000) open
        w.push(900, 2.0, 0.0, &mut |a| out.push(a)); // correction: 1 + 1
                                                     // Drops [0, 1000), dirty, at 2; fires [1000, 2000) at 1.
        w.push(2100, 1.0, 0.0, &mut |a| out.push(a));
        assert_eq!(spans(&out), vec![(0, 0, 1), (0, 2, 2), (1000, 1, 1)]);
    }

    #[test]
    fn zero_lateness_emits_every_window_once_at_revision_0() {
        let mut w = TumblingWindows::new(1000, 0).unwrap();
        let (out, late) = collect(&mut w, &[(100, 1.0), (999, 2.0), (1000, 3.0), (500, 9.0)]);
        assert_eq!(late, 1);
        assert_eq!(spans(&out), vec![(0, 0, 2)]);
        assert_eq!(w.open_windows(), 1, "nothing retained");
        let mut out = Vec::new();
        w.flush(&mut |a| out.push(a));
        assert_eq!(spans(&out), vec![(1000, 0, 1)]);
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
    fn extreme_timestamps_do_not_overflow() {
        let mut w = TumblingWindows::new(1000, 300).unwrap();
        for t in [i64::MIN, i64::MIN + 1, i64::MAX - 1, 0, i64::MAX] {
            let _ = w.push(t, 1.0, 0.0, &mut |_| {});
        }
        w.advance(i64::MAX, &mut |_| {});
        w.flush(&mut |_| {});
    }

    #[test]
    fn invalid_parameters_are_rejected_with_the_value() {
        let e = TumblingWindows::new(0, 0).unwrap_err();
        assert!(e.to_string().contains("got 0"), "{e}");
        assert!(TumblingWindows::new(10, -1).is_err());
    }

    proptest! {
        #[test]
        fn every_reading_is_counted_once_by_its_windows_latest_revision_or_late(
            ts in prop::collection::vec(0i64..100_000, 1..200),
            size in 1i64..5000,
            lateness in 0i64..3000,
            advances in prop::collection::vec((0usize..200, 0i64..100_000), 0..4),
        ) {
            let mut w = TumblingWindows::new(size, lateness).unwrap();
            let mut out = Vec::new();
            let mut late = 0u64;
            let mut corrected = Vec::new();
            for (i, &t) in ts.iter().enumerate() {
                for &(_, wm) in advances.iter().filter(|&&(at, _)| at == i) {
                    w.advance(wm, &mut |a| out.push(a));
                }
                match w.push(t, 1.0, 0.0, &mut |a| out.push(a)) {
                    Admit::Late => late += 1,
                    Admit::Corrected { window_start_ms } => corrected.push(window_start_ms),
                    Admit::Accepted { .. } => {}
                }
            }
            w.flush(&mut |a| out.push(a));
            // Latest revision per window: emitted at most twice, revision 0 then 1.
            let mut latest: std::collections::BTreeMap<i64, &WindowAggregate> = Default::default();
            for a in &out {
                prop_assert!(a.first_ts_ms >= a.start_ms && a.last_ts_ms < a.end_ms);
                prop_assert_eq!(a.end_ms - a.start_ms, size);
                match latest.get(&a.start_ms) {
                    None => prop_assert_eq!(a.revision, 0, "first emission of {}", a.start_ms),
                    Some(prev) => {
                        prop_assert_eq!((prev.revision, a.revision), (0, 1), "window {}", a.start_ms);
                        prop_assert!(a.stats.count > prev.stats.count);
                    }
                }
                latest.insert(a.start_ms, a);
            }
            let counted: u64 = latest.values().map(|a| a.stats.count).sum();
            prop_assert_eq!(counted + late, ts.len() as u64);
            // Exactly the corrected windows were revised.
            corrected.sort();
            corrected.dedup();
            let revised: Vec<i64> = latest.values().filter(|a| a.revision == 1).map(|a| a.start_ms).collect();
            prop_assert_eq!(revised, corrected);
            if lateness == 0 {
                prop_assert!(out.iter().all(|a| a.revision == 0));
            }
        }
    }
}
