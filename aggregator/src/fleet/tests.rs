//! Unit tests of the profile bookkeeping, training sets, scoring and events.

use super::*;
use crate::config::FleetGroup;

const MIN: i64 = 60_000;

fn cfg() -> FleetConfig {
    FleetConfig {
        enabled: true,
        profile_window_ms: 600_000,
        min_devices: 5,
        min_windows: 2,
        ..FleetConfig::default()
    }
}

fn window(device: &str, metric: &str, i: i64, mean: f64) -> WindowSummary {
    WindowSummary {
        device: device.into(),
        metric: metric.into(),
        start_ms: i * MIN,
        end_ms: (i + 1) * MIN,
        count: 60,
        min: mean - 1.0,
        max: mean + 1.0,
        mean,
        std: 0.5,
        first_ts_ms: i * MIN,
        last_ts_ms: (i + 1) * MIN - 1_000,
        max_score: 0.0,
        revision: 0,
    }
}

/// A slow fleet-wide load cycle (every device alike; about 10 h) plus deterministic per-(device, metric, window)
/// noise in [-1, 1].
fn wobble(d: usize, j: usize, i: i64) -> f64 {
    let noise = (((d * 131 + j * 17) as f64 + i as f64 * 7.31).sin() * 43_758.545).fract();
    5.0 * (i as f64 * 0.01).sin() + noise
}

const METRICS: [&str; 4] = ["current", "flow", "pressure", "temp"];
const BASE: [f64; 4] = [5.0, 20.0, 3.0, 40.0];

/// Windows `from..to` of `devices` identical devices with four metrics; device 0 adds
/// `drift(i)` to its flow.
fn feed(
    p: &mut Profiles,
    devices: usize,
    from: i64,
    to: i64,
    drift: impl Fn(i64) -> f64,
) -> Vec<FleetEvent> {
    let mut events = Vec::new();
    for i in from..to {
        for d in 0..devices {
            for (j, m) in METRICS.iter().enumerate() {
                let extra = if d == 0 && j == 1 { drift(i) } else { 0.0 };
                let mean = BASE[j] * (1.0 + 0.01 * wobble(d, j, i)) + extra;
                events.extend(p.observe(7, &window(&format!("pump-{d}"), m, i, mean)));
            }
        }
    }
    events
}

fn refit(p: &mut Profiles, now_ms: i64) -> Vec<FleetEvent> {
    let mut events = Vec::new();
    for set in p.training_sets() {
        let model = set.fit(&PeerOptions::default()).unwrap();
        events.extend(p.install(&set, model, now_ms));
    }
    events
}

#[test]
fn the_profile_is_the_time_weighted_ewma_of_window_means() {
    let mut p = Profiles::new(&cfg(), "agg").unwrap();
    p.observe(0, &window("d", "m", 0, 10.0));
    assert_eq!(p.profile("d").unwrap().0, vec![("m".to_string(), 10.0)]);
    p.observe(0, &window("d", "m", 1, 20.0));
    let alpha = 1.0 - (-60_000.0f64 / 600_000.0).exp();
    let want = 10.0 + alpha * 10.0;
    assert!((p.profile("d").unwrap().0[0].1 - want).abs() < 1e-12);
    // A gap of five windows weighs the next mean more.
    p.observe(0, &window("d", "m", 6, 0.0));
    let alpha5 = 1.0 - (-300_000.0f64 / 600_000.0).exp();
    let want = want + alpha5 * (0.0 - want);
    assert!((p.profile("d").unwrap().0[0].1 - want).abs() < 1e-12);
    // Replays, older windows and non-finite means change nothing.
    for s in [
        window("d", "m", 6, 99.0),
        window("d", "m", 2, 99.0),
        window("d", "m", 7, f64::NAN),
        window("d", "m", 7, f64::INFINITY),
    ] {
        assert_eq!(p.observe(0, &s), None);
    }
    assert!((p.profile("d").unwrap().0[0].1 - want).abs() < 1e-12);
    // A huge mean stays finite.
    p.observe(0, &window("d", "m", 8, 1e300));
    assert!(p.profile("d").unwrap().0[0].1.is_finite());
}

