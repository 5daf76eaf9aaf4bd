//! `edgewatch eval csv` end to end: a small labelled multi-sensor fixture written here (two device
//! runs of three correlated sensors: a correlation break in one, a spike in the other) replayed by
//! the binary with `--json`; result files; and bad files failing with file, line and column.

use std::path::Path;
use std::process::Command;

fn edgewatch(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_edgewatch"))
        .args(args)
        .output()
        .expect("run the edgewatch binary")
}

const ROWS: usize = 3000;
/// Rows 2000..2300 are labelled in both files.
const BREAK: std::ops::Range<usize> = 2000..2300;
const SPIKE: std::ops::Range<usize> = 2000..2005;

/// A reproducible uniform noise in [-0.5, 0.5) (an LCG: the fixture must not change between runs).
struct Noise(u64);
impl Noise {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    }
}

/// One device run: a hidden load drives flow, pressure and current. `break_current`: over BREAK the
/// current follows the load inverted (inside its own range); `spike`: over SPIKE the flow jumps.
fn device(seed: u64, sep: char, iso: bool, break_current: bool, spike: bool) -> String {
    let mut n = Noise(seed);
    let mut s = [
        "timestamp",
        "flow",
        "pressure",
        "current",
        "label",
        "changepoint",
    ]
    .join(&sep.to_string());
    s.push('\n');
    for i in 0..ROWS {
        let load = (i as f64 * std::f64::consts::TAU / 200.0).sin();
        let mut flow = 10.0 + 2.0 * load + 0.2 * n.next();
        let pressure = 5.0 + load + 0.1 * n.next();
        let mut current = 3.0 + 0.5 * load + 0.05 * n.next();
        let mut label = 0;
        if break_current && BREAK.contains(&i) {
            current = 3.0 - 0.5 * load + 0.05 * n.next();
            label = 1;
        }
        if spike && SPIKE.contains(&i) {
            flow += 8.0;
            label = 1;
        }
        let ts_s = 1_700_000_000 + i as i64;
        let ts = if iso {
            edgewatch_models::eval::nab::format_timestamp(ts_s * 1000)
        } else {
            ts_s.to_string()
        };
        let cp = u8::from(i == BREAK.start);
        s += &format!("{ts}{sep}{flow}{sep}{pressure}{sep}{current}{sep}{label}{sep}{cp}\n");
    }
    s
}

fn fixture(dir: &Path) {
    std::fs::create_dir_all(dir.join("runs")).unwrap();
    std::fs::write(
        dir.join("runs/break.csv"),
        device(1, ',', false, true, false),
    )
    .unwrap();
    std::fs::write(
        dir.join("runs/spike.csv"),
        device(2, ';', true, false, true),
    )
    .unwrap();
}

fn json(o: &std::process::Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("stdout is one JSON object")
}

