//! Where the password for PostgreSQL comes from when the connection string has none:
//! `[postgres] password_file`, or libpq's password file (`PGPASSFILE`, else
//! `~/.pgpass`), so that the secret stays out of the configuration and the process list.
//!
//! Both files must be readable by their owner only (mode 0600 or less), as libpq requires
//! of a `.pgpass`: a `password_file` that is not is refused with an error; a `.pgpass` that
//! is not is ignored with a warning, as libpq does.
//!
//! A `.pgpass` line is `hostname:port:database:username:password`; a field of `*` alone
//! matches anything; `\` escapes `:` and `\`; lines starting with `#` are comments; the
//! first matching line wins (PostgreSQL documentation, "The Password File"). The host is
//! the connection's first host: a TCP host name as written, a Unix socket directory as
//! its path, except libpq's default socket directories, which match `localhost`.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio_postgres::config::Host;
use tracing::warn;

/// A password, which formats as `(redacted)` so that it cannot reach a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The password itself, to hand to the connection.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("(redacted)")
    }
}

/// Reads `[postgres] password_file`: its content less one trailing line break.
///
/// # Errors
/// When the file cannot be read, is not a regular file, is readable or writable by group
/// or others, or is empty. The message names the file, never its content.
pub fn read_password_file(path: &Path) -> Result<Secret, String> {
    let shown = path.display();
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("cannot read [postgres] password_file {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!(
            "[postgres] password_file {shown} is not a regular file"
        ));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "[postgres] password_file {shown} has group or world access (mode {mode:04o}, owner \
             uid {}): it holds a password, so it must be readable by its owner only; run \
             `chmod 600 {shown}`",
            meta.uid()
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read [postgres] password_file {shown}: {e}"))?;
    let password = text
        .strip_suffix('\n')
        .map_or(text.as_str(), |t| t.strip_suffix('\r').unwrap_or(t));
    if password.is_empty() {
        return Err(format!("[postgres] password_file {shown} is empty"));
    }
    Ok(Secret(password.to_string()))
}

/// libpq's password file: `PGPASSFILE`, else `~/.pgpass`; `None` when neither is set.
#[must_use]
pub fn pgpass_path() -> Option<PathBuf> {
    std::env::var_os("PGPASSFILE")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".pgpass")))
}

/// The password `file` (libpq's format) gives for the connection `config` describes;
/// `None` when the file is missing, matches no line, or is ignored (not a regular file,
/// or readable by group or others: a warning says so, as libpq does).
#[must_use]
pub fn from_pgpass(file: &Path, config: &tokio_postgres::Config) -> Option<Secret> {
    let meta = std::fs::metadata(file).ok()?;
    if !meta.is_file() {
        warn!(file = %file.display(), "the password file is not a plain file: it is ignored");
        return None;
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        warn!(
            file = %file.display(),
            mode = format!("{mode:04o}"),
            "the password file has group or world access: it is ignored, as libpq does \
             (permissions should be u=rw, 0600, or less)"
        );
        return None;
    }
    let text = std::fs::read_to_string(file).ok()?;
    let user = config.get_user()?;
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(name)) => name.clone(),
        Some(Host::Unix(dir)) if !DEFAULT_SOCKET_DIRS.iter().any(|d| dir == Path::new(d)) => {
            dir.display().to_string()
        }
        _ => "localhost".to_string(),
    };
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    let database = config.get_dbname().unwrap_or(user);
    lookup(&text, [&host, &port, database, user]).map(Secret)
}

/// Socket directories libpq is commonly built with as its default (upstream `/tmp`,
/// Debian's `/var/run/postgresql`): a connection through them matches `localhost`.
const DEFAULT_SOCKET_DIRS: [&str; 3] = ["/var/run/postgresql", "/run/postgresql", "/tmp"];

/// The password of the first line of `text` whose four fields match `wanted` (host, port,
/// database, user).
fn lookup(text: &str, wanted: [&str; 4]) -> Option<String> {
    text.lines().find_map(|line| {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.starts_with('#') {
            return None;
        }
        let mut fields = fields(line);
        if fields.len() < 5 {
            return None;
        }
        let matches = fields
            .iter()
            .zip(wanted)
            .all(|((field, escaped), want)| (field == "*" && !escaped) || field == want);
        matches.then(|| fields.swap_remove(4).0)
    })
}

/// The `:`-separated fields of a line, unescaped (`\x` is `x`), each with whether it held
/// an escape; everything after the fourth `:` is the fifth field.
fn fields(line: &str) -> Vec<(String, bool)> {
    let mut fields = vec![(String::new(), false)];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        let last = fields.len() - 1;
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    fields[last].0.push(next);
                    fields[last].1 = true;
                }
            }
            ':' if fields.len() < 5 => fields.push((String::new(), false)),
            c => fields[last].0.push(c),
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# comment\n\
                        db.example:5432:app:alice:first\n\
                        *:*:*:bob:pa\\:ss\\\\word:tail\n\
                        \\*:5432:app:carol:literal-star\n\
                        *:*:*:*:fallback\r\n";

    #[test]
    fn the_first_matching_line_gives_the_password() {
        let get = |host, port, db, user| lookup(FILE, [host, port, db, user]);
        assert_eq!(
            get("db.example", "5432", "app", "alice").as_deref(),
            Some("first")
        );
        assert_eq!(
            get("db.example", "5433", "app", "alice").as_deref(),
            Some("fallback")
        );
        assert_eq!(
            get("anywhere", "1", "x", "bob").as_deref(),
            Some("pa:ss\\word:tail")
        );
        // An escaped `*` is a literal star, not a wildcard.
        assert_eq!(
            get("h", "5432", "app", "carol").as_deref(),
            Some("fallback")
        );
        assert_eq!(
            get("*", "5432", "app", "carol").as_deref(),
            Some("literal-star")
        );
        assert_eq!(lookup("h:1:d:u\n", ["h", "1", "d", "u"]), None);
    }

    #[test]
    fn pgpass_lookup_uses_the_connection_and_ignores_loose_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pgpass");
        std::fs::write(
            &file,
            "localhost:5432:u:u:via-default-socket\n/srv/pg:6000:app:u:via-socket-dir\n",
        )
        .expect("write");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let config = |s: &str| s.parse::<tokio_postgres::Config>().expect("parses");
        let found = |s| from_pgpass(&file, &config(s)).map(|p| p.expose().to_string());
        assert_eq!(
            found("host=/srv/pg port=6000 user=u dbname=app").as_deref(),
            Some("via-socket-dir")
        );
        assert_eq!(
            found("host=/var/run/postgresql user=u").as_deref(),
            Some("via-default-socket")
        );
        assert_eq!(found("host=/srv/pg user=u"), None);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        assert_eq!(found("host=/srv/pg port=6000 user=u dbname=app"), None);
    }

    #[test]
    fn a_password_file_must_be_private_and_is_never_quoted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cr3t-value\n").expect("write");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let secret = read_password_file(&file).expect("read");
        assert_eq!(secret.expose(), "s3cr3t-value");
        assert_eq!(format!("{secret:?}"), "(redacted)");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = read_password_file(&file).expect_err("refused");
        assert!(e.contains("chmod 600") && !e.contains("s3cr3t"), "{e}");
        std::fs::write(&file, "").expect("write");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(
            read_password_file(&file)
                .expect_err("empty")
                .contains("empty")
        );
        assert!(read_password_file(dir.path()).is_err());
    }
}
