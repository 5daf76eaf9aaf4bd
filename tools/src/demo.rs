//! `edgewatch demo`: the whole path in one process with no external service — an embedded MQTT
//! broker on loopback, a simulated fleet, one agent and two aggregators serving the live feed.
//!
//! Every component runs exactly as it would on its own; the demo only points them at the embedded
//! broker, checks that the aggregators own every partition exactly once, and prints status lines.

use crate::broker::{BrokerConfig, EmbeddedBroker};
use crate::config::Validate;
use anyhow::{bail, Context};
use edgewatch_agent::{Agent, AgentConfig};
use edgewatch_aggregator::config::PartitionSpec;
use edgewatch_aggregator::{Aggregator, AggregatorConfig};
use edgewatch_simulators::SimulatorConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The demo's configuration: every component's own section, plus the embedded broker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoConfig {
    /// The embedded MQTT broker.
    #[serde(default)]
    pub broker: BrokerConfig,
    /// The simulated fleet (its `mqtt` section is replaced by the embedded broker).
    #[serde(default = "default_simulator")]
    pub simulator: SimulatorConfig,
    /// The agent (its MQTT links are replaced by the embedded broker).
    #[serde(default = "default_agent")]
    pub agent: AgentConfig,
    /// The aggregator instances; together they must own every partition exactly once.
    #[serde(default = "default_aggregators")]
    pub aggregators: Vec<AggregatorConfig>,
    /// Seconds between status lines.
    #[serde(default = "default_status_interval_secs")]
    pub status_interval_secs: u64,
}

fn default_simulator() -> SimulatorConfig {
    let mut s = SimulatorConfig {
        devices: 20,
        // One simulated hour per wall minute: anomalies show up within seconds, not hours.
        speedup: 60.0,
        ..SimulatorConfig::default()
    };
    s.anomalies.warmup_ms = 10 * 60 * 1000;
    s.anomalies.rate_per_series_hour = 0.5;
    s
}

fn default_agent() -> AgentConfig {
    let mut a = AgentConfig::with_id("gw-demo");
    // The simulated clock runs `speedup` times faster than the wall clock, so its readings are
    // soon "in the future" for the agent: accept a year ahead instead of the default 10 minutes.
    a.window.max_future_ms = DEMO_MAX_FUTURE_MS;
    // Device models: the agent samples its pumps for the aggregators, which train and push back.
    a.models.enabled = true;
    a
}

/// How far ahead of the wall clock the demo's agent accepts readings (a year).
const DEMO_MAX_FUTURE_MS: i64 = 365 * 24 * 3_600_000;

fn default_aggregators() -> Vec<AggregatorConfig> {
    let p = edgewatch_models::partition::DEFAULT_PARTITIONS;
    (0..2u32)
        .map(|i| {
            let mut a = AggregatorConfig::with_id(&format!("agg-{}", i + 1));
            a.owned = vec![PartitionSpec::Range(format!(
                "{}-{}",
                i * p / 2,
                (i + 1) * p / 2 - 1
            ))];
            a.http.listen = format!("127.0.0.1:{}", 8080 + i);
            // One training period (an hour of event time) is a wall minute: a model per pump
            // after three of them, 128 sampled vectors each.
            a.training.enabled = true;
            a.training.min_rows = 300;
            a
        })
        .collect()
}

fn default_status_interval_secs() -> u64 {
    5
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            broker: BrokerConfig::default(),
            simulator: default_simulator(),
            agent: default_agent(),
            aggregators: default_aggregators(),
            status_interval_secs: default_status_interval_secs(),
        }
    }
}

impl Validate for DemoConfig {
    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        out.extend(
            self.broker
                .problems()
                .into_iter()
                .map(|p| format!("broker.{p}")),
        );
        out.extend(
            self.simulator
                .problems()
                .into_iter()
                .map(|p| format!("simulator.{p}")),
        );
        out.extend(
            self.agent
                .problems()
                .into_iter()
                .map(|p| format!("agent.{p}")),
        );
        if self.aggregators.is_empty() {
            out.push("aggregators: at least one aggregator is required".into());
        }
        for (i, a) in self.aggregators.iter().enumerate() {
            out.extend(
                a.problems()
                    .into_iter()
                    .map(|p| format!("aggregators[{i}].{p}")),
            );
            if a.partitions != self.agent.uplink.partitions {
                out.push(format!(
                    "aggregators[{i}].partitions: must equal agent.uplink.partitions ({}), got {}",
                    self.agent.uplink.partitions, a.partitions
                ));
            }
            if a.prefix != self.agent.uplink.prefix {
                out.push(format!(
                    "aggregators[{i}].prefix: must equal agent.uplink.prefix ({:?}), got {:?}",
                    self.agent.uplink.prefix, a.prefix
                ));
            }
        }
        if let Err(e) = ownership(&self.aggregators, self.agent.uplink.partitions) {
            out.push(format!("aggregators: {e}"));
        }
        if self.status_interval_secs == 0 {
            out.push("status_interval_secs: must be > 0, got 0".into());
        }
        out
    }
}

