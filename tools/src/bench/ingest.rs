//! `bench --section ingest`: what the agent costs per reading through a real broker. A raw
//! publisher drives mosquitto (or the embedded broker) as fast as it takes readings; first a plain
//! rumqttc subscriber measures the broker's own 1→1 forwarding rate, then each agent binary (a
//! child process `edgewatch agent --config …`, defaults, QoS 1 subscription) takes the same load
//! and its readings/s, CPU µs per reading and share of a core (`/proc/<pid>/stat`) are printed.

use super::delivery::Scratch;
use super::{broker, load_average, wall_ms};
use anyhow::{bail, Context};
use clap::ValueEnum;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Which broker the ingest section drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IngestBroker {
    /// Debian's mosquitto (`/usr/sbin/mosquitto` or on PATH), started on a free loopback port.
    Mosquitto,
    /// The embedded rumqttd broker in this process (drops for slow subscribers: counted).
    Embedded,
}

/// Settings of the ingest section.
pub(super) struct IngestBench {
    /// Readings published per run.
    pub readings: u64,
    /// Series they are spread over (`sensors/ingest-NNNNN/temp`).
    pub series: usize,
    /// QoS of the raw publisher (the agent and the plain subscriber subscribe at QoS 1; the broker
    /// delivers at the lower of the two).
    pub qos: u8,
    /// The broker (default: mosquitto when installed).
    pub broker: Option<IngestBroker>,
    /// Agent binaries to run in turn (default: this one).
    pub agents: Vec<PathBuf>,
    /// Where the temporary configuration files go.
    pub base: PathBuf,
}

/// Path of the mosquitto binary, if installed.
pub(super) fn find_mosquitto() -> Option<PathBuf> {
    super::find_program("mosquitto")
}

