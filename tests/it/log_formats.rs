//! The daemon's log on stderr: JSON objects with `--log-format json`, plain lines with a
//! syslog priority and no timestamp when stderr is the journal (`$JOURNAL_STREAM` naming
//! stderr itself), timestamps otherwise.

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use humantime_serde::re::humantime;

use crate::harness::{DaemonProcess, short_tempdir, wait_until};

/// A connection string to a PostgreSQL that is not there: the daemon starts all the same,
/// and its flusher logs a warning with the error as a field.
fn unreachable_url(dir: &Path) -> String {
    format!(
        "host={} port=5432 user=pgspool dbname=pgspool",
        dir.join("no-postgres").display()
    )
}

/// Runs the daemon with `wrapper` and `extra` until it has logged a failed flush, stops it
/// with SIGTERM, and returns its log (stderr).
async fn log_of_a_run(dir: &Path, wrapper: &[&OsStr], extra: &[&str]) -> String {
    let mut daemon = DaemonProcess::start(wrapper, dir, &unreachable_url(dir), extra);
    daemon.wait_ready().await;
    wait_until("the daemon logged a failed flush", || async {
        daemon.log_text().contains("flush failed")
    })
    .await;
    let status = daemon.terminate().await;
    assert!(status.success(), "{status}: {}", daemon.log_tail());
    daemon.log_text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_format_writes_one_object_per_line_with_level_and_fields() {
    let dir = short_tempdir();
    let log = log_of_a_run(dir.path(), &[], &["--log-format", "json"]).await;
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    for event in &events {
        let level = event["level"].as_str().unwrap_or_default();
        assert!(
            ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&level),
            "{event}"
        );
        let timestamp = event["timestamp"].as_str().unwrap_or_default();
        assert!(
            humantime::parse_rfc3339_weak(timestamp).is_ok(),
            "no timestamp: {event}"
        );
        assert!(event["fields"]["message"].is_string(), "{event}");
        assert!(event["target"].is_string(), "{event}");
    }
    let socket = dir.path().join("s.sock");
    let with = |message: &str| {
        events
            .iter()
            .find(|e| e["fields"]["message"] == message)
            .unwrap_or_else(|| panic!("no event {message:?} in {log}"))
    };
    // Structured fields stay fields, with their names.
    let accepting = with("accepting writes");
    assert_eq!(accepting["level"], "INFO");
    assert_eq!(accepting["target"], "pgspool::app");
    assert_eq!(
        accepting["fields"]["socket"],
        socket.display().to_string(),
        "{accepting}"
    );
    let failed = with("flush failed; the rows stay in the WAL");
    assert_eq!(failed["level"], "WARN");
    assert!(
        failed["fields"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("no-postgres")),
        "{failed}"
    );
    with("stopped");
}

/// Starts the daemon with `JOURNAL_STREAM` set to `value(device, inode)`, where device and
/// inode are those of the file its stderr goes to, and returns its log.
async fn log_with_journal_stream(dir: &Path, value: impl Fn(u64, u64) -> String) -> String {
    let log = DaemonProcess::log_path(dir);
    let meta = std::fs::File::create(&log)
        .and_then(|f| f.metadata())
        .expect("create the log file");
    let variable = format!("JOURNAL_STREAM={}", value(meta.dev(), meta.ino()));
    let wrapper = [OsStr::new("env"), OsStr::new(&variable)];
    log_of_a_run(dir, &wrapper, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_to_the_journal_have_a_priority_and_no_timestamp() {
    let dir = short_tempdir();
    let log = log_with_journal_stream(dir.path(), |dev, ino| format!("{dev}:{ino}")).await;
    let prefixes = [
        "<3>ERROR ",
        "<4>WARN ",
        "<6>INFO ",
        "<7>DEBUG ",
        "<7>TRACE ",
    ];
    for line in log.lines() {
        assert!(
            prefixes.iter().any(|prefix| line.starts_with(prefix)),
            "not a journal line: {line}"
        );
    }
    let socket = dir.path().join("s.sock");
    assert!(
        log.lines().any(|line| line
            == format!(
                "<6>INFO pgspool::app: accepting writes socket={}",
                socket.display()
            )),
        "{log}"
    );
    assert!(
        log.lines().any(|line| line
            .starts_with("<4>WARN pgspool::flush: flush failed; the rows stay in the WAL error=")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_stream_that_is_not_stderr_keeps_the_timestamps() {
    // The variable is inherited, but stderr was redirected elsewhere (another inode).
    let dir = short_tempdir();
    let log = log_with_journal_stream(dir.path(), |dev, ino| format!("{dev}:{}", ino + 1)).await;
    assert!(log.contains("accepting writes"), "{log}");
    for line in log.lines() {
        let first = line.split_whitespace().next().unwrap_or_default();
        assert!(
            humantime::parse_rfc3339_weak(first).is_ok(),
            "no timestamp first: {line}"
        );
    }
}
