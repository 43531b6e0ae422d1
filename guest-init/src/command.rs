//! Starting the command: looked up in `PATH` like `execvp` does, stdin,
//! stdout and stderr on pipes, its own session, in its [`Place`] (by default
//! `/` of the initramfs).
//!
//! Whether `execve` worked is known for sure: the child writes why it failed
//! to a close-on-exec pipe, which a successful `execve` closes empty. So a
//! command that is not there ([`Exit::NotFound`]) is told apart from one that
//! cannot run ([`Exit::NotExecutable`]) and from one that ran and exited 127.

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};

use run_protocol::Exit;

use crate::sys;

/// The command's `PATH`, also where it is looked up.
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The command's whole environment (with `PATH=`).
const ENV: [&str; 2] = ["HOME=/root", "TERM=linux"];

/// Where the command runs: its root directory (chroot'ed into, when not the
/// init's own) and its working directory inside it.
#[derive(Debug, Clone, Copy)]
pub struct Place<'a> {
    /// None: the initramfs.
    pub root: Option<&'a [u8]>,
    /// An absolute path inside the root.
    pub cwd: &'a [u8],
}

impl Default for Place<'_> {
    fn default() -> Self {
        Place {
            root: None,
            cwd: b"/",
        }
    }
}

/// A started command: its pid and the init's ends of its pipes
/// (non-blocking).
pub struct Child {
    pub pid: libc::pid_t,
    pub stdin: File,
    pub stdout: File,
    pub stderr: File,
}

/// Where `execve` is tried for `name`, in order: `name` itself if it has a
/// `/`, else each directory of `path` (an empty one is the current one).
pub fn candidates(name: &[u8], path: &str) -> Vec<Vec<u8>> {
    if name.is_empty() {
        return Vec::new();
    }
    if name.contains(&b'/') {
        return vec![name.to_vec()];
    }
    path.split(':')
        .map(|dir| {
            let mut p = if dir.is_empty() {
                b".".to_vec()
            } else {
                dir.as_bytes().to_vec()
            };
            p.push(b'/');
            p.extend_from_slice(name);
            p
        })
        .collect()
}

/// Why the child did not run the command: its `execve` error, the candidate
/// it is about, and whether that file exists (ENOENT for an existing file
/// means its interpreter is missing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Failure {
    errno: i32,
    index: u32,
    exists: bool,
}

/// `index` of a failure before any `execve` (setting up the child).
const SETUP: u32 = u32::MAX;

impl Failure {
    const LEN: usize = 9;

    fn encode(self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..4].copy_from_slice(&self.errno.to_le_bytes());
        b[4..8].copy_from_slice(&self.index.to_le_bytes());
        b[8] = self.exists as u8;
        b
    }

    fn decode(b: &[u8]) -> Option<Failure> {
        let b: &[u8; Self::LEN] = b.try_into().ok()?;
        Some(Failure {
            errno: i32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            index: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            exists: b[8] != 0,
        })
    }
}

/// What the user is told about a failed start of `name` whose tries were
/// `candidates`.
fn classify(name: &str, candidates: &[Vec<u8>], f: Failure) -> Exit {
    let errno = f.errno;
    let err = std::io::Error::from_raw_os_error(errno);
    let Some(path) = candidates.get(f.index as usize) else {
        return Exit::InitFailed(format!("start {name}: {err}"));
    };
    let path = String::from_utf8_lossy(path);
    match errno {
        libc::ENOENT | libc::ENOTDIR if !f.exists => Exit::NotFound(format!("{name}: not found")),
        libc::ENOENT => Exit::NotExecutable(format!(
            "{path}: cannot be run: its interpreter (the #! line, or the \
             program interpreter of the ELF file) is not there"
        )),
        libc::EACCES => Exit::NotExecutable(format!("{path}: permission denied")),
        libc::ENOEXEC => Exit::NotExecutable(format!(
            "{path}: exec format error (not a program for this machine, nor a \
             script starting with #!)"
        )),
        _ => Exit::NotExecutable(format!("{path}: {err}")),
    }
}

