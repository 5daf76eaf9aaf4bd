//! The outbox's tests: lanes, epochs, reopen, the budget, checkpoint storage, and property tests
//! against an in-memory model.

use super::*;
use proptest::prelude::*;

const UNBOUNDED: OutboxConfig = OutboxConfig {
    max_outbox_bytes: u64::MAX,
    normal_score_below: 0.5,
};

fn summary_of(device: &str, start_ms: i64, values: &[f64], score: f64) -> WindowSummary {
    let mut st = RunningStats::default();
    values.iter().for_each(|&x| st.push(x));
    WindowSummary {
        device: device.into(),
        metric: "temp".into(),
        start_ms,
        end_ms: start_ms + 10_000,
        count: st.count,
        min: st.min,
        max: st.max,
        mean: st.mean,
        std: st.std(),
        first_ts_ms: start_ms + 1,
        last_ts_ms: start_ms + 9_999,
        max_score: score,
        revision: 0,
    }
}

fn summary(device: &str, start_ms: i64) -> Record {
    Record::Summary(summary_of(device, start_ms, &[1.0, 2.0, 4.0], 0.1))
}

fn anomaly(device: &str, ts_ms: i64) -> Record {
    Record::Anomaly(AnomalyEvent {
        phase: edgewatch_models::wire::EventPhase::Onset,
        model_version: None,
        id: edgewatch_models::wire::event_id(device, "temp", ts_ms, "zscore"),
        device: device.into(),
        metric: "temp".into(),
        ts_ms,
        value: 99.5,
        score: 0.97,
        detector: "zscore".into(),
        window_start_ms: ts_ms - ts_ms % 10_000,
        agent: "gw-1".into(),
    })
}

fn seqs(ob: &Outbox, partition: u32) -> Vec<u64> {
    ob.pending(partition, 0, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect()
}

#[test]
fn outbox_can_move_to_a_blocking_thread() {
    fn assert_send<T: Send + 'static>() {}
    assert_send::<Outbox>();
    assert_send::<OutboxError>();
}

#[test]
fn seqs_start_at_one_and_increase_per_lane() {
    let dir = tempfile::tempdir().unwrap();
    let mut ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
    assert_eq!(ob.next_seq(3), 1);
    assert_eq!(ob.append(3, summary("a", 0)).unwrap(), 1);
    assert_eq!(ob.append(3, anomaly("a", 5)).unwrap(), 2);
    assert_eq!(ob.append(7, summary("b", 0)).unwrap(), 1);
    assert_eq!(ob.append(3, summary("a", 10_000)).unwrap(), 3);
    assert_eq!(ob.lanes(), vec![3, 7]);
    assert_eq!(seqs(&ob, 3), vec![1, 2, 3]);
    assert_eq!(ob.next_seq(3), 4);
    assert_eq!(ob.next_seq(7), 2);
    assert_eq!(ob.stats().appended, 4);
    assert_eq!(ob.stats().anomalies_kept, 1);
}

#[test]
fn ack_removes_up_to_seq_and_is_cumulative_and_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let mut ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
    for i in 0..5 {
        ob.append(1, summary("a", i * 10_000)).unwrap();
    }
    ob.append(2, summary("b", 0)).unwrap();
    ob.expose(1, 5).unwrap();
    let before = ob.bytes();
    assert_eq!(ob.ack(1, 2).unwrap(), 2);
    assert_eq!(seqs(&ob, 1), vec![3, 4, 5]);
    assert_eq!(ob.ack(1, 2).unwrap(), 0, "repeating an ack removes nothing");
    assert_eq!(ob.ack(1, 4).unwrap(), 2);
    assert_eq!(seqs(&ob, 1), vec![5]);
    assert_eq!(ob.acked_seq(1), 4);
    assert_eq!(seqs(&ob, 2), vec![1], "other lanes untouched");
    assert!(ob.bytes() < before);
    assert_eq!(ob.stats().acked, 4);
    assert_eq!(ob.pending(1, 4, 10).unwrap().len(), 1);
    assert_eq!(ob.pending(1, 5, 10).unwrap().len(), 0);
}

#[test]
fn stale_ack_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let mut ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
    for i in 0..3 {
        ob.append(0, summary("a", i * 10_000)).unwrap();
    }
    ob.expose(0, 3).unwrap();
    ob.ack(0, 2).unwrap();
    assert_eq!(ob.ack(0, 1).unwrap(), 0);
    assert_eq!(ob.ack(0, 0).unwrap(), 0);
    assert_eq!(ob.ack(9, 0).unwrap(), 0);
    assert_eq!(ob.lanes(), vec![0], "an empty ack creates no lane");
    assert_eq!(ob.acked_seq(0), 2);
    assert_eq!(seqs(&ob, 0), vec![3]);
}

