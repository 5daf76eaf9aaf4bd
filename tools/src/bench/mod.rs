//! `edgewatch bench`: figures anyone can reproduce on their own machine — the agent pipeline's
//! in-process throughput on one core, end-to-end throughput through the embedded broker, the latency
//! from a sensor publish to the anomaly event on the feed, the delivery figures of
//! [`delivery`]: the cost of durable state, the backlog drain after an outage, and restart time,
//! and the figures of [`cluster`]: aggregators in cluster mode on a 3-node NATS cluster
//! (throughput with 1–3 aggregators, failover after a SIGKILL).
//!
//! Run it from a release build (`cargo run --release -- bench`); debug builds are 10–50× slower.

mod cluster;
mod delivery;
mod ingest;
mod latency;
mod memory;

pub use ingest::IngestBroker;

use crate::broker::{BrokerConfig, EmbeddedBroker};
use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use edgewatch_agent::outbox::{Outbox, OutboxConfig, Record};
use edgewatch_agent::pipeline::{Output, Pipeline};
use edgewatch_agent::{Agent, AgentConfig, AgentMetrics};
use edgewatch_aggregator::{Aggregator, AggregatorConfig};
use edgewatch_models::detect::DetectorConfig;
use edgewatch_models::multi::{Aligner, FitOptions, PcaModel};
use edgewatch_models::wire::{model_key, WindowSummary};
use edgewatch_simulators::{Fleet, SimulatorConfig};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Arguments of `edgewatch bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Sections to run (repeatable; default: all of them, in this order).
    #[arg(long = "section", value_enum)]
    pub sections: Vec<Section>,
    /// Readings replayed through the in-process pipeline.
    #[arg(long, default_value_t = 2_000_000)]
    pub readings: usize,
    /// Series the readings are spread over.
    #[arg(long, default_value_t = 1_000)]
    pub series: usize,
    /// Readings published through the embedded broker for the end-to-end figure.
    #[arg(long, default_value_t = 500_000)]
    pub e2e_readings: u64,
    /// Options of the latency section.
    #[command(flatten)]
    pub latency: latency::LatencyArgs,
    /// Detector presets to bench in process (default: the default detector and zscore).
    #[arg(long)]
    pub detector: Vec<String>,
    /// Only the in-process pipeline (same as `--section pipeline`).
    #[arg(long)]
    pub in_process_only: bool,
    /// Readings per end-to-end run of the durability section (one run without state.dir, one with).
    #[arg(long, default_value_t = 500_000)]
    pub durability_readings: u64,
    /// Readings processed while the uplink is down in the drain section (1,000 series, one reading
    /// per series every 10 s of event time: about one outbox record per 6 readings).
    #[arg(long, default_value_t = 200_000)]
    pub drain_readings: usize,
    /// `uplink.drain_records_per_sec` values to drain the backlog at (default: the configuration's
    /// default, then 100000 to show the ceiling).
    #[arg(long)]
    pub drain_rate: Vec<u64>,
    /// Series in the checkpoint of the restart section.
    #[arg(long, default_value_t = 1_000)]
    pub restart_series: usize,
    /// Readings per series before the restart.
    #[arg(long, default_value_t = 50)]
    pub restart_readings_per_series: usize,
    /// Where the durable sections keep their sled databases and the cluster section its NATS
    /// servers' JetStream store (a fresh directory inside it, removed afterwards); put it on the
    /// disk you want measured. Default: the system temp directory.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Aggregator counts of the cluster throughput runs (repeatable; default 1, 2 and 3).
    #[arg(long)]
    pub cluster_aggregators: Vec<usize>,
    /// Window summaries published per cluster throughput run, spread evenly over every lane
    /// (agent, partition).
    #[arg(long, default_value_t = 2_560_000)]
    pub cluster_summaries: u64,
    /// `cluster.lease_ttl_ms` of the cluster section's aggregators (heartbeat_ms is a sixth of it).
    #[arg(long, default_value_t = 3_000)]
    pub cluster_lease_ttl_ms: u64,
    /// `cluster.checkpoint_interval_ms` of the cluster section's aggregators.
    #[arg(long, default_value_t = 200)]
    pub cluster_checkpoint_ms: u64,
    /// `cluster.checkpoint` modes of the cluster section's throughput runs, each run with every
    /// aggregator count (e.g. `--cluster-checkpoint full --cluster-checkpoint incremental`, to
    /// compare checkpoint bytes per applied summary side by side); default incremental only.
    #[arg(long, value_parser = parse_checkpoint_mode)]
    pub cluster_checkpoint: Vec<edgewatch_aggregator::cluster::config::CheckpointMode>,
    /// Synthetic agents (MQTT clients) of the cluster section; each has a lane per partition.
    #[arg(long, default_value_t = 4)]
    pub cluster_agents: usize,
    /// Records per batch the synthetic agents publish.
    #[arg(long, default_value_t = 200)]
    pub cluster_batch: usize,
    /// The synthetic agents resend a lane's unacknowledged records after this long without ack
    /// progress (the real agent's uplink.ack_timeout_ms defaults to 5000). Part of the failover
    /// figure; too short for the acks' queueing delay on a busy machine, it resends needlessly.
    #[arg(long, default_value_t = 2_000)]
    pub cluster_ack_timeout_ms: u64,
    /// Aggregators of the cluster failover run, one of which is killed (0 skips the run).
    #[arg(long, default_value_t = 3)]
    pub cluster_failover_aggregators: usize,
    /// Series of the memory section (distinct device ids through one pipeline).
    #[arg(long, default_value_t = 20_000)]
    pub memory_series: usize,
    /// Readings per series of the memory section: enough to fill every detector's buffers.
    #[arg(long, default_value_t = 300)]
    pub memory_readings_per_series: usize,
    /// Series fed to the memory section's agent process (`edgewatch agent` with `state.dir`,
    /// through the embedded broker); 0 skips that part.
    #[arg(long, default_value_t = 10_000)]
    pub memory_agent_series: usize,
    /// Readings per series fed to the memory section's agent process.
    #[arg(long, default_value_t = 60)]
    pub memory_agent_readings_per_series: usize,
    /// How long the memory section's agent process is left idle after loading, its RSS sampled.
    #[arg(long, default_value_t = 600)]
    pub memory_idle_secs: u64,
    /// RSS sampling interval of the memory section's idle agent process, seconds.
    #[arg(long, default_value_t = 10)]
    pub memory_sample_secs: u64,
    /// Readings the raw publisher sends per run of the ingest section.
    #[arg(long, default_value_t = 1_000_000)]
    pub ingest_readings: u64,
    /// Series the ingest section's readings are spread over.
    #[arg(long, default_value_t = 1_000)]
    pub ingest_series: usize,
    /// QoS of the ingest section's raw publisher (0 or 1; the subscribers take QoS 1).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub ingest_qos: u8,
    /// Broker of the ingest section (default: mosquitto when installed, else embedded).
    #[arg(long, value_enum)]
    pub ingest_broker: Option<IngestBroker>,
    /// Agent binaries the ingest section runs in turn under the same load (repeatable; default:
    /// this binary), e.g. a build of main, then this one.
    #[arg(long)]
    pub ingest_agent: Vec<PathBuf>,
}

/// A part of `edgewatch bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Section {
    /// In-process pipeline throughput, per detector preset.
    Pipeline,
    /// End-to-end throughput through the embedded broker.
    EndToEnd,
    /// Publish → feed event latency.
    Latency,
    /// End to end without and with `state.dir` (agent and aggregator): the cost of durability.
    Durability,
    /// Backlog built while the uplink is down, then drained once the cloud side starts.
    Drain,
    /// Restart of an agent with a checkpoint: outbox open, pipeline restore, first reading.
    Restart,
    /// Agent memory and checkpoint bytes per series, per detector preset (the README's limits),
    /// then an agent process with `state.dir` loaded with series and its RSS while idle.
    Memory,
    /// Aggregators in cluster mode on a 3-node NATS cluster (needs nats-server): throughput with
    /// 1, 2 and 3 aggregators, and failover after a SIGKILL. Skipped, with a note, by a run of
    /// every section when nats-server is not installed.
    Cluster,
    /// Agent CPU per reading through a real broker (mosquitto by default) next to the broker's
    /// own forwarding rate, the agent running as a child process.
    Ingest,
}

