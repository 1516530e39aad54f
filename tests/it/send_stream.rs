//! `pgspool send` on streams and awkward inputs: a slow stdin kept open, SIGINT and
//! SIGTERM (with a daemon that does not answer), a byte order mark, rows too wide for one
//! request, and the summary's account of every row that was not acknowledged.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pgspool::pgtemp::StopMode;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};

use crate::harness::{
    DEADLINE, Pg, client, config, flushed, short_tempdir, start_daemon, wait_until,
};
use crate::send::{send, summary};

/// `pgspool send --socket SOCKET ARGS` reading a pipe the test keeps open.
fn spawn_send(socket: &Path, args: &[&str]) -> (Child, ChildStdin) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgspool"))
        .arg("send")
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run pgspool send");
    let stdin = child.stdin.take().expect("stdin");
    (child, stdin)
}

fn signal(child: &Child, signal: Signal) {
    let pid = Pid::from_raw(child.id().expect("still running") as i32);
    kill(pid, signal).expect("signal pgspool send");
}

/// Waits for `child` to exit: its exit code, stdout and stderr.
async fn finished(child: Child) -> (Option<i32>, String, String) {
    let out = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .expect("pgspool send did not exit")
        .expect("wait for pgspool send");
    (
        out.status.code(),
        String::from_utf8(out.stdout).expect("utf-8 stdout"),
        String::from_utf8(out.stderr).expect("utf-8 stderr"),
    )
}

/// The JSON summary of a run that exited with `code`.
fn json_of(result: (Option<i32>, String, String), code: i32) -> serde_json::Value {
    let (exit, out, err) = result;
    assert_eq!(exit, Some(code), "stdout:\n{out}\nstderr:\n{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"))
}

/// Checks that every row read is acknowledged, failed or not sent, and that the failures
/// list each row that was not acknowledged once, with its outcome: returns the rows of
/// the failures by outcome.
fn failed_rows(json: &serde_json::Value, outcome: &str) -> Vec<u64> {
    let n = |key: &str| {
        json[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key}: {json}"))
    };
    assert_eq!(
        n("rows_read"),
        n("rows_acknowledged") + n("rows_failed") + n("rows_not_sent"),
        "{json}"
    );
    let failures = json["failures"].as_array().expect("failures");
    let rows_of = |wanted: &[&str]| -> Vec<u64> {
        failures
            .iter()
            .filter(|f| wanted.contains(&f["outcome"].as_str().unwrap_or_default()))
            .flat_map(|f| {
                f["first_row"].as_u64().expect("first_row")
                    ..=f["last_row"].as_u64().expect("last_row")
            })
            .collect()
    };
    let failed = rows_of(&["refused", "no_answer"]);
    let not_sent = rows_of(&["not_sent"]);
    assert_eq!(failed.len() as u64, n("rows_failed"), "{json}");
    assert_eq!(not_sent.len() as u64, n("rows_not_sent"), "{json}");
    rows_of(&[outcome])
}

/// Waits until PostgreSQL holds `n` rows of `table`.
async fn rows_reach(pg: &Pg, table: &str, n: i64) {
    let sql = format!("SELECT count(*) FROM {table}");
    wait_until(&format!("{table} holds {n} rows"), || async {
        pg.count(&sql).await == n
    })
    .await;
}

