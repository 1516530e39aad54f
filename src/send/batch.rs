//! Grouping rows into request bodies: a [`BatchBuilder`] cuts them by rows and by bytes; a
//! [`Batcher`] runs one on a blocking thread, [`gather`] on the async side, where a partial
//! batch also goes out once it has waited long enough.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::input::{RowSink, SendingStopped};

/// The default limit of a request body, in bytes (`--max-request-bytes`): half the
/// daemon's default `[ingest] max_body_bytes` (16 MiB).
pub const DEFAULT_MAX_REQUEST_BYTES: u64 = 8 << 20;

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
    /// The number of the batch's last row in its input, from 1.
    pub fn last_row(&self) -> u64 {
        self.first_row + self.rows.saturating_sub(1)
    }

    /// The daemon's `error`, with the row it names at its start (`line 5: ...` of an NDJSON
    /// body, `row at index 4: ...` of an array) given as the row's number in the input.
    pub(super) fn input_position(&self, error: &str) -> String {
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
    pub(super) fn rows_label(&self) -> String {
        if self.rows == 1 {
            format!("row {}", self.first_row)
        } else {
            format!("rows {}-{}", self.first_row, self.last_row())
        }
    }
}

/// How a [`BatchBuilder`] frames rows into a body.
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
    /// Input bytes, as counted by [`CountingReader`](super::CountingReader)s sharing this
    /// counter.
    Bytes(Arc<AtomicU64>),
}

/// Groups rows of one table into [`Batch`]es of up to `max_rows` rows and `max_bytes`
/// bytes of body. A row that would take the body over `max_bytes` starts the next batch;
/// a row larger than `max_bytes` is thus alone in its batch. Memory: one batch, plus the
/// row being added.
#[derive(Debug)]
pub struct BatchBuilder {
    table: Arc<str>,
    max_rows: u64,
    max_bytes: u64,
    layout: Layout,
    unit: ProgressUnit,
    body: Vec<u8>,
    rows: u64,
    rows_before: u64,
    bytes_before: u64,
}

impl BatchBuilder {
    /// A builder of batches of rows of `table` (`name` or `schema.name`); `max_rows` is at
    /// least 1.
    pub fn new(
        table: &str,
        max_rows: u64,
        max_bytes: u64,
        layout: Layout,
        unit: ProgressUnit,
    ) -> BatchBuilder {
        let bytes_before = match &unit {
            ProgressUnit::Rows => 0,
            ProgressUnit::Bytes(counter) => counter.load(Ordering::Relaxed),
        };
        BatchBuilder {
            table: Arc::from(table),
            max_rows: max_rows.max(1),
            max_bytes,
            layout,
            unit,
            body: Vec::new(),
            rows: 0,
            rows_before: 0,
            bytes_before,
        }
    }

    /// Adds one row, given as its JSON text. Returns the batch it completes, or else the
    /// batch cut before it because the row would take its body over the byte limit.
    pub fn push(&mut self, row: &[u8]) -> Option<Batch> {
        // A row adds its text and one byte: a newline, or a comma (or the opening bracket,
        // with the closing one counted in `body_len`).
        let too_big = self.body_len() + row.len() as u64 + 1 > self.max_bytes;
        let cut = if self.rows > 0 && too_big {
            self.take()
        } else {
            None
        };
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
        // With a cut, the new batch holds this one row, and `max_rows` is above 1.
        if self.rows == self.max_rows {
            return self.take();
        }
        cut
    }

    /// Takes the batch being filled, if it holds any row.
    pub fn take(&mut self) -> Option<Batch> {
        if self.rows == 0 {
            return None;
        }
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
        Some(batch)
    }

    /// Rows added so far.
    pub fn rows_read(&self) -> u64 {
        self.rows_before + self.rows
    }

    /// The body's length once taken (with the closing bracket of an array).
    fn body_len(&self) -> u64 {
        let closing = u64::from(self.layout == Layout::JsonArray && self.rows > 0);
        self.body.len() as u64 + closing
    }
}

