//! `pgspool bench`: pgspool measured against writing to PostgreSQL directly, on the same
//! machine, in one run, printed as one table.
//!
//! What is measured, each scenario on an empty table (`TRUNCATE` and a best-effort
//! `CHECKPOINT` before) and ending with an exact check ([`check_exact`]: ids `1..=k`,
//! each once, for the `k` rows sent, and no dead letters):
//!
//! - **ceiling** (`direct.rs`): one `COPY FROM STDIN` of `--rows` rows made before the
//!   clock starts, in 256 KiB chunks: what a perfect buffer could reach.
//! - **floor** and **app batching** (`direct.rs`): `--connections` connections running a
//!   prepared `INSERT` of 1 or 500 rows, values as text, autocommit; the latency of each
//!   statement.
//! - **pgspool** (`spool.rs`), for each load configuration and ack level: a fresh daemon
//!   as a child process of this binary (`daemon.rs`), clients posting NDJSON over the Unix
//!   socket; the latency of each request, the ack rate, the time until the spool's
//!   watermark reaches the largest `last_lsn` acknowledged (polled every 10 ms), the
//!   daemon's CPU time (utime + stime of `/proc/<pid>/stat`, from just before the clients
//!   start until every row is committed) and its peak RSS (`VmHWM`).
//! - **drain** and **restart** (`spool.rs`): a backlog acknowledged while a session holds
//!   an ACCESS EXCLUSIVE lock on the table (an outage that works on any server), then the
//!   time to load it once the lock is released, or once a killed daemon is started again
//!   on its WAL.
//!
//! Load scenarios take requests in order from a shared counter and stop taking new ones
//! once `--duration` has passed; every request taken is finished, so the rows sent are
//! exactly ids `1..=k`. The rows come from `data.rs`; `report.rs` prints the table and
//! writes the JSON and Markdown; `goals.rs` judges the goals of issue 6.
//!
//! Everything runs in a schema `pgspool_bench_<8 hex>` dropped at the end, also on error
//! or Ctrl-C, with the `pgspool.*` rows of the spools the bench created.

mod check;
mod daemon;
mod data;
mod direct;
pub mod goals;
pub mod machine;
mod plan;
mod report;
pub mod results;
mod spool;
mod table;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio_postgres::Client;
use uuid::Uuid;

pub use check::check_exact;
pub use data::{decode_copy_field, replace_id, splice_id};
pub use plan::{LoadConfig, Plan, UsageError, zip_loads};

use crate::cli::{BenchArgs, BenchScenario};
use crate::pgtemp;
use crate::table::quote_ident;
use data::Flights;
use results::{BenchReport, ScenarioResult};
use table::BenchTable;

/// The bench was interrupted (Ctrl-C); the binary exits with 130.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

/// Runs `pgspool bench`: the scenarios of `args`, then the table, the goals and the
/// files; or, with `--from-json`, only the Markdown report of an earlier run.
///
/// # Errors
/// [`UsageError`] for bad usage, [`Interrupted`] on Ctrl-C, and an error when PostgreSQL
/// cannot be started or reached, or a scenario or its check failed (after the table).
pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if let Some(json) = &args.from_json {
        let markdown = args
            .markdown
            .as_deref()
            .context("--from-json needs --markdown")?;
        report::write_markdown(&report::read_json(json)?, markdown)?;
        println!("wrote {}", markdown.display());
        return Ok(());
    }
    let plan = Plan::from_args(args)?;
    let started_at =
        humantime_serde::re::humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    let (url, server) = pgtemp::given_or_throwaway(args.database_url.as_deref()).await?;
    let pg_config = crate::pg::Target::parse(&url, Duration::from_secs(10))?;
    let client = crate::pg::connect(&pg_config).await.map_err(|e| {
        anyhow::anyhow!("cannot connect to PostgreSQL: {}", crate::pg::describe(&e))
    })?;
    let work = tempfile::Builder::new()
        .prefix("pgsb")
        .tempdir_in("/tmp")
        .context("creating a temporary directory")?;
    let schema = format!(
        "pgspool_bench_{}",
        &Uuid::new_v4().simple().to_string()[..8]
    );
    client
        .batch_execute(&format!("CREATE SCHEMA {}", quote_ident(&schema)))
        .await
        .with_context(|| format!("creating schema {schema}"))?;
    let machine = machine::Machine::describe(&client, work.path()).await;
    let spools = Mutex::new(Vec::new());
    let env = Env {
        client: &client,
        url: &url,
        pg_config,
        schema: &schema,
        work: work.path(),
        plan: &plan,
        spools: &spools,
    };
    let mut scenarios = Vec::new();
    let outcome = tokio::select! {
        outcome = bench(&env, &mut scenarios) => outcome,
        _ = tokio::signal::ctrl_c() => Err(Interrupted.into()),
    };
    let cleaned = cleanup(&client, &schema, &spools).await;
    drop(client);
    drop(server);

    results::fill_ratios(&mut scenarios);
    let report = BenchReport {
        pgspool_version: env!("CARGO_PKG_VERSION").to_string(),
        started_at: started_at.to_string(),
        command: redacted(std::env::args()),
        goals: goals::judge(&scenarios),
        machine,
        scenarios,
    };
    if !report.scenarios.is_empty() {
        println!("\n{}", report::text(&report));
    }
    if let Some(path) = &args.json {
        report::write_json(&report, path)?;
    }
    if let Some(path) = &args.markdown {
        report::write_markdown(&report, path)?;
    }
    outcome?;
    cleaned?;
    let failed: Vec<String> = report
        .scenarios
        .iter()
        .filter(|r| !r.passed())
        .map(|r| format!("{} {}", report::label(r), r.check))
        .collect();
    if !failed.is_empty() {
        bail!("{} scenario(s) failed: {}", failed.len(), failed.join("; "));
    }
    Ok(())
}

