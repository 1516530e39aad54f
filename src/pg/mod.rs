//! Connecting to PostgreSQL, shared by the flusher and the catalog: the connection
//! string ([`conninfo`]), TLS ([`tls`]) and the password when the string has none
//! ([`password`]). The password never reaches a message: [`Target`] and
//! [`describe_target`] leave it out, and tokio-postgres redacts it.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_postgres::Client;
use tokio_postgres::config::Host;
use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::debug;

pub mod conninfo;
pub mod password;
pub mod tls;

use crate::config::PostgresConfig;
use password::Secret;

/// Where and how to connect: the parsed connection string, the TLS connector its
/// `sslmode` and `sslrootcert` ask for, and the password when the string has none.
/// Clones share the password, which [`Target::reload_password`] replaces.
#[derive(Clone)]
pub struct Target {
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    /// Whether the connection string holds a password itself.
    url_password: bool,
    password: Arc<RwLock<Option<Secret>>>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("target", &describe_target(&self.config))
            .finish_non_exhaustive()
    }
}

/// Parses a connection string: a `postgres://` URL or libpq `key=value` pairs (including
/// `host=/path/to/socket/dir port=N`), as tokio-postgres reads them, plus `sslmode`
/// `verify-ca` and `verify-full` and `sslrootcert` (see [`tls`]).
///
/// # Errors
/// A message saying what is wrong, without the string (it may hold a password).
pub fn parse_conninfo(
    url: &str,
) -> Result<(tokio_postgres::Config, tls::SslMode, Option<String>), String> {
    let (rest, params) = conninfo::split(url);
    let mut config: tokio_postgres::Config = rest.parse().map_err(|e| describe(&e))?;
    let mode = params
        .sslmode
        .as_deref()
        .map_or(Ok(tls::SslMode::Prefer), tls::SslMode::parse)?;
    // libpq ignores sslmode on Unix sockets, where PostgreSQL offers no TLS.
    let unix_only = !config.get_hosts().is_empty()
        && config
            .get_hosts()
            .iter()
            .all(|h| matches!(h, Host::Unix(_)));
    config.ssl_mode(if unix_only {
        tokio_postgres::config::SslMode::Disable
    } else {
        mode.negotiation()
    });
    Ok((config, mode, params.sslrootcert))
}

impl Target {
    /// The target of a connection string (see [`parse_conninfo`]), with `connect_timeout`
    /// unless the string sets one, and libpq's password file (`PGPASSFILE`, `~/.pgpass`)
    /// when the string has no password.
    ///
    /// # Errors
    /// When the string does not parse or its TLS settings cannot be honoured (a root
    /// certificate file missing, say).
    pub fn parse(url: &str, connect_timeout: Duration) -> anyhow::Result<Target> {
        Target::build(url, connect_timeout, None)
    }

    /// The target of `[postgres]`: its `url` as [`Target::parse`] reads it, with the
    /// password of `password_file` when it is set.
    ///
    /// # Errors
    /// As [`Target::parse`], and when `password_file` cannot be used (see
    /// [`password::read_password_file`]) or the URL holds a password as well.
    pub fn from_config(postgres: &PostgresConfig) -> anyhow::Result<Target> {
        let url = postgres.url.as_deref().unwrap_or_default();
        Target::build(
            url,
            postgres.connect_timeout,
            postgres.password_file.as_deref(),
        )
    }

