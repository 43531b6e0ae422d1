//! One virtiofsd per share: started with a listening socket minivmm made (no
//! socket file, no waiting for one to appear), stopped with the VM.
//!
//! minivmm binds a Unix socket on an abstract address (nothing on the file
//! system to leave behind), hands it to the daemon as `--fd=3`, and connects
//! to it at once: the connection waits in the listen backlog until the daemon
//! accepts it, so there is no race and no polling. The daemon:
//! * runs in its own process group (a Ctrl-C on minivmm's terminal is for
//!   minivmm, which then stops it) and gets SIGTERM if minivmm's thread that
//!   started it dies (`PR_SET_PDEATHSIG`), so a crashed minivmm leaves no
//!   daemon behind;
//! * for a `:ro` share, sees the directory through a read-only bind mount in a
//!   mount namespace of its own (the host enforces it: EROFS for the guest);
//! * logs to a pipe minivmm reads: lines go to minivmm's debug log, the last
//!   ones into errors, and an unexpected exit is logged once (the guest then
//!   sees I/O errors on that share; the VM keeps running).
//!
//! Dropping a [`Virtiofsd`] kills and reaps it.

use std::collections::VecDeque;
use std::ffi::CString;
use std::io::{self, BufRead, BufReader};
use std::os::fd::{AsRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::ShareSpec;

/// The descriptor number of the listening socket in the daemon.
const LISTEN_FD: RawFd = 3;
/// Lines of the daemon's output kept for error messages.
const TAIL_LINES: usize = 20;
/// How long a vhost-user reply may take before the daemon counts as stuck.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Which virtiofsd: their command lines differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// The C virtiofsd of QEMU ≤ 7.2 (`-o source=DIR`).
    Qemu,
    /// The Rust virtiofsd (`--shared-dir DIR`).
    Rust,
}

impl Flavor {
    /// Tells them apart by their `--help` (the Rust one has `--shared-dir`).
    pub fn detect(bin: &Path) -> io::Result<Flavor> {
        let out = Command::new(bin)
            .arg("--help")
            .stdin(Stdio::null())
            .output()?;
        let text = [out.stdout, out.stderr].concat();
        let has = |s: &[u8]| text.windows(s.len()).any(|w| w == s);
        Ok(if has(b"--shared-dir") {
            Flavor::Rust
        } else {
            Flavor::Qemu
        })
    }

    /// The daemon's arguments for serving `dir` on descriptor [`LISTEN_FD`].
    ///
    /// Its default sandbox (a mount namespace entered with
    /// `pivot_root(dir)`) cannot take the root itself (`pivot_root` fails
    /// with EBUSY), so the host's `/` (`--host-root`) is served with the
    /// chroot sandbox, which for `/` confines nothing beyond the share.
    pub fn args(self, dir: &Path) -> Vec<std::ffi::OsString> {
        let mut v: Vec<std::ffi::OsString> = vec![format!("--fd={LISTEN_FD}").into()];
        let whole_root = dir == Path::new("/");
        match self {
            Flavor::Qemu => {
                let mut source = std::ffi::OsString::from("source=");
                source.push(dir);
                v.extend(["-o".into(), source]);
                v.extend(["-o".into(), "cache=auto".into()]);
                v.extend(["-o".into(), "log_level=warn".into()]);
                if whole_root {
                    v.extend(["-o".into(), "sandbox=chroot".into()]);
                }
            }
            Flavor::Rust => {
                v.extend(["--shared-dir".into(), dir.as_os_str().to_owned()]);
                v.extend(["--cache".into(), "auto".into()]);
                v.extend(["--log-level".into(), "warn".into()]);
                if whole_root {
                    v.extend(["--sandbox".into(), "chroot".into()]);
                }
            }
        }
        v
    }
}

