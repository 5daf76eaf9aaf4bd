//! `edgewatch bench`: figures anyone can reproduce on their own machine — the agent pipeline's
//! in-process throughput on one core, end-to-end throughput through the embedded broker, and the
//! latency from a sensor publish to the anomaly event on the feed.
//!
//! Run it from a release build (`cargo run --release -- bench`); debug builds are 10–50× slower.

use crate::broker::{BrokerConfig, EmbeddedBroker};
use anyhow::{bail, Context};
use clap::Args;
use edgewatch_agent::pipeline::Pipeline;
use edgewatch_agent::{Agent, AgentConfig, AgentMetrics};
use edgewatch_aggregator::{Aggregator, AggregatorConfig};
use edgewatch_models::detect::DetectorConfig;
use edgewatch_simulators::{Fleet, SimulatorConfig};
use futures_util::StreamExt;
use rumqttc::{AsyncClient, MqttOptions, QoS};
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// Arguments of `edgewatch bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Readings replayed through the in-process pipeline.
    #[arg(long, default_value_t = 2_000_000)]
    pub readings: usize,
    /// Series the readings are spread over.
    #[arg(long, default_value_t = 1_000)]
    pub series: usize,
    /// Readings published through the embedded broker for the end-to-end figure.
    #[arg(long, default_value_t = 500_000)]
    pub e2e_readings: u64,
    /// Spikes published (one every 10 ms, over a background load) for the latency figure.
    #[arg(long, default_value_t = 500)]
    pub latency_spikes: usize,
    /// Detector presets to bench in process (default: the default detector and zscore).
    #[arg(long)]
    pub detector: Vec<String>,
    /// Skip the broker-based figures.
    #[arg(long)]
    pub in_process_only: bool,
}

/// Runs every benchmark and prints the figures.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build; figures will be far below a release build's (cargo run --release -- bench)");
    }
    let presets = if args.detector.is_empty() {
        vec![None, Some("zscore".to_string())]
    } else {
        args.detector.iter().cloned().map(Some).collect()
    };
    println!(
        "edgewatch bench ({} cores visible)",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
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
        let label = preset.unwrap_or_else(|| "default".into());
        let (rate, windows) = pipeline_throughput(detector, args.readings, args.series)?;
        println!(
            "in-process pipeline [{label}]: {:>12.0} readings/s on one core (JSON payload -> score -> window; {} readings, {} series, {windows} windows)",
            rate, args.readings, args.series
        );
    }
    if args.in_process_only {
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let rate = end_to_end_throughput(args.e2e_readings).await?;
        println!(
            "end to end via embedded broker: {rate:>12.0} readings/s (simulator publish -> agent -> summaries applied; {} readings)",
            args.e2e_readings
        );
        let (p50, p99, n) = latency(args.latency_spikes).await?;
        println!("publish -> feed event latency: p50 {p50:.2} ms, p99 {p99:.2} ms ({n} events)");
        anyhow::Ok(())
    })
}

/// Pre-serialised (topic, payload) pairs from the simulator's generator.
fn workload(readings: usize, series: usize) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut sim = SimulatorConfig::default();
    let metrics = sim.metrics.len();
    sim.devices = series.div_ceil(metrics).max(1);
    sim.seed = 1;
    let mut fleet = Fleet::new(&sim, 1_767_225_600_000)?;
    let mut out = Vec::with_capacity(readings);
    let mut step = Vec::new();
    while out.len() < readings {
        step.clear();
        fleet.step(&mut step);
        for r in &step {
            let mut payload = Vec::with_capacity(48);
            edgewatch_simulators::payload(r, &mut payload);
            out.push((format!("sensors/{}/{}", r.device, r.metric), payload));
        }
    }
    out.truncate(readings);
    Ok(out)
}

fn pipeline_throughput(
    detector: DetectorConfig,
    readings: usize,
    series: usize,
) -> anyhow::Result<(f64, u64)> {
    let data = workload(readings, series)?;
    let mut cfg = AgentConfig::with_id("bench");
    cfg.detector = detector;
    let metrics = Arc::new(AgentMetrics::default());
    let mut pipeline = Pipeline::new(&cfg, metrics.clone())?;
    let mut sink = Vec::new();
    let start = Instant::now();
    for (topic, payload) in &data {
        // Errors cannot happen with simulator payloads; count them anyway so the figure is honest.
        let _ = pipeline.handle_topic(topic, payload, 0);
        pipeline.drain_outputs_into(&mut sink);
        sink.clear();
    }
    let secs = start.elapsed().as_secs_f64();
    let ok = metrics.readings_total.load(Relaxed);
    if ok != readings as u64 {
        bail!(
            "pipeline rejected {} of {readings} readings",
            readings as u64 - ok
        );
    }
    Ok((readings as f64 / secs, metrics.windows_total.load(Relaxed)))
}

