//! Least privilege in PostgreSQL: pgspool's role with exactly the grants ARCHITECTURE.md
//! ("Privileges in PostgreSQL") lists (CONNECT on the database, USAGE on the target
//! tables' schema, INSERT on them, and its own `pgspool` schema) loads end to end; a table
//! it may not write (no INSERT, or no USAGE on its schema: 42501) is held and reported in
//! `pgspool.held_tables`, `/v1/status` and `/metrics`, its rows neither dead-lettered nor
//! lost, while the other tables flow; once granted, its rows land.

use serde_json::Value;

use crate::harness::{Pg, client, config, post_ndjson, short_tempdir, start_daemon, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_with_only_the_documented_grants_loads_and_reports_what_it_may_not_write() {
    let pg = Pg::start().await;
    pg.exec(
        "CREATE ROLE spool LOGIN;
         -- Nothing from PUBLIC: the role has exactly what is granted here.
         REVOKE ALL ON DATABASE postgres FROM PUBLIC;
         REVOKE ALL ON SCHEMA public FROM PUBLIC;
         GRANT CONNECT ON DATABASE postgres TO spool;
         CREATE SCHEMA pgspool AUTHORIZATION spool;
         CREATE SCHEMA app;
         CREATE SCHEMA private;
         CREATE TABLE app.events (id int, note text);
         CREATE TABLE app.locked (id int);
         CREATE TABLE private.hidden (id int);
         GRANT USAGE ON SCHEMA app TO spool;
         GRANT INSERT ON app.events TO spool;",
    )
    .await;
    let url = pg.url().replace("user=postgres", "user=spool");
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &url)).await;
    let mut c = client(daemon.socket()).await;
    for (table, body) in [
        ("app.events", "{\"id\":1,\"note\":\"a\"}\n{\"id\":2}\n"),
        ("app.locked", "{\"id\":10}\n{\"id\":11}\n"),
        ("private.hidden", "{\"id\":20}\n"),
        ("app.events", "{\"id\":3}\n"),
    ] {
        let reply = post_ndjson(&mut c, table, body).await;
        assert_eq!(reply.status, 202, "{table}: {}", reply.body);
    }
    wait_until(
        "app.events' rows land while the others are held",
        || async { pg.count("SELECT count(*) FROM app.events").await == 3 },
    )
    .await;
    wait_until(
        "pgspool.held_tables lists both tables for 42501",
        || async {
            pg.count(
                "SELECT count(*) FROM pgspool.held_tables
             WHERE table_name IN ('app.locked', 'private.hidden') AND sqlstate = '42501'",
            )
            .await
                == 2
        },
    )
    .await;
    let socket = daemon.socket().to_path_buf();
    wait_until("/metrics counts two held tables", || async {
        let body = client(&socket)
            .await
            .get("/metrics")
            .await
            .expect("GET /metrics")
            .body;
        body.as_str()
            .is_some_and(|b| b.lines().any(|l| l == "pgspool_tables_held 2"))
    })
    .await;
    let status: Value = client(&socket)
        .await
        .get("/v1/status")
        .await
        .expect("GET /v1/status")
        .body;
    assert_eq!(status["verdict"]["state"], "degraded", "{status:#}");
    for (table, says) in [
        ("app.locked", "permission denied to insert into"),
        ("private.hidden", "USAGE on the schema"),
    ] {
        let entry = &status["flusher"]["tables"][table];
        assert!(entry["held_after_lsn"].is_u64(), "{table}: {status:#}");
        assert_eq!(
            entry["last_error"]["sqlstate"], "42501",
            "{table}: {status:#}"
        );
        let message = entry["last_error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{table}: {message}");
    }
    assert_eq!(
        pg.count("SELECT count(*) FROM pgspool.dead_letters").await,
        0,
        "refused for a privilege, rows are held, not dead-lettered"
    );

    pg.exec(
        "GRANT INSERT ON app.locked TO spool;
         GRANT USAGE ON SCHEMA private TO spool;
         GRANT INSERT ON private.hidden TO spool;",
    )
    .await;
    wait_until("the held tables' rows land once granted", || async {
        pg.count("SELECT count(*) FROM app.locked").await == 2
            && pg.count("SELECT count(*) FROM private.hidden").await == 1
            && pg.count("SELECT count(*) FROM pgspool.held_tables").await == 0
    })
    .await;
    assert_eq!(
        pg.count("SELECT count(*) FROM pgspool.dead_letters").await,
        0
    );
    daemon.stop().await.expect("stop");
}
