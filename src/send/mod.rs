//! `pgspool send`: the command-line client. It streams rows from a file or stdin to the
//! daemon's socket in batches, over several concurrent connections, and tells what landed.
//!
//! Three parts, each usable alone (`pgspool demo` uses the last two):
//! - readers ([`read_ndjson`], [`read_json`], [`read_csv`]) turn an input into rows, with
//!   bounded memory: one line, one array element or one CSV record at a time;
//! - a [`Batcher`] groups rows into request bodies of up to `rows_per_request` rows and
//!   hands them to a bounded channel, so reading waits while the connections are busy;
//! - [`deliver`] posts the batches from that channel over `clients` connections, retries a
//!   503 that kept nothing (`Retry-After`: the WAL is full, the daemon is stopping) with
//!   backoff, and tallies acknowledged and failed rows in a [`Report`].
//!
//! Nothing is sent twice: a request is repeated only when the daemon answered that it kept
//! nothing of it. A request that got no answer (the connection broke) is counted as failed,
//! since its rows may have been stored, and sending them again could store them twice.

mod deliver;
mod input;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::mpsc;

use crate::cli::SendArgs;
use crate::client::SpoolClient;
pub use deliver::{Delivery, Report, deliver};
pub use input::{
    Batch, Batcher, CountingReader, Layout, ProgressUnit, SendingStopped, maybe_gunzip, read_csv,
    read_json, read_ndjson,
};

/// Exit code when some rows were not acknowledged: a batch was refused or got no answer,
/// or the input could not be read to its end.
pub const EXIT_FAILED: u8 = 1;
/// Exit code when the daemon cannot be reached at all (nothing was sent).
pub const EXIT_UNREACHABLE: u8 = 2;
/// How many failure messages are printed; the rest are counted.
pub const MAX_PRINTED_FAILURES: usize = 10;
/// Retries of a request the daemon answered with 503 and `Retry-After` (or of a
/// connection that cannot be made) before it counts as failed, by default.
pub const DEFAULT_RETRIES: u32 = 8;

/// How the input is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InputFormat {
    /// One JSON object per line; blank lines are skipped.
    Ndjson,
    /// A JSON array of objects, or JSON objects one after another (pretty-printed or not).
    Json,
    /// CSV (RFC 4180) whose first record names the columns.
    Csv,
}

impl InputFormat {
    /// The format a file name implies, by its extension (after a final `.gz`): `.ndjson`
    /// and `.jsonl` NDJSON, `.json` JSON, `.csv` CSV; `None` for any other name.
    pub fn from_path(path: &Path) -> Option<InputFormat> {
        let name = path.file_name()?.to_str()?.to_ascii_lowercase();
        let name = name.strip_suffix(".gz").unwrap_or(&name);
        let extension = name.rsplit_once('.')?.1;
        match extension {
            "ndjson" | "jsonl" => Some(InputFormat::Ndjson),
            "json" => Some(InputFormat::Json),
            "csv" => Some(InputFormat::Csv),
            _ => None,
        }
    }
}

/// When the daemon answers a request (its `ack` query parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AckLevel {
    /// Once the rows are fdatasync'd in the daemon's WAL.
    Durable,
    /// Once PostgreSQL holds every row (in its table or in pgspool.dead_letters).
    Committed,
    /// Once the rows are written to the WAL, before its fdatasync.
    None,
}

/// What the daemon does with a row it cannot store (its `invalid` query parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InvalidRows {
    /// Refuse the whole request (the batch fails).
    Reject,
    /// Keep the row in pgspool.dead_letters and store the others.
    #[value(name = "dead_letter")]
    DeadLetter,
}

