//! `bench --section memory`, the agent-process part: an `edgewatch agent` child process with
//! `state.dir` (real sled) is fed N series through the embedded broker (an aggregator in this
//! process acknowledges its records), then left idle while its resident memory is sampled from
//! `/proc/<pid>/status`: what a gateway with N series costs, and whether it stays flat.
//!
//! The in-process part (per detector preset: resident bytes, checkpoint and detector bytes per
//! series) stays in `mod.rs`; this one is about the daemon as deployed.

use super::{broker, load_average};
use crate::http::Get;
use anyhow::{bail, Context};
use edgewatch_aggregator::{Aggregator, AggregatorConfig};
use rumqttc::QoS;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Environment variable naming a profiler command the agent process runs under, split at spaces
/// (for example `heaptrack -o /tmp/agent`); the RSS printed is then the profiler's wrapper's, and
/// the agent is left running when the bench ends (stop it by its pid so the profiler writes out).
pub(super) const WRAPPER_ENV: &str = "EDGEWATCH_BENCH_AGENT_WRAPPER";

/// Sizes of the agent-process run.
pub(super) struct ProcessRun {
    /// Distinct series (device ids `dev-00000…`, one metric each).
    pub series: usize,
    /// Readings per series, one second of event time apart.
    pub readings_per_series: usize,
    /// How long the agent is left idle after loading, seconds.
    pub idle_secs: u64,
    /// Sampling interval while idle, seconds.
    pub sample_secs: u64,
    /// A profiler command to run the agent under ([`WRAPPER_ENV`]).
    pub wrapper: Option<String>,
}

/// The child agent; killed if the bench fails half-way.
struct AgentChild {
    child: Child,
    metrics_addr: String,
}

impl Drop for AgentChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl AgentChild {
    /// A field of `/proc/<pid>/status` in bytes (`VmRSS`, `VmHWM`).
    fn status_bytes(&self, field: &str) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .context("reading the agent's /proc status (Linux only)")?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {field} in the agent's /proc status"))?;
        Ok(kb * 1024)
    }

    /// The agent's `edgewatch_agent_readings_total`, or `None` while its HTTP server is not up.
    async fn readings(&self) -> Option<u64> {
        let r = Get::new(&self.metrics_addr, "/metrics").send().await.ok()?;
        r.text()
            .lines()
            .find_map(|l| l.strip_prefix("edgewatch_agent_readings_total{"))
            .and_then(|l| l.rsplit_once(' '))
            .and_then(|(_, v)| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
    }
}

/// A loopback port free right now (the agent binds it a moment later).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

/// Runs the agent-process part and prints its lines (`agent process memory ...`).
pub(super) async fn agent_process(run: &ProcessRun, base: &Path) -> anyhow::Result<()> {
    let dir = super::delivery::Scratch::new(base, "memory")?;
    let broker = broker()?;
    let (host, port) = (broker.addr().ip().to_string(), broker.addr().port());
    let mut agg = AggregatorConfig::with_id("bench-mem-agg");
    agg.mqtt.host = host.clone();
    agg.mqtt.port = port;
    agg.http.listen = "127.0.0.1:0".into();
    let agg = Aggregator::bind(agg).await?;
    let stop = CancellationToken::new();
    let s = stop.clone();
    let agg_task = tokio::spawn(async move {
        let _ = agg.run(async move { s.cancelled().await }).await;
    });

    let http_port = free_port()?;
    let state = dir.0.join("agent");
    let yaml = format!(
        "id: bench-mem\n\
         source:\n  mqtt: {{ host: {host}, port: {port} }}\n  qos: 1\n  \
         subscriptions: [{{ topic: \"sensors/{{device}}/{{metric}}\" }}]\n\
         pipeline: {{ max_series: {max} }}\n\
         http: {{ listen: \"127.0.0.1:{http_port}\" }}\n\
         state: {{ dir: \"{state}\" }}\n",
        max = run.series.max(1),
        state = state.display()
    );
    let cfg = dir.0.join("agent.yaml");
    std::fs::write(&cfg, yaml)?;
    let log = dir.0.join("agent.log");
    let exe = std::env::current_exe()?;
    let mut words = run.wrapper.iter().flat_map(|w| w.split_whitespace());
    let mut command = match words.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(words).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    let child = command
        .args(["agent", "--config"])
        .arg(&cfg)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting `edgewatch agent`")?;
    let agent = AgentChild {
        child,
        metrics_addr: format!("127.0.0.1:{http_port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while agent.readings().await.is_none() {
        if Instant::now() > deadline {
            bail!(
                "the agent did not serve /metrics within 30 s; its log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Its subscription is up once its source link connected; give it a moment, then check below
    // that every reading arrived.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = agent.status_bytes("VmRSS")?;

    let client = super::publisher(&broker, "bench-mem-pub");
    let total = (run.series * run.readings_per_series) as u64;
    let t0 = (super::wall_ms() - run.readings_per_series as i64 * 1000 - 60_000) / 60_000 * 60_000;
    let load_start = Instant::now();
    let mut published = 0u64;
    for r in 0..run.readings_per_series {
        for i in 0..run.series {
            let v = 20.0 + ((r * 7 + i) % 17) as f64 * 0.25;
            let payload = format!(r#"{{"ts":{},"value":{v}}}"#, t0 + r as i64 * 1000);
            client
                .publish(
                    format!("sensors/dev-{i:05}/temp"),
                    QoS::AtMostOnce,
                    false,
                    payload,
                )
                .await?;
            published += 1;
            // rumqttd drops rather than pushes back: keep at most 20k readings in flight.
            if published.is_multiple_of(5_000) {
                while published.saturating_sub(agent.readings().await.unwrap_or(0)) > 20_000 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = agent.readings().await.unwrap_or(0);
        if got >= total {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {got} of {total} readings reached the agent (the broker dropped some)");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let load_secs = load_start.elapsed().as_secs_f64();
    let loaded = agent.status_bytes("VmRSS")?;
    println!(
        "agent process memory: {} series x {} readings loaded in {load_secs:.1} s, state.dir on; RSS {:.1} MiB at start, {:.1} MiB loaded: {:.0} bytes per series (load average {})",
        run.series,
        run.readings_per_series,
        mib(started),
        mib(loaded),
        loaded.saturating_sub(started) as f64 / run.series.max(1) as f64,
        load_average()
    );
    let idle_start = Instant::now();
    let (mut lo, mut hi) = (loaded, loaded);
    let sample = Duration::from_secs(run.sample_secs.max(1));
    let mut next = sample;
    while idle_start.elapsed() < Duration::from_secs(run.idle_secs) {
        let wait = next.saturating_sub(idle_start.elapsed());
        tokio::time::sleep(wait).await;
        let rss = agent.status_bytes("VmRSS")?;
        lo = lo.min(rss);
        hi = hi.max(rss);
        println!(
            "agent process memory idle +{:>4} s: RSS {:.1} MiB",
            next.as_secs(),
            mib(rss)
        );
        next += sample;
    }
    let end = agent.status_bytes("VmRSS")?;
    println!(
        "agent process memory idle {} s: RSS {:.1} -> {:.1} MiB (min {:.1}, max {:.1}, peak VmHWM {:.1} MiB; load average {})",
        run.idle_secs,
        mib(loaded),
        mib(end),
        mib(lo),
        mib(hi),
        mib(agent.status_bytes("VmHWM")?),
        load_average()
    );
    drop(agent);
    stop.cancel();
    let _ = agg_task.await;
    drop(broker);
    Ok(())
}
