//! Fleet peer groups: device profiles (e.g. each metric's mean over the last hours) standardised and
//! clustered with linfa's k-means; a device is scored by its distance to its nearest group's centroid
//! relative to that group's spread, so a device drifting away from identical peers stands out.

use super::standard::{check_names, check_values, finite_rows, median, Standardiser, Z_CLAMP};
use super::LINFA_VERSION;
use crate::ModelError;
use linfa::traits::Fit;
use linfa::DatasetBase;
use linfa_clustering::KMeans;
use ndarray::Array2;
use rand::rngs::SmallRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

/// Choice of k: the smallest k whose within-cluster sum of squares (WSS) is at most this share of
/// k = 1's. Real groups pass it easily (three separated groups: WSS(3) ≈ noise); a featureless cloud
/// does not (a Gaussian cloud in d dimensions keeps ≈ 1 − 0.64·(k−1)/d of its WSS), so noise is not
/// split into groups. If no k passes, the fleet is one group.
const WSS_FRACTION: f64 = 0.2;
/// Past the first k that passes, one more group is taken while it at least halves the WSS again
/// (four equally spaced groups pass the 20 % test at k = 3 already; k = 4 then removes the rest).
const SPLIT_GAIN: f64 = 0.5;
/// A k is only accepted if every group has at least this many devices, so one odd device cannot
/// become its own peer group (and so never look odd).
const MIN_MEMBERS: usize = 3;
/// Floor of a group's spread, in standardised units per √features: 5 % of the fleet-wide scale of a
/// feature. Without it a group of identical devices (spread 0) would alarm on rounding noise.
const SPREAD_FLOOR: f64 = 0.05;
/// k-means restarts per k (linfa keeps the lowest inertia).
const KMEANS_RUNS: usize = 5;
/// Consistency constant of the median absolute value for a Gaussian scale.
const MAD_SCALE: f64 = 1.4826;

/// How a [`PeerModel`] is fitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerOptions {
    /// Largest number of peer groups tried, ≥ 1.
    #[serde(default = "default_max_clusters")]
    pub max_clusters: usize,
    /// Distance / spread ratio scoring 0.5 (finite, > 0).
    #[serde(default = "default_limit")]
    pub limit: f64,
    /// Seed of k-means' initialisation (same data and seed, same model).
    #[serde(default)]
    pub seed: u64,
}

fn default_max_clusters() -> usize {
    4
}
fn default_limit() -> f64 {
    3.0
}

impl Default for PeerOptions {
    fn default() -> Self {
        Self {
            max_clusters: default_max_clusters(),
            limit: default_limit(),
            seed: 0,
        }
    }
}

/// Fleet peer groups: a serde-serialisable artifact. See [`PeerModel::score`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PeerModel {
    /// Version, 1 from [`PeerModel::fit`]; the trainer that publishes the model sets it.
    pub version: u64,
    /// Profile feature names, in order.
    pub features: Vec<String>,
    /// Per-feature fleet mean.
    pub means: Vec<f64>,
    /// Per-feature fleet standard deviation (1 for a constant feature).
    pub scales: Vec<f64>,
    /// Group centroids in standardised units (k rows of n).
    pub centroids: Vec<Vec<f64>>,
    /// Per group: robust scale of its members' distances to the centroid (1.4826 · median), floored.
    pub spreads: Vec<f64>,
    /// Per group: number of training devices.
    pub sizes: Vec<u64>,
    /// Distance / spread ratio scoring 0.5.
    pub limit: f64,
    /// Event time of the end of the profiles' period (ms).
    pub trained_to_ms: i64,
    /// linfa version the model was fitted with.
    pub linfa_version: String,
}

/// Where a device stands relative to its peers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeerScore {
    /// Index of the nearest group.
    pub cluster: usize,
    /// Distance to that group's centroid (standardised units).
    pub distance: f64,
    /// distance / the group's spread.
    pub ratio: f64,
    /// ratio⁴ / (ratio⁴ + limit⁴): in [0, 1], monotone, 0.5 at ratio = limit.
    pub score: f64,
}

impl PeerModel {
    /// Fits peer groups to `profiles` (row-major, n_devices × features.len()). Rows holding a NaN or
    /// infinite value are skipped; at least 2 devices must remain.
    pub fn fit(
        features: Vec<String>,
        profiles: &[f64],
        to_ms: i64,
        opts: &PeerOptions,
    ) -> Result<Self, ModelError> {
        if opts.max_clusters == 0 {
            return Err(ModelError::invalid("max_clusters", "must be >= 1, got 0"));
        }
        if !(opts.limit.is_finite() && opts.limit > 0.0) {
            return Err(ModelError::invalid(
                "limit",
                format!("must be finite and > 0, got {}", opts.limit),
            ));
        }
        check_names(&features)?;
        let n = features.len();
        let (data, skipped) = finite_rows(profiles, n)?;
        let rows = data.len() / n;
        if rows < 2 {
            return Err(ModelError::data(format!(
                "peer groups need at least 2 device profiles without NaN/inf, got {rows} ({skipped} skipped)"
            )));
        }
        let st = Standardiser::fit(&data, n, &features)?;
        let z = st.apply(&data);
        let mut centroids = vec![vec![0.0; n]];
        let wss1: f64 = z.iter().map(|v| v * v).sum();
        if wss1 > 1e-12 * rows as f64 {
            let x = Array2::from_shape_vec((rows, n), z.clone())
                .map_err(|e| ModelError::data(format!("profile matrix: {e}")))?;
            let ds = DatasetBase::from(x);
            let mut chosen_wss: Option<f64> = None;
            for k in 2..=opts.max_clusters.min(rows / MIN_MEMBERS) {
                let rng = SmallRng::seed_from_u64(opts.seed);
                let model = KMeans::params_with_rng(k, rng)
                    .n_runs(KMEANS_RUNS)
                    .fit(&ds)
                    .map_err(|e| ModelError::data(format!("linfa k-means, k = {k}: {e}")))?;
                let c: Vec<Vec<f64>> = model
                    .centroids()
                    .rows()
                    .into_iter()
                    .map(|r| r.to_vec())
                    .collect();
                let (sizes, wss) = assignment(&z, n, &c);
                let big_enough = sizes.iter().all(|&s| s >= MIN_MEMBERS as u64);
                let enough_gain = match chosen_wss {
                    None => wss <= WSS_FRACTION * wss1,
                    Some(prev) => wss <= SPLIT_GAIN * prev,
                };
                if big_enough && enough_gain {
                    centroids = c;
                    chosen_wss = Some(wss);
                } else if chosen_wss.is_some() {
                    break;
                }
            }
        }
        let k = centroids.len();
        let mut dists = vec![Vec::new(); k];
        for row in z.chunks_exact(n) {
            let (c, d2) = nearest(&centroids, row);
            dists[c].push(d2.sqrt());
        }
        let floor = SPREAD_FLOOR * (n as f64).sqrt();
        let spreads = dists
            .iter_mut()
            .map(|d| (MAD_SCALE * median(d)).max(floor))
            .collect();
        Ok(PeerModel {
            version: 1,
            features,
            means: st.means,
            scales: st.scales,
            centroids,
            spreads,
            sizes: dists.iter().map(|d| d.len() as u64).collect(),
            limit: opts.limit,
            trained_to_ms: to_ms,
            linfa_version: LINFA_VERSION.into(),
        })
    }

