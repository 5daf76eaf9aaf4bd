//! Checkpoint storage: the pipeline checkpoint's header and per-series rows in one file beside the
//! outbox database (`pipeline.checkpoint`), replaced whole by write-to-temporary, fsync, rename
//! (the codec of header and rows is `agent::checkpoint`).
//!
//! The rows used to be values of the database's `checkpoint` tree; sled kept every rewritten row
//! in its page cache far beyond its cache bound (65 MB for 10 k series measured with heaptrack),
//! so they moved out. A database from before is still read, and emptied once the first file is
//! written.
//!
//! The agent hands a checkpoint over in chunks of rows ([`Outbox::stage_checkpoint_rows`]), then
//! the header with the last chunk ([`Outbox::put_checkpoint`]); the rows go to the temporary file
//! as they come, so memory holds one chunk, not every changed row.
//!
//! A checkpoint that changed few series (its rows under half the file's size, and the journal
//! still under half of it too) is appended to the journal instead (`outbox::journal`); the next
//! one past those bounds rewrites the file, folding the journal in, and starts a new journal.
//!
//! File format ([`FILE_MAGIC`], version [`FILE_VERSION`]): magic (8 bytes), version (u8), generation
//! (u64, one more than the file it replaced: the journal names it), then per
//! row its index (u32), length (u32) and bytes, in ascending index order, then the end mark (u32
//! `0xFFFF_FFFF`), header length (u32) and header, the row count (u32) and an XXH3-64 checksum of
//! everything before it; integers little-endian.

use super::*;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};

pub(super) const CHECKPOINT_TREE: &str = "checkpoint";

/// The legacy checkpoint's header key in the `checkpoint` tree.
pub(super) const CHECKPOINT_KEY: &[u8] = b"pipeline";

/// Prefix of the legacy checkpoint's per-series rows: `r` + series index (u32, big-endian).
pub(super) const CHECKPOINT_ROW: u8 = b'r';

/// The checkpoint file's name in the outbox directory.
pub const CHECKPOINT_FILE: &str = "pipeline.checkpoint";

/// The file being written, renamed over [`CHECKPOINT_FILE`] once complete and synced.
const CHECKPOINT_TMP: &str = "pipeline.checkpoint.tmp";

/// First bytes of a checkpoint file.
pub const FILE_MAGIC: &[u8; 8] = b"EWCKPT\r\n";

/// Version of the checkpoint file layout.
pub const FILE_VERSION: u8 = 2;

/// The journal is folded into a new checkpoint file once it passes half the file's size, or this.
const JOURNAL_MIN_BYTES: u64 = 256 << 10;

/// Marks the end of the rows (no series has this index).
const END: u32 = u32::MAX;

/// A stored checkpoint as read back: its header and every row with its index, in index order.
pub type StoredCheckpoint = (Vec<u8>, Vec<(u32, Vec<u8>)>);

/// A temporary outbox's checkpoint: header and rows by index.
pub(super) type MemCheckpoint = (Vec<u8>, BTreeMap<u32, Vec<u8>>);

/// Reads a checkpoint file row by row, checking the framing and, at the end, the checksum.
struct FileReader<R: Read> {
    input: R,
    hash: Xxh3,
    rows: u32,
    last: Option<u32>,
    /// Read once the end mark is reached.
    header: Option<Vec<u8>>,
    /// The file's generation (see the module doc).
    generation: u64,
}

impl<R: Read> FileReader<R> {
    /// Checks magic and version.
    fn open(mut input: R) -> Result<Self, String> {
        let mut hash = Xxh3::new();
        let mut magic = [0u8; 9];
        read_exact(&mut input, &mut hash, &mut magic)?;
        if &magic[..8] != FILE_MAGIC {
            return Err("not a checkpoint file (wrong magic bytes)".into());
        }
        if magic[8] != FILE_VERSION {
            return Err(format!(
                "checkpoint file version {}, this agent reads {FILE_VERSION}",
                magic[8]
            ));
        }
        let mut generation = [0u8; 8];
        read_exact(&mut input, &mut hash, &mut generation)?;
        Ok(FileReader {
            input,
            hash,
            rows: 0,
            last: None,
            header: None,
            generation: u64::from_le_bytes(generation),
        })
    }

    /// The next row, `None` after the last one (once the header and checksum are read and
    /// verified: [`FileReader::header`]).
    fn next_row(&mut self) -> Result<Option<(u32, Vec<u8>)>, String> {
        if self.header.is_some() {
            return Ok(None);
        }
        let index = read_u32(&mut self.input, &mut self.hash)?;
        if index == END {
            let len = read_u32(&mut self.input, &mut self.hash)? as usize;
            let header = read_vec(&mut self.input, &mut self.hash, len)?;
            let count = read_u32(&mut self.input, &mut self.hash)?;
            let expected = self.hash.digest();
            let mut sum = [0u8; 8];
            self.input
                .read_exact(&mut sum)
                .map_err(|_| "checkpoint file cut short".to_string())?;
            if u64::from_le_bytes(sum) != expected {
                return Err("checkpoint file checksum mismatch".into());
            }
            if count != self.rows {
                return Err(format!(
                    "checkpoint file says {count} rows, holds {}",
                    self.rows
                ));
            }
            let mut extra = [0u8; 1];
            if self.input.read(&mut extra).map_err(|e| e.to_string())? != 0 {
                return Err("checkpoint file has bytes after its checksum".into());
            }
            self.header = Some(header);
            return Ok(None);
        }
        if self.last.is_some_and(|l| l >= index) {
            return Err(format!("checkpoint file row {index} out of order"));
        }
        let len = read_u32(&mut self.input, &mut self.hash)? as usize;
        let row = read_vec(&mut self.input, &mut self.hash, len)?;
        self.last = Some(index);
        self.rows += 1;
        Ok(Some((index, row)))
    }

