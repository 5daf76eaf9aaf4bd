//! The owners directory's MQTT shell: publishes this instance's retained record on
//! `{prefix}/owners/{id}` (at start, whenever what it owns changes, and every
//! `owners.publish_interval_ms` for the counters), its offline record at a clean stop and as its
//! last will, and feeds everyone's records into the [`Directory`](super::Directory).
//!
//! Records arrive on the poll loop ([`on_record`]): parsing one is cheap and never waits, so they
//! do not queue behind the apply loop. Refused records are counted and logged at a bounded rate.

use super::OwnerRecord;
use crate::consumer::Warnings;
use crate::Shared;
use edgewatch_models::wire::Topics;
use rumqttc::{AsyncClient, LastWill, QoS};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// The filter of every aggregator's owners record.
pub(crate) fn filter(topics: &Topics) -> String {
    format!("{}/owners/+", topics.prefix())
}

/// The owners topic of aggregator `id`.
pub(crate) fn topic(topics: &Topics, id: &str) -> String {
    format!("{}/owners/{id}", topics.prefix())
}

/// The aggregator id of an owners topic; `None` for any other topic.
pub(crate) fn owner_id<'t>(topics: &Topics, topic: &'t str) -> Option<&'t str> {
    topic
        .strip_prefix(topics.prefix())?
        .strip_prefix("/owners/")
        .filter(|id| !id.contains('/'))
}

/// The retained record a broker publishes for `id` when its connection dies uncleanly.
pub(crate) fn last_will(topics: &Topics, id: &str) -> LastWill {
    LastWill::new(
        topic(topics, id),
        OwnerRecord::offline_payload(id),
        QoS::AtLeastOnce,
        true,
    )
}

/// Takes in a record from the broker: stored in the directory, or refused (counted, logged at
/// most every 5 s).
pub(crate) fn on_record(
    shared: &Shared,
    topics: &Topics,
    p: &rumqttc::Publish,
    warnings: &mut Warnings,
) {
    let Some(id) = owner_id(topics, &p.topic) else {
        return;
    };
    let now = crate::fleet::run::now_ms();
    let accepted = shared
        .directory
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .accept(id, &p.payload, now);
    if let Err(e) = accepted {
        shared.metrics.owners_refused_total.fetch_add(1, Relaxed);
        if let Some(suppressed) = warnings.ready("owners") {
            tracing::warn!(aggregator = %shared.cfg.id, error = %e, suppressed, "owners record refused (edgewatch_aggregator_owners_refused_total; logged at most every 5 s)");
        }
    }
}

/// This instance's record now, owning `owned`.
pub(crate) fn own_record(shared: &Shared, owned: Vec<u32>, now_ms: i64) -> OwnerRecord {
    let (devices, readings, anomalies) = {
        let state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        (
            state.devices().len() as u64,
            state.readings(),
            state.anomalies(),
        )
    };
    OwnerRecord {
        aggregator: shared.cfg.id.clone(),
        http: Some(shared.advertise.clone()),
        partitions: owned,
        mode: Some(
            if shared.cluster.is_some() {
                "cluster"
            } else {
                "static"
            }
            .into(),
        ),
        devices: Some(devices),
        readings: Some(readings),
        anomalies: Some(anomalies),
        updated_ms: Some(now_ms),
        online: true,
    }
}

/// Publishes this instance's record until `stop`: at once, whenever the owned partitions change
/// or the broker connection comes back (checked every 250 ms at most: a dropped connection may
/// have fired the last will), and every `owners.publish_interval_ms`.
pub(crate) async fn run(shared: Arc<Shared>, client: AsyncClient, stop: CancellationToken) {
    let topics = Topics::new(&shared.cfg.prefix);
    let topic = topic(&topics, &shared.cfg.id);
    let every = Duration::from_millis(shared.cfg.owners.publish_interval_ms);
    let mut tick = tokio::time::interval(every.min(Duration::from_millis(250)));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last: Option<(Vec<u32>, Instant)> = None;
    let mut warnings = Warnings::default();
    let mut was_connected = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let owned = shared.owned.list();
        let now = Instant::now();
        let connected = shared.metrics.broker_connected.load(Relaxed) == 1;
        let reconnected = connected && !was_connected;
        was_connected = connected;
        let changed = reconnected || last.as_ref().is_none_or(|(o, _)| *o != owned);
        let due = last
            .as_ref()
            .is_none_or(|(_, t)| now.duration_since(*t) >= every);
        if !changed && !due {
            continue;
        }
        let now_ms = crate::fleet::run::now_ms();
        let record = own_record(&shared, owned.clone(), now_ms);
        let payload = match serde_json::to_vec(&record) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode the owners record");
                continue;
            }
        };
        shared
            .directory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_own(record, now_ms);
        if let Err(e) = client.try_publish(topic.as_str(), QoS::AtLeastOnce, true, payload) {
            if let Some(suppressed) = warnings.ready("owners publish") {
                tracing::warn!(aggregator = %shared.cfg.id, error = %e, suppressed, "owners record not published; retried at the next interval");
            }
        }
        last = Some((owned, now));
    }
}

/// Queues the clean-stop record (`online: false`, retained), the same as the last will. Never
/// waits: with the request queue full (broker gone) the will has to say it.
pub(crate) fn offline(shared: &Shared, client: &AsyncClient) {
    let topics = Topics::new(&shared.cfg.prefix);
    let payload = OwnerRecord::offline_payload(&shared.cfg.id);
    if let Err(e) = client.try_publish(
        topic(&topics, &shared.cfg.id),
        QoS::AtLeastOnce,
        true,
        payload,
    ) {
        tracing::warn!(aggregator = %shared.cfg.id, error = %e, "offline owners record not queued; the last will says the same once the connection drops");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_topics_are_recognised_and_nothing_else() {
        let t = Topics::new("edgewatch/v1");
        assert_eq!(filter(&t), "edgewatch/v1/owners/+");
        assert_eq!(owner_id(&t, "edgewatch/v1/owners/agg-1"), Some("agg-1"));
        assert_eq!(owner_id(&t, "edgewatch/v1/owners/a/b"), None);
        assert_eq!(owner_id(&t, "edgewatch/v1/anomalies/3/gw"), None);
        assert_eq!(owner_id(&t, "other/owners/agg-1"), None);
        let will = last_will(&t, "agg-1");
        assert_eq!(will.topic, "edgewatch/v1/owners/agg-1");
        assert!(will.retain);
    }
}