    fn build(
        url: &str,
        connect_timeout: Duration,
        password_file: Option<&std::path::Path>,
    ) -> anyhow::Result<Target> {
        let (mut config, mode, sslrootcert) =
            parse_conninfo(url).map_err(|e| anyhow::anyhow!("{e}"))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(connect_timeout);
        }
        if config.get_application_name().is_none() {
            config.application_name("pgspool");
        }
        let tls =
            tls::connector(mode, sslrootcert.as_deref()).map_err(|e| anyhow::anyhow!("{e}"))?;
        let target = Target {
            url_password: config.get_password().is_some(),
            config,
            tls,
            password: Arc::default(),
        };
        target
            .resolve_password(password_file)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(target)
    }

    /// Reads the password again, from `[postgres] password_file` or libpq's password file,
    /// for the connections opened from now on (on a reload, after a password rotation).
    ///
    /// Returns whether the password changed.
    ///
    /// # Errors
    /// As [`Target::from_config`]; the password in force stays then.
    pub fn reload_password(&self, postgres: &PostgresConfig) -> Result<bool, String> {
        self.resolve_password(postgres.password_file.as_deref())
    }

    /// Sets the password from `password_file`, or libpq's password file when the
    /// connection string has none; returns whether it changed.
    fn resolve_password(&self, password_file: Option<&std::path::Path>) -> Result<bool, String> {
        let password = match password_file {
            Some(_) if self.url_password => {
                return Err(
                    "the PostgreSQL connection string holds a password and [postgres] \
                     password_file is set too: keep only password_file, which keeps the \
                     password out of the configuration and the process list"
                        .into(),
                );
            }
            Some(file) => Some(password::read_password_file(file)?),
            None if self.url_password => None,
            None => password::pgpass_path().and_then(|f| password::from_pgpass(&f, &self.config)),
        };
        let mut current = self
            .password
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = *current != password;
        *current = password;
        Ok(changed)
    }

    /// The parsed connection string (without a password from a file).
    #[must_use]
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// Where it connects, for messages: see [`describe_target`].
    #[must_use]
    pub fn describe(&self) -> String {
        describe_target(&self.config)
    }
}

/// Opens a connection and drives it on a background task; the connection closes when the
/// returned client is dropped.
///
/// # Errors
/// When the server cannot be reached or refuses the connection.
pub async fn connect(target: &Target) -> Result<Client, tokio_postgres::Error> {
    let mut config = target.config.clone();
    let password = target
        .password
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    if let Some(password) = password {
        config.password(password.expose());
    }
    let (client, connection) = config.connect(target.tls.clone()).await?;
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
            if s.contains("CaUsedAsEndEntity") {
                s.push_str(
                    " (the server presents a self-signed certificate that is also its own CA: \
                     libpq accepts that, rustls does not; give the server a certificate signed \
                     by a CA, and that CA's certificate as sslrootcert)",
                );
            } else if s.contains("TLS") {
                s.push_str(
                    " (TLS as the connection string's sslmode and sslrootcert ask: check that \
                     the server has ssl = on, that sslrootcert holds the CA that signed its \
                     certificate, and for verify-full that the certificate names the host)",
                );
            }
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_in_the_url_and_a_password_file_are_refused_together() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-the-file\n").expect("write");
        let postgres = PostgresConfig {
            url: Some("host=db user=u password=hunter2-url".into()),
            password_file: Some(file),
            ..PostgresConfig::default()
        };
        let e = format!("{:#}", Target::from_config(&postgres).expect_err("refused"));
        assert!(e.contains("keep only password_file"), "{e}");
        assert!(
            !e.contains("hunter2-url") && !e.contains("from-the-file"),
            "{e}"
        );
    }

    #[test]
    fn unix_sockets_never_negotiate_tls() {
        use tokio_postgres::config::SslMode as Pg;
        let mode = |url: &str| parse_conninfo(url).expect("parses").0.get_ssl_mode();
        assert_eq!(mode("host=/run/postgresql sslmode=require"), Pg::Disable);
        assert_eq!(mode("host=db sslmode=verify-full"), Pg::Require);
        assert_eq!(mode("host=db"), Pg::Prefer);
        let e = parse_conninfo("host=db password=hunter2-url sslmode=allow").expect_err("allow");
        assert!(e.contains("sslmode") && !e.contains("hunter2-url"), "{e}");
    }
}
