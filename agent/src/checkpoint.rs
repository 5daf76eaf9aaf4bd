//! The agent's stored checkpoint: a small header plus one row per series (rows come from
//! [`crate::pipeline::Pipeline::take_changed_upto`]; the outbox stores both in its checkpoint
//! file).
//! This module owns both codecs (header, row framing), [`take`] (the pipeline task hands a
//! checkpoint to the uplink) and [`restore`] (the pipeline at start-up).
//!
//! A checkpoint hands over the header and only the rows of series that changed since the previous
//! one, in chunks of [`CHUNK_ROWS`]; the outbox streams them into a new checkpoint file, made
//! durable after the outbox records it covers: an idle agent writes nothing. The header says when it was taken, whether it was the clean
//! shutdown's, the reading rate before it (for the loss estimate after a crash), the configuration
//! fingerprint and series count the rows make up, and, in `after_checkpoint` mode, the packet ids of
//! readings it covers whose acks were still to be sent.
//!
//! Header format ([`FORMAT`]): format byte, wall clock ms (i64), rate (f64), clean (u8),
//! fingerprint (u64), series (u32), packet-id count (u32) and the packet ids (u16 each), all
//! little-endian, then an XXH3-64 checksum of everything before it.
//!
//! Row format: the series' postcard encoding (the pipeline's), then an XXH3-64 checksum of it,
//! little-endian ([`seal_row`], [`open_row`]).

use crate::config::{AckMode, AgentConfig};
use crate::error::{AgentError, SnapshotError};
use crate::now_ms;
use crate::outbox::Outbox;
use crate::pipeline::Pipeline;
use crate::telemetry::AgentMetrics;
use crate::uplink::ToUplink;
use crate::worker::Acker;
use rumqttc::AsyncClient;
use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use xxhash_rust::xxh3::xxh3_64;

/// Version of the header layout (2 was a single-blob checkpoint; it is not read any more: the
/// agent starts from empty state, logged).
pub(crate) const FORMAT: u8 = 3;

/// A decoded checkpoint header.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Header {
    /// Wall clock when it was taken, ms.
    pub wall_ms: i64,
    /// Readings per second before it.
    pub rate: f64,
    /// Taken by a clean shutdown.
    pub clean: bool,
    /// Configuration fingerprint of the rows (see the pipeline's snapshot format).
    pub fingerprint: u64,
    /// Number of series: rows `0..series` make up the state.
    pub series: u32,
    /// after_checkpoint: packet ids of the readings this checkpoint covers whose acks were still
    /// to be sent. After a crash the broker redelivers them (same packet id, DUP set); they are
    /// already counted, so they are acknowledged and skipped.
    pub covered_pkids: Vec<u16>,
}

