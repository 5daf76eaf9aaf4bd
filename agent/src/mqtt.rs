//! Mapping the shared link settings onto rumqttc, and the reconnecting poll loop both links use.
//!
//! rumqttc reconnects on the next `poll()` with no delay; this loop adds capped exponential backoff
//! with jitter, counts every connection error and reports (re)connections to the caller. A SUBACK
//! refusing a subscription counts as a connection error: the connection is dropped and made again
//! (NATS refuses QoS 1 subscriptions while a JetStream leader election is running).
//!
//! **Poison messages.** rumqttc drops the connection when a packet exceeds `max_packet_bytes`, and on
//! a persistent session the broker redelivers that packet on every reconnect: the link would never
//! move again. So the loop counts it (`oversized_packets_total`) and makes the next connection
//! accept that one size; the message is then read once and rejected by its consumer (the pipeline's
//! `max_payload_bytes`, counted) and acknowledged, and the connection after that goes back to the
//! configured limit. What a publisher can make the agent read is bounded by the broker's own
//! message size limit (mosquitto `message_size_limit`, NATS `max_payload`): set it. TLS comes
//! from [`edgewatch_models::tls`]: the files are read here, once per link, when options are built.

use crate::error::AgentError;
use crate::telemetry::AgentMetrics;
use edgewatch_models::backoff::Backoff;
use edgewatch_models::link::{self, MqttLink};
use rumqttc::{
    ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, SubscribeReasonCode,
    TlsConfiguration, Transport,
};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// rumqttc options for every address of `link` (primary first, then the alternates), with the
/// password resolved from the environment and the TLS files read, if configured.
pub(crate) fn options(link: &MqttLink, client_id: String) -> Result<Vec<MqttOptions>, AgentError> {
    let tls = match &link.tls {
        Some(t) => Some(t.client_config().map_err(|source| AgentError::Tls {
            broker: format!("{}:{}", link.host, link.port),
            source,
        })?),
        None => None,
    };
    link.addresses()
        .into_iter()
        .map(|(host, port)| {
            let mut o = options_for(link, client_id.clone(), host, port)?;
            if let Some(cfg) = &tls {
                o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                    cfg.clone(),
                )));
            }
            Ok(o)
        })
        .collect()
}

/// One line naming `broker` and why the connection failed (refusal code, TLS problem, I/O error).
pub(crate) fn describe(broker: &str, e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(code) => link::refusal_message(broker, *code as u8),
        other => link::failure_message(broker, other),
    }
}

fn options_for(
    link: &MqttLink,
    client_id: String,
    host: String,
    port: u16,
) -> Result<MqttOptions, AgentError> {
    let mut o = MqttOptions::new(client_id, host, port);
    o.set_keep_alive(Duration::from_secs(link.keepalive_secs))
        .set_max_packet_size(link.max_packet_bytes, link.max_packet_bytes)
        .set_request_channel_capacity(link.request_channel)
        .set_inflight(u16::try_from(link.request_channel.clamp(1, 1000)).unwrap_or(1000));
    if let Some(user) = &link.username {
        let password = link.resolve_password().map_err(AgentError::Secret)?;
        o.set_credentials(user.clone(), password.unwrap_or_default());
    }
    Ok(o)
}

/// What the poll loop tells its owner.
pub(crate) enum LinkEvent {
    /// Connected (again): subscriptions must be (re)made.
    Connected,
    /// A message arrived.
    Publish(rumqttc::Publish),
    /// The broker acknowledged a QoS 1 publish.
    PubAck,
    /// The connection failed; the loop backs off and reconnects.
    Disconnected,
}

