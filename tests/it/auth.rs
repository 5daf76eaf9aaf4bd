//! The feed and the API behind a bearer token: 401 without it, served with it (the scheme in any
//! case); the dashboard page and the health check stay open; `edgewatch tail --token` gets through;
//! a browser's WebSocket gets in with a single-use, short-lived ticket, never with a token in the
//! URL.

use crate::common::*;
use edgewatch_aggregator::{Aggregator, AggregatorConfig};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn get_with(addr: std::net::SocketAddr, path: &str, token: &str) -> (u16, String) {
    request(addr, "GET", path, &format!("Bearer {token}"))
}

/// `method path` with `authorization` as the Authorization header (none if empty); (status, raw).
fn request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    authorization: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = if authorization.is_empty() {
        String::new()
    } else {
        format!("Authorization: {authorization}\r\n")
    };
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status = raw.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap();
    (status, raw)
}

/// A feed handshake with an Authorization header, as `edgewatch tail` sends it.
fn ws_request(
    url: &str,
    authorization: &str,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", authorization.parse().unwrap());
    req
}

/// The HTTP status a refused feed handshake got.
fn refused_status(r: Result<impl Sized, tokio_tungstenite::tungstenite::Error>) -> u16 {
    match r {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, the handshake succeeded"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_and_api_require_the_bearer_token_when_configured() {
    // A variable name only this test uses, so setting it cannot disturb other tests.
    std::env::set_var("EDGEWATCH_IT_AUTH_TOKEN", "s3cret-token");
    let broker = embedded_broker();
    let mut cfg = AggregatorConfig::with_id("agg-auth");
    cfg.mqtt.port = broker.addr().port();
    cfg.http.listen = "127.0.0.1:0".into();
    cfg.http.auth_token_env = Some("EDGEWATCH_IT_AUTH_TOKEN".into());
    let agg = Aggregator::bind(cfg.clone()).await.unwrap();
    let addr = agg.local_addr();
    let url = agg.feed_url();
    let stop = CancellationToken::new();
    let task = {
        let t = stop.clone();
        tokio::spawn(agg.run(async move { t.cancelled().await }))
    };

    for path in [
        "/api/status",
        "/api/devices",
        "/api/windows",
        "/metrics",
        "/feed",
    ] {
        let (status, body) = http_get(addr, path);
        assert_eq!(status, 401, "{path} without a token: {body}");
        let (status, _) = get_with(addr, path, "wrong");
        assert_eq!(status, 401, "{path} with a wrong token");
    }
    assert_eq!(get_with(addr, "/api/status", "s3cret-token").0, 200);
    assert_eq!(
        http_get(addr, "/").0,
        200,
        "the dashboard page itself is open"
    );
    assert_eq!(http_get(addr, "/healthz").0, 200);

    assert!(
        tokio_tungstenite::connect_async(url.as_str())
            .await
            .is_err(),
        "feed without token"
    );
    // Tokens in URLs leak into logs and histories: refused, saying why (issue 13).
    let (status, body) = http_get(addr, "/feed?token=s3cret-token");
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("not accepted"), "{body}");
    assert!(
        tokio_tungstenite::connect_async(ws_request(&url, "Bearer s3cret-token"))
            .await
            .is_ok(),
        "feed with the Authorization header"
    );

    // The CLI client: refused without the token, connected with it.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_edgewatch"))
        .args(["tail", &url, "--count", "1"])
        .env_remove("EDGEWATCH_TOKEN")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut tail = tokio::process::Command::new(env!("CARGO_BIN_EXE_edgewatch"))
        .args(["tail", &url, "--count", "1"])
        .env("EDGEWATCH_TOKEN", "s3cret-token")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Connected: it waits for an event instead of failing. Deliberate: 1.5 s in which a refused
    // tail would have exited (code 2, as above), to prove that it stays.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        tail.try_wait().unwrap().is_none(),
        "tail with the token stays connected"
    );
    tail.kill().await.unwrap();

    stop.cancel();
    task.await.unwrap().unwrap();

    // A configured but unset variable is a clear startup error naming it.
    cfg.http.auth_token_env = Some("EDGEWATCH_IT_SURELY_UNSET".into());
    let err = Aggregator::bind(cfg)
        .await
        .err()
        .expect("bind fails")
        .to_string();
    assert!(err.contains("EDGEWATCH_IT_SURELY_UNSET"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_case_insensitive_and_feed_tickets_are_single_use() {
    std::env::set_var("EDGEWATCH_IT_TICKET_TOKEN", "t0ken");
    let broker = embedded_broker();
    let mut cfg = AggregatorConfig::with_id("agg-ticket");
    cfg.mqtt.port = broker.addr().port();
    cfg.http.listen = "127.0.0.1:0".into();
    cfg.http.auth_token_env = Some("EDGEWATCH_IT_TICKET_TOKEN".into());
    cfg.http.ticket_ttl_ms = 300;
    let agg = Aggregator::bind(cfg).await.unwrap();
    let (addr, url) = (agg.local_addr(), agg.feed_url());
    let stop = CancellationToken::new();
    let task = {
        let t = stop.clone();
        tokio::spawn(agg.run(async move { t.cancelled().await }))
    };

    // RFC 7235: the scheme is case-insensitive.
    for auth in [
        "Bearer t0ken",
        "bearer t0ken",
        "BEARER t0ken",
        "bEaReR   t0ken",
    ] {
        assert_eq!(
            request(addr, "GET", "/api/status", auth).0,
            200,
            "Authorization: {auth}"
        );
    }
    for auth in ["Basic t0ken", "Bearer t0ke", "t0ken"] {
        assert_eq!(
            request(addr, "GET", "/api/status", auth).0,
            401,
            "Authorization: {auth}"
        );
    }
    assert!(
        tokio_tungstenite::connect_async(ws_request(&url, "bearer t0ken"))
            .await
            .is_ok(),
        "the feed takes the lower-case scheme too"
    );

    // A ticket: only with the token, only by POST, not cached.
    assert_eq!(request(addr, "POST", "/api/feed/ticket", "").0, 401);
    assert_eq!(
        request(addr, "GET", "/api/feed/ticket", "Bearer t0ken").0,
        405
    );
    let ticket = || {
        let (status, raw) = request(addr, "POST", "/api/feed/ticket", "BEARER t0ken");
        assert_eq!(status, 200, "{raw}");
        assert!(
            raw.to_ascii_lowercase().contains("cache-control: no-store"),
            "{raw}"
        );
        let body: serde_json::Value =
            serde_json::from_str(raw.split_once("\r\n\r\n").unwrap().1).unwrap();
        assert_eq!(body["expires_in_ms"], 300, "{body}");
        let t = body["ticket"].as_str().unwrap().to_string();
        assert!(
            t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit()),
            "128 bits in hex: {t}"
        );
        t
    };

    // Accepted once.
    let t = ticket();
    let with_ticket = format!("{url}?ticket={t}");
    assert!(
        tokio_tungstenite::connect_async(with_ticket.as_str())
            .await
            .is_ok(),
        "a fresh ticket opens the feed"
    );
    assert_eq!(
        refused_status(tokio_tungstenite::connect_async(with_ticket.as_str()).await),
        401,
        "a used ticket is refused"
    );
    let (_, body) = http_get(addr, &format!("/feed?ticket={t}"));
    assert!(body.contains("already used"), "{body}");

    // Only for the feed.
    let t = ticket();
    assert_eq!(http_get(addr, &format!("/api/status?ticket={t}")).0, 401);

    // Expired. Deliberate: waits past its 300 ms lifetime for the expiry to happen (longer only
    // makes it more expired).
    let t = ticket();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (status, body) = http_get(addr, &format!("/feed?ticket={t}"));
    assert_eq!(status, 401);
    assert!(body.contains("expired"), "{body}");
    assert_eq!(
        refused_status(
            tokio_tungstenite::connect_async(format!(
                "{url}?ticket=00112233445566778899aabbccddeeff"
            ))
            .await
        ),
        401,
        "a made-up ticket is refused"
    );

    stop.cancel();
    task.await.unwrap().unwrap();
}
