//! The `[ingest]` limits on a request's body and rows: reading the body within
//! `max_body_bytes`, `body_timeout` and the daemon-wide `max_buffered_bytes`, then checking
//! its rows against `max_rows_per_request`, `max_row_bytes`, `max_columns` and
//! `max_depth`. Each refusal names its limit and key, and is counted in
//! `pgspool_requests_refused_total`. (The limits on connections and request heads are
//! [`super::serve`]'s.)

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::CONTENT_LENGTH;
use hyper::{Request, StatusCode};

use super::handler::Refusal;
use crate::config::IngestConfig;
use crate::metrics::{Metrics, RequestRefusal};
use crate::rows::{Parsed, RowPosition};

/// How long the body of a request refused before it was read is read and dropped.
const DISCARD_TIMEOUT: Duration = Duration::from_secs(5);

/// A body declared larger than `[ingest] max_body_bytes`, up to this many times it, is
/// read and dropped before the 413.
const DISCARD_FACTOR: u64 = 4;

/// The bytes of each body not counted against `[ingest] max_buffered_bytes`: small
/// requests are never refused for it (and these bytes are bounded by `[ingest]
/// max_connections`).
pub const UNCOUNTED_BODY_BYTES: u64 = 64 << 10;

/// The bytes of request bodies held in memory, all connections together, beyond
/// [`UNCOUNTED_BODY_BYTES`] of each.
#[derive(Debug, Default)]
pub struct Buffered(AtomicU64);

/// A body's share of [`Buffered`], given back when dropped.
#[derive(Debug)]
pub struct Held<'a> {
    buffered: &'a Buffered,
    bytes: u64,
}

impl Held<'_> {
    /// Takes `bytes` more if the total stays within `max`.
    fn grow(&mut self, bytes: u64, max: u64) -> bool {
        let total = self.buffered.0.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if total > max {
            self.buffered.0.fetch_sub(bytes, Ordering::Relaxed);
            return false;
        }
        self.bytes += bytes;
        true
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.buffered.0.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// The refusal for `reason`, counted.
fn refuse(
    metrics: &Metrics,
    reason: RequestRefusal,
    status: StatusCode,
    message: String,
) -> Refusal {
    metrics.request_refused(reason);
    Refusal::new(status, message)
}

/// Reads a request's body within the limits of `limits`, holding its bytes in `buffered`
/// until the [`Held`] share is dropped (after the rows are appended).
///
/// # Errors
/// 413 for a body over `max_body_bytes` (one declared larger is not read, but for up to
/// a few times the limit, read and dropped so that the client reads the answer); 408 when
/// it takes over `body_timeout`; 503 when bodies in memory would pass
/// `max_buffered_bytes`; 400 when reading fails.
pub(super) async fn read_body<'b>(
    request: Request<Incoming>,
    limits: &IngestConfig,
    buffered: &'b Buffered,
    metrics: &Metrics,
) -> Result<(Bytes, Held<'b>), Refusal> {
    let max = limits.max_body_bytes;
    let too_large = || {
        refuse(
            metrics,
            RequestRefusal::BodyTooLarge,
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the body is larger than the limit of {max} bytes ([ingest] max_body_bytes); \
                 send fewer rows per request"
            ),
        )
    };
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(declared) = declared.filter(|&n| n > max) {
        if declared <= DISCARD_FACTOR * max {
            discard_body(request, declared).await;
        }
        return Err(too_large());
    }
    let mut held = Held { buffered, bytes: 0 };
    let first = declared.unwrap_or(0).min(UNCOUNTED_BODY_BYTES);
    let mut body = Vec::with_capacity(usize::try_from(first).unwrap_or(0));
    let mut incoming = request.into_body();
    let deadline = tokio::time::Instant::now() + limits.body_timeout;
    loop {
        let frame = match tokio::time::timeout_at(deadline, incoming.frame()).await {
            Err(_) => {
                return Err(refuse(
                    metrics,
                    RequestRefusal::BodyTimeout,
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the body was not received within {:?} ([ingest] body_timeout): {} \
                         bytes came; send it faster, or in smaller requests",
                        limits.body_timeout,
                        body.len()
                    ),
                ));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    format!("reading the body failed: {e}"),
                ));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Some(data) = frame.data_ref() else {
            continue;
        };
        let needed = (body.len() + data.len()) as u64;
        if needed > max {
            return Err(too_large());
        }
        if needed > body.capacity() as u64 {
            // Grown by doubling, as a Vec would, but counted first.
            let capacity = needed.max((2 * body.capacity() as u64).min(max));
            let counted = |c: u64| c.saturating_sub(UNCOUNTED_BODY_BYTES);
            if !held.grow(
                counted(capacity) - counted(body.capacity() as u64),
                limits.max_buffered_bytes,
            ) {
                drop(body);
                let refusal = refuse(
                    metrics,
                    RequestRefusal::BuffersFull,
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "request bodies held in memory would pass [ingest] max_buffered_bytes \
                         = {} bytes with this one: nothing of this request was kept; retry later",
                        limits.max_buffered_bytes
                    ),
                );
                discard(&mut incoming, max).await;
                return Err(refusal);
            }
            body.reserve_exact(usize::try_from(capacity).unwrap_or(usize::MAX) - body.len());
        }
        body.extend_from_slice(data);
    }
    metrics.received_bytes(body.len() as u64);
    Ok((Bytes::from(body), held))
}

