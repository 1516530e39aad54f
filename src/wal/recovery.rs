//! Opening a WAL directory: the lock, the spool id, and recovery of the log's end.
//!
//! The end of the log is the first record of the last segment that fails validation. What
//! lies from there to the end of the file is one of two things:
//!
//! - a **torn write**: the group being written when the process or machine died. It was
//!   never fdatasync'd, so never acknowledged, and no record of a later group follows it.
//!   It is copied to `quarantine/` (if there is room), cut off, and the cut synced.
//! - **damage to acknowledged data**: a record of a later group follows the bad one (a
//!   flipped bit, a bad sector; see [`damage::classify_tail`]). Cutting there would
//!   silently drop acknowledged rows and give their LSNs to new ones, so the daemon refuses
//!   to start and says where the damage is and what to do.
//!
//! Nor may the log end before where it ended at the last clean stop (a clean stop leaves no
//! torn write), nor before the rows its checkpoint says PostgreSQL committed: either means
//! records were lost from its end (an old copy of the directory, a segment deleted, a disk
//! that dropped writes), and new rows would reuse their LSNs. These checks run before
//! anything is cut.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{info, warn};
use uuid::Uuid;

use super::damage;
use super::record::Invalid;
use super::segment::{self, SEGMENT_HEADER_BYTES, SegmentCursor, SegmentFile, Step};
use super::{
    CutTail, QUARANTINE_DIR, RecoveryReport, SPOOL_ID_FILE, Tail, WalDir, WalError,
    read_checkpoint, read_spool_id,
};
use crate::fsutil;
use crate::lsn::Lsn;

const LOCK_FILE: &str = "LOCK";

/// Opens `dir` (creating it if needed): takes the lock (returned, for the open WAL to
/// hold), reads or creates the spool id, removes temporary files, checks every segment
/// header, and recovers the end of the log.
pub(super) fn recover(dir: &Path) -> Result<(WalDir, File, Tail, RecoveryReport), WalError> {
    if dir.exists() && !dir.is_dir() {
        return Err(WalError::BadFile {
            path: dir.to_path_buf(),
            reason: "is not a directory; --wal-dir must name a directory".into(),
        });
    }
    fsutil::create_private_dir_all(dir)
        .map_err(WalError::io(format!("create {}", dir.display())))?;
    warn_if_readable_by_others(dir);
    let lock = lock_dir(dir)?;
    if let Some(damage) = damage::recorded(dir)? {
        return Err(WalError::Corrupt { damage });
    }
    let clean_stop = super::read_clean_stop(dir).unwrap_or_else(|e| {
        warn!(error = %e, "ignoring an unreadable clean-stop record");
        None
    });
    let segments = segment::list(dir).map_err(WalError::io(format!("list {}", dir.display())))?;
    let spool_id = spool_id(dir, segments.first())?;
    remove_temporary_files(dir)?;
    let wal = WalDir {
        path: dir.to_path_buf(),
        spool_id,
        bytes: AtomicU64::new(0),
        segments: AtomicU64::new(0),
    };
    let ends = LogEnd { clean_stop };
    for (i, seg) in segments.iter().enumerate() {
        let file =
            File::open(&seg.path).map_err(WalError::io(format!("open {}", seg.path.display())))?;
        segment::read_header(&file, seg, spool_id).map_err(|e| {
            match WalError::segment(&seg.path)(e) {
                WalError::BadFile { path, reason } => WalError::BadFile {
                    reason: bad_header_advice(&reason, dir, i + 1 == segments.len()),
                    path,
                },
                other => other,
            }
        })?;
    }
    let (tail, report) = match segments.last() {
        Some(last) => recover_tail(&wal, last.clone(), segments.len(), &ends)?,
        None => {
            ends.check(&wal, Lsn::FIRST)?;
            let created = segment::create(dir, Lsn::FIRST, spool_id).map_err(io::Error::from);
            let (file, segment) = created.map_err(WalError::io(format!(
                "create the first segment in {}",
                dir.display()
            )))?;
            let tail = Tail {
                file,
                segment,
                len: SEGMENT_HEADER_BYTES,
                next_lsn: Lsn::FIRST,
            };
            let report = RecoveryReport {
                segments: 1,
                next_lsn: Lsn::FIRST,
                cut: None,
            };
            (tail, report)
        }
    };
    // Counted once recovery cut what it cuts; the writer and deletion keep them up to date.
    let mut bytes = 0;
    let segments = segment::list(dir).map_err(WalError::io(format!("list {}", dir.display())))?;
    for seg in &segments {
        bytes += fs::metadata(&seg.path)
            .map_err(WalError::io(format!("read {}", seg.path.display())))?
            .len();
    }
    wal.bytes.store(bytes, Ordering::Relaxed);
    wal.segments.store(segments.len() as u64, Ordering::Relaxed);
    // From here on the log grows again; a crash must not be judged by the old stop.
    if clean_stop.is_some() {
        let path = dir.join(super::CLEAN_STOP_FILE);
        fs::remove_file(&path)
            .and_then(|()| fsutil::sync_dir(dir))
            .map_err(WalError::io(format!("remove {}", path.display())))?;
    }
    Ok((wal, lock, tail, report))
}

