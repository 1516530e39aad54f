//! The HTTP/1.1 server on the Unix socket: creating it ([`bind`]), admitting
//! connections (the peer's credentials, [`peer`]; `[ingest] max_connections` and the
//! limits on request heads, here), and stopping gracefully.
//!
//! The request contract lives in [`handler`], the limits on bodies and rows in [`limits`].
//! The server takes its listener and a cancellation token, so tests bind a socket of their
//! own and stop the server at will.

pub mod handler;
pub mod limits;
pub mod peer;
mod socket;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use hyper::StatusCode;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::json;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use handler::{Ingest, IngestOptions};
pub use peer::{Access, Peer, Refused};
pub use socket::bind;

use crate::config::IngestConfig;
use crate::metrics::RequestRefusal;

/// The most a connection's read buffer holds (hyper's default is about 400 KiB): with
/// `[ingest] max_connections` of them, each counts. A larger head limit raises it to hold
/// the longest head hyper reads, twice `[ingest] max_header_bytes`.
const READ_BUFFER_BYTES: usize = 64 << 10;

/// How long a refused connection is given to send its request and read the answer.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves requests on `listener` until `shutdown` is cancelled, then stops accepting, lets
/// requests in flight finish, and returns (callers bound the wait).
///
/// Each connection is checked first: a peer the allow-lists of `[listen]` refuse gets 403
/// and a log line naming its uid and pid; beyond `[ingest] max_connections` open, 503.
/// Both are answered to the connection's first request within 2 s, and
/// at most `max_connections` such refusals are under way at once (beyond, the connection
/// is closed unanswered). Then its requests are served, each head within `[ingest]
/// header_timeout` (408 on a new connection; a kept-alive connection idle that long is
/// closed) and twice `max_header_bytes` (hyper's 431, without a body; heads over the
/// limit but within twice it get the handler's 431 with a message).
pub async fn serve(listener: UnixListener, ingest: Arc<Ingest>, shutdown: CancellationToken) {
    let graceful = GracefulShutdown::new();
    let access = Access::new(&ingest.listen());
    let refusing = Arc::new(AtomicUsize::new(0));
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
        let limits = ingest.limits();
        let refusal = match access.check(&stream) {
            Err(refused) => {
                warn!(
                    uid = refused.uid,
                    gid = refused.gid,
                    pid = %refused.pid.map_or_else(|| "unknown".to_string(), |p| p.to_string()),
                    "refused a connection: the peer is not in [listen] allowed_uids or \
                     allowed_gids"
                );
                Some((
                    RequestRefusal::Peer,
                    StatusCode::FORBIDDEN,
                    refused.message(),
                ))
            }
            Ok(()) if ingest.open_connections() as u64 >= limits.max_connections => Some((
                RequestRefusal::TooManyConnections,
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{} connections are open, the limit ([ingest] max_connections); retry \
                     later, or reuse connections",
                    limits.max_connections
                ),
            )),
            Ok(()) => None,
        };
        if let Some((reason, status, message)) = refusal {
            ingest.metrics_handle().request_refused(reason);
            if (refusing.fetch_add(1, Ordering::Relaxed) as u64) < limits.max_connections {
                tokio::spawn(refuse(stream, Arc::clone(&refusing), status, message));
            } else {
                refusing.fetch_sub(1, Ordering::Relaxed);
            }
            continue;
        }
        let open = ingest.connection_opened();
        let peer = Peer::new(&stream)
            .inspect_err(|e| debug!(error = %e, "cannot watch for the client going away"))
            .ok();
        let served = Arc::new(AtomicBool::new(false));
        let service = {
            let (ingest, peer, served) = (Arc::clone(&ingest), peer.clone(), Arc::clone(&served));
            service_fn(move |mut request: hyper::Request<_>| {
                served.store(true, Ordering::Relaxed);
                let ingest = Arc::clone(&ingest);
                if let Some(peer) = &peer {
                    request.extensions_mut().insert(peer.clone());
                }
                async move { Ok::<_, std::convert::Infallible>(ingest.handle(request).await) }
            })
        };
        // half_close: a client that shuts down its sending side after the request still
        // gets the answer (the rows may have been acknowledged). The timer enables hyper's
        // limit on the time a client may take to send its headers.
        // Heads up to twice the limit are read, so that the handler answers those over it
        // with a message (hyper's own 431 has no body); longer ones get hyper's.
        let longest_head = usize::try_from(2 * limits.max_header_bytes).unwrap_or(usize::MAX);
        let connection = http1::Builder::new()
            .half_close(true)
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_header_size(longest_head)
            .max_buf_size(READ_BUFFER_BYTES.max(longest_head))
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        let ingest = Arc::clone(&ingest);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                let fresh = !served.load(Ordering::Relaxed);
                connection_failed(&e, &ingest, &limits, fresh, peer.as_ref()).await;
            }
            drop(open);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Answers a refused connection's first request with `status` and `message`, within
/// [`REFUSAL_TIMEOUT`], and closes it; then takes one off `refusing` (the refusals under
/// way, counted by the caller).
async fn refuse(
    stream: UnixStream,
    refusing: Arc<AtomicUsize>,
    status: StatusCode,
    message: String,
) {
    let service = service_fn(move |_request| {
        let response = handler::refusal_response(status, &message);
        async move { Ok::<_, std::convert::Infallible>(response) }
    });
    let connection = http1::Builder::new()
        .keep_alive(false)
        .timer(TokioTimer::new())
        .header_read_timeout(REFUSAL_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, connection).await;
    refusing.fetch_sub(1, Ordering::Relaxed);
}

/// Logs and counts a connection that ended with an error; a new connection whose first
/// request head did not come within `[ingest] header_timeout` gets its 408 here (hyper
/// closes without an answer).
async fn connection_failed(
    e: &hyper::Error,
    ingest: &Ingest,
    limits: &IngestConfig,
    fresh: bool,
    peer: Option<&Peer>,
) {
    if e.is_parse_too_large() {
        ingest
            .metrics_handle()
            .request_refused(RequestRefusal::HeadersTooLarge);
        info!(
            "a request head was larger than twice [ingest] max_header_bytes = {}: answered \
             431 and closed the connection",
            limits.max_header_bytes
        );
    } else if e.is_timeout() && fresh {
        ingest
            .metrics_handle()
            .request_refused(RequestRefusal::HeaderTimeout);
        let message = format!(
            "the request head was not received within {:?} ([ingest] header_timeout)",
            limits.header_timeout
        );
        debug!(%message, "answering 408");
        if let Some(peer) = peer {
            let body = json!({ "error": message }).to_string();
            let response = format!(
                "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            peer.answer(response.as_bytes()).await;
        }
    } else {
        debug!(error = %e, "connection ended with an error");
    }
}
