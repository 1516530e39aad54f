//! The systemd service protocol: readiness and state notifications, the watchdog, and
//! socket activation. Source: sd_notify(3), sd_watchdog_enabled(3), sd_listen_fds(3),
//! systemd.service(5) (`Type=notify`, `WatchdogSec=`), systemd.socket(5).
//!
//! Every message goes to the datagram socket named by `NOTIFY_SOCKET`; without it (not
//! run by systemd) nothing is sent and nothing fails. The messages the daemon sends, in
//! order:
//!
//! | message | when |
//! |---|---|
//! | `READY=1` | the WAL is recovered and the socket listens: writes are accepted |
//! | `STATUS=...` | from the start, then whenever the backlog, the tables held or PostgreSQL's state change (checked every [`STATUS_EVERY`]), e.g. `backlog 0 rows; PostgreSQL: up` |
//! | `WATCHDOG=1` | every third of `WATCHDOG_USEC`, but only while the flusher makes progress (see [`Watchdog`]) |
//! | `RELOADING=1` | on SIGHUP, before the configuration is re-read; `READY=1` follows |
//! | `STOPPING=1` | on SIGTERM or SIGINT, or a fatal error, before the drain |

use std::os::unix::net::UnixListener;
use std::time::Duration;

pub use sd_notify::NotifyState;
use tracing::debug;

/// How often, at most, a changed `STATUS=` line is sent.
pub const STATUS_EVERY: Duration = Duration::from_secs(2);

/// Sends `states` to the service manager, if there is one. A failure to send is logged
/// at debug level and otherwise ignored: the daemon works the same without systemd.
pub fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        debug!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}

/// The listening socket systemd passed (`LISTEN_FDS`, for this process by `LISTEN_PID`),
/// if any. Reads and clears the variables, so call it before any thread starts: in
/// `main`, before the async runtime.
///
/// # Errors
/// When a socket was passed but it is not a listening Unix stream socket (a
/// `pgspool.socket` unit with `ListenDatagram=` or a TCP port, say), or more than one was.
pub fn take_activated_socket() -> std::io::Result<Option<UnixListener>> {
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() > 1 {
        return Err(std::io::Error::other(format!(
            "systemd passed {} sockets (LISTEN_FDS); pgspool listens on one: give its \
             .socket unit a single ListenStream=",
            fds.len()
        )));
    }
    let listener = fds.take_unix_listener(0).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "the socket systemd passed (LISTEN_FDS) is not a Unix stream socket: {e}; \
                 use ListenStream=/run/pgspool/pgspool.sock in pgspool.socket"
            ),
        )
    })?;
    if let Some(listener) = &listener {
        listener.set_nonblocking(true)?;
    }
    Ok(listener)
}

/// The watchdog systemd asked for (`WATCHDOG_USEC`, for this process by `WATCHDOG_PID`).
///
/// `WATCHDOG=1` is sent every third of the interval, but only when the flusher made
/// progress (went round its loop: a batch committed, a wait for rows or for PostgreSQL
/// ended, a retry began) within half of it. A flusher stuck in a call that does not
/// return, a lock wait in PostgreSQL with no timeout, say, stops the pings, and systemd
/// restarts the daemon after `WatchdogSec=`: the WAL keeps every acknowledged row, and
/// the restart replays from PostgreSQL's watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watchdog {
    /// `WatchdogSec=`.
    pub interval: Duration,
}

impl Watchdog {
    /// The watchdog, when systemd enabled one for this process.
    #[must_use]
    pub fn from_env() -> Option<Watchdog> {
        sd_notify::watchdog_enabled()
            .filter(|interval| !interval.is_zero())
            .map(|interval| Watchdog { interval })
    }

    /// How often a ping is due.
    #[must_use]
    pub fn ping_every(&self) -> Duration {
        self.interval / 3
    }

    /// How recent the flusher's progress must be for a ping to be sent.
    #[must_use]
    pub fn progress_within(&self) -> Duration {
        self.interval / 2
    }
}
