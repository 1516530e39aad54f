//! The scenarios through pgspool: the loads (clients posting NDJSON over the Unix
//! socket), the drain of a backlog built while PostgreSQL took no rows, and the restart
//! of a killed daemon on such a backlog. Each runs a fresh daemon as a child process.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::ProgressBar;
use tokio::task::JoinSet;
use tokio_postgres::Client;
use uuid::Uuid;

use super::Ctx;
use super::daemon::{DaemonProcess, wal_bytes};
use super::direct::{ClientOutcome, Outcome, join_all};
use super::plan::LoadConfig;
use super::results::{ScenarioResult, per_second};
use crate::client::SpoolClient;

/// How long the rows may take to be committed once acknowledged.
const COMMIT_DEADLINE: Duration = Duration::from_secs(300);
/// How often the watermark is polled.
const WATERMARK_POLL: Duration = Duration::from_millis(10);
/// How often `/healthz` is polled after a restart.
const RESTART_POLL: Duration = Duration::from_millis(5);
/// The load configuration that builds the drain and restart backlogs.
const BACKLOG_LOAD: LoadConfig = LoadConfig {
    clients: 4,
    rows_per_request: 1000,
};

/// A pgspool load: a fresh daemon, `result.clients` clients posting
/// `result.rows_per_request` rows per request with `result.ack`, for at most
/// `--duration`; then the wait until PostgreSQL holds every row.
///
/// # Errors
/// When the daemon fails, a request is refused, or the check fails.
pub async fn load(cx: &Ctx<'_>, result: &mut ScenarioResult) -> anyhow::Result<()> {
    let load = LoadConfig {
        clients: result.clients.unwrap_or(1),
        rows_per_request: result.rows_per_request.unwrap_or(1),
    };
    let query = match result.ack.as_deref() {
        Some("durable") | None => String::new(),
        Some(other) => format!("ack={other}"),
    };
    cx.prepare_table().await?;
    let dir = cx.run_dir()?;
    let mut daemon = start(cx, &dir).await?;
    let spool = daemon.spool_id()?;
    let bar = cx.bar(&super::report::label(result), cx.plan.rows);
    let cpu_before = daemon.cpu_seconds()?;
    let started = Instant::now();
    let sent = send(
        cx,
        daemon.socket(),
        load,
        &query,
        cx.plan.rows,
        Some(started + cx.plan.duration),
        &bar,
    )
    .await
    .map_err(|e| with_daemon(&mut daemon, e))?;
    let acked = started.elapsed();
    result.set_rate(sent.rows, acked);
    result.set_latencies(&sent.latencies);
    bar.set_message("waiting until every row is committed");
    wait_committed(cx.client, &mut daemon, spool, sent.last_lsn).await?;
    let committed = started.elapsed();
    bar.finish_and_clear();
    result.committed_seconds = Some(committed.as_secs_f64());
    result.end_to_end_rows_per_second = Some(per_second(sent.rows, committed));
    measure(&daemon, cpu_before, sent.rows, result)?;
    daemon.terminate().await?;
    cx.check(Some(spool), sent.rows).await?;
    remove_wal(&dir)
}

/// The drain: a fresh daemon takes the backlog while a session of the bench holds an
/// ACCESS EXCLUSIVE lock on the table (PostgreSQL takes no rows); then the lock is
/// released and the time until PostgreSQL holds every row is measured.
///
/// # Errors
/// When the daemon fails, a request is refused, or the check fails.
pub async fn drain(cx: &Ctx<'_>, result: &mut ScenarioResult) -> anyhow::Result<()> {
    cx.prepare_table().await?;
    let dir = cx.run_dir()?;
    let mut daemon = start(cx, &dir).await?;
    let spool = daemon.spool_id()?;
    let cpu_before = daemon.cpu_seconds()?;
    let lock = lock_table(cx).await?;
    let rows = build_backlog(cx, &daemon, &dir, result)
        .await
        .map_err(|e| with_daemon(&mut daemon, e))?;
    let bar = cx.bar(&super::report::label(result), 0);
    bar.set_message("draining the backlog");
    let released = Instant::now();
    lock.batch_execute("COMMIT")
        .await
        .context("releasing the lock")?;
    wait_committed(cx.client, &mut daemon, spool, rows.last_lsn).await?;
    let drained = released.elapsed();
    bar.finish_and_clear();
    result.set_rate(rows.rows, drained);
    result.committed_seconds = Some(drained.as_secs_f64());
    measure(&daemon, cpu_before, rows.rows, result)?;
    daemon.terminate().await?;
    cx.check(Some(spool), rows.rows).await?;
    remove_wal(&dir)
}

