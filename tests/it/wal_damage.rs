//! A damaged or out-of-date WAL is refused, never cut or skipped silently; `status` says
//! what is wrong.

use std::process::Command;

use pgspool::app::Daemon;
use pgspool::pgtemp::StopMode;

use crate::harness::{
    DEADLINE, Pg, client, config, flushed, post_ndjson, short_tempdir, start_daemon, status,
};

/// Writes three requests of two rows into a WAL in `dir` while PostgreSQL is down, so the
/// rows stay in the last segment; returns the segment.
async fn three_requests(dir: &std::path::Path, pg: &mut Pg) -> std::path::PathBuf {
    pg.exec("CREATE TABLE ev (id int)").await;
    tokio::task::block_in_place(|| pg.stop(StopMode::Fast));
    let daemon = start_daemon(config(dir, &pg.url())).await;
    let mut c = client(daemon.socket()).await;
    for i in 0..3 {
        let body = format!("{{\"id\":{}}}\n{{\"id\":{}}}\n", 2 * i, 2 * i + 1);
        assert_eq!(post_ndjson(&mut c, "ev", &body).await.status, 202);
    }
    daemon.stop().await.expect("stop");
    pgspool::wal::segment::list(&dir.join("wal"))
        .expect("list")
        .pop()
        .expect("a segment")
        .path
}

/// Runs a daemon in `dir`, sends `body` to table `ev`, waits until it is committed, stops.
async fn load_and_stop(dir: &std::path::Path, pg: &Pg, body: &str) {
    let daemon = start_daemon(config(dir, &pg.url())).await;
    let mut c = client(daemon.socket()).await;
    assert_eq!(post_ndjson(&mut c, "ev", body).await.status, 202);
    flushed(&daemon).await;
    daemon.stop().await.expect("stop");
}

