//! The shared harness: throwaway PostgreSQL servers, daemons in this process or as real
//! processes, clients, and polling with deadlines.

use std::ffi::OsStr;
use std::future::Future;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use pgspool::app::Daemon;
use pgspool::client::{Reply, SpoolClient};
use pgspool::config::Config;
use pgspool::pgtemp::{StopMode, TempPostgres};
use tokio_postgres::Client;

/// Longest a test waits for anything to happen.
pub const DEADLINE: Duration = Duration::from_secs(120);

/// A throwaway PostgreSQL server with a connected client.
pub struct Pg {
    pub server: TempPostgres,
    pub client: Client,
}

impl Pg {
    /// Starts a server and connects to it.
    pub async fn start() -> Pg {
        let server = tokio::task::spawn_blocking(TempPostgres::start)
            .await
            .expect("start panicked")
            .expect("start PostgreSQL");
        let client = connect(&server.url()).await;
        Pg { server, client }
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Runs SQL statements.
    pub async fn exec(&self, sql: &str) {
        self.client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// The single bigint a query returns.
    pub async fn count(&self, sql: &str) -> i64 {
        self.client
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }

    /// The bigints a query returns, one per row, sorted.
    pub async fn ids(&self, sql: &str) -> Vec<i64> {
        let mut ids: Vec<i64> = self
            .client
            .query(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .iter()
            .map(|r| r.get(0))
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Sets a server option for every session, existing and new: `ALTER SYSTEM SET`, then a
    /// configuration reload, then waits until a new session sees the value. For options a
    /// reload can change (`log_statement`, `statement_timeout`, ...), not those that need a
    /// restart. The throwaway server has no way to pass options at start, and this one needs
    /// none: `ALTER SYSTEM` writes `postgresql.auto.conf`, which outlives restarts.
    pub async fn set_server_option(&self, name: &str, value: &str) {
        self.exec(&format!("ALTER SYSTEM SET {name} = '{value}'"))
            .await;
        self.exec("SELECT pg_reload_conf()").await;
        let url = self.url();
        wait_until(&format!("{name} is {value} in new sessions"), || async {
            let fresh = connect(&url).await;
            let shown: String = fresh
                .query_one(&format!("SHOW {name}"), &[])
                .await
                .expect("SHOW")
                .get(0);
            shown == value
        })
        .await;
    }

    /// The server log so far (appended across restarts).
    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.server.log_path()).unwrap_or_default()
    }

    /// Stops the server (the client is reconnected by [`Pg::restart`]).
    pub fn stop(&mut self, mode: StopMode) {
        self.server.stop(mode).expect("stop PostgreSQL");
    }

    /// Starts the stopped server again and reconnects the client.
    pub async fn restart(&mut self) {
        self.server.restart().expect("restart PostgreSQL");
        self.client = connect(&self.server.url()).await;
    }
}

pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to PostgreSQL");
    tokio::spawn(connection);
    client
}

/// A short temporary directory (Unix socket paths are limited to 107 bytes).
pub fn short_tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("pgsp")
        .tempdir_in("/tmp")
        .expect("tempdir")
}

/// A configuration for a daemon in `dir` loading into `url`, with short retry waits.
pub fn config(dir: &Path, url: &str) -> Config {
    let mut config = Config::default();
    config.listen.socket = dir.join("s.sock");
    config.wal.dir = dir.join("wal");
    config.postgres.url = Some(url.to_string());
    config.postgres.retry_max = Duration::from_millis(500);
    config.batch.max_wait = Duration::from_millis(20);
    config
}

/// Starts a daemon in this process.
pub async fn start_daemon(config: Config) -> Daemon {
    Daemon::start(config).await.expect("start the daemon")
}

/// Waits until everything durable now is committed in PostgreSQL, or panics after
/// [`DEADLINE`].
pub async fn flushed(daemon: &Daemon) {
    tokio::time::timeout(DEADLINE, daemon.wait_flushed())
        .await
        .expect("timed out waiting for the flusher to commit everything durable");
}

/// A client connected to `socket`.
pub async fn client(socket: &Path) -> SpoolClient {
    SpoolClient::connect(socket)
        .await
        .expect("connect to pgspool")
}

/// Posts an NDJSON body.
pub async fn post_ndjson(client: &mut SpoolClient, table: &str, body: &str) -> Reply {
    client
        .post_rows(table, "application/x-ndjson", body.to_string())
        .await
        .expect("request")
}

