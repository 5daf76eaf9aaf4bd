//! `eval csv`: replaying labelled multi-sensor CSV datasets (one file = one device run) and
//! scoring three views — univariate (the detector per column, device score = max over columns),
//! multivariate (the PCA device model) and combined (max of the two) — point-wise, event-wise and
//! with the NAB rules (the labelled intervals as windows).
//!
//! - [`parse`]: header layout and streaming row parsing.
//! - [`replay`]: the per-row replay through detectors, gates and the model.
//! - [`metrics`]: precision / recall / F1, best threshold, event recall, false alarms per hour.
//! - here: collecting a file's scored rows ([`FileScores`]) and the corpus ([`CsvCorpus`]).
//!
//! Training rows (the commissioning period) are replayed but never reach [`FileScores`]: every
//! metric covers the scored rows only. NAB's own probation (15 % of a file's scored rows, at most
//! 750) still applies on top, as NAB defines it.

pub mod metrics;
pub mod parse;
pub mod replay;

pub use metrics::{EventMetrics, PointMetrics};
pub use parse::{CsvOptions, Layout, Row, RowParser};
pub use replay::{DeviceReplay, ReplayConfig, RowScores, ViewRow, MULTI_THRESHOLD};

use super::nab::{FileSweep, NabCorpus, Window, PROFILES};
use super::EvalError;
use serde_json::json;

/// The three views of a replay, in report order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// The univariate detector per column; device score = max over the columns.
    Univariate,
    /// The multivariate PCA model.
    Multivariate,
    /// Max of the two.
    Combined,
}

impl View {
    /// All views, in report order.
    pub const ALL: [View; 3] = [View::Univariate, View::Multivariate, View::Combined];

    /// Name in reports and JSON.
    pub fn name(self) -> &'static str {
        match self {
            View::Univariate => "univariate",
            View::Multivariate => "multivariate",
            View::Combined => "combined",
        }
    }

    fn pick(self, s: &RowScores) -> &ViewRow {
        match self {
            View::Univariate => &s.uni,
            View::Multivariate => &s.multi,
            View::Combined => &s.combined,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct ViewScores {
    state: Vec<f64>,
    alarm: Vec<f64>,
    fired: Vec<bool>,
    events: Vec<i64>,
}

/// One file's scored rows, per view, collected row by row.
#[derive(Debug, Clone)]
pub struct FileScores {
    name: String,
    ts: Vec<i64>,
    labels: Vec<bool>,
    views: Vec<ViewScores>,
    training_rows: usize,
    labelled_training_rows: usize,
}

impl FileScores {
    /// Empty scores for the file called `name` (as reports show it).
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            ts: Vec::new(),
            labels: Vec::new(),
            views: vec![ViewScores::default(); View::ALL.len()],
            training_rows: 0,
            labelled_training_rows: 0,
        }
    }

    /// Counts a training row (replayed, not scored).
    pub fn training_row(&mut self, row: &Row) {
        self.training_rows += 1;
        self.labelled_training_rows += usize::from(row.label);
    }

    /// Records a scored row and what the replay gave for it.
    pub fn push(&mut self, row: &Row, scores: &RowScores) {
        self.ts.push(row.ts_ms);
        self.labels.push(row.label);
        for (v, out) in View::ALL.iter().zip(&mut self.views) {
            let r = v.pick(scores);
            out.state.push(r.state);
            out.alarm.push(r.alarm);
            out.fired.push(r.fired);
            if r.event {
                out.events.push(row.ts_ms);
            }
        }
    }

    /// Scored rows so far.
    pub fn rows(&self) -> usize {
        self.ts.len()
    }
}

/// One view's figures over a file or the corpus.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewReport {
    /// The view.
    pub view: View,
    /// Point-wise counts at the fixed threshold (the combined view: a row is positive when either
    /// view's state reaches its threshold).
    pub point: PointMetrics,
    /// Point-wise counts at the threshold maximising F1 (`None` without labelled rows).
    pub best: Option<PointMetrics>,
    /// Event-wise recall and false alarms.
    pub events: EventMetrics,
    /// NAB normalised score per profile (in [`PROFILES`] order) at the fixed threshold.
    pub nab_fixed: Vec<Option<f64>>,
    /// NAB normalised score per profile at the corpus's best threshold of that profile (filled in
    /// by [`CsvCorpus::finish`]), with the threshold.
    pub nab_best: Vec<(f64, Option<f64>)>,
}

