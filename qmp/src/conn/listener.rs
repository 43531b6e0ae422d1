//! Listening sockets: owner-only Unix sockets and TCP.

use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::Stream;

/// Why a Unix socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum UnixBindError {
    /// Another process serves this socket.
    #[error("in use by another process")]
    InUse,
    /// Something that is not a socket (a regular file, a directory, a symbolic
    /// link...) is at the path; it is left alone.
    #[error("{0} is in the way (only a stale socket is replaced)")]
    NotASocket(&'static str),
    /// Anything else.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// What kind of file is in the way, for [`UnixBindError::NotASocket`].
fn kind_of(t: std::fs::FileType) -> &'static str {
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "a file that is not a socket"
    }
}

/// Binds a non-blocking, owner-only (0600) Unix socket at `path`. Only a stale
/// socket (nobody listening) is replaced; a live one is [`UnixBindError::InUse`],
/// anything else at the path (even a symbolic link to a socket) is
/// [`UnixBindError::NotASocket`] and stays untouched.
pub fn bind_owner_only(path: &Path) -> Result<UnixListener, UnixBindError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(UnixBindError::InUse);
            }
            // A stale socket left by a process that is gone.
            std::fs::remove_file(path)?;
        }
        Ok(m) => return Err(UnixBindError::NotASocket(kind_of(m.file_type()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    // Owner-only permissions from the start: no window where others may connect.
    // SAFETY: umask only changes this process's file mode mask; it is restored
    // right after, before any other thread is started.
    let old = unsafe { libc::umask(0o177) };
    let r = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let l = r?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// A non-blocking listening socket. A Unix socket's file is removed on drop, if
/// it is still the one bound (same device and inode).
#[derive(Debug)]
pub enum Listener {
    /// An owner-only Unix socket, its path and the (device, inode) of its file.
    Unix(UnixListener, PathBuf, (u64, u64)),
    /// A TCP socket.
    Tcp(TcpListener),
}

impl Listener {
    /// Binds an owner-only Unix socket ([`bind_owner_only`]).
    pub fn unix(path: &Path) -> Result<Self, UnixBindError> {
        let l = bind_owner_only(path)?;
        let m = std::fs::symlink_metadata(path)?;
        Ok(Listener::Unix(l, path.into(), (m.dev(), m.ino())))
    }

    /// Binds a TCP `host:port`.
    pub fn tcp(host_port: &str) -> io::Result<Self> {
        let l = TcpListener::bind(host_port)?;
        l.set_nonblocking(true)?;
        Ok(Listener::Tcp(l))
    }

    /// The Unix socket's path.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Listener::Unix(_, p, _) => Some(p),
            Listener::Tcp(_) => None,
        }
    }

    /// The listening descriptor.
    pub fn fd(&self) -> RawFd {
        match self {
            Listener::Unix(l, _, _) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }

    /// Accepts one connection (blocking or not, as the socket is) and names its
    /// peer: the socket path for Unix, the address for TCP.
    pub fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Listener::Unix(l, p, _) => {
                let (s, _) = l.accept()?;
                Ok((Stream::Unix(s), p.display().to_string()))
            }
            Listener::Tcp(l) => {
                let (s, a) = l.accept()?;
                let _ = s.set_nodelay(true);
                Ok((Stream::Tcp(s), a.to_string()))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p, ours) = self {
            let same = std::fs::symlink_metadata(&*p).is_ok_and(|m| (m.dev(), m.ino()) == *ours);
            if same {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("conn-test-{}-{tag}.sock", std::process::id()))
    }

    #[test]
    fn unix_socket_is_owner_only_stale_replaced_live_refused() {
        let p = temp("bind");
        let l = Listener::unix(&p).unwrap();
        assert_eq!(l.path(), Some(p.as_path()));
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(Listener::unix(&p), Err(UnixBindError::InUse)));
        drop(l);
        assert!(!p.exists(), "socket removed on drop");
        // A stale socket file (no listener) is replaced.
        drop(UnixListener::bind(&p).unwrap());
        assert!(p.exists());
        let l = Listener::unix(&p).unwrap();
        // Non-blocking: nobody is connecting.
        let e = l.accept().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn only_a_stale_socket_is_replaced() {
        // A regular file, a directory and a symbolic link are left alone.
        let file = temp("file");
        std::fs::write(&file, "notes").unwrap();
        let e = Listener::unix(&file).unwrap_err();
        assert!(
            matches!(e, UnixBindError::NotASocket("a regular file")),
            "{e:?}"
        );
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "notes");

        let dir = temp("dir");
        std::fs::create_dir(&dir).unwrap();
        let e = Listener::unix(&dir).unwrap_err();
        assert!(
            matches!(e, UnixBindError::NotASocket("a directory")),
            "{e:?}"
        );
        assert!(dir.is_dir());

        let sock = temp("target");
        drop(UnixListener::bind(&sock).unwrap());
        let link = temp("link");
        std::os::unix::fs::symlink(&sock, &link).unwrap();
        let e = Listener::unix(&link).unwrap_err();
        assert!(
            matches!(e, UnixBindError::NotASocket("a symbolic link")),
            "{e:?}"
        );
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());

        // A socket file that replaced ours is not removed when ours is dropped.
        let p = temp("replaced");
        let l = Listener::unix(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        drop(UnixListener::bind(&p).unwrap());
        drop(l);
        assert!(p.exists(), "someone else's socket stays");

        for f in [&file, &sock, &link, &p] {
            let _ = std::fs::remove_file(f);
        }
        let _ = std::fs::remove_dir(&dir);
    }

    #[test]
    fn tcp_names_the_peer() {
        let l = Listener::tcp("127.0.0.1:0").unwrap();
        assert!(l.path().is_none());
        let Listener::Tcp(t) = &l else { unreachable!() };
        let addr = t.local_addr().unwrap();
        assert_eq!(l.accept().unwrap_err().kind(), io::ErrorKind::WouldBlock);
        let c = std::net::TcpStream::connect(addr).unwrap();
        // Wait for it blocking, then go back to non-blocking.
        t.set_nonblocking(false).unwrap();
        let (_, peer) = l.accept().unwrap();
        t.set_nonblocking(true).unwrap();
        assert_eq!(peer, c.local_addr().unwrap().to_string());
    }
}
