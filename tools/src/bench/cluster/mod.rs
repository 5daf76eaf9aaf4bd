//! The `cluster` section of `edgewatch bench`: aggregators in cluster mode on a real 3-node NATS
//! cluster — end-to-end throughput with 1, 2 and 3 of them, and how long a SIGKILL of one takes to
//! heal.
//!
//! The section starts everything itself, in a scratch directory under `--dir` (removed afterwards):
//! three `nats-server` nodes with JetStream on loopback (free ports; `nats-server` from `PATH` or
//! `/usr/sbin`), the embedded MQTT broker for the data path, and the aggregators as child
//! processes of this executable (`edgewatch aggregator --config FILE`), so one can be killed with
//! SIGKILL. Synthetic agents in this process publish `Batch<WindowSummary>` records with correct
//! per-lane seqs to every partition and follow the aggregators' acks, resending (go-back-N) what
//! stays unacknowledged, as the real agent does.
//!
//! A throughput run publishes a fixed number of summaries and is timed from the first publish to
//! the last lane acknowledged up to its last seq: acks follow checkpoints, so the figure includes
//! them. Every process — NATS nodes, aggregators, broker, agents — shares this machine's cores, so
//! more aggregators add coordination and checkpoint work without adding hardware.

mod agents;
mod lanes;
mod logs;
mod metrics;
mod nats;
mod process;

use super::delivery::Scratch;
use crate::broker::{BrokerConfig, EmbeddedBroker};
use agents::Load;
use anyhow::{bail, Context};
use edgewatch_aggregator::cluster::config::CheckpointMode;
use edgewatch_aggregator::cluster::wanted;
use logs::{log_warnings, tail};
use metrics::{diagnose, get_json, owned, scrape_all, COUNTERS};
pub(super) use nats::find_nats_server;
use nats::NatsCluster;
use process::AggProc;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Partitions of the bench deployment (the default of agents and aggregators).
const PARTITIONS: u32 = 64;
/// Readings each window summary stands for (`count`): readings/s = summaries/s × this.
const READINGS_PER_WINDOW: u64 = 60;
/// Devices per lane (agent, partition): each agent has its own devices, one metric each.
const DEVICES_PER_LANE: usize = 4;
/// Unacknowledged batches per lane before a synthetic agent waits for acks. Small enough that the
/// records in flight over every lane queue for well under the ack timeout at the rates this
/// machine reaches (more only causes spurious resends), large enough to keep every lane busy
/// across a checkpoint interval.
const WINDOW_BATCHES: u64 = 2;
/// Event time of the first window (2026-01-01T00:00:00Z).
const T0_MS: i64 = 1_767_225_600_000;
/// Load before the kill in the failover run.
const FAILOVER_WARMUP: Duration = Duration::from_secs(3);

/// Settings of the section (from `edgewatch bench --cluster-*`).
#[derive(Debug, Clone)]
pub(super) struct ClusterBench {
    /// Aggregator counts of the throughput runs.
    pub aggregators: Vec<usize>,
    /// Summaries published per throughput run.
    pub summaries: u64,
    /// `cluster.lease_ttl_ms`; the heartbeat is a sixth of it.
    pub lease_ttl_ms: u64,
    /// `cluster.checkpoint_interval_ms`.
    pub checkpoint_ms: u64,
    /// `cluster.checkpoint` of the throughput runs: every aggregator count runs in each.
    pub checkpoint_modes: Vec<CheckpointMode>,
    /// Synthetic agents (MQTT clients), each with a lane per partition.
    pub agents: usize,
    /// Records per published batch.
    pub batch: usize,
    /// Synthetic agents resend a lane's unacknowledged records after this long without progress.
    pub ack_timeout_ms: u64,
    /// Aggregators of the failover run (0: no failover run).
    pub failover_aggregators: usize,
}

impl ClusterBench {
    fn heartbeat_ms(&self) -> u64 {
        (self.lease_ttl_ms / 6).max(1)
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.aggregators.contains(&0) {
            bail!("--cluster-aggregators: counts must be >= 1");
        }
        if self.failover_aggregators == 1 {
            bail!("--cluster-failover-aggregators: the failover run needs at least 2 aggregators (one is killed), or 0 to skip it");
        }
        if self.agents == 0 || self.batch == 0 {
            bail!("--cluster-agents and --cluster-batch must be >= 1");
        }
        if self.lease_ttl_ms < 600 {
            bail!(
                "--cluster-lease-ttl-ms: must be >= 600 (the heartbeat is a sixth of it), got {}",
                self.lease_ttl_ms
            );
        }
        if self.checkpoint_ms == 0 || self.ack_timeout_ms == 0 {
            bail!("--cluster-checkpoint-ms and --cluster-ack-timeout-ms must be > 0");
        }
        Ok(())
    }
}

