//! A model-based test of incremental (and full) checkpoints, free of I/O: random window puts
//! (new, revised, duplicate, out of order, evicting), lane moves and drops, checkpoint writes that
//! succeed, fail, time out and land (at once or later, or never), and take-overs folding the chain
//! as a new owner does, against a fake checkpoint key with the KV's compare-and-set. The chain must
//! always fold to what its last writer held when it made the record that landed last.

use super::*;
use crate::cluster::checkpoint::{resync, take_over_compacts, TakeOverWrite, CHAIN_HISTORY};
use proptest::prelude::*;

/// One record of the key.
#[derive(Debug, Clone)]
struct Record {
    revision: u64,
    kind: Kind,
    epoch: u64,
    payload: Vec<u8>,
}

/// (epoch, revision) of a key's last record.
type Head = (u64, u64);

/// A partition's checkpoint key in a bucket keeping [`CHAIN_HISTORY`] values per key, written by
/// compare-and-set on its last revision (0: no record yet, `create`).
#[derive(Debug, Default)]
struct Key {
    records: Vec<Record>,
    /// The stream's last sequence (other keys share it: revisions of one key jump).
    last: u64,
}

impl Key {
    /// (epoch, revision) of the last record.
    fn head(&self) -> Option<(u64, u64)> {
        self.records.last().map(|r| (r.epoch, r.revision))
    }

    fn update(&mut self, expected: u64, kind: Kind, epoch: u64, payload: &[u8]) -> Option<u64> {
        if self.head().map_or(0, |(_, r)| r) != expected {
            return None;
        }
        self.last += 1 + self.last % 3;
        self.records.push(Record {
            revision: self.last,
            kind,
            epoch,
            payload: payload.to_vec(),
        });
        // The per-subject limit drops the oldest.
        while self.records.len() > CHAIN_HISTORY as usize {
            self.records.remove(0);
        }
        Some(self.last)
    }

    /// A write nats-server accepts whatever its expected revision: one of two that expected the
    /// same revision and passed the server's check together (nats-server 2.9, issue 4320).
    fn force(&mut self, kind: Kind, epoch: u64, payload: &[u8]) -> u64 {
        let expected = self.head().map_or(0, |(_, r)| r);
        self.update(expected, kind, epoch, payload)
            .expect("the head expected")
    }

    /// A record after `after` and before `before`, as `KvCheckpoints::landed_between` looks.
    fn landed_between(&self, after: u64, before: u64) -> Option<u64> {
        self.records
            .iter()
            .map(|r| r.revision)
            .find(|&r| r > after && r < before)
    }

    fn purge_before(&mut self, revision: u64) {
        self.records.retain(|r| r.revision >= revision);
    }

    /// What `read_chain` reads: the last base and the deltas after it.
    fn chain(&self) -> Result<Option<(Chain, Head)>, String> {
        self.chain_before(None)
    }

    /// [`Key::chain`] of the records before revision `before`.
    fn chain_before(&self, before: Option<u64>) -> Result<Option<(Chain, Head)>, String> {
        let records: Vec<&Record> = self
            .records
            .iter()
            .filter(|r| before.is_none_or(|b| r.revision < b))
            .collect();
        let Some(head) = records.last().map(|r| (r.epoch, r.revision)) else {
            return Ok(None);
        };
        let Some(at) = records.iter().rposition(|r| r.kind == Kind::Base) else {
            return Err("a delta record without a base before it".into());
        };
        let records = &records[..];
        let base = records[at];
        let mut chain = Chain {
            base: base.payload.clone().into(),
            deltas: Vec::new(),
            bytes: base.payload.len() + 9,
        };
        for r in &records[at + 1..] {
            chain.deltas.push(r.payload.clone().into());
            chain.bytes += r.payload.len() + 9;
        }
        Ok(Some((chain, head)))
    }

    /// A checkpoint write as `KvCheckpoints::write` / `write_delta` make it.
    fn write(&mut self, fence: &mut CheckpointFence, kind: Kind, payload: &[u8]) -> bool {
        let mut landed = self.update(fence.revision, kind, fence.epoch, payload);
        if landed.is_none() {
            if let Some((epoch, revision)) = self.head() {
                if resync(fence, epoch, revision) {
                    landed = self.update(fence.revision, kind, fence.epoch, payload);
                }
            }
        }
        let Some(revision) = landed else {
            return false;
        };
        fence.revision = revision;
        if kind == Kind::Base {
            self.purge_before(revision);
        }
        true
    }
}

