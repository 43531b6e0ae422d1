//! Host side of the guest-agent (qemu-ga) channel for minivmm.
//!
//! The guest runs the real `qemu-ga` on a virtio-console port; the VMM moves
//! bytes between that port and an [`AgentProxy`] ([`AgentProxy::from_guest`],
//! [`AgentProxy::take_to_guest`], [`AgentProxy::port_state`]). The proxy serves
//! two kinds of host clients, as libvirt's agent client and QEMU's chardev do:
//!
//! * clients of the qga-compatible Unix socket (`--agent unix:PATH`), which send
//!   exactly what they would send to qemu-ga through QEMU's chardev and read
//!   exactly what qemu-ga writes back (replies end in a single "\n");
//! * QMP clients, whose `guest-*` commands the VMM hands over with
//!   [`AgentProxy::submit_qmp`] and whose results come back from
//!   [`AgentProxy::take_qmp_replies`] as the `return` value or an [`AgentError`].
//!
//! # One request at a time
//!
//! qemu-ga answers requests in order and its replies carry nothing that says which
//! request they answer, so the proxy keeps exactly one request in flight to the
//! agent. Everything else waits in one FIFO queue (requests from all socket
//! clients and QMP, in arrival order); each reply goes to the client that sent the
//! request, and a reply for a client that has disconnected is read and dropped.
//! Requests are forwarded re-serialized as compact JSON plus "\n", including the
//! client's `id` member (qemu-ga echoes it); replies are re-serialized the way
//! qemu-ga writes them, so a client sees qemu-ga's bytes.
//!
//! # Keeping the channel in sync
//!
//! The proxy synchronises the channel itself, the way the `guest-sync-delimited`
//! documentation asks a client to: it writes
//! `\xff{"execute":"guest-sync-delimited","arguments":{"id":N}}\n` with a fresh
//! random `N`, then discards everything the agent writes up to and including the
//! reply `{"return": N}` that directly follows a 0xFF byte. (qemu-ga 7.2 first
//! answers the leading 0xFF itself with a `JSON parse error, stray '\uFFFD'`
//! reply; that and any stale output of an earlier session are skipped.) While
//! discarding, nothing is buffered: bytes are dropped until the next 0xFF.
//! Requests queued meanwhile wait and are sent once the sync reply arrives.
//!
//! A sync is started:
//! * when the guest opens the port;
//! * after a request timed out (its late reply must not reach the next requester);
//! * whenever the agent writes something that cannot be matched: output while no
//!   request is in flight, text that is not JSON or not a reply object, a reply
//!   over the size limit, or an error reply saying `JSON parse error` (qemu-ga may
//!   write two replies after malformed input; the second would otherwise be taken
//!   for the answer to the next request);
//! * after a command without success reply completed on a VM event (see below);
//! * after a sync itself timed out (with a new id), which keeps retrying while
//!   the port is open.
//!
//! # Clients' own sync and the 0xFF byte
//!
//! A client's `guest-sync` / `guest-sync-delimited` is forwarded like any other
//! request; the agent's reply goes back to that client byte for byte, with the
//! 0xFF prefix when qemu-ga wrote one. A 0xFF byte *from a client* is not passed to
//! the agent: the proxy answers it the way qemu-ga 7.2 does, with
//! `{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\uFFFD'"}}\n`,
//! and drops any partial message the client had sent before it (that is what the
//! byte asks the agent to do). So a client that sends
//! `\xff{"execute":"guest-sync-delimited","arguments":{"id":1234}}\n` reads the
//! parse-error reply and then `\xff{"return": 1234}\n`, as through QEMU. Input a
//! client sends that is not JSON is likewise answered by the proxy with qemu-ga's
//! `JSON parse error, ...` reply and never reaches the agent, so the agent's input
//! is always whole, well-formed requests. Local answers keep each client's order
//! of replies.
//!
//! # Commands without success reply
//!
//! `guest-shutdown`, `guest-suspend-disk`, `guest-suspend-ram` and
//! `guest-suspend-hybrid` send nothing when they succeed. They stay in flight until
//! the agent answers (with an error), until the VMM reports `SHUTDOWN`, `RESET`,
//! `SUSPEND` or `SUSPEND_DISK` through [`AgentProxy::vm_event`], or until the port
//! closes; the last two complete them successfully: QMP callers get `{}`, socket
//! clients `{"return": {}}\n`. A timeout makes them fail like any other request.
//!
//! # Errors
//!
//! Errors made by the proxy are `GenericError`s; QMP callers get them as
//! [`AgentError`], socket clients as qga-style
//! `{"error": {"class": "GenericError", "desc": ...}}\n` replies (with the request's
//! `id` when it had one):
//!
//! * the port is closed: `Guest agent is not connected`, at once, for new requests
//!   and for requests queued when the port closes;
//! * the port closes while a request is in flight:
//!   `Guest agent disappeared while executing command`;
//! * no reply within the timeout (`--agent-timeout`, 30 s by default):
//!   `Guest agent did not respond within N seconds`, then a resync; requests still
//!   queued when a sync times out fail the same way;
//! * a reply over [`MAX_REPLY`] (64 MiB of payload, which is what qemu-ga's
//!   largest `guest-file-read` makes of 48 MiB in base64, plus 64 KiB):
//!   `Guest agent reply exceeds the size limit of 67174400 bytes`, then a resync;
//! * something from the agent that is not a reply:
//!   `Guest agent sent an invalid reply`, then a resync.
//!
//! A client message over 1 MiB disconnects that client (with a log line). Every
//! buffer is bounded: a client with 16 requests outstanding is not read until some
//! complete, its unread replies may not exceed [`MAX_REPLY`] + 1 MiB, and the agent's
//! output is parsed with the [`MAX_REPLY`] limit.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use qmp::stream::{Framed, JsonStreamer};
use serde_json::{json, Map, Value};
use vmm_sys_util::timerfd::TimerFd;

