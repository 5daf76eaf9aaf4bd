//! The edgewatch gateway agent: subscribes to sensor readings over MQTT, runs windowed anomaly
//! detection per (device, metric), and forwards window summaries and anomaly events upstream.
//!
//! The per-reading work is a plain state machine ([`pipeline::Pipeline`]); this module wires it to two
//! MQTT links (source and uplink) with bounded queues between one task per concern.

mod checkpoint;
pub mod config;
pub mod error;
pub mod ingest;
pub mod outbox;
pub mod pipeline;
mod replay;
pub mod telemetry;
mod uplink;

pub use config::AgentConfig;
pub use error::{AgentError, IngestError, SnapshotError};
pub use telemetry::AgentMetrics;

use edgewatch_link as mqtt;
use edgewatch_models::wire::{AckBatch, Topics};
use mqtt::LinkEvent;
use outbox::{Outbox, OutboxConfig};
use pipeline::Pipeline;
use rumqttc::{AsyncClient, QoS};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A configured agent, ready to run.
pub struct Agent {
    cfg: AgentConfig,
    metrics: Arc<AgentMetrics>,
}

impl Agent {
    /// Validates the configuration (every problem is reported at once).
    pub fn new(cfg: AgentConfig) -> Result<Self, AgentError> {
        let problems = cfg.problems();
        if !problems.is_empty() {
            return Err(AgentError::Config(problems));
        }
        Ok(Self {
            cfg,
            metrics: Arc::new(AgentMetrics::default()),
        })
    }

    /// Live metrics of this agent.
    pub fn metrics(&self) -> Arc<AgentMetrics> {
        self.metrics.clone()
    }

    /// Runs until `shutdown` resolves, then drains: closes open windows, publishes what is pending
    /// and disconnects cleanly.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        let Agent { cfg, metrics } = self;
        let outbox = open_outbox(&cfg).await?;
        let mut outbox = outbox;
        let (mut pipeline, mut covered) = restore_pipeline(&cfg, &metrics, &mut outbox)?;
        let filters = pipeline.filters();
        let source_qos = qos(cfg.source.qos);
        let after_checkpoint = cfg.state.ack_mode == config::AckMode::AfterCheckpoint;

        let mut src_opts = mqtt::options(
            &cfg.source.mqtt,
            client_id(&cfg.source.mqtt, &cfg.id, "src"),
        )?;
        if cfg.state.dir.is_some() {
            // A durable agent has a persistent session: the broker queues readings while it
            // restarts. In after_checkpoint mode it also keeps the unacknowledged ones and
            // redelivers them; we acknowledge a reading only once a checkpoint covers it.
            for o in &mut src_opts {
                o.set_clean_session(false).set_manual_acks(after_checkpoint);
            }
        }
        let up_link = cfg.uplink_link();
        let up_opts = mqtt::options(up_link, client_id(up_link, &cfg.id, "up"))?;
        // `options` yields at least the primary address; the others are tried in turn on failure.
        let (src_client, mut src_loop) =
            AsyncClient::new(src_opts[0].clone(), cfg.source.mqtt.request_channel);
        let (up_client, mut up_loop) =
            AsyncClient::new(up_opts[0].clone(), up_link.request_channel);
        // Small messages, latency matters: no Nagle delay on either link.
        src_loop.network_options.set_tcp_nodelay(true);
        up_loop.network_options.set_tcp_nodelay(true);

        let (msg_tx, mut msg_rx) = mpsc::channel::<rumqttc::Publish>(cfg.pipeline.queue_capacity);
        let (out_tx, out_rx) = mpsc::channel::<uplink::ToUplink>(64);
        let (note_tx, note_rx) = mpsc::unbounded_channel::<uplink::LinkNote>();
        let stop_source = CancellationToken::new();
        let stop_uplink = CancellationToken::new();
        let when_full = cfg.pipeline.when_full;

        tracing::info!(agent = %cfg.id, filters = ?filters, broker = %format!("{}:{}", cfg.source.mqtt.host, cfg.source.mqtt.port), "agent starting");