/// `reason` for a bad segment header, with the way forward: a segment before the last can
/// be moved aside by `pgspool quarantine` (the next one says where its rows end).
fn bad_header_advice(reason: &str, dir: &Path, last: bool) -> String {
    if last {
        format!(
            "{reason}. It is the last segment, so where its rows end is unknown: restore the \
             file from a copy (pgspool does not skip acknowledged rows by itself)"
        )
    } else {
        format!(
            "{reason}. Its rows were acknowledged, and pgspool does not skip them by itself: \
             restore the file from a copy, or, to go on without them, run `pgspool quarantine \
             --wal-dir {}`, which moves the segment aside to quarantine/",
            dir.display()
        )
    }
}

/// Reads the spool id, or creates one for a new directory. A directory with segments but
/// no spool id is refused: a new id would disown the segments.
fn spool_id(dir: &Path, first: Option<&SegmentFile>) -> Result<Uuid, WalError> {
    if let Some(id) = existing_spool_id(dir, first)? {
        return Ok(id);
    }
    let id = Uuid::new_v4();
    fsutil::write_atomic(dir, SPOOL_ID_FILE, format!("{id}\n").as_bytes()).map_err(
        WalError::io(format!("write the spool id in {}", dir.display())),
    )?;
    info!(spool_id = %id, dir = %dir.display(), "created a new spool");
    Ok(id)
}

/// The spool id of `dir` (whose oldest segment is `first`, if any); `None` for a directory
/// with neither a `spool_id` file nor segments: a new spool.
///
/// # Errors
/// When the file is missing or unreadable although segments exist: the error names the id
/// to restore, read from the oldest segment's header (a new id would disown the segments).
/// A file that is not a spool id in a directory without segments, and I/O errors.
pub(crate) fn existing_spool_id(
    dir: &Path,
    first: Option<&SegmentFile>,
) -> Result<Option<Uuid>, WalError> {
    let problem = match (read_spool_id(dir), first) {
        (Ok(id), None) => return Ok(id),
        (Ok(Some(id)), Some(_)) => return Ok(Some(id)),
        (Ok(None), Some(_)) => "is missing".to_string(),
        (Err(WalError::BadFile { reason, .. }), Some(_)) => reason,
        (Err(e), _) => return Err(e),
    };
    let segment = first.expect("only with segments");
    let mut header = [0u8; SEGMENT_HEADER_BYTES as usize];
    let owner = File::open(&segment.path)
        .and_then(|file| file.read_exact_at(&mut header, 0))
        .ok()
        .map(|()| Uuid::from_bytes(header[24..40].try_into().expect("16 bytes")));
    let file = dir.join(SPOOL_ID_FILE);
    Err(WalError::BadFile {
        reason: format!(
            "{problem}, but the directory holds segments{}; restore the file rather than \
             let pgspool start a new spool beside them",
            owner.map_or_else(String::new, |id| format!(
                " of spool {id} (echo {id} > {})",
                file.display()
            ))
        ),
        path: file,
    })
}