/// The command line with the value of `--database-url` hidden (it may hold a password,
/// and the command goes into reports).
fn redacted(args: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut hide_next = false;
    args.into_iter()
        .map(|arg| {
            if std::mem::take(&mut hide_next) {
                return "<hidden>".to_string();
            }
            if arg == "--database-url" {
                hide_next = true;
            } else if arg.starts_with("--database-url=") {
                return "--database-url=<hidden>".to_string();
            }
            arg
        })
        .collect()
}

/// What the scenarios share before the rows are ready.
struct Env<'a> {
    client: &'a Client,
    url: &'a str,
    pg_config: crate::pg::Target,
    schema: &'a str,
    work: &'a Path,
    plan: &'a Plan,
    spools: &'a Mutex<Vec<Uuid>>,
}

/// What every scenario works with.
pub struct Ctx<'a> {
    client: &'a Client,
    url: &'a str,
    pg_config: crate::pg::Target,
    table: BenchTable,
    flights: Arc<Flights>,
    plan: &'a Plan,
    work: &'a Path,
    spools: &'a Mutex<Vec<Uuid>>,
    runs: AtomicUsize,
    progress: bool,
}

impl Ctx<'_> {
    /// The daemons' config file, if `--config` gave one.
    fn daemon_config(&self) -> Option<&Path> {
        self.plan.daemon_config.as_deref()
    }

    /// Empties the table, and asks for a checkpoint so that the last scenario's dirty
    /// pages are not written during this one (a role without the right skips it).
    async fn prepare_table(&self) -> anyhow::Result<()> {
        self.client
            .batch_execute(&format!("TRUNCATE {}", self.table.sql_name))
            .await
            .context("emptying the table")?;
        let _ = self.client.batch_execute("CHECKPOINT").await;
        Ok(())
    }

    /// The exact check of the rows sent.
    async fn check(&self, spool: Option<Uuid>, sent: u64) -> anyhow::Result<()> {
        check_exact(self.client, &self.table.sql_name, spool, sent).await
    }

    /// A new directory for a scenario's daemon (short: the socket's path is limited).
    fn run_dir(&self) -> anyhow::Result<PathBuf> {
        let dir = self
            .work
            .join(format!("{:02}", self.runs.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }

    /// Records a spool whose rows in pgspool's tables are deleted at the end.
    fn register_spool(&self, spool: Uuid) {
        let mut spools = self.spools.lock().unwrap_or_else(|e| e.into_inner());
        if !spools.contains(&spool) {
            spools.push(spool);
        }
    }

    /// A progress bar on a terminal, hidden elsewhere.
    fn bar(&self, prefix: &str, len: u64) -> ProgressBar {
        if !self.progress {
            return ProgressBar::hidden();
        }
        ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stdout())
            .with_style(
                ProgressStyle::with_template(
                    "{prefix:32} {bar:30} {pos}/{len} rows ({per_sec}, {elapsed}) {msg}",
                )
                .expect("the template is valid"),
            )
            .with_prefix(prefix.to_string())
    }
}

