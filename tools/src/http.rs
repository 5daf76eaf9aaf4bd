//! The one small HTTP/1.1 client of edgewatch's tools: a plain-HTTP GET (no TLS) with a total
//! timeout and an optional bearer token, used by `verify`, the cluster bench and the integration
//! tests to read an aggregator's API. One `Connection: close` request per call; the body is decoded by
//! `Content-Length`, chunked transfer encoding, or read to close. It does not interpret the body.
//!
//! The same request and response code runs on tokio ([`Get::send`]) or on a blocking std socket
//! ([`Get::send_blocking`], for synchronous test helpers).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Why a GET failed. Callers prefix the message with the URL.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The TCP connection could not be opened.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// `host:port` tried.
        addr: String,
        /// The socket error.
        source: std::io::Error,
    },
    /// Writing the request failed.
    #[error("sending the request: {0}")]
    Send(std::io::Error),
    /// Reading the response failed.
    #[error("reading the response: {0}")]
    Read(std::io::Error),
    /// The whole exchange took longer than the timeout.
    #[error("no complete answer within {} s", .0.as_secs())]
    Timeout(Duration),
    /// The bytes received are not a complete HTTP/1.x response.
    #[error("{0}")]
    Malformed(String),
}

/// A response: its status code and decoded body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code (200, 401, ...).
    pub status: u16,
    /// The body, transfer encoding removed.
    pub body: Vec<u8>,
}

impl Response {
    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A GET request, built then sent with [`Get::send`] or [`Get::send_blocking`].
#[derive(Debug, Clone)]
pub struct Get<'a> {
    addr: &'a str,
    host: &'a str,
    target: &'a str,
    accept: Option<&'a str>,
    token: Option<&'a str>,
    timeout: Duration,
}

/// Default for [`Get::timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

impl<'a> Get<'a> {
    /// A GET of `target` (path and query, starting with `/`) from `addr` (`host:port`), which is
    /// also the `Host` header; times out after [`DEFAULT_TIMEOUT`].
    pub fn new(addr: &'a str, target: &'a str) -> Self {
        Self {
            addr,
            host: addr,
            target,
            accept: None,
            token: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Sends `host` as the `Host` header instead of the address.
    pub fn host(mut self, host: &'a str) -> Self {
        self.host = host;
        self
    }

    /// Sends an `Accept` header.
    pub fn accept(mut self, media_type: &'a str) -> Self {
        self.accept = Some(media_type);
        self
    }

    /// Sends `Authorization: Bearer <token>` when a token is given.
    pub fn bearer(mut self, token: Option<&'a str>) -> Self {
        self.token = token;
        self
    }

    /// Longest the whole exchange (connect, send, read everything) may take.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The request's bytes.
    fn request(&self) -> String {
        let mut r = format!("GET {} HTTP/1.1\r\nHost: {}\r\n", self.target, self.host);
        if let Some(a) = self.accept {
            r.push_str(&format!("Accept: {a}\r\n"));
        }
        r.push_str("Connection: close\r\n");
        if let Some(t) = self.token {
            r.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        r.push_str("\r\n");
        r
    }

    /// Sends the request on tokio and reads the whole response.
    pub async fn send(&self) -> Result<Response, HttpError> {
        let request = self.request();
        let exchange = async {
            let mut s = tokio::net::TcpStream::connect(self.addr)
                .await
                .map_err(|source| HttpError::Connect {
                    addr: self.addr.to_string(),
                    source,
                })?;
            s.write_all(request.as_bytes())
                .await
                .map_err(HttpError::Send)?;
            let mut raw = Vec::new();
            s.read_to_end(&mut raw).await.map_err(HttpError::Read)?;
            Ok(raw)
        };
        let raw = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| HttpError::Timeout(self.timeout))??;
        parse_response(&raw).map_err(HttpError::Malformed)
    }

    /// Sends the request on a blocking socket and reads the whole response (for synchronous
    /// callers; it blocks the calling thread up to the timeout).
    pub fn send_blocking(&self) -> Result<Response, HttpError> {
        let deadline = Instant::now() + self.timeout;
        let timed_out = || HttpError::Timeout(self.timeout);
        let left = || {
            deadline
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
        };
        let connect_error = |source| HttpError::Connect {
            addr: self.addr.to_string(),
            source,
        };
        let mut last = None;
        let mut stream = None;
        for addr in self.addr.to_socket_addrs().map_err(connect_error)? {
            match TcpStream::connect_timeout(&addr, left().ok_or_else(timed_out)?) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let mut s =
            stream.ok_or_else(|| {
                connect_error(last.unwrap_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
                }))
            })?;
        let is_timeout = |e: &std::io::Error| {
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            )
        };
        s.set_write_timeout(Some(left().ok_or_else(timed_out)?))
            .map_err(HttpError::Send)?;
        s.write_all(self.request().as_bytes()).map_err(|e| {
            if is_timeout(&e) {
                timed_out()
            } else {
                HttpError::Send(e)
            }
        })?;
        let mut raw = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            s.set_read_timeout(Some(left().ok_or_else(timed_out)?))
                .map_err(HttpError::Read)?;
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => return Err(timed_out()),
                Err(e) => return Err(HttpError::Read(e)),
            }
        }
        parse_response(&raw).map_err(HttpError::Malformed)
    }
}

