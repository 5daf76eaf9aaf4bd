//! The NAB scoring rules of `shared/datasets/nab/SCORING.md`: per-row sweep values for one file
//! ([`FileSweep`]), then one corpus-wide threshold per profile found by an exact sweep ([`NabCorpus`]).
//!
//! Each scorable row is reduced once to (score, window or none, unweighted value), where the value is
//! `σ(y)/σ(−1)` inside a window and `σ(y)` (or −1) outside. Every profile's score at a threshold is then
//! `A_TP·Σ best-in-window + A_FP·Σ false-positive values − A_FN·missed windows`, so one descending pass
//! over the rows sorted by score evaluates all three profiles at every distinct threshold.

use super::super::EvalError;
use super::parse::Window;
use super::{Profile, PROFILES};
use serde::Serialize;

/// The threshold reported when never firing scores best: above any score in [0, 1], as NAB reports it.
pub const NEVER_FIRE_THRESHOLD: f64 = 1.1;

const NO_WINDOW: u32 = u32::MAX;

/// NAB's scaled sigmoid: `2 / (1 + e^(5y)) − 1`, and −1 past `y > 3`.
pub fn scaled_sigmoid(y: f64) -> f64 {
    if y > 3.0 {
        -1.0
    } else {
        2.0 / (1.0 + (5.0 * y).exp()) - 1.0
    }
}

/// Rows at the start of a file that are ignored: `min(floor(0.15 × rows), 750)`.
pub fn probation_rows(rows: usize) -> usize {
    // floor(0.15 × rows) computed in integers, so it is exact for every row count.
    (rows * 15 / 100).min(750)
}

/// Maps each window to its first and last row index (inclusive). As in NAB, each bound must be the
/// timestamp of a row and is located at the first row carrying it (NAB's `list.index`: the data is
/// scored by row position, and a few files repeat timestamps). Windows must follow one another.
pub fn window_rows(
    file: &str,
    timestamps_ms: &[i64],
    windows: &[Window],
) -> Result<Vec<(usize, usize)>, EvalError> {
    let mut out: Vec<(usize, usize)> = Vec::with_capacity(windows.len());
    for (index, &(start, end)) in windows.iter().enumerate() {
        let bad = |detail: String| EvalError::Window {
            file: file.to_string(),
            index,
            detail,
        };
        let row = |ts: i64| {
            timestamps_ms.iter().position(|&t| t == ts).ok_or_else(|| {
                bad(format!(
                    "{} is not the timestamp of any row",
                    super::format_timestamp(ts)
                ))
            })
        };
        let (first, last) = (row(start)?, row(end)?);
        if first > last {
            return Err(bad(format!(
                "its end ({}) comes before its start ({})",
                super::format_timestamp(end),
                super::format_timestamp(start)
            )));
        }
        if let Some(&(_, prev_last)) = out.last() {
            if first <= prev_last {
                return Err(bad("overlaps or precedes the previous window".to_string()));
            }
        }
        out.push((first, last));
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy)]
struct SweepRow {
    score: f64,
    /// Index of the window (within its file, then within the corpus), or [`NO_WINDOW`].
    window: u32,
    /// `σ(y)/σ(−1)` inside a window, `σ(y)` (≤ 0) outside.
    value: f64,
}

/// One file reduced to its scorable rows, ready to be added to a [`NabCorpus`].
#[derive(Debug, Clone)]
pub struct FileSweep {
    name: String,
    rows: usize,
    windows_in_labels: usize,
    windows_counted: usize,
    /// Scorable (post-probation) rows, in file order.
    scorable: Vec<SweepRow>,
}

