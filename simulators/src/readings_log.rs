//! The readings log: every reading the simulator handed to the MQTT client, one CSV line each,
//! for `edgewatch verify` to reconcile against what the aggregators hold.
//!
//! **Format** (no header): `device,metric,ts_ms,value`, where `value` is Rust's shortest
//! round-trip representation of the f64 (parsing it gives back the same bits). A device or metric
//! containing `,` or `"` is quoted as in RFC 4180 (`"a,b"`, `"say ""hi"""`); config validation
//! rejects control characters in device prefixes and metric names, so a field never holds a line
//! break and every record is exactly one line. The writer and [`parse_line`] live here together so
//! the format is defined once.
//!
//! **Cost:** a line is formatted into a 64 KiB [`BufWriter`] behind an uncontended mutex, with no
//! syscall until the buffer fills: about 0.3 µs per reading (formatting included; optimised build on
//! the shared 2-core machine), so about 1.5 % of a core at the default cap of 50 k publishes/s. A
//! helper thread flushes the buffer once a second, so the file lags the publisher by at most about a
//! second without a timer in the publishing loop. [`ReadingsLog::finish`] flushes the rest. Does not own: deciding what counts as
//! handed to the client (the publisher appends after `publish` returned `Ok`).

use crate::fleet::SimReading;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the helper thread flushes the buffer.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
const BUFFER_BYTES: usize = 64 * 1024;

/// A problem writing or reading a readings log.
#[derive(Debug, thiserror::Error)]
pub enum ReadingsLogError {
    /// The file could not be created, written or flushed (the OS error is the source).
    #[error("readings log {path}")]
    Io {
        /// The log file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A line is not `device,metric,ts_ms,value`.
    #[error("{0}")]
    BadLine(String),
}

/// One line of the log.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedReading {
    /// Device id.
    pub device: String,
    /// Metric name.
    pub metric: String,
    /// Reading timestamp (Unix ms).
    pub ts_ms: i64,
    /// Value, bit for bit as published.
    pub value: f64,
}