#[test]
fn ack_above_the_exposed_seq_is_refused_and_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
    for i in 0..5 {
        ob.append(0, summary("a", i * 10_000)).unwrap();
    }
    let refused = |r: Result<usize, OutboxError>| match r {
        Err(e @ OutboxError::AckAhead { .. }) => e.to_string(),
        other => panic!("expected a refusal, got {other:?}"),
    };
    // Nothing sent yet: no ack can be true.
    let msg = refused(ob.ack(0, 1));
    assert!(
        msg.contains("up to seq 1 refused: only seqs up to 0"),
        "{msg}"
    );
    ob.expose(0, 3).unwrap();
    refused(ob.ack(0, 4));
    refused(ob.ack(0, u64::MAX));
    refused(ob.ack(7, 1));
    assert_eq!(seqs(&ob, 0), vec![1, 2, 3, 4, 5], "nothing deleted");
    assert_eq!(
        (ob.acked_seq(0), ob.next_seq(0)),
        (0, 6),
        "the lane did not move"
    );
    assert_eq!(ob.ack(0, 3).unwrap(), 3);
    // Exposure never passes what was appended, so neither can an ack.
    ob.expose(0, 1_000).unwrap();
    assert_eq!(ob.exposed_seq(0), 5);
    refused(ob.ack(0, 6));
    assert_eq!(ob.ack(0, 5).unwrap(), 2);
    assert_eq!(ob.append(0, summary("a", 90_000)).unwrap(), 6);
}

#[test]
fn the_epoch_is_drawn_once_stored_and_kept_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let epoch = {
        let mut ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
        assert!(!ob.is_temporary());
        ob.append(0, summary("a", 0)).unwrap();
        ob.epoch()
    };
    assert_ne!(epoch, LEGACY_EPOCH);
    let ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
    assert_eq!(ob.epoch(), epoch);
    drop(ob);
    // A wiped directory is a new outbox: seqs start again at 1, in a new epoch.
    let other = tempfile::tempdir().unwrap();
    let fresh = Outbox::open(other.path(), UNBOUNDED).unwrap();
    assert_ne!(fresh.epoch(), epoch);
    assert_ne!(fresh.epoch(), LEGACY_EPOCH);
}

#[test]
fn temporary_outboxes_have_a_new_epoch_every_time() {
    let a = Outbox::open_temporary(UNBOUNDED).unwrap();
    let b = Outbox::open_temporary(UNBOUNDED).unwrap();
    assert!(a.is_temporary());
    assert_ne!(a.epoch(), b.epoch());
    assert!(a.epoch() != LEGACY_EPOCH && b.epoch() != LEGACY_EPOCH);
}

#[test]
fn an_outbox_from_before_epochs_keeps_the_legacy_epoch_and_its_lanes() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
        for i in 0..3 {
            ob.append(4, summary("a", i * 10_000)).unwrap();
        }
        // What an older version left: no epoch, and 16-byte lane meta (no exposure).
        ob.db.drop_tree(EPOCH_TREE).unwrap();
        let mut v = [0u8; 16];
        v[..8].copy_from_slice(&1u64.to_be_bytes());
        v[8..].copy_from_slice(&4u64.to_be_bytes());
        ob.meta.insert(4u32.to_be_bytes(), &v).unwrap();
        ob.flush().unwrap();
    }
    let mut ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
    assert_eq!(ob.epoch(), LEGACY_EPOCH);
    assert_eq!((ob.acked_seq(4), ob.next_seq(4)), (1, 4));
    assert_eq!(ob.exposed_seq(4), 3, "everything stored may have been sent");
    assert_eq!(ob.ack(4, 3).unwrap(), 2);
    // An older version rewrote such a lane with exposure u64::MAX: still bounded by the next seq.
    let mut v = [0u8; 24];
    v[..8].copy_from_slice(&3u64.to_be_bytes());
    v[8..16].copy_from_slice(&4u64.to_be_bytes());
    v[16..].copy_from_slice(&u64::MAX.to_be_bytes());
    ob.meta.insert(4u32.to_be_bytes(), &v).unwrap();
    ob.flush().unwrap();
    drop(ob);
    let mut ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
    assert_eq!(ob.epoch(), LEGACY_EPOCH);
    assert_eq!(ob.exposed_seq(4), 3);
    assert!(matches!(
        ob.ack(4, 1_000),
        Err(OutboxError::AckAhead { .. })
    ));
    assert_eq!(ob.append(4, summary("a", 90_000)).unwrap(), 4);
}

