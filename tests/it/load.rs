//! Load generators and delivery checks shared by the crash tests: concurrent clients that
//! send rows with unique ids into table `ev` and remember what was acknowledged, and the
//! checks that PostgreSQL holds every acknowledged row exactly once.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use pgspool::client::SpoolClient;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::harness::{Pg, client, post_ndjson, wait_until};

/// The table every load writes to.
pub const EVENTS: &str = "CREATE TABLE ev (id bigint NOT NULL, client int NOT NULL, payload text)";

/// Id of the row [`flush_through_marker`] sends; loads use ids from 0 up.
const MARKER_ID: i64 = -1;

/// What the requests of a load look like.
#[derive(Debug, Clone, Copy)]
pub enum Shape {
    /// `rows` rows per request, each with a payload of `payload` characters (at least a
    /// short description of the row).
    Fixed { rows: i64, payload: usize },
    /// 1 to `max_rows` rows per request, each with a payload of up to `max_payload`
    /// characters, drawn from an RNG seeded with `seed` (and the client's number).
    Varied {
        seed: u64,
        max_rows: i64,
        max_payload: usize,
    },
}

/// What the clients of a load sent and what was answered, shared by its clients. One
/// `Load` may serve several rounds of clients (ids stay unique across them).
#[derive(Default)]
pub struct Load {
    next_id: AtomicI64,
    /// Ids of rows whose request got a 202.
    pub acked: Mutex<Vec<i64>>,
    /// Ids of rows whose request got no answer (the connection failed).
    pub unanswered: Mutex<Vec<i64>>,
    /// Ids of rows whose request was refused (any status but 202).
    pub refused: Mutex<Vec<i64>>,
    /// The refusals: status and body.
    pub refusals: Mutex<Vec<String>>,
    pub acked_rows: AtomicU64,
    pub acked_requests: AtomicU64,
    /// Tells the clients to stop after their current request.
    pub stop: AtomicBool,
}

/// An NDJSON body of rows with ids `ids` sent by client `n`, each with a payload of
/// `payload` characters (at least the row's own description).
pub fn rows_body(ids: std::ops::Range<i64>, n: i64, payload: usize) -> String {
    const FILLER: &str = "abcdefghijklmnopqrstuvwxyz0123456789 ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    ids.map(|id| {
        let mut text = format!("row {id} of client {n}:");
        while text.len() < payload {
            let take = (payload - text.len()).min(FILLER.len());
            text.push_str(&FILLER[..take]);
        }
        format!("{{\"id\":{id},\"client\":{n},\"payload\":\"{text}\"}}\n")
    })
    .collect()
}

impl Load {
    /// The acknowledged ids; panics if any request was refused.
    pub fn acked_ids(&self) -> Vec<i64> {
        let refusals = self.refusals.lock().expect("lock");
        assert!(refusals.is_empty(), "writes refused: {refusals:?}");
        self.acked.lock().expect("lock").clone()
    }
}

/// Starts `clients` clients that send requests of `shape` with unique ids until told to
/// stop, until the daemon stops answering, or until a request is refused (recorded).
pub fn start_load(
    socket: &Path,
    clients: i64,
    load: &Arc<Load>,
    shape: Shape,
) -> Vec<tokio::task::JoinHandle<()>> {
    start_load_into(socket, "ev", clients, load, shape)
}

/// [`start_load`] into `table` (whose columns are those of [`EVENTS`]).
pub fn start_load_into(
    socket: &Path,
    table: &str,
    clients: i64,
    load: &Arc<Load>,
    shape: Shape,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|n| {
            let socket = socket.to_path_buf();
            let table = table.to_string();
            let load = Arc::clone(load);
            tokio::spawn(async move {
                let Ok(mut c) = SpoolClient::connect(&socket).await else {
                    return;
                };
                let mut rng = match shape {
                    Shape::Varied { seed, .. } => StdRng::seed_from_u64(seed ^ ((n as u64) << 48)),
                    Shape::Fixed { .. } => StdRng::seed_from_u64(0),
                };
                while !load.stop.load(Ordering::SeqCst) {
                    let (rows, payload) = match shape {
                        Shape::Fixed { rows, payload } => (rows, payload),
                        Shape::Varied {
                            max_rows,
                            max_payload,
                            ..
                        } => (
                            rng.random_range(1..=max_rows),
                            rng.random_range(0..=max_payload),
                        ),
                    };
                    let first = load.next_id.fetch_add(rows, Ordering::SeqCst);
                    let ids = first..first + rows;
                    let body = rows_body(ids.clone(), n, payload);
                    match c.post_rows(&table, "application/x-ndjson", body).await {
                        Ok(reply) if reply.status == 202 => {
                            load.acked.lock().expect("lock").extend(ids);
                            load.acked_rows.fetch_add(rows as u64, Ordering::SeqCst);
                            load.acked_requests.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(reply) => {
                            load.refused.lock().expect("lock").extend(ids);
                            let refusal = format!("{} {}", reply.status, reply.body);
                            load.refusals.lock().expect("lock").push(refusal);
                            return;
                        }
                        Err(_) => {
                            // The daemon is gone: this request may or may not be in the WAL.
                            load.unanswered.lock().expect("lock").extend(ids);
                            return;
                        }
                    }
                }
            })
        })
        .collect()
}

