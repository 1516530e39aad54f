//! WAL records: the fixed header, its checksum, and decoding from untrusted bytes.
//!
//! ```text
//! offset size field
//!      0    4 crc        CRC-32C (Castagnoli) of header bytes 4..32 followed by the payload
//!      4    4 len        payload length in bytes, at most MAX_PAYLOAD_BYTES
//!      8    8 first_lsn  LSN of the record's first row
//!     16    4 rows       rows in the record, at least 1
//!     20    1 type       1 = rows: a row group (the payload format is owned by
//!                        `crate::rowgroup`); 2 = quarantined: LSNs an operator moved
//!                        aside with `pgspool quarantine` (payload: UTF-8 note naming the
//!                        file that holds the damaged bytes)
//!     21    3 reserved   zero
//!     24    8 time_us    append time, microseconds since the Unix epoch
//!     32    8 group_lsn  first LSN of the group commit that wrote the record
//!     40  len payload
//! ```
//! All integers are little-endian. The LSN sits inside the checksummed bytes, so stale bytes
//! of an older record can never pass for the record expected at a position.
//!
//! `group_lsn` tells a torn write from damage: every record of one group commit carries the
//! same `group_lsn`, and a group is written only after the one before it was synced and
//! acknowledged. A valid record whose `group_lsn` is above a damaged LSN therefore proves
//! that the damaged record had been acknowledged; one of the same group proves nothing (see
//! `recovery::classify_tail`).

use crate::lsn::{Lsn, LsnRange};

/// Size of the fixed record header in bytes.
pub const HEADER_BYTES: usize = 40;
/// Largest payload a record may carry (64 MiB); a length above it is damage, not a record.
pub const MAX_PAYLOAD_BYTES: u32 = 64 << 20;
/// Record type of a group of rows for one table (see `crate::rowgroup`).
const TYPE_ROWS: u8 = 1;
/// Record type of a range of LSNs moved aside by `pgspool quarantine`.
const TYPE_QUARANTINED: u8 = 2;

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// Rows for one table: the payload is a row group.
    Rows,
    /// LSNs whose records were damaged and moved aside by `pgspool quarantine`: nothing to
    /// load; the payload is a note naming where the damaged bytes went.
    Quarantined,
}

/// Payloads from this length on get their CRC by combining the one computed on the ingest
/// task (`crc32c_combine`, about 10 µs measured here) instead of checksumming them again on
/// the writer thread (about 10 GB/s).
const COMBINE_ABOVE_BYTES: usize = 64 * 1024;

/// A record ready to be appended: its payload, row count and the payload's CRC-32C.
///
/// The CRC is computed by the caller (on the ingest task, in parallel) so the single WAL
/// writer only combines it with the header's.
#[derive(Debug)]
pub struct AppendRecord {
    pub(crate) kind: RecordKind,
    pub(crate) rows: u32,
    pub(crate) payload: Vec<u8>,
    pub(crate) payload_crc: u32,
}

impl AppendRecord {
    /// Wraps a payload of `rows` rows.
    ///
    /// # Panics
    /// If `rows` is 0 or the payload is longer than [`MAX_PAYLOAD_BYTES`]: callers build
    /// records from validated requests, so either is a bug.
    #[must_use]
    pub fn new(rows: u32, payload: Vec<u8>) -> AppendRecord {
        AppendRecord::of_kind(RecordKind::Rows, rows, payload)
    }

    /// A record standing for `rows` LSNs moved aside by `pgspool quarantine`; `note` says
    /// where their bytes went.
    #[must_use]
    pub fn quarantined(rows: u32, note: &str) -> AppendRecord {
        AppendRecord::of_kind(RecordKind::Quarantined, rows, note.as_bytes().to_vec())
    }

    fn of_kind(kind: RecordKind, rows: u32, payload: Vec<u8>) -> AppendRecord {
        assert!(rows > 0, "a record holds at least one row");
        assert!(
            payload.len() <= MAX_PAYLOAD_BYTES as usize,
            "record payload of {} bytes exceeds the maximum",
            payload.len()
        );
        let payload_crc = crc32c::crc32c(&payload);
        AppendRecord {
            kind,
            rows,
            payload,
            payload_crc,
        }
    }

    /// Bytes this record takes in a segment, header included.
    #[must_use]
    pub fn encoded_len(&self) -> u64 {
        (HEADER_BYTES + self.payload.len()) as u64
    }

