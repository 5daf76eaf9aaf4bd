//! The fleet-wide API from any instance (issue 18 item 1) and the owners directory (issue 17
//! item 2): two aggregators with complementary static ranges, summaries published straight onto
//! the broker. Every device is listed by both with identical content, paging walks the list once,
//! filters apply, a non-owner fetches a device from its owner; a stopped owner leaves its partitions
//! uncovered (metric, `/readyz`, `/api/status`) and listed as missing; an owner that does not answer
//! gives 502; forged owners records are refused and counted. Also: a feed client that never answers
//! pings is closed, and an unknown `since` gets a gap marker first.

use crate::common::*;
use crate::wait::SubAckTap;
use edgewatch_aggregator::config::PartitionSpec;
use edgewatch_aggregator::{Aggregator, AggregatorConfig, AggregatorMetrics};
use edgewatch_models::partition::partition_of;
use edgewatch_models::wire::{event_id, AnomalyEvent, Batch, Sequenced, Topics, WindowSummary};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const PARTITIONS: u32 = 8;
const DEVICES: usize = 30;
const AGENT: &str = "gw-fleet";

struct Running {
    addr: SocketAddr,
    metrics: Arc<AggregatorMetrics>,
    stop: CancellationToken,
    task: JoinHandle<()>,
    _tap: SubAckTap,
}

impl Running {
    async fn start(broker: SocketAddr, id: &str, owned: &str) -> Self {
        Self::start_with(broker, id, owned, |_| {}).await
    }

