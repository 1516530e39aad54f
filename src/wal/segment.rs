//! Segment files: naming, the segment header, creation, and a cursor that walks records.
//!
//! A segment is named after the LSN of its first row, `{first_lsn:020}.wal`, so names sort
//! in log order and the segment after one that ends at LSN `n` is named `n + 1`. It starts
//! with a 64-byte header, then records back to back:
//!
//! ```text
//! offset size field
//!      0    8 magic      "PGSPWAL\n"
//!      8    4 version    1
//!     12    4 header_len 64
//!     16    8 first_lsn  LSN of the first row this segment holds (or will hold)
//!     24   16 spool_id   the spool (WAL directory) the segment belongs to
//!     40    8 created_us creation time, microseconds since the Unix epoch
//!     48   12 reserved   zero
//!     60    4 crc        CRC-32C of bytes 0..60
//! ```

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::record::{self, Decoded, HEADER_BYTES, Invalid, Record, RecordKind};
use crate::fsutil::{self, AtomicWriteError};
use crate::lsn::{Lsn, LsnRange};

/// Size of the segment header in bytes.
pub const SEGMENT_HEADER_BYTES: u64 = 64;
const MAGIC: &[u8; 8] = b"PGSPWAL\n";
const VERSION: u32 = 1;
/// Bytes read from a segment at a time.
const READ_CHUNK: usize = 1 << 20;

/// The file name of the segment whose first row is `first_lsn`.
#[must_use]
pub fn file_name(first_lsn: Lsn) -> String {
    format!("{:020}.wal", first_lsn.0)
}

/// The first LSN encoded in a segment file name, or `None` for other files.
#[must_use]
pub fn parse_file_name(name: &str) -> Option<Lsn> {
    let digits = name.strip_suffix(".wal")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().map(Lsn)
}

/// A segment file found in the WAL directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentFile {
    /// LSN of the segment's first row, from its name.
    pub first_lsn: Lsn,
    /// Full path of the file.
    pub path: PathBuf,
}

/// Lists the segments of `dir` in log order.
///
/// # Errors
/// When the directory cannot be read, or something named like a segment is not a regular
/// file.
pub fn list(dir: &Path) -> io::Result<Vec<SegmentFile>> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(first_lsn) = entry.file_name().to_str().and_then(parse_file_name) {
            // Opening a FIFO or device would block or worse: refuse it by name. A segment
            // deleted meanwhile (by the flusher) is simply gone.
            match fs::metadata(entry.path()) {
                Ok(meta) if meta.is_file() => {}
                Ok(_) => {
                    return Err(io::Error::other(format!(
                        "{} is named like a segment but is not a regular file; move it away",
                        entry.path().display()
                    )));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
            segments.push(SegmentFile {
                first_lsn,
                path: entry.path(),
            });
        }
    }
    segments.sort_by_key(|s| s.first_lsn);
    Ok(segments)
}

/// The decoded segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// LSN of the segment's first row.
    pub first_lsn: Lsn,
    /// The spool the segment belongs to.
    pub spool_id: Uuid,
    /// Creation time, microseconds since the Unix epoch.
    pub created_us: u64,
}

impl SegmentHeader {
    /// The header of a segment of `spool_id` starting at `first_lsn`, created now.
    #[must_use]
    pub fn new(first_lsn: Lsn, spool_id: Uuid) -> SegmentHeader {
        SegmentHeader {
            first_lsn,
            spool_id,
            created_us: fsutil::now_us(),
        }
    }

    /// The header's 64 bytes.
    #[must_use]
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_BYTES as usize] {
        let mut b = [0u8; SEGMENT_HEADER_BYTES as usize];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(SEGMENT_HEADER_BYTES as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.first_lsn.0.to_le_bytes());
        b[24..40].copy_from_slice(self.spool_id.as_bytes());
        b[40..48].copy_from_slice(&self.created_us.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8; SEGMENT_HEADER_BYTES as usize]) -> Result<SegmentHeader, &'static str> {
        if &b[0..8] != MAGIC {
            return Err("not a pgspool WAL segment (bad magic)");
        }
        let stored = u32::from_le_bytes(b[60..64].try_into().expect("4 bytes"));
        if stored != crc32c::crc32c(&b[0..60]) {
            return Err("segment header checksum mismatch");
        }
        if u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")) != VERSION {
            return Err("unsupported segment format version");
        }
        if u64::from(u32::from_le_bytes(b[12..16].try_into().expect("4 bytes")))
            != SEGMENT_HEADER_BYTES
        {
            return Err("unexpected segment header length");
        }
        Ok(SegmentHeader {
            first_lsn: Lsn(u64::from_le_bytes(b[16..24].try_into().expect("8 bytes"))),
            spool_id: Uuid::from_bytes(b[24..40].try_into().expect("16 bytes")),
            created_us: u64::from_le_bytes(b[40..48].try_into().expect("8 bytes")),
        })
    }
}

