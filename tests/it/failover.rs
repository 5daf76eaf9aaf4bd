//! Several broker addresses: agent and aggregator start against a dead primary, move on to the
//! alternate in the list, and the whole path works through it.

use crate::common::*;
use crate::wait::SubAckTap;
use edgewatch_agent::{Agent, AgentConfig};
use edgewatch_aggregator::{Aggregator, AggregatorConfig};
use edgewatch_models::detect::{DetectorConfig, ZScoreConfig};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_primary_broker_is_skipped_for_the_next_address() {
    let broker = embedded_broker();
    // The alternate is the broker through the tap, so the test sees the subscriptions land there.
    let tap = SubAckTap::start(broker.addr()).await;
    let live = format!("127.0.0.1:{}", tap.port());
    let dead = free_port(); // nothing listens there

    let mut agg_cfg = AggregatorConfig::with_id("agg-failover");
    agg_cfg.mqtt.port = dead;
    agg_cfg.mqtt.alternates = vec![live.clone()];
    agg_cfg.http.listen = "127.0.0.1:0".into();
    let agg = Aggregator::bind(agg_cfg).await.unwrap();
    let url = agg.feed_url();
    let agg_metrics = agg.metrics();
    let stop = CancellationToken::new();
    let agg_task = {
        let t = stop.clone();
        tokio::spawn(agg.run(async move { t.cancelled().await }))
    };

    let mut cfg = AgentConfig::with_id("gw-failover");
    cfg.source.mqtt.port = dead;
    cfg.source.mqtt.alternates = vec![live.clone()];
    cfg.detector = DetectorConfig::Zscore(ZScoreConfig {
        window: 50,
        warmup: 20,
        z_max: 8.0,
    });
    cfg.anomaly.threshold = Some(0.75);
    let agent = Agent::new(cfg).unwrap();
    let agent_metrics = agent.metrics();
    let agent_task = {
        let t = stop.clone();
        tokio::spawn(agent.run(async move { t.cancelled().await }))
    };
    let feed = FeedClient::connect(&url).await;
    // Both have failed on the primary at least once and then subscribed on the alternate.
    wait_until("both clients to fail over", Duration::from_secs(10), || {
        agent_metrics.connection_errors_total.load(Relaxed) >= 2
            && agg_metrics.connection_errors_total.load(Relaxed) >= 1
    })
    .await;
    for client in [
        "edgewatch-agg-failover",
        "edgewatch-gw-failover-src",
        "edgewatch-gw-failover-up",
    ] {
        tap.wait_subscribed(client, Duration::from_secs(10)).await;
    }

    let (client, mut el) = AsyncClient::new(
        MqttOptions::new("failover-pub", "127.0.0.1", broker.addr().port()),
        100,
    );
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    let start = 1_767_225_600_000i64;
    for i in 0..40i64 {
        let v = if i == 30 {
            99.0
        } else {
            20.0 + (i % 3) as f64 * 0.3
        };
        client
            .publish(
                "sensors/tank-1/level",
                QoS::AtLeastOnce,
                false,
                format!(r#"{{"ts":{},"value":{v}}}"#, start + i * 1000),
            )
            .await
            .unwrap();
    }
    wait_until("the spike on the feed", Duration::from_secs(15), || {
        !feed.snapshot().is_empty()
    })
    .await;
    assert_eq!(feed.snapshot()[0].ts_ms, start + 30_000);
    assert_eq!(agent_metrics.readings_total.load(Relaxed), 40);

    stop.cancel();
    agent_task.await.unwrap().unwrap();
    agg_task.await.unwrap().unwrap();
}
