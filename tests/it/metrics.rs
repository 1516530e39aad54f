//! `GET /metrics`: the values that must follow from the traffic sent, the output checked by
//! `promtool check metrics`, `pgspool_postgres_up` following PostgreSQL, and the Grafana
//! dashboard in contrib/ naming only metrics the daemon exports.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use pgspool::client::{Reply, SpoolClient};
use pgspool::pgtemp::StopMode;

use crate::harness::{Pg, client, config, post_ndjson, short_tempdir, start_daemon, wait_until};

/// One scrape of `/metrics`: its text and its samples by series (`name{labels}` as written).
struct Scrape {
    text: String,
    samples: HashMap<String, f64>,
}

impl Scrape {
    /// Parses the text format: every line that is not a comment is `series value`.
    fn parse(text: String) -> Scrape {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').expect("a sample line");
                let value = value.parse::<f64>().unwrap_or_else(|e| panic!("{l}: {e}"));
                (series.to_string(), value)
            })
            .collect();
        Scrape { text, samples }
    }

    /// The value of `series`; panics if the scrape lacks it.
    fn value(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("no series {series} in\n{}", self.text))
    }

    /// The names of every sample (without labels).
    fn names(&self) -> BTreeSet<&str> {
        self.samples
            .keys()
            .map(|s| s.split('{').next().expect("a name"))
            .collect()
    }
}

/// Scrapes the daemon on `socket` (on a connection of its own).
async fn scrape(socket: &Path) -> Scrape {
    let reply = client(socket)
        .await
        .get("/metrics")
        .await
        .expect("GET /metrics");
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    Scrape::parse(reply.body.as_str().expect("a text body").to_string())
}

/// Runs `promtool check metrics` on `text`; panics unless it passes without a word.
fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run promtool ({e}): install it (Debian: `apt-get install --no-install-recommends \
                 prometheus`; .ci/run does so when it is missing)"
            )
        });
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("wait for promtool");
    crate::harness::assert_quiet_success(&out, &format!("promtool check metrics of\n{text}"));
}

async fn post(c: &mut SpoolClient, table: &str, query: &str, body: &str) -> Reply {
    c.post_rows_with(table, query, "application/x-ndjson", body.to_string())
        .await
        .expect("request")
}

