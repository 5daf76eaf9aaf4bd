//! The agent's per-reading core, without I/O: decode → detect → window → outputs.
//!
//! One [`Pipeline`] owns every (device, metric) series of the agent: its detector state, its open
//! windows and its alarm state. The async shell feeds it raw MQTT messages and ships what it outputs.

use crate::config::AgentConfig;
use crate::error::{AgentError, IngestError};
use crate::ingest::{Mapping, RawReading};
use crate::telemetry::AgentMetrics;
use edgewatch_models::detect::{AnyDetector, Detector};
use edgewatch_models::partition::partition_of;
use edgewatch_models::window::{Admit, TumblingWindows, WindowAggregate};
use edgewatch_models::wire::{event_id, AnomalyEvent, WindowSummary};
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use xxhash_rust::xxh3::Xxh3DefaultBuilder;

/// Something the pipeline wants sent upstream.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// A closed window.
    Summary {
        /// Lane (partition of the device).
        partition: u32,
        /// The summary.
        summary: WindowSummary,
    },
    /// An anomaly event, to be published at once.
    Anomaly {
        /// Lane (partition of the device).
        partition: u32,
        /// The event.
        event: AnomalyEvent,
    },
}

struct Series {
    device: Box<str>,
    metric: Box<str>,
    partition: u32,
    detector: AnyDetector,
    windows: TumblingWindows,
    armed: bool,
}

/// Settings copied out of the configuration for the hot path.
struct Params {
    agent: Arc<str>,
    prototype: AnyDetector,
    detector_name: &'static str,
    threshold: f64,
    rearm_below: f64,
    /// A fresh window set for a new series (validated once, cloned per series).
    windows: TumblingWindows,
    idle_timeout_ms: i64,
    partitions: u32,
    max_payload_bytes: usize,
    max_series: usize,
}

/// The series table and the state that goes with it.
struct Table {
    series: HashMap<Box<str>, Series, Xxh3DefaultBuilder>,
    key: String,
    max_event_ts: i64,
}

/// The agent's processing core.
pub struct Pipeline {
    params: Params,
    mappings: Vec<Mapping>,
    table: Table,
    scratch: Vec<(String, f64)>,
    outputs: Vec<Output>,
    metrics: Arc<AgentMetrics>,
}

