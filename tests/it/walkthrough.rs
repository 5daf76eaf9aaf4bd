//! README's walkthrough, as written: mosquitto, then the aggregator, the agent and the sensors of
//! `configs/walkthrough/`, each a process of its own; the first anomaly must reach the feed within a
//! minute of the sensors starting. Only the ports and the state folder are moved (to free ones).

use crate::common::*;
use crate::crash::{wait_http, Proc};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

/// `configs/walkthrough/{name}` copied into `dir` with its broker port, HTTP ports and state folder moved.
fn copy(dir: &Path, name: &str, mqtt: u16, agg_http: u16, agent_http: u16) -> String {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("configs/walkthrough")
            .join(name),
    )
    .unwrap();
    assert!(
        text.contains("port: 1883"),
        "{name} has no broker port 1883"
    );
    if name == "aggregator.yaml" {
        assert!(
            text.contains("127.0.0.1:8080"),
            "{name} has no HTTP port 8080"
        );
    }
    let text = text
        .replace("port: 1883", &format!("port: {mqtt}"))
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{agg_http}"))
        .replace("127.0.0.1:9187", &format!("127.0.0.1:{agent_http}"))
        .replace(
            "./walkthrough-state",
            &dir.join("state").display().to_string(),
        );
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_walkthrough_shows_a_first_anomaly_within_a_minute() {
    let broker = Mosquitto::start_on(free_port(), "");
    let dir = tempfile::tempdir().unwrap();
    let (agg_http, agent_http) = (free_port(), free_port());
    let files: Vec<String> = ["aggregator.yaml", "agent.yaml", "simulator.yaml"]
        .iter()
        .map(|n| copy(dir.path(), n, broker.port, agg_http, agent_http))
        .collect();
    let log = |n: &str| dir.path().join(format!("{n}.log"));
    let aggregator = Proc::spawn(
        "aggregator",
        &["aggregator", "-c", &files[0]],
        &log("aggregator"),
    );
    let agent = Proc::spawn("agent", &["agent", "-c", &files[1]], &log("agent"));
    let agg_addr: SocketAddr = format!("127.0.0.1:{agg_http}").parse().unwrap();
    wait_http(agg_addr);
    wait_http(format!("127.0.0.1:{agent_http}").parse().unwrap());
    let feed = FeedClient::connect(&format!("ws://{agg_addr}/feed")).await;
    // Both subscribed before the sensors start (their first readings would otherwise be missed).
    wait_until(
        "the agent and the aggregator to connect",
        Duration::from_secs(30),
        || {
            http_get(agg_addr, "/readyz").0 == 200
                && http_get(
                    format!("127.0.0.1:{agent_http}").parse().unwrap(),
                    "/readyz",
                )
                .0 == 200
        },
    )
    .await;

    let started = Instant::now();
    let sensors = Proc::spawn("sensors", &["simulate", "-c", &files[2]], &log("sensors"));
    let first = loop {
        if let Some(e) = feed.events.lock().unwrap().first().cloned() {
            break e;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no anomaly within a minute; agent log:\n{}",
            std::fs::read_to_string(log("agent")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "walkthrough: first anomaly after {:.1} s: {} {} score {:.2} ({})",
        started.elapsed().as_secs_f64(),
        first.device,
        first.metric,
        first.score,
        first.detector
    );
    assert!(first.device.starts_with("pump-"), "{first:?}");
    sensors.terminate();
    agent.terminate();
    aggregator.terminate();
}
