//! `pgspool run` as a service: signals, reloading the configuration, and the tasks that
//! speak the systemd protocol for a running daemon (see [`crate::systemd`]).
//!
//! Reload ([`LiveConfig::reload`], SIGHUP): the batch limits, the `[ingest]` limits
//! (those on connections for connections opened after it), the `[tables]` allow-list,
//! `[wal] max_bytes`, `[shutdown] drain_timeout` and the log level change at once (the
//! flusher and the handlers read them through a watch channel); the PostgreSQL password is
//! read again from `[postgres] password_file` (or `~/.pgpass`) for new connections; the keys that need a
//! restart are named in the log and keep their old values; a config that does not parse or
//! validate changes nothing.

use std::sync::Arc;

use anyhow::Context;
use nix::sys::signal::Signal;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::app::Daemon;
use crate::config::{Config, ConfigError};
use crate::flush::Progress;
use crate::live::FlusherView;
use crate::logging::LogHandle;
use crate::lsn::Lsn;
use crate::status::Connection;
use crate::systemd::{self, NotifyState, Watchdog};

/// The running daemon's configuration, which a reload changes, and its PostgreSQL target,
/// whose password a reload reads again; clones share both.
#[derive(Debug, Clone)]
pub struct LiveConfig {
    config: Arc<watch::Sender<Config>>,
    target: crate::pg::Target,
}

/// What a [`LiveConfig::reload`] changed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reloaded {
    /// The live keys whose value changed, as `key: old -> new`.
    pub applied: Vec<String>,
    /// The sections or keys that changed but take effect only after a restart.
    pub need_restart: Vec<&'static str>,
}

impl LiveConfig {
    /// The configuration `config` publishes, and the daemon's PostgreSQL target.
    #[must_use]
    pub fn new(config: watch::Sender<Config>, target: crate::pg::Target) -> LiveConfig {
        LiveConfig {
            config: Arc::new(config),
            target,
        }
    }

    /// The configuration now.
    #[must_use]
    pub fn current(&self) -> Config {
        self.config.borrow().clone()
    }

    /// Applies what can change live from `new` (see the module docs): the rest keeps its
    /// old value and is named in [`Reloaded::need_restart`].
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] when the configuration that would result is not valid;
    /// nothing changes then.
    pub fn reload(&self, new: &Config) -> Result<Reloaded, ConfigError> {
        let old = self.current();
        let mut next = old.clone();
        next.batch = new.batch.clone();
        next.ingest = new.ingest.clone();
        next.tables = new.tables.clone();
        next.wal.max_bytes = new.wal.max_bytes;
        next.shutdown = new.shutdown.clone();
        next.log.level.clone_from(&new.log.level);
        next.validate()?;
        // The password file (or ~/.pgpass) of the running [postgres] section, read again:
        // a rotated password is used by the connections opened from now on.
        let password_changed = self
            .target
            .reload_password(&old.postgres)
            .map_err(ConfigError::Invalid)?;
        let mut reloaded = Reloaded::default();
        if password_changed {
            reloaded
                .applied
                .push("[postgres] password: read again, changed".into());
        }
        let mut note = |key: &str, was: &dyn std::fmt::Debug, now: &dyn std::fmt::Debug| {
            let (was, now) = (format!("{was:?}"), format!("{now:?}"));
            if was != now {
                reloaded.applied.push(format!("{key}: {was} -> {now}"));
            }
        };
        let (o, n) = (&old, &next);
        note("[batch] max_rows", &o.batch.max_rows, &n.batch.max_rows);
        note("[batch] max_bytes", &o.batch.max_bytes, &n.batch.max_bytes);
        note("[batch] max_wait", &o.batch.max_wait, &n.batch.max_wait);
        let (oi, ni) = (&o.ingest, &n.ingest);
        for (key, was, now) in [
            (
                "[ingest] max_body_bytes",
                oi.max_body_bytes,
                ni.max_body_bytes,
            ),
            (
                "[ingest] max_rows_per_request",
                oi.max_rows_per_request,
                ni.max_rows_per_request,
            ),
            ("[ingest] max_row_bytes", oi.max_row_bytes, ni.max_row_bytes),
            ("[ingest] max_columns", oi.max_columns, ni.max_columns),
            ("[ingest] max_depth", oi.max_depth, ni.max_depth),
            (
                "[ingest] max_header_bytes",
                oi.max_header_bytes,
                ni.max_header_bytes,
            ),
            (
                "[ingest] max_connections",
                oi.max_connections,
                ni.max_connections,
            ),
            (
                "[ingest] max_buffered_bytes",
                oi.max_buffered_bytes,
                ni.max_buffered_bytes,
            ),
        ] {
            note(key, &was, &now);
        }
        note(
            "[ingest] header_timeout",
            &oi.header_timeout,
            &ni.header_timeout,
        );
        note("[ingest] body_timeout", &oi.body_timeout, &ni.body_timeout);
        note("[wal] max_bytes", &o.wal.max_bytes, &n.wal.max_bytes);
        note("[tables]", &o.tables, &n.tables);
        note(
            "[shutdown] drain_timeout",
            &o.shutdown.drain_timeout,
            &n.shutdown.drain_timeout,
        );
        note("[log] level", &o.log.level, &n.log.level);
        for (key, differs) in [
            ("[listen]", new.listen != old.listen),
            ("[postgres]", new.postgres != old.postgres),
            ("[wal] dir", new.wal.dir != old.wal.dir),
            (
                "[wal] segment_bytes",
                new.wal.segment_bytes != old.wal.segment_bytes,
            ),
            ("[log] format", new.log.format != old.log.format),
        ] {
            if differs {
                reloaded.need_restart.push(key);
            }
        }
        self.config.send_replace(next);
        Ok(reloaded)
    }
}