/// Runs the section: the throughput runs, then the failover run.
pub(super) async fn run(b: &ClusterBench, base: &Path) -> anyhow::Result<()> {
    b.check()?;
    let bin = find_nats_server().context(
        "the cluster section needs nats-server (not found on PATH, in /usr/sbin or /sbin): install it with `apt-get install -y nats-server`",
    )?;
    let exe = std::env::current_exe().context("locating the edgewatch executable")?;
    let scratch = Scratch::new(base, "cluster")?;
    let nats = NatsCluster::start(&bin, &scratch.0).await?;
    let broker = EmbeddedBroker::start(&BrokerConfig {
        listen: "127.0.0.1:0".into(),
        ..BrokerConfig::default()
    })?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "cluster: 3-node {} (JetStream, R3 buckets) and the embedded MQTT broker on loopback; {PARTITIONS} partitions, lease_ttl_ms {}, heartbeat_ms {}, checkpoint_interval_ms {}; aggregators are child processes; every process (NATS nodes, aggregators, broker, synthetic agents) shares this machine's {cores} cores, so more aggregators add coordination and checkpoint work, not hardware",
        nats.version,
        b.lease_ttl_ms,
        b.heartbeat_ms(),
        b.checkpoint_ms
    );
    let lanes = b.agents as u64 * u64::from(PARTITIONS);
    let per_lane = b.summaries.div_ceil(lanes).max(1);
    println!(
        "cluster load: {} synthetic agents x {PARTITIONS} partitions = {lanes} lanes, {} records per batch, at most {} unacked per lane, resend after {} ms without ack progress; {} series ({DEVICES_PER_LANE} devices per lane), {READINGS_PER_WINDOW} readings per window summary",
        b.agents,
        b.batch,
        WINDOW_BATCHES * b.batch as u64,
        b.ack_timeout_ms,
        lanes as usize * DEVICES_PER_LANE,
    );
    let mut env = Env {
        b,
        exe,
        nats,
        broker: broker.addr(),
        dir: scratch.0.clone(),
        runs: 0,
        mode: CheckpointMode::default(),
    };
    for &mode in &b.checkpoint_modes {
        env.mode = mode;
        let mut first: Option<(usize, f64)> = None;
        for &n in &b.aggregators {
            let r = env.throughput(n, per_lane).await?;
            let (n0, rate0) = *first.get_or_insert((n, r.rate));
            let plural = |n: usize| if n == 1 { "" } else { "s" };
            println!(
            "cluster throughput, {n} aggregator{}: {:>10.0} summaries/s = {:>11.0} readings/s (each summary stands for {READINGS_PER_WINDOW}); checkpoint {}: {:.1} writes/s, {:.2} MB/s checkpointed ({:.1} KB per write, {:.0} bytes per applied summary); {} summaries, first publish to last ack {:.2} s, {} resent; x{:.2} vs {n0} aggregator{}; CPU s: aggregators {}, nats-server {}, bench process {} of {:.1} s x {cores} cores; settled in {:.1} s{}",
            plural(n),
            r.rate,
            r.rate * READINGS_PER_WINDOW as f64,
            mode_name(mode),
            r.checkpoints as f64 / r.secs,
            r.checkpoint_bytes as f64 / r.secs / 1e6,
            r.checkpoint_bytes as f64 / r.checkpoints.max(1) as f64 / 1e3,
            r.checkpoint_bytes as f64 / r.applied.max(1) as f64,
            r.summaries,
            r.secs,
            r.resent,
            r.rate / rate0,
            plural(n0),
            fmt_cpu(r.cpu.aggregators),
            fmt_cpu(r.cpu.nats),
            fmt_cpu(r.cpu.bench),
            r.secs,
            r.settle.as_secs_f64(),
            if r.trouble.is_empty() {
                String::new()
            } else {
                format!(
                    "; WARNING: not a steady run ({}; see stderr)",
                    r.trouble.join(", ")
                )
            },
        );
        }
    }
    env.mode = CheckpointMode::default();
    if b.failover_aggregators >= 2 {
        let f = env.failover(b.failover_aggregators).await?;
        println!(
            "cluster failover, SIGKILL 1 of {} aggregators under load (lease_ttl_ms {}): every partition owned again {:.2} s after the kill (the victim held {}; /api/cluster polled every 100 ms), every lane acked to its last published seq {:.2} s after it (publishing stopped at the kill; {} summaries published before it; agents resend after {} ms without ack progress, {} resent){}",
            b.failover_aggregators,
            b.lease_ttl_ms,
            f.owned.as_secs_f64(),
            f.victim_partitions,
            f.acked.as_secs_f64(),
            f.published,
            b.ack_timeout_ms,
            f.resent,
            if f.survivors_lost > 0 {
                format!("; WARNING: the survivors also lost {} of their own partitions (see stderr)", f.survivors_lost)
            } else {
                String::new()
            },
        );
    }
    drop(env);
    drop(broker);
    drop(scratch);
    Ok(())
}

