//! Tests of the peer groups: separated groups, a device leaving its group, a featureless fleet,
//! degenerate fleets, serialisation and validation.

use super::*;
use rand::{Rng, SeedableRng};

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("m{i}")).collect()
}

fn gauss(rng: &mut SmallRng) -> f64 {
    let u: f64 = rng.gen_range(f64::EPSILON..1.0);
    let v: f64 = rng.gen::<f64>();
    (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
}

const D: usize = 6;

/// Three kinds of device, 30 each: centres far apart on every metric, per-device noise sd 1.
fn three_groups(seed: u64) -> Vec<f64> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let centres = [
        [0.0; D],
        [20.0, 40.0, 5.0, 30.0, 25.0, 60.0],
        [50.0, 10.0, 40.0, 0.0, 60.0, 20.0],
    ];
    let mut out = Vec::new();
    for c in &centres {
        for _ in 0..30 {
            out.extend(c.iter().map(|v| v + gauss(&mut rng)));
        }
    }
    out
}

#[test]
fn finds_three_groups_and_every_member_fits_its_group() {
    let profiles = three_groups(1);
    let m = PeerModel::fit(names(D), &profiles, 1000, &PeerOptions::default()).unwrap();
    m.validate().unwrap();
    assert_eq!(m.centroids.len(), 3, "{m:?}");
    assert_eq!(m.sizes, vec![30, 30, 30]);
    for p in profiles.chunks_exact(D) {
        let s = m.score(p);
        assert!(s.score < 0.5 && s.ratio < 3.0, "{s:?}");
    }
    // Members of one group share a cluster.
    let first = m.score(&profiles[..D]).cluster;
    assert!(profiles[..30 * D]
        .chunks_exact(D)
        .all(|p| m.score(p).cluster == first));
    assert_eq!(m.trained_to_ms, 1000);
    assert_eq!(m.linfa_version, LINFA_VERSION);
}

#[test]
fn four_equally_spaced_groups_are_four() {
    let mut rng = SmallRng::seed_from_u64(8);
    let profiles: Vec<f64> = (0..200)
        .flat_map(|d| {
            let kind = (d % 4) as f64;
            (0..D)
                .map(|j| kind * 10.0 * ((j % 3) as f64 + 1.0))
                .collect::<Vec<_>>()
        })
        .map(|v| v + gauss(&mut rng))
        .collect();
    let m = PeerModel::fit(names(D), &profiles, 0, &PeerOptions::default()).unwrap();
    let mut sizes = m.sizes.clone();
    sizes.sort_unstable();
    assert_eq!(sizes, vec![50; 4], "{m:?}");
    assert!(profiles.chunks_exact(D).all(|p| m.score(p).score < 0.5));
}

#[test]
fn a_device_six_spreads_from_its_group_scores_high() {
    let profiles = three_groups(2);
    let m = PeerModel::fit(names(D), &profiles, 0, &PeerOptions::default()).unwrap();
    let c = m.score(&profiles[..D]).cluster;
    // Move away from the other groups (they lie at higher values): along −(1, …, 1)/√D.
    let step = 6.0 * m.spreads[c] / (D as f64).sqrt();
    let moved: Vec<f64> = (0..D)
        .map(|j| (m.centroids[c][j] - step) * m.scales[j] + m.means[j])
        .collect();
    let s = m.score(&moved);
    assert_eq!(s.cluster, c);
    assert!((s.ratio - 6.0).abs() < 1e-9 && s.score >= 0.5, "{s:?}");
    // The score is monotone in the ratio and 0.5 at the limit.
    let at_limit: Vec<f64> = (0..D)
        .map(|j| (m.centroids[c][j] - step / 2.0) * m.scales[j] + m.means[j])
        .collect();
    assert!((m.score(&at_limit).score - 0.5).abs() < 1e-9);
    // A profile missing a metric is scored on the others.
    let mut partial = moved.clone();
    partial[0] = f64::NAN;
    assert!(m.score(&partial).score >= 0.5);
    assert_eq!(m.score(&[f64::NAN; D]).score, 0.0);
    assert_eq!(m.score(&[]).score, 0.0);
    assert!(m.score(&[1e300; D]).score > 0.99);
}

#[test]
fn a_featureless_fleet_is_one_group_without_alarms() {
    let mut rng = SmallRng::seed_from_u64(3);
    let profiles: Vec<f64> = (0..200 * 4).map(|_| 10.0 + gauss(&mut rng)).collect();
    let m = PeerModel::fit(names(4), &profiles, 0, &PeerOptions::default()).unwrap();
    assert_eq!(m.centroids.len(), 1, "{m:?}");
    let alarms = profiles
        .chunks_exact(4)
        .filter(|p| m.score(p).score >= 0.5)
        .count();
    assert_eq!(alarms, 0);
}