#[test]
fn reopen_restores_next_seq_acked_seq_and_pending_records() {
    let dir = tempfile::tempdir().unwrap();
    let (pending, bytes) = {
        let mut ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
        for i in 0..4 {
            ob.append(5, summary("a", i * 10_000)).unwrap();
        }
        ob.append(5, anomaly("a", 7)).unwrap();
        ob.append(9, summary("b", 0)).unwrap();
        ob.expose(9, 1).unwrap();
        ob.expose(5, 2).unwrap();
        ob.ack(9, 1).unwrap();
        ob.ack(5, 2).unwrap();
        ob.flush().unwrap();
        (ob.pending(5, 0, 100).unwrap(), ob.bytes())
    };
    let mut ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
    assert_eq!(ob.lanes(), vec![5, 9]);
    assert_eq!(ob.acked_seq(5), 2);
    assert_eq!(ob.acked_seq(9), 1);
    assert_eq!(ob.next_seq(5), 6);
    assert_eq!(ob.next_seq(9), 2);
    assert_eq!(ob.pending(5, 0, 100).unwrap(), pending);
    assert_eq!(ob.bytes(), bytes);
    assert_eq!(ob.stats().anomalies_kept, 1);
    assert_eq!(ob.append(9, summary("b", 10_000)).unwrap(), 2);
}

#[test]
fn coarsening_merges_exactly_and_keeps_seq_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
    let values: Vec<Vec<f64>> = vec![
        vec![1.5, 2.25, 3.0],
        vec![10.0],
        vec![-4.0, 7.5, 7.5, 0.125],
    ];
    // Lane 0: a0 a1 (anomaly) b0 a2 a-anomalous(gap-free but score high) a4
    ob.append(0, Record::Summary(summary_of("a", 0, &values[0], 0.1)))
        .unwrap();
    ob.append(0, Record::Summary(summary_of("a", 10_000, &values[1], 0.2)))
        .unwrap();
    ob.append(0, anomaly("a", 15_000)).unwrap();
    ob.append(0, summary("b", 0)).unwrap();
    ob.append(0, Record::Summary(summary_of("a", 20_000, &values[2], 0.3)))
        .unwrap();
    ob.append(0, Record::Summary(summary_of("a", 30_000, &[1.0], 0.9)))
        .unwrap();
    ob.append(0, Record::Summary(summary_of("a", 40_000, &[1.0], 0.1)))
        .unwrap();
    let before = ob.bytes();
    ob.cfg.max_outbox_bytes = before - 1;
    ob.reclaim().unwrap();

    assert_eq!(ob.stats().coarsened, 2);
    assert_eq!(ob.stats().evicted, 0);
    assert!(ob.bytes() < before);
    let pending = ob.pending(0, 0, 100).unwrap();
    let got: Vec<u64> = pending.iter().map(|(s, _)| *s).collect();
    assert_eq!(got, vec![1, 3, 4, 6, 7], "the run keeps its lowest seq");
    let Record::Summary(m) = &pending[0].1 else {
        panic!("seq 1 must be a summary")
    };
    let mut want = RunningStats::default();
    values.iter().flatten().for_each(|&x| want.push(x));
    assert_eq!((m.start_ms, m.end_ms), (0, 30_000));
    assert_eq!(m.count, want.count);
    assert_eq!((m.min, m.max), (want.min, want.max));
    assert!(
        (m.mean - want.mean).abs() < 1e-12,
        "{} vs {}",
        m.mean,
        want.mean
    );
    assert!(
        (m.std - want.std()).abs() < 1e-12,
        "{} vs {}",
        m.std,
        want.std()
    );
    assert_eq!((m.first_ts_ms, m.last_ts_ms), (1, 29_999));
    assert_eq!(m.max_score, 0.3);
    // Survives reopen, and the next seq is not reused.
    drop(ob);
    let mut ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
    assert_eq!(ob.pending(0, 0, 100).unwrap(), pending);
    assert_eq!(ob.append(0, summary("a", 50_000)).unwrap(), 8);
}