struct Stack {
    broker: EmbeddedBroker,
    agent: Arc<AgentMetrics>,
    feed_url: String,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn stack(detector: DetectorConfig) -> anyhow::Result<Stack> {
    let broker = EmbeddedBroker::start(&BrokerConfig {
        listen: "127.0.0.1:0".into(),
        ..BrokerConfig::default()
    })?;
    let (host, port) = (broker.addr().ip().to_string(), broker.addr().port());
    let mut agg = AggregatorConfig::with_id("bench-agg");
    agg.mqtt.host = host.clone();
    agg.mqtt.port = port;
    agg.http.listen = "127.0.0.1:0".into();
    let agg = Aggregator::bind(agg).await?;
    let feed_url = agg.feed_url();
    let mut cfg = AgentConfig::with_id("bench-gw");
    cfg.source.mqtt.host = host;
    cfg.source.mqtt.port = port;
    cfg.detector = detector;
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
        feed_url,
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
        let mut o = MqttOptions::new(
            id,
            self.broker.addr().ip().to_string(),
            self.broker.addr().port(),
        );
        o.set_request_channel_capacity(1000).set_inflight(1000);
        let (client, mut el) = AsyncClient::new(o, 1000);
        el.network_options.set_tcp_nodelay(true);
        tokio::spawn(async move { while el.poll().await.is_ok() {} });
        client
    }
}

async fn end_to_end_throughput(readings: u64) -> anyhow::Result<f64> {
    let stack = stack(DetectorConfig::default()).await?;
    let data = workload(readings as usize, 1_000)?;
    let client = stack.publisher("bench-pub");
    let start = Instant::now();
    // Paced by the agent's progress so rumqttd's per-subscription buffer never overflows (it drops
    // instead of applying backpressure).
    let mut published = 0u64;
    for chunk in data.chunks(5_000) {
        for (topic, payload) in chunk {
            client
                .publish(topic.clone(), QoS::AtMostOnce, false, payload.clone())
                .await?;
        }
        published += chunk.len() as u64;
        // Keep at most 50k readings in flight between publisher and agent.
        while published.saturating_sub(stack.agent.readings_total.load(Relaxed)) > 50_000 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while stack.agent.readings_total.load(Relaxed) < readings {
        if Instant::now() > deadline {
            bail!(
                "only {} of {readings} readings reached the agent (the broker dropped some)",
                stack.agent.readings_total.load(Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    stack.stop().await;
    Ok(readings as f64 / secs)
}

async fn latency(spikes: usize) -> anyhow::Result<(f64, f64, usize)> {
    let stack = stack(DetectorConfig::preset("zscore").context("zscore preset")?).await?;
    let (ws, _) = tokio_tungstenite::connect_async(stack.feed_url.as_str()).await?;
    let sent: Arc<Mutex<HashMap<(String, i64), Instant>>> = Arc::default();
    let lat: Arc<Mutex<Vec<f64>>> = Arc::default();
    let reader = {
        let (sent, lat) = (sent.clone(), lat.clone());
        tokio::spawn(async move {
            let (_w, mut r) = ws.split();
            while let Some(Ok(Message::Text(t))) = r.next().await {
                let now = Instant::now();
                if let Ok(e) = serde_json::from_str::<edgewatch_models::wire::AnomalyEvent>(&t) {
                    if let Some(at) = sent
                        .lock()
                        .ok()
                        .and_then(|s| s.get(&(e.device.clone(), e.ts_ms)).copied())
                    {
                        if let Ok(mut l) = lat.lock() {
                            l.push(now.duration_since(at).as_secs_f64() * 1e3);
                        }
                    }
                }
            }
        })
    };
    let client = stack.publisher("bench-latency");
    let devices = 200usize;
    let t0 = 1_767_225_600_000i64;
    // Warm every series up with ordinary readings.
    for i in 0..100i64 {
        for d in 0..devices {
            let v = 20.0 + ((i * 7 + d as i64) % 5) as f64 * 0.2;
            client
                .publish(
                    format!("sensors/lat-{d}/temp"),
                    QoS::AtMostOnce,
                    false,
                    format!(r#"{{"ts":{},"value":{v}}}"#, t0 + i * 1000),
                )
                .await?;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Then, every 10 ms, a spike on the next series amid ordinary readings of the others.
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for k in 0..spikes {
        tick.tick().await;
        let step = 100 + (k / devices) as i64 * 2;
        let d = k % devices;
        for other in (0..devices).filter(|o| o % 20 == k % 20 && *o != d) {
            client
                .publish(
                    format!("sensors/lat-{other}/temp"),
                    QoS::AtMostOnce,
                    false,
                    format!(r#"{{"ts":{},"value":20.2}}"#, t0 + step * 1000),
                )
                .await?;
        }
        let ts = t0 + step * 1000;
        if let Ok(mut s) = sent.lock() {
            s.insert((format!("lat-{d}"), ts), Instant::now());
        }
        client
            .publish(
                format!("sensors/lat-{d}/temp"),
                QoS::AtMostOnce,
                false,
                format!(r#"{{"ts":{ts},"value":90.0}}"#),
            )
            .await?;
        client
            .publish(
                format!("sensors/lat-{d}/temp"),
                QoS::AtMostOnce,
                false,
                format!(r#"{{"ts":{},"value":20.2}}"#, ts + 1000),
            )
            .await?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    reader.abort();
    stack.stop().await;
    let mut l = lat.lock().map(|l| l.clone()).unwrap_or_default();
    if l.is_empty() {
        bail!("no spike reached the feed");
    }
    l.sort_by(f64::total_cmp);
    let pct = |p: f64| l[((l.len() - 1) as f64 * p).round() as usize];
    Ok((pct(0.5), pct(0.99), l.len()))
}