/// Runs the selected benchmarks and prints the figures.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build; figures will be far below a release build's (cargo run --release -- bench)");
    }
    let every_section = args.sections.is_empty() && !args.in_process_only;
    let mut sections = if args.in_process_only {
        vec![Section::Pipeline]
    } else if args.sections.is_empty() {
        Section::value_variants().to_vec()
    } else {
        args.sections.clone()
    };
    sections.sort();
    sections.dedup();
    println!(
        "edgewatch bench ({} cores visible, load average {})",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        load_average()
    );
    if sections.contains(&Section::Pipeline) {
        pipeline_section(&args)?;
    }
    if sections.contains(&Section::Memory) {
        memory_section(&args)?;
        if args.memory_agent_series > 0 {
            let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
            let run = memory::ProcessRun {
                series: args.memory_agent_series,
                readings_per_series: args.memory_agent_readings_per_series,
                idle_secs: args.memory_idle_secs,
                sample_secs: args.memory_sample_secs,
                wrapper: std::env::var(memory::WRAPPER_ENV)
                    .ok()
                    .filter(|w| !w.trim().is_empty()),
            };
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(memory::agent_process(&run, &base))?;
        }
    }
    if sections
        .iter()
        .all(|s| matches!(s, Section::Pipeline | Section::Memory))
    {
        return Ok(());
    }
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        for section in sections {
            match section {
                Section::Pipeline | Section::Memory => {}
                Section::EndToEnd => {
                    let r = end_to_end(args.e2e_readings, None).await?;
                    println!(
                        "end to end via embedded broker: {:>12.0} readings/s (simulator publish -> agent -> summaries applied; {} readings)",
                        r.ingest_per_sec, args.e2e_readings
                    );
                }
                Section::Latency => latency::run(&args.latency, &base).await?,
                Section::Durability => delivery::durability(args.durability_readings, &base).await?,
                Section::Drain => {
                    let rates = if args.drain_rate.is_empty() {
                        vec![
                            edgewatch_agent::config::UplinkConfig::default().drain_records_per_sec,
                            100_000,
                        ]
                    } else {
                        args.drain_rate.clone()
                    };
                    for rate in rates {
                        delivery::drain(args.drain_readings, rate, &base).await?;
                    }
                }
                Section::Restart => {
                    delivery::restart(args.restart_series, args.restart_readings_per_series, &base)
                        .await?
                }
                Section::Cluster => {
                    if every_section && cluster::find_nats_server().is_none() {
                        println!("cluster: skipped (nats-server not found on PATH or in /usr/sbin; apt-get install -y nats-server, then run --section cluster)");
                        continue;
                    }
                    let b = cluster::ClusterBench {
                        aggregators: if args.cluster_aggregators.is_empty() {
                            vec![1, 2, 3]
                        } else {
                            args.cluster_aggregators.clone()
                        },
                        summaries: args.cluster_summaries,
                        lease_ttl_ms: args.cluster_lease_ttl_ms,
                        checkpoint_ms: args.cluster_checkpoint_ms,
                        checkpoint_modes: if args.cluster_checkpoint.is_empty() {
                            vec![edgewatch_aggregator::cluster::config::CheckpointMode::Incremental]
                        } else {
                            args.cluster_checkpoint.clone()
                        },
                        agents: args.cluster_agents,
                        batch: args.cluster_batch,
                        ack_timeout_ms: args.cluster_ack_timeout_ms,
                        failover_aggregators: args.cluster_failover_aggregators,
                    };
                    cluster::run(&b, &base).await?
                }
                Section::Ingest => {
                    let b = ingest::IngestBench {
                        readings: args.ingest_readings,
                        series: args.ingest_series,
                        qos: args.ingest_qos,
                        broker: args.ingest_broker,
                        agents: args.ingest_agent.clone(),
                        base: base.clone(),
                    };
                    ingest::run(&b).await?
                }
            }
        }
        anyhow::Ok(())
    })
}