#[test]
fn eviction_removes_oldest_summaries_and_never_anomalies() {
    let dir = tempfile::tempdir().unwrap();
    let mut ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
    // Gaps between windows: nothing can be coarsened.
    for i in 0..6 {
        ob.append(0, summary("a", i * 20_000)).unwrap();
        ob.append(1, anomaly("b", i)).unwrap();
    }
    let one = ob.bytes() / 12;
    ob.cfg.max_outbox_bytes = ob.bytes() - 1;
    ob.reclaim().unwrap();
    assert_eq!(ob.stats().coarsened, 0);
    assert!(ob.stats().evicted >= 1);
    assert_eq!(ob.stats().evicted_readings, 3 * ob.stats().evicted);
    let left = seqs(&ob, 0);
    assert_eq!(
        left.first(),
        Some(&(ob.stats().evicted + 1)),
        "oldest go first"
    );
    assert_eq!(seqs(&ob, 1).len(), 6);
    assert!(ob.bytes() <= ob.target());

    // Anomalies alone over budget: all summaries go, every anomaly stays.
    ob.cfg.max_outbox_bytes = one;
    ob.append(1, anomaly("b", 100)).unwrap();
    assert!(seqs(&ob, 0).is_empty());
    assert_eq!(seqs(&ob, 1), (1..=7).collect::<Vec<_>>());
    assert_eq!(ob.stats().anomalies_kept, 7);
    assert_eq!(ob.stats().over_budget, 1);
    assert_eq!(ob.stats().evicted, 6);
    // Eviction of a lane's newest record does not make its seq reusable.
    drop(ob);
    let mut ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
    assert_eq!(ob.append(0, summary("a", 0)).unwrap(), 7);
}

fn training(device: &str, from_ms: i64) -> Record {
    Record::Training(edgewatch_models::wire::TrainingSample {
        device: device.into(),
        features: vec!["flow".into(), "temp".into()],
        from_ms,
        to_ms: from_ms + 3_600_000,
        seen: 100,
        anomalies: 0,
        rows: (0..40).map(|i| vec![i as f64, 2.0 * i as f64]).collect(),
    })
}

/// Training samples live in their own lanes, go before any summary when space is short, and never
/// take more than their share of the budget; their lane's seqs stay unique across reopen.
#[test]
fn training_samples_are_evicted_first_and_bounded_to_their_share() {
    use edgewatch_models::wire::{lane_id, LaneKind};
    let dir = tempfile::tempdir().unwrap();
    let mut ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
    let lane = lane_id(0, LaneKind::Training).unwrap();
    for i in 0..4 {
        ob.append(0, summary("a", i * 20_000)).unwrap();
        ob.append(lane, training("a", i * 3_600_000)).unwrap();
    }
    assert_eq!(seqs(&ob, lane), vec![1, 2, 3, 4]);
    assert_eq!(seqs(&ob, 0), vec![1, 2, 3, 4]);
    // Short of space: samples go, oldest first, and no summary.
    ob.cfg.max_outbox_bytes = ob.bytes() - 1;
    ob.reclaim().unwrap();
    assert_eq!(ob.stats().evicted, 0);
    assert!(ob.stats().training_evicted >= 1);
    let left = seqs(&ob, lane);
    assert_eq!(left.last(), Some(&4), "the newest sample stays");
    assert_eq!(left.len() as u64, 4 - ob.stats().training_evicted);
    assert_eq!(seqs(&ob, 0).len(), 4);
    // Over their share (10 % of the budget): the oldest go at the next append, whatever the rest.
    let one = ob.bytes() / 8;
    ob.cfg.max_outbox_bytes = one * 100;
    let before = ob.stats().training_evicted;
    for i in 4..40 {
        ob.append(lane, training("a", i * 3_600_000)).unwrap();
    }
    assert!(
        ob.training_bytes <= ob.training_budget(),
        "{} > {}",
        ob.training_bytes,
        ob.training_budget()
    );
    assert!(ob.stats().training_evicted > before);
    assert_eq!(seqs(&ob, 0).len(), 4, "summaries untouched");
    drop(ob);
    let mut ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
    assert_eq!(
        ob.append(lane, training("a", 0)).unwrap(),
        41,
        "no seq reused"
    );
    // A sample holding a non-finite value is refused like any record.
    let Record::Training(mut bad) = training("a", 0) else {
        unreachable!()
    };
    bad.rows[3][1] = f64::NAN;
    let err = ob.append(lane, Record::Training(bad)).unwrap_err();
    assert!(err.to_string().contains("rows"), "{err}");
}

