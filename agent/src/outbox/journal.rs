//! The checkpoint journal (`pipeline.journal`): checkpoints that changed few series are appended
//! here as deltas instead of rewriting the whole checkpoint file, so disk writes follow the series
//! that changed, not the series kept (a gateway's flash wears with every byte written).
//!
//! Layout: magic (8 bytes) and the *generation* of the checkpoint file it applies to (u64), then
//! frames: tag (u8), payload length (u32), payload, XXH3-64 of tag, length and payload. A
//! [`ROWS`] frame holds rows (index u32, length u32, bytes); a [`COMMIT`] frame holds the header and
//! makes the rows since the previous commit part of the checkpoint. A reader applies committed rows
//! only and stops at the first damaged or cut frame (a crash mid-append): what follows the last
//! commit was never a checkpoint. A journal of another generation (left behind by a crash between
//! a new checkpoint file and the journal's reset) is ignored. Integers little-endian.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::Path;
use xxhash_rust::xxh3::Xxh3;

/// The journal's file name in the outbox directory.
pub const JOURNAL_FILE: &str = "pipeline.journal";

/// First bytes of a journal.
pub const JOURNAL_MAGIC: &[u8; 8] = b"EWCKJNL\n";

/// Bytes of the journal's own header (magic and generation).
pub const JOURNAL_HEADER_BYTES: u64 = 16;

/// A frame of rows.
pub const ROWS: u8 = 1;

/// A commit frame: the checkpoint's header.
pub const COMMIT: u8 = 2;

/// Frames longer than this are taken for damage (a chunk of rows is far below it).
const MAX_FRAME: u32 = 256 << 20;

/// What a journal holds for a checkpoint file of a given generation.
#[derive(Debug, Default)]
pub struct JournalRead {
    /// The last committed header, if any commit.
    pub header: Option<Vec<u8>>,
    /// Every committed row, the latest of each index.
    pub rows: BTreeMap<u32, Vec<u8>>,
    /// Length of the journal up to its last commit (or its own header).
    pub committed: u64,
    /// Whether the file ends at its last commit (nothing cut or damaged after it).
    pub clean: bool,
}

/// Writes the journal's header for `generation`.
pub fn write_header(out: &mut impl Write, generation: u64) -> std::io::Result<()> {
    out.write_all(JOURNAL_MAGIC)?;
    out.write_all(&generation.to_le_bytes())
}

/// Appends one frame; returns its length in bytes.
pub fn write_frame(out: &mut impl Write, tag: u8, payload: &[u8]) -> std::io::Result<u64> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| *l <= MAX_FRAME)
        .ok_or_else(|| std::io::Error::other("checkpoint journal frame too large"))?;
    let mut hash = Xxh3::new();
    hash.update(&[tag]);
    hash.update(&len.to_le_bytes());
    hash.update(payload);
    out.write_all(&[tag])?;
    out.write_all(&len.to_le_bytes())?;
    out.write_all(payload)?;
    out.write_all(&hash.digest().to_le_bytes())?;
    Ok(1 + 4 + payload.len() as u64 + 8)
}

/// The payload of a [`ROWS`] frame.
pub fn rows_payload(rows: &[(u32, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows.iter().map(|(_, r)| 8 + r.len()).sum());
    for (i, r) in rows {
        out.extend_from_slice(&i.to_le_bytes());
        out.extend_from_slice(&(r.len() as u32).to_le_bytes());
        out.extend_from_slice(r);
    }
    out
}

fn parse_rows(payload: &[u8], into: &mut Vec<(u32, Vec<u8>)>) -> Option<()> {
    let mut at = 0;
    while at < payload.len() {
        let index = u32::from_le_bytes(payload.get(at..at + 4)?.try_into().ok()?);
        let len = u32::from_le_bytes(payload.get(at + 4..at + 8)?.try_into().ok()?) as usize;
        let row = payload.get(at + 8..(at + 8).checked_add(len)?)?;
        into.push((index, row.to_vec()));
        at += 8 + len;
    }
    Some(())
}

/// Reads one frame: `None` at the end of the file or at a damaged or cut frame.
fn read_frame(input: &mut impl Read) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    input.read_exact(&mut head).ok()?;
    let len = u32::from_le_bytes(head[1..5].try_into().ok()?);
    if len > MAX_FRAME {
        return None;
    }
    let mut payload = Vec::with_capacity((len as usize).min(1 << 16));
    input
        .by_ref()
        .take(u64::from(len))
        .read_to_end(&mut payload)
        .ok()?;
    if payload.len() != len as usize {
        return None;
    }
    let mut sum = [0u8; 8];
    input.read_exact(&mut sum).ok()?;
    let mut hash = Xxh3::new();
    hash.update(&head);
    hash.update(&payload);
    (hash.digest() == u64::from_le_bytes(sum)).then_some((head[0], payload))
}

