//! Waiting for a condition with a deadline instead of sleeping: here, for an MQTT client's
//! subscription to reach mosquitto, read from the broker's own log.

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A mosquitto log of subscriptions: add [`SubscriptionLog::settings`] to the broker's config,
/// then wait for a client's subscription with [`SubscriptionLog::wait_subscribed`].
pub struct SubscriptionLog {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl SubscriptionLog {
    /// A log in a fresh directory the broker can write to (mosquitto drops root privileges).
    pub fn new() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let path = dir.path().join("mosquitto.log");
        Self { _dir: dir, path }
    }

    /// mosquitto config lines writing one line per subscribed filter to this log
    /// (`<time>: <client id> <qos> <filter>`).
    pub fn settings(&self) -> String {
        format!(
            "log_dest file {}\nlog_type subscribe\n",
            self.path.display()
        )
    }

    /// Waits (up to `timeout`) until client `client_id` has subscribed to at least one filter.
    pub async fn wait_subscribed(&self, client_id: &str, timeout: Duration) {
        let needle = format!(": {client_id} ");
        let deadline = Instant::now() + timeout;
        loop {
            let log = std::fs::read_to_string(&self.path).unwrap_or_default();
            if log.lines().any(|l| l.contains(&needle)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {client_id} to subscribe; broker log:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
