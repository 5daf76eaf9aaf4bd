//! The multivariate device model: per-feature standardisation and a PCA subspace fitted with
//! linfa's `Pca`; a vector is scored by Hotelling's T² inside the subspace and the squared
//! prediction error (SPE, Q) outside it, against limits learned from the training data.

use super::axes::principal_axes;
use super::limit::{Limit, WilsonHilferty};
use super::standard::{check_names, check_values, finite_rows, quantile, Standardiser, Z_CLAMP};
use super::LINFA_VERSION;
use crate::detect::{neg_log10_tail, surprise_score};
use crate::ModelError;
use serde::{Deserialize, Serialize};

/// How a [`PcaModel`] is fitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FitOptions {
    /// Fraction of the standardised variance the kept components must explain, in (0, 1].
    #[serde(default = "default_variance")]
    pub variance: f64,
    /// Most components kept (≥ 1); also at most features − 1, so SPE always sees something.
    #[serde(default = "default_max_components")]
    pub max_components: usize,
}

fn default_variance() -> f64 {
    0.9
}
fn default_max_components() -> usize {
    8
}

impl Default for FitOptions {
    fn default() -> Self {
        Self {
            variance: default_variance(),
            max_components: default_max_components(),
        }
    }
}

/// How well a [`PcaModel`] fits its training data (shown to operators with the model).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct FitQuality {
    /// Share of the standardised variance the kept components explain.
    pub explained_variance_ratio: f64,
    /// Median of the training vectors' scores.
    pub median_score: f64,
    /// 99th percentile of the training vectors' scores.
    pub p99_score: f64,
    /// Share of the training vectors scoring ≥ 0.5 (the false-alarm rate if training was normal).
    pub alarm_rate: f64,
    /// Training rows left out because a value was NaN or infinite.
    pub skipped_rows: u64,
    /// Features constant over the training rows: scale 1, and any change from the training value
    /// shows in SPE.
    pub constant_features: Vec<String>,
    /// Which linfa routine gave the principal axes: `linfa-reduction pca`, or `linfa-linalg eigh`
    /// when Pca's LOBPCG did not reach eigenvectors (few features, k close to n).
    pub solver: String,
}

/// A fitted multivariate model: a versioned, serde-serialisable artifact. Score with [`PcaModel::scorer`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PcaModel {
    /// Always `"pca"`.
    pub kind: String,
    /// Version, 1 from [`PcaModel::fit`]; the trainer that publishes the model sets it.
    pub version: u64,
    /// The device or device class the model is for.
    pub key: String,
    /// Feature (metric) names, in vector order.
    pub features: Vec<String>,
    /// Per-feature training mean.
    pub means: Vec<f64>,
    /// Per-feature training standard deviation (1 for a constant feature).
    pub scales: Vec<f64>,
    /// k rows of n loadings, orthonormal, in decreasing order of eigenvalue.
    pub components: Vec<Vec<f64>>,
    /// The k eigenvalues (variance of the standardised data along each component).
    pub eigenvalues: Vec<f64>,
    /// Limit of Hotelling's T².
    pub t2: Limit,
    /// Limit of the squared prediction error.
    pub spe: Limit,
    /// Event time of the first training reading (ms).
    pub trained_from_ms: i64,
    /// Event time of the last training reading (ms).
    pub trained_to_ms: i64,
    /// Training vectors used (rows with a NaN excluded).
    pub samples: u64,
    /// Fit quality.
    pub quality: FitQuality,
    /// linfa version the model was fitted with.
    pub linfa_version: String,
}

/// The score of one vector.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MultiScore {
    /// Anomaly score in [0, 1]: 0.5 ⇔ the more surprising statistic has p = 1e-5 (after Bonferroni).
    pub score: f64,
    /// Hotelling's T² (inside the subspace).
    pub t2: f64,
    /// Squared prediction error (outside the subspace).
    pub spe: f64,
    /// Index of the feature contributing most to the statistic that decided the score.
    pub top: usize,
}