pub mod wire;

use wire::SENTINEL;

/// Largest message a client may send.
pub const MAX_REQUEST: usize = qmp::stream::DEFAULT_MAX_MESSAGE;
/// Largest reply accepted from the agent: 64 MiB of payload (QEMU's JSON token
/// limit; qemu-ga reads at most 48 MiB per `guest-file-read`, 64 MiB in base64)
/// plus 64 KiB for the rest of the reply.
pub const MAX_REPLY: usize = (64 << 20) + (64 << 10);
/// Default for `--agent-timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests (and local replies) a socket client may have outstanding before the
/// proxy stops reading from it.
pub const MAX_OUTSTANDING_PER_CLIENT: usize = 16;
/// Commands qemu-ga does not answer when they succeed.
pub const NO_REPLY_COMMANDS: &[&str] = &[
    "guest-shutdown",
    "guest-suspend-disk",
    "guest-suspend-ram",
    "guest-suspend-hybrid",
];
/// VM events that complete a command without success reply.
pub const COMPLETING_EVENTS: &[&str] = &["SHUTDOWN", "RESET", "SUSPEND", "SUSPEND_DISK"];
/// Error for requests made while the port is closed.
pub const NOT_CONNECTED: &str = "Guest agent is not connected";
/// Error for a request in flight when the port closes.
pub const DISAPPEARED: &str = "Guest agent disappeared while executing command";
/// Error for output from the agent that is not a reply.
pub const INVALID_REPLY: &str = "Guest agent sent an invalid reply";

const READ_CHUNK: usize = 64 * 1024;

/// Configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Path of the qga-compatible socket (`--agent unix:PATH`), if any.
    pub socket: Option<PathBuf>,
    /// How long to wait for a reply (`--agent-timeout`).
    pub timeout: Duration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            socket: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// An error reply for a guest-agent command (QMP error class and description).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{class}: {desc}")]
pub struct AgentError {
    /// Error class (`GenericError`, or what the agent said).
    pub class: String,
    /// Description.
    pub desc: String,
}

impl AgentError {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self {
            class: "GenericError".into(),
            desc: desc.into(),
        }
    }
}

