//! Who may write what (issue 7, §2): the `[tables]` allow-list, and table and column names
//! that must never change the SQL pgspool runs.

use pgspool::config::Config;
use pgspool::pgtemp::StopMode;

use crate::harness::{
    Pg, client, config, flushed, post_ndjson, short_tempdir, start_daemon, wait_until,
};

/// The schema, table and column names below, as PostgreSQL holds them.
const SCHEMA: &str = r#""we.ird ""schema""""#;
const TABLE: &str = r#""t""; DROP TABLE victim; --""#;
const ID: &str = r#""id) VALUES (0); DROP TABLE victim; --""#;

/// Load: rows for a table and columns named with quotes, dots, spaces, unicode and SQL,
/// one of which PostgreSQL refuses (a CHECK), and rows for a table named like an
/// injection. Every row lands in exactly its table with exactly its values, the refused
/// one is a dead letter naming the table, and the table the names try to drop survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_with_quotes_dots_spaces_unicode_or_sql_change_no_statement() {
    let pg = Pg::start().await;
    pg.exec(&format!(
        r#"CREATE TABLE victim (id int); INSERT INTO victim VALUES (1);
           CREATE SCHEMA {SCHEMA};
           CREATE TABLE {SCHEMA}.{TABLE} (
               {ID} int NOT NULL CHECK ({ID} > 0), "it's" text, "sp ace" text,
               "ünï 😀" text, "x.y" numeric, "a""b" text);
           CREATE TABLE "Robert'); DROP TABLE victim;--" (id int);"#
    ))
    .await;
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let mut c = client(daemon.socket()).await;
    let id = "id) VALUES (0); DROP TABLE victim; --";
    let body = format!(
        "{{\"{id}\":1,\"it's\":\"O'Brien\",\"sp ace\":\"a b\",\"ünï 😀\":\"ß\",\"x.y\":1.5,\
         \"a\\\"b\":\"\\\"q\\\"\\\\\"}}\n\
         {{\"{id}\":-1,\"it's\":\"refused by the CHECK\"}}\n\
         {{\"{id}\":2}}\n"
    );
    let path_name = format!("{SCHEMA}.{TABLE}");
    let reply = post_ndjson(&mut c, &path_name, &body).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let reply = post_ndjson(&mut c, "Robert'); DROP TABLE victim;--", "{\"id\":5}\n").await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    flushed(&daemon).await;
    assert_eq!(pg.count("SELECT count(*) FROM victim").await, 1);
    assert_eq!(
        pg.count(&format!("SELECT count(*) FROM {SCHEMA}.{TABLE}"))
            .await,
        2
    );
    assert_eq!(
        pg.count(&format!(
            r#"SELECT count(*) FROM {SCHEMA}.{TABLE} WHERE {ID} = 1 AND "it's" = 'O''Brien'
               AND "sp ace" = 'a b' AND "ünï 😀" = 'ß' AND "x.y" = 1.5
               AND "a""b" = '"q"\'"#
        ))
        .await,
        1,
        "every value lands in its own column, unchanged"
    );
    assert_eq!(
        pg.count(&format!(
            "SELECT count(*) FROM pgspool.dead_letters WHERE sqlstate = '23514' \
             AND table_name = '{path_name}'"
        ))
        .await,
        1,
        "the refused row is a dead letter naming its table"
    );
    assert_eq!(
        pg.count(r#"SELECT count(*) FROM "Robert'); DROP TABLE victim;--" WHERE id = 5"#)
            .await,
        1
    );
    daemon.stop().await.expect("stop");
}

/// `cfg` with the allow-list of `toml_text` (a `[tables...]` part of a config file).
fn with_tables(mut cfg: Config, toml_text: &str) -> Config {
    cfg.tables = toml::from_str::<Config>(toml_text)
        .expect("a valid [tables] section")
        .tables;
    cfg
}

/// Fault: writes to tables the allow-list does not name, unqualified names, and rows
/// with a column their table's entry does not list; then the same with PostgreSQL down.
/// Each gets 403 naming what is not allowed and stores nothing; with PostgreSQL down the
/// answer is still 403, not the 503 of a lookup, because no query is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_tables_and_columns_in_the_allow_list_are_written() {
    let mut pg = Pg::start().await;
    pg.exec(
        "CREATE TABLE events (id int, kind text);
         CREATE SCHEMA audit; CREATE TABLE audit.log (at int, who text, what text);
         CREATE TABLE other (id int);",
    )
    .await;
    let dir = short_tempdir();
    let cfg = with_tables(
        config(dir.path(), &pg.url()),
        "[tables.\"public.events\"]\n[tables.\"audit.log\"]\ncolumns = [\"at\", \"who\"]\n",
    );
    let daemon = start_daemon(cfg).await;
    let mut c = client(daemon.socket()).await;
    for (table, body, status, says) in [
        ("public.events", "{\"id\":1,\"kind\":\"a\"}\n", 202, ""),
        ("audit.log", "{\"at\":1,\"who\":\"me\"}\n", 202, ""),
        (
            "audit.log",
            "{\"at\":2,\"who\":\"me\"}\n{\"at\":3,\"what\":\"secret\"}\n",
            403,
            "column \"what\" of table audit.log is not in its [tables] entry's columns (at, who)",
        ),
        (
            "public.other",
            "{\"id\":1}\n",
            403,
            "table public.other is not in pgspool's [tables] allow-list",
        ),
        (
            "events",
            "{\"id\":2}\n",
            403,
            "(did you mean public.events?)",
        ),
        (
            "public.missing",
            "{\"id\":1}\n",
            403,
            "table public.missing is not in",
        ),
    ] {
        let reply = post_ndjson(&mut c, table, body).await;
        assert_eq!(reply.status, status, "{table}: {}", reply.body);
        let error = reply.body["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(says),
            "{table}: expected {says:?} in {error:?}"
        );
    }
    let reply = c.get("/metrics").await.expect("GET /metrics");
    let metrics = reply.body.as_str().expect("text");
    for line in [
        "pgspool_requests_refused_total{reason=\"table_not_allowed\"} 3",
        "pgspool_requests_refused_total{reason=\"column_not_allowed\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in {metrics}");
    }
    flushed(&daemon).await;
    assert_eq!(pg.count("SELECT count(*) FROM events").await, 1);
    assert_eq!(pg.count("SELECT count(*) FROM audit.log").await, 1);
    assert_eq!(pg.count("SELECT count(*) FROM other").await, 0);

    pg.stop(StopMode::Fast);
    let reply = post_ndjson(&mut c, "public.other", "{\"id\":1}\n").await;
    assert_eq!(reply.status, 403, "{}", reply.body);
    // The listed table still takes rows while PostgreSQL is down (they wait in the WAL).
    let reply = post_ndjson(&mut c, "public.events", "{\"id\":2}\n").await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    pg.restart().await;
    wait_until("the row kept while PostgreSQL was down lands", || async {
        pg.count("SELECT count(*) FROM events").await == 2
    })
    .await;
    assert_eq!(pg.count("SELECT count(*) FROM other").await, 0);
    daemon.stop().await.expect("stop");
}
