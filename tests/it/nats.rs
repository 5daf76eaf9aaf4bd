//! Cluster mode against a real 3-node NATS cluster (Debian's nats-server 2.9, started on loopback
//! by the tests): KV buckets created through the 2.9 workaround, partition leases by
//! compare-and-set with a TTL, and checkpoints fenced by the lease revision.
//!
//! Also the harness other modules build on: [`NatsCluster`] starts three nodes (client, route,
//! monitor and MQTT ports picked at run time), kills and restarts single nodes on their store, and
//! reads which node leads a JetStream stream from the monitor port. Most tests here share one
//! cluster while any of them runs (each uses its own buckets; it is killed when the last one
//! finishes); tests that kill nodes start their own with [`NatsCluster::start`].

use crate::common::{free_port, http_get, require};
use async_nats::jetstream;
use edgewatch_aggregator::cluster::{
    self, CheckpointError, ClusterConfig, KvCheckpoints, KvError, LeaseError, LeaseTiming, Leases,
};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// A 3-node nats-server cluster with JetStream and MQTT listeners on loopback, killed on drop.
/// Nodes are numbered 0, 1, 2 here; their server names are `n1`, `n2`, `n3`.
pub struct NatsCluster {
    /// The running process of each node; `None` while killed.
    nodes: Vec<Option<Child>>,
    ports: Vec<Ports>,
    /// `nats://127.0.0.1:<client port>` of each node.
    pub urls: Vec<String>,
    bin: PathBuf,
    dir: tempfile::TempDir,
}

struct Ports {
    client: u16,
    route: u16,
    monitor: u16,
    mqtt: u16,
}

/// How long a node may take to answer `/healthz` with 200: ~0.6 s fresh, ~8 s restarting on a
/// store with data (2.9), more on a loaded machine.
const HEALTHY_WITHIN: Duration = Duration::from_secs(60);

