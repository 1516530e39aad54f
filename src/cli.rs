//! The command line: subcommands, flags, and how flags combine with the config file.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand};
use uuid::Uuid;

use crate::config::{Config, ConfigError};
use crate::logging::LogFormat;
use crate::send::{AckLevel, InputFormat, InvalidRows};

/// pgspool: a write buffer for PostgreSQL. Applications send rows as JSON over a local Unix
/// socket; pgspool makes them durable in its own write-ahead log before it answers, then
/// loads them into PostgreSQL with COPY, exactly once, across crashes of either side.
#[derive(Debug, Parser)]
#[command(name = "pgspool", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: accept rows on the socket, keep them in the WAL, load them into
    /// PostgreSQL.
    Run(RunArgs),
    /// Show how the spool stands: live from the daemon, else from the WAL directory.
    ///
    /// Asks the daemon on its socket (GET /v1/status); when nothing answers, reads the WAL
    /// directory itself (--wal-dir, or the config file's wal.dir), which works whether the
    /// daemon runs or not. The first line is the verdict: healthy (exit code 0); degraded
    /// (exit code 1): PostgreSQL down, tables held, backlog growing, or stopping; daemon
    /// not running or corrupt WAL (exit code 2, also when nothing can be read).
    Status(StatusArgs),
    /// Move damaged WAL records aside so that the daemon can start again, without their rows.
    ///
    /// The operator's explicit choice when the daemon refuses to start on damaged
    /// acknowledged records: the damaged bytes are copied to the quarantine/ directory of
    /// the WAL, the segment is rewritten with a record that stands for their LSNs, and the
    /// flusher passes over them (their rows are not loaded). Runs only while the daemon is
    /// stopped; `pgspool status` lists the damage first. The alternative is to restore the
    /// directory from a copy.
    Quarantine(QuarantineArgs),
    /// List the rows PostgreSQL refused (pgspool.dead_letters), or send them again once
    /// the cause is fixed.
    ///
    /// The flusher moves a row PostgreSQL refuses (a CHECK or NOT NULL violation, a
    /// duplicate key, a value out of range for its type, ...) to pgspool.dead_letters, in
    /// the transaction that loads the rest of its batch. These commands connect to
    /// PostgreSQL directly, whether the daemon runs or not.
    #[command(name = "dead-letters")]
    DeadLetters(DeadLettersArgs),
    /// Send rows from a file or stdin (NDJSON, JSON or CSV) to the daemon's socket.
    #[command(long_about = SEND_ABOUT)]
    Send(SendArgs),
    /// Load the bundled nycflights13 data through a throwaway daemon and PostgreSQL, and
    /// check that every row arrived exactly once.
    Demo(DemoArgs),
    /// Measure pgspool against writing to PostgreSQL directly (COPY, INSERT per row,
    /// multi-row INSERTs), on this machine, in one run, and print one table.
    #[command(long_about = BENCH_ABOUT)]
    Bench(BenchArgs),
}

/// `pgspool run`
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The config file and the connection string.
    #[command(flatten)]
    pub source: ConfigArgs,
    /// Unix socket to listen on [config: listen.socket].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// WAL directory [config: wal.dir].
    #[arg(long, value_name = "DIR")]
    pub wal_dir: Option<PathBuf>,
    /// Log filter, e.g. info or pgspool=debug [config: log.level; RUST_LOG wins].
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Log lines as text (with timestamps, without them when stderr is the journal) or as
    /// JSON objects for log shippers [config: log.format].
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
}

impl RunArgs {
    /// The configuration: the file if given (else the defaults), with the flags applied.
    ///
    /// # Errors
    /// When the file cannot be read or parsed.
    pub fn config(&self) -> Result<Config, ConfigError> {
        let mut config = self.source.config()?;
        if let Some(socket) = &self.socket {
            config.listen.socket.clone_from(socket);
        }
        if let Some(dir) = &self.wal_dir {
            config.wal.dir.clone_from(dir);
        }
        if let Some(level) = &self.log_level {
            config.log.level.clone_from(level);
        }
        if let Some(format) = self.log_format {
            config.log.format = format;
        }
        Ok(config)
    }
}

