//! A throwaway PostgreSQL server for `pgspool demo`, the integration tests and
//! `pgspool bench`: [`TempPostgres`] owns a fresh cluster in a short temporary
//! directory, the `postgres` child process that serves it over a Unix socket
//! (and, with [`Options`], over TCP with or without TLS), and the cleanup of both.
//!
//! The module is deliberately synchronous (plain [`std::process`]); async
//! callers may call it directly (it blocks for initdb and startup, about a
//! second or two) or through `tokio::task::spawn_blocking`, as
//! [`given_or_throwaway`] does for the commands that take `--database-url`.
//!
//! Server binaries are found in this order: the directory printed by
//! `pg_config --bindir` if it holds `initdb` and `postgres`; `initdb` on
//! `PATH` (its real directory, or `postgres` also on `PATH`); the
//! highest-versioned `/usr/lib/postgresql/*/bin`. PostgreSQL refuses to run as
//! root, so when the effective uid is 0 both `initdb` and `postgres` run as the
//! `postgres` system user, which must exist.

use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Gid, Pid, Uid, User};
use tempfile::TempDir;

/// Port of the server. It only names the socket file (`.s.PGSQL.<port>`) in
/// our private socket directory, so a fixed value cannot collide.
const DEFAULT_PORT: u16 = 5432;
/// How long startup (including crash recovery) may take.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a fast shutdown (which writes a shutdown checkpoint) may take.
const FAST_STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an immediate shutdown may take.
const IMMEDIATE_STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long to wait for the process to be reaped after SIGKILL.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `Drop` keeps retrying to remove the directory.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(2);
/// Lines of the server log quoted in error messages.
const LOG_TAIL_LINES: usize = 30;
/// Name of the server log inside the temporary directory.
const LOG_FILE: &str = "postgres.log";
/// Name of the data directory inside the temporary directory.
const DATA_DIR: &str = "data";
/// System user the server runs as when we are root.
const SERVER_USER: &str = "postgres";

/// How [`TempPostgres::stop`] shuts the server down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StopMode {
    /// SIGINT: PostgreSQL's "fast" shutdown. Sessions are terminated, a
    /// shutdown checkpoint is written; the next start needs no recovery.
    Fast,
    /// SIGQUIT: PostgreSQL's "immediate" shutdown, as good as a crash. The
    /// next start runs crash recovery from the WAL.
    Immediate,
}

impl StopMode {
    fn signal(self) -> Signal {
        match self {
            StopMode::Fast => Signal::SIGINT,
            StopMode::Immediate => Signal::SIGQUIT,
        }
    }

    fn timeout(self) -> Duration {
        match self {
            StopMode::Fast => FAST_STOP_TIMEOUT,
            StopMode::Immediate => IMMEDIATE_STOP_TIMEOUT,
        }
    }
}

impl fmt::Display for StopMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopMode::Fast => f.write_str("fast (SIGINT)"),
            StopMode::Immediate => f.write_str("immediate (SIGQUIT)"),
        }
    }
}

/// The PostgreSQL server binaries could not be found.
///
/// [`TempPostgres::start`] returns this inside its [`anyhow::Error`], so a
/// caller that wants to skip rather than fail when PostgreSQL is not
/// installed can test for it with `err.downcast_ref::<PostgresNotFound>()`.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "PostgreSQL server binaries (initdb and postgres) not found; looked at: {}. \
     Install PostgreSQL (Debian/Ubuntu: `apt-get install postgresql`) or put the \
     directory that holds `initdb` and `postgres` on PATH",
    .searched.join("; ")
)]
pub struct PostgresNotFound {
    /// Each place that was searched, with what was found there.
    pub searched: Vec<String>,
}

/// Paths of the two server programs we run.
#[derive(Debug, Clone)]
struct Binaries {
    initdb: PathBuf,
    postgres: PathBuf,
}