/// Runs `pgspool send`: reads the input, sends it, prints the summary (stdout) and the
/// failures (stderr), and returns the exit code: 0 every row acknowledged, 1 some were
/// not ([`EXIT_FAILED`]), 2 the daemon cannot be reached ([`EXIT_UNREACHABLE`]).
///
/// # Errors
/// When the input file cannot be opened.
pub async fn run(args: &SendArgs) -> anyhow::Result<ExitCode> {
    let path = args.input.as_deref().filter(|p| p.as_os_str() != "-");
    let format = args
        .format
        .or_else(|| path.and_then(InputFormat::from_path))
        .unwrap_or(InputFormat::Ndjson);
    let bytes_read = Arc::new(AtomicU64::new(0));
    let (raw, size): (Box<dyn Read + Send>, Option<u64>) = match path {
        Some(path) => {
            let file =
                File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            let size = file
                .metadata()
                .ok()
                .filter(|m| m.is_file())
                .map(|m| m.len());
            (Box::new(file), size)
        }
        None => (Box::new(io::stdin()), None),
    };
    if let Err(e) = SpoolClient::connect(&args.socket).await {
        eprintln!("pgspool: {e:#}; is the daemon running there? (--socket or PGSPOOL_SOCKET)");
        return Ok(ExitCode::from(EXIT_UNREACHABLE));
    }
    let (bar, unit) = match size {
        Some(size) => (
            ProgressBar::new(size).with_style(
                ProgressStyle::with_template(
                    "{bar:40} {binary_bytes}/{binary_total_bytes} sent ({elapsed}, {eta} left)",
                )
                .expect("the template is valid"),
            ),
            ProgressUnit::Bytes(Arc::clone(&bytes_read)),
        ),
        None => (
            ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template("{spinner} {pos} rows sent ({per_sec}, {elapsed})")
                    .expect("the template is valid"),
            ),
            ProgressUnit::Rows,
        ),
    };
    let delivery = Delivery {
        socket: args.socket.clone(),
        clients: usize::from(args.clients),
        ack: args.ack,
        invalid: args.invalid,
        retries: args.retries,
    };
    let (tx, rx) = mpsc::channel(delivery.clients * 2);
    let table = args.table.clone();
    let rows_per_request = u64::from(args.rows_per_request);
    let null = args.null.clone();
    let counter = Arc::clone(&bytes_read);
    let reader = tokio::task::spawn_blocking(move || {
        let layout = match format {
            InputFormat::Json => Layout::JsonArray,
            InputFormat::Ndjson | InputFormat::Csv => Layout::Ndjson,
        };
        let mut batcher = Batcher::new(&table, rows_per_request, layout, unit, tx);
        let read = maybe_gunzip(CountingReader::new(raw, counter))
            .context("reading the input")
            .and_then(|input| match format {
                InputFormat::Ndjson => read_ndjson(input, &mut batcher),
                InputFormat::Json => read_json(input, &mut batcher),
                InputFormat::Csv => read_csv(input, &null, &mut batcher),
            });
        // The rows read before an error in the input are sent too.
        let finished = match read {
            Err(e) if e.is::<SendingStopped>() => Err(e),
            read => batcher.finish().and(read),
        };
        (batcher.rows_read(), finished)
    });
    let report = deliver(&delivery, rx, &bar).await;
    let (rows_read, read) = reader.await.context("reading the input panicked")?;
    bar.finish_and_clear();
    let input_error = match read {
        Err(e) if !e.is::<SendingStopped>() => {
            eprintln!("pgspool: the input was not read to its end: {e:#}");
            Some(format!("{e:#}"))
        }
        _ => None,
    };
    print_summary(args, &report, rows_read, input_error.as_deref())?;
    let complete = report.batches_failed == 0 && input_error.is_none();
    Ok(if complete {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    })
}

/// Prints the summary: aligned lines, or one JSON object with `--json`.
fn print_summary(
    args: &SendArgs,
    report: &Report,
    rows_read: u64,
    input_error: Option<&str>,
) -> anyhow::Result<()> {
    let not_sent = rows_read.saturating_sub(report.rows_acknowledged + report.rows_failed);
    let ms = |q: f64| report.latency(q).as_secs_f64() * 1e3;
    if args.json {
        let summary = serde_json::json!({
            "table": args.table,
            "rows_read": rows_read,
            "rows_acknowledged": report.rows_acknowledged,
            "rows_failed": report.rows_failed,
            "rows_not_sent": not_sent,
            "rows_refused": report.rows_refused,
            "rows_committed": report.rows_committed,
            "rows_dead_lettered": report.rows_dead_lettered,
            "rows_not_committed": report.rows_not_committed,
            "batches_acknowledged": report.batches_acknowledged,
            "batches_failed": report.batches_failed,
            "seconds": report.elapsed.as_secs_f64(),
            "rows_per_second": report.rows_per_second(),
            "latency_p50_ms": ms(0.5),
            "latency_p99_ms": ms(0.99),
            "failures": report.failures,
            "input_error": input_error,
        });
        println!("{}", serde_json::to_string(&summary)?);
        return Ok(());
    }
    let mut lines = vec![
        ("rows read", rows_read.to_string()),
        (
            "acknowledged",
            format!(
                "{} rows in {} requests, {:.0} rows/s over {:.2} s; latency p50 {:.1} ms, \
                 p99 {:.1} ms",
                report.rows_acknowledged,
                report.batches_acknowledged,
                report.rows_per_second(),
                report.elapsed.as_secs_f64(),
                ms(0.5),
                ms(0.99)
            ),
        ),
        (
            "failed",
            format!(
                "{} rows in {} requests",
                report.rows_failed, report.batches_failed
            ),
        ),
    ];
    if report.failures.len() < report.batches_failed as usize {
        lines.push((
            "",
            format!(
                "(the first {} failures are printed above)",
                report.failures.len()
            ),
        ));
    }
    if not_sent > 0 {
        lines.push(("not sent", format!("{not_sent} rows")));
    }
    if args.invalid == InvalidRows::DeadLetter {
        lines.push((
            "dead letters",
            format!(
                "{} rows refused by pgspool, kept in pgspool.dead_letters",
                report.rows_refused
            ),
        ));
    }
    if args.ack == AckLevel::Committed {
        lines.push((
            "committed",
            format!(
                "{} rows in PostgreSQL, {} refused into pgspool.dead_letters, {} not yet",
                report.rows_committed, report.rows_dead_lettered, report.rows_not_committed
            ),
        ));
    }
    for (label, text) in lines {
        println!("{label:<13} {text}");
    }
    Ok(())
}
