//! Fuzz target: configuration files through `edgewatch::config::parse`, the function behind every
//! `--config` the CLI takes (agent, aggregator, simulator, demo), behind the size and nesting limits
//! of `edgewatch_models::yaml_limits`.
//!
//! Invariants beyond "no panic": a refusal names the file and at least one problem, and any
//! line:column it gives is 1-based and inside the text; text over the limits is refused with the
//! limit's error; and the limit scanner never sees less nesting than the YAML parser builds — for
//! every text `serde_norway` parses (aliases aside: they nest by reference), the depth of the value
//! is at most the depth the scanner measured. That last one is what keeps the guard sound.

use crate::gen::{Corpus, Gen};
use crate::{budget, escaped, Runner};
use edgewatch_models::yaml_limits::{self, YamlLimitError, YamlLimits};
use serde_norway::Value;
use std::path::Path;

/// Which configuration type the text is parsed as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Agent,
    Aggregator,
    Simulator,
    Demo,
}

const KINDS: &[Kind] = &[Kind::Agent, Kind::Aggregator, Kind::Simulator, Kind::Demo];

#[derive(Clone)]
struct Input {
    kind: Kind,
    text: Vec<u8>,
}

/// Keys of the real configurations, so generated trees get past `deny_unknown_fields` at times.
const KEYS: &[&str] = &[
    "id",
    "source",
    "mqtt",
    "host",
    "port",
    "subscriptions",
    "topic",
    "payload",
    "type",
    "metric",
    "value_field",
    "timestamp_field",
    "timestamp_unit",
    "uplink",
    "prefix",
    "partitions",
    "qos",
    "window",
    "size_ms",
    "allowed_lateness_ms",
    "idle_timeout_ms",
    "detector",
    "alpha",
    "anomaly",
    "threshold",
    "pipeline",
    "max_series",
    "max_payload_bytes",
    "state",
    "dir",
    "owned",
    "http",
    "listen",
    "feed",
    "history",
    "metrics",
    "devices",
    "name",
    "base",
    "noise_std",
    "cluster",
    "servers",
    "tls",
    "ca_file",
    "broker",
    "agent",
    "aggregators",
    "simulator",
    "keepalive_secs",
];

/// YAML scalars that are numbers, infinities, NaNs or booleans only to some readers.
const SCALARS: &[&str] = &[
    "1",
    "0",
    "-1",
    "64",
    "60000",
    "0.5",
    "1.5",
    "1e308",
    "1.3e154",
    "-1.3e154",
    "1e309",
    ".inf",
    "-.inf",
    ".nan",
    "NaN",
    "0x1F",
    "0o17",
    "1_000",
    "~",
    "null",
    "yes",
    "no",
    "on",
    "true",
    "''",
    "\"\"",
    "gw-1",
    "json",
    "json_object",
    "number",
    "zscore",
    "ensemble",
    "ewma",
    "s",
    "ms",
    "ns",
    "\"sensors/{device}/{metric}\"",
    "127.0.0.1",
    "[\"0-31\"]",
    "!!binary aGVsbG8=",
    "\"\\u0000\"",
    "'it''s'",
    "é",
    "18446744073709551616",
    "-9223372036854775809",
];

fn scalar(g: &mut Gen, out: &mut String) {
    if g.chance(1, 12) {
        out.push_str(&"x".repeat(g.below(5000)));
    } else if g.chance(1, 6) {
        out.push_str(&g.number());
    } else {
        out.push_str(g.pick(SCALARS));
    }
}

/// A random YAML value in block style at `indent`, with flow collections, anchors and comments.
fn block(g: &mut Gen, depth: usize, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    let kind = if depth == 0 { 0 } else { g.below(6) };
    match kind {
        0 | 1 => {
            out.push(' ');
            scalar(g, out);
            out.push('\n');
        }
        2 => {
            out.push(' ');
            flow(g, depth, out);
            out.push('\n');
        }
        3 => {
            out.push_str(" |\n");
            out.push_str(&pad);
            out.push_str("  text [ { # '\n");
        }
        4 => {
            out.push_str(if g.chance(1, 4) { " &a # c\n" } else { "\n" });
            for _ in 0..1 + g.below(3) {
                out.push_str(&pad);
                out.push_str("  -");
                block(g, depth - 1, indent + 2, out);
            }
        }
        _ => {
            out.push('\n');
            for _ in 0..1 + g.below(4) {
                out.push_str(&pad);
                out.push_str("  ");
                out.push_str(g.pick(KEYS));
                out.push(':');
                block(g, depth - 1, indent + 2, out);
            }
        }
    }
}

fn flow(g: &mut Gen, depth: usize, out: &mut String) {
    if depth == 0 || g.chance(1, 3) {
        scalar(g, out);
        return;
    }
    let map = g.chance(1, 2);
    out.push(if map { '{' } else { '[' });
    for i in 0..g.below(4) {
        if i > 0 {
            out.push_str(", ");
        }
        if map {
            out.push_str(g.pick(KEYS));
            out.push_str(": ");
        }
        flow(g, depth - 1, out);
    }
    out.push(if map { '}' } else { ']' });
}

/// A whole document: a top-level mapping of schema keys, or something deep.
fn document(g: &mut Gen) -> Vec<u8> {
    let mut out = String::new();
    match g.below(10) {
        0 => {
            // Just below, at and past the nesting limit, and the 100k brackets.
            let levels = g.pick(&[60, 63, 64, 65, 70, 1000, 100_000]);
            let open = g.pick(&["[", "{a: ", "- ", "[{a: "]);
            out.push_str("id: gw-1\nx: ");
            if open == "- " {
                // Nested block sequences, one level of indentation each.
                for level in 0..levels.min(300) {
                    out.push('\n');
                    out.push_str(&" ".repeat(level * 2));
                    out.push('-');
                }
                out.push_str(" a");
            } else {
                out.push_str(&open.repeat(levels));
            }
        }
        1 => {
            for level in 0..g.pick(&[62, 63, 64, 65]) {
                out.push_str(&" ".repeat(level));
                out.push_str("k:\n");
            }
        }
        _ => {
            for _ in 0..1 + g.below(8) {
                out.push_str(g.pick(KEYS));
                out.push(':');
                block(g, 4, 0, &mut out);
            }
        }
    }
    out.into_bytes()
}

