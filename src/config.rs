//! Configuration: the TOML file, its defaults, and validation.
//!
//! [`Config::default`] is the single source of defaults; `config/pgspool.toml` documents
//! every key with them. Command-line flags override the file (see `crate::cli`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::allow::AllowList;
use crate::logging::LogFormat;

/// Errors in the configuration: exit code 78 (EX_CONFIG).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The file is not valid TOML for this configuration.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with the line and key.
        message: String,
    },
    /// A value is out of range or contradicts another.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where clients connect.
    pub listen: ListenConfig,
    /// The write-ahead log.
    pub wal: WalConfig,
    /// The PostgreSQL server rows are loaded into.
    pub postgres: PostgresConfig,
    /// When the flusher sends a batch.
    pub batch: BatchConfig,
    /// Limits on requests.
    pub ingest: IngestConfig,
    /// `[tables]`: the tables (and columns) clients may write; `None` (no section) for
    /// every table. See [`crate::allow`].
    pub tables: Option<AllowList>,
    /// Stopping.
    pub shutdown: ShutdownConfig,
    /// Logging.
    pub log: LogConfig,
}

/// The longest socket path the platform takes, in bytes: `sun_path` less its terminating
/// NUL (unix(7): 108 bytes on Linux; 104 on the BSDs and macOS).
#[cfg(target_os = "linux")]
pub const MAX_SOCKET_PATH_BYTES: usize = 107;
/// The longest socket path the platform takes, in bytes: `sun_path` less its terminating
/// NUL (unix(7): 108 bytes on Linux; 104 on the BSDs and macOS).
#[cfg(not(target_os = "linux"))]
pub const MAX_SOCKET_PATH_BYTES: usize = 103;

/// `[listen]`: where clients connect, and who may.
///
/// Whoever can connect writes rows into PostgreSQL as pgspool's role: the socket file's
/// mode and group decide who can open it, and the allow-lists, checked with the peer's
/// credentials (`SO_PEERCRED`) on every connection, narrow that further. With socket
/// activation the socket unit sets the file's owner and mode (`SocketUser=`,
/// `SocketGroup=`, `SocketMode=`): `mode` and `group` are not used, the allow-lists are.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// Path of the Unix socket clients connect to, at most [`MAX_SOCKET_PATH_BYTES`]
    /// bytes. Default `/run/pgspool/pgspool.sock`.
    pub socket: PathBuf,
    /// Permission bits of the socket file (connecting needs write permission). Default
    /// `0o660`: the owner and the group only.
    pub mode: u32,
    /// Group (name or number) the socket file is given, so that its members may connect.
    /// Default none: the daemon's own group.
    pub group: Option<String>,
    /// User ids that may connect. Default empty: any user who can open the socket, unless
    /// `allowed_gids` is set. When either list is set, a peer whose uid is not in
    /// `allowed_uids` and whose gid is not in `allowed_gids` gets 403, whatever it asks
    /// (`pgspool status` and metrics scrapers too).
    pub allowed_uids: Vec<u32>,
    /// Group ids (the peer process's effective group) that may connect. Default empty.
    /// Supplementary groups do not count: `SO_PEERCRED` carries only the effective gid
    /// (to let a group in whatever its members' primary group, use `[listen] group` and
    /// mode 0660 instead).
    pub allowed_gids: Vec<u32>,
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            socket: PathBuf::from("/run/pgspool/pgspool.sock"),
            mode: 0o660,
            group: None,
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
        }
    }
}

/// `[wal]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WalConfig {
    /// The WAL directory. Default `/var/lib/pgspool`.
    pub dir: PathBuf,
    /// Size in bytes at which a new segment is started. Default 64 MiB.
    pub segment_bytes: u64,
    /// Most bytes the WAL's segments may hold (the unflushed backlog, plus flushed rows
    /// whose segment is not deleted yet). Beyond it writes get 503 with `Retry-After`;
    /// nothing held is ever evicted. Default 8 GiB; at least twice `segment_bytes` plus
    /// `[ingest] max_body_bytes`.
    pub max_bytes: u64,
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig {
            dir: PathBuf::from("/var/lib/pgspool"),
            segment_bytes: 64 << 20,
            max_bytes: 8 << 30,
        }
    }
}

