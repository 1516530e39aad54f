//! Integration tests of `TempPostgres` against a real PostgreSQL server:
//! start, stop (fast and immediate), restart with crash recovery, and that
//! dropping it (also while panicking) leaves no process and no directory.

use std::path::PathBuf;
use std::time::Instant;

use crate::harness::connect;
use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use pgspool::pgtemp::{StopMode, TempPostgres};

/// Whether a process with this pid exists (zombies count).
fn process_exists(pid: u32) -> bool {
    let pid = Pid::from_raw(i32::try_from(pid).expect("pid fits i32"));
    match kill(pid, None) {
        Ok(()) => true,
        Err(Errno::ESRCH) => false,
        Err(e) => panic!("kill(0) on {pid}: {e}"),
    }
}

#[tokio::test]
async fn starts_serves_and_survives_a_crash() {
    let t = Instant::now();
    let mut pg = TempPostgres::start().expect("start");
    eprintln!("start took {:?}", t.elapsed());

    let socket_dir = pg.socket_dir().to_path_buf();
    assert!(socket_dir.starts_with("/tmp"), "{}", socket_dir.display());
    assert!(socket_dir.join(format!(".s.PGSQL.{}", pg.port())).exists());
    assert_eq!(
        pg.url(),
        format!(
            "host={} port={} user=postgres dbname=postgres",
            socket_dir.display(),
            pg.port()
        )
    );
    assert!(pg.is_running());
    assert!(pg.log_path().is_file());
    assert!(pg.data_dir().join("PG_VERSION").is_file());

    let client = connect(&pg.url()).await;
    let version: String = client
        .query_one("SHOW server_version", &[])
        .await
        .unwrap()
        .get(0);
    eprintln!("server_version {version}");
    let listen: String = client
        .query_one("SHOW listen_addresses", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(listen, "", "no TCP listener");
    let fsync: String = client.query_one("SHOW fsync", &[]).await.unwrap().get(0);
    assert_eq!(fsync, "on", "durability defaults are kept");
    client
        .batch_execute(
            "CREATE TABLE kept (n int); INSERT INTO kept SELECT generate_series(1, 1000);",
        )
        .await
        .unwrap();

    // A crash: committed data must come back through WAL recovery.
    let first_pid = pg.pid().expect("running");
    pg.stop(StopMode::Immediate).expect("immediate stop");
    assert!(!pg.is_running());
    assert_eq!(pg.pid(), None);
    assert!(!process_exists(first_pid));
    assert!(
        client.query_one("SELECT 1", &[]).await.is_err(),
        "old session is gone"
    );

    let t = Instant::now();
    pg.restart().expect("restart after a crash");
    eprintln!("restart after immediate stop took {:?}", t.elapsed());
    assert!(pg.is_running());
    assert_ne!(pg.pid(), Some(first_pid));
    let log = std::fs::read_to_string(pg.log_path()).unwrap();
    assert!(
        log.contains("was not properly shut down; automatic recovery in progress"),
        "crash recovery ran:\n{log}"
    );
    let client = connect(&pg.url()).await;
    let n: i64 = client
        .query_one("SELECT sum(n) FROM kept", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 500_500);

    // A clean stop, twice (the second is a no-op), then start again.
    let t = Instant::now();
    pg.stop(StopMode::Fast).expect("fast stop");
    eprintln!("fast stop took {:?}", t.elapsed());
    assert!(!pg.is_running());
    pg.stop(StopMode::Fast)
        .expect("stopping a stopped server is a no-op");
    pg.restart().expect("restart after a fast stop");
    let client = connect(&pg.url()).await;
    let n: i64 = client
        .query_one("SELECT count(*) FROM kept", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1000);
}

#[test]
fn restart_while_running_is_an_error() {
    let mut pg = TempPostgres::start().expect("start");
    let pid = pg.pid();
    let err = pg.restart().expect_err("already running");
    assert!(err.to_string().contains("still running"), "{err:#}");
    assert!(pg.is_running());
    assert_eq!(pg.pid(), pid, "the running server is untouched");
}

#[test]
fn dropping_stops_the_server_and_removes_the_directory() {
    let pg = TempPostgres::start().expect("start");
    let pid = pg.pid().expect("running");
    let dir = pg.socket_dir().to_path_buf();
    assert!(process_exists(pid));
    drop(pg);
    assert!(
        !process_exists(pid),
        "postmaster {pid} still exists after drop"
    );
    assert!(!dir.exists(), "{} still exists after drop", dir.display());
}

#[test]
fn dropping_a_stopped_server_removes_the_directory() {
    let mut pg = TempPostgres::start().expect("start");
    let dir = pg.socket_dir().to_path_buf();
    pg.stop(StopMode::Fast).expect("fast stop");
    drop(pg);
    assert!(!dir.exists(), "{} still exists after drop", dir.display());
}

#[test]
fn a_panicking_test_leaks_nothing() {
    let seen = std::sync::Mutex::new(None::<(u32, PathBuf)>);
    let result = std::panic::catch_unwind(|| {
        let pg = TempPostgres::start().expect("start");
        *seen.lock().unwrap() = Some((pg.pid().expect("running"), pg.socket_dir().to_path_buf()));
        panic!("a test fails while the server runs");
    });
    assert!(result.is_err());
    let (pid, dir) = seen.lock().unwrap().take().expect("server had started");
    assert!(!process_exists(pid), "postmaster {pid} leaked");
    assert!(!dir.exists(), "{} leaked", dir.display());
}
