//! Detection metrics of a labelled replay: point-wise precision / recall / F1 at a threshold and at
//! the best threshold (one sorted pass over the distinct scores), and event-wise recall with false
//! alarms per hour over the labelled intervals (maximal runs of label-1 rows).

use serde::Serialize;

/// Row counts of a point-wise comparison and the figures derived from them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PointMetrics {
    /// The threshold (a row is positive when its score is at or above it); `None` when the flags
    /// came from elsewhere (see [`point_from_flags`]).
    pub threshold: Option<f64>,
    /// Positive rows labelled 1.
    pub tp: u64,
    /// Positive rows labelled 0.
    pub fp: u64,
    /// Negative rows labelled 1 (`fn`).
    #[serde(rename = "fn")]
    pub fn_: u64,
    /// Negative rows labelled 0.
    pub tn: u64,
}

fn ratio(a: u64, b: u64) -> Option<f64> {
    (b > 0).then(|| a as f64 / b as f64)
}

impl PointMetrics {
    /// `tp / (tp + fp)`; `None` when nothing is positive.
    pub fn precision(&self) -> Option<f64> {
        ratio(self.tp, self.tp + self.fp)
    }

    /// `tp / (tp + fn)`; `None` when no row is labelled 1.
    pub fn recall(&self) -> Option<f64> {
        ratio(self.tp, self.tp + self.fn_)
    }

    /// `2 tp / (2 tp + fp + fn)`; `None` when there is no positive row and no label.
    pub fn f1(&self) -> Option<f64> {
        ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn_)
    }

    /// Adds another file's counts (the threshold is kept when both agree, else dropped).
    pub fn add(&mut self, o: &PointMetrics) {
        self.tp += o.tp;
        self.fp += o.fp;
        self.fn_ += o.fn_;
        self.tn += o.tn;
        if self.threshold != o.threshold {
            self.threshold = None;
        }
    }

    /// The JSON object: counts, precision, recall and F1.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "threshold": self.threshold,
            "tp": self.tp, "fp": self.fp, "fn": self.fn_, "tn": self.tn,
            "precision": self.precision(), "recall": self.recall(), "f1": self.f1(),
        })
    }
}

/// Point-wise counts of rows flagged positive against their labels (`flags` and `labels` pair up;
/// extra entries of the longer one are ignored, callers pass equal lengths).
pub fn point_from_flags(flags: impl IntoIterator<Item = bool>, labels: &[bool]) -> PointMetrics {
    let mut m = PointMetrics::default();
    for (f, &l) in flags.into_iter().zip(labels) {
        match (f, l) {
            (true, true) => m.tp += 1,
            (true, false) => m.fp += 1,
            (false, true) => m.fn_ += 1,
            (false, false) => m.tn += 1,
        }
    }
    m
}

/// Point-wise counts when a row is positive iff its score is ≥ `threshold` (NaN is never positive).
pub fn point_at(scores: &[f64], labels: &[bool], threshold: f64) -> PointMetrics {
    PointMetrics {
        threshold: Some(threshold),
        ..point_from_flags(scores.iter().map(|&s| s >= threshold), labels)
    }
}

/// The threshold among the distinct scores that maximises F1 (ties: the higher threshold), with its
/// counts: one pass over the rows sorted by decreasing score. `None` when no row is labelled 1 (F1
/// is then 0 or undefined at every threshold) or the lengths differ. NaN scores count as never positive.
pub fn best_point(scores: &[f64], labels: &[bool]) -> Option<PointMetrics> {
    if scores.len() != labels.len() {
        return None;
    }
    let positives = labels.iter().filter(|&&l| l).count() as u64;
    if positives == 0 {
        return None;
    }
    let mut rows: Vec<(f64, bool)> = scores
        .iter()
        .zip(labels)
        .filter(|(s, _)| !s.is_nan())
        .map(|(&s, &l)| (s, l))
        .collect();
    rows.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
    let total = labels.len() as u64;
    let (mut tp, mut fp) = (0u64, 0u64);
    let mut best: Option<(f64, PointMetrics)> = None;
    let mut i = 0;
    while i < rows.len() {
        let s = rows[i].0;
        while i < rows.len() && rows[i].0 == s {
            if rows[i].1 {
                tp += 1;
            } else {
                fp += 1;
            }
            i += 1;
        }
        let m = PointMetrics {
            threshold: Some(s),
            tp,
            fp,
            fn_: positives - tp,
            tn: total - positives - fp,
        };
        let f1 = m.f1().unwrap_or(0.0);
        // Strictly greater: at equal F1 the earlier (higher) threshold stays.
        if best.is_none_or(|(b, _)| f1 > b) {
            best = Some((f1, m));
        }
    }
    best.map(|(_, m)| m)
}

