//! Tests of the PCA model: hand-computed statistics, the correlation-break scenario, calibration on
//! the training data, serialisation, validation and refusals.

use super::*;
use crate::multi::limit::QUIET_Z;
use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn gauss(rng: &mut SmallRng) -> f64 {
    let u: f64 = rng.gen_range(f64::EPSILON..1.0);
    let v: f64 = rng.gen::<f64>();
    (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
}

const SENSORS: [&str; 4] = ["flow", "pressure", "current", "temp"];
/// Each sensor is offset + gain · load + noise (noise sd 2 % of the gain).
const OFFSET: [f64; 4] = [10.0, 3.0, 5.0, 40.0];
const GAIN: [f64; 4] = [20.0, 2.0, 8.0, 15.0];

fn sensor(j: usize, load: f64, rng: &mut SmallRng) -> f64 {
    OFFSET[j] + GAIN[j] * load + 0.02 * GAIN[j] * gauss(rng)
}

/// A pump: a hidden load in [0, 1] drives four sensors.
fn process(rows: usize, seed: u64) -> Vec<f64> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(rows * 4);
    for _ in 0..rows {
        let load: f64 = rng.gen();
        for j in 0..4 {
            out.push(sensor(j, load, &mut rng));
        }
    }
    out
}

fn pump_model() -> PcaModel {
    let rows = process(5000, 1);
    PcaModel::fit(
        "pump-7",
        names(&SENSORS),
        &rows,
        0,
        5_000_000,
        &FitOptions::default(),
    )
    .unwrap()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9 * (1.0 + b.abs())
}

/// Correlation 0.8 between a and b: eigenvalues 1.8 along (1,1)/√2 and 0.2 along (1,−1)/√2; each
/// standardised deviation of 1.5 is 1.5/√(5/3), whose square is 1.35.
#[test]
fn two_features_match_hand_computed_t2_and_spe() {
    let rows = [0.0, 0.0, 1.0, 2.0, 2.0, 1.0, 3.0, 3.0];
    let opts = FitOptions {
        variance: 0.85,
        max_components: 8,
    };
    let m = PcaModel::fit("d", names(&["a", "b"]), &rows, 0, 10, &opts).unwrap();
    m.validate().unwrap();
    assert_eq!(m.components.len(), 1);
    assert!(close(m.eigenvalues[0], 1.8), "{:?}", m.eigenvalues);
    let h = std::f64::consts::FRAC_1_SQRT_2;
    assert!(close(m.components[0][0], h) && close(m.components[0][1], h));
    assert!(close(m.quality.explained_variance_ratio, 0.9));
    let mut s = m.scorer();
    let across = s.score(&m, &[3.0, 0.0]);
    assert!(
        close(across.t2, 0.0) && close(across.spe, 2.7),
        "{across:?}"
    );
    let along = s.score(&m, &[3.0, 3.0]);
    assert!(close(along.t2, 1.5) && close(along.spe, 0.0), "{along:?}");
    let mean = s.score(&m, &[1.5, 1.5]);
    assert!(close(mean.t2, 0.0) && close(mean.spe, 0.0) && mean.score == 0.0);
}

/// Adds a third feature uncorrelated with both: eigenvalues 1.8, 1.0, 0.2; two are kept
/// (2.8 / 3 ≥ 0.9), so T² = 0 + (2/√(4/3))² / 1 = 3 and SPE = 2.7 for (3, 0, 7).
#[test]
fn three_features_match_hand_computed_t2_and_spe() {
    let rows = [0.0, 0.0, 6.0, 1.0, 2.0, 4.0, 2.0, 1.0, 4.0, 3.0, 3.0, 6.0];
    let m = PcaModel::fit(
        "d",
        names(&["a", "b", "c"]),
        &rows,
        0,
        10,
        &FitOptions::default(),
    )
    .unwrap();
    m.validate().unwrap();
    assert_eq!(m.components.len(), 2);
    assert!(
        close(m.eigenvalues[0], 1.8) && close(m.eigenvalues[1], 1.0),
        "{:?}",
        m.eigenvalues
    );
    let mut s = m.scorer();
    let x = s.score(&m, &[3.0, 0.0, 7.0]);
    assert!(close(x.t2, 3.0) && close(x.spe, 2.7), "{x:?}");
    // Only the residual direction (a − b) moved: SPE decides, and a or b is the top feature.
    let far = s.score(&m, &[6.0, -3.0, 5.0]);
    assert!(far.spe > 10.0 && far.top < 2, "{far:?}");
    // Far along the c axis, inside the subspace: T² decides and c contributes most.
    let along_c = s.score(&m, &[1.5, 1.5, 5.0 + 10.0]);
    assert!(
        close(along_c.t2, 75.0) && close(along_c.spe, 0.0),
        "{along_c:?}"
    );
    assert_eq!(along_c.top, 2);
    // A missing slot is imputed by its mean and left out of SPE.
    let gap = s.score(&m, &[f64::NAN, 1.5, 5.0]);
    assert!(close(gap.t2, 0.0) && close(gap.spe, 0.0), "{gap:?}");
}

