//! The daemon's live state, which `GET /v1/status` reports (see [`crate::status`] for the
//! report, its verdict and its keys).
//!
//! Nothing here blocks the writer or the flusher. The writer's durable LSN comes through
//! its watch channel; the flusher publishes what it knows ([`FlusherView`]: its report,
//! PostgreSQL's state, the rows it settled per table) through another, with
//! [`FlusherStatus`]. A sampler task records every second the durable LSN and the rows
//! settled so far, keeping a minute of samples: every row takes one LSN, so the ingest
//! rate is the durable LSN's advance per second, and the flush rate the settled rows'.
//! Pending rows per table are counted by [`crate::status::inspect()`] on the WAL directory
//! (it takes no lock) in a blocking thread, one count at a time; a count is reused while
//! it is younger than 100 ms or 10 times as long as it took, so that a large backlog
//! cannot make clients polling the status keep a core busy reading the WAL (a tenth of one
//! at most). A request waits at most a second for a count: on a large backlog it is
//! answered with the last count, its total pending rows and oldest pending age brought up
//! to date, or, before the first count ends, with what needs no scan.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::Config;
use crate::flush::report::FlushReport;
use crate::fsutil;
use crate::lsn::Lsn;
use crate::status::{self, Connection, Live, PostgresState, Rates, Report, WalStatus, Window};
use crate::wal::{self, WalDir, WalError};

/// What the flusher publishes.
#[derive(Debug, Clone, Default)]
pub struct FlusherView {
    /// Its report as it is now (see [`crate::flush::report`]).
    pub report: FlushReport,
    /// PostgreSQL as it sees it.
    pub postgres: PostgresState,
    /// Rows settled (loaded, or put into dead letters) since the start, per table as its
    /// records name it.
    pub flushed_rows: BTreeMap<String, u64>,
}

/// The flusher's side: publishes its [`FlusherView`].
#[derive(Debug)]
pub struct FlusherStatus {
    tx: watch::Sender<FlusherView>,
}

impl FlusherStatus {
    /// A publisher, and the receiver to give [`Monitor::start`].
    #[must_use]
    pub fn new() -> (FlusherStatus, watch::Receiver<FlusherView>) {
        let (tx, rx) = watch::channel(FlusherView {
            postgres: PostgresState {
                since_us: fsutil::now_us(),
                ..PostgresState::default()
            },
            ..FlusherView::default()
        });
        (FlusherStatus { tx }, rx)
    }

    /// Publishes the flusher's report, dated now.
    pub fn report(&self, report: &FlushReport) {
        self.tx.send_modify(|v| {
            v.report.clone_from(report);
            v.report.updated_at_us = fsutil::now_us();
        });
    }

    /// A session with PostgreSQL started.
    pub fn connected(&self) {
        self.tx.send_modify(|v| {
            if v.postgres.state != Connection::Connected {
                v.postgres = PostgresState {
                    state: Connection::Connected,
                    since_us: fsutil::now_us(),
                    error: None,
                };
            }
        });
    }

    /// A session with PostgreSQL failed because `error`.
    pub fn failed(&self, error: &str) {
        self.tx.send_modify(|v| {
            if v.postgres.state != Connection::Down {
                v.postgres.state = Connection::Down;
                v.postgres.since_us = fsutil::now_us();
            }
            v.postgres.error = Some(error.to_string());
        });
    }

    /// A commit settled `rows` per table.
    pub fn settled(&self, rows: &BTreeMap<String, u64>) {
        if rows.is_empty() {
            return;
        }
        self.tx.send_modify(|v| {
            for (table, n) in rows {
                *v.flushed_rows.entry(table.clone()).or_default() += n;
            }
        });
    }
}

/// How often the sampler records the durable LSN and the rows settled.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// The longest window a rate is computed over.
const LONG_WINDOW: Duration = Duration::from_secs(60);

/// The shortest.
const SHORT_WINDOW: Duration = Duration::from_secs(10);

/// How late a sample may be and still count as a window's start.
const SLACK: Duration = Duration::from_millis(500);

/// How long a WAL count is reused at least: 10 times as long as it took bounds the time
/// spent counting to a tenth; this bounds how often a small WAL is read.
const REUSE_AT_LEAST: Duration = Duration::from_millis(100);

/// How long a status request waits for a count in progress before it answers with the
/// last one (or without one).
const COUNT_WAIT: Duration = Duration::from_secs(1);

/// One sample: the durable LSN and the rows settled so far.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    durable: u64,
    flushed: u64,
}

/// A finished WAL count.
#[derive(Debug)]
struct Count {
    /// When it ended.
    at: Instant,
    took: Duration,
    /// When it ended, in µs since the Unix epoch.
    counted_at_us: u64,
    /// Rows settled (see [`FlusherView::flushed_rows`]) just before it started.
    settled: u64,
    /// When the oldest pending row was written, in µs since the Unix epoch.
    oldest_pending_us: Option<u64>,
    wal: WalStatus,
}

