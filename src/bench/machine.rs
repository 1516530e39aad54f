//! The machine a `pgspool bench` run measured: CPU, memory, kernel, the disk of the WAL
//! directories and how fast it makes a small write durable, and the PostgreSQL server
//! with the settings that bear on write speed.
//!
//! The fdatasync probe appends [`PROBE_BLOCK`] bytes to a file in the WAL directory and
//! `fdatasync`s it, [`PROBE_SYNCS`] times, as the WAL writer appends and syncs a group
//! commit. Its p99 is what the disk alone adds to a durable ack, to hold the goal "p99
//! ack latency under 5 ms" against.

use std::fs;
use std::io::{self, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use super::results::Latencies;

/// Bytes appended before each `fdatasync` of the probe: 4 KiB.
pub const PROBE_BLOCK: usize = 4096;
/// `fdatasync`s the probe times.
pub const PROBE_SYNCS: usize = 200;

/// The machine and the server.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// `model name` of `/proc/cpuinfo`.
    pub cpu_model: String,
    /// CPUs this process may run on.
    pub cores: usize,
    /// `MemTotal` of `/proc/meminfo`, in GiB.
    pub memory_gib: f64,
    /// The kernel release.
    pub kernel: String,
    /// The device and file system the WAL directories were on (`/proc/mounts`).
    pub wal_disk: Option<String>,
    /// Median time to append 4 KiB to a file in the WAL directory and `fdatasync` it, in
    /// milliseconds; `None` when the probe failed or the report predates it.
    #[serde(default)]
    pub fdatasync_p50_ms: Option<f64>,
    /// 99th percentile of the same, in milliseconds.
    #[serde(default)]
    pub fdatasync_p99_ms: Option<f64>,
    /// The PostgreSQL server.
    pub postgresql: PostgresInfo,
}

/// The PostgreSQL server and its durability and memory settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PostgresInfo {
    /// `SELECT version()`.
    pub version: String,
    /// `SHOW fsync`.
    pub fsync: String,
    /// `SHOW synchronous_commit`.
    pub synchronous_commit: String,
    /// `SHOW shared_buffers`.
    pub shared_buffers: String,
}

impl Machine {
    /// Describes this machine, the file system of `wal_dir` and the server of `client`,
    /// and measures the `fdatasync` latency in `wal_dir` ([`fdatasync_latency`] of
    /// [`PROBE_SYNCS`] syncs on a blocking thread: a second on a disk that syncs in 5 ms).
    /// What cannot be read or measured is left empty.
    pub async fn describe(client: &Client, wal_dir: &Path) -> Machine {
        let dir = wal_dir.to_path_buf();
        let probe = tokio::task::spawn_blocking(move || fdatasync_latency(&dir, PROBE_SYNCS))
            .await
            .unwrap_or_else(|e| Err(io::Error::other(format!("the probe panicked: {e}"))))
            .inspect_err(|e| {
                tracing::warn!(dir = %wal_dir.display(), error = %e, "cannot measure fdatasync");
            })
            .ok();
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let show = |name: &'static str| async move {
            client
                .query_one(&format!("SHOW {name}"), &[])
                .await
                .map_or_else(|e| format!("({e})"), |r| r.get(0))
        };
        Machine {
            cpu_model: field(&cpuinfo, "model name").unwrap_or_default(),
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            memory_gib: field(&meminfo, "MemTotal")
                .and_then(|v| v.trim_end_matches("kB").trim().parse::<f64>().ok())
                .map_or(0.0, |kib| kib / f64::from(1 << 20)),
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            wal_disk: mount_of(wal_dir),
            fdatasync_p50_ms: probe.map(|(p50, _)| millis(p50)),
            fdatasync_p99_ms: probe.map(|(_, p99)| millis(p99)),
            postgresql: PostgresInfo {
                version: client
                    .query_one("SELECT version()", &[])
                    .await
                    .map_or_else(|e| format!("({e})"), |r| r.get(0)),
                fsync: show("fsync").await,
                synchronous_commit: show("synchronous_commit").await,
                shared_buffers: show("shared_buffers").await,
            },
        }
    }

    /// One line: `CPU model, 2 cores, 7.8 GiB memory, Linux 6.1; WAL on /dev/vda (ext4);
    /// fdatasync of 4 KiB: p50 0.41 ms, p99 1.20 ms`.
    pub fn summary(&self) -> String {
        let mut line = format!(
            "{}, {} cores, {:.1} GiB memory, Linux {}",
            self.cpu_model, self.cores, self.memory_gib, self.kernel
        );
        if let Some(disk) = &self.wal_disk {
            line.push_str(&format!("; WAL on {disk}"));
        }
        if let (Some(p50), Some(p99)) = (self.fdatasync_p50_ms, self.fdatasync_p99_ms) {
            line.push_str(&format!(
                "; fdatasync of 4 KiB: p50 {p50:.2} ms, p99 {p99:.2} ms"
            ));
        }
        line
    }

    /// One line: the server's version and settings.
    pub fn postgres_summary(&self) -> String {
        let pg = &self.postgresql;
        format!(
            "{} (fsync {}, synchronous_commit {}, shared_buffers {})",
            pg.version, pg.fsync, pg.synchronous_commit, pg.shared_buffers
        )
    }
}

