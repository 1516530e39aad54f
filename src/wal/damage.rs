//! Damage to the log: telling a torn write from damaged acknowledged records, locating the
//! damaged range, remembering damage the flusher found, and moving it aside on an
//! operator's word (`pgspool quarantine`).
//!
//! A record that fails validation is either
//!
//! - the **torn write** of a group commit that never completed (so was never
//!   acknowledged): it can only be at the end of the last segment, with nothing written by
//!   a later group after it. Recovery cuts it (see [`super::recovery`]).
//! - **damage** to acknowledged records: anywhere else. The rows in it are owed to
//!   PostgreSQL, so nothing moves past it by itself: the daemon refuses to start (a
//!   damage found while flushing is recorded in `damage.json` so that every later start
//!   refuses too, without reading the whole log), `pgspool status` lists it, and only
//!   `pgspool quarantine` moves the damaged bytes to `quarantine/` and puts in their place
//!   a *quarantined* record that covers their LSNs, which the flusher passes over.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::warn;
use uuid::Uuid;

use super::record::{self, AppendRecord, Decoded, GroupStamp, HEADER_BYTES, Record};
use super::segment::{self, OpenSegmentError, SegmentCursor, SegmentFile, SegmentHeader, Step};
use super::{QUARANTINE_DIR, WalError, recovery};
use crate::fsutil;
use crate::lsn::Lsn;

/// File in the WAL directory that records damage the flusher found.
const DAMAGE_FILE: &str = "damage.json";

/// What follows the first invalid record of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TailDamage {
    /// Nothing written by a later group follows: a torn write, if at the end of the log.
    Torn,
    /// A record written by a later group follows: the invalid record is damaged
    /// acknowledged data, which ends where the first valid record after it starts.
    Followed {
        /// File offset of the first valid record after the damage.
        offset: u64,
        /// Its first LSN.
        lsn: Lsn,
    },
}

/// Classifies `tail`, the bytes of a segment from offset `start` (an invalid record where
/// LSN `expected` should begin) to its end.
///
/// The damage is to acknowledged data when a valid record with an LSN of `expected` or
/// later follows at some byte after `start` and was written by a later group commit than
/// the one that wrote `expected` (its `group_lsn` is above `expected`): a group is written
/// only after the one before it was synced and acknowledged. Valid records of the same
/// group prove nothing: after a power loss a torn group may hold any mix of written and
/// unwritten pages. The damaged range then ends at the first valid record after `start`.
#[must_use]
pub fn classify_tail(tail: &[u8], start: u64, expected: Lsn) -> TailDamage {
    let lsn_at = |bytes: &[u8]| Lsn(u64::from_le_bytes(bytes[8..16].try_into().expect("8")));
    let mut resume = None;
    let mut at = 1;
    while at + HEADER_BYTES <= tail.len() {
        let candidate = &tail[at..];
        // Cheap header checks first; the checksum only for plausible headers.
        let plausible = record::record_len(candidate).is_ok_and(|len| len <= candidate.len())
            && lsn_at(candidate) >= expected
            && candidate[16..20] != [0; 4];
        if plausible && let Decoded::Record(r, len) = record::decode(candidate, lsn_at(candidate)) {
            let (offset, lsn) = *resume.get_or_insert((start + at as u64, r.lsns.first));
            if r.group_lsn > expected {
                return TailDamage::Followed { offset, lsn };
            }
            at += len;
        } else {
            at += 1;
        }
    }
    TailDamage::Torn
}

/// Reads a segment's bytes from `offset` to its end (at most a segment: bounded by
/// `[wal] segment_bytes` plus one request).
///
/// # Errors
/// When reading fails.
pub fn read_tail(path: &Path, offset: u64) -> io::Result<Vec<u8>> {
    read_range(path, offset, u64::MAX)
}