/// Reads the journal at `path` for a checkpoint file of `generation`: `Ok(None)` when there is
/// none, or it belongs to another generation or is not a journal (then it is ignored).
pub fn read(path: &Path, generation: u64) -> std::io::Result<Option<JournalRead>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let total = file.metadata()?.len();
    let mut input = BufReader::with_capacity(64 << 10, file);
    let mut head = [0u8; 16];
    if input.read_exact(&mut head).is_err()
        || &head[..8] != JOURNAL_MAGIC
        || u64::from_le_bytes(head[8..].try_into().unwrap_or_default()) != generation
    {
        return Ok(None);
    }
    let mut out = JournalRead {
        committed: JOURNAL_HEADER_BYTES,
        ..JournalRead::default()
    };
    let mut pending = Vec::new();
    let mut at = JOURNAL_HEADER_BYTES;
    while let Some((tag, payload)) = read_frame(&mut input) {
        at += 1 + 4 + payload.len() as u64 + 8;
        match tag {
            ROWS if parse_rows(&payload, &mut pending).is_some() => {}
            COMMIT => {
                out.rows.extend(pending.drain(..));
                out.header = Some(payload);
                out.committed = at;
            }
            _ => break,
        }
    }
    out.clean = out.committed == total;
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(generation: u64, frames: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        write_header(&mut out, generation).unwrap();
        for (tag, p) in frames {
            write_frame(&mut out, *tag, p).unwrap();
        }
        out
    }

    fn read_bytes(bytes: &[u8], generation: u64) -> Option<JournalRead> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        std::fs::write(&path, bytes).unwrap();
        read(&path, generation).unwrap()
    }

    #[test]
    fn committed_rows_are_applied_in_order_and_the_last_header_wins() {
        let bytes = journal(
            7,
            &[
                (ROWS, rows_payload(&[(1, vec![1]), (5, vec![5])])),
                (COMMIT, b"h1".to_vec()),
                (ROWS, rows_payload(&[(1, vec![11])])),
                (ROWS, rows_payload(&[(9, vec![9, 9])])),
                (COMMIT, b"h2".to_vec()),
            ],
        );
        let j = read_bytes(&bytes, 7).unwrap();
        assert_eq!(j.header.as_deref(), Some(&b"h2"[..]));
        assert_eq!(
            j.rows.into_iter().collect::<Vec<_>>(),
            vec![(1, vec![11]), (5, vec![5]), (9, vec![9, 9])]
        );
        assert!(j.clean);
        assert_eq!(j.committed, bytes.len() as u64);
    }

    #[test]
    fn every_cut_or_flipped_byte_after_a_commit_keeps_exactly_the_committed_rows() {
        let committed = journal(
            3,
            &[
                (ROWS, rows_payload(&[(2, vec![2; 10])])),
                (COMMIT, b"h1".to_vec()),
            ],
        );
        let mut bytes = committed.clone();
        write_frame(&mut bytes, ROWS, &rows_payload(&[(2, vec![7; 10])])).unwrap();
        write_frame(&mut bytes, COMMIT, b"h2").unwrap();
        for cut in committed.len()..bytes.len() {
            let j = read_bytes(&bytes[..cut], 3).unwrap();
            assert_eq!(j.header.as_deref(), Some(&b"h1"[..]), "cut at {cut}");
            assert_eq!(j.rows[&2], vec![2; 10], "cut at {cut}");
            assert_eq!(j.committed, committed.len() as u64);
            assert_eq!(j.clean, cut == committed.len());
        }
        for flip in committed.len()..bytes.len() {
            let mut b = bytes.clone();
            b[flip] ^= 0x40;
            let j = read_bytes(&b, 3).unwrap();
            assert_eq!(j.rows[&2], vec![2; 10], "flip at {flip}");
            assert!(!j.clean);
        }
        let j = read_bytes(&bytes, 3).unwrap();
        assert_eq!(j.rows[&2], vec![7; 10]);
    }

    #[test]
    fn a_journal_of_another_generation_or_no_journal_is_ignored() {
        let bytes = journal(3, &[(COMMIT, b"h".to_vec())]);
        assert!(read_bytes(&bytes, 4).is_none());
        assert!(read_bytes(b"garbage", 3).is_none());
        let dir = tempfile::tempdir().unwrap();
        assert!(read(&dir.path().join(JOURNAL_FILE), 3).unwrap().is_none());
        let j = read_bytes(&journal(3, &[]), 3).unwrap();
        assert!(j.clean && j.header.is_none() && j.rows.is_empty());
    }

    #[test]
    fn a_huge_frame_length_is_damage_not_an_allocation() {
        let mut bytes = journal(1, &[(COMMIT, b"h".to_vec())]);
        bytes.push(ROWS);
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        let j = read_bytes(&bytes, 1).unwrap();
        assert_eq!(j.header.as_deref(), Some(&b"h"[..]));
        assert!(!j.clean);
    }
}