/// Starts `argv` (looked up in `path`, which is also its `PATH`). The error
/// is how the run ends: not found, not executable, or the init failed.
pub fn spawn(argv: &[Vec<u8>], path: &str, place: Place) -> Result<Child, Exit> {
    let Some(name) = argv.first() else {
        return Err(Exit::InitFailed("no command".into()));
    };
    let display = String::from_utf8_lossy(name).into_owned();
    let failed =
        |what: &str, e: std::io::Error| Exit::InitFailed(format!("start {display}: {what}: {e}"));
    let cstring = |b: &[u8]| {
        CString::new(b)
            .map_err(|_| Exit::InitFailed(format!("{display}: a NUL byte in an argument")))
    };
    let tries = candidates(name, path);
    if tries.is_empty() {
        return Err(Exit::NotFound(format!("{display}: not found")));
    }

    // Everything the child needs is made now: after fork it may only make
    // async-signal-safe calls (no allocation: another thread may hold the
    // allocator's lock).
    let c_tries = tries
        .iter()
        .map(|t| cstring(t))
        .collect::<Result<Vec<_>, _>>()?;
    let c_argv = argv
        .iter()
        .map(|a| cstring(a))
        .collect::<Result<Vec<_>, _>>()?;
    let c_env = std::iter::once(format!("PATH={path}"))
        .chain(ENV.iter().map(|e| e.to_string()))
        .map(|e| cstring(e.as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    let c_root = place.root.map(cstring).transpose()?;
    let c_cwd = cstring(place.cwd)?;
    let try_ptrs: Vec<*const libc::c_char> = c_tries.iter().map(|c| c.as_ptr()).collect();
    let argv_ptrs = null_terminated(&c_argv);
    let env_ptrs = null_terminated(&c_env);
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut no_signals: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `no_signals` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut no_signals) };

    let (stdin_r, stdin_w) = sys::pipe().map_err(|e| failed("pipe", e))?;
    let (stdout_r, stdout_w) = sys::pipe().map_err(|e| failed("pipe", e))?;
    let (stderr_r, stderr_w) = sys::pipe().map_err(|e| failed("pipe", e))?;
    let (report_r, report_w) = sys::pipe().map_err(|e| failed("pipe", e))?;
    let child = ChildSetup {
        stdio: [
            stdin_r.as_raw_fd(),
            stdout_w.as_raw_fd(),
            stderr_w.as_raw_fd(),
        ],
        report: report_w.as_raw_fd(),
        tries: &try_ptrs,
        argv: argv_ptrs.as_ptr(),
        env: env_ptrs.as_ptr(),
        signals: &no_signals,
        root: c_root.as_deref(),
        cwd: &c_cwd,
    };

    // SAFETY: the child only runs `ChildSetup::exec`, which makes
    // async-signal-safe calls and ends in execve or _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        child.exec();
    }
    if pid < 0 {
        return Err(failed("fork", std::io::Error::last_os_error()));
    }
    // The child's ends: ours must close for the report pipe to end.
    drop((stdin_r, stdout_w, stderr_w, report_w));

    let mut report = Vec::new();
    let read = (&report_r).read_to_end(&mut report);
    if read.is_ok() && report.is_empty() {
        let set_up = [&stdin_w, &stdout_r, &stderr_r]
            .iter()
            .try_for_each(sys::set_nonblocking);
        // The command runs whatever happens now; a failure here is ours.
        set_up.map_err(|e| failed("set up its pipes", e))?;
        return Ok(Child {
            pid,
            stdin: stdin_w,
            stdout: stdout_r,
            stderr: stderr_r,
        });
    }
    // It did not run; reap it (it exits at once).
    let mut status = 0;
    // SAFETY: `status` is a valid place for the status.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0
        && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
    {}
    match (read, Failure::decode(&report)) {
        (Ok(_), Some(f)) if f.index == SETUP => Err(failed(
            "set up the child",
            std::io::Error::from_raw_os_error(f.errno),
        )),
        (Ok(_), Some(f)) => Err(classify(&display, &tries, f)),
        (Err(e), _) => Err(failed("read its start report", e)),
        (Ok(_), None) => Err(Exit::InitFailed(format!(
            "start {display}: a bad start report ({} bytes)",
            report.len()
        ))),
    }
}

