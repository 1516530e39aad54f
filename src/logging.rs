//! Logging: `tracing` events with structured fields, written to stderr in one of three
//! shapes, and a handle that changes the filter while the daemon runs (on SIGHUP).
//!
//! - `text` on a terminal or into a file: a timestamp, the level, the target, the message
//!   and its fields (`key=value`), one event per line.
//! - `text` when stderr is the journal (systemd.exec(5), `$JOURNAL_STREAM`): the same lines
//!   without the timestamp, which the journal records itself, and with a `<N>` syslog
//!   priority prefix (sd-daemon(3)), so `journalctl -p warning` picks warnings and errors.
//! - `json`: one JSON object per line for log shippers, with `timestamp`, `level`,
//!   `target`, `fields` (the message under `message`, and each field by name) and the
//!   enclosing `spans`.

use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

use serde::Deserialize;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{self, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

/// How log lines are written (`[log] format`, `--log-format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines: with a timestamp, or without one when stderr is the journal.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Why the log filter could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The new filter is not a `tracing_subscriber` filter.
    #[error(
        "{directive:?} is not a log filter (write a level such as info, or directives such as pgspool=debug,info): {error}"
    )]
    Filter {
        /// The filter given.
        directive: String,
        /// The parser's message.
        error: tracing_subscriber::filter::ParseError,
    },
    /// A part without `=` that is not a level: `tracing_subscriber` would take it as a
    /// target to log at every level, so a misspelt level (`warning`) would silently turn
    /// logging off.
    #[error(
        "{part:?} in the log filter {directive:?} is not a level (off, error, warn, info, debug, \
         trace); to log one target at every level write {part}=trace"
    )]
    NotALevel {
        /// The filter given.
        directive: String,
        /// The part that is not a level.
        part: String,
    },
    /// The logger set up by [`init`] is not in use (another one was installed first).
    #[error("cannot change the log filter: {0}")]
    Reload(#[from] reload::Error),
}

/// Changes the filter of the logger [`init`] installed, from any thread.
#[derive(Debug, Clone)]
pub struct LogHandle {
    filter: reload::Handle<EnvFilter, Registry>,
    /// `RUST_LOG` was set (and valid) at start: it wins over every later filter.
    from_env: bool,
}

impl LogHandle {
    /// Replaces the log filter with `directive`, a `[log] level` value (`debug`,
    /// `pgspool=debug,info`, ...), at once for every event that follows. While `RUST_LOG`
    /// (which wins over `[log] level`) was set at start, the directive is only checked and a
    /// warning says that it is not applied.
    ///
    /// # Errors
    /// [`LogError::Filter`] when `directive` is not a filter (the old one stays);
    /// [`LogError::Reload`] when the logger of [`init`] is not the one in use.
    pub fn set_filter(&self, directive: &str) -> Result<(), LogError> {
        let filter = parse_filter(directive)?;
        if self.from_env {
            tracing::warn!(
                filter = directive,
                "RUST_LOG is set and wins over [log] level: the log filter stays as it is"
            );
            return Ok(());
        }
        self.filter.reload(filter)?;
        Ok(())
    }
}

/// Parses a `[log] level` value: a level, or comma-separated `target=level` directives and
/// levels (`pgspool=debug,info`), each trimmed of surrounding spaces.
///
/// # Errors
/// [`LogError::NotALevel`] for a part without `=` that is not a level; [`LogError::Filter`]
/// for anything else `tracing_subscriber` refuses.
pub fn parse_filter(directive: &str) -> Result<EnvFilter, LogError> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let parts: Vec<&str> = directive.split(',').map(str::trim).collect();
    if let Some(part) = parts.iter().find(|part| {
        !part.is_empty() && !part.contains('=') && !LEVELS.contains(&part.to_lowercase().as_str())
    }) {
        return Err(LogError::NotALevel {
            directive: directive.to_string(),
            part: (*part).to_string(),
        });
    }
    EnvFilter::try_new(parts.join(",")).map_err(|error| LogError::Filter {
        directive: directive.to_string(),
        error,
    })
}

