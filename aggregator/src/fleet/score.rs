//! Scoring one device profile against its class's peer model: the standing it leaves in the
//! profile, the metric furthest from its group, and the `fleet` event at the onset of an episode.

use super::{ClassModel, DeviceProfile, FleetEvent, Standing, DETECTOR};
use edgewatch_models::wire::{event_id, AnomalyEvent, EventPhase};

/// Scores `dev` against `cm`, updates its standing and gate; the event when it leaves its group.
/// `raw` is its profile (laid out as its metrics) at the moment the class `shift` was measured.
pub(super) fn score_device(
    id: &str,
    dev: &mut DeviceProfile,
    raw: &[f64],
    cm: &ClassModel,
    shift: &[f64],
    agent: &str,
) -> Option<FleetEvent> {
    let model = &cm.model;
    if !model.features.iter().eq(dev.metrics.keys()) || raw.len() != model.features.len() {
        return None;
    }
    // In the fit's frame: the class's movement since taken out.
    let profile: Vec<f64> = raw
        .iter()
        .zip(shift.iter().chain(std::iter::repeat(&0.0)))
        .map(|(v, s)| v - s)
        .collect();
    let ps = model.score(&profile);
    // The metric furthest from the nearest group's centroid (standardised units).
    let centroid = model.centroids.get(ps.cluster)?;
    let mut top = (0, f64::NEG_INFINITY);
    for (j, ((x, c), (mean, scale))) in profile
        .iter()
        .zip(centroid)
        .zip(model.means.iter().zip(&model.scales))
        .enumerate()
    {
        let d = ((x - mean) / scale - c).abs();
        if d > top.1 {
            top = (j, d);
        }
    }
    let metric = model.features.get(top.0)?.clone();
    // The metric's own profile value (not shifted).
    let value = raw.get(top.0).copied().unwrap_or(f64::NAN);
    dev.standing = Some(Standing {
        score: ps.score,
        ratio: ps.ratio,
        cluster: ps.cluster,
        metric: metric.clone(),
        value,
        model_version: model.version,
    });
    if !dev.gate.update(ps.score) {
        return None;
    }
    let (window_start_ms, ts_ms) = dev.last_window;
    Some((
        dev.partition,
        AnomalyEvent {
            id: event_id(id, &metric, ts_ms, DETECTOR),
            device: id.into(),
            metric,
            ts_ms,
            value,
            score: ps.score.clamp(0.0, 1.0),
            detector: DETECTOR.into(),
            window_start_ms,
            agent: agent.into(),
            phase: EventPhase::Onset,
            model_version: Some(model.version),
        },
    ))
}
