//! Bad sensor input through a real broker: every kind of broken message is counted under its reason,
//! the agent keeps running, and the good readings around the bad ones all flow.

use crate::common::*;
use crate::wait::SubAckTap;
use edgewatch_agent::config::Subscription;
use edgewatch_agent::{Agent, AgentConfig};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_are_counted_and_good_readings_still_flow() {
    let broker = embedded_broker();
    let tap = SubAckTap::start(broker.addr()).await;
    let mut cfg = AgentConfig::with_id("gw-bad");
    cfg.source.mqtt.host = broker.addr().ip().to_string();
    cfg.source.mqtt.port = tap.port();
    cfg.source.qos = 1;
    // A wide filter so topics outside the pattern reach the agent and are counted as mismatches.
    cfg.source.subscriptions = vec![Subscription {
        topic: "sensors/{device}/{metric}".into(),
        filter: Some("sensors/#".into()),
        metric: None,
        payload: Default::default(),
    }];
    let agent = Agent::new(cfg).unwrap();
    let m = agent.metrics();
    let stop = CancellationToken::new();
    let task = {
        let t = stop.clone();
        tokio::spawn(agent.run(async move { t.cancelled().await }))
    };
    tap.wait_subscribed("edgewatch-gw-bad-src", Duration::from_secs(10))
        .await;

    let mut opts = MqttOptions::new(
        "bad-publisher",
        broker.addr().ip().to_string(),
        broker.addr().port(),
    );
    opts.set_max_packet_size(4 << 20, 4 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });

    let huge = format!(
        r#"{{"ts":1767225600000,"value":1,"pad":"{}"}}"#,
        "x".repeat(1 << 20)
    );
    let bad: Vec<(&str, Vec<u8>, &str)> = vec![
        ("sensors/d1/temp", b"{not json".to_vec(), "bad_json"),
        ("sensors/d1/temp", br#"{"ts":1767225600000,"value":"hot"}"#.to_vec(), "bad_json"),
        ("sensors/d1/temp", br#"{"ts":1767225600000,"value":NaN}"#.to_vec(), "bad_json"),
        ("sensors/d1/temp", br#"{"ts":1767225600000,"value":Infinity}"#.to_vec(), "bad_json"),
        ("sensors/d1/temp", br#"{"ts":1767225600000,"value":1e400}"#.to_vec(), "bad_json"),
        ("sensors/d1/temp", br#"{"ts":1767225600000}"#.to_vec(), "missing_field"),
        ("sensors/d1/temp", Vec::new(), "empty_payload"),
        ("sensors/d1/temp", huge.into_bytes(), "payload_too_large"),
        ("sensors/d1/temp/extra", br#"{"value":1}"#.to_vec(), "topic_mismatch"),
        ("sensors/d1", br#"{"value":1}"#.to_vec(), "topic_mismatch"),
        ("sensors/d1/temp", b"{\"ts\":1767225600000,\"value\":1,\"unit\":\"\xff\xfe\"}".to_vec(), "not_utf8"),
        ("sensors/d1/temp", br#"{"ts":-1,"value":1}"#.to_vec(), "timestamp_out_of_range"),
        (
            "sensors/dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd/temp",
            br#"{"value":1}"#.to_vec(),
            "bad_name",
        ),
    ];
    let mut good = 0u64;
    let mut ts = 1_767_225_600_000i64;
    let publish_good = async |ts: &mut i64| {
        *ts += 1000;
        client
            .publish(
                "sensors/d1/temp",
                QoS::AtLeastOnce,
                false,
                format!(r#"{{"ts":{ts},"value":20.5}}"#),
            )
            .await
            .unwrap();
    };
    for (topic, payload, _) in &bad {
        for _ in 0..3 {
            publish_good(&mut ts).await;
            good += 1;
        }
        client
            .publish(*topic, QoS::AtLeastOnce, false, payload.clone())
            .await
            .unwrap();
    }
    publish_good(&mut ts).await;
    good += 1;

    let bad_count = bad.len() as u64;
    wait_until(
        "the agent to see every message",
        Duration::from_secs(20),
        || m.readings_total.load(Relaxed) + m.rejected_total() >= good + bad_count,
    )
    .await;
    assert_eq!(
        m.readings_total.load(Relaxed),
        good,
        "every good reading flowed"
    );
    for reason in [
        "not_utf8",
        "bad_json",
        "missing_field",
        "empty_payload",
        "payload_too_large",
        "topic_mismatch",
        "timestamp_out_of_range",
        "bad_name",
    ] {
        let want = bad.iter().filter(|(_, _, r)| *r == reason).count() as u64;
        assert_eq!(m.rejected(reason), want, "rejected as {reason}");
    }
    assert_eq!(
        m.connection_errors_total.load(Relaxed),
        0,
        "no bad input broke the connection"
    );
    stop.cancel();
    task.await.unwrap().unwrap();
}
