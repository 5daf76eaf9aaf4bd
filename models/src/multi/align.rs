//! Aligning one device's readings into vectors in event time: one slot per metric holding its latest
//! value, a slot counting only while its value is at most `staleness_ms` old, and a vector ready to
//! score once enough slots are fresh and the device's round of readings is complete (one vector per
//! round, not one per reading). Checkpointable (serde) with the agent's state.

use crate::ModelError;
use serde::{Deserialize, Serialize};

/// Parameters of an [`Aligner`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlignConfig {
    /// How long (event time, ms) a slot's value stays usable after its reading; > 0.
    #[serde(default = "default_staleness_ms")]
    pub staleness_ms: i64,
    /// Share of the slots that must be fresh for a vector to be scored, in (0, 1].
    #[serde(default = "default_min_fill")]
    pub min_fill: f64,
}

fn default_staleness_ms() -> i64 {
    60_000
}
fn default_min_fill() -> f64 {
    1.0
}

impl Default for AlignConfig {
    fn default() -> Self {
        Self {
            staleness_ms: default_staleness_ms(),
            min_fill: default_min_fill(),
        }
    }
}

/// The serialised form of an [`Aligner`]: the last vector released is not kept (all NaN after a
/// load, until the next).
#[derive(Serialize, Deserialize)]
struct AlignerState {
    features: Vec<String>,
    staleness_ms: i64,
    need: usize,
    slots: Vec<Option<(i64, f64)>>,
    now_ms: i64,
    /// Slots updated since the last vector (absent in states from before rounds: none).
    #[serde(default)]
    updated: Vec<bool>,
}

/// One slot of an [`Aligner`].
#[derive(Debug, Clone, Copy, PartialEq)]
struct Slot {
    /// Event time of the newest finite reading (meaningful when `held`).
    ts_ms: i64,
    /// Its value.
    value: f64,
    /// The slot holds a reading.
    held: bool,
    /// Updated since the last vector was released.
    updated: bool,
}

impl Slot {
    const EMPTY: Slot = Slot {
        ts_ms: 0,
        value: f64::NAN,
        held: false,
        updated: false,
    };

    /// A slot from its serialised reading.
    fn of(reading: Option<(i64, f64)>, updated: bool) -> Self {
        match reading {
            Some((ts_ms, value)) => Slot {
                ts_ms,
                value,
                held: true,
                updated,
            },
            None => Slot {
                updated,
                ..Slot::EMPTY
            },
        }
    }

    /// The reading held, if any.
    fn reading(&self) -> Option<(i64, f64)> {
        self.held.then_some((self.ts_ms, self.value))
    }

    /// Whether the slot holds a reading at most `staleness_ms` older than `now_ms`.
    #[inline]
    fn fresh_at(&self, now_ms: i64, staleness_ms: i64) -> bool {
        self.held && now_ms.saturating_sub(self.ts_ms) <= staleness_ms
    }
}

/// One device's latest reading per metric, aligned in event time. See [`Aligner::push`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "AlignerState", into = "AlignerState")]
pub struct Aligner {
    features: Vec<String>,
    staleness_ms: i64,
    /// Fresh slots needed for a vector: ceil(min_fill · n), at least 1.
    need: usize,
    /// Per slot: the newest finite reading and whether it came since the last vector was
    /// released (one array: a push inside a round touches nothing else).
    slots: Vec<Slot>,
    /// Event time of the last stored reading.
    now_ms: i64,
    /// Event time of the reading that completed the last vector (`i64::MIN`: none yet).
    last_vector_ms: i64,
    /// The last vector released: slot values at its reading, NaN where empty or stale (all NaN
    /// before the first, and after a restore).
    vector: Vec<f64>,
}