/// A [`BatchBuilder`] on a blocking thread, sending each batch into a channel as it is
/// complete and waiting while the channel is full; batches hold up to
/// [`DEFAULT_MAX_REQUEST_BYTES`].
#[derive(Debug)]
pub struct Batcher {
    builder: BatchBuilder,
    batches: mpsc::Sender<Batch>,
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
        Batcher {
            builder: BatchBuilder::new(
                table,
                rows_per_request,
                DEFAULT_MAX_REQUEST_BYTES,
                layout,
                unit,
            ),
            batches,
        }
    }

    /// Sends the last, partial batch, if any.
    ///
    /// # Errors
    /// [`SendingStopped`] when the channel's receiver is gone.
    pub fn finish(&mut self) -> anyhow::Result<()> {
        self.builder.take().map_or(Ok(()), |batch| self.send(batch))
    }

    fn send(&self, batch: Batch) -> anyhow::Result<()> {
        self.batches
            .blocking_send(batch)
            .map_err(|_| anyhow::Error::new(SendingStopped))
    }
}

impl RowSink for Batcher {
    fn push(&mut self, row: &[u8]) -> anyhow::Result<()> {
        self.builder
            .push(row)
            .map_or(Ok(()), |batch| self.send(batch))
    }
}

/// What [`gather`] did.
#[derive(Debug, Default)]
pub struct Gathered {
    /// Rows taken from the reader: each is in a batch handed over, or in `unsent`.
    pub rows_read: u64,
    /// Batches that could not be handed over: sending had stopped.
    pub unsent: Vec<Batch>,
}

/// Takes rows from `rows` (sent by a reader on a blocking thread) into `builder`, and hands
/// each batch to `batches` once it is full, or once `max_wait` has passed since its first
/// row while no further row is ready: a slow stream is sent as it comes.
///
/// Ends once `rows` is closed and empty. When `interrupted` is cancelled, it stops taking
/// rows from the reader (whose next send fails), and batches and hands over those it had
/// already received. When `batches` is closed (sending stopped), the rest becomes
/// [`Gathered::unsent`].
pub async fn gather(
    mut rows: mpsc::Receiver<Vec<u8>>,
    mut builder: BatchBuilder,
    max_wait: Duration,
    batches: mpsc::Sender<Batch>,
    interrupted: CancellationToken,
) -> Gathered {
    let mut unsent = Vec::new();
    // When the batch being filled is due: `max_wait` after its first row.
    let mut deadline: Option<Instant> = None;
    loop {
        let batch = tokio::select! {
            biased;
            () = interrupted.cancelled(), if !rows.is_closed() => {
                rows.close();
                continue;
            }
            row = rows.recv() => {
                let Some(row) = row else { break };
                let full = builder.push(&row);
                if full.is_some() {
                    deadline = None;
                }
                if builder.rows > 0 && deadline.is_none() {
                    deadline = Some(Instant::now() + max_wait);
                }
                full
            }
            () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)),
                if deadline.is_some() =>
            {
                deadline = None;
                builder.take()
            }
        };
        if let Some(batch) = batch {
            hand(&batches, batch, &mut rows, &mut unsent).await;
        }
    }
    if let Some(batch) = builder.take() {
        hand(&batches, batch, &mut rows, &mut unsent).await;
    }
    Gathered {
        rows_read: builder.rows_read(),
        unsent,
    }
}

/// Hands `batch` over; once that fails, keeps it in `unsent` and stops taking rows.
async fn hand(
    batches: &mpsc::Sender<Batch>,
    batch: Batch,
    rows: &mut mpsc::Receiver<Vec<u8>>,
    unsent: &mut Vec<Batch>,
) {
    if let Err(mpsc::error::SendError(batch)) = batches.send(batch).await {
        unsent.push(batch);
        rows.close();
    }
}