/// Scratch space for scoring vectors against a [`PcaModel`]; scoring allocates nothing.
#[derive(Debug, Clone, Default)]
pub struct PcaScorer {
    z: Vec<f64>,
    /// Residual z − P Pᵀ z; then the per-feature contributions for `top`.
    r: Vec<f64>,
    present: Vec<bool>,
    t: Vec<f64>,
    /// Bits of (t2.g, t2.h, spe.g, spe.h) the cached Wilson–Hilferty constants belong to.
    key: [u64; 4],
    wh_t2: WilsonHilferty,
    wh_spe: WilsonHilferty,
}

impl FitOptions {
    fn validate(&self) -> Result<(), ModelError> {
        if !(self.variance > 0.0 && self.variance <= 1.0) {
            return Err(ModelError::invalid(
                "variance",
                format!("must be in (0, 1], got {}", self.variance),
            ));
        }
        if self.max_components == 0 {
            return Err(ModelError::invalid("max_components", "must be >= 1, got 0"));
        }
        Ok(())
    }
}

impl PcaModel {
    /// Fits a model for `key` on `rows` (row-major, n_rows × features.len()). Rows holding a NaN or
    /// infinite value are skipped and counted in `quality.skipped_rows`; at least 2 must remain.
    pub fn fit(
        key: &str,
        features: Vec<String>,
        rows: &[f64],
        from_ms: i64,
        to_ms: i64,
        opts: &FitOptions,
    ) -> Result<Self, ModelError> {
        opts.validate()?;
        check_names(&features)?;
        if from_ms > to_ms {
            return Err(ModelError::data(format!(
                "training period ends ({to_ms}) before it starts ({from_ms})"
            )));
        }
        let n = features.len();
        let (data, skipped) = finite_rows(rows, n)?;
        let n_rows = data.len() / n;
        if n_rows < 2 {
            return Err(ModelError::data(format!(
                "need at least 2 rows without NaN/inf, got {n_rows} ({skipped} skipped)"
            )));
        }
        let st = Standardiser::fit(&data, n, &features)?;
        let varying = n - st.constant.len();
        if varying == 0 {
            return Err(ModelError::data(format!(
                "no feature varies over the {n_rows} training rows"
            )));
        }
        let z = st.apply(&data);
        let total: f64 = (0..n)
            .map(|j| z.iter().skip(j).step_by(n).map(|v| v * v).sum::<f64>())
            .sum::<f64>()
            / (n_rows - 1) as f64;
        let k_max = opts
            .max_components
            .min((n - 1).max(1))
            .min(n_rows - 1)
            .min(varying);
        let (axes, solver) = principal_axes(&z, n, n_rows, k_max, total)?;
        // The smallest k reaching the variance target (the 1e-9 absorbs rounding when it is 1.0).
        let mut k = 0;
        let mut explained = 0.0;
        while k < axes.len() {
            explained += axes[k].0 / total;
            k += 1;
            if explained >= opts.variance - 1e-9 {
                break;
            }
        }
        let (eigenvalues, components) = axes.into_iter().take(k).unzip();
        let constant_features = st.constant.iter().map(|&j| features[j].clone()).collect();
        let placeholder = Limit {
            g: 1.0,
            h: 1.0,
            value_at_half: 1.0,
        };
        let mut model = PcaModel {
            kind: "pca".into(),
            version: 1,
            key: key.into(),
            features,
            means: st.means,
            scales: st.scales,
            components,
            eigenvalues,
            t2: placeholder,
            spe: placeholder,
            trained_from_ms: from_ms,
            trained_to_ms: to_ms,
            samples: n_rows as u64,
            quality: FitQuality {
                explained_variance_ratio: explained.min(1.0),
                median_score: 0.0,
                p99_score: 0.0,
                alarm_rate: 0.0,
                skipped_rows: skipped,
                constant_features,
                solver: solver.into(),
            },
            linfa_version: LINFA_VERSION.into(),
        };
        let mut scorer = model.scorer();
        let (mut t2s, mut spes) = (Vec::with_capacity(n_rows), Vec::with_capacity(n_rows));
        for row in data.chunks_exact(n) {
            let (t2, spe) = scorer.statistics(&model, row);
            t2s.push(t2);
            spes.push(spe);
        }
        model.t2 = Limit::fit(&mut t2s.clone());
        model.spe = Limit::fit(&mut spes.clone());
        scorer.refresh(&model);
        let mut scores: Vec<f64> = t2s
            .iter()
            .zip(&spes)
            .map(|(&t2, &spe)| scorer.combine(t2, spe).0)
            .collect();
        model.quality.alarm_rate =
            scores.iter().filter(|&&s| s >= 0.5).count() as f64 / n_rows as f64;
        model.quality.median_score = quantile(&mut scores, 0.5);
        model.quality.p99_score = quantile(&mut scores, 0.99);
        Ok(model)
    }

