//! The live feed's WebSocket side: the upgrade of `/feed` and one task per client moving events
//! from its bounded queue (a broadcast receiver) to its socket. Events go out as their JSON
//! objects; control messages carry a `type` key: a `since` not in the history gets a `gap` marker
//! first, then the whole history (the protocol, close codes included, is docs/feed.md).
//!
//! A client costs the server a task, a queue and a connection slot, so none may be held by a
//! client that stopped reading:
//! - behind by more than `feed.client_queue` events: closed with a resumable reason (`?since=`);
//! - a write (event, ping, close) stalled for `http.write_timeout_ms` (its TCP window is full):
//!   closed at once, no close frame (it could not be written either), counted in
//!   `ws_evicted_total`;
//! - nothing received, not even a pong, for two `http.ws_ping_interval_ms`: closed as dead, also
//!   counted (a peer that vanished without a FIN is otherwise only found by a write).
//!
//! Feed clients may hold at most `max_connections - reserved` slots; past that the upgrade is
//! refused with 503 and counted in `feed_refused_total`, so a full feed leaves room for the API.

use super::conn::Slot;
use super::{text, Server};
use crate::feed::FeedFilter;
use bytes::Bytes;
use futures_util::{Sink, SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, RETRY_AFTER, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, OwnedSemaphorePermit};
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Answers `/feed`: 101 and a client task, or why not.
pub(super) fn upgrade(
    mut req: Request<Incoming>,
    server: Arc<Server>,
    slot: &Slot,
) -> Response<Full<Bytes>> {
    let filter = match FeedFilter::parse(req.uri().query()) {
        Ok(f) => f,
        Err(e) => return text(StatusCode::BAD_REQUEST, &format!("{e}\n")),
    };
    let is_ws = req
        .headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = req.headers().get("sec-websocket-key").filter(|_| is_ws) else {
        return text(
            StatusCode::UPGRADE_REQUIRED,
            "the feed is a WebSocket: connect with ws://HOST/feed\n",
        );
    };
    let Ok(feed_permit) = server.feed_permits.clone().try_acquire_owned() else {
        server
            .shared
            .metrics
            .feed_refused_total
            .fetch_add(1, Relaxed);
        let hit = server
            .feed_refused_log
            .lock()
            .map(|mut l| l.hit(Instant::now()));
        if let Ok(Some(suppressed)) = hit {
            tracing::warn!(
                clients = server.feed_capacity,
                suppressed,
                "feed full: refusing a feed client (the rest of http.max_connections is kept for the API)"
            );
        }
        let mut resp = text(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "the feed is full ({} clients): retry later\n",
                server.feed_capacity
            ),
        );
        let h = resp.headers_mut();
        h.insert(RETRY_AFTER, HeaderValue::from_static("5"));
        // Not kept alive: the client will not send another request on it, and it would hold
        // a slot until the idle timeout.
        h.insert(CONNECTION, HeaderValue::from_static("close"));
        return resp;
    };
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    // From here the connection's slot belongs to the upgraded socket, and is not evictable.
    slot.on_upgrade();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                        .await;
                server
                    .shared
                    .metrics
                    .feed_connections_total
                    .fetch_add(1, Relaxed);
                serve(ws, filter, &server, feed_permit).await;
            }
            Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
        }
    });
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert("sec-websocket-accept", v);
    }
    resp
}

/// Why a write to a client failed.
enum WriteError {
    /// The socket is gone.
    Closed,
    /// It did not complete within the write timeout: the client is not reading.
    Stalled,
}

/// Sends `msg`, giving up after `limit`.
async fn send<S>(sink: &mut S, msg: Message, limit: Duration) -> Result<(), WriteError>
where
    S: Sink<Message> + Unpin,
{
    match tokio::time::timeout(limit, sink.send(msg)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(WriteError::Closed),
        Err(_) => Err(WriteError::Stalled),
    }
}

/// Counts and (at a bounded rate) logs a client closed for not reading.
fn evicted(server: &Server, why: &str) {
    server.shared.metrics.ws_evicted_total.fetch_add(1, Relaxed);
    let hit = server
        .ws_evicted_log
        .lock()
        .map(|mut l| l.hit(Instant::now()));
    if let Ok(Some(suppressed)) = hit {
        tracing::info!(reason = why, suppressed, "feed client evicted");
    }
}

