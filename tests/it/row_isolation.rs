//! Rows PostgreSQL refuses after the 202: dead letters for bad rows, holds for tables that
//! refuse every row, and the rest of the batch committed either way.

use std::time::Duration;

use crate::harness::{
    Pg, client, config, flushed, post_ndjson, short_tempdir, start_daemon, status_json, wait_until,
};

/// Fault: 45 of 200 rows in one batch duplicate keys already in the table (23505), spread
/// so that isolating them needs more than one transaction's 32 savepoints. Load: one
/// request of 200 rows, flushed as one batch. Every row is in `t` or in dead letters,
/// once, and `pgspool status` reports the dead letters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_go_to_dead_letters_and_the_rest_commits() {
    let pg = Pg::start().await;
    pg.exec(
        "CREATE TABLE t (id int PRIMARY KEY, note text);
         INSERT INTO t SELECT g * 4, 'already here' FROM generate_series(1, 45) g;",
    )
    .await;
    let dir = short_tempdir();
    let mut cfg = config(dir.path(), &pg.url());
    cfg.batch.max_wait = Duration::from_secs(1);
    let daemon = start_daemon(cfg.clone()).await;
    let mut c = client(daemon.socket()).await;
    let body: String = (1..=200)
        .map(|id| format!("{{\"id\":{id},\"note\":\"row {id}\"}}\n"))
        .collect();
    let reply = post_ndjson(&mut c, "t", &body).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    flushed(&daemon).await;
    assert_eq!(
        pg.count("SELECT count(*) FROM t WHERE note LIKE 'row %'")
            .await,
        155
    );
    assert_eq!(pg.count("SELECT count(*) FROM t").await, 200);
    assert_eq!(
        pg.count(
            "SELECT count(*) FROM pgspool.dead_letters
             WHERE sqlstate = '23505' AND table_name = 'public.t'
               AND (row::jsonb->>'id')::int % 4 = 0 AND copy_line LIKE '%row %'"
        )
        .await,
        45
    );
    assert_eq!(
        pg.count("SELECT count(DISTINCT lsn) FROM pgspool.dead_letters")
            .await,
        45
    );
    let wal = dir.path().join("wal");
    let report = &status_json(&wal)["flusher"]["tables"]["public.t"];
    assert_eq!(report["dead_letters"], 45, "{report}");
    assert_eq!(report["last_error"]["sqlstate"], "23505", "{report}");
    let reply = c.get("/metrics").await.expect("GET /metrics");
    let metrics = reply.body.as_str().expect("text");
    for line in [
        "pgspool_dead_letters_total{table=\"public.t\"} 45",
        "pgspool_flush_errors_total{sqlstate_class=\"23\"} 45",
        "pgspool_tables_held 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in {metrics}");
    }
    daemon.stop().await.expect("stop");
    // A new run keeps what the last one reported until it knows better.
    let daemon = start_daemon(cfg).await;
    flushed(&daemon).await;
    let report = &status_json(&wal)["flusher"]["tables"]["public.t"];
    assert_eq!(report["last_error"]["sqlstate"], "23505", "{report}");
    assert_eq!(report["dead_letters"], 45, "{report}");
    daemon.stop().await.expect("stop");
}