    async fn start_with(
        broker: SocketAddr,
        id: &str,
        owned: &str,
        tune: impl FnOnce(&mut AggregatorConfig),
    ) -> Self {
        let tap = SubAckTap::start(broker).await;
        let mut cfg = AggregatorConfig::with_id(id);
        cfg.mqtt.port = tap.port();
        cfg.partitions = PARTITIONS;
        cfg.owned = vec![PartitionSpec::Range(owned.into())];
        cfg.http.listen = "127.0.0.1:0".into();
        cfg.http.fleet_timeout_ms = 1_000;
        cfg.owners.publish_interval_ms = 300;
        cfg.owners.stale_after_ms = 5_000;
        cfg.owners.startup_grace_ms = 500;
        tune(&mut cfg);
        let agg = Aggregator::bind(cfg).await.unwrap();
        let addr = agg.local_addr();
        let metrics = agg.metrics();
        let stop = CancellationToken::new();
        let t = stop.clone();
        let task =
            tokio::spawn(async move { agg.run(async move { t.cancelled().await }).await.unwrap() });
        tap.wait_subscribed(&format!("edgewatch-{id}"), Duration::from_secs(10))
            .await;
        Self {
            addr,
            metrics,
            stop,
            task,
            _tap: tap,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }
}

/// GET without blocking the runtime's workers (the aggregators ask each other on them).
async fn get(addr: SocketAddr, path: &str) -> (u16, serde_json::Value, String) {
    let path = path.to_string();
    let (status, body) = tokio::task::spawn_blocking(move || http_get(addr, &path))
        .await
        .unwrap();
    let json = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
    (status, json, body)
}

async fn get_text(addr: SocketAddr, path: &str) -> String {
    get(addr, path).await.2
}

async fn get_ok(addr: SocketAddr, path: &str) -> serde_json::Value {
    let (status, json, body) = get(addr, path).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    json
}

/// Polls an async condition every 100 ms until true, panicking with `what` after `timeout`.
async fn eventually<F, Fut>(what: &str, timeout: Duration, mut cond: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    while !cond().await {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    t0.elapsed()
}

fn device(i: usize) -> String {
    format!("dev-{i:02}")
}

fn summary(device: &str, metric: &str, start_ms: i64) -> WindowSummary {
    WindowSummary {
        device: device.into(),
        metric: metric.into(),
        start_ms,
        end_ms: start_ms + 60_000,
        count: 6,
        min: 1.0,
        max: 3.0,
        mean: 2.0,
        std: 0.5,
        first_ts_ms: start_ms,
        last_ts_ms: start_ms + 50_000,
        max_score: 0.1,
        revision: 0,
    }
}

fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_instance_serves_the_whole_fleet_and_reports_uncovered_partitions() {
    edgewatch::logging::init("warn");
    let broker = embedded_broker();
    let a = Running::start(broker.addr(), "agg-a", "0-3").await;
    let b = Running::start(broker.addr(), "agg-b", "4-7").await;

    // Readings of the last ten minutes, one window per device (two metrics for even ones); three
    // devices with an anomaly event.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let start = (now - 600_000) / 60_000 * 60_000;
    let mut opts = MqttOptions::new("fleet-api-test", "127.0.0.1", broker.addr().port());
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    let pump = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let topics = Topics::new("edgewatch/v1");
    let mut by_partition: Vec<Vec<WindowSummary>> = vec![Vec::new(); PARTITIONS as usize];
    for i in 0..DEVICES {
        let d = device(i);
        let p = partition_of(&d, PARTITIONS) as usize;
        by_partition[p].push(summary(&d, "flow", start));
        if i % 2 == 0 {
            by_partition[p].push(summary(&d, "temp", start));
        }
    }
    for (p, windows) in by_partition.into_iter().enumerate() {
        if windows.is_empty() {
            continue;
        }
        let batch = Batch {
            agent: AGENT.into(),
            partition: p as u32,
            records: windows
                .into_iter()
                .enumerate()
                .map(|(i, item)| Sequenced {
                    seq: i as u64 + 1,
                    prev: None,
                    item,
                })
                .collect(),
            acked: 0,
            epoch: 0,
        };
        client
            .publish(
                topics.summaries(p as u32, AGENT),
                QoS::AtLeastOnce,
                false,
                serde_json::to_vec(&batch).unwrap(),
            )
            .await
            .unwrap();
    }
    let anomalous = [device(3), device(4), device(17)];
    for (n, d) in anomalous.iter().enumerate() {
        let p = partition_of(d, PARTITIONS);
        let ts = start + 30_000;
        let e = AnomalyEvent {
            phase: Default::default(),
            model_version: None,
            id: event_id(d, "flow", ts, "zscore"),
            device: d.clone(),
            metric: "flow".into(),
            ts_ms: ts,
            value: 9.0,
            score: 0.9,
            detector: "zscore".into(),
            window_start_ms: start,
            agent: AGENT.into(),
        };
        let batch = Batch {
            agent: AGENT.into(),
            partition: p,
            records: vec![Sequenced {
                seq: 1_000 + n as u64,
                prev: None,
                item: e,
            }],
            acked: 0,
            epoch: 0,
        };
        client
            .publish(
                topics.anomalies(p, AGENT),
                QoS::AtLeastOnce,
                false,
                serde_json::to_vec(&batch).unwrap(),
            )
            .await
            .unwrap();
    }
    let (aa, ba) = (a.addr, b.addr);
    eventually(
        "every device applied by its owner",
        Duration::from_secs(20),
        || async move {
            let n = |v: serde_json::Value| v["total"].as_u64().unwrap_or(0);
            n(get_ok(aa, "/api/devices?scope=local").await)
                + n(get_ok(ba, "/api/devices?scope=local").await)
                == DEVICES as u64
        },
    )
    .await;
    eventually(
        "the anomalies recorded",
        Duration::from_secs(20),
        || async move {
            let s = get_ok(aa, "/api/devices?min_anomalies=1").await;
            s["total"] == 3
        },
    )
    .await;

    // Every device from every instance, identical content, sorted, nothing missing.
    let from_a = get_ok(a.addr, "/api/devices?limit=1000").await;
    let from_b = get_ok(b.addr, "/api/devices?limit=1000").await;
    assert_eq!(from_a["scope"], "fleet");
    assert_eq!(from_a["aggregator"], "agg-a");
    assert_eq!(from_b["aggregator"], "agg-b");
    assert_eq!(from_a["total"], DEVICES as u64, "{from_a}");
    assert_eq!(from_a["missing_partitions"], serde_json::json!([]));
    assert_eq!(
        from_a["devices"], from_b["devices"],
        "the same list from both instances"
    );
    let list = from_a["devices"].as_array().unwrap();
    let ids: Vec<&str> = list.iter().map(|d| d["device"].as_str().unwrap()).collect();
    let want: Vec<String> = (0..DEVICES).map(device).collect();
    assert_eq!(ids, want);
    for d in list {
        let id = d["device"].as_str().unwrap();
        let p = partition_of(id, PARTITIONS);
        assert_eq!(d["partition"], p);
        assert_eq!(d["owner"], if p < 4 { "agg-a" } else { "agg-b" }, "{d}");
        assert_eq!(d["agent"], AGENT);
        assert_eq!(
            d["last_seen_ms"],
            start + 50_000,
            "the window's last reading"
        );
        assert_eq!(
            d["readings"],
            if id[4..].parse::<usize>().unwrap() % 2 == 0 {
                12
            } else {
                6
            }
        );
        assert!(d["metrics"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("flow")));
    }

    // Paging walks the whole list exactly once, from either instance.
    for addr in [a.addr, b.addr] {
        let mut walked = Vec::new();
        let mut offset = 0;
        loop {
            let page = get_ok(addr, &format!("/api/devices?offset={offset}&limit=7")).await;
            assert_eq!(page["total"], DEVICES as u64);
            assert_eq!(page["offset"], offset);
            assert_eq!(page["limit"], 7);
            let got = page["devices"].as_array().unwrap();
            if got.is_empty() {
                break;
            }
            walked.extend(
                got.iter()
                    .map(|d| d["device"].as_str().unwrap().to_string()),
            );
            offset += 7;
        }
        assert_eq!(walked, want, "paging from {addr}");
    }

    // Filters.
    let q = get_ok(a.addr, "/api/devices?q=DEV-1").await;
    assert_eq!(q["total"], 10, "dev-10..dev-19: {q}");
    assert_eq!(
        get_ok(a.addr, &format!("/api/devices?agent={AGENT}")).await["total"],
        30
    );
    assert_eq!(
        get_ok(a.addr, "/api/devices?agent=nobody").await["total"],
        0
    );
    assert_eq!(
        get_ok(b.addr, "/api/devices?seen_within_ms=3600000").await["total"],
        30
    );
    assert_eq!(
        get_ok(b.addr, "/api/devices?seen_within_ms=1").await["total"],
        0
    );
    let hot = get_ok(b.addr, "/api/devices?min_anomalies=1").await;
    let hot_ids: Vec<&str> = hot["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device"].as_str().unwrap())
        .collect();
    assert_eq!(
        hot_ids,
        anomalous.iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert_eq!(hot["devices"][0]["last_anomaly_ms"], start + 30_000);
    for (bad, named) in [
        ("limit=0", "limit"),
        ("limit=5000", "limit"),
        ("offset=-3", "offset"),
        ("scope=moon", "scope"),
        ("min_anomalies=lots", "min_anomalies"),
        ("colour=red", "colour"),
    ] {
        let (status, json, body) = get(a.addr, &format!("/api/devices?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(
            json["error"].as_str().unwrap().contains(named),
            "{bad}: {body}"
        );
    }

    // A device from the instance that does not own it: the owner's body, unchanged.
    for id in anomalous.iter().chain([device(0), device(1)].iter()) {
        let p = partition_of(id, PARTITIONS);
        let (owner, other) = if p < 4 {
            (a.addr, b.addr)
        } else {
            (b.addr, a.addr)
        };
        let (s1, direct, _) = get(owner, &format!("/api/devices/{id}")).await;
        let (s2, proxied, _) = get(other, &format!("/api/devices/{id}")).await;
        assert_eq!((s1, s2), (200, 200));
        assert_eq!(direct, proxied, "{id}");
        assert_eq!(direct["owner"], if p < 4 { "agg-a" } else { "agg-b" });
        assert_eq!(direct["agent"], AGENT);
        assert_eq!(
            direct["state"]["metrics"]["flow"]["windows"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        let events = direct["events"].as_array().unwrap();
        let want_events = usize::from(anomalous.contains(id));
        assert_eq!(events.len(), want_events, "{direct}");
    }
    let (status, json, body) = get(a.addr, "/api/devices/never-seen").await;
    assert_eq!(status, 404, "{body}");
    assert!(
        json["error"].as_str().unwrap().contains("has sent nothing"),
        "{body}"
    );

    // Status: this instance's counters and the fleet's, summed from the owners records.
    eventually(
        "fleet counters in both statuses",
        Duration::from_secs(10),
        || async move {
            let s = get_ok(aa, "/api/status").await;
            let t = get_ok(ba, "/api/status").await;
            s["fleet"]["devices"] == DEVICES as u64 && t["fleet"]["devices"] == DEVICES as u64
        },
    )
    .await;
    let s = get_ok(a.addr, "/api/status").await;
    assert_eq!(s["scope"], "instance");
    assert_eq!(s["fleet"]["anomalies"], 3);
    assert_eq!(
        s["devices"].as_u64().unwrap()
            + get_ok(b.addr, "/api/status").await["devices"]
                .as_u64()
                .unwrap(),
        DEVICES as u64
    );
    assert_eq!(s["fleet"]["uncovered"], serde_json::json!([]));
    assert_eq!(s["fleet"]["overlapping"], serde_json::json!([]));
    let aggs = s["fleet"]["aggregators"].as_array().unwrap();
    assert_eq!(aggs.len(), 2, "{s}");
    assert_eq!(aggs[1]["id"], "agg-b");
    assert_eq!(aggs[1]["partitions"], serde_json::json!([4, 5, 6, 7]));
    assert_eq!(aggs[1]["http"], format!("http://{}", b.addr));
    assert_eq!(aggs[1]["online"], true);
    // Complementary ranges: nothing uncovered once settled, ready.
    eventually("both ready", Duration::from_secs(10), || async move {
        get(aa, "/readyz").await.0 == 200 && get(ba, "/readyz").await.0 == 200
    })
    .await;
    let metrics = get_text(a.addr, "/metrics").await;
    assert_eq!(
        metric_value(&metrics, "edgewatch_aggregator_partitions_uncovered{"),
        Some(0.0)
    );
    assert_eq!(
        metric_value(&metrics, "edgewatch_aggregator_partitions_overlapping{"),
        Some(0.0)
    );
    assert!(metrics.contains("# HELP edgewatch_aggregator_partitions_uncovered Partitions"));

    // Forged owners records are refused and counted; nothing changes.
    let refused_before = a.metrics.owners_refused_total.load(Relaxed);
    for (topic_id, body) in [
        ("agg-b", br#"{"aggregator":"agg-evil","online":true,"http":"http://127.0.0.1:1","partitions":[0]}"#.to_vec()),
        ("agg-c", b"{not json".to_vec()),
        ("agg-c", br#"{"aggregator":"agg-c","online":true,"http":"http://127.0.0.1:1","partitions":[99]}"#.to_vec()),
    ] {
        client
            .publish(format!("edgewatch/v1/owners/{topic_id}"), QoS::AtLeastOnce, false, body)
            .await
            .unwrap();
    }
    let m = a.metrics.clone();
    eventually(
        "the forged records refused",
        Duration::from_secs(10),
        || {
            let m = m.clone();
            async move { m.owners_refused_total.load(Relaxed) >= refused_before + 3 }
        },
    )
    .await;
    assert_eq!(get(a.addr, "/readyz").await.0, 200);
    assert_eq!(
        get_ok(a.addr, "/api/devices/dev-04").await["owner"],
        get_ok(b.addr, "/api/devices/dev-04").await["owner"]
    );

    // agg-b stops: agg-a reports its partitions uncovered (metric, /readyz, /api/status), lists
    // them as missing and says nobody owns a device of them.
    let b_device = want
        .iter()
        .find(|d| partition_of(d, PARTITIONS) >= 4)
        .unwrap()
        .clone();
    let a_devices = get_ok(a.addr, "/api/devices?scope=local").await["total"]
        .as_u64()
        .unwrap();
    let stopped = Instant::now();
    b.stop().await;
    let took = eventually(
        "agg-a reports 4-7 uncovered",
        Duration::from_secs(5),
        || async move {
            let (status, _, body) = get(aa, "/readyz").await;
            status == 503
                && body.contains("coverage: 4 partition(s) owned by no live aggregator: 4-7")
        },
    )
    .await;
    eprintln!("agg-b stopped: agg-a /readyz names 4-7 uncovered {took:?} after the stop ({:?} including the stop)", stopped.elapsed());
    let s = get_ok(a.addr, "/api/status").await;
    assert_eq!(
        s["fleet"]["uncovered"],
        serde_json::json!([4, 5, 6, 7]),
        "{s}"
    );
    let b_view = s["fleet"]["aggregators"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == "agg-b")
        .unwrap()
        .clone();
    assert_eq!(b_view["online"], false);
    let metrics = get_text(a.addr, "/metrics").await;
    assert_eq!(
        metric_value(&metrics, "edgewatch_aggregator_partitions_uncovered{"),
        Some(4.0)
    );
    let list = get_ok(a.addr, "/api/devices?limit=1000").await;
    assert_eq!(list["missing_partitions"], serde_json::json!([4, 5, 6, 7]));
    assert_eq!(list["total"], a_devices);
    let (status, json, body) = get(a.addr, &format!("/api/devices/{b_device}")).await;
    assert_eq!(status, 404, "{body}");
    assert!(
        json["error"]
            .as_str()
            .unwrap()
            .starts_with("nobody owns partition"),
        "{body}"
    );
    assert_eq!(json["partition"], partition_of(&b_device, PARTITIONS));

    // An owner that is listed but does not answer: 502 naming it and its URL; the list goes on
    // without its partitions.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let ghost = serde_json::json!({"aggregator": "agg-ghost", "http": silent_url, "partitions": [4, 5, 6, 7],
        "mode": "static", "devices": 0, "readings": 0, "anomalies": 0, "updated_ms": now, "online": true});
    client
        .publish(
            "edgewatch/v1/owners/agg-ghost",
            QoS::AtLeastOnce,
            false,
            ghost.to_string(),
        )
        .await
        .unwrap();
    eventually("agg-ghost in the directory", Duration::from_secs(5), || async move {
        get_ok(aa, "/api/status").await["fleet"]["uncovered"] == serde_json::json!([])
    })
    .await;
    let (status, json, body) = get(a.addr, &format!("/api/devices/{b_device}")).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(json["owner"], "agg-ghost");
    assert_eq!(json["url"], silent_url.as_str());
    assert!(
        json["error"].as_str().unwrap().contains("did not answer"),
        "{body}"
    );
    let list = get_ok(a.addr, "/api/devices").await;
    assert_eq!(list["missing_partitions"], serde_json::json!([4, 5, 6, 7]));
    assert_eq!(list["errors"][0]["owner"], "agg-ghost");
    assert!(a.metrics.fleet_requests_failed_total.load(Relaxed) >= 2);
    hold.abort();
    a.stop().await;
    pump.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_client_that_never_pongs_is_closed_and_an_unknown_since_gets_a_gap_marker_first() {
    use futures_util::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::Message;
    edgewatch::logging::init("warn");
    let broker = embedded_broker();
    let tap = SubAckTap::start(broker.addr()).await;
    let mut cfg = AggregatorConfig::with_id("agg-feed");
    cfg.mqtt.port = tap.port();
    cfg.http.listen = "127.0.0.1:0".into();
    cfg.http.ws_ping_interval_ms = 200;
    let agg = Aggregator::bind(cfg).await.unwrap();
    let (addr, url, metrics) = (agg.local_addr(), agg.feed_url(), agg.metrics());
    let stop = CancellationToken::new();
    let t = stop.clone();
    let task =
        tokio::spawn(async move { agg.run(async move { t.cancelled().await }).await.unwrap() });
    tap.wait_subscribed("edgewatch-agg-feed", Duration::from_secs(10))
        .await;

    // A client that upgrades, then reads but never answers a ping: closed with 1008 once nothing
    // has come from it for two ping intervals.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /feed HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let read_to_end = async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read_to_end)
        .await
        .expect("a client that never pongs is closed within 10 s (pings every 200 ms)");
    let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(
        got.starts_with(b"HTTP/1.1 101"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    let frames = &got[head_end..];
    assert_eq!(frames[0], 0x89, "a ping first");
    let close = frames
        .windows(2)
        .position(|w| w[0] == 0x88)
        .expect("a close frame");
    assert_eq!(
        &frames[close + 2..close + 4],
        &1008u16.to_be_bytes(),
        "policy violation"
    );
    assert!(String::from_utf8_lossy(&frames[close + 4..]).contains("no pong"));
    assert_eq!(metrics.ws_evicted_total.load(Relaxed), 1);

    // An unknown since with nothing held: the gap marker, nothing replayed.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{url}?since=never-sent"))
        .await
        .unwrap();
    let first = loop {
        match ws.next().await.unwrap().unwrap() {
            Message::Text(t) => break serde_json::from_str::<serde_json::Value>(&t).unwrap(),
            _ => continue,
        }
    };
    assert_eq!(first["type"], "gap");
    assert_eq!(first["since"], "never-sent");
    assert_eq!(first["replayed"], 0);
    assert!(
        first["reason"].as_str().unwrap().contains("missed"),
        "{first}"
    );
    drop(ws);

    // One event in the history: the gap marker says it is replayed, and it follows.
    let (client, mut eventloop) = AsyncClient::new(
        MqttOptions::new("feed-gap-test", "127.0.0.1", broker.addr().port()),
        10,
    );
    let pump = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let e = AnomalyEvent {
        phase: Default::default(),
        model_version: None,
        id: event_id("pump-9", "flow", 1_000, "zscore"),
        device: "pump-9".into(),
        metric: "flow".into(),
        ts_ms: 1_000,
        value: 9.0,
        score: 0.9,
        detector: "zscore".into(),
        window_start_ms: 0,
        agent: "gw-gap".into(),
    };
    let batch = Batch {
        agent: "gw-gap".into(),
        partition: partition_of("pump-9", 64),
        records: vec![Sequenced {
            seq: 1,
            prev: None,
            item: e.clone(),
        }],
        acked: 0,
        epoch: 0,
    };
    client
        .publish(
            Topics::new("edgewatch/v1").anomalies(batch.partition, "gw-gap"),
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&batch).unwrap(),
        )
        .await
        .unwrap();
    wait_until("the event in the history", Duration::from_secs(10), || {
        metrics.anomalies_received_total.load(Relaxed) == 1
    })
    .await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{url}?since=also-unknown"))
        .await
        .unwrap();
    let mut texts = Vec::new();
    while texts.len() < 2 {
        if let Message::Text(t) = ws.next().await.unwrap().unwrap() {
            texts.push(serde_json::from_str::<serde_json::Value>(&t).unwrap());
        }
    }
    assert_eq!(texts[0]["type"], "gap");
    assert_eq!(texts[0]["replayed"], 1);
    assert_eq!(texts[1]["id"], e.id.as_str());
    assert!(texts[1].get("type").is_none(), "events carry no type key");
    // A known since: no gap marker, nothing replayed.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{url}?since={}", e.id))
        .await
        .unwrap();
    let quiet = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            if let Message::Text(t) = ws.next().await.unwrap().unwrap() {
                return t.to_string();
            }
        }
    })
    .await;
    assert!(quiet.is_err(), "nothing after a known since: {quiet:?}");
    pump.abort();
    stop.cancel();
    task.await.unwrap();
}

/// GET with a bearer token, off the runtime's workers; (status, JSON).
async fn get_with_token(addr: SocketAddr, path: &str, token: &str) -> (u16, serde_json::Value) {
    let (path, token) = (path.to_string(), token.to_string());
    tokio::task::spawn_blocking(move || {
        let a = addr.to_string();
        let r = edgewatch_tools::http::Get::new(&a, &path)
            .bearer(Some(&token))
            .send_blocking()
            .unwrap();
        (
            r.status,
            serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_bearer_token_instances_ask_each_other_with_it() {
    edgewatch::logging::init("warn");
    std::env::set_var("EDGEWATCH_IT_FLEET_TOKEN", "fleet-s3cret");
    let broker = embedded_broker();
    let secure = |cfg: &mut AggregatorConfig| {
        cfg.http.auth_token_env = Some("EDGEWATCH_IT_FLEET_TOKEN".into());
    };
    let a = Running::start_with(broker.addr(), "agg-ta", "0-3", secure).await;
    let b = Running::start_with(broker.addr(), "agg-tb", "4-7", secure).await;
    let (client, mut eventloop) = AsyncClient::new(
        MqttOptions::new("fleet-token-test", "127.0.0.1", broker.addr().port()),
        100,
    );
    let pump = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    // One device on each side.
    let a_dev = (0..)
        .map(device)
        .find(|d| partition_of(d, PARTITIONS) < 4)
        .unwrap();
    let b_dev = (0..)
        .map(device)
        .find(|d| partition_of(d, PARTITIONS) >= 4)
        .unwrap();
    for d in [&a_dev, &b_dev] {
        let p = partition_of(d, PARTITIONS);
        let batch = Batch {
            agent: AGENT.into(),
            partition: p,
            records: vec![Sequenced {
                seq: 1,
                prev: None,
                item: summary(d, "flow", 1_767_225_600_000),
            }],
            acked: 0,
            epoch: 0,
        };
        client
            .publish(
                Topics::new("edgewatch/v1").summaries(p, AGENT),
                QoS::AtLeastOnce,
                false,
                serde_json::to_vec(&batch).unwrap(),
            )
            .await
            .unwrap();
    }
    let aa = a.addr;
    eventually(
        "both devices listed by agg-ta",
        Duration::from_secs(20),
        || async move { get_with_token(aa, "/api/devices", "fleet-s3cret").await.1["total"] == 2 },
    )
    .await;
    let (status, list) = get_with_token(a.addr, "/api/devices", "fleet-s3cret").await;
    assert_eq!(status, 200);
    assert_eq!(list["missing_partitions"], serde_json::json!([]), "{list}");
    assert_eq!(list["devices"][0]["device"], a_dev.min(b_dev.clone()));
    let (status, dev) =
        get_with_token(a.addr, &format!("/api/devices/{b_dev}"), "fleet-s3cret").await;
    assert_eq!(status, 200, "{dev}");
    assert_eq!(dev["owner"], "agg-tb");
    // Without the token: refused before anything is asked.
    assert_eq!(get(a.addr, "/api/devices").await.0, 401);
    pump.abort();
    a.stop().await;
    b.stop().await;
}
