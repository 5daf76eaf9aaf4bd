//! Fuzz target: what arrives on the uplink. Topic names go through `Topics::parse` (as the
//! aggregator and the agent route messages); payloads through `serde_json::from_slice` into
//! `Batch<WindowSummary>`, `Batch<AnomalyEvent>` and `AckBatch`, the types the aggregator's consumer
//! and the agent's ack handler decode.
//!
//! Invariants beyond "no panic": a parsed topic names a non-empty agent without `/`, and the topic
//! built back from it parses to the same thing; a decoded payload encodes and decodes back to the
//! same value, and encodes the same way twice.

use crate::gen::{Corpus, Gen};
use crate::{budget, escaped, Runner};
use edgewatch_models::wire::{
    Ack, AckBatch, AnomalyEvent, Batch, Sequenced, Topics, UplinkTopic, WindowSummary,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt::Debug;

const PREFIXES: &[&str] = &["edgewatch/v1", "p", "a/b/c/"];

const PARTITIONS: &[&str] = &[
    "0",
    "7",
    "63",
    "4294967295",
    "4294967296",
    "-1",
    "+3",
    "007",
    "",
    "x",
    "1e3",
    " 1",
    "٣",
];

/// One input: the prefix the receiver uses, and the MQTT message.
#[derive(Clone)]
struct Message {
    prefix: usize,
    topic: Vec<u8>,
    payload: Vec<u8>,
}

/// What one payload decoded into.
enum Decoded<'a> {
    Summaries(&'a Batch<WindowSummary>),
    Anomalies(&'a Batch<AnomalyEvent>),
    Acks(&'a AckBatch),
}

/// The aggregator's record checks ([`WindowSummary::check`], [`AnomalyEvent::check`]) on every
/// decoded batch: they return `Ok` or an error, never panic, and whatever they accept keeps their
/// promises (finite figures, a real window, scores in [0, 1]).
fn validate(topic: Option<&UplinkTopic<'_>>, decoded: Decoded<'_>) {
    let _ = topic;
    match decoded {
        Decoded::Summaries(b) => {
            for r in &b.records {
                let s = &r.item;
                if s.check().is_ok() {
                    assert!(s.end_ms > s.start_ms && s.count > 0, "{s:?}");
                    assert!(
                        [s.min, s.max, s.mean, s.std, s.max_score]
                            .iter()
                            .all(|v| v.is_finite()),
                        "{s:?}"
                    );
                    assert!(s.min <= s.max && s.std >= 0.0, "{s:?}");
                    assert!((0.0..=1.0).contains(&s.max_score), "{s:?}");
                    assert!(
                        s.start_ms <= s.first_ts_ms
                            && s.first_ts_ms <= s.last_ts_ms
                            && s.last_ts_ms < s.end_ms,
                        "{s:?}"
                    );
                }
            }
        }
        Decoded::Anomalies(b) => {
            for r in &b.records {
                let e = &r.item;
                if e.check().is_ok() {
                    assert!(
                        e.value.is_finite() && (0.0..=1.0).contains(&e.score),
                        "{e:?}"
                    );
                }
            }
        }
        Decoded::Acks(a) => {
            // What an agent acts on survives a round trip unchanged (epoch and seq included).
            let again: AckBatch =
                serde_json::from_slice(&serde_json::to_vec(a).expect("encodes")).expect("decodes");
            assert_eq!(&again, a);
        }
    }
}

fn string(g: &mut Gen) -> String {
    String::from_utf8_lossy(&g.name()).into_owned()
}

/// A finite f64 from the edge of the range as often as from the middle.
fn float(g: &mut Gen) -> f64 {
    let v: f64 = g.number().parse().unwrap_or(0.0);
    if v.is_finite() {
        v
    } else {
        f64::MAX
    }
}

fn int(g: &mut Gen) -> i64 {
    g.pick(&[0, -1, 1, i64::MIN, i64::MAX, 1_700_000_000_000, 60_000])
}

fn records<T>(g: &mut Gen, item: impl Fn(&mut Gen) -> T) -> Vec<Sequenced<T>> {
    (0..g.below(4))
        .map(|i| Sequenced {
            seq: g.pick(&[i as u64 + 1, 0, u64::MAX]),
            prev: g.chance(1, 3).then(|| g.pick(&[0, 1, u64::MAX])),
            item: item(g),
        })
        .collect()
}

fn summary(g: &mut Gen) -> WindowSummary {
    WindowSummary {
        device: string(g),
        metric: string(g),
        start_ms: int(g),
        end_ms: int(g),
        count: g.pick(&[0, 1, u64::MAX]),
        min: float(g),
        max: float(g),
        mean: float(g),
        std: float(g),
        first_ts_ms: int(g),
        last_ts_ms: int(g),
        max_score: float(g),
        revision: g.pick(&[0, 1, u32::MAX]),
    }
}

fn event(g: &mut Gen) -> AnomalyEvent {
    AnomalyEvent {
        phase: edgewatch_models::wire::EventPhase::Onset,
        model_version: None,
        id: string(g),
        device: string(g),
        metric: string(g),
        ts_ms: int(g),
        value: float(g),
        score: float(g),
        detector: string(g),
        window_start_ms: int(g),
        agent: string(g),
    }
}

fn topic(g: &mut Gen, prefix: &str) -> Vec<u8> {
    let prefix = prefix.trim_end_matches('/');
    let agent = if g.chance(3, 4) {
        format!("gw-{}", g.below(10))
    } else {
        string(g)
    };
    let partition = if g.chance(1, 2) {
        g.below(64).to_string()
    } else {
        g.pick(PARTITIONS).to_string()
    };
    match g.below(8) {
        0..=2 => format!("{prefix}/summaries/{partition}/{agent}").into_bytes(),
        3 | 4 => format!("{prefix}/anomalies/{partition}/{agent}").into_bytes(),
        5 => format!("{prefix}/acks/{agent}").into_bytes(),
        6 => format!("{prefix}/{}/{partition}", string(g)).into_bytes(),
        _ => g.name(),
    }
}

fn payload(g: &mut Gen) -> Vec<u8> {
    let agent = format!("gw-{}", g.below(10));
    let partition = g.below(64) as u32;
    let acked = g.pick(&[0, 1, u64::MAX]);
    let mut out = Vec::new();
    match g.below(10) {
        0 | 1 => {
            let records = records(g, summary);
            out = serde_json::to_vec(&Batch {
                agent,
                partition,
                records,
                acked,
                epoch: g.pick(&[0, 1, u64::MAX]),
            })
            .expect("encodes");
        }
        2 | 3 => {
            let records = records(g, event);
            out = serde_json::to_vec(&Batch {
                agent,
                partition,
                records,
                acked,
                epoch: g.pick(&[0, 1, u64::MAX]),
            })
            .expect("encodes");
        }
        4 => {
            let acks = (0..g.below(4))
                .map(|_| Ack {
                    partition: g.u64() as u32,
                    upto_seq: g.u64(),
                    epoch: g.u64(),
                    lane: Default::default(),
                })
                .collect();
            out = serde_json::to_vec(&AckBatch { owner: agent, acks }).expect("encodes");
        }
        5 | 6 => {
            // Batch-shaped text whose fields hold any JSON, numbers as literals serde never writes.
            out.extend(format!("{{\"agent\":\"{agent}\",\"partition\":{},", g.number()).bytes());
            out.extend_from_slice(b"\"records\":[");
            for i in 0..g.below(4) {
                if i > 0 {
                    out.push(b',');
                }
                out.extend(format!("{{\"seq\":{}", g.number()).bytes());
                for _ in 0..g.below(14) {
                    out.push(b',');
                    g.key(&mut out);
                    g.json(2, &mut out);
                }
                out.push(b'}');
            }
            out.extend(format!("],\"acked\":{}}}", g.number()).bytes());
        }
        7 => g.json(5, &mut out),
        8 => g.deep(&mut out),
        _ => out.extend((0..g.below(64)).map(|_| g.u64() as u8)),
    }
    out
}

/// Encodes `v`, decodes it back and encodes again: the same value, the same bytes.
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(v: &T) {
    let json = serde_json::to_vec(v).expect("a decoded value encodes");
    let back: T = serde_json::from_slice(&json).unwrap_or_else(|e| {
        panic!(
            "re-encoded value does not decode: {e}\n{}",
            String::from_utf8_lossy(&json)
        )
    });
    assert_eq!(&back, v, "decode(encode(x)) != x");
    assert_eq!(serde_json::to_vec(&back).expect("encodes"), json);
}

fn check_topic(topics: &Topics, topic: &str) {
    let Some(parsed) = topics.parse(topic) else {
        return;
    };
    let (again, agent) = match &parsed {
        UplinkTopic::Summaries { partition, agent } => (topics.summaries(*partition, agent), agent),
        UplinkTopic::Anomalies { partition, agent } => (topics.anomalies(*partition, agent), agent),
        UplinkTopic::Samples { partition, agent } => (topics.samples(*partition, agent), agent),
        UplinkTopic::Acks { agent } => (topics.acks(agent), agent),
    };
    assert!(!agent.is_empty() && !agent.contains('/'), "agent {agent:?}");
    assert_eq!(topics.parse(&again), Some(parsed), "{again}");
}

/// Decodes one message every way a receiver might and checks the invariants; returns the outcome
/// for the topic and for the payload.
fn check(msg: &Message) -> [&'static str; 2] {
    let topics = Topics::new(PREFIXES[msg.prefix]);
    let topic = std::str::from_utf8(&msg.topic).ok();
    if let Some(t) = topic {
        check_topic(&topics, t);
    }
    let parsed = topic.and_then(|t| topics.parse(t));
    let topic_label = match &parsed {
        Some(UplinkTopic::Summaries { .. }) => "topic:summaries",
        Some(UplinkTopic::Anomalies { .. }) => "topic:anomalies",
        Some(UplinkTopic::Samples { .. }) => "topic:samples",
        Some(UplinkTopic::Acks { .. }) => "topic:acks",
        None => "topic:foreign",
    };
    let mut label = "payload:undecodable";
    if let Ok(b) = serde_json::from_slice::<Batch<WindowSummary>>(&msg.payload) {
        round_trip(&b);
        validate(parsed.as_ref(), Decoded::Summaries(&b));
        label = "payload:summary_batch";
    }
    if let Ok(b) = serde_json::from_slice::<Batch<AnomalyEvent>>(&msg.payload) {
        round_trip(&b);
        validate(parsed.as_ref(), Decoded::Anomalies(&b));
        label = "payload:anomaly_batch";
    }
    if let Ok(b) = serde_json::from_slice::<AckBatch>(&msg.payload) {
        round_trip(&b);
        validate(parsed.as_ref(), Decoded::Acks(&b));
        label = "payload:ack_batch";
    }
    [topic_label, label]
}

/// Runs the target: 35 % of the fuzz budget.
pub fn run() {
    let (cases, seed) = budget(35, 2);
    let mut g = Gen::new(seed);
    let mut runner = Runner::new("uplink messages (Topics::parse, wire batches)", seed);
    let mut seeds = vec![
        Message {
            prefix: 0,
            topic: b"edgewatch/v1/summaries/7/gw-1".to_vec(),
            payload: br#"{"agent":"gw-1","partition":7,"records":[{"seq":1,"device":"pump-7","metric":"temp","start_ms":1700000040000,"end_ms":1700000100000,"count":60,"min":20.1,"max":22.3,"mean":21.2,"std":0.4,"first_ts_ms":1700000040500,"last_ts_ms":1700000099500,"max_score":0.12}],"acked":0}"#.to_vec(),
        },
        Message {
            prefix: 0,
            topic: b"edgewatch/v1/anomalies/7/gw-1".to_vec(),
            payload: br#"{"agent":"gw-1","partition":7,"records":[{"seq":2,"prev":1,"id":"0f3c2a1b4d5e6f70","device":"pump-7","metric":"temp","ts_ms":1700000050000,"value":90.0,"score":0.97,"detector":"ensemble","window_start_ms":1700000040000,"agent":"gw-1"}],"acked":1}"#.to_vec(),
        },
        Message {
            prefix: 0,
            topic: b"edgewatch/v1/acks/gw-1".to_vec(),
            payload: br#"{"owner":"agg-1","acks":[{"partition":7,"upto_seq":2}]}"#.to_vec(),
        },
    ];
    for _ in 0..30 {
        let prefix = g.below(PREFIXES.len());
        seeds.push(Message {
            prefix,
            topic: topic(&mut g, PREFIXES[prefix]),
            payload: payload(&mut g),
        });
    }
    let mut corpus = Corpus::new(seeds, 2000);
    for _ in 0..cases {
        let msg = if g.chance(2, 5) {
            let prefix = g.below(PREFIXES.len());
            Message {
                prefix,
                topic: topic(&mut g, PREFIXES[prefix]),
                payload: payload(&mut g),
            }
        } else {
            let mut msg = corpus.pick(&mut g);
            let other = corpus.pick(&mut g);
            if g.chance(1, 4) {
                g.mutate(&mut msg.topic, &other.topic);
            } else {
                g.mutate(&mut msg.payload, &other.payload);
            }
            msg
        };
        let mut labels = ["panicked"; 2];
        runner.case(
            || {
                format!(
                    "prefix  {:?}\ntopic   {}\npayload {}",
                    PREFIXES[msg.prefix],
                    escaped(&msg.topic),
                    escaped(&msg.payload)
                )
            },
            || labels = check(&msg),
        );
        labels.iter().for_each(|l| runner.outcome(l));
        if labels[1] != "payload:undecodable" || g.chance(1, 50) {
            corpus.add(&mut g, msg);
        }
    }
    runner.finish();
}
