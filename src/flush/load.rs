//! Loading rows into their tables inside the flush transaction, isolating the rows
//! PostgreSQL refuses.
//!
//! A [`Unit`] is the rows of one (table, column list) of a batch, as COPY text lines with
//! the LSN of each. The first attempt of a batch COPYs every unit whole, without
//! savepoints: that is the fast path, and the only one a batch without bad rows takes.
//! After a batch with refused rows, the next one starts with every unit suspect, and
//! what was learned of tables whose checks come at the COPY's end carries over
//! ([`Hints`]), so that a run of bad data costs fewer attempts per batch.
//!
//! When a COPY fails for a row ([`Class::Row`]), the transaction is rolled back and the
//! batch is attempted again, knowing more:
//! - a row COPY named by its `line N` context is *refused* (it will go to
//!   `pgspool.dead_letters`), and its unit becomes *suspect*;
//! - a suspect unit is loaded under savepoints: `SAVEPOINT; COPY rows; RELEASE`. When that
//!   COPY fails at line N, the savepoint is rolled back, row N is refused, the rows before
//!   it (which PostgreSQL just accepted) are sent again without a savepoint, and the rows
//!   after it get a new savepoint. An error without a line number (a foreign key or a
//!   deferred constraint, checked after the COPY's last row; an `INSERT` of default rows)
//!   is found by bisection, one savepoint per half; once a unit met one, rows before a
//!   refused line get a savepoint of their own too, since COPY's row checks no longer
//!   vouch for them;
//! - no transaction keeps more than [`MAX_SAVEPOINTS`] savepoints, and only one is open
//!   at a time: every subtransaction that writes takes a transaction id that PostgreSQL
//!   keeps in the backend's cache until the top transaction ends, and once more than 64
//!   are cached every snapshot in the cluster takes the slow path (`PGPROC_MAX_CACHED_SUBXIDS`
//!   in `src/include/storage/proc.h`). A savepoint rolled back gives its id up at once
//!   (`XidCacheRemoveRunningXids` in `RecordTransactionAbort`), so only released ones
//!   count. When the budget runs out, the transaction is rolled back and attempted again
//!   with what was learned;
//! - a suspect unit that loads whole under its savepoint is no longer suspect.
//!
//! Every attempt learns a refused row, a suspect unit or a suspect cleared, so the batch
//! commits after a bounded number of attempts; refused rows are known by LSN, so they are
//! left out of every later attempt.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use bytes::Bytes;
use futures::SinkExt;
use tokio_postgres::Transaction;
use tracing::warn;

use super::classify::{Class, classify};
use crate::lsn::Lsn;
use crate::table::{TableName, quote_ident};

/// Most savepoints one flush transaction releases (keeps) (see the module docs).
pub const MAX_SAVEPOINTS: usize = 32;

/// Why PostgreSQL (or pgspool's encoder) refused a row: what `pgspool.dead_letters` keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The SQLSTATE; `None` when pgspool's own encoder refused the row.
    pub sqlstate: Option<String>,
    /// The error message.
    pub message: String,
    /// PostgreSQL's detail, if any.
    pub detail: Option<String>,
    /// PostgreSQL's context (the COPY line and column), if any.
    pub context: Option<String>,
}

impl Refusal {
    /// The refusal `e` states (a PostgreSQL error, or the client library's message).
    #[must_use]
    pub fn from_error(e: &tokio_postgres::Error) -> Refusal {
        match e.as_db_error() {
            Some(db) => Refusal {
                sqlstate: Some(db.code().code().to_string()),
                message: db.message().to_string(),
                detail: db.detail().map(str::to_string),
                context: db.where_().map(str::to_string),
            },
            None => Refusal {
                sqlstate: None,
                message: crate::pg::describe(e),
                detail: None,
                context: None,
            },
        }
    }

    /// A refusal by pgspool itself (no SQLSTATE).
    #[must_use]
    pub fn by_pgspool(message: String) -> Refusal {
        Refusal {
            sqlstate: None,
            message,
            detail: None,
            context: None,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)?;
        if let Some(code) = &self.sqlstate {
            write!(f, " (SQLSTATE {code})")?;
        }
        if let Some(detail) = &self.detail {
            write!(f, "; {detail}")?;
        }
        Ok(())
    }
}

