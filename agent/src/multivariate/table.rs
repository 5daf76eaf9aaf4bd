//! A table of per-device state with stable indices, and the link a series caches into it, so the
//! hot path finds its device's entry and its metric's slots without hashing the device id on every
//! reading: a link is resolved once (one hash lookup) and checked against the entry's generation,
//! which moves whenever the entry's slots may have moved (a model swapped, a metric added).

use std::collections::HashMap;
use xxhash_rust::xxh3::Xxh3DefaultBuilder;

const NONE: u32 = u32::MAX;

/// A metric's slots in a device's entry: one in each of (at most) two aligners, the entry's shared
/// one and a second one (a model's own); and whether the shared aligner feeds a training sampler
/// (so the hot path need not look into the entry to know).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slots {
    at: [u32; 2],
    sampled: bool,
}

impl Slots {
    /// No slot in either aligner.
    pub(crate) const NONE: Slots = Slots {
        at: [NONE; 2],
        sampled: false,
    };

    pub(crate) fn new(first: Option<usize>, second: Option<usize>) -> Self {
        let at = |s: Option<usize>| s.and_then(|s| u32::try_from(s).ok()).unwrap_or(NONE);
        Self {
            at: [at(first), at(second)],
            sampled: false,
        }
    }

    /// These slots, the shared aligner feeding a sampler if `sampled`.
    pub(crate) fn sampled_if(self, sampled: bool) -> Self {
        Self { sampled, ..self }
    }

    /// The slot in the shared aligner.
    #[inline]
    pub(crate) fn first(self) -> Option<usize> {
        (self.at[0] != NONE).then_some(self.at[0] as usize)
    }

    /// The slot in the second aligner.
    #[inline]
    pub(crate) fn second(self) -> Option<usize> {
        (self.at[1] != NONE).then_some(self.at[1] as usize)
    }

    /// Whether the shared aligner feeds a training sampler.
    #[inline]
    pub(crate) fn sampled(self) -> bool {
        self.sampled
    }
}

/// A series' cached place in one [`DeviceTable`]: its device's index and its metric's slots there.
/// Not checkpointed: a restored series resolves it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Link {
    ix: u32,
    slots: Slots,
    /// The entry's generation when resolved; for an unresolved link, the table's count of
    /// added devices at the failed lookup (nothing to retry until it moves).
    gen: u32,
}

impl Default for Link {
    fn default() -> Self {
        Self {
            ix: NONE,
            slots: Slots::NONE,
            gen: 0,
        }
    }
}

/// Per-device entries in insertion order, found by device id.
pub(crate) struct DeviceTable<T> {
    index: HashMap<Box<str>, u32, Xxh3DefaultBuilder>,
    entries: Vec<T>,
    /// Each entry's generation, apart from the entries: a fresh link checks it without touching
    /// its entry (four bytes a device, so they stay in cache).
    gens: Vec<u32>,
    /// Devices added so far, plus one (so a default link is stale).
    added: u32,
}

