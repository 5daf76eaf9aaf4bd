//! The dashboard in a real browser (Debian's headless chromium): the page connects to the feed and
//! shows recent anomaly events as table rows.

use crate::common::*;
use edgewatch_aggregator::{Aggregator, AggregatorConfig};
use edgewatch_models::wire::{event_id, AnomalyEvent, Batch, Sequenced, Topics};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_feed_events_in_a_real_browser() {
    let chromium = require("chromium");
    let broker = embedded_broker();
    let mut cfg = AggregatorConfig::with_id("agg-dash");
    cfg.mqtt.port = broker.addr().port();
    cfg.http.listen = "127.0.0.1:0".into();
    let agg = Aggregator::bind(cfg).await.unwrap();
    let addr = agg.local_addr();
    let stop = CancellationToken::new();
    let task = {
        let t = stop.clone();
        tokio::spawn(agg.run(async move { t.cancelled().await }))
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    // One anomaly event, published the way an agent does.
    let (client, mut el) = AsyncClient::new(
        MqttOptions::new("dash-pub", "127.0.0.1", broker.addr().port()),
        10,
    );
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    let event = AnomalyEvent {
        id: event_id("pump-42", "vibration", 1_767_225_600_000, "ensemble"),
        device: "pump-42".into(),
        metric: "vibration".into(),
        ts_ms: 1_767_225_600_000,
        value: 9.75,
        score: 0.97,
        detector: "ensemble".into(),
        window_start_ms: 1_767_225_600_000,
        agent: "gw-dash".into(),
    };
    // The device's own partition: an aggregator refuses an event filed under another one.
    let partition = edgewatch_models::partition::partition_of("pump-42", 64);
    let batch = Batch {
        agent: "gw-dash".into(),
        partition,
        records: vec![Sequenced {
            seq: 1,
            prev: None,
            item: event,
        }],
        acked: 0,
        epoch: 0,
    };
    client
        .publish(
            Topics::new("edgewatch/v1").anomalies(partition, "gw-dash"),
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&batch).unwrap(),
        )
        .await
        .unwrap();
    wait_until(
        "the event in the feed history",
        Duration::from_secs(10),
        || get_json(addr, "/api/status")["feed_history"] == 1,
    )
    .await;

    let profile = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("http://{addr}/"))
        .output()
        .await
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("<td>pump-42</td>"),
        "the event row is on the page:\n{dom}"
    );
    assert!(
        dom.contains("<td>vibration</td>") && dom.contains("0.970"),
        "{dom}"
    );
    assert!(
        dom.contains("agg-dash"),
        "the status header names the aggregator"
    );

    stop.cancel();
    task.await.unwrap().unwrap();
}
