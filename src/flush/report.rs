//! The flusher's report: what PostgreSQL refused, kept in the WAL directory as
//! `flush-report.json`, so that `pgspool status` shows it whether the daemon runs or not.
//!
//! Written crash-atomically when something in it changes (a dead letter, a hold, a table
//! taking rows again, PostgreSQL failing or coming back), never for an ordinary commit.
//! It is a report, not state: recovery never reads it, and a lost or stale report only
//! makes `status` less informative. PostgreSQL's `pgspool.dead_letters` and
//! `pgspool.held_tables` are the truth.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::load::Refusal;
use crate::fsutil;
use crate::lsn::Lsn;

/// The report's file name in the WAL directory.
pub const FILE: &str = "flush-report.json";

/// What the flusher last reported.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FlushReport {
    /// When it was written, in µs since the Unix epoch.
    pub updated_at_us: u64,
    /// Why the last session with PostgreSQL failed, while it has not succeeded since.
    pub postgres_error: Option<String>,
    /// Per table, as its WAL records name it.
    pub tables: BTreeMap<String, TableReport>,
}

/// What the flusher reports of one table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TableReport {
    /// Rows of this spool in `pgspool.dead_letters` (counted at the session's start, then
    /// as they are added).
    pub dead_letters: u64,
    /// Set while the table refuses every row: its rows after this LSN stay in the WAL.
    pub held_after_lsn: Option<Lsn>,
    /// The last error PostgreSQL (or pgspool's encoder) gave for this table's rows.
    pub last_error: Option<TableError>,
}

/// An error met by a table's rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableError {
    /// SQLSTATE; `None` when pgspool's encoder refused the row.
    pub sqlstate: Option<String>,
    /// Message and detail.
    pub message: String,
    /// The row's LSN (a dead letter), or the LSN the table is held after.
    pub lsn: Lsn,
    /// When, in µs since the Unix epoch.
    pub at_us: u64,
}

impl TableError {
    /// The error `refusal` for the row or hold at `lsn`, now.
    #[must_use]
    pub fn new(refusal: &Refusal, lsn: Lsn) -> TableError {
        TableError {
            sqlstate: refusal.sqlstate.clone(),
            message: refusal.to_string(),
            lsn,
            at_us: fsutil::now_us(),
        }
    }
}

impl FlushReport {
    /// The report in `dir`; `None` when there is none or it cannot be read.
    #[must_use]
    pub fn read(dir: &Path) -> Option<FlushReport> {
        let bytes = std::fs::read(dir.join(FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Writes the report to `dir`, crash-atomically.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write(&mut self, dir: &Path) -> std::io::Result<()> {
        self.updated_at_us = fsutil::now_us();
        let json = serde_json::to_vec_pretty(self).expect("the report serializes");
        fsutil::write_atomic(dir, FILE, &json)
    }

    /// The entry for `table`, created empty if missing.
    pub fn table(&mut self, table: &str) -> &mut TableReport {
        self.tables.entry(table.to_string()).or_default()
    }
}
