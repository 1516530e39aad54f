//! PostgreSQL faults under load (issue 4): each test names its fault and its load, and
//! ends with every acknowledged row in its table exactly once (or, where the test says so,
//! in dead letters; these faults are none of the rows' doing, so nothing may be
//! dead-lettered).
//!
//! Transient faults (connection lost, server crashed, statement timeout, read-only) are
//! retried with backoff; a schema fault (the table dropped) holds only that table's rows,
//! listed in `pgspool.held_tables`, until the table is back.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pgspool::pgtemp::StopMode;

use crate::dead_letters::{assert_each_once, assert_no_dead_letters, held_tables};
use crate::harness::{
    Pg, client, config, flushed, post_ndjson, short_tempdir, start_daemon, wait_until,
};
use crate::load::{EVENTS, Load, Shape, rows_body, start_load, start_load_into, wait_acked};

/// The flusher's backend while it runs a COPY, polled for up to `within`.
async fn flusher_in_copy(pg: &Pg, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let rows = pg
            .client
            .query(
                "SELECT pid FROM pg_stat_activity \
                 WHERE application_name = 'pgspool' AND state = 'active' \
                   AND query ILIKE 'copy%' LIMIT 1",
                &[],
            )
            .await
            .expect("pg_stat_activity");
        if let Some(row) = rows.first() {
            return Some(row.get(0));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    None
}

async fn count(pg: &Pg, table: &str) -> i64 {
    pg.count(&format!("SELECT count(*) FROM {table}")).await
}

/// Waits until `table` holds at least `more` rows more than it does now.
async fn wait_landed(pg: &Pg, table: &str, more: i64) {
    let now = count(pg, table).await;
    wait_until(&format!("{more} more rows land in {table}"), || async {
        count(pg, table).await >= now + more
    })
    .await;
}

/// How many lines of the server log contain `needle`.
fn log_count(pg: &Pg, needle: &str) -> usize {
    pg.server_log().matches(needle).count()
}

/// Stops the clients of `load` and waits for them.
async fn stop_load(load: &Load, clients: Vec<tokio::task::JoinHandle<()>>) {
    load.stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.expect("client");
    }
}

/// Fault: PostgreSQL stopped in immediate mode (`pg_ctl stop -m immediate`: SIGQUIT, as
/// good as a crash; backends die mid-COPY or mid-COMMIT, the next start runs crash
/// recovery) three times, each time as soon as the flusher is seen in a COPY, and started
/// again after 1,000 more rows were acknowledged while it was down.
/// Load: 4 clients into `ev`, 1 to 50 rows of up to 200 bytes per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_stop_mid_copy_loses_and_duplicates_nothing() {
    let mut pg = Pg::start().await;
    pg.exec(EVENTS).await;
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let load = Arc::new(Load::default());
    let shape = Shape::Varied {
        seed: 7,
        max_rows: 50,
        max_payload: 200,
    };
    let clients = start_load(daemon.socket(), 4, &load, shape);
    let mut mid_copy = 0;
    for _ in 0..3 {
        wait_acked(&load, load.acked_rows.load(Ordering::SeqCst) + 2000).await;
        wait_landed(&pg, "ev", 500).await;
        if flusher_in_copy(&pg, Duration::from_secs(5)).await.is_some() {
            mid_copy += 1;
        }
        tokio::task::block_in_place(|| pg.stop(StopMode::Immediate));
        // Writes go on while PostgreSQL is down.
        wait_acked(&load, load.acked_rows.load(Ordering::SeqCst) + 1000).await;
        pg.restart().await;
    }
    wait_acked(&load, load.acked_rows.load(Ordering::SeqCst) + 1000).await;
    stop_load(&load, clients).await;
    flushed(&daemon).await;
    let acked = load.acked_ids();
    let (in_table, dead) = assert_each_once(&pg, "ev", &acked).await;
    eprintln!(
        "immediate stops: {} rows acknowledged, {in_table} in ev, {dead} dead letters; \
         {mid_copy} of 3 stops aimed at a COPY",
        acked.len()
    );
    assert_no_dead_letters(&pg).await;
    daemon.stop().await.expect("stop");
}

