//! Prometheus metrics, served at `GET /metrics` in the text exposition format.
//!
//! Each daemon has its own registry (no global state), so several daemons in one process,
//! as in the tests, count apart.
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `pgspool_writes_refused_total{reason}` | counter | writes answered without an ack because the WAL could not take them: `backlog_full` (503, `[wal] max_bytes` reached) or `disk_full` (507) |
//! | `pgspool_wal_bytes` | gauge | bytes in WAL segment files: the unflushed backlog plus flushed rows whose segment is not deleted yet |
//! | `pgspool_dead_letters_total{table}` | counter | rows put into `pgspool.dead_letters`, by table as its WAL records name it |
//! | `pgspool_flush_errors_total{sqlstate_class}` | counter | errors met while flushing: each refused row, each table held or still refusing, each failed transaction; by the SQLSTATE's class (`23`, `42`, `08`, ...), `none` for errors without one (I/O, lost connection, pgspool's encoder) |
//! | `pgspool_flush_retries_total` | counter | flusher sessions that ended in a failure and were retried after a backoff |
//! | `pgspool_tables_held` | gauge | tables whose rows are held in the WAL because they refuse every row |
//! | `pgspool_watermark_lsn` | gauge | the last LSN committed in PostgreSQL (the watermark) |

use std::fmt::{self, Write};
use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::lsn::Lsn;
use crate::wal::WalDir;

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

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    reason: RefusalReason,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TableLabels {
    table: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    sqlstate_class: String,
}

/// The daemon's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    refused: Family<RefusalLabels, Counter>,
    wal_bytes: Gauge,
    wal: Arc<WalDir>,
    dead_letters: Family<TableLabels, Counter>,
    flush_errors: Family<ErrorLabels, Counter>,
    flush_retries: Counter,
    tables_held: Gauge,
    watermark: Gauge,
}

impl Metrics {
    /// A registry with every metric at zero; `wal` is read for the WAL gauges.
    #[must_use]
    pub fn new(wal: Arc<WalDir>) -> Metrics {
        let mut registry = Registry::with_prefix("pgspool");
        let refused = Family::<RefusalLabels, Counter>::default();
        for reason in [RefusalReason::BacklogFull, RefusalReason::DiskFull] {
            let _ = refused.get_or_create(&RefusalLabels { reason });
        }
        registry.register(
            "writes_refused",
            "Writes answered without an ack because the WAL could not take them",
            refused.clone(),
        );
        let wal_bytes = Gauge::default();
        registry.register(
            "wal_bytes",
            "Bytes in WAL segment files (unflushed rows, plus flushed rows whose segment is \
             not deleted yet)",
            wal_bytes.clone(),
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
        registry.register(
            "watermark_lsn",
            "The last LSN committed in PostgreSQL",
            watermark.clone(),
        );
        Metrics {
            registry,
            refused,
            wal_bytes,
            wal,
            dead_letters,
            flush_errors,
            flush_retries,
            tables_held,
            watermark,
        }
    }

    /// Counts one refused write.
    pub fn refused(&self, reason: RefusalReason) {
        self.refused.get_or_create(&RefusalLabels { reason }).inc();
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
        self.watermark
            .set(i64::try_from(watermark.0).unwrap_or(i64::MAX));
        self.tables_held
            .set(i64::try_from(tables_held).unwrap_or(i64::MAX));
    }

    /// The metrics in the Prometheus text format.
    #[must_use]
    pub fn render(&self) -> String {
        self.wal_bytes
            .set(i64::try_from(self.wal.bytes()).unwrap_or(i64::MAX));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String does not fail");
        out
    }
}
