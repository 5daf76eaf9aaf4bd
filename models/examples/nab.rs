//! Scores one detector preset on a NAB-layout folder and prints the three normalised scores and their
//! thresholds — a quick loop for tuning detectors.
//!
//! ```text
//! cargo run --release -p edgewatch-models --example nab -- --data ../shared/datasets/nab --detector zscore
//! ```
//!
//! Only file reading lives here; parsing, replay and scoring are `edgewatch_models::eval::nab`, shared
//! with `edgewatch eval nab` (which adds parallelism, result files, JSON and a per-category table).
//! `--detector oracle` and `--detector null` score the labels themselves and all-zero scores: a
//! self-check that must print 100 and 0.

use edgewatch_models::detect::DetectorConfig;
use edgewatch_models::eval::nab::{self, FileSweep, NabCorpus};
use edgewatch_models::eval::EvalError;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

fn usage() -> String {
    format!(
        "usage: nab --data DIR [--detector NAME]\n  NAME: one of {}, or oracle, null",
        DetectorConfig::PRESETS.join(", ")
    )
}

fn csv_files(data: &Path) -> Result<Vec<(String, PathBuf)>, String> {
    let mut out = Vec::new();
    let read = |p: &Path| std::fs::read_dir(p).map_err(|e| format!("{}: {e}", p.display()));
    for cat in read(data)? {
        let cat = cat.map_err(|e| e.to_string())?.path();
        if !cat.is_dir() {
            continue;
        }
        for f in read(&cat)? {
            let f = f.map_err(|e| e.to_string())?.path();
            if f.extension().is_some_and(|e| e == "csv") {
                let rel = f.strip_prefix(data).map_err(|e| e.to_string())?;
                out.push((rel.to_string_lossy().replace('\\', "/"), f));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let (mut data, mut detector) = (None, "zscore".to_string());
    while let Some(a) = args.next() {
        match a.as_str() {
            "--data" => data = args.next().map(PathBuf::from),
            "--detector" => detector = args.next().ok_or_else(usage)?,
            "-h" | "--help" => return Err(usage()),
            other => return Err(format!("unknown argument {other:?}\n{}", usage())),
        }
    }
    let root = data.ok_or_else(usage)?;
    let config = match detector.as_str() {
        "oracle" | "null" => None,
        name => Some(DetectorConfig::preset(name).ok_or_else(|| {
            format!(
                "unknown detector {name:?}; valid: {}",
                DetectorConfig::PRESETS.join(", ")
            )
        })?),
    };
    let labels_path = root.join("labels/combined_windows.json");
    let labels_text = std::fs::read_to_string(&labels_path)
        .map_err(|e| format!("{}: {e}", labels_path.display()))?;
    let labels =
        nab::parse_labels(&labels_text).map_err(|e| format!("{}: {e}", labels_path.display()))?;

    let started = Instant::now();
    let mut corpus = NabCorpus::new();
    let mut readings = 0usize;
    for (name, path) in csv_files(&root.join("data"))? {
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let windows = labels
            .get(&name)
            .ok_or_else(|| format!("{name}: no entry in the labels"))?;
        let series = nab::parse_csv(&text).map_err(|e| match e {
            EvalError::Csv { line, detail } => format!("{}:{line}: {detail}", path.display()),
            other => format!("{}: {other}", path.display()),
        })?;
        let scores = match (&config, detector.as_str()) {
            (Some(c), _) => nab::replay(c, &series).map_err(|e| e.to_string())?,
            (None, "oracle") => nab::oracle_scores(&name, &series.timestamps_ms, windows)
                .map_err(|e| e.to_string())?,
            (None, _) => vec![0.0; series.len()],
        };
        readings += series.len();
        corpus.add(
            FileSweep::new(&name, &series.timestamps_ms, &scores, windows)
                .map_err(|e| e.to_string())?,
        );
    }
    let replayed = started.elapsed();
    let report = corpus.score();
    let total = started.elapsed();

    println!(
        "detector {detector}: {} files, {readings} readings, {:.0} readings/s (replay + scoring {:.2} s, sweep {:.3} s)",
        corpus.len(),
        readings as f64 / total.as_secs_f64(),
        total.as_secs_f64(),
        (total - replayed).as_secs_f64(),
    );
    println!(
        "{:<20} {:>7} {:>10} {:>9} {:>6} {:>6}",
        "profile", "score", "threshold", "detected", "FP", "raw"
    );
    for p in &report.profiles {
        println!(
            "{:<20} {:>7.2} {:>10.6} {:>4}/{:<4} {:>6} {:>6.2}",
            p.profile.name,
            p.normalized.unwrap_or(f64::NAN),
            p.threshold,
            p.counts.detected,
            p.counts.windows,
            p.counts.false_positives,
            p.raw,
        );
    }
    if let Some(c) = &config {
        let t = c.recommended_threshold();
        let counts = corpus.counts_at(t);
        let at: Vec<String> = nab::PROFILES
            .iter()
            .map(|p| format!("{:.2}", counts.normalized(p).unwrap_or(f64::NAN)))
            .collect();
        println!("at the recommended threshold {t:.3}: {}", at.join(" / "));
    }
    if config.is_none() {
        let want = if detector == "oracle" { 100.0 } else { 0.0 };
        for p in &report.profiles {
            let got = p.normalized.unwrap_or(f64::NAN);
            if (got - want).abs() > 1e-9 {
                return Err(format!(
                    "self-check failed: {detector} scored {got} under {}, expected {want}",
                    p.profile.name
                ));
            }
        }
        println!("self-check ok: {detector} scores {want} under every profile");
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
