//! `pgspool send`: the command-line client. It streams rows from a file or stdin to the
//! daemon's socket in batches, over several concurrent connections, and tells what landed.
//!
//! Three parts, each usable alone (`pgspool demo` uses the last two):
//! - readers ([`read_ndjson`], [`read_json`], [`read_csv`]) turn an input into rows, with
//!   bounded memory: one line, one array element or one CSV record at a time;
//! - a [`BatchBuilder`] groups rows into request bodies of up to `rows_per_request` rows
//!   and `max_request_bytes` bytes; [`gather`] runs it on rows a reader hands over from its
//!   blocking thread, and sends a partial batch once it has waited `max_wait` (a
//!   [`Batcher`] runs it on the reader's thread); both hand batches to a bounded channel,
//!   so reading waits while the connections are busy;
//! - [`deliver`] posts the batches from that channel over `clients` connections, retries a
//!   503 that kept nothing (`Retry-After`: the WAL is full, the daemon is stopping) with
//!   backoff, and tallies acknowledged, failed and unsent rows in a [`Report`].
//!
//! Nothing is sent twice: a request is repeated only when the daemon answered that it kept
//! nothing of it. A request that got no answer (the connection broke) is counted as failed,
//! since its rows may have been stored, and sending them again could store them twice.
//!
//! SIGINT or SIGTERM stops the reading; the rows read are sent, for up to
//! [`INTERRUPT_GRACE`], and the summary says so. A second signal exits at once.

mod batch;
mod deliver;
mod input;
mod report;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::cli::SendArgs;
use crate::client::SpoolClient;
pub use batch::{
    Batch, BatchBuilder, Batcher, DEFAULT_MAX_REQUEST_BYTES, Gathered, Layout, ProgressUnit, gather,
};
pub use deliver::{Delivery, deliver, deliver_until};
pub use input::{
    CountingReader, RowSink, SendingStopped, maybe_gunzip, read_csv, read_json, read_ndjson,
    skip_bom,
};
pub use report::{Failure, Fate, Report};

/// Exit code when some rows were not acknowledged: a batch was refused or got no answer,
/// or the input could not be read to its end.
pub const EXIT_FAILED: u8 = 1;
/// Exit code when the daemon cannot be reached at all (nothing was sent).
pub const EXIT_UNREACHABLE: u8 = 2;
/// How many failure messages are printed; the rest are counted (`--json` lists them all).
pub const MAX_PRINTED_FAILURES: usize = 10;
/// Retries of a request the daemon answered with 503 and `Retry-After` (or of a
/// connection that cannot be made) before it counts as failed, by default.
pub const DEFAULT_RETRIES: u32 = 8;
/// After SIGINT or SIGTERM, how long the rows read so far may take to be sent; then the
/// requests still unanswered count as failed, the batches left as not sent. `pgspool send
/// --help` says 5 s.
pub const INTERRUPT_GRACE: Duration = Duration::from_secs(5);
/// Rows on their way from the reader's thread to the batches.
const ROWS_IN_FLIGHT: usize = 64;

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
/// not ([`EXIT_FAILED`]), 2 the daemon cannot be reached ([`EXIT_UNREACHABLE`]), 128 + the
/// signal's number when interrupted (130 SIGINT, 143 SIGTERM).
///
/// # Errors
/// When the input file cannot be opened, or the signal handlers cannot be installed.
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
    let (bar, unit) = progress(size, &bytes_read);
    let delivery = Delivery {
        socket: args.socket.clone(),
        clients: usize::from(args.clients),
        ack: args.ack,
        invalid: args.invalid,
        retries: args.retries,
    };
    let interrupted = CancellationToken::new();
    let abandon = CancellationToken::new();
    let (signal, signals) = watch_signals(&interrupted, &abandon, &bar)
        .context("cannot install the handlers of SIGINT and SIGTERM")?;

    // The reader runs on a thread of its own, not the runtime's blocking pool: interrupted,
    // it is left waiting for input while the process exits.
    let (rows, rows_rx) = mpsc::channel::<Vec<u8>>(ROWS_IN_FLIGHT);
    let (read_tx, mut read_rx) = oneshot::channel();
    let null = args.null.clone();
    std::thread::Builder::new()
        .name("pgspool-send-reader".into())
        .spawn(move || {
            let mut rows = rows;
            let read = maybe_gunzip(CountingReader::new(raw, bytes_read))
                .and_then(skip_bom)
                .context("reading the input")
                .and_then(|input| match format {
                    InputFormat::Ndjson => read_ndjson(input, &mut rows),
                    InputFormat::Json => read_json(input, &mut rows),
                    InputFormat::Csv => read_csv(input, &null, &mut rows),
                });
            let _ = read_tx.send(read);
        })
        .context("cannot start the thread that reads the input")?;
    let layout = match format {
        InputFormat::Json => Layout::JsonArray,
        InputFormat::Ndjson | InputFormat::Csv => Layout::Ndjson,
    };
    let builder = BatchBuilder::new(
        &args.table,
        u64::from(args.rows_per_request),
        args.max_request_bytes,
        layout,
        unit,
    );
    let (batches, batches_rx) = mpsc::channel(delivery.clients * 2);
    let gathering = tokio::spawn(gather(
        rows_rx,
        builder,
        args.max_wait,
        batches,
        interrupted.clone(),
    ));
    let mut report = deliver_until(&delivery, batches_rx, &bar, abandon).await;
    let gathered = gathering.await.context("batching the rows panicked")?;
    signals.abort();
    bar.finish_and_clear();
    let signal = signal.get().copied();
    for batch in &gathered.unsent {
        report.not_sent(batch, "not sent: sending stopped");
    }
    // The reader is done unless sending stopped first: then it may be waiting for input.
    let read = if signal.is_none() && !report.unreachable {
        read_rx
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the reader panicked")))
    } else {
        read_rx.try_recv().unwrap_or(Ok(()))
    };
    let input_error = match read {
        Err(e) if !e.is::<SendingStopped>() => {
            eprintln!("pgspool: the input was not read to its end: {e:#}");
            Some(format!("{e:#}"))
        }
        _ => None,
    };
    print_summary(
        args,
        &report,
        gathered.rows_read,
        input_error.as_deref(),
        signal,
    )?;
    if let Some(signal) = signal {
        return Ok(ExitCode::from(128 + signal.number));
    }
    let complete =
        report.batches_failed == 0 && report.batches_not_sent == 0 && input_error.is_none();
    Ok(if complete {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    })
}