/// How a checkpoint write ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Written and acknowledged.
    Ok,
    /// Never reached the KV (an error).
    Lost,
    /// Landed, but the answer never came (a timeout).
    Landed,
    /// Still on its way when the owner gave up: it may land later ([`Op::Land`]).
    InFlight,
}

/// What races a take-over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Race {
    /// Nothing.
    None,
    /// The write in flight, if any, lands between the take-over's read and its write.
    InFlight,
    /// A write of the previous owner expecting the same revision as the take-over's lands just
    /// before it, and is acknowledged.
    Before,
    /// The same, landing just after it.
    After,
}

#[derive(Debug, Clone)]
enum Op {
    /// A window of series `series` starting at `start` (× 1 s), at `revision`.
    Put { series: u8, start: i8, revision: u8 },
    /// Lane (`agent`, `epoch`) applied up to `seq`.
    Lane { agent: u8, epoch: u8, seq: u8 },
    /// Lane (`agent`, `epoch`) dropped.
    Drop { agent: u8, epoch: u8 },
    /// A checkpoint of the owner, ending as said.
    Write(Outcome),
    /// The write still in flight reaches the KV now (its compare-and-set decides).
    Land,
    /// Another member takes the partition over, racing the previous owner as `race` says.
    TakeOver { race: Race },
    /// The previous owner, not knowing it was fenced, writes once more.
    StaleWrite,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u8..6, -4i8..24, 0u8..3).prop_map(|(series, start, revision)| Op::Put { series, start, revision }),
        3 => (0u8..3, 0u8..2, 0u8..40).prop_map(|(agent, epoch, seq)| Op::Lane { agent, epoch, seq }),
        1 => (0u8..3, 0u8..2).prop_map(|(agent, epoch)| Op::Drop { agent, epoch }),
        4 => prop_oneof![
            4 => Just(Outcome::Ok),
            1 => Just(Outcome::Lost),
            1 => Just(Outcome::Landed),
            1 => Just(Outcome::InFlight),
        ].prop_map(Op::Write),
        1 => Just(Op::Land),
        1 => prop_oneof![
            Just(Race::None),
            Just(Race::InFlight),
            Just(Race::Before),
            Just(Race::After),
        ].prop_map(|race| Op::TakeOver { race }),
        1 => Just(Op::StaleWrite),
    ]
}

fn window(series: u8, start: i8, revision: u8) -> WindowSummary {
    let start_ms = i64::from(start) * 1000;
    WindowSummary {
        device: format!("dev-{series}"),
        metric: if series.is_multiple_of(2) {
            "temp"
        } else {
            "rh"
        }
        .into(),
        start_ms,
        end_ms: start_ms + 1000,
        count: 10 + u64::from(revision),
        min: 1.0,
        max: 2.0,
        mean: 1.5,
        std: 0.1,
        first_ts_ms: start_ms,
        last_ts_ms: start_ms + 900,
        max_score: 0.2,
        revision: u32::from(revision),
    }
}

/// A write on its way: who made it, what, and the state it was made from.
#[derive(Debug)]
struct InFlight {
    fence: CheckpointFence,
    kind: Kind,
    payload: Vec<u8>,
    state: PartitionState,
}

/// The world: the key, the owner, the previous owner and a write in flight.
struct Sim {
    wps: usize,
    mode: CheckpointMode,
    key: Key,
    owner: Owned,
    /// The owner before the last take-over (fenced, though it does not know).
    stale: Option<Owned>,
    in_flight: Option<InFlight>,
    /// The state the record that landed last was made from.
    landed: PartitionState,
    /// Lane seqs as of the owner's last acknowledged write (what it acked to the agents).
    acked: BTreeMap<(String, u64), u64>,
    epoch: u64,
    log: Vec<String>,
}

