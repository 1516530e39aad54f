//! The scenarios that write to PostgreSQL directly, the references pgspool is measured
//! against: the ceiling (one COPY) and the floor and app batching (INSERT statements over
//! several connections, autocommit).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use bytes::Bytes;
use futures::SinkExt;
use tokio::task::JoinSet;
use tokio_postgres::types::{ToSql, Type};

use super::Ctx;
use super::data::COPY_CHUNK;
use super::results::{Latencies, ScenarioResult};

/// Rows per statement of app batching.
pub const BATCH_ROWS: u32 = 500;

/// How many times the ceiling's COPY runs; the fastest counts.
pub const CEILING_RUNS: usize = 3;

/// The ceiling: the fastest of [`CEILING_RUNS`] runs of one `COPY FROM STDIN` of every row
/// into the emptied table. One COPY of about a second varies by a quarter from run to run
/// on a small shared machine; the fastest is the best a buffer could hope for, so the
/// ratios against it are the conservative ones.
///
/// # Errors
/// When PostgreSQL fails or the check does.
pub async fn ceiling(cx: &Ctx<'_>, result: &mut ScenarioResult) -> anyhow::Result<()> {
    let rows = cx.plan.rows;
    let mut fastest = Duration::MAX;
    for _ in 0..CEILING_RUNS {
        fastest = fastest.min(copy_once(cx, result, rows).await?);
    }
    result.set_rate(rows, fastest);
    cx.check(None, rows).await
}

/// One `COPY FROM STDIN` of `rows` rows into the emptied table, in chunks of about
/// 256 KiB made before the clock starts, timed from the statement to its completion. Up
/// to 1 GiB of COPY text (about 8 million rows) is made ahead; beyond that a thread keeps
/// 1 GiB made ahead while the COPY runs, so memory stays bounded whatever `--rows`.
async fn copy_once(cx: &Ctx<'_>, result: &ScenarioResult, rows: u64) -> anyhow::Result<Duration> {
    const AHEAD: usize = (1 << 30) / COPY_CHUNK;
    cx.prepare_table().await?;
    let flights = Arc::clone(&cx.flights);
    let (chunks, mut receiver) = tokio::sync::mpsc::channel::<(Bytes, u64)>(AHEAD);
    let (made, ready) = tokio::sync::oneshot::channel::<()>();
    let maker = tokio::task::spawn_blocking(move || {
        let mut made = Some(made);
        let mut chunk = Vec::with_capacity(COPY_CHUNK + 4096);
        let (mut sent, mut in_chunk) = (0, 0);
        for id in 1..=rows {
            flights.push_copy_line(id, &mut chunk);
            in_chunk += 1;
            if chunk.len() >= COPY_CHUNK || id == rows {
                let full = (Bytes::from(std::mem::take(&mut chunk)), in_chunk);
                if chunks.blocking_send(full).is_err() {
                    return; // The COPY failed.
                }
                (sent, in_chunk) = (sent + 1, 0);
                if (sent == AHEAD || id == rows)
                    && let Some(made) = made.take()
                {
                    let _ = made.send(());
                }
            }
        }
    });
    // An error means the thread ended early: the COPY below finds too few rows.
    let _ = ready.await;
    let bar = cx.bar(&super::report::label(result), rows);
    let sql = format!(
        "COPY {} ({}) FROM STDIN",
        cx.table.sql_name,
        cx.table.column_list()
    );
    let started = Instant::now();
    let sink = cx.client.copy_in::<_, Bytes>(&sql).await?;
    futures::pin_mut!(sink);
    while let Some((chunk, lines)) = receiver.recv().await {
        sink.send(chunk).await.context("sending COPY data")?;
        bar.inc(lines);
    }
    let copied = sink.finish().await.context("finishing the COPY")?;
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    maker.await.context("making the COPY text panicked")?;
    ensure!(copied == rows, "COPY loaded {copied} rows of {rows}");
    Ok(elapsed)
}