/// Fault: table `a` is renamed away mid-load (42P01 for its rows) while `b` keeps taking
/// rows. Load: rows for both, before, during and after. `b`'s rows land while `a` is
/// held; once `a` is back, its rows land; nothing is dead-lettered, nothing doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_that_refuses_every_row_is_held_and_the_others_flow() {
    let pg = Pg::start().await;
    pg.exec("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY);")
        .await;
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let mut c = client(daemon.socket()).await;
    let rows = |ids: std::ops::Range<i32>| -> String {
        ids.map(|id| format!("{{\"id\":{id}}}\n")).collect()
    };
    for (table, ids) in [("a", 0..10), ("b", 0..10)] {
        assert_eq!(post_ndjson(&mut c, table, &rows(ids)).await.status, 202);
    }
    flushed(&daemon).await;
    pg.exec("ALTER TABLE a RENAME TO a_away").await;
    for (table, ids) in [("a", 10..20), ("b", 10..20), ("a", 20..30), ("b", 20..30)] {
        assert_eq!(post_ndjson(&mut c, table, &rows(ids)).await.status, 202);
    }
    wait_until("b's rows land while a is held", || async {
        pg.count("SELECT count(*) FROM b").await == 30
    })
    .await;
    assert_eq!(
        pg.count("SELECT count(*) FROM pgspool.held_tables WHERE table_name = 'public.a' AND sqlstate = '42P01'")
            .await,
        1
    );
    assert_eq!(pg.count("SELECT count(*) FROM a_away").await, 10);
    // The gauge follows the hold's commit (the flusher publishes after PostgreSQL answers).
    wait_until("/metrics counts a as held", || async {
        let reply = client(daemon.socket()).await.get("/metrics").await;
        let reply = reply.expect("GET /metrics");
        let metrics = reply.body.as_str().expect("text");
        metrics.lines().any(|l| l == "pgspool_tables_held 1")
    })
    .await;
    let wal = dir.path().join("wal");
    wait_until("status reports a as held", || async {
        let report = status_json(&wal)["flusher"]["tables"]["public.a"].clone();
        report["held_after_lsn"].is_u64() && report["last_error"]["sqlstate"] == "42P01"
    })
    .await;
    pg.exec("ALTER TABLE a_away RENAME TO a").await;
    wait_until("a's held rows land", || async {
        pg.count("SELECT count(*) FROM a").await == 30
    })
    .await;
    wait_until("the hold is released", || async {
        pg.count("SELECT count(*) FROM pgspool.held_tables").await == 0
    })
    .await;
    assert_eq!(pg.count("SELECT count(DISTINCT id) FROM a").await, 30);
    wait_until("status reports a as flowing", || async {
        status_json(&wal)["flusher"]["tables"]["public.a"]["held_after_lsn"].is_null()
    })
    .await;
    assert_eq!(
        pg.count("SELECT count(*) FROM pgspool.dead_letters").await,
        0
    );
    daemon.stop().await.expect("stop");
}

/// Fault: 30 of 300 rows in one batch break a foreign key, which PostgreSQL checks after
/// the COPY's last row, with no line number: the flusher finds them by bisection under
/// savepoints. Every row is in `child` or in dead letters, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_refused_without_a_line_number_are_found_by_bisection() {
    let pg = Pg::start().await;
    pg.exec(
        "CREATE TABLE parent (id int PRIMARY KEY);
         INSERT INTO parent SELECT g FROM generate_series(0, 299) g WHERE g % 10 <> 7;
         CREATE TABLE child (id int PRIMARY KEY, parent int REFERENCES parent);",
    )
    .await;
    let dir = short_tempdir();
    let mut cfg = config(dir.path(), &pg.url());
    cfg.batch.max_wait = Duration::from_secs(1);
    let daemon = start_daemon(cfg).await;
    let mut c = client(daemon.socket()).await;
    let body: String = (0..300)
        .map(|id| format!("{{\"id\":{id},\"parent\":{id}}}\n"))
        .collect();
    assert_eq!(post_ndjson(&mut c, "child", &body).await.status, 202);
    flushed(&daemon).await;
    assert_eq!(pg.count("SELECT count(*) FROM child").await, 270);
    assert_eq!(
        pg.count("SELECT count(*) FROM child WHERE id % 10 = 7")
            .await,
        0
    );
    assert_eq!(
        pg.count(
            "SELECT count(DISTINCT (row::jsonb->>'id')::int) FROM pgspool.dead_letters
             WHERE sqlstate = '23503' AND (row::jsonb->>'id')::int % 10 = 7"
        )
        .await,
        30
    );
    assert_eq!(
        pg.count("SELECT count(*) FROM pgspool.dead_letters").await,
        30
    );
    assert_eq!(
        pg.count("SELECT count(*) FROM pgspool.dead_letters WHERE context LIKE '%line%'")
            .await,
        0,
        "the premise: PostgreSQL names no line for these"
    );
    daemon.stop().await.expect("stop");
}