#[test]
fn profiles_are_bounded_in_devices_and_metrics() {
    let mut c = cfg();
    c.max_devices = 3;
    let mut p = Profiles::new(&c, "agg").unwrap();
    for d in 0..5 {
        p.observe(0, &window(&format!("d{d}"), "m", 0, 1.0));
    }
    assert_eq!(p.len(), 3);
    assert_eq!(p.refused_windows, 2);
    // A known device still updates at the bound.
    p.observe(0, &window("d0", "m", 1, 3.0));
    assert!(p.profile("d0").unwrap().0[0].1 > 1.0);
    for m in 0..MAX_METRICS + 10 {
        p.observe(0, &window("d1", &format!("m{m:03}"), 0, 1.0));
    }
    assert_eq!(p.profile("d1").unwrap().0.len(), MAX_METRICS);
}

#[test]
fn classes_are_metric_sets_and_labels_and_need_enough_complete_profiles() {
    let mut c = cfg();
    c.groups = vec![FleetGroup {
        label: "north".into(),
        devices: "n-*".into(),
    }];
    let mut p = Profiles::new(&c, "agg").unwrap();
    for i in 0..2 {
        for d in 0..5 {
            // Same metric set, two labels: two classes of five.
            for id in [format!("n-{d}"), format!("s-{d}")] {
                p.observe(0, &window(&id, "a", i, 1.0 + d as f64 * 0.01));
                p.observe(0, &window(&id, "b", i, 2.0 + d as f64 * 0.02));
            }
            // Another metric set: its own class of five...
            p.observe(0, &window(&format!("x-{d}"), "a", i, 1.0));
        }
        // ...and a class of four, never fitted.
        for d in 0..4 {
            p.observe(0, &window(&format!("y-{d}"), "c", i, 1.0));
        }
    }
    let mut sets: Vec<(String, usize)> = p
        .training_sets()
        .iter()
        .map(|s| (s.class.name(), s.devices()))
        .collect();
    sets.sort();
    assert_eq!(
        sets,
        [
            ("*/a".to_string(), 5),
            ("*/a+b".to_string(), 5),
            ("north/a+b".to_string(), 5)
        ]
    );
    let report = p.classes();
    assert_eq!(report.len(), 4);
    let y = report.iter().find(|r| r.class == "*/c").unwrap();
    assert_eq!((y.devices, y.complete), (4, 4));
}

#[test]
fn a_profile_is_complete_after_min_windows_of_every_metric() {
    let mut p = Profiles::new(&cfg(), "agg").unwrap();
    for d in 0..5 {
        p.observe(0, &window(&format!("d{d}"), "a", 0, 1.0));
        p.observe(0, &window(&format!("d{d}"), "b", 0, 1.0));
        p.observe(0, &window(&format!("d{d}"), "a", 1, 1.0));
    }
    assert!(p.training_sets().is_empty(), "b has one window only");
    for d in 0..5 {
        p.observe(0, &window(&format!("d{d}"), "b", 1, 1.0));
    }
    assert_eq!(p.training_sets().len(), 1);
}

#[test]
fn stale_devices_are_dropped_at_refit() {
    let mut p = Profiles::new(&cfg(), "agg").unwrap();
    assert!(p.training_sets().is_empty());
    p.observe(0, &window("old", "m", 0, 1.0));
    // Two profile windows (20 min) later in event time, for most devices.
    for d in 0..3 {
        p.observe(0, &window(&format!("new{d}"), "m", 21, 1.0));
    }
    assert_eq!(p.len(), 4);
    p.training_sets();
    assert_eq!(p.len(), 3);
    assert!(p.profile("old").is_none());
    // One device's window far in the future (a wrong clock, or forged) ages nobody out.
    p.observe(0, &window("future", "m", 1_000_000, 1.0));
    p.training_sets();
    assert_eq!(p.len(), 4);
}

