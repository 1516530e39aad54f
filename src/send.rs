//! `pgspool send`: the command-line client. It streams rows from a file or stdin to the
//! daemon's socket in batches, over several concurrent connections, and tells what landed.
//!
//! Three parts, each usable alone (`pgspool demo` uses the last two):
//! - readers ([`read_ndjson`], [`read_json`], [`read_csv`]) turn an input into rows, with
//!   bounded memory: one line, one array element or one CSV record at a time;
//! - a [`Batcher`] groups rows into request bodies of up to `rows_per_request` rows and
//!   hands them to a bounded channel, so reading waits while the connections are busy;
//! - [`deliver`] posts the batches from that channel over `clients` connections, retries a
//!   503 that kept nothing (`Retry-After`: the WAL is full, the daemon is stopping) with
//!   backoff, and tallies acknowledged and failed rows in a [`Report`].
//!
//! Nothing is sent twice: a request is repeated only when the daemon answered that it kept
//! nothing of it. A request that got no answer (the connection broke) is counted as failed,
//! since its rows may have been stored, and sending them again could store them twice.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use flate2::bufread::MultiGzDecoder;
use hyper::StatusCode;
use indicatif::{ProgressBar, ProgressStyle};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde_json::value::RawValue;
use tokio::sync::{Mutex, mpsc};

use crate::cli::SendArgs;
use crate::client::{Reply, SpoolClient};

/// Exit code when some rows were not acknowledged: a batch was refused or got no answer,
/// or the input could not be read to its end.
pub const EXIT_FAILED: u8 = 1;
/// Exit code when the daemon cannot be reached at all (nothing was sent).
pub const EXIT_UNREACHABLE: u8 = 2;
/// How many failure messages are printed; the rest are counted.
pub const MAX_PRINTED_FAILURES: usize = 10;
/// Retries of a request the daemon answered with 503 and `Retry-After` (or of a
/// connection that cannot be made) before it counts as failed, by default.
pub const DEFAULT_RETRIES: u32 = 8;

/// Size of the buffer between the input and the readers.
const READ_BUFFER: usize = 64 * 1024;
/// First wait before a retry; it doubles with each retry.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Longest wait before a retry.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A connection idle this long is replaced before it is used: the daemon closes one idle
/// for 30 s, possibly just as a request is written to it.
const IDLE_RECONNECT: Duration = Duration::from_secs(20);
/// The two bytes every gzip stream starts with.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// How the input is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InputFormat {
    /// One JSON object per line; blank lines are skipped.
    Ndjson,
    /// A JSON array of objects, or JSON objects one after another (pretty-printed or not).
    Json,
    /// CSV (RFC 4180) whose first record names the columns.
    Csv,
}

impl InputFormat {
    /// The format a file name implies, by its extension (after a final `.gz`): `.ndjson`
    /// and `.jsonl` NDJSON, `.json` JSON, `.csv` CSV; `None` for any other name.
    pub fn from_path(path: &Path) -> Option<InputFormat> {
        let name = path.file_name()?.to_str()?.to_ascii_lowercase();
        let name = name.strip_suffix(".gz").unwrap_or(&name);
        let extension = name.rsplit_once('.')?.1;
        match extension {
            "ndjson" | "jsonl" => Some(InputFormat::Ndjson),
            "json" => Some(InputFormat::Json),
            "csv" => Some(InputFormat::Csv),
            _ => None,
        }
    }
}

/// When the daemon answers a request (its `ack` query parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AckLevel {
    /// Once the rows are fdatasync'd in the daemon's WAL.
    Durable,
    /// Once PostgreSQL holds every row (in its table or in pgspool.dead_letters).
    Committed,
    /// Once the rows are written to the WAL, before its fdatasync.
    None,
}

/// What the daemon does with a row it cannot store (its `invalid` query parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InvalidRows {
    /// Refuse the whole request (the batch fails).
    Reject,
    /// Keep the row in pgspool.dead_letters and store the others.
    #[value(name = "dead_letter")]
    DeadLetter,
}