/// `pgspool_rows_received_total` of the daemon on `socket`.
async fn received(socket: &Path) -> u64 {
    let reply = client(socket).await.get("/metrics").await;
    let reply = reply.expect("GET /metrics");
    let text = reply.body.as_str().expect("a text body");
    text.lines()
        .find_map(|l| l.strip_prefix("pgspool_rows_received_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// 1500 rows on a stdin that stays open (`tail -f`): the last 500, a partial batch, are
/// sent once `--max-wait` has passed. SIGINT then ends the run with the summary, exit code
/// 130; SIGTERM likewise with 143.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_stream_is_sent_as_it_comes_and_a_signal_ends_it_with_the_summary() {
    let pg = Pg::start().await;
    pg.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let args = ["--table", "t", "--json", "--max-wait", "200ms"];

    let (child, mut stdin) = spawn_send(daemon.socket(), &args);
    let rows: String = (1..=1500).map(|id| format!("{{\"id\":{id}}}\n")).collect();
    stdin.write_all(rows.as_bytes()).await.expect("write rows");
    stdin.flush().await.expect("flush");
    rows_reach(&pg, "t", 1500).await;
    signal(&child, Signal::SIGINT);
    let json = json_of(finished(child).await, 130);
    assert_eq!(json["rows_read"], 1500, "{json}");
    assert_eq!(json["rows_acknowledged"], 1500, "{json}");
    assert_eq!(json["batches_acknowledged"], 2, "{json}");
    assert_eq!(json["interrupted"], "SIGINT", "{json}");
    assert!(failed_rows(&json, "not_sent").is_empty(), "{json}");
    drop(stdin);

    let (child, mut stdin) = spawn_send(daemon.socket(), &args[..2]);
    stdin.write_all(b"{\"id\":2000}\n").await.expect("write");
    stdin.flush().await.expect("flush");
    rows_reach(&pg, "t", 1501).await;
    signal(&child, Signal::SIGTERM);
    let (code, out, err) = finished(child).await;
    assert_eq!(code, Some(143), "{out}\n{err}");
    assert!(out.contains("rows read     1\n"), "{out}");
    assert!(
        out.contains("interrupted   by SIGTERM: the input was not read to its end"),
        "{out}"
    );
    assert!(err.contains("SIGTERM: reading stops"), "{err}");
    drop(stdin);
    daemon.stop().await.expect("stop the daemon");
}

/// The daemon's answers stall (`--ack committed`, PostgreSQL down): after SIGINT, `send`
/// waits out its grace, then prints the summary with the unanswered batch's rows and
/// exits 130. A second SIGINT exits at once, without a summary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_send_gives_up_after_its_grace_and_a_second_signal_exits_at_once() {
    let mut pg = Pg::start().await;
    pg.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let args = ["--table", "t", "--ack", "committed", "--json"];
    summary(send(daemon.socket(), &args, b"{\"id\":1}\n"));
    tokio::task::block_in_place(|| pg.stop(StopMode::Fast));

    let (child, mut stdin) = spawn_send(daemon.socket(), &args);
    stdin
        .write_all(b"{\"id\":2}\n{\"id\":3}\n")
        .await
        .expect("write");
    stdin.flush().await.expect("flush");
    wait_until("the rows reach the daemon", || async {
        received(daemon.socket()).await >= 3
    })
    .await;
    let interrupted = Instant::now();
    signal(&child, Signal::SIGINT);
    let json = json_of(finished(child).await, 130);
    assert!(interrupted.elapsed() >= Duration::from_secs(4), "{json}");
    assert_eq!(json["rows_read"], 2, "{json}");
    assert_eq!(json["rows_failed"], 2, "{json}");
    assert_eq!(failed_rows(&json, "no_answer"), [1, 2], "{json}");
    drop(stdin);

    let (mut child, mut stdin) = spawn_send(daemon.socket(), &args);
    stdin.write_all(b"{\"id\":4}\n").await.expect("write");
    stdin.flush().await.expect("flush");
    wait_until("the row reaches the daemon", || async {
        received(daemon.socket()).await >= 4
    })
    .await;
    signal(&child, Signal::SIGINT);
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr")).lines();
    loop {
        let line = tokio::time::timeout(DEADLINE, stderr.next_line()).await;
        let line = line.expect("no word of the signal").expect("stderr");
        if line
            .expect("stderr closed")
            .contains("SIGINT: reading stops")
        {
            break;
        }
    }
    let again = Instant::now();
    signal(&child, Signal::SIGINT);
    let (code, out, _) = finished(child).await;
    assert!(again.elapsed() < Duration::from_secs(3));
    assert_eq!(code, Some(130));
    assert_eq!(out, "", "no summary after a second signal");
    drop(stdin);
    pg.restart().await;
    flushed(&daemon).await;
    assert_eq!(pg.ids("SELECT id::bigint FROM t").await, [1, 2, 3, 4]);
    daemon.stop().await.expect("stop the daemon");
}

/// A UTF-8 byte order mark is skipped in NDJSON, JSON and CSV alike; an empty `--table` is
/// a usage error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_order_mark_is_skipped_and_an_empty_table_is_bad_usage() {
    let pg = Pg::start().await;
    pg.exec("CREATE TABLE t (id int PRIMARY KEY, a text)").await;
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let inputs: [(&str, &[u8]); 3] = [
        (
            "bom.ndjson",
            b"\xef\xbb\xbf{\"id\":1,\"a\":\"x\"}\n{\"id\":2}\n",
        ),
        ("bom.json", b"\xef\xbb\xbf[{\"id\":3,\"a\":\"y\"}]"),
        ("bom.csv", b"\xef\xbb\xbfid,a\r\n4,z\r\n"),
    ];
    for (name, bytes) in inputs {
        let file = dir.path().join(name);
        std::fs::write(&file, bytes).expect("write input");
        let file = file.to_str().expect("utf-8 path");
        let json = summary(send(
            daemon.socket(),
            &["--table", "t", "--json", file],
            b"",
        ));
        assert_eq!(
            json["rows_read"], json["rows_acknowledged"],
            "{name}: {json}"
        );
    }
    flushed(&daemon).await;
    assert_eq!(pg.ids("SELECT id::bigint FROM t").await, [1, 2, 3, 4]);

    let (code, out, err) = send(daemon.socket(), &["--table", ""], b"{\"id\":5}\n");
    assert_eq!(code, Some(64), "{out}\n{err}");
    assert!(err.contains("--table"), "{err}");
    daemon.stop().await.expect("stop the daemon");
}

