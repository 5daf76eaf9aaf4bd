//! The broker restarted mid-stream — the embedded rumqttd (dropped and started again on the same
//! port: every session and queued message is gone) and mosquitto with persistence (a clean SIGTERM
//! stop, which writes its store, then a start on the same store) — with a durable agent, a durable
//! aggregator and a seeded simulator all in-process. Everything reconnects, and `edgewatch verify`
//! reconciles the whole run exactly.
//!
//! Readings published while the broker is down, or sitting in a non-persistent broker when it dies,
//! are outside edgewatch's control, so the simulator runs in two phases and the broker restarts
//! between them, once the agent has received every reading of phase 1. What is in flight at that
//! moment is edgewatch's to keep: open windows (the agent's state), closed windows in the outbox not
//! yet acknowledged by the aggregator (resent on reconnect and after the ack timeout) and acks.

use crate::common::*;
use edgewatch::broker::{BrokerConfig, EmbeddedBroker};
use edgewatch_agent::{Agent, AgentConfig, AgentMetrics};
use edgewatch_aggregator::{Aggregator, AggregatorConfig};
use edgewatch_simulators::SimulatorConfig;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const START_MS: i64 = 1_767_225_600_000;
/// Simulated time per phase.
const PHASE_MS: u64 = 30 * 60_000;
const WINDOW_MS: i64 = 10_000;
const WAIT: Duration = Duration::from_secs(120);

/// The broker under test, restartable on its port.
enum Broker {
    Embedded(Option<EmbeddedBroker>),
    Mosquitto {
        running: Option<Mosquitto>,
        conf: String,
        store: PathBuf,
    },
}

impl Broker {
    fn embedded(port: u16) -> Self {
        Self::Embedded(Some(start_embedded(port)))
    }

    fn mosquitto(port: u16, store: &Path) -> Self {
        // Debian's 2.0.11 wants the trailing slash on persistence_location. Started as root,
        // mosquitto switches to the `mosquitto` user, which cannot write into the test's private
        // temporary directory: it then keeps nothing, only logging "Permission denied".
        // `user root` keeps it as it was started (the setting is ignored when not root).
        let conf = format!(
            "persistence true\npersistence_location {}/\nautosave_interval 1\nuser root\n",
            store.display()
        );
        Self::Mosquitto {
            running: Some(Mosquitto::start_on(port, &conf)),
            conf,
            store: store.to_path_buf(),
        }
    }

    /// Stops the broker and starts it again on `port`.
    fn restart(&mut self, port: u16) {
        match self {
            Self::Embedded(b) => {
                // Closes the listener and every connection; sessions die with it.
                drop(b.take());
                *b = Some(start_embedded(port));
            }
            Self::Mosquitto {
                running,
                conf,
                store,
            } => {
                running.take().expect("mosquitto is running").stop();
                let db = store.join("mosquitto.db");
                assert!(db.is_file(), "mosquitto wrote no store at {}", db.display());
                *running = Some(Mosquitto::start_on(port, conf));
            }
        }
    }
}

/// An embedded broker on `port`, retrying for a while if the previous one has not let go of it.
fn start_embedded(port: u16) -> EmbeddedBroker {
    let cfg = BrokerConfig {
        listen: format!("127.0.0.1:{port}"),
        ..BrokerConfig::default()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match EmbeddedBroker::start(&cfg) {
            Ok(b) => return b,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("embedded broker on port {port} did not start again: {e:#}"),
        }
    }
}

/// One phase of the fleet: 3 devices × 4 metrics, 1 s interval, QoS 1, paced to a few seconds.
fn phase(port: u16, start_ms: i64, log: PathBuf) -> SimulatorConfig {
    let mut sim = SimulatorConfig::default();
    sim.mqtt.port = port;
    sim.qos = 1;
    sim.devices = 3;
    sim.seed = 23;
    sim.interval_ms = 1000;
    sim.start_ms = Some(start_ms);
    sim.duration_ms = Some(PHASE_MS);
    sim.speedup = 400.0;
    sim.max_rate_per_sec = 5_000;
    sim.readings_log_path = Some(log);
    sim
}

fn status(addr: SocketAddr) -> serde_json::Value {
    get_json(addr, "/api/status")
}

/// A counter from the aggregator's Prometheus text.
fn agg_metric(addr: SocketAddr, name: &str) -> u64 {
    let (code, text) = http_get(addr, "/metrics");
    assert_eq!(code, 200, "{text}");
    text.lines()
        .find(|l| l.split([' ', '{']).next() == Some(name))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}")) as u64
}