/// A row that goes to `pgspool.dead_letters`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The row's LSN.
    pub lsn: Lsn,
    /// The table as its WAL record names it.
    pub table: String,
    /// The row as JSON text (see ARCHITECTURE.md, "Dead letters").
    pub row: String,
    /// The COPY column list, for rows stored as COPY text.
    pub columns: Option<Vec<String>>,
    /// The COPY text line sent, for rows stored as COPY text.
    pub copy_line: Option<String>,
    /// Why it was refused.
    pub refusal: Refusal,
}

/// The rows of one (table, column list) in a batch.
#[derive(Debug)]
pub struct Unit {
    /// The table as its WAL records name it: what holds and dead letters are keyed by.
    pub key: String,
    /// The table, as resolved for SQL.
    pub table: TableName,
    /// The COPY column list; empty for rows that take every default.
    pub columns: Vec<String>,
    /// COPY text lines, each ending in `'\n'`.
    pub data: Bytes,
    /// Runs of rows in `data` order: first LSN and row count of each.
    pub runs: Vec<(Lsn, u64)>,
    /// For rows kept as JSON and encoded by the flusher: each row's JSON as the client
    /// sent it, by LSN, which is what a dead letter keeps of it. Empty for COPY rows.
    pub sent_as: HashMap<Lsn, String>,
}

impl Unit {
    /// Rows in the unit.
    #[must_use]
    pub fn rows(&self) -> u64 {
        self.runs.iter().map(|r| r.1).sum()
    }

    /// Each row's LSN and byte range in `data`.
    fn row_index(&self) -> Vec<(Lsn, Range<usize>)> {
        let mut lsns = self
            .runs
            .iter()
            .flat_map(|&(first, rows)| (0..rows).map(move |i| Lsn(first.0 + i)));
        let mut start = 0;
        let mut rows = Vec::new();
        for (i, &b) in self.data.iter().enumerate() {
            if b == b'\n' {
                let lsn = lsns.next().expect("a unit's runs count its lines");
                rows.push((lsn, start..i + 1));
                start = i + 1;
            }
        }
        rows
    }

    /// The row at `range` of `data` as a JSON object of column to COPY text value, for
    /// `pgspool.dead_letters`.
    #[must_use]
    pub fn row_json(&self, range: Range<usize>) -> String {
        crate::copy::line_to_json(&self.data[range], &self.columns)
    }
}

/// What an attempt of the batch learned, kept across its attempts.
#[derive(Debug, Default)]
pub struct Learned {
    /// Rows refused, by LSN.
    refused: HashMap<Lsn, DeadLetter>,
    /// Units (by index) to load under savepoints.
    suspect: HashSet<usize>,
    /// Units (by index) that met a refusal without a line number: one PostgreSQL checks
    /// after the COPY's last row (a foreign key), which rows COPY accepted can still fail.
    checked_at_end: HashSet<usize>,
}

/// What earlier batches taught about the next one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hints {
    /// The batch before had refused rows: expect some in this one too.
    pub refusals: bool,
    /// Tables (as their records name them) that refused rows without a line number.
    pub checked_at_end: HashSet<String>,
}

impl Learned {
    /// What `hints` say of `units` before the first attempt: with refusals expected, every
    /// unit starts suspect, so the first attempt already isolates refused rows.
    #[must_use]
    pub fn from_hints(units: &[Unit], hints: &Hints) -> Learned {
        let (mut suspect, mut checked_at_end) = (HashSet::new(), HashSet::new());
        for (u, unit) in units.iter().enumerate() {
            if hints.refusals {
                suspect.insert(u);
            }
            if hints.checked_at_end.contains(&unit.key) {
                checked_at_end.insert(u);
            }
        }
        Learned {
            refused: HashMap::new(),
            suspect,
            checked_at_end,
        }
    }

    /// What this batch teaches the next (see [`Hints`]).
    #[must_use]
    pub fn hints(&self, units: &[Unit]) -> Hints {
        Hints {
            refusals: !self.refused.is_empty(),
            checked_at_end: self
                .checked_at_end
                .iter()
                .map(|&u| units[u].key.clone())
                .collect(),
        }
    }