/// Runs with models on, each after a run without, in the pipeline section.
const MODELS_ROUNDS: usize = 3;

fn pipeline_section(args: &BenchArgs) -> anyhow::Result<()> {
    let presets = if args.detector.is_empty() {
        vec![None, Some("zscore".to_string())]
    } else {
        args.detector.iter().cloned().map(Some).collect()
    };
    // One workload for every run, so the figures compare the same readings of the same series.
    let data = workload(args.readings, args.series, 1000)?;
    for preset in presets {
        let detector = match &preset {
            None => DetectorConfig::default(),
            Some(name) => DetectorConfig::preset(name).with_context(|| {
                format!(
                    "unknown detector {name:?}; choose from {:?}",
                    DetectorConfig::PRESETS
                )
            })?,
        };
        let label = preset.clone().unwrap_or_else(|| "default".into());
        let run = pipeline_run(detector.clone(), &data.readings, &[])?;
        println!(
            "in-process pipeline [{label}]: {:>12.0} readings/s on one core{} (JSON payload -> score -> window; {} readings, {} series, {} windows; load average {})",
            run.rate,
            per_cpu(&run),
            args.readings,
            data.series,
            run.windows,
            load_average()
        );
        if preset.is_none() {
            // The same readings with a PCA model per device (`models.enabled`), fitted beforehand,
            // alternating with runs without, so both see the same machine; best of each (a shared
            // machine only ever slows a run down).
            let mut without = vec![run.rate];
            let mut without_cpu = vec![run.cpu_rate.unwrap_or(0.0)];
            let mut with_rates = Vec::new();
            let mut with_cpu = Vec::new();
            for round in 0..MODELS_ROUNDS {
                if round > 0 {
                    let again = pipeline_run(detector.clone(), &data.readings, &[])?;
                    without.push(again.rate);
                    without_cpu.push(again.cpu_rate.unwrap_or(0.0));
                }
                let with = pipeline_with_models_on(detector.clone(), &data, args.series)?;
                with_rates.push(with.run.rate);
                with_cpu.push(with.run.cpu_rate.unwrap_or(0.0));
                println!(
                    "in-process pipeline [{label} + models]: {:>12.0} readings/s on one core{} (JSON payload -> score -> window + device model; {} readings, {} series, {} devices of {} metrics, {} device models, {} pca events + {} of {} on the probe; load average {}) — {:.1} % of the run without just before",
                    with.run.rate,
                    per_cpu(&with.run),
                    args.readings,
                    data.series,
                    data.devices.len(),
                    data.metrics.len(),
                    with.models_loaded,
                    with.run.pca_events,
                    with.probe_events,
                    data.devices.len(),
                    load_average(),
                    with.run.rate / without[round] * 100.0
                );
            }
            let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
            println!(
                "in-process pipeline [{label}] with models, best of {MODELS_ROUNDS} alternating runs: {:.0} against {:.0} readings/s without: {:.1} %",
                best(&with_rates),
                best(&without),
                best(&with_rates) / best(&without) * 100.0
            );
            if best(&without_cpu) > 0.0 {
                println!(
                    "in-process pipeline [{label}] with models, per CPU second, best of {MODELS_ROUNDS}: {:.0} against {:.0} without: {:.1} %",
                    best(&with_cpu),
                    best(&without_cpu),
                    best(&with_cpu) / best(&without_cpu) * 100.0
                );
            }
        }
    }
    Ok(())
}