/// Errors creating the proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Another process serves this socket.
    #[error("guest agent socket {0} is in use by another process")]
    InUse(PathBuf),
    /// Binding failed.
    #[error("cannot listen on guest agent socket {path}: {source}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The timer could not be created.
    #[error("cannot create the guest agent timer: {0}")]
    Timer(#[source] io::Error),
}

/// Who gets a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Client(u64),
    Qmp(u64),
}

#[derive(Debug)]
struct Request {
    owner: Owner,
    /// Bytes for the agent.
    wire: Vec<u8>,
    /// The request's `id` member, echoed in replies the proxy makes itself.
    id: Option<Value>,
    /// A command without success reply.
    no_reply: bool,
}

#[derive(Debug)]
enum Work {
    Forward(Request),
    /// A reply the proxy made for a client, delivered in that client's order.
    Local {
        client: u64,
        bytes: Vec<u8>,
    },
}

#[derive(Debug)]
struct InFlight {
    req: Request,
    deadline: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Channel {
    /// The guest has not opened the port.
    Closed,
    /// Waiting for the reply to our `guest-sync-delimited`.
    Syncing { id: i64, deadline: Instant },
    /// In sync.
    Ready,
}

/// Parses the agent's output.
struct AgentReader {
    streamer: JsonStreamer,
    /// Drop everything up to the next 0xFF.
    discarding: bool,
    /// The message being parsed came right after a 0xFF.
    after_sentinel: bool,
    max: usize,
}

impl AgentReader {
    fn new(max: usize) -> Self {
        Self {
            streamer: JsonStreamer::new(max),
            discarding: false,
            after_sentinel: false,
            max,
        }
    }

    fn reset(&mut self) {
        self.streamer = JsonStreamer::new(self.max);
        self.after_sentinel = false;
    }

    fn discard(&mut self) {
        self.reset();
        self.discarding = true;
    }
}

struct Client {
    id: u64,
    stream: UnixStream,
    streamer: JsonStreamer,
    out: VecDeque<u8>,
    /// Interest registered with epoll.
    interest: EventSet,
    dead: bool,
    /// Requests and local replies queued or in flight.
    outstanding: usize,
}

impl Client {
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
                    log::debug!("guest agent client {}: write: {e}", self.id);
                    self.dead = true;
                }
            }
        }
    }

    fn wanted_interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        if self.outstanding < MAX_OUTSTANDING_PER_CLIENT {
            set |= EventSet::IN;
        }
        if !self.out.is_empty() {
            set |= EventSet::OUT;
        }
        set
    }
}

