//! End to end through a real broker: the simulator publishes to an embedded rumqttd, a rumqttc
//! subscriber receives, and everything published must arrive, parse and match the pure generator.
//!
//! Each test starts its own broker on a reserved loopback port (rumqttd has no shutdown API; its
//! threads end with the test process). Wall-clock rates are printed, never asserted.

use edgewatch_simulators::{run, AnomalyKind, Fleet, GroundTruth, SimReading, SimulatorConfig};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

const START: i64 = 1_764_028_800_000;

/// Starts rumqttd on a free loopback port and returns the port once it accepts connections.
fn start_broker() -> u16 {
    // rumqttd cannot report the port it bound, and returns Ok for a port in use: reserve one.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let listen: SocketAddr = ([127, 0, 0, 1], port).into();
    let server = ServerSettings {
        name: "v4-test".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 1 << 20,
            max_inflight_count: 500,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let router = RouterConfig {
        max_connections: 16,
        max_outgoing_packet_count: 500,
        // 16 MiB per subscription: the whole test's traffic fits, so a lagging subscriber in a
        // debug build cannot make the broker skip messages.
        max_segment_size: 2 << 20,
        max_segment_count: 8,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    };
    let config = Config {
        id: 0,
        router,
        v4: Some(HashMap::from([("v4-test".to_string(), server)])),
        ..Default::default()
    };
    std::thread::spawn(move || {
        let mut broker = Broker::new(config);
        if let Err(e) = broker.start() {
            eprintln!("rumqttd stopped: {e}");
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(listen).is_err() {
        assert!(
            Instant::now() < deadline,
            "rumqttd did not start on {listen}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    port
}

type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// Subscribes to `sensors/#` and collects every publish; returns once the subscription is acked.
async fn subscribe(port: u16) -> Received {
    let mut o = MqttOptions::new("test-subscriber", "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(1 << 20, 1 << 20)
        .set_request_channel_capacity(100);
    let (client, mut eventloop) = AsyncClient::new(o, 100);
    let received: Received = Arc::default();
    let sink = received.clone();
    let (subscribed_tx, subscribed_rx) = oneshot::channel();
    tokio::spawn(async move {
        let _client = client.clone();
        let mut subscribed_tx = Some(subscribed_tx);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    client
                        .subscribe("sensors/#", QoS::AtLeastOnce)
                        .await
                        .unwrap();
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = subscribed_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    sink.lock().unwrap().push((p.topic, p.payload.to_vec()));
                }
                Ok(_) => {}
                Err(e) => panic!("subscriber connection failed: {e}"),
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), subscribed_rx)
        .await
        .expect("subscription acked in time")
        .unwrap();
    received
}

async fn wait_for(received: &Received, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while received.lock().unwrap().len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn config(
    port: u16,
    qos: u8,
    devices: usize,
    duration_ms: u64,
    truth: std::path::PathBuf,
) -> SimulatorConfig {
    let mut cfg = SimulatorConfig {
        qos,
        devices,
        start_ms: Some(START),
        duration_ms: Some(duration_ms),
        speedup: 1000.0,
        seed: 1234,
        ground_truth_path: Some(truth),
        ..Default::default()
    };
    cfg.mqtt.port = port;
    cfg.mqtt.client_id = Some(format!("sim-qos{qos}"));
    let a = &mut cfg.anomalies;
    a.rate_per_series_hour = 120.0;
    a.warmup_ms = 10_000;
    a.min_gap_ms = 5_000;
    a.level_shift_duration_ms = 20_000;
    a.burst_duration_ms = 10_000;
    a.stuck_duration_ms = 10_000;
    a.dropout_duration_ms = 5_000;
    cfg
}

/// What the pure generator produces for `cfg`, keyed like the topics.
fn expected(cfg: &SimulatorConfig) -> (Vec<SimReading>, Vec<GroundTruth>) {
    let mut fleet = Fleet::new(cfg, START).unwrap();
    let mut out = Vec::new();
    let end = START + cfg.duration_ms.unwrap() as i64;
    while fleet.now_ms() < end {
        fleet.step(&mut out);
    }
    let mut labels = fleet.ground_truth().to_vec();
    labels.extend(fleet.in_progress());
    (out, labels)
}

/// Runs one simulation through the broker and checks everything that came out of it.
async fn simulate_and_check(qos: u8, devices: usize, duration_ms: u64) {
    simulate_and_check_at(qos, devices, duration_ms, None).await
}

async fn simulate_and_check_at(qos: u8, devices: usize, duration_ms: u64, max_rate: Option<u64>) {
    let port = start_broker();
    let received = subscribe(port).await;
    let dir = tempfile::tempdir().unwrap();
    let truth_path = dir.path().join("truth.jsonl");
    let mut cfg = config(port, qos, devices, duration_ms, truth_path.clone());
    if let Some(rate) = max_rate {
        cfg.max_rate_per_sec = rate;
        cfg.speedup = 1e6;
    }

    let t0 = Instant::now();
    let report = run(cfg.clone(), std::future::pending()).await.unwrap();
    let publish_secs = t0.elapsed().as_secs_f64();
    wait_for(&received, report.published as usize).await;
    let received = received.lock().unwrap().clone();
    println!(
        "qos {qos}: published {} readings in {publish_secs:.2}s = {:.0} readings/s (wall); \
         {} received; {} labels",
        report.published,
        report.published as f64 / publish_secs,
        received.len(),
        report.labels.len()
    );

    // Everything published arrived, once.
    assert_eq!(received.len() as u64, report.published);
    let (readings, labels) = expected(&cfg);
    assert_eq!(report.published, readings.len() as u64);
    assert_eq!(report.steps, duration_ms / cfg.interval_ms);
    assert_eq!(report.first_ts_ms, START);
    assert_eq!(
        report.last_ts_ms,
        START + duration_ms as i64 - cfg.interval_ms as i64
    );

    // Payloads parse and equal what the pure generator makes, whatever the pacing.
    let mut want: HashMap<String, Vec<(i64, f64)>> = HashMap::new();
    for r in &readings {
        want.entry(format!("sensors/{}/{}", r.device, r.metric))
            .or_default()
            .push((r.ts_ms, r.value));
    }
    let mut got: HashMap<String, Vec<(i64, f64)>> = HashMap::new();
    for (topic, body) in &received {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_else(|e| {
            panic!(
                "{topic}: bad payload {:?}: {e}",
                String::from_utf8_lossy(body)
            )
        });
        let obj = v.as_object().unwrap();
        assert_eq!(obj.len(), 2, "{v}");
        got.entry(topic.clone())
            .or_default()
            .push((obj["ts"].as_i64().unwrap(), obj["value"].as_f64().unwrap()));
    }
    assert_eq!(got.len(), devices * cfg.metrics.len());
    for (topic, w) in &want {
        let g = &got[topic];
        assert_eq!(g.len(), w.len(), "{topic}");
        for ((gt, gv), (wt, wv)) in g.iter().zip(w) {
            assert_eq!(gt, wt, "{topic}: order or timestamps differ");
            assert!(
                (gv - wv).abs() <= 1e-12 * wv.abs().max(1.0),
                "{topic} @ {gt}: {gv} != {wv}"
            );
        }
    }

    // The ground-truth file holds exactly the report's labels, which match the generator's.
    let text = std::fs::read_to_string(&truth_path).unwrap();
    let from_file: Vec<GroundTruth> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(from_file, report.labels);
    assert_eq!(report.labels, labels);
    assert!(report.labels.iter().any(|g| g.kind == AnomalyKind::Spike));
    assert!(report.labels.iter().any(|g| g.kind == AnomalyKind::Dropout));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_qos0_reading_arrives_and_matches_the_generator() {
    // 50 devices × 4 metrics × 300 steps = 60 000 readings minus dropouts, asked at 200 000/s so
    // the 50 000/s default cap paces it.
    simulate_and_check(0, 50, 300_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_qos1_reading_is_acknowledged_and_arrives() {
    simulate_and_check(1, 10, 300_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_an_endless_run_and_keeps_the_labels() {
    let port = start_broker();
    let received = subscribe(port).await;
    let dir = tempfile::tempdir().unwrap();
    let truth_path = dir.path().join("truth.jsonl");
    let mut cfg = config(port, 0, 5, 1, truth_path.clone());
    cfg.duration_ms = None;
    cfg.mqtt.client_id = Some("sim-endless".into());
    cfg.speedup = 100.0;
    let report = run(cfg, tokio::time::sleep(Duration::from_millis(1500)))
        .await
        .unwrap();
    assert!(report.steps > 10, "{report:?}");
    wait_for(&received, report.published as usize).await;
    assert_eq!(received.lock().unwrap().len() as u64, report.published);
    let lines = std::fs::read_to_string(&truth_path)
        .unwrap()
        .lines()
        .count();
    assert_eq!(lines, report.labels.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_does_not_hold_up_shutdown() {
    // A reserved then released port: nothing listens there.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(port, 1, 2, 1, dir.path().join("truth.jsonl"));
    cfg.duration_ms = None;
    let t0 = Instant::now();
    let report = tokio::time::timeout(
        Duration::from_secs(20),
        run(cfg, tokio::time::sleep(Duration::from_millis(500))),
    )
    .await
    .expect("run returns after shutdown even without a broker")
    .unwrap();
    println!(
        "no broker: returned after {:?}, {} steps",
        t0.elapsed(),
        report.steps
    );
    assert!(report.steps > 0);
    assert_eq!(report.published, 0, "nothing reached a broker");
}

/// Throughput without the rate cap; prints readings/s (`cargo test --release -- --ignored`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, not a check: run on an idle machine"]
async fn uncapped_publish_rate() {
    // 100 devices × 4 metrics × 300 steps ≈ 118 000 readings.
    simulate_and_check_at(0, 100, 300_000, Some(10_000_000)).await;
    simulate_and_check_at(1, 100, 300_000, Some(10_000_000)).await;
}
