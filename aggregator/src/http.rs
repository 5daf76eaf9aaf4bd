//! The aggregator's HTTP face on one port: the WebSocket live feed (`/feed`), the JSON API
//! (`/api/status`, `/api/devices`, `/api/devices/{id}`, `/api/windows`), Prometheus `/metrics` and
//! the dashboard (`/`).
//!
//! One task per connection, capped by a semaphore; every WebSocket client has its own bounded queue
//! (a broadcast receiver) and is disconnected, with a resumable close reason, when it falls behind.

use crate::feed::{percent_decode, FeedFilter};
use crate::Shared;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE, UPGRADE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, Semaphore};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

const DASHBOARD: &str = include_str!("dashboard.html");

/// Accepts connections until `cancel`.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, cancel: CancellationToken) {
    let permits = Arc::new(Semaphore::new(shared.cfg.http.max_connections));
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, limit = shared.cfg.http.max_connections, "connection limit reached; refusing");
            continue;
        };
        let shared = shared.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc_shared = shared.clone();
            let svc_cancel = cancel.clone();
            let service = service_fn(move |req| {
                let shared = svc_shared.clone();
                let cancel = svc_cancel.clone();
                async move { Ok::<_, Infallible>(route(req, shared, cancel).await) }
            });
            let conn = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "http connection ended with an error");
                    }
                }
                _ = cancel.cancelled() => conn.as_mut().graceful_shutdown(),
            }
        });
    }
}

async fn route(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) -> Response<Full<Bytes>> {
    shared.metrics.http_requests_total.fetch_add(1, Relaxed);
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported\n");
    }
    let path = req.uri().path().to_string();
    if !matches!(path.as_str(), "/" | "/healthz") && !authorized(&req, shared.token.as_deref()) {
        shared.metrics.http_unauthorized_total.fetch_add(1, Relaxed);
        let mut resp = text(
            StatusCode::UNAUTHORIZED,
            "a bearer token is required: send Authorization: Bearer <token> (or ?token=<token>)\n",
        );
        resp.headers_mut()
            .insert("www-authenticate", HeaderValue::from_static("Bearer"));
        return resp;
    }
    match path.as_str() {
        "/" => Response::builder()
            .header(CONTENT_TYPE, "text/html; charset=utf-8")
            .body(Full::new(Bytes::from_static(DASHBOARD.as_bytes())))
            .unwrap_or_default(),
        "/feed" => upgrade_feed(req, shared, cancel),
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/metrics" => {
            let mut out = String::new();
            let devices = shared.state.lock().map(|s| s.devices().len()).unwrap_or(0);
            shared
                .metrics
                .render(&shared.cfg.id, shared.feed.clients(), devices, &mut out);
            Response::builder()
                .header(CONTENT_TYPE, "text/plain; version=0.0.4")
                .body(Full::new(Bytes::from(out)))
                .unwrap_or_default()
        }
        "/api/status" => json_response(StatusCode::OK, &status(&shared)),
        "/api/cluster" => match &shared.cluster {
            None => json_response(
                StatusCode::NOT_FOUND,
                &json!({"error": format!("aggregator {} is not in cluster mode (no cluster: in its configuration)", shared.cfg.id)}),
            ),
            Some(buckets) => {
                match crate::cluster::status::collect(buckets, shared.cfg.partitions).await {
                    Ok(s) => json_response(StatusCode::OK, &json!(s)),
                    Err(e) => json_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &json!({"error": format!("cluster status unavailable: {e}")}),
                    ),
                }
            }
        },
        "/api/devices" => {
            let state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            let list: Vec<_> = state
                .devices()
                .iter()
                .map(|(id, d)| {
                    let metrics: serde_json::Map<String, serde_json::Value> = d
                        .metrics
                        .iter()
                        .map(|(m, s)| {
                            (
                                m.clone(),
                                json!({
                                    "windows_applied": s.windows_applied,
                                    "readings": s.readings,
                                    "anomalies": s.anomalies,
                                    "last_window": s.windows.back(),
                                }),
                            )
                        })
                        .collect();
                    json!({"device": id, "partition": d.partition, "metrics": metrics})
                })
                .collect();
            json_response(StatusCode::OK, &serde_json::Value::Array(list))
        }
        "/api/windows" => {
            // Every held window of every series (or one device's): what `edgewatch verify` reads.
            let device = match query_param(req.uri().query(), "device") {
                Ok(d) => d,
                Err(e) => return text(StatusCode::BAD_REQUEST, &e),
            };
            let held = {
                let state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
                state.held_series(device.as_deref())
            };
            // Serialised outside the lock, straight to bytes: this can be the biggest response.
            match serde_json::to_vec(&held) {
                Ok(body) => Response::builder()
                    .header(CONTENT_TYPE, "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap_or_default(),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("cannot serialise the windows: {e}\n"),
                ),
            }
        }
        p if p.starts_with("/api/devices/") => {
            let Some(id) = percent_decode(&p["/api/devices/".len()..]) else {
                return text(StatusCode::BAD_REQUEST, "device id: bad percent-encoding\n");
            };
            let state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            match state.device(&id) {
                Some(d) => json_response(StatusCode::OK, &json!({"device": id, "state": d})),
                None => json_response(
                    StatusCode::NOT_FOUND,
                    &json!({"error": format!("device {id:?} is not owned by aggregator {} or has sent nothing yet", shared.cfg.id)}),
                ),
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /, /feed, /api/status, /api/devices, /api/windows, /metrics\n",
        ),
    }
}