impl Header {
    /// The stored bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(1 + 8 + 8 + 1 + 8 + 4 + 4 + 2 * self.covered_pkids.len() + 8);
        out.push(FORMAT);
        out.extend_from_slice(&self.wall_ms.to_le_bytes());
        out.extend_from_slice(&self.rate.to_le_bytes());
        out.push(u8::from(self.clean));
        out.extend_from_slice(&self.fingerprint.to_le_bytes());
        out.extend_from_slice(&self.series.to_le_bytes());
        out.extend_from_slice(&(self.covered_pkids.len() as u32).to_le_bytes());
        for p in &self.covered_pkids {
            out.extend_from_slice(&p.to_le_bytes());
        }
        let sum = xxh3_64(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// Decodes stored bytes; `Err` says why they cannot be used.
    pub fn decode(bytes: &[u8]) -> Result<Header, String> {
        let (body, sum) = bytes
            .split_last_chunk::<8>()
            .ok_or_else(|| format!("{} bytes is too short for a checkpoint header", bytes.len()))?;
        let (&format, rest) = body.split_first().ok_or("empty checkpoint header")?;
        if format != FORMAT {
            return Err(format!(
                "checkpoint format {format}, this agent reads {FORMAT}"
            ));
        }
        if u64::from_le_bytes(*sum) != xxh3_64(body) {
            return Err("checkpoint header checksum mismatch".into());
        }
        let short = || "checkpoint header cut short".to_string();
        let (wall, rest) = rest.split_first_chunk::<8>().ok_or_else(short)?;
        let (rate, rest) = rest.split_first_chunk::<8>().ok_or_else(short)?;
        let (&clean, rest) = rest.split_first().ok_or_else(short)?;
        let (fingerprint, rest) = rest.split_first_chunk::<8>().ok_or_else(short)?;
        let (series, rest) = rest.split_first_chunk::<4>().ok_or_else(short)?;
        let (n, mut rest) = rest.split_first_chunk::<4>().ok_or_else(short)?;
        let n = u32::from_le_bytes(*n) as usize;
        if rest.len() != 2 * n {
            return Err(format!(
                "checkpoint header lists {n} packet ids in {} bytes",
                rest.len()
            ));
        }
        let mut covered_pkids = Vec::with_capacity(n);
        while let Some((p, r)) = rest.split_first_chunk::<2>() {
            covered_pkids.push(u16::from_le_bytes(*p));
            rest = r;
        }
        Ok(Header {
            wall_ms: i64::from_le_bytes(*wall),
            rate: f64::from_le_bytes(*rate),
            clean: clean == 1,
            fingerprint: u64::from_le_bytes(*fingerprint),
            series: u32::from_le_bytes(*series),
            covered_pkids,
        })
    }
}

/// The rows `0..series` of a stored checkpoint, in order, or why they do not make up a state.
pub(crate) fn complete_rows(series: u32, rows: &[(u32, Vec<u8>)]) -> Result<Vec<&[u8]>, String> {
    let mut out = Vec::with_capacity(series as usize);
    for (expected, (index, row)) in (0..series).zip(rows) {
        if *index != expected {
            return Err(format!("checkpoint row {expected} is missing"));
        }
        out.push(row.as_slice());
    }
    if out.len() < series as usize {
        return Err(format!(
            "checkpoint has {} of {series} series rows",
            out.len()
        ));
    }
    Ok(out)
}

/// A series row as stored: `body` (the pipeline's encoding of one series) and its checksum.
/// The row is cut to its length: a checkpoint holds every changed row at once (12 MB for 10 k
/// series), and the encoder's doubling growth left up to twice that allocated.
pub(crate) fn seal_row(mut body: Vec<u8>) -> Vec<u8> {
    let sum = xxh3_64(&body);
    body.extend_from_slice(&sum.to_le_bytes());
    body.shrink_to_fit();
    body
}

/// The body of a stored row ([`seal_row`]), or why it is damaged.
pub(crate) fn open_row(row: &[u8]) -> Result<&[u8], SnapshotError> {
    let (body, sum) = row
        .split_last_chunk::<8>()
        .ok_or(SnapshotError::Truncated { len: row.len() })?;
    let (found, expected) = (u64::from_le_bytes(*sum), xxh3_64(body));
    if found != expected {
        return Err(SnapshotError::Checksum { found, expected });
    }
    Ok(body)
}

/// Rows per chunk a checkpoint is handed to the uplink in (about 80 KB with the default detector):
/// memory holds a few chunks, not every changed row (12 MB at 10 k series).
pub(crate) const CHUNK_ROWS: usize = 64;

/// Rate bookkeeping between checkpoints.
#[derive(Default)]
pub(crate) struct Clock {
    last: Option<(Instant, u64)>,
    rate: f64,
    /// The next checkpoint is the clean shutdown's.
    pub clean: bool,
    /// The stored header is an idle one (no change, rate 0): the next idle checkpoint is skipped.
    idle_written: bool,
}

/// Where a checkpoint goes and what it acknowledges: the pipeline task's side of [`take`].
pub(crate) struct Sink<'a> {
    /// The uplink's queue (outputs, then the checkpoint behind them).
    pub out_tx: &'a mpsc::Sender<ToUplink>,
    /// The source link's client (after_checkpoint acks).
    pub src: &'a AsyncClient,
    /// Acknowledges the covered readings once the checkpoint is durable.
    pub acker: &'a mut Acker,
}