#[test]
fn a_drifting_device_raises_one_event_naming_its_metric_and_no_other_device_does() {
    let mut p = Profiles::new(&cfg(), "agg-1").unwrap();
    assert!(feed(&mut p, 8, 0, 30, |_| 0.0).is_empty(), "no model yet");
    assert!(refit(&mut p, 1_000).is_empty(), "identical devices fit");
    assert_eq!(p.models().len(), 1);
    // Device 0's flow drifts by 0.1 per window from window 30; refits every 10 windows.
    let drift = |i: i64| 0.1 * (i - 30).max(0) as f64;
    let mut events = Vec::new();
    for k in 0..6 {
        events.extend(feed(&mut p, 8, 30 + 10 * k, 40 + 10 * k, drift));
        events.extend(refit(&mut p, 2_000 + k));
    }
    assert_eq!(events.len(), 1, "one event per episode: {events:?}");
    let (partition, e) = &events[0];
    assert_eq!(*partition, 7);
    assert_eq!(
        (e.device.as_str(), e.metric.as_str(), e.detector.as_str()),
        ("pump-0", "flow", "fleet")
    );
    assert_eq!(e.agent, "agg-1");
    assert!(e.score >= THRESHOLD && e.score <= 1.0);
    assert!(e.check().is_ok(), "{:?}", e.check());
    assert!(e.model_version.is_some());
    let (profile, standing) = p.profile("pump-0").unwrap();
    assert!(
        e.value > 20.0 && e.value < profile[1].1,
        "{e:?} {profile:?}"
    );
    assert!(standing.unwrap().score >= THRESHOLD);
    // It is listed outside its group, alone.
    let classes = p.classes();
    let outside: Vec<&str> = classes[0].outside.iter().map(|o| o.0.as_str()).collect();
    assert_eq!(outside, ["pump-0"]);
    // The last model was not fitted on it (outside), and the others were all kept.
    let m = p.models().values().next().unwrap();
    assert_eq!((m.trained, m.excluded), (7, 1));
    assert!(m.model.version >= 6);
}

/// How the robust trimming was checked: with the drifted device in the training set (fitted on
/// all eight), the fleet-wide standardisation absorbs it and it is hidden; with trimming it stands
/// out.
#[test]
fn refitting_on_a_fleet_that_includes_the_drifted_device_does_not_hide_it() {
    let mut p = Profiles::new(&cfg(), "agg").unwrap();
    // Already drifted by 3 (15 % of flow, 30x its peers' spread) before the first fit.
    feed(&mut p, 8, 0, 120, |_| 3.0);
    let sets = p.training_sets();
    assert_eq!(sets.len(), 1);
    assert_eq!((sets[0].devices(), sets[0].excluded), (7, 1), "trimmed");
    // Without the trimming, the same fit hides it.
    let all: Vec<f64> = (0..8)
        .flat_map(|d| p.profile(&format!("pump-{d}")).unwrap().0)
        .map(|(_, v)| v)
        .collect();
    let naive = PeerModel::fit(
        METRICS.map(String::from).to_vec(),
        &all,
        0,
        &PeerOptions::default(),
    )
    .unwrap();
    let drifted: Vec<f64> = all[..4].to_vec();
    assert!(
        naive.score(&drifted).score < THRESHOLD,
        "a model fitted on it hides it: {:?}",
        naive.score(&drifted)
    );
    let events = refit(&mut p, 0);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].1.device, "pump-0");
    assert_eq!(events[0].1.metric, "flow");
}