    /// Appends header and payload to `out`, with `first_lsn` filled in and `group` stamped:
    /// the first LSN and the time of the group commit that writes the record.
    pub(crate) fn encode_into(&self, first_lsn: Lsn, group: GroupStamp, out: &mut Vec<u8>) {
        let mut header = [0u8; HEADER_BYTES];
        let len = u32::try_from(self.payload.len()).expect("checked against MAX_PAYLOAD_BYTES");
        header[4..8].copy_from_slice(&len.to_le_bytes());
        header[8..16].copy_from_slice(&first_lsn.0.to_le_bytes());
        header[16..20].copy_from_slice(&self.rows.to_le_bytes());
        header[20] = match self.kind {
            RecordKind::Rows => TYPE_ROWS,
            RecordKind::Quarantined => TYPE_QUARANTINED,
        };
        header[24..32].copy_from_slice(&group.time_us.to_le_bytes());
        header[32..40].copy_from_slice(&group.first_lsn.0.to_le_bytes());
        let header_crc = crc32c::crc32c(&header[4..]);
        // Combining costs microseconds whatever the length (GF(2) matrix products); a
        // small payload is cheaper to checksum again on the writer thread.
        let crc = if self.payload.len() < COMBINE_ABOVE_BYTES {
            crc32c::crc32c_append(header_crc, &self.payload)
        } else {
            crc32c::crc32c_combine(header_crc, self.payload_crc, self.payload.len())
        };
        header[0..4].copy_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&self.payload);
    }
}

/// The group commit a record is written in: its first LSN and its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupStamp {
    /// LSN of the group's first row.
    pub first_lsn: Lsn,
    /// When the group was written, microseconds since the Unix epoch.
    pub time_us: u64,
}

#[cfg(test)]
impl GroupStamp {
    /// The stamp of a group that starts at `lsn`, at time 0.
    pub(crate) fn at(lsn: u64) -> GroupStamp {
        GroupStamp {
            first_lsn: Lsn(lsn),
            time_us: 0,
        }
    }
}

/// A record read back from a segment; the payload borrows the reader's buffer.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// What the record holds.
    pub kind: RecordKind,
    /// The LSNs of the record's rows.
    pub lsns: LsnRange,
    /// When the record was appended, microseconds since the Unix epoch.
    pub time_us: u64,
    /// First LSN of the group commit that wrote the record.
    pub group_lsn: Lsn,
    /// The record's CRC-32C: with its LSNs, a fingerprint that tells this record from any
    /// other that ever held the same LSNs.
    pub crc: u32,
    /// The payload (a row group, see `crate::rowgroup`).
    pub payload: &'a [u8],
}

/// Why bytes at a position are not the record expected there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// Fewer bytes remain than the header or the declared payload needs.
    #[error("record truncated: {needed} bytes needed, {available} present")]
    Truncated {
        /// Bytes the record would need.
        needed: u64,
        /// Bytes present from the record's start to the end of the segment.
        available: u64,
    },
    /// The declared payload length is above [`MAX_PAYLOAD_BYTES`].
    #[error("record length {0} exceeds the maximum of {MAX_PAYLOAD_BYTES} bytes")]
    TooLong(u32),
    /// The checksum does not match the bytes.
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// CRC-32C stored in the header.
        stored: u32,
        /// CRC-32C of the bytes as read.
        computed: u32,
    },
    /// The checksum matches but the LSN is not the next one (a record from elsewhere).
    #[error("record LSN {found} where LSN {expected} was expected")]
    WrongLsn {
        /// LSN the position must hold.
        expected: Lsn,
        /// LSN the record claims.
        found: Lsn,
    },
    /// Unknown type, zero rows, LSNs past the largest one, or non-zero reserved bytes
    /// under a valid checksum.
    #[error("malformed record header: {0}")]
    Malformed(&'static str),
}

/// Outcome of decoding at one position.
#[derive(Debug)]
pub enum Decoded<'a> {
    /// A valid record and its total encoded length in bytes.
    Record(Record<'a>, usize),
    /// Not a valid record at this position.
    Invalid(Invalid),
}

/// How many bytes the record whose header starts `header` takes, header included.
///
/// Callers check this against the bytes the segment still holds before reading or
/// allocating for the payload.
///
/// # Errors
/// [`Invalid::TooLong`] for a length above [`MAX_PAYLOAD_BYTES`].
///
/// # Panics
/// If `header` is shorter than [`HEADER_BYTES`].
pub fn record_len(header: &[u8]) -> Result<usize, Invalid> {
    let len = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    if len > MAX_PAYLOAD_BYTES {
        return Err(Invalid::TooLong(len));
    }
    Ok(HEADER_BYTES + len as usize)
}

