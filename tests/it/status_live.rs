//! `GET /v1/status` and `pgspool status` against a running daemon: the verdict, the exit
//! code and the live JSON in each state (healthy, PostgreSQL down, backlog growing, daemon
//! not running, corrupt WAL), and `--watch`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use pgspool::pgtemp::StopMode;
use serde_json::Value;

use crate::harness::{
    DEADLINE, Pg, client, config, flushed, post_ndjson, short_tempdir, start_daemon,
};

/// `pgspool status` with `args`: exit code, stdout, stderr.
fn run_status(args: &[&str], socket: &Path, wal: &Path) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pgspool"))
        .arg("status")
        .args(args)
        .arg("--socket")
        .arg(socket)
        .arg("--wal-dir")
        .arg(wal)
        .output()
        .expect("run status");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `pgspool status --json`: its exit code (checked against the verdict's) and its JSON.
fn status_json(socket: &Path, wal: &Path) -> (i32, Value) {
    let (code, stdout, stderr) = run_status(&["--json"], socket, wal);
    let json: Value = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    let code = code.expect("status exited by itself");
    assert_eq!(
        Some(i64::from(code)),
        json["verdict"]["exit_code"].as_i64(),
        "{json:#}\n{stderr}"
    );
    (code, json)
}

/// `pgspool status` for people: checks that no line is wider than 100 columns and that the
/// exit code is `code`; returns the text.
fn human(socket: &Path, wal: &Path, code: i32) -> String {
    let (got, stdout, stderr) = run_status(&[], socket, wal);
    assert_eq!(got, Some(code), "{stdout}\n{stderr}");
    for line in stdout.lines() {
        assert!(
            line.chars().count() <= 100,
            "a line is too wide:\n{line}\n{stdout}"
        );
    }
    stdout
}

/// Polls `status --json` until `done` holds for its JSON; returns the JSON.
async fn wait_status(
    socket: &Path,
    wal: &Path,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (_, json) = tokio::task::block_in_place(|| status_json(socket, wal));
        if done(&json) {
            return json;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}: {json:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child process killed when dropped (a test that fails must not leave `--watch` behind).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The kind of the verdict's first reason, `none` when healthy.
fn first_reason(json: &Value) -> &str {
    json["verdict"]["reasons"][0]["kind"]
        .as_str()
        .unwrap_or("none")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_status_is_healthy_then_postgresql_down_then_healthy_again() {
    let mut pg = Pg::start().await;
    pg.exec("CREATE TABLE t (id int)").await;
    let dir = short_tempdir();
    let wal = dir.path().join("wal");
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let socket = daemon.socket().to_path_buf();
    let mut c = client(&socket).await;

    // Loading: the endpoint's rates show rows coming in and going out.
    let mut next = 0;
    let mut reply = c.get("/v1/status").await.expect("GET /v1/status");
    while reply.body["rates"]["flush_rows_per_s"]["10s"].as_f64() <= Some(0.0)
        || reply.body["rates"]["ingest_rows_per_s"]["10s"].as_f64() <= Some(0.0)
    {
        let body: String = (next..next + 10)
            .map(|i| format!("{{\"id\":{i}}}\n"))
            .collect();
        next += 10;
        assert_eq!(post_ndjson(&mut c, "t", &body).await.status, 202);
        assert!(next < 100_000, "the rates stay at zero: {:#}", reply.body);
        reply = c.get("/v1/status").await.expect("GET /v1/status");
    }
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body["source"], "daemon", "{:#}", reply.body);
    assert!(reply.body["rates"]["ingest_rows_per_s"]["1m"].as_f64() > Some(0.0));
    flushed(&daemon).await;

    // Healthy: everything flushed, PostgreSQL connected.
    let s = wait_status(&socket, &wal, "every row is counted as flushed", |s| {
        s["tables"]["public.t"]["flushed_rows"] == next
            && s["last_lsn"] == next
            && s["pending_rows"] == 0
    })
    .await;
    assert_eq!(s["verdict"]["state"], "healthy", "{s:#}");
    assert_eq!(s["postgres"]["state"], "connected", "{s:#}");
    assert_eq!(s["ready"], true, "{s:#}");
    assert!(s["uptime_seconds"].as_f64() > Some(0.0), "{s:#}");
    assert_eq!(s["durable_lsn"], next, "{s:#}");
    let text = human(&socket, &wal, 0);
    assert!(text.starts_with("healthy: nothing pending\n"), "{text}");
    assert!(text.contains("  PostgreSQL      connected"), "{text}");
    // A daemon that serves another WAL directory does not answer for this one (which
    // cannot be read either: nothing can be read).
    let (code, stdout, stderr) = run_status(&["--json"], &socket, dir.path());
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!("serves {}, not", wal.display()))
            && stderr.contains("not a pgspool WAL directory"),
        "{stderr}"
    );

    // PostgreSQL stops; the rows written meanwhile wait, and status says why.
    tokio::task::block_in_place(|| pg.stop(StopMode::Fast));
    assert_eq!(
        post_ndjson(&mut c, "t", "{\"id\":-1}\n{\"id\":-2}\n")
            .await
            .status,
        202
    );
    let s = wait_status(&socket, &wal, "PostgreSQL is reported down", |s| {
        // The total is brought up to date at once, the tables at the next count.
        first_reason(s) == "postgres_down" && s["tables"]["public.t"]["pending_rows"] == 2
    })
    .await;
    assert_eq!(s["verdict"]["state"], "degraded", "{s:#}");
    assert_eq!(s["postgres"]["state"], "down", "{s:#}");
    assert!(
        s["postgres"]["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{s:#}"
    );
    assert_eq!(s["pending_rows"], 2, "{s:#}");
    let text = human(&socket, &wal, 1);
    assert!(text.starts_with("PostgreSQL down"), "{text}");

    pg.restart().await;
    flushed(&daemon).await;
    let s = wait_status(&socket, &wal, "status is healthy again", |s| {
        s["verdict"]["state"] == "healthy"
    })
    .await;
    assert_eq!(s["postgres"]["state"], "connected", "{s:#}");
    daemon.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_slower_than_its_rows_arrive_makes_the_backlog_grow() {
    let pg = Pg::start().await;
    // Each row takes 20 ms to insert: at most 50 rows/s reach the table.
    pg.exec(
        "CREATE TABLE slow (id int);
         CREATE FUNCTION slow_down() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN PERFORM pg_sleep(0.02); RETURN NEW; END $$;
         CREATE TRIGGER slow BEFORE INSERT ON slow FOR EACH ROW EXECUTE FUNCTION slow_down();",
    )
    .await;
    let dir = short_tempdir();
    let wal = dir.path().join("wal");
    let mut cfg = config(dir.path(), &pg.url());
    cfg.shutdown.drain_timeout = Duration::from_secs(1);
    let daemon = start_daemon(cfg).await;
    let socket = daemon.socket().to_path_buf();
    // About 500 rows/s arrive.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, socket) = (Arc::clone(&stop), socket.clone());
        tokio::spawn(async move {
            let mut c = client(&socket).await;
            let body: String = (0..10).map(|i| format!("{{\"id\":{i}}}\n")).collect();
            while !stop.load(Ordering::SeqCst) {
                assert_eq!(post_ndjson(&mut c, "slow", &body).await.status, 202);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let s = wait_status(&socket, &wal, "the backlog is reported growing", |s| {
        first_reason(s) == "backlog_growing"
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    writer.await.expect("writer");
    assert_eq!(s["verdict"]["state"], "degraded", "{s:#}");
    assert_eq!(s["postgres"]["state"], "connected", "{s:#}");
    let limit = s["backlog_age_limit_seconds"].as_f64().expect("a limit");
    assert!(
        s["oldest_pending_age_seconds"].as_f64() > Some(limit),
        "{s:#}"
    );
    let rates = &s["rates"];
    assert!(
        rates["ingest_rows_per_s"]["1m"].as_f64() > rates["flush_rows_per_s"]["1m"].as_f64(),
        "{s:#}"
    );
    let text = human(&socket, &wal, 1);
    assert!(text.starts_with("backlog growing: "), "{text}");
    daemon.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_redraws_then_a_stopped_daemon_and_a_corrupt_wal_exit_2() {
    let mut pg = Pg::start().await;
    pg.exec("CREATE TABLE ev (id int)").await;
    tokio::task::block_in_place(|| pg.stop(StopMode::Fast));
    let dir = short_tempdir();
    let wal = dir.path().join("wal");
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let socket = daemon.socket().to_path_buf();
    let mut c = client(&socket).await;
    for i in 0..3 {
        let body = format!("{{\"id\":{}}}\n{{\"id\":{}}}\n", 2 * i, 2 * i + 1);
        assert_eq!(post_ndjson(&mut c, "ev", &body).await.status, 202);
    }
    wait_status(&socket, &wal, "PostgreSQL is reported down", |s| {
        first_reason(s) == "postgres_down"
    })
    .await;

    // --watch --json: one object per line, every second, until interrupted; the exit code
    // is then the last verdict's.
    let mut watch = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_pgspool"))
            .args(["status", "--watch", "--json", "--socket"])
            .arg(&socket)
            .stdout(Stdio::piped())
            .spawn()
            .expect("run status --watch"),
    );
    let stdout = watch.0.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.expect("read a frame")).is_err() {
                return;
            }
        }
    });
    let frames: Vec<Value> = tokio::task::block_in_place(|| {
        (0..2)
            .map(|_| {
                let line = rx.recv_timeout(DEADLINE).expect("a frame");
                serde_json::from_str(&line).expect("each frame is one JSON object")
            })
            .collect()
    });
    for frame in &frames {
        assert_eq!(first_reason(frame), "postgres_down", "{frame:#}");
    }
    let pid = Pid::from_raw(i32::try_from(watch.0.id()).expect("pid"));
    nix::sys::signal::kill(pid, Signal::SIGINT).expect("SIGINT");
    let exited = tokio::task::block_in_place(|| watch.0.wait()).expect("wait");
    assert_eq!(exited.code(), Some(1), "the last verdict was degraded");

    // The daemon stops: status reads the WAL directory (named by the config file here).
    daemon.stop().await.expect("stop");
    let config_file = dir.path().join("pgspool.toml");
    std::fs::write(
        &config_file,
        format!(
            "[listen]\nsocket = {:?}\n[wal]\ndir = {:?}\n",
            socket.display().to_string(),
            wal.display().to_string()
        ),
    )
    .expect("write the config");
    let out = Command::new(env!("CARGO_BIN_EXE_pgspool"))
        .args(["status", "--json", "--config"])
        .arg(&config_file)
        .output()
        .expect("run status");
    let s: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(out.status.code(), Some(2), "{s:#}");
    assert_eq!(s["source"], "wal_dir", "{s:#}");
    assert_eq!(first_reason(&s), "daemon_not_running", "{s:#}");
    assert_eq!(s["intact"], true, "{s:#}");
    assert_eq!(s["pending_rows"], 6, "{s:#}");
    assert!(s["postgres"].is_null() && s["rates"].is_null(), "{s:#}");
    let text = human(&socket, &wal, 2);
    assert!(text.starts_with("daemon not running: "), "{text}");

    // A flipped bit in the first record, with acknowledged records after it.
    let segment = pgspool::wal::segment::list(&wal)
        .expect("list")
        .pop()
        .expect("a segment")
        .path;
    let mut bytes = std::fs::read(&segment).expect("read");
    bytes[64 + 40] ^= 0x04;
    std::fs::write(&segment, &bytes).expect("write");
    let (code, s) = status_json(&socket, &wal);
    assert_eq!(code, 2, "{s:#}");
    assert_eq!(s["verdict"]["state"], "corrupt", "{s:#}");
    assert_eq!(first_reason(&s), "corrupt_wal", "{s:#}");
    let text = human(&socket, &wal, 2);
    assert!(
        text.starts_with("corrupt WAL (also daemon not running): "),
        "{text}"
    );
}

/// A connection string to a PostgreSQL that is not there: the daemon keeps every row.
fn unreachable_url(dir: &Path) -> String {
    format!(
        "host={} port=5432 user=pgspool dbname=pgspool",
        dir.join("no-postgres").display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_backlog_is_reported_at_once_while_it_is_counted_then_brought_up_to_date() {
    let dir = short_tempdir();
    let wal = dir.path().join("wal");
    let daemon = start_daemon(config(dir.path(), &unreachable_url(dir.path()))).await;
    let socket = daemon.socket().to_path_buf();
    let mut c = client(&socket).await;

    // About 470 MB of rows, which take the count a few seconds to read and verify.
    let pad = "x".repeat(32 << 10);
    let body: String = (0..240)
        .map(|i| format!("{{\"id\":{i},\"pad\":\"{pad}\"}}\n"))
        .collect();
    let mut posted = 0u64;
    let mut first_durable = None;
    for _ in 0..60 {
        assert_eq!(post_ndjson(&mut c, "big", &body).await.status, 202);
        first_durable.get_or_insert_with(Instant::now);
        posted += 240;
    }

    // The first answer comes at once, with what needs no scan.
    let asked = Instant::now();
    let asked_us = pgspool::fsutil::now_us();
    let reply = c.get("/v1/status").await.expect("GET /v1/status");
    let answered_in = asked.elapsed();
    let s = reply.body;
    assert_eq!(reply.status, 200, "{s:#}");
    assert!(
        answered_in < Duration::from_secs(5),
        "the answer took {answered_in:?}"
    );
    // Since the WAL reader got faster (issue 6), counting 470 MB can end within the second
    // the request waits: then the first answer is the count itself.
    let counted_first = !s["counted_at_us"].is_null();
    assert_eq!(s["durable_lsn"], posted, "{s:#}");
    assert_eq!(s["pending_rows"], posted, "{s:#}");
    assert!(s["bytes"].as_u64() > Some(450_000_000), "{s:#}");
    assert!(s["segments"].as_u64() > Some(1), "{s:#}");
    assert_eq!(first_reason(&s), "postgres_down", "{s:#}");
    let counted = if counted_first {
        eprintln!("the count ended within the first answer, {answered_in:?}");
        s.clone()
    } else {
        assert!(s["tables"]["big"]["pending_rows"].is_null(), "{s:#}");
        let text = human(&socket, &wal, 1);
        assert!(
            text.contains(&format!("  pending         {posted} rows (the LSNs above")),
            "{text}"
        );
        assert!(text.contains("counting…"), "{text}");

        // The count ends later than the answer came.
        let counted = wait_status(&socket, &wal, "the count ends", |s| {
            s["counted_at_us"].is_u64()
        })
        .await;
        let took = Duration::from_micros(
            counted["counted_at_us"]
                .as_u64()
                .expect("a time")
                .saturating_sub(asked_us),
        );
        assert!(
            took > answered_in,
            "the count took {took:?}, the answer {answered_in:?}"
        );
        eprintln!("the count took {took:?}, the first answer {answered_in:?}");
        counted
    };
    assert_eq!(
        counted["tables"]["big"]["pending_rows"], posted,
        "{counted:#}"
    );

    // Reused (it is younger than 10 times as long as it took), it is brought up to date:
    // the rows posted since are pending, the oldest row's age is measured now.
    let more: String = (0..7).map(|i| format!("{{\"id\":{i}}}\n")).collect();
    assert_eq!(post_ndjson(&mut c, "big", &more).await.status, 202);
    let at_least = first_durable.expect("posted").elapsed().as_secs_f64();
    let s = c.get("/v1/status").await.expect("GET /v1/status").body;
    assert_eq!(s["counted_at_us"], counted["counted_at_us"], "{s:#}");
    assert_eq!(s["durable_lsn"], posted + 7, "{s:#}");
    assert_eq!(s["pending_rows"], posted + 7, "{s:#}");
    assert!(
        s["oldest_pending_age_seconds"].as_f64() >= Some(at_least),
        "the oldest row is older than {at_least} s: {s:#}"
    );
    assert!(s["flusher"]["updated_at_us"].as_u64() > Some(0), "{s:#}");
    daemon.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_table_names_and_the_verdict_are_wrapped_not_cut() {
    let pg = Pg::start().await;
    let dir = short_tempdir();
    let wal = dir.path().join("wal");
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let socket = daemon.socket().to_path_buf();
    let mut c = client(&socket).await;
    // Two tables whose names differ only at their end, then moved away: their rows are held.
    let names = [
        "this_is_a_rather_long_table_name_for_the_first_one",
        "this_is_a_rather_long_table_name_for_the_second_one",
    ];
    for name in names {
        pg.exec(&format!("CREATE TABLE {name} (id int)")).await;
        assert_eq!(post_ndjson(&mut c, name, "{\"id\":1}\n").await.status, 202);
    }
    flushed(&daemon).await;
    for name in names {
        pg.exec(&format!("ALTER TABLE {name} RENAME TO {name}_away"))
            .await;
        assert_eq!(post_ndjson(&mut c, name, "{\"id\":2}\n").await.status, 202);
    }
    wait_status(&socket, &wal, "both tables are held", |s| {
        names
            .iter()
            .all(|n| s["flusher"]["tables"][format!("public.{n}")]["held_after_lsn"].is_u64())
    })
    .await;
    let text = human(&socket, &wal, 1);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("tables held: "), "{text}");
    // The verdict goes on over lines indented by 4, up to its end, and names both tables.
    let verdict: Vec<&str> = std::iter::once(lines[0])
        .chain(
            lines[1..]
                .iter()
                .copied()
                .take_while(|l| l.starts_with("    ")),
        )
        .collect();
    assert!(verdict.len() > 1, "{text}");
    let verdict = verdict
        .iter()
        .map(|l| l.trim())
        .collect::<Vec<_>>()
        .join(" ");
    for name in names {
        assert!(
            verdict.contains(&format!("public.{name}")),
            "{verdict}\n{text}"
        );
        // Each name is shown whole in the table too, on its own line.
        assert!(
            lines.iter().any(|l| l.trim() == format!("public.{name}")),
            "{text}"
        );
    }
    assert!(verdict.ends_with("(see the last errors)"), "{verdict}");
    assert!(!text.contains('…'), "{text}");
    daemon.stop().await.expect("stop");
}