impl Aligner {
    /// An aligner over `features` (non-empty, unique names) with `cfg` (staleness > 0, min_fill in (0, 1]).
    pub fn new(features: &[String], cfg: &AlignConfig) -> Result<Self, ModelError> {
        if features.is_empty() {
            return Err(ModelError::invalid("features", "must not be empty"));
        }
        for (i, f) in features.iter().enumerate() {
            if f.is_empty() || features[..i].contains(f) {
                return Err(ModelError::invalid(
                    "features",
                    format!("names must be non-empty and unique, got {f:?} at {i}"),
                ));
            }
        }
        if cfg.staleness_ms <= 0 {
            return Err(ModelError::invalid(
                "staleness_ms",
                format!("must be > 0, got {}", cfg.staleness_ms),
            ));
        }
        if !(cfg.min_fill > 0.0 && cfg.min_fill <= 1.0) {
            return Err(ModelError::invalid(
                "min_fill",
                format!("must be in (0, 1], got {}", cfg.min_fill),
            ));
        }
        let n = features.len();
        let need = ((cfg.min_fill * n as f64 - 1e-9).ceil() as usize).clamp(1, n);
        Ok(Self {
            features: features.to_vec(),
            staleness_ms: cfg.staleness_ms,
            need,
            slots: vec![Slot::EMPTY; n],
            now_ms: i64::MIN,
            last_vector_ms: i64::MIN,
            vector: vec![f64::NAN; n],
        })
    }

    /// The slot of a metric, if it is one of the features (linear search: call it once per series).
    pub fn slot(&self, metric: &str) -> Option<usize> {
        self.features.iter().position(|f| f == metric)
    }

    /// Stores a reading in its slot and says whether a new vector is ready to score: true when, at
    /// `ts_ms`, at least ceil(min_fill · n) slots hold a value at most `staleness_ms` older than
    /// `ts_ms` and the round is complete — every fresh slot got a reading since the previous vector,
    /// or this slot got a second one (a faster metric starts the next round, so a slow one does not
    /// hold the device back). A device whose metrics arrive together thus yields one vector per
    /// round of readings, not one per reading. Returns false without changing anything for a
    /// NaN/infinite value, an unknown slot, or a reading older than the value its slot already holds
    /// (a late reading never overwrites a newer one). Allocates nothing.
    ///
    /// A reading inside a round costs a look at the slots up to the first one still awaited; the
    /// slots are counted and the vector built only when the round may be complete.
    #[inline]
    pub fn push(&mut self, slot: usize, ts_ms: i64, value: f64) -> bool {
        let Some(again) = self.store(slot, ts_ms, value) else {
            return false;
        };
        if !again && self.awaits(ts_ms) {
            // A fresh slot has no reading of this round yet: not complete, whatever else holds.
            return false;
        }
        self.end_round(slot, ts_ms, again)
    }

    /// Stores a reading in its slot; `None` (nothing changed) for a non-finite value, an unknown
    /// slot or a reading older than the slot's, else whether the slot was updated already this round.
    #[inline]
    fn store(&mut self, slot: usize, ts_ms: i64, value: f64) -> Option<bool> {
        if !value.is_finite() {
            return None;
        }
        let s = self.slots.get_mut(slot)?;
        if s.held && s.ts_ms > ts_ms {
            return None;
        }
        (s.held, s.ts_ms, s.value) = (true, ts_ms, value);
        let again = std::mem::replace(&mut s.updated, true);
        self.now_ms = ts_ms;
        Some(again)
    }

    /// [`Aligner::push`] without its shortcut inside a round: what push must equal.
    #[cfg(test)]
    fn push_unshortened(&mut self, slot: usize, ts_ms: i64, value: f64) -> bool {
        match self.store(slot, ts_ms, value) {
            Some(again) => self.end_round(slot, ts_ms, again),
            None => false,
        }
    }

    /// Whether a slot fresh at `ts_ms` has had no reading since the last vector.
    #[inline]
    fn awaits(&self, ts_ms: i64) -> bool {
        let staleness = self.staleness_ms;
        self.slots
            .iter()
            .any(|s| !s.updated && s.fresh_at(ts_ms, staleness))
    }

