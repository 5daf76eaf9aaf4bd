//! The reconciliation behind `edgewatch verify`: the readings the simulator handed to MQTT (its
//! readings log) against the windows the aggregators hold, series by series.
//!
//! Pure: no I/O, no clock. [`Check::reconcile`] takes the parsed log and every instance's
//! `/api/windows` answer and returns a [`Report`]; fetching, parsing files and printing live in the
//! parent module. The rules, per series (device, metric):
//! - **doubled**: two held windows overlap (on one instance or across instances), so readings are
//!   counted twice. Windows of a series on several instances that do not overlap are fine.
//! - **wrong count**: a window's `count` differs from the log readings with `start ≤ ts < end`
//!   (windows may be coarse: several window lengths merged by the agent under disk pressure).
//! - **wrong mean**: same count, but the mean differs by more than 1e-9 relative to the window's
//!   largest magnitude (the log mean, the held mean or the largest |value|), so a mean near zero of
//!   large values is not held to an impossible standard.
//! - **unexpected**: a window with readings where the log has none.
//! - **missing**: log readings no held window covers, at or after the series' earliest held window
//!   (or any, when the series is held nowhere), grouped per base window of `window_ms`.
//! - **not retained**: uncovered log readings before the earliest held window; aggregators keep only
//!   their newest windows. Not a failure when the series' cumulative `readings` total (summed over
//!   instances) equals the log's; when the totals differ a **wrong total** finding is reported.
//!
//! **Loss** (for `--tolerate-loss`): per series, the larger of the readings missing or under-counted
//! in held windows and the amount by which the cumulative total falls short of the log. Missing
//! readings, under-counted windows and short totals are *loss*; everything else (doubled,
//! over-counted, wrong mean, unexpected, totals above the log) always fails.

use edgewatch_aggregator::state::{HeldSeries, HeldWindow};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

use super::VerifyError;

/// Relative tolerance of the mean check.
const MEAN_TOLERANCE: f64 = 1e-9;

/// A series key: (device, metric).
type Key = (String, String);

/// The readings log, per series, sorted by timestamp.
#[derive(Debug, Clone, Default)]
pub struct LogReadings {
    series: BTreeMap<Key, Vec<(i64, f64)>>,
}

impl LogReadings {
    /// Adds one reading, keeping the series sorted by timestamp (equal timestamps in log order).
    pub fn push(
        &mut self,
        device: impl Into<String>,
        metric: impl Into<String>,
        ts_ms: i64,
        value: f64,
    ) {
        let v = self
            .series
            .entry((device.into(), metric.into()))
            .or_default();
        // The simulator writes each series in time order: the insert is the rare path.
        if v.last().is_none_or(|last| last.0 <= ts_ms) {
            v.push((ts_ms, value));
        } else {
            let at = v.partition_point(|r| r.0 <= ts_ms);
            v.insert(at, (ts_ms, value));
        }
    }

    /// Readings in the log.
    pub fn len(&self) -> u64 {
        self.series.values().map(|v| v.len() as u64).sum()
    }

    /// Whether the log is empty.
    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }
}

impl<D: Into<String>, M: Into<String>> FromIterator<(D, M, i64, f64)> for LogReadings {
    fn from_iter<I: IntoIterator<Item = (D, M, i64, f64)>>(iter: I) -> Self {
        let mut log = LogReadings::default();
        for (d, m, ts, v) in iter {
            log.push(d, m, ts, v);
        }
        log
    }
}

/// What one aggregator instance holds.
#[derive(Debug, Clone)]
pub struct Instance {
    /// How the report names it (its URL).
    pub name: String,
    /// Its `/api/windows` answer.
    pub series: Vec<HeldSeries>,
}

/// Log readings of one base window that no held window covers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Missing {
    /// Device id.
    pub device: String,
    /// Metric name.
    pub metric: String,
    /// Start of the base window (a multiple of `window_ms`).
    pub window_start_ms: i64,
    /// Readings the log has there.
    pub expected: u64,
}

