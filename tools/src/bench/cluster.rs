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

use super::delivery::Scratch;
use crate::broker::{BrokerConfig, EmbeddedBroker};
use anyhow::{bail, Context};
use edgewatch_aggregator::cluster::{wanted, ClusterConfig};
use edgewatch_aggregator::AggregatorConfig;
use edgewatch_models::partition::partition_of;
use edgewatch_models::wire::{AckBatch, Batch, Sequenced, Topics, WindowSummary};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

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

/// `nats-server` from `PATH`, `/usr/sbin` or `/sbin`.
pub(super) fn find_nats_server() -> Option<PathBuf> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .filter(|d| !d.is_empty())
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join("nats-server"))
        .find(|p| p.is_file())
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
    };
    let mut first: Option<(usize, f64)> = None;
    for &n in &b.aggregators {
        let r = env.throughput(n, per_lane).await?;
        let (n0, rate0) = *first.get_or_insert((n, r.rate));
        let plural = |n: usize| if n == 1 { "" } else { "s" };
        println!(
            "cluster throughput, {n} aggregator{}: {:>10.0} summaries/s = {:>11.0} readings/s (each summary stands for {READINGS_PER_WINDOW}); {:.1} checkpoint writes/s, {:.2} MB/s checkpointed ({:.1} KB per write); {} summaries, first publish to last ack {:.2} s, {} resent; x{:.2} vs {n0} aggregator{}; CPU s: aggregators {}, nats-server {}, bench process {} of {:.1} s x {cores} cores; settled in {:.1} s{}",
            plural(n),
            r.rate,
            r.rate * READINGS_PER_WINDOW as f64,
            r.checkpoints as f64 / r.secs,
            r.checkpoint_bytes as f64 / r.secs / 1e6,
            r.checkpoint_bytes as f64 / r.checkpoints.max(1) as f64 / 1e3,
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
}

/// Figures of one throughput run.
struct Throughput {
    summaries: u64,
    secs: f64,
    rate: f64,
    checkpoints: u64,
    checkpoint_bytes: u64,
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

    async fn spawn_aggregator(&self, prefix: &str, id: &str) -> anyhow::Result<AggProc> {
        let mut cfg = AggregatorConfig::with_id(id);
        cfg.mqtt.host = self.broker.ip().to_string();
        cfg.mqtt.port = self.broker.port();
        cfg.prefix = prefix.into();
        cfg.partitions = PARTITIONS;
        cfg.http.listen = "127.0.0.1:0".into();
        let mut c = ClusterConfig::nats(self.nats.urls.clone());
        c.lease_ttl_ms = self.b.lease_ttl_ms;
        c.heartbeat_ms = self.b.heartbeat_ms();
        c.checkpoint_interval_ms = self.b.checkpoint_ms;
        cfg.cluster = Some(c);
        let yaml = self.dir.join(format!("{id}.yaml"));
        std::fs::write(
            &yaml,
            serde_norway::to_string(&cfg).context("writing an aggregator's YAML")?,
        )
        .with_context(|| format!("writing {}", yaml.display()))?;
        let log = self.dir.join(format!("{id}.log"));
        let mut child = Command::new(&self.exe)
            .arg("aggregator")
            .arg("--config")
            .arg(&yaml)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {} aggregator", self.exe.display()))?;
        // The aggregator prints its feed URL (ws://ADDR/feed) once bound; the HTTP API is on ADDR.
        let stdout = child.stdout.take().context("aggregator stdout")?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        let mut proc = AggProc {
            id: id.to_string(),
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            child,
            log,
        };
        let line = match tokio::time::timeout(Duration::from_secs(30), rx).await {
            Ok(Ok(line)) => line,
            _ => bail!(
                "aggregator {id} did not start ({}); its log:\n{}",
                proc.child
                    .try_wait()
                    .ok()
                    .flatten()
                    .map_or("still running after 30 s".into(), |s| s.to_string()),
                tail(&proc.log, 30)
            ),
        };
        proc.http = line
            .trim()
            .strip_prefix("ws://")
            .and_then(|s| s.strip_suffix("/feed"))
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("aggregator {id} printed {line:?}, not its feed URL"))?;
        Ok(proc)
    }

    fn cpu(&self, aggs: &[AggProc]) -> Cpu {
        let sum = |pids: &mut dyn Iterator<Item = u32>| -> Option<f64> {
            pids.map(|p| cpu_secs(&p.to_string())).sum()
        };
        Cpu {
            aggregators: sum(&mut aggs.iter().map(|a| a.child.id())),
            nats: sum(&mut self.nats.nodes.iter().map(|n| n.child.id())),
            bench: cpu_secs("self"),
        }
    }
}

