//! What a WAL directory holds, read from the files themselves, so it works whether the
//! daemon runs or not (it takes no lock and changes nothing).
//!
//! Every record of every segment is read and its checksum verified. Rows above the
//! flushed watermark (the local checkpoint the flusher writes after each commit; PostgreSQL
//! may be slightly ahead of it after a crash) are pending, counted per table.
//! `flushed_lsn` is the LSN up to which every row is settled (committed or
//! dead-lettered): the watermark, or the LSN a held table waits after; `watermark_lsn` is
//! PostgreSQL's watermark, up to which the rows of tables not held are settled. Pending
//! rows are counted against the one that applies to their table.
//!
//! A bad record at the very end of the last segment with nothing written by a later group
//! after it is a torn write (`torn_tail_bytes`; the daemon cuts it at its next start, or it
//! is a write in progress); anywhere else it is damage to acknowledged data, listed with
//! its segment, byte range and LSNs (see [`crate::wal::damage`]), as is damage the daemon
//! recorded while flushing.

use std::collections::BTreeMap;
use std::io::{self, IsTerminal};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::flush::report::FlushReport;
use crate::fsutil;
use crate::lsn::Lsn;
use crate::rowgroup::RowGroup;
use crate::wal::segment::{self, SegmentCursor};
use crate::wal::{self, Checkpoint, Record, RecordKind, WalError};

/// Backlog of one table.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableBacklog {
    /// Rows above the flushed watermark; `None` while the daemon has not counted them yet.
    pub pending_rows: Option<u64>,
    /// Bytes of those rows as stored; `None` like `pending_rows`.
    pub pending_bytes: Option<u64>,
    /// Rows the running daemon settled (loaded, or put into dead letters) since it
    /// started; `None` when the directory was read without the daemon.
    pub flushed_rows: Option<u64>,
}

/// What a WAL directory holds (see [`crate::status`] for the JSON keys).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WalStatus {
    /// The directory.
    pub wal_dir: PathBuf,
    /// The spool's id.
    pub spool_id: uuid::Uuid,
    /// Segment files.
    pub segments: usize,
    /// Bytes in segment files.
    pub bytes: u64,
    /// First LSN the segments hold (0 when empty).
    pub first_lsn: Lsn,
    /// Last LSN written (0 when nothing was ever written).
    pub last_lsn: Lsn,
    /// LSN up to which every row is settled (committed or dead-lettered), as last
    /// recorded: the watermark, or the lowest LSN a held table waits after.
    pub flushed_lsn: Lsn,
    /// PostgreSQL's watermark as last recorded: rows of tables not held are settled up to
    /// it.
    pub watermark_lsn: Lsn,
    /// Rows above the watermark.
    pub pending_rows: u64,
    /// Bytes of those rows.
    pub pending_bytes: u64,
    /// Age in seconds of the oldest pending row.
    pub oldest_pending_age_seconds: Option<f64>,
    /// Whether the log is whole: every record verified, no LSN missing between segments,
    /// nothing the checkpoint counts as committed missing from its end.
    pub intact: bool,
    /// Whether every complete record verified.
    pub checksums_ok: bool,
    /// Bytes after the last valid record of the last segment: a torn write the daemon cuts
    /// at its next start (or a write in progress).
    pub torn_tail_bytes: u64,
    /// LSNs an operator moved aside with `pgspool quarantine` (their rows are not loaded).
    pub quarantined_rows: u64,
    /// Damage found, one line each.
    pub problems: Vec<String>,
    /// Pending rows per table.
    pub tables: BTreeMap<String, TableBacklog>,
    /// What the flusher last reported of PostgreSQL's refusals (see
    /// [`crate::flush::report`]); `None` before its first report.
    pub flusher: Option<FlushReport>,
}