/// Moves events to one client until it leaves, falls behind, stops reading, or the server stops.
/// Holding `_feed_permit` (and, through the socket, the connection slot) for as long as it runs.
async fn serve<S>(
    ws: WebSocketStream<S>,
    filter: FeedFilter,
    server: &Server,
    _feed_permit: OwnedSemaphorePermit,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let write_limit = server.write_timeout;
    let ping_every = server.ping_interval;
    let (mut sink, mut stream) = ws.split();
    let (backlog, found, mut rx) = server
        .shared
        .feed
        .subscribe(filter.since.as_deref(), filter.last);
    if let (Some(since), false) = (&filter.since, found) {
        // Never a silent replay: say first that events may have been missed.
        let replayed = backlog.iter().filter(|i| filter.matches(&i.event)).count();
        let gap = gap_message(since, backlog.len(), replayed);
        match send(&mut sink, Message::text(gap), write_limit).await {
            Ok(()) => {}
            Err(WriteError::Stalled) => return evicted(server, "write stalled"),
            Err(WriteError::Closed) => return,
        }
    }
    let mut last_id = filter.since.clone();
    for item in backlog {
        if filter.matches(&item.event) {
            match send(&mut sink, Message::text(item.json.clone()), write_limit).await {
                Ok(()) => last_id = Some(item.event.id.clone()),
                Err(WriteError::Stalled) => return evicted(server, "write stalled"),
                Err(WriteError::Closed) => return,
            }
        }
    }
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut heard = Instant::now();
    loop {
        tokio::select! {
            _ = server.cancel.cancelled() => {
                let _ = send(&mut sink, close(CloseCode::Away, "server shutting down".into()), write_limit).await;
                break;
            }
            r = rx.recv() => match r {
                Ok(item) => {
                    if filter.matches(&item.event) {
                        match send(&mut sink, Message::text(item.json.clone()), write_limit).await {
                            Ok(()) => last_id = Some(item.event.id.clone()),
                            Err(WriteError::Stalled) => return evicted(server, "write stalled"),
                            Err(WriteError::Closed) => break,
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    server.shared.metrics.feed_lagged_total.fetch_add(1, Relaxed);
                    let reason = match &last_id {
                        Some(id) => format!("too slow, {n} events behind: reconnect with ?since={id}"),
                        None => format!("too slow, {n} events behind"),
                    };
                    let _ = send(&mut sink, close(CloseCode::Policy, reason), write_limit).await;
                    break;
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            m = stream.next() => {
                heard = Instant::now();
                match m {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                }
            }
            _ = ping.tick() => {
                if heard.elapsed() >= 2 * ping_every {
                    evicted(server, "no pong");
                    let reason = format!("nothing received for {} ms (no pong)", heard.elapsed().as_millis());
                    let _ = send(&mut sink, close(CloseCode::Policy, reason), write_limit).await;
                    break;
                }
                match send(&mut sink, Message::Ping(Bytes::new()), write_limit).await {
                    Ok(()) => {}
                    Err(WriteError::Stalled) => return evicted(server, "write stalled"),
                    Err(WriteError::Closed) => break,
                }
            }
        }
    }
}

/// The `gap` control message sent first to a client whose `since` is not in the history: the
/// `held` events that are (`replayed` of them pass its filter) follow it.
pub(crate) fn gap_message(since: &str, held: usize, replayed: usize) -> String {
    let reason = if held == 0 {
        "unknown event id: this aggregator holds no history yet (restarted, or nothing detected since it started); events may have been missed".to_string()
    } else {
        format!("unknown event id: not among the {held} events this aggregator holds (older than its history, or not an event id); events may have been missed, the whole history follows")
    };
    serde_json::json!({"type": "gap", "since": since, "reason": reason, "replayed": replayed})
        .to_string()
}

fn close(code: CloseCode, reason: String) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gap_marker_is_a_typed_control_message() {
        let v: serde_json::Value = serde_json::from_str(&gap_message("ev-1", 5, 3)).unwrap();
        assert_eq!(v["type"], "gap");
        assert_eq!(v["since"], "ev-1");
        assert_eq!(v["replayed"], 3);
        assert!(v["reason"].as_str().unwrap().contains("5 events"));
        let v: serde_json::Value = serde_json::from_str(&gap_message("x\"y", 0, 0)).unwrap();
        assert_eq!(v["since"], "x\"y");
    }
}
