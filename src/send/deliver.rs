//! Posting batches over several connections, retrying what the daemon kept nothing of, and
//! tallying what landed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use hyper::StatusCode;
use indicatif::ProgressBar;
use tokio::sync::{Mutex, mpsc};

use super::{AckLevel, Batch, InvalidRows, MAX_PRINTED_FAILURES};
use crate::client::{Reply, SpoolClient};

/// First wait before a retry; it doubles with each retry.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Longest wait before a retry.
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A connection idle this long is replaced before it is used: the daemon closes one idle
/// for 30 s, possibly just as a request is written to it.
const IDLE_RECONNECT: Duration = Duration::from_secs(20);

/// How [`deliver`] sends.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The daemon's socket.
    pub socket: std::path::PathBuf,
    /// Concurrent connections (at least 1).
    pub clients: usize,
    /// The `ack` query parameter.
    pub ack: AckLevel,
    /// The `invalid` query parameter.
    pub invalid: InvalidRows,
    /// Retries of a 503 that kept nothing, or of a failed connect, before a batch fails.
    pub retries: u32,
}

impl Delivery {
    fn query(&self) -> String {
        let ack = match self.ack {
            AckLevel::Durable => "durable",
            AckLevel::Committed => "committed",
            AckLevel::None => "none",
        };
        let invalid = match self.invalid {
            InvalidRows::Reject => "reject",
            InvalidRows::DeadLetter => "dead_letter",
        };
        format!("ack={ack}&invalid={invalid}")
    }
}

/// What [`deliver`] did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Requests the daemon acknowledged.
    pub batches_acknowledged: u64,
    /// Requests refused, or without an answer.
    pub batches_failed: u64,
    /// Rows of acknowledged requests: durable in the WAL (or written, with `ack=none`).
    pub rows_acknowledged: u64,
    /// Rows of failed requests.
    pub rows_failed: u64,
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
    /// The first [`MAX_PRINTED_FAILURES`] failure messages.
    pub failures: Vec<String>,
    /// Whether sending stopped early because the daemon could not be reached.
    pub unreachable: bool,
    /// From the start of [`deliver`] to the last answer.
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

    fn fail(&mut self, bar: &ProgressBar, batch: &Batch, message: String) {
        self.batches_failed += 1;
        self.rows_failed += batch.rows;
        if self.failures.len() < MAX_PRINTED_FAILURES {
            bar.suspend(|| eprintln!("pgspool: {message}"));
            self.failures.push(message);
        }
    }
}

/// What became of one batch.
enum Outcome {
    /// Acknowledged (2xx, or a 503 of `ack=committed` that says the rows are durable).
    Stored(Reply, Duration),
    /// Refused (after any retries).
    Refused(Reply),
    /// Sent, but the connection broke before the answer.
    NoAnswer(anyhow::Error),
    /// Not sent: no connection could be made.
    Unreachable(anyhow::Error),
}

/// One connection and when it was last used.
struct Connection {
    client: SpoolClient,
    used: Instant,
}

struct Shared {
    delivery: Delivery,
    query: String,
    batches: Mutex<mpsc::Receiver<Batch>>,
    stop: AtomicBool,
    report: StdMutex<Report>,
    bar: ProgressBar,
}

/// Posts the batches that arrive on `batches` over `delivery.clients` connections until
/// the channel is closed and empty, moving `bar` by each batch's progress, and reports.
///
/// A batch refused (non-2xx) or without an answer counts as failed, and its message is
/// printed (the first [`MAX_PRINTED_FAILURES`]); the other batches go on. When no
/// connection can be made even after the retries, sending stops: the channel is closed (a
/// [`Batcher`](super::Batcher) then fails with [`SendingStopped`](super::SendingStopped)) and [`Report::unreachable`] is set.
pub async fn deliver(
    delivery: &Delivery,
    batches: mpsc::Receiver<Batch>,
    bar: &ProgressBar,
) -> Report {
    let shared = Arc::new(Shared {
        query: delivery.query(),
        delivery: delivery.clone(),
        batches: Mutex::new(batches),
        stop: AtomicBool::new(false),
        report: StdMutex::new(Report::default()),
        bar: bar.clone(),
    });
    let started = Instant::now();
    let workers: Vec<_> = (0..delivery.clients.max(1))
        .map(|_| tokio::spawn(work(Arc::clone(&shared))))
        .collect();
    for worker in workers {
        if let Err(e) = worker.await {
            std::panic::resume_unwind(e.into_panic());
        }
    }
    let mut report = std::mem::take(&mut *shared.report.lock().expect("lock poisoned"));
    report.elapsed = started.elapsed();
    report
}

