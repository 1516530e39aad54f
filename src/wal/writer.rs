//! The single WAL writer thread and its group commit (see the [module docs](super)).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info};

use super::record::{AppendRecord, GroupStamp};
use super::segment::{self, SEGMENT_HEADER_BYTES, SegmentFile};
use super::{CommitObserver, GroupCommit, Tail, WalDir, WalError};
use crate::fsutil::{self, AtomicWriteError};
use crate::lsn::{Lsn, LsnRange};

/// Most bytes one group commit writes (4 MiB), so one sync never waits behind an
/// unbounded amount of data.
const MAX_GROUP_BYTES: u64 = 4 << 20;
/// Requests that may wait for the writer before senders wait (backpressure).
const QUEUE_DEPTH: usize = 1024;

/// Why an append was not acknowledged. Nothing of the request is in the log.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Writing failed (for example the disk is full); the write was rolled back and the
    /// daemon goes on.
    #[error("writing to the WAL failed: {0}; nothing of this request was kept")]
    Write(io::Error),
    /// fdatasync failed: the daemon stops, since the page cache can no longer be trusted.
    /// The write was rolled back as far as the disk allows, but a disk that failed to sync
    /// may still hold it.
    #[error(
        "fdatasync of the WAL failed: {0}; pgspool is stopping. This request was not \
         acknowledged and was rolled back, but the disk may still hold it: sent again, its \
         rows may be loaded twice"
    )]
    Sync(io::Error),
    /// The writer is not running (the daemon is stopping, or stopped on a fatal error).
    #[error("the WAL writer is stopped (pgspool is stopping); nothing of this request was kept")]
    Closed,
}

struct AppendRequest {
    records: Vec<AppendRecord>,
    bytes: u64,
    /// Answer once the group is written (before its fdatasync) rather than once it is
    /// durable.
    nowait: bool,
    reply: oneshot::Sender<Result<LsnRange, AppendError>>,
}

/// A handle for appending to the WAL; cheap to clone.
#[derive(Debug, Clone)]
pub struct Appender {
    tx: mpsc::Sender<AppendRequest>,
}

impl Appender {
    /// Appends `records` (all rows of one request) and waits until they are durable.
    /// Returns the LSNs given to their rows, which are consecutive.
    ///
    /// # Errors
    /// See [`AppendError`]; on any error none of the records is acknowledged, and none was
    /// published to readers.
    ///
    /// # Panics
    /// If `records` is empty.
    pub async fn append(&self, records: Vec<AppendRecord>) -> Result<LsnRange, AppendError> {
        self.send(records, false).await
    }

    /// Appends `records` like [`append`](Self::append), but answers as soon as the writer
    /// has written them into the segment (`pwrite` returned), before the group's
    /// `fdatasync`: the LSNs are known only once the writer has placed the records in its
    /// group, so that is the earliest answer. The records are then in the page cache, not
    /// yet on disk: a crash (of the host; a crash of pgspool alone loses nothing the kernel
    /// holds) may lose them, up to one group commit. Readers still see them only once
    /// durable. If that fdatasync fails, the daemon stops as ever and the group is cut
    /// from the log as far as the disk allows: records answered this way are then lost.
    ///
    /// # Errors
    /// See [`AppendError`]: a failed write is answered as with `append`; a failed
    /// fdatasync after the answer is not (the daemon stops).
    ///
    /// # Panics
    /// If `records` is empty.
    pub async fn append_nowait(&self, records: Vec<AppendRecord>) -> Result<LsnRange, AppendError> {
        self.send(records, true).await
    }

    async fn send(
        &self,
        records: Vec<AppendRecord>,
        nowait: bool,
    ) -> Result<LsnRange, AppendError> {
        assert!(!records.is_empty(), "an append holds at least one record");
        let bytes = records.iter().map(AppendRecord::encoded_len).sum();
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(AppendRequest {
                records,
                bytes,
                nowait,
                reply,
            })
            .await
            .map_err(|_| AppendError::Closed)?;
        answer.await.unwrap_or(Err(AppendError::Closed))
    }
}

/// The running writer, as [`start`] hands it to the [`Wal`](super::Wal).
pub(super) struct Started {
    pub appender: Appender,
    pub durable: watch::Receiver<Lsn>,
    /// The writer's result when its thread ends.
    pub exit: oneshot::Receiver<Result<(), WalError>>,
}