/// Load: four accepted writes (each ack level, a row PostgreSQL refuses, a row pgspool
/// refuses kept for dead letters), one for a table that does not exist, a health check and
/// an unknown path. Every counter says exactly that, the histograms saw every group commit
/// and batch, the output passes `promtool check metrics`, and the dashboard names only
/// exported series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_the_traffic_and_pass_promtool() {
    let pg = Pg::start().await;
    pg.exec("CREATE TABLE t (id int PRIMARY KEY, v int CHECK (v >= 0))")
        .await;
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let socket = daemon.socket().to_path_buf();
    let before = scrape(&socket).await;
    assert_eq!(before.value("pgspool_rows_received_total"), 0.0);
    assert_eq!(before.value("pgspool_wal_segments"), 1.0);
    promtool_check(&before.text);

    let mut c = client(&socket).await;
    let bodies = [
        (
            "",
            "{\"id\":1,\"v\":1}\n{\"id\":2,\"v\":2}\n{\"id\":3,\"v\":3}\n",
        ),
        ("ack=none", "{\"id\":4,\"v\":4}\n{\"id\":5,\"v\":5}\n"),
        ("ack=committed", "{\"id\":6,\"v\":6}\n{\"id\":7,\"v\":-7}\n"),
        ("invalid=dead_letter", "{\"id\":8,\"v\":8}\n[8]\n"),
    ];
    let mut last_lsn = 0;
    for (query, body) in bodies {
        let reply = post(&mut c, "public.t", query, body).await;
        assert!(reply.status.is_success(), "{query}: {}", reply.body);
        last_lsn = reply.body["last_lsn"].as_u64().expect("last_lsn");
    }
    let rows = 9;
    assert_eq!(last_lsn, rows);
    let body_bytes: usize = bodies.iter().map(|(_, body)| body.len()).sum();
    let missing = post_ndjson(&mut c, "public.nope", "{\"id\":1}\n").await;
    assert_eq!(missing.status, 404, "{}", missing.body);
    assert_eq!(c.get("/healthz").await.expect("healthz").status, 200);
    assert_eq!(c.get("/nowhere").await.expect("GET").status, 404);

    wait_until("the watermark reaches the last LSN", || async {
        scrape(&socket).await.value("pgspool_watermark_lsn") == rows as f64
    })
    .await;
    let m = scrape(&socket).await;
    let rows = rows as f64;
    for (series, expected) in [
        ("pgspool_rows_received_total", rows),
        ("pgspool_received_bytes_total", body_bytes as f64),
        (
            "pgspool_http_requests_total{route=\"rows\",code=\"202\"}",
            3.0,
        ),
        (
            "pgspool_http_requests_total{route=\"rows\",code=\"200\"}",
            1.0,
        ),
        (
            "pgspool_http_requests_total{route=\"rows\",code=\"404\"}",
            1.0,
        ),
        (
            "pgspool_http_requests_total{route=\"healthz\",code=\"200\"}",
            1.0,
        ),
        (
            "pgspool_http_requests_total{route=\"other\",code=\"404\"}",
            1.0,
        ),
        ("pgspool_ack_latency_seconds_count{ack=\"durable\"}", 2.0),
        ("pgspool_ack_latency_seconds_count{ack=\"none\"}", 1.0),
        ("pgspool_ack_latency_seconds_count{ack=\"committed\"}", 1.0),
        // One append per accepted request, whatever the grouping.
        ("pgspool_wal_group_commit_requests_sum", 4.0),
        ("pgspool_wal_group_commit_rows_sum", rows),
        ("pgspool_flush_batch_rows_sum", rows),
        ("pgspool_postgres_up", 1.0),
        ("pgspool_watermark_lsn", rows),
        ("pgspool_wal_durable_lsn", rows),
        ("pgspool_wal_rows_pending", 0.0),
        ("pgspool_wal_segments", 1.0),
        // The row PostgreSQL refused and the one pgspool refused.
        ("pgspool_dead_letters_total{table=\"public.t\"}", 2.0),
        ("pgspool_flush_errors_total{sqlstate_class=\"23\"}", 1.0),
        ("pgspool_flush_errors_total{sqlstate_class=\"none\"}", 1.0),
        ("pgspool_writes_refused_total{reason=\"backlog_full\"}", 0.0),
        ("pgspool_tables_held", 0.0),
    ] {
        assert_eq!(m.value(series), expected, "{series} in\n{}", m.text);
    }
    assert!(m.value("pgspool_http_requests_total{route=\"metrics\",code=\"200\"}") >= 2.0);
    let syncs = m.value("pgspool_wal_fdatasync_duration_seconds_count");
    assert!(syncs >= 1.0, "{}", m.text);
    assert!(m.value("pgspool_wal_fdatasync_duration_seconds_sum") > 0.0);
    assert_eq!(
        m.value("pgspool_wal_fdatasync_duration_seconds_bucket{le=\"+Inf\"}"),
        syncs
    );
    assert_eq!(m.value("pgspool_wal_group_commit_requests_count"), syncs);
    let batches = m.value("pgspool_flush_batch_rows_count");
    assert!(batches >= 1.0, "{}", m.text);
    assert_eq!(
        m.value("pgspool_flush_batch_duration_seconds_count"),
        batches
    );
    assert!(m.value("pgspool_ack_latency_seconds_sum{ack=\"committed\"}") > 0.0);
    assert!(m.value("pgspool_wal_bytes") > 0.0);
    promtool_check(&m.text);

    // The example dashboard asks only for series the daemon exports.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/grafana-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("read the dashboard"))
            .expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 8, "{exprs:?}");
    let exported = m.names();
    for expr in &exprs {
        for word in expr.split(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_')) {
            if word.starts_with("pgspool_") {
                assert!(
                    exported.contains(word),
                    "the dashboard asks for {word}, which /metrics lacks: {expr}"
                );
            }
        }
    }
    daemon.stop().await.expect("stop");
}