    /// The rows of `rows` not refused yet.
    fn live<'r>(&self, rows: &'r [(Lsn, Range<usize>)]) -> Vec<&'r (Lsn, Range<usize>)> {
        rows.iter()
            .filter(|r| !self.refused.contains_key(&r.0))
            .collect()
    }

    fn refuse(&mut self, unit: &Unit, lsn: Lsn, range: Range<usize>, e: &tokio_postgres::Error) {
        self.refused.entry(lsn).or_insert_with(|| DeadLetter {
            lsn,
            table: unit.key.clone(),
            row: unit
                .sent_as
                .get(&lsn)
                .cloned()
                .unwrap_or_else(|| unit.row_json(range.clone())),
            columns: Some(unit.columns.clone()),
            copy_line: Some(
                String::from_utf8_lossy(&unit.data[range.start..range.end - 1]).into_owned(),
            ),
            refusal: Refusal::from_error(e),
        });
    }

    /// The rows refused in the units of tables not in `skip`.
    #[must_use]
    pub fn dead_letters(&self, skip: &HashSet<&str>) -> Vec<DeadLetter> {
        self.refused
            .values()
            .filter(|d| !skip.contains(d.table.as_str()))
            .cloned()
            .collect()
    }
}

/// Why an attempt stopped before all units were loaded; the transaction must be rolled
/// back.
#[derive(Debug)]
pub enum Stop {
    /// Something was learned: attempt again.
    Again,
    /// The unit's table refuses every row ([`Class::Table`]).
    Table {
        /// Index of the unit.
        unit: usize,
        /// PostgreSQL's error.
        error: tokio_postgres::Error,
    },
    /// The server or connection failed ([`Class::Transient`]).
    Failed {
        /// The unit whose rows were being sent, if it failed then.
        unit: Option<usize>,
        /// The error.
        error: tokio_postgres::Error,
    },
}

impl Stop {
    /// A failure outside any unit's rows (a savepoint statement).
    fn failed(error: tokio_postgres::Error) -> Stop {
        Stop::Failed { unit: None, error }
    }
}

/// Loads every unit whose table is not in `skip` into its table within `tx`, leaving out the rows
/// `learned` refused, and learning more on failure (see the module docs).
///
/// # Errors
/// [`Stop`]: the transaction is aborted or must be rolled back.
pub async fn load_units(
    tx: &Transaction<'_>,
    units: &[Unit],
    skip: &HashSet<&str>,
    learned: &mut Learned,
) -> Result<(), Stop> {
    let mut savepoints = 0;
    for (u, unit) in units.iter().enumerate() {
        if skip.contains(unit.key.as_str()) {
            continue;
        }
        if learned.suspect.contains(&u) {
            let before = learned.refused.len();
            load_isolating(tx, unit, u, learned, &mut savepoints).await?;
            if learned.refused.len() == before {
                learned.suspect.remove(&u);
            }
            continue;
        }
        // The fast path sends the unit's bytes as they are, without indexing its rows.
        let rows = (!learned.refused.is_empty()).then(|| unit.row_index());
        let live = rows.as_deref().map(|rows| learned.live(rows));
        if let Err(e) = send(tx, unit, live.as_deref()).await {
            let rows = rows.unwrap_or_else(|| unit.row_index());
            let live = learned.live(&rows);
            return Err(learn(unit, u, &live, e, learned));
        }
    }
    Ok(())
}

/// What a failed COPY of `live` (without a savepoint: the transaction is aborted) teaches.
fn learn(
    unit: &Unit,
    u: usize,
    live: &[&(Lsn, Range<usize>)],
    e: tokio_postgres::Error,
    learned: &mut Learned,
) -> Stop {
    match classify(&e, &unit.table.name) {
        Class::Transient => Stop::Failed {
            unit: Some(u),
            error: e,
        },
        Class::Table => Stop::Table { unit: u, error: e },
        Class::Row { line } => {
            match line_row(line, live.len()) {
                Some(row) => {
                    let (lsn, range) = live[row].clone();
                    learned.refuse(unit, lsn, range, &e);
                }
                None => {
                    learned.checked_at_end.insert(u);
                }
            }
            learned.suspect.insert(u);
            Stop::Again
        }
    }
}

/// The 0-based index of COPY's 1-based `line` among `rows` rows, if it is one of them.
fn line_row(line: Option<u64>, rows: usize) -> Option<usize> {
    let line = usize::try_from(line?).ok()?;
    (1..=rows).contains(&line).then(|| line - 1)
}

