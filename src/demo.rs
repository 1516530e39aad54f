//! `pgspool demo`: the whole path on real data, checked.
//!
//! Starts a throwaway PostgreSQL (or uses `--database-url`), creates the nycflights13
//! tables in a schema of its own, runs a daemon in this process on a temporary socket and
//! WAL directory, and streams the bundled data through the socket as HTTP clients do
//! (NDJSON, several concurrent clients, with the machinery of `pgspool send`). Once every row is acknowledged and committed it
//! loads the same data again straight through PostgreSQL (`jsonb_populate_record`, not
//! pgspool's encoder) and compares the tables row for row. Then it cleans up.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::mpsc;

use crate::app::Daemon;
use crate::cli::DemoArgs;
use crate::config::Config;
use crate::dataset::{self, NYCFLIGHTS13};
use crate::pgtemp;
use crate::send::{self, AckLevel, Batcher, Delivery, InvalidRows, Layout, ProgressUnit, Report};
use crate::table::quote_ident;

/// How long the demo waits for acknowledged rows to be committed.
const COMMIT_DEADLINE: Duration = Duration::from_secs(300);

/// Runs the demo.
///
/// # Errors
/// When PostgreSQL cannot be started or reached, a request is refused, or a table does not
/// equal its source.
pub async fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let (url, server) = pgtemp::given_or_throwaway(args.database_url.as_deref()).await?;
    let pg_config = crate::pg::Target::parse(&url, Duration::from_secs(10))?;
    let client = crate::pg::connect(&pg_config).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot connect to {}: {}",
            pg_config.describe(),
            crate::pg::describe(&e)
        )
    })?;
    let schema = format!(
        "pgspool_demo_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    dataset::create_tables(&client, &schema).await?;

    let work = tempfile::Builder::new()
        .prefix("pgspool-demo")
        .tempdir_in("/tmp")
        .context("create a temporary directory")?;
    let mut config = Config::default();
    config.listen.socket = work.path().join("pgspool.sock");
    config.wal.dir = work.path().join("wal");
    config.postgres.url = Some(url.clone());
    let daemon = Daemon::start(config).await?;
    println!(
        "pgspool listening on {} (WAL in {})",
        daemon.socket().display(),
        work.path().join("wal").display()
    );

    let outcome = load_and_verify(&daemon, &client, &schema, args).await;
    let spool_id = daemon.spool_id();
    let stopped = daemon.stop().await;
    let dropped = client
        .batch_execute(&format!(
            "DROP SCHEMA {} CASCADE; DELETE FROM pgspool.watermarks WHERE spool_id = '{spool_id}'",
            quote_ident(&schema)
        ))
        .await;
    drop(server);
    outcome?;
    stopped?;
    dropped.context("dropping the demo schema")?;
    Ok(())
}

async fn load_and_verify(
    daemon: &Daemon,
    client: &tokio_postgres::Client,
    schema: &str,
    args: &DemoArgs,
) -> anyhow::Result<()> {
    let total: u64 = NYCFLIGHTS13.iter().map(|t| t.rows as u64).sum();
    println!(
        "sending {total} rows of nycflights13 ({} tables) with {} clients, {} rows per request",
        NYCFLIGHTS13.len(),
        args.clients,
        args.rows_per_request
    );
    let stats = load(daemon, schema, args, total).await?;
    let flushing = Instant::now();
    tokio::time::timeout(COMMIT_DEADLINE, daemon.wait_flushed())
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "rows were still not committed after {} s; the warnings above say why",
                COMMIT_DEADLINE.as_secs()
            )
        })?;
    let committed_after = stats.elapsed + flushing.elapsed();

    println!(
        "\n{:<10} {:>10} {:>15}  same rows as the source",
        "table", "rows sent", "in PostgreSQL"
    );
    let mut all_equal = true;
    for table in &NYCFLIGHTS13 {
        let loaded = format!("{}.{}", quote_ident(schema), quote_ident(table.name));
        let reference = format!(
            "{}.{}",
            quote_ident(schema),
            quote_ident(&format!("{}_source", table.name))
        );
        client
            .batch_execute(&format!("CREATE TABLE {reference} (LIKE {loaded})"))
            .await?;
        dataset::load_reference(client, table, &reference).await?;
        let comparison = dataset::compare(client, &loaded, &reference).await?;
        all_equal &= comparison.is_equal();
        println!(
            "{:<10} {:>10} {:>15}  {}",
            table.name,
            table.rows,
            comparison.left_rows,
            if comparison.is_equal() {
                "yes".to_string()
            } else {
                format!("NO: {comparison}")
            }
        );
    }
    println!(
        "\n{} rows acknowledged in {:.2} s: {:.0} rows/s; ack latency p50 {:.1} ms, p99 {:.1} ms",
        stats.rows_acknowledged,
        stats.elapsed.as_secs_f64(),
        stats.rows_per_second(),
        stats.latency(0.50).as_secs_f64() * 1e3,
        stats.latency(0.99).as_secs_f64() * 1e3,
    );
    println!(
        "all rows committed in PostgreSQL after {:.2} s: {:.0} rows/s end to end",
        committed_after.as_secs_f64(),
        stats.rows_acknowledged as f64 / committed_after.as_secs_f64()
    );
    if !all_equal {
        bail!("some tables differ from their source (see above)");
    }
    println!("every table equals its source: each row arrived exactly once");
    Ok(())
}

/// Streams every table through `clients` concurrent connections, with the machinery of
/// `pgspool send`.
async fn load(
    daemon: &Daemon,
    schema: &str,
    args: &DemoArgs,
    total: u64,
) -> anyhow::Result<Report> {
    let delivery = Delivery {
        socket: daemon.socket().to_path_buf(),
        clients: usize::from(args.clients),
        ack: AckLevel::Durable,
        invalid: InvalidRows::Reject,
        retries: send::DEFAULT_RETRIES,
    };
    let (tx, rx) = mpsc::channel(delivery.clients * 2);
    let rows_per_request = u64::from(args.rows_per_request);
    let schema = schema.to_string();
    let reader = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        for table in &NYCFLIGHTS13 {
            let name = format!("{schema}.{}", table.name);
            let mut batcher = Batcher::new(
                &name,
                rows_per_request,
                Layout::Ndjson,
                ProgressUnit::Rows,
                tx.clone(),
            );
            send::read_ndjson(table.reader(), &mut batcher)?;
            batcher.finish()?;
        }
        Ok(())
    });
    let bar = indicatif::ProgressBar::new(total).with_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} rows acknowledged ({per_sec}, {elapsed})",
        )
        .expect("the template is valid"),
    );
    let report = send::deliver(&delivery, rx, &bar).await;
    bar.finish();
    let read = reader.await.context("reading the data panicked")?;
    if report.batches_failed > 0 {
        bail!(
            "{} of {} requests failed (the first are printed above)",
            report.batches_failed,
            report.batches_failed + report.batches_acknowledged
        );
    }
    read?;
    Ok(report)
}