/// Checks that `aggs` own every partition of `0..partitions` exactly once; returns partition → owner.
pub fn ownership(
    aggs: &[AggregatorConfig],
    partitions: u32,
) -> Result<BTreeMap<u32, String>, String> {
    let mut owner = BTreeMap::new();
    for a in aggs {
        for p in a.owned_set() {
            if let Some(other) = owner.insert(p, a.id.clone()) {
                return Err(format!(
                    "partition {p} is owned by both {other} and {}",
                    a.id
                ));
            }
        }
    }
    let missing: Vec<u32> = (0..partitions).filter(|p| !owner.contains_key(p)).collect();
    if !missing.is_empty() {
        return Err(format!("partitions {missing:?} have no owner"));
    }
    Ok(owner)
}

/// Command-line overrides of the demo.
#[derive(Debug, Clone, Default)]
pub struct DemoOverrides {
    /// Stop on its own after this long.
    pub duration: Option<Duration>,
    /// Embedded broker port.
    pub broker_port: Option<u16>,
    /// First aggregator's HTTP port; the others follow it.
    pub http_port: Option<u16>,
}

/// Runs the demo until Ctrl-C, SIGTERM or the duration.
///
/// `stop_on(duration)` gives the token that ends the run once everything is started (the binary
/// passes its signal handler, `edgewatch::shutdown::on_signal_or_deadline`).
pub async fn run(
    mut cfg: DemoConfig,
    overrides: DemoOverrides,
    stop_on: impl FnOnce(Option<Duration>) -> CancellationToken,
) -> anyhow::Result<()> {
    if let Some(port) = overrides.broker_port {
        cfg.broker.listen = format!("127.0.0.1:{port}");
    }
    if let Some(port) = overrides.http_port {
        for (i, a) in cfg.aggregators.iter_mut().enumerate() {
            a.http.listen = format!("127.0.0.1:{}", if port == 0 { 0 } else { port + i as u16 });
        }
    }
    let problems = cfg.problems();
    if !problems.is_empty() {
        bail!("invalid demo configuration:\n  {}", problems.join("\n  "));
    }
    let broker = EmbeddedBroker::start(&cfg.broker)?;
    let addr = broker.addr();
    let point = |link: &mut edgewatch_link::MqttLink| {
        link.host = addr.ip().to_string();
        link.port = addr.port();
    };
    point(&mut cfg.simulator.mqtt);
    point(&mut cfg.agent.source.mqtt);
    cfg.agent.uplink.mqtt = None;
    if cfg.simulator.speedup > 1.0 {
        // The simulated clock runs ahead of the wall clock (see `default_agent`).
        cfg.agent.window.max_future_ms = cfg.agent.window.max_future_ms.max(DEMO_MAX_FUTURE_MS);
    }
    for a in &mut cfg.aggregators {
        point(&mut a.mqtt);
    }

    let mut aggregators = Vec::new();
    for a in cfg.aggregators.clone() {
        let id = a.id.clone();
        aggregators.push(
            Aggregator::bind(a)
                .await
                .with_context(|| format!("starting aggregator {id}"))?,
        );
    }
    let feed_urls: Vec<String> = aggregators.iter().map(Aggregator::feed_url).collect();
    let agent = Agent::new(cfg.agent.clone()).context("starting the agent")?;
    let agent_metrics = agent.metrics();
    let agg_metrics: Vec<_> = aggregators.iter().map(Aggregator::metrics).collect();

    let stop = stop_on(overrides.duration);
    let stop_sim = CancellationToken::new();
    let stop_agent = CancellationToken::new();
    let stop_aggs = CancellationToken::new();

    let mut agg_tasks = Vec::new();
    for a in aggregators {
        let t = stop_aggs.clone();
        agg_tasks.push(tokio::spawn(a.run(async move { t.cancelled().await })));
    }
    let agent_task = {
        let t = stop_agent.clone();
        tokio::spawn(agent.run(async move { t.cancelled().await }))
    };
    let sim_task = {
        let t = stop_sim.clone();
        tokio::spawn(edgewatch_simulators::run(
            cfg.simulator.clone(),
            async move { t.cancelled().await },
        ))
    };

    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "edgewatch demo: broker mqtt://{addr}, {} devices x {} metrics, {} aggregators",
            cfg.simulator.devices,
            cfg.simulator.metrics.len(),
            feed_urls.len()
        )?;
        writeln!(
            out,
            "live anomaly feed (any instance serves the whole fleet):"
        )?;
        for url in &feed_urls {
            writeln!(out, "{url}")?;
        }
        writeln!(
            out,
            "dashboard: {}",
            feed_urls[0]
                .replacen("ws://", "http://", 1)
                .trim_end_matches("feed")
        )?;
        writeln!(out, "watch it:  edgewatch tail {}", feed_urls[0])?;
        out.flush()?;
    }

    let status = status_loop(
        agent_metrics.clone(),
        agg_metrics,
        Duration::from_secs(cfg.status_interval_secs),
        stop.clone(),
    );
    let sim_result = tokio::select! {
        _ = status => None,
        r = sim_task => Some(r),
    };
    // Orderly drain: stop the source, let the agent flush its windows, then the aggregators.
    stop_sim.cancel();
    if let Some(r) = sim_result {
        match r {
            Ok(Ok(report)) => tracing::info!(published = report.published, "simulator finished"),
            Ok(Err(e)) => tracing::error!(error = %format!("{e:#}"), "simulator failed"),
            Err(e) => tracing::error!(error = %e, "simulator task panicked"),
        }
        // The simulated run is over: keep serving until the user stops us.
        stop.cancelled().await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop_agent.cancel();
    match agent_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "agent failed"),
        Err(e) => tracing::error!(error = %e, "agent task panicked"),
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop_aggs.cancel();
    for t in agg_tasks {
        let _ = t.await;
    }
    drop(broker);
    let m = &agent_metrics;
    println!(
        "edgewatch demo stopped: {} readings, {} windows, {} anomalies, {} rejected",
        m.readings_total.load(Relaxed),
        m.windows_total.load(Relaxed),
        m.anomalies_total.load(Relaxed),
        m.rejected_total()
    );
    Ok(())
}

