//! `edgewatch eval nab`: lists a NAB-layout folder, replays every file through a detector (two
//! threads), optionally writes NAB result files, and renders the scores.
//!
//! File access, threads, timing and presentation live here; parsing, replay and the scoring rules are
//! `edgewatch_models::eval::nab`, so the `nab` example and this command cannot disagree.

use anyhow::{anyhow, bail, Context};
use edgewatch_models::detect::{Detector, DetectorConfig};
use edgewatch_models::eval::nab::{self as score, FileSweep, NabCorpus, NabReport, Window};
use edgewatch_models::eval::EvalError;
use serde_json::json;
use std::fmt::Write as _;
use std::io::{BufWriter, IsTerminal, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Where the per-row scores come from.
#[derive(Debug, Clone)]
pub enum ScoreSource {
    /// A detector built fresh for every file.
    Detector {
        /// Name used in output and result paths.
        name: String,
        /// Its parameters (boxed: a config is large next to the baselines).
        config: Box<DetectorConfig>,
    },
    /// Never fires (every score 0): normalises to 0.
    Null,
    /// Fires at each window's first scorable row, reading the labels: normalises to 100.
    Oracle,
}

impl ScoreSource {
    /// `None` → the default detector; a name from [`DetectorConfig::PRESETS`]; or `null` / `oracle`.
    pub fn from_name(name: Option<&str>) -> anyhow::Result<Self> {
        let (name, config) = match name {
            None => {
                let config = DetectorConfig::default();
                let name = config.build().context("default detector")?.name();
                (name.to_string(), config)
            }
            Some("null") => return Ok(Self::Null),
            Some("oracle") => return Ok(Self::Oracle),
            Some(n) => match DetectorConfig::preset(n) {
                Some(config) => (n.to_string(), config),
                None => bail!(
                    "unknown detector {n:?}; valid: {}; baselines: null, oracle",
                    DetectorConfig::PRESETS.join(", ")
                ),
            },
        };
        Ok(Self::Detector {
            name,
            config: Box::new(config),
        })
    }

    /// Name used in output and in result file paths.
    pub fn name(&self) -> &str {
        match self {
            Self::Detector { name, .. } => name,
            Self::Null => "null",
            Self::Oracle => "oracle",
        }
    }

    fn scores(
        &self,
        file: &str,
        series: &score::Series,
        windows: &[Window],
    ) -> Result<Vec<f64>, EvalError> {
        match self {
            Self::Detector { config, .. } => score::replay(config, series),
            Self::Null => Ok(vec![0.0; series.len()]),
            Self::Oracle => score::oracle_scores(file, &series.timestamps_ms, windows),
        }
    }
}

/// Progress of a run: files done out of the total, drawn in place on stderr.
pub struct Progress {
    draw: bool,
}

impl Progress {
    /// Draws on stderr if it is a terminal; silent otherwise (logs, pipes, tests).
    pub fn stderr() -> Self {
        Self {
            draw: std::io::stderr().is_terminal(),
        }
    }

    /// Never draws.
    pub fn silent() -> Self {
        Self { draw: false }
    }

    fn update(&self, done: usize, total: usize, detector: &str) {
        if !self.draw {
            return;
        }
        const WIDTH: usize = 30;
        let filled = (done * WIDTH).checked_div(total).unwrap_or(WIDTH);
        let bar: String = "#".repeat(filled) + &".".repeat(WIDTH - filled);
        eprint!("\r{detector} [{bar}] {done}/{total} files");
        // Progress is best effort: a closed stderr must not fail the evaluation.
        let _ = std::io::stderr().flush();
    }

    /// Clears the progress line.
    pub fn finish(&self) {
        if self.draw {
            eprint!("\r{}\r", " ".repeat(72));
        }
    }
}

/// The outcome of one `eval nab` run.
#[derive(Debug, Clone)]
pub struct NabRun {
    /// Detector (or baseline) name.
    pub detector: String,
    /// The dataset folder.
    pub data: PathBuf,
    /// Scores under the three profiles.
    pub report: NabReport,
    /// Readings replayed.
    pub readings: usize,
    /// Wall time of the whole run: reading, parsing, detection, result files and scoring.
    pub elapsed: Duration,
    /// Files named in the labels but absent from `data/` (not scored).
    pub unscored_labels: Vec<String>,
    /// For a detector: its recommended threshold and the normalised score of each profile there
    /// (what a deployment with that fixed threshold gets, rather than the hindsight optimum).
    pub at_recommended: Option<(f64, Vec<Option<f64>>)>,
}

/// Replays every `DIR/data/<category>/*.csv` through `source`, scores the corpus against
/// `DIR/labels/combined_windows.json`, and writes NAB result files under `results` if given.
pub fn evaluate_nab(
    dir: &Path,
    source: &ScoreSource,
    results: Option<&Path>,
    progress: &Progress,
) -> anyhow::Result<NabRun> {
    let started = Instant::now();
    let labels_path = dir.join("labels").join("combined_windows.json");
    let labels_text = std::fs::read_to_string(&labels_path)
        .with_context(|| format!("{}: cannot read the labels", labels_path.display()))?;
    let labels =
        score::parse_labels(&labels_text).map_err(|e| anyhow!("{}: {e}", labels_path.display()))?;
    let files = data_files(&dir.join("data"))?;
    if files.is_empty() {
        bail!("{}: no data/<category>/*.csv files", dir.display());
    }
    let unscored_labels = labels
        .keys()
        .filter(|k| !files.iter().any(|(name, _)| name == *k))
        .cloned()
        .collect();

    // Two workers pull file indices from a shared counter; results land in their slot, so the report
    // does not depend on which thread finished first.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(2));
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let slots: Mutex<Vec<Option<FileOutcome>>> =
        Mutex::new((0..files.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((name, path)) = files.get(i) else {
                    break;
                };
                let outcome = score_file(name, path, &labels, source, results);
                let failed = outcome.is_err();
                if let Ok(mut slots) = slots.lock() {
                    slots[i] = Some(outcome);
                }
                if failed {
                    // Stop handing out files; the first error in file order is reported.
                    next.store(files.len(), Ordering::Relaxed);
                }
                progress.update(
                    done.fetch_add(1, Ordering::Relaxed) + 1,
                    files.len(),
                    source.name(),
                );
            });
        }
    });

    let slots = slots
        .into_inner()
        .map_err(|_| anyhow!("a replay thread panicked"))?;
    let mut corpus = NabCorpus::new();
    let mut readings = 0;
    for (slot, (name, _)) in slots.into_iter().zip(&files) {
        let (sweep, rows) = slot.ok_or_else(|| anyhow!("{name}: not replayed"))??;
        readings += rows;
        corpus.add(sweep);
    }
    let report = corpus.score();
    let at_recommended = match source {
        ScoreSource::Detector { config, .. } => {
            let t = config.recommended_threshold();
            let counts = corpus.counts_at(t);
            let scores = score::PROFILES
                .iter()
                .map(|p| counts.normalized(p))
                .collect();
            Some((t, scores))
        }
        ScoreSource::Null | ScoreSource::Oracle => None,
    };
    Ok(NabRun {
        detector: source.name().to_string(),
        data: dir.to_path_buf(),
        report,
        readings,
        elapsed: started.elapsed(),
        unscored_labels,
        at_recommended,
    })
}

