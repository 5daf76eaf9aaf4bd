//! Connection slots: the one limit on open connections (plain HTTP and WebSocket feed clients
//! alike), the clock that gives each connection its deadline, and the room made at the limit.
//!
//! A [`Slot`] holds a permit of the `http.max_connections` semaphore. It is shared by the
//! connection's socket wrapper ([`TimedIo`]) and, after a WebSocket upgrade, lives inside the
//! upgraded socket, so the permit is released exactly when the socket is closed, whatever
//! protocol it ended up speaking.
//!
//! [`ConnClock`] is what the connection is doing and since when (one atomic word, so a phase and
//! its start are always read together); it does no I/O and is tested directly:
//! - waiting for a request head (`Head`): from accepting, or from the first byte of a request on
//!   a kept-alive connection; closed `header_read_timeout_ms` after that start, however many
//!   bytes trickle in (a slowloris client gains nothing by sending one byte at a time);
//! - kept alive between requests (`Idle`): closed `idle_timeout_ms` after the last response;
//! - serving a request (`Busy`) or upgraded to a WebSocket (`Upgraded`): no deadline of its own;
//! - any phase: a write that has not progressed for `write_timeout_ms` closes the connection.
//!
//! hyper's own `header_read_timeout` is not used: it starts whenever the server waits for a head,
//! keep-alive waits included, so it cannot tell a kept-alive connection from a slow client.
//!
//! At the limit, [`Limits::evict_oldest_waiting`] closes the connection that has waited longest
//! for a request (`Head` or `Idle`) to admit the new one: a real client sends its request right
//! after connecting, so the connection that has been quiet longest is the least useful one, and
//! a flood of idle sockets cannot lock out the API until their timeouts pass. Only when every
//! slot is busy or upgraded is a connection refused (a best-effort 503, counted, logged at most
//! once per [`REFUSAL_LOG_EVERY`]).

use super::throttle::LogThrottle;
use crate::AggregatorMetrics;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
// tokio's clock, so tests can pause it; the same as the monotonic clock otherwise.
use tokio::time::Instant;

/// At most one log line per this period about refused (or evicted) connections.
pub(crate) const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(5);

/// How long a connection admitted by evicting another waits for the evicted one's permit (which
/// takes a few task switches, but can take long on a starved machine; the wait costs a socket).
const ADMIT_WAIT: Duration = Duration::from_secs(5);

/// The best-effort answer to a refused connection, written without reading its request.
const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: text/plain\r\nContent-Length: 25\r\nConnection: close\r\n\r\nconnection limit reached\n";

/// The outcome of [`Limits::admit`].
pub(crate) enum Admission {
    /// A slot was free.
    Now(Arc<Slot>),
    /// A connection was evicted; its slot comes to this one (`None` if not within [`ADMIT_WAIT`]).
    Soon(Pin<Box<dyn Future<Output = Option<Arc<Slot>>> + Send>>),
    /// Full, and no connection is waiting for a request.
    Refused,
}

/// The connection timeouts, in ms.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    /// A request head must be complete this long after it started (or after accepting).
    pub(crate) header_read_ms: u64,
    /// A kept-alive connection may wait this long for its next request.
    pub(crate) idle_ms: u64,
    /// A write may stall this long.
    pub(crate) write_ms: u64,
}

/// What a connection is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Waiting for (the rest of) a request head.
    Head = 0,
    /// Kept alive between requests, nothing of the next one received.
    Idle = 1,
    /// A request is being served.
    Busy = 2,
    /// Upgraded to a WebSocket: the feed owns its timeouts.
    Upgraded = 3,
    /// Chosen to make room at the limit: to be closed.
    Evicted = 4,
}

impl Phase {
    fn from_bits(b: u64) -> Self {
        match b {
            0 => Self::Head,
            1 => Self::Idle,
            2 => Self::Busy,
            3 => Self::Upgraded,
            _ => Self::Evicted,
        }
    }
}

/// Why a connection must be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expiry {
    /// The request head took longer than `header_read_timeout_ms`.
    HeaderRead,
    /// Kept alive past `idle_timeout_ms` without a new request.
    Idle,
    /// A write stalled past `write_timeout_ms`.
    Write,
    /// Evicted to admit a new connection at the limit.
    Evicted,
}

const SINCE_BITS: u32 = 56;
const SINCE_MASK: u64 = (1 << SINCE_BITS) - 1;

