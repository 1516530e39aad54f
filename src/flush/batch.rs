//! Batches: records read from the WAL, their rows gathered per (table, column set).
//!
//! A batch takes whole records, so its last LSN is always the end of a record. It is full
//! once it holds `max_rows` rows or `max_bytes` bytes of row data (the last record may take
//! it past either), and due once its oldest row has waited `max_wait` since it was
//! acknowledged.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tracing::warn;

use crate::config::BatchConfig;
use crate::fsutil;
use crate::lsn::Lsn;
use crate::rowgroup::{MalformedGroup, RowFormat, RowGroup};
use crate::table::TableName;
use crate::wal::{Record, RecordKind, WalError, WalReader};

/// The rows of one (table, column set) in a batch.
#[derive(Debug)]
pub struct BatchGroup {
    /// How the rows are stored.
    pub format: RowFormat,
    /// The target table.
    pub table: TableName,
    /// The COPY column list (empty for JSON rows).
    pub columns: Vec<String>,
    /// The rows, concatenated as in the records' bodies.
    pub data: Vec<u8>,
    /// The rows' LSNs, in `data` order: first LSN and row count of each run of
    /// consecutive LSNs.
    pub runs: Vec<(Lsn, u64)>,
}

/// Rows read from the WAL, ready to be sent in one transaction.
#[derive(Debug, Default)]
pub struct Batch {
    /// Only rows of this table (as its records name it) are taken; `None`: every table.
    only: Option<String>,
    groups: Vec<BatchGroup>,
    /// Group index by the row-group header bytes (format, table and columns).
    index: HashMap<Vec<u8>, usize>,
    rows: u64,
    /// LSNs passed over: quarantined records, and other tables' rows in a catch-up.
    passed_over: u64,
    bytes: u64,
    last: Lsn,
    /// CRC of the last record: stored with the watermark as its fingerprint.
    last_crc: u32,
    due: Option<Instant>,
}

/// Why a batch could not be filled.
#[derive(Debug, thiserror::Error)]
pub enum FillError {
    /// Reading the WAL failed.
    #[error(transparent)]
    Wal(#[from] WalError),
    /// A record's payload is not a row group.
    #[error("record at LSN {lsn}: {error}")]
    Malformed {
        /// The record's first LSN.
        lsn: Lsn,
        /// What is wrong.
        error: MalformedGroup,
    },
}

impl Batch {
    /// An empty batch, starting after LSN `after`, that takes only the rows of `table` (as
    /// its WAL records name it) and passes over the others: a held table's catch-up.
    #[must_use]
    pub fn only(table: String, after: Lsn) -> Batch {
        Batch {
            only: Some(table),
            last: after,
            ..Batch::default()
        }
    }

    /// Adds every row of `record`.
    ///
    /// # Errors
    /// When the payload is not a row group.
    pub fn push(&mut self, record: Record<'_>, max_wait: Duration) -> Result<(), MalformedGroup> {
        self.last = record.lsns.last;
        self.last_crc = record.crc;
        if record.kind == RecordKind::Quarantined {
            warn!(
                lsns = %record.lsns,
                note = %String::from_utf8_lossy(record.payload),
                "passing over LSNs an operator quarantined: their rows are not loaded"
            );
            self.passed_over += record.lsns.rows();
            return Ok(());
        }
        let group = RowGroup::decode(record.payload)?;
        if self
            .only
            .as_ref()
            .is_some_and(|only| *only != group.table.to_string())
        {
            self.passed_over += record.lsns.rows();
            return Ok(());
        }
        let header = &record.payload[..record.payload.len() - group.body.len()];
        let slot = match self.index.get(header) {
            Some(&slot) => slot,
            None => {
                self.groups.push(BatchGroup {
                    format: group.format,
                    table: group.table,
                    columns: group.columns.iter().map(|c| (*c).to_string()).collect(),
                    data: Vec::new(),
                    runs: Vec::new(),
                });
                self.index.insert(header.to_vec(), self.groups.len() - 1);
                self.groups.len() - 1
            }
        };
        let target = &mut self.groups[slot];
        target.data.extend_from_slice(group.body);
        match target.runs.last_mut() {
            Some((first, rows)) if first.0 + *rows == record.lsns.first.0 => {
                *rows += record.lsns.rows();
            }
            _ => target.runs.push((record.lsns.first, record.lsns.rows())),
        }
        if self.due.is_none() {
            let age = Duration::from_micros(fsutil::now_us().saturating_sub(record.time_us));
            self.due = Some(Instant::now() + max_wait.saturating_sub(age));
        }
        self.rows += record.lsns.rows();
        self.bytes += group.body.len() as u64;
        Ok(())
    }

