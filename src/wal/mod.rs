//! The write-ahead log: pgspool's queue of acknowledged rows, on local disk.
//!
//! # Directory
//! ```text
//! <wal dir>/
//!   LOCK                         the daemon's pid (the lock itself is a flock on the
//!                                directory, so deleting this file releases nothing)
//!   spool_id                     this spool's UUID, created once
//!   checkpoint                   last watermark the flusher saw committed (advisory)
//!   clean-stop                   where the log ended at the last clean stop (removed at
//!                                start): a log found shorter is damage, not a torn write
//!   schema-cache.json            table columns (owned by crate::schema)
//!   damage.json                  damage the flusher found: every start refuses until
//!                                `pgspool quarantine` (see [`damage`])
//!   00000000000000000001.wal     segments, named by their first LSN
//!   00000000000000052001.wal
//!   quarantine/                  bytes cut from a torn tail or moved aside by
//!                                `pgspool quarantine`, kept for inspection
//! ```
//! Segment and record formats are described in [`segment`] and [`record`].
//!
//! # Writing (group commit)
//! One thread owns the active segment (`writer.rs`). Ingest tasks send it whole requests;
//! it takes every request waiting (up to a group size), gives their rows consecutive LSNs,
//! writes them with one `pwrite`, calls `fdatasync` once, then answers every request of the
//! group. No request is answered before the sync that covers it. A failed write (a full
//! disk) is rolled back (the file truncated to its previous length and synced) and reported
//! to the group's requests, and the next group starts a new segment, so that the flusher can
//! delete this one and free its space;
//! a failed `fdatasync` is fatal: the writer truncates the group away as far as it can,
//! answers it with an error and stops, and the daemon exits, because after a failed fsync
//! the page cache can no longer be trusted (PostgreSQL's "fsyncgate"); recovery re-reads
//! the log from disk.
//!
//! A request never spans segments: before a group that would overflow the active segment,
//! the writer creates the next one (temporary name, header, fsync, rename, directory
//! fsync). A segment therefore exceeds `segment_bytes` only when a single request does.
//!
//! The writer publishes the last durable LSN on a watch channel; readers never read past it.
//! After each durable group commit it tells the [`CommitObserver`] given in [`WalOptions`]
//! (the daemon's metrics) the group's size and how long its `fdatasync` took.
//!
//! # Reading
//! The flusher reads with a [`WalReader`] from the watermark PostgreSQL holds: the log is
//! the queue, and replay after a restart is the ordinary read path.
//!
//! # Recovery (at open)
//! See [`recovery`]: lock the directory; read or create the spool id; refuse if damage was
//! recorded; check every segment header; fsync and scan the last segment. A bad record at
//! its end with nothing written by a later group commit after it is a torn write of a
//! request that was never acknowledged: copied to `quarantine/`, cut off, the cut synced.
//! A bad record followed by a later group's record, or a log that ends before its
//! checkpoint or before where it ended at the last clean stop, is damage to acknowledged
//! data: the WAL refuses to open. Start-up reads segment headers and the last segment
//! only, whatever the backlog.
//!
//! # Deleting
//! A segment is deleted once every row in it is at or below the watermark committed in
//! PostgreSQL, i.e. when the next segment's first LSN is at most watermark + 1, after the
//! checkpoint was written. The last segment is never deleted, so the next LSN survives
//! even when everything is flushed.

pub mod damage;
pub mod reader;
pub mod record;
pub mod recovery;
pub mod segment;
mod writer;

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use uuid::Uuid;

use crate::fsutil;
use crate::lsn::Lsn;
pub use damage::{Damage, TailDamage, classify_tail, read_tail};
pub use reader::WalReader;
pub use record::{AppendRecord, Invalid, Record, RecordKind};
pub(crate) use recovery::existing_spool_id;
use segment::{OpenSegmentError, SegmentFile};
pub use writer::{AppendError, Appender};

const SPOOL_ID_FILE: &str = "spool_id";
const CHECKPOINT_FILE: &str = "checkpoint";
pub(crate) const CLEAN_STOP_FILE: &str = "clean-stop";
/// Directory (inside the WAL directory) for bytes cut from the log.
pub const QUARANTINE_DIR: &str = "quarantine";