/// A connection's phase, when it began, and whether a write is stalled; times in ms since the
/// server's epoch.
#[derive(Debug)]
pub(crate) struct ConnClock {
    /// `phase << 56 | since_ms`: one word, so a phase is never seen with another phase's start.
    state: AtomicU64,
    /// When the current write began to stall, plus one; 0 when no write is stalled.
    write_stalled: AtomicU64,
}

impl ConnClock {
    /// A connection accepted at `now_ms`: waiting for its first request head.
    pub(crate) fn new(now_ms: u64) -> Self {
        Self {
            state: AtomicU64::new(pack(Phase::Head, now_ms)),
            write_stalled: AtomicU64::new(0),
        }
    }

    /// The phase and when it began.
    pub(crate) fn phase(&self) -> (Phase, u64) {
        unpack(self.state.load(Acquire))
    }

    /// Moves to `to` (at `now_ms`) if the phase is one of `from`; returns whether it did.
    fn transition(&self, from: &[Phase], to: Phase, now_ms: u64) -> bool {
        let mut cur = self.state.load(Acquire);
        loop {
            if !from.contains(&unpack(cur).0) {
                return false;
            }
            match self
                .state
                .compare_exchange_weak(cur, pack(to, now_ms), AcqRel, Acquire)
            {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Bytes arrived: on a kept-alive connection they start a request head, and its timer.
    /// Returns whether the deadline moved (earlier).
    pub(crate) fn on_read(&self, now_ms: u64) -> bool {
        self.transition(&[Phase::Idle], Phase::Head, now_ms)
    }

    /// A complete request head was read and is to be served; false if the connection was
    /// evicted meanwhile (then it is not served: it is being closed).
    pub(crate) fn on_request(&self, now_ms: u64) -> bool {
        self.transition(&[Phase::Head, Phase::Idle], Phase::Busy, now_ms)
    }

    /// The response was handed to the socket: the connection is kept alive from `now_ms`.
    /// Returns whether the phase changed (a deadline appeared).
    pub(crate) fn on_response_done(&self, now_ms: u64) -> bool {
        self.transition(&[Phase::Busy], Phase::Idle, now_ms)
    }

    /// The connection became a WebSocket.
    pub(crate) fn on_upgrade(&self, now_ms: u64) {
        self.transition(&[Phase::Busy], Phase::Upgraded, now_ms);
    }

    /// Marks the connection for closing if it is waiting for a request; returns whether it was.
    pub(crate) fn try_evict(&self, now_ms: u64) -> bool {
        self.transition(&[Phase::Head, Phase::Idle], Phase::Evicted, now_ms)
    }

    /// Since when the connection has been waiting for a request, if it is.
    pub(crate) fn waiting_since(&self) -> Option<u64> {
        match self.phase() {
            (Phase::Head | Phase::Idle, since) => Some(since),
            _ => None,
        }
    }

    /// A write could not proceed at `now_ms`; returns whether this starts a stall.
    pub(crate) fn on_write_pending(&self, now_ms: u64) -> bool {
        self.write_stalled
            .compare_exchange(0, now_ms + 1, Relaxed, Relaxed)
            .is_ok()
    }

    /// A write made progress: no stall.
    pub(crate) fn on_write_progress(&self) {
        if self.write_stalled.load(Relaxed) != 0 {
            self.write_stalled.store(0, Relaxed);
        }
    }

    /// The earliest moment the connection must be closed, and why; `None` when it has no deadline.
    pub(crate) fn deadline(&self, t: &Timeouts) -> Option<(u64, Expiry)> {
        let phase = match self.phase() {
            (Phase::Head, since) => Some((since + t.header_read_ms, Expiry::HeaderRead)),
            (Phase::Idle, since) => Some((since + t.idle_ms, Expiry::Idle)),
            (Phase::Busy | Phase::Upgraded, _) => None,
            (Phase::Evicted, _) => return Some((0, Expiry::Evicted)),
        };
        let write = match self.write_stalled.load(Relaxed) {
            0 => None,
            s => Some((s - 1 + t.write_ms, Expiry::Write)),
        };
        match (phase, write) {
            (Some(p), Some(w)) => Some(if w.0 < p.0 { w } else { p }),
            (p, w) => p.or(w),
        }
    }
}

fn pack(phase: Phase, since_ms: u64) -> u64 {
    ((phase as u64) << SINCE_BITS) | (since_ms & SINCE_MASK)
}

fn unpack(word: u64) -> (Phase, u64) {
    (Phase::from_bits(word >> SINCE_BITS), word & SINCE_MASK)
}

/// The part of a slot the registry sees: enough to pick and signal a connection to evict.
#[derive(Debug)]
struct SlotState {
    clock: ConnClock,
    /// Woken when the deadline moves earlier or appears, and on eviction.
    wake: Notify,
}

/// The open connections and their limit.
pub(crate) struct Limits {
    permits: Arc<Semaphore>,
    max: usize,
    epoch: Instant,
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<SlotState>>>,
    timeouts: Timeouts,
    metrics: Arc<AggregatorMetrics>,
    refused_log: Mutex<LogThrottle>,
    evicted_log: Mutex<LogThrottle>,
}

impl Limits {
    /// At most `max` connections with these timeouts.
    pub(crate) fn new(max: usize, timeouts: Timeouts, metrics: Arc<AggregatorMetrics>) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
            epoch: Instant::now(),
            next_id: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
            timeouts,
            metrics,
            refused_log: Mutex::new(LogThrottle::new(REFUSAL_LOG_EVERY)),
            evicted_log: Mutex::new(LogThrottle::new(REFUSAL_LOG_EVERY)),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(SINCE_MASK)
    }

    /// Admits a new connection: a slot now, or (at the limit) a place in line for the slot that
    /// closing the connection waiting longest for a request frees, or refusal when none waits.
    pub(crate) fn admit(self: &Arc<Self>) -> Admission {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Admission::Now(self.slot(permit));
        }
        // In line (the semaphore is FIFO) before the eviction frees a permit, so the permit comes
        // here and not to a later connection finding it free; the first poll takes the place.
        let mut acquire = Box::pin(self.permits.clone().acquire_owned());
        match acquire
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
        {
            Poll::Ready(Ok(permit)) => return Admission::Now(self.slot(permit)),
            // The semaphore is never closed; treat it as full all the same.
            Poll::Ready(Err(_)) => return Admission::Refused,
            Poll::Pending => {}
        }
        if !self.evict_oldest_waiting() {
            return Admission::Refused;
        }
        let limits = self.clone();
        Admission::Soon(Box::pin(async move {
            let permit = tokio::time::timeout(ADMIT_WAIT, acquire).await.ok()?.ok()?;
            Some(limits.slot(permit))
        }))
    }

    fn slot(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> Arc<Slot> {
        let id = self.next_id.fetch_add(1, Relaxed);
        let state = Arc::new(SlotState {
            clock: ConnClock::new(self.now_ms()),
            wake: Notify::new(),
        });
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, state.clone());
        let open = self.metrics.http_connections.fetch_add(1, Relaxed) + 1;
        self.metrics.http_connections_peak.fetch_max(open, Relaxed);
        Arc::new(Slot {
            id,
            state,
            limits: self.clone(),
            _permit: permit,
        })
    }

    /// Closes the connection that has waited longest for a request, to make room for a new one;
    /// returns whether there was one.
    pub(crate) fn evict_oldest_waiting(&self) -> bool {
        let now = self.now_ms();
        // A candidate can start a request between the scan and the eviction; then try the next.
        for _ in 0..3 {
            let oldest = {
                let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
                open.values()
                    .filter_map(|s| s.clock.waiting_since().map(|since| (since, s.clone())))
                    .min_by_key(|(since, _)| *since)
            };
            let Some((since, state)) = oldest else {
                return false;
            };
            if state.clock.try_evict(now) {
                state.wake.notify_one();
                self.metrics.http_idle_evicted_total.fetch_add(1, Relaxed);
                let hit = self
                    .evicted_log
                    .lock()
                    .map(|mut l| l.hit(std::time::Instant::now()));
                if let Ok(Some(suppressed)) = hit {
                    tracing::info!(
                        limit = self.max,
                        waited_ms = now.saturating_sub(since),
                        suppressed,
                        "connection limit reached: closing the connection waiting longest for a request to admit a new one"
                    );
                }
                return true;
            }
        }
        false
    }

    /// Refuses a connection at the limit: counted, logged at a bounded rate, answered 503 if the
    /// socket takes it at once, closed.
    pub(crate) fn refuse(&self, stream: TcpStream, peer: std::net::SocketAddr) {
        self.metrics.http_refused_total.fetch_add(1, Relaxed);
        let hit = self
            .refused_log
            .lock()
            .map(|mut l| l.hit(std::time::Instant::now()));
        if let Ok(Some(suppressed)) = hit {
            tracing::warn!(
                %peer,
                limit = self.max,
                suppressed,
                "connection limit reached and every connection is busy: refusing (suppressed = refusals not logged since the last line)"
            );
        }
        // Best effort and never waited for: a fresh socket's send buffer is empty, and a client
        // that cannot take 130 bytes gets the close alone.
        let _ = stream.try_write(REFUSED);
    }
}

/// One admitted connection: its permit, clock and wake-up. Dropped when the socket closes.
pub(crate) struct Slot {
    id: u64,
    state: Arc<SlotState>,
    limits: Arc<Limits>,
    _permit: OwnedSemaphorePermit,
}

impl Slot {
    /// See [`ConnClock::on_request`].
    pub(crate) fn on_request(&self) -> bool {
        self.state.clock.on_request(self.limits.now_ms())
    }

