//! The periodic one-line INFO status (`log.status_interval_ms`): rates since the last line, series,
//! windows, outbox, oldest unacknowledged record and lag. [`StatusLine`] computes a line from two
//! samples of the counters and the time between them; the task only samples and logs.

use crate::config::AgentConfig;
use crate::telemetry::AgentMetrics;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The counters a status line is made of, at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Sample {
    pub readings: u64,
    pub rejected: u64,
    pub windows: u64,
    pub anomalies: u64,
    pub series: u64,
    pub outbox_records: u64,
    pub outbox_bytes: u64,
    pub oldest_unacked: Duration,
    pub lag_ms: i64,
    pub source_connected: bool,
    pub uplink_connected: bool,
}

impl Sample {
    pub(crate) fn of(m: &AgentMetrics) -> Self {
        Self {
            readings: m.readings_total.load(Relaxed),
            rejected: m.rejected_total(),
            windows: m.windows_total.load(Relaxed),
            anomalies: m.anomalies_total.load(Relaxed),
            series: m.series.load(Relaxed),
            outbox_records: m.outbox_records.load(Relaxed),
            outbox_bytes: m.outbox_bytes.load(Relaxed),
            oldest_unacked: m
                .lane_reports()
                .iter()
                .map(|l| l.oldest_unacked)
                .max()
                .unwrap_or_default(),
            lag_ms: m.event_lag_ms.load(Relaxed),
            source_connected: m.source_connected.load(Relaxed) == 1,
            uplink_connected: m.uplink_connected.load(Relaxed) == 1,
        }
    }
}

/// The figures of one status line.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StatusLine {
    pub readings_per_sec: f64,
    pub rejected: u64,
    pub windows: u64,
    pub anomalies: u64,
    pub now: Sample,
}

impl StatusLine {
    /// The line for the period from `prev` to `now`, `elapsed` apart. Counters that went
    /// backwards (they never do) count as zero; a zero period gives a zero rate.
    pub(crate) fn between(prev: &Sample, now: &Sample, elapsed: Duration) -> Self {
        let secs = elapsed.as_secs_f64();
        let readings = now.readings.saturating_sub(prev.readings);
        Self {
            readings_per_sec: if secs > 0.0 {
                readings as f64 / secs
            } else {
                0.0
            },
            rejected: now.rejected.saturating_sub(prev.rejected),
            windows: now.windows.saturating_sub(prev.windows),
            anomalies: now.anomalies.saturating_sub(prev.anomalies),
            now: *now,
        }
    }

    /// The line's message.
    pub(crate) fn message(&self) -> String {
        let n = &self.now;
        let link = |up: bool| if up { "up" } else { "DOWN" };
        format!(
            "status: {:.1} readings/s, {} rejected, {} series, {} windows, {} anomalies; outbox {} records, {} bytes, oldest unacked {} s; lag {} ms; source {}, uplink {}",
            self.readings_per_sec,
            self.rejected,
            n.series,
            self.windows,
            self.anomalies,
            n.outbox_records,
            n.outbox_bytes,
            n.oldest_unacked.as_secs(),
            n.lag_ms,
            link(n.source_connected),
            link(n.uplink_connected),
        )
    }
}

/// Logs a status line every `log.status_interval_ms` of the configuration in force (none while it
/// is 0; a reload changes it from the next line on) until `cancel`.
pub(crate) async fn run(
    agent: String,
    metrics: Arc<AgentMetrics>,
    mut cfg: watch::Receiver<Arc<AgentConfig>>,
    cancel: CancellationToken,
) {
    let mut prev = Sample::of(&metrics);
    let mut at = tokio::time::Instant::now();
    // False once nothing can change the configuration any more (no reloads): the interval stays.
    let mut open = true;
    loop {
        let interval_ms = cfg.borrow_and_update().log.status_interval_ms;
        let sleep = tokio::time::sleep(Duration::from_millis(interval_ms.max(1)));
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = sleep, if interval_ms > 0 => {}
            // A new configuration: start the period again with its interval.
            r = cfg.changed(), if open => {
                open = r.is_ok();
                continue;
            }
        }
        let now = Sample::of(&metrics);
        let t = tokio::time::Instant::now();
        let line = StatusLine::between(&prev, &now, t.duration_since(at));
        tracing::info!(agent = %agent, "{}", line.message());
        prev = now;
        at = t;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_reports_rates_and_deltas_over_its_period() {
        let prev = Sample {
            readings: 1_000,
            windows: 10,
            rejected: 2,
            ..Sample::default()
        };
        let now = Sample {
            readings: 4_000,
            windows: 25,
            rejected: 2,
            anomalies: 1,
            series: 50,
            outbox_records: 7,
            outbox_bytes: 2_048,
            oldest_unacked: Duration::from_millis(1_900),
            lag_ms: 120,
            source_connected: true,
            uplink_connected: false,
        };
        let line = StatusLine::between(&prev, &now, Duration::from_secs(60));
        assert_eq!(line.readings_per_sec, 50.0);
        assert_eq!(
            line.message(),
            "status: 50.0 readings/s, 0 rejected, 50 series, 15 windows, 1 anomalies; outbox 7 records, 2048 bytes, oldest unacked 1 s; lag 120 ms; source up, uplink DOWN"
        );
    }

    #[test]
    fn a_zero_period_or_counters_going_back_give_zeros_not_a_panic() {
        let prev = Sample {
            readings: 10,
            windows: 5,
            ..Sample::default()
        };
        let line = StatusLine::between(&prev, &Sample::default(), Duration::ZERO);
        assert_eq!(line.readings_per_sec, 0.0);
        assert_eq!(line.windows, 0);
    }
}
