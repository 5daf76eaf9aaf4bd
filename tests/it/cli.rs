//! The `edgewatch` binary as a user runs it: the demo prints its feed URL and status lines, stops
//! cleanly on SIGTERM, reports taken ports clearly; `tail` prints the feed.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn edgewatch() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edgewatch"))
}

#[test]
fn demo_prints_the_feed_url_serves_tail_and_stops_on_sigterm() {
    let mut demo = edgewatch()
        .args(["demo", "--broker-port", "0", "--http-port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = demo.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let next = |what: &str| -> String {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("demo never printed {what}"));
            if line.contains(what) {
                return line;
            }
        }
    };
    let url = next("ws://");
    assert!(
        url.starts_with("ws://127.0.0.1:") && url.ends_with("/feed"),
        "URL alone on its line: {url:?}"
    );
    let status = next("status:");
    assert!(
        status.contains("readings/s") && status.contains("anomalies") && status.contains("windows"),
        "{status}"
    );

    // Anomalies start once the simulated warm-up (10 simulated minutes, 10 s of wall time) is over.
    let tail = edgewatch()
        .args(["tail", &url, "--count", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_with_timeout(tail, Duration::from_secs(60));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "tail failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("score=") && text.contains("dev-"),
        "tail printed {text:?}"
    );

    let term = Command::new("kill")
        .args(["-TERM", &demo.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let exit = wait_status(&mut demo, Duration::from_secs(30));
    assert_eq!(exit, Some(0), "demo exits 0 after SIGTERM");
    next("edgewatch demo stopped");
}

#[test]
fn a_taken_port_gives_a_clear_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    for (flag, want) in [
        ("--http-port", "cannot listen on 127.0.0.1:"),
        ("--broker-port", "embedded MQTT broker on 127.0.0.1:"),
    ] {
        let other = if flag == "--http-port" {
            "--broker-port"
        } else {
            "--http-port"
        };
        let out = edgewatch()
            .args(["demo", "--duration", "5", flag, &port, other, "0"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag}: {err}");
        assert!(err.contains(want) && err.contains(&port), "{flag}: {err}");
    }
}

#[test]
fn demo_stops_on_its_own_after_duration() {
    let out = edgewatch()
        .args([
            "demo",
            "--duration",
            "3",
            "--broker-port",
            "0",
            "--http-port",
            "0",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("edgewatch demo stopped:"), "{text}");
}

#[test]
fn every_command_has_help() {
    for args in [
        vec!["--help"],
        vec!["agent", "--help"],
        vec!["aggregator", "--help"],
        vec!["simulate", "--help"],
        vec!["demo", "--help"],
        vec!["tail", "--help"],
        vec!["config", "check", "--help"],
        vec!["eval", "nab", "--help"],
        vec!["eval", "sim", "--help"],
        vec!["bench", "--help"],
    ] {
        let out = edgewatch().args(&args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage:"),
            "{args:?}"
        );
    }
    let out = edgewatch().args(["agent"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "usage errors exit 1");
}

/// The exit-code table of the README: usage errors 1 (`verify`: 2, its 1 means mismatches),
/// `--help` and `--version` 0, a runtime failure 2, its cause chain printed without repeats.
#[test]
fn exit_codes_follow_the_readme_table() {
    let code = |args: &[&str]| edgewatch().args(args).output().unwrap();
    assert_eq!(code(&["--version"]).status.code(), Some(0));
    assert_eq!(
        code(&["agents"]).status.code(),
        Some(1),
        "missing --aggregator"
    );
    assert_eq!(code(&["no-such-command"]).status.code(), Some(1));
    assert_eq!(
        code(&["--log-format", "xml", "agents"]).status.code(),
        Some(1)
    );
    assert_eq!(
        code(&["verify"]).status.code(),
        Some(2),
        "verify keeps 2 for bad arguments"
    );
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = code(&[
        "agents",
        "--aggregator",
        &format!("http://127.0.0.1:{port}"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_default();
    assert!(line.contains("127.0.0.1"), "{err}");
    // No cause printed twice in a row (`Connection refused: Connection refused`).
    let parts: Vec<&str> = line.split(": ").collect();
    assert!(parts.windows(2).all(|w| w[0] != w[1]), "{line}");
}

/// `--log-format json` prints one JSON object per line; text logs carry no ANSI colour when stderr
/// is not a terminal (here a pipe).
#[test]
fn log_lines_are_json_on_request_and_never_coloured_into_a_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("agent.yaml");
    // A broker that is not there: the agent logs its start and its connection failures.
    std::fs::write(
        &conf,
        "id: gw-log
source: { mqtt: { host: 127.0.0.1, port: 1 } }
",
    )
    .unwrap();
    for format in ["json", "text"] {
        let mut child = edgewatch()
            .args([
                "--log-format",
                format,
                "agent",
                "-c",
                conf.to_str().unwrap(),
            ])
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !lines.iter().any(|l: &String| l.contains("agent starting")) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) => lines.push(l),
                Err(_) => panic!("{format}: no start line in {lines:?}"),
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        for l in &lines {
            assert!(!l.contains('\u{1b}'), "{format}: ANSI escape in {l:?}");
            if format == "json" {
                let v: serde_json::Value = serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("not one JSON object per line: {e}: {l}"));
                assert!(
                    v["level"].is_string() && v["fields"]["message"].is_string(),
                    "{l}"
                );
            }
        }
    }
}

/// Every section of `edgewatch bench` but `cluster` (below) at tiny sizes, so the bench code cannot
/// rot; the figures of a debug build mean nothing and are not checked.
#[test]
fn bench_runs_every_section_with_tiny_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let mut sections = Vec::new();
    for s in [
        "pipeline",
        "end-to-end",
        "latency",
        "durability",
        "drain",
        "restart",
    ] {
        sections.extend(["--section", s]);
    }
    let out = edgewatch()
        .arg("bench")
        .args(&sections)
        .args([
            "--readings",
            "2000",
            "--series",
            "100",
            "--detector",
            "zscore",
            "--e2e-readings",
            "2000",
            "--latency-spikes",
            "20",
            "--durability-readings",
            "2000",
            "--drain-readings",
            "10000",
            "--drain-rate",
            "50000",
            "--restart-series",
            "50",
            "--restart-readings-per-series",
            "5",
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
    for line in [
        "in-process pipeline [zscore]",
        "end to end via embedded broker",
        "publish -> feed event latency",
        "durability, acked by the aggregator",
        "drain at drain_records_per_sec 50000: backlog",
        "restart with 50 series",
        "restart steps alone",
    ] {
        assert!(text.contains(line), "no {line:?} in {text}");
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "the bench removes its state directories"
    );
}

/// The `memory` section of `edgewatch bench` at tiny sizes: the in-process lines per preset, then
/// an agent process with `state.dir` loaded through the embedded broker and sampled while idle.
#[test]
fn bench_memory_section_runs_with_tiny_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let out = edgewatch()
        .args([
            "bench",
            "--section",
            "memory",
            "--memory-series",
            "50",
            "--memory-readings-per-series",
            "20",
            "--memory-agent-series",
            "200",
            "--memory-agent-readings-per-series",
            "5",
            "--memory-idle-secs",
            "2",
            "--memory-sample-secs",
            "1",
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
    for line in [
        "agent memory [default]:",
        "agent memory [zscore]:",
        "bytes of detector state per series",
        "bytes per open window",
        "agent process memory: 200 series x 5 readings loaded",
        "bytes per series (load average",
        "agent process memory idle +   1 s: RSS",
        "agent process memory idle 2 s: RSS",
    ] {
        assert!(text.contains(line), "no {line:?} in {text}");
    }
    // 1,016 bytes of ensemble state per series (the README's sizing table).
    assert!(
        text.contains("1016 bytes of detector state per series"),
        "{text}"
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "the bench removes its state directory"
    );
}

/// The `ingest` section of `edgewatch bench` at tiny sizes: mosquitto, the broker's forwarding rate
/// and an agent child process under the same load, every reading counted (figures not checked).
#[test]
fn bench_ingest_section_runs_with_tiny_sizes() {
    crate::common::require("mosquitto");
    let dir = tempfile::tempdir().unwrap();
    let out = edgewatch()
        .args([
            "bench",
            "--section",
            "ingest",
            "--ingest-broker",
            "mosquitto",
            "--ingest-readings",
            "2000",
            "--ingest-series",
            "50",
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
    for line in [
        "ingest via mosquitto: broker 1->1 forwarding",
        "received 2000 of 2000",
        "ingest via mosquitto: agent",
        "us CPU per reading",
        "% of a core (processed 2000 of 2000, 2000 messages",
        "load average",
    ] {
        assert!(text.contains(line), "no {line:?} in {text}");
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "the bench removes its configuration directories"
    );
}

/// The `cluster` section of `edgewatch bench` at tiny sizes: its own 3-node nats-server cluster,
/// aggregators as child processes, a throughput run with two of them and a failover run (one of
/// two killed). Needs nats-server, like the cluster tests.
#[test]
fn bench_cluster_section_runs_with_tiny_sizes() {
    crate::common::require("nats-server");
    let dir = tempfile::tempdir().unwrap();
    let out = edgewatch()
        .args([
            "bench",
            "--section",
            "cluster",
            "--cluster-aggregators",
            "2",
            "--cluster-summaries",
            "2560",
            "--cluster-agents",
            "2",
            "--cluster-batch",
            "10",
            "--cluster-lease-ttl-ms",
            "1500",
            "--cluster-failover-aggregators",
            "2",
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
    for line in [
        "cluster: 3-node nats-server",
        "cluster load: 2 synthetic agents x 64 partitions = 128 lanes",
        "cluster throughput, 2 aggregators:",
        "2560 summaries, first publish to last ack",
        "cluster failover, SIGKILL 1 of 2 aggregators under load (lease_ttl_ms 1500): every partition owned again",
        "every lane acked to its last published seq",
    ] {
        assert!(text.contains(line), "no {line:?} in {text}");
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "the bench removes its NATS store and aggregator files"
    );
}

fn wait_status(child: &mut std::process::Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_with_timeout(mut child: std::process::Child, timeout: Duration) -> std::process::Output {
    let deadline = Instant::now() + timeout;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}
