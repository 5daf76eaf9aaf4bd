//! The dashboard in a real browser: Debian's headless chromium driven over the DevTools protocol
//! (`browser.rs`), against aggregators fed by a test publisher. Checks:
//! - a 401 shows the token prompt, and the page works once the token is typed in;
//! - the fleet page shows the right device count, the device list and the anomaly-rate chart;
//! - a device (reached by clicking it) draws one chart point per window and a marker per event;
//! - an anomaly published while the live page is open appears on it within 2 s; pause holds
//!   events back; filters come from the URL; a `#token=` fragment works and leaves the URL;
//! - the live page's states when its aggregator goes away and comes back ("disconnected,
//!   retrying in N s", "resumed from event X"), each event shown once;
//! - hostile device ids are text, their links work; windows near f64::MAX draw finite charts;
//! - the fleet-wide API's answers (faked by the browser) are read as the contract says.
//!
//! Screenshots of each page go to `target/it-screenshots/`. With `EDGEWATCH_SCREENSHOT_URL` set
//! (a running demo, e.g. `http://127.0.0.1:18080`), the first test also photographs that
//! dashboard's three pages into `docs/img/` for the README.
//!
//! Also without a browser: pages and assets are public and typed, cached by `ETag`, under a CSP;
//! the API and `/api/anomalies/rate` need the token; tokens never go into a URL.