/// Fault: an AFTER ROW trigger raises (P0001) for one row of a request; PostgreSQL names no
/// line for it, since it fires after the COPY's last row. Load: one request of 3 rows.
/// The row is found by bisection and dead-lettered; the other two land, and the table is
/// not held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_an_after_trigger_refuses_is_a_dead_letter_not_a_hold() {
    let pg = Pg::start().await;
    pg.exec(
        "CREATE TABLE a1 (id int, n text);
         CREATE FUNCTION after_boom() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.n = 'bad' THEN RAISE EXCEPTION 'after-trigger refuses %', NEW.id; END IF;
             RETURN NULL;
         END $$;
         CREATE TRIGGER ab AFTER INSERT ON a1 FOR EACH ROW EXECUTE FUNCTION after_boom();",
    )
    .await;
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let mut c = client(daemon.socket()).await;
    let body = "{\"id\":1,\"n\":\"ok\"}\n{\"id\":2,\"n\":\"bad\"}\n{\"id\":3,\"n\":\"ok\"}\n";
    assert_eq!(post_ndjson(&mut c, "a1", body).await.status, 202);
    flushed(&daemon).await;
    assert_eq!(
        pg.count("SELECT count(*) FROM a1 WHERE id IN (1, 3)").await,
        2
    );
    assert_eq!(pg.count("SELECT count(*) FROM a1").await, 2);
    assert_eq!(
        pg.count(
            "SELECT count(*) FROM pgspool.dead_letters
             WHERE sqlstate = 'P0001' AND row::jsonb->>'id' = '2'"
        )
        .await,
        1
    );
    assert_eq!(
        pg.count("SELECT count(*) FROM pgspool.held_tables").await,
        0
    );
    daemon.stop().await.expect("stop");
}

/// Fault: a BEFORE ROW trigger raises a serialization failure (40001, a transient class)
/// for one row of `a3`, every time. Load: that row, then rows for `a2`. After three
/// failures at the same place `a3` is held, so `a2`'s rows land; once the trigger is gone
/// `a3`'s rows land too, nothing dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_that_always_fails_transiently_holds_its_table_not_the_spool() {
    let pg = Pg::start().await;
    pg.exec(
        "CREATE TABLE a2 (id int); CREATE TABLE a3 (id int, n text);
         CREATE FUNCTION conflict() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.n = 'stuck' THEN
                 RAISE EXCEPTION 'always conflicts' USING ERRCODE = '40001';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER c BEFORE INSERT ON a3 FOR EACH ROW EXECUTE FUNCTION conflict();",
    )
    .await;
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let mut c = client(daemon.socket()).await;
    let stuck = "{\"id\":1,\"n\":\"ok\"}\n{\"id\":2,\"n\":\"stuck\"}\n";
    assert_eq!(post_ndjson(&mut c, "a3", stuck).await.status, 202);
    assert_eq!(post_ndjson(&mut c, "a2", "{\"id\":7}\n").await.status, 202);
    wait_until("a2's row lands while a3 is held", || async {
        pg.count("SELECT count(*) FROM a2").await == 1
    })
    .await;
    assert_eq!(
        pg.count(
            "SELECT count(*) FROM pgspool.held_tables
             WHERE table_name = 'public.a3' AND sqlstate = '40001'"
        )
        .await,
        1
    );
    let wal = dir.path().join("wal");
    // The checkpoint that status reads is written after the commit PostgreSQL shows.
    wait_until(
        "status counts a3's rows as pending, and none of a2's",
        || async {
            let status = status_json(&wal);
            status["tables"]["public.a3"]["pending_rows"] == 2
                && status["tables"]["public.a2"].is_null()
        },
    )
    .await;
    pg.exec("DROP TRIGGER c ON a3").await;
    wait_until("a3's rows land", || async {
        pg.count("SELECT count(*) FROM a3").await == 2
    })
    .await;
    assert_eq!(
        pg.count("SELECT count(*) FROM pgspool.dead_letters").await,
        0
    );
    daemon.stop().await.expect("stop");
}