/// The config file and the PostgreSQL connection string, for every command that connects
/// to PostgreSQL the way the daemon does.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Config file (TOML; config/pgspool.toml in the source tree lists every key with its
    /// default).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// PostgreSQL connection string: postgres://user@host/db or libpq key=value pairs such
    /// as "host=/var/run/postgresql port=5432 dbname=app", with sslmode and sslrootcert as
    /// in libpq [config: postgres.url]. Keep passwords out of it (it shows in the process
    /// list): use postgres.password_file or ~/.pgpass.
    #[arg(
        long,
        value_name = "URL",
        env = "PGSPOOL_DATABASE_URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,
}

impl ConfigArgs {
    /// The configuration: the file if given (else the defaults), with `--database-url`
    /// (or `PGSPOOL_DATABASE_URL`) applied.
    ///
    /// # Errors
    /// When the file cannot be read or parsed.
    pub fn config(&self) -> Result<Config, ConfigError> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if let Some(url) = &self.database_url {
            config.postgres.url = Some(url.clone());
        }
        Ok(config)
    }
}

/// The WAL directory an offline command works on.
#[derive(Debug, Args)]
pub struct WalDirArgs {
    /// The WAL directory.
    #[arg(long, value_name = "DIR", required_unless_present = "config")]
    pub wal_dir: Option<PathBuf>,
    /// Take the WAL directory from this config file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl WalDirArgs {
    /// The directory: `--wal-dir`, else the config file's `wal.dir`.
    ///
    /// # Errors
    /// When the config file cannot be read or parsed.
    pub fn resolve(&self) -> Result<PathBuf, ConfigError> {
        match (&self.wal_dir, &self.config) {
            (Some(dir), _) => Ok(dir.clone()),
            (None, Some(config)) => Ok(Config::load(config)?.wal.dir),
            (None, None) => unreachable!("clap requires --wal-dir or --config"),
        }
    }
}

/// `pgspool status`
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The daemon's socket [config: listen.socket; default /run/pgspool/pgspool.sock].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// The WAL directory, read when the daemon does not answer [config: wal.dir; default
    /// /var/lib/pgspool]. A daemon answering for another directory does not count.
    #[arg(long, value_name = "DIR")]
    pub wal_dir: Option<PathBuf>,
    /// Take the socket and the WAL directory from this config file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print one JSON object (keys documented in src/status/mod.rs) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Redraw every second (with --json: one object per line) until interrupted; the exit
    /// code is then the last verdict's.
    #[arg(long)]
    pub watch: bool,
}

/// `pgspool quarantine`
#[derive(Debug, Args)]
pub struct QuarantineArgs {
    /// Which WAL directory.
    #[command(flatten)]
    pub dir: WalDirArgs,
}

/// `pgspool dead-letters`
#[derive(Debug, Args)]
pub struct DeadLettersArgs {
    /// What to do with the dead letters.
    #[command(subcommand)]
    pub command: DeadLettersCommand,
}

/// The `pgspool dead-letters` subcommands.
#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// Show the dead letters, oldest first, with how many match in all.
    List(DeadLettersListArgs),
    /// Send dead letters again into their tables, once the cause is fixed.
    ///
    /// Each chunk of up to 10,000 dead letters is one transaction: the rows that land are
    /// deleted from pgspool.dead_letters in it, and the rows refused again keep their
    /// place there with the new error. So a row is in its table or in the dead letters,
    /// never both and never neither, even if retry is killed; running it again retries
    /// only what is still there. A table that still refuses every row (missing, a column
    /// missing, no INSERT privilege) is reported and its dead letters are left as they
    /// are. Exit code 1 when a row was refused again or a table still refuses.
    #[command(group(
        ArgGroup::new("selection")
            .required(true)
            .args(["table", "lsn", "id", "all"])
    ))]
    Retry(DeadLettersRetryArgs),
}

/// `pgspool dead-letters list`
#[derive(Debug, Args)]
pub struct DeadLettersListArgs {
    /// The config file and the connection string.
    #[command(flatten)]
    pub source: ConfigArgs,
    /// Only the dead letters of this table, written as `list` shows it: public.flights,
    /// or the name the client used for rows kept as JSON.
    #[arg(long, value_name = "TABLE")]
    pub table: Option<String>,
    /// Only the dead letters of this spool (the UUID in the WAL directory's spool_id file).
    #[arg(long, value_name = "ID")]
    pub spool: Option<Uuid>,
    /// Show at most this many dead letters, oldest first.
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..))]
    pub limit: i64,
    /// Print one JSON object per line (NDJSON) with every column, in full.
    #[arg(long)]
    pub json: bool,
}