/// Runs `pgspool quarantine` on `wal`; panics unless it succeeds; returns its report. A
/// lock still held is waited for: a child process another test forks in this process
/// holds a copy of a daemon's lock until it execs.
fn quarantine(wal: &std::path::Path) -> String {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let out = Command::new(env!("CARGO_BIN_EXE_pgspool"))
            .args(["quarantine", "--wal-dir"])
            .arg(wal)
            .output()
            .expect("run quarantine");
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            stderr.contains("in use by another pgspool") && std::time::Instant::now() < deadline,
            "{stderr}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

async fn start_error(dir: &std::path::Path, pg: &Pg) -> String {
    let err = Daemon::start(config(dir, &pg.url()))
        .await
        .expect_err("the daemon must refuse to start");
    format!("{err:#}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_bit_with_valid_records_after_it_is_refused_until_quarantined() {
    let mut pg = Pg::start().await;
    let dir = short_tempdir();
    let wal = dir.path().join("wal");
    let segment = three_requests(dir.path(), &mut pg).await;
    let mut bytes = std::fs::read(&segment).expect("read");
    // The first record's payload (LSNs 1 and 2): two records of later requests follow it.
    bytes[64 + 40] ^= 0x04;
    std::fs::write(&segment, &bytes).expect("write");
    let damaged = format!("{}, bytes 64..", segment.display());

    let (state, s) = status(&wal);
    assert_eq!(state, "corrupt", "{s:#}");
    assert_eq!(s["intact"], false);
    let problem = s["problems"][0].as_str().unwrap_or_default();
    assert!(
        problem.contains(&damaged) && problem.contains("LSNs 1 ..= 2 (2 rows)"),
        "{s:#}"
    );

    let err = start_error(dir.path(), &pg).await;
    assert!(
        err.contains("WAL damaged")
            && err.contains(&damaged)
            && err.contains("LSNs 1 ..= 2 (2 rows)")
            && err.contains("pgspool quarantine --wal-dir"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&segment).expect("read"),
        bytes,
        "nothing was cut"
    );
    assert!(!wal.join("quarantine").exists());

    // The operator's explicit choice: move the damaged record aside, then start.
    let report = quarantine(&wal);
    assert!(
        report.contains("moved aside") && report.contains("2 acknowledged rows will not be loaded"),
        "{report}"
    );
    let saved: Vec<_> = std::fs::read_dir(wal.join("quarantine"))
        .expect("quarantine dir")
        .map(|e| std::fs::read(e.expect("entry").path()).expect("read"))
        .collect();
    assert_eq!(saved.len(), 1);
    assert_eq!(
        saved[0],
        bytes[64..64 + saved[0].len()],
        "the damaged bytes are kept"
    );
    assert!(
        saved[0].len() > 40,
        "a whole record (header and payload) is kept"
    );
    let (state, s) = status(&wal);
    assert_eq!(
        (state.as_str(), &s["quarantined_rows"]),
        ("unreachable", &2.into()),
        "{s:#}"
    );

    tokio::task::block_in_place(|| pg.server.restart()).expect("restart PostgreSQL");
    let pg = Pg {
        client: crate::harness::connect(&pg.url()).await,
        server: pg.server,
    };
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    flushed(&daemon).await;
    daemon.stop().await.expect("stop");
    let ids: String = pg
        .client
        .query_one("SELECT string_agg(id::text, ',' ORDER BY id) FROM ev", &[])
        .await
        .expect("query")
        .get(0);
    assert_eq!(
        ids, "2,3,4,5",
        "the rows after the quarantined range are loaded once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_the_flusher_finds_in_an_older_segment_stops_the_daemon_and_every_start() {
    let mut pg = Pg::start().await;
    let dir = short_tempdir();
    let wal = dir.path().join("wal");
    let segments = one_row_per_segment(dir.path(), &mut pg, 4).await;
    // Start-up reads only the last segment: damage in the second is found by the flusher.
    let mut bytes = std::fs::read(&segments[1]).expect("read");
    bytes[64 + 40 + 100] ^= 0x01;
    std::fs::write(&segments[1], &bytes).expect("write");
    pg.restart().await;

    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let stopped = tokio::time::timeout(DEADLINE, daemon.wait())
        .await
        .expect("the daemon stops by itself");
    let err = format!("{:#}", stopped.expect_err("a fatal error"));
    let damage = format!("{}, bytes 64..", segments[1].display());
    assert!(
        err.contains("WAL damaged")
            && err.contains(&damage)
            && err.contains("LSNs 2 ..= 2 (1 row)"),
        "{err}"
    );
    assert_eq!(
        pg.count("SELECT count(*) FROM ev").await,
        1,
        "LSN 1 was loaded"
    );
    // Every later start refuses at once, and status says why.
    let err = start_error(dir.path(), &pg).await;
    assert!(err.contains(&damage), "{err}");
    let (state, s) = status(&wal);
    assert_eq!(state, "corrupt", "{s:#}");
    assert!(
        s["problems"].to_string().contains("found while flushing"),
        "{s:#}"
    );

    quarantine_and_load(&dir, &pg, 2, "moved aside").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_with_a_damaged_header_is_refused_until_quarantined_whole() {
    let mut pg = Pg::start().await;
    let dir = short_tempdir();
    let wal = dir.path().join("wal");
    let segments = one_row_per_segment(dir.path(), &mut pg, 4).await;
    let mut bytes = std::fs::read(&segments[1]).expect("read");
    bytes[20] ^= 0x01; // the first LSN in the header
    std::fs::write(&segments[1], &bytes).expect("write");
    pg.restart().await;

    let err = start_error(dir.path(), &pg).await;
    assert!(
        err.contains(&segments[1].display().to_string())
            && err.contains("checksum mismatch")
            && err.contains("pgspool quarantine --wal-dir"),
        "{err}"
    );
    assert_eq!(status(&wal).0, "corrupt");
    quarantine_and_load(&dir, &pg, 2, "moved aside").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_segment_stops_the_flusher_until_quarantine_passes_over_its_lsns() {
    let mut pg = Pg::start().await;
    let dir = short_tempdir();
    let segments = one_row_per_segment(dir.path(), &mut pg, 4).await;
    std::fs::remove_file(&segments[1]).expect("remove a middle segment");
    pg.restart().await;

    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let stopped = tokio::time::timeout(DEADLINE, daemon.wait())
        .await
        .expect("the daemon stops by itself");
    let err = format!("{:#}", stopped.expect_err("a fatal error"));
    assert!(
        err.contains("does not hold LSN 2") && err.contains("pgspool quarantine --wal-dir"),
        "{err}"
    );
    quarantine_and_load(&dir, &pg, 2, "passed over").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_shorter_than_at_its_clean_stop_is_refused_until_quarantined() {
    let mut pg = Pg::start().await;
    let dir = short_tempdir();
    let segments = one_row_per_segment(dir.path(), &mut pg, 4).await;
    // Without the last segment the log would look whole, ending at LSN 3.
    std::fs::remove_file(&segments[3]).expect("remove the last segment");
    let (state, s) = status(&dir.path().join("wal"));
    assert_eq!(state, "corrupt", "{s:#}");
    assert!(
        s["problems"].to_string().contains("last stopped cleanly"),
        "{s:#}"
    );
    pg.restart().await;
    let err = start_error(dir.path(), &pg).await;
    assert!(
        err.contains("ends at LSN 3, but it ended at LSN 4 when pgspool last stopped cleanly"),
        "{err}"
    );
    quarantine_and_load(&dir, &pg, 4, "passed over").await;
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let mut c = client(daemon.socket()).await;
    let reply = post_ndjson(&mut c, "ev", "{\"id\":9}\n").await;
    assert_eq!(
        reply.body["first_lsn"], 5,
        "LSN 4 is never given again: {}",
        reply.body
    );
    flushed(&daemon).await;
    daemon.stop().await.expect("stop");
    assert_eq!(pg.count("SELECT count(*) FROM ev WHERE id = 9").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantining_the_record_at_the_watermark_lets_the_rows_after_it_load() {
    let mut pg = Pg::start().await;
    pg.exec("CREATE TABLE ev (id int)").await;
    let dir = short_tempdir();
    let wal = dir.path().join("wal");
    load_and_stop(dir.path(), &pg, "{\"id\":0}\n{\"id\":1}\n").await;
    load_and_stop(dir.path(), &pg, "{\"id\":2}\n{\"id\":3}\n").await;
    // PostgreSQL's watermark is LSN 4, the end of the second record; then rows 5 and 6
    // are acknowledged while it is down.
    tokio::task::block_in_place(|| pg.stop(StopMode::Fast));
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let spool_id = daemon.spool_id();
    let mut c = client(daemon.socket()).await;
    let reply = post_ndjson(&mut c, "ev", "{\"id\":4}\n{\"id\":5}\n").await;
    assert_eq!(reply.status, 202);
    daemon.stop().await.expect("stop");
    // Damage the record at the watermark (LSNs 3 and 4), already loaded.
    let segment = pgspool::wal::segment::list(&wal)
        .expect("list")
        .pop()
        .expect("a segment");
    let (mut cursor, _) =
        pgspool::wal::segment::SegmentCursor::open(segment.clone(), spool_id).expect("open");
    let mut starts = Vec::new();
    loop {
        let at = cursor.offset();
        match cursor.step(pgspool::lsn::Lsn(u64::MAX)).expect("step") {
            pgspool::wal::segment::Step::Record(lsns) => starts.push((lsns.first.0, at)),
            _ => break,
        }
    }
    let (_, at) = starts
        .iter()
        .find(|(lsn, _)| *lsn == 3)
        .expect("the record of LSN 3");
    let mut bytes = std::fs::read(&segment.path).expect("read");
    bytes[*at as usize + 45] ^= 0x08;
    std::fs::write(&segment.path, &bytes).expect("write");

    pg.restart().await;
    let err = start_error(dir.path(), &pg).await;
    assert!(err.contains("LSNs 3 ..= 4 (2 rows)"), "{err}");
    quarantine(&wal);
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    flushed(&daemon).await;
    daemon.stop().await.expect("stop");
    assert_eq!(pg.count("SELECT count(DISTINCT id) FROM ev").await, 6);
    assert_eq!(pg.count("SELECT count(*) FROM ev").await, 6, "no row twice");
}

/// For a WAL written by [`one_row_per_segment`] (4 rows) whose row at LSN `lsn` is damaged
/// or missing: runs `pgspool quarantine` (which reports it as `what`), checks that status
/// counts it, then starts a daemon and checks that every other row, and only those, is
/// loaded.
async fn quarantine_and_load(dir: &tempfile::TempDir, pg: &Pg, lsn: u64, what: &str) {
    let wal = dir.path().join("wal");
    let report = quarantine(&wal);
    assert!(
        report.contains(what) && report.contains(&format!("LSNs {lsn} ..= {lsn} (1 row)")),
        "{report}"
    );
    let (state, s) = status(&wal);
    assert_eq!(
        (state.as_str(), &s["quarantined_rows"]),
        ("unreachable", &1.into()),
        "{s:#}"
    );
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    flushed(&daemon).await;
    daemon.stop().await.expect("stop");
    let id = lsn - 1;
    assert_eq!(
        pg.count(&format!("SELECT count(*) FROM ev WHERE id <> {id}"))
            .await,
        3
    );
    assert_eq!(
        pg.count("SELECT count(*) FROM ev").await,
        3,
        "id {id} is not loaded"
    );
}

/// Writes `n` rows of 40 kB into a WAL in `dir` with 64 KiB segments while PostgreSQL is
/// down (left stopped), so each row has a segment of its own; returns the segments.
async fn one_row_per_segment(
    dir: &std::path::Path,
    pg: &mut Pg,
    n: usize,
) -> Vec<std::path::PathBuf> {
    pg.exec("CREATE TABLE ev (id int, pad text)").await;
    tokio::task::block_in_place(|| pg.stop(StopMode::Fast));
    let mut cfg = config(dir, &pg.url());
    cfg.wal.segment_bytes = 65536;
    let daemon = start_daemon(cfg).await;
    let mut c = client(daemon.socket()).await;
    let pad = "x".repeat(40_000);
    for id in 0..n {
        let body = format!("{{\"id\":{id},\"pad\":\"{pad}\"}}\n");
        assert_eq!(post_ndjson(&mut c, "ev", &body).await.status, 202);
    }
    daemon.stop().await.expect("stop");
    let segments = pgspool::wal::segment::list(&dir.join("wal")).expect("list");
    assert_eq!(segments.len(), n, "{segments:?}");
    segments.into_iter().map(|s| s.path).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_ends_before_its_checkpoint_is_refused() {
    let pg = Pg::start().await;
    pg.exec("CREATE TABLE ev (id int)").await;
    let dir = short_tempdir();
    load_and_stop(dir.path(), &pg, "{\"id\":1}\n{\"id\":2}\n").await;
    // The disk lost the last write (the file is cut back to its header).
    let segment = pgspool::wal::segment::list(&dir.path().join("wal"))
        .expect("list")
        .pop()
        .expect("a segment");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&segment.path)
        .and_then(|f| f.set_len(64))
        .expect("truncate");

    let (state, s) = status(&dir.path().join("wal"));
    assert_eq!(state, "corrupt", "{s:#}");
    // The daemon had stopped cleanly, so the log must reach where it ended then.
    let err = start_error(dir.path(), &pg).await;
    assert!(
        err.contains("ends at LSN 0, but it ended at LSN 2 when pgspool last stopped cleanly")
            && err.contains("pgspool quarantine --wal-dir"),
        "{err}"
    );
    // After a crash (no clean-stop record) the checkpoint still tells.
    std::fs::remove_file(dir.path().join("wal/clean-stop")).expect("remove");
    let err = start_error(dir.path(), &pg).await;
    assert!(
        err.contains("ends at LSN 0") && err.contains("up to LSN 2"),
        "{err}"
    );
    // Without any segment at all, the same.
    std::fs::remove_file(&segment.path).expect("remove");
    let err = start_error(dir.path(), &pg).await;
    assert!(
        err.contains("ends at LSN 0") && err.contains("up to LSN 2"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_names_pending_lsns_that_no_segment_holds() {
    let mut pg = Pg::start().await;
    let dir = short_tempdir();
    let wal = dir.path().join("wal");
    let segments = one_row_per_segment(dir.path(), &mut pg, 4).await;
    assert_eq!(status(&wal).0, "unreachable");

    std::fs::remove_file(&segments[1]).expect("remove a middle segment");
    let (state, s) = status(&wal);
    assert_eq!(state, "corrupt", "{s:#}");
    let problem = s["problems"][0].as_str().unwrap_or_default();
    assert!(problem.contains("LSNs 2 .. 2 are in no segment"), "{s:#}");
    std::fs::remove_file(&segments[0]).expect("remove the oldest segment");
    let (state, s) = status(&wal);
    assert_eq!(state, "corrupt", "{s:#}");
    let problem = s["problems"][0].as_str().unwrap_or_default();
    assert!(
        problem.contains("LSNs 1 .. 2 are pending but in no segment"),
        "{s:#}"
    );
    // quarantine passes over LSNs before the oldest segment too.
    let report = quarantine(&wal);
    assert!(
        report.contains("passed over: ") && report.contains("LSNs 1 ..= 2 (2 rows)"),
        "{report}"
    );
    let (state, s) = status(&wal);
    assert_eq!(
        (state.as_str(), &s["quarantined_rows"]),
        ("unreachable", &2.into()),
        "{s:#}"
    );
    pg.restart().await;
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    flushed(&daemon).await;
    daemon.stop().await.expect("stop");
    assert_eq!(
        pg.count("SELECT count(*) FROM ev WHERE id IN (2, 3)").await,
        2
    );
    assert_eq!(pg.count("SELECT count(*) FROM ev").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wal_older_than_the_database_stops_the_daemon_instead_of_reusing_lsns() {
    let mut pg = Pg::start().await;
    pg.exec("CREATE TABLE ev (id int)").await;
    let dir = short_tempdir();
    let wal = dir.path().join("wal");
    let backup = dir.path().join("backup");
    load_and_stop(dir.path(), &pg, "{\"id\":1}\n").await;
    copy_dir(&wal, &backup);
    load_and_stop(dir.path(), &pg, "{\"id\":2}\n{\"id\":3}\n").await;
    // The directory is restored from the old copy: PostgreSQL is at LSN 3, the WAL at 1.
    std::fs::remove_dir_all(&wal).expect("remove");
    std::fs::rename(&backup, &wal).expect("restore");

    // While PostgreSQL is down, new rows take LSNs 2..=4, past its watermark of 3.
    tokio::task::block_in_place(|| pg.stop(StopMode::Fast));
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let mut c = client(daemon.socket()).await;
    let reply = post_ndjson(&mut c, "ev", "{\"id\":4}\n{\"id\":5}\n").await;
    assert_eq!(reply.body["last_lsn"], 3, "{}", reply.body);
    let reply = post_ndjson(&mut c, "ev", "{\"id\":6}\n").await;
    assert_eq!(reply.body["last_lsn"], 4, "{}", reply.body);
    pg.restart().await;
    // The record of this WAL that ends at LSN 3 is not the one PostgreSQL committed: the
    // daemon stops, and a restart (as a supervisor would do) refuses to start, before it
    // accepts any write.
    let err = tokio::time::timeout(crate::harness::DEADLINE, daemon.wait())
        .await
        .expect("the daemon stops by itself")
        .expect_err("it stops on an error");
    assert_mismatch(&format!("{err:#}"));
    assert_mismatch(&start_error(dir.path(), &pg).await);
    assert!(!dir.path().join("s.sock").exists(), "the socket is removed");
    assert_eq!(
        pg.count("SELECT count(*) FROM ev").await,
        3,
        "nothing loaded under a reused LSN"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_flushing_copies_of_one_wal_load_each_row_once() {
    let mut pg = Pg::start().await;
    pg.exec("CREATE TABLE ev (id int)").await;
    tokio::task::block_in_place(|| pg.stop(StopMode::Fast));
    let (dir, twin) = (short_tempdir(), short_tempdir());
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let spool_id = daemon.spool_id();
    let mut c = client(daemon.socket()).await;
    for request in 0..10 {
        let body: String = (request * 20..request * 20 + 20)
            .map(|id| format!("{{\"id\":{id}}}\n"))
            .collect();
        assert_eq!(post_ndjson(&mut c, "ev", &body).await.status, 202);
    }
    daemon.stop().await.expect("stop");
    copy_dir(&dir.path().join("wal"), &twin.path().join("wal"));
    pg.restart().await;

    // Hold the watermark row, so that both flushers send their first batch (40 and 60
    // rows: whole records of 20) and then wait for it; released, both try to commit.
    pgspool::flush::transaction::bootstrap(&pg.client)
        .await
        .expect("bootstrap");
    pg.client
        .execute(
            "INSERT INTO pgspool.watermarks (spool_id, lsn) VALUES ($1, 0)",
            &[&spool_id],
        )
        .await
        .expect("insert the watermark");
    let mut holder = crate::harness::connect(&pg.url()).await;
    let hold = holder.transaction().await.expect("begin");
    hold.execute(
        "SELECT 1 FROM pgspool.watermarks WHERE spool_id = $1 FOR UPDATE",
        &[&spool_id],
    )
    .await
    .expect("lock the watermark");
    let mut first = config(dir.path(), &pg.url());
    first.batch.max_rows = 30;
    let mut second = config(twin.path(), &pg.url());
    second.batch.max_rows = 50;
    let (first, second) = tokio::join!(start_daemon(first), start_daemon(second));
    crate::harness::wait_until("both flushers wait for the watermark row", || async {
        let waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'";
        pg.count(waiting).await == 2
    })
    .await;
    hold.rollback().await.expect("release");
    tokio::join!(flushed(&first), flushed(&second));
    first.stop().await.expect("stop");
    second.stop().await.expect("stop");
    assert_eq!(pg.count("SELECT count(DISTINCT id) FROM ev").await, 200);
    assert_eq!(
        pg.count("SELECT count(*) FROM ev").await,
        200,
        "no row twice"
    );
}

fn assert_mismatch(err: &str) {
    assert!(err.contains("does not match the database"), "{err}");
    assert!(err.contains("not the one PostgreSQL committed"), "{err}");
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        if entry.file_type().expect("type").is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
        }
    }
}