/// Errors of the WAL. [`WalError::Corrupt`], [`WalError::EndsBeforeCheckpoint`] and a
/// [`WalError::BadFile`] for a segment mean acknowledged data is damaged or missing;
/// [`WalError::Missing`] and [`WalError::InsideRecord`] that the log does not hold what was
/// asked of it; the rest are environmental.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// A file-system call failed.
    #[error("{context}: {error}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The error from the operating system.
        error: io::Error,
    },
    /// Another process holds the directory lock.
    #[error(
        "WAL directory {dir} is in use by another pgspool ({holder}); two daemons on one WAL \
         directory would lose data: stop the other one or use another --wal-dir"
    )]
    Locked {
        /// The WAL directory.
        dir: PathBuf,
        /// Who holds it, as far as the lock file says.
        holder: String,
    },
    /// A file in the directory is not what it must be.
    #[error("{path}: {reason}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Acknowledged records are damaged.
    #[error(
        "WAL damaged: {damage}. These rows were acknowledged, and pgspool never skips them by \
         itself. Keep the directory ({dir}); `pgspool status --wal-dir {dir}` lists all \
         damage. Restore the directory from a copy, or, to go on without those rows, stop \
         pgspool and run `pgspool quarantine --wal-dir {dir}`: it moves the damaged bytes to \
         {dir}/quarantine/ and the flusher passes over their LSNs",
        dir = damage.segment.parent().unwrap_or(Path::new(".")).display()
    )]
    Corrupt {
        /// Where, which LSNs, and why.
        damage: Damage,
    },
    /// The log ends before where it ended when the daemon last stopped cleanly.
    #[error(
        "the WAL in {dir} ends at LSN {last}, but it ended at LSN {stopped_at} when pgspool \
         last stopped cleanly: acknowledged records at its end are missing or damaged (a \
         segment deleted or cut, bad sectors). pgspool never skips them by itself: restore the \
         directory from a copy, or, to go on without those rows, run `pgspool quarantine \
         --wal-dir {dir}`"
    )]
    EndsBeforeCleanStop {
        /// The WAL directory.
        dir: PathBuf,
        /// The last LSN the log holds.
        last: Lsn,
        /// The last LSN it held at the clean stop.
        stopped_at: Lsn,
    },
    /// The log ends before rows its checkpoint says PostgreSQL committed.
    #[error(
        "the WAL in {dir} ends at LSN {last}, but its checkpoint says PostgreSQL committed rows \
         up to LSN {flushed}: records were lost from the end of the log (an older copy of the \
         directory, or a disk that dropped writes). pgspool will not reuse those LSNs: move \
         the directory aside to start a new spool"
    )]
    EndsBeforeCheckpoint {
        /// The WAL directory.
        dir: PathBuf,
        /// The last LSN the log holds.
        last: Lsn,
        /// The checkpoint's watermark.
        flushed: Lsn,
    },
    /// The LSN asked for is not the first of a record.
    #[error(
        "LSN {lsn} is not the first LSN of a record: a record spans it, up to LSN {record_end}"
    )]
    InsideRecord {
        /// The LSN asked for.
        lsn: Lsn,
        /// The last LSN of the record that holds it.
        record_end: Lsn,
    },
    /// The log does not hold the LSN asked for.
    #[error("the WAL does not hold LSN {lsn}: {reason}")]
    Missing {
        /// The LSN asked for.
        lsn: Lsn,
        /// Why not.
        reason: String,
    },
}

impl WalError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> WalError {
        let context = context.into();
        move |error| WalError::Io { context, error }
    }

    fn segment(path: &Path) -> impl FnOnce(OpenSegmentError) -> WalError + '_ {
        move |e| match e {
            OpenSegmentError::Io(error) => WalError::Io {
                context: format!("read segment {}", path.display()),
                error,
            },
            OpenSegmentError::BadHeader(reason) => WalError::BadFile {
                path: path.to_path_buf(),
                reason,
            },
        }
    }
}

