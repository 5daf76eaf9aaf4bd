//! The aggregator's HTTP face on one port: the WebSocket live feed (`/feed`), the JSON API
//! (`/api/status`, `/api/devices`, `/api/devices/{id}`, `/api/windows`, `/api/cluster`,
//! `/api/fleet`, `/api/models`, `/api/models/{device}` (a device model's JSON artifact), and
//! `POST /api/feed/ticket`), Prometheus `/metrics` (a `# HELP` on every family), `/healthz` (alive),
//! `/readyz` (broker connected, partitions owned, store writing: [`ready`]) and the dashboard (`/`).
//! `HEAD` works wherever `GET` does, without the body. `/api/devices` and `/api/devices/{id}` answer
//! for the whole fleet, asking the other owners in the owners directory ([`devices`]).
//!
//! One task per connection. What keeps the port usable for everyone:
//! - **One limit**, `http.max_connections`, on plain HTTP and WebSocket connections together: a
//!   connection's permit lives as long as its socket, upgraded or not ([`conn`]).
//! - **Timeouts** reclaim connections that do nothing useful: `header_read_timeout_ms` (10 s) from
//!   accepting, or from the first byte of a request on a kept-alive connection, to a complete
//!   request head, whatever trickles in meanwhile (slowloris); `idle_timeout_ms` (60 s) for a
//!   kept-alive connection to send its next request; `write_timeout_ms` (10 s) for any write that
//!   does not progress because the client does not read.
//! - **At the limit, the connection waiting longest for a request is closed** to admit the new
//!   one, rather than refusing the newcomer: a real client sends its request as soon as it has
//!   connected, so a flood of idle or slow sockets cannot lock out the API even before their
//!   timeouts pass (`http_idle_evicted_total`). Only when no connection is waiting for a request
//!   (all are serving one, or are feed clients) is the newcomer refused: a best-effort `503`,
//!   `http_refused_total`, and at most one warning per 5 s carrying the count it suppressed.
//! - **A reserve for the API**: feed clients may hold `max_connections - reserved_connections`
//!   (default `max_connections / 32` kept back); past that an upgrade gets `503`
//!   (`feed_refused_total`), so a full feed never locks out the API, metrics and dashboard.
//! - **Feed clients that stop reading are evicted** ([`ws`]): a write stalled for
//!   `write_timeout_ms`, or no pong for two `ws_ping_interval_ms`, closes them
//!   (`ws_evicted_total`).
//!
//! With `http.auth_token_env`, everything but `/` and `/healthz` needs `Authorization: Bearer
//! <token>` (scheme in any case). A browser's WebSocket cannot send that header, so `/feed` also
//! takes a single-use, short-lived ticket from `POST /api/feed/ticket` ([`auth`]). Tokens in URLs
//! (`?token=`) are refused with a message saying so: they end up in access logs and histories.
//!
//! Deliberately not here: TLS (terminate it in front), HTTP/2, and per-client request rates;
//! limits count connections, not requests.

mod auth;
mod conn;
mod devices;
mod pages;
mod peer;
mod ready;
mod throttle;
mod ws;

use crate::feed::percent_decode;
use crate::Shared;
use auth::{TicketRefusal, TicketStore};
use bytes::Bytes;
use conn::{Admission, Expiry, Limits, Slot, TimedIo, Timeouts};
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, ALLOW, AUTHORIZATION, CACHE_CONTROL, CONNECTION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use throttle::LogThrottle;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// How long a connection may finish its request once the server is stopping.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// The server's state shared by every connection.
struct Server {
    shared: Arc<Shared>,
    limits: Arc<Limits>,
    /// Feed clients: `max_connections - reserved` permits.
    feed_permits: Arc<Semaphore>,
    feed_capacity: usize,
    tickets: Mutex<TicketStore>,
    ticket_ttl_ms: u64,
    write_timeout: Duration,
    ping_interval: Duration,
    feed_refused_log: Mutex<LogThrottle>,
    ws_evicted_log: Mutex<LogThrottle>,
    /// When store writes last failed (`/readyz`).
    store_watch: Mutex<ready::StoreWatch>,
    cancel: CancellationToken,
}