fn read_range(path: &Path, from: u64, to: u64) -> io::Result<Vec<u8>> {
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(from))?;
    let mut bytes = Vec::new();
    file.take(to - from).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// A damaged stretch of a segment: acknowledged rows that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Damage {
    /// The segment file.
    pub segment: PathBuf,
    /// File offset of the first damaged byte.
    pub offset: u64,
    /// File offset just past the damage: the next valid record, or the segment's end.
    pub end: u64,
    /// First LSN that cannot be read.
    pub first_lsn: Lsn,
    /// Last LSN that cannot be read; `None` when the damage runs to the end of the log.
    pub last_lsn: Option<Lsn>,
    /// Why the first damaged record failed validation.
    pub reason: String,
}

impl Damage {
    /// How many LSNs cannot be read; `None` when the damage runs to the end of the log. 0
    /// for bytes after the last record of a segment whose successor starts at the next LSN.
    #[must_use]
    pub fn rows(&self) -> Option<u64> {
        self.last_lsn
            .map(|last| (last.0 + 1).saturating_sub(self.first_lsn.0))
    }
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "segment {}, bytes {}..{}: ",
            self.segment.display(),
            self.offset,
            self.end
        )?;
        match (self.last_lsn, self.rows()) {
            (_, Some(0)) => write!(f, "bytes after the last record, no LSNs")?,
            (Some(last), Some(rows)) => {
                let s = if rows == 1 { "" } else { "s" };
                write!(f, "LSNs {} ..= {last} ({rows} row{s})", self.first_lsn)?;
            }
            _ => write!(f, "LSNs from {} to the end of the log", self.first_lsn)?,
        }
        write!(f, " cannot be read ({})", self.reason)
    }
}

/// Locates the damage that starts at `offset` of `segment`, where LSN `expected` should
/// begin. Returns `None` for a torn write, which only the end of the log can hold
/// (`torn_possible`: the last segment, as found at start-up or by an offline reader).
/// `next_segment` is the first LSN of the segment after this one, if there is one.
///
/// # Errors
/// When the segment cannot be read.
pub fn locate(
    segment: &SegmentFile,
    offset: u64,
    expected: Lsn,
    reason: &record::Invalid,
    next_segment: Option<Lsn>,
    torn_possible: bool,
) -> io::Result<Option<Damage>> {
    let tail = read_tail(&segment.path, offset)?;
    let (end, last_lsn) = match classify_tail(&tail, offset, expected) {
        TailDamage::Followed { offset, lsn } => (offset, Some(lsn.prev())),
        TailDamage::Torn if torn_possible => return Ok(None),
        TailDamage::Torn => (offset + tail.len() as u64, next_segment.map(Lsn::prev)),
    };
    Ok(Some(Damage {
        segment: segment.path.clone(),
        offset,
        end,
        first_lsn: expected,
        last_lsn,
        reason: reason.to_string(),
    }))
}

/// What reading one whole segment found.
#[derive(Debug, Default)]
pub struct SegmentScan {
    /// Damaged stretches, in file order.
    pub damage: Vec<Damage>,
    /// A torn write at the end of the last segment: its offset and length in bytes.
    pub torn_tail: Option<(u64, u64)>,
}

