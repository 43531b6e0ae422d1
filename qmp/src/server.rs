//! The QMP server: listening endpoints, many clients per endpoint, each negotiating
//! capabilities on its own and receiving every event once negotiated.
//!
//! The server only frames input and keeps per-client state. Commands are executed
//! in arrival order by [`QmpServer::dispatch`], which the VMM thread calls after
//! each event-loop round with its [`Handler`]; events a command causes are sent to
//! every client before that command's reply, as QEMU does. Buffers are bounded: a
//! client that sends an oversized message or stops reading its replies is
//! disconnected (with a log line), never allowed to block the VM or grow memory.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde_json::{json, Value};

pub use crate::protocol::QmpError;
use crate::protocol::{self, ArgSpec, ArgType, CommandSpec, Request};
use crate::stream::{Framed, JsonStreamer, DEFAULT_MAX_MESSAGE};

/// Output a client may leave unread before it is disconnected.
pub const MAX_PENDING_OUTPUT: usize = 8 << 20;
const READ_CHUNK: usize = 64 * 1024;

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP `host:port`.
    Tcp(String),
}

impl FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a socket path, e.g. unix:/tmp/vm.qmp".into());
            }
            return Ok(Endpoint::Unix(p.into()));
        }
        if let Some(hp) = s.strip_prefix("tcp:") {
            let ok = hp
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok {
                return Err(format!(
                    "'{s}': expected tcp:HOST:PORT, e.g. tcp:127.0.0.1:4444"
                ));
            }
            return Ok(Endpoint::Tcp(hp.to_string()));
        }
        Err(format!("'{s}': expected unix:PATH or tcp:HOST:PORT"))
    }
}

impl Endpoint {
    /// QEMU-style chardev filename.
    pub fn filename(&self) -> String {
        match self {
            Endpoint::Unix(p) => format!("unix:{},server=on", p.display()),
            Endpoint::Tcp(hp) => format!("tcp:{hp},server=on"),
        }
    }
}

/// Errors starting a server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another process serves this socket.
    #[error("QMP socket {0} is in use by another process")]
    InUse(PathBuf),
    /// Binding failed.
    #[error("cannot listen on QMP endpoint {endpoint}: {source}")]
    Bind {
        /// The endpoint.
        endpoint: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    fn fd(&self) -> RawFd {
        match self {
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }

    fn accept(&self) -> io::Result<(Stream, String)> {
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

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_nonblocking(on),
            Stream::Tcp(s) => s.set_nonblocking(on),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }
}

struct Client {
    stream: Stream,
    name: String,
    streamer: JsonStreamer,
    negotiated: bool,
    out: VecDeque<u8>,
    /// Interest currently registered (IN, or IN|OUT).
    watching_out: bool,
    /// Set when the client must go (EOF, error, misbehaviour).
    dead: bool,
    /// A deferred reply this client waits for: (token, id to echo).
    waiting: Option<(u64, Option<Value>)>,
}

impl Client {
    fn queue(&mut self, v: &Value) {
        if self.dead {
            return;
        }
        self.out.extend(protocol::to_wire(v));
        if self.out.len() > MAX_PENDING_OUTPUT {
            log::warn!(
                "QMP client {} is not reading its replies ({} bytes pending): disconnecting it",
                self.name,
                self.out.len()
            );
            self.dead = true;
        }
    }

    /// Writes what the socket takes now.
    fn write_out(&mut self) {
        while !self.out.is_empty() && !self.dead {
            let (a, _) = self.out.as_slices();
            match self.stream.write(a) {
                Ok(0) => self.dead = true,
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("QMP client {}: write: {e}", self.name);
                    self.dead = true;
                }
            }
        }
    }
}

/// The outcome of a command.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// The result, available now.
    Now(Result<Value, QmpError>),
    /// The result comes later through [`QmpServer::complete`] with this token;
    /// until then that client's further commands wait (replies stay in order).
    Later(u64),
}

/// Executes the commands the VMM implements.
pub trait Handler {
    /// Commands accepted besides `qmp_capabilities`, with their arguments.
    fn commands(&self) -> &[CommandSpec];
    /// Whether a command missing from [`Handler::commands`] is passed through
    /// unchecked (e.g. `guest-*` commands forwarded to a guest agent).
    fn passes_through(&self, _name: &str) -> bool {
        false
    }
    /// Runs a validated command. Events it causes go into `events` (built with
    /// [`protocol::event`]); they are sent to all clients before the reply.
    fn execute(&mut self, req: &Request, events: &mut Vec<Value>) -> Reply;
}