#[test]
fn training_data_false_alarm_rate_is_at_most_1e_3() {
    let m = pump_model();
    m.validate().unwrap();
    assert_eq!(
        m.components.len(),
        1,
        "one hidden load: {:?}",
        m.eigenvalues
    );
    assert!(m.quality.alarm_rate <= 1e-3, "{:?}", m.quality);
    assert!(
        m.quality.median_score < 0.2 && m.quality.p99_score < 0.5,
        "{:?}",
        m.quality
    );
    // Heavy-tailed noise (a cube of a Gaussian) on 6 independent features.
    let mut rng = SmallRng::seed_from_u64(9);
    let rows: Vec<f64> = (0..20_000 * 6).map(|_| gauss(&mut rng).powi(3)).collect();
    let f = names(&["a", "b", "c", "d", "e", "f"]);
    let heavy = PcaModel::fit("h", f, &rows, 0, 1, &FitOptions::default()).unwrap();
    let mut s = heavy.scorer();
    let alarms = rows
        .chunks_exact(6)
        .filter(|r| s.score(&heavy, r).score >= 0.5)
        .count();
    assert!(alarms as f64 <= 1e-3 * 20_000.0, "{alarms} alarms");
    assert_eq!(heavy.quality.alarm_rate, alarms as f64 / 20_000.0);
}

#[test]
fn catches_a_correlation_break_and_names_the_sensor() {
    let m = pump_model();
    let mut s = m.scorer();
    let mut rng = SmallRng::seed_from_u64(2);
    let (mut inverted, mut frozen, mut shifted, mut named) = (0, 0, 0, 0);
    let trials = 1000;
    for _ in 0..trials {
        let load: f64 = rng.gen();
        let mut x: Vec<f64> = (0..4).map(|j| sensor(j, load, &mut rng)).collect();
        // Current follows the load inverted: still inside its own range [5, 13].
        x[2] = sensor(2, 1.0 - load, &mut rng);
        let r = s.score(&m, &x);
        if r.score >= 0.5 {
            inverted += 1;
            named += usize::from(r.top == 2);
        }
        // Current frozen at its mean.
        x[2] = OFFSET[2] + 0.5 * GAIN[2];
        frozen += usize::from(s.score(&m, &x).score >= 0.5);
        // The load moves to its upper half, every sensor consistent.
        let high = 0.5 + 0.5 * load;
        let y: Vec<f64> = (0..4).map(|j| sensor(j, high, &mut rng)).collect();
        shifted += usize::from(s.score(&m, &y).score >= 0.5);
    }
    assert!(inverted > trials * 8 / 10, "inverted: {inverted}/{trials}");
    assert!(frozen > trials * 6 / 10, "frozen: {frozen}/{trials}");
    assert!(
        named > inverted * 95 / 100,
        "top named current {named}/{inverted}"
    );
    assert!(shifted <= 2, "consistent shift alarmed {shifted}/{trials}");
}

#[test]
fn serialised_models_score_bit_identically() {
    let m = pump_model();
    let json: PcaModel = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
    let post: PcaModel = postcard::from_bytes(&postcard::to_allocvec(&m).unwrap()).unwrap();
    assert_eq!(json, m);
    assert_eq!(post, m);
    let (mut a, mut b, mut c) = (m.scorer(), json.scorer(), post.scorer());
    for x in process(500, 3).chunks_exact(4) {
        let sa = a.score(&m, x);
        let (sb, sc) = (b.score(&json, x), c.score(&post, x));
        assert_eq!(sa.score.to_bits(), sb.score.to_bits());
        assert_eq!(sa.score.to_bits(), sc.score.to_bits());
        assert_eq!(
            (sa.t2.to_bits(), sa.spe.to_bits()),
            (sb.t2.to_bits(), sb.spe.to_bits())
        );
    }
}

