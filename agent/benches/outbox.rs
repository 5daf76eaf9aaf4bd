//! Outbox write throughput (records/s) under three flush policies.
//!
//! | shape | value |
//! |---|---|
//! | record | a 10 s window summary of one (device, metric), ~320 bytes of JSON plus a 12-byte key |
//! | lanes | 8 partitions, round robin; 64 devices × 2 metrics |
//! | records per iteration | 1000 appends, then (untimed) an ack of everything |
//! | flush policy | `flush()` after every 1, 100 or 1000 appends (and at the end of the iteration) |
//! | budget | unbounded (no coarsening or eviction) |
//!
//! Data is seeded (a fixed xorshift), so runs are comparable.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use edgewatch_agent::outbox::{Outbox, OutboxConfig, Record};
use edgewatch_models::stats::RunningStats;
use edgewatch_models::wire::WindowSummary;
use std::time::{Duration, Instant};

const RECORDS: u64 = 1000;
const LANES: u32 = 8;

fn summaries(n: u64) -> Vec<(u32, Record)> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|i| {
            let device = i % 64;
            let metric = if i % 2 == 0 {
                "temperature"
            } else {
                "vibration"
            };
            let start_ms = 1_764_000_000_000 + (i / 128) as i64 * 10_000;
            let mut st = RunningStats::default();
            for _ in 0..10 {
                st.push(20.0 + 5.0 * next());
            }
            let s = WindowSummary {
                device: format!("pump-{device:04}"),
                metric: metric.into(),
                start_ms,
                end_ms: start_ms + 10_000,
                count: st.count,
                min: st.min,
                max: st.max,
                mean: st.mean,
                std: st.std(),
                first_ts_ms: start_ms + 13,
                last_ts_ms: start_ms + 9_981,
                max_score: next() * 0.3,
                revision: 0,
            };
            ((device % u64::from(LANES)) as u32, Record::Summary(s))
        })
        .collect()
}

fn append_throughput(c: &mut Criterion) {
    let records = summaries(RECORDS);
    let mut group = c.benchmark_group("outbox_append");
    group.throughput(Throughput::Elements(RECORDS));
    group.sample_size(10);
    for flush_every in [1usize, 100, 1000] {
        group.bench_with_input(
            BenchmarkId::new("flush_every", flush_every),
            &flush_every,
            |b, &flush_every| {
                let dir = tempfile::tempdir().expect("temp dir for the bench");
                let cfg = OutboxConfig {
                    max_outbox_bytes: u64::MAX,
                    normal_score_below: 0.5,
                };
                let mut ob = Outbox::open(dir.path(), cfg).expect("open outbox");
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let t = Instant::now();
                        for (i, (lane, r)) in records.iter().enumerate() {
                            ob.append(*lane, r.clone()).expect("append");
                            if (i + 1) % flush_every == 0 {
                                ob.flush().expect("flush");
                            }
                        }
                        ob.flush().expect("flush");
                        total += t.elapsed();
                        for lane in 0..LANES {
                            let upto = ob.next_seq(lane) - 1;
                            ob.ack(lane, upto).expect("ack");
                        }
                    }
                    total
                });
            },
        );
    }
    group.finish();
}

criterion_group!(benches, append_throughput);
criterion_main!(benches);