/// Nesting of a parsed value: what the parser built, to compare with what the scanner counted.
fn depth(v: &Value) -> usize {
    match v {
        Value::Sequence(s) => 1 + s.iter().map(depth).max().unwrap_or(0),
        Value::Mapping(m) => {
            1 + m
                .iter()
                .map(|(k, v)| depth(k).max(depth(v)))
                .max()
                .unwrap_or(0)
        }
        Value::Tagged(t) => depth(&t.value),
        _ => 0,
    }
}

fn parse(kind: Kind, text: &str, file: &Path) -> Result<(), edgewatch::config::ConfigError> {
    use edgewatch::config::parse;
    match kind {
        Kind::Agent => parse::<edgewatch_agent::AgentConfig>(text, file).map(drop),
        Kind::Aggregator => parse::<edgewatch_aggregator::AggregatorConfig>(text, file).map(drop),
        Kind::Simulator => parse::<edgewatch_simulators::SimulatorConfig>(text, file).map(drop),
        Kind::Demo => parse::<edgewatch::demo::DemoConfig>(text, file).map(drop),
    }
}

/// Parses one input as the CLI would and checks the invariants; returns the outcome.
fn check(input: &Input) -> &'static str {
    let limits = yaml_limits::check(&input.text, YamlLimits::default());
    let Ok(text) = std::str::from_utf8(&input.text) else {
        return "not_utf8";
    };
    let file = Path::new("fuzz/config.yaml");
    let result = parse(input.kind, text, file);
    if let Err(e) = &result {
        assert_eq!(e.file, file);
        assert!(!e.problems.is_empty(), "an error without problems");
        let breaks = 1
            + text.bytes().filter(|&b| b == b'\n' || b == b'\r').count()
            + text.matches(['\u{85}', '\u{2028}', '\u{2029}']).count();
        for p in &e.problems {
            if let Some((line, col)) = p.location {
                assert!(
                    line >= 1 && col >= 1,
                    "{e}: location {line}:{col} is not 1-based"
                );
                assert!(
                    line <= breaks + 1,
                    "{e}: line {line} past the end ({breaks} lines)"
                );
            }
        }
        assert!(e.to_string().starts_with("fuzz/config.yaml"), "{e}");
    }
    match limits {
        Err(YamlLimitError::TooDeep { line, col, .. }) => {
            let e = result.expect_err("text past the nesting limit is refused");
            assert_eq!(e.problems[0].location, Some((line, col)), "{e}");
            return "refused_too_deep";
        }
        Err(YamlLimitError::TooLarge { .. }) => {
            let e = result.expect_err("text past the size limit is refused");
            assert!(
                e.problems[0].message.contains("larger than the limit"),
                "{e}"
            );
            return "refused_too_large";
        }
        Ok(()) => {}
    }
    // Soundness of the guard: the scanner must see at least the nesting the parser builds.
    if !text.contains('*') {
        if let Ok(v) = serde_norway::from_str::<Value>(text) {
            let scanned = yaml_limits::deepest(text.as_bytes());
            assert!(
                depth(&v) <= scanned.depth,
                "the parser built {} levels, the scanner counted {}",
                depth(&v),
                scanned.depth
            );
        }
    }
    if result.is_ok() {
        "valid"
    } else {
        "invalid"
    }
}

fn seeds() -> Vec<Input> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut seeds = Vec::new();
    for dir in [root.clone(), root.join("cluster")] {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .expect("configs/ is readable")
            .map(|e| e.expect("directory entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        entries.sort();
        for path in entries {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let kind = match name.split(['-', '.']).next() {
                Some("agent") => Kind::Agent,
                Some("aggregator") => Kind::Aggregator,
                Some("simulator") => Kind::Simulator,
                Some("demo") => Kind::Demo,
                _ => continue,
            };
            let text = std::fs::read(&path).expect("config readable");
            seeds.push(Input { kind, text });
        }
    }
    assert!(
        seeds.len() >= 9,
        "configs/ holds the example configurations"
    );
    seeds
}

/// Runs the target: 15 % of the fuzz budget.
pub fn run() {
    let (cases, seed) = budget(15, 3);
    let mut g = Gen::new(seed);
    let mut runner = Runner::new("config files (config::parse behind yaml_limits)", seed);
    let mut corpus = Corpus::new(seeds(), 500);
    for _ in 0..cases {
        let input = match g.below(10) {
            0..=2 => Input {
                kind: g.pick(KINDS),
                text: document(&mut g),
            },
            _ => {
                let mut input = if g.chance(1, 3) {
                    corpus.seed(&mut g)
                } else {
                    corpus.pick(&mut g)
                };
                let other = corpus.pick(&mut g);
                g.mutate(&mut input.text, &other.text);
                if g.chance(1, 8) {
                    input.kind = g.pick(KINDS);
                }
                input
            }
        };
        let mut label = "panicked";
        runner.case(
            || format!("parsed as {:?}\ntext {}", input.kind, escaped(&input.text)),
            || label = check(&input),
        );
        runner.outcome(label);
        if matches!(label, "valid" | "invalid") && g.chance(1, 4) {
            corpus.add(&mut g, input);
        }
    }
    runner.finish();
}
