//! The shared poll loop against a real `mosquitto` (started by the test on a free port): it
//! resubscribes after the broker restarts, and fails over to the link's alternates.

use edgewatch_link::{LinkCounters, LinkEvent, MqttLink};
use rumqttc::{AsyncClient, QoS};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A free loopback port (bound then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn mosquitto_bin() -> PathBuf {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
    {
        let p = Path::new(dir).join("mosquitto");
        if p.is_file() {
            return p;
        }
    }
    panic!("mosquitto is not installed: apt-get install -y mosquitto");
}

/// A `mosquitto` on `port` with anonymous access and no persistence, killed on drop.
struct Mosquitto {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    fn start(port: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
        .unwrap();
        let child = Command::new(mosquitto_bin())
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
        Self { child, _dir: dir }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Default)]
struct Counters {
    errors: AtomicU64,
}

impl LinkCounters for Counters {
    fn connection_error(&self) {
        self.errors.fetch_add(1, Relaxed);
    }
    fn oversized_packet(&self) {}
}

/// A running poll loop subscribing to `t/#` on every connection; what it sees comes out of
/// `events` as `"connected"`, `"disconnected"` or the payload of a message.
struct Link {
    client: AsyncClient,
    events: mpsc::Receiver<String>,
    counters: Arc<Counters>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Link {
    fn start(link: &MqttLink) -> Self {
        let opts = edgewatch_link::options(link, format!("poll-test-{}", free_port())).unwrap();
        let (client, eventloop) = edgewatch_link::client(&opts, link.request_channel);
        // Bounded: the test reads every event; a full queue would only slow the loop down.
        let (tx, events) = mpsc::channel(1024);
        let counters = Arc::new(Counters::default());
        let cancel = CancellationToken::new();
        let task = {
            let (client, counters, cancel) = (client.clone(), counters.clone(), cancel.clone());
            tokio::spawn(async move {
                edgewatch_link::poll_loop(eventloop, opts, "test", &counters, cancel, |ev| {
                    let client = client.clone();
                    let tx = tx.clone();
                    async move {
                        let note = match ev {
                            LinkEvent::Connected => {
                                client.try_subscribe("t/#", QoS::AtLeastOnce).unwrap();
                                "connected".to_string()
                            }
                            LinkEvent::Disconnected => "disconnected".to_string(),
                            LinkEvent::Publish(p) => String::from_utf8_lossy(&p.payload).into(),
                            LinkEvent::PubAck => return,
                        };
                        let _ = tx.send(note).await;
                    }
                })
                .await;
            })
        };
        Self {
            client,
            events,
            counters,
            cancel,
            task,
        }
    }

    /// Waits (at most 20 s) for `want` to come out of the loop.
    async fn wait_for(&mut self, want: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let got = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("no {want:?} within 20 s"))
                .expect("poll loop running");
            if got == want {
                return;
            }
        }
    }

    /// Publishes `payload` on `t/x` until the loop hands it back (the subscription is made
    /// asynchronously after the ConnAck), at most 20 s.
    async fn round_trip(&mut self, payload: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{payload:?} never came back"
            );
            let _ = self.client.try_publish(
                "t/x",
                QoS::AtLeastOnce,
                false,
                payload.as_bytes().to_vec(),
            );
            let retry = tokio::time::Instant::now() + Duration::from_millis(200);
            while let Ok(Some(got)) = tokio::time::timeout_at(retry, self.events.recv()).await {
                if got == payload {
                    return;
                }
            }
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubscribes_after_the_broker_restarts() {
    let port = free_port();
    let broker = Mosquitto::start(port);
    let mut link = Link::start(&MqttLink {
        port,
        ..MqttLink::default()
    });
    link.wait_for("connected").await;
    link.round_trip("before").await;

    // The broker forgets every subscription (no persistence): messages only come back if the
    // loop subscribed again on the new connection.
    drop(broker);
    link.wait_for("disconnected").await;
    let _broker = Mosquitto::start(port);
    link.wait_for("connected").await;
    link.round_trip("after").await;
    assert!(link.counters.errors.load(Relaxed) >= 1);
    link.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_to_the_alternates_and_back() {
    // Nothing listens on the primary at first: the loop moves on to the alternate.
    let (primary, alternate) = (free_port(), free_port());
    let second = Mosquitto::start(alternate);
    let mut link = Link::start(&MqttLink {
        port: primary,
        alternates: vec![format!("127.0.0.1:{alternate}")],
        ..MqttLink::default()
    });
    link.wait_for("connected").await;
    assert!(link.counters.errors.load(Relaxed) >= 1);
    link.round_trip("on the alternate").await;

    // The alternate goes away and the primary comes up: the loop goes round to the primary.
    let _first = Mosquitto::start(primary);
    drop(second);
    link.wait_for("disconnected").await;
    link.wait_for("connected").await;
    link.round_trip("on the primary").await;
    link.stop().await;
}