    /// Every remaining row, then the header.
    fn read_all(mut self) -> Result<StoredCheckpoint, String> {
        let mut rows = Vec::new();
        while let Some(row) = self.next_row()? {
            rows.push(row);
        }
        Ok((self.header.take().unwrap_or_default(), rows))
    }
}

fn read_exact(input: &mut impl Read, hash: &mut Xxh3, buf: &mut [u8]) -> Result<(), String> {
    input.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => "checkpoint file cut short".to_string(),
        _ => format!("reading: {e}"),
    })?;
    hash.update(buf);
    Ok(())
}

fn read_u32(input: &mut impl Read, hash: &mut Xxh3) -> Result<u32, String> {
    let mut b = [0u8; 4];
    read_exact(input, hash, &mut b)?;
    Ok(u32::from_le_bytes(b))
}

/// `len` bytes, read in bounded steps so a damaged length cannot make a huge allocation.
fn read_vec(input: &mut impl Read, hash: &mut Xxh3, len: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(len.min(1 << 16));
    let mut chunk = [0u8; 8192];
    while out.len() < len {
        let n = (len - out.len()).min(chunk.len());
        read_exact(input, hash, &mut chunk[..n])?;
        out.extend_from_slice(&chunk[..n]);
    }
    Ok(out)
}

/// Writes the checkpoint file format, hashing as it goes.
struct FileWriter<W: Write> {
    out: W,
    hash: Xxh3,
    rows: u32,
}

impl<W: Write> FileWriter<W> {
    fn new(out: W, generation: u64) -> std::io::Result<Self> {
        let mut w = FileWriter {
            out,
            hash: Xxh3::new(),
            rows: 0,
        };
        w.put(FILE_MAGIC)?;
        w.put(&[FILE_VERSION])?;
        w.put(&generation.to_le_bytes())?;
        Ok(w)
    }

    fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.hash.update(b);
        self.out.write_all(b)
    }

    fn row(&mut self, index: u32, row: &[u8]) -> std::io::Result<()> {
        self.put(&index.to_le_bytes())?;
        self.put(&(row.len() as u32).to_le_bytes())?;
        self.put(row)?;
        self.rows += 1;
        Ok(())
    }

    fn finish(mut self, header: &[u8]) -> std::io::Result<W> {
        self.put(&END.to_le_bytes())?;
        self.put(&(header.len() as u32).to_le_bytes())?;
        self.put(header)?;
        let rows = self.rows;
        self.put(&rows.to_le_bytes())?;
        let sum = self.hash.digest();
        self.out.write_all(&sum.to_le_bytes())?;
        Ok(self.out)
    }
}

/// The rows of the stored checkpoint, read while the next one is written.
enum OldRows {
    None,
    /// The checkpoint file's rows (its next one read ahead) with the journal's committed rows
    /// over them.
    File {
        reader: Box<FileReader<BufReader<File>>>,
        next: Option<(u32, Vec<u8>)>,
        journal: std::iter::Peekable<std::collections::btree_map::IntoIter<u32, Vec<u8>>>,
    },
    /// A database from before the file.
    Legacy(Box<sled::Iter>),
}

impl OldRows {
    fn next(&mut self) -> Result<Option<(u32, Vec<u8>)>, String> {
        match self {
            OldRows::None => Ok(None),
            OldRows::File {
                reader,
                next,
                journal,
            } => {
                if next.is_none() {
                    *next = reader.next_row()?;
                }
                let from_file = match (&next, journal.peek()) {
                    (Some((i, _)), Some((j, _))) => i < j,
                    (Some(_), None) => true,
                    (None, _) => false,
                };
                if from_file {
                    return Ok(next.take());
                }
                let row = journal.next();
                if let (Some((i, _)), Some((j, _))) = (&next, &row) {
                    if i == j {
                        *next = None; // replaced by the journal's
                    }
                }
                Ok(row)
            }
            OldRows::Legacy(it) => match it.next() {
                None => Ok(None),
                Some(Ok((k, v))) if k.len() == 5 => Ok(Some((
                    u32::from_be_bytes([k[1], k[2], k[3], k[4]]),
                    v.to_vec(),
                ))),
                Some(Ok((k, _))) => Err(format!(
                    "legacy checkpoint row key {} is not 5 bytes",
                    hex(&k)
                )),
                Some(Err(e)) => Err(format!("reading the legacy checkpoint: {e}")),
            },
        }
    }
}

/// A checkpoint being written: the temporary file, the stored rows streamed through it, and the
/// next stored row not yet passed.
pub(super) struct Staged {
    writer: FileWriter<BufWriter<File>>,
    old: OldRows,
    cur: Option<(u32, Vec<u8>)>,
    last: Option<u32>,
    /// The new file's generation.
    generation: u64,
    /// Bytes of the rows handed over.
    bytes: u64,
}

/// A checkpoint being appended to the journal.
pub(super) struct Appending {
    out: BufWriter<File>,
    last: Option<u32>,
    /// Bytes appended so far.
    bytes: u64,
}

/// Where the checkpoint file and its journal stand (a durable outbox).
#[derive(Debug, Default)]
pub(super) struct CheckpointFiles {
    /// The checkpoint file's generation and size (0: none).
    pub generation: u64,
    pub file_bytes: u64,
    /// The journal's length up to its last commit.
    pub journal_bytes: u64,
    /// Whether the next checkpoint may be appended to the journal: it belongs to the file and
    /// ends at its last commit (cleared by any failure, so the next checkpoint rewrites the file).
    pub appendable: bool,
    /// Whether the last checkpoint's rows reached half the file's size (then the next one rewrites
    /// it: appending would only double the writes).
    pub dense: bool,
}

