//! `edgewatch eval nab` end to end: the null and oracle baselines on the real NAB corpus, and a small
//! synthetic NAB-layout folder for the result-file layout, the JSON keys and the error messages.
//!
//! The corpus is found at `$EDGEWATCH_NAB_DIR`, else `$CARGO_MANIFEST_DIR/../shared/datasets/nab`
//! (CI clones the repo with `shared/` beside it). A missing corpus fails the test: it never skips.

use edgewatch::eval::{evaluate_nab, nab::Progress, ScoreSource};
use edgewatch_models::detect::{Detector, DetectorConfig};
use std::path::{Path, PathBuf};
use std::process::Command;

fn nab_dir() -> PathBuf {
    let dir = std::env::var_os("EDGEWATCH_NAB_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/datasets/nab"),
        PathBuf::from,
    );
    assert!(
        dir.join("labels/combined_windows.json").is_file(),
        "NAB corpus not found at {} (set EDGEWATCH_NAB_DIR or put shared/ beside the repo)",
        dir.display()
    );
    dir
}

fn edgewatch(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_edgewatch"))
        .args(args)
        .output()
        .expect("run the edgewatch binary")
}

#[test]
fn null_scores_zero_and_oracle_one_hundred_on_the_real_corpus() {
    let dir = nab_dir();
    let null = evaluate_nab(&dir, &ScoreSource::Null, None, &Progress::silent()).unwrap();
    assert_eq!(null.report.files.len(), 58);
    assert!(null.readings > 365_000, "{}", null.readings);
    assert!(null.unscored_labels.is_empty());
    let oracle = evaluate_nab(&dir, &ScoreSource::Oracle, None, &Progress::silent()).unwrap();
    for (n, o) in null.report.profiles.iter().zip(&oracle.report.profiles) {
        assert_eq!(n.normalized, Some(0.0), "null under {}", n.profile.name);
        assert_eq!(n.counts.windows, 116);
        assert_eq!(o.normalized, Some(100.0), "oracle under {}", o.profile.name);
        assert_eq!((o.counts.detected, o.counts.false_positives), (116, 0));
        assert_eq!(o.raw, 116.0);
    }
}

/// Writes a NAB-layout folder: `catA/wave.csv` with a spike and a window around it, `catB/flat.csv`
/// without windows. Returns the window's first and last row.
fn synthetic(dir: &Path) -> (usize, usize) {
    let mut wave = String::from("timestamp,value\n");
    let start = 1_400_000_000_000i64;
    for i in 0..400i64 {
        let v = if i == 300 {
            50.0
        } else {
            (i as f64 / 10.0).sin()
        };
        wave += &format!(
            "{},{v}\n",
            edgewatch_models::eval::nab::format_timestamp(start + i * 300_000)
        );
    }
    let flat: String = (0..200i64).fold(String::from("timestamp,value\n"), |s, i| {
        s + &format!(
            "{},1\n",
            edgewatch_models::eval::nab::format_timestamp(start + i * 60_000)
        )
    });
    let ts = |i: i64| edgewatch_models::eval::nab::format_timestamp(start + i * 300_000);
    std::fs::create_dir_all(dir.join("data/catA")).unwrap();
    std::fs::create_dir_all(dir.join("data/catB")).unwrap();
    std::fs::create_dir_all(dir.join("labels")).unwrap();
    std::fs::write(dir.join("data/catA/wave.csv"), wave).unwrap();
    std::fs::write(dir.join("data/catB/flat.csv"), flat).unwrap();
    std::fs::write(
        dir.join("labels/combined_windows.json"),
        format!(
            r#"{{"catA/wave.csv": [["{}.000000", "{}.000000"]], "catB/flat.csv": []}}"#,
            ts(295),
            ts(310)
        ),
    )
    .unwrap();
    (295, 310)
}