/// One request's worth of rows.
#[derive(Debug, Clone)]
pub struct Batch {
    /// The table, as the daemon takes it (`name` or `schema.name`).
    pub table: Arc<str>,
    /// The number of the batch's first row in its input, from 1.
    pub first_row: u64,
    /// How many rows the body holds.
    pub rows: u64,
    /// `application/x-ndjson` or `application/json`.
    pub content_type: &'static str,
    /// The request body.
    pub body: Bytes,
    /// How far the progress bar moves once the batch is done (rows, or input bytes).
    pub progress: u64,
}

impl Batch {
    /// The daemon's `error`, with the row it names at its start (`line 5: ...` of an NDJSON
    /// body, `row at index 4: ...` of an array) given as the row's number in the input.
    fn input_position(&self, error: &str) -> String {
        let prefix = match self.content_type {
            "application/json" => "row at index ",
            _ => "line ",
        };
        let named = error.strip_prefix(prefix).and_then(|rest| {
            let (number, reason) = rest.split_once(": ")?;
            let number: u64 = number.parse().ok()?;
            let offset = if prefix == "line " {
                number.checked_sub(1)?
            } else {
                number
            };
            Some(format!("row {}: {reason}", self.first_row + offset))
        });
        named.unwrap_or_else(|| error.to_string())
    }

    /// The input rows the batch holds, for messages: `rows 1001-2000`.
    fn rows_label(&self) -> String {
        let last = self.first_row + self.rows.saturating_sub(1);
        if self.rows == 1 {
            format!("row {}", self.first_row)
        } else {
            format!("rows {}-{last}", self.first_row)
        }
    }
}

/// How a [`Batcher`] frames rows into a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One row per line (each row's text must be a single line).
    Ndjson,
    /// A JSON array (rows may span lines).
    JsonArray,
}

/// What a [`Batch`]'s `progress` counts.
#[derive(Debug, Clone)]
pub enum ProgressUnit {
    /// Rows.
    Rows,
    /// Input bytes, as counted by [`CountingReader`]s sharing this counter.
    Bytes(Arc<AtomicU64>),
}

/// The [`deliver`] side is gone (it stopped because the daemon cannot be reached): reading
/// the input further is pointless.
#[derive(Debug, thiserror::Error)]
#[error("sending stopped before the input was read to its end")]
pub struct SendingStopped;

/// Groups rows of one table into [`Batch`]es of up to `rows_per_request` rows and sends
/// them into a channel, waiting while it is full. Blocking: use it on a blocking thread.
#[derive(Debug)]
pub struct Batcher {
    table: Arc<str>,
    rows_per_request: u64,
    layout: Layout,
    unit: ProgressUnit,
    batches: mpsc::Sender<Batch>,
    body: Vec<u8>,
    rows: u64,
    rows_before: u64,
    bytes_before: u64,
}

impl Batcher {
    /// A batcher for rows of `table` (`name` or `schema.name`), sending into `batches`.
    /// `rows_per_request` is at least 1.
    pub fn new(
        table: &str,
        rows_per_request: u64,
        layout: Layout,
        unit: ProgressUnit,
        batches: mpsc::Sender<Batch>,
    ) -> Batcher {
        let bytes_before = match &unit {
            ProgressUnit::Rows => 0,
            ProgressUnit::Bytes(counter) => counter.load(Ordering::Relaxed),
        };
        Batcher {
            table: Arc::from(table),
            rows_per_request: rows_per_request.max(1),
            layout,
            unit,
            batches,
            body: Vec::new(),
            rows: 0,
            rows_before: 0,
            bytes_before,
        }
    }

    /// Adds one row, given as its JSON text, and sends the batch once it is full.
    ///
    /// # Errors
    /// [`SendingStopped`] when the channel's receiver is gone.
    pub fn push(&mut self, row: &[u8]) -> anyhow::Result<()> {
        match (self.layout, self.rows) {
            (Layout::JsonArray, 0) => self.body.push(b'['),
            (Layout::JsonArray, _) => self.body.push(b','),
            (Layout::Ndjson, _) => {}
        }
        self.body.extend_from_slice(row);
        if self.layout == Layout::Ndjson {
            self.body.push(b'\n');
        }
        self.rows += 1;
        if self.rows == self.rows_per_request {
            self.send()?;
        }
        Ok(())
    }