/// Pings the systemd watchdog, if one is enabled, while the flusher shows progress.
pub(crate) async fn ping_watchdog(progress: Progress) {
    let Some(watchdog) = Watchdog::from_env() else {
        return;
    };
    info!(interval = ?watchdog.interval, "systemd watchdog enabled");
    let mut every = tokio::time::interval(watchdog.ping_every());
    let mut stalled = false;
    loop {
        every.tick().await;
        let since = progress.since();
        if since <= watchdog.progress_within() {
            systemd::notify(&[NotifyState::Watchdog]);
            stalled = false;
        } else if !stalled {
            stalled = true;
            warn!(
                since = ?since,
                "the flusher has shown no progress (a COPY or COMMIT that does not return? a lock \
                 held by another session, say): not pinging the systemd watchdog, which \
                 restarts pgspool after WatchdogSec"
            );
        }
    }
}

/// Sends systemd a `STATUS=` line with the backlog and PostgreSQL's state whenever they
/// change.
pub(crate) async fn report_status(
    durable: watch::Receiver<Lsn>,
    committed: watch::Receiver<Lsn>,
    flusher: watch::Receiver<FlusherView>,
) {
    let mut sent = String::new();
    let mut every = tokio::time::interval(systemd::STATUS_EVERY);
    loop {
        every.tick().await;
        let status = status_line(*durable.borrow(), *committed.borrow(), &flusher.borrow());
        if status != sent {
            systemd::notify(&[NotifyState::Status(&status)]);
            sent = status;
        }
    }
}

/// The `STATUS=` line, as `systemctl status` shows it: the backlog in rows above the
/// watermark (one LSN per row), the tables held (whose rows wait below it too), and
/// PostgreSQL's state.
fn status_line(durable: Lsn, committed: Lsn, flusher: &FlusherView) -> String {
    let backlog = durable.0.saturating_sub(committed.0);
    let held: Vec<&str> = flusher
        .report
        .tables
        .iter()
        .filter(|(_, t)| t.held_after_lsn.is_some())
        .map(|(name, _)| name.as_str())
        .collect();
    let held = if held.is_empty() {
        String::new()
    } else {
        format!("; tables held: {}", held.join(", "))
    };
    let postgres = &flusher.postgres;
    let postgres = match postgres.state {
        Connection::Connecting => "PostgreSQL: connecting".to_string(),
        Connection::Connected => "PostgreSQL: up".to_string(),
        Connection::Down => format!(
            "PostgreSQL: down ({})",
            postgres.error.as_deref().unwrap_or("no answer")
        ),
    };
    let mut line = format!("backlog {backlog} rows{held}; {postgres}");
    // systemctl status shows it on one line: long PostgreSQL errors are cut.
    if let Some((cut, _)) = line.char_indices().nth(200) {
        line.truncate(cut);
        line.push('…');
    }
    line
}