/// Checks the size of a request's head, its request line and headers as parsed, against
/// `[ingest] max_header_bytes`. (hyper refuses heads over twice the limit while reading
/// them, with a bare 431: see [`super::serve`].)
///
/// # Errors
/// 431 naming the limit and its key.
pub(super) fn check_head<B>(
    request: &Request<B>,
    limits: &IngestConfig,
    metrics: &Metrics,
) -> Result<(), Refusal> {
    // "METHOD TARGET HTTP/1.1\r\n", each "name: value\r\n", and the blank line.
    let line = request.method().as_str().len()
        + request
            .uri()
            .path_and_query()
            .map_or(1, |p| p.as_str().len())
        + " HTTP/1.1\r\n ".len();
    let headers: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + ": \r\n".len())
        .sum();
    let bytes = (line + headers + 2) as u64;
    if bytes <= limits.max_header_bytes {
        return Ok(());
    }
    Err(refuse(
        metrics,
        RequestRefusal::HeadersTooLarge,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        format!(
            "the request line and headers take {bytes} bytes, more than the limit of {} \
             ([ingest] max_header_bytes): send fewer or shorter headers",
            limits.max_header_bytes
        ),
    ))
}

/// Reads and drops the body of a request refused before its body was read (up to
/// `limit` bytes, for at most [`DISCARD_TIMEOUT`]): a client still sending it then
/// reads the answer, instead of a connection reset under its upload.
pub(super) async fn discard_body(request: Request<Incoming>, limit: u64) {
    discard(&mut request.into_body(), limit).await;
}

async fn discard(body: &mut Incoming, limit: u64) {
    let mut seen = 0u64;
    let _ = tokio::time::timeout(DISCARD_TIMEOUT, async {
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len() as u64);
            if seen > limit {
                break;
            }
        }
    })
    .await;
}

/// Checks the rows of a body against `max_rows_per_request`, and each row against
/// `max_row_bytes`, `max_columns` and `max_depth` (rows that could not be parsed against
/// the size only). A request is refused whole: these limits protect the daemon, they do
/// not judge rows.
///
/// # Errors
/// 413 naming the row, the limit and its key.
pub(super) fn check_rows(
    rows: &[Parsed<'_>],
    limits: &IngestConfig,
    metrics: &Metrics,
) -> Result<(), Refusal> {
    let refused = |reason, message: String| {
        Err(refuse(
            metrics,
            reason,
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("{message}; nothing of this request was kept"),
        ))
    };
    if rows.len() as u64 > limits.max_rows_per_request {
        return refused(
            RequestRefusal::TooManyRows,
            format!(
                "the body holds {} rows, more than the limit of {} ([ingest] \
                 max_rows_per_request): send them in smaller requests",
                rows.len(),
                limits.max_rows_per_request
            ),
        );
    }
    for (index, row) in rows.iter().enumerate() {
        let (raw, position) = match row {
            Ok(row) => (row.raw, Position::Row(row.position)),
            Err(unparsed) => (unparsed.raw, Position::Index(index)),
        };
        if raw.len() as u64 > limits.max_row_bytes {
            return refused(
                RequestRefusal::RowTooLarge,
                format!(
                    "{position} is {} bytes, more than the limit of {} ([ingest] \
                     max_row_bytes)",
                    raw.len(),
                    limits.max_row_bytes
                ),
            );
        }
        let Ok(row) = row else { continue };
        if row.fields.len() as u64 > limits.max_columns {
            return refused(
                RequestRefusal::TooManyColumns,
                format!(
                    "{position} has {} keys, more than the limit of {} ([ingest] max_columns)",
                    row.fields.len(),
                    limits.max_columns
                ),
            );
        }
        if deeper_than(raw, limits.max_depth).is_some() {
            return refused(
                RequestRefusal::TooDeep,
                format!(
                    "{position} is nested deeper than the limit of {} levels ([ingest] \
                     max_depth; the row object is level 1)",
                    limits.max_depth
                ),
            );
        }
    }
    Ok(())
}

/// Where a row over a limit is, for the message (formatted only then).
enum Position {
    Row(RowPosition),
    Index(usize),
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Row(position) => position.fmt(f),
            Position::Index(index) => write!(f, "row at index {index} of the body"),
        }
    }
}

/// How deeply objects and arrays nest in the JSON text `raw` (an object holding scalars is
/// 1), when that is deeper than `most`; counting stops at the first level past it. Rows
/// with no more brackets than `most`, the usual flat rows, are settled by one counting
/// pass.
fn deeper_than(raw: &str, most: u64) -> Option<u64> {
    let bytes = raw.as_bytes();
    if bytes.iter().filter(|&&b| b == b'{' || b == b'[').count() as u64 <= most {
        return None;
    }
    let mut depth = 0u64;
    let (mut in_string, mut escaped) = (false, false);
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > most {
                    return Some(depth);
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::deeper_than;

    #[test]
    fn nesting_is_counted_outside_strings() {
        assert_eq!(deeper_than(r#"{"a":1}"#, 0), Some(1));
        assert_eq!(deeper_than(r#"{"a":1}"#, 1), None);
        assert_eq!(deeper_than(r#"{"a":[1,{"b":[]}]}"#, 3), Some(4));
        assert_eq!(deeper_than(r#"{"a":[1,{"b":[]}]}"#, 4), None);
        assert_eq!(deeper_than(r#"{"a":"[[[{{{","b":"\"[[","c":[]}"#, 2), None);
        assert_eq!(
            deeper_than(r#"{"a":[[[[1]]]]}"#, 2),
            Some(3),
            "counting stops past the limit"
        );
        assert_eq!(
            deeper_than(r#"{"a":[],"b":[],"c":[]}"#, 2),
            None,
            "siblings do not add up"
        );
    }
}
