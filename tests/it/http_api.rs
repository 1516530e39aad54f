//! The HTTP contract: status codes, error messages and the 202 answer.

use pgspool::lsn::Lsn;
use pgspool::wal::segment::{SegmentCursor, Step};

use crate::harness::{Pg, client, config, flushed, post_ndjson, short_tempdir, start_daemon};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_has_its_status_and_a_message_that_says_where() {
    let pg = Pg::start().await;
    pg.exec(
        "CREATE TABLE t (id int PRIMARY KEY, note text, doc jsonb,
                         twice int GENERATED ALWAYS AS (id * 2) STORED,
                         serial int GENERATED ALWAYS AS IDENTITY);
         CREATE VIEW v AS SELECT id FROM t;
         CREATE SCHEMA \"Odd.Schema\";
         CREATE TABLE \"Odd.Schema\".\"Odd\"\"Table\" (\"Mixed Case\" text);",
    )
    .await;
    let dir = short_tempdir();
    let mut cfg = config(dir.path(), &pg.url());
    cfg.ingest.max_body_bytes = 4096;
    let daemon = start_daemon(cfg).await;
    let mut c = client(daemon.socket()).await;

    let health = c.get("/healthz").await.expect("healthz");
    assert_eq!(health.status, 200);

    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        (
            "t",
            "application/json",
            b"{\"id\": 1,".to_vec(),
            400,
            "malformed JSON",
        ),
        (
            "t",
            "application/json",
            b"{\"id\": 1, \"note\": \"\xff\"}".to_vec(),
            400,
            "not UTF-8",
        ),
        (
            "t",
            "application/json",
            b"[{\"id\":1},{\"id\":2},3]".to_vec(),
            400,
            "row at index 2",
        ),
        (
            "t",
            "application/json",
            b"{\"id\":1,\"id\":2}".to_vec(),
            400,
            "\"id\" is given twice",
        ),
        ("t", "application/json", b"[]".to_vec(), 400, "no rows"),
        (
            "a.b.c",
            "application/json",
            b"{}".to_vec(),
            400,
            "invalid table name",
        ),
        (
            "nosuch",
            "application/json",
            b"{\"id\":1}".to_vec(),
            404,
            "does not exist",
        ),
        (
            "t",
            "text/plain",
            b"{\"id\":1}".to_vec(),
            415,
            "unsupported content type",
        ),
        (
            "t",
            "application/json",
            vec![b' '; 5000],
            413,
            "larger than the limit",
        ),
        (
            "t",
            "application/x-ndjson",
            b"{\"id\":1}\n{\"nope\":2}\n".to_vec(),
            422,
            "line 2: column \"nope\"",
        ),
        (
            "t",
            "application/json",
            b"{\"id\":1,\"twice\":2}".to_vec(),
            422,
            "GENERATED ALWAYS",
        ),
        (
            "t",
            "application/json",
            b"{\"id\":1,\"serial\":2}".to_vec(),
            422,
            "GENERATED ALWAYS",
        ),
        (
            "v",
            "application/json",
            b"{\"id\":1}".to_vec(),
            422,
            "is a view",
        ),
        (
            "pg_class",
            "application/json",
            b"{\"relname\":\"x\"}".to_vec(),
            422,
            "pg_class is a system catalog",
        ),
        (
            "pgspool.watermarks",
            "application/json",
            b"{\"lsn\":1}".to_vec(),
            403,
            "pgspool's own",
        ),
        (
            "t",
            "application/json",
            b"{\"id\":1,\"note\":\"a\\u0000b\"}".to_vec(),
            422,
            "NUL",
        ),
    ];
    for (table, content_type, body, status, says) in cases {
        let reply = c
            .post_rows(table, content_type, body)
            .await
            .expect("request");
        assert_eq!(reply.status, status, "{says}: {}", reply.body);
        let error = reply.body["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "expected {says:?} in {error:?}");
    }
    let wrong_method = c.get("/v1/tables/t/rows").await.expect("request");
    assert_eq!(wrong_method.status, 405);
    assert_eq!(c.get("/nowhere").await.expect("request").status, 404);

    // What is accepted: consecutive LSNs, names that need quoting, NDJSON with blank lines.
    let first = post_ndjson(&mut c, "t", "{\"id\":1}\n\n{\"id\":2,\"doc\":[1]}\n").await;
    assert_eq!(first.status, 202, "{}", first.body);
    assert_eq!(first.body["rows"], 2);
    let second = c
        .post_rows(
            "\"Odd.Schema\".\"Odd\"\"Table\"",
            "application/json",
            "{\"Mixed Case\":\"x\"}",
        )
        .await
        .expect("request");
    assert_eq!(second.status, 202, "{}", second.body);
    assert_eq!(
        second.body["first_lsn"].as_u64(),
        first.body["last_lsn"].as_u64().map(|l| l + 1),
        "LSNs are consecutive"
    );
    flushed(&daemon).await;
    assert_eq!(
        pg.count("SELECT count(*) FROM t").await,
        2,
        "refused requests left nothing"
    );
    assert_eq!(
        pg.count("SELECT count(*) FROM \"Odd.Schema\".\"Odd\"\"Table\"")
            .await,
        1
    );
    daemon.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_group_commits_and_all_land() {
    let pg = Pg::start().await;
    pg.exec("CREATE TABLE e (id bigint NOT NULL, at timestamptz DEFAULT now())")
        .await;
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let mut tasks = Vec::new();
    for worker in 0..32 {
        let socket = daemon.socket().to_path_buf();
        tasks.push(tokio::spawn(async move {
            let mut c = client(&socket).await;
            for i in 0..20 {
                let reply =
                    post_ndjson(&mut c, "e", &format!("{{\"id\":{}}}\n", worker * 1000 + i)).await;
                assert_eq!(reply.status, 202, "{}", reply.body);
            }
        }));
    }
    for task in tasks {
        task.await.expect("client");
    }
    flushed(&daemon).await;
    assert_eq!(pg.count("SELECT count(DISTINCT id) FROM e").await, 640);
    assert_eq!(
        pg.count("SELECT count(*) FROM e WHERE at IS NOT NULL")
            .await,
        640,
        "defaults apply"
    );
    daemon.stop().await.expect("stop");

    // Records written by one group commit (one fdatasync) share their append time.
    let wal = dir.path().join("wal");
    let spool = pgspool::wal::read_spool_id(&wal)
        .expect("read")
        .expect("spool id");
    let mut commits = std::collections::HashSet::new();
    let mut records = 0;
    for segment in pgspool::wal::segment::list(&wal).expect("list") {
        let (mut cursor, _) = SegmentCursor::open(segment, spool).expect("open");
        while let Step::Record(_) = cursor.step(Lsn(u64::MAX)).expect("step") {
            commits.insert(cursor.record().time_us);
            records += 1;
        }
    }
    assert_eq!(records, 640);
    assert!(
        commits.len() < 640,
        "640 requests took {} fdatasyncs",
        commits.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_that_expand_past_a_wal_record_get_413_not_a_crash() {
    let pg = Pg::start().await;
    pg.exec("CREATE TABLE big (a numeric[])").await;
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let mut c = client(daemon.socket()).await;
    // 5 kB of JSON; each number is written out as 131,072 digits: 79 MB of COPY text.
    let values = vec!["1e131071"; 600].join(",");
    let reply = post_ndjson(&mut c, "big", &format!("{{\"a\":[{values}]}}\n")).await;
    assert_eq!(reply.status, 413, "{}", reply.body);
    assert!(
        reply.body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("smaller requests"),
        "{}",
        reply.body
    );
    let reply = post_ndjson(&mut c, "big", "{\"a\":[1e3]}\n").await;
    assert_eq!(reply.status, 202, "the daemon still serves: {}", reply.body);
    daemon.stop().await.expect("stop");
}

/// At a stop, a client sending on a connection it opened before gets an answer (503 with
/// `Retry-After` and `Connection: close`), not a connection closed under its request, after
/// which it could not know whether its rows were kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_on_an_open_connection_during_a_stop_gets_503_not_a_reset() {
    let pg = Pg::start().await;
    pg.exec("CREATE TABLE t (id bigint)").await;
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let mut first = client(daemon.socket()).await;
    let mut second = client(daemon.socket()).await;
    assert_eq!(
        post_ndjson(&mut first, "t", "{\"id\":1}\n").await.status,
        202
    );
    assert_eq!(
        post_ndjson(&mut second, "t", "{\"id\":2}\n").await.status,
        202
    );
    daemon.shutdown_token().cancel();
    until_stopping(&mut first).await;
    let reply = post_ndjson(&mut second, "t", "{\"id\":3}\n").await;
    assert_eq!(reply.status, 503, "{:?}", reply.body);
    assert_eq!(reply.headers["retry-after"], "1");
    assert_eq!(reply.headers["connection"], "close");
    daemon.wait().await.expect("clean stop");
    assert_eq!(pg.ids("SELECT id FROM t").await, [1, 2]);
}

/// A request refused before its body is read (here: at a stop) gets its answer even when
/// the client sends the body after a pause: the body is read and dropped, not left unread
/// under a closed connection, which would reset the client's upload; and the daemon's
/// process waits for it (up to the drain timeout) before it exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_sent_after_its_headers_still_gets_the_refusal() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pg = Pg::start().await;
    pg.exec("CREATE TABLE t (id bigint)").await;
    let dir = short_tempdir();
    let mut daemon = crate::harness::DaemonProcess::spawn(dir.path(), &pg.url(), &[]).await;
    let mut probe = client(&daemon.socket).await;
    let mut raw = tokio::net::UnixStream::connect(&daemon.socket)
        .await
        .expect("connect");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(daemon.pid()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    until_stopping(&mut probe).await;
    let body = "{\"id\":1}\n".repeat(20_000);
    let head = format!(
        "POST /v1/tables/t/rows HTTP/1.1\r\nhost: pgspool\r\ncontent-type: \
         application/x-ndjson\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    raw.write_all(head.as_bytes())
        .await
        .expect("send the headers");
    // The client is slower than the server's refusal, and than the flusher's drain (there
    // is nothing to drain): the server waits for it until the drain timeout.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    raw.write_all(body.as_bytes())
        .await
        .expect("the body is taken, not reset");
    let mut answer = String::new();
    raw.read_to_string(&mut answer)
        .await
        .expect("read the answer");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert_eq!(daemon.wait_exit().await.code(), Some(0));
}

/// Asks `/healthz` on `client`'s connection until the daemon says it is stopping: a 503,
/// or an answer with `Connection: close` (a request answered while the stop began gets
/// its 200 with it, and the connection ends there); every question gets an answer.
async fn until_stopping(client: &mut pgspool::client::SpoolClient) {
    let deadline = std::time::Instant::now() + crate::harness::DEADLINE;
    loop {
        let health = client
            .get("/healthz")
            .await
            .expect("an answer on an open connection");
        let closing = health
            .headers
            .get(hyper::header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        if health.status == 503 || closing {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon never stopped"
        );
    }
}
