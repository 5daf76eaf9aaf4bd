//! Cluster mode against a real 3-node NATS cluster: aggregators win partitions by lease, checkpoint
//! them to the KV, and hand them over when a member leaves or joins, with nothing lost or doubled.
//! In-process aggregators and agent, MQTT on the embedded broker; the process-level crash tests
//! (kill -9, SIGSTOP, killing a NATS node) live in `cluster_crash`.

use crate::common::*;
use crate::nats::NatsCluster;
use crate::wait::SubAckTap;
use edgewatch_agent::{Agent, AgentConfig};
use edgewatch_aggregator::cluster::ClusterConfig;
use edgewatch_aggregator::{Aggregator, AggregatorConfig};
use edgewatch_simulators::SimulatorConfig;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const PARTITIONS: u32 = 16;

struct Member {
    addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<Result<(), edgewatch_aggregator::AggregatorError>>,
}

async fn start_member(id: &str, prefix: &str, nats: &NatsCluster, broker: SocketAddr) -> Member {
    let mut cfg = AggregatorConfig::with_id(id);
    cfg.mqtt.host = broker.ip().to_string();
    cfg.mqtt.port = broker.port();
    cfg.prefix = prefix.into();
    cfg.partitions = PARTITIONS;
    cfg.http.listen = "127.0.0.1:0".into();
    let mut c = ClusterConfig::nats(nats.urls.clone());
    c.lease_ttl_ms = 3_000;
    c.heartbeat_ms = 500;
    c.checkpoint_interval_ms = 100;
    cfg.cluster = Some(c);
    let agg = Aggregator::bind(cfg)
        .await
        .expect("aggregator joins the cluster");
    let addr = agg.local_addr();
    let stop = CancellationToken::new();
    let t = stop.clone();
    let task = tokio::spawn(agg.run(async move { t.cancelled().await }));
    Member { addr, stop, task }
}

/// Partition → owners, from every member's `/api/status`.
fn owners(members: &[&Member]) -> BTreeMap<u32, Vec<SocketAddr>> {
    let mut out: BTreeMap<u32, Vec<SocketAddr>> = BTreeMap::new();
    for m in members {
        for p in get_json(m.addr, "/api/status")["owned"].as_array().unwrap() {
            out.entry(p.as_u64().unwrap() as u32)
                .or_default()
                .push(m.addr);
        }
    }
    out
}

fn each_partition_has_one_owner(members: &[&Member]) -> bool {
    let o = owners(members);
    o.len() == PARTITIONS as usize && o.values().all(|v| v.len() == 1)
}