/// Hands the pipeline's pending outputs, then a snapshot of it, to the uplink (which stores the
/// checkpoint behind those outputs and flushes both); in `after_checkpoint` mode the readings it
/// covers (`unacked`) are then acknowledged. Returns false when the uplink is gone.
pub(crate) async fn take(
    agent: &str,
    pipeline: &mut Pipeline,
    metrics: &AgentMetrics,
    unacked: &mut Vec<rumqttc::Publish>,
    clock: &mut Clock,
    sink: Sink<'_>,
) -> bool {
    let out = pipeline.take_outputs();
    if !out.is_empty() && sink.out_tx.send(ToUplink::Outputs(out)).await.is_err() {
        return false;
    }
    let snapshot_failed = |e: SnapshotError| {
        metrics.checkpoint_errors_total.fetch_add(1, Relaxed);
        tracing::error!(agent, error = %e, "pipeline snapshot failed; keeping the previous checkpoint");
    };
    let mut changed = match pipeline.take_changed_upto(CHUNK_ROWS) {
        Ok(c) => c,
        Err(e) => {
            snapshot_failed(e);
            return true;
        }
    };
    // Full chunks go ahead of the header (the uplink writes them to the checkpoint's temporary
    // file at once); no reading is applied in between, so the chunks make one snapshot.
    let any_rows = !changed.rows.is_empty();
    while changed.rows.len() >= CHUNK_ROWS {
        let next = match pipeline.take_changed_upto(CHUNK_ROWS) {
            Ok(c) => c,
            Err(e) => {
                // The chunks handed over stay staged; the next checkpoint's first chunk fails
                // that staging (indexes not ascending) and the one after starts clean.
                snapshot_failed(e);
                return true;
            }
        };
        let chunk = std::mem::replace(&mut changed.rows, next.rows);
        if sink
            .out_tx
            .send(ToUplink::CheckpointRows(chunk))
            .await
            .is_err()
        {
            return false;
        }
    }
    let now = Instant::now();
    let readings = metrics.readings_total.load(Relaxed);
    if let Some((at, before)) = clock.last {
        let secs = now.duration_since(at).as_secs_f64();
        if secs > 0.0 {
            clock.rate = readings.saturating_sub(before) as f64 / secs;
        }
    }
    clock.last = Some((now, readings));
    // Nothing changed, nothing to acknowledge, and the stored header already says so (rate 0):
    // an idle agent writes nothing at all.
    let idle = !any_rows && unacked.is_empty() && !clock.clean && clock.rate == 0.0;
    if idle && clock.idle_written {
        return true;
    }
    clock.idle_written = idle;
    let header = Header {
        wall_ms: now_ms(),
        rate: clock.rate,
        clean: clock.clean,
        fingerprint: changed.fingerprint,
        series: changed.series,
        covered_pkids: unacked.iter().map(|p| p.pkid).collect(),
    };
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    if sink
        .out_tx
        .send(ToUplink::Checkpoint {
            header: header.encode(),
            rows: changed.rows,
            done: Some(done_tx),
        })
        .await
        .is_err()
    {
        return false;
    }
    if !unacked.is_empty() {
        sink.acker.push(sink.src, done_rx, std::mem::take(unacked));
    }
    true
}