impl FileSweep {
    /// Applies the per-row rules to one file: `scores[i]` is the detector's score for row `i`.
    pub fn new(
        name: &str,
        timestamps_ms: &[i64],
        scores: &[f64],
        windows: &[Window],
    ) -> Result<Self, EvalError> {
        let rows = timestamps_ms.len();
        if scores.len() != rows {
            return Err(EvalError::LengthMismatch {
                file: name.to_string(),
                rows,
                scores: scores.len(),
            });
        }
        if let Some(row) = scores.iter().position(|s| s.is_nan()) {
            return Err(EvalError::BadScore {
                file: name.to_string(),
                row,
                score: scores[row],
            });
        }
        let spans = window_rows(name, timestamps_ms, windows)?;
        let probation = probation_rows(rows);
        let max_tp = scaled_sigmoid(-1.0);
        let mut scorable = Vec::with_capacity(rows - probation);
        // The most recent window that has ended: (last row, width).
        let mut prev: Option<(usize, usize)> = None;
        let mut next = 0usize;
        let mut windows_counted = 0usize;
        let mut i = 0usize;
        while i < rows {
            if let Some(&(first, last)) = spans.get(next).filter(|(first, _)| *first == i) {
                let width = last - first + 1;
                let w = next as u32;
                if last >= probation {
                    windows_counted += 1;
                }
                let rows_in = scores.iter().enumerate().take(last + 1);
                for (r, &score) in rows_in.skip(first.max(probation)) {
                    let y = -((last - r + 1) as f64) / width as f64;
                    scorable.push(SweepRow {
                        score,
                        window: w,
                        value: scaled_sigmoid(y) / max_tp,
                    });
                }
                prev = Some((last, width));
                next += 1;
                i = last + 1;
                continue;
            }
            if i >= probation {
                let value = match prev {
                    None => -1.0,
                    Some((last, 1)) if i > last => -1.0,
                    Some((last, width)) => scaled_sigmoid((i - last) as f64 / (width - 1) as f64),
                };
                scorable.push(SweepRow {
                    score: scores[i],
                    window: NO_WINDOW,
                    value,
                });
            }
            i += 1;
        }
        Ok(Self {
            name: name.to_string(),
            rows,
            windows_in_labels: windows.len(),
            windows_counted,
            scorable,
        })
    }

    /// The file's name as given.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Rows in the file, probation included.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Windows in the labels for this file.
    pub fn windows_in_labels(&self) -> usize {
        self.windows_in_labels
    }

    /// What the file scores when every row with a score ≥ `threshold` is a detection.
    pub fn counts_at(&self, threshold: f64) -> Counts {
        let mut best = vec![f64::NEG_INFINITY; self.windows_in_labels];
        let mut c = Counts {
            windows: self.windows_counted,
            windows_in_labels: self.windows_in_labels,
            ..Counts::default()
        };
        for row in self.scorable.iter().filter(|r| r.score >= threshold) {
            if row.window == NO_WINDOW {
                c.false_positives += 1;
                c.fp_sum += row.value;
            } else {
                let b = &mut best[row.window as usize];
                *b = b.max(row.value);
            }
        }
        for b in best.into_iter().filter(|b| b.is_finite()) {
            c.detected += 1;
            c.tp_sum += b;
        }
        c
    }
}

/// Detection counts and unweighted sums of one file or a group of files at one threshold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Counts {
    /// Windows that count (not entirely in probation).
    pub windows: usize,
    /// Windows in the labels, counting or not.
    pub windows_in_labels: usize,
    /// Windows with at least one detection.
    pub detected: usize,
    /// Detections outside every window.
    pub false_positives: usize,
    /// Σ over detected windows of the best `σ(y)/σ(−1)`; times `A_TP` gives their score.
    pub tp_sum: f64,
    /// Σ over false positives of `σ(y)` (≤ 0); times `A_FP` gives their score.
    pub fp_sum: f64,
}

impl Counts {
    /// The raw NAB score under `profile`.
    pub fn score(&self, profile: &Profile) -> f64 {
        profile.a_tp * self.tp_sum + profile.a_fp * self.fp_sum
            - profile.a_fn * (self.windows - self.detected) as f64
    }

    /// The score of never firing: `−A_FN` per counting window.
    pub fn null_score(&self, profile: &Profile) -> f64 {
        -profile.a_fn * self.windows as f64
    }

    /// The score of a perfect detector: `A_TP` per window in the labels.
    pub fn perfect_score(&self, profile: &Profile) -> f64 {
        profile.a_tp * self.windows_in_labels as f64
    }