impl Binaries {
    /// Both programs in `dir`, if they are there and executable.
    fn in_dir(dir: &Path) -> Option<Binaries> {
        let initdb = dir.join("initdb");
        let postgres = dir.join("postgres");
        (is_executable(&initdb) && is_executable(&postgres))
            .then_some(Binaries { initdb, postgres })
    }

    /// Searches `pg_config --bindir`, then `PATH`, then `/usr/lib/postgresql/*/bin`.
    fn find() -> Result<Binaries, PostgresNotFound> {
        Binaries::find_in(
            OsStr::new("pg_config"),
            &std::env::var_os("PATH").unwrap_or_default(),
            Path::new("/usr/lib/postgresql"),
        )
    }

    /// [`Binaries::find`] with its three places as parameters.
    fn find_in(
        pg_config: &OsStr,
        path: &OsStr,
        versions_root: &Path,
    ) -> Result<Binaries, PostgresNotFound> {
        let mut searched = Vec::new();

        match Command::new(pg_config)
            .arg("--bindir")
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) if out.status.success() => {
                let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
                if let Some(bins) = Binaries::in_dir(&dir) {
                    return Ok(bins);
                }
                searched.push(format!(
                    "`pg_config --bindir` ({} has no initdb and postgres)",
                    dir.display()
                ));
            }
            Ok(out) => searched.push(format!("`pg_config --bindir` (failed: {})", out.status)),
            Err(e) => searched.push(format!("`pg_config --bindir` ({e})")),
        }

        let initdb_on_path = find_on_path(path, "initdb");
        match initdb_on_path {
            Some(initdb) => {
                // Debian links /usr/local/bin/initdb (or similar) to the real
                // bindir; postgres lives beside the real file.
                let real_dir = fs::canonicalize(&initdb)
                    .ok()
                    .and_then(|p| p.parent().map(Path::to_path_buf));
                if let Some(bins) = real_dir.as_deref().and_then(Binaries::in_dir) {
                    return Ok(bins);
                }
                if let Some(postgres) = find_on_path(path, "postgres") {
                    return Ok(Binaries { initdb, postgres });
                }
                searched.push(format!(
                    "PATH (initdb at {} but no postgres beside it or on PATH)",
                    initdb.display()
                ));
            }
            None => searched.push("PATH (no initdb)".to_owned()),
        }

        let mut versions: Vec<(Vec<u64>, PathBuf)> = fs::read_dir(versions_root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name();
                let version = parse_version(name.to_str()?)?;
                Some((version, entry.path().join("bin")))
            })
            .collect();
        versions.sort();
        for (_, dir) in versions.iter().rev() {
            if let Some(bins) = Binaries::in_dir(dir) {
                return Ok(bins);
            }
        }
        searched.push(format!(
            "{}/*/bin (none with initdb and postgres)",
            versions_root.display()
        ));

        Err(PostgresNotFound { searched })
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (the kernel's pick).
fn free_tcp_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free TCP port")?;
    Ok(listener
        .local_addr()
        .context("finding a free TCP port")?
        .port())
}

/// "15" -> [15], "9.6" -> [9, 6]; `None` for anything that is not a version.
fn parse_version(name: &str) -> Option<Vec<u64>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn find_on_path(path: &OsStr, program: &str) -> Option<PathBuf> {
    std::env::split_paths(path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

/// The user the server processes run as, when it is not ourselves.
#[derive(Debug, Clone)]
struct RunAs {
    uid: Uid,
    gid: Gid,
}

impl RunAs {
    /// `None` when we are not root (run as ourselves); the `postgres` system
    /// user when we are.
    fn for_current_user() -> anyhow::Result<Option<RunAs>> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(None);
        }
        let user = User::from_name(SERVER_USER)
            .with_context(|| format!("looking up the `{SERVER_USER}` system user"))?
            .with_context(|| {
                format!(
                    "running as root, and PostgreSQL refuses to run as root, so the server must run \
                     as the `{SERVER_USER}` system user, which does not exist; install PostgreSQL \
                     from your distribution's packages (Debian: `apt-get install postgresql`, which \
                     creates it), create it (`useradd --system {SERVER_USER}`), or run as a \
                     non-root user"
                )
            })?;
        Ok(Some(RunAs {
            uid: user.uid,
            gid: user.gid,
        }))
    }
}