        let accepting = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let stop_worker = CancellationToken::new();
        // Source link: decode nothing here, only hand off (the poll loop must never wait on slow work).
        let source = {
            let metrics = metrics.clone();
            let cancel = stop_source.clone();
            let client = src_client.clone();
            let accepting = accepting.clone();
            tokio::spawn(async move {
                mqtt::poll_loop(src_loop, src_opts, "source", &metrics.clone(), cancel, |ev| {
                    let client = client.clone();
                    let filters = filters.clone();
                    let msg_tx = msg_tx.clone();
                    let metrics = metrics.clone();
                    let accepting = accepting.clone();
                    async move {
                        match ev {
                            LinkEvent::Connected => {
                                for f in &filters {
                                    if let Err(e) = client.try_subscribe(f.clone(), source_qos) {
                                        tracing::error!(filter = %f, error = %e, "subscribe request failed");
                                    }
                                }
                            }
                            // Stopping in after_checkpoint mode: leave it unacknowledged for the
                            // broker to redeliver after the restart.
                            LinkEvent::Publish(_) if !accepting.load(Relaxed) => {}
                            LinkEvent::Publish(p) => match when_full {
                                config::WhenFull::Block => {
                                    // Closed only during shutdown; the message is then moot.
                                    let _ = msg_tx.send(p).await;
                                }
                                config::WhenFull::DropNewest => {
                                    if msg_tx.try_send(p).is_err() {
                                        metrics.queue_dropped_total.fetch_add(1, Relaxed);
                                    }
                                }
                            },
                            LinkEvent::PubAck | LinkEvent::Disconnected => {}
                        }
                    }
                })
                .await;
                let _ = client.try_disconnect();
            })
        };

        // Pipeline: the CPU work, in batches, with a checkpoint every `checkpoint_interval_ms`.
        let worker = {
            let agent = cfg.id.clone();
            let metrics_w = metrics.clone();
            let interval = Duration::from_millis(cfg.state.checkpoint_interval_ms);
            let src_client = src_client.clone();
            let flush_on_exit = cfg.state.dir.is_none() || cfg.state.flush_on_exit;
            // Without state.dir nothing survives a restart: a checkpoint would only fill the
            // temporary store.
            let durable = cfg.state.dir.is_some();
            let stop = stop_worker.clone();
            tokio::spawn(async move {
                let mut batch = Vec::with_capacity(512);
                let mut log = RejectLog::default();
                let mut late_log = telemetry::LogLimit::every(Duration::from_secs(5));
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut checkpoint = tokio::time::interval(interval);
                checkpoint.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                // after_checkpoint: readings processed since the last checkpoint, acknowledged once
                // the next checkpoint is durable.
                let mut unacked: Vec<rumqttc::Publish> = Vec::new();
                let mut replays = replay::Replays::default();
                let mut acker = Acker::default();
                let mut checkpoints = CheckpointClock::default();
                loop {
                    tokio::select! {
                        n = msg_rx.recv_many(&mut batch, 512) => {
                            if n == 0 {
                                break;
                            }
                            metrics_w.queue_depth.store(msg_rx.len() as u64, Relaxed);
                            let now = now_ms();
                            for p in batch.drain(..) {
                                if after_checkpoint && !covered.is_empty() {
                                    if p.dup && covered.remove(&p.pkid) {
                                        // Redelivered, but the restored checkpoint holds it.
                                        metrics_w.replays_skipped_total.fetch_add(1, Relaxed);
                                        // Remembered, should the connection drop before its ack.
                                        replays.check(p.pkid, false, &p.topic, &p.payload);
                                        unacked.push(p);
                                        continue;
                                    }
                                    if !p.dup {
                                        // Redeliveries come first: a fresh message ends them.
                                        covered.clear();
                                    }
                                }
                                if durable {
                                    // On a persistent session a reconnect makes the broker resend
                                    // what it saw no ack for, including readings already applied
                                    // (after_checkpoint: not acknowledged yet; on_receipt: the ack
                                    // was lost with the connection).
                                    match replays.check(p.pkid, p.dup, &p.topic, &p.payload) {
                                        replay::Seen::Fresh => {}
                                        replay::Seen::Pending => {
                                            metrics_w.replays_skipped_total.fetch_add(1, Relaxed);
                                            continue;
                                        }
                                        replay::Seen::Reacknowledge => {
                                            metrics_w.replays_skipped_total.fetch_add(1, Relaxed);
                                            if after_checkpoint {
                                                unacked.push(p);
                                            }
                                            continue;
                                        }
                                    }
                                }
                                if let Err(e) = pipeline.handle_topic(&p.topic, &p.payload, now) {
                                    log.record(&agent, &p.topic, &e);
                                }
                                if after_checkpoint {
                                    unacked.push(p);
                                }
                            }
                            if let Some(late) = pipeline.take_late_note() {
                                if let Some(suppressed) = late_log.ready_for(late.count) {
                                    tracing::warn!(agent = %agent, device = %late.device.escape_debug(), metric = %late.metric.escape_debug(), ts_ms = late.ts_ms, watermark_ms = late.watermark_ms, late_readings = late.count, suppressed, "readings dropped as late: their window had closed (window.allowed_lateness_ms, window.idle_timeout_ms)");
                                }
                            }
                        }
                        _ = tick.tick() => pipeline.tick(now_ms()),
                        _ = stop.cancelled() => break,
                        _ = checkpoint.tick(), if durable => {
                            if !take_checkpoint(&agent, &mut pipeline, &out_tx, &metrics_w, &mut unacked, &mut acker, &src_client, &mut checkpoints).await {
                                break;
                            }
                            if unacked.is_empty() {
                                // Everything applied so far now waits for that checkpoint's acks.
                                replays.checkpointed();
                            }
                            continue;
                        }
                    }
                    let out = pipeline.take_outputs();
                    if !out.is_empty() && out_tx.send(uplink::ToUplink::Outputs(out)).await.is_err()
                    {
                        break;
                    }
                }
                // Shutdown. With durable state, open windows stay open in a final checkpoint and
                // carry on after the restart; without it (or with flush_on_exit) they are closed and
                // sent now.
                if flush_on_exit {
                    pipeline.flush();
                }
                checkpoints.clean = true;
                if durable {
                    take_checkpoint(
                        &agent,
                        &mut pipeline,
                        &out_tx,
                        &metrics_w,
                        &mut unacked,
                        &mut acker,
                        &src_client,
                        &mut checkpoints,
                    )
                    .await;
                } else {
                    let out = pipeline.take_outputs();
                    if !out.is_empty() {
                        let _ = out_tx.send(uplink::ToUplink::Outputs(out)).await;
                    }
                }
                acker.finish().await;
            })
        };

