//! Issue 13 (part 7): the aggregator's HTTP port under idle, slow, numerous and non-reading
//! clients, with real sockets: idle connections neither lock out the API nor stay forever,
//! WebSocket clients count against `max_connections`, refusals are counted and logged at a
//! bounded rate, and a feed client that stops reading is evicted while the others keep getting
//! events.

use crate::common::*;
use edgewatch_aggregator::{Aggregator, AggregatorConfig, AggregatorMetrics};
use edgewatch_models::wire::{event_id, AnomalyEvent, Batch, Sequenced, Topics};
use futures_util::StreamExt;
use rumqttc::{AsyncClient, MqttOptions, QoS};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// An aggregator running in this process, stopped by [`Running::stop`].
struct Running {
    addr: SocketAddr,
    url: String,
    metrics: Arc<AggregatorMetrics>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), edgewatch_aggregator::AggregatorError>>,
    broker: edgewatch::broker::EmbeddedBroker,
}

impl Running {
    async fn start(id: &str, http: impl FnOnce(&mut AggregatorConfig)) -> Self {
        let broker = embedded_broker();
        let mut cfg = AggregatorConfig::with_id(id);
        cfg.mqtt.port = broker.addr().port();
        cfg.http.listen = "127.0.0.1:0".into();
        http(&mut cfg);
        let agg = Aggregator::bind(cfg).await.unwrap();
        let (addr, url, metrics) = (agg.local_addr(), agg.feed_url(), agg.metrics());
        let stop = CancellationToken::new();
        let task = {
            let t = stop.clone();
            tokio::spawn(agg.run(async move { t.cancelled().await }))
        };
        Self {
            addr,
            url,
            metrics,
            stop,
            task,
            broker,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// GET over a fresh connection without blocking the runtime; (status, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let addr = addr.to_string();
    let r = edgewatch_tools::http::Get::new(&addr, path)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"));
    (r.status, r.text())
}

/// The soft limit on open files: these tests hold thousands of sockets at once.
fn require_open_files(needed: u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(u64::MAX);
    assert!(
        soft >= needed,
        "this test holds ~{needed} sockets but the open-files limit is {soft}: run `ulimit -n {needed}` first"
    );
}

/// Opens `n` TCP connections and holds them, sending nothing. In batches, each accepted by the
/// server before the next: a burst beyond the listen backlog would have the kernel drop
/// handshakes the client believes complete, and those never reach the server at all.
async fn open_idle(addr: SocketAddr, n: usize, m: &AggregatorMetrics) -> Vec<TcpStream> {
    let before = m.http_connections_total.load(Relaxed);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let batch = (n - out.len()).min(200);
        let mut pending = futures_util::stream::iter((0..batch).map(|_| TcpStream::connect(addr)))
            .buffer_unordered(batch);
        while let Some(s) = pending.next().await {
            out.push(s.expect("the kernel completes the TCP handshake"));
        }
        let opened = out.len() as u64;
        wait_until(
            "the server accepted the batch",
            Duration::from_secs(30),
            || m.http_connections_total.load(Relaxed) - before >= opened,
        )
        .await;
    }
    out
}

/// Whether the server has closed `s` (EOF or reset), without waiting.
fn closed(s: &TcpStream) -> bool {
    let mut buf = [0u8; 64];
    match s.try_read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_at_the_limit_do_not_lock_out_the_api() {
    require_open_files(4_096);
    // A long header timeout: only making room at the limit can let the API through.
    let agg = Running::start("agg-idle", |c| c.http.header_read_timeout_ms = 60_000).await;
    let m = agg.metrics.clone();
    let idle = open_idle(agg.addr, 2_000, &m).await;
    wait_until(
        "2,000 idle connections accepted, 1,024 of them held",
        Duration::from_secs(60),
        || {
            m.http_connections.load(Relaxed) == 1_024
                && m.http_idle_evicted_total.load(Relaxed) + m.http_refused_total.load(Relaxed)
                    == 976
        },
    )
    .await;

    let mut took = Vec::new();
    for _ in 0..20 {
        let t0 = Instant::now();
        let (status, body) = get(agg.addr, "/api/status").await;
        took.push(t0.elapsed());
        assert_eq!(status, 200, "{body}");
    }
    took.sort();
    eprintln!(
        "/api/status with 1,024 idle connections held (2,000 opened): median {:?}, max {:?} over {} requests",
        took[took.len() / 2],
        took[took.len() - 1],
        took.len()
    );
    let (evicted, refused) = (
        m.http_idle_evicted_total.load(Relaxed),
        m.http_refused_total.load(Relaxed),
    );
    eprintln!("past the limit: {evicted} idle connections closed to make room, {refused} newcomers refused");
    assert_eq!(
        refused, 0,
        "idle connections are closed to make room, no newcomer is refused"
    );
    assert!(m.http_connections_peak.load(Relaxed) <= 1_024);
    let closed_by_server = idle.iter().filter(|s| closed(s)).count();
    assert!(
        closed_by_server >= 976,
        "the oldest idle connections were closed: {closed_by_server}"
    );
    drop(idle);
    agg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_connections_are_closed_by_the_header_timeout() {
    require_open_files(4_096);
    let agg = Running::start("agg-slow", |c| {
        c.http.header_read_timeout_ms = 500;
        c.http.idle_timeout_ms = 5_000;
    })
    .await;
    let m = agg.metrics.clone();
    let t0 = Instant::now();
    let idle = open_idle(agg.addr, 2_000, &m).await;
    let opened = t0.elapsed();
    let t_api = Instant::now();
    let (status, _) = get(agg.addr, "/api/status").await;
    assert_eq!(
        status, 200,
        "the API answers while the idle connections are open"
    );
    eprintln!(
        "2,000 idle connections opened in {opened:?}; /api/status then answered in {:?}",
        t_api.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let open = idle.iter().filter(|s| !closed(s)).count();
        if open == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{open} idle connections still open; server: {} open, {} timed out, {} evicted, {} refused",
            m.http_connections.load(Relaxed),
            m.http_timeouts_total.load(Relaxed),
            m.http_idle_evicted_total.load(Relaxed),
            m.http_refused_total.load(Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "all 2,000 idle connections closed {:?} after the first was opened",
        t0.elapsed()
    );
    wait_until(
        "the connection gauge back to 0",
        Duration::from_secs(10),
        || m.http_connections.load(Relaxed) == 0,
    )
    .await;
    let (timeouts, evicted, refused) = (
        m.http_timeouts_total.load(Relaxed),
        m.http_idle_evicted_total.load(Relaxed),
        m.http_refused_total.load(Relaxed),
    );
    assert_eq!(
        timeouts + evicted + refused,
        2_000,
        "each idle connection timed out ({timeouts}), made room ({evicted}) or was refused ({refused})"
    );
    assert!(timeouts >= 1_000, "{timeouts}");

    // A slowloris head: one header line every 50 ms never completes, and is cut.
    let mut slow = TcpStream::connect(agg.addr).await.unwrap();
    slow.write_all(b"GET /api/status HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut cut = false;
    for i in 0..200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if slow
            .write_all(format!("X-Slow-{i}: 1\r\n").as_bytes())
            .await
            .is_err()
            || closed(&slow)
        {
            cut = true;
            break;
        }
    }
    assert!(
        cut,
        "a head trickled over 10 s was not cut by a 500 ms header timeout"
    );

    // Kept alive longer than the header timeout: the keep-alive wait has its own timeout.
    let mut ka = TcpStream::connect(agg.addr).await.unwrap();
    for round in 0..2 {
        ka.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        while !got.ends_with(b"\r\n\r\nok\n") {
            let mut buf = [0u8; 1024];
            let n = tokio::time::timeout(Duration::from_secs(10), ka.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "round {round}: closed after {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 200"), "round {round}: {got:?}");
        // Deliberate: longer than the header timeout, well inside the idle timeout, to prove the
        // kept-alive connection is not closed by the header timer.
        tokio::time::sleep(Duration::from_millis(1_000)).await;
    }
    wait_until(
        "the kept-alive connection closed by the idle timeout",
        Duration::from_secs(30),
        || closed(&ka),
    )
    .await;
    agg.stop().await;
}

/// Collects formatted log lines (the test's runtime is single-threaded, so a thread-local
/// subscriber sees the server's events).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn websocket_clients_count_against_the_connection_limit() {
    require_open_files(8_192);
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let agg = Running::start("agg-ws", |c| {
        c.http.max_connections = 1_024;
        c.http.reserved_connections = Some(24);
    })
    .await;
    let m = agg.metrics.clone();
    let t0 = Instant::now();
    let attempts = futures_util::stream::iter(
        (0..3_000).map(|_| tokio_tungstenite::connect_async(agg.url.clone())),
    )
    .buffer_unordered(256)
    .collect::<Vec<_>>()
    .await;
    let elapsed = t0.elapsed();
    let mut held = Vec::new();
    let mut failures = 0u64;
    for a in attempts {
        match a {
            Ok((ws, _)) => held.push(ws),
            Err(_) => failures += 1,
        }
    }
    let ok = held.len() as u64;
    let (refused, evicted, feed_refused, timeouts) = (
        m.http_refused_total.load(Relaxed),
        m.http_idle_evicted_total.load(Relaxed),
        m.feed_refused_total.load(Relaxed),
        m.http_timeouts_total.load(Relaxed),
    );
    eprintln!(
        "3,000 WebSocket clients in {elapsed:?}: {ok} connected, {failures} failed; server: {refused} refused at the limit, {evicted} closed waiting for a request, {feed_refused} upgrades refused (feed full), {timeouts} timed out, peak {} connections",
        m.http_connections_peak.load(Relaxed)
    );
    assert!(ok > 0);
    assert!(
        ok <= 1_000,
        "feed clients are capped at max_connections - reserved: {ok}"
    );
    assert!(m.http_connections_peak.load(Relaxed) <= 1_024);
    assert_eq!(ok + failures, 3_000);
    assert_eq!(
        refused + feed_refused + evicted + timeouts,
        failures,
        "every failed handshake was refused, made room, found the feed full or timed out, and was counted"
    );
    // The server's own view agrees, and the API still answers (the reserve).
    let (status, body) = get(agg.addr, "/api/status").await;
    assert_eq!(status, 200, "{body}");
    let s: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(s["feed_clients"], ok, "{s}");
    assert!(m.http_connections.load(Relaxed) <= 1_024);

    let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).to_string();
    let limit_lines = text
        .lines()
        .filter(|l| l.contains("connection limit reached") || l.contains("feed full"))
        .count();
    // Three kinds of line, each at most once per 5 s.
    let bound = 3 * (elapsed.as_secs() as usize / 5 + 1);
    assert!(
        limit_lines <= bound,
        "{limit_lines} limit lines in {elapsed:?} (bound {bound}):\n{text}"
    );
    eprintln!("{limit_lines} limit log lines for {failures} failed handshakes");

    drop(held);
    wait_until("every feed client gone", Duration::from_secs(30), || {
        m.http_connections.load(Relaxed) <= 1
    })
    .await;
    agg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_client_that_never_reads_is_evicted_and_the_others_keep_getting_events() {
    let agg = Running::start("agg-stall", |c| c.http.write_timeout_ms = 1_000).await;
    let m = agg.metrics.clone();
    let reader = FeedClient::connect(&agg.url).await;
    // A small receive window, and nobody reading it.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4_096).unwrap();
    let stream = socket.connect(agg.addr).await.unwrap();
    let (stalled, _) = tokio_tungstenite::client_async(agg.url.as_str(), stream)
        .await
        .expect("the non-reading client connects");
    wait_until("two feed clients", Duration::from_secs(10), || {
        m.http_connections.load(Relaxed) == 2
    })
    .await;

    let mut opts = MqttOptions::new("stall-pub", "127.0.0.1", agg.broker.addr().port());
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = AsyncClient::new(opts, 10);
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    let topics = Topics::new("edgewatch/v1");
    // The device's own partition: an event filed under another one is refused.
    let partition = edgewatch_models::partition::partition_of("pump-1", 64);
    // ~4 KB per event, so a few rounds fill the stalled client's window and the server's buffer.
    let padding = "x".repeat(4_000);
    let mut seq = 0u64;
    let mut t0 = Instant::now();
    let mut evicted_after = None;
    for round in 0..400 {
        // The first round is repeated until the aggregator, subscribing as it starts, has it
        // (events are deduplicated by id, so a repeat is not delivered twice).
        let records: Vec<_> = (0..25)
            .map(|_| {
                seq += 1;
                let ts = 1_767_225_600_000 + seq as i64;
                let detector = format!("ensemble-{padding}");
                Sequenced {
                    seq,
                    prev: None,
                    item: AnomalyEvent {
                        phase: edgewatch_models::wire::EventPhase::Onset,
                        model_version: None,
                        id: event_id("pump-1", "vibration", ts, &detector),
                        device: "pump-1".into(),
                        metric: "vibration".into(),
                        ts_ms: ts,
                        value: 1.0,
                        score: 0.99,
                        detector,
                        window_start_ms: ts,
                        agent: "gw-stall".into(),
                    },
                }
            })
            .collect();
        let batch = Batch {
            agent: "gw-stall".into(),
            partition,
            records,
            acked: 0,
            epoch: 0,
        };
        let payload = serde_json::to_vec(&batch).unwrap();
        let want = seq as usize;
        if round == 0 {
            let deadline = Instant::now() + Duration::from_secs(30);
            while reader.events.lock().unwrap().len() < want {
                assert!(Instant::now() < deadline, "no event reached the feed");
                client
                    .publish(
                        topics.anomalies(partition, "gw-stall"),
                        QoS::AtLeastOnce,
                        false,
                        payload.clone(),
                    )
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            t0 = Instant::now();
            continue;
        }
        client
            .publish(
                topics.anomalies(partition, "gw-stall"),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .unwrap();
        wait_until(
            "the reading client has every event",
            Duration::from_secs(30),
            || reader.events.lock().unwrap().len() == want,
        )
        .await;
        if m.ws_evicted_total.load(Relaxed) > 0 {
            evicted_after = Some(t0.elapsed());
            break;
        }
    }
    let evicted_after = evicted_after.expect("the non-reading client was evicted");
    eprintln!(
        "non-reading client evicted {evicted_after:?} after the first events reached the feed ({seq} events of ~4 KB, write timeout 1 s)"
    );
    assert_eq!(m.ws_evicted_total.load(Relaxed), 1);
    wait_until("its connection released", Duration::from_secs(10), || {
        m.http_connections.load(Relaxed) == 1
    })
    .await;
    let (_, body) = get(agg.addr, "/api/status").await;
    let s: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(s["feed_clients"], 1, "{s}");
    assert_eq!(
        m.feed_lagged_total.load(Relaxed),
        0,
        "the reader was never behind"
    );
    drop(stalled);
    agg.stop().await;
}
