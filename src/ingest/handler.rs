//! The HTTP contract: routes, status codes, and the path of a write from body to WAL.
//!
//! | request | answer |
//! |---|---|
//! | `POST /v1/tables/{table}/rows` | 202 `{"rows","first_lsn","last_lsn"}` once every row is in the WAL and fdatasync'd |
//! | `... /rows?ack=durable` | the same (the default) |
//! | `... /rows?ack=none` | 202, the same body, once the rows are written to the WAL, before its fdatasync: a crash of the host may lose up to one group commit |
//! | `... /rows?ack=committed` | 200 `{"rows","first_lsn","last_lsn","committed": n,"dead_lettered": [{"lsn","sqlstate","message"}]}` once PostgreSQL holds every row (in its table, or `pgspool.dead_letters`); 202 `{..., "committed": false, "held": {"table","error"}, "message"}` at once if the table is held by a schema error (the rows are durable in the WAL and loaded once it is fixed); 503 `{..., "committed": false, "error"}` if pgspool stops first (the rows are durable in the WAL: do not send them again) |
//! | `... /rows?invalid=reject` | a request with a row pgspool cannot store is refused whole (the default; statuses below) |
//! | `... /rows?invalid=dead_letter` | such rows are kept as refused rows for `pgspool.dead_letters` and the others stored; the answer adds `"refused": [{"index","error"}]` (index from 0 among the body's rows); each refused row takes an LSN |
//! | `GET /healthz` | 200 once the WAL is recovered and writes are accepted, 503 while stopping |
//! | `GET /metrics` | Prometheus text format (see [`crate::metrics`]); every request is counted there by route and status |
//! | `GET /v1/status` | 200 the live status report (see [`crate::status`] for its keys); 500 if the WAL directory cannot be read |
//!
//! `ack` and `invalid` combine. Errors are `{"error": "..."}`: 400 an unknown query
//! parameter or value (the message lists the allowed ones), malformed body, not UTF-8, a
//! row that is not an object or a duplicate key (unless `invalid=dead_letter`; a body
//! that cannot be split into rows is always refused), a bad table name; 403 one of
//! pgspool's own tables, a table or column that the `[tables]` allow-list does not name
//! (checked before any query to PostgreSQL and before anything is stored; see
//! [`crate::allow`]), or a peer not in `[listen] allowed_uids`/`allowed_gids`; 404 no
//! such table; 405 wrong method; 408 a body not received within `[ingest] body_timeout`,
//! or the head of a new connection's first request within `header_timeout`; 413 body over
//! `[ingest] max_body_bytes`, more rows than `max_rows_per_request`, a row over
//! `max_row_bytes`, with more keys than `max_columns` or nested deeper than `max_depth`
//! (see [`super::limits`]), or rows that take more than a WAL record (64 MiB) once
//! encoded; 415 other content types; 422 unknown or `GENERATED ALWAYS` column, a NUL
//! character, a value no column of that type can take (unless `invalid=dead_letter`), a
//! view or other relation that is not a table; 431 a request head over `[ingest]
//! max_header_bytes` (over twice it, hyper's answer, without a body; the log names the
//! key); 500 a failed
//! fdatasync (pgspool stops); 503 with `Retry-After` not accepting writes (stopping), the
//! WAL holding `[wal] max_bytes`, request bodies in memory at `[ingest]
//! max_buffered_bytes`, `[ingest] max_connections` open, or PostgreSQL needed but
//! unreachable; 507 the WAL's disk is full. Refusals for a full WAL or disk are counted in
//! `pgspool_writes_refused_total`, those by the access check or a limit in
//! `pgspool_requests_refused_total`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONNECTION, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use percent_encoding::percent_decode_str;
use serde_json::json;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::limits::{self, Buffered};
use super::peer::Peer;
use crate::acks::{Acks, Outcome};
use crate::allow::{self, AllowList, Denied};
use crate::config::{Config, IngestConfig, ListenConfig};
use crate::live::Monitor;
use crate::lsn::LsnRange;
use crate::metrics::{AckLevel, Metrics, RefusalReason, RequestRefusal, Route};
use crate::rowgroup::RowGroup;
use crate::rows::{self, BodyFormat, Encoded, Invalid, Parsed, RowError};
use crate::schema::{Catalog, Found, OWN_SCHEMA, SchemaCache, TableSchema};
use crate::table::TableName;
use crate::wal::record::MAX_PAYLOAD_BYTES;
use crate::wal::{AppendError, AppendRecord, Appender, WalDir};

