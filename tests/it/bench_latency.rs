//! `edgewatch bench --section latency` at tiny sizes in every combination (both brokers, with and
//! without `state.dir`, sensors at QoS 0 and 1), so the section cannot rot. The figures of a debug
//! build mean nothing and are not checked; that every spike's event reached the feed is.

use crate::common::require;
use std::process::Command;

#[test]
fn the_latency_section_runs_every_combination_and_prints_its_percentiles() {
    require("mosquitto");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_edgewatch"))
        .args(["bench", "--section", "latency"])
        .args(["--latency-spikes", "10", "--latency-background", "500"])
        .args(["--latency-series", "20", "--latency-broker", "both"])
        .args([
            "--latency-durable",
            "both",
            "--latency-qos",
            "both",
            "--dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("publish -> feed event latency ["))
        .collect();
    let mut want = Vec::new();
    for broker in ["embedded", "mosquitto"] {
        for state in ["memory", "state.dir"] {
            for qos in [0, 1] {
                want.push(format!("[{broker}, sensors at qos {qos}, {state}, "));
            }
        }
    }
    assert_eq!(lines.len(), want.len(), "one line per combination: {text}");
    for (line, want) in lines.iter().zip(&want) {
        assert!(line.contains(want.as_str()), "{want:?} not in {line:?}");
        for label in [
            "p50 ",
            " ms, p90 ",
            " ms, p99 ",
            " ms, max ",
            "(10 events of 10 spikes;",
            "load average",
        ] {
            assert!(line.contains(label), "no {label:?} in {line:?}");
        }
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "the bench removes its state directories"
    );
}