/// Fault: row-level security applies to pgspool's role on `r`, so PostgreSQL refuses its
/// COPY before it starts (0A000), which drops the connection with tokio-postgres. Load:
/// rows for `r` and for `o`. `r` is held (asked before the COPY), `o` flows; once row
/// security is off, `r`'s rows land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_under_row_level_security_is_held_and_the_others_flow() {
    let pg = Pg::start().await;
    pg.exec(
        "CREATE ROLE spool LOGIN;
         CREATE SCHEMA pgspool AUTHORIZATION spool;
         CREATE TABLE r (id int); CREATE TABLE o (id int);
         GRANT SELECT, INSERT ON r, o TO spool;
         ALTER TABLE r ENABLE ROW LEVEL SECURITY;
         CREATE POLICY p ON r FOR ALL TO spool USING (true) WITH CHECK (true);",
    )
    .await;
    let url = pg.url().replace("user=postgres", "user=spool");
    assert_ne!(url, pg.url());
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &url)).await;
    let mut c = client(daemon.socket()).await;
    assert_eq!(post_ndjson(&mut c, "r", "{\"id\":1}\n").await.status, 202);
    assert_eq!(post_ndjson(&mut c, "o", "{\"id\":2}\n").await.status, 202);
    wait_until("o's row lands while r is held", || async {
        pg.count("SELECT count(*) FROM o").await == 1
    })
    .await;
    assert_eq!(
        pg.count("SELECT count(*) FROM pgspool.held_tables WHERE sqlstate = '0A000'")
            .await,
        1
    );
    pg.exec("ALTER TABLE r DISABLE ROW LEVEL SECURITY").await;
    wait_until("r's row lands", || async {
        pg.count("SELECT count(*) FROM r").await == 1
    })
    .await;
    daemon.stop().await.expect("stop");
}

/// Fault: table `a` is held while 20,000 of its rows arrive; batches are 50 rows. Load:
/// once `a` is fixed and its catch-up under way, one row for `b` with `?ack=committed`.
/// The catch-up goes one batch at a time between the main batches, so `b`'s row is
/// committed before `a` has caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_catch_up_does_not_stop_the_other_tables() {
    let pg = Pg::start().await;
    pg.exec("CREATE TABLE a (id int); CREATE TABLE b (id int);")
        .await;
    let dir = short_tempdir();
    let mut cfg = config(dir.path(), &pg.url());
    cfg.batch.max_rows = 50;
    let daemon = start_daemon(cfg).await;
    let mut c = client(daemon.socket()).await;
    assert_eq!(post_ndjson(&mut c, "a", "{\"id\":0}\n").await.status, 202);
    flushed(&daemon).await;
    pg.exec("ALTER TABLE a RENAME TO a_away").await;
    for chunk in 0..400 {
        let body: String = (chunk * 50..(chunk + 1) * 50)
            .map(|id| format!("{{\"id\":{}}}\n", id + 1))
            .collect();
        assert_eq!(post_ndjson(&mut c, "a", &body).await.status, 202);
    }
    flushed(&daemon).await;
    assert_eq!(
        pg.count("SELECT count(*) FROM pgspool.held_tables").await,
        1
    );
    pg.exec("ALTER TABLE a_away RENAME TO a").await;
    wait_until("a's catch-up is under way", || async {
        pg.count("SELECT count(*) FROM a").await > 1
    })
    .await;
    let reply = c
        .post_rows_with("b", "ack=committed", "application/x-ndjson", "{\"id\":1}\n")
        .await
        .expect("request");
    assert_eq!(reply.status, 200, "{}", reply.body);
    let loaded = pg.count("SELECT count(*) FROM a").await;
    assert!(
        loaded < 20_001,
        "b waited for all of a's catch-up ({loaded} rows)"
    );
    wait_until("a has caught up", || async {
        pg.count("SELECT count(*) FROM a").await == 20_001
    })
    .await;
    daemon.stop().await.expect("stop");
}
