//! The feed's clients against a live `edgewatch demo` (free ports, quick anomalies): the browser
//! example `examples/feed.html` in Debian's headless chromium prints events, and `edgewatch tail`
//! starts with `--last N` and reports a gap marker for an unknown `--since` on stderr. (The Python
//! example, `examples/feed_client.py`, runs in python/tests/test_feed.py.)

use crate::browser::Browser;
use crate::common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Anomalies at 20 per series and simulated hour, 60 simulated minutes per wall minute.
const DEMO: &str = r#"
broker: { listen: "127.0.0.1:0" }
status_interval_secs: 1
simulator:
  devices: 10
  interval_ms: 1000
  speedup: 60
  seed: 7
  anomalies: { rate_per_series_hour: 20, warmup_ms: 60000 }
agent:
  id: gw-examples
  window: { size_ms: 60000, allowed_lateness_ms: 5000, max_future_ms: 31536000000 }
  detector: { type: ensemble }
aggregators:
  - id: agg-examples
    owned: ["0-63"]
    http: { listen: "127.0.0.1:0" }
"#;

/// A running demo, killed on drop.
struct Demo(std::process::Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn edgewatch() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edgewatch"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_example_and_tail_print_events_from_a_live_demo() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("demo.yaml");
    std::fs::write(&cfg, DEMO).unwrap();
    let mut child = edgewatch()
        .args([
            "demo",
            "--duration",
            "120",
            "--broker-port",
            "0",
            "--http-port",
            "0",
            "--config",
        ])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _demo = Demo(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let url = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the demo prints its feed URL");
        if line.starts_with("ws://") {
            break line;
        }
    };
    let http: std::net::SocketAddr = url["ws://".len()..url.len() - "/feed".len()]
        .parse()
        .unwrap();
    // A few events in the aggregator's history.
    let t0 = Instant::now();
    loop {
        let history = tokio::task::spawn_blocking(move || get_json(http, "/api/status"))
            .await
            .unwrap()["feed_history"]
            .as_u64()
            .unwrap_or(0);
        if history >= 3 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no events in the demo's feed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The browser example, from its file, with the feed in its URL, in a real chromium driven
    // over the DevTools protocol: the page is polled until its events are listed (no virtual time,
    // which does not wait for a WebSocket's real I/O on a loaded machine).
    let page = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/feed.html");
    let mut browser = Browser::start().await;
    browser
        .navigate(&format!("file://{}?feed={url}&last=3", page.display()))
        .await;
    browser
        .wait_for(
            "the page to list the 3 recent events",
            "document.querySelectorAll('li.event').length >= 3",
            Duration::from_secs(30),
        )
        .await;
    let events = browser
        .eval("Array.from(document.querySelectorAll('li.event')).map(li => li.textContent).join('\\n')")
        .await;
    let events = events.as_str().unwrap_or_default().to_string();
    assert!(
        events.contains("score=") && events.contains("id="),
        "{events}"
    );
    let status = browser.text("#status").await;
    assert!(status.starts_with("connected, "), "{status}");
    drop(browser);

    // tail --last 3 prints the three most recent events at once.
    let tail = |args: Vec<String>| async move {
        tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new(env!("CARGO_BIN_EXE_edgewatch"))
                .args(args)
                .output(),
        )
        .await
        .expect("tail finishes")
        .unwrap()
    };
    let out = tail(vec![
        "tail".into(),
        url.clone(),
        "--last".into(),
        "3".into(),
        "--count".into(),
        "3".into(),
    ])
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text.lines().filter(|l| l.contains("score=")).count(),
        3,
        "{text}"
    );
    // An unknown --since: the gap marker on stderr, events on stdout.
    let out = tail(vec![
        "tail".into(),
        url.clone(),
        "--since".into(),
        "not-an-event".into(),
        "--count".into(),
        "1".into(),
    ])
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("GAP: events may have been missed after not-an-event"),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("score="));
}