/// Why a segment file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OpenSegmentError {
    /// Reading the file failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The header is not a valid header for this spool and file name.
    #[error("{0}")]
    BadHeader(String),
}

/// Reads and checks the header of `segment`: magic, checksum, version, that it belongs to
/// `spool_id`, and that its first LSN matches the file name.
///
/// # Errors
/// [`OpenSegmentError::BadHeader`] with the reason, or the I/O error.
pub fn read_header(
    file: &File,
    segment: &SegmentFile,
    spool_id: Uuid,
) -> Result<SegmentHeader, OpenSegmentError> {
    let mut b = [0u8; SEGMENT_HEADER_BYTES as usize];
    file.read_exact_at(&mut b, 0).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            OpenSegmentError::BadHeader("file is shorter than a segment header".into())
        } else {
            OpenSegmentError::Io(e)
        }
    })?;
    let header = SegmentHeader::decode(&b).map_err(|e| OpenSegmentError::BadHeader(e.into()))?;
    if header.spool_id != spool_id {
        return Err(OpenSegmentError::BadHeader(format!(
            "segment belongs to spool {}, this WAL directory is spool {spool_id}",
            header.spool_id
        )));
    }
    if header.first_lsn != segment.first_lsn {
        return Err(OpenSegmentError::BadHeader(format!(
            "header says first LSN {}, the file name says {}",
            header.first_lsn, segment.first_lsn
        )));
    }
    Ok(header)
}

/// Creates the segment that starts at `first_lsn`, crash-atomically: the header is written
/// to a temporary name and synced, the file renamed into place, and the directory synced.
/// Returns the new file opened for writing.
///
/// # Errors
/// Which step failed (a failed sync is fatal to the caller); the temporary file is removed
/// on failure.
pub fn create(
    dir: &Path,
    first_lsn: Lsn,
    spool_id: Uuid,
) -> Result<(File, SegmentFile), AtomicWriteError> {
    let name = file_name(first_lsn);
    let path = dir.join(&name);
    let header = SegmentHeader::new(first_lsn, spool_id);
    fsutil::write_atomic_steps(dir, &name, &header.encode())?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(AtomicWriteError::Write)?;
    Ok((file, SegmentFile { first_lsn, path }))
}

/// One step of a [`SegmentCursor`].
#[derive(Debug)]
pub enum Step {
    /// The next record was read; [`SegmentCursor::record`] returns it.
    Record(LsnRange),
    /// The next record's LSN is beyond the durable LSN given: nothing to read yet.
    CaughtUp,
    /// The segment ends exactly after the last record.
    End,
    /// The bytes at `offset` are not the next record.
    Damaged {
        /// File offset where the damage starts.
        offset: u64,
        /// What is wrong there.
        reason: Invalid,
    },
}

/// Walks the records of one segment with positional reads and a bounded read-ahead buffer.
///
/// Bytes read while a record was still being written must never be decoded as that record
/// once it is durable. The cursor therefore remembers the durable LSN in force when its
/// oldest buffered bytes were read (`trusted`), and re-reads the file before decoding any
/// record beyond it.
#[derive(Debug)]
pub struct SegmentCursor {
    file: File,
    segment: SegmentFile,
    /// Read buffer: `buf[..len]` holds bytes read from the file; the rest is storage
    /// zeroed once and reused, so reading at the tail of a growing log costs no zeroing.
    buf: Vec<u8>,
    /// Bytes of `buf` read from the file.
    len: usize,
    /// File offset of `buf[0]`.
    buf_offset: u64,
    /// Index in `buf` of the next record.
    start: usize,
    /// Length of the record handed out last, consumed at the next step.
    handed_out: usize,
    /// The record handed out last, less its payload.
    handed_out_meta: Meta,
    next_lsn: Lsn,
    trusted: Lsn,
}

