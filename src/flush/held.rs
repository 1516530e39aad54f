//! Held tables: a table that does not take its rows (a schema or permission error, or
//! rows that fail transiently at the same place again and again) is held. Its rows after
//! the hold's LSN stay in the WAL while the watermark moves on for the other tables; at
//! each retry, with capped exponential backoff, the flusher reads the WAL from the hold,
//! takes that table's rows up to the watermark, and commits them with the hold moved
//! forward, or released once it reaches the watermark (see ARCHITECTURE.md, "Held
//! tables").

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tracing::{info, warn};

use super::load::Refusal;
use super::report::TableError;
use super::transaction::{self, Advance, FlushFailure, Hold};
use super::{Batch, FatalError, Flusher, classify, fill_result, jitter};
use crate::lsn::Lsn;
use crate::wal::WalReader;

/// Transient failures of one table's rows at one watermark after which the table is held.
const REPEATS_BEFORE_HOLDING: u32 = 3;

/// How often a table that stays held is logged as a warning.
const HELD_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// A held table, as the flusher tracks it.
#[derive(Debug)]
pub(super) struct HeldState {
    /// Its rows up to this LSN are settled.
    pub(super) lsn: Lsn,
    /// The last error.
    pub(super) refusal: Refusal,
    /// The next wait after a failed retry.
    pub(super) delay: Duration,
    /// When to try its rows again.
    pub(super) retry_at: Instant,
    /// When the error was last logged as a warning.
    pub(super) warned_at: Instant,
    /// While it catches up: the reader, just past `lsn`.
    pub(super) reader: Option<WalReader>,
}

impl HeldState {
    pub(super) fn new(lsn: Lsn, refusal: Refusal, delay: Duration) -> HeldState {
        let now = Instant::now();
        HeldState {
            lsn,
            refusal,
            delay,
            retry_at: now + jitter(delay),
            warned_at: now,
            reader: None,
        }
    }
}

impl Flusher {
    /// Takes the holds read from PostgreSQL, keeping the backoff of tables still held.
    pub(super) fn load_holds(&mut self, holds: Vec<Hold>) {
        let initial = self.postgres.retry_initial;
        let mut held = BTreeMap::new();
        for hold in holds {
            let state = match self.state.held.remove(&hold.table) {
                Some(mut known) => {
                    // PostgreSQL's hold is the truth: a reader kept from the last session
                    // may stand elsewhere.
                    known.lsn = hold.lsn;
                    known.reader = None;
                    known
                }
                None => {
                    warn!(table = %hold.table, after_lsn = %hold.lsn, error = %hold.refusal, "table held by an earlier error; its rows are retried");
                    HeldState::new(hold.lsn, hold.refusal, initial)
                }
            };
            held.insert(hold.table, state);
        }
        self.state.held = held;
    }