/// A held window and one it overlaps.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Doubled {
    /// Device id.
    pub device: String,
    /// Metric name.
    pub metric: String,
    /// The later window: [start, end) and the instance holding it.
    pub start_ms: i64,
    /// End of the later window.
    pub end_ms: i64,
    /// Instance holding the later window.
    pub instance: String,
    /// Start of the earlier window it overlaps.
    pub other_start_ms: i64,
    /// End of the earlier window.
    pub other_end_ms: i64,
    /// Instance holding the earlier window.
    pub other_instance: String,
}

/// A held window whose count or mean disagrees with the log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WrongWindow<T> {
    /// Device id.
    pub device: String,
    /// Metric name.
    pub metric: String,
    /// Window start.
    pub start_ms: i64,
    /// Window end.
    pub end_ms: i64,
    /// Instance holding it.
    pub instance: String,
    /// From the log.
    pub expected: T,
    /// From the aggregator.
    pub got: T,
}

/// A series whose cumulative `readings` (summed over instances) differs from the log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WrongTotal {
    /// Device id.
    pub device: String,
    /// Metric name.
    pub metric: String,
    /// Readings in the log.
    pub expected: u64,
    /// Cumulative `readings` of the series.
    pub got: u64,
    /// Log readings older than the earliest held window (not checkable window by window).
    pub not_retained: u64,
}

/// The outcome of a reconciliation. `ok` decides the exit code.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Everything matched, or only loss within the tolerance.
    pub ok: bool,
    /// Base window length.
    pub window_ms: i64,
    /// Instances checked, by name.
    pub instances: Vec<String>,
    /// Series in the log or on an instance.
    pub series_checked: usize,
    /// Held windows checked.
    pub windows_checked: usize,
    /// Readings in the log.
    pub readings_expected: u64,
    /// Cumulative `readings` over every series and instance.
    pub readings_found: u64,
    /// Sum of the held windows' counts.
    pub readings_in_held_windows: u64,
    /// Log readings older than their series' earliest held window.
    pub not_retained: u64,
    /// Series held by more than one instance (overlapping or not).
    pub series_on_several_instances: usize,
    /// Held windows not aligned to `window_ms` (start or length not a multiple): a wrong
    /// `--window-ms`, or an agent with another window size.
    pub misaligned_windows: usize,
    /// Readings lost (see the module docs).
    pub loss: u64,
    /// Loss accepted.
    pub tolerate_loss: u64,
    /// Readings in `missing`.
    pub missing_readings: u64,
    /// Uncovered log readings per base window.
    pub missing: Vec<Missing>,
    /// Overlapping windows.
    pub doubled: Vec<Doubled>,
    /// Windows whose count differs from the log.
    pub wrong_count: Vec<WrongWindow<u64>>,
    /// Windows whose mean differs from the log (`got` is `None` when the aggregator had none).
    pub wrong_mean: Vec<WrongWindow<Option<f64>>>,
    /// Windows with readings where the log has none (`got` = their count, `expected` = 0).
    pub unexpected: Vec<WrongWindow<u64>>,
    /// Series whose cumulative total differs from the log.
    pub wrong_total: Vec<WrongTotal>,
}

fn finding<T>(
    device: &str,
    metric: &str,
    w: &HeldWindow,
    instance: String,
    expected: T,
    got: T,
) -> WrongWindow<T> {
    WrongWindow {
        device: device.to_string(),
        metric: metric.to_string(),
        start_ms: w.start_ms,
        end_ms: w.end_ms,
        instance,
        expected,
        got,
    }
}

/// The parameters of a reconciliation, validated.
#[derive(Debug, Clone, Copy)]
pub struct Check {
    window_ms: i64,
    tolerate_loss: u64,
}

impl Check {
    /// `window_ms` is the agent's window length (`window.size_ms`); must be > 0.
    pub fn new(window_ms: i64, tolerate_loss: u64) -> Result<Self, VerifyError> {
        if window_ms <= 0 {
            return Err(VerifyError::Usage(format!(
                "--window-ms must be > 0, got {window_ms}"
            )));
        }
        Ok(Self {
            window_ms,
            tolerate_loss,
        })
    }

