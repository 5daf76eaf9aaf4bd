//! Fleet intelligence models, pure and I/O-free: aligning a device's readings into vectors, the
//! multivariate PCA device model (T² and SPE against learned limits) and fleet peer groups
//! (k-means over device profiles), and training: the agent's per-period reservoir of a device's
//! vectors and the aggregator's bounded training sets and fit schedule. Fitting uses linfa; scoring
//! is plain arithmetic.

mod align;
mod axes;
mod limit;
mod pca;
mod peers;
mod sample;
mod standard;
mod train;

pub use align::{AlignConfig, Aligner};
pub use limit::Limit;
pub use pca::{
    BoundScorer, DeferredScore, FitOptions, FitQuality, MultiScore, PcaModel, PcaScorer,
};
pub use peers::{PeerModel, PeerOptions, PeerScore};
pub use sample::{DeviceSampler, SamplerConfig};
pub use train::{Added, DeviceSet, FitJob, KeptSample, TrainConfig, Trainer};

/// linfa version the models are fitted with, recorded in every artifact. Bump it together with the
/// `linfa`, `linfa-reduction` and `linfa-clustering` lines of the root `Cargo.toml`
/// (`[workspace.dependencies]`).
pub const LINFA_VERSION: &str = "0.8.1";

#[cfg(test)]
mod tests {
    use super::*;

    /// Readings of four sensors arrive one at a time, interleaved, through the aligner; the vectors
    /// it releases train a model, and a later correlation break in the same stream is caught.
    #[test]
    fn aligned_stream_trains_and_scores() {
        let features: Vec<String> = ["flow", "pressure", "current", "temp"]
            .map(String::from)
            .into();
        let mut aligner = Aligner::new(&features, &AlignConfig::default()).unwrap();
        // Deterministic load and noise: a slow cycle plus a small incommensurate wobble.
        let reading = |i: usize, j: usize, broken: bool| {
            let load = 0.5 + 0.4 * (i as f64 / 37.0).sin();
            let noise = 0.01 * ((i * 7 + j * 13) as f64 * 1.618).sin();
            let l = if broken && j == 2 { 1.0 - load } else { load };
            [10.0, 3.0, 5.0, 40.0][j] + [20.0, 2.0, 8.0, 15.0][j] * (l + noise)
        };
        let mut rows = Vec::new();
        for i in 0..3000 {
            for j in 0..4 {
                let ts = i as i64 * 1000 + j as i64 * 10;
                if aligner.push(j, ts, reading(i, j, false)) {
                    rows.extend_from_slice(aligner.vector());
                }
            }
        }
        // One vector per round of four readings.
        assert_eq!(rows.len(), 3000 * 4);
        let model = PcaModel::fit(
            "pump",
            features.clone(),
            &rows,
            0,
            3_000_000,
            &FitOptions::default(),
        )
        .unwrap();
        model.check_compatible(aligner.features()).unwrap();
        let mut scorer = model.scorer();
        let (mut normal, mut broken, mut scored, mut named) = (0, 0, 0, 0);
        for i in 3000..3400 {
            for j in 0..4 {
                let ts = i as i64 * 1000 + j as i64 * 10;
                if aligner.push(j, ts, reading(i, j, i >= 3200)) {
                    let s = scorer.score(&model, aligner.vector());
                    scored += 1;
                    if s.score >= 0.5 {
                        if i >= 3200 {
                            broken += 1;
                            named += usize::from(s.top == 2);
                        } else {
                            normal += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(scored, 400);
        assert_eq!(normal, 0);
        assert!(
            broken > 200 * 9 / 10,
            "{broken} of 200 broken vectors scored >= 0.5"
        );
        assert!(
            named > broken * 9 / 10,
            "the broken sensor is named in {named} of {broken}"
        );
    }

    /// An agent's sampler turns four hours of a device's vectors into hourly samples; the
    /// aggregator's trainer keeps them, schedules the device's fit and the model it fits catches
    /// a correlation break.
    #[test]
    fn sampled_periods_train_a_device_model() {
        let features: Vec<String> = ["a", "b", "c"].map(String::from).into();
        let mut sampler = DeviceSampler::new("pump", features.clone(), &SamplerConfig::default());
        let mut trainer = Trainer::new(TrainConfig {
            min_rows: 500,
            ..TrainConfig::default()
        });
        let vector = |i: usize, broken: bool| {
            let x = (i as f64 / 29.0).sin();
            let w = 0.02 * (i as f64 * 1.618).sin();
            [
                x + w,
                2.0 * x - w,
                if broken { -x } else { 3.0 * x + w * w },
            ]
        };
        let mut added = Vec::new();
        for i in 0..4 * 3600 {
            if let Some(s) = sampler.offer(i as i64 * 1000, &vector(i, false)) {
                added.push(trainer.add("agent-1", "a,b,c", s));
            }
        }
        added.extend(
            sampler
                .expire(4 * 3_600_000, 0)
                .map(|s| trainer.add("agent-1", "a,b,c", s)),
        );
        assert_eq!(added, vec![Added::Kept; 4]);
        let jobs = trainer.due(0, usize::MAX);
        assert_eq!((jobs.len(), jobs[0].rows.len()), (1, 4 * 256 * 3));
        let model = jobs[0].fit().unwrap();
        model.validate().unwrap();
        let mut scorer = model.scorer();
        assert!(scorer.score(&model, &vector(20_000, false)).score < 0.5);
        assert!(scorer.score(&model, &vector(20_000, true)).score >= 0.5);
    }
}