async fn status_loop(
    agent: Arc<edgewatch_agent::AgentMetrics>,
    aggs: Vec<Arc<edgewatch_aggregator::AggregatorMetrics>>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut last = (Instant::now(), agent.readings_total.load(Relaxed));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let readings = agent.readings_total.load(Relaxed);
        let rate = (readings - last.1) as f64 / now.duration_since(last.0).as_secs_f64().max(1e-3);
        last = (now, readings);
        let applied: u64 = aggs
            .iter()
            .map(|m| m.summaries_applied_total.load(Relaxed))
            .sum();
        println!(
            "status: {rate:>9.0} readings/s | {readings} readings | {} anomalies | {} windows sent, {applied} applied | lag {} queued msgs | rejected {}",
            agent.anomalies_total.load(Relaxed),
            agent.summaries_published_total.load(Relaxed),
            agent.queue_depth.load(Relaxed),
            agent.rejected_total(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_demo_is_valid_and_splits_partitions_between_two_aggregators() {
        let cfg = DemoConfig::default();
        assert!(cfg.problems().is_empty(), "{:?}", cfg.problems());
        let owners = ownership(&cfg.aggregators, 64).unwrap();
        assert_eq!(owners.len(), 64);
        assert_eq!(owners[&0], "agg-1");
        assert_eq!(owners[&63], "agg-2");
        assert!(cfg.agent.models.enabled && cfg.aggregators.iter().all(|a| a.training.enabled));
    }

    #[test]
    fn gaps_and_overlaps_in_ownership_are_reported() {
        let mut aggs = default_aggregators();
        aggs[1].owned = vec![PartitionSpec::Range("33-63".into())];
        assert!(ownership(&aggs, 64).unwrap_err().contains("[32]"));
        aggs[1].owned = vec![PartitionSpec::Range("31-63".into())];
        assert!(ownership(&aggs, 64).unwrap_err().contains("partition 31"));
    }
}
