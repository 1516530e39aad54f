//! `pgspool status`: how the spool stands, from the daemon when it answers on its socket
//! (`GET /v1/status`), else from the WAL directory itself (which works whether the daemon
//! runs or not: it takes no lock and changes nothing; see [`mod@inspect`]).
//!
//! # Verdict and exit code
//!
//! The first line (and `verdict` in JSON) is one judgement, made by [`verdict::judge`] for
//! both views. Its reasons, worst first:
//!
//! | verdict | when | exit code |
//! |---|---|---|
//! | `corrupt WAL` | a record fails its checksum with acknowledged ones after it, LSNs are missing, the log ends before rows already committed, or the daemon found damage while flushing | 2 |
//! | `daemon not running` | nothing answers `GET /v1/status` on the socket within 30 s (or a daemon of another WAL directory does): the WAL directory is read instead | 2 |
//! | `PostgreSQL down` | the flusher's last session with PostgreSQL failed (cannot connect, or a batch failed) and none has succeeded since | 1 |
//! | `tables held` | PostgreSQL refuses every row of some tables; their rows wait in the WAL | 1 |
//! | `backlog growing` | over the last minute more rows arrived than were flushed, or none was flushed, and the oldest pending row is older than `backlog_age_limit_seconds` (10 × `[batch] max_wait`, at least 2 s) | 1 |
//! | `stopping` | the daemon is stopping and accepts no writes | 1 |
//! | `healthy` | none of the above | 0 |
//!
//! When nothing can be read (no daemon answers and the WAL directory cannot be read), the
//! error is printed on stderr and the exit code is 2. `--watch` redraws every second (the
//! screen is cleared first when stdout is a terminal; with `--json`, one object per line)
//! until interrupted, and then exits with the last verdict's exit code.
//!
//! # JSON
//!
//! `--json` prints one object (and `GET /v1/status` answers with the same), with these keys
//! (stable; new keys may be added):
//!
//! - `source`: `"daemon"` (the live view) or `"wal_dir"` (the directory read directly).
//! - `verdict`: `{state, exit_code, summary, reasons}`; `state` is `healthy`, `degraded`,
//!   `unreachable` or `corrupt`; `summary` is the one-line verdict; `reasons` lists
//!   `{kind, message}`, worst first, `kind` one of `corrupt_wal`, `daemon_not_running`,
//!   `postgres_down`, `tables_held`, `backlog_growing`, `stopping`.
//! - `counted_at_us`: when the last count of the WAL directory ended, in µs since the Unix
//!   epoch; `null` while the daemon has not finished its first count. The daemon counts in
//!   the background, one count at a time, and waits at most about a second for a count:
//!   it reuses its last count while it is younger than 100 ms or 10 times as long as it
//!   took (so that a large backlog does not keep a core busy reading the WAL), and answers
//!   with the last count while a new one takes longer than a second. A reused count is
//!   brought up to date where that is cheap: `pending_rows` adds the rows made durable
//!   since and subtracts those settled since, `last_lsn` is at least `durable_lsn`, and
//!   `oldest_pending_age_seconds` is measured at the answer (null once nothing is pending,
//!   or when the oldest pending row came after the count); the per-table counts,
//!   `pending_bytes` and what the count verified are as counted. Before the first count
//!   ends, only what needs no scan is given: `segments`, `bytes`, `first_lsn`, `last_lsn`
//!   (the durable LSN), `flushed_lsn`, `watermark_lsn`, and `pending_rows` as the LSNs
//!   between the watermark and the durable LSN (every row takes one LSN: exact unless a
//!   table is held, whose rows at or below the watermark are not included); per table,
//!   `pending_rows` and `pending_bytes` are `null` ("counting…" in text); `pending_bytes`,
//!   `torn_tail_bytes` and `quarantined_rows` are 0, `oldest_pending_age_seconds` null,
//!   `intact` and `checksums_ok` true and `problems` empty, as nothing was read yet.
//! - From the daemon, `null` when `source` is `wal_dir`: `uptime_seconds`; `ready` (it
//!   accepts writes; false while stopping); `durable_lsn` (the last LSN fdatasync'd);
//!   `postgres`: `{state, since_us, error}`, `state` being `connecting` (no session
//!   yet), `connected` or `down` (see the verdict), `since_us` when it became so, `error`
//!   why it is down; `rates`: `{ingest_rows_per_s: {"10s", "1m"}, flush_rows_per_s:
//!   {"10s", "1m"}}`, rows made durable and rows settled in PostgreSQL (loaded or put into
//!   dead letters) per second over the last 10 seconds and minute (or since the start);
//!   `backlog_age_limit_seconds`.
//! - From the WAL directory: `wal_dir`, `spool_id`, `segments`, `bytes`, `first_lsn`,
//!   `last_lsn`, `flushed_lsn`, `watermark_lsn`, `pending_rows`, `pending_bytes`,
//!   `oldest_pending_age_seconds` (null when nothing is pending), `intact`,
//!   `checksums_ok`, `torn_tail_bytes`, `quarantined_rows` (LSNs moved aside by `pgspool
//!   quarantine`), `problems` (list of strings), `tables` (table name → `{pending_rows,
//!   pending_bytes, flushed_rows}`, `flushed_rows` being the rows the daemon settled since
//!   it started, null from `wal_dir`, and the pending ones null before the daemon's first
//!   count (see `counted_at_us`); a table the daemon had not seen yet is listed under
//!   the name the client gave), and `flusher` (null before the flusher's first report,
//!   else `{updated_at_us, postgres_error, tables}` with, per table, `{dead_letters,
//!   held_after_lsn, last_error: {sqlstate, message, lsn, at_us}}`: see
//!   [`crate::flush::report`]; the daemon gives its report as it is now, `updated_at_us`
//!   being when the flusher last changed it, the directory the one last written).