fn readings(members: &[&Member]) -> u64 {
    members
        .iter()
        .map(|m| {
            get_json(m.addr, "/api/status")["readings"]
                .as_u64()
                .unwrap()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_split_the_partitions_and_hand_them_over_on_leave_and_join_exactly() {
    edgewatch::logging::init("warn");
    let nats = NatsCluster::start();
    let broker = embedded_broker();
    let prefix = "ctest-handover";
    let a = start_member("agg-a", prefix, &nats, broker.addr()).await;
    let b = start_member("agg-b", prefix, &nats, broker.addr()).await;
    let c = start_member("agg-c", prefix, &nats, broker.addr()).await;
    wait_until(
        "every partition owned exactly once by three members",
        Duration::from_secs(20),
        || each_partition_has_one_owner(&[&a, &b, &c]),
    )
    .await;
    let spread = owners(&[&a, &b, &c]);
    for m in [&a, &b, &c] {
        let n = spread.values().filter(|v| v[0] == m.addr).count();
        assert!(n >= 1, "a member owns no partition: {spread:?}");
    }

    let mut agent_cfg = AgentConfig::with_id("gw-cluster");
    agent_cfg.source.mqtt.host = broker.addr().ip().to_string();
    // Through the tap, so the test sees the agent's subscriptions land.
    let tap = SubAckTap::start(broker.addr()).await;
    agent_cfg.source.mqtt.port = tap.port();
    agent_cfg.uplink.prefix = prefix.into();
    agent_cfg.uplink.partitions = PARTITIONS;
    agent_cfg.uplink.ack_timeout_ms = 1_000;
    let agent = Agent::new(agent_cfg).unwrap();
    let agent_metrics = agent.metrics();
    let stop_agent = CancellationToken::new();
    let agent_task = {
        let t = stop_agent.clone();
        tokio::spawn(agent.run(async move { t.cancelled().await }))
    };
    for client in ["edgewatch-gw-cluster-src", "edgewatch-gw-cluster-up"] {
        tap.wait_subscribed(client, Duration::from_secs(10)).await;
    }

    let mut sim = SimulatorConfig::default();
    sim.mqtt.host = broker.addr().ip().to_string();
    sim.mqtt.port = broker.addr().port();
    sim.devices = 16;
    sim.seed = 7;
    sim.interval_ms = 1000;
    sim.start_ms = Some(1_767_225_600_000);
    sim.duration_ms = Some(3 * 3_600_000);
    sim.speedup = 1_000.0;
    sim.max_rate_per_sec = 30_000;
    let fleet = tokio::spawn(edgewatch_simulators::run(sim, std::future::pending()));

    // Mid-stream, one member leaves cleanly: its partitions move to the other two. Deliberate:
    // 3 s of streaming first, so it leaves with state and unacknowledged data in flight.
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.stop.cancel();
    c.task.await.unwrap().unwrap();
    let left = Instant::now();
    wait_until(
        "the leaver's partitions owned by the other two",
        Duration::from_secs(10),
        || each_partition_has_one_owner(&[&a, &b]),
    )
    .await;
    eprintln!("handover after a clean leave: {:?}", left.elapsed());

    // Then a new member joins: some partitions move to it, none is left without an owner.
    let d = start_member("agg-d", prefix, &nats, broker.addr()).await;
    wait_until(
        "the joiner owns its share and every partition has one owner",
        Duration::from_secs(15),
        || each_partition_has_one_owner(&[&a, &b, &d]) && !owners(&[&d]).is_empty(),
    )
    .await;

    // Status over HTTP and from the CLI agree with the members' own view.
    let status = get_json(a.addr, "/api/cluster");
    assert_eq!(status["members"].as_array().unwrap().len(), 3, "{status}");
    assert_eq!(status["unowned"].as_array().unwrap().len(), 0, "{status}");
    let by_status: BTreeMap<u32, String> = status["leases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["partition"].as_u64().unwrap() as u32,
                l["owner"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(by_status.len(), PARTITIONS as usize);
    assert!(
        by_status
            .values()
            .all(|o| ["agg-a", "agg-b", "agg-d"].contains(&o.as_str())),
        "{by_status:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("aggregator.yaml");
    std::fs::write(
        &yaml,
        format!(
            "id: status-probe\nprefix: {prefix}\npartitions: {PARTITIONS}\ncluster:\n  type: nats\n  servers: [{}]\n  lease_ttl_ms: 3000\n  heartbeat_ms: 500\n",
            nats.urls.join(", ")
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edgewatch"))
        .args(["cluster", "status", "--json", "--config"])
        .arg(&yaml)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cli["members"].as_array().unwrap().len(), 3, "{cli}");
    assert_eq!(cli["unowned"].as_array().unwrap().len(), 0, "{cli}");
    let table = std::process::Command::new(env!("CARGO_BIN_EXE_edgewatch"))
        .args(["cluster", "status", "--config"])
        .arg(&yaml)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.starts_with("3 member(s), 16 partition(s), 0 unowned"),
        "{table}"
    );

    let report = fleet.await.unwrap().unwrap();
    wait_until(
        "the agent to process every reading",
        Duration::from_secs(60),
        || agent_metrics.readings_total.load(Relaxed) >= report.published,
    )
    .await;
    stop_agent.cancel();
    agent_task.await.unwrap().unwrap();
    let processed = agent_metrics.readings_total.load(Relaxed);
    assert_eq!(processed, report.published);
    assert_eq!(agent_metrics.late_readings_total.load(Relaxed), 0);

    // Every reading's window is held exactly once across the members that own partitions now.
    let live = [&a, &b, &d];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let held = readings(&live);
        if held == processed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "members hold {held} readings, the agent processed {processed}; owners {:?}",
            owners(&live)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(each_partition_has_one_owner(&live));
    // Any member lists the whole fleet's devices (the simulator's 16), the same on each, from the owners records of
    // the lease holders (cluster mode).
    let addrs: Vec<SocketAddr> = live.iter().map(|m| m.addr).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let addrs = addrs.clone();
        let (lists, local, uncovered) = tokio::task::spawn_blocking(move || {
            let lists: Vec<serde_json::Value> = addrs
                .iter()
                .map(|a| get_json(*a, "/api/devices?limit=1000"))
                .collect();
            let local: u64 = addrs
                .iter()
                .map(|a| {
                    get_json(*a, "/api/devices?scope=local")["total"]
                        .as_u64()
                        .unwrap()
                })
                .sum();
            let uncovered = get_json(addrs[0], "/api/status")["fleet"]["uncovered"].clone();
            (lists, local, uncovered)
        })
        .await
        .unwrap();
        let same = lists.iter().all(|l| {
            l["devices"] == lists[0]["devices"]
                && l["missing_partitions"] == serde_json::json!([])
                && l["total"] == local
        });
        if same && uncovered == serde_json::json!([]) && local == 16 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "members disagree on the fleet's devices ({local} held): {lists:?}; uncovered {uncovered}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let checkpoints: u64 = live
        .iter()
        .map(|m| metric(m.addr, "edgewatch_aggregator_checkpoints_total"))
        .sum();
    assert!(checkpoints > 0, "no checkpoint was written");

    for m in [a, b, d] {
        m.stop.cancel();
        m.task.await.unwrap().unwrap();
    }
}

/// The value of counter `name` in `/metrics`.
fn metric(addr: SocketAddr, name: &str) -> u64 {
    http_get(addr, "/metrics")
        .1
        .lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics of {addr}"))
}
