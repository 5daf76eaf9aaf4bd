//! Observing the daemons: the agent's `/metrics` read by a real Prometheus text parser, `/readyz`
//! of the agent and the aggregator following their brokers (a separate uplink mosquitto stopped and
//! started again), `HEAD`, the bearer token, and the agent's WARN when no aggregator acknowledges
//! (the agent a separate process, so its log is at hand).

use crate::common::*;
use edgewatch_agent::{Agent, AgentConfig};
use edgewatch_aggregator::{Aggregator, AggregatorConfig};
use edgewatch_simulators::SimulatorConfig;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const START_MS: i64 = 1_767_225_600_000;

/// A simulator publishing to `port` until `stop`: event time 50× the wall clock, so 10 s windows
/// close every 200 ms.
fn background_fleet(port: u16, seed: u64, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    let mut sim = SimulatorConfig::default();
    sim.mqtt.port = port;
    sim.devices = 2;
    sim.seed = seed;
    sim.interval_ms = 1000;
    sim.start_ms = Some(START_MS);
    sim.speedup = 50.0;
    tokio::spawn(async move {
        let _ = edgewatch_simulators::run(sim, async move { stop.cancelled().await }).await;
    })
}

/// One raw HTTP/1.1 request; returns (status, headers, body bytes exactly as sent).
fn raw(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&out[..split]).to_string();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head, out[split + 4..].to_vec())
}

fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let (status, _, body) = raw(addr, "GET", path, token);
    (status, String::from_utf8(body).unwrap())
}

/// Checks the raw text: every `# TYPE` right after its family's `# HELP`, every sample after both.
fn assert_help_and_type_everywhere(text: &str) -> usize {
    let lines: Vec<&str> = text.lines().collect();
    let mut families = std::collections::HashMap::new();
    for (i, line) in lines.iter().enumerate() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let (name, kind) = (it.next().unwrap(), it.next().unwrap());
            let help = format!("# HELP {name} ");
            assert!(
                i > 0 && lines[i - 1].starts_with(&help) && lines[i - 1].len() > help.len(),
                "no HELP right before {line}"
            );
            assert!(!lines[i - 1].contains("(undocumented)"), "{}", lines[i - 1]);
            families.insert(name.to_string(), kind.to_string());
        } else if !line.starts_with('#') && !line.is_empty() {
            let name = line.split(['{', ' ']).next().unwrap();
            let known = families.iter().any(|(f, kind)| {
                name == f
                    || (kind == "histogram"
                        && [
                            format!("{f}_bucket"),
                            format!("{f}_sum"),
                            format!("{f}_count"),
                        ]
                        .iter()
                        .any(|n| n == name))
            });
            assert!(
                known,
                "sample {name} comes before its family's HELP and TYPE"
            );
        }
    }
    families.len()
}

fn aggregator_on(port: u16, id: &str) -> AggregatorConfig {
    let mut cfg = AggregatorConfig::with_id(id);
    cfg.mqtt.port = port;
    cfg.http.listen = "127.0.0.1:0".into();
    cfg
}

