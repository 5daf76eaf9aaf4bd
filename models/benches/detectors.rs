//! Throughput of every detector preset, one reading at a time, on seeded synthetic series.
//!
//! | shape      | what it is                                                              |
//! |------------|-------------------------------------------------------------------------|
//! | `sensor`   | 1 reading/s: daily cycle + slow drift + Gaussian noise, a spike every 997 |
//!
//! One criterion group, `presets`, with one benchmark per name in `DetectorConfig::PRESETS`; the
//! throughput is in readings (`Throughput::Elements`). Each iteration replays the same 100 000
//! readings into a clone of a detector warmed up on 10 000 others, so warm-up costs are excluded
//! and every run sees identical data. The per-series state size of each preset is printed once.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use edgewatch_models::detect::{Detector, DetectorConfig};
use std::hint::black_box;

const READINGS: usize = 100_000;
const WARMUP: usize = 10_000;

/// xorshift64* uniforms and Box-Muller normals: seeded, so every run sees the same series.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f64 {
        let (a, b) = (self.uniform(), self.uniform());
        (-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()
    }
}

fn sensor(n: usize, seed: u64) -> Vec<(i64, f64)> {
    let mut rng = Rng(seed);
    (0..n)
        .map(|i| {
            let t = i as f64;
            let cycle = 5.0 * (std::f64::consts::TAU * t / 86_400.0).sin();
            let spike = if i % 997 == 0 { 10.0 } else { 0.0 };
            (
                i as i64 * 1000,
                20.0 + cycle + t * 1e-5 + rng.normal() + spike,
            )
        })
        .collect()
}

fn presets(c: &mut Criterion) {
    let warm = sensor(WARMUP, 7);
    let data: Vec<(i64, f64)> = sensor(WARMUP + READINGS, 7)
        .into_iter()
        .skip(WARMUP)
        .collect();
    let mut group = c.benchmark_group("presets");
    group.throughput(Throughput::Elements(READINGS as u64));
    for &name in DetectorConfig::PRESETS {
        let Some(cfg) = DetectorConfig::preset(name) else {
            continue;
        };
        let Ok(mut detector) = cfg.build() else {
            continue;
        };
        for &(ts, v) in &warm {
            detector.update(ts, v);
        }
        println!("{name}: {} state bytes per series", detector.state_bytes());
        group.bench_function(name, |b| {
            b.iter_batched_ref(
                || detector.clone(),
                |d| {
                    let mut acc = 0.0;
                    for &(ts, v) in &data {
                        acc += d.update(black_box(ts), black_box(v));
                    }
                    acc
                },
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, presets);
criterion_main!(benches);
