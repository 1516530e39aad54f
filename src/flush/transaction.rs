//! The flush protocol in PostgreSQL: the watermark table, and one batch as one transaction.
//!
//! ```sql
//! BEGIN;
//! SET LOCAL synchronous_commit = on;                -- the WAL is deleted after COMMIT
//! COPY "schema"."table" ("c1", "c2") FROM STDIN;    -- one per (table, column set)
//! INSERT INTO pgspool.watermarks ... ON CONFLICT (spool_id) DO UPDATE
//!     SET lsn = <batch's last LSN>, record_crc = <CRC of the batch's last record>
//!     WHERE watermarks.lsn = <the watermark this session read or last committed>;
//! COMMIT;
//! ```
//! The rows and the watermark commit together or not at all, so after any crash the
//! watermark read back from PostgreSQL says exactly which rows it holds. The record CRC
//! lets a later session check that its WAL still holds that very record at that LSN.

use bytes::Bytes;
use futures::SinkExt;
use tokio_postgres::{Client, Transaction};
use uuid::Uuid;

use super::batch::{Batch, BatchGroup};
use crate::lsn::Lsn;
use crate::rowgroup::{self, RowFormat, RowGroup};
use crate::rows::{self, BodyFormat};
use crate::schema::{self, Found, SchemaCache};
use crate::table::{TableName, quote_ident};

/// Creates pgspool's schema and watermark table if they are missing.
///
/// # Errors
/// When the statements fail (for example for lack of privileges).
pub async fn bootstrap(client: &Client) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(
            "SET client_min_messages = warning; -- no NOTICEs for objects that exist
             CREATE SCHEMA IF NOT EXISTS pgspool;
             CREATE TABLE IF NOT EXISTS pgspool.watermarks (
                 spool_id   uuid PRIMARY KEY,
                 lsn        bigint NOT NULL CHECK (lsn >= 0),
                 record_crc bigint,
                 updated_at timestamptz NOT NULL DEFAULT now()
             );
             -- Tables made by builds from before the record fingerprint. Checked first:
             -- ALTER TABLE takes an exclusive lock, which would queue every flusher behind
             -- any spool's transaction in flight.
             DO $$ BEGIN
                 IF NOT EXISTS (SELECT FROM pg_attribute
                                WHERE attrelid = 'pgspool.watermarks'::regclass
                                  AND attname = 'record_crc' AND NOT attisdropped) THEN
                     ALTER TABLE pgspool.watermarks ADD COLUMN record_crc bigint;
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

/// Why a batch did not commit.
#[derive(Debug, thiserror::Error)]
pub enum FlushFailure {
    /// PostgreSQL refused a statement or the connection failed.
    #[error("{}", crate::pg::describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// The rows kept as JSON cannot be loaded yet (no such table, unknown column, bad value).
    #[error("rows for table {table}: {reason}")]
    Rows {
        /// The table as the client named it.
        table: TableName,
        /// What is wrong.
        reason: String,
    },
    /// COPY reported another row count than the batch holds: a bug, never committed.
    #[error("COPY into {table} loaded {loaded} rows, the batch holds {expected}")]
    RowCount {
        /// The table.
        table: TableName,
        /// Rows the batch holds.
        expected: u64,
        /// Rows COPY reported.
        loaded: u64,
    },
    /// The watermark in PostgreSQL is no longer the one this session read or committed:
    /// another process flushed this spool's rows meanwhile.
    #[error(
        "the watermark of spool {spool_id} in PostgreSQL moved away from LSN {expected} while \
         this batch was sent: another pgspool is flushing the same spool (a copied WAL \
         directory?); the batch is rolled back"
    )]
    WatermarkMoved {
        /// The spool.
        spool_id: Uuid,
        /// The watermark this session expected.
        expected: Lsn,
    },
}

