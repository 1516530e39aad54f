//! The daemon of a `pgspool bench` scenario, as a child process of this very binary
//! (`pgspool run`), so that its CPU time and peak memory are its own: started, polled
//! until ready, measured through `/proc`, stopped. Dropping a [`DaemonProcess`] kills it,
//! so an error never leaves a daemon behind.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, SysconfVar, sysconf};
use uuid::Uuid;

use crate::client::SpoolClient;

/// How long a daemon may take to answer `/healthz` after it was started.
pub const READY_DEADLINE: Duration = Duration::from_secs(60);
/// How long a daemon may take to exit after SIGTERM (its drain timeout is 10 s).
const STOP_DEADLINE: Duration = Duration::from_secs(30);
/// Bytes of the log's end quoted in errors.
const LOG_TAIL_BYTES: u64 = 4096;

/// A `pgspool run` child process.
#[derive(Debug)]
pub struct DaemonProcess {
    child: Child,
    socket: PathBuf,
    wal_dir: PathBuf,
    log: PathBuf,
}

impl DaemonProcess {
    /// Starts `pgspool run [--config <config>] --socket <dir>/s.sock --wal-dir <wal_dir>
    /// --database-url <url> --log-level warn`, its stderr appended to `<dir>/daemon.log`.
    /// Returns at once: see
    /// [`wait_ready`](Self::wait_ready).
    ///
    /// # Errors
    /// When the process cannot be started.
    pub fn spawn(
        dir: &Path,
        wal_dir: &Path,
        url: &str,
        config: Option<&Path>,
    ) -> anyhow::Result<DaemonProcess> {
        let socket = dir.join("s.sock");
        let log = dir.join("daemon.log");
        let log_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let binary = std::env::current_exe().context("finding the pgspool binary")?;
        let mut command = Command::new(&binary);
        command.arg("run");
        if let Some(config) = config {
            command.arg("--config").arg(config);
        }
        let child = command
            .arg("--socket")
            .arg(&socket)
            .arg("--wal-dir")
            .arg(wal_dir)
            .arg("--database-url")
            .arg(url)
            .args(["--log-level", "warn"])
            // The flag, not the environment, sets the level; the daemon is not a service.
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {} run", binary.display()))?;
        Ok(DaemonProcess {
            child,
            socket,
            wal_dir: wal_dir.to_path_buf(),
            log,
        })
    }