/// `qmp_capabilities` arguments.
const CAPABILITIES_ARGS: &[ArgSpec] = &[ArgSpec {
    name: "enable",
    ty: ArgType::StrList,
    required: false,
}];

/// Description of one listening endpoint, for `query-chardev`.
#[derive(Debug, Clone)]
pub struct ChardevInfo {
    /// QEMU-style label (`compat_monitor0`, ...).
    pub label: String,
    /// QEMU-style filename.
    pub filename: String,
}

/// The server.
pub struct QmpServer {
    listeners: Vec<Listener>,
    chardevs: Vec<ChardevInfo>,
    clients: BTreeMap<RawFd, Client>,
    inbox: VecDeque<(RawFd, Framed)>,
    greeting: Value,
    next_serial: u64,
}

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
/// Shared by the QMP server and the guest-agent proxy.
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

fn bind_unix(path: &Path) -> Result<UnixListener, ServerError> {
    bind_owner_only(path).map_err(|e| match e {
        UnixBindError::InUse => ServerError::InUse(path.into()),
        UnixBindError::Io(source) => ServerError::Bind {
            endpoint: format!("unix:{}", path.display()),
            source,
        },
    })
}

impl QmpServer {
    /// Binds every endpoint. `greeting` is sent to each new client.
    pub fn bind(endpoints: &[Endpoint], greeting: Value) -> Result<Self, ServerError> {
        let mut listeners = Vec::new();
        let mut chardevs = Vec::new();
        for (i, ep) in endpoints.iter().enumerate() {
            let l = match ep {
                Endpoint::Unix(p) => Listener::Unix(bind_unix(p)?, p.clone()),
                Endpoint::Tcp(hp) => {
                    Listener::Tcp(TcpListener::bind(hp).map_err(|source| ServerError::Bind {
                        endpoint: format!("tcp:{hp}"),
                        source,
                    })?)
                }
            };
            if let Listener::Tcp(t) = &l {
                // (Unix listeners come non-blocking from bind_owner_only.)
                t.set_nonblocking(true)
                    .map_err(|source| ServerError::Bind {
                        endpoint: ep.filename(),
                        source,
                    })?;
            }
            listeners.push(l);
            chardevs.push(ChardevInfo {
                label: format!("compat_monitor{i}"),
                filename: ep.filename(),
            });
        }
        Ok(Self {
            listeners,
            chardevs,
            clients: BTreeMap::new(),
            inbox: VecDeque::new(),
            greeting,
            next_serial: 0,
        })
    }

    /// The endpoints, for `query-chardev`.
    pub fn chardevs(&self) -> &[ChardevInfo] {
        &self.chardevs
    }

    /// Number of connected clients.
    pub fn client_count(&self) -> usize {
        self.clients.len()
    }

    /// Sends an event to every negotiated client.
    pub fn broadcast(&mut self, event: &Value) {
        for c in self.clients.values_mut().filter(|c| c.negotiated) {
            c.queue(event);
        }
    }

    /// Sends each of `events` to every negotiated client.
    pub fn broadcast_all(&mut self, events: &[Value]) {
        for e in events {
            self.broadcast(e);
        }
    }

    /// Executes queued input in arrival order (per client: a client waiting for a
    /// deferred reply has its later input held back). Returns whether anything
    /// was executed.
    pub fn dispatch(&mut self, handler: &mut dyn Handler) -> bool {
        let mut held = VecDeque::new();
        let mut ran = false;
        while let Some((fd, item)) = self.inbox.pop_front() {
            let Some(c) = self.clients.get(&fd).filter(|c| !c.dead) else {
                continue;
            };
            if c.waiting.is_some() {
                held.push_back((fd, item));
                continue;
            }
            ran = true;
            let mut events = Vec::new();
            let reply = self.handle(fd, item, handler, &mut events);
            for e in &events {
                self.broadcast(e);
            }
            if let Some(reply) = reply {
                if let Some(c) = self.clients.get_mut(&fd) {
                    c.queue(&reply);
                }
            }
        }
        self.inbox = held;
        ran
    }