/// `pgspool dead-letters retry`
#[derive(Debug, Args)]
pub struct DeadLettersRetryArgs {
    /// The config file and the connection string.
    #[command(flatten)]
    pub source: ConfigArgs,
    /// Retry the dead letters of this table, written as `list` shows it.
    #[arg(long, value_name = "TABLE")]
    pub table: Option<String>,
    /// Retry the dead letter of this LSN (of every spool, unless --spool is given).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i64).range(1..))]
    pub lsn: Option<i64>,
    /// Retry the dead letter with this id (the first column of `list`).
    #[arg(long, value_name = "N")]
    pub id: Option<i64>,
    /// Retry every dead letter (of the spool given with --spool, if any).
    #[arg(long)]
    pub all: bool,
    /// Only the dead letters of this spool (the UUID in the WAL directory's spool_id file).
    #[arg(long, value_name = "ID")]
    pub spool: Option<Uuid>,
    /// Rehearse: do everything, then roll each transaction back, and tell what would land
    /// and what would be refused again. Nothing changes (sequences still advance).
    #[arg(long)]
    pub dry_run: bool,
}

/// The long help of `pgspool send`.
const SEND_ABOUT: &str = "\
Send rows from a file or stdin to the daemon's socket, in batches, over several
connections at once, and print what landed.

