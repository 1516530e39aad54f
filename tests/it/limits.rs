//! The `[ingest]` limits against careless and hostile clients: each answers with its status
//! and a message naming its key, and is counted in `pgspool_requests_refused_total`; and
//! the daemon's memory stays bounded under 1,000 slow or oversized clients at once while
//! normal clients are still served.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::harness::{
    DEADLINE, DaemonProcess, Pg, client, config, post_ndjson, short_tempdir, start_daemon,
    wait_until,
};

/// Sends `request` (raw bytes) on a new connection and returns everything the daemon
/// answers until it closes the connection.
async fn raw_exchange(socket: &Path, request: &[u8]) -> String {
    let mut stream = UnixStream::connect(socket).await.expect("connect");
    stream.write_all(request).await.expect("send");
    read_all(&mut stream).await
}

async fn read_all(stream: &mut UnixStream) -> String {
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer))
        .await
        .expect("the daemon answers and closes in time")
        .expect("read");
    String::from_utf8_lossy(&answer).into_owned()
}

/// The head of a `POST /v1/tables/{table}/rows` of NDJSON with `extra` header lines.
fn head(table: &str, length: u64, extra: &str) -> String {
    format!(
        "POST /v1/tables/{table}/rows HTTP/1.1\r\nhost: pgspool\r\ncontent-type: \
         application/x-ndjson\r\ncontent-length: {length}\r\n{extra}\r\n"
    )
}

