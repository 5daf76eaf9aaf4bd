//! Replaying one device run row by row through the code the agent runs: a fresh detector per
//! sensor column, each with its [`EventGate`], and the multivariate [`PcaModel`] on the row's
//! vector aligned by [`Aligner`] with its own gate. Each row yields the three views' scores.

use super::parse::Row;
use crate::detect::{AnyDetector, Detector, DetectorConfig, EventGate, GateConfig};
use crate::eval::EvalError;
use crate::multi::{AlignConfig, Aligner, PcaModel, PcaScorer};

/// Events of the multivariate model are raised at this score unless a threshold is given: 0.5 is
/// p = 1e-5 after Bonferroni on the model's surprise scale (the ensemble's scale too).
pub const MULTI_THRESHOLD: f64 = 0.5;

/// How a device run is replayed.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayConfig {
    /// The univariate detector built fresh for every sensor column.
    pub detector: DetectorConfig,
    /// Event threshold of every view; default: the detector's recommended threshold for the
    /// univariate view, [`MULTI_THRESHOLD`] for the multivariate one.
    pub threshold: Option<f64>,
    /// Re-arm rules of every gate.
    pub gate: GateConfig,
    /// Alignment of a row's readings into the model's vector.
    pub align: AlignConfig,
}

impl ReplayConfig {
    /// The univariate view's threshold.
    pub fn uni_threshold(&self) -> f64 {
        self.threshold
            .unwrap_or_else(|| self.detector.recommended_threshold())
    }

    /// The multivariate view's threshold.
    pub fn multi_threshold(&self) -> f64 {
        self.threshold.unwrap_or(MULTI_THRESHOLD)
    }
}

/// One view's output for a row: the score as a state, its alarm view and whether an event starts.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ViewRow {
    /// The score as a state ("abnormal now"), in [0, 1].
    pub state: f64,
    /// The gate's alarm view of it (0 while an episode lasts), as NAB sweeps it.
    pub alarm: f64,
    /// Whether an event starts at this row.
    pub event: bool,
    /// Whether the state reaches the view's threshold.
    pub fired: bool,
}

/// What one row gives.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RowScores {
    /// Per sensor column: its detector's latest score (kept over a missing reading).
    pub columns: Vec<f64>,
    /// Per sensor column: the alarm view (0 for a missing reading).
    pub column_alarms: Vec<f64>,
    /// Univariate device view: max over the columns; an event when any column's gate raises one.
    pub uni: ViewRow,
    /// Multivariate view (all zero without a model, in training or when the vector is incomplete).
    pub multi: ViewRow,
    /// Combined: max of the two states and alarm views; an event when either raises one.
    pub combined: ViewRow,
    /// Feature contributing most to the multivariate score, when the model scored this row.
    pub top: Option<usize>,
    /// Whether the row completed an aligned vector ([`DeviceReplay::aligned`]).
    pub aligned: bool,
}

/// The replay state of one device run.
#[derive(Debug, Clone)]
pub struct DeviceReplay {
    features: Vec<String>,
    detectors: Vec<AnyDetector>,
    gates: Vec<EventGate>,
    aligner: Aligner,
    model: Option<(PcaModel, PcaScorer)>,
    multi_gate: EventGate,
    uni_threshold: f64,
    multi_threshold: f64,
    out: RowScores,
}

impl DeviceReplay {
    /// Fresh detectors for `features` (the sensor columns, in row order); no model yet.
    pub fn new(features: &[String], cfg: &ReplayConfig) -> Result<Self, EvalError> {
        let uni_threshold = cfg.uni_threshold();
        let multi_threshold = cfg.multi_threshold();
        let n = features.len();
        let detectors = (0..n)
            .map(|_| cfg.detector.build())
            .collect::<Result<Vec<_>, _>>()?;
        let gate = EventGate::new(uni_threshold, &cfg.gate)?;
        Ok(Self {
            features: features.to_vec(),
            detectors,
            gates: vec![gate; n],
            aligner: Aligner::new(features, &cfg.align)?,
            model: None,
            multi_gate: EventGate::new(multi_threshold, &cfg.gate)?,
            uni_threshold,
            multi_threshold,
            out: RowScores {
                columns: vec![0.0; n],
                column_alarms: vec![0.0; n],
                ..RowScores::default()
            },
        })
    }

    /// Starts scoring with `model` from the next row; refused unless it is valid and its features
    /// are this device's sensor columns in order.
    pub fn set_model(&mut self, model: PcaModel) -> Result<(), EvalError> {
        model.validate()?;
        model.check_compatible(&self.features)?;
        let scorer = model.scorer();
        self.model = Some((model, scorer));
        Ok(())
    }

    /// The model in use, if any.
    pub fn model(&self) -> Option<&PcaModel> {
        self.model.as_ref().map(|(m, _)| m)
    }

    /// The aligned vector after the last row, when that row completed one (for training).
    pub fn aligned(&self) -> Option<&[f64]> {
        self.out.aligned.then(|| self.aligner.vector())
    }