/// Reads every record of the segment under `cursor` (freshly opened), calling `on_record`
/// for each with the file offset just past it, and locates every damaged stretch, reading
/// on after each. `next_segment` as for [`locate`]; without one the segment is the last,
/// and a torn write at its end is reported as such.
///
/// # Errors
/// When the segment cannot be read.
pub fn scan_segment(
    cursor: &mut SegmentCursor,
    next_segment: Option<Lsn>,
    on_record: &mut dyn FnMut(&Record<'_>, u64),
) -> io::Result<SegmentScan> {
    let mut scan = SegmentScan::default();
    loop {
        match cursor.step(Lsn(u64::MAX))? {
            Step::Record(_) => on_record(&cursor.record(), cursor.offset()),
            Step::End | Step::CaughtUp => return Ok(scan),
            Step::Damaged { offset, reason } => {
                let expected = cursor.next_lsn();
                let segment = cursor.segment().clone();
                match locate(
                    &segment,
                    offset,
                    expected,
                    &reason,
                    next_segment,
                    next_segment.is_none(),
                )? {
                    None => {
                        let len = fs::metadata(&segment.path)?.len();
                        scan.torn_tail = Some((offset, len.saturating_sub(offset)));
                        return Ok(scan);
                    }
                    Some(damage) => {
                        let resume = damage.last_lsn.map(|last| (damage.end, last.next()));
                        scan.damage.push(damage);
                        match resume {
                            Some((offset, lsn)) if next_segment.is_none_or(|n| lsn < n) => {
                                cursor.resume_at(offset, lsn);
                            }
                            _ => return Ok(scan),
                        }
                    }
                }
            }
        }
    }
}

/// Records `damage` found while flushing, so that the daemon refuses every later start
/// until an operator has dealt with it (crash-atomically; see [`recorded()`]).
///
/// # Errors
/// When the file cannot be written.
pub fn record(dir: &Path, damage: &Damage) -> io::Result<()> {
    let json = serde_json::to_vec_pretty(damage).expect("damage serializes");
    fsutil::write_atomic(dir, DAMAGE_FILE, &json)
}

/// The damage recorded in `dir` by [`record()`], if any.
///
/// # Errors
/// When the file exists but cannot be read or parsed.
pub fn recorded(dir: &Path) -> Result<Option<Damage>, WalError> {
    super::read_json(&dir.join(DAMAGE_FILE), |e| {
        format!(
            "not a damage record ({e}); the flusher found damage and recorded it here. Run \
             `pgspool quarantine --wal-dir {}`: it reads every segment again and removes this \
             file",
            dir.display()
        )
    })
}

/// A damaged range `pgspool quarantine` moved aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// The damage.
    pub damage: Damage,
    /// The file that now holds its bytes (`None` for LSNs no segment held).
    pub saved_to: Option<PathBuf>,
}

/// What `pgspool quarantine` found and did.
#[derive(Debug, Default)]
pub struct QuarantineReport {
    /// Damaged ranges moved aside.
    pub moved: Vec<Quarantined>,
    /// The damage the flusher had recorded, now cleared, as it was described (it is among
    /// `moved` unless the segment reads cleanly now).
    pub cleared: Option<String>,
    /// A torn write at the end of the log, left for the daemon to cut at its next start.
    pub torn_tail_bytes: u64,
}