struct Listener {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The host side of the guest-agent channel. See the crate documentation.
pub struct AgentProxy {
    timeout: Duration,
    listener: Option<Listener>,
    clients: BTreeMap<u64, Client>,
    by_fd: HashMap<RawFd, u64>,
    next_client: u64,
    channel: Channel,
    reader: AgentReader,
    queue: VecDeque<Work>,
    in_flight: Option<InFlight>,
    to_guest: Vec<u8>,
    qmp_replies: Vec<(u64, Result<Value, AgentError>)>,
    timer: TimerFd,
    timer_deadline: Option<Instant>,
    max_reply: usize,
    last_sync_id: i64,
}

fn bind_unix(path: &Path) -> Result<UnixListener, ProxyError> {
    qmp::server::bind_owner_only(path).map_err(|e| match e {
        qmp::server::UnixBindError::InUse => ProxyError::InUse(path.into()),
        qmp::server::UnixBindError::Io(source) => ProxyError::Bind {
            path: path.into(),
            source,
        },
    })
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL on a descriptor we own reads its flags; no memory is involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL on a descriptor we own only changes its status flags.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A fresh random id for `guest-sync-delimited` (a positive 31-bit number, like
/// the ones libvirt uses; never the previous one).
fn random_id(previous: i64) -> i64 {
    let mut buf = [0u8; 4];
    // SAFETY: getrandom writes at most buf.len() bytes into buf, which we own.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), libc::GRND_NONBLOCK) };
    let mut v = u32::from_ne_bytes(buf);
    if n != 4 {
        // No entropy yet: fall back to the clock, good enough to tell syncs apart.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        v = t.subsec_nanos() ^ (t.as_secs() as u32).rotate_left(16) ^ std::process::id();
    }
    let mut id = i64::from(v & 0x7fff_ffff);
    if id == previous {
        id = (id + 1) & 0x7fff_ffff;
    }
    id
}

/// "30", "0.2": seconds as in the timeout error.
fn seconds(d: Duration) -> String {
    format!("{}", d.as_secs_f64())
}

impl AgentProxy {
    /// Creates the proxy and binds the socket if one is configured: owner-only
    /// permissions, a stale socket file is replaced, a live one is an error.
    pub fn new(cfg: ProxyConfig) -> Result<Self, ProxyError> {
        let listener = match cfg.socket {
            Some(path) => Some(Listener {
                listener: bind_unix(&path)?,
                path,
            }),
            None => None,
        };
        let timer = TimerFd::new().map_err(|e| ProxyError::Timer(e.into()))?;
        set_nonblocking(timer.as_raw_fd()).map_err(ProxyError::Timer)?;
        Ok(Self {
            timeout: cfg.timeout,
            listener,
            clients: BTreeMap::new(),
            by_fd: HashMap::new(),
            next_client: 0,
            channel: Channel::Closed,
            reader: AgentReader::new(MAX_REPLY),
            queue: VecDeque::new(),
            in_flight: None,
            to_guest: Vec::new(),
            qmp_replies: Vec::new(),
            timer,
            timer_deadline: None,
            max_reply: MAX_REPLY,
            last_sync_id: 0,
        })
    }

    /// Changes the largest reply accepted from the agent (default [`MAX_REPLY`]).
    pub fn set_max_reply(&mut self, max: usize) {
        self.max_reply = max;
        self.reader = AgentReader::new(max);
        if matches!(self.channel, Channel::Syncing { .. }) {
            self.reader.discarding = true;
        }
    }

    /// `unix:PATH,server=on`, for `query-chardev`.
    pub fn socket_filename(&self) -> Option<String> {
        self.listener
            .as_ref()
            .map(|l| format!("unix:{},server=on", l.path.display()))
    }

    /// Whether the guest has the port open.
    pub fn is_connected(&self) -> bool {
        self.channel != Channel::Closed
    }

    /// Whether the channel is in sync (port open, no sync in progress).
    pub fn is_synced(&self) -> bool {
        self.channel == Channel::Ready
    }

    /// Number of connected socket clients.
    pub fn client_count(&self) -> usize {
        self.clients.len()
    }

    // ---- guest side -------------------------------------------------------

    /// The guest opened (`true`) or closed (`false`) the port. Opening starts a
    /// sync; closing fails what is queued and in flight.
    pub fn port_state(&mut self, open: bool) {
        match (open, self.channel) {
            (true, Channel::Closed) => {
                log::info!("guest agent port opened");
                self.channel = Channel::Ready;
                self.reader.reset();
                self.resync();
            }
            (false, Channel::Syncing { .. } | Channel::Ready) => {
                log::info!("guest agent port closed");
                self.channel = Channel::Closed;
                self.to_guest.clear();
                self.reader.reset();
                self.reader.discarding = false;
                if let Some(f) = self.in_flight.take() {
                    let r = if f.req.no_reply {
                        Ok(json!({}))
                    } else {
                        Err(AgentError::generic(DISAPPEARED))
                    };
                    self.complete(f.req, r);
                }
                self.fail_queued(NOT_CONNECTED);
            }
            _ => {}
        }
        self.update_timer();
    }

    /// Bytes the agent wrote.
    pub fn from_guest(&mut self, data: &[u8]) {
        if self.channel == Channel::Closed {
            return;
        }
        let mut rest = data;
        while !rest.is_empty() {
            let ff = rest.iter().position(|&b| b == SENTINEL);
            if self.reader.discarding {
                let Some(i) = ff else { break };
                rest = &rest[i + 1..];
                self.reader.discarding = false;
                self.reader.reset();
                self.reader.after_sentinel = true;
                continue;
            }
            let (seg, next) = match ff {
                Some(i) => (&rest[..i], Some(&rest[i + 1..])),
                None => (rest, None),
            };
            let mut items = Vec::new();
            self.reader.streamer.feed(seg, &mut items);
            for item in items {
                let sentinel = std::mem::take(&mut self.reader.after_sentinel);
                self.agent_item(item, sentinel);
                if self.reader.discarding || self.channel == Channel::Closed {
                    break;
                }
            }
            match next {
                Some(n) if !self.reader.discarding => {
                    // A 0xFF: the agent's output starts afresh.
                    self.reader.reset();
                    self.reader.after_sentinel = true;
                    rest = n;
                }
                Some(_) => {
                    // Discarding: rescan this segment's end for the 0xFF.
                    rest = &rest[seg.len()..];
                }
                None => break,
            }
        }
        self.pump();
        self.update_timer();
    }

    /// Bytes to deliver to the agent.
    pub fn take_to_guest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.to_guest)
    }

    fn agent_item(&mut self, item: Framed, sentinel: bool) {
        match self.channel {
            Channel::Closed => {}
            Channel::Syncing { id, .. } => {
                let ours = sentinel
                    && matches!(&item, Framed::Value(v)
                        if v.as_object().is_some_and(|m| m.len() == 1)
                            && v.get("return").and_then(Value::as_i64) == Some(id));
                if ours {
                    log::debug!("guest agent channel in sync (id {id})");
                    self.channel = Channel::Ready;
                } else {
                    // Stale output: skip to the next 0xFF.
                    self.reader.discard();
                }
            }
            Channel::Ready => {
                let Some(f) = self.in_flight.take() else {
                    log::warn!("unexpected output from the guest agent: resynchronising");
                    self.resync();
                    return;
                };
                match item {
                    Framed::Value(v) if wire::is_reply(&v) => {
                        let parse_error = v
                            .pointer("/error/desc")
                            .and_then(Value::as_str)
                            .is_some_and(|d| d.starts_with("JSON parse error"));
                        self.deliver_agent_reply(f.req, &v, sentinel);
                        if parse_error {
                            log::warn!("the guest agent reported a parse error: resynchronising");
                            self.resync();
                        }
                    }
                    Framed::TooLarge => {
                        log::warn!(
                            "guest agent reply exceeds {} bytes: resynchronising",
                            self.max_reply
                        );
                        let e = format!(
                            "Guest agent reply exceeds the size limit of {} bytes",
                            self.max_reply
                        );
                        self.complete(f.req, Err(AgentError::generic(e)));
                        self.resync();
                    }
                    other => {
                        log::warn!(
                            "invalid output from the guest agent ({other:?}): resynchronising"
                        );
                        self.complete(f.req, Err(AgentError::generic(INVALID_REPLY)));
                        self.resync();
                    }
                }
            }
        }
    }

    /// Starts a sync (when the port is open): the agent's output is discarded up
    /// to the sentinel-prefixed reply carrying a fresh id.
    fn resync(&mut self) {
        if self.channel == Channel::Closed {
            return;
        }
        let id = random_id(self.last_sync_id);
        self.last_sync_id = id;
        self.to_guest.push(SENTINEL);
        self.to_guest.extend(wire::to_request_wire(&json!({
            "execute": "guest-sync-delimited",
            "arguments": {"id": id},
        })));
        self.channel = Channel::Syncing {
            id,
            deadline: Instant::now() + self.timeout,
        };
        self.reader.discard();
    }

    // ---- QMP side ---------------------------------------------------------

    /// Forwards a `guest-*` command (`{"execute": ..., "arguments": ...}`) from a
    /// QMP client; the reply comes back from [`Self::take_qmp_replies`] with `token`.
    pub fn submit_qmp(&mut self, token: u64, request: Value) {
        let name = request.get("execute").and_then(Value::as_str);
        let Some(name) = name else {
            self.qmp_replies.push((
                token,
                Err(AgentError::generic("QMP input lacks member 'execute'")),
            ));
            return;
        };
        if self.channel == Channel::Closed {
            self.qmp_replies
                .push((token, Err(AgentError::generic(NOT_CONNECTED))));
            return;
        }
        let mut m = Map::new();
        m.insert("execute".into(), json!(name));
        if let Some(a) = request.get("arguments") {
            m.insert("arguments".into(), a.clone());
        }
        let req = Request {
            owner: Owner::Qmp(token),
            no_reply: NO_REPLY_COMMANDS.contains(&name),
            wire: wire::to_request_wire(&Value::Object(m)),
            id: None,
        };
        self.queue.push_back(Work::Forward(req));
        self.pump();
        self.update_timer();
    }

    /// Completed QMP requests: the `return` value or the error.
    pub fn take_qmp_replies(&mut self) -> Vec<(u64, Result<Value, AgentError>)> {
        std::mem::take(&mut self.qmp_replies)
    }

    /// A VM event (`SHUTDOWN`, `RESET`, ...): completes an in-flight command
    /// without success reply.
    pub fn vm_event(&mut self, name: &str) {
        if !COMPLETING_EVENTS.contains(&name) {
            return;
        }
        if self.in_flight.as_ref().is_some_and(|f| f.req.no_reply) {
            if let Some(f) = self.in_flight.take() {
                log::debug!("guest agent command completed by the {name} event");
                self.complete(f.req, Ok(json!({})));
                self.resync();
            }
        }
        self.pump();
        self.update_timer();
    }

    // ---- requests ---------------------------------------------------------

    /// Sends the next request if the channel is free; delivers local replies.
    fn pump(&mut self) {
        while self.in_flight.is_none() {
            match self.queue.front() {
                None => break,
                Some(Work::Forward(_)) if self.channel != Channel::Ready => break,
                Some(_) => {}
            }
            match self.queue.pop_front() {
                Some(Work::Local { client, bytes }) => self.client_output(client, &bytes, true),
                Some(Work::Forward(req)) => {
                    self.to_guest.extend_from_slice(&req.wire);
                    self.in_flight = Some(InFlight {
                        req,
                        deadline: Instant::now() + self.timeout,
                    });
                }
                None => break,
            }
        }
    }

    fn fail_queued(&mut self, desc: &str) {
        while let Some(w) = self.queue.pop_front() {
            match w {
                Work::Forward(req) => self.complete(req, Err(AgentError::generic(desc))),
                Work::Local { client, bytes } => self.client_output(client, &bytes, true),
            }
        }
    }

    /// Completes a request with a result made by the proxy.
    fn complete(&mut self, req: Request, result: Result<Value, AgentError>) {
        match req.owner {
            Owner::Qmp(token) => self.qmp_replies.push((token, result)),
            Owner::Client(c) => {
                let bytes = wire::to_wire(&wire::reply(&result, req.id.as_ref()));
                self.client_output(c, &bytes, true);
            }
        }
    }

    fn deliver_agent_reply(&mut self, req: Request, v: &Value, sentinel: bool) {
        match req.owner {
            Owner::Qmp(token) => self.qmp_replies.push((token, wire::reply_result(v))),
            Owner::Client(c) => {
                let mut bytes = Vec::new();
                if sentinel {
                    bytes.push(SENTINEL);
                }
                bytes.extend(wire::to_wire(v));
                self.client_output(c, &bytes, true);
            }
        }
    }

    // ---- time -------------------------------------------------------------

    fn deadline(&self) -> Option<Instant> {
        if let Some(f) = &self.in_flight {
            return Some(f.deadline);
        }
        match self.channel {
            Channel::Syncing { deadline, .. } => Some(deadline),
            _ => None,
        }
    }

    fn update_timer(&mut self) {
        let want = self.deadline();
        if want == self.timer_deadline {
            return;
        }
        let r = match want {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                self.timer.reset(left.max(Duration::from_nanos(1)), None)
            }
            None => self.timer.clear(),
        };
        if let Err(e) = r {
            log::error!("guest agent timer: {e}");
        }
        self.timer_deadline = want;
    }

