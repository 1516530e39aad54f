//! Prometheus metrics, served at `GET /metrics` in the Prometheus text exposition format
//! (version 0.0.4, which `promtool check metrics` checks).
//!
//! Each daemon has its own registry (no global state), so several daemons in one process,
//! as in the tests, count apart. Label values are bounded: request metrics name a route and
//! a status code, never a path or a table; only the dead-letter counter names tables.
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `pgspool_http_requests_total{route,code}` | counter | requests answered, by route (`rows`, `healthz`, `metrics`, `status`, `other` for any other path) and HTTP status code |
//! | `pgspool_rows_received_total` | counter | rows the WAL took from `POST .../rows` requests, each with its LSN (rows refused with `?invalid=dead_letter` included: they take an LSN too) |
//! | `pgspool_received_bytes_total` | counter | request body bytes read by `POST .../rows`, whatever the answer (a request refused before its body is read adds none) |
//! | `pgspool_ack_latency_seconds{ack}` | histogram | from the start of a `POST .../rows` to its 2xx answer, by `?ack=` level (`durable`, `committed`, `none`) |
//! | `pgspool_writes_refused_total{reason}` | counter | writes answered without an ack because the WAL could not take them: `backlog_full` (503, `[wal] max_bytes` reached) or `disk_full` (507) |
//! | `pgspool_requests_refused_total{reason}` | counter | connections and requests refused by the access check or an `[ingest]` limit, by reason: `peer` (403, `[listen] allowed_uids`/`allowed_gids`), `too_many_connections` (503, `max_connections`), `header_timeout` (408, `header_timeout`), `headers_too_large` (431, `max_header_bytes`), `body_timeout` (408, `body_timeout`), `body_too_large` (413, `max_body_bytes`), `buffers_full` (503, `max_buffered_bytes`), `too_many_rows` (413, `max_rows_per_request`), `row_too_large` (413, `max_row_bytes`), `too_many_columns` (413, `max_columns`), `too_deep` (413, `max_depth`), `table_not_allowed` and `column_not_allowed` (403, the `[tables]` allow-list). Refusals made before a request reaches the handlers (`peer`, `too_many_connections`, `header_timeout`, and `headers_too_large` for heads over twice the limit) are counted here only, not in `pgspool_http_requests_total` |
//! | `pgspool_wal_fdatasync_duration_seconds` | histogram | time of each group commit's `fdatasync` of the WAL (successful ones) |
//! | `pgspool_wal_group_commit_requests` | histogram | requests (appends) made durable by one `fdatasync` |
//! | `pgspool_wal_group_commit_rows` | histogram | rows (LSNs) made durable by one `fdatasync` |
//! | `pgspool_wal_bytes` | gauge | bytes in WAL segment files: the unflushed backlog plus flushed rows whose segment is not deleted yet |
//! | `pgspool_wal_segments` | gauge | WAL segment files |
//! | `pgspool_wal_durable_lsn` | gauge | the last LSN made durable in the WAL (fdatasync'd) |
//! | `pgspool_wal_rows_pending` | gauge | rows durable in the WAL and not yet committed in PostgreSQL: `pgspool_wal_durable_lsn` minus `pgspool_watermark_lsn` (rows of held tables at or below the watermark are not counted: see `pgspool_tables_held`) |
//! | `pgspool_flush_batch_rows` | histogram | rows of each batch the flusher committed (a held table's catch-up batches included; rows a batch leaves in the WAL for held tables count) |
//! | `pgspool_flush_batch_duration_seconds` | histogram | time of each committed batch's transaction, from preparing it to COMMIT (isolating refused rows included) |
//! | `pgspool_dead_letters_total{table}` | counter | rows put into `pgspool.dead_letters`, by table as its WAL records name it |
//! | `pgspool_flush_errors_total{sqlstate_class}` | counter | errors met while flushing: each refused row, each table held or still refusing, each failed transaction; by the SQLSTATE's class (`23`, `42`, `08`, ...), `none` for errors without one (I/O, lost connection, pgspool's encoder) |
//! | `pgspool_flush_retries_total` | counter | flusher sessions that ended in a failure and were retried after a backoff |
//! | `pgspool_tables_held` | gauge | tables whose rows are held in the WAL because they refuse every row |
//! | `pgspool_watermark_lsn` | gauge | the last LSN committed in PostgreSQL (the watermark): from the local checkpoint until the flusher first reads it from PostgreSQL |
//! | `pgspool_postgres_up` | gauge | 1 once a flusher session connected to PostgreSQL and created pgspool's tables, 0 before the first such session and after a session fails (until the next one connects) |
//!
//! The WAL gauges are read when `/metrics` is asked for. The WAL writer's histograms live
//! in [`WalMetrics`], which exists before the WAL opens and is handed to it as its
//! [`CommitObserver`]: the WAL knows nothing of Prometheus.