/// The progress bar: by input bytes when the input's size is known, else by rows.
fn progress(size: Option<u64>, bytes_read: &Arc<AtomicU64>) -> (ProgressBar, ProgressUnit) {
    match size {
        Some(size) => (
            ProgressBar::new(size).with_style(
                ProgressStyle::with_template(
                    "{bar:40} {binary_bytes}/{binary_total_bytes} sent ({elapsed}, {eta} left)",
                )
                .expect("the template is valid"),
            ),
            ProgressUnit::Bytes(Arc::clone(bytes_read)),
        ),
        None => (
            ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template("{spinner} {pos} rows sent ({per_sec}, {elapsed})")
                    .expect("the template is valid"),
            ),
            ProgressUnit::Rows,
        ),
    }
}

/// The signal that interrupted `send`.
#[derive(Debug, Clone, Copy)]
struct Interruption {
    name: &'static str,
    number: u8,
}

/// Watches for SIGINT and SIGTERM: the first is kept in the returned cell and cancels
/// `interrupted`, then `abandon` after [`INTERRUPT_GRACE`]; a second exits at once.
fn watch_signals(
    interrupted: &CancellationToken,
    abandon: &CancellationToken,
    bar: &ProgressBar,
) -> io::Result<(Arc<OnceLock<Interruption>>, tokio::task::JoinHandle<()>)> {
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let received = Arc::new(OnceLock::new());
    let (first, interrupted, abandon, bar) = (
        Arc::clone(&received),
        interrupted.clone(),
        abandon.clone(),
        bar.clone(),
    );
    let task = tokio::spawn(async move {
        let signal = next_signal(&mut int, &mut term).await;
        let _ = first.set(signal);
        bar.suspend(|| {
            eprintln!(
                "pgspool: {}: reading stops; sending the rows read so far (for up to {} s; \
                 interrupt again to exit at once)",
                signal.name,
                INTERRUPT_GRACE.as_secs()
            );
        });
        interrupted.cancel();
        let again = tokio::select! {
            again = next_signal(&mut int, &mut term) => Some(again),
            () = tokio::time::sleep(INTERRUPT_GRACE) => None,
        };
        let again = match again {
            Some(again) => again,
            None => {
                abandon.cancel();
                next_signal(&mut int, &mut term).await
            }
        };
        bar.suspend(|| eprintln!("pgspool: {} again: exiting at once", again.name));
        std::process::exit(128 + i32::from(again.number));
    });
    Ok((received, task))
}

async fn next_signal(int: &mut Signal, term: &mut Signal) -> Interruption {
    tokio::select! {
        _ = int.recv() => Interruption { name: "SIGINT", number: 2 },
        _ = term.recv() => Interruption { name: "SIGTERM", number: 15 },
    }
}

/// Prints the summary: aligned lines, or one JSON object with `--json`. Every row read is
/// acknowledged, failed or not sent.
fn print_summary(
    args: &SendArgs,
    report: &Report,
    rows_read: u64,
    input_error: Option<&str>,
    signal: Option<Interruption>,
) -> anyhow::Result<()> {
    let ms = |q: f64| report.latency(q).as_secs_f64() * 1e3;
    let interrupted = signal.map(|s| s.name);
    if args.json {
        let summary = serde_json::json!({
            "table": args.table,
            "rows_read": rows_read,
            "rows_acknowledged": report.rows_acknowledged,
            "rows_failed": report.rows_failed,
            "rows_not_sent": report.rows_not_sent,
            "rows_refused": report.rows_refused,
            "rows_committed": report.rows_committed,
            "rows_dead_lettered": report.rows_dead_lettered,
            "rows_not_committed": report.rows_not_committed,
            "batches_acknowledged": report.batches_acknowledged,
            "batches_failed": report.batches_failed,
            "batches_not_sent": report.batches_not_sent,
            "seconds": report.elapsed.as_secs_f64(),
            "rows_per_second": report.rows_per_second(),
            "latency_p50_ms": ms(0.5),
            "latency_p99_ms": ms(0.99),
            "failures": report.failures,
            "input_error": input_error,
            "interrupted": interrupted,
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
    if report.batches_failed > MAX_PRINTED_FAILURES as u64 {
        lines.push((
            "",
            format!(
                "(the first {MAX_PRINTED_FAILURES} are printed above, {} more are not; \
                 --json lists the rows of each)",
                report.batches_failed - MAX_PRINTED_FAILURES as u64
            ),
        ));
    }
    if report.batches_not_sent > 0 {
        lines.push((
            "not sent",
            format!(
                "{} rows in {} batches",
                report.rows_not_sent, report.batches_not_sent
            ),
        ));
    }
    if let Some(name) = interrupted {
        lines.push((
            "interrupted",
            format!("by {name}: the input was not read to its end"),
        ));
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
