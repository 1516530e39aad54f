//! `pgspool send`, as the binary, against a real daemon and PostgreSQL: each input format,
//! stdin, a refused batch among good ones, and a daemon that is not there.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use pgspool::pgtemp::StopMode;
use tokio::io::AsyncWriteExt;

use crate::harness::{
    DEADLINE, Pg, client, config, flushed, post_ndjson, short_tempdir, start_daemon,
};
use crate::wal_limits::{refused, small};

/// Runs `pgspool send --socket SOCKET ARGS`, with `stdin` as its input: exit code, stdout,
/// stderr.
pub(crate) fn send(socket: &Path, args: &[&str], stdin: &[u8]) -> (Option<i32>, String, String) {
    let out: Output = tokio::task::block_in_place(|| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pgspool"))
            .arg("send")
            .arg("--socket")
            .arg(socket)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run pgspool send");
        let mut input = child.stdin.take().expect("stdin");
        // A usage error exits before reading its input.
        match input.write_all(stdin) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => panic!("write stdin: {e}"),
            _ => {}
        }
        drop(input);
        child.wait_with_output().expect("wait for pgspool send")
    });
    (
        out.status.code(),
        String::from_utf8(out.stdout).expect("utf-8 stdout"),
        String::from_utf8(out.stderr).expect("utf-8 stderr"),
    )
}

/// The `--json` summary of a run that exited 0.
pub(crate) fn summary(result: (Option<i32>, String, String)) -> serde_json::Value {
    let (code, out, err) = result;
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Every row of `table` as text, ordered by id: `id|name|score|ok|day`, NULL as `∅`.
async fn rows(pg: &Pg, table: &str) -> Vec<String> {
    pg.client
        .query(
            &format!(
                "SELECT concat_ws('|', id, coalesce(name, '∅'), coalesce(score::text, '∅'), \
                 coalesce(ok::text, '∅'), coalesce(day::text, '∅')) FROM {table} ORDER BY id"
            ),
            &[],
        )
        .await
        .expect("select rows")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

const COLUMNS: &str = "(id int PRIMARY KEY, name text, score numeric, ok boolean, day date)";

/// NDJSON from a file (batches of 1000, a blank line skipped), a pretty-printed JSON array
/// (streamed, batches of 2), CSV with a header, quoted fields and `--null NA`, and gzipped
/// NDJSON on stdin: every run exits 0, its summary counts every row, and PostgreSQL holds
/// exactly the rows sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_format_and_stdin_land_exactly() {
    let pg = Pg::start().await;
    for table in ["from_ndjson", "from_json", "from_csv", "from_stdin"] {
        pg.exec(&format!("CREATE TABLE {table} {COLUMNS}")).await;
    }
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let socket = daemon.socket().to_path_buf();

    let ndjson: String = (1..=2500)
        .map(|id| {
            let blank = if id == 1200 { "\n" } else { "" };
            format!("{{\"id\":{id},\"name\":\"n{id}\",\"score\":{id}.5}}\n{blank}")
        })
        .collect();
    let file = dir.path().join("rows.ndjson");
    std::fs::write(&file, &ndjson).expect("write ndjson");
    let file = file.to_str().expect("utf-8 path");
    let json = summary(send(
        &socket,
        &["--table", "from_ndjson", "--json", file],
        b"",
    ));
    assert_eq!(json["rows_read"], 2500, "{json}");
    assert_eq!(json["rows_acknowledged"], 2500, "{json}");
    assert_eq!(json["batches_acknowledged"], 3, "{json}");
    assert_eq!(json["batches_failed"], 0, "{json}");

    let array = r#"[
      {"id": 1, "name": "plain", "ok": true, "day": "2013-01-01"},
      {
        "id": 2,
        "name": "two\nlines",
        "score": 1e3
      },
      {"id": 3, "name": null, "ok": "false"},
      {"id": 4, "name": "[not, an, array]", "score": "-0.25"},
      {"id": 5}
    ]"#;
    let file = dir.path().join("rows.json");
    std::fs::write(&file, array).expect("write json");
    let file = file.to_str().expect("utf-8 path");
    let json = summary(send(
        &socket,
        &[
            "--table",
            "from_json",
            "--rows-per-request",
            "2",
            "--json",
            file,
        ],
        b"",
    ));
    assert_eq!(json["rows_acknowledged"], 5, "{json}");
    assert_eq!(json["batches_acknowledged"], 3, "{json}");

    let csv = "id,name,score,ok,day\n\
               1,\"comma, inside\",1.5,t,2013-12-31\n\
               2,NA,NA,NA,NA\n\
               3,,2,false,2013-02-03\n\
               4,\"line\nbreak \"\"quoted\"\"\",,,\n\
               5,\"NA\",-7,yes,2014-01-01\n";
    let file = dir.path().join("rows.csv");
    std::fs::write(&file, csv).expect("write csv");
    let file = file.to_str().expect("utf-8 path");
    // score, ok and day of row 4 are empty strings, not NULL: PostgreSQL refuses them
    // for those types, so row 4 goes to the dead letters.
    let (code, out, err) = send(&socket, &["--table", "from_csv", "--null", "NA", file], b"");
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("rows read     5"), "{out}");

    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(b"{\"id\": 7, \"ok\": false}\n{\"id\": 8, \"day\": \"2020-02-29\"}\n")
        .expect("gzip");
    let gz = gz.finish().expect("gzip");
    let json = summary(send(
        &socket,
        &["--table", "from_stdin", "--json", "-"],
        &gz,
    ));
    assert_eq!(json["rows_acknowledged"], 2, "{json}");

    flushed(&daemon).await;
    let expected: Vec<String> = (1..=2500)
        .map(|id| format!("{id}|n{id}|{id}.5|∅|∅"))
        .collect();
    assert_eq!(rows(&pg, "from_ndjson").await, expected);
    assert_eq!(
        rows(&pg, "from_json").await,
        [
            "1|plain|∅|true|2013-01-01",
            "2|two\nlines|1000|∅|∅",
            "3|∅|∅|false|∅",
            "4|[not, an, array]|-0.25|∅|∅",
            "5|∅|∅|∅|∅",
        ]
    );
    assert_eq!(
        rows(&pg, "from_csv").await,
        [
            "1|comma, inside|1.5|true|2013-12-31",
            "2|∅|∅|∅|∅",
            "3||2|false|2013-02-03",
            "5|∅|-7|true|2014-01-01",
        ]
    );
    assert_eq!(
        pg.count("SELECT count(*) FROM pgspool.dead_letters WHERE \"row\"::jsonb->>'id' = '4'")
            .await,
        1
    );
    assert_eq!(
        rows(&pg, "from_stdin").await,
        ["7|∅|∅|false|∅", "8|∅|∅|∅|2020-02-29"]
    );
    daemon.stop().await.expect("stop the daemon");
}

