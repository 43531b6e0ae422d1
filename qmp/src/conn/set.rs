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

    /// Whether the client is still owed something (a reply to come). A client
    /// whose input is closed is kept while it is busy or has output unwritten.
    fn busy(&self) -> bool {
        false
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

/// Clients one endpoint (listening socket) serves at once; more are accepted
/// and closed at once, with a log line.
pub const MAX_CLIENTS_PER_ENDPOINT: usize = 64;

/// The connections of one server, by id (in order of arrival).
pub struct ConnSet<S> {
    names: Names,
    max_message: usize,
    max_output: usize,
    peers: BTreeMap<u64, Client<S>>,
    /// Which connection has a descriptor now (updated when one is dropped).
    by_fd: HashMap<RawFd, u64>,
    /// Clients per listening descriptor, and each client's listener.
    per_listener: HashMap<RawFd, usize>,
    listener_of: HashMap<u64, RawFd>,
    max_per_listener: usize,
    next_id: u64,
    /// A descriptor kept in reserve: when accept fails for want of descriptors
    /// (EMFILE/ENFILE) it is closed to accept and close the waiting client, so
    /// the listener does not stay readable and the loop does not spin.
    spare: Option<std::fs::File>,
    /// Clients are being refused (full, or out of descriptors): logged once.
    refusing: bool,
}

fn spare_fd() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
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
            per_listener: HashMap::new(),
            listener_of: HashMap::new(),
            max_per_listener: MAX_CLIENTS_PER_ENDPOINT,
            next_id: 0,
            spare: spare_fd(),
            refusing: false,
        }
    }

    /// Changes the number of clients one listener serves at once.
    pub fn set_max_per_listener(&mut self, max: usize) {
        self.max_per_listener = max;
    }

    /// Logs a refused client, once per episode.
    fn refuse(&mut self, why: &str) {
        if !self.refusing {
            self.refusing = true;
            log::warn!(
                "{}: {why}; refusing new clients until some leave",
                self.names.accept_error
            );
        }
    }

    /// Out of descriptors: gives up the spare one to accept the waiting client
    /// and close it at once, then takes the spare back. Returns false if that
    /// was not possible (no spare).
    fn shed(&mut self, listener: &Listener) -> bool {
        if self.spare.take().is_none() {
            return false;
        }
        let shed = listener.accept().is_ok();
        self.spare = spare_fd();
        shed
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
        let lfd = listener.fd();
        loop {
            let (stream, peer) = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    self.refuse(&format!("out of file descriptors ({e})"));
                    if self.shed(listener) {
                        continue;
                    }
                    return;
                }
                Err(e) => {
                    log::warn!("{}: {e}", self.names.accept_error);
                    return;
                }
            };
            let count = self.per_listener.get(&lfd).copied().unwrap_or(0);
            if count >= self.max_per_listener {
                self.refuse(&format!(
                    "{count} clients connected, the most one socket serves"
                ));
                drop(stream);
                continue;
            }
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
            *self.per_listener.entry(lfd).or_default() += 1;
            self.listener_of.insert(id, lfd);
            self.peers.insert(id, Client { conn, state });
        }
    }

    /// Handles an epoll event for a client's descriptor. Returns the id of the
    /// client to read; a client that hung up (closed both directions) is marked
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
        if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            // Both directions closed (a half-close is only EOF on input): nothing
            // can reach it any more, so what it sent last is not run either.
            c.dead = true;
            return None;
        }
        set.contains(EventSet::IN).then_some(c.id)
    }

    /// Writes pending output, updates what is watched, and drops dead clients.
    pub fn flush(&mut self, ops: &mut EventOps) {
        let mut gone = Vec::new();
        for (id, p) in self.peers.iter_mut() {
            let wants_input = p.state.wants_input();
            let c = &mut p.conn;
            c.write_out();
            if c.input_closed && c.out.is_empty() && !p.state.busy() {
                // Half-closed and owed nothing more.
                c.dead = true;
            }
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
                if let Some(l) = self.listener_of.remove(&id) {
                    if let Some(n) = self.per_listener.get_mut(&l) {
                        *n = n.saturating_sub(1);
                    }
                }
                if self.refusing {
                    self.refusing = false;
                    log::info!("{}: accepting clients again", self.names.accept_error);
                }
                log::info!("{} disconnected", p.conn.label());
            }
        }
    }

    /// Last chance before exit: closes every client gracefully
    /// ([`Conn::close_gracefully`]), waiting at most `limit` in all for slow
    /// readers.
    pub fn flush_before_exit(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        // First what every socket takes at once, so that one slow reader
        // does not use up the others' share of the time.
        for p in self.peers.values_mut() {
            p.conn.write_out();
        }
        for p in self.peers.values_mut() {
            p.conn.close_gracefully(deadline);
        }
    }

    /// The descriptors of the clients, in order of arrival (for tests and
    /// diagnostics).
    pub fn fds(&self) -> Vec<RawFd> {
        self.peers.values().map(|p| p.conn.fd()).collect()
    }
}