    /// The daemon's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Polls `GET /healthz` every `pause` until it answers 200.
    ///
    /// # Errors
    /// When the process exits first, or after [`READY_DEADLINE`] (with the log's end).
    pub async fn wait_ready(&mut self, pause: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            if let Ok(mut client) = SpoolClient::connect(&self.socket).await
                && client.get("/healthz").await.is_ok_and(|r| r.status == 200)
            {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait().context("checking on the daemon")? {
                return Err(self.failure(&format!("the daemon exited with {status}")));
            }
            if Instant::now() >= deadline {
                return Err(self.failure(&format!(
                    "the daemon did not answer /healthz within {} s",
                    READY_DEADLINE.as_secs()
                )));
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// The spool id of its WAL directory (written when the daemon opens it).
    ///
    /// # Errors
    /// When the file is missing or unreadable.
    pub fn spool_id(&self) -> anyhow::Result<Uuid> {
        crate::wal::read_spool_id(&self.wal_dir)?
            .with_context(|| format!("{} has no spool id", self.wal_dir.display()))
    }

    /// CPU time (user + system) the daemon used so far, in seconds: fields 14 and 15 of
    /// `/proc/<pid>/stat`.
    ///
    /// # Errors
    /// When `/proc` cannot be read.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let path = format!("/proc/{}/stat", self.child.id());
        let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let ticks = parse_cpu_ticks(&stat).with_context(|| format!("parsing {path}"))?;
        let per_second = sysconf(SysconfVar::CLK_TCK)
            .context("sysconf(CLK_TCK)")?
            .filter(|&t| t > 0)
            .context("no clock tick rate")?;
        Ok(ticks as f64 / per_second as f64)
    }

    /// The daemon's peak resident set so far (`VmHWM` of `/proc/<pid>/status`), in MiB.
    ///
    /// # Errors
    /// When `/proc` cannot be read.
    pub fn peak_rss_mib(&self) -> anyhow::Result<f64> {
        let path = format!("/proc/{}/status", self.child.id());
        let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let kib = parse_vm_hwm_kib(&status).with_context(|| format!("no VmHWM in {path}"))?;
        Ok(kib as f64 / 1024.0)
    }

    /// Whether the daemon still runs.
    ///
    /// # Errors
    /// When it has exited (with the end of its log).
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait().context("checking on the daemon")? {
            Some(status) => Err(self.failure(&format!("the daemon exited with {status}"))),
            None => Ok(()),
        }
    }

    /// Stops the daemon with SIGTERM and waits until it exits.
    ///
    /// # Errors
    /// When it does not exit within 30 s (it is then killed) or exits with a failure.
    pub async fn terminate(mut self) -> anyhow::Result<()> {
        self.signal(Signal::SIGTERM)?;
        let deadline = Instant::now() + STOP_DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().context("waiting for the daemon")? {
                if status.success() {
                    return Ok(());
                }
                return Err(self.failure(&format!("the daemon stopped with {status}")));
            }
            if Instant::now() >= deadline {
                return Err(self.failure("the daemon did not stop within 30 s of SIGTERM"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Kills the daemon with SIGKILL and reaps it.
    ///
    /// # Errors
    /// When it had already exited by itself, or cannot be killed.
    pub fn kill(mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait().context("checking on the daemon")? {
            return Err(self.failure(&format!("the daemon had exited with {status}")));
        }
        self.child.kill().context("killing the daemon")?;
        let status = self.child.wait().context("reaping the daemon")?;
        if status.signal() != Some(Signal::SIGKILL as i32) {
            bail!("the killed daemon exited with {status}");
        }
        Ok(())
    }

    fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).context("process id")?);
        kill(pid, signal).with_context(|| format!("sending {signal} to the daemon"))
    }

    /// An error saying `what`, with the end of the daemon's log.
    pub fn failure(&self, what: &str) -> anyhow::Error {
        anyhow!(
            "{what}; the end of its log ({}):\n{}",
            self.log.display(),
            log_tail(&self.log)
        )
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Bytes of the WAL segments (`*.wal`) in `dir`.
///
/// # Errors
/// When the directory cannot be read.
pub fn wal_bytes(dir: &Path) -> anyhow::Result<u64> {
    let mut bytes = 0;
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().ends_with(".wal") {
            bytes += entry.metadata()?.len();
        }
    }
    Ok(bytes)
}

/// utime + stime, in clock ticks, of a `/proc/<pid>/stat` line: fields 14 and 15,
/// counted after the `)` that ends the command name (which may hold spaces).
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    // The first field after the name is field 3 (state).
    let mut fields = after.split_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// `VmHWM` of a `/proc/<pid>/status`, in KiB.
fn parse_vm_hwm_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The end of a log file, for error messages.
fn log_tail(path: &Path) -> String {
    let read = || -> std::io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) if text.trim().is_empty() => "(empty)".to_string(),
        Ok(text) => text,
        Err(e) => format!("(cannot read it: {e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_fields_14_and_15() {
        let stat = "1234 (pg spool) x) S 1 1234 1234 0 -1 4194560 500 0 0 0 \
                    250 75 0 0 20 0 8 0 100 1000000 300";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        assert_eq!(parse_cpu_ticks("1 (x) S 1"), None);
        let own = fs::read_to_string("/proc/self/stat").unwrap();
        assert!(parse_cpu_ticks(&own).is_some());
    }

    #[test]
    fn vm_hwm_is_read_in_kib() {
        assert_eq!(
            parse_vm_hwm_kib("Name:\tx\nVmPeak:\t  9000 kB\nVmHWM:\t  4096 kB\n"),
            Some(4096)
        );
        assert_eq!(parse_vm_hwm_kib("Name:\tx\n"), None);
    }
}
