//! The delivery sections of `edgewatch bench`: what durable state costs end to end, how fast an
//! outage's backlog drains once the cloud side is back, and how long an agent with a checkpoint
//! takes to resume after a restart.
//!
//! Each section builds its own broker(s), agent and aggregator in this process; durable state goes
//! to a fresh directory under `--dir` (default: the system temp directory), removed afterwards, so
//! the figures are those of that disk. Not measured here: the pipeline alone and feed latency
//! (`mod.rs`), the outbox's own write rate (`agent/benches/outbox.rs`).

use super::{broker, end_to_end, publish_paced, publisher, workload};
use crate::broker::{BrokerConfig, EmbeddedBroker};
use anyhow::{bail, Context};
use edgewatch_agent::outbox::{Outbox, OutboxConfig};
use edgewatch_agent::pipeline::Pipeline;
use edgewatch_agent::{Agent, AgentConfig, AgentError, AgentMetrics};
use edgewatch_aggregator::{Aggregator, AggregatorConfig, AggregatorError};
use rumqttc::QoS;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A directory for one section's sled databases, removed (best effort) when dropped.
pub(super) struct Scratch(pub(super) PathBuf);

impl Scratch {
    pub(super) fn new(base: &Path, label: &str) -> anyhow::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = base.join(format!(
            "edgewatch-bench-{label}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating bench state directory {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("warning: could not remove {}: {e}", self.0.display());
        }
    }
}

/// Section `durability`: the end-to-end run without state (temporary outbox, aggregator state in
/// memory), then with `state.dir` for agent and aggregator (outbox flushed per round, store flushed
/// before acks).
pub(super) async fn durability(readings: u64, base: &Path) -> anyhow::Result<()> {
    let memory = end_to_end(readings, None).await?;
    let scratch = Scratch::new(base, "durability")?;
    let durable = end_to_end(readings, Some(&scratch.0)).await?;
    drop(scratch);
    let overhead = |mem: f64, dur: f64| (mem / dur - 1.0) * 100.0;
    for (what, mem, dur) in [
        (
            "processed by the agent",
            memory.ingest_per_sec,
            durable.ingest_per_sec,
        ),
        (
            "acked by the aggregator",
            memory.delivered_per_sec,
            durable.delivered_per_sec,
        ),
    ] {
        println!(
            "durability, {what}: {mem:>10.0} readings/s without state.dir, {dur:>10.0} with (overhead {:+.1} %; {readings} readings)",
            overhead(mem, dur)
        );
    }
    Ok(())
}

/// An agent or aggregator task.
type Task<E> = JoinHandle<Result<(), E>>;

fn spawn_agent(
    cfg: AgentConfig,
) -> anyhow::Result<(Arc<AgentMetrics>, CancellationToken, Task<AgentError>)> {
    let agent = Agent::new(cfg)?;
    let metrics = agent.metrics();
    let stop = CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(agent.run(async move { s.cancelled().await }));
    Ok((metrics, stop, task))
}

async fn spawn_aggregator(
    port: u16,
    state: Option<PathBuf>,
) -> anyhow::Result<(CancellationToken, Task<AggregatorError>)> {
    let mut cfg = AggregatorConfig::with_id("bench-agg");
    cfg.mqtt.port = port;
    cfg.http.listen = "127.0.0.1:0".into();
    cfg.state.dir = state;
    let agg = Aggregator::bind(cfg).await?;
    let stop = CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(agg.run(async move { s.cancelled().await }));
    Ok((stop, task))
}

async fn stop<E: std::error::Error + Send + Sync + 'static>(
    token: CancellationToken,
    task: Task<E>,
) -> anyhow::Result<()> {
    token.cancel();
    task.await.context("task panicked")??;
    Ok(())
}