use crate::browser::{screenshot_dir, Browser};
use crate::common::*;
use crate::wait::SubAckTap;
use edgewatch_aggregator::{Aggregator, AggregatorConfig};
use edgewatch_models::partition::partition_of;
use edgewatch_models::wire::{event_id, AnomalyEvent, Batch, Sequenced, Topics, WindowSummary};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "dash-s3cret";
const AGENT: &str = "gw-dash";
const DEVICES: usize = 7;
const METRICS: [&str; 2] = ["temperature", "vibration"];
const WINDOWS: i64 = 12;
const WINDOW_MS: i64 = 60_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_pages_work_in_a_real_browser() {
    std::env::set_var("EDGEWATCH_IT_DASH_TOKEN", TOKEN);
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
    let (client, mut el) = AsyncClient::new(
        MqttOptions::new("dash-pub", "127.0.0.1", broker.addr().port()),
        100,
    );
    tokio::spawn(async move {
        loop {
            if let Err(e) = el.poll().await {
                eprintln!("test publisher: {e} (reconnecting)");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });

    // Seven devices, two metrics, twelve one-minute windows each, ending now; three anomalies
    // of pump-1's vibration inside its windows.
    let start = (now_ms() / WINDOW_MS - WINDOWS) * WINDOW_MS;
    // Events share their lane's seqs with summaries: one counter per partition.
    let mut seqs = BTreeMap::new();
    publish_windows(&client, &mut seqs, start).await;
    let events: Vec<AnomalyEvent> = (0..3)
        .map(|i| {
            event(
                "pump-1",
                "vibration",
                start + (2 + 4 * i) * WINDOW_MS + 30_000,
                0.9 + 0.04 * i as f64,
            )
        })
        .collect();
    for e in &events {
        publish_event(&client, &mut seqs, e.clone()).await;
    }
    wait_until(
        "the windows applied and the events in the feed history",
        Duration::from_secs(15),
        || {
            let s = api(addr, "/api/status");
            s["summaries_applied"] == DEVICES as u64 * METRICS.len() as u64 * WINDOWS as u64
                && s["feed_history"] == 3
        },
    )
    .await;
    let held = api(addr, "/api/devices/pump-1");
    let vibration_windows = held["state"]["metrics"]["vibration"]["windows"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(vibration_windows, WINDOWS as usize, "{held}");

    let shots = screenshot_dir();
    let mut b = Browser::start().await;
    let base = format!("http://{addr}");

    // The fleet page, without a token: the API's 401 brings up the prompt.
    b.navigate(&format!("{base}/")).await;
    b.wait_for(
        "the token prompt",
        "!!document.getElementById('token-input')",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        b.text("#devices-count").await,
        "—",
        "no data without the token"
    );
    assert_eq!(b.text("#conn").await, "token required");
    b.eval("document.getElementById('token-input').focus()")
        .await;
    b.call("Input.insertText", json!({ "text": TOKEN })).await;
    b.eval("document.querySelector('#login button').click()")
        .await;
    b.wait_for(
        "the device count after the token",
        &format!("document.getElementById('devices-count').textContent === '{DEVICES}'"),
        Duration::from_secs(10),
    )
    .await;
    assert!(b.eval("document.getElementById('login') === null").await == true);
    assert_eq!(
        b.eval("sessionStorage.getItem('edgewatch.token')").await,
        TOKEN,
        "kept for the session"
    );
    assert!(!b
        .eval("location.href")
        .await
        .as_str()
        .unwrap()
        .contains(TOKEN));
    assert_eq!(b.text("#agg").await, "agg-dash");
    assert_eq!(
        b.eval("document.querySelectorAll('#devices tr[data-device]').length")
            .await,
        DEVICES,
        "every device listed (one page)"
    );
    b.wait_for(
        "the anomaly-rate chart with the three events",
        "(() => { const s = document.querySelector('#rate-chart svg'); return s && s.dataset.points === '60' \
         && [...s.querySelectorAll('.bars rect')].length === 60; })()",
        Duration::from_secs(10),
    )
    .await;
    let rate = api(addr, "/api/anomalies/rate?bucket_ms=60000&buckets=60");
    assert_eq!(
        rate["counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap())
            .sum::<u64>(),
        3,
        "{rate}"
    );
    assert_eq!(
        b.eval("document.querySelectorAll('#strip rect').length")
            .await,
        64,
        "a cell per partition"
    );
    b.screenshot(&shots.join("fleet.png")).await;

    // A device, reached by clicking it: a point per window, a marker per event, a score bar
    // per window, and its events listed.
    b.eval("document.querySelector('#devices a[href=\"device?id=pump-1\"]').click()")
        .await;
    b.wait_for(
        "pump-1's vibration chart",
        "(() => { const l = document.querySelector('[data-metric=\"vibration\"] polyline.mean'); \
         return !!l && location.search === '?id=pump-1'; })()",
        Duration::from_secs(10),
    )
    .await;
    for metric in METRICS {
        let points = b
            .eval(&format!(
                "document.querySelector('[data-metric=\"{metric}\"] polyline.mean').points.numberOfItems"
            ))
            .await;
        assert_eq!(points, WINDOWS, "{metric}: one point per window");
        let bars = b
            .eval(&format!(
                "document.querySelectorAll('[data-metric=\"{metric}\"] svg.scores .bars rect').length"
            ))
            .await;
        assert_eq!(bars, WINDOWS, "{metric}: one score bar per window");
    }
    b.wait_for(
        "the three anomaly markers (from the feed)",
        "document.querySelectorAll('[data-metric=\"vibration\"] circle.marker').length === 3",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        b.eval("document.querySelectorAll('[data-metric=\"temperature\"] circle.marker').length")
            .await,
        0
    );
    assert_eq!(
        b.eval("document.querySelectorAll('#events tr.event').length")
            .await,
        3
    );
    assert!(
        b.eval("document.getElementById('token-input') === null")
            .await
            == true,
        "the token carried over to the next page"
    );
    b.screenshot(&shots.join("device.png")).await;

    // The live page: the history first, then an event published now shows within 2 s.
    b.navigate(&format!("{base}/live")).await;
    b.wait_for(
        "the feed's history on the live page",
        "document.querySelectorAll('#rows tr.event').length === 3 && document.getElementById('conn').textContent === 'live'",
        Duration::from_secs(10),
    )
    .await;
    assert!(
        b.eval("document.getElementById('time-head').textContent")
            .await
            .as_str()
            .unwrap()
            .starts_with("time ("),
        "the time column names its zone"
    );
    let fresh = event("pump-3", "temperature", now_ms(), 0.99);
    publish_event(&client, &mut seqs, fresh.clone()).await;
    let published = Instant::now();
    b.wait_for(
        "the event published during the test",
        &format!(
            "!!document.querySelector('#rows tr.event[data-id=\"{}\"]')",
            fresh.id
        ),
        Duration::from_secs(2),
    )
    .await;
    eprintln!(
        "live page showed the event {:?} after publishing",
        published.elapsed()
    );
    assert_eq!(
        b.eval("document.querySelector('#rows tr.event').dataset.id")
            .await,
        fresh.id.as_str(),
        "newest first"
    );
    b.screenshot(&shots.join("live.png")).await;

    // Pause keeps new events aside (and says how many); resume shows them.
    b.eval("document.getElementById('pause').click()").await;
    let held_back = event("pump-4", "vibration", now_ms(), 0.8);
    publish_event(&client, &mut seqs, held_back.clone()).await;
    b.wait_for(
        "the paused page counting the new event",
        "document.getElementById('paused').textContent.startsWith('paused: 1 new')",
        Duration::from_secs(5),
    )
    .await;
    let row = format!(
        "!!document.querySelector('#rows tr.event[data-id=\"{}\"]')",
        held_back.id
    );
    assert!(b.eval(&row).await == false, "not shown while paused");
    b.eval("document.getElementById('pause').click()").await;
    assert!(b.eval(&row).await == true, "shown on resume");
    assert_eq!(b.text("#count").await, "5");

    // Filters come from the URL: the server filters by metric and score, the page by detector.
    b.navigate(&format!(
        "{base}/live?metric=vibration&min_score=0.95&detector=ensemble"
    ))
    .await;
    b.wait_for(
        "the filtered feed",
        "document.getElementById('conn').textContent === 'live' && document.querySelectorAll('#rows tr.event').length === 1",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        b.eval("document.getElementById('f-metric').value").await,
        "vibration"
    );
    assert_eq!(
        b.eval("document.getElementById('f-min-score').value").await,
        "0.95"
    );
    // A detector that matches nothing leaves the hint, which says the feed is live.
    b.navigate(&format!("{base}/live?detector=pca")).await;
    b.wait_for(
        "the warm-up hint",
        "document.getElementById('conn').textContent === 'live' && /no anomaly matching these filters has arrived yet/.test(document.getElementById('hint').textContent)",
        Duration::from_secs(10),
    )
    .await;

    // A fresh tab's token from the fragment, which the page takes out of the address bar.
    b.eval("sessionStorage.clear()").await;
    b.navigate(&format!("{base}/live#token={TOKEN}")).await;
    b.wait_for(
        "the feed with a token from the fragment",
        "document.querySelectorAll('#rows tr.event').length === 5",
        Duration::from_secs(10),
    )
    .await;
    assert!(!b
        .eval("location.href")
        .await
        .as_str()
        .unwrap()
        .contains(TOKEN));
    assert!(
        b.eval("document.body.innerHTML.includes('dash-s3cret')")
            .await
            == false
    );

    if let Ok(url) = std::env::var("EDGEWATCH_SCREENSHOT_URL") {
        photograph_demo(&mut b, url.trim_end_matches('/')).await;
    }

    drop(b);
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_page_says_when_it_lost_the_feed_and_where_it_resumed() {
    let broker = embedded_broker();
    let mut cfg = AggregatorConfig::with_id("agg-dash-resume");
    cfg.mqtt.port = broker.addr().port();
    cfg.http.listen = "127.0.0.1:0".into();
    let agg = Aggregator::bind(cfg.clone()).await.unwrap();
    let addr = agg.local_addr();
    let run = |agg: Aggregator| {
        let stop = CancellationToken::new();
        let t = stop.clone();
        (
            stop,
            tokio::spawn(agg.run(async move { t.cancelled().await })),
        )
    };
    let (stop, task) = run(agg);
    let (client, mut el) = AsyncClient::new(
        MqttOptions::new("dash-resume-pub", "127.0.0.1", broker.addr().port()),
        100,
    );
    tokio::spawn(async move {
        loop {
            if el.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let mut seqs = BTreeMap::new();
    let first = event("pump-1", "vibration", now_ms(), 0.9);
    publish_until_held(addr, &client, &mut seqs, &first, 1).await;

    let mut b = Browser::start().await;
    b.navigate(&format!("http://{addr}/live")).await;
    b.wait_for(
        "the first event, live",
        &format!(
            "document.getElementById('conn').textContent === 'live' && !!document.querySelector('tr[data-id=\"{}\"]')",
            first.id
        ),
        Duration::from_secs(10),
    )
    .await;

    // The aggregator goes away: the page says so and counts down to its next try.
    stop.cancel();
    task.await.unwrap().unwrap();
    b.wait_for(
        "the disconnected state",
        "/^disconnected, retrying in [0-9]+ s$/.test(document.getElementById('conn').textContent)",
        Duration::from_secs(10),
    )
    .await;

    // Back on the same port: the page reconnects by itself, resuming after the last event it had.
    cfg.http.listen = addr.to_string();
    let (stop, task) = run(Aggregator::bind(cfg).await.unwrap());
    let second = event("pump-2", "temperature", now_ms(), 0.95);
    publish_until_held(addr, &client, &mut seqs, &second, 1).await;
    b.wait_for(
        "the resumed state and the event published meanwhile",
        &format!(
            "document.getElementById('conn').textContent === 'live — resumed from event {}…' && !!document.querySelector('tr[data-id=\"{}\"]')",
            &first.id[..12],
            second.id
        ),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        b.eval("document.querySelectorAll('#rows tr.event').length")
            .await,
        2,
        "each event once"
    );
    assert!(
        b.text("tr.control[data-type=closed]")
            .await
            .contains("server shutting down"),
        "the server's close reason is shown"
    );
    // The restarted aggregator kept no history (no state.dir): it cannot resume after the page's
    // last event and says so with a gap marker, which the page shows as a row of its own.
    assert!(
        b.text("tr.control[data-type=gap]")
            .await
            .contains("gap — events may be missing here"),
        "the gap marker is shown"
    );
    b.screenshot(&screenshot_dir().join("live-resumed.png"))
        .await;
    drop(b);
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pages_read_the_fleet_wide_api_of_the_contract() {
    // The fleet-wide answers (built in parallel by the API work) given by the browser itself,
    // so the pages' reading of them is checked before any server gives them.
    let broker = embedded_broker();
    let mut cfg = AggregatorConfig::with_id("agg-a");
    cfg.mqtt.port = broker.addr().port();
    cfg.http.listen = "127.0.0.1:0".into();
    let agg = Aggregator::bind(cfg).await.unwrap();
    let addr = agg.local_addr();
    let stop = CancellationToken::new();
    let task = {
        let t = stop.clone();
        tokio::spawn(agg.run(async move { t.cancelled().await }))
    };
    let now = now_ms();
    let status = json!({
        "id": "agg-a", "partitions": 8, "owned": [0, 1, 2, 3], "devices": 2, "readings": 100,
        "lanes": 0, "lane_progress": [], "summaries_applied": 0, "anomalies_received": 5,
        "bad_messages": 0, "feed_clients": 0, "uptime_secs": 10,
        "fleet": {"devices": 40, "readings": 123456, "anomalies": 77,
            "aggregators": [
                {"id": "agg-a", "http": format!("http://{addr}"), "partitions": [0, 1, 2, 3], "online": true, "age_ms": 800},
                {"id": "agg-b", "http": "http://127.0.0.1:9", "partitions": [4, 5], "online": false, "age_ms": 60000}],
            "uncovered": [6, 7], "overlapping": []}
    });
    let devices: Vec<Value> = (0..25)
        .map(|i| json!({"device": format!("dev-{i}"), "partition": i % 6, "owner": if i % 6 < 4 { "agg-a" } else { "agg-b" },
            "agent": "gw-1", "last_seen_ms": now - if i < 20 { 1_000 } else { 600_000 }, "readings": 1000 + i,
            "anomalies": i % 3, "metrics": ["m"], "last_anomaly_ms": null}))
        .collect();
    let page = json!({"aggregator": "agg-a", "scope": "fleet", "total": 40, "offset": 0, "limit": 25,
        "devices": devices, "missing_partitions": [6, 7]});
    let start = (now / WINDOW_MS - 5) * WINDOW_MS;
    let windows: Vec<Value> = (0..5)
        .map(|i| json!({"device": "dev-1", "metric": "m", "start_ms": start + i * WINDOW_MS,
            "end_ms": start + (i + 1) * WINDOW_MS, "count": 60, "min": 1.0, "max": 3.0, "mean": 2.0 + i as f64 * 0.1,
            "std": 0.5, "first_ts_ms": start + i * WINDOW_MS, "last_ts_ms": start + i * WINDOW_MS + 59_000,
            "max_score": 0.2, "revision": 0}))
        .collect();
    let events: Vec<Value> = (0..2)
        .map(|i| {
            serde_json::to_value(event(
                "dev-1",
                "m",
                start + (1 + 2 * i) * WINDOW_MS + 10_000,
                0.9,
            ))
            .unwrap()
        })
        .collect();
    let device = json!({"device": "dev-1", "partition": 1, "owner": "agg-a", "agent": "gw-1", "last_seen_ms": now - 1_000,
        "state": {"metrics": {"m": {"windows": windows, "windows_applied": 5, "readings": 300, "anomalies": 2, "last_anomaly": null}}},
        "events": events});
    let mut b = Browser::start().await;
    b.fake(vec![
        ("/api/status", status),
        ("/api/agents", json!({"total": 3, "offset": 0, "limit": 1, "online": 1, "offline": 1, "stale": 1, "agents": []})),
        ("seen_within_ms=120000", json!({"scope": "fleet", "total": 30, "offset": 0, "limit": 1, "devices": [], "missing_partitions": []})),
        ("/api/devices?", page),
        ("/api/devices/dev-1", device),
    ])
    .await;
    b.navigate(&format!("http://{addr}/")).await;
    b.wait_for(
        "the fleet's count",
        "document.getElementById('devices-count').textContent === '40'",
        Duration::from_secs(10),
    )
    .await;
    b.wait_for(
        "the owners",
        "document.querySelectorAll('#owners tr').length === 2",
        Duration::from_secs(10),
    )
    .await;
    for (selector, want) in [
        ("#devices-scope", "(fleet)"),
        ("#devices-sub", "30 online, 10 silent for 2 min or more"),
        ("#readings", "123 k"),
        ("#anomalies", "77"),
        ("#aggs", "1 / 2"),
        ("#agents-count", "3"),
        (
            "#agents-sub",
            "1 online, 1 offline, 1 silent (fleet, from their status)",
        ),
        ("#page", "1–25 of 40"),
    ] {
        assert_eq!(b.text(selector).await, want, "{selector}");
    }
    assert!(b.text("#coverage").await.contains("No owner: 6-7"));
    assert!(b.text("#owners").await.contains("offline"));
    assert!(b
        .text("#list-note")
        .await
        .contains("whole fleet — partitions not answering: 6-7"));
    assert_eq!(
        b.eval("document.querySelectorAll('#devices tr.silent').length")
            .await,
        5,
        "silent devices stand out"
    );
    assert_eq!(
        b.eval("document.querySelectorAll('#strip rect')[6].textContent")
            .await,
        "partition 6: NO OWNER"
    );
    b.screenshot(&screenshot_dir().join("fleet-contract.png"))
        .await;
    b.eval("document.querySelector('#devices a[href=\"device?id=dev-1\"]').click()")
        .await;
    b.wait_for(
        "the device of the contract",
        "!!document.querySelector('polyline.mean') && document.querySelector('polyline.mean').points.numberOfItems === 5",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        b.eval("document.querySelectorAll('#events tr.event').length")
            .await,
        2,
        "the answer's own events"
    );
    assert_eq!(
        b.eval("document.querySelectorAll('circle.marker').length")
            .await,
        2
    );
    let facts = b.text("#facts").await;
    assert!(
        facts.contains("agg-a") && facts.contains("gw-1") && facts.contains("last seen"),
        "{facts}"
    );
    drop(b);
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_device_ids_and_huge_values_are_shown_as_text_and_drawn() {
    let broker = embedded_broker();
    let mut cfg = AggregatorConfig::with_id("agg-dash-hostile");
    cfg.mqtt.port = broker.addr().port();
    cfg.http.listen = "127.0.0.1:0".into();
    let agg = Aggregator::bind(cfg).await.unwrap();
    let addr = agg.local_addr();
    let stop = CancellationToken::new();
    let task = {
        let t = stop.clone();
        tokio::spawn(agg.run(async move { t.cancelled().await }))
    };
    let (client, mut el) = AsyncClient::new(
        MqttOptions::new("dash-hostile-pub", "127.0.0.1", broker.addr().port()),
        100,
    );
    tokio::spawn(async move {
        loop {
            if el.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    // Markup, a query separator, a slash, a space and non-ASCII in one id; values at the edge
    // of f64 in its windows.
    let device = "<img src=x onerror=\"window.pwned=1\">&id=/ü x";
    let mut seqs = BTreeMap::new();
    let start = (now_ms() / WINDOW_MS - 4) * WINDOW_MS;
    let partition = partition_of(device, 64);
    let values = [
        (1.0, 0.5, 1.5),
        (1e300, -1e300, 1.7e308),
        (-1e-300, -2.0, 3.0),
        (2.0, 1.0, 3.0),
    ];
    let records: Vec<Sequenced<WindowSummary>> = values
        .iter()
        .enumerate()
        .map(|(i, &(mean, min, max))| {
            let s = start + i as i64 * WINDOW_MS;
            Sequenced {
                seq: i as u64 + 1,
                prev: None,
                item: WindowSummary {
                    device: device.into(),
                    metric: "m".into(),
                    start_ms: s,
                    end_ms: s + WINDOW_MS,
                    count: 10,
                    min,
                    max,
                    mean,
                    std: 0.0,
                    first_ts_ms: s,
                    last_ts_ms: s + 1_000,
                    max_score: 1.0,
                    revision: 0,
                },
            }
        })
        .collect();
    seqs.insert(partition, values.len() as u64);
    let hostile = event(device, "m", start + WINDOW_MS + 5, 1.0);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        // Until the aggregator, perhaps still subscribing, has both.
        publish_summaries(&client, AGENT, partition, records.clone()).await;
        publish_event(&client, &mut seqs, hostile.clone()).await;
        let s = tokio::task::spawn_blocking(move || get_json(addr, "/api/status"))
            .await
            .unwrap();
        if s["devices"] == 1 && s["feed_history"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "never applied: {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let mut b = Browser::start().await;
    b.navigate(&format!("http://{addr}/")).await;
    b.wait_for(
        "the hostile device listed",
        "document.querySelectorAll('#devices tr[data-device]').length === 1",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(b.text("#devices a.device").await, device, "the id as text");
    let no_markup = "document.querySelectorAll('img').length === 0 && window.pwned === undefined";
    assert!(
        b.eval(no_markup).await == true,
        "no element made from the id"
    );
    b.eval("document.querySelector('#devices a.device').click()")
        .await;
    b.wait_for(
        "its device page, with a chart of its four windows",
        "!!document.querySelector('polyline.mean') && document.querySelector('polyline.mean').points.numberOfItems === 4",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        b.text("#title").await,
        format!("Device {device}"),
        "the id survived the link"
    );
    let drawn = b
        .eval("[...document.querySelectorAll('svg.chart polyline, svg.chart polygon, svg.chart circle, svg.chart rect')].every((e) => !/NaN|Infinity/.test(e.outerHTML))")
        .await;
    assert!(drawn == true, "every coordinate finite");
    // Axis ticks stay few for any range: huge, tiny against their magnitude, far-flung times.
    let ticks = b
        .eval(
            "import('./assets/chart.js').then((m) => [m.niceTicks(1e17, 1e17 + 16), \
             m.niceTicks(-1.7e308, 1.7e308), m.niceTicks(0, 5e-324), \
             m.timeTicks(-8.64e15, 8.64e15).ticks].map((t) => t.length))",
        )
        .await;
    assert!(
        ticks
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n.as_u64().unwrap() <= 14),
        "{ticks}"
    );
    assert!(b.eval(no_markup).await == true);
    b.navigate(&format!("http://{addr}/live")).await;
    b.wait_for(
        "its event on the live page",
        "document.querySelectorAll('#rows tr.event').length === 1",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(b.text("#rows tr.event a.device").await, device);
    assert!(b.eval(no_markup).await == true);
    drop(b);
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// Publishes `e` (again, with the lane's next seq: it is deduplicated by id) until the
/// aggregator at `addr` holds `held` events in its feed history: it may still be subscribing.
async fn publish_until_held(
    addr: SocketAddr,
    client: &AsyncClient,
    seqs: &mut BTreeMap<u32, u64>,
    e: &AnomalyEvent,
    held: u64,
) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        publish_event(client, seqs, e.clone()).await;
        let history = tokio::task::spawn_blocking(move || get_json(addr, "/api/status"))
            .await
            .unwrap()["feed_history"]
            .as_u64();
        if history >= Some(held) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "aggregator at {addr} never held event {}",
            e.id
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The README's pictures: the three pages of a running dashboard (no token), into `docs/img/`.
async fn photograph_demo(b: &mut Browser, base: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/img");
    std::fs::create_dir_all(&dir).unwrap();
    b.eval("sessionStorage.clear()").await;
    b.navigate(&format!("{base}/")).await;
    b.wait_for(
        "the demo's fleet page",
        "document.querySelectorAll('#devices tr[data-device]').length > 0 && /readings\\/s/.test(document.getElementById('ingest').textContent)",
        Duration::from_secs(30),
    )
    .await;
    let listed = b
        .eval("JSON.stringify([...document.querySelectorAll('#devices tr[data-device]')].map((r) => r.dataset.device))")
        .await;
    let listed = listed.as_str().unwrap().to_string();
    b.screenshot_viewport(&dir.join("fleet.png")).await;
    b.navigate(&format!("{base}/live")).await;
    b.wait_for(
        "the demo's live page",
        "document.querySelectorAll('#rows tr.event').length >= 10",
        Duration::from_secs(60),
    )
    .await;
    b.screenshot_viewport(&dir.join("live.png")).await;
    // The device of the newest event that this aggregator can show, reached by clicking it.
    let click = format!(
        "(() => {{ const known = new Set({listed}); const a = [...document.querySelectorAll('#rows tr.event td:nth-child(2) a')].find((a) => known.has(a.textContent)); if (a) a.click(); return !!a; }})()"
    );
    assert!(
        b.eval(&click).await == true,
        "no event of a device listed by {base}"
    );
    b.wait_for(
        "the demo's device page",
        "location.pathname.endsWith('/device') && document.querySelectorAll('polyline.mean').length > 0",
        Duration::from_secs(30),
    )
    .await;
    // Its anomaly marker, when its event falls inside the windows held (not guaranteed).
    b.wait_a_while(
        "document.querySelectorAll('circle.marker').length > 0",
        Duration::from_secs(10),
    )
    .await;
    // The whole page: every metric's chart.
    b.screenshot(&dir.join("device.png")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_are_public_typed_and_cached_while_the_api_needs_the_token() {
    std::env::set_var("EDGEWATCH_IT_DASH_TOKEN", TOKEN);
    let broker = embedded_broker();
    let mut cfg = AggregatorConfig::with_id("agg-dash-html");
    cfg.mqtt.port = broker.addr().port();
    cfg.http.listen = "127.0.0.1:0".into();
    cfg.http.auth_token_env = Some("EDGEWATCH_IT_DASH_TOKEN".into());
    let agg = Aggregator::bind(cfg).await.unwrap();
    let addr = agg.local_addr();
    let stop = CancellationToken::new();
    let task = {
        let t = stop.clone();
        tokio::spawn(agg.run(async move { t.cancelled().await }))
    };
    let checks = tokio::task::spawn_blocking(move || {
        for (path, kind) in [
            ("/", "text/html"),
            ("/live", "text/html"),
            ("/device", "text/html"),
            ("/device?id=pump%2F1", "text/html"),
            ("/assets/style.css", "text/css"),
            ("/assets/common.js", "text/javascript"),
            ("/assets/chart.js", "text/javascript"),
            ("/assets/fleet.js", "text/javascript"),
            ("/assets/live.js", "text/javascript"),
            ("/assets/device.js", "text/javascript"),
        ] {
            let r = raw(
                addr,
                &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
            );
            assert_eq!(r.status, 200, "{path} needs no token: {r:?}");
            assert!(r.header("content-type").starts_with(kind), "{path}: {r:?}");
            assert_eq!(r.header("cache-control"), "no-cache", "{path}");
            assert_eq!(r.header("x-content-type-options"), "nosniff", "{path}");
            if kind == "text/html" {
                let csp = r.header("content-security-policy");
                assert!(
                    csp.contains("script-src 'self'") && !csp.contains("unsafe"),
                    "{path}: {csp}"
                );
            }
            // Revalidation: the same ETag gets a 304 and no body; HEAD works too.
            let etag = r.header("etag");
            assert!(etag.starts_with('"'), "{path}: {r:?}");
            let again = raw(
                addr,
                &format!("GET {path} HTTP/1.1\r\nHost: x\r\nIf-None-Match: {etag}\r\nConnection: close\r\n\r\n"),
            );
            assert_eq!((again.status, again.body.as_str()), (304, ""), "{path}");
            let head = raw(
                addr,
                &format!("HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
            );
            assert_eq!(head.status, 200, "{path}");
        }
        let unknown = raw(
            addr,
            "GET /assets/nope.js HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(
            unknown.status, 401,
            "anything else is the API's: the token first"
        );
        let unknown = raw(
            addr,
            &format!("GET /assets/nope.js HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"),
        );
        assert_eq!(unknown.status, 404);
        let posted = raw(
            addr,
            "POST /live HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(posted.status, 405);

        // The rate needs the token, and says what is wrong with a bad query.
        let r = raw(
            addr,
            "GET /api/anomalies/rate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(r.status, 401, "{r:?}");
        for (q, says) in [
            ("bucket_ms=10", "bucket_ms must be"),
            ("buckets=999999999999999999999", "buckets must be"),
            ("colour=red", "unknown query parameter \"colour\""),
        ] {
            let r = raw(
                addr,
                &format!("GET /api/anomalies/rate?{q} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"),
            );
            assert_eq!(r.status, 400, "{q}: {r:?}");
            assert!(r.body.contains(says), "{q}: {}", r.body);
        }
        let rate = api(addr, "/api/anomalies/rate?bucket_ms=1000&buckets=5");
        assert_eq!(rate["counts"], json!([0, 0, 0, 0, 0]), "{rate}");
        assert_eq!(
            (rate["held"].as_u64(), rate["aggregator"].as_str()),
            (Some(0), Some("agg-dash-html"))
        );

        // Issue 13: `?token=` in the WebSocket URL reached proxy logs and browser history.
        let (_, js) = http_get(addr, "/assets/common.js");
        assert!(
            !js.contains("searchParams.set('token'"),
            "the pages put no token in a URL"
        );
        assert!(js.contains("fetch('api/feed/ticket', { method: 'POST'"));
        assert!(js.contains("url.searchParams.set('ticket', t)"));
        assert!(
            js.contains("sessionStorage"),
            "the token is kept for the tab's session"
        );
        assert!(
            js.contains("history.replaceState"),
            "a #token= fragment is taken out of the address bar"
        );
    });
    checks.await.unwrap();
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// Publishes every device's windows from `start` as agent `gw-dash` does: a batch per partition
/// and window (the broker takes packets of up to 10 kB).
async fn publish_windows(client: &AsyncClient, seqs: &mut BTreeMap<u32, u64>, start: i64) {
    for i in 0..WINDOWS {
        let mut by_partition: BTreeMap<u32, Vec<WindowSummary>> = BTreeMap::new();
        for d in 0..DEVICES {
            for (j, metric) in METRICS.iter().enumerate() {
                let device = format!("pump-{d}");
                let s = start + i * WINDOW_MS;
                let mean = 20.0 + 10.0 * j as f64 + (i as f64 * 0.7).sin() * 3.0 + d as f64;
                by_partition
                    .entry(partition_of(&device, 64))
                    .or_default()
                    .push(WindowSummary {
                        device,
                        metric: metric.to_string(),
                        start_ms: s,
                        end_ms: s + WINDOW_MS,
                        count: 60,
                        min: mean - 2.0,
                        max: mean + 2.5,
                        mean,
                        std: 0.8,
                        first_ts_ms: s,
                        last_ts_ms: s + WINDOW_MS - 1_000,
                        max_score: (i % 5) as f64 / 5.0,
                        revision: 0,
                    });
            }
        }
        for (partition, items) in by_partition {
            let seq = seqs.entry(partition).or_insert(0);
            let records = items
                .into_iter()
                .map(|item| {
                    *seq += 1;
                    Sequenced {
                        seq: *seq,
                        prev: None,
                        item,
                    }
                })
                .collect();
            publish_summaries(client, AGENT, partition, records).await;
        }
    }
}

fn event(device: &str, metric: &str, ts_ms: i64, score: f64) -> AnomalyEvent {
    AnomalyEvent {
        phase: edgewatch_models::wire::EventPhase::Onset,
        model_version: None,
        id: event_id(device, metric, ts_ms, "ensemble"),
        device: device.into(),
        metric: metric.into(),
        ts_ms,
        value: 31.5,
        score,
        detector: "ensemble".into(),
        window_start_ms: ts_ms - ts_ms % WINDOW_MS,
        agent: AGENT.into(),
    }
}

/// Publishes one anomaly event the way an agent does (the next seq of its partition's lane).
async fn publish_event(client: &AsyncClient, seqs: &mut BTreeMap<u32, u64>, e: AnomalyEvent) {
    // The device's own partition: an aggregator refuses an event filed under another one.
    let partition = partition_of(&e.device, 64);
    let seq = seqs.entry(partition).or_insert(0);
    *seq += 1;
    let seq = *seq;
    let batch = Batch {
        agent: AGENT.into(),
        partition,
        records: vec![Sequenced {
            seq,
            prev: None,
            item: e,
        }],
        acked: 0,
        epoch: 0,
    };
    client
        .publish(
            Topics::new("edgewatch/v1").anomalies(partition, AGENT),
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&batch).unwrap(),
        )
        .await
        .unwrap();
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// GET JSON with the bearer token.
fn api(addr: SocketAddr, path: &str) -> Value {
    let a = addr.to_string();
    let r = edgewatch_tools::http::Get::new(&a, path)
        .bearer(Some(TOKEN))
        .send_blocking()
        .unwrap_or_else(|e| panic!("GET http://{a}{path}: {e}"));
    let body = r.text();
    assert_eq!(r.status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// A raw HTTP exchange's status, headers and body (for the headers the API client hides).
#[derive(Debug)]
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Raw {
    /// A header's value (name in any case), or "".
    fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map_or("", |(_, v)| v.as_str())
    }
}

/// Sends `request` as is and reads the answer to the end (the request says `Connection: close`).
fn raw(addr: SocketAddr, request: &str) -> Raw {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Raw {
        status,
        headers,
        body: body.to_string(),
    }
}