async fn wait_status(
    what: &str,
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    want: u16,
    within: Duration,
) -> (Duration, String) {
    let t0 = Instant::now();
    loop {
        let (status, body) = get(addr, path, token);
        if status == want {
            return (t0.elapsed(), body);
        }
        assert!(
            t0.elapsed() < within,
            "{what}: {path} still {status} after {within:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_readyz_follows_the_uplink_broker_on_agent_and_aggregator() {
    let source = Mosquitto::start_on(free_port(), "");
    let uplink_port = free_port();
    let uplink = Mosquitto::start_on(uplink_port, "");

    let agg = Aggregator::bind(aggregator_on(uplink_port, "agg-obs"))
        .await
        .unwrap();
    let agg_addr = agg.local_addr();
    let stop_agg = CancellationToken::new();
    let agg_task = {
        let t = stop_agg.clone();
        tokio::spawn(agg.run(async move { t.cancelled().await }))
    };

    let var = "EDGEWATCH_TEST_OBSERVE_TOKEN";
    std::env::set_var(var, "s3cret-agent");
    let token = Some("s3cret-agent");
    let mut cfg = AgentConfig::with_id("gw-obs");
    cfg.source.mqtt.port = source.port;
    let mut up = cfg.source.mqtt.clone();
    up.port = uplink_port;
    cfg.uplink.mqtt = Some(up);
    cfg.window.size_ms = 10_000;
    cfg.window.allowed_lateness_ms = 0;
    cfg.uplink.ack_warn_ms = 5_000;
    cfg.http.listen = Some("127.0.0.1:0".into());
    cfg.http.auth_token_env = Some(var.into());
    let agent = Agent::new(cfg).unwrap();
    let addr = agent
        .http_addr()
        .expect("the endpoint is bound by Agent::new");
    let metrics = agent.metrics();
    let stop_agent = CancellationToken::new();
    let agent_task = {
        let t = stop_agent.clone();
        tokio::spawn(agent.run(async move { t.cancelled().await }))
    };
    let stop_sim = CancellationToken::new();
    let sim = background_fleet(source.port, 7, stop_sim.clone());

    // The token: required on /metrics and /readyz, wrong is refused too; /healthz stays open.
    assert_eq!(get(addr, "/metrics", None).0, 401);
    assert_eq!(get(addr, "/readyz", None).0, 401);
    assert_eq!(get(addr, "/metrics", Some("s3cret-agenT")).0, 401);
    assert_eq!(get(addr, "/healthz", None), (200, "ok\n".to_string()));
    assert_eq!(get(addr, "/nowhere", token).0, 404);
    assert_eq!(raw(addr, "POST", "/metrics", token).0, 405);

    wait_status(
        "agent ready",
        addr,
        "/readyz",
        token,
        200,
        Duration::from_secs(30),
    )
    .await;
    wait_until("acks flowing", Duration::from_secs(60), || {
        metrics.outbox_acked_total.load(Relaxed) > 0 && metrics.ack_latency.count() > 0
    })
    .await;

    // /metrics through a real Prometheus text parser, every family documented.
    let (status, text) = get(addr, "/metrics", token);
    assert_eq!(status, 200);
    let families = assert_help_and_type_everywhere(&text);
    assert!(families >= 45, "{families} families");
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("the Prometheus parser reads /metrics");
    let names: std::collections::BTreeSet<&str> =
        scrape.samples.iter().map(|s| s.metric.as_str()).collect();
    for family in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let name = family.split(' ').next().unwrap();
        assert!(
            scrape.docs.get(name).is_some_and(|d| !d.is_empty()),
            "the parser found no HELP for {name}"
        );
    }
    for name in [
        "edgewatch_agent_build_info",
        "edgewatch_agent_readings_total",
        "edgewatch_agent_ack_latency_seconds",
        "edgewatch_agent_window_emit_delay_seconds",
        "edgewatch_agent_lane_unacked_records",
        "edgewatch_agent_lane_oldest_unacked_seconds",
        "edgewatch_agent_oldest_unacked_seconds",
        "edgewatch_agent_source_connected",
    ] {
        assert!(names.contains(name), "{name} not parsed: {names:?}");
    }
    let latency = scrape
        .samples
        .iter()
        .find(|s| s.metric == "edgewatch_agent_ack_latency_seconds")
        .expect("the ack latency histogram");
    match &latency.value {
        prometheus_parse::Value::Histogram(buckets) => {
            let total = buckets.iter().map(|b| b.count).fold(0.0, f64::max);
            assert!(total >= 1.0, "{buckets:?}");
        }
        other => panic!("ack latency is not a histogram: {other:?}"),
    }
    let build = scrape
        .samples
        .iter()
        .find(|s| s.metric == "edgewatch_agent_build_info")
        .unwrap();
    assert_eq!(build.labels.get("version"), Some(env!("CARGO_PKG_VERSION")));

    // HEAD: the GET's status and length, no body, on every endpoint.
    for path in ["/metrics", "/readyz", "/healthz"] {
        let (status, head, body) = raw(addr, "HEAD", path, token);
        assert_eq!(status, 200, "HEAD {path}: {head}");
        assert!(body.is_empty(), "HEAD {path} sent a body");
        assert!(
            head.to_ascii_lowercase().contains("content-length:"),
            "{head}"
        );
    }
    assert_eq!(raw(addr, "HEAD", "/metrics", None).0, 401);

    // The aggregator: ready, HELP on every family, HEAD.
    wait_status(
        "aggregator ready",
        agg_addr,
        "/readyz",
        None,
        200,
        Duration::from_secs(10),
    )
    .await;
    let (status, agg_text) = get(agg_addr, "/metrics", None);
    assert_eq!(status, 200);
    assert!(assert_help_and_type_everywhere(&agg_text) >= 36);
    prometheus_parse::Scrape::parse(agg_text.lines().map(|l| Ok(l.to_string())))
        .expect("the Prometheus parser reads the aggregator's /metrics");
    let (status, _, body) = raw(agg_addr, "HEAD", "/metrics", None);
    assert_eq!((status, body.len()), (200, 0));

    // The uplink broker stops: both say so within seconds, naming the condition.
    uplink.stop();
    let (took, body) = wait_status(
        "agent not ready",
        addr,
        "/readyz",
        token,
        503,
        Duration::from_secs(10),
    )
    .await;
    assert!(body.contains("uplink: not connected"), "{body}");
    assert!(!body.contains("source:"), "{body}");
    let (status, head, body_bytes) = raw(addr, "HEAD", "/readyz", token);
    assert_eq!((status, body_bytes.len()), (503, 0), "{head}");
    let (agg_took, agg_body) = wait_status(
        "aggregator not ready",
        agg_addr,
        "/readyz",
        None,
        503,
        Duration::from_secs(10),
    )
    .await;
    assert!(agg_body.contains("broker: not connected"), "{agg_body}");
    eprintln!(
        "uplink broker stopped: agent /readyz 503 after {took:?}, aggregator after {agg_took:?}"
    );

    // ... and back once it returns (reconnect backoff included).
    let uplink = Mosquitto::start_on(uplink_port, "");
    let (took, _) = wait_status(
        "agent ready again",
        addr,
        "/readyz",
        token,
        200,
        Duration::from_secs(60),
    )
    .await;
    let (agg_took, _) = wait_status(
        "aggregator ready again",
        agg_addr,
        "/readyz",
        None,
        200,
        Duration::from_secs(60),
    )
    .await;
    eprintln!(
        "uplink broker back: agent /readyz 200 after {took:?}, aggregator after {agg_took:?}"
    );

    stop_sim.cancel();
    sim.await.unwrap();
    stop_agent.cancel();
    agent_task.await.unwrap().unwrap();
    stop_agg.cancel();
    agg_task.await.unwrap().unwrap();
    drop(uplink);
}

#[test]
fn a_missing_token_variable_or_a_taken_port_stops_the_agent_at_start_naming_the_key() {
    let mut cfg = AgentConfig::with_id("gw-obs-bad");
    cfg.http.listen = Some("127.0.0.1:0".into());
    cfg.http.auth_token_env = Some("EDGEWATCH_TEST_OBSERVE_UNSET".into());
    let e = Agent::new(cfg).err().expect("refused").to_string();
    assert!(
        e.contains("http.auth_token_env") && e.contains("EDGEWATCH_TEST_OBSERVE_UNSET"),
        "{e}"
    );
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = AgentConfig::with_id("gw-obs-bad");
    cfg.http.listen = Some(taken.local_addr().unwrap().to_string());
    let e = Agent::new(cfg).err().expect("refused").to_string();
    assert!(e.contains("http.listen"), "{e}");
}

/// The agent as a process: stderr is its log.
struct AgentProcess {
    child: std::process::Child,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl AgentProcess {
    fn start(yaml: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("agent.yaml");
        std::fs::write(&conf, yaml).unwrap();
        let log = dir.path().join("agent.log");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_edgewatch"))
            .args(["agent", "--config"])
            .arg(&conf)
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self {
            child,
            log,
            _dir: dir,
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_warns_once_when_no_aggregator_acks_and_says_when_acks_resume() {
    let broker = Mosquitto::start_on(free_port(), "");
    let http_port = free_port();
    let port = broker.port;
    let start = |id: &'static str| async move {
        let agg = Aggregator::bind(aggregator_on(port, id)).await.unwrap();
        let stop = CancellationToken::new();
        let t = stop.clone();
        (
            stop,
            tokio::spawn(agg.run(async move { t.cancelled().await })),
        )
    };
    let (stop_agg, agg_task) = start("agg-warn-1").await;
    let agent = AgentProcess::start(&format!(
        "id: gw-warn\n\
         source: {{ mqtt: {{ host: 127.0.0.1, port: {port} }} }}\n\
         window: {{ size_ms: 10000, allowed_lateness_ms: 0 }}\n\
         uplink: {{ ack_warn_ms: 2000, ack_timeout_ms: 1000 }}\n\
         log: {{ status_interval_ms: 1000 }}\n\
         http: {{ listen: \"127.0.0.1:{http_port}\" }}\n",
        port = broker.port
    ));
    let addr: SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();
    let stop_sim = CancellationToken::new();
    let sim = background_fleet(broker.port, 11, stop_sim.clone());
    let wait_log = |what: &'static str, needle: &'static str, within: Duration| {
        let agent = &agent;
        async move {
            let t0 = Instant::now();
            loop {
                let logs = agent.logs();
                if logs.contains(needle) {
                    return (t0.elapsed(), logs);
                }
                assert!(
                    t0.elapsed() < within,
                    "no {what} within {within:?}:\n{logs}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    // Acks flow: the agent is ready and logs its status line.
    let t0 = Instant::now();
    loop {
        let ready = TcpStream::connect(addr).is_ok() && get(addr, "/readyz", None).0 == 200;
        if ready {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "agent never ready:\n{}",
            agent.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_log("status line", "status: ", Duration::from_secs(10)).await;
    assert!(
        !agent.logs().contains("no ack from the owner"),
        "{}",
        agent.logs()
    );

    // The only aggregator stops: within the threshold (2 s) plus a round, one WARN naming the
    // partitions and what it means; /readyz names the lanes.
    stop_agg.cancel();
    agg_task.await.unwrap().unwrap();
    let stopped = Instant::now();
    let (_, logs) = wait_log(
        "no-ack warning",
        "no ack from the owner of partition(s)",
        Duration::from_secs(10),
    )
    .await;
    let took = stopped.elapsed();
    let warning = logs
        .lines()
        .find(|l| l.contains("no ack from the owner of partition(s)"))
        .unwrap()
        .to_string();
    assert!(warning.contains("WARN"), "{warning}");
    assert!(
        warning.contains("no aggregator owns them? check the aggregators' owned: ranges"),
        "{warning}"
    );
    eprintln!("only aggregator stopped: WARN after {took:?}: {warning}");
    let (_, body) = wait_status(
        "agent not ready",
        addr,
        "/readyz",
        None,
        503,
        Duration::from_secs(10),
    )
    .await;
    assert!(
        body.contains(
            "acks: unacknowledged records older than uplink.ack_warn_ms (2000 ms) on partition "
        ),
        "{body}"
    );
    // Once per lane and episode: the status lines go on, the warning does not repeat.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let logs = agent.logs();
    let mut named = Vec::new();
    for line in logs
        .lines()
        .filter(|l| l.contains("no ack from the owner of partition(s)"))
    {
        let rest = line
            .split("no ack from the owner of partition(s) ")
            .nth(1)
            .unwrap();
        let list = rest.split(" for ").next().unwrap();
        named.extend(list.split(", ").map(str::to_string));
    }
    let mut unique = named.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        named.len(),
        unique.len(),
        "a lane warned twice in one episode:\n{logs}"
    );

    // An aggregator returns: acks resume, said once at INFO, and the agent is ready again.
    let (stop_agg, agg_task) = start("agg-warn-2").await;
    let (_, logs) = wait_log(
        "acks resumed",
        "acks resumed for partition(s)",
        Duration::from_secs(90),
    )
    .await;
    let resumed = logs.lines().find(|l| l.contains("acks resumed")).unwrap();
    assert!(resumed.contains("INFO"), "{resumed}");
    wait_status(
        "agent ready again",
        addr,
        "/readyz",
        None,
        200,
        Duration::from_secs(90),
    )
    .await;

    stop_sim.cancel();
    sim.await.unwrap();
    stop_agg.cancel();
    agg_task.await.unwrap().unwrap();
    drop(agent);
}

#[test]
fn config_check_names_the_http_and_status_keys_with_their_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.yaml");
    std::fs::write(
        &path,
        "id: gw-x\nhttp:\n  listen: localhost\n  auth_token_env: \"\"\nuplink:\n  ack_warn_ms: 0\nlog:\n  status_interval_ms: -1\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edgewatch"))
        .args(["config", "check", "--kind", "agent"])
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    // A negative interval is a type error, reported first (serde stops there) with its line.
    assert!(text.contains("log.status_interval_ms (line 8"), "{text}");
    std::fs::write(
        &path,
        "id: gw-x\nhttp:\n  listen: localhost\n  auth_token_env: \"\"\nuplink:\n  ack_warn_ms: 0\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edgewatch"))
        .args(["config", "check", "--kind", "agent"])
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    for key in [
        "http.listen (line 3, col 3): expected an address such as 127.0.0.1:9187, got \"localhost\"",
        "http.auth_token_env (line 4, col 3)",
        "uplink.ack_warn_ms (line 6, col 3): must be > 0, got 0",
    ] {
        assert!(text.contains(key), "{key} not in {text}");
    }
}
