//! Helpers for the tests of servers built on this layer (this crate's and the
//! guest-agent proxy's): an event loop around one server, client sockets, and
//! the owner-only socket checks. Built for this crate's tests and with the
//! `testing` feature; they panic when a check fails.

use std::cell::RefCell;
use std::fmt::Debug;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use event_manager::{EventManager, EventOps, MutEventSubscriber, SubscriberId, SubscriberOps};

/// An event loop serving one server.
pub struct EventLoop<S> {
    em: EventManager<Rc<RefCell<S>>>,
    /// The server, shared with the loop.
    pub server: Rc<RefCell<S>>,
    id: SubscriberId,
}

impl<S: MutEventSubscriber> EventLoop<S> {
    /// Registers `server` with a new event manager.
    pub fn new(server: S) -> Self {
        let server = Rc::new(RefCell::new(server));
        let mut em = EventManager::new().expect("an event manager");
        let id = em.add_subscriber(server.clone());
        Self { em, server, id }
    }

    /// Waits up to `ms` for events and handles them; returns how many there were.
    pub fn run(&mut self, ms: i32) -> usize {
        self.em.run_with_timeout(ms).expect("the event loop runs")
    }

    /// Runs `f` on the server with its event operations, as the VMM does after
    /// each round (e.g. to flush).
    pub fn with_ops<R>(&mut self, f: impl FnOnce(&mut S, &mut EventOps) -> R) -> R {
        let mut ops = self
            .em
            .event_ops(self.id)
            .expect("the server is registered");
        f(&mut self.server.borrow_mut(), &mut ops)
    }
}

/// Runs `round` until it reports no activity `quiet` times in a row.
pub fn until_quiet(quiet: usize, mut round: impl FnMut() -> usize) {
    let mut idle = 0;
    while idle < quiet {
        idle = if round() == 0 { idle + 1 } else { 0 };
    }
}

/// A socket path in the temporary directory, unique to this process and `tag`.
pub fn socket_path(prefix: &str, tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{prefix}-{}-{tag}.sock", std::process::id()))
}

/// A client of a Unix socket server. Reads time out after 5 s, so a missing
/// reply fails the test instead of hanging it.
pub struct TestClient {
    /// The reading side, buffered.
    pub r: BufReader<UnixStream>,
    /// The writing side (the same socket).
    pub w: UnixStream,
}

impl TestClient {
    /// Connects to the server at `path`.
    pub fn connect(path: &Path) -> Self {
        let s = UnixStream::connect(path).expect("the server listens");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("a read timeout");
        Self {
            r: BufReader::new(s.try_clone().expect("a second handle")),
            w: s,
        }
    }

    /// Sends `bytes`.
    pub fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.w.write_all(bytes.as_ref()).expect("the server reads");
    }

    /// Reads one line, with its "\n" (which must be there).
    pub fn read_line(&mut self) -> Vec<u8> {
        let mut l = Vec::new();
        self.r.read_until(b'\n', &mut l).expect("a line");
        assert!(l.ends_with(b"\n"), "line ends in LF: {l:?}");
        l
    }

    /// Whether nothing is waiting to be read.
    pub fn nothing_pending(&mut self) -> bool {
        self.w.set_nonblocking(true).expect("non-blocking");
        let mut b = [0u8; 1];
        let r = matches!(self.r.get_mut().read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            && self.r.buffer().is_empty();
        self.w.set_nonblocking(false).expect("blocking");
        r
    }

    /// Sends `total` bytes of `fill` without blocking, running `pump` whenever
    /// the socket is full; stops early when the server closes the connection.
    pub fn flood(&mut self, fill: u8, total: usize, mut pump: impl FnMut()) {
        let chunk = vec![fill; 64 * 1024];
        self.w.set_nonblocking(true).expect("non-blocking");
        let mut sent = 0;
        while sent < total {
            match self.w.write(&chunk) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => pump(),
                Err(_) => break,
            }
        }
    }
}

/// Checks the life of a server's owner-only socket at `path`, which `server`
/// holds: its mode is 0600; `bind` there fails with an error `in_use` accepts;
/// dropping the server removes the file; a stale socket file is replaced by
/// `bind`.
pub fn check_owner_only_socket<B, E: Debug>(
    path: &Path,
    server: impl Sized,
    bind: impl Fn() -> Result<B, E>,
    in_use: impl Fn(&E) -> bool,
) {
    let mode = std::fs::metadata(path)
        .expect("the socket exists")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    match bind() {
        Err(e) => assert!(in_use(&e), "in use: {e:?}"),
        Ok(_) => panic!("a live socket is taken over"),
    }
    drop(server);
    assert!(!path.exists(), "socket removed on drop");
    drop(UnixListener::bind(path).expect("a stale socket"));
    assert!(path.exists());
    drop(bind().expect("a stale socket is replaced"));
}