/// A daemon could not be started.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The socket could not be made.
    #[error("{tag}: cannot make the vhost-user socket")]
    Socket {
        /// The share's tag.
        tag: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The eventfd that tells of the daemon's end could not be made.
    #[error("{tag}: cannot make an eventfd to watch virtiofsd")]
    EventFd {
        /// The share's tag.
        tag: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The daemon ended (or closed its socket) before it was connected.
    #[error("{tag}: virtiofsd failed: {detail}")]
    Exited {
        /// The share's tag.
        tag: String,
        /// How it ended and its last output.
        detail: String,
    },
    /// The process could not be started.
    #[error("{tag}: cannot start {bin}{hint}")]
    Spawn {
        /// The share's tag.
        tag: String,
        /// The daemon.
        bin: PathBuf,
        /// What to do about it.
        hint: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A running virtiofsd for one share.
pub struct Virtiofsd {
    child: Child,
    tag: String,
    /// minivmm's end of the vhost-user connection, until the device takes it.
    stream: Option<UnixStream>,
    tail: Arc<Mutex<VecDeque<String>>>,
    stopping: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
    /// Signalled when the daemon ended unasked.
    exited: EventFd,
}

impl std::fmt::Debug for Virtiofsd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Virtiofsd")
            .field("pid", &self.child.id())
            .field("tag", &self.tag)
            .finish()
    }
}

impl Virtiofsd {
    /// Starts `bin` (of `flavor`) for `share` under `tag`, connected.
    pub fn start(
        bin: &Path,
        flavor: Flavor,
        share: &ShareSpec,
        tag: &str,
    ) -> Result<Virtiofsd, DaemonError> {
        static SERIAL: AtomicU64 = AtomicU64::new(0);
        let socket_err = |source| DaemonError::Socket {
            tag: tag.to_string(),
            source,
        };
        let name = format!(
            "minivmm-{}-{tag}-{}",
            std::process::id(),
            SERIAL.fetch_add(1, Ordering::Relaxed)
        );
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).map_err(socket_err)?;
        let listener = UnixListener::bind_addr(&addr).map_err(socket_err)?;
        let read_only = if share.read_only {
            Some(
                CString::new(share.host.as_os_str().as_bytes())
                    .map_err(|e| socket_err(io::Error::new(io::ErrorKind::InvalidInput, e)))?,
            )
        } else {
            None
        };
        // Made before the fork: the child may not allocate.
        let submounts: Vec<CString> = if share.read_only {
            submounts(&share.host)
                .into_iter()
                .filter_map(|p| CString::new(p.into_os_string().into_vec()).ok())
                .collect()
        } else {
            Vec::new()
        };
        // Made before the spawn: a failure then leaves no daemon behind.
        let evt_err = |source| DaemonError::EventFd {
            tag: tag.to_string(),
            source,
        };
        let exited = EventFd::new(EFD_NONBLOCK).map_err(evt_err)?;
        let told = exited.try_clone().map_err(evt_err)?;
        let mut cmd = Command::new(bin);
        cmd.args(flavor.args(&share.host))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0);
        let lfd = listener.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec and only
        // makes async-signal-safe system calls on values prepared before the
        // fork (no allocation, no locks).
        unsafe {
            cmd.pre_exec(move || child_setup(lfd, read_only.as_deref(), &submounts));
        }
        let mut child = cmd.spawn().map_err(|source| DaemonError::Spawn {
            tag: tag.to_string(),
            bin: bin.to_path_buf(),
            hint: if share.read_only {
                " (a :ro share needs a read-only bind mount, so root or CAP_SYS_ADMIN)"
            } else {
                ""
            },
            source,
        })?;
        drop(listener);
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let stopping = Arc::new(AtomicBool::new(false));
        let reader = child.stderr.take().and_then(|err| {
            let (tail, stopping, t) = (tail.clone(), stopping.clone(), tag.to_string());
            std::thread::Builder::new()
                .name(format!("virtiofsd-{tag}"))
                .spawn(move || watch_output(err, &t, &tail, &stopping, &told))
                .map_err(|e| log::warn!("{tag}: virtiofsd's output is not read: {e}"))
                .ok()
        });
        let mut daemon = Virtiofsd {
            child,
            tag: tag.to_string(),
            stream: None,
            tail,
            stopping,
            reader,
            exited,
        };
        let connected = UnixStream::connect_addr(&addr)
            .and_then(|s| s.set_read_timeout(Some(REPLY_TIMEOUT)).map(|()| s));
        match connected {
            Ok(stream) => {
                daemon.stream = Some(stream);
                Ok(daemon)
            }
            Err(e) => Err(DaemonError::Exited {
                tag: tag.to_string(),
                detail: format!("cannot connect ({e}); {}", daemon.exit_output()),
            }),
        }
    }

    /// The share's tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// An eventfd signalled when the daemon ends unasked (not when minivmm
    /// stops it).
    pub fn exit_evt(&self) -> io::Result<EventFd> {
        self.exited.try_clone()
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// minivmm's end of the vhost-user connection (once).
    pub fn take_stream(&mut self) -> Option<UnixStream> {
        self.stream.take()
    }

    /// The daemon's last lines of output, for an error message.
    pub fn last_output(&self) -> String {
        let tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        tail.iter().cloned().collect::<Vec<_>>().join(" | ")
    }

    /// Kills the daemon's process group: the daemon and what it forked (the
    /// C virtiofsd runs its sandboxed self as a child).
    fn kill(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return; // Reaped: its group id may be reused.
        }
        let pgid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on the process group the daemon leads (it was
        // started with `process_group(0)` and is not reaped yet).
        if unsafe { libc::kill(-pgid, libc::SIGKILL) } != 0 {
            let _ = self.child.kill();
        }
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// For a daemon that broke the connection (or does not answer): stops
    /// it and returns how it ended with its last output, for the error
    /// message. Its end is not logged as unexpected.
    pub fn exit_output(&mut self) -> String {
        self.stopping.store(true, Ordering::SeqCst);
        drop(self.stream.take());
        self.kill();
        let status = self.child.wait().ok();
        // The reader ends at the pipe's end, which the daemon's exit brings.
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let out = self.last_output();
        let out = if out.is_empty() {
            "none".to_string()
        } else {
            out
        };
        match status.and_then(|s| s.code()) {
            Some(c) => format!("it exited with status {c}; its output: {out}"),
            None => format!("its output: {out}"),
        }
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        drop(self.stream.take());
        // SIGKILL: nothing of the daemon's state outlives the VM, and a
        // daemon stuck in I/O must not hold up minivmm's exit.
        self.kill();
        let _ = self.child.wait();
    }
}

/// In the forked child: the listening socket at [`LISTEN_FD`], death with the
/// parent, and for a read-only share a read-only view of the directory.
fn child_setup(
    lfd: RawFd,
    read_only: Option<&std::ffi::CStr>,
    submounts: &[CString],
) -> io::Result<()> {
    let check = |r: libc::c_int| {
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    if lfd == LISTEN_FD {
        // SAFETY: clears FD_CLOEXEC on a descriptor this process owns.
        check(unsafe { libc::fcntl(lfd, libc::F_SETFD, 0) })?;
    } else {
        // SAFETY: dup2 of an open descriptor; the copy has no FD_CLOEXEC.
        check(unsafe { libc::dup2(lfd, LISTEN_FD) })?;
    }
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) })?;
    if let Some(dir) = read_only {
        // SAFETY: unshare with a flag; affects only this (child) process.
        check(unsafe { libc::unshare(libc::CLONE_NEWNS) })?;
        let none = std::ptr::null::<libc::c_char>();
        // SAFETY: mount(2) with a static root path and null pointers where
        // allowed: makes this namespace's mounts private.
        check(unsafe {
            libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
        })?;
        // SAFETY: bind-mounts `dir` (a valid C string) onto itself.
        check(unsafe {
            libc::mount(
                dir.as_ptr(),
                dir.as_ptr(),
                none,
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            )
        })?;
        // The bind mount and every mount below it (a bind remount changes
        // one mount only).
        remount_read_only(dir)?;
        for sub in submounts {
            remount_read_only(sub)?;
        }
    }
    Ok(())
}