/// What [`TempPostgres::start_with`] sets up beyond the default server, for the tests of
/// TCP, TLS and password authentication.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Listen on TCP too, at 127.0.0.1 on a free port (which then also names the socket
    /// file).
    pub tcp: bool,
    /// Serve TLS (`ssl = on`) with this certificate chain and private key, both PEM.
    pub tls: Option<ServerTls>,
}

/// A server certificate and its key, PEM.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The certificate (chain), PEM.
    pub cert_pem: String,
    /// The private key, PEM.
    pub key_pem: String,
}

/// A throwaway PostgreSQL server: a new cluster in a short temporary
/// directory under `/tmp`, served by a `postgres` child process that listens
/// on a Unix socket in that directory only (no TCP).
///
/// The cluster uses `trust` authentication, superuser `postgres`, UTF8 and the
/// C locale. Durability settings are PostgreSQL's defaults (fsync on), so
/// [`StopMode::Immediate`] followed by [`restart`](Self::restart) exercises
/// real crash recovery.
///
/// Dropping it stops the server (SIGQUIT, then SIGKILL if it does not exit in
/// time) and removes the directory, also while a test panics. A process that
/// dies without unwinding (SIGKILL, `panic = "abort"`) leaks the server: its
/// directory under `/tmp` is named `pgs*` and the log inside names it.
#[derive(Debug)]
pub struct TempPostgres {
    /// `None` only during `Drop`.
    dir: Option<TempDir>,
    /// Path of `dir` (also the socket directory).
    root: PathBuf,
    data_dir: PathBuf,
    log_path: PathBuf,
    port: u16,
    bins: Binaries,
    run_as: Option<RunAs>,
    /// The postmaster, while we have not seen it exit.
    child: Option<Child>,
    options: Options,
}

impl TempPostgres {
    /// Creates a cluster (initdb) in a new short temp directory and starts it;
    /// returns once the server accepts connections.
    ///
    /// Fails (with [`PostgresNotFound`] inside the error) when the server
    /// binaries are missing, when run as root without a `postgres` system
    /// user, when initdb fails (its output is in the error), or when the
    /// server does not become ready within 30 seconds (the end of its log is
    /// in the error). Nothing is left behind on failure.
    pub fn start() -> anyhow::Result<TempPostgres> {
        TempPostgres::start_with(Options::default())
    }

    /// Starts a server like [`TempPostgres::start`], set up as `options` say; fails also
    /// when no TCP port is free or the TLS files cannot be written.
    pub fn start_with(options: Options) -> anyhow::Result<TempPostgres> {
        let started = Instant::now();
        let bins = Binaries::find()?;
        let run_as = RunAs::for_current_user()?;
        let dir = tempfile::Builder::new()
            .prefix("pgs")
            .tempdir_in("/tmp")
            .context("creating a temporary directory in /tmp")?;
        let root = dir.path().to_path_buf();
        if let Some(user) = &run_as {
            std::os::unix::fs::chown(&root, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
                .with_context(|| {
                    format!("giving {} to the `{SERVER_USER}` user", root.display())
                })?;
        }
        let mut pg = TempPostgres {
            data_dir: root.join(DATA_DIR),
            log_path: root.join(LOG_FILE),
            root,
            dir: Some(dir),
            port: if options.tcp {
                free_tcp_port()?
            } else {
                DEFAULT_PORT
            },
            bins,
            run_as,
            child: None,
            options,
        };
        pg.initdb()?;
        pg.write_tls_files()?;
        let initialized = started.elapsed();
        // A TCP port found free may be taken by another process before the server binds
        // it: then another one is tried.
        let mut attempts = if pg.options.tcp { 3 } else { 1 };
        while let Err(e) = pg.spawn() {
            attempts -= 1;
            if attempts == 0 {
                return Err(e);
            }
            pg.port = free_tcp_port()?;
        }
        tracing::debug!(
            dir = %pg.root.display(),
            initdb = ?initialized,
            total = ?started.elapsed(),
            "temporary PostgreSQL started"
        );
        Ok(pg)
    }

    /// libpq key=value connection string:
    /// `host=<socket dir> port=<port> user=postgres dbname=postgres`.
    /// Accepted by `tokio_postgres::connect` and by `psql`.
    pub fn url(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            conninfo_value(&self.root.to_string_lossy()),
            self.port
        )
    }