    /// See [`ConnClock::on_response_done`].
    pub(crate) fn on_response_done(&self) {
        if self.state.clock.on_response_done(self.limits.now_ms()) {
            self.state.wake.notify_one();
        }
    }

    /// See [`ConnClock::on_upgrade`].
    pub(crate) fn on_upgrade(&self) {
        self.state.clock.on_upgrade(self.limits.now_ms());
    }

    fn on_read(&self) {
        if self.state.clock.on_read(self.limits.now_ms()) {
            self.state.wake.notify_one();
        }
    }

    fn on_write(&self, pending: bool) {
        if !pending {
            self.state.clock.on_write_progress();
        } else if self.state.clock.on_write_pending(self.limits.now_ms()) {
            self.state.wake.notify_one();
        }
    }

    /// Resolves when the connection must be closed: a deadline passed, or it was evicted.
    pub(crate) async fn expired(&self) -> Expiry {
        loop {
            // Registered before reading the clock, so a change in between is not missed.
            let changed = self.state.wake.notified();
            let now = self.limits.now_ms();
            match self.state.clock.deadline(&self.limits.timeouts) {
                Some((at, why)) if at <= now => return why,
                Some((at, _)) => {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(at - now)) => {}
                        _ = changed => {}
                    }
                }
                None => changed.await,
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.limits
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
        // Before the permit (a field, dropped after this): the gauge never exceeds the limit.
        self.limits.metrics.http_connections.fetch_sub(1, Relaxed);
    }
}

/// A connection's socket, reporting reads and stalled writes to its slot, and holding the slot
/// (so its permit) for as long as the socket lives, after an upgrade too.
pub(crate) struct TimedIo {
    io: TcpStream,
    slot: Arc<Slot>,
}

impl TimedIo {
    /// Wraps `io`, admitted under `slot`.
    pub(crate) fn new(io: TcpStream, slot: Arc<Slot>) -> Self {
        Self { io, slot }
    }