fn outbox_state(m: &AgentMetrics) -> String {
    format!(
        "outbox {} records / {} bytes, published {}, acks received {}, acked {}, resends {}, \
         publish errors {}, connection errors {}, uplink connected {}",
        m.outbox_records.load(Relaxed),
        m.outbox_bytes.load(Relaxed),
        m.summaries_published_total.load(Relaxed),
        m.acks_received_total.load(Relaxed),
        m.outbox_acked_total.load(Relaxed),
        m.resends_total.load(Relaxed),
        m.publish_errors_total.load(Relaxed),
        m.connection_errors_total.load(Relaxed),
        m.uplink_connected.load(Relaxed),
    )
}

/// Waits until the agent has received `expected` readings in all, and checks it got no more.
async fn wait_received(m: &AgentMetrics, expected: u64, what: &str) {
    let deadline = Instant::now() + WAIT;
    while m.readings_total.load(Relaxed) < expected {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {} of {expected} readings received ({} messages, \
             {} rejected, {} connection errors)",
            m.readings_total.load(Relaxed),
            m.messages_total.load(Relaxed),
            m.rejected_total(),
            m.connection_errors_total.load(Relaxed),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        m.readings_total.load(Relaxed),
        expected,
        "the agent received more readings than were published ({} messages; redelivered?)",
        m.messages_total.load(Relaxed)
    );
}

