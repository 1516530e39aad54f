//! The flusher: reads the WAL from the watermark and loads it into PostgreSQL.
//!
//! Each session connects, creates pgspool's own tables if missing, reads this spool's
//! watermark and held tables back from PostgreSQL, opens a WAL reader just past the
//! watermark, and then repeatedly fills a [`Batch`] and commits it with
//! [`transaction::commit`], which puts the rows PostgreSQL refuses into dead letters
//! ([`load`]) and holds the tables that take no rows. Between batches, held tables whose
//! retry is due catch up (`held.rs`). After each commit the flush report, the local
//! checkpoint and the metrics are updated, then segments below every position still
//! needed are deleted.
//!
//! A transient failure ends the session: the flusher waits (capped exponential backoff
//! with jitter) and starts a new one, which reads the watermark again, so a batch whose
//! COMMIT outcome was lost is neither lost nor sent twice. Replay after a crash is the
//! same path.
//! Only damage to the WAL, or a watermark the WAL cannot match, stops the flusher. Damage
//! is recorded in the WAL directory (see [`crate::wal::damage`]) so that the daemon keeps
//! refusing to start until an operator runs `pgspool quarantine` or restores the directory.

pub mod batch;
pub mod classify;
mod held;
pub mod load;
pub mod prepare;
pub mod report;
pub mod transaction;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::acks::{Acks, DeadLetterAck, HeldTable};
use crate::config::{BatchConfig, Config, PostgresConfig};
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::schema::SchemaCache;
use crate::wal::{Checkpoint, WalDir, WalError, WalReader};
pub use batch::Batch;
use batch::FillError;
use held::HeldState;
use load::{DeadLetter, Refusal};
use report::{FlushReport, TableError};
use transaction::{Advance, FlushFailure, Settled, Watermark};

/// Errors that stop the flusher (and the daemon): acknowledged data cannot be delivered
/// without an operator.
#[derive(Debug, thiserror::Error)]
pub enum FatalError {
    /// The WAL is damaged or does not hold the rows PostgreSQL's watermark points to.
    #[error(transparent)]
    Wal(#[from] WalError),
    /// A record's payload cannot be decoded.
    #[error("WAL record is not a row group: {0}")]
    Malformed(String),
    /// The WAL does not hold, at PostgreSQL's watermark, the record PostgreSQL committed.
    #[error(
        "PostgreSQL's watermark for spool {spool_id} is LSN {watermark}, but {detail}: this \
         WAL directory does not match the database (restored from an older copy, copied from \
         another host, or records lost from its end). Rows acknowledged since would be skipped \
         or loaded under the wrong LSNs, so pgspool stops; they stay in the WAL. Move the \
         directory aside to start a new spool, and send again the rows it acknowledged that \
         PostgreSQL lacks: they start where this WAL and the database part ways, at or \
         before LSN {watermark}, not after it"
    )]
    WalMismatch {
        /// The spool.
        spool_id: uuid::Uuid,
        /// The watermark in PostgreSQL.
        watermark: Lsn,
        /// What the WAL holds there.
        detail: String,
    },
}

/// Why a session ended.
enum SessionEnd {
    /// Shutdown was asked for and nothing is left to flush.
    Stopped,
    /// PostgreSQL failed; try again after a pause.
    Retry(String),
}

/// The flusher and what it needs.
#[derive(Debug)]
pub struct Flusher {
    /// How to connect.
    pub pg: crate::pg::Target,
    /// Retry pacing.
    pub postgres: PostgresConfig,
    /// The WAL directory.
    pub wal: Arc<WalDir>,
    /// The writer's durable LSN.
    pub durable: watch::Receiver<Lsn>,
    /// Where the committed watermark is published.
    pub committed: watch::Sender<Lsn>,
    /// The configuration, changed live by a reload: the flusher follows its `[batch]`
    /// limits.
    pub config: watch::Receiver<Config>,
    /// Table schemas, for rows kept as JSON.
    pub schemas: Arc<SchemaCache>,
    /// Signalled once the first session has checked the WAL against PostgreSQL's
    /// watermark, or found PostgreSQL unreachable; dropped unsent on a fatal error.
    pub checked: Option<oneshot::Sender<()>>,
    /// Requests waiting for their rows to be committed.
    pub acks: Arc<Acks>,
    /// The daemon's metrics.
    pub metrics: Arc<Metrics>,
    /// Where `GET /v1/status` learns what the flusher knows.
    pub live: crate::live::FlusherStatus,
    /// What the flusher learns as it runs; [`FlushState::default`] to start.
    pub state: FlushState,
    /// Where the flusher shows it goes round its loop, for the systemd watchdog.
    pub progress: Progress,
}

