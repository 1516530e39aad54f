//! pgspool as a systemd service: the sd_notify(3) sequence (READY after recovery,
//! WATCHDOG only while the flusher makes progress, RELOADING and STOPPING), socket
//! activation through `systemd-socket-activate`, and SIGHUP reloading the configuration.
//! Each test listens on a datagram socket of its own set as `NOTIFY_SOCKET`, as systemd
//! does.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pgspool::pgtemp::StopMode;
use tokio::net::UnixDatagram;

use crate::harness::{DEADLINE, DaemonProcess, Pg, client, post_ndjson, short_tempdir, wait_until};

/// The datagram socket systemd would listen on, and the messages received so far.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    received: Vec<String>,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        NotifySocket {
            socket: UnixDatagram::bind(&path).expect("bind the notify socket"),
            path,
            received: Vec::new(),
        }
    }

    /// Receives messages until one has the line `line`; returns its index in
    /// [`NotifySocket::received`]. Panics after [`DEADLINE`], listing what came.
    async fn wait_for(&mut self, line: &str) -> usize {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(i) = self.find(line, 0) {
                return i;
            }
            self.receive(deadline, line).await;
        }
    }

    /// Receives messages until one has a line that starts with `prefix`.
    async fn wait_for_prefix(&mut self, prefix: &str) {
        let deadline = Instant::now() + DEADLINE;
        while !self
            .received
            .iter()
            .any(|m| m.lines().any(|l| l.starts_with(prefix)))
        {
            self.receive(deadline, prefix).await;
        }
    }

    /// Receives one message, or panics at `deadline`, naming what was waited for.
    async fn receive(&mut self, deadline: Instant, waited_for: &str) {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut buf = vec![0; 4096];
        match tokio::time::timeout(left, self.socket.recv(&mut buf)).await {
            Ok(Ok(n)) => self
                .received
                .push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Ok(Err(e)) => panic!("receiving on the notify socket: {e}"),
            Err(_) => panic!(
                "no {waited_for} within {DEADLINE:?}; received {:?}",
                self.received
            ),
        }
    }

    /// The index of the first message from `from` on with the line `line`.
    fn find(&self, line: &str, from: usize) -> Option<usize> {
        (from..self.received.len()).find(|&i| self.received[i].lines().any(|l| l == line))
    }

    /// Forgets what was received, and what is queued.
    fn clear(&mut self) {
        let mut buf = vec![0; 4096];
        while self.socket.try_recv(&mut buf).is_ok() {}
        self.received.clear();
    }
}

fn signal(process: &DaemonProcess, signal: Signal) {
    let pid = Pid::from_raw(i32::try_from(process.pid()).expect("pid"));
    kill(pid, signal).expect("send the signal");
}