    /// The rest of [`Aligner::push`], once the round may be complete (no fresh slot awaited, or
    /// `slot` got its second reading of the round).
    fn end_round(&mut self, slot: usize, ts_ms: i64, again: bool) -> bool {
        let staleness = self.staleness_ms;
        // The pushed slot is fresh: the oldest fresh reading is at most ts_ms.
        let (mut fresh, mut waiting, mut oldest) = (0, false, ts_ms);
        for s in &self.slots {
            if s.fresh_at(ts_ms, staleness) {
                fresh += 1;
                waiting |= !s.updated;
                oldest = oldest.min(s.ts_ms);
            }
        }
        let complete = fresh >= self.need && !waiting;
        if complete && !again && self.last_vector_ms == i64::MIN && self.first_round() {
            return false;
        }
        if complete && !again && self.mixes_rounds(ts_ms, oldest) {
            // The round spans as long as the time between rounds: it started mid-round (a model
            // swapped in between two readings of a round) and holds readings of two rounds.
            // Start over from this reading, so the next round is a whole one.
            self.slots.iter_mut().for_each(|s| s.updated = false);
            self.slots[slot].updated = true;
            return false;
        }
        let ready = fresh >= self.need && (!waiting || again);
        if ready {
            for (v, s) in self.vector.iter_mut().zip(&mut self.slots) {
                *v = if s.fresh_at(ts_ms, staleness) {
                    s.value
                } else {
                    f64::NAN
                };
                s.updated = false;
            }
            self.last_vector_ms = ts_ms;
        }
        ready
    }

    /// The first round of a fresh aligner (a model swapped in, or a device seen for the first time)
    /// may have started mid-round: with no previous vector there is no period to tell. Its fresh
    /// readings are split at their largest gap in event time: those after it start the round, and
    /// the last one before it stands for the previous vector. Returns whether it split (nothing is
    /// released then); `false` when no gap dominates (readings together, or evenly spread), or
    /// with fewer than three fresh readings (a device of two metrics cannot tell).
    #[cold]
    #[inline(never)]
    fn first_round(&mut self) -> bool {
        let now = self.now_ms;
        // Once per aligner, so this one allocation is not per vector.
        let mut times: Vec<i64> = self
            .slots
            .iter()
            .filter_map(|s| s.reading())
            .map(|(t, _)| t)
            .filter(|&t| now.saturating_sub(t) <= self.staleness_ms)
            .collect();
        // Two readings are two readings: only three or more show which gap is the round's edge.
        if times.len() < 3 {
            return false;
        }
        times.sort_unstable();
        let Some((before, after)) = times
            .windows(2)
            .map(|w| (w[0], w[1]))
            .max_by_key(|(a, b)| (b.saturating_sub(*a), std::cmp::Reverse(*a)))
        else {
            return false;
        };
        // Only a gap that dominates the round splits it: readings a few ms apart around a gap of
        // most of a period. Evenly spread readings (staggered metrics) are one round.
        let gap = after.saturating_sub(before);
        let rest = times[times.len() - 1]
            .saturating_sub(times[0])
            .saturating_sub(gap);
        if gap <= 0 || gap <= rest.saturating_mul(4) {
            return false;
        }
        for s in &mut self.slots {
            s.updated = s.held && s.ts_ms >= after && s.fresh_at(now, self.staleness_ms);
        }
        self.last_vector_ms = before;
        true
    }

    /// Whether the fresh slots, completed at `ts_ms` with the oldest fresh reading at `oldest`,
    /// span at least half the time since the previous vector: readings of two rounds rather than one.
    fn mixes_rounds(&self, ts_ms: i64, oldest: i64) -> bool {
        if self.last_vector_ms == i64::MIN {
            return false;
        }
        let spread = ts_ms.saturating_sub(oldest);
        let period = ts_ms.saturating_sub(self.last_vector_ms);
        spread > 0 && period > 0 && spread.saturating_mul(2) >= period
    }

    /// The vector of the last [`Aligner::push`] that returned true: one value per feature, NaN for
    /// a slot empty or stale at that reading. All NaN before the first vector (and after a restore
    /// from a checkpoint, until the next one).
    pub fn vector(&self) -> &[f64] {
        &self.vector
    }

    /// The feature names, in slot order.
    pub fn features(&self) -> &[String] {
        &self.features
    }
}

impl From<Aligner> for AlignerState {
    fn from(a: Aligner) -> Self {
        Self {
            features: a.features,
            staleness_ms: a.staleness_ms,
            need: a.need,
            slots: a.slots.iter().map(Slot::reading).collect(),
            now_ms: a.now_ms,
            updated: a.slots.iter().map(|s| s.updated).collect(),
        }
    }
}