impl Sim {
    fn new(wps: usize, mode: CheckpointMode) -> Self {
        let fence = CheckpointFence {
            partition: 3,
            epoch: 1,
            revision: 0,
        };
        let mut sim = Self {
            wps,
            mode,
            key: Key::default(),
            owner: Owned::new(
                fence.clone(),
                &PartitionState::default(),
                wps,
                Compaction::default(),
            ),
            stale: None,
            in_flight: None,
            landed: PartitionState::default(),
            acked: BTreeMap::new(),
            epoch: 1,
            log: Vec::new(),
        };
        // The first owner's take-over of a partition never checkpointed: an empty base.
        let revision = sim.key.update(0, Kind::Base, 1, &[]).unwrap();
        sim.owner.fence.revision = revision;
        sim
    }

    fn fold(&self) -> PartitionState {
        let (chain, _) = self
            .key
            .chain()
            .unwrap_or_else(|e| panic!("chain unreadable: {e}\n{}", self.log.join("\n")))
            .expect("a chain");
        PartitionState::from_chain(&chain, self.wps)
            .unwrap_or_else(|e| panic!("chain undecodable: {e}\n{}", self.log.join("\n")))
    }

    fn check_fold(&self, what: &str, want: &PartitionState) {
        let got = self.fold();
        assert_eq!(
            &got,
            want,
            "{what}: the chain folds to something else than its writer held\n{}",
            self.log.join("\n")
        );
    }

    fn apply(&mut self, op: &Op) {
        self.log.push(format!("{op:?}"));
        match *op {
            Op::Put {
                series,
                start,
                revision,
            } => {
                let _ = self.owner.put_window(3, &window(series, start, revision));
            }
            Op::Lane { agent, epoch, seq } => {
                self.owner
                    .put_lane_seq(&format!("gw-{agent}"), u64::from(epoch), u64::from(seq));
            }
            Op::Drop { agent, epoch } => {
                self.owner
                    .drop_lane(&format!("gw-{agent}"), u64::from(epoch));
                // Forgotten on purpose (an evicted lane): it may come back from any seq.
                self.acked
                    .remove(&(format!("gw-{agent}"), u64::from(epoch)));
            }
            Op::Write(outcome) => self.write(outcome),
            Op::Land => self.land(),
            Op::TakeOver { race } => self.take_over(race),
            Op::StaleWrite => {
                if let Some(stale) = &mut self.stale {
                    if stale.dirty {
                        let (kind, payload) = stale.next_write(self.mode);
                        let mut fence = stale.fence.clone();
                        assert!(
                            !self.key.write(&mut fence, kind, &payload),
                            "a fenced owner's write landed\n{}",
                            self.log.join("\n")
                        );
                    }
                }
            }
        }
    }

    /// A checkpoint as `KvStore::checkpoint` makes it (for the one partition), ending in `outcome`.
    fn write(&mut self, outcome: Outcome) {
        if !self.owner.dirty {
            return;
        }
        let (kind, payload) = self.owner.next_write(self.mode);
        let state = self.owner.state();
        let mut fence = self.owner.fence.clone();
        let ok = match outcome {
            Outcome::Ok | Outcome::Landed => {
                let landed = self.key.write(&mut fence, kind, &payload);
                if landed {
                    self.landed = state.clone();
                    self.check_fold(&format!("{kind:?} written"), &state);
                }
                if outcome == Outcome::Landed {
                    // The answer was lost: the owner keeps its old fence.
                    fence = self.owner.fence.clone();
                    false
                } else {
                    landed
                }
            }
            Outcome::Lost => false,
            Outcome::InFlight => {
                // A newer write in flight supersedes an older one (which then never lands: its
                // compare-and-set expects a revision this one or its successors move past).
                self.in_flight = Some(InFlight {
                    fence: fence.clone(),
                    kind,
                    payload: payload.clone(),
                    state,
                });
                false
            }
        };
        self.log
            .push(format!("  -> {kind:?} of {} bytes, ok {ok}", payload.len()));
        self.owner.write_done(kind, payload.len(), fence, ok);
        if ok {
            self.acked = lanes(&self.owner.state());
        }
    }

    /// The write in flight reaches the KV: one compare-and-set on the revision it was made for.
    fn land(&mut self) {
        let Some(w) = self.in_flight.take() else {
            return;
        };
        let landed = self
            .key
            .update(w.fence.revision, w.kind, w.fence.epoch, &w.payload);
        self.log.push(format!("  -> landed: {landed:?}"));
        if let Some(revision) = landed {
            if w.kind == Kind::Base {
                self.key.purge_before(revision);
            }
            self.landed = w.state.clone();
            self.check_fold("a write landing late", &w.state);
        }
    }

