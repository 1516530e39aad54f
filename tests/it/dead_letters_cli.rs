//! `pgspool dead-letters list` and `retry`, as the binary, against rows a real daemon
//! dead-lettered: listing them, sending them again once the cause is fixed, exactly once.

use std::process::{Command, Output, Stdio};

use pgspool::pgtemp::StopMode;

use crate::harness::{
    Pg, client, config, flushed, post_ndjson, short_tempdir, start_daemon, wait_until,
};

/// Runs `pgspool dead-letters ARGS --database-url URL`: exit code, stdout, stderr.
fn dead_letters(url: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out: Output = tokio::task::block_in_place(|| {
        command(url, args)
            .output()
            .expect("run pgspool dead-letters")
    });
    (
        out.status.code(),
        String::from_utf8(out.stdout).expect("utf-8 stdout"),
        String::from_utf8(out.stderr).expect("utf-8 stderr"),
    )
}

fn command(url: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pgspool"));
    command
        .arg("dead-letters")
        .args(args)
        .arg("--database-url")
        .arg(url)
        .env_remove("PGSPOOL_DATABASE_URL");
    command
}

/// Dead letters of a CHECK constraint: listed (human and NDJSON, counts exact), retried
/// once the constraint is replaced (one row still refused by the new one: it stays, with
/// the new error, exit 1), retried again (nothing lands twice), then all landed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_rows_are_listed_and_retried_exactly_once() {
    let pg = Pg::start().await;
    let url = pg.url();
    let (code, out, _) = dead_letters(&url, &["list"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("no pgspool flusher has run against it yet"),
        "{out}"
    );

    pg.exec("CREATE TABLE flights (id int PRIMARY KEY, delay int CHECK (delay < 100), note text)")
        .await;
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &url)).await;
    let mut c = client(daemon.socket()).await;
    let body: String = (1..=10)
        .map(|id| {
            let delay = if [3, 5, 7, 9].contains(&id) { 500 } else { id };
            let note = if id == 9 { "stays" } else { "ok" };
            format!("{{\"id\":{id},\"delay\":{delay},\"note\":\"{note}\"}}\n")
        })
        .collect();
    let reply = post_ndjson(&mut c, "flights", &body).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    flushed(&daemon).await;
    assert_eq!(pg.count("SELECT count(*) FROM flights").await, 6);
    assert_eq!(
        pg.count("SELECT count(*) FROM pgspool.dead_letters").await,
        4
    );

    let (code, out, err) = dead_letters(&url, &["list"]);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "4 dead letters in pgspool.dead_letters", "{out}");
    assert!(lines[1].starts_with("id "), "{out}");
    let entries: Vec<&&str> = lines[2..]
        .iter()
        .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()))
        .collect();
    assert_eq!(entries.len(), 4, "{out}");
    for entry in entries {
        assert!(entry.contains("public.flights"), "{out}");
        assert!(entry.contains("23514"), "{out}");
        assert!(entry.contains("violates"), "{out}");
    }
    assert_eq!(
        out.lines().filter(|l| l.starts_with("    row: ")).count(),
        4
    );
    assert!(out.lines().all(|l| l.chars().count() <= 100), "{out}");

    let (code, out, _) = dead_letters(&url, &["list", "--limit", "2"]);
    assert_eq!(code, Some(0));
    assert!(
        out.starts_with("4 dead letters in pgspool.dead_letters; the oldest 2 shown"),
        "{out}"
    );

    let (code, out, err) = dead_letters(&url, &["list", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let listed: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(listed.len(), 4);
    for d in &listed {
        assert_eq!(d["table_name"], "public.flights");
        assert_eq!(d["sqlstate"], "23514");
        assert!(
            d["message"]
                .as_str()
                .expect("message")
                .contains("flights_delay_check"),
            "{d}"
        );
        assert_eq!(d["columns"], serde_json::json!(["id", "delay", "note"]));
        let row: serde_json::Value =
            serde_json::from_str(d["row"].as_str().expect("row text")).expect("row JSON");
        assert_eq!(row["delay"], "500");
        assert!(d["copy_line"].as_str().expect("copy_line").contains("500"));
        for key in [
            "id",
            "spool_id",
            "lsn",
            "message",
            "detail",
            "context",
            "failed_at",
        ] {
            assert!(d.get(key).is_some(), "{key} missing: {d}");
        }
    }

    let (code, out, _) = dead_letters(&url, &["list", "--table", "flights"]);
    assert_eq!(code, Some(0));
    assert_eq!(out, "no dead letters of table flights\n");

    let (code, _, err) = dead_letters(&url, &["retry"]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("--all"), "{err}");

    // The fix: the delay check goes, a new check still refuses row 9.
    pg.exec(
        "ALTER TABLE flights DROP CONSTRAINT flights_delay_check,
             ADD CONSTRAINT not_stays CHECK (note IS DISTINCT FROM 'stays')",
    )
    .await;
    let (code, out, err) = dead_letters(&url, &["retry", "--table", "public.flights", "--dry-run"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("rolled back"), "{out}");
    assert!(
        out.contains("3 would land, 1 would be refused again"),
        "{out}"
    );
    assert_eq!(pg.count("SELECT count(*) FROM flights").await, 6);
    assert_eq!(
        pg.count(
            "SELECT count(*) FROM pgspool.dead_letters WHERE message LIKE '%flights_delay_check%'"
        )
        .await,
        4
    );

    let (code, out, err) = dead_letters(&url, &["retry", "--table", "public.flights"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        out.contains("4 dead letters retried: 3 landed, 1 refused again"),
        "{out}"
    );
    assert!(out.contains("not_stays"), "{out}");
    assert_eq!(pg.count("SELECT count(*) FROM flights").await, 9);
    assert_eq!(
        pg.count("SELECT count(*) FROM flights WHERE id IN (3, 5, 7) AND delay = 500")
            .await,
        3
    );
    assert_eq!(
        pg.count(
            "SELECT count(*) FROM pgspool.dead_letters
             WHERE (row::jsonb->>'id') = '9' AND sqlstate = '23514'
               AND message LIKE '%not_stays%' AND failed_at > now() - interval '1 minute'"
        )
        .await,
        1
    );
    assert_eq!(
        pg.count("SELECT count(*) FROM pgspool.dead_letters").await,
        1
    );

    // Again: the landed rows are gone from the dead letters, so nothing lands twice.
    let (code, out, err) = dead_letters(&url, &["retry", "--table", "public.flights"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        out.contains("1 dead letter retried: 0 landed, 1 refused again"),
        "{out}"
    );
    assert_eq!(pg.count("SELECT count(*) FROM flights").await, 9);

    pg.exec("ALTER TABLE flights DROP CONSTRAINT not_stays")
        .await;
    let (code, out, err) = dead_letters(&url, &["retry", "--all"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("1 dead letter retried: 1 landed, 0 refused again"),
        "{out}"
    );
    assert_eq!(pg.count("SELECT count(DISTINCT id) FROM flights").await, 10);
    assert_eq!(pg.count("SELECT count(*) FROM flights").await, 10);
    assert_eq!(
        pg.count("SELECT count(*) FROM pgspool.dead_letters").await,
        0
    );
    let (code, out, _) = dead_letters(&url, &["list"]);
    assert_eq!((code, out.as_str()), (Some(0), "no dead letters\n"));
    let (code, out, _) = dead_letters(&url, &["retry", "--all"]);
    assert_eq!(
        (code, out.as_str()),
        (Some(0), "no dead letters: nothing to retry\n")
    );
    daemon.stop().await.expect("stop");
}

/// Rows kept as JSON (posted while PostgreSQL was down, their table never seen) end in
/// dead letters both ways: refused by pgspool's encoder (no SQLSTATE, no COPY line) and by
/// PostgreSQL. Retry encodes them for the table as it is now; a table that is gone still
/// refuses, and its dead letter is left as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_kept_as_json_are_retried_for_the_table_as_it_is_now() {
    let mut pg = Pg::start().await;
    let url = pg.url();
    pg.exec(
        "CREATE TABLE tagged (id int, tags int[]);
         CREATE TABLE gone (id int CHECK (id > 0));",
    )
    .await;
    tokio::task::block_in_place(|| pg.stop(StopMode::Fast));
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &url)).await;
    let mut c = client(daemon.socket()).await;
    for (table, body) in [
        (
            "tagged",
            "{\"id\":1,\"tags\":\"not an array\"}\n{\"id\":2,\"tags\":[1,2]}\n",
        ),
        ("gone", "{\"id\":-1}\n"),
    ] {
        let reply = post_ndjson(&mut c, table, body).await;
        assert_eq!(reply.status, 202, "{}", reply.body);
    }
    pg.restart().await;
    wait_until("both refused rows are dead letters", || async {
        // The flusher creates the table once PostgreSQL is back.
        pg.client
            .query_one("SELECT count(*) FROM pgspool.dead_letters", &[])
            .await
            .is_ok_and(|r| r.get::<_, i64>(0) == 2)
    })
    .await;
    flushed(&daemon).await;
    assert_eq!(pg.count("SELECT count(*) FROM tagged").await, 1);

    let (code, out, err) = dead_letters(&url, &["list", "--json", "--table", "tagged"]);
    assert_eq!(code, Some(0), "{err}");
    let d: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(d["row"], "{\"id\":1,\"tags\":\"not an array\"}");
    assert_eq!(d["sqlstate"], serde_json::Value::Null);
    assert_eq!(d["copy_line"], serde_json::Value::Null);

    // The fixes: tags takes text now; gone is renamed away, so it refuses every row.
    pg.exec(
        "ALTER TABLE tagged ALTER COLUMN tags TYPE text USING tags::text;
         ALTER TABLE gone RENAME TO gone_away;",
    )
    .await;
    let (code, out, err) = dead_letters(&url, &["retry", "--all"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        out.contains("1 dead letter retried: 1 landed, 0 refused again"),
        "{out}"
    );
    assert!(
        out.contains("still refuse every row") && out.contains("  gone (1 dead letter): "),
        "{out}"
    );
    assert_eq!(
        pg.count("SELECT count(*) FROM tagged WHERE id = 1 AND tags = 'not an array'")
            .await,
        1
    );
    assert_eq!(
        pg.count(
            "SELECT count(*) FROM pgspool.dead_letters
             WHERE table_name = 'gone' AND sqlstate = '23514' AND copy_line = '-1'
               AND row = '{\"id\":-1}'"
        )
        .await,
        1
    );

    pg.exec("ALTER TABLE gone_away RENAME TO gone; ALTER TABLE gone DROP CONSTRAINT gone_id_check")
        .await;
    let (code, out, err) = dead_letters(&url, &["retry", "--table", "gone"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(pg.count("SELECT count(*) FROM gone WHERE id = -1").await, 1);
    assert_eq!(
        pg.count("SELECT count(*) FROM pgspool.dead_letters").await,
        0
    );
    daemon.stop().await.expect("stop");
}

/// Fault: retry is SIGKILLed while its transaction waits, the rows locked and COPY sent.
/// Nothing of it is committed: the dead letters stay, the table has none of the rows; the
/// next retry lands each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_killed_mid_transaction_changes_nothing() {
    let pg = Pg::start().await;
    let url = pg.url();
    pg.exec("CREATE TABLE t (id int PRIMARY KEY CHECK (id > 100))")
        .await;
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &url)).await;
    let mut c = client(daemon.socket()).await;
    let body: String = (1..=20).map(|id| format!("{{\"id\":{id}}}\n")).collect();
    assert_eq!(post_ndjson(&mut c, "t", &body).await.status, 202);
    flushed(&daemon).await;
    assert_eq!(
        pg.count("SELECT count(*) FROM pgspool.dead_letters").await,
        20
    );
    pg.exec("ALTER TABLE t DROP CONSTRAINT t_id_check").await;

    // Another session holds the table: retry's COPY waits for it.
    let blocker = crate::harness::connect(&url).await;
    blocker
        .batch_execute("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    let retry_url = format!("{url} application_name=killed-retry");
    let mut retry = command(&retry_url, &["retry", "--all"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn retry");
    wait_until("retry's COPY waits for the lock", || async {
        pg.count(
            "SELECT count(*) FROM pg_stat_activity
             WHERE application_name = 'killed-retry' AND wait_event_type = 'Lock'",
        )
        .await
            == 1
    })
    .await;
    retry.kill().expect("SIGKILL");
    retry.wait().expect("reap");
    blocker.batch_execute("ROLLBACK").await.expect("unlock");
    wait_until("the killed retry's session is gone", || async {
        pg.count("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'killed-retry'")
            .await
            == 0
    })
    .await;
    assert_eq!(pg.count("SELECT count(*) FROM t").await, 0);
    assert_eq!(
        pg.count("SELECT count(*) FROM pgspool.dead_letters").await,
        20
    );

    let (code, out, err) = dead_letters(&url, &["retry", "--all"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("20 dead letters retried: 20 landed"), "{out}");
    assert_eq!(pg.count("SELECT count(DISTINCT id) FROM t").await, 20);
    assert_eq!(pg.count("SELECT count(*) FROM t").await, 20);
    assert_eq!(
        pg.count("SELECT count(*) FROM pgspool.dead_letters").await,
        0
    );
    daemon.stop().await.expect("stop");
}
