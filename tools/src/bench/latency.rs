//! `bench --section latency`: how long an anomaly takes from the sensor's publish to the event on
//! the feed, while a background load of ordinary readings keeps the agent, the uplink and the
//! aggregator busy — through the embedded broker and/or mosquitto, without and/or with `state.dir`,
//! with the sensors publishing at QoS 0 and/or 1.
//!
//! Each combination starts its own broker, aggregator and agent (zscore detector, silences off)
//! in this process, a feed client, a background publisher (`--latency-background` readings/s
//! spread over `--latency-series` series, event time 10× faster than the wall clock so windows
//! close and summaries flow) and a spike publisher: `--latency-spikes` spikes, each on a series of
//! its own warmed up beforehand, 5–15 ms apart (seeded jitter, so no timer in the path can line up
//! with them). The latency of a spike is its publish call to its event's arrival on the feed
//! client; the section prints p50/p90/p99/max, the events seen and the load average.

use super::load_average;
use crate::broker::{BrokerConfig, EmbeddedBroker};
use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use edgewatch_agent::{Agent, AgentConfig, AgentMetrics};
use edgewatch_aggregator::{Aggregator, AggregatorConfig};
use edgewatch_models::detect::DetectorConfig;
use edgewatch_models::wire::AnomalyEvent;
use futures_util::StreamExt;
use rumqttc::{AsyncClient, MqttOptions, QoS};
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// Options of the latency section (flattened into `edgewatch bench`).
#[derive(Debug, Clone, Args)]
pub struct LatencyArgs {
    /// Spikes published per combination (each on a series of its own, 5–15 ms apart).
    #[arg(long, default_value_t = 500)]
    pub latency_spikes: usize,
    /// Background load of ordinary readings per second during the spikes (0: none).
    #[arg(long, default_value_t = 20_000)]
    pub latency_background: u64,
    /// Series the background load is spread over.
    #[arg(long, default_value_t = 2_000)]
    pub latency_series: usize,
    /// Broker to measure through (repeatable): embedded (rumqttd, in this process), mosquitto (from
    /// PATH or /usr/sbin, default settings but unlimited queued and in-flight messages), or both.
    #[arg(long, value_enum)]
    pub latency_broker: Vec<BrokerChoice>,
    /// Agent and aggregator with `state.dir` (durable outbox and store): off, on (also a bare
    /// `--latency-durable`) or both.
    #[arg(long, value_enum, num_args = 0..=1, default_value = "off", default_missing_value = "on")]
    pub latency_durable: Durable,
    /// QoS of the sensors' publishes, spikes and background alike (repeatable): 0, 1 or both.
    #[arg(long, value_enum)]
    pub latency_qos: Vec<SensorQos>,
}

/// A broker of the latency section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum BrokerChoice {
    /// The embedded rumqttd.
    Embedded,
    /// A mosquitto started for the run: default settings (Nagle on) but `max_queued_messages 0` and
    /// `max_inflight_messages 0`.
    Mosquitto,
    /// Both, one after the other.
    Both,
}

/// Whether the latency section runs with `state.dir`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Durable {
    /// Temporary outbox, aggregator state in memory.
    Off,
    /// `state.dir` for agent and aggregator.
    On,
    /// Off, then on.
    Both,
}

/// QoS of the sensors' publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum SensorQos {
    /// At most once.
    #[value(name = "0")]
    Zero,
    /// At least once.
    #[value(name = "1")]
    One,
    /// 0, then 1.
    Both,
}

/// One combination of the section.
#[derive(Debug, Clone, Copy)]
struct Case {
    broker: BrokerChoice,
    durable: bool,
    qos: QoS,
}

