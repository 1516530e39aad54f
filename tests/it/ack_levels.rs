//! `?ack=durable|committed|none` and `?invalid=reject|dead_letter`.

use std::time::Duration;

use pgspool::client::{Reply, SpoolClient};
use pgspool::pgtemp::StopMode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{Pg, client, config, post_ndjson, short_tempdir, start_daemon, wait_until};

async fn post(c: &mut SpoolClient, table: &str, query: &str, body: &str) -> Reply {
    c.post_rows_with(table, query, "application/x-ndjson", body.to_string())
        .await
        .expect("request")
}

/// Counts the flush transactions from now on: each one updates the watermark row once.
async fn count_flush_transactions(pg: &Pg) {
    pg.exec(
        "CREATE TABLE flushes (n int);
         CREATE FUNCTION count_flush() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN INSERT INTO flushes VALUES (1); RETURN NULL; END $$;
         CREATE TRIGGER count_flush AFTER INSERT OR UPDATE ON pgspool.watermarks
             FOR EACH ROW EXECUTE FUNCTION count_flush();",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_answers_once_postgresql_holds_the_rows_and_requests_share_commits() {
    let pg = Pg::start().await;
    pg.exec("CREATE TABLE t (id int PRIMARY KEY, note text)")
        .await;
    let dir = short_tempdir();
    let mut cfg = config(dir.path(), &pg.url());
    // A waiting request has its rows loaded without waiting for the batch to be due.
    let max_wait = Duration::from_secs(30);
    cfg.batch.max_wait = max_wait;
    let daemon = start_daemon(cfg).await;
    let mut c = client(daemon.socket()).await;

    let started = std::time::Instant::now();
    let reply = post(
        &mut c,
        "t",
        "ack=committed",
        "{\"id\":1}\n{\"id\":2,\"note\":\"x\"}\n{\"id\":3}\n",
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.body,
        json!({"rows": 3, "first_lsn": 1, "last_lsn": 3, "committed": 3, "dead_lettered": []})
    );
    assert!(
        started.elapsed() < max_wait / 2,
        "the answer waited {:?}, as if for the batch to be due",
        started.elapsed()
    );
    // Visible at once: the answer came after the commit.
    assert_eq!(pg.count("SELECT count(*) FROM t").await, 3);

    count_flush_transactions(&pg).await;
    let requests = 50;
    let tasks: Vec<_> = (0..requests)
        .map(|i| {
            let socket = daemon.socket().to_path_buf();
            tokio::spawn(async move {
                let mut c = client(&socket).await;
                post(
                    &mut c,
                    "t",
                    "ack=committed",
                    &format!("{{\"id\":{}}}\n", 100 + i),
                )
                .await
            })
        })
        .collect();
    for task in tasks {
        let reply = task.await.expect("task");
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.body["committed"], 1);
    }
    assert_eq!(
        pg.count("SELECT count(*) FROM t WHERE id >= 100").await,
        requests
    );
    let transactions = pg.count("SELECT count(*) FROM flushes").await;
    assert!(
        transactions * 5 <= requests,
        "{requests} requests took {transactions} flush transactions"
    );
    daemon.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn none_answers_before_the_sync_and_the_rows_land() {
    let pg = Pg::start().await;
    pg.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let mut c = client(daemon.socket()).await;
    let reply = post(&mut c, "t", "ack=none", "{\"id\":1}\n{\"id\":2}\n").await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    assert_eq!(
        reply.body,
        json!({"rows": 2, "first_lsn": 1, "last_lsn": 2})
    );
    let reply = post(&mut c, "t", "ack=durable", "{\"id\":3}\n").await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    assert_eq!(
        reply.body,
        json!({"rows": 1, "first_lsn": 3, "last_lsn": 3})
    );
    wait_until("the rows are loaded", || async {
        pg.count("SELECT count(*) FROM t").await == 3
    })
    .await;
    daemon.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_keeps_the_valid_rows_and_lists_the_refused_ones() {
    let pg = Pg::start().await;
    pg.exec("CREATE TABLE t (id int PRIMARY KEY, doc jsonb)")
        .await;
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let mut c = client(daemon.socket()).await;
    let body = "{\"id\":1}\n\
                {\"id\":2,\"nope\":1}\n\
                [1,2,3]\n\
                {\"id\":\n\
                {\"id\":5,\"doc\":\"\\u0000\"}\n\
                {\"id\":6,\"doc\":{\"k\":1}}\n";

    // The default refuses the whole request and keeps nothing.
    let reply = post(&mut c, "t", "", body).await;
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert_eq!(
        reply.body["error"],
        "line 3: a row must be a JSON object, found an array"
    );
    let reply = post(&mut c, "t", "invalid=reject", "{\"id\":1,\"nope\":1}\n").await;
    assert_eq!(reply.status, 422, "{}", reply.body);

    let reply = post(&mut c, "t", "invalid=dead_letter&ack=committed", body).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.body["rows"], 6,
        "every row, refused or not, takes an LSN"
    );
    assert_eq!(
        reply.body["first_lsn"], 1,
        "nothing was kept of the refused requests"
    );
    assert_eq!(reply.body["last_lsn"], 6);
    let refused = reply.body["refused"].as_array().expect("refused");
    let indexes: Vec<u64> = refused
        .iter()
        .map(|r| r["index"].as_u64().expect("index"))
        .collect();
    assert_eq!(indexes, vec![1, 2, 3, 4]);
    assert_eq!(
        refused[0]["error"],
        "line 2: column \"nope\" does not exist in table public.t"
    );
    assert_eq!(
        refused[1]["error"],
        "line 3: a row must be a JSON object, found an array"
    );
    assert!(
        refused[2]["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("line 4: malformed JSON")),
        "{}",
        refused[2]
    );
    assert!(
        refused[3]["error"]
            .as_str()
            .is_some_and(|e| e.contains("NUL")),
        "{}",
        refused[3]
    );
    // ack=committed: the valid rows are there when the answer arrives.
    assert_eq!(
        pg.count("SELECT count(*) FROM t WHERE id IN (1, 6) AND (id = 1 OR doc = '{\"k\":1}')")
            .await,
        2
    );
    assert_eq!(pg.count("SELECT count(*) FROM t").await, 2);

    // The refused rows are dead letters, with their text as sent and pgspool's reason, and
    // the answer says so.
    assert_eq!(reply.body["committed"], 2, "{}", reply.body);
    let listed = reply.body["dead_lettered"]
        .as_array()
        .expect("dead_lettered");
    assert_eq!(listed.len(), 4, "{}", reply.body);
    assert!(
        listed.iter().all(|d| d["sqlstate"].is_null()),
        "{}",
        reply.body
    );
    assert_eq!(
        pg.count(
            r#"SELECT count(*) FROM pgspool.dead_letters
               WHERE sqlstate IS NULL AND table_name = 'public.t' AND message LIKE 'line _: %'
                 AND row IN ('{"id":2,"nope":1}', '[1,2,3]', '{"id":',
                             '{"id":5,"doc":"\u0000"}')"#
        )
        .await,
        4
    );
    daemon.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_query_parameters_and_values_are_refused_with_the_allowed_ones() {
    let pg = Pg::start().await;
    pg.exec("CREATE TABLE t (id int)").await;
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let mut c = client(daemon.socket()).await;
    for (query, says) in [
        ("ack=sometimes", "use ack=durable"),
        ("ack=committed&invalid=skip", "use invalid=reject"),
        ("acks=committed", "ack=durable|committed|none"),
        ("ack=none&ack=committed", "given twice"),
    ] {
        let reply = post(&mut c, "t", query, "{\"id\":1}\n").await;
        assert_eq!(reply.status, 400, "{query}: {}", reply.body);
        let error = reply.body["error"].as_str().expect("error");
        assert!(error.contains(says), "{query}: {error}");
    }
    let reply = post_ndjson(&mut c, "t", "{\"id\":1}\n").await;
    assert_eq!(
        reply.body["first_lsn"], 1,
        "the refused requests kept nothing"
    );
    daemon.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_client_leaves_is_removed_and_the_rest_get_503_at_stop() {
    let mut pg = Pg::start().await;
    pg.exec("CREATE TABLE t (id int)").await;
    let dir = short_tempdir();
    let mut cfg = config(dir.path(), &pg.url());
    cfg.shutdown.drain_timeout = Duration::from_millis(500);
    let daemon = start_daemon(cfg).await;
    let acks = daemon.acks();
    let mut c = client(daemon.socket()).await;
    // The table's columns are cached; then no commit can come.
    let reply = post(&mut c, "t", "ack=committed", "{\"id\":1}\n").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    pg.stop(StopMode::Fast);

    let mut raw = tokio::net::UnixStream::connect(daemon.socket())
        .await
        .expect("connect");
    let body = "{\"id\":2}\n";
    raw.write_all(
        format!(
            "POST /v1/tables/t/rows?ack=committed HTTP/1.1\r\nhost: x\r\n\
             content-type: application/x-ndjson\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .expect("send");
    wait_until("the request waits", || async { acks.waiting() == 1 }).await;
    drop(raw);
    wait_until("the waiter of the client gone is removed", || async {
        acks.waiting() == 0
    })
    .await;

    // A client that half-closes its side is still there, and gets the answer at stop.
    let mut half = tokio::net::UnixStream::connect(daemon.socket())
        .await
        .expect("connect");
    half.write_all(
        format!(
            "POST /v1/tables/t/rows?ack=committed HTTP/1.1\r\nhost: x\r\n\
             content-type: application/x-ndjson\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .expect("send");
    half.shutdown().await.expect("half-close");
    wait_until("the request waits", || async { acks.waiting() == 1 }).await;
    // Longer than the check for clients gone.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(acks.waiting(), 1, "a half-closed client is not gone");

    daemon.shutdown_token().cancel();
    let mut answer = String::new();
    half.read_to_string(&mut answer).await.expect("read");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.contains("durable in the WAL (LSNs 3..=3)"),
        "{answer}"
    );
    assert!(
        !answer.to_ascii_lowercase().contains("retry-after"),
        "{answer}"
    );
    daemon.wait().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_lists_postgresql_dead_letters_and_answers_202_for_a_held_table() {
    let pg = Pg::start().await;
    pg.exec(
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (2);
         CREATE TABLE a (id int);",
    )
    .await;
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let mut c = client(daemon.socket()).await;
    let body = "{\"id\":1}\n{\"id\":2}\n{\"id\":3}\n";
    let reply = post(&mut c, "t", "ack=committed", body).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body["committed"], 2, "{}", reply.body);
    let listed = reply.body["dead_lettered"]
        .as_array()
        .expect("dead_lettered");
    assert_eq!(listed.len(), 1, "{}", reply.body);
    assert_eq!(listed[0]["lsn"], 2);
    assert_eq!(listed[0]["sqlstate"], "23505");
    assert_eq!(pg.count("SELECT count(*) FROM t").await, 3);

    // `a`'s columns are cached, then it goes away: its rows are held.
    let reply = post(&mut c, "a", "ack=committed", "{\"id\":1}\n").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    pg.exec("ALTER TABLE a RENAME TO a_away").await;
    let reply = post(&mut c, "a", "ack=committed", "{\"id\":2}\n").await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    assert_eq!(reply.body["committed"], false, "{}", reply.body);
    assert_eq!(reply.body["held"]["table"], "public.a", "{}", reply.body);
    let error = reply.body["held"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("42P01"), "{}", reply.body);
    let message = reply.body["message"].as_str().unwrap_or_default();
    assert!(message.contains("durable in the WAL"), "{}", reply.body);
    // Other tables are answered meanwhile, and `a`'s rows land once it is back.
    let reply = post(&mut c, "t", "ack=committed", "{\"id\":4}\n").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    pg.exec("ALTER TABLE a_away RENAME TO a").await;
    wait_until("a's held rows land", || async {
        pg.count("SELECT count(*) FROM a").await == 2
    })
    .await;
    daemon.stop().await.expect("stop");
}