    fn on_timer(&mut self) {
        let mut count = [0u8; 8];
        // Drain the expiration count; the timer is non-blocking, so a stale event
        // (the timer was re-armed meanwhile) reads nothing.
        // SAFETY: reads at most 8 bytes into `count`, which we own.
        let _ = unsafe {
            libc::read(
                self.timer.as_raw_fd(),
                count.as_mut_ptr().cast(),
                count.len(),
            )
        };
        self.timer_deadline = None;
        let now = Instant::now();
        let what = seconds(self.timeout);
        if self.in_flight.as_ref().is_some_and(|f| f.deadline <= now) {
            if let Some(f) = self.in_flight.take() {
                log::warn!("the guest agent did not answer within {what} s: resynchronising");
                let e = format!("Guest agent did not respond within {what} seconds");
                self.complete(f.req, Err(AgentError::generic(e)));
                self.resync();
            }
        } else if let Channel::Syncing { deadline, .. } = self.channel {
            if deadline <= now && self.in_flight.is_none() {
                log::warn!("the guest agent did not answer guest-sync-delimited within {what} s");
                self.fail_queued(&format!(
                    "Guest agent did not respond within {what} seconds"
                ));
                self.resync();
            }
        }
        self.pump();
        self.update_timer();
    }

    // ---- socket clients ---------------------------------------------------

