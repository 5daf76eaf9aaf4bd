//! A Prometheus histogram of durations in lock-free counters: fixed bucket bounds, observed from
//! any thread, rendered as `_bucket{le=...}`, `_sum` and `_count` in seconds.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the buckets, seconds: 5 ms to 10 min, roughly ×2.5 apart (a window emit waits
/// for its window's allowed lateness, an ack for the owner's flush, an outage for minutes).
pub const BOUNDS_SECS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 600.0,
];

/// Durations observed, by bucket (cumulative only when rendered).
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket; the last one is `+Inf`.
    buckets: [AtomicU64; BOUNDS_SECS.len() + 1],
    /// Sum of the observations, microseconds.
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// Counts one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BOUNDS_SECS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(BOUNDS_SECS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        // Saturating: a clock jump must not wrap the sum around.
        let _ = self
            .sum_us
            .fetch_update(Relaxed, Relaxed, |s| Some(s.saturating_add(us)));
        self.count.fetch_add(1, Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// The series of the family `name` (its HELP and TYPE written by the caller), every one
    /// labelled with `labels` (`agent="gw"`).
    pub fn render(&self, name: &str, labels: &str, out: &mut String) {
        let mut cumulative = 0u64;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Relaxed);
            let le = BOUNDS_SECS
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |v| v.to_string());
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_us.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count.load(Relaxed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_the_sum_is_in_seconds() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(10));
        h.observe(Duration::from_secs(7200));
        let mut out = String::new();
        h.render("x_seconds", "agent=\"gw\"", &mut out);
        assert!(
            out.contains("x_seconds_bucket{agent=\"gw\",le=\"0.005\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{agent=\"gw\",le=\"0.01\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{agent=\"gw\",le=\"600\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{agent=\"gw\",le=\"+Inf\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_sum{agent=\"gw\"} 7200.013\n"),
            "{out}"
        );
        assert!(out.contains("x_seconds_count{agent=\"gw\"} 3\n"), "{out}");
        assert_eq!(h.count(), 3);
    }

    #[test]
    fn a_huge_duration_lands_in_the_last_bucket_without_overflow() {
        let h = Histogram::default();
        h.observe(Duration::MAX);
        h.observe(Duration::MAX);
        let mut out = String::new();
        h.render("x", "a=\"b\"", &mut out);
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 2"), "{out}");
        assert!(out.contains("x_count{a=\"b\"} 2"), "{out}");
    }
}
