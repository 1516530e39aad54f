//! What [`deliver`](super::deliver) did: acknowledged, failed and unsent rows, and each
//! batch that was not acknowledged.

use std::time::Duration;

use indicatif::ProgressBar;
use serde::Serialize;

use super::{Batch, MAX_PRINTED_FAILURES};
use crate::client::Reply;

/// The longest failure message kept, in characters (a daemon's message may quote a row).
const MAX_ERROR_CHARS: usize = 300;

/// What [`deliver`](super::deliver) did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Requests the daemon acknowledged.
    pub batches_acknowledged: u64,
    /// Requests refused, or without an answer.
    pub batches_failed: u64,
    /// Batches never sent (or sent and answered that nothing was kept), because sending
    /// stopped: the daemon could not be reached, or `send` was interrupted.
    pub batches_not_sent: u64,
    /// Rows of acknowledged requests: durable in the WAL (or written, with `ack=none`).
    pub rows_acknowledged: u64,
    /// Rows of failed requests.
    pub rows_failed: u64,
    /// Rows of batches not sent.
    pub rows_not_sent: u64,
    /// Rows the daemon set aside for pgspool.dead_letters at once (`invalid=dead_letter`);
    /// they are among the acknowledged rows.
    pub rows_refused: u64,
    /// Rows PostgreSQL took (`ack=committed`).
    pub rows_committed: u64,
    /// Rows PostgreSQL refused into pgspool.dead_letters (`ack=committed`).
    pub rows_dead_lettered: u64,
    /// Acknowledged rows not yet committed when answered (`ack=committed`: their table is
    /// held by an error, or the daemon stopped); they are durable and loaded later. The
    /// reason is printed for the first such batch.
    pub rows_not_committed: u64,
    /// Every batch failed or not sent, in the order it happened.
    pub failures: Vec<Failure>,
    /// Whether sending stopped early because the daemon could not be reached.
    pub unreachable: bool,
    /// From the start of [`deliver`](super::deliver) to the last answer.
    pub elapsed: Duration,
    /// Each acknowledged request's time from sending to its answer, retries included.
    pub latencies: Vec<Duration>,
}

impl Report {
    /// The `q` quantile (0 to 1) of the acknowledgement latencies; zero without any.
    pub fn latency(&self, q: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        if sorted.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1]
    }

    /// Acknowledged rows per second.
    pub fn rows_per_second(&self) -> f64 {
        let seconds = self.elapsed.as_secs_f64();
        if seconds > 0.0 {
            self.rows_acknowledged as f64 / seconds
        } else {
            0.0
        }
    }

    /// Counts an acknowledged batch, by its answer.
    pub(super) fn stored(&mut self, bar: &ProgressBar, batch: &Batch, reply: &Reply) {
        let count = |key: &str| {
            reply
                .body
                .get(key)
                .and_then(|v| v.as_array())
                .map_or(0, |a| a.len() as u64)
        };
        self.batches_acknowledged += 1;
        self.rows_acknowledged += batch.rows;
        self.rows_refused += count("refused");
        match reply.body.get("committed") {
            Some(serde_json::Value::Number(n)) => {
                self.rows_committed += n.as_u64().unwrap_or(0);
                self.rows_dead_lettered += count("dead_lettered");
            }
            Some(_) => {
                let first = self.rows_not_committed == 0;
                self.rows_not_committed += batch.rows;
                let why = ["message", "error"]
                    .iter()
                    .find_map(|key| reply.body.get(*key).and_then(|m| m.as_str()))
                    .unwrap_or("not committed yet");
                if first {
                    bar.suspend(|| eprintln!("pgspool: {}: {why}", batch.rows_label()));
                }
            }
            None => {}
        }
    }

    /// Counts a failed batch, and prints its message if it is among the first
    /// [`MAX_PRINTED_FAILURES`].
    pub(super) fn fail(
        &mut self,
        bar: &ProgressBar,
        batch: &Batch,
        failure: Failure,
        message: &str,
    ) {
        if self.batches_failed < MAX_PRINTED_FAILURES as u64 {
            bar.suspend(|| eprintln!("pgspool: {message}"));
        }
        self.batches_failed += 1;
        self.rows_failed += batch.rows;
        self.failures.push(failure);
    }

    /// Counts a batch that was not sent, because `why`.
    pub fn not_sent(&mut self, batch: &Batch, why: &str) {
        self.batches_not_sent += 1;
        self.rows_not_sent += batch.rows;
        self.failures
            .push(Failure::new(batch, Fate::NotSent, None, why.to_string()));
    }
}

/// A batch that was not acknowledged, for the `--json` summary.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    /// The number of its first row in the input, from 1.
    pub first_row: u64,
    /// The number of its last row in the input, from 1.
    pub last_row: u64,
    /// What became of it.
    pub outcome: Fate,
    /// The daemon's HTTP status, when it refused the batch.
    pub status: Option<u16>,
    /// Why, in at most 300 characters.
    pub error: String,
}

impl Failure {
    pub(super) fn new(
        batch: &Batch,
        outcome: Fate,
        status: Option<u16>,
        mut error: String,
    ) -> Failure {
        if let Some((cut, _)) = error.char_indices().nth(MAX_ERROR_CHARS) {
            error.truncate(cut);
            error.push('…');
        }
        Failure {
            first_row: batch.first_row,
            last_row: batch.last_row(),
            outcome,
            status,
            error,
        }
    }
}

/// What became of a batch that was not acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fate {
    /// The daemon refused it: none of its rows was stored.
    Refused,
    /// Sent, but no answer came: its rows may or may not have been stored (each at most
    /// once).
    NoAnswer,
    /// Not sent (or answered that nothing was kept): none of its rows was stored.
    NotSent,
}