impl TryFrom<AlignerState> for Aligner {
    type Error = String;

    fn try_from(s: AlignerState) -> Result<Self, String> {
        let n = s.features.len();
        if n == 0 || s.slots.len() != n || s.need == 0 || s.need > n || s.staleness_ms <= 0 {
            return Err(format!(
                "aligner state: {n} features, {} slots, need {}, staleness {}",
                s.slots.len(),
                s.need,
                s.staleness_ms
            ));
        }
        if s.slots.iter().flatten().any(|(_, v)| !v.is_finite()) {
            return Err("aligner state: a slot holds a non-finite value".into());
        }
        let mut updated = s.updated;
        updated.resize(n, false);
        let slots = s
            .slots
            .iter()
            .zip(updated)
            .map(|(&reading, updated)| Slot::of(reading, updated))
            .collect();
        Ok(Self {
            features: s.features,
            staleness_ms: s.staleness_ms,
            need: s.need,
            slots,
            now_ms: s.now_ms,
            last_vector_ms: i64::MIN,
            vector: vec![f64::NAN; n],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn cfg(staleness_ms: i64, min_fill: f64) -> AlignConfig {
        AlignConfig {
            staleness_ms,
            min_fill,
        }
    }

    #[test]
    fn constructor_rejects_bad_parameters() {
        let f = names(&["a", "b"]);
        assert!(Aligner::new(&[], &cfg(10, 1.0)).is_err());
        assert!(Aligner::new(&names(&["a", "a"]), &cfg(10, 1.0)).is_err());
        assert!(Aligner::new(&names(&["a", ""]), &cfg(10, 1.0)).is_err());
        let e = Aligner::new(&f, &cfg(0, 1.0)).unwrap_err();
        assert!(
            e.to_string().contains("staleness_ms: must be > 0, got 0"),
            "{e}"
        );
        for bad in [0.0, -0.5, 1.01, f64::NAN] {
            let e = Aligner::new(&f, &cfg(10, bad)).unwrap_err();
            assert!(e.to_string().starts_with("min_fill"), "{e}");
        }
        assert_eq!(AlignConfig::default(), cfg(60_000, 1.0));
        let parsed: AlignConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(parsed, AlignConfig::default());
    }

    #[test]
    fn vector_is_ready_when_all_slots_are_fresh() {
        let mut a = Aligner::new(&names(&["flow", "current", "temp"]), &cfg(100, 1.0)).unwrap();
        assert_eq!(a.slot("current"), Some(1));
        assert_eq!(a.slot("nope"), None);
        assert!(!a.push(0, 1000, 1.0));
        assert!(!a.push(1, 1010, 2.0));
        assert!(a.vector()[2].is_nan());
        assert!(a.push(2, 1020, 3.0));
        assert_eq!(a.vector(), &[1.0, 2.0, 3.0]);
        // 150 ms later flow (1000) and current (1010) are stale relative to the new reading: no
        // vector, and the last one stays as it was.
        assert!(!a.push(2, 1150, 4.0));
        assert_eq!(a.vector(), &[1.0, 2.0, 3.0]);
        // Exactly staleness_ms old still counts.
        assert!(!a.push(0, 1200, 5.0));
        assert!(a.push(1, 1250, 6.0));
        assert_eq!(a.vector(), &[5.0, 6.0, 4.0]);
    }

    #[test]
    fn min_fill_allows_partial_vectors() {
        let mut a = Aligner::new(&names(&["a", "b", "c", "d"]), &cfg(100, 0.7)).unwrap();
        // ceil(0.7 · 4) = 3 slots.
        assert!(!a.push(0, 0, 1.0));
        assert!(!a.push(1, 0, 1.0));
        assert!(a.push(2, 0, 1.0));
        assert!(a.vector()[3].is_nan());
        let mut exact = Aligner::new(&names(&["a", "b"]), &cfg(100, 0.5)).unwrap();
        assert!(exact.push(0, 0, 1.0), "ceil(0.5 · 2) = 1");
    }

    #[test]
    fn bad_values_late_readings_and_unknown_slots_change_nothing() {
        let mut a = Aligner::new(&names(&["a", "b"]), &cfg(100, 1.0)).unwrap();
        assert!(!a.push(0, 10, f64::NAN));
        assert!(!a.push(0, 10, f64::INFINITY));
        assert!(!a.push(7, 10, 1.0));
        assert!(a.vector().iter().all(|v| v.is_nan()));
        assert!(!a.push(0, 50, 1.0));
        assert!(a.push(1, 60, 2.0));
        // A late reading for slot 0 (older than its value) does not overwrite it.
        assert!(!a.push(0, 40, 9.0));
        assert_eq!(a.vector(), &[1.0, 2.0]);
        // An equally old reading replaces it (same event time, newer arrival); the vector comes
        // with the round, once b too has a new reading.
        assert!(!a.push(0, 50, 3.0));
        assert!(a.push(1, 60, 2.5));
        assert_eq!(a.vector(), &[3.0, 2.5]);
    }

    /// One vector per round of readings, whatever the order within the round; a faster metric
    /// starts the next round without waiting for a slower one that is still fresh.
    #[test]
    fn one_vector_per_round_and_a_fast_metric_does_not_wait_for_a_slow_one() {
        let mut a = Aligner::new(&names(&["a", "b", "c"]), &cfg(10_000, 1.0)).unwrap();
        let mut vectors = 0;
        for step in 0..100i64 {
            for j in [
                (step % 3) as usize,
                ((step + 1) % 3) as usize,
                ((step + 2) % 3) as usize,
            ] {
                vectors += usize::from(a.push(j, step * 1000 + j as i64, step as f64));
            }
        }
        assert_eq!(vectors, 100);
        // c reports every 5 s (fresh for 10 s), a and b every second: a vector per second.
        let mut b = Aligner::new(&names(&["a", "b", "c"]), &cfg(10_000, 1.0)).unwrap();
        let mut vectors = 0;
        for step in 0..100i64 {
            if step % 5 == 0 {
                vectors += usize::from(b.push(2, step * 1000, 1.0));
            }
            vectors += usize::from(b.push(0, step * 1000 + 1, 1.0));
            vectors += usize::from(b.push(1, step * 1000 + 2, 1.0));
        }
        // Waiting for c would give 20; a repeating starts the next round, so at least one vector
        // every other second (here 73 in 100 s).
        assert!((50..=100).contains(&vectors), "{vectors}");
    }

    /// An aligner started between two readings of a round (a model swapped in mid-round) would
    /// lock onto rounds mixing two steps; it starts over once and then releases whole rounds.
    #[test]
    fn an_aligner_started_mid_round_finds_whole_rounds() {
        let mut a = Aligner::new(&names(&["a", "b", "c"]), &cfg(10_000, 1.0)).unwrap();
        let mut released = Vec::new();
        // Steps of readings a, b, c at +0, +1, +2 ms; the aligner starts at b of step 0.
        let mut first = true;
        for step in 0..6i64 {
            for j in 0..3usize {
                if first && j == 0 {
                    continue;
                }
                first = false;
                if a.push(j, step * 1000 + j as i64, step as f64) {
                    released.push(a.vector().to_vec());
                }
            }
        }
        // The first vector mixes steps 0 and 1 (nothing to compare with yet); the next
        // completion spans a whole step, so it starts over; from then on, whole rounds.
        let whole: Vec<_> = released
            .iter()
            .filter(|v| v.iter().all(|x| *x == v[0]))
            .collect();
        assert!(released.len() >= 4, "{released:?}");
        assert!(released.len() - whole.len() <= 1, "{released:?}");
        assert_eq!(released.last().unwrap(), &vec![5.0, 5.0, 5.0]);
    }

    #[test]
    fn extreme_timestamps_do_not_overflow() {
        let mut a = Aligner::new(&names(&["a", "b"]), &cfg(i64::MAX, 1.0)).unwrap();
        assert!(!a.push(0, i64::MIN, 1.0));
        assert!(a.push(1, i64::MAX, 2.0));
        let mut b = Aligner::new(&names(&["a", "b"]), &cfg(1, 1.0)).unwrap();
        assert!(!b.push(0, i64::MIN, 1.0));
        assert!(!b.push(1, i64::MAX, 2.0));
        assert!(b.vector()[0].is_nan());
    }

    #[test]
    fn checkpoint_round_trips_and_rejects_corrupt_state() {
        let mut a = Aligner::new(&names(&["a", "b", "c"]), &cfg(100, 1.0)).unwrap();
        a.push(0, 0, 1.5);
        a.push(1, 20, -2.5);
        let json = serde_json::to_string(&a).unwrap();
        let b: Aligner = serde_json::from_str(&json).unwrap();
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        let bytes = postcard::to_allocvec(&a).unwrap();
        let mut c: Aligner = postcard::from_bytes(&bytes).unwrap();
        assert!(c.push(2, 30, 0.0));
        assert_eq!(c.vector(), &[1.5, -2.5, 0.0]);
        let bad = json.replace("\"need\":3", "\"need\":4");
        assert!(serde_json::from_str::<Aligner>(&bad).is_err());
    }

    /// A model swapped in between two readings of a round: the fresh aligner's first vector holds
    /// one round, not the tail of one and the head of the next.
    #[test]
    fn an_aligner_started_mid_round_releases_whole_rounds_from_the_first() {
        let features: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        for start in 0..3 {
            let mut al = Aligner::new(&features, &AlignConfig::default()).unwrap();
            let mut vectors = Vec::new();
            for i in 195..200i64 {
                for j in 0..3usize {
                    if i == 195 && j < start {
                        continue;
                    }
                    // The value is the step: a mixed vector holds two steps.
                    if al.push(j, i * 1000 + j as i64, i as f64) {
                        vectors.push(al.vector().to_vec());
                    }
                }
            }
            assert!(vectors.len() >= 3, "start {start}: {vectors:?}");
            for v in &vectors {
                assert!(
                    v.iter().all(|&x| x == v[0]),
                    "start {start}: mixed vector {v:?} in {vectors:?}"
                );
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// The shortcut inside a round changes nothing: push releases exactly when the full
        /// check does, and every vector holds each slot's latest reading where it is fresh at the
        /// releasing reading, NaN elsewhere. Streams of a few metrics with jittered, late, equal
        /// and far-apart timestamps, NaN values and unknown slots.
        #[test]
        fn push_releases_what_the_full_check_does(
            n in 1usize..6,
            staleness in 1i64..3000,
            fill in 1u8..=4,
            stream in proptest::collection::vec(
                (0usize..7, -400i64..1500, proptest::prop_oneof![9 => -1e3f64..1e3, 1 => proptest::strategy::Just(f64::NAN)]),
                1..300,
            ),
        ) {
            let features: Vec<String> = (0..n).map(|j| format!("m{j}")).collect();
            let c = cfg(staleness, f64::from(fill) / 4.0);
            let (mut fast, mut full) = (Aligner::new(&features, &c).unwrap(), Aligner::new(&features, &c).unwrap());
            let mut latest: Vec<Option<(i64, f64)>> = vec![None; n];
            let mut ts = 0i64;
            for (slot, step, value) in stream {
                // Mostly forward in event time, at times backwards (late readings).
                ts = ts.saturating_add(step);
                let (a, b) = (fast.push(slot, ts, value), full.push_unshortened(slot, ts, value));
                proptest::prop_assert_eq!(a, b, "slot {} ts {}", slot, ts);
                if slot < n && value.is_finite() && latest[slot].is_none_or(|(t, _)| t <= ts) {
                    latest[slot] = Some((ts, value));
                }
                let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                proptest::prop_assert_eq!(bits(fast.vector()), bits(full.vector()));
                if a {
                    let want: Vec<f64> = latest
                        .iter()
                        .map(|l| match l {
                            Some((t, v)) if ts.saturating_sub(*t) <= staleness => *v,
                            _ => f64::NAN,
                        })
                        .collect();
                    proptest::prop_assert_eq!(bits(fast.vector()), bits(&want));
                }
            }
        }
    }
}