/// Shared state of the request handlers.
#[derive(Debug)]
pub struct Ingest {
    /// `None` once the daemon stops accepting writes, so that no connection left behind
    /// keeps the WAL writer alive.
    appender: RwLock<Option<Appender>>,
    wal: Arc<WalDir>,
    schemas: Arc<SchemaCache>,
    catalog: Catalog,
    config: watch::Receiver<Config>,
    metrics: Arc<Metrics>,
    acks: Arc<Acks>,
    monitor: Arc<Monitor>,
    /// Connections open (see [`Ingest::connection_opened`]).
    connections: AtomicUsize,
    /// Bytes of request bodies held, against `[ingest] max_buffered_bytes`.
    buffered: Buffered,
}

/// What the request handlers need.
#[derive(Debug)]
pub struct IngestOptions {
    /// Appends to the WAL.
    pub appender: Appender,
    /// The WAL directory, for its size.
    pub wal: Arc<WalDir>,
    /// Table schemas, filled from `catalog`.
    pub schemas: Arc<SchemaCache>,
    /// Reads table schemas from PostgreSQL.
    pub catalog: Catalog,
    /// The configuration, changed live by a reload: bodies above `[ingest]
    /// max_body_bytes` get 413, writes that would take the WAL above `[wal] max_bytes` get
    /// 503.
    pub config: watch::Receiver<Config>,
    /// Requests with `?ack=committed` wait here for the flusher's commits.
    pub acks: Arc<Acks>,
    /// The daemon's metrics, shared with the flusher.
    pub metrics: Arc<Metrics>,
    /// The live state `GET /v1/status` reports.
    pub monitor: Arc<Monitor>,
}