    /// Sends the last, partial batch, if any.
    ///
    /// # Errors
    /// [`SendingStopped`] when the channel's receiver is gone.
    pub fn finish(&mut self) -> anyhow::Result<()> {
        if self.rows > 0 {
            self.send()?;
        }
        Ok(())
    }

    /// Rows pushed so far.
    pub fn rows_read(&self) -> u64 {
        self.rows_before + self.rows
    }

    fn send(&mut self) -> anyhow::Result<()> {
        if self.layout == Layout::JsonArray {
            self.body.push(b']');
        }
        let progress = match &self.unit {
            ProgressUnit::Rows => self.rows,
            ProgressUnit::Bytes(counter) => {
                let now = counter.load(Ordering::Relaxed);
                now - std::mem::replace(&mut self.bytes_before, now)
            }
        };
        let batch = Batch {
            table: Arc::clone(&self.table),
            first_row: self.rows_before + 1,
            rows: self.rows,
            content_type: match self.layout {
                Layout::Ndjson => "application/x-ndjson",
                Layout::JsonArray => "application/json",
            },
            body: Bytes::from(std::mem::take(&mut self.body)),
            progress,
        };
        self.rows_before += std::mem::take(&mut self.rows);
        self.batches
            .blocking_send(batch)
            .map_err(|_| anyhow::Error::new(SendingStopped))
    }
}

/// A reader that adds the bytes it reads to a shared counter, for progress by bytes.
#[derive(Debug)]
pub struct CountingReader<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R> CountingReader<R> {
    /// Counts what is read from `inner` into `count`.
    pub fn new(inner: R, count: Arc<AtomicU64>) -> CountingReader<R> {
        CountingReader { inner, count }
    }
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Wraps `input` in a buffer, decompressing it if it is gzip (by its first bytes).
///
/// # Errors
/// When the input cannot be read.
pub fn maybe_gunzip(input: impl Read + Send + 'static) -> io::Result<Box<dyn BufRead + Send>> {
    let mut buffered = BufReader::with_capacity(READ_BUFFER, input);
    // A gzip stream is at least 18 bytes: fill_buf returns both magic bytes unless the
    // input is shorter, or arrives one byte at a time (then it is taken as not gzip).
    if buffered.fill_buf()?.starts_with(&GZIP_MAGIC) {
        Ok(Box::new(BufReader::with_capacity(
            READ_BUFFER,
            MultiGzDecoder::new(buffered),
        )))
    } else {
        Ok(Box::new(buffered))
    }
}

/// Reads NDJSON rows, one per line, into `batcher`; blank lines are skipped, and each line
/// is sent as it is (the daemon checks it). Does not call [`Batcher::finish`].
///
/// # Errors
/// When the input cannot be read, or [`SendingStopped`].
pub fn read_ndjson(mut input: impl BufRead, batcher: &mut Batcher) -> anyhow::Result<()> {
    let mut line = Vec::new();
    let mut number = 0u64;
    loop {
        line.clear();
        number += 1;
        let read = input
            .read_until(b'\n', &mut line)
            .with_context(|| format!("reading line {number}"))?;
        if read == 0 {
            return Ok(());
        }
        let row = line.trim_ascii();
        if !row.is_empty() {
            batcher.push(row)?;
        }
    }
}

/// Reads JSON rows into `batcher`: the elements of a top-level array, streamed one at a
/// time, or else JSON values one after another. Each row is sent as its text (the daemon
/// checks that it is an object). Does not call [`Batcher::finish`].
///
/// # Errors
/// When the input cannot be read or is not JSON (with the line and column), or
/// [`SendingStopped`].
pub fn read_json(mut input: impl BufRead, batcher: &mut Batcher) -> anyhow::Result<()> {
    let is_array = loop {
        let buffer = input.fill_buf().context("reading the input")?;
        if buffer.is_empty() {
            return Ok(());
        }
        match buffer.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(start) => {
                let first = buffer[start];
                input.consume(start);
                break first == b'[';
            }
            None => {
                let all = buffer.len();
                input.consume(all);
            }
        }
    };
    if !is_array {
        let values = serde_json::Deserializer::from_reader(input).into_iter::<Box<RawValue>>();
        for value in values {
            let value = value.context("the JSON input is malformed")?;
            batcher.push(value.get().as_bytes())?;
        }
        return Ok(());
    }
    let mut deserializer = serde_json::Deserializer::from_reader(input);
    let mut stopped = None;
    let streamed = deserializer.deserialize_seq(ArrayRows {
        batcher,
        stopped: &mut stopped,
    });
    if let Some(error) = stopped {
        return Err(error);
    }
    streamed
        .and_then(|()| deserializer.end())
        .context("the JSON input is malformed")
}