#[test]
fn trimming_removes_at_most_a_quarter_and_keeps_constant_or_tiny_fleets() {
    // Eight rows, three far off: only two (a quarter) go, the most extreme first.
    let mut rows = vec![1.0; 8];
    rows[0] = 100.0;
    rows[1] = 50.0;
    rows[2] = 20.0;
    for (i, r) in rows.iter_mut().enumerate().skip(3) {
        *r += i as f64 * 1e-3;
    }
    let kept = trim_outliers(&rows, 1, 2);
    assert_eq!(kept.len(), 6);
    assert!(kept.contains(&20.0) && !kept.contains(&100.0) && !kept.contains(&50.0));
    // Identical rows: nothing trimmed (MAD 0, no departure).
    assert_eq!(trim_outliers(&[2.0; 12], 3, 4).len(), 12);
    // Empty, short, NaN: no panic.
    assert!(trim_outliers(&[], 2, 1).is_empty());
    assert_eq!(trim_outliers(&[1.0], 2, 1), vec![1.0]);
    assert_eq!(
        trim_outliers(&[f64::NAN, 1.0, 1.0, 1.0], 1, 1),
        vec![1.0; 3]
    );
}

#[test]
fn a_metric_set_that_changes_moves_the_device_to_another_class() {
    let mut p = Profiles::new(&cfg(), "agg").unwrap();
    feed(&mut p, 6, 0, 5, |_| 0.0);
    refit(&mut p, 0);
    // pump-0 gains a metric: no longer a peer of the others, never scored by their model.
    for i in 5..8 {
        p.observe(7, &window("pump-0", "vibration", i, 1e6));
    }
    let e = feed(&mut p, 6, 5, 8, |_| 1e6);
    assert!(e.is_empty(), "{e:?}");
    let names: Vec<String> = p.classes().iter().map(|c| c.class.clone()).collect();
    assert_eq!(
        names,
        [
            "*/current+flow+pressure+temp",
            "*/current+flow+pressure+temp+vibration"
        ]
    );
}

#[test]
fn profiles_are_seeded_from_the_held_windows_in_window_order() {
    let mut state = crate::state::FleetState::new(60);
    // Applied out of order: the seed sorts by window end.
    for i in [2, 0, 1] {
        state.apply_window(3, &window("d", "m", i, 10.0 * (i + 1) as f64));
    }
    let mut seeded = Profiles::new(&cfg(), "agg").unwrap();
    assert_eq!(seeded.seed(&state), 3);
    let mut direct = Profiles::new(&cfg(), "agg").unwrap();
    for i in 0..3 {
        direct.observe(3, &window("d", "m", i, 10.0 * (i + 1) as f64));
    }
    assert_eq!(seeded.profile("d"), direct.profile("d"));
    assert_eq!(seeded.devices["d"].partition, 3);
}

#[test]
fn the_whole_fleet_moving_together_after_a_fit_is_no_event() {
    let mut p = Profiles::new(&cfg(), "agg").unwrap();
    feed(&mut p, 8, 0, 30, |_| 0.0);
    refit(&mut p, 0);
    let model = p.models().values().next().unwrap().model.clone();
    // Every device's flow rises by 10 % (a fleet-wide load change), no refit meanwhile.
    let mut events = Vec::new();
    for i in 30..60 {
        for d in 0..8 {
            for (j, m) in METRICS.iter().enumerate() {
                let extra = if j == 1 { 2.0 } else { 0.0 };
                let mean = BASE[j] * (1.0 + 0.01 * wobble(d, j, i)) + extra;
                events.extend(p.observe(7, &window(&format!("pump-{d}"), m, i, mean)));
            }
        }
    }
    assert!(events.is_empty(), "{events:?}");
    // Scored against the stale model as is, every device would be outside.
    let (profile, standing) = p.profile("pump-3").unwrap();
    let raw: Vec<f64> = profile.iter().map(|(_, v)| *v).collect();
    assert!(model.score(&raw).score > 0.99);
    assert!(standing.unwrap().score < THRESHOLD);
}

#[test]
fn bad_gate_settings_are_refused() {
    let mut c = cfg();
    c.gate.rearm_ratio = 0.0;
    assert!(Profiles::new(&c, "agg").is_err());
}