impl ViewReport {
    /// The JSON object of this view.
    pub fn to_json(&self) -> serde_json::Value {
        let mut nab = json!({});
        for (i, p) in PROFILES.iter().enumerate() {
            nab[p.name] = json!({
                "at_fixed_threshold": self.nab_fixed.get(i).copied().flatten(),
                "best_threshold": self.nab_best.get(i).map(|b| b.0),
                "at_best_threshold": self.nab_best.get(i).and_then(|b| b.1),
            });
        }
        json!({
            "fixed_threshold": self.point.to_json(),
            "best_threshold": self.best.map(|b| b.to_json()),
            "events": self.events.to_json(),
            "nab": nab,
        })
    }
}

/// The figures of one file.
#[derive(Debug, Clone, PartialEq)]
pub struct FileReport {
    /// The file's name as given to [`FileScores::new`].
    pub name: String,
    /// Rows scored.
    pub rows: usize,
    /// Rows replayed for training only.
    pub training_rows: usize,
    /// Training rows labelled 1 (training assumes normal data: worth a warning).
    pub labelled_training_rows: usize,
    /// Labelled intervals among the scored rows.
    pub intervals: usize,
    /// One entry per view evaluated.
    pub views: Vec<ViewReport>,
}

impl FileReport {
    /// The JSON object of this file.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = json!({
            "file": self.name,
            "rows": self.rows,
            "training_rows": self.training_rows,
            "labelled_training_rows": self.labelled_training_rows,
            "intervals": self.intervals,
        });
        for view in &self.views {
            v[view.view.name()] = view.to_json();
        }
        v
    }
}

