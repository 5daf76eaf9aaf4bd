//! Wall-clock pacing of the publisher: at most `rate` publishes per second, on average.
//!
//! Sleeps per batch (about 10 ms worth of publishes, so at most ~100 wakeups a second), towards
//! absolute deadlines so timer granularity never accumulates into drift. It does not catch up
//! after a long stall (a reconnect): bursting would overrun rumqttd's subscriber buffers, which
//! drop silently.

use std::time::Duration;
use tokio::time::{sleep_until, Instant};

/// Behind schedule by more than this, the pacer forgets the backlog instead of bursting.
const MAX_LAG: Duration = Duration::from_secs(1);

/// See the module docs.
#[derive(Debug)]
pub(crate) struct Pacer {
    per_sec: f64,
    origin: Instant,
    sent: u64,
    pending: u64,
    batch: u64,
}

impl Pacer {
    /// A pacer for `per_sec` publishes per second (must be > 0 and finite).
    pub(crate) fn new(per_sec: f64) -> Self {
        Self {
            per_sec,
            origin: Instant::now(),
            sent: 0,
            pending: 0,
            // Float to int `as` saturates; the result is at least 1.
            batch: ((per_sec / 100.0) as u64).max(1),
        }
    }

    /// Records one publish; every batch, sleeps until the publishes so far are due.
    pub(crate) async fn tick(&mut self) {
        self.pending += 1;
        if self.pending < self.batch {
            return;
        }
        self.sent += std::mem::take(&mut self.pending);
        let due = self.origin + Duration::from_secs_f64(self.sent as f64 / self.per_sec);
        let now = Instant::now();
        if due > now {
            sleep_until(due).await;
        } else if now - due > MAX_LAG {
            tracing::debug!(
                lag_ms = (now - due).as_millis() as u64,
                "publisher fell behind; not catching up"
            );
            self.origin = now;
            self.sent = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn publishes_are_spread_at_the_configured_rate() {
        let t0 = Instant::now();
        let mut p = Pacer::new(1000.0);
        for _ in 0..5000 {
            p.tick().await;
        }
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(4990) && took <= Duration::from_millis(5010),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_stall_is_not_caught_up_with_a_burst() {
        let mut p = Pacer::new(100.0);
        tokio::time::advance(Duration::from_secs(10)).await;
        let t0 = Instant::now();
        for _ in 0..200 {
            p.tick().await;
        }
        // Without the reset the first 1000 publishes would be "overdue" and go out at once.
        assert!(
            t0.elapsed() >= Duration::from_millis(1990),
            "{:?}",
            t0.elapsed()
        );
    }
}