/// An open connection, counted in [`Ingest::open_connections`] until dropped.
#[derive(Debug)]
pub struct ConnectionGuard(Arc<Ingest>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A refusal: status and message.
pub(super) struct Refusal(StatusCode, String);

impl Refusal {
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> Refusal {
        Refusal(status, message.into())
    }
}

impl Ingest {
    /// The handlers' state.
    #[must_use]
    pub fn new(options: IngestOptions) -> Ingest {
        Ingest {
            appender: RwLock::new(Some(options.appender)),
            metrics: options.metrics,
            wal: options.wal,
            schemas: options.schemas,
            catalog: options.catalog,
            config: options.config,
            acks: options.acks,
            monitor: options.monitor,
            connections: AtomicUsize::new(0),
            buffered: Buffered::default(),
        }
    }

    /// Refuses a write of `bytes` more bytes with 503 when the WAL would hold more than
    /// `[wal] max_bytes`, and counts the refusal. Checked after the body is read, so that
    /// clients see the answer rather than a connection closed under their upload; requests
    /// appended at the same moment may take the WAL past the limit by their own size.
    fn check_backlog(&self, bytes: u64) -> Result<(), Refusal> {
        let held = self.wal.bytes();
        let max_wal_bytes = self.config.borrow().wal.max_bytes;
        if held + bytes <= max_wal_bytes {
            return Ok(());
        }
        self.metrics.refused(RefusalReason::BacklogFull);
        Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the WAL holds {held} bytes and [wal] max_bytes is {}: PostgreSQL is not \
                 keeping up (or is down). Nothing of this request was kept, and nothing held is \
                 evicted; retry later",
                max_wal_bytes
            ),
        ))
    }

    /// Stops accepting writes: from now on they get 503 and `/healthz` says so. Appends
    /// already under way complete.
    pub fn stop_accepting(&self) {
        self.appender.write().expect("lock poisoned").take();
    }

    /// Whether writes are accepted (not stopping).
    fn accepting(&self) -> bool {
        self.appender.read().expect("lock poisoned").is_some()
    }

    /// The appender, or a 503 refusal once the daemon is stopping.
    fn appender(&self) -> Result<Appender, Refusal> {
        self.appender
            .read()
            .expect("lock poisoned")
            .clone()
            .ok_or_else(|| {
                Refusal::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "pgspool is stopping and accepts no more writes",
                )
            })
    }

    /// Answers one request, and counts it in the metrics.
    pub async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let route = route(request.uri().path());
        let mut response = self.answer(request).await;
        self.metrics.request(route, response.status().as_u16());
        if !self.accepting() {
            // Stopping: the client closes this connection after the answer, rather than
            // sending its next request into a connection about to close.
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }

    /// Counts a connection opened; the count falls when the guard is dropped.
    pub fn connection_opened(self: &Arc<Self>) -> ConnectionGuard {
        self.connections.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard(Arc::clone(self))
    }

    /// `[listen]` now.
    pub(super) fn listen(&self) -> ListenConfig {
        self.config.borrow().listen.clone()
    }

    /// The `[ingest]` limits now.
    pub(super) fn limits(&self) -> IngestConfig {
        self.config.borrow().ingest.clone()
    }

    /// The daemon's metrics.
    pub(super) fn metrics_handle(&self) -> &Metrics {
        &self.metrics
    }

    /// Connections open now.
    #[must_use]
    pub fn open_connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    async fn answer(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = request.uri().path().to_string();
        let segments: Vec<&str> = path.split('/').collect();
        let result = if let Err(refusal) =
            limits::check_head(&request, &self.limits(), &self.metrics)
        {
            Err(refusal)
        } else {
            match (segments.as_slice(), request.method()) {
                (["", "healthz"], &Method::GET) => self.health(),
                (["", "metrics"], &Method::GET) => Ok(self.metrics()),
                (["", "v1", "status"], &Method::GET) => self.status().await,
                (["", "v1", "tables", table, "rows"], &Method::POST) => {
                    self.post_rows(table, request).await
                }
                (["", "healthz" | "metrics"] | ["", "v1", "status"], _) => {
                    Err(method_not_allowed("GET"))
                }
                (["", "v1", "tables", _, "rows"], _) => Err(method_not_allowed("POST")),
                _ => Err(Refusal::new(
                    StatusCode::NOT_FOUND,
                    format!("no such endpoint: {path} (rows go to POST /v1/tables/{{table}}/rows)"),
                )),
            }
        };
        match result {
            Ok(response) => response,
            Err(Refusal(status, message)) => {
                debug!(%status, %message, "request refused");
                let mut response = refusal_response(status, &message);
                if status == StatusCode::METHOD_NOT_ALLOWED {
                    let allow = if path.starts_with("/v1/tables/") {
                        "POST"
                    } else {
                        "GET"
                    };
                    response
                        .headers_mut()
                        .insert("allow", HeaderValue::from_static(allow));
                }
                if status == StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE {
                    // Its body is left unread: the connection cannot carry another request.
                    response
                        .headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
                response
            }
        }
    }

    fn metrics(&self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(Bytes::from(self.metrics.render())));
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        response
    }

    async fn status(&self) -> Result<Response<Full<Bytes>>, Refusal> {
        let ready = self.accepting();
        let report = self.monitor.report(ready).await.map_err(|e| {
            Refusal::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot read the WAL directory: {e}"),
            )
        })?;
        let body = serde_json::to_value(&report).expect("the report serializes");
        Ok(json_response(StatusCode::OK, &body))
    }

    fn health(&self) -> Result<Response<Full<Bytes>>, Refusal> {
        self.appender()?;
        Ok(json_response(StatusCode::OK, &json!({ "status": "ok" })))
    }

    async fn post_rows(
        &self,
        table: &str,
        request: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Refusal> {
        let started = Instant::now();
        // Before the body is read, so a request for a table that does not exist costs no
        // memory.
        let checked = async {
            self.appender()?;
            let options = PostOptions::parse(request.uri().query())?;
            let peer = request.extensions().get::<Peer>().cloned();
            let table = percent_decode_str(table).decode_utf8().map_err(|_| {
                Refusal::new(StatusCode::BAD_REQUEST, "the table name is not UTF-8")
            })?;
            let table = TableName::parse(&table)
                .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, e.to_string()))?;
            let allowed = self.allowed(&table)?;
            let format = body_format(request.headers().get(CONTENT_TYPE))?;
            let columns = self.columns(&table).await?;
            Ok((options, peer, table, allowed, format, columns))
        };
        let (options, peer, table, allowed, format, columns) = match checked.await {
            Ok(checked) => checked,
            Err(refusal) => {
                let limit = self.config.borrow().ingest.max_body_bytes;
                limits::discard_body(request, limit).await;
                return Err(refusal);
            }
        };
        let limits = self.limits();
        let (bytes, held) =
            limits::read_body(request, &limits, &self.buffered, &self.metrics).await?;
        let body = std::str::from_utf8(&bytes).map_err(|e| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "the body is not UTF-8 (invalid byte at offset {})",
                    e.valid_up_to()
                ),
            )
        })?;
        let rows = rows::parse_each(body, format)
            .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, e.to_string()))?;
        limits::check_rows(&rows, &limits, &self.metrics)?;
        if let Some(allowed) = &allowed {
            AllowList::check_columns(&table, allowed, &rows)
                .map_err(|denied| self.forbidden(denied))?;
        }
        if options.invalid == Invalid::Reject
            && let Some(Err(unparsed)) = rows.iter().find(|row| row.is_err())
        {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                unparsed.error.to_string(),
            ));
        }
        let Encoded { groups, refused } =
            self.encode(&table, columns, &rows, options.invalid).await?;
        // The table as the WAL records name it: every group of a request names the same.
        let table_key = groups
            .first()
            .and_then(|(_, payload)| RowGroup::decode(payload).ok())
            .map_or_else(|| table.to_string(), |group| group.table.to_string());
        if let Some((_, payload)) = groups
            .iter()
            .find(|(_, payload)| payload.len() > MAX_PAYLOAD_BYTES as usize)
        {
            return Err(Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the rows of this request take {} bytes once encoded for COPY (numbers in \
                     exponent notation are written out in full), more than one WAL record \
                     holds ({MAX_PAYLOAD_BYTES} bytes); send them in smaller requests",
                    payload.len()
                ),
            ));
        }
        let records: Vec<AppendRecord> = groups
            .into_iter()
            .map(|(rows, payload)| AppendRecord::new(rows, payload))
            .collect();
        // The body and its rows are done with: a request waiting for its commit
        // (`?ack=committed`) holds neither, nor its share of `[ingest] max_buffered_bytes`.
        drop(rows);
        drop((bytes, held));
        self.check_backlog(records.iter().map(AppendRecord::encoded_len).sum())?;
        let appender = self.appender()?;
        let appended = match options.ack {
            Ack::None => appender.append_nowait(records).await,
            Ack::Durable | Ack::Committed => appender.append(records).await,
        };
        let lsns = appended.map_err(|e| {
            let status = match &e {
                AppendError::Write(io) if is_disk_full(io) => {
                    self.metrics.refused(RefusalReason::DiskFull);
                    StatusCode::INSUFFICIENT_STORAGE
                }
                AppendError::Write(_) | AppendError::Sync(_) => StatusCode::INTERNAL_SERVER_ERROR,
                AppendError::Closed => StatusCode::SERVICE_UNAVAILABLE,
            };
            warn!(error = %e, table = %table, "a write was not acknowledged");
            Refusal::new(status, e.to_string())
        })?;
        self.metrics.rows_received(lsns.rows());
        let mut answer =
            json!({ "rows": lsns.rows(), "first_lsn": lsns.first, "last_lsn": lsns.last });
        if options.invalid == Invalid::DeadLetter {
            answer["refused"] = refused
                .iter()
                .map(|(index, error)| json!({ "index": index, "error": error.to_string() }))
                .collect();
        }
        let response = if options.ack == Ack::Committed {
            self.wait_committed(table_key, lsns, answer, peer).await
        } else {
            json_response(StatusCode::ACCEPTED, &answer)
        };
        if response.status().is_success() {
            self.metrics.acked(options.ack.level(), started.elapsed());
        }
        Ok(response)
    }

    /// Waits until the flusher's commits settle the request's rows (see [`crate::acks`]),
    /// and answers with `answer` (the 202 body) completed. Gives up, without an answer
    /// anyone reads, if the client disconnects meanwhile.
    async fn wait_committed(
        &self,
        table: String,
        lsns: LsnRange,
        mut answer: serde_json::Value,
        peer: Option<Peer>,
    ) -> Response<Full<Bytes>> {
        let mut waiting = self.acks.wait(table, lsns);
        let gone = async {
            match &peer {
                Some(peer) => peer.gone().await,
                None => std::future::pending().await,
            }
        };
        let outcome = tokio::select! {
            outcome = waiting.outcome() => outcome,
            () = gone => {
                debug!(lsns = %lsns, "the client went away while waiting for its rows to be committed");
                return json_response(StatusCode::ACCEPTED, &answer);
            }
        };
        match outcome {
            Outcome::Committed { dead_letters } => {
                answer["committed"] = json!(lsns.rows().saturating_sub(dead_letters.len() as u64));
                answer["dead_lettered"] = dead_letters
                    .iter()
                    .map(|d| json!({ "lsn": d.lsn, "sqlstate": d.sqlstate, "message": d.message }))
                    .collect();
                json_response(StatusCode::OK, &answer)
            }
            Outcome::Held(held) => {
                answer["committed"] = json!(false);
                answer["message"] = json!(format!(
                    "table {} is held by an error ({}): these rows are durable in the WAL \
                     (LSNs {lsns}) and are loaded once the table is fixed; do not send them again",
                    held.table, held.error
                ));
                answer["held"] = json!({ "table": held.table, "error": held.error });
                json_response(StatusCode::ACCEPTED, &answer)
            }
            Outcome::Stopped => {
                answer["committed"] = json!(false);
                answer["error"] = json!(format!(
                    "pgspool is stopping before PostgreSQL committed these rows: they are \
                     durable in the WAL (LSNs {lsns}) and are loaded after the next start; do \
                     not send them again"
                ));
                json_response(StatusCode::SERVICE_UNAVAILABLE, &answer)
            }
        }
    }

    /// The columns `[tables]` lets rows for `table` name (`None`: every column), or 403 when
    /// it does not list the table.
    fn allowed(&self, table: &TableName) -> Result<Option<allow::Columns>, Refusal> {
        match &self.config.borrow().tables {
            None => Ok(None),
            Some(list) => list.table(table).map_err(|denied| self.forbidden(denied)),
        }
    }

    /// A write the `[tables]` allow-list refuses: 403, counted, and a log line for the
    /// operator.
    fn forbidden(&self, denied: Denied) -> Refusal {
        self.metrics.request_refused(match denied {
            Denied::Table { .. } => RequestRefusal::TableNotAllowed,
            Denied::Column { .. } => RequestRefusal::ColumnNotAllowed,
        });
        warn!(reason = %denied, "a write was refused by the [tables] allow-list");
        Refusal::new(StatusCode::FORBIDDEN, denied.to_string())
    }

    /// The table's columns: cached, or asked of PostgreSQL, or unknown when PostgreSQL
    /// cannot be asked about a table never seen.
    async fn columns(&self, table: &TableName) -> Result<Columns, Refusal> {
        if table.schema.as_deref() == Some(OWN_SCHEMA) {
            return Err(own_table(table));
        }
        if let Some(schema) = self.schemas.get(table) {
            return Ok(Columns::Cached(schema));
        }
        match self.lookup(table).await {
            Ok(schema) => Ok(Columns::Fresh(schema)),
            Err(Lookup::Unreachable(why)) => {
                debug!(table = %table, %why, "accepting rows unchecked");
                Ok(Columns::Unknown)
            }
            Err(Lookup::Refused(refusal)) => Err(refusal),
        }
    }

    /// Encodes the rows for the table's columns, refreshing cached columns once when a row
    /// names one the cache does not know; keeps them as JSON when the columns are unknown.
    /// With `invalid=dead_letter`, rows that cannot be stored are set aside (and a column
    /// still unknown after the refresh is such a row).
    async fn encode(
        &self,
        table: &TableName,
        columns: Columns,
        rows: &[Parsed<'_>],
        invalid: Invalid,
    ) -> Result<Encoded, Refusal> {
        let encode = |schema: Option<&TableSchema>| {
            rows::encode_parsed(table, schema, rows, invalid).map_err(unprocessable)
        };
        let schema = match columns {
            Columns::Unknown => return encode(None),
            Columns::Fresh(schema) => return encode(Some(&schema)),
            Columns::Cached(schema) => schema,
        };
        let unknown = match rows::encode_parsed(table, Some(&schema), rows, invalid) {
            Err(unknown @ RowError::UnknownColumn { .. }) => unknown,
            Ok(encoded) => match encoded.refused.iter().find_map(|(_, e)| match e {
                rows::RowRefusal::Row(unknown @ RowError::UnknownColumn { .. }) => {
                    Some(unknown.clone())
                }
                _ => None,
            }) {
                Some(unknown) => unknown,
                None => return Ok(encoded),
            },
            Err(e) => return Err(unprocessable(e)),
        };
        let schema = self.lookup(table).await.map_err(|e| match e {
            Lookup::Refused(refusal) => refusal,
            Lookup::Unreachable(why) => Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{unknown} as last seen, and PostgreSQL cannot be asked whether it has it \
                     now ({why}); retry later"
                ),
            ),
        })?;
        encode(Some(&schema))
    }

    /// Asks PostgreSQL for the table's columns and caches them.
    async fn lookup(&self, table: &TableName) -> Result<Arc<TableSchema>, Lookup> {
        match self.catalog.fetch(table).await {
            Ok(Found::Own) => Err(Lookup::Refused(own_table(table))),
            Ok(Found::Table(schema)) => Ok(self.schemas.put(table, schema).await),
            Ok(Found::Missing) => Err(Lookup::Refused(Refusal::new(
                StatusCode::NOT_FOUND,
                format!("table {table} does not exist in PostgreSQL"),
            ))),
            Ok(Found::NotATable(kind)) => Err(Lookup::Refused(Refusal::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "{table} is {kind}, not a table: pgspool loads rows with COPY, which writes only to tables"
                ),
            ))),
            Err(e) => Err(Lookup::Unreachable(e.0)),
        }
    }
}

