//! The agent's HTTP endpoint (`http.listen`): `/metrics` (Prometheus text), `/healthz` (alive)
//! and `/readyz` (ready: [`crate::readiness`]), `GET` and `HEAD` (no body) on each.
//!
//! Small on purpose: a scrape or a probe is one short request. What keeps it bounded: at most
//! [`MAX_CONNECTIONS`] connections (one more is closed at once), [`HEADER_TIMEOUT`] to send a
//! request head (slowloris), and [`CONNECTION_LIFETIME`] for a whole connection, which also
//! reclaims a client that never reads its response. With `http.auth_token_env`, `/metrics` and
//! `/readyz` need `Authorization: Bearer <token>` (the aggregator's check, `edgewatch_link::bearer`);
//! `/healthz` stays open, as on the aggregator.

use crate::readiness;
use crate::telemetry::AgentMetrics;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Longest wait for a complete request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest life of one connection (kept-alive scrapers reconnect).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// What the endpoint reads.
pub(crate) struct Endpoint {
    pub agent: String,
    pub metrics: Arc<AgentMetrics>,
    pub token: Option<String>,
    pub ack_warn: Duration,
    pub max_outbox_bytes: u64,
}

/// Accepts connections until `cancel`.
pub(crate) async fn serve(listener: TcpListener, ep: Arc<Endpoint>, cancel: CancellationToken) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "http connection refused: {MAX_CONNECTIONS} connections open");
            drop(stream);
            continue;
        };
        let ep = ep.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = stream.set_nodelay(true);
            let service = service_fn(move |req| {
                let ep = ep.clone();
                async move { Ok::<_, Infallible>(route(&ep, &req)) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                r = tokio::time::timeout(CONNECTION_LIFETIME, conn.as_mut()) => {
                    if let Ok(Err(e)) = r {
                        tracing::debug!(%peer, error = %e, "http connection ended with an error");
                    }
                }
                _ = cancel.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
                }
            }
        });
    }
}

/// The response to `req` (a `HEAD` gets the `GET` response's head, without its body).
fn route(ep: &Endpoint, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        let mut resp = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD are supported\n".into(),
        );
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    let path = req.uri().path();
    let open = path == "/healthz";
    let header = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let resp = if !open && !edgewatch_link::bearer::authorized(header, ep.token.as_deref()) {
        let mut resp = text(
            StatusCode::UNAUTHORIZED,
            match header {
                Some(_) => "wrong bearer token\n".into(),
                None => "a bearer token is required: send Authorization: Bearer <token>\n".into(),
            },
        );
        resp.headers_mut()
            .insert("www-authenticate", HeaderValue::from_static("Bearer"));
        resp
    } else {
        match path {
            "/healthz" => text(StatusCode::OK, "ok\n".into()),
            "/readyz" => {
                let failing = readiness_of(ep);
                if failing.is_empty() {
                    text(StatusCode::OK, "ready\n".into())
                } else {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready:\n{}\n", failing.join("\n")),
                    )
                }
            }
            "/metrics" => {
                let mut out = String::with_capacity(16 * 1024);
                ep.metrics.render(&ep.agent, &mut out);
                let mut resp = Response::new(Full::new(Bytes::from(out)));
                resp.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                resp
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /metrics, /healthz, /readyz\n".into(),
            ),
        }
    };
    if head {
        without_body(resp)
    } else {
        resp
    }
}

/// The conditions `/readyz` fails on now.
pub(crate) fn readiness_of(ep: &Endpoint) -> Vec<String> {
    let m = &ep.metrics;
    let lanes = m.lane_reports();
    readiness::failing(&readiness::Inputs {
        source_connected: m.source_connected.load(Relaxed) == 1,
        uplink_connected: m.uplink_connected.load(Relaxed) == 1,
        lanes: &lanes,
        ack_warn: ep.ack_warn,
        outbox_bytes: m
            .outbox_bytes
            .load(Relaxed)
            .saturating_add(m.checkpoint_bytes.load(Relaxed)),
        max_outbox_bytes: ep.max_outbox_bytes,
    })
}

/// The head of `resp` with its `Content-Length`, and no body.
fn without_body(resp: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    use hyper::body::Body as _;
    let (mut parts, body) = resp.into_parts();
    if let Some(len) = body.size_hint().exact() {
        parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
    }
    Response::from_parts(parts, Full::new(Bytes::new()))
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