/// Fault: the flusher's connection terminated (`pg_terminate_backend`, SQLSTATE 57P01)
/// five times while it runs a COPY (found by `application_name = 'pgspool'` in
/// `pg_stat_activity`), each time after rows landed again since the last.
/// Load: 4 clients into `ev`, 100 rows of 300 bytes per request (COPYs of a few hundred
/// kilobytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flusher_backend_terminated_mid_copy_loses_and_duplicates_nothing() {
    let pg = Pg::start().await;
    pg.exec(EVENTS).await;
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let load = Arc::new(Load::default());
    let shape = Shape::Fixed {
        rows: 100,
        payload: 300,
    };
    let clients = start_load(daemon.socket(), 4, &load, shape);
    let mut kills = 0;
    while kills < 5 {
        wait_landed(&pg, "ev", 1000).await;
        let pid = flusher_in_copy(&pg, Duration::from_secs(30))
            .await
            .expect("the flusher is seen in a COPY within 30 s");
        let terminated: bool = pg
            .client
            .query_one("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .expect("pg_terminate_backend")
            .get(0);
        if terminated {
            kills += 1;
        }
    }
    wait_landed(&pg, "ev", 1000).await;
    stop_load(&load, clients).await;
    flushed(&daemon).await;
    let acked = load.acked_ids();
    let (in_table, _) = assert_each_once(&pg, "ev", &acked).await;
    eprintln!(
        "terminated mid-COPY {kills} times: {} rows acknowledged, {in_table} in ev",
        acked.len()
    );
    assert_no_dead_letters(&pg).await;
    daemon.stop().await.expect("stop");
}

/// Fault: `statement_timeout = '200ms'` for pgspool's role (`ALTER ROLE spool SET`), and a
/// BEFORE INSERT trigger on `ev` that sleeps 1 ms per row: a COPY of more than about 180
/// rows is cancelled (57014), a smaller one is not. The flusher must shrink its batch.
/// Load: 3,000 rows, 50 per request, sent by 6 clients at once while the flusher gathers
/// its first batch (`[batch] max_wait = 1s`), so that batch is far too large.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_timeout_shrinks_the_batch_until_every_row_lands() {
    let pg = Pg::start().await;
    pg.exec(EVENTS).await;
    pg.exec(
        "CREATE ROLE spool LOGIN SUPERUSER;
         ALTER ROLE spool SET statement_timeout = '200ms';
         CREATE FUNCTION slow_row() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN PERFORM pg_sleep(0.001); RETURN NEW; END $$;
         CREATE TRIGGER slow_row BEFORE INSERT ON ev FOR EACH ROW EXECUTE FUNCTION slow_row();",
    )
    .await;
    let url = pg.url().replace("user=postgres", "user=spool");
    assert_ne!(url, pg.url());
    let dir = short_tempdir();
    let mut config = config(dir.path(), &url);
    config.batch.max_wait = Duration::from_secs(1);
    let daemon = start_daemon(config).await;

    let timeouts_before = log_count(&pg, "canceling statement due to statement timeout");
    let started = Instant::now();
    let senders: Vec<_> = (0..6i64)
        .map(|n| {
            let socket = daemon.socket().to_path_buf();
            tokio::spawn(async move {
                let mut c = client(&socket).await;
                let mut acked = Vec::new();
                for r in 0..10i64 {
                    let first = (n * 10 + r) * 50;
                    let reply =
                        post_ndjson(&mut c, "ev", &rows_body(first..first + 50, n, 40)).await;
                    assert_eq!(reply.status, 202, "{}", reply.body);
                    acked.extend(first..first + 50);
                }
                acked
            })
        })
        .collect();
    let mut acked = Vec::new();
    for s in senders {
        acked.extend(s.await.expect("sender"));
    }
    let sent = started.elapsed();
    flushed(&daemon).await;
    let timeouts = log_count(&pg, "canceling statement due to statement timeout") - timeouts_before;
    let (in_table, _) = assert_each_once(&pg, "ev", &acked).await;
    eprintln!(
        "statement timeout: {} rows sent in {sent:.2?}, all {in_table} landed after {:.2?}; \
         {timeouts} statements cancelled",
        acked.len(),
        started.elapsed()
    );
    assert!(
        timeouts > 0,
        "no COPY was cancelled: the test did not make the batch too large"
    );
    assert_no_dead_letters(&pg).await;
    daemon.stop().await.expect("stop");
}