fn own_table(table: &TableName) -> Refusal {
    Refusal::new(
        StatusCode::FORBIDDEN,
        format!("{table} is one of pgspool's own tables and cannot be written through its API"),
    )
}

/// What is known of a table's columns when a request arrives.
enum Columns {
    /// From the cache (refreshed once if a row names a column it lacks).
    Cached(Arc<TableSchema>),
    /// Just read from PostgreSQL.
    Fresh(Arc<TableSchema>),
    /// PostgreSQL cannot be asked and the table was never seen: rows are kept as JSON.
    Unknown,
}

enum Lookup {
    Refused(Refusal),
    Unreachable(String),
}

fn unprocessable(e: RowError) -> Refusal {
    Refusal::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        format!("{e}; nothing of this request was kept"),
    )
}

/// How long a write waits before it is answered (`?ack=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Ack {
    /// Once written, before fdatasync.
    None,
    /// Once fdatasync'd (the default).
    #[default]
    Durable,
    /// Once PostgreSQL holds the rows (or their table is held).
    Committed,
}

impl Ack {
    /// The level as the metrics label it.
    fn level(self) -> AckLevel {
        match self {
            Ack::None => AckLevel::None,
            Ack::Durable => AckLevel::Durable,
            Ack::Committed => AckLevel::Committed,
        }
    }
}

