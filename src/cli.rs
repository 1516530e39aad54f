//! The command line: subcommands, flags, and how flags combine with the config file.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, ConfigError};

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
    /// Inspect a WAL directory (works whether the daemon runs or not).
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
    /// Load the bundled nycflights13 data through a throwaway daemon and PostgreSQL, and
    /// check that every row arrived exactly once.
    Demo(DemoArgs),
}

/// `pgspool run`
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Config file (TOML; config/pgspool.toml in the source tree lists every key with its
    /// default).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Unix socket to listen on [config: listen.socket].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// WAL directory [config: wal.dir].
    #[arg(long, value_name = "DIR")]
    pub wal_dir: Option<PathBuf>,
    /// PostgreSQL connection string: postgres://user@host/db or libpq key=value pairs such
    /// as "host=/var/run/postgresql port=5432 dbname=app" [config: postgres.url].
    #[arg(
        long,
        value_name = "URL",
        env = "PGSPOOL_DATABASE_URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,
    /// Log filter, e.g. info or pgspool=debug [config: log.level; RUST_LOG wins].
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
}

impl RunArgs {
    /// The configuration: the file if given (else the defaults), with the flags applied.
    ///
    /// # Errors
    /// When the file cannot be read or parsed.
    pub fn config(&self) -> Result<Config, ConfigError> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if let Some(socket) = &self.socket {
            config.listen.socket.clone_from(socket);
        }
        if let Some(dir) = &self.wal_dir {
            config.wal.dir.clone_from(dir);
        }
        if let Some(url) = &self.database_url {
            config.postgres.url = Some(url.clone());
        }
        if let Some(level) = &self.log_level {
            config.log.level.clone_from(level);
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
    /// Which WAL directory.
    #[command(flatten)]
    pub dir: WalDirArgs,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `pgspool quarantine`
#[derive(Debug, Args)]
pub struct QuarantineArgs {
    /// Which WAL directory.
    #[command(flatten)]
    pub dir: WalDirArgs,
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
