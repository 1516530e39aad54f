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
//! (it takes no lock) in a blocking thread; a count is reused while it is younger than
//! 100 ms or 10 times as long as it took, so that a large backlog cannot make clients
//! polling the status keep a core busy reading the WAL (a tenth of one at most).

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
use crate::wal::{WalDir, WalError};

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

    /// Publishes the flusher's report.
    pub fn report(&self, report: &FlushReport) {
        self.tx.send_modify(|v| v.report.clone_from(report));
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

/// One sample: the durable LSN and the rows settled so far.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    durable: u64,
    flushed: u64,
}

/// The last WAL count.
#[derive(Debug)]
struct Count {
    at: Instant,
    took: Duration,
    counted_at_us: u64,
    wal: WalStatus,
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
    /// Held while counting, so that concurrent requests share one count.
    count: tokio::sync::Mutex<Option<Count>>,
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
            count: tokio::sync::Mutex::new(None),
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

    /// The live report; `ready` tells whether writes are accepted.
    ///
    /// # Errors
    /// When the WAL directory cannot be read.
    pub async fn report(&self, ready: bool) -> Result<Report, WalError> {
        let (mut wal, counted_at_us) = self.count().await?;
        let view = self.flusher.borrow().clone();
        for (table, rows) in view.flushed_rows {
            wal.tables.entry(table).or_default().flushed_rows = Some(rows);
        }
        for table in wal.tables.values_mut() {
            table.flushed_rows.get_or_insert(0);
        }
        wal.flusher = Some(view.report);
        wal.wal_dir.clone_from(&self.wal_path);
        let now = self.sample();
        let live = Live {
            uptime_seconds: Some(self.started.elapsed().as_secs_f64()),
            ready: Some(ready),
            durable_lsn: Some(Lsn(now.durable)),
            postgres: Some(view.postgres),
            rates: Some(self.rates(now)),
            backlog_age_limit_seconds: Some(self.backlog_age_limit().as_secs_f64()),
        };
        Ok(Report::live(wal, counted_at_us, live))
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

    /// The WAL directory's state and when it was counted: the last count while it is
    /// younger than [`REUSE_AT_LEAST`] or 10 times as long as it took (its oldest pending
    /// row aged since), else a new one.
    async fn count(&self) -> Result<(WalStatus, u64), WalError> {
        let mut last = self.count.lock().await;
        if let Some(count) = &*last
            && count.at.elapsed() < (count.took * 10).max(REUSE_AT_LEAST)
        {
            let mut wal = count.wal.clone();
            if let Some(age) = &mut wal.oldest_pending_age_seconds {
                *age += count.at.elapsed().as_secs_f64();
            }
            return Ok((wal, count.counted_at_us));
        }
        let dir = self.wal.path().to_path_buf();
        let (at, counted_at_us) = (Instant::now(), fsutil::now_us());
        let wal = tokio::task::spawn_blocking(move || status::inspect(&dir, &mut |_| {}))
            .await
            .expect("counting the WAL does not panic")?;
        *last = Some(Count {
            at,
            took: at.elapsed(),
            counted_at_us,
            wal: wal.clone(),
        });
        Ok((wal, counted_at_us))
    }
}
