//! Reading rows: the input formats, decompression and the byte order mark.

use std::io::{self, BufRead, BufReader, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use flate2::bufread::MultiGzDecoder;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde_json::value::RawValue;
use tokio::sync::mpsc;

/// Size of the buffer between the input and the readers.
const READ_BUFFER: usize = 64 * 1024;
/// The two bytes every gzip stream starts with.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// The UTF-8 byte order mark some tools write at the start of a text file.
const BOM: [u8; 3] = [0xef, 0xbb, 0xbf];

/// Where a reader puts the rows it reads, one at a time.
pub trait RowSink {
    /// Takes one row, given as its JSON text.
    ///
    /// # Errors
    /// [`SendingStopped`] when the rows can no longer be sent.
    fn push(&mut self, row: &[u8]) -> anyhow::Result<()>;
}

/// Rows for [`gather`](super::gather), from a blocking thread: waits while the channel is
/// full.
impl RowSink for mpsc::Sender<Vec<u8>> {
    fn push(&mut self, row: &[u8]) -> anyhow::Result<()> {
        self.blocking_send(row.to_vec())
            .map_err(|_| anyhow::Error::new(SendingStopped))
    }
}

/// The rows are no longer taken (sending stopped because the daemon cannot be reached, or
/// `send` was interrupted): reading the input further is pointless.
#[derive(Debug, thiserror::Error)]
#[error("sending stopped before the input was read to its end")]
pub struct SendingStopped;

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

/// Skips a UTF-8 byte order mark at the start of `input`, whatever the format.
///
/// # Errors
/// When the input cannot be read.
pub fn skip_bom(mut input: Box<dyn BufRead + Send>) -> io::Result<Box<dyn BufRead + Send>> {
    // Byte by byte as they come: a pipe may deliver the mark in pieces.
    let mut start = Vec::with_capacity(BOM.len());
    while start.len() < BOM.len() && BOM.starts_with(&start) {
        let Some(&byte) = input.fill_buf()?.first() else {
            break;
        };
        start.push(byte);
        input.consume(1);
    }
    if start == BOM {
        Ok(input)
    } else {
        Ok(Box::new(io::Cursor::new(start).chain(input)))
    }
}

/// Reads NDJSON rows, one per line, into `rows`; blank lines are skipped, and each line is
/// sent as it is (the daemon checks it).
///
/// # Errors
/// When the input cannot be read, or [`SendingStopped`].
pub fn read_ndjson(mut input: impl BufRead, rows: &mut impl RowSink) -> anyhow::Result<()> {
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
            rows.push(row)?;
        }
    }
}

/// Reads JSON rows into `rows`: the elements of a top-level array, streamed one at a time,
/// or else JSON values one after another. Each row is sent as its text (the daemon checks
/// that it is an object).
///
/// # Errors
/// When the input cannot be read or is not JSON (with the line and column), or
/// [`SendingStopped`].
pub fn read_json(mut input: impl BufRead, rows: &mut impl RowSink) -> anyhow::Result<()> {
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
            rows.push(value.get().as_bytes())?;
        }
        return Ok(());
    }
    let mut deserializer = serde_json::Deserializer::from_reader(input);
    let mut stopped = None;
    let streamed = deserializer.deserialize_seq(ArrayRows {
        rows,
        stopped: &mut stopped,
    });
    if let Some(error) = stopped {
        return Err(error);
    }
    streamed
        .and_then(|()| deserializer.end())
        .context("the JSON input is malformed")
}

/// Streams the elements of a JSON array into a [`RowSink`], one at a time.
struct ArrayRows<'a, S> {
    rows: &'a mut S,
    /// The sink's error, which serde can only carry as text.
    stopped: &'a mut Option<anyhow::Error>,
}

impl<'de, S: RowSink> Visitor<'de> for ArrayRows<'_, S> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON array of rows")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(row) = seq.next_element::<Box<RawValue>>()? {
            if let Err(e) = self.rows.push(row.get().as_bytes()) {
                *self.stopped = Some(e);
                return Err(de::Error::custom("stopped"));
            }
        }
        Ok(())
    }
}

/// Reads CSV rows into `rows` as NDJSON objects: the first record names the columns, each
/// field becomes a JSON string (the column type's input parses it, as COPY would), and a
/// field equal to `null`, quoted or not, becomes JSON `null`.
///
/// # Errors
/// When the input cannot be read, is not UTF-8, has no header, names a column twice, or
/// a record has a different number of fields than the header (with its line), or
/// [`SendingStopped`].
pub fn read_csv(input: impl Read, null: &str, rows: &mut impl RowSink) -> anyhow::Result<()> {
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
        rows.push(&row)?;
    }
    Ok(())
}