/// A broker for the section: a mosquitto child (killed on drop) or the embedded broker.
enum Broker {
    Mosquitto {
        child: Child,
        _dir: Scratch,
    },
    Embedded {
        _broker: crate::broker::EmbeddedBroker,
    },
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Broker::Mosquitto { child, .. } = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_listening(port: u16, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("{what} did not listen on 127.0.0.1:{port} within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn start_broker(kind: IngestBroker, base: &Path) -> anyhow::Result<(Broker, u16)> {
    match kind {
        IngestBroker::Embedded => {
            let b = broker()?;
            let port = b.addr().port();
            Ok((Broker::Embedded { _broker: b }, port))
        }
        IngestBroker::Mosquitto => {
            let bin = find_mosquitto()
                .context("mosquitto not found on PATH or in /usr/sbin (apt-get install -y mosquitto, or --ingest-broker embedded)")?;
            let scratch = Scratch::new(base, "ingest-mosquitto")?;
            let port = free_port()?;
            // Unlimited queues: a subscriber slower than the publisher is queued for, never
            // dropped, so every reading reaches it and the figures count the same readings.
            let (child, _) = super::spawn_mosquitto(&bin, &scratch.0, port)?;
            let b = Broker::Mosquitto {
                child,
                _dir: scratch,
            };
            wait_listening(port, "mosquitto").await?;
            Ok((b, port))
        }
    }
}

/// The section: broker forwarding rate, then each agent under the same load.
pub(super) async fn run(b: &IngestBench) -> anyhow::Result<()> {
    let kind = b.broker.unwrap_or(if find_mosquitto().is_some() {
        IngestBroker::Mosquitto
    } else {
        IngestBroker::Embedded
    });
    let name = match kind {
        IngestBroker::Mosquitto => "mosquitto",
        IngestBroker::Embedded => "embedded broker",
    };
    let (_broker, port) = start_broker(kind, &b.base).await?;
    let series = b.series.max(1);
    let load = Load::new(b.readings, series);
    // (a) The broker's own 1→1 forwarding: a plain subscriber takes the load.
    let fwd = forwarding(port, &load, b.qos).await?;
    println!(
        "ingest via {name}: broker 1->1 forwarding {:>10.0} readings/s (plain rumqttc subscriber at QoS 1, publisher QoS {}; received {} of {}; {} series; load average {})",
        fwd.rate,
        b.qos,
        fwd.received,
        b.readings,
        series,
        load_average()
    );
    let agents = if b.agents.is_empty() {
        vec![std::env::current_exe()?]
    } else {
        b.agents.clone()
    };
    for bin in &agents {
        let r = agent_run(bin, port, &load, b.qos, &b.base).await?;
        println!(
            "ingest via {name}: agent {:>10.0} readings/s ({:.2} of the broker's rate), {:>5.2} us CPU per reading, {:>5.1} % of a core (processed {} of {}, {} messages; {}; load average {})",
            r.rate,
            r.rate / fwd.rate,
            r.cpu_us_per_reading,
            r.core_share * 100.0,
            r.readings,
            b.readings,
            r.messages,
            bin.display(),
            load_average()
        );
    }
    Ok(())
}

/// The readings published: `readings` over `series` series, one per series and second of event
/// time, ending a minute ago (within every window and clock limit of the agent).
struct Load {
    readings: u64,
    topics: Vec<String>,
    t0_ms: i64,
}

impl Load {
    fn new(readings: u64, series: usize) -> Self {
        let steps = readings.div_ceil(series as u64) as i64;
        let t0_ms = (wall_ms() - 60_000 - steps * 1000) / 60_000 * 60_000;
        Self {
            readings,
            topics: (0..series)
                .map(|i| format!("sensors/ingest-{i:05}/temp"))
                .collect(),
            t0_ms,
        }
    }

    /// Topic and payload of reading `i`.
    fn reading(&self, i: u64) -> (String, Vec<u8>) {
        let n = self.topics.len() as u64;
        let (step, s) = (i / n, (i % n) as usize);
        let v = 20.0 + ((step * 7 + s as u64) % 17) as f64 * 0.25;
        let ts = self.t0_ms + step as i64 * 1000;
        (
            self.topics[s].clone(),
            format!(r#"{{"ts":{ts},"value":{v}}}"#).into_bytes(),
        )
    }
}

fn client(port: u16, id: &str) -> (AsyncClient, rumqttc::EventLoop) {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_request_channel_capacity(1000)
        .set_inflight(1000)
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(1 << 20, 1 << 20);
    let (c, mut el) = AsyncClient::new(o, 1000);
    el.network_options.set_tcp_nodelay(true);
    (c, el)
}

/// Publishes the whole load as fast as the client and broker take it; returns when every publish
/// was handed to the client (QoS 0: written; QoS 1: the rest waits in the client's window).
async fn publish_all(port: u16, load: &Load, qos: u8) -> anyhow::Result<()> {
    let (c, mut el) = client(port, "bench-ingest-pub");
    let driver = tokio::spawn(async move { while el.poll().await.is_ok() {} });
    let qos = if qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    for i in 0..load.readings {
        let (topic, payload) = load.reading(i);
        c.publish(topic, qos, false, payload).await?;
    }
    // The client's queue empties once the event loop has written everything; the driver ends
    // when the disconnect behind it is written.
    c.disconnect().await?;
    let _ = tokio::time::timeout(Duration::from_secs(120), driver).await;
    Ok(())
}

struct Forwarding {
    rate: f64,
    received: u64,
}

/// Phase (a): a plain subscriber counts what the broker forwards.
async fn forwarding(port: u16, load: &Load, qos: u8) -> anyhow::Result<Forwarding> {
    let (c, mut el) = client(port, "bench-ingest-sub");
    let received = Arc::new(AtomicU64::new(0));
    let subscribed = Arc::new(tokio::sync::Notify::new());
    let sub = {
        let (received, subscribed) = (received.clone(), subscribed.clone());
        tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::Publish(_))) => {
                        received.fetch_add(1, Relaxed);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => subscribed.notify_one(),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        })
    };
    c.subscribe("sensors/+/+", QoS::AtLeastOnce).await?;
    tokio::time::timeout(Duration::from_secs(10), subscribed.notified())
        .await
        .context("the plain subscriber's SUBACK did not arrive within 10 s")?;
    let start = Instant::now();
    let publisher = publish_all(port, load, qos);
    let (published, (got, end)) = tokio::join!(
        publisher,
        wait_count(|| received.load(Relaxed), load.readings)
    );
    published?;
    let _ = c.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), sub).await;
    let secs = end.duration_since(start).as_secs_f64();
    Ok(Forwarding {
        rate: got as f64 / secs,
        received: got,
    })
}

/// Waits until `count()` reaches `want` or stops moving for 5 s; the count and when it last moved.
async fn wait_count(count: impl Fn() -> u64, want: u64) -> (u64, Instant) {
    let mut last = (count(), Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let n = count();
        if n != last.0 {
            last = (n, Instant::now());
        }
        if n >= want || last.1.elapsed() > Duration::from_secs(5) {
            return last;
        }
    }
}

struct AgentRun {
    rate: f64,
    cpu_us_per_reading: f64,
    core_share: f64,
    readings: u64,
    messages: u64,
}

/// An agent child process, killed on drop.
struct AgentChild(Child);

