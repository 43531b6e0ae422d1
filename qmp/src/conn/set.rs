//! The connections of one server.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events};

use super::{Conn, Listener};

/// What a server keeps about a client, besides its connection.
pub trait Session {
    /// Whether to read the client now. `false` is back-pressure: its input waits
    /// in the kernel and, once the socket buffer is full, in the client.
    fn wants_input(&self) -> bool {
        true
    }
}

/// A client: its connection and the server's session state.
pub struct Client<S> {
    /// The connection.
    pub conn: Conn,
    /// The server's state for this client.
    pub state: S,
}

/// How a server's connections are named in log lines.
#[derive(Debug, Clone, Copy)]
pub struct Names {
    /// What a client is ("QMP client"); starts log lines about a client that has
    /// no label yet.
    pub client: &'static str,
    /// Starts the log line for a failed accept ("QMP accept").
    pub accept_error: &'static str,
    /// A client's label from its id and peer ("QMP client #3 (/run/vm.qmp)").
    pub label: fn(u64, &str) -> String,
}

/// The connections of one server, by id (in order of arrival).
pub struct ConnSet<S> {
    names: Names,
    max_message: usize,
    max_output: usize,
    peers: BTreeMap<u64, Client<S>>,
    /// Which connection has a descriptor now (updated when one is dropped).
    by_fd: HashMap<RawFd, u64>,
    next_id: u64,
}

impl<S: Session> ConnSet<S> {
    /// An empty set whose connections take messages of at most `max_message`
    /// bytes and hold at most `max_output` bytes of unread output.
    pub fn new(names: Names, max_message: usize, max_output: usize) -> Self {
        Self {
            names,
            max_message,
            max_output,
            peers: BTreeMap::new(),
            by_fd: HashMap::new(),
            next_id: 0,
        }
    }

    /// Number of connections (including dead ones not flushed yet).
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// The client with this id, if it is still there.
    pub fn get(&self, id: u64) -> Option<&Client<S>> {
        self.peers.get(&id)
    }

    /// The client with this id, if it is still there.
    pub fn get_mut(&mut self, id: u64) -> Option<&mut Client<S>> {
        self.peers.get_mut(&id)
    }

    /// The clients, in order of arrival.
    pub fn iter(&self) -> impl Iterator<Item = &Client<S>> {
        self.peers.values()
    }

    /// The clients, in order of arrival.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Client<S>> {
        self.peers.values_mut()
    }

    /// Changes the output limit of every connection, present and future.
    pub fn set_max_output(&mut self, max: usize) {
        self.max_output = max;
        for p in self.peers.values_mut() {
            p.conn.set_max_output(max);
        }
    }

    /// Accepts every pending connection of `listener`: `make` gives each its
    /// session state (and may queue a greeting); then it is watched by epoll.
    pub fn accept(
        &mut self,
        listener: &Listener,
        ops: &mut EventOps,
        mut make: impl FnMut(&mut Conn) -> S,
    ) {
        loop {
            let (stream, peer) = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("{}: {e}", self.names.accept_error);
                    return;
                }
            };
            if let Err(e) = stream.set_nonblocking(true) {
                log::warn!("{}: {e}", self.names.client);
                continue;
            }
            self.next_id += 1;
            let id = self.next_id;
            let label = (self.names.label)(id, &peer);
            let mut conn = Conn::new(id, label, stream, self.max_message, self.max_output);
            let state = make(&mut conn);
            if let Err(e) = conn.watch(ops, state.wants_input()) {
                log::warn!("{}: cannot watch: {e:?}", conn.label());
                continue;
            }
            log::info!("{} connected", conn.label());
            self.by_fd.insert(conn.fd(), id);
            self.peers.insert(id, Client { conn, state });
        }
    }

    /// Handles an epoll event for a client's descriptor. Returns the id of the
    /// client to read; a client that hung up while not being read is marked
    /// dead. An event for a descriptor that is not a client's any more is
    /// unwatched, one for an earlier client on a reused descriptor ignored.
    pub fn event(&mut self, ev: &Events, ops: &mut EventOps) -> Option<u64> {
        let fd = ev.fd();
        let Some(p) = self.by_fd.get(&fd).and_then(|id| self.peers.get_mut(id)) else {
            let _ = ops.remove(Events::empty_raw(fd));
            return None;
        };
        let c = &mut p.conn;
        if !c.is_for(ev) {
            return None;
        }
        let set = ev.event_set();
        let gone = set.intersects(EventSet::HANG_UP | EventSet::ERROR);
        if set.contains(EventSet::IN) || (gone && c.interest.contains(EventSet::IN)) {
            return Some(c.id);
        }
        if gone {
            // Not being read and gone: drop it.
            c.dead = true;
        }
        None
    }

    /// Writes pending output, updates what is watched, and drops dead clients.
    pub fn flush(&mut self, ops: &mut EventOps) {
        let mut gone = Vec::new();
        for (id, p) in self.peers.iter_mut() {
            let wants_input = p.state.wants_input();
            let c = &mut p.conn;
            c.write_out();
            if c.dead {
                gone.push(*id);
            } else {
                c.sync_interest(ops, wants_input);
            }
        }
        for id in gone {
            if let Some(p) = self.peers.remove(&id) {
                let fd = p.conn.fd();
                let _ = ops.remove(Events::empty_raw(fd));
                self.by_fd.remove(&fd);
                log::info!("{} disconnected", p.conn.label());
            }
        }
    }

    /// Last chance before exit: closes every client gracefully
    /// ([`Conn::close_gracefully`]), waiting at most `limit` in all for slow
    /// readers.
    pub fn flush_before_exit(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        for p in self.peers.values_mut() {
            if !p.conn.close_gracefully(deadline) {
                break;
            }
        }
    }

    /// The descriptors of the clients, in order of arrival (for tests and
    /// diagnostics).
    pub fn fds(&self) -> Vec<RawFd> {
        self.peers.values().map(|p| p.conn.fd()).collect()
    }
}
