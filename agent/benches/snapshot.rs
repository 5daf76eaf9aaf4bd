//! Pipeline snapshot and restore (agent checkpoints): time, and size printed once.
//!
//! | shape | value |
//! |---|---|
//! | series | 1,000 devices × 1 metric, default detector (ensemble), default windows (60 s, 5 s lateness) |
//! | history | 10,000 readings per series before the snapshot, 1 s apart, interleaved across devices |
//! | values | seeded: 20 + slow daily cycle + xorshift noise, a fleet-wide spike every 997 s |
//! | `snapshot` | `Pipeline::snapshot` of the whole table |
//! | `restore` | `Pipeline::restore` from those bytes (includes building the empty pipeline) |
//!
//! Throughput is in series (`Throughput::Elements`). Building the history takes ~16 s in release.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use edgewatch_agent::pipeline::Pipeline;
use edgewatch_agent::{AgentConfig, AgentMetrics};
use std::fmt::Write as _;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

const SERIES: u64 = 1_000;
const READINGS_PER_SERIES: i64 = 10_000;

fn warmed_pipeline(cfg: &AgentConfig) -> Pipeline {
    let mut p = Pipeline::new(cfg, Arc::new(AgentMetrics::default())).expect("default config");
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut noise = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    };
    let topics: Vec<String> = (0..SERIES)
        .map(|d| format!("sensors/pump-{d:04}/temperature"))
        .collect();
    let start_ms = 1_764_000_000_000i64;
    let mut payload = String::new();
    for i in 0..READINGS_PER_SERIES {
        let ts = start_ms + i * 1000;
        let cycle = 5.0 * (std::f64::consts::TAU * i as f64 / 86_400.0).sin();
        for topic in &topics {
            let spike = if i % 997 == 0 { 15.0 } else { 0.0 };
            payload.clear();
            let _ = write!(
                payload,
                r#"{{"ts":{ts},"value":{}}}"#,
                20.0 + cycle + noise() + spike
            );
            p.handle_topic(topic, payload.as_bytes(), ts)
                .expect("valid reading");
        }
        if i % 60 == 0 {
            p.tick(ts);
            drop(p.take_outputs());
        }
    }
    drop(p.take_outputs());
    p
}

fn snapshot_restore(c: &mut Criterion) {
    let cfg = AgentConfig::with_id("bench");
    let t = Instant::now();
    let p = warmed_pipeline(&cfg);
    let built = t.elapsed();
    let bytes = p.snapshot().expect("snapshot");
    println!(
        "snapshot of {} series after {} readings each (built in {:.1} s): {} bytes, {:.0} bytes/series",
        p.series(),
        READINGS_PER_SERIES,
        built.as_secs_f64(),
        bytes.len(),
        bytes.len() as f64 / p.series() as f64
    );
    let mut group = c.benchmark_group("pipeline_snapshot");
    group.throughput(Throughput::Elements(SERIES));
    group.sample_size(20);
    group.bench_function("snapshot", |b| {
        b.iter(|| black_box(p.snapshot().expect("snapshot")))
    });
    group.bench_function("restore", |b| {
        b.iter(|| {
            black_box(
                Pipeline::restore(&cfg, Arc::new(AgentMetrics::default()), &bytes)
                    .expect("restore"),
            )
        })
    });
    group.finish();
}

criterion_group!(benches, snapshot_restore);
criterion_main!(benches);
