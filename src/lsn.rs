//! Log sequence numbers.
//!
//! Every row appended to the WAL gets the next LSN: LSNs start at 1, grow by one per row,
//! and are never reused, even after the segments holding them are deleted. A record holding
//! `n` rows covers the range `first ..= first + n - 1`. LSN 0 means "nothing": the
//! watermark of a spool that has not committed anything yet.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A log sequence number: the position of one row in the WAL (see the module docs).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The LSN before the first row: a watermark of `Lsn::ZERO` means nothing is committed.
    pub const ZERO: Lsn = Lsn(0);
    /// The LSN of the first row ever written to a WAL.
    pub const FIRST: Lsn = Lsn(1);

    /// The LSN `rows` rows after this one.
    #[must_use]
    pub fn advance(self, rows: u64) -> Lsn {
        Lsn(self.0 + rows)
    }

    /// The LSN just after this one.
    #[must_use]
    pub fn next(self) -> Lsn {
        self.advance(1)
    }

    /// The LSN just before this one (`Lsn::ZERO` stays `Lsn::ZERO`).
    #[must_use]
    pub fn prev(self) -> Lsn {
        Lsn(self.0.saturating_sub(1))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An inclusive range of LSNs, `first ..= last`; never empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LsnRange {
    /// The first row's LSN.
    pub first: Lsn,
    /// The last row's LSN (equal to `first` for a single row).
    pub last: Lsn,
}

impl LsnRange {
    /// The range of `rows` rows starting at `first`.
    ///
    /// # Panics
    /// If `rows` is 0: a range is never empty.
    #[must_use]
    pub fn starting_at(first: Lsn, rows: u64) -> LsnRange {
        assert!(rows > 0, "an LSN range holds at least one row");
        LsnRange {
            first,
            last: first.advance(rows - 1),
        }
    }

    /// Number of rows in the range.
    #[must_use]
    pub fn rows(&self) -> u64 {
        self.last.0 - self.first.0 + 1
    }
}

impl fmt::Display for LsnRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..={}", self.first, self.last)
    }
}