/// When the flusher last showed progress: it went round its loop, or it waits (for rows,
/// for a batch to be due, before a retry) and is not stuck. The systemd watchdog pings
/// only while this is recent (see [`crate::systemd::Watchdog`]). A COPY or COMMIT under
/// way shows nothing until it returns. Clones share the clock.
#[derive(Debug, Clone)]
pub struct Progress {
    origin: Instant,
    /// Milliseconds from `origin` to the last sign of progress.
    last_ms: Arc<AtomicU64>,
}

/// How often a waiting flusher shows progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

impl Default for Progress {
    fn default() -> Self {
        Progress {
            origin: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Progress {
    /// Records progress now.
    pub fn tick(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// How long ago the flusher last showed progress.
    #[must_use]
    pub fn since(&self) -> Duration {
        self.origin
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }

    /// Awaits `wait`, showing progress meanwhile: for waits that are the flusher's normal
    /// idle (not for work that could hang).
    async fn waiting<F: Future>(&self, wait: F) -> F::Output {
        let mut wait = std::pin::pin!(wait);
        let mut every = tokio::time::interval(PROGRESS_EVERY);
        loop {
            tokio::select! {
                out = &mut wait => {
                    self.tick();
                    return out;
                }
                _ = every.tick() => self.tick(),
            }
        }
    }
}

/// What the flusher learns as it runs.
#[derive(Debug, Default)]
pub struct FlushState {
    /// Held tables, by name as their records give it.
    held: BTreeMap<String, HeldState>,
    /// Halvings of the batch limits after statement timeouts or slow isolation (see
    /// [`Flusher::limits`]).
    shrink: u32,
    /// Commits since the last halving.
    successes: u32,
    /// What `pgspool status` shows of the flusher.
    report: FlushReport,
    /// What the last batch taught the next.
    hints: load::Hints,
    /// The table whose rows failed with a transient error at the watermark, and how many
    /// times in a row.
    repeats: Option<(Lsn, String, u32)>,
    /// Tables to hold with the next batch (see [`Flusher::note_repeat`]).
    hold_next: Vec<(String, Refusal)>,
}

/// Successful commits after which a batch limit halved by a statement timeout is doubled
/// again.
const COMMITS_BEFORE_GROWING: u32 = 8;

/// Attempts of one batch above which the next batches are made smaller (see
/// [`load`]).
const ATTEMPTS_BEFORE_SHRINKING: u32 = 2;

impl Flusher {
    /// Runs until `shutdown` is cancelled and the WAL is flushed up to the durable LSN as
    /// it was then (callers bound this with a drain timeout), or until a fatal error.
    ///
    /// # Errors
    /// [`FatalError`].
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), FatalError> {
        // What the last run reported stays until this one knows better.
        self.state.report = FlushReport::read(self.wal.path()).unwrap_or_default();
        self.live.report(&self.state.report);
        let result = self.flush(&shutdown).await;
        if let Err(FatalError::Wal(WalError::Corrupt { damage })) = &result
            && let Err(e) = crate::wal::damage::record(self.wal.path(), damage)
        {
            warn!(error = %e, "could not record the damage in the WAL directory");
        }
        result
    }

    async fn flush(&mut self, shutdown: &CancellationToken) -> Result<(), FatalError> {
        let mut delay = self.postgres.retry_initial;
        loop {
            match self.session(shutdown, &mut delay).await? {
                SessionEnd::Stopped => return Ok(()),
                SessionEnd::Retry(why) => {
                    self.checked();
                    self.metrics.postgres_up(false);
                    self.metrics.flush_retry();
                    self.live.failed(&why);
                    self.report(|r| r.postgres_error = Some(why.clone())).await;
                    let wait = jitter(delay);
                    warn!(error = %why, retry_in = ?wait, "flush failed; the rows stay in the WAL");
                    delay = (delay * 2).min(self.postgres.retry_max);
                    let paused = self.progress.waiting(async {
                        tokio::select! {
                            () = tokio::time::sleep(wait) => true,
                            () = shutdown.cancelled() => false,
                        }
                    });
                    if !paused.await {
                        info!(
                            "stopping with rows left in the WAL; they are sent after the next start"
                        );
                        return Ok(());
                    }
                }
            }
        }
    }

    async fn session(
        &mut self,
        shutdown: &CancellationToken,
        delay: &mut Duration,
    ) -> Result<SessionEnd, FatalError> {
        let retry = |e: &dyn std::fmt::Display| Ok(SessionEnd::Retry(e.to_string()));
        // Bounded by connect_timeout: a normal wait, not a hang.
        let mut client = match self.progress.waiting(crate::pg::connect(&self.pg)).await {
            Ok(client) => client,
            Err(e) => {
                return retry(&format!(
                    "cannot connect to {}: {}",
                    self.pg.describe(),
                    crate::pg::describe(&e)
                ));
            }
        };
        if let Err(e) = transaction::bootstrap(&client).await {
            return retry(&format!(
                "cannot create pgspool's tables: {}",
                crate::pg::describe(&e)
            ));
        }
        self.metrics.postgres_up(true);
        let spool_id = self.wal.spool_id();
        let state = async {
            let watermark = transaction::read_watermark(&client, spool_id).await?;
            let holds = transaction::read_holds(&client, spool_id).await?;
            let dead_letters = transaction::count_dead_letters(&client, spool_id).await?;
            Ok::<_, tokio_postgres::Error>((watermark, holds, dead_letters))
        };
        let (watermark, holds, dead_letters) = match state.await {
            Ok(state) => state,
            Err(e) => {
                return retry(&format!(
                    "cannot read the watermark: {}",
                    crate::pg::describe(&e)
                ));
            }
        };
        let mut reader = self.open_reader(watermark).await?;
        self.checked();
        let mut watermark = watermark.lsn;
        if let Some(local) = crate::wal::recorded_watermark(self.wal.path())
            && watermark < local
        {
            warn!(
                watermark = %watermark,
                checkpoint = %local,
                "PostgreSQL's watermark is behind what this spool saw committed (the database \
                 was restored from a backup, or the watermark row was changed): the rows after \
                 it are sent again"
            );
        }
        self.load_holds(holds);
        let held: Vec<(String, Lsn, Refusal)> = self
            .state
            .held
            .iter()
            .map(|(t, h)| (t.clone(), h.lsn, h.refusal.clone()))
            .collect();
        self.live.connected();
        self.report(|r| {
            r.postgres_error = None;
            for table in r.tables.values_mut() {
                table.dead_letters = 0;
                table.held_after_lsn = None;
            }
            for (table, count) in dead_letters {
                r.table(&table).dead_letters = count;
            }
            for (table, lsn, refusal) in held {
                let report = r.table(&table);
                report.held_after_lsn = Some(lsn);
                report
                    .last_error
                    .get_or_insert_with(|| TableError::new(&refusal, lsn));
            }
        })
        .await;
        self.settled(watermark, &[]).await;
        let backlog_rows = self.durable.borrow().0 - watermark.0;
        info!(watermark = %watermark, backlog_rows, held_tables = self.state.held.len(), "connected to PostgreSQL; flushing from the watermark");
        loop {
            self.progress.tick();
            if let Err(e) = self.catch_up(&mut client, watermark).await? {
                return retry(&e);
            }
            let wake = self.state.held.values().map(|h| h.retry_at).min();
            let (next_reader, batch) = self.next_batch(reader, shutdown, wake).await?;
            reader = next_reader;
            if batch.is_empty() {
                if shutdown.is_cancelled() || self.durable.has_changed().is_err() {
                    return Ok(SessionEnd::Stopped);
                }
                continue;
            }
            let (rows, bytes, last) = (batch.rows(), batch.bytes(), batch.last_lsn());
            let started = std::time::Instant::now();
            let advance = Advance::Watermark {
                expected: watermark,
                held: self.state.held.keys().cloned().collect(),
                hold_now: std::mem::take(&mut self.state.hold_next),
            };
            let hints = self.state.hints.clone();
            let settled = match transaction::commit(
                &mut client,
                spool_id,
                batch,
                &advance,
                &self.schemas,
                &hints,
            )
            .await
            {
                Ok(settled) => settled,
                Err(e) => {
                    self.note_repeat(watermark, &e);
                    self.note_failure(&e);
                    return retry(&format!(
                        "batch of LSNs {}..{last} ({rows} rows): {e}",
                        watermark.next()
                    ));
                }
            };
            watermark = last;
            self.metrics.batch_committed(rows, started.elapsed());
            debug!(rows, bytes, watermark = %last, attempts = settled.attempts, elapsed = ?started.elapsed(), "batch committed");
            *delay = self.postgres.retry_initial;
            self.state.repeats = None;
            if settled.attempts > ATTEMPTS_BEFORE_SHRINKING {
                // Refused rows without a line number are found by bisection, a few per
                // transaction: smaller batches find them in fewer attempts.
                self.shrink("isolating refused rows took several attempts");
            } else {
                self.note_success();
            }
            for hold in &settled.held {
                warn!(
                    table = %hold.table,
                    after_lsn = %hold.lsn,
                    sqlstate = hold.refusal.sqlstate.as_deref().unwrap_or(""),
                    error = %hold.refusal,
                    "this table does not take its rows; they stay in the WAL and are retried \
                     with backoff while other tables flow, and are loaded once what the error \
                     names is fixed (a missing table or column, a privilege, a statement \
                     timeout)"
                );
                self.state.held.insert(
                    hold.table.clone(),
                    HeldState::new(hold.lsn, hold.refusal.clone(), self.postgres.retry_initial),
                );
            }
            self.report_settled(&settled).await;
            self.settled(watermark, &settled.dead_letters).await;
        }
    }

    /// Logs what a commit dead-lettered or held, and reports it.
    async fn report_settled(&mut self, settled: &Settled) {
        self.state.hints.clone_from(&settled.hints);
        self.live.settled(&settled.rows);
        log_dead_letters(settled);
        for d in &settled.dead_letters {
            self.metrics
                .dead_letter(&d.table, d.refusal.sqlstate.as_deref());
        }
        for hold in &settled.held {
            self.metrics.flush_error(hold.refusal.sqlstate.as_deref());
        }
        if settled.dead_letters.is_empty() && settled.held.is_empty() {
            return;
        }
        self.report(|r| {
            for d in &settled.dead_letters {
                let table = r.table(&d.table);
                table.dead_letters += 1;
                table.last_error = Some(TableError::new(&d.refusal, d.lsn));
            }
            for hold in &settled.held {
                let table = r.table(&hold.table);
                table.held_after_lsn = Some(hold.lsn);
                table.last_error = Some(TableError::new(&hold.refusal, hold.lsn));
            }
        })
        .await;
    }

    /// Changes the report with `change` and writes it if that changed anything. A report
    /// that cannot be written is logged: it is not state (see [`report`]).
    async fn report(&mut self, change: impl FnOnce(&mut FlushReport)) {
        let before = self.state.report.clone();
        change(&mut self.state.report);
        if self.state.report == before {
            return;
        }
        self.live.report(&self.state.report);
        let mut report = self.state.report.clone();
        let dir = Arc::clone(&self.wal);
        match tokio::task::spawn_blocking(move || report.write(dir.path())).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "could not write the flush report for pgspool status"),
            // The runtime is shutting down (the daemon was dropped, not stopped).
            Err(e) if e.is_cancelled() => {}
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// Publishes the watermark, tells waiting requests what is settled, and records the
    /// local checkpoint at the lowest LSN below which every row is settled (the watermark,
    /// or the oldest hold).
    async fn settled(&self, watermark: Lsn, dead_letters: &[DeadLetter]) {
        self.metrics.flushed(watermark, self.state.held.len());
        self.committed.send_replace(watermark);
        let acks: Vec<DeadLetterAck> = dead_letters
            .iter()
            .map(|d| DeadLetterAck {
                lsn: d.lsn,
                table: d.table.clone(),
                sqlstate: d.refusal.sqlstate.clone(),
                message: d.refusal.to_string(),
            })
            .collect();
        let held: Vec<HeldTable> = self
            .state
            .held
            .iter()
            .map(|(table, h)| HeldTable {
                table: table.clone(),
                lsn: h.lsn,
                error: h.refusal.to_string(),
            })
            .collect();
        self.acks.settled(watermark, &acks, &held);
        let checkpoint = Checkpoint {
            flushed_lsn: self
                .state
                .held
                .values()
                .map(|h| h.lsn)
                .fold(watermark, Lsn::min),
            watermark: Some(watermark),
            held: self
                .state
                .held
                .iter()
                .map(|(table, h)| (table.clone(), h.lsn))
                .collect(),
        };
        self.after_commit(checkpoint).await;
    }

    /// The batch limits, halved `shrink` times (to one row at least).
    fn limits(&self) -> BatchConfig {
        let config = self.config.borrow();
        let limits = &config.batch;
        BatchConfig {
            max_rows: (limits.max_rows >> self.state.shrink).max(1),
            max_bytes: (limits.max_bytes >> self.state.shrink).max(1),
            max_wait: limits.max_wait,
        }
    }

    /// A statement timeout halves the batch limits for the next batches.
    fn note_failure(&mut self, e: &FlushFailure) {
        if self
            .count_failure(e)
            .is_some_and(classify::Class::is_timeout)
        {
            self.shrink("a batch took longer than PostgreSQL's statement_timeout");
        }
    }

    /// Counts `e` in the metrics; returns PostgreSQL's error, if it is one.
    fn count_failure<'e>(&self, e: &'e FlushFailure) -> Option<&'e tokio_postgres::Error> {
        let error = match e {
            FlushFailure::Postgres(error) | FlushFailure::InTable { error, .. } => Some(error),
            _ => None,
        };
        let sqlstate = match e {
            FlushFailure::StillHeld { refusal, .. } => refusal.sqlstate.as_deref(),
            _ => error
                .and_then(|e| e.as_db_error())
                .map(|db| db.code().code()),
        };
        self.metrics.flush_error(sqlstate);
        error
    }

    /// Halves the batch limits (down to one row) for the next batches, because `why`.
    fn shrink(&mut self, why: &str) {
        self.state.successes = 0;
        if self.limits().max_rows > 1 {
            self.state.shrink += 1;
            warn!(
                max_rows = self.limits().max_rows,
                "{why}; sending smaller batches"
            );
        }
    }

    /// After [`COMMITS_BEFORE_GROWING`] commits in a row, a halved limit doubles again.
    fn note_success(&mut self) {
        if self.state.shrink == 0 {
            return;
        }
        self.state.successes += 1;
        if self.state.successes >= COMMITS_BEFORE_GROWING {
            self.state.shrink -= 1;
            self.state.successes = 0;
        }
    }

    /// Fills the next batch: returns as soon as it is full, or when it is due, or at
    /// `wake` (a held table's retry), or as soon as the reader is caught up with the
    /// durable LSN while an `ack=committed` request waits, or, once shutdown is asked for,
    /// as soon as the reader is caught up (possibly empty).
    async fn next_batch(
        &mut self,
        mut reader: WalReader,
        shutdown: &CancellationToken,
        wake: Option<Instant>,
    ) -> Result<(WalReader, Batch), FatalError> {
        let mut batch = Batch::default();
        loop {
            self.progress.tick();
            let durable = *self.durable.borrow_and_update();
            let limits = self.limits();
            let fill_limits = limits.clone();
            let (r, b, filled) = tokio::task::spawn_blocking(move || {
                let filled = batch.fill_from(&mut reader, durable, &fill_limits);
                (reader, batch, filled)
            })
            .await
            .expect("filling a batch does not panic");
            (reader, batch) = (r, b);
            fill_result(filled)?;
            let caught_up = !self.more_durable(durable);
            let awaited = !batch.is_empty() && self.acks.waiting() > 0;
            if batch.is_full(&limits) || (caught_up && (shutdown.is_cancelled() || awaited)) {
                return Ok((reader, batch));
            }
            let due = batch.due();
            let acks = &self.acks;
            let durable_rx = &mut self.durable;
            let woke = self.progress.waiting(async {
                tokio::select! {
                    changed = durable_rx.changed() => Wake::Durable(changed.is_ok()),
                    () = sleep_until(due) => Wake::Due,
                    () = sleep_until(wake) => Wake::Due,
                    () = acks.registered() => Wake::Waiter,
                    () = shutdown.cancelled(), if !shutdown.is_cancelled() => Wake::Shutdown,
                }
            });
            match woke.await {
                // The writer stopped; nothing more will come.
                Wake::Durable(false) if !self.more_durable(durable) => return Ok((reader, batch)),
                Wake::Due => return Ok((reader, batch)),
                Wake::Durable(_) | Wake::Waiter | Wake::Shutdown => {}
            }
        }
    }

    /// Opens a reader just past `watermark`, after checking that the WAL holds, ending at
    /// the watermark, the very record PostgreSQL committed: a WAL older than the database
    /// would otherwise have its new rows skipped, or loaded under LSNs PostgreSQL counts as
    /// done.
    async fn open_reader(&self, watermark: Watermark) -> Result<WalReader, FatalError> {
        let mismatch = |detail: String| FatalError::WalMismatch {
            spool_id: self.wal.spool_id(),
            watermark: watermark.lsn,
            detail,
        };
        let wal_end = *self.durable.borrow();
        if watermark.lsn > wal_end {
            return Err(mismatch(format!("this WAL ends at LSN {wal_end}")));
        }
        let dir = Arc::clone(&self.wal);
        let from = watermark.lsn.next();
        let reader = tokio::task::spawn_blocking(move || WalReader::open(dir, from))
            .await
            .expect("opening a reader does not panic");
        let reader = match reader {
            Err(WalError::InsideRecord { record_end, .. }) => {
                return Err(mismatch(format!(
                    "no record of this WAL ends there (one spans it, up to LSN {record_end})"
                )));
            }
            other => other?,
        };
        if let (Some(committed), Some(held)) = (watermark.record_crc, reader.crc_before())
            && committed != held
        {
            return Err(mismatch(format!(
                "the record of this WAL that ends there is not the one PostgreSQL committed \
                 (CRC {held:#010x}, committed {committed:#010x})"
            )));
        }
        Ok(reader)
    }

    fn checked(&mut self) {
        if let Some(checked) = self.checked.take() {
            let _ = checked.send(());
        }
    }

    fn more_durable(&self, read_up_to: Lsn) -> bool {
        *self.durable.borrow() > read_up_to
    }

    /// Records the checkpoint locally, then deletes the segments its flushed LSN covers. In
    /// that order,
    /// `pgspool status` never sees segments gone that the checkpoint still counts as
    /// pending; each step runs even if the other failed (a full disk fails the checkpoint,
    /// and deletion is what frees it). Failures are logged: PostgreSQL's watermark is what
    /// counts, and the next commit tries again.
    async fn after_commit(&self, checkpoint: Checkpoint) {
        let dir = Arc::clone(&self.wal);
        let flushed = checkpoint.flushed_lsn;
        let (checkpointed, removed) = tokio::task::spawn_blocking(move || {
            (
                dir.write_checkpoint(&checkpoint),
                dir.remove_segments_through(flushed),
            )
        })
        .await
        .expect("checkpointing does not panic");
        match removed {
            Ok(0) => {}
            Ok(removed) => debug!(removed, flushed = %flushed, "deleted flushed segments"),
            Err(e) => warn!(error = %e, "could not delete flushed segments"),
        }
        if let Err(e) = checkpointed {
            warn!(error = %e, "could not write the checkpoint");
        }
    }
}

/// Logs the rows a commit dead-lettered: each of the first few, then how many more.
fn log_dead_letters(settled: &Settled) {
    const SHOWN: usize = 10;
    for d in settled.dead_letters.iter().take(SHOWN) {
        warn!(
            table = %d.table,
            lsn = %d.lsn,
            sqlstate = d.refusal.sqlstate.as_deref().unwrap_or(""),
            error = %d.refusal,
            "row refused; kept in pgspool.dead_letters"
        );
    }
    if settled.dead_letters.len() > SHOWN {
        warn!(
            more = settled.dead_letters.len() - SHOWN,
            "more rows of this batch refused; see pgspool.dead_letters"
        );
    }
}

fn fill_result(filled: Result<(), FillError>) -> Result<(), FatalError> {
    match filled {
        Ok(()) => Ok(()),
        Err(FillError::Wal(e)) => Err(e.into()),
        Err(e @ FillError::Malformed { .. }) => Err(FatalError::Malformed(e.to_string())),
    }
}

/// Why a flusher waiting for rows woke up.
enum Wake {
    /// The durable LSN moved (`true`), or the writer stopped (`false`).
    Durable(bool),
    /// The batch is due, or a held table's retry.
    Due,
    /// A request started to wait for its rows to be committed.
    Waiter,
    /// Shutdown was asked for.
    Shutdown,
}

async fn sleep_until(due: Option<std::time::Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due.into()).await,
        None => std::future::pending().await,
    }
}

/// A wait between half and all of `delay`, so many spools do not retry in step.
fn jitter(delay: Duration) -> Duration {
    delay.mul_f64(rand::rng().random_range(0.5..=1.0))
}
