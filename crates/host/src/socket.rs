//! The host's listening socket: bound without destroying anything that is not ours, and
//! removed when the host is done with it.
//!
//! [`bind`] never removes anything but a stale socket: a path that is not a socket is refused
//! ([`BindError::NotASocket`]); a socket that something answers on is refused
//! ([`BindError::InUse`]); a socket nothing listens on any more (connecting is refused: its
//! host died without removing it) is removed and bound again. The probe is a non-blocking
//! connect that sends nothing and closes at once; a live `iopf host` sees it as a VMM that
//! connected and left.
//!
//! The path appears only once the socket listens (it is bound under a private name and linked
//! into place), so a VMM that waits for the path can connect at once, and a second host never
//! mistakes a host that is still starting for a stale socket.
//!
//! The [`SocketGuard`] it returns removes the socket when dropped, and only if the path still
//! names the socket it bound (same device, inode and change time: a file system may give a
//! new file the inode number of one just removed): a socket another process has bound at the
//! same path since is left alone.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use thiserror::Error;

/// Why the host's socket could not be bound.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BindError {
    /// Something that is not a socket is at the path; it was left as it was.
    #[error("{} exists and is not a socket; refusing to replace it", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// A socket is at the path and something accepts connections on it.
    #[error("{} is in use by another process", path.display())]
    InUse {
        /// The path.
        path: PathBuf,
    },
    /// The path could not be looked at or probed.
    #[error("checking {}", path.display())]
    Inspect {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The stale socket at the path could not be removed.
    #[error("removing the stale socket {}", path.display())]
    RemoveStale {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Binding the path failed.
    #[error("binding {}", path.display())]
    Bind {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The host could not start on the bound socket (the socket has been removed again).
    #[error("starting the host on {}", path.display())]
    Start {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Removes the socket it guards when dropped, if the path still names that socket.
#[derive(Debug)]
pub struct SocketGuard {
    path: PathBuf,
    identity: Identity,
}

/// What tells one file at a path from another: device, inode, change time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    ctime: (i64, i64),
}

impl Identity {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

impl SocketGuard {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the path still names the socket this guard bound.
    pub fn still_ours(&self) -> bool {
        std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.file_type().is_socket() && Identity::of(&m) == self.identity)
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        if !self.still_ours() {
            return;
        }
        if let Err(error) = std::fs::remove_file(&self.path) {
            // Nothing to do about it at the end of the host's life but say so.
            tracing::warn!(path = %self.path.display(), %error, "could not remove the host's socket");
        }
    }
}

/// What answers at a socket path.
enum Probe {
    /// Something accepts (or would, once its backlog drains).
    Live,
    /// Nothing listens: connecting was refused.
    Stale,
    /// The path disappeared meanwhile.
    Gone,
}

fn probe(path: &Path) -> io::Result<Probe> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let address = SocketAddrUnix::new(path)?;
    let socket = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    // Non-blocking: a listener with a full backlog answers EAGAIN instead of making us wait.
    match rustix::net::connect(&socket, &address) {
        Ok(()) | Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INPROGRESS) => Ok(Probe::Live),
        Err(rustix::io::Errno::CONNREFUSED) => Ok(Probe::Stale),
        Err(rustix::io::Errno::NOENT) => Ok(Probe::Gone),
        Err(errno) => Err(errno.into()),
    }
}

/// A listening UNIX socket that appears at `path` only once it listens. Binding at `path`
/// directly (`bind` then `listen`) leaves a moment in which the path exists and connecting is
/// refused: a client that waits for the path would fail, and another host probing it would
/// take it for a stale socket and remove it. So the socket is bound and listening under a
/// private name in the same directory first, then hard-linked to `path` (which never replaces
/// anything there: `AlreadyExists`), and the private name removed. A directory whose private
/// name would be too long for a socket address gets the direct bind.
pub(crate) fn listen_at(path: &Path) -> io::Result<UnixListener> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let private = path.with_file_name(format!(
        ".iopf-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let listener = match UnixListener::bind(&private) {
        Ok(listener) => listener,
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => return UnixListener::bind(path),
        Err(e) => return Err(e),
    };
    let linked = std::fs::hard_link(&private, path);
    if let Err(error) = std::fs::remove_file(&private) {
        tracing::warn!(path = %private.display(), %error, "could not remove the socket's private name");
    }
    linked.map(|()| listener)
}

/// Binds a listening UNIX socket at `path`, replacing only a stale socket (see the module
/// documentation), and returns it with the guard that removes it.
pub fn bind(path: &Path) -> Result<(UnixListener, SocketGuard), BindError> {
    let inspect = |source| BindError::Inspect {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(BindError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        Ok(_) => match probe(path).map_err(inspect)? {
            Probe::Live => {
                return Err(BindError::InUse {
                    path: path.to_path_buf(),
                });
            }
            Probe::Stale => match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(BindError::RemoveStale {
                        path: path.to_path_buf(),
                        source,
                    });
                }
            },
            Probe::Gone => {}
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(inspect(source)),
    }
    let listener = listen_at(path).map_err(|source| match source.kind() {
        // Another process bound it between our look and our bind.
        io::ErrorKind::AddrInUse | io::ErrorKind::AlreadyExists => BindError::InUse {
            path: path.to_path_buf(),
        },
        _ => BindError::Bind {
            path: path.to_path_buf(),
            source,
        },
    })?;
    let meta = std::fs::symlink_metadata(path).map_err(inspect)?;
    Ok((
        listener,
        SocketGuard {
            path: path.to_path_buf(),
            identity: Identity::of(&meta),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::temp_path::TempPath;

    fn dir(name: &str) -> TempPath {
        TempPath::new(&format!("bind-{name}"), "")
    }

    #[test]
    fn a_regular_file_is_refused_and_kept() {
        let dir = dir("file");
        let path = dir.join("notes.txt");
        std::fs::write(&path, "keep me").unwrap();
        let err = bind(&path).unwrap_err();
        assert!(matches!(err, BindError::NotASocket { .. }), "{err}");
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
    }

    /// The socket reaches its path by a link that never replaces what is there (a rename
    /// would), and its private name is gone either way.
    #[test]
    fn the_socket_is_linked_into_place_without_replacing_anything() {
        let dir = dir("link");
        let path = dir.join("host.sock");
        std::fs::write(&path, "someone else's").unwrap();
        let err = listen_at(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "someone else's");
        std::fs::remove_file(&path).unwrap();
        let listener = listen_at(&path).unwrap();
        std::os::unix::net::UnixStream::connect(&path).unwrap();
        listener.accept().unwrap();
        let names: Vec<_> = std::fs::read_dir(&*dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["host.sock"]);
    }

    #[test]
    fn a_live_socket_is_refused_and_kept() {
        let dir = dir("live");
        let path = dir.join("host.sock");
        let (_listener, _guard) = bind(&path).unwrap();
        let err = bind(&path).unwrap_err();
        assert!(matches!(err, BindError::InUse { .. }), "{err}");
        assert!(err.to_string().contains("in use by another process"));
        // Still the first listener's: a client reaches it.
        std::os::unix::net::UnixStream::connect(&path).unwrap();
    }

    #[test]
    fn a_stale_socket_is_replaced_and_the_guard_removes_it() {
        let dir = dir("stale");
        let path = dir.join("host.sock");
        // Bound, then its listener closed without removing the path: a dead host's socket.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let (listener, guard) = bind(&path).unwrap();
        std::os::unix::net::UnixStream::connect(&path).unwrap();
        drop(listener);
        drop(guard);
        assert!(!path.exists());
    }

    #[test]
    fn the_guard_leaves_a_socket_that_is_no_longer_ours() {
        let dir = dir("replaced");
        let path = dir.join("host.sock");
        let (listener, guard) = bind(&path).unwrap();
        drop(listener);
        // Someone else removed ours and bound their own at the same path (a moment later:
        // the file system may reuse the inode number, and its clock ticks coarsely).
        std::fs::remove_file(&path).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let _theirs = UnixListener::bind(&path).unwrap();
        drop(guard);
        assert!(path.exists(), "another process's socket was removed");
    }
}
