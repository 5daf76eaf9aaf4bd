//! Readings the broker redelivers to a running agent. In `after_checkpoint` mode a reading is
//! acknowledged only once a checkpoint covers it, so after a reconnect the broker resends (DUP set)
//! every reading whose acknowledgement it has not seen, including ones the pipeline already holds.
//! [`Replays`] recognises those by packet id and content, so a reconnect never counts a reading twice.

use std::collections::HashMap;

/// What to do with a source message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Not applied before: apply it.
    Fresh,
    /// Applied since the last checkpoint; its first copy is still waiting for that checkpoint and
    /// its acknowledgement covers this one: skip it, acknowledge nothing extra.
    Pending,
    /// Applied before the last checkpoint, whose acknowledgement may have been lost with the
    /// connection: skip it, and acknowledge it (again) after the next checkpoint.
    Reacknowledge,
}

/// Packet id → (content hash, checkpoint generation) of every QoS 1 reading applied in this
/// process. At most 65,535 entries (packet ids are 16 bits), so at most about 1 MB; a broker that
/// reuses an id replaces its entry.
#[derive(Debug, Default)]
pub struct Replays {
    applied: HashMap<u16, (u64, u64)>,
    generation: u64,
}

impl Replays {
    /// Classifies a message with packet id `pkid` (0 for QoS 0, never a replay) and records it
    /// when fresh. A copy counts as a replay only with DUP set *and* the same topic and payload as
    /// the reading applied under that id: a broker that reused the id for a new reading whose first
    /// delivery was lost sends different content, which is then applied.
    pub fn check(&mut self, pkid: u16, dup: bool, topic: &str, payload: &[u8]) -> Seen {
        if pkid == 0 {
            return Seen::Fresh;
        }
        let hash = content_hash(topic, payload);
        if dup {
            if let Some(&(h, generation)) = self.applied.get(&pkid) {
                if h == hash {
                    return if generation == self.generation {
                        Seen::Pending
                    } else {
                        Seen::Reacknowledge
                    };
                }
            }
        }
        self.applied.insert(pkid, (hash, self.generation));
        Seen::Fresh
    }

    /// The readings applied so far were handed to a checkpoint (and acknowledged after it).
    pub fn checkpointed(&mut self) {
        self.generation += 1;
    }
}

fn content_hash(topic: &str, payload: &[u8]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(topic.as_bytes());
    // The topic's length keeps ("ab", "c") apart from ("a", "bc").
    h.update(&(topic.len() as u64).to_le_bytes());
    h.update(payload);
    h.digest()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redelivered_copy_before_its_checkpoint_is_skipped_without_a_second_ack() {
        let mut r = Replays::default();
        assert_eq!(r.check(7, false, "s/d/t", b"1"), Seen::Fresh);
        assert_eq!(r.check(7, true, "s/d/t", b"1"), Seen::Pending);
        // And again after another reconnect.
        assert_eq!(r.check(7, true, "s/d/t", b"1"), Seen::Pending);
    }

    #[test]
    fn a_redelivered_copy_after_its_checkpoint_is_skipped_and_acknowledged_again() {
        let mut r = Replays::default();
        assert_eq!(r.check(7, false, "s/d/t", b"1"), Seen::Fresh);
        r.checkpointed();
        assert_eq!(r.check(7, true, "s/d/t", b"1"), Seen::Reacknowledge);
    }

    #[test]
    fn a_first_delivery_with_dup_set_is_applied() {
        // The first copy was lost with the connection: the redelivery is the first we see.
        let mut r = Replays::default();
        assert_eq!(r.check(9, true, "s/d/t", b"1"), Seen::Fresh);
        assert_eq!(r.check(9, true, "s/d/t", b"1"), Seen::Pending);
    }

    #[test]
    fn a_reused_packet_id_with_other_content_is_applied() {
        let mut r = Replays::default();
        assert_eq!(r.check(3, false, "s/d/t", b"1"), Seen::Fresh);
        r.checkpointed();
        // The broker got our ack, reused id 3, and its first delivery was lost.
        assert_eq!(r.check(3, true, "s/d/t", b"2"), Seen::Fresh);
        assert_eq!(r.check(3, true, "s/d/u", b"2"), Seen::Fresh);
        // A fresh delivery (no DUP) is always applied, even with the same content.
        assert_eq!(r.check(3, false, "s/d/u", b"2"), Seen::Fresh);
    }

    #[test]
    fn qos0_messages_are_never_replays() {
        let mut r = Replays::default();
        assert_eq!(r.check(0, false, "s/d/t", b"1"), Seen::Fresh);
        assert_eq!(r.check(0, true, "s/d/t", b"1"), Seen::Fresh);
        assert!(r.applied.is_empty());
    }

    #[test]
    fn memory_is_bounded_by_the_packet_id_space() {
        let mut r = Replays::default();
        for i in 0..200_000u32 {
            let pkid = (i % 65_535) as u16 + 1;
            r.check(pkid, false, "s/d/t", &i.to_le_bytes());
        }
        assert_eq!(r.applied.len(), 65_535);
    }
}