        // QoS 1 publishes handed to the client vs. acknowledged by the broker: shutdown waits for the
        // two to meet, because closing a socket with unread PubAcks resets it, and a reset connection
        // loses whatever the broker had not read yet.
        let sent = Arc::new(AtomicU64::new(0));
        let acked = Arc::new(AtomicU64::new(0));
        let uplink_loop = {
            let metrics = metrics.clone();
            let cancel = stop_uplink.clone();
            let acked = acked.clone();
            let sent = sent.clone();
            let client = up_client.clone();
            let acks_topic = Topics::new(&cfg.uplink.prefix).acks(&cfg.id);
            let agent = cfg.id.clone();
            // Anyone may publish on the acks topic: a flood of garbage is counted, not logged.
            let mut bad_acks = telemetry::LogLimit::every(Duration::from_secs(10));
            tokio::spawn(async move {
                mqtt::poll_loop(up_loop, up_opts, "uplink", &metrics, cancel, |ev| {
                    match ev {
                        LinkEvent::PubAck => {
                            acked.fetch_add(1, Relaxed);
                        }
                        LinkEvent::Connected => {
                            // Publishes of the previous connection will never be acknowledged
                            // (rumqttc drops them with a clean session); the outbox resends them.
                            acked.store(sent.load(Relaxed), Relaxed);
                            if let Err(e) = client.try_subscribe(acks_topic.clone(), QoS::AtLeastOnce) {
                                tracing::error!(topic = %acks_topic, error = %e, "subscribe request failed");
                            }
                            let _ = note_tx.send(uplink::LinkNote::Up);
                        }
                        LinkEvent::Disconnected => {
                            let _ = note_tx.send(uplink::LinkNote::Down);
                        }
                        LinkEvent::Publish(p) => match serde_json::from_slice::<AckBatch>(&p.payload) {
                            Ok(batch) => {
                                let _ = note_tx.send(uplink::LinkNote::Acks(batch));
                            }
                            Err(e) => {
                                metrics.bad_acks_total.fetch_add(1, Relaxed);
                                if let Some(suppressed) = bad_acks.ready() {
                                    tracing::warn!(agent = %agent, topic = %p.topic, error = %e, suppressed, "malformed ack message ignored (logged at most every 10 s; all counted in edgewatch_agent_bad_acks_total)");
                                }
                            }
                        },
                    }
                    async {}
                })
                .await;
            })
        };
        let uplink = {
            let up =
                uplink::Uplink::new(uplink_settings(&cfg), outbox, metrics.clone(), sent.clone());
            let client = up_client.clone();
            // sled calls block: the uplink owns the outbox on a thread of its own.
            let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
            std::thread::Builder::new()
                .name(format!("uplink-{}", cfg.id))
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_time()
                        .build()
                    {
                        Ok(rt) => rt.block_on(up.run(out_rx, note_rx, client)),
                        Err(e) => tracing::error!(error = %e, "could not start the uplink runtime"),
                    }
                    let _ = done_tx.send(());
                })
                .map_err(|e| AgentError::Io(format!("could not start the uplink thread: {e}")))?;
            done_rx
        };

        shutdown.await;
        tracing::info!(agent = %cfg.id, "agent stopping: draining open windows and pending publishes");
        if after_checkpoint {
            // Keep the source connection up until the final checkpoint's readings are
            // acknowledged; whatever arrives meanwhile stays unacknowledged for redelivery.
            accepting.store(false, Relaxed);
            stop_worker.cancel();
            let _ = worker.await;
            if src_client.disconnect().await.is_err() {
                stop_source.cancel();
            }
            if tokio::time::timeout(Duration::from_secs(5), source)
                .await
                .is_err()
            {
                tracing::warn!(agent = %cfg.id, "source link did not close within 5 s");
                stop_source.cancel();
            }
        } else {
            stop_source.cancel();
            let _ = source.await;
            let _ = worker.await;
        }
        let _ = uplink.await;
        if cfg.uplink.qos > 0 {
            let deadline = Instant::now() + Duration::from_secs(10);
            while acked.load(Relaxed) < sent.load(Relaxed) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let missing = sent.load(Relaxed).saturating_sub(acked.load(Relaxed));
            if missing > 0 {
                tracing::warn!(agent = %cfg.id, missing, "uplink publishes not acknowledged by the broker within 10 s of shutdown");
            }
        }
        // Everything is queued in the client; a Disconnect behind it ends the poll loop once written.
        if up_client.disconnect().await.is_err() {
            stop_uplink.cancel();
        }
        if tokio::time::timeout(Duration::from_secs(5), uplink_loop)
            .await
            .is_err()
        {
            tracing::warn!(agent = %cfg.id, "uplink did not flush within 5 s");
            stop_uplink.cancel();
        }
        let m = &metrics;
        tracing::info!(
            agent = %cfg.id,
            messages = m.messages_total.load(Relaxed),
            readings = m.readings_total.load(Relaxed),
            rejected = %m.rejected_summary(),
            late_readings = m.late_readings_total.load(Relaxed),
            windows = m.windows_total.load(Relaxed),
            anomalies = m.anomalies_total.load(Relaxed),
            series = m.series.load(Relaxed),
            oversized_packets = m.oversized_packets_total.load(Relaxed),
            "agent stopped"
        );
        Ok(())
    }
}