/// Fault: `ALTER DATABASE postgres SET default_transaction_read_only = on` (and the
/// flusher's sessions terminated so that its next ones get it) until the flusher has been
/// refused (25006) and 1,500 more rows were acknowledged, then the setting reset.
/// Transient: nothing lands while it holds, nothing is dead-lettered, everything lands
/// after.
/// Load: 3 clients into `ev`, 1 to 40 rows of up to 100 bytes per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_database_is_transient_and_every_row_lands_after() {
    let pg = Pg::start().await;
    pg.exec(EVENTS).await;
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let load = Arc::new(Load::default());
    let shape = Shape::Varied {
        seed: 11,
        max_rows: 40,
        max_payload: 100,
    };
    let clients = start_load(daemon.socket(), 3, &load, shape);
    wait_acked(&load, 1000).await;
    wait_landed(&pg, "ev", 500).await;

    let refusals_before = log_count(&pg, "read-only transaction");
    // This client's own session started before: it stays read-write.
    pg.exec("ALTER DATABASE postgres SET default_transaction_read_only = on")
        .await;
    pg.exec(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'pgspool'",
    )
    .await;
    wait_until(
        "the flusher is refused for a read-only transaction",
        || async { log_count(&pg, "read-only transaction") > refusals_before },
    )
    .await;
    let landed = count(&pg, "ev").await;
    wait_acked(&load, load.acked_rows.load(Ordering::SeqCst) + 1500).await;
    assert_eq!(
        count(&pg, "ev").await,
        landed,
        "rows landed in a read-only database"
    );
    pg.exec("ALTER DATABASE postgres RESET default_transaction_read_only")
        .await;
    wait_landed(&pg, "ev", 1500).await;
    stop_load(&load, clients).await;
    flushed(&daemon).await;
    let acked = load.acked_ids();
    let (in_table, _) = assert_each_once(&pg, "ev", &acked).await;
    eprintln!(
        "read-only: {} rows acknowledged, {in_table} in ev, {} read-only refusals logged",
        acked.len(),
        log_count(&pg, "read-only transaction") - refusals_before
    );
    assert_no_dead_letters(&pg).await;
    daemon.stop().await.expect("stop");
}

/// The ids in `table` (unqualified) right before it is dropped, and the drop, in one
/// transaction that first locks the table, so that no flush commits in between.
async fn drop_recording_ids(pg: &Pg, table: &str) -> Vec<i64> {
    let messages = pg
        .client
        .simple_query(&format!(
            "BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE; SELECT id FROM {table}; \
             DROP TABLE {table}; COMMIT"
        ))
        .await
        .expect("drop");
    messages
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => {
                Some(row.get(0).expect("id").parse().expect("an integer"))
            }
            _ => None,
        })
        .collect()
}