fn null_terminated(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// What the child does between fork and execve, made beforehand.
struct ChildSetup<'a> {
    /// Become its stdin, stdout and stderr.
    stdio: [RawFd; 3],
    report: RawFd,
    tries: &'a [*const libc::c_char],
    argv: *const *const libc::c_char,
    env: *const *const libc::c_char,
    signals: &'a libc::sigset_t,
    root: Option<&'a std::ffi::CStr>,
    cwd: &'a std::ffi::CStr,
}

impl ChildSetup<'_> {
    /// In the child after fork: only async-signal-safe calls, no allocation,
    /// no drop; never returns.
    fn exec(&self) -> ! {
        if let Err(errno) = self.setup() {
            self.fail(Failure {
                errno,
                index: SETUP,
                exists: false,
            });
        }
        // Like execvp: go on past "not there" and "not allowed"; report the
        // first "not allowed" (or missing interpreter) if nothing ran, else
        // the last error.
        let mut first_blocker = None;
        let mut last = Failure {
            errno: libc::ENOENT,
            index: 0,
            exists: false,
        };
        for (i, &path) in self.tries.iter().enumerate() {
            // SAFETY: `path`, `argv` and `env` are NUL-terminated strings and
            // null-terminated arrays that the parent keeps alive.
            unsafe { libc::execve(path, self.argv, self.env) };
            let errno = errno();
            // SAFETY: `path` is a NUL-terminated string.
            let exists = errno == libc::ENOENT && unsafe { libc::access(path, libc::F_OK) } == 0;
            last = Failure {
                errno,
                index: i as u32,
                exists,
            };
            match errno {
                libc::EACCES => {
                    first_blocker.get_or_insert(last);
                }
                libc::ENOENT if exists => {
                    first_blocker.get_or_insert(last);
                }
                libc::ENOENT | libc::ENOTDIR => {}
                _ => self.fail(last),
            }
        }
        self.fail(first_blocker.unwrap_or(last))
    }

    /// Plumbing and a clean slate: stdio, no blocked signals, SIGPIPE back to
    /// its default (Rust's runtime ignores it, and `execve` keeps that), a
    /// new session, its root and working directory.
    fn setup(&self) -> Result<(), i32> {
        for (target, &fd) in self.stdio.iter().enumerate() {
            let target = target as RawFd;
            // The pipes are close-on-exec; dup2 clears that on the copy, but
            // not when the pipe already is the target.
            let rc = if fd == target {
                // SAFETY: F_SETFD on a descriptor the child has; no pointers.
                unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }
            } else {
                // SAFETY: both descriptors are valid numbers; no pointers.
                unsafe { libc::dup2(fd, target) }
            };
            if rc < 0 {
                return Err(errno());
            }
        }
        // SAFETY: `signals` is a valid, initialised signal set.
        let rc =
            unsafe { libc::sigprocmask(libc::SIG_SETMASK, self.signals, std::ptr::null_mut()) };
        if rc < 0 {
            return Err(errno());
        }
        // SAFETY: sets a disposition; no pointers.
        if unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) } == libc::SIG_ERR {
            return Err(errno());
        }
        // SAFETY: no arguments.
        if unsafe { libc::setsid() } < 0 {
            return Err(errno());
        }
        if let Some(root) = self.root {
            // SAFETY: a NUL-terminated path.
            if unsafe { libc::chroot(root.as_ptr()) } < 0 {
                return Err(errno());
            }
        }
        // SAFETY: a NUL-terminated path.
        if unsafe { libc::chdir(self.cwd.as_ptr()) } < 0 {
            return Err(errno());
        }
        Ok(())
    }

    /// Reports `f` to the parent and exits.
    fn fail(&self, f: Failure) -> ! {
        let report = f.encode();
        // One write of less than PIPE_BUF bytes is atomic; if it fails the
        // parent sees an empty report of a child that exited 127 at once,
        // which cannot be helped.
        // SAFETY: `report` is valid for its length.
        unsafe { libc::write(self.report, report.as_ptr().cast(), report.len()) };
        // SAFETY: ends the child without running anything of the parent's.
        unsafe { libc::_exit(127) }
    }
}

fn errno() -> i32 {
    // Reads errno; no allocation.
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

#[cfg(test)]
mod tests;
