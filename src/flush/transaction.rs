//! The flush protocol in PostgreSQL: pgspool's tables, and one batch as one transaction.
//!
//! ```sql
//! BEGIN;
//! SET LOCAL synchronous_commit = on;                -- the WAL is deleted after COMMIT
//! SET CONSTRAINTS ALL IMMEDIATE;                    -- a deferred check fails at its row
//! COPY "schema"."table" ("c1", "c2") FROM STDIN;    -- one per (table, column set)
//! INSERT INTO pgspool.dead_letters ...;             -- the rows PostgreSQL refused
//! INSERT INTO pgspool.held_tables ...;              -- tables a schema error holds
//! INSERT INTO pgspool.watermarks ... ON CONFLICT (spool_id) DO UPDATE
//!     SET lsn = <batch's last LSN>, record_crc = <CRC of the batch's last record>
//!     WHERE watermarks.lsn = <the watermark this session read or last committed>;
//! COMMIT;
//! ```
//! The rows, their dead letters, the holds and the watermark commit together or not at
//! all, so after any crash PostgreSQL says exactly which rows it holds: every row at or
//! below the watermark is in its table or in `pgspool.dead_letters`, except the rows of a
//! held table after its hold's LSN, which are still in the WAL. The record CRC lets a
//! later session check that its WAL still holds that very record at that LSN. How rows
//! are loaded and refused rows isolated is [`super::load`]'s part.

use std::collections::{BTreeMap, HashSet};

use tokio_postgres::{Client, Transaction};
use uuid::Uuid;

use super::batch::Batch;
use super::load::{self, DeadLetter, Hints, Learned, Refusal, Stop};
use super::prepare::{Prepared, prepare};
use crate::lsn::Lsn;
use crate::schema::SchemaCache;

/// Creates pgspool's schema and tables if they are missing: `watermarks` (one row per
/// spool), `dead_letters` (one row per refused row) and `held_tables` (one row per table
/// whose rows a schema error holds in the WAL).
///
/// # Errors
/// When the statements fail (for example for lack of privileges).
pub async fn bootstrap(client: &Client) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(
            // Each object is created only if missing: CREATE ... IF NOT EXISTS checks the
            // privilege to create it even when it exists, and a role given only its own
            // pgspool schema and tables would be refused.
            "DO $$ BEGIN
                 IF to_regnamespace('pgspool') IS NULL THEN
                     CREATE SCHEMA pgspool;
                 END IF;
                 IF to_regclass('pgspool.watermarks') IS NULL THEN
                     CREATE TABLE pgspool.watermarks (
                         spool_id   uuid PRIMARY KEY,
                         lsn        bigint NOT NULL CHECK (lsn >= 0),
                         record_crc bigint,
                         updated_at timestamptz NOT NULL DEFAULT now()
                     );
                 END IF;
                 -- Tables made by builds from before the record fingerprint. Checked
                 -- first: ALTER TABLE takes an exclusive lock, which would queue every
                 -- flusher behind any spool's transaction in flight.
                 IF NOT EXISTS (SELECT FROM pg_attribute
                                WHERE attrelid = 'pgspool.watermarks'::regclass
                                  AND attname = 'record_crc' AND NOT attisdropped) THEN
                     ALTER TABLE pgspool.watermarks ADD COLUMN record_crc bigint;
                 END IF;
                 IF to_regclass('pgspool.dead_letters') IS NULL THEN
                     CREATE TABLE pgspool.dead_letters (
                         id         bigserial PRIMARY KEY,
                         spool_id   uuid NOT NULL,
                         lsn        bigint NOT NULL,
                         table_name text NOT NULL,
                         row        text NOT NULL,
                         columns    text[],
                         copy_line  text,
                         sqlstate   text,
                         message    text NOT NULL,
                         detail     text,
                         context    text,
                         failed_at  timestamptz NOT NULL DEFAULT now(),
                         UNIQUE (spool_id, lsn)
                     );
                 END IF;
                 IF to_regclass('pgspool.held_tables') IS NULL THEN
                     CREATE TABLE pgspool.held_tables (
                         spool_id   uuid NOT NULL,
                         table_name text NOT NULL,
                         lsn        bigint NOT NULL,
                         sqlstate   text,
                         message    text NOT NULL,
                         since      timestamptz NOT NULL DEFAULT now(),
                         PRIMARY KEY (spool_id, table_name)
                     );
                 END IF;
             END $$;",
        )
        .await
}

/// A spool's watermark as committed in PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watermark {
    /// The last LSN committed (`Lsn::ZERO`: nothing yet).
    pub lsn: Lsn,
    /// CRC-32C of the WAL record that ends at `lsn`, when known.
    pub record_crc: Option<u32>,
}