/// User + system CPU seconds of process `pid` (a number or `self`), from `/proc`.
fn cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), from field 3 (state) on.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux architecture edgewatch builds for.
    Some(ticks as f64 / 100.0)
}

/// The partitions an aggregator owns, per its `/api/status`.
async fn owned(http: SocketAddr) -> anyhow::Result<Vec<u32>> {
    let v = get_json(http, "/api/status").await?;
    v["owned"]
        .as_array()
        .context("/api/status has no owned list")?
        .iter()
        .map(|p| {
            p.as_u64()
                .map(|p| p as u32)
                .context("a partition is not a number")
        })
        .collect()
}

/// Counters scraped from every aggregator's `/metrics` (without the `edgewatch_aggregator_`
/// prefix), in the order of [`scrape_all`]'s result.
const COUNTERS: [&str; 10] = [
    "checkpoints_total",
    "checkpoint_bytes_total",
    "summaries_applied_total",
    "summaries_received_total",
    "summaries_duplicate_total",
    "misrouted_total",
    "bad_messages_total",
    "checkpoint_errors_total",
    "partitions_lost_total",
    "connection_errors_total",
];

/// The [`COUNTERS`] of every aggregator, summed.
async fn scrape_all(aggs: &[AggProc]) -> anyhow::Result<[u64; COUNTERS.len()]> {
    let mut out = [0u64; COUNTERS.len()];
    for a in aggs {
        let (status, body) = http_get(a.http, "/metrics").await?;
        if status != 200 {
            bail!("GET /metrics of {}: HTTP {status}", a.id);
        }
        for (i, short) in COUNTERS.iter().enumerate() {
            let name = format!("edgewatch_aggregator_{short}");
            out[i] += body
                .lines()
                .find(|l| {
                    l.strip_prefix(name.as_str())
                        .is_some_and(|rest| rest.starts_with(['{', ' ']))
                })
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .with_context(|| format!("{name} not in /metrics of {}", a.id))?
                as u64;
        }
    }
    Ok(out)
}

/// What the aggregators say about ownership and lanes, for an error message.
async fn diagnose(aggs: &[AggProc]) -> String {
    let mut out = Vec::new();
    for a in aggs {
        let line = match get_json(a.http, "/api/status").await {
            Ok(v) => {
                let behind: Vec<String> = v["lane_progress"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|l| l["waiting"].as_u64().unwrap_or(0) > 0)
                    .take(5)
                    .map(|l| l.to_string())
                    .collect();
                format!(
                    "{}: owns {} partitions, applied {}, duplicates {}, bad messages {}, lanes waiting behind a hole (first 5): {behind:?}",
                    a.id,
                    v["owned"].as_array().map_or(0, Vec::len),
                    v["summaries_applied"],
                    v["summaries_duplicate"],
                    v["bad_messages"],
                )
            }
            Err(e) => format!("{}: /api/status failed: {e:#}", a.id),
        };
        out.push(line);
    }
    out.join("\n")
}

/// A plain HTTP/1.1 GET on loopback: (status, body).
async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let get = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        anyhow::Ok(String::from_utf8_lossy(&raw).into_owned())
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), get)
        .await
        .with_context(|| format!("GET http://{addr}{path} timed out"))?
        .with_context(|| format!("GET http://{addr}{path}"))?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .with_context(|| format!("GET http://{addr}{path}: not an HTTP response"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("GET http://{addr}{path}: no status code"))?;
    Ok((status, body.to_string()))
}

async fn get_json(addr: SocketAddr, path: &str) -> anyhow::Result<serde_json::Value> {
    let (status, body) = http_get(addr, path).await?;
    if status != 200 {
        bail!("GET http://{addr}{path}: HTTP {status}: {body}");
    }
    serde_json::from_str(&body).with_context(|| format!("GET http://{addr}{path}: not JSON"))
}

/// The last `n` lines of a log file.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Every aggregator's count of WARN and ERROR log lines and its first `n` of them (colour codes
/// removed), one aggregator per paragraph.
fn log_warnings(aggs: &[AggProc], n: usize) -> String {
    let mut out = Vec::new();
    for a in aggs {
        let text = std::fs::read_to_string(&a.log).unwrap_or_default();
        let warnings: Vec<String> = text
            .lines()
            .map(strip_ansi)
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect();
        if warnings.is_empty() {
            continue;
        }
        out.push(format!(
            "  {}: {} warnings, the first {}:\n    {}",
            a.id,
            warnings.len(),
            n.min(warnings.len()),
            warnings[..n.min(warnings.len())].join("\n    ")
        ));
    }
    out.join("\n")
}

