//! The WAL's limits: a full file system (a small tmpfs) and `[wal] max_bytes`. A write the
//! WAL cannot take is refused, counted and leaves nothing behind; nothing acknowledged is
//! evicted; writes are accepted again once the flusher frees space.

use std::path::Path;
use std::process::Command;

use pgspool::app::Daemon;
use pgspool::client::SpoolClient;
use pgspool::config::Config;
use pgspool::pgtemp::StopMode;

use crate::harness::{
    DEADLINE, Pg, client, config, flushed, post_ndjson, short_tempdir, start_daemon, status_json,
};
use crate::load::assert_exactly_once;

/// Sends rows of about 20 kB with ids from `next` on until one is refused; returns the
/// ids acknowledged and the refusal.
async fn fill(c: &mut SpoolClient, next: &mut i64) -> (Vec<i64>, pgspool::client::Reply) {
    let pad = "x".repeat(20_000);
    let mut acked = Vec::new();
    loop {
        let id = *next;
        *next += 1;
        let reply = post_ndjson(c, "ev", &format!("{{\"id\":{id},\"pad\":\"{pad}\"}}\n")).await;
        if reply.status != 202 {
            return (acked, reply);
        }
        acked.push(id);
        assert!(acked.len() < 1_000, "the WAL never filled up");
    }
}

/// Sends a row with the next id every 20 ms until one is accepted; returns its id.
async fn accepted_again(c: &mut SpoolClient, next: &mut i64) -> i64 {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let id = *next;
        *next += 1;
        let reply = post_ndjson(c, "ev", &format!("{{\"id\":{id},\"pad\":\"again\"}}\n")).await;
        if reply.status == 202 {
            return id;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "writes are still refused: {}",
            reply.body
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Once PostgreSQL is back: a write is accepted again, the backlog drains, and every
/// acknowledged row (`acked` and that one) is loaded once, and no other; stops the daemon.
async fn drained(pg: &Pg, daemon: Daemon, c: &mut SpoolClient, mut next: i64, mut acked: Vec<i64>) {
    acked.push(accepted_again(c, &mut next).await);
    flushed(&daemon).await;
    assert_exactly_once(pg, &acked).await;
    assert_eq!(
        pg.count("SELECT count(*) FROM ev").await,
        acked.len() as i64
    );
    daemon.stop().await.expect("stop");
}

/// The value of the `pgspool_writes_refused_total` series for `reason`.
pub async fn refused(c: &mut SpoolClient, reason: &str) -> u64 {
    let reply = c.get("/metrics").await.expect("GET /metrics");
    assert_eq!(reply.status, 200);
    let text = reply.body.as_str().expect("text").to_string();
    let series = format!("pgspool_writes_refused_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.parse().expect("a count"))
}

/// Small segments and requests, so that a small WAL holds several segments.
pub fn small(dir: &Path, pg: &Pg) -> Config {
    let mut cfg = config(dir, &pg.url());
    cfg.wal.segment_bytes = 64 << 10;
    cfg.ingest.max_body_bytes = 64 << 10;
    cfg
}

/// Unmounts the tmpfs when the test ends, however it ends.
struct Mount(std::path::PathBuf);

impl Mount {
    fn tmpfs(at: &Path, size: &str) -> Mount {
        std::fs::create_dir_all(at).expect("mkdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root (CI runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Mount(at.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_with_507_keeps_flushing_and_recovers() {
    let mut pg = Pg::start().await;
    pg.exec("CREATE TABLE ev (id bigint, pad text)").await;
    tokio::task::block_in_place(|| pg.stop(StopMode::Fast));
    let dir = short_tempdir();
    let wal = dir.path().join("wal");
    let _mount = Mount::tmpfs(&wal, "1m");
    let daemon = start_daemon(small(dir.path(), &pg)).await;
    let mut c = client(daemon.socket()).await;

    let mut next = 0;
    let (mut acked, refusal) = fill(&mut c, &mut next).await;
    assert_eq!(refusal.status, 507, "{}", refusal.body);
    let message = refusal.body["error"].as_str().unwrap_or_default();
    assert!(
        message.contains("No space left on device")
            && message.contains("nothing of this request was kept"),
        "{message}"
    );
    assert!(acked.len() > 10, "the tmpfs held only {} rows", acked.len());
    // Refused again while full, each time counted; the daemon stays up.
    let (more, again) = fill(&mut c, &mut next).await;
    assert_eq!((more.len(), again.status.as_u16()), (0, 507));
    assert_eq!(refused(&mut c, "disk_full").await, 2);
    assert_eq!(c.get("/healthz").await.expect("healthz").status, 200);
    // No partial record stays behind.
    let s = status_json(&wal);
    assert_eq!(
        (&s["intact"], &s["torn_tail_bytes"]),
        (&true.into(), &0.into()),
        "{s:#}"
    );
    assert_eq!(s["pending_rows"], acked.len(), "{s:#}");

    // A crash tears the last write while the disk is full (its last bytes overwritten in
    // place: there is no room to write more): the daemon still starts, without room for a
    // copy of the torn bytes. That request was never acknowledged, then.
    daemon.stop().await.expect("stop");
    std::fs::remove_file(wal.join("clean-stop")).expect("as after a crash");
    let mut segments = pgspool::wal::segment::list(&wal).expect("list");
    let size = |path: &Path| std::fs::metadata(path).expect("stat").len();
    // A new segment holding no record yet (the one after the failed write) goes first.
    while segments.last().is_some_and(|s| size(&s.path) == 64) {
        std::fs::remove_file(segments.pop().expect("segment").path).expect("remove");
    }
    let last = segments.pop().expect("a segment with records").path;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&last)
        .expect("open");
    let len = size(&last);
    std::os::unix::fs::FileExt::write_all_at(&file, &[0xAA; 8], len - 8).expect("tear");
    acked.pop();
    let daemon = start_daemon(small(dir.path(), &pg)).await;
    let mut c = client(daemon.socket()).await;

    // PostgreSQL comes back: the flusher loads the backlog and deletes its segments, and
    // writes are accepted again.
    pg.restart().await;
    drained(&pg, daemon, &mut c, next, acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_bytes_refuses_with_503_and_retry_after_and_evicts_nothing() {
    let mut pg = Pg::start().await;
    pg.exec("CREATE TABLE ev (id bigint, pad text)").await;
    tokio::task::block_in_place(|| pg.stop(StopMode::Fast));
    let dir = short_tempdir();
    let mut cfg = small(dir.path(), &pg);
    cfg.wal.max_bytes = 512 << 10;
    let daemon = start_daemon(cfg).await;
    let mut c = client(daemon.socket()).await;

    let mut next = 0;
    let (acked, refusal) = fill(&mut c, &mut next).await;
    assert_eq!(refusal.status, 503, "{}", refusal.body);
    assert_eq!(refusal.headers["retry-after"], "1");
    assert!(
        refusal.body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("[wal] max_bytes is 524288"),
        "{}",
        refusal.body
    );
    let s = status_json(&dir.path().join("wal"));
    let held = s["bytes"].as_u64().expect("bytes");
    assert!(held <= 512 << 10, "the WAL holds {held} bytes");
    assert_eq!(s["pending_rows"], acked.len(), "nothing was evicted: {s:#}");
    let (more, again) = fill(&mut c, &mut next).await;
    assert_eq!((more.len(), again.status.as_u16()), (0, 503));
    assert_eq!(refused(&mut c, "backlog_full").await, 2);

    pg.restart().await;
    drained(&pg, daemon, &mut c, next, acked).await;
}