/// Waits until the load has `rows` rows acknowledged; panics if a request is refused.
pub async fn wait_acked(load: &Load, rows: u64) {
    wait_until(&format!("{rows} rows are acknowledged"), || async {
        let refusals = load.refusals.lock().expect("lock");
        assert!(refusals.is_empty(), "writes refused: {refusals:?}");
        load.acked_rows.load(Ordering::SeqCst) >= rows
    })
    .await;
}

/// How many times each id is in `ev`.
pub async fn id_counts(pg: &Pg) -> HashMap<i64, i64> {
    pg.client
        .query("SELECT id, count(*) FROM ev GROUP BY id", &[])
        .await
        .expect("count ids")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// Ids in `counts` more than once, sorted, at most `limit` of them.
fn loaded_twice(counts: &HashMap<i64, i64>, limit: usize) -> Vec<(i64, i64)> {
    let mut twice: Vec<(i64, i64)> = counts
        .iter()
        .filter(|&(_, &n)| n > 1)
        .map(|(&id, &n)| (id, n))
        .collect();
    twice.sort_unstable();
    twice.truncate(limit);
    twice
}

/// Every acknowledged id is in `ev` once, and no id is there twice.
pub async fn assert_exactly_once(pg: &Pg, acked: &[i64]) {
    let counts = id_counts(pg).await;
    let missing: Vec<i64> = acked
        .iter()
        .copied()
        .filter(|id| !counts.contains_key(id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged rows missing, the first: {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    let twice = loaded_twice(&counts, 20);
    assert!(twice.is_empty(), "rows loaded twice (id, times): {twice:?}");
}

/// What PostgreSQL holds, set against what a load sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tally {
    pub acked_rows: usize,
    /// Rows in `ev`, the marker excluded.
    pub found_rows: i64,
    /// Acknowledged ids not in `ev`.
    pub lost: usize,
    /// Ids in `ev` more than once.
    pub duplicated: usize,
    /// Ids of requests that got no answer, present in `ev`.
    pub unacked_present: usize,
    /// Ids of refused requests present in `ev`.
    pub refused_present: usize,
    /// Ids in `ev` that no request of the load sent.
    pub unknown: usize,
}

/// Counts what `ev` holds of what `load` sent.
pub async fn tally(pg: &Pg, load: &Load) -> Tally {
    let mut counts = id_counts(pg).await;
    counts.remove(&MARKER_ID);
    let acked = load.acked.lock().expect("lock");
    let unanswered = load.unanswered.lock().expect("lock");
    let refused = load.refused.lock().expect("lock");
    let sent: std::collections::HashSet<i64> = acked
        .iter()
        .chain(unanswered.iter())
        .chain(refused.iter())
        .copied()
        .collect();
    Tally {
        acked_rows: acked.len(),
        found_rows: counts.values().sum(),
        lost: acked.iter().filter(|id| !counts.contains_key(id)).count(),
        duplicated: counts.values().filter(|&&n| n > 1).count(),
        unacked_present: unanswered
            .iter()
            .filter(|id| counts.contains_key(id))
            .count(),
        refused_present: refused.iter().filter(|id| counts.contains_key(id)).count(),
        unknown: counts.keys().filter(|id| !sent.contains(id)).count(),
    }
}

/// Sends a marker row and waits until PostgreSQL has it: the flusher commits in LSN order,
/// so everything before the marker is committed too.
pub async fn flush_through_marker(pg: &Pg, socket: &Path) {
    let mut c = client(socket).await;
    let body = format!("{{\"id\":{MARKER_ID},\"client\":-1}}\n");
    let reply = post_ndjson(&mut c, "ev", &body).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    wait_until("the marker row is committed", || async {
        pg.count(&format!("SELECT count(*) FROM ev WHERE id = {MARKER_ID}"))
            .await
            == 1
    })
    .await;
}
