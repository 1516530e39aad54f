//! Reading rows: the input formats, and batching them into request bodies.

use std::io::{self, BufRead, BufReader, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use bytes::Bytes;
use flate2::bufread::MultiGzDecoder;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde_json::value::RawValue;
use tokio::sync::mpsc;

/// Size of the buffer between the input and the readers.
const READ_BUFFER: usize = 64 * 1024;
/// The two bytes every gzip stream starts with.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

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

/// The [`deliver`](super::deliver) side is gone (it stopped because the daemon cannot be reached): reading
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
