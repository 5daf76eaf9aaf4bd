//! Helpers shared by the integration tests: real brokers, HTTP GETs, feed clients, waiting.

use edgewatch::broker::{BrokerConfig, EmbeddedBroker};
use edgewatch_models::wire::AnomalyEvent;
use futures_util::StreamExt;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// An embedded rumqttd on a free loopback port.
pub fn embedded_broker() -> EmbeddedBroker {
    EmbeddedBroker::start(&BrokerConfig {
        listen: "127.0.0.1:0".into(),
        ..BrokerConfig::default()
    })
    .expect("embedded broker starts")
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `mosquitto` broker started for one test, stopped on drop.
pub struct Mosquitto {
    child: Child,
    /// Its port.
    pub port: u16,
    _dir: tempfile::TempDir,
}

/// Path of a required external program, or a panic telling how to install it (tests never skip).
pub fn require(program: &str) -> PathBuf {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
    {
        let p = Path::new(dir).join(program);
        if p.is_file() {
            return p;
        }
    }
    panic!("{program} is not installed: run scripts/test (it apt-installs mosquitto, mosquitto-clients, nats-server and chromium)");
}

impl Mosquitto {
    /// Starts mosquitto on `port` with anonymous access, unlimited queues and in-flight windows,
    /// and `extra` config lines.
    pub fn start_on(port: u16, extra: &str) -> Self {
        Self::start_with(
            tempfile::tempdir().unwrap(),
            port,
            &format!(
                "allow_anonymous true\nmax_queued_messages 0\nmax_inflight_messages 0\n{extra}"
            ),
        )
    }

    /// Starts mosquitto with `listener PORT 127.0.0.1` followed by `settings`, its config file in
    /// `dir` (which holds whatever else the settings name, and lives as long as the broker).
    pub fn start_with(dir: tempfile::TempDir, port: u16, settings: &str) -> Self {
        let bin = require("mosquitto");
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(&conf, format!("listener {port} 127.0.0.1\n{settings}")).unwrap();
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto starts");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            port,
            _dir: dir,
        }
    }
}

impl Mosquitto {
    /// A clean stop: SIGTERM (mosquitto then writes its persistence store), and waits up to 10 s
    /// for it to exit. The port is free once this returns.
    pub fn stop(mut self) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success(), "kill -TERM {pid} failed");
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "mosquitto (pid {pid}) did not stop within 10 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET `path` from `addr` through the tools' HTTP client; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let addr = addr.to_string();
    let r = edgewatch_tools::http::Get::new(&addr, path)
        .send_blocking()
        .unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"));
    let body = String::from_utf8(r.body).expect("HTTP body is UTF-8");
    (r.status, body)
}

/// GET JSON.
pub fn get_json(addr: SocketAddr, path: &str) -> serde_json::Value {
    let (status, body) = http_get(addr, path);
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// A feed client collecting every event it receives, in the background.
pub struct FeedClient {
    /// Events received so far.
    pub events: Arc<Mutex<Vec<AnomalyEvent>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FeedClient {
    /// Connects to `url` and starts collecting.
    pub async fn connect(url: &str) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("feed connects");
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let task = tokio::spawn(async move {
            let (_w, mut r) = ws.split();
            while let Some(Ok(m)) = r.next().await {
                if let Message::Text(t) = m {
                    let e: AnomalyEvent =
                        serde_json::from_str(&t).expect("feed message is an AnomalyEvent");
                    sink.lock().unwrap().push(e);
                }
            }
        });
        Self { events, task }
    }

    /// A snapshot of the events received.
    pub fn snapshot(&self) -> Vec<AnomalyEvent> {
        self.events.lock().unwrap().clone()
    }
}

impl Drop for FeedClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Polls `cond` every 50 ms until true, panicking with `what` after `timeout`.
pub async fn wait_until(what: &str, timeout: Duration, cond: impl FnMut() -> bool) {
    wait_until_or(what, timeout, cond, String::new).await;
}

/// [`wait_until`], with `context()` (logs, the last state seen) in the panic message.
pub async fn wait_until_or(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> bool,
    context: impl FnOnce() -> String,
) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() >= deadline {
            panic!("timed out waiting for {what}\n{}", context());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes `records` (window summaries of lane `partition`) as agent `agent`'s batch, at QoS 1
/// under the default prefix, as the agent's uplink would.
pub async fn publish_summaries(
    client: &rumqttc::AsyncClient,
    agent: &str,
    partition: u32,
    records: Vec<edgewatch_models::wire::Sequenced<edgewatch_models::wire::WindowSummary>>,
) {
    let batch = edgewatch_models::wire::Batch {
        agent: agent.into(),
        partition,
        records,
        acked: 0,
        epoch: 0,
    };
    client
        .publish(
            edgewatch_models::wire::Topics::new("edgewatch/v1").summaries(partition, agent),
            rumqttc::QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&batch).unwrap(),
        )
        .await
        .unwrap();
}