/// The labelled intervals of a file: each maximal run of label-1 rows as (first, last) timestamp.
pub fn intervals(ts_ms: &[i64], labels: &[bool]) -> Vec<(i64, i64)> {
    let mut out = Vec::new();
    let mut open: Option<(i64, i64)> = None;
    for (&t, &l) in ts_ms.iter().zip(labels) {
        open = match (open, l) {
            (None, true) => Some((t, t)),
            (Some((s, _)), true) => Some((s, t)),
            (Some(iv), false) => {
                out.push(iv);
                None
            }
            (None, false) => None,
        };
    }
    out.extend(open);
    out
}

/// Event-wise figures: labelled intervals caught, events that are false alarms, per hour scored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct EventMetrics {
    /// Labelled intervals.
    pub intervals: usize,
    /// Intervals with an event inside `[first, last + tolerance]`.
    pub caught: usize,
    /// Events raised.
    pub events: usize,
    /// Events inside no interval's `[first, last + tolerance]`.
    pub false_alarms: usize,
    /// Hours of data scored (each file's last minus first scored timestamp).
    pub hours: f64,
}

impl EventMetrics {
    /// `caught / intervals`; `None` without intervals.
    pub fn recall(&self) -> Option<f64> {
        ratio(self.caught as u64, self.intervals as u64)
    }

    /// `false_alarms / hours`; `None` when no time was scored.
    pub fn false_alarms_per_hour(&self) -> Option<f64> {
        (self.hours > 0.0).then(|| self.false_alarms as f64 / self.hours)
    }

    /// Adds another file's figures.
    pub fn add(&mut self, o: &EventMetrics) {
        self.intervals += o.intervals;
        self.caught += o.caught;
        self.events += o.events;
        self.false_alarms += o.false_alarms;
        self.hours += o.hours;
    }

    /// The JSON object, with recall and false alarms per hour.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "intervals": self.intervals, "caught": self.caught, "recall": self.recall(),
            "events": self.events, "false_alarms": self.false_alarms, "hours": self.hours,
            "false_alarms_per_hour": self.false_alarms_per_hour(),
        })
    }
}