/// What [`Wal::open`] needs.
#[derive(Debug, Clone)]
pub struct WalOptions {
    /// The WAL directory; created if missing.
    pub dir: PathBuf,
    /// Size in bytes at which the writer starts a new segment.
    pub segment_bytes: u64,
    /// Told of every group commit once it is durable (the daemon's metrics); `None`: no
    /// one is.
    pub observer: Option<Arc<dyn CommitObserver>>,
}

/// One group commit, as the writer reports it to a [`CommitObserver`] after its
/// `fdatasync` returned successfully.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupCommit {
    /// Appends (requests) the group answered.
    pub requests: usize,
    /// Rows (LSNs) the group wrote.
    pub rows: u64,
    /// Bytes the group wrote to the segment.
    pub bytes: u64,
    /// How long its `fdatasync` took.
    pub fdatasync: Duration,
}

/// Something told of the writer's group commits, such as the daemon's metrics: the WAL
/// knows nothing of how they are exposed.
pub trait CommitObserver: Send + Sync + fmt::Debug {
    /// Called on the writer thread after each durable group commit, before the requests
    /// that wait for durability are answered: it must be quick and must not block.
    fn committed(&self, commit: &GroupCommit);
}

/// The locked WAL directory: shared by the writer, the readers and the flusher.
#[derive(Debug)]
pub struct WalDir {
    path: PathBuf,
    spool_id: Uuid,
    /// Bytes in the segment files, kept up to date by the writer and by deletion.
    bytes: AtomicU64,
    /// Segment files, kept up to date like `bytes`.
    segments: AtomicU64,
}

impl WalDir {
    /// The directory.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This spool's id: generated once, kept in the directory, used as the key of the
    /// watermark in PostgreSQL.
    #[must_use]
    pub fn spool_id(&self) -> Uuid {
        self.spool_id
    }

    /// Bytes in the segment files: the unflushed backlog, plus flushed rows whose segment
    /// is not deleted yet (at most one segment's worth). `[wal] max_bytes` bounds it.
    #[must_use]
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub(super) fn add_bytes(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// Segment files in the directory (at least one while the WAL is open).
    #[must_use]
    pub fn segments(&self) -> u64 {
        self.segments.load(Ordering::Relaxed)
    }

    pub(super) fn add_segment(&self) {
        self.segments.fetch_add(1, Ordering::Relaxed);
    }

    /// Deletes the segments whose rows are all at or below `committed`, oldest first, and
    /// never the last one. Returns how many were deleted.
    ///
    /// # Errors
    /// When listing, unlinking or syncing the directory fails.
    pub fn remove_segments_through(&self, committed: Lsn) -> Result<usize, WalError> {
        let segments = segment::list(&self.path)
            .map_err(WalError::io(format!("list {}", self.path.display())))?;
        let mut removed = 0;
        for pair in segments.windows(2) {
            if pair[1].first_lsn.prev() > committed {
                break;
            }
            let len = fs::metadata(&pair[0].path).map_or(0, |m| m.len());
            fs::remove_file(&pair[0].path)
                .map_err(WalError::io(format!("delete {}", pair[0].path.display())))?;
            let _ = self
                .bytes
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                    Some(b.saturating_sub(len))
                });
            let _ = self
                .segments
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_sub(1))
                });
            removed += 1;
        }
        if removed > 0 {
            fsutil::sync_dir(&self.path)
                .map_err(WalError::io(format!("sync {}", self.path.display())))?;
        }
        Ok(removed)
    }

    /// Records that the log ends just before `next_lsn` as the daemon stops cleanly: the
    /// next start refuses a log that ends earlier (see [`read_clean_stop`]).
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write_clean_stop(&self, next_lsn: Lsn) -> Result<(), WalError> {
        let body = serde_json::to_vec(&CleanStop { next_lsn }).expect("serializes");
        fsutil::write_atomic(&self.path, CLEAN_STOP_FILE, &body).map_err(WalError::io(format!(
            "write the clean-stop record in {}",
            self.path.display()
        )))
    }

    /// Records where the flusher last saw PostgreSQL, for `pgspool status` while the
    /// daemon is down and for recovery's checks. Advisory: PostgreSQL's watermark decides
    /// where replay starts.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write_checkpoint(&self, checkpoint: &Checkpoint) -> Result<(), WalError> {
        let mut body = serde_json::to_vec(checkpoint).expect("a checkpoint serializes");
        body.push(b'\n');
        fsutil::write_atomic(&self.path, CHECKPOINT_FILE, &body).map_err(WalError::io(format!(
            "write checkpoint in {}",
            self.path.display()
        )))
    }
}