    /// Delivers the result of a deferred command; returns false if no client
    /// waits for `token` any more (it disconnected).
    pub fn complete(&mut self, token: u64, result: Result<Value, QmpError>) -> bool {
        for c in self.clients.values_mut() {
            if c.waiting.as_ref().is_some_and(|(t, _)| *t == token) {
                let (_, id) = c.waiting.take().unwrap_or((token, None));
                c.queue(&protocol::reply(&result, id.as_ref()));
                return true;
            }
        }
        false
    }

    fn handle(
        &mut self,
        fd: RawFd,
        item: Framed,
        handler: &mut dyn Handler,
        events: &mut Vec<Value>,
    ) -> Option<Value> {
        let v = match item {
            Framed::Value(v) => v,
            Framed::Error(msg) => return Some(protocol::reply(&Err(QmpError::generic(msg)), None)),
            // Oversized input drops the client before it reaches the inbox.
            Framed::TooLarge => return None,
        };
        let req = match protocol::parse_request(v) {
            Ok(r) => r,
            Err((e, id)) => return Some(protocol::reply(&Err(e), id.as_ref())),
        };
        match self.run(fd, &req, handler, events) {
            Reply::Now(result) => Some(protocol::reply(&result, req.id.as_ref())),
            Reply::Later(token) => {
                if let Some(c) = self.clients.get_mut(&fd) {
                    c.waiting = Some((token, req.id.clone()));
                }
                None
            }
        }
    }

    fn run(
        &mut self,
        fd: RawFd,
        req: &Request,
        handler: &mut dyn Handler,
        events: &mut Vec<Value>,
    ) -> Reply {
        match self.check(fd, req, handler) {
            Ok(true) => Reply::Now(Ok(json!({}))),
            Ok(false) => handler.execute(req, events),
            Err(e) => Reply::Now(Err(e)),
        }
    }

    /// Protocol checks; Ok(true) when the request was `qmp_capabilities` and is
    /// done, Ok(false) when the handler must run it.
    fn check(
        &mut self,
        fd: RawFd,
        req: &Request,
        handler: &mut dyn Handler,
    ) -> Result<bool, QmpError> {
        let negotiated = self.clients.get(&fd).is_some_and(|c| c.negotiated);
        let is_caps = req.name == "qmp_capabilities";
        let spec = if is_caps {
            Some(CommandSpec {
                name: "qmp_capabilities",
                args: CAPABILITIES_ARGS,
            })
        } else {
            handler
                .commands()
                .iter()
                .find(|c| c.name == req.name)
                .copied()
        };
        if !negotiated && !is_caps {
            return Err(QmpError::not_found(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ));
        }
        if negotiated && is_caps {
            return Err(QmpError::not_found(
                "Capabilities negotiation is already complete, command ignored",
            ));
        }
        let Some(spec) = spec else {
            if handler.passes_through(&req.name) && !req.oob {
                return Ok(false);
            }
            return Err(QmpError::not_found(format!(
                "The command {} has not been found",
                req.name
            )));
        };
        if req.oob {
            return Err(QmpError::generic(format!(
                "The command {} does not support OOB",
                req.name
            )));
        }
        protocol::check_args(&spec, &req.args)?;
        if is_caps {
            if let Some(caps) = req.args.get("enable").and_then(Value::as_array) {
                for c in caps {
                    if c.as_str() != Some("oob") {
                        return Err(QmpError::generic(format!(
                            "Capability '{}' not available",
                            c.as_str().unwrap_or("?")
                        )));
                    }
                }
            }
            if let Some(c) = self.clients.get_mut(&fd) {
                c.negotiated = true;
            }
            return Ok(true);
        }
        Ok(false)
    }

    /// Writes pending output, updates what is watched, and drops dead clients.
    pub fn flush(&mut self, ops: &mut EventOps) {
        let mut gone = Vec::new();
        for (fd, c) in self.clients.iter_mut() {
            c.write_out();
            if c.dead {
                gone.push(*fd);
                continue;
            }
            let want_out = !c.out.is_empty();
            if want_out != c.watching_out {
                let set = if want_out {
                    EventSet::IN | EventSet::OUT
                } else {
                    EventSet::IN
                };
                if ops.modify(Events::new_raw(*fd, set)).is_ok() {
                    c.watching_out = want_out;
                }
            }
        }
        for fd in gone {
            if let Some(c) = self.clients.remove(&fd) {
                let _ = ops.remove(Events::new_raw(fd, EventSet::IN));
                log::info!("QMP client {} disconnected", c.name);
            }
        }
    }