#[test]
fn validate_refuses_broken_artifacts_naming_the_field() {
    let m = pump_model();
    type Breaker = Box<dyn Fn(&mut PcaModel)>;
    let cases: Vec<(&str, Breaker)> = vec![
        ("scales", Box::new(|m| m.scales[2] = 0.0)),
        (
            "scales",
            Box::new(|m| {
                m.scales.pop();
            }),
        ),
        ("means", Box::new(|m| m.means[1] = f64::NAN)),
        ("means", Box::new(|m| m.means[0] = f64::INFINITY)),
        (
            "eigenvalues",
            Box::new(|m| m.eigenvalues[0] = f64::INFINITY),
        ),
        ("eigenvalues", Box::new(|m| m.eigenvalues[0] = 0.0)),
        ("eigenvalues", Box::new(|m| m.eigenvalues.push(1.0))),
        ("components", Box::new(|m| m.components[0].push(0.0))),
        ("components", Box::new(|m| m.components[0][0] = f64::NAN)),
        ("components", Box::new(|m| m.components[0][0] *= 2.0)),
        ("components", Box::new(|m| m.components.clear())),
        (
            "features",
            Box::new(|m| m.features[1] = m.features[0].clone()),
        ),
        ("t2", Box::new(|m| m.t2.h = -1.0)),
        ("spe", Box::new(|m| m.spe.value_at_half = f64::NAN)),
        ("kind", Box::new(|m| m.kind = "kmeans".into())),
        (
            "trained_from_ms",
            Box::new(|m| m.trained_from_ms = m.trained_to_ms + 1),
        ),
        ("samples", Box::new(|m| m.samples = 1)),
    ];
    for (field, break_it) in cases {
        let mut bad = m.clone();
        break_it(&mut bad);
        let e = bad.validate().expect_err(field).to_string();
        assert!(e.contains(&format!("{field}:")), "{field}: {e}");
    }
    let e = m.clone();
    let mut scales = e.clone();
    scales.scales[2] = 0.0;
    let msg = scales.validate().unwrap_err().to_string();
    assert!(
        msg.contains("\"current\"") && msg.contains("got 0"),
        "{msg}"
    );
}

#[test]
fn check_compatible_wants_the_same_names_in_order() {
    let m = pump_model();
    assert!(m.check_compatible(&names(&SENSORS)).is_ok());
    let swapped = names(&["pressure", "flow", "current", "temp"]);
    assert!(m
        .check_compatible(&swapped)
        .unwrap_err()
        .to_string()
        .contains("features"));
    assert!(m.check_compatible(&names(&SENSORS[..3])).is_err());
}

#[test]
fn fit_refuses_unusable_data() {
    let o = FitOptions::default();
    let f = names(&["a", "b"]);
    let e = |r: Result<PcaModel, ModelError>| r.unwrap_err().to_string();
    assert!(e(PcaModel::fit("d", f.clone(), &[1.0, 2.0], 0, 1, &o)).contains("at least 2 rows"));
    let nan = [1.0, 2.0, f64::NAN, 1.0, 3.0, f64::INFINITY];
    assert!(e(PcaModel::fit("d", f.clone(), &nan, 0, 1, &o)).contains("2 skipped"));
    assert!(e(PcaModel::fit("d", vec![], &[], 0, 1, &o)).contains("no features"));
    assert!(e(PcaModel::fit("d", f.clone(), &[1.0, 2.0, 3.0], 0, 1, &o)).contains("whole number"));
    assert!(e(PcaModel::fit("d", f.clone(), &[1.0; 8], 0, 1, &o)).contains("no feature varies"));
    let rows = [1.0, 2.0, 2.0, 3.0, 4.0, 1.0];
    assert!(e(PcaModel::fit("d", f.clone(), &rows, 5, 1, &o)).contains("before it starts"));
    let bad = FitOptions {
        variance: 1.5,
        max_components: 2,
    };
    assert!(e(PcaModel::fit("d", f.clone(), &rows, 0, 1, &bad)).starts_with("variance"));
    let bad = FitOptions {
        variance: 0.5,
        max_components: 0,
    };
    assert!(e(PcaModel::fit("d", f.clone(), &rows, 0, 1, &bad)).starts_with("max_components"));
    let huge = [1e300, 1.0, -1e300, 2.0, 0.0, 3.0];
    assert!(e(PcaModel::fit("d", f, &huge, 0, 1, &o)).contains("too large"));
}

