//! Crash at any instant: cycle after cycle, concurrent clients load rows while the daemon
//! is SIGKILLed at a random moment (some kills aimed at segment creation, rotation and
//! deletion, some during start-up), and PostgreSQL is now and then stopped in immediate
//! mode too. The daemon is restarted on the same WAL directory each time and must start by
//! itself. At the end every acknowledged row is in PostgreSQL exactly once, rows of
//! unanswered requests at most once, and nothing twice.
//!
//! The RNG seed is printed; `TORTURE_SEED=<seed>` replays the same delays, request sizes
//! and kill aims (the daemon's own timing still varies), and `TORTURE_CYCLES=<n>` runs
//! longer.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pgspool::pgtemp::StopMode;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::harness::{DaemonProcess, Pg, short_tempdir, status_json};
use crate::load::{EVENTS, Load, Shape, flush_through_marker, start_load, tally};

const CLIENTS: i64 = 8;
const DEFAULT_CYCLES: u32 = 50;
/// Every this many cycles PostgreSQL is stopped (immediate mode) during the load too.
const POSTGRES_EVERY: u32 = 5;

/// Tiny segments and batches: segments are created and deleted many times a second, so
/// kills land during rotation and deletion as often as during appends.
const CONFIG: &str = r#"
[wal]
segment_bytes = 65536

[batch]
max_rows = 400
max_bytes = 32768
max_wait = "5ms"

[postgres]
retry_initial = "10ms"
retry_max = "200ms"
"#;

/// For the drain after the last cycle: the same WAL, the default batch limits, so the
/// backlog the cycles left is loaded in large transactions.
const DRAIN_CONFIG: &str = r#"
[wal]
segment_bytes = 65536

[postgres]
retry_initial = "10ms"
retry_max = "200ms"
"#;

/// When the SIGKILL is sent.
#[derive(Debug, Clone, Copy)]
enum Aim {
    /// After a random delay.
    Delay,
    /// As soon as a segment is being created (a `.wal.tmp` exists), or at the end of the
    /// budget.
    SegmentCreation,
    /// As soon as the number of segments changes (rotation or deletion), or at the end of
    /// the budget.
    SegmentCountChange,
}

/// Where the kills landed, as far as can be seen from outside.
#[derive(Debug, Default)]
struct Landings {
    during_start: u32,
    on_wal_tmp_seen: u32,
    on_segment_change_seen: u32,
    wal_tmp_left: u32,
}

fn seed() -> u64 {
    std::env::var("TORTURE_SEED")
        .ok()
        .map(|s| s.parse().expect("TORTURE_SEED is a number"))
        .unwrap_or_else(pgspool::fsutil::now_us)
}

fn segment_count(wal: &Path) -> Option<usize> {
    pgspool::wal::segment::list(wal).ok().map(|s| s.len())
}

fn wal_tmp_exists(wal: &Path) -> bool {
    std::fs::read_dir(wal).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".wal.tmp"))
    })
}

