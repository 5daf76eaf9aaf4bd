//! The lane sender: what each outbox lane may publish now, given the time. No I/O: the uplink
//! passes `now`, the lane's stored state and a reader of its backlog in, and publishes what comes
//! out.
//!
//! Per lane a cursor says up to which seq everything was published on this connection. Records
//! appended while the lane is caught up go out at once and move the cursor (live). After a
//! reconnect ([`LaneSender::on_link_up`]), an ack timeout ([`LaneSender::expired`]: go-back-N, the
//! cursor returns to the acked seq, the timeout doubling per consecutive miss up to 60 s, with up
//! to +25 % jitter) or a restart, the lane has a backlog: [`LaneSender::plan_lane`] drains it in seq
//! order at `drain_rate` records/s (a token bucket holding at most one second) with at most
//! `max_unacked` in flight, while live records still go out at once. An ack that moves the lane
//! ([`LaneSender::on_ack`]) advances the window and resets the backoff.
//!
//! Public so that a benchmark can drive the agent's real sender: create one with
//! [`LaneSender::new`], call [`LaneSender::refill`] then [`LaneSender::plan_lane`] per lane each
//! round, [`LaneSender::on_ack`] for every ack the outbox accepted, [`LaneSender::expired`]
//! periodically, and [`LaneSender::on_link_up`] after a reconnect.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tokio::time::Instant;

/// Longest ack timeout after repeated misses.
pub const MAX_ACK_TIMEOUT: Duration = Duration::from_secs(60);

/// Settings of a [`LaneSender`].
#[derive(Debug, Clone)]
pub struct SenderSettings {
    /// First ack timeout of a lane (doubles per consecutive miss, capped at [`MAX_ACK_TIMEOUT`]).
    pub ack_timeout: Duration,
    /// Most records of one lane in flight (published, not acked) while draining a backlog.
    pub max_unacked: u64,
    /// Backlog records per second, over all lanes.
    pub drain_rate: f64,
    /// Seeds the timeout jitter (the agent uses its process id, so agents do not resend in lockstep).
    pub jitter_seed: u32,
}

/// Send state of one lane on the current connection.
#[derive(Debug)]
struct LaneSend {
    /// Every record with a seq up to this one was published on this connection (or is acked).
    cursor: u64,
    /// Records beyond the cursor already published out of order (live ones during a drain).
    live: BTreeSet<u64>,
    /// Last time the lane's ack moved (or the wait for it started).
    last_progress: Instant,
    /// Consecutive ack timeouts (the next timeout doubles with each).
    misses: u32,
}

/// A lane's stored state, as the outbox knows it.
#[derive(Debug, Clone, Copy)]
pub struct LaneState {
    /// Highest acked seq.
    pub acked: u64,
    /// The seq the next append gets.
    pub next_seq: u64,
}

/// What [`LaneSender::plan_lane`] decided for one lane.
#[derive(Debug)]
pub struct LanePlan<R> {
    /// (seq, record) to publish now, in seq order.
    pub records: Vec<(u64, R)>,
    /// How many of them came from the backlog (paced).
    pub drained: usize,
}

/// Per-lane go-back-N sender with ack timeouts, backoff and paced backlog drain (module docs).
#[derive(Debug)]
pub struct LaneSender {
    s: SenderSettings,
    lanes: BTreeMap<u32, LaneSend>,
    tokens: f64,
    refilled: Instant,
}

impl LaneSender {
    /// A sender with no lane state and an empty token bucket.
    pub fn new(s: SenderSettings, now: Instant) -> Self {
        Self {
            s,
            lanes: BTreeMap::new(),
            tokens: 0.0,
            refilled: now,
        }
    }

    /// Connected (again): every lane goes back to its acked seq, since whatever was in flight may
    /// be lost. Returns how many lanes had something in flight (resends).
    pub fn on_link_up(&mut self, now: Instant, acked: impl Fn(u32) -> u64) -> u64 {
        let mut resends = 0;
        for (&p, lane) in &mut self.lanes {
            let acked = acked(p);
            if lane.cursor > acked || !lane.live.is_empty() {
                resends += 1;
            }
            lane.cursor = acked;
            lane.live.clear();
            lane.last_progress = now;
        }
        resends
    }