/// Streams the elements of a JSON array into a [`Batcher`], one at a time.
struct ArrayRows<'a> {
    batcher: &'a mut Batcher,
    /// The batcher's error, which serde can only carry as text.
    stopped: &'a mut Option<anyhow::Error>,
}

impl<'de> Visitor<'de> for ArrayRows<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON array of rows")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(row) = seq.next_element::<Box<RawValue>>()? {
            if let Err(e) = self.batcher.push(row.get().as_bytes()) {
                *self.stopped = Some(e);
                return Err(de::Error::custom("stopped"));
            }
        }
        Ok(())
    }
}

/// Reads CSV rows into `batcher` as NDJSON objects: the first record names the columns,
/// each field becomes a JSON string (the column type's input parses it, as COPY would),
/// and a field equal to `null`, quoted or not, becomes JSON `null`. Does not call
/// [`Batcher::finish`].
///
/// # Errors
/// When the input cannot be read, is not UTF-8, has no header, names a column twice, or
/// a record has a different number of fields than the header (with its line), or
/// [`SendingStopped`].
pub fn read_csv(input: impl Read, null: &str, batcher: &mut Batcher) -> anyhow::Result<()> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(input);
    let header = reader.headers().context("reading the CSV header")?.clone();
    if header.is_empty() {
        anyhow::bail!("the CSV input is empty: its first line must name the columns");
    }
    let mut keys = Vec::with_capacity(header.len());
    for (i, name) in header.iter().enumerate() {
        if header.iter().take(i).any(|earlier| earlier == name) {
            anyhow::bail!("the CSV header names column {name:?} twice");
        }
        keys.push(serde_json::to_vec(name)?);
    }
    let mut record = csv::StringRecord::new();
    let mut row = Vec::new();
    while reader.read_record(&mut record).context("reading CSV")? {
        row.clear();
        row.push(b'{');
        for (i, (key, field)) in keys.iter().zip(record.iter()).enumerate() {
            if i > 0 {
                row.push(b',');
            }
            row.extend_from_slice(key);
            row.push(b':');
            if field == null {
                row.extend_from_slice(b"null");
            } else {
                serde_json::to_writer(&mut row, field)?;
            }
        }
        row.push(b'}');
        batcher.push(&row)?;
    }
    Ok(())
}

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
/// [`Batcher`] then fails with [`SendingStopped`]) and [`Report::unreachable`] is set.
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
fn backoff(attempt: u32, asked: Option<Duration>) -> Duration {
    let doubling = FIRST_BACKOFF.saturating_mul(1 << attempt.min(16));
    doubling.max(asked.unwrap_or_default()).min(MAX_BACKOFF)
}

