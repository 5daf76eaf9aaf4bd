//! Remote node management and reloads, end to end on mosquitto with agents as `edgewatch agent`
//! processes: every aggregator lists every agent (`/api/agents`, `edgewatch agents`), a kill -9
//! shows the agent offline through its last will, a configuration pushed on `{prefix}/config/{agent}`
//! is applied (status and behaviour) or refused with its line, and SIGHUP reloads the file with
//! `edgewatch verify` exact across it.

use crate::common::*;
use crate::crash::{verify, Proc};
use crate::wait::SubscriptionLog;
use edgewatch_models::detect::{Detector, DetectorConfig};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Readings of one series: `PREFIX` ordinary ones, then a spike.
const PREFIX: usize = 120;

/// The values of one series and the two thresholds around its spike's score under the default
/// detector: `high` lets the whole series through without an event, `low` raises one at the spike
/// (and none before it). Computed with the detector itself, so the test does not depend on its tuning.
struct Pattern {
    /// Reading timestamps (1 s apart, ending about 8 minutes ago: the detector sees the very times
    /// the agent will).
    ts: Vec<i64>,
    values: Vec<f64>,
    high: f64,
    low: f64,
}

fn pattern() -> Pattern {
    let start = (now_ms() - 10 * 60_000) / 10_000 * 10_000;
    let ts: Vec<i64> = (0..=PREFIX as i64).map(|i| start + i * 1000).collect();
    let base: Vec<f64> = (0..PREFIX)
        .map(|i| 20.0 + 0.5 * (i as f64 * 0.7).sin())
        .collect();
    for k in 1..2_000 {
        let spike = 20.0 + k as f64 * 0.05;
        let mut d = DetectorConfig::default().build().unwrap();
        let mut prefix_max: f64 = 0.0;
        for (t, v) in ts.iter().zip(&base) {
            prefix_max = prefix_max.max(d.update(*t, *v));
        }
        let s = d.update(ts[PREFIX], spike);
        if s > prefix_max + 0.1 && s < 0.95 {
            let mut values = base.clone();
            values.push(spike);
            return Pattern {
                ts,
                values,
                high: (s + 1.0) / 2.0,
                low: (prefix_max + s) / 2.0,
            };
        }
    }
    panic!("no spike scores between the ordinary readings and 0.95 under the default detector");
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Publishes `p`'s series for `device` (metric `temp`) on
/// `sensors/{device}/temp`; appends each reading to the readings log `log`, if given.
async fn publish_series(client: &AsyncClient, device: &str, p: &Pattern, log: Option<&Path>) {
    publish_on(client, "sensors", device, p, log).await
}

/// [`publish_series`] on `{prefix}/{device}/temp`.
async fn publish_on(
    client: &AsyncClient,
    prefix: &str,
    device: &str,
    p: &Pattern,
    log: Option<&Path>,
) {
    let mut lines = String::new();
    for (ts, v) in p.ts.iter().zip(&p.values) {
        let payload = format!(r#"{{"value":{v},"ts":{ts}}}"#);
        client
            .publish(
                format!("{prefix}/{device}/temp"),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .unwrap();
        lines.push_str(&format!("{device},temp,{ts},{v}\n"));
    }
    if let Some(log) = log {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        f.write_all(lines.as_bytes()).unwrap();
    }
}

/// An MQTT client of its own on `port` (its poll loop runs in the background).
fn client(port: u16, id: &str) -> AsyncClient {
    let (c, mut ev) = AsyncClient::new(MqttOptions::new(id, "127.0.0.1", port), 1000);
    tokio::spawn(async move { while ev.poll().await.is_ok() {} });
    c
}

/// An agent's configuration file: status every 500 ms, HTTP endpoint on `http`, no silence events
/// (a series that stops would raise one), `threshold`, `topic` as its subscription.
fn agent_yaml(
    dir: &Path,
    id: &str,
    broker: u16,
    http: u16,
    threshold: f64,
    topic: &str,
    extra: &str,
) -> PathBuf {
    let path = dir.join(format!("{id}.yaml"));
    std::fs::write(
        &path,
        agent_text(dir, id, broker, http, threshold, topic, extra),
    )
    .unwrap();
    path
}

fn agent_text(
    dir: &Path,
    id: &str,
    broker: u16,
    http: u16,
    threshold: f64,
    topic: &str,
    extra: &str,
) -> String {
    format!(
        "id: {id}\n\
         source:\n  mqtt: {{ host: 127.0.0.1, port: {broker} }}\n  subscriptions: [ {{ topic: \"{topic}\" }} ]\n\
         window: {{ size_ms: 10000, allowed_lateness_ms: 0 }}\n\
         anomaly:\n  threshold: {threshold}\n  silence: {{ enabled: false }}\n\
         state: {{ dir: \"{}\", flush_on_exit: true }}\n\
         http: {{ listen: \"127.0.0.1:{http}\" }}\n\
         status: {{ interval_ms: 500 }}\n\
         log: {{ status_interval_ms: 0 }}\n{extra}",
        dir.join(format!("{id}-state")).display()
    )
}

/// One value of the agent's `/metrics` (a family without labels beyond `agent`).
fn agent_metric(http: u16, family: &str) -> u64 {
    let addr: SocketAddr = format!("127.0.0.1:{http}").parse().unwrap();
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200);
    body.lines()
        .find(|l| l.starts_with(&format!("{family}{{")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("{family} not in the agent's /metrics:\n{body}")) as u64
}

/// The agent `id` as the aggregator at `addr` lists it, if it does.
fn listed(addr: SocketAddr, id: &str) -> Option<Value> {
    let doc = get_json(addr, "/api/agents");
    doc["agents"]
        .as_array()?
        .iter()
        .find(|a| a["agent"] == id)
        .cloned()
}

/// An in-process aggregator owning `owned`, in memory, on mosquitto at `broker`.
async fn aggregator(
    id: &str,
    broker: u16,
    owned: &str,
) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
    let cfg: edgewatch_aggregator::AggregatorConfig = serde_norway::from_str(&format!(
        "id: {id}\nmqtt: {{ host: 127.0.0.1, port: {broker} }}\nowned: [\"{owned}\"]\nhttp: {{ listen: \"127.0.0.1:0\" }}\n"
    ))
    .unwrap();
    let agg = edgewatch_aggregator::Aggregator::bind(cfg).await.unwrap();
    let addr = agg.local_addr();
    let stop = CancellationToken::new();
    let t = stop.clone();
    let task = tokio::spawn(async move {
        agg.run(async move { t.cancelled().await }).await.unwrap();
    });
    (addr, stop, task)
}

fn edgewatch(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_edgewatch"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_aggregator_lists_the_fleet_and_pushed_configs_are_applied_or_refused() {
    edgewatch::logging::init("warn");
    let p = pattern();
    let dir = tempfile::tempdir().unwrap();
    let subs = SubscriptionLog::new();
    let mosq = Mosquitto::start_on(
        free_port(),
        &format!("persistence false\n{}", subs.settings()),
    );
    let (a1, stop1, t1) = aggregator("agg-1", mosq.port, "0-31").await;
    let (a2, stop2, t2) = aggregator("agg-2", mosq.port, "32-63").await;

    let (http_a, http_b) = (free_port(), free_port());
    let conf_a = agent_yaml(
        dir.path(),
        "gw-a",
        mosq.port,
        http_a,
        p.high,
        "sensors/{device}/{metric}",
        "",
    );
    let conf_b = agent_yaml(
        dir.path(),
        "gw-b",
        mosq.port,
        http_b,
        p.high,
        "other/{device}/{metric}",
        "",
    );
    let log = dir.path().join("agents.log");
    let args_a = ["agent", "--config", conf_a.to_str().unwrap()];
    let gw_a = Proc::spawn("gw-a", &args_a, &log);
    let gw_b = Proc::spawn(
        "gw-b",
        &["agent", "--config", conf_b.to_str().unwrap()],
        &log,
    );
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    // Both agents online at both aggregators.
    for addr in [a1, a2] {
        wait_until("both agents listed online", Duration::from_secs(30), || {
            ["gw-a", "gw-b"]
                .iter()
                .all(|id| listed(addr, id).is_some_and(|a| a["online"] == true))
        })
        .await;
    }
    let a = listed(a2, "gw-a").unwrap();
    assert_eq!(a["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(a["config"]["source"], "file");
    assert_eq!(a["config"]["applied"], a["config_digest"]);
    assert_eq!(a["interval_ms"], 500);
    let digest0 = a["config_digest"].as_str().unwrap().to_string();
    assert_eq!(
        get_json(a1, "/api/agents?limit=1&offset=1")["agents"][0]["agent"],
        "gw-b"
    );
    assert_eq!(get_json(a1, "/api/agents?limit=1")["total"], 2);
    assert_eq!(http_get(a1, "/api/agents?limit=0").0, 400);

    // The command, from either aggregator.
    let (code, out, err) = edgewatch(&["agents", "--aggregator", &format!("http://{a1}")]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("gw-a") && l.contains(" online ")),
        "{out}"
    );
    assert!(out.lines().any(|l| l.starts_with("gw-b")), "{out}");
    assert!(out.ends_with("2 agents\n"), "{out}");
    let (code, out, err) =
        edgewatch(&["agents", "--aggregator", &format!("http://{a2}"), "--json"]);
    assert_eq!(code, 0, "{err}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["total"], 2);

    // A forged status (another agent's id in the body) is refused and counted; gw-a is untouched.
    let ops = client(mosq.port, "forger");
    ops.publish(
        "edgewatch/v1/status/gw-a",
        QoS::AtLeastOnce,
        false,
        r#"{"agent":"gw-z","online":false}"#,
    )
    .await
    .unwrap();
    wait_until("the forged status counted", Duration::from_secs(10), || {
        http_get(a1, "/metrics").1.contains(
            "edgewatch_aggregator_agent_status_refused_total{aggregator=\"agg-1\",reason=\"id_mismatch\"} 1",
        )
    })
    .await;
    assert!(listed(a1, "gw-z").is_none());
    assert_eq!(listed(a1, "gw-a").unwrap()["online"], true);

    // Behaviour before: the spike stays under the high threshold.
    subs.wait_subscribed("edgewatch-gw-a-src", Duration::from_secs(20))
        .await;
    let sensors = client(mosq.port, "sensors");
    let n = p.values.len() as u64;
    publish_series(&sensors, "d1", &p, None).await;
    wait_until("gw-a to process d1", Duration::from_secs(30), || {
        agent_metric(http_a, "edgewatch_agent_readings_total") == n
    })
    .await;
    assert_eq!(agent_metric(http_a, "edgewatch_agent_anomalies_total"), 0);

    // A valid configuration pushed (an overlay on the file): applied, visible in the status...
    let push = format!("# pushed by ops\nanomaly:\n  threshold: {}\n", p.low);
    ops.publish(
        "edgewatch/v1/config/gw-a",
        QoS::AtLeastOnce,
        true,
        push.clone(),
    )
    .await
    .unwrap();
    wait_until("the pushed config applied", Duration::from_secs(20), || {
        listed(a1, "gw-a").is_some_and(|a| {
            a["config"]["source"] == "remote" && a["config_digest"] != digest0.as_str()
        })
    })
    .await;
    let a = listed(a1, "gw-a").unwrap();
    assert_eq!(a["config"]["applied"], a["config_digest"], "{a}");
    assert!(a["config"].get("refused").is_none(), "{a}");
    let digest1 = a["config_digest"].as_str().unwrap().to_string();
    // ... and in behaviour: the same series now raises its event.
    publish_series(&sensors, "d2", &p, None).await;
    wait_until("gw-a to process d2", Duration::from_secs(30), || {
        agent_metric(http_a, "edgewatch_agent_readings_total") == 2 * n
    })
    .await;
    assert_eq!(agent_metric(http_a, "edgewatch_agent_anomalies_total"), 1);

    // An invalid one: refused with its line, the agent keeps running the previous one.
    ops.publish(
        "edgewatch/v1/config/gw-a",
        QoS::AtLeastOnce,
        true,
        "anomaly:\n  threshold: 7\n",
    )
    .await
    .unwrap();
    wait_until(
        "the invalid config refused",
        Duration::from_secs(20),
        || {
            [a1, a2].iter().all(|addr| {
                listed(*addr, "gw-a").is_some_and(|a| a["config"]["refused"]["line"] == 2)
            })
        },
    )
    .await;
    let a = listed(a2, "gw-a").unwrap();
    let error = a["config"]["refused"]["error"].as_str().unwrap();
    assert!(
        error
            .contains("remote config: anomaly.threshold (line 2, col 3): must be in (0, 1], got 7"),
        "{a}"
    );
    assert_eq!(
        a["config_digest"],
        digest1.as_str(),
        "the configuration in force is unchanged"
    );
    assert_eq!(a["online"], true);
    publish_series(&sensors, "d3", &p, None).await;
    wait_until("gw-a to process d3", Duration::from_secs(30), || {
        agent_metric(http_a, "edgewatch_agent_readings_total") == 3 * n
    })
    .await;
    assert_eq!(
        agent_metric(http_a, "edgewatch_agent_anomalies_total"),
        2,
        "the low threshold still runs"
    );
    assert!(
        log_text().contains("configuration refused"),
        "{}",
        log_text()
    );

    // kill -9: the broker publishes gw-b's last will; every aggregator shows it offline.
    gw_b.kill9();
    for addr in [a1, a2] {
        wait_until("gw-b offline", Duration::from_secs(20), || {
            listed(addr, "gw-b").is_some_and(|a| a["online"] == false)
        })
        .await;
    }
    let (_, out, _) = edgewatch(&["agents", "--aggregator", &format!("http://{a1}")]);
    assert!(
        out.lines()
            .any(|l| l.starts_with("gw-b") && l.contains(" offline ")),
        "{out}"
    );

    // A clean stop says offline too; a restart keeps the pushed configuration (state.dir), whose
    // retained message is also delivered again (and changes nothing).
    ops.publish("edgewatch/v1/config/gw-a", QoS::AtLeastOnce, true, push)
        .await
        .unwrap();
    wait_until("the valid config back", Duration::from_secs(20), || {
        listed(a1, "gw-a").is_some_and(|a| {
            a["config"].get("refused").is_none() && a["config_digest"] == digest1.as_str()
        })
    })
    .await;
    gw_a.terminate();
    wait_until(
        "gw-a offline after a clean stop",
        Duration::from_secs(20),
        || listed(a1, "gw-a").is_some_and(|a| a["online"] == false),
    )
    .await;
    // While it is down, the operator replaces the pushed configuration with an empty overlay
    // (`{}`, retained: back to the file). The stored one runs at start, then the retained `{}`.
    ops.publish("edgewatch/v1/config/gw-a", QoS::AtLeastOnce, true, "{}")
        .await
        .unwrap();
    let gw_a = Proc::spawn("gw-a", &args_a, &log);
    wait_until("gw-a back online", Duration::from_secs(30), || {
        listed(a1, "gw-a").is_some_and(|a| a["online"] == true)
    })
    .await;
    wait_until("gw-a on its file again", Duration::from_secs(20), || {
        listed(a1, "gw-a").is_some_and(|a| a["config_digest"] == digest0.as_str())
    })
    .await;
    assert!(
        log_text().contains("running the file with the stored remote configuration over it"),
        "{}",
        log_text()
    );
    gw_a.terminate();
    stop1.cancel();
    stop2.cancel();
    t1.await.unwrap();
    t2.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_changes_the_threshold_live_keeps_a_bad_file_out_and_verify_stays_exact() {
    edgewatch::logging::init("warn");
    let p = pattern();
    let dir = tempfile::tempdir().unwrap();
    let subs = SubscriptionLog::new();
    let mosq = Mosquitto::start_on(
        free_port(),
        &format!("persistence false\n{}", subs.settings()),
    );
    let (addr, stop, task) = aggregator("agg-h", mosq.port, "0-63").await;
    let http = free_port();
    let topic = "sensors/{device}/{metric}";
    let conf = agent_yaml(dir.path(), "gw-h", mosq.port, http, p.high, topic, "");
    let log = dir.path().join("agent.log");
    let agent = Proc::spawn("gw-h", &["agent", "--config", conf.to_str().unwrap()], &log);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    subs.wait_subscribed("edgewatch-gw-h-src", Duration::from_secs(20))
        .await;
    let readings = dir.path().join("readings.csv");
    let sensors = client(mosq.port, "sensors");
    let n = p.values.len() as u64;

    publish_series(&sensors, "h1", &p, Some(&readings)).await;
    wait_until("h1 processed", Duration::from_secs(30), || {
        agent_metric(http, "edgewatch_agent_readings_total") == n
    })
    .await;
    assert_eq!(agent_metric(http, "edgewatch_agent_anomalies_total"), 0);

    // The file changes: the threshold (live) and the window size (needs a restart, named).
    std::fs::write(
        &conf,
        agent_text(dir.path(), "gw-h", mosq.port, http, p.low, topic, "")
            .replace("size_ms: 10000", "size_ms: 20000"),
    )
    .unwrap();
    let hup = |pid: u32| {
        let ok = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    };
    hup(agent.id());
    wait_until("the reload logged", Duration::from_secs(20), || {
        log_text().contains("configuration applied")
    })
    .await;
    let text = log_text();
    assert!(
        text.contains("window.size_ms") && text.contains("only after a restart"),
        "{text}"
    );
    publish_series(&sensors, "h2", &p, Some(&readings)).await;
    wait_until("h2 processed", Duration::from_secs(30), || {
        agent_metric(http, "edgewatch_agent_readings_total") == 2 * n
    })
    .await;
    assert_eq!(
        agent_metric(http, "edgewatch_agent_anomalies_total"),
        1,
        "the new threshold runs"
    );

    // An invalid file: logged with file, key and line; the agent keeps running the previous one.
    std::fs::write(&conf, "id: gw-h\nanomaly:\n  threshold: 2\n").unwrap();
    hup(agent.id());
    wait_until("the refusal logged", Duration::from_secs(20), || {
        log_text().contains("configuration refused")
    })
    .await;
    let text = log_text();
    assert!(text.contains("anomaly.threshold (line 3, col 3)"), "{text}");
    publish_series(&sensors, "h3", &p, Some(&readings)).await;
    wait_until("h3 processed", Duration::from_secs(30), || {
        agent_metric(http, "edgewatch_agent_readings_total") == 3 * n
    })
    .await;
    assert_eq!(agent_metric(http, "edgewatch_agent_anomalies_total"), 2);

    // A clean stop closes every window; what the aggregator holds is exactly what was sent.
    agent.terminate();
    wait_until("every window applied", Duration::from_secs(30), || {
        get_json(addr, "/api/status")["readings"].as_u64() == Some(3 * n)
    })
    .await;
    let (code, out) = verify(&readings, &[addr], &[]);
    assert_eq!(code, 0, "verify is exact across the reloads:\n{out}");
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_changes_subscriptions_live_and_a_restart_unsubscribes_what_the_file_dropped() {
    edgewatch::logging::init("warn");
    let p = pattern();
    let dir = tempfile::tempdir().unwrap();
    let subs = SubscriptionLog::new();
    let mosq = Mosquitto::start_on(
        free_port(),
        &format!("persistence false\n{}", subs.settings_with_unsubscribes()),
    );
    let (addr, stop, task) = aggregator("agg-s", mosq.port, "0-63").await;
    let http = free_port();
    let conf = |topic: &str| {
        agent_yaml(dir.path(), "gw-s", mosq.port, http, p.high, topic, "");
    };
    conf("sensors/{device}/{metric}");
    let log = dir.path().join("agent.log");
    let start = || {
        Proc::spawn(
            "gw-s",
            &[
                "agent",
                "--config",
                dir.path().join("gw-s.yaml").to_str().unwrap(),
            ],
            &log,
        )
    };
    let agent = start();
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let client_id = "edgewatch-gw-s-src";
    subs.wait_line(client_id, "1 sensors/+/+", Duration::from_secs(20))
        .await;
    let readings = dir.path().join("readings.csv");
    let sensors = client(mosq.port, "sensors");
    let n = p.values.len() as u64;
    let processed = |k: u64| {
        wait_until("readings processed", Duration::from_secs(30), move || {
            agent_metric(http, "edgewatch_agent_readings_total") == k * n
        })
    };
    publish_series(&sensors, "s1", &p, Some(&readings)).await;
    processed(1).await;

    // The subscription moves to plant/: applied live (subscribe first, then unsubscribe).
    conf("plant/{device}/{metric}");
    let hup = |pid: u32| {
        assert!(Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap()
            .success());
    };
    hup(agent.id());
    subs.wait_line(client_id, "1 plant/+/+", Duration::from_secs(20))
        .await;
    subs.wait_line(client_id, "sensors/+/+", Duration::from_secs(20))
        .await;
    let text = log_text();
    assert!(text.contains("subscriptions changed"), "{text}");
    assert!(
        !text.contains("only after a restart"),
        "source.subscriptions is applied live:\n{text}"
    );
    // What is published on the old topic is no longer delivered; the new topic is processed, and
    // nothing is refused as a topic mismatch.
    publish_series(&sensors, "gone", &p, None).await;
    publish_on(&sensors, "plant", "p1", &p, Some(&readings)).await;
    processed(2).await;

    // Restart with the file moved on to line/: the persistent session still holds plant/+/+, which
    // the agent unsubscribes at its first connect (the list is kept in state.dir).
    agent.terminate();
    conf("line/{device}/{metric}");
    let agent = start();
    subs.wait_line(client_id, "1 line/+/+", Duration::from_secs(20))
        .await;
    subs.wait_line(client_id, "plant/+/+", Duration::from_secs(20))
        .await;
    publish_on(&sensors, "plant", "gone-too", &p, None).await;
    publish_on(&sensors, "line", "l1", &p, Some(&readings)).await;
    wait_until("l1 processed", Duration::from_secs(30), || {
        agent_metric(http, "edgewatch_agent_readings_total") == n
    })
    .await;
    let (_, metrics) = http_get(format!("127.0.0.1:{http}").parse().unwrap(), "/metrics");
    let mismatches: Vec<&str> = metrics
        .lines()
        .filter(|l| l.contains("reason=\"topic_mismatch\"") && !l.ends_with(" 0"))
        .collect();
    assert!(
        mismatches.is_empty(),
        "nothing from a dropped subscription reached the agent: {mismatches:?}"
    );
    agent.terminate();
    wait_until("every window applied", Duration::from_secs(30), || {
        get_json(addr, "/api/status")["readings"].as_u64() == Some(3 * n)
    })
    .await;
    let (code, out) = verify(&readings, &[addr], &[]);
    assert_eq!(
        code, 0,
        "verify is exact across the subscription changes:\n{out}"
    );
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregator_survives_sighup_refuses_a_bad_file_and_names_keys_needing_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let broker = embedded_broker();
    let http = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{http}").parse().unwrap();
    let conf = crate::crash::aggregator_yaml(dir.path(), "agg-hup", broker.addr().port(), http);
    let log = dir.path().join("aggregator.log");
    let agg = Proc::spawn(
        "aggregator",
        &["aggregator", "--config", conf.to_str().unwrap()],
        &log,
    );
    crate::crash::wait_http(addr);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let hup = || {
        let ok = Command::new("kill")
            .args(["-HUP", &agg.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    };
    let good = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(&conf, format!("{good}feed: {{ history: 7 }}\n")).unwrap();
    hup();
    wait_until("the changed keys named", Duration::from_secs(20), || {
        log_text().contains("only after a restart of the aggregator")
    })
    .await;
    assert!(log_text().contains("feed.history"), "{}", log_text());
    std::fs::write(&conf, "id: \"agg hup\"\n").unwrap();
    hup();
    wait_until("the refusal logged", Duration::from_secs(20), || {
        log_text().contains("configuration refused")
    })
    .await;
    assert!(log_text().contains("id (line 1, col 1)"), "{}", log_text());
    // Still serving, then a clean stop on SIGTERM.
    assert_eq!(http_get(addr, "/healthz").0, 200);
    agg.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregator_applies_log_level_and_fleet_gates_live_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let broker = embedded_broker();
    let http = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{http}").parse().unwrap();
    let conf = crate::crash::aggregator_yaml(dir.path(), "agg-live", broker.addr().port(), http);
    let base = std::fs::read_to_string(&conf).unwrap();
    let with = |extra: &str| std::fs::write(&conf, format!("{base}{extra}")).unwrap();
    with("fleet: { enabled: true }\nlog: { level: warn }\n");
    let log = dir.path().join("aggregator.log");
    // No RUST_LOG and no --log-level: the file's log.level decides.
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgewatch"))
        .args(["aggregator", "--config", conf.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    crate::crash::wait_http(addr);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let hup = |pid: u32| {
        assert!(Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap()
            .success());
    };
    // The level goes to info and the fleet's gate and class minimum change: applied live.
    with("fleet: { enabled: true, min_devices: 9, gate: { rearm_ratio: 0.5 } }\nlog: { level: info }\n");
    hup(child.id());
    wait_until("the reload logged at info", Duration::from_secs(20), || {
        log_text().contains("configuration applied")
    })
    .await;
    let text = log_text();
    assert!(
        !text.contains("http.advertise not set"),
        "warn was in force at start:\n{text}"
    );
    for key in ["log.level", "fleet.gate.rearm_ratio", "fleet.min_devices"] {
        assert!(text.contains(key), "{key} applied:\n{text}");
    }
    assert!(!text.contains("only after a restart"), "{text}");
    // A key that needs a restart beside a bad gate: refused whole, nothing applied.
    with("fleet: { enabled: true, gate: { rearm_ratio: 0.0 } }\nfeed: { history: 7 }\nlog: { level: info }\n");
    hup(child.id());
    wait_until("the refusal logged", Duration::from_secs(20), || {
        log_text().contains("configuration refused")
    })
    .await;
    assert!(
        log_text().contains("fleet.gate.rearm_ratio"),
        "{}",
        log_text()
    );
    assert_eq!(http_get(addr, "/healthz").0, 200);
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_log_level_follows_its_file_at_start_and_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let broker = embedded_broker();
    let http = free_port();
    let topic = "sensors/{device}/{metric}";
    let port = broker.addr().port();
    let text = |level: &str| {
        agent_text(dir.path(), "gw-l", port, http, 0.9, topic, "").replace(
            "log: { status_interval_ms: 0 }",
            &format!("log: {{ status_interval_ms: 0, level: {level} }}"),
        )
    };
    let conf = dir.path().join("gw-l.yaml");
    std::fs::write(&conf, text("warn")).unwrap();
    let log = dir.path().join("agent.log");
    // No RUST_LOG and no --log-level: the file's log.level decides.
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgewatch"))
        .args(["agent", "--config", conf.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{http}").parse().unwrap();
    crate::crash::wait_http(addr);
    wait_until("the agent connected", Duration::from_secs(20), || {
        agent_metric(http, "edgewatch_agent_uplink_connected") == 1
    })
    .await;
    std::fs::write(&conf, text("info")).unwrap();
    let ok = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until("the reload logged at info", Duration::from_secs(20), || {
        log_text().contains("configuration applied")
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let text = log_text();
    assert!(
        !text.contains("agent starting"),
        "warn was in force at start:\n{text}"
    );
    assert!(text.contains("log.level"), "{text}");
}
