//! `pgspool status`: what a WAL directory holds, read from the files themselves, so it
//! works whether the daemon runs or not (it takes no lock and changes nothing).
//!
//! Every record of every segment is read and its checksum verified. Rows above the
//! flushed watermark (the local checkpoint the flusher writes after each commit; PostgreSQL
//! may be slightly ahead of it after a crash) are pending, counted per table.
//!
//! `--json` prints one object with these keys (stable; new keys may be added):
//! `wal_dir`, `spool_id`, `segments`, `bytes`, `first_lsn`, `last_lsn`, `flushed_lsn`,
//! `pending_rows`, `pending_bytes`, `oldest_pending_age_seconds` (null when nothing is
//! pending), `checksums_ok`, `torn_tail_bytes`, `problems` (list of strings), and `tables`
//! (table name → `{pending_rows, pending_bytes}`).
//!
//! Exit code: 0 when every record verified, 2 when the WAL is damaged or unreadable.

use std::collections::BTreeMap;
use std::io::{self, IsTerminal};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use serde::Serialize;

use crate::cli::StatusArgs;
use crate::config::Config;
use crate::fsutil;
use crate::lsn::Lsn;
use crate::rowgroup::RowGroup;
use crate::wal::segment::{self, SegmentCursor, Step};
use crate::wal::{self, WalError};

/// Backlog of one table.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct TableBacklog {
    /// Rows above the flushed watermark.
    pub pending_rows: u64,
    /// Bytes of those rows as stored.
    pub pending_bytes: u64,
}

/// What a WAL directory holds (see the module docs for the JSON keys).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WalStatus {
    /// The directory.
    pub wal_dir: PathBuf,
    /// The spool's id.
    pub spool_id: Option<uuid::Uuid>,
    /// Segment files.
    pub segments: usize,
    /// Bytes in segment files.
    pub bytes: u64,
    /// First LSN the segments hold (0 when empty).
    pub first_lsn: Lsn,
    /// Last LSN written (0 when nothing was ever written).
    pub last_lsn: Lsn,
    /// Watermark last recorded as committed in PostgreSQL.
    pub flushed_lsn: Lsn,
    /// Rows above the watermark.
    pub pending_rows: u64,
    /// Bytes of those rows.
    pub pending_bytes: u64,
    /// Age in seconds of the oldest pending row.
    pub oldest_pending_age_seconds: Option<f64>,
    /// Whether every complete record verified.
    pub checksums_ok: bool,
    /// Bytes after the last valid record of the last segment: a torn write the daemon cuts
    /// at its next start (or a write in progress).
    pub torn_tail_bytes: u64,
    /// Damage found, one line each.
    pub problems: Vec<String>,
    /// Pending rows per table.
    pub tables: BTreeMap<String, TableBacklog>,
}

/// Reads the WAL directory `dir`, calling `progress` with bytes read so far.
///
/// # Errors
/// When `dir` is not a WAL directory or cannot be read. Damage inside segments is reported
/// in [`WalStatus::problems`], not as an error.
pub fn inspect(dir: &Path, progress: &mut dyn FnMut(u64)) -> Result<WalStatus, WalError> {
    let Some(spool_id) = wal::read_spool_id(dir)? else {
        return Err(WalError::BadFile {
            path: dir.to_path_buf(),
            reason: "not a pgspool WAL directory (no spool_id file)".into(),
        });
    };
    let flushed = wal::read_checkpoint(dir)?.unwrap_or(Lsn::ZERO);
    let segments = segment::list(dir).map_err(WalError::io(format!("list {}", dir.display())))?;
    let mut status = WalStatus {
        wal_dir: dir.to_path_buf(),
        spool_id: Some(spool_id),
        segments: 0,
        bytes: 0,
        first_lsn: segments.first().map_or(Lsn::ZERO, |s| s.first_lsn),
        last_lsn: Lsn::ZERO,
        flushed_lsn: flushed,
        pending_rows: 0,
        pending_bytes: 0,
        oldest_pending_age_seconds: None,
        checksums_ok: true,
        torn_tail_bytes: 0,
        problems: Vec::new(),
        tables: BTreeMap::new(),
    };
    let now_us = fsutil::now_us();
    let count = segments.len();
    for (i, seg) in segments.into_iter().enumerate() {
        let path = seg.path.clone();
        let Ok(len) = std::fs::metadata(&path).map(|m| m.len()) else {
            continue; // deleted by the flusher while we were reading
        };
        let mut cursor = match SegmentCursor::open(seg, spool_id) {
            Ok((cursor, _)) => cursor,
            Err(segment::OpenSegmentError::Io(e)) if e.kind() == io::ErrorKind::NotFound => {
                continue;
            }
            Err(e) => {
                status.checksums_ok = false;
                status.problems.push(format!("{}: {e}", path.display()));
                continue;
            }
        };
        status.segments += 1;
        status.bytes += len;
        status.last_lsn = status.last_lsn.max(cursor.next_lsn().prev());
        loop {
            let step = cursor
                .step(Lsn(u64::MAX))
                .map_err(WalError::io(format!("read {}", path.display())))?;
            match step {
                Step::Record(lsns) => {
                    status.last_lsn = lsns.last;
                    if lsns.last <= flushed {
                        continue;
                    }
                    let record = cursor.record();
                    let rows = lsns.last.0 - lsns.first.0.max(flushed.0 + 1) + 1;
                    let table = RowGroup::decode(record.payload)
                        .map_or_else(|_| "(unreadable)".to_string(), |g| g.table.to_string());
                    let backlog = status.tables.entry(table).or_default();
                    backlog.pending_rows += rows;
                    backlog.pending_bytes += record.payload.len() as u64;
                    status.pending_rows += rows;
                    status.pending_bytes += record.payload.len() as u64;
                    if status.oldest_pending_age_seconds.is_none() {
                        let age_us = now_us.saturating_sub(record.time_us);
                        status.oldest_pending_age_seconds = Some(age_us as f64 / 1e6);
                    }
                }
                Step::End | Step::CaughtUp => break,
                Step::Damaged { offset, .. } if i + 1 == count => {
                    status.torn_tail_bytes = len.saturating_sub(offset);
                    break;
                }
                Step::Damaged { offset, reason } => {
                    status.checksums_ok = false;
                    status.problems.push(format!(
                        "{} at byte {offset} (LSN {} on): {reason}",
                        path.display(),
                        cursor.next_lsn()
                    ));
                    break;
                }
            }
            progress(status.bytes - len + cursor.offset());
        }
        progress(status.bytes);
    }
    Ok(status)
}

