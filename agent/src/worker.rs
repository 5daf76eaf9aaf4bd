//! The pipeline worker task: takes raw publishes from the source queue in batches, skips
//! redeliveries already applied, runs the pipeline, hands its outputs to the uplink, and takes a
//! checkpoint every `checkpoint_interval_ms`; on stop it drains and takes the final checkpoint.

use crate::checkpoint::{self, Sink};
use crate::config::AgentConfig;
use crate::error::IngestError;
use crate::multivariate::{store, ModelOffer};
use crate::now_ms;
use crate::pipeline::Pipeline;
use crate::replay;
use crate::telemetry::{self, AgentMetrics};
use crate::uplink::link::ModelMessage;
use crate::uplink::ToUplink;
use rumqttc::AsyncClient;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

/// What the worker task needs.
pub(crate) struct Worker {
    pub agent: String,
    pub pipeline: Pipeline,
    /// after_checkpoint: packet ids the restored checkpoint covers (redeliveries to skip).
    pub covered: HashSet<u16>,
    pub msg_rx: mpsc::Receiver<rumqttc::Publish>,
    /// Models from the uplink broker (closed when `models.enabled` is false).
    pub model_rx: mpsc::Receiver<ModelMessage>,
    /// `state.dir/models` (accepted models are stored there); `None`: memory only.
    pub models_dir: Option<std::path::PathBuf>,
    pub out_tx: mpsc::Sender<ToUplink>,
    /// The source link's client (manual acks, and subscription changes on a live reload).
    pub src_client: AsyncClient,
    /// The source link's subscription filters.
    pub subscriptions: Arc<crate::source::Subscriptions>,
    pub metrics: Arc<AgentMetrics>,
    pub checkpoint_interval: Duration,
    pub after_checkpoint: bool,
    /// Close open windows on exit (no state.dir, or `state.flush_on_exit`).
    pub flush_on_exit: bool,
    /// state.dir is set: checkpoints are taken (without it nothing survives a restart, so a
    /// checkpoint would only fill the temporary store).
    pub durable: bool,
    /// The configuration in force: a reload changes thresholds, detector and batching live.
    pub cfg: watch::Receiver<Arc<AgentConfig>>,
    pub stop: CancellationToken,
}

