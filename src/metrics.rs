//! Prometheus metrics, served at `GET /metrics` in the text exposition format.
//!
//! Each daemon has its own registry (no global state), so several daemons in one process,
//! as in the tests, count apart.
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `pgspool_writes_refused_total{reason}` | counter | writes answered without an ack because the WAL could not take them: `backlog_full` (503, `[wal] max_bytes` reached) or `disk_full` (507) |
//! | `pgspool_wal_bytes` | gauge | bytes in WAL segment files: the unflushed backlog plus flushed rows whose segment is not deleted yet |

use std::fmt::{self, Write};
use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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

/// The daemon's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    refused: Family<RefusalLabels, Counter>,
    wal_bytes: Gauge,
    wal: Arc<WalDir>,
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
        Metrics {
            registry,
            refused,
            wal_bytes,
            wal,
        }
    }

    /// Counts one refused write.
    pub fn refused(&self, reason: RefusalReason) {
        self.refused.get_or_create(&RefusalLabels { reason }).inc();
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
