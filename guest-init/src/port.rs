//! The channel to the host: finding the virtio-console port by its name, and
//! writing frames to it.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use run_protocol::{frame, frames};

use crate::sys::{self, cvt};

/// Where the kernel lists the virtio-console ports, one directory each with
/// the port's `name` once the host sent it.
pub const SYS_PORTS: &str = "/sys/class/virtio-ports";

/// How long to wait for the port.
pub const PORT_TIMEOUT: Duration = Duration::from_secs(30);

/// How soon to look again while a port has no name yet: the name comes in a
/// control message after the node appears, and sysfs changes cannot be
/// watched. This bounded re-check runs only while such a port exists.
const NAME_RECHECK: Duration = Duration::from_millis(10);

/// The open channel.
pub struct Port {
    file: File,
}

impl Port {
    /// Opens the port at `path` (blocking: a write returns once the host took
    /// the bytes).
    pub fn open(path: &Path) -> io::Result<Port> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Port { file })
    }

    /// A channel over any descriptor (tests use a socket).
    pub fn from_fd(fd: OwnedFd) -> Port {
        Port {
            file: File::from(fd),
        }
    }

    /// Sends `payload` as frames of `kind` (one empty frame if it is empty),
    /// whole even if the port takes them in pieces.
    pub fn send(&self, kind: u8, payload: &[u8]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(run_protocol::HEADER + payload.len());
        if payload.is_empty() {
            frame(kind, payload, &mut buf);
        } else {
            frames(kind, payload, &mut buf);
        }
        self.write_frames(&buf)
    }

    /// Writes frames made with `run_protocol::frame(s)`, whole.
    pub fn write_frames(&self, wire: &[u8]) -> io::Result<()> {
        (&self.file)
            .write_all(wire)
            .map_err(|e| sys::context(e, "write to the host channel"))
    }

    /// Reads what the host sent (0: it is gone).
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }
}

impl AsFd for Port {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Watches a device directory for new nodes. Made before the modules are
/// loaded, so no node can appear unseen between a look and the wait.
pub struct DevWatch {
    inotify: File,
    dev: PathBuf,
}

impl DevWatch {
    /// Starts watching `dev` (`/dev`) for new entries.
    pub fn new(dev: &Path) -> io::Result<DevWatch> {
        // SAFETY: no pointers; the result is checked by `own`.
        let inotify =
            sys::own(unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) })?;
        let c_dev = CString::new(dev.as_os_str().as_bytes())?;
        // SAFETY: a descriptor we own and a NUL-terminated path.
        cvt(unsafe {
            libc::inotify_add_watch(inotify.as_raw_fd(), c_dev.as_ptr(), libc::IN_CREATE)
        })?;
        Ok(DevWatch {
            inotify,
            dev: dev.to_path_buf(),
        })
    }

    /// Waits (on inotify, not by sleeping) until a character device
    /// `vportNpM` in the watched directory has `name` in
    /// `ports/vportNpM/name`, at most `timeout`; returns its path.
    pub fn wait_for_port(
        &self,
        ports: &Path,
        name: &str,
        timeout: Duration,
    ) -> Result<PathBuf, String> {
        if !ports.is_dir() {
            return Err(format!(
                "the kernel has no virtio console driver ({} is missing): \
                 build virtio_console in or add it as a module",
                ports.display()
            ));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let scan = scan(&self.dev, ports, name)
                .map_err(|e| format!("list {}: {e}", self.dev.display()))?;
            if let Some(found) = scan.found {
                return Ok(found);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "no virtio console port named {name} after {} s (ports: {})",
                    timeout.as_secs_f32(),
                    if scan.seen.is_empty() {
                        "none".to_string()
                    } else {
                        scan.seen.join(", ")
                    }
                ));
            }
            let mut wait = deadline - now;
            if scan.unnamed {
                wait = wait.min(NAME_RECHECK);
            }
            let mut fds = [sys::pollfd(&self.inotify, libc::POLLIN)];
            sys::poll(&mut fds, Some(wait)).map_err(|e| format!("wait for {name}: {e}"))?;
            self.drain();
        }
    }

    /// Throws away the queued events: the directory is looked at again anyway.
    fn drain(&self) {
        let mut buf = [0u8; 4096];
        while matches!((&self.inotify).read(&mut buf), Ok(n) if n > 0) {}
    }
}

/// What a look at the ports found.
#[derive(Debug, Default)]
struct Scan {
    found: Option<PathBuf>,
    /// A port has no name yet.
    unnamed: bool,
    /// The ports, for an error message.
    seen: Vec<String>,
}

fn scan(dev: &Path, ports: &Path, name: &str) -> io::Result<Scan> {
    let mut scan = Scan::default();
    for entry in std::fs::read_dir(dev)? {
        let entry = entry?;
        let node = entry.file_name();
        let Some(node) = node.to_str().filter(|n| n.starts_with("vport")) else {
            continue;
        };
        let path = entry.path();
        if !path
            .metadata()
            .is_ok_and(|m| m.file_type().is_char_device())
        {
            continue;
        }
        // The file is there once the host named the port.
        let port_name = std::fs::read(ports.join(node).join("name")).unwrap_or_default();
        let port_name = String::from_utf8_lossy(&port_name);
        let port_name = port_name.trim_end_matches('\n');
        if port_name == name {
            scan.found = Some(path);
            return Ok(scan);
        }
        if port_name.is_empty() {
            scan.unnamed = true;
            scan.seen.push(format!("{node} (no name yet)"));
        } else {
            scan.seen.push(format!("{node} ({port_name})"));
        }
    }
    Ok(scan)
}

/// How long the init waits for the host to stop the VM after the end was
/// reported, before it powers off itself.
pub const END_WAIT: Duration = Duration::from_secs(30);