    /// Queues output for a client. `done` marks one outstanding item finished.
    fn client_output(&mut self, id: u64, bytes: &[u8], done: bool) {
        let limit = self.max_reply + MAX_REQUEST;
        let Some(c) = self.clients.get_mut(&id) else {
            return; // Gone: its reply is dropped.
        };
        if done {
            c.outstanding = c.outstanding.saturating_sub(1);
        }
        if c.dead {
            return;
        }
        c.out.extend(bytes);
        if c.out.len() > limit {
            log::warn!(
                "guest agent client {id} is not reading its replies ({} bytes pending): disconnecting it",
                c.out.len()
            );
            c.dead = true;
            c.out.clear();
            return;
        }
        c.write_out();
    }

    /// A reply made by the proxy for a client, after the client's earlier ones.
    fn local_reply(&mut self, id: u64, result: Result<Value, AgentError>, req_id: Option<&Value>) {
        let bytes = wire::to_wire(&wire::reply(&result, req_id));
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        if c.outstanding == 0 {
            self.client_output(id, &bytes, false);
        } else {
            c.outstanding += 1;
            self.queue.push_back(Work::Local { client: id, bytes });
        }
    }

    fn client_item(&mut self, id: u64, item: Framed) {
        match item {
            Framed::Value(v) => {
                let req_id = v.get("id").cloned();
                if self.channel == Channel::Closed {
                    self.local_reply(id, Err(AgentError::generic(NOT_CONNECTED)), req_id.as_ref());
                    return;
                }
                let name = v.get("execute").and_then(Value::as_str);
                let req = Request {
                    owner: Owner::Client(id),
                    no_reply: name.is_some_and(|n| NO_REPLY_COMMANDS.contains(&n)),
                    wire: wire::to_request_wire(&v),
                    id: req_id,
                };
                if let Some(c) = self.clients.get_mut(&id) {
                    c.outstanding += 1;
                }
                self.queue.push_back(Work::Forward(req));
                self.pump();
            }
            Framed::Error(msg) => {
                // qemu-ga's own answer to malformed input; the agent never sees it.
                let msg = msg.replace("\\uFFFD", "\u{FFFD}");
                self.local_reply(id, Err(AgentError::generic(msg)), None);
            }
            Framed::TooLarge => {
                log::warn!(
                    "guest agent client {id} sent a message over {MAX_REQUEST} bytes: disconnecting it"
                );
                if let Some(c) = self.clients.get_mut(&id) {
                    c.dead = true;
                }
            }
        }
    }