/// Accepts connections until `cancel`.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, cancel: CancellationToken) {
    let http = &shared.cfg.http;
    let feed_capacity = http.max_connections - http.reserved().min(http.max_connections - 1);
    let server = Arc::new(Server {
        limits: Arc::new(Limits::new(
            http.max_connections,
            Timeouts {
                header_read_ms: http.header_read_timeout_ms,
                idle_ms: http.idle_timeout_ms,
                write_ms: http.write_timeout_ms,
            },
            shared.metrics.clone(),
        )),
        feed_permits: Arc::new(Semaphore::new(feed_capacity)),
        feed_capacity,
        tickets: Mutex::new(TicketStore::new(
            Duration::from_millis(http.ticket_ttl_ms),
            auth::MAX_TICKETS,
        )),
        ticket_ttl_ms: http.ticket_ttl_ms,
        write_timeout: Duration::from_millis(http.write_timeout_ms),
        ping_interval: Duration::from_millis(http.ws_ping_interval_ms),
        feed_refused_log: Mutex::new(LogThrottle::new(conn::REFUSAL_LOG_EVERY)),
        ws_evicted_log: Mutex::new(LogThrottle::new(conn::REFUSAL_LOG_EVERY)),
        store_watch: Mutex::new(ready::StoreWatch::default()),
        cancel: cancel.clone(),
        shared: shared.clone(),
    });
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
        shared.metrics.http_connections_total.fetch_add(1, Relaxed);
        // Feed events are small writes a client does not answer: no Nagle delay for them.
        let _ = stream.set_nodelay(true);
        let slot = match server.limits.admit() {
            Admission::Now(slot) => Ok(slot),
            Admission::Soon(slot) => Err(slot),
            Admission::Refused => {
                server.limits.refuse(stream, peer);
                continue;
            }
        };
        let server = server.clone();
        tokio::spawn(async move {
            let slot = match slot {
                Ok(slot) => slot,
                // In line for the slot of the connection evicted to make room.
                Err(soon) => match soon.await {
                    Some(slot) => slot,
                    None => return server.limits.refuse(stream, peer),
                },
            };
            server.connection(stream, peer, slot).await;
        });
    }
}

