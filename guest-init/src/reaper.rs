//! Children that end: SIGCHLD through a signalfd, then `waitpid` for every
//! child. PID 1 inherits every orphan and must reap them all; only the
//! command's end matters.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd};

use run_protocol::Exit;

use crate::sys;

/// The SIGCHLD signalfd.
pub struct Reaper {
    signals: File,
}

impl Reaper {
    /// Blocks SIGCHLD in the calling thread (and so in the threads it starts
    /// later; a child unblocks it before `execve`) and opens a signalfd for
    /// it. Call it before any other thread starts.
    pub fn new() -> io::Result<Reaper> {
        // SAFETY: sigset_t is plain data; sigemptyset initialises it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t.
        unsafe { libc::sigemptyset(&mut set) };
        // SAFETY: `set` is initialised and SIGCHLD a valid signal.
        unsafe { libc::sigaddset(&mut set, libc::SIGCHLD) };
        // SAFETY: `set` is a valid, initialised signal set.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        // SAFETY: `set` is valid; -1 asks for a new descriptor.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        Ok(Reaper {
            signals: sys::own(fd)?,
        })
    }

    /// Takes the pending SIGCHLDs, reaps every child that ended and returns
    /// how `pid` ended if it was one of them.
    pub fn reap(&self, pid: libc::pid_t) -> Option<Exit> {
        // Several SIGCHLDs may have merged into one: the notifications only
        // say "look", waitpid says who.
        let mut buf = [0u8; 16 * std::mem::size_of::<libc::signalfd_siginfo>()];
        while matches!((&self.signals).read(&mut buf), Ok(n) if n > 0) {}
        let mut found = None;
        loop {
            let mut status = 0;
            // SAFETY: `status` is a valid place for the status.
            let got = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            match sys::cvt(got) {
                Ok(0) => break,
                Ok(child) if child == pid => found = Some(exit_of(status)),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // ECHILD: none left.
                Err(_) => break,
            }
        }
        found
    }
}

impl AsFd for Reaper {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.signals.as_fd()
    }
}

/// What a `waitpid` status says about how a process ended.
pub fn exit_of(status: libc::c_int) -> Exit {
    if libc::WIFEXITED(status) {
        Exit::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Exit::Signaled(libc::WTERMSIG(status))
    } else {
        Exit::InitFailed(format!("an unexpected wait status {status:#x}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_statuses_are_read() {
        assert_eq!(exit_of(7 << 8), Exit::Exited(7));
        assert_eq!(exit_of(0), Exit::Exited(0));
        assert_eq!(exit_of(9), Exit::Signaled(9));
        assert_eq!(exit_of(11 | 0x80), Exit::Signaled(11));
    }
}