/// Decodes a whole record from `buf`, which holds at least [`record_len`] bytes, expecting
/// its first LSN to be `expected`.
#[must_use]
pub fn decode(buf: &[u8], expected: Lsn) -> Decoded<'_> {
    let len = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes")) as usize;
    let total = HEADER_BYTES + len;
    let stored = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes"));
    let computed = crc32c::crc32c(&buf[4..total]);
    if stored != computed {
        return Decoded::Invalid(Invalid::Checksum { stored, computed });
    }
    let first = Lsn(u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes")));
    let rows = u32::from_le_bytes(buf[16..20].try_into().expect("4 bytes"));
    let kind = match buf[20] {
        TYPE_ROWS => RecordKind::Rows,
        TYPE_QUARANTINED => RecordKind::Quarantined,
        _ => return Decoded::Invalid(Invalid::Malformed("unknown record type")),
    };
    if buf[21..24] != [0, 0, 0] {
        return Decoded::Invalid(Invalid::Malformed("reserved bytes are not zero"));
    }
    if rows == 0 {
        return Decoded::Invalid(Invalid::Malformed("record holds zero rows"));
    }
    if first.0.checked_add(u64::from(rows)).is_none() {
        return Decoded::Invalid(Invalid::Malformed("LSNs beyond the largest LSN"));
    }
    if first != expected {
        return Decoded::Invalid(Invalid::WrongLsn {
            expected,
            found: first,
        });
    }
    let time_us = u64::from_le_bytes(buf[24..32].try_into().expect("8 bytes"));
    let group_lsn = Lsn(u64::from_le_bytes(buf[32..40].try_into().expect("8 bytes")));
    if group_lsn > first {
        return Decoded::Invalid(Invalid::Malformed("group LSN above the record's LSN"));
    }
    Decoded::Record(
        Record {
            kind,
            lsns: LsnRange::starting_at(first, u64::from(rows)),
            time_us,
            group_lsn,
            crc: stored,
            payload: &buf[HEADER_BYTES..total],
        },
        total,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(first: u64, rows: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let group = GroupStamp {
            first_lsn: Lsn(first),
            time_us: 7,
        };
        AppendRecord::new(rows, payload.to_vec()).encode_into(Lsn(first), group, &mut out);
        out
    }

    fn decode_all(buf: &[u8], expected: Lsn) -> Result<(Record<'_>, usize), Invalid> {
        if buf.len() < HEADER_BYTES || record_len(buf)? > buf.len() {
            return Err(Invalid::Truncated {
                needed: 0,
                available: buf.len() as u64,
            });
        }
        match decode(buf, expected) {
            Decoded::Record(r, n) => Ok((r, n)),
            Decoded::Invalid(i) => Err(i),
        }
    }

    #[test]
    fn record_round_trips() {
        let buf = encoded(41, 3, b"abc\n");
        let (rec, n) = decode_all(&buf, Lsn(41)).expect("valid");
        assert_eq!(n, buf.len());
        assert_eq!(rec.lsns, LsnRange::starting_at(Lsn(41), 3));
        assert_eq!(rec.time_us, 7);
        assert_eq!(rec.payload, b"abc\n");
    }

    #[test]
    fn small_and_large_payloads_get_the_same_checksum_either_way() {
        for len in [
            0,
            1,
            COMBINE_ABOVE_BYTES - 1,
            COMBINE_ABOVE_BYTES,
            3 * COMBINE_ABOVE_BYTES,
        ] {
            let payload: Vec<u8> = (0..len.max(1)).map(|i| (i * 7 % 251) as u8).collect();
            let buf = encoded(9, 1, &payload);
            let (rec, _) = decode_all(&buf, Lsn(9)).expect("valid");
            assert_eq!(rec.payload, &payload[..], "payload of {len} bytes");
            let whole = crc32c::crc32c(&buf[4..]);
            assert_eq!(u32::from_le_bytes(buf[..4].try_into().unwrap()), whole);
        }
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let buf = encoded(5, 2, b"some payload bytes");
        for byte in 0..buf.len() {
            for bit in 0..8 {
                let mut bad = buf.clone();
                bad[byte] ^= 1 << bit;
                assert!(
                    decode_all(&bad, Lsn(5)).is_err(),
                    "flip of bit {bit} in byte {byte} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn a_valid_record_at_the_wrong_position_is_refused() {
        let buf = encoded(5, 2, b"x");
        assert_eq!(
            decode_all(&buf, Lsn(9)).unwrap_err(),
            Invalid::WrongLsn {
                expected: Lsn(9),
                found: Lsn(5)
            }
        );
    }

    /// A record under a valid checksum whose LSNs run past `u64::MAX` overflowed
    /// computing its last LSN or the next one (a panic in debug builds, wrapped LSNs in
    /// release ones). The `wal_records` fuzz target found it with a record of one row at
    /// LSN `u64::MAX` (its input is the seed `crash-lsn-max`).
    #[test]
    fn lsns_beyond_the_largest_are_refused() {
        let record = |first: u64, rows: u32| {
            let mut buf = [0u8; HEADER_BYTES + 1];
            buf[4..8].copy_from_slice(&1u32.to_le_bytes());
            buf[8..16].copy_from_slice(&first.to_le_bytes());
            buf[16..20].copy_from_slice(&rows.to_le_bytes());
            buf[20] = TYPE_ROWS;
            buf[32..40].copy_from_slice(&first.to_le_bytes());
            buf[HEADER_BYTES] = b'x';
            let crc = crc32c::crc32c(&buf[4..]);
            buf[..4].copy_from_slice(&crc.to_le_bytes());
            buf
        };
        for (first, rows) in [(u64::MAX, 1), (u64::MAX - 1, 5)] {
            assert_eq!(
                decode_all(&record(first, rows), Lsn(first)).unwrap_err(),
                Invalid::Malformed("LSNs beyond the largest LSN"),
                "{rows} rows from LSN {first}"
            );
        }
        // The last LSN there is: a record that ends at u64::MAX - 1 (the next LSN still
        // fits).
        let buf = record(u64::MAX - 1, 1);
        let (decoded, _) = decode_all(&buf, Lsn(u64::MAX - 1)).expect("valid");
        assert_eq!(decoded.lsns.last, Lsn(u64::MAX - 1));
    }

    #[test]
    fn lengths_above_the_maximum_are_refused() {
        let mut buf = encoded(1, 1, b"x");
        buf[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(record_len(&buf), Err(Invalid::TooLong(u32::MAX)));
        assert_eq!(record_len(&encoded(1, 1, b"xyz")), Ok(HEADER_BYTES + 3));
    }

    /// Decodes records one after another from the start of `buf`, as a segment cursor does,
    /// until the first invalid one; returns each with its offset.
    fn walk(buf: &[u8], first: Lsn) -> Vec<(usize, Record<'_>, usize)> {
        let (mut at, mut expected, mut out) = (0, first, Vec::new());
        while let Ok((r, n)) = decode_all(&buf[at..], expected) {
            out.push((at, r, n));
            expected = r.lsns.last.next();
            at += n;
        }
        out
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic_and_never_decode(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
            expected in 0u64..1000,
        ) {
            proptest::prop_assert!(walk(&bytes, Lsn(expected)).is_empty());
        }

        #[test]
        fn damaged_logs_decode_only_records_that_were_written(
            records in proptest::collection::vec(
                (1u32..50, proptest::collection::vec(proptest::num::u8::ANY, 0..80)),
                1..12,
            ),
            damage in proptest::collection::vec((proptest::num::usize::ANY, proptest::num::u8::ANY), 1..6),
            cut in proptest::option::of(proptest::num::usize::ANY),
        ) {
            let mut written = Vec::new();
            let mut lsn = Lsn(100);
            for (rows, payload) in &records {
                let group = GroupStamp { first_lsn: lsn, time_us: 9 };
                AppendRecord::new(*rows, payload.clone()).encode_into(lsn, group, &mut written);
                lsn = lsn.advance(u64::from(*rows));
            }
            let mut bytes = written.clone();
            for (at, value) in &damage {
                let at = at % bytes.len();
                bytes[at] = *value;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut % (bytes.len() + 1));
            }
            for (at, record, len) in walk(&bytes, Lsn(100)) {
                // Every record decoded is byte for byte one that was written, in its place.
                proptest::prop_assert_eq!(&bytes[at..at + len], &written[at..at + len]);
                proptest::prop_assert_eq!(record.group_lsn, record.lsns.first);
            }
        }
    }
}