/// Polls `eventloop` until `cancel` or until our own Disconnect has been sent, calling `on_event` for what matters; backs off after errors.
pub(crate) async fn poll_loop<F, Fut>(
    mut eventloop: EventLoop,
    addresses: Vec<MqttOptions>,
    name: &'static str,
    metrics: &AgentMetrics,
    cancel: CancellationToken,
    mut on_event: F,
) where
    F: FnMut(LinkEvent) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut backoff = Backoff::new(100, 10_000, u64::from(std::process::id()));
    let broker_of = |o: &MqttOptions| format!("{}:{}", o.broker_address().0, o.broker_address().1);
    let mut broker = broker_of(&eventloop.mqtt_options);
    let mut current = 0usize;
    // The limit configured, and a one-connection raise to read an oversized packet past it.
    let configured = eventloop.mqtt_options.max_packet_size();
    let mut raised: Option<usize> = None;
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => return,
            e = eventloop.poll() => e,
        };
        let failure = match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if backoff.attempts() > 0 {
                    tracing::info!(link = name, %broker, "reconnected");
                } else {
                    tracing::debug!(link = name, %broker, "connected");
                }
                backoff.reset();
                if raised.take().is_some() {
                    // This connection reads the oversized packet; the next one has the usual limit.
                    set_incoming_limit(&mut eventloop.mqtt_options, configured, configured);
                }
                on_event(LinkEvent::Connected).await;
                None
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                on_event(LinkEvent::Publish(p)).await;
                None
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                on_event(LinkEvent::PubAck).await;
                None
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) if refused(&ack.return_codes) > 0 => {
                // The connection stays up but nothing will ever arrive on that subscription: drop
                // it and start over (the owner subscribes again on the next Connected).
                eventloop.clean();
                Some(refusal_message(&broker, refused(&ack.return_codes)))
            }
            // Everything queued before our Disconnect request has been written: done.
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => None,
            Err(e) => {
                if let Some(size) = oversized(&e) {
                    metrics.oversized_packets_total.fetch_add(1, Relaxed);
                    tracing::warn!(link = name, %broker, size, max_packet_bytes = configured, "a message larger than max_packet_bytes arrived; the next connection reads it once so it can be rejected and acknowledged instead of redelivered forever");
                    raised = Some(size.max(configured));
                }
                Some(describe(&broker, &e))
            }
        };
        if let Some(error) = failure {
            metrics.connection_errors_total.fetch_add(1, Relaxed);
            on_event(LinkEvent::Disconnected).await;
            let delay = backoff.next_delay_ms();
            if addresses.len() > 1 {
                // Try the next broker of the list on the next attempt.
                current = (current + 1) % addresses.len();
                eventloop.mqtt_options = addresses[current].clone();
            }
            if let Some(size) = raised {
                set_incoming_limit(&mut eventloop.mqtt_options, size, configured);
            }
            let next = broker_of(&eventloop.mqtt_options);
            tracing::warn!(link = name, %broker, %next, %error, retry_in_ms = delay, "mqtt connection error; will reconnect");
            broker = next;
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(delay)) => {}
            }
        }
    }
}

/// The size of the packet that broke the connection by exceeding the incoming limit, if that was it.
fn oversized(e: &ConnectionError) -> Option<usize> {
    match e {
        ConnectionError::MqttState(rumqttc::StateError::Deserialization(
            rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(size),
        )) => Some(*size),
        _ => None,
    }
}

/// Sets the incoming packet limit of `o` for its next connection; outgoing stays `configured`.
fn set_incoming_limit(o: &mut MqttOptions, incoming: usize, configured: usize) {
    o.set_max_packet_size(incoming, configured);
}

/// How many subscriptions of one SUBACK the broker refused (return code 0x80).
fn refused(codes: &[SubscribeReasonCode]) -> usize {
    codes
        .iter()
        .filter(|c| matches!(c, SubscribeReasonCode::Failure))
        .count()
}

/// Why a connection whose SUBACK refused `count` subscriptions is dropped. NATS refuses a QoS 1
/// subscription when it cannot create its JetStream consumer, e.g. during a leader election.
fn refusal_message(broker: &str, count: usize) -> String {
    format!(
        "broker {broker} refused {count} subscription(s), so nothing would arrive on them; \
         on NATS: a JetStream consumer could not be created (e.g. during a leader election)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgewatch_models::tls::TlsSettings;

    #[test]
    fn a_missing_ca_file_names_the_broker_the_field_and_the_path() {
        let link = MqttLink {
            port: 8883,
            tls: Some(TlsSettings::with_ca("/nonexistent/edgewatch-ca.pem")),
            ..Default::default()
        };
        let e = options(&link, "c".into()).unwrap_err().to_string();
        assert!(
            e.starts_with("mqtt link to 127.0.0.1:8883: tls.ca_file: cannot read /nonexistent/edgewatch-ca.pem"),
            "{e}"
        );
    }

    #[test]
    fn refusals_are_described_with_the_broker_and_the_reason() {
        let e = ConnectionError::ConnectionRefused(rumqttc::ConnectReturnCode::BadUserNamePassword);
        assert_eq!(
            describe("127.0.0.1:8883", &e),
            "broker 127.0.0.1:8883 refused the connection: bad user name or password"
        );
        let e = ConnectionError::Io(std::io::Error::other("reset"));
        assert_eq!(describe("h:1", &e), "connection to h:1 failed: I/O: reset");
    }

    #[test]
    fn refused_subscriptions_are_counted_and_named_with_the_broker() {
        let codes = [
            SubscribeReasonCode::Success(rumqttc::QoS::AtLeastOnce),
            SubscribeReasonCode::Failure,
        ];
        assert_eq!(refused(&codes), 1);
        assert_eq!(refused(&codes[..1]), 0);
        let why = refusal_message("127.0.0.1:1885", 1);
        assert!(
            why.starts_with("broker 127.0.0.1:1885 refused 1 subscription(s)"),
            "{why}"
        );
    }
}
