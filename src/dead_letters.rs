//! `pgspool dead-letters list` and `pgspool dead-letters retry`: the rows PostgreSQL
//! refused, kept in `pgspool.dead_letters` by the flusher (see [`crate::flush::transaction`]).
//!
//! Both connect to PostgreSQL directly, like the flusher, whether the daemon runs or not.
//! `retry` loads dead letters with the flusher's own code ([`prepare::prepare`],
//! [`load::check_table`], [`load::load_units`]) and settles each chunk in one transaction:
//!
//! ```sql
//! BEGIN;
//! SELECT ... FROM pgspool.dead_letters WHERE <selection> AND id > <last chunk's>
//!     ORDER BY id LIMIT <chunk, 10000 at most> FOR UPDATE SKIP LOCKED;
//! SAVEPOINT pgspool_retry;                  -- rolled back and taken again per attempt
//! COPY "schema"."table" (...) FROM STDIN;   -- as the flusher does, refused rows isolated
//! RELEASE SAVEPOINT pgspool_retry;
//! DELETE FROM pgspool.dead_letters WHERE id = ANY(<the rows that landed>);
//! UPDATE pgspool.dead_letters SET sqlstate = ..., failed_at = now() -- refused again
//! COMMIT;
//! ```
//! A row is thus in its table or in the dead letters, never both and never neither,
//! whenever retry stops. The attempts of a chunk run under a savepoint taken after the
//! `SELECT`, so the chunk stays locked (and the same) across them. A chunk that does not
//! settle within the attempts allowed (many rows refused again) is rolled back and taken
//! again at half the size, down to one row; the size doubles back after each chunk that
//! settles. Inside a chunk rows are keyed by their dead letter's id where the flusher keys
//! them by LSN: LSNs are unique per spool only.

use std::collections::{BTreeMap, HashSet};
use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::{Context, bail};
use serde::Serialize;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, IsolationLevel, Transaction};
use uuid::Uuid;

use crate::cli::{ConfigArgs, DeadLettersListArgs, DeadLettersRetryArgs};
use crate::flush::batch::BatchGroup;
use crate::flush::load::{self, DeadLetter, Learned, Refusal, Stop};
use crate::flush::prepare::{self, Prepared};
use crate::flush::transaction::{self, MAX_ATTEMPTS};
use crate::lsn::Lsn;
use crate::rowgroup::{self, RowFormat};
use crate::status::write_stdout;
use crate::table::TableName;

/// Dead letters settled per transaction.
const CHUNK: i64 = 10_000;

/// Width of the human output of `list`, in characters.
const WIDTH: usize = 100;

/// Refusals `retry` prints one by one; the rest are counted.
const SHOWN: usize = 5;

/// Which dead letters a command works on; `None` matches any.
#[derive(Debug, Default)]
struct Filter {
    table: Option<String>,
    spool: Option<Uuid>,
    lsn: Option<i64>,
    id: Option<i64>,
}

impl Filter {
    /// The condition, on parameters `$1` to `$4` ([`Filter::params`]).
    const WHERE: &'static str = "($1::text IS NULL OR table_name = $1)
        AND ($2::uuid IS NULL OR spool_id = $2)
        AND ($3::int8 IS NULL OR lsn = $3)
        AND ($4::int8 IS NULL OR id = $4)";

    fn params(&self) -> [&(dyn ToSql + Sync); 4] {
        [&self.table, &self.spool, &self.lsn, &self.id]
    }

    /// The selection in words, for messages: ` of table t, spool ...`, or nothing.
    fn describe(&self) -> String {
        let parts: Vec<String> = [
            self.table.as_ref().map(|t| format!("table {t}")),
            self.spool.map(|s| format!("spool {s}")),
            self.lsn.map(|l| format!("LSN {l}")),
            self.id.map(|i| format!("id {i}")),
        ]
        .into_iter()
        .flatten()
        .collect();
        if parts.is_empty() {
            String::new()
        } else {
            format!(" of {}", parts.join(", "))
        }
    }
}

