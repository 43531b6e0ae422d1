//! Small safe wrappers over the system calls std does not offer.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, RawFd};
use std::time::Duration;

/// `Ok(ret)` if a libc call returned a non-negative value, else `errno`.
pub fn cvt<T: Copy + PartialOrd + From<i8>>(ret: T) -> io::Result<T> {
    if ret < T::from(0) {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Takes ownership of a descriptor a system call just returned (or its error).
pub fn own(fd: libc::c_int) -> io::Result<File> {
    let fd: RawFd = cvt(fd)?;
    // SAFETY: `fd` is a new, open descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// A pipe `(read end, write end)`, both close-on-exec.
pub fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    Ok((own(fds[0])?, own(fds[1])?))
}

/// Makes reads and writes on `fd` return `WouldBlock` instead of waiting.
pub fn set_nonblocking(fd: impl AsFd) -> io::Result<()> {
    let fd = fd.as_fd().as_raw_fd();
    // SAFETY: F_GETFL on a descriptor we borrow; no pointers.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: F_SETFL on a descriptor we borrow; no pointers.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(())
}

/// The capacity of the pipe `fd`.
pub fn pipe_size(fd: impl AsFd) -> io::Result<usize> {
    // SAFETY: F_GETPIPE_SZ on a descriptor we borrow; no pointers.
    let n = cvt(unsafe { libc::fcntl(fd.as_fd().as_raw_fd(), libc::F_GETPIPE_SZ) })?;
    Ok(n as usize)
}

/// A `pollfd` waiting for `events` on `fd`.
pub fn pollfd(fd: impl AsFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd: fd.as_fd().as_raw_fd(),
        events,
        revents: 0,
    }
}

/// Waits until one of `fds` is ready, or `timeout` (`None`: no limit) passes.
/// Returns how many are ready; 0 after a timeout or a signal.
pub fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let ms = match timeout {
        None => -1,
        // Round up: a timeout of 0.3 ms must not become a busy 0.
        Some(t) => t.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int,
    };
    // SAFETY: `fds` is a valid array of `fds.len()` pollfds.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    match cvt(n) {
        Ok(n) => Ok(n as usize),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => {
            fds.iter_mut().for_each(|f| f.revents = 0);
            Ok(0)
        }
        Err(e) => Err(e),
    }
}

/// Whether `e` only means "nothing now, try later".
pub fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// `e` with what was being done in front of its message.
pub fn context(e: io::Error, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}