    /// Checks the artifact (e.g. one received over the network): shapes agree, every number is
    /// finite, scales and eigenvalues > 0, components orthonormal, limits sane. The error names the field.
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.kind != "pca" {
            return Err(ModelError::model(
                "kind",
                format!("expected \"pca\", got {:?}", self.kind),
            ));
        }
        check_names(&self.features).map_err(|e| ModelError::model("features", e.to_string()))?;
        let n = self.features.len();
        check_values("means", &self.means, n, false, &self.features)?;
        check_values("scales", &self.scales, n, true, &self.features)?;
        let k = self.components.len();
        if k == 0 || k > n {
            return Err(ModelError::model(
                "components",
                format!("need 1..={n} components, got {k}"),
            ));
        }
        if self.eigenvalues.len() != k {
            return Err(ModelError::model(
                "eigenvalues",
                format!("{} eigenvalues for {k} components", self.eigenvalues.len()),
            ));
        }
        for (a, (c, &l)) in self.components.iter().zip(&self.eigenvalues).enumerate() {
            if !l.is_finite() || l <= 0.0 {
                return Err(ModelError::model(
                    "eigenvalues",
                    format!("eigenvalue {a} must be finite and > 0, got {l}"),
                ));
            }
            if c.len() != n || c.iter().any(|v| !v.is_finite()) {
                return Err(ModelError::model(
                    "components",
                    format!("component {a}: need {n} finite loadings, got {c:?}"),
                ));
            }
            for (b, other) in self.components[..=a].iter().enumerate() {
                let d: f64 = c.iter().zip(other).map(|(x, y)| x * y).sum();
                let want = if a == b { 1.0 } else { 0.0 };
                if (d - want).abs() > 1e-6 {
                    return Err(ModelError::model(
                        "components",
                        format!("components {a} and {b}: dot product {d}, expected {want}"),
                    ));
                }
            }
        }
        self.t2.validate("t2")?;
        self.spe.validate("spe")?;
        if self.trained_from_ms > self.trained_to_ms {
            return Err(ModelError::model(
                "trained_from_ms",
                format!(
                    "{} is after trained_to_ms {}",
                    self.trained_from_ms, self.trained_to_ms
                ),
            ));
        }
        if self.samples < 2 {
            return Err(ModelError::model(
                "samples",
                format!("need >= 2, got {}", self.samples),
            ));
        }
        Ok(())
    }

    /// Checks that vectors laid out as `features` (names, in order) can be scored by this model.
    pub fn check_compatible(&self, features: &[String]) -> Result<(), ModelError> {
        if features != self.features.as_slice() {
            return Err(ModelError::model(
                "features",
                format!(
                    "model {:?} v{} expects {:?}, the vectors hold {:?}",
                    self.key, self.version, self.features, features
                ),
            ));
        }
        Ok(())
    }

    /// Scratch space sized for this model.
    pub fn scorer(&self) -> PcaScorer {
        let mut s = PcaScorer::default();
        s.refresh(self);
        s
    }
}