impl Pipeline {
    /// Builds the pipeline; fails with every configuration problem found.
    pub fn new(cfg: &AgentConfig, metrics: Arc<AgentMetrics>) -> Result<Self, AgentError> {
        let problems = cfg.problems();
        if !problems.is_empty() {
            return Err(AgentError::Config(problems));
        }
        let prototype = cfg
            .detector
            .build()
            .map_err(|e| AgentError::Config(vec![format!("detector.{e}")]))?;
        let mappings = cfg
            .source
            .subscriptions
            .iter()
            .enumerate()
            .map(|(i, s)| {
                Mapping::new(s).map_err(|e| {
                    AgentError::Config(vec![format!("source.subscriptions[{i}].topic: {e}")])
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let threshold = cfg.threshold();
        let windows = TumblingWindows::new(cfg.window.size_ms, cfg.window.allowed_lateness_ms)
            .map_err(|e| AgentError::Config(vec![format!("window.{e}")]))?;
        Ok(Self {
            params: Params {
                agent: cfg.id.as_str().into(),
                detector_name: prototype.name(),
                prototype,
                threshold,
                rearm_below: threshold * cfg.anomaly.rearm_ratio,
                windows,
                idle_timeout_ms: cfg.window.idle_timeout_ms,
                partitions: cfg.uplink.partitions,
                max_payload_bytes: cfg.pipeline.max_payload_bytes,
                max_series: cfg.pipeline.max_series,
            },
            mappings,
            table: Table {
                series: HashMap::with_hasher(Xxh3DefaultBuilder::new()),
                key: String::new(),
                max_event_ts: i64::MIN,
            },
            scratch: Vec::new(),
            outputs: Vec::new(),
            metrics,
        })
    }

    /// MQTT filters to subscribe to, one per mapping.
    pub fn filters(&self) -> Vec<String> {
        self.mappings.iter().map(Mapping::filter).collect()
    }

    /// Processes one MQTT message; returns the number of readings it carried.
    /// Errors are already counted in the metrics; the caller only logs them.
    pub fn handle(
        &mut self,
        topic: &[u8],
        payload: &[u8],
        arrival_ms: i64,
    ) -> Result<usize, IngestError> {
        self.metrics.messages_total.fetch_add(1, Relaxed);
        let result = std::str::from_utf8(topic)
            .map_err(|_| IngestError::NonUtf8Topic)
            .and_then(|topic| self.handle_inner(topic, payload, arrival_ms));
        self.count(&result);
        result
    }

    /// [`Pipeline::handle`] for a topic already known to be UTF-8 (MQTT clients decode topics).
    pub fn handle_topic(
        &mut self,
        topic: &str,
        payload: &[u8],
        arrival_ms: i64,
    ) -> Result<usize, IngestError> {
        self.metrics.messages_total.fetch_add(1, Relaxed);
        let result = self.handle_inner(topic, payload, arrival_ms);
        self.count(&result);
        result
    }

    fn count(&self, result: &Result<usize, IngestError>) {
        match result {
            Ok(n) => {
                self.metrics.readings_total.fetch_add(*n as u64, Relaxed);
            }
            Err(e) => self.metrics.reject(e),
        }
    }

    fn handle_inner(
        &mut self,
        topic: &str,
        payload: &[u8],
        arrival_ms: i64,
    ) -> Result<usize, IngestError> {
        if payload.len() > self.params.max_payload_bytes {
            return Err(IngestError::PayloadTooLarge {
                size: payload.len(),
                max: self.params.max_payload_bytes,
            });
        }
        let (mapping, device, metric) = self
            .mappings
            .iter()
            .find_map(|m| m.claims(topic).map(|(d, mt)| (m, d, mt)))
            .ok_or(IngestError::TopicMismatch)?;
        let mut count = 0usize;
        let mut failure = None;
        let (params, table, outputs, metrics) = (
            &self.params,
            &mut self.table,
            &mut self.outputs,
            &*self.metrics,
        );
        mapping.decode(
            device,
            metric,
            payload,
            arrival_ms,
            &mut self.scratch,
            &mut |r| match table.apply(params, r, outputs, metrics) {
                Ok(()) => count += 1,
                Err(e) => failure = Some(e),
            },
        )?;
        metrics
            .event_lag_ms
            .store(arrival_ms.saturating_sub(table.max_event_ts), Relaxed);
        match failure {
            Some(e) if count == 0 => Err(e),
            _ => Ok(count),
        }
    }

    /// Closes windows of series that have gone quiet, judged against the newest event time seen.
    pub fn tick(&mut self) {
        if self.table.max_event_ts == i64::MIN {
            return;
        }
        let watermark = self
            .table
            .max_event_ts
            .saturating_sub(self.params.idle_timeout_ms);
        let (outputs, metrics) = (&mut self.outputs, &*self.metrics);
        for s in self.table.series.values_mut() {
            let (device, metric, partition) = (&s.device, &s.metric, s.partition);
            s.windows.advance(watermark, &mut |w| {
                emit_window(outputs, metrics, device, metric, partition, &w)
            });
        }
    }

    /// Closes every open window now (shutdown or drain).
    pub fn flush(&mut self) {
        let (outputs, metrics) = (&mut self.outputs, &*self.metrics);
        for s in self.table.series.values_mut() {
            let (device, metric, partition) = (&s.device, &s.metric, s.partition);
            s.windows
                .flush(&mut |w| emit_window(outputs, metrics, device, metric, partition, &w));
        }
    }

    /// Takes everything produced so far.
    pub fn take_outputs(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.outputs)
    }

    /// Moves everything produced so far into `into` (keeps both allocations).
    pub fn drain_outputs_into(&mut self, into: &mut Vec<Output>) {
        into.append(&mut self.outputs);
    }

    /// Number of series tracked.
    pub fn series(&self) -> usize {
        self.table.series.len()
    }
}

impl Table {
    #[inline]
    fn apply(
        &mut self,
        p: &Params,
        r: RawReading<'_>,
        outputs: &mut Vec<Output>,
        metrics: &AgentMetrics,
    ) -> Result<(), IngestError> {
        self.key.clear();
        self.key.push_str(r.device);
        self.key.push('\u{0}');
        self.key.push_str(r.metric);
        let series = match self.series.get_mut(self.key.as_str()) {
            Some(s) => s,
            None => {
                if self.series.len() >= p.max_series {
                    return Err(IngestError::TooManySeries { max: p.max_series });
                }
                let windows = p.windows.clone(); // validated in Pipeline::new
                let s = Series {
                    device: r.device.into(),
                    metric: r.metric.into(),
                    partition: partition_of(r.device, p.partitions),
                    detector: p.prototype.clone(),
                    windows,
                    armed: true,
                };
                metrics.series.fetch_add(1, Relaxed);
                self.series.entry(self.key.as_str().into()).or_insert(s)
            }
        };
        self.max_event_ts = self.max_event_ts.max(r.ts_ms);
        let score = series.detector.update(r.ts_ms, r.value);
        let score = if score.is_finite() {
            score.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let (device, metric, partition) = (&series.device, &series.metric, series.partition);
        let admit = series.windows.push(r.ts_ms, r.value, score, &mut |w| {
            emit_window(outputs, metrics, device, metric, partition, &w)
        });
        let window_start_ms = match admit {
            Admit::Accepted { window_start_ms } => window_start_ms,
            Admit::Late => {
                metrics.late_readings_total.fetch_add(1, Relaxed);
                series.windows.window_start(r.ts_ms)
            }
        };
        if series.armed && score >= p.threshold {
            series.armed = false;
            metrics.anomalies_total.fetch_add(1, Relaxed);
            outputs.push(Output::Anomaly {
                partition,
                event: AnomalyEvent {
                    id: event_id(device, metric, r.ts_ms, p.detector_name),
                    device: device.to_string(),
                    metric: metric.to_string(),
                    ts_ms: r.ts_ms,
                    value: r.value,
                    score,
                    detector: p.detector_name.to_string(),
                    window_start_ms,
                    agent: p.agent.to_string(),
                },
            });
        } else if !series.armed && score < p.rearm_below {
            series.armed = true;
        }
        Ok(())
    }
}

fn emit_window(
    outputs: &mut Vec<Output>,
    metrics: &AgentMetrics,
    device: &str,
    metric: &str,
    partition: u32,
    w: &WindowAggregate,
) {
    metrics.windows_total.fetch_add(1, Relaxed);
    outputs.push(Output::Summary {
        partition,
        summary: w.to_summary(device, metric),
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgewatch_models::detect::{DetectorConfig, ZScoreConfig};

    fn pipeline() -> (Pipeline, Arc<AgentMetrics>) {
        let mut cfg = AgentConfig::with_id("gw-test");
        cfg.window.size_ms = 10_000;
        cfg.window.allowed_lateness_ms = 0;
        cfg.detector = DetectorConfig::Zscore(ZScoreConfig {
            window: 100,
            warmup: 20,
            z_max: 8.0,
        });
        cfg.anomaly.threshold = Some(0.75);
        let metrics = Arc::new(AgentMetrics::default());
        (Pipeline::new(&cfg, metrics.clone()).unwrap(), metrics)
    }

    fn feed(p: &mut Pipeline, device: &str, ts: i64, value: f64) {
        let payload = format!(r#"{{"ts":{ts},"value":{value}}}"#);
        p.handle(
            format!("sensors/{device}/temp").as_bytes(),
            payload.as_bytes(),
            ts,
        )
        .unwrap();
    }

    #[test]
    fn readings_become_windows_and_a_spike_becomes_one_event() {
        let (mut p, m) = pipeline();
        for i in 0..200 {
            feed(&mut p, "d1", i * 1000, 20.0 + (i % 5) as f64 * 0.1);
        }
        feed(&mut p, "d1", 200_000, 90.0);
        feed(&mut p, "d1", 201_000, 20.1);
        let out = p.take_outputs();
        let summaries: Vec<_> = out
            .iter()
            .filter_map(|o| match o {
                Output::Summary { summary, .. } => Some(summary),
                _ => None,
            })
            .collect();
        assert_eq!(summaries.len(), 20, "windows [0,10s) .. [190s,200s) closed");
        assert!(summaries.iter().all(|s| s.count == 10));
        let events: Vec<_> = out
            .iter()
            .filter_map(|o| match o {
                Output::Anomaly { event, .. } => Some(event),
                _ => None,
            })
            .collect();
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!((events[0].ts_ms, events[0].value), (200_000, 90.0));
        assert_eq!(events[0].window_start_ms, 200_000);
        assert_eq!(m.anomalies_total.load(Relaxed), 1);
        assert_eq!(m.readings_total.load(Relaxed), 202);
    }

    #[test]
    fn a_sustained_excursion_raises_one_event_until_rearmed() {
        let (mut p, _) = pipeline();
        for i in 0..100 {
            feed(&mut p, "d", i * 1000, if i % 2 == 0 { 1.0 } else { 2.0 });
        }
        for i in 100..103 {
            feed(&mut p, "d", i * 1000, 50.0);
        }
        let events = p
            .take_outputs()
            .into_iter()
            .filter(|o| matches!(o, Output::Anomaly { .. }))
            .count();
        assert_eq!(events, 1);
    }

    #[test]
    fn bad_messages_are_counted_and_good_ones_still_flow() {
        let (mut p, m) = pipeline();
        feed(&mut p, "d", 1000, 1.0);
        assert_eq!(
            p.handle(b"sensors/d/temp", b"{bad", 0)
                .unwrap_err()
                .reason(),
            "bad_json"
        );
        assert_eq!(
            p.handle(b"other/topic", b"1", 0).unwrap_err().reason(),
            "topic_mismatch"
        );
        assert_eq!(
            p.handle(b"sensors/\xff/temp", b"{}", 0)
                .unwrap_err()
                .reason(),
            "non_utf8_topic"
        );
        assert_eq!(
            p.handle(b"sensors/d/temp", b"", 0).unwrap_err().reason(),
            "empty_payload"
        );
        let big = vec![b' '; 1 << 20];
        assert_eq!(
            p.handle(b"sensors/d/temp", &big, 0).unwrap_err().reason(),
            "payload_too_large"
        );
        feed(&mut p, "d", 2000, 1.0);
        assert_eq!(m.rejected_total(), 5);
        assert_eq!(m.readings_total.load(Relaxed), 2);
        assert_eq!(m.messages_total.load(Relaxed), 7);
    }

    #[test]
    fn late_readings_are_counted_not_merged() {
        let (mut p, m) = pipeline();
        feed(&mut p, "d", 1000, 1.0);
        feed(&mut p, "d", 25_000, 1.0);
        feed(&mut p, "d", 2000, 1.0);
        assert_eq!(m.late_readings_total.load(Relaxed), 1);
        let out = p.take_outputs();
        assert!(matches!(&out[0], Output::Summary { summary, .. } if summary.count == 1));
    }

    #[test]
    fn idle_series_close_when_the_fleet_moves_on() {
        let (mut p, _) = pipeline();
        feed(&mut p, "quiet", 1000, 1.0);
        feed(&mut p, "busy", 500_000, 1.0);
        assert!(p.take_outputs().is_empty());
        p.tick();
        let out = p.take_outputs();
        assert_eq!(out.len(), 1);
        assert!(matches!(&out[0], Output::Summary { summary, .. } if summary.device == "quiet"));
    }

    #[test]
    fn series_limit_rejects_new_series_only() {
        let mut cfg = AgentConfig::with_id("gw");
        cfg.pipeline.max_series = 1;
        let m = Arc::new(AgentMetrics::default());
        let mut p = Pipeline::new(&cfg, m.clone()).unwrap();
        p.handle(b"sensors/a/t", br#"{"value":1,"ts":1000}"#, 0)
            .unwrap();
        assert_eq!(
            p.handle(b"sensors/b/t", br#"{"value":1,"ts":1000}"#, 0)
                .unwrap_err()
                .reason(),
            "too_many_series"
        );
        p.handle(b"sensors/a/t", br#"{"value":1,"ts":2000}"#, 0)
            .unwrap();
        assert_eq!(p.series(), 1);
    }

    #[test]
    fn partition_comes_from_the_device_id() {
        let (mut p, _) = pipeline();
        feed(&mut p, "pump-7", 1000, 1.0);
        p.flush();
        match &p.take_outputs()[0] {
            Output::Summary { partition, .. } => assert_eq!(*partition, partition_of("pump-7", 64)),
            o => panic!("{o:?}"),
        }
    }
}