/// Runs `pgspool status`.
///
/// # Errors
/// When the config file cannot be read or `--wal-dir` is not a WAL directory.
pub fn run(args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let dir = match (&args.wal_dir, &args.config) {
        (Some(dir), _) => dir.clone(),
        (None, Some(config)) => Config::load(config)?.wal.dir,
        (None, None) => unreachable!("clap requires --wal-dir or --config"),
    };
    let bar = progress_bar(&dir);
    let status = inspect(&dir, &mut |done| {
        if let Some(bar) = &bar {
            bar.set_position(done);
        }
    })
    .with_context(|| format!("cannot inspect {}", dir.display()))?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render(&status));
    }
    Ok(if status.checksums_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

fn progress_bar(dir: &Path) -> Option<indicatif::ProgressBar> {
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
            indicatif::ProgressStyle::with_template("verifying {bytes}/{total_bytes} {wide_bar}")
                .expect("the template is valid"),
        )
    })
}

/// The human-readable report: a one-line verdict, then aligned key/value lines and a table
/// of pending rows.
#[must_use]
pub fn render(s: &WalStatus) -> String {
    use std::fmt::Write;
    let verdict = if !s.checksums_ok {
        "DAMAGED: records failed verification (see problems below)"
    } else if s.pending_rows == 0 {
        "ok: every record verified, nothing pending"
    } else {
        "ok: every record verified, rows pending"
    };
    let mut out = String::new();
    let _ = writeln!(out, "{verdict}");
    let age = s
        .oldest_pending_age_seconds
        .map_or_else(|| "-".to_string(), |a| format!("{a:.1} s"));
    let spool = s
        .spool_id
        .map_or_else(|| "-".to_string(), |id| id.to_string());
    for (key, value) in [
        ("wal dir", s.wal_dir.display().to_string()),
        ("spool id", spool),
        ("segments", format!("{} ({} bytes)", s.segments, s.bytes)),
        ("LSNs", format!("{} .. {}", s.first_lsn, s.last_lsn)),
        ("flushed LSN", s.flushed_lsn.to_string()),
        (
            "pending",
            format!("{} rows, {} bytes", s.pending_rows, s.pending_bytes),
        ),
        ("oldest pending", age),
        ("torn tail", format!("{} bytes", s.torn_tail_bytes)),
    ] {
        let _ = writeln!(out, "  {key:<15} {value}");
    }
    if !s.tables.is_empty() {
        let width = s
            .tables
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(5)
            .clamp(5, 60);
        let _ = writeln!(
            out,
            "\n  {:<width$} {:>12} {:>14}",
            "table", "pending rows", "pending bytes"
        );
        for (table, b) in &s.tables {
            let _ = writeln!(
                out,
                "  {table:<width$} {:>12} {:>14}",
                b.pending_rows, b.pending_bytes
            );
        }
    }
    for problem in &s.problems {
        let _ = writeln!(out, "  problem: {problem}");
    }
    out
}
