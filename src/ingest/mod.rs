//! The HTTP/1.1 server on the Unix socket: accepting connections and stopping gracefully.
//!
//! The request contract lives in [`handler`]. The server takes its listener and a
//! cancellation token, so tests bind a socket of their own and stop the server at will.

pub mod handler;

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

pub use handler::{Ingest, IngestOptions, Peer};

/// How long a client may take to send a request's headers (a slow client cannot hold a
/// connection open forever by trickling them).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Binds the Unix socket at `path`. A socket file left by a daemon that is gone is
/// replaced; one a live daemon answers on is not, nor is any file that is not a socket.
///
/// # Errors
/// When a live daemon listens on `path`, `path` is some other file, its directory is
/// missing, or binding fails.
pub async fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.is_dir()
    {
        let what = if parent.exists() {
            "is not a directory"
        } else {
            "does not exist"
        };
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "cannot listen on {}: {} {what}",
                path.display(),
                parent.display()
            ),
        ));
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; choose another --socket",
                    path.display()
                ),
            ));
        }
        if UnixStream::connect(path).await.is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "another process is listening on {}; stop it or choose another --socket",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    UnixListener::bind(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot listen on {}: {e}", path.display()),
        )
    })
}

/// Serves requests on `listener` until `shutdown` is cancelled, then stops accepting, lets
/// requests in flight finish, and returns (callers bound the wait).
pub async fn serve(listener: UnixListener, ingest: Arc<Ingest>, shutdown: CancellationToken) {
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Usually EMFILE: back off instead of spinning.
                warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let open = ingest.connection_opened();
        let ingest = Arc::clone(&ingest);
        let peer = Peer::new(&stream)
            .inspect_err(|e| debug!(error = %e, "cannot watch for the client going away"))
            .ok();
        let service = service_fn(move |mut request: hyper::Request<_>| {
            let ingest = Arc::clone(&ingest);
            if let Some(peer) = &peer {
                request.extensions_mut().insert(peer.clone());
            }
            async move { Ok::<_, std::convert::Infallible>(ingest.handle(request).await) }
        });
        // half_close: a client that shuts down its sending side after the request still
        // gets the answer (the rows may have been acknowledged). The timer enables hyper's
        // limit on the time a client may take to send its headers.
        let connection = http1::Builder::new()
            .half_close(true)
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(error = %e, "connection ended with an error");
            }
            drop(open);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