impl SegmentCursor {
    /// Opens `segment`, checks its header, and positions at its first record.
    ///
    /// # Errors
    /// See [`read_header`].
    pub fn open(
        segment: SegmentFile,
        spool_id: Uuid,
    ) -> Result<(SegmentCursor, SegmentHeader), OpenSegmentError> {
        let file = File::open(&segment.path)?;
        let header = read_header(&file, &segment, spool_id)?;
        let cursor = SegmentCursor {
            file,
            next_lsn: header.first_lsn,
            segment,
            buf: Vec::new(),
            len: 0,
            buf_offset: SEGMENT_HEADER_BYTES,
            start: 0,
            handed_out: 0,
            handed_out_meta: Meta {
                kind: RecordKind::Rows,
                lsns: LsnRange::starting_at(Lsn::FIRST, 1),
                time_us: 0,
                group_lsn: Lsn::FIRST,
                crc: 0,
            },
            trusted: Lsn::ZERO,
        };
        Ok((cursor, header))
    }

    /// The segment being read.
    #[must_use]
    pub fn segment(&self) -> &SegmentFile {
        &self.segment
    }

    /// LSN of the next record.
    #[must_use]
    pub fn next_lsn(&self) -> Lsn {
        self.next_lsn
    }

    /// File offset of the next record.
    #[must_use]
    pub fn offset(&self) -> u64 {
        self.buf_offset + (self.start + self.handed_out) as u64
    }

    /// Reads the next record, reading nothing past `durable` (pass `Lsn(u64::MAX)` to read
    /// a segment no one is writing).
    ///
    /// # Errors
    /// I/O errors only; damage is reported as [`Step::Damaged`].
    pub fn step(&mut self, durable: Lsn) -> io::Result<Step> {
        self.start += std::mem::take(&mut self.handed_out);
        if self.next_lsn > durable {
            return Ok(Step::CaughtUp);
        }
        if self.next_lsn > self.trusted {
            self.discard_read_ahead();
        }
        let offset = self.offset();
        let available = self.fill(HEADER_BYTES, durable)?;
        if available == 0 {
            return Ok(Step::End);
        }
        if available < HEADER_BYTES {
            return Ok(damaged(offset, HEADER_BYTES, available));
        }
        let len = match record::record_len(&self.buf[self.start..self.len]) {
            Ok(len) => len,
            Err(reason) => return Ok(Step::Damaged { offset, reason }),
        };
        let available = self.fill(len, durable)?;
        if available < len {
            return Ok(damaged(offset, len, available));
        }
        let meta = match record::decode(&self.buf[self.start..self.len], self.next_lsn) {
            Decoded::Record(r, _) => Meta {
                kind: r.kind,
                lsns: r.lsns,
                time_us: r.time_us,
                group_lsn: r.group_lsn,
                crc: r.crc,
            },
            Decoded::Invalid(reason) => return Ok(Step::Damaged { offset, reason }),
        };
        self.next_lsn = meta.lsns.last.next();
        self.handed_out = len;
        self.handed_out_meta = meta;
        Ok(Step::Record(meta.lsns))
    }