    fn read_client(&mut self, id: u64) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        let mut buf = vec![0u8; READ_CHUNK];
        let n = match c.stream.read(&mut buf) {
            Ok(0) => {
                c.dead = true;
                return;
            }
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                return
            }
            Err(e) => {
                log::debug!("guest agent client {id}: read: {e}");
                c.dead = true;
                return;
            }
        };
        let mut items = Vec::new();
        for (i, seg) in buf[..n].split(|&b| b == SENTINEL).enumerate() {
            if i > 0 {
                // A 0xFF: drop the partial message and answer as qemu-ga does.
                c.streamer = JsonStreamer::new(MAX_REQUEST);
                items.push(Framed::Error(wire::STRAY_SENTINEL.into()));
            }
            c.streamer.feed(seg, &mut items);
            if items.last() == Some(&Framed::TooLarge) {
                break;
            }
        }
        for item in items {
            if self.clients.get(&id).is_none_or(|c| c.dead) {
                break;
            }
            self.client_item(id, item);
        }
        self.update_timer();
    }

    fn accept(&mut self, ops: &mut EventOps) {
        let Some(l) = &self.listener else { return };
        loop {
            let stream = match l.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("guest agent socket: accept: {e}");
                    return;
                }
            };
            if let Err(e) = stream.set_nonblocking(true) {
                log::warn!("guest agent client: {e}");
                continue;
            }
            let fd = stream.as_raw_fd();
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::warn!("guest agent client: cannot watch: {e:?}");
                continue;
            }
            let id = self.next_client;
            self.next_client += 1;
            log::info!("guest agent client {id} connected");
            self.by_fd.insert(fd, id);
            self.clients.insert(
                id,
                Client {
                    id,
                    stream,
                    streamer: JsonStreamer::new(MAX_REQUEST),
                    out: VecDeque::new(),
                    interest: EventSet::IN,
                    dead: false,
                    outstanding: 0,
                },
            );
        }
    }

    /// Writes pending client output, updates what is watched, and drops clients
    /// that are gone. The VMM calls it after [`Self::from_guest`],
    /// [`Self::port_state`], [`Self::vm_event`] and [`Self::submit_qmp`].
    pub fn flush(&mut self, ops: &mut EventOps) {
        let mut gone = Vec::new();
        for (id, c) in self.clients.iter_mut() {
            c.write_out();
            if c.dead {
                gone.push(*id);
                continue;
            }
            let want = c.wanted_interest();
            if want != c.interest {
                let fd = c.stream.as_raw_fd();
                if ops.modify(Events::new_raw(fd, want)).is_ok() {
                    c.interest = want;
                }
            }
        }
        for id in gone {
            if let Some(c) = self.clients.remove(&id) {
                let fd = c.stream.as_raw_fd();
                let _ = ops.remove(Events::empty_raw(fd));
                self.by_fd.remove(&fd);
                log::info!("guest agent client {id} disconnected");
            }
        }
    }
}