impl Drop for AgentChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// utime + stime of `pid` (every thread), seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/<pid>/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime field 15.
    let ticks: f64 = f
        .get(11)
        .zip(f.get(12))
        .and_then(|(u, s)| Some(u.parse::<f64>().ok()? + s.parse::<f64>().ok()?))
        .context("no utime/stime in /proc/<pid>/stat")?;
    Ok(ticks / clock_ticks_per_sec())
}

/// `getconf CLK_TCK`: 100 on every Linux this runs on (USER_HZ is fixed by the kernel ABI).
fn clock_ticks_per_sec() -> f64 {
    100.0
}

/// A counter of the agent's `/metrics` (0 when absent).
async fn metric(addr: &str, name: &str) -> anyhow::Result<u64> {
    let r = crate::http::Get::new(addr, "/metrics")
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .with_context(|| format!("GET http://{addr}/metrics"))?;
    let text = r.text();
    Ok(text
        .lines()
        .find_map(|l| {
            // `name{agent="…"} 123` or `name 123`.
            let rest = l.strip_prefix(name)?;
            if !rest.starts_with(['{', ' ']) {
                return None;
            }
            rest.rsplit(' ').next()?.trim().parse::<f64>().ok()
        })
        .map_or(0, |v| v as u64))
}

/// Phase (b): one agent binary under the load.
async fn agent_run(
    bin: &Path,
    port: u16,
    load: &Load,
    qos: u8,
    base: &Path,
) -> anyhow::Result<AgentRun> {
    let scratch = Scratch::new(base, "ingest-agent")?;
    let http_port = free_port()?;
    let conf = scratch.0.join("agent.yaml");
    // Defaults everywhere (QoS 1 subscription, default detector, no state.dir) but the brokers
    // and the metrics endpoint.
    std::fs::write(
        &conf,
        format!(
            "id: bench-ingest\nsource:\n  mqtt: {{ host: 127.0.0.1, port: {port} }}\nhttp:\n  listen: 127.0.0.1:{http_port}\n"
        ),
    )?;
    let child = Command::new(bin)
        .args(["--log-level", "error", "agent", "--config"])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {} agent", bin.display()))?;
    let child = AgentChild(child);
    let pid = child.0.id();
    let addr = format!("127.0.0.1:{http_port}");
    wait_listening(http_port, "the agent's http endpoint").await?;
    // Warm up until a reading arrives: the subscription is then in place.
    let (c, mut el) = client(port, "bench-ingest-warmup");
    let driver = tokio::spawn(async move { while el.poll().await.is_ok() {} });
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&addr, "edgewatch_agent_readings_total").await? == 0 {
        if Instant::now() > deadline {
            bail!("the agent ({}) took no reading within 20 s", bin.display());
        }
        let ts = wall_ms();
        c.publish(
            "sensors/ingest-warmup/temp",
            QoS::AtLeastOnce,
            false,
            format!(r#"{{"ts":{ts},"value":1}}"#),
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = c.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), driver).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r0 = metric(&addr, "edgewatch_agent_readings_total").await?;
    let m0 = metric(&addr, "edgewatch_agent_messages_total").await?;
    let cpu0 = cpu_seconds(pid)?;
    let start = Instant::now();
    let poller = {
        let addr = addr.clone();
        async move {
            let mut last = (0u64, Instant::now(), cpu0);
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let n = metric(&addr, "edgewatch_agent_readings_total")
                    .await?
                    .saturating_sub(r0);
                if n != last.0 {
                    last = (n, Instant::now(), cpu_seconds(pid)?);
                }
                if n >= load.readings || last.1.elapsed() > Duration::from_secs(5) {
                    return anyhow::Ok(last);
                }
            }
        }
    };
    let (published, polled) = tokio::join!(publish_all(port, load, qos), poller);
    published?;
    let (readings, end, cpu1) = polled?;
    let messages = metric(&addr, "edgewatch_agent_messages_total")
        .await?
        .saturating_sub(m0);
    let secs = end.duration_since(start).as_secs_f64();
    let cpu = cpu1 - cpu0;
    // A clean stop, so the agent's own shutdown is not part of any figure.
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let mut child = child;
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.0.try_wait()?.is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(child);
    drop(scratch);
    if readings == 0 {
        bail!(
            "the agent ({}) processed no reading of the load",
            bin.display()
        );
    }
    Ok(AgentRun {
        rate: readings as f64 / secs,
        cpu_us_per_reading: cpu * 1e6 / readings as f64,
        core_share: cpu / secs,
        readings,
        messages,
    })
}