impl NatsCluster {
    /// Starts a cluster of its own (three nodes, fresh stores) and waits until each node answers
    /// `GET /healthz` with 200. For tests that kill or restart nodes; the others share one.
    ///
    /// Ports are picked free just before the nodes bind them, so another test may take one in
    /// between: a node that exits on "address already in use" restarts the whole cluster on fresh
    /// ports (up to three attempts).
    pub fn start() -> Self {
        for attempt in 1..=3 {
            match Self::try_start() {
                Ok(c) => return c,
                Err(log) if attempt < 3 && log.contains("address already in use") => {
                    eprintln!(
                        "nats cluster: a port was taken meanwhile, starting again on fresh ports"
                    );
                }
                Err(log) => panic!("nats cluster did not start:\n{log}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// One attempt of [`NatsCluster::start`]; the failing node's log when a node exits.
    fn try_start() -> Result<Self, String> {
        let bin = require("nats-server");
        let mut dir = tempfile::tempdir().unwrap();
        if std::env::var_os("EDGEWATCH_IT_KEEP").is_some() {
            dir.disable_cleanup(true);
            eprintln!(
                "EDGEWATCH_IT_KEEP: keeping the NATS cluster's directory {}",
                dir.path().display()
            );
        }
        let ports: Vec<Ports> = (0..3)
            .map(|_| Ports {
                client: free_port(),
                route: free_port(),
                monitor: free_port(),
                mqtt: free_port(),
            })
            .collect();
        let routes = ports
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{}", p.route))
            .collect::<Vec<_>>()
            .join(", ");
        for (i, p) in ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let store = dir.path().join(&name);
            std::fs::write(
                dir.path().join(format!("{name}.conf")),
                format!(
                    "server_name: {name}\nlisten: 127.0.0.1:{}\nhttp: 127.0.0.1:{}\n\
                     jetstream {{ store_dir: {:?}, max_memory_store: 256MB, max_file_store: 2GB }}\n\
                     cluster {{\n  name: edgewatch\n  listen: 127.0.0.1:{}\n  routes: [ {routes} ]\n}}\n\
                     mqtt {{ listen: 127.0.0.1:{} }}\n",
                    p.client,
                    p.monitor,
                    store.display().to_string(),
                    p.route,
                    p.mqtt
                ),
            )
            .unwrap();
        }
        let mut cluster = Self {
            nodes: (0..3).map(|_| None).collect(),
            urls: ports
                .iter()
                .map(|p| format!("nats://127.0.0.1:{}", p.client))
                .collect(),
            ports,
            bin,
            dir,
        };
        for i in 0..3 {
            cluster.nodes[i] = Some(cluster.spawn(i));
        }
        for i in 0..3 {
            cluster.healthy(i)?;
        }
        Ok(cluster)
    }

    /// Starts node `i`'s process on its config file; its log is appended to `n<i+1>.log`.
    fn spawn(&self, i: usize) -> Child {
        let name = format!("n{}", i + 1);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .unwrap();
        Command::new(&self.bin)
            .arg("-c")
            .arg(self.dir.path().join(format!("{name}.conf")))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server starts")
    }

    /// Waits until node `i` answers `GET /healthz` with 200 (JetStream current), panicking with
    /// its log if it exits or takes longer than [`HEALTHY_WITHIN`].
    fn wait_healthy(&mut self, i: usize) {
        if let Err(e) = self.healthy(i) {
            panic!("{e}");
        }
    }

    /// [`NatsCluster::wait_healthy`], with the node's exit reported as an error (with its log).
    fn healthy(&mut self, i: usize) -> Result<(), String> {
        let addr = self.monitor_addr(i);
        let deadline = Instant::now() + HEALTHY_WITHIN;
        loop {
            let child = self.nodes[i].as_mut().expect("node is running");
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "nats-server n{} exited ({status}):\n{}",
                    i + 1,
                    self.log(i)
                ));
            }
            let healthy = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                && http_get(addr, "/healthz").0 == 200;
            if healthy {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "nats-server n{} not healthy on {addr}:\n{}",
                i + 1,
                self.log(i)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs node `i` (no shutdown, no flush) and reaps it. Panics if it is not running.
    pub fn kill_node(&mut self, i: usize) {
        let mut child = self.nodes[i]
            .take()
            .unwrap_or_else(|| panic!("n{} is not running", i + 1));
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Starts node `i` again with the same config, ports and store directory, and waits until it
    /// is healthy (it has caught up with the cluster). Panics if it is running.
    pub fn restart_node(&mut self, i: usize) {
        assert!(self.nodes[i].is_none(), "n{} is still running", i + 1);
        self.nodes[i] = Some(self.spawn(i));
        self.wait_healthy(i);
    }

    /// The port of node `i`'s MQTT listener.
    pub fn mqtt_port(&self, i: usize) -> u16 {
        self.ports[i].mqtt
    }

    /// Node `i`'s MQTT listener as `127.0.0.1:<port>` (the form of an `alternates:` entry).
    pub fn mqtt_addr(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.ports[i].mqtt)
    }

    /// The port of node `i`'s monitoring endpoint (`/healthz`, `/jsz`, `/connz`, ...).
    pub fn monitor_port(&self, i: usize) -> u16 {
        self.ports[i].monitor
    }

    fn monitor_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.monitor_port(i)))
    }

    /// What node `i` reports about JetStream stream `stream` in `GET /jsz?streams=true`: the
    /// entry of `account_details[].stream_detail[]` with that name (`cluster.leader` is the leader's
    /// server name, `state.messages` the node's own replica). `None` when the node is down, does
    /// not answer or does not know the stream.
    pub fn stream_info(&self, i: usize, stream: &str) -> Option<serde_json::Value> {
        let jsz = self.monitor_json(i, "/jsz?streams=true")?;
        jsz.get("account_details")?
            .as_array()?
            .iter()
            .filter_map(|a| a.get("stream_detail")?.as_array())
            .flatten()
            .find(|s| s.get("name").and_then(|n| n.as_str()) == Some(stream))
            .cloned()
    }

    /// GET `path` (e.g. `/connz?subs=detail`) from node `i`'s monitoring endpoint, as JSON. `None`
    /// when the node is down or does not answer 200 with JSON.
    pub fn monitor_json(&self, i: usize, path: &str) -> Option<serde_json::Value> {
        self.nodes[i].as_ref()?;
        serde_json::from_str(&monitor_get(self.monitor_addr(i), path)?).ok()
    }