/// A batch holding a row with an unknown column is refused: the run exits 1, prints which
/// rows and the daemon's reason, counts them in the summary, and the other batches land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_fails_the_run_and_the_others_land() {
    let pg = Pg::start().await;
    pg.exec(&format!("CREATE TABLE t {COLUMNS}")).await;
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let input: String = (1..=30)
        .map(|id| {
            if id == 15 {
                format!("{{\"id\":{id},\"colour\":\"red\"}}\n")
            } else {
                format!("{{\"id\":{id}}}\n")
            }
        })
        .collect();
    let (code, out, err) = send(
        daemon.socket(),
        &[
            "--table",
            "t",
            "--rows-per-request",
            "10",
            "--clients",
            "2",
            "--json",
        ],
        input.as_bytes(),
    );
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(
        err.contains(
            "rows 11-20 of t refused (422 Unprocessable Entity): row 15: column \"colour\" \
             does not exist in table public.t"
        ),
        "{err}"
    );
    let json: serde_json::Value = serde_json::from_str(&out).expect("JSON summary");
    assert_eq!(json["rows_acknowledged"], 20, "{json}");
    assert_eq!(json["rows_failed"], 10, "{json}");
    assert_eq!(json["batches_failed"], 1, "{json}");
    assert_eq!(json["failures"].as_array().map(Vec::len), Some(1), "{json}");

    flushed(&daemon).await;
    let expected: Vec<i64> = (1..=10).chain(21..=30).collect();
    assert_eq!(pg.ids("SELECT id::bigint FROM t").await, expected);
    daemon.stop().await.expect("stop the daemon");
}