/// The watermark committed for `spool_id`.
///
/// # Errors
/// When the query fails.
pub async fn read_watermark(
    client: &Client,
    spool_id: Uuid,
) -> Result<Watermark, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT lsn, record_crc FROM pgspool.watermarks WHERE spool_id = $1",
            &[&spool_id],
        )
        .await?;
    Ok(row.map_or(
        Watermark {
            lsn: Lsn::ZERO,
            record_crc: None,
        },
        |r| Watermark {
            lsn: Lsn(r.get::<_, i64>(0).cast_unsigned()),
            record_crc: r
                .get::<_, Option<i64>>(1)
                .and_then(|c| u32::try_from(c).ok()),
        },
    ))
}

/// A table whose rows after `lsn` are held in the WAL: its rows up to `lsn` are committed
/// (or dead letters), the later ones wait until the table takes rows again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    /// The table as its WAL records name it.
    pub table: String,
    /// The last LSN whose rows of this table are settled.
    pub lsn: Lsn,
    /// The error that holds it.
    pub refusal: Refusal,
}

/// The holds of `spool_id`.
///
/// # Errors
/// When the query fails.
pub async fn read_holds(
    client: &Client,
    spool_id: Uuid,
) -> Result<Vec<Hold>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT table_name, lsn, sqlstate, message FROM pgspool.held_tables
             WHERE spool_id = $1 ORDER BY lsn",
            &[&spool_id],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Hold {
            table: r.get(0),
            lsn: Lsn(r.get::<_, i64>(1).cast_unsigned()),
            refusal: Refusal {
                sqlstate: r.get(2),
                message: r.get(3),
                detail: None,
                context: None,
            },
        })
        .collect())
}

/// How many rows of `spool_id` each table has in `pgspool.dead_letters`.
///
/// # Errors
/// When the query fails.
pub async fn count_dead_letters(
    client: &Client,
    spool_id: Uuid,
) -> Result<Vec<(String, u64)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT table_name, count(*) FROM pgspool.dead_letters
             WHERE spool_id = $1 GROUP BY table_name",
            &[&spool_id],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get::<_, i64>(1).cast_unsigned()))
        .collect())
}

/// What a commit settled besides moving its watermark or hold.
#[derive(Debug, Default)]
pub struct Settled {
    /// Rows written to `pgspool.dead_letters`, in LSN order.
    pub dead_letters: Vec<DeadLetter>,
    /// Tables newly held, at the batch's expected LSN.
    pub held: Vec<Hold>,
    /// Attempts the batch took (1 without refused rows).
    pub attempts: u32,
    /// What the batch teaches the next one.
    pub hints: Hints,
    /// Rows settled per table (as its records name it): loaded, or put into dead letters.
    pub rows: BTreeMap<String, u64>,
}

/// Where a committed batch moves the spool's position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Advance {
    /// The spool's watermark moves from `expected` (what this session read or last
    /// committed) to the batch's last LSN, or nothing commits (a compare-and-swap: two
    /// flushers of one spool, copies of one WAL directory, never both load the same rows).
    /// Rows of `held` tables are left in the WAL; a table that refuses its rows for a
    /// schema reason is held from `expected` on.
    Watermark {
        /// The watermark the batch starts after.
        expected: Lsn,
        /// Tables held now.
        held: HashSet<String>,
        /// Tables to hold from this batch on, and why: their rows kept failing with
        /// transient errors at this very position.
        hold_now: Vec<(String, Refusal)>,
    },
    /// A held table catches up: its hold moves from `expected` to the batch's last LSN, or
    /// is released when that is the spool's watermark.
    Hold {
        /// The table.
        table: String,
        /// Its hold's LSN, where the batch starts after.
        expected: Lsn,
        /// Whether the batch reaches the watermark.
        release: bool,
    },
}