/// Rows of 20 kB with the default options: batches are cut under 8 MiB and all land. A row
/// larger than the daemon's `[ingest] max_body_bytes` goes alone: it fails with a message
/// that says it is too large, and the rows around it land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wide_rows_are_batched_by_bytes_and_a_row_too_large_fails_alone() {
    let pg = Pg::start().await;
    pg.exec("CREATE TABLE t (id int PRIMARY KEY, a text)").await;
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let row = |id: u64, width: usize| format!("{{\"id\":{id},\"a\":\"{}\"}}\n", "x".repeat(width));
    let wide: String = (1..=3000).map(|id| row(id, 20_000)).collect();
    let json = summary(send(
        daemon.socket(),
        &["--table", "t", "--json"],
        wide.as_bytes(),
    ));
    assert_eq!(json["rows_acknowledged"], 3000, "{json}");
    // The widest rows (ids of four digits) take 20,019 bytes with their newline.
    let per_batch = (8u64 << 20) / 20_019;
    let batches = json["batches_acknowledged"].as_u64().expect("batches");
    assert!(
        (3000_u64.div_ceil(per_batch)..=9).contains(&batches),
        "{json}"
    );

    let input = [row(4001, 10), row(4002, 17 << 20), row(4003, 10)].concat();
    let (code, out, err) = send(
        daemon.socket(),
        &["--table", "t", "--json"],
        input.as_bytes(),
    );
    let json = json_of((code, out, err.clone()), 1);
    assert!(
        err.contains("row 2 of t refused (413 Payload Too Large): the row is too large"),
        "{err}"
    );
    assert_eq!(failed_rows(&json, "refused"), [2], "{json}");
    assert_eq!(json["rows_acknowledged"], 2, "{json}");
    assert_eq!(json["failures"][0]["status"], 413, "{json}");
    flushed(&daemon).await;
    assert_eq!(pg.count("SELECT count(*) FROM t WHERE id > 4000").await, 2);
    daemon.stop().await.expect("stop the daemon");
}

/// 13 refused batches: 10 messages are printed and the rest counted, and `--json` names
/// the rows of all 13. When the daemon goes away mid-stream, the batches never sent are
/// listed as such, and the counts add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_summary_accounts_for_every_row_not_acknowledged() {
    let pg = Pg::start().await;
    pg.exec("CREATE TABLE t1 (id int PRIMARY KEY)").await;
    pg.exec("CREATE TABLE t2 (id int PRIMARY KEY)").await;
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    // Rows 1, 5, 9, ...: batches of two, every other one refused.
    let input: String = (1..=50)
        .map(|id| match id % 4 {
            1 => format!("{{\"id\":{id},\"colour\":\"red\"}}\n"),
            _ => format!("{{\"id\":{id}}}\n"),
        })
        .collect();
    let args = ["--rows-per-request", "2", "--clients", "1"];
    let (code, out, err) = send(
        daemon.socket(),
        &[&args[..], &["--table", "t1"]].concat(),
        input.as_bytes(),
    );
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert_eq!(err.matches(" refused (422 ").count(), 10, "{err}");
    assert!(
        out.contains("(the first 10 are printed above, 3 more are not; --json lists"),
        "{out}"
    );
    let (code, out, err) = send(
        daemon.socket(),
        &[&args[..], &["--table", "t2", "--json"]].concat(),
        input.as_bytes(),
    );
    let json = json_of((code, out, err), 1);
    let refused: Vec<u64> = (1..=50).filter(|id| id % 4 == 1 || id % 4 == 2).collect();
    assert_eq!(failed_rows(&json, "refused"), refused, "{json}");
    assert_eq!(
        json["failures"].as_array().map(Vec::len),
        Some(13),
        "{json}"
    );

    // The daemon stops after 250 rows; the 1000 after them are not sent.
    pg.exec("CREATE TABLE t3 (id int PRIMARY KEY)").await;
    let socket = daemon.socket().to_path_buf();
    let args = [
        "--table",
        "t3",
        "--json",
        "--retries",
        "0",
        "--clients",
        "1",
        "--rows-per-request",
        "100",
        "--max-wait",
        "100ms",
    ];
    let (child, mut stdin) = spawn_send(&socket, &args);
    let rows = |ids: std::ops::RangeInclusive<u64>| -> String {
        ids.map(|id| format!("{{\"id\":{id}}}\n")).collect()
    };
    stdin
        .write_all(rows(1..=250).as_bytes())
        .await
        .expect("write");
    stdin.flush().await.expect("flush");
    rows_reach(&pg, "t3", 250).await;
    daemon.stop().await.expect("stop the daemon");
    // Rows the reader could not hand over any more are not read: write them from a task.
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(rows(251..=1250).as_bytes()).await;
    });
    let json = json_of(finished(child).await, 1);
    writer.await.expect("writer");
    let read = json["rows_read"].as_u64().expect("rows_read");
    assert!(read > 250, "{json}");
    let mut missing = failed_rows(&json, "not_sent");
    assert!(!missing.is_empty(), "{json}");
    missing.extend(failed_rows(&json, "no_answer"));
    missing.sort_unstable();
    assert_eq!(missing, (251..=read).collect::<Vec<u64>>(), "{json}");
}
