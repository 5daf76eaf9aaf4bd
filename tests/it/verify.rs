//! `edgewatch verify` against a real run: a seeded simulator writes its readings log while
//! publishing through the embedded broker to an agent and two token-protected aggregators; once
//! everything is applied, the log reconciles exactly (library call and binary, exit 0), and a log
//! with one extra line fails (exit 1) naming that series and window.

use crate::common::*;
use crate::wait::SubAckTap;
use edgewatch::verify::{verify, VerifyArgs};
use edgewatch_agent::{Agent, AgentConfig};
use edgewatch_aggregator::config::PartitionSpec;
use edgewatch_aggregator::{Aggregator, AggregatorConfig};
use edgewatch_simulators::SimulatorConfig;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A variable name only this test uses, so setting it cannot disturb other tests.
const TOKEN_VAR: &str = "EDGEWATCH_IT_VERIFY_TOKEN";
const TOKEN: &str = "verify-s3cret";

/// Cumulative readings an aggregator reports in /api/status.
fn status_readings(addr: SocketAddr) -> u64 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /api/status HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let body = raw.split_once("\r\n\r\n").unwrap().1;
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["readings"].as_u64().unwrap()
}

/// Runs the binary's `verify` on `log`; returns (exit code, stdout, stderr).
async fn run_verify(log: &Path, urls: &[String], extra: &[&str]) -> (i32, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_edgewatch"));
    cmd.arg("verify").arg("--readings").arg(log);
    for u in urls {
        cmd.args(["--aggregator", u]);
    }
    cmd.args(["--window-ms", "60000"]).args(extra);
    let out = cmd.output().await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reconciles_a_real_run_exactly_and_catches_one_extra_reading() {
    edgewatch::logging::init("warn");
    std::env::set_var(TOKEN_VAR, TOKEN);
    let broker = embedded_broker();
    let (host, port) = (broker.addr().ip().to_string(), broker.addr().port());
    let dir = tempfile::tempdir().unwrap();
    // Agent and aggregators connect through the tap, so the test sees their subscriptions land.
    let tap = SubAckTap::start(broker.addr()).await;

    let mut aggs = Vec::new();
    for (i, range) in ["0-31", "32-63"].iter().enumerate() {
        let mut cfg = AggregatorConfig::with_id(&format!("agg-v{i}"));
        cfg.mqtt.host = host.clone();
        cfg.mqtt.port = tap.port();
        cfg.owned = vec![PartitionSpec::Range(range.to_string())];
        cfg.http.listen = "127.0.0.1:0".into();
        cfg.http.auth_token_env = Some(TOKEN_VAR.into());
        // Every window of the run stays held, so each one is checked against the log.
        cfg.state.windows_per_series = 1000;
        aggs.push(Aggregator::bind(cfg).await.unwrap());
    }
    let addrs: Vec<_> = aggs.iter().map(Aggregator::local_addr).collect();
    let urls: Vec<String> = addrs.iter().map(|a| format!("http://{a}")).collect();
    let stop_aggs = CancellationToken::new();
    let agg_tasks: Vec<_> = aggs
        .into_iter()
        .map(|a| {
            let t = stop_aggs.clone();
            tokio::spawn(a.run(async move { t.cancelled().await }))
        })
        .collect();

    let mut agent_cfg = AgentConfig::with_id("gw-verify");
    agent_cfg.source.mqtt.host = host.clone();
    agent_cfg.source.mqtt.port = tap.port();
    assert_eq!(
        agent_cfg.window.size_ms, 60_000,
        "the --window-ms passed below"
    );
    let agent = Agent::new(agent_cfg).unwrap();
    let agent_metrics = agent.metrics();
    let stop_agent = CancellationToken::new();
    let agent_task = {
        let t = stop_agent.clone();
        tokio::spawn(agent.run(async move { t.cancelled().await }))
    };
    // The subscriptions land before the fleet publishes.
    for client in [
        "edgewatch-agg-v0",
        "edgewatch-agg-v1",
        "edgewatch-gw-verify-src",
        "edgewatch-gw-verify-up",
    ] {
        tap.wait_subscribed(client, Duration::from_secs(10)).await;
    }

    let log = dir.path().join("readings.csv");
    let mut sim = SimulatorConfig::default();
    sim.mqtt.host = host.clone();
    sim.mqtt.port = port;
    sim.qos = 1;
    sim.devices = 6;
    sim.seed = 7;
    // Not on a window boundary: the first and last windows are partial.
    sim.start_ms = Some(1_767_225_600_000 + 17_000);
    sim.duration_ms = Some(20 * 60_000);
    sim.speedup = 1_000.0;
    sim.max_rate_per_sec = 30_000;
    sim.anomalies.rate_per_series_hour = 2.0;
    sim.anomalies.warmup_ms = 5 * 60_000;
    sim.readings_log_path = Some(log.clone());
    let report = edgewatch_simulators::run(sim, std::future::pending())
        .await
        .unwrap();
    let lines = std::fs::read_to_string(&log).unwrap().lines().count() as u64;
    assert_eq!(
        lines, report.published,
        "one log line per acknowledged publish"
    );

    wait_until(
        "the agent to process every reading",
        Duration::from_secs(120),
        || agent_metrics.readings_total.load(Relaxed) >= lines,
    )
    .await;
    // Stopping the agent closes and sends its open windows.
    stop_agent.cancel();
    agent_task.await.unwrap().unwrap();
    wait_until(
        "the aggregators to apply every window",
        Duration::from_secs(60),
        || addrs.iter().map(|a| status_readings(*a)).sum::<u64>() >= lines,
    )
    .await;

    // The library call: exact.
    let args = VerifyArgs {
        readings: log.clone(),
        aggregators: urls.clone(),
        token: None,
        token_env: Some(TOKEN_VAR.into()),
        window_ms: 60_000,
        json: false,
        tolerate_loss: 0,
    };
    let r = verify(&args).await.unwrap();
    assert!(r.ok, "{r:#?}");
    assert_eq!(r.series_checked, 24);
    assert_eq!(r.readings_expected, lines);
    assert_eq!(r.readings_found, lines);
    assert_eq!(r.readings_in_held_windows, lines);
    assert_eq!(r.not_retained, 0);
    assert_eq!(r.misaligned_windows, 0);
    assert!(r.windows_checked >= 24 * 20, "{}", r.windows_checked);

    // The binary: exit 0.
    let token_env = ["--token-env", TOKEN_VAR];
    let (code, out, err) = run_verify(&log, &urls, &token_env).await;
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.trim_end().ends_with("OK"), "{out}");

    // One extra line in a window the aggregators hold: exit 1, naming that series and window.
    let text = std::fs::read_to_string(&log).unwrap();
    let first = edgewatch_simulators::parse_line(text.lines().next().unwrap()).unwrap();
    let window_start = 1_767_225_600_000 + 5 * 60_000;
    let held = text
        .lines()
        .map(|l| edgewatch_simulators::parse_line(l).unwrap())
        .filter(|r| r.device == first.device && r.metric == first.metric)
        .filter(|r| (window_start..window_start + 60_000).contains(&r.ts_ms))
        .count();
    assert!(held > 0, "a dropout emptied the window; pick another seed");
    let mut extra = text.clone();
    edgewatch_simulators::format_line(
        &first.device,
        &first.metric,
        window_start + 500,
        42.0,
        &mut extra,
    );
    let bad_log = dir.path().join("readings-extra.csv");
    std::fs::write(&bad_log, extra).unwrap();
    let (code, out, err) = run_verify(&bad_log, &urls, &token_env).await;
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    let line = out
        .lines()
        .find(|l| l.contains(&format!("window [{window_start}, ")))
        .unwrap_or_else(|| panic!("no line names window {window_start}: {out}"));
    assert!(
        line.contains(&first.device) && line.contains(&first.metric),
        "{line}"
    );
    assert!(
        line.contains(&format!("expected {}, got {held}", held + 1)),
        "{line}"
    );
    assert!(out.trim_end().ends_with("MISMATCH"), "{out}");

    let (code, out, _) = run_verify(&bad_log, &urls, &["--token-env", TOKEN_VAR, "--json"]).await;
    assert_eq!(code, 1);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["ok"], false);
    assert_eq!(json["wrong_count"].as_array().unwrap().len(), 1);
    assert_eq!(json["wrong_count"][0]["start_ms"], window_start);

    // Errors exit 2 and name what failed: no token, a missing log.
    let (code, _, err) = run_verify(&log, &urls, &[]).await;
    assert_eq!(code, 2);
    assert!(err.contains("401") && err.contains(&urls[0]), "{err}");
    let missing = dir.path().join("nope.csv");
    let (code, _, err) = run_verify(&missing, &urls, &token_env).await;
    assert_eq!(code, 2);
    assert!(err.contains("nope.csv"), "{err}");

    stop_aggs.cancel();
    for t in agg_tasks {
        t.await.unwrap().unwrap();
    }
}
