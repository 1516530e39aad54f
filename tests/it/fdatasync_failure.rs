//! fdatasync fails, injected into the real daemon process with libfiu (`fiu-run -x`, then
//! `fiu-ctrl` at run time): the requests it covered are not acknowledged, the daemon exits
//! non-zero by itself, and a restart without the fault loads every row acknowledged before
//! exactly once.
//!
//! Needs `fiu-run` and `fiu-ctrl` (Debian: `apt-get install fiu-utils`; `.ci/run` installs
//! them). Without them the tests fail rather than skip.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use pgspool::client::{Reply, SpoolClient};
use pgspool::pgtemp::StopMode;

use crate::harness::{DaemonProcess, Pg, short_tempdir, wait_until};
use crate::load::{
    EVENTS, Load, Shape, assert_exactly_once, flush_through_marker, rows_body, start_load, tally,
    wait_acked,
};

/// libfiu's failure point for `fdatasync(2)` in its POSIX preload library.
const FAILPOINT: &str = "posix/io/sync/fdatasync";

/// The path of `program` on PATH; panics, saying how to install it, when it is missing.
fn fiu_tool(program: &str) -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{program} not found on PATH: these tests inject faults with libfiu; install \
                 it with `apt-get install fiu-utils` (.ci/run does)"
            )
        })
}

/// A daemon run under `fiu-run -x`, its libfiu control FIFO in the test's directory.
struct FaultyDaemon {
    daemon: DaemonProcess,
    fifo: PathBuf,
}

impl FaultyDaemon {
    /// Spawns the daemon under `fiu-run -x` and waits until it is ready; checks that the
    /// process we hold is pgspool itself (fiu-run execs it) with libfiu loaded.
    async fn spawn(dir: &Path, url: &str, extra: &[&str]) -> FaultyDaemon {
        let fiu_run = fiu_tool("fiu-run");
        // Control FIFOs are `<prefix>-<pid>.in` and `.out`.
        let fifo = dir.join("fiu");
        let wrapper = [
            fiu_run.as_os_str(),
            OsStr::new("-x"),
            OsStr::new("-f"),
            fifo.as_os_str(),
        ];
        let mut daemon = DaemonProcess::start(&wrapper, dir, url, extra);
        daemon.wait_ready().await;
        let pid = daemon.pid();
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe");
        let binary = std::fs::canonicalize(env!("CARGO_BIN_EXE_pgspool")).expect("binary");
        assert_eq!(exe, binary, "pid {pid} is not the pgspool binary");
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
        assert!(
            maps.contains("fiu_posix_preload.so"),
            "libfiu's POSIX preload library is not loaded in pgspool"
        );
        let control = PathBuf::from(format!("{}-{pid}.in", fifo.display()));
        assert!(control.exists(), "no control FIFO {}", control.display());
        FaultyDaemon { daemon, fifo }
    }

    /// Makes every call of `failpoint` in the daemon fail from now on (fiu-ctrl returns
    /// once the daemon has applied it).
    fn enable(&self, failpoint: &str) {
        let out = Command::new(fiu_tool("fiu-ctrl"))
            .arg("-f")
            .arg(&self.fifo)
            .args(["-c", &format!("enable name={failpoint}")])
            .arg(self.daemon.pid().to_string())
            .output()
            .expect("run fiu-ctrl");
        // fiu-ctrl exits 0 even for an unknown pid; it says so on stdout.
        crate::harness::assert_quiet_success(&out, "fiu-ctrl");
    }
}

/// Posts rows `ids` to `ev` on a new connection.
async fn post(socket: &Path, ids: std::ops::Range<i64>) -> anyhow::Result<Reply> {
    let mut c = SpoolClient::connect(socket).await?;
    c.post_rows("ev", "application/x-ndjson", rows_body(ids, 0, 100))
        .await
}

async fn post_acknowledged(socket: &Path, ids: std::ops::Range<i64>) {
    let reply = post(socket, ids.clone()).await.expect("request");
    assert_eq!(reply.status, 202, "rows {ids:?}: {}", reply.body);
}

/// Asserts that the write of `ids` is answered 500, saying fdatasync failed.
async fn assert_fdatasync_refused(socket: &Path, ids: std::ops::Range<i64>) {
    let failed = post(socket, ids)
        .await
        .expect("the failed write is answered");
    assert_eq!(
        failed.status, 500,
        "a write whose fdatasync failed: {}",
        failed.body
    );
    let error = failed.body["error"].as_str().unwrap_or_default();
    assert!(error.contains("fdatasync"), "{}", failed.body);
}