impl PcaScorer {
    /// Scores one vector (laid out as `model.features`). NaN/infinite slots — and slots missing
    /// from a short `x` — are imputed by the mean (z = 0) and left out of SPE and of `top`. Allocates
    /// nothing unless `model` has another shape than the last one scored.
    ///
    /// A model that fails [`PcaModel::validate`]'s shape checks (lengths that disagree) scores every
    /// vector 0 instead of panicking: validate artifacts from outside before use.
    pub fn score(&mut self, model: &PcaModel, x: &[f64]) -> MultiScore {
        if !self.refresh(model) {
            return MultiScore::ZERO;
        }
        let (t2, spe) = self.statistics(model, x);
        let (score, spe_decides) = self.combine(t2, spe);
        let components = model.components.iter().map(Vec::as_slice);
        let top = top_feature(
            spe_decides,
            components,
            &model.eigenvalues,
            &self.z,
            &self.present,
            &self.t,
            &mut self.r,
        );
        MultiScore {
            score,
            t2,
            spe,
            top,
        }
    }

    /// Resizes the scratch space and recomputes the cached limit constants if `model` changed.
    /// Returns whether the model's shapes agree (else nothing may be indexed).
    fn refresh(&mut self, model: &PcaModel) -> bool {
        let n = model.features.len();
        let shapes_agree = shapes_agree(model);
        if self.z.len() != n {
            self.z = vec![0.0; n];
            self.r = vec![0.0; n];
            self.present = vec![false; n];
        }
        if self.t.len() != model.components.len() {
            self.t = vec![0.0; model.components.len()];
        }
        let key = [model.t2.g, model.t2.h, model.spe.g, model.spe.h].map(f64::to_bits);
        if key != self.key || self.wh_t2 == WilsonHilferty::default() {
            self.key = key;
            self.wh_t2 = model.t2.wilson_hilferty();
            self.wh_spe = model.spe.wilson_hilferty();
        }
        shapes_agree
    }

    /// T² and SPE of `x`; fills z, present, t and the residual r.
    fn statistics(&mut self, model: &PcaModel, x: &[f64]) -> (f64, f64) {
        let m = ModelNumbers {
            means: &model.means,
            scales: &model.scales,
            components: model.components.iter().map(Vec::as_slice),
            eigenvalues: &model.eigenvalues,
        };
        statistics(
            &m,
            x,
            &mut self.z,
            &mut self.present,
            &mut self.t,
            &mut self.r,
        )
    }

    /// Combined score of (T², SPE), and whether SPE is the more surprising of the two.
    fn combine(&self, t2: f64, spe: f64) -> (f64, bool) {
        combine(&self.wh_t2, &self.wh_spe, t2, spe)
    }

    /// [`PcaScorer::combine`] without the quiet early-out: what it must equal bit for bit.
    #[cfg(test)]
    fn combine_full(&self, t2: f64, spe: f64) -> (f64, bool) {
        let zt = self.wh_t2.z(t2);
        let spe_decides = self.wh_spe.reaches(spe, zt);
        (self.full_score(zt, spe, spe_decides), spe_decides)
    }

    /// The score from the tail probability of the deciding statistic (`zt`: T²'s z).
    #[cfg(test)]
    fn full_score(&self, zt: f64, spe: f64, spe_decides: bool) -> f64 {
        full_score(&self.wh_spe, zt, spe, spe_decides)
    }
}

impl MultiScore {
    /// What a model whose shapes disagree gives every vector.
    const ZERO: MultiScore = MultiScore {
        score: 0.0,
        t2: 0.0,
        spe: 0.0,
        top: 0,
    };
}

/// Whether `model`'s array lengths agree with its features and components.
fn shapes_agree(model: &PcaModel) -> bool {
    let n = model.features.len();
    model.means.len() == n
        && model.scales.len() == n
        && model.eigenvalues.len() == model.components.len()
        && model.components.iter().all(|p| p.len() == n)
}

/// A model's numbers as slices: the model's own arrays, or a [`BoundScorer`]'s copy of them.
struct ModelNumbers<'a, C> {
    means: &'a [f64],
    scales: &'a [f64],
    /// The components, each of the features' length.
    components: C,
    eigenvalues: &'a [f64],
}