/// The floor (`rows_per_statement` 1) or app batching: `--connections` connections, each
/// running a prepared `INSERT` of `rows_per_statement` rows whose parameters are all
/// text, autocommit; rows are taken in order from a shared counter until every row is
/// sent or `--duration` has passed.
///
/// # Errors
/// When PostgreSQL fails or the check does.
pub async fn inserts(cx: &Ctx<'_>, result: &mut ScenarioResult) -> anyhow::Result<()> {
    let rows = cx.plan.rows;
    let rows_per_statement = result.rows_per_request.unwrap_or(1);
    cx.prepare_table().await?;
    let mut clients = Vec::new();
    for _ in 0..cx.plan.connections {
        let client = crate::pg::connect(&cx.pg_config)
            .await
            .map_err(|e| anyhow::anyhow!("connecting: {}", crate::pg::describe(&e)))?;
        let statement = prepare_for(&client, &cx.table, rows_per_statement as usize).await?;
        clients.push((client, statement));
    }
    let bar = cx.bar(&super::report::label(result), rows);
    let next = Arc::new(AtomicU64::new(1));
    let started = Instant::now();
    let deadline = started + cx.plan.duration;
    let mut tasks = JoinSet::new();
    for (client, statement) in clients {
        let next = Arc::clone(&next);
        let flights = Arc::clone(&cx.flights);
        let bar = bar.clone();
        let table = cx.table.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut sent = 0;
            while Instant::now() < deadline {
                let first = next.fetch_add(u64::from(rows_per_statement), Ordering::SeqCst);
                if first > rows {
                    break;
                }
                let last = (first + u64::from(rows_per_statement) - 1).min(rows);
                let mut values = Vec::new();
                for id in first..=last {
                    values.extend(flights.values(id)?);
                }
                let params: Vec<&(dyn ToSql + Sync)> =
                    values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
                let count = (last + 1 - first) as usize;
                let short;
                let statement = if count == rows_per_statement as usize {
                    &statement
                } else {
                    short = prepare_for(&client, &table, count).await?;
                    &short
                };
                let t = Instant::now();
                client
                    .execute(statement, &params)
                    .await
                    .map_err(|e| anyhow::anyhow!("INSERT: {}", crate::pg::describe(&e)))?;
                latencies.push(t.elapsed());
                sent += count as u64;
                bar.inc(count as u64);
            }
            anyhow::Ok(ClientOutcome {
                rows: sent,
                latencies,
                last_lsn: 0,
            })
        });
    }
    let outcome = join_all(tasks).await?;
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    result.set_rate(outcome.rows, elapsed);
    result.set_latencies(&outcome.latencies);
    cx.check(None, outcome.rows).await
}

/// Prepares the INSERT of `rows` rows with every parameter typed text.
async fn prepare_for(
    client: &tokio_postgres::Client,
    table: &super::table::BenchTable,
    rows: usize,
) -> anyhow::Result<tokio_postgres::Statement> {
    let types = vec![Type::TEXT; rows * table.columns.len()];
    client
        .prepare_typed(&table.insert_sql(rows), &types)
        .await
        .map_err(|e| anyhow::anyhow!("preparing the INSERT: {}", crate::pg::describe(&e)))
}

/// What one client task sent.
#[derive(Debug, Default)]
pub struct ClientOutcome {
    /// Rows sent (and acknowledged).
    pub rows: u64,
    /// Each statement's or request's latency.
    pub latencies: Vec<Duration>,
    /// The largest `last_lsn` of the daemon's answers (0 for PostgreSQL).
    pub last_lsn: u64,
}

/// What every client task sent, together.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Rows sent (and acknowledged).
    pub rows: u64,
    /// Every statement's or request's latency.
    pub latencies: Latencies,
    /// The largest `last_lsn` of the daemon's answers (0 for PostgreSQL).
    pub last_lsn: u64,
}

/// Waits for every task; the first error aborts the others.
///
/// # Errors
/// The first task's error.
pub async fn join_all(
    mut tasks: JoinSet<anyhow::Result<ClientOutcome>>,
) -> anyhow::Result<Outcome> {
    let mut rows = 0;
    let mut last_lsn = 0;
    let mut all = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let outcome = joined
            .context("a client task panicked")
            .and_then(|outcome| outcome);
        match outcome {
            Ok(outcome) => {
                rows += outcome.rows;
                last_lsn = last_lsn.max(outcome.last_lsn);
                all.extend(outcome.latencies);
            }
            Err(e) => {
                tasks.abort_all();
                return Err(e);
            }
        }
    }
    Ok(Outcome {
        rows,
        latencies: Latencies::new(all),
        last_lsn,
    })
}