    /// The socket directory, for callers that build their own URLs.
    pub fn socket_dir(&self) -> &Path {
        &self.root
    }

    /// The port: it names the socket file `.s.PGSQL.<port>` in
    /// [`socket_dir`](Self::socket_dir), and is the TCP port on 127.0.0.1 when
    /// [`Options::tcp`] is set (otherwise there is no TCP listener).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log (the server's stdout and stderr, appended across
    /// restarts).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Process id of the postmaster while it is (or may still be) running;
    /// `None` once it has been seen to exit.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the server (Fast = SIGINT, Immediate = SIGQUIT) and waits for it
    /// to exit (up to 60 s for Fast, 15 s for Immediate).
    ///
    /// Stopping a server that is not running is a no-op. If the deadline
    /// passes the error says so and the server is left running; calling again
    /// with [`StopMode::Immediate`], or dropping the `TempPostgres`, ends it.
    pub fn stop(&mut self, mode: StopMode) -> anyhow::Result<()> {
        if !self.is_running() {
            return Ok(());
        }
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        let pid = child_pid(child)?;
        // The child is not reaped until we wait for it, so this pid cannot be
        // reused by another process in between.
        kill(pid, mode.signal())
            .with_context(|| format!("sending {} to postgres (pid {pid})", mode.signal()))?;
        let started = Instant::now();
        let waited = wait_with_deadline(child, mode.timeout())
            .with_context(|| format!("waiting for postgres (pid {pid}) to exit"))?;
        match waited {
            Some(status) => {
                tracing::debug!(%pid, %status, took = ?started.elapsed(), %mode, "postgres stopped");
                self.child = None;
                Ok(())
            }
            None => bail!(
                "postgres (pid {pid}) did not exit within {:?} of a {mode} shutdown; it is still \
                 running. Last lines of {}:\n{}",
                mode.timeout(),
                self.log_path.display(),
                log_tail(&self.log_path)
            ),
        }
    }