#[test]
fn corrupt_value_is_reported_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
    ob.append(2, summary("a", 0)).unwrap();
    ob.records_tree()
        .insert(key(2, 1), &b"\x00garbage"[..])
        .unwrap();
    let err = ob.pending(2, 0, 10).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(
        err,
        OutboxError::Corrupt {
            partition: 2,
            seq: 1,
            ..
        }
    ));
    assert!(msg.contains("000000020000000000000001"), "{msg}");
    assert!(msg.contains("not retryable"), "{msg}");
    assert!(!err.is_retryable());
    ob.flush().unwrap();
    drop(ob);
    let err = Outbox::open(dir.path(), UNBOUNDED).err().unwrap();
    assert!(err.to_string().contains("partition 2, seq 1"), "{err}");
}

#[test]
fn non_finite_values_and_bad_config_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let bad = OutboxConfig {
        max_outbox_bytes: 0,
        normal_score_below: 0.5,
    };
    assert!(matches!(
        Outbox::open(dir.path(), bad),
        Err(OutboxError::InvalidConfig(_))
    ));
    let mut ob = Outbox::open(dir.path(), UNBOUNDED).unwrap();
    let mut s = summary_of("a", 0, &[1.0], 0.1);
    s.std = f64::NAN;
    let err = ob.append(0, Record::Summary(s)).unwrap_err();
    assert!(err.to_string().contains("field std is NaN"), "{err}");
    assert_eq!(ob.next_seq(0), 1);
}

// ---- property tests against an in-memory model ----

#[derive(Debug, Clone)]
enum Op {
    Summary {
        lane: u32,
        series: u8,
        gap: bool,
        values: Vec<i16>,
        anomalous: bool,
    },
    Anomaly {
        lane: u32,
    },
    Flush,
    Ack {
        lane: u32,
        back: u64,
    },
    Reopen,
}

fn op(acks: bool) -> impl Strategy<Value = Op> {
    let summary = (
        0..4u32,
        0..2u8,
        prop::bool::weighted(0.2),
        prop::collection::vec(any::<i16>(), 1..5),
        prop::bool::weighted(0.2),
    )
        .prop_map(|(lane, series, gap, values, anomalous)| Op::Summary {
            lane,
            series,
            gap,
            values,
            anomalous,
        });
    let ack_weight = if acks { 2 } else { 0 };
    prop_oneof![
        6 => summary,
        2 => (0..4u32).prop_map(|lane| Op::Anomaly { lane }),
        1 => Just(Op::Flush),
        ack_weight => (0..4u32, 0..6u64).prop_map(|(lane, back)| Op::Ack { lane, back }),
        1 => Just(Op::Reopen),
    ]
}

/// Turns ops into records with contiguous windows per (lane, series) unless `gap`.
struct Gen {
    next_start: HashMap<(u32, u8), i64>,
    ts: i64,
}

impl Gen {
    fn record(&mut self, op: &Op) -> Option<(u32, Record)> {
        self.ts += 1;
        match op {
            Op::Summary {
                lane,
                series,
                gap,
                values,
                anomalous,
            } => {
                let start = self.next_start.entry((*lane, *series)).or_insert(0);
                if *gap {
                    *start += 10_000;
                }
                let xs: Vec<f64> = values.iter().map(|&v| f64::from(v) / 8.0).collect();
                let score = if *anomalous { 0.9 } else { 0.1 };
                let s = summary_of(&format!("dev-{series}"), *start, &xs, score);
                *start += 10_000;
                Some((*lane, Record::Summary(s)))
            }
            Op::Anomaly { lane } => Some((*lane, anomaly("dev-0", self.ts))),
            _ => None,
        }
    }
}

