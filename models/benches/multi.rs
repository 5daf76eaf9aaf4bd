//! Throughput of the multivariate models on seeded synthetic data (issue 15's targets in brackets):
//!
//! | benchmark          | what it measures                                                    |
//! |--------------------|---------------------------------------------------------------------|
//! | `pca_score_8`      | scoring one 8-feature vector with a fitted model (≥ 2 M vectors/s)  |
//! | `pca_fit_100k_x8`  | fitting the PCA model on 100 000 × 8 rows (< 1 s)                    |
//! | `kmeans_fit_10k_x8`| fitting peer groups on 10 000 profiles × 8 (< 1 s)                   |
//!
//! Data: a hidden load drives 8 correlated sensors with Gaussian noise (PCA); 4 device kinds with
//! per-device noise (peer groups). Same seeds every run.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use edgewatch_models::multi::{FitOptions, PcaModel, PeerModel, PeerOptions};
use std::hint::black_box;
use std::time::Duration;

const F: usize = 8;

/// xorshift64* uniforms and Box-Muller normals: seeded, so every run sees the same data.
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

fn names() -> Vec<String> {
    (0..F).map(|j| format!("m{j}")).collect()
}

/// `rows` vectors of 8 sensors: two hidden loads mixed with fixed gains, plus noise.
fn process(rows: usize, seed: u64) -> Vec<f64> {
    let mut rng = Rng(seed);
    let mut out = Vec::with_capacity(rows * F);
    for _ in 0..rows {
        let (a, b) = (rng.uniform(), rng.uniform());
        for j in 0..F {
            let w = j as f64 / F as f64;
            out.push(10.0 * j as f64 + 20.0 * (w * a + (1.0 - w) * b) + 0.5 * rng.normal());
        }
    }
    out
}

/// 10 000 device profiles: 4 kinds, per-device noise.
fn profiles(seed: u64) -> Vec<f64> {
    let mut rng = Rng(seed);
    let mut out = Vec::with_capacity(10_000 * F);
    for d in 0..10_000 {
        let kind = (d % 4) as f64;
        for j in 0..F {
            out.push(kind * 10.0 * ((j % 3) as f64 + 1.0) + rng.normal());
        }
    }
    out
}

fn bench(c: &mut Criterion) {
    let train = process(100_000, 1);
    let model = PcaModel::fit("bench", names(), &train, 0, 1, &FitOptions::default())
        .expect("benchmark data fits");
    let vectors = process(10_000, 2);
    let mut scorer = model.scorer();
    let mut g = c.benchmark_group("multi");
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("pca_score_8", |b| {
        b.iter(|| {
            let mut sum = 0.0;
            for x in vectors.chunks_exact(F) {
                sum += scorer.score(&model, black_box(x)).score;
            }
            sum
        })
    });
    g.throughput(Throughput::Elements(100_000));
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.bench_function("pca_fit_100k_x8", |b| {
        b.iter(|| {
            PcaModel::fit(
                "bench",
                names(),
                black_box(&train),
                0,
                1,
                &FitOptions::default(),
            )
        })
    });
    let prof = profiles(3);
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("kmeans_fit_10k_x8", |b| {
        b.iter(|| PeerModel::fit(names(), black_box(&prof), 0, &PeerOptions::default()))
    });
    g.finish();
    // Per-core rate by CPU time: on a shared machine criterion's wall-clock figure also counts the
    // time this thread waited for a core.
    let (cpu0, wall0) = (thread_cpu_secs(), std::time::Instant::now());
    let mut sum = 0.0;
    let rounds = 300;
    for _ in 0..rounds {
        for x in vectors.chunks_exact(F) {
            sum += scorer.score(&model, black_box(x)).score;
        }
    }
    let (cpu, wall) = (thread_cpu_secs() - cpu0, wall0.elapsed().as_secs_f64());
    let n = (rounds * vectors.len() / F) as f64;
    println!(
        "pca_score_8 by CPU time: {:.2} M vectors/s per core ({n} vectors, {cpu:.2} s CPU, {wall:.2} s wall, checksum {sum:.1})",
        n / cpu / 1e6
    );
    let peers = PeerModel::fit(names(), &prof, 0, &PeerOptions::default()).expect("profiles fit");
    println!(
        "pca: {} components, explained {:.3}; peers: {} groups",
        model.components.len(),
        model.quality.explained_variance_ratio,
        peers.centroids.len()
    );
}

/// This thread's user + system CPU time (Linux `/proc/thread-self/stat`, clock ticks of 10 ms);
/// NaN elsewhere.
fn thread_cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/thread-self/stat") else {
        return f64::NAN;
    };
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return f64::NAN;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(u), Some(s)) => (u + s) / 100.0,
        _ => f64::NAN,
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