    /// The outbox accepted an ack moving `partition` to `upto_seq`: the window advances and the
    /// lane's backoff resets.
    pub fn on_ack(&mut self, now: Instant, partition: u32, upto_seq: u64) {
        if let Some(lane) = self.lanes.get_mut(&partition) {
            lane.cursor = lane.cursor.max(upto_seq);
            lane.live = lane.live.split_off(&(upto_seq + 1));
            lane.last_progress = now;
            lane.misses = 0;
        }
    }

    /// The ack timeout of `partition` after `misses` consecutive misses.
    pub fn timeout_for(&self, partition: u32, misses: u32) -> Duration {
        let base = self.s.ack_timeout.saturating_mul(1 << misses.min(6));
        let base = base.min(MAX_ACK_TIMEOUT);
        // Up to +25 % jitter, different per lane and attempt, so agents do not resend in lockstep.
        let h = xxhash_rust::xxh3::xxh3_64(
            &[
                partition.to_le_bytes(),
                misses.to_le_bytes(),
                self.s.jitter_seed.to_le_bytes(),
            ]
            .concat(),
        );
        base + base.mul_f64((h % 1000) as f64 / 4000.0)
    }

    /// Go-back-N: every lane with records outstanding (`state` gives its acked seq and whether the
    /// outbox still holds records of it) whose ack is overdue returns to its acked seq. Returns
    /// those lanes as (partition, acked seq, misses so far).
    pub fn expired(
        &mut self,
        now: Instant,
        state: impl Fn(u32) -> (u64, bool),
    ) -> Vec<(u32, u64, u32)> {
        let mut expired = Vec::new();
        for (&p, lane) in &self.lanes {
            let (acked, stored) = state(p);
            let outstanding = stored && (lane.cursor > acked || !lane.live.is_empty());
            if outstanding
                && now.duration_since(lane.last_progress) >= self.timeout_for(p, lane.misses)
            {
                expired.push((p, acked));
            }
        }
        let mut out = Vec::with_capacity(expired.len());
        for (p, acked) in expired {
            if let Some(lane) = self.lanes.get_mut(&p) {
                out.push((p, acked, lane.misses + 1));
                lane.cursor = acked;
                lane.live.clear();
                lane.last_progress = now;
                lane.misses += 1;
            }
        }
        out
    }

