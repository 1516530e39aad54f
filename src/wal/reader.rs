//! Sequential reading of durable records across segments, for the flusher.

use std::sync::Arc;

use super::damage;
use super::record::{Invalid, Record, RecordKind};
use super::segment::{self, SegmentCursor, SegmentFile, Step};
use super::{WalDir, WalError};
use crate::lsn::Lsn;

/// Reads records in LSN order from a starting LSN on, never past the durable LSN it is
/// given, moving from segment to segment as it goes.
#[derive(Debug)]
pub struct WalReader {
    dir: Arc<WalDir>,
    cursor: SegmentCursor,
    /// CRC and kind of the last record before the starting LSN, if the WAL holds it.
    before: Option<(u32, RecordKind)>,
}

impl WalReader {
    /// Positions a reader so that the next record it returns starts at `from`.
    ///
    /// `from` must be the first LSN of a record or the next LSN to be written; everything
    /// before it must be durable.
    ///
    /// # Errors
    /// [`WalError::Missing`] when no segment holds `from` (its segment was deleted or never
    /// written), [`WalError::InsideRecord`] when `from` falls inside a record (other than a
    /// quarantined one, after which the reader is positioned),
    /// [`WalError::Corrupt`] for damage before it.
    pub fn open(dir: Arc<WalDir>, from: Lsn) -> Result<WalReader, WalError> {
        let path = dir.path();
        let segments =
            segment::list(path).map_err(WalError::io(format!("list {}", path.display())))?;
        let Some(start) = segments.iter().rev().find(|s| s.first_lsn <= from).cloned() else {
            let oldest = segments.first().map_or_else(
                || "the WAL directory has no segments".to_string(),
                |s| format!("the oldest segment starts at LSN {}", s.first_lsn),
            );
            return Err(WalError::Missing {
                lsn: from,
                reason: oldest,
            });
        };
        let mut reader = WalReader {
            cursor: open_cursor(&dir, start)?,
            dir,
            before: None,
        };
        // Skip the records before `from`; they are all durable.
        let before = from.prev();
        while reader.step(before)?.is_some() {
            let record = reader.cursor.record();
            reader.before = Some((record.crc, record.kind));
        }
        let at = reader.cursor.next_lsn();
        // LSNs an operator quarantined are passed over wherever they start: the reader
        // goes on after them.
        let quarantined = matches!(reader.before, Some((_, RecordKind::Quarantined)));
        if at > from && !quarantined {
            return Err(WalError::InsideRecord {
                lsn: from,
                record_end: at.prev(),
            });
        }
        if at < from {
            return Err(WalError::Missing {
                lsn: from,
                reason: format!("the log ends at LSN {}", at.prev()),
            });
        }
        Ok(reader)
    }

    /// The CRC of the record that ends just before the LSN the reader was opened at, if the
    /// WAL still holds that record: compared with the one PostgreSQL committed, it tells
    /// whether this WAL and the database agree on what that LSN is. `None` also when that
    /// record was quarantined (its bytes were replaced on an operator's word).
    #[must_use]
    pub fn crc_before(&self) -> Option<u32> {
        match self.before {
            Some((crc, RecordKind::Rows)) => Some(crc),
            _ => None,
        }
    }

    /// LSN of the next record to be read.
    #[must_use]
    pub fn next_lsn(&self) -> Lsn {
        self.cursor.next_lsn()
    }

    /// The next record if it is at or below `durable`, or `None` when caught up.
    ///
    /// # Errors
    /// [`WalError::Corrupt`] for a record that fails validation (it is durable, so this is
    /// damage, not a torn write); [`WalError::Missing`] when the next segment is missing;
    /// I/O errors.
    pub fn next(&mut self, durable: Lsn) -> Result<Option<Record<'_>>, WalError> {
        Ok(self.step(durable)?.map(|()| self.cursor.record()))
    }

    /// Advances to the next durable record, moving to the next segment at the end of one.
    fn step(&mut self, durable: Lsn) -> Result<Option<()>, WalError> {
        loop {
            let step = self.cursor.step(durable).map_err(|e| {
                WalError::io(format!("read {}", self.cursor.segment().path.display()))(e)
            })?;
            match step {
                Step::Record(_) => return Ok(Some(())),
                Step::CaughtUp => return Ok(None),
                Step::End if self.cursor.next_lsn() > durable => return Ok(None),
                Step::End => {
                    // Durable rows beyond the end of this segment are in the next one,
                    // which is named after the first of them.
                    let next = self.cursor.next_lsn();
                    let segment = SegmentFile {
                        first_lsn: next,
                        path: self.dir.path().join(segment::file_name(next)),
                    };
                    if !segment.path.exists() {
                        return Err(WalError::Missing {
                            lsn: next,
                            reason: format!(
                                "segment {} ends before it and there is no segment {}. \
                                 These rows were acknowledged, and pgspool does not skip \
                                 them by itself: restore the segment from a copy, or, to go \
                                 on without them, stop pgspool and run `pgspool quarantine \
                                 --wal-dir {}`",
                                self.cursor.segment().path.display(),
                                segment.path.display(),
                                self.dir.path().display()
                            ),
                        });
                    }
                    self.cursor = open_cursor(&self.dir, segment)?;
                }
                Step::Damaged { offset, reason } => return Err(self.damage(offset, &reason)),
            }
        }
    }
}

impl WalReader {
    /// The error for damage at `offset` of the current segment. What the reader reads is
    /// durable, so it is never a torn write.
    fn damage(&self, offset: u64, reason: &Invalid) -> WalError {
        let segment = self.cursor.segment();
        let next_segment = segment::list(self.dir.path())
            .ok()
            .and_then(|all| all.into_iter().find(|s| s.first_lsn > segment.first_lsn))
            .map(|s| s.first_lsn);
        let expected = self.cursor.next_lsn();
        match damage::locate(segment, offset, expected, reason, next_segment, false) {
            Ok(Some(damage)) => WalError::Corrupt { damage },
            Ok(None) => unreachable!("a torn write is only located where one is possible"),
            Err(e) => WalError::io(format!("read {}", segment.path.display()))(e),
        }
    }
}

fn open_cursor(dir: &WalDir, segment: SegmentFile) -> Result<SegmentCursor, WalError> {
    let path = segment.path.clone();
    SegmentCursor::open(segment, dir.spool_id())
        .map(|(cursor, _)| cursor)
        .map_err(WalError::segment(&path))
}