/// Why a batch did not commit.
#[derive(Debug, thiserror::Error)]
pub enum FlushFailure {
    /// PostgreSQL or the connection failed ([`super::classify::Class::Transient`], or a
    /// statement pgspool runs on its own tables failed).
    #[error("{}", crate::pg::describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// A table's rows failed with an error of the transient class (a statement timeout, a
    /// serialization failure a trigger raised, ...), or the connection dropped while they
    /// were sent (as it does when PostgreSQL refuses a COPY before it starts:
    /// rust-postgres/rust-postgres#1337). The rows may succeed later.
    #[error("rows of table {table}: {}", crate::pg::describe(.error))]
    InTable {
        /// The table as its records name it.
        table: String,
        /// PostgreSQL's error.
        error: tokio_postgres::Error,
    },
    /// A held table still refuses its rows.
    #[error("table {table} still refuses its rows: {refusal}")]
    StillHeld {
        /// The table.
        table: String,
        /// Why.
        refusal: Refusal,
    },
    /// The position in PostgreSQL is no longer the one this session read or committed:
    /// another process flushed this spool's rows meanwhile.
    #[error(
        "the position of spool {spool_id} in PostgreSQL moved away from LSN {expected} while \
         this batch was sent: another pgspool is flushing the same spool (a copied WAL \
         directory?); the batch is rolled back"
    )]
    PositionMoved {
        /// The spool.
        spool_id: Uuid,
        /// The position this session expected.
        expected: Lsn,
    },
    /// The refused rows could not be isolated within the attempts allowed.
    #[error("the batch up to LSN {last} failed {attempts} times while isolating refused rows")]
    Unsettled {
        /// The batch's last LSN.
        last: Lsn,
        /// Attempts made.
        attempts: u32,
    },
}

/// Most attempts of one batch: each one learns a refused row, a suspect unit, a cleared
/// suspect or a held table (see [`super::load`]); a batch that needs more keeps failing
/// and is retried with backoff.
pub const MAX_ATTEMPTS: u32 = 1_000;

/// Begins a transaction that loads rows: its COMMIT waits for PostgreSQL's WAL flush (what
/// it settles is deleted elsewhere after COMMIT), and deferred constraints are checked at
/// each row, so that a refusal names the row.
///
/// # Errors
/// When the statements fail.
pub async fn begin(client: &mut Client) -> Result<Transaction<'_>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.batch_execute("SET LOCAL synchronous_commit = on; SET CONSTRAINTS ALL IMMEDIATE")
        .await?;
    Ok(tx)
}

/// Sends `batch` in one transaction with its dead letters, holds and position (see
/// [`Advance`]) and commits it, attempting again as long as each attempt learns which rows
/// or tables PostgreSQL refuses. `hints` are what earlier batches taught (see
/// [`super::load::Hints`]); the settled batch's are returned in [`Settled::hints`].
///
/// # Errors
/// See [`FlushFailure`]; nothing of the batch is committed then.
pub async fn commit(
    client: &mut Client,
    spool_id: Uuid,
    batch: Batch,
    advance: &Advance,
    schemas: &SchemaCache,
    hints: &Hints,
) -> Result<Settled, FlushFailure> {
    let (last, record_crc) = (batch.last_lsn(), batch.last_crc());
    let Prepared {
        units,
        mut refused,
        held,
    } = prepare(client, batch.into_groups(), Some(schemas)).await?;
    let mut newly_held: Vec<Hold> = Vec::new();
    let hold_now = match advance {
        Advance::Watermark { hold_now, .. } => hold_now.clone(),
        Advance::Hold { .. } => Vec::new(),
    };
    for (table, refusal) in held.into_iter().chain(hold_now) {
        hold(advance, &mut newly_held, table, refusal)?;
    }
    for unit in &units {
        let skipped = newly_held.iter().any(|h| h.table == unit.key)
            || matches!(advance, Advance::Watermark { held, .. } if held.contains(&unit.key));
        if !skipped && let Some(refusal) = load::check_table(client, unit).await? {
            hold(advance, &mut newly_held, unit.key.clone(), refusal)?;
        }
    }
    let mut learned = Learned::from_hints(&units, hints);
    for attempt in 1..=MAX_ATTEMPTS {
        let tx = begin(client).await?;
        let skip: HashSet<&str> = newly_held
            .iter()
            .map(|h| h.table.as_str())
            .chain(match advance {
                Advance::Watermark { held, .. } => held.iter().map(String::as_str).collect(),
                Advance::Hold { .. } => Vec::new(),
            })
            .collect();
        match load::load_units(&tx, &units, &skip, &mut learned).await {
            Ok(()) => {}
            Err(Stop::Again) => continue,
            Err(Stop::Table { unit, error }) => {
                let table = units[unit].key.clone();
                hold(advance, &mut newly_held, table, Refusal::from_error(&error))?;
                continue;
            }
            Err(Stop::Failed {
                unit: Some(u),
                error,
            }) => {
                return Err(FlushFailure::InTable {
                    table: units[u].key.clone(),
                    error,
                });
            }
            Err(Stop::Failed { error, .. }) => return Err(error.into()),
        }
        refused.retain(|d| !skip.contains(d.table.as_str()));
        let mut rows = BTreeMap::new();
        for unit in units.iter().filter(|u| !skip.contains(u.key.as_str())) {
            *rows.entry(unit.key.clone()).or_default() += unit.rows();
        }
        for d in &refused {
            *rows.entry(d.table.clone()).or_default() += 1;
        }
        refused.extend(learned.dead_letters(&skip));
        refused.sort_by_key(|d| d.lsn);
        write_dead_letters(&tx, spool_id, &refused).await?;
        advance_position(&tx, spool_id, last, record_crc, advance, &newly_held).await?;
        tx.commit().await?;
        return Ok(Settled {
            dead_letters: refused,
            held: newly_held,
            attempts: attempt,
            hints: learned.hints(&units),
            rows,
        });
    }
    Err(FlushFailure::Unsettled {
        last,
        attempts: MAX_ATTEMPTS,
    })
}