    /// Starts the stopped server again on the same data directory and socket;
    /// returns once it accepts connections (after crash recovery, if it was
    /// stopped with [`StopMode::Immediate`]).
    ///
    /// Fails if the server is still running (stop it first) or does not
    /// become ready within 30 seconds.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            bail!(
                "postgres is still running (pid {}); stop it before restarting",
                self.pid().unwrap_or_default()
            );
        }
        let started = Instant::now();
        self.spawn()?;
        tracing::debug!(took = ?started.elapsed(), "temporary PostgreSQL restarted");
        Ok(())
    }

    /// Whether the server process is running (reaps it if it has exited).
    pub fn is_running(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        match child.try_wait() {
            Ok(None) => true,
            Ok(Some(status)) => {
                tracing::debug!(pid = child.id(), %status, "postgres has exited");
                self.child = None;
                false
            }
            Err(e) => {
                // Only possible if someone else reaped it: it is gone.
                tracing::warn!(pid = child.id(), error = %e, "cannot wait for postgres");
                self.child = None;
                false
            }
        }
    }

    /// Replaces `pg_hba.conf` with `hba` and has the server read it again (SIGHUP);
    /// returns at once: the server applies it within milliseconds, which callers poll for.
    pub fn set_hba(&self, hba: &str) -> anyhow::Result<()> {
        let path = self.data_dir.join("pg_hba.conf");
        fs::write(&path, hba).with_context(|| format!("writing {}", path.display()))?;
        let child = self.child.as_ref().context("postgres is not running")?;
        kill(child_pid(child)?, Signal::SIGHUP).context("sending SIGHUP to postgres")
    }

    /// Writes the certificate and key of [`Options::tls`] beside the data directory, owned
    /// by the server's user, the key readable by it only (PostgreSQL refuses it otherwise).
    fn write_tls_files(&self) -> anyhow::Result<()> {
        let Some(tls) = &self.options.tls else {
            return Ok(());
        };
        for (name, pem, mode) in [
            ("server.crt", &tls.cert_pem, 0o644),
            ("server.key", &tls.key_pem, 0o600),
        ] {
            let path = self.root.join(name);
            fs::write(&path, pem).with_context(|| format!("writing {}", path.display()))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                .with_context(|| format!("chmod {}", path.display()))?;
            if let Some(user) = &self.run_as {
                std::os::unix::fs::chown(&path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
                    .with_context(|| format!("chown {}", path.display()))?;
            }
        }
        Ok(())
    }

    /// A command for a server program, as the right user, in our directory.
    fn command(&self, program: &Path) -> Command {
        let mut command = Command::new(program);
        if let Some(user) = &self.run_as {
            command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
        command.current_dir(&self.root).stdin(Stdio::null());
        command
    }

    fn initdb(&self) -> anyhow::Result<()> {
        let out = self
            .command(&self.bins.initdb)
            .arg("-D")
            .arg(&self.data_dir)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ])
            .output()
            .with_context(|| format!("running {}", self.bins.initdb.display()))?;
        if !out.status.success() {
            bail!(
                "{} failed ({}):\n{}{}",
                self.bins.initdb.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Spawns the postmaster and waits until it is ready.
    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening {}", self.log_path.display()))?;
        let log_err = log.try_clone().context("duplicating the log file handle")?;
        let mut command = self.command(&self.bins.postgres);
        command
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.root.display()))
            .args(["-c", "max_connections=100", "-c"])
            .arg(if self.options.tcp {
                "listen_addresses=127.0.0.1"
            } else {
                "listen_addresses="
            });
        if self.options.tls.is_some() {
            command.args(["-c", "ssl=on", "-c"]);
            command.arg(format!(
                "ssl_cert_file={}",
                self.root.join("server.crt").display()
            ));
            command.arg("-c");
            command.arg(format!(
                "ssl_key_file={}",
                self.root.join("server.key").display()
            ));
        }
        let child = command
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .with_context(|| format!("starting {}", self.bins.postgres.display()))?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// Polls `postmaster.pid` until our postmaster reports `ready`.
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let pid_file = self.data_dir.join("postmaster.pid");
        let mut pause = Duration::from_millis(2);
        loop {
            let Some(child) = self.child.as_mut() else {
                bail!("postgres is not running");
            };
            if let Some(status) = child.try_wait().context("checking on postgres")? {
                self.child = None;
                bail!(
                    "postgres exited during startup ({status}); last lines of {}:\n{}",
                    self.log_path.display(),
                    log_tail(&self.log_path)
                );
            }
            if pid_file_says_ready(&pid_file, child.id()) {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                let pid = child.id();
                if terminate(child) {
                    self.child = None;
                }
                bail!(
                    "postgres (pid {pid}) was not ready within {START_TIMEOUT:?} and was stopped; \
                     last lines of {}:\n{}",
                    self.log_path.display(),
                    log_tail(&self.log_path)
                );
            }
            sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take()
            && !terminate(&mut child)
        {
            // Leave the directory to whatever still runs in it.
            tracing::warn!(dir = %self.root.display(), "leaking temporary PostgreSQL");
            if let Some(dir) = self.dir.take() {
                let _ = dir.keep();
            }
            return;
        }
        let Some(dir) = self.dir.take() else {
            return;
        };
        if let Err(first) = dir.close() {
            // After a SIGKILL, orphaned backends may still write for a moment.
            let deadline = Instant::now() + REMOVE_TIMEOUT;
            let mut last = first;
            while Instant::now() < deadline {
                sleep(Duration::from_millis(20));
                match fs::remove_dir_all(&self.root) {
                    Ok(()) => return,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                    Err(e) => last = e,
                }
            }
            tracing::warn!(dir = %self.root.display(), error = %last, "could not remove temporary PostgreSQL directory");
        }
    }
}

