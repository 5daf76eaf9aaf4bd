//! Fuzz target: sensor messages through the agent's real ingest path, `Pipeline::handle(topic,
//! payload, arrival_ms)`, on two configurations loaded the way the CLI loads them: `configs/agent.yaml`
//! (JSON value, JSON object in seconds, bare number) and a fuzz configuration with every other
//! mapping shape (renamed fields, no timestamp field, µs / ns / s units, a fixed metric, a one-level
//! pattern, small payload and series limits, short windows so that windows close and anomalies fire).
//!
//! Invariants beyond "no panic": every message is counted once, as readings or as one rejection of a
//! known reason, so `messages = accepted + rejected` and `readings = Σ Ok(n)` hold throughout; the
//! series gauge matches the table and stays under `max_series`; every summary and event the pipeline
//! emits is sane (counts, bounds, scores in [0, 1], its event id) and survives the wire — encoded as
//! the agent sends it, decoded as the aggregator reads it, unchanged.

use crate::gen::{Corpus, Gen, TIMESTAMPS};
use crate::{budget, escaped, Runner};
use edgewatch_agent::pipeline::{Output, Pipeline};
use edgewatch_agent::{AgentConfig, AgentMetrics, IngestError};
use edgewatch_models::wire::{phase_event_id, AnomalyEvent, WindowSummary};
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// Every mapping shape `configs/agent.yaml` lacks.
const FUZZ_AGENT: &str = r#"
id: fuzz-agent
source:
  subscriptions:
    - topic: "s/{device}"
      metric: m
      payload: { type: json, value_field: v, timestamp_field: t, timestamp_unit: us }
    - topic: "n/{device}/x/{metric}"
      payload: { type: json, timestamp_field: null, timestamp_unit: ns }
    - topic: "o/{device}"
      payload: { type: json_object, timestamp_field: null }
    - topic: "ns/{device}"
      payload: { type: json_object, timestamp_field: time, timestamp_unit: ns }
    - topic: "sec/{device}/{metric}"
      payload: { type: json, timestamp_unit: s }
    - topic: "{device}"
      metric: x
      payload: { type: number }
uplink: { partitions: 7 }
window: { size_ms: 1000, allowed_lateness_ms: 500, idle_timeout_ms: 3000 }
detector: { type: zscore, window: 20, warmup: 5 }
anomaly: { threshold: 0.5 }
pipeline: { max_payload_bytes: 2048, max_series: 64 }
# Device models on, so the training sampler sees the hostile input too (and its samples are checked
# as the aggregator checks them).
models: { enabled: true, training: { period_ms: 500, samples: 8, min_rows: 1, max_devices: 16 } }
"#;

/// Series kept per pipeline for `configs/agent.yaml` (its own 100,000 would hold gigabytes of
/// detector state after a million random device names).
const AGENT_MAX_SERIES: usize = 1024;
/// A pipeline is flushed and rebuilt after this many messages, so new series keep being created
/// and one far-future timestamp (which makes every later reading late) does not end the run's
/// coverage of windows.
const REBUILD_EVERY: u64 = 2_000;

/// What a topic pattern's payload looks like, for generating plausible ones.
#[derive(Clone, Copy)]
enum Shape {
    /// `{value: …, ts: …}` with these field names; timestamps in units of `per_ms` per ms.
    Json {
        value: &'static str,
        ts: Option<&'static str>,
        per_ms: f64,
    },
    /// `{metric: number, …}` with an optional timestamp field.
    Object {
        ts: Option<&'static str>,
        per_ms: f64,
    },
    /// A bare number.
    Number,
}

/// One configuration under test and the topics it subscribes to.
struct Setup {
    name: &'static str,
    cfg: AgentConfig,
    patterns: &'static [(&'static str, Shape)],
}

const AGENT_PATTERNS: &[(&str, Shape)] = &[
    (
        "sensors/{device}/{metric}",
        Shape::Json {
            value: "value",
            ts: Some("ts"),
            per_ms: 1.0,
        },
    ),
    (
        "plant/{device}",
        Shape::Object {
            ts: Some("ts"),
            per_ms: 1e-3,
        },
    ),
    ("raw/{device}/{metric}", Shape::Number),
];