fn mode_name(mode: CheckpointMode) -> &'static str {
    match mode {
        CheckpointMode::Incremental => "incremental",
        CheckpointMode::Full => "full",
    }
}

fn fmt_cpu(secs: Option<f64>) -> String {
    secs.map_or_else(|| "n/a".into(), |s| format!("{s:.1}"))
}

/// Everything the runs share.
struct Env<'a> {
    b: &'a ClusterBench,
    exe: PathBuf,
    nats: NatsCluster,
    broker: SocketAddr,
    dir: PathBuf,
    runs: usize,
    /// `cluster.checkpoint` of the aggregators started next.
    mode: CheckpointMode,
}

/// Figures of one throughput run.
struct Throughput {
    summaries: u64,
    secs: f64,
    rate: f64,
    checkpoints: u64,
    checkpoint_bytes: u64,
    /// Summaries applied as new.
    applied: u64,
    resent: u64,
    settle: Duration,
    cpu: Cpu,
    /// What should not happen in a steady run and did: counters that moved (`name +delta`), such
    /// as partitions lost and re-taken mid-run or records for partitions not owned, and summaries
    /// applied more than once.
    trouble: Vec<String>,
}

/// CPU seconds spent during a run, by kind of process (`None` without `/proc`).
struct Cpu {
    aggregators: Option<f64>,
    nats: Option<f64>,
    bench: Option<f64>,
}

/// Figures of the failover run.
struct Failover {
    owned: Duration,
    acked: Duration,
    victim_partitions: usize,
    published: u64,
    resent: u64,
    /// Partitions the survivors lost mid-run (they should only gain the victim's).
    survivors_lost: u64,
}