#[test]
fn edge_cases_fit_and_score_without_panicking() {
    // Two rows, one feature, a constant column, full variance.
    let m = PcaModel::fit(
        "d",
        names(&["a"]),
        &[1.0, 2.0],
        0,
        1,
        &FitOptions::default(),
    )
    .unwrap();
    m.validate().unwrap();
    let mut s = m.scorer();
    assert!(s.score(&m, &[1.5]).score < 0.5);
    let rows = process(2000, 4);
    let mut with_const = Vec::new();
    for r in rows.chunks_exact(4) {
        with_const.extend_from_slice(r);
        with_const.push(7.0);
    }
    let f = names(&["flow", "pressure", "current", "temp", "setpoint"]);
    let opts = FitOptions {
        variance: 1.0,
        max_components: 8,
    };
    let m = PcaModel::fit("d", f, &with_const, 0, 1, &opts).unwrap();
    m.validate().unwrap();
    assert_eq!(m.quality.constant_features, vec!["setpoint".to_string()]);
    assert_eq!(m.scales[4], 1.0);
    let mut s = m.scorer();
    let mut x = with_const[..5].to_vec();
    assert!(s.score(&m, &x).score < 0.5);
    x[4] = 8.0;
    let moved = s.score(&m, &x);
    assert!(moved.score >= 0.5 && moved.top == 4, "{moved:?}");
    for bad in [
        vec![f64::NAN; 5],
        vec![1e300; 5],
        vec![-1e308, 1e308, f64::INFINITY, 0.0, 7.0],
        vec![1.0],
        vec![],
        vec![1.0; 9],
    ] {
        let r = s.score(&m, &bad);
        assert!(
            (0.0..=1.0).contains(&r.score) && r.top < 5,
            "{bad:?}: {r:?}"
        );
    }
    assert_eq!(s.score(&m, &[f64::NAN; 5]).score, 0.0);
    assert!(s.score(&m, &[1e300; 5]).score > 0.9);
}

#[test]
fn scorer_follows_a_swapped_model() {
    let a = pump_model();
    let b = PcaModel::fit(
        "d",
        names(&["x", "y"]),
        &[0.0, 0.0, 1.0, 2.0, 2.0, 1.0, 3.0, 3.0],
        0,
        1,
        &FitOptions::default(),
    )
    .unwrap();
    let mut s = a.scorer();
    let first = s.score(&a, &[20.0, 4.0, 9.0, 47.5]);
    let other = s.score(&b, &[3.0, 0.0]);
    assert_eq!(other, b.scorer().score(&b, &[3.0, 0.0]));
    assert_eq!(s.score(&a, &[20.0, 4.0, 9.0, 47.5]), first);
}

/// linfa-reduction's Pca gives the axes when its LOBPCG converges (few components of many
/// features); otherwise linfa-linalg's eigh does, and both agree on the leading axis.
#[test]
fn both_solvers_agree_on_the_leading_axis() {
    let m = pump_model();
    assert_eq!(m.quality.solver, "linfa-linalg eigh");
    assert!(
        m.components[0].iter().all(|p| (p - 0.5).abs() < 1e-3),
        "{:?}",
        m.components
    );
    let mut rng = SmallRng::seed_from_u64(5);
    let mut rows = Vec::new();
    for _ in 0..3000 {
        let load: f64 = rng.gen();
        for j in 0..12 {
            rows.push(j as f64 + (1.0 + j as f64) * load + 0.1 * gauss(&mut rng));
        }
    }
    let f: Vec<String> = (0..12).map(|j| format!("s{j}")).collect();
    let one = FitOptions {
        variance: 0.9,
        max_components: 1,
    };
    let a = PcaModel::fit("d", f.clone(), &rows, 0, 1, &one).unwrap();
    assert_eq!(a.quality.solver, "linfa-reduction pca");
    let all = FitOptions {
        variance: 1.0,
        max_components: 11,
    };
    let b = PcaModel::fit("d", f, &rows, 0, 1, &all).unwrap();
    assert_eq!(b.quality.solver, "linfa-linalg eigh");
    assert_eq!(b.components.len(), 11);
    b.validate().unwrap();
    assert!((a.eigenvalues[0] / b.eigenvalues[0] - 1.0).abs() < 1e-9);
    let d: f64 = a.components[0]
        .iter()
        .zip(&b.components[0])
        .map(|(x, y)| x * y)
        .sum();
    assert!((d - 1.0).abs() < 1e-9, "{d}");
}