/// Waits until the daemon exits by itself, and checks it failed on fdatasync.
async fn assert_exits_on_fdatasync(daemon: &mut DaemonProcess) {
    let status = daemon.wait_exit().await;
    assert!(!status.success(), "pgspool exited with {status}");
    let log = daemon.log_text();
    assert!(
        log.contains("stopping on a fatal error") && log.contains("fdatasync"),
        "{}",
        daemon.log_tail()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fdatasync_is_not_acknowledged_and_the_daemon_exits_then_recovers() {
    let mut pg = Pg::start().await;
    pg.exec(EVENTS).await;
    let dir = short_tempdir();
    let url = pg.url();
    let mut faulty = FaultyDaemon::spawn(dir.path(), &url, &[]).await;
    let socket = faulty.daemon.socket.clone();

    // Rows flushed into PostgreSQL, then rows that stay in the WAL while it is down.
    for first in (0..100).step_by(25) {
        post_acknowledged(&socket, first..first + 25).await;
    }
    wait_until("the first 100 rows are in PostgreSQL", || async {
        pg.count("SELECT count(*) FROM ev").await == 100
    })
    .await;
    tokio::task::block_in_place(|| pg.stop(StopMode::Fast));
    for first in (100..200).step_by(25) {
        post_acknowledged(&socket, first..first + 25).await;
    }
    let acked: Vec<i64> = (0..200).collect();

    faulty.enable(FAILPOINT);
    // The next write's fdatasync fails: answered 500, saying so.
    assert_fdatasync_refused(&socket, 200..225).await;
    // Nothing after it is acknowledged either: refused while stopping, or no daemon.
    for first in (225..300).step_by(25) {
        if let Ok(reply) = post(&socket, first..first + 25).await {
            assert_ne!(reply.status, 202, "acknowledged after a failed fdatasync");
        }
    }
    assert_exits_on_fdatasync(&mut faulty.daemon).await;

    // A restart without the fault, PostgreSQL back: everything acknowledged arrives, once.
    pg.restart().await;
    let daemon = DaemonProcess::spawn(dir.path(), &url, &[]).await;
    flush_through_marker(&pg, &daemon.socket).await;
    assert_exactly_once(&pg, &acked).await;
    // The failed write was truncated away before the daemon stopped (only the sync was
    // made to fail, the truncate worked): nothing refused was loaded.
    assert_eq!(
        pg.count("SELECT count(*) FROM ev WHERE id >= 200").await,
        0,
        "rows of refused requests were loaded"
    );
    assert_eq!(pg.count("SELECT count(*) FROM ev WHERE id >= 0").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fdatasync_under_concurrent_load_acknowledges_nothing_of_its_group() {
    let pg = Pg::start().await;
    pg.exec(EVENTS).await;
    let dir = short_tempdir();
    let url = pg.url();
    let mut faulty = FaultyDaemon::spawn(dir.path(), &url, &[]).await;

    // Eight clients keep writing while the fault is switched on: the group being committed
    // then fails, and every request in it, or queued behind it, is refused or unanswered.
    let load = Arc::new(Load::default());
    let shape = Shape::Varied {
        seed: 7,
        max_rows: 50,
        max_payload: 200,
    };
    let clients = start_load(&faulty.daemon.socket, 8, &load, shape);
    wait_acked(&load, 2_000).await;
    faulty.enable(FAILPOINT);
    assert_exits_on_fdatasync(&mut faulty.daemon).await;
    for c in clients {
        c.await.expect("client");
    }
    let refusals = load.refusals.lock().expect("lock").clone();
    assert!(
        refusals
            .iter()
            .any(|r| r.starts_with("500") && r.contains("fdatasync")),
        "no request was refused for the failed fdatasync: {refusals:?}"
    );

    let daemon = DaemonProcess::spawn(dir.path(), &url, &[]).await;
    flush_through_marker(&pg, &daemon.socket).await;
    let t = tally(&pg, &load).await;
    eprintln!(
        "fdatasync under load: {} rows acked, {} refused, {} unanswered; {t:?}",
        t.acked_rows,
        load.refused.lock().expect("lock").len(),
        load.unanswered.lock().expect("lock").len(),
    );
    assert_eq!(t.lost, 0, "acknowledged rows lost: {t:?}");
    assert_eq!(t.duplicated, 0, "rows loaded twice: {t:?}");
    assert_eq!(
        t.refused_present, 0,
        "rows of refused requests loaded: {t:?}"
    );
    assert_eq!(t.unknown, 0, "rows no request sent: {t:?}");
}

/// The fdatasync that fails is the one of the next segment's header, at rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fdatasync_while_creating_a_segment_stops_the_daemon() {
    let mut pg = Pg::start().await;
    pg.exec(EVENTS).await;
    let dir = short_tempdir();
    let url = pg.url();
    let config_file = dir.path().join("pgspool.toml");
    std::fs::write(&config_file, "[wal]\nsegment_bytes = 65536\n").expect("config");
    let args = ["--config", config_file.to_str().expect("utf-8")];
    let mut faulty = FaultyDaemon::spawn(dir.path(), &url, &args).await;
    let socket = faulty.daemon.socket.clone();
    post_acknowledged(&socket, 0..25).await;
    tokio::task::block_in_place(|| pg.stop(StopMode::Fast));
    // Fill the only segment past 50,000 of its 65,536 bytes; the next request (150 rows of
    // about 150 bytes) does not fit and needs a new segment.
    let wal = dir.path().join("wal");
    let mut next = 25;
    loop {
        let segments = pgspool::wal::segment::list(&wal).expect("list");
        assert_eq!(segments.len(), 1, "{segments:?}");
        if std::fs::metadata(&segments[0].path).expect("stat").len() > 50_000 {
            break;
        }
        post_acknowledged(&socket, next..next + 25).await;
        next += 25;
    }

    faulty.enable(FAILPOINT);
    assert_fdatasync_refused(&socket, next..next + 150).await;
    assert_exits_on_fdatasync(&mut faulty.daemon).await;
    pg.restart().await;
    let daemon = DaemonProcess::spawn(dir.path(), &url, &args).await;
    flush_through_marker(&pg, &daemon.socket).await;
    assert_exactly_once(&pg, &(0..next).collect::<Vec<_>>()).await;
}