/// `line` without ANSI colour sequences (`ESC [ ... m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A child process, killed (SIGKILL) and reaped on drop.
struct Proc {
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An aggregator child process, killed on drop.
struct AggProc {
    id: String,
    http: SocketAddr,
    child: Child,
    log: PathBuf,
}

impl AggProc {
    /// SIGKILL (`Child::kill` on Unix), then reap.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// An error with its log if it has exited.
    fn alive(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(Some(status)) => bail!(
                "aggregator {} exited ({status}); its log:\n{}",
                self.id,
                tail(&self.log, 30)
            ),
            _ => Ok(()),
        }
    }
}

impl Drop for AggProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three nats-server nodes with JetStream, clustered on loopback.
struct NatsCluster {
    nodes: Vec<Proc>,
    urls: Vec<String>,
    version: String,
}

impl NatsCluster {
    async fn start(bin: &Path, dir: &Path) -> anyhow::Result<Self> {
        let version = Command::new(bin)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let version = if version.is_empty() {
            "nats-server".to_string()
        } else {
            version.replace(": v", " v")
        };
        struct Ports {
            client: u16,
            route: u16,
            monitor: u16,
            mqtt: u16,
        }
        let ports = (0..3)
            .map(|_| {
                Ok(Ports {
                    client: free_port()?,
                    route: free_port()?,
                    monitor: free_port()?,
                    mqtt: free_port()?,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let routes = ports
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{}", p.route))
            .collect::<Vec<_>>()
            .join(", ");
        let mut nodes = Vec::new();
        let mut logs = Vec::new();
        for (i, p) in ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let conf = dir.join(format!("{name}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "server_name: {name}\nlisten: 127.0.0.1:{}\nhttp: 127.0.0.1:{}\n\
                     jetstream {{ store_dir: {:?}, max_memory_store: 256MB, max_file_store: 2GB }}\n\
                     cluster {{\n  name: edgewatch-bench\n  listen: 127.0.0.1:{}\n  routes: [ {routes} ]\n}}\n\
                     mqtt {{ listen: 127.0.0.1:{} }}\n",
                    p.client,
                    p.monitor,
                    dir.join(&name).display().to_string(),
                    p.route,
                    p.mqtt
                ),
            )?;
            let log = dir.join(format!("{name}.log"));
            let child = Command::new(bin)
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?)
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            nodes.push(Proc { child });
            logs.push(log);
        }
        let mut cluster = Self {
            nodes,
            urls: ports
                .iter()
                .map(|p| format!("nats://127.0.0.1:{}", p.client))
                .collect(),
            version,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        for (i, p) in ports.iter().enumerate() {
            let addr = SocketAddr::from(([127, 0, 0, 1], p.monitor));
            loop {
                if let Ok(Some(status)) = cluster.nodes[i].child.try_wait() {
                    bail!(
                        "nats-server n{} exited ({status}):\n{}",
                        i + 1,
                        tail(&logs[i], 30)
                    );
                }
                if matches!(http_get(addr, "/healthz").await, Ok((200, _))) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "nats-server n{} not healthy on {addr} within 30 s:\n{}",
                        i + 1,
                        tail(&logs[i], 30)
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(cluster)
    }
}

/// A free loopback port (reserved, then released: the caller binds it soon after).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The acks one synthetic agent has received and the seqs it has published, per partition.
struct Lanes {
    acked: Vec<AtomicU64>,
    published: Vec<AtomicU64>,
    progress: Notify,
}

/// The synthetic agents of one run.
struct Load {
    publishers: Vec<JoinHandle<anyhow::Result<u64>>>,
    loops: Vec<JoinHandle<()>>,
    lanes: Vec<Arc<Lanes>>,
    freeze: CancellationToken,
    /// When the first publisher started.
    started: Instant,
}

/// How one synthetic agent publishes.
#[derive(Clone)]
struct Spec {
    prefix: String,
    agent: String,
    batch: u64,
    window: u64,
    /// Records per lane, or unbounded until frozen.
    per_lane: Option<u64>,
    ack_timeout: Duration,
    /// Devices of each partition's lane.
    devices: Arc<Vec<Vec<String>>>,
}

impl Load {
    /// Connects the synthetic agents, waits for their ack subscriptions, and starts publishing.
    async fn start(
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
    fn freeze(&self) {
        self.freeze.cancel();
    }

    /// Records published so far (highest seq of every lane, summed).
    fn published(&self) -> u64 {
        self.lanes
            .iter()
            .flat_map(|l| l.published.iter())
            .map(|p| p.load(Relaxed))
            .sum()
    }

    /// Waits until every lane is acknowledged up to its last seq; (records resent, records
    /// published).
    async fn finish(mut self, limit: Duration) -> anyhow::Result<(u64, u64)> {
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
fn devices(agent: &str) -> Vec<Vec<String>> {
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
fn summary(devices: &[String], seq: u64) -> WindowSummary {
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
async fn publish_lanes(
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