    /// The record the last [`step`](Self::step) returned as [`Step::Record`].
    ///
    /// # Panics
    /// If the last step did not return a record.
    #[must_use]
    pub fn record(&self) -> Record<'_> {
        assert!(self.handed_out > 0, "no record was handed out");
        let Meta {
            kind,
            lsns,
            time_us,
            group_lsn,
            crc,
        } = self.handed_out_meta;
        Record {
            kind,
            lsns,
            time_us,
            group_lsn,
            crc,
            payload: &self.buf[self.start + HEADER_BYTES..self.start + self.handed_out],
        }
    }

    /// Positions the cursor at `offset`, where the record of LSN `lsn` starts: for reading
    /// on past damage.
    pub fn resume_at(&mut self, offset: u64, lsn: Lsn) {
        self.len = 0;
        self.buf_offset = offset;
        self.start = 0;
        self.handed_out = 0;
        self.next_lsn = lsn;
        self.trusted = Lsn::ZERO;
    }

    /// Makes the buffer hold `n` bytes from the next record on, reading as needed; returns
    /// how many it holds, fewer than `n` only at the end of the file.
    fn fill(&mut self, n: usize, durable: Lsn) -> io::Result<usize> {
        if self.len - self.start >= n {
            return Ok(n);
        }
        if self.start == self.len {
            self.trusted = durable;
        }
        self.buf.copy_within(self.start..self.len, 0);
        self.len -= self.start;
        self.buf_offset += self.start as u64;
        self.start = 0;
        while self.len < n {
            // Grown by a chunk only once full, never to `n` at once: `n` may come from a
            // damaged header, and memory follows the bytes the file really holds.
            if self.len == self.buf.len() {
                self.buf.resize(self.len + READ_CHUNK, 0);
            }
            let read = self
                .file
                .read_at(&mut self.buf[self.len..], self.buf_offset + self.len as u64);
            match read {
                Ok(0) => break,
                Ok(got) => self.len += got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(self.len.min(n))
    }

    fn discard_read_ahead(&mut self) {
        self.buf_offset += self.start as u64;
        self.len = 0;
        self.start = 0;
    }
}

/// What a cursor keeps of the record it handed out last, beside the payload.
#[derive(Debug, Clone, Copy)]
struct Meta {
    kind: RecordKind,
    lsns: LsnRange,
    time_us: u64,
    group_lsn: Lsn,
    crc: u32,
}

fn damaged(offset: u64, needed: usize, available: usize) -> Step {
    Step::Damaged {
        offset,
        reason: Invalid::Truncated {
            needed: needed as u64,
            available: available as u64,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::record::{AppendRecord, GroupStamp};

    #[test]
    fn names_round_trip_and_sort_in_log_order() {
        assert_eq!(file_name(Lsn(42)), "00000000000000000042.wal");
        assert_eq!(
            parse_file_name(&file_name(Lsn(u64::MAX))),
            Some(Lsn(u64::MAX))
        );
        assert_eq!(parse_file_name("42.wal"), None);
        assert_eq!(parse_file_name("0000000000000000004x.wal"), None);
        assert_eq!(parse_file_name("00000000000000000042.wal.tmp"), None);
        assert!(file_name(Lsn(9)) < file_name(Lsn(10)));
    }

    #[test]
    fn something_named_like_a_segment_that_is_not_a_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir(dir.path().join(file_name(Lsn(5)))).expect("mkdir");
        let err = list(dir.path()).expect_err("refused");
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    #[test]
    fn header_checks_spool_and_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Uuid::new_v4();
        let (_, seg) = create(dir.path(), Lsn(7), spool).expect("create");
        let (_, header) = SegmentCursor::open(seg.clone(), spool).expect("open");
        assert_eq!(header.first_lsn, Lsn(7));
        let err = SegmentCursor::open(seg.clone(), Uuid::new_v4()).unwrap_err();
        assert!(err.to_string().contains("belongs to spool"), "{err}");
        let renamed = SegmentFile {
            first_lsn: Lsn(8),
            path: dir.path().join(file_name(Lsn(8))),
        };
        fs::rename(&seg.path, &renamed.path).expect("rename");
        let err = SegmentCursor::open(renamed, spool).unwrap_err();
        assert!(err.to_string().contains("file name says 8"), "{err}");
    }

    #[test]
    fn cursor_reads_records_and_reports_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Uuid::new_v4();
        let (file, seg) = create(dir.path(), Lsn(1), spool).expect("create");
        let mut bytes = Vec::new();
        AppendRecord::new(2, b"a\nb\n".to_vec()).encode_into(Lsn(1), GroupStamp::at(1), &mut bytes);
        AppendRecord::new(1, b"c\n".to_vec()).encode_into(Lsn(3), GroupStamp::at(3), &mut bytes);
        let good = bytes.len();
        AppendRecord::new(1, b"torn\n".to_vec()).encode_into(Lsn(4), GroupStamp::at(4), &mut bytes);
        bytes.truncate(bytes.len() - 2);
        file.write_all_at(&bytes, SEGMENT_HEADER_BYTES)
            .expect("write");

        let (mut cursor, _) = SegmentCursor::open(seg, spool).expect("open");
        let all = Lsn(u64::MAX);
        assert!(matches!(cursor.step(all).expect("step"), Step::Record(_)));
        let r = cursor.record();
        assert_eq!((r.lsns.first, r.payload), (Lsn(1), &b"a\nb\n"[..]));
        assert!(matches!(cursor.step(Lsn(2)).expect("step"), Step::CaughtUp));
        assert!(matches!(cursor.step(all).expect("step"), Step::Record(_)));
        assert_eq!(cursor.record().lsns.first, Lsn(3));
        match cursor.step(all).expect("step") {
            Step::Damaged { offset, reason } => {
                assert_eq!(offset, SEGMENT_HEADER_BYTES + good as u64);
                assert!(matches!(reason, Invalid::Truncated { .. }));
            }
            other => panic!("expected damage, got {other:?}"),
        }
    }

    /// Found by the `wal_records` fuzz target: a damaged header declaring a 32 MiB record
    /// in a segment of 105 bytes made the cursor allocate (and zero) 32 MiB before finding
    /// that the file ends.
    #[test]
    fn a_length_from_a_damaged_header_allocates_only_what_the_file_holds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Uuid::new_v4();
        let (file, seg) = create(dir.path(), Lsn(0xfdff_0100_0000_010a), spool).expect("create");
        let record: &[u8] = &[
            0, 0, 0, 0, 4, 0, 0, 2, 0, 0, 0, 56, 0, 126, 45, 126, 45, 45, 45, 45, 45, 126, 126,
            126, 126, 126, 10, 96, 96, 96, 96, 96, 96, 9, 0, 0, 126, 255, 255, 209, 122,
        ];
        file.write_all_at(record, SEGMENT_HEADER_BYTES)
            .expect("write");
        let (mut cursor, _) = SegmentCursor::open(seg, spool).expect("open");
        match cursor.step(Lsn(u64::MAX)).expect("step") {
            Step::Damaged { offset, reason } => {
                assert_eq!(offset, SEGMENT_HEADER_BYTES);
                assert_eq!(
                    reason,
                    Invalid::Truncated {
                        needed: (HEADER_BYTES + 0x0200_0004) as u64,
                        available: record.len() as u64
                    }
                );
            }
            other => panic!("expected damage, got {other:?}"),
        }
        assert!(
            cursor.buf.len() <= READ_CHUNK,
            "{} bytes allocated",
            cursor.buf.len()
        );
    }

    #[test]
    fn bytes_read_before_a_record_was_durable_are_read_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Uuid::new_v4();
        let (file, seg) = create(dir.path(), Lsn(1), spool).expect("create");
        let mut first = Vec::new();
        AppendRecord::new(1, b"one\n".to_vec()).encode_into(Lsn(1), GroupStamp::at(1), &mut first);
        let mut second = Vec::new();
        AppendRecord::new(1, b"two\n".to_vec()).encode_into(Lsn(2), GroupStamp::at(2), &mut second);
        // When the cursor reads ahead, the bytes after the first record are those of a
        // write that will be rolled back (say the disk filled up) and written again.
        let mut rolled_back = Vec::new();
        AppendRecord::new(1, b"gone\n".to_vec()).encode_into(
            Lsn(2),
            GroupStamp {
                first_lsn: Lsn(2),
                time_us: 1,
            },
            &mut rolled_back,
        );
        let mut bytes = first.clone();
        bytes.extend_from_slice(&rolled_back[..20]);
        file.write_all_at(&bytes, SEGMENT_HEADER_BYTES)
            .expect("write");
        let (mut cursor, _) = SegmentCursor::open(seg, spool).expect("open");
        assert!(matches!(
            cursor.step(Lsn(1)).expect("step"),
            Step::Record(_)
        ));
        assert!(matches!(cursor.step(Lsn(1)).expect("step"), Step::CaughtUp));
        // Now the writer writes the real record and publishes it as durable.
        file.write_all_at(&second, SEGMENT_HEADER_BYTES + first.len() as u64)
            .expect("write");
        assert!(
            matches!(cursor.step(Lsn(2)).expect("step"), Step::Record(_)),
            "the completed record must be read"
        );
        assert_eq!(cursor.record().payload, b"two\n");
    }
}