impl Server {
    /// Serves one connection until it closes, upgrades, expires or is evicted.
    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: std::net::SocketAddr,
        slot: Arc<Slot>,
    ) {
        let io = TokioIo::new(TimedIo::new(stream, slot.clone()));
        let server = self.clone();
        let svc_slot = slot.clone();
        let service = service_fn(move |req| {
            let server = server.clone();
            let slot = svc_slot.clone();
            async move {
                if !slot.on_request() {
                    // Evicted to make room while its head was being read: it is being closed.
                    let resp = text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "connection limit reached\n",
                    );
                    return Ok(resp.map(|body| TrackedBody {
                        body,
                        slot,
                        keep_alive: false,
                    }));
                }
                let closing = wants_close(req.version(), req.headers().get(CONNECTION));
                let head = req.method() == Method::HEAD;
                let resp = server.route(req, &slot).await;
                let resp = if head { without_body(resp) } else { resp };
                let keep_alive =
                    !closing && !wants_close(resp.version(), resp.headers().get(CONNECTION));
                Ok::<_, Infallible>(resp.map(|body| TrackedBody {
                    body,
                    slot,
                    keep_alive,
                }))
            }
        });
        // Our clock times heads and keep-alive waits (see `conn`); hyper's header timer would
        // also cut kept-alive connections at the header timeout.
        let conn = http1::Builder::new()
            .header_read_timeout(None)
            .serve_connection(io, service)
            .with_upgrades();
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "http connection ended with an error");
                }
            }
            why = slot.expired() => {
                if why != Expiry::Evicted {
                    self.shared.metrics.http_timeouts_total.fetch_add(1, Relaxed);
                }
                tracing::debug!(%peer, reason = ?why, "closing http connection");
            }
            _ = self.cancel.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
            }
        }
    }

    async fn route(self: &Arc<Self>, req: Request<Incoming>, slot: &Slot) -> Response<Full<Bytes>> {
        let shared = &self.shared;
        shared.metrics.http_requests_total.fetch_add(1, Relaxed);
        let path = req.uri().path().to_string();
        let allowed = if path == "/api/feed/ticket" {
            Method::POST
        } else {
            Method::GET
        };
        let head_of_get = req.method() == Method::HEAD && allowed == Method::GET;
        if req.method() != allowed && !head_of_get {
            let mut resp = text(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!("only {allowed} is supported here\n"),
            );
            let allow = if allowed == Method::GET {
                "GET, HEAD"
            } else {
                allowed.as_str()
            };
            if let Ok(v) = HeaderValue::from_str(allow) {
                resp.headers_mut().insert(ALLOW, v);
            }
            return resp;
        }
        if let Some(resp) = pages::route(self, &req, &path) {
            return resp;
        }
        if !matches!(path.as_str(), "/" | "/healthz") {
            if let Err(refusal) = self.authorize(&req, &path) {
                shared.metrics.http_unauthorized_total.fetch_add(1, Relaxed);
                let mut resp = text(StatusCode::UNAUTHORIZED, &refusal);
                resp.headers_mut()
                    .insert("www-authenticate", HeaderValue::from_static("Bearer"));
                return resp;
            }
        }
        // Forwarded to the owners asked on the caller's behalf when this instance has no token.
        let caller_token = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(auth::bearer)
            .map(str::to_string);
        match path.as_str() {
            "/feed" => ws::upgrade(req, self.clone(), slot),
            "/api/feed/ticket" => self.ticket(),
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => {
                let failing = self.readiness();
                if failing.is_empty() {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &format!("not ready:\n{}\n", failing.join("\n")),
                    )
                }
            }
            "/metrics" => {
                let mut out = String::new();
                let devices = shared.state.lock().map(|s| s.devices().len()).unwrap_or(0);
                shared
                    .metrics
                    .render(&shared.cfg.id, shared.feed.clients(), devices, &mut out);
                if let Some(f) = &shared.fleet {
                    f.render(&shared.cfg.id, &mut out);
                }
                if let Some(t) = &shared.training {
                    t.render(&shared.cfg.id, &mut out);
                }
                shared.agents.render(&shared.cfg.id, &mut out);
                let _ = std::fmt::Write::write_fmt(
                    &mut out,
                    format_args!(
                        "# TYPE edgewatch_aggregator_partitions_owned gauge\nedgewatch_aggregator_partitions_owned{{aggregator=\"{}\"}} {}\n",
                        shared.cfg.id,
                        shared.owned.list().len()
                    ),
                );
                let coverage = shared
                    .directory
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .coverage(crate::fleet::run::now_ms());
                let _ = std::fmt::Write::write_fmt(
                    &mut out,
                    format_args!(
                        "# TYPE edgewatch_aggregator_partitions_uncovered gauge\nedgewatch_aggregator_partitions_uncovered{{aggregator=\"{id}\"}} {}\n# TYPE edgewatch_aggregator_partitions_overlapping gauge\nedgewatch_aggregator_partitions_overlapping{{aggregator=\"{id}\"}} {}\n",
                        coverage.uncovered.len(),
                        coverage.overlapping.len(),
                        id = shared.cfg.id,
                    ),
                );
                Response::builder()
                    .header(CONTENT_TYPE, "text/plain; version=0.0.4")
                    .body(Full::new(Bytes::from(crate::telemetry::with_help(&out))))
                    .unwrap_or_default()
            }
            "/api/status" => json_response(StatusCode::OK, &status(shared)),
            "/api/agents" => match shared.agents.api(req.uri().query()) {
                Ok(v) => json_response(StatusCode::OK, &v),
                Err(e) => text(StatusCode::BAD_REQUEST, &e),
            },
            "/api/fleet" => match &shared.fleet {
                Some(f) => json_response(StatusCode::OK, &f.report(crate::fleet::run::now_ms(), shared.cfg.cluster.is_some())),
                None => json_response(
                    StatusCode::NOT_FOUND,
                    &json!({"error": format!("fleet peer groups are off on aggregator {} (set fleet.enabled: true)", shared.cfg.id)}),
                ),
            },
            "/api/models" => {
                let now = crate::fleet::run::now_ms();
                let mut models = shared
                    .training
                    .as_ref()
                    .map(|t| t.list(now))
                    .unwrap_or_default();
                models.extend(shared.fleet.as_ref().map(|f| f.models(now)).unwrap_or_default());
                let waiting = shared.training.as_ref().map(|t| t.waiting());
                // Whether this instance trains: always with static ownership and training on;
                // in cluster mode only the member holding the trainer lease.
                let trainer = shared.training.as_ref().is_some_and(|t| t.is_active());
                let (offset, limit) = match page(req.uri().query(), MODELS_LIMIT) {
                    Ok(p) => p,
                    Err(e) => return json_response(StatusCode::BAD_REQUEST, &json!({ "error": e })),
                };
                let total = models.len();
                let models: Vec<_> = models.into_iter().skip(offset).take(limit).collect();
                json_response(
                    StatusCode::OK,
                    &json!({"aggregator": shared.cfg.id, "trainer": trainer, "total": total, "offset": offset,
                        "limit": limit, "models": models, "training": waiting}),
                )
            }
            p if p.starts_with("/api/models/") => {
                // One device model, as the JSON artifact its agent receives (`edgewatch models
                // show` reads it; the Python package's `fetch_model` loads it).
                let Some(device) = percent_decode(&p["/api/models/".len()..]) else {
                    return text(StatusCode::BAD_REQUEST, "device id: bad percent-encoding\n");
                };
                let model = shared.training.as_ref().and_then(|t| t.model(&device));
                match model.map(|m| serde_json::to_vec(&m)) {
                    Some(Ok(body)) => Response::builder()
                        .header(CONTENT_TYPE, "application/json")
                        .body(Full::new(Bytes::from(body)))
                        .unwrap_or_default(),
                    Some(Err(e)) => text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &format!("cannot serialise the model: {e}\n"),
                    ),
                    None => json_response(
                        StatusCode::NOT_FOUND,
                        &json!({"error": match shared.training {
                            Some(_) => format!("no model of device {device:?} on aggregator {}", shared.cfg.id),
                            None => format!("no model of device {device:?}: training is off on aggregator {} (training.enabled)", shared.cfg.id),
                        }, "device": device}),
                    ),
                }
            }
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
                devices::list(self, req.uri().query(), caller_token.as_deref()).await
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
                // Paged only when asked: `edgewatch verify` reads the plain array of everything.
                let query = req.uri().query();
                let paged = matches!(query_param(query, "offset"), Ok(Some(_)))
                    || matches!(query_param(query, "limit"), Ok(Some(_)));
                let body = if paged {
                    let (offset, limit) = match page(query, devices::MAX_LIMIT) {
                        Ok(p) => p,
                        Err(e) => return json_response(StatusCode::BAD_REQUEST, &json!({ "error": e })),
                    };
                    let total = held.len();
                    let series: Vec<_> = held.into_iter().skip(offset).take(limit).collect();
                    serde_json::to_vec(
                        &json!({"total": total, "offset": offset, "limit": limit, "series": series}),
                    )
                } else {
                    serde_json::to_vec(&held)
                };
                // Serialised outside the lock, straight to bytes: this can be the biggest response.
                match body {
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
                devices::one(self, &id, req.uri().query(), caller_token.as_deref()).await
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /, /feed, /healthz, /readyz, /api/status, /api/devices, /api/windows, /api/fleet, /api/models, /api/models/{device}, /api/feed/ticket (POST), /metrics\n",
            ),
        }
    }

    /// The conditions `/readyz` fails on now.
    fn readiness(&self) -> Vec<String> {
        let shared = &self.shared;
        let m = &shared.metrics;
        let errors = m
            .store_errors_total
            .load(Relaxed)
            .saturating_add(m.checkpoint_errors_total.load(Relaxed));
        let recent = self
            .store_watch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .recent(errors, Instant::now());
        let coverage = shared
            .directory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .coverage(crate::fleet::run::now_ms());
        ready::failing(&ready::Inputs {
            uncovered: coverage.uncovered,
            overlapping: coverage.overlapping,
            broker_connected: m.broker_connected.load(Relaxed) == 1,
            owned: shared.owned.list().len(),
            partitions: shared.cfg.partitions,
            cluster: shared.cluster.is_some(),
            recent_store_errors: recent,
        })
    }

    /// Whether `req` may proceed: the configured token in the `Authorization` header (or none
    /// configured), or on `/feed` a valid ticket, redeemed by this call. `Err` is the reason.
    fn authorize(&self, req: &Request<Incoming>, path: &str) -> Result<(), String> {
        let Some(token) = self.shared.token.as_deref() else {
            return Ok(());
        };
        let given = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(auth::bearer);
        if given.is_some_and(|g| auth::constant_time_eq(g.as_bytes(), token.as_bytes())) {
            return Ok(());
        }
        let query = req.uri().query();
        if path == "/feed" {
            if let Ok(Some(ticket)) = query_param(query, "ticket") {
                let redeemed = self
                    .tickets
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .redeem(&ticket, Instant::now());
                return redeemed.map_err(|r| {
                    let why = match r {
                        TicketRefusal::Expired => "expired",
                        TicketRefusal::Unknown => "unknown or already used",
                    };
                    format!("feed ticket {why}: get a new one with POST /api/feed/ticket (tickets are single-use)\n")
                });
            }
        }
        if matches!(query_param(query, "token"), Ok(Some(_))) {
            return Err("tokens in URLs are not accepted (they end up in logs and browser history): send Authorization: Bearer <token>; a browser's WebSocket uses /feed?ticket= from POST /api/feed/ticket\n".into());
        }
        Err(match given {
            Some(_) => "wrong bearer token\n".into(),
            None => "a bearer token is required: send Authorization: Bearer <token> (a browser's WebSocket: /feed?ticket= from POST /api/feed/ticket)\n".into(),
        })
    }

    /// `POST /api/feed/ticket`: a single-use, short-lived credential for `/feed?ticket=`.
    fn ticket(&self) -> Response<Full<Bytes>> {
        let issued = self
            .tickets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .issue(Instant::now());
        match issued {
            Ok(ticket) => {
                let mut resp = json_response(
                    StatusCode::OK,
                    &json!({"ticket": ticket, "expires_in_ms": self.ticket_ttl_ms}),
                );
                resp.headers_mut()
                    .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
                resp
            }
            Err(e) => {
                tracing::error!(error = %e, "the operating system's random source failed; no feed ticket issued");
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("cannot issue a ticket: random source failed: {e}\n"),
                )
            }
        }
    }
}