#[test]
fn results_files_follow_the_nab_layout_and_json_has_the_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let (first, last) = synthetic(tmp.path());
    let out = tmp.path().join("results");
    let o = edgewatch(&[
        "eval",
        "nab",
        "--data",
        tmp.path().to_str().unwrap(),
        "--detector",
        "zscore",
        "--results",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).expect("stdout is one JSON object");
    for key in [
        "standard",
        "reward_low_FP_rate",
        "reward_low_FN_rate",
        "readings_per_second",
    ] {
        assert!(v[key].is_number(), "{key} in {v}");
    }
    assert_eq!(v["detector"], "zscore");
    assert_eq!(v["readings"], 600);
    assert!(v["thresholds"]["standard"].is_number());
    assert!(v["at_recommended_threshold"]["threshold"].is_number());
    assert_eq!(v["categories"].as_array().unwrap().len(), 2);

    let wave = std::fs::read_to_string(out.join("zscore/catA/zscore_wave.csv")).unwrap();
    let rows: Vec<&str> = wave.lines().collect();
    assert_eq!(rows[0], "timestamp,value,anomaly_score,label");
    assert_eq!(rows.len(), 401);
    for (i, row) in rows[1..].iter().enumerate() {
        let cols: Vec<&str> = row.split(',').collect();
        assert_eq!(cols.len(), 4, "{row}");
        let want = if (first..=last).contains(&i) {
            "1"
        } else {
            "0"
        };
        assert_eq!(cols[3], want, "row {i}: {row}");
        let s: f64 = cols[2].parse().unwrap();
        assert!((0.0..=1.0).contains(&s));
    }
    assert!(rows[1].starts_with("2014-05-13 16:53:20,0,"), "{}", rows[1]);
    let flat = std::fs::read_to_string(out.join("zscore/catB/zscore_flat.csv")).unwrap();
    assert_eq!(flat.lines().count(), 201);
}

#[test]
fn the_default_detector_is_the_default_config() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic(tmp.path());
    let o = edgewatch(&[
        "eval",
        "nab",
        "--data",
        tmp.path().to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let name = DetectorConfig::default().build().unwrap().name();
    assert_eq!(v["detector"], name);
}

#[test]
fn tables_are_printed_without_json() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic(tmp.path());
    let o = edgewatch(&[
        "eval",
        "nab",
        "--data",
        tmp.path().to_str().unwrap(),
        "--detector",
        "oracle",
    ]);
    assert!(o.status.success());
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.contains("reward_low_FN_rate"), "{text}");
    assert!(text.contains("catA"), "{text}");
    assert!(text.contains("100.00"), "{text}");
}

#[test]
fn unknown_detector_is_an_error_listing_the_valid_ones() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic(tmp.path());
    let o = edgewatch(&[
        "eval",
        "nab",
        "--data",
        tmp.path().to_str().unwrap(),
        "--detector",
        "nope",
    ]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "an unknown detector is a usage error"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("unknown detector \"nope\""), "{err}");
    for name in DetectorConfig::PRESETS {
        assert!(err.contains(name), "{name} missing from {err}");
    }
}

#[test]
fn a_bad_row_is_reported_with_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic(tmp.path());
    std::fs::write(
        tmp.path().join("data/catB/flat.csv"),
        "timestamp,value\n2014-05-13 16:53:20,1\n2014-05-13 16:5:20,1\n",
    )
    .unwrap();
    let o = edgewatch(&[
        "eval",
        "nab",
        "--data",
        tmp.path().to_str().unwrap(),
        "--detector",
        "null",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("data/catB/flat.csv:3: bad timestamp \"2014-05-13 16:5:20\""),
        "{err}"
    );
}

#[test]
fn a_data_file_without_labels_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic(tmp.path());
    std::fs::write(tmp.path().join("data/catB/extra.csv"), "timestamp,value\n").unwrap();
    let o = edgewatch(&[
        "eval",
        "nab",
        "--data",
        tmp.path().to_str().unwrap(),
        "--detector",
        "null",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("catB/extra.csv: no entry in the labels file"),
        "{err}"
    );
}

#[test]
fn simulated_fleet_is_scored_per_kind_and_reproducibly() {
    let args = edgewatch::eval::EvalSimArgs {
        config: None,
        duration_ms: Some(2 * 3_600_000),
        train_ms: Some(3_600_000),
        detector: Some("zscore".into()),
        threshold: None,
        tolerance_ms: None,
        json: true,
        write_csv: None,
    };
    let a = edgewatch::eval::evaluate_sim(&args).unwrap();
    assert!(a.readings > 0 && a.series > 0);
    assert!(
        a.report.overall.labels > 0,
        "the default config injects anomalies"
    );
    let labelled: usize = a.report.kinds.iter().map(|k| k.labels).sum();
    assert_eq!(labelled, a.report.overall.labels);
    let v = a.to_json();
    for key in [
        "kinds",
        "overall",
        "readings_per_second",
        "total_false_positives",
    ] {
        assert!(!v[key].is_null(), "{key} in {v}");
    }
    let names: Vec<&str> = a.columns.iter().map(|c| c.name).collect();
    assert_eq!(names, ["univariate", "multivariate", "combined"]);
    assert_eq!(v["columns"].as_array().map(Vec::len), Some(3));
    let b = edgewatch::eval::evaluate_sim(&args).unwrap();
    assert_eq!(a.report, b.report, "same seed, same scores");
    assert_eq!(
        a.columns, b.columns,
        "same seed, same scores in every column"
    );
    assert!(
        a.render().contains("multi recall / delay s"),
        "{}",
        a.render()
    );
}