/// Splits a raw HTTP/1.x response into its status and decoded body.
fn parse_response(raw: &[u8]) -> Result<Response, String> {
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
    let body = if chunked {
        dechunk(body)?
    } else {
        match length {
            Some(n) if body.len() < n => {
                return Err(format!("the body ended after {} of {n} bytes", body.len()))
            }
            Some(n) => body[..n].to_vec(),
            None => body.to_vec(),
        }
    };
    Ok(Response { status, body })
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
    use std::net::TcpListener;

    #[test]
    fn responses_decode_by_length_chunks_or_close() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n[]").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"[]"[..]));
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n[1,\r\n2;x=y\r\n2]\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"[1,2]"[..]));
        let r = parse_response(b"HTTP/1.0 401 Unauthorized\r\n\r\nno").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (401, &b"no"[..]));
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n[]")
                .unwrap_err()
                .contains("2 of 9")
        );
        assert!(parse_response(b"SSH-2.0\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }

    /// A one-shot server on a free loopback port: reads the request head, answers `answer`, and
    /// hands back the request it read.
    fn serve_once(answer: &'static [u8]) -> (String, std::thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut byte).unwrap();
                head.push(byte[0]);
            }
            s.write_all(answer).unwrap();
            String::from_utf8(head).unwrap()
        });
        (addr, server)
    }

    #[tokio::test]
    async fn a_get_sends_host_accept_and_token_and_reads_the_body() {
        let (addr, server) =
            serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello and more");
        let r = Get::new(&addr, "/api/windows?device=a")
            .host("agg.example")
            .accept("application/json")
            .bearer(Some("s3cret"))
            .send()
            .await
            .unwrap();
        assert_eq!((r.status, r.text().as_str()), (200, "hello"));
        assert_eq!(
            server.join().unwrap(),
            "GET /api/windows?device=a HTTP/1.1\r\nHost: agg.example\r\nAccept: application/json\r\n\
             Connection: close\r\nAuthorization: Bearer s3cret\r\n\r\n"
        );
    }

    #[test]
    fn a_blocking_get_reads_a_chunked_error_answer() {
        let (addr, server) = serve_once(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nnope\r\n0\r\n\r\n",
        );
        let r = Get::new(&addr, "/x").send_blocking().unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"nope"[..]));
        assert_eq!(
            server.join().unwrap(),
            format!("GET /x HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
        );
    }

    #[tokio::test]
    async fn a_silent_server_times_out_both_ways() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let short = Duration::from_millis(200);
        let e = Get::new(&addr, "/")
            .timeout(short)
            .send()
            .await
            .unwrap_err();
        assert!(matches!(e, HttpError::Timeout(_)), "{e}");
        let e = Get::new(&addr, "/")
            .timeout(short)
            .send_blocking()
            .unwrap_err();
        assert!(matches!(e, HttpError::Timeout(_)), "{e}");
        drop(listener);
    }

    #[tokio::test]
    async fn a_closed_port_is_a_connect_error_naming_the_address() {
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let e = Get::new(&addr, "/").send().await.unwrap_err();
        assert!(matches!(e, HttpError::Connect { .. }), "{e}");
        assert!(
            e.to_string()
                .starts_with(&format!("cannot connect to {addr}")),
            "{e}"
        );
        let e = Get::new(&addr, "/").send_blocking().unwrap_err();
        assert!(matches!(e, HttpError::Connect { .. }), "{e}");
    }

    #[test]
    fn a_truncated_answer_is_malformed() {
        let (addr, server) = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort");
        let e = Get::new(&addr, "/").send_blocking().unwrap_err();
        assert!(e.to_string().contains("5 of 10"), "{e}");
        server.join().unwrap();
    }
}