#[test]
fn degenerate_fleets_give_errors_or_sane_models() {
    let o = PeerOptions::default();
    let e = PeerModel::fit(names(3), &[1.0, 2.0, 3.0], 0, &o).unwrap_err();
    assert!(
        e.to_string()
            .contains("at least 2 device profiles without NaN/inf, got 1 (0 skipped)"),
        "{e}"
    );
    let nan = [1.0, 2.0, f64::NAN, 4.0, 5.0, 6.0];
    let e = PeerModel::fit(names(3), &nan, 0, &o).unwrap_err();
    assert!(e.to_string().contains("1 skipped"), "{e}");
    assert!(PeerModel::fit(names(3), &[1.0; 5], 0, &o).is_err());
    assert!(PeerModel::fit(vec![], &[], 0, &o).is_err());
    let bad = PeerOptions {
        max_clusters: 0,
        ..o.clone()
    };
    assert!(PeerModel::fit(names(1), &[1.0, 2.0], 0, &bad)
        .unwrap_err()
        .to_string()
        .starts_with("max_clusters"));
    for limit in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let bad = PeerOptions { limit, ..o.clone() };
        assert!(PeerModel::fit(names(1), &[1.0, 2.0], 0, &bad).is_err());
    }
    // Ten identical devices: one group, spread at its floor; they score 0, a different one high.
    let same: Vec<f64> = (0..10).flat_map(|_| [5.0, 7.0]).collect();
    let m = PeerModel::fit(names(2), &same, 0, &o).unwrap();
    m.validate().unwrap();
    assert_eq!(m.centroids.len(), 1);
    assert_eq!(m.score(&[5.0, 7.0]).score, 0.0);
    assert!(m.score(&[5.0, 8.0]).score > 0.5);
    // NaN rows are skipped, the rest fitted.
    let mut with_nan = three_groups(4);
    with_nan.extend([f64::NAN; D]);
    let m = PeerModel::fit(names(D), &with_nan, 0, &o).unwrap();
    assert_eq!(m.sizes.iter().sum::<u64>(), 90);
    // Two devices: one group (a group needs 3 devices to split off).
    let m = PeerModel::fit(names(2), &[0.0, 0.0, 100.0, 100.0], 0, &o).unwrap();
    assert_eq!(m.centroids.len(), 1);
    m.validate().unwrap();
}

#[test]
fn same_seed_same_model_and_serde_round_trips() {
    let profiles = three_groups(5);
    let o = PeerOptions {
        seed: 11,
        ..PeerOptions::default()
    };
    let a = PeerModel::fit(names(D), &profiles, 0, &o).unwrap();
    let b = PeerModel::fit(names(D), &profiles, 0, &o).unwrap();
    assert_eq!(a, b);
    let json: PeerModel = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
    let post: PeerModel = postcard::from_bytes(&postcard::to_allocvec(&a).unwrap()).unwrap();
    assert_eq!(json, a);
    assert_eq!(post, a);
    for p in profiles.chunks_exact(D) {
        assert_eq!(a.score(p), json.score(p));
    }
    let parsed: PeerOptions = serde_json::from_str("{}").unwrap();
    assert_eq!(parsed, PeerOptions::default());
}

#[test]
fn validate_refuses_broken_artifacts_naming_the_field() {
    let m = PeerModel::fit(names(D), &three_groups(6), 0, &PeerOptions::default()).unwrap();
    type Breaker = Box<dyn Fn(&mut PeerModel)>;
    let cases: Vec<(&str, Breaker)> = vec![
        ("scales", Box::new(|m| m.scales[0] = 0.0)),
        ("means", Box::new(|m| m.means[1] = f64::NAN)),
        (
            "centroids",
            Box::new(|m| {
                m.centroids[0].pop();
            }),
        ),
        ("centroids", Box::new(|m| m.centroids[1][0] = f64::INFINITY)),
        ("centroids", Box::new(|m| m.centroids.clear())),
        ("spreads", Box::new(|m| m.spreads[0] = 0.0)),
        ("spreads", Box::new(|m| m.spreads.push(1.0))),
        ("sizes", Box::new(|m| m.sizes.clear())),
        ("limit", Box::new(|m| m.limit = f64::NAN)),
        ("features", Box::new(|m| m.features.clear())),
    ];
    for (field, break_it) in cases {
        let mut bad = m.clone();
        break_it(&mut bad);
        let e = bad.validate().expect_err(field).to_string();
        assert!(e.contains(&format!("{field}:")), "{field}: {e}");
    }
}

#[test]
fn unvalidated_artifacts_with_wrong_shapes_never_panic() {
    let m = PeerModel::fit(names(D), &three_groups(7), 0, &PeerOptions::default()).unwrap();
    let p = three_groups(7)[..D].to_vec();
    let mut short = m.clone();
    short.means.truncate(2);
    short.spreads.clear();
    let s = short.score(&p);
    assert!((0.0..=1.0).contains(&s.score));
    let mut zero = m.clone();
    zero.spreads = vec![0.0; zero.spreads.len()];
    zero.limit = f64::NAN;
    assert!((0.0..=1.0).contains(&zero.score(&p).score));
    let mut ragged = m;
    ragged.centroids[0].truncate(1);
    assert!((0.0..=1.0).contains(&ragged.score(&p).score));
}