fn uplink_settings(cfg: &AgentConfig) -> uplink::UplinkSettings {
    let u = &cfg.uplink;
    uplink::UplinkSettings {
        agent: cfg.id.clone(),
        topics: Topics::new(&u.prefix),
        qos: qos(u.qos),
        batch_max: u.batch_max_records,
        max_delay: Duration::from_millis(u.batch_max_delay_ms),
        ack_timeout: Duration::from_millis(u.ack_timeout_ms),
        max_unacked: u.max_unacked_records,
        drain_rate: u.drain_records_per_sec as f64,
        shutdown_wait: Duration::from_millis(u.shutdown_wait_ms),
    }
}

/// Opens the outbox in `state.dir`, or a temporary one (logged) when there is none.
async fn open_outbox(cfg: &AgentConfig) -> Result<Outbox, AgentError> {
    let ocfg = OutboxConfig {
        max_outbox_bytes: cfg.uplink.max_outbox_bytes,
        normal_score_below: cfg
            .uplink
            .coarsen_below_score
            .unwrap_or_else(|| cfg.threshold()),
    };
    let dir = cfg.state.dir.clone();
    let agent = cfg.id.clone();
    let opened = tokio::task::spawn_blocking(move || match &dir {
        Some(dir) => Outbox::open(dir, ocfg),
        None => {
            tracing::warn!(agent = %agent, "no state.dir: the outbox is temporary, so a restart loses what was not yet acknowledged");
            Outbox::open_temporary(ocfg)
        }
    })
    .await
    .map_err(|e| AgentError::Io(format!("outbox open task failed: {e}")))?;
    let outbox = opened.map_err(AgentError::Outbox)?;
    let pending = outbox.records();
    if pending > 0 {
        tracing::info!(agent = %cfg.id, records = pending, bytes = outbox.bytes(), "outbox holds records from before the restart; resending them");
    }
    Ok(outbox)
}