impl LatencyArgs {
    /// Every combination asked for, in a stable order (brokers, then durability, then QoS).
    fn cases(&self) -> Vec<Case> {
        let mut brokers: Vec<BrokerChoice> = self
            .latency_broker
            .iter()
            .flat_map(|b| match b {
                BrokerChoice::Both => vec![BrokerChoice::Embedded, BrokerChoice::Mosquitto],
                b => vec![*b],
            })
            .collect();
        if brokers.is_empty() {
            brokers.push(BrokerChoice::Embedded);
        }
        brokers.sort();
        brokers.dedup();
        let durable = match self.latency_durable {
            Durable::Off => vec![false],
            Durable::On => vec![true],
            Durable::Both => vec![false, true],
        };
        let mut qos: Vec<u8> = self
            .latency_qos
            .iter()
            .flat_map(|q| match q {
                SensorQos::Zero => vec![0],
                SensorQos::One => vec![1],
                SensorQos::Both => vec![0, 1],
            })
            .collect();
        if qos.is_empty() {
            qos.push(0);
        }
        qos.sort();
        qos.dedup();
        let mut out = Vec::new();
        for &broker in &brokers {
            for &durable in &durable {
                for &q in &qos {
                    let qos = if q == 0 {
                        QoS::AtMostOnce
                    } else {
                        QoS::AtLeastOnce
                    };
                    out.push(Case {
                        broker,
                        durable,
                        qos,
                    });
                }
            }
        }
        out
    }
}

/// Figures of one combination.
struct Figures {
    /// Latencies of the spikes whose event reached the feed, ms, sorted.
    ms: Vec<f64>,
    /// Background readings per second actually published during the spikes.
    background: f64,
    /// Readings the agent took during the run against those published (the broker may drop).
    taken: u64,
    published: u64,
}

impl Figures {
    /// The `p` quantile (nearest rank) of the latencies.
    fn pct(&self, p: f64) -> f64 {
        self.ms[((self.ms.len() - 1) as f64 * p).round() as usize]
    }
}

/// Runs every combination asked for and prints a line for each.
pub(super) async fn run(args: &LatencyArgs, base: &Path) -> anyhow::Result<()> {
    for case in args.cases() {
        let f = one(args, case, base).await?;
        let broker = match case.broker {
            BrokerChoice::Mosquitto => "mosquitto",
            _ => "embedded",
        };
        let state = if case.durable { "state.dir" } else { "memory" };
        let qos = case.qos as u8;
        println!(
            "publish -> feed event latency [{broker}, sensors at qos {qos}, {state}, {:.0} readings/s background over {} series]: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} events of {} spikes; agent took {} of {} readings published; load average {})",
            f.background,
            args.latency_series,
            f.pct(0.5),
            f.pct(0.9),
            f.pct(0.99),
            f.pct(1.0),
            f.ms.len(),
            args.latency_spikes,
            f.taken,
            f.published,
            load_average()
        );
    }
    Ok(())
}

/// Event time of the first reading of every series (2026-01-01 00:00 UTC).
const T0_MS: i64 = 1_767_225_600_000;
/// Readings that warm a spike series up (the zscore detector scores from its 30th).
const WARMUP_READINGS: i64 = 40;
/// The background load runs this long before the first spike.
const SETTLE: Duration = Duration::from_secs(1);
/// After the last spike, events still in flight are awaited this long.
const DRAIN: Duration = Duration::from_secs(5);

/// A broker of one combination; stopped when dropped.
enum Broker {
    Embedded(EmbeddedBroker),
    Mosquitto(Mosquitto),
}

impl Broker {
    fn start(choice: BrokerChoice, scratch: &Path) -> anyhow::Result<Self> {
        Ok(match choice {
            BrokerChoice::Mosquitto => Broker::Mosquitto(Mosquitto::start(scratch)?),
            _ => Broker::Embedded(EmbeddedBroker::start(&BrokerConfig {
                listen: "127.0.0.1:0".into(),
                ..BrokerConfig::default()
            })?),
        })
    }

    fn addr(&self) -> SocketAddr {
        match self {
            Broker::Embedded(b) => b.addr(),
            Broker::Mosquitto(m) => m.addr,
        }
    }
}

/// A mosquitto process on a free loopback port, with its default settings (Nagle on) but no limit
/// on a client's queued and in-flight QoS 1 messages: with the defaults (1,000 queued, 20 in flight)
/// QoS 1 readings for an agent that falls behind on a busy machine queue in the broker (20 per round
/// trip) and are then dropped, so the figure would measure mosquitto's window, not edgewatch.
struct Mosquitto {
    child: Child,
    addr: SocketAddr,
}