/// Matches events (timestamps, ascending) against intervals (ascending, disjoint): an interval is
/// caught when an event lies in `[first, last + tolerance_ms]`; an event in no such span is a false
/// alarm. `hours` is the time scored.
pub fn event_metrics(
    intervals: &[(i64, i64)],
    events_ms: &[i64],
    tolerance_ms: i64,
    hours: f64,
) -> EventMetrics {
    let mut caught = vec![false; intervals.len()];
    let mut false_alarms = 0;
    let mut k = 0; // first interval whose extended end is not before the event
    for &e in events_ms {
        while k < intervals.len() && intervals[k].1.saturating_add(tolerance_ms) < e {
            k += 1;
        }
        // With a tolerance, extended spans may overlap the next interval: credit every one matching.
        let mut matched = false;
        let mut j = k;
        while j < intervals.len() && intervals[j].0 <= e {
            if e <= intervals[j].1.saturating_add(tolerance_ms) {
                caught[j] = true;
                matched = true;
            }
            j += 1;
        }
        if !matched {
            false_alarms += 1;
        }
    }
    EventMetrics {
        intervals: intervals.len(),
        caught: caught.iter().filter(|&&c| c).count(),
        events: events_ms.len(),
        false_alarms,
        hours,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_metrics_match_a_hand_computed_case() {
        let scores = [0.1, 0.6, 0.7, 0.2, 0.9, 0.4];
        let labels = [false, true, true, true, false, false];
        let m = point_at(&scores, &labels, 0.5);
        // positive: rows 1, 2, 4 → tp 2, fp 1; row 3 is a missed label; rows 0, 5 true negatives.
        assert_eq!((m.tp, m.fp, m.fn_, m.tn), (2, 1, 1, 2));
        assert_eq!(m.precision(), Some(2.0 / 3.0));
        assert_eq!(m.recall(), Some(2.0 / 3.0));
        assert!((m.f1().unwrap() - 2.0 / 3.0).abs() < 1e-12);
        let none = point_at(&scores, &[false; 6], 0.95);
        assert_eq!(
            (none.precision(), none.recall(), none.f1()),
            (None, None, None)
        );
        let nan = point_at(&[f64::NAN], &[true], 0.0);
        assert_eq!((nan.tp, nan.fn_), (0, 1));
    }

    fn brute_best(scores: &[f64], labels: &[bool]) -> (f64, f64) {
        let mut best = (f64::NEG_INFINITY, -1.0);
        let mut distinct: Vec<f64> = scores.to_vec();
        distinct.sort_by(|a, b| b.total_cmp(a));
        distinct.dedup();
        for t in distinct {
            let f1 = point_at(scores, labels, t).f1().unwrap_or(0.0);
            if f1 > best.1 {
                best = (t, f1);
            }
        }
        best
    }

    #[test]
    fn the_best_threshold_sweep_agrees_with_brute_force() {
        // A small deterministic generator (LCG) so the cases are reproducible.
        let mut x = 12345u64;
        let mut next = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as f64 / (1u64 << 31) as f64
        };
        for case in 0..200 {
            let n = 1 + case % 37;
            // Few distinct values so ties are common.
            let scores: Vec<f64> = (0..n).map(|_| (next() * 6.0).floor() / 5.0).collect();
            let labels: Vec<bool> = (0..n).map(|_| next() < 0.3).collect();
            let fast = best_point(&scores, &labels);
            if !labels.contains(&true) {
                assert_eq!(fast, None);
                continue;
            }
            let fast = fast.unwrap();
            let (t, f1) = brute_best(&scores, &labels);
            assert_eq!(
                fast.threshold,
                Some(t),
                "case {case}: {scores:?} {labels:?}"
            );
            assert!((fast.f1().unwrap_or(0.0) - f1).abs() < 1e-12);
            assert_eq!(fast, point_at(&scores, &labels, t));
        }
        assert_eq!(best_point(&[0.5], &[true, false]), None, "lengths differ");
    }

    #[test]
    fn intervals_are_maximal_runs_of_labelled_rows() {
        let ts = [10, 20, 30, 40, 50, 60, 70];
        let l = [true, false, true, true, false, true, true];
        assert_eq!(intervals(&ts, &l), [(10, 10), (30, 40), (60, 70)]);
        assert!(intervals(&[], &[]).is_empty());
    }

    #[test]
    fn event_recall_and_false_alarms_per_hour() {
        let iv = [(100, 200), (1000, 1100), (5000, 5000)];
        // 150 catches the first; 1150 is after the second (a false alarm without tolerance);
        // 3000 is outside everything; 5000 catches the one-row third.
        let ev = [150, 160, 1150, 3000, 5000];
        let m = event_metrics(&iv, &ev, 0, 2.0);
        assert_eq!(
            (m.intervals, m.caught, m.events, m.false_alarms),
            (3, 2, 5, 2)
        );
        assert_eq!(m.recall(), Some(2.0 / 3.0));
        assert_eq!(m.false_alarms_per_hour(), Some(1.0));
        let tol = event_metrics(&iv, &ev, 50, 2.0);
        assert_eq!((tol.caught, tol.false_alarms), (3, 1));
        let empty = event_metrics(&[], &[], 0, 0.0);
        assert_eq!(
            (empty.recall(), empty.false_alarms_per_hour()),
            (None, None)
        );
        let mut sum = m;
        sum.add(&tol);
        assert_eq!((sum.intervals, sum.caught, sum.hours), (6, 5, 4.0));
    }
}