/// The restart: the backlog as for the drain, then the daemon is killed (SIGKILL), the
/// lock released, and a new daemon started on the same WAL directory: the time until it
/// answers `/healthz` and until PostgreSQL holds every row.
///
/// # Errors
/// When a daemon fails, a request is refused, or the check fails.
pub async fn restart(cx: &Ctx<'_>, result: &mut ScenarioResult) -> anyhow::Result<()> {
    cx.prepare_table().await?;
    let dir = cx.run_dir()?;
    let mut daemon = start(cx, &dir).await?;
    let spool = daemon.spool_id()?;
    let lock = lock_table(cx).await?;
    let rows = build_backlog(cx, &daemon, &dir, result)
        .await
        .map_err(|e| with_daemon(&mut daemon, e))?;
    daemon.kill()?;
    lock.batch_execute("COMMIT")
        .await
        .context("releasing the lock")?;
    drop(lock);
    let bar = cx.bar(&super::report::label(result), 0);
    bar.set_message("restarting on the backlog");
    let restarted = Instant::now();
    let mut daemon = DaemonProcess::spawn(&dir, &dir.join("wal"), cx.url, cx.daemon_config())?;
    daemon.wait_ready(RESTART_POLL).await?;
    result.ready_seconds = Some(restarted.elapsed().as_secs_f64());
    wait_committed(cx.client, &mut daemon, spool, rows.last_lsn).await?;
    let drained = restarted.elapsed();
    bar.finish_and_clear();
    result.set_rate(rows.rows, drained);
    result.committed_seconds = Some(drained.as_secs_f64());
    measure(&daemon, 0.0, rows.rows, result)?;
    daemon.terminate().await?;
    cx.check(Some(spool), rows.rows).await?;
    remove_wal(&dir)
}

/// Starts a daemon on `<dir>/wal`, waits until it is ready and records its spool.
async fn start(cx: &Ctx<'_>, dir: &Path) -> anyhow::Result<DaemonProcess> {
    let mut daemon = DaemonProcess::spawn(dir, &dir.join("wal"), cx.url, cx.daemon_config())?;
    daemon.wait_ready(Duration::from_millis(10)).await?;
    cx.register_spool(daemon.spool_id()?);
    Ok(daemon)
}

/// A session holding `LOCK TABLE ... IN ACCESS EXCLUSIVE MODE` in an open transaction:
/// PostgreSQL takes no rows until it commits (or is dropped).
async fn lock_table(cx: &Ctx<'_>) -> anyhow::Result<Client> {
    let lock = crate::pg::connect(&cx.pg_config)
        .await
        .map_err(|e| anyhow::anyhow!("connecting: {}", crate::pg::describe(&e)))?;
    lock.batch_execute(&format!(
        "BEGIN; LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
        cx.table.sql_name
    ))
    .await
    .context("locking the table")?;
    Ok(lock)
}

/// Sends the backlog (4 clients × 1000 rows, durable) and records its WAL bytes and the
/// rate at which it was acknowledged.
async fn build_backlog(
    cx: &Ctx<'_>,
    daemon: &DaemonProcess,
    dir: &Path,
    result: &mut ScenarioResult,
) -> anyhow::Result<Outcome> {
    let bar = cx.bar(&super::report::label(result), cx.plan.backlog_rows);
    bar.set_message("building the backlog");
    let started = Instant::now();
    let sent = send(
        cx,
        daemon.socket(),
        BACKLOG_LOAD,
        "",
        cx.plan.backlog_rows,
        None,
        &bar,
    )
    .await?;
    bar.finish_and_clear();
    result.backlog_ack_rows_per_second = Some(per_second(sent.rows, started.elapsed()));
    result.backlog_bytes = Some(wal_bytes(&dir.join("wal"))?);
    Ok(sent)
}