/// Makes the mount at `path` read-only, keeping its other flags (nosuid,
/// noexec, ...). Async-signal-safe.
fn remount_read_only(path: &std::ffi::CStr) -> io::Result<()> {
    // SAFETY: statvfs is plain data; zeroed is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `st` a valid place for the result.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // The ST_* bits of f_flag are the MS_* bits of the same name.
    let kept = st.f_flag
        & (libc::MS_NOSUID
            | libc::MS_NODEV
            | libc::MS_NOEXEC
            | libc::MS_NOATIME
            | libc::MS_NODIRATIME
            | libc::MS_RELATIME);
    let none = std::ptr::null::<libc::c_char>();
    // SAFETY: remounts the mount at `path` (a valid C string); null pointers
    // where mount(2) allows them.
    let rc = unsafe {
        libc::mount(
            none,
            path.as_ptr(),
            none,
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | kept,
            std::ptr::null(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The mount points strictly below `dir` (from /proc/self/mountinfo, parents
/// first), which a recursive bind mount of `dir` takes along.
pub(crate) fn submounts(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<PathBuf> = Vec::new();
    for line in text.lines() {
        let Some(field) = line.split(' ').nth(4) else {
            continue;
        };
        let p = PathBuf::from(std::ffi::OsString::from_vec(unescape_mountinfo(field)));
        if p != dir && p.starts_with(dir) && !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match oct {
            Some(d) => {
                out.push(d.iter().fold(0u8, |n, c| n.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

/// Reads the daemon's output until it ends; logs an end nobody asked for and
/// signals `exited`.
fn watch_output(
    err: std::process::ChildStderr,
    tag: &str,
    tail: &Mutex<VecDeque<String>>,
    stopping: &AtomicBool,
    exited: &EventFd,
) {
    for line in BufReader::new(err).lines() {
        let Ok(line) = line else { break };
        log::debug!("{tag}: virtiofsd: {line}");
        let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
        if t.len() == TAIL_LINES {
            t.pop_front();
        }
        t.push_back(line);
    }
    if !stopping.load(Ordering::SeqCst) {
        let t = tail.lock().unwrap_or_else(|e| e.into_inner());
        let last = t.iter().cloned().collect::<Vec<_>>().join(" | ");
        log::warn!(
            "{tag}: virtiofsd ended; the guest gets I/O errors on this share (its last output: {})",
            if last.is_empty() { "none" } else { &last }
        );
        if let Err(e) = exited.write(1) {
            log::error!("{tag}: cannot tell the VMM virtiofsd ended: {e}");
        }
    }
}

#[cfg(test)]
mod tests;
