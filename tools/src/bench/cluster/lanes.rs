//! The synthetic agents' go-back-N sender: round-robin over the lanes, a window of unacknowledged
//! records per lane, resend from the last ack after a timeout without progress.
//!
//! To be replaced by the agent's own lane sender (being extracted into a socket-free API), so that
//! the cluster bench drives the real agent uplink; until then this copy follows its rules.

use super::agents::{summary, Lanes, Spec};
use super::PARTITIONS;
use anyhow::Context;
use edgewatch_models::wire::{Batch, Sequenced, Topics};
use rumqttc::{AsyncClient, QoS};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Lane state of a publisher.
#[derive(Clone, Copy)]
struct Lane {
    /// Next seq to publish (lower than the highest published after a go-back).
    next: u64,
    last_acked: u64,
    /// When the lane last made progress (or started waiting for it).
    since: Instant,
}

/// One synthetic agent: round-robin over its lanes, one batch per lane per pass, at most
/// `window` unacknowledged records per lane; go-back-N after `ack_timeout` without progress.
/// Ends once every lane is acknowledged up to its last seq (`per_lane`, or the highest published
/// when frozen). Returns the records resent.
pub(super) async fn publish_lanes(
    spec: Spec,
    lanes: Arc<Lanes>,
    client: AsyncClient,
    freeze: CancellationToken,
) -> anyhow::Result<u64> {
    let topics = Topics::new(&spec.prefix);
    let mut st = vec![
        Lane {
            next: 1,
            last_acked: 0,
            since: Instant::now(),
        };
        PARTITIONS as usize
    ];
    let mut resent = 0;
    loop {
        let frozen = freeze.is_cancelled();
        let now = Instant::now();
        let mut sent = false;
        let mut done = true;
        for (p, l) in st.iter_mut().enumerate() {
            let acked = lanes.acked[p].load(Relaxed);
            if acked > l.last_acked {
                l.last_acked = acked;
                l.since = now;
            }
            l.next = l.next.max(acked + 1);
            let limit = if frozen {
                lanes.published[p].load(Relaxed)
            } else {
                spec.per_lane.unwrap_or(u64::MAX)
            };
            if acked < limit {
                done = false;
            }
            let in_flight = l.next - 1 - acked;
            if in_flight > 0 && now.duration_since(l.since) >= spec.ack_timeout {
                resent += in_flight;
                l.next = acked + 1;
                l.since = now;
            }
            let in_flight = l.next - 1 - acked;
            if l.next > limit || in_flight >= spec.window {
                continue;
            }
            let n = spec
                .batch
                .min(limit - l.next + 1)
                .min(spec.window - in_flight);
            if in_flight == 0 {
                l.since = now;
            }
            let records = (l.next..l.next + n)
                .map(|seq| Sequenced {
                    seq,
                    prev: Some(seq - 1),
                    item: summary(&spec.devices[p], seq),
                })
                .collect();
            let batch = Batch {
                agent: spec.agent.clone(),
                partition: p as u32,
                records,
                acked,
                epoch: 0,
            };
            let payload = serde_json::to_vec(&batch).context("encoding a summary batch")?;
            lanes.published[p].fetch_max(l.next + n - 1, Relaxed);
            client
                .publish(
                    topics.summaries(p as u32, &spec.agent),
                    QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .await
                .context("publishing a summary batch")?;
            l.next += n;
            sent = true;
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
