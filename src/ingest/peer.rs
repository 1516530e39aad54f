//! The client at the other end of a connection: who it is (its credentials, checked
//! against `[listen] allowed_uids` and `allowed_gids`), and whether it is still there.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

use crate::config::ListenConfig;

/// Who may connect: `[listen] allowed_uids` and `allowed_gids`, both empty for anyone
/// who can open the socket.
#[derive(Debug, Clone, Default)]
pub struct Access {
    uids: Vec<u32>,
    gids: Vec<u32>,
}

/// A peer refused by [`Access::check`]: its credentials, as the kernel gave them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The peer's user id.
    pub uid: u32,
    /// The peer's group id.
    pub gid: u32,
    /// The peer's process id, when the kernel gives one.
    pub pid: Option<i32>,
}

impl Refused {
    /// The refusal's message, for the 403 answer.
    #[must_use]
    pub fn message(&self) -> String {
        format!(
            "uid {} (gid {}) may not write to pgspool: add it to [listen] allowed_uids, or its \
             group to allowed_gids",
            self.uid, self.gid
        )
    }
}

impl Access {
    /// The allow-lists of `listen`.
    #[must_use]
    pub fn new(listen: &ListenConfig) -> Access {
        Access {
            uids: listen.allowed_uids.clone(),
            gids: listen.allowed_gids.clone(),
        }
    }

    /// Checks the peer of `stream` by its credentials (`SO_PEERCRED`): allowed when no list
    /// is set, or its uid or gid is listed.
    ///
    /// # Errors
    /// [`Refused`] with the peer's credentials; credentials that cannot be read refuse
    /// with uid and gid `u32::MAX`.
    pub fn check(&self, stream: &UnixStream) -> Result<(), Refused> {
        if self.uids.is_empty() && self.gids.is_empty() {
            return Ok(());
        }
        let refused = match stream.peer_cred() {
            Ok(cred) => {
                if self.uids.contains(&cred.uid()) || self.gids.contains(&cred.gid()) {
                    return Ok(());
                }
                Refused {
                    uid: cred.uid(),
                    gid: cred.gid(),
                    pid: cred.pid(),
                }
            }
            Err(_) => Refused {
                uid: u32::MAX,
                gid: u32::MAX,
                pid: None,
            },
        };
        Err(refused)
    }
}

/// The client's end of a connection, kept (a duplicate of the socket's descriptor) so that
/// a request waiting for a commit notices when its client is gone: hyper does not, since a
/// client may half-close its side and still read the answer.
#[derive(Debug, Clone)]
pub struct Peer(Arc<OwnedFd>);

/// How often a waiting request checks that its client is still there.
const PEER_CHECK: Duration = Duration::from_secs(1);

/// How long [`Peer::answer`] may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

impl Peer {
    /// The peer of `socket`.
    ///
    /// # Errors
    /// When the descriptor cannot be duplicated (too many open files).
    pub fn new(socket: &impl AsFd) -> std::io::Result<Peer> {
        Ok(Peer(Arc::new(socket.as_fd().try_clone_to_owned()?)))
    }

    /// Returns once the client has closed its socket (both directions: a half-close is
    /// not going away), checking every [`PEER_CHECK`].
    pub(super) async fn gone(&self) {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        loop {
            tokio::time::sleep(PEER_CHECK).await;
            let mut fds = [PollFd::new(self.0.as_fd(), PollFlags::empty())];
            let hung_up = poll(&mut fds, PollTimeout::ZERO).is_ok()
                && fds[0]
                    .revents()
                    .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR));
            if hung_up {
                return;
            }
        }
    }

    /// Writes `response` (a whole HTTP response) to the client after hyper has given up
    /// the connection without answering, within [`ANSWER_TIMEOUT`]; a client that is gone
    /// or does not read is left alone.
    pub(super) async fn answer(&self, response: &[u8]) {
        let Ok(fd) = self.0.try_clone() else {
            return;
        };
        let Ok(mut stream) = UnixStream::from_std(std::os::unix::net::UnixStream::from(fd)) else {
            return;
        };
        let _ = tokio::time::timeout(ANSWER_TIMEOUT, async {
            stream.write_all(response).await?;
            stream.shutdown().await
        })
        .await;
    }
}
