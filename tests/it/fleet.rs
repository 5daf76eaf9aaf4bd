//! Fleet peer groups end to end: eight identical simulated devices publish window summaries through
//! the broker the way agents do; the aggregator fits their peer model, and when one device's flow
//! drifts away it raises one `detector: "fleet"` event for that device only, lists it outside its
//! group on `/api/fleet`, and shows the model on `/api/models`, all behind the bearer token.

use crate::common::*;
use crate::wait::SubAckTap;
use edgewatch_aggregator::{Aggregator, AggregatorConfig};
use edgewatch_models::partition::partition_of;
use edgewatch_models::wire::{Sequenced, WindowSummary};
use rumqttc::{AsyncClient, MqttOptions};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "fleet-s3cret";
const DEVICES: usize = 8;
const METRICS: [&str; 3] = ["current", "flow", "temp"];
const BASE: [f64; 3] = [5.0, 20.0, 40.0];
const WINDOW_MS: i64 = 60_000;
const T0: i64 = 1_767_225_600_000;

/// One window of one device's metric: a slow load shared by the fleet, 1 % noise per device and
/// window, and `extra` on top.
fn summary(d: usize, j: usize, i: i64, extra: f64) -> WindowSummary {
    let noise = (((d * 131 + j * 17) as f64 + i as f64 * 7.31).sin() * 43_758.545).fract();
    let load = 5.0 * (i as f64 * 0.01).sin();
    let mean = BASE[j] * (1.0 + 0.01 * (load + noise)) + extra;
    let start_ms = T0 + i * WINDOW_MS;
    WindowSummary {
        device: format!("pump-{d}"),
        metric: METRICS[j].into(),
        start_ms,
        end_ms: start_ms + WINDOW_MS,
        count: 60,
        min: mean - 1.0,
        max: mean + 1.0,
        mean,
        std: 0.5,
        first_ts_ms: start_ms,
        last_ts_ms: start_ms + WINDOW_MS - 1_000,
        max_score: 0.0,
        revision: 0,
    }
}