const FUZZ_PATTERNS: &[(&str, Shape)] = &[
    (
        "s/{device}",
        Shape::Json {
            value: "v",
            ts: Some("t"),
            per_ms: 1e3,
        },
    ),
    (
        "n/{device}/x/{metric}",
        Shape::Json {
            value: "value",
            ts: None,
            per_ms: 1e6,
        },
    ),
    (
        "o/{device}",
        Shape::Object {
            ts: None,
            per_ms: 1.0,
        },
    ),
    (
        "ns/{device}",
        Shape::Object {
            ts: Some("time"),
            per_ms: 1e6,
        },
    ),
    (
        "sec/{device}/{metric}",
        Shape::Json {
            value: "value",
            ts: Some("ts"),
            per_ms: 1e-3,
        },
    ),
    ("{device}", Shape::Number),
];

fn setups() -> Vec<Setup> {
    let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/configs/agent.yaml"));
    let mut agent: AgentConfig = edgewatch::config::load(path).expect("configs/agent.yaml loads");
    agent.pipeline.max_series = AGENT_MAX_SERIES;
    let fuzz: AgentConfig = edgewatch::config::parse(FUZZ_AGENT, Path::new("fuzz-agent.yaml"))
        .expect("the fuzz agent configuration is valid");
    vec![
        Setup {
            name: "configs/agent.yaml",
            cfg: agent,
            patterns: AGENT_PATTERNS,
        },
        Setup {
            name: "fuzz-agent.yaml",
            cfg: fuzz,
            patterns: FUZZ_PATTERNS,
        },
    ]
}

/// One pipeline under test, with the totals its metrics must agree with.
struct Lane {
    pipeline: Pipeline,
    metrics: Arc<AgentMetrics>,
    clock_ms: i64,
    messages: u64,
    accepted: u64,
    readings: u64,
}

impl Lane {
    fn new(cfg: &AgentConfig) -> Self {
        let metrics = Arc::new(AgentMetrics::default());
        Self {
            pipeline: Pipeline::new(cfg, metrics.clone()).expect("valid configuration"),
            metrics,
            clock_ms: 1_700_000_000_000,
            messages: 0,
            accepted: 0,
            readings: 0,
        }
    }
}

/// One input: which pipeline, and the MQTT message.
#[derive(Clone)]
struct Message {
    lane: usize,
    topic: Vec<u8>,
    payload: Vec<u8>,
    arrival_ms: i64,
}

/// Arrival times: the lane's clock mostly; rarely a clock set to 1970, 2200 or beyond (rarely, for
/// the reason given at [`timestamp`]).
fn arrival(g: &mut Gen, clock_ms: i64) -> i64 {
    match g.below(400) {
        0 => 0,
        1 => 7_258_118_400_000,
        2 => 1_000_000_000_000_000,
        3 => clock_ms - 86_400_000,
        _ => clock_ms + g.below(3000) as i64 - 1000,
    }
}

fn topic(g: &mut Gen, pattern: &str) -> Vec<u8> {
    if g.chance(1, 30) {
        let mut t = g.name();
        t.extend_from_slice(b"/");
        t.extend(g.name());
        return t;
    }
    let mut out = Vec::new();
    for (i, level) in pattern.split('/').enumerate() {
        if i > 0 {
            out.push(b'/');
        }
        match level {
            "{device}" if g.chance(3, 4) => out.extend(format!("dev-{}", g.below(8)).bytes()),
            "{metric}" if g.chance(3, 4) => {
                out.extend_from_slice(g.pick(&["temp", "rpm", "pressure", "v"]).as_bytes())
            }
            "{device}" | "{metric}" => out.extend(g.name()),
            literal => out.extend_from_slice(literal.as_bytes()),
        }
    }
    if g.chance(1, 30) {
        out.extend_from_slice(b"/extra");
    }
    out
}

/// A reading's value: mostly around 20 so that detectors warm up, sometimes a spike or an edge case.
fn value(g: &mut Gen) -> String {
    match g.below(10) {
        0 | 1 => g.number(),
        2 => format!("{}", 200 + g.below(1000)),
        _ => format!("{:.2}", 20.0 + g.below(100) as f64 / 100.0),
    }
}

/// A timestamp: mostly recent, in the pattern's unit; rarely an edge case. Rarely, because one
/// accepted far-future timestamp makes every later reading of the pipeline late (finding 2 in the
/// module docs of `main.rs`), which would leave windows and corrections untested for the rest of a
/// pipeline's life.
fn timestamp(g: &mut Gen, clock_ms: i64, per_ms: f64) -> String {
    match g.below(64) {
        0 => g.pick(TIMESTAMPS).to_string(),
        1 => g.number(),
        _ => format!("{}", (clock_ms - g.below(2500) as i64) as f64 * per_ms),
    }
}