    /// Reads records at or below `durable` until the batch is full, the reader is caught
    /// up, or it meets an error after at least one record.
    ///
    /// # Errors
    /// See [`FillError`].
    pub fn fill_from(
        &mut self,
        reader: &mut WalReader,
        durable: Lsn,
        limits: &BatchConfig,
    ) -> Result<(), FillError> {
        while !self.is_full(limits) {
            let record = match reader.next(durable) {
                Ok(Some(record)) => record,
                Ok(None) => break,
                // The records before damage are loaded first; the next fill meets it again.
                Err(_) if !self.is_empty() => break,
                Err(e) => return Err(e.into()),
            };
            let lsn = record.lsns.first;
            self.push(record, limits.max_wait)
                .map_err(|error| FillError::Malformed { lsn, error })?;
        }
        Ok(())
    }

    /// Whether the batch reached `max_rows` or `max_bytes`.
    #[must_use]
    pub fn is_full(&self, limits: &BatchConfig) -> bool {
        self.rows >= limits.max_rows || self.bytes >= limits.max_bytes
    }

    /// When the oldest row will have waited `max_wait`; `None` for an empty batch.
    #[must_use]
    pub fn due(&self) -> Option<Instant> {
        self.due
    }

    /// Whether the batch holds no records: no rows, and no quarantined LSNs to pass over.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.rows == 0 && self.passed_over == 0
    }

    /// Rows in the batch.
    #[must_use]
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Bytes of row data in the batch.
    #[must_use]
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// LSN of the batch's last row: the watermark once it is committed.
    #[must_use]
    pub fn last_lsn(&self) -> Lsn {
        self.last
    }

    /// The CRC of the batch's last record (see [`crate::wal::WalReader::crc_before`]).
    #[must_use]
    pub fn last_crc(&self) -> u32 {
        self.last_crc
    }

    /// Takes the groups out, in the order their first rows were read.
    #[must_use]
    pub fn into_groups(self) -> Vec<BatchGroup> {
        self.groups
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::LsnRange;
    use crate::rowgroup::RowGroupBuilder;

    fn payload(table: &str, columns: &[&str], rows: &[&str]) -> Vec<u8> {
        let t = TableName {
            schema: Some("s".into()),
            name: table.into(),
        };
        let mut b = RowGroupBuilder::copy(&t, columns);
        for r in rows {
            b.row_buf().extend_from_slice(r.as_bytes());
            b.end_copy_row();
        }
        b.take().1
    }

    #[test]
    fn rows_gather_per_table_and_columns_and_limits_apply() {
        let limits = BatchConfig {
            max_rows: 4,
            ..BatchConfig::default()
        };
        let mut batch = Batch::default();
        let a = payload("a", &["x"], &["1", "2"]);
        let b = payload("b", &["x"], &["3"]);
        let a2 = payload("a", &["x"], &["4"]);
        let now = fsutil::now_us();
        for (lsn, rows, p) in [(1, 2, &a), (3, 1, &b), (4, 1, &a2)] {
            let record = Record {
                kind: RecordKind::Rows,
                group_lsn: Lsn(lsn),
                lsns: LsnRange::starting_at(Lsn(lsn), rows),
                time_us: now,
                crc: 0,
                payload: p,
            };
            assert!(!batch.is_full(&limits));
            batch.push(record, limits.max_wait).expect("push");
        }
        assert!(batch.is_full(&limits));
        assert_eq!(batch.last_lsn(), Lsn(4));
        assert!(batch.due().expect("due") > Instant::now());
        let groups = batch.into_groups();
        assert_eq!(groups.len(), 2);
        assert_eq!(
            (groups[0].data.as_slice(), groups[0].runs.as_slice()),
            (&b"1\n2\n4\n"[..], &[(Lsn(1), 2), (Lsn(4), 1)][..])
        );
        assert_eq!(groups[1].table.name, "b");
    }

    #[test]
    fn old_rows_are_due_at_once() {
        let mut batch = Batch::default();
        let p = payload("a", &["x"], &["1"]);
        let record = Record {
            kind: RecordKind::Rows,
            group_lsn: Lsn(1),
            lsns: LsnRange::starting_at(Lsn(1), 1),
            time_us: fsutil::now_us() - 10_000_000,
            crc: 0,
            payload: &p,
        };
        batch
            .push(record, Duration::from_millis(200))
            .expect("push");
        assert!(batch.due().expect("due") <= Instant::now());
    }
}