pub mod inspect;
mod render;
pub mod verdict;

use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::cli::StatusArgs;
use crate::client::SpoolClient;
use crate::config::{Config, ConfigError};
use crate::fsutil;
use crate::lsn::Lsn;
pub(crate) use inspect::progress_bar;
pub use inspect::{TableBacklog, WalStatus, inspect};
pub use render::render;
pub use verdict::Verdict;

/// Where a report comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The daemon answered on its socket.
    Daemon,
    /// No daemon answered; the WAL directory was read.
    WalDir,
}

/// The flusher's connection to PostgreSQL.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Connection {
    /// No session has started or failed yet.
    #[default]
    Connecting,
    /// The last session started and has not failed.
    Connected,
    /// The last session failed (cannot connect, or a batch failed), and none has
    /// succeeded since.
    Down,
}

/// PostgreSQL as the flusher sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostgresState {
    /// Connected or not.
    pub state: Connection,
    /// Since when, in µs since the Unix epoch.
    pub since_us: u64,
    /// Why it is down.
    pub error: Option<String>,
}

impl PostgresState {
    /// Seconds in this state until now.
    #[must_use]
    pub fn for_seconds(&self) -> f64 {
        fsutil::now_us().saturating_sub(self.since_us) as f64 / 1e6
    }
}

/// A rate over the last 10 seconds and over the last minute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    /// Over the last 10 seconds (or since the start, if shorter).
    #[serde(rename = "10s")]
    pub last_10s: f64,
    /// Over the last minute (or since the start, if shorter).
    #[serde(rename = "1m")]
    pub last_1m: f64,
}

/// Rows per second in and out of the WAL.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    /// Rows made durable in the WAL.
    pub ingest_rows_per_s: Window,
    /// Rows settled in PostgreSQL (loaded, or put into dead letters).
    pub flush_rows_per_s: Window,
}

/// What only the running daemon knows; every field `None` when the WAL directory was read
/// without it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Live {
    /// Seconds since the daemon started.
    pub uptime_seconds: Option<f64>,
    /// Whether it accepts writes (false while stopping).
    pub ready: Option<bool>,
    /// The last LSN made durable.
    pub durable_lsn: Option<Lsn>,
    /// PostgreSQL as the flusher sees it.
    pub postgres: Option<PostgresState>,
    /// Ingest and flush rates.
    pub rates: Option<Rates>,
    /// Age in seconds of the oldest pending row above which a backlog that grew over the
    /// last minute makes the verdict `backlog growing`.
    pub backlog_age_limit_seconds: Option<f64>,
}