/// Fault: table `held_a` dropped mid-load (SQLSTATE 42P01 for its rows), and created again
/// once `pgspool.held_tables` lists it and `flowing_b` has kept loading meanwhile.
/// Load: 2 clients into each of `held_a` and `flowing_b`, 1 to 30 rows of up to 100 bytes
/// per request; requests for `held_a` go on while it is missing (its columns are cached).
///
/// Rows of `held_a` committed before the drop went with it; every other acknowledged row
/// of `held_a` lands once it is back, and every row of `flowing_b` lands; nothing is
/// dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_table_is_held_while_another_keeps_flowing() {
    const TABLE_A: &str =
        "CREATE TABLE held_a (id bigint NOT NULL, client int NOT NULL, payload text)";
    let pg = Pg::start().await;
    pg.exec(&EVENTS.replace("TABLE ev", "TABLE flowing_b"))
        .await;
    pg.exec(TABLE_A).await;
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let shape = |seed| Shape::Varied {
        seed,
        max_rows: 30,
        max_payload: 100,
    };
    let load_a = Arc::new(Load::default());
    let load_b = Arc::new(Load::default());
    let clients_a = start_load_into(daemon.socket(), "held_a", 2, &load_a, shape(1));
    let clients_b = start_load_into(daemon.socket(), "flowing_b", 2, &load_b, shape(2));
    wait_acked(&load_a, 1000).await;
    wait_acked(&load_b, 1000).await;
    wait_landed(&pg, "held_a", 300).await;
    wait_landed(&pg, "flowing_b", 300).await;

    let dropped = drop_recording_ids(&pg, "held_a").await;
    wait_until("pgspool.held_tables lists public.held_a", || async {
        held_tables(&pg)
            .await
            .iter()
            .any(|h| h.table_name == "public.held_a")
    })
    .await;
    let held = held_tables(&pg).await;
    let a = held
        .iter()
        .find(|h| h.table_name == "public.held_a")
        .expect("held");
    assert!(
        a.sqlstate.as_deref().is_some_and(|s| s.starts_with("42")),
        "held for a schema error: {held:?}"
    );
    assert!(
        a.lsn > 0 && a.message.as_deref().is_some_and(|m| !m.is_empty()),
        "held_tables names the first held LSN and the error: {held:?}"
    );
    assert!(
        held.iter().all(|h| h.table_name != "public.flowing_b"),
        "only the dropped table is held: {held:?}"
    );
    // The other table keeps flowing while the first one is missing and held.
    wait_landed(&pg, "flowing_b", 1000).await;
    assert!(
        held_tables(&pg)
            .await
            .iter()
            .any(|h| h.table_name == "public.held_a"),
        "held_a is still held"
    );

    let acked_while_missing: Vec<i64> = load_a.acked.lock().expect("lock").clone();
    pg.exec(TABLE_A).await;
    wait_until("held_a is no longer held", || async {
        held_tables(&pg)
            .await
            .iter()
            .all(|h| h.table_name != "public.held_a")
    })
    .await;
    wait_landed(&pg, "held_a", 300).await;
    stop_load(&load_a, clients_a).await;
    stop_load(&load_b, clients_b).await;
    flushed(&daemon).await;

    // Requests for held_a while it was missing were accepted from the cached columns; a
    // 404 (the table checked again) is no loss, but nothing else is acceptable.
    let refusals = load_a.refusals.lock().expect("lock").clone();
    assert!(
        refusals.iter().all(|r| r.starts_with("404")),
        "writes refused: {refusals:?}"
    );
    let dropped_set: std::collections::HashSet<i64> = dropped.iter().copied().collect();
    let acked_a: Vec<i64> = load_a.acked.lock().expect("lock").clone();
    let expected_a: Vec<i64> = acked_a
        .iter()
        .copied()
        .filter(|id| !dropped_set.contains(id))
        .collect();
    let held_rows = acked_while_missing
        .iter()
        .filter(|id| !dropped_set.contains(id))
        .count();
    assert!(
        held_rows > 0,
        "rows of held_a were held while it was missing"
    );
    let (a_rows, _) = assert_each_once(&pg, "held_a", &expected_a).await;
    let acked_b = load_b.acked_ids();
    let (b_rows, _) = assert_each_once(&pg, "flowing_b", &acked_b).await;
    eprintln!(
        "dropped table: held_a {} acknowledged, {} dropped with the table, {held_rows} held, \
         {a_rows} landed; flowing_b {} acknowledged, {b_rows} landed",
        acked_a.len(),
        dropped.len(),
        acked_b.len()
    );
    assert!(held_tables(&pg).await.is_empty());
    assert_no_dead_letters(&pg).await;
    daemon.stop().await.expect("stop");
}

