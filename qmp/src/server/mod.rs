//! The QMP server: listening endpoints, many clients per endpoint, each negotiating
//! capabilities on its own and receiving every event once negotiated.
//!
//! The server only frames input and keeps per-client state. Commands are executed
//! in arrival order by [`QmpServer::dispatch`], which the VMM thread calls after
//! each event-loop round with its [`Handler`]; events a command causes are sent to
//! every client before that command's reply, as QEMU does. Buffers are bounded: a
//! client that sends an oversized message or stops reading its replies is
//! disconnected (with a log line), never allowed to block the VM or grow memory.
//! Clients are known by a unique id (see [`crate::conn`]), so a client that
//! connects after another left never receives anything meant for it.

use std::collections::VecDeque;
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde_json::Value;

use crate::conn::{Conn, ConnSet, Listener, Names, Session, UnixBindError};
use crate::protocol;
use crate::stream::{Framed, DEFAULT_MAX_MESSAGE};

mod dispatch;
mod endpoint;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod fuzzing;
#[cfg(test)]
mod tests;

pub use crate::protocol::QmpError;
pub use dispatch::{Handler, Reply};
pub use endpoint::{strip_qemu_options, ChardevInfo, Endpoint, ServerError};

/// Output a client may leave unread before it is disconnected.
pub const MAX_PENDING_OUTPUT: usize = 8 << 20;

const NAMES: Names = Names {
    client: "QMP client",
    accept_error: "QMP accept",
    label: |id, peer| format!("QMP client #{id} ({peer})"),
};

/// Commands a client may have queued (read, not yet answered) before it is no
/// longer read: QEMU's monitor suspends a client at 8 queued requests. A client
/// is read at most [`crate::conn::READ_CHUNK`] bytes at a time, so it may have
/// one chunk's worth of commands queued beyond this.
pub const MAX_QUEUED: usize = 8;

/// What the server keeps about a client.
#[derive(Default)]
struct QmpSession {
    negotiated: bool,
    /// A deferred reply this client waits for: (token, id to echo).
    waiting: Option<(u64, Option<Value>)>,
    /// Its messages in the inbox.
    queued: usize,
}

impl Session for QmpSession {
    /// Back-pressure: a client with [`MAX_QUEUED`] commands unanswered (the one
    /// waiting for a deferred reply included) is not read until some are done.
    fn wants_input(&self) -> bool {
        self.queued + usize::from(self.waiting.is_some()) < MAX_QUEUED
    }

    fn busy(&self) -> bool {
        self.queued > 0 || self.waiting.is_some()
    }
}

fn send(conn: &mut Conn, v: &Value) {
    conn.queue(&protocol::to_wire(v));
}

/// The server.
pub struct QmpServer {
    listeners: Vec<Listener>,
    chardevs: Vec<ChardevInfo>,
    clients: ConnSet<QmpSession>,
    /// Framed input not executed yet, with its client's id, in arrival order.
    inbox: VecDeque<(u64, Framed)>,
    greeting: Value,
}

fn bind(ep: &Endpoint) -> Result<Listener, ServerError> {
    match ep {
        Endpoint::Unix(p) => Listener::unix(p).map_err(|e| match e {
            UnixBindError::InUse => ServerError::InUse(p.clone()),
            UnixBindError::NotASocket(what) => ServerError::NotASocket {
                path: p.clone(),
                what,
            },
            UnixBindError::Io(source) => ServerError::Bind {
                endpoint: format!("unix:{}", p.display()),
                source,
            },
        }),
        Endpoint::Tcp(hp) => Listener::tcp(hp).map_err(|source| ServerError::Bind {
            endpoint: format!("tcp:{hp}"),
            source,
        }),
    }
}

impl QmpServer {
    /// Binds every endpoint. `greeting` is sent to each new client.
    pub fn bind(endpoints: &[Endpoint], greeting: Value) -> Result<Self, ServerError> {
        let mut listeners = Vec::new();
        let mut chardevs = Vec::new();
        for (i, ep) in endpoints.iter().enumerate() {
            listeners.push(bind(ep)?);
            chardevs.push(ChardevInfo {
                label: format!("compat_monitor{i}"),
                filename: ep.filename(),
            });
        }
        Ok(Self {
            listeners,
            chardevs,
            clients: ConnSet::new(NAMES, DEFAULT_MAX_MESSAGE, MAX_PENDING_OUTPUT),
            inbox: VecDeque::new(),
            greeting,
        })
    }

    /// Changes how much unread output a client may leave before it is
    /// disconnected (default [`MAX_PENDING_OUTPUT`]); it must hold the largest
    /// reply the server may send.
    pub fn set_max_output(&mut self, max: usize) {
        self.clients.set_max_output(max);
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
        for c in self.clients.iter_mut().filter(|c| c.state.negotiated) {
            send(&mut c.conn, event);
        }
    }

    /// Sends each of `events` to every negotiated client.
    pub fn broadcast_all(&mut self, events: &[Value]) {
        for e in events {
            self.broadcast(e);
        }
    }

    /// Writes pending output, updates what is watched, and drops dead clients.
    pub fn flush(&mut self, ops: &mut EventOps) {
        self.clients.flush(ops);
    }

    /// Last chance before exit: writes pending output, waiting at most `limit`
    /// for slow readers, and closes every client gracefully.
    pub fn flush_before_exit(&mut self, limit: Duration) {
        self.clients.flush_before_exit(limit);
    }

    fn accept(&mut self, idx: usize, ops: &mut EventOps) {
        let greeting = &self.greeting;
        self.clients.accept(&self.listeners[idx], ops, |conn| {
            send(conn, greeting);
            conn.write_out();
            QmpSession::default()
        });
    }

    fn read_client(&mut self, id: u64) {
        let Some(c) = self.clients.get_mut(id) else {
            return;
        };
        let mut items = Vec::new();
        c.conn.read_framed(&mut items);
        c.state.queued += items.len();
        self.inbox.extend(items.into_iter().map(|item| (id, item)));
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
        if let Some(id) = self.clients.event(&events, ops) {
            self.read_client(id);
        }
        // Replies are produced later by `dispatch`; here only pending output moves.
        self.flush(ops);
    }
}