/// Where a checkpoint being handed over stands.
#[derive(Default)]
pub(super) enum Staging {
    /// None under way.
    #[default]
    Idle,
    /// A durable outbox's temporary file.
    File(Box<Staged>),
    /// A durable outbox's journal.
    Append(Box<Appending>),
    /// A temporary outbox's rows so far.
    Memory(Vec<(u32, Vec<u8>)>),
    /// A chunk failed; [`Outbox::put_checkpoint`] reports it.
    Failed(OutboxError),
}

impl Outbox {
    fn checkpoint_file(&self) -> PathBuf {
        self.path.join(CHECKPOINT_FILE)
    }

    fn cp_io(&self, op: &'static str) -> impl FnOnce(std::io::Error) -> OutboxError + '_ {
        move |source| OutboxError::CheckpointIo {
            path: self.path.clone(),
            file: self.checkpoint_file(),
            op,
            source,
        }
    }

    fn cp_damaged(&self, problem: String) -> OutboxError {
        OutboxError::CheckpointDamaged {
            path: self.path.clone(),
            file: self.checkpoint_file(),
            problem,
        }
    }

    /// Hands over a chunk of the checkpoint being taken: rows in ascending index order, each above
    /// the previous chunk's. They are written to the temporary file at once (a temporary outbox
    /// keeps them); a failure is remembered and reported by [`Outbox::put_checkpoint`].
    pub fn stage_checkpoint_rows(&mut self, rows: &[(u32, Vec<u8>)]) {
        if let Err(e) = self.stage(rows) {
            self.abort_staged();
            self.staging = Staging::Failed(e);
        }
    }

    fn stage(&mut self, rows: &[(u32, Vec<u8>)]) -> Result<(), OutboxError> {
        let last = match &self.staging {
            Staging::Failed(_) => return Ok(()),
            Staging::Idle => None,
            Staging::File(st) => st.last,
            Staging::Append(a) => a.last,
            Staging::Memory(m) => m.last().map(|(i, _)| *i),
        };
        let mut prev = last;
        for (i, _) in rows {
            if prev.is_some_and(|p| p >= *i) {
                return Err(OutboxError::InvalidConfig(format!(
                    "checkpoint rows must come in ascending index order, got {i} after {}",
                    prev.unwrap_or_default()
                )));
            }
            prev = Some(*i);
        }
        if self.temporary {
            match &mut self.staging {
                Staging::Memory(m) => m.extend(rows.iter().cloned()),
                _ => self.staging = Staging::Memory(rows.to_vec()),
            }
            return Ok(());
        }
        if matches!(self.staging, Staging::Idle) && self.may_append() {
            // Cleared until this checkpoint commits: a failure half-way leaves frames after the
            // last commit, which the next checkpoint must not follow.
            self.files.appendable = false;
            let out = std::fs::OpenOptions::new()
                .append(true)
                .open(self.journal_file())
                .map_err(self.cp_io("open the journal"))?;
            self.staging = Staging::Append(Box::new(Appending {
                out: BufWriter::with_capacity(64 << 10, out),
                last: None,
                bytes: 0,
            }));
        }
        if let Staging::Append(a) = &mut self.staging {
            if !rows.is_empty() {
                let (path, file) = (self.path.clone(), self.path.join(journal::JOURNAL_FILE));
                a.bytes +=
                    journal::write_frame(&mut a.out, journal::ROWS, &journal::rows_payload(rows))
                        .map_err(|source| OutboxError::CheckpointIo {
                        path,
                        file,
                        op: "append to the journal",
                        source,
                    })?;
                a.last = rows.last().map(|(i, _)| *i);
            }
            return Ok(());
        }
        if matches!(self.staging, Staging::Idle) {
            let generation = self.files.generation.wrapping_add(1);
            let tmp = self.path.join(CHECKPOINT_TMP);
            let file = File::create(&tmp).map_err(self.cp_io("create the temporary file"))?;
            let writer = FileWriter::new(BufWriter::with_capacity(64 << 10, file), generation)
                .map_err(self.cp_io("write"))?;
            let mut old = match self.open_file()? {
                Some(reader) => {
                    let journal = journal::read(&self.journal_file(), reader.generation)
                        .map_err(self.cp_io("read the journal"))?
                        .map(|j| j.rows)
                        .unwrap_or_default();
                    OldRows::File {
                        reader: Box::new(reader),
                        next: None,
                        journal: journal.into_iter().peekable(),
                    }
                }
                None if !self.checkpoints.is_empty() => {
                    OldRows::Legacy(Box::new(self.checkpoints.scan_prefix([CHECKPOINT_ROW])))
                }
                None => OldRows::None,
            };
            let cur = old.next().map_err(|p| self.cp_damaged(p))?;
            self.staging = Staging::File(Box::new(Staged {
                writer,
                old,
                cur,
                last: None,
                generation,
                bytes: 0,
            }));
        }
        let Staging::File(st) = &mut self.staging else {
            unreachable!("staging was set above")
        };
        let (path, file) = (self.path.clone(), self.path.join(CHECKPOINT_FILE));
        let io = |op| {
            let (path, file) = (path.clone(), file.clone());
            move |source| OutboxError::CheckpointIo {
                path,
                file,
                op,
                source,
            }
        };
        let damaged = |problem| OutboxError::CheckpointDamaged {
            path: path.clone(),
            file: file.clone(),
            problem,
        };
        for (j, row) in rows {
            while let Some((i, old)) = &st.cur {
                if i >= j {
                    break;
                }
                st.writer.row(*i, old).map_err(io("write"))?;
                st.cur = st.old.next().map_err(damaged)?;
            }
            if st.cur.as_ref().is_some_and(|(i, _)| i == j) {
                st.cur = st.old.next().map_err(damaged)?;
            }
            st.writer.row(*j, row).map_err(io("write"))?;
            st.last = Some(*j);
            st.bytes += 8 + row.len() as u64;
        }
        Ok(())
    }

    /// Drops a checkpoint under way and its temporary file.
    fn abort_staged(&mut self) {
        if let Staging::File(_) = std::mem::take(&mut self.staging) {
            let _ = std::fs::remove_file(self.path.join(CHECKPOINT_TMP));
        }
    }

    /// Stores the agent's pipeline checkpoint: `rows` (the last chunk, after those handed to
    /// [`Outbox::stage_checkpoint_rows`]) and `header`. It flushes the database, then renames the
    /// completed, fsynced temporary file over the checkpoint file: everything appended before it
    /// is durable before the checkpoint is, so a recovered checkpoint never covers a window whose
    /// summary was lost, and a crash leaves the previous checkpoint or this one, never a mix.
    /// Each `(index, row)` replaces that row; rows not given stay as they are (a checkpoint hands
    /// over only the series that changed). The file is rewritten whole, the stored rows streamed
    /// through: memory holds only one chunk of rows.
    pub fn put_checkpoint(
        &mut self,
        header: &[u8],
        rows: &[(u32, Vec<u8>)],
    ) -> Result<(), OutboxError> {
        self.stage_checkpoint_rows(rows);
        let staged = match std::mem::take(&mut self.staging) {
            Staging::Failed(e) => return Err(e),
            Staging::Idle => {
                // No rows at all: stage an empty chunk to start the file.
                self.stage_checkpoint_rows(&[]);
                match std::mem::take(&mut self.staging) {
                    Staging::Failed(e) => return Err(e),
                    other => other,
                }
            }
            other => other,
        };
        let st = match staged {
            Staging::Memory(new) => {
                let (h, stored) = self.checkpoint_mem.get_or_insert_with(Default::default);
                *h = header.to_vec();
                stored.extend(new);
                self.checkpoint_bytes =
                    (header.len() + stored.values().map(|r| 8 + r.len()).sum::<usize>()) as u64;
                return Ok(());
            }
            Staging::File(st) => st,
            Staging::Append(a) => return self.commit_append(*a, header),
            Staging::Idle | Staging::Failed(_) => unreachable!("handled above"),
        };
        let result = self.finish_staged(*st, header);
        if result.is_err() {
            let _ = std::fs::remove_file(self.path.join(CHECKPOINT_TMP));
        }
        result
    }

    /// Whether the next checkpoint goes to the journal (see the module doc).
    fn may_append(&self) -> bool {
        let f = &self.files;
        !self.temporary
            && f.appendable
            && f.file_bytes > 0
            && !f.dense
            && f.journal_bytes <= (f.file_bytes / 2).max(JOURNAL_MIN_BYTES)
    }

    fn journal_file(&self) -> PathBuf {
        self.path.join(journal::JOURNAL_FILE)
    }

    /// Ends a checkpoint appended to the journal: the database flushed first (what the checkpoint
    /// covers is durable before it is), then the commit frame written and synced.
    fn commit_append(&mut self, mut a: Appending, header: &[u8]) -> Result<(), OutboxError> {
        let rows = a.bytes;
        self.flush()?;
        let (path, file) = (self.path.clone(), self.journal_file());
        let io = |op| {
            move |source| OutboxError::CheckpointIo {
                path,
                file,
                op,
                source,
            }
        };
        let committed = journal::write_frame(&mut a.out, journal::COMMIT, header)
            .and_then(|n| {
                let out = a.out.into_inner().map_err(|e| e.into_error())?;
                out.sync_data()?;
                Ok(n)
            })
            .map_err(io("append to the journal"))?;
        let f = &mut self.files;
        f.journal_bytes += rows + committed;
        f.appendable = true;
        f.dense = rows.saturating_mul(2) >= f.file_bytes;
        self.checkpoint_bytes = f.file_bytes + f.journal_bytes;
        Ok(())
    }

    fn finish_staged(&mut self, mut st: Staged, header: &[u8]) -> Result<(), OutboxError> {
        while let Some((i, row)) = st.cur.take() {
            st.writer.row(i, &row).map_err(self.cp_io("write"))?;
            st.cur = st.old.next().map_err(|p| self.cp_damaged(p))?;
        }
        let file = st
            .writer
            .finish(header)
            .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
            .map_err(self.cp_io("write"))?;
        file.sync_all().map_err(self.cp_io("fsync"))?;
        drop(file);
        drop(st.old);
        // The records this checkpoint covers become durable before it does.
        self.flush()?;
        std::fs::rename(self.path.join(CHECKPOINT_TMP), self.checkpoint_file())
            .map_err(self.cp_io("rename"))?;
        File::open(&self.path)
            .and_then(|d| d.sync_all())
            .map_err(self.cp_io("fsync the directory"))?;
        if !self.checkpoints.is_empty() {
            // The file now holds everything the legacy tree did.
            self.checkpoints
                .clear()
                .map_err(self.storage("clear legacy checkpoint"))?;
        }
        let file_bytes = std::fs::metadata(self.checkpoint_file())
            .map_err(self.cp_io("stat"))?
            .len();
        self.files = CheckpointFiles {
            generation: st.generation,
            file_bytes,
            journal_bytes: 0,
            appendable: false,
            dense: st.bytes.saturating_mul(2) >= file_bytes,
        };
        self.checkpoint_bytes = file_bytes;
        // A new, empty journal for this file. The one there names the previous generation, so
        // until this is done (or if it fails) it is ignored, and the next checkpoint rewrites the
        // file again.
        if self.new_journal(st.generation).is_ok() {
            self.files.journal_bytes = journal::JOURNAL_HEADER_BYTES;
            self.files.appendable = true;
            self.checkpoint_bytes += journal::JOURNAL_HEADER_BYTES;
        }
        Ok(())
    }

    /// Replaces the journal with an empty one for the checkpoint file of `generation`, durably.
    fn new_journal(&self, generation: u64) -> std::io::Result<()> {
        let mut f = File::create(self.journal_file())?;
        journal::write_header(&mut f, generation)?;
        f.sync_all()?;
        File::open(&self.path)?.sync_all()
    }

    /// The checkpoint file opened (magic and version checked); `None` when there is none.
    fn open_file(&self) -> Result<Option<FileReader<BufReader<File>>>, OutboxError> {
        let file = match File::open(self.checkpoint_file()) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.cp_io("open")(e)),
        };
        FileReader::open(BufReader::with_capacity(64 << 10, file))
            .map(Some)
            .map_err(|p| self.cp_damaged(p))
    }

    /// The stored checkpoint, if any: its header and every row with its index, in index order.
    /// Reads the checkpoint file, or a database from before it (the `checkpoint` tree).
    pub fn checkpoint(&self) -> Result<Option<StoredCheckpoint>, OutboxError> {
        if self.temporary {
            return Ok(self.checkpoint_mem.as_ref().map(|(h, rows)| {
                (
                    h.clone(),
                    rows.iter().map(|(i, r)| (*i, r.clone())).collect(),
                )
            }));
        }
        if let Some(reader) = self.open_file()? {
            let generation = reader.generation;
            let (mut header, mut rows) = reader.read_all().map_err(|p| self.cp_damaged(p))?;
            if let Some(j) = journal::read(&self.journal_file(), generation)
                .map_err(self.cp_io("read the journal"))?
            {
                if let Some(h) = j.header {
                    header = h;
                }
                if !j.rows.is_empty() {
                    let mut all: BTreeMap<u32, Vec<u8>> = rows.into_iter().collect();
                    all.extend(j.rows);
                    rows = all.into_iter().collect();
                }
            }
            return Ok(Some((header, rows)));
        }
        let Some(header) = self
            .checkpoints
            .get(CHECKPOINT_KEY)
            .map_err(self.storage("read checkpoint"))?
        else {
            return Ok(None);
        };
        let mut rows = Vec::new();
        for item in self.checkpoints.scan_prefix([CHECKPOINT_ROW]) {
            let (k, v) = item.map_err(self.storage("read checkpoint"))?;
            let index = <[u8; 4]>::try_from(&k[1..]).map_err(|_| OutboxError::Malformed {
                path: self.path.clone(),
                tree: CHECKPOINT_TREE,
                key: hex(&k),
                problem: "checkpoint row key is not 5 bytes".into(),
            })?;
            rows.push((u32::from_be_bytes(index), v.to_vec()));
        }
        Ok(Some((header.to_vec(), rows)))
    }

    /// Deletes the stored checkpoint (the agent starts from empty state and will not use it).
    pub fn clear_checkpoint(&mut self) -> Result<(), OutboxError> {
        self.abort_staged();
        self.staging = Staging::Idle;
        self.checkpoint_mem = None;
        if !self.temporary {
            self.files = CheckpointFiles::default();
            for name in [CHECKPOINT_FILE, CHECKPOINT_TMP, journal::JOURNAL_FILE] {
                match std::fs::remove_file(self.path.join(name)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(self.cp_io("delete")(e)),
                }
            }
        }
        self.checkpoints
            .clear()
            .map_err(self.storage("clear checkpoint"))?;
        self.checkpoint_bytes = 0;
        Ok(())
    }

    /// Bytes of the stored checkpoint (counted in the disk budget).
    pub fn checkpoint_bytes(&self) -> u64 {
        self.checkpoint_bytes
    }

    /// The stored checkpoint's size, and a leftover temporary file (a crash mid-write) deleted.
    pub(super) fn load_checkpoint_sizes(&mut self) -> Result<(), OutboxError> {
        if self.temporary {
            return Ok(());
        }
        match std::fs::remove_file(self.path.join(CHECKPOINT_TMP)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(self.cp_io("delete the temporary file")(e)),
        }
        let mut total = 0;
        // A damaged file is reported by `checkpoint` (the agent then clears it).
        if let Ok(Some(reader)) = self.open_file() {
            let file_bytes = std::fs::metadata(self.checkpoint_file())
                .map_err(self.cp_io("stat"))?
                .len();
            let j = journal::read(&self.journal_file(), reader.generation)
                .map_err(self.cp_io("read the journal"))?;
            self.files = CheckpointFiles {
                generation: reader.generation,
                file_bytes,
                journal_bytes: j.as_ref().map_or(0, |j| j.committed),
                appendable: j.as_ref().is_some_and(|j| j.clean),
                dense: false,
            };
            total = file_bytes + self.files.journal_bytes;
        }
        for item in self.checkpoints.iter() {
            let (k, v) = item.map_err(self.storage("read checkpoint"))?;
            total += (k.len() + v.len()) as u64;
        }
        self.checkpoint_bytes = total;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> OutboxConfig {
        OutboxConfig {
            max_outbox_bytes: u64::MAX,
            normal_score_below: 0.5,
        }
    }

    fn rows(range: std::ops::Range<u32>, tag: u8) -> Vec<(u32, Vec<u8>)> {
        range.map(|i| (i, vec![tag, i as u8, 7])).collect()
    }

    #[test]
    fn the_file_round_trips_and_merges_changed_rows() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), cfg()).unwrap();
        assert!(o.checkpoint().unwrap().is_none());
        o.put_checkpoint(b"h1", &rows(0..5, 1)).unwrap();
        assert_eq!(
            o.checkpoint().unwrap(),
            Some((b"h1".to_vec(), rows(0..5, 1)))
        );
        // Only row 1 changed, 6 is new.
        o.put_checkpoint(b"h2", &[(1, vec![2, 2]), (6, vec![2])])
            .unwrap();
        let mut want = rows(0..5, 1);
        want[1].1 = vec![2, 2];
        want.push((6, vec![2]));
        assert_eq!(
            o.checkpoint().unwrap(),
            Some((b"h2".to_vec(), want.clone()))
        );
        let size = o.checkpoint_bytes();
        let on_disk = |name| std::fs::metadata(dir.path().join(name)).unwrap().len();
        assert_eq!(
            size,
            on_disk(CHECKPOINT_FILE) + on_disk(journal::JOURNAL_FILE)
        );
        drop(o);
        let o = Outbox::open(dir.path(), cfg()).unwrap();
        assert_eq!(o.checkpoint().unwrap(), Some((b"h2".to_vec(), want)));
        assert_eq!(o.checkpoint_bytes(), size);
    }

    #[test]
    fn rows_out_of_order_or_repeated_are_refused_and_leave_the_stored_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), cfg()).unwrap();
        let err = o
            .put_checkpoint(b"h", &[(1, vec![1]), (1, vec![2])])
            .unwrap_err();
        assert!(err.to_string().contains("ascending"), "{err}");
        assert!(o.checkpoint().unwrap().is_none());
        o.put_checkpoint(b"ok", &rows(0..2, 1)).unwrap();
        // A later chunk below an earlier one fails the whole checkpoint, at its end.
        o.stage_checkpoint_rows(&[(5, vec![5])]);
        o.stage_checkpoint_rows(&[(3, vec![3])]);
        let err = o.put_checkpoint(b"bad", &[(9, vec![9])]).unwrap_err();
        assert!(err.to_string().contains("3 after 5"), "{err}");
        assert!(!dir.path().join(CHECKPOINT_TMP).exists());
        assert_eq!(
            o.checkpoint().unwrap(),
            Some((b"ok".to_vec(), rows(0..2, 1)))
        );
        // The next checkpoint starts clean.
        o.put_checkpoint(b"next", &[(1, vec![7])]).unwrap();
        assert_eq!(
            o.checkpoint().unwrap(),
            Some((b"next".to_vec(), vec![(0, vec![1, 0, 7]), (1, vec![7])]))
        );
    }

    /// Chunks handed over one by one make the same file as one call, and nothing is visible
    /// before the last.
    #[test]
    fn a_checkpoint_in_chunks_is_invisible_until_its_header_arrives() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), cfg()).unwrap();
        o.put_checkpoint(b"h1", &rows(0..10, 1)).unwrap();
        o.stage_checkpoint_rows(&rows(2..4, 2));
        o.stage_checkpoint_rows(&rows(6..7, 2));
        assert_eq!(
            o.checkpoint().unwrap(),
            Some((b"h1".to_vec(), rows(0..10, 1)))
        );
        o.put_checkpoint(b"h2", &rows(9..12, 2)).unwrap();
        let mut want = rows(0..10, 1);
        for i in [2, 3, 6, 9] {
            want[i].1[0] = 2;
        }
        want.extend(rows(10..12, 2));
        assert_eq!(o.checkpoint().unwrap(), Some((b"h2".to_vec(), want)));
        // A header-only checkpoint keeps every row.
        o.put_checkpoint(b"h3", &[]).unwrap();
        assert_eq!(o.checkpoint().unwrap().unwrap().1.len(), 12);
    }

    fn generation(dir: &Path) -> u64 {
        let f = File::open(dir.join(CHECKPOINT_FILE)).unwrap();
        FileReader::open(BufReader::new(f)).unwrap().generation
    }

    /// Checkpoints of few changed rows are appended to the journal, the file untouched, until the
    /// journal passes half the file; a dense one rewrites the file. Every state reads back as a
    /// plain model of "the latest row of each index" says, also after reopening.
    #[test]
    fn sparse_checkpoints_go_to_the_journal_and_dense_ones_rewrite_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), cfg()).unwrap();
        let big = |i: u32, tag: u8| (i, vec![tag; 100 + (i as usize % 7)]);
        let mut model: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
        let all: Vec<_> = (0..4000).map(|i| big(i, 1)).collect();
        o.put_checkpoint(b"h0", &all).unwrap();
        model.extend(all);
        let file_bytes = o.files.file_bytes;
        assert!(file_bytes > 400_000);
        let first = generation(dir.path());
        // Sparse: 20 rows of 4000 each time.
        let mut appended = 0;
        for round in 0..400u32 {
            let rows: Vec<_> = (0..20)
                .map(|k| big((round * 37 + k * 101) % 4000, round as u8))
                .collect();
            let mut sorted = rows.clone();
            sorted.sort_by_key(|(i, _)| *i);
            sorted.dedup_by_key(|(i, _)| *i);
            let header = format!("h{round}");
            let gen_before = generation(dir.path());
            o.put_checkpoint(header.as_bytes(), &sorted).unwrap();
            model.extend(sorted);
            if generation(dir.path()) == gen_before {
                appended += 1;
                assert!(
                    o.files.journal_bytes <= (file_bytes / 2).max(JOURNAL_MIN_BYTES) + 20 * 200,
                    "bounded journal"
                );
            }
            if round % 50 == 0 {
                drop(o);
                o = Outbox::open(dir.path(), cfg()).unwrap();
            }
            let (h, got) = o.checkpoint().unwrap().unwrap();
            assert_eq!(h, header.as_bytes());
            assert_eq!(
                got,
                model.clone().into_iter().collect::<Vec<_>>(),
                "round {round}"
            );
        }
        assert!(
            appended > 350,
            "most sparse checkpoints were appended: {appended}"
        );
        assert!(
            generation(dir.path()) > first,
            "the journal was folded in at least once"
        );
        // Dense: every row changes; the file is rewritten, the journal emptied.
        let g = generation(dir.path());
        let all: Vec<_> = (0..4000).map(|i| big(i, 200)).collect();
        // (The first is appended unless the journal is full, and makes the next one rewrite.)
        o.put_checkpoint(b"dense", &all).unwrap();
        o.put_checkpoint(b"dense", &all).unwrap();
        model.extend(all);
        assert!(generation(dir.path()) > g);
        assert_eq!(o.files.journal_bytes, journal::JOURNAL_HEADER_BYTES);
        assert_eq!(
            o.checkpoint().unwrap().unwrap().1,
            model.into_iter().collect::<Vec<_>>()
        );
    }

    /// A crash mid-append (any cut after the last commit) or a checkpoint that failed half-way
    /// leaves exactly the last committed checkpoint; the next one rewrites the file without the
    /// uncommitted rows.
    #[test]
    fn a_crash_or_a_failure_mid_append_leaves_the_last_committed_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), cfg()).unwrap();
        o.put_checkpoint(b"h1", &rows(0..100, 1)).unwrap();
        o.put_checkpoint(b"h2", &[(3, vec![2])]).unwrap();
        let mut want = rows(0..100, 1);
        want[3].1 = vec![2];
        let committed = std::fs::read(dir.path().join(journal::JOURNAL_FILE)).unwrap();
        o.put_checkpoint(b"h3", &[(4, vec![3])]).unwrap();
        let full = std::fs::read(dir.path().join(journal::JOURNAL_FILE)).unwrap();
        assert!(full.len() > committed.len(), "h3 was appended");
        drop(o);
        for cut in committed.len()..full.len() {
            std::fs::write(dir.path().join(journal::JOURNAL_FILE), &full[..cut]).unwrap();
            let o = Outbox::open(dir.path(), cfg()).unwrap();
            assert_eq!(
                o.checkpoint().unwrap(),
                Some((b"h2".to_vec(), want.clone())),
                "cut {cut}"
            );
            assert_eq!(o.may_append(), cut == committed.len(), "cut {cut}");
        }
        // The next checkpoint after a cut rewrites the file, without the cut frames.
        std::fs::write(
            dir.path().join(journal::JOURNAL_FILE),
            &full[..committed.len() + 3],
        )
        .unwrap();
        let mut o = Outbox::open(dir.path(), cfg()).unwrap();
        let g = generation(dir.path());
        o.put_checkpoint(b"h4", &[(5, vec![4])]).unwrap();
        assert_eq!(generation(dir.path()), g + 1, "rewritten");
        want[5].1 = vec![4];
        assert_eq!(
            o.checkpoint().unwrap(),
            Some((b"h4".to_vec(), want.clone()))
        );
        drop(o);
        // A checkpoint failing half-way: its first chunk reached the journal, never committed.
        let mut o = Outbox::open(dir.path(), cfg()).unwrap();
        o.put_checkpoint(b"h5", &[(7, vec![5])]).unwrap();
        want[7].1 = vec![5];
        o.stage_checkpoint_rows(&[(8, vec![9, 9])]);
        o.stage_checkpoint_rows(&[(1, vec![9, 9])]); // out of order: the checkpoint fails
        assert!(o.put_checkpoint(b"bad", &[]).is_err());
        assert_eq!(
            o.checkpoint().unwrap(),
            Some((b"h5".to_vec(), want.clone()))
        );
        o.put_checkpoint(b"h6", &[(9, vec![6])]).unwrap();
        want[9].1 = vec![6];
        assert_eq!(
            o.checkpoint().unwrap(),
            Some((b"h6".to_vec(), want.clone()))
        );
        drop(o);
        let o = Outbox::open(dir.path(), cfg()).unwrap();
        assert_eq!(o.checkpoint().unwrap(), Some((b"h6".to_vec(), want)));
    }

    /// A crash after a new checkpoint file replaced the old one but before the journal was reset:
    /// the journal names the old file's generation and is ignored.
    #[test]
    fn a_journal_left_from_the_previous_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), cfg()).unwrap();
        o.put_checkpoint(b"h1", &rows(0..10, 1)).unwrap();
        o.put_checkpoint(b"h2", &[(2, vec![2])]).unwrap();
        let stale = std::fs::read(dir.path().join(journal::JOURNAL_FILE)).unwrap();
        // A dense checkpoint is appended and makes the next one rewrite the file.
        o.put_checkpoint(b"h3", &rows(0..10, 3)).unwrap();
        let g = generation(dir.path());
        o.put_checkpoint(b"h3", &rows(0..10, 3)).unwrap();
        assert_eq!(generation(dir.path()), g + 1);
        drop(o);
        std::fs::write(dir.path().join(journal::JOURNAL_FILE), stale).unwrap();
        let o = Outbox::open(dir.path(), cfg()).unwrap();
        assert_eq!(
            o.checkpoint().unwrap(),
            Some((b"h3".to_vec(), rows(0..10, 3)))
        );
    }

    /// A crash mid-write leaves the temporary file: the old checkpoint is read, whole, and the
    /// leftover is deleted on open.
    #[test]
    fn a_crash_mid_write_leaves_the_old_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), cfg()).unwrap();
        o.put_checkpoint(b"old", &rows(0..3, 1)).unwrap();
        drop(o);
        // Every cut of a new file's bytes, as a crash before the rename leaves it.
        let mut full = Vec::new();
        let mut w = FileWriter::new(&mut full, 1).unwrap();
        for (i, r) in rows(0..3, 9) {
            w.row(i, &r).unwrap();
        }
        w.finish(b"new").unwrap();
        for cut in [0, 5, full.len() / 2, full.len() - 1, full.len()] {
            std::fs::write(dir.path().join(CHECKPOINT_TMP), &full[..cut]).unwrap();
            let o = Outbox::open(dir.path(), cfg()).unwrap();
            assert_eq!(
                o.checkpoint().unwrap(),
                Some((b"old".to_vec(), rows(0..3, 1))),
                "cut {cut}"
            );
            assert!(
                !dir.path().join(CHECKPOINT_TMP).exists(),
                "leftover deleted"
            );
        }
    }

    /// A cut-short, damaged, or foreign file is a named error, never a mix or a panic.
    #[test]
    fn a_damaged_file_is_an_error_naming_the_file() {
        let mut full = Vec::new();
        let mut w = FileWriter::new(&mut full, 1).unwrap();
        for (i, r) in rows(0..3, 4) {
            w.row(i, &r).unwrap();
        }
        w.finish(b"hdr").unwrap();
        let read_all = |bytes: &[u8]| FileReader::open(bytes)?.read_all();
        assert_eq!(read_all(&full), Ok((b"hdr".to_vec(), rows(0..3, 4))));
        for cut in 0..full.len() {
            assert!(read_all(&full[..cut]).is_err(), "cut {cut}");
        }
        for i in 0..full.len() {
            let mut bad = full.clone();
            bad[i] ^= 0x10;
            assert!(read_all(&bad).is_err(), "byte {i}");
        }
        let mut longer = full.clone();
        longer.push(0);
        assert!(read_all(&longer)
            .unwrap_err()
            .contains("after its checksum"));
        let mut v2 = full.clone();
        v2[8] = 3;
        assert!(read_all(&v2).unwrap_err().contains("version 3"));
        // A huge damaged length is an error, not a huge allocation.
        let mut huge = Vec::new();
        huge.extend_from_slice(FILE_MAGIC);
        huge.push(FILE_VERSION);
        huge.extend_from_slice(&1u64.to_le_bytes());
        huge.extend_from_slice(&0u32.to_le_bytes());
        huge.extend_from_slice(&(u32::MAX - 1).to_le_bytes());
        assert!(read_all(&huge).unwrap_err().contains("cut short"));

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CHECKPOINT_FILE), &full[..full.len() - 3]).unwrap();
        let mut o = Outbox::open(dir.path(), cfg()).unwrap();
        let err = o.checkpoint().unwrap_err();
        assert!(err.to_string().contains(CHECKPOINT_FILE), "{err}");
        assert!(err.to_string().contains("cut short"), "{err}");
        o.clear_checkpoint().unwrap();
        assert!(o.checkpoint().unwrap().is_none());
        assert!(!dir.path().join(CHECKPOINT_FILE).exists());
    }

    /// A database from before the file (rows in the `checkpoint` tree) is read; the first file
    /// written carries its rows over and empties the tree.
    #[test]
    fn a_legacy_tree_checkpoint_is_read_then_moved_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), cfg()).unwrap();
        let mut batch = sled::Batch::default();
        batch.insert(CHECKPOINT_KEY, &b"legacy"[..]);
        for (i, r) in rows(0..4, 3) {
            let mut k = [CHECKPOINT_ROW; 5];
            k[1..].copy_from_slice(&i.to_be_bytes());
            batch.insert(&k[..], r);
        }
        o.checkpoints.apply_batch(batch).unwrap();
        o.flush().unwrap();
        drop(o);
        let mut o = Outbox::open(dir.path(), cfg()).unwrap();
        assert!(o.checkpoint_bytes() > 0);
        assert_eq!(
            o.checkpoint().unwrap(),
            Some((b"legacy".to_vec(), rows(0..4, 3)))
        );
        o.put_checkpoint(b"new", &[(2, vec![5])]).unwrap();
        let mut want = rows(0..4, 3);
        want[2].1 = vec![5];
        assert_eq!(o.checkpoint().unwrap(), Some((b"new".to_vec(), want)));
        assert!(o.checkpoints.is_empty(), "legacy tree emptied");
    }

    #[test]
    fn a_temporary_outbox_keeps_its_checkpoint_in_memory() {
        let mut o = Outbox::open_temporary(cfg()).unwrap();
        o.put_checkpoint(b"h", &rows(0..2, 1)).unwrap();
        o.put_checkpoint(b"h2", &[(1, vec![9])]).unwrap();
        assert_eq!(
            o.checkpoint().unwrap(),
            Some((b"h2".to_vec(), vec![(0, vec![1, 0, 7]), (1, vec![9])]))
        );
        o.clear_checkpoint().unwrap();
        assert!(o.checkpoint().unwrap().is_none());
        assert_eq!(o.checkpoint_bytes(), 0);
    }
}
