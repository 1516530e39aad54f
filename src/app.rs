//! The daemon: start-up order, supervision, and shutdown.
//!
//! Start: validate the configuration; bind the socket (or take the one systemd passed);
//! open and recover the WAL (which starts the writer); load the schema cache; start the
//! flusher and let its first session check the WAL against PostgreSQL's watermark (a WAL
//! that does not match the database refuses the start), or find PostgreSQL unreachable
//! (then writes are accepted meanwhile, and the check comes when it is back); then start
//! the HTTP server. The daemon is ready (writes are accepted) once [`Daemon::start`]
//! returns; [`crate::service::run_until_signalled`] then tells systemd `READY=1`. Signals
//! and reloads are [`crate::service`]'s.
//!
//! Stop (the shutdown token is cancelled): stop accepting writes; let requests already
//! appending finish (up to half a second); let the flusher send what is durable within
//! `[shutdown] drain_timeout` (requests waiting with `?ack=committed` are answered by its
//! commits, or 503 once it stops: their rows stay durable in the WAL); then stop the server
//! (idle connections close at once, requests still being sent get their answers until the
//! drain timeout) and close the WAL. Until then the server keeps answering, writes with 503, `Retry-After`
//! and `Connection: close`, so that a client sending on an open connection gets an answer
//! rather than a reset. A fatal error (a failed fdatasync, a damaged WAL) stops everything
//! the same way and is returned. Abrupt exits are safe too: the WAL makes them so; a
//! graceful stop only saves replay time.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::acks::Acks;
use crate::config::{Config, ConfigError};
use crate::flush::{FatalError, Flusher, Progress};
use crate::ingest::{self, Ingest, IngestOptions};
use crate::lsn::Lsn;
use crate::metrics::{Metrics, WalMetrics};
use crate::schema::{Catalog, SchemaCache};
use crate::service::{LiveConfig, ping_watchdog, report_status};
use crate::systemd::{self, NotifyState};
use crate::wal::{CommitObserver, Wal, WalOptions};

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    spool_id: uuid::Uuid,
    shutdown: CancellationToken,
    durable: watch::Receiver<Lsn>,
    committed: watch::Receiver<Lsn>,
    acks: Arc<Acks>,
    socket: PathBuf,
    config: LiveConfig,
    supervisor: JoinHandle<anyhow::Result<()>>,
}

impl Daemon {
    /// Starts a daemon with `config` (which must be valid); returns once writes are
    /// accepted on the socket.
    ///
    /// # Errors
    /// When the configuration is invalid, the WAL cannot be opened or recovered (locked by
    /// another daemon, damaged), or the socket cannot be bound.
    pub async fn start(config: Config) -> anyhow::Result<Daemon> {
        Daemon::start_on(config, None).await
    }