/// Moves every damaged range of the WAL in `dir` aside: its bytes to a file in
/// `quarantine/`, and in their place, by rewriting the segment crash-atomically, a
/// quarantined record covering their LSNs. Takes the directory lock, so it refuses to run
/// beside the daemon. Calls `progress` with bytes read so far.
///
/// # Errors
/// [`WalError::Locked`] while a daemon runs; [`WalError::BadFile`] for a directory without
/// a spool id or a segment whose header is damaged (its records cannot be trusted to be in
/// the right place); I/O errors.
pub fn quarantine(dir: &Path, progress: &mut dyn FnMut(u64)) -> Result<QuarantineReport, WalError> {
    if !dir.is_dir() {
        return Err(WalError::BadFile {
            path: dir.to_path_buf(),
            reason: "is not a WAL directory".into(),
        });
    }
    let _lock = recovery::lock_dir(dir)?;
    let segments = segment::list(dir).map_err(WalError::io(format!("list {}", dir.display())))?;
    let Some(spool_id) = super::existing_spool_id(dir, segments.first())? else {
        return Err(WalError::BadFile {
            path: dir.to_path_buf(),
            reason: "not a pgspool WAL directory (no spool_id file)".into(),
        });
    };
    // After a clean stop the log must reach where it ended then: a bad record at its end
    // is damage, not a torn write, and missing LSNs at its end are passed over too.
    let clean_stop = super::read_clean_stop(dir).ok().flatten();
    let mut report = QuarantineReport::default();
    // LSNs pending before the oldest segment (the first segments deleted by hand): from
    // the local checkpoint on, or from LSN 1 for a spool that never flushed.
    let pending_from = super::read_checkpoint(dir)
        .ok()
        .flatten()
        .map_or(Lsn::FIRST, Lsn::next);
    if let Some(first) = segments.first()
        && first.first_lsn > pending_from
    {
        report
            .moved
            .push(fill_gap(dir, spool_id, pending_from, first.first_lsn)?);
    }
    let mut read = 0;
    for (i, seg) in segments.iter().enumerate() {
        let next_segment = segments.get(i + 1).map(|s| s.first_lsn);
        let log_end = next_segment.or(clean_stop);
        let mut cursor = match (SegmentCursor::open(seg.clone(), spool_id), next_segment) {
            (Ok((cursor, _)), _) => cursor,
            (Err(OpenSegmentError::BadHeader(reason)), Some(next)) => {
                report
                    .moved
                    .push(replace_segment(dir, seg, spool_id, next, reason)?);
                continue;
            }
            (Err(e), _) => return Err(WalError::segment(&seg.path)(e)),
        };
        let mut scan = scan_segment(&mut cursor, next_segment, &mut |_, at| progress(read + at))
            .map_err(WalError::io(format!("read {}", seg.path.display())))?;
        let len = fs::metadata(&seg.path).map_or(0, |m| m.len());
        read += len;
        match (scan.torn_tail, clean_stop) {
            (Some((offset, _)), Some(stop)) => scan.damage.push(Damage {
                segment: seg.path.clone(),
                offset,
                end: len,
                first_lsn: cursor.next_lsn(),
                last_lsn: Some(stop.prev()),
                reason: format!(
                    "no valid record at the end of the log, which reached LSN {} when pgspool \
                     last stopped cleanly",
                    stop.prev()
                ),
            }),
            (Some((_, bytes)), None) => report.torn_tail_bytes += bytes,
            (None, _) => {}
        }
        // Where this segment's LSNs end, damaged ones included.
        let end = scan
            .damage
            .iter()
            .filter_map(|d| d.last_lsn.map(Lsn::next))
            .fold(cursor.next_lsn(), Lsn::max);
        if !scan.damage.is_empty() {
            report.moved.extend(move_aside(dir, seg, scan.damage)?);
        }
        if let Some(next) = log_end
            && end < next
        {
            report.moved.push(fill_gap(dir, spool_id, end, next)?);
        }
    }
    // Every segment was read again, so the record has served its purpose (even unreadable).
    let record = dir.join(DAMAGE_FILE);
    if record.exists() {
        report.cleared = Some(recorded(dir).ok().flatten().map_or_else(
            || "an unreadable damage.json".to_string(),
            |d| d.to_string(),
        ));
        fs::remove_file(&record)
            .and_then(|()| fsutil::sync_dir(dir))
            .map_err(WalError::io(format!("remove {}", record.display())))?;
    }
    Ok(report)
}

/// Moves a whole segment whose header is damaged (so none of its records can be trusted to
/// be this spool's, at these LSNs) to `quarantine/`, and puts in its place a segment of
/// quarantined records up to `next`, the first LSN of the segment after it.
fn replace_segment(
    dir: &Path,
    segment: &SegmentFile,
    spool_id: Uuid,
    next: Lsn,
    reason: String,
) -> Result<Quarantined, WalError> {
    let path = &segment.path;
    let len = fs::metadata(path)
        .map_err(WalError::io(format!("read {}", path.display())))?
        .len();
    let damage = Damage {
        segment: path.clone(),
        offset: 0,
        end: len,
        first_lsn: segment.first_lsn,
        last_lsn: Some(next.prev()),
        reason: format!("bad segment header: {reason}"),
    };
    let moved = save(dir, segment, damage)?;
    write_quarantined_segment(dir, spool_id, segment.first_lsn, &moved)?;
    Ok(moved)
}