/// Sends SIGKILL to `pid` when `aim` is seen in `wal`, or once `budget` has passed; returns
/// whether the aim was seen. Runs on a blocking thread, polling every 50 µs, so the kill
/// follows what it saw closely.
fn kill_when(pid: u32, wal: &Path, aim: Aim, budget: Duration) -> bool {
    let deadline = Instant::now() + budget;
    let segments_at_start = segment_count(wal);
    let seen = loop {
        let seen = match aim {
            Aim::Delay => false,
            Aim::SegmentCreation => wal_tmp_exists(wal),
            Aim::SegmentCountChange => {
                segment_count(wal).is_some_and(|n| Some(n) != segments_at_start)
            }
        };
        let now = Instant::now();
        if seen || now >= deadline {
            break seen;
        }
        std::thread::sleep(match aim {
            Aim::Delay => deadline - now,
            _ => Duration::from_micros(50),
        });
    };
    // The child is not reaped until the caller waits for it, so the pid is still its.
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("SIGKILL");
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_instants_loses_and_duplicates_nothing() {
    let seed = seed();
    eprintln!("torture: seed {seed} (replay with TORTURE_SEED={seed})");
    let cycles: u32 = std::env::var("TORTURE_CYCLES").map_or(DEFAULT_CYCLES, |s| {
        s.parse().expect("TORTURE_CYCLES is a number")
    });
    let mut rng = StdRng::seed_from_u64(seed);

    let mut pg = Pg::start().await;
    pg.exec(EVENTS).await;
    let dir = short_tempdir();
    let wal = dir.path().join("wal");
    let config_file = dir.path().join("pgspool.toml");
    std::fs::write(&config_file, CONFIG).expect("config");
    let args = ["--config", config_file.to_str().expect("utf-8")];
    let url = pg.url();

    let load = Arc::new(Load::default());
    let mut landings = Landings::default();
    let mut postgres_down = false;
    let started = Instant::now();
    for cycle in 0..cycles {
        if cycle > 0 && rng.random_ratio(1, 6) {
            // Killed during start-up: while recovering the previous kill's tail, removing
            // its temporary files, creating a segment.
            let mut early = DaemonProcess::start(&[], dir.path(), &url, &args);
            tokio::time::sleep(Duration::from_micros(rng.random_range(0..20_000))).await;
            early.kill();
            landings.during_start += 1;
        }
        // Starts by itself after any kill, PostgreSQL up or down; panics with the log if not.
        let mut daemon = DaemonProcess::spawn(dir.path(), &url, &args).await;
        let shape = Shape::Varied {
            seed: rng.random(),
            max_rows: 40,
            max_payload: 200,
        };
        let clients = start_load(&daemon.socket, CLIENTS, &load, shape);
        if postgres_down {
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
            pg.restart().await;
            postgres_down = false;
        }
        if cycle % POSTGRES_EVERY == POSTGRES_EVERY - 1 {
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
            tokio::task::block_in_place(|| pg.stop(StopMode::Immediate));
            postgres_down = true;
        }
        let aim = match rng.random_range(0..3) {
            0 => Aim::Delay,
            1 => Aim::SegmentCreation,
            _ => Aim::SegmentCountChange,
        };
        let budget = Duration::from_millis(rng.random_range(0..800));
        let (pid, wal_dir) = (daemon.pid(), wal.clone());
        let seen = tokio::task::spawn_blocking(move || kill_when(pid, &wal_dir, aim, budget))
            .await
            .expect("kill");
        daemon.kill(); // reaps it
        match aim {
            Aim::SegmentCreation if seen => landings.on_wal_tmp_seen += 1,
            Aim::SegmentCountChange if seen => landings.on_segment_change_seen += 1,
            _ => {}
        }
        if wal_tmp_exists(&wal) {
            landings.wal_tmp_left += 1;
        }
        for c in clients {
            c.await.expect("client");
        }
    }
    let cycles_took = started.elapsed();
    let drain_started = Instant::now();
    if postgres_down {
        pg.restart().await;
    }

    // Drain: a last start, and every row before the marker is committed once it is.
    std::fs::write(&config_file, DRAIN_CONFIG).expect("config");
    let mut daemon = DaemonProcess::spawn(dir.path(), &url, &args).await;
    flush_through_marker(&pg, &daemon.socket).await;
    let t = tally(&pg, &load).await;
    // After all that, a clean stop, and a log that `status` finds intact with nothing
    // pending.
    let stopped = daemon.terminate().await;
    assert!(stopped.success(), "{stopped}: {}", daemon.log_tail());
    let status = status_json(&wal);
    assert_eq!(status["intact"], true, "{status:#}");
    assert_eq!(status["pending_rows"], 0, "{status:#}");
    let log = daemon.log_text();
    let torn_cut = log.matches("cut a torn write").count();
    let tmp_removed = log
        .lines()
        .filter(|l| l.contains("left by an interrupted write") && l.contains(".wal.tmp"))
        .count();
    eprintln!(
        "torture: {cycles} cycles, {CLIENTS} clients, {} requests acked ({} rows acked), {} rows \
         found in PostgreSQL, {} lost, {} duplicated, {} unacked rows present, seed {seed}",
        load.acked_requests.load(Ordering::SeqCst),
        t.acked_rows,
        t.found_rows,
        t.lost,
        t.duplicated,
        t.unacked_present,
    );
    eprintln!(
        "torture: kills: {} during start-up, {} on a .wal.tmp seen, {} on a segment count \
         change seen, {} left a .wal.tmp; restarts: {torn_cut} cut a torn write, {tmp_removed} \
         removed a .wal.tmp; {} unanswered rows; cycles took {cycles_took:.1?}, the drain \
         {:.1?}",
        landings.during_start,
        landings.on_wal_tmp_seen,
        landings.on_segment_change_seen,
        landings.wal_tmp_left,
        load.unanswered.lock().expect("lock").len(),
        drain_started.elapsed(),
    );
    let refusals = load.refusals.lock().expect("lock").clone();
    assert!(refusals.is_empty(), "writes refused: {refusals:?}");
    assert!(t.acked_rows > 0, "no request was acknowledged");
    assert_eq!(t.lost, 0, "acknowledged rows lost: {t:?}");
    assert_eq!(t.duplicated, 0, "rows loaded twice: {t:?}");
    assert_eq!(t.unknown, 0, "rows no request sent: {t:?}");
}