/// `pgspool status --json` of the WAL directory `wal`, with no daemon answering on the
/// socket it asks: the verdict's state (`unreachable` when the WAL is intact, `corrupt`
/// when damaged) and the JSON. Panics unless the exit code is the verdict's.
pub fn status(wal: &Path) -> (String, serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_pgspool"))
        .args(["status", "--json", "--socket"])
        .arg(wal.with_file_name("no-daemon.sock"))
        .arg("--wal-dir")
        .arg(wal)
        .output()
        .expect("run status");
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    let verdict = &json["verdict"];
    assert_eq!(
        out.status.code().map(i64::from),
        verdict["exit_code"].as_i64(),
        "{json:#}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state = verdict["state"].as_str().unwrap_or_default().to_string();
    (state, json)
}

/// `pgspool status --json` of the WAL directory `wal`, with no daemon answering; panics
/// unless the WAL is intact.
pub fn status_json(wal: &Path) -> serde_json::Value {
    let (state, json) = status(wal);
    assert_eq!(state, "unreachable", "{json:#}");
    assert_eq!(json["intact"], true, "{json:#}");
    json
}

/// Panics, naming `what`, unless `out` is a success that printed nothing: for tools that
/// exit 0 and report problems on their output (`promtool check metrics`, `fiu-ctrl`).
pub fn assert_quiet_success(out: &Output, what: &str) {
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "{what} ({}): {said}",
        out.status
    );
}

/// Polls `check` until it returns true; panics with `what` after [`DEADLINE`].
pub async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + DEADLINE;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The daemon as a real process of the built binary, for signals and exit codes.
pub struct DaemonProcess {
    pub child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl DaemonProcess {
    /// Spawns `pgspool run` with the given arguments and waits until `/healthz` answers.
    pub async fn spawn(dir: &Path, url: &str, extra: &[&str]) -> DaemonProcess {
        let mut process = DaemonProcess::start(&[], dir, url, extra);
        process.wait_ready().await;
        process
    }

    /// Spawns `pgspool run` with the given arguments, run by `wrapper` (a program and its
    /// arguments, such as `fiu-run -x`, which then runs the binary) when it is not empty,
    /// and returns at once: call [`DaemonProcess::wait_ready`] before sending requests.
    /// The daemon's stderr is appended to [`DaemonProcess::log_path`].
    pub fn start(wrapper: &[&OsStr], dir: &Path, url: &str, extra: &[&str]) -> DaemonProcess {
        DaemonProcess::start_with_env(wrapper, dir, url, extra, &[])
    }

    /// Spawns `pgspool run` like [`DaemonProcess::start`], with `env` added to its
    /// environment.
    pub fn start_with_env(
        wrapper: &[&OsStr],
        dir: &Path,
        url: &str,
        extra: &[&str],
        env: &[(&str, &OsStr)],
    ) -> DaemonProcess {
        let socket = dir.join("s.sock");
        let log = DaemonProcess::log_path(dir);
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let binary = OsStr::new(env!("CARGO_BIN_EXE_pgspool"));
        let mut command = match wrapper {
            [] => Command::new(binary),
            [program, args @ ..] => {
                let mut command = Command::new(program);
                command.args(args).arg(binary);
                command
            }
        };
        let child = command
            .arg("run")
            .arg("--socket")
            .arg(&socket)
            .arg("--wal-dir")
            .arg(dir.join("wal"))
            .arg("--database-url")
            .arg(url)
            .args(extra)
            .env("RUST_LOG", "pgspool=debug,info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn pgspool");
        DaemonProcess { child, socket, log }
    }

    /// The file [`DaemonProcess::start`] appends the daemon's stderr to, in `dir`.
    pub fn log_path(dir: &Path) -> PathBuf {
        dir.join(format!("daemon-{}.log", std::process::id()))
    }

    /// Waits until `/healthz` answers; panics if the process exits first or after
    /// [`DEADLINE`]. Polls every millisecond at first, then less often.
    pub async fn wait_ready(&mut self) {
        let socket = self.socket.clone();
        let deadline = Instant::now() + DEADLINE;
        let mut pause = Duration::from_millis(1);
        loop {
            if let Ok(mut c) = SpoolClient::connect(&socket).await
                && c.get("/healthz").await.is_ok_and(|r| r.status == 200)
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("pgspool exited with {status}: {}", self.log_tail());
            }
            assert!(
                Instant::now() < deadline,
                "pgspool did not become ready: {}",
                self.log_tail()
            );
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the process exits by itself and returns its status; panics after
    /// [`DEADLINE`].
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for pgspool") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "pgspool did not exit by itself: {}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the process with SIGKILL and reaps it; panics if it had exited by itself
    /// before.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL");
        let status = self.child.wait().expect("reap");
        assert_eq!(
            status.signal(),
            Some(Signal::SIGKILL as i32),
            "pgspool was no longer running when killed: it exited with {status}: {}",
            self.log_tail()
        );
    }

    /// Stops the process gracefully (SIGTERM) and waits until it exits.
    pub async fn terminate(&mut self) -> ExitStatus {
        let pid = Pid::from_raw(i32::try_from(self.pid()).expect("pid"));
        nix::sys::signal::kill(pid, Signal::SIGTERM).expect("SIGTERM");
        self.wait_exit().await
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the daemon's log, for failure messages (the log of a daemon
    /// restarted many times is long).
    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
