//! One device's multivariate state on the agent, without I/O: its model (if one runs), its training
//! sampler (if it is sampled) and the aligner they share when their features agree, so a reading
//! is pushed once for both. The model keeps an aligner of its own only when its features differ
//! from the sampled ones (a model over a subset of the metrics, a metric beyond the sampler's
//! limit, or a device whose metrics are still appearing); each side's aligner is kept when the
//! other side changes. What a model or a sampler does with a vector is not decided here.

use super::table::Slots;
use edgewatch_models::detect::{EventGate, GateQuestion};
use edgewatch_models::multi::{
    AlignConfig, Aligner, BoundScorer, DeviceSampler, PcaModel, SamplerConfig,
};
use edgewatch_models::wire::TrainingSample;
use edgewatch_models::ModelError;

/// The model running for a device and its scoring state. The model itself is boxed: only an
/// event and a swap read it, so the scorer, the gate and the aligners a reading touches stay
/// together in the device's entry.
pub(super) struct Running {
    pub(super) model: Box<PcaModel>,
    pub(super) scorer: BoundScorer,
    pub(super) gate: EventGate,
    /// The model's own aligner, when its features are not the shared aligner's.
    own: Option<Aligner>,
}

/// A scorer for `model` ready for the questions of `gate` (its cut-offs found at the swap, not
/// at the first vectors).
fn scorer_for(model: &PcaModel, gate: &EventGate) -> BoundScorer {
    let mut scorer = model.bound_scorer();
    scorer.prepare([gate.threshold(), gate.rearm_level()]);
    scorer
}

/// The score and top feature of a vector that starts an episode (rare: out of line).
#[cold]
#[inline(never)]
fn onset_of(scorer: &mut BoundScorer, vector: &[f64]) -> (f64, usize) {
    let s = scorer.score_deferred(vector);
    (s.score, scorer.top_of_last(&s))
}

/// A sampled device's training sampler.
pub(super) struct Sampled {
    pub(super) partition: u32,
    pub(super) sampler: DeviceSampler,
}

/// What a reading released: a vector of the shared aligner (for the sampler), and one for the model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Released {
    pub(super) shared: bool,
    pub(super) model: bool,
}

/// A model's verdict on one vector: [`Device::score`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Scored {
    /// The vector starts an episode: the model's score and the index of the feature that
    /// contributed most.
    pub(super) onset: Option<(f64, usize)>,
    /// The event gate is armed after it (no episode in progress).
    pub(super) armed: bool,
}

/// One device's model, sampler and aligners.
///
/// Invariants: without a sampler the device has a model and the shared aligner is the model's
/// (features equal); with a sampler the shared aligner's features are the sampler's; a model
/// without an aligner of its own has the shared aligner's features.
pub(super) struct Device {
    shared: Aligner,
    pub(super) model: Option<Running>,
    pub(super) sampled: Option<Sampled>,
}

impl Device {
    /// A sampled device without a model, over `features`.
    pub(super) fn sampled(
        device: &str,
        partition: u32,
        features: Vec<String>,
        align: &AlignConfig,
        cfg: &SamplerConfig,
    ) -> Result<Self, ModelError> {
        Ok(Self {
            shared: Aligner::new(&features, align)?,
            model: None,
            sampled: Some(Sampled {
                partition,
                sampler: DeviceSampler::new(device, features, cfg),
            }),
        })
    }

    /// A device with `model` (valid) and no sampler: a fresh aligner over the model's features.
    pub(super) fn modelled(
        model: PcaModel,
        gate: EventGate,
        align: &AlignConfig,
    ) -> Result<Self, ModelError> {
        Ok(Self {
            shared: Aligner::new(&model.features, align)?,
            model: Some(Running {
                scorer: scorer_for(&model, &gate),
                model: Box::new(model),
                gate,
                own: None,
            }),
            sampled: None,
        })
    }

    /// The metric's slots: in the shared aligner, and in the model's own one; and whether the
    /// shared aligner feeds the sampler.
    pub(super) fn slots(&self, metric: &str) -> Slots {
        let own = self.model.as_ref().and_then(|r| r.own.as_ref());
        Slots::new(self.shared.slot(metric), own.and_then(|a| a.slot(metric)))
            .sampled_if(self.sampled.is_some())
    }

    /// The sampled features (empty when the device is not sampled).
    pub(super) fn sampled_features(&self) -> &[String] {
        match &self.sampled {
            Some(s) => s.sampler.features(),
            None => &[],
        }
    }