/// Waits until the host stops the VM (this never returns then), the channel
/// closes, or `bound` passes; what the host still sends is dropped.
pub fn wait_for_the_end(port: &Port, bound: Duration) {
    let deadline = std::time::Instant::now() + bound;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        let mut fds = [sys::pollfd(port, libc::POLLIN)];
        match sys::poll(&mut fds, Some(left)) {
            Ok(0) => return,
            Ok(_) => match port.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            },
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;
    use std::os::unix::fs::symlink;

    const NAME: &str = run_protocol::PORT_NAME;

    #[test]
    fn the_end_wait_drops_input_and_stops_at_eof_or_the_bound() {
        use std::os::unix::net::UnixStream;
        let (a, mut b) = UnixStream::pair().unwrap();
        let port = Port::from_fd(a.into());
        b.write_all(b"late stdin").unwrap();
        drop(b);
        let t = Instant::now();
        wait_for_the_end(&port, Duration::from_secs(30));
        assert!(t.elapsed() < Duration::from_secs(5), "EOF ends the wait");
        let (a, _b) = UnixStream::pair().unwrap();
        let port = Port::from_fd(a.into());
        let t = Instant::now();
        wait_for_the_end(&port, Duration::from_millis(100));
        assert!(t.elapsed() >= Duration::from_millis(100));
        assert!(t.elapsed() < Duration::from_secs(5), "the bound ends it");
    }

    /// A fake `/dev` and `/sys/class/virtio-ports`; a port's node is a link to
    /// `/dev/null`, a character device.
    struct Fake {
        dev: TempDir,
        ports: TempDir,
    }

    impl Fake {
        fn new() -> Fake {
            Fake {
                dev: TempDir::new("dev"),
                ports: TempDir::new("ports"),
            }
        }

        fn add_node(dev: &Path, node: &str) {
            symlink("/dev/null", dev.join(node)).unwrap();
        }

        fn name(ports: &Path, node: &str, name: &str) {
            std::fs::create_dir_all(ports.join(node)).unwrap();
            std::fs::write(ports.join(node).join("name"), format!("{name}\n")).unwrap();
        }
    }

    #[test]
    fn a_port_already_there_is_found() {
        let f = Fake::new();
        let watch = DevWatch::new(f.dev.path()).unwrap();
        Fake::add_node(f.dev.path(), "vport0p0");
        Fake::add_node(f.dev.path(), "vport0p1");
        Fake::name(f.ports.path(), "vport0p1", NAME);
        let found = watch
            .wait_for_port(f.ports.path(), NAME, Duration::from_secs(5))
            .unwrap();
        assert_eq!(found, f.dev.path().join("vport0p1"));
    }

    #[test]
    fn a_port_that_appears_and_is_named_later_is_found() {
        let f = Fake::new();
        let watch = DevWatch::new(f.dev.path()).unwrap();
        let (dev, ports) = (f.dev.path().to_owned(), f.ports.path().to_owned());
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            Fake::add_node(&dev, "vport1p1");
            std::thread::sleep(Duration::from_millis(100));
            Fake::name(&ports, "vport1p1", NAME);
        });
        let start = Instant::now();
        let found = watch
            .wait_for_port(f.ports.path(), NAME, Duration::from_secs(10))
            .unwrap();
        t.join().unwrap();
        assert_eq!(found, f.dev.path().join("vport1p1"));
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn other_ports_and_files_are_not_taken() {
        let f = Fake::new();
        let watch = DevWatch::new(f.dev.path()).unwrap();
        Fake::add_node(f.dev.path(), "vport0p0");
        Fake::add_node(f.dev.path(), "vport0p2");
        Fake::name(f.ports.path(), "vport0p2", "org.qemu.guest_agent.0");
        // A regular file is not a port, even with the name.
        std::fs::write(f.dev.path().join("vport0p3"), "").unwrap();
        Fake::name(f.ports.path(), "vport0p3", NAME);
        let start = Instant::now();
        let err = watch
            .wait_for_port(f.ports.path(), NAME, Duration::from_millis(200))
            .unwrap_err();
        assert!(start.elapsed() >= Duration::from_millis(200));
        assert!(err.contains(NAME), "{err}");
        assert!(err.contains("vport0p0 (no name yet)"), "{err}");
        assert!(err.contains("vport0p2 (org.qemu.guest_agent.0)"), "{err}");
        assert!(!err.contains("vport0p3"), "{err}");
    }

    #[test]
    fn no_driver_fails_at_once() {
        let f = Fake::new();
        let watch = DevWatch::new(f.dev.path()).unwrap();
        let err = watch
            .wait_for_port(&f.ports.path().join("nope"), NAME, PORT_TIMEOUT)
            .unwrap_err();
        assert!(err.contains("no virtio console driver"), "{err}");
    }

    #[test]
    fn frames_are_sent_whole() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let port = Port::from_fd(a.into());
        let big = vec![9u8; run_protocol::MAX_PAYLOAD + 1];
        let reader = std::thread::spawn(move || {
            let mut wire = Vec::new();
            (&b).read_to_end(&mut wire).unwrap();
            wire
        });
        port.send(run_protocol::READY, &[]).unwrap();
        port.send(run_protocol::STDOUT, &big).unwrap();
        drop(port);
        let mut d = run_protocol::Deframer::default();
        d.feed(&reader.join().unwrap());
        assert_eq!(d.next_frame().unwrap(), Some((run_protocol::READY, vec![])));
        assert_eq!(
            d.next_frame().unwrap().unwrap().1.len(),
            run_protocol::MAX_PAYLOAD
        );
        assert_eq!(
            d.next_frame().unwrap(),
            Some((run_protocol::STDOUT, vec![9]))
        );
        assert_eq!(d.pending(), 0);
    }
}