fn payload(g: &mut Gen, shape: Shape, clock_ms: i64) -> Vec<u8> {
    let mut out = Vec::new();
    match g.below(12) {
        0 => g.json(4, &mut out),
        1 => g.deep(&mut out),
        2 => out.extend((0..g.below(64)).map(|_| g.u64() as u8)),
        3 => out.extend(format!(" {}\n", g.number()).bytes()),
        _ => match shape {
            Shape::Number => out.extend(value(g).bytes()),
            Shape::Json {
                value: v,
                ts,
                per_ms,
            } => {
                let mut fields = Vec::new();
                if g.chance(9, 10) {
                    let text = match g.below(12) {
                        0 => g.pick(&["\"12\"", "null", "true", "[1]", "{}"]).to_string(),
                        _ => value(g),
                    };
                    fields.push(format!("\"{v}\":{text}"));
                }
                if let Some(ts) = ts.filter(|_| g.chance(4, 5)) {
                    fields.push(format!("\"{ts}\":{}", timestamp(g, clock_ms, per_ms)));
                }
                extra_fields(g, &mut fields);
                object(g, fields, &mut out);
            }
            Shape::Object { ts, per_ms } => {
                let mut fields = Vec::new();
                for _ in 0..g.below(5) {
                    let name = g.pick(&["temp", "rpm", "pressure", "label", "ok"]);
                    fields.push(format!("\"{name}\":{}", value(g)));
                }
                if let Some(ts) = ts.filter(|_| g.chance(4, 5)) {
                    fields.push(format!("\"{ts}\":{}", timestamp(g, clock_ms, per_ms)));
                }
                extra_fields(g, &mut fields);
                object(g, fields, &mut out);
            }
        },
    }
    out
}

fn extra_fields(g: &mut Gen, fields: &mut Vec<String>) {
    for _ in 0..g.below(3) {
        let mut field = Vec::new();
        g.key(&mut field);
        g.json(2, &mut field);
        fields.push(String::from_utf8_lossy(&field).into_owned());
    }
}

/// Writes `fields` as a JSON object in a random order.
fn object(g: &mut Gen, mut fields: Vec<String>, out: &mut Vec<u8>) {
    for i in (1..fields.len()).rev() {
        fields.swap(i, g.below(i + 1));
    }
    out.extend(format!("{{{}}}", fields.join(",")).bytes());
}

/// Everything the pipeline emitted must be sane and readable by the aggregator.
fn check_outputs(lane: &mut Lane, partitions: u32) {
    for output in lane.pipeline.take_outputs() {
        match output {
            Output::Summary { partition, summary } => {
                assert!(
                    partition < partitions,
                    "partition {partition} of {partitions}"
                );
                // Finding 1 of the first runs (0 and 1e155 in one window gave std = inf) is fixed:
                // values beyond ±1e100 are rejected (value_out_of_range), so every figure is finite.
                assert!(
                    summary.mean.is_finite() && summary.std.is_finite(),
                    "summary with non-finite mean or std: {summary:?}"
                );
                check_summary(&summary);
            }
            Output::Anomaly { partition, event } => {
                assert!(
                    partition < partitions,
                    "partition {partition} of {partitions}"
                );
                check_event(&event);
            }
            Output::Training { partition, sample } => {
                assert!(
                    partition < partitions,
                    "partition {partition} of {partitions}"
                );
                // What the aggregator checks before it keeps a sample.
                if let Err(e) = sample.check() {
                    panic!("training sample the aggregator would refuse: {e}: {sample:?}");
                }
            }
        }
    }
}

fn check_summary(s: &WindowSummary) {
    assert!(s.count >= 1, "empty window summary {s:?}");
    assert!(s.start_ms < s.end_ms, "window ends before it starts: {s:?}");
    assert!(s.first_ts_ms <= s.last_ts_ms, "{s:?}");
    assert!(s.min <= s.max, "min above max: {s:?}");
    assert!((0.0..=1.0).contains(&s.max_score), "max_score: {s:?}");
    let json = serde_json::to_vec(s).expect("a summary encodes");
    let back: Result<WindowSummary, _> = serde_json::from_slice(&json);
    assert!(
        back.as_ref().is_ok_and(|b| b == s),
        "window summary does not survive the wire: {s:?}\nsent {}\nread back {back:?}",
        String::from_utf8_lossy(&json)
    );
}

fn check_event(e: &AnomalyEvent) {
    assert!((0.0..=1.0).contains(&e.score), "score: {e:?}");
    assert!(e.value.is_finite(), "value: {e:?}");
    assert_eq!(
        e.id,
        phase_event_id(&e.device, &e.metric, e.ts_ms, &e.detector, e.phase)
    );
    let json = serde_json::to_vec(e).expect("an event encodes");
    let back: AnomalyEvent = serde_json::from_slice(&json).expect("an event decodes");
    assert_eq!(&back, e, "anomaly event does not survive the wire");
}