    /// Sends one batch of each held table whose retry is due: its rows after its hold, up
    /// to `watermark`. A table whose rows all load is released; one that refuses them
    /// again backs off. One batch per turn, so that a long catch-up does not stop the other
    /// tables: the main batches go on in between.
    ///
    /// # Errors
    /// A [`FatalError`] when the WAL cannot be read there; the inner error (why, for the
    /// log) when PostgreSQL failed otherwise than by refusing the table's rows again.
    pub(super) async fn catch_up(
        &mut self,
        client: &mut Client,
        watermark: Lsn,
    ) -> Result<Result<(), String>, FatalError> {
        let now = Instant::now();
        let due: Vec<String> = self
            .state
            .held
            .iter()
            .filter(|(_, h)| h.retry_at <= now)
            .map(|(t, _)| t.clone())
            .collect();
        for table in due {
            let held = self
                .state
                .held
                .get_mut(&table)
                .expect("a due table is held");
            let expected = held.lsn;
            let mut reader = match held.reader.take() {
                Some(reader) => reader,
                None => {
                    let dir = Arc::clone(&self.wal);
                    tokio::task::spawn_blocking(move || WalReader::open(dir, expected.next()))
                        .await
                        .expect("opening a reader does not panic")?
                }
            };
            let limits = self.limits();
            let mut batch = Batch::only(table.clone(), expected);
            let (reader, batch, filled) = tokio::task::spawn_blocking(move || {
                let filled = batch.fill_from(&mut reader, watermark, &limits);
                (reader, batch, filled)
            })
            .await
            .expect("filling a batch does not panic");
            fill_result(filled)?;
            let last = batch.last_lsn();
            let release = last == watermark;
            let advance = Advance::Hold {
                table: table.clone(),
                expected,
                release,
            };
            let spool_id = self.wal.spool_id();
            let hints = self.state.hints.clone();
            let (rows, started) = (batch.rows(), Instant::now());
            match transaction::commit(client, spool_id, batch, &advance, &self.schemas, &hints)
                .await
            {
                Ok(settled) => {
                    self.metrics.batch_committed(rows, started.elapsed());
                    self.report_settled(&settled).await;
                    if release {
                        info!(table = %table, "the held table takes rows again; its rows are loaded");
                        self.state.held.remove(&table);
                        self.report(|r| r.table(&table).held_after_lsn = None).await;
                    } else if let Some(held) = self.state.held.get_mut(&table) {
                        // Due again at once: the next batch follows the main one.
                        held.lsn = last;
                        held.reader = Some(reader);
                    }
                    self.settled(watermark, &settled.dead_letters).await;
                }
                Err(e) => {
                    // The table's own trouble: the other tables' batches keep their size.
                    self.count_failure(&e);
                    let refusal = match &e {
                        FlushFailure::StillHeld { refusal, .. } => Some(refusal.clone()),
                        FlushFailure::InTable { error, .. } if error.as_db_error().is_some() => {
                            Some(Refusal::from_error(error))
                        }
                        _ => None,
                    };
                    self.back_off(&table, refusal.as_ref()).await;
                    if refusal.is_none() {
                        return Ok(Err(format!(
                            "rows of held table {table} after LSN {expected}: {e}"
                        )));
                    }
                }
            }
        }
        Ok(Ok(()))
    }

    /// Puts off the next try of held `table` (capped exponential backoff with jitter),
    /// recording `refusal` when the table refused its rows again; warns at most once per
    /// [`HELD_WARNING_INTERVAL`].
    pub(super) async fn back_off(&mut self, table: &str, refusal: Option<&Refusal>) {
        let retry_max = self.postgres.retry_max;
        let Some(held) = self.state.held.get_mut(table) else {
            return;
        };
        held.retry_at = Instant::now() + jitter(held.delay);
        held.delay = (held.delay * 2).min(retry_max);
        let Some(refusal) = refusal else {
            return;
        };
        held.refusal = refusal.clone();
        if held.warned_at.elapsed() >= HELD_WARNING_INTERVAL {
            held.warned_at = Instant::now();
            warn!(table = %table, after_lsn = %held.lsn, error = %held.refusal, "table still refuses its rows; they stay in the WAL");
        }
        let error = TableError::new(refusal, held.lsn);
        self.report(|r| {
            let report = r.table(table);
            if report.last_error.as_ref().map(|e| &e.message) != Some(&error.message) {
                report.last_error = Some(error);
            }
        })
        .await;
    }

    /// Counts a table's rows failing with a transient error at the same watermark. After
    /// [`REPEATS_BEFORE_HOLDING`] in a row (for a statement timeout: once batches cannot
    /// shrink further), the table is held with the next batch: a row that always times out
    /// or always raises a serialization failure would otherwise stop every table.
    pub(super) fn note_repeat(&mut self, watermark: Lsn, e: &FlushFailure) {
        let FlushFailure::InTable { table, error } = e else {
            self.state.repeats = None;
            return;
        };
        if classify::Class::is_timeout(error) && self.limits().max_rows > 1 {
            return;
        }
        let count = match &self.state.repeats {
            Some((at, t, n)) if *at == watermark && t == table => n + 1,
            _ => 1,
        };
        self.state.repeats = Some((watermark, table.clone(), count));
        if count >= REPEATS_BEFORE_HOLDING {
            warn!(table = %table, after_lsn = %watermark, failures = count, error = %crate::pg::describe(error), "this table's rows fail again and again at the same place; holding them in the WAL so that other tables flow");
            let refusal = if error.as_db_error().is_some() {
                Refusal::from_error(error)
            } else {
                Refusal::by_pgspool(format!(
                    "the connection dropped while this table's rows were sent, {count} times \
                     at the same place ({}): PostgreSQL refuses its COPY before it starts; \
                     its log says why",
                    crate::pg::describe(error)
                ))
            };
            self.state.hold_next = vec![(table.clone(), refusal)];
        }
    }
}
