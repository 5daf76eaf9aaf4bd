//! The whole path in one process against the embedded broker: seeded simulator → agent → two
//! aggregators → WebSocket feed clients. Checks detection against the simulator's ground truth,
//! exactly-once events, sharding, and that every reading's window reached exactly one owner.

use crate::common::*;
use crate::wait::SubAckTap;
use edgewatch_agent::{Agent, AgentConfig};
use edgewatch_aggregator::config::PartitionSpec;
use edgewatch_aggregator::{Aggregator, AggregatorConfig};
use edgewatch_models::partition::partition_of;
use edgewatch_simulators::{AnomalyKind, SimulatorConfig};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_fleet_reaches_the_feed_exactly_once_and_is_sharded() {
    edgewatch::logging::init("warn");
    let broker = embedded_broker();
    let (host, port) = (broker.addr().ip().to_string(), broker.addr().port());
    // Agent and aggregators connect through the tap, so the test sees their subscriptions land.
    let tap = SubAckTap::start(broker.addr()).await;

    let mut aggs = Vec::new();
    for (i, range) in ["0-31", "32-63"].iter().enumerate() {
        let mut cfg = AggregatorConfig::with_id(&format!("agg-{i}"));
        cfg.mqtt.host = host.clone();
        cfg.mqtt.port = tap.port();
        cfg.owned = vec![PartitionSpec::Range(range.to_string())];
        cfg.http.listen = "127.0.0.1:0".into();
        aggs.push(Aggregator::bind(cfg).await.unwrap());
    }
    let addrs: Vec<_> = aggs.iter().map(Aggregator::local_addr).collect();
    let urls: Vec<_> = aggs.iter().map(Aggregator::feed_url).collect();
    let stop_aggs = CancellationToken::new();
    let agg_tasks: Vec<_> = aggs
        .into_iter()
        .map(|a| {
            let t = stop_aggs.clone();
            tokio::spawn(a.run(async move { t.cancelled().await }))
        })
        .collect();

    let mut agent_cfg = AgentConfig::with_id("gw-e2e");
    agent_cfg.source.mqtt.host = host.clone();
    agent_cfg.source.mqtt.port = tap.port();
    let agent = Agent::new(agent_cfg).unwrap();
    let agent_metrics = agent.metrics();
    let stop_agent = CancellationToken::new();
    let agent_task = {
        let t = stop_agent.clone();
        tokio::spawn(agent.run(async move { t.cancelled().await }))
    };

    // Both feeds watch from the start; any instance serves the whole fleet.
    let clients = [
        FeedClient::connect(&urls[0]).await,
        FeedClient::connect(&urls[1]).await,
    ];
    // The agent's and aggregators' subscriptions land before the fleet publishes.
    for client in [
        "edgewatch-agg-0",
        "edgewatch-agg-1",
        "edgewatch-gw-e2e-src",
        "edgewatch-gw-e2e-up",
    ] {
        tap.wait_subscribed(client, Duration::from_secs(10)).await;
    }

    let mut sim = SimulatorConfig::default();
    sim.mqtt.host = host.clone();
    sim.mqtt.port = port;
    sim.devices = 12;
    sim.seed = 42;
    sim.interval_ms = 1000;
    sim.start_ms = Some(1_767_225_600_000); // 2026-01-01T00:00:00Z
    let hours = 4;
    sim.duration_ms = Some(hours * 3_600_000);
    sim.speedup = 1_000.0;
    sim.max_rate_per_sec = 30_000;
    // One anomaly per series-hour: twice the simulator's default, for enough spikes in a short run.
    sim.anomalies.rate_per_series_hour = 1.0;
    sim.anomalies.warmup_ms = 30 * 60_000;
    let series = sim.devices * sim.metrics.len();
    let report = edgewatch_simulators::run(sim.clone(), std::future::pending())
        .await
        .unwrap();
    assert!(report.published > 0);

    wait_until(
        "the agent to process every reading",
        Duration::from_secs(120),
        || agent_metrics.readings_total.load(Relaxed) >= report.published,
    )
    .await;
    stop_agent.cancel();
    agent_task.await.unwrap().unwrap();
    let agent_readings = agent_metrics.readings_total.load(Relaxed);
    assert_eq!(
        agent_readings, report.published,
        "the agent saw every published reading"
    );
    assert_eq!(agent_metrics.rejected_total(), 0);

    // Every window reached its owner: the owners' readings add up to what the agent processed.
    let total = || -> u64 {
        addrs
            .iter()
            .map(|a| get_json(*a, "/api/status")["readings"].as_u64().unwrap())
            .sum()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while total() != agent_readings {
        if std::time::Instant::now() > deadline {
            let statuses: Vec<_> = addrs
                .iter()
                .map(|a| {
                    crate::common::http_get(*a, "/metrics")
                        .1
                        .lines()
                        .filter(|l| !l.starts_with('#') && !l.ends_with(" 0"))
                        .collect::<Vec<_>>()
                        .join("; ")
                })
                .collect();
            eprintln!(
                "agent: publish errors {}, connection errors {}",
                agent_metrics.publish_errors_total.load(Relaxed),
                agent_metrics.connection_errors_total.load(Relaxed)
            );
            panic!(
                "windows cover {} readings, the agent processed {agent_readings} (late {}, windows {}, summaries published {}); aggregators: {statuses:?}",
                total(),
                agent_metrics.late_readings_total.load(Relaxed),
                agent_metrics.windows_total.load(Relaxed),
                agent_metrics.summaries_published_total.load(Relaxed),
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let raised = agent_metrics.anomalies_total.load(Relaxed) as usize;
    wait_until(
        "every anomaly event on both feeds",
        Duration::from_secs(30),
        || clients.iter().all(|c| c.snapshot().len() >= raised),
    )
    .await;
    // Deliberate: time for any duplicate or stray event to arrive before the exact checks below.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Sharding: each device lives on exactly one aggregator, the one owning its partition.
    let mut owner_of: HashMap<String, usize> = HashMap::new();
    for (i, a) in addrs.iter().enumerate() {
        let owned: BTreeSet<u32> = if i == 0 {
            (0..32).collect()
        } else {
            (32..64).collect()
        };
        let local = get_json(*a, "/api/devices?scope=local&limit=1000000");
        for d in local["devices"].as_array().unwrap() {
            let id = d["device"].as_str().unwrap().to_string();
            assert!(
                owned.contains(&partition_of(&id, 64)),
                "{id} is on agg-{i} but not in its partitions"
            );
            assert!(
                owner_of.insert(id.clone(), i).is_none(),
                "{id} is on two aggregators"
            );
        }
        let status = get_json(*a, "/api/status");
        assert_eq!(status["bad_messages"], 0);
    }
    assert_eq!(
        owner_of.len(),
        sim.devices,
        "every device has state somewhere: {owner_of:?}"
    );

    // Exactly once, and the same on both instances.
    let events = clients[0].snapshot();
    assert_eq!(events.len(), raised, "feed 0 has every raised event, once");
    let ids: HashSet<_> = events.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids.len(), events.len(), "no event id appears twice");
    let other: HashSet<_> = clients[1].snapshot().iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids, other, "both instances serve the whole fleet's feed");

    // Detection quality against the simulator's ground truth.
    let labels = &report.labels;
    let near = |e: &edgewatch_models::wire::AnomalyEvent, slack_ms: i64| {
        labels.iter().any(|l| {
            l.device == e.device
                && l.metric == e.metric
                && e.ts_ms >= l.start_ms
                && e.ts_ms <= l.end_ms + slack_ms
        })
    };
    let point: Vec<_> = labels
        .iter()
        .filter(|l| matches!(l.kind, AnomalyKind::Spike | AnomalyKind::Dip))
        .collect();
    assert!(
        point.len() >= 10,
        "too few spikes/dips injected to judge: {}",
        point.len()
    );
    let caught = point
        .iter()
        .filter(|l| {
            events.iter().any(|e| {
                e.device == l.device
                    && e.metric == l.metric
                    && e.ts_ms >= l.start_ms
                    && e.ts_ms <= l.end_ms + 5_000
            })
        })
        .count();
    let recall = caught as f64 / point.len() as f64;
    for l in &point {
        let hit = events.iter().any(|e| {
            e.device == l.device
                && e.metric == l.metric
                && e.ts_ms >= l.start_ms
                && e.ts_ms <= l.end_ms + 5_000
        });
        if !hit {
            let before = labels
                .iter()
                .filter(|o| o.device == l.device && o.metric == l.metric && o.end_ms < l.start_ms)
                .map(|o| format!("{:?}@-{}s", o.kind, (l.start_ms - o.end_ms) / 1000))
                .next_back();
            eprintln!(
                "missed {:?} {} {} at +{}s (previous label: {before:?})",
                l.kind,
                l.device,
                l.metric,
                (l.start_ms - sim.start_ms.unwrap_or(0)) / 1000
            );
        }
    }
    let false_alarms = events.iter().filter(|e| !near(e, 120_000)).count();
    let device_hours = (sim.devices as f64) * (hours as f64 - 0.5);
    let fa_rate = false_alarms as f64 / device_hours;
    eprintln!(
        "e2e: {} readings, {series} series, {} labels, spikes+dips caught {caught}/{} ({:.1} %), {false_alarms} false alarms ({fa_rate:.2} per device-hour)",
        report.published,
        labels.len(),
        point.len(),
        recall * 100.0
    );
    assert!(
        recall >= 0.9,
        "caught only {caught} of {} spikes and dips",
        point.len()
    );
    assert!(
        fa_rate <= 3.0,
        "{false_alarms} false alarms in {device_hours} device-hours"
    );

    stop_aggs.cancel();
    for t in agg_tasks {
        t.await.unwrap().unwrap();
    }
}
