//! `pgspool status` on real WAL directories, and the binary's exit codes.

use std::process::Command;

use pgspool::pgtemp::StopMode;

use crate::harness::{
    DaemonProcess, Pg, client, config, flushed, post_ndjson, short_tempdir, start_daemon,
    status_json,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_the_backlog_then_nothing_pending_after_the_flush() {
    let mut pg = Pg::start().await;
    pg.exec("CREATE TABLE a (id int); CREATE TABLE b (id int)")
        .await;
    let dir = short_tempdir();
    let wal = dir.path().join("wal");
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let mut c = client(daemon.socket()).await;
    assert_eq!(post_ndjson(&mut c, "a", "{\"id\":1}\n").await.status, 202);
    flushed(&daemon).await;

    // PostgreSQL goes down: new rows wait in the WAL, and status shows them per table.
    tokio::task::block_in_place(|| pg.stop(StopMode::Fast));
    assert_eq!(
        post_ndjson(&mut c, "a", "{\"id\":2}\n{\"id\":3}\n")
            .await
            .status,
        202
    );
    assert_eq!(post_ndjson(&mut c, "b", "{\"id\":4}\n").await.status, 202);
    let s = status_json(&wal);
    assert_eq!(s["pending_rows"], 3, "{s:#}");
    assert_eq!(s["tables"]["public.a"]["pending_rows"], 2, "{s:#}");
    // b was never seen: its rows wait as JSON, under the name the client gave.
    assert_eq!(s["tables"]["b"]["pending_rows"], 1, "{s:#}");
    assert_eq!(s["last_lsn"], 4);
    assert_eq!(s["flushed_lsn"], 1);
    assert_eq!(s["checksums_ok"], true);
    assert!(s["oldest_pending_age_seconds"].as_f64().is_some(), "{s:#}");

    pg.restart().await;
    flushed(&daemon).await;
    daemon.stop().await.expect("stop");
    let s = status_json(&wal);
    for key in [
        "segments",
        "bytes",
        "first_lsn",
        "last_lsn",
        "flushed_lsn",
        "pending_rows",
        "tables",
        "checksums_ok",
    ] {
        assert!(s.get(key).is_some(), "status --json lacks {key}: {s:#}");
    }
    assert_eq!(s["pending_rows"], 0, "{s:#}");
    assert_eq!(s["flushed_lsn"], s["last_lsn"], "{s:#}");
    assert_eq!(s["last_lsn"], 4);
    assert_eq!(s["checksums_ok"], true);

    let human = Command::new(env!("CARGO_BIN_EXE_pgspool"))
        .args(["status", "--socket"])
        .arg(dir.path().join("s.sock"))
        .arg("--wal-dir")
        .arg(&wal)
        .output()
        .expect("run status");
    let text = String::from_utf8_lossy(&human.stdout);
    assert_eq!(human.status.code(), Some(2), "{text}");
    assert!(text.starts_with("daemon not running: "), "{text}");
    assert!(
        text.contains("\n  pending         0 rows, 0 bytes\n"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_wal_is_refused_and_names_the_first() {
    let pg = Pg::start().await;
    let dir = short_tempdir();
    let first = DaemonProcess::spawn(dir.path(), &pg.url(), &[]).await;
    let second = || {
        Command::new(env!("CARGO_BIN_EXE_pgspool"))
            .args(["run", "--socket"])
            .arg(dir.path().join("other.sock"))
            .arg("--wal-dir")
            .arg(dir.path().join("wal"))
            .args(["--database-url", &pg.url()])
            .output()
            .expect("run")
    };
    let out = second();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("pid {}", first.child.id())),
        "{stderr}"
    );
    // LOCK looks like a stale pid file; deleting it must not let a second daemon in.
    std::fs::remove_file(dir.path().join("wal/LOCK")).expect("delete LOCK");
    let out = second();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("in use by another pgspool"), "{stderr}");
}

#[test]
fn exit_codes_tell_usage_from_configuration_from_runtime_errors() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_pgspool"))
            .args(args)
            .env_remove("PGSPOOL_DATABASE_URL")
            .output()
            .expect("run pgspool")
    };
    assert_eq!(run(&["frobnicate"]).status.code(), Some(64));
    assert_eq!(run(&["run", "--no-such-flag"]).status.code(), Some(64));
    let no_url = run(&["run", "--socket", "/tmp/x.sock", "--wal-dir", "/tmp/x"]);
    assert_eq!(no_url.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&no_url.stderr).contains("PGSPOOL_DATABASE_URL"));
    // With --log-format json the error is a JSON line too, for log shippers.
    let json = run(&[
        "run",
        "--log-format",
        "json",
        "--socket",
        "/tmp/x.sock",
        "--wal-dir",
        "/tmp/x",
    ]);
    assert_eq!(json.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&json.stderr);
    assert!(stderr.contains("PGSPOOL_DATABASE_URL"), "{stderr}");
    for line in stderr.lines() {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert_eq!(event["level"], "ERROR", "{line}");
    }
    let dir = short_tempdir();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[batch]\nmax_rowz = 1\n").expect("write");
    let bad_config = run(&["run", "--config", bad.to_str().expect("utf-8")]);
    assert_eq!(bad_config.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&bad_config.stderr).contains("max_rowz"));
    // A misspelt level would silence the log: it is refused instead.
    let level = run(&[
        "run",
        "--log-level",
        "warning",
        "--database-url",
        "host=/tmp",
        "--socket",
        "/tmp/x.sock",
        "--wal-dir",
        "/tmp/x",
    ]);
    assert_eq!(level.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&level.stderr);
    assert!(
        stderr.contains("is not a level (off, error, warn"),
        "{stderr}"
    );
    let not_wal = run(&["status", "--wal-dir", dir.path().to_str().expect("utf-8")]);
    assert_eq!(not_wal.status.code(), Some(2), "nothing can be read");
    assert!(String::from_utf8_lossy(&not_wal.stderr).contains("not a pgspool WAL directory"));
    assert_eq!(run(&["--help"]).status.code(), Some(0));
}
