//! The dashboard in a real browser (Debian's headless chromium): the page connects to the feed and
//! shows recent anomaly events as table rows, behind a bearer token, which it never puts in a URL
//! (the feed's WebSocket gets a single-use ticket instead).

use crate::common::*;
use crate::wait::SubAckTap;
use edgewatch_aggregator::{Aggregator, AggregatorConfig};
use edgewatch_models::wire::{event_id, AnomalyEvent, Batch, Sequenced, Topics};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_feed_events_in_a_real_browser() {
    let chromium = require("chromium");
    std::env::set_var("EDGEWATCH_IT_DASH_TOKEN", "dash-s3cret");
    let broker = embedded_broker();
    // Through the tap, so the test sees the aggregator's subscriptions land.
    let tap = SubAckTap::start(broker.addr()).await;
    let mut cfg = AggregatorConfig::with_id("agg-dash");
    cfg.mqtt.port = tap.port();
    cfg.http.listen = "127.0.0.1:0".into();
    cfg.http.auth_token_env = Some("EDGEWATCH_IT_DASH_TOKEN".into());
    let agg = Aggregator::bind(cfg).await.unwrap();
    let addr = agg.local_addr();
    let stop = CancellationToken::new();
    let task = {
        let t = stop.clone();
        tokio::spawn(agg.run(async move { t.cancelled().await }))
    };
    tap.wait_subscribed("edgewatch-agg-dash", Duration::from_secs(10))
        .await;

    // One anomaly event, published the way an agent does.
    let (client, mut el) = AsyncClient::new(
        MqttOptions::new("dash-pub", "127.0.0.1", broker.addr().port()),
        10,
    );
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    let event = AnomalyEvent {
        phase: edgewatch_models::wire::EventPhase::Onset,
        model_version: None,
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
        || {
            let (_, body) = get_authorized(addr, "/api/status", "dash-s3cret");
            serde_json::from_str::<serde_json::Value>(&body).unwrap()["feed_history"] == 1
        },
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
        // The token in the fragment (never sent to the server); the page moves it to its tab's
        // storage and trades it for a feed ticket.
        .arg(format!("http://{addr}/#token=dash-s3cret"))
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
    assert!(
        !dom.contains("dash-s3cret"),
        "the token is not left on the page"
    );

    stop.cancel();
    task.await.unwrap().unwrap();
}

/// GET with `Authorization: Bearer <token>`; (status, body).
fn get_authorized(addr: std::net::SocketAddr, path: &str, token: &str) -> (u16, String) {
    let addr = addr.to_string();
    let r = edgewatch_tools::http::Get::new(&addr, path)
        .bearer(Some(token))
        .send_blocking()
        .unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"));
    (r.status, r.text())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_opens_the_feed_with_a_ticket_never_a_token() {
    let broker = embedded_broker();
    let mut cfg = AggregatorConfig::with_id("agg-dash-html");
    cfg.mqtt.port = broker.addr().port();
    cfg.http.listen = "127.0.0.1:0".into();
    let agg = Aggregator::bind(cfg).await.unwrap();
    let addr = agg.local_addr();
    let stop = CancellationToken::new();
    let task = {
        let t = stop.clone();
        tokio::spawn(agg.run(async move { t.cancelled().await }))
    };
    let (status, html) = tokio::task::spawn_blocking(move || http_get(addr, "/"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    // Issue 13: `?token=` in the WebSocket URL reached proxy logs and browser history.
    assert!(
        !html.contains("searchParams.set('token'"),
        "the page puts no token in a URL"
    );
    assert!(html.contains("fetch('api/feed/ticket', { method: 'POST'"));
    assert!(html.contains("url.searchParams.set('ticket', t)"));
    assert!(
        html.contains("history.replaceState"),
        "a #token= fragment is taken out of the address bar"
    );
    // Without a configured token the page's flow is the same: tickets are issued to anyone, and
    // the feed ignores them.
    let raw = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "POST /api/feed/ticket HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        raw
    })
    .await
    .unwrap();
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    let ticket: serde_json::Value =
        serde_json::from_str(raw.split_once("\r\n\r\n").unwrap().1).unwrap();
    let url = format!(
        "ws://{addr}/feed?last=200&ticket={}",
        ticket["ticket"].as_str().unwrap()
    );
    assert!(
        tokio_tungstenite::connect_async(url.as_str()).await.is_ok(),
        "{url}"
    );
    stop.cancel();
    task.await.unwrap().unwrap();
}