/// Installs the process-wide logger: events that `level` lets through (or `RUST_LOG`,
/// which wins when it is set to a valid filter; `info` if neither is valid) go to stderr
/// in `format`. Call it once, early; a second call leaves the first logger in place (and
/// the handle it returns changes nothing).
pub fn init(level: &str, format: LogFormat) -> LogHandle {
    let from_env = EnvFilter::try_from_default_env().ok();
    let has_env = from_env.is_some();
    let filter = from_env
        .or_else(|| parse_filter(level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let output = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Text if stderr_is_journal() => tracing_subscriber::fmt::layer()
            .event_format(JournalLine(
                format::Format::default().without_time().with_level(false),
            ))
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .boxed(),
    };
    // An error means a logger is installed already: it stays, as documented.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .try_init();
    LogHandle {
        filter: handle,
        from_env: has_env,
    }
}

/// Whether stderr is the journal: systemd sets `$JOURNAL_STREAM` to `DEVICE:INODE` of the
/// stream it connects to stdout and stderr, and those numbers must be stderr's own, so
/// that the variable inherited by a process whose stderr was redirected does not count.
fn stderr_is_journal() -> bool {
    let Some((device, inode)) = std::env::var("JOURNAL_STREAM").ok().and_then(|value| {
        let (device, inode) = value.split_once(':')?;
        Some((device.parse::<u64>().ok()?, inode.parse::<u64>().ok()?))
    }) else {
        return false;
    };
    std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .and_then(|fd| std::fs::File::from(fd).metadata())
        .is_ok_and(|meta| meta.dev() == device && meta.ino() == inode)
}

/// A journal line: `<N>` (the syslog priority the journal files the line under), the
/// level, then what `inner` writes (the target, the message and the fields, no time).
struct JournalLine(format::Format<format::Full, ()>);

impl<S, N> FormatEvent<S, N> for JournalLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let level = *event.metadata().level();
        let priority = match level {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            Level::DEBUG | Level::TRACE => 7,
        };
        write!(writer, "<{priority}>{level} ")?;
        self.0.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The only test in this binary that installs a logger: it filters on a target no
    /// other code logs under, so nothing else is printed.
    #[test]
    fn set_filter_changes_what_is_logged_and_keeps_the_filter_on_a_bad_one() {
        let handle = init("off", LogFormat::Text);
        let debug = || tracing::enabled!(target: "pgspool_log_test", Level::DEBUG);
        let trace = || tracing::enabled!(target: "pgspool_log_test", Level::TRACE);
        // RUST_LOG, when set, wins over every filter given here.
        let applies = !handle.from_env;
        assert!(!debug() || !applies);
        handle
            .set_filter("pgspool_log_test=debug")
            .expect("a filter");
        assert_eq!(debug(), applies);
        assert!(!trace() || !applies);
        let e = handle
            .set_filter("pgspool_log_test=loud")
            .expect_err("not a filter");
        assert!(matches!(e, LogError::Filter { .. }), "{e}");
        assert_eq!(debug(), applies, "a bad filter left the old one in place");
        handle.set_filter("off").expect("a filter");
        assert!(!debug() || !applies);
    }

    #[test]
    fn a_misspelt_level_is_refused_instead_of_silencing_the_log() {
        for good in [
            "info",
            "WARN",
            " info ",
            "pgspool=debug,info",
            "debug, hyper=warn",
            "off",
        ] {
            assert!(parse_filter(good).is_ok(), "{good:?}");
        }
        for (bad, part) in [
            ("warning", "warning"),
            ("info,bogus", "bogus"),
            ("pgspool", "pgspool"),
        ] {
            let e = parse_filter(bad).expect_err(bad);
            assert!(
                matches!(&e, LogError::NotALevel { part: p, .. } if p == part),
                "{bad:?}: {e}"
            );
            assert!(
                e.to_string().contains(&format!("write {part}=trace")),
                "{e}"
            );
        }
        assert!(matches!(
            parse_filter("pgspool=loud"),
            Err(LogError::Filter { .. })
        ));
    }
}