/// Handles one message and checks every invariant; returns the outcome label.
fn handle(lane: &mut Lane, setup: &Setup, msg: &Message, tick: bool) -> &'static str {
    let m = lane.metrics.clone();
    let rejected_before = m.rejected_total();
    let readings_before = m.readings_total.load(Relaxed);
    let result = lane
        .pipeline
        .handle(&msg.topic, &msg.payload, msg.arrival_ms);
    lane.messages += 1;
    assert_eq!(m.messages_total.load(Relaxed), lane.messages);
    let label = match &result {
        Ok(n) => {
            assert!(*n >= 1, "Ok(0)");
            lane.accepted += 1;
            lane.readings += *n as u64;
            assert_eq!(m.readings_total.load(Relaxed), readings_before + *n as u64);
            assert_eq!(m.rejected_total(), rejected_before);
            "accepted"
        }
        Err(e) => {
            let reason = e.reason();
            assert!(
                IngestError::REASONS.contains(&reason),
                "unknown reason {reason}"
            );
            assert_eq!(m.rejected_total(), rejected_before + 1, "{e}");
            assert_eq!(m.readings_total.load(Relaxed), readings_before, "{e}");
            if std::str::from_utf8(&msg.topic).is_err() {
                assert_eq!(e, &IngestError::NonUtf8Topic);
            } else if msg.payload.len() > setup.cfg.pipeline.max_payload_bytes {
                assert!(matches!(e, IngestError::PayloadTooLarge { .. }), "{e}");
            }
            assert!(!e.to_string().is_empty());
            reason
        }
    };
    assert_eq!(lane.messages, lane.accepted + m.rejected_total());
    assert_eq!(m.readings_total.load(Relaxed), lane.readings);
    let series = lane.pipeline.series();
    assert_eq!(m.series.load(Relaxed), series as u64);
    assert!(series <= setup.cfg.pipeline.max_series.max(1));
    if tick {
        // The agent's clock moves on (idle series close on it); any i64 must be safe.
        lane.pipeline.tick(msg.arrival_ms.saturating_add(3_600_000));
    }
    check_outputs(lane, setup.cfg.uplink.partitions);
    label
}

/// Counts what a lane emitted (checked by `check_outputs`) before it is replaced.
fn emitted(runner: &mut Runner, lane: &Lane) {
    let m = &lane.metrics;
    runner.outcomes_n("emitted:windows", m.windows_total.load(Relaxed));
    runner.outcomes_n("emitted:anomalies", m.anomalies_total.load(Relaxed));
    runner.outcomes_n("late_readings", m.late_readings_total.load(Relaxed));
    runner.outcomes_n("corrections", m.corrections_total.load(Relaxed));
    runner.outcomes_n(
        "emitted:training_samples",
        m.training_samples_total.load(Relaxed),
    );
}

fn describe(setup: &Setup, msg: &Message) -> String {
    format!(
        "pipeline {}\ntopic   {}\npayload {}\narrival_ms {}",
        setup.name,
        escaped(&msg.topic),
        escaped(&msg.payload),
        msg.arrival_ms
    )
}

