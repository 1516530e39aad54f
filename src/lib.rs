//! pgspool: a sidecar write-buffer daemon for PostgreSQL.
//!
//! Applications send rows as JSON over HTTP on a local Unix socket; pgspool appends them to
//! its own write-ahead log and acknowledges only after fdatasync, then loads them into
//! PostgreSQL with COPY, committing its log position (the watermark) in the same
//! transaction, so every acknowledged row lands exactly once, across crashes of either
//! side. ARCHITECTURE.md walks through the design; each module's header tells its part.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod acks;
pub mod allow;
pub mod app;
pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod copy;
pub mod dataset;
pub mod dead_letters;
pub mod demo;
pub mod flush;
pub mod fsutil;
pub mod ingest;
pub mod live;
pub mod logging;
pub mod lsn;
pub mod metrics;
pub mod pg;
pub mod pgtemp;
pub mod quarantine;
pub mod rowgroup;
pub mod rows;
pub mod schema;
pub mod send;
pub mod service;
pub mod status;
pub mod systemd;
pub mod table;
pub mod wal;