    /// `100 × (S − S_null) / (S_perfect − S_null)`, or `None` when there are no windows to normalise by.
    pub fn normalized(&self, profile: &Profile) -> Option<f64> {
        let null = self.null_score(profile);
        let span = self.perfect_score(profile) - null;
        (span > 0.0).then(|| 100.0 * (self.score(profile) - null) / span)
    }

    /// Adds another file's counts to these.
    pub fn add(&mut self, other: &Counts) {
        self.windows += other.windows;
        self.windows_in_labels += other.windows_in_labels;
        self.detected += other.detected;
        self.false_positives += other.false_positives;
        self.tp_sum += other.tp_sum;
        self.fp_sum += other.fp_sum;
    }
}

/// One profile's result over the corpus.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProfileScore {
    /// The profile.
    pub profile: Profile,
    /// The corpus threshold maximising the raw score ([`NEVER_FIRE_THRESHOLD`] if never firing wins).
    pub threshold: f64,
    /// Raw score `S` at that threshold (the sum of the file scores).
    pub raw: f64,
    /// `S_null`.
    pub null: f64,
    /// `S_perfect`.
    pub perfect: f64,
    /// The normalised score, `None` when the corpus has no window.
    pub normalized: Option<f64>,
    /// Corpus counts at the threshold.
    pub counts: Counts,
    /// Per-file counts at the threshold, in the order of [`NabReport::files`].
    pub files: Vec<Counts>,
}

/// The scores of a corpus under every profile.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NabReport {
    /// File names in the order they were added.
    pub files: Vec<String>,
    /// Scorable rows swept.
    pub scorable_rows: usize,
    /// One entry per profile of [`PROFILES`], in that order.
    pub profiles: Vec<ProfileScore>,
}

/// A group of files (a NAB category) scored at each profile's corpus threshold.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupScore {
    /// Group name, e.g. `realTweets`.
    pub name: String,
    /// Files in the group.
    pub files: usize,
    /// Counts per profile, in the order of [`PROFILES`].
    pub counts: Vec<Counts>,
}

impl NabReport {
    /// Scores grouped by the first path component of each file name (NAB's category), sorted by name.
    pub fn by_category(&self) -> Vec<GroupScore> {
        let mut groups: Vec<GroupScore> = Vec::new();
        for (i, file) in self.files.iter().enumerate() {
            let name = file.split_once('/').map_or("", |(c, _)| c);
            let pos = match groups.iter().position(|g| g.name == name) {
                Some(p) => p,
                None => {
                    groups.push(GroupScore {
                        name: name.to_string(),
                        files: 0,
                        counts: vec![Counts::default(); self.profiles.len()],
                    });
                    groups.len() - 1
                }
            };
            let g = &mut groups[pos];
            g.files += 1;
            for (c, p) in g.counts.iter_mut().zip(&self.profiles) {
                c.add(&p.files[i]);
            }
        }
        groups.sort_by(|a, b| a.name.cmp(&b.name));
        groups
    }
}

/// A set of files to score together, with one threshold per profile for all of them.
#[derive(Debug, Clone, Default)]
pub struct NabCorpus {
    files: Vec<FileSweep>,
}

impl NabCorpus {
    /// An empty corpus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one file; files are reported in the order they were added.
    pub fn add(&mut self, file: FileSweep) {
        self.files.push(file);
    }

    /// Files added so far.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether no file was added.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Corpus counts when every row scoring at least `threshold` is a detection — for a detector's
    /// fixed operating threshold rather than the hindsight one [`NabCorpus::score`] picks.
    pub fn counts_at(&self, threshold: f64) -> Counts {
        let mut total = Counts::default();
        for f in &self.files {
            total.add(&f.counts_at(threshold));
        }
        total
    }

    /// Finds each profile's best corpus threshold by one sweep over all scorable rows sorted by score,
    /// then scores every file at it.
    pub fn score(&self) -> NabReport {
        let thresholds = self.sweep();
        let profiles = PROFILES
            .iter()
            .zip(thresholds)
            .map(|(profile, threshold)| {
                let files: Vec<Counts> =
                    self.files.iter().map(|f| f.counts_at(threshold)).collect();
                let mut counts = Counts::default();
                files.iter().for_each(|c| counts.add(c));
                ProfileScore {
                    profile: *profile,
                    threshold,
                    raw: counts.score(profile),
                    null: counts.null_score(profile),
                    perfect: counts.perfect_score(profile),
                    normalized: counts.normalized(profile),
                    counts,
                    files,
                }
            })
            .collect();
        NabReport {
            files: self.files.iter().map(|f| f.name.clone()).collect(),
            scorable_rows: self.files.iter().map(|f| f.scorable.len()).sum(),
            profiles,
        }
    }