    /// Swaps in `model` (valid), keeping the gate of a running one (an episode in progress
    /// raises no second event). Its aligner: the shared one when the features agree (kept, as
    /// for a swap with the same features); else the model's own, kept if it already has these
    /// features and fresh otherwise. An error (a feature set the aligner refuses) changes nothing.
    pub(super) fn set_model(
        &mut self,
        model: PcaModel,
        gate: &EventGate,
        align: &AlignConfig,
    ) -> Result<(), ModelError> {
        let own_kept = self
            .model
            .as_ref()
            .and_then(|r| r.own.as_ref())
            .is_some_and(|a| a.features() == model.features.as_slice());
        let shares = self.shared.features() == model.features.as_slice();
        // Built before anything changes.
        let fresh = if shares || own_kept {
            None
        } else {
            Some(Aligner::new(&model.features, align)?)
        };
        let gate = self
            .model
            .as_ref()
            .map_or_else(|| gate.clone(), |r| r.gate.clone());
        let mut own = self.model.take().and_then(|r| r.own);
        if shares {
            own = None;
        } else if let Some(fresh) = fresh {
            if self.sampled.is_none() {
                // The shared aligner is the model's own: replaced.
                self.shared = fresh;
                own = None;
            } else {
                own = Some(fresh);
            }
        }
        self.model = Some(Running {
            scorer: scorer_for(&model, &gate),
            model: Box::new(model),
            gate,
            own,
        });
        Ok(())
    }

    /// Samples the device over `features` (sorted, other than the sampled ones), with a new
    /// sampler (a period in progress is dropped, as when a metric appears). The shared aligner
    /// becomes one over `features`: the model's own if it has them, else fresh; a model that
    /// shared the old one keeps it as its own.
    pub(super) fn resample(
        &mut self,
        device: &str,
        partition: u32,
        features: Vec<String>,
        align: &AlignConfig,
        cfg: &SamplerConfig,
    ) -> Result<(), ModelError> {
        if self.shared.features() != features.as_slice() {
            let fresh = Aligner::new(&features, align)?;
            let own = self
                .model
                .as_mut()
                .and_then(|r| r.own.take_if(|a| a.features() == features.as_slice()));
            let old = std::mem::replace(&mut self.shared, own.unwrap_or(fresh));
            if let Some(r) = &mut self.model {
                if r.own.is_none() && r.model.features != features {
                    // It shared the old one.
                    r.own = Some(old);
                }
            }
        }
        let partition = self.sampled.as_ref().map_or(partition, |s| s.partition);
        self.sampled = Some(Sampled {
            partition,
            sampler: DeviceSampler::new(device, features, cfg),
        });
        Ok(())
    }

    /// Pushes a reading into the aligners holding its metric (each at most once).
    #[inline]
    pub(super) fn push(&mut self, slots: Slots, ts_ms: i64, value: f64) -> Released {
        let shared = slots
            .first()
            .is_some_and(|s| self.shared.push(s, ts_ms, value));
        let model = match &mut self.model {
            None => false,
            Some(Running { own: None, .. }) => shared,
            Some(Running { own: Some(a), .. }) => {
                slots.second().is_some_and(|s| a.push(s, ts_ms, value))
            }
        };
        Released { shared, model }
    }

    /// Feeds the model's vector to its event gate (`None` without a model). The model answers
    /// the gate's question (the score reaching its threshold, or falling below its re-arm level)
    /// from T² and SPE alone; the score and top feature are worked out only for a vector that
    /// starts an episode, the one that reports them.
    #[inline]
    pub(super) fn score(&mut self) -> Option<Scored> {
        let r = self.model.as_mut()?;
        let vector = match &r.own {
            None => self.shared.vector(),
            Some(a) => a.vector(),
        };
        let yes = match r.gate.question() {
            GateQuestion::Reaches(level) => r.scorer.reaches(vector, level),
            GateQuestion::Below(level) => !r.scorer.reaches(vector, level),
            GateQuestion::None => false,
        };
        let onset = r.gate.answer(yes).then(|| onset_of(&mut r.scorer, vector));
        Some(Scored {
            onset,
            armed: r.gate.armed(),
        })
    }

    /// Offers the shared aligner's vector to the sampler (a device of one metric has nothing to
    /// align and offers nothing); returns `(partition, sample)` when it closes a period.
    #[inline]
    pub(super) fn offer_sample(&mut self, ts_ms: i64) -> Option<(u32, TrainingSample)> {
        let s = self.sampled.as_mut()?;
        if self.shared.features().len() < 2 {
            return None;
        }
        let sample = s.sampler.offer(ts_ms, self.shared.vector())?;
        Some((s.partition, sample))
    }

    /// The aligner the model scores (`None` without a model).
    pub(super) fn model_aligner(&self) -> Option<&Aligner> {
        match &self.model {
            None => None,
            Some(Running { own: None, .. }) => Some(&self.shared),
            Some(Running { own: Some(a), .. }) => Some(a),
        }
    }

    /// The model's vector (empty without a model).
    pub(super) fn model_vector(&self) -> &[f64] {
        self.model_aligner().map_or(&[], Aligner::vector)
    }

    /// Whether the model scores the shared aligner (the sampler's, if sampled).
    #[cfg(test)]
    pub(super) fn shares(&self) -> bool {
        self.model.as_ref().is_some_and(|r| r.own.is_none())
    }
}
