//! Requests to other aggregators (the fleet-wide `/api/devices`, a device fetched from its owner):
//! one plain-HTTP/1.1 GET per connection with a total timeout, a body size limit and, when
//! given, a bearer token. Deliberately small: no pooling, no redirects, no TLS (instances reach
//! each other at their `http.advertise` URL, on the network they share).

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::{AUTHORIZATION, HOST};
use hyper::Request;
use hyper_util::rt::TokioIo;
use std::time::Duration;

/// Largest answer read from another instance: a page of up to a million devices fits.
pub(crate) const MAX_BODY_BYTES: usize = 512 * 1024 * 1024;

/// Why a request to another instance failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PeerError {
    /// The URL is not `http://HOST[:PORT]`.
    #[error("bad URL: {0}")]
    Url(String),
    /// Connecting, sending or reading failed.
    #[error("{0}")]
    Io(String),
    /// No complete answer in time.
    #[error("no answer within {} ms", .0.as_millis())]
    Timeout(Duration),
}

/// `GET {base}{target}`: the status and body, within `timeout`.
pub(crate) async fn get(
    base: &str,
    target: &str,
    bearer: Option<&str>,
    timeout: Duration,
) -> Result<(u16, Bytes), PeerError> {
    let authority = crate::config::http_authority(base).map_err(PeerError::Url)?;
    let authority = authority.to_string();
    let exchange = async {
        let addr = if authority.contains(':') && !authority.ends_with(']') {
            authority.clone()
        } else {
            format!("{authority}:80")
        };
        let stream = tokio::net::TcpStream::connect(&addr)
            .await
            .map_err(|e| PeerError::Io(format!("cannot connect to {addr}: {e}")))?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| PeerError::Io(format!("http handshake: {e}")))?;
        // Drives the connection; it ends with the exchange (or when this future is dropped).
        let driver = tokio::spawn(conn);
        let mut req = Request::get(target).header(HOST, authority.as_str());
        if let Some(token) = bearer {
            req = req.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| PeerError::Url(format!("{target}: {e}")))?;
        let result = async {
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| PeerError::Io(format!("request failed: {e}")))?;
            let status = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), MAX_BODY_BYTES)
                .collect()
                .await
                .map_err(|e| PeerError::Io(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok((status, body))
        }
        .await;
        driver.abort();
        result
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| PeerError::Timeout(timeout))?
}

/// `s` percent-encoded for a URL path segment or query value (unreserved characters kept).
pub(crate) fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips_through_the_servers_decoder() {
        for s in ["pump 7/a?b&c=d%", "ü", "plain-id_1.x~"] {
            assert_eq!(crate::feed::percent_decode(&encode(s)).as_deref(), Some(s));
        }
        assert_eq!(encode("a b"), "a%20b");
    }

    #[tokio::test]
    async fn an_unreachable_peer_fails_within_the_timeout() {
        // A listener that accepts and never answers.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        let started = std::time::Instant::now();
        let r = get(
            &format!("http://{addr}"),
            "/api/devices",
            None,
            Duration::from_millis(200),
        )
        .await;
        assert!(matches!(r, Err(PeerError::Timeout(_))), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(matches!(
            get("ftp://x", "/", None, Duration::from_secs(1)).await,
            Err(PeerError::Url(_))
        ));
        hold.abort();
    }
}