/// Malformed input stops reading there: the rows before it are sent, the run exits 1 and
/// names the place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_sends_the_rows_before_it_and_fails() {
    let pg = Pg::start().await;
    pg.exec(&format!("CREATE TABLE t {COLUMNS}")).await;
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let (code, out, err) = send(
        daemon.socket(),
        &["--table", "t", "--format", "csv"],
        b"id,name\n1,a\n2,b\n3,c,extra\n4,d\n",
    );
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(
        err.contains("the input was not read to its end") && err.contains("line: 4"),
        "{err}"
    );
    assert!(out.contains("rows read     2"), "{out}");
    flushed(&daemon).await;
    assert_eq!(pg.ids("SELECT id::bigint FROM t").await, [1, 2]);
    daemon.stop().await.expect("stop the daemon");
}

/// A WAL at `[wal] max_bytes` (PostgreSQL down) answers 503 with Retry-After: with
/// `--retries 0` the batch fails with the daemon's reason; with retries, `send` waits, and
/// once PostgreSQL is back and the backlog drains, its rows land, once, and `--ack
/// committed` reports them committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_wal_is_waited_out() {
    let mut pg = Pg::start().await;
    pg.exec("CREATE TABLE ev (id bigint PRIMARY KEY, pad text)")
        .await;
    tokio::task::block_in_place(|| pg.stop(StopMode::Fast));
    let dir = short_tempdir();
    let mut cfg = small(dir.path(), &pg);
    cfg.wal.max_bytes = 256 << 10;
    let daemon = start_daemon(cfg).await;
    let mut c = client(daemon.socket()).await;
    let row = |id: i64| format!("{{\"id\":{id},\"pad\":\"{}\"}}\n", "x".repeat(21_000));
    let mut acked = Vec::new();
    loop {
        let id = acked.len() as i64 + 1;
        let reply = post_ndjson(&mut c, "ev", &row(id)).await;
        if reply.status == 503 {
            break;
        }
        assert_eq!(reply.status, 202, "{}", reply.body);
        acked.push(id);
        assert!(acked.len() < 100, "the WAL never filled up");
    }
    let input: String = (1001..=1003).map(row).collect();
    let args = ["--table", "ev", "--rows-per-request", "1"];

    let (code, out, err) = send(
        daemon.socket(),
        &[&args[..], &["--retries", "0"]].concat(),
        input.as_bytes(),
    );
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(
        err.contains("refused (503 Service Unavailable)") && err.contains("max_bytes"),
        "{err}"
    );
    assert!(out.contains("failed        3 rows in 3 requests"), "{out}");

    let before = refused(&mut c, "backlog_full").await;
    let mut sender = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgspool"))
        .arg("send")
        .arg("--socket")
        .arg(daemon.socket())
        .args(args)
        .args(["--ack", "committed", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run pgspool send");
    let mut stdin = sender.stdin.take().expect("stdin");
    stdin
        .write_all(input.as_bytes())
        .await
        .expect("write stdin");
    drop(stdin);
    crate::harness::wait_until("send's batches are refused for the full WAL", || async {
        refused(&mut client(daemon.socket()).await, "backlog_full").await > before
    })
    .await;
    pg.restart().await;
    let out = tokio::time::timeout(DEADLINE, sender.wait_with_output())
        .await
        .expect("send did not finish")
        .expect("wait for send");
    let json = summary((
        out.status.code(),
        String::from_utf8(out.stdout).expect("utf-8"),
        String::from_utf8(out.stderr).expect("utf-8"),
    ));
    assert_eq!(json["rows_acknowledged"], 3, "{json}");
    assert_eq!(json["rows_committed"], 3, "{json}");
    assert_eq!(json["batches_failed"], 0, "{json}");
    flushed(&daemon).await;
    acked.extend(1001..=1003);
    assert_eq!(pg.ids("SELECT id FROM ev").await, acked);
    daemon.stop().await.expect("stop the daemon");
}

/// No daemon on the socket: exit 2 at once, saying where it looked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_daemon_exits_2() {
    let dir = short_tempdir();
    let socket = dir.path().join("absent.sock");
    let (code, out, err) = send(&socket, &["--table", "t"], b"{\"id\": 1}\n");
    assert_eq!(code, Some(2), "{out}\n{err}");
    assert!(
        err.contains("cannot connect to pgspool at") && err.contains("absent.sock"),
        "{err}"
    );
}