/// Sends `batch` and its watermark in one transaction and commits it. The watermark moves
/// from `expected` (what this session read or last committed) or not at all: a
/// compare-and-swap, so two flushers of one spool (copies of one WAL directory) never both
/// load the same rows.
///
/// # Errors
/// See [`FlushFailure`]; nothing of the batch is committed then.
pub async fn commit(
    client: &mut Client,
    spool_id: Uuid,
    expected: Lsn,
    batch: Batch,
    schemas: &SchemaCache,
) -> Result<(), FlushFailure> {
    let last = batch.last_lsn();
    let record_crc = i64::from(batch.last_crc());
    let tx = client.transaction().await?;
    tx.batch_execute("SET LOCAL synchronous_commit = on")
        .await?;
    for group in batch.into_groups() {
        match group.format {
            RowFormat::Copy => {
                let columns: Vec<&str> = group.columns.iter().map(String::as_str).collect();
                copy_rows(&tx, &group.table, &columns, group.data, group.rows).await?;
            }
            RowFormat::Json => copy_json_rows(&tx, group, schemas).await?,
            // Interim, until dead letters land (the lead's flusher writes these rows to
            // pgspool.dead_letters): refused rows are logged and passed over.
            RowFormat::Refused => {
                for row in rowgroup::refused_rows(&group.data) {
                    let (text, reason) = row.map_err(|e| FlushFailure::Rows {
                        table: group.table.clone(),
                        reason: e.to_string(),
                    })?;
                    tracing::warn!(table = %group.table, row = text, reason, "passing over a row pgspool refused at ingest (?invalid=dead_letter)");
                }
            }
        }
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
                &record_crc,
                &expected.0.cast_signed(),
            ],
        )
        .await?;
    if updated != 1 {
        return Err(FlushFailure::WatermarkMoved { spool_id, expected });
    }
    tx.commit().await?;
    Ok(())
}

/// COPYs rows (COPY text lines) into `table`'s `columns`. Rows that name no column at all
/// take every default, which COPY cannot express, so they are inserted as default rows.
async fn copy_rows(
    tx: &Transaction<'_>,
    table: &TableName,
    columns: &[&str],
    data: Vec<u8>,
    rows: u64,
) -> Result<(), FlushFailure> {
    let loaded = if columns.is_empty() {
        tx.execute(
            &format!(
                "INSERT INTO {} SELECT FROM generate_series(1, $1::int8)",
                table.quoted()
            ),
            &[&rows.cast_signed()],
        )
        .await?
    } else {
        let list: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
        let statement = format!("COPY {} ({}) FROM STDIN", table.quoted(), list.join(", "));
        let sink = tx.copy_in::<_, Bytes>(&statement).await?;
        futures::pin_mut!(sink);
        sink.send(Bytes::from(data)).await?;
        sink.as_mut().finish().await?
    };
    if loaded != rows {
        return Err(FlushFailure::RowCount {
            table: table.clone(),
            expected: rows,
            loaded,
        });
    }
    Ok(())
}

/// Encodes rows kept as JSON (their table's columns were unknown at ingest) for the
/// table's columns as they are now, then COPYs them.
async fn copy_json_rows(
    tx: &Transaction<'_>,
    group: BatchGroup,
    schemas: &SchemaCache,
) -> Result<(), FlushFailure> {
    let refuse = |reason: String| FlushFailure::Rows {
        table: group.table.clone(),
        reason,
    };
    let schema = match schema::fetch(tx, &group.table).await? {
        Found::Table(schema) => schema,
        Found::Own => return Err(refuse("it is one of pgspool's own tables".into())),
        Found::Missing => return Err(refuse("the table does not exist".into())),
        Found::NotATable(kind) => return Err(refuse(format!("it is {kind}, not a table"))),
    };
    let schema = schemas.put(&group.table, schema).await;
    let mut parsed = Vec::new();
    for text in rowgroup::json_rows(&group.data) {
        let text = text.map_err(|e| refuse(e.to_string()))?;
        parsed.extend(rows::parse(text, BodyFormat::Json).map_err(|e| refuse(e.to_string()))?);
    }
    for (rows, payload) in rows::encode(&schema, &parsed).map_err(|e| refuse(e.to_string()))? {
        let encoded = RowGroup::decode(&payload).map_err(|e| refuse(e.to_string()))?;
        copy_rows(
            tx,
            &encoded.table,
            &encoded.columns,
            encoded.body.to_vec(),
            u64::from(rows),
        )
        .await?;
    }
    Ok(())
}