/// Runs `pgspool send`: reads the input, sends it, prints the summary (stdout) and the
/// failures (stderr), and returns the exit code: 0 every row acknowledged, 1 some were
/// not ([`EXIT_FAILED`]), 2 the daemon cannot be reached ([`EXIT_UNREACHABLE`]).
///
/// # Errors
/// When the input file cannot be opened.
pub async fn run(args: &SendArgs) -> anyhow::Result<ExitCode> {
    let path = args.input.as_deref().filter(|p| p.as_os_str() != "-");
    let format = args
        .format
        .or_else(|| path.and_then(InputFormat::from_path))
        .unwrap_or(InputFormat::Ndjson);
    let bytes_read = Arc::new(AtomicU64::new(0));
    let (raw, size): (Box<dyn Read + Send>, Option<u64>) = match path {
        Some(path) => {
            let file =
                File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            let size = file
                .metadata()
                .ok()
                .filter(|m| m.is_file())
                .map(|m| m.len());
            (Box::new(file), size)
        }
        None => (Box::new(io::stdin()), None),
    };
    if let Err(e) = SpoolClient::connect(&args.socket).await {
        eprintln!("pgspool: {e:#}; is the daemon running there? (--socket or PGSPOOL_SOCKET)");
        return Ok(ExitCode::from(EXIT_UNREACHABLE));
    }
    let (bar, unit) = match size {
        Some(size) => (
            ProgressBar::new(size).with_style(
                ProgressStyle::with_template(
                    "{bar:40} {binary_bytes}/{binary_total_bytes} sent ({elapsed}, {eta} left)",
                )
                .expect("the template is valid"),
            ),
            ProgressUnit::Bytes(Arc::clone(&bytes_read)),
        ),
        None => (
            ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template("{spinner} {pos} rows sent ({per_sec}, {elapsed})")
                    .expect("the template is valid"),
            ),
            ProgressUnit::Rows,
        ),
    };
    let delivery = Delivery {
        socket: args.socket.clone(),
        clients: usize::from(args.clients),
        ack: args.ack,
        invalid: args.invalid,
        retries: args.retries,
    };
    let (tx, rx) = mpsc::channel(delivery.clients * 2);
    let table = args.table.clone();
    let rows_per_request = u64::from(args.rows_per_request);
    let null = args.null.clone();
    let counter = Arc::clone(&bytes_read);
    let reader = tokio::task::spawn_blocking(move || {
        let layout = match format {
            InputFormat::Json => Layout::JsonArray,
            InputFormat::Ndjson | InputFormat::Csv => Layout::Ndjson,
        };
        let mut batcher = Batcher::new(&table, rows_per_request, layout, unit, tx);
        let read = maybe_gunzip(CountingReader::new(raw, counter))
            .context("reading the input")
            .and_then(|input| match format {
                InputFormat::Ndjson => read_ndjson(input, &mut batcher),
                InputFormat::Json => read_json(input, &mut batcher),
                InputFormat::Csv => read_csv(input, &null, &mut batcher),
            });
        // The rows read before an error in the input are sent too.
        let finished = match read {
            Err(e) if e.is::<SendingStopped>() => Err(e),
            read => batcher.finish().and(read),
        };
        (batcher.rows_read(), finished)
    });
    let report = deliver(&delivery, rx, &bar).await;
    let (rows_read, read) = reader.await.context("reading the input panicked")?;
    bar.finish_and_clear();
    let input_error = match read {
        Err(e) if !e.is::<SendingStopped>() => {
            eprintln!("pgspool: the input was not read to its end: {e:#}");
            Some(format!("{e:#}"))
        }
        _ => None,
    };
    print_summary(args, &report, rows_read, input_error.as_deref())?;
    let complete = report.batches_failed == 0 && input_error.is_none();
    Ok(if complete {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    })
}

