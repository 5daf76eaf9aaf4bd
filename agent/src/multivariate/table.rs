//! A table of per-device state with stable indices, and the link a series caches into it, so the
//! hot path finds its device's entry and its metric's slot without hashing the device id on every
//! reading: a link is resolved once (one hash lookup) and checked against the entry's generation,
//! which moves whenever the entry's slots may have moved (a model swapped, a metric added).

use std::collections::HashMap;
use xxhash_rust::xxh3::Xxh3DefaultBuilder;

const NONE: u32 = u32::MAX;

/// A series' cached place in one [`DeviceTable`]: its device's index and its metric's slot there.
/// Not checkpointed: a restored series resolves it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Link {
    ix: u32,
    slot: u32,
    /// The entry's generation when resolved; for an unresolved link, the table's count of
    /// added devices at the failed lookup (nothing to retry until it moves).
    gen: u32,
}

impl Default for Link {
    fn default() -> Self {
        Self {
            ix: NONE,
            slot: NONE,
            gen: 0,
        }
    }
}

/// Per-device entries in insertion order, found by device id.
pub(crate) struct DeviceTable<T> {
    index: HashMap<Box<str>, u32, Xxh3DefaultBuilder>,
    entries: Vec<(u32, T)>,
    /// Devices added so far, plus one (so a default link is stale).
    added: u32,
}

impl<T> DeviceTable<T> {
    pub(crate) fn new() -> Self {
        Self {
            index: HashMap::with_hasher(Xxh3DefaultBuilder::new()),
            entries: Vec::new(),
            added: 1,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The index of `device`, if it has an entry (one hash lookup).
    pub(crate) fn find(&self, device: &str) -> Option<usize> {
        self.index.get(device).map(|&ix| ix as usize)
    }

    /// Adds an entry for `device` (which must not have one) and returns its index.
    pub(crate) fn insert(&mut self, device: &str, value: T) -> usize {
        let ix = self.entries.len();
        self.index.insert(device.into(), ix as u32);
        self.entries.push((0, value));
        self.added = self.added.wrapping_add(1).max(1);
        ix
    }

    pub(crate) fn get(&self, ix: usize) -> &T {
        &self.entries[ix].1
    }

    pub(crate) fn get_mut(&mut self, ix: usize) -> &mut T {
        &mut self.entries[ix].1
    }

    /// Replaces entry `ix` (its slots may have moved: every link to it resolves again).
    pub(crate) fn replace(&mut self, ix: usize, value: T) {
        let e = &mut self.entries[ix];
        e.0 = e.0.wrapping_add(1);
        e.1 = value;
    }

    /// Marks entry `ix` changed in place (its slots may have moved).
    pub(crate) fn touch(&mut self, ix: usize) {
        let e = &mut self.entries[ix];
        e.0 = e.0.wrapping_add(1);
    }

    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.entries.iter_mut().map(|(_, v)| v)
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

    /// The `(index, slot)` a series' `link` points at, resolving it when stale: `slot_of` gives
    /// the metric's slot in an entry. `None` when the device has no entry (looked up again only
    /// once devices were added since) or the metric no slot in it. No hashing while the link is fresh.
    #[inline]
    pub(crate) fn link(
        &self,
        link: &mut Link,
        device: &str,
        slot_of: impl FnOnce(&T) -> Option<usize>,
    ) -> Option<(usize, usize)> {
        if link.ix != NONE {
            let (gen, entry) = &self.entries[link.ix as usize];
            if *gen != link.gen {
                link.gen = *gen;
                link.slot = slot_of(entry).map_or(NONE, |s| s as u32);
            }
        } else {
            if link.gen == self.added {
                return None;
            }
            match self.index.get(device) {
                Some(&ix) => {
                    let (gen, entry) = &self.entries[ix as usize];
                    *link = Link {
                        ix,
                        slot: slot_of(entry).map_or(NONE, |s| s as u32),
                        gen: *gen,
                    };
                }
                None => {
                    link.gen = self.added;
                    return None;
                }
            }
        }
        (link.slot != NONE).then_some((link.ix as usize, link.slot as usize))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot_of<'a>(metric: &'a str) -> impl FnOnce(&Vec<&str>) -> Option<usize> + 'a {
        move |features| features.iter().position(|f| *f == metric)
    }

    /// A link resolves once, follows a replaced entry, and retries an unknown device only after
    /// devices were added.
    #[test]
    fn links_resolve_once_and_follow_changes() {
        let mut t: DeviceTable<Vec<&str>> = DeviceTable::new();
        let mut link = Link::default();
        assert_eq!(t.link(&mut link, "pump", slot_of("b")), None);
        assert_eq!(link.gen, t.added, "remembers the failed lookup");
        let ix = t.insert("pump", vec!["a", "b"]);
        assert_eq!(t.link(&mut link, "pump", slot_of("b")), Some((ix, 1)));
        // Fresh: the entry is not consulted again.
        assert_eq!(
            t.link(&mut link, "pump", |_| panic!("fresh link")),
            Some((ix, 1))
        );
        t.replace(ix, vec!["b", "c", "a"]);
        assert_eq!(t.link(&mut link, "pump", slot_of("b")), Some((ix, 0)));
        t.get_mut(ix).retain(|f| *f != "b");
        t.touch(ix);
        assert_eq!(t.link(&mut link, "pump", slot_of("b")), None, "metric gone");
        let other = t.insert("fan", vec!["b"]);
        let mut fan = Link::default();
        assert_eq!(t.link(&mut fan, "fan", slot_of("b")), Some((other, 0)));
        assert_eq!(t.len(), 2);
        assert_eq!(t.find("fan"), Some(other));
        assert_eq!(t.get(other), &vec!["b"]);
        assert_eq!(t.index_of(&fan, "whatever"), Some(other));
        assert_eq!(t.index_of(&Link::default(), "pump"), Some(ix));
        assert_eq!(t.index_of(&Link::default(), "nope"), None);
    }
}
