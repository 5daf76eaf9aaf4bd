//! The synthetic agents of the cluster bench: MQTT clients in this process, one lane per partition
//! each, publishing `Batch<WindowSummary>` records with correct per-lane seqs (through
//! [`super::lanes`]) and following the aggregators' acks.

use super::lanes::publish_lanes;
use super::{
    ClusterBench, DEVICES_PER_LANE, PARTITIONS, READINGS_PER_WINDOW, T0_MS, WINDOW_BATCHES,
};
use anyhow::{bail, Context};
use edgewatch_models::partition::partition_of;
use edgewatch_models::wire::{AckBatch, Topics, WindowSummary};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The acks one synthetic agent has received and the seqs it has published, per partition.
pub(super) struct Lanes {
    pub(super) acked: Vec<AtomicU64>,
    pub(super) published: Vec<AtomicU64>,
    pub(super) progress: Notify,
}

/// The synthetic agents of one run.
pub(super) struct Load {
    publishers: Vec<JoinHandle<anyhow::Result<u64>>>,
    loops: Vec<JoinHandle<()>>,
    lanes: Vec<Arc<Lanes>>,
    freeze: CancellationToken,
    /// When the first publisher started.
    pub(super) started: Instant,
}

/// How one synthetic agent publishes.
#[derive(Clone)]
pub(super) struct Spec {
    pub(super) prefix: String,
    pub(super) agent: String,
    pub(super) batch: u64,
    pub(super) window: u64,
    /// Records per lane, or unbounded until frozen.
    pub(super) per_lane: Option<u64>,
    pub(super) ack_timeout: Duration,
    /// Devices of each partition's lane.
    pub(super) devices: Arc<Vec<Vec<String>>>,
}