/// Appends `field` to `out`, quoted when it contains `,` or `"`.
fn push_field(out: &mut String, field: &str) {
    if field.contains([',', '"']) {
        out.push('"');
        out.push_str(&field.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(field);
    }
}

/// Appends the log line of one reading to `out`, newline included.
pub fn format_line(device: &str, metric: &str, ts_ms: i64, value: f64, out: &mut String) {
    push_field(out, device);
    out.push(',');
    push_field(out, metric);
    // Writing to a String cannot fail; f64's Display is the shortest round-trip form.
    let _ = writeln!(out, ",{ts_ms},{value}");
}

/// Splits one field off `s`: returns it and the rest after the separating comma (`None` at the end).
fn split_field(s: &str) -> Result<(String, Option<&str>), String> {
    if let Some(quoted) = s.strip_prefix('"') {
        let mut field = String::new();
        let mut rest = quoted;
        loop {
            let Some(i) = rest.find('"') else {
                return Err("unterminated quoted field".to_string());
            };
            field.push_str(&rest[..i]);
            rest = &rest[i + 1..];
            if let Some(r) = rest.strip_prefix('"') {
                field.push('"');
                rest = r;
                continue;
            }
            return match rest.strip_prefix(',') {
                Some(r) => Ok((field, Some(r))),
                None if rest.is_empty() => Ok((field, None)),
                None => Err("text after a closing quote".to_string()),
            };
        }
    }
    Ok(match s.split_once(',') {
        Some((f, rest)) => (f.to_string(), Some(rest)),
        None => (s.to_string(), None),
    })
}

/// Parses one line (without its newline). The error says what is wrong, not where: the caller
/// adds the file and line number.
pub fn parse_line(line: &str) -> Result<LoggedReading, ReadingsLogError> {
    let bad = |m: String| ReadingsLogError::BadLine(m);
    let line = line.strip_suffix('\r').unwrap_or(line);
    let mut fields = Vec::with_capacity(4);
    let mut rest = Some(line);
    while let Some(s) = rest {
        let (f, r) = split_field(s).map_err(bad)?;
        fields.push(f);
        rest = r;
    }
    let [device, metric, ts, value]: [String; 4] =
        fields.try_into().map_err(|f: Vec<String>| {
            bad(format!(
                "expected 4 fields device,metric,ts_ms,value, got {}",
                f.len()
            ))
        })?;
    let ts_ms = ts
        .parse()
        .map_err(|_| bad(format!("ts_ms: not an integer, got {ts:?}")))?;
    let value = value
        .parse()
        .map_err(|_| bad(format!("value: not a number, got {value:?}")))?;
    Ok(LoggedReading {
        device,
        metric,
        ts_ms,
        value,
    })
}

#[derive(Debug)]
struct Shared {
    out: BufWriter<File>,
    /// The first write or flush error, reported by the next append or by `finish`.
    failed: Option<std::io::Error>,
}

/// An open readings log. See the module docs.
#[derive(Debug)]
pub(crate) struct ReadingsLog {
    path: PathBuf,
    shared: Arc<Mutex<Shared>>,
    line: String,
    stop: Option<mpsc::Sender<()>>,
    flusher: Option<JoinHandle<()>>,
}

fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // A panic while holding the lock leaves a BufWriter that is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ReadingsLog {
    /// Creates (truncates) `path` and starts the flushing thread.
    pub(crate) fn create(path: &Path) -> Result<Self, ReadingsLogError> {
        let io = |source| ReadingsLogError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::create(path).map_err(io)?;
        let shared = Arc::new(Mutex::new(Shared {
            out: BufWriter::with_capacity(BUFFER_BYTES, file),
            failed: None,
        }));
        let (stop, stopped) = mpsc::channel::<()>();
        let for_thread = shared.clone();
        let flusher = std::thread::Builder::new()
            .name("readings-log".into())
            .spawn(move || {
                // Ends when told to or when the log is dropped (the sender goes away).
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(FLUSH_EVERY) {
                    let mut s = lock(&for_thread);
                    if s.failed.is_none() {
                        if let Err(e) = s.out.flush() {
                            s.failed = Some(e);
                        }
                    }
                }
            })
            .map_err(io)?;
        Ok(Self {
            path: path.to_path_buf(),
            shared,
            line: String::with_capacity(96),
            stop: Some(stop),
            flusher: Some(flusher),
        })
    }

    /// Appends one reading (buffered).
    pub(crate) fn append(&mut self, r: &SimReading) -> Result<(), ReadingsLogError> {
        self.line.clear();
        format_line(&r.device, &r.metric, r.ts_ms, r.value, &mut self.line);
        let mut s = lock(&self.shared);
        let result = match s.failed.take() {
            Some(e) => Err(e),
            None => s.out.write_all(self.line.as_bytes()),
        };
        result.map_err(|source| ReadingsLogError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// Stops the flushing thread and flushes everything appended.
    pub(crate) fn finish(&mut self) -> Result<(), ReadingsLogError> {
        drop(self.stop.take());
        if let Some(t) = self.flusher.take() {
            // The thread only flushes; a panic there leaves nothing to clean up.
            let _ = t.join();
        }
        let mut s = lock(&self.shared);
        let result = match s.failed.take() {
            Some(e) => Err(e),
            None => s.out.flush(),
        };
        result.map_err(|source| ReadingsLogError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(device: &str, metric: &str, ts: i64, v: f64) -> String {
        let mut s = String::new();
        format_line(device, metric, ts, v, &mut s);
        s
    }

    #[test]
    fn lines_round_trip_every_value_bit_for_bit() {
        for v in [
            0.1 + 0.2,
            -0.0,
            1e-300,
            f64::MAX,
            f64::MIN_POSITIVE,
            21.543_210_987_654_32,
            -3.0,
        ] {
            let l = line("dev-0001", "temperature", 1_767_225_600_123, v);
            assert!(l.ends_with('\n'));
            let r = parse_line(l.trim_end_matches('\n')).unwrap();
            assert_eq!(r.value.to_bits(), v.to_bits(), "{l}");
            assert_eq!(r.ts_ms, 1_767_225_600_123);
            assert_eq!(
                (r.device.as_str(), r.metric.as_str()),
                ("dev-0001", "temperature")
            );
        }
    }

    #[test]
    fn commas_and_quotes_in_names_are_quoted_and_read_back() {
        let l = line("site,a \"x\"-01", "temp", -5, 1.5);
        assert_eq!(l, "\"site,a \"\"x\"\"-01\",temp,-5,1.5\n");
        let r = parse_line(l.trim_end()).unwrap();
        assert_eq!(r.device, "site,a \"x\"-01");
        assert_eq!(r.metric, "temp");
    }

    #[test]
    fn malformed_lines_say_what_is_wrong() {
        for (l, needle) in [
            ("a,b,1", "got 3"),
            ("a,b,1,2,3", "got 5"),
            ("a,b,x,2", "ts_ms"),
            ("a,b,1,two", "value"),
            ("\"a,b,1,2", "unterminated"),
            ("\"a\"x,b,1,2", "closing quote"),
        ] {
            let e = parse_line(l).unwrap_err().to_string();
            assert!(e.contains(needle), "{l}: {e}");
        }
    }

    #[test]
    fn appended_readings_are_in_the_file_after_finish() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("readings.csv");
        let mut log = ReadingsLog::create(&path).unwrap();
        for i in 0..3 {
            log.append(&SimReading {
                device: "dev-0".into(),
                metric: "m".into(),
                ts_ms: i,
                value: i as f64 / 3.0,
            })
            .unwrap();
        }
        log.finish().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let back: Vec<_> = text.lines().map(|l| parse_line(l).unwrap()).collect();
        assert_eq!(back.len(), 3);
        assert_eq!(back[2].value, 2.0 / 3.0);
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_the_path() {
        let e = ReadingsLog::create(Path::new("/nonexistent-dir/readings.csv")).unwrap_err();
        assert!(
            e.to_string().contains("/nonexistent-dir/readings.csv"),
            "{e}"
        );
    }
}
