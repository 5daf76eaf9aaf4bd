//! One plain-HTTP GET of an aggregator's `/api/windows`, written on a tokio `TcpStream`.
//!
//! The binary has no HTTP client (tail speaks WebSocket through tokio-tungstenite, hyper is built
//! for the server side only), and one `Connection: close` request does not justify one. Handles
//! `Content-Length`, chunked and read-to-close bodies. No TLS: aggregators serve plain HTTP, put
//! behind a TLS proxy the check runs from inside. Does not interpret the body.

use super::VerifyError;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest a whole request may take (connect, send, read everything).
const TIMEOUT: Duration = Duration::from_secs(60);

/// Where an aggregator base URL points.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Base {
    /// `host:port` to connect to.
    addr: String,
    /// The `Host` header.
    authority: String,
    /// Path prefix without a trailing slash (empty for the root).
    prefix: String,
}

impl Base {
    /// Parses `http://host[:port][/prefix]`.
    pub(crate) fn parse(url: &str) -> Result<Self, VerifyError> {
        let bad = |why: &str| VerifyError::Usage(format!("--aggregator {url:?}: {why}"));
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            bad(if url.starts_with("https://") {
                "https is not supported; use the aggregator's plain http:// address"
            } else {
                "must start with http://"
            })
        })?;
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(bad("no host"));
        }
        if authority.contains(['@', '?', '#']) || prefix.contains(['?', '#']) {
            return Err(bad("give only http://host:port[/path]"));
        }
        let has_port = match authority.rfind(']') {
            Some(i) => authority[i..].contains(':'),
            None => authority.contains(':'),
        };
        let addr = if has_port {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        Ok(Self {
            addr,
            authority: authority.to_string(),
            prefix: prefix.to_string(),
        })
    }

    /// The full URL of `path`, for messages.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{}{path}", self.authority, self.prefix)
    }

    /// GETs `path` (starting with `/`); returns the body of a 200 answer.
    pub(crate) async fn get(
        &self,
        path: &str,
        token: Option<&str>,
    ) -> Result<Vec<u8>, VerifyError> {
        let url = self.url(path);
        let fail = |message: String| VerifyError::Fetch {
            url: url.clone(),
            message,
        };
        let mut request = format!(
            "GET {}{path} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\nConnection: close\r\n",
            self.prefix, self.authority
        );
        if let Some(t) = token {
            request.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        request.push_str("\r\n");
        let exchange = async {
            let mut s = TcpStream::connect(&self.addr)
                .await
                .map_err(|e| format!("cannot connect to {}: {e}", self.addr))?;
            s.write_all(request.as_bytes())
                .await
                .map_err(|e| format!("sending the request: {e}"))?;
            let mut raw = Vec::new();
            s.read_to_end(&mut raw)
                .await
                .map_err(|e| format!("reading the response: {e}"))?;
            Ok::<_, String>(raw)
        };
        let raw = tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| fail(format!("no complete answer within {} s", TIMEOUT.as_secs())))?
            .map_err(fail)?;
        let (status, body) = parse_response(&raw).map_err(fail)?;
        match status {
            200 => Ok(body),
            401 => Err(fail(
                "401 unauthorized: the aggregator wants a bearer token (--token or --token-env)"
                    .into(),
            )),
            404 => Err(fail(
                "404 not found: is this an edgewatch aggregator recent enough to serve /api/windows?"
                    .into(),
            )),
            s => {
                let text = String::from_utf8_lossy(&body);
                let snippet: String = text.chars().take(200).collect();
                Err(fail(format!("HTTP {s}: {}", snippet.trim())))
            }
        }
    }
}

/// Splits a raw HTTP/1.1 response into its status and decoded body.
fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("the connection closed before the response headers ended")?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| "response headers are not UTF-8")?;
    let body = &raw[end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .filter(|_| status_line.starts_with("HTTP/1."))
        .ok_or_else(|| format!("not an HTTP response: {status_line:?}"))?;
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| format!("bad Content-Length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    if chunked {
        return dechunk(body).map(|b| (status, b));
    }
    match length {
        Some(n) if body.len() < n => {
            Err(format!("the body ended after {} of {n} bytes", body.len()))
        }
        Some(n) => Ok((status, body[..n].to_vec())),
        None => Ok((status, body.to_vec())),
    }
}

/// Decodes a chunked body (trailers ignored).
fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(body.len());
    loop {
        let eol = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunked body")?;
        let size_text = std::str::from_utf8(&body[..eol]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        body = &body[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size + 2 {
            return Err("truncated chunked body".into());
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_parse_with_or_without_port_and_prefix() {
        let b = Base::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!((b.addr.as_str(), b.prefix.as_str()), ("127.0.0.1:8080", ""));
        assert_eq!(b.url("/api/windows"), "http://127.0.0.1:8080/api/windows");
        let b = Base::parse("http://agg.example/edgewatch/").unwrap();
        assert_eq!(
            (b.addr.as_str(), b.prefix.as_str()),
            ("agg.example:80", "/edgewatch")
        );
        assert_eq!(Base::parse("http://[::1]:9000").unwrap().addr, "[::1]:9000");
        assert_eq!(Base::parse("http://[::1]").unwrap().addr, "[::1]:80");
        for bad in [
            "127.0.0.1:8080",
            "https://h",
            "http://",
            "http://u@h",
            "http://h/?x",
        ] {
            let e = Base::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn responses_decode_by_length_chunks_or_close() {
        let (s, b) = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n[]").unwrap();
        assert_eq!((s, b.as_slice()), (200, &b"[]"[..]));
        let (s, b) = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n[1,\r\n2;x=y\r\n2]\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((s, b.as_slice()), (200, &b"[1,2]"[..]));
        let (s, b) = parse_response(b"HTTP/1.0 401 Unauthorized\r\n\r\nno").unwrap();
        assert_eq!((s, b.as_slice()), (401, &b"no"[..]));
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n[]")
                .unwrap_err()
                .contains("2 of 9")
        );
        assert!(parse_response(b"SSH-2.0\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }
}