    /// Reconciles `log` with what `instances` hold. See the module docs.
    pub fn reconcile(&self, log: &LogReadings, instances: &[Instance]) -> Report {
        let mut held: BTreeMap<Key, Vec<(usize, &HeldSeries)>> = BTreeMap::new();
        for (i, inst) in instances.iter().enumerate() {
            for s in &inst.series {
                held.entry((s.device.clone(), s.metric.clone()))
                    .or_default()
                    .push((i, s));
            }
        }
        let keys: BTreeSet<&Key> = log.series.keys().chain(held.keys()).collect();
        let mut r = Report {
            ok: false,
            window_ms: self.window_ms,
            instances: instances.iter().map(|i| i.name.clone()).collect(),
            series_checked: keys.len(),
            windows_checked: 0,
            readings_expected: log.len(),
            readings_found: 0,
            readings_in_held_windows: 0,
            not_retained: 0,
            series_on_several_instances: 0,
            misaligned_windows: 0,
            loss: 0,
            tolerate_loss: self.tolerate_loss,
            missing_readings: 0,
            missing: Vec::new(),
            doubled: Vec::new(),
            wrong_count: Vec::new(),
            wrong_mean: Vec::new(),
            unexpected: Vec::new(),
            wrong_total: Vec::new(),
        };
        let mut hard = 0usize;
        for key in keys {
            let readings = log.series.get(key).map(Vec::as_slice).unwrap_or(&[]);
            let on = held.get(key).map(Vec::as_slice).unwrap_or(&[]);
            hard += self.series(key, readings, on, instances, &mut r);
        }
        r.ok = hard == 0 && r.loss <= self.tolerate_loss;
        r
    }