/// A status report: what `--json` prints and `GET /v1/status` answers (see the module
/// docs for the keys).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Where it comes from.
    pub source: Source,
    /// The judgement.
    pub verdict: Verdict,
    /// When the count of the WAL directory ended, in µs since the Unix epoch; `None` before
    /// the daemon's first count ends.
    pub counted_at_us: Option<u64>,
    /// What the daemon knows.
    #[serde(flatten)]
    pub live: Live,
    /// What the WAL directory holds.
    #[serde(flatten)]
    pub wal: WalStatus,
}

/// The keys of a report that are neither [`Live`] nor [`WalStatus`].
#[derive(Deserialize)]
struct Head {
    source: Source,
    verdict: Verdict,
    counted_at_us: Option<u64>,
}

impl Report {
    /// The daemon's report: `wal` counted at `counted_at_us` (`None`: not counted yet, only
    /// what needs no scan), and `live`.
    #[must_use]
    pub fn live(wal: WalStatus, counted_at_us: Option<u64>, live: Live) -> Report {
        Report {
            source: Source::Daemon,
            verdict: verdict::judge(&wal, &live, None),
            counted_at_us,
            live,
            wal,
        }
    }

    /// The report of the WAL directory read now, no daemon answering because `why`.
    #[must_use]
    pub fn offline(wal: WalStatus, why: &str) -> Report {
        let live = Live::default();
        Report {
            source: Source::WalDir,
            verdict: verdict::judge(&wal, &live, Some(why)),
            counted_at_us: Some(fsutil::now_us()),
            live,
            wal,
        }
    }

    /// A report from its JSON (the daemon's answer).
    ///
    /// # Errors
    /// When `json` lacks a key or has one of the wrong type.
    pub fn from_json(json: &serde_json::Value) -> Result<Report, serde_json::Error> {
        // Field by field rather than with `#[serde(flatten)]`, which cannot read numbers
        // under serde_json's arbitrary_precision.
        let head = Head::deserialize(json)?;
        Ok(Report {
            source: head.source,
            verdict: head.verdict,
            counted_at_us: head.counted_at_us,
            live: Live::deserialize(json)?,
            wal: WalStatus::deserialize(json)?,
        })
    }
}

/// How long the command waits for the daemon's answer before it reads the WAL directory
/// itself.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// What `pgspool status` looks at.
struct Target {
    socket: PathBuf,
    wal_dir: PathBuf,
    /// Whether the WAL directory was named (`--wal-dir` or `--config`): then a daemon
    /// serving another directory does not count.
    dir_named: bool,
}

impl Target {
    fn resolve(args: &StatusArgs) -> Result<Target, ConfigError> {
        let config = match &args.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        Ok(Target {
            socket: args.socket.clone().unwrap_or(config.listen.socket),
            wal_dir: args.wal_dir.clone().unwrap_or(config.wal.dir),
            dir_named: args.wal_dir.is_some() || args.config.is_some(),
        })
    }

    /// The daemon's report, or else the WAL directory's.
    ///
    /// # Errors
    /// When no daemon answers and the directory cannot be read either.
    async fn report(&self, progress: bool) -> anyhow::Result<Report> {
        let why = match tokio::time::timeout(ANSWER_TIMEOUT, ask(&self.socket)).await {
            Ok(Ok(report)) if !self.dir_named || same_dir(&report.wal.wal_dir, &self.wal_dir) => {
                return Ok(report);
            }
            Ok(Ok(report)) => format!(
                "the daemon on {} serves {}, not {}",
                self.socket.display(),
                report.wal.wal_dir.display(),
                self.wal_dir.display()
            ),
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => format!(
                "no answer on {} within {ANSWER_TIMEOUT:?}",
                self.socket.display()
            ),
        };
        let dir = self.wal_dir.clone();
        let wal = tokio::task::spawn_blocking(move || {
            let bar = progress.then(|| progress_bar(&dir, "verifying")).flatten();
            let wal = inspect(&dir, &mut |done| {
                if let Some(bar) = &bar {
                    bar.set_position(done);
                }
            });
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            wal
        })
        .await
        .context("reading the WAL directory panicked")?
        .with_context(|| {
            format!(
                "daemon not running ({why}), and cannot inspect {}",
                self.wal_dir.display()
            )
        })?;
        Ok(Report::offline(
            wal,
            &format!("{why}; read {} instead", self.wal_dir.display()),
        ))
    }
}