/// Prepares the rows, then runs each scenario of the plan, recording its result (a
/// failed scenario's with its error) in `results`.
async fn bench(env: &Env<'_>, results: &mut Vec<ScenarioResult>) -> anyhow::Result<()> {
    println!("preparing the rows (PostgreSQL's COPY text of the flights table) ...");
    let table = BenchTable::create(env.client, env.schema).await?;
    let needed = env.plan.rows.max(env.plan.backlog_rows);
    let flights = Arc::new(Flights::load(env.client, &table, needed).await?);
    let cx = Ctx {
        client: env.client,
        url: env.url,
        pg_config: env.pg_config.clone(),
        table,
        flights,
        plan: env.plan,
        work: env.work,
        spools: env.spools,
        runs: AtomicUsize::new(0),
        progress: std::io::stdout().is_terminal(),
    };
    let plan = env.plan;
    let connections = Some(plan.connections);
    if plan.runs(BenchScenario::Ceiling) {
        let mut r = ScenarioResult::new("ceiling");
        r.clients = Some(1);
        let outcome = direct::ceiling(&cx, &mut r).await;
        record(results, r, outcome);
    }
    for (name, rows, scenario) in [
        ("floor", 1, BenchScenario::Floor),
        ("batching", direct::BATCH_ROWS, BenchScenario::Batching),
    ] {
        if plan.runs(scenario) {
            let mut r = ScenarioResult::new(name);
            (r.clients, r.rows_per_request) = (connections, Some(rows));
            let outcome = direct::inserts(&cx, &mut r).await;
            record(results, r, outcome);
        }
    }
    if plan.runs(BenchScenario::Pgspool) {
        for load in &plan.loads {
            for &ack in &plan.acks {
                let mut r = ScenarioResult::new("pgspool");
                r.clients = Some(load.clients);
                r.rows_per_request = Some(load.rows_per_request);
                r.ack = Some(plan::ack_name(ack));
                let outcome = spool::load(&cx, &mut r).await;
                record(results, r, outcome);
            }
        }
    }
    for (name, scenario) in [
        ("drain", BenchScenario::Drain),
        ("restart", BenchScenario::Restart),
    ] {
        if plan.runs(scenario) {
            let mut r = ScenarioResult::new(name);
            (r.clients, r.rows_per_request, r.ack) = (Some(4), Some(1000), Some("durable".into()));
            let outcome = if scenario == BenchScenario::Drain {
                spool::drain(&cx, &mut r).await
            } else {
                spool::restart(&cx, &mut r).await
            };
            record(results, r, outcome);
        }
    }
    Ok(())
}

/// Records a scenario's result, with its error if it failed, and prints its line.
fn record(
    results: &mut Vec<ScenarioResult>,
    mut result: ScenarioResult,
    outcome: anyhow::Result<()>,
) {
    if let Err(e) = outcome {
        result.check = format!("{e:#}");
    }
    println!("{}", report::progress_line(&result));
    results.push(result);
}

/// Drops the bench's schema and the rows of its spools in pgspool's tables.
async fn cleanup(client: &Client, schema: &str, spools: &Mutex<Vec<Uuid>>) -> anyhow::Result<()> {
    client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            quote_ident(schema)
        ))
        .await
        .with_context(|| format!("dropping schema {schema}"))?;
    let spools = spools.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if spools.is_empty() {
        return Ok(());
    }
    for table in ["watermarks", "dead_letters", "held_tables"] {
        let exists: bool = client
            .query_one(
                &format!("SELECT to_regclass('pgspool.{table}') IS NOT NULL"),
                &[],
            )
            .await?
            .get(0);
        if exists {
            client
                .execute(
                    &format!("DELETE FROM pgspool.{table} WHERE spool_id = ANY($1)"),
                    &[&spools],
                )
                .await
                .with_context(|| format!("deleting the bench's rows of pgspool.{table}"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_url_is_hidden_in_the_command() {
        let args = [
            "pgspool",
            "bench",
            "--database-url",
            "postgres://u:secret@h/db",
            "--rows",
            "5",
        ];
        assert_eq!(
            redacted(args.map(String::from)),
            [
                "pgspool",
                "bench",
                "--database-url",
                "<hidden>",
                "--rows",
                "5"
            ]
        );
        let args = [
            "pgspool",
            "bench",
            "--database-url=postgres://u:secret@h/db",
        ];
        assert_eq!(
            redacted(args.map(String::from)),
            ["pgspool", "bench", "--database-url=<hidden>"]
        );
    }
}