/// Loads a suspect unit under savepoints, refusing its bad rows.
async fn load_isolating(
    tx: &Transaction<'_>,
    unit: &Unit,
    u: usize,
    learned: &mut Learned,
    savepoints: &mut usize,
) -> Result<(), Stop> {
    let rows = unit.row_index();
    let live = learned.live(&rows);
    // Parts of `live` still to load, last first. In bisection, a failed part's first half
    // is loaded before its second; when the first half loads, the second is known to fail
    // and is split without being sent whole.
    let mut pending: Vec<(Range<usize>, Part)> = Vec::with_capacity(16);
    pending.push((0..live.len(), Part::Unknown));
    while let Some((part, kind)) = pending.pop() {
        if part.is_empty() {
            continue;
        }
        if kind == Part::Fails && part.len() > 1 {
            bisect(&mut pending, part);
            continue;
        }
        if *savepoints == MAX_SAVEPOINTS {
            return Err(Stop::Again);
        }
        tx.batch_execute("SAVEPOINT pgspool_rows")
            .await
            .map_err(Stop::failed)?;
        let error = match send(tx, unit, Some(&live[part.clone()])).await {
            Ok(()) => {
                tx.batch_execute("RELEASE SAVEPOINT pgspool_rows")
                    .await
                    .map_err(Stop::failed)?;
                *savepoints += 1;
                if kind == Part::FirstHalf
                    && let Some((_, next)) = pending.last_mut()
                {
                    *next = Part::Fails;
                }
                continue;
            }
            Err(e) => e,
        };
        let line = match classify(&error, &unit.table.name) {
            Class::Transient => {
                return Err(Stop::Failed {
                    unit: Some(u),
                    error,
                });
            }
            Class::Table => return Err(Stop::Table { unit: u, error }),
            Class::Row { line } => line,
        };
        tx.batch_execute("ROLLBACK TO SAVEPOINT pgspool_rows; RELEASE SAVEPOINT pgspool_rows")
            .await
            .map_err(Stop::failed)?;
        if let Some(bad) = line_row(line, part.len()).map(|i| part.start + i) {
            let (lsn, range) = live[bad].clone();
            learned.refuse(unit, lsn, range, &error);
            pending.push((bad + 1..part.end, Part::Unknown));
            if learned.checked_at_end.contains(&u) {
                // The rows before it passed COPY's row checks only: they get a savepoint.
                pending.push((part.start..bad, Part::Unknown));
                continue;
            }
            // The rows before it were just accepted: send them again without a savepoint.
            // Should they fail now (a check at the COPY's end), the attempt ends and what
            // that teaches is kept.
            let before = &live[part.start..bad];
            if let Err(e) = send(tx, unit, Some(before)).await {
                return Err(learn(unit, u, before, e, learned));
            }
        } else {
            learned.checked_at_end.insert(u);
            if part.len() == 1 {
                let (lsn, range) = live[part.start].clone();
                learned.refuse(unit, lsn, range, &error);
            } else {
                bisect(&mut pending, part);
            }
        }
    }
    Ok(())
}

/// What is known of a part of a suspect unit before it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// Nothing.
    Unknown,
    /// The first half of a part that failed without a line number.
    FirstHalf,
    /// The second half of a failed part whose first half loaded: it holds the refused row.
    Fails,
}

/// Queues the halves of a failing `part`, first half on top.
fn bisect(pending: &mut Vec<(Range<usize>, Part)>, part: Range<usize>) {
    let mid = part.start + part.len() / 2;
    pending.push((mid..part.end, Part::Unknown));
    pending.push((part.start..mid, Part::FirstHalf));
}