/// Prints the summary: aligned lines, or one JSON object with `--json`.
fn print_summary(
    args: &SendArgs,
    report: &Report,
    rows_read: u64,
    input_error: Option<&str>,
) -> anyhow::Result<()> {
    let not_sent = rows_read.saturating_sub(report.rows_acknowledged + report.rows_failed);
    let ms = |q: f64| report.latency(q).as_secs_f64() * 1e3;
    if args.json {
        let summary = serde_json::json!({
            "table": args.table,
            "rows_read": rows_read,
            "rows_acknowledged": report.rows_acknowledged,
            "rows_failed": report.rows_failed,
            "rows_not_sent": not_sent,
            "rows_refused": report.rows_refused,
            "rows_committed": report.rows_committed,
            "rows_dead_lettered": report.rows_dead_lettered,
            "rows_not_committed": report.rows_not_committed,
            "batches_acknowledged": report.batches_acknowledged,
            "batches_failed": report.batches_failed,
            "seconds": report.elapsed.as_secs_f64(),
            "rows_per_second": report.rows_per_second(),
            "latency_p50_ms": ms(0.5),
            "latency_p99_ms": ms(0.99),
            "failures": report.failures,
            "input_error": input_error,
        });
        println!("{}", serde_json::to_string(&summary)?);
        return Ok(());
    }
    let mut lines = vec![
        ("rows read", rows_read.to_string()),
        (
            "acknowledged",
            format!(
                "{} rows in {} requests, {:.0} rows/s over {:.2} s; latency p50 {:.1} ms, \
                 p99 {:.1} ms",
                report.rows_acknowledged,
                report.batches_acknowledged,
                report.rows_per_second(),
                report.elapsed.as_secs_f64(),
                ms(0.5),
                ms(0.99)
            ),
        ),
        (
            "failed",
            format!(
                "{} rows in {} requests",
                report.rows_failed, report.batches_failed
            ),
        ),
    ];
    if report.failures.len() < report.batches_failed as usize {
        lines.push((
            "",
            format!(
                "(the first {} failures are printed above)",
                report.failures.len()
            ),
        ));
    }
    if not_sent > 0 {
        lines.push(("not sent", format!("{not_sent} rows")));
    }
    if args.invalid == InvalidRows::DeadLetter {
        lines.push((
            "dead letters",
            format!(
                "{} rows refused by pgspool, kept in pgspool.dead_letters",
                report.rows_refused
            ),
        ));
    }
    if args.ack == AckLevel::Committed {
        lines.push((
            "committed",
            format!(
                "{} rows in PostgreSQL, {} refused into pgspool.dead_letters, {} not yet",
                report.rows_committed, report.rows_dead_lettered, report.rows_not_committed
            ),
        ));
    }
    for (label, text) in lines {
        println!("{label:<13} {text}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `read` on a batcher of `rows_per_request` rows in `layout`, and returns the
    /// batches' bodies as text, or the error.
    fn batches(
        layout: Layout,
        rows_per_request: u64,
        read: impl FnOnce(&mut Batcher) -> anyhow::Result<()>,
    ) -> anyhow::Result<Vec<String>> {
        let (tx, mut rx) = mpsc::channel(1000);
        let mut batcher = Batcher::new("t", rows_per_request, layout, ProgressUnit::Rows, tx);
        read(&mut batcher)?;
        batcher.finish()?;
        drop(batcher);
        let mut bodies = Vec::new();
        while let Ok(batch) = rx.try_recv() {
            bodies.push(String::from_utf8(batch.body.to_vec())?);
        }
        Ok(bodies)
    }

    #[test]
    fn the_format_follows_the_extension() {
        let format = |name: &str| InputFormat::from_path(Path::new(name));
        assert_eq!(format("a/rows.ndjson"), Some(InputFormat::Ndjson));
        assert_eq!(format("rows.JSONL.gz"), Some(InputFormat::Ndjson));
        assert_eq!(format("rows.json"), Some(InputFormat::Json));
        assert_eq!(format("flights.csv.gz"), Some(InputFormat::Csv));
        assert_eq!(format("rows.txt"), None);
        assert_eq!(format("rows"), None);
        assert_eq!(format("-"), None);
    }

    #[test]
    fn ndjson_is_cut_into_batches_without_blank_lines() {
        let input = "{\"a\":1}\n\n  {\"a\":2}\r\n{\"a\":3}\n{\"a\":4}";
        let bodies = batches(Layout::Ndjson, 3, |b| read_ndjson(input.as_bytes(), b));
        assert_eq!(
            bodies.expect("read"),
            ["{\"a\":1}\n{\"a\":2}\n{\"a\":3}\n", "{\"a\":4}\n"]
        );
    }

    #[test]
    fn a_json_array_is_streamed_element_by_element() {
        let input = " \n[{\"a\": \"],[\"}, {\"b\": [1, {\"c\": null}]},\n {\"d\": 1e400}]\n";
        let bodies = batches(Layout::JsonArray, 2, |b| read_json(input.as_bytes(), b));
        assert_eq!(
            bodies.expect("read"),
            [
                "[{\"a\": \"],[\"},{\"b\": [1, {\"c\": null}]}]",
                "[{\"d\": 1e400}]"
            ]
        );
    }

    #[test]
    fn json_values_one_after_another_are_rows() {
        let input = "{\n  \"a\": 1\n}\n{\"a\": 2} {\"a\": 3}";
        let bodies = batches(Layout::JsonArray, 10, |b| read_json(input.as_bytes(), b));
        assert_eq!(
            bodies.expect("read"),
            ["[{\n  \"a\": 1\n},{\"a\": 2},{\"a\": 3}]"]
        );
    }

    #[test]
    fn malformed_json_is_an_error_after_the_rows_before_it() {
        let mut read = 0;
        let error = batches(Layout::JsonArray, 10, |b| {
            let result = read_json(&b"[{\"a\": 1}, {\"a\": ]"[..], b);
            read = b.rows_read();
            result
        })
        .expect_err("malformed");
        assert_eq!(read, 1);
        assert!(
            format!("{error:#}").contains("the JSON input is malformed"),
            "{error:#}"
        );
        let error = batches(Layout::JsonArray, 10, |b| read_json(&b"[{}] x"[..], b))
            .expect_err("trailing characters");
        assert!(format!("{error:#}").contains("trailing"), "{error:#}");
    }

    #[test]
    fn csv_fields_are_strings_and_the_null_marker_is_null() {
        let input = "id,\"odd \"\"name\"\"\"\n1,\"a, b\"\n2,\n3,\"\"\n4,NA\n";
        let with_empty_null = batches(Layout::Ndjson, 10, |b| read_csv(input.as_bytes(), "", b));
        assert_eq!(
            with_empty_null.expect("read"),
            ["{\"id\":\"1\",\"odd \\\"name\\\"\":\"a, b\"}\n\
              {\"id\":\"2\",\"odd \\\"name\\\"\":null}\n\
              {\"id\":\"3\",\"odd \\\"name\\\"\":null}\n\
              {\"id\":\"4\",\"odd \\\"name\\\"\":\"NA\"}\n"]
        );
        let with_na = batches(Layout::Ndjson, 10, |b| read_csv(input.as_bytes(), "NA", b));
        let with_na = with_na.expect("read").concat();
        assert!(
            with_na.contains("{\"id\":\"2\",\"odd \\\"name\\\"\":\"\"}"),
            "{with_na}"
        );
        assert!(
            with_na.contains("{\"id\":\"4\",\"odd \\\"name\\\"\":null}"),
            "{with_na}"
        );
    }

    #[test]
    fn a_csv_header_naming_a_column_twice_is_refused() {
        let error = batches(Layout::Ndjson, 10, |b| {
            read_csv(&b"a,b,a\n1,2,3\n"[..], "", b)
        })
        .expect_err("duplicate column");
        assert_eq!(error.to_string(), "the CSV header names column \"a\" twice");
    }

    #[test]
    fn gzip_is_recognised_by_its_first_bytes() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, b"{\"a\":1}\n").expect("gzip");
        let gz = gz.finish().expect("gzip");
        let mut text = String::new();
        maybe_gunzip(io::Cursor::new(gz))
            .expect("open")
            .read_to_string(&mut text)
            .expect("gunzip");
        assert_eq!(text, "{\"a\":1}\n");
        let mut plain = String::new();
        maybe_gunzip(io::Cursor::new(b"{}".to_vec()))
            .expect("open")
            .read_to_string(&mut plain)
            .expect("read");
        assert_eq!(plain, "{}");
    }

    #[test]
    fn the_daemons_row_is_named_by_its_place_in_the_input() {
        let batch = |content_type| Batch {
            table: Arc::from("t"),
            first_row: 1001,
            rows: 100,
            content_type,
            body: Bytes::new(),
            progress: 0,
        };
        let ndjson = batch("application/x-ndjson");
        assert_eq!(ndjson.input_position("line 5: bad"), "row 1005: bad");
        assert_eq!(
            ndjson.input_position("the body holds no rows"),
            "the body holds no rows"
        );
        let json = batch("application/json");
        assert_eq!(
            json.input_position("row at index 0: bad: x"),
            "row 1001: bad: x"
        );
        assert_eq!(json.rows_label(), "rows 1001-1100");
    }

    #[test]
    fn backoff_doubles_honours_retry_after_and_is_capped() {
        assert_eq!(backoff(0, None), Duration::from_millis(250));
        assert_eq!(backoff(2, None), Duration::from_secs(1));
        assert_eq!(
            backoff(0, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
        assert_eq!(backoff(40, None), MAX_BACKOFF);
        assert_eq!(backoff(0, Some(Duration::from_secs(600))), MAX_BACKOFF);
    }
}