/// Creates the segment that stands for LSNs `from .. next` which no segment holds (a
/// segment file was deleted, or one ends early): quarantined records only.
fn fill_gap(dir: &Path, spool_id: Uuid, from: Lsn, next: Lsn) -> Result<Quarantined, WalError> {
    let name = segment::file_name(from);
    let gap = Quarantined {
        damage: Damage {
            segment: dir.join(&name),
            offset: segment::SEGMENT_HEADER_BYTES,
            end: segment::SEGMENT_HEADER_BYTES,
            first_lsn: from,
            last_lsn: Some(next.prev()),
            reason: "no segment holds them: a segment file is missing, or one ends early".into(),
        },
        saved_to: None,
    };
    write_quarantined_segment(dir, spool_id, from, &gap)?;
    warn!(damage = %gap.damage, "filled a gap in the log with quarantined records");
    Ok(gap)
}

/// Writes (crash-atomically, replacing any file of that name) the segment starting at
/// `first_lsn` that holds only the quarantined records standing for `q`.
fn write_quarantined_segment(
    dir: &Path,
    spool_id: Uuid,
    first_lsn: Lsn,
    q: &Quarantined,
) -> Result<(), WalError> {
    let name = segment::file_name(first_lsn);
    let mut bytes = SegmentHeader::new(first_lsn, spool_id).encode().to_vec();
    bytes.extend(quarantined_records(q));
    fsutil::write_atomic(dir, &name, &bytes)
        .map_err(WalError::io(format!("write {}", dir.join(&name).display())))
}

/// Saves each damaged range of `segment` to `quarantine/`, then rewrites the segment with
/// a quarantined record in place of each (temporary file, fdatasync, rename, directory
/// fsync): a crash leaves either the old segment or the new one.
fn move_aside(
    dir: &Path,
    segment: &SegmentFile,
    damage: Vec<Damage>,
) -> Result<Vec<Quarantined>, WalError> {
    let moved = damage
        .into_iter()
        .map(|d| save(dir, segment, d))
        .collect::<Result<Vec<_>, _>>()?;
    rewrite_segment(dir, segment, &moved)
        .map_err(WalError::io(format!("rewrite {}", segment.path.display())))?;
    Ok(moved)
}

/// Copies the bytes of `damage` in `segment` to a new file in `quarantine/`.
fn save(dir: &Path, segment: &SegmentFile, damage: Damage) -> Result<Quarantined, WalError> {
    let path = &segment.path;
    if damage.last_lsn.is_none() {
        return Err(WalError::BadFile {
            path: path.clone(),
            reason: format!("{damage}: where the damage ends is unknown, so it cannot be moved"),
        });
    }
    let quarantine_dir = dir.join(QUARANTINE_DIR);
    fsutil::create_private_dir_all(&quarantine_dir)
        .map_err(WalError::io(format!("create {}", quarantine_dir.display())))?;
    let bytes = read_range(path, damage.offset, damage.end)
        .map_err(WalError::io(format!("read {}", path.display())))?;
    let name = format!(
        "damaged-{}-{}-{}.bin",
        segment.first_lsn.0,
        damage.offset,
        fsutil::now_us()
    );
    fsutil::write_atomic(&quarantine_dir, &name, &bytes).map_err(WalError::io(format!(
        "save damaged bytes to {}",
        quarantine_dir.display()
    )))?;
    let saved_to = quarantine_dir.join(name);
    warn!(%damage, saved_to = %saved_to.display(), "moved damaged records aside");
    Ok(Quarantined {
        damage,
        saved_to: Some(saved_to),
    })
}