impl Mosquitto {
    fn start(dir: &Path) -> anyhow::Result<Self> {
        let bin = super::find_program("mosquitto").context(
            "mosquitto not found on PATH or in /usr/sbin: apt-get install -y mosquitto, or measure --latency-broker embedded",
        )?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("reserving a port for mosquitto")?
            .port();
        let (child, conf) = super::spawn_mosquitto(&bin, dir, port)?;
        let mut m = Mosquitto {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&m.addr, Duration::from_millis(100)).is_err() {
            if let Ok(Some(status)) = m.child.try_wait() {
                bail!(
                    "mosquitto exited at start ({status}); its configuration: {}",
                    conf.display()
                );
            }
            if Instant::now() > deadline {
                bail!("mosquitto did not listen on {} within 10 s", m.addr);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(m)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An MQTT publisher for the bench's sensors: no Nagle, room for bursts.
fn sensor(addr: SocketAddr, id: &str) -> AsyncClient {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_request_channel_capacity(1000).set_inflight(1000);
    let (client, mut el) = AsyncClient::new(o, 1000);
    el.network_options.set_tcp_nodelay(true);
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    client
}

/// One combination: its own broker, aggregator, agent, feed client and publishers.
async fn one(args: &LatencyArgs, case: Case, base: &Path) -> anyhow::Result<Figures> {
    let scratch = super::delivery::Scratch::new(base, "latency")?;
    let broker = Broker::start(case.broker, &scratch.0)?;
    let addr = broker.addr();
    let state = case.durable.then(|| scratch.0.clone());

    let mut agg = AggregatorConfig::with_id("bench-agg");
    agg.mqtt.host = addr.ip().to_string();
    agg.mqtt.port = addr.port();
    agg.http.listen = "127.0.0.1:0".into();
    agg.state.dir = state.as_ref().map(|d| d.join("aggregator"));
    let agg = Aggregator::bind(agg).await?;
    let feed_url = agg.feed_url();
    let mut cfg = AgentConfig::with_id("bench-gw");
    cfg.source.mqtt.host = addr.ip().to_string();
    cfg.source.mqtt.port = addr.port();
    cfg.detector = DetectorConfig::preset("zscore").context("zscore preset")?;
    // Spike series go quiet after their spike: no silence events on top of the measured ones.
    cfg.anomaly.silence.enabled = false;
    cfg.pipeline.max_series = cfg
        .pipeline
        .max_series
        .max(args.latency_series + args.latency_spikes + 16);
    cfg.state.dir = state.as_ref().map(|d| d.join("agent"));
    let agent = Agent::new(cfg)?;
    let metrics = agent.metrics();
    let stop = CancellationToken::new();
    let (s1, s2) = (stop.clone(), stop.clone());
    let tasks = vec![
        tokio::spawn(async move {
            if let Err(e) = agg.run(async move { s1.cancelled().await }).await {
                eprintln!("latency bench: aggregator stopped: {e}");
            }
        }),
        tokio::spawn(async move {
            if let Err(e) = agent.run(async move { s2.cancelled().await }).await {
                eprintln!("latency bench: agent stopped: {e}");
            }
        }),
    ];
    let result = measure(args, case, addr, &feed_url, &metrics).await;
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    drop(broker);
    drop(scratch);
    result
}

/// Latencies of the spikes, keyed by device, as the feed client sees them.
type Sent = Arc<Mutex<HashMap<String, Instant>>>;

async fn measure(
    args: &LatencyArgs,
    case: Case,
    addr: SocketAddr,
    feed_url: &str,
    metrics: &Arc<AgentMetrics>,
) -> anyhow::Result<Figures> {
    let (ws, _) = tokio_tungstenite::connect_async(feed_url)
        .await
        .with_context(|| format!("connecting to the feed at {feed_url}"))?;
    let sent: Sent = Arc::default();
    let lat: Arc<Mutex<Vec<f64>>> = Arc::default();
    let seen = Arc::new(AtomicU64::new(0));
    let reader = {
        let (sent, lat, seen) = (sent.clone(), lat.clone(), seen.clone());
        tokio::spawn(async move {
            let (_w, mut r) = ws.split();
            while let Some(Ok(m)) = r.next().await {
                let Message::Text(t) = m else { continue };
                let now = Instant::now();
                let Ok(e) = serde_json::from_str::<AnomalyEvent>(&t) else {
                    continue;
                };
                let at = sent.lock().ok().and_then(|mut s| s.remove(&e.device));
                if let Some(at) = at {
                    if let Ok(mut l) = lat.lock() {
                        l.push(now.duration_since(at).as_secs_f64() * 1e3);
                    }
                    seen.fetch_add(1, Relaxed);
                }
            }
        })
    };

    // Warm every spike series up, plus one probe series whose spike proves the whole path works
    // before anything is measured.
    let spikes = args.latency_spikes;
    let warm = sensor(addr, "bench-latency-warm");
    let mut warmup = Vec::with_capacity((spikes + 1) * WARMUP_READINGS as usize);
    for i in 0..WARMUP_READINGS {
        for k in 0..=spikes {
            let v = 20.0 + ((i * 7 + k as i64) % 5) as f64 * 0.2;
            warmup.push((
                spike_topic(k),
                format!(r#"{{"ts":{},"value":{v}}}"#, T0_MS + i * 1000),
            ));
        }
    }
    let before = metrics.readings_total.load(Relaxed);
    // The agent subscribes once connected: its first reading says it has.
    let deadline = Instant::now() + Duration::from_secs(30);
    while metrics.readings_total.load(Relaxed) == before {
        if Instant::now() > deadline {
            bail!("the agent took no reading within 30 s of its start: it did not subscribe");
        }
        let (topic, payload) = &warmup[0];
        warm.publish(topic.clone(), QoS::AtMostOnce, false, payload.clone())
            .await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the probes still in flight arrive before counting.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = metrics.readings_total.load(Relaxed);
    publish_paced(&warm, &warmup, metrics, before).await?;
    let probe = spike_device(spikes);
    sent.lock()
        .map_err(|_| anyhow::anyhow!("latency map poisoned"))?
        .insert(probe.clone(), Instant::now());
    warm.publish(spike_topic(spikes), case.qos, false, spike_payload())
        .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.load(Relaxed) == 0 {
        if Instant::now() > deadline {
            bail!("the probe spike's event did not reach the feed within 30 s: the path from sensor to feed is broken");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    lat.lock()
        .map_err(|_| anyhow::anyhow!("latency list poisoned"))?
        .clear();
    seen.store(0, Relaxed);

    // The background load, until `stop_bg`.
    let stop_bg = CancellationToken::new();
    let bg_published = Arc::new(AtomicU64::new(0));
    let bg = tokio::spawn(background(
        sensor(addr, "bench-latency-bg"),
        args.latency_background,
        args.latency_series.max(1),
        case.qos,
        bg_published.clone(),
        stop_bg.clone(),
    ));
    tokio::time::sleep(SETTLE).await;

    let spiker = sensor(addr, "bench-latency-spikes");
    let bg_start = (bg_published.load(Relaxed), Instant::now());
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for k in 0..spikes {
        // 5..15 ms apart: xorshift, seeded, so every run sends the same pattern.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        tokio::time::sleep(Duration::from_micros(5_000 + rng % 10_000)).await;
        let at = Instant::now();
        sent.lock()
            .map_err(|_| anyhow::anyhow!("latency map poisoned"))?
            .insert(spike_device(k), at);
        spiker
            .publish(spike_topic(k), case.qos, false, spike_payload())
            .await?;
    }
    let bg_rate = (bg_published.load(Relaxed) - bg_start.0) as f64
        / bg_start.1.elapsed().as_secs_f64().max(1e-9);
    let deadline = Instant::now() + DRAIN;
    while seen.load(Relaxed) < spikes as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop_bg.cancel();
    let published = bg.await.unwrap_or(0) + warmup.len() as u64 + 1 + spikes as u64;
    // What the broker delivered by now; the last background readings may still be in flight.
    let deadline = Instant::now() + Duration::from_secs(2);
    while metrics.readings_total.load(Relaxed) - before < published && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    reader.abort();
    let mut ms = lat
        .lock()
        .map(|l| l.clone())
        .map_err(|_| anyhow::anyhow!("latency list poisoned"))?;
    if ms.is_empty() {
        bail!("no spike's event reached the feed");
    }
    ms.sort_by(f64::total_cmp);
    Ok(Figures {
        ms,
        background: bg_rate,
        taken: metrics.readings_total.load(Relaxed) - before,
        published,
    })
}

fn spike_device(k: usize) -> String {
    format!("lat-{k}")
}

fn spike_topic(k: usize) -> String {
    format!("sensors/{}/temp", spike_device(k))
}

/// The spike: far outside its series' warm-up values, one second of event time after them.
fn spike_payload() -> String {
    format!(
        r#"{{"ts":{},"value":90.0}}"#,
        T0_MS + WARMUP_READINGS * 1000
    )
}

/// Publishes `data` at QoS 0, keeping at most 2,000 readings between publisher and agent (brokers
/// drop rather than hold back), and waits until the agent took them all.
async fn publish_paced(
    client: &AsyncClient,
    data: &[(String, String)],
    agent: &AgentMetrics,
    before: u64,
) -> anyhow::Result<()> {
    let taken = || agent.readings_total.load(Relaxed) - before;
    for (n, (topic, payload)) in data.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(30);
        while (n as u64).saturating_sub(taken()) > 2_000 {
            if Instant::now() > deadline {
                bail!("the agent took only {} of {n} warm-up readings within 30 s (the broker dropped some)", taken());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        client
            .publish(topic.clone(), QoS::AtMostOnce, false, payload.clone())
            .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while taken() < data.len() as u64 {
        if Instant::now() > deadline {
            bail!(
                "the agent took only {} of {} warm-up readings within 30 s (the broker dropped some)",
                taken(),
                data.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

/// Publishes `rate` ordinary readings per second, round robin over `series` series (`bg-{i}`,
/// event time one second per reading of a series), until `stop`; returns how many it published.
async fn background(
    client: AsyncClient,
    rate: u64,
    series: usize,
    qos: QoS,
    published: Arc<AtomicU64>,
    stop: CancellationToken,
) -> u64 {
    if rate == 0 {
        return 0;
    }
    let topics: Vec<String> = (0..series)
        .map(|i| format!("sensors/bg-{i}/temp"))
        .collect();
    let start = Instant::now();
    let mut n = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        // Catch up with the schedule, at most 100 ms of it at once (a stalled publisher does
        // not turn into a burst).
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        let due = due.min(n + rate / 10 + 1);
        while n < due {
            let i = (n % series as u64) as usize;
            let step = (n / series as u64) as i64;
            let v = 20.0 + ((step * 7 + i as i64) % 5) as f64 * 0.2;
            let payload = format!(r#"{{"ts":{},"value":{v}}}"#, T0_MS + step * 1000);
            if client
                .publish(topics[i].as_str(), qos, false, payload)
                .await
                .is_err()
            {
                return n;
            }
            n += 1;
            published.store(n, Relaxed);
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        l: LatencyArgs,
    }

    fn cases(args: &[&str]) -> Vec<(BrokerChoice, bool, u8)> {
        let cli = Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied())).unwrap();
        cli.l
            .cases()
            .into_iter()
            .map(|c| (c.broker, c.durable, c.qos as u8))
            .collect()
    }

    #[test]
    fn the_default_is_one_run_through_the_embedded_broker_in_memory_at_qos_0() {
        assert_eq!(cases(&[]), vec![(BrokerChoice::Embedded, false, 0)]);
    }

    #[test]
    fn both_expands_and_repeats_collapse() {
        use BrokerChoice::*;
        assert_eq!(
            cases(&[
                "--latency-broker",
                "both",
                "--latency-broker",
                "embedded",
                "--latency-durable",
                "both",
                "--latency-qos",
                "1",
                "--latency-qos",
                "both"
            ]),
            vec![
                (Embedded, false, 0),
                (Embedded, false, 1),
                (Embedded, true, 0),
                (Embedded, true, 1),
                (Mosquitto, false, 0),
                (Mosquitto, false, 1),
                (Mosquitto, true, 0),
                (Mosquitto, true, 1),
            ]
        );
    }

    #[test]
    fn a_bare_durable_flag_means_on() {
        assert_eq!(
            cases(&["--latency-durable", "--latency-broker", "mosquitto"]),
            vec![(BrokerChoice::Mosquitto, true, 0)]
        );
        assert_eq!(
            cases(&["--latency-durable=off"]),
            vec![(BrokerChoice::Embedded, false, 0)]
        );
    }
}