#[derive(Default)]
struct Model {
    lanes: BTreeMap<u32, (u64, u64, BTreeMap<u64, Record>)>, // acked, next, records
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn outbox_matches_an_in_memory_model(ops in prop::collection::vec(op(true), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Some(Outbox::open(dir.path(), UNBOUNDED).unwrap_or_else(|e| panic!("reopen: {e:?}")));
        let mut model = Model::default();
        let mut gen = Gen { next_start: HashMap::new(), ts: 0 };
        for op in &ops {
            let o = ob.as_mut().unwrap();
            match op {
                Op::Flush => o.flush().unwrap(),
                Op::Reopen => {
                    drop(ob.take());
                    ob = Some(Outbox::open(dir.path(), UNBOUNDED).unwrap_or_else(|e| panic!("reopen: {e:?}")));
                }
                Op::Ack { lane, back } => {
                    let lm = model.lanes.entry(*lane).or_insert((0, 1, BTreeMap::new()));
                    let upto = lm.1.saturating_sub(*back);
                    // The uplink exposes what it publishes; an owner acks only that.
                    o.expose(*lane, upto).unwrap();
                    if upto >= lm.1 {
                        // Never appended, so never sent: refused, and nothing changes.
                        let refused = matches!(o.ack(*lane, upto), Err(OutboxError::AckAhead { .. }));
                        prop_assert!(refused, "ack of unsent seq {} accepted", upto);
                    } else {
                        let removed_model = if upto > lm.0 {
                            lm.0 = upto;
                            let keep = lm.2.split_off(&(upto + 1));
                            std::mem::replace(&mut lm.2, keep).len()
                        } else {
                            0
                        };
                        prop_assert_eq!(o.ack(*lane, upto).unwrap(), removed_model);
                    }
                }
                _ => {
                    let (lane, record) = gen.record(op).unwrap();
                    let lm = model.lanes.entry(lane).or_insert((0, 1, BTreeMap::new()));
                    let seq = o.append(lane, record.clone()).unwrap();
                    prop_assert_eq!(seq, lm.1, "seqs are never reused");
                    lm.1 += 1;
                    lm.2.insert(seq, record);
                }
            }
            let o = ob.as_ref().unwrap();
            for (lane, (acked, next, records)) in &model.lanes {
                let want: Vec<(u64, Record)> = records.iter().map(|(s, r)| (*s, r.clone())).collect();
                prop_assert_eq!(o.pending(*lane, 0, usize::MAX).unwrap(), want);
                prop_assert_eq!(o.next_seq(*lane), *next);
                prop_assert_eq!(o.acked_seq(*lane), *acked);
            }
        }
    }

}

// sled takes ~20 ms to open in a debug build: fewer, longer cases keep this test near 3 s.
proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn small_budget_keeps_every_anomaly_and_every_reading_not_evicted(
        ops in prop::collection::vec(op(false), 1..50),
        max_outbox_bytes in 1_500u64..6_000,
    ) {
        let cfg = OutboxConfig { max_outbox_bytes, normal_score_below: 0.5 };
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Some(Outbox::open(dir.path(), cfg.clone()).unwrap());
        let mut gen = Gen { next_start: HashMap::new(), ts: 0 };
        let mut anomalies: BTreeMap<u32, Vec<Record>> = BTreeMap::new();
        let (mut readings, mut evicted_before) = (0u64, 0u64);
        for op in &ops {
            let o = ob.as_mut().unwrap();
            match op {
                Op::Flush => o.flush().unwrap(),
                Op::Reopen => {
                    let bytes = o.bytes();
                    evicted_before += o.stats().evicted_readings;
                    drop(ob.take());
                    let o = Outbox::open(dir.path(), cfg.clone()).unwrap_or_else(|e| panic!("reopen: {e:?}"));
                    prop_assert_eq!(o.bytes(), bytes);
                    ob = Some(o);
                }
                _ => {
                    let (lane, record) = gen.record(op).unwrap();
                    match &record {
                        Record::Summary(s) => readings += s.count,
                        Record::Anomaly(_) => anomalies.entry(lane).or_default().push(record.clone()),
                        Record::Training(_) => {}
                    }
                    o.append(lane, record).unwrap();
                }
            }
            let o = ob.as_ref().unwrap();
            let mut stored = 0;
            let mut summaries = 0;
            for lane in o.lanes() {
                let pending = o.pending(lane, 0, usize::MAX).unwrap();
                prop_assert!(pending.windows(2).all(|w| w[0].0 < w[1].0));
                let kept: Vec<Record> = pending.iter().filter(|(_, r)| matches!(r, Record::Anomaly(_))).map(|(_, r)| r.clone()).collect();
                let want = anomalies.get(&lane).cloned().unwrap_or_default();
                prop_assert_eq!(kept, want);
                for (_, r) in &pending {
                    if let Record::Summary(s) = r {
                        stored += s.count;
                        summaries += 1;
                    }
                }
            }
            prop_assert_eq!(stored, readings - evicted_before - o.stats().evicted_readings);
            prop_assert!(o.bytes() <= max_outbox_bytes || summaries == 0,
                "{} bytes over {} with {} summaries left", o.bytes(), max_outbox_bytes, summaries);
        }
    }
}