/// Resident memory and checkpoint rows of `--memory-series` series with
/// `--memory-readings-per-series` readings each, per detector (the default and zscore, or
/// `--detector`): what one series costs an agent.
fn memory_section(args: &BenchArgs) -> anyhow::Result<()> {
    let presets = if args.detector.is_empty() {
        vec!["ensemble".to_string(), "zscore".to_string()]
    } else {
        args.detector.clone()
    };
    if presets.len() > 1 {
        // One process per detector: memory freed by one would be reused by the next, hiding it.
        for name in presets {
            let out = std::process::Command::new(std::env::current_exe()?)
                .args(["bench", "--section", "memory", "--detector", &name])
                .arg("--memory-agent-series=0")
                .arg(format!("--memory-series={}", args.memory_series))
                .arg(format!(
                    "--memory-readings-per-series={}",
                    args.memory_readings_per_series
                ))
                .stderr(std::process::Stdio::inherit())
                .output()?;
            if !out.status.success() {
                bail!("memory bench of {name} failed: {}", out.status);
            }
            let text = String::from_utf8_lossy(&out.stdout);
            for line in text.lines().filter(|l| l.starts_with("agent memory")) {
                println!("{line}");
            }
        }
        return Ok(());
    }
    let n = args.memory_series.max(1);
    for name in presets {
        let detector = DetectorConfig::preset(&name).with_context(|| {
            format!(
                "unknown detector {name:?}; choose from {:?}",
                DetectorConfig::PRESETS
            )
        })?;
        let label = if name == "ensemble" {
            "default".to_string()
        } else {
            name
        };
        let mut cfg = AgentConfig::with_id("bench-memory");
        cfg.detector = detector;
        cfg.pipeline.max_series = n;
        let metrics = Arc::new(AgentMetrics::default());
        let before = resident_bytes();
        let mut p = Pipeline::new(&cfg, metrics.clone())?;
        let arrival = wall_ms();
        let t0 = (arrival - 86_400_000) / 60_000 * 60_000;
        let mut payload = String::new();
        let mut topics: Vec<String> = (0..n)
            .map(|i| format!("sensors/device-{i:06}/temperature"))
            .collect();
        let mut sink = Vec::new();
        let mut summaries = Vec::new();
        for r in 0..args.memory_readings_per_series {
            for (i, topic) in topics.iter().enumerate() {
                use std::fmt::Write as _;
                payload.clear();
                let v = 20.0 + ((r * 7 + i) % 17) as f64 * 0.25;
                let _ = write!(payload, r#"{{"ts":{},"value":{v}}}"#, t0 + r as i64 * 1000);
                let _ = p.handle_topic(topic, payload.as_bytes(), arrival);
            }
            p.drain_outputs_into(&mut sink);
            // A sample of the closed windows, stored below for the bytes per outbox record.
            for o in sink.drain(..) {
                if let (Output::Summary { partition, summary }, true) = (o, summaries.len() < 1000)
                {
                    summaries.push((partition, summary));
                }
            }
        }
        topics.clear();
        topics.shrink_to_fit();
        let after = resident_bytes();
        let rows = p.take_changed()?;
        let row_bytes: usize = rows.rows.iter().map(|(_, r)| r.len() + 5).sum();
        let state_bytes = cfg.detector.build()?.state_bytes();
        let record_bytes = outbox_record_bytes(summaries)?;
        if metrics.series.load(Relaxed) != n as u64 {
            bail!("{} series created of {n}", metrics.series.load(Relaxed));
        }
        println!(
            "agent memory [{label}]: {:>6.0} bytes resident per series, {:>5.0} bytes of checkpoint per series, {state_bytes} bytes of detector state per series, {} bytes per open window, {record_bytes:.0} bytes per outbox record (summary, key + value) ({n} series, {} readings each; resident {:.1} -> {:.1} MiB)",
            after.saturating_sub(before) as f64 / n as f64,
            row_bytes as f64 / n as f64,
            std::mem::size_of::<edgewatch_models::window::WindowAggregate>(),
            args.memory_readings_per_series,
            before as f64 / 1048576.0,
            after as f64 / 1048576.0
        );
        drop(p);
    }
    Ok(())
}

/// Key + value bytes per stored summary record: `summaries` appended to a temporary outbox.
fn outbox_record_bytes(summaries: Vec<(u32, WindowSummary)>) -> anyhow::Result<f64> {
    let n = summaries.len();
    if n == 0 {
        return Ok(0.0);
    }
    let mut outbox = Outbox::open_temporary(OutboxConfig {
        max_outbox_bytes: 1 << 30,
        normal_score_below: 0.5,
    })?;
    for (partition, summary) in summaries {
        outbox.append(partition, Record::Summary(summary))?;
    }
    Ok(outbox.bytes() as f64 / n as f64)
}

/// Resident set size of this process, bytes (Linux `/proc/self/statm`; 0 elsewhere).
fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// CPU time this thread has run, ns (Linux `/proc/thread-self/schedstat`; `None` elsewhere).
fn thread_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// " (N per CPU second)" for a run whose CPU time is known, else nothing.
fn per_cpu(run: &PipelineRun) -> String {
    run.cpu_rate
        .map(|r| format!(" ({r:.0} per CPU second)"))
        .unwrap_or_default()
}

/// The 1, 5 and 15 minute load averages (Linux `/proc/loadavg`), as printed there.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

/// The pipeline section's readings: pre-serialised (topic, payload) pairs and what they cover.
struct Workload {
    /// (topic, JSON payload) per reading, in publish order.
    readings: Vec<(String, Vec<u8>)>,
    /// The simulated devices (each publishes every metric).
    devices: Vec<Arc<str>>,
    /// The metrics of every device (the simulator's default pump: 4).
    metrics: Vec<String>,
    /// Distinct series among the readings.
    series: usize,
    /// Event time of the workload's first step, ms.
    start_ms: i64,
    /// Event time of its last reading, ms.
    end_ms: i64,
}

/// Event time of the pipeline workload's first step (2026-01-01 00:00 UTC).
const WORKLOAD_START_MS: i64 = 1_767_225_600_000;

/// The simulator fleet of `series` series: the default pump (4 correlated metrics per device, driven
/// by a hidden load), `series / 4` devices (rounded up), seed 1.
fn workload_fleet(series: usize, interval_ms: u64) -> SimulatorConfig {
    let mut sim = SimulatorConfig::default();
    let metrics = sim.metrics.len();
    sim.devices = series.div_ceil(metrics).max(1);
    sim.seed = 1;
    sim.interval_ms = interval_ms;
    sim
}

/// Pre-serialised (topic, payload) pairs from the simulator's generator, one reading per series
/// every `interval_ms` of event time.
fn workload(readings: usize, series: usize, interval_ms: u64) -> anyhow::Result<Workload> {
    let sim = workload_fleet(series, interval_ms);
    let mut fleet = Fleet::new(&sim, WORKLOAD_START_MS)?;
    let mut out = Vec::with_capacity(readings);
    let mut step = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut end_ms = WORKLOAD_START_MS;
    while out.len() < readings {
        step.clear();
        fleet.step(&mut step);
        for r in step.iter().take(readings - out.len()) {
            let mut payload = Vec::with_capacity(48);
            edgewatch_simulators::payload(r, &mut payload);
            if seen.len() < fleet.series() {
                seen.insert((r.device.clone(), r.metric.clone()));
            }
            end_ms = end_ms.max(r.ts_ms);
            out.push((format!("sensors/{}/{}", r.device, r.metric), payload));
        }
    }
    Ok(Workload {
        readings: out,
        devices: fleet.devices(),
        metrics: fleet.metrics().iter().map(|m| m.to_string()).collect(),
        series: seen.len(),
        start_ms: WORKLOAD_START_MS,
        end_ms,
    })
}

/// Figures of one timed pass of a workload through a [`Pipeline`].
struct PipelineRun {
    /// Readings per second of wall time.
    rate: f64,
    /// Readings per second of the thread's own CPU time (what a shared machine's other work does
    /// not take away; `None` where the OS does not say).
    cpu_rate: Option<f64>,
    /// Windows closed.
    windows: u64,
    /// `pca` events (device models) among the outputs.
    pca_events: u64,
}

/// Replays `data` through a fresh pipeline with `detector`, after offering it `models` (key, PcaModel
/// JSON; none: univariate only) outside the timed part; fails unless every reading was taken and
/// every model loaded.
fn pipeline_run(
    detector: DetectorConfig,
    data: &[(String, Vec<u8>)],
    models: &[(String, Vec<u8>)],
) -> anyhow::Result<PipelineRun> {
    pipeline_run_with(detector, data, models, |_| Ok(()))
}

/// [`pipeline_run`], then `after` on the pipeline (untimed, once the readings are checked).
fn pipeline_run_with(
    detector: DetectorConfig,
    data: &[(String, Vec<u8>)],
    models: &[(String, Vec<u8>)],
    after: impl FnOnce(&mut Pipeline) -> anyhow::Result<()>,
) -> anyhow::Result<PipelineRun> {
    let readings = data.len();
    let mut cfg = AgentConfig::with_id("bench");
    cfg.detector = detector;
    cfg.models.enabled = !models.is_empty();
    let metrics = Arc::new(AgentMetrics::default());
    let mut pipeline = Pipeline::new(&cfg, metrics.clone())?;
    for (key, payload) in models {
        pipeline
            .offer_model(key, payload)
            .map_err(|e| anyhow::anyhow!("device model {key:?} refused: {e}"))?;
    }
    let loaded = metrics.models.load(Relaxed);
    if loaded != models.len() as u64 {
        bail!("{loaded} device models running of {} offered", models.len());
    }
    let mut sink = Vec::new();
    let mut pca_events = 0u64;
    // The workload's timestamps are in the past: arrival now keeps every one within
    // window.max_future_ms.
    let arrival = wall_ms();
    let cpu_start = thread_cpu_ns();
    let start = Instant::now();
    for (topic, payload) in data {
        // Errors cannot happen with simulator payloads; count them anyway so the figure is honest.
        let _ = pipeline.handle_topic(topic, payload, arrival);
        pipeline.drain_outputs_into(&mut sink);
        for o in &sink {
            if matches!(o, Output::Anomaly { event, .. } if event.detector == "pca") {
                pca_events += 1;
            }
        }
        sink.clear();
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu_secs = thread_cpu_ns()
        .zip(cpu_start)
        .map(|(end, start)| end.saturating_sub(start) as f64 / 1e9);
    let ok = metrics.readings_total.load(Relaxed);
    if ok != readings as u64 {
        bail!(
            "pipeline rejected {} of {readings} readings",
            readings as u64 - ok
        );
    }
    let windows = metrics.windows_total.load(Relaxed);
    after(&mut pipeline)?;
    Ok(PipelineRun {
        rate: readings as f64 / secs,
        cpu_rate: cpu_secs.filter(|s| *s > 0.0).map(|s| readings as f64 / s),
        windows,
        pca_events,
    })
}

/// Figures of the pipeline with a device model per device.
struct ModelsRun {
    run: PipelineRun,
    /// Device models running during the run (the pipeline's `models` gauge).
    models_loaded: u64,
    /// Devices whose model raised a `pca` event for a probe reading after the timed part (one
    /// reading 30 standard deviations off per device: proof that the models score the devices'
    /// vectors; a device already in an episode raises none).
    probe_events: u64,
}

/// Commissioning time the device models of the pipeline section are fitted on: the hour before the
/// workload, without anomalies.
const MODELS_TRAIN_MS: i64 = 3_600_000;

/// One PCA model per device of `data` (key, model JSON), fitted on the device's aligned vectors
/// over the hour before the workload (same fleet and seed, anomalies off), as the agent's aligner
/// builds them.
fn fit_device_models(
    data: &Workload,
    series: usize,
    interval_ms: u64,
    cfg: &AgentConfig,
) -> anyhow::Result<Vec<(String, Vec<u8>, PcaModel)>> {
    let mut sim = workload_fleet(series, interval_ms);
    sim.anomalies.rate_per_series_hour = 0.0;
    let from = data.start_ms - MODELS_TRAIN_MS;
    let mut fleet = Fleet::new(&sim, from)?;
    // Sorted, as the aggregator fits them (a class's metrics, the agent's sampled features): the
    // model then scores the aligner the device's training sampler fills.
    let mut features = data.metrics.clone();
    features.sort_unstable();
    let align = cfg.models.align();
    let index: HashMap<Arc<str>, usize> = data
        .devices
        .iter()
        .enumerate()
        .map(|(i, d)| (d.clone(), i))
        .collect();
    let mut aligners = data
        .devices
        .iter()
        .map(|_| Aligner::new(&features, &align))
        .collect::<Result<Vec<_>, _>>()?;
    let mut rows: Vec<Vec<f64>> = vec![Vec::new(); data.devices.len()];
    let mut step = Vec::new();
    while fleet.now_ms() < data.start_ms {
        step.clear();
        fleet.step(&mut step);
        for r in &step {
            let (Some(&d), Some(slot)) = (
                index.get(&r.device),
                features.iter().position(|f| **f == *r.metric),
            ) else {
                continue;
            };
            // One vector per device and step (the aligner releases it with the step's last metric).
            if aligners[d].push(slot, r.ts_ms, r.value) {
                rows[d].extend_from_slice(aligners[d].vector());
            }
        }
    }
    data.devices
        .iter()
        .zip(rows)
        .map(|(device, rows)| {
            let mut m = PcaModel::fit(
                device,
                features.clone(),
                &rows,
                from,
                data.start_ms,
                &FitOptions::default(),
            )
            .map_err(|e| anyhow::anyhow!("device model of {device}: {e}"))?;
            m.version = 1;
            Ok((model_key(device), serde_json::to_vec(&m)?, m))
        })
        .collect()
}

/// The pipeline section's models-on run: `data` through a pipeline running a PCA model per device
/// (fitted and offered before the timed part); fails unless every device's model loaded and the
/// models scored (at least one `pca` event in the run or on the probe after it).
fn pipeline_with_models_on(
    detector: DetectorConfig,
    data: &Workload,
    series: usize,
) -> anyhow::Result<ModelsRun> {
    let mut cfg = AgentConfig::with_id("bench");
    cfg.models.enabled = true;
    let fitted = fit_device_models(data, series, 1000, &cfg)?;
    if fitted.is_empty() {
        bail!("no device model fitted");
    }
    let models: Vec<(String, Vec<u8>)> = fitted
        .iter()
        .map(|(k, p, _)| (k.clone(), p.clone()))
        .collect();
    let mut models_loaded = 0;
    let mut probe_events = 0;
    let run = pipeline_run_with(detector, &data.readings, &models, |p| {
        models_loaded = data
            .devices
            .iter()
            .filter(|d| p.model_version(d).is_some())
            .count() as u64;
        // One round of readings of each device, one interval after the workload: its first
        // feature 30 standard deviations above its training mean, the others at theirs.
        let ts = data.end_ms + 1000;
        let arrival = wall_ms();
        let mut sink = Vec::new();
        for (_, _, m) in &fitted {
            for (k, feature) in m.features.iter().enumerate() {
                let off = if k == 0 { 30.0 * m.scales[0] } else { 0.0 };
                let value = m.means[k] + off;
                let topic = format!("sensors/{}/{feature}", m.key);
                let payload = format!(r#"{{"ts":{ts},"value":{value}}}"#);
                p.handle_topic(&topic, payload.as_bytes(), arrival)
                    .map_err(|e| anyhow::anyhow!("probe reading of {}: {e}", m.key))?;
            }
            p.drain_outputs_into(&mut sink);
        }
        probe_events = sink
            .iter()
            .filter(|o| matches!(o, Output::Anomaly { event, .. } if event.detector == "pca"))
            .count() as u64;
        Ok(())
    })?;
    if models_loaded != fitted.len() as u64 {
        bail!(
            "{models_loaded} device models running of {} offered",
            fitted.len()
        );
    }
    if run.pca_events + probe_events == 0 {
        bail!(
            "the {models_loaded} device models raised no pca event, not even for readings 30 standard deviations off: they do not score"
        );
    }
    Ok(ModelsRun {
        run,
        models_loaded,
        probe_events,
    })
}

struct Stack {
    broker: EmbeddedBroker,
    agent: Arc<AgentMetrics>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// An embedded broker on a free loopback port.
fn broker() -> anyhow::Result<EmbeddedBroker> {
    EmbeddedBroker::start(&BrokerConfig {
        listen: "127.0.0.1:0".into(),
        ..BrokerConfig::default()
    })
}

/// Broker, aggregator and agent in this process. With `state`, both keep durable state in it
/// (`state.dir` of the agent and of the aggregator); without, the agent's outbox is temporary and
/// the aggregator's state in memory.
async fn stack(detector: DetectorConfig, state: Option<&Path>) -> anyhow::Result<Stack> {
    let broker = broker()?;
    let (host, port) = (broker.addr().ip().to_string(), broker.addr().port());
    let mut agg = AggregatorConfig::with_id("bench-agg");
    agg.mqtt.host = host.clone();
    agg.mqtt.port = port;
    agg.http.listen = "127.0.0.1:0".into();
    agg.state.dir = state.map(|d| d.join("aggregator"));
    let agg = Aggregator::bind(agg).await?;
    let mut cfg = AgentConfig::with_id("bench-gw");
    cfg.source.mqtt.host = host;
    cfg.source.mqtt.port = port;
    cfg.detector = detector;
    cfg.state.dir = state.map(|d| d.join("agent"));
    let agent = Agent::new(cfg)?;
    let metrics = agent.metrics();
    let stop = CancellationToken::new();
    let (s1, s2) = (stop.clone(), stop.clone());
    let tasks = vec![
        tokio::spawn(async move {
            let _ = agg.run(async move { s1.cancelled().await }).await;
        }),
        tokio::spawn(async move {
            let _ = agent.run(async move { s2.cancelled().await }).await;
        }),
    ];
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(Stack {
        broker,
        agent: metrics,
        stop,
        tasks,
    })
}

impl Stack {
    async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        drop(self.broker);
    }

    fn publisher(&self, id: &str) -> AsyncClient {
        publisher(&self.broker, id)
    }
}

/// A QoS 0 publisher on `broker` with room for bursts.
fn publisher(broker: &EmbeddedBroker, id: &str) -> AsyncClient {
    let mut o = MqttOptions::new(id, broker.addr().ip().to_string(), broker.addr().port());
    o.set_request_channel_capacity(1000).set_inflight(1000);
    let (client, mut el) = AsyncClient::new(o, 1000);
    el.network_options.set_tcp_nodelay(true);
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    client
}

/// Publishes `data`, paced by the agent's progress so rumqttd's per-subscription buffer never
/// overflows (it drops instead of applying backpressure), and waits until the agent has processed
/// every reading.
async fn publish_paced(
    client: &AsyncClient,
    data: &[(String, Vec<u8>)],
    agent: &AgentMetrics,
) -> anyhow::Result<()> {
    let before = agent.readings_total.load(Relaxed);
    let mut published = 0u64;
    for chunk in data.chunks(5_000) {
        for (topic, payload) in chunk {
            client
                .publish(topic.clone(), QoS::AtMostOnce, false, payload.clone())
                .await?;
        }
        published += chunk.len() as u64;
        // Keep at most 50k readings in flight between publisher and agent.
        while published.saturating_sub(agent.readings_total.load(Relaxed) - before) > 50_000 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let want = before + data.len() as u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while agent.readings_total.load(Relaxed) < want {
        if Instant::now() > deadline {
            bail!(
                "only {} of {} readings reached the agent (the broker dropped some)",
                agent.readings_total.load(Relaxed) - before,
                data.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

/// Figures of one end-to-end run.
struct EndToEnd {
    /// Readings processed by the agent per second (publish start to last reading processed).
    ingest_per_sec: f64,
    /// Readings per second until the aggregator also acknowledged every record the agent produced
    /// (the outbox holds nothing the pipeline has handed over).
    delivered_per_sec: f64,
}

async fn end_to_end(readings: u64, state: Option<&Path>) -> anyhow::Result<EndToEnd> {
    let stack = stack(DetectorConfig::default(), state).await?;
    let data = workload(readings as usize, 1_000, 1000)?.readings;
    let client = stack.publisher("bench-pub");
    let start = Instant::now();
    publish_paced(&client, &data, &stack.agent).await?;
    let ingest = start.elapsed().as_secs_f64();
    let m = &stack.agent;
    // Every summary and event the pipeline produced is an outbox record until its owner acks it.
    let produced = || m.windows_total.load(Relaxed) + m.anomalies_total.load(Relaxed);
    let deadline = Instant::now() + Duration::from_secs(60);
    while m.outbox_acked_total.load(Relaxed) < produced() {
        if Instant::now() > deadline {
            bail!(
                "the aggregator acknowledged only {} of {} records within 60 s",
                m.outbox_acked_total.load(Relaxed),
                produced()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let delivered = start.elapsed().as_secs_f64();
    stack.stop().await;
    Ok(EndToEnd {
        ingest_per_sec: readings as f64 / ingest,
        delivered_per_sec: readings as f64 / delivered,
    })
}

/// The wall clock, ms since the Unix epoch: the arrival time of in-process workloads.
pub(crate) fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `--cluster-checkpoint`: `incremental` or `full`.
fn parse_checkpoint_mode(
    s: &str,
) -> Result<edgewatch_aggregator::cluster::config::CheckpointMode, String> {
    use edgewatch_aggregator::cluster::config::CheckpointMode;
    match s {
        "incremental" => Ok(CheckpointMode::Incremental),
        "full" => Ok(CheckpointMode::Full),
        other => Err(format!("expected incremental or full, got {other:?}")),
    }
}

/// `program` on PATH or in /usr/sbin, /sbin.
pub(crate) fn find_program(program: &str) -> Option<PathBuf> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .filter(|d| !d.is_empty())
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

/// Starts mosquitto `bin` listening on 127.0.0.1:`port`, its configuration written in `dir`:
/// anonymous clients, no limit on a client's queued and in-flight QoS 1 messages (so a slow
/// subscriber is queued for, never dropped). Returns the child and the configuration's path.
pub(crate) fn spawn_mosquitto(
    bin: &Path,
    dir: &Path,
    port: u16,
) -> anyhow::Result<(std::process::Child, PathBuf)> {
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\nmax_inflight_messages 0\n"),
    )
    .with_context(|| format!("writing {}", conf.display()))?;
    let child = std::process::Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok((child, conf))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pipeline section's models-on run on a small workload: 4 devices of the default pump's 4
    /// metrics, a model per device, every reading processed (no timing assertion).
    #[test]
    fn the_models_on_run_loads_a_model_per_device_and_processes_every_reading() {
        let data = workload(16 * 300, 16, 1000).unwrap();
        assert_eq!(data.readings.len(), 16 * 300);
        assert_eq!((data.devices.len(), data.metrics.len()), (4, 4));
        assert_eq!(data.series, 16);
        // Fails inside unless every reading was taken and every model loaded and scored.
        let r = pipeline_with_models_on(DetectorConfig::default(), &data, 16).unwrap();
        assert_eq!(r.models_loaded, 4);
        assert!(r.run.pca_events + r.probe_events > 0, "no pca event");
        assert!(r.run.windows > 0 && r.run.rate > 0.0);
        // Without models: the same readings, no pca event.
        let without = pipeline_run(DetectorConfig::default(), &data.readings, &[]).unwrap();
        assert_eq!(without.pca_events, 0);
        assert_eq!(without.windows, r.run.windows);
    }
}
