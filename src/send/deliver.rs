//! Posting batches over several connections, and retrying what the daemon kept nothing of.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use hyper::StatusCode;
use indicatif::ProgressBar;
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

use super::report::{Failure, Fate, Report};
use super::{AckLevel, Batch, InvalidRows};
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
    /// Not sent, or answered that nothing was kept, when sending was given up.
    Abandoned,
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
    abandon: CancellationToken,
    report: StdMutex<Report>,
    bar: ProgressBar,
}

/// Posts the batches that arrive on `batches` over `delivery.clients` connections until
/// the channel is closed and empty, moving `bar` by each batch's progress, and reports.
///
/// A batch refused (non-2xx) or without an answer counts as failed, and its message is
/// printed (the first [`MAX_PRINTED_FAILURES`](super::MAX_PRINTED_FAILURES)); the other batches go on. When no
/// connection can be made even after the retries, sending stops: the channel is closed (a
/// [`Batcher`](super::Batcher) then fails with [`SendingStopped`](super::SendingStopped)),
/// the batches left in it count as not sent, and [`Report::unreachable`] is set.
pub async fn deliver(
    delivery: &Delivery,
    batches: mpsc::Receiver<Batch>,
    bar: &ProgressBar,
) -> Report {
    deliver_until(delivery, batches, bar, CancellationToken::new()).await
}

/// [`deliver`], given up once `abandon` is cancelled: requests waiting for their answer
/// count as failed without one, and the batches not sent yet (or waiting to be sent again)
/// as not sent.
pub async fn deliver_until(
    delivery: &Delivery,
    batches: mpsc::Receiver<Batch>,
    bar: &ProgressBar,
    abandon: CancellationToken,
) -> Report {
    let shared = Arc::new(Shared {
        query: delivery.query(),
        delivery: delivery.clone(),
        batches: Mutex::new(batches),
        stop: AtomicBool::new(false),
        abandon,
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
    // Sending stopped or was given up: what is left was never sent.
    let mut left = shared.batches.lock().await;
    left.close();
    while let Some(batch) = left.recv().await {
        let why = if report.unreachable {
            "not sent: sending stopped (the daemon cannot be reached)"
        } else {
            "not sent: interrupted"
        };
        report.not_sent(&batch, why);
    }
    report.elapsed = started.elapsed();
    report
}

async fn work(shared: Arc<Shared>) {
    let mut connection = None;
    loop {
        let next = tokio::select! {
            biased;
            () = shared.abandon.cancelled() => None,
            batch = async { shared.batches.lock().await.recv().await } => batch,
        };
        let Some(batch) = next else {
            return;
        };
        if shared.stop.load(Ordering::Relaxed) {
            shared.report.lock().expect("lock poisoned").not_sent(
                &batch,
                "not sent: sending stopped (the daemon cannot be reached)",
            );
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
    let rows = batch.rows_label();
    let table = &batch.table;
    match outcome {
        Outcome::Stored(reply, latency) => {
            report.stored(&shared.bar, batch, &reply);
            report.latencies.push(latency);
        }
        Outcome::Refused(reply) => {
            let mut error = reply
                .body
                .get("error")
                .and_then(|e| e.as_str())
                .map_or_else(|| reply.body.to_string(), |e| batch.input_position(e));
            if reply.status == StatusCode::PAYLOAD_TOO_LARGE {
                error = if batch.rows == 1 {
                    format!(
                        "the row is too large: its {} bytes are more than the daemon takes \
                         in one request ([ingest] max_body_bytes, or one WAL record once \
                         encoded); it cannot be sent",
                        batch.body.len()
                    )
                } else {
                    format!("{error} (lower --max-request-bytes below the daemon's limit)")
                };
            }
            let status = reply.status;
            let message = format!("{rows} of {table} refused ({status}): {error}");
            let failure = Failure::new(batch, Fate::Refused, Some(status.as_u16()), error);
            report.fail(&shared.bar, batch, failure, &message);
        }
        Outcome::NoAnswer(e) => {
            let message = format!(
                "{rows} of {table} got no answer ({e:#}): they may or may not have been \
                 stored (each at most once); check the table before sending them again"
            );
            let failure = Failure::new(batch, Fate::NoAnswer, None, format!("{e:#}"));
            report.fail(&shared.bar, batch, failure, &message);
        }
        Outcome::Unreachable(e) => {
            let error = format!("{e:#}");
            shared.bar.suspend(|| {
                eprintln!("pgspool: {rows} of {table} not sent, and sending stops: {error}");
            });
            report.not_sent(batch, &format!("not sent: {error}"));
            report.unreachable = true;
            shared.stop.store(true, Ordering::Relaxed);
        }
        Outcome::Abandoned => report.not_sent(batch, "not sent: interrupted"),
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
                    if !pause(shared, backoff(attempt, None)).await {
                        return Outcome::Abandoned;
                    }
                    attempt += 1;
                    continue;
                }
                Err(e) => return Outcome::Unreachable(e),
            },
        };
        let answer = tokio::select! {
            answer = client.client.post_rows_with(
                &batch.table,
                &shared.query,
                batch.content_type,
                batch.body.clone(),
            ) => answer,
            () = shared.abandon.cancelled() => {
                Err(anyhow::anyhow!("interrupted before the daemon answered"))
            }
        };
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
                if !pause(shared, backoff(attempt, Some(Duration::from_secs(seconds)))).await {
                    return Outcome::Abandoned;
                }
                attempt += 1;
            }
            _ => return Outcome::Refused(reply),
        }
    }
}

/// Waits `wait` before a retry; false when sending is given up meanwhile.
async fn pause(shared: &Shared, wait: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(wait) => true,
        () = shared.abandon.cancelled() => false,
    }
}

/// The wait before retry number `attempt` (from 0): doubling from [`FIRST_BACKOFF`], at
/// least what the daemon asked for, at most [`MAX_BACKOFF`].
pub(super) fn backoff(attempt: u32, asked: Option<Duration>) -> Duration {
    let doubling = FIRST_BACKOFF.saturating_mul(1 << attempt.min(16));
    doubling.max(asked.unwrap_or_default()).min(MAX_BACKOFF)
}
