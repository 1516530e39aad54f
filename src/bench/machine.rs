//! The machine a `pgspool bench` run measured: CPU, memory, kernel, the disk of the WAL
//! directories, and the PostgreSQL server with the settings that bear on write speed.

use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

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
    /// Describes this machine, the file system of `wal_dir` and the server of `client`.
    /// What cannot be read is left empty.
    pub async fn describe(client: &Client, wal_dir: &Path) -> Machine {
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

    /// One line: `CPU model, 2 cores, 7.8 GiB, Linux 6.1; WAL on /dev/vda (ext4)`.
    pub fn summary(&self) -> String {
        let mut line = format!(
            "{}, {} cores, {:.1} GiB memory, Linux {}",
            self.cpu_model, self.cores, self.memory_gib, self.kernel
        );
        if let Some(disk) = &self.wal_disk {
            line.push_str(&format!("; WAL on {disk}"));
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
}