    /// Last chance before exit: writes pending output, waiting at most `limit`
    /// for slow readers.
    pub fn flush_before_exit(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        for c in self.clients.values_mut() {
            if c.stream.set_nonblocking(false).is_err() {
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let _ = match &c.stream {
                Stream::Unix(s) => s.set_write_timeout(Some(left)),
                Stream::Tcp(s) => s.set_write_timeout(Some(left)),
            };
            let (a, b) = c.out.as_slices();
            let _ = c.stream.write_all(a).and_then(|_| c.stream.write_all(b));
            c.out.clear();
            // Close gracefully: a socket closed with unread input makes the peer
            // see a reset instead of EOF, and may discard what we just wrote.
            let _ = match &c.stream {
                Stream::Unix(s) => s.shutdown(std::net::Shutdown::Write),
                Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
            };
            if c.stream.set_nonblocking(true).is_ok() {
                let mut sink = [0u8; 4096];
                while matches!(c.stream.read(&mut sink), Ok(n) if n > 0) {}
            }
        }
    }

    fn accept(&mut self, idx: usize, ops: &mut EventOps) {
        loop {
            let (stream, name) = match self.listeners[idx].accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("QMP accept: {e}");
                    return;
                }
            };
            if let Err(e) = stream.set_nonblocking(true) {
                log::warn!("QMP client: {e}");
                continue;
            }
            self.next_serial += 1;
            let fd = stream.as_raw_fd();
            let mut c = Client {
                stream,
                name: format!("#{} ({name})", self.next_serial),
                streamer: JsonStreamer::new(DEFAULT_MAX_MESSAGE),
                negotiated: false,
                out: VecDeque::new(),
                watching_out: false,
                dead: false,
                waiting: None,
            };
            c.queue(&self.greeting);
            c.write_out();
            let set = if c.out.is_empty() {
                EventSet::IN
            } else {
                EventSet::IN | EventSet::OUT
            };
            c.watching_out = !c.out.is_empty();
            if let Err(e) = ops.add(Events::new_raw(fd, set)) {
                log::warn!("QMP client {}: cannot watch: {e:?}", c.name);
                continue;
            }
            log::info!("QMP client {} connected", c.name);
            self.clients.insert(fd, c);
        }
    }

    fn read_client(&mut self, fd: RawFd) {
        let Some(c) = self.clients.get_mut(&fd) else {
            return;
        };
        let mut buf = vec![0u8; READ_CHUNK];
        match c.stream.read(&mut buf) {
            Ok(0) => c.dead = true,
            Ok(n) => {
                let mut items = Vec::new();
                c.streamer.feed(&buf[..n], &mut items);
                for item in items {
                    if item == Framed::TooLarge {
                        log::warn!(
                            "QMP client {} sent a message over {} bytes: disconnecting it",
                            c.name,
                            DEFAULT_MAX_MESSAGE
                        );
                        c.dead = true;
                        break;
                    }
                    self.inbox.push_back((fd, item));
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                log::debug!("QMP client {}: read: {e}", c.name);
                c.dead = true;
            }
        }
    }
}

