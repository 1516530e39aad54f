//! A client for the daemon's HTTP API over its Unix socket, used by `pgspool send`, `pgspool
//! demo` and the tests (and by anything in Rust that wants to send rows).

use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::{HeaderMap, Request, StatusCode};
use hyper_util::rt::TokioIo;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use tokio::net::UnixStream;

/// Characters of a table name that are percent-encoded in the request path.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'.').remove(b'-').remove(b'_');

/// An answer from the daemon.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The HTTP status.
    pub status: StatusCode,
    /// The response headers.
    pub headers: HeaderMap,
    /// The JSON body; a body that is not JSON (`/metrics`) as a JSON string.
    pub body: serde_json::Value,
}

/// One keep-alive HTTP/1.1 connection to the daemon.
#[derive(Debug)]
pub struct SpoolClient {
    sender: http1::SendRequest<Full<Bytes>>,
}

impl SpoolClient {
    /// Connects to the daemon listening on `socket`.
    ///
    /// # Errors
    /// When the socket cannot be reached or the HTTP handshake fails.
    pub async fn connect(socket: &Path) -> anyhow::Result<SpoolClient> {
        let stream = UnixStream::connect(socket).await.map_err(|e| {
            anyhow::anyhow!("cannot connect to pgspool at {}: {e}", socket.display())
        })?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(SpoolClient { sender })
    }

    /// Whether the daemon closed this connection (it closes one idle for 30 s, and all of
    /// them when it stops): a request on it would fail before being sent, so connect again.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// Posts rows to `table` (`name` or `schema.name`): `content_type` is
    /// `application/json` or `application/x-ndjson`.
    ///
    /// # Errors
    /// When the connection fails; HTTP error statuses are returned as replies.
    pub async fn post_rows(
        &mut self,
        table: &str,
        content_type: &str,
        body: impl Into<Bytes>,
    ) -> anyhow::Result<Reply> {
        self.post_rows_with(table, "", content_type, body).await
    }

    /// Posts rows like [`post_rows`](Self::post_rows) with a query string (without the
    /// `?`, already encoded), such as `ack=committed&invalid=dead_letter`.
    ///
    /// # Errors
    /// When the connection fails; HTTP error statuses are returned as replies.
    pub async fn post_rows_with(
        &mut self,
        table: &str,
        query: &str,
        content_type: &str,
        body: impl Into<Bytes>,
    ) -> anyhow::Result<Reply> {
        let mut path = format!(
            "/v1/tables/{}/rows",
            utf8_percent_encode(table, PATH_SEGMENT)
        );
        if !query.is_empty() {
            path.push('?');
            path.push_str(query);
        }
        let request = Request::post(path)
            .header("host", "pgspool")
            .header("content-type", content_type)
            .body(Full::new(body.into()))?;
        self.send(request).await
    }

    /// Sends a GET for `path`.
    ///
    /// # Errors
    /// When the connection fails.
    pub async fn get(&mut self, path: &str) -> anyhow::Result<Reply> {
        let request = Request::get(path)
            .header("host", "pgspool")
            .body(Full::new(Bytes::new()))?;
        self.send(request).await
    }

    async fn send(&mut self, request: Request<Full<Bytes>>) -> anyhow::Result<Reply> {
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await?.to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
        });
        Ok(Reply {
            status,
            headers,
            body,
        })
    }
}