/// The query parameters of `POST /v1/tables/{table}/rows`.
#[derive(Debug, Default)]
struct PostOptions {
    ack: Ack,
    invalid: Invalid,
}

impl PostOptions {
    const ALLOWED: &str = "the parameters are ack=durable|committed|none and \
                           invalid=reject|dead_letter";

    /// Reads the query string; every parameter at most once.
    fn parse(query: Option<&str>) -> Result<PostOptions, Refusal> {
        let bad = |message: String| Refusal::new(StatusCode::BAD_REQUEST, message);
        let mut options = PostOptions::default();
        let (mut ack, mut invalid) = (false, false);
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = percent_decode_str(key).decode_utf8_lossy();
            let value = percent_decode_str(value).decode_utf8_lossy();
            let seen = match &*key {
                "ack" => &mut ack,
                "invalid" => &mut invalid,
                _ => {
                    return Err(bad(format!(
                        "unknown query parameter {key:?}; {}",
                        Self::ALLOWED
                    )));
                }
            };
            if std::mem::replace(seen, true) {
                return Err(bad(format!("query parameter {key:?} is given twice")));
            }
            match (&*key, &*value) {
                ("ack", "durable") => options.ack = Ack::Durable,
                ("ack", "committed") => options.ack = Ack::Committed,
                ("ack", "none") => options.ack = Ack::None,
                ("invalid", "reject") => options.invalid = Invalid::Reject,
                ("invalid", "dead_letter") => options.invalid = Invalid::DeadLetter,
                ("ack", _) => {
                    return Err(bad(format!(
                        "unknown ack={value:?}: use ack=durable (the default: answered once \
                         the rows are fdatasync'd), ack=committed (once PostgreSQL holds them) \
                         or ack=none (once written, before fdatasync)"
                    )));
                }
                _ => {
                    return Err(bad(format!(
                        "unknown invalid={value:?}: use invalid=reject (the default: a row \
                         pgspool cannot store refuses the whole request) or \
                         invalid=dead_letter (such rows go to pgspool.dead_letters, the others \
                         are stored)"
                    )));
                }
            }
        }
        Ok(options)
    }
}