    /// The node leading JetStream stream `stream` (the KV bucket `leases` is stream `KV_leases`),
    /// as the first running node that knows one reports it. `None` while there is no leader (an
    /// election is running) or when the named leader is not running (a stale view after a kill).
    pub fn stream_leader(&self, stream: &str) -> Option<usize> {
        (0..self.nodes.len())
            .filter_map(|i| self.stream_info(i, stream))
            .find_map(|s| {
                let leader = s.get("cluster")?.get("leader")?.as_str()?;
                let n: usize = leader.strip_prefix('n')?.parse().ok()?;
                let i = n.checked_sub(1)?;
                self.nodes.get(i)?.as_ref().map(|_| i)
            })
    }

    /// The log of node `i` (0-based), for failure messages.
    pub fn log(&self, i: usize) -> String {
        let path: PathBuf = self.dir.path().join(format!("n{}.log", i + 1));
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// A client connected through node `i` only (the others are learnt from the cluster).
    pub async fn client(&self, i: usize) -> async_nats::Client {
        let cfg = ClusterConfig::nats(vec![self.urls[i].clone()]);
        cluster::connect(&cfg, &format!("test-n{}", i + 1))
            .await
            .expect("connect to nats")
    }

    /// A JetStream context through node `i`.
    pub async fn js(&self, i: usize) -> jetstream::Context {
        jetstream::new(self.client(i).await)
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for child in self.nodes.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// GET `path` from a monitoring endpoint; `None` when it cannot be reached or answers other than
/// 200 (a node being killed or starting must not fail the caller).
fn monitor_get(addr: SocketAddr, path: &str) -> Option<String> {
    let addr = addr.to_string();
    let r = edgewatch_tools::http::Get::new(&addr, path)
        .timeout(Duration::from_secs(5))
        .send_blocking()
        .ok()?;
    (r.status == 200).then(|| r.text())
}

/// The cluster shared by the tests running now; started by the first, stopped after the last.
fn shared() -> Arc<NatsCluster> {
    static SHARED: Mutex<Weak<NatsCluster>> = Mutex::new(Weak::new());
    let mut slot = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = slot.upgrade() {
        return c;
    }
    let c = Arc::new(NatsCluster::start());
    *slot = Arc::downgrade(&c);
    c
}

fn timing(ttl_ms: u64, margin_ms: u64) -> LeaseTiming {
    LeaseTiming::new(
        Duration::from_millis(ttl_ms),
        Duration::from_millis(margin_ms),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_2_9_buckets_are_created_through_their_stream_and_checked_on_reopen() {
    let nats = shared();
    let js = nats.js(0).await;
    let ttl = Some(Duration::from_secs(5));
    let kv = cluster::ensure_bucket(&js, "t_create", ttl, 3)
        .await
        .expect("bucket created on 2.9");
    let mut stream = js.get_stream("KV_t_create").await.unwrap();
    let cfg = stream.info().await.unwrap().config.clone();
    assert_eq!(cfg.num_replicas, 3);
    assert_eq!(cfg.max_age, Duration::from_secs(5));
    assert_eq!(cfg.max_messages_per_subject, 1);
    assert!(!cfg.allow_direct);

    let rev = kv.put("k", "v1".into()).await.unwrap();
    assert_eq!(kv.get("k").await.unwrap().as_deref(), Some(&b"v1"[..]));
    assert!(kv.create("k", "again".into()).await.is_err());
    kv.update("k", "v2".into(), rev).await.unwrap();
    assert!(kv.update("k", "v3".into(), rev).await.is_err());

    // Reopening through another node with the same settings is fine; other settings are refused.
    let js2 = nats.js(1).await;
    let again = cluster::ensure_bucket(&js2, "t_create", ttl, 3)
        .await
        .unwrap();
    assert_eq!(again.get("k").await.unwrap().as_deref(), Some(&b"v2"[..]));
    let e = cluster::ensure_bucket(&js2, "t_create", Some(Duration::from_secs(9)), 3)
        .await
        .unwrap_err();
    assert!(matches!(e, KvError::Mismatch { .. }), "{e}");
    assert!(
        e.to_string().contains("t_create") && e.to_string().contains("max_age"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_contenders_exactly_one_wins_a_partition() {
    let nats = shared();
    let t = timing(20_000, 4_000);
    let a = Leases::open(&nats.js(0).await, "t_contend", t, 3, "agg-a")
        .await
        .unwrap();
    let b = Leases::open(&nats.js(1).await, "t_contend", t, 3, "agg-b")
        .await
        .unwrap();
    let (ra, rb) = tokio::join!(a.try_acquire(5), b.try_acquire(5));
    let (winner, loser, lease) = match (ra.unwrap(), rb.unwrap()) {
        (Some(l), None) => (&a, &b, l),
        (None, Some(l)) => (&b, &a, l),
        other => panic!("expected exactly one winner, got {other:?}"),
    };
    assert_eq!(lease.partition, 5);
    assert!(loser.try_acquire(5).await.unwrap().is_none());
    assert!(
        winner.try_acquire(5).await.unwrap().is_none(),
        "create never re-grants"
    );
    let renewed = winner.renew(&lease).await.unwrap();
    assert!(renewed.revision > lease.revision);
    assert!(loser.try_acquire(5).await.unwrap().is_none());

    // Released: the other takes it at once, under a higher revision.
    winner.release(renewed.clone()).await.unwrap();
    let taken = loser
        .try_acquire(5)
        .await
        .unwrap()
        .expect("free after release");
    assert!(taken.revision > renewed.revision);
    assert!(matches!(
        winner.renew(&renewed).await,
        Err(LeaseError::Lost { partition: 5, .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewing_or_releasing_a_stale_revision_reports_the_lease_lost() {
    let nats = shared();
    let leases = Leases::open(
        &nats.js(2).await,
        "t_stale",
        timing(20_000, 4_000),
        3,
        "agg-a",
    )
    .await
    .unwrap();
    let first = leases.try_acquire(1).await.unwrap().unwrap();
    let second = leases.renew(&first).await.unwrap();
    let e = leases.renew(&first).await.unwrap_err();
    assert!(matches!(e, LeaseError::Lost { partition: 1, revision } if revision == first.revision));
    assert!(e.to_string().contains("p1"), "{e}");
    assert!(matches!(
        leases.release(first.clone()).await,
        Err(LeaseError::Lost { .. })
    ));
    // The current revision is untouched by the failed attempts.
    let third = leases.renew(&second).await.unwrap();
    leases.release(third).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrenewed_lease_expires_and_the_other_contender_takes_it_with_a_higher_revision() {
    let nats = shared();
    let t = timing(2_000, 500);
    let a = Leases::open(&nats.js(0).await, "t_expire", t, 3, "agg-a")
        .await
        .unwrap();
    let b = Leases::open(&nats.js(2).await, "t_expire", t, 3, "agg-b")
        .await
        .unwrap();
    let held = a.try_acquire(9).await.unwrap().expect("free partition");
    assert!(b.try_acquire(9).await.unwrap().is_none());
    assert!(a.is_valid_locally(&held, Instant::now()));

    // A stops renewing; B retries on a timer (2.9 sends no watch event on expiry).
    let deadline = Instant::now() + Duration::from_secs(15);
    let taken = loop {
        if let Some(l) = b.try_acquire(9).await.unwrap() {
            break l;
        }
        assert!(Instant::now() < deadline, "lease never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Self-fencing is conservative: A stopped trusting its lease before the servers dropped it.
    assert!(!a.is_valid_locally(&held, Instant::now()));
    assert!(taken.revision > held.revision);
    assert!(matches!(
        a.renew(&held).await,
        Err(LeaseError::Lost { partition: 9, .. })
    ));
    b.release(taken).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_owner_cannot_write_a_checkpoint_after_a_take_over() {
    let nats = shared();
    let (js_a, js_b) = (nats.js(0).await, nats.js(1).await);
    let t = timing(20_000, 4_000);
    let leases_a = Leases::open(&js_a, "t_fence_leases", t, 3, "agg-a")
        .await
        .unwrap();
    let leases_b = Leases::open(&js_b, "t_fence_leases", t, 3, "agg-b")
        .await
        .unwrap();
    let ckpt_a = KvCheckpoints::open(&js_a, "t_fence_ckpt", 3).await.unwrap();
    let ckpt_b = KvCheckpoints::open(&js_b, "t_fence_ckpt", 3).await.unwrap();

    let lease_a = leases_a.try_acquire(7).await.unwrap().unwrap();
    let (state, mut fence_a) = ckpt_a.take_over(7, lease_a.revision).await.unwrap();
    assert_eq!(state, None, "never checkpointed");
    ckpt_a.write(&mut fence_a, b"a1").await.unwrap();

    // A's lease goes (released here; expiry is the same to the checkpoints) and B takes over.
    leases_a.release(lease_a.clone()).await.unwrap();
    let lease_b = leases_b.try_acquire(7).await.unwrap().unwrap();
    assert!(lease_b.revision > lease_a.revision);
    let (state, mut fence_b) = ckpt_b.take_over(7, lease_b.revision).await.unwrap();
    assert_eq!(
        state.as_deref(),
        Some(&b"a1"[..]),
        "B resumes from A's last checkpoint"
    );

    // A, unaware, writes again: fenced. Nor can it take the partition back with its old epoch.
    let e = ckpt_a.write(&mut fence_a, b"a2").await.unwrap_err();
    assert!(
        matches!(e, CheckpointError::Fenced { partition: 7, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("fenced"), "{e}");
    let e = ckpt_a.take_over(7, lease_a.revision).await.unwrap_err();
    assert!(matches!(e, CheckpointError::Fenced { .. }), "{e}");

    ckpt_b.write(&mut fence_b, b"b1").await.unwrap();
    let stored = ckpt_a.read(7).await.unwrap().unwrap();
    assert_eq!(
        (stored.epoch, &stored.state[..]),
        (lease_b.revision, &b"b1"[..])
    );
}

/// The harness itself, on a cluster of its own: the leader of the `leases` bucket's stream is read
/// from `/jsz`, SIGKILLed, replaced by a survivor that takes writes again, and once restarted on
/// its store the node catches up with what it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_stream_leader_is_replaced_and_the_restarted_node_catches_up() {
    let mut nats = NatsCluster::start();
    let ttl = Some(Duration::from_secs(20));
    let kv = cluster::ensure_bucket(&nats.js(0).await, "leases", ttl, 3)
        .await
        .unwrap();
    kv.put("p1", "a".into()).await.unwrap();
    let leader = nats
        .stream_leader("KV_leases")
        .expect("KV_leases has a leader");
    for i in 0..3 {
        let info = nats
            .stream_info(i, "KV_leases")
            .expect("every node hosts a replica");
        assert_eq!(
            info["cluster"]["leader"],
            format!("n{}", leader + 1),
            "{info}"
        );
    }

    nats.kill_node(leader);
    let killed = Instant::now();
    assert!(nats.stream_info(leader, "KV_leases").is_none());
    let survivor = (leader + 1) % 3;
    let new_leader = loop {
        if let Some(l) = nats.stream_leader("KV_leases") {
            break l;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "no new leader for KV_leases within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(new_leader, leader);
    let kv = cluster::ensure_bucket(&nats.js(survivor).await, "leases", ttl, 3)
        .await
        .unwrap();
    while let Err(e) = kv.put("p2", "b".into()).await {
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "no KV write within 30 s of the kill: {e}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "n{} killed: n{} leads KV_leases, writes resumed after {:.1} s",
        leader + 1,
        new_leader + 1,
        killed.elapsed().as_secs_f64()
    );

    nats.restart_node(leader);
    let messages = |i| {
        nats.stream_info(i, "KV_leases")
            .map(|s| s["state"]["messages"].clone())
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while messages(leader) != Some(2.into()) {
        assert!(
            Instant::now() < deadline,
            "the restarted n{} holds {:?} of KV_leases' 2 messages",
            leader + 1,
            messages(leader)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        nats.js(leader)
            .await
            .get_key_value("leases")
            .await
            .unwrap()
            .get("p2")
            .await
            .unwrap()
            .as_deref(),
        Some(&b"b"[..])
    );
}

mod incremental {
    //! Incremental checkpoints on the real cluster: a chain of base and delta records per
    //! partition, fenced like whole checkpoints, read back by a take-over.

    use super::shared;
    use edgewatch_aggregator::cluster::incremental::Compaction;
    use edgewatch_aggregator::cluster::store::{KvStore, PartitionDelta, PartitionState};
    use edgewatch_aggregator::cluster::{Chain, CheckpointError, KvCheckpoints, TakeOverWrite};
    use edgewatch_aggregator::state::LaneId;
    use edgewatch_aggregator::store::StateStore;
    use edgewatch_models::wire::WindowSummary;
    use std::collections::BTreeMap;
    use std::time::Duration;

    const WPS: usize = 4;

    fn window(device: &str, start: i64, count: u64) -> WindowSummary {
        WindowSummary {
            device: device.into(),
            metric: "temp".into(),
            start_ms: start,
            end_ms: start + 1000,
            count,
            min: 1.0,
            max: 2.0,
            mean: 1.5,
            std: 0.1,
            first_ts_ms: start,
            last_ts_ms: start + 900,
            max_score: 0.2,
            revision: 0,
        }
    }

    fn fold(chain: &Chain) -> Result<Vec<u8>, String> {
        PartitionState::from_chain(chain, WPS).map(|s| s.encode())
    }

    /// Readings per device over the kept windows.
    fn counts(windows: &[WindowSummary]) -> BTreeMap<String, u64> {
        let mut c = BTreeMap::new();
        for w in windows {
            *c.entry(w.device.clone()).or_default() += w.count;
        }
        c
    }

    /// Applies `rounds` rounds of windows (for 50 devices in the first 4 rounds, then for 5) and
    /// a lane seq to partition 5 of `store`, checkpointing after each; returns the kinds written.
    fn apply_rounds(
        store: &mut KvStore,
        rounds: std::ops::Range<i64>,
    ) -> Vec<edgewatch_aggregator::cluster::checkpoint::Kind> {
        let mut kinds = Vec::new();
        for round in rounds {
            for d in 0..if round < 4 { 50 } else { 5 } {
                let w = window(&format!("dev-{d}"), round * 1000, (round as u64 + 1) * 10);
                store.put_window(5, &w).unwrap();
            }
            store
                .put_lane_seq(LaneId::new("gw-1", 5, 0), round as u64 + 1)
                .unwrap();
            for w in store.checkpoint(None) {
                assert!(w.result.is_ok(), "round {round}: {:?}", w.result);
                kinds.push(w.kind);
            }
        }
        kinds
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_take_over_after_incremental_checkpoints_restores_the_owner_s_state_and_fences_its_deltas(
    ) {
        use edgewatch_aggregator::cluster::checkpoint::Kind;
        let nats = shared();
        let (js_a, js_b) = (nats.js(0).await, nats.js(1).await);
        let ckpt_a = KvCheckpoints::open_chained(&js_a, "t_incr_ckpt", 3)
            .await
            .unwrap();
        let ckpt_b = KvCheckpoints::open_chained(&js_b, "t_incr_ckpt", 3)
            .await
            .unwrap();

        // A takes partition 5 (never checkpointed) under epoch 10 and checkpoints 12 rounds.
        let (chain, fence_a) = ckpt_a
            .take_over_chain(5, 10, TakeOverWrite::Marker, fold)
            .await
            .unwrap();
        assert_eq!(
            PartitionState::from_chain(&chain, WPS).unwrap(),
            PartitionState::default()
        );
        let mut a = KvStore::new(
            ckpt_a.clone(),
            tokio::runtime::Handle::current(),
            WPS,
            Duration::from_secs(10),
        );
        a.own(
            fence_a,
            &PartitionState::default(),
            Compaction::new(chain.base.len(), 0, 0),
        );
        let (mut a, kinds) = tokio::task::spawn_blocking(move || {
            let kinds = apply_rounds(&mut a, 0..12);
            (a, kinds)
        })
        .await
        .unwrap();
        let deltas = kinds.iter().filter(|k| **k == Kind::Delta).count();
        assert!(deltas >= 6, "mostly deltas: {kinds:?}");
        let held = a.load().unwrap();
        let held_windows: Vec<WindowSummary> = held.windows.into_iter().map(|(_, w)| w).collect();
        assert_eq!(
            held_windows.len(),
            50 * WPS,
            "evicted down to {WPS} per series"
        );

        // B takes over under epoch 20: base + deltas fold to exactly what A held.
        let (chain, fence_b) = ckpt_b
            .take_over_chain(5, 20, TakeOverWrite::Marker, fold)
            .await
            .unwrap();
        assert!(
            chain.deltas.len() >= 2,
            "read a base and {} deltas",
            chain.deltas.len()
        );
        let restored = PartitionState::from_chain(&chain, WPS).unwrap();
        assert_eq!(restored.windows, held_windows);
        assert_eq!(counts(&restored.windows), counts(&held_windows));
        assert_eq!(restored.lanes, vec![("gw-1".to_string(), 0, 12)]);

        // A, unaware, applies more and checkpoints a delta: refused, nothing of it stored.
        let (a, written) = tokio::task::spawn_blocking(move || {
            a.put_window(5, &window("dev-0", 99_000, 7)).unwrap();
            let w = a.checkpoint(None);
            (a, w)
        })
        .await
        .unwrap();
        assert_eq!(written.len(), 1);
        assert_eq!(written[0].kind, Kind::Delta, "a delta was attempted");
        let e = written[0].result.as_ref().unwrap_err();
        assert!(
            matches!(e, CheckpointError::Fenced { partition: 5, .. }),
            "{e}"
        );
        drop(a);

        // B continues incrementally from where A was; a third owner reads B's state, not A's.
        let mut b = KvStore::new(
            ckpt_b.clone(),
            tokio::runtime::Handle::current(),
            WPS,
            Duration::from_secs(10),
        );
        let delta_bytes = chain.bytes - chain.base.len();
        b.own(
            fence_b,
            &restored,
            Compaction::new(chain.base.len(), chain.deltas.len(), delta_bytes),
        );
        let b = tokio::task::spawn_blocking(move || {
            apply_rounds(&mut b, 12..15);
            b
        })
        .await
        .unwrap();
        let (chain, _) = ckpt_a
            .take_over_chain(5, 30, TakeOverWrite::Marker, fold)
            .await
            .unwrap();
        let third = PartitionState::from_chain(&chain, WPS).unwrap();
        let b_windows: Vec<WindowSummary> = b
            .load()
            .unwrap()
            .windows
            .into_iter()
            .map(|(_, w)| w)
            .collect();
        assert_eq!(third.windows, b_windows);
        assert!(
            !third.windows.iter().any(|w| w.start_ms == 99_000),
            "the deposed owner's delta is nowhere"
        );
        assert_eq!(third.lanes, vec![("gw-1".to_string(), 0, 15)]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_checkpoint_of_the_format_before_deltas_is_read_and_an_old_reader_refuses_a_delta_by_name(
    ) {
        let nats = shared();
        let js = nats.js(2).await;
        // A member of the previous version: history 1, whole checkpoints.
        let old = KvCheckpoints::open(&js, "t_incr_old", 3).await.unwrap();
        let (_, mut fence) = old.take_over(2, 5).await.unwrap();
        let st = PartitionState {
            windows: vec![window("dev-1", 0, 10), window("dev-2", 0, 20)],
            lanes: vec![("gw".into(), 0, 42)],
        };
        old.write(&mut fence, &st.encode()).await.unwrap();

        // A member of this version opens the same bucket (raising its history) and reads it.
        let new = KvCheckpoints::open_chained(&js, "t_incr_old", 3)
            .await
            .unwrap();
        let (chain, mut fence) = new
            .take_over_chain(2, 6, TakeOverWrite::Marker, fold)
            .await
            .unwrap();
        assert_eq!(PartitionState::from_chain(&chain, WPS).unwrap(), st);
        let delta = PartitionDelta {
            windows: vec![window("dev-3", 0, 30)],
            lanes: vec![("gw".into(), 0, 43)],
            dropped: vec![],
        };
        new.write_delta(&mut fence, &delta.encode()).await.unwrap();

        // A member of the previous version now refuses the bucket, naming the setting, and
        // reading a delta as a whole checkpoint names the format instead of misreading it.
        let e = KvCheckpoints::open(&js, "t_incr_old", 3).await.unwrap_err();
        assert!(e.to_string().contains("history 64 (want 1)"), "{e}");
        let e = old.take_over(2, 7).await.unwrap_err();
        assert!(
            matches!(e, CheckpointError::Corrupt { partition: 2, .. })
                && e.to_string().contains("version 2"),
            "{e}"
        );

        // The next owner reads the old base and the delta after it.
        let (chain, _) = new
            .take_over_chain(2, 8, TakeOverWrite::Marker, fold)
            .await
            .unwrap();
        let got = PartitionState::from_chain(&chain, WPS).unwrap();
        assert_eq!(counts(&got.windows).get("dev-3"), Some(&30));
        assert_eq!(got.windows.len(), 3);
        assert_eq!(got.lanes, vec![("gw".to_string(), 0, 43)]);
        // In full mode a take-over compacts into one whole value again, readable by anyone.
        let (chain, _) = new
            .take_over_chain(2, 9, TakeOverWrite::Base, fold)
            .await
            .unwrap();
        assert!(chain.deltas.is_empty());
        let stored = old.read(2).await.unwrap().unwrap();
        assert_eq!(PartitionState::decode(&stored.state).unwrap(), got);
    }

    /// nats-server 2.9 checks a write's expected revision before proposing it, not when applying
    /// it (nats-server issue 4320): two writes expecting the same revision that arrive together
    /// both land. A previous owner's delta racing a take-over's marker so: whenever the previous
    /// owner's write succeeded (it then acknowledges what it holds), the new owner resumes with
    /// it, or else the new owner's own next write is fenced (and the partition taken over again
    /// from the whole chain). Never does the new owner go on without it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_previous_owner_s_write_racing_a_take_over_is_never_lost() {
        let nats = shared();
        let (js_a, js_b) = (nats.js(0).await, nats.js(1).await);
        let ckpt_a = KvCheckpoints::open_chained(&js_a, "t_race_ckpt", 3)
            .await
            .unwrap();
        let ckpt_b = KvCheckpoints::open_chained(&js_b, "t_race_ckpt", 3)
            .await
            .unwrap();
        let (mut acked, mut resumed, mut fenced) = (0, 0, 0);
        for p in 0..120u32 {
            let (_, mut fence_a) = ckpt_a
                .take_over_chain(p, 10, TakeOverWrite::Marker, fold)
                .await
                .unwrap();
            let seq = u64::from(p) + 1;
            let delta = PartitionDelta {
                windows: vec![window("dev-race", i64::from(p) * 1000, 10)],
                lanes: vec![("gw".to_string(), 0, seq)],
                dropped: Vec::new(),
            }
            .encode();
            // The previous owner's write goes out around the time of the take-over's own write.
            let delay = Duration::from_micros(u64::from(p % 12) * 400);
            let (a, b) = tokio::join!(
                async {
                    tokio::time::sleep(delay).await;
                    ckpt_a.write_delta(&mut fence_a, &delta).await
                },
                ckpt_b.take_over_chain(p, 20, TakeOverWrite::Marker, fold)
            );
            let (chain, mut fence_b) = b.expect("the take-over");
            if a.is_err() {
                continue; // fenced: the previous owner acknowledges nothing
            }
            acked += 1;
            let state = PartitionState::from_chain(&chain, WPS).unwrap();
            if state.lanes.contains(&("gw".to_string(), 0, seq)) {
                assert_eq!(state.windows.len(), 1, "p{p}: {state:?}");
                resumed += 1;
                continue;
            }
            let next = ckpt_b
                .write_delta(&mut fence_b, &PartitionDelta::default().encode())
                .await;
            assert!(
                matches!(next, Err(CheckpointError::Fenced { .. })),
                "p{p}: the previous owner's acknowledged write is lost: the new owner resumed \
                 without it and writes on ({next:?})"
            );
            fenced += 1;
        }
        eprintln!(
            "previous owner's write acknowledged {acked} times: resumed by the new owner \
             {resumed}, new owner fenced {fenced}"
        );
    }
}
