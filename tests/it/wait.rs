//! Waiting for a condition with a deadline instead of sleeping: for an MQTT client's
//! subscription to reach mosquitto (read from its log) or the embedded broker (seen through a relay).

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

    /// [`Self::settings`] plus a line per unsubscribed filter (`<time>: <client id> <filter>`).
    pub fn settings_with_unsubscribes(&self) -> String {
        format!("{}log_type unsubscribe\n", self.settings())
    }

    /// Waits (up to `timeout`) until the log has a line ending in `: <client_id> <rest>`: with
    /// [`Self::settings_with_unsubscribes`], `rest` = a filter is its unsubscription and
    /// `rest` = `<qos> <filter>` a subscription.
    pub async fn wait_line(&self, client_id: &str, rest: &str, timeout: Duration) {
        let needle = format!(": {client_id} {rest}");
        let deadline = Instant::now() + timeout;
        loop {
            let log = std::fs::read_to_string(&self.path).unwrap_or_default();
            if log.lines().any(|l| l.ends_with(&needle)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {needle:?} in the broker's log:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits (up to `timeout`) until client `client_id` has subscribed to at least one filter.
    pub async fn wait_subscribed(&self, client_id: &str, timeout: Duration) {
        self.wait_filters(client_id, 1, timeout).await;
    }

    /// Waits (up to `timeout`) until client `client_id` has subscribed to at least `filters`
    /// filters (counted over the broker's whole run).
    pub async fn wait_filters(&self, client_id: &str, filters: usize, timeout: Duration) {
        let needle = format!(": {client_id} ");
        let deadline = Instant::now() + timeout;
        loop {
            let log = std::fs::read_to_string(&self.path).unwrap_or_default();
            if log.lines().filter(|l| l.contains(&needle)).count() >= filters {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {client_id} to subscribe to {filters} filter(s); broker log:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A TCP relay in front of a broker that notes which MQTT clients have had a subscription
/// acknowledged (a SUBACK without refusals reached them): the embedded broker (rumqttd) writes no
/// log and offers no query of its subscriptions, so clients that must be subscribed before
/// readings are published connect through this relay, and the test waits with
/// [`SubAckTap::wait_subscribed`]. Only each connection's CONNECT and the packets up to its first
/// SUBACK are parsed; everything else is copied through untouched.
pub struct SubAckTap {
    port: u16,
    acked: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl SubAckTap {
    /// Starts relaying a free loopback port to `broker`.
    pub async fn start(broker: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = acked.clone();
        let task = tokio::spawn(async move {
            // Dropped (and so aborted) with the accept loop when the tap is dropped.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                connections.spawn(relay(client, broker, sink.clone()));
            }
        });
        Self { port, acked, task }
    }

    /// The port clients connect to instead of the broker's.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Waits (up to `timeout`) until client `client_id` has had a subscription acknowledged.
    pub async fn wait_subscribed(&self, client_id: &str, timeout: Duration) {
        self.wait_connections_subscribed(client_id, 1, timeout)
            .await;
    }

    /// Waits (up to `timeout`) until `connections` connections of client `client_id` have each had
    /// a subscription acknowledged (counted over the tap's whole run): a restarted or reconnected
    /// client is subscribed again once the count passes what it was before.
    pub async fn wait_connections_subscribed(
        &self,
        client_id: &str,
        connections: usize,
        timeout: Duration,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            let acked = self.acked.lock().unwrap().clone();
            if acked.iter().filter(|c| *c == client_id).count() >= connections {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {client_id}'s subscription to be acknowledged through the tap ({connections} connection(s)); acknowledged so far: {acked:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for SubAckTap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Relays one connection: client→broker until the CONNECT has named the client, broker→client
/// until that client's first accepted SUBACK, then plain copies.
async fn relay(
    client: tokio::net::TcpStream,
    broker: std::net::SocketAddr,
    acked: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(upstream) = tokio::net::TcpStream::connect(broker).await else {
        return; // the broker is down: the client sees a closed connection, as without the tap
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut br, mut bw) = upstream.into_split();
    let (id_tx, id_rx) = tokio::sync::oneshot::channel::<String>();
    let up = async move {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 16 * 1024];
        let mut id_tx = Some(id_tx);
        loop {
            let n = match cr.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if bw.write_all(&chunk[..n]).await.is_err() {
                break;
            }
            if id_tx.is_some() {
                buf.extend_from_slice(&chunk[..n]);
                if let Some((packet_type, body, _)) = next_packet(&buf) {
                    if packet_type == 1 {
                        if let (Some(id), Some(tx)) = (connect_client_id(body), id_tx.take()) {
                            let _ = tx.send(id);
                        }
                    }
                    id_tx = None;
                    buf = Vec::new();
                }
            }
        }
        let _ = bw.shutdown().await;
    };
    let down = async move {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 16 * 1024];
        let mut id_rx = Some(id_rx);
        let mut client_id: Option<String> = None;
        let mut watching = true;
        loop {
            let n = match br.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if watching {
                buf.extend_from_slice(&chunk[..n]);
                while let Some((packet_type, body, len)) = next_packet(&buf) {
                    // SUBACK: packet id, then one return code per filter (0x80 and up: refused).
                    if packet_type == 9 && body.len() > 2 && body[2..].iter().all(|&c| c < 0x80) {
                        if client_id.is_none() {
                            if let Some(rx) = id_rx.take() {
                                client_id = rx.await.ok();
                            }
                        }
                        if let Some(id) = &client_id {
                            acked.lock().unwrap().push(id.clone());
                        }
                        watching = false;
                        break;
                    }
                    buf.drain(..len);
                }
                if !watching {
                    buf = Vec::new();
                }
            }
            // Forwarded after noting it: a client that has its SUBACK is already in the list.
            if cw.write_all(&chunk[..n]).await.is_err() {
                break;
            }
        }
        let _ = cw.shutdown().await;
    };
    tokio::join!(up, down);
}

/// The first complete MQTT packet in `buf`: (packet type, body after the fixed header, total length).
fn next_packet(buf: &[u8]) -> Option<(u8, &[u8], usize)> {
    let first = *buf.first()?;
    let mut remaining = 0usize;
    let mut shift = 0;
    for (i, &b) in buf.iter().enumerate().skip(1).take(4) {
        remaining |= usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            let start = i + 1;
            let end = start + remaining;
            return (buf.len() >= end).then(|| (first >> 4, &buf[start..end], end));
        }
    }
    None
}

/// The client id of a CONNECT packet's body (MQTT 3.1.1 or 5).
fn connect_client_id(body: &[u8]) -> Option<String> {
    let name_len = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    let level_at = 2 + name_len;
    let level = *body.get(level_at)?;
    // Level, flags and keep-alive, then (MQTT 5) the properties.
    let mut at = level_at + 4;
    if level == 5 {
        let (len, used) = varint(body.get(at..)?)?;
        at += used + len;
    }
    let id_len = usize::from(u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]));
    let id = body.get(at + 2..at + 2 + id_len)?;
    String::from_utf8(id.to_vec()).ok()
}

/// An MQTT variable byte integer: (value, bytes used).
fn varint(buf: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, &b) in buf.iter().enumerate().take(4) {
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

    /// A client through `tap` that subscribes to `filter` (if any) once connected; returns once
    /// its ConnAck has arrived.
    async fn client(tap: &SubAckTap, id: &str, filter: Option<&str>) -> AsyncClient {
        let (client, mut el) = AsyncClient::new(MqttOptions::new(id, "127.0.0.1", tap.port()), 10);
        if let Some(f) = filter {
            client.subscribe(f, QoS::AtLeastOnce).await.unwrap();
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut tx = Some(tx);
            while let Ok(ev) = el.poll().await {
                if let (Event::Incoming(Packet::ConnAck(_)), Some(tx)) = (ev, tx.take()) {
                    let _ = tx.send(());
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .expect("ConnAck through the tap within 10 s")
            .unwrap();
        client
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_tap_names_clients_whose_subscription_was_acknowledged_and_only_those() {
        let broker = crate::common::embedded_broker();
        let tap = SubAckTap::start(broker.addr()).await;
        let _idle = client(&tap, "tap-idle", None).await;
        let _subscriber = client(&tap, "tap-subscriber", Some("tap/+/x")).await;
        tap.wait_subscribed("tap-subscriber", Duration::from_secs(10))
            .await;
        assert_eq!(*tap.acked.lock().unwrap(), ["tap-subscriber"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[should_panic(expected = "timed out waiting for tap-never's subscription")]
    async fn waiting_for_a_client_that_never_subscribes_fails_naming_it() {
        let broker = crate::common::embedded_broker();
        let tap = SubAckTap::start(broker.addr()).await;
        let _idle = client(&tap, "tap-never", None).await;
        tap.wait_subscribed("tap-never", Duration::from_millis(300))
            .await;
    }

    #[test]
    fn connect_packets_of_mqtt_3_and_5_name_their_client() {
        // CONNECT, remaining length 16: "MQTT", level 4, clean session, keep-alive 60, id "abcd".
        let v4 = [
            0x10, 16, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 4, b'a', b'b', b'c', b'd',
        ];
        let (kind, body, len) = next_packet(&v4).unwrap();
        assert_eq!((kind, len), (1, v4.len()));
        assert_eq!(connect_client_id(body).as_deref(), Some("abcd"));
        // MQTT 5: properties (length 1 here) come before the id; they are skipped whole.
        let v5 = [
            0x10, 17, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 1, 0x17, 0, 3, b'x', b'y', b'z',
        ];
        let (_, body, _) = next_packet(&v5).unwrap();
        assert_eq!(connect_client_id(body).as_deref(), Some("xyz"));
        // Incomplete: not a packet yet.
        assert!(next_packet(&v4[..10]).is_none());
    }
}