/// Takes the exclusive lock on `dir` and writes this process's pid to `LOCK`. The lock is
/// on the directory itself, not on `LOCK`, so deleting that file (it looks like a stale
/// pid file) does not let a second daemon in.
pub(super) fn lock_dir(dir: &Path) -> Result<File, WalError> {
    let handle = File::open(dir).map_err(WalError::io(format!("open {}", dir.display())))?;
    let path = dir.join(LOCK_FILE);
    match handle.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let holder = match fs::read_to_string(&path) {
                Ok(pid) if !pid.trim().is_empty() => format!("pid {}", pid.trim()),
                _ => "pid unknown".to_string(),
            };
            return Err(WalError::Locked {
                dir: dir.to_path_buf(),
                holder,
            });
        }
        Err(fs::TryLockError::Error(e)) => {
            return Err(WalError::io(format!("lock {}", dir.display()))(e));
        }
    }
    fsutil::create_private_file(&path)
        .and_then(|mut f| writeln!(f, "{}", std::process::id()))
        .map_err(WalError::io(format!("write {}", path.display())))?;
    Ok(handle)
}

/// Warns when the WAL directory, which holds rows in clear text, is open to other users
/// (an operator's `mkdir` under a umask of 022 makes it 0755): pgspool leaves the mode to
/// the operator, but says what it means.
fn warn_if_readable_by_others(dir: &Path) {
    if let Ok(meta) = fs::metadata(dir)
        && meta.permissions().mode() & 0o077 != 0
    {
        warn!(
            dir = %dir.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o7777),
            "the WAL directory is open to other users, and its segments hold rows in clear \
             text: chmod 700 it (pgspool creates its files 0600, but others may list them)"
        );
    }
}