/// Waits until the agent's source link is subscribed again: a probe it must reject (a payload that
/// is not JSON, so never a reading) is counted once it arrives.
async fn wait_source_subscribed(m: &AgentMetrics, port: u16) {
    let before = m.rejected_total();
    let (client, mut el) = rumqttc::AsyncClient::new(
        rumqttc::MqttOptions::new("restart-probe", "127.0.0.1", port),
        10,
    );
    let poller = tokio::spawn(async move {
        loop {
            if el.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while m.rejected_total() == before {
        assert!(
            Instant::now() < deadline,
            "the agent's source link did not subscribe again within 60 s"
        );
        let _ = client.try_publish(
            "sensors/probe-0/temperature",
            rumqttc::QoS::AtMostOnce,
            false,
            "not json",
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    poller.abort();
}

/// The whole scenario against `broker` on `port`. With `quiesce`, the restart waits until the outbox
/// is empty and the aggregator has applied everything; without, it happens as soon as the agent has
/// received phase 1 (acks and outbox records may be in flight), and phase 2 starts right away
/// (the persistent broker queues for the agent's session until it is back).
async fn run(id: &str, mut broker: Broker, port: u16, dir: &Path, quiesce: bool) {
    let started = Instant::now();

    let mut acfg = AggregatorConfig::with_id(&format!("agg-{id}"));
    acfg.mqtt.port = port;
    acfg.http.listen = "127.0.0.1:0".into();
    acfg.state.dir = Some(dir.join("agg"));
    acfg.state.windows_per_series = 100_000;
    let agg = Aggregator::bind(acfg).await.unwrap();
    let addr = agg.local_addr();
    let stop_agg = CancellationToken::new();
    let agg_task = {
        let t = stop_agg.clone();
        tokio::spawn(agg.run(async move { t.cancelled().await }))
    };

    let mut cfg = AgentConfig::with_id(&format!("gw-{id}"));
    cfg.source.mqtt.port = port;
    cfg.state.dir = Some(dir.join("agent"));
    cfg.state.flush_on_exit = true;
    cfg.window.size_ms = WINDOW_MS;
    cfg.window.allowed_lateness_ms = 0;
    cfg.uplink.ack_timeout_ms = 2_000;
    let agent = Agent::new(cfg).unwrap();
    let m: Arc<AgentMetrics> = agent.metrics();
    let stop_agent = CancellationToken::new();
    let agent_task = {
        let t = stop_agent.clone();
        tokio::spawn(agent.run(async move { t.cancelled().await }))
    };
    wait_until("the agent's uplink to connect", WAIT, || {
        m.uplink_connected.load(Relaxed) == 1
    })
    .await;
    wait_source_subscribed(&m, port).await;

    // Phase 1.
    let log1 = dir.join("readings-1.csv");
    let p1 = edgewatch_simulators::run(phase(port, START_MS, log1.clone()), std::future::pending())
        .await
        .unwrap();
    assert!(p1.published > 20_000, "phase 1 published {}", p1.published);
    wait_received(&m, p1.published, "the agent to receive phase 1").await;
    if quiesce {
        // Every window closed so far acknowledged, so applied: only open windows are at stake.
        wait_until("the outbox to drain before the restart", WAIT, || {
            m.outbox_records.load(Relaxed) == 0
        })
        .await;
    }

    // The restart.
    let errors_before = m.connection_errors_total.load(Relaxed);
    let agg_errors_before = agg_metric(addr, "edgewatch_aggregator_connection_errors_total");
    let in_flight = m.outbox_records.load(Relaxed);
    let restart_at = Instant::now();
    broker.restart(port);
    eprintln!(
        "{id}: broker restarted in {} ms with {in_flight} outbox records unacknowledged",
        restart_at.elapsed().as_millis()
    );
    wait_until("the agent to notice the restart", WAIT, || {
        m.connection_errors_total.load(Relaxed) > errors_before
    })
    .await;
    wait_until("the aggregator to notice the restart", WAIT, || {
        agg_metric(addr, "edgewatch_aggregator_connection_errors_total") > agg_errors_before
    })
    .await;
    if quiesce {
        // Nothing of the non-persistent broker's sessions survived: phase 2 must wait for the
        // agent to subscribe again, or its first readings go nowhere.
        wait_source_subscribed(&m, port).await;
    }

    // Phase 2, continuing simulated time.
    let log2 = dir.join("readings-2.csv");
    let p2 = edgewatch_simulators::run(
        phase(port, START_MS + PHASE_MS as i64, log2.clone()),
        std::future::pending(),
    )
    .await
    .unwrap();
    let published = p1.published + p2.published;
    wait_received(&m, published, "the agent to receive phase 2").await;
    wait_until("the agent's uplink to be connected again", WAIT, || {
        m.uplink_connected.load(Relaxed) == 1
    })
    .await;
    let reconnected_in = restart_at.elapsed();

    // A clean stop closes every open window and sends it.
    let stopping = Instant::now();
    stop_agent.cancel();
    agent_task.await.unwrap().unwrap();
    let stopped_in = stopping.elapsed();
    let expected = m.readings_total.load(Relaxed) - m.late_readings_total.load(Relaxed);
    let deadline = Instant::now() + WAIT;
    loop {
        let s = status(addr);
        if s["readings"].as_u64() == Some(expected) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the aggregator holds {} readings, expected {expected} (agent: {} readings, {} late); \
             agent {}; aggregator connection errors {}; lane_progress {}",
            s["readings"],
            m.readings_total.load(Relaxed),
            m.late_readings_total.load(Relaxed),
            outbox_state(&m),
            agg_metric(addr, "edgewatch_aggregator_connection_errors_total"),
            s["lane_progress"],
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The readings log of the whole run: phase 1 then phase 2.
    let log = dir.join("readings.csv");
    let mut text = std::fs::read_to_string(&log1).unwrap();
    text.push_str(&std::fs::read_to_string(&log2).unwrap());
    std::fs::write(&log, &text).unwrap();
    assert_eq!(
        text.lines().count() as u64,
        published,
        "one log line per publish"
    );
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_edgewatch"))
        .arg("verify")
        .arg("--readings")
        .arg(&log)
        .args(["--aggregator", &format!("http://{addr}")])
        .args(["--window-ms", &WINDOW_MS.to_string()])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "verify is not exact after the broker restart (agent: {} readings, {} late, {} messages; {})\n\
         stdout: {stdout}\nstderr: {}",
        m.readings_total.load(Relaxed),
        m.late_readings_total.load(Relaxed),
        m.messages_total.load(Relaxed),
        outbox_state(&m),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(stdout.trim_end().ends_with("OK"), "{stdout}");

    // The restart really happened and was survived.
    assert_eq!(
        m.late_readings_total.load(Relaxed),
        0,
        "no reading was late"
    );
    assert!(m.connection_errors_total.load(Relaxed) > errors_before);
    assert!(agg_metric(addr, "edgewatch_aggregator_connection_errors_total") > agg_errors_before);
    assert_eq!(m.outbox_records.load(Relaxed), 0, "everything acknowledged");
    eprintln!(
        "{id}: {published} readings exact; reconnected and caught up {:.1} s after the restart; \
         {} resends; agent stopped in {:.1} s; total {:.1} s",
        reconnected_in.as_secs_f64(),
        m.resends_total.load(Relaxed),
        stopped_in.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );

    stop_agg.cancel();
    agg_task.await.unwrap().unwrap();
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_restarted_mid_stream_loses_nothing_edgewatch_holds() {
    edgewatch::logging::init("warn");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let broker = Broker::embedded(port);
    run("emb", broker, port, dir.path(), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_with_persistence_restarted_mid_stream_reconciles_exactly() {
    edgewatch::logging::init("warn");
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("mosquitto-store");
    std::fs::create_dir(&store).unwrap();
    let port = free_port();
    let broker = Broker::mosquitto(port, &store);
    run("mosq", broker, port, dir.path(), false).await;
}