    /// A new owner's take-over, as `KvCheckpoints::take_over_chain` and the node make it.
    fn take_over(&mut self, race: Race) {
        self.epoch += 1;
        let epoch = self.epoch;
        let write = match self.mode {
            CheckpointMode::Incremental => TakeOverWrite::Marker,
            CheckpointMode::Full => TakeOverWrite::Base,
        };
        let mut race = race;
        // The record this take-over wrote over records it had not read.
        let mut own: Option<u64> = None;
        let mut landed_after = false;
        for _ in 0..5 {
            let (chain, (head_epoch, head)) = self
                .key
                .chain_before(own)
                .unwrap_or_else(|e| panic!("take-over: {e}\n{}", self.log.join("\n")))
                .expect("a chain");
            assert!(head_epoch < epoch);
            let expected = own.unwrap_or(head);
            let race_now = std::mem::replace(&mut race, Race::None);
            if race_now == Race::InFlight {
                self.land();
            }
            let (kind, value, chain) =
                if own.is_some() || take_over_compacts(chain.deltas.len(), write) {
                    let state = PartitionState::from_chain(&chain, self.wps)
                        .unwrap()
                        .encode();
                    let len = state.len();
                    let chain = Chain {
                        base: state.clone().into(),
                        deltas: Vec::new(),
                        bytes: len + 9,
                    };
                    (Kind::Base, state, chain)
                } else if write == TakeOverWrite::Base {
                    let base = chain.base.to_vec();
                    (Kind::Base, base, chain)
                } else {
                    let mut chain = chain;
                    chain.deltas.push(Vec::new().into());
                    chain.bytes += 9;
                    (Kind::Delta, Vec::new(), chain)
                };
            let landed = if matches!(race_now, Race::Before | Race::After) && self.owner.dirty {
                // Both writes expected `expected` and passed the server's check together.
                let (okind, opayload) = self.owner.next_write(self.mode);
                let ostate = self.owner.state();
                let (theirs, ours) = if race_now == Race::Before {
                    let theirs = self.key.force(okind, self.owner.fence.epoch, &opayload);
                    (theirs, self.key.force(kind, epoch, &value))
                } else {
                    let ours = self.key.force(kind, epoch, &value);
                    (
                        self.key.force(okind, self.owner.fence.epoch, &opayload),
                        ours,
                    )
                };
                self.log.push(format!(
                    "  -> the previous owner's {okind:?} landed at {theirs} beside the take-over's at {ours}"
                ));
                let mut fence = self.owner.fence.clone();
                fence.revision = theirs;
                self.owner.write_done(okind, opayload.len(), fence, true);
                self.acked = lanes(&ostate);
                if okind == Kind::Base {
                    self.key.purge_before(theirs);
                }
                self.landed = ostate;
                landed_after = race_now == Race::After;
                Some(ours)
            } else {
                self.key.update(expected, kind, epoch, &value)
            };
            let Some(revision) = landed else {
                self.log
                    .push("  -> take-over conflicted; reading again".into());
                own = None;
                continue;
            };
            if let Some(other) = self.key.landed_between(expected, revision) {
                self.log.push(format!(
                    "  -> revision {other} landed beside the take-over's {revision}: again"
                ));
                own = Some(revision);
                continue;
            }
            if kind == Kind::Base {
                self.key.purge_before(revision);
            }
            let state = PartitionState::from_chain(&chain, self.wps).unwrap();
            let delta_bytes = chain.bytes.saturating_sub(chain.base.len());
            let compaction = Compaction::new(chain.base.len(), chain.deltas.len(), delta_bytes);
            let fence = CheckpointFence {
                partition: 3,
                epoch,
                revision,
            };
            let mut owner = Owned::new(fence, &state, self.wps, compaction);
            assert_eq!(owner.state(), state);
            if landed_after {
                // The previous owner's write landed on top of this take-over's record: the new
                // owner's first write is fenced (it drops the partition), and the previous owner
                // writes on until its lease runs out (a later take-over reads everything).
                owner.put_lane_seq("probe", 0, 1);
                let (kind, payload) = owner.next_write(self.mode);
                let mut fence = owner.fence.clone();
                assert!(
                    !self.key.write(&mut fence, kind, &payload),
                    "a take-over that missed the previous owner's acknowledged write writes on\n{}",
                    self.log.join("\n")
                );
                self.log
                    .push("  -> the new owner is fenced at its first write".into());
                self.stale = Some(owner);
                return;
            }
            assert_eq!(
                state,
                self.landed,
                "the new owner resumes from something else than the last record written\n{}",
                self.log.join("\n")
            );
            self.check_fold("after the take-over", &state);
            for (lane, seq) in &self.acked {
                let now = lanes(&state).get(lane).copied();
                assert!(
                    now >= Some(*seq),
                    "lane {lane:?} acked up to {seq}, resumed at {now:?}\n{}",
                    self.log.join("\n")
                );
            }
            self.stale = Some(std::mem::replace(&mut self.owner, owner));
            self.acked = lanes(&state);
            self.log
                .push(format!("  -> taken over under epoch {epoch}"));
            return;
        }
        panic!("take-over conflicted 5 times\n{}", self.log.join("\n"));
    }
}