/// T² and SPE of `x` under `m`; fills z, present, t and the residual r (one code path for both
/// scorers, so they agree bit for bit).
fn statistics<'a, C: Iterator<Item = &'a [f64]> + Clone>(
    m: &ModelNumbers<'a, C>,
    x: &[f64],
    z: &mut [f64],
    present: &mut [bool],
    t: &mut [f64],
    r: &mut [f64],
) -> (f64, f64) {
    let columns = z.iter_mut().zip(present.iter_mut());
    let params = m.means.iter().zip(m.scales);
    for (j, ((z, present), (mean, scale))) in columns.zip(params).enumerate() {
        let v = if j < x.len() { x[j] } else { f64::NAN };
        let zj = (v - mean) / scale;
        *present = zj.is_finite();
        *z = if *present {
            zj.clamp(-Z_CLAMP, Z_CLAMP)
        } else {
            0.0
        };
    }
    let mut t2 = 0.0;
    for ((t, p), l) in t.iter_mut().zip(m.components.clone()).zip(m.eigenvalues) {
        *t = p.iter().zip(&*z).map(|(a, b)| a * b).sum();
        t2 += *t * *t / l;
    }
    // r = z − P Pᵀ z, explicitly (no cancellation as in ||z||² − ||Pᵀ z||²).
    r.copy_from_slice(z);
    for (p, t) in m.components.clone().zip(&*t) {
        r.iter_mut().zip(p).for_each(|(r, pj)| *r -= t * pj);
    }
    let spe = r
        .iter()
        .zip(&*present)
        .map(|(r, &present)| if present { r * r } else { 0.0 })
        .sum();
    (t2, spe)
}

/// The feature contributing most to the deciding statistic (after [`statistics`]; uses r as
/// scratch).
fn top_feature<'a>(
    spe_decides: bool,
    components: impl Iterator<Item = &'a [f64]>,
    eigenvalues: &[f64],
    z: &[f64],
    present: &[bool],
    t: &[f64],
    r: &mut [f64],
) -> usize {
    if !spe_decides {
        // Contribution of feature j to T²: z_j · Σ_a (t_a / λ_a) p_aj (they sum to T²),
        // accumulated in r (the residual is no longer needed).
        r.iter_mut().for_each(|r| *r = 0.0);
        for ((p, t), l) in components.zip(t).zip(eigenvalues) {
            let w = t / l;
            r.iter_mut().zip(p).for_each(|(r, pj)| *r += w * pj);
        }
        r.iter_mut().zip(z).for_each(|(r, z)| *r *= z);
    } else {
        r.iter_mut().for_each(|r| *r *= *r);
    }
    let mut top = 0;
    let mut best = f64::NEG_INFINITY;
    for (j, (&c, &present)) in r.iter().zip(present).enumerate() {
        if present && c > best {
            best = c;
            top = j;
        }
    }
    top
}

/// Combined score of (T², SPE), and whether SPE is the more surprising of the two.
fn combine(wh_t2: &WilsonHilferty, wh_spe: &WilsonHilferty, t2: f64, spe: f64) -> (f64, bool) {
    let (score, spe_decides) = combine_lazily(wh_t2, wh_spe, t2, spe);
    (
        score,
        spe_decides.unwrap_or_else(|| spe_decides_of(wh_t2, wh_spe, t2, spe)),
    )
}

/// [`combine`] leaving out which statistic decides (`None`) when both are far from their limits:
/// the score is then exactly 0 (see `QUIET_Z`) and found without a cube root.
#[inline]
fn combine_lazily(
    wh_t2: &WilsonHilferty,
    wh_spe: &WilsonHilferty,
    t2: f64,
    spe: f64,
) -> (f64, Option<bool>) {
    if wh_t2.is_quiet(t2) && wh_spe.is_quiet(spe) {
        return (0.0, None);
    }
    // One cube root when T² decides, two when SPE does (`reaches` compares without one).
    let zt = wh_t2.z(t2);
    let spe_decides = wh_spe.reaches(spe, zt);
    (full_score(wh_spe, zt, spe, spe_decides), Some(spe_decides))
}