/// Records that `table` refuses its rows: in a watermark batch it is held from the
/// batch's start; in a hold's own batch the hold stays and the batch fails.
fn hold(
    advance: &Advance,
    newly_held: &mut Vec<Hold>,
    table: String,
    refusal: Refusal,
) -> Result<(), FlushFailure> {
    match advance {
        Advance::Watermark { expected, .. } => {
            newly_held.push(Hold {
                table,
                lsn: *expected,
                refusal,
            });
            Ok(())
        }
        Advance::Hold { .. } => Err(FlushFailure::StillHeld { table, refusal }),
    }
}

/// Inserts the dead letters of a commit.
async fn write_dead_letters(
    tx: &Transaction<'_>,
    spool_id: Uuid,
    dead_letters: &[DeadLetter],
) -> Result<(), tokio_postgres::Error> {
    if dead_letters.is_empty() {
        return Ok(());
    }
    let statement = tx
        .prepare(
            "INSERT INTO pgspool.dead_letters
                 (spool_id, lsn, table_name, row, columns, copy_line, sqlstate, message, detail, context)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .await?;
    for d in dead_letters {
        tx.execute(
            &statement,
            &[
                &spool_id,
                &d.lsn.0.cast_signed(),
                &d.table,
                &d.row,
                &d.columns,
                &d.copy_line,
                &d.refusal.sqlstate,
                &d.refusal.message,
                &d.refusal.detail,
                &d.refusal.context,
            ],
        )
        .await?;
    }
    Ok(())
}

/// Moves the spool's watermark or a hold (see [`Advance`]), and records new holds.
async fn advance_position(
    tx: &Transaction<'_>,
    spool_id: Uuid,
    last: Lsn,
    record_crc: u32,
    advance: &Advance,
    newly_held: &[Hold],
) -> Result<(), FlushFailure> {
    let moved = |expected: Lsn| FlushFailure::PositionMoved { spool_id, expected };
    match advance {
        Advance::Watermark { expected, .. } => {
            for hold in newly_held {
                tx.execute(
                    "INSERT INTO pgspool.held_tables (spool_id, table_name, lsn, sqlstate, message)
                     VALUES ($1, $2, $3, $4, $5)",
                    &[
                        &spool_id,
                        &hold.table,
                        &hold.lsn.0.cast_signed(),
                        &hold.refusal.sqlstate,
                        &hold.refusal.message,
                    ],
                )
                .await?;
            }
            let updated = tx
                .execute(
                    "INSERT INTO pgspool.watermarks AS w (spool_id, lsn, record_crc, updated_at)
                     VALUES ($1, $2, $3, now())
                     ON CONFLICT (spool_id) DO UPDATE
                     SET lsn = EXCLUDED.lsn, record_crc = EXCLUDED.record_crc, updated_at = now()
                     WHERE w.lsn = $4",
                    &[
                        &spool_id,
                        &last.0.cast_signed(),
                        &i64::from(record_crc),
                        &expected.0.cast_signed(),
                    ],
                )
                .await?;
            if updated != 1 {
                return Err(moved(*expected));
            }
        }
        Advance::Hold {
            table,
            expected,
            release,
        } => {
            let statement = if *release {
                "DELETE FROM pgspool.held_tables
                 WHERE spool_id = $1 AND table_name = $2 AND lsn = $4 AND $3::int8 IS NOT NULL"
            } else {
                "UPDATE pgspool.held_tables SET lsn = $3
                 WHERE spool_id = $1 AND table_name = $2 AND lsn = $4"
            };
            let updated = tx
                .execute(
                    statement,
                    &[
                        &spool_id,
                        table,
                        &last.0.cast_signed(),
                        &expected.0.cast_signed(),
                    ],
                )
                .await?;
            if updated != 1 {
                return Err(moved(*expected));
            }
        }
    }
    Ok(())
}
