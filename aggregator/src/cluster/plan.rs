//! The coordinator's decisions without any I/O: which partitions a member takes, renews, gives
//! back or drops, given the time, the member list and the outcome of each lease operation.
//!
//! [`Plan`] holds the leases this member owns and the heartbeat schedule; the coordinator
//! ([`super::node`]) feeds it what NATS answered and executes the [`Action`]s it returns.

use super::lease::{wanted, Lease, LeaseTiming};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// What the coordinator should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Write this member's heartbeat.
    Heartbeat,
    /// Renew this held lease; report the outcome with [`Plan::renewed`].
    Renew(Lease),
    /// Give the partition back (final checkpoint, acks, release); already no longer held.
    GiveBack(Lease),
    /// Try to win the partition's lease; report a win with [`Plan::taken`].
    Take(u32),
}

/// How a renewal ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Renewal {
    /// Renewed: the lease under its new revision.
    Renewed(Lease),
    /// The revision is no longer current: expired or taken over.
    Lost,
    /// The KV did not answer or failed otherwise: the lease may still be ours.
    Failed,
}

/// What to do with a lease after its renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Still held (renewed, or not renewed but still valid locally: retried next heartbeat).
    Keep,
    /// No longer ours: drop the partition at once, for this reason.
    Drop(&'static str),
}

/// The ownership plan of one member.
#[derive(Debug)]
pub(crate) struct Plan {
    id: String,
    partitions: u32,
    timing: LeaseTiming,
    period: Duration,
    next_heartbeat: Option<Instant>,
    held: BTreeMap<u32, Lease>,
}

impl Plan {
    /// The plan of member `id` over `partitions` partitions, heartbeating every `heartbeat`, with
    /// leases trusted locally for as long as `timing` says.
    pub(crate) fn new(id: &str, partitions: u32, timing: LeaseTiming, heartbeat: Duration) -> Self {
        Self {
            id: id.to_string(),
            partitions,
            timing,
            period: heartbeat,
            next_heartbeat: None,
            held: BTreeMap::new(),
        }
    }

    /// The leases held, by partition.
    pub(crate) fn held(&self) -> impl Iterator<Item = &Lease> {
        self.held.values()
    }

    /// Whether partition `p` is held.
    #[cfg(test)]
    pub(crate) fn holds(&self, p: u32) -> bool {
        self.held.contains_key(&p)
    }

    /// The start of a round at `now`: a heartbeat and the renewal of every held lease when the
    /// heartbeat is due (one period after the previous, or after the first round's start), else
    /// nothing. The first call only starts the schedule: the first heartbeat is sent before it.
    pub(crate) fn round(&mut self, now: Instant) -> Vec<Action> {
        let Some(next) = self.next_heartbeat else {
            self.next_heartbeat = Some(now + self.period);
            return Vec::new();
        };
        if now < next {
            return Vec::new();
        }
        self.next_heartbeat = Some(now + self.period);
        std::iter::once(Action::Heartbeat)
            .chain(self.held.values().cloned().map(Action::Renew))
            .collect()
    }

    /// Records the outcome of renewing `old` at `now`. A lease lost, or not renewed past its local
    /// validity, is no longer held.
    pub(crate) fn renewed(&mut self, now: Instant, old: &Lease, outcome: Renewal) -> Verdict {
        match outcome {
            Renewal::Renewed(lease) => {
                self.held.insert(lease.partition, lease);
                Verdict::Keep
            }
            Renewal::Lost => {
                self.held.remove(&old.partition);
                Verdict::Drop("its lease was lost (expired or taken)")
            }
            Renewal::Failed if !self.timing.is_valid_locally(old, now) => {
                self.held.remove(&old.partition);
                Verdict::Drop("its lease could not be renewed in time")
            }
            Renewal::Failed => Verdict::Keep,
        }
    }

    /// Ownership for the member list `members`: give back every held partition rendezvous
    /// hashing no longer gives this member (in partition order, before anything is taken), then
    /// try every wanted partition not held. Given-back partitions are no longer held.
    pub(crate) fn members<S: AsRef<str>>(&mut self, members: &[S]) -> Vec<Action> {
        let want: BTreeSet<u32> = wanted(self.partitions, members, &self.id)
            .into_iter()
            .collect();
        let unwanted: Vec<u32> = self
            .held
            .keys()
            .copied()
            .filter(|p| !want.contains(p))
            .collect();
        let mut actions: Vec<Action> = unwanted
            .into_iter()
            .filter_map(|p| self.held.remove(&p))
            .map(Action::GiveBack)
            .collect();
        actions.extend(
            want.into_iter()
                .filter(|p| !self.held.contains_key(p))
                .map(Action::Take),
        );
        actions
    }