/// The percent-decoded value of `name` in a query string, if present.
fn query_param(query: Option<&str>, name: &str) -> Result<Option<String>, String> {
    let Some(raw) = query.and_then(|q| {
        q.split('&')
            .find_map(|p| p.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
    }) else {
        return Ok(None);
    };
    percent_decode(raw)
        .map(Some)
        .ok_or_else(|| format!("{name}: bad percent-encoding, got {raw:?}\n"))
}

/// Whether `req` carries the configured token (always true when none is configured).
fn authorized(req: &Request<Incoming>, token: Option<&str>) -> bool {
    let Some(token) = token else {
        return true;
    };
    let from_header = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let from_query = req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|p| p.strip_prefix("token="))
            .and_then(percent_decode)
    });
    from_header
        .into_iter()
        .chain(from_query)
        .any(|given| constant_time_eq(given.as_bytes(), token.as_bytes()))
}

/// Compares without an early exit, so response time does not reveal how much of a guess matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn status(shared: &Shared) -> serde_json::Value {
    let state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    let m = &shared.metrics;
    json!({
        "id": shared.cfg.id,
        "partitions": shared.cfg.partitions,
        "owned": shared.owned.list(),
        "devices": state.devices().len(),
        "readings": state.readings(),
        "lanes": state.lanes(),
        "lane_progress": state.lane_progress(),
        "summaries_applied": m.summaries_applied_total.load(Relaxed),
        "summaries_duplicate": m.summaries_duplicate_total.load(Relaxed),
        "anomalies_received": m.anomalies_received_total.load(Relaxed),
        "bad_messages": m.bad_messages_total.load(Relaxed),
        "feed_clients": shared.feed.clients(),
        "feed_history": shared.feed.history_len(),
        "uptime_secs": shared.started.elapsed().as_secs(),
    })
}

fn upgrade_feed(
    mut req: Request<Incoming>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
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
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                        .await;
                shared.metrics.feed_connections_total.fetch_add(1, Relaxed);
                serve_feed(ws, filter, shared, cancel).await;
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

async fn serve_feed<S>(
    ws: WebSocketStream<S>,
    filter: FeedFilter,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = ws.split();
    let (backlog, _found, mut rx) = shared.feed.subscribe(filter.since.as_deref(), filter.last);
    let mut last_id = filter.since.clone();
    for item in backlog {
        if filter.matches(&item.event) {
            if sink.send(Message::text(item.json.clone())).await.is_err() {
                return;
            }
            last_id = Some(item.event.id.clone());
        }
    }
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                let _ = sink.send(close(CloseCode::Away, "server shutting down".into())).await;
                break;
            }
            r = rx.recv() => match r {
                Ok(item) => {
                    if filter.matches(&item.event) {
                        if sink.send(Message::text(item.json.clone())).await.is_err() {
                            break;
                        }
                        last_id = Some(item.event.id.clone());
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    shared.metrics.feed_lagged_total.fetch_add(1, Relaxed);
                    let reason = match &last_id {
                        Some(id) => format!("too slow, {n} events behind: reconnect with ?since={id}"),
                        None => format!("too slow, {n} events behind"),
                    };
                    let _ = sink.send(close(CloseCode::Policy, reason)).await;
                    break;
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            m = stream.next() => match m {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
}

fn close(code: CloseCode, reason: String) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap_or_default()
}

fn json_response(status: StatusCode, v: &serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(v.to_string())))
        .unwrap_or_default()
}
