//! Scoring detections against labelled ground truth (the simulator's injected anomalies): per anomaly
//! kind, how many were caught, precision, recall, F1 and the median detection delay.
//!
//! Rules. A detection *matches* a label when it is on the same series (device, metric) and its
//! timestamp lies in `[start, end + tolerance]`. A label with at least one match is a true positive
//! (its delay is its first match minus its start), else a false negative. A detection that matches no
//! label is a false positive, counted per series. Precision is per detection: matched detections over
//! matched plus false-positive detections. A false positive has no kind, so each kind's precision is
//! charged with all of them — it reads "of what fired, how much was this kind or nothing", and a kind
//! can only look better than the overall figure by having more matched detections.
//!
//! A detection on metric [`DEVICE_WIDE`] (`*`) is about a whole device: it matches a label on any
//! metric of that device.
//!
//! It does not pair detections one-to-one with labels (a detector firing on every reading of a long
//! anomaly is not penalised for it) and does not know about windows or thresholds: callers hand in the
//! detections they consider fired.

use super::EvalError;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// One labelled anomaly: where, what kind and when (both bounds inclusive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelledEvent {
    /// Device id.
    pub device: String,
    /// Metric name.
    pub metric: String,
    /// Anomaly kind, e.g. `spike`, `drift`, `stuck`.
    pub kind: String,
    /// First affected timestamp, ms.
    pub start_ms: i64,
    /// Last affected timestamp, ms.
    pub end_ms: i64,
}

/// The metric of a device-wide detection (a multivariate model's): it matches a label on any
/// metric of its device, and is a false positive only outside all of that device's labels.
pub const DEVICE_WIDE: &str = "*";

/// One reading a detector flagged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detection {
    /// Device id.
    pub device: String,
    /// Metric name, or [`DEVICE_WIDE`].
    pub metric: String,
    /// The flagged reading's timestamp, ms.
    pub ts_ms: i64,
}

/// The result for one anomaly kind (or, in [`TruthReport::overall`], for all of them).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KindScore {
    /// The kind (`all` for the overall row).
    pub kind: String,
    /// Labels of this kind.
    pub labels: usize,
    /// Labels with at least one matching detection.
    pub true_positives: usize,
    /// Labels without one.
    pub false_negatives: usize,
    /// Detections matching a label of this kind.
    pub matched_detections: usize,
    /// `matched / (matched + false-positive detections)`; `None` when both are 0.
    pub precision: Option<f64>,
    /// `true_positives / labels`; `None` without labels.
    pub recall: Option<f64>,
    /// Harmonic mean of precision and recall; `None` when either is undefined or both are 0.
    pub f1: Option<f64>,
    /// Median of (first matching detection − label start) over true positives, ms.
    pub median_delay_ms: Option<f64>,
}

/// False positives on one series.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SeriesFalsePositives {
    /// Device id.
    pub device: String,
    /// Metric name.
    pub metric: String,
    /// Detections on this series matching no label.
    pub count: usize,
}

/// Scores per kind, overall, and false positives per series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TruthReport {
    /// One row per kind, sorted by kind.
    pub kinds: Vec<KindScore>,
    /// All kinds together.
    pub overall: KindScore,
    /// Series with at least one false positive, sorted by device then metric.
    pub false_positives: Vec<SeriesFalsePositives>,
    /// Total false-positive detections.
    pub total_false_positives: usize,
}

fn median(mut xs: Vec<i64>) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_unstable();
    let n = xs.len();
    Some(if n % 2 == 1 {
        xs[n / 2] as f64
    } else {
        (xs[n / 2 - 1] as f64 + xs[n / 2] as f64) / 2.0
    })
}

#[derive(Default)]
struct Tally {
    labels: usize,
    tp: usize,
    matched: usize,
    delays: Vec<i64>,
}

impl Tally {
    fn finish(self, kind: &str, false_positives: usize) -> KindScore {
        let fired = self.matched + false_positives;
        let precision = (fired > 0).then(|| self.matched as f64 / fired as f64);
        let recall = (self.labels > 0).then(|| self.tp as f64 / self.labels as f64);
        let f1 = match (precision, recall) {
            (Some(p), Some(r)) if p + r > 0.0 => Some(2.0 * p * r / (p + r)),
            _ => None,
        };
        KindScore {
            kind: kind.to_string(),
            labels: self.labels,
            true_positives: self.tp,
            false_negatives: self.labels - self.tp,
            matched_detections: self.matched,
            precision,
            recall,
            f1,
            median_delay_ms: median(self.delays),
        }
    }
}

