//! An aggregator with a durable state store: it acknowledges applied lanes only after flushing, and
//! a restart resumes from the store — replayed deliveries then change nothing.

use crate::common::*;
use crate::wait::SubAckTap;
use edgewatch_aggregator::{Aggregator, AggregatorConfig};
use edgewatch_models::wire::{AckBatch, Batch, Sequenced, Topics, WindowSummary};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn summary(device: &str, i: i64) -> WindowSummary {
    WindowSummary {
        device: device.into(),
        metric: "temperature".into(),
        start_ms: 1_767_225_600_000 + i * 60_000,
        end_ms: 1_767_225_660_000 + i * 60_000,
        count: 60,
        min: 20.0,
        max: 22.0,
        mean: 21.0,
        std: 0.5,
        first_ts_ms: 1_767_225_600_000 + i * 60_000,
        last_ts_ms: 1_767_225_659_000 + i * 60_000,
        max_score: 0.1,
        revision: 0,
    }
}

async fn start(
    cfg: AggregatorConfig,
) -> (
    std::net::SocketAddr,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    // sled releases its directory lock a moment after the previous instance dropped it.
    let mut tries = 0;
    let agg = loop {
        match Aggregator::bind(cfg.clone()).await {
            Ok(a) => break a,
            Err(e) if tries < 40 => {
                tries += 1;
                tracing::debug!(error = %e, "store still locked; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("aggregator does not restart: {e}"),
        }
    };
    let addr = agg.local_addr();
    let stop = CancellationToken::new();
    let t = stop.clone();
    let task =
        tokio::spawn(async move { agg.run(async move { t.cancelled().await }).await.unwrap() });
    (addr, stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_follow_the_flush_and_a_restart_resumes_from_the_store() {
    let broker = embedded_broker();
    // Aggregator and test client connect through the tap, so the test sees their subscriptions land.
    let tap = SubAckTap::start(broker.addr()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = AggregatorConfig::with_id("agg-durable");
    cfg.mqtt.port = tap.port();
    cfg.http.listen = "127.0.0.1:0".into();
    cfg.state.dir = Some(dir.path().join("state"));
    let (addr, stop, task) = start(cfg.clone()).await;

    // An agent's view: publish summaries, collect acks.
    let (client, mut el) =
        AsyncClient::new(MqttOptions::new("gw-restart", "127.0.0.1", tap.port()), 100);
    let acked: Arc<Mutex<Vec<AckBatch>>> = Arc::default();
    let sink = acked.clone();
    tokio::spawn(async move {
        while let Ok(ev) = el.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = ev {
                sink.lock()
                    .unwrap()
                    .push(serde_json::from_slice(&p.payload).expect("an AckBatch"));
            }
        }
    });
    let topics = Topics::new("edgewatch/v1");
    client
        .subscribe(topics.acks("gw-r"), QoS::AtLeastOnce)
        .await
        .unwrap();
    for client in ["edgewatch-agg-durable", "gw-restart"] {
        tap.wait_subscribed(client, Duration::from_secs(10)).await;
    }

    let device = "boiler/7 süd";
    let partition = edgewatch_models::partition::partition_of(device, 64);
    let records: Vec<_> = (0..20)
        .map(|i| Sequenced {
            seq: i as u64 + 1,
            prev: None,
            item: summary(device, i),
        })
        .collect();
    let send = |records: Vec<Sequenced<WindowSummary>>| {
        let client = client.clone();
        let topic = topics.summaries(partition, "gw-r");
        async move {
            for chunk in records.chunks(5) {
                let batch = Batch {
                    agent: "gw-r".to_string(),
                    partition,
                    records: chunk.to_vec(),
                    acked: 0,
                    epoch: 0,
                };
                client
                    .publish(
                        topic.clone(),
                        QoS::AtLeastOnce,
                        false,
                        serde_json::to_vec(&batch).unwrap(),
                    )
                    .await
                    .unwrap();
            }
        }
    };
    send(records.clone()).await;
    let upto = |acked: &Arc<Mutex<Vec<AckBatch>>>| {
        acked
            .lock()
            .unwrap()
            .iter()
            .flat_map(|b| {
                b.acks
                    .iter()
                    .filter(|a| a.partition == partition)
                    .map(|a| a.upto_seq)
            })
            .max()
            .unwrap_or(0)
    };
    wait_until("the ack of seq 20", Duration::from_secs(15), || {
        upto(&acked) == 20
    })
    .await;
    assert!(acked
        .lock()
        .unwrap()
        .iter()
        .all(|b| b.owner == "agg-durable"));
    let before = get_json(addr, "/api/status");
    assert_eq!(before["readings"], 1200);

    // kill and restart on the same store
    stop.cancel();
    task.await.unwrap();
    let (addr, stop, task) = start(cfg).await;
    // The restarted aggregator must be subscribed again before the resend below, or the broker
    // drops what nobody is subscribed to yet (seen under load: 15 duplicates of 20, no re-ack).
    tap.wait_connections_subscribed("edgewatch-agg-durable", 2, Duration::from_secs(10))
        .await;
    let after = get_json(addr, "/api/status");
    assert_eq!(
        after["readings"], 1200,
        "state resumed from the store: {after}"
    );
    let encoded: String = device.bytes().map(|b| format!("%{b:02X}")).collect();
    let dev = get_json(addr, &format!("/api/devices/{encoded}"));
    assert_eq!(
        dev["state"]["metrics"]["temperature"]["windows"]
            .as_array()
            .unwrap()
            .len(),
        20
    );

    // The agent resends everything (it never saw some acks): nothing changes, and it is acked again.
    acked.lock().unwrap().clear();
    send(records).await;
    wait_until("the re-ack", Duration::from_secs(15), || upto(&acked) == 20).await;
    // The first batch's ack already covers seq 20 (the lane was restored there): wait for all four.
    wait_until("every resent record seen", Duration::from_secs(15), || {
        get_json(addr, "/api/status")["summaries_duplicate"] == 20
    })
    .await;
    let again = get_json(addr, "/api/status");
    assert_eq!(again["readings"], 1200, "replays change nothing");
    assert_eq!(again["summaries_duplicate"], 20);

    // Anomaly events share the lane's seqs: the ack covers them, and stops at a hole.
    let event = edgewatch_models::wire::AnomalyEvent {
        phase: edgewatch_models::wire::EventPhase::Onset,
        model_version: None,
        id: edgewatch_models::wire::event_id(device, "temperature", 1_767_226_800_500, "ensemble"),
        device: device.into(),
        metric: "temperature".into(),
        ts_ms: 1_767_226_800_500,
        value: 95.0,
        score: 0.99,
        detector: "ensemble".into(),
        window_start_ms: 1_767_226_800_000,
        agent: "gw-r".into(),
    };
    let anomalies = Batch {
        agent: "gw-r".to_string(),
        partition,
        records: vec![Sequenced {
            seq: 21,
            prev: None,
            item: event,
        }],
        acked: 0,
        epoch: 0,
    };
    client
        .publish(
            topics.anomalies(partition, "gw-r"),
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&anomalies).unwrap(),
        )
        .await
        .unwrap();
    wait_until(
        "the ack of the event's seq",
        Duration::from_secs(15),
        || upto(&acked) == 21,
    )
    .await;
    send(vec![Sequenced {
        seq: 23,
        prev: None,
        item: summary(device, 21),
    }])
    .await;
    // Deliberate: proves a wrong ack (past the gap) does not arrive in this time.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        upto(&acked),
        21,
        "seq 22 is missing: the ack must not jump over it"
    );
    send(vec![Sequenced {
        seq: 22,
        prev: None,
        item: summary(device, 20),
    }])
    .await;
    wait_until(
        "the ack past the filled hole",
        Duration::from_secs(15),
        || upto(&acked) == 23,
    )
    .await;

    stop.cancel();
    task.await.unwrap();
}