use std::fmt::{self, Write};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::lsn::Lsn;
use crate::wal::{CommitObserver, GroupCommit, Wal, WalDir};

/// Buckets of `pgspool_ack_latency_seconds`: 100 µs to 10 s.
const ACK_SECONDS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Buckets of `pgspool_wal_fdatasync_duration_seconds`: 50 µs to 1 s.
const FDATASYNC_SECONDS: [f64; 14] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];
/// Buckets of `pgspool_flush_batch_duration_seconds`: 1 ms to 1 min.
const BATCH_SECONDS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Buckets of the row-count histograms: 1 to 100,000 rows.
const ROWS: [f64; 11] = [
    1.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1_000.0, 5_000.0, 10_000.0, 50_000.0, 100_000.0,
];
/// Buckets of `pgspool_wal_group_commit_requests`: 1 to 1024, the writer's queue depth.
const REQUESTS: [f64; 11] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// Why a write was refused without an ack.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum RefusalReason {
    /// The WAL holds `[wal] max_bytes` already (503): `backlog_full`.
    BacklogFull,
    /// The WAL's file system is full (507): `disk_full`.
    DiskFull,
}

impl EncodeLabelValue for RefusalReason {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
        encoder.write_str(match self {
            RefusalReason::BacklogFull => "backlog_full",
            RefusalReason::DiskFull => "disk_full",
        })
    }
}

/// Why a connection or request was refused by the access check or a limit, as
/// `pgspool_requests_refused_total` labels it.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum RequestRefusal {
    /// The peer's uid and gid are in neither allow-list (403): `peer`.
    Peer,
    /// `[ingest] max_connections` are open (503): `too_many_connections`.
    TooManyConnections,
    /// The head of a new connection's request took over `[ingest] header_timeout` (408):
    /// `header_timeout`.
    HeaderTimeout,
    /// The request head is over `[ingest] max_header_bytes` (431): `headers_too_large`.
    HeadersTooLarge,
    /// The body took over `[ingest] body_timeout` (408): `body_timeout`.
    BodyTimeout,
    /// The body is over `[ingest] max_body_bytes` (413): `body_too_large`.
    BodyTooLarge,
    /// Bodies in memory would exceed `[ingest] max_buffered_bytes` (503): `buffers_full`.
    BuffersFull,
    /// More rows than `[ingest] max_rows_per_request` (413): `too_many_rows`.
    TooManyRows,
    /// A row over `[ingest] max_row_bytes` (413): `row_too_large`.
    RowTooLarge,
    /// A row with more keys than `[ingest] max_columns` (413): `too_many_columns`.
    TooManyColumns,
    /// A row nested deeper than `[ingest] max_depth` (413): `too_deep`.
    TooDeep,
    /// A table the `[tables]` allow-list does not name (403): `table_not_allowed`.
    TableNotAllowed,
    /// A column its `[tables]` entry does not list (403): `column_not_allowed`.
    ColumnNotAllowed,
}

impl RequestRefusal {
    /// Every reason, in the order the metrics list them.
    pub const ALL: [RequestRefusal; 13] = [
        RequestRefusal::Peer,
        RequestRefusal::TooManyConnections,
        RequestRefusal::HeaderTimeout,
        RequestRefusal::HeadersTooLarge,
        RequestRefusal::BodyTimeout,
        RequestRefusal::BodyTooLarge,
        RequestRefusal::BuffersFull,
        RequestRefusal::TooManyRows,
        RequestRefusal::RowTooLarge,
        RequestRefusal::TooManyColumns,
        RequestRefusal::TooDeep,
        RequestRefusal::TableNotAllowed,
        RequestRefusal::ColumnNotAllowed,
    ];