/// Starts the writer thread on the recovered tail.
pub(super) fn start(
    dir: Arc<WalDir>,
    tail: Tail,
    segment_bytes: u64,
    observer: Option<Arc<dyn CommitObserver>>,
) -> Result<Started, WalError> {
    let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
    let (durable_tx, durable_rx) = watch::channel(tail.next_lsn.prev());
    let (exit_tx, exit_rx) = oneshot::channel();
    let writer = Writer {
        dir,
        segment_bytes,
        file: tail.file,
        segment: tail.segment,
        len: tail.len,
        next_lsn: tail.next_lsn,
        durable: durable_tx,
        buf: Vec::new(),
        rotate_next: false,
        observer,
    };
    thread::Builder::new()
        .name("pgspool-wal".into())
        .spawn(move || {
            let result = writer.run(rx);
            if let Err(e) = &result {
                error!(error = %e, "WAL writer stopped");
            }
            let _ = exit_tx.send(result);
        })
        .map_err(WalError::io("start the WAL writer thread"))?;
    Ok(Started {
        appender: Appender { tx },
        durable: durable_rx,
        exit: exit_rx,
    })
}

struct Writer {
    dir: Arc<WalDir>,
    segment_bytes: u64,
    file: File,
    segment: SegmentFile,
    /// Bytes in the active segment, all durable.
    len: u64,
    next_lsn: Lsn,
    durable: watch::Sender<Lsn>,
    buf: Vec<u8>,
    /// Start a new segment before the next group: set after a failed write, so that once
    /// flushed the active segment can be deleted and its space freed (the last segment never
    /// is).
    rotate_next: bool,
    observer: Option<Arc<dyn CommitObserver>>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<AppendRequest>) -> Result<(), WalError> {
        let mut carried: Option<AppendRequest> = None;
        loop {
            let Some(first) = carried.take().or_else(|| rx.blocking_recv()) else {
                // Every appender is gone: a clean stop. Recorded so that the next start
                // knows the log may not end earlier (best effort: without it, the next
                // start trusts the log as after a crash).
                if let Err(e) = self.dir.write_clean_stop(self.next_lsn) {
                    error!(error = %e, "could not record the clean stop");
                }
                return Ok(());
            };
            if self.len > SEGMENT_HEADER_BYTES
                && (self.rotate_next || self.len + first.bytes > self.segment_bytes)
                && let Err(e) = self.rotate()
            {
                match e {
                    AtomicWriteError::Write(e) => {
                        let _ = first.reply.send(Err(AppendError::Write(e)));
                        self.remove_failed_segment()?;
                        continue;
                    }
                    AtomicWriteError::Sync(e) => {
                        let _ = self.remove_failed_segment();
                        let _ = first.reply.send(Err(AppendError::Sync(clone_io(&e))));
                        return Err(WalError::io(format!(
                            "fsync a new segment in {}",
                            self.dir.path().display()
                        ))(e));
                    }
                }
            }
            let mut group = vec![first];
            let mut group_bytes = group[0].bytes;
            while group_bytes < MAX_GROUP_BYTES {
                let Ok(next) = rx.try_recv() else { break };
                if self.len + group_bytes + next.bytes > self.segment_bytes {
                    carried = Some(next);
                    break;
                }
                group_bytes += next.bytes;
                group.push(next);
            }
            self.commit(group)?;
        }
    }

    /// Writes one group, answers the requests that do not wait for durability, syncs it,
    /// and answers the others.
    fn commit(&mut self, group: Vec<AppendRequest>) -> Result<(), WalError> {
        self.buf.clear();
        let stamp = GroupStamp {
            first_lsn: self.next_lsn,
            time_us: fsutil::now_us(),
        };
        let mut lsn = self.next_lsn;
        let mut ranges = Vec::with_capacity(group.len());
        for request in &group {
            let first = lsn;
            for record in &request.records {
                record.encode_into(lsn, stamp, &mut self.buf);
                lsn = lsn.advance(u64::from(record.rows));
            }
            ranges.push(LsnRange {
                first,
                last: lsn.prev(),
            });
        }

        if let Err(e) = self.file.write_all_at(&self.buf, self.len) {
            // Roll back whatever part was written, durably, so that no partial record stays
            // behind and none of the group can come back after a crash: its requests are
            // told that nothing was kept. If that fails the file is in an unknown state.
            let rolled_back = self
                .file
                .set_len(self.len)
                .and_then(|()| self.file.sync_all());
            if let Err(rollback) = rolled_back {
                reply_all(group, &rollback, AppendError::Sync);
                return Err(WalError::io(format!(
                    "roll back a failed write ({e}) in {}",
                    self.segment.path.display()
                ))(rollback));
            }
            reply_all(group, &e, AppendError::Write);
            self.rotate_next = true;
            return Ok(());
        }
        let (written, group): (Vec<_>, Vec<_>) = group
            .into_iter()
            .zip(ranges)
            .partition(|(request, _)| request.nowait);
        let answered = written.len();
        for (request, range) in written {
            let _ = request.reply.send(Ok(range));
        }
        let (group, ranges): (Vec<_>, Vec<_>) = group.into_iter().unzip();
        let syncing = Instant::now();
        if let Err(e) = self.file.sync_data() {
            // Drop the group from the file so that a restart does not find it; this cannot
            // be made durable any more, hence the answer says the outcome is unknown.
            let _ = self.file.set_len(self.len);
            reply_all(group, &e, AppendError::Sync);
            return Err(WalError::io(format!(
                "fdatasync {}",
                self.segment.path.display()
            ))(e));
        }
        self.len += self.buf.len() as u64;
        self.dir.add_bytes(self.buf.len() as u64);
        self.next_lsn = lsn;
        self.durable.send_replace(lsn.prev());
        if let Some(observer) = &self.observer {
            observer.committed(&GroupCommit {
                requests: group.len() + answered,
                rows: lsn.0 - stamp.first_lsn.0,
                bytes: self.buf.len() as u64,
                fdatasync: syncing.elapsed(),
            });
        }
        for (request, range) in group.into_iter().zip(ranges) {
            let _ = request.reply.send(Ok(range));
        }
        Ok(())
    }

    /// Starts the next segment at `next_lsn`. The previous one is already synced.
    fn rotate(&mut self) -> Result<(), AtomicWriteError> {
        let (file, segment) = segment::create(self.dir.path(), self.next_lsn, self.dir.spool_id())?;
        info!(segment = %segment.path.display(), "started a new WAL segment");
        self.file = file;
        self.segment = segment;
        self.len = SEGMENT_HEADER_BYTES;
        self.dir.add_bytes(SEGMENT_HEADER_BYTES);
        self.dir.add_segment();
        self.rotate_next = false;
        Ok(())
    }

    /// After a failed rotation, makes sure the segment it was creating does not exist:
    /// left behind, it would claim LSNs the active segment goes on to use.
    fn remove_failed_segment(&self) -> Result<(), WalError> {
        let path = self.dir.path().join(segment::file_name(self.next_lsn));
        match std::fs::remove_file(&path) {
            Ok(()) => fsutil::sync_dir(self.dir.path())
                .map_err(WalError::io(format!("sync {}", self.dir.path().display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(WalError::io(format!(
                "remove the half-created segment {}",
                path.display()
            ))(e)),
        }
    }
}

fn reply_all(group: Vec<AppendRequest>, e: &io::Error, kind: fn(io::Error) -> AppendError) {
    for request in group {
        let _ = request.reply.send(Err(kind(clone_io(e))));
    }
}

fn clone_io(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Wal, WalOptions};
    use super::*;

    #[tokio::test]
    async fn append_nowait_takes_the_next_lsns_and_becomes_durable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wal = Wal::open(&WalOptions {
            dir: dir.path().join("wal"),
            segment_bytes: 1 << 20,
            observer: None,
        })
        .expect("open");
        let appender = wal.appender();
        let first = appender
            .append_nowait(vec![AppendRecord::new(2, b"ab".to_vec())])
            .await
            .expect("append");
        assert_eq!(first, LsnRange::starting_at(Lsn(1), 2));
        let second = appender
            .append(vec![AppendRecord::new(1, b"c".to_vec())])
            .await
            .expect("append");
        assert_eq!(second, LsnRange::starting_at(Lsn(3), 1));
        assert_eq!(*wal.durable().borrow(), Lsn(3));
        drop(appender);
        wal.close().await.expect("close");
    }
}