/// `load.clients` tasks, each on its own keep-alive connection, take requests in order
/// from a shared counter and post them until `total` rows are sent or `deadline` passed.
async fn send(
    cx: &Ctx<'_>,
    socket: &Path,
    load: LoadConfig,
    query: &str,
    total: u64,
    deadline: Option<Instant>,
    bar: &ProgressBar,
) -> anyhow::Result<Outcome> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..load.clients {
        let mut client = SpoolClient::connect(socket).await?;
        let next = Arc::clone(&next);
        let flights = Arc::clone(&cx.flights);
        let table = cx.table.api_name.clone();
        let query = query.to_string();
        let bar = bar.clone();
        let per_request = u64::from(load.rows_per_request);
        tasks.spawn(async move {
            let mut outcome = ClientOutcome::default();
            while deadline.is_none_or(|d| Instant::now() < d) {
                let first = next.fetch_add(1, Ordering::SeqCst) * per_request + 1;
                if first > total {
                    break;
                }
                let last = (first + per_request - 1).min(total);
                let body = flights.ndjson(first, last);
                let t = Instant::now();
                let reply = client
                    .post_rows_with(&table, &query, "application/x-ndjson", body)
                    .await
                    .with_context(|| format!("posting rows {first} to {last}"))?;
                outcome.latencies.push(t.elapsed());
                if !reply.status.is_success() {
                    bail!(
                        "rows {first} to {last} were answered {}: {}",
                        reply.status,
                        reply.body
                    );
                }
                let lsn = reply.body["last_lsn"]
                    .as_u64()
                    .with_context(|| format!("an answer without last_lsn: {}", reply.body))?;
                outcome.last_lsn = outcome.last_lsn.max(lsn);
                outcome.rows += last + 1 - first;
                bar.inc(last + 1 - first);
            }
            anyhow::Ok(outcome)
        });
    }
    join_all(tasks).await
}

/// Polls `pgspool.watermarks` every 10 ms until the spool's watermark reaches `lsn`.
async fn wait_committed(
    client: &Client,
    daemon: &mut DaemonProcess,
    spool: Uuid,
    lsn: u64,
) -> anyhow::Result<()> {
    let target = i64::try_from(lsn).context("LSN out of range")?;
    let deadline = Instant::now() + COMMIT_DEADLINE;
    loop {
        let watermark = match client
            .query_opt(
                "SELECT lsn FROM pgspool.watermarks WHERE spool_id = $1",
                &[&spool],
            )
            .await
        {
            Ok(row) => row.map_or(0, |r| r.get::<_, i64>(0)),
            // The flusher has not created its tables yet.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => 0,
            Err(e) => return Err(e).context("reading the watermark"),
        };
        if watermark >= target {
            return Ok(());
        }
        daemon.check_running()?;
        if Instant::now() >= deadline {
            return Err(daemon.failure(&format!(
                "the watermark was at {watermark}, not {target}, after {} s",
                COMMIT_DEADLINE.as_secs()
            )));
        }
        tokio::time::sleep(WATERMARK_POLL).await;
    }
}

/// `e`, with the daemon's exit status and the end of its log when it no longer runs.
fn with_daemon(daemon: &mut DaemonProcess, e: anyhow::Error) -> anyhow::Error {
    match daemon.check_running() {
        Ok(()) => e,
        Err(exited) => e.context(format!("{exited:#}")),
    }
}

/// Records the daemon's CPU seconds per million rows (since `cpu_before`) and peak RSS.
fn measure(
    daemon: &DaemonProcess,
    cpu_before: f64,
    rows: u64,
    result: &mut ScenarioResult,
) -> anyhow::Result<()> {
    let cpu = daemon.cpu_seconds()? - cpu_before;
    if rows > 0 {
        result.daemon_cpu_seconds_per_million_rows = Some(cpu * 1e6 / rows as f64);
    }
    result.daemon_peak_rss_mib = Some(daemon.peak_rss_mib()?);
    Ok(())
}

/// Deletes a scenario's WAL directory (its log stays until the end of the run).
fn remove_wal(dir: &Path) -> anyhow::Result<()> {
    let wal = dir.join("wal");
    std::fs::remove_dir_all(&wal).with_context(|| format!("removing {}", wal.display()))
}