    /// Scores one device profile (laid out as `features`). NaN/infinite values — and values missing
    /// from a short profile — are left out of every distance; with none left the score is 0.
    /// Allocates nothing.
    pub fn score(&self, profile: &[f64]) -> PeerScore {
        let n = self.features.len();
        let mut best = (0, f64::INFINITY);
        let mut any = false;
        for (c, centroid) in self.centroids.iter().enumerate() {
            let mut d2 = 0.0;
            let columns = centroid.iter().zip(&self.means).zip(&self.scales).take(n);
            for (j, ((c, mean), scale)) in columns.enumerate() {
                let z = (profile.get(j).copied().unwrap_or(f64::NAN) - mean) / scale;
                if z.is_finite() {
                    any = true;
                    let d = z.clamp(-Z_CLAMP, Z_CLAMP) - c;
                    d2 += d * d;
                }
            }
            if d2 < best.1 {
                best = (c, d2);
            }
        }
        if !any || self.centroids.is_empty() {
            return PeerScore {
                cluster: 0,
                distance: 0.0,
                ratio: 0.0,
                score: 0.0,
            };
        }
        let distance = best.1.sqrt();
        // A spread missing from an unvalidated artifact counts as 1 rather than panicking.
        let ratio = distance / self.spreads.get(best.0).copied().unwrap_or(1.0);
        let score = 1.0 / (1.0 + (self.limit / ratio).powi(4));
        PeerScore {
            cluster: best.0,
            distance,
            ratio,
            // NaN only from a broken artifact (0/0 spread, NaN limit): no evidence, no alarm.
            score: if score.is_nan() { 0.0 } else { score },
        }
    }

    /// Checks the artifact: shapes agree, numbers finite, scales, spreads and limit > 0.
    pub fn validate(&self) -> Result<(), ModelError> {
        check_names(&self.features).map_err(|e| ModelError::model("features", e.to_string()))?;
        let n = self.features.len();
        check_values("means", &self.means, n, false, &self.features)?;
        check_values("scales", &self.scales, n, true, &self.features)?;
        let k = self.centroids.len();
        if k == 0 {
            return Err(ModelError::model(
                "centroids",
                "need at least 1 centroid, got 0",
            ));
        }
        for (c, centroid) in self.centroids.iter().enumerate() {
            if centroid.len() != n || centroid.iter().any(|v| !v.is_finite()) {
                return Err(ModelError::model(
                    "centroids",
                    format!("centroid {c}: need {n} finite values, got {centroid:?}"),
                ));
            }
        }
        if self.spreads.len() != k || self.spreads.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(ModelError::model(
                "spreads",
                format!("need {k} finite values > 0, got {:?}", self.spreads),
            ));
        }
        if self.sizes.len() != k {
            return Err(ModelError::model(
                "sizes",
                format!("need {k} values, got {}", self.sizes.len()),
            ));
        }
        if !(self.limit.is_finite() && self.limit > 0.0) {
            return Err(ModelError::model(
                "limit",
                format!("must be finite and > 0, got {}", self.limit),
            ));
        }
        Ok(())
    }
}

/// Index and squared distance of the centroid nearest to `z`.
fn nearest(centroids: &[Vec<f64>], z: &[f64]) -> (usize, f64) {
    let mut best = (0, f64::INFINITY);
    for (c, centroid) in centroids.iter().enumerate() {
        let d2: f64 = centroid.iter().zip(z).map(|(a, b)| (a - b) * (a - b)).sum();
        if d2 < best.1 {
            best = (c, d2);
        }
    }
    best
}

/// Group sizes and within-cluster sum of squares of the rows of `z` assigned to their nearest centroid.
fn assignment(z: &[f64], n: usize, centroids: &[Vec<f64>]) -> (Vec<u64>, f64) {
    let mut sizes = vec![0u64; centroids.len()];
    let mut wss = 0.0;
    for row in z.chunks_exact(n) {
        let (c, d2) = nearest(centroids, row);
        sizes[c] += 1;
        wss += d2;
    }
    (sizes, wss)
}

#[cfg(test)]
#[path = "peers_tests.rs"]
mod tests;
