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
    /// as "host=/var/run/postgresql port=5432 dbname=app" [config: postgres.url].
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
