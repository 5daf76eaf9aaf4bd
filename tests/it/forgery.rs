//! The delivery chain against a broker without ACLs, where anyone may publish on any topic, and
//! across restarts of an agent without `state.dir`: lane epochs keep a restarted outbox's new
//! records apart from the old lane's, forged acks delete nothing, and forged or absurd summaries
//! are refused and counted while the real lane keeps being acknowledged and the totals stay exact.

use crate::common::*;
use crate::wait::SubAckTap;
use edgewatch_agent::telemetry::AckRefusal;
use edgewatch_agent::{Agent, AgentConfig, AgentError, AgentMetrics};
use edgewatch_aggregator::{Aggregator, AggregatorConfig};
use edgewatch_models::partition::partition_of;
use edgewatch_models::wire::{Ack, AckBatch, Batch, Sequenced, Topics, WindowSummary};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// 2026-01-01T00:00:00Z: event time of the first reading.
const T0_MS: i64 = 1_767_225_600_000;
const WINDOW_MS: i64 = 60_000;
/// Readings per device and window (10 s and 40 s into it).
const PER_WINDOW: u64 = 2;

struct RunningAgent {
    metrics: Arc<AgentMetrics>,
    stop: CancellationToken,
    task: JoinHandle<Result<(), AgentError>>,
    /// The agent's way to the broker, showing when its subscriptions land.
    _tap: SubAckTap,
}

impl RunningAgent {
    async fn start(
        id: &str,
        port: u16,
        dir: Option<PathBuf>,
        tune: impl FnOnce(&mut AgentConfig),
    ) -> Self {
        let tap = SubAckTap::start(SocketAddr::from(([127, 0, 0, 1], port))).await;
        let mut cfg = AgentConfig::with_id(id);
        cfg.source.mqtt.port = tap.port();
        cfg.state.dir = dir;
        // With a state dir, close and send every open window at the stop, as without one.
        cfg.state.flush_on_exit = true;
        tune(&mut cfg);
        let agent = Agent::new(cfg).unwrap();
        let metrics = agent.metrics();
        let stop = CancellationToken::new();
        let t = stop.clone();
        let task = tokio::spawn(agent.run(async move { t.cancelled().await }));
        // Its subscriptions land before readings are published.
        for role in ["src", "up"] {
            tap.wait_subscribed(&format!("edgewatch-{id}-{role}"), Duration::from_secs(10))
                .await;
        }
        Self {
            metrics,
            stop,
            task,
            _tap: tap,
        }
    }

    /// A clean stop: open windows are closed and sent, acks are waited for.
    async fn stop(self) -> Arc<AgentMetrics> {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
        self.metrics
    }
}

struct RunningAggregator {
    addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<()>,
    /// The aggregator's way to the broker, showing when its subscriptions land.
    _tap: SubAckTap,
}

impl RunningAggregator {
    async fn start(port: u16, dir: PathBuf) -> Self {
        let tap = SubAckTap::start(SocketAddr::from(([127, 0, 0, 1], port))).await;
        let mut cfg = AggregatorConfig::with_id("agg-forgery");
        cfg.mqtt.port = tap.port();
        cfg.http.listen = "127.0.0.1:0".into();
        cfg.state.dir = Some(dir);
        cfg.state.windows_per_series = 100_000;
        let agg = Aggregator::bind(cfg).await.unwrap();
        let addr = agg.local_addr();
        let stop = CancellationToken::new();
        let t = stop.clone();
        let task =
            tokio::spawn(async move { agg.run(async move { t.cancelled().await }).await.unwrap() });
        tap.wait_subscribed("edgewatch-agg-forgery", Duration::from_secs(10))
            .await;
        Self {
            addr,
            stop,
            task,
            _tap: tap,
        }
    }

    fn status(&self) -> serde_json::Value {
        get_json(self.addr, "/api/status")
    }

    fn readings(&self) -> u64 {
        self.status()["readings"].as_u64().unwrap()
    }