/// The route of a request for the metrics: known paths by name, whatever the method, and
/// every other path as one.
fn route(path: &str) -> Route {
    let segments: Vec<&str> = path.split('/').collect();
    match segments.as_slice() {
        ["", "v1", "tables", _, "rows"] => Route::Rows,
        ["", "healthz"] => Route::Healthz,
        ["", "metrics"] => Route::Metrics,
        ["", "v1", "status"] => Route::Status,
        _ => Route::Other,
    }
}

fn method_not_allowed(allowed: &str) -> Refusal {
    Refusal::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed here; use {allowed}"),
    )
}

fn body_format(content_type: Option<&HeaderValue>) -> Result<BodyFormat, Refusal> {
    let media = content_type.and_then(|v| v.to_str().ok()).map(|v| {
        v.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    });
    match media.as_deref() {
        Some("application/json") => Ok(BodyFormat::Json),
        Some("application/x-ndjson") => Ok(BodyFormat::Ndjson),
        other => Err(Refusal::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "unsupported content type {}: send application/json (an object or an array \
                 of objects) or application/x-ndjson (one object per line)",
                other.map_or_else(|| "(none)".to_string(), |m| format!("{m:?}"))
            ),
        )),
    }
}

fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// The answer to a refusal: `{"error": message}`, with `Retry-After` for a 503.
pub(super) fn refusal_response(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let mut response = json_response(status, &json!({ "error": message }));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from_static("1"));
    }
    response
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
