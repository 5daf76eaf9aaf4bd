//! Interoperability with Debian's mosquitto: readings published with `mosquitto_pub` through a real
//! mosquitto broker reach the live feed of an aggregator connected to the same broker.

use crate::common::*;
use crate::wait::SubscriptionLog;
use edgewatch_agent::{Agent, AgentConfig};
use edgewatch_aggregator::{Aggregator, AggregatorConfig};
use edgewatch_models::detect::{DetectorConfig, ZScoreConfig};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_from_mosquitto_pub_reach_the_feed() {
    let pub_bin = require("mosquitto_pub");
    let subscriptions = SubscriptionLog::new();
    let broker = Mosquitto::start_on(
        free_port(),
        &format!("persistence false\n{}", subscriptions.settings()),
    );

    let mut agg_cfg = AggregatorConfig::with_id("agg-mosq");
    agg_cfg.mqtt.port = broker.port;
    agg_cfg.http.listen = "127.0.0.1:0".into();
    let agg = Aggregator::bind(agg_cfg).await.unwrap();
    let url = agg.feed_url();
    let http = agg.local_addr();
    let stop = CancellationToken::new();
    let agg_task = {
        let t = stop.clone();
        tokio::spawn(agg.run(async move { t.cancelled().await }))
    };

    let mut cfg = AgentConfig::with_id("gw-mosq");
    cfg.source.mqtt.port = broker.port;
    cfg.detector = DetectorConfig::Zscore(ZScoreConfig {
        window: 50,
        warmup: 20,
        z_max: 8.0,
    });
    cfg.anomaly.threshold = Some(0.75);
    cfg.window.size_ms = 10_000;
    let agent = Agent::new(cfg).unwrap();
    let agent_task = {
        let t = stop.clone();
        tokio::spawn(agent.run(async move { t.cancelled().await }))
    };
    let feed = FeedClient::connect(&url).await;
    // The agent's and the aggregator's subscriptions land before anything is published.
    for client in ["edgewatch-gw-mosq-src", "edgewatch-agg-mosq"] {
        subscriptions
            .wait_subscribed(client, Duration::from_secs(10))
            .await;
    }

    // 60 ordinary readings, a spike, then more ordinary ones, one message per line.
    let start = 1_767_225_600_000i64;
    let mut lines = String::new();
    for i in 0..80i64 {
        let v = if i == 60 {
            95.0
        } else {
            20.0 + (i % 4) as f64 * 0.25
        };
        lines.push_str(&format!("{{\"ts\":{},\"value\":{v}}}\n", start + i * 1000));
    }
    let mut child = Command::new(pub_bin)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port.to_string(),
            "-q",
            "1",
            "-t",
            "sensors/boiler-3/temperature",
            "-l",
        ])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(lines.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "mosquitto_pub failed");

    wait_until("the spike on the feed", Duration::from_secs(20), || {
        !feed.snapshot().is_empty()
    })
    .await;
    let events = feed.snapshot();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        (events[0].device.as_str(), events[0].metric.as_str()),
        ("boiler-3", "temperature")
    );
    assert_eq!(events[0].ts_ms, start + 60_000);
    assert_eq!(events[0].value, 95.0);

    // Windows reached the aggregator through mosquitto too.
    wait_until("windows applied", Duration::from_secs(20), || {
        get_json(http, "/api/status")["summaries_applied"]
            .as_u64()
            .unwrap_or(0)
            >= 7
    })
    .await;

    stop.cancel();
    agent_task.await.unwrap().unwrap();
    agg_task.await.unwrap().unwrap();
}