/// Rate bookkeeping between checkpoints.
#[derive(Default)]
struct CheckpointClock {
    last: Option<(Instant, u64)>,
    rate: f64,
    clean: bool,
    /// The stored header is an idle one (no change, rate 0): the next idle checkpoint is skipped.
    idle_written: bool,
}

/// Hands the pipeline's pending outputs, then a snapshot of it, to the uplink (which stores the
/// checkpoint behind those outputs and flushes both); in `after_checkpoint` mode the readings it
/// covers are then acknowledged. Returns false when the uplink is gone.
#[allow(clippy::too_many_arguments)]
async fn take_checkpoint(
    agent: &str,
    pipeline: &mut Pipeline,
    out_tx: &mpsc::Sender<uplink::ToUplink>,
    metrics: &AgentMetrics,
    unacked: &mut Vec<rumqttc::Publish>,
    acker: &mut Acker,
    src: &AsyncClient,
    clock: &mut CheckpointClock,
) -> bool {
    let out = pipeline.take_outputs();
    if !out.is_empty() && out_tx.send(uplink::ToUplink::Outputs(out)).await.is_err() {
        return false;
    }
    let changed = match pipeline.take_changed() {
        Ok(c) => c,
        Err(e) => {
            metrics.checkpoint_errors_total.fetch_add(1, Relaxed);
            tracing::error!(agent, error = %e, "pipeline snapshot failed; keeping the previous checkpoint");
            return true;
        }
    };
    let now = Instant::now();
    let readings = metrics.readings_total.load(Relaxed);
    if let Some((at, before)) = clock.last {
        let secs = now.duration_since(at).as_secs_f64();
        if secs > 0.0 {
            clock.rate = readings.saturating_sub(before) as f64 / secs;
        }
    }
    clock.last = Some((now, readings));
    // Nothing changed, nothing to acknowledge, and the stored header already says so (rate 0):
    // an idle agent writes nothing at all.
    let idle = changed.rows.is_empty() && unacked.is_empty() && !clock.clean && clock.rate == 0.0;
    if idle && clock.idle_written {
        return true;
    }
    clock.idle_written = idle;
    let header = checkpoint::Header {
        wall_ms: now_ms(),
        rate: clock.rate,
        clean: clock.clean,
        fingerprint: changed.fingerprint,
        series: changed.series,
        covered_pkids: unacked.iter().map(|p| p.pkid).collect(),
    };
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    if out_tx
        .send(uplink::ToUplink::Checkpoint {
            header: header.encode(),
            rows: changed.rows,
            done: Some(done_tx),
        })
        .await
        .is_err()
    {
        return false;
    }
    if !unacked.is_empty() {
        acker.push(src, done_rx, std::mem::take(unacked));
    }
    true
}