    fn track<T>(&self, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match &r {
            Poll::Pending => self.slot.on_write(true),
            Poll::Ready(_) => self.slot.on_write(false),
        }
        r
    }
}

impl AsyncRead for TimedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.slot.on_read();
        }
        r
    }
}

impl AsyncWrite for TimedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.track(r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.track(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts = Timeouts {
        header_read_ms: 10_000,
        idle_ms: 60_000,
        write_ms: 5_000,
    };

    #[test]
    fn a_new_connection_must_send_its_head_within_the_header_timeout() {
        let c = ConnClock::new(1_000);
        assert_eq!(c.deadline(&T), Some((11_000, Expiry::HeaderRead)));
        assert!(!c.on_read(5_000), "bytes of the head do not extend it");
        assert_eq!(c.deadline(&T), Some((11_000, Expiry::HeaderRead)));
    }

    #[test]
    fn a_served_connection_has_no_deadline_then_is_kept_alive_for_the_idle_timeout() {
        let c = ConnClock::new(0);
        c.on_request(100);
        assert_eq!(c.deadline(&T), None);
        assert!(c.on_response_done(200));
        assert_eq!(c.deadline(&T), Some((60_200, Expiry::Idle)));
    }

    #[test]
    fn the_first_byte_after_a_keep_alive_wait_starts_the_header_timer() {
        let c = ConnClock::new(0);
        c.on_request(0);
        c.on_response_done(1_000);
        assert!(c.on_read(30_000), "the deadline moved earlier");
        assert_eq!(c.deadline(&T), Some((40_000, Expiry::HeaderRead)));
        assert!(!c.on_read(35_000), "later bytes do not restart it");
        assert_eq!(c.deadline(&T), Some((40_000, Expiry::HeaderRead)));
    }

    #[test]
    fn a_stalled_write_sets_the_earliest_deadline_until_it_progresses() {
        let c = ConnClock::new(0);
        c.on_request(0);
        assert!(c.on_write_pending(1_000));
        assert!(!c.on_write_pending(2_000), "one stall, from its start");
        assert_eq!(c.deadline(&T), Some((6_000, Expiry::Write)));
        c.on_write_progress();
        assert_eq!(c.deadline(&T), None);
        c.on_response_done(7_000);
        c.on_write_pending(8_000);
        assert_eq!(c.deadline(&T), Some((13_000, Expiry::Write)));
    }

    #[test]
    fn only_connections_waiting_for_a_request_can_be_evicted() {
        let c = ConnClock::new(5);
        assert_eq!(c.waiting_since(), Some(5));
        c.on_request(10);
        assert_eq!(c.waiting_since(), None);
        assert!(!c.try_evict(11), "a request in progress is not evicted");
        c.on_response_done(20);
        assert_eq!(c.waiting_since(), Some(20));
        assert!(c.try_evict(30));
        assert_eq!(c.deadline(&T), Some((0, Expiry::Evicted)));
        assert!(!c.on_request(40), "a head read meanwhile is not served");
        assert_eq!(c.phase().0, Phase::Evicted, "eviction is final");
    }

    #[test]
    fn an_upgraded_connection_is_never_evicted_nor_timed_by_the_clock() {
        let c = ConnClock::new(0);
        c.on_request(1);
        c.on_upgrade(2);
        assert_eq!(c.phase(), (Phase::Upgraded, 2));
        assert!(!c.try_evict(3));
        assert_eq!(c.deadline(&T), None);
        assert!(
            !c.on_response_done(4),
            "the 101's empty body ends after the upgrade"
        );
        assert_eq!(c.phase().0, Phase::Upgraded);
    }

    #[test]
    fn phase_and_start_pack_into_one_word() {
        for phase in [
            Phase::Head,
            Phase::Idle,
            Phase::Busy,
            Phase::Upgraded,
            Phase::Evicted,
        ] {
            assert_eq!(unpack(pack(phase, 123_456_789)), (phase, 123_456_789));
        }
    }

    fn now(a: Admission) -> Arc<Slot> {
        match a {
            Admission::Now(s) => s,
            _ => panic!("expected a free slot"),
        }
    }

    #[tokio::test]
    async fn at_the_limit_the_connection_waiting_longest_makes_room() {
        let t = Timeouts {
            header_read_ms: 60_000,
            ..T
        };
        let limits = Arc::new(Limits::new(2, t, Arc::default()));
        let first = now(limits.admit());
        let second = now(limits.admit());
        second.on_request();
        let Admission::Soon(third) = limits.admit() else {
            panic!("the idle connection makes room")
        };
        assert_eq!(first.expired().await, Expiry::Evicted);
        assert!(
            matches!(limits.admit(), Admission::Refused),
            "the busy one is left alone, the evicted one is not picked twice"
        );
        drop(first);
        assert!(
            third.await.is_some(),
            "the evicted slot goes to the newcomer"
        );
        assert_eq!(limits.metrics.http_idle_evicted_total.load(Relaxed), 1);
        assert_eq!(limits.metrics.http_connections_peak.load(Relaxed), 2);
    }

    #[tokio::test]
    async fn a_freed_slot_goes_to_the_connection_in_line_not_a_later_one() {
        let limits = Arc::new(Limits::new(1, T, Arc::default()));
        let first = now(limits.admit());
        let Admission::Soon(second) = limits.admit() else {
            panic!("the idle connection makes room")
        };
        drop(first);
        assert!(
            matches!(limits.admit(), Admission::Refused),
            "the freed permit is promised to the connection in line"
        );
        assert!(second.await.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_expires_at_its_header_deadline() {
        let limits = Arc::new(Limits::new(1, T, Arc::default()));
        let slot = now(limits.admit());
        assert_eq!(slot.expired().await, Expiry::HeaderRead);
        assert!(limits.epoch.elapsed() >= Duration::from_secs(10));
    }
}
