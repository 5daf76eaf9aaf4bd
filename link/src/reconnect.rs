//! The reconnect decisions of a link, without I/O: which broker next, how long to wait, what the
//! incoming packet limit of the next connection is, and how a failure is described.
//!
//! [`crate::poll`] is the async shell that applies these decisions to a rumqttc event loop.
//!
//! **Poison messages.** rumqttc drops the connection when a packet exceeds `max_packet_bytes`, and on
//! a persistent session the broker redelivers that packet on every reconnect: the link would never
//! move again. So the failure is counted and the next connection accepts that one size; the message
//! is then read once and rejected by its consumer (and acknowledged), and the connection after that
//! goes back to the configured limit. What a publisher can make a link read is bounded by the
//! broker's own message size limit (mosquitto `message_size_limit`, NATS `max_payload`): set it.

use crate::backoff::Backoff;
use rumqttc::{ConnectionError, SubscribeReasonCode};

/// What a link does after a connection failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// How long to wait before the next attempt.
    pub delay_ms: u64,
    /// Index (into the link's addresses) of the broker to try next.
    pub next: usize,
    /// Incoming packet limit of the next connection.
    pub incoming_limit: usize,
}

/// What a link does once connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connected {
    /// Whether this connection follows failed attempts (logged as a reconnection).
    pub after_failures: bool,
    /// The incoming packet limit to set for the connection after this one, when it was raised
    /// for this one to read an oversized packet.
    pub restore_limit: Option<usize>,
}

/// Reconnect state of one link: backoff, the broker in use, the packet limit.
#[derive(Debug, Clone)]
pub struct Reconnect {
    backoff: Backoff,
    brokers: usize,
    current: usize,
    configured_limit: usize,
    raised: Option<usize>,
}

impl Reconnect {
    /// Backoff from 100 ms up to 10 s (jitter seeded by `seed`) over `brokers` addresses (at least
    /// one), with `configured_limit` as the link's incoming packet limit.
    pub fn new(brokers: usize, configured_limit: usize, seed: u64) -> Self {
        Self {
            backoff: Backoff::new(100, 10_000, seed),
            brokers: brokers.max(1),
            current: 0,
            configured_limit,
            raised: None,
        }
    }

    /// Index of the broker in use.
    pub fn current(&self) -> usize {
        self.current
    }

    /// A ConnAck arrived: the backoff starts over and a raised limit is dropped for the next one.
    pub fn connected(&mut self) -> Connected {
        let after_failures = self.backoff.attempts() > 0;
        self.backoff.reset();
        Connected {
            after_failures,
            restore_limit: self.raised.take().map(|_| self.configured_limit),
        }
    }

    /// The connection failed (`oversized`: the size of a packet over the limit that broke it):
    /// the next broker of the list, after a growing delay, reading that packet if there was one.
    pub fn failed(&mut self, oversized: Option<usize>) -> Retry {
        if let Some(size) = oversized {
            self.raised = Some(size.max(self.configured_limit));
        }
        self.current = (self.current + 1) % self.brokers;
        Retry {
            delay_ms: self.backoff.next_delay_ms(),
            next: self.current,
            incoming_limit: self.raised.unwrap_or(self.configured_limit),
        }
    }
}

/// The size of the packet that broke the connection by exceeding the incoming limit, if that was it.
pub fn oversized(e: &ConnectionError) -> Option<usize> {
    match e {
        ConnectionError::MqttState(rumqttc::StateError::Deserialization(
            rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(size),
        )) => Some(*size),
        _ => None,
    }
}

/// How many subscriptions of one SUBACK the broker refused (return code 0x80).
pub fn refused(codes: &[SubscribeReasonCode]) -> usize {
    codes
        .iter()
        .filter(|c| matches!(c, SubscribeReasonCode::Failure))
        .count()
}

/// One line naming `broker` and why the connection failed (refusal code, TLS problem, I/O error).
pub fn describe(broker: &str, e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(code) => refusal_message(broker, *code as u8),
        other => failure_message(broker, other),
    }
}