    /// Starts a daemon like [`Daemon::start`], listening on `activated` (the socket
    /// systemd passed, see [`systemd::take_activated_socket`]) instead of binding
    /// `[listen] socket` when it is given. That socket file belongs to systemd: it is left
    /// in place at stop.
    ///
    /// # Errors
    /// As [`Daemon::start`].
    pub async fn start_on(
        config: Config,
        activated: Option<std::os::unix::net::UnixListener>,
    ) -> anyhow::Result<Daemon> {
        config.validate()?;
        // A password file or TLS setting that cannot be used is a configuration error (its
        // message names the key or the connection string's parameter).
        let pg = crate::pg::Target::from_config(&config.postgres)
            .map_err(|e| ConfigError::Invalid(format!("{e:#}")))?;
        // The socket first: a live daemon on it, or a file in the way, is refused before
        // the WAL is touched.
        let (listener, socket) = match activated {
            Some(listener) => {
                let listener = tokio::net::UnixListener::from_std(listener)
                    .context("cannot use the socket systemd passed")?;
                let path = listener
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_pathname().map(PathBuf::from))
                    .unwrap_or_else(|| config.listen.socket.clone());
                info!(socket = %path.display(), "listening on the socket systemd passed");
                (listener, Socket::Activated(path))
            }
            None => {
                let path = config.listen.socket.clone();
                (ingest::bind(&config.listen).await?, Socket::Bound(path))
            }
        };
        // The writer's metrics exist before the WAL, which starts the writer.
        let wal_metrics = WalMetrics::default();
        let wal = match open_wal(&config, Arc::new(wal_metrics.clone())).await {
            Ok(wal) => wal,
            Err(e) => {
                socket.remove();
                return Err(e);
            }
        };
        let spool_id = wal.dir().spool_id();
        let schemas = Arc::new(SchemaCache::load(&config.wal.dir));
        let shutdown = CancellationToken::new();
        let (config_tx, config_rx) = watch::channel(config.clone());
        // Until the flusher reads PostgreSQL's watermark, the last one recorded.
        let recorded = crate::wal::recorded_watermark(wal.dir().path()).unwrap_or(Lsn::ZERO);
        let (committed_tx, committed) = watch::channel(recorded);
        // Requests with ?ack=committed, answered as the flusher reports its commits.
        let acks = Arc::new(Acks::new());
        let metrics = Arc::new(Metrics::new(&wal, wal_metrics, recorded));
        let (checked_tx, checked) = oneshot::channel();
        let (live, flusher_view) = crate::live::FlusherStatus::new();
        let status_view = flusher_view.clone();
        let monitor = crate::live::Monitor::start(
            Arc::clone(wal.dir()),
            wal.durable(),
            flusher_view,
            config_rx.clone(),
        );
        let flusher = Flusher {
            pg: pg.clone(),
            postgres: config.postgres.clone(),
            wal: Arc::clone(wal.dir()),
            durable: wal.durable(),
            committed: committed_tx,
            config: config_rx.clone(),
            schemas: Arc::clone(&schemas),
            checked: Some(checked_tx),
            acks: Arc::clone(&acks),
            metrics: Arc::clone(&metrics),
            live,
            state: crate::flush::FlushState::default(),
            progress: Progress::default(),
        };
        let progress = flusher.progress.clone();
        let durable = wal.durable();
        let stop_flusher = CancellationToken::new();
        let mut flusher = tokio::spawn(flusher.run(stop_flusher.clone()));
        // Bounded: a server that accepts connections but never answers must not keep the
        // daemon from accepting writes.
        let wait = config.postgres.connect_timeout + Duration::from_secs(1);
        if let Ok(Err(_)) = tokio::time::timeout(wait, checked).await {
            // The flusher stopped before the check: a WAL that does not match the database.
            socket.remove();
            let _ = wal.close().await;
            return Err(match (&mut flusher).await {
                Ok(Err(e)) => {
                    anyhow::Error::new(e).context("the WAL was checked against PostgreSQL")
                }
                Ok(Ok(())) => anyhow::anyhow!("the flusher stopped unexpectedly"),
                Err(e) => anyhow::Error::new(e).context("the flusher panicked"),
            });
        }
        let ingest = Arc::new(Ingest::new(IngestOptions {
            appender: wal.appender(),
            wal: Arc::clone(wal.dir()),
            schemas,
            catalog: Catalog::new(pg.clone()),
            config: config_rx.clone(),
            acks: Arc::clone(&acks),
            metrics,
            monitor,
        }));
        let stop_server = CancellationToken::new();
        let running = Running {
            flusher,
            stop_flusher,
            server: tokio::spawn(ingest::serve(
                listener,
                Arc::clone(&ingest),
                stop_server.clone(),
            )),
            stop_server,
            ingest,
            acks: Arc::clone(&acks),
            wal,
            shutdown: shutdown.clone(),
            socket: socket.clone(),
            config: config_rx,
            service: vec![
                tokio::spawn(ping_watchdog(progress)),
                tokio::spawn(report_status(
                    durable.clone(),
                    committed.clone(),
                    status_view,
                )),
            ],
        };
        let socket = socket.path().to_path_buf();
        info!(socket = %socket.display(), "accepting writes");
        Ok(Daemon {
            spool_id,
            shutdown,
            durable,
            committed,
            acks,
            socket,
            config: LiveConfig::new(config_tx, pg),
            supervisor: tokio::spawn(running.supervise()),
        })
    }

    /// The configuration, to reload it while the daemon runs.
    #[must_use]
    pub fn config(&self) -> LiveConfig {
        self.config.clone()
    }

    /// The spool's id (the key of its watermark in PostgreSQL).
    #[must_use]
    pub fn spool_id(&self) -> uuid::Uuid {
        self.spool_id
    }

    /// The socket the daemon listens on.
    #[must_use]
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// The last durable LSN (every row up to it is acknowledged or acknowledgeable).
    #[must_use]
    pub fn durable(&self) -> watch::Receiver<Lsn> {
        self.durable.clone()
    }

    /// The watermark committed in PostgreSQL, as far as the flusher knows.
    #[must_use]
    pub fn committed(&self) -> watch::Receiver<Lsn> {
        self.committed.clone()
    }

    /// The requests waiting with `?ack=committed`, and where the flusher reports its
    /// commits.
    #[must_use]
    pub fn acks(&self) -> Arc<Acks> {
        Arc::clone(&self.acks)
    }

    /// The token that stops the daemon when cancelled.
    #[must_use]
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until everything durable when called is committed in PostgreSQL.
    pub async fn wait_flushed(&self) {
        let target = *self.durable.borrow();
        let mut committed = self.committed();
        let _ = committed.wait_for(|lsn| *lsn >= target).await;
    }

    /// Stops the daemon gracefully and waits for it.
    ///
    /// # Errors
    /// A fatal error the daemon stopped on.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }

    /// Waits until the daemon stops: after its shutdown token is cancelled, or on a fatal
    /// error.
    ///
    /// # Errors
    /// The fatal error the daemon stopped on.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.supervisor.await.context("the daemon panicked")?
    }
}

