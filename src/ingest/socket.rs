//! Creating the listening Unix socket: its file's mode and group, and replacing a stale file
//! only when no live daemon answers on it. Source: unix(7) (permissions on the socket file
//! decide who may connect; `connect` on a socket nobody listens on fails with
//! `ECONNREFUSED`).

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use anyhow::Context;
use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
use nix::unistd::{Gid, Group};
use tokio::net::{UnixListener, UnixStream};

use crate::config::{ConfigError, ListenConfig};

/// Binds the Unix socket `[listen] socket` with the file mode `[listen] mode` and group
/// `[listen] group`, set before it listens, so no connection is taken under other
/// permissions. A socket file left by a daemon that is gone is replaced; one a live daemon
/// answers on is not, nor one whose owner cannot be asked, nor any file that is not a
/// socket.
///
/// # Errors
/// [`ConfigError::Invalid`] when `[listen] group` names no group; an I/O error naming the
/// socket when a live daemon listens on it, the path is some other file, its directory is
/// missing, or binding, setting the mode or the group fails.
pub async fn bind(listen: &ListenConfig) -> anyhow::Result<UnixListener> {
    let path = listen.socket.as_path();
    let gid = listen.group.as_deref().map(group_id).transpose()?;
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
        )
        .into());
    }
    remove_stale(path).await?;
    let listener = bind_with_permissions(path, listen.mode, gid)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    Ok(UnixListener::from_std(listener)?)
}

/// The group id of `group`, a name or a number.
fn group_id(group: &str) -> Result<Gid, ConfigError> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(Gid::from_raw(gid));
    }
    match Group::from_name(group) {
        Ok(Some(found)) => Ok(found.gid),
        Ok(None) => Err(ConfigError::Invalid(format!(
            "[listen] group = {group:?}: no such group (create it with groupadd, or name an \
             existing one)"
        ))),
        Err(e) => Err(ConfigError::Invalid(format!(
            "[listen] group = {group:?} cannot be looked up: {e}"
        ))),
    }
}

/// Removes the socket file at `path` if it is stale: a socket nobody listens on. Leaves
/// nothing else alone.
async fn remove_stale(path: &Path) -> io::Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; choose another --socket",
                path.display()
            ),
        ));
    }
    match UnixStream::connect(path).await {
        // Nobody listens: a daemon that is gone left it.
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
        // Removed meanwhile.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "another process is listening on {}; stop it or choose another --socket",
                    path.display()
                ),
            ));
        }
        // EACCES, EAGAIN (a full backlog): whoever owns it may still be there.
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "{} exists and cannot be checked for a live daemon ({e}); remove it if \
                     no daemon uses it, or choose another --socket",
                    path.display()
                ),
            ));
        }
    }
    std::fs::remove_file(path)
}

/// A listening socket at `path` whose file has `mode` and, if given, group `gid`: bound,
/// given its permissions, and only then listening.
fn bind_with_permissions(
    path: &Path,
    mode: u32,
    gid: Option<Gid>,
) -> io::Result<std::os::unix::net::UnixListener> {
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    socket::bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    let permitted = (|| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        if let Some(gid) = gid {
            std::os::unix::fs::chown(path, None, Some(gid.as_raw()))?;
        }
        socket::listen(&fd, Backlog::MAXCONN)?;
        Ok::<_, io::Error>(())
    })();
    if let Err(e) = permitted {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(std::os::unix::net::UnixListener::from(fd))
}