/// A response body that tells the connection's clock when the response has been handed over
/// (hyper drops the body after its last frame), starting the keep-alive wait.
struct TrackedBody {
    body: Full<Bytes>,
    slot: Arc<Slot>,
    /// Whether the connection stays open after this response (else it stays busy until closed,
    /// and is never picked to make room: it is about to free its slot anyway).
    keep_alive: bool,
}

/// Whether a message of `version` with this `Connection` header ends its connection.
fn wants_close(version: hyper::Version, connection: Option<&HeaderValue>) -> bool {
    let says = |token: &str| {
        connection
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if version == hyper::Version::HTTP_10 {
        !says("keep-alive")
    } else {
        says("close")
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        if self.keep_alive {
            self.slot.on_response_done();
        }
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

/// Most models listed by one `/api/models` answer (and its default `limit`).
const MODELS_LIMIT: usize = 1000;

/// `offset` and `limit` of a list endpoint's query (`limit` defaults to and is capped at `max`);
/// an error names the parameter. Other parameters are left to the endpoint.
fn page(query: Option<&str>, max: usize) -> Result<(usize, usize), String> {
    let number = |name: &str| -> Result<Option<usize>, String> {
        match query_param(query, name).map_err(|e| e.trim_end().to_string())? {
            None => Ok(None),
            Some(v) => v
                .parse::<usize>()
                .ok()
                .filter(|n| *n <= devices::MAX_OFFSET)
                .map(Some)
                .ok_or_else(|| {
                    format!(
                        "{name}: expected a whole number in 0..={}, got {v:?}",
                        devices::MAX_OFFSET
                    )
                }),
        }
    };
    let offset = number("offset")?.unwrap_or(0);
    let limit = number("limit")?.unwrap_or(max);
    if limit == 0 || limit > max {
        return Err(format!("limit: expected 1..={max}, got {limit}"));
    }
    Ok((offset, limit))
}

fn status(shared: &Shared) -> serde_json::Value {
    let fleet = devices::fleet_status(shared);
    let state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    let m = &shared.metrics;
    json!({
        "scope": "instance",
        "fleet": fleet,
        "advertise": shared.advertise,
        "anomalies": state.anomalies(),
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
        "http_connections": m.http_connections.load(Relaxed),
        "feed_history": shared.feed.history_len(),
        "uptime_secs": shared.started.elapsed().as_secs(),
    })
}

/// The head of `resp` with its `Content-Length`, and no body (the answer to a `HEAD`).
fn without_body(resp: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    let (mut parts, body) = resp.into_parts();
    if let Some(len) = body.size_hint().exact() {
        parts
            .headers
            .insert(hyper::header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    Response::from_parts(parts, Full::new(Bytes::new()))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_close_is_read_as_hyper_does() {
        let v = |s: &'static str| HeaderValue::from_static(s);
        assert!(!wants_close(hyper::Version::HTTP_11, None));
        assert!(wants_close(hyper::Version::HTTP_11, Some(&v("Close"))));
        assert!(wants_close(hyper::Version::HTTP_11, Some(&v("te, close"))));
        assert!(!wants_close(hyper::Version::HTTP_11, Some(&v("Upgrade"))));
        assert!(wants_close(hyper::Version::HTTP_10, None));
        assert!(!wants_close(
            hyper::Version::HTTP_10,
            Some(&v("keep-alive"))
        ));
    }
}