/// One file's sweep and row count, or why it failed.
type FileOutcome = anyhow::Result<(FileSweep, usize)>;

/// `(category/file.csv, path)` of every CSV one level below `data`, sorted by name.
fn data_files(data: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let entries = |p: &Path| {
        std::fs::read_dir(p).with_context(|| format!("{}: cannot list the folder", p.display()))
    };
    for category in entries(data)? {
        let category = category
            .with_context(|| format!("{}", data.display()))?
            .path();
        if !category.is_dir() {
            continue;
        }
        let cat_name = file_name(&category)?;
        for file in entries(&category)? {
            let path = file
                .with_context(|| format!("{}", category.display()))?
                .path();
            if path.is_file() && path.extension().is_some_and(|e| e == "csv") {
                out.push((format!("{cat_name}/{}", file_name(&path)?), path));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn file_name(p: &Path) -> anyhow::Result<String> {
    p.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| anyhow!("{}: name is not UTF-8", p.display()))
}

/// Reads, replays and sweeps one file; writes its result file if asked. Returns the sweep and its rows.
fn score_file(
    name: &str,
    path: &Path,
    labels: &score::Labels,
    source: &ScoreSource,
    results: Option<&Path>,
) -> anyhow::Result<(FileSweep, usize)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let series = score::parse_csv(&text).map_err(|e| match e {
        EvalError::Csv { line, detail } => anyhow!("{}:{line}: {detail}", path.display()),
        other => anyhow!("{}: {other}", path.display()),
    })?;
    let windows = labels.get(name).ok_or_else(|| {
        anyhow!(
            "{}: {}",
            path.display(),
            EvalError::Unlabelled(name.to_string())
        )
    })?;
    let scores = source.scores(name, &series, windows)?;
    let sweep = FileSweep::new(name, &series.timestamps_ms, &scores, windows)?;
    if let Some(out) = results {
        write_results(out, source.name(), name, &series, &scores, windows)?;
    }
    Ok((sweep, series.len()))
}

/// Writes `out/<detector>/<category>/<detector>_<file>.csv` in NAB's result layout.
fn write_results(
    out: &Path,
    detector: &str,
    name: &str,
    series: &score::Series,
    scores: &[f64],
    windows: &[Window],
) -> anyhow::Result<()> {
    let (category, file) = name.split_once('/').unwrap_or(("", name));
    let folder = out.join(detector).join(category);
    std::fs::create_dir_all(&folder)
        .with_context(|| format!("{}: cannot create the folder", folder.display()))?;
    let path = folder.join(format!("{detector}_{file}"));
    let mut label = vec![0u8; series.len()];
    for (first, last) in score::window_rows(name, &series.timestamps_ms, windows)? {
        label[first..=last].iter_mut().for_each(|l| *l = 1);
    }
    let write = || -> std::io::Result<()> {
        let mut w = BufWriter::new(std::fs::File::create(&path)?);
        writeln!(w, "timestamp,value,anomaly_score,label")?;
        for i in 0..series.len() {
            writeln!(
                w,
                "{},{},{},{}",
                score::format_timestamp(series.timestamps_ms[i]),
                series.values[i],
                scores[i],
                label[i]
            )?;
        }
        w.into_inner().map_err(|e| e.into_error())?.sync_all()
    };
    write().with_context(|| format!("{}: cannot write results", path.display()))
}

fn fmt_score(x: Option<f64>) -> String {
    x.map_or_else(|| "n/a".to_string(), |v| format!("{v:.2}"))
}

impl NabRun {
    /// Readings replayed per second of wall time (whole run).
    pub fn readings_per_second(&self) -> f64 {
        self.readings as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `--json` object: normalised scores under the profile names, thresholds, raw scores,
    /// counts, categories and throughput.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = json!({
            "detector": self.detector,
            "data": self.data.display().to_string(),
            "files": self.report.files.len(),
            "readings": self.readings,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "readings_per_second": self.readings_per_second(),
            "unscored_labels": self.unscored_labels,
        });
        let (mut thresholds, mut raw, mut detail) = (json!({}), json!({}), json!({}));
        for p in &self.report.profiles {
            let name = p.profile.name;
            v[name] = json!(p.normalized);
            thresholds[name] = json!(p.threshold);
            raw[name] = json!(p.raw);
            detail[name] = json!({
                "threshold": p.threshold,
                "raw": p.raw,
                "null": p.null,
                "perfect": p.perfect,
                "normalized": p.normalized,
                "windows": p.counts.windows,
                "windows_in_labels": p.counts.windows_in_labels,
                "detected": p.counts.detected,
                "false_positives": p.counts.false_positives,
            });
        }
        if let Some((t, scores)) = &self.at_recommended {
            let mut at = json!({ "threshold": t });
            for (p, s) in score::PROFILES.iter().zip(scores) {
                at[p.name] = json!(s);
            }
            v["at_recommended_threshold"] = at;
        }
        v["thresholds"] = thresholds;
        v["raw"] = raw;
        v["profiles"] = detail;
        v["categories"] = self
            .report
            .by_category()
            .iter()
            .map(|g| {
                let mut c = json!({ "category": g.name, "files": g.files });
                for (p, counts) in self.report.profiles.iter().zip(&g.counts) {
                    c[p.profile.name] = json!({
                        "normalized": counts.normalized(&p.profile),
                        "raw": counts.score(&p.profile),
                        "windows": counts.windows,
                        "detected": counts.detected,
                        "false_positives": counts.false_positives,
                    });
                }
                c
            })
            .collect();
        v
    }

    /// The human-readable report: the three profiles, then one row per category.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let r = &self.report;
        // Writing to a String cannot fail; the results are ignored for that reason.
        let _ = writeln!(
            s,
            "NAB: detector {} on {} — {} files, {} readings, {:.2} s, {:.0} readings/s\n",
            self.detector,
            self.data.display(),
            r.files.len(),
            self.readings,
            self.elapsed.as_secs_f64(),
            self.readings_per_second()
        );
        let _ = writeln!(
            s,
            "{:<20} {:>6} {:>10} {:>9} {:>9} {:>7}",
            "profile", "score", "threshold", "raw", "detected", "FP"
        );
        for p in &r.profiles {
            let _ = writeln!(
                s,
                "{:<20} {:>6} {:>10.6} {:>9.2} {:>9} {:>7}",
                p.profile.name,
                fmt_score(p.normalized),
                p.threshold,
                p.raw,
                format!("{}/{}", p.counts.detected, p.counts.windows),
                p.counts.false_positives
            );
        }
        if let Some((t, scores)) = &self.at_recommended {
            let list: Vec<String> = scores.iter().map(|x| fmt_score(*x)).collect();
            let _ = writeln!(
                s,
                "at the detector's recommended threshold {t:.3} (as deployed): {}",
                list.join(" / ")
            );
        }
        let _ = writeln!(
            s,
            "\nper category (normalised within the category, at the corpus thresholds; \
             detected and FP under standard)"
        );
        let _ = writeln!(
            s,
            "{:<22} {:>5} {:>9} {:>6} {:>8} {:>8} {:>8}",
            "category", "files", "detected", "FP", "standard", "low FP", "low FN"
        );
        for g in r.by_category() {
            let score = |i: usize| {
                fmt_score(
                    r.profiles
                        .get(i)
                        .zip(g.counts.get(i))
                        .and_then(|(p, c)| c.normalized(&p.profile)),
                )
            };
            let std = g.counts.first().copied().unwrap_or_default();
            let _ = writeln!(
                s,
                "{:<22} {:>5} {:>9} {:>6} {:>8} {:>8} {:>8}",
                g.name,
                g.files,
                format!("{}/{}", std.detected, std.windows),
                std.false_positives,
                score(0),
                score(1),
                score(2)
            );
        }
        if !self.unscored_labels.is_empty() {
            let _ = writeln!(
                s,
                "\nnot scored: {} labelled file(s) missing from data/ (first: {})",
                self.unscored_labels.len(),
                self.unscored_labels[0]
            );
        }
        s
    }
}
