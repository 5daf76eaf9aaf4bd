//! The one reconnecting poll loop of every MQTT link (agent source and uplink, aggregator,
//! simulator): a thin async shell around [`crate::reconnect::Reconnect`].
//!
//! rumqttc reconnects on the next `poll()` with no delay; this loop adds capped exponential backoff
//! with jitter, moves to the next broker of the link after each failure, counts every connection
//! error through [`LinkCounters`] and hands what matters to the caller's [`LinkHandler`], which
//! (re)subscribes on every [`LinkEvent::Connected`]. A SUBACK refusing a subscription counts as a
//! connection error: the connection is dropped and made again (NATS refuses QoS 1 subscriptions
//! while a JetStream leader election is running). The loop does no work of its own on a message.

use crate::reconnect::{self, Reconnect};
use rumqttc::{
    ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, SubscribeReasonCode,
};
use std::future::Future;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What the poll loop tells its owner.
#[derive(Debug)]
pub enum LinkEvent {
    /// Connected (again): subscriptions must be (re)made.
    Connected,
    /// A message arrived.
    Publish(rumqttc::Publish),
    /// The broker acknowledged a QoS 1 publish.
    PubAck,
    /// The connection failed; the loop backs off and reconnects.
    Disconnected,
}

/// Whether the poll loop goes on after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep polling.
    Continue,
    /// Stop the loop (the owner's queue is gone).
    Stop,
}

impl From<()> for Flow {
    fn from((): ()) -> Self {
        Flow::Continue
    }
}

/// The counters a link bumps; each component keeps them in its own metrics.
pub trait LinkCounters {
    /// A connection failed or was dropped (refused subscriptions included).
    fn connection_error(&self);
    /// A packet over `max_packet_bytes` broke the connection.
    fn oversized_packet(&self);
    /// The link is connected (`true`, on every CONNACK) or not (`false`, on every failure); for a
    /// readiness check. Does nothing unless implemented.
    fn link_state(&self, up: bool) {
        let _ = up;
    }
}

impl<T: LinkCounters + ?Sized> LinkCounters for std::sync::Arc<T> {
    fn connection_error(&self) {
        (**self).connection_error();
    }
    fn oversized_packet(&self) {
        (**self).oversized_packet();
    }
    fn link_state(&self, up: bool) {
        (**self).link_state(up);
    }
}

/// The owner's side of a poll loop. A closure `FnMut(LinkEvent) -> impl Future<Output = ()>` (or
/// `Output = Flow`) is one; a type implements it to see more.
pub trait LinkHandler {
    /// Handles one event; `Flow::Stop` ends the loop.
    fn on_event(&mut self, event: LinkEvent) -> impl Future<Output = Flow>;

    /// A publish was written to the socket (counted by publishers that confirm QoS 0 writes).
    fn on_written(&mut self) {}

    /// The filters a SUBACK with `codes` refused, to name them in the log (empty when unknown).
    fn refused_filters(&self, codes: &[SubscribeReasonCode]) -> Vec<String> {
        let _ = codes;
        Vec::new()
    }

    /// Seed of the reconnect jitter.
    fn backoff_seed(&self) -> u64 {
        u64::from(std::process::id())
    }

    /// The event loop holds no more decoded packets: the next poll waits on the network. A
    /// handler that gathers publishes into batches hands its batch on here (or on `on_stop`), so
    /// nothing waits in it while the loop is blocked.
    fn on_drained(&mut self) -> impl Future<Output = Flow> {
        std::future::ready(Flow::Continue)
    }

    /// The loop is ending (cancelled, disconnected, every client handle gone, or `Flow::Stop`).
    fn on_stop(&mut self) -> impl Future<Output = ()> {
        std::future::ready(())
    }
}

impl<F, Fut> LinkHandler for F
where
    F: FnMut(LinkEvent) -> Fut,
    Fut: Future,
    Fut::Output: Into<Flow>,
{
    fn on_event(&mut self, event: LinkEvent) -> impl Future<Output = Flow> {
        let handled = self(event);
        async move { handled.await.into() }
    }
}