    /// The best threshold of each profile in [`PROFILES`]; ties go to the higher threshold, as in NAB.
    fn sweep(&self) -> [f64; 3] {
        let mut rows: Vec<SweepRow> =
            Vec::with_capacity(self.files.iter().map(|f| f.scorable.len()).sum());
        let mut offset = 0u32;
        for f in &self.files {
            rows.extend(f.scorable.iter().map(|r| SweepRow {
                window: if r.window == NO_WINDOW {
                    NO_WINDOW
                } else {
                    r.window + offset
                },
                ..*r
            }));
            // Window indices are per file; the corpus has far fewer than u32::MAX windows.
            offset += f.windows_in_labels as u32;
        }
        rows.sort_unstable_by(|a, b| b.score.total_cmp(&a.score));

        let windows: usize = self.files.iter().map(|f| f.windows_counted).sum();
        let mut best = vec![f64::NEG_INFINITY; offset as usize];
        let (mut tp_sum, mut fp_sum, mut detected) = (0.0f64, 0.0f64, 0usize);
        let score = |p: &Profile, tp: f64, fp: f64, found: usize| {
            p.a_tp * tp + p.a_fp * fp - p.a_fn * (windows - found) as f64
        };
        let mut result: [(f64, f64); 3] =
            PROFILES.map(|p| (NEVER_FIRE_THRESHOLD, score(&p, 0.0, 0.0, 0)));
        let mut i = 0;
        while i < rows.len() {
            let threshold = rows[i].score;
            while i < rows.len() && rows[i].score == threshold {
                let r = rows[i];
                if r.window == NO_WINDOW {
                    fp_sum += r.value;
                } else {
                    let b = &mut best[r.window as usize];
                    if *b == f64::NEG_INFINITY {
                        detected += 1;
                        tp_sum += r.value;
                        *b = r.value;
                    } else if r.value > *b {
                        tp_sum += r.value - *b;
                        *b = r.value;
                    }
                }
                i += 1;
            }
            for (p, slot) in PROFILES.iter().zip(result.iter_mut()) {
                let s = score(p, tp_sum, fp_sum, detected);
                if s > slot.1 {
                    *slot = (threshold, s);
                }
            }
        }
        result.map(|(t, _)| t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const STD: Profile = PROFILES[0];
    const LOW_FP: Profile = PROFILES[1];
    const LOW_FN: Profile = PROFILES[2];

    /// `rows` rows one second apart; windows given by first and last row index.
    fn file(rows: usize, windows: &[(usize, usize)]) -> (Vec<i64>, Vec<Window>) {
        let ts: Vec<i64> = (0..rows as i64).map(|i| i * 1000).collect();
        let w = windows.iter().map(|&(a, b)| (ts[a], ts[b])).collect();
        (ts, w)
    }

    /// Scores a 100-row file (probation 15) with one window at rows 40..=49 and detections at `hits`.
    fn one_window(hits: &[usize]) -> Counts {
        scored(100, &[(40, 49)], hits)
    }

    fn scored(rows: usize, windows: &[(usize, usize)], hits: &[usize]) -> Counts {
        let (ts, w) = file(rows, windows);
        let mut scores = vec![0.0; rows];
        hits.iter().for_each(|&i| scores[i] = 1.0);
        FileSweep::new("t/f.csv", &ts, &scores, &w)
            .unwrap()
            .counts_at(0.5)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn probation_is_fifteen_percent_capped_at_750_rows() {
        assert_eq!(probation_rows(0), 0);
        assert_eq!(probation_rows(6), 0);
        assert_eq!(probation_rows(7), 1);
        assert_eq!(probation_rows(100), 15);
        assert_eq!(probation_rows(4999), 749);
        assert_eq!(probation_rows(5000), 750);
        assert_eq!(probation_rows(22_695), 750);
    }

    #[test]
    fn scaled_sigmoid_matches_the_published_values() {
        assert!((scaled_sigmoid(-1.0) - 0.986_614_298_151_430_3).abs() < 1e-12);
        assert_eq!(scaled_sigmoid(0.0), 0.0);
        assert!(close(scaled_sigmoid(1.0), -scaled_sigmoid(-1.0)));
        assert!(scaled_sigmoid(3.0) > -1.0);
        assert_eq!(scaled_sigmoid(3.000_001), -1.0);
    }

    #[test]
    fn detection_at_a_windows_first_row_scores_a_tp() {
        let c = one_window(&[40]);
        assert_eq!((c.windows, c.detected, c.false_positives), (1, 1, 0));
        for p in PROFILES {
            assert!(close(c.score(&p), p.a_tp), "{}", p.name);
        }
    }

    #[test]
    fn only_the_first_detection_in_a_window_counts() {
        let c = one_window(&[42, 45, 49]);
        assert_eq!((c.detected, c.false_positives), (1, 0));
        let want = scaled_sigmoid(-0.8) / scaled_sigmoid(-1.0);
        assert!(close(c.score(&STD), want), "{} vs {want}", c.score(&STD));
        // A later detection alone is worth less, the last row least of all but still positive.
        let last = one_window(&[49]).score(&STD);
        assert!(close(last, scaled_sigmoid(-0.1) / scaled_sigmoid(-1.0)));
        assert!(0.0 < last && last < want && want < 1.0);
    }

    #[test]
    fn a_missed_window_costs_a_fn() {
        let c = one_window(&[]);
        assert_eq!((c.windows, c.detected), (1, 0));
        assert_eq!(c.score(&STD), -1.0);
        assert_eq!(c.score(&LOW_FP), -1.0);
        assert_eq!(c.score(&LOW_FN), -2.0);
    }

    #[test]
    fn false_positives_right_after_a_window_cost_little_and_far_ones_a_fp() {
        // Row 50 is one row past the window's last row (49): y = 1 / (W − 1) = 1/9.
        let near = one_window(&[40, 50]);
        assert_eq!(near.false_positives, 1);
        let fp = STD.a_fp * scaled_sigmoid(1.0 / 9.0);
        assert!(close(near.score(&STD), 1.0 + fp));
        assert!(-0.04 < fp && fp < 0.0, "{fp}");
        // Cost grows with distance: row 55 (y = 6/9) costs more than row 50.
        assert!(one_window(&[40, 55]).score(&STD) < near.score(&STD));
        // Row 99 is 50 rows past: y = 50/9 > 3, a full −A_FP.
        let far = one_window(&[40, 99]);
        assert!(close(far.score(&STD), 1.0 - 0.11));
        assert!(close(far.score(&LOW_FP), 1.0 - 0.22));
        // Before any window has ended, every false positive costs a full −A_FP.
        let early = one_window(&[20, 40]);
        assert!(close(early.score(&STD), 1.0 - 0.11));
        assert!(close(early.score(&LOW_FN), 1.0 - 0.11));
    }

    #[test]
    fn false_positive_after_a_one_row_window_costs_a_full_a_fp() {
        let c = scored(100, &[(40, 40)], &[40, 41]);
        assert!(close(c.score(&STD), 1.0 - 0.11));
    }

    #[test]
    fn probation_rows_are_ignored() {
        // 100 rows: rows 0..15 are probation. A detection there is no false positive.
        let c = one_window(&[3, 14, 40]);
        assert_eq!(c.false_positives, 0);
        assert!(close(c.score(&STD), 1.0));
        // A window entirely in probation neither hits nor misses...
        let c = scored(100, &[(2, 10)], &[5]);
        assert_eq!((c.windows, c.windows_in_labels, c.detected), (0, 1, 0));
        assert_eq!(c.score(&STD), 0.0);
        // ...but it is still the previous window for the false positives after it (as in NAB).
        let c = scored(100, &[(2, 10)], &[16]);
        assert!(close(c.score(&STD), 0.11 * scaled_sigmoid(6.0 / 8.0)));
        // A window that starts in probation counts; only its rows after probation can hit it.
        let c = scored(100, &[(10, 20)], &[12]);
        assert_eq!((c.windows, c.detected), (1, 0));
        assert_eq!(c.score(&STD), -1.0);
        let c = scored(100, &[(10, 20)], &[15]);
        assert_eq!(c.detected, 1);
        assert!(close(
            c.score(&STD),
            scaled_sigmoid(-6.0 / 11.0) / scaled_sigmoid(-1.0)
        ));
    }

    #[test]
    fn normalised_score_spans_null_to_perfect() {
        let c = one_window(&[]);
        assert_eq!(c.null_score(&STD), -1.0);
        assert_eq!(c.perfect_score(&STD), 1.0);
        assert_eq!(c.normalized(&STD), Some(0.0));
        assert_eq!(one_window(&[40]).normalized(&LOW_FN), Some(100.0));
        assert_eq!(scored(100, &[], &[50]).normalized(&STD), None);
    }

    /// Rows, windows (first and last row) and scores of one test file.
    type TestFile = (usize, Vec<(usize, usize)>, Vec<f64>);

    fn corpus(files: &[TestFile]) -> NabCorpus {
        let mut c = NabCorpus::new();
        for (i, (rows, windows, scores)) in files.iter().enumerate() {
            let (ts, w) = file(*rows, windows);
            c.add(FileSweep::new(&format!("c{}/f{i}.csv", i % 2), &ts, scores, &w).unwrap());
        }
        c
    }

    #[test]
    fn threshold_sweep_finds_the_maximum() {
        // One window at rows 40..=49. Score 0.9 hits it at its first row; 0.7 adds a far false positive
        // (row 90); 0.5 marks every row. The best threshold is therefore 0.9.
        let mut scores = vec![0.5; 100];
        scores[40] = 0.9;
        scores[90] = 0.7;
        let r = corpus(&[(100, vec![(40, 49)], scores)]).score();
        for p in &r.profiles {
            assert_eq!(p.threshold, 0.9, "{}", p.profile.name);
            assert!(close(p.raw, 1.0));
            assert_eq!(p.normalized, Some(100.0));
        }
        // When the hit costs more in false positives than the window is worth, never firing wins.
        let mut scores = vec![0.0; 100];
        scores[40] = 1.0;
        (20..35).for_each(|i| scores[i] = 1.0);
        let r = corpus(&[(100, vec![(40, 49)], scores)]).score();
        assert_eq!(
            r.profiles[0].threshold, 1.0,
            "15 × 0.11 = 1.65 < 2: still worth it"
        );
        assert_eq!(
            r.profiles[1].threshold, NEVER_FIRE_THRESHOLD,
            "15 × 0.22 = 3.3 > 2"
        );
        assert_eq!(r.profiles[1].normalized, Some(0.0));
    }

    #[test]
    fn null_scores_zero_and_oracle_one_hundred() {
        let files = [
            (200, vec![(50, 59), (120, 150)]),
            (100, vec![]),
            (1000, vec![(140, 160), (500, 600)]),
        ];
        let null = corpus(&files.clone().map(|(r, w)| (r, w, vec![0.0; r]))).score();
        let oracle = corpus(&files.clone().map(|(r, w)| {
            let (ts, win) = file(r, &w);
            let s = super::super::oracle_scores("f", &ts, &win).unwrap();
            (r, w, s)
        }))
        .score();
        for (n, o) in null.profiles.iter().zip(&oracle.profiles) {
            assert_eq!(n.normalized, Some(0.0));
            assert_eq!(n.threshold, NEVER_FIRE_THRESHOLD);
            // The window at rows 140..=160 of the 1000-row file starts in probation (150 rows), so even
            // the oracle hits it late: 100 needs every window to start after probation.
            let o = o.normalized.unwrap();
            assert!(o < 100.0 && o > 95.0, "{o}");
        }
        let files = [(200, vec![(50, 59), (120, 150)]), (1000, vec![(500, 600)])];
        let oracle = corpus(&files.map(|(r, w)| {
            let (ts, win) = file(r, &w);
            let s = super::super::oracle_scores("f", &ts, &win).unwrap();
            (r, w, s)
        }))
        .score();
        assert!(oracle.profiles.iter().all(|p| p.normalized == Some(100.0)));
    }

    #[test]
    fn categories_sum_their_files() {
        let r = corpus(&[
            (100, vec![(40, 49)], one_hot(100, 40)),
            (100, vec![(40, 49)], vec![0.0; 100]),
            (100, vec![(60, 69)], one_hot(100, 60)),
        ])
        .score();
        let cats = r.by_category();
        assert_eq!(cats.len(), 2);
        assert_eq!((cats[0].name.as_str(), cats[0].files), ("c0", 2));
        assert_eq!(
            (cats[0].counts[0].windows, cats[0].counts[0].detected),
            (2, 2)
        );
        assert_eq!(
            (cats[1].counts[0].windows, cats[1].counts[0].detected),
            (1, 0)
        );
    }

    fn one_hot(rows: usize, at: usize) -> Vec<f64> {
        let mut s = vec![0.0; rows];
        s[at] = 1.0;
        s
    }

    #[test]
    fn bad_input_is_reported_with_the_file() {
        let (ts, _) = file(10, &[]);
        let e = FileSweep::new("a/b.csv", &ts, &[0.0; 9], &[]).unwrap_err();
        assert_eq!(e.to_string(), "a/b.csv: 9 scores for 10 rows");
        let mut s = vec![0.0; 10];
        s[3] = f64::NAN;
        assert!(matches!(
            FileSweep::new("a/b.csv", &ts, &s, &[]),
            Err(EvalError::BadScore { row: 3, .. })
        ));
        let e = FileSweep::new("a/b.csv", &ts, &[0.0; 10], &[(500, 2000)]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("a/b.csv: window 0: 1970-01-01 00:00:00.500 is not"),
            "{e}"
        );
        let e = FileSweep::new("a/b.csv", &ts, &[0.0; 10], &[(3000, 1000)]).unwrap_err();
        assert!(e.to_string().contains("comes before its start"), "{e}");
        let e =
            FileSweep::new("a/b.csv", &ts, &[0.0; 10], &[(1000, 3000), (3000, 4000)]).unwrap_err();
        assert!(e.to_string().contains("overlaps"), "{e}");
    }

    #[test]
    fn repeated_timestamps_locate_windows_at_their_first_row() {
        let ts = [0, 1000, 2000, 2000, 3000, 2000];
        assert_eq!(
            window_rows("f", &ts, &[(2000, 3000)]).unwrap(),
            vec![(2, 4)]
        );
    }

    /// Brute force: the corpus score at `t` from per-file counts.
    fn corpus_score_at(c: &NabCorpus, p: &Profile, t: f64) -> f64 {
        c.files.iter().map(|f| f.counts_at(t).score(p)).sum()
    }

    proptest! {
        #[test]
        fn sweep_matches_brute_force_over_every_threshold(
            files in prop::collection::vec(
                (20usize..120, prop::collection::vec(0u8..5, 120), 0usize..3),
                1..5,
            ),
        ) {
            let files: Vec<TestFile> = files
                .into_iter()
                .map(|(rows, s, nw)| {
                    let windows = (0..nw)
                        .map(|k| (k * rows / 3 + 1, k * rows / 3 + rows / 8 + 1))
                        .collect();
                    (rows, windows, s[..rows].iter().map(|&x| f64::from(x) / 4.0).collect())
                })
                .collect();
            let c = corpus(&files);
            let r = c.score();
            for p in &r.profiles {
                let mut best = corpus_score_at(&c, &p.profile, NEVER_FIRE_THRESHOLD);
                for t in [0.0, 0.25, 0.5, 0.75, 1.0] {
                    best = best.max(corpus_score_at(&c, &p.profile, t));
                }
                prop_assert!((p.raw - best).abs() < 1e-9, "{}: sweep {} brute {}", p.profile.name, p.raw, best);
                prop_assert!((corpus_score_at(&c, &p.profile, p.threshold) - p.raw).abs() < 1e-9);
                prop_assert!((c.counts_at(p.threshold).score(&p.profile) - p.raw).abs() < 1e-9);
            }
        }
    }
}