/// `[postgres]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// Connection string: a `postgres://` URL or libpq `key=value` pairs (for a Unix
    /// socket: `host=/var/run/postgresql port=5432 user=... dbname=...`). No default: set
    /// it here, with `--database-url` or with `PGSPOOL_DATABASE_URL`. `sslmode` (`disable`,
    /// `prefer` (the default), `require`, `verify-ca`, `verify-full`) and `sslrootcert`
    /// work as in libpq (see `crate::pg::tls`). Without a password in it and without
    /// `password_file`, the password comes from libpq's password file (`PGPASSFILE`, else
    /// `~/.pgpass`), if it has a matching line.
    pub url: Option<String>,
    /// A file holding the password (its content less one trailing line break; mode 0600 or
    /// less, or the daemon refuses to start), read at start and on reload, so that the
    /// password is in neither the configuration nor the process list. Not with a password
    /// in `url`. Default: none.
    pub password_file: Option<PathBuf>,
    /// How long one connection attempt may take. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// First wait before retrying after PostgreSQL failed; doubles up to `retry_max`, with
    /// jitter. Default 100 ms.
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    /// Longest wait between retries. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: None,
            password_file: None,
            connect_timeout: Duration::from_secs(5),
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(10),
        }
    }
}

/// `[batch]`: a batch is flushed when any limit is reached.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Rows in a batch. Default 50,000 (measured with `pgspool bench --config`: against
    /// 10,000, 15% less time to drain a backlog and to commit the flights load; 100,000
    /// gained nothing more and took more memory). A WAL record (the rows of one request, up to about
    /// 1 MiB of them) is never split, so a batch holds at least one whole record.
    pub max_rows: u64,
    /// Bytes of row data in a batch. Default 8 MiB.
    pub max_bytes: u64,
    /// How long the oldest row of a batch waits for more. Default 200 ms. A batch holding
    /// the rows of a waiting `?ack=committed` request does not wait: it is loaded once
    /// the flusher has read everything durable.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_rows: 50_000,
            max_bytes: 8 << 20,
            max_wait: Duration::from_millis(200),
        }
    }
}

/// `[ingest]`: limits on clients and their requests, so that a careless or hostile client
/// cannot exhaust the daemon. Each refusal names its key and is counted in
/// `pgspool_requests_refused_total{reason}` (see [`crate::metrics`]). All change live on
/// reload (for connections opened after it).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Largest request body in bytes; larger ones get 413. Default 16 MiB.
    pub max_body_bytes: u64,
    /// Most rows in one request; more get 413. Default 100,000 (`pgspool send` sends at
    /// most that many).
    pub max_rows_per_request: u64,
    /// Largest row (its JSON text) in bytes; a larger one gets 413. Default 1 MiB.
    pub max_row_bytes: u64,
    /// Most keys in one row; more get 413. Default 1,600, PostgreSQL's own limit of
    /// columns in a table.
    pub max_columns: u64,
    /// Deepest nesting of a row, the row object itself being depth 1 (`{"a":[1]}` is 2);
    /// deeper gets 413. Default 32; at most 100 (the JSON parser's own limit is 128).
    pub max_depth: u64,
    /// Largest request head (request line and headers) in bytes; a larger one gets 431
    /// and the connection is closed (with a message naming this key, but for heads over
    /// twice the limit, which are not read to their end). Default 16 KiB; 1 KiB to
    /// 256 KiB.
    pub max_header_bytes: u64,
    /// Most connections open at once; more get 503 and are closed. Default 1,024. The
    /// daemon's open-file limit (`LimitNOFILE=`, `ulimit -n`) must leave room for them.
    pub max_connections: u64,
    /// Most bytes of request bodies held in memory at once, all connections together; a
    /// request whose body would take more gets 503 with `Retry-After`. The first 64 KiB
    /// of each body are not counted (so small requests are never refused for it, and
    /// those bytes are bounded by `max_connections`). Default 256 MiB; at least
    /// `max_body_bytes`.
    pub max_buffered_bytes: u64,
    /// How long a client may take to send a request's head, from the connection's
    /// opening or the previous answer. A new connection that is too slow gets 408; an
    /// idle kept-alive one is closed. Default 30 s (`pgspool send` replaces connections
    /// idle for 20 s: keep it above that).
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// How long a client may take to send a request's body once its head is read; a
    /// slower one gets 408. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_body_bytes: 16 << 20,
            max_rows_per_request: 100_000,
            max_row_bytes: 1 << 20,
            max_columns: 1600,
            max_depth: 32,
            max_header_bytes: 16 << 10,
            max_connections: 1024,
            max_buffered_bytes: 256 << 20,
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(60),
        }
    }
}

/// `[shutdown]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// How long a stopping daemon waits for requests in flight and keeps flushing, both
    /// together; what is not flushed by then stays in the WAL. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Log filter: a level (`error`, `warn`, `info`, `debug`, `trace`) or a
    /// `tracing_subscriber` directive list. `RUST_LOG` overrides it. Default `info`.
    pub level: String,
    /// `text` (lines with a timestamp, without one when stderr is the journal) or `json`
    /// (one object per line, for log shippers). Default `text`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_string(),
            format: LogFormat::Text,
        }
    }
}