/// Fault: INSERT on `held_a` revoked from pgspool's role (a non-superuser, `spool`) mid-load
/// (SQLSTATE 42501), and granted again once `pgspool.held_tables` lists it and `flowing_b`
/// has kept loading meanwhile. Unlike a drop, nothing committed is lost.
/// Load: 2 clients into each of `held_a` and `flowing_b`, 1 to 30 rows of up to 100 bytes
/// per request.
///
/// Every acknowledged row of both tables lands exactly once; nothing is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_insert_holds_the_table_until_granted_again() {
    let pg = Pg::start().await;
    pg.exec(
        // No CREATE on the database: the role has its own pgspool schema, and the
        // bootstrap creates only what is missing.
        "CREATE ROLE spool LOGIN;
         CREATE SCHEMA pgspool AUTHORIZATION spool;",
    )
    .await;
    for table in ["held_a", "flowing_b"] {
        pg.exec(&format!(
            "{}; GRANT INSERT ON {table} TO spool;",
            EVENTS.replace("TABLE ev", &format!("TABLE {table}"))
        ))
        .await;
    }
    let url = pg.url().replace("user=postgres", "user=spool");
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &url)).await;
    let shape = |seed| Shape::Varied {
        seed,
        max_rows: 30,
        max_payload: 100,
    };
    let load_a = Arc::new(Load::default());
    let load_b = Arc::new(Load::default());
    let clients_a = start_load_into(daemon.socket(), "held_a", 2, &load_a, shape(3));
    let clients_b = start_load_into(daemon.socket(), "flowing_b", 2, &load_b, shape(4));
    wait_acked(&load_a, 1000).await;
    wait_acked(&load_b, 1000).await;
    wait_landed(&pg, "held_a", 300).await;

    pg.exec("REVOKE INSERT ON held_a FROM spool").await;
    wait_until("pgspool.held_tables lists public.held_a", || async {
        held_tables(&pg)
            .await
            .iter()
            .any(|h| h.table_name == "public.held_a")
    })
    .await;
    let held = held_tables(&pg).await;
    assert!(
        held.iter()
            .any(|h| h.table_name == "public.held_a" && h.sqlstate.as_deref() == Some("42501")),
        "held for the missing privilege (42501): {held:?}"
    );
    let landed_a = count(&pg, "held_a").await;
    wait_landed(&pg, "flowing_b", 1000).await;
    assert_eq!(
        count(&pg, "held_a").await,
        landed_a,
        "rows landed in held_a without INSERT"
    );

    pg.exec("GRANT INSERT ON held_a TO spool").await;
    wait_until("held_a is no longer held", || async {
        held_tables(&pg)
            .await
            .iter()
            .all(|h| h.table_name != "public.held_a")
    })
    .await;
    wait_landed(&pg, "held_a", 300).await;
    stop_load(&load_a, clients_a).await;
    stop_load(&load_b, clients_b).await;
    flushed(&daemon).await;
    let acked_a = load_a.acked_ids();
    let acked_b = load_b.acked_ids();
    let (a_rows, _) = assert_each_once(&pg, "held_a", &acked_a).await;
    let (b_rows, _) = assert_each_once(&pg, "flowing_b", &acked_b).await;
    eprintln!(
        "revoked INSERT: held_a {} acknowledged, {a_rows} landed; flowing_b {} acknowledged, \
         {b_rows} landed",
        acked_a.len(),
        acked_b.len()
    );
    assert_no_dead_letters(&pg).await;
    daemon.stop().await.expect("stop");
}