Formats (--format, else from the file's extension, else NDJSON):
  ndjson  one JSON object per line (.ndjson, .jsonl); blank lines are skipped
  json    a JSON array of objects (.json), streamed element by element, or JSON
          objects one after another
  csv     CSV with a header row naming the columns (.csv); every field is sent as a
          string, which the column's type parses (as COPY does); a field equal to
          --null, quoted or not, is NULL. The default --null is the empty string, so
          empty fields are NULL; use e.g. --null NA to send empty strings. A json or
          jsonb column gets the field as a JSON string, not parsed.
Keys and header names are column names, exactly. A UTF-8 byte order mark at the start
is skipped. A gzip-compressed input (.gz, or any input starting with gzip's magic bytes)
is decompressed. The input is read as it is sent: memory is bounded by the batches in
flight (about two per connection, each of up to --rows-per-request rows and
--max-request-bytes bytes) plus the largest rows, whatever the input's size.

A batch ends at --rows-per-request rows, before the row that would take it over
--max-request-bytes (a row larger than that is sent alone), or once --max-wait has
passed since its first row was read: a slow stream (tail -f | pgspool send) is sent as
it comes. Each batch is one request, all or nothing: a batch the daemon refuses (a row
with an unknown column, a bad value, a row too large, ...) fails with the daemon's
message (the first 10 are printed), and the other batches go on. A 503 with
Retry-After (the WAL is full, the daemon is stopping) kept nothing and is retried with
backoff, --retries times. A batch whose connection breaks before the answer fails and
is not sent again: its rows may have been stored, each at most once. When the daemon
cannot be reached any more, sending stops: the batches left are not sent.

SIGINT (Ctrl-C) or SIGTERM stops reading; the rows read so far are sent, for up to 5 s
(then a request still unanswered fails, and what is left is not sent), and the summary
is printed. A second signal exits at once, without a summary.

A progress bar shows on a terminal (stderr). The summary goes to stdout: rows read,
acknowledged (with rows/s and latency), failed, not sent; every row read is in one of
these three. --json prints one object with the keys table, rows_read,
rows_acknowledged, rows_failed, rows_not_sent, rows_refused, rows_committed,
rows_dead_lettered, rows_not_committed, batches_acknowledged, batches_failed,
batches_not_sent, seconds, rows_per_second, latency_p50_ms, latency_p99_ms,
input_error, interrupted (null, \"SIGINT\" or \"SIGTERM\") and failures: one object per
batch not acknowledged, {first_row, last_row (its rows in the input, from 1), outcome
(refused: none stored; no_answer: each stored at most once, check before sending them
again; not_sent: none stored), status (the HTTP status of a refusal, else null), error
(at most 300 characters)}.

Exit codes: 0 every row acknowledged; 1 some rows were not (a batch failed or was not
sent, or the input is malformed or unreadable at some point: the rows before it are
sent); 2 the daemon cannot be reached, nothing was sent; 64 bad usage; 130 interrupted
by SIGINT, 143 by SIGTERM (the summary tells what was sent).";

/// `pgspool send`
#[derive(Debug, Args)]
pub struct SendArgs {
    /// The daemon's Unix socket.
    #[arg(
        long,
        value_name = "PATH",
        env = "PGSPOOL_SOCKET",
        default_value = "/run/pgspool/pgspool.sock"
    )]
    pub socket: PathBuf,
    /// The table: name or schema.name, exactly as written (case-sensitive).
    #[arg(long, value_name = "TABLE", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub table: String,
    /// The input file; - or none reads stdin.
    #[arg(value_name = "FILE|-")]
    pub input: Option<PathBuf>,
    /// The input's format [default: from the file's extension, else ndjson].
    #[arg(long, value_enum)]
    pub format: Option<InputFormat>,
    /// CSV: the field that stands for NULL (quoted or not).
    #[arg(long, value_name = "STRING", default_value = "")]
    pub null: String,
    /// Rows per request.
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub rows_per_request: u32,
    /// Bytes per request at most: a batch ends before the row that would take it over (a
    /// larger row is sent alone). Keep it under the daemon's limit, ingest.max_body_bytes:
    /// the default, 8 MiB, is half the daemon's default.
    #[arg(long, value_name = "BYTES", default_value_t = crate::send::DEFAULT_MAX_REQUEST_BYTES, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_request_bytes: u64,
    /// How long a partial batch waits for more rows (from its first row) before it is
    /// sent, e.g. 1s, 200ms: a slow stream (tail -f) is sent as it comes.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime_serde::re::humantime::parse_duration)]
    pub max_wait: std::time::Duration,
    /// Concurrent connections.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub clients: u16,
    /// When the daemon answers: durable (fdatasync'd in its WAL), committed (in
    /// PostgreSQL), none (written, before fdatasync).
    #[arg(long, value_enum, default_value = "durable")]
    pub ack: AckLevel,
    /// A row the daemon cannot store: reject its whole batch, or dead_letter it (kept in
    /// pgspool.dead_letters, the rest of the batch stored).
    #[arg(long, value_enum, default_value = "reject")]
    pub invalid: InvalidRows,
    /// Retries of a batch answered 503 with Retry-After, or of a connection that cannot
    /// be made, before it fails.
    #[arg(long, value_name = "N", default_value_t = crate::send::DEFAULT_RETRIES)]
    pub retries: u32,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `pgspool demo`
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Use this PostgreSQL server instead of starting a throwaway one; the demo works in a
    /// schema of its own and drops it at the end.
    #[arg(
        long,
        value_name = "URL",
        env = "PGSPOOL_DATABASE_URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,
    /// Concurrent clients.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub clients: u16,
    /// Rows per request.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub rows_per_request: u32,
}

/// The long help of `pgspool bench`.
const BENCH_ABOUT: &str = "\
Measure pgspool against writing to PostgreSQL directly, on this machine, in one run,
and print one table (like pgbench, for a write buffer).

Every scenario writes the bundled flights table (336,776 rows of nycflights13, repeated
as needed) with a unique id column into an empty table, and ends with an exact check
that PostgreSQL holds exactly the rows sent: each id from 1 to the number sent, once,
and no dead letters. A failed check fails the scenario.

Without --database-url a throwaway PostgreSQL is started (as `pgspool demo` does).
With it, the bench works in a schema of its own, pgspool_bench_<8 hex digits>, dropped
at the end (also on error), and deletes the pgspool.watermarks, dead_letters and
held_tables rows of the spools it created. The daemons run as child processes of this
binary (`pgspool run`), each on a fresh WAL directory under /tmp, logging warnings to a
file whose end is printed when one fails.

Scenarios (--scenario, default all, in this order):
  ceiling   one COPY FROM STDIN of --rows rows, made before the clock starts: what a
            perfect buffer could reach. Always all --rows rows; the fastest of 3 runs
            (ratios against it are the conservative ones).
  floor     one INSERT per row, autocommit, over --connections connections (values
            sent as text, cast by PostgreSQL): what applications do without a buffer.
  batching  multi-row INSERTs of 500 rows per statement over --connections
            connections: the hand-written batcher pgspool replaces.
  pgspool   for each load configuration (--clients zipped with --rows-per-request)
            and each --ack level: a fresh daemon; clients POST NDJSON over the Unix
            socket; ack rows/s and ack latency p50/p99/p99.9, the time until every row
            is committed in PostgreSQL (end-to-end rows/s), the daemon's CPU seconds
            per million rows and its peak RSS.
  drain     a fresh daemon while PostgreSQL takes no rows: a session of the bench
            holds LOCK TABLE ... IN ACCESS EXCLUSIVE MODE (which works on any server,
            yours too); --backlog-rows rows are sent (4 clients x 1000 rows, durable),
            then the lock is released: rows/s until the backlog is in PostgreSQL.
  restart   the same backlog behind the lock, then the daemon is killed (SIGKILL),
            the lock released and a new daemon started on the same WAL directory:
            time until /healthz answers (ready) and until every row is committed.

floor, batching and the pgspool loads send for at most --duration seconds each
(clients take no new request once it has passed; what was sent is checked exactly).

Goals, printed with their measured ratios (they do not change the exit code):
  - pgspool durable 4x1000: end-to-end rows/s at least the ceiling's / 1.25 (all rows
    committed in at most 1.25 times the ceiling's time);
  - pgspool durable 64x1: ack rows/s at least 5 times the floor's, p99 ack under 5 ms;
  - drain: at least 0.9 times the ceiling's rows/s;
  - restart: daemon peak RSS under 128 MiB and ready in under 2 s, with a 2 GiB
    backlog (a smaller backlog is said so).

--json FILE writes every result, the machine and the command; --markdown FILE a report
for BENCHMARKS.md (machine, command, table, goals, and Mermaid charts of throughput
against clients and of the ack latency CDF). --from-json FILE --markdown OUT draws the
report again from a JSON file without running anything.

Exit codes: 0 every scenario ran and passed its check; 1 a scenario or check failed (the
table shows which); 64 bad usage; 130 interrupted.";

/// A scenario of `pgspool bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum BenchScenario {
    /// One COPY of every row.
    Ceiling,
    /// One INSERT per row, autocommit.
    Floor,
    /// Multi-row INSERTs of 500 rows.
    Batching,
    /// The daemon, for each load configuration and ack level.
    Pgspool,
    /// A backlog built while the table is locked, then drained.
    Drain,
    /// A backlog, the daemon killed and started again.
    Restart,
}