fn rewrite_segment(dir: &Path, segment: &SegmentFile, moved: &[Quarantined]) -> io::Result<()> {
    let name = segment::file_name(segment.first_lsn);
    let tmp = dir.join(format!("{name}{}", fsutil::TMP_SUFFIX));
    let result = (|| {
        let mut src = File::open(&segment.path)?;
        let mut out = fsutil::create_private_file(&tmp)?;
        let mut pos = 0;
        for q in moved {
            io::copy(
                &mut Read::by_ref(&mut src).take(q.damage.offset - pos),
                &mut out,
            )?;
            out.write_all(&quarantined_records(q))?;
            src.seek(SeekFrom::Start(q.damage.end))?;
            pos = q.damage.end;
        }
        io::copy(&mut src, &mut out)?;
        out.sync_data()?;
        fs::rename(&tmp, &segment.path)?;
        fsutil::sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The quarantined records that stand for `q`'s LSNs (one per 2^32 - 1 rows).
fn quarantined_records(q: &Quarantined) -> Vec<u8> {
    let note = match &q.saved_to {
        Some(saved_to) => format!(
            "moved aside by pgspool quarantine to {} ({})",
            saved_to.display(),
            q.damage.reason
        ),
        None => format!("passed over by pgspool quarantine ({})", q.damage.reason),
    };
    let last = q.damage.last_lsn.expect("checked by save");
    let time_us = fsutil::now_us();
    let mut out = Vec::new();
    let mut lsn = q.damage.first_lsn;
    while lsn <= last {
        let rows = u32::try_from(last.0 - lsn.0 + 1).unwrap_or(u32::MAX);
        let stamp = GroupStamp {
            first_lsn: lsn,
            time_us,
        };
        AppendRecord::quarantined(rows, &note).encode_into(lsn, stamp, &mut out);
        lsn = lsn.advance(u64::from(rows));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(first: u64, count: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..count {
            AppendRecord::new(1, format!("row {i}\n").into_bytes()).encode_into(
                Lsn(first + i),
                GroupStamp::at(first + i),
                &mut out,
            );
        }
        out
    }

    #[test]
    fn garbage_and_zeroes_after_a_bad_record_are_a_torn_write() {
        let mut tail = records(5, 1);
        tail[34] ^= 1;
        tail.extend((0..500u32).map(|i| (i * 7919 % 251) as u8));
        tail.extend([0u8; 300]);
        assert_eq!(classify_tail(&tail, 1000, Lsn(5)), TailDamage::Torn);
    }

    #[test]
    fn a_valid_record_after_a_bad_one_is_damage() {
        let mut tail = records(5, 3);
        tail[HEADER_BYTES + 2] ^= 0x10;
        let second = records(5, 1).len();
        assert_eq!(
            classify_tail(&tail, 1000, Lsn(5)),
            TailDamage::Followed {
                offset: 1000 + second as u64,
                lsn: Lsn(6)
            }
        );
    }

    #[test]
    fn records_from_before_the_damage_do_not_count() {
        // A stale copy of an earlier record (lower LSN) is not evidence of later data.
        let mut tail = records(9, 1);
        tail[0] ^= 1;
        tail.extend(records(3, 1));
        assert_eq!(classify_tail(&tail, 0, Lsn(9)), TailDamage::Torn);
    }

    #[test]
    fn valid_records_of_the_torn_group_itself_prove_nothing() {
        // One group commit of three records from LSN 5 whose first page never reached the
        // disk (a power loss): the later records are intact but were never acknowledged.
        let mut tail = Vec::new();
        for i in 0..3 {
            AppendRecord::new(1, b"x\n".to_vec()).encode_into(
                Lsn(5 + i),
                GroupStamp::at(5),
                &mut tail,
            );
        }
        tail[..HEADER_BYTES].fill(0);
        assert_eq!(classify_tail(&tail, 0, Lsn(5)), TailDamage::Torn);
        // The same bytes followed by a record of the next group: the damage is real.
        AppendRecord::new(1, b"y\n".to_vec()).encode_into(Lsn(8), GroupStamp::at(8), &mut tail);
        let second = HEADER_BYTES as u64 + 2;
        assert_eq!(
            classify_tail(&tail, 0, Lsn(5)),
            TailDamage::Followed {
                offset: second,
                lsn: Lsn(6)
            }
        );
    }
}