/// Scores `detections` against `labels`, a detection matching a label up to `tolerance_ms` after its
/// end. Rejects a negative tolerance and labels that end before they start.
pub fn score_truth(
    labels: &[LabelledEvent],
    detections: &[Detection],
    tolerance_ms: i64,
) -> Result<TruthReport, EvalError> {
    if tolerance_ms < 0 {
        return Err(EvalError::Truth(format!(
            "tolerance_ms must be >= 0, got {tolerance_ms}"
        )));
    }
    if let Some((i, l)) = labels
        .iter()
        .enumerate()
        .find(|(_, l)| l.start_ms > l.end_ms)
    {
        return Err(EvalError::Truth(format!(
            "label {i} ({}/{} {}): ends at {} before it starts at {}",
            l.device, l.metric, l.kind, l.end_ms, l.start_ms
        )));
    }

    // Detection timestamps per series, sorted, so each label finds its matches by binary search.
    let mut fired: HashMap<(&str, &str), Vec<i64>> = HashMap::new();
    for d in detections {
        fired
            .entry((d.device.as_str(), d.metric.as_str()))
            .or_default()
            .push(d.ts_ms);
    }
    fired.values_mut().for_each(|v| v.sort_unstable());

    let mut kinds: BTreeMap<&str, Tally> = BTreeMap::new();
    let mut all = Tally::default();
    // Matched intervals per series, to find the detections no label explains.
    let mut covered: HashMap<(&str, &str), Vec<(i64, i64)>> = HashMap::new();
    for l in labels {
        let key = (l.device.as_str(), l.metric.as_str());
        let device_wide = (l.device.as_str(), DEVICE_WIDE);
        let until = l.end_ms.saturating_add(tolerance_ms);
        covered.entry(key).or_default().push((l.start_ms, until));
        if key != device_wide {
            covered
                .entry(device_wide)
                .or_default()
                .push((l.start_ms, until));
        }
        // Matches on the label's series, and device-wide detections of its device.
        let (mut matched, mut first) = (0usize, None::<i64>);
        for k in [Some(key), (key != device_wide).then_some(device_wide)]
            .into_iter()
            .flatten()
        {
            let ts = fired.get(&k).map_or(&[][..], Vec::as_slice);
            let lo = ts.partition_point(|&t| t < l.start_ms);
            let hi = ts.partition_point(|&t| t <= until);
            matched += hi.saturating_sub(lo);
            if hi > lo {
                first = Some(first.map_or(ts[lo], |f| f.min(ts[lo])));
            }
        }
        for t in [kinds.entry(l.kind.as_str()).or_default(), &mut all] {
            t.labels += 1;
            t.matched += matched;
            if let Some(first) = first {
                t.tp += 1;
                t.delays.push(first - l.start_ms);
            }
        }
    }
    // `all.matched` counts a detection once per label it matches; count distinct ones for precision.
    let mut false_positives = Vec::new();
    let mut matched_distinct = 0usize;
    for (&(device, metric), ts) in &fired {
        let mut spans = covered.remove(&(device, metric)).unwrap_or_default();
        spans.sort_unstable();
        let mut merged: Vec<(i64, i64)> = Vec::with_capacity(spans.len());
        for (a, b) in spans {
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        let explained = ts
            .iter()
            .filter(|&&t| {
                let i = merged.partition_point(|&(a, _)| a <= t);
                i > 0 && t <= merged[i - 1].1
            })
            .count();
        matched_distinct += explained;
        if explained < ts.len() {
            false_positives.push(SeriesFalsePositives {
                device: device.to_string(),
                metric: metric.to_string(),
                count: ts.len() - explained,
            });
        }
    }
    false_positives.sort_by(|a, b| (&a.device, &a.metric).cmp(&(&b.device, &b.metric)));
    let total_false_positives = false_positives.iter().map(|f| f.count).sum();
    all.matched = matched_distinct;
    Ok(TruthReport {
        kinds: kinds
            .into_iter()
            .map(|(k, t)| t.finish(k, total_false_positives))
            .collect(),
        overall: all.finish("all", total_false_positives),
        false_positives,
        total_false_positives,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(device: &str, kind: &str, start_ms: i64, end_ms: i64) -> LabelledEvent {
        LabelledEvent {
            device: device.into(),
            metric: "temp".into(),
            kind: kind.into(),
            start_ms,
            end_ms,
        }
    }

    fn det(device: &str, ts_ms: i64) -> Detection {
        Detection {
            device: device.into(),
            metric: "temp".into(),
            ts_ms,
        }
    }

    #[test]
    fn device_wide_detections_match_any_metric_of_their_device_only() {
        let labels = [
            LabelledEvent {
                metric: "flow".into(),
                ..label("a", "correlation_break", 1000, 2000)
            },
            label("b", "spike", 1000, 1000),
        ];
        let wide = |device: &str, ts_ms| Detection {
            metric: DEVICE_WIDE.into(),
            ..det(device, ts_ms)
        };
        let dets = [
            wide("a", 1500),
            wide("a", 5000),
            wide("c", 1500),
            det("a", 1200),
        ];
        let r = score_truth(&labels, &dets, 0).unwrap();
        let k = &r.kinds[0];
        assert_eq!(
            (k.kind.as_str(), k.true_positives, k.matched_detections),
            ("correlation_break", 1, 1)
        );
        assert_eq!(k.median_delay_ms, Some(500.0));
        assert_eq!(
            r.kinds[1].true_positives, 0,
            "a device-wide detection of a does not match b"
        );
        // Outside a's labels: a/* at 5000; c/* everywhere; a/temp (no label on a/temp).
        assert_eq!(r.total_false_positives, 3);
    }

    #[test]
    fn detections_inside_or_just_after_a_label_are_true_positives() {
        let labels = [
            label("a", "spike", 100, 100),
            label("a", "spike", 1000, 1100),
            label("b", "drift", 500, 900),
        ];
        // a/100 caught at 130 (within 50 ms tolerance), a/1000 missed (1200 is past 1150), b caught at
        // 600 and 700; a/5000 is a false positive.
        let dets = [
            det("a", 130),
            det("a", 1200),
            det("b", 600),
            det("b", 700),
            det("a", 5000),
        ];
        let r = score_truth(&labels, &dets, 50).unwrap();
        let spike = &r.kinds[1];
        assert_eq!(spike.kind, "spike");
        assert_eq!(
            (spike.labels, spike.true_positives, spike.false_negatives),
            (2, 1, 1)
        );
        assert_eq!(spike.recall, Some(0.5));
        assert_eq!(spike.median_delay_ms, Some(30.0));
        let drift = &r.kinds[0];
        assert_eq!((drift.true_positives, drift.matched_detections), (1, 2));
        assert_eq!(drift.median_delay_ms, Some(100.0));
        assert_eq!(r.total_false_positives, 2, "a/1200 and a/5000");
        assert_eq!(
            r.false_positives,
            vec![SeriesFalsePositives {
                device: "a".into(),
                metric: "temp".into(),
                count: 2
            }]
        );
        // Overall: 3 matched detections, 2 false positives; 2 of 3 labels caught.
        assert_eq!(r.overall.precision, Some(0.6));
        assert_eq!(r.overall.recall, Some(2.0 / 3.0));
        let f1 = r.overall.f1.unwrap();
        assert!((f1 - 2.0 * 0.6 * (2.0 / 3.0) / (0.6 + 2.0 / 3.0)).abs() < 1e-12);
        // Per kind, every false positive is charged: drift 2 / (2 + 2).
        assert_eq!(drift.precision, Some(0.5));
        assert_eq!(drift.f1, Some(2.0 * 0.5 / 1.5));
    }

    #[test]
    fn a_detection_on_another_series_does_not_match() {
        let r = score_truth(&[label("a", "stuck", 0, 10)], &[det("b", 5)], 0).unwrap();
        assert_eq!(r.kinds[0].true_positives, 0);
        assert_eq!(r.kinds[0].precision, Some(0.0));
        assert_eq!(r.kinds[0].f1, None);
        assert_eq!(r.total_false_positives, 1);
    }

    #[test]
    fn median_delay_of_an_even_count_averages_the_middle_two() {
        let labels = [
            label("a", "spike", 0, 100),
            label("b", "spike", 0, 100),
            label("c", "spike", 0, 100),
            label("d", "spike", 0, 100),
        ];
        let dets = [
            det("a", 10),
            det("b", 20),
            det("c", 40),
            det("d", 90),
            det("d", 95),
        ];
        let r = score_truth(&labels, &dets, 0).unwrap();
        assert_eq!(r.kinds[0].median_delay_ms, Some(30.0));
        assert_eq!(r.kinds[0].precision, Some(1.0));
    }

    #[test]
    fn overlapping_labels_count_a_detection_once_overall() {
        let labels = [label("a", "spike", 0, 10), label("a", "drift", 5, 50)];
        let r = score_truth(&labels, &[det("a", 7)], 0).unwrap();
        assert_eq!(r.overall.matched_detections, 1);
        assert_eq!(r.overall.true_positives, 2);
        assert_eq!(r.overall.precision, Some(1.0));
    }

    #[test]
    fn nothing_fired_leaves_precision_undefined() {
        let r = score_truth(&[label("a", "spike", 0, 10)], &[], 0).unwrap();
        assert_eq!(r.kinds[0].precision, None);
        assert_eq!(r.kinds[0].recall, Some(0.0));
        assert_eq!(r.kinds[0].median_delay_ms, None);
    }

    #[test]
    fn invalid_input_is_rejected_with_the_value() {
        let e = score_truth(&[], &[], -1).unwrap_err();
        assert!(e.to_string().contains("got -1"), "{e}");
        let e = score_truth(&[label("a", "spike", 10, 5)], &[], 0).unwrap_err();
        assert!(e.to_string().contains("label 0"), "{e}");
    }
}