/// Every `expr` string in a dashboard.
fn collect_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match v {
                    serde_json::Value::String(s) if key == "expr" => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// Segment files in the WAL directory `wal`.
fn segment_files(wal: &Path) -> f64 {
    pgspool::wal::segment::list(wal)
        .expect("list segments")
        .len() as f64
}

/// `pgspool_postgres_up` is 0 before the flusher ever connects, 1 once it did, and 0 again
/// once PostgreSQL is gone and a session fails; rows written meanwhile are pending and
/// fill new segments, which are counted as they come and go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_up_follows_postgresql() {
    let mut pg = Pg::start().await;
    pg.exec("CREATE TABLE t (id int PRIMARY KEY, note text)")
        .await;
    pg.stop(StopMode::Fast);
    let dir = short_tempdir();
    let wal = dir.path().join("wal");
    let mut cfg = config(dir.path(), &pg.url());
    cfg.wal.segment_bytes = 64 << 10;
    let daemon = start_daemon(cfg).await;
    let socket = daemon.socket().to_path_buf();
    let m = scrape(&socket).await;
    assert_eq!(m.value("pgspool_postgres_up"), 0.0, "{}", m.text);

    pg.restart().await;
    wait_until("pgspool_postgres_up is 1", || async {
        scrape(&socket).await.value("pgspool_postgres_up") == 1.0
    })
    .await;
    let mut c = client(&socket).await;
    assert_eq!(post_ndjson(&mut c, "t", "{\"id\":1}\n").await.status, 202);
    wait_until("the first row is flushed", || async {
        scrape(&socket).await.value("pgspool_watermark_lsn") == 1.0
    })
    .await;

    pg.stop(StopMode::Fast);
    // The next batch finds PostgreSQL gone.
    assert_eq!(post_ndjson(&mut c, "t", "{\"id\":2}\n").await.status, 202);
    wait_until("pgspool_postgres_up is 0", || async {
        scrape(&socket).await.value("pgspool_postgres_up") == 0.0
    })
    .await;
    let m = scrape(&socket).await;
    assert_eq!(m.value("pgspool_wal_rows_pending"), 1.0, "{}", m.text);
    assert!(m.value("pgspool_flush_retries_total") >= 1.0, "{}", m.text);
    promtool_check(&m.text);

    // Four requests of about 30 kB each: more than one segment of 64 kB.
    let note = "n".repeat(300);
    for request in 0..4 {
        let body: String = (0..100)
            .map(|i| {
                format!(
                    "{{\"id\":{},\"note\":\"{note}\"}}\n",
                    10 + request * 100 + i
                )
            })
            .collect();
        assert_eq!(post_ndjson(&mut c, "t", &body).await.status, 202);
    }
    let m = scrape(&socket).await;
    assert_eq!(m.value("pgspool_wal_rows_pending"), 401.0, "{}", m.text);
    assert!(m.value("pgspool_wal_segments") >= 2.0, "{}", m.text);
    assert_eq!(m.value("pgspool_wal_segments"), segment_files(&wal));

    pg.restart().await;
    wait_until(
        "the rows are flushed and their segments deleted",
        || async {
            let m = scrape(&socket).await;
            m.value("pgspool_postgres_up") == 1.0
                && m.value("pgspool_wal_rows_pending") == 0.0
                && m.value("pgspool_wal_segments") == 1.0
        },
    )
    .await;
    assert_eq!(segment_files(&wal), 1.0);
    assert_eq!(pg.count("SELECT count(*) FROM t").await, 402);
    daemon.stop().await.expect("stop");
}
