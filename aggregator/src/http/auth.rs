//! Credentials of the HTTP face: the bearer token (`Authorization: Bearer <token>`, the scheme
//! matched case-insensitively as RFC 7235 says) and feed tickets.
//!
//! A ticket exists because a browser's WebSocket cannot send an `Authorization` header, and a
//! token in the URL ends up in proxy and access logs and in the browser's history. The dashboard
//! trades its token for a ticket (`POST /api/feed/ticket`, with the header) and opens
//! `/feed?ticket=<ticket>`: 128 random bits from the operating system's CSPRNG, redeemable once,
//! for `http.ticket_ttl_ms`. Leaking a used or expired ticket gives nothing.
//!
//! At most [`MAX_TICKETS`] are outstanding; issuing one more drops the oldest, so a client that
//! asks for tickets and never uses them costs bounded memory. This file does no I/O: the store
//! takes the time as an argument and is tested directly.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Most tickets outstanding at once; issuing another drops the oldest.
pub(crate) const MAX_TICKETS: usize = 1024;

pub(crate) use edgewatch_link::bearer::{bearer, constant_time_eq};

/// Why a ticket was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TicketRefusal {
    /// Never issued, already used, or dropped to make room for newer ones.
    Unknown,
    /// Issued, but its lifetime had passed.
    Expired,
}

/// Outstanding feed tickets: single use, short-lived, bounded in number.
#[derive(Debug)]
pub(crate) struct TicketStore {
    ttl: Duration,
    max: usize,
    /// Ticket → expiry.
    live: HashMap<String, Instant>,
    /// Tickets in the order issued; may hold ones already redeemed (skipped when met).
    order: VecDeque<String>,
}

impl TicketStore {
    /// A store whose tickets live `ttl`, at most `max` outstanding.
    pub(crate) fn new(ttl: Duration, max: usize) -> Self {
        Self {
            ttl,
            max: max.max(1),
            live: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// A new ticket, valid from `now` for the store's lifetime.
    pub(crate) fn issue(&mut self, now: Instant) -> Result<String, rand::Error> {
        use rand::RngCore;
        let mut bits = [0u8; 16];
        rand::rngs::OsRng.try_fill_bytes(&mut bits)?;
        let ticket: String = bits.iter().map(|b| format!("{b:02x}")).collect();
        self.insert(ticket.clone(), now);
        Ok(ticket)
    }

    /// Records `ticket` as issued at `now`, dropping expired tickets and, past the bound, the oldest.
    fn insert(&mut self, ticket: String, now: Instant) {
        self.prune(now);
        while self.live.len() >= self.max {
            match self.order.pop_front() {
                Some(old) => {
                    self.live.remove(&old);
                }
                None => break,
            }
        }
        self.live.insert(ticket.clone(), now + self.ttl);
        self.order.push_back(ticket);
        // Redeemed tickets stay in `order` until met at its front; compact before it grows past
        // twice the bound, so a steady issue-and-redeem stream cannot grow it.
        if self.order.len() > 2 * self.max {
            self.order.retain(|t| self.live.contains_key(t));
        }
    }

    /// Consumes `ticket`: accepted once, if it was issued and has not expired by `now`.
    pub(crate) fn redeem(&mut self, ticket: &str, now: Instant) -> Result<(), TicketRefusal> {
        let expires = self.live.remove(ticket).ok_or(TicketRefusal::Unknown)?;
        if now >= expires {
            return Err(TicketRefusal::Expired);
        }
        Ok(())
    }

    /// Tickets issued, not redeemed and not dropped (expired ones count until pruned).
    #[cfg(test)]
    pub(crate) fn outstanding(&self) -> usize {
        self.live.len()
    }

    /// Drops the expired tickets at the front (tickets expire in the order they were issued).
    fn prune(&mut self, now: Instant) {
        while let Some(front) = self.order.front() {
            match self.live.get(front) {
                Some(expires) if *expires > now => break,
                Some(_) => {
                    self.live.remove(front);
                }
                None => {}
            }
            self.order.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_is_accepted_once() {
        let now = Instant::now();
        let mut s = TicketStore::new(Duration::from_secs(30), 8);
        let t = s.issue(now).unwrap();
        assert_eq!(t.len(), 32, "128 bits in hex: {t}");
        assert_eq!(s.redeem(&t, now + Duration::from_secs(1)), Ok(()));
        assert_eq!(
            s.redeem(&t, now + Duration::from_secs(1)),
            Err(TicketRefusal::Unknown)
        );
        assert_eq!(s.redeem("0123", now), Err(TicketRefusal::Unknown));
    }

    #[test]
    fn tickets_are_unpredictable() {
        let now = Instant::now();
        let mut s = TicketStore::new(Duration::from_secs(30), 8);
        let a = s.issue(now).unwrap();
        let b = s.issue(now).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn a_ticket_expires_after_its_lifetime() {
        let now = Instant::now();
        let mut s = TicketStore::new(Duration::from_millis(500), 8);
        let t = s.issue(now).unwrap();
        assert_eq!(
            s.redeem(&t, now + Duration::from_millis(500)),
            Err(TicketRefusal::Expired)
        );
        let t = s.issue(now).unwrap();
        assert_eq!(s.redeem(&t, now + Duration::from_millis(499)), Ok(()));
    }

    #[test]
    fn expired_tickets_are_pruned_when_new_ones_are_issued() {
        let now = Instant::now();
        let mut s = TicketStore::new(Duration::from_millis(100), 8);
        for _ in 0..5 {
            s.issue(now).unwrap();
        }
        assert_eq!(s.outstanding(), 5);
        s.issue(now + Duration::from_millis(100)).unwrap();
        assert_eq!(s.outstanding(), 1);
    }

    #[test]
    fn past_the_bound_the_oldest_ticket_is_dropped() {
        let now = Instant::now();
        let mut s = TicketStore::new(Duration::from_secs(30), 3);
        let first = s.issue(now).unwrap();
        let second = s.issue(now).unwrap();
        s.issue(now).unwrap();
        let fourth = s.issue(now).unwrap();
        assert_eq!(s.outstanding(), 3);
        assert_eq!(s.redeem(&first, now), Err(TicketRefusal::Unknown));
        assert_eq!(s.redeem(&second, now), Ok(()));
        assert_eq!(s.redeem(&fourth, now), Ok(()));
    }

    #[test]
    fn issuing_and_redeeming_forever_keeps_the_store_bounded() {
        let now = Instant::now();
        let mut s = TicketStore::new(Duration::from_secs(30), 4);
        let pinned = s.issue(now).unwrap();
        for _ in 0..10_000 {
            let t = s.issue(now).unwrap();
            s.redeem(&t, now).unwrap();
        }
        assert!(s.order.len() <= 8, "order holds {}", s.order.len());
        assert_eq!(s.redeem(&pinned, now), Ok(()), "an unused ticket survives");
    }
}
