//! The uplink down for hours of simulated time: the agent keeps detecting and buffers in its outbox;
//! when the cloud broker comes back, the backlog drains in seq order while live data still flows.
//! With a small disk budget, coarsening and eviction are counted and every anomaly event arrives.

use crate::common::*;
use crate::wait::{SubAckTap, SubscriptionLog};
use edgewatch_agent::{Agent, AgentConfig, AgentMetrics};
use edgewatch_aggregator::{Aggregator, AggregatorConfig};
use edgewatch_simulators::SimulatorConfig;
use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

struct Outage {
    broker: edgewatch::broker::EmbeddedBroker,
    /// The agent's way to the source broker, showing when its subscription lands.
    _tap: SubAckTap,
    uplink_port: u16,
    agent: Arc<AgentMetrics>,
    stop_agent: CancellationToken,
    agent_task: tokio::task::JoinHandle<Result<(), edgewatch_agent::AgentError>>,
    _state: tempfile::TempDir,
}

/// An agent reading from an embedded broker, its uplink pointed at a port where nothing listens yet.
async fn agent_with_uplink_down(id: &str, tune: impl FnOnce(&mut AgentConfig)) -> Outage {
    let broker = embedded_broker();
    let uplink_port = free_port();
    let state = tempfile::tempdir().unwrap();
    let tap = SubAckTap::start(broker.addr()).await;
    let mut cfg = AgentConfig::with_id(id);
    cfg.source.mqtt.port = tap.port();
    let mut up = cfg.source.mqtt.clone();
    up.port = uplink_port;
    cfg.uplink.mqtt = Some(up);
    cfg.state.dir = Some(state.path().join("agent"));
    cfg.uplink.ack_timeout_ms = 2_000;
    // The tests compare totals after a clean stop: close and send the last open windows.
    cfg.state.flush_on_exit = true;
    tune(&mut cfg);
    let agent = Agent::new(cfg).unwrap();
    let metrics = agent.metrics();
    let stop_agent = CancellationToken::new();
    let agent_task = {
        let t = stop_agent.clone();
        tokio::spawn(agent.run(async move { t.cancelled().await }))
    };
    // Its source subscription lands before readings are published (the uplink stays down).
    tap.wait_subscribed(&format!("edgewatch-{id}-src"), Duration::from_secs(10))
        .await;
    Outage {
        broker,
        _tap: tap,
        uplink_port,
        agent: metrics,
        stop_agent,
        agent_task,
        _state: state,
    }
}

fn fleet(port: u16, start_ms: i64, hours: u64, seed: u64) -> SimulatorConfig {
    let mut sim = SimulatorConfig::default();
    sim.mqtt.port = port;
    sim.devices = 3;
    sim.seed = seed;
    sim.interval_ms = 1000;
    sim.start_ms = Some(start_ms);
    sim.duration_ms = Some(hours * 3_600_000);
    sim.speedup = 2_000.0;
    sim.max_rate_per_sec = 25_000;
    sim.anomalies.rate_per_series_hour = 1.0;
    sim.anomalies.warmup_ms = 30 * 60_000;
    sim
}

/// Starts the cloud side on the agent's uplink port: mosquitto and one durable aggregator owning
/// every partition.
async fn cloud(
    port: u16,
    dir: &std::path::Path,
) -> (
    (Mosquitto, SubscriptionLog),
    std::net::SocketAddr,
    String,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), edgewatch_aggregator::AggregatorError>>,
) {
    let subscriptions = SubscriptionLog::new();
    let mosq = Mosquitto::start_on(
        port,
        &format!("persistence false\n{}", subscriptions.settings()),
    );
    let mut cfg = AggregatorConfig::with_id("agg-cloud");
    cfg.mqtt.port = port;
    cfg.http.listen = "127.0.0.1:0".into();
    cfg.state.dir = Some(dir.join("agg"));
    cfg.state.windows_per_series = 100_000;
    let agg = Aggregator::bind(cfg).await.unwrap();
    let (addr, url) = (agg.local_addr(), agg.feed_url());
    let stop = CancellationToken::new();
    let t = stop.clone();
    let task = tokio::spawn(agg.run(async move { t.cancelled().await }));
    subscriptions
        .wait_subscribed("edgewatch-agg-cloud", Duration::from_secs(10))
        .await;
    ((mosq, subscriptions), addr, url, stop, task)
}