/// Ends the postmaster whatever it takes: SIGQUIT, wait, SIGKILL, wait.
/// Returns whether it is gone (and reaped). Never panics; logs what it could
/// not do.
fn terminate(child: &mut Child) -> bool {
    match child.try_wait() {
        Ok(None) => {}
        Ok(Some(_)) => return true,
        Err(e) => {
            // Only possible if someone else reaped it: it is gone.
            tracing::warn!(pid = child.id(), error = %e, "cannot wait for postgres");
            return true;
        }
    }
    if let Ok(pid) = child_pid(child) {
        if let Err(e) = kill(pid, Signal::SIGQUIT) {
            tracing::warn!(%pid, error = %e, "cannot send SIGQUIT to postgres");
        }
        if let Ok(Some(_)) = wait_with_deadline(child, IMMEDIATE_STOP_TIMEOUT) {
            return true;
        }
        tracing::warn!(%pid, "postgres did not exit after SIGQUIT; sending SIGKILL");
    }
    if let Err(e) = child.kill() {
        tracing::warn!(pid = child.id(), error = %e, "cannot kill postgres");
        return false;
    }
    match wait_with_deadline(child, KILL_TIMEOUT) {
        Ok(Some(_)) => true,
        Ok(None) => {
            tracing::warn!(pid = child.id(), "postgres survived SIGKILL");
            false
        }
        Err(e) => {
            tracing::warn!(pid = child.id(), error = %e, "cannot wait for postgres");
            false
        }
    }
}

fn child_pid(child: &Child) -> anyhow::Result<Pid> {
    let raw = i32::try_from(child.id()).context("process id out of range")?;
    Ok(Pid::from_raw(raw))
}

/// Waits for `child` to exit; `Ok(None)` if it is still running at the
/// deadline.
fn wait_with_deadline(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Whether `postmaster.pid` belongs to `pid` and its status line (the 8th)
/// says `ready`.
fn pid_file_says_ready(pid_file: &Path, pid: u32) -> bool {
    let Ok(text) = fs::read_to_string(pid_file) else {
        return false;
    };
    let mut lines = text.lines();
    let owner = lines.next().and_then(|l| l.trim().parse::<u32>().ok());
    owner == Some(pid) && lines.nth(6).is_some_and(|status| status.trim() == "ready")
}

/// The last [`LOG_TAIL_LINES`] lines of the log, for error messages.
fn log_tail(path: &Path) -> String {
    const MAX_BYTES: u64 = 16 * 1024;
    let read = || -> io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(MAX_BYTES)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(LOG_TAIL_LINES);
            lines[start..].join("\n")
        }
        Err(e) => format!("(cannot read the log: {e})"),
    }
}

/// Quotes a libpq connection-string value when it needs it.
fn conninfo_value(value: &str) -> String {
    if !value.is_empty() && !value.contains(|c: char| c.is_whitespace() || c == '\'' || c == '\\') {
        return value.to_owned();
    }
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('\'');
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('\'');
    quoted
}