/// The local checkpoint: what the flusher last saw committed in PostgreSQL.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    /// Every row at or below this LSN is settled (committed, or a dead letter): the
    /// watermark, or the lowest LSN a held table waits after. Segments are deleted up to it.
    pub flushed_lsn: Lsn,
    /// PostgreSQL's watermark: the rows of tables not held are settled up to it (absent in
    /// checkpoints of older builds: then `flushed_lsn`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark: Option<Lsn>,
    /// Tables held (as their records name them) and the LSN their rows are settled up to.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub held: BTreeMap<String, Lsn>,
}

impl Checkpoint {
    /// PostgreSQL's watermark as recorded.
    #[must_use]
    pub fn watermark_lsn(&self) -> Lsn {
        self.watermark.unwrap_or(self.flushed_lsn)
    }

    /// The LSN up to which the rows of `table` are settled.
    #[must_use]
    pub fn settled_for(&self, table: &str) -> Lsn {
        self.held
            .get(table)
            .copied()
            .or(self.watermark)
            .unwrap_or(self.flushed_lsn)
    }
}

/// Reads the flushed LSN of `dir`'s checkpoint (see [`Checkpoint`]); `None` if there is
/// none.
///
/// # Errors
/// When the file exists but cannot be read or parsed.
pub fn read_checkpoint(dir: &Path) -> Result<Option<Lsn>, WalError> {
    Ok(read_checkpoint_whole(dir)?.map(|c| c.flushed_lsn))
}

/// Reads `dir`'s checkpoint whole; `None` if there is none.
///
/// # Errors
/// When the file exists but cannot be read or parsed.
pub fn read_checkpoint_whole(dir: &Path) -> Result<Option<Checkpoint>, WalError> {
    read_json::<Checkpoint>(&dir.join(CHECKPOINT_FILE), |e| {
        format!("not a checkpoint: {e}")
    })
}

/// PostgreSQL's watermark as the last checkpoint in `dir` recorded it, if one can be read:
/// what the daemon knows before the flusher asks PostgreSQL.
#[must_use]
pub fn recorded_watermark(dir: &Path) -> Option<Lsn> {
    read_checkpoint_whole(dir)
        .ok()
        .flatten()
        .map(|c| c.watermark_lsn())
}

/// The LSN the next row would have got when the daemon last stopped cleanly (the writer
/// records it as it stops; recovery removes it): `None` after a crash.
///
/// # Errors
/// When the file exists but cannot be read or parsed.
pub fn read_clean_stop(dir: &Path) -> Result<Option<Lsn>, WalError> {
    let stop = read_json::<CleanStop>(&dir.join(CLEAN_STOP_FILE), |e| {
        format!("not a clean-stop record: {e}")
    })?;
    Ok(stop.map(|s| s.next_lsn))
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CleanStop {
    next_lsn: Lsn,
}

/// Reads the JSON file at `path`; `None` if there is none. `bad` words a parse error.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(
    path: &Path,
    bad: impl FnOnce(serde_json::Error) -> String,
) -> Result<Option<T>, WalError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| WalError::BadFile {
                path: path.to_path_buf(),
                reason: bad(e),
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(WalError::io(format!("read {}", path.display()))(e)),
    }
}