    /// The value of one series of `/metrics`, e.g. `name{aggregator="x",reason="y"}`.
    fn metric(&self, series: &str) -> u64 {
        let (_, text) = http_get(self.addr, "/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{series} not in /metrics:\n{text}"))
    }

    fn refused(&self, reason: &str) -> u64 {
        self.metric(&format!(
            "edgewatch_aggregator_records_refused_total{{aggregator=\"agg-forgery\",reason=\"{reason}\"}}"
        ))
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }
}

/// An MQTT client of its own (a sensor, or someone with no business on the uplink topics).
async fn client(port: u16, id: &str) -> (AsyncClient, Arc<Mutex<Vec<rumqttc::Publish>>>) {
    let (client, mut el) = AsyncClient::new(MqttOptions::new(id, "127.0.0.1", port), 100);
    let got: Arc<Mutex<Vec<rumqttc::Publish>>> = Arc::default();
    let sink = got.clone();
    tokio::spawn(async move {
        while let Ok(ev) = el.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = ev {
                sink.lock().unwrap().push(p);
            }
        }
    });
    (client, got)
}

fn devices(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("boiler-{i}")).collect()
}

/// Publishes `PER_WINDOW` readings per device for windows `first..first + windows`; returns how many.
async fn publish_readings(port: u16, devices: &[String], first: i64, windows: i64) -> u64 {
    let (sensor, _) = client(port, &format!("sensors-{first}")).await;
    let mut n = 0;
    for w in first..first + windows {
        for (i, d) in devices.iter().enumerate() {
            for offset in [10_000, 40_000] {
                let ts = T0_MS + w * WINDOW_MS + offset;
                let value = 20.0 + ((w + i as i64) % 3) as f64 * 0.25;
                sensor
                    .publish(
                        format!("sensors/{d}/temperature"),
                        QoS::AtLeastOnce,
                        false,
                        format!(r#"{{"ts":{ts},"value":{value}}}"#),
                    )
                    .await
                    .unwrap();
                n += 1;
            }
        }
    }
    n
}

/// What a bystander subscribed to an agent's summaries sees: per partition, the lane epoch, the
/// highest seq and the records.
fn sniffed(
    got: &Mutex<Vec<rumqttc::Publish>>,
) -> BTreeMap<u32, (u64, u64, Vec<Sequenced<WindowSummary>>)> {
    let mut lanes: BTreeMap<u32, (u64, u64, Vec<Sequenced<WindowSummary>>)> = BTreeMap::new();
    for p in got.lock().unwrap().iter() {
        let Ok(b) = serde_json::from_slice::<Batch<WindowSummary>>(&p.payload) else {
            continue;
        };
        let lane = lanes.entry(b.partition).or_insert((b.epoch, 0, Vec::new()));
        lane.0 = b.epoch;
        for r in b.records {
            lane.1 = lane.1.max(r.seq);
            lane.2.push(r);
        }
    }
    lanes
}

async fn publish_json<T: serde::Serialize>(c: &AsyncClient, topic: String, body: &T) {
    c.publish(
        topic,
        QoS::AtLeastOnce,
        false,
        serde_json::to_vec(body).unwrap(),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restarted_without_state_dir_starts_a_new_lane_and_nothing_is_taken_for_a_duplicate(
) {
    let broker = embedded_broker();
    let port = broker.addr().port();
    let dir = tempfile::tempdir().unwrap();
    let agg = RunningAggregator::start(port, dir.path().join("agg")).await;
    let devices = devices(50);
    let windows = 30;
    let (watcher, seen) = client(port, "watcher").await;
    let topics = Topics::new("edgewatch/v1");
    watcher
        .subscribe(
            format!("{}/summaries/+/gw-nostate", topics.prefix()),
            QoS::AtLeastOnce,
        )
        .await
        .unwrap();

    let mut readings = 0;
    let mut epochs = Vec::new();
    for run in 0..2i64 {
        let agent = RunningAgent::start("gw-nostate", port, None, |_| {}).await;
        let published = publish_readings(port, &devices, run * windows, windows).await;
        readings += published;
        let m = agent.metrics.clone();
        wait_until(
            "the agent to process every reading",
            Duration::from_secs(60),
            || m.readings_total.load(Relaxed) == published,
        )
        .await;
        let m = agent.stop().await;
        assert_eq!(
            m.windows_total.load(Relaxed),
            devices.len() as u64 * windows as u64
        );
        assert_eq!(
            m.outbox_records.load(Relaxed),
            0,
            "run {run}: everything acknowledged"
        );
        assert_eq!(AckRefusal::Unsent.count(&m), 0);
        wait_until("every window applied", Duration::from_secs(30), || {
            agg.readings() == readings
        })
        .await;
        // The epochs on the wire so far, in order of first appearance.
        for p in seen.lock().unwrap().iter() {
            let b: Batch<WindowSummary> = serde_json::from_slice(&p.payload).unwrap();
            if !epochs.contains(&b.epoch) {
                epochs.push(b.epoch);
            }
        }
        assert_eq!(
            epochs.len(),
            run as usize + 1,
            "one epoch per outbox: {epochs:?}"
        );
    }
    assert_ne!(epochs[0], epochs[1], "a new outbox, a new epoch");
    assert!(!epochs.contains(&0));

    // Both runs' seqs started at 1; the second run's records were all new, none a "duplicate".
    let status = agg.status();
    let all = 2 * devices.len() as u64 * windows as u64;
    assert_eq!(status["readings"], all * PER_WINDOW);
    assert_eq!(status["summaries_applied"], all, "{status}");
    assert_eq!(status["summaries_duplicate"], 0, "{status}");
    let lanes = status["lane_progress"].as_array().unwrap();
    for epoch in &epochs {
        assert!(
            lanes
                .iter()
                .any(|l| l["epoch"] == *epoch && l["applied_seq"].as_u64() > Some(0)),
            "a lane of epoch {epoch}: {lanes:?}"
        );
    }
    eprintln!(
        "restart without state.dir: {} of {all} windows, {} duplicates, epochs {epochs:?}",
        status["summaries_applied"], status["summaries_duplicate"]
    );
    agg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_acks_on_a_broker_without_acls_delete_nothing() {
    let broker = embedded_broker();
    let port = broker.addr().port();
    let dir = tempfile::tempdir().unwrap();
    let topics = Topics::new("edgewatch/v1");
    let agent_id = "gw-forged-acks";
    // No aggregator yet: nothing is acknowledged, every record stays in the outbox and is resent.
    let agent = RunningAgent::start(agent_id, port, Some(dir.path().join("agent")), |c| {
        c.uplink.ack_timeout_ms = 300;
    })
    .await;
    let (forger, seen) = client(port, "forger").await;
    forger
        .subscribe(
            format!("{}/summaries/+/{agent_id}", topics.prefix()),
            QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    let devices = devices(20);
    let mut readings = publish_readings(port, &devices, 0, 20).await;
    let m = agent.metrics.clone();
    wait_until("summaries on the wire", Duration::from_secs(30), || {
        m.readings_total.load(Relaxed) == readings && sniffed(&seen).len() >= 4
    })
    .await;
    let lanes = sniffed(&seen);
    let epoch = lanes.values().next().unwrap().0;
    assert_ne!(epoch, 0);
    let stored = m.outbox_records.load(Relaxed);
    assert!(stored > 0);

    // Anyone may publish acks for this agent: far ahead with its epoch (sniffed), plausible seqs
    // with a wrong or a missing epoch, a lane it never sent on, and garbage.
    let mut acks = Vec::new();
    for (&p, &(_, max_seq, _)) in &lanes {
        acks.push(Ack {
            partition: p,
            upto_seq: u64::MAX,
            epoch,
            lane: Default::default(),
        });
        acks.push(Ack {
            partition: p,
            upto_seq: max_seq + 1_000,
            epoch,
            lane: Default::default(),
        });
        acks.push(Ack {
            partition: p,
            upto_seq: max_seq,
            epoch: epoch ^ 0x5a5a,
            lane: Default::default(),
        });
        acks.push(Ack {
            partition: p,
            upto_seq: max_seq,
            epoch: 0,
            lane: Default::default(),
        });
    }
    let unused = (0..64).find(|p| !lanes.contains_key(p)).unwrap();
    acks.push(Ack {
        partition: unused,
        upto_seq: 1,
        epoch,
        lane: Default::default(),
    });
    let forged = AckBatch {
        owner: "agg-evil".into(),
        acks: acks.clone(),
    };
    publish_json(&forger, topics.acks(agent_id), &forged).await;
    for i in 0..500 {
        forger
            .publish(
                topics.acks(agent_id),
                QoS::AtLeastOnce,
                false,
                format!("garbage {i}"),
            )
            .await
            .unwrap();
    }
    let partitions = lanes.len() as u64;
    wait_until("the forged acks refused", Duration::from_secs(30), || {
        AckRefusal::Unsent.count(&m) == 2 * partitions + 1
            && AckRefusal::Epoch.count(&m) == 2 * partitions
            && m.bad_acks_total.load(Relaxed) == 500
    })
    .await;
    assert_eq!(m.outbox_acked_total.load(Relaxed), 0, "nothing deleted");
    assert!(m.outbox_records.load(Relaxed) >= stored, "nothing deleted");

    // The aggregator comes: every record arrives, acknowledged for real.
    let agg = RunningAggregator::start(port, dir.path().join("agg")).await;
    readings += publish_readings(port, &devices, 20, 5).await;
    wait_until(
        "the agent to process every reading",
        Duration::from_secs(60),
        || m.readings_total.load(Relaxed) == readings,
    )
    .await;
    // The backlog is resent after the lanes' ack timeouts, which grew while nobody answered.
    wait_until("the backlog acknowledged", Duration::from_secs(90), || {
        m.outbox_records.load(Relaxed) == 0
    })
    .await;
    let m = agent.stop().await;
    let windows = devices.len() as u64 * 25;
    assert_eq!(m.windows_total.load(Relaxed), windows);
    wait_until("every window applied", Duration::from_secs(60), || {
        agg.readings() == readings
    })
    .await;
    let status = agg.status();
    assert_eq!(status["summaries_applied"], windows, "{status}");
    assert_eq!(m.outbox_records.load(Relaxed), 0, "everything acknowledged");
    assert_eq!(
        m.outbox_acked_total.load(Relaxed),
        windows + m.anomalies_total.load(Relaxed)
    );
    eprintln!(
        "forged acks: {} refused for their epoch, {} for unsent seqs, {} malformed; then {} of {windows} windows arrived ({} readings)",
        AckRefusal::Epoch.count(&m),
        AckRefusal::Unsent.count(&m),
        m.bad_acks_total.load(Relaxed),
        status["summaries_applied"],
        status["readings"],
    );
    agg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_summaries_are_refused_and_counted_while_the_real_lane_keeps_going() {
    let broker = embedded_broker();
    let port = broker.addr().port();
    let dir = tempfile::tempdir().unwrap();
    let topics = Topics::new("edgewatch/v1");
    let agent_id = "gw-real";
    let agg = RunningAggregator::start(port, dir.path().join("agg")).await;
    let agent = RunningAgent::start(agent_id, port, None, |_| {}).await;
    let (forger, seen) = client(port, "forger").await;
    forger
        .subscribe(
            format!("{}/summaries/+/{agent_id}", topics.prefix()),
            QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    let devices = devices(20);
    let mut readings = publish_readings(port, &devices, 0, 10).await;
    let m = agent.metrics.clone();
    wait_until(
        "summaries on the wire and applied",
        Duration::from_secs(30),
        || !sniffed(&seen).is_empty() && agg.readings() > 0,
    )
    .await;

    // The forger knows the real lane: its epoch, partition, seqs and a real window to copy.
    let lanes = sniffed(&seen);
    let (&p, (epoch, max_seq, records)) = lanes.iter().next().unwrap();
    let (epoch, max_seq) = (*epoch, *max_seq);
    let real = records[0].item.clone();
    let mut fake = real.clone();
    fake.start_ms += 1_000 * WINDOW_MS;
    fake.end_ms += 1_000 * WINDOW_MS;
    fake.first_ts_ms += 1_000 * WINDOW_MS;
    fake.last_ts_ms += 1_000 * WINDOW_MS;
    fake.count = 123_456;
    let mut huge = fake.clone();
    huge.count = u64::MAX;
    let mut elsewhere = fake.clone();
    elsewhere.device = (0..)
        .map(|i| format!("forged-{i}"))
        .find(|d| partition_of(d, 64) != p)
        .unwrap();
    let batch = |records: Vec<(u64, WindowSummary)>, epoch: u64, acked: u64| Batch {
        agent: agent_id.to_string(),
        partition: p,
        records: records
            .into_iter()
            .map(|(seq, item)| Sequenced {
                seq,
                prev: None,
                item,
            })
            .collect(),
        acked,
        epoch,
    };
    let topic = topics.summaries(p, agent_id);
    let forgeries = [
        // seq 2^64 - 1 in the real lane, and in the lane of a sender from before epochs
        batch(vec![(u64::MAX, fake.clone())], epoch, 0),
        batch(vec![(u64::MAX, fake.clone())], 0, 0),
        // a floor that would mark the real lane complete
        batch(vec![(u64::MAX, fake.clone())], epoch, u64::MAX - 1),
        // count 2^64 - 1 at a plausible seq
        batch(vec![(max_seq + 500, huge)], epoch, 0),
        // a device of another partition
        batch(vec![(max_seq + 501, elsewhere)], epoch, 0),
    ];
    for b in &forgeries {
        publish_json(&forger, topic.clone(), b).await;
    }
    wait_until("the forgeries refused", Duration::from_secs(30), || {
        agg.refused("seq_jump") == 3
            && agg.refused("invalid_summary") == 1
            && agg.refused("partition") == 1
    })
    .await;

    // The real lane keeps going and keeps being acknowledged; totals count real readings only.
    readings += publish_readings(port, &devices, 10, 10).await;
    wait_until(
        "the agent to process every reading",
        Duration::from_secs(60),
        || m.readings_total.load(Relaxed) == readings,
    )
    .await;
    let m = agent.stop().await;
    let windows = devices.len() as u64 * 20;
    assert_eq!(m.windows_total.load(Relaxed), windows);
    assert_eq!(
        m.outbox_records.load(Relaxed),
        0,
        "the real lane was acknowledged to the end"
    );
    assert_eq!(AckRefusal::Unsent.count(&m), 0);
    wait_until("every window applied", Duration::from_secs(30), || {
        agg.readings() == readings
    })
    .await;
    let status = agg.status();
    assert_eq!(status["summaries_applied"], windows, "{status}");
    assert_eq!(status["readings"], readings, "{status}");
    let real_lane = status["lane_progress"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["partition"] == p && l["epoch"] == epoch)
        .cloned()
        .unwrap();
    assert!(
        real_lane["applied_seq"].as_u64().unwrap() > max_seq,
        "{real_lane}"
    );
    assert!(
        real_lane["applied_seq"].as_u64().unwrap() < 1_000_000,
        "{real_lane}"
    );
    let encoded: String = real.device.bytes().map(|b| format!("%{b:02X}")).collect();
    let device = get_json(agg.addr, &format!("/api/devices/{encoded}"));
    let series = &device["state"]["metrics"]["temperature"];
    assert_eq!(series["readings"], 20 * PER_WINDOW, "{series}");
    assert_eq!(series["windows_applied"], 20);
    // Refused records are never counted as duplicates (or anything else).
    assert_eq!(agg.refused("seq_jump"), 3);
    assert_eq!(agg.refused("invalid_summary"), 1);
    assert_eq!(agg.refused("partition"), 1);
    eprintln!(
        "forged summaries: refused seq_jump {}, invalid_summary {}, partition {}; real: {} of {windows} windows, {} of {readings} readings",
        agg.refused("seq_jump"),
        agg.refused("invalid_summary"),
        agg.refused("partition"),
        status["summaries_applied"],
        status["readings"]
    );
    agg.stop().await;
}