/// Merges intervals that touch or overlap (possible with repeated timestamps), as NAB windows must
/// follow one another.
fn nab_windows(intervals: &[(i64, i64)]) -> Vec<Window> {
    let mut out: Vec<Window> = Vec::with_capacity(intervals.len());
    for &(s, e) in intervals {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

#[derive(Debug, Clone, Default)]
struct ViewCorpus {
    state: Vec<f64>,
    nab: NabCorpus,
    point: PointMetrics,
    events: EventMetrics,
}

/// Every file's scores, and the overall figures.
#[derive(Debug, Clone)]
pub struct CsvCorpus {
    views: Vec<View>,
    thresholds: [f64; 3],
    tolerance_ms: i64,
    labels: Vec<bool>,
    per_view: Vec<ViewCorpus>,
    files: Vec<FileReport>,
}

/// The outcome of a corpus: per file and overall.
#[derive(Debug, Clone, PartialEq)]
pub struct CsvReport {
    /// Per file, in the order added.
    pub files: Vec<FileReport>,
    /// Overall, one entry per view evaluated.
    pub overall: Vec<ViewReport>,
    /// Rows scored over all files.
    pub rows: usize,
}

impl CsvCorpus {
    /// A corpus scoring the univariate view at `uni_threshold`, and when `multivariate` also the
    /// multivariate view at `multi_threshold` and the combined one; an event matches an interval
    /// up to `tolerance_ms` after its end.
    pub fn new(
        multivariate: bool,
        uni_threshold: f64,
        multi_threshold: f64,
        tolerance_ms: i64,
    ) -> Result<Self, EvalError> {
        if tolerance_ms < 0 {
            return Err(EvalError::Dataset(format!(
                "tolerance must be >= 0 ms, got {tolerance_ms}"
            )));
        }
        let views = if multivariate {
            View::ALL.to_vec()
        } else {
            vec![View::Univariate]
        };
        Ok(Self {
            per_view: vec![ViewCorpus::default(); views.len()],
            views,
            // The combined alarm view is the max of the two; at the lower threshold it sees every event.
            thresholds: [
                uni_threshold,
                multi_threshold,
                uni_threshold.min(multi_threshold),
            ],
            tolerance_ms,
            labels: Vec::new(),
            files: Vec::new(),
        })
    }

    /// Scores one file and keeps what the overall figures need; returns the file's report.
    pub fn add(&mut self, scores: FileScores) -> Result<&FileReport, EvalError> {
        let ivs = metrics::intervals(&scores.ts, &scores.labels);
        let windows = nab_windows(&ivs);
        let hours = match (scores.ts.first(), scores.ts.last()) {
            (Some(a), Some(b)) => (b - a) as f64 / 3_600_000.0,
            _ => 0.0,
        };
        let mut views = Vec::with_capacity(self.views.len());
        for (k, &view) in self.views.iter().enumerate() {
            let vi = View::ALL.iter().position(|v| *v == view).unwrap_or(0);
            let s = &scores.views[vi];
            let mut point = metrics::point_from_flags(s.fired.iter().copied(), &scores.labels);
            point.threshold = (view != View::Combined).then_some(self.thresholds[vi]);
            let best = metrics::best_point(&s.state, &scores.labels);
            let events = metrics::event_metrics(&ivs, &s.events, self.tolerance_ms, hours);
            let sweep = FileSweep::new(&scores.name, &scores.ts, &s.alarm, &windows)?;
            let at = sweep.counts_at(self.thresholds[vi]);
            let nab_fixed = PROFILES.iter().map(|p| at.normalized(p)).collect();
            let c = &mut self.per_view[k];
            c.state.extend_from_slice(&s.state);
            c.nab.add(sweep);
            c.point.add(&point);
            if c.nab.len() == 1 {
                c.point.threshold = point.threshold;
            }
            c.events.add(&events);
            views.push(ViewReport {
                view,
                point,
                best,
                events,
                nab_fixed,
                nab_best: Vec::new(),
            });
        }
        self.labels.extend_from_slice(&scores.labels);
        self.files.push(FileReport {
            name: scores.name,
            rows: scores.ts.len(),
            training_rows: scores.training_rows,
            labelled_training_rows: scores.labelled_training_rows,
            intervals: ivs.len(),
            views,
        });
        // Just pushed, so the list is not empty.
        Ok(&self.files[self.files.len() - 1])
    }

    /// The overall figures (best thresholds over all scored rows, NAB corpus thresholds), and each
    /// file's NAB score at the corpus thresholds.
    pub fn finish(mut self) -> CsvReport {
        let mut overall = Vec::with_capacity(self.views.len());
        for (k, &view) in self.views.iter().enumerate() {
            let vi = View::ALL.iter().position(|v| *v == view).unwrap_or(0);
            let c = &self.per_view[k];
            let report = c.nab.score();
            for (i, f) in self.files.iter_mut().enumerate() {
                f.views[k].nab_best = report
                    .profiles
                    .iter()
                    .map(|p| {
                        (
                            p.threshold,
                            p.files.get(i).and_then(|c| c.normalized(&p.profile)),
                        )
                    })
                    .collect();
            }
            let at = c.nab.counts_at(self.thresholds[vi]);
            overall.push(ViewReport {
                view,
                point: c.point,
                best: metrics::best_point(&c.state, &self.labels),
                events: c.events,
                nab_fixed: PROFILES.iter().map(|p| at.normalized(p)).collect(),
                nab_best: report
                    .profiles
                    .iter()
                    .map(|p| (p.threshold, p.normalized))
                    .collect(),
            });
        }
        CsvReport {
            rows: self.labels.len(),
            files: self.files,
            overall,
        }
    }
}

impl CsvReport {
    /// The JSON object of the overall figures, one key per view.
    pub fn overall_json(&self) -> serde_json::Value {
        let mut v = json!({});
        for view in &self.overall {
            v[view.view.name()] = view.to_json();
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(state: f64, event: bool, threshold: f64) -> ViewRow {
        ViewRow {
            state,
            alarm: if event { state } else { 0.0 },
            event,
            fired: state >= threshold,
        }
    }

    /// A file of `n` rows, one minute apart, labelled over `labelled`, with univariate and
    /// multivariate states from the closures.
    fn file(
        name: &str,
        n: i64,
        labelled: std::ops::Range<i64>,
        uni: impl Fn(i64) -> f64,
        multi: impl Fn(i64) -> f64,
    ) -> FileScores {
        let mut f = FileScores::new(name);
        f.training_row(&Row {
            ts_ms: -60_000,
            label: true,
            values: vec![],
        });
        let (mut prev_u, mut prev_m) = (0.0, 0.0);
        for i in 0..n {
            let row = Row {
                ts_ms: i * 60_000,
                label: labelled.contains(&i),
                values: vec![],
            };
            let (u, m) = (uni(i), multi(i));
            let (eu, em) = (u >= 0.5 && prev_u < 0.5, m >= 0.5 && prev_m < 0.5);
            let (vu, vm) = (view(u, eu, 0.5), view(m, em, 0.5));
            let s = RowScores {
                uni: vu,
                multi: vm,
                combined: ViewRow {
                    state: u.max(m),
                    alarm: vu.alarm.max(vm.alarm),
                    event: eu || em,
                    fired: vu.fired || vm.fired,
                },
                ..RowScores::default()
            };
            f.push(&row, &s);
            (prev_u, prev_m) = (u, m);
        }
        f
    }

    #[test]
    fn a_corpus_reports_each_view_per_file_and_overall() {
        let mut c = CsvCorpus::new(true, 0.5, 0.5, 0).unwrap();
        // File a: a labelled interval 100..110 that only the multivariate view sees, plus a
        // univariate false alarm at 50.
        let a = file(
            "a.csv",
            200,
            100..110,
            |i| if i == 50 { 0.9 } else { 0.1 },
            |i| {
                if (100..110).contains(&i) {
                    0.8
                } else {
                    0.2
                }
            },
        );
        let r = c.add(a).unwrap().clone();
        assert_eq!(
            (
                r.rows,
                r.training_rows,
                r.labelled_training_rows,
                r.intervals
            ),
            (200, 1, 1, 1)
        );
        let (u, m, k) = (&r.views[0], &r.views[1], &r.views[2]);
        assert_eq!((u.events.caught, u.events.false_alarms), (0, 1));
        assert_eq!((m.events.caught, m.events.false_alarms), (1, 0));
        assert_eq!(
            (k.events.caught, k.events.false_alarms, k.events.events),
            (1, 1, 2)
        );
        assert!((u.events.hours - 199.0 / 60.0).abs() < 1e-12);
        assert_eq!((m.point.tp, m.point.fp, m.point.fn_), (10, 0, 0));
        assert_eq!(m.best.unwrap().f1(), Some(1.0));
        assert_eq!(
            m.nab_fixed[0],
            Some(100.0 * (1.0 - -1.0) / 2.0),
            "the onset is the window's first row"
        );
        // File b: no labels, quiet.
        c.add(file("b.csv", 100, 0..0, |_| 0.1, |_| 0.1)).unwrap();
        let rep = c.finish();
        assert_eq!(rep.rows, 300);
        assert_eq!(rep.overall.len(), 3);
        let m = &rep.overall[1];
        assert_eq!(
            (m.point.tp, m.point.tn, m.point.threshold),
            (10, 290, Some(0.5))
        );
        assert_eq!(m.events.intervals, 1);
        assert_eq!(m.nab_best.len(), 3);
        assert_eq!(rep.files[0].views[1].nab_best.len(), 3);
        assert_eq!(
            rep.overall[2].point.threshold, None,
            "combined: either view's flag"
        );
        let j = rep.overall_json();
        assert_eq!(j["multivariate"]["events"]["recall"], 1.0);
        assert_eq!(j["univariate"]["events"]["false_alarms"], 1);
        assert!(
            rep.files[0].to_json()["combined"]["nab"]["standard"]["at_fixed_threshold"].is_number()
        );
    }

    #[test]
    fn univariate_only_and_bad_tolerance_and_repeated_timestamps() {
        assert!(CsvCorpus::new(false, 0.5, 0.5, -1).is_err());
        let mut c = CsvCorpus::new(false, 0.5, 0.5, 0).unwrap();
        assert_eq!(
            c.add(file("a.csv", 10, 2..4, |_| 0.0, |_| 0.0))
                .unwrap()
                .views
                .len(),
            1
        );
        assert_eq!(nab_windows(&[(1, 3), (3, 5), (7, 7)]), [(1, 5), (7, 7)]);
        let rep = c.finish();
        assert_eq!(rep.overall[0].events.recall(), Some(0.0));
        // An empty file scores nothing but does not fail.
        let mut c = CsvCorpus::new(true, 0.5, 0.5, 0).unwrap();
        assert_eq!(c.add(FileScores::new("e.csv")).unwrap().rows, 0);
        assert_eq!(c.finish().overall[0].best, None);
    }
}