/// The value of `series` in the daemon's metrics.
async fn metric(socket: &Path, series: &str) -> f64 {
    let reply = client(socket).await.get("/metrics").await.expect("metrics");
    let text = reply.body.as_str().expect("text").to_string();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

fn refused(reason: &str) -> String {
    format!("pgspool_requests_refused_total{{reason=\"{reason}\"}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_limit_has_its_status_names_its_key_and_is_counted() {
    let pg = Pg::start().await;
    pg.exec("CREATE TABLE t (id int, a jsonb, b text, c text, d text)")
        .await;
    let dir = short_tempdir();
    let mut c = config(dir.path(), &pg.url());
    c.ingest.max_body_bytes = 4096;
    c.ingest.max_buffered_bytes = 4096;
    c.ingest.max_rows_per_request = 3;
    c.ingest.max_row_bytes = 100;
    c.ingest.max_columns = 3;
    c.ingest.max_depth = 3;
    c.ingest.max_header_bytes = 1024;
    c.ingest.header_timeout = Duration::from_secs(1);
    c.ingest.body_timeout = Duration::from_secs(1);
    let daemon = start_daemon(c).await;
    let socket = daemon.socket().to_path_buf();
    let mut c = client(&socket).await;
    // Within every limit.
    let ok = "{\"id\":1,\"a\":[[1]],\"b\":\"x\"}\n{\"id\":2}\n{\"id\":3}\n";
    let reply = post_ndjson(&mut c, "t", ok).await;
    assert_eq!(reply.status, 202, "{:?}", reply.body);
    for (body, key) in [
        ("{\"id\":1}\n".repeat(4), "[ingest] max_rows_per_request"),
        (
            format!("{{\"id\":1,\"b\":\"{}\"}}\n", "x".repeat(100)),
            "[ingest] max_row_bytes",
        ),
        (
            "{\"id\":1,\"b\":\"x\",\"c\":\"y\",\"d\":\"z\"}\n".to_string(),
            "[ingest] max_columns",
        ),
        (
            "{\"id\":1,\"a\":[[[1]]]}\n".to_string(),
            "[ingest] max_depth",
        ),
        ("{\"id\":1}\n".repeat(500), "[ingest] max_body_bytes"),
    ] {
        let reply = post_ndjson(&mut c, "t", &body).await;
        assert_eq!(reply.status, 413, "{key}: {:?}", reply.body);
        let error = reply.body["error"].as_str().expect("an error message");
        assert!(error.contains(key), "{error}");
    }
    // A head over max_header_bytes: 431 naming the key; one over twice the limit is not
    // read to its end, and gets hyper's 431, without a body.
    let answer = raw_exchange(
        &socket,
        head("t", 0, &format!("x-big: {}\r\n", "y".repeat(1500))).as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert!(answer.contains("[ingest] max_header_bytes"), "{answer}");
    let answer = raw_exchange(
        &socket,
        head("t", 0, &format!("x-big: {}\r\n", "y".repeat(5000))).as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    // A head that does not come within header_timeout: 408, naming the key.
    let started = Instant::now();
    let answer = raw_exchange(&socket, b"POST /v1/tables/t/rows HTTP/1.1\r\nhost: p").await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("[ingest] header_timeout"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // A body that does not come within body_timeout: 408, naming the key.
    let answer = raw_exchange(
        &socket,
        format!("{}{{\"id\":", head("t", 100, "")).as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("[ingest] body_timeout"), "{answer}");
    for (reason, count) in [
        ("too_many_rows", 1.0),
        ("row_too_large", 1.0),
        ("too_many_columns", 1.0),
        ("too_deep", 1.0),
        ("body_too_large", 1.0),
        ("headers_too_large", 2.0),
        ("header_timeout", 1.0),
        ("body_timeout", 1.0),
        ("buffers_full", 0.0),
        ("too_many_connections", 0.0),
        ("peer", 0.0),
    ] {
        assert_eq!(metric(&socket, &refused(reason)).await, count, "{reason}");
    }
    // Nothing refused was kept.
    crate::harness::flushed(&daemon).await;
    assert_eq!(pg.count("SELECT count(*) FROM t").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_get_503_until_one_closes() {
    let pg = Pg::start().await;
    let dir = short_tempdir();
    let mut c = config(dir.path(), &pg.url());
    c.ingest.max_connections = 4;
    let daemon = start_daemon(c).await;
    let socket = daemon.socket().to_path_buf();
    let mut idle = Vec::new();
    for _ in 0..4 {
        let mut c = client(&socket).await;
        assert_eq!(c.get("/healthz").await.expect("healthz").status, 200);
        idle.push(c);
    }
    let answer = raw_exchange(&socket, b"GET /healthz HTTP/1.1\r\nhost: p\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("[ingest] max_connections"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    drop(idle.pop());
    wait_until("a connection is admitted again", || async {
        let answer = raw_exchange(
            &socket,
            b"GET /healthz HTTP/1.1\r\nhost: p\r\nconnection: close\r\n\r\n",
        )
        .await;
        answer.starts_with("HTTP/1.1 200")
    })
    .await;
    drop(idle);
    assert!(metric(&socket, &refused("too_many_connections")).await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_in_memory_are_bounded_and_given_back() {
    let pg = Pg::start().await;
    pg.exec("CREATE TABLE t (id int, b text)").await;
    let dir = short_tempdir();
    let mut c = config(dir.path(), &pg.url());
    c.ingest.max_body_bytes = 1 << 20;
    c.ingest.max_buffered_bytes = 1 << 20;
    c.ingest.body_timeout = Duration::from_secs(5);
    let daemon = start_daemon(c).await;
    let socket = daemon.socket().to_path_buf();
    // One client sends most of a large body, then stalls.
    let mut stalled = UnixStream::connect(&socket).await.expect("connect");
    stalled
        .write_all(head("t", 1 << 20, "").as_bytes())
        .await
        .expect("head");
    stalled
        .write_all(&vec![b' '; 900 << 10])
        .await
        .expect("most of the body");
    let row = format!("{{\"id\":1,\"b\":\"{}\"}}\n", "x".repeat(1000));
    let body = row.repeat(400);
    let mut c = client(&socket).await;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let reply = post_ndjson(&mut c, "t", &body).await;
        if reply.status == 503 {
            let error = reply.body["error"].as_str().expect("message");
            assert!(error.contains("[ingest] max_buffered_bytes"), "{error}");
            break;
        }
        assert_eq!(reply.status, 202, "{:?}", reply.body);
        assert!(
            Instant::now() < deadline,
            "the stalled body never filled the buffers"
        );
    }
    // The stalled client times out and its share is given back.
    let answer = read_all(&mut stalled).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let mut c = client(&socket).await;
    let reply = post_ndjson(&mut c, "t", &body).await;
    assert_eq!(reply.status, 202, "{:?}", reply.body);
    assert!(metric(&socket, &refused("buffers_full")).await >= 1.0);
}

/// A request waiting for its rows to be committed (`?ack=committed`) no longer holds its
/// body, nor its share of `[ingest] max_buffered_bytes`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_for_its_commit_holds_no_buffer() {
    let pg = Pg::start().await;
    pg.exec("CREATE TABLE t (id int, b text)").await;
    let dir = short_tempdir();
    let mut c = config(dir.path(), &pg.url());
    c.ingest.max_body_bytes = 1 << 20;
    c.ingest.max_buffered_bytes = 1 << 20;
    let daemon = start_daemon(c).await;
    let socket = daemon.socket().to_path_buf();
    let mut c = client(&socket).await;
    assert_eq!(post_ndjson(&mut c, "t", "{\"id\":0}\n").await.status, 202);
    crate::harness::flushed(&daemon).await;
    let locker = crate::harness::connect(&pg.url()).await;
    locker
        .batch_execute("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    // Each body takes most of max_buffered_bytes while it is read.
    let body = |from: u32| -> String {
        (from..from + 700)
            .map(|i| format!("{{\"id\":{i},\"b\":\"{}\"}}\n", "x".repeat(990)))
            .collect()
    };
    let mut waiting = client(&socket).await;
    let first = body(1);
    let waiter = tokio::spawn(async move {
        waiting
            .post_rows_with("t", "ack=committed", "application/x-ndjson", first)
            .await
            .expect("the waiting request")
    });
    wait_until("the waiting request's rows are durable", || async {
        metric(&socket, "pgspool_rows_received_total").await >= 701.0
    })
    .await;
    let reply = post_ndjson(&mut c, "t", &body(701)).await;
    assert_eq!(reply.status, 202, "{:?}", reply.body);
    locker.batch_execute("ROLLBACK").await.expect("unlock");
    let reply = waiter.await.expect("the waiting request");
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.body["committed"], 700);
}

/// The daemon's resident memory, in KiB, from `/proc/<pid>/status` (`field` is `VmRSS`
/// or `VmHWM`, the peak).
fn memory_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {status}"))
}

/// Raises this process's open-file limit to its hard limit: the test holds over 1,000
/// connections, and the daemon it spawns inherits the limit.
fn raise_open_files() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    assert!(
        hard >= 4096,
        "the open-file hard limit {hard} is too low for this test"
    );
}

/// 1,000 hostile clients at once: 400 trickle their request heads, 300 declare bodies far
/// over the limit, 300 send 2 MiB of an 8 MiB body and stall. The daemon's peak RSS stays
/// under [`MEMORY_BOUND_MIB`] while normal clients' writes are acknowledged; without
/// `[ingest] max_buffered_bytes` the stalled bodies alone would hold 600 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_under_a_thousand_slow_or_oversized_clients() {
    /// The daemon's baseline (14 MiB measured) plus `max_buffered_bytes` (64 MiB below)
    /// plus 1,000 connections' read buffers (64 KiB at most each) and slack; measured
    /// peaks were near 115 MiB, and 670 MiB without `max_buffered_bytes`.
    const MEMORY_BOUND_MIB: u64 = 192;
    raise_open_files();
    let pg = Pg::start().await;
    pg.exec("CREATE TABLE t (id int)").await;
    let dir = short_tempdir();
    let file = dir.path().join("pgspool.toml");
    std::fs::write(
        &file,
        "[ingest]\nmax_connections = 2000\nmax_buffered_bytes = 67108864\n\
         header_timeout = \"60s\"\nbody_timeout = \"60s\"\n",
    )
    .expect("config");
    let daemon = DaemonProcess::spawn(
        dir.path(),
        &pg.url(),
        &["--config", file.to_str().expect("utf-8")],
    )
    .await;
    let baseline = memory_kib(daemon.pid(), "VmRSS") / 1024;
    let socket = Arc::new(daemon.socket.clone());
    let ready = Arc::new(AtomicUsize::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut hostile = Vec::new();
    for i in 0..1000 {
        let (socket, ready, stop) = (Arc::clone(&socket), Arc::clone(&ready), stop.clone());
        hostile.push(tokio::spawn(async move {
            let mut s = UnixStream::connect(&*socket).await.expect("connect");
            match i % 10 {
                // Slow heads: a byte every 250 ms.
                0..4 => {
                    s.write_all(b"POST /v1/tables/t/rows HTTP/1.1\r\nx-slow: ")
                        .await
                        .expect("start");
                    ready.fetch_add(1, Ordering::Relaxed);
                    while !stop.is_cancelled() {
                        if s.write_all(b"a").await.is_err() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
                // Oversized: 64 GiB declared, sent until the daemon closes.
                4..7 => {
                    s.write_all(head("t", 64 << 30, "").as_bytes())
                        .await
                        .expect("head");
                    let chunk = vec![b' '; 64 << 10];
                    while s.write_all(&chunk).await.is_ok() {}
                    ready.fetch_add(1, Ordering::Relaxed);
                }
                // Large bodies that stall after 2 MiB, then trickle.
                _ => {
                    s.write_all(head("t", 8 << 20, "").as_bytes())
                        .await
                        .expect("head");
                    let _ = s.write_all(&vec![b' '; 2 << 20]).await;
                    ready.fetch_add(1, Ordering::Relaxed);
                    while !stop.is_cancelled() {
                        if s.write_all(b" ").await.is_err() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
            }
        }));
    }
    wait_until("every hostile client is in place", || async {
        ready.load(Ordering::Relaxed) == 1000
    })
    .await;
    // Normal clients are served meanwhile.
    let mut c = client(&daemon.socket).await;
    for round in 0..20 {
        let body: String = (round * 100..(round + 1) * 100)
            .map(|i| format!("{{\"id\":{i}}}\n"))
            .collect();
        let reply = tokio::time::timeout(Duration::from_secs(10), post_ndjson(&mut c, "t", &body))
            .await
            .expect("a normal client is answered within 10 s");
        assert_eq!(reply.status, 202, "{:?}", reply.body);
    }
    wait_until("the normal clients' rows are in PostgreSQL", || async {
        pg.count("SELECT count(*) FROM t").await == 2000
    })
    .await;
    let peak = memory_kib(daemon.pid(), "VmHWM") / 1024;
    eprintln!("daemon memory under 1,000 hostile clients: {baseline} MiB before, peak {peak} MiB");
    assert!(
        peak < MEMORY_BOUND_MIB,
        "the daemon's peak RSS was {peak} MiB, above {MEMORY_BOUND_MIB} MiB: {}",
        daemon.log_tail()
    );
    assert!(
        metric(&daemon.socket, &refused("buffers_full")).await > 0.0,
        "the stalled bodies did not reach max_buffered_bytes"
    );
    assert!(metric(&daemon.socket, &refused("body_too_large")).await >= 300.0);
    stop.cancel();
    for task in hostile {
        task.await.expect("a hostile client panicked");
    }
}