/// Reads the spool id of `dir`; `None` if the directory has none yet.
///
/// # Errors
/// When the file exists but cannot be read or does not hold a UUID.
pub fn read_spool_id(dir: &Path) -> Result<Option<Uuid>, WalError> {
    let path = dir.join(SPOOL_ID_FILE);
    match fs::read(&path) {
        Ok(bytes) => Uuid::try_parse_ascii(bytes.trim_ascii())
            .map(Some)
            .map_err(|e| WalError::BadFile {
                path,
                reason: format!("not a spool id: {e}"),
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(WalError::io(format!("read {}", path.display()))(e)),
    }
}

/// What recovery found and did, for the start-up log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segments in the directory.
    pub segments: usize,
    /// LSN the next appended row gets.
    pub next_lsn: Lsn,
    /// A torn write cut from the end of the last segment.
    pub cut: Option<CutTail>,
}

/// A torn write cut from the end of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutTail {
    /// Where the cut was made in the segment, in bytes.
    pub offset: u64,
    /// Bytes cut off.
    pub bytes: u64,
    /// The copy of those bytes (`None` if it could not be written, e.g. on a full disk).
    pub saved_to: Option<PathBuf>,
}

/// An open WAL: the locked directory, the writer thread, and the durable LSN it publishes.
#[derive(Debug)]
pub struct Wal {
    dir: Arc<WalDir>,
    /// The directory's flock, held by the open WAL (not by the [`WalDir`] that readers and
    /// tasks share), so that [`Wal::close`] releases it once the writer has stopped,
    /// whatever task still holds the directory.
    _lock: File,
    appender: Appender,
    durable: watch::Receiver<Lsn>,
    /// The writer's result; `None` once [`Wal::writer_failed`] took it.
    writer_exit: Option<oneshot::Receiver<Result<(), WalError>>>,
    report: RecoveryReport,
}

impl Wal {
    /// Opens (creating if needed) and recovers the WAL directory, then starts the writer.
    ///
    /// # Errors
    /// [`WalError::Locked`] when another daemon holds the directory, [`WalError::BadFile`]
    /// for a damaged segment header or metadata file, [`WalError::Corrupt`] for damage to
    /// acknowledged records at the end of the log, [`WalError::EndsBeforeCheckpoint`],
    /// I/O errors.
    pub fn open(options: &WalOptions) -> Result<Wal, WalError> {
        let (dir, lock, tail, report) = recovery::recover(&options.dir)?;
        let dir = Arc::new(dir);
        let writer = writer::start(
            Arc::clone(&dir),
            tail,
            options.segment_bytes,
            options.observer.clone(),
        )?;
        Ok(Wal {
            dir,
            _lock: lock,
            appender: writer.appender,
            durable: writer.durable,
            writer_exit: Some(writer.exit),
            report,
        })
    }

    /// The locked directory.
    #[must_use]
    pub fn dir(&self) -> &Arc<WalDir> {
        &self.dir
    }

    /// What recovery found.
    #[must_use]
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.report
    }

    /// A handle for appending; the writer stops once every handle is dropped.
    #[must_use]
    pub fn appender(&self) -> Appender {
        self.appender.clone()
    }

    /// The last durable LSN, updated after every group commit.
    #[must_use]
    pub fn durable(&self) -> watch::Receiver<Lsn> {
        self.durable.clone()
    }

    /// Waits until the writer stops on its own, which it only does on a fatal error (a
    /// failed fdatasync), and returns that error.
    pub async fn writer_failed(&mut self) -> WalError {
        if let Some(exit) = &mut self.writer_exit {
            let result = exit.await;
            self.writer_exit = None;
            if let Ok(Err(e)) = result {
                return e;
            }
        }
        std::future::pending().await
    }

    /// Stops the writer once every other [`Appender`] is dropped and waits for it.
    ///
    /// # Errors
    /// The writer's fatal error, if it had one.
    pub async fn close(self) -> Result<(), WalError> {
        drop(self.appender);
        match self.writer_exit {
            Some(exit) => exit.await.unwrap_or(Ok(())),
            None => Ok(()),
        }
    }
}

/// The active segment as recovery leaves it, handed to the writer.
#[derive(Debug)]
struct Tail {
    file: File,
    segment: SegmentFile,
    len: u64,
    next_lsn: Lsn,
}