/// Why connecting to `broker` (`host:port`) failed, in one line that names it:
/// `TLS handshake with 127.0.0.1:8883 failed: invalid peer certificate: UnknownIssuer` when TLS is
/// the cause anywhere in the error's source chain, else `connection to 127.0.0.1:8883 failed: …`.
pub fn failure_message(broker: &str, err: &(dyn std::error::Error + 'static)) -> String {
    if let Some(tls) = crate::tls::rustls_cause(err) {
        return format!("TLS handshake with {broker} failed: {tls}");
    }
    format!("connection to {broker} failed: {err}")
}

/// Why `broker` refused an MQTT 3.1.1 CONNECT, from the CONNACK return code:
/// `broker 127.0.0.1:8883 refused the connection: bad user name or password`.
pub fn refusal_message(broker: &str, return_code: u8) -> String {
    let why = match return_code {
        1 => "unacceptable protocol version".to_string(),
        2 => "client id rejected".to_string(),
        3 => "server unavailable".to_string(),
        4 => "bad user name or password".to_string(),
        5 => "not authorized (check the user name, password and client certificate)".to_string(),
        other => format!("return code {other}"),
    };
    format!("broker {broker} refused the connection: {why}")
}

/// Why a connection whose SUBACK refused `count` subscriptions (`named`, when known) is dropped.
/// NATS refuses a QoS 1 subscription when it cannot create the subscription's JetStream consumer:
/// during a leader election (a timeout; the next connection usually succeeds), or beyond 63 QoS 1
/// subscriptions in one session (each reserves `max_ack_pending`, 1,024 by default, of 65,535).
pub fn subscription_refusal_message(broker: &str, count: usize, named: &[String]) -> String {
    let named = if named.is_empty() {
        String::new()
    } else {
        format!(" {named:?}")
    };
    format!(
        "broker {broker} refused {count} subscription(s){named}, so nothing would arrive on them; \
         on NATS: a JetStream consumer could not be created (leader election, or more than 63 QoS 1 \
         subscriptions in one session)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_rotate_through_every_broker_and_back_to_the_primary() {
        let mut r = Reconnect::new(3, 1024, 7);
        let next: Vec<usize> = (0..4).map(|_| r.failed(None).next).collect();
        assert_eq!(next, vec![1, 2, 0, 1]);
        assert_eq!(r.current(), 1);
        // A single broker is always the one tried again.
        let mut one = Reconnect::new(1, 1024, 7);
        assert_eq!(one.failed(None).next, 0);
        assert_eq!(Reconnect::new(0, 1024, 7).failed(None).next, 0);
    }

    #[test]
    fn delays_grow_while_failing_and_start_over_after_a_connection() {
        let mut r = Reconnect::new(1, 1024, 7);
        let first = r.failed(None).delay_ms;
        assert!((50..=100).contains(&first), "{first}");
        let delays: Vec<u64> = (0..10).map(|_| r.failed(None).delay_ms).collect();
        assert!(delays.iter().all(|&d| d <= 10_000), "{delays:?}");
        assert!(delays[9] >= 5_000, "{delays:?}");
        let c = r.connected();
        assert!(c.after_failures);
        assert!(r.failed(None).delay_ms <= 100);
        assert!(!Reconnect::new(1, 1024, 7).connected().after_failures);
    }

    #[test]
    fn an_oversized_packet_raises_the_limit_for_one_connection_only() {
        let mut r = Reconnect::new(2, 1024, 7);
        let retry = r.failed(Some(5000));
        assert_eq!(retry.incoming_limit, 5000);
        // Still raised on the next broker, until a connection reads the packet.
        assert_eq!(r.failed(None).incoming_limit, 5000);
        assert_eq!(r.connected().restore_limit, Some(1024));
        assert_eq!(r.failed(None).incoming_limit, 1024);
        assert_eq!(r.connected().restore_limit, None);
        // Never below the configured limit.
        assert_eq!(r.failed(Some(10)).incoming_limit, 1024);
    }

    #[test]
    fn failures_are_classified_and_described_with_the_broker() {
        let e = ConnectionError::ConnectionRefused(rumqttc::ConnectReturnCode::BadUserNamePassword);
        assert_eq!(
            describe("127.0.0.1:8883", &e),
            "broker 127.0.0.1:8883 refused the connection: bad user name or password"
        );
        assert_eq!(oversized(&e), None);
        let e = ConnectionError::Io(std::io::Error::other("reset"));
        assert_eq!(describe("h:1", &e), "connection to h:1 failed: I/O: reset");
        let e = ConnectionError::MqttState(rumqttc::StateError::Deserialization(
            rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(4096),
        ));
        assert_eq!(oversized(&e), Some(4096));
    }

    #[test]
    fn refusals_and_failures_name_the_broker() {
        assert_eq!(
            refusal_message("127.0.0.1:8883", 4),
            "broker 127.0.0.1:8883 refused the connection: bad user name or password"
        );
        assert!(refusal_message("h:1", 9).ends_with("return code 9"));
        let e = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(
            failure_message("h:1", &e),
            "connection to h:1 failed: refused"
        );
    }

    #[test]
    fn refused_subscriptions_are_counted_and_named_with_the_broker() {
        let codes = [
            SubscribeReasonCode::Success(rumqttc::QoS::AtLeastOnce),
            SubscribeReasonCode::Failure,
        ];
        assert_eq!(refused(&codes), 1);
        assert_eq!(refused(&codes[..1]), 0);
        let why = subscription_refusal_message("127.0.0.1:1885", 1, &[]);
        assert!(
            why.starts_with("broker 127.0.0.1:1885 refused 1 subscription(s), so"),
            "{why}"
        );
        let why = subscription_refusal_message("h:1", 1, &["a/+".to_string()]);
        assert!(
            why.starts_with("broker h:1 refused 1 subscription(s) [\"a/+\"]"),
            "{why}"
        );
    }
}