/// Polls `cond` every millisecond until it holds; the elapsed time since `since`.
async fn wait_for(
    what: &str,
    since: Instant,
    timeout: Duration,
    mut cond: impl FnMut() -> bool,
) -> anyhow::Result<Duration> {
    while !cond() {
        if since.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(since.elapsed())
}

/// Section `drain`: an agent with `state.dir` processes `readings` while its uplink broker is down;
/// then the cloud side (embedded broker on the uplink port, aggregator with `state.dir`) starts and
/// the backlog drains at `rate` records/s.
pub(super) async fn drain(readings: usize, rate: u64, base: &Path) -> anyhow::Result<()> {
    let scratch = Scratch::new(base, "drain")?;
    let source = broker()?;
    // Reserved, then released: nothing listens there until the cloud side starts.
    let uplink_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut cfg = AgentConfig::with_id("bench-drain");
    cfg.source.mqtt.port = source.addr().port();
    let mut up = cfg.source.mqtt.clone();
    up.port = uplink_port;
    cfg.uplink.mqtt = Some(up);
    cfg.uplink.drain_records_per_sec = rate;
    cfg.state.dir = Some(scratch.0.join("agent"));
    let (m, stop_agent, agent) = spawn_agent(cfg)?;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // One reading per series every 10 s of event time: a 60 s window closes every 6 readings.
    let data = workload(readings, 1_000, 10_000)?.readings;
    let built = Instant::now();
    publish_paced(&publisher(&source, "bench-drain-pub"), &data, &m).await?;
    let produced = || m.windows_total.load(Relaxed) + m.anomalies_total.load(Relaxed);
    wait_for(
        "the outbox to hold every record",
        built,
        Duration::from_secs(60),
        || m.outbox_records.load(Relaxed) >= produced(),
    )
    .await?;
    let build_secs = built.elapsed().as_secs_f64();
    let backlog = m.outbox_records.load(Relaxed);
    if backlog == 0 {
        bail!("{readings} readings closed no window, so there is no backlog to drain: raise --drain-readings (about 7,000 per 1,000 records)");
    }
    let (drained_before, resends_before) = (
        m.drained_records_total.load(Relaxed),
        m.resends_total.load(Relaxed),
    );

    let start = Instant::now();
    let cloud = EmbeddedBroker::start(&BrokerConfig {
        listen: format!("127.0.0.1:{uplink_port}"),
        ..BrokerConfig::default()
    })?;
    let (stop_agg, agg) = spawn_aggregator(uplink_port, Some(scratch.0.join("aggregator"))).await?;
    let limit = Duration::from_secs(120);
    let reconnect = wait_for("the uplink to reconnect", start, limit, || {
        m.uplink_connected.load(Relaxed) == 1
    })
    .await?;
    let drained = wait_for("the backlog to drain", start, limit, || {
        m.outbox_records.load(Relaxed) == 0
    })
    .await?;
    let drain_secs = (drained - reconnect).as_secs_f64();
    println!(
        "drain at drain_records_per_sec {rate}: backlog {backlog} records ({readings} readings, built in {build_secs:.1} s); reconnect {:.2} s after the cloud started; drained in {drain_secs:.2} s = {:.0} records/s ({} drained, {} go-back-N resends)",
        reconnect.as_secs_f64(),
        backlog as f64 / drain_secs.max(1e-9),
        m.drained_records_total.load(Relaxed) - drained_before,
        m.resends_total.load(Relaxed) - resends_before,
    );
    stop(stop_agent, agent).await?;
    stop(stop_agg, agg).await?;
    drop((cloud, source, scratch));
    Ok(())
}

/// Section `restart`: an agent with `state.dir` processes `per_series` readings of each of `series`
/// series and stops cleanly (final checkpoint); then a new agent on the same directory starts.
/// Timed from `Agent::run`: pipeline restored (the `series` gauge), uplink connected, first reading
/// processed. Also timed alone: `Outbox::open` on that directory and `Pipeline::restore` of the
/// snapshot.
pub(super) async fn restart(series: usize, per_series: usize, base: &Path) -> anyhow::Result<()> {
    let scratch = Scratch::new(base, "restart")?;
    let b = broker()?;
    let (stop_agg, agg) = spawn_aggregator(b.addr().port(), None).await?;
    let mut cfg = AgentConfig::with_id("bench-restart");
    cfg.source.mqtt.port = b.addr().port();
    cfg.state.dir = Some(scratch.0.join("agent"));
    let data = workload(series * per_series, series, 1000)?.readings;

    let (m, stop_agent, agent) = spawn_agent(cfg.clone())?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    publish_paced(&publisher(&b, "bench-restart-pub"), &data, &m).await?;
    let stopping = Instant::now();
    stop(stop_agent, agent).await?;
    let stop_secs = stopping.elapsed().as_secs_f64();

    // The new agent sees a reading every 2 ms on a known series, from its start on.
    let (topic, last_ts) = data
        .last()
        .map(|(t, p)| (t.clone(), ts_of(p)))
        .context("the restart section needs at least one reading")?;
    let pump = publisher(&b, "bench-restart-pump");
    let pumping = CancellationToken::new();
    let pump_task = {
        let pumping = pumping.clone();
        tokio::spawn(async move {
            let mut ts = last_ts.unwrap_or(0);
            let mut tick = tokio::time::interval(Duration::from_millis(2));
            while !pumping.is_cancelled() {
                tick.tick().await;
                ts += 1;
                let payload = format!(r#"{{"ts":{ts},"value":20.0}}"#);
                if pump
                    .publish(topic.clone(), QoS::AtMostOnce, false, payload)
                    .await
                    .is_err()
                {
                    break;
                }
            }
        })
    };
    let start = Instant::now();
    let (m, stop_agent, agent) = spawn_agent(cfg.clone())?;
    let limit = Duration::from_secs(30);
    let restored = wait_for("the pipeline to be restored", start, limit, || {
        m.series.load(Relaxed) >= series as u64
    })
    .await?;
    let connected = wait_for("the uplink to connect", start, limit, || {
        m.uplink_connected.load(Relaxed) == 1
    })
    .await?;
    let first = wait_for("a first reading", start, limit, || {
        m.readings_total.load(Relaxed) > 0
    })
    .await?;
    pumping.cancel();
    let _ = pump_task.await;
    stop(stop_agent, agent).await?;
    stop(stop_agg, agg).await?;
    println!(
        "restart with {series} series ({per_series} readings each): pipeline restored {:.1} ms, uplink connected {:.1} ms, first reading processed {:.1} ms after Agent::run (clean stop before took {stop_secs:.2} s)",
        ms(restored),
        ms(connected),
        ms(first)
    );

    // The two steps alone, on the directory the agents left behind.
    let dir = scratch.0.join("agent");
    let ocfg = OutboxConfig {
        max_outbox_bytes: cfg.uplink.max_outbox_bytes,
        normal_score_below: cfg.threshold(),
    };
    let (open, checkpoint_bytes) = tokio::task::spawn_blocking(move || {
        // sled releases the directory lock from background threads shortly after the last handle
        // goes; open_db waits for it, which is not what is measured here.
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        let outbox = Outbox::open(&dir, ocfg)?;
        let open = t.elapsed();
        let bytes = outbox.checkpoint_bytes();
        anyhow::Ok((open, bytes))
    })
    .await??;
    let (snapshot_len, restore) = pipeline_restore(&cfg, &data)?;
    println!(
        "restart steps alone: Outbox::open {:.1} ms (stored checkpoint {checkpoint_bytes} bytes); Pipeline::restore of {series} series {:.1} ms (snapshot {snapshot_len} bytes)",
        ms(open),
        ms(restore)
    );
    drop((b, scratch));
    Ok(())
}

/// Snapshot size and the best of five `Pipeline::restore` times, after `data` went through a
/// pipeline in process.
fn pipeline_restore(
    cfg: &AgentConfig,
    data: &[(String, Vec<u8>)],
) -> anyhow::Result<(usize, Duration)> {
    let metrics = Arc::new(AgentMetrics::default());
    let mut p = Pipeline::new(cfg, metrics.clone())?;
    let mut sink = Vec::new();
    let arrival = super::wall_ms();
    for (topic, payload) in data {
        let _ = p.handle_topic(topic, payload, arrival);
        p.drain_outputs_into(&mut sink);
        sink.clear();
    }
    let snapshot = p.snapshot()?;
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let restored = Pipeline::restore(cfg, metrics.clone(), &snapshot)?;
        best = best.min(t.elapsed());
        if restored.series() != p.series() {
            bail!("restored {} series of {}", restored.series(), p.series());
        }
    }
    Ok((snapshot.len(), best))
}

fn ts_of(payload: &[u8]) -> Option<i64> {
    serde_json::from_slice::<serde_json::Value>(payload)
        .ok()?
        .get("ts")?
        .as_i64()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