/// Opens and recovers the WAL (which starts the writer, telling `observer` of its group
/// commits) and logs what recovery found.
async fn open_wal(config: &Config, observer: Arc<dyn CommitObserver>) -> anyhow::Result<Wal> {
    let options = WalOptions {
        dir: config.wal.dir.clone(),
        segment_bytes: config.wal.segment_bytes,
        observer: Some(observer),
    };
    let wal = tokio::task::spawn_blocking(move || Wal::open(&options))
        .await
        .context("WAL recovery panicked")?
        .with_context(|| format!("cannot open the WAL in {}", config.wal.dir.display()))?;
    let report = wal.recovery_report();
    info!(
        dir = %config.wal.dir.display(),
        spool_id = %wal.dir().spool_id(),
        segments = report.segments,
        next_lsn = %report.next_lsn,
        torn_bytes_cut = report.cut.as_ref().map_or(0, |c| c.bytes),
        "WAL recovered"
    );
    Ok(wal)
}

/// How long, at a stop, requests in flight get to finish their appends before the flusher's
/// last drain starts (less when no connection is open).
const LINGER: Duration = Duration::from_millis(500);

/// How long, after the drain, requests get to send their last answers at least.
const ANSWER_GRACE: Duration = Duration::from_secs(1);

/// The socket the daemon listens on: bound by it (its file removed at stop), or passed by
/// systemd (its file belongs to the socket unit).
#[derive(Debug, Clone)]
enum Socket {
    Bound(PathBuf),
    Activated(PathBuf),
}

impl Socket {
    fn path(&self) -> &std::path::Path {
        match self {
            Socket::Bound(path) | Socket::Activated(path) => path,
        }
    }

    /// Removes the socket file, if the daemon bound it.
    fn remove(&self) {
        if let Socket::Bound(path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The parts of a running daemon, which [`Running::supervise`] stops in order.
struct Running {
    wal: Wal,
    ingest: Arc<Ingest>,
    acks: Arc<Acks>,
    server: JoinHandle<()>,
    /// Stops the server: it stops accepting, and closes connections once idle.
    stop_server: CancellationToken,
    flusher: JoinHandle<Result<(), FatalError>>,
    stop_flusher: CancellationToken,
    shutdown: CancellationToken,
    socket: Socket,
    config: watch::Receiver<Config>,
    /// The watchdog and status tasks, ended once stopped.
    service: Vec<JoinHandle<()>>,
}

impl Running {
    /// Waits for the shutdown token or a fatal error, then stops: no new writes, requests
    /// in flight finish, the flusher sends what is durable, the WAL closes. Requests and
    /// flushing share one `drain_timeout`; what is not flushed by then stays in the WAL.
    async fn supervise(mut self) -> anyhow::Result<()> {
        let fatal = tokio::select! {
            () = self.shutdown.cancelled() => None,
            e = self.wal.writer_failed() => Some(anyhow::Error::new(e).context("the WAL writer failed")),
            r = &mut self.flusher => Some(match r {
                Ok(Ok(())) => anyhow::anyhow!("the flusher stopped unexpectedly"),
                Ok(Err(e)) => anyhow::Error::new(e).context("the flusher stopped"),
                Err(e) => anyhow::Error::new(e).context("the flusher panicked"),
            }),
        };
        if let Some(e) = &fatal {
            error!(error = format!("{e:#}"), "stopping on a fatal error");
        }
        systemd::notify(&[NotifyState::Stopping]);
        info!("stopping: no new writes; finishing requests in flight");
        let drain_timeout = self.config.borrow().shutdown.drain_timeout;
        let deadline = tokio::time::Instant::now() + drain_timeout;
        self.ingest.stop_accepting();
        self.shutdown.cancel();
        if fatal.is_some() {
            // No commit will come: requests waiting for one are answered now.
            self.acks.close();
        }
        // Requests already appending finish, so that the flusher's drain includes them.
        let linger = (tokio::time::Instant::now() + LINGER).min(deadline);
        while self.ingest.open_connections() > 0 && tokio::time::Instant::now() < linger {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Meanwhile the server keeps answering, 503 with `Connection: close` and
        // `Retry-After` to writes, where closing connections at once would leave clients
        // that were sending with no answer, not knowing whether their rows were kept.
        if !self.flusher.is_finished() {
            self.stop_flusher.cancel();
            match tokio::time::timeout_at(deadline, &mut self.flusher).await {
                Ok(Ok(Err(e))) => warn!(error = %e, "the flusher stopped with an error"),
                Ok(_) => {}
                Err(_) => {
                    warn!(timeout = ?drain_timeout, "drain timeout: rows not flushed stay in the WAL");
                    self.flusher.abort();
                }
            }
        }
        // Requests still waiting for a commit are told that their rows are durable in the
        // WAL before their connections go. Idle connections close now; requests still
        // being sent get their answers until the drain timeout (a second at least).
        self.acks.close();
        self.stop_server.cancel();
        let last_answers = deadline.max(tokio::time::Instant::now() + ANSWER_GRACE);
        if tokio::time::timeout_at(last_answers, &mut self.server)
            .await
            .is_err()
        {
            warn!("connections still busy after the drain are abandoned");
            self.server.abort();
        }
        self.socket.remove();
        for task in &self.service {
            task.abort();
        }
        self.wal.close().await.context("closing the WAL")?;
        info!("stopped");
        fatal.map_or(Ok(()), Err)
    }
}