impl MutEventSubscriber for QmpServer {
    fn init(&mut self, ops: &mut EventOps) {
        for l in &self.listeners {
            if let Err(e) = ops.add(Events::new_raw(l.fd(), EventSet::IN)) {
                log::error!("cannot watch a QMP listener: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if let Some(idx) = self.listeners.iter().position(|l| l.fd() == fd) {
            self.accept(idx, ops);
            return;
        }
        let set = events.event_set();
        if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
            self.read_client(fd);
        }
        // Replies are produced later by `dispatch`; here only pending output moves.
        self.flush(ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_manager::{EventManager, SubscriberId, SubscriberOps};
    use std::cell::RefCell;
    use std::io::{BufRead, BufReader};
    use std::rc::Rc;

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            "unix:/tmp/vm.qmp".parse::<Endpoint>(),
            Ok(Endpoint::Unix("/tmp/vm.qmp".into()))
        );
        assert_eq!(
            "tcp:127.0.0.1:4444".parse::<Endpoint>(),
            Ok(Endpoint::Tcp("127.0.0.1:4444".into()))
        );
        assert_eq!(
            "tcp:[::1]:4444".parse::<Endpoint>(),
            Ok(Endpoint::Tcp("[::1]:4444".into()))
        );
        for bad in ["unix:", "tcp:4444", "tcp:host:x", "/tmp/x", "tcp::1"] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
        assert_eq!(
            Endpoint::Unix("/tmp/q".into()).filename(),
            "unix:/tmp/q,server=on"
        );
    }

    const FAKE_COMMANDS: &[CommandSpec] = &[
        CommandSpec {
            name: "query-status",
            args: &[],
        },
        CommandSpec {
            name: "stop",
            args: &[],
        },
        CommandSpec {
            name: "query-kvm",
            args: &[],
        },
    ];

    #[derive(Default)]
    struct Fake {
        running: bool,
        deferred: Vec<String>,
    }

    impl Handler for Fake {
        fn commands(&self) -> &[CommandSpec] {
            FAKE_COMMANDS
        }
        fn passes_through(&self, name: &str) -> bool {
            name.starts_with("guest-")
        }
        fn execute(&mut self, req: &Request, events: &mut Vec<Value>) -> Reply {
            if req.name.starts_with("guest-") {
                self.deferred.push(req.name.clone());
                return Reply::Later(self.deferred.len() as u64);
            }
            Reply::Now(self.run_now(req, events))
        }
    }

    impl Fake {
        fn run_now(&mut self, req: &Request, events: &mut Vec<Value>) -> Result<Value, QmpError> {
            match req.name.as_str() {
                "stop" => {
                    if self.running {
                        self.running = false;
                        events.push(protocol::event("STOP", None));
                    }
                    Ok(json!({}))
                }
                "query-kvm" => Ok(json!({"enabled": true, "present": true})),
                _ => Ok(
                    json!({"status": if self.running {"running"} else {"paused"},
                               "singlestep": false, "running": self.running}),
                ),
            }
        }
    }

    struct Harness {
        em: EventManager<Box<dyn MutEventSubscriber>>,
        server: Rc<RefCell<QmpServer>>,
        id: SubscriberId,
        handler: Fake,
        path: PathBuf,
    }

    impl Harness {
        fn new(tag: &str) -> Self {
            let path =
                std::env::temp_dir().join(format!("qmp-test-{}-{tag}.sock", std::process::id()));
            let server = Rc::new(RefCell::new(
                QmpServer::bind(
                    &[Endpoint::Unix(path.clone())],
                    protocol::greeting(&protocol::version_info(0, 1, 0, "minivmm")),
                )
                .unwrap(),
            ));
            let mut em = EventManager::<Box<dyn MutEventSubscriber>>::new().unwrap();
            let id = em.add_subscriber(Box::new(server.clone()));
            Harness {
                em,
                server,
                id,
                handler: Fake {
                    running: true,
                    deferred: Vec::new(),
                },
                path,
            }
        }

        /// Runs the loop until it goes quiet.
        fn pump(&mut self) {
            let mut idle = 0;
            while idle < 2 {
                let n = self.em.run_with_timeout(2).unwrap();
                self.server.borrow_mut().dispatch(&mut self.handler);
                let mut ops = self.em.event_ops(self.id).unwrap();
                self.server.borrow_mut().flush(&mut ops);
                idle = if n == 0 { idle + 1 } else { 0 };
            }
        }

        fn connect(&mut self) -> Conn {
            let s = UnixStream::connect(&self.path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            self.pump();
            let mut c = Conn {
                r: BufReader::new(s.try_clone().unwrap()),
                w: s,
            };
            let g = c.line();
            assert!(g.starts_with("{\"QMP\": {\"version\": {\"qemu\": "), "{g}");
            c
        }
    }

    struct Conn {
        r: BufReader<UnixStream>,
        w: UnixStream,
    }

    impl Conn {
        fn send(&mut self, s: &str) {
            self.w.write_all(s.as_bytes()).unwrap();
        }
        fn line(&mut self) -> String {
            let mut l = String::new();
            self.r.read_line(&mut l).unwrap();
            assert!(l.ends_with("\r\n"), "line ends in CRLF: {l:?}");
            l.trim_end().to_string()
        }
    }

    #[test]
    fn transcript_errors_and_ids() {
        let mut h = Harness::new("errors");
        let mut c = h.connect();
        let cases: &[(&str, &str)] = &[
            (
                "{\"execute\":\"query-status\"}",
                r#"{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#,
            ),
            (
                "{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[\"oob\"]}}",
                r#"{"return": {}}"#,
            ),
            (
                "{\"execute\":\"qmp_capabilities\"}",
                r#"{"error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}"#,
            ),
            (
                "{\"execute\":\"query-status\",\"id\":{\"a\":[1,2]}}",
                r#"{"return": {"status": "running", "singlestep": false, "running": true}, "id": {"a": [1, 2]}}"#,
            ),
            (
                "{\"execute\":\"nonexistent-cmd\"}",
                r#"{"error": {"class": "CommandNotFound", "desc": "The command nonexistent-cmd has not been found"}}"#,
            ),
            (
                "{\"execute\":\"stop\",\"arguments\":{\"bogus\":1}}",
                r#"{"error": {"class": "GenericError", "desc": "Parameter 'bogus' is unexpected"}}"#,
            ),
            (
                "{\"execute\":42}",
                r#"{"error": {"class": "GenericError", "desc": "QMP input member 'execute' must be a string"}}"#,
            ),
            (
                "{\"arguments\":{}}",
                r#"{"error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}}"#,
            ),
            (
                "[1,2,3]",
                r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#,
            ),
            (
                "\"just a string\"",
                r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#,
            ),
            (
                "{bad json}",
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword 'bad'"}}"#,
            ),
            (
                "{\"exec-oob\":\"query-status\",\"id\":1}",
                r#"{"id": 1, "error": {"class": "GenericError", "desc": "The command query-status does not support OOB"}}"#,
            ),
            (
                "{\"execute\":\"nope\",\"id\":\"i\"}",
                r#"{"id": "i", "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ),
        ];
        for (input, expected) in cases {
            c.send(input);
            c.send("\n");
            h.pump();
            assert_eq!(&c.line(), expected, "for input {input}");
        }
    }

    #[test]
    fn deferred_replies_keep_each_clients_order() {
        let mut h = Harness::new("deferred");
        let mut a = h.connect();
        let mut b = h.connect();
        for c in [&mut a, &mut b] {
            c.send("{\"execute\":\"qmp_capabilities\"}");
            h.pump();
            assert_eq!(c.line(), r#"{"return": {}}"#);
        }
        // a waits for the guest; its next command waits behind it, b is served.
        a.send("{\"execute\":\"guest-ping\",\"id\":\"p\"}{\"execute\":\"query-kvm\",\"id\":\"k\"}");
        h.pump();
        b.send("{\"execute\":\"query-kvm\"}");
        h.pump();
        assert_eq!(
            b.line(),
            r#"{"return": {"enabled": true, "present": true}}"#
        );
        assert_eq!(h.handler.deferred, vec!["guest-ping"]);
        assert!(h.server.borrow_mut().complete(1, Ok(json!({}))));
        h.pump();
        assert_eq!(a.line(), r#"{"return": {}, "id": "p"}"#);
        assert_eq!(
            a.line(),
            r#"{"return": {"enabled": true, "present": true}, "id": "k"}"#
        );
        assert!(
            !h.server.borrow_mut().complete(1, Ok(json!({}))),
            "already delivered"
        );
        // Errors and unknown tokens.
        a.send("{\"execute\":\"guest-info\"}");
        h.pump();
        h.server
            .borrow_mut()
            .complete(2, Err(QmpError::generic("Guest agent is not connected")));
        h.pump();
        assert_eq!(
            a.line(),
            r#"{"error": {"class": "GenericError", "desc": "Guest agent is not connected"}}"#
        );
        assert!(!h.server.borrow_mut().complete(99, Ok(json!({}))));
    }

    #[test]
    fn split_and_joined_commands() {
        let mut h = Harness::new("split");
        let mut c = h.connect();
        c.send("{\"execute\":\"qmp_capabilities\"}");
        h.pump();
        assert_eq!(c.line(), r#"{"return": {}}"#);
        c.send("{\"execute\": \"query-kvm\"");
        h.pump();
        c.send("\n}");
        h.pump();
        assert_eq!(
            c.line(),
            r#"{"return": {"enabled": true, "present": true}}"#
        );
        c.send("{\"execute\":\"query-kvm\"}{\"execute\":\"query-status\"}");
        h.pump();
        assert_eq!(
            c.line(),
            r#"{"return": {"enabled": true, "present": true}}"#
        );
        assert!(c.line().starts_with(r#"{"return": {"status": "running""#));
    }

    #[test]
    fn events_go_to_every_negotiated_client_before_the_reply() {
        let mut h = Harness::new("events");
        let mut a = h.connect();
        let mut b = h.connect();
        let mut late = h.connect(); // never negotiates: gets no events
        for c in [&mut a, &mut b] {
            c.send("{\"execute\":\"qmp_capabilities\"}");
            h.pump();
            assert_eq!(c.line(), r#"{"return": {}}"#);
        }
        a.send("{\"execute\":\"stop\",\"id\":5}");
        h.pump();
        let ev = a.line();
        assert!(ev.contains(r#""event": "STOP""#), "{ev}");
        assert_eq!(a.line(), r#"{"return": {}, "id": 5}"#);
        assert!(b.line().contains(r#""event": "STOP""#));
        // A second stop changes nothing: no event.
        a.send("{\"execute\":\"stop\"}");
        h.pump();
        assert_eq!(a.line(), r#"{"return": {}}"#);
        late.send("{\"execute\":\"query-kvm\"}");
        h.pump();
        assert!(late.line().contains("Expecting capabilities negotiation"));
    }

    #[test]
    fn oversized_input_disconnects_only_that_client() {
        let mut h = Harness::new("big");
        let mut good = h.connect();
        let mut bad = h.connect();
        bad.send("{\"execute\":\"");
        let chunk = vec![b'a'; 64 * 1024];
        bad.w.set_nonblocking(true).unwrap();
        let mut sent = 0;
        while sent < 2 * DEFAULT_MAX_MESSAGE {
            match bad.w.write(&chunk) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => h.pump(),
                Err(_) => break,
            }
        }
        h.pump();
        assert_eq!(h.server.borrow().client_count(), 1, "bad client dropped");
        good.send("{\"execute\":\"qmp_capabilities\"}");
        h.pump();
        assert_eq!(good.line(), r#"{"return": {}}"#);
    }

    #[test]
    fn client_that_never_reads_is_dropped_without_blocking() {
        let mut h = Harness::new("noread");
        let mut c = h.connect();
        c.send("{\"execute\":\"qmp_capabilities\"}");
        h.pump();
        // Ask for far more output than the server will hold, never reading it.
        let req = "{\"execute\":\"query-status\"}".repeat(1000);
        c.w.set_nonblocking(true).unwrap();
        for _ in 0..400 {
            if c.w.write_all(req.as_bytes()).is_err() {
                break;
            }
            h.pump();
            if h.server.borrow().client_count() == 0 {
                break;
            }
        }
        assert_eq!(h.server.borrow().client_count(), 0);
    }

    #[test]
    fn socket_is_owner_only_and_live_socket_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let h = Harness::new("perm");
        let mode = std::fs::metadata(&h.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = QmpServer::bind(&[Endpoint::Unix(h.path.clone())], json!({}));
        assert!(matches!(again, Err(ServerError::InUse(_))));
        let p = h.path.clone();
        drop(h);
        assert!(!p.exists(), "socket removed on drop");
        // A stale socket file (no listener) is replaced.
        let stale = UnixListener::bind(&p).unwrap();
        drop(stale);
        assert!(p.exists());
        QmpServer::bind(&[Endpoint::Unix(p.clone())], json!({})).unwrap();
    }

    #[test]
    fn disconnect_mid_command_is_harmless() {
        let mut h = Harness::new("hangup");
        let mut c = h.connect();
        c.send("{\"execute\":\"qmp_capabilities\"}{\"execute\":\"query-sta");
        drop(c);
        h.pump();
        assert_eq!(h.server.borrow().client_count(), 0);
        let mut c2 = h.connect();
        c2.send("{\"execute\":\"qmp_capabilities\"}");
        h.pump();
        assert_eq!(c2.line(), r#"{"return": {}}"#);
    }
}