/// `pgspool bench`
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Use this PostgreSQL server instead of starting a throwaway one; the bench works in
    /// a schema of its own and drops it at the end.
    #[arg(
        long,
        value_name = "URL",
        env = "PGSPOOL_DATABASE_URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,
    /// Config file for the daemons the bench starts (as `pgspool run --config`; its
    /// socket, WAL directory and database URL are the bench's own): measures your
    /// `[batch]`, `[wal]` and `[ingest]` settings instead of the defaults.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Rows of the ceiling, of app batching and of each pgspool load (the flights table
    /// is repeated as needed, each row with its own id).
    #[arg(long, value_name = "N", default_value_t = 336_776, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
    pub rows: u64,
    /// Concurrent clients of the pgspool loads, comma-separated; zipped with
    /// --rows-per-request into load configurations (one value applies to all).
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "4,64", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub clients: Vec<u32>,
    /// Rows per request of the pgspool loads, comma-separated, zipped with --clients.
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "1000,1", value_parser = clap::value_parser!(u32).range(1..=20_000))]
    pub rows_per_request: Vec<u32>,
    /// Ack levels the pgspool loads run with, comma-separated.
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "durable,committed"
    )]
    pub ack: Vec<AckLevel>,
    /// Scenarios to run, comma-separated [default: all].
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub scenario: Vec<BenchScenario>,
    /// Longest sending time of each load scenario (floor, batching, pgspool loads), in
    /// seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub duration: u64,
    /// PostgreSQL connections of the floor and batching scenarios.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub connections: u32,
    /// Rows of the backlog of the drain and restart scenarios [default: --rows].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
    pub backlog_rows: Option<u64>,
    /// Write every result as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write a Markdown report (for BENCHMARKS.md) to this file.
    #[arg(long, value_name = "FILE")]
    pub markdown: Option<PathBuf>,
    /// Run nothing: draw the --markdown report from this JSON file of an earlier run.
    #[arg(long, value_name = "FILE", requires = "markdown")]
    pub from_json: Option<PathBuf>,
}
