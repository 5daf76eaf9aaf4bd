//! The synthetic agents' publishing loop, driven by the agent's real lane sender
//! ([`edgewatch_agent::uplink::LaneSender`]: go-back-N with ack timeouts, backoff and a window of
//! unacknowledged records per lane). The backlog is synthetic — every lane holds seqs `1..=limit`,
//! generated on demand instead of read from an outbox — so the bench measures the aggregators,
//! not a disk.

use super::agents::{summary, Lanes, Spec};
use super::PARTITIONS;
use anyhow::Context;
use edgewatch_agent::uplink::{LaneSender, LaneState, SenderSettings};
use edgewatch_models::wire::{Batch, Sequenced, Topics, WindowSummary};
use rumqttc::{AsyncClient, QoS};
use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// No pacing: the bench drains its backlog as fast as the window and the acks allow.
const DRAIN_RECORDS_PER_SEC: f64 = 1e9;

/// One synthetic agent: each round, every lane publishes what the agent's [`LaneSender`] plans
/// (at most `window` unacknowledged records, in batches of `batch`); an ack timeout sends the lane
/// back to its last ack. Ends once every lane is acknowledged up to its last seq (`per_lane`, or
/// the highest published when frozen). Returns the records resent.
pub(super) async fn publish_lanes(
    spec: Spec,
    lanes: Arc<Lanes>,
    client: AsyncClient,
    freeze: CancellationToken,
) -> anyhow::Result<u64> {
    let topics = Topics::new(&spec.prefix);
    let mut sender = LaneSender::new(
        SenderSettings {
            ack_timeout: spec.ack_timeout,
            max_unacked: spec.window,
            drain_rate: DRAIN_RECORDS_PER_SEC,
            jitter_seed: std::process::id(),
        },
        Instant::now(),
    );
    // Per lane: the last ack handed to the sender, and the highest seq published since it.
    let mut seen_ack = vec![0u64; PARTITIONS as usize];
    let mut sent_upto = vec![0u64; PARTITIONS as usize];
    let mut resent = 0;
    loop {
        let frozen = freeze.is_cancelled();
        let now = Instant::now();
        let limit = |p: usize| {
            if frozen {
                lanes.published[p].load(Relaxed)
            } else {
                spec.per_lane.unwrap_or(u64::MAX / 2)
            }
        };
        for (p, seen) in seen_ack.iter_mut().enumerate() {
            let acked = lanes.acked[p].load(Relaxed);
            if acked > *seen {
                *seen = acked;
                sender.on_ack(now, p as u32, acked);
            }
        }
        for (p, acked, _misses) in sender.expired(now, |p| {
            let acked = lanes.acked[p as usize].load(Relaxed);
            (acked, acked < limit(p as usize))
        }) {
            resent += sent_upto[p as usize].saturating_sub(acked);
            sent_upto[p as usize] = acked;
        }
        sender.refill(now);
        let mut sent = false;
        let mut done = true;
        for (p, sent_upto) in sent_upto.iter_mut().enumerate() {
            let acked = lanes.acked[p].load(Relaxed);
            let last = limit(p);
            if acked < last {
                done = false;
            }
            let state = LaneState {
                acked,
                next_seq: last + 1,
            };
            let devices = &spec.devices[p];
            let (plan, _) = sender.plan_lane(
                now,
                p as u32,
                state,
                None,
                |seq| seq - 1,
                |after, max| {
                    let upto = last.min(after.saturating_add(max as u64));
                    Ok::<_, Infallible>(
                        (after + 1..=upto)
                            .map(|seq| (seq, summary(devices, seq)))
                            .collect::<Vec<(u64, WindowSummary)>>(),
                    )
                },
            );
            let mut records = plan.records.into_iter().peekable();
            while records.peek().is_some() {
                let chunk: Vec<Sequenced<WindowSummary>> = records
                    .by_ref()
                    .take(spec.batch as usize)
                    .map(|(seq, item)| Sequenced {
                        seq,
                        prev: Some(seq - 1),
                        item,
                    })
                    .collect();
                let top = chunk.last().map_or(0, |r| r.seq);
                let batch = Batch {
                    agent: spec.agent.clone(),
                    partition: p as u32,
                    records: chunk,
                    acked,
                    epoch: 0,
                };
                let payload = serde_json::to_vec(&batch).context("encoding a summary batch")?;
                lanes.published[p].fetch_max(top, Relaxed);
                *sent_upto = (*sent_upto).max(top);
                client
                    .publish(
                        topics.summaries(p as u32, &spec.agent),
                        QoS::AtLeastOnce,
                        false,
                        payload,
                    )
                    .await
                    .context("publishing a summary batch")?;
                sent = true;
            }
        }
        if done {
            return Ok(resent);
        }
        if !sent {
            tokio::select! {
                _ = lanes.progress.notified() => {}
                _ = freeze.cancelled(), if !frozen => {}
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    }
}