/// Runs the target: half of the fuzz budget.
pub fn run() {
    let (cases, seed) = budget(50, 1);
    let mut g = Gen::new(seed);
    let mut runner = Runner::new("sensor payloads (Pipeline::handle)", seed);
    let setups = setups();
    let mut lanes: Vec<Lane> = setups.iter().map(|s| Lane::new(&s.cfg)).collect();
    let mut seeds = Vec::new();
    for (lane, s) in setups.iter().enumerate() {
        for &(pattern, shape) in s.patterns {
            for _ in 0..4 {
                let clock = lanes[lane].clock_ms;
                seeds.push(Message {
                    lane,
                    topic: topic(&mut g, pattern),
                    payload: payload(&mut g, shape, clock),
                    arrival_ms: clock,
                });
            }
        }
    }
    // Real payloads, as sensors send them.
    for (lane, topic, payload) in [
        (
            0,
            "sensors/pump-7/temp",
            r#"{"ts":1700000000000,"value":21.5}"#,
        ),
        (
            0,
            "sensors/pump-7/temp",
            r#"{"unit":"C","ts":1700000000000,"value":21.5,"tags":{"a":[1]}}"#,
        ),
        (
            0,
            "plant/p1",
            r#"{"ts":1700000000.5,"temp":1.5,"label":"x","rpm":3000,"ok":true}"#,
        ),
        (0, "raw/d1/temp", " 3.25\n"),
        (1, "s/d1", r#"{"t":1700000000000000,"v":2}"#),
        (1, "ns/d1", r#"{"time":1700000000000000000,"a":1,"b":2}"#),
        (1, "d9", "-12.5e3"),
    ] {
        seeds.push(Message {
            lane,
            topic: topic.into(),
            payload: payload.into(),
            arrival_ms: 1_700_000_000_000,
        });
    }
    let mut corpus = Corpus::new(seeds, 2000);
    for i in 0..cases {
        let lane_no = g.below(lanes.len());
        let setup = &setups[lane_no];
        let clock = lanes[lane_no].clock_ms;
        let msg = match g.below(10) {
            0..=3 => {
                let (pattern, shape) = g.pick(setup.patterns);
                Message {
                    lane: lane_no,
                    topic: topic(&mut g, pattern),
                    payload: payload(&mut g, shape, clock),
                    arrival_ms: arrival(&mut g, clock),
                }
            }
            _ => {
                let mut msg = if g.chance(1, 5) {
                    corpus.seed(&mut g)
                } else {
                    corpus.pick(&mut g)
                };
                let other = corpus.pick(&mut g);
                if g.chance(1, 6) {
                    g.mutate(&mut msg.topic, &other.topic);
                } else {
                    g.mutate(&mut msg.payload, &other.payload);
                }
                if g.chance(1, 2) {
                    msg.arrival_ms = arrival(&mut g, clock);
                }
                msg
            }
        };
        let setup = &setups[msg.lane];
        let tick = g.chance(1, 32);
        let mut label = "panicked";
        let passed = runner.case(
            || describe(setup, &msg),
            || label = handle(&mut lanes[msg.lane], setup, &msg, tick),
        );
        runner.outcome(label);
        let lane = &mut lanes[msg.lane];
        lane.clock_ms += g.below(100) as i64;
        if !passed {
            emitted(&mut runner, lane);
            *lane = Lane::new(&setup.cfg);
        } else if label == "accepted" || g.chance(1, 50) {
            corpus.add(&mut g, msg.clone());
        }
        if (i + 1) % REBUILD_EVERY == 0 {
            for (lane, setup) in lanes.iter_mut().zip(&setups) {
                let ok = runner.case(
                    || format!("flush of pipeline {}", setup.name),
                    || {
                        lane.pipeline.flush();
                        check_outputs(lane, setup.cfg.uplink.partitions);
                    },
                );
                runner.outcome(if ok { "flush" } else { "panicked" });
                emitted(&mut runner, lane);
                *lane = Lane::new(&setup.cfg);
            }
        }
    }
    for (lane, setup) in lanes.iter_mut().zip(&setups) {
        runner.case(
            || format!("final flush of pipeline {}", setup.name),
            || {
                lane.pipeline.flush();
                check_outputs(lane, setup.cfg.uplink.partitions);
            },
        );
        emitted(&mut runner, lane);
    }
    // The fuzz agent samples for training: its samples were all checked above, so some must exist.
    assert!(
        runner.count("emitted:training_samples") > 0,
        "the fuzz made no training sample: the sampler was not exercised"
    );
    runner.finish();
}

/// Finding 1, fixed: 0 and 1e155 in one window overflowed the window's statistics. Now 1e155 is
/// rejected on its own (`value_out_of_range`) and a window holding values at the ±1e100 limit
/// reaches the wire with every figure finite.
pub fn stats_overflow_reproducer() {
    let cfg = AgentConfig::with_id("gw-1");
    let mut p = Pipeline::new(&cfg, Arc::new(AgentMetrics::default())).expect("default config");
    let big = p.handle(
        b"sensors/d1/temp",
        br#"{"ts":1700000000500,"value":1e155}"#,
        1_700_000_000_500,
    );
    assert!(
        matches!(big, Err(IngestError::ValueOutOfRange { .. })),
        "{big:?}"
    );
    for (ts, value) in [
        (1_700_000_000_000_i64, "0"),
        (1_700_000_001_000, "1e100"),
        (1_700_000_002_000, "-1e100"),
    ] {
        let payload = format!(r#"{{"ts":{ts},"value":{value}}}"#);
        assert_eq!(p.handle(b"sensors/d1/temp", payload.as_bytes(), ts), Ok(1));
    }
    p.flush();
    for output in p.take_outputs() {
        if let Output::Summary { summary, .. } = output {
            check_summary(&summary);
        }
    }
}
