//! The training loop end to end through mosquitto: the agent samples its device's aligned vectors
//! into its training lane; the aggregator keeps the training set (leaving out the period of a
//! correlation break), fits a model on a blocking thread, stores it and publishes it retained; the
//! agent swaps it in mid-stream, and the next break's `pca` event names that version; a refit
//! after new data publishes a newer version, which the following break's event names. Every reading
//! is counted exactly once. The aggregator restarted on its store lists the same model and training
//! set; the agent killed with SIGKILL restarts on the model it stored.

use crate::common::*;
use crate::crash::Proc;
use crate::models::{models_cli, plain_log, publish, wait_log, wait_pca, wait_readings, DEVICE};
use crate::wait::SubscriptionLog;
use edgewatch_aggregator::{Aggregator, AggregatorConfig};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The aggregator's device model entry for the test device, once it is at a version above `above`.
async fn wait_model(addr: std::net::SocketAddr, above: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let doc = get_json(addr, "/api/models");
        let found = doc["models"].as_array().and_then(|m| {
            m.iter()
                .find(|m| {
                    m["kind"] == "pca"
                        && m["device"] == DEVICE
                        && m["version"].as_u64().unwrap_or(0) > above
                })
                .cloned()
        });
        if let Some(m) = found {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "no device model above v{above} at the aggregator: {doc:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn aggregator_config(port: u16, dir: &std::path::Path) -> AggregatorConfig {
    let mut c = AggregatorConfig::with_id("agg-t");
    c.mqtt.port = port;
    c.http.listen = "127.0.0.1:0".into();
    c.state.dir = Some(dir.to_path_buf());
    c.training.enabled = true;
    c.training.check_interval_ms = 200;
    c.training.min_rows = 150;
    c.training.min_samples = 2;
    // Long enough that the first break is scored by v1 before any refit.
    c.training.refit_interval_ms = 8_000;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aggregator_trains_pushes_and_refits_a_device_model_from_agent_samples() {
    edgewatch::logging::init("warn");
    let dir = tempfile::tempdir().unwrap();
    let subscriptions = SubscriptionLog::new();
    let mosq = Mosquitto::start_on(
        free_port(),
        &format!("persistence false\n{}", subscriptions.settings()),
    );
    let agg_dir = dir.path().join("aggregator-state");
    let agg = Aggregator::bind(aggregator_config(mosq.port, &agg_dir))
        .await
        .unwrap();
    let (addr, feed_url) = (agg.local_addr(), agg.feed_url());
    let stop_agg = CancellationToken::new();
    let agg_task = {
        let t = stop_agg.clone();
        tokio::spawn(agg.run(async move { t.cancelled().await }))
    };
    let feed = FeedClient::connect(&feed_url).await;
    // Summaries, anomalies, training lanes.
    subscriptions
        .wait_filters("edgewatch-agg-t", 3, Duration::from_secs(20))
        .await;

    let agent_yaml = dir.path().join("agent.yaml");
    std::fs::write(
        &agent_yaml,
        format!(
            "id: gw-t\n\
             source: {{ mqtt: {{ host: 127.0.0.1, port: {} }}, qos: 1 }}\n\
             uplink: {{ ack_timeout_ms: 2000 }}\n\
             window: {{ size_ms: 10000, allowed_lateness_ms: 0, idle_timeout_ms: 1000 }}\n\
             state: {{ dir: \"{}\", checkpoint_interval_ms: 500, ack_mode: after_checkpoint }}\n\
             models: {{ enabled: true, threshold: 0.5, training: {{ period_ms: 60000, samples: 128, min_rows: 16 }} }}\n",
            mosq.port,
            dir.path().join("agent-state").display()
        ),
    )
    .unwrap();
    let log = dir.path().join("agent.log");
    let args = ["agent", "--config", agent_yaml.to_str().unwrap()];
    let agent = Proc::spawn("agent", &args, &log);
    subscriptions
        .wait_subscribed("edgewatch-gw-t-src", Duration::from_secs(20))
        .await;
    subscriptions
        .wait_filters("edgewatch-gw-t-up", 3, Duration::from_secs(20))
        .await;

    let mut opts = MqttOptions::new("training-sensors", "127.0.0.1", mosq.port);
    opts.set_inflight(1000);
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    let poll = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    });
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // Event time three hours back, on a training period boundary, 1 s per step.
    let base = (now - 3 * 3_600_000) / 60_000 * 60_000;

    // Commissioning: 400 s of normal operation is six closed periods of 60 vectors (one a round).
    publish(&client, base, 0..400, |_| false).await;
    let m1 = wait_model(addr, 0).await;
    let v1 = m1["version"].as_u64().unwrap();
    assert_eq!(m1["agent"], "gw-t", "{m1}");
    assert_eq!(
        m1["features"],
        serde_json::json!(["current", "flow", "pressure"])
    );
    assert!(m1["samples"].as_u64().unwrap() >= 150, "{m1}");
    assert!(m1["class"].is_null(), "the device's own model: {m1}");
    wait_log(&log, 0, &["model swapped in", &format!("version={v1}")], 1).await;

    // A correlation break: caught by v1; its period is left out of the training set.
    publish(&client, base, 400..700, |i| (500..560).contains(&i)).await;
    let e1 = wait_pca(&feed, base, 500..560).await;
    assert_eq!(
        (e1.metric.as_str(), e1.model_version),
        ("current", Some(v1)),
        "{e1:?}"
    );

    // New normal data since the fit: the refit publishes a newer version, swapped in.
    let m2 = wait_model(addr, v1).await;
    let v2 = m2["version"].as_u64().unwrap();
    assert!(
        m2["training"]["excluded"].as_u64().unwrap() >= 1,
        "the period of the break is excluded: {m2}"
    );
    wait_log(
        &log,
        0,
        &[
            "model swapped in",
            &format!("version={v2}"),
            &format!("previous={v1}"),
        ],
        1,
    )
    .await;
    publish(&client, base, 700..1000, |i| (800..860).contains(&i)).await;
    let e2 = wait_pca(&feed, base, 800..860).await;
    assert_eq!(e2.model_version, Some(v2), "{e2:?}");
    let pca: Vec<Option<u64>> = feed
        .snapshot()
        .iter()
        .filter(|e| e.detector == "pca")
        .map(|e| e.model_version)
        .collect();
    assert_eq!(pca, vec![Some(v1), Some(v2)], "one event per break");
    wait_readings(addr, 1000 * 3).await;

    // `models list` shows it.
    let listed = models_cli(&["list", "--aggregator", &format!("http://{addr}")]);
    assert!(
        listed.contains(DEVICE) && listed.contains(&v2.to_string()) && listed.contains("gw-t"),
        "{listed}"
    );

    // The aggregator restarted on its store holds the same model and training set.
    let before = get_json(addr, "/api/models");
    stop_agg.cancel();
    agg_task.await.unwrap().unwrap();
    let agg = Aggregator::bind(aggregator_config(mosq.port, &agg_dir))
        .await
        .unwrap();
    let addr = agg.local_addr();
    let stop_agg = CancellationToken::new();
    let agg_task = {
        let t = stop_agg.clone();
        tokio::spawn(agg.run(async move { t.cancelled().await }))
    };
    let after = get_json(addr, "/api/models");
    let pick = |doc: &serde_json::Value| {
        let m = doc["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["device"] == DEVICE)
            .cloned()
            .unwrap_or_default();
        (
            m["version"].clone(),
            m["training"]["rows"].clone(),
            m["samples"].clone(),
        )
    };
    assert_eq!(pick(&after), pick(&before), "after a restart: {after:#}");
    assert_eq!(pick(&after).0, serde_json::json!(v2));

    // Crash the agent; the broker forgets the model; the agent runs v2 from its own disk.
    agent.kill9();
    models_cli(&[
        "clear",
        DEVICE,
        "--config",
        &write_aggregator_yaml(dir.path(), mosq.port),
        "--agent",
        "gw-t",
    ]);
    let restart_at = plain_log(&log).len();
    let agent = Proc::spawn("agent", &args, &log);
    wait_log(
        &log,
        restart_at,
        &["model loaded from disk", &format!("version: {v2}")],
        1,
    )
    .await;

    agent.terminate();
    client.disconnect().await.unwrap();
    let _ = poll.await;
    stop_agg.cancel();
    agg_task.await.unwrap().unwrap();
}

/// What `models clear` reads: the aggregator's broker and prefix.
fn write_aggregator_yaml(dir: &std::path::Path, port: u16) -> String {
    let path = dir.join("aggregator-t.yaml");
    std::fs::write(
        &path,
        format!("id: agg-t\nmqtt: {{ host: 127.0.0.1, port: {port} }}\n"),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}
