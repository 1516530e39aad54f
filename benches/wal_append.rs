//! The WAL append path: a request's records handed to the writer thread and awaited until
//! they are durable, as the ingest handler does with `?ack=durable` (the default).
//!
//! Each bench opens a fresh `Wal` (64 MiB segments, the default) in a temporary directory
//! and appends to it with `Appender::append`. **These figures include the `pwrite` and the
//! `fdatasync` of every group commit, so they measure the disk as much as pgspool**: the
//! temporary directory is made under `$PGSPOOL_BENCH_DIR` if set (point it at the file
//! system the WAL will live on), else under the system's temporary directory (mind a
//! tmpfs there: its `fdatasync` costs nothing).
//!
//! - `append_durable/flights_1000`: one record of one 1000-row flights row group (COPY
//!   text, about 100 KB) per append;
//! - `append_durable/flights_1`: one record of one flights row per append;
//! - `append_durable/flights_1_x64`: 64 one-row appends sent at once and all awaited, as
//!   64 clients would: the writer gathers them into group commits, so this shows what
//!   group commit saves per row;
//! - `record_crc/*`: the CPU part without I/O, `AppendRecord::new` (the payload's CRC-32C,
//!   computed on the ingest task). The writer's own encoding of the record header into
//!   its group buffer (`AppendRecord::encode_into`) is crate-private and not measured
//!   alone.
//!
//! After each `append_durable` bench a line gives its group commits: how many requests
//! each answered on average, and the mean `fdatasync` time (from the WAL's
//! `CommitObserver`, over warm-up and measurement).
//!
//! Row groups are built from the bundled nycflights13 data by `rows::encode`, as ingest
//! builds them; building records (and their CRC) is kept out of the append timings.
//! Throughput is per row and per byte written to the segment (record header included).
//!
//! Run: `cargo bench --bench wal_append`. To compare a change, run
//! `cargo bench --bench wal_append -- --save-baseline before` on the old code, then
//! `cargo bench --bench wal_append -- --baseline before` on the new: criterion prints the
//! change of each figure and whether it is significant. The disk's noise is large: compare
//! runs on the same machine, back to back.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{
    BatchSize, BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use pgspool::config::Config;
use pgspool::rows::{self, BodyFormat};
use pgspool::wal::{AppendRecord, CommitObserver, GroupCommit, Wal, WalOptions};
use tokio::runtime::Runtime;

mod common;
use common::{flights_lines, flights_schema};

/// Rows in the big row group: a typical `pgspool send` request.
const ROWS: usize = 1000;
/// Concurrent one-row appends in `flights_1_x64`.
const CLIENTS: usize = 64;

/// One row group payload and its rows, as ingest hands it to the WAL.
struct Payload {
    name: &'static str,
    rows: u32,
    bytes: Vec<u8>,
}

impl Payload {
    fn record(&self) -> AppendRecord {
        AppendRecord::new(self.rows, self.bytes.clone())
    }

    /// Rows and bytes (header included) of `appends` records of this payload.
    fn throughput(&self, appends: u64) -> Throughput {
        Throughput::ElementsAndBytes {
            elements: u64::from(self.rows) * appends,
            bytes: self.record().encoded_len() * appends,
        }
    }
}

/// The first `n` flights rows encoded into one row group.
fn flights_group(name: &'static str, n: usize) -> Payload {
    let body: String = flights_lines(n)
        .iter()
        .flat_map(|line| [line.as_str(), "\n"])
        .collect();
    let parsed = rows::parse(&body, BodyFormat::Ndjson).expect("the rows parse");
    let mut groups = rows::encode(&flights_schema(), &parsed).expect("the rows encode");
    assert_eq!(groups.len(), 1, "flights rows make one row group");
    let (rows, bytes) = groups.remove(0);
    Payload { name, rows, bytes }
}

/// Counts the writer's group commits.
#[derive(Debug, Default)]
struct Commits {
    groups: AtomicU64,
    requests: AtomicU64,
    fdatasync_ns: AtomicU64,
}