/// Publishes windows `from..to` of every device as agent `gw-fleet` would: one batch per partition
/// and window, seqs contiguous per lane. Device 0's flow gets `drift(i)`.
async fn publish(
    client: &AsyncClient,
    seqs: &mut BTreeMap<u32, u64>,
    from: i64,
    to: i64,
    drift: impl Fn(i64) -> f64,
) {
    for i in from..to {
        let mut by_partition: BTreeMap<u32, Vec<WindowSummary>> = BTreeMap::new();
        for d in 0..DEVICES {
            for j in 0..METRICS.len() {
                let extra = if d == 0 && j == 1 { drift(i) } else { 0.0 };
                let s = summary(d, j, i, extra);
                by_partition
                    .entry(partition_of(&s.device, 64))
                    .or_default()
                    .push(s);
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
            publish_summaries(client, "gw-fleet", partition, records).await;
        }
    }
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

/// The devices `/api/fleet` lists outside their group.
fn outside(fleet: &Value) -> Vec<String> {
    fleet["classes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["outside"].as_array().unwrap().iter())
        .map(|o| o["device"].as_str().unwrap().to_string())
        .collect()
}

fn model_version(addr: SocketAddr) -> u64 {
    api(addr, "/api/models")["models"]
        .as_array()
        .unwrap()
        .first()
        .map_or(0, |m| m["version"].as_u64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_drifting_from_identical_peers_raises_one_fleet_event() {
    std::env::set_var("EDGEWATCH_IT_FLEET_TOKEN", TOKEN);
    let broker = embedded_broker();
    let tap = SubAckTap::start(broker.addr()).await;
    let mut cfg = AggregatorConfig::with_id("agg-fleet");
    cfg.mqtt.port = tap.port();
    cfg.http.listen = "127.0.0.1:0".into();
    cfg.http.auth_token_env = Some("EDGEWATCH_IT_FLEET_TOKEN".into());
    cfg.fleet.enabled = true;
    cfg.fleet.refit_interval_ms = 200;
    cfg.fleet.min_windows = 2;
    cfg.fleet.profile_window_ms = 600_000;
    let agg = Aggregator::bind(cfg).await.unwrap();
    let addr = agg.local_addr();
    let stop = CancellationToken::new();
    let task = {
        let t = stop.clone();
        tokio::spawn(agg.run(async move { t.cancelled().await }))
    };
    tap.wait_subscribed("edgewatch-agg-fleet", Duration::from_secs(10))
        .await;
    // The fleet API is behind the token like the rest.
    assert_eq!(http_get(addr, "/api/fleet").0, 401);
    assert_eq!(http_get(addr, "/api/models").0, 401);

    let (client, mut el) = AsyncClient::new(
        MqttOptions::new("fleet-pub", "127.0.0.1", broker.addr().port()),
        10,
    );
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    let mut seqs = BTreeMap::new();

    // Identical devices: a model, nobody outside.
    publish(&client, &mut seqs, 0, 10, |_| 0.0).await;
    wait_until("a peer model", Duration::from_secs(20), || {
        model_version(addr) >= 1
    })
    .await;
    let models = api(addr, "/api/models");
    let m = &models["models"][0];
    assert_eq!(m["kind"], "peer");
    assert_eq!(m["key"], "peer/*/current+flow+temp");
    assert_eq!(m["samples"], DEVICES as u64);
    assert!(m["age_s"].as_f64().unwrap() >= 0.0);
    assert!(m["quality"]["clusters"].as_u64().unwrap() >= 1);
    assert!(outside(&api(addr, "/api/fleet")).is_empty());

    // pump-0's flow drifts by 1 % of its level per window.
    publish(&client, &mut seqs, 10, 40, |i| 0.2 * (i - 9) as f64).await;
    wait_until("pump-0 outside its group", Duration::from_secs(20), || {
        outside(&api(addr, "/api/fleet")) == ["pump-0"]
    })
    .await;
    // Every window applied, then one more refit over all of them: nothing else is coming.
    let applied = (DEVICES * METRICS.len() * 40) as u64;
    wait_until("every window applied", Duration::from_secs(20), || {
        api(addr, "/api/status")["summaries_applied"] == applied
    })
    .await;
    let v = model_version(addr);
    wait_until(
        "a refit after the last window",
        Duration::from_secs(20),
        || model_version(addr) > v,
    )
    .await;

    // One event on the feed, pump-0's, from the fleet detector, naming the drifted metric.
    assert_eq!(api(addr, "/api/status")["feed_history"], 1);
    let dev = api(addr, "/api/devices/pump-0");
    let e = &dev["state"]["metrics"]["flow"]["last_anomaly"];
    assert_eq!(e["detector"], "fleet", "{dev}");
    assert_eq!(e["agent"], "agg-fleet");
    assert!(e["score"].as_f64().unwrap() >= 0.5);
    assert!(e["model_version"].as_u64().unwrap() >= 1);
    assert!(e["value"].as_f64().unwrap() > BASE[1] * 1.02, "{e}");
    for d in 1..DEVICES {
        let dev = api(addr, &format!("/api/devices/pump-{d}"));
        for (metric, s) in dev["state"]["metrics"].as_object().unwrap() {
            assert_eq!(s["anomalies"], 0, "pump-{d} {metric}: {dev}");
        }
    }
    let fleet = api(addr, "/api/fleet");
    assert_eq!(outside(&fleet), ["pump-0"]);
    let class = &fleet["classes"][0];
    assert_eq!(class["devices"], DEVICES as u64);
    let model = &class["model"];
    assert_eq!(model["trained"], (DEVICES - 1) as u64, "{fleet}");
    assert_eq!(model["excluded"], 1);
    assert!(model["trained_to_ms"].as_i64().unwrap() >= T0 + 39 * WINDOW_MS);
    let standing = &class["outside"][0]["standing"];
    assert_eq!(standing["metric"], "flow");
    // And counted.
    let a = addr.to_string();
    let metrics = edgewatch_tools::http::Get::new(&a, "/metrics")
        .bearer(Some(TOKEN))
        .send_blocking()
        .unwrap()
        .text();
    assert!(
        metrics.contains("edgewatch_fleet_events_total{aggregator=\"agg-fleet\"} 1"),
        "{metrics}"
    );

    stop.cancel();
    task.await.unwrap().unwrap();
}