    /// Feeds one row (its values in feature order, NaN for a missing reading).
    pub fn step(&mut self, row: &Row) -> Result<&RowScores, EvalError> {
        if row.values.len() != self.detectors.len() {
            return Err(EvalError::Dataset(format!(
                "row at {} ms has {} values for {} sensors",
                row.ts_ms,
                row.values.len(),
                self.detectors.len()
            )));
        }
        let out = &mut self.out;
        let mut uni = ViewRow::default();
        let mut ready = None;
        for (j, &v) in row.values.iter().enumerate() {
            if v.is_nan() {
                out.column_alarms[j] = 0.0;
            } else {
                let s = self.detectors[j].update(row.ts_ms, v);
                let s = if s.is_finite() {
                    s.clamp(0.0, 1.0)
                } else {
                    0.0
                };
                let armed = self.gates[j].armed();
                uni.event |= self.gates[j].update(s);
                out.columns[j] = s;
                out.column_alarms[j] = if armed { s } else { 0.0 };
                ready = Some(self.aligner.push(j, row.ts_ms, v));
            }
            uni.state = uni.state.max(out.columns[j]);
            uni.alarm = uni.alarm.max(out.column_alarms[j]);
        }
        uni.fired = uni.state >= self.uni_threshold;
        out.aligned = ready == Some(true);
        let mut multi = ViewRow::default();
        out.top = None;
        if let (Some((model, scorer)), true) = (&mut self.model, out.aligned) {
            let s = scorer.score(model, self.aligner.vector());
            let score = if s.score.is_finite() {
                s.score.clamp(0.0, 1.0)
            } else {
                0.0
            };
            let armed = self.multi_gate.armed();
            multi = ViewRow {
                state: score,
                alarm: if armed { score } else { 0.0 },
                event: self.multi_gate.update(score),
                fired: score >= self.multi_threshold,
            };
            out.top = Some(s.top);
        }
        out.combined = ViewRow {
            state: uni.state.max(multi.state),
            alarm: uni.alarm.max(multi.alarm),
            event: uni.event || multi.event,
            fired: uni.fired || multi.fired,
        };
        out.uni = uni;
        out.multi = multi;
        Ok(&self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::multi::FitOptions;

    fn cfg() -> ReplayConfig {
        ReplayConfig {
            detector: DetectorConfig::default(),
            threshold: None,
            gate: GateConfig::default(),
            align: AlignConfig::default(),
        }
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("s{i}")).collect()
    }

    fn row(ts_ms: i64, values: &[f64]) -> Row {
        Row {
            ts_ms,
            label: false,
            values: values.to_vec(),
        }
    }

    #[test]
    fn a_spike_in_one_column_raises_one_univariate_event_and_the_state_is_the_max() {
        let mut r = DeviceReplay::new(&names(2), &cfg()).unwrap();
        let mut events = Vec::new();
        for i in 0..600i64 {
            let a = (i as f64 / 7.0).sin();
            let b = if (400..403).contains(&i) {
                80.0
            } else {
                (i as f64 / 5.0).cos()
            };
            let out = r.step(&row(i * 1000, &[a, b])).unwrap();
            assert_eq!(out.uni.state, out.columns[0].max(out.columns[1]));
            assert_eq!(
                out.multi,
                ViewRow::default(),
                "no model, no multivariate score"
            );
            if out.uni.event {
                events.push(i);
            }
        }
        assert!(events.contains(&400), "{events:?}");
        assert_eq!(
            events.iter().filter(|&&i| i >= 400).count(),
            1,
            "{events:?}"
        );
    }

    #[test]
    fn missing_readings_keep_the_column_state_and_wrong_widths_are_refused() {
        let mut r = DeviceReplay::new(&names(2), &cfg()).unwrap();
        r.step(&row(0, &[1.0, 2.0])).unwrap();
        assert!(r.aligned().is_some());
        let out = r.step(&row(1000, &[f64::NAN, 2.5])).unwrap();
        assert_eq!(out.column_alarms[0], 0.0);
        // The slot still holds the reading of 1 s ago, fresh under the default staleness: the
        // round completes when the sensor that did report reports again.
        assert!(!out.aligned);
        let out = r.step(&row(2000, &[f64::NAN, 2.6])).unwrap();
        assert!(out.aligned);
        let e = r.step(&row(2000, &[1.0])).unwrap_err();
        assert!(e.to_string().contains("1 values for 2 sensors"), "{e}");
    }

    #[test]
    fn the_model_scores_aligned_rows_and_a_foreign_model_is_refused() {
        let f = names(3);
        let mut r = DeviceReplay::new(&f, &cfg()).unwrap();
        let mut train = Vec::new();
        let mut x = 7u64;
        let mut noise = || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((x >> 33) as f64 / (1u64 << 31) as f64 - 0.5) * 0.1
        };
        let mut vec_at = |i: i64, broken: bool| {
            let load = (i as f64 / 50.0).sin();
            let c = if broken { -load } else { load };
            [load + noise(), 2.0 * load + noise(), c + noise()]
        };
        for i in 0..2000i64 {
            r.step(&row(i * 1000, &vec_at(i, false))).unwrap();
            train.extend_from_slice(r.aligned().unwrap());
        }
        let model = PcaModel::fit(
            "dev",
            f.clone(),
            &train,
            0,
            1_999_000,
            &FitOptions::default(),
        )
        .unwrap();
        let mut other = model.clone();
        other.features = names(2).into_iter().chain(["x".to_string()]).collect();
        assert!(r.set_model(other).is_err());
        r.set_model(model).unwrap();
        let (mut high, mut n) = (0, 0);
        for i in 2000..2400i64 {
            let broken = i >= 2200;
            let out = r.step(&row(i * 1000, &vec_at(i, broken))).unwrap();
            if broken && (i as f64 / 50.0).sin().abs() > 0.3 {
                n += 1;
                high += usize::from(out.multi.state >= 0.5);
                assert_eq!(out.top.map(|t| t == 2 || out.multi.state < 0.5), Some(true));
            } else if !broken {
                assert!(out.multi.state < 0.5, "row {i}: {}", out.multi.state);
            }
        }
        assert!(
            high * 10 >= n * 9,
            "{high} of {n} broken rows scored >= 0.5"
        );
    }
}