impl CommitObserver for Commits {
    fn committed(&self, commit: &GroupCommit) {
        self.groups.fetch_add(1, Ordering::Relaxed);
        self.requests
            .fetch_add(commit.requests as u64, Ordering::Relaxed);
        let ns = u64::try_from(commit.fdatasync.as_nanos()).unwrap_or(u64::MAX);
        self.fdatasync_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

impl Commits {
    fn report(&self, bench: &str) {
        let groups = self.groups.load(Ordering::Relaxed).max(1);
        let requests = self.requests.load(Ordering::Relaxed);
        let fdatasync_ns = self.fdatasync_ns.load(Ordering::Relaxed);
        println!(
            "{bench}: {groups} group commits, {:.1} appends per commit, fdatasync {:.2} ms on \
             average",
            requests as f64 / groups as f64,
            fdatasync_ns as f64 / groups as f64 / 1e6,
        );
    }
}

/// A fresh WAL in a temporary directory (see the header for where), with the daemon's
/// default segment size, telling `commits` of its group commits.
fn open_wal(commits: &Arc<Commits>) -> (tempfile::TempDir, Wal) {
    let dir = match std::env::var_os("PGSPOOL_BENCH_DIR") {
        Some(parent) => tempfile::tempdir_in(parent),
        None => tempfile::tempdir(),
    }
    .expect("a temporary directory");
    let wal = Wal::open(&WalOptions {
        dir: dir.path().join("wal"),
        segment_bytes: Config::default().wal.segment_bytes,
        observer: Some(Arc::clone(commits) as Arc<dyn CommitObserver>),
    })
    .expect("the WAL opens");
    (dir, wal)
}

fn append_durable(c: &mut Criterion) {
    let runtime = Runtime::new().expect("a Tokio runtime");
    let payloads = [
        flights_group("flights_1000", ROWS),
        flights_group("flights_1", 1),
    ];
    let mut group = c.benchmark_group("append_durable");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    for payload in &payloads {
        let commits = Arc::new(Commits::default());
        let (_dir, wal) = open_wal(&commits);
        let appender = wal.appender();
        group.throughput(payload.throughput(1));
        group.bench_function(BenchmarkId::from_parameter(payload.name), |b| {
            b.iter_batched(
                || vec![payload.record()],
                |records| runtime.block_on(appender.append(records)).expect("durable"),
                BatchSize::SmallInput,
            );
        });
        drop(appender);
        runtime.block_on(wal.close()).expect("the WAL closes");
        commits.report(&format!("append_durable/{}", payload.name));
    }

    let one = &payloads[1];
    let commits = Arc::new(Commits::default());
    let (_dir, wal) = open_wal(&commits);
    let appender = wal.appender();
    group.throughput(one.throughput(CLIENTS as u64));
    group.bench_function(BenchmarkId::from_parameter("flights_1_x64"), |b| {
        b.iter_batched(
            || (0..CLIENTS).map(|_| vec![one.record()]).collect::<Vec<_>>(),
            |requests| {
                runtime.block_on(futures::future::try_join_all(
                    requests.into_iter().map(|records| appender.append(records)),
                ))
            },
            BatchSize::SmallInput,
        );
    });
    drop(appender);
    runtime.block_on(wal.close()).expect("the WAL closes");
    commits.report("append_durable/flights_1_x64");
    group.finish();
}

fn record_crc(c: &mut Criterion) {
    let mut group = c.benchmark_group("record_crc");
    for payload in [
        flights_group("flights_1000", ROWS),
        flights_group("flights_1", 1),
    ] {
        group.throughput(payload.throughput(1));
        group.bench_function(BenchmarkId::from_parameter(payload.name), |b| {
            b.iter_batched(
                || payload.bytes.clone(),
                |bytes| AppendRecord::new(payload.rows, black_box(bytes)),
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::config();
    targets = append_durable, record_crc
}
criterion_main!(benches);