async fn work(shared: Arc<Shared>) {
    let mut connection = None;
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let Some(batch) = shared.batches.lock().await.recv().await else {
            return;
        };
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let outcome = post(&shared, &mut connection, &batch).await;
        record(&shared, &batch, outcome);
        shared.bar.inc(batch.progress);
        if shared.stop.load(Ordering::Relaxed) {
            shared.batches.lock().await.close();
            return;
        }
    }
}

/// Adds a batch's outcome to the report, printing a failure.
fn record(shared: &Shared, batch: &Batch, outcome: Outcome) {
    let mut report = shared.report.lock().expect("lock poisoned");
    match outcome {
        Outcome::Stored(reply, latency) => {
            tally_stored(&mut report, &shared.bar, batch, &reply);
            report.latencies.push(latency);
        }
        Outcome::Refused(reply) => {
            let error = reply
                .body
                .get("error")
                .and_then(|e| e.as_str())
                .map_or_else(|| reply.body.to_string(), |e| batch.input_position(e));
            let message = format!(
                "{} of {} refused ({}): {error}",
                batch.rows_label(),
                batch.table,
                reply.status
            );
            report.fail(&shared.bar, batch, message);
        }
        Outcome::NoAnswer(e) => {
            let message = format!(
                "{} of {} got no answer ({e:#}): they may or may not have been stored \
                     (each at most once); check the table before sending them again",
                batch.rows_label(),
                batch.table
            );
            report.fail(&shared.bar, batch, message);
        }
        Outcome::Unreachable(e) => {
            let message = format!(
                "{} of {} not sent, and sending stops: {e:#}",
                batch.rows_label(),
                batch.table
            );
            report.fail(&shared.bar, batch, message);
            report.unreachable = true;
            shared.stop.store(true, Ordering::Relaxed);
        }
    }
}

/// Adds an acknowledged batch's answer to the report.
fn tally_stored(report: &mut Report, bar: &ProgressBar, batch: &Batch, reply: &Reply) {
    let count = |key: &str| {
        reply
            .body
            .get(key)
            .and_then(|v| v.as_array())
            .map_or(0, |a| a.len() as u64)
    };
    report.batches_acknowledged += 1;
    report.rows_acknowledged += batch.rows;
    report.rows_refused += count("refused");
    match reply.body.get("committed") {
        Some(serde_json::Value::Number(n)) => {
            report.rows_committed += n.as_u64().unwrap_or(0);
            report.rows_dead_lettered += count("dead_lettered");
        }
        Some(_) => {
            let first = report.rows_not_committed == 0;
            report.rows_not_committed += batch.rows;
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

/// Posts one batch, retrying what may be retried.
async fn post(shared: &Shared, connection: &mut Option<Connection>, batch: &Batch) -> Outcome {
    let started = Instant::now();
    let mut attempt = 0;
    loop {
        if connection
            .as_ref()
            .is_some_and(|c| c.client.is_closed() || c.used.elapsed() > IDLE_RECONNECT)
        {
            *connection = None;
        }
        let client = match connection {
            Some(connection) => connection,
            None => match SpoolClient::connect(&shared.delivery.socket).await {
                Ok(client) => connection.insert(Connection {
                    client,
                    used: Instant::now(),
                }),
                Err(_) if attempt < shared.delivery.retries => {
                    tokio::time::sleep(backoff(attempt, None)).await;
                    attempt += 1;
                    continue;
                }
                Err(e) => return Outcome::Unreachable(e),
            },
        };
        let answer = client
            .client
            .post_rows_with(
                &batch.table,
                &shared.query,
                batch.content_type,
                batch.body.clone(),
            )
            .await;
        client.used = Instant::now();
        let reply = match answer {
            Ok(reply) => reply,
            Err(e) => {
                *connection = None;
                return Outcome::NoAnswer(e);
            }
        };
        // A 503 of ack=committed with LSNs: the rows are durable, not to be sent again.
        if reply.status.is_success() || reply.body.get("first_lsn").is_some() {
            return Outcome::Stored(reply, started.elapsed());
        }
        let retry_after = reply
            .headers
            .get(hyper::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        match retry_after {
            Some(seconds)
                if reply.status == StatusCode::SERVICE_UNAVAILABLE
                    && attempt < shared.delivery.retries =>
            {
                tokio::time::sleep(backoff(attempt, Some(Duration::from_secs(seconds)))).await;
                attempt += 1;
            }
            _ => return Outcome::Refused(reply),
        }
    }
}

/// The wait before retry number `attempt` (from 0): doubling from [`FIRST_BACKOFF`], at
/// least what the daemon asked for, at most [`MAX_BACKOFF`].
pub(super) fn backoff(attempt: u32, asked: Option<Duration>) -> Duration {
    let doubling = FIRST_BACKOFF.saturating_mul(1 << attempt.min(16));
    doubling.max(asked.unwrap_or_default()).min(MAX_BACKOFF)
}