#[test]
fn a_reload_retunes_gates_minimums_and_peer_options_and_a_bad_gate_changes_nothing() {
    let mut p = Profiles::new(&cfg(), "agg").unwrap();
    for i in 0..2 {
        for d in 0..5 {
            p.observe(0, &window(&format!("d{d}"), "a", i, 1.0 + d as f64 * 0.01));
        }
    }
    // Five complete profiles make a class of min_devices 5...
    assert_eq!(p.training_sets().len(), 1);
    let mut c = cfg();
    c.min_devices = 6;
    c.peers.limit = 7.5;
    c.gate.rearm_ratio = 0.25;
    p.retune(&c).unwrap();
    // ...and not of 6; the next fit takes the new options; every device's gate has the new ratio.
    assert!(p.training_sets().is_empty());
    assert_eq!(p.peer_options().limit, 7.5);
    assert!(p
        .devices
        .values()
        .all(|d| d.gate == d.gate.retuned(&p.gate)));
    assert_eq!(p.gate, EventGate::new(THRESHOLD, &c.gate).unwrap());
    // An invalid gate is refused and the profiles keep the one in force.
    let mut bad = c.clone();
    bad.gate.rearm_ratio = 0.0;
    bad.min_devices = 2;
    assert!(p.retune(&bad).is_err());
    assert_eq!(p.cfg.min_devices, 6);
    assert_eq!(p.gate, EventGate::new(THRESHOLD, &c.gate).unwrap());
}

/// The memory figure stated in the README: a device's fixed part and each metric's. A BTreeMap
/// leaf holds up to 11 (name, profile) pairs, so a device with 1 to 11 metrics allocates one leaf.
#[test]
fn a_profile_stays_within_its_stated_memory() {
    let device = std::mem::size_of::<DeviceProfile>();
    let metric = std::mem::size_of::<MetricProfile>() + std::mem::size_of::<String>();
    eprintln!("DeviceProfile {device} B, (name, MetricProfile) {metric} B");
    assert!(device <= 256, "{device}");
    assert!(metric <= 64, "{metric}");
}

#[test]
fn a_device_that_comes_back_and_leaves_again_raises_a_second_event() {
    let mut p = Profiles::new(&cfg(), "agg").unwrap();
    feed(&mut p, 8, 0, 30, |_| 0.0);
    refit(&mut p, 0);
    // Out (flow +3) for 20 windows, back for 40, out again for 20; no refit meanwhile.
    let off = |i: i64| {
        if (30..50).contains(&i) || i >= 90 {
            3.0
        } else {
            0.0
        }
    };
    let events = feed(&mut p, 8, 30, 110, off);
    let at: Vec<(&str, i64)> = events
        .iter()
        .map(|(_, e)| (e.device.as_str(), e.window_start_ms / MIN))
        .collect();
    assert_eq!(at.len(), 2, "{at:?}");
    assert!(at.iter().all(|(d, _)| *d == "pump-0"));
    assert!((30..50).contains(&at[0].1) && at[1].1 >= 90, "{at:?}");
    assert_ne!(events[0].1.id, events[1].1.id);
}