fn rows(from: u32, n: u32) -> String {
    (from..from + n)
        .map(|i| format!("{{\"id\":{i}}}\n"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_after_recovery_watchdog_while_flushing_stopping_on_sigterm() {
    let pg = Pg::start().await;
    pg.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let dir = short_tempdir();
    let mut notify = NotifySocket::bind(dir.path());
    let notify_path = notify.path.clone();
    let env: [(&str, &OsStr); 2] = [
        ("NOTIFY_SOCKET", notify_path.as_os_str()),
        ("WATCHDOG_USEC", OsStr::new("1500000")),
    ];
    let daemon = DaemonProcess::start_with_env(&[], dir.path(), &pg.url(), &[], &env);
    notify.wait_for("READY=1").await;
    // READY=1 means writes are accepted: the very next request is acknowledged.
    let mut c = client(&daemon.socket).await;
    let reply = post_ndjson(&mut c, "t", &rows(0, 100)).await;
    assert_eq!(reply.status, 202, "{:?}", reply.body);
    // systemctl status shows the backlog and PostgreSQL's state.
    notify
        .wait_for("STATUS=backlog 0 rows; PostgreSQL: up")
        .await;
    // The watchdog is pinged again and again while the flusher works.
    for round in 0..3 {
        notify.clear();
        let reply = post_ndjson(&mut c, "t", &rows(100 * (round + 1), 100)).await;
        assert_eq!(reply.status, 202, "{:?}", reply.body);
        notify.wait_for("WATCHDOG=1").await;
    }
    wait_until("every row is in PostgreSQL", || async {
        pg.count("SELECT count(*) FROM t").await == 400
    })
    .await;
    // PostgreSQL down is not a hang: the flusher's retries keep the pings coming, and
    // systemctl status says so.
    let mut pg = pg;
    pg.stop(StopMode::Fast);
    assert_eq!(post_ndjson(&mut c, "t", &rows(400, 10)).await.status, 202);
    notify
        .wait_for_prefix("STATUS=backlog 10 rows; PostgreSQL: down")
        .await;
    for _ in 0..3 {
        notify.clear();
        notify.wait_for("WATCHDOG=1").await;
    }
    let mut daemon = daemon;
    notify.clear();
    signal(&daemon, Signal::SIGTERM);
    notify.wait_for("STOPPING=1").await;
    let status = daemon.wait_exit().await;
    assert_eq!(status.code(), Some(0), "{}", daemon.log_tail());
    // Started again with PostgreSQL still down, it counts its backlog from the watermark
    // it last saw committed, not from zero.
    notify.clear();
    let _again = DaemonProcess::start_with_env(&[], dir.path(), &pg.url(), &[], &env);
    notify
        .wait_for_prefix("STATUS=backlog 10 rows; PostgreSQL: ")
        .await;
    assert!(
        !notify
            .received
            .iter()
            .any(|m| m.contains("STATUS=backlog 410 rows")),
        "{:?}",
        notify.received
    );
}

/// The pings come from the flusher's progress, not from a timer: a COMMIT that waits on a
/// lock stops them, and they come back once it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_is_not_pinged_while_the_flusher_is_stuck() {
    let pg = Pg::start().await;
    pg.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let dir = short_tempdir();
    let mut notify = NotifySocket::bind(dir.path());
    let env: [(&str, &OsStr); 2] = [
        ("NOTIFY_SOCKET", notify.path.as_os_str()),
        ("WATCHDOG_USEC", OsStr::new("1500000")),
    ];
    let daemon = DaemonProcess::start_with_env(&[], dir.path(), &pg.url(), &[], &env);
    notify.wait_for("READY=1").await;
    let mut c = client(&daemon.socket).await;
    assert_eq!(post_ndjson(&mut c, "t", &rows(0, 10)).await.status, 202);
    wait_until("the first rows are committed", || async {
        pg.count("SELECT count(*) FROM t").await == 10
    })
    .await;
    // Another session holds the table: the flusher's next COPY waits for the lock.
    let locker = crate::harness::connect(&pg.url()).await;
    locker
        .batch_execute("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    assert_eq!(post_ndjson(&mut c, "t", &rows(10, 10)).await.status, 202);
    wait_until("the daemon notices the flusher is stuck", || async {
        daemon.log_text().contains("has shown no progress")
    })
    .await;
    notify.clear();
    // Three ping periods (500 ms each) without a ping.
    let quiet = tokio::time::timeout(Duration::from_millis(1500), notify.wait_for("WATCHDOG=1"));
    assert!(
        quiet.await.is_err(),
        "the watchdog was pinged while the flusher was stuck: {:?}",
        notify.received
    );
    locker.batch_execute("ROLLBACK").await.expect("unlock");
    notify.wait_for("WATCHDOG=1").await;
    wait_until("the rows held back are committed", || async {
        pg.count("SELECT count(*) FROM t").await == 20
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_activated_daemon_serves_writes_on_the_passed_socket() {
    let pg = Pg::start().await;
    pg.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let dir = short_tempdir();
    let activated = dir.path().join("activated.sock");
    let wrapper = [
        OsStr::new("systemd-socket-activate"),
        OsStr::new("-l"),
        activated.as_os_str(),
    ];
    // systemd-socket-activate listens, and starts pgspool at the first connection.
    let mut daemon = DaemonProcess::start(&wrapper, dir.path(), &pg.url(), &[]);
    let configured = std::mem::replace(&mut daemon.socket, activated.clone());
    daemon.wait_ready().await;
    let mut c = client(&activated).await;
    let reply = post_ndjson(&mut c, "t", &rows(0, 500)).await;
    assert_eq!(reply.status, 202, "{:?}", reply.body);
    wait_until("the rows are in PostgreSQL", || async {
        pg.count("SELECT count(*) FROM t").await == 500
    })
    .await;
    assert!(
        !configured.exists(),
        "pgspool bound [listen] socket instead of using the one passed"
    );
    assert!(
        daemon
            .log_text()
            .contains("listening on the socket systemd passed"),
        "{}",
        daemon.log_tail()
    );
    let status = daemon.terminate().await;
    assert_eq!(status.code(), Some(0), "{}", daemon.log_tail());
    assert!(
        activated.exists(),
        "the socket file belongs to the socket unit and stays at stop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_live_settings_and_keeps_the_old_config_on_errors() {
    let pg = Pg::start().await;
    pg.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let dir = short_tempdir();
    let mut notify = NotifySocket::bind(dir.path());
    let file = dir.path().join("pgspool.toml");
    let write_config = |body_limit: u64, extra: &str| {
        std::fs::write(
            &file,
            format!("[ingest]\nmax_body_bytes = {body_limit}\n{extra}"),
        )
        .expect("write the config file");
    };
    write_config(1 << 20, "");
    let env: [(&str, &OsStr); 1] = [("NOTIFY_SOCKET", notify.path.as_os_str())];
    let config_arg = file.to_str().expect("utf-8 path");
    let daemon =
        DaemonProcess::start_with_env(&[], dir.path(), &pg.url(), &["--config", config_arg], &env);
    notify.wait_for("READY=1").await;
    let body = rows(0, 200); // 2,090 bytes
    let mut c = client(&daemon.socket).await;
    assert_eq!(post_ndjson(&mut c, "t", &body).await.status, 202);

    // A smaller body limit applies at once; a PostgreSQL setting waits for a restart.
    write_config(1000, "[postgres]\nconnect_timeout = \"7s\"\n");
    notify.clear();
    signal(&daemon, Signal::SIGHUP);
    let reloading = notify.wait_for("RELOADING=1").await;
    let ready = notify.wait_for("READY=1").await;
    assert!(reloading <= ready, "{:?}", notify.received);
    let reply = post_ndjson(&mut c, "t", &rows(200, 200)).await;
    assert_eq!(reply.status, 413, "{:?}", reply.body);
    let log = daemon.log_text();
    assert!(
        log.contains("[ingest] max_body_bytes: 1048576 -> 1000"),
        "{log}"
    );
    assert!(
        log.contains("[postgres]") && log.contains("after a restart"),
        "{log}"
    );

    // A file that does not parse changes nothing.
    std::fs::write(&file, "[ingest\nmax_body_bytes = 1048576\n").expect("write");
    signal(&daemon, Signal::SIGHUP);
    wait_until("the daemon refuses the broken file", || async {
        daemon
            .log_text()
            .contains("the configuration was not reloaded")
    })
    .await;
    let reply = post_ndjson(&mut c, "t", &rows(200, 200)).await;
    assert_eq!(reply.status, 413, "the old limit stays: {:?}", reply.body);
    // A valid file that fails validation changes nothing either.
    write_config(0, "");
    signal(&daemon, Signal::SIGHUP);
    wait_until("the daemon refuses the invalid value", || async {
        daemon
            .log_text()
            .matches("the configuration was not reloaded")
            .count()
            == 2
    })
    .await;
    assert_eq!(post_ndjson(&mut c, "t", &rows(200, 50)).await.status, 202);
    assert_eq!(post_ndjson(&mut c, "t", &rows(250, 200)).await.status, 413);
    wait_until("the accepted rows are in PostgreSQL", || async {
        pg.count("SELECT count(*) FROM t").await == 250
    })
    .await;
    // An allow-list applies at once too.
    write_config(1 << 20, "[tables.\"public.other\"]\n");
    signal(&daemon, Signal::SIGHUP);
    wait_until("the daemon applies [tables]", || async {
        daemon
            .log_text()
            .contains(r#"[tables]: None -> Some(["public.other"])"#)
    })
    .await;
    let reply = post_ndjson(&mut c, "public.t", &rows(250, 1)).await;
    assert_eq!(reply.status, 403, "{:?}", reply.body);
}

/// A stop that cannot drain (PostgreSQL is down) waits for `drain_timeout`; a second
/// signal ends it at once, with 128 + its number as a shell reports it, and loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once_and_keeps_what_was_acknowledged() {
    let mut pg = Pg::start().await;
    pg.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let dir = short_tempdir();
    let file = dir.path().join("pgspool.toml");
    std::fs::write(&file, "[shutdown]\ndrain_timeout = \"1h\"\n").expect("config");
    let config_arg = file.to_str().expect("utf-8 path");
    let mut daemon = DaemonProcess::spawn(dir.path(), &pg.url(), &["--config", config_arg]).await;
    pg.stop(StopMode::Fast);
    let mut c = client(&daemon.socket).await;
    assert_eq!(post_ndjson(&mut c, "t", &rows(0, 100)).await.status, 202);
    signal(&daemon, Signal::SIGTERM);
    wait_until("the daemon is draining", || async {
        daemon.log_text().contains("stopping: no new writes")
    })
    .await;
    signal(&daemon, Signal::SIGINT);
    let status = daemon.wait_exit().await;
    assert_eq!(status.code(), Some(130), "{}", daemon.log_tail());
    pg.restart().await;
    let _again = DaemonProcess::spawn(dir.path(), &pg.url(), &[]).await;
    wait_until("the acknowledged rows are in PostgreSQL", || async {
        pg.count("SELECT count(*) FROM t").await == 100
    })
    .await;
}

/// A held table's rows wait below the watermark, where the backlog count does not see
/// them: the status line names the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lines_name_the_tables_held() {
    let pg = Pg::start().await;
    pg.exec("CREATE TABLE t (id int PRIMARY KEY); CREATE TABLE gone (id int)")
        .await;
    let dir = short_tempdir();
    let mut notify = NotifySocket::bind(dir.path());
    let notify_path = notify.path.clone();
    let env: [(&str, &OsStr); 1] = [("NOTIFY_SOCKET", notify_path.as_os_str())];
    let daemon = DaemonProcess::start_with_env(&[], dir.path(), &pg.url(), &[], &env);
    notify.wait_for("READY=1").await;
    let mut c = client(&daemon.socket).await;
    assert_eq!(post_ndjson(&mut c, "gone", &rows(0, 1)).await.status, 202);
    wait_until("the first row is loaded", || async {
        pg.count("SELECT count(*) FROM gone").await == 1
    })
    .await;
    pg.exec("DROP TABLE gone").await;
    assert_eq!(post_ndjson(&mut c, "gone", &rows(1, 5)).await.status, 202);
    assert_eq!(post_ndjson(&mut c, "t", &rows(0, 5)).await.status, 202);
    notify
        .wait_for("STATUS=backlog 0 rows; tables held: public.gone; PostgreSQL: up")
        .await;
}
