//! The feed and the API behind a bearer token: 401 without it, served with it; the dashboard page
//! and the health check stay open; `edgewatch tail --token` gets through.

use crate::common::*;
use edgewatch_aggregator::{Aggregator, AggregatorConfig};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn get_with(addr: std::net::SocketAddr, path: &str, token: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status = raw.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap();
    (status, raw)
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
    let with = format!("{url}?token=s3cret-token");
    assert!(
        tokio_tungstenite::connect_async(with.as_str())
            .await
            .is_ok(),
        "feed with ?token="
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
    // Connected: it waits for an event instead of failing.
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