impl<T> DeviceTable<T> {
    pub(crate) fn new() -> Self {
        Self {
            index: HashMap::with_hasher(Xxh3DefaultBuilder::new()),
            entries: Vec::new(),
            gens: Vec::new(),
            added: 1,
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The index of `device`, if it has an entry (one hash lookup).
    pub(crate) fn find(&self, device: &str) -> Option<usize> {
        self.index.get(device).map(|&ix| ix as usize)
    }

    /// Adds an entry for `device` (which must not have one) and returns its index.
    pub(crate) fn insert(&mut self, device: &str, value: T) -> usize {
        let ix = self.entries.len();
        self.index.insert(device.into(), ix as u32);
        self.entries.push(value);
        self.gens.push(0);
        self.added = self.added.wrapping_add(1).max(1);
        ix
    }

    pub(crate) fn get(&self, ix: usize) -> &T {
        &self.entries[ix]
    }

    pub(crate) fn get_mut(&mut self, ix: usize) -> &mut T {
        &mut self.entries[ix]
    }

    /// Marks entry `ix` changed in place (its slots may have moved).
    pub(crate) fn touch(&mut self, ix: usize) {
        let g = &mut self.gens[ix];
        *g = g.wrapping_add(1);
    }

    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.entries.iter_mut()
    }

    /// The index of a series' device, from its link when resolved (indices never move), else by
    /// lookup. Leaves the link as it is.
    pub(crate) fn index_of(&self, link: &Link, device: &str) -> Option<usize> {
        if link.ix != NONE {
            Some(link.ix as usize)
        } else {
            self.find(device)
        }
    }

    /// The `(index, slots)` a series' `link` points at, resolving it when stale: `slots_of` gives
    /// the metric's slots in an entry ([`Slots::NONE`] when it has none). `None` when the device
    /// has no entry (looked up again only once devices were added since). No hashing while the
    /// link is fresh.
    #[inline]
    pub(crate) fn link(
        &self,
        link: &mut Link,
        device: &str,
        slots_of: impl FnOnce(&T) -> Slots,
    ) -> Option<(usize, Slots)> {
        if link.ix != NONE {
            let ix = link.ix as usize;
            let gen = self.gens[ix];
            if gen != link.gen {
                link.gen = gen;
                link.slots = slots_of(&self.entries[ix]);
            }
        } else {
            if link.gen == self.added {
                return None;
            }
            match self.index.get(device) {
                Some(&ix) => {
                    *link = Link {
                        ix,
                        slots: slots_of(&self.entries[ix as usize]),
                        gen: self.gens[ix as usize],
                    };
                }
                None => {
                    link.gen = self.added;
                    return None;
                }
            }
        }
        Some((link.ix as usize, link.slots))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slots of `metric` in an entry of two aligners' features.
    fn slots_of<'a>(metric: &'a str) -> impl FnOnce(&(Vec<&str>, Vec<&str>)) -> Slots + 'a {
        move |(first, second)| {
            let at = |f: &Vec<&str>| f.iter().position(|f| *f == metric);
            Slots::new(at(first), at(second))
        }
    }

    fn at(first: Option<usize>, second: Option<usize>) -> Slots {
        Slots::new(first, second)
    }

    /// A link resolves once, follows a changed entry, and retries an unknown device only after
    /// devices were added.
    #[test]
    fn links_resolve_once_and_follow_changes() {
        let mut t: DeviceTable<(Vec<&str>, Vec<&str>)> = DeviceTable::new();
        let mut link = Link::default();
        assert_eq!(t.link(&mut link, "pump", slots_of("b")), None);
        assert_eq!(link.gen, t.added, "remembers the failed lookup");
        assert_eq!(t.link(&mut link, "pump", |_| panic!("nothing added")), None);
        let ix = t.insert("pump", (vec!["a", "b"], vec![]));
        let found = t.link(&mut link, "pump", slots_of("b"));
        assert_eq!(found, Some((ix, at(Some(1), None))));
        assert_eq!(found.unwrap().1.first(), Some(1));
        assert_eq!(found.unwrap().1.second(), None);
        // Fresh: the entry is not consulted again.
        assert_eq!(
            t.link(&mut link, "pump", |_| panic!("fresh link")),
            Some((ix, at(Some(1), None)))
        );
        *t.get_mut(ix) = (vec!["c", "a"], vec!["b", "c", "a"]);
        t.touch(ix);
        assert_eq!(
            t.link(&mut link, "pump", slots_of("b")),
            Some((ix, at(None, Some(0))))
        );
        t.get_mut(ix).1.retain(|f| *f != "b");
        t.touch(ix);
        assert_eq!(
            t.link(&mut link, "pump", slots_of("b")),
            Some((ix, Slots::NONE)),
            "metric gone, device still there"
        );
        let other = t.insert("fan", (vec!["b"], vec![]));
        let mut fan = Link::default();
        assert_eq!(
            t.link(&mut fan, "fan", slots_of("b")),
            Some((other, at(Some(0), None)))
        );
        assert_eq!(t.len(), 2);
        assert_eq!(t.find("fan"), Some(other));
        assert_eq!(t.get(other).0, vec!["b"]);
        assert_eq!(t.index_of(&fan, "whatever"), Some(other));
        assert_eq!(t.index_of(&Link::default(), "pump"), Some(ix));
        assert_eq!(t.index_of(&Link::default(), "nope"), None);
    }
}