/// Reads the WAL directory `dir`, calling `progress` with bytes read so far.
///
/// # Errors
/// When `dir` is not a WAL directory or cannot be read. Damage inside segments is reported
/// in [`WalStatus::problems`], not as an error.
pub fn inspect(dir: &Path, progress: &mut dyn FnMut(u64)) -> Result<WalStatus, WalError> {
    let segments = segment::list(dir).map_err(WalError::io(format!("list {}", dir.display())))?;
    let Some(spool_id) = wal::existing_spool_id(dir, segments.first())? else {
        return Err(WalError::BadFile {
            path: dir.to_path_buf(),
            reason: "not a pgspool WAL directory (no spool_id file)".into(),
        });
    };
    let (mut status, positions) = WalStatus::from_checkpoint(dir, spool_id);
    status.first_lsn = segments.first().map_or(Lsn::ZERO, |s| s.first_lsn);
    status.flusher = FlushReport::read(dir);
    let flushed = positions.flushed_lsn;
    // When the oldest pending row was written, in µs since the Unix epoch.
    let mut oldest: Option<u64> = None;
    if let Some(first) = segments.first()
        && first.first_lsn > flushed.next()
    {
        status.damage(format!(
            "LSNs {} .. {} are pending but in no segment (before {})",
            flushed.next(),
            first.first_lsn.prev(),
            first.path.display()
        ));
    }
    // Where the next segment must start, when the previous one was read to its end.
    let mut expected: Option<Lsn> = None;
    for (i, seg) in segments.iter().enumerate() {
        let path = seg.path.clone();
        if let Some(expected) = expected
            && seg.first_lsn != expected
        {
            status.damage(format!(
                "LSNs {expected} .. {} are in no segment (before {})",
                seg.first_lsn.prev(),
                path.display()
            ));
        }
        expected = None;
        let (mut cursor, len) = match SegmentCursor::open(seg.clone(), spool_id) {
            Ok((cursor, _)) => match std::fs::metadata(&path) {
                Ok(meta) => (cursor, meta.len()),
                Err(_) => continue, // deleted by the flusher while we were reading
            },
            Err(segment::OpenSegmentError::Io(e)) if e.kind() == io::ErrorKind::NotFound => {
                continue;
            }
            // Not damage: the file cannot be read at all (permissions, I/O).
            Err(segment::OpenSegmentError::Io(e)) => {
                return Err(WalError::io(format!("read {}", path.display()))(e));
            }
            Err(e @ segment::OpenSegmentError::BadHeader(_)) => {
                status.damage(format!("{}: {e}", path.display()));
                continue;
            }
        };
        status.segments += 1;
        status.bytes += len;
        status.last_lsn = status.last_lsn.max(cursor.next_lsn().prev());
        let read_before = status.bytes - len;
        let next_segment = segments.get(i + 1).map(|s| s.first_lsn);
        let scan = wal::damage::scan_segment(&mut cursor, next_segment, &mut |record, at| {
            status.last_lsn = record.lsns.last;
            if status.count(record, &positions) {
                oldest.get_or_insert(record.time_us);
            }
            progress(read_before + at);
        })
        .map_err(WalError::io(format!("read {}", path.display())))?;
        progress(status.bytes);
        if let Some((_, bytes)) = scan.torn_tail {
            status.torn_tail_bytes = bytes;
        } else if scan.damage.last().is_none_or(|d| d.last_lsn.is_some()) {
            expected = Some(cursor.next_lsn());
        }
        for damage in scan.damage {
            status.checksums_ok = false;
            status.damage(damage.to_string());
        }
    }
    // Measured once the scan ends, which takes a while on a large backlog.
    status.oldest_pending_age_seconds =
        oldest.map(|at| fsutil::now_us().saturating_sub(at) as f64 / 1e6);
    if let Ok(Some(stop)) = wal::read_clean_stop(dir)
        && status.last_lsn < stop.prev()
    {
        status.damage(format!(
            "the log ends at LSN {}, but it ended at LSN {} when pgspool last stopped cleanly: \
             records at its end are missing or damaged",
            status.last_lsn,
            stop.prev()
        ));
    }
    match wal::damage::recorded(dir) {
        Ok(Some(damage)) => status.damage(format!("the daemon found while flushing: {damage}")),
        Ok(None) => {}
        Err(e) => status.damage(e.to_string()),
    }
    if flushed > status.last_lsn {
        status.damage(format!(
            "the checkpoint says PostgreSQL committed rows up to LSN {flushed}, beyond the end \
             of the log at LSN {}: records were lost from its end",
            status.last_lsn
        ));
    }
    Ok(status)
}

