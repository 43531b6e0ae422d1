//! Listening sockets: owner-only Unix sockets and TCP.

use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::Stream;

/// Why a Unix socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum UnixBindError {
    /// Another process serves this socket.
    #[error("in use by another process")]
    InUse,
    /// Anything else.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Binds a non-blocking, owner-only (0600) Unix socket at `path`. A stale socket
/// file (nobody listening) is replaced; a live one is [`UnixBindError::InUse`].
pub fn bind_owner_only(path: &Path) -> Result<UnixListener, UnixBindError> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(UnixBindError::InUse);
        }
        // A stale socket left by a process that is gone.
        std::fs::remove_file(path)?;
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

/// A non-blocking listening socket. A Unix socket's file is removed on drop.
#[derive(Debug)]
pub enum Listener {
    /// An owner-only Unix socket and its path.
    Unix(UnixListener, PathBuf),
    /// A TCP socket.
    Tcp(TcpListener),
}

impl Listener {
    /// Binds an owner-only Unix socket ([`bind_owner_only`]).
    pub fn unix(path: &Path) -> Result<Self, UnixBindError> {
        Ok(Listener::Unix(bind_owner_only(path)?, path.into()))
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
            Listener::Unix(_, p) => Some(p),
            Listener::Tcp(_) => None,
        }
    }

    /// The listening descriptor.
    pub fn fd(&self) -> RawFd {
        match self {
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }

    /// Accepts one connection (blocking or not, as the socket is) and names its
    /// peer: the socket path for Unix, the address for TCP.
    pub fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Listener::Unix(l, p) => {
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
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
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
