//! `?ack=committed`: requests that wait until PostgreSQL holds their rows.
//!
//! The flusher reports every commit with [`Acks::settled`]; a waiting request is answered
//! once the watermark covers its last LSN (its rows committed, or dead-lettered: the answer
//! then says which and why), or once its table is held by a schema error (the rows stay
//! in the WAL: the answer says so).

use crate::lsn::Lsn;

/// A row that a commit put into `pgspool.dead_letters` instead of its table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterAck {
    /// The row's LSN.
    pub lsn: Lsn,
    /// The row's table as its WAL record names it ([`crate::table::TableName`]'s display).
    pub table: String,
    /// PostgreSQL's SQLSTATE; `None` when pgspool's own encoder refused the row.
    pub sqlstate: Option<String>,
    /// Why the row was refused.
    pub message: String,
}

/// A table whose rows after `lsn` are held in the WAL by a schema or permission error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldTable {
    /// The table as its WAL records name it.
    pub table: String,
    /// Rows of this table up to this LSN are committed; those after it are held.
    pub lsn: Lsn,
    /// The error that holds it: SQLSTATE and message.
    pub error: String,
}

/// Requests waiting for their rows to be committed.
#[derive(Debug, Default)]
pub struct Acks {}

impl Acks {
    /// Records a commit: the watermark is now `watermark`, `dead_letters` are the rows the
    /// commit dead-lettered (sorted by LSN), `held` every table held after it.
    pub fn settled(&self, watermark: Lsn, dead_letters: &[DeadLetterAck], held: &[HeldTable]) {
        let _ = (watermark, dead_letters, held);
    }
}
