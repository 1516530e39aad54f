//! WAL segment reading on arbitrary bytes: a segment file is written with the input and
//! read back the two ways pgspool reads segments: record by record with a
//! `SegmentCursor` (as the flusher's `WalReader` does), locating any damage as the
//! flusher would; and whole, as `pgspool status` does (`status::inspect`, which scans
//! every segment, locates every damaged stretch and reads on past it).
//!
//! Input: byte 0 holds flags, bytes 1..9 the segment's first LSN (little-endian, also its
//! file name), and the rest the segment's bytes after its header:
//! - bit 0: recompute each record's CRC-32C before writing, so that the fuzzer reaches
//!   what is checked behind the checksum (lengths, types, LSNs, row groups);
//! - bit 1: also set each record's first LSN to the one expected there;
//! - bit 2: the segment header too comes from the input (its first 64 bytes), instead of
//!   a valid header for the spool;
//! - bit 3: no file: the records are decoded in memory (`record::record_len`,
//!   `record::decode`, `damage::classify_tail`), as the cursor and the damage locator do,
//!   with no file I/O and no 1 MiB read buffer: far more executions a second.
//!
//! It checks that every record handed out lies inside the file and follows the one before
//! it, that damage is reported inside the file, and that a row group's rows come to an
//! end.

#![no_main]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pgspool::lsn::Lsn;
use pgspool::rowgroup::{RowFormat, RowGroup};
use pgspool::status::inspect;
use pgspool::wal::damage::{self, TailDamage};
use pgspool::wal::record::{self, Decoded, HEADER_BYTES, MAX_PAYLOAD_BYTES};
use pgspool::wal::segment::{self, SegmentCursor, SegmentFile, SegmentHeader, Step};
use uuid::Uuid;

const SPOOL: Uuid = Uuid::from_u128(0x5eed_5eed_5eed_5eed_5eed_5eed_5eed_5eed);

/// A WAL directory of this process (`spool_id` written once), on tmpfs when there is one.
fn dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() {
            base.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("pgspool-fuzz-wal-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create the WAL directory");
        fs::write(dir.join("spool_id"), SPOOL.to_string()).expect("write spool_id");
        dir
    })
}

