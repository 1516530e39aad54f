//! Connecting to PostgreSQL, shared by the flusher and the catalog.

use std::time::Duration;

use tokio_postgres::{Client, NoTls};
use tracing::debug;

/// Parses a connection string: a `postgres://` URL or libpq `key=value` pairs (including
/// `host=/path/to/socket/dir port=N`), as tokio-postgres reads them.
///
/// # Errors
/// When the string is neither.
pub fn parse_url(
    url: &str,
    connect_timeout: Duration,
) -> Result<tokio_postgres::Config, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = url.parse()?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(connect_timeout);
    }
    if config.get_application_name().is_none() {
        config.application_name("pgspool");
    }
    Ok(config)
}

/// Opens a connection and drives it on a background task; the connection closes when the
/// returned client is dropped.
///
/// # Errors
/// When the server cannot be reached or refuses the connection.
pub async fn connect(config: &tokio_postgres::Config) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(error = %e, "PostgreSQL connection closed");
        }
    });
    Ok(client)
}

/// Where `config` connects, for messages: hosts (or socket directories), ports, database
/// and user; never the password.
#[must_use]
pub fn describe_target(config: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(name) => name.clone(),
            Host::Unix(dir) => dir.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
    format!(
        "host={} port={} dbname={} user={}",
        if hosts.is_empty() {
            "(default)".to_string()
        } else {
            hosts.join(",")
        },
        if ports.is_empty() {
            "5432".to_string()
        } else {
            ports.join(",")
        },
        config.get_dbname().unwrap_or("(the user name)"),
        config.get_user().unwrap_or("(none given)"),
    )
}

/// A one-line description of a PostgreSQL error: SQLSTATE, message, detail, and the
/// underlying cause for connection errors.
#[must_use]
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                s.push_str(&format!("; {detail}"));
            }
            if let Some(r#where) = db.where_() {
                s.push_str(&format!("; {where}"));
            }
            s
        }
        None => {
            let mut s = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                s.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            s
        }
    }
}