#[test]
fn unvalidated_artifacts_with_wrong_shapes_never_panic() {
    let m = pump_model();
    let x = [20.0, 4.0, 9.0, 47.5];
    let breakers: [fn(&mut PcaModel); 4] = [
        |m| m.means.truncate(2),
        |m| m.scales.clear(),
        |m| m.components[0].truncate(1),
        |m| m.eigenvalues.clear(),
    ];
    for b in breakers {
        let mut bad = m.clone();
        b(&mut bad);
        let mut s = PcaScorer::default();
        assert_eq!(s.score(&bad, &x).score, 0.0);
        assert!(bad.validate().is_err());
    }
}

/// A scorer with the limits `(g, h)` of T² and SPE (only the limits matter to `combine`).
fn scorer_with(t2: (f64, f64), spe: (f64, f64)) -> PcaScorer {
    let limit = |(g, h)| Limit {
        g,
        h,
        value_at_half: 1.0,
    };
    PcaScorer {
        wh_t2: limit(t2).wilson_hilferty(),
        wh_spe: limit(spe).wilson_hilferty(),
        ..PcaScorer::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    /// The quiet early-out gives the full computation's score bit for bit (and the same deciding
    /// statistic), for any limits and statistics: around the quiet bound, far below and above it,
    /// and at 0.
    #[test]
    fn quiet_statistics_score_exactly_what_the_full_path_does(
        gt in 1e-9f64..1e6, ht in 0.1f64..1e4,
        gs in 1e-9f64..1e6, hs in 0.1f64..1e4,
        // The statistics as multiples of their limit's mean g·h, on a log scale, or 0.
        rt in prop_oneof![Just(f64::NEG_INFINITY), -12.0f64..3.0, -0.05f64..0.05],
        rs in prop_oneof![Just(f64::NEG_INFINITY), -12.0f64..3.0, -0.05f64..0.05],
    ) {
        let s = scorer_with((gt, ht), (gs, hs));
        let (t2, spe) = (gt * ht * rt.exp(), gs * hs * rs.exp());
        let (fast, full) = (s.combine(t2, spe), s.combine_full(t2, spe));
        prop_assert_eq!(fast.0.to_bits(), full.0.to_bits(), "{:?} {:?}", fast, full);
        prop_assert_eq!(fast.1, full.1);
    }
}

/// Statistics at the quiet bound itself (give or take an ulp) score exactly 0 on the full path,
/// and the early-out is taken for the bulk of a normal device's vectors.
#[test]
fn quiet_bound_is_inside_the_zero_score_region() {
    for (g, h) in [(1e-9, 0.1), (0.3, 2.0), (1.0, 4.0), (7.0, 50.0), (1e6, 1e4)] {
        let s = scorer_with((g, h), (g, h));
        let wh = s.wh_t2;
        let bound = wh.quiet_bound();
        for x in [bound, bound * (1.0 + 1e-15), bound * (1.0 - 1e-15), 0.0] {
            if wh.is_quiet(x) {
                assert!(wh.z(x) <= QUIET_Z + 1e-9, "g {g} h {h}: z {}", wh.z(x));
                assert_eq!(s.combine_full(x, x).0.to_bits(), 0.0f64.to_bits());
                assert_eq!(s.combine(x, x), s.combine_full(x, x));
            }
        }
        assert!(!wh.is_quiet(f64::NAN) && !wh.is_quiet(f64::INFINITY));
    }
    let m = pump_model();
    let mut s = m.scorer();
    let rows = process(2000, 9);
    let mut quiet = 0;
    for x in rows.chunks_exact(4) {
        let r = s.score(&m, x);
        let full = s.combine_full(r.t2, r.spe);
        assert_eq!(r.score.to_bits(), full.0.to_bits());
        quiet += usize::from(s.wh_t2.is_quiet(r.t2) && s.wh_spe.is_quiet(r.spe));
    }
    assert!(
        quiet > 200,
        "the early-out was taken for {quiet} of 2000 vectors"
    );
}

/// Every z at or below the quiet bound scores exactly 0 through the detectors' tail and surprise
/// mapping (a dense sweep; the margin to where scores turn positive is what makes it hold).
#[test]
fn every_z_below_the_quiet_bound_scores_zero() {
    let score = |z: f64| surprise_score(neg_log10_tail(z) - std::f64::consts::LOG10_2);
    let mut z = QUIET_Z;
    while z > -60.0 {
        assert_eq!(score(z).to_bits(), 0.0f64.to_bits(), "z {z}");
        z -= 1e-5 * (1.0 - z);
    }
    assert_eq!(score(f64::NEG_INFINITY), 0.0);
    // The bound is not needlessly low: the score turns positive only just above z = 0.
    assert_eq!(score(-1e-6), 0.0);
    assert!(score(1e-3) > 0.0);
}

/// A model of `features` metrics fitted on 300 rows that one load drives (metric j at
/// `j + (1 + j)·load`, plus noise), from `seed`.
fn load_driven_model(seed: u64, features: usize) -> PcaModel {
    let mut rng = SmallRng::seed_from_u64(seed);
    let names: Vec<String> = (0..features).map(|j| format!("m{j}")).collect();
    let mut rows = Vec::new();
    for _ in 0..300 {
        let load = gauss(&mut rng);
        for j in 0..features {
            rows.push(j as f64 + (1.0 + j as f64) * load + 0.3 * gauss(&mut rng));
        }
    }
    PcaModel::fit("d", names, &rows, 0, 1, &FitOptions::default()).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// A bound scorer gives what `PcaScorer::score` gives for its model, bit for bit: normal
    /// vectors, far-off ones, missing (NaN) slots and short vectors, on models of 2 to 6 features.
    #[test]
    fn a_bound_scorer_scores_exactly_as_the_scorer_does(
        seed in 0u64..1000,
        features in 2usize..7,
        vectors in prop::collection::vec(
            prop::collection::vec(prop_oneof![
                4 => -3.0f64..3.0,
                1 => -200.0f64..200.0,
                1 => Just(f64::NAN),
            ], 0..8),
            1..20,
        ),
    ) {
        let m = load_driven_model(seed, features);
        let (mut s, mut b) = (m.scorer(), m.bound_scorer());
        for v in &vectors {
            // Vectors around the training data: load-driven, plus the drawn offsets.
            let x: Vec<f64> = v.iter().enumerate().map(|(j, d)| j as f64 + d).collect();
            let (a, c) = (s.score(&m, &x), b.score(&x));
            prop_assert_eq!(a.score.to_bits(), c.score.to_bits());
            prop_assert_eq!(a.t2.to_bits(), c.t2.to_bits());
            prop_assert_eq!(a.spe.to_bits(), c.spe.to_bits());
            prop_assert_eq!(a.top, c.top);
            // Deferred: the same numbers, and the same top feature when asked for after.
            let d = b.score_deferred(&x);
            prop_assert_eq!(a.score.to_bits(), d.score.to_bits());
            prop_assert_eq!(a.t2.to_bits(), d.t2.to_bits());
            prop_assert_eq!(a.spe.to_bits(), d.spe.to_bits());
            prop_assert_eq!(a.top, b.top_of_last(&d));
        }
    }
}

/// A model whose shapes disagree scores 0 through a bound scorer too, without panicking.
#[test]
fn a_bound_scorer_of_a_malformed_model_scores_zero() {
    let mut m = pump_model();
    m.means.pop();
    let mut b = m.bound_scorer();
    let r = b.score(&[1.0, 2.0, 3.0, 4.0]);
    assert_eq!(r, m.scorer().score(&m, &[1.0, 2.0, 3.0, 4.0]));
    assert_eq!(r.score, 0.0);
    let d = b.score_deferred(&[1.0, 2.0, 3.0, 4.0]);
    assert_eq!((d.score, b.top_of_last(&d)), (0.0, 0));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// `reaches` answers what comparing the score would, for any level (three per case, so the
    /// two kept cut-offs are replaced too), normal and far-off vectors, NaN slots and short
    /// vectors, on models of 2 to 6 features; only a score within rounding of the level may differ.
    #[test]
    fn reaching_a_level_agrees_with_the_score(
        seed in 0u64..1000,
        features in 2usize..7,
        levels in prop::collection::vec(prop_oneof![
            Just(0.5), Just(0.4), Just(1.0), Just(1e-9), 1e-6f64..1.0,
        ], 3),
        vectors in prop::collection::vec(
            prop::collection::vec(prop_oneof![
                4 => -3.0f64..3.0,
                2 => -200.0f64..200.0,
                1 => Just(f64::NAN),
            ], 0..8),
            1..20,
        ),
    ) {
        let m = load_driven_model(seed, features);
        let (mut s, mut b) = (m.scorer(), m.bound_scorer());
        for v in &vectors {
            let x: Vec<f64> = v.iter().enumerate().map(|(j, d)| j as f64 + d).collect();
            let score = s.score(&m, &x).score;
            // The stack pass gives the scratch pass's statistics, bit for bit.
            let (a, c) = (b.statistics(&x), b.statistics_on_stack(&x));
            prop_assert_eq!((a.0.to_bits(), a.1.to_bits()), (c.0.to_bits(), c.1.to_bits()));
            for &level in &levels {
                let reached = b.reaches(&x, level);
                prop_assert!(
                    reached == (score >= level) || (score - level).abs() < 1e-9,
                    "score {} level {} reached {}", score, level, reached
                );
            }
        }
    }
}

/// The cut-offs sit exactly where the score crosses the level (the value below does not reach
/// it), a sweep from normal to far-off vectors meets both answers, and levels outside (0, 1]
/// are answered without a model.
#[test]
fn cut_offs_sit_where_the_score_crosses_the_level() {
    let m = pump_model();
    let (mut s, mut b) = (m.scorer(), m.bound_scorer());
    for level in [0.5, 0.4, 0.999] {
        for wh in [m.t2.wilson_hilferty(), m.spe.wilson_hilferty()] {
            let cut = cut_for(&wh, level);
            assert!(cut > 0.0 && cut.is_finite(), "level {level}: {cut}");
            assert!(score_of_z(wh.z(cut)) >= level);
            assert!(score_of_z(wh.z(f64::from_bits(cut.to_bits() - 1))) < level);
        }
    }
    for level in [0.5, 0.4, 0.6] {
        let (mut yes, mut no) = (0, 0);
        let normal = process(400, 5);
        for (i, x) in normal.chunks_exact(4).enumerate() {
            // Ever further off: feature i % 4 by up to 8 of its scales.
            let mut x = x.to_vec();
            x[i % 4] += m.scales[i % 4] * 0.02 * i as f64;
            let score = s.score(&m, &x).score;
            let reached = b.reaches(&x, level);
            assert_eq!(reached, score >= level, "vector {i}: score {score}");
            if reached {
                yes += 1;
            } else {
                no += 1;
            }
        }
        assert!(
            yes > 10 && no > 10,
            "level {level}: {yes} reached, {no} not"
        );
    }
    // Prepared: both levels' cut-offs are there before the first vector.
    let mut p = m.bound_scorer();
    p.prepare([0.5, 0.4]);
    assert_eq!(p.cuts.map(|c| c.level), [0.5f64, 0.4].map(f64::to_bits));
    assert_eq!(p.cuts[1].spe, cut_for(&m.spe.wilson_hilferty(), 0.4));
    assert!(b.reaches(&[0.0; 4], 0.0));
    assert!(b.reaches(&[0.0; 4], -1.0));
    assert!(!b.reaches(&[0.0; 4], f64::NAN));
    let mut malformed = m.clone();
    malformed.means.pop();
    assert!(
        !malformed.bound_scorer().reaches(&[1e9; 4], 1e-9),
        "scores 0"
    );
}