    /// Adds the drain tokens earned since the last refill (at most one second's worth is kept).
    pub fn refill(&mut self, now: Instant) {
        let dt = now.duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + dt * self.s.drain_rate).min(self.s.drain_rate.max(1.0));
    }

    /// What lane `p` publishes now: its `fresh` records (appended since the last round; `None`
    /// when there are none or they are stale) at once, then its backlog, read with
    /// `pending(after_seq, max)` (stored records after a seq, in order), paced and windowed.
    /// `prev_of(seq)` is the seq before `seq` the lane still holds. A failed read is returned
    /// with what was planned so far; the lane waits for the next round.
    pub fn plan_lane<R, E>(
        &mut self,
        now: Instant,
        p: u32,
        state: LaneState,
        fresh: Option<Vec<(u64, R)>>,
        prev_of: impl Fn(u64) -> u64,
        pending: impl FnOnce(u64, usize) -> Result<Vec<(u64, R)>, E>,
    ) -> (LanePlan<R>, Option<E>) {
        let acked = state.acked;
        let lane = self.lanes.entry(p).or_insert_with(|| LaneSend {
            cursor: acked,
            live: BTreeSet::new(),
            last_progress: now,
            misses: 0,
        });
        let was_idle = lane.cursor <= acked && lane.live.is_empty();
        lane.cursor = lane.cursor.max(acked);
        let mut out = Vec::new();
        let mut failure = None;
        let mut drained = 0usize;
        // Live: records appended since the last round go out at once.
        if let Some(recs) = fresh {
            let caught_up = recs
                .first()
                .is_some_and(|(first, _)| prev_of(*first) <= lane.cursor);
            for (seq, rec) in recs {
                if caught_up {
                    lane.cursor = seq;
                } else {
                    lane.live.insert(seq);
                }
                out.push((seq, rec));
            }
        }
        // Drain: the backlog in seq order, paced and windowed.
        let in_flight = lane.cursor.saturating_sub(acked);
        let room = self.s.max_unacked.saturating_sub(in_flight);
        let budget = (self.tokens as u64).min(room) as usize;
        let next_seq = state.next_seq;
        if budget > 0 && lane.cursor + 1 < next_seq {
            let want = budget + lane.live.len();
            match pending(lane.cursor, want) {
                Ok(records) => {
                    let exhausted = records.len() < want;
                    let mut last = lane.cursor;
                    let mut stopped = false;
                    for (seq, rec) in records {
                        if drained >= budget {
                            stopped = true;
                            break;
                        }
                        last = seq;
                        if lane.live.contains(&seq) {
                            continue;
                        }
                        drained += 1;
                        out.push((seq, rec));
                    }
                    self.tokens -= drained as f64;
                    if exhausted && !stopped {
                        // Nothing else is stored beyond: the rest of the lane's seqs are gone.
                        last = last.max(next_seq - 1);
                    }
                    lane.cursor = last;
                    lane.live = lane.live.split_off(&(last + 1));
                }
                Err(e) => failure = Some(e),
            }
        }
        if !out.is_empty() && was_idle {
            lane.last_progress = now;
        }
        out.sort_by_key(|(seq, _)| *seq);
        (
            LanePlan {
                records: out,
                drained,
            },
            failure,
        )
    }

    /// The client refused this round's records of lane `p` from `lowest` on: the cursor goes back
    /// before them, so a later round sends them again (replays are idempotent at the owner).
    pub fn rewind(&mut self, p: u32, lowest: u64, acked: u64) {
        if let Some(lane) = self.lanes.get_mut(&p) {
            lane.cursor = lane.cursor.min(lowest - 1).max(acked);
            lane.live.retain(|&s| s < lowest);
        }
    }

    /// Whether lane `p` has records published and not yet acked on this connection.
    pub fn in_flight(&self, p: u32, acked: u64) -> bool {
        self.lanes
            .get(&p)
            .is_some_and(|l| l.cursor > acked || !l.live.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sender(max_unacked: u64, drain_rate: f64) -> (LaneSender, Clock) {
        let now = Instant::now();
        let s = LaneSender::new(
            SenderSettings {
                ack_timeout: Duration::from_secs(1),
                max_unacked,
                drain_rate,
                jitter_seed: 7,
            },
            now,
        );
        (s, Clock(now))
    }

    /// A lane holding seqs `from..=to` (no holes), acked up to `acked`.
    struct Store {
        acked: u64,
        seqs: Vec<u64>,
    }

    impl Store {
        fn new(to: u64) -> Self {
            Self {
                acked: 0,
                seqs: (1..=to).collect(),
            }
        }

        fn ack(&mut self, upto: u64) {
            self.acked = upto;
            self.seqs.retain(|&s| s > upto);
        }

        fn plan(
            &self,
            now: Instant,
            s: &mut LaneSender,
            fresh: Option<Vec<(u64, u64)>>,
        ) -> Vec<u64> {
            let state = LaneState {
                acked: self.acked,
                next_seq: self.seqs.last().map_or(self.acked + 1, |l| l + 1),
            };
            let seqs = self.seqs.clone();
            let acked = self.acked;
            let (plan, err) = s.plan_lane::<u64, ()>(
                now,
                0,
                state,
                fresh,
                |seq| if seq > 1 { (seq - 1).max(acked) } else { 0 },
                |after, want| {
                    Ok(seqs
                        .iter()
                        .filter(|&&x| x > after)
                        .take(want)
                        .map(|&x| (x, x))
                        .collect())
                },
            );
            assert!(err.is_none());
            plan.records.into_iter().map(|(seq, _)| seq).collect()
        }
    }

    /// Time is a value: the tests move it by hand.
    struct Clock(Instant);

    impl Clock {
        fn advance(&mut self, d: Duration) {
            self.0 += d;
        }
    }

    #[test]
    fn backlog_is_windowed_and_an_ack_advances_the_window() {
        let (mut s, mut c) = sender(3, 1000.0);
        let mut store = Store::new(10);
        c.advance(Duration::from_secs(1));
        s.refill(c.0);
        assert_eq!(store.plan(c.0, &mut s, None), vec![1, 2, 3], "window of 3");
        assert_eq!(
            store.plan(c.0, &mut s, None),
            Vec::<u64>::new(),
            "window full"
        );
        store.ack(2);
        s.on_ack(c.0, 0, 2);
        assert_eq!(store.plan(c.0, &mut s, None), vec![4, 5]);
    }

    #[test]
    fn go_back_n_after_an_ack_timeout_and_backoff_grows_then_resets() {
        let (mut s, mut c) = sender(100, 1000.0);
        let mut store = Store::new(5);
        c.advance(Duration::from_secs(1));
        s.refill(c.0);
        assert_eq!(store.plan(c.0, &mut s, None), vec![1, 2, 3, 4, 5]);
        let state = |_| (0, true);
        assert!(s.expired(c.0, state).is_empty(), "not yet");
        let first = s.timeout_for(0, 0);
        assert!(first >= Duration::from_secs(1) && first <= Duration::from_millis(1250));
        c.advance(first);
        assert_eq!(s.expired(c.0, state), vec![(0, 0, 1)]);
        s.refill(c.0);
        assert_eq!(
            store.plan(c.0, &mut s, None),
            vec![1, 2, 3, 4, 5],
            "resent from the ack"
        );
        // The next timeout is twice as long.
        let second = s.timeout_for(0, 1);
        assert!(second >= Duration::from_secs(2), "{second:?}");
        c.advance(first);
        assert!(s.expired(c.0, state).is_empty(), "backed off");
        c.advance(second - first);
        assert_eq!(s.expired(c.0, state), vec![(0, 0, 2)]);
        assert!(
            s.timeout_for(0, 40) <= MAX_ACK_TIMEOUT.mul_f64(1.25),
            "capped"
        );
        // An ack resets the backoff.
        s.refill(c.0);
        store.plan(c.0, &mut s, None);
        store.ack(3);
        s.on_ack(c.0, 0, 3);
        c.advance(first);
        assert_eq!(
            s.expired(c.0, |_| (3, true)),
            vec![(0, 3, 1)],
            "first timeout again"
        );
    }

    #[test]
    fn a_reconnect_resends_from_the_last_ack() {
        let (mut s, mut c) = sender(100, 1000.0);
        let mut store = Store::new(5);
        c.advance(Duration::from_secs(1));
        s.refill(c.0);
        assert_eq!(store.plan(c.0, &mut s, None), vec![1, 2, 3, 4, 5]);
        store.ack(2);
        s.on_ack(c.0, 0, 2);
        assert_eq!(s.on_link_up(c.0, |_| 2), 1, "one lane resent");
        s.refill(c.0);
        assert_eq!(store.plan(c.0, &mut s, None), vec![3, 4, 5]);
        store.ack(5);
        s.on_ack(c.0, 0, 5);
        assert_eq!(s.on_link_up(c.0, |_| 5), 0, "nothing in flight");
    }

    #[test]
    fn the_backlog_is_paced_while_live_records_go_out_at_once() {
        let (mut s, mut c) = sender(1000, 10.0);
        let mut store = Store::new(100);
        c.advance(Duration::from_millis(500));
        s.refill(c.0);
        // Record 101 is appended now: it goes out at once, with 5 paced backlog records.
        store.seqs.push(101);
        assert_eq!(
            store.plan(c.0, &mut s, Some(vec![(101, 101)])),
            vec![1, 2, 3, 4, 5, 101]
        );
        assert_eq!(
            store.plan(c.0, &mut s, None),
            Vec::<u64>::new(),
            "no tokens left"
        );
        c.advance(Duration::from_millis(300));
        s.refill(c.0);
        assert_eq!(store.plan(c.0, &mut s, None), vec![6, 7, 8]);
        // At most one second of tokens accumulates.
        c.advance(Duration::from_secs(60));
        s.refill(c.0);
        assert_eq!(store.plan(c.0, &mut s, None).len(), 10);
    }
}