/// Whether `unit`'s table takes rows now: it exists, has the unit's columns, lets this
/// role insert into them, and has no row-level security for this role (COPY FROM refuses
/// that). Asked before COPY because COPY raises these errors before
/// it enters COPY mode, where tokio-postgres loses protocol sync and drops the
/// connection (rust-postgres/rust-postgres#1337); a table dropped between this check and
/// the COPY costs a reconnect, after which the check sees it.
///
/// # Errors
/// When the query fails.
pub async fn check_table(
    client: &tokio_postgres::Client,
    unit: &Unit,
) -> Result<Option<Refusal>, tokio_postgres::Error> {
    const QUERY: &str = "
        WITH r AS (SELECT to_regclass($1) AS oid),
             missing AS (SELECT col FROM r, unnest($2::text[]) col
                         WHERE NOT EXISTS (SELECT FROM pg_attribute a
                                           WHERE a.attrelid = r.oid AND a.attname = col
                                             AND a.attnum > 0 AND NOT a.attisdropped)),
             denied AS (SELECT col FROM r, unnest($2::text[]) col
                        WHERE NOT has_column_privilege(r.oid, col, 'INSERT'))
        SELECT CASE
                 WHEN r.oid IS NULL THEN '42P01'
                 WHEN EXISTS (SELECT FROM missing) THEN '42703'
                 WHEN cardinality($2::text[]) = 0 AND NOT has_table_privilege(r.oid, 'INSERT')
                   OR EXISTS (SELECT FROM denied) THEN '42501'
                 WHEN cardinality($2::text[]) > 0 AND row_security_active(r.oid) THEN '0A000'
               END,
               (SELECT col FROM missing LIMIT 1)
        FROM r";
    let row = match client
        .query_one(QUERY, &[&unit.table.quoted(), &unit.columns])
        .await
    {
        Ok(row) => row,
        // The name itself is refused: a schema this role may not use (`to_regclass`
        // raises 42501 for it). The table refuses its rows, as its COPY would.
        Err(e) if e.as_db_error().is_some() && classify(&e, "") == Class::Table => {
            let mut refusal = Refusal::from_error(&e);
            if refusal.sqlstate.as_deref() == Some("42501") {
                refusal.message = format!(
                    "{} (pgspool's role needs USAGE on the schema of {} and INSERT on the \
                     table)",
                    refusal.message, unit.table
                );
            }
            return Ok(Some(refusal));
        }
        Err(e) => return Err(e),
    };
    let Some(sqlstate) = row.get::<_, Option<String>>(0) else {
        return Ok(None);
    };
    let message = match sqlstate.as_str() {
        "42P01" => format!("relation {} does not exist", unit.table),
        "42703" => format!(
            "column {:?} of relation {} does not exist",
            row.get::<_, Option<String>>(1).unwrap_or_default(),
            unit.table
        ),
        "0A000" => format!(
            "COPY FROM is not supported for {} while row-level security applies to this \
             role: disable it for the table, or let the role bypass it (BYPASSRLS)",
            unit.table
        ),
        _ => format!(
            "permission denied to insert into {}: grant pgspool's role INSERT on it (see \
             ARCHITECTURE.md, \"Privileges in PostgreSQL\")",
            unit.table
        ),
    };
    Ok(Some(Refusal {
        sqlstate: Some(sqlstate),
        message,
        detail: None,
        context: None,
    }))
}

/// Sends `rows` of `unit` (`None`: all of them) with one COPY, or, for rows naming no
/// column, one `INSERT` of default rows, which COPY cannot express.
async fn send(
    tx: &Transaction<'_>,
    unit: &Unit,
    rows: Option<&[&(Lsn, Range<usize>)]>,
) -> Result<(), tokio_postgres::Error> {
    let count = rows.map_or_else(|| unit.rows(), |r| r.len() as u64);
    if count == 0 {
        return Ok(());
    }
    let loaded = if unit.columns.is_empty() {
        tx.execute(
            &format!(
                "INSERT INTO {} SELECT FROM generate_series(1, $1::int8)",
                unit.table.quoted()
            ),
            &[&count.cast_signed()],
        )
        .await?
    } else {
        let list: Vec<String> = unit.columns.iter().map(|c| quote_ident(c)).collect();
        let statement = format!(
            "COPY {} ({}) FROM STDIN",
            unit.table.quoted(),
            list.join(", ")
        );
        let data = match rows {
            None => unit.data.clone(),
            Some(rows) => {
                let mut data = Vec::new();
                for (_, range) in rows {
                    data.extend_from_slice(&unit.data[range.clone()]);
                }
                Bytes::from(data)
            }
        };
        let sink = tx.copy_in::<_, Bytes>(&statement).await?;
        futures::pin_mut!(sink);
        sink.send(data).await?;
        sink.as_mut().finish().await?
    };
    if loaded != count {
        // A BEFORE INSERT trigger that returns NULL skips rows: the table owner's choice.
        warn!(
            table = %unit.table,
            sent = count,
            loaded,
            "PostgreSQL stored another number of rows than were sent (a trigger skips rows?)"
        );
    }
    Ok(())
}