/// Whether SPE is the more surprising of (T², SPE).
fn spe_decides_of(wh_t2: &WilsonHilferty, wh_spe: &WilsonHilferty, t2: f64, spe: f64) -> bool {
    wh_spe.reaches(spe, wh_t2.z(t2))
}

/// The score from the tail probability of the deciding statistic (`zt`: T²'s z).
fn full_score(wh_spe: &WilsonHilferty, zt: f64, spe: f64, spe_decides: bool) -> f64 {
    score_of_z(if spe_decides { wh_spe.z(spe) } else { zt })
}

/// The score of the deciding statistic's z.
#[inline]
fn score_of_z(z: f64) -> f64 {
    surprise_score(neg_log10_tail(z) - std::f64::consts::LOG10_2)
}

/// The smallest value of a statistic whose score, were it deciding, reaches `level` (in (0, 1]):
/// a binary search over the non-negative f64 values (in the order of their bits) through the
/// score's own code, so comparing with it agrees with working the score out. NaN when no value
/// reaches the level.
fn cut_for(wh: &WilsonHilferty, level: f64) -> f64 {
    let reaches = |bits: u64| score_of_z(wh.z(f64::from_bits(bits))) >= level;
    let (mut below, mut at) = (0u64, f64::INFINITY.to_bits());
    if !reaches(at) {
        return f64::NAN;
    }
    if reaches(below) {
        return 0.0;
    }
    // Invariant: `below` does not reach the level, `at` does.
    while at - below > 1 {
        let mid = below + (at - below) / 2;
        if reaches(mid) {
            at = mid;
        } else {
            below = mid;
        }
    }
    f64::from_bits(at)
}

/// A bound scorer's model numbers (`2n + kn + k` values) as means, scales, components (k rows of
/// n) and eigenvalues.
fn model_parts(model: &[f64], n: usize, k: usize) -> [&[f64]; 4] {
    let (means, rest) = model.split_at(n);
    let (scales, rest) = rest.split_at(n);
    let (components, eigenvalues) = rest.split_at(k * n);
    [means, scales, components, eigenvalues]
}

/// Models of up to this many features (and components) are scored on stack scratch space by
/// [`BoundScorer::reaches`].
const STACK_FEATURES: usize = 16;

/// Cut-offs of one score level: the T² and SPE at and above which the score reaches it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Cut {
    /// The level's bits (`u64::MAX`, a NaN: none yet).
    level: u64,
    t2: f64,
    spe: f64,
}

impl Cut {
    const NONE: Cut = Cut {
        level: u64::MAX,
        t2: f64::NAN,
        spe: f64::NAN,
    };
}

/// A scorer bound to one model, for a hot path that scores many vectors against it: the model's
/// numbers are copied once into one buffer beside the scratch space, so a vector touches one
/// allocation rather than one per array and component. Its scores are [`PcaScorer::score`]'s for
/// the same model, bit for bit (one code path). Build it again when the model changes.
#[derive(Debug, Clone)]
pub struct BoundScorer {
    n: usize,
    k: usize,
    /// means (n) | scales (n) | components (k rows of n) | eigenvalues (k) | z (n) | r (n) | t (k).
    data: Box<[f64]>,
    present: Box<[bool]>,
    wh_t2: WilsonHilferty,
    wh_spe: WilsonHilferty,
    /// The model's shapes agreed (else every vector scores 0, as with [`PcaScorer`]).
    valid: bool,
    /// Cut-offs of the last two levels [`BoundScorer::reaches`] was asked for (an event gate
    /// asks for two: its threshold and its re-arm level), and which of them to replace next.
    cuts: [Cut; 2],
    replace: usize,
}