/// Polls `eventloop` until `cancel`, until our own Disconnect has been sent, until every client
/// handle is gone or until the handler says stop; `addresses` are the link's brokers (see
/// [`crate::options`]), `name` names the link in logs. Backs off after errors. Whenever the event
/// loop has no decoded packet left, [`LinkHandler::on_drained`] runs; [`LinkHandler::on_stop`] last.
pub async fn poll_loop<C, H>(
    eventloop: EventLoop,
    addresses: Vec<MqttOptions>,
    name: &str,
    counters: &C,
    cancel: CancellationToken,
    mut handler: H,
) where
    C: LinkCounters + ?Sized,
    H: LinkHandler,
{
    poll(eventloop, addresses, name, counters, cancel, &mut handler).await;
    handler.on_stop().await;
}

async fn poll<C, H>(
    mut eventloop: EventLoop,
    addresses: Vec<MqttOptions>,
    name: &str,
    counters: &C,
    cancel: CancellationToken,
    handler: &mut H,
) where
    C: LinkCounters + ?Sized,
    H: LinkHandler,
{
    let broker_of = |o: &MqttOptions| format!("{}:{}", o.broker_address().0, o.broker_address().1);
    let mut broker = broker_of(&eventloop.mqtt_options);
    // The limit configured, raised for one connection to read an oversized packet past it.
    let configured = eventloop.mqtt_options.max_packet_size();
    let mut reconnect = Reconnect::new(addresses.len(), configured, handler.backoff_seed());
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => return,
            e = eventloop.poll() => e,
        };
        let failure = match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                counters.link_state(true);
                let connected = reconnect.connected();
                if connected.after_failures {
                    tracing::info!(link = name, %broker, "reconnected");
                } else {
                    tracing::debug!(link = name, %broker, "connected");
                }
                if let Some(limit) = connected.restore_limit {
                    // This connection reads the oversized packet; the next one has the usual limit.
                    eventloop
                        .mqtt_options
                        .set_max_packet_size(limit, configured);
                }
                if handler.on_event(LinkEvent::Connected).await == Flow::Stop {
                    return;
                }
                None
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if handler.on_event(LinkEvent::Publish(p)).await == Flow::Stop {
                    return;
                }
                None
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                if handler.on_event(LinkEvent::PubAck).await == Flow::Stop {
                    return;
                }
                None
            }
            Ok(Event::Incoming(Packet::SubAck(ack)))
                if reconnect::refused(&ack.return_codes) > 0 =>
            {
                // The connection stays up but nothing will ever arrive on that subscription: drop
                // it and start over (the owner subscribes again on the next Connected).
                let named = handler.refused_filters(&ack.return_codes);
                eventloop.clean();
                let count = reconnect::refused(&ack.return_codes);
                Some((
                    reconnect::subscription_refusal_message(&broker, count, &named),
                    None,
                ))
            }
            Ok(Event::Outgoing(Outgoing::Publish(_))) => {
                handler.on_written();
                None
            }
            // Everything queued before our Disconnect request has been written: done.
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => None,
            // Every client handle was dropped: nothing can be sent any more.
            Err(ConnectionError::RequestsDone) => return,
            Err(e) => {
                let size = reconnect::oversized(&e);
                if let Some(size) = size {
                    counters.oversized_packet();
                    tracing::warn!(link = name, %broker, size, max_packet_bytes = configured, "a message larger than max_packet_bytes arrived; the next connection reads it once so it can be rejected and acknowledged instead of redelivered forever");
                }
                Some((reconnect::describe(&broker, &e), size))
            }
        };
        if let Some((error, oversized)) = failure {
            counters.connection_error();
            counters.link_state(false);
            if handler.on_event(LinkEvent::Disconnected).await == Flow::Stop {
                return;
            }
            let retry = reconnect.failed(oversized);
            if let Some(next) = addresses.get(retry.next).filter(|_| addresses.len() > 1) {
                // Try the next broker of the list on the next attempt.
                eventloop.mqtt_options = next.clone();
            }
            eventloop
                .mqtt_options
                .set_max_packet_size(retry.incoming_limit, configured);
            let next = broker_of(&eventloop.mqtt_options);
            tracing::warn!(link = name, %broker, %next, %error, retry_in_ms = retry.delay_ms, "mqtt connection error; will reconnect");
            broker = next;
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(retry.delay_ms)) => {}
            }
        }
        // rumqttc reads up to 10 packets per socket read and hands them out one per poll: once
        // none is left, the next poll blocks.
        if eventloop.state.events.is_empty() && handler.on_drained().await == Flow::Stop {
            return;
        }
    }
}