impl MutEventSubscriber for AgentProxy {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.timer.as_raw_fd(), EventSet::IN)) {
            log::error!("cannot watch the guest agent timer: {e:?}");
        }
        if let Some(l) = &self.listener {
            if let Err(e) = ops.add(Events::new_raw(l.listener.as_raw_fd(), EventSet::IN)) {
                log::error!("cannot watch the guest agent socket: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.timer.as_raw_fd() {
            self.on_timer();
        } else if self
            .listener
            .as_ref()
            .is_some_and(|l| l.listener.as_raw_fd() == fd)
        {
            self.accept(ops);
        } else if let Some(&id) = self.by_fd.get(&fd) {
            let set = events.event_set();
            let reading = self
                .clients
                .get(&id)
                .is_some_and(|c| c.interest.contains(EventSet::IN));
            if set.contains(EventSet::IN)
                || (reading && set.intersects(EventSet::HANG_UP | EventSet::ERROR))
            {
                self.read_client(id);
            } else if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                // Not being read (too much outstanding) and gone: drop it.
                if let Some(c) = self.clients.get_mut(&id) {
                    c.dead = true;
                }
            }
        } else {
            // Not ours any more: stop watching it.
            let _ = ops.remove(Events::empty_raw(fd));
        }
        self.flush(ops);
    }
}

#[cfg(test)]
mod tests;
