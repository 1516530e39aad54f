//! Crashes and outages: a SIGKILLed daemon, PostgreSQL stopped mid-load or down at start,
//! a torn write at the end of the WAL. After each, every acknowledged row is in PostgreSQL
//! exactly once.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use pgspool::pgtemp::StopMode;

use crate::harness::{
    DaemonProcess, Pg, client, config, flushed, post_ndjson, short_tempdir, start_daemon,
};
use crate::load::{
    EVENTS, Load, Shape, assert_exactly_once, flush_through_marker, start_load, wait_acked,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_load_then_restart_delivers_every_acknowledged_row_once() {
    let pg = Pg::start().await;
    pg.exec(EVENTS).await;
    let dir = short_tempdir();
    // Small segments, so the kill can land during rotation or deletion too.
    let config_file = dir.path().join("pgspool.toml");
    std::fs::write(&config_file, "[wal]\nsegment_bytes = 65536\n").expect("config");
    let args = ["--config", config_file.to_str().expect("utf-8")];
    let mut daemon = DaemonProcess::spawn(dir.path(), &pg.url(), &args).await;

    let load = Arc::new(Load::default());
    let clients = start_load(
        &daemon.socket,
        8,
        &load,
        Shape::Fixed {
            rows: 25,
            payload: 0,
        },
    );
    wait_acked(&load, 5_000).await;
    daemon.kill();
    for c in clients {
        c.await.expect("client");
    }
    let acked = load.acked_ids();

    let daemon = DaemonProcess::spawn(dir.path(), &pg.url(), &args).await;
    flush_through_marker(&pg, &daemon.socket).await;
    assert_exactly_once(&pg, &acked).await;
    let log = daemon.log_text();
    assert!(log.contains("WAL recovered"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_mid_load_then_started_gets_every_row_once() {
    let mut pg = Pg::start().await;
    pg.exec(EVENTS).await;
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let load = Arc::new(Load::default());
    let clients = start_load(
        daemon.socket(),
        4,
        &load,
        Shape::Fixed {
            rows: 25,
            payload: 0,
        },
    );

    wait_acked(&load, 2_000).await;
    tokio::task::block_in_place(|| pg.stop(StopMode::Immediate));
    let while_down = load.acked_rows.load(Ordering::SeqCst);
    // Writes go on being acknowledged while PostgreSQL is down.
    wait_acked(&load, while_down + 2_000).await;
    assert!(*daemon.committed().borrow() < *daemon.durable().borrow());
    pg.restart().await;
    load.stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.expect("client");
    }
    flushed(&daemon).await;
    let acked = load.acked_ids();
    assert_exactly_once(&pg, &acked).await;
    daemon.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_at_start_rows_are_accepted_then_loaded_with_their_types() {
    let mut pg = Pg::start().await;
    pg.exec("CREATE TABLE typed (id int, doc jsonb, note text, tags text[], n numeric); CREATE TABLE oracle (LIKE typed);")
        .await;
    let row = r#"{"id":1,"doc":"just a string","note":42,"tags":["a","b,c",null],"n":1e3}"#;
    pg.client
        .execute(
            "INSERT INTO oracle SELECT * FROM jsonb_populate_record(NULL::typed, $1::text::jsonb)",
            &[&row],
        )
        .await
        .expect("oracle");
    tokio::task::block_in_place(|| pg.stop(StopMode::Fast));

    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let mut c = client(daemon.socket()).await;
    let reply = post_ndjson(&mut c, "typed", &format!("{row}\n")).await;
    assert_eq!(
        reply.status, 202,
        "accepted unchecked while PostgreSQL is down: {}",
        reply.body
    );
    let nul = post_ndjson(&mut c, "typed", "{\"note\":\"\\u0000\"}\n").await;
    assert_eq!(
        nul.status, 422,
        "NUL is refused even unchecked: {}",
        nul.body
    );

    pg.restart().await;
    flushed(&daemon).await;
    let same = pgspool::dataset::compare(&pg.client, "typed", "oracle")
        .await
        .expect("compare");
    assert!(same.is_equal(), "{same}");
    assert_eq!(same.left_rows, 1);
    daemon.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_while_postgres_is_down_validates_with_the_cached_columns() {
    let mut pg = Pg::start().await;
    pg.exec("CREATE TABLE t (id int, doc jsonb)").await;
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let mut c = client(daemon.socket()).await;
    assert_eq!(post_ndjson(&mut c, "t", "{\"id\":1}\n").await.status, 202);
    flushed(&daemon).await;
    daemon.stop().await.expect("stop");
    tokio::task::block_in_place(|| pg.stop(StopMode::Fast));

    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let mut c = client(daemon.socket()).await;
    let unknown = post_ndjson(&mut c, "t", "{\"id\":2,\"nope\":1}\n").await;
    assert_eq!(unknown.status, 503, "{}", unknown.body);
    assert!(
        unknown.body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("\"nope\""),
        "{}",
        unknown.body
    );
    // Known columns are encoded with their cached types: a string into jsonb stays a string.
    assert_eq!(
        post_ndjson(&mut c, "t", "{\"id\":3,\"doc\":\"s\"}\n")
            .await
            .status,
        202
    );
    pg.restart().await;
    flushed(&daemon).await;
    assert_eq!(
        pg.count("SELECT count(*) FROM t WHERE id = 3 AND doc = '\"s\"'::jsonb")
            .await,
        1
    );
    assert_eq!(pg.count("SELECT count(*) FROM t").await, 2);
    daemon.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_is_cut_at_start_and_acknowledged_rows_survive() {
    let mut pg = Pg::start().await;
    pg.exec(EVENTS).await;
    tokio::task::block_in_place(|| pg.stop(StopMode::Fast));
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let mut c = client(daemon.socket()).await;
    let reply = post_ndjson(
        &mut c,
        "ev",
        "{\"id\":1,\"client\":0}\n{\"id\":2,\"client\":0}\n",
    )
    .await;
    assert_eq!(reply.status, 202);
    daemon.stop().await.expect("stop");

    // A write torn by a crash: a record header and part of its payload, never acknowledged.
    let wal = dir.path().join("wal");
    let segment = pgspool::wal::segment::list(&wal)
        .expect("list")
        .pop()
        .expect("a segment");
    let garbage: Vec<u8> = (0..100u8).map(|i| i.wrapping_mul(37)).collect();
    let mut bytes = std::fs::read(&segment.path).expect("read");
    let good_len = bytes.len();
    bytes.extend_from_slice(&garbage);
    std::fs::write(&segment.path, &bytes).expect("write");

    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    assert_eq!(
        std::fs::metadata(&segment.path).expect("stat").len(),
        good_len as u64
    );
    let saved: Vec<_> = std::fs::read_dir(wal.join("quarantine"))
        .expect("quarantine dir")
        .map(|e| std::fs::read(e.expect("entry").path()).expect("read"))
        .collect();
    assert_eq!(
        saved,
        vec![garbage],
        "the cut bytes are kept beside the WAL"
    );
    let mut c = client(daemon.socket()).await;
    let next = post_ndjson(&mut c, "ev", "{\"id\":3,\"client\":0}\n").await;
    assert_eq!(
        next.body["first_lsn"], 3,
        "LSNs continue after the last valid record"
    );
    pg.restart().await;
    flushed(&daemon).await;
    assert_exactly_once(&pg, &[1, 2, 3]).await;
    assert_eq!(pg.count("SELECT count(*) FROM ev").await, 3);
    daemon.stop().await.expect("stop");
}