/// How `pgspool run` runs the daemon as a service.
pub struct Service {
    /// The socket systemd passed (socket activation), if any.
    pub activated: Option<std::os::unix::net::UnixListener>,
    /// Reads the configuration again (the file, with the command line's flags) on SIGHUP;
    /// `None` when the daemon was started without a config file (nothing to re-read).
    pub reread: Option<Box<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>>,
    /// The logger, whose filter SIGHUP changes.
    pub log: LogHandle,
}

/// Runs a daemon until SIGTERM or SIGINT, then stops it gracefully; a second signal exits
/// at once with 128 + its number (143 for SIGTERM, 130 for SIGINT, as a shell reports a
/// process killed by it; the WAL keeps everything acknowledged). SIGHUP reloads the configuration
/// (see the module docs). Tells systemd `READY=1` once writes are accepted, and
/// `RELOADING=1` and `STOPPING=1` as they happen (see [`crate::systemd`]).
///
/// # Errors
/// When the daemon cannot start, or stops on a fatal error.
pub async fn run_until_signalled(config: Config, service: Service) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("install the SIGHUP handler")?;
    let Service {
        activated,
        reread,
        log,
    } = service;
    let daemon = Daemon::start_on(config, activated).await?;
    systemd::notify(&[NotifyState::Ready]);
    let token = daemon.shutdown_token();
    let live = daemon.config();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => reload(&live, reread.as_deref(), &log),
                () = token.cancelled() => return,
            }
        }
        info!("signal received: stopping gracefully (signal again to exit at once)");
        token.cancel();
        let signal = tokio::select! {
            _ = term.recv() => Signal::SIGTERM as i32,
            _ = int.recv() => Signal::SIGINT as i32,
        };
        warn!("second signal: exiting at once; the WAL keeps every acknowledged row");
        std::process::exit(128 + signal);
    });
    daemon.wait().await
}

/// Re-reads the configuration and applies what can change live; a configuration that
/// cannot be read or is not valid leaves the old one running.
fn reload(
    live: &LiveConfig,
    reread: Option<&(dyn Fn() -> Result<Config, ConfigError> + Send + Sync)>,
    log: &LogHandle,
) {
    let Some(reread) = reread else {
        warn!(
            "SIGHUP: pgspool was started without --config, so there is no file to re-read; \
             the configuration stays as the command line set it"
        );
        return;
    };
    systemd::notify(&[NotifyState::Reloading]);
    info!("SIGHUP: re-reading the configuration");
    let reloaded = reread().and_then(|new| live.reload(&new));
    match reloaded {
        // One line: the journal shows one event per line.
        Err(e) => error!(
            error = %e.to_string().replace('\n', " "),
            "the configuration was not reloaded; the old one stays in force (fix the file and \
             send SIGHUP again)"
        ),
        Ok(reloaded) => {
            if let Err(e) = log.set_filter(&live.current().log.level) {
                warn!(error = %e, "the log level was not changed");
            }
            if reloaded.applied.is_empty() {
                info!("configuration reloaded: nothing that can change live changed");
            }
            for change in &reloaded.applied {
                info!(change = %change, "configuration reloaded");
            }
            for key in &reloaded.need_restart {
                warn!(
                    key,
                    "this setting changed in the file but takes effect only after a restart \
                     (systemctl restart pgspool); the old value stays in force"
                );
            }
        }
    }
    systemd::notify(&[NotifyState::Ready]);
}