/// Cluster mode, without the KV: three members each profile a third of the fleet and export
/// their profiles (as JSON, as the bucket holds them) every window; one pool (the trainer's) fits
/// the class model from all of them and measures where the class stands every window; every member
/// adopts both, and the drifting device raises its event at its own member only, while the
/// fleet-wide load cycle raises none.
#[test]
fn members_profiles_make_one_fleet_model_and_the_owner_of_a_drifter_raises_the_event() {
    struct Fleet {
        members: Vec<Profiles>,
        pool: pool::Pool,
        model: Option<(ClassKey, ClassModel)>,
        events: Vec<(usize, FleetEvent)>,
    }
    impl Fleet {
        /// One window of every device, then a trainer tick: profiles exported to the pool, the
        /// class medians taken to every member with the model in use.
        fn window(&mut self, i: i64, drift: f64) {
            for d in 0..8 {
                for (j, m) in METRICS.iter().enumerate() {
                    let extra = if d == 0 && j == 1 { drift } else { 0.0 };
                    let mean = BASE[j] * (1.0 + 0.01 * wobble(d, j, i)) + extra;
                    let w = window(&format!("pump-{d}"), m, i, mean);
                    let e = self.members[d % 3].observe(7, &w);
                    self.events.extend(e.map(|e| (d % 3, e)));
                }
            }
            self.export();
            if let Some((class, mut cm)) = self.model.clone() {
                let (now, at) = &self.pool.class_medians()[&class];
                let shift = now.iter().zip(&cm.medians).map(|(a, b)| a - b).collect();
                cm.shift = Some((shift, *at));
                self.adopt(&class, cm);
            }
        }

        fn export(&mut self) {
            for (m, p) in self.members.iter_mut().enumerate() {
                for r in p.export(&format!("agg-{m}")) {
                    let bytes = serde_json::to_vec(&r).unwrap();
                    self.pool.insert(&r.device, &bytes).unwrap();
                }
            }
        }

        fn adopt(&mut self, class: &ClassKey, cm: ClassModel) {
            for (m, p) in self.members.iter_mut().enumerate() {
                let e = p.adopt(class, cm.clone());
                self.events.extend(e.into_iter().map(|e| (m, e)));
            }
        }

        /// The trainer's fit: version `version`, from the pool.
        fn fit(&mut self, version: u64) -> usize {
            let sets = self.pool.training_sets();
            assert_eq!(sets.len(), 1);
            let set = &sets[0];
            let mut model = set.fit(&PeerOptions::default()).unwrap();
            model.version = version;
            let n = set.class.metrics.len();
            let medians = (0..n)
                .map(|j| {
                    let mut col: Vec<f64> = set.rows.chunks_exact(n).map(|r| r[j]).collect();
                    robust::median(&mut col)
                })
                .collect();
            let cm = ClassModel {
                model,
                fitted_at_ms: 1,
                trained: set.devices(),
                excluded: set.excluded,
                medians,
                trainer: Some(("agg-1".into(), 9)),
                shift: Some((vec![0.0; n], set.to_ms)),
            };
            self.model = Some((set.class.clone(), cm.clone()));
            self.adopt(&set.class, cm.clone());
            // The same model again changes nothing.
            let before = self.events.len();
            self.adopt(&set.class, cm);
            assert_eq!(self.events.len(), before);
            set.devices() + set.excluded
        }
    }
    let mut f = Fleet {
        members: (0..3)
            .map(|m| Profiles::new(&cfg(), &format!("agg-{m}")).unwrap())
            .collect(),
        pool: pool::Pool::new(&cfg()),
        model: None,
        events: Vec::new(),
    };
    for i in 0..30 {
        f.window(i, 0.0);
    }
    assert_eq!(f.fit(1), 8, "the model saw every member's devices");
    assert!(f.events.is_empty(), "identical devices: {:?}", f.events);
    // Exported once per window: nothing new to write without a new window.
    assert!(f.members.iter_mut().all(|p| p.export("x").is_empty()));
    for p in &f.members {
        let c = &p.classes()[0];
        let m = c.model.as_ref().unwrap();
        assert_eq!(
            (m.model.version, m.trainer.clone()),
            (1, Some(("agg-1".into(), 9)))
        );
        assert!(
            (2..=3).contains(&c.standings.len()),
            "this member's devices only"
        );
    }
    // Device 0's flow drifts by 0.1 per window from window 30; refits every 10 windows.
    for k in 0..6 {
        for i in 30 + 10 * k..40 + 10 * k {
            f.window(i, 0.1 * (i - 30) as f64);
        }
        f.fit(2 + k as u64);
    }
    assert_eq!(f.events.len(), 1, "one event, by the owner: {:?}", f.events);
    let (m, (_, e)) = &f.events[0];
    assert_eq!(
        (*m, e.device.as_str(), e.metric.as_str()),
        (0, "pump-0", "flow")
    );
    assert_eq!(e.agent, "agg-0");
    assert_eq!(f.members[0].classes()[0].outside[0].0, "pump-0");
    // The refits leave it out of the model (excluded, still counted in the class).
    let sets = f.pool.training_sets();
    assert_eq!((sets[0].devices(), sets[0].excluded), (7, 1));
}

