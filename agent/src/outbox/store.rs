//! Checkpoint storage: the pipeline checkpoint's header and per-series rows in the outbox database
//! (the codec itself is `agent::checkpoint`).

use super::*;

pub(super) const CHECKPOINT_TREE: &str = "checkpoint";

/// The checkpoint's header (fingerprint, series count, clock; `agent::checkpoint`).
pub(super) const CHECKPOINT_KEY: &[u8] = b"pipeline";

/// Prefix of the checkpoint's per-series rows: `r` + series index (u32, big-endian).
pub(super) const CHECKPOINT_ROW: u8 = b'r';

/// A stored checkpoint as read back: its header and every row with its index, in index order.
pub type StoredCheckpoint = (Vec<u8>, Vec<(u32, Vec<u8>)>);

pub(super) fn row_key(index: u32) -> [u8; 5] {
    let mut k = [CHECKPOINT_ROW; 5];
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

impl Outbox {
    /// Stores the agent's pipeline checkpoint in the same database, so that one [`Outbox::flush`]
    /// makes a checkpoint and every record appended before it durable together (sled recovers a
    /// prefix of its writes): a recovered checkpoint never covers a window whose summary was lost.
    /// `header` replaces the stored one and each `(index, row)` replaces that row, in one atomic
    /// batch; rows not given stay as they are (a checkpoint writes only the series that changed).
    pub fn put_checkpoint(
        &mut self,
        header: &[u8],
        rows: &[(u32, Vec<u8>)],
    ) -> Result<(), OutboxError> {
        let mut batch = sled::Batch::default();
        batch.insert(CHECKPOINT_KEY, header);
        for (i, row) in rows {
            batch.insert(&row_key(*i)[..], row.as_slice());
        }
        self.checkpoints
            .apply_batch(batch)
            .map_err(self.storage("write checkpoint"))?;
        for (i, row) in rows {
            let i = *i as usize;
            if self.checkpoint_rows.len() <= i {
                self.checkpoint_rows.resize(i + 1, 0);
            }
            self.checkpoint_rows[i] = (5 + row.len()) as u64;
        }
        self.checkpoint_bytes =
            (CHECKPOINT_KEY.len() + header.len()) as u64 + self.checkpoint_rows.iter().sum::<u64>();
        Ok(())
    }

    /// The stored checkpoint, if any: its header and every row with its index, in index order.
    pub fn checkpoint(&self) -> Result<Option<StoredCheckpoint>, OutboxError> {
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
        self.checkpoints
            .clear()
            .map_err(self.storage("clear checkpoint"))?;
        self.checkpoint_rows.clear();
        self.checkpoint_bytes = 0;
        Ok(())
    }

    /// Key + value bytes of the stored checkpoint (counted in the disk budget).
    pub fn checkpoint_bytes(&self) -> u64 {
        self.checkpoint_bytes
    }

    pub(super) fn load_checkpoint_sizes(&mut self) -> Result<(), OutboxError> {
        let mut total = 0;
        for item in self.checkpoints.iter() {
            let (k, v) = item.map_err(self.storage("read checkpoint"))?;
            let size = (k.len() + v.len()) as u64;
            total += size;
            if k.len() == 5 && k[0] == CHECKPOINT_ROW {
                let i = u32::from_be_bytes([k[1], k[2], k[3], k[4]]) as usize;
                if self.checkpoint_rows.len() <= i {
                    self.checkpoint_rows.resize(i + 1, 0);
                }
                self.checkpoint_rows[i] = size;
            }
        }
        self.checkpoint_bytes = total;
        Ok(())
    }
}