impl Worker {
    /// Runs until the source queue closes, the uplink is gone or `stop` is cancelled, then drains.
    pub(crate) async fn run(self) {
        let Worker {
            agent,
            mut pipeline,
            mut covered,
            mut msg_rx,
            mut model_rx,
            models_dir,
            out_tx,
            src_client,
            subscriptions,
            metrics,
            checkpoint_interval,
            after_checkpoint,
            flush_on_exit,
            durable,
            mut cfg,
            stop,
        } = self;
        let mut cfg_open = true;
        let mut batch = Vec::with_capacity(512);
        let mut log = RejectLog::default();
        let mut late_log = telemetry::LogLimit::every(Duration::from_secs(5));
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut checkpoint = tokio::time::interval(checkpoint_interval);
        checkpoint.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // after_checkpoint: readings processed since the last checkpoint, acknowledged once
        // the next checkpoint is durable.
        let mut unacked: Vec<rumqttc::Publish> = Vec::new();
        let mut replays = replay::Replays::default();
        let mut acker = Acker::default();
        let mut clock = checkpoint::Clock::default();
        let mut model_log = ModelLog::default();
        let mut models_open = true;
        loop {
            tokio::select! {
                n = msg_rx.recv_many(&mut batch, 512) => {
                    if n == 0 {
                        break;
                    }
                    metrics.queue_depth.store(msg_rx.len() as u64, Relaxed);
                    let now = now_ms();
                    for p in batch.drain(..) {
                        if after_checkpoint && !covered.is_empty() {
                            if p.dup && covered.remove(&p.pkid) {
                                // Redelivered, but the restored checkpoint holds it.
                                metrics.replays_skipped_total.fetch_add(1, Relaxed);
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
                                    metrics.replays_skipped_total.fetch_add(1, Relaxed);
                                    continue;
                                }
                                replay::Seen::Reacknowledge => {
                                    metrics.replays_skipped_total.fetch_add(1, Relaxed);
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
                m = model_rx.recv(), if models_open => {
                    match m {
                        Some(m) => offer_model(&agent, &mut pipeline, m, models_dir.as_deref(), &mut model_log).await,
                        None => models_open = false,
                    }
                    continue;
                }
                r = cfg.changed(), if cfg_open => {
                    if r.is_err() {
                        cfg_open = false;
                        continue;
                    }
                    let c = cfg.borrow_and_update().clone();
                    match pipeline.reconfigure(&c, now_ms()) {
                        Ok(()) => {
                            tracing::info!(agent = %agent, threshold = pipeline.threshold(), "pipeline reconfigured: thresholds and re-arm rules for every series, detector for new series");
                            // The mappings are switched first: what the new filters bring is
                            // decoded, and what the removed ones still deliver too.
                            let (added, removed) = subscriptions.replace(&src_client, pipeline.filters());
                            if !added.is_empty() || !removed.is_empty() {
                                tracing::info!(agent = %agent, subscribed = ?added, unsubscribed = ?removed, "subscriptions changed");
                            }
                        }
                        Err(e) => tracing::error!(agent = %agent, error = %e, "pipeline not reconfigured"),
                    }
                    let batching = ToUplink::Batching {
                        batch_max: c.uplink.batch_max_records,
                        max_delay: Duration::from_millis(c.uplink.batch_max_delay_ms),
                    };
                    if out_tx.send(batching).await.is_err() {
                        break;
                    }
                    continue;
                }
                _ = tick.tick() => pipeline.tick(now_ms()),
                _ = stop.cancelled() => break,
                _ = checkpoint.tick(), if durable => {
                    let sink = Sink { out_tx: &out_tx, src: &src_client, acker: &mut acker };
                    if !checkpoint::take(&agent, &mut pipeline, &metrics, &mut unacked, &mut clock, sink).await {
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
            observe_emits(&metrics, &out, now_ms());
            if !out.is_empty() && out_tx.send(ToUplink::Outputs(out)).await.is_err() {
                break;
            }
        }
        // Shutdown. With durable state, open windows stay open in a final checkpoint and
        // carry on after the restart; without it (or with flush_on_exit) they are closed and
        // sent now.
        if flush_on_exit {
            pipeline.flush();
        }
        clock.clean = true;
        if durable {
            let sink = Sink {
                out_tx: &out_tx,
                src: &src_client,
                acker: &mut acker,
            };
            checkpoint::take(
                &agent,
                &mut pipeline,
                &metrics,
                &mut unacked,
                &mut clock,
                sink,
            )
            .await;
        } else {
            let out = pipeline.take_outputs();
            if !out.is_empty() {
                let _ = out_tx.send(ToUplink::Outputs(out)).await;
            }
        }
        acker.finish().await;
    }
}

/// Counts the emit delay of every first emission of a window among `out` (corrections, sent
/// again on purpose, would only measure the lateness allowed).
fn observe_emits(metrics: &AgentMetrics, out: &[crate::pipeline::Output], now_ms: i64) {
    for o in out {
        if let crate::pipeline::Output::Summary { summary, .. } = o {
            if summary.revision == 0 {
                // A device clock ahead of ours would make this negative: counted as zero.
                let ms = now_ms.saturating_sub(summary.end_ms).max(0) as u64;
                metrics.window_emit_delay.observe(Duration::from_millis(ms));
            }
        }
    }
}

/// Offers a model from the uplink broker to the pipeline; an accepted one is stored under
/// `models_dir` (off the async threads) so a restart runs it. Refusals are logged at a bounded rate.
async fn offer_model(
    agent: &str,
    pipeline: &mut Pipeline,
    m: ModelMessage,
    models_dir: Option<&std::path::Path>,
    log: &mut ModelLog,
) {
    match pipeline.offer_model(&m.key, &m.payload) {
        Ok(ModelOffer::Loaded {
            device,
            version,
            previous,
        }) => {
            tracing::info!(agent, key = %m.key, device = %device.escape_debug(), version, previous, "model swapped in");
            let Some(dir) = models_dir else { return };
            let dir = dir.to_path_buf();
            let saved =
                tokio::task::spawn_blocking(move || store::save(&dir, &m.key, &m.payload)).await;
            match saved {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(agent, device = %device.escape_debug(), version, error = %e, "could not store the model: it runs, but not after a restart")
                }
                Err(e) => tracing::error!(agent, error = %e, "model store task failed"),
            }
        }
        Ok(ModelOffer::Unchanged { device, version }) => {
            tracing::debug!(agent, device = %device.escape_debug(), version, "model already running");
        }
        Err(e) => {
            let limit = log
                .by_reason
                .entry(e.reason.label())
                .or_insert_with(|| telemetry::LogLimit::every(Duration::from_secs(10)));
            if let Some(suppressed) = limit.ready() {
                tracing::warn!(agent, key = %m.key.escape_debug(), reason = e.reason.label(), error = %e.detail.escape_debug(), suppressed, "model refused (counted in edgewatch_agent_models_refused_total)");
            }
        }
    }
}

/// Refused models, logged at most once per reason every 10 s.
#[derive(Default)]
struct ModelLog {
    by_reason: HashMap<&'static str, telemetry::LogLimit>,
}

/// A checkpoint's completion and the readings it covers.
type AckBatch = (oneshot::Receiver<()>, Vec<rumqttc::Publish>);

/// Acknowledges source readings (manual acks) once the checkpoint covering them is durable, in
/// order, on a task of its own so the pipeline never waits for the disk.
#[derive(Default)]
pub(crate) struct Acker {
    // Unbounded on purpose: at most one entry per checkpoint interval (the worker pushes one per
    // checkpoint, and each entry's readings are bounded by what the worker applied since the last
    // one), and the worker must never wait on the broker's acks.
    tx: Option<mpsc::UnboundedSender<AckBatch>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Acker {
    pub(crate) fn push(
        &mut self,
        src: &AsyncClient,
        done: oneshot::Receiver<()>,
        readings: Vec<rumqttc::Publish>,
    ) {
        let tx = self.tx.get_or_insert_with(|| {
            let (tx, mut rx) = mpsc::unbounded_channel::<AckBatch>();
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
    pub(crate) async fn finish(self) {
        drop(self.tx);
        if let Some(task) = self.task {
            if let Err(e) = task.await {
                // Not swallowed: the readings stay unacknowledged (redelivered after a restart).
                tracing::error!(error = %e, "the source acknowledgement task failed");
            }
        }
    }
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