    /// The label value.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            RequestRefusal::Peer => "peer",
            RequestRefusal::TooManyConnections => "too_many_connections",
            RequestRefusal::HeaderTimeout => "header_timeout",
            RequestRefusal::HeadersTooLarge => "headers_too_large",
            RequestRefusal::BodyTimeout => "body_timeout",
            RequestRefusal::BodyTooLarge => "body_too_large",
            RequestRefusal::BuffersFull => "buffers_full",
            RequestRefusal::TooManyRows => "too_many_rows",
            RequestRefusal::RowTooLarge => "row_too_large",
            RequestRefusal::TooManyColumns => "too_many_columns",
            RequestRefusal::TooDeep => "too_deep",
            RequestRefusal::TableNotAllowed => "table_not_allowed",
            RequestRefusal::ColumnNotAllowed => "column_not_allowed",
        }
    }
}

impl EncodeLabelValue for RequestRefusal {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
        encoder.write_str(self.label())
    }
}

/// The route of a request, as `pgspool_http_requests_total` labels it: a fixed set, so
/// that paths clients make up do not make up series.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Route {
    /// `/v1/tables/{table}/rows`: `rows`.
    Rows,
    /// `/healthz`: `healthz`.
    Healthz,
    /// `/metrics`: `metrics`.
    Metrics,
    /// `/v1/status`: `status`.
    Status,
    /// Any other path: `other`.
    Other,
}

impl EncodeLabelValue for Route {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
        encoder.write_str(match self {
            Route::Rows => "rows",
            Route::Healthz => "healthz",
            Route::Metrics => "metrics",
            Route::Status => "status",
            Route::Other => "other",
        })
    }
}

/// When a write was answered (`?ack=`), as `pgspool_ack_latency_seconds` labels it.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum AckLevel {
    /// Once written, before fdatasync: `none`.
    None,
    /// Once fdatasync'd: `durable`.
    Durable,
    /// Once PostgreSQL holds the rows: `committed`.
    Committed,
}

