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
//! client's `id` member (qemu-ga echoes it); replies are routed on their
//! envelope and passed through as the agent wrote them (no JSON value is built
//! of a reply), so a client sees qemu-ga's bytes.
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

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use qmp::conn::{ConnSet, Listener, UnixBindError};
use vmm_sys_util::timerfd::TimerFd;

mod channel;
mod clients;
#[cfg(any(test, feature = "fuzzing"))]
mod fake_agent;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
mod requests;
pub mod wire;

use channel::{AgentReader, Channel};
use clients::AgentSession;
use requests::{InFlight, Work};

/// Largest message a client may send.
pub const MAX_REQUEST: usize = qmp::stream::DEFAULT_MAX_MESSAGE;
/// Largest reply accepted from the agent: 64 MiB of payload (QEMU's JSON token
/// limit; qemu-ga reads at most 48 MiB per `guest-file-read`, 64 MiB in base64)
/// plus 64 KiB for the rest of the reply.
pub const MAX_REPLY: usize = (64 << 20) + (64 << 10);
/// Default for `--agent-timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest timeout: longer ones are cut to this (`u32::MAX` seconds, 136 years;
/// deadlines must stay representable).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(u32::MAX as u64);
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
    /// Something other than a socket is at the path.
    #[error("cannot listen on guest agent socket {path}: it is {what}, which is left untouched (only a stale socket is replaced)")]
    NotASocket {
        /// The path.
        path: PathBuf,
        /// What is there ("a regular file").
        what: &'static str,
    },
    /// Binding failed.
    #[error("cannot listen on guest agent socket {path}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The timer could not be created.
    #[error("cannot create the guest agent timer")]
    Timer(#[source] io::Error),
}

/// The host side of the guest-agent channel. See the crate documentation.
pub struct AgentProxy {
    timeout: Duration,
    listener: Option<Listener>,
    clients: ConnSet<AgentSession>,
    channel: Channel,
    reader: AgentReader,
    queue: VecDeque<Work>,
    in_flight: Option<InFlight>,
    to_guest: Vec<u8>,
    qmp_replies: Vec<(u64, Result<qmp::protocol::RawJson, AgentError>)>,
    timer: TimerFd,
    /// When the timer fires, if armed (it may be earlier than any deadline
    /// left: see `update_timer`).
    timer_deadline: Option<std::time::Instant>,
    /// How often the timer was armed.
    #[cfg(test)]
    timer_arms: u64,
    max_reply: usize,
    last_sync_id: i64,
    clock: Clock,
    /// Requests that ran out of time in flight (the agent was answering none).
    timeouts: u64,
}

/// Where the proxy reads the time: the monotonic clock, or (for the property
/// harnesses) a clock the caller moves.
#[derive(Debug, Clone, Default)]
pub(crate) enum Clock {
    #[default]
    System,
    #[cfg(any(test, feature = "fuzzing"))]
    Manual(std::rc::Rc<std::cell::Cell<std::time::Instant>>),
}

impl Clock {
    pub(crate) fn now(&self) -> std::time::Instant {
        match self {
            Clock::System => std::time::Instant::now(),
            #[cfg(any(test, feature = "fuzzing"))]
            Clock::Manual(t) => t.get(),
        }
    }
}

fn bind_unix(path: &Path) -> Result<Listener, ProxyError> {
    Listener::unix(path).map_err(|e| match e {
        UnixBindError::InUse => ProxyError::InUse(path.into()),
        UnixBindError::NotASocket(what) => ProxyError::NotASocket {
            path: path.into(),
            what,
        },
        UnixBindError::Io(source) => ProxyError::Bind {
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

impl AgentProxy {
    /// Creates the proxy and binds the socket if one is configured: owner-only
    /// permissions, a stale socket file is replaced, a live one is an error.
    pub fn new(cfg: ProxyConfig) -> Result<Self, ProxyError> {
        let listener = cfg.socket.as_deref().map(bind_unix).transpose()?;
        let timer = TimerFd::new().map_err(|e| ProxyError::Timer(e.into()))?;
        set_nonblocking(timer.as_raw_fd()).map_err(ProxyError::Timer)?;
        Ok(Self {
            timeout: cfg.timeout.min(MAX_TIMEOUT),
            listener,
            clients: clients::new_set(MAX_REPLY),
            channel: Channel::Closed,
            reader: AgentReader::new(MAX_REPLY),
            queue: VecDeque::new(),
            in_flight: None,
            to_guest: Vec::new(),
            qmp_replies: Vec::new(),
            timer,
            timer_deadline: None,
            #[cfg(test)]
            timer_arms: 0,
            max_reply: MAX_REPLY,
            last_sync_id: 0,
            clock: Clock::System,
            timeouts: 0,
        })
    }

    /// How many requests ran out of time while the agent had them: the
    /// caller can log what the channel looked like then.
    pub fn timeouts(&self) -> u64 {
        self.timeouts
    }

    /// Changes the largest reply accepted from the agent (default [`MAX_REPLY`]).
    pub fn set_max_reply(&mut self, max: usize) {
        self.max_reply = max;
        self.clients.set_max_output(clients::max_output(max));
        self.reader = AgentReader::new(max);
        if matches!(self.channel, Channel::Syncing { .. }) {
            self.reader.discarding = true;
        }
    }

    /// `unix:PATH,server=on`, for `query-chardev`.
    pub fn socket_filename(&self) -> Option<String> {
        let path = self.listener.as_ref()?.path()?;
        Some(format!("unix:{},server=on", path.display()))
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
}

impl MutEventSubscriber for AgentProxy {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.timer.as_raw_fd(), EventSet::IN)) {
            log::error!("cannot watch the guest agent timer: {e:?}");
        }
        if let Some(l) = &self.listener {
            if let Err(e) = ops.add(Events::new_raw(l.fd(), EventSet::IN)) {
                log::error!("cannot watch the guest agent socket: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.timer.as_raw_fd() {
            self.on_timer();
        } else if self.listener.as_ref().is_some_and(|l| l.fd() == fd) {
            self.accept(ops);
        } else if let Some(id) = self.clients.event(&events, ops) {
            self.read_client(id);
        }
        self.flush(ops);
    }
}

#[cfg(test)]
mod tests;