fn lanes(s: &PartitionState) -> BTreeMap<(String, u64), u64> {
    s.lanes
        .iter()
        .map(|(a, e, seq)| ((a.clone(), *e), *seq))
        .collect()
}

/// Runs `ops` in `mode`, then checkpoints until clean and takes the partition over once more.
fn run(wps: usize, mode: CheckpointMode, ops: &[Op]) {
    let mut sim = Sim::new(wps, mode);
    for op in ops {
        sim.apply(op);
    }
    sim.apply(&Op::Write(Outcome::Ok));
    sim.apply(&Op::TakeOver { race: Race::None });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn incremental_chains_fold_to_what_their_writer_held(
        wps in 1usize..5,
        ops in prop::collection::vec(op(), 1..400),
    ) {
        run(wps, CheckpointMode::Incremental, &ops);
    }

    #[test]
    fn full_checkpoints_fold_to_what_their_writer_held(
        wps in 1usize..5,
        ops in prop::collection::vec(op(), 1..200),
    ) {
        run(wps, CheckpointMode::Full, &ops);
    }
}

/// The shrunk failing inputs of the model before take-overs checked for a write landing beside
/// theirs: an acknowledged write of the previous owner, landed just before the take-over's record
/// (both expected the same revision), is in what the new owner resumes from.
#[test]
fn a_previous_owner_s_write_landing_just_before_a_take_over_s_is_resumed_from() {
    let ops = [
        Op::Put {
            series: 0,
            start: 0,
            revision: 0,
        },
        Op::TakeOver { race: Race::Before },
    ];
    for mode in [CheckpointMode::Incremental, CheckpointMode::Full] {
        for wps in [1, 3] {
            run(wps, mode, &ops);
        }
    }
}

/// Landed just after it instead: the new owner's first write is fenced, the previous owner's
/// writes go on, and the next take-over resumes from all of them.
#[test]
fn a_previous_owner_s_write_landing_just_after_a_take_over_s_fences_the_new_owner() {
    let ops = [
        Op::Put {
            series: 0,
            start: 0,
            revision: 0,
        },
        Op::Lane {
            agent: 0,
            epoch: 0,
            seq: 3,
        },
        Op::TakeOver { race: Race::After },
        Op::StaleWrite,
        Op::Put {
            series: 1,
            start: 2,
            revision: 0,
        },
        Op::Write(Outcome::Ok),
    ];
    for mode in [CheckpointMode::Incremental, CheckpointMode::Full] {
        run(2, mode, &ops);
    }
}

/// A write that timed out, still in flight while the next one succeeds, never lands after it;
/// one that landed although its answer was lost is built on by the next.
#[test]
fn writes_that_time_out_land_only_where_they_were_made_for() {
    let put = |start| Op::Put {
        series: 0,
        start,
        revision: 0,
    };
    let ops = [
        put(0),
        Op::Write(Outcome::InFlight),
        put(1),
        Op::Write(Outcome::Ok),
        Op::Land,
        put(2),
        Op::Write(Outcome::Landed),
        put(3),
        Op::Write(Outcome::Ok),
        put(4),
        Op::Write(Outcome::InFlight),
        Op::TakeOver {
            race: Race::InFlight,
        },
        Op::StaleWrite,
    ];
    for mode in [CheckpointMode::Incremental, CheckpointMode::Full] {
        run(2, mode, &ops);
    }
}