fn status(addr: std::net::SocketAddr) -> serde_json::Value {
    get_json(addr, "/api/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_outbox_coarsens_and_evicts_during_a_long_outage_and_keeps_every_anomaly() {
    edgewatch::logging::init("warn");
    let o = agent_with_uplink_down("gw-outage", |cfg| {
        cfg.uplink.max_outbox_bytes = 40 * 1024;
        cfg.uplink.drain_records_per_sec = 50_000;
    })
    .await;
    // Six simulated hours while the uplink is down.
    let report = edgewatch_simulators::run(
        fleet(o.broker.addr().port(), 1_767_225_600_000, 6, 7),
        std::future::pending(),
    )
    .await
    .unwrap();
    wait_until(
        "the agent to process every reading",
        Duration::from_secs(120),
        || o.agent.readings_total.load(Relaxed) >= report.published,
    )
    .await;
    assert_eq!(o.agent.uplink_connected.load(Relaxed), 0);
    assert_eq!(
        o.agent.summaries_published_total.load(Relaxed),
        0,
        "nothing published while down"
    );
    let coarsened = o.agent.outbox_coarsened_total.load(Relaxed);
    assert!(coarsened > 0, "the budget forced coarsening");
    assert!(
        o.agent.outbox_evicted_total.load(Relaxed) > 0,
        "and then eviction of the oldest summaries"
    );
    assert!(
        o.agent.outbox_bytes.load(Relaxed) <= 192 * 1024
            || o.agent.outbox_over_budget_total.load(Relaxed) > 0,
        "the outbox keeps to its budget"
    );
    let raised = o.agent.anomalies_total.load(Relaxed);
    assert!(raised >= 5, "the fleet had anomalies to keep: {raised}");

    // The cloud comes back.
    let dir = tempfile::tempdir().unwrap();
    let (_mosq, addr, url, stop_agg, agg_task) = cloud(o.uplink_port, dir.path()).await;
    let feed = FeedClient::connect(&format!("{url}?last=100000")).await;
    wait_until("the backlog to drain", Duration::from_secs(60), || {
        o.agent.outbox_records.load(Relaxed) == 0
    })
    .await;
    o.stop_agent.cancel();
    o.agent_task.await.unwrap().unwrap();
    // Raised until the agent stopped: with the sensors quiet since the fleet ended, their
    // silences were raised too.
    let raised = o.agent.anomalies_total.load(Relaxed);

    // Every anomaly event arrived, once.
    wait_until("every anomaly on the feed", Duration::from_secs(20), || {
        feed.snapshot().len() as u64 >= raised
    })
    .await;
    let events = feed.snapshot();
    let ids: HashSet<_> = events.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids.len(), events.len(), "each event once");
    assert_eq!(events.len() as u64, raised);

    // Coarsening kept every reading (counts combine exactly); eviction lost only what it counted.
    let evicted = o.agent.outbox_evicted_readings_total.load(Relaxed);
    let expected =
        o.agent.readings_total.load(Relaxed) - o.agent.late_readings_total.load(Relaxed) - evicted;
    wait_until(
        "the aggregator to apply the backlog",
        Duration::from_secs(20),
        || status(addr)["readings"].as_u64() == Some(expected),
    )
    .await;
    let m = http_get(addr, "/metrics").1;
    assert!(m.contains("edgewatch_aggregator_acks_sent_total"), "{m}");
    eprintln!(
        "outage: {} readings, coarsened {coarsened}, evicted {} ({evicted} readings), {raised} events",
        o.agent.readings_total.load(Relaxed),
        o.agent.outbox_evicted_total.load(Relaxed)
    );
    stop_agg.cancel();
    agg_task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backlog_drains_in_order_while_live_anomalies_go_out_at_once() {
    edgewatch::logging::init("warn");
    let o = agent_with_uplink_down("gw-drain", |cfg| {
        // Slow enough that the drain takes seconds.
        cfg.uplink.drain_records_per_sec = 1_000;
    })
    .await;
    let start = 1_767_225_600_000;
    let report = edgewatch_simulators::run(
        fleet(o.broker.addr().port(), start, 3, 11),
        std::future::pending(),
    )
    .await
    .unwrap();
    wait_until(
        "the agent to process every reading",
        Duration::from_secs(120),
        || o.agent.readings_total.load(Relaxed) >= report.published,
    )
    .await;
    let backlog = o.agent.outbox_records.load(Relaxed);
    assert!(backlog > 2_000, "a backlog to drain: {backlog}");
    assert_eq!(o.agent.outbox_coarsened_total.load(Relaxed), 0);

    let dir = tempfile::tempdir().unwrap();
    let ((_mosq, subscriptions), addr, url, stop_agg, agg_task) =
        cloud(o.uplink_port, dir.path()).await;
    let feed = FeedClient::connect(&url).await;
    wait_until("the agent to reconnect", Duration::from_secs(20), || {
        o.agent.uplink_connected.load(Relaxed) == 1
    })
    .await;
    // Its acks subscription is in place: the drain is under way.
    subscriptions
        .wait_subscribed("edgewatch-gw-drain-up", Duration::from_secs(20))
        .await;
    let readings_before = status(addr)["readings"].as_u64().unwrap();

    // A live spike on a device during the drain reaches the feed long before the drain ends.
    let (client, mut el) = rumqttc::AsyncClient::new(
        rumqttc::MqttOptions::new("live-sensor", "127.0.0.1", o.broker.addr().port()),
        10,
    );
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    let live_ts = start + 3 * 3_600_000 + 5_000;
    client
        .publish(
            "sensors/dev-0000/temperature",
            rumqttc::QoS::AtLeastOnce,
            false,
            format!(r#"{{"ts":{live_ts},"value":1000000.0}}"#),
        )
        .await
        .unwrap();
    wait_until(
        "the live spike on the feed",
        Duration::from_secs(10),
        || feed.snapshot().iter().any(|e| e.ts_ms == live_ts),
    )
    .await;
    let left = o.agent.outbox_records.load(Relaxed);
    assert!(
        left > 0,
        "the live event overtook the backlog ({left} of {backlog} records still queued)"
    );
    let drained_meanwhile = status(addr)["readings"].as_u64().unwrap() - readings_before;
    assert!(drained_meanwhile > 0, "the drain was under way");

    wait_until("the backlog to drain", Duration::from_secs(60), || {
        o.agent.outbox_records.load(Relaxed) == 0
    })
    .await;
    assert!(o.agent.drained_records_total.load(Relaxed) >= backlog);
    o.stop_agent.cancel();
    o.agent_task.await.unwrap().unwrap();
    let expected = o.agent.readings_total.load(Relaxed) - o.agent.late_readings_total.load(Relaxed);
    wait_until(
        "every reading's window applied once",
        Duration::from_secs(20),
        || status(addr)["readings"].as_u64() == Some(expected),
    )
    .await;
    stop_agg.cancel();
    agg_task.await.unwrap().unwrap();
}