/// The p50 and p99 of `syncs` times appending [`PROBE_BLOCK`] bytes to a new file in `dir`
/// and `fdatasync`ing it (the append and the sync are timed together). The file is
/// removed again, also on error.
///
/// # Errors
/// When the file cannot be created, written or synced, or `syncs` is 0.
pub fn fdatasync_latency(dir: &Path, syncs: usize) -> io::Result<(Duration, Duration)> {
    let mut file = tempfile::Builder::new()
        .prefix(".pgspool-fdatasync-probe")
        .tempfile_in(dir)?;
    let block = [0x5a_u8; PROBE_BLOCK];
    let mut took = Vec::with_capacity(syncs);
    for _ in 0..syncs {
        let started = Instant::now();
        file.write_all(&block)?;
        file.as_file().sync_data()?;
        took.push(started.elapsed());
    }
    file.close()?;
    let took = Latencies::new(took);
    match (took.percentile(50.0), took.percentile(99.0)) {
        (Some(p50), Some(p99)) => Ok((p50, p99)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no fdatasync to measure",
        )),
    }
}

/// A duration in milliseconds.
fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The value of the first `key : value` line of a `/proc` file.
fn field(text: &str, key: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_string())
}

/// `device (fstype)` of the mount holding `path`: the longest mount point it is under.
fn mount_of(path: &Path) -> Option<String> {
    let path = fs::canonicalize(path).ok()?;
    let mounts = fs::read_to_string("/proc/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let (device, point, fstype) = (parts.next()?, parts.next()?, parts.next()?);
            path.starts_with(point)
                .then(|| (point.len(), format!("{device} ({fstype})")))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, disk)| disk)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_fields_are_read() {
        assert_eq!(
            field(
                "processor\t: 0\nmodel name\t: Some CPU @ 2GHz\n",
                "model name"
            ),
            Some("Some CPU @ 2GHz".to_string())
        );
        assert_eq!(
            field("MemTotal:  8000 kB\n", "MemTotal"),
            Some("8000 kB".to_string())
        );
        assert_eq!(field("", "x"), None);
        assert!(mount_of(Path::new("/")).is_some());
    }

    #[test]
    fn the_fdatasync_probe_measures_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let (p50, p99) = fdatasync_latency(dir.path(), 20).unwrap();
        assert!(
            Duration::ZERO < p50 && p50 <= p99,
            "p50 {p50:?}, p99 {p99:?}"
        );
        assert!(p99 < Duration::from_secs(10), "p99 {p99:?}");
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            0,
            "the file is removed"
        );
        assert!(fdatasync_latency(dir.path(), 0).is_err());
        assert!(fdatasync_latency(&dir.path().join("missing"), 1).is_err());
    }

    #[test]
    fn the_probe_is_in_the_summary_and_optional_in_json() {
        let mut machine = Machine {
            cpu_model: "CPU".into(),
            cores: 2,
            memory_gib: 7.8,
            kernel: "6.1".into(),
            wal_disk: Some("/dev/vda (ext4)".into()),
            ..Machine::default()
        };
        assert!(
            !machine.summary().contains("fdatasync"),
            "{}",
            machine.summary()
        );
        let mut json = serde_json::to_value(&machine).unwrap();
        let fields = json.as_object_mut().unwrap();
        fields.remove("fdatasync_p50_ms");
        fields.remove("fdatasync_p99_ms");
        let older: Machine = serde_json::from_value(json).unwrap();
        assert_eq!(older, machine, "a report without the probe still loads");

        (machine.fdatasync_p50_ms, machine.fdatasync_p99_ms) = (Some(0.4), Some(1.2));
        assert_eq!(
            machine.summary(),
            "CPU, 2 cores, 7.8 GiB memory, Linux 6.1; WAL on /dev/vda (ext4); \
             fdatasync of 4 KiB: p50 0.40 ms, p99 1.20 ms"
        );
    }
}