/// Cluster mode: a device is never scored against class medians older than its profile. A backlog
/// replayed in a burst (the whole fleet moving while the trainer's medians lag) raises nothing;
/// once the medians reach the device's window it is scored, once.
#[test]
fn in_cluster_mode_a_device_waits_for_the_class_medians_of_its_window() {
    let mut p = Profiles::new(&cfg(), "agg-1").unwrap();
    let mut pool = pool::Pool::new(&cfg());
    let feed_all = |p: &mut Profiles, from: i64, to: i64, level: f64| {
        let mut events = Vec::new();
        for i in from..to {
            for d in 0..6 {
                for (j, m) in METRICS.iter().enumerate() {
                    let mean = BASE[j] * (level + 0.001 * wobble(d, j, i));
                    events.extend(p.observe(7, &window(&format!("pump-{d}"), m, i, mean)));
                }
            }
        }
        events
    };
    let export = |p: &mut Profiles, pool: &mut pool::Pool| {
        for r in p.export("agg-1") {
            pool.insert(&r.device, &serde_json::to_vec(&r).unwrap())
                .unwrap();
        }
    };
    feed_all(&mut p, 0, 20, 1.0);
    export(&mut p, &mut pool);
    let set = pool.training_sets().remove(0);
    let model = set.fit(&PeerOptions::default()).unwrap();
    let n = set.class.metrics.len();
    let medians: Vec<f64> = pool.class_medians()[&set.class].0.clone();
    let cm = ClassModel {
        model,
        fitted_at_ms: 1,
        trained: set.devices(),
        excluded: 0,
        medians: medians.clone(),
        trainer: Some(("agg-2".into(), 4)),
        shift: Some((vec![0.0; n], set.to_ms)),
    };
    assert!(p.adopt(&set.class, cm.clone()).is_empty());
    // The whole fleet rises by 20 % in a burst: nothing is scored against the old medians.
    assert!(feed_all(&mut p, 20, 60, 1.2).is_empty());
    let same_medians = ClassModel {
        shift: Some((vec![0.0; n], set.to_ms)),
        ..cm.clone()
    };
    assert!(
        p.adopt(&set.class, same_medians).is_empty(),
        "medians behind the devices"
    );
    let standing = |p: &Profiles| p.classes()[0].standings.clone();
    let before = standing(&p);
    // The trainer's medians reach the burst's last window: scored once, against the class's move.
    export(&mut p, &mut pool);
    let (now, at) = pool.class_medians()[&set.class].clone();
    assert_eq!(at, 60 * MIN);
    let moved = ClassModel {
        shift: Some((now.iter().zip(&medians).map(|(a, b)| a - b).collect(), at)),
        ..cm.clone()
    };
    assert!(
        p.adopt(&set.class, moved.clone()).is_empty(),
        "the class moved as one"
    );
    let after = standing(&p);
    assert_ne!(before, after, "scored");
    assert!(after.iter().all(|(_, s)| s.score < THRESHOLD), "{after:?}");
    // Without the class's move taken out, the same profiles would all be outside.
    let mut q = Profiles::new(&cfg(), "agg-1").unwrap();
    feed_all(&mut q, 0, 60, 1.0);
    feed_all(&mut q, 60, 100, 1.2);
    let unshifted = ClassModel {
        shift: Some((vec![0.0; n], i64::MAX)),
        ..cm
    };
    assert!(!q.adopt(&set.class, unshifted).is_empty());
    // Scored once per window: the same medians again score nothing new.
    let again = standing(&p);
    assert!(p.adopt(&set.class, moved).is_empty());
    assert_eq!(again, standing(&p));
}