impl WalStatus {
    /// What the checkpoint of the WAL directory `dir` alone tells: its positions, with
    /// nothing counted yet. A checkpoint that cannot be read is noted in `problems`
    /// (advisory: the daemon replaces it after its next commit), and every row counts as
    /// pending.
    pub(crate) fn from_checkpoint(dir: &Path, spool_id: uuid::Uuid) -> (WalStatus, Checkpoint) {
        let checkpoint = wal::read_checkpoint_whole(dir);
        let mut problems = Vec::new();
        if let Err(e) = &checkpoint {
            problems.push(format!("{e}; counting every row as pending"));
        }
        let positions = checkpoint.ok().flatten().unwrap_or_default();
        let status = WalStatus {
            wal_dir: dir.to_path_buf(),
            spool_id,
            segments: 0,
            bytes: 0,
            first_lsn: Lsn::ZERO,
            last_lsn: Lsn::ZERO,
            flushed_lsn: positions.flushed_lsn,
            watermark_lsn: positions.watermark_lsn(),
            pending_rows: 0,
            pending_bytes: 0,
            oldest_pending_age_seconds: None,
            intact: true,
            checksums_ok: true,
            torn_tail_bytes: 0,
            quarantined_rows: 0,
            problems,
            tables: BTreeMap::new(),
            flusher: None,
        };
        (status, positions)
    }

    fn damage(&mut self, problem: String) {
        self.intact = false;
        self.problems.push(problem);
    }

    /// Counts the rows of `record` not settled by `positions` (above the watermark, or
    /// above its table's hold) as pending, or as quarantined; whether some are pending.
    fn count(&mut self, record: &Record<'_>, positions: &Checkpoint) -> bool {
        if record.kind == RecordKind::Quarantined {
            self.quarantined_rows += record.lsns.rows();
            return false;
        }
        if record.lsns.last <= positions.flushed_lsn {
            return false;
        }
        let table = RowGroup::decode(record.payload)
            .map_or_else(|_| "(unreadable)".to_string(), |g| g.table.to_string());
        let settled = positions.settled_for(&table);
        if record.lsns.last <= settled {
            return false;
        }
        let rows = record.lsns.last.0 - record.lsns.first.0.max(settled.0 + 1) + 1;
        let bytes = record.payload.len() as u64;
        let backlog = self.tables.entry(table).or_default();
        *backlog.pending_rows.get_or_insert(0) += rows;
        *backlog.pending_bytes.get_or_insert(0) += bytes;
        self.pending_rows += rows;
        self.pending_bytes += bytes;
        true
    }
}

/// A progress bar over the bytes of `dir`'s segments, labelled `what`, when stderr is a
/// terminal and there is enough to read for it to matter.
pub(crate) fn progress_bar(dir: &Path, what: &str) -> Option<indicatif::ProgressBar> {
    if !io::stderr().is_terminal() {
        return None;
    }
    let total: u64 = segment::list(dir)
        .ok()?
        .iter()
        .filter_map(|s| std::fs::metadata(&s.path).ok())
        .map(|m| m.len())
        .sum();
    (total > 64 << 20).then(|| {
        indicatif::ProgressBar::new(total).with_style(
            indicatif::ProgressStyle::with_template(&format!(
                "{what} {{bytes}}/{{total_bytes}} {{wide_bar}}"
            ))
            .expect("the template is valid"),
        )
    })
}
