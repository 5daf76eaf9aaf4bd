//! Multivariate models pushed to an agent through mosquitto and swapped in mid-stream: a correlation
//! break raises a `pca` event naming model v1, then v2 after a second push; the aggregator's counts
//! stay exact; an agent killed with SIGKILL restarts on the model it stored (the retained one is
//! cleared from the broker first), and its next event still names v2.

use crate::common::*;
use crate::crash::{readings, Proc};
use crate::wait::SubscriptionLog;
use edgewatch_aggregator::{Aggregator, AggregatorConfig};
use edgewatch_models::multi::{AlignConfig, Aligner, FitOptions, PcaModel};
use edgewatch_models::wire::AnomalyEvent;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub(crate) const DEVICE: &str = "pump-m";
pub(crate) const METRICS: [&str; 3] = ["flow", "pressure", "current"];

/// Metric `j` at step `i`: a shared load drives all three; when `broken`, `current` reads 0.3 of
/// the load away from what the others imply, inside its own normal range.
pub(crate) fn reading(i: i64, j: usize, broken: bool) -> f64 {
    let load = 0.5 + 0.4 * (i as f64 / 23.0).sin();
    let noise = 0.01 * ((i * 7 + j as i64 * 13) as f64 * 1.618).sin();
    let l = match (broken && j == 2, load < 0.5) {
        (false, _) => load,
        (true, true) => load + 0.3,
        (true, false) => load - 0.3,
    };
    [10.0, 3.0, 5.0][j] + [20.0, 2.0, 8.0][j] * (l + noise)
}

