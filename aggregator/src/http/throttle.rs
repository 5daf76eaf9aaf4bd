//! A log line rate limit: at most one line per period for a recurring event, carrying the count
//! of the events not logged since the last line. Refusals at the connection limit happen once
//! per connection attempt, so during a flood an unthrottled warning per refusal would itself be
//! the denial of service (issue 13: 5,006 lines in 4.5 s). The metrics count every event; the
//! log only says that it is happening. No I/O: the time is an argument.

use std::time::{Duration, Instant};

/// One line per `every` for one kind of event.
#[derive(Debug)]
pub(crate) struct LogThrottle {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogThrottle {
    /// A throttle letting one line through per `every`.
    pub(crate) fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// Records one event at `now`: `Some(n)` when it should be logged, `n` being the events
    /// swallowed since the previous line; `None` when it falls inside the quiet period.
    pub(crate) fn hit(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_event_is_logged_and_a_burst_after_it_is_counted() {
        let t0 = Instant::now();
        let mut t = LogThrottle::new(Duration::from_secs(5));
        assert_eq!(t.hit(t0), Some(0));
        for i in 1..=5_000u64 {
            assert_eq!(t.hit(t0 + Duration::from_micros(i)), None);
        }
        assert_eq!(
            t.hit(t0 + Duration::from_secs(5)),
            Some(5_000),
            "the next line reports what was swallowed"
        );
        assert_eq!(t.hit(t0 + Duration::from_secs(6)), None);
    }

    #[test]
    fn a_flood_logs_one_line_per_period() {
        let t0 = Instant::now();
        let mut t = LogThrottle::new(Duration::from_secs(5));
        // 60 s of one event per millisecond.
        let lines = (0..60_000u64)
            .filter(|ms| t.hit(t0 + Duration::from_millis(*ms)).is_some())
            .count();
        assert_eq!(lines, 12);
    }

    #[test]
    fn rare_events_are_all_logged() {
        let t0 = Instant::now();
        let mut t = LogThrottle::new(Duration::from_secs(5));
        for i in 0..4 {
            assert_eq!(t.hit(t0 + Duration::from_secs(10 * i)), Some(0));
        }
    }
}