    /// Checks one series, adding to `r`; returns its number of failures that are not loss.
    fn series(
        &self,
        (device, metric): &Key,
        readings: &[(i64, f64)],
        on: &[(usize, &HeldSeries)],
        instances: &[Instance],
        r: &mut Report,
    ) -> usize {
        let name = |i: usize| instances[i].name.clone();
        let mut hard = 0;
        let mut window_loss = 0u64;
        if on.len() > 1 {
            r.series_on_several_instances += 1;
        }
        let total: u64 = on.iter().map(|(_, s)| s.readings).sum();
        r.readings_found += total;

        let mut windows: Vec<(usize, &HeldWindow)> = on
            .iter()
            .flat_map(|&(i, s)| s.windows.iter().map(move |w| (i, w)))
            .collect();
        windows.sort_by_key(|(i, w)| (w.start_ms, w.end_ms, *i));
        r.windows_checked += windows.len();

        // Overlaps: each window against the earlier one reaching furthest.
        let mut reach: Option<(i64, usize)> = None;
        for (k, &(i, w)) in windows.iter().enumerate() {
            if let Some((_, j)) = reach.filter(|&(end, _)| w.start_ms < end) {
                let (oi, o) = windows[j];
                r.doubled.push(Doubled {
                    device: device.clone(),
                    metric: metric.clone(),
                    start_ms: w.start_ms,
                    end_ms: w.end_ms,
                    instance: name(i),
                    other_start_ms: o.start_ms,
                    other_end_ms: o.end_ms,
                    other_instance: name(oi),
                });
                hard += 1;
            }
            if reach.is_none_or(|(end, _)| w.end_ms > end) {
                reach = Some((w.end_ms, k));
            }
        }

        for &(i, w) in &windows {
            let span = w.end_ms - w.start_ms;
            if span <= 0 || w.start_ms.rem_euclid(self.window_ms) != 0 || span % self.window_ms != 0
            {
                r.misaligned_windows += 1;
            }
            r.readings_in_held_windows += w.count;
            let lo = readings.partition_point(|x| x.0 < w.start_ms);
            let hi = readings.partition_point(|x| x.0 < w.end_ms).max(lo);
            let inside = &readings[lo..hi];
            let expected = inside.len() as u64;
            if expected == 0 && w.count > 0 {
                r.unexpected
                    .push(finding(device, metric, w, name(i), 0, w.count));
                hard += 1;
            } else if expected != w.count {
                if w.count < expected {
                    window_loss += expected - w.count;
                } else {
                    hard += 1;
                }
                r.wrong_count
                    .push(finding(device, metric, w, name(i), expected, w.count));
            } else if expected > 0 {
                let sum: f64 = inside.iter().map(|x| x.1).sum();
                let mean = sum / expected as f64;
                let largest = inside.iter().fold(0.0f64, |m, x| m.max(x.1.abs()));
                let ok = w.mean.is_some_and(|got| {
                    let scale = largest.max(mean.abs()).max(got.abs());
                    (got - mean).abs() <= MEAN_TOLERANCE * scale
                });
                if !ok {
                    r.wrong_mean
                        .push(finding(device, metric, w, name(i), Some(mean), w.mean));
                    hard += 1;
                }
            }
        }

        // Coverage: the union of the held windows, then one pass over the sorted readings.
        let mut covered: Vec<(i64, i64)> = Vec::new();
        for &(_, w) in &windows {
            match covered.last_mut() {
                Some(last) if w.start_ms <= last.1 => last.1 = last.1.max(w.end_ms),
                _ => covered.push((w.start_ms, w.end_ms)),
            }
        }
        let earliest = windows.first().map(|(_, w)| w.start_ms);
        let mut not_retained = 0u64;
        let mut c = covered.iter().peekable();
        for &(ts, _) in readings {
            while c.next_if(|iv| iv.1 <= ts).is_some() {}
            if c.peek().is_some_and(|iv| iv.0 <= ts) {
                continue;
            }
            if earliest.is_some_and(|e| ts < e) {
                not_retained += 1;
                continue;
            }
            let base = ts - ts.rem_euclid(self.window_ms);
            window_loss += 1;
            r.missing_readings += 1;
            match r.missing.last_mut() {
                Some(m)
                    if m.window_start_ms == base && &m.device == device && &m.metric == metric =>
                {
                    m.expected += 1;
                }
                _ => r.missing.push(Missing {
                    device: device.clone(),
                    metric: metric.clone(),
                    window_start_ms: base,
                    expected: 1,
                }),
            }
        }
        r.not_retained += not_retained;

        let logged = readings.len() as u64;
        if total != logged {
            r.wrong_total.push(WrongTotal {
                device: device.clone(),
                metric: metric.clone(),
                expected: logged,
                got: total,
                not_retained,
            });
            if total > logged {
                hard += 1;
            }
        }
        r.loss += window_loss.max(logged.saturating_sub(total));
        hard
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: i64 = 60_000;

    /// Five base windows of one series, a reading a second; values vary so means are distinct.
    fn log_readings() -> Vec<(i64, f64)> {
        (0..300)
            .map(|i| (i * 1000, 20.0 + (i % 7) as f64 * 0.37))
            .collect()
    }

    fn log_of(readings: &[(i64, f64)]) -> LogReadings {
        readings.iter().map(|&(ts, v)| ("d", "m", ts, v)).collect()
    }

    /// The window an honest agent would emit for `[start, end)` of `readings`.
    fn window(readings: &[(i64, f64)], start: i64, end: i64) -> HeldWindow {
        let inside: Vec<f64> = readings
            .iter()
            .filter(|r| r.0 >= start && r.0 < end)
            .map(|r| r.1)
            .collect();
        HeldWindow {
            start_ms: start,
            end_ms: end,
            count: inside.len() as u64,
            mean: Some(inside.iter().sum::<f64>() / inside.len() as f64),
            revision: 0,
        }
    }

    fn series(windows: Vec<HeldWindow>, readings: u64) -> HeldSeries {
        HeldSeries {
            device: "d".into(),
            metric: "m".into(),
            partition: 3,
            readings,
            windows_applied: windows.len() as u64,
            windows,
        }
    }

    fn exact_windows(readings: &[(i64, f64)]) -> Vec<HeldWindow> {
        (0..5)
            .map(|k| window(readings, k * W, (k + 1) * W))
            .collect()
    }

    fn instance(name: &str, series: Vec<HeldSeries>) -> Instance {
        Instance {
            name: name.into(),
            series,
        }
    }

    fn check(tolerate: u64) -> Check {
        Check::new(W, tolerate).unwrap()
    }

    #[test]
    fn an_exact_match_is_ok() {
        let readings = log_readings();
        let held = series(exact_windows(&readings), 300);
        let r = check(0).reconcile(
            &log_of(&readings),
            &[instance("a", vec![held]), instance("b", vec![])],
        );
        assert!(r.ok, "{r:#?}");
        assert_eq!((r.series_checked, r.windows_checked), (1, 5));
        assert_eq!(
            (
                r.readings_expected,
                r.readings_found,
                r.readings_in_held_windows
            ),
            (300, 300, 300)
        );
        assert_eq!((r.loss, r.not_retained, r.misaligned_windows), (0, 0, 0));
    }

    #[test]
    fn a_missing_window_is_reported_with_its_start_and_expected_count() {
        let readings = log_readings();
        let mut windows = exact_windows(&readings);
        windows.remove(2);
        let inst = [instance("a", vec![series(windows, 240)])];
        let r = check(0).reconcile(&log_of(&readings), &inst);
        assert!(!r.ok);
        assert_eq!(
            r.missing,
            vec![Missing {
                device: "d".into(),
                metric: "m".into(),
                window_start_ms: 2 * W,
                expected: 60
            }]
        );
        assert_eq!((r.missing_readings, r.loss), (60, 60));
        assert_eq!(
            (r.wrong_total[0].expected, r.wrong_total[0].got),
            (300, 240)
        );
        assert!(
            check(60).reconcile(&log_of(&readings), &inst).ok,
            "loss tolerated"
        );
        assert!(!check(59).reconcile(&log_of(&readings), &inst).ok);
    }

    #[test]
    fn a_window_held_on_two_instances_is_doubled() {
        let readings = log_readings();
        let again = series(vec![window(&readings, W, 2 * W)], 60);
        let inst = [
            instance("a", vec![series(exact_windows(&readings), 300)]),
            instance("b", vec![again]),
        ];
        let r = check(1000).reconcile(&log_of(&readings), &inst);
        assert!(!r.ok, "doubling is never tolerated");
        assert_eq!(r.doubled.len(), 1, "{:#?}", r.doubled);
        let d = &r.doubled[0];
        assert_eq!((d.start_ms, d.other_start_ms), (W, W));
        assert_ne!(d.instance, d.other_instance);
        assert_eq!(r.series_on_several_instances, 1);
        assert_eq!(r.wrong_total[0].got, 360);
        assert!(
            r.wrong_count.is_empty(),
            "each copy matches the log on its own"
        );
    }

    #[test]
    fn a_wrong_count_names_the_window_with_expected_and_got() {
        let readings = log_readings();
        let mut windows = exact_windows(&readings);
        windows[3].count = 59;
        let r = check(0).reconcile(
            &log_of(&readings),
            &[instance("a", vec![series(windows.clone(), 299)])],
        );
        assert!(!r.ok);
        let w = &r.wrong_count[0];
        assert_eq!(
            (w.start_ms, w.end_ms, w.expected, w.got),
            (3 * W, 4 * W, 60, 59)
        );
        assert_eq!(w.instance, "a");
        assert_eq!(r.loss, 1, "an under-count is loss");
        assert!(
            r.wrong_mean.is_empty(),
            "a mean is only compared when counts agree"
        );

        windows[3].count = 61;
        let r = check(1000).reconcile(
            &log_of(&readings),
            &[instance("a", vec![series(windows, 301)])],
        );
        assert!(!r.ok, "an over-count is never loss");
    }

    #[test]
    fn a_wrong_mean_is_reported() {
        let readings = log_readings();
        let mut windows = exact_windows(&readings);
        windows[1].mean = windows[1].mean.map(|m| m * (1.0 + 1e-7));
        windows[4].mean = windows[4].mean.map(|m| m * (1.0 + 1e-12));
        let r = check(0).reconcile(
            &log_of(&readings),
            &[instance("a", vec![series(windows, 300)])],
        );
        assert!(!r.ok);
        assert_eq!(r.wrong_mean.len(), 1, "1e-12 relative is within tolerance");
        assert_eq!(r.wrong_mean[0].start_ms, W);
    }

    #[test]
    fn a_coarse_window_covering_three_base_windows_matches_exactly() {
        let readings = log_readings();
        let windows = vec![
            window(&readings, 0, W),
            window(&readings, W, 4 * W),
            window(&readings, 4 * W, 5 * W),
        ];
        assert_eq!(windows[1].count, 180);
        let r = check(0).reconcile(
            &log_of(&readings),
            &[instance("a", vec![series(windows, 300)])],
        );
        assert!(r.ok, "{r:#?}");
        assert_eq!((r.windows_checked, r.misaligned_windows), (3, 0));
    }

    #[test]
    fn readings_older_than_the_held_windows_are_not_retained_unless_the_total_differs() {
        let readings = log_readings();
        let kept: Vec<_> = exact_windows(&readings).into_iter().skip(3).collect();
        let r = check(0).reconcile(
            &log_of(&readings),
            &[instance("a", vec![series(kept.clone(), 300)])],
        );
        assert!(r.ok, "{r:#?}");
        assert_eq!(r.not_retained, 180);
        assert!(r.missing.is_empty());

        let r = check(0).reconcile(
            &log_of(&readings),
            &[instance("a", vec![series(kept, 280)])],
        );
        assert!(!r.ok);
        assert_eq!(r.wrong_total[0].not_retained, 180);
        assert_eq!(r.loss, 20, "the short total is the loss");
    }

    #[test]
    fn a_series_held_nowhere_is_missing_per_base_window() {
        let readings = log_readings();
        let r = check(0).reconcile(&log_of(&readings), &[instance("a", vec![])]);
        assert!(!r.ok);
        assert_eq!(
            r.missing
                .iter()
                .map(|m| (m.window_start_ms, m.expected))
                .collect::<Vec<_>>(),
            (0..5).map(|k| (k * W, 60)).collect::<Vec<_>>()
        );
        assert_eq!(
            r.loss, 300,
            "missing and the short total are the same readings, counted once"
        );
    }

    #[test]
    fn windows_with_readings_the_log_never_had_are_unexpected() {
        let readings = log_readings();
        let mut extra = series(vec![window(&readings, 0, W)], 60);
        extra.device = "ghost".into();
        let inst = [instance(
            "a",
            vec![series(exact_windows(&readings), 300), extra],
        )];
        let r = check(1000).reconcile(&log_of(&readings), &inst);
        assert!(!r.ok);
        assert_eq!(r.unexpected.len(), 1);
        assert_eq!(
            (r.unexpected[0].device.as_str(), r.unexpected[0].got),
            ("ghost", 60)
        );
        assert_eq!(r.series_checked, 2);
    }

    #[test]
    fn windows_off_the_base_grid_are_counted_as_misaligned() {
        let readings = log_readings();
        let windows = vec![
            window(&readings, 0, 150_000),
            window(&readings, 150_000, 300_000),
        ];
        let r = check(0).reconcile(
            &log_of(&readings),
            &[instance("a", vec![series(windows, 300)])],
        );
        assert!(r.ok, "counts still match");
        assert_eq!(r.misaligned_windows, 2);
    }

    #[test]
    fn out_of_order_log_lines_are_sorted_per_series() {
        let mut log = LogReadings::default();
        for ts in [3, 1, 2, 2] {
            log.push("d", "m", ts, ts as f64);
        }
        assert_eq!(
            log.series[&("d".to_string(), "m".to_string())]
                .iter()
                .map(|r| r.0)
                .collect::<Vec<_>>(),
            vec![1, 2, 2, 3]
        );
        assert_eq!(log.len(), 4);
    }

    #[test]
    fn window_length_must_be_positive() {
        assert!(Check::new(0, 0).unwrap_err().to_string().contains("got 0"));
    }
}