impl PcaModel {
    /// A [`BoundScorer`] for this model.
    pub fn bound_scorer(&self) -> BoundScorer {
        let valid = shapes_agree(self);
        let (n, k) = if valid {
            (self.features.len(), self.components.len())
        } else {
            (0, 0)
        };
        let mut data = Vec::with_capacity(5 * n + k * n + 2 * k);
        if valid {
            data.extend_from_slice(&self.means);
            data.extend_from_slice(&self.scales);
            self.components
                .iter()
                .for_each(|p| data.extend_from_slice(p));
            data.extend_from_slice(&self.eigenvalues);
        }
        data.resize(5 * n + k * n + 2 * k, 0.0);
        BoundScorer {
            n,
            k,
            data: data.into_boxed_slice(),
            present: vec![false; n].into_boxed_slice(),
            wh_t2: self.t2.wilson_hilferty(),
            wh_spe: self.spe.wilson_hilferty(),
            valid,
            cuts: [Cut::NONE; 2],
            replace: 0,
        }
    }
}

/// A score whose top feature is not computed yet: [`BoundScorer::score_deferred`]. The top feature
/// costs a pass over the components that only an event needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeferredScore {
    /// Anomaly score in [0, 1], as [`MultiScore::score`].
    pub score: f64,
    /// Hotelling's T², as [`MultiScore::t2`].
    pub t2: f64,
    /// Squared prediction error, as [`MultiScore::spe`].
    pub spe: f64,
    /// SPE decided the score (which statistic [`BoundScorer::top_of_last`] breaks down); `None`
    /// when the score is a quiet 0, worked out only if the top feature is asked for.
    spe_decides: Option<bool>,
}

impl BoundScorer {
    /// Scores one vector (laid out as the model's features): [`PcaScorer::score`] with the model
    /// this scorer was bound to. Allocates nothing.
    pub fn score(&mut self, x: &[f64]) -> MultiScore {
        let d = self.score_deferred(x);
        MultiScore {
            score: d.score,
            t2: d.t2,
            spe: d.spe,
            top: self.top_of_last(&d),
        }
    }

    /// [`BoundScorer::score`] without the top feature: ask [`BoundScorer::top_of_last`] for it
    /// before the next vector is scored (it is computed from this score's scratch space).
    pub fn score_deferred(&mut self, x: &[f64]) -> DeferredScore {
        if !self.valid {
            return DeferredScore {
                score: 0.0,
                t2: 0.0,
                spe: 0.0,
                spe_decides: Some(false),
            };
        }
        let (t2, spe) = self.statistics(x);
        let (score, spe_decides) = combine_lazily(&self.wh_t2, &self.wh_spe, t2, spe);
        DeferredScore {
            score,
            t2,
            spe,
            spe_decides,
        }
    }

    /// Whether the score of `x` is at or above `level`, as `score(x).score >= level` (up to a
    /// score within rounding of the level itself), without working the score out: T² and SPE are
    /// compared with the smallest values whose score reaches the level, found by a binary search
    /// the first time a level is asked for and kept for the last two levels. What an event gate
    /// asks of most vectors ([`crate::detect::EventGate::question`]): no cube root, no logarithm.
    /// Allocates nothing.
    pub fn reaches(&mut self, x: &[f64], level: f64) -> bool {
        if level.is_nan() || level <= 0.0 {
            // Every score is in [0, 1]; nothing reaches NaN.
            return level <= 0.0;
        }
        if !self.valid {
            return false;
        }
        let cut = self.cut(level);
        let (t2, spe) = self.statistics_on_stack(x);
        t2 >= cut.t2 || spe >= cut.spe
    }