/// What to say when `pgspool.dead_letters` does not exist.
const NO_TABLE: &str = "pgspool.dead_letters does not exist in this database: no pgspool \
                        flusher has run against it yet, so there are no dead letters";

/// Connects as `source` says (`--database-url`, `PGSPOOL_DATABASE_URL` or the config file).
async fn connect(source: &ConfigArgs) -> anyhow::Result<Client> {
    let config = source.config()?;
    config.validate()?;
    let pg = crate::pg::Target::from_config(&config.postgres)?;
    crate::pg::connect(&pg).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot connect to PostgreSQL at {}: {}",
            pg.describe(),
            crate::pg::describe(&e)
        )
    })
}

/// Whether `pgspool.dead_letters` exists.
async fn table_exists(client: &Client) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT to_regclass('pgspool.dead_letters') IS NOT NULL",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// How many dead letters `filter` selects.
async fn count(
    client: &impl tokio_postgres::GenericClient,
    filter: &Filter,
) -> anyhow::Result<i64> {
    let sql = format!(
        "SELECT count(*) FROM pgspool.dead_letters WHERE {}",
        Filter::WHERE
    );
    let row = client
        .query_one(&sql, &filter.params())
        .await
        .context("cannot count the dead letters")?;
    Ok(row.get(0))
}

/// One dead letter, every column; `--json` prints it as it is.
#[derive(Debug, Serialize)]
struct Listed {
    id: i64,
    spool_id: Uuid,
    lsn: i64,
    table_name: String,
    row: String,
    columns: Option<Vec<String>>,
    copy_line: Option<String>,
    sqlstate: Option<String>,
    message: String,
    detail: Option<String>,
    context: Option<String>,
    /// RFC 3339, UTC, to the microsecond.
    failed_at: String,
}