/// A model fitted on 2000 normal steps streamed through an aligner, as the agent will see them.
fn model_file(dir: &Path, version: u64) -> PathBuf {
    let features: Vec<String> = METRICS.map(String::from).to_vec();
    let mut aligner = Aligner::new(&features, &AlignConfig::default()).unwrap();
    let mut rows = Vec::new();
    for i in 0..2000 {
        for j in 0..3 {
            if aligner.push(j, i * 1000 + j as i64, reading(i, j, false)) {
                rows.extend_from_slice(aligner.vector());
            }
        }
    }
    let mut m = PcaModel::fit(
        DEVICE,
        features,
        &rows,
        0,
        2_000_000,
        &FitOptions::default(),
    )
    .unwrap();
    m.version = version;
    let path = dir.join(format!("model-v{version}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    path
}

/// Runs `edgewatch models <args>`; panics with its output unless it exits 0.
pub(crate) fn models_cli(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_edgewatch"))
        .arg("models")
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "edgewatch models {args:?}: {text}");
    text
}

/// The log without ANSI colour codes.
pub(crate) fn plain_log(path: &Path) -> String {
    let raw = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Waits until at least `n` lines of the log after byte `from` contain every one of `needles`.
pub(crate) async fn wait_log(path: &Path, from: usize, needles: &[&str], n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = plain_log(path);
        let count = log
            .get(from.min(log.len())..)
            .unwrap_or_default()
            .lines()
            .filter(|l| needles.iter().all(|s| l.contains(s)))
            .count();
        if count >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {n} agent log line(s) with {needles:?}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Publishes steps `steps` of the device (QoS 1, in order), broken where `broken` says.
pub(crate) async fn publish(
    client: &AsyncClient,
    base_ms: i64,
    steps: std::ops::Range<i64>,
    broken: impl Fn(i64) -> bool,
) {
    for i in steps {
        for (j, metric) in METRICS.iter().enumerate() {
            let payload = format!(
                r#"{{"ts":{},"value":{}}}"#,
                base_ms + i * 1000 + j as i64,
                reading(i, j, broken(i))
            );
            client
                .publish(
                    format!("sensors/{DEVICE}/{metric}"),
                    QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .await
                .unwrap();
        }
    }
}

/// Waits for a `pca` event of the device whose timestamp lies in `steps`; returns it.
pub(crate) async fn wait_pca(
    feed: &FeedClient,
    base_ms: i64,
    steps: std::ops::Range<i64>,
) -> AnomalyEvent {
    let range = base_ms + steps.start * 1000..base_ms + steps.end * 1000;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let events = feed.snapshot();
        let found = events
            .iter()
            .find(|e| e.detector == "pca" && range.contains(&e.ts_ms));
        if let Some(e) = found {
            return e.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no pca event in steps {steps:?}; feed: {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the aggregator holds exactly `n` readings (never more).
pub(crate) async fn wait_readings(addr: std::net::SocketAddr, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let held = readings(addr);
        assert!(
            held <= n,
            "the aggregator holds {held} readings, more than the {n} published"
        );
        if held == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the aggregator holds {held} of {n} readings"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_pushed_swapped_in_mid_stream_and_survive_a_kill() {
    edgewatch::logging::init("warn");
    let dir = tempfile::tempdir().unwrap();
    let subscriptions = SubscriptionLog::new();
    let mosq = Mosquitto::start_on(
        free_port(),
        &format!("persistence false\n{}", subscriptions.settings()),
    );

    let mut agg_cfg = AggregatorConfig::with_id("agg-m");
    agg_cfg.mqtt.port = mosq.port;
    agg_cfg.http.listen = "127.0.0.1:0".into();
    let agg = Aggregator::bind(agg_cfg).await.unwrap();
    let (addr, feed_url) = (agg.local_addr(), agg.feed_url());
    let stop_agg = CancellationToken::new();
    let agg_task = {
        let t = stop_agg.clone();
        tokio::spawn(agg.run(async move { t.cancelled().await }))
    };
    let feed = FeedClient::connect(&feed_url).await;
    // What `models push` reads: the aggregator's broker and prefix.
    let agg_yaml = dir.path().join("aggregator-m.yaml");
    std::fs::write(
        &agg_yaml,
        format!(
            "id: agg-m\nmqtt: {{ host: 127.0.0.1, port: {} }}\n",
            mosq.port
        ),
    )
    .unwrap();
    let agg_yaml = agg_yaml.to_str().unwrap();

    let agent_yaml = dir.path().join("agent.yaml");
    std::fs::write(
        &agent_yaml,
        format!(
            "id: gw-m\n\
             source: {{ mqtt: {{ host: 127.0.0.1, port: {} }}, qos: 1 }}\n\
             uplink: {{ ack_timeout_ms: 2000 }}\n\
             window: {{ size_ms: 10000, allowed_lateness_ms: 0, idle_timeout_ms: 1000 }}\n\
             state: {{ dir: \"{}\", checkpoint_interval_ms: 500, ack_mode: after_checkpoint }}\n\
             models: {{ enabled: true, threshold: 0.5 }}\n",
            mosq.port,
            dir.path().join("agent-state").display()
        ),
    )
    .unwrap();
    let log = dir.path().join("agent.log");
    let args = ["agent", "--config", agent_yaml.to_str().unwrap()];
    let agent = Proc::spawn("agent", &args, &log);
    subscriptions
        .wait_subscribed("edgewatch-gw-m-src", Duration::from_secs(20))
        .await;
    // Acks and models.
    subscriptions
        .wait_filters("edgewatch-gw-m-up", 3, Duration::from_secs(20))
        .await;

    let mut opts = MqttOptions::new("models-sensors", "127.0.0.1", mosq.port);
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
    // Event time three hours back, on a window boundary, advancing 1 s per step.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let base = (now - 3 * 3_600_000) / 10_000 * 10_000;

    // No model yet: univariate only.
    publish(&client, base, 0..200, |_| false).await;
    let v1 = model_file(dir.path(), 1);
    let shown = models_cli(&["show", v1.to_str().unwrap()]);
    assert!(
        shown.contains(DEVICE) && shown.contains("valid           yes"),
        "{shown}"
    );
    let pushed = models_cli(&[
        "push",
        v1.to_str().unwrap(),
        "--config",
        agg_yaml,
        "--agent",
        "gw-m",
    ]);
    assert!(pushed.contains("/models/gw-m/pca-"), "{pushed}");
    wait_log(&log, 0, &["model swapped in", "version=1"], 1).await;

    // Garbage on the device's model topic is refused (and logged with the reason); v1 runs on.
    let topic = edgewatch_models::wire::Topics::new("edgewatch/v1")
        .models("gw-m", &edgewatch_models::wire::model_key(DEVICE));
    client
        .publish(&topic, QoS::AtLeastOnce, false, "{\"kind\":\"pca\"")
        .await
        .unwrap();
    wait_log(&log, 0, &["model refused", "payload"], 1).await;

    publish(&client, base, 200..500, |i| (300..360).contains(&i)).await;
    let e1 = wait_pca(&feed, base, 300..360).await;
    assert_eq!(
        (e1.device.as_str(), e1.metric.as_str(), e1.model_version),
        (DEVICE, "current", Some(1)),
        "{e1:?}"
    );

    let v2 = model_file(dir.path(), 2);
    models_cli(&[
        "push",
        v2.to_str().unwrap(),
        "--config",
        agg_yaml,
        "--agent",
        "gw-m",
    ]);
    wait_log(&log, 0, &["model swapped in", "version=2", "previous=1"], 1).await;
    publish(&client, base, 500..800, |i| (600..660).contains(&i)).await;
    let e2 = wait_pca(&feed, base, 600..660).await;
    assert_eq!(e2.model_version, Some(2), "{e2:?}");
    assert_eq!(e2.metric, "current", "{e2:?}");
    let events: Vec<(Option<u64>, i64, String, f64)> = feed
        .snapshot()
        .iter()
        .filter(|e| e.detector == "pca")
        .map(|e| {
            (
                e.model_version,
                (e.ts_ms - base) / 1000,
                e.metric.clone(),
                e.score,
            )
        })
        .collect();
    let pca: Vec<Option<u64>> = events.iter().map(|e| e.0).collect();
    assert_eq!(
        pca,
        vec![Some(1), Some(2)],
        "one event per break; (version, step, metric, score): {events:?}"
    );
    // Every reading counted exactly once (the last windows close on the agent's idle timeout).
    wait_readings(addr, 800 * 3).await;

    // Crash; the broker forgets the model; the agent must run v2 from its own disk.
    agent.kill9();
    let cleared = models_cli(&["clear", DEVICE, "--config", agg_yaml, "--agent", "gw-m"]);
    assert!(cleared.contains("cleared"), "{cleared}");
    let restart_at = plain_log(&log).len();
    let agent = Proc::spawn("agent", &args, &log);
    wait_log(
        &log,
        restart_at,
        &["model loaded from disk", "version: 2"],
        1,
    )
    .await;
    subscriptions
        .wait_filters("edgewatch-gw-m-up", 6, Duration::from_secs(20))
        .await;
    subscriptions
        .wait_filters("edgewatch-gw-m-src", 2, Duration::from_secs(20))
        .await;
    publish(&client, base, 800..1000, |i| (900..960).contains(&i)).await;
    let e3 = wait_pca(&feed, base, 900..960).await;
    assert_eq!(e3.model_version, Some(2), "{e3:?}");
    wait_readings(addr, 1000 * 3).await;
    let restarted = plain_log(&log)[restart_at..].to_string();
    assert!(
        !restarted.contains("model swapped in"),
        "no model came from the broker after the restart:\n{restarted}"
    );

    agent.terminate();
    client.disconnect().await.unwrap();
    let _ = poll.await;
    stop_agg.cancel();
    agg_task.await.unwrap().unwrap();
}

/// `models` exits 1 on a bad model file or configuration and 2 when the broker is unreachable.
#[test]
fn models_cli_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_edgewatch"))
            .arg("models")
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let port = free_port();
    let conf = dir.path().join("aggregator-x.yaml");
    std::fs::write(
        &conf,
        format!("id: agg-x\nmqtt: {{ host: 127.0.0.1, port: {port} }}\n"),
    )
    .unwrap();
    let conf = conf.to_str().unwrap();
    let good = model_file(dir.path(), 1);
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{}").unwrap();
    let (code, err) = run(&["push", bad.to_str().unwrap(), "--config", conf]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("bad.json"), "{err}");
    let (code, err) = run(&["show", bad.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    let (code, err) = run(&[
        "push",
        good.to_str().unwrap(),
        "--config",
        "/nonexistent/aggregator.yaml",
    ]);
    assert_eq!(code, 1, "{err}");
    let (code, err) = run(&["push", good.to_str().unwrap(), "--config", conf]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
}