/// The counts of the WAL directory: the last finished, and whether one runs.
#[derive(Debug, Default)]
struct Counts {
    last: Option<Arc<Count>>,
    /// A count runs in a blocking thread.
    running: bool,
    /// Why the last count failed, until a request reports it.
    failed: Option<WalError>,
}

/// The request handlers' side: builds the live report.
#[derive(Debug)]
pub struct Monitor {
    started: Instant,
    wal: Arc<WalDir>,
    /// The WAL directory's absolute path, which the report gives (clients compare it with
    /// the directory they were told to look at).
    wal_path: PathBuf,
    durable: watch::Receiver<Lsn>,
    flusher: watch::Receiver<FlusherView>,
    /// The configuration, changed live by a reload: `[batch] max_wait` sets the backlog age
    /// limit.
    config: watch::Receiver<Config>,
    /// Oldest first, a minute and a little more.
    samples: Mutex<VecDeque<Sample>>,
    /// The last count, and whether one runs (one at a time: concurrent requests share it).
    counts: Arc<Mutex<Counts>>,
    /// Bumped each time a count ends.
    counted: watch::Sender<u64>,
}

impl Monitor {
    /// A monitor of the WAL in `wal` whose writer publishes `durable` and whose flusher
    /// publishes `flusher`; the backlog age limit is 10 times `[batch] max_wait` of
    /// `config`, at least 2 s. Starts the sampler, which ends once the monitor is dropped.
    #[must_use]
    pub fn start(
        wal: Arc<WalDir>,
        durable: watch::Receiver<Lsn>,
        flusher: watch::Receiver<FlusherView>,
        config: watch::Receiver<Config>,
    ) -> Arc<Monitor> {
        let wal_path = std::path::absolute(wal.path()).unwrap_or_else(|_| wal.path().into());
        let monitor = Arc::new(Monitor {
            started: Instant::now(),
            wal,
            wal_path,
            durable,
            flusher,
            config,
            samples: Mutex::new(VecDeque::new()),
            counts: Arc::new(Mutex::new(Counts::default())),
            counted: watch::channel(0).0,
        });
        let weak = Arc::downgrade(&monitor);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(monitor) = weak.upgrade() else {
                    return;
                };
                let now = monitor.sample();
                let mut samples = monitor.samples.lock().expect("lock poisoned");
                samples.push_back(now);
                while samples
                    .front()
                    .is_some_and(|s| now.at - s.at > LONG_WINDOW + SLACK * 2)
                {
                    samples.pop_front();
                }
            }
        });
        monitor
    }

    /// How old the oldest pending row may be before a growing backlog is reported.
    fn backlog_age_limit(&self) -> Duration {
        (self.config.borrow().batch.max_wait * 10).max(Duration::from_secs(2))
    }

    /// The live report; `ready` tells whether writes are accepted. It waits at most
    /// about a second for a count of the WAL directory (see the module docs).
    ///
    /// # Errors
    /// When the WAL directory cannot be read.
    pub async fn report(&self, ready: bool) -> Result<Report, WalError> {
        let count = self.count().await?;
        let view = self.flusher.borrow().clone();
        let now = self.sample();
        let mut wal = match &count {
            Some(count) => {
                let mut wal = count.corrected(now);
                // The positions as the last commit left them, not as counted.
                if let Ok(Some(positions)) = crate::wal::read_checkpoint_whole(self.wal.path()) {
                    wal.flushed_lsn = positions.flushed_lsn;
                    wal.watermark_lsn = positions.watermark_lsn();
                }
                wal
            }
            None => self.uncounted(now)?,
        };
        for (table, rows) in view.flushed_rows {
            wal.tables.entry(table).or_default().flushed_rows = Some(rows);
        }
        for table in wal.tables.values_mut() {
            table.flushed_rows.get_or_insert(0);
            if count.is_some() {
                // Counted, and none pending.
                table.pending_rows.get_or_insert(0);
                table.pending_bytes.get_or_insert(0);
            }
        }
        // The flusher's report, once it has published one.
        wal.flusher = (view.report.updated_at_us != 0).then_some(view.report);
        wal.wal_dir.clone_from(&self.wal_path);
        let live = Live {
            uptime_seconds: Some(self.started.elapsed().as_secs_f64()),
            ready: Some(ready),
            durable_lsn: Some(Lsn(now.durable)),
            postgres: Some(view.postgres),
            rates: Some(self.rates(now)),
            backlog_age_limit_seconds: Some(self.backlog_age_limit().as_secs_f64()),
        };
        Ok(Report::live(wal, count.map(|c| c.counted_at_us), live))
    }

    /// What needs no scan of the WAL directory, at `now`: segments and bytes, the
    /// checkpoint's LSNs, and the rows pending as the LSNs between the watermark and the
    /// durable LSN (every row takes one LSN; a held table's rows at or below the watermark
    /// are not among them). Per table, nothing is known.
    ///
    /// # Errors
    /// When the WAL directory cannot be listed.
    fn uncounted(&self, now: Sample) -> Result<WalStatus, WalError> {
        let dir = self.wal.path();
        let first = wal::segment::list(dir)
            .map_err(WalError::io(format!("list {}", dir.display())))?
            .first()
            .map_or(Lsn::ZERO, |s| s.first_lsn);
        let (mut status, positions) = WalStatus::from_checkpoint(dir, self.wal.spool_id());
        status.segments = usize::try_from(self.wal.segments()).unwrap_or(usize::MAX);
        status.bytes = self.wal.bytes();
        status.first_lsn = first;
        status.last_lsn = Lsn(now.durable);
        status.pending_rows = now.durable.saturating_sub(positions.watermark_lsn().0);
        Ok(status)
    }

    /// The durable LSN and the rows settled, now.
    fn sample(&self) -> Sample {
        Sample {
            at: Instant::now(),
            durable: self.durable.borrow().0,
            flushed: self.flusher.borrow().flushed_rows.values().sum(),
        }
    }

    /// The rates from the samples up to `now`.
    fn rates(&self, now: Sample) -> Rates {
        let samples = self.samples.lock().expect("lock poisoned");
        let window = |over: Duration, value: fn(&Sample) -> u64| {
            // The oldest sample within the window (the start, for a daemon younger).
            let base = samples
                .iter()
                .find(|s| now.at - s.at <= over + SLACK)
                .copied()
                .unwrap_or(now);
            let seconds = (now.at - base.at).as_secs_f64();
            if seconds <= 0.0 {
                0.0
            } else {
                value(&now).saturating_sub(value(&base)) as f64 / seconds
            }
        };
        let both = |value: fn(&Sample) -> u64| Window {
            last_10s: window(SHORT_WINDOW, value),
            last_1m: window(LONG_WINDOW, value),
        };
        Rates {
            ingest_rows_per_s: both(|s| s.durable),
            flush_rows_per_s: both(|s| s.flushed),
        }
    }

    /// The last count of the WAL directory, `None` before the first ends. A count younger
    /// than [`REUSE_AT_LEAST`] or 10 times as long as it took is reused; else a new one is
    /// started in a blocking thread (unless one runs: one at a time) and awaited for at
    /// most [`COUNT_WAIT`], after which the last one is given. A count in progress keeps
    /// nothing from stopping: it is detached, and its result kept for the next request.
    ///
    /// # Errors
    /// When the last count failed (reported once).
    async fn count(&self) -> Result<Option<Arc<Count>>, WalError> {
        // Subscribed first, so that a count that ends from now on is seen.
        let mut ended = self.counted.subscribe();
        {
            let mut counts = self.counts.lock().expect("lock poisoned");
            if let Some(e) = counts.failed.take() {
                return Err(e);
            }
            if let Some(last) = &counts.last
                && last.at.elapsed() < (last.took * 10).max(REUSE_AT_LEAST)
            {
                return Ok(Some(Arc::clone(last)));
            }
            if !counts.running {
                counts.running = true;
                self.start_count();
            }
        }
        let _ = tokio::time::timeout(COUNT_WAIT, ended.changed()).await;
        let mut counts = self.counts.lock().expect("lock poisoned");
        match counts.failed.take() {
            Some(e) => Err(e),
            None => Ok(counts.last.clone()),
        }
    }

    /// Counts the WAL directory in a blocking thread; the count ends in `self.counts`.
    fn start_count(&self) {
        let dir = self.wal.path().to_path_buf();
        let counts = Arc::clone(&self.counts);
        let counted = self.counted.clone();
        let settled = self.sample().flushed;
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let result = status::inspect(&dir, &mut |_| {});
            let ended_us = fsutil::now_us();
            let mut counts = counts.lock().expect("lock poisoned");
            counts.running = false;
            match result {
                Ok(wal) => {
                    counts.last = Some(Arc::new(Count {
                        at: Instant::now(),
                        took: started.elapsed(),
                        counted_at_us: ended_us,
                        settled,
                        oldest_pending_us: wal
                            .oldest_pending_age_seconds
                            .map(|age| ended_us.saturating_sub((age * 1e6) as u64)),
                        wal,
                    }));
                }
                Err(e) => counts.failed = Some(e),
            }
            drop(counts);
            counted.send_modify(|n| *n += 1);
        });
    }
}

impl Count {
    /// The count brought to `now` where that is cheap: the rows pending are those counted,
    /// plus the rows made durable after the last one counted, minus the rows settled since
    /// the count started; the oldest pending row's age is measured now. Per table, it is
    /// as counted.
    fn corrected(&self, now: Sample) -> WalStatus {
        let mut wal = self.wal.clone();
        let arrived = now.durable.saturating_sub(wal.last_lsn.0);
        let settled = now.flushed.saturating_sub(self.settled);
        wal.pending_rows = (wal.pending_rows + arrived).saturating_sub(settled);
        wal.last_lsn = wal.last_lsn.max(Lsn(now.durable));
        wal.oldest_pending_age_seconds = match (wal.pending_rows, self.oldest_pending_us) {
            (0, _) | (_, None) => None,
            (_, Some(at)) => Some(fsutil::now_us().saturating_sub(at) as f64 / 1e6),
        };
        wal
    }
}