    /// A [`Action::Take`] won `lease` and the partition is owned.
    pub(crate) fn taken(&mut self, lease: Lease) {
        self.held.insert(lease.partition, lease);
    }

    /// Partition `p` is lost (a checkpoint write was fenced): no longer held. Returns whether it was.
    pub(crate) fn lost(&mut self, p: u32) -> bool {
        self.held.remove(&p).is_some()
    }

    /// Leaving the cluster: give back every held partition.
    pub(crate) fn leave(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.held)
            .into_values()
            .map(Action::GiveBack)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEARTBEAT: Duration = Duration::from_millis(1_000);
    const N: u32 = 16;

    fn timing() -> LeaseTiming {
        LeaseTiming::new(Duration::from_millis(5_000), HEARTBEAT).unwrap()
    }

    fn plan(id: &str) -> Plan {
        Plan::new(id, N, timing(), HEARTBEAT)
    }

    fn lease(p: u32, revision: u64, at: Instant) -> Lease {
        Lease {
            partition: p,
            revision,
            acquired_at: at,
            since_ms: 0,
        }
    }

    fn takes(actions: &[Action]) -> Vec<u32> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Take(p) => Some(*p),
                _ => None,
            })
            .collect()
    }

    fn give_backs(actions: &[Action]) -> Vec<u32> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::GiveBack(l) => Some(l.partition),
                _ => None,
            })
            .collect()
    }

    /// Runs the member-list step and wins every take (as if nobody else held anything).
    fn settle(plan: &mut Plan, members: &[&str], now: Instant) -> Vec<Action> {
        let actions = plan.members(members);
        for p in takes(&actions) {
            plan.taken(lease(p, 1, now));
        }
        actions
    }

    #[test]
    fn a_lone_member_takes_every_partition_and_a_pair_splits_them() {
        let t0 = Instant::now();
        let mut a = plan("a");
        let actions = settle(&mut a, &["a"], t0);
        assert_eq!(takes(&actions), (0..N).collect::<Vec<_>>());
        assert!(give_backs(&actions).is_empty());

        let mut a = plan("a");
        let mut b = plan("b");
        let ta = takes(&settle(&mut a, &["a", "b"], t0));
        let tb = takes(&settle(&mut b, &["a", "b"], t0));
        assert_eq!(ta, wanted(N, &["a", "b"], "a"));
        assert_eq!(tb, wanted(N, &["a", "b"], "b"));
        let mut all: Vec<u32> = ta.iter().chain(&tb).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..N).collect::<Vec<_>>());
    }

    #[test]
    fn a_partition_held_elsewhere_is_retried_every_round_until_won() {
        let t0 = Instant::now();
        let mut a = plan("a");
        let first = a.members(&["a"]);
        assert_eq!(takes(&first), (0..N).collect::<Vec<_>>());
        // Everything but partition 3 is won; 3 is held by a member on its way out.
        for p in (0..N).filter(|&p| p != 3) {
            a.taken(lease(p, 1, t0));
        }
        assert_eq!(a.members(&["a"]), vec![Action::Take(3)]);
        assert_eq!(a.members(&["a"]), vec![Action::Take(3)]);
        a.taken(lease(3, 7, t0));
        assert!(a.members(&["a"]).is_empty());
    }

    #[test]
    fn heartbeat_and_renewals_come_once_per_period_well_before_local_expiry() {
        let t0 = Instant::now();
        let mut a = plan("a");
        assert!(
            a.round(t0).is_empty(),
            "the first round only starts the schedule"
        );
        settle(&mut a, &["a"], t0);
        assert!(a.round(t0 + HEARTBEAT / 2).is_empty());
        let due = a.round(t0 + HEARTBEAT);
        assert_eq!(due[0], Action::Heartbeat);
        let renewed: Vec<u32> = due[1..]
            .iter()
            .map(|a| match a {
                Action::Renew(l) => l.partition,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(renewed, (0..N).collect::<Vec<_>>());
        // Every renewal is asked for while the lease is still trusted locally.
        for a in &due[1..] {
            let Action::Renew(l) = a else { unreachable!() };
            assert!(timing().is_valid_locally(l, t0 + HEARTBEAT));
        }
        assert!(a.round(t0 + HEARTBEAT + HEARTBEAT / 2).is_empty());
        assert_eq!(a.round(t0 + HEARTBEAT * 2).len(), 1 + N as usize);
    }

    #[test]
    fn a_renewal_replaces_the_lease_with_its_new_revision() {
        let t0 = Instant::now();
        let mut a = plan("a");
        a.taken(lease(2, 5, t0));
        let old = lease(2, 5, t0);
        let new = lease(2, 9, t0 + HEARTBEAT);
        assert_eq!(
            a.renewed(t0 + HEARTBEAT, &old, Renewal::Renewed(new.clone())),
            Verdict::Keep
        );
        assert_eq!(a.held().cloned().collect::<Vec<_>>(), vec![new]);
    }

    #[test]
    fn a_lost_lease_drops_the_partition() {
        let t0 = Instant::now();
        let mut a = plan("a");
        a.taken(lease(2, 5, t0));
        let v = a.renewed(t0, &lease(2, 5, t0), Renewal::Lost);
        assert!(matches!(v, Verdict::Drop(_)));
        assert!(!a.holds(2));
        // Still wanted: taken again (under a new lease) on the next round, not given back.
        assert_eq!(a.members(&["a"]).len(), N as usize);
    }

    #[test]
    fn a_failed_renewal_keeps_the_lease_until_its_local_validity_runs_out() {
        let t0 = Instant::now();
        let mut a = plan("a");
        let l = lease(4, 5, t0);
        a.taken(l.clone());
        let valid_until = timing().valid_until(&l);
        assert_eq!(
            a.renewed(valid_until - Duration::from_millis(1), &l, Renewal::Failed),
            Verdict::Keep
        );
        assert!(a.holds(4));
        assert!(matches!(
            a.renewed(valid_until, &l, Renewal::Failed),
            Verdict::Drop(_)
        ));
        assert!(!a.holds(4));
    }

    #[test]
    fn a_fenced_checkpoint_write_drops_the_partition_once() {
        let t0 = Instant::now();
        let mut a = plan("a");
        a.taken(lease(1, 5, t0));
        assert!(a.lost(1));
        assert!(!a.lost(1));
        assert!(!a.holds(1));
    }

    #[test]
    fn a_new_member_makes_partitions_unwanted_and_they_are_given_back_before_any_take() {
        let t0 = Instant::now();
        let mut a = plan("a");
        settle(&mut a, &["a"], t0);
        let actions = a.members(&["a", "b"]);
        let given = give_backs(&actions);
        assert_eq!(given, wanted(N, &["a", "b"], "b"));
        assert!(takes(&actions).is_empty());
        for p in &given {
            assert!(!a.holds(*p));
        }
        let kept: Vec<u32> = a.held().map(|l| l.partition).collect();
        assert_eq!(kept, wanted(N, &["a", "b"], "a"));
    }

    #[test]
    fn an_expired_member_s_partitions_are_taken_over() {
        let t0 = Instant::now();
        let mut a = plan("a");
        settle(&mut a, &["a", "b", "c"], t0);
        let mine = wanted(N, &["a", "b", "c"], "a");
        // b's heartbeat expired: it is no longer listed.
        let actions = settle(&mut a, &["a", "c"], t0);
        assert!(give_backs(&actions).is_empty());
        let mut expected: Vec<u32> = wanted(N, &["a", "c"], "a")
            .into_iter()
            .filter(|p| !mine.contains(p))
            .collect();
        expected.sort_unstable();
        assert_eq!(takes(&actions), expected);
        assert!(!expected.is_empty());
    }

    #[test]
    fn a_stable_member_list_never_flaps() {
        let t0 = Instant::now();
        let members = ["a", "b", "c"];
        let mut a = plan("a");
        settle(&mut a, &members, t0);
        let held: Vec<u32> = a.held().map(|l| l.partition).collect();
        for i in 1..50u32 {
            let now = t0 + HEARTBEAT * i;
            for action in a.round(now) {
                if let Action::Renew(old) = action {
                    let new = lease(old.partition, old.revision + 1, now);
                    assert_eq!(a.renewed(now, &old, Renewal::Renewed(new)), Verdict::Keep);
                }
            }
            // Listing order and duplicates do not matter either.
            let listed: &[&str] = if i % 2 == 0 {
                &["c", "b", "a", "b"]
            } else {
                &members
            };
            assert!(a.members(listed).is_empty(), "round {i}");
        }
        assert_eq!(a.held().map(|l| l.partition).collect::<Vec<_>>(), held);
    }

    #[test]
    fn leaving_gives_everything_back() {
        let t0 = Instant::now();
        let mut a = plan("a");
        settle(&mut a, &["a"], t0);
        let actions = a.leave();
        assert_eq!(give_backs(&actions), (0..N).collect::<Vec<_>>());
        assert_eq!(a.held().count(), 0);
        assert!(a.leave().is_empty());
    }
}