fn remove_temporary_files(dir: &Path) -> Result<(), WalError> {
    let entries = fs::read_dir(dir).map_err(WalError::io(format!("list {}", dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(WalError::io(format!("list {}", dir.display())))?;
        if entry
            .file_name()
            .to_string_lossy()
            .ends_with(fsutil::TMP_SUFFIX)
        {
            warn!(file = %entry.path().display(), "removing a file left by an interrupted write");
            fs::remove_file(entry.path())
                .map_err(WalError::io(format!("delete {}", entry.path().display())))?;
        }
    }
    Ok(())
}

/// Scans the last segment to the end of the log, checks that end against the checkpoint,
/// and cuts a torn write; refuses damage to acknowledged data.
fn recover_tail(
    dir: &WalDir,
    last: SegmentFile,
    segments: usize,
    ends: &LogEnd,
) -> Result<(Tail, RecoveryReport), WalError> {
    let path = last.path.clone();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(WalError::io(format!("open {}", path.display())))?;
    // What a crashed daemon wrote may be only in the page cache: make it durable before
    // anything downstream trusts it.
    file.sync_all()
        .map_err(WalError::io(format!("sync {}", path.display())))?;
    let (mut cursor, _) =
        SegmentCursor::open(last.clone(), dir.spool_id()).map_err(WalError::segment(&path))?;
    let damage = loop {
        let step = cursor
            .step(Lsn(u64::MAX))
            .map_err(WalError::io(format!("read {}", path.display())))?;
        match step {
            Step::Record(_) => {}
            Step::End | Step::CaughtUp => break None,
            Step::Damaged { offset, reason } => break Some((offset, reason)),
        }
    };
    let next_lsn = cursor.next_lsn();
    // The damage, once it is known to be a torn write: where, why, and the bytes.
    let torn = match damage {
        None => None,
        Some((offset, reason)) => {
            let located = damage::locate(&last, offset, next_lsn, &reason, None, true)
                .map_err(WalError::io(format!("read the tail of {}", path.display())))?;
            if let Some(damage) = located {
                return Err(WalError::Corrupt { damage });
            }
            let tail = damage::read_tail(&path, offset)
                .map_err(WalError::io(format!("read the tail of {}", path.display())))?;
            Some((offset, reason, tail))
        }
    };
    ends.check(dir, next_lsn)?;
    let cut = torn
        .map(|(offset, reason, tail)| cut_torn_tail(dir, &last, &file, offset, &tail, &reason))
        .transpose()?;
    let report = RecoveryReport {
        segments,
        next_lsn,
        cut,
    };
    let tail = Tail {
        file,
        segment: last,
        len: cursor.offset(),
        next_lsn,
    };
    Ok((tail, report))
}

/// What the log's end is checked against once recovery found it.
struct LogEnd {
    /// Where the log ended when the daemon last stopped cleanly.
    clean_stop: Option<Lsn>,
}

impl LogEnd {
    /// Refuses a log whose next LSN is below where it was at the last clean stop (records
    /// at its end are missing or damaged: after a clean stop there is no torn write), or at
    /// or below the checkpoint's watermark (rows PostgreSQL committed are missing from its
    /// end, and new rows would reuse their LSNs).
    fn check(&self, dir: &WalDir, next_lsn: Lsn) -> Result<(), WalError> {
        if let Some(stopped) = self.clean_stop
            && next_lsn < stopped
        {
            return Err(WalError::EndsBeforeCleanStop {
                dir: dir.path().to_path_buf(),
                last: next_lsn.prev(),
                stopped_at: stopped.prev(),
            });
        }
        // Advisory: an unreadable checkpoint is replaced after the next commit.
        let checkpoint = read_checkpoint(dir.path()).unwrap_or_else(|e| {
            warn!(error = %e, "ignoring an unreadable checkpoint");
            None
        });
        match checkpoint {
            Some(flushed) if flushed >= next_lsn => Err(WalError::EndsBeforeCheckpoint {
                dir: dir.path().to_path_buf(),
                last: next_lsn.prev(),
                flushed,
            }),
            _ => Ok(()),
        }
    }
}

/// Saves `tail` (the bytes of `segment` from `offset` on) to the quarantine directory,
/// then truncates the segment there and syncs it.
fn cut_torn_tail(
    dir: &WalDir,
    segment: &SegmentFile,
    file: &File,
    offset: u64,
    tail: &[u8],
    reason: &Invalid,
) -> Result<CutTail, WalError> {
    // The copy is for inspection only: the bytes were never acknowledged. Failing to keep
    // it (the disk that filled up is the usual reason) must not keep the daemon down.
    let quarantine = dir.path().join(QUARANTINE_DIR);
    let name = format!(
        "torn-{}-{offset}-{}.bin",
        segment.first_lsn.0,
        fsutil::now_us()
    );
    let saved = fsutil::create_private_dir_all(&quarantine)
        .and_then(|()| fsutil::write_atomic(&quarantine, &name, tail));
    if let Err(e) = &saved {
        warn!(error = %e, dir = %quarantine.display(), "could not keep a copy of the torn write");
    }
    file.set_len(offset)
        .and_then(|()| file.sync_all())
        .map_err(WalError::io(format!(
            "cut the torn tail of {}",
            segment.path.display()
        )))?;
    let cut = CutTail {
        offset,
        bytes: tail.len() as u64,
        saved_to: saved.ok().map(|()| quarantine.join(name)),
    };
    warn!(
        segment = %segment.path.display(),
        offset,
        bytes_dropped = cut.bytes,
        saved_to = %cut.saved_to.as_ref().map_or_else(|| "-".into(), |p| p.display().to_string()),
        %reason,
        "cut a torn write at the end of the WAL: a group commit whose fdatasync never \
         completed, so never acknowledged (damage to the last group written looks the same)"
    );
    Ok(cut)
}