impl Config {
    /// Reads and parses `path` (validation is separate: flags may still override).
    ///
    /// # Errors
    /// [`ConfigError::Read`] or [`ConfigError::Parse`].
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Rejects values that cannot work, before anything is opened or bound.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key and what is wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.postgres.url.as_deref().is_none_or(str::is_empty) {
            return invalid(
                "no PostgreSQL connection string: set [postgres] url, --database-url or \
                 PGSPOOL_DATABASE_URL"
                    .into(),
            );
        }
        if let Some(Err(e)) = self.postgres.url.as_deref().map(crate::pg::parse_conninfo) {
            return invalid(format!(
                "the PostgreSQL connection string (--database-url, PGSPOOL_DATABASE_URL or \
                 [postgres] url) cannot be parsed: {e}; write postgres://user@host:port/dbname \
                 or key=value pairs such as \"host=/var/run/postgresql port=5432 dbname=app\""
            ));
        }
        if !(64 << 10..=1 << 30).contains(&self.wal.segment_bytes) {
            return invalid(format!(
                "[wal] segment_bytes = {} must be between 65536 and 1073741824 (1 GiB)",
                self.wal.segment_bytes
            ));
        }
        // Once everything is flushed the WAL still holds the active segment (up to
        // segment_bytes plus one request): max_bytes must leave room beyond that.
        let floor = 2 * (self.wal.segment_bytes + self.ingest.max_body_bytes);
        if self.wal.max_bytes < floor {
            return invalid(format!(
                "[wal] max_bytes = {} is below 2 * ([wal] segment_bytes + [ingest] \
                 max_body_bytes) = {floor}: the active segment alone could fill it, and every write \
                 would be refused",
                self.wal.max_bytes
            ));
        }
        if self.batch.max_rows == 0 || self.batch.max_bytes == 0 {
            return invalid("[batch] max_rows and max_bytes must be at least 1".into());
        }
        if self.ingest.max_body_bytes == 0
            || self.ingest.max_body_bytes > u64::from(crate::wal::record::MAX_PAYLOAD_BYTES) / 2
        {
            return invalid(format!(
                "[ingest] max_body_bytes = {} must be between 1 and {}",
                self.ingest.max_body_bytes,
                crate::wal::record::MAX_PAYLOAD_BYTES / 2
            ));
        }
        self.validate_ingest()?;
        self.validate_listen()?;
        if self.postgres.retry_initial.is_zero()
            || self.postgres.retry_max < self.postgres.retry_initial
        {
            return invalid(
                "[postgres] retry_initial must be above zero and at most retry_max".into(),
            );
        }
        const HOUR: Duration = Duration::from_secs(3600);
        for (key, value, most) in [
            ("[batch] max_wait", self.batch.max_wait, HOUR),
            (
                "[postgres] connect_timeout",
                self.postgres.connect_timeout,
                HOUR,
            ),
            ("[postgres] retry_max", self.postgres.retry_max, HOUR),
            ("[ingest] header_timeout", self.ingest.header_timeout, HOUR),
            ("[ingest] body_timeout", self.ingest.body_timeout, HOUR),
            (
                "[shutdown] drain_timeout",
                self.shutdown.drain_timeout,
                24 * HOUR,
            ),
        ] {
            if value > most {
                return invalid(format!(
                    "{key} = {value:?} is above the most it may be, {most:?}"
                ));
            }
        }
        if let Err(e) = crate::logging::parse_filter(&self.log.level) {
            return invalid(format!("[log] level (or --log-level): {e}"));
        }
        if self.listen.socket.as_os_str().is_empty() || self.wal.dir.as_os_str().is_empty() {
            return invalid("[listen] socket and [wal] dir must not be empty".into());
        }
        Ok(())
    }

    /// The `[ingest]` limits: each in its range.
    fn validate_ingest(&self) -> Result<(), ConfigError> {
        let ingest = &self.ingest;
        for (key, value, least, most) in [
            (
                "max_rows_per_request",
                ingest.max_rows_per_request,
                1,
                u64::from(u32::MAX),
            ),
            ("max_row_bytes", ingest.max_row_bytes, 2, u64::MAX),
            ("max_columns", ingest.max_columns, 1, u64::MAX),
            ("max_depth", ingest.max_depth, 1, 100),
            (
                "max_header_bytes",
                ingest.max_header_bytes,
                1 << 10,
                256 << 10,
            ),
            ("max_connections", ingest.max_connections, 1, 1 << 20),
            (
                "max_buffered_bytes",
                ingest.max_buffered_bytes,
                ingest.max_body_bytes,
                u64::MAX,
            ),
        ] {
            if !(least..=most).contains(&value) {
                return Err(ConfigError::Invalid(format!(
                    "[ingest] {key} = {value} must be between {least} and {most}"
                )));
            }
        }
        if ingest.header_timeout.is_zero() || ingest.body_timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "[ingest] header_timeout and body_timeout must be above zero".into(),
            ));
        }
        Ok(())
    }

    /// The `[listen]` socket: a path the platform can bind, a mode of permission bits.
    fn validate_listen(&self) -> Result<(), ConfigError> {
        let listen = &self.listen;
        let length = listen.socket.as_os_str().len();
        if length > MAX_SOCKET_PATH_BYTES {
            return Err(ConfigError::Invalid(format!(
                "[listen] socket (or --socket) {} is {length} bytes long, more than a Unix \
                 socket path may be here ({MAX_SOCKET_PATH_BYTES} bytes): choose a shorter \
                 path, such as /run/pgspool/pgspool.sock",
                listen.socket.display()
            )));
        }
        if listen.mode > 0o777 {
            return Err(ConfigError::Invalid(format!(
                "[listen] mode = {:#o} is not a set of permission bits: write it in octal, \
                 at most 0o777 (such as 0o660)",
                listen.mode
            )));
        }
        if listen.group.as_deref() == Some("") {
            return Err(ConfigError::Invalid(
                "[listen] group must not be empty: name a group or leave the key out".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_file_is_the_defaults() {
        let example = include_str!("../config/pgspool.toml");
        let parsed: Config = toml::from_str(example).expect("config/pgspool.toml parses");
        let mut expected = Config::default();
        expected.postgres.url = parsed.postgres.url.clone();
        assert_eq!(
            parsed, expected,
            "config/pgspool.toml must show the defaults"
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(toml::from_str::<Config>("[batch]\nmax_row = 5").is_err());
        assert!(toml::from_str::<Config>("[batch]\nmax_wait = \"soon\"").is_err());
        let mut c = Config::default();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("PGSPOOL_DATABASE_URL")
        );
        c.postgres.url = Some("host=/tmp port=5432".into());
        c.validate().expect("valid");
        c.batch.max_rows = 0;
        assert!(c.validate().is_err());
    }

    /// The defaults with a connection string: a valid configuration.
    fn valid() -> Config {
        let mut c = Config::default();
        c.postgres.url = Some("host=/tmp".into());
        c
    }

    /// Asserts that `c` does not validate, with an error that names `what`.
    fn refused(c: Config, what: &str) {
        let e = c.validate().expect_err(what).to_string();
        assert!(e.contains(what), "{e}");
    }

    #[test]
    fn sizes_and_durations_that_would_overflow_are_refused() {
        let mut c = valid();
        c.wal.segment_bytes = u64::MAX / 2;
        refused(c, "[wal] segment_bytes");
        let mut c = valid();
        c.wal.max_bytes = 100 << 20;
        refused(c, "[wal] max_bytes");
        let mut c = valid();
        c.shutdown.drain_timeout = Duration::from_secs(u64::MAX / 4);
        refused(c, "[shutdown] drain_timeout");
        let mut c = valid();
        c.batch.max_wait = Duration::from_secs(1 << 40);
        refused(c, "[batch] max_wait");
        let mut c = valid();
        c.ingest.body_timeout = Duration::from_secs(1 << 40);
        refused(c, "[ingest] body_timeout");
    }

    #[test]
    fn listen_and_ingest_limits_are_checked() {
        let mut c = valid();
        c.listen.socket = PathBuf::from(format!("/run/{}", "s".repeat(MAX_SOCKET_PATH_BYTES)));
        refused(c, &format!("({MAX_SOCKET_PATH_BYTES} bytes)"));
        let mut c = valid();
        c.listen.socket = PathBuf::from("/".repeat(MAX_SOCKET_PATH_BYTES));
        c.validate().expect("a path of the longest length");
        let mut c = valid();
        c.listen.mode = 0o1777;
        refused(c, "[listen] mode = 0o1777");
        let mut c = valid();
        c.ingest.max_depth = 101;
        refused(c, "[ingest] max_depth = 101");
        let mut c = valid();
        c.ingest.max_buffered_bytes = c.ingest.max_body_bytes - 1;
        refused(c, "[ingest] max_buffered_bytes");
        let mut c = valid();
        c.ingest.max_connections = 0;
        refused(c, "[ingest] max_connections = 0");
    }
}