#[test]
fn the_model_catches_the_correlation_break_the_ensemble_misses() {
    let tmp = tempfile::tempdir().unwrap();
    fixture(tmp.path());
    let data = tmp.path().join("runs");
    let results = tmp.path().join("results");
    let v = json(&edgewatch(&[
        "eval",
        "csv",
        "--data",
        data.to_str().unwrap(),
        "--ignore",
        "changepoint",
        "--results",
        results.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(v["model"], "pca");
    assert_eq!(v["files"], 2);
    // 20 % of 3000 rows per file train the model and are not scored.
    assert_eq!(v["training_rows"], 1200);
    assert_eq!(v["rows"], 4800);
    assert_eq!(v["readings"], 2 * 3 * ROWS);
    let files = v["per_file"].as_array().unwrap();
    let (brk, spk) = (&files[0], &files[1]);
    assert_eq!(brk["file"], "break.csv");
    assert_eq!(
        brk["model"]["features"],
        serde_json::json!(["flow", "pressure", "current"])
    );
    assert_eq!(brk["intervals"], 1);
    // The break: the model raises an event inside it, the ensemble does not.
    let recall = |f: &serde_json::Value, view: &str| f[view]["events"]["recall"].as_f64().unwrap();
    assert_eq!(recall(brk, "multivariate"), 1.0, "{}", brk["multivariate"]);
    assert_eq!(recall(brk, "univariate"), 0.0, "{}", brk["univariate"]);
    assert_eq!(recall(brk, "combined"), 1.0);
    let pw = &brk["multivariate"]["fixed_threshold"];
    assert!(
        pw["recall"].as_f64().unwrap() > 0.5,
        "the score is a state over the break: {pw}"
    );
    assert!(
        brk["multivariate"]["events"]["false_alarms"]
            .as_u64()
            .unwrap()
            <= 1,
        "{}",
        brk["multivariate"]
    );
    // The spike: the ensemble catches it.
    assert_eq!(recall(spk, "univariate"), 1.0, "{}", spk["univariate"]);
    assert_eq!(recall(spk, "combined"), 1.0);
    // Overall figures exist for every view, with the NAB profiles.
    for view in ["univariate", "multivariate", "combined"] {
        let o = &v["overall"][view];
        assert_eq!(o["events"]["intervals"], 2, "{view}");
        assert!(o["best_threshold"]["f1"].is_number(), "{view}: {o}");
        assert!(
            o["nab"]["standard"]["at_fixed_threshold"].is_number(),
            "{view}: {o}"
        );
    }
    assert!(
        v["overall"]["combined"]["events"]["recall"]
            .as_f64()
            .unwrap()
            == 1.0
    );

    // Result files: one per device run, one per sensor, NAB columns, scored rows only.
    let dev = std::fs::read_to_string(results.join("device/break.csv")).unwrap();
    let lines: Vec<&str> = dev.lines().collect();
    assert_eq!(lines[0], "timestamp,value,anomaly_score,label");
    assert_eq!(lines.len(), 1 + ROWS - 600);
    assert!(lines[1].starts_with("2023-11-14 22:23:20,"), "{}", lines[1]);
    let labelled = lines[1..].iter().filter(|l| l.ends_with(",1")).count();
    assert_eq!(labelled, BREAK.len());
    for s in ["flow", "pressure", "current"] {
        let f = std::fs::read_to_string(results.join(format!("sensors/spike/{s}.csv"))).unwrap();
        assert_eq!(f.lines().count(), 1 + ROWS - 600, "{s}");
    }
}

#[test]
fn train_files_and_a_table_and_bad_files_naming_file_line_and_column() {
    let tmp = tempfile::tempdir().unwrap();
    fixture(tmp.path());
    let data = tmp.path().join("runs");
    std::fs::write(data.join("normal.csv"), device(3, ',', false, false, false)).unwrap();
    let v = json(&edgewatch(&[
        "eval",
        "csv",
        "--data",
        data.to_str().unwrap(),
        "--train-files",
        "normal*",
        "--columns",
        "flow,pressure,current",
        "--json",
    ]));
    assert_eq!(v["train_files"], serde_json::json!(["normal.csv"]));
    assert_eq!(v["training_rows"], 0);
    assert_eq!(v["rows"], 2 * ROWS);
    assert_eq!(v["per_file"][0]["model"]["key"], "train-files");
    assert_eq!(v["per_file"][0]["multivariate"]["events"]["recall"], 1.0);

    let table = edgewatch(&[
        "eval",
        "csv",
        "--data",
        data.join("spike.csv").to_str().unwrap(),
        "--model",
        "none",
    ]);
    assert!(
        table.status.success(),
        "{}",
        String::from_utf8_lossy(&table.stderr)
    );
    let text = String::from_utf8(table.stdout).unwrap();
    assert!(
        text.contains("univariate") && !text.contains("multivariate"),
        "{text}"
    );

    let bad = tmp.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    let cases = [
        (
            "t,a,b\n1,2,3\n2,x,3\n",
            ":3: column \"a\": not a number: \"x\"",
        ),
        (
            "t,a,b\n5,2,3\n4,2,3\n",
            ":3: column \"t\": time goes backwards",
        ),
        ("t,a,b\n1,2,3\n2,3\n", ":3: 2 cells, the header has 3"),
        ("", ":1: empty file"),
        ("t,a,b\n", ": no data rows"),
    ];
    for (text, want) in cases {
        let p = bad.join("dev.csv");
        std::fs::write(&p, text).unwrap();
        let o = edgewatch(&[
            "eval",
            "csv",
            "--data",
            p.to_str().unwrap(),
            "--model",
            "none",
        ]);
        assert_eq!(o.status.code(), Some(2), "{text:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(&format!("{}{want}", p.display())),
            "{text:?}: {err}"
        );
    }
    let o = edgewatch(&[
        "eval",
        "csv",
        "--data",
        data.to_str().unwrap(),
        "--columns",
        "flow,nope",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("break.csv:1: no sensor column \"nope\""));
    let o = edgewatch(&[
        "eval",
        "csv",
        "--data",
        data.to_str().unwrap(),
        "--detector",
        "nope",
    ]);
    assert_eq!(o.status.code(), Some(1));
}