impl Env<'_> {
    /// A fresh prefix (hence fresh buckets) per run.
    fn next_prefix(&mut self) -> String {
        self.runs += 1;
        format!("ewbench-{}-r{}", std::process::id(), self.runs)
    }

    /// Starts `n` aggregators one after the other and waits until each owns exactly the
    /// partitions it wins by rendezvous hashing over all of them.
    async fn members(&self, prefix: &str, n: usize) -> anyhow::Result<(Vec<AggProc>, Duration)> {
        let mut aggs = Vec::with_capacity(n);
        for i in 1..=n {
            aggs.push(
                self.spawn_aggregator(prefix, &format!("{prefix}-agg{i}"))
                    .await?,
            );
        }
        let t = Instant::now();
        let ids: Vec<String> = aggs.iter().map(|a| a.id.clone()).collect();
        let deadline = t + Duration::from_secs(60);
        loop {
            let mut settled = true;
            let mut report = Vec::new();
            for a in &mut aggs {
                a.alive()?;
                let owned = owned(a.http).await.unwrap_or_default();
                let want = wanted(PARTITIONS, &ids, &a.id);
                report.push(format!("{} owns {} of {}", a.id, owned.len(), want.len()));
                settled &= owned == want;
            }
            if settled {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "ownership did not settle within 60 s ({}); last log lines of the first aggregator:\n{}",
                    report.join(", "),
                    tail(&aggs[0].log, 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let settle = t.elapsed();
        // Subscriptions follow ownership without waiting for the broker's SubAck.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok((aggs, settle))
    }

    async fn throughput(&mut self, n: usize, per_lane: u64) -> anyhow::Result<Throughput> {
        let prefix = self.next_prefix();
        let (aggs, settle) = self.members(&prefix, n).await?;
        let before = scrape_all(&aggs).await?;
        let cpu_before = self.cpu(&aggs);
        let load = Load::start(self.b, &prefix, self.broker, Some(per_lane)).await?;
        let start = load.started;
        let summaries = per_lane * self.b.agents as u64 * u64::from(PARTITIONS);
        let limit = Duration::from_secs(120 + summaries / 1_000);
        let (resent, _) = match load.finish(limit).await {
            Ok(r) => r,
            Err(e) => bail!("{e:#}\n{}", diagnose(&aggs).await),
        };
        let secs = start.elapsed().as_secs_f64();
        let cpu_after = self.cpu(&aggs);
        let after = scrape_all(&aggs).await?;
        let delta = |i: usize| after[i] - before[i];
        let mut trouble: Vec<String> = (5..COUNTERS.len())
            .filter(|&i| delta(i) > 0)
            .map(|i| format!("{} +{}", COUNTERS[i], delta(i)))
            .collect();
        if delta(2) != summaries {
            trouble.push(format!(
                "{} summaries applied as new for {summaries} published",
                delta(2)
            ));
        }
        if !trouble.is_empty() {
            eprintln!(
                "warning: during the {n}-aggregator run: {}; the figures include it. The aggregators' logs say:\n{}",
                trouble.join(", "),
                log_warnings(&aggs, 3)
            );
        }
        let diff = |a: Option<f64>, b: Option<f64>| Some(a? - b?);
        let cpu = Cpu {
            aggregators: diff(cpu_after.aggregators, cpu_before.aggregators),
            nats: diff(cpu_after.nats, cpu_before.nats),
            bench: diff(cpu_after.bench, cpu_before.bench),
        };
        drop(aggs);
        Ok(Throughput {
            summaries,
            secs,
            rate: summaries as f64 / secs,
            checkpoints: delta(0),
            checkpoint_bytes: delta(1),
            applied: delta(2),
            resent,
            settle,
            cpu,
            trouble,
        })
    }

    async fn failover(&mut self, n: usize) -> anyhow::Result<Failover> {
        let prefix = self.next_prefix();
        let (mut aggs, _) = self.members(&prefix, n).await?;
        let mut victim = aggs.pop().context("the failover run has aggregators")?;
        let before = scrape_all(&aggs).await?;
        let load = Load::start(self.b, &prefix, self.broker, None).await?;
        tokio::time::sleep(FAILOVER_WARMUP).await;
        let victim_partitions = owned(victim.http).await?.len();
        let killed = Instant::now();
        victim.kill();
        load.freeze();
        let survivor = aggs[0].http;
        let dead = victim.id.clone();
        let poll = tokio::spawn(async move {
            loop {
                if let Ok(v) = get_json(survivor, "/api/cluster").await {
                    let unowned = v["unowned"].as_array().map_or(usize::MAX, Vec::len);
                    let healed = v["leases"].as_array().is_some_and(|l| {
                        l.len() == PARTITIONS as usize
                            && l.iter()
                                .all(|l| l["owner"].as_str().is_some_and(|o| o != dead.as_str()))
                    });
                    if unowned == 0 && healed {
                        return killed.elapsed();
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let limit = Duration::from_millis(self.b.lease_ttl_ms * 4) + Duration::from_secs(60);
        let (resent, published) = match load.finish(limit).await {
            Ok(r) => r,
            Err(e) => {
                poll.abort();
                bail!(
                    "{e:#}\n{}\nlast log lines of the survivor {}:\n{}",
                    diagnose(&aggs).await,
                    aggs[0].id,
                    tail(&aggs[0].log, 30)
                );
            }
        };
        let acked = killed.elapsed();
        let owned = match tokio::time::timeout(limit, poll).await {
            Ok(r) => r.context("the ownership poll panicked")?,
            Err(_) => bail!(
                "every lane was acked but /api/cluster never showed every partition owned by a survivor within {limit:?}:\n{}",
                get_json(survivor, "/api/cluster").await.map_or_else(|e| e.to_string(), |v| v.to_string())
            ),
        };
        for a in &mut aggs {
            a.alive()?;
        }
        let after = scrape_all(&aggs).await?;
        let survivors_lost = after[8] - before[8];
        if survivors_lost > 0 {
            eprintln!(
                "warning: the survivors lost {survivors_lost} of their own partitions during the failover run. The aggregators' logs say:\n{}",
                log_warnings(&aggs, 3)
            );
        }
        drop(aggs);
        Ok(Failover {
            owned,
            acked,
            victim_partitions,
            published,
            resent,
            survivors_lost,
        })
    }
}