/// The pipeline of the last checkpoint in the outbox database, or a fresh one (logged) when there
/// is none or it cannot be used (the unusable checkpoint is then deleted, so the fresh state's
/// rows start clean), with the packet ids the checkpoint covers. In `on_receipt` mode, after a
/// crash, estimates the readings lost since that checkpoint from the rate before it (log and
/// metric).
pub(crate) fn restore(
    cfg: &AgentConfig,
    metrics: &Arc<AgentMetrics>,
    outbox: &mut Outbox,
) -> Result<(Pipeline, HashSet<u16>), AgentError> {
    let restored = match outbox.checkpoint() {
        Ok(None) => return Ok((Pipeline::new(cfg, metrics.clone())?, HashSet::new())),
        Ok(Some((header, rows))) => Header::decode(&header).and_then(|h| {
            let rows = complete_rows(h.series, &rows)?;
            Pipeline::restore_rows(cfg, metrics.clone(), h.fingerprint, rows)
                .map(|p| (h, p))
                .map_err(|e| e.to_string())
        }),
        Err(e) => Err(format!("cannot read the checkpoint: {e}")),
    };
    match restored {
        Ok((h, mut p)) => {
            p.supersede_after_restore();
            p.touch_all(now_ms());
            let age_ms = now_ms().saturating_sub(h.wall_ms).max(0);
            tracing::info!(agent = %cfg.id, series = p.series(), age_ms, clean = h.clean, "resumed from the last checkpoint");
            if !h.clean && cfg.state.ack_mode == AckMode::OnReceipt {
                let window = age_ms.min(cfg.state.checkpoint_interval_ms as i64) as f64 / 1000.0;
                let lost = (h.rate * window).round() as u64;
                metrics.restart_loss_estimate.store(lost, Relaxed);
                tracing::warn!(agent = %cfg.id, estimated_lost_readings = lost, rate_per_sec = h.rate.round(), "the agent did not stop cleanly: readings received after the last checkpoint were lost (ack_mode on_receipt); use after_checkpoint to have the broker redeliver them");
            }
            Ok((p, h.covered_pkids.into_iter().collect()))
        }
        Err(why) => {
            tracing::warn!(agent = %cfg.id, error = %why, "checkpoint not usable (configuration changed?); starting with empty state");
            if let Err(e) = outbox.clear_checkpoint() {
                tracing::warn!(agent = %cfg.id, error = %e, "could not delete the unusable checkpoint");
            }
            Ok((Pipeline::new(cfg, metrics.clone())?, HashSet::new()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            wall_ms: 1_767_225_600_000,
            rate: 1234.5,
            clean: true,
            fingerprint: 0xdead_beef,
            series: 3,
            covered_pkids: vec![1, 65535, 7],
        }
    }

    #[test]
    fn header_round_trips() {
        assert_eq!(Header::decode(&header().encode()), Ok(header()));
        let empty = Header {
            covered_pkids: Vec::new(),
            ..header()
        };
        assert_eq!(Header::decode(&empty.encode()), Ok(empty));
    }

    #[test]
    fn damaged_truncated_or_foreign_headers_are_errors_not_panics() {
        let bytes = header().encode();
        for len in 0..bytes.len() {
            assert!(Header::decode(&bytes[..len]).is_err(), "{len}");
        }
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x04;
            assert!(Header::decode(&bad).is_err(), "byte {i}");
        }
        let mut old = bytes.clone();
        old[0] = 2;
        assert!(Header::decode(&old).unwrap_err().contains("format 2"));
    }

    #[test]
    fn rows_must_be_complete_and_in_order() {
        let rows: Vec<(u32, Vec<u8>)> = (0..3).map(|i| (i, vec![i as u8])).collect();
        assert_eq!(complete_rows(3, &rows).unwrap().len(), 3);
        assert_eq!(
            complete_rows(2, &rows).unwrap().len(),
            2,
            "extra rows ignored"
        );
        assert!(complete_rows(4, &rows).unwrap_err().contains("3 of 4"));
        let gap = vec![(0, vec![0]), (2, vec![2])];
        assert!(complete_rows(2, &gap)
            .unwrap_err()
            .contains("row 1 is missing"));
    }

    fn stored(cfg: &AgentConfig, devices: usize) -> (Outbox, Header) {
        let metrics = Arc::new(AgentMetrics::default());
        let mut p = Pipeline::new(cfg, metrics).unwrap();
        let now = now_ms();
        for d in 0..devices {
            let payload = format!(r#"{{"ts":{now},"value":{d}.5}}"#);
            p.handle(
                format!("sensors/dev-{d}/temp").as_bytes(),
                payload.as_bytes(),
                now,
            )
            .unwrap();
        }
        let changed = p.take_changed().unwrap();
        let h = Header {
            wall_ms: now,
            rate: 0.0,
            clean: true,
            fingerprint: changed.fingerprint,
            series: changed.series,
            covered_pkids: vec![4, 5],
        };
        let mut outbox = Outbox::open_temporary(crate::outbox::OutboxConfig {
            max_outbox_bytes: u64::MAX,
            normal_score_below: 0.5,
        })
        .unwrap();
        outbox.put_checkpoint(&h.encode(), &changed.rows).unwrap();
        (outbox, h)
    }

    #[test]
    fn rows_round_trip_and_damage_is_a_clear_error() {
        let row = seal_row(vec![1, 2, 3]);
        assert_eq!(open_row(&row), Ok(&[1u8, 2, 3][..]));
        let mut bad = row.clone();
        bad[1] ^= 1;
        let err = open_row(&bad).unwrap_err();
        assert!(matches!(err, SnapshotError::Checksum { .. }), "{err}");
        assert!(err.to_string().contains("corrupt"), "{err}");
        assert_eq!(
            open_row(&row[..5]),
            Err(SnapshotError::Truncated { len: 5 })
        );
    }

    #[test]
    fn restore_returns_the_stored_pipeline_and_covered_packet_ids() {
        let cfg = AgentConfig::with_id("gw-cp");
        let (mut outbox, _) = stored(&cfg, 3);
        let metrics = Arc::new(AgentMetrics::default());
        let (p, covered) = restore(&cfg, &metrics, &mut outbox).unwrap();
        assert_eq!(p.series(), 3);
        assert_eq!(covered, HashSet::from([4, 5]));
        assert!(outbox.checkpoint().unwrap().is_some(), "kept");
    }

    #[test]
    fn a_corrupt_row_starts_fresh_and_deletes_the_checkpoint() {
        let cfg = AgentConfig::with_id("gw-cp");
        let (mut outbox, h) = stored(&cfg, 2);
        let (_, rows) = outbox.checkpoint().unwrap().unwrap();
        let mut row = rows[1].1.clone();
        row[0] ^= 0xff;
        outbox.put_checkpoint(&h.encode(), &[(1, row)]).unwrap();
        let metrics = Arc::new(AgentMetrics::default());
        let (p, covered) = restore(&cfg, &metrics, &mut outbox).unwrap();
        assert_eq!(p.series(), 0, "fresh state");
        assert!(covered.is_empty());
        assert!(
            outbox.checkpoint().unwrap().is_none(),
            "unusable checkpoint deleted"
        );
    }

    #[test]
    fn no_checkpoint_is_a_fresh_pipeline() {
        let cfg = AgentConfig::with_id("gw-cp");
        let mut outbox = Outbox::open_temporary(crate::outbox::OutboxConfig {
            max_outbox_bytes: u64::MAX,
            normal_score_below: 0.5,
        })
        .unwrap();
        let metrics = Arc::new(AgentMetrics::default());
        let (p, covered) = restore(&cfg, &metrics, &mut outbox).unwrap();
        assert_eq!(p.series(), 0);
        assert!(covered.is_empty());
    }
}