    /// T² and SPE of `x` (a valid model), bit for bit as [`BoundScorer::statistics`] gives them
    /// (every sum in the same order), in two passes over the features with the scratch space on
    /// the stack when the model is small enough: no scratch is written to the model's buffer and
    /// the code stays small, for the vectors whose top feature nobody asks for.
    #[inline]
    fn statistics_on_stack(&mut self, x: &[f64]) -> (f64, f64) {
        let (n, k) = (self.n, self.k);
        if n > STACK_FEATURES || k > STACK_FEATURES {
            return self.statistics(x);
        }
        let [means, scales, components, eigenvalues] =
            model_parts(&self.data[..2 * n + k * n + k], n, k);
        // What `Iterator::sum` starts from, so the sums below are its sums.
        let start: f64 = std::iter::empty::<f64>().sum();
        let mut z = [0.0; STACK_FEATURES];
        let mut t = [start; STACK_FEATURES];
        let mut present = 0u32;
        for j in 0..n {
            let v = if j < x.len() { x[j] } else { f64::NAN };
            let zj = (v - means[j]) / scales[j];
            let zj = if zj.is_finite() {
                present |= 1 << j;
                zj.clamp(-Z_CLAMP, Z_CLAMP)
            } else {
                0.0
            };
            z[j] = zj;
            for (a, t) in t[..k].iter_mut().enumerate() {
                *t += components[a * n + j] * zj;
            }
        }
        let mut t2 = 0.0;
        for (t, l) in t[..k].iter().zip(eigenvalues) {
            t2 += *t * *t / l;
        }
        let mut spe = start;
        for (j, &zj) in z[..n].iter().enumerate() {
            let mut r = zj;
            for (a, t) in t[..k].iter().enumerate() {
                r -= t * components[a * n + j];
            }
            spe += if present & (1 << j) != 0 { r * r } else { 0.0 };
        }
        (t2, spe)
    }

    /// Finds and keeps the cut-offs of up to two levels now (the binary searches take about a
    /// hundred scores each), so the first vectors [`BoundScorer::reaches`] is asked about do not
    /// pay for them: what an event gate will ask, its threshold and its re-arm level.
    pub fn prepare(&mut self, levels: [f64; 2]) {
        for level in levels {
            if level > 0.0 && self.valid {
                self.cut(level);
            }
        }
    }

    /// The cut-offs of `level` (> 0), from the two kept or found now.
    #[inline]
    fn cut(&mut self, level: f64) -> Cut {
        let bits = level.to_bits();
        match self.cuts.iter().find(|c| c.level == bits) {
            Some(c) => *c,
            None => self.find_cut(level),
        }
    }

    /// Finds the cut-offs of `level` and keeps them in place of the older two.
    #[cold]
    #[inline(never)]
    fn find_cut(&mut self, level: f64) -> Cut {
        let bits = level.to_bits();
        let cut = Cut {
            level: bits,
            t2: cut_for(&self.wh_t2, level),
            spe: cut_for(&self.wh_spe, level),
        };
        self.cuts[self.replace] = cut;
        self.replace = 1 - self.replace;
        cut
    }

    /// T² and SPE of `x` (a valid model); fills the scratch space [`BoundScorer::top_of_last`] reads.
    #[inline]
    fn statistics(&mut self, x: &[f64]) -> (f64, f64) {
        let (n, k) = (self.n, self.k);
        let (model, scratch) = self.data.split_at_mut(2 * n + k * n + k);
        let [means, scales, components, eigenvalues] = model_parts(model, n, k);
        let (z, scratch) = scratch.split_at_mut(n);
        let (r, t) = scratch.split_at_mut(n);
        // n > 0 for a valid model (features are never empty once validated; chunks need n ≥ 1).
        let m = ModelNumbers {
            means,
            scales,
            components: components.chunks_exact(n.max(1)),
            eigenvalues,
        };
        statistics(&m, x, z, &mut self.present, t, r)
    }

    /// The top feature of `last`, the score this scorer gave last (any other gives a meaningless
    /// index within the features). Once per score: it reuses the scratch space.
    pub fn top_of_last(&mut self, last: &DeferredScore) -> usize {
        if !self.valid {
            return 0;
        }
        let (n, k) = (self.n, self.k);
        let (model, scratch) = self.data.split_at_mut(2 * n + k * n + k);
        let [_, _, components, eigenvalues] = model_parts(model, n, k);
        let (z, scratch) = scratch.split_at_mut(n);
        let (r, t) = scratch.split_at_mut(n);
        let spe_decides = last
            .spe_decides
            .unwrap_or_else(|| spe_decides_of(&self.wh_t2, &self.wh_spe, last.t2, last.spe));
        top_feature(
            spe_decides,
            components.chunks_exact(n.max(1)),
            eigenvalues,
            z,
            &self.present,
            t,
            r,
        )
    }
}

#[cfg(test)]
#[path = "pca_tests.rs"]
mod tests;