/// Runs `pgspool dead-letters list`.
///
/// # Errors
/// When the configuration is invalid, PostgreSQL cannot be reached, or a query fails.
pub async fn list(args: &DeadLettersListArgs) -> anyhow::Result<ExitCode> {
    let filter = Filter {
        table: args.table.clone(),
        spool: args.spool,
        ..Filter::default()
    };
    let mut client = connect(&args.source).await?;
    // Out of band in --json mode, so that stdout stays NDJSON.
    let say = |line: &str| {
        if args.json {
            eprintln!("{line}");
            Ok(())
        } else {
            write_stdout(&format!("{line}\n"))
        }
    };
    if !table_exists(&client).await? {
        say(&format!("{NO_TABLE} to list"))?;
        return Ok(ExitCode::SUCCESS);
    }
    // One snapshot, so that the total counts exactly the rows listed and those after them.
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let total = count(&tx, &filter).await?;
    let sql = format!(
        "SELECT id, spool_id, lsn, table_name, row, columns, copy_line, sqlstate, message,
                detail, context,
                to_char(failed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
         FROM pgspool.dead_letters WHERE {} ORDER BY id LIMIT $5",
        Filter::WHERE
    );
    let [p1, p2, p3, p4] = filter.params();
    let rows = tx
        .query(&sql, &[p1, p2, p3, p4, &args.limit])
        .await
        .context("cannot read the dead letters")?;
    tx.commit().await?;
    if total == 0 {
        say(&format!("no dead letters{}", filter.describe()))?;
        return Ok(ExitCode::SUCCESS);
    }
    let listed: Vec<Listed> = rows
        .iter()
        .map(|r| Listed {
            id: r.get(0),
            spool_id: r.get(1),
            lsn: r.get(2),
            table_name: r.get(3),
            row: r.get(4),
            columns: r.get(5),
            copy_line: r.get(6),
            sqlstate: r.get(7),
            message: r.get(8),
            detail: r.get(9),
            context: r.get(10),
            failed_at: r.get(11),
        })
        .collect();
    let text = if args.json {
        let mut out = String::new();
        for d in &listed {
            out.push_str(&serde_json::to_string(d)?);
            out.push('\n');
        }
        out
    } else {
        render_list(total, &listed, &filter)
    };
    write_stdout(&text)?;
    Ok(ExitCode::SUCCESS)
}

/// The human output of `list`: how many match, then per dead letter a line of id, LSN,
/// table, SQLSTATE (`-`: refused by pgspool's encoder), time and the message, cut so that
/// the line fits in [`WIDTH`] columns (but keeping 10 characters of it), and an indented
/// line with the row, cut to [`WIDTH`].
fn render_list(total: i64, listed: &[Listed], filter: &Filter) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let shown = if listed.len() as i64 == total {
        String::new()
    } else {
        format!("; the oldest {} shown (--limit N for more)", listed.len())
    };
    let _ = writeln!(
        out,
        "{total} dead letter{}{} in pgspool.dead_letters{shown}",
        if total == 1 { "" } else { "s" },
        filter.describe()
    );
    let cells: Vec<[String; 5]> = listed
        .iter()
        .map(|d| {
            [
                d.id.to_string(),
                d.lsn.to_string(),
                d.table_name.clone(),
                d.sqlstate.clone().unwrap_or_else(|| "-".to_string()),
                // 2024-05-01T12:00:00.123456Z -> 2024-05-01 12:00:00
                d.failed_at
                    .get(..19)
                    .unwrap_or(&d.failed_at)
                    .replacen('T', " ", 1),
            ]
        })
        .collect();
    let header = ["id", "lsn", "table", "sqlstate", "failed_at (UTC)"];
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            cells
                .iter()
                .map(|c| c[i].chars().count())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: [&str; 5], message: &str| {
        let mut line = String::new();
        for (cell, width) in cells.iter().zip(&widths) {
            let _ = write!(line, "{cell:<width$}  ");
        }
        let room = WIDTH.saturating_sub(line.chars().count()).max(10);
        line.push_str(&truncate(message, room));
        line.trim_end().to_string()
    };
    let _ = writeln!(out, "{}", line(header, "message"));
    for (d, c) in listed.iter().zip(&cells) {
        let _ = writeln!(
            out,
            "{}",
            line([&c[0], &c[1], &c[2], &c[3], &c[4]], &one_line(&d.message))
        );
        let _ = writeln!(
            out,
            "{}",
            truncate(&format!("    row: {}", one_line(&d.row)), WIDTH)
        );
    }
    out
}

/// `text` with line breaks and tabs as spaces.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r', '\t'], " ")
}

/// `text` cut to `width` characters, ending in `…` when cut.
fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// A dead letter taken by `retry`.
#[derive(Debug)]
struct Taken {
    id: i64,
    lsn: i64,
    table: String,
    row: String,
    columns: Option<Vec<String>>,
    copy_line: Option<String>,
}

/// What a chunk settled: the ids of the rows that landed, and the rows refused again
/// (their `lsn` is the dead letter's id).
#[derive(Debug, Default)]
struct Settled {
    landed: Vec<i64>,
    refused: Vec<DeadLetter>,
}

/// A row refused again, as `retry` reports it.
#[derive(Debug)]
struct Failure {
    id: i64,
    lsn: i64,
    table: String,
    refusal: Refusal,
}

/// What `retry` did.
#[derive(Debug, Default)]
struct RetryReport {
    landed: u64,
    refused_again: u64,
    /// The first [`SHOWN`] rows refused again.
    first_refused: Vec<Failure>,
    /// Tables that refuse every row, why, and how many of the selected dead letters are
    /// theirs.
    refusing: BTreeMap<String, (Refusal, i64)>,
}