/// The PostgreSQL a command line asked for: `url` when given (typically `--database-url`),
/// otherwise a new [`TempPostgres`], started on a blocking thread after printing
/// `starting a throwaway PostgreSQL ...` to stdout.
///
/// Returns the connection string and the throwaway server, if one was started; keep the
/// server alive while the URL is in use (dropping it stops the server and removes its
/// files).
///
/// # Errors
/// When the throwaway server cannot be started (see [`TempPostgres::start`]) or starting
/// it panicked. A given `url` is returned as it is, unchecked.
pub async fn given_or_throwaway(
    url: Option<&str>,
) -> anyhow::Result<(String, Option<TempPostgres>)> {
    if let Some(url) = url {
        return Ok((url.to_owned(), None));
    }
    println!("starting a throwaway PostgreSQL ...");
    let pg = tokio::task::spawn_blocking(TempPostgres::start)
        .await
        .context("starting PostgreSQL panicked")??;
    Ok((pg.url(), Some(pg)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_numerically() {
        let mut v = [
            parse_version("9.6"),
            parse_version("15"),
            parse_version("10"),
        ];
        v.sort();
        assert_eq!(v.last(), Some(&Some(vec![15])));
        assert_eq!(parse_version("main"), None);
        assert_eq!(parse_version(""), None);
    }

    /// Writes an executable shell script.
    fn script(path: &Path, body: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn binaries_are_searched_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        let none = OsStr::new("");
        let missing_pg_config = t.join("no-pg_config");
        let missing = missing_pg_config.as_os_str();

        // Nothing anywhere: the error lists each place and says how to fix it.
        let err = Binaries::find_in(missing, none, &t.join("lib")).unwrap_err();
        let message = err.to_string();
        assert_eq!(err.searched.len(), 3, "{message}");
        assert!(message.contains("apt-get install postgresql"), "{message}");
        assert!(message.contains("PATH (no initdb)"), "{message}");

        // The highest version under the versions root, numerically.
        for v in ["9.6", "15", "10", "16"] {
            for program in ["initdb", "postgres"] {
                script(&t.join(format!("lib/{v}/bin/{program}")), "exit 0");
            }
        }
        fs::remove_file(t.join("lib/16/bin/postgres")).unwrap(); // incomplete
        let found = Binaries::find_in(missing, none, &t.join("lib")).unwrap();
        assert_eq!(found.initdb, t.join("lib/15/bin/initdb"));

        // initdb on PATH beats the versions root; postgres beside its real file.
        std::os::unix::fs::symlink(t.join("lib/10/bin/initdb"), {
            fs::create_dir_all(t.join("path")).unwrap();
            t.join("path/initdb")
        })
        .unwrap();
        let path = t.join("path");
        let found = Binaries::find_in(missing, path.as_os_str(), &t.join("lib")).unwrap();
        assert_eq!(found.postgres, t.join("lib/10/bin/postgres"));

        // pg_config --bindir beats everything.
        let pg_config = t.join("pg_config");
        script(
            &pg_config,
            &format!("echo {}", t.join("lib/9.6/bin").display()),
        );
        let found =
            Binaries::find_in(pg_config.as_os_str(), path.as_os_str(), &t.join("lib")).unwrap();
        assert_eq!(found.postgres, t.join("lib/9.6/bin/postgres"));
    }

    #[test]
    fn conninfo_values_are_quoted_when_needed() {
        assert_eq!(conninfo_value("/tmp/pgsAbc123"), "/tmp/pgsAbc123");
        assert_eq!(conninfo_value("a b"), "'a b'");
        assert_eq!(conninfo_value(r"it's\"), r"'it\'s\\'");
        assert_eq!(conninfo_value(""), "''");
    }

    #[test]
    fn pid_file_status_is_parsed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("postmaster.pid");
        let body = |status: &str| {
            format!("4242\n/data\n1700000000\n5432\n/tmp/x\n\n  1234     5678\n{status:<8}\n")
        };
        fs::write(&file, body("starting")).unwrap();
        assert!(!pid_file_says_ready(&file, 4242));
        fs::write(&file, body("ready")).unwrap();
        assert!(pid_file_says_ready(&file, 4242));
        assert!(
            !pid_file_says_ready(&file, 4243),
            "stale file of another process"
        );
        assert!(!pid_file_says_ready(&dir.path().join("missing"), 4242));
    }
}
