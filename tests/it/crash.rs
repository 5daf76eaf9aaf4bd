//! Real processes killed with SIGKILL mid-stream and restarted on their state: nothing missing,
//! nothing doubled. The killed part runs as the `edgewatch` binary; the rest runs in the test.

use crate::common::*;
use crate::wait::{SubAckTap, SubscriptionLog};
use edgewatch_agent::{Agent, AgentConfig, AgentMetrics};
use edgewatch_simulators::SimulatorConfig;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// A child `edgewatch` process, SIGKILLed on drop.
pub struct Proc {
    child: Child,
    what: String,
}

impl Proc {
    /// Runs `edgewatch <args>`, logs to `log`.
    pub fn spawn(what: &str, args: &[&str], log: &Path) -> Self {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_edgewatch"))
            .args(args)
            .env("RUST_LOG", "info,rumqttd=off")
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("start {what}: {e}"));
        Self {
            child,
            what: what.into(),
        }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no drain, no flush, no goodbye.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then waits (up to 30 s) for a clean exit with status 0.
    pub fn terminate(mut self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "{} exited with {status}", self.what);
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not stop on SIGTERM",
                self.what
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes an aggregator config owning every partition, durable in `dir`.
pub fn aggregator_yaml(dir: &Path, id: &str, broker: u16, http: u16) -> PathBuf {
    let path = dir.join(format!("{id}.yaml"));
    std::fs::write(
        &path,
        format!(
            "id: {id}\nmqtt: {{ host: 127.0.0.1, port: {broker} }}\nowned: [\"0-63\"]\n\
             http: {{ listen: \"127.0.0.1:{http}\" }}\n\
             state: {{ dir: \"{}\", windows_per_series: 100000 }}\n",
            dir.join(format!("{id}-state")).display()
        ),
    )
    .unwrap();
    path
}

/// Waits until the HTTP API at `addr` answers.
pub fn wait_http(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
        assert!(Instant::now() < deadline, "nothing listening on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn fleet(port: u16, hours: u64, seed: u64) -> SimulatorConfig {
    let mut sim = SimulatorConfig::default();
    sim.mqtt.port = port;
    sim.qos = 1;
    sim.devices = 4;
    sim.seed = seed;
    sim.interval_ms = 1000;
    sim.start_ms = Some(1_767_225_600_000);
    sim.duration_ms = Some(hours * 3_600_000);
    sim.speedup = 600.0;
    sim.max_rate_per_sec = 8_000;
    sim
}

/// Cumulative readings the aggregator at `addr` holds (`/api/status`).
pub fn readings(addr: SocketAddr) -> u64 {
    get_json(addr, "/api/status")["readings"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregator_killed_mid_stream_resumes_from_its_store_exactly() {
    edgewatch::logging::init("warn");
    let dir = tempfile::tempdir().unwrap();
    let broker = embedded_broker();
    let port = broker.addr().port();
    let http = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{http}").parse().unwrap();
    let conf = aggregator_yaml(dir.path(), "agg-k", port, http);
    let log = dir.path().join("aggregator.log");
    let agg = Proc::spawn(
        "aggregator",
        &["aggregator", "--config", conf.to_str().unwrap()],
        &log,
    );
    wait_http(addr);

    // Through the tap, so the test sees the agent's subscriptions land.
    let tap = SubAckTap::start(broker.addr()).await;
    let mut cfg = AgentConfig::with_id("gw-k");
    cfg.source.mqtt.port = tap.port();
    cfg.state.dir = Some(dir.path().join("agent-state"));
    cfg.uplink.ack_timeout_ms = 3_000;
    cfg.window.size_ms = 10_000;
    cfg.window.allowed_lateness_ms = 0;
    cfg.window.idle_timeout_ms = 20_000;
    cfg.state.flush_on_exit = true;
    let agent = Agent::new(cfg).unwrap();
    let m: Arc<AgentMetrics> = agent.metrics();
    let stop = CancellationToken::new();
    let task = {
        let t = stop.clone();
        tokio::spawn(agent.run(async move { t.cancelled().await }))
    };
    for client in ["edgewatch-gw-k-src", "edgewatch-gw-k-up"] {
        tap.wait_subscribed(client, Duration::from_secs(10)).await;
    }

    let sim = tokio::spawn(edgewatch_simulators::run(
        fleet(port, 3, 5),
        std::future::pending(),
    ));
    // Kill the aggregator once it holds part of the stream, keep it down a while, restart it.
    wait_until(
        "the aggregator to apply some windows",
        Duration::from_secs(60),
        || readings(addr) > 30_000,
    )
    .await;
    agg.kill9();
    let killed_at = m.readings_total.load(Relaxed);
    // Deliberate: an outage of 2 s, during which the agent keeps buffering and resending.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let agg = Proc::spawn(
        "aggregator",
        &["aggregator", "--config", conf.to_str().unwrap()],
        &log,
    );
    wait_http(addr);
    let report = sim.await.unwrap().unwrap();
    assert!(
        killed_at < report.published,
        "the kill happened mid-stream ({killed_at} of {})",
        report.published
    );
    wait_until(
        "the agent to process every reading",
        Duration::from_secs(120),
        || m.readings_total.load(Relaxed) >= report.published,
    )
    .await;
    let drain_started = Instant::now();
    wait_until(
        "the agent's outbox to drain",
        Duration::from_secs(120),
        || m.outbox_records.load(Relaxed) == 0,
    )
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(m.readings_total.load(Relaxed), report.published);
    let expected = report.published - m.late_readings_total.load(Relaxed);
    let deadline = Instant::now() + Duration::from_secs(30);
    while readings(addr) != expected {
        if Instant::now() > deadline {
            panic!(
                "the restarted aggregator holds {} readings, expected {expected}; agent: outbox {} records, resends {}, acks {}, published {}; aggregator metrics: {}\nlog: {}",
                readings(addr),
                m.outbox_records.load(Relaxed),
                m.resends_total.load(Relaxed),
                m.acks_received_total.load(Relaxed),
                m.summaries_published_total.load(Relaxed),
                get_json(addr, "/api/status")["lane_progress"],
                std::fs::read_to_string(&log).unwrap_or_default().lines().rev().take(20).collect::<Vec<_>>().join("\n"),
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "aggregator kill: caught up {:.1} s after the stream ended; {} resends",
        drain_started.elapsed().as_secs_f64(),
        m.resends_total.load(Relaxed)
    );
    assert_eq!(m.outbox_records.load(Relaxed), 0, "everything acknowledged");
    assert!(
        m.resends_total.load(Relaxed) > 0,
        "the agent resent what the kill lost"
    );
    agg.terminate();
    drop(broker);
}

/// Writes an agent config for `ack_mode`, durable in `dir`, closing its windows on a clean stop.
fn agent_yaml(dir: &Path, broker: u16, ack_mode: &str) -> PathBuf {
    let path = dir.join("agent.yaml");
    std::fs::write(
        &path,
        format!(
            "id: gw-crash\n\
             source: {{ mqtt: {{ host: 127.0.0.1, port: {broker} }}, qos: 1 }}\n\
             uplink: {{ ack_timeout_ms: 2000 }}\n\
             window: {{ size_ms: 10000, allowed_lateness_ms: 0, idle_timeout_ms: 20000 }}\n\
             state: {{ dir: \"{}\", checkpoint_interval_ms: 500, ack_mode: {ack_mode}, flush_on_exit: true }}\n",
            dir.join("agent-state").display()
        ),
    )
    .unwrap();
    path
}

/// Runs `edgewatch verify` of `log` against the aggregators at `addrs` (10 s windows); returns
/// (exit code, stdout + stderr).
pub fn verify(log: &Path, addrs: &[SocketAddr], extra: &[&str]) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgewatch"));
    cmd.arg("verify").arg("--readings").arg(log);
    for addr in addrs {
        cmd.args(["--aggregator", &format!("http://{addr}")]);
    }
    let out = cmd
        .args(["--window-ms", "10000"])
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Waits until the aggregator's readings stop changing for `quiet` (the agent is a separate
/// process, so its own counters are not at hand).
pub async fn wait_settled(addr: SocketAddr, quiet: Duration, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    let (mut last, mut since) = (readings(addr), Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = readings(addr);
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() >= quiet {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "readings never settled (at {now})"
        );
    }
}

/// Simulator → mosquitto → agent process (killed with SIGKILL mid-stream, restarted on its state)
/// → durable aggregator; then `edgewatch verify` against the simulator's readings log.
async fn kill_the_agent_mid_stream(
    ack_mode: &str,
    verify_args: &[&str],
) -> (i32, String, String, i64) {
    edgewatch::logging::init("warn");
    let dir = tempfile::tempdir().unwrap();
    // Unlimited in-flight and queued messages: after_checkpoint holds up to one checkpoint
    // interval of readings unacknowledged, and the broker queues readings during the restart.
    let subscriptions = SubscriptionLog::new();
    let mosq = Mosquitto::start_on(
        free_port(),
        &format!("persistence false\n{}", subscriptions.settings()),
    );
    let http = free_port();
    let mut agg_cfg = edgewatch_aggregator::AggregatorConfig::with_id("agg-c");
    agg_cfg.mqtt.port = mosq.port;
    agg_cfg.http.listen = format!("127.0.0.1:{http}");
    agg_cfg.state.dir = Some(dir.path().join("agg-state"));
    agg_cfg.state.windows_per_series = 100_000;
    let agg = edgewatch_aggregator::Aggregator::bind(agg_cfg)
        .await
        .unwrap();
    let addr = agg.local_addr();
    let stop_agg = CancellationToken::new();
    let agg_task = {
        let t = stop_agg.clone();
        tokio::spawn(agg.run(async move { t.cancelled().await }))
    };

    let conf = agent_yaml(dir.path(), mosq.port, ack_mode);
    let log = dir.path().join("agent.log");
    let args = ["agent", "--config", conf.to_str().unwrap()];
    let agent = Proc::spawn("agent", &args, &log);
    // Its persistent session must exist before the fleet publishes, or the broker drops readings.
    for client in ["edgewatch-agg-c", "edgewatch-gw-crash-src"] {
        subscriptions
            .wait_subscribed(client, Duration::from_secs(20))
            .await;
    }

    let readings_log = dir.path().join("readings.csv");
    let mut sim = fleet(mosq.port, 2, 9);
    sim.readings_log_path = Some(readings_log.clone());
    let sim = tokio::spawn(edgewatch_simulators::run(sim, std::future::pending()));
    wait_until(
        "some windows at the aggregator",
        Duration::from_secs(60),
        || readings(addr) > 20_000,
    )
    .await;
    agent.kill9();
    // Deliberate: the agent stays down for 1 s while the broker queues its readings.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let agent = Proc::spawn("agent", &args, &log);
    let report = sim.await.unwrap().unwrap();
    assert!(readings(addr) < report.published, "killed mid-stream");
    // Everything the broker holds for the agent is processed, then a clean stop sends the rest.
    wait_settled(addr, Duration::from_secs(3), Duration::from_secs(120)).await;
    agent.terminate();
    let held = wait_settled(addr, Duration::from_secs(2), Duration::from_secs(60)).await;
    let (code, out) = verify(&readings_log, &[addr], verify_args);
    stop_agg.cancel();
    agg_task.await.unwrap().unwrap();
    let agent_log = std::fs::read_to_string(&log).unwrap();
    eprintln!(
        "{ack_mode}: {} published, {held} held\n{out}",
        report.published
    );
    // Negative would mean readings counted twice.
    (code, out, agent_log, report.published as i64 - held as i64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_stream_with_after_checkpoint_loses_nothing() {
    let (code, out, log, missing) = kill_the_agent_mid_stream("after_checkpoint", &[]).await;
    assert!(log.contains("resumed from the last checkpoint"), "{log}");
    assert_eq!(missing, 0, "every reading held once:\n{out}");
    assert_eq!(code, 0, "verify is exact, with no loss tolerated:\n{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_stream_with_on_receipt_loses_at_most_one_checkpoint_interval() {
    let (code, out, log, missing) =
        kill_the_agent_mid_stream("on_receipt", &["--tolerate-loss", "4000"]).await;
    assert!(log.contains("resumed from the last checkpoint"), "{log}");
    // 8,000 readings/s for one 500 ms checkpoint interval.
    assert!(
        (0..=4_000).contains(&missing),
        "lost {missing} readings, more than one checkpoint interval:\n{out}"
    );
    assert_eq!(
        code, 0,
        "nothing doubled, loss within the tolerance:\n{out}"
    );
    assert!(
        log.contains("estimated_lost_readings"),
        "the loss estimate is reported:\n{log}"
    );
}