impl EncodeLabelValue for AckLevel {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
        encoder.write_str(match self {
            AckLevel::None => "none",
            AckLevel::Durable => "durable",
            AckLevel::Committed => "committed",
        })
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    reason: RefusalReason,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestRefusalLabels {
    reason: RequestRefusal,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: Route,
    code: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AckLabels {
    ack: AckLevel,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TableLabels {
    table: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    sqlstate_class: String,
}

/// The WAL writer's metrics: created before the WAL opens and handed to it (in
/// [`WalOptions::observer`](crate::wal::WalOptions::observer)), then registered by
/// [`Metrics::new`]. Clones share their values.
#[derive(Debug, Clone)]
pub struct WalMetrics {
    fdatasync: Histogram,
    group_requests: Histogram,
    group_rows: Histogram,
}

impl Default for WalMetrics {
    fn default() -> WalMetrics {
        WalMetrics {
            fdatasync: Histogram::new(FDATASYNC_SECONDS),
            group_requests: Histogram::new(REQUESTS),
            group_rows: Histogram::new(ROWS),
        }
    }
}

impl CommitObserver for WalMetrics {
    fn committed(&self, commit: &GroupCommit) {
        self.fdatasync.observe(commit.fdatasync.as_secs_f64());
        self.group_requests.observe(commit.requests as f64);
        self.group_rows.observe(commit.rows as f64);
    }
}

/// The daemon's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    rows_received: Counter,
    received_bytes: Counter,
    ack_latency: Family<AckLabels, Histogram, fn() -> Histogram>,
    refused: Family<RefusalLabels, Counter>,
    requests_refused: Family<RequestRefusalLabels, Counter>,
    wal: Arc<WalDir>,
    durable: watch::Receiver<Lsn>,
    wal_bytes: Gauge,
    wal_segments: Gauge,
    durable_lsn: Gauge,
    rows_pending: Gauge,
    batch_rows: Histogram,
    batch_duration: Histogram,
    dead_letters: Family<TableLabels, Counter>,
    flush_errors: Family<ErrorLabels, Counter>,
    flush_retries: Counter,
    tables_held: Gauge,
    watermark: Gauge,
    postgres_up: Gauge,
}

impl Metrics {
    /// A registry with every metric at zero, but the watermark, `recorded` (the last one
    /// the checkpoint recorded); `wal` is read for the WAL gauges, `writer` is the
    /// [`WalMetrics`] it was opened with.
    #[must_use]
    pub fn new(wal: &Wal, writer: WalMetrics, recorded: Lsn) -> Metrics {
        let mut registry = Registry::with_prefix("pgspool");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "Requests answered, by route and HTTP status code",
            requests.clone(),
        );
        let rows_received = Counter::default();
        registry.register(
            "rows_received",
            "Rows the WAL took from requests (each with an LSN)",
            rows_received.clone(),
        );
        let received_bytes = Counter::default();
        registry.register(
            "received_bytes",
            "Request body bytes read by POST .../rows",
            received_bytes.clone(),
        );
        let ack_latency: Family<AckLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(ACK_SECONDS));
        for ack in [AckLevel::None, AckLevel::Durable, AckLevel::Committed] {
            let _ = ack_latency.get_or_create(&AckLabels { ack });
        }
        registry.register(
            "ack_latency_seconds",
            "Time from the start of a POST .../rows to its 2xx answer, by ack level",
            ack_latency.clone(),
        );
        let refused = Family::<RefusalLabels, Counter>::default();
        for reason in [RefusalReason::BacklogFull, RefusalReason::DiskFull] {
            let _ = refused.get_or_create(&RefusalLabels { reason });
        }
        registry.register(
            "writes_refused",
            "Writes answered without an ack because the WAL could not take them",
            refused.clone(),
        );
        let requests_refused = Family::<RequestRefusalLabels, Counter>::default();
        for reason in RequestRefusal::ALL {
            let _ = requests_refused.get_or_create(&RequestRefusalLabels { reason });
        }
        registry.register(
            "requests_refused",
            "Connections and requests refused by the access check or an [ingest] limit, by \
             reason",
            requests_refused.clone(),
        );
        registry.register(
            "wal_fdatasync_duration_seconds",
            "Time of each group commit's fdatasync of the WAL",
            writer.fdatasync,
        );
        registry.register(
            "wal_group_commit_requests",
            "Requests made durable by one fdatasync of the WAL",
            writer.group_requests,
        );
        registry.register(
            "wal_group_commit_rows",
            "Rows made durable by one fdatasync of the WAL",
            writer.group_rows,
        );
        let wal_bytes = Gauge::default();
        registry.register(
            "wal_bytes",
            "Bytes in WAL segment files (unflushed rows, plus flushed rows whose segment is \
             not deleted yet)",
            wal_bytes.clone(),
        );
        let wal_segments = Gauge::default();
        registry.register("wal_segments", "WAL segment files", wal_segments.clone());
        let durable_lsn = Gauge::default();
        registry.register(
            "wal_durable_lsn",
            "The last LSN made durable in the WAL",
            durable_lsn.clone(),
        );
        let rows_pending = Gauge::default();
        registry.register(
            "wal_rows_pending",
            "Rows durable in the WAL and not yet committed in PostgreSQL (durable LSN minus \
             watermark)",
            rows_pending.clone(),
        );
        let batch_rows = Histogram::new(ROWS);
        registry.register(
            "flush_batch_rows",
            "Rows of each batch committed in PostgreSQL",
            batch_rows.clone(),
        );
        let batch_duration = Histogram::new(BATCH_SECONDS);
        registry.register(
            "flush_batch_duration_seconds",
            "Time of each committed batch's transaction",
            batch_duration.clone(),
        );
        let dead_letters = Family::<TableLabels, Counter>::default();
        registry.register(
            "dead_letters",
            "Rows put into pgspool.dead_letters, by table",
            dead_letters.clone(),
        );
        let flush_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "flush_errors",
            "Errors met while flushing (refused rows, held tables, failed transactions), by \
             SQLSTATE class",
            flush_errors.clone(),
        );
        let flush_retries = Counter::default();
        registry.register(
            "flush_retries",
            "Flusher sessions that failed and were retried after a backoff",
            flush_retries.clone(),
        );
        let tables_held = Gauge::default();
        registry.register(
            "tables_held",
            "Tables whose rows are held in the WAL because they refuse every row",
            tables_held.clone(),
        );
        let watermark = Gauge::default();
        watermark.set(gauge_value(recorded.0));
        registry.register(
            "watermark_lsn",
            "The last LSN committed in PostgreSQL",
            watermark.clone(),
        );
        let postgres_up = Gauge::default();
        registry.register(
            "postgres_up",
            "Whether the flusher's session with PostgreSQL is up (1) or not (0)",
            postgres_up.clone(),
        );
        Metrics {
            registry,
            requests,
            rows_received,
            received_bytes,
            ack_latency,
            refused,
            requests_refused,
            wal: Arc::clone(wal.dir()),
            durable: wal.durable(),
            wal_bytes,
            wal_segments,
            durable_lsn,
            rows_pending,
            batch_rows,
            batch_duration,
            dead_letters,
            flush_errors,
            flush_retries,
            tables_held,
            watermark,
            postgres_up,
        }
    }

    /// Counts a request answered with `status` on `route`.
    pub fn request(&self, route: Route, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                route,
                code: status,
            })
            .inc();
    }

    /// Counts `bytes` of request body read.
    pub fn received_bytes(&self, bytes: u64) {
        self.received_bytes.inc_by(bytes);
    }

    /// Counts `rows` the WAL took from a request.
    pub fn rows_received(&self, rows: u64) {
        self.rows_received.inc_by(rows);
    }

    /// Records the time from a write's start to its 2xx answer (`elapsed`), by the `ack`
    /// level it asked for.
    pub fn acked(&self, ack: AckLevel, elapsed: Duration) {
        self.ack_latency
            .get_or_create(&AckLabels { ack })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts one refused write.
    pub fn refused(&self, reason: RefusalReason) {
        self.refused.get_or_create(&RefusalLabels { reason }).inc();
    }

    /// Counts one connection or request refused by the access check or a limit.
    pub fn request_refused(&self, reason: RequestRefusal) {
        self.requests_refused
            .get_or_create(&RequestRefusalLabels { reason })
            .inc();
    }

    /// Records a batch of `rows` committed in PostgreSQL in `elapsed`.
    pub fn batch_committed(&self, rows: u64, elapsed: Duration) {
        self.batch_rows.observe(rows as f64);
        self.batch_duration.observe(elapsed.as_secs_f64());
    }

    /// Records whether the flusher's session with PostgreSQL is up.
    pub fn postgres_up(&self, up: bool) {
        self.postgres_up.set(i64::from(up));
    }

    /// Counts a row put into dead letters for `table`, and its error.
    pub fn dead_letter(&self, table: &str, sqlstate: Option<&str>) {
        self.dead_letters
            .get_or_create(&TableLabels {
                table: table.to_string(),
            })
            .inc();
        self.flush_error(sqlstate);
    }

    /// Counts an error met while flushing, by its SQLSTATE (`None`: it has none).
    pub fn flush_error(&self, sqlstate: Option<&str>) {
        let class = sqlstate.and_then(|s| s.get(..2)).unwrap_or("none");
        self.flush_errors
            .get_or_create(&ErrorLabels {
                sqlstate_class: class.to_string(),
            })
            .inc();
    }

    /// Counts a flusher session retried after a failure.
    pub fn flush_retry(&self) {
        self.flush_retries.inc();
    }

    /// Sets the watermark and the number of held tables after a commit.
    pub fn flushed(&self, watermark: Lsn, tables_held: usize) {
        self.watermark.set(gauge_value(watermark.0));
        self.tables_held.set(gauge_value(tables_held as u64));
    }

    /// The metrics in the Prometheus text format (version 0.0.4).
    #[must_use]
    pub fn render(&self) -> String {
        self.wal_bytes.set(gauge_value(self.wal.bytes()));
        self.wal_segments.set(gauge_value(self.wal.segments()));
        let durable = gauge_value(self.durable.borrow().0);
        self.durable_lsn.set(durable);
        self.rows_pending
            .set(durable.saturating_sub(self.watermark.get()).max(0));
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String does not fail");
        out
    }
}

/// `n` as a gauge's value (gauges are `i64`; LSNs and sizes never come near its end).
fn gauge_value(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