/// Recomputes the CRC (and with `lsns`, the first LSN) of each record in `bytes`, as far as
/// records fit.
fn repair(bytes: &mut [u8], first: Lsn, lsns: bool) {
    let (mut at, mut expected) = (0, first.0);
    while at + HEADER_BYTES <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"));
        let total = HEADER_BYTES + len.min(MAX_PAYLOAD_BYTES) as usize;
        if at + total > bytes.len() {
            return;
        }
        let record = &mut bytes[at..at + total];
        if lsns {
            record[8..16].copy_from_slice(&expected.to_le_bytes());
        }
        let rows = u32::from_le_bytes(record[16..20].try_into().expect("4 bytes"));
        expected = expected.wrapping_add(u64::from(rows));
        let crc = crc32c::crc32c(&record[4..]);
        record[..4].copy_from_slice(&crc.to_le_bytes());
        at += total;
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let flags = data[0];
    let first = Lsn(u64::from_le_bytes(data[1..9].try_into().expect("8 bytes")));
    let mut rest = &data[9..];
    let header = if flags & 4 == 4 {
        let Some((header, after)) = rest.split_first_chunk::<64>() else {
            return;
        };
        rest = after;
        *header
    } else {
        SegmentHeader {
            first_lsn: first,
            spool_id: SPOOL,
            created_us: 0,
        }
        .encode()
    };
    let mut records = rest.to_vec();
    if flags & 1 == 1 {
        repair(&mut records, first, flags & 2 == 2);
    }
    if flags & 8 == 8 {
        decode_in_memory(&records, first);
        return;
    }

    let dir = dir();
    for old in segment::list(dir).expect("list") {
        fs::remove_file(old.path).expect("remove the last input's segment");
    }
    let seg = SegmentFile {
        first_lsn: first,
        path: dir.join(segment::file_name(first)),
    };
    let mut file = header.to_vec();
    file.extend_from_slice(&records);
    fs::write(&seg.path, &file).expect("write the segment");
    let file_len = file.len() as u64;

    read_records(&seg, file_len);
    match inspect::inspect(dir, &mut |read| assert!(read <= file_len)) {
        Ok(status) => {
            assert!(status.bytes <= file_len);
            assert!(status.torn_tail_bytes <= file_len);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});

/// Decodes `bytes` (a segment after its header) record by record up to its end or its
/// first invalid record, and classifies what follows that one.
fn decode_in_memory(bytes: &[u8], first: Lsn) {
    let (mut at, mut expected) = (0, first);
    while at < bytes.len() {
        let rest = &bytes[at..];
        let len = if rest.len() < HEADER_BYTES {
            None
        } else {
            record::record_len(rest)
                .ok()
                .filter(|&len| len <= rest.len())
        };
        let decoded = len.map(|len| record::decode(&rest[..len], expected));
        let Some(Decoded::Record(r, n)) = decoded else {
            match damage::classify_tail(rest, at as u64, expected) {
                TailDamage::Torn => {}
                TailDamage::Followed { offset, lsn } => {
                    assert!(offset > at as u64 && offset < bytes.len() as u64);
                    assert!(lsn >= expected);
                }
            }
            return;
        };
        assert_eq!(Some(n), len);
        assert_eq!(r.lsns.first, expected);
        assert!(r.lsns.last >= r.lsns.first);
        assert!(r.group_lsn <= r.lsns.first);
        walk_group(r.payload);
        expected = r.lsns.last.next();
        at += n;
    }
}

/// Reads the segment record by record as the flusher does, up to its end or its first
/// damage, which it then locates.
fn read_records(seg: &SegmentFile, file_len: u64) {
    let Ok((mut cursor, header)) = SegmentCursor::open(seg.clone(), SPOOL) else {
        return;
    };
    assert_eq!(header.first_lsn, seg.first_lsn);
    let mut offset = segment::SEGMENT_HEADER_BYTES;
    let mut expected = seg.first_lsn;
    loop {
        match cursor.step(Lsn(u64::MAX)).expect("read the segment") {
            Step::Record(lsns) => {
                let record = cursor.record();
                assert_eq!(record.lsns, lsns);
                assert_eq!(lsns.first, expected);
                assert!(lsns.last >= lsns.first);
                assert!(record.group_lsn <= lsns.first);
                offset += (HEADER_BYTES + record.payload.len()) as u64;
                assert_eq!(cursor.offset(), offset);
                assert!(offset <= file_len);
                walk_group(record.payload);
                expected = cursor.next_lsn();
            }
            Step::End => {
                assert_eq!(offset, file_len);
                return;
            }
            Step::CaughtUp => panic!("caught up with everything durable"),
            Step::Damaged { offset: at, reason } => {
                assert_eq!(at, offset);
                assert!(at < file_len);
                assert!(!reason.to_string().is_empty());
                for torn_possible in [false, true] {
                    let found = damage::locate(seg, at, expected, &reason, None, torn_possible)
                        .expect("read the segment");
                    if let Some(found) = found {
                        assert!(found.offset < found.end && found.end <= file_len);
                        assert!(!found.to_string().is_empty());
                    } else {
                        assert!(torn_possible);
                    }
                }
                return;
            }
        }
    }
}

/// Walks a record's row group to its end: its rows are framed by their lengths, so there
/// are at most as many rows (or errors) as bytes.
fn walk_group(payload: &[u8]) {
    let Ok(group) = RowGroup::decode(payload) else {
        return;
    };
    let _ = group.table.to_string();
    let most = payload.len() + 1;
    let rows = match group.format {
        RowFormat::Copy => return,
        RowFormat::Json => group.json_rows().take(most + 1).count(),
        RowFormat::Refused => group.refused_rows().take(most + 1).count(),
    };
    assert!(
        rows <= most,
        "endless rows in a payload of {} bytes",
        payload.len()
    );
}