impl Load {
    /// Connects the synthetic agents, waits for their ack subscriptions, and starts publishing.
    pub(super) async fn start(
        b: &ClusterBench,
        prefix: &str,
        broker: SocketAddr,
        per_lane: Option<u64>,
    ) -> anyhow::Result<Self> {
        let topics = Topics::new(prefix);
        let freeze = CancellationToken::new();
        let mut load = Load {
            publishers: Vec::new(),
            loops: Vec::new(),
            lanes: Vec::new(),
            freeze: freeze.clone(),
            started: Instant::now(),
        };
        let mut ready = Vec::new();
        let mut specs = Vec::new();
        for a in 0..b.agents {
            let agent = format!("gw{a}");
            let lanes = Arc::new(Lanes {
                acked: (0..PARTITIONS).map(|_| AtomicU64::new(0)).collect(),
                published: (0..PARTITIONS).map(|_| AtomicU64::new(0)).collect(),
                progress: Notify::new(),
            });
            let mut o = MqttOptions::new(
                format!("{prefix}-{agent}"),
                broker.ip().to_string(),
                broker.port(),
            );
            o.set_max_packet_size(4 << 20, 4 << 20)
                .set_request_channel_capacity(1000)
                .set_inflight(1000)
                .set_keep_alive(Duration::from_secs(30));
            let (client, mut el) = AsyncClient::new(o, 1000);
            el.network_options.set_tcp_nodelay(true);
            let (sub_tx, sub_rx) = tokio::sync::oneshot::channel();
            let acks_topic = topics.acks(&agent);
            let (l, c) = (lanes.clone(), client.clone());
            load.loops.push(tokio::spawn(async move {
                let mut sub_tx = Some(sub_tx);
                loop {
                    match el.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            let _ = c.try_subscribe(acks_topic.clone(), QoS::AtLeastOnce);
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            if let Some(tx) = sub_tx.take() {
                                let _ = tx.send(());
                            }
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            if let Ok(batch) = serde_json::from_slice::<AckBatch>(&p.payload) {
                                for ack in batch.acks {
                                    if let Some(a) = l.acked.get(ack.partition as usize) {
                                        a.fetch_max(ack.upto_seq, Relaxed);
                                    }
                                }
                                l.progress.notify_one();
                            }
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            }));
            ready.push(sub_rx);
            specs.push((
                Spec {
                    prefix: prefix.to_string(),
                    devices: Arc::new(devices(&agent)),
                    agent,
                    batch: b.batch as u64,
                    window: WINDOW_BATCHES * b.batch as u64,
                    per_lane,
                    ack_timeout: Duration::from_millis(b.ack_timeout_ms),
                },
                lanes,
                client,
            ));
        }
        for r in ready {
            tokio::time::timeout(Duration::from_secs(10), r)
                .await
                .context("a synthetic agent did not subscribe to its acks within 10 s")?
                .context("a synthetic agent's MQTT loop ended")?;
        }
        load.started = Instant::now();
        for (spec, lanes, client) in specs {
            load.lanes.push(lanes.clone());
            load.publishers.push(tokio::spawn(publish_lanes(
                spec,
                lanes,
                client,
                freeze.clone(),
            )));
        }
        Ok(load)
    }

    /// Stops publishing new seqs; what was published is still resent until acknowledged.
    pub(super) fn freeze(&self) {
        self.freeze.cancel();
    }

    /// Records published so far (highest seq of every lane, summed).
    pub(super) fn published(&self) -> u64 {
        self.lanes
            .iter()
            .flat_map(|l| l.published.iter())
            .map(|p| p.load(Relaxed))
            .sum()
    }

    /// Waits until every lane is acknowledged up to its last seq; (records resent, records
    /// published).
    pub(super) async fn finish(mut self, limit: Duration) -> anyhow::Result<(u64, u64)> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut resent = 0;
        for p in std::mem::take(&mut self.publishers) {
            match tokio::time::timeout_at(deadline, p).await {
                Ok(r) => resent += r.context("a synthetic agent panicked")??,
                Err(_) => {
                    let behind: Vec<String> = self
                        .lanes
                        .iter()
                        .enumerate()
                        .flat_map(|(a, l)| {
                            (0..PARTITIONS as usize).filter_map(move |p| {
                                let (acked, published) =
                                    (l.acked[p].load(Relaxed), l.published[p].load(Relaxed));
                                (acked < published)
                                    .then(|| format!("gw{a}/p{p} acked {acked} of {published}"))
                            })
                        })
                        .collect();
                    bail!(
                        "{} lanes not acknowledged to their last seq within {limit:?} (first 10: {:?})",
                        behind.len(),
                        &behind[..behind.len().min(10)]
                    );
                }
            }
        }
        Ok((resent, self.published()))
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        for t in &self.publishers {
            t.abort();
        }
        for t in &self.loops {
            t.abort();
        }
    }
}

/// `DEVICES_PER_LANE` device ids of `agent` for every partition.
pub(super) fn devices(agent: &str) -> Vec<Vec<String>> {
    let mut out = vec![Vec::new(); PARTITIONS as usize];
    let mut k = 0u64;
    while out.iter().any(|d| d.len() < DEVICES_PER_LANE) {
        let id = format!("{agent}-dev{k}");
        let d = &mut out[partition_of(&id, PARTITIONS) as usize];
        if d.len() < DEVICES_PER_LANE {
            d.push(id);
        }
        k += 1;
    }
    out
}

/// The summary of record `seq` of a lane: its devices take turns, each series one window later
/// per turn, so every (device, metric, start) is distinct.
pub(super) fn summary(devices: &[String], seq: u64) -> WindowSummary {
    let i = seq - 1;
    let n = devices.len() as u64;
    let start_ms = T0_MS + (i / n) as i64 * 60_000;
    let mean = 20.0 + (i % 7) as f64 * 0.1;
    WindowSummary {
        device: devices[(i % n) as usize].clone(),
        metric: "temp".into(),
        start_ms,
        end_ms: start_ms + 60_000,
        count: READINGS_PER_WINDOW,
        min: mean - 1.0,
        max: mean + 1.0,
        mean,
        std: 0.5,
        first_ts_ms: start_ms,
        last_ts_ms: start_ms + 59_000,
        max_score: 0.1,
        revision: 0,
    }
}
