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

/// `GET /api/models/{device}` serves a device model as the JSON artifact the aggregator published
/// to the device's agent (the same bytes, read back retained from the broker), behind the same
/// bearer token as the rest of the API; an unknown device is a 404 whose JSON error names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_device_model_is_served_as_the_published_artifact() {
    use edgewatch_models::wire::{Batch, Sequenced, Topics, TrainingSample};
    edgewatch::logging::init("warn");
    const TOKEN: &str = "models-t0ken";
    // A device id that needs percent-encoding in the path.
    const PUMP: &str = "pump api/7";
    let dir = tempfile::tempdir().unwrap();
    let subscriptions = SubscriptionLog::new();
    let mosq = Mosquitto::start_on(
        free_port(),
        &format!("persistence false\n{}", subscriptions.settings()),
    );
    std::env::set_var("EDGEWATCH_IT_MODELS_TOKEN", TOKEN);
    let mut cfg = aggregator_config(mosq.port, &dir.path().join("state"));
    cfg.http.auth_token_env = Some("EDGEWATCH_IT_MODELS_TOKEN".into());
    cfg.training.min_samples = 1;
    let partitions = cfg.partitions;
    let agg = Aggregator::bind(cfg).await.unwrap();
    let addr = agg.local_addr();
    let stop_agg = CancellationToken::new();
    let agg_task = {
        let t = stop_agg.clone();
        tokio::spawn(agg.run(async move { t.cancelled().await }))
    };
    subscriptions
        .wait_filters("edgewatch-agg-t", 3, Duration::from_secs(20))
        .await;
    let get = |path: &str, token: Option<&str>| {
        let a = addr.to_string();
        let r = edgewatch_tools::http::Get::new(&a, path)
            .bearer(token)
            .send_blocking()
            .unwrap_or_else(|e| panic!("GET http://{a}{path}: {e}"));
        (r.status, r.text())
    };
    let path = "/api/models/pump%20api%2F7";
    let (status, body) = get(path, Some(TOKEN));
    assert_eq!(status, 404, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        error["error"].as_str().unwrap().contains("\"pump api/7\""),
        "{body}"
    );
    assert_eq!(error["device"], PUMP);

    // One training sample of 200 correlated rows, sent as an agent's training lane sends it.
    let rows: Vec<Vec<f64>> = (0..200)
        .map(|i| {
            let x = (i as f64 / 9.0).sin();
            let w = 0.03 * (i as f64 * 1.618).sin();
            vec![2.0 * x + w, x - w, 40.0 + 0.5 * x + w * w]
        })
        .collect();
    let partition = edgewatch_models::partition::partition_of(PUMP, partitions);
    let batch = Batch {
        agent: "gw-api".into(),
        partition,
        records: vec![Sequenced {
            seq: 1,
            prev: None,
            item: TrainingSample {
                device: PUMP.into(),
                features: ["current", "flow", "temp"].map(String::from).into(),
                from_ms: 1_700_000_000_000,
                to_ms: 1_700_000_060_000,
                seen: 200,
                anomalies: 0,
                rows,
            },
        }],
        acked: 0,
        epoch: 1,
    };
    let client = {
        let mut opts = MqttOptions::new("models-api-sender", "127.0.0.1", mosq.port);
        opts.set_keep_alive(Duration::from_secs(30));
        // The batch is bigger than rumqttc's default 10 KiB packet limit.
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(opts, 10);
        tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
        client
    };
    client
        .publish(
            Topics::new("edgewatch/v1").samples(partition, "gw-api"),
            rumqttc::QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&batch).unwrap(),
        )
        .await
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    let served = loop {
        let (status, body) = get(path, Some(TOKEN));
        if status == 200 {
            break body;
        }
        assert_eq!(status, 404, "{body}");
        assert!(Instant::now() < deadline, "no model served: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let model: edgewatch_models::multi::PcaModel = serde_json::from_str(&served).unwrap();
    model.validate().unwrap();
    assert_eq!((model.key.as_str(), model.samples), (PUMP, 200));
    // The retained message the agent would receive holds exactly these bytes.
    let sub = std::process::Command::new(require("mosquitto_sub"))
        .args(["-p", &mosq.port.to_string(), "-t", "edgewatch/v1/models/#"])
        .args(["-C", "1", "-W", "20"])
        .output()
        .unwrap();
    assert!(sub.status.success(), "mosquitto_sub: {sub:?}");
    let published = String::from_utf8(sub.stdout).unwrap();
    assert_eq!(published.trim_end_matches('\n'), served);

    // Same auth as the rest of the API.
    let (status, body) = get(path, None);
    assert_eq!(status, 401, "{body}");
    let (status, _) = get(path, Some("wrong"));
    assert_eq!(status, 401);
    // The list still answers on its own path.
    let (status, list) = get("/api/models", Some(TOKEN));
    assert_eq!(status, 200, "{list}");
    assert!(list.contains("pump api/7"), "{list}");
    let (status, body) = get("/api/models/pump%ZZ", Some(TOKEN));
    assert_eq!(status, 400, "{body}");

    client.disconnect().await.unwrap();
    stop_agg.cancel();
    agg_task.await.unwrap().unwrap();
}