/// Asks the daemon on `socket` for its report.
async fn ask(socket: &Path) -> anyhow::Result<Report> {
    let mut client = SpoolClient::connect(socket).await?;
    let reply = client.get("/v1/status").await?;
    anyhow::ensure!(
        reply.status.is_success(),
        "the daemon on {} answered {}: {}",
        socket.display(),
        reply.status,
        reply.body
    );
    Report::from_json(&reply.body).with_context(|| {
        format!(
            "the daemon on {} answered with an unknown report",
            socket.display()
        )
    })
}

/// Whether `a` and `b` name the same directory.
fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Runs `pgspool status`; see the module docs.
///
/// # Errors
/// When the config file cannot be read, or stdout cannot be written. When nothing can be
/// read, the error is printed and the exit code is 2.
pub async fn run(args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let target = Target::resolve(args)?;
    if !args.watch {
        let (text, code) = frame(&target, args.json, false, true).await;
        match text {
            Ok(text) => write_stdout(&text)?,
            Err(e) => eprintln!("pgspool: error: {e:#}"),
        }
        return Ok(ExitCode::from(code));
    }
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("install the SIGINT handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("install the SIGTERM handler")?;
    let clear = io::stdout().is_terminal() && !args.json;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = 2;
    loop {
        let frame = async {
            tick.tick().await;
            frame(&target, args.json, true, false).await
        };
        let (text, code) = tokio::select! {
            frame = frame => frame,
            _ = interrupt.recv() => return Ok(ExitCode::from(last)),
            _ = terminate.recv() => return Ok(ExitCode::from(last)),
        };
        let text = text.unwrap_or_else(|e| format!("pgspool: error: {e:#}\n"));
        let text = if clear {
            format!("\x1b[H\x1b[2J{text}")
        } else if args.json {
            text
        } else {
            text + "\n"
        };
        write_stdout(&text)?;
        last = code;
    }
}

/// One report as text (`json`: pretty, or on one line when `compact`) and its exit code;
/// the error when nothing can be read (exit code 2).
async fn frame(
    target: &Target,
    json: bool,
    compact: bool,
    progress: bool,
) -> (anyhow::Result<String>, u8) {
    let report = match target.report(progress).await {
        Ok(report) => report,
        Err(e) => return (Err(e), verdict::State::Unreachable.exit_code()),
    };
    let text = match (json, compact) {
        (false, _) => Ok(render(&report)),
        (true, false) => serde_json::to_string_pretty(&report).map(|t| t + "\n"),
        (true, true) => serde_json::to_string(&report).map(|t| t + "\n"),
    };
    (text.map_err(anyhow::Error::from), report.verdict.exit_code)
}

/// Writes `text` to stdout; a reader that stops early (`| head`) is not an error.
///
/// # Errors
/// When stdout cannot be written for another reason.
pub(crate) fn write_stdout(text: &str) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(e),
        _ => Ok(()),
    }
}

/// `n rows`, or `1 row`.
fn rows(n: u64) -> String {
    if n == 1 {
        "1 row".to_string()
    } else {
        format!("{n} rows")
    }
}

/// A duration of `seconds` for people: `0.4 s`, `42 s`, `3 min 12 s`, `5 h 3 min`.
fn duration(seconds: f64) -> String {
    if seconds < 10.0 {
        return format!("{seconds:.1} s");
    }
    let s = seconds as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}