/// Runs `pgspool dead-letters retry`.
///
/// # Errors
/// When the configuration is invalid, PostgreSQL cannot be reached or fails; chunks
/// committed before stay committed.
pub async fn retry(args: &DeadLettersRetryArgs) -> anyhow::Result<ExitCode> {
    let filter = Filter {
        table: args.table.clone(),
        spool: args.spool,
        lsn: args.lsn,
        id: args.id,
    };
    let mut client = connect(&args.source).await?;
    if !table_exists(&client).await? {
        write_stdout(&format!("{NO_TABLE} to retry\n"))?;
        return Ok(ExitCode::SUCCESS);
    }
    let total = count(&client, &filter).await?;
    if total == 0 {
        write_stdout(&format!(
            "no dead letters{}: nothing to retry\n",
            filter.describe()
        ))?;
        return Ok(ExitCode::SUCCESS);
    }
    let bar = (std::io::stderr().is_terminal() && total > CHUNK).then(|| {
        indicatif::ProgressBar::new(total.cast_unsigned()).with_style(
            indicatif::ProgressStyle::with_template(
                "retrying {wide_bar} {pos}/{len} dead letters ({elapsed})",
            )
            .expect("the template is valid"),
        )
    });
    let report = retry_selected(&mut client, &filter, args.dry_run, &|done| {
        if let Some(bar) = &bar {
            bar.inc(done);
        }
    })
    .await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let report = report?;
    write_stdout(&render_retry(&report, args.dry_run))?;
    Ok(if report.refused_again == 0 && report.refusing.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Retries the dead letters `filter` selects, chunk by chunk (see the module docs), and
/// calls `progress` with the number of dead letters of each chunk done. `dry_run` rolls
/// every chunk back instead of committing it.
async fn retry_selected(
    client: &mut Client,
    filter: &Filter,
    dry_run: bool,
    progress: &dyn Fn(u64),
) -> anyhow::Result<RetryReport> {
    let mut report = RetryReport::default();
    let mut refusing: BTreeMap<String, Refusal> = BTreeMap::new();
    let mut after = 0_i64;
    let mut chunk = CHUNK;
    loop {
        let tx = transaction::begin(client).await?;
        let taken = take_chunk(&tx, filter, after, chunk, &refusing).await?;
        let Some(last) = taken.last() else {
            break;
        };
        let Some(settled) = settle(&tx, &taken, &mut refusing).await? else {
            // Too many rows refused again to isolate in one transaction: a smaller chunk.
            tx.rollback().await?;
            if chunk == 1 {
                bail!(
                    "dead letter {} could not be settled in {MAX_ATTEMPTS} attempts; nothing \
                     of it is committed",
                    last.id
                );
            }
            chunk = (chunk / 2).max(1);
            continue;
        };
        after = last.id;
        chunk = (chunk * 2).min(CHUNK);
        write_outcome(&tx, &settled).await?;
        if dry_run {
            tx.rollback().await?;
        } else {
            tx.commit()
                .await
                .context("the COMMIT of a chunk failed: run retry again (what committed is gone from the dead letters)")?;
        }
        report.landed += settled.landed.len() as u64;
        report.refused_again += settled.refused.len() as u64;
        for d in settled
            .refused
            .iter()
            .take(SHOWN - report.first_refused.len())
        {
            let taken = taken
                .iter()
                .find(|t| t.id == d.lsn.0.cast_signed())
                .expect("a refused row is one of the chunk");
            report.first_refused.push(Failure {
                id: taken.id,
                lsn: taken.lsn,
                table: d.table.clone(),
                refusal: d.refusal.clone(),
            });
        }
        progress(taken.len() as u64);
    }
    if !refusing.is_empty() {
        let tables: Vec<&String> = refusing.keys().collect();
        let sql = format!(
            "SELECT table_name, count(*) FROM pgspool.dead_letters
             WHERE {} AND table_name = ANY($5) GROUP BY table_name",
            Filter::WHERE
        );
        let [p1, p2, p3, p4] = filter.params();
        let counts = client.query(&sql, &[p1, p2, p3, p4, &tables]).await?;
        for (table, refusal) in refusing {
            let n = counts
                .iter()
                .find(|r| r.get::<_, String>(0) == table)
                .map_or(0, |r| r.get(1));
            report.refusing.insert(table, (refusal, n));
        }
    }
    Ok(report)
}

/// Locks and reads the next chunk: the selected dead letters after id `after`, except
/// those of tables known to refuse every row; rows another retry holds are passed over.
async fn take_chunk(
    tx: &Transaction<'_>,
    filter: &Filter,
    after: i64,
    chunk: i64,
    refusing: &BTreeMap<String, Refusal>,
) -> anyhow::Result<Vec<Taken>> {
    let sql = format!(
        "SELECT id, lsn, table_name, row, columns, copy_line FROM pgspool.dead_letters
         WHERE {} AND id > $5 AND table_name <> ALL($6)
         ORDER BY id LIMIT {chunk} FOR UPDATE SKIP LOCKED",
        Filter::WHERE
    );
    let refusing: Vec<&String> = refusing.keys().collect();
    let [p1, p2, p3, p4] = filter.params();
    let rows = tx
        .query(&sql, &[p1, p2, p3, p4, &after, &refusing])
        .await
        .context("cannot read the dead letters")?;
    Ok(rows
        .iter()
        .map(|r| Taken {
            id: r.get(0),
            lsn: r.get(1),
            table: r.get(2),
            row: r.get(3),
            columns: r.get(4),
            copy_line: r.get(5),
        })
        .collect())
}

/// Loads the chunk's rows within `tx` as the flusher loads a batch, learning which rows
/// are refused again and which tables refuse every row (added to `refusing`; their rows
/// are left out). `None` when the chunk did not settle within [`MAX_ATTEMPTS`] attempts:
/// the caller rolls back and tries a smaller chunk.
async fn settle(
    tx: &Transaction<'_>,
    taken: &[Taken],
    refusing: &mut BTreeMap<String, Refusal>,
) -> anyhow::Result<Option<Settled>> {
    let (groups, mut refused) = to_groups(taken, refusing);
    let Prepared {
        units,
        refused: encoder_refused,
        held,
    } = prepare::prepare(tx.client(), groups, None).await?;
    refused.extend(encoder_refused);
    refusing.extend(held);
    for unit in &units {
        if !refusing.contains_key(&unit.key)
            && let Some(refusal) = load::check_table(tx.client(), unit).await?
        {
            refusing.insert(unit.key.clone(), refusal);
        }
    }
    let mut learned = Learned::default();
    for _ in 0..MAX_ATTEMPTS {
        tx.batch_execute("SAVEPOINT pgspool_retry").await?;
        let loaded = {
            let skip: HashSet<&str> = refusing.keys().map(String::as_str).collect();
            load::load_units(tx, &units, &skip, &mut learned).await
        };
        match loaded {
            Ok(()) => {
                tx.batch_execute("RELEASE SAVEPOINT pgspool_retry").await?;
                let skip: HashSet<&str> = refusing.keys().map(String::as_str).collect();
                refused.retain(|d| !skip.contains(d.table.as_str()));
                refused.extend(learned.dead_letters(&skip));
                refused.sort_by_key(|d| d.lsn);
                let refused_ids: HashSet<u64> = refused.iter().map(|d| d.lsn.0).collect();
                let landed = taken
                    .iter()
                    .filter(|t| {
                        !skip.contains(t.table.as_str())
                            && !refused_ids.contains(&t.id.cast_unsigned())
                    })
                    .map(|t| t.id)
                    .collect();
                return Ok(Some(Settled { landed, refused }));
            }
            Err(Stop::Again) => {}
            Err(Stop::Table { unit, error }) => {
                refusing.insert(units[unit].key.clone(), Refusal::from_error(&error));
            }
            Err(Stop::Failed { error: e, .. }) => {
                bail!(
                    "PostgreSQL failed while the dead letters were sent again: {}; nothing of \
                     this chunk is committed, run retry again",
                    crate::pg::describe(&e)
                );
            }
        }
        tx.batch_execute("ROLLBACK TO SAVEPOINT pgspool_retry")
            .await?;
    }
    Ok(None)
}

/// The chunk's dead letters as the groups of a batch: one per (table, format, columns),
/// each row keyed by its dead letter's id. Rows stored as COPY text are sent as they were;
/// rows kept as JSON are encoded by [`prepare::prepare`] for the table as it is now.
/// Returns the rows refused already (a COPY line without columns: not written by pgspool);
/// a table name pgspool cannot parse is added to `refusing`.
fn to_groups(
    taken: &[Taken],
    refusing: &mut BTreeMap<String, Refusal>,
) -> (Vec<BatchGroup>, Vec<DeadLetter>) {
    let mut groups: Vec<BatchGroup> = Vec::new();
    let mut refused = Vec::new();
    for t in taken {
        if refusing.contains_key(&t.table) {
            continue;
        }
        let table = match TableName::parse(&t.table) {
            Ok(table) => table,
            Err(e) => {
                let refusal = Refusal::by_pgspool(format!("{e}: edit table_name or delete them"));
                refusing.insert(t.table.clone(), refusal);
                continue;
            }
        };
        let (format, columns) = match (&t.copy_line, &t.columns) {
            (Some(_), Some(columns)) => (RowFormat::Copy, columns.clone()),
            (None, _) => (RowFormat::Json, Vec::new()),
            (Some(_), None) => {
                refused.push(DeadLetter {
                    lsn: Lsn(t.id.cast_unsigned()),
                    table: t.table.clone(),
                    row: t.row.clone(),
                    columns: None,
                    copy_line: t.copy_line.clone(),
                    refusal: Refusal::by_pgspool(
                        "the dead letter has a copy_line but no columns: set columns or \
                         delete it"
                            .to_string(),
                    ),
                });
                continue;
            }
        };
        let slot = match groups
            .iter()
            .position(|g| g.format == format && g.table == table && g.columns == columns)
        {
            Some(slot) => slot,
            None => {
                groups.push(BatchGroup {
                    format,
                    table,
                    columns,
                    data: Vec::new(),
                    runs: Vec::new(),
                });
                groups.len() - 1
            }
        };
        let group = &mut groups[slot];
        match &t.copy_line {
            Some(line) => {
                group.data.extend_from_slice(line.as_bytes());
                group.data.push(b'\n');
            }
            None => rowgroup::put_json_row(&mut group.data, &t.row),
        }
        let id = Lsn(t.id.cast_unsigned());
        match group.runs.last_mut() {
            Some((first, rows)) if first.0 + *rows == id.0 => *rows += 1,
            _ => group.runs.push((id, 1)),
        }
    }
    (groups, refused)
}

/// Deletes the dead letters that landed and records the new refusal of those refused
/// again.
async fn write_outcome(tx: &Transaction<'_>, settled: &Settled) -> anyhow::Result<()> {
    let deleted = tx
        .execute(
            "DELETE FROM pgspool.dead_letters WHERE id = ANY($1)",
            &[&settled.landed],
        )
        .await?;
    if deleted != settled.landed.len() as u64 {
        bail!(
            "deleted {deleted} dead letters for the {} rows that landed, although they were \
             locked: nothing of this chunk is committed",
            settled.landed.len()
        );
    }
    if settled.refused.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = settled
        .refused
        .iter()
        .map(|d| d.lsn.0.cast_signed())
        .collect();
    let column = |f: fn(&Refusal) -> Option<String>| -> Vec<Option<String>> {
        settled.refused.iter().map(|d| f(&d.refusal)).collect()
    };
    tx.execute(
        "UPDATE pgspool.dead_letters d
         SET sqlstate = u.sqlstate, message = u.message, detail = u.detail,
             context = u.context, failed_at = now()
         FROM unnest($1::int8[], $2::text[], $3::text[], $4::text[], $5::text[])
              AS u(id, sqlstate, message, detail, context)
         WHERE d.id = u.id",
        &[
            &ids,
            &column(|r| r.sqlstate.clone()),
            &column(|r| Some(r.message.clone())),
            &column(|r| r.detail.clone()),
            &column(|r| r.context.clone()),
        ],
    )
    .await?;
    Ok(())
}

/// What `retry` tells: counts, the first rows refused again, the tables still refusing.
fn render_retry(report: &RetryReport, dry_run: bool) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let retried = report.landed + report.refused_again;
    let (would, landed, refused) = if dry_run {
        ("would be ", "would land", "would be refused again")
    } else {
        ("", "landed", "refused again")
    };
    if dry_run {
        let _ = writeln!(
            out,
            "dry run: every transaction was rolled back, nothing changed"
        );
    }
    let _ = writeln!(
        out,
        "{retried} dead letter{} {would}retried: {} {landed}, {} {refused}",
        if retried == 1 { "" } else { "s" },
        report.landed,
        report.refused_again
    );
    if !report.first_refused.is_empty() {
        let _ = writeln!(
            out,
            "{refused}{}{}:",
            if report.refused_again > SHOWN as u64 {
                format!(", the first {SHOWN}")
            } else {
                String::new()
            },
            if dry_run {
                ""
            } else {
                " (they stay in pgspool.dead_letters with the new error)"
            }
        );
        for f in &report.first_refused {
            let _ = writeln!(
                out,
                "  id {} ({} LSN {}): {}",
                f.id,
                f.table,
                f.lsn,
                one_line(&f.refusal.to_string())
            );
        }
    }
    if !report.refusing.is_empty() {
        let _ = writeln!(
            out,
            "tables that still refuse every row (their dead letters are left as they are):"
        );
        for (table, (refusal, n)) in &report.refusing {
            let _ = writeln!(
                out,
                "  {table} ({n} dead letter{}): {}",
                if *n == 1 { "" } else { "s" },
                one_line(&refusal.to_string())
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(id: i64, table: &str, message: &str, row: &str) -> Listed {
        Listed {
            id,
            spool_id: Uuid::nil(),
            lsn: id * 10,
            table_name: table.to_string(),
            row: row.to_string(),
            columns: None,
            copy_line: None,
            sqlstate: (id % 2 == 0).then(|| "23514".to_string()),
            message: message.to_string(),
            detail: None,
            context: None,
            failed_at: "2025-03-04T05:06:07.123456Z".to_string(),
        }
    }

    #[test]
    fn the_list_is_aligned_and_fits_in_100_columns() {
        let long = "new row for relation \"flights\" violates check constraint \"x\" ".repeat(4);
        let rows = [
            listed(
                1,
                "public.flights",
                &long,
                &format!("{{\"note\":\"{}\"}}", "é".repeat(200)),
            ),
            listed(12346, "t", "short\nmessage", "{}"),
        ];
        let text = render_list(7, &rows, &Filter::default());
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("7 dead letters in pgspool.dead_letters; the oldest 2 shown"));
        assert!(
            lines[1].starts_with(
                "id     lsn     table           sqlstate  failed_at (UTC)      message"
            )
        );
        assert!(
            lines[2].starts_with(
                "1      10      public.flights  -         2025-03-04 05:06:07  new row"
            )
        );
        assert!(lines[2].ends_with('…'));
        assert!(lines[3].starts_with("    row: {\"note\":\"ééé"));
        assert!(lines[3].ends_with('…'));
        assert_eq!(
            lines[4],
            "12346  123460  t               23514     2025-03-04 05:06:07  short message"
        );
        assert_eq!(lines[5], "    row: {}");
        for line in lines {
            assert!(line.chars().count() <= WIDTH, "{line}");
        }
    }

    #[test]
    fn a_list_of_everything_says_so() {
        let filter = Filter {
            table: Some("t".to_string()),
            ..Filter::default()
        };
        let text = render_list(1, &[listed(3, "t", "m", "{}")], &filter);
        assert_eq!(
            text.lines().next(),
            Some("1 dead letter of table t in pgspool.dead_letters")
        );
    }

    #[test]
    fn retry_tells_counts_first_refusals_and_tables_still_refusing() {
        let refusal = |m: &str| Refusal {
            sqlstate: Some("23514".to_string()),
            message: m.to_string(),
            detail: Some("Failing row\ncontains (9)".to_string()),
            context: None,
        };
        let report = RetryReport {
            landed: 3,
            refused_again: 7,
            first_refused: (1..=SHOWN as i64)
                .map(|id| Failure {
                    id,
                    lsn: id + 100,
                    table: "public.t".to_string(),
                    refusal: refusal("violates check constraint \"c\""),
                })
                .collect(),
            refusing: BTreeMap::from([(
                "gone".to_string(),
                (refusal("relation \"gone\" does not exist"), 1),
            )]),
        };
        let text = render_retry(&report, false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "10 dead letters retried: 3 landed, 7 refused again"
        );
        assert_eq!(
            lines[1],
            "refused again, the first 5 (they stay in pgspool.dead_letters with the new error):"
        );
        assert_eq!(
            lines[2],
            "  id 1 (public.t LSN 101): violates check constraint \"c\" (SQLSTATE 23514); \
             Failing row contains (9)"
        );
        assert_eq!(lines.len(), 2 + SHOWN + 2);
        assert_eq!(
            lines[SHOWN + 3],
            "  gone (1 dead letter): relation \"gone\" does not exist (SQLSTATE 23514); \
             Failing row contains (9)"
        );
        let rehearsal = render_retry(&report, true);
        assert!(rehearsal.starts_with(
            "dry run: every transaction was rolled back, nothing changed\n\
             10 dead letters would be retried: 3 would land, 7 would be refused again\n\
             would be refused again, the first 5:\n"
        ));
    }

    #[test]
    fn copy_rows_group_by_table_and_columns_and_json_rows_by_table() {
        let taken = |id, table: &str, columns: Option<&[&str]>, line: Option<&str>| Taken {
            id,
            lsn: id,
            table: table.to_string(),
            row: "{\"a\":1}".to_string(),
            columns: columns.map(|c| c.iter().map(|s| (*s).to_string()).collect()),
            copy_line: line.map(str::to_string),
        };
        let mut refusing = BTreeMap::new();
        let (groups, refused) = to_groups(
            &[
                taken(1, "public.t", Some(&["a"]), Some("1")),
                taken(2, "public.t", Some(&["a"]), Some("2")),
                taken(4, "public.t", Some(&["a"]), Some("4")),
                taken(5, "public.t", Some(&["a", "b"]), Some("5\tx")),
                taken(6, "t", None, None),
                taken(7, "public.t", None, Some("7")),
                taken(8, "a.b.c", None, None),
            ],
            &mut refusing,
        );
        assert_eq!(groups.len(), 3);
        assert_eq!(groups[0].data, b"1\n2\n4\n");
        assert_eq!(groups[0].runs, [(Lsn(1), 2), (Lsn(4), 1)]);
        assert_eq!(groups[1].columns, ["a", "b"]);
        assert_eq!(groups[2].format, RowFormat::Json);
        let rows: Vec<&str> = rowgroup::json_rows(&groups[2].data)
            .map(|r| r.expect("a row"))
            .collect();
        assert_eq!(rows, ["{\"a\":1}"]);
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].lsn, Lsn(7));
        assert_eq!(refusing.keys().collect::<Vec<_>>(), ["a.b.c"]);
    }
}
