//! The agent's stored checkpoint: a small header plus one row per series (rows come from
//! [`crate::pipeline::Pipeline::take_changed`]; the outbox stores both in its database).
//!
//! A checkpoint writes the header and only the rows of series that changed since the previous one,
//! in one atomic batch flushed with the outbox records it covers: an idle agent writes nothing, a
//! busy one writes its active series. The header says when it was taken, whether it was the clean
//! shutdown's, the reading rate before it (for the loss estimate after a crash), the configuration
//! fingerprint and series count the rows make up, and, in `after_checkpoint` mode, the packet ids of
//! readings it covers whose acks were still to be sent.
//!
//! Header format ([`FORMAT`]): format byte, wall clock ms (i64), rate (f64), clean (u8),
//! fingerprint (u64), series (u32), packet-id count (u32) and the packet ids (u16 each), all
//! little-endian, then an XXH3-64 checksum of everything before it.

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
}
