//! The flusher: reads the WAL from the watermark and loads it into PostgreSQL.
//!
//! Each session connects, creates pgspool's own tables if missing, reads this spool's
//! watermark back from PostgreSQL, opens a WAL reader just past it, and then repeatedly
//! fills a [`Batch`] and commits it with [`transaction::commit`]. After each commit the
//! local checkpoint is written, then segments at or below the watermark are deleted.
//!
//! Any failure ends the session: the flusher waits (capped exponential backoff with
//! jitter) and starts a new one, which reads the watermark again, so a batch whose COMMIT
//! outcome was lost is neither lost nor sent twice. Replay after a crash is the same path.
//! Only damage to the WAL, or a watermark the WAL cannot match, stops the flusher. Damage
//! is recorded in the WAL directory (see [`crate::wal::damage`]) so that the daemon keeps
//! refusing to start until an operator runs `pgspool quarantine` or restores the directory.

pub mod batch;
pub mod transaction;

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{BatchConfig, PostgresConfig};
use crate::lsn::Lsn;
use crate::schema::SchemaCache;
use crate::wal::{WalDir, WalError, WalReader};
pub use batch::Batch;
use batch::FillError;
use transaction::Watermark;

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
    pub pg: tokio_postgres::Config,
    /// Retry pacing.
    pub postgres: PostgresConfig,
    /// The WAL directory.
    pub wal: Arc<WalDir>,
    /// The writer's durable LSN.
    pub durable: watch::Receiver<Lsn>,
    /// Where the committed watermark is published.
    pub committed: watch::Sender<Lsn>,
    /// Batch limits.
    pub limits: BatchConfig,
    /// Table schemas, for rows kept as JSON.
    pub schemas: Arc<SchemaCache>,
    /// Signalled once the first session has checked the WAL against PostgreSQL's
    /// watermark, or found PostgreSQL unreachable; dropped unsent on a fatal error.
    pub checked: Option<oneshot::Sender<()>>,
}

impl Flusher {
    /// Runs until `shutdown` is cancelled and the WAL is flushed up to the durable LSN as
    /// it was then (callers bound this with a drain timeout), or until a fatal error.
    ///
    /// # Errors
    /// [`FatalError`].
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), FatalError> {
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
                    let wait = jitter(delay);
                    warn!(error = %why, retry_in = ?wait, "flush failed; the rows stay in the WAL");
                    delay = (delay * 2).min(self.postgres.retry_max);
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = shutdown.cancelled() => {
                            info!("stopping with rows left in the WAL; they are sent after the next start");
                            return Ok(());
                        }
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
        let mut client = match crate::pg::connect(&self.pg).await {
            Ok(client) => client,
            Err(e) => {
                return retry(&format!(
                    "cannot connect to {}: {}",
                    crate::pg::describe_target(&self.pg),
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
        let watermark = match transaction::read_watermark(&client, self.wal.spool_id()).await {
            Ok(watermark) => watermark,
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
        if let Ok(Some(local)) = crate::wal::read_checkpoint(self.wal.path())
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
        self.committed.send_replace(watermark);
        self.after_commit(watermark).await;
        let backlog_rows = self.durable.borrow().0 - watermark.0;
        info!(watermark = %watermark, backlog_rows, "connected to PostgreSQL; flushing from the watermark");
        loop {
            let (next_reader, batch) = self.next_batch(reader, shutdown).await?;
            reader = next_reader;
            if batch.is_empty() {
                return Ok(SessionEnd::Stopped);
            }
            let (rows, bytes, last) = (batch.rows(), batch.bytes(), batch.last_lsn());
            let started = std::time::Instant::now();
            let spool_id = self.wal.spool_id();
            if let Err(e) =
                transaction::commit(&mut client, spool_id, watermark, batch, &self.schemas).await
            {
                return retry(&e);
            }
            watermark = last;
            debug!(rows, bytes, watermark = %last, elapsed = ?started.elapsed(), "batch committed");
            *delay = self.postgres.retry_initial;
            self.committed.send_replace(last);
            self.after_commit(last).await;
        }
    }

    /// Fills the next batch: returns as soon as it is full, or when it is due, or, once
    /// shutdown is asked for, as soon as the reader is caught up (possibly empty).
    async fn next_batch(
        &mut self,
        mut reader: WalReader,
        shutdown: &CancellationToken,
    ) -> Result<(WalReader, Batch), FatalError> {
        let mut batch = Batch::default();
        loop {
            let durable = *self.durable.borrow_and_update();
            let limits = self.limits.clone();
            let (r, b, filled) = tokio::task::spawn_blocking(move || {
                let filled = batch.fill_from(&mut reader, durable, &limits);
                (reader, batch, filled)
            })
            .await
            .expect("filling a batch does not panic");
            (reader, batch) = (r, b);
            match filled {
                Ok(()) => {}
                Err(FillError::Wal(e)) => return Err(e.into()),
                Err(e @ FillError::Malformed { .. }) => {
                    return Err(FatalError::Malformed(e.to_string()));
                }
            }
            if batch.is_full(&self.limits)
                || (shutdown.is_cancelled() && !self.more_durable(durable))
            {
                return Ok((reader, batch));
            }
            let due = batch.due();
            tokio::select! {
                changed = self.durable.changed() => {
                    if changed.is_err() && !self.more_durable(durable) {
                        // The writer stopped; nothing more will come.
                        return Ok((reader, batch));
                    }
                }
                () = sleep_until(due) => return Ok((reader, batch)),
                () = shutdown.cancelled(), if !shutdown.is_cancelled() => {}
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

    /// Records the watermark locally, then deletes the segments it covers. In that order,
    /// `pgspool status` never sees segments gone that the checkpoint still counts as
    /// pending; each step runs even if the other failed (a full disk fails the checkpoint,
    /// and deletion is what frees it). Failures are logged: PostgreSQL's watermark is what
    /// counts, and the next commit tries again.
    async fn after_commit(&self, watermark: Lsn) {
        let dir = Arc::clone(&self.wal);
        let (checkpointed, removed) = tokio::task::spawn_blocking(move || {
            (
                dir.write_checkpoint(watermark),
                dir.remove_segments_through(watermark),
            )
        })
        .await
        .expect("checkpointing does not panic");
        match removed {
            Ok(0) => {}
            Ok(removed) => debug!(removed, watermark = %watermark, "deleted flushed segments"),
            Err(e) => warn!(error = %e, "could not delete flushed segments"),
        }
        if let Err(e) = checkpointed {
            warn!(error = %e, "could not write the checkpoint");
        }
    }
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