/// Acknowledges source readings (manual acks) once the checkpoint covering them is durable, in
/// order, on a task of its own so the pipeline never waits for the disk.
#[derive(Default)]
struct Acker {
    tx: Option<mpsc::UnboundedSender<(tokio::sync::oneshot::Receiver<()>, Vec<rumqttc::Publish>)>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Acker {
    fn push(
        &mut self,
        src: &AsyncClient,
        done: tokio::sync::oneshot::Receiver<()>,
        readings: Vec<rumqttc::Publish>,
    ) {
        let tx = self.tx.get_or_insert_with(|| {
            let (tx, mut rx) = mpsc::unbounded_channel::<(
                tokio::sync::oneshot::Receiver<()>,
                Vec<rumqttc::Publish>,
            )>();
            let client = src.clone();
            self.task = Some(tokio::spawn(async move {
                while let Some((done, readings)) = rx.recv().await {
                    if done.await.is_err() {
                        // The checkpoint was not stored: leave the readings unacknowledged, so the
                        // broker redelivers them after the next reconnect.
                        continue;
                    }
                    for p in &readings {
                        if client.ack(p).await.is_err() {
                            return;
                        }
                    }
                }
            }));
            tx
        });
        let _ = tx.send((done, readings));
    }

    /// Waits until every pushed batch is acknowledged (or dropped with its checkpoint).
    async fn finish(self) {
        drop(self.tx);
        if let Some(task) = self.task {
            let _ = task.await;
        }
    }
}

/// The pipeline of the last checkpoint in the outbox database, or a fresh one (logged) when there
/// is none or it cannot be used (the unusable checkpoint is then deleted, so the fresh state's
/// rows start clean). In `on_receipt` mode, after a crash, estimates the readings lost since that
/// checkpoint from the rate before it (log and metric).
fn restore_pipeline(
    cfg: &AgentConfig,
    metrics: &Arc<AgentMetrics>,
    outbox: &mut Outbox,
) -> Result<(Pipeline, HashSet<u16>), AgentError> {
    let restored = match outbox.checkpoint() {
        Ok(None) => return Ok((Pipeline::new(cfg, metrics.clone())?, HashSet::new())),
        Ok(Some((header, rows))) => checkpoint::Header::decode(&header).and_then(|h| {
            let rows = checkpoint::complete_rows(h.series, &rows)?;
            Pipeline::restore_rows(cfg, metrics.clone(), h.fingerprint, rows)
                .map(|p| (h, p))
                .map_err(|e| e.to_string())
        }),
        Err(e) => Err(format!("cannot read the checkpoint: {e}")),
    };
    match restored {
        Ok((h, mut p)) => {
            p.supersede_after_restore();
            p.touch_all(now_ms());
            let age_ms = now_ms().saturating_sub(h.wall_ms).max(0);
            tracing::info!(agent = %cfg.id, series = p.series(), age_ms, clean = h.clean, "resumed from the last checkpoint");
            if !h.clean && cfg.state.ack_mode == config::AckMode::OnReceipt {
                let window = age_ms.min(cfg.state.checkpoint_interval_ms as i64) as f64 / 1000.0;
                let lost = (h.rate * window).round() as u64;
                metrics.restart_loss_estimate.store(lost, Relaxed);
                tracing::warn!(agent = %cfg.id, estimated_lost_readings = lost, rate_per_sec = h.rate.round(), "the agent did not stop cleanly: readings received after the last checkpoint were lost (ack_mode on_receipt); use after_checkpoint to have the broker redeliver them");
            }
            Ok((p, h.covered_pkids.into_iter().collect()))
        }
        Err(why) => {
            tracing::warn!(agent = %cfg.id, error = %why, "checkpoint not usable (configuration changed?); starting with empty state");
            if let Err(e) = outbox.clear_checkpoint() {
                tracing::warn!(agent = %cfg.id, error = %e, "could not delete the unusable checkpoint");
            }
            Ok((Pipeline::new(cfg, metrics.clone())?, HashSet::new()))
        }
    }
}

/// Runs an agent with `cfg` until `shutdown` resolves.
pub async fn run(cfg: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    Agent::new(cfg)?.run(shutdown).await
}

fn qos(q: u8) -> QoS {
    if q == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

fn client_id(link: &mqtt::MqttLink, agent: &str, role: &str) -> String {
    link.client_id.as_ref().map_or_else(
        || format!("edgewatch-{agent}-{role}"),
        |c| format!("{c}-{role}"),
    )
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Logs rejected messages with their topic, at most once per reason every 5 s (plus a count of the
/// suppressed ones), so a misbehaving sensor cannot flood the log. Everything is counted regardless.
#[derive(Default)]
struct RejectLog {
    by_reason: HashMap<&'static str, telemetry::LogLimit>,
}

impl RejectLog {
    fn record(&mut self, agent: &str, topic: &str, e: &IngestError) {
        let limit = self
            .by_reason
            .entry(e.reason())
            .or_insert_with(|| telemetry::LogLimit::every(Duration::from_secs(5)));
        if let Some(suppressed) = limit.ready() {
            tracing::warn!(agent, topic = %topic.escape_debug(), reason = e.reason(), error = %e, suppressed, "rejected sensor message");
        }
    }
}
